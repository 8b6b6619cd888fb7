#!/usr/bin/env bash
# One training run inside a Slurm allocation, preemption-safe:
#     exec bash slurm/run-training.sh --config cxr/configs/X.yaml key=value ...
# (train.sbatch and ensemble.sh exec this so it *is* the batch shell and gets
# `--signal=B:USR1@N`.) It starts one `accelerate launch` per node with srun —
# rendezvous on the first node of the allocation, port from the job id — and:
#   USR1 to this shell  -> forwarded to srun, which passes it to every process of
#                          the step; the launchers ignore it (inherited SIG_IGN),
#                          training checkpoints `last` at the next step and exits;
#   then                -> `scontrol requeue` of this job (array task), and the
#                          restarted job resumes from `last` (the caller passes
#                          resume=auto).
# The requeue happens when training says it stopped to be requeued: exit status
# 75 or RUN/status.json "preempted" with this start's nonce $CXR_RUN_NONCE
# (job id.restart count; launchers hide the status) — also after a SIGTERM or a
# USR1 that reached training some other way.
#
# Environment (set by the callers; defaults for one process):
#   CXR_REPO                repository root (cwd for training)            ($PWD)
#   CXR_PYTHON              python with cxr installed        ($CXR_REPO/.venv/bin/python)
#   CXR_ACCELERATE_CONFIG   accelerate config file    (launch/configs/cpu-2proc.yaml)
#   CXR_PROCS_PER_NODE      training processes per node                         (1)
#   CXR_THREADS             OMP/MKL threads per process                          (1)
#   CXR_REQUEUE_STATUS      training's "requeue me" exit status (cxr.runs.run_log.EXIT_REQUEUE) (75)
#   CXR_MAX_REQUEUES        give up after this many restarts                    (20)
#   CXR_RESIGNAL_SECONDS    repeat the forwarded USR1 this often until training stops (10)
#   CXR_TRAIN_SCRIPT        the script accelerate launches               (cxr/train.py)
set -uo pipefail

CXR_REPO=${CXR_REPO:-$PWD}
CXR_PYTHON=${CXR_PYTHON:-$CXR_REPO/.venv/bin/python}
[[ -x $CXR_PYTHON ]] || CXR_PYTHON=$(command -v python3)
CXR_ACCELERATE_CONFIG=${CXR_ACCELERATE_CONFIG:-launch/configs/cpu-2proc.yaml}
CXR_PROCS_PER_NODE=${CXR_PROCS_PER_NODE:-1}
CXR_REQUEUE_STATUS=${CXR_REQUEUE_STATUS:-75}
CXR_MAX_REQUEUES=${CXR_MAX_REQUEUES:-20}
CXR_TRAIN_SCRIPT=${CXR_TRAIN_SCRIPT:-cxr/train.py}
CXR_RESIGNAL_SECONDS=${CXR_RESIGNAL_SECONDS:-10}
export OMP_NUM_THREADS=${CXR_THREADS:-1} MKL_NUM_THREADS=${CXR_THREADS:-1}
export PYTHONUNBUFFERED=1

: "${SLURM_JOB_ID:?run-training.sh runs inside a Slurm job (sbatch slurm/train.sbatch ...)}"
cd "$CXR_REPO" || exit 2
# An array task is requeued by its own id; the plain job id would requeue the whole array.
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    SELF=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
    SELF=$SLURM_JOB_ID
fi
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
export MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" | head -n 1)
# the job's port, below the ephemeral range (launch/tasks.py rendezvous_port says why; the same formula)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 12768))
export CXR_NPROC=$((NNODES * CXR_PROCS_PER_NODE))
echo "[run-training] job $SELF restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) x $CXR_PROCS_PER_NODE process(es)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CXR_ACCELERATE_CONFIG, $(date -Is)"

preempted=0
child=""
run_dir=""
for arg in "$@"; do [[ $arg == checkpoint.run_dir=* ]] && run_dir=${arg#checkpoint.run_dir=}; done
[[ -z $run_dir || $run_dir == /* ]] || run_dir=$CXR_REPO/$run_dir
# This start's nonce: training writes it into RUN/status.json (cxr.runs.run_log), so a "preempted"
# status is known to be this start's own without comparing file times (node and file-server
# clocks differ) — an older "preempted" left by a start that then crashed carries another one.
export CXR_RUN_NONCE="$SELF.${SLURM_RESTART_COUNT:-0}"

# Training wrote "preempted" to RUN/status.json in this start (cxr.runs.run_log reads it; no torch).
recorded_preempted() {
    [[ -n $run_dir ]] && "$CXR_PYTHON" -m cxr.runs.run_log preempted "$run_dir" "$CXR_RUN_NONCE"
}

# Forwarded at once (the grace time is short, and asking python whether training
# stopped takes a second or more on a busy node). A signal that lands while training
# is still importing (its handler not yet installed, USR1 still ignored) would be
# lost, so repeat it until training records that it stopped (its handler only sets
# a flag; but a repeat during interpreter shutdown, handlers reset, would kill it —
# hence the check before each repeat).
forward_usr1() {
    ((preempted)) && return
    preempted=1
    echo "[run-training] USR1 at $(date -Is): asking training to checkpoint and stop"
    [[ -n $child ]] || return
    (
        trap - USR1
        while kill -USR1 "$child" 2>/dev/null; do
            sleep "$CXR_RESIGNAL_SECONDS"
            recorded_preempted && break
        done
    ) &
}
trap forward_usr1 USR1

# Per node (the accelerate config's machine count, rank and port are replaced so
# two runs on one node do not collide): ignore USR1 in the launcher processes (the ignore is inherited across
# exec, and Python keeps it), so only training — which installs its own handler —
# reacts when srun forwards the signal to the step.
launch_node='trap "" USR1
exec "$CXR_PYTHON" -m accelerate.commands.launch --config_file "$CXR_ACCELERATE_CONFIG" \
    --num_processes "$CXR_NPROC" --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "$CXR_TRAIN_SCRIPT" "$@"'
export CXR_PYTHON CXR_ACCELERATE_CONFIG CXR_TRAIN_SCRIPT
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    --kill-on-bad-exit=1 bash -c "$launch_node" launch-node "$@" &
child=$!
# `wait` returns early (status > 128) when the trap runs; keep waiting for srun.
while :; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done
echo "[run-training] training exited with status $status at $(date -Is)"

# accelerate/torchrun turn any worker status into 1, so training's own record
# (RUN/status.json with this start's nonce) says whether it stopped to be requeued.
stopped_for_requeue() {
    ((status == CXR_REQUEUE_STATUS)) && return 0
    if [[ -n $run_dir ]]; then
        recorded_preempted
    else
        ((preempted)) # no run dir given: trust our own signal
    fi
}

if ((status == 0)); then
    exit 0
fi
if stopped_for_requeue; then
    if ((${SLURM_RESTART_COUNT:-0} >= CXR_MAX_REQUEUES)); then
        echo "[run-training] not requeueing: already restarted ${SLURM_RESTART_COUNT} times (CXR_MAX_REQUEUES)" >&2
        exit "$status"
    fi
    echo "[run-training] requeueing $SELF; it resumes from checkpoints/last"
    scontrol requeue "$SELF" && exit 0
    echo "[run-training] scontrol requeue $SELF failed" >&2
elif ((preempted)); then
    echo "[run-training] signalled, but training did not record a checkpoint-and-stop: not requeueing" >&2
fi
exit "$status"
