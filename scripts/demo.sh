#!/usr/bin/env bash
# `make demo`: the product tour on the embedded data, one command, every output linked from
# $DEMO/index.html. Only the command-line interfaces are used (python -m shards …, accelerate launch
# cxr/train.py, python -m cxr.{train,evaluate,ablation,explain,ood,export}); scripts/demo_tour.py does
# the few steps no command does (pick keys, make non-X-rays, score them with the exported gate, drive
# the page in Chromium, write the index).
#
#   phantoms    synthesize phantoms (with their lesion boxes) → patient split → pack → verify
#   nih         the 130 real NIH images of $CXR_NIH/sample → patient split → pack (+ 64 px copies)
#   ensemble    two members (2 processes each; different seed, lr, augmentation) → ensemble report
#   external    a second phantom site (its own name for Effusion, no Hernia) → external-validation table
#   sample      the same ensemble evaluated on the real NIH sample (calibration, subgroups, operating points)
#   resolution  fine-detail phantoms at 3 resolutions → cxr.tools.ablation report (table, plot, paired tests)
#   explain     Grad-CAM overlays of the test phantoms with lesions + the pointing game on them
#   gate        OOD autoencoder on the real X-rays → threshold on val
#   export      ONNX package of the ensemble + gate, and the browser page
#   ood         the exported gate's verdicts on held-out real X-rays vs non-X-rays
#   predict     cxr-predict (the exported package) on DICOMs made from held-out real X-rays + a report
#   web         the page in headless Chromium on a few real X-rays (screenshots)
#
# A stage that cannot run (no NIH sample, no node/Chromium/onnxruntime-web) says why, is marked
# skipped on the index page, and the rest goes on; a failed stage is marked failed, the rest goes on,
# and the script exits 1 at the end. Per-stage times are printed and kept in $DEMO/stages.tsv.
#
# Variables: BIN (venv bin), DEMO (output dir), CXR_NIH (real data dir), the sizes below
# (tests/test_demo.py runs a smaller tour with them) and DEMO_STAGES (a subset of the stages).
set -euo pipefail
BIN=${BIN:-.venv/bin}
DEMO=${DEMO:-build/demo}
CXR_NIH=${CXR_NIH:-../shared/data/nih}
PY="$BIN/python"
N=${DEMO_N:-600}                         # phantoms of the ensemble / explain stages (256 px masters)
EPOCHS=${DEMO_EPOCHS:-4}                 # epochs per ensemble member
SWEEP_N=${DEMO_SWEEP_N:-700}             # fine-detail phantoms of the resolution study (128 px)
SWEEP_RES=${DEMO_SWEEP_RES:-"32 64 128"} # its resolutions
SWEEP_EPOCHS=${DEMO_SWEEP_EPOCHS:-6}
GATE_EPOCHS=${DEMO_GATE_EPOCHS:-20}      # OOD autoencoder epochs (64 px, 78 real images; a narrow code)
BOOTSTRAP=${DEMO_BOOTSTRAP:-1000}        # bootstrap resamples of every CI
SITE_N=${DEMO_SITE_N:-120}               # phantoms of the second site (external validation)
OUTLIERS=${DEMO_OUTLIERS:-20}            # images per category of the OOD verdicts
WEB_IMAGES=${DEMO_WEB_IMAGES:-2}         # real X-rays opened in the browser page (+ one texture)
ONLY=${DEMO_STAGES:-}                    # run only these stages (space-separated names); default all
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
start=$(date +%s)
mkdir -p "$DEMO"
# every run starts clean (training would resume finished runs, the index would link stale outputs);
# only the tour's own outputs are removed, whatever DEMO points at
for old in synth shards sample shards-sample runs report external resolution explain ood package site predict web index.html; do
  rm -rf "${DEMO:?}/$old"
done
STAGES="$DEMO/stages.tsv"
: >"$STAGES"

step() { printf '\n==> %s\n' "$*"; }
# skip REASON: end the current stage as skipped (run inside a stage's subshell)
skip() { printf '%s\n' "$*" >"$DEMO/.skip"; echo "SKIPPED: $*"; exit 99; }
# need STAGE: skip unless an earlier stage succeeded
need() { grep -q "^$1	ok	" "$STAGES" || skip "needs the '$1' stage, which did not succeed"; }
# cpu_s VAR: user+sys seconds of this shell's finished children so far into VAR (bash's `times`,
# 2nd line; `times` must run in this shell, not in a pipe or $(...), to see them)
cpu_s() {
  times >"$DEMO/.times"
  printf -v "$1" '%s' "$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/)
                                         t += a[1] * 60 + a[2] }; printf "%d", t }' "$DEMO/.times")"
}
# stage NAME FUNCTION: run FUNCTION under `set -e` in a subshell; record status, wall and CPU seconds
# (skipped unless DEMO_STAGES is empty or names it)
stage() {
  local name=$1 fn=$2 t0 c0 c1 rc dt status reason=""
  [ -z "$ONLY" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  t0=$(date +%s)
  cpu_s c0
  rm -f "$DEMO/.skip"
  printf '\n######## stage %s\n' "$name"
  set +e
  ( set -e; "$fn" )
  rc=$?
  set -e
  dt=$(( $(date +%s) - t0 ))
  cpu_s c1
  if (( rc == 0 )); then status=ok
  elif (( rc == 99 )) && [ -f "$DEMO/.skip" ]; then status=skipped; reason=$(head -1 "$DEMO/.skip")
  else status=failed; reason="exit status $rc (the demo's output above says why)"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" $(( c1 - c0 )) "$reason" >>"$STAGES"
  printf -- '-------- stage %s: %s in %d s (%d CPU s)%s\n' "$name" "$status" "$dt" $(( c1 - c0 )) "${reason:+ — $reason}"
}

meta_opt=()
[ -f "$CXR_NIH/Data_Entry_2017_v2020.csv.gz" ] && meta_opt=(--metadata "$CXR_NIH/Data_Entry_2017_v2020.csv.gz")

phantoms() {
  step "synthesize $N phantom chest X-rays (256 px, lesion boxes in boxes.csv)"
  "$PY" -m shards synth --out "$DEMO/synth" --n "$N" --resolution 256 --seed 0 "${meta_opt[@]}"
  step "patient-level stratified split (60/15/25: enough test images for CIs)"
  "$PY" -m shards split --metadata "$DEMO/synth/Data_Entry_2017.csv" --scheme stratified --fractions 0.6,0.15,0.25 \
    --out "$DEMO/synth/splits.parquet"
  step "pack phantom shards (+ 128 px derived shards for training)"
  "$PY" -m shards pack --splits "$DEMO/synth/splits.parquet" --images "$DEMO/synth/images" \
    --out "$DEMO/shards" --shard-size-mb 8 --resize 128
  "$PY" -m shards verify "$DEMO/shards"
}

nih() {
  [ -d "$CXR_NIH/sample" ] || skip "real NIH sample not found at $CXR_NIH/sample (set CXR_NIH)"
  step "split the real NIH sample by patient (random 60/20/20: the official test list holds only 17 of the 130)"
  "$PY" -m shards split --metadata "$CXR_NIH/Data_Entry_2017_v2020.csv.gz" --scheme random \
    --fractions 0.6,0.2,0.2 --seed 0 --restrict-to "$CXR_NIH/sample" --out "$DEMO/sample/splits.parquet"
  step "pack the 130 real 1024² images (+ 64 px derived shards for the OOD gate)"
  "$PY" -m shards pack --splits "$DEMO/sample/splits.parquet" --images "$CXR_NIH/sample" \
    --out "$DEMO/shards-sample" --shard-size-mb 16 --resize 64
  "$PY" -m shards verify "$DEMO/shards-sample"
}

# Members differ in seed (init, data order and augmentation: data.seed follows train.seed), learning
# rate and augmentation strength; the narrow phantom CNN (8 base channels) keeps 2 cores fast.
declare -A member_opts=([1]="optim.lr=3.0e-3 data.rotate_deg=0.0" [2]="optim.lr=1.5e-3 data.rotate_deg=8.0")
ensemble() {
  need phantoms
  for seed in 1 2; do
    step "train ensemble member $seed (2 processes, gloo, narrow CNN at 128 px; ${member_opts[$seed]})"
    # shellcheck disable=SC2086  # the member's options are separate words
    "$BIN/accelerate" launch --config_file launch/configs/cpu-2proc.yaml cxr/train.py \
      --config cxr/configs/phantom_sweep.yaml data.shards="$DEMO/shards" data.resolution=128 data.augment=true \
      data.batch_size=8 train.threads=1 train.seed=$seed ${member_opts[$seed]} train.epochs="$EPOCHS" \
      checkpoint.run_dir="$DEMO/runs/member$seed"
  done
  step "evaluate the ensemble on the test split"
  "$PY" -m cxr.evaluate --runs "$DEMO/runs/member1" "$DEMO/runs/member2" \
    --shards "$DEMO/shards" --split test --thresholds-from val --bootstrap "$BOOTSTRAP" --num-threads 0 --out "$DEMO/report"
}

external() {
  need ensemble
  local root="$DEMO/external"
  step "a second phantom site: $SITE_N other phantoms whose labels call Effusion 'Pleural Effusion' and lack Hernia"
  "$PY" -m shards synth --out "$root/synth" --n "$SITE_N" --resolution 128 --seed 11 --workers 2
  "$PY" scripts/demo_tour.py site --entry "$root/synth/Data_Entry_2017.csv" --out "$root"
  "$PY" -m shards split --metadata "$root/labels.csv" --scheme random --fractions 0.1,0.1,0.8 --seed 0 \
    --out "$root/splits.csv"
  "$PY" -m shards pack --splits "$root/splits.csv" --images "$root/synth/images" --out "$root/shards" --workers 2
  step "external validation: the ensemble on the site's test split, beside its internal test AUROCs"
  "$PY" -m cxr.evaluate --runs "$DEMO/runs/member1" "$DEMO/runs/member2" --shards "$root/shards" --split test \
    --thresholds-from none --bootstrap "$BOOTSTRAP" --num-threads 0 --no-figures --compare-to "$DEMO/report" \
    --out "$root/report"
}

sample() {
  need ensemble
  need nih
  step "evaluate the phantom-trained ensemble on the real NIH sample's test split (thresholds and calibration fitted on its val split; real sex, age and view subgroups)"
  "$PY" -m cxr.evaluate --runs "$DEMO/runs/member1" "$DEMO/runs/member2" \
    --shards "$DEMO/shards-sample" --split test --thresholds-from val --bootstrap "$BOOTSTRAP" --num-threads 0 \
    --out "$DEMO/sample/report"
}

resolution() {
  local root="$DEMO/resolution"
  step "synthesize $SWEEP_N phantoms whose Nodule is tiny dots (~2 px at 128 px): only high resolution sees them"
  "$PY" -m shards synth --out "$root/synth" --n "$SWEEP_N" --resolution 128 --seed 5 --fine-detail Nodule
  "$PY" -m shards split --metadata "$root/synth/Data_Entry_2017.csv" --scheme random \
    --fractions 0.55,0.1,0.35 --seed 1 --out "$root/splits.parquet"
  "$PY" -m shards pack --splits "$root/splits.parquet" --images "$root/synth/images" --out "$root/shards" \
    --shard-size-mb 16
  step "train at each of ${SWEEP_RES// /, } px (same model, batch and schedule), then the comparison report"
  # --cluster debug: every run and the report in this one process (python -m launch.submit ablate);
  # the report: paired DeLong + bootstrap on the same test images, Holm over the labels
  # shellcheck disable=SC2086  # the resolutions are separate words
  "$PY" -m launch.submit ablate train.epochs="$SWEEP_EPOCHS" data.num_threads=0 --cluster debug \
    --config cxr/configs/phantom_sweep.yaml --shards "$root/shards" --runs "$root/runs" --report "$root/report" \
    --no-probe --bootstrap "$BOOTSTRAP" --resolutions $SWEEP_RES
}

explain() {
  need ensemble
  step "Grad-CAM of member 1 on every test phantom with a planted lesion: overlays + the pointing game"
  "$PY" -m cxr.tools.explain --run "$DEMO/runs/member1" --shards "$DEMO/shards" --split test --num-threads 0 \
    --bbox "$DEMO/synth/boxes.csv" --method gradcam --overlays --bootstrap "$BOOTSTRAP" --out "$DEMO/explain"
}

gate() {
  need nih
  step "train the OOD gate (autoencoder, 64 px, 4-channel code) on the 78 real NIH train images"
  "$PY" -m cxr.train --config cxr/configs/ood_ae.yaml data.shards="$DEMO/shards-sample" \
    model.width=8 model.code=4 train.epochs="$GATE_EPOCHS" data.num_threads=0 logging.progress=false \
    checkpoint.run_dir="$DEMO/runs/ood"
  "$PY" -m cxr.tools.ood threshold --run "$DEMO/runs/ood" --shards "$DEMO/shards-sample" --percentile 95
}

export_stage() {
  need ensemble
  need gate
  local web=()
  if [ -f build/npm/node_modules/onnxruntime-web/package.json ] && [ -f build/npm/node_modules/dicom-parser/package.json ]; then
    web=(--web "$DEMO/site")
  else echo "(onnxruntime-web or dicom-parser not in build/npm: the package only, no page — run \`make web-deps\`)"; fi
  step "export the ensemble + gate as one ONNX package${web:+ and the browser page} (calibrated probabilities: the maps fitted on val)"
  "$PY" -m cxr.tools.export --run "$DEMO/runs/member1" --run "$DEMO/runs/member2" --ood "$DEMO/runs/ood" \
    --thresholds "$DEMO/report/thresholds.json" --calibration "$DEMO/report/calibration.json" \
    --out "$DEMO/package" "${web[@]}"
}

ood() {
  need export
  step "the exported gate on $OUTLIERS held-out real X-rays and as many non-X-rays of each of 13 kinds (textures … colour blobs)"
  "$PY" scripts/demo_tour.py outliers --splits "$DEMO/sample/splits.parquet" --images "$CXR_NIH/sample" \
    --out "$DEMO/ood/images" --n "$OUTLIERS"
  "$PY" scripts/demo_tour.py verdicts --package "$DEMO/package" --images "$DEMO/ood/images" --out "$DEMO/ood"
}

predict() {
  need ood
  local images=()
  mapfile -t images < <(ls "$DEMO"/ood/images/real_*.png | head -n 6)
  step "cxr-predict with the exported package on ${#images[@]} real X-rays sent as DICOM (12-bit, MONOCHROME1/2, JPEG-lossless) and a structured report"
  "$PY" scripts/demo_tour.py dicoms --images "${images[@]}" --out "$DEMO/predict/studies"
  "$PY" -m cxr.tools.predict --model "$DEMO/package" "$DEMO/predict/studies" --out "$DEMO/predict" --no-progress
}

web() {
  need ood
  [ -f "$DEMO/site/index.html" ] || skip "no browser page was exported (onnxruntime-web missing: run \`make web-deps\`)"
  command -v node >/dev/null || skip "node not found (install Node.js, then \`make web-deps\`)"
  command -v chromium >/dev/null || skip "chromium not found (\`make web-deps\` installs it as root)"
  [ -f build/npm/node_modules/playwright-core/package.json ] || skip "playwright-core not in build/npm (\`make web-deps\`)"
  local images=()
  mapfile -t images < <(ls "$DEMO"/ood/images/real_*.png | head -n "$WEB_IMAGES")
  images+=("$DEMO/ood/images/texture_000.png")
  step "open ${#images[@]} images through the page in headless Chromium (real X-rays, and a texture it must reject)"
  "$PY" scripts/demo_tour.py web --site "$DEMO/site" --images "${images[@]}" --out "$DEMO/web" --demo-note
}

stage phantoms phantoms
stage nih nih
stage ensemble ensemble
stage external external
stage sample sample
stage resolution resolution
stage explain explain
stage gate gate
stage export export_stage
stage ood ood
stage predict predict
stage web web

total=$(( $(date +%s) - start ))
"$PY" scripts/demo_tour.py index --demo "$DEMO" --total-s "$total"
echo
echo "per-stage times (stage, status, wall s, CPU s of user+sys, reason):"
column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
failed=$(grep -c "	failed	" "$STAGES" || true)
skipped=$(grep -c "	skipped	" "$STAGES" || true)
cpu_s cpu_total
echo "demo done in $total s, $cpu_total CPU s ($failed failed, $skipped skipped) — open $DEMO/index.html"
(( failed == 0 ))
