//! Every op whose GPU layout is chosen from device queries, run at every shape the models produce
//! at the render sizes users ask for, each checked against the CPU twin: group norm (kernel, cluster
//! size, slice, tile and block size from occupancy and shared-memory limits) at every (channels,
//! pixels, frames) shape of the SDXL UNet, VAE decoder, ControlNet and AnimateDiff motion module,
//! single images and 16-frame videos, through both kernels (the cluster kernel where it fits and the
//! two-phase kernel everywhere); flash attention (the short-key kernels' grid follows the
//! multiprocessor count) at every SDXL transformer's self and cross attention.
//!
//! Why: a whole-UNet run at 1024x1024 once failed with CUDA_ERROR_INVALID_VALUE at one up-block width
//! (1920 channels at 32x32) while the op tests, at other shapes, passed.
//!
//! Needs an NVIDIA GPU: ignored in CI, run by tools/gpu_run.sh. Tolerance: f16 2e-3 relative L2, as
//! in gpu_ops.rs (one output rounding plus accumulation order).

mod common;

use std::collections::BTreeMap;

use celframe::gpu::{Arena, Gpu};
use celframe::ops::Exec;
use celframe::ops::attention::{FlashAttention, flash_attention, flash_attention_reference};
use celframe::ops::norm::{GroupNorm, GroupNormMode, GroupNormTuning, group_norm, group_norm_layout, group_norm_tuned};
use celframe::{DType, Tensor};
use common::{assert_close, errors, randn, random_tensor};

/// Image sizes (height, width) users render: SDXL's square, 16:9 video, 4:7 portrait, SD-size previews.
const SIZES: [(usize, usize); 4] = [(1024, 1024), (576, 1024), (1344, 768), (512, 512)];

/// Where group norms sit, as (model, channels, downscale from the image): each entry is one
/// activation width at one resolution.
fn sites() -> Vec<(&'static str, usize, usize)> {
    let mut s = Vec::new();
    // SDXL UNet (block_out_channels 320/640/1280, 2 layers down, 3 up; latents are image / 8):
    // ResNet norm1 sees a layer's input (up layers: h and the skip concatenated), norm2 and the
    // Transformer2D norm its width; conv_norm_out 320 at level 0. ControlNet runs the same down
    // path and mid block, so its widths are a subset of these.
    for c in [320, 640, 960] {
        s.push(("unet", c, 8)); // level 0: down 0, up 2 (960 = 640 + 320, 640 = 320 + 320), out
    }
    for c in [320, 640, 960, 1280, 1920] {
        s.push(("unet", c, 16)); // level 1: down 1 (320 in), up 1 (1920 = 1280 + 640, 1280, 960)
    }
    for c in [640, 1280, 1920, 2560] {
        s.push(("unet", c, 32)); // level 2: down 2 (640 in), mid, up 0 (2560 = 1280 + 1280, 1920)
    }
    // VAE decoder (block_out_channels 128/256/512/512): mid and up 0 at the latent size, up 1 at
    // 1/4, up 2 (512 in, 256 out) at 1/2, up 3 (256 in, 128 out) and conv_norm_out at full size.
    for (c, down) in [(512, 8), (512, 4), (512, 2), (256, 2), (256, 1), (128, 1)] {
        s.push(("vae", c, down));
    }
    s
}

/// The AnimateDiff motion module's temporal transformer normalises across a video's frames at each
/// UNet level's width (320, 640, 1280); AnimateDiff-Evolved's option does the same for every UNet
/// norm, so every UNet site also runs with frames.
const FRAMES: usize = 16;

struct Case {
    channels: usize,
    height: usize,
    width: usize,
    frames: usize,
    users: Vec<String>,
}

/// The distinct shapes, each with the models and sizes that produce it.
fn cases() -> Vec<Case> {
    let mut by_shape: BTreeMap<(usize, usize, usize, usize), Vec<String>> = BTreeMap::new();
    for (h, w) in SIZES {
        for (model, c, down) in sites() {
            let (lh, lw) = (h / down, w / down);
            let mut put = |frames: usize, who: String| by_shape.entry((c, lh, lw, frames)).or_default().push(who);
            put(1, format!("{model} {w}x{h}"));
            if model == "unet" {
                let who = if [320, 640, 1280].contains(&c) { "motion module / unet" } else { "unet" };
                put(FRAMES, format!("{who} {w}x{h} x{FRAMES} frames"));
            }
        }
    }
    by_shape
        .into_iter()
        .map(|((channels, height, width, frames), users)| Case { channels, height, width, frames, users })
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn group_norm_at_every_model_shape() {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let gpu = Gpu::from_env().unwrap();
    gpu.set_poison_outputs(true);
    let inputs = Arena::new("test inputs", 8 << 30).unwrap();
    let scratch = Arena::new("test scratch", 8 << 30).unwrap();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let dtype = DType::F16;

    let cases = cases();
    let largest = cases.iter().map(|c| c.frames * c.height * c.width * c.channels).max().unwrap();
    // Random values for every case, drawn once: slices of it at varying offsets keep each case's
    // input different without drawing billions of values.
    let pool = randn(largest + (1 << 20), 0x6e0, 1.0, 0.0);
    let cluster_capable = gpu.info().compute_capability.0 >= 9;
    let (mut checks, mut clustered) = (0, 0);
    for (k, case) in cases.iter().enumerate() {
        let c = case.channels;
        let shape = [case.frames, case.height, case.width, c];
        let n: usize = shape.iter().product();
        // x: unit normal with a per-case mean shift; gamma, beta: around 1 and 0.
        let offset = (k * 7919) % (1 << 20);
        let shift = 0.5 * (k % 5) as f32 - 1.0;
        let x_values: Vec<f32> = pool[offset..offset + n].iter().map(|v| 1.5 * v + shift).collect();
        let x = Tensor::from_f32(&shape, dtype, &x_values).unwrap();
        drop(x_values);
        let gamma =
            Tensor::from_f32(&[c], dtype, &pool[offset + 1..][..c].iter().map(|v| 1.0 + 0.3 * v).collect::<Vec<_>>())
                .unwrap();
        let beta = Tensor::from_f32(&[c], dtype, &pool[offset + 2..][..c].iter().map(|v| 0.3 * v).collect::<Vec<_>>())
            .unwrap();
        let (xd, gd, bd) = (
            gpu.upload(&inputs, &x, dtype).unwrap(),
            gpu.upload(&inputs, &gamma, dtype).unwrap(),
            gpu.upload(&inputs, &beta, dtype).unwrap(),
        );
        // ResNet norms are followed by SiLU, transformer and motion-module norms are not: alternate.
        let cfg = GroupNorm { groups: 32, eps: 1e-5, silu: k % 2 == 0, frames: case.frames };
        let twin = group_norm(&Exec::Cpu, &x, &gamma, &beta, cfg).unwrap();
        drop(x);
        for mode in [GroupNormMode::Auto, GroupNormMode::TwoPhase] {
            let tuning = GroupNormTuning { mode, ..Default::default() };
            let layout = group_norm_layout(&gpu, &shape, dtype, cfg, tuning).unwrap();
            let what =
                format!("group_norm {shape:?} frames={} {mode:?} [{layout}] ({})", case.frames, case.users.join(", "));
            let out = group_norm_tuned(&ex, &xd, &gd, &bd, cfg, tuning).unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = gpu.download(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
            let (rel, max) = assert_close(&what, &got, &twin, 2e-3);
            println!("GPUCHECK {what} rel_l2={rel:.2e} max_abs={max:.2e} tol=2e-3");
            checks += 1;
            clustered += usize::from(mode == GroupNormMode::Auto && layout.contains("cluster"));
            drop(out);
            scratch.reset();
        }
        drop((xd, gd, bd));
        inputs.reset();
    }
    println!(
        "GPUCHECK group_norm shapes: {} shapes, {checks} checks, {clustered} through the cluster kernel",
        cases.len()
    );
    if cluster_capable {
        assert!(clustered > 0, "sm_90 took the two-phase kernel at every model shape: the cluster plan never fits");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn flash_attention_at_every_render_size() {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let gpu = Gpu::from_env().unwrap();
    gpu.set_poison_outputs(true);
    let inputs = Arena::new("test inputs", 1 << 30).unwrap();
    let scratch = Arena::new("test scratch", 1 << 30).unwrap();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let dtype = DType::F16;
    // SDXL's transformers sit at image / 16 and image / 32: self attention over the level's tokens
    // (the general kernel), cross attention over one and two 77-token prompt chunks (the short-key
    // kernels). Heads trimmed to 2 and self attention to one image (the f64 twin's cost); the
    // kernels see heads only as grid rows.
    let mut seed = 0x5a11;
    for (h, w) in SIZES {
        for down in [16, 32] {
            let tokens = (h / down) * (w / down);
            for (batch, keys) in [(1, tokens), (2, 77), (2, 154)] {
                let cfg = FlashAttention { heads: 2, causal: false, scale: 0.125 };
                let mut input = |n: usize| {
                    seed += 1;
                    let host = random_tensor(&[batch, n, 128], dtype, seed, 1.0, 0.0);
                    let dev = gpu.upload(&inputs, &host, dtype).unwrap();
                    (host, dev)
                };
                let ((q, qd), (k, kd), (v, vd)) = (input(tokens), input(keys), input(keys));
                let what = format!("flash_attention {w}x{h} / {down}: b={batch} sq={tokens} sk={keys} h=2 {dtype:?}");
                let out = flash_attention(&ex, &qd, &kd, &vd, cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
                let got = gpu.download(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
                let exact = flash_attention_reference(&q, &k, &v, cfg, None, DType::F32).unwrap();
                let plain = flash_attention_reference(&q, &k, &v, cfg, Some(dtype), dtype).unwrap();
                // The attention rule (as gpu_ops.rs): error against f64 at most twice that of a plain
                // half-precision implementation.
                let (ours, _) = assert_close(&what, &got, &exact, 1e-2);
                let (theirs, _) = errors(&plain.to_f32_vec().unwrap(), &exact.to_f32_vec().unwrap());
                println!("GPUCHECK {what} rel_l2={ours:.2e} plain_half={theirs:.2e} rule=2x");
                assert!(
                    ours <= 2.0 * theirs,
                    "{what}: error {ours:.3e} exceeds twice the plain half error {theirs:.3e}"
                );
                drop((qd, kd, vd, out));
                scratch.reset();
                inputs.reset();
            }
        }
    }
}
