#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/ carried over (tools/build_gpu_bundle.sh, plus
# the diffusers and importlib_metadata wheels in dist/wheels/ when the machine lacks them): the
# full-size SDXL VAE decoder with random weights, checked and timed against diffusers in one go.
#   1. tools/vae_gpu.py: weights, reference files (untiled, tiled, 16 frames), diffusers timing;
#   2. `celframe verify vae_decoder` (CUDA, f16) against each reference: error, decode time, peak.
# Logs go to $OUT (or /tmp/celframe-gpu); the weights to $WORK (or /tmp/celframe-vae).
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
work=${WORK:-/tmp/celframe-vae}
bin=${CELFRAME:-dist/gpu/celframe}
mkdir -p "$out" "$work"
log=$out/vae_gpu.log
: >"$log"
source "$(dirname "$0")/gpu_env.sh"
need_diffusers "$work"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
status=0

echo "== diffusers: weights, references, timing" | tee -a "$log"
python3 tools/vae_gpu.py --work "$work" 2>&1 | grep -v "^\s*$" | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== celframe verify vae_decoder (CUDA, f16) against each reference" | tee -a "$log"
for ref in "$work"/ref_*.safetensors; do
  echo "-- $(basename "$ref")" | tee -a "$log"
  "$bin" verify vae_decoder --weights "$work/sdxl_vae" --reference "$ref" --device cuda 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "VERIFY {\"reference\": \"$(basename "$ref")\", \"exit\": $rc}" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
done

echo "== celframe bench vae_decoder: 16 frames at 1024x576, GPU time of the decoder forwards" | tee -a "$log"
for chunk in 8 4 16; do
  "$bin" bench vae_decoder --weights "$work/sdxl_vae" --batch 16 --height 72 --width 128 --chunk "$chunk" --runs 5 --scratch-gb 40 2>&1 | tee -a "$log"
done
python3 tools/report.py "$log" | tee "$out/vae_report.md"
exit $status
