#!/usr/bin/env bash
# On the GPU machine, from the repo root, with dist/ carried over (tools/build_gpu_bundle.sh, and
# the diffusers wheels in dist/wheels/ where the machine lacks them): the full-size end-to-end
# render benchmark (issue 16, workload W1), celframe against diffusers on the same weights.
#   1. tools/render_gpu.py prepare: the SDXL UNet, motion adapter, text encoders, VAE, OpenPose and
#      Depth ControlNets and the seed's LoRAs at their real shapes (random weights; each made only
#      where missing, in the folders tools/unet_gpu.sh, text_encoder_gpu.sh/lora_gpu.sh, vae_gpu.sh
#      and controlnet_gpu.sh use), depth hints and the render configs w1.json / keyframes.json;
#   2. `celframe render` of W1 twice (the second run with the files in the page cache), then the
#      seed's keyframe control (ControlNets on 5 keyframes only) twice, then both with a second clip
#      timed after a whole render in the same process (as the diffusers peer is timed after an
#      untimed render), both again without the mp4 (the peer's writing where it has no mp4
#      writer), then (full size only) the 20-clip batch with the GPU's utilisation sampled
#      (the THROUGHPUT line);
#   3. the diffusers peer of W1 (fp16 eager, one untimed warm-up render first);
#   then the RENDER table (tools/report.py).
# Logs go to $OUT (or /tmp/celframe-gpu); weights to $WORK (or /tmp/celframe-unet), the text
# encoders to $TEXT_WORK (or /tmp/celframe-text), the VAE to $VAE_WORK (or $WORK, else
# /tmp/celframe-vae: where tools/vae_gpu.sh puts it); configs and outputs to $WORK/render.
# RENDER_TINY=1 runs the same steps on the CPU with the tiny fixture models (no GPU; CELFRAME_BIN
# names a locally built celframe, e.g. target/release/celframe).
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
work=${WORK:-/tmp/celframe-unet}
text_work=${TEXT_WORK:-/tmp/celframe-text}
vae_work=${VAE_WORK:-${WORK:-/tmp/celframe-vae}}
mkdir -p "$out" "$work"
log=$out/render_gpu.log
: >"$log"
source "$(dirname "$0")/gpu_env.sh"
need_diffusers "$work"
status=0

step() {
  echo "== $1" | tee -a "$log"
  shift
  python3 tools/render_gpu.py "$@" --work "$work" --text-work "$text_work" --vae-work "$vae_work" \
    --celframe "${CELFRAME_BIN:-dist/gpu/celframe}" ${RENDER_TINY:+--tiny} 2>&1 | grep -v "^\s*$" | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

step "weights, LoRAs, depth hints, render configs" prepare
step "celframe render W1, run 1" celframe --workload w1 --run 1
step "celframe render W1, run 2 (files cached)" celframe --workload w1 --run 2
step "celframe render, the seed's keyframe control, run 1" celframe --workload keyframes --run 1
step "celframe render, the seed's keyframe control, run 2 (files cached)" celframe --workload keyframes --run 2
step "celframe render W1, a second clip after a whole render in the same process" celframe --workload w1_warm
step "celframe render keyframes, a second clip after a whole render" celframe --workload keyframes_warm
step "celframe render W1 warm, PNG frames only (the peer's writing without an mp4 writer)" celframe --workload w1_warm_png
step "celframe render keyframes warm, PNG frames only" celframe --workload keyframes_warm_png
[ -n "${RENDER_TINY:-}" ] || step "celframe batch throughput, 20 clips of W1 in two LoRA sets" throughput
step "diffusers peer W1 (fp16 eager, warm-up render untimed)" diffusers

python3 tools/report.py "$log" | tee "$out/render_report.md"
exit $status
