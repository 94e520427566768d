#!/usr/bin/env bash
# Measurement probe, on the GPU machine from the repo root with dist/cutlass_probe/ carried
# (tools/cutlass_probe/build.sh): links the probe objects and times them beside torch.mm and
# PyTorch's composed GEGLU (tools/cutlass_probe/probe.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc)
# Each probe object that was built (build.sh builds all three); probe.py skips a missing one.
for f in gemm_variants geglu_epilogue fp8_rows; do
  [ -f "dist/cutlass_probe/$f.o" ] || { echo "run.sh: no dist/cutlass_probe/$f.o: its table is skipped"; continue; }
  "$nvcc" -shared "dist/cutlass_probe/$f.o" -o "dist/cutlass_probe/$f.so" -lcuda
done
python3 tools/cutlass_probe/probe.py dist/cutlass_probe
