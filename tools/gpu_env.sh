# Sourced by the GPU-machine scripts (gpu_run.sh, ncu_bench.sh, unet_gpu.sh, vae_gpu.sh,
# text_encoder_gpu.sh): cuBLASLt and cuDNN come from the NVIDIA wheels next to PyTorch.
libs=$(python3 -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**/lib*.so*"), recursive=True)})))')
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"

# `need_diffusers DIR`: where the machine has no diffusers, installs the carried wheels in
# dist/wheels/ (diffusers, importlib_metadata) into DIR/py and puts it on PYTHONPATH.
need_diffusers() {
  if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install --quiet --no-deps --target "$1/py" dist/wheels/*.whl
    export PYTHONPATH="$1/py:${PYTHONPATH:-}"
  fi
}
# The carried archives of tools/build_gpu_bundle.sh and tools/build_gpu_baseline.sh, where newer
# than their unpacked folders (dist/gpu, dist/gpu_base).
for bundle in gpu gpu_base; do
  if [ -f dist/$bundle.tar.xz ] && { [ ! -d dist/$bundle ] || [ dist/$bundle.tar.xz -nt dist/$bundle ]; }; then
    rm -rf dist/$bundle && tar -xJf dist/$bundle.tar.xz -C dist && touch dist/$bundle
  fi
done
