//! The VAE decoder on the CUDA ops against the same diffusers fixtures as tests/vae_cpu.rs (float32
//! diffusers references, untiled and tiled), in f16 and bf16, plus the CUDA result against the CPU
//! twins run in the same dtype and the scratch arena's peak (printed, for the run's table).
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; tools/gpu_run.sh runs them on
//! the GPU machine with `--include-ignored`. Run without a GPU they fail, never pass silently.
//!
//! Tolerances (relative L2 against the float32 reference) are `verify`'s defaults: f16 1e-2, bf16
//! 3e-2. Every op rounds its output to the working dtype and the errors compound through the
//! decoder; the CPU twins in those dtypes measure 9.9e-4 (f16) and 9.3e-3 (bf16) on these fixtures,
//! and the kernels differ from the twins only by accumulation order and the attention's rounded
//! probabilities.

#[path = "common/unet_fixtures.rs"]
mod fixtures;

use celframe::DType;
use celframe::gpu::Gpu;
use celframe::verify::vae::verify_vae_decoder;
use celframe::verify::{Settings, compare, default_tolerance};
use fixtures::fixtures;

/// Scratch arena per decode: the fixtures need a few MB; tests may run three at a time.
const SCRATCH_GB: f64 = 1.0;

fn check(what: &str, weights: &str, reference: &str, dtype: DType) {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let (weights, reference) = (fixtures().join(weights), fixtures().join(reference));
    let tol = default_tolerance(dtype);
    let gpu = verify_vae_decoder(&weights, &reference, &Settings::cuda(dtype, tol, SCRATCH_GB)).unwrap();
    let twin = verify_vae_decoder(&weights, &reference, &Settings::cpu(dtype, tol)).unwrap();
    let (c, t) = (&gpu.comparisons[0], &twin.comparisons[0]);
    let vs_twin = compare("out.sample", &gpu.outputs[0].1, &twin.outputs[0].1, tol).unwrap();
    println!(
        "GPUCHECK vae_decoder {what} {dtype:?} rel_l2={:.2e} max_abs={:.2e} tol={tol:.0e} (cpu twins {dtype:?}: {:.2e}; cuda vs twins {:.2e})",
        c.rel_l2, c.max_abs, t.rel_l2, vs_twin.rel_l2
    );
    assert!(c.ok(), "{what} {dtype:?}: {c:?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn vae_folder_matches_diffusers_decode_in_f16_and_bf16() {
    check("untiled", "vae_tiny", "vae_tiny.reference.safetensors", DType::F16);
    check("untiled", "vae_tiny", "vae_tiny.reference.safetensors", DType::BF16);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn vae_single_file_matches_diffusers_tiled_decode_in_f16() {
    // Tiles of 8x8, 8x4, 6x8 and 6x4 latents: every tile's pixel count is a multiple of 8, which
    // gemm_attention's cuBLASLt path needs of its key count.
    check("tiled, single file", "vae_tiny.single_file.safetensors", "vae_tiny.tiled.reference.safetensors", DType::F16);
}
