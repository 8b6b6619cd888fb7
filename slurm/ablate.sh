#!/usr/bin/env bash
# A resolution study (or any config sweep) on Slurm, then its comparison report:
#
#   CXR_SHARDS=/data/shards CXR_RUNS=/runs/res CXR_RESOLUTIONS="224 512 1024" sbatch slurm/ablate.sh
#   CXR_SHARDS=/data/shards CXR_RUNS=/runs/res bash slurm/ablate.sh        # same, no submit job
#
# Run from the repository root. This is a small submit stage: it calls
# `python -m launch.submit ablate --cluster slurm`, which submits one job per run
# (resolution × grid value × seed; all with the same effective batch and schedule, the
# micro-batch × accumulation chosen in each job by the memory probe on its own GPU) and
# the `python -m cxr.tools.ablation report` job with --dependency=afterok on all of them.
# Preemption and requeue work as for `launch.submit train` (USR2 → checkpoint → requeue).
#
# Environment (defaults in brackets; relative paths are taken from the cwd):
#   CXR_CONFIG             training config                 [cxr/configs/densenet121.yaml]
#   CXR_RESOLUTIONS        training resolutions, space separated         [224 512 1024]
#   CXR_SEEDS              seeds per resolution, space separated       [the config's]
#   CXR_GRID               more config keys to sweep, e.g. "loss.name=bce,focal"   [none]
#   CXR_EFFECTIVE_BATCH    micro-batch × accumulation of every run  [config's batch × accum]
#   CXR_NO_PROBE           1: keep the config's micro-batch, no memory probe         [0]
#   CXR_SHARDS             shards directory (python -m shards pack [--resize R])  [data/shards]
#   CXR_RUNS               run dirs go to CXR_RUNS/<res…_seed…>          [runs/ablate]
#   CXR_REPORT             the report's directory                  [$CXR_RUNS/report]
#   CXR_REFERENCE          variant the others are compared with          [the lowest]
#   CXR_PROFILE            job size from launch/profiles.py                [g5.24xlarge]
#   CXR_PROFILE_SET        profile changes, space separated (e.g. "partition=gpu time_min=600")
#   CXR_TRAIN_OVERRIDES    key=value for every run, space separated (e.g. "train.epochs=30")
#   CXR_SPLIT              split the report compares on                         [test]
#   CXR_PYTHON             python with cxr installed            [.venv/bin/python]
#SBATCH --job-name=cxr-ablate-submit
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=10
#SBATCH --output=cxr-ablate-submit-%j.out
set -euo pipefail

die() { echo "ablate.sh: error: $*" >&2; exit 2; }

if [[ -z ${CXR_REPO:-} ]]; then
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        CXR_REPO=$SLURM_SUBMIT_DIR
    else
        CXR_REPO=$(cd "$(dirname "$0")/.." && pwd)
    fi
fi
[[ -f $CXR_REPO/launch/submit.py ]] || die "$CXR_REPO is not the cxr repository — run from its root or set CXR_REPO"
CXR_PYTHON=${CXR_PYTHON:-$CXR_REPO/.venv/bin/python}
[[ -x $CXR_PYTHON ]] || CXR_PYTHON=$(command -v python3)
export PYTHONPATH=$CXR_REPO${PYTHONPATH:+:$PYTHONPATH}
command -v sbatch >/dev/null ||
    die "sbatch not found — on one machine start slurm/local-cluster.sh, or use python -m launch.submit ablate --cluster local"
cd "${SLURM_SUBMIT_DIR:-$PWD}"
abspath() { realpath -m -- "$1"; }

CXR_CONFIG=$(abspath "${CXR_CONFIG:-$CXR_REPO/cxr/configs/densenet121.yaml}")
[[ -f $CXR_CONFIG ]] || die "training config $CXR_CONFIG not found (CXR_CONFIG)"
CXR_SHARDS=$(abspath "${CXR_SHARDS:-data/shards}")
CXR_RUNS=$(abspath "${CXR_RUNS:-runs/ablate}")
CXR_REPORT=$(abspath "${CXR_REPORT:-$CXR_RUNS/report}")
[[ -d $CXR_SHARDS ]] || echo "ablate.sh: warning: $CXR_SHARDS does not exist yet (CXR_SHARDS)" >&2
# Under `sbatch` this submit job's output starts in the submit directory (an #SBATCH line cannot
# name $CXR_RUNS/submitit): move it there, beside the jobs' logs, and write the rest of it there.
own_out=${SLURM_SUBMIT_DIR:-.}/cxr-ablate-submit-${SLURM_JOB_ID:-}.out
if [[ -n ${SLURM_JOB_ID:-} && -f $own_out ]]; then
    mkdir -p "$CXR_RUNS/submitit" && mv -- "$own_out" "$CXR_RUNS/submitit/" && exec >>"$CXR_RUNS/submitit/${own_out##*/}" 2>&1
fi

read -r -a overrides <<<"${CXR_TRAIN_OVERRIDES:-}"
read -r -a resolutions <<<"${CXR_RESOLUTIONS:-224 512 1024}"
args=(ablate --cluster slurm --profile "${CXR_PROFILE:-g5.24xlarge}" --config "$CXR_CONFIG"
      --shards "$CXR_SHARDS" --runs "$CXR_RUNS" --report "$CXR_REPORT" --split "${CXR_SPLIT:-test}")
((${#overrides[@]})) && args=(ablate "${overrides[@]}" "${args[@]:1}")
for item in ${CXR_PROFILE_SET:-}; do args+=(--profile-set "$item"); done
[[ -n ${CXR_SEEDS:-} ]] && args+=(--seeds $CXR_SEEDS)
[[ -n ${CXR_EFFECTIVE_BATCH:-} ]] && args+=(--effective-batch "$CXR_EFFECTIVE_BATCH")
[[ -n ${CXR_REFERENCE:-} ]] && args+=(--reference "$CXR_REFERENCE")
[[ ${CXR_NO_PROBE:-0} == 1 ]] && args+=(--no-probe)
((${#resolutions[@]})) && args+=(--resolutions "${resolutions[@]}")
[[ -n ${CXR_GRID:-} ]] && args+=(--grid $CXR_GRID)

# Inside the submit job its own SLURM_* variables would leak into the jobs it submits.
for var in $(compgen -e | grep '^SLURM_' | grep -v '^SLURM_CONF$' || true); do unset "$var"; done
echo "[ablate] $CXR_PYTHON -m launch.submit ${args[*]}"
exec "$CXR_PYTHON" -m launch.submit "${args[@]}"
