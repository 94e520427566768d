#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/ carried over (tools/build_gpu_bundle.sh, and
# the diffusers wheels in dist/wheels/ where the machine lacks them): the full-size SDXL UNet with
# an AnimateDiff-SDXL motion adapter (random weights at the real shapes), 2 videos x 16 frames at
# 1024x576, checked and timed against diffusers' UNetMotionModel in one go:
#   1. tools/motion_gpu.py: weights, fp16 and fp32 reference files, diffusers timings;
#   2. `celframe verify motion_unet` (CUDA, f16) against each reference;
#   3. `celframe bench motion_unet` and `bench unet` at the same 32 images, each with its GPU time
#      by model part and kind of work (`--breakdown`).
# Logs go to $OUT (or /tmp/celframe-gpu); weights to $WORK (or /tmp/celframe-unet, shared with
# tools/unet_gpu.sh so the UNet is written once). MOTION_COMPILE=1 also times torch.compile.
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
work=${WORK:-/tmp/celframe-unet}
mkdir -p "$out" "$work"
log=$out/motion_gpu.log
: >"$log"
source "$(dirname "$0")/gpu_env.sh"
need_diffusers "$work"
status=0

echo "== diffusers: weights, references, timings" | tee -a "$log"
python3 tools/motion_gpu.py --work "$work" ${MOTION_COMPILE:+--compile} 2>&1 | grep -v "^\s*$" | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== celframe verify motion_unet (CUDA, f16) against each reference" | tee -a "$log"
for ref in "$work"/ref_motion_*.safetensors; do
  echo "-- $(basename "$ref")" | tee -a "$log"
  dist/gpu/celframe verify motion_unet --weights "$work/sdxl_unet" --motion "$work/motion_adapter" \
    --reference "$ref" --device cuda 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "VERIFY {\"reference\": \"$(basename "$ref")\", \"exit\": $rc}" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
done

echo "== celframe bench motion_unet and unet at the same 32 images" | tee -a "$log"
dist/gpu/celframe bench motion_unet --weights "$work/sdxl_unet" --motion "$work/motion_adapter" \
  --batch 2 --frames 16 --height 72 --width 128 --breakdown 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
dist/gpu/celframe bench unet --weights "$work/sdxl_unet" --batch 32 --height 72 --width 128 --breakdown 2>&1 |
  tee -a "$log"

python3 tools/report.py "$log" | tee "$out/motion_report.md"
exit $status
