#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/ carried over (tools/build_gpu_bundle.sh, plus
# the diffusers and importlib_metadata wheels in dist/wheels/ when the machine lacks them): the
# full-size SDXL UNet with random weights, checked and timed against diffusers in one go.
#   1. tools/unet_gpu.py: weights, fp16 and fp32 reference files, diffusers timings;
#   2. `celframe verify unet` of our CUDA forward against each reference file;
#   3. `celframe bench unet` at the same shapes as the diffusers timings, with the GPU time by
#      model part and kind of work (`--breakdown`);
# then the table (tools/report.py). Logs go to $OUT (or /tmp/celframe-gpu); the weights to $WORK
# (or /tmp/celframe-unet). UNET_COMPILE=1 also times torch.compile; UNET_NSYS=1 also profiles one
# batch-32 forward with Nsight Systems and prints the kernels that take the time.
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
work=${WORK:-/tmp/celframe-unet}
mkdir -p "$out" "$work"
log=$out/unet_gpu.log
: >"$log"
source "$(dirname "$0")/gpu_env.sh"
need_diffusers "$work"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
status=0

echo "== diffusers: weights, references, timings" | tee -a "$log"
python3 tools/unet_gpu.py --work "$work" ${UNET_COMPILE:+--compile} 2>&1 | grep -v "^\s*$" | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== celframe verify unet (CUDA, f16) against each reference" | tee -a "$log"
for ref in "$work"/ref_[0-9]*.safetensors; do  # ref_<h>x<w>_<dtype> (motion_gpu.sh writes ref_motion_* here too)
  echo "-- $(basename "$ref")" | tee -a "$log"
  dist/gpu/celframe verify unet --weights "$work/sdxl_unet" --reference "$ref" --device cuda 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "VERIFY {\"reference\": \"$(basename "$ref")\", \"exit\": $rc}" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
done

echo "== determinism: two processes, bit-identical outputs (cuDNN choices shared through the cache)" | tee -a "$log"
ref=$work/ref_128x128_f16.safetensors
export CELFRAME_CACHE_DIR=$work/cache
rm -rf "$CELFRAME_CACHE_DIR"
for i in 1 2; do
  dist/gpu/celframe verify unet --weights "$work/sdxl_unet" --reference "$ref" --device cuda --save "$work/det_$i.safetensors" >/dev/null 2>&1
done
if cmp -s "$work/det_1.safetensors" "$work/det_2.safetensors"; then same=true; else same=false; status=1; fi
# A third process with an empty cache searches again: does the deterministic preference alone agree?
CELFRAME_CACHE_DIR=$work/cache_fresh dist/gpu/celframe verify unet --weights "$work/sdxl_unet" --reference "$ref" --device cuda --save "$work/det_3.safetensors" >/dev/null 2>&1
if cmp -s "$work/det_1.safetensors" "$work/det_3.safetensors"; then fresh=true; else fresh=false; fi
echo "DETERMINISM {\"unet 2x1024x1024 two processes, shared cache\": $same, \"fresh search\": $fresh, \"cached shapes\": $(cat "$CELFRAME_CACHE_DIR"/*.tsv 2>/dev/null | wc -l)}" | tee -a "$log"

echo "== celframe bench unet" | tee -a "$log"
for shape in "2 128 128" "32 72 128"; do
  set -- $shape
  dist/gpu/celframe bench unet --weights "$work/sdxl_unet" --batch "$1" --height "$2" --width "$3" --breakdown 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

if [ -n "${UNET_NSYS:-}" ] && command -v nsys >/dev/null; then
  echo "== nsys: one batch-32 forward, kernels by total time" | tee -a "$log"
  nsys profile --force-overwrite true -t cuda,nvtx -o "$out/unet_b32" \
    dist/gpu/celframe bench unet --weights "$work/sdxl_unet" --batch 32 --height 72 --width 128 --runs 1 >/dev/null 2>&1
  nsys stats --force-export true --report cuda_gpu_kern_sum --format csv "$out/unet_b32.nsys-rep" 2>/dev/null |
    python3 -c 'import csv, sys
rows = [r for r in csv.reader(sys.stdin) if len(r) > 8 and r[0][:1].isdigit()]
for r in rows[:25]:
    print(f"{float(r[0]):5.1f}%  {float(r[1]) / 1e6:9.2f} ms  {int(r[2]):6d}x  {r[8][:110]}")' | tee -a "$log"
fi

python3 tools/report.py "$log" | tee "$out/unet_report.md"
exit $status
