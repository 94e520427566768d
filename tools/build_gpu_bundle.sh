#!/usr/bin/env bash
# Builds (here, no GPU needed) the release binaries the GPU machine runs, into dist/gpu/:
# the GPU test binaries (tests/*gpu*.rs), the benchmark binary and the CLI, stripped, and packs them
# into dist/gpu.tar.xz (each binary embeds every kernel's fatbin: ~290 MB unpacked, more than a
# device call carries; xz's default 8 MiB window sees each binary alone (27.6 MB packed), a 384 MiB
# window spans them all and stores the shared fatbins once (6.9 MB; ~4 GB of memory to pack)).
# Then, on the GPU machine, from the repo root: `bash tools/gpu_run.sh`
# (with dist/gpu.tar.xz or dist/gpu/ carried along; it unpacks the archive itself).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p dist/gpu
source tools/cargo_exe.sh
rm -f dist/gpu/test_*
for t in gpu_shapes gpu_ops gpu_random gpu_lora weights_gpu unet_gpu controlnet_gpu vae_gpu text_encoder_gpu gpus_gpu gemm_tuning_gpu split_gpu gpu_graph; do
  cp "$(cargo test --release --test $t --no-run --message-format=json 2>/dev/null | exe $t)" "dist/gpu/test_$t"
done
cp "$(cargo bench --bench ops --no-run --message-format=json 2>/dev/null | exe ops)" dist/gpu/bench_ops
cargo build --release --quiet && cp target/release/celframe dist/gpu/celframe
strip dist/gpu/*
tar -cf - -C dist gpu | xz -T1 --lzma2=preset=6,dict=384MiB > dist/gpu.tar.xz
ls -la dist/gpu dist/gpu.tar.xz
