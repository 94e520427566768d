//! The UNet on the CUDA ops against the same diffusers fixtures as tests/unet_cpu.rs (float32
//! diffusers references), in f16 and bf16, plus the CUDA result against the CPU twins run in the
//! same dtype (printed, for the run's table).
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; tools/gpu_run.sh runs them on
//! the GPU machine with `--include-ignored`. Run without a GPU they fail, never pass silently.
//!
//! Tolerances (relative L2 against the float32 reference) are `verify`'s defaults: f16 1e-2, bf16
//! 3e-2. Every op rounds its output to the working dtype and the errors compound through the
//! network; the CPU twins in those dtypes measure 1.3e-3 (f16) and 1.3e-2 (bf16) on these fixtures,
//! and the kernels differ from the twins only by accumulation order and attention's rounded
//! probabilities.

#[path = "common/unet_fixtures.rs"]
mod fixtures;

use celframe::DType;
use celframe::gpu::Gpu;
use celframe::verify::{Settings, compare, default_tolerance, verify_unet};
use fixtures::{TempDir, folder, reference, write_single_file_a};

/// Scratch arena per forward: the fixtures need a few MB; tests may run three at a time.
const SCRATCH_GB: f64 = 1.0;

fn check(what: &str, weights: &std::path::Path, reference: &std::path::Path, dtype: DType) {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let tol = default_tolerance(dtype);
    let gpu = verify_unet(weights, reference, &Settings::cuda(dtype, tol, SCRATCH_GB)).unwrap();
    let twin = verify_unet(weights, reference, &Settings::cpu(dtype, tol)).unwrap();
    let (c, t) = (&gpu.comparisons[0], &twin.comparisons[0]);
    let vs_twin = compare("out.sample", &gpu.outputs[0].1, &twin.outputs[0].1, tol).unwrap();
    println!(
        "GPUCHECK unet {what} {dtype:?} rel_l2={:.2e} max_abs={:.2e} tol={tol:.0e} (cpu twins {dtype:?}: {:.2e}; cuda vs twins {:.2e})",
        c.rel_l2, c.max_abs, t.rel_l2, vs_twin.rel_l2
    );
    assert!(c.ok(), "{what} {dtype:?}: {c:?}");
    // verify's second forward, with the text k/v computed beforehand (one stacked GEMM)
    let k = &gpu.comparisons[1];
    println!(
        "GPUCHECK unet {what} {dtype:?} text k/v computed beforehand: rel_l2={:.2e} max_abs={:.2e}",
        k.rel_l2, k.max_abs
    );
    assert!(k.ok(), "{what} {dtype:?}, text k/v computed beforehand: {k:?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn unet_a_folder_matches_diffusers_in_f16_and_bf16() {
    check("config a", &folder("a"), &reference("a"), DType::F16);
    check("config a", &folder("a"), &reference("a"), DType::BF16);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn unet_b_folder_matches_diffusers_in_f16() {
    check("config b", &folder("b"), &reference("b"), DType::F16);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn unet_a_single_file_and_controlnet_residuals_match_diffusers_in_f16() {
    let dir = TempDir::new("unet-gpu-single-file");
    let file = dir.path("unet_a.safetensors");
    write_single_file_a(&file);
    check("config a single file", &file, &reference("a"), DType::F16);
    check("config a + residuals", &folder("a"), &reference("a.residuals"), DType::F16);
}
