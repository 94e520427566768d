#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/ carried over (tools/build_gpu_bundle.sh, plus
# the diffusers wheels in dist/wheels/ where the machine lacks them): a full-size SDXL ControlNet
# (diffusers/controlnet-canny-sdxl-1.0's config, random weights) checked and timed against
# diffusers' ControlNetModel in one go:
#   1. tools/controlnet_gpu.py: weights, fp16 and fp32 references at 2x1024x1024 and 32x1024x576,
#      diffusers eager timings at both;
#   2. `celframe verify controlnet` (CUDA, f16) against each reference;
#   3. `celframe bench controlnet` at the same shapes, with the GPU time by model part and kind of
#      work (`--breakdown`), and two nets summed (`--nets 2`) at 32x1024x576;
#   4. the ControlNet Union (controlnet-union-sdxl-1.0's config, random weights): diffusers fp16 and
#      fp32 references for one sample at 1024x1024 with OpenPose + Depth, `celframe verify
#      controlnet` against both, diffusers' and celframe's Union with both conditions timed at
#      32x1024x576 (compare with the two separate nets of step 3: "Union vs separate nets");
# then the table (tools/report.py). Logs go to $OUT (or /tmp/celframe-gpu); weights and references
# to $WORK (or /tmp/celframe-unet, the folder tools/unet_gpu.sh and motion_gpu.sh use; the
# ControlNet has its own sdxl_controlnet/ and ref_controlnet_* files there). About 2 minutes on an
# H200 the first time (writing 2.5 GB of weights and 3.5 GB of references), less after; the Union
# steps add about a minute (another 2.5 GB of weights).
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
for ref in "$work"/ref_controlnet_[0-9]*.safetensors; do
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
dist/gpu/celframe bench controlnet --weights "$work/sdxl_controlnet" --batch 32 --height 72 --width 128 --nets 2 \
  2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== diffusers: Union weights, references, timing" | tee -a "$log"
python3 tools/controlnet_gpu.py --work "$work" --union 2>&1 | grep -v "^\s*$" | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== celframe verify controlnet: the Union (CUDA, f16) against each reference" | tee -a "$log"
for ref in "$work"/ref_controlnet_union_*.safetensors; do
  echo "-- $(basename "$ref")" | tee -a "$log"
  dist/gpu/celframe verify controlnet --weights "$work/sdxl_controlnet_union" --reference "$ref" --device cuda 2>&1 \
    | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "VERIFY {\"reference\": \"$(basename "$ref")\", \"exit\": $rc}" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
done

echo "== celframe bench controlnet: the Union, OpenPose + Depth in one forward" | tee -a "$log"
dist/gpu/celframe bench controlnet --weights "$work/sdxl_controlnet_union" --batch 32 --height 72 --width 128 \
  --conditions 2 --breakdown 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "controlnet_gpu.sh: $(( $(date +%s) - started )) s" | tee -a "$log"

python3 tools/report.py "$log" | tee "$out/controlnet_report.md"
exit $status
