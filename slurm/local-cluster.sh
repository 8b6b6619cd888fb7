#!/usr/bin/env bash
# A real single-node Slurm on this machine, for trying the Slurm workflow and
# for the tests:  slurm/local-cluster.sh start|stop|status|check|conf
#
#   start   install the Debian packages if missing (slurmctld slurmd slurm-client
#           munge slurmdbd mariadb-server; needs root and apt), write the configs,
#           start munged, MariaDB, slurmdbd, slurmctld, slurmd, and wait until the
#           node is idle. Idempotent: daemons already running are left alone.
#   stop    stop only the daemons this script started (by the pid files under
#           $CXR_SLURM_HOME/run); jobs still running are killed with slurmd.
#   status  which of our daemons run, then `sinfo`.
#   check   only the safety checks of start (exit 3 when another Slurm is here).
#   conf    print the path of our slurm.conf: clients need `export SLURM_CONF=$(... conf)`.
#
# Everything lives under $CXR_SLURM_HOME: the configs ($CXR_SLURM_HOME/etc/slurm.conf,
# daemons started with -f, clients through SLURM_CONF), state, spool, pids, logs and the
# database. Nothing is written to /etc/slurm. start refuses (exit 3, one line naming what
# it found) where a Slurm it did not start is configured or running: a slurm.conf at
# $CXR_SLURM_SYSTEM_CONF (or SLURM_CONF) without our marker line, or a slurmctld /
# slurmd / slurmdbd process that none of our pid files names. A config this script
# wrote earlier (older versions wrote /etc/slurm/slurm.conf) carries the marker and is
# not a reason to refuse. munge is shared: a munged that answers is used as it is;
# otherwise one is started with /etc/munge/munge.key (created only when missing).
#
# Environment:
#   CXR_SLURM_HOME  configs, state, spool, pid, log and database files   (/var/tmp/cxr-slurm)
#   CXR_SLURM_DB_PORT  port of the private MariaDB                (3316)
#   CXR_SLURM_SYSTEM_CONF  where a site's Slurm config would be   (/etc/slurm/slurm.conf)
#
# Why the settings below (measured on a 2-core Debian 12 VM without systemd):
# proctrack/linuxproc + task/none need no cgroups; cons_tres + CR_Core_Memory
# with DefMemPerCPU lets jobs share the node (otherwise each takes all memory);
# cred_expire=5 and short scheduler intervals bring requeue -> restart from
# 121 s down to a few seconds; slurmdbd + MariaDB make `sacct` and submitit's
# job states work. Process 1 here does not reap, so an exited daemon lingers
# as a zombie: state Z counts as stopped.
set -euo pipefail

HOME_DIR=${CXR_SLURM_HOME:-/var/tmp/cxr-slurm}
DB_PORT=${CXR_SLURM_DB_PORT:-3316}
CLUSTER=cxrlocal
CONF_DIR=$HOME_DIR/etc
CONF=$CONF_DIR/slurm.conf
SYSTEM_CONF=${CXR_SLURM_SYSTEM_CONF:-/etc/slurm/slurm.conf}
MARKER="# Written by slurm/local-cluster.sh"
RUN=$HOME_DIR/run
LOG=$HOME_DIR/log
DB_SOCK=$RUN/mariadb.sock
DB_PASS=cxrlocal
NODE=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 2; }
refuse() { say "refused: $*"; exit 3; }

# A pid is alive when it exists and is not a zombie.
alive() {
    local pid=$1 state
    state=$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ') || return 1
    [[ -n $state && $state != Z* ]]
}

pid_alive() { [[ -s $1 ]] && alive "$(cat "$1")"; }

# Poll a command for up to $1 seconds.
wait_for() {
    local secs=$1; shift
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root to install them (apt-get)"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get — install Slurm, munge, MariaDB by hand"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Keep the packages' init scripts from starting system-wide daemons: this
    # script starts its own, with its own state directory.
    local guard=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$guard" && chmod +x "$guard"
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
    } >"$HOME_DIR/apt.log" 2>&1 || rc=$?
    [[ -n $guard ]] && rm -f "$guard"
    ((rc == 0)) || die "apt-get failed (see $HOME_DIR/apt.log)"
}

ours_conf() { [[ -f $1 ]] && grep -qF "$MARKER" "$1"; }

# Is a Slurm that this script did not start configured or running here? (exit 3 if so)
check_foreign() {
    local conf
    for conf in "$SYSTEM_CONF" "${ORIG_SLURM_CONF:-}"; do
        [[ -n $conf && -f $conf && $conf != "$CONF" ]] || continue
        ours_conf "$conf" ||
            refuse "$conf: a Slurm configuration not written by local-cluster.sh — this machine has its own Slurm: use it (real-cluster path in docs/cluster.md) or run \`make test-fast\`"
    done
    local name pid mine foreign=()
    for name in slurmctld slurmd slurmdbd; do
        mine=""
        [[ -s $RUN/$name.pid ]] && mine=$(cat "$RUN/$name.pid")
        for pid in $(pgrep -x "$name" 2>/dev/null || true); do
            alive "$pid" || continue
            [[ $pid == "$mine" ]] || foreign+=("$name (pid $pid)")
        done
    done
    # every foreign daemon in one message, so the user sees all there is to stop
    ((${#foreign[@]} == 0)) ||
        refuse "$(IFS=,; echo "${foreign[*]}" | sed 's/,/, /g') running and not started by local-cluster.sh ($RUN/*.pid) — stop them, or use that Slurm (\`make test-fast\` skips the local-Slurm tests)"
}

write_slurm_conf() {
    # Node line from slurmd -C (sockets/cores/threads as slurmd sees them) with
    # ~90 % of the memory, so the OS keeps some.
    local node_line mem
    node_line=$(slurmd -C | head -1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/; s/^NodeName=[^ ]*/NodeName=$NODE NodeAddr=127.0.0.1/" <<<"$node_line")
    mkdir -p "$CONF_DIR"
    cat >"$CONF_DIR/slurm.conf.tmp" <<EOF
$MARKER: a single-node Slurm for trying the workflow.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$HOME_DIR/state
SlurmdSpoolDir=$HOME_DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
$node_line
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf"

    (
        umask 077
        cat >"$CONF_DIR/slurmdbd.conf.tmp" <<EOF
$MARKER.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$CONF_DIR/slurmdbd.conf.tmp"
    mv "$CONF_DIR/slurmdbd.conf.tmp" "$CONF_DIR/slurmdbd.conf"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0 # a munged (ours or the system's) already answers
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid
    wait_for 10 bash -c 'munge -n | unmunge' || die "munged did not answer (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$RUN/munged.pid"
}

db_query() { mariadb --no-defaults --socket="$DB_SOCK" -uroot -e "$1"; }

start_mariadb() {
    pid_alive "$RUN/mariadb.pid" && return 0
    if [[ ! -d $HOME_DIR/mysql/mysql ]]; then
        say "initialising MariaDB in $HOME_DIR/mysql (first start only)"
        mariadb-install-db --no-defaults --user=root --datadir="$HOME_DIR/mysql" \
            --auth-root-authentication-method=normal >"$LOG/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    mariadbd --no-defaults --user=root --datadir="$HOME_DIR/mysql" --socket="$DB_SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/mariadb.pid" \
        --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
    disown
    wait_for 30 db_query "SELECT 1" || die "MariaDB did not come up (see $LOG/mariadb.log)"
    db_query "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_daemon() { # name pidfile command...
    local name=$1 pidfile=$2; shift 2
    pid_alive "$pidfile" && return 0
    "$@" >>"$LOG/$name.out" 2>&1 || die "$name failed to start (see $LOG/$name.log)"
    wait_for 15 pid_alive "$pidfile" || die "$name did not stay up (see $LOG/$name.log)"
}

cmd_start() {
    local t0=$SECONDS
    check_foreign
    mkdir -p "$HOME_DIR"/{state,spool,run,log}
    install_packages
    write_slurm_conf
    start_munge
    start_mariadb
    # slurmdbd reads slurmdbd.conf beside $SLURM_CONF (exported above); the others get -f
    start_daemon slurmdbd "$RUN/slurmdbd.pid" slurmdbd
    wait_for 20 sacctmgr -n show cluster || die "slurmdbd does not answer (see $LOG/slurmdbd.log)"
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
    start_daemon slurmctld "$RUN/slurmctld.pid" slurmctld -f "$CONF"
    start_daemon slurmd "$RUN/slurmd.pid" slurmd -f "$CONF" -N "$NODE"
    wait_for 30 node_ready || die "node $NODE is not idle (sinfo: $(sinfo -h -o '%T %E' 2>&1))"
    say "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %T %c cpus %m MB'); clients: export SLURM_CONF=$CONF"
}

node_ready() {
    local state
    state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null)
    case $state in
    idle* | mixed* | allocated*) return 0 ;;
    down* | drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
    esac
}

stop_pidfile() { # name pidfile
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_for 20 bash -c "! ps -o stat= -p $pid | grep -qv '^Z'"; then
            say "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    stop_pidfile slurmd "$RUN/slurmd.pid"
    stop_pidfile slurmctld "$RUN/slurmctld.pid"
    stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
    stop_pidfile mariadb "$RUN/mariadb.pid"
    stop_pidfile munged "$RUN/munged.pid"
    say "stopped"
}

cmd_status() {
    local name rc=0
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        if pid_alive "$RUN/$name.pid"; then
            echo "$name: running (pid $(cat "$RUN/$name.pid"))"
        else
            echo "$name: not started by local-cluster.sh"
            [[ $name == munged ]] || rc=1
        fi
    done
    command -v sinfo >/dev/null && sinfo 2>&1 || true
    return $rc
}

# Our clients (sinfo, sacctmgr, scontrol) and slurmdbd read our config, never the system's.
ORIG_SLURM_CONF=${SLURM_CONF:-}
export SLURM_CONF=$CONF

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
check) check_foreign; say "no other Slurm found; ours is configured in $CONF" ;;
conf) echo "$CONF" ;;
*)
    echo "usage: $0 start|stop|status|check|conf   (everything in \$CXR_SLURM_HOME, default /var/tmp/cxr-slurm)" >&2
    exit 2
    ;;
esac
