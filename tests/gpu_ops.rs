//! Every CUDA op against its CPU twin at real SDXL shapes. Each check draws fresh random inputs,
//! poisons the output (NaN bytes) before the kernel runs, and compares by relative L2 error.
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; tools/gpu_run.sh runs them on
//! the GPU machine with `--include-ignored`. Run without a GPU they fail, never pass silently.
//!
//! Tolerances (relative L2): both sides see the same rounded inputs and accumulate in fp32, so
//! what differs is accumulation order and the final rounding of the output: one rounding of fp16
//! is <= 2^-11 relative (rms ~3e-4), of bf16 <= 2^-8 (rms ~2e-3). Hence f16 2e-3, bf16 1e-2,
//! f32 1e-5.

mod common;

use celframe::gpu::blas::{Gemm, GemmIo};
use celframe::gpu::{Arena, Gpu};
use celframe::ops::Exec;
use celframe::ops::conv::{Conv2d, conv2d, conv2d_residual, conv2d_residual_fused};
use celframe::ops::elementwise::{add, geglu, geglu_fp8, gelu, mul, residual_add, scale, silu};
use celframe::ops::embedding::{TimestepEmbedding, timestep_embedding};
use celframe::ops::linear::{linear, linear_add};
use celframe::ops::norm::{
    GroupNorm, GroupNormMode, GroupNormTuning, group_norm, group_norm_concat, group_norm_concat_tuned,
    group_norm_layout, group_norm_of_biased, group_norm_tuned, layer_norm, layer_norm_add,
};
use celframe::ops::reduce::mean_hw;
use celframe::ops::upsample::{upsample_nearest2x, upsample2x_conv3x3, upsample2x_conv3x3_concat};
use celframe::{DType, Tensor};
use common::{assert_close, random_tensor};

fn tol(d: DType) -> f64 {
    match d {
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        DType::F32 => 1e-5,
    }
}

struct Rig {
    gpu: Gpu,
    weights: Arena,
    scratch: Arena,
    seed: std::cell::Cell<u64>,
}

impl Rig {
    fn new() -> Rig {
        assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
        let gpu = Gpu::from_env().unwrap();
        gpu.set_poison_outputs(true);
        Rig {
            weights: Arena::new("test inputs", 8 << 30).unwrap(),
            scratch: Arena::new("test scratch", 8 << 30).unwrap(),
            gpu,
            seed: 1.into(),
        }
    }
    fn exec(&self) -> Exec<'_> {
        Exec::Cuda { gpu: &self.gpu, scratch: &self.scratch }
    }
    /// Whether the device has compute capability 9.0, which the Hopper kernels need; where not, says
    /// that `what` is skipped (never silently).
    fn on_hopper(&self, what: &str) -> bool {
        let hopper = self.gpu.info().compute_capability == (9, 0);
        if !hopper {
            println!("GPUCHECK {what}: SKIPPED, not a compute 9.0 device");
        }
        hopper
    }
    /// A fresh random host tensor and its device copy.
    fn input(&self, shape: &[usize], dtype: DType, scale: f32, shift: f32) -> (Tensor, Tensor) {
        self.seed.set(self.seed.get() + 1);
        let host = random_tensor(shape, dtype, self.seed.get() ^ 0x5eed, scale, shift);
        let dev = self.gpu.upload(&self.weights, &host, dtype).unwrap();
        (host, dev)
    }
    /// Compares a device result with the twin's and prints one line for the run's table.
    fn check(&self, op: &str, shape: &[usize], dtype: DType, gpu_out: Tensor, cpu_out: Tensor) {
        self.check_within(op, shape, dtype, gpu_out, cpu_out, tol(dtype));
    }
    /// The attention rule: error against the f64 result at most twice that of a plain
    /// half-precision implementation (scores and probabilities rounded to the working dtype).
    fn check_attention_rule(&self, what: &str, got: &Tensor, exact: &Tensor, plain: &Tensor) {
        let (ours, _) = assert_close(what, got, exact, 1e-2);
        let (theirs, _) = common::errors(&plain.to_f32_vec().unwrap(), &exact.to_f32_vec().unwrap());
        println!("GPUCHECK {what} rel_l2={ours:.2e} plain_half={theirs:.2e} rule=2x");
        assert!(
            ours <= 2.0 * theirs,
            "{what}: error {ours:.3e} exceeds twice the plain half-precision error {theirs:.3e}"
        );
        self.scratch.reset();
    }
    fn check_within(&self, op: &str, shape: &[usize], dtype: DType, gpu_out: Tensor, cpu_out: Tensor, tol: f64) {
        let got = self.gpu.download(&gpu_out).unwrap();
        let (rel, max) = assert_close(op, &got, &cpu_out, tol);
        println!("GPUCHECK {op} {shape:?} {dtype:?} rel_l2={rel:.2e} max_abs={max:.2e} tol={tol:.0e}");
        self.scratch.reset();
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn group_norm_matches_twin_at_sdxl_shapes() {
    let rig = Rig::new();
    // (shape NHWC, groups, eps, silu, frames, dtype)
    // (shape NHWC, groups, eps, silu, frames, dtype)
    type Case<'a> = (&'a [usize], usize, f32, bool, usize, DType);
    let cases: &[Case] = &[
        (&[32, 72, 128, 320], 32, 1e-5, true, 1, DType::F16), // ResNet norm, level 0, 2x16 frames 1024x576
        (&[32, 72, 128, 320], 32, 1e-5, false, 1, DType::F16),
        (&[32, 36, 64, 640], 32, 1e-6, false, 16, DType::F16), // motion-module norm across 16 frames
        (&[32, 18, 32, 1280], 32, 1e-5, true, 1, DType::BF16),
        (&[2, 32, 32, 2560], 32, 1e-5, true, 1, DType::F16), // up-block concat width
        (&[3, 17, 23, 960], 32, 1e-5, true, 1, DType::F16),  // ragged last chunk
        (&[2, 64, 64, 512], 32, 1e-6, true, 1, DType::F32),  // VAE width
        (&[1, 128, 128, 128], 32, 1e-6, false, 1, DType::BF16),
    ];
    for &(shape, groups, eps, silu, frames, dtype) in cases {
        let c = shape[3];
        let (x, xd) = rig.input(shape, dtype, 2.0, 0.7);
        let (g, gd) = rig.input(&[c], dtype, 0.5, 1.0);
        let (b, bd) = rig.input(&[c], dtype, 0.5, 0.0);
        let cfg = GroupNorm { groups, eps, silu, frames };
        let gpu_out = group_norm(&rig.exec(), &xd, &gd, &bd, cfg).unwrap();
        let cpu_out = group_norm(&Exec::Cpu, &x, &g, &b, cfg).unwrap();
        rig.check(&format!("group_norm silu={silu} frames={frames}"), shape, dtype, gpu_out, cpu_out);
    }
    // Every kernel and layout on the same input: the cases above take the default (clusters where
    // the shape fits them on sm_90, else two-phase).
    let shape = [8, 72, 128, 320];
    let (x, xd) = rig.input(&shape, DType::F16, 1.0, -0.4);
    let (g, gd) = rig.input(&[320], DType::F16, 0.5, 1.0);
    let (b, bd) = rig.input(&[320], DType::F16, 0.5, 0.0);
    let cfg = GroupNorm { groups: 32, eps: 1e-5, silu: true, frames: 1 };
    let cpu_out = group_norm(&Exec::Cpu, &x, &g, &b, cfg).unwrap();
    let cluster = rig.gpu.info().compute_capability.0 >= 9;
    let mut modes = vec![("two-phase lag=1", GroupNormMode::TwoPhase, 0)];
    if cluster {
        // 7 rows: a block's pixels do not split evenly over its rows.
        modes.extend([
            ("cluster 16", GroupNormMode::Cluster(16), 0),
            ("cluster 16 rows=7", GroupNormMode::Cluster(16), 7),
        ]);
    } else {
        println!("SKIPPED group_norm cluster modes: {} is not sm_90", rig.gpu.info().name);
    }
    for (name, mode, cluster_rows) in modes {
        let tuning = GroupNormTuning { mode, lag: 1, cluster_rows, ..Default::default() };
        let gpu_out = group_norm_tuned(&rig.exec(), &xd, &gd, &bd, cfg, tuning).unwrap();
        rig.check(&format!("group_norm {name}"), &shape, DType::F16, gpu_out, cpu_out.clone());
    }
    // Clusters of 8 (the portable size) at level 1: slices of 8 groups of 20 channels.
    if cluster {
        let shape = [8, 36, 64, 640];
        let (x, xd) = rig.input(&shape, DType::BF16, 1.0, 0.2);
        let (g, gd) = rig.input(&[640], DType::BF16, 0.5, 1.0);
        let (b, bd) = rig.input(&[640], DType::BF16, 0.5, 0.0);
        let tuning = GroupNormTuning { mode: GroupNormMode::Cluster(8), ..Default::default() };
        let gpu_out = group_norm_tuned(&rig.exec(), &xd, &gd, &bd, cfg, tuning).unwrap();
        let cpu_out = group_norm(&Exec::Cpu, &x, &g, &b, cfg).unwrap();
        rig.check("group_norm cluster 8", &shape, DType::BF16, gpu_out, cpu_out);
    }
    // Fewer pixels than cluster blocks: blocks with no pixels still take part in the statistics.
    // 4 channels per group: each thread's 8 channels hold two groups.
    let shape = [2, 3, 5, 128];
    let (x, xd) = rig.input(&shape, DType::F16, 1.0, 0.3);
    let (g, gd) = rig.input(&[128], DType::F16, 0.5, 1.0);
    let (b, bd) = rig.input(&[128], DType::F16, 0.5, 0.0);
    let gpu_out = group_norm(&rig.exec(), &xd, &gd, &bd, cfg).unwrap();
    rig.check("group_norm 15 pixels", &shape, DType::F16, gpu_out, group_norm(&Exec::Cpu, &x, &g, &b, cfg).unwrap());
    // A mean 30 standard deviations from zero, through the cluster kernel (f16; the shifted fp32
    // sums must not cancel) and the chunked kernel (f32, below).
    let shape = [4, 72, 128, 320];
    let (x, xd) = rig.input(&shape, DType::F16, 1.0, 30.0);
    let (g, gd) = rig.input(&[320], DType::F16, 0.5, 1.0);
    let (b, bd) = rig.input(&[320], DType::F16, 0.5, 0.0);
    let gpu_out = group_norm(&rig.exec(), &xd, &gd, &bd, cfg).unwrap();
    rig.check(
        "group_norm mean 30 std 1 cluster",
        &shape,
        DType::F16,
        gpu_out,
        group_norm(&Exec::Cpu, &x, &g, &b, cfg).unwrap(),
    );
    // A mean 30 standard deviations from zero: E[x^2] - mean^2 would cancel badly without the shift.
    let shape = [4, 32, 32, 640];
    let (x, xd) = rig.input(&shape, DType::F32, 1.0, 30.0);
    let (g, gd) = rig.input(&[640], DType::F32, 0.5, 1.0);
    let (b, bd) = rig.input(&[640], DType::F32, 0.5, 0.0);
    let gpu_out = group_norm(&rig.exec(), &xd, &gd, &bd, cfg).unwrap();
    let cpu_out = group_norm(&Exec::Cpu, &x, &g, &b, cfg).unwrap();
    rig.check("group_norm mean 30 std 1", &shape, DType::F32, gpu_out, cpu_out);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn group_norm_of_biased_matches_twin() {
    let rig = Rig::new();
    // The VAE ResNets' norm2 of conv1's output plus its bias ([C]): the cluster kernel (f16 shapes
    // that fit a cluster on sm_90), the two-phase kernel (the VAE's full-resolution width and f32),
    // and a bias 30 standard deviations from the data (the shift must include it). The UNet
    // ResNets' norm2 of conv1's output plus the time embedding, one row per image (32 images
    // 1024x576, level 0) or per video of 16 frames (the motion UNet's level 1: [2, C]).
    type Case<'a> = (&'a [usize], usize, f32, f32, bool, DType);
    let cases: &[Case] = &[
        (&[8, 72, 128, 320], 1, 0.0, 1.0, true, DType::F16),
        (&[4, 72, 128, 512], 1, 0.3, 1.0, true, DType::BF16),
        (&[2, 576, 1024, 128], 1, 0.0, 1.0, true, DType::F16),
        (&[2, 64, 64, 512], 1, -0.2, 1.0, false, DType::F32),
        (&[4, 36, 64, 640], 1, 30.0, 0.5, true, DType::F16),
        (&[32, 72, 128, 320], 32, 0.5, 2.0, true, DType::F16),
        (&[32, 36, 64, 640], 2, -0.5, 2.0, true, DType::BF16),
        (&[4, 64, 64, 512], 4, 0.5, 2.0, true, DType::F32),
    ];
    for &(shape, bias_rows, bias_shift, bias_scale, silu, dtype) in cases {
        let c = shape[3];
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.1);
        let bias_shape: &[usize] = if bias_rows == 1 { &[c] } else { &[bias_rows, c] };
        let (xb, xbd) = rig.input(bias_shape, dtype, bias_scale, bias_shift);
        let (g, gd) = rig.input(&[c], dtype, 0.5, 1.0);
        let (b, bd) = rig.input(&[c], dtype, 0.5, 0.0);
        let cfg = GroupNorm { groups: 32, eps: 1e-6, silu, frames: 1 };
        let gpu_out = group_norm_of_biased(&rig.exec(), &xd, &xbd, &gd, &bd, cfg).unwrap();
        let cpu_out = group_norm_of_biased(&Exec::Cpu, &x, &xb, &g, &b, cfg).unwrap();
        let layout = group_norm_layout(&rig.gpu, shape, dtype, cfg, GroupNormTuning::default()).unwrap();
        rig.check(
            &format!("group_norm_of_biased silu={silu} bias {bias_shape:?}~{bias_shift} ({layout})"),
            shape,
            dtype,
            gpu_out,
            cpu_out,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn layer_norm_matches_twin() {
    let rig = Rig::new();
    for (shape, dtype) in [
        (&[2, 4096, 640][..], DType::F16),
        (&[32, 1024, 1280], DType::BF16),
        (&[2, 77, 768], DType::F32),
        (&[5, 13], DType::F16),
        // rows sharing a warp (8 and 4 lanes a row), the last warp's rows past the end
        (&[3, 7, 320], DType::F16),
        (&[5, 9, 64], DType::BF16),
        // wider than the register-resident rows (1280): the re-reading path
        (&[2, 64, 2560], DType::F16),
    ] {
        let c = *shape.last().unwrap();
        let (x, xd) = rig.input(shape, dtype, 1.5, 0.3);
        let (g, gd) = rig.input(&[c], dtype, 0.5, 1.0);
        let (b, bd) = rig.input(&[c], dtype, 0.5, 0.0);
        let gpu_out = layer_norm(&rig.exec(), &xd, Some(&gd), Some(&bd), 1e-5).unwrap();
        let cpu_out = layer_norm(&Exec::Cpu, &x, Some(&g), Some(&b), 1e-5).unwrap();
        rig.check("layer_norm", shape, dtype, gpu_out, cpu_out);
    }
}

/// The motion modules' LayerNorm with the position rows ([B*F, C], one per frame) added in the same
/// pass, at their real shapes (2 videos x 16 frames at 1024x576: levels 0-2), and the scalar path.
/// Tolerance as layer_norm's: the twin's statistics are f64, the kernel's fp32; the sum is rounded
/// once on both sides.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn layer_norm_with_position_rows_matches_twin() {
    let rig = Rig::new();
    for (shape, dtype) in [
        (&[32, 9216, 320][..], DType::F16),
        (&[32, 9216, 320], DType::BF16),
        (&[32, 2304, 640], DType::F16),
        (&[32, 2304, 640], DType::BF16),
        (&[32, 576, 1280], DType::F16),
        (&[32, 576, 1280], DType::BF16),
        (&[6, 5, 13], DType::F32),
        (&[6, 5, 13], DType::F16),
    ] {
        let c = *shape.last().unwrap();
        let (x, xd) = rig.input(shape, dtype, 1.5, 0.3);
        let (g, gd) = rig.input(&[c], dtype, 0.5, 1.0);
        let (b, bd) = rig.input(&[c], dtype, 0.5, 0.0);
        // Sinusoid-sized rows, distinct per frame: a row taken for the wrong frame is an O(1) error.
        let (pe, ped) = rig.input(&[shape[0], c], dtype, 1.0, 0.0);
        let gpu_out = layer_norm_add(&rig.exec(), &xd, Some(&gd), Some(&bd), 1e-5, Some(&ped)).unwrap();
        let cpu_out = layer_norm_add(&Exec::Cpu, &x, Some(&g), Some(&b), 1e-5, Some(&pe)).unwrap();
        rig.check("layer_norm + position rows", shape, dtype, gpu_out, cpu_out);
    }
}

/// The motion modules' norms of a stream lacking its pending output biases: x + shift (per
/// channel, rounded to the dtype), then the norm and the position rows, at their three levels'
/// shapes, a row wider than the register path (a warp a row) and the scalar path.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn layer_norm_of_a_shifted_stream_matches_twin() {
    use celframe::ops::norm::layer_norm_shifted;
    let rig = Rig::new();
    for (shape, dtype) in [
        (&[32, 9216, 320][..], DType::F16),
        (&[32, 2304, 640], DType::BF16),
        (&[32, 576, 1280], DType::F16),
        (&[3, 111, 2048], DType::F16),
        (&[6, 5, 13], DType::F32),
    ] {
        let c = *shape.last().unwrap();
        let (x, xd) = rig.input(shape, dtype, 1.5, 0.3);
        // Bias-sized and different per channel: a shift left out changes the statistics.
        let (s, sd) = rig.input(&[c], dtype, 1.0, 0.5);
        let (g, gd) = rig.input(&[c], dtype, 0.5, 1.0);
        let (b, bd) = rig.input(&[c], dtype, 0.5, 0.0);
        let (pe, ped) = rig.input(&[shape[0], c], dtype, 1.0, 0.0);
        let gpu_out = layer_norm_shifted(&rig.exec(), &xd, Some(&sd), Some(&gd), Some(&bd), 1e-5, Some(&ped)).unwrap();
        let cpu_out = layer_norm_shifted(&Exec::Cpu, &x, Some(&s), Some(&g), Some(&b), 1e-5, Some(&pe)).unwrap();
        rig.check("layer_norm of x + shift, + position rows", shape, dtype, gpu_out, cpu_out);
    }
}

/// Distance in units in the last place between two tensors of `dtype` (values ordered as their
/// sign-magnitude bit patterns, -0 and +0 equal); a non-finite value in either is reported as
/// u64::MAX.
fn max_ulp(got: &[f32], want: &[f32], dtype: DType) -> u64 {
    let ordered = |v: f32| -> i64 {
        let (bits, sign) = match dtype {
            DType::F16 => (half::f16::from_f32(v).to_bits() as i64, 1i64 << 15),
            DType::BF16 => (half::bf16::from_f32(v).to_bits() as i64, 1 << 15),
            DType::F32 => (v.to_bits() as i64, 1 << 31),
        };
        if bits & sign != 0 { -(bits & (sign - 1)) } else { bits }
    };
    got.iter()
        .zip(want)
        .map(|(&a, &b)| if a.is_finite() && b.is_finite() { ordered(a).abs_diff(ordered(b)) } else { u64::MAX })
        .max()
        .unwrap_or(0)
}

/// A ResNet's last pass, (conv2 + shortcut + conv2.bias [+ conv_shortcut.bias]) * alpha, at the
/// UNet's three widths for 2 videos x 16 frames at 1024x576, the VAE's 512 in f32, and the scalar
/// path (channels not a multiple of 8). Both sides add in fp32 in the same order and round once, so
/// the results should be identical: at most 1 ulp apart (0 expected; 1 allows a compiler's
/// different but exact-to-fp32 evaluation).
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn residual_add_matches_twin_within_one_ulp() {
    let rig = Rig::new();
    // (shape NHWC, shortcut conv bias, alpha, dtype)
    type Case<'a> = (&'a [usize], bool, f32, DType);
    let cases: &[Case] = &[
        (&[32, 72, 128, 320], true, 1.0, DType::F16),
        (&[32, 72, 128, 320], false, 1.0, DType::BF16),
        (&[32, 36, 64, 640], false, 1.0, DType::F16),
        (&[32, 36, 64, 640], true, 1.0, DType::BF16),
        (&[32, 18, 32, 1280], true, 1.0, DType::F16),
        (&[32, 18, 32, 1280], false, 1.0, DType::BF16),
        (&[2, 64, 64, 512], true, 0.5, DType::F32),
        (&[3, 5, 7, 12], true, 0.5, DType::F16),
    ];
    for &(shape, two_biases, alpha, dtype) in cases {
        let c = shape[3];
        let (a, ad) = rig.input(shape, dtype, 3.0, 0.0);
        let (s, sd) = rig.input(shape, dtype, 1.0, 0.0);
        let (b2, b2d) = rig.input(&[c], dtype, 0.5, 0.0);
        let (bs, bsd) = rig.input(&[c], dtype, 0.5, 0.0);
        let gpu_out = residual_add(&rig.exec(), &ad, &sd, &b2d, two_biases.then_some(&bsd), alpha).unwrap();
        let cpu_out = residual_add(&Exec::Cpu, &a, &s, &b2, two_biases.then_some(&bs), alpha).unwrap();
        let got = rig.gpu.download(&gpu_out).unwrap().to_f32_vec().unwrap();
        let ulp = max_ulp(&got, &cpu_out.to_f32_vec().unwrap(), dtype);
        println!("GPUCHECK residual_add {shape:?} {dtype:?} bias2={two_biases} alpha={alpha} max_ulp={ulp} tol=1");
        assert!(ulp <= 1, "residual_add {shape:?} {dtype:?}: {ulp} ulp from the twin");
        rig.scratch.reset();
    }
}

/// The Union ControlNet's token means: its hint features at 1024x576 for 32 frames and at 1024x1024,
/// a tiny odd shape, and the fixture's; values shifted off zero (the mean is most of the result).
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn mean_hw_matches_twin() {
    let rig = Rig::new();
    for (shape, dtype) in [
        (&[32, 72, 128, 320][..], DType::F16),
        (&[1, 128, 128, 320], DType::BF16),
        (&[3, 5, 7, 40], DType::F32),
        (&[2, 8, 8, 32], DType::F16),
    ] {
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.25);
        let gpu_out = mean_hw(&rig.exec(), &xd).unwrap();
        let cpu_out = mean_hw(&Exec::Cpu, &x).unwrap();
        rig.check("mean_hw", shape, dtype, gpu_out, cpu_out);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn elementwise_family_matches_twin() {
    let rig = Rig::new();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let shape = [2, 64, 64, 640];
        let (a, ad) = rig.input(&shape, dtype, 3.0, 0.0);
        let (b, bd) = rig.input(&shape, dtype, 1.0, 0.0);
        let (bias, biasd) = rig.input(&[640], dtype, 1.0, 0.0);
        let (emb, embd) = rig.input(&[2, 640], dtype, 1.0, 0.0);
        let ex = rig.exec();
        rig.check("add", &shape, dtype, add(&ex, &ad, &bd, 1.0).unwrap(), add(&Exec::Cpu, &a, &b, 1.0).unwrap());
        rig.check(
            "add bias",
            &shape,
            dtype,
            add(&ex, &ad, &biasd, 1.0).unwrap(),
            add(&Exec::Cpu, &a, &bias, 1.0).unwrap(),
        );
        rig.check(
            "add per-image",
            &shape,
            dtype,
            add(&ex, &ad, &embd, 0.5).unwrap(),
            add(&Exec::Cpu, &a, &emb, 0.5).unwrap(),
        );
        rig.check("mul", &shape, dtype, mul(&ex, &ad, &bd).unwrap(), mul(&Exec::Cpu, &a, &b).unwrap());
        rig.check("scale", &shape, dtype, scale(&ex, &ad, 0.13025).unwrap(), scale(&Exec::Cpu, &a, 0.13025).unwrap());
        rig.check("silu", &shape, dtype, silu(&ex, &ad).unwrap(), silu(&Exec::Cpu, &a).unwrap());
        rig.check("gelu", &shape, dtype, gelu(&ex, &ad).unwrap(), gelu(&Exec::Cpu, &a).unwrap());
        let gshape = [2, 1024, 2 * 5120]; // GEGLU of a 1280-wide block: proj to 2 * 4C
        let (h, hd) = rig.input(&gshape, dtype, 2.0, 0.0);
        rig.check("geglu", &gshape, dtype, geglu(&ex, &hd, None).unwrap(), geglu(&Exec::Cpu, &h, None).unwrap());
        let (gb, gbd) = rig.input(&gshape[2..], dtype, 1.0, 0.0);
        let (gpu_out, cpu_out) = (geglu(&ex, &hd, Some(&gbd)).unwrap(), geglu(&Exec::Cpu, &h, Some(&gb)).unwrap());
        rig.check("geglu with bias", &gshape, dtype, gpu_out, cpu_out);
        if dtype != DType::F32 {
            // GEGLU writing e4m3 rows (an FP8 ff.net.2's input): rows in registers (D 5120, a
            // block a row, every thread's five vectors; D 1280, the motion modules' level 0, a warp
            // a row, 301 rows leaving the last block one), a vectorised row too wide for them
            // (computed twice) and scalar rows (a warp a row)
            let (g1, g1d) = rig.input(&[301, 2 * 1280], dtype, 2.0, 0.0);
            let (gw, gwd) = rig.input(&[64, 2 * 6144], dtype, 2.0, 0.0);
            let (g3, g3d) = rig.input(&[3, 2 * 20], dtype, 2.0, 0.0);
            for (x, xd, what) in [
                (&h, &hd, "geglu e4m3 with bias"),
                (&g1, &g1d, "geglu e4m3 D 1280"),
                (&gw, &gwd, "geglu e4m3 D 6144"),
                (&g3, &g3d, "geglu e4m3 odd width"),
            ] {
                let bias = (what == "geglu e4m3 with bias").then_some((&gb, &gbd));
                let got = geglu_fp8(&ex, xd, bias.map(|b| b.1)).unwrap().to_host(&ex).unwrap();
                let want = geglu_fp8(&Exec::Cpu, x, bias.map(|b| b.0)).unwrap().to_host(&Exec::Cpu).unwrap();
                check_e4m3_rows(what, &got, &want);
            }
        }
        let odd = [3, 7, 5]; // scalar path: width not a multiple of 8
        let (o, od) = rig.input(&odd, dtype, 1.0, 0.0);
        rig.check("silu odd width", &odd, dtype, silu(&ex, &od).unwrap(), silu(&Exec::Cpu, &o).unwrap());
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn linear_matches_twin() {
    let rig = Rig::new();
    // (x shape, out features, bias, dtype): proj_in at 64x64, to_k of cross attention, GEGLU proj, time embedding.
    let cases: &[(&[usize], usize, bool, DType)] = &[
        (&[2, 4096, 640], 640, true, DType::F16),
        (&[2, 77, 2048], 1280, false, DType::F16),
        (&[2, 1024, 1280], 10240, true, DType::BF16),
        (&[2, 320], 1280, true, DType::F32),
    ];
    for &(shape, n, has_bias, dtype) in cases {
        let k = *shape.last().unwrap();
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.0);
        let (w, wd) = rig.input(&[n, k], dtype, 1.0 / (k as f32).sqrt(), 0.0);
        let (b, bd) = rig.input(&[n], dtype, 1.0, 0.0);
        let gpu_out = linear(&rig.exec(), &xd, &wd, has_bias.then_some(&bd)).unwrap();
        let cpu_out = linear(&Exec::Cpu, &x, &w, has_bias.then_some(&b)).unwrap();
        rig.check(&format!("linear ->{n} bias={has_bias}"), shape, dtype, gpu_out, cpu_out);
    }
    // The residual through cuBLASLt's epilogue (beta C, C apart from D): a transformer's to_out + x.
    let (shape, n, dtype) = ([2, 4096, 640], 640, DType::F16);
    let (x, xd) = rig.input(&shape, dtype, 1.0, 0.0);
    let (w, wd) = rig.input(&[n, 640], dtype, 1.0 / 640f32.sqrt(), 0.0);
    let (b, bd) = rig.input(&[n], dtype, 1.0, 0.0);
    let (r, rd) = rig.input(&shape, dtype, 2.0, 0.5);
    let gpu_out = linear_add(&rig.exec(), &xd, &wd, Some(&bd), Some(&rd)).unwrap();
    let cpu_out = linear_add(&Exec::Cpu, &x, &w, Some(&b), Some(&r)).unwrap();
    rig.check("linear_add residual in the epilogue", &shape, dtype, gpu_out, cpu_out);
    // C = D: D += A Bᵀ in place (a LoRA delta merged into its weight).
    let (m, n, k) = (1280, 640, 64);
    let (a, ad) = rig.input(&[m, k], dtype, 1.0, 0.0);
    let (bt, btd) = rig.input(&[n, k], dtype, 0.1, 0.0);
    let (d0, dd) = rig.input(&[m, n], dtype, 1.0, 0.0);
    let io = GemmIo {
        a: ad.device_ptr().unwrap(),
        b: btd.device_ptr().unwrap(),
        d: dd.device_ptr().unwrap(),
        bias: None,
        c: Some((dd.device_ptr().unwrap(), 1.0)),
        alpha: 0.5,
        scales: None,
    };
    rig.gpu.blas().unwrap().gemm(&rig.gpu, &Gemm::linear(m, n, k, dtype, false), io).unwrap();
    let product = linear(&Exec::Cpu, &a, &bt, None).unwrap().to_f32_vec().unwrap();
    let expected: Vec<f32> = d0.to_f32_vec().unwrap().iter().zip(&product).map(|(d, p)| d + 0.5 * p).collect();
    let expected = Tensor::from_f32(&[m, n], dtype, &expected).unwrap();
    rig.check("gemm D += 0.5 A Bt in place", &[m, n], dtype, dd, expected);
}

/// FP8, with one scale per tensor and with one per row: the device's quantization gives the CPU
/// twin's bytes and scales (f16/bf16, the vectorized path and an odd count that takes the scalar
/// one); the FP8 linear (cuBLASLt, e4m3 operands, the scales in the epilogue) matches its twin,
/// which decodes the same bytes and accumulates in f32, within the output's rounding and fast
/// accumulation (rel L2 5e-3 f16, 1e-2 bf16), at the UNet's level-1 shapes with bias and residual;
/// beside it, its distance from the 16-bit linear (the quantization's own cost) is printed and
/// bounded at 5%.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn fp8_quantize_and_linear_match_twin() {
    use celframe::ops::fp8::{Fp8Scaling, linear_fp8, probe, quantize};
    let rig = Rig::new();
    if rig.gpu.info().compute_capability < (8, 9) {
        println!("GPUCHECK fp8 SKIPPED: compute capability below 8.9 has no FP8 GEMMs (said, not passed)");
        return;
    }
    for scaling in [Fp8Scaling::Tensor, Fp8Scaling::Rows] {
        for (shape, dtype) in
            [(&[8192usize, 640][..], DType::F16), (&[4096, 1280], DType::BF16), (&[7, 33], DType::F16)]
        {
            let (x, xd) = rig.input(shape, dtype, 2.0, 0.3);
            let (bytes, scales) = quantize(&rig.exec(), &xd, false, scaling).unwrap().to_host(&rig.exec()).unwrap();
            let (want, want_scales) = quantize(&Exec::Cpu, &x, false, scaling).unwrap().to_host(&Exec::Cpu).unwrap();
            let differ = bytes.iter().zip(&want).filter(|(a, b)| a != b).count();
            let scales_differ = scales.iter().zip(&want_scales).filter(|(a, b)| a != b).count();
            println!(
                "GPUCHECK fp8 quantize {scaling:?} {shape:?} {dtype:?} scale[0] {:e} (twin {:e}), scales differing \
                 {scales_differ} of {}, bytes differing {differ}",
                scales[0],
                want_scales[0],
                scales.len()
            );
            assert_eq!(scales, want_scales, "fp8 scales {scaling:?} {shape:?}");
            assert_eq!(differ, 0, "fp8 bytes {scaling:?} {shape:?}");
        }
        // What cuBLASLt takes of FP8 GEMMs in its epilogue, said for the record (bias, C, output dtype)
        {
            use celframe::ops::fp8::gemm_fp8;
            let (m, k, n) = (256, 128, 256);
            for dtype in [DType::F16, DType::BF16] {
                let (_, xd) = rig.input(&[m, k], dtype, 1.0, 0.0);
                let (_, wd) = rig.input(&[n, k], dtype, 0.1, 0.0);
                let (_, bd) = rig.input(&[n], dtype, 1.0, 0.0);
                let (_, rd) = rig.input(&[m, n], dtype, 1.0, 0.0);
                let quantized = |t| quantize(&rig.exec(), t, false, scaling).unwrap();
                let (xq, wq) = (quantized(&xd), quantized(&wd));
                for (bias, residual) in [(false, false), (true, false), (false, true), (true, true)] {
                    let y = rig.gpu.empty(&rig.scratch, &[m, n], dtype).unwrap();
                    let r = gemm_fp8(&rig.exec(), &xq, &wq, bias.then_some(&bd), residual.then_some(&rd), &y);
                    let r = r.and_then(|_| rig.gpu.synchronize());
                    println!(
                        "GPUCHECK fp8 gemm epilogue {scaling:?} {dtype:?} bias={bias} residual={residual}: {:?}",
                        r.map(drop)
                    );
                }
            }
            rig.scratch.reset();
        }
        // (rows, K, N): attention projections at level 1 of a b2 1024x1024 step; the GEGLU
        // projection of level 2; the feed-forward's second GEMM (K 5120)
        for (m, k, n, dtype) in
            [(8192, 640, 640, DType::F16), (2048, 1280, 10240, DType::BF16), (2048, 5120, 1280, DType::F16)]
        {
            let (x, xd) = rig.input(&[m, k], dtype, 1.0, 0.0);
            let (w, wd) = rig.input(&[n, k], dtype, 1.0 / (k as f32).sqrt(), 0.0);
            let (b, bd) = rig.input(&[n], dtype, 1.0, 0.0);
            let (r, rd) = rig.input(&[m, n], dtype, 2.0, 0.5);
            let wq_cpu = quantize(&Exec::Cpu, &w, true, scaling).unwrap();
            let twin = linear_fp8(&Exec::Cpu, &x, &wq_cpu, Some(&b), Some(&r)).unwrap();
            let full = linear_add(&Exec::Cpu, &x, &w, Some(&b), Some(&r)).unwrap();
            // bias and residual in a pass after the GEMM, then in its epilogue
            for fused in [false, true] {
                let wq_gpu = quantize(&rig.exec(), &wd, true, scaling).unwrap().with_fused_epilogue(fused);
                let got = linear_fp8(&rig.exec(), &xd, &wq_gpu, Some(&bd), Some(&rd)).unwrap();
                let got_host = rig.gpu.download(&got).unwrap().to_f32_vec().unwrap();
                let (cost, _) = common::errors(&got_host, &full.to_f32_vec().unwrap());
                let tol = if dtype == DType::BF16 { 1e-2 } else { 5e-3 };
                let what = format!("linear_fp8 {scaling:?} {m}x{k}->{n} fused epilogue {fused}");
                rig.check_within(&what, &[m, k], dtype, got, twin.clone(), tol);
                println!("GPUCHECK {what} {dtype:?} vs the {dtype:?} linear rel_l2={cost:.2e}");
                assert!(cost < 0.05, "{what}: {cost:.3e} from the {dtype:?} linear");
            }
        }
        // what probe decides for this device (the twins of enable_fp8 follow it)
        let (_, wd) = rig.input(&[640, 640], DType::F16, 0.05, 0.0);
        let probed = probe(&rig.exec(), quantize(&rig.exec(), &wd, true, scaling).unwrap(), DType::F16).unwrap();
        println!("GPUCHECK fp8 probe {scaling:?}: fused epilogue {}", probed.fused_epilogue());
        rig.scratch.reset();
    }
}

/// The LayerNorm writing e4m3 rows for an FP8 linear (`layer_norm_fp8`) against its CPU twin: the
/// row scales within 1e-5 (fp32 statistics against the twin's f64) and the decoded rows within
/// rel L2 2e-3 (a value on an e4m3 rounding boundary may round the other way), at the UNet's
/// widths (320, 640 and 1280 channels: the register path's lane groups), the motion modules'
/// per-frame rows added, and a width over 1280 (a warp per row) with an odd row count.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn layer_norm_fp8_matches_twin() {
    use celframe::ops::norm::layer_norm_fp8;
    let rig = Rig::new();
    for (rows, c, frames, dtype) in [
        (4096usize, 320usize, 0usize, DType::F16),
        (8192, 640, 16, DType::F16),
        (2048, 1280, 0, DType::BF16),
        (333, 2048, 0, DType::F16),
    ] {
        let (x, xd) = rig.input(&[rows, c], dtype, 2.0, 0.3);
        let (g, gd) = rig.input(&[c], dtype, 0.5, 1.0);
        let (b, bd) = rig.input(&[c], dtype, 0.2, 0.0);
        // the motion modules' form: x [frames, rows / frames, C] and a table row per frame
        let (x, xd) = if frames > 0 {
            let shape = [frames, rows / frames, c];
            (x.reshape(&shape).unwrap(), xd.reshape(&shape).unwrap())
        } else {
            (x, xd)
        };
        let added = (frames > 0).then(|| rig.input(&[frames, c], dtype, 1.0, 0.0));
        let (a, ad) = (added.as_ref().map(|(a, _)| a), added.as_ref().map(|(_, ad)| ad));
        // and its stream's pending biases
        let shifted = (frames > 0).then(|| rig.input(&[c], dtype, 1.0, 0.5));
        let (s, sd) = (shifted.as_ref().map(|(s, _)| s), shifted.as_ref().map(|(_, sd)| sd));
        let got = layer_norm_fp8(&rig.exec(), &xd, sd, Some(&gd), Some(&bd), 1e-5, ad).unwrap();
        let twin = layer_norm_fp8(&Exec::Cpu, &x, s, Some(&g), Some(&b), 1e-5, a).unwrap();
        let what = format!("layer_norm_fp8 {rows}x{c} {dtype:?} frames {frames}");
        check_e4m3_rows(&what, &got.to_host(&rig.exec()).unwrap(), &twin.to_host(&Exec::Cpu).unwrap());
    }
}

/// e4m3 rows with a scale each from a kernel against the CPU twin's: the scales within 1e-5
/// (relative) and the decoded rows within rel L2 2e-3 (fp32 arithmetic in another order can put a
/// value on the other side of an e4m3 rounding boundary); unwritten bytes (poisoned) would decode
/// to NaN.
fn check_e4m3_rows(what: &str, (bytes, scales): &(Vec<u8>, Vec<f32>), (want, want_scales): &(Vec<u8>, Vec<f32>)) {
    assert_eq!((bytes.len(), scales.len()), (want.len(), want_scales.len()), "{what}");
    let cols = bytes.len() / scales.len().max(1);
    let scale_err = scales.iter().zip(want_scales).map(|(s, w)| ((s - w) / w).abs()).fold(0f32, f32::max);
    let decode = |bytes: &[u8], scales: &[f32]| -> Vec<f32> {
        bytes.iter().enumerate().map(|(i, &q)| celframe::ops::fp8::e4m3_to_f32(q) * scales[i / cols]).collect()
    };
    let (rel, _) = common::errors(&decode(bytes, scales), &decode(want, want_scales));
    let differ = bytes.iter().zip(want).filter(|(p, q)| p != q).count();
    println!(
        "GPUCHECK {what}: {} rows, scales max rel {scale_err:.1e}, rel_l2 {rel:.2e}, bytes differing {differ} of {}",
        scales.len(),
        bytes.len()
    );
    assert!(scale_err < 1e-5 && rel < 2e-3, "{what}: scales {scale_err:.1e}, rel L2 {rel:.2e}");
}

/// The GEGLU projection (ff.net.0.proj, then GEGLU) through every route against the CPU twin: the
/// UNet's levels 1 and 2, the motion modules' level 0 with rows not a multiple of the 128-row tile
/// and no bias, and a K that is no multiple of the 64-wide k step with fewer tiles than blocks. The
/// fused Hopper kernel runs on compute capability 9.0 only (said, not skipped silently); a protocol
/// fault traps within about 2 s.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn linear_geglu_sm90_matches_twin() {
    use celframe::ops::linear::{GegluLinear, linear_geglu_with};
    let rig = Rig::new();
    let mut routes = vec![GegluLinear::Composed];
    if rig.on_hopper("linear_geglu fused Hopper kernel") {
        routes.extend([GegluLinear::Fused, GegluLinear::FusedHandoff, GegluLinear::FusedFinish]);
    }
    // (x shape, D, bias, dtype)
    let cases: &[(&[usize], usize, bool, DType)] = &[
        (&[1, 4096, 640], 2560, true, DType::F16),
        (&[2, 1024, 1280], 5120, true, DType::BF16),
        (&[3, 333, 320], 1280, false, DType::F16),
        (&[1, 200, 328], 256, true, DType::F16),
    ];
    for &(shape, dim, has_bias, dtype) in cases {
        let k = *shape.last().unwrap();
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.0);
        let (w, wd) = rig.input(&[2 * dim, k], dtype, 1.0 / (k as f32).sqrt(), 0.0);
        let (b, bd) = rig.input(&[2 * dim], dtype, 1.0, 0.0);
        let cpu_out = linear_geglu_with(&Exec::Cpu, &x, &w, has_bias.then_some(&b), GegluLinear::Auto).unwrap();
        // The fused kernel's two entries run the same arithmetic in other warps: the same bytes.
        let mut fused_bytes = Vec::new();
        for &route in &routes {
            let gpu_out = linear_geglu_with(&rig.exec(), &xd, &wd, has_bias.then_some(&bd), route).unwrap();
            if matches!(route, GegluLinear::FusedHandoff | GegluLinear::FusedFinish) {
                fused_bytes.push(rig.gpu.download(&gpu_out).unwrap().host_bytes().unwrap().to_vec());
            }
            rig.check(
                &format!("linear_geglu {route:?} D={dim} bias={has_bias}"),
                shape,
                dtype,
                gpu_out,
                cpu_out.clone(),
            );
        }
        if let [handoff, finish] = &fused_bytes[..] {
            assert!(handoff == finish, "linear_geglu D={dim}: the finishing entry's bytes differ from the hand-off's");
            println!("GPUCHECK linear_geglu D={dim} {dtype:?}: both fused entries bit-identical");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn uploads_are_ordered_on_the_compute_stream() {
    let rig = Rig::new();
    // 80 MiB: three staging pieces, the last one partial; converted from f32 on the way.
    let shape = [5, 1024, 1024, 8];
    let host = random_tensor(&shape, DType::F32, 77, 1.0, 0.0);
    let dev = rig.gpu.upload(&rig.weights, &host, DType::F16).unwrap();
    // A kernel reads `dev`, then a second upload overwrites it: the kernel must see the first data.
    let doubled = scale(&rig.exec(), &dev, 2.0).unwrap();
    let second = random_tensor(&shape, DType::F16, 78, 1.0, 0.0);
    let celframe::tensor::Storage::Device(mem) = dev.storage() else { unreachable!("uploaded") };
    rig.gpu.upload_into(mem, &second, DType::F16).unwrap();
    drop(second);
    let want_doubled =
        scale(&Exec::Cpu, &Tensor::from_f32(&shape, DType::F16, &host.to_f32_vec().unwrap()).unwrap(), 2.0).unwrap();
    let got = rig.gpu.download(&doubled).unwrap();
    assert_eq!(
        got.host_bytes().unwrap(),
        want_doubled.host_bytes().unwrap(),
        "the kernel queued before the upload saw other data"
    );
    let got = rig.gpu.download(&dev).unwrap();
    let want = random_tensor(&shape, DType::F16, 78, 1.0, 0.0);
    assert_eq!(got.host_bytes().unwrap(), want.host_bytes().unwrap(), "upload_into did not land as staged");
    println!("GPUCHECK upload ordering and staging: {} MiB, bit-exact", (host.numel() * 2) >> 20);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn conv2d_matches_twin() {
    let rig = Rig::new();
    // (x NHWC, out channels, kernel, stride, padding, dtype)
    type Case<'a> = (&'a [usize], usize, usize, usize, usize, DType);
    let cases: &[Case] = &[
        (&[2, 128, 128, 4], 320, 3, 1, 1, DType::F16),   // conv_in
        (&[1, 64, 64, 640], 640, 3, 1, 1, DType::F16),   // level-1 ResNet conv
        (&[1, 128, 128, 320], 320, 3, 2, 1, DType::F16), // downsampler
        (&[1, 64, 64, 1920], 640, 1, 1, 0, DType::F16),  // up-block shortcut
        (&[1, 32, 32, 1280], 1280, 3, 1, 1, DType::BF16),
        (&[1, 16, 16, 64], 32, 3, 1, 1, DType::F32),
        // 2^31 elements and more: cuDNN's 32-bit descriptors need the batch sliced (16 VAE frames)
        (&[3, 1024, 1024, 704], 8, 1, 1, 0, DType::F16),
    ];
    for &(shape, oc, k, stride, padding, dtype) in cases {
        let ic = shape[3];
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.0);
        let (w, wd) = rig.input(&[oc, k, k, ic], dtype, 1.0 / ((k * k * ic) as f32).sqrt(), 0.0);
        let (b, bd) = rig.input(&[oc], dtype, 1.0, 0.0);
        let cfg = Conv2d { stride, padding };
        let gpu_out = conv2d(&rig.exec(), &xd, &wd, Some(&bd), cfg).unwrap();
        let cpu_out = conv2d(&Exec::Cpu, &x, &w, Some(&b), cfg).unwrap();
        rig.check(&format!("conv{k}x{k} s{stride} ->{oc}"), shape, dtype, gpu_out, cpu_out);
    }
}

/// A ResNet's conv2 with its shortcut and both biases added in the same cuDNN call
/// (cudnnConvolutionBiasActivationForward, identity activation) against the twin: the convolution
/// accumulated in f32, plus z, plus the bias, rounded once. Shapes: conv2 at a 1024x1024 image's
/// level 1 (64x64, 640 channels), z the block input; a 960 -> 640 convolution with z from a 1x1
/// shortcut convolution on the device and the bias the device sum of two (as the ResNet passes
/// them); both in f16 and bf16, the outputs poisoned first. Tolerances as the convolutions': one
/// output rounding plus accumulation order. The fused form must run at these shapes (a refusal
/// fails the test: the models would silently take the pass). Last, a batch that cuDNN's 32-bit
/// descriptors make run in slices (z and y sliced alike); there a refusal is reported and the
/// fallback checked instead.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn conv2d_residual_matches_twin_at_resnet_shapes() {
    let rig = Rig::new();
    let ex = rig.exec();
    let same = Conv2d { stride: 1, padding: 1 };
    // (x NHWC, out channels, z from a shortcut conv of this width (0: a plain input), dtype)
    type Case<'a> = (&'a [usize], usize, usize, DType);
    let cases: &[Case] = &[
        (&[2, 64, 64, 640], 640, 0, DType::F16),
        (&[2, 64, 64, 640], 640, 0, DType::BF16),
        (&[2, 64, 64, 960], 640, 960, DType::F16),
        (&[2, 64, 64, 960], 640, 960, DType::BF16),
    ];
    for &(shape, oc, shortcut_in, dtype) in cases {
        let ic = shape[3];
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.0);
        let (w, wd) = rig.input(&[oc, 3, 3, ic], dtype, 1.0 / ((9 * ic) as f32).sqrt(), 0.0);
        let out_shape = [shape[0], shape[1], shape[2], oc];
        let (z, zd, bias, bias_d) = if shortcut_in == 0 {
            let (z, zd) = rig.input(&out_shape, dtype, 1.0, 0.0);
            let (b, bd) = rig.input(&[oc], dtype, 0.5, 0.0);
            (z, zd, b, bd)
        } else {
            // The block input through the 1x1 shortcut, and conv2's bias plus the shortcut's, on
            // the device; the twin reads the same bytes back.
            let (_, sd) = rig.input(&[shape[0], shape[1], shape[2], shortcut_in], dtype, 1.0, 0.0);
            let (_, swd) = rig.input(&[oc, 1, 1, shortcut_in], dtype, 1.0 / (shortcut_in as f32).sqrt(), 0.0);
            let (_, b2d) = rig.input(&[oc], dtype, 0.5, 0.0);
            let (_, bsd) = rig.input(&[oc], dtype, 0.5, 0.0);
            let zd = conv2d(&ex, &sd, &swd, None, Conv2d { stride: 1, padding: 0 }).unwrap();
            let bias_d = add(&ex, &b2d, &bsd, 1.0).unwrap();
            (rig.gpu.download(&zd).unwrap(), zd, rig.gpu.download(&bias_d).unwrap(), bias_d)
        };
        let what = format!("conv2d_residual {ic}->{oc} z={}", if shortcut_in == 0 { "input" } else { "shortcut" });
        let got = conv2d_residual_fused(&ex, &xd, &wd, &zd, &bias_d, same)
            .unwrap()
            .unwrap_or_else(|| panic!("{what} {shape:?} {dtype:?}: cuDNN refused the fused form (see stderr)"));
        let cpu_out = conv2d_residual(&Exec::Cpu, &x, &w, &z, &bias, same).unwrap();
        rig.check(&what, shape, dtype, got, cpu_out);
    }
    // 3 images of 1024x1024 x 704 channels: 2^31 elements and more, so slices of 2 images and 1.
    let shape = [3, 1024, 1024, 704];
    let (x, xd) = rig.input(&shape, DType::F16, 1.0, 0.0);
    let (w, wd) = rig.input(&[8, 1, 1, 704], DType::F16, 1.0 / (704f32).sqrt(), 0.0);
    let (z, zd) = rig.input(&[3, 1024, 1024, 8], DType::F16, 1.0, 0.0);
    let (b, bd) = rig.input(&[8], DType::F16, 0.5, 0.0);
    let cfg = Conv2d { stride: 1, padding: 0 };
    let cpu_out = conv2d_residual(&Exec::Cpu, &x, &w, &z, &b, cfg).unwrap();
    match conv2d_residual_fused(&ex, &xd, &wd, &zd, &bd, cfg).unwrap() {
        Some(got) => rig.check("conv2d_residual 1x1 704->8 sliced", &shape, DType::F16, got, cpu_out),
        None => {
            println!("GPUCHECK conv2d_residual 1x1 704->8 sliced: fused form REFUSED by cuDNN, fallback checked");
            let got = conv2d_residual(&ex, &xd, &wd, &zd, &bd, cfg).unwrap();
            rig.check("conv2d_residual 1x1 704->8 sliced (fallback)", &shape, DType::F16, got, cpu_out);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn upsample_and_timestep_embedding_match_twin() {
    let rig = Rig::new();
    for (shape, dtype) in
        [(&[2, 32, 32, 1280][..], DType::F16), (&[1, 64, 64, 640], DType::BF16), (&[1, 5, 3, 4], DType::F32)]
    {
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.0);
        rig.check(
            "upsample2x",
            shape,
            dtype,
            upsample_nearest2x(&rig.exec(), &xd).unwrap(),
            upsample_nearest2x(&Exec::Cpu, &x).unwrap(),
        );
    }
    let t: Vec<f32> = (0..32).map(|i| (i * 31 % 1000) as f32 + 0.5).collect();
    let th = Tensor::from_f32(&[32], DType::F32, &t).unwrap();
    let td = rig.gpu.upload(&rig.weights, &th, DType::F32).unwrap();
    for (dim, dtype) in [(320, DType::F32), (256, DType::F16), (1281, DType::F32)] {
        let cfg = TimestepEmbedding::sdxl(dim);
        let gpu_out = timestep_embedding(&rig.exec(), &td, cfg, dtype).unwrap();
        let cpu_out = timestep_embedding(&Exec::Cpu, &th, cfg, dtype).unwrap();
        // Angles reach ~1e3 rad: a one-ulp difference between CUDA's and Rust's fp32 exp/log moves
        // the phase by up to ~1e-4, so f32 output gets 5e-4 instead of 1e-5.
        rig.check_within(
            &format!("timestep_embedding dim={dim}"),
            &[32, dim],
            dtype,
            gpu_out,
            cpu_out,
            tol(dtype).max(5e-4),
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn upsample_conv_matches_twin_and_the_composed_route() {
    let rig = Rig::new();
    // Against the CPU twin (upsample, then conv): the channel widths of the UNet's and the VAE's
    // upsamplers at small sizes (the twin is a direct convolution), odd sizes, and out channels
    // that are no multiple of 8 (the composed route on the GPU too).
    let cases: &[(&[usize], usize, DType)] = &[
        (&[1, 16, 24, 1280], 1280, DType::F16), // UNet up_blocks.0
        (&[1, 32, 32, 640], 640, DType::BF16),  // UNet up_blocks.1
        (&[2, 9, 16, 512], 512, DType::F16),    // VAE up_blocks.0/1
        (&[1, 36, 64, 256], 256, DType::F16),   // VAE up_blocks.2
        (&[2, 5, 3, 16], 8, DType::F32),
        (&[1, 4, 6, 8], 12, DType::F16),
    ];
    for &(shape, co, dtype) in cases {
        let ci = shape[3];
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.0);
        let (w, wd) = rig.input(&[co, 3, 3, ci], dtype, 1.0 / ((9 * ci) as f32).sqrt(), 0.0);
        let (b, bd) = rig.input(&[co], dtype, 1.0, 0.0);
        let gpu_out = upsample2x_conv3x3(&rig.exec(), &xd, &wd, Some(&bd)).unwrap();
        let cpu_out = upsample2x_conv3x3(&Exec::Cpu, &x, &w, Some(&b)).unwrap();
        rig.check(&format!("upsample2x_conv3x3 ->{co}"), shape, dtype, gpu_out, cpu_out);
    }
    // Full size against the composed route on the GPU (cuDNN's 3x3 conv of the upsampled input):
    // a VAE chunk of 8 frames at 1024x576 (up_blocks.2's upsampler) and the UNet's at 32 images.
    // The tolerance is the f16 one: the folded weights are rounded once more than the composition's.
    for shape in [[8usize, 288, 512, 256], [32, 18, 32, 1280]] {
        let c = shape[3];
        let (_, xd) = rig.input(&shape, DType::F16, 1.0, 0.0);
        let (_, wd) = rig.input(&[c, 3, 3, c], DType::F16, 1.0 / ((9 * c) as f32).sqrt(), 0.0);
        let (_, bd) = rig.input(&[c], DType::F16, 1.0, 0.0);
        let ex = rig.exec();
        let composed =
            conv2d(&ex, &upsample_nearest2x(&ex, &xd).unwrap(), &wd, Some(&bd), Conv2d { stride: 1, padding: 1 })
                .unwrap();
        let want = rig.gpu.download(&composed).unwrap();
        drop(composed);
        let got = upsample2x_conv3x3(&ex, &xd, &wd, Some(&bd)).unwrap();
        rig.check(&format!("upsample2x_conv3x3 vs composed {shape:?}"), &shape, DType::F16, got, want);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn upsample_conv_concat_is_the_composition_bytes() {
    use celframe::ops::concat::concat_last;
    // The up blocks' first layers after an upsampler (b32 1024x576: up_blocks.1 and .2), a bf16
    // case, and a skip of no multiple of 8 channels (copied after the shuffle): against the
    // upsampler's own output concatenated on the GPU, byte for byte (outputs poisoned first), and
    // the CPU twin.
    let rig = Rig::new();
    let cases: &[(&[usize], usize, DType)] = &[
        (&[32, 18, 32, 1280], 640, DType::F16),
        (&[32, 36, 64, 640], 320, DType::F16),
        (&[2, 9, 16, 640], 320, DType::BF16),
        (&[1, 4, 6, 16], 12, DType::F16),
    ];
    for &(shape, cs, dtype) in cases {
        let (n, h, w, c) = (shape[0], shape[1], shape[2], shape[3]);
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.0);
        let (wt, wd) = rig.input(&[c, 3, 3, c], dtype, 1.0 / ((9 * c) as f32).sqrt(), 0.0);
        let (b, bd) = rig.input(&[c], dtype, 1.0, 0.0);
        let (skip, skipd) = rig.input(&[n, 2 * h, 2 * w, cs], dtype, 1.0, 0.0);
        let ex = rig.exec();
        let composed = concat_last(&ex, &upsample2x_conv3x3(&ex, &xd, &wd, Some(&bd)).unwrap(), &skipd).unwrap();
        let want = rig.gpu.download(&composed).unwrap();
        drop(composed);
        let got = rig.gpu.download(&upsample2x_conv3x3_concat(&ex, &xd, &wd, Some(&bd), &skipd).unwrap()).unwrap();
        assert_eq!(got.shape(), [n, 2 * h, 2 * w, c + cs]);
        assert!(
            got.host_bytes().unwrap() == want.host_bytes().unwrap(),
            "{shape:?} + {cs}: not the composition's bytes"
        );
        rig.scratch.reset();
        if n * h * w <= 2 * 9 * 16 {
            let cpu = upsample2x_conv3x3_concat(&Exec::Cpu, &x, &wt, Some(&b), &skip).unwrap();
            let (rel, max) = assert_close("upsample2x_conv3x3_concat", &got, &cpu, tol(dtype));
            println!(
                "GPUCHECK upsample2x_conv3x3_concat {shape:?} + {cs} {dtype:?} vs twin rel_l2={rel:.2e} max_abs={max:.2e}"
            );
        }
        println!("GPUCHECK upsample2x_conv3x3_concat {shape:?} + {cs} {dtype:?}: the composition's bytes");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn group_norm_concat_is_the_composition_bytes() {
    use celframe::ops::concat::concat_last;
    // The up blocks' ResNets' norm1 on [h, skip] read from its two parts (b32 1024x576: every
    // concatenation no upsampler writes, at levels 2, 1 and 0), a ragged last chunk, f32, 4
    // channels a group (a thread's 8 channels in two groups), statistics across 16 frames, and a
    // part of no multiple of 8 channels (concatenated first): the norm and the concatenation
    // against concat_last then group_norm on the GPU with the same kernel, byte for byte (outputs
    // poisoned first), under Auto (clusters where they fit on sm_90) and the two-phase kernel; and
    // the CPU twin where small.
    let rig = Rig::new();
    // (h's shape, skip channels, groups, frames, dtype)
    type Case<'a> = (&'a [usize], usize, usize, usize, DType);
    let cases: &[Case] = &[
        (&[32, 18, 32, 1280], 1280, 32, 1, DType::F16),
        (&[32, 18, 32, 1280], 640, 32, 1, DType::BF16),
        (&[32, 36, 64, 640], 640, 32, 1, DType::F16),
        (&[32, 36, 64, 640], 320, 32, 1, DType::BF16),
        (&[32, 72, 128, 320], 320, 32, 1, DType::F16),
        (&[3, 17, 23, 640], 320, 32, 1, DType::F16),
        (&[2, 8, 8, 64], 32, 32, 1, DType::F32),
        (&[2, 3, 5, 64], 64, 32, 1, DType::F16),
        (&[32, 9, 16, 320], 320, 32, 16, DType::BF16),
        (&[2, 4, 6, 12], 20, 4, 1, DType::F16),
    ];
    for &(shape, cs, groups, frames, dtype) in cases {
        let (n, h, w, c) = (shape[0], shape[1], shape[2], shape[3]);
        let (x, xd) = rig.input(shape, dtype, 1.0, 0.3);
        let (skip, skipd) = rig.input(&[n, h, w, cs], dtype, 2.0, -0.5);
        let (g, gd) = rig.input(&[c + cs], dtype, 0.5, 1.0);
        let (b, bd) = rig.input(&[c + cs], dtype, 0.5, 0.0);
        let cfg = GroupNorm { groups, eps: 1e-5, silu: true, frames };
        for (name, mode) in [("Auto", GroupNormMode::Auto), ("two-phase", GroupNormMode::TwoPhase)] {
            let tuning = GroupNormTuning { mode, ..Default::default() };
            let ex = rig.exec();
            let cat = concat_last(&ex, &xd, &skipd).unwrap();
            let want_y = rig.gpu.download(&group_norm_tuned(&ex, &cat, &gd, &bd, cfg, tuning).unwrap()).unwrap();
            let want_cat = rig.gpu.download(&cat).unwrap();
            drop(cat);
            let (y, got_cat) = group_norm_concat_tuned(&ex, &xd, &skipd, &gd, &bd, cfg, tuning).unwrap();
            let (y, got_cat) = (rig.gpu.download(&y).unwrap(), rig.gpu.download(&got_cat).unwrap());
            assert_eq!(y.shape(), [n, h, w, c + cs]);
            assert!(
                got_cat.host_bytes().unwrap() == want_cat.host_bytes().unwrap(),
                "{shape:?} + {cs} {name}: not [h, skip]"
            );
            assert!(
                y.host_bytes().unwrap() == want_y.host_bytes().unwrap(),
                "{shape:?} + {cs} {name}: not the norm's bytes"
            );
            rig.scratch.reset();
            if n * h * w <= 3 * 17 * 23 {
                let (cpu, cpu_cat) = group_norm_concat(&Exec::Cpu, &x, &skip, &g, &b, cfg).unwrap();
                assert!(
                    cpu_cat.host_bytes().unwrap() == want_cat.host_bytes().unwrap(),
                    "{shape:?} + {cs}: twin's [h, skip]"
                );
                let (rel, max) = assert_close("group_norm_concat", &y, &cpu, tol(dtype));
                println!(
                    "GPUCHECK group_norm_concat {shape:?} + {cs} {dtype:?} {name} vs twin rel_l2={rel:.2e} max_abs={max:.2e}"
                );
            }
            let layout = group_norm_layout(&rig.gpu, &[n, h, w, c + cs], dtype, cfg, tuning).unwrap();
            println!(
                "GPUCHECK group_norm_concat {shape:?} + {cs} {dtype:?} {name} ({layout}): the composition's bytes"
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn concat_last_matches_twin() {
    use celframe::ops::concat::concat_last;
    let rig = Rig::new();
    // (rows' shape, a's width, b's width, dtype): SDXL up-block skips (16-byte vectors), the
    // pooled text embedding beside the time ids, and widths that force the element path.
    let cases: &[(&[usize], usize, usize, DType)] = &[
        (&[2, 32, 32], 1280, 640, DType::F16),
        (&[2, 128, 128], 320, 320, DType::BF16),
        (&[2], 1280, 1536, DType::F16),
        (&[3, 5, 7], 12, 20, DType::F32),
        (&[3, 5], 9, 4, DType::F16),
    ];
    for &(rows, ca, cb, dtype) in cases {
        let (shape_a, shape_b) = ([rows, &[ca]].concat(), [rows, &[cb]].concat());
        let (a, ad) = rig.input(&shape_a, dtype, 1.0, 0.0);
        let (b, bd) = rig.input(&shape_b, dtype, 1.0, 0.0);
        let gpu_out = concat_last(&rig.exec(), &ad, &bd).unwrap();
        let cpu_out = concat_last(&Exec::Cpu, &a, &b).unwrap();
        // A copy: exact.
        rig.check_within("concat_last", &shape_a, dtype, gpu_out, cpu_out, 0.0);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn scratch_tensors_are_refused_after_reset_and_launch_errors_name_the_kernel() {
    let rig = Rig::new();
    let t = rig.gpu.empty(&rig.scratch, &[16], DType::F16).unwrap();
    assert!(t.device_ptr().is_ok());
    rig.scratch.reset();
    let err = t.device_ptr().unwrap_err().to_string();
    assert!(err.contains("after the arena was reset"), "{err}");
    // An impossible block size must fail at launch with the kernel and grid in the message.
    let p = celframe::gpu::params::Upsample2xParams {
        x: std::ptr::null(),
        out: std::ptr::null_mut(),
        images: 0,
        height: 0,
        width: 0,
        channels: 0,
    };
    let err = rig.gpu.launch("upsample2x_f16", (1, 1, 1), (4096, 1, 1), 0, &p).unwrap_err().to_string();
    assert!(err.contains("upsample2x_f16") && err.contains("4096"), "{err}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn temporal_attention_meets_the_attention_rule() {
    use celframe::ops::attention::{TemporalAttention, temporal_attention, temporal_attention_reference};
    let rig = Rig::new();
    // (NHWC shape, frames, dtype): the three motion-module levels of a 2x16-frame 1024x576 CFG batch,
    // then 32 frames, 1 frame and bf16.
    let cases: &[(&[usize], usize, DType)] = &[
        (&[32, 72, 128, 320], 16, DType::F16),
        (&[32, 36, 64, 640], 16, DType::F16),
        (&[32, 18, 32, 1280], 16, DType::F16),
        (&[32, 16, 16, 320], 32, DType::F16),
        (&[4, 8, 8, 640], 1, DType::F16),
        (&[24, 9, 7, 320], 12, DType::BF16),
    ];
    for &(shape, frames, dtype) in cases {
        let heads = 8;
        let cfg = TemporalAttention { frames, heads, scale: 1.0 / ((shape[3] / heads) as f32).sqrt() };
        let (q, qd) = rig.input(shape, dtype, 1.0, 0.0);
        let (k, kd) = rig.input(shape, dtype, 1.0, 0.0);
        let (v, vd) = rig.input(shape, dtype, 1.0, 0.0);
        let got = rig.gpu.download(&temporal_attention(&rig.exec(), &qd, &kd, &vd, cfg).unwrap()).unwrap();
        let exact = temporal_attention_reference(&q, &k, &v, cfg, None, DType::F32).unwrap();
        let plain = temporal_attention_reference(&q, &k, &v, cfg, Some(dtype), dtype).unwrap();
        rig.check_attention_rule(
            &format!("temporal_attention frames={frames} {shape:?} {dtype:?}"),
            &got,
            &exact,
            &plain,
        );
    }
}

/// Flash attention shapes, (batch, seq_q, seq_k, heads, causal, dtype). Batch and heads are trimmed
/// where the f64 reference would take minutes; the kernels do not care.
const FLASH_CASES: [(usize, usize, usize, usize, bool, DType); 21] = [
    // The general kernel (128 query rows per block, 64-key tiles): SDXL self attention at 2304, 576,
    // 4096 and 9216 tokens; the causal CLIP encoders (77 tokens) and a causal mask over several
    // tiles with ragged ends; 257 keys (just past the short-key kernels, a 1-key last tile); 130
    // queries (a second block whose warps 1-3 have no rows); bf16.
    (1, 2304, 2304, 10, false, DType::F16),
    (2, 576, 576, 20, false, DType::F16),
    (1, 4096, 4096, 2, false, DType::F16),
    (1, 9216, 9216, 1, false, DType::F16),
    (2, 77, 77, 12, true, DType::F16),
    (2, 77, 77, 20, true, DType::BF16),
    (2, 300, 300, 3, true, DType::F16),
    (1, 200, 257, 4, false, DType::F16),
    (3, 130, 700, 2, false, DType::BF16),
    (1, 1000, 1000, 10, false, DType::BF16),
    (1, 2304, 2304, 2, false, DType::BF16),
    // The short-key kernels, one case per compiled key-set size (32, 64, 80, 128, 160, 192, 240, 256
    // keys): cross attention over 77, 154 and 231 prompt tokens at the UNet's 2304 / 1024 / 576-token
    // levels, one key, key counts ending inside and on n-tile boundaries, query counts that leave
    // partial slices and idle warps.
    (2, 50, 1, 2, false, DType::F16),
    (1, 333, 40, 5, false, DType::F16),
    (2, 2304, 77, 10, false, DType::F16),
    (1, 576, 77, 20, false, DType::BF16),
    (1, 4096, 100, 2, false, DType::BF16),
    (1, 1024, 154, 20, false, DType::F16),
    (1, 700, 180, 3, false, DType::F16),
    (2, 2304, 231, 4, false, DType::F16),
    (2, 1000, 256, 3, false, DType::F16),
    (1, 4097, 200, 2, false, DType::BF16),
];

/// Runs every flash case through the kernels `pick` names for it (none: the case is skipped).
fn check_flash_cases(rig: &Rig, pick: impl Fn(usize, bool) -> Vec<celframe::ops::attention::FlashKernel>) {
    check_flash(rig, &FLASH_CASES, pick);
}

/// `check_flash_cases` over `cases`, shaped as FLASH_CASES.
fn check_flash(
    rig: &Rig,
    cases: &[(usize, usize, usize, usize, bool, DType)],
    pick: impl Fn(usize, bool) -> Vec<celframe::ops::attention::FlashKernel>,
) {
    use celframe::ops::attention::{FlashAttention, flash_attention_reference, flash_attention_with};
    for &(batch, sq, sk, heads, causal, dtype) in cases {
        let kernels = pick(sk, causal);
        if kernels.is_empty() {
            continue;
        }
        let cfg = FlashAttention { heads, causal, scale: 0.125 };
        let c = heads * 64;
        let (q, qd) = rig.input(&[batch, sq, c], dtype, 1.0, 0.0);
        let (k, kd) = rig.input(&[batch, sk, c], dtype, 1.0, 0.0);
        let (v, vd) = rig.input(&[batch, sk, c], dtype, 1.0, 0.0);
        let exact = flash_attention_reference(&q, &k, &v, cfg, None, DType::F32).unwrap();
        let plain = flash_attention_reference(&q, &k, &v, cfg, Some(dtype), dtype).unwrap();
        for kernel in kernels {
            let what =
                format!("flash_attention {kernel:?} b={batch} sq={sq} sk={sk} h={heads} causal={causal} {dtype:?}");
            let got =
                flash_attention_with(&rig.exec(), &qd, &kd, &vd, cfg, kernel).unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = rig.gpu.download(&got).unwrap();
            rig.check_attention_rule(&what, &got, &exact, &plain);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn flash_attention_meets_the_attention_rule() {
    use celframe::ops::attention::{FlashAttention, FlashKernel, flash_attention};
    let rig = Rig::new();
    // The default route, and where the short-key kernel is the route the portable kernel and the
    // short-key kernels of 32-query slices.
    check_flash_cases(&rig, |sk, causal| {
        if sk <= 256 && !causal {
            vec![FlashKernel::Auto, FlashKernel::Portable, FlashKernel::ShortRows32]
        } else {
            vec![FlashKernel::Auto]
        }
    });
    // The kernels scale after taking row maxima of the raw scores: a scale <= 0 is refused by name.
    let (_, x) = rig.input(&[1, 77, 128], DType::F16, 1.0, 0.0);
    let cfg = FlashAttention { heads: 2, causal: false, scale: -0.125 };
    let Err(celframe::Error::Input(m)) = flash_attention(&rig.exec(), &x, &x, &x, cfg) else {
        panic!("a negative scale must be refused")
    };
    assert!(m.contains("scale -0.125"), "{m}");
}

/// The Hopper kernel at every flash case; named to run after the portable checks (a fault here
/// leaves the context unusable for the tests after it in the process).
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn flash_attention_sm90_meets_the_attention_rule() {
    use celframe::ops::attention::FlashKernel;
    let rig = Rig::new();
    if !rig.on_hopper("flash_attention Hopper kernel") {
        return;
    }
    check_flash_cases(&rig, |_, _| vec![FlashKernel::Hopper]);
}

/// The warp-specialised Hopper kernel (TMA producer, mbarrier ring) at every flash case; after the
/// sm90 test for the same reason. A protocol fault traps within about 2 s instead of hanging.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn flash_attention_sm90_ws_meets_the_attention_rule() {
    use celframe::ops::attention::FlashKernel;
    let rig = Rig::new();
    if !rig.on_hopper("flash_attention Hopper warp-specialised kernel") {
        return;
    }
    check_flash_cases(&rig, |_, _| vec![FlashKernel::HopperWs]);
}

/// The ping-pong variant of the warp-specialised kernel (the consumers take turns on the tensor
/// cores through named barriers) at every flash case: causal masks and ragged seq_q give blocks
/// whose second consumer has no rows and only empty turns. After the ws test for the same reason.
/// A named-barrier protocol fault hangs (bar.sync has no timeout): run it under `timeout`.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn flash_attention_sm90_wspp_meets_the_attention_rule() {
    use celframe::ops::attention::FlashKernel;
    let rig = Rig::new();
    if !rig.on_hopper("flash_attention Hopper ping-pong kernel") {
        return;
    }
    check_flash_cases(&rig, |_, _| vec![FlashKernel::HopperWsPingpong]);
}

/// The persistent ping-pong kernel (one block per multiprocessor walking the work tiles, Q
/// double-buffered, the turn chain running across tiles) at every flash case, and at a shape of
/// more work tiles than blocks (b2 x 10 heads x 2304 tokens: 360 tiles), so blocks walk several
/// tiles, some with a ragged or causal end. After the ping-pong test; run it under `timeout` too.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn flash_attention_sm90_wspp_persistent_meets_the_attention_rule() {
    use celframe::ops::attention::FlashKernel;
    let rig = Rig::new();
    if !rig.on_hopper("flash_attention Hopper persistent kernel") {
        return;
    }
    let pick = |_, _| vec![FlashKernel::HopperWsPingpongPersistent];
    check_flash_cases(&rig, pick);
    check_flash(&rig, &[(2, 2304, 2304, 10, false, DType::F16), (3, 1000, 1000, 11, true, DType::F16)], pick);
}

/// The three-consumer persistent ping-pong kernel (192 query rows a work tile, the turns going round
/// three warpgroups, one P buffer) at every flash case, at the UNet's level-2 self-attention shape
/// (576 tokens: three whole tiles), and where blocks walk several work tiles, some with a ragged
/// or causal end.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn flash_attention_sm90_wspp3_meets_the_attention_rule() {
    use celframe::ops::attention::FlashKernel;
    let rig = Rig::new();
    if !rig.on_hopper("flash_attention Hopper three-consumer kernel") {
        return;
    }
    let pick = |_, _| vec![FlashKernel::HopperWsPingpong3Persistent];
    check_flash_cases(&rig, pick);
    let extra = [
        (4, 576, 576, 20, false, DType::F16),
        (3, 2304, 2304, 10, false, DType::BF16),
        (3, 1000, 1000, 11, true, DType::F16),
    ];
    check_flash(&rig, &extra, pick);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn gemm_attention_meets_the_attention_rule() {
    use celframe::ops::attention::{FlashAttention, flash_attention_reference, gemm_attention, gemm_attention_budget};
    let rig = Rig::new();
    // (batch, seq_q, seq_k, heads, head_dim, causal, dtype): the VAE mid-block (one head of 512)
    // at a 512x512 and a 1024x576 image, smaller heads, a causal mask, ragged seq_q, bf16.
    let cases = [
        (1, 4096, 4096, 1, 512, false, DType::F16),
        (1, 9216, 9216, 1, 512, false, DType::F16),
        (2, 1024, 1024, 1, 512, false, DType::BF16),
        (2, 300, 256, 2, 128, false, DType::F16),
        (2, 80, 80, 4, 64, true, DType::F16),
        (3, 77, 96, 3, 40, false, DType::BF16),
        (2, 77, 77, 2, 64, true, DType::F16), // key counts that are not multiples of 8
        (1, 1755, 1755, 1, 512, false, DType::F16), // a 39x45 VAE tile
    ];
    for (batch, sq, sk, heads, d, causal, dtype) in cases {
        let cfg = FlashAttention { heads, causal, scale: 1.0 / (d as f32).sqrt() };
        let c = heads * d;
        let (q, qd) = rig.input(&[batch, sq, c], dtype, 1.0, 0.0);
        let (k, kd) = rig.input(&[batch, sk, c], dtype, 1.0, 0.0);
        let (v, vd) = rig.input(&[batch, sk, c], dtype, 1.0, 0.0);
        let got = rig.gpu.download(&gemm_attention(&rig.exec(), &qd, &kd, &vd, cfg).unwrap()).unwrap();
        let exact = flash_attention_reference(&q, &k, &v, cfg, None, DType::F32).unwrap();
        let plain = flash_attention_reference(&q, &k, &v, cfg, Some(dtype), dtype).unwrap();
        let what = format!("gemm_attention b={batch} sq={sq} sk={sk} h={heads} d={d} causal={causal} {dtype:?}");
        rig.check_attention_rule(&what, &got, &exact, &plain);
    }
    // One image's scores over the budget: its queries go in slices (104 rows here, the last 64).
    let (batch, sq, sk, heads, d, dtype) = (2, 1000, 700, 2, 64, DType::F16);
    let cfg = FlashAttention { heads, causal: false, scale: 1.0 / (d as f32).sqrt() };
    let (q, qd) = rig.input(&[batch, sq, heads * d], dtype, 1.0, 0.0);
    let (k, kd) = rig.input(&[batch, sk, heads * d], dtype, 1.0, 0.0);
    let (v, vd) = rig.input(&[batch, sk, heads * d], dtype, 1.0, 0.0);
    let budget = 110 * 704 * 6; // 110 rows of 704 padded keys, f32 scores + f16 probabilities
    let got = gemm_attention_budget(&rig.exec(), &qd, &kd, &vd, cfg, budget).unwrap();
    let got = rig.gpu.download(&got).unwrap();
    let exact = flash_attention_reference(&q, &k, &v, cfg, None, DType::F32).unwrap();
    let plain = flash_attention_reference(&q, &k, &v, cfg, Some(dtype), dtype).unwrap();
    rig.check_attention_rule("gemm_attention query slices of 104", &got, &exact, &plain);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn profile_files_each_launch_under_its_scope_and_kind() {
    let rig = Rig::new();
    let ex = rig.exec();
    let (_, x) = rig.input(&[4, 1024, 1024], DType::F16, 1.0, 0.0);
    let (_, w) = rig.input(&[1024, 1024], DType::F16, 0.03, 0.0);
    let work = || {
        let y = linear(&ex, &x, &w, None).unwrap();
        {
            let _outer = ex.profile_scope("outer");
            let _ = silu(&ex, &y).unwrap();
            let _inner = ex.profile_scope("inner");
            let _ = scale(&ex, &y, 2.0).unwrap();
            let _ = linear(&ex, &y, &w, None).unwrap();
        }
        let _ = gelu(&ex, &y).unwrap();
    };
    // Once unprofiled first: a bracket also holds the host's time between its events, and the
    // first matmul loads cuBLASLt's kernel module (2 ms seen) while the stream waits.
    work();
    rig.gpu.start_profile();
    work();
    let rows = rig.gpu.finish_profile().unwrap();
    let found = |scope: &str, kind: &str| rows.iter().find(|r| r.scope == scope && r.kind == kind);
    let summary: Vec<_> = rows.iter().map(|r| (r.scope.as_str(), r.kind.as_str(), r.launches)).collect();
    println!("GPUCHECK profile rows {summary:?}");
    // silu, scale and gelu are one kernel family, "elementwise_f16".
    let expected = [
        ("", "gemm"),
        ("outer", "elementwise"),
        ("outer/inner", "elementwise"),
        ("outer/inner", "gemm"),
        ("", "elementwise"),
    ];
    for (scope, kind) in expected {
        let r = found(scope, kind).unwrap_or_else(|| panic!("no ({scope}, {kind}) row in {summary:?}"));
        assert_eq!(r.launches, 1, "{r:?}");
        assert!(r.ms > 0.0 && r.ms < 1000.0, "{r:?}");
    }
    assert_eq!(rows.len(), 5, "{summary:?}");
    // The same 8.6 GFLOP matmul twice: similar times (a loose bound).
    let (a, b) = (found("", "gemm").unwrap().ms, found("outer/inner", "gemm").unwrap().ms);
    assert!(a / b < 4.0 && b / a < 4.0, "gemm {a} ms vs {b} ms");
    assert!(rig.gpu.finish_profile().is_err(), "a second finish must say no profile is open");
    rig.scratch.reset();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn scattered_rows_are_the_twins_bytes() {
    // A ControlNet's residuals of 2 x 5 keyframe rows into the 2 x 16 rows of a CFG video batch
    // (outputs poisoned first: the zero rows must be written).
    let rig = Rig::new();
    let (host, dev) = rig.input(&[10, 36, 64, 320], DType::F16, 1.0, 0.0);
    let to: Vec<usize> = (0..2).flat_map(|v| [0, 4, 8, 11, 15].map(|k| v * 16 + k)).collect();
    let got = celframe::ops::rows::scatter_rows(&rig.exec(), &dev, &to, 32).unwrap();
    let want = celframe::ops::rows::scatter_rows(&Exec::Cpu, &host, &to, 32).unwrap();
    let got = rig.gpu.download(&got).unwrap();
    assert_eq!(got.host_bytes().unwrap(), want.host_bytes().unwrap(), "scatter_rows differs from its twin");
    println!("GPUCHECK scatter_rows [10, 36, 64, 320] -> 32 rows F16: bit-identical");
    rig.scratch.reset();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn gathered_rows_are_the_twins_bytes() {
    // Two distinct embedded hints picked for the 2 x 16 rows of a CFG video batch, in runs and
    // repeats (keyframe 0 held over frames 0-7, keyframe 1 over 8-15).
    let rig = Rig::new();
    let (host, dev) = rig.input(&[3, 36, 64, 320], DType::F16, 1.0, 0.0);
    let from: Vec<usize> = (0..2).flat_map(|_| (0..16).map(|f| if f < 8 { 0 } else { 2 })).collect();
    let got = celframe::ops::rows::gather_rows(&rig.exec(), &dev, &from).unwrap();
    let want = celframe::ops::rows::gather_rows(&Exec::Cpu, &host, &from).unwrap();
    let got = rig.gpu.download(&got).unwrap();
    assert_eq!(got.host_bytes().unwrap(), want.host_bytes().unwrap(), "gather_rows differs from its twin");
    println!("GPUCHECK gather_rows [3, 36, 64, 320] -> 32 rows F16: bit-identical");
    rig.scratch.reset();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn eight_bit_pixels_are_the_twins_bytes() {
    // Two decoded 1024x576 frames with values past [-1, 1] on both sides and a few NaN and
    // infinite ones (counted, written as 0); the bytes are poisoned before the kernel runs.
    let rig = Rig::new();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let (host, _) = rig.input(&[2, 576, 1024, 3], dtype, 1.3, 0.0);
        let mut values = host.to_f32_vec().unwrap();
        for (k, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].into_iter().enumerate() {
            values[1000 * k + 7] = v;
        }
        let host = Tensor::from_f32(host.shape(), dtype, &values).unwrap();
        let dev = rig.gpu.upload(&rig.scratch, &host, dtype).unwrap();
        let got = celframe::ops::rgb8::to_rgb8(&rig.exec(), &dev).unwrap();
        let want = celframe::ops::rgb8::to_rgb8(&Exec::Cpu, &host).unwrap();
        assert_eq!(want.non_finite, 3);
        assert_eq!(got.non_finite, want.non_finite, "{dtype:?} non-finite count");
        assert!(got.bytes == want.bytes, "{dtype:?}: to_rgb8 differs from its twin");
        println!("GPUCHECK to_rgb8 [2, 576, 1024, 3] {dtype:?}: bit-identical, 3 non-finite counted");
        rig.scratch.reset();
    }
}

/// Cross attention of a render's 2 x 16 frames on its 2 text contexts (one per CFG half) at the
/// SDXL 1024x576 attention levels (2304 and 576 tokens): `attention_grouped` against `attention`
/// on the contexts repeated per row, both on the device (the f16 / bf16 tolerance), and against
/// the f64 twin by the attention rule.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn grouped_cross_attention_matches_repeated_contexts() {
    use celframe::ops::attention::{FlashAttention, attention, attention_grouped, flash_attention_reference};
    use celframe::ops::rows::gather_rows;
    let rig = Rig::new();
    let (rows, groups) = (32, 2);
    let from: Vec<usize> = (0..rows).map(|r| r / (rows / groups)).collect();
    for (tokens, heads, keys, dtype) in
        [(2304, 10, 77, DType::F16), (576, 20, 77, DType::F16), (576, 20, 154, DType::BF16)]
    {
        let cfg = FlashAttention { heads, causal: false, scale: 0.125 };
        let c = heads * 64;
        let (q, qd) = rig.input(&[rows, tokens, c], dtype, 1.0, 0.0);
        let (k, kd) = rig.input(&[groups, keys, c], dtype, 1.0, 0.0);
        let (v, vd) = rig.input(&[groups, keys, c], dtype, 1.0, 0.0);
        let ex = rig.exec();
        let grouped = rig.gpu.download(&attention_grouped(&ex, &qd, &kd, &vd, cfg).unwrap()).unwrap();
        let (k_rows, v_rows) = (gather_rows(&ex, &kd, &from).unwrap(), gather_rows(&ex, &vd, &from).unwrap());
        let repeated = rig.gpu.download(&attention(&ex, &qd, &k_rows, &v_rows, cfg).unwrap()).unwrap();
        let what =
            format!("attention_grouped {groups} contexts x {rows} rows sq={tokens} sk={keys} h={heads} {dtype:?}");
        let (rel, max) = assert_close(&what, &grouped, &repeated, tol(dtype));
        println!("GPUCHECK {what} vs repeated contexts: rel_l2={rel:.2e} max_abs={max:.2e} tol={:.0e}", tol(dtype));
        let (k, v) = (gather_rows(&Exec::Cpu, &k, &from).unwrap(), gather_rows(&Exec::Cpu, &v, &from).unwrap());
        let exact = flash_attention_reference(&q, &k, &v, cfg, None, DType::F32).unwrap();
        let plain = flash_attention_reference(&q, &k, &v, cfg, Some(dtype), dtype).unwrap();
        rig.check_attention_rule(&what, &grouped, &exact, &plain);
    }
}

// ---- q, k, v as column blocks of a fused projection's output (ops::attention::Columns)

/// Columns `first..first + width` of every row of the host tensor `t`, as a tensor of their own.
fn columns_copy(t: &Tensor, first: usize, width: usize) -> Tensor {
    let stride = *t.shape().last().unwrap();
    let values: Vec<f32> =
        t.to_f32_vec().unwrap().chunks(stride).flat_map(|row| row[first..first + width].to_vec()).collect();
    let mut shape = t.shape().to_vec();
    *shape.last_mut().unwrap() = width;
    Tensor::from_f32(&shape, t.dtype(), &values).unwrap()
}

/// `got` and `want` (device tensors) hold the same bytes.
fn assert_same_bytes(rig: &Rig, what: &str, got: &Tensor, want: &Tensor) {
    let (got, want) = (rig.gpu.download(got).unwrap(), rig.gpu.download(want).unwrap());
    assert_eq!(got.shape(), want.shape(), "{what}");
    assert!(got.host_bytes().unwrap() == want.host_bytes().unwrap(), "{what}: differs from contiguous inputs");
    println!("GPUCHECK {what}: column blocks bit-identical to contiguous inputs");
}

/// Every flash kernel on q, k, v read as column blocks of one [B, L, 3C] tensor (row stride 3C,
/// offsets 0, C, 2C), and on k, v as column blocks of one [G, T, 2C] (cross attention), against
/// the same values copied into contiguous tensors: the same kernel does the same arithmetic on the
/// same values, so the results are expected bit-identical.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn flash_attention_on_column_blocks_matches_contiguous_inputs_bit_for_bit() {
    use celframe::ops::attention::{Columns, FlashAttention, FlashKernel, flash_attention_with};
    let rig = Rig::new();
    let mut kernels = vec![FlashKernel::Auto, FlashKernel::Portable];
    if rig.on_hopper("flash_attention on column blocks, Hopper kernels") {
        kernels.extend([FlashKernel::Hopper, FlashKernel::HopperWs]);
    }
    let ex = rig.exec();
    // Self attention: (batch, tokens, heads, causal, dtype) at the 1024x576 levels, a ragged
    // causal case, bf16.
    for (batch, seq, heads, causal, dtype) in
        [(2, 2304, 10, false, DType::F16), (2, 576, 20, false, DType::F16), (1, 300, 3, true, DType::BF16)]
    {
        let c = heads * 64;
        let cfg = FlashAttention { heads, causal, scale: 0.125 };
        let (qkv_host, qkv) = rig.input(&[batch, seq, 3 * c], dtype, 1.0, 0.0);
        let [q, k, v] = Columns::split(&qkv).unwrap();
        let up = |i: usize| rig.gpu.upload(&rig.weights, &columns_copy(&qkv_host, i * c, c), dtype).unwrap();
        let (qc, kc, vc) = (up(0), up(1), up(2));
        for &kernel in &kernels {
            let what = format!("flash_attention {kernel:?} qkv b={batch} l={seq} h={heads} causal={causal} {dtype:?}");
            let got = flash_attention_with(&ex, q.clone(), k.clone(), v.clone(), cfg, kernel).unwrap();
            let want = flash_attention_with(&ex, &qc, &kc, &vc, cfg, kernel).unwrap();
            assert_same_bytes(&rig, &what, &got, &want);
        }
    }
    // Cross attention: (contexts, queries per context, keys, heads, dtype); the short-key kernel
    // is Auto's route, the others are forced.
    for (groups, seq, keys, heads, dtype) in [(2, 2304, 77, 10, DType::F16), (2, 576, 154, 20, DType::BF16)] {
        let c = heads * 64;
        let cfg = FlashAttention { heads, causal: false, scale: 0.125 };
        let (_, q) = rig.input(&[groups, seq, c], dtype, 1.0, 0.0);
        let (kv_host, kv) = rig.input(&[groups, keys, 2 * c], dtype, 1.0, 0.0);
        let [k, v] = Columns::split(&kv).unwrap();
        let up = |i: usize| rig.gpu.upload(&rig.weights, &columns_copy(&kv_host, i * c, c), dtype).unwrap();
        let (kc, vc) = (up(0), up(1));
        for &kernel in &kernels {
            let what = format!("flash_attention {kernel:?} kv g={groups} l={seq} keys={keys} h={heads} {dtype:?}");
            let got = flash_attention_with(&ex, &q, k.clone(), v.clone(), cfg, kernel).unwrap();
            let want = flash_attention_with(&ex, &q, &kc, &vc, cfg, kernel).unwrap();
            assert_same_bytes(&rig, &what, &got, &want);
        }
    }
    // A block that starts off a 16-byte boundary is refused by name, not read misaligned.
    let (_, x) = rig.input(&[1, 64, 3 * 128], DType::F16, 1.0, 0.0);
    let odd = Columns::new(&x, 4, 128).unwrap();
    let cfg = FlashAttention { heads: 2, causal: false, scale: 0.125 };
    let r = flash_attention_with(&ex, odd.clone(), odd.clone(), odd, cfg, FlashKernel::Portable);
    assert!(matches!(&r, Err(celframe::Error::Unsupported(m)) if m.contains("16-byte")), "{r:?}");
    rig.scratch.reset();
}

/// Temporal attention on q, k, v read as column blocks of one [B*F, H, W, 3C] tensor against the
/// same values in contiguous tensors: bit-identical expected (same kernel, same values).
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn temporal_attention_on_column_blocks_matches_contiguous_inputs_bit_for_bit() {
    use celframe::ops::attention::{Columns, TemporalAttention, temporal_attention};
    let rig = Rig::new();
    let ex = rig.exec();
    // The motion modules' first and last levels of a 2x16-frame 1024x576 batch, 32 frames, bf16.
    let cases: &[(&[usize], usize, DType)] = &[
        (&[32, 72, 128, 320], 16, DType::F16),
        (&[32, 18, 32, 1280], 16, DType::F16),
        (&[32, 16, 16, 640], 32, DType::F16),
        (&[24, 9, 7, 320], 12, DType::BF16),
    ];
    for &(shape, frames, dtype) in cases {
        let c = shape[3];
        let cfg = TemporalAttention { frames, heads: 8, scale: 1.0 / ((c / 8) as f32).sqrt() };
        let fused_shape = [shape[0], shape[1], shape[2], 3 * c];
        let (qkv_host, qkv) = rig.input(&fused_shape, dtype, 1.0, 0.0);
        let [q, k, v] = Columns::split(&qkv).unwrap();
        let up = |i: usize| rig.gpu.upload(&rig.weights, &columns_copy(&qkv_host, i * c, c), dtype).unwrap();
        let (qc, kc, vc) = (up(0), up(1), up(2));
        let got = temporal_attention(&ex, q, k, v, cfg).unwrap();
        let want = temporal_attention(&ex, &qc, &kc, &vc, cfg).unwrap();
        assert_same_bytes(&rig, &format!("temporal_attention qkv frames={frames} {shape:?} {dtype:?}"), &got, &want);
        rig.scratch.reset();
    }
}

/// GEMM attention (head dims other than 64) on q, k, v read as column blocks of one [B, L, 3C]
/// tensor, by the attention rule against the f64 twin on the same blocks (cuBLASLt may pick
/// another algorithm for the wider leading dimension, so bit identity is not expected here).
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn gemm_attention_on_column_blocks_meets_the_attention_rule() {
    use celframe::ops::attention::{Columns, FlashAttention, flash_attention_reference, gemm_attention};
    let rig = Rig::new();
    for (batch, seq, heads, d, dtype) in [(2, 300, 2, 128, DType::F16), (3, 77, 3, 40, DType::BF16)] {
        let c = heads * d;
        let cfg = FlashAttention { heads, causal: false, scale: 1.0 / (d as f32).sqrt() };
        let (qkv_host, qkv) = rig.input(&[batch, seq, 3 * c], dtype, 1.0, 0.0);
        let [q, k, v] = Columns::split(&qkv).unwrap();
        let [qh, kh, vh] = Columns::split(&qkv_host).unwrap();
        let got = rig.gpu.download(&gemm_attention(&rig.exec(), q, k, v, cfg).unwrap()).unwrap();
        let exact = flash_attention_reference(qh.clone(), kh.clone(), vh.clone(), cfg, None, DType::F32).unwrap();
        let plain = flash_attention_reference(qh, kh, vh, cfg, Some(dtype), dtype).unwrap();
        let what = format!("gemm_attention qkv b={batch} l={seq} h={heads} d={d} {dtype:?}");
        rig.check_attention_rule(&what, &got, &exact, &plain);
    }
}
