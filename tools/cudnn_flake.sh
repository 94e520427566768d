#!/usr/bin/env bash
# On the GPU machine (dist/ carried over): the cuDNN EXECUTION_FAILED seen once in three runs of
# tests/vae_gpu.rs with two test threads (two Gpu instances in one process). Runs that binary with
# two threads RUNS times (default 4) as built, then with CUDA_MODULE_LOADING=EAGER, with cuDNN's
# error log on, and once under compute-sanitizer where the machine supports it; prints one FLAKE
# line per run and the cuDNN error lines of the failing ones (FLAKE_SANITIZER=0 skips the sanitizer).
set -uo pipefail
out=${OUT:-/tmp/celframe-gpu}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
runs=${RUNS:-4}
export CUDNN_LOGERR_DBG=1 CUDNN_LOGDEST_DBG=stderr
# FLAKE_BINARY: another build of tests/vae_gpu.rs to run instead (an older commit's, to compare).
binary=${FLAKE_BINARY:-dist/gpu/test_vae_gpu}
one() {
  local name=$1 log=$out/flake_$1.log
  shift
  "$@" "$binary" --include-ignored --test-threads=2 >"$log" 2>&1
  local rc=$?
  echo "FLAKE {\"run\": \"$name\", \"exit\": $rc}"
  [ "$rc" -eq 0 ] || grep -E "EXECUTION_FAILED|CUDNN_STATUS|failed|panicked|E! |ERROR" "$log" | head -20
}
for i in $(seq "$runs"); do one "lazy_$i" env; done
for i in $(seq "$runs"); do one "eager_$i" env CUDA_MODULE_LOADING=EAGER; done
if [ "${FLAKE_SANITIZER:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  one sanitizer compute-sanitizer --tool memcheck --target-processes all --print-limit 20
  tail -5 "$out/flake_sanitizer.log"
fi
