#!/usr/bin/env bash
# Builds (here, no GPU needed) the benchmark binaries of another commit into dist/gpu_base.tar.xz:
# a baseline to time beside the working tree's binaries on the same GPU machine in the same call
# (timings differ by up to 40% between machines, and a call may land on an H100 or an H200).
#   bash tools/build_gpu_baseline.sh REV       (e.g. HEAD for the last commit without your edits)
# REV is checked out in a git worktree under target/ and built with its own target directory
# (target/base; only celframe rebuilds after the first time); the archive holds its `celframe`
# and `bench_ops` (test binaries are left out: they read fixtures from their source tree). Carry
# dist/gpu_base.tar.xz beside dist/gpu.tar.xz; tools/gpu_env.sh unpacks it into dist/gpu_base,
# which tools/gpu_steps.sh's commands name as $base, e.g.
#   export CMD_ab='for b in $bin $base; do $b/celframe bench unet --weights $work/sdxl_unet --fp8 on --breakdown; done'
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
rev=$(git rev-parse --verify "$1^{commit}")
root=$PWD
src=$root/target/base-src
git worktree remove --force "$src" 2>/dev/null || rm -rf "$src"
git worktree prune
git worktree add --quiet --detach "$src" "$rev"
trap 'git -C "$root" worktree remove --force "$src"' EXIT
export CARGO_TARGET_DIR=$root/target/base
# The nvcc this tree's build installed (build.rs would install another into the worktree).
if [ -z "${CELFRAME_NVCC:-}" ] && [ -x .cuda-toolchain/nvidia/cu13/bin/nvcc ]; then
  export CELFRAME_NVCC=$root/.cuda-toolchain/nvidia/cu13/bin/nvcc
fi
source tools/cargo_exe.sh
bench=$(cd "$src" && cargo bench --bench ops --no-run --message-format=json 2>/dev/null | exe ops)
(cd "$src" && cargo build --release --quiet)
rm -rf dist/gpu_base && mkdir -p dist/gpu_base
cp "$bench" dist/gpu_base/bench_ops
cp "$CARGO_TARGET_DIR/release/celframe" dist/gpu_base/celframe
strip dist/gpu_base/*
echo "$rev" >dist/gpu_base/REV
tar -cf - -C dist gpu_base | xz -T1 --lzma2=preset=6,dict=384MiB >dist/gpu_base.tar.xz
ls -la dist/gpu_base dist/gpu_base.tar.xz
