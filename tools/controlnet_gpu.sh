#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/ carried over (tools/build_gpu_bundle.sh, plus
# the diffusers wheels in dist/wheels/ where the machine lacks them): a full-size SDXL ControlNet
# (diffusers/controlnet-canny-sdxl-1.0's config, random weights) checked and timed against
# diffusers' ControlNetModel in one go:
#   1. tools/controlnet_gpu.py: weights, fp16 and fp32 references at 2x1024x1024 and 32x1024x576,
#      diffusers eager timings at both;
#   2. `celframe verify controlnet` (CUDA, f16) against each reference;
#   3. `celframe bench controlnet` at the same shapes, with the GPU time by model part and kind of
#      work (`--breakdown`);
# then the table (tools/report.py). Logs go to $OUT (or /tmp/celframe-gpu); weights and references
# to $WORK (or /tmp/celframe-unet, the folder tools/unet_gpu.sh and motion_gpu.sh use; the
# ControlNet has its own sdxl_controlnet/ and ref_controlnet_* files there). About 2 minutes on an
# H200 the first time (writing 2.5 GB of weights and 3.5 GB of references), less after.
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
work=${WORK:-/tmp/celframe-unet}
mkdir -p "$out" "$work"
log=$out/controlnet_gpu.log
: >"$log"
source "$(dirname "$0")/gpu_env.sh"
need_diffusers "$work"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
status=0
started=$(date +%s)

echo "== diffusers: weights, references, timings" | tee -a "$log"
python3 tools/controlnet_gpu.py --work "$work" 2>&1 | grep -v "^\s*$" | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== celframe verify controlnet (CUDA, f16) against each reference" | tee -a "$log"
for ref in "$work"/ref_controlnet_*.safetensors; do
  echo "-- $(basename "$ref")" | tee -a "$log"
  dist/gpu/celframe verify controlnet --weights "$work/sdxl_controlnet" --reference "$ref" --device cuda 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "VERIFY {\"reference\": \"$(basename "$ref")\", \"exit\": $rc}" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
done

echo "== celframe bench controlnet" | tee -a "$log"
for shape in "2 128 128" "32 72 128"; do
  set -- $shape
  dist/gpu/celframe bench controlnet --weights "$work/sdxl_controlnet" --batch "$1" --height "$2" --width "$3" \
    --breakdown 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
echo "controlnet_gpu.sh: $(( $(date +%s) - started )) s" | tee -a "$log"

python3 tools/report.py "$log" | tee "$out/controlnet_report.md"
exit $status
