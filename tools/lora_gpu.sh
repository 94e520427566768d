#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/ carried over (tools/build_gpu_bundle.sh, and
# the diffusers wheels in dist/wheels/ where the machine lacks them): LoRAs at full size.
#   1. tools/lora_gpu.py: the SDXL UNet (random weights, shared with tools/unet_gpu.sh), LoRA files
#      at the real shapes, references with a rank-64 kohya LoRA fused by diffusers (fp16, fp32);
#   2. `celframe verify unet --lora` (CUDA, f16: the LoRA merged on the device) against each;
#   3. `celframe bench lora`: the seed's set (3 style LoRAs of rank 32/64/128 + an LCM-LoRA-shaped
#      rank-64 file) merged into the UNet and both text encoders, and switched to a second set of
#      style LoRAs and back, restoring from device copies and from the files.
# Logs go to $OUT (or /tmp/celframe-gpu); weights and LoRAs to $WORK (or /tmp/celframe-unet).
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
work=${WORK:-/tmp/celframe-unet}
text_work=${TEXT_WORK:-/tmp/celframe-text}  # the text encoders' weights, shared with tools/text_encoder_gpu.sh
mkdir -p "$out" "$work"
log=$out/lora_gpu.log
: >"$log"
source "$(dirname "$0")/gpu_env.sh"
need_diffusers "$work"
status=0

echo "== diffusers: LoRA files, references with the LoRA fused" | tee -a "$log"
python3 tools/lora_gpu.py --work "$work" --text-work "$text_work" 2>&1 | grep -v "^\s*$" | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== celframe verify unet --lora (CUDA, f16, merged on the device) against each reference" | tee -a "$log"
for ref in "$work"/ref_lora_*.safetensors; do
  echo "-- $(basename "$ref")" | tee -a "$log"
  dist/gpu/celframe verify unet --weights "$work/sdxl_unet" --lora "$work/kohya_r64.safetensors:0.8" \
    --reference "$ref" --device cuda 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "VERIFY {\"reference\": \"$(basename "$ref")\", \"exit\": $rc}" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
done

echo "== celframe bench lora: merge the seed's set, switch between two sets" | tee -a "$log"
# Roles as the pipeline gives them: two style LoRAs, a character LoRA and the LCM-LoRA per set.
set_a=(--lora "style=$work/style_a1.safetensors:0.8" --lora "style=$work/style_a2.safetensors:0.25"
  --lora "character=$work/style_a3.safetensors:0.7" --lora "lcm=$work/lcm.safetensors:1")
set_b=(--switch-lora "style=$work/style_b1.safetensors:0.75" --switch-lora "style=$work/style_b2.safetensors:0.2"
  --switch-lora "character=$work/style_b3.safetensors:0.65" --switch-lora "lcm=$work/lcm.safetensors:1")
for restore in copy reload; do
  dist/gpu/celframe bench lora --weights "$work/sdxl_unet" --text-encoders "$text_work" "${set_a[@]}" "${set_b[@]}" \
    --lora-restore "$restore" --runs 10 --breakdown 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

python3 tools/report.py "$log" | tee "$out/lora_report.md"
exit $status
