#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/ carried over (tools/build_gpu_bundle.sh, and
# the diffusers wheels in dist/wheels/ where the machine lacks diffusers): cuBLASLt's GEMM
# algorithms tuned for the SDXL UNet at 32 images 1024x576, 2 images 1024x1024 and 2 images
# 1024x576 and the motion UNet at 2x16 frames 1024x576, and what it buys.
#   1. tests/gemm_tuning_gpu.rs (tuned vs heuristic #1 outputs, readers give the tuner's bytes);
#   2. the full-size random UNet and motion adapter (tools/unet_gpu.py's and motion_gpu.py's
#      writers), unless $WORK holds them;
#   3. `bench unet` (the three sizes) and `bench motion_unet` with --tune-gemms
#      $WORK/gemm_tuning.json (each adds its new descriptions to the file);
#   4. the benches with heuristic #1 (CELFRAME_GEMM_TUNING=none: not even the built-in file) and
#      with CELFRAME_GEMM_TUNING=$WORK/gemm_tuning.json, alternating, then a table;
#   5. the whole-model checks a file passes before it is built in (src/gpu/tuned/): `verify unet`
#      at 2x1024x1024 and 2x1024x576 (the second twice: identical bytes) and `verify motion_unet`
#      with the file, against the references tools/unet_gpu.sh and motion_gpu.sh left in $WORK
#      (the unet and motion steps of tools/gpu_steps.sh; a missing one fails this script).
# RECORDED=FILE (a file kept in the repository, e.g. benches/gemm_tuning/nvidia_h200.json): where it
# was made on this GPU model, steps 4 and 5 check it instead of a newly tuned file.
# SUSTAIN_MS=N: each candidate runs N ms back to back before it is timed (the forward runs at the
# power cap; CELFRAME_GEMM_TUNE_SUSTAIN_MS). OTHER=FILE: step 4 runs FILE as a third arm (e.g. a
# file tuned from idle against one tuned with SUSTAIN_MS).
# Logs go to $OUT (or /tmp/celframe-gpu); weights and the tuning file to $WORK (or /tmp/celframe-unet).
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
work=${WORK:-/tmp/celframe-unet}
mkdir -p "$out" "$work"
log=$out/gemm_tune_gpu.log
: >"$log"
source "$(dirname "$0")/gpu_env.sh"
need_diffusers "$work"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
# Heuristic #1 unless a command names the file (the built-in file is what a new file may replace).
export CELFRAME_GEMM_TUNING=none
bin=dist/gpu/celframe
file=$work/gemm_tuning.json
status=0
run() {  # run LABEL COMMAND...: logs the output, each line prefixed with LABEL
  local label=$1
  shift
  "$@" 2>&1 | sed "s/^/[$label] /" | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

echo "== tests/gemm_tuning_gpu.rs" | tee -a "$log"
run test env -u CELFRAME_GEMM_TUNING dist/gpu/test_gemm_tuning_gpu --include-ignored --nocapture --test-threads=1

echo "== weights" | tee -a "$log"
run weights python3 -c 'import sys; sys.path.insert(0, "tools")
from motion_gpu import make_adapter, make_weights
make_weights(sys.argv[1] + "/sdxl_unet"); make_adapter(sys.argv[1] + "/motion_adapter")' "$work"

unet=(bench unet --weights "$work/sdxl_unet" --batch 32 --height 72 --width 128)
square=(bench unet --weights "$work/sdxl_unet" --batch 2 --height 128 --width 128)
wide=(bench unet --weights "$work/sdxl_unet" --batch 2 --height 72 --width 128)
motion=(bench motion_unet --weights "$work/sdxl_unet" --motion "$work/motion_adapter" --batch 2 --frames 16 --height 72 --width 128)

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
if [ -n "${RECORDED:-}" ] && python3 -c 'import json, sys
sys.exit(json.load(open(sys.argv[1]))["identity"]["device"] != sys.argv[2])' "$RECORDED" "$gpu"; then
  echo "== checking $RECORDED (made on this GPU model, $gpu)" | tee -a "$log"
  cp "$RECORDED" "$file"
else
  echo "== tuning into $file" | tee -a "$log"
  rm -f "$file"
  export CELFRAME_GEMM_TUNE_SUSTAIN_MS=${SUSTAIN_MS:-0}
  run tune "$bin" "${unet[@]}" --runs 3 --tune-gemms "$file"
  run tune "$bin" "${square[@]}" --runs 3 --tune-gemms "$file"
  run tune "$bin" "${wide[@]}" --runs 3 --tune-gemms "$file"
  run tune "$bin" "${motion[@]}" --runs 3 --tune-gemms "$file"
fi

echo "== with and without the file, alternating" | tee -a "$log"
for round in 1 2; do
  for model in unet square motion; do
    eval "args=(\"\${$model[@]}\")"
    run plain "$bin" "${args[@]}"
    CELFRAME_GEMM_TUNING=$file run tuned "$bin" "${args[@]}"
    [ -z "${OTHER:-}" ] || CELFRAME_GEMM_TUNING=$OTHER run other "$bin" "${args[@]}"
  done
done
python3 - "$log" <<'EOF' | tee -a "$log"
import json, re, statistics, sys
ms = {}
for line in open(sys.argv[1]):
    m = re.match(r"\[(plain|tuned|other)\] BENCH (\{.*\})", line)
    if m:
        b = json.loads(m.group(2))
        ms.setdefault(b["key"], {}).setdefault(m.group(1), []).append(b["ms"])
print("| bench | heuristic #1 (no file) ms | tuned ms | speed-up | OTHER ms | speed-up |")
print("|---|---|---|---|---|---|")
for key, v in ms.items():
    if "plain" in v and "tuned" in v:
        p, t = statistics.median(v["plain"]), statistics.median(v["tuned"])
        o = statistics.median(v["other"]) if "other" in v else None
        other = f"{o:.2f} | {p / o:.3f}x" if o else "- | -"
        print(f"| {key} | {p:.2f} | {t:.2f} | {p / t:.3f}x | {other} |")
EOF

echo "== whole models with the file" | tee -a "$log"
missing() {  # missing REF: says that REF was not made and fails the script
  echo "no $1 (the unet and motion steps make it): not verified" | tee -a "$log"
  status=1
}
ref=$work/ref_128x128_f16.safetensors
if [ -f "$ref" ]; then
  CELFRAME_GEMM_TUNING=$file run verify "$bin" verify unet --weights "$work/sdxl_unet" --reference "$ref" --device cuda
else missing "$ref"; fi
ref=$work/ref_72x128_f16.safetensors
if [ -f "$ref" ]; then
  for i in 1 2; do
    CELFRAME_GEMM_TUNING=$file run verify "$bin" verify unet --weights "$work/sdxl_unet" --reference "$ref" --device cuda \
      --save "$work/gemm_det_$i.safetensors"
  done
  if cmp -s "$work/gemm_det_1.safetensors" "$work/gemm_det_2.safetensors"; then same=true; else same=false; status=1; fi
  echo "DETERMINISM {\"unet 2x1024x576 with CELFRAME_GEMM_TUNING, two processes\": $same}" | tee -a "$log"
else missing "$ref"; fi
ref=$work/ref_motion_f16.safetensors
if [ -f "$ref" ]; then
  CELFRAME_GEMM_TUNING=$file run verify "$bin" verify motion_unet --weights "$work/sdxl_unet" \
    --motion "$work/motion_adapter" --reference "$ref" --device cuda
else missing "$ref"; fi
cp "$file" "$out/gemm_tuning.json" 2>/dev/null
echo "STAGE gemm_tune exit $status" | tee -a "$log"
exit $status
