#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/gpu/celframe carried over: SDXL's two text
# encoders at full size with seeded random weights, checked and timed against transformers.
#   1. tools/text_encoder_gpu.py: weights, fp16 and fp32 reference files, transformers timing;
#   2. `celframe verify text_encoder|text_encoder_2 --device cuda` against each reference;
#   3. `celframe bench text_encoders` on the same CFG pair of 77-token prompts;
# then the table (tools/report.py). Logs go to $OUT (or /tmp/celframe-gpu); weights to $WORK (or
# /tmp/celframe-text).
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
work=${WORK:-/tmp/celframe-text}
mkdir -p "$out" "$work"
log=$out/text_encoder_gpu.log
: >"$log"
source "$(dirname "$0")/gpu_env.sh"
status=0

echo "== transformers: weights, references, timing" | tee -a "$log"
python3 tools/text_encoder_gpu.py --work "$work" 2>&1 | grep -E "TEXTREF|PEER|Error|error" | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== celframe verify (CUDA, f16) against each reference" | tee -a "$log"
for enc in text_encoder text_encoder_2; do
  for dt in f16 f32; do
    echo "-- $enc vs transformers $dt" | tee -a "$log"
    dist/gpu/celframe verify "$enc" --weights "$work/$enc" --reference "$work/ref_${enc}_${dt}.safetensors" --device cuda 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
done

echo "== celframe bench text_encoders" | tee -a "$log"
dist/gpu/celframe bench text_encoders --weights "$work" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

python3 tools/report.py "$log" | tee "$out/text_encoder_report.md"
exit $status
