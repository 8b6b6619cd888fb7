#!/usr/bin/env bash
# Train an ensemble on Slurm as a job array, then evaluate it:
#
#   CXR_SHARDS=/data/shards CXR_RUNS=/runs/ens1 sbatch slurm/ensemble.sh
#   CXR_SHARDS=/data/shards CXR_RUNS=/runs/ens1 bash slurm/ensemble.sh  # same, no submit job
#
# Run from the repository root. The script has two stages:
#   submit  (not inside an array task): submits this same script as an array with
#           one task per member of CXR_ENSEMBLE, and slurm/evaluate.sbatch with
#           --dependency=afterok:<array> (cancelled if a member fails), prints
#           the job ids, and exits. Under `sbatch` this stage is a small job.
#   member  (array task I): trains member I (`python -m launch.members` gives its
#           seed and hyper-parameters) via slurm/run-training.sh — one
#           `accelerate launch` per node; on USR1 (sent CXR_SIGNAL_SECONDS before
#           the time limit, or by `scancel --batch --signal=USR1 <job>_<I>`)
#           training checkpoints, the task requeues itself and resumes from
#           checkpoints/last.
#
# Environment (defaults in brackets; relative paths are taken from the cwd):
#   CXR_ENSEMBLE           ensemble config: name in launch/ensembles/ or a path  [default]
#   CXR_SHARDS             shards directory (python -m shards pack)        [data/shards]
#   CXR_RUNS               members' run dirs go to CXR_RUNS/<member>  [runs/<ensemble>]
#   CXR_REPORT             evaluator's report directory             [$CXR_RUNS/report]
#   CXR_LOGS               Slurm logs (the submit job's own .out too)    [$CXR_RUNS/logs]
#   CXR_PROFILE            job size from launch/profiles.py (python -m launch.profiles)
#                          g5.24xlarge | p4d.24xlarge-x2 | cpu-local       [g5.24xlarge]
#   CXR_ACCELERATE_CONFIG  accelerate config                       [the profile's one]
#   CXR_PROCS_PER_NODE     training processes per node (one per GPU)         [profile]
#   CXR_THREADS            OMP threads per process                           [profile]
#   CXR_SIGNAL_SECONDS     USR1 this long before the time limit              [profile]
#   CXR_TIME               time limit per member, minutes or D-HH:MM:SS      [profile]
#   CXR_PARTITION CXR_ACCOUNT CXR_QOS CXR_CONSTRAINT   site placement    [none]
#   CXR_SBATCH_ARGS        more sbatch options for the members (e.g. --exclusive)
#   CXR_EVAL_SBATCH_ARGS   more sbatch options for the evaluator
#   CXR_MAX_PARALLEL       at most this many members at once (array %N)    [no limit]
#   CXR_TRAIN_OVERRIDES    key=value for every member, space separated
#                          (e.g. "train.epochs=30 data.resolution=512")
#   CXR_SPLIT              split the evaluator reports                            [test]
#   CXR_PYTHON             python with cxr installed            [.venv/bin/python]
#SBATCH --job-name=cxr-ensemble-submit
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=1G
#SBATCH --time=10
#SBATCH --output=cxr-ensemble-submit-%j.out
set -euo pipefail

die() { echo "ensemble.sh: error: $*" >&2; exit 2; }

# The repository: given, or where this script lives (outside Slurm), or where
# `sbatch` was run (inside a job the script is a spooled copy).
if [[ -z ${CXR_REPO:-} ]]; then
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        CXR_REPO=$SLURM_SUBMIT_DIR
    else
        CXR_REPO=$(cd "$(dirname "$0")/.." && pwd)
    fi
fi
[[ -f $CXR_REPO/slurm/run-training.sh ]] || die "$CXR_REPO is not the cxr repository — run from its root or set CXR_REPO"
CXR_PYTHON=${CXR_PYTHON:-$CXR_REPO/.venv/bin/python}
[[ -x $CXR_PYTHON ]] || CXR_PYTHON=$(command -v python3)
export CXR_REPO CXR_PYTHON PYTHONPATH=$CXR_REPO${PYTHONPATH:+:$PYTHONPATH}

run_member() {
    local argv=() extra=()
    read -r -a extra <<<"${CXR_TRAIN_OVERRIDES:-}"
    mapfile -t argv < <("$CXR_PYTHON" -m launch.members "$CXR_ENSEMBLE" --argv "$SLURM_ARRAY_TASK_ID" \
        --runs "$CXR_RUNS" --shards "$CXR_SHARDS" "${extra[@]/#/--set=}")
    ((${#argv[@]} > 0)) || die "no training arguments for member $SLURM_ARRAY_TASK_ID of $CXR_ENSEMBLE"
    echo "[ensemble] member $SLURM_ARRAY_TASK_ID of $CXR_ENSEMBLE: ${argv[*]}"
    exec bash "$CXR_REPO/slurm/run-training.sh" "${argv[@]}"
}

if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    : "${CXR_ENSEMBLE:?} ${CXR_RUNS:?} ${CXR_SHARDS:?}"
    run_member
fi

# ---- submit stage -------------------------------------------------------------
command -v sbatch >/dev/null ||
    die "sbatch not found — on one machine start slurm/local-cluster.sh, or use python -m launch.submit ensemble --cluster local"
cd "${SLURM_SUBMIT_DIR:-$PWD}"
abspath() { realpath -m -- "$1"; }
CXR_ENSEMBLE=${CXR_ENSEMBLE:-default}
[[ -f $CXR_ENSEMBLE ]] && CXR_ENSEMBLE=$(abspath "$CXR_ENSEMBLE")
name=$("$CXR_PYTHON" -c 'import sys; from launch.members import load_ensemble; print(load_ensemble(sys.argv[1]).name)' "$CXR_ENSEMBLE") ||
    die "cannot read ensemble config $CXR_ENSEMBLE"
count=$("$CXR_PYTHON" -m launch.members "$CXR_ENSEMBLE" --count)
CXR_PROFILE=${CXR_PROFILE:-g5.24xlarge}
profile=$("$CXR_PYTHON" -m launch.profiles "$CXR_PROFILE" --shell) || die "unknown CXR_PROFILE=$CXR_PROFILE"
eval "$profile"
eval "$CXR_PROFILE_ENV"  # the profile's networking variables (NCCL/EFA); values set by the caller win

CXR_SHARDS=$(abspath "${CXR_SHARDS:-data/shards}")
CXR_RUNS=$(abspath "${CXR_RUNS:-runs/$name}")
CXR_REPORT=$(abspath "${CXR_REPORT:-$CXR_RUNS/report}")
CXR_LOGS=$(abspath "${CXR_LOGS:-$CXR_RUNS/logs}")
CXR_ACCELERATE_CONFIG=${CXR_ACCELERATE_CONFIG:-$CXR_PROFILE_ACCELERATE_CONFIG}
CXR_PROCS_PER_NODE=${CXR_PROCS_PER_NODE:-$CXR_PROFILE_PROCS_PER_NODE}
CXR_THREADS=${CXR_THREADS:-$CXR_PROFILE_THREADS}
[[ -d $CXR_SHARDS ]] || echo "ensemble.sh: warning: $CXR_SHARDS does not exist yet (CXR_SHARDS)" >&2
[[ -f $CXR_REPO/$CXR_ACCELERATE_CONFIG || -f $CXR_ACCELERATE_CONFIG ]] ||
    die "accelerate config $CXR_ACCELERATE_CONFIG not found (CXR_ACCELERATE_CONFIG)"
mkdir -p "$CXR_RUNS" "$CXR_LOGS"
# Under `sbatch` this submit job's output starts in the submit directory (an #SBATCH line cannot
# name $CXR_LOGS): move it there, beside the jobs' logs, and write the rest of it there.
own_out=${SLURM_SUBMIT_DIR:-.}/cxr-ensemble-submit-${SLURM_JOB_ID:-}.out
if [[ -n ${SLURM_JOB_ID:-} && -f $own_out ]]; then
    mkdir -p "$CXR_LOGS" && mv -- "$own_out" "$CXR_LOGS/" && exec >>"$CXR_LOGS/${own_out##*/}" 2>&1
fi

# Options that come later win, so the profile goes first and the user's last.
member_opts=($CXR_PROFILE_SBATCH_ARGS)
[[ -n ${CXR_TIME:-} ]] && member_opts+=("--time=$CXR_TIME")
[[ -n ${CXR_SIGNAL_SECONDS:-} ]] && member_opts+=("--signal=B:USR1@$CXR_SIGNAL_SECONDS")
member_opts+=(${CXR_SBATCH_ARGS:-})
eval_opts=($CXR_PROFILE_EVAL_SBATCH_ARGS ${CXR_EVAL_SBATCH_ARGS:-})
mapfile -t eval_args < <("$CXR_PYTHON" -m launch.members "$CXR_ENSEMBLE" --evaluate-args)
mapfile -t run_dirs < <("$CXR_PYTHON" -m launch.members "$CXR_ENSEMBLE" --run-dirs --runs "$CXR_RUNS")

# Inside the submit job its own SLURM_* variables would leak into the jobs it
# submits (srun reads e.g. SLURM_MEM_PER_CPU as an option); drop them.
for var in $(compgen -e | grep '^SLURM_' | grep -v '^SLURM_CONF$' || true); do unset "$var"; done
# The profile's loader workers and torch threads first, so the user's overrides win.
CXR_TRAIN_OVERRIDES="data.num_threads=$CXR_PROFILE_WORKERS train.threads=$CXR_THREADS ${CXR_TRAIN_OVERRIDES:-}"
export CXR_ENSEMBLE CXR_SHARDS CXR_RUNS CXR_REPORT CXR_ACCELERATE_CONFIG CXR_PROCS_PER_NODE CXR_THREADS CXR_TRAIN_OVERRIDES
export CXR_EVAL_RUNS="${run_dirs[*]}"

parallel=${CXR_MAX_PARALLEL:+%$CXR_MAX_PARALLEL}
array_id=$(sbatch --parsable --array="0-$((count - 1))$parallel" --job-name="cxr-$name" \
    --output="$CXR_LOGS/%x-%A_%a.out" --requeue --open-mode=append \
    "${member_opts[@]}" "$0") || die "sbatch of the member array failed"
array_id=${array_id%%;*}
eval_id=$(sbatch --parsable --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
    --job-name="cxr-$name-evaluate" --output="$CXR_LOGS/%x-%j.out" "${eval_opts[@]}" \
    "$CXR_REPO/slurm/evaluate.sbatch" "${eval_args[@]}") || die "sbatch of the evaluator failed"
eval_id=${eval_id%%;*}

cat <<EOF
ensemble $name: $count members ($CXR_PROFILE, $CXR_ACCELERATE_CONFIG)
  members   job array $array_id (tasks 0-$((count - 1))), run dirs $CXR_RUNS/<member>
  evaluator job $eval_id after all members succeed -> report $CXR_REPORT
  logs      $CXR_LOGS
  watch     squeue -j $array_id,$eval_id ; sacct -j $array_id,$eval_id -X
EOF
