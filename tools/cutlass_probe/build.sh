#!/usr/bin/env bash
# Measurement probe, not part of the crate (benches/RESULTS.md, thirteenth session): compiles the
# CUTLASS 4.2 probes on the build machine into dist/cutlass_probe/*.o (sm_90a, about 1-2 minutes
# each on 2 cores), with the pinned toolchain's nvcc and the headers of the PyPI wheel
# nvidia-cutlass (downloaded into .ci-cache/). Then carry dist/cutlass_probe to the GPU machine
# and run tools/cutlass_probe/run.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvcc=${CELFRAME_NVCC:-.cuda-toolchain/nvidia/cu13/bin/nvcc}
[ -x "$nvcc" ] || { echo "build.sh: no nvcc at $nvcc (cargo build installs the pinned one)" >&2; exit 2; }
headers=.ci-cache/cutlass-4.2.0.0
if [ ! -d "$headers/cutlass_library/source/include" ]; then
  mkdir -p "$headers"
  python3 -m pip download --quiet --no-deps --dest "$headers" nvidia-cutlass==4.2.0.0
  python3 -m zipfile -e "$headers"/nvidia_cutlass-4.2.0.0-*.whl "$headers"
fi
src=$headers/cutlass_library/source
mkdir -p dist/cutlass_probe
# -DNDEBUG: with CUTLASS's device asserts in, nvcc 13 serialises the wgmma pipeline (ptxas C7510).
for f in gemm_variants geglu_epilogue fp8_rows; do
  "$nvcc" -arch=sm_90a -std=c++17 --expt-relaxed-constexpr -O3 -ftz=true -DNDEBUG -c -Xcompiler -fPIC \
    -I"$src/include" -I"$src/tools/util/include" -Ikernels/include \
    "tools/cutlass_probe/$f.cu" -o "dist/cutlass_probe/$f.o" &
done
wait
ls -l dist/cutlass_probe
