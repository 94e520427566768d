#!/usr/bin/env bash
# On the GPU machine, from the repo root, after tools/build_gpu_bundle.sh ran on a build machine
# and dist/ was carried over (with dist/wheels/ holding the diffusers wheels where the machine lacks
# them): the whole GPU loop in one go, tables last. Logs go to $OUT (or /tmp/celframe-gpu).
#   tests:  every GPU test binary (CUDA ops vs CPU twins, every op at every model shape, models
#           vs fixtures);
#   models: the whole-model checks at full size against diffusers/transformers: UNet verify and
#           bench at 2x1024x1024 and 32x1024x576 (tools/unet_gpu.sh), the VAE decoder
#           (tools/vae_gpu.sh), both text encoders (tools/text_encoder_gpu.sh), the motion UNet at
#           2 videos x 16 frames x 1024x576 (tools/motion_gpu.sh), the SDXL ControlNet at
#           2x1024x1024 and 32x1024x576 (tools/controlnet_gpu.sh), the UNet with LoRAs merged on the
#           device, and the LoRA merge and switch times (tools/lora_gpu.sh), and the end-to-end
#           render W1 (16 frames at 1024x576, LCM 4 steps, CFG 1.5, OpenPose + Depth, 3 LoRAs +
#           LCM) by celframe and by diffusers (tools/render_gpu.sh);
#   bench:  the kernel benchmarks and the PyTorch peer.
# CELFRAME_STAGES picks stages (default "tests models bench"; a device call has 10 minutes, so the
# loop may be split over calls) and CELFRAME_MODELS the whole-model checks (default all).
# CELFRAME_TEST_FILTER=name runs only the GPU tests whose names contain it; CELFRAME_BENCH_FILTER=text
# only the benchmark and peer entries whose keys contain it (or one of its '|'-separated pieces).
set -uo pipefail
here=$(dirname "$0")
out=${OUT:-/tmp/celframe-gpu}
mkdir -p "$out"
log=$out/gpu_run.log
: >"$log"
source "$here/gpu_env.sh"
stages=${CELFRAME_STAGES:-tests models bench}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
declare -A status

if [[ " $stages " == *" tests "* ]]; then
  echo "== GPU tests (CUDA ops vs CPU twins, model shapes, models vs fixtures)" | tee -a "$log"
  status[tests]=0
  for t in dist/gpu/test_*; do
    # One test at a time: one Gpu per process, as the CLI holds it.
    "$t" ${CELFRAME_TEST_FILTER:-} --include-ignored --nocapture --test-threads=1 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status[tests]=1
  done
fi

if [[ " $stages " == *" models "* ]]; then
  for model in ${CELFRAME_MODELS:-unet motion controlnet lora vae text_encoder render}; do
    echo "== whole model: $model (tools/${model}_gpu.sh)" | tee -a "$log"
    bash "$here/${model}_gpu.sh"
    status[$model]=$?
    cat "$out/${model}_report.md" >>"$log" 2>/dev/null
  done
fi

if [[ " $stages " == *" bench "* ]]; then
  echo "== celframe benchmarks" | tee -a "$log"
  dist/gpu/bench_ops 2>&1 | tee -a "$log"
  status[bench]=${PIPESTATUS[0]}
  echo "== PyTorch peer" | tee -a "$log"
  python3 "$here/peer_torch.py" 2>&1 | tee -a "$log"
  python3 "$here/report.py" "$log" | tee "$out/report.md"
fi

failed=0
for k in "${!status[@]}"; do
  echo "STAGE $k exit ${status[$k]}"
  [ "${status[$k]}" -eq 0 ] || failed=1
done
exit $failed
