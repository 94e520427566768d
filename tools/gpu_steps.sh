#!/usr/bin/env bash
# The GPU loop in named steps under one time budget, for device calls too short for the whole of
# tools/gpu_run.sh: each step runs with its own time limit (cut to what is left of the budget;
# skipped under 10 s), its output goes to $OUT/<step>.log (the last $TAIL lines, default 25, are
# echoed), and a table of exit codes and seconds comes last. On the GPU machine, from the repo root,
# with dist/gpu.tar.xz (tools/build_gpu_bundle.sh) and dist/wheels/ carried over:
#   bash tools/gpu_steps.sh BUDGET_S STEP[:LIMIT_S] ...      (a step without a limit gets 300 s)
# Steps:
#   ops shapes graph lora_tests split gpus tuning   the GPU test binaries (test_gpu_ops, ...;
#                        CELFRAME_TEST_FILTER narrows them: libtest filters, space-separated)
#   fixtures             the models against their fixtures (test_{unet,vae,text_encoder,controlnet}_gpu)
#   weights              the full-size UNet and motion adapter only (random weights, no references
#                        or peer timings), for steps that read them without the unet/motion steps
#   unet motion vae text_encoder controlnet lora render   tools/<step>_gpu.sh (whole models at full
#                        size against diffusers; motion, controlnet, render reuse unet's weights)
#   bench                the kernel benchmarks and the PyTorch peer (CELFRAME_BENCH_FILTER narrows)
#   attention            bench narrowed to attention's default route beside SDPA, and the copy ceiling
#   w1                   W1 against diffusers only (tools/render_gpu.py prepare, celframe's warm clip
#                        with PNG frames, the diffusers peer), without the render step's other runs
#   graphs               `celframe bench ... --graph` for the UNet (both shapes), the motion UNet and
#                        the ControlNet (after the unet, motion and controlnet steps made weights)
#   fp8                  `celframe bench ... --fp8` (FP8 linears: speed and the outputs' distance)
#                        for the same models (FP8_BREAKDOWN=1: with `--breakdown`), then
#                        tools/render_gpu.py fp8: W1's frames with fp8 off, on and all over three
#                        seeds (after the render step's prepare)
#   knob                 an environment knob's A/B on whole models: for each value in $KNOB_VALUES
#                        (space-separated; `unset` leaves $KNOB out) the UNet (b32, b2) and the motion
#                        UNet benched, alternating, two rounds (`KNOB ...` lines: text k/v cached
#                        medians), then their f16 verifies under each value (after the unet and motion
#                        steps); e.g. KNOB=CELFRAME_GEGLU_LINEAR KNOB_VALUES="composed unset"
#   ab                   the same three whole models benched with $bin and $base (a baseline commit's
#                        binaries: carry dist/gpu_base.tar.xz, tools/build_gpu_baseline.sh),
#                        alternating, two rounds (`AB ...` lines; after the unet and motion steps)
#   tune                 tools/gemm_tune_gpu.sh: cuBLASLt tuned for the UNet and motion UNet, heuristic #1
#                        vs the file alternating, the whole-model verifies under it (after the unet and
#                        motion steps; RECORDED=FILE checks a kept file made on this GPU model instead;
#                        SUSTAIN_MS, OTHER: see the script)
#   power                tools/power_gpu.py: watts, SM clock and energy of a b32 UNet forward, ours
#                        beside diffusers eager (`POWER` lines; writes the UNet weights when missing)
#   fp8probe             tools/fp8_cublaslt_probe.py: which FP8 matmul forms this cuBLASLt runs
#                        (through ctypes, beside torch._scaled_mm) and their speed
#   rowprobe             tools/rowscale_cublaslt_probe.py: whether cuBLASLt scales a 16-bit GEMM's
#                        rows by a device vector (a LayerNorm folded into the GEMM after it)
#   cutlass              tools/cutlass_probe/run.sh (dist/cutlass_probe/*.o carried, made by its
#                        build.sh): CUTLASS GEMM forms, GEGLU epilogue, FP8 with row scales
#   NAME                 any other name runs the shell command in $CMD_NAME ($bin: the binaries'
#                        folder; $base: a baseline commit's celframe and bench_ops where
#                        dist/gpu_base.tar.xz (tools/build_gpu_baseline.sh) was carried; $work)
# The weights stay in /tmp (tools/*_gpu.sh's folders), so later calls on a warm machine reuse them.
# LOGS_TAR=FILE (an absolute path, e.g. under the device call's $OUT): the steps' logs packed in one
# archive as well.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,51p' "$0" >&2
  exit 2
fi
budget=$1
shift
start=$SECONDS
source tools/gpu_env.sh
export OUT=${OUT:-/tmp/celframe-gpu}
mkdir -p "$OUT"
work=${WORK:-/tmp/celframe-unet}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
bin=dist/gpu
base=dist/gpu_base
[ -f $base/REV ] && echo "baseline binaries in \$base: commit $(cat $base/REV)"
tests() {
  local t
  for t in "$@"; do
    # One test at a time: one Gpu per process, as the CLI holds it.
    "$bin/test_$t" ${CELFRAME_TEST_FILTER:-} --include-ignored --nocapture --test-threads=1 || return 1
  done
}
graphs() {
  local c="$bin/celframe bench" w="--weights $work/sdxl_unet"
  $c unet $w --batch 2 --height 128 --width 128 --graph &&
    $c unet $w --batch 32 --height 72 --width 128 --graph &&
    $c motion_unet $w --motion "$work/motion_adapter" --batch 2 --frames 16 --height 72 --width 128 --graph &&
    $c controlnet --weights "$work/sdxl_controlnet" --batch 32 --height 72 --width 128 --graph
}
attention_vs_sdpa() {
  export CELFRAME_BENCH_FILTER="flash_attention f16|copy" # the step's own shell
  "$bin/bench_ops" && python3 tools/peer_torch.py
}
# tools/render_gpu.py's subcommand "$@" on this step's folders and binaries.
render_gpu() {
  python3 tools/render_gpu.py "$@" --work "$work" --text-work "${TEXT_WORK:-/tmp/celframe-text}" \
    --vae-work "${VAE_WORK:-${WORK:-/tmp/celframe-vae}}" --celframe "$bin/celframe"
}
w1_vs_diffusers() {
  source tools/gpu_env.sh
  need_diffusers "$work"
  render_gpu prepare && render_gpu celframe --workload w1_warm_png && render_gpu diffusers
}
fp8_runs() {
  local c="$bin/celframe bench" w="--weights $work/sdxl_unet" b=${FP8_BREAKDOWN:+--breakdown}
  $c unet $w --batch 2 --height 128 --width 128 --fp8 on &&
    $c unet $w --batch 32 --height 72 --width 128 --fp8 on $b &&
    $c unet $w --batch 32 --height 72 --width 128 --fp8 all &&
    $c motion_unet $w --motion "$work/motion_adapter" --batch 2 --frames 16 --height 72 --width 128 --fp8 on $b &&
    $c controlnet --weights "$work/sdxl_controlnet" --batch 32 --height 72 --width 128 --fp8 on &&
    render_gpu fp8
}
# Runs "$@" with $KNOB set to $1, or without it for `unset`.
with_knob() {
  local v=$1
  shift
  if [ "$v" = unset ]; then env -u "$KNOB" "$@"; else env "$KNOB=$v" "$@"; fi
}
# The whole models (the UNet at b32 and b2, the motion UNet) benched in two rounds, alternating the
# runners given as "LABEL|COMMAND" (COMMAND runs celframe: bench's arguments follow it): one
# "LABEL round R: ..." line a bench (its text k/v cached median).
alternate() {
  set -o pipefail # a failed bench fails its pipeline
  local w="--weights $work/sdxl_unet" m="--motion $work/motion_adapter" r runner s status=0
  local models=("unet $w --batch 32 --height 72 --width 128" "unet $w --batch 2 --height 128 --width 128"
    "motion_unet $w $m --batch 2 --frames 16 --height 72 --width 128")
  for r in 1 2; do
    for runner in "$@"; do
      for s in "${models[@]}"; do
        ${runner#*|} bench $s 2>&1 | grep "text k/v cached: median" | sed "s|^|${runner%%|*} round $r: |" || status=1
      done
    done
  done
  return $status
}
# The whole models with the working tree's binaries and the baseline's (`AB ...` lines).
ab_runs() {
  if [ ! -x "$base/celframe" ]; then
    echo "ab: no baseline binaries in $base (carry dist/gpu_base.tar.xz: tools/build_gpu_baseline.sh)" >&2
    return 2
  fi
  alternate "AB $bin|$bin/celframe" "AB $base|$base/celframe"
}
knob_runs() {
  if [ -z "${KNOB:-}" ] || [ -z "${KNOB_VALUES:-}" ]; then
    echo "knob: set KNOB (an environment variable) and KNOB_VALUES (its values, space-separated)" >&2
    return 2
  fi
  set -o pipefail # a failed verify fails its pipeline
  local c="$bin/celframe" w="--weights $work/sdxl_unet" m="--motion $work/motion_adapter" v ref status=0 runners=()
  for v in $KNOB_VALUES; do runners+=("KNOB $KNOB=$v|with_knob $v $c"); done
  alternate "${runners[@]}" || status=1
  for v in $KNOB_VALUES; do
    for ref in "$work/ref_128x128_f16.safetensors" "$work/ref_72x128_f16.safetensors"; do
      with_knob "$v" $c verify unet $w --reference "$ref" --device cuda 2>&1 | grep "^out.sample \[" |
        sed "s|^|KNOB $KNOB=$v: |" || status=1
    done
    with_knob "$v" $c verify motion_unet $w $m --reference "$work/ref_motion_f16.safetensors" --device cuda 2>&1 |
      grep "^out.sample \[" | sed "s|^|KNOB $KNOB=$v: |" || status=1
  done
  return $status
}
run_step() {
  local name=$1 limit=$2 cmd
  case $name in
    ops) cmd="tests gpu_ops" ;;
    shapes) cmd="tests gpu_shapes" ;;
    graph) cmd="tests gpu_graph" ;;
    lora_tests) cmd="tests gpu_lora" ;;
    split) cmd="tests split_gpu" ;;
    gpus) cmd="tests gpus_gpu weights_gpu gpu_random" ;;
    tuning) cmd="tests gemm_tuning_gpu" ;;
    fixtures) cmd="tests unet_gpu vae_gpu text_encoder_gpu controlnet_gpu" ;;
    weights) cmd="source tools/gpu_env.sh; need_diffusers $work; python3 tools/motion_gpu.py --work $work --weights-only" ;;
    unet | motion | vae | text_encoder | controlnet | lora | render) cmd="bash tools/${name}_gpu.sh" ;;
    bench) cmd="$bin/bench_ops; python3 tools/peer_torch.py" ;;
    attention) cmd="attention_vs_sdpa" ;;
    w1) cmd="w1_vs_diffusers" ;;
    graphs) cmd="graphs" ;;
    fp8) cmd="fp8_runs" ;;
    knob) cmd="knob_runs" ;;
    ab) cmd="ab_runs" ;;
    tune) cmd="bash tools/gemm_tune_gpu.sh" ;;
    power) cmd="source tools/gpu_env.sh; need_diffusers $work; python3 tools/power_gpu.py --work $work --bin $bin" ;;
    fp8probe) cmd="python3 tools/fp8_cublaslt_probe.py --log" ;;
    rowprobe) cmd="python3 tools/rowscale_cublaslt_probe.py --log" ;;
    cutlass) cmd="bash tools/cutlass_probe/run.sh" ;;
    *)
      local var="CMD_$name"
      if [ -z "${!var:-}" ]; then
        echo "gpu_steps.sh: step '$name' is not a known step and \$$var is not set" >&2
        return 2
      fi
      cmd=${!var}
      ;;
  esac
  local left=$((budget - (SECONDS - start)))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    rc[$name]=skipped
    secs[$name]=0
    return 0
  fi
  echo "===== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout -k 5 "$limit" bash -c "$(declare -f tests graphs attention_vs_sdpa render_gpu w1_vs_diffusers fp8_runs with_knob alternate knob_runs ab_runs); bin=$bin base=$base work=$work; $cmd" >"$OUT/$name.log" 2>&1
  rc[$name]=$?
  secs[$name]=$((SECONDS - t0))
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}
declare -A rc secs
order=()
for step in "$@"; do
  name=${step%%:*}
  limit=300
  [[ $step == *:* ]] && limit=${step##*:}
  order+=("$name")
  run_step "$name" "$limit" || rc[$name]=2
done
echo "===== steps (exit 124: cut at its limit)"
failed=0
for name in "${order[@]}"; do
  printf '%-14s exit %-8s %5s s\n' "$name" "${rc[$name]:-?}" "${secs[$name]:-0}"
  case ${rc[$name]:-?} in 0 | skipped) ;; *) failed=1 ;; esac
done
# LOGS_TAR=FILE: every step's log in one archive too (a device call returns only a few files).
if [ -n "${LOGS_TAR:-}" ]; then
  (cd "$OUT" && tar -cJf "$LOGS_TAR" $(for n in "${order[@]}"; do [ -f "$n.log" ] && echo "$n.log"; done))
fi
exit $failed
