//! The ControlNet (plain and Union) on the CUDA ops against the same diffusers fixtures as
//! tests/controlnet_cpu.rs (float32 diffusers references), in f16 and bf16, plus the CUDA result
//! against the CPU twins run in the same dtype (printed, for the run's table; the Union's asserted
//! too).
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; tools/gpu_run.sh runs them on
//! the GPU machine with `--include-ignored`. Run without a GPU they fail, never pass silently.
//!
//! Tolerances (relative L2 against the float32 reference, per residual) are `verify`'s defaults:
//! f16 1e-2, bf16 3e-2, the UNet's (the ControlNet is its encoder plus convolutions).

mod common;
#[path = "common/control_lora_fixtures.rs"]
mod control_lora;
#[path = "common/controlnet_fixtures.rs"]
mod controlnet;
#[path = "common/unet_fixtures.rs"]
mod fixtures;

use celframe::DType;
use celframe::gpu::Gpu;
use celframe::verify::{Settings, compare, default_tolerance, verify_controlnet, verify_controlnet_with_base};
use common::TempDir;
use controlnet::{reference, write_cldm, write_folder, write_union_folder};

/// Scratch arena per forward: the fixtures need a few MB.
const SCRATCH_GB: f64 = 1.0;

fn check(what: &str, weights: &std::path::Path, reference_name: &str, dtype: DType) {
    check_twin(what, weights, reference_name, dtype, None);
}

/// `check`, and with `twin_tol` the CUDA result within it of the CPU twins' in the same dtype.
fn check_twin(what: &str, weights: &std::path::Path, reference_name: &str, dtype: DType, twin_tol: Option<f64>) {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let tol = default_tolerance(dtype);
    let r = reference(reference_name);
    let gpu = verify_controlnet(weights, &r, &Settings::cuda(dtype, tol, SCRATCH_GB)).unwrap();
    let twin = verify_controlnet(weights, &r, &Settings::cpu(dtype, tol)).unwrap();
    for ((c, t), ((name, g), (_, w))) in
        gpu.comparisons.iter().zip(&twin.comparisons).zip(gpu.outputs.iter().zip(&twin.outputs))
    {
        let vs_twin = compare(name, g, w, tol).unwrap();
        println!(
            "GPUCHECK controlnet {what} {name} {dtype:?} rel_l2={:.2e} max_abs={:.2e} tol={tol:.0e} (cpu twins {dtype:?}: \
             {:.2e}; cuda vs twins {:.2e})",
            c.rel_l2, c.max_abs, t.rel_l2, vs_twin.rel_l2
        );
        assert!(c.ok(), "{what} {dtype:?}: {c:?}");
        if let Some(t) = twin_tol {
            assert!(
                vs_twin.rel_l2 <= t,
                "{what} {name} {dtype:?}: CUDA vs the CPU twins {:.2e} > {t:.0e}",
                vs_twin.rel_l2
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn controlnet_variants_match_diffusers_in_f16_and_bf16() {
    let dir = TempDir::new("controlnet-gpu");
    for variant in controlnet::VARIANTS {
        let folder = write_folder(&dir.0, variant);
        check(variant, &folder, variant, DType::F16);
        check(variant, &folder, variant, DType::BF16);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn controlnet_guess_mode_and_cldm_file_match_diffusers_in_f16() {
    let dir = TempDir::new("controlnet-gpu-cldm");
    let file = dir.path("full_cldm.safetensors");
    write_cldm(&file, "full", "control_model.");
    check("full cldm, guess mode", &file, "guess", DType::F16);
}

/// The Union (one condition; two with scales in the fusion; guess mode; from_multi) on CUDA:
/// within `verify`'s tolerance of diffusers' float32, and of the CPU twins run in the same dtype
/// (both round every op's output to the dtype, so they differ by accumulation order and rounding
/// ties: 1e-2 in f16, 3e-2 in bf16, the verify bounds).
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn controlnet_union_matches_diffusers_and_the_twins_in_f16_and_bf16() {
    let dir = TempDir::new("controlnet-gpu-union");
    let folder = write_union_folder(&dir.0);
    for name in ["union_pose", "union_pose_depth", "union_lineart_depth", "union_multi"] {
        for dtype in [DType::F16, DType::BF16] {
            check_twin(name, &folder, name, dtype, Some(default_tolerance(dtype)));
        }
    }
}

/// A Control-LoRA over unet_a (tests/fixtures/control_lora) on CUDA: its up @ down products merged
/// into the device weights by the LoRA-delta kernels (the host merges them for the CPU twins), the
/// residuals within `verify`'s tolerance of diffusers' float32 and of the CPU twins in the same
/// dtype (1e-2 in f16, 3e-2 in bf16, the verify bounds).
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn control_lora_matches_diffusers_and_the_twins_in_f16_and_bf16() {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let dir = TempDir::new("controlnet-gpu-control-lora");
    let file = dir.path("control_lora.safetensors");
    control_lora::write_control_lora(&file, |_| {});
    let (base, r) = (control_lora::base_unet(), control_lora::control_lora_reference());
    for dtype in [DType::F16, DType::BF16] {
        let tol = default_tolerance(dtype);
        let gpu = verify_controlnet_with_base(&file, Some(&base), &r, &Settings::cuda(dtype, tol, SCRATCH_GB)).unwrap();
        let twin = verify_controlnet_with_base(&file, Some(&base), &r, &Settings::cpu(dtype, tol)).unwrap();
        for (c, ((name, g), (_, w))) in gpu.comparisons.iter().zip(gpu.outputs.iter().zip(&twin.outputs)) {
            let vs_twin = compare(name, g, w, tol).unwrap();
            println!(
                "GPUCHECK controlnet control_lora {name} {dtype:?} rel_l2={:.2e} max_abs={:.2e} tol={tol:.0e} (cuda vs \
                 twins {:.2e})",
                c.rel_l2, c.max_abs, vs_twin.rel_l2
            );
            assert!(c.ok(), "{dtype:?}: {c:?}");
            assert!(vs_twin.ok(), "{name} {dtype:?}: CUDA vs the CPU twins {:.2e} > {tol:.0e}", vs_twin.rel_l2);
        }
    }
}
