#!/usr/bin/env bash
# `make demo`: the main job on the embedded default data.
#   synthetic phantoms + the real NIH sample → split → pack → verify
#   → 2-process training of two tiny ensemble members → ensemble evaluation → report
# Variables (set by the Makefile): BIN (venv bin), DEMO (output dir), CXR_NIH (real data dir).
set -euo pipefail
BIN=${BIN:-.venv/bin}
DEMO=${DEMO:-build/demo}
CXR_NIH=${CXR_NIH:-../shared/data/nih}
PY="$BIN/python"
N=${DEMO_N:-1200}
EPOCHS=${DEMO_EPOCHS:-5}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
start=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }

mkdir -p "$DEMO"
meta_opt=()
[ -f "$CXR_NIH/Data_Entry_2017_v2020.csv.gz" ] && meta_opt=(--metadata "$CXR_NIH/Data_Entry_2017_v2020.csv.gz")

step "synthesize $N phantom chest X-rays"
"$PY" -m shards synth --out "$DEMO/synth" --n "$N" --resolution 256 --seed 0 "${meta_opt[@]}"
step "patient-level stratified split (70/15/15: enough test images for CIs)"
"$PY" -m shards split --metadata "$DEMO/synth/Data_Entry_2017.csv" --scheme stratified --fractions 0.7,0.15,0.15 \
  --out "$DEMO/synth/splits.parquet"
step "pack phantom shards"
"$PY" -m shards pack --splits "$DEMO/synth/splits.parquet" --images "$DEMO/synth/images" \
  --out "$DEMO/shards" --shard-size-mb 8
"$PY" -m shards verify "$DEMO/shards"

if [ -d "$CXR_NIH/sample" ]; then
  step "pack the real NIH sample ($CXR_NIH/sample, official split)"
  "$PY" -m shards split --metadata "$CXR_NIH/Data_Entry_2017_v2020.csv.gz" --scheme official \
    --restrict-to "$CXR_NIH/sample" --out "$DEMO/sample/splits.parquet"
  "$PY" -m shards pack --splits "$DEMO/sample/splits.parquet" --images "$CXR_NIH/sample" \
    --out "$DEMO/shards-sample" --shard-size-mb 16
  "$PY" -m shards verify "$DEMO/shards-sample"
  "$PY" -m shards stats "$DEMO/sample/splits.parquet" --format markdown
else
  echo "(real NIH sample not found at $CXR_NIH/sample — skipped)"
fi

# Members differ in seed (init, data order and augmentation: data.seed follows train.seed)
# and in hyper-parameters, as the ensembles of launch/ensembles/ do.
declare -A member_opts=([1]="optim.lr=2.0e-3" [2]="optim.lr=1.0e-3 data.rotate_deg=8.0")
for seed in 1 2; do
  step "train ensemble member $seed (2 processes, gloo, tiny CNN at 128 px; ${member_opts[$seed]})"
  # shellcheck disable=SC2086  # the member's options are separate words
  "$BIN/accelerate" launch --config_file launch/configs/cpu-2proc.yaml cxr/train.py \
    --config cxr/configs/tiny.yaml data.shards="$DEMO/shards" train.seed=$seed ${member_opts[$seed]} \
    train.epochs=$EPOCHS checkpoint.run_dir="$DEMO/runs/member$seed"
done

step "evaluate the ensemble on the test split"
"$PY" -m cxr.evaluate --runs "$DEMO/runs/member1" "$DEMO/runs/member2" \
  --shards "$DEMO/shards" --split test --thresholds-from val --bootstrap 1000 --out "$DEMO/report"

echo
echo "demo done in $(( $(date +%s) - start )) s — report: $DEMO/report/report.md"
