//! Kernel benchmarks on the GPU: CUDA-event timing, warm-up, median of many runs, inputs rotated
//! between two buffers. Prints one `BENCH {json}` line per entry; tools/report.py pairs them with
//! tools/peer_torch.py's `PEER` lines from the same GPU run. Needs a GPU (tools/gpu_run.sh).
//! CELFRAME_BENCH_FILTER=text runs only the entries whose key contains the text (for profiling).

use celframe::gpu::params::{LORA_SHARED_BYTES, LORA_THREADS};
use celframe::gpu::timing::time_gpu;
use celframe::gpu::{Arena, ClusterScheduling, Gpu, nvtx};
use celframe::ops::Exec;
use celframe::ops::attention::{
    Columns, FlashAttention, FlashKernel, TemporalAttention, TemporalAttentionTuning, flash_attention_with,
    gemm_attention, temporal_attention, temporal_attention_tuned,
};
use celframe::ops::concat::concat_last;
use celframe::ops::conv::{Conv2d, conv2d, conv2d_residual_fused};
use celframe::ops::elementwise::{add, geglu, geglu_fp8, residual_add};
use celframe::ops::fp8::{Fp8Scaling, gemm_fp8, linear_fp8, quantize};
use celframe::ops::linear::{GegluLinear, LinearWeight, linear, linear_add, linear_geglu_with};
use celframe::ops::lora::{DeltaFactors, DeltaTerm, LayerDelta, merge_deltas, merge_gemm};
use celframe::ops::norm::{
    GroupNorm, GroupNormMode, GroupNormTuning, group_norm, group_norm_concat, group_norm_layout, group_norm_of_biased,
    group_norm_tuned, layer_norm, layer_norm_add, layer_norm_fp8, layer_norm_shifted,
};
use celframe::ops::random::random_uniform;
use celframe::ops::upsample::{upsample_nearest2x, upsample2x_conv3x3};
use celframe::sampling::NoiseStream;
use celframe::tensor::Storage;
use celframe::{DType, Result, Tensor};

const WARMUP: usize = 10;
const RUNS: usize = 50;

/// Whether CELFRAME_BENCH_FILTER (if set) selects the entry `key`: it contains one of the filter's
/// '|'-separated pieces.
fn selected(key: &str) -> bool {
    std::env::var("CELFRAME_BENCH_FILTER").map_or(true, |filter| filter.split('|').any(|piece| key.contains(piece)))
}

struct Bench {
    gpu: Gpu,
    inputs: Arena,
    scratch: Arena,
}

impl Bench {
    fn random(&self, shape: &[usize], dtype: DType, seed: u32) -> Result<Tensor> {
        self.random_in(&self.inputs, shape, dtype, seed)
    }

    /// `random`, in `arena` (inputs of a section that frees them after): uniforms in [-2, 2]
    /// drawn on the device (`ops::random`, stream `seed`). Drawn on the host and uploaded, the
    /// inputs took most of a filtered run's ~30 s of device time, whichever entries it kept.
    fn random_in(&self, arena: &Arena, shape: &[usize], dtype: DType, seed: u32) -> Result<Tensor> {
        let ex = Exec::Cuda { gpu: &self.gpu, scratch: arena };
        random_uniform(&ex, NoiseStream::new(u64::from(seed), 0), 0, shape, dtype, -2.0, 2.0)
    }

    /// Times `f(input k % 2)` and prints the entry. `bytes` is the minimum traffic, `flop` the arithmetic.
    fn run(&self, name: &str, key: &str, bytes: f64, flop: f64, mut f: impl FnMut(usize) -> Result<()>) -> Result<()> {
        if !selected(key) {
            return Ok(());
        }
        let _range = nvtx::range(key);
        let mut k = 0;
        let t = time_gpu(&self.gpu, WARMUP, RUNS, || {
            k += 1;
            let r = f(k % 2);
            self.scratch.reset();
            r
        })?;
        let ms = t.median_ms();
        println!(
            "BENCH {{\"name\":\"{name}\",\"key\":\"{key}\",\"ms\":{ms:.5},\"min_ms\":{:.5},\"gbps\":{:.1},\"tflops\":{:.1}}}",
            t.min_ms(),
            bytes / ms / 1e6,
            flop / ms / 1e9
        );
        Ok(())
    }
}

fn main() -> Result<()> {
    let gpu = Gpu::from_env()?;
    let info = gpu.info().clone();
    println!(
        "BENCHDEVICE {{\"name\":\"{}\",\"sms\":{},\"l2_mb\":{}}}",
        info.name,
        info.multiprocessors,
        info.l2_bytes >> 20
    );
    let b = Bench { inputs: Arena::new("bench inputs", 8 << 30)?, scratch: Arena::new("bench scratch", 8 << 30)?, gpu };
    let ex = Exec::Cuda { gpu: &b.gpu, scratch: &b.scratch };

    // Group norm (+SiLU), NHWC, at the SDXL video shapes of a 2x16-frame 1024x576 CFG batch.
    let gn_cases: &[(&str, [usize; 4], bool, usize, DType)] = &[
        ("group_norm_silu", [32, 72, 128, 320], true, 1, DType::F16),
        ("group_norm", [32, 72, 128, 320], false, 1, DType::F16),
        ("group_norm_silu", [32, 36, 64, 640], true, 1, DType::F16),
        ("group_norm_silu", [32, 18, 32, 1280], true, 1, DType::F16),
        ("group_norm_frames16", [32, 72, 128, 320], false, 16, DType::F16),
        ("group_norm_silu", [32, 72, 128, 320], true, 1, DType::BF16),
    ];
    for &(name, [n, h, w, c], silu, frames, dtype) in gn_cases {
        let xs = [b.random(&[n, h, w, c], dtype, 1)?, b.random(&[n, h, w, c], dtype, 2)?];
        let (g, be) = (b.random(&[c], dtype, 3)?, b.random(&[c], dtype, 4)?);
        let cfg = GroupNorm { groups: 32, eps: 1e-5, silu, frames };
        let bytes = 2.0 * xs[0].size_bytes() as f64;
        let key = format!("{name} {} N{n} C{c} H{h} W{w}", dtype.kernel_suffix());
        b.run(name, &key, bytes, 0.0, |k| {
            group_norm_tuned(&ex, &xs[k], &g, &be, cfg, GroupNormTuning::default()).map(drop)
        })?;
        println!("LAYOUT {key}: {}", group_norm_layout(&b.gpu, &[n, h, w, c], dtype, cfg, GroupNormTuning::default())?);
    }

    // An up block's ResNet norm1 on [h, skip] (b32 1024x576, the levels' widest concatenations no
    // upsampler writes): read from the two parts with the concatenation written beside the norm
    // (read x, write y and [h, skip]: 3 sizes) against concat_last then the norm (4: the copy's
    // read and write, the norm's read and write).
    for [n, h, w, ch, cs] in [[32, 18, 32, 1280, 1280], [32, 36, 64, 640, 640], [32, 72, 128, 320, 320]] {
        let parts = [
            [b.random(&[n, h, w, ch], DType::F16, 11)?, b.random(&[n, h, w, cs], DType::F16, 12)?],
            [b.random(&[n, h, w, ch], DType::F16, 13)?, b.random(&[n, h, w, cs], DType::F16, 14)?],
        ];
        let (g, be) = (b.random(&[ch + cs], DType::F16, 15)?, b.random(&[ch + cs], DType::F16, 16)?);
        let cfg = GroupNorm { groups: 32, eps: 1e-5, silu: true, frames: 1 };
        let size = (n * h * w * (ch + cs) * 2) as f64;
        let label = format!("N{n} C{ch}+{cs} H{h} W{w}");
        b.run("group_norm_concat", &format!("group_norm_concat parts {label}"), 3.0 * size, 0.0, |k| {
            group_norm_concat(&ex, &parts[k][0], &parts[k][1], &g, &be, cfg).map(drop)
        })?;
        b.run("group_norm_concat", &format!("group_norm_concat copy first {label}"), 4.0 * size, 0.0, |k| {
            group_norm(&ex, &concat_last(&ex, &parts[k][0], &parts[k][1])?, &g, &be, cfg).map(drop)
        })?;
    }

    // Kernel and work-layout sweeps: the cluster kernel's block size at the three
    // UNet levels, the two-phase kernel at the headline shape.
    for (shape, label) in [
        ([32, 72, 128, 320], "N32 C320 H72 W128"),
        ([32, 36, 64, 640], "N32 C640 H36 W64"),
        ([32, 18, 32, 1280], "N32 C1280 H18 W32"),
    ] {
        let c = shape[3];
        let xs = [b.random(&shape, DType::F16, 5)?, b.random(&shape, DType::F16, 6)?];
        let (g, be) = (b.random(&[c], DType::F16, 7)?, b.random(&[c], DType::F16, 8)?);
        let cfg = GroupNorm { groups: 32, eps: 1e-5, silu: true, frames: 1 };
        let mut layouts = vec![];
        for (cluster, rows, balanced) in
            [(16, 0, false), (16, 0, true), (16, 24, false), (16, 40, false), (8, 0, false), (8, 0, true)]
        {
            let tuning = GroupNormTuning {
                mode: GroupNormMode::Cluster(cluster),
                cluster_rows: rows,
                cluster_scheduling: if balanced { ClusterScheduling::LoadBalancing } else { ClusterScheduling::Spread },
                ..Default::default()
            };
            let scheduling = if balanced { " balanced" } else { "" };
            layouts.push((format!("cluster{cluster} rows{rows}{scheduling}"), tuning));
        }
        if c == 320 {
            for blocks_per_sm in [2, 4] {
                for lag in [1, 3] {
                    let mode = GroupNormMode::TwoPhase;
                    layouts.push((
                        format!("two-phase bps{blocks_per_sm} lag{lag}"),
                        GroupNormTuning { mode, blocks_per_sm, lag, ..Default::default() },
                    ));
                }
            }
        }
        for (layout, tuning) in layouts {
            let key = format!("sweep group_norm_silu f16 {label} {layout}");
            let run = b.run("group_norm_sweep", &key, 2.0 * xs[0].size_bytes() as f64, 0.0, |k| {
                group_norm_tuned(&ex, &xs[k], &g, &be, cfg, tuning).map(drop)
            });
            // A layout this GPU cannot run (clusters before sm_90) is reported, not fatal.
            match run {
                Ok(()) => println!("LAYOUT {key}: {}", group_norm_layout(&b.gpu, &shape, DType::F16, cfg, tuning)?),
                Err(e) => println!("SKIPPED {key}: {e}"),
            }
        }
    }

    // Temporal (motion-module) attention: 8 heads over 16 frames per pixel, NHWC in and out.
    for (h, w, c) in [(72usize, 128usize, 320usize), (36, 64, 640), (18, 32, 1280)] {
        let shape = [32, h, w, c];
        let qkv: Vec<Tensor> = (0..6).map(|i| b.random(&shape, DType::F16, 20 + i)).collect::<Result<_>>()?;
        let cfg = TemporalAttention { frames: 16, heads: 8, scale: 1.0 / ((c / 8) as f32).sqrt() };
        let bytes = 4.0 * qkv[0].size_bytes() as f64;
        let flop = 4.0 * (2 * h * w * 8) as f64 * 16.0 * 16.0 * (c / 8) as f64;
        let key = format!("temporal_attention f16 N32 C{c} H{h} W{w}");
        b.run("temporal_attention", &key, bytes, flop, |k| {
            temporal_attention(&ex, &qkv[3 * k], &qkv[3 * k + 1], &qkv[3 * k + 2], cfg).map(drop)
        })?;
    }

    let shape = [32, 72, 128, 320];
    let qkv: Vec<Tensor> = (0..6).map(|i| b.random(&shape, DType::F16, 30 + i)).collect::<Result<_>>()?;
    let cfg = TemporalAttention { frames: 16, heads: 8, scale: 1.0 / (40f32).sqrt() };
    for warps_per_block in [2, 4, 8] {
        let key = format!("sweep temporal_attention f16 N32 C320 H72 W128 warps{warps_per_block}");
        let tuning = TemporalAttentionTuning { warps_per_block };
        b.run("temporal_sweep", &key, 4.0 * qkv[0].size_bytes() as f64, 0.0, |k| {
            temporal_attention_tuned(&ex, &qkv[3 * k], &qkv[3 * k + 1], &qkv[3 * k + 2], cfg, tuning).map(drop)
        })?;
    }

    // Flash attention, head dim 64: SDXL self attention (64x36 latent tokens at 1024x576 level 1, 32x18
    // at level 2, 64x64 for a 1024x1024 image; the general kernel) and cross attention over 77, 154
    // and 231 prompt tokens (one to three 77-token chunks; the short-key kernels) at both levels, for
    // 32 images 1024x576 and 2 images 1024x1024 (whose grids are a wave or two).
    let shapes = [
        (32usize, 2304usize, 2304usize, 10usize),
        (32, 576, 576, 20),
        (2, 4096, 4096, 10),
        (32, 2304, 77, 10),
        (32, 2304, 154, 10),
        (32, 2304, 231, 10),
        (32, 576, 77, 20),
        (2, 4096, 77, 10),
        (2, 1024, 77, 20),
    ];
    let mut sets = Vec::new();
    for (batch, sq, sk, heads) in shapes {
        let (qn, kn) = ([batch, sq, heads * 64], [batch, sk, heads * 64]);
        let t: Vec<Tensor> = (0..6)
            .map(|i| b.random(if i % 3 == 0 { &qn } else { &kn }, DType::F16, 40 + i as u32))
            .collect::<Result<_>>()?;
        sets.push(t);
    }
    // The default route; then the same work through the kernels it does not take: the portable
    // kernel and the short-key kernel of 32-query slices where the short-key one runs, and last (a
    // fault there ends the run) the Hopper kernels (cp.async, warp-specialised TMA, and the latter
    // with ping-pong consumers, one block per tile and persistent) on devices of compute 9.0.
    // SDPA's time is the plain key's peer.
    let mut routes = vec![
        ("", FlashKernel::Auto),
        ("portable ", FlashKernel::Portable),
        ("short-rows32 ", FlashKernel::ShortRows32),
    ];
    if b.gpu.info().compute_capability == (9, 0) {
        routes.push(("sm90 ", FlashKernel::Hopper));
        routes.push(("sm90ws ", FlashKernel::HopperWs));
        routes.push(("sm90wspp ", FlashKernel::HopperWsPingpong));
        routes.push(("sm90wspp-persistent ", FlashKernel::HopperWsPingpongPersistent));
        routes.push(("sm90wspp3-persistent ", FlashKernel::HopperWsPingpong3Persistent));
    }
    for (label, kernel) in routes {
        for ((batch, sq, sk, heads), t) in shapes.iter().copied().zip(&sets) {
            if kernel == FlashKernel::Portable && sk > 256 {
                continue; // the default route's kernel already
            }
            if kernel == FlashKernel::ShortRows32 && sk > 80 {
                continue; // the default route's kernel already (16-query slices from 81 keys on)
            }
            let cfg = FlashAttention { heads, causal: false, scale: 0.125 };
            let flop = 4.0 * (batch * heads * sq * sk * 64) as f64;
            let bytes = (2 * t[0].size_bytes() + 2 * t[1].size_bytes()) as f64;
            let key = format!("flash_attention {label}f16 b{batch} h{heads} sq{sq} sk{sk}");
            b.run("flash_attention", &key, bytes, flop, |k| {
                flash_attention_with(&ex, &t[3 * k], &t[3 * k + 1], &t[3 * k + 2], cfg, kernel).map(drop)
            })?;
        }
    }

    // Self-attention as the models run it: q, k and v column blocks of one fused projection's
    // [batch, tokens, 3 C] rows (each token's head slices 3 C apart), the default route.
    for (batch, tokens, heads) in [(32usize, 2304usize, 10usize), (32, 576, 20), (2, 4096, 10)] {
        let qkv: Vec<Tensor> =
            (0..2).map(|i| b.random(&[batch, tokens, 3 * heads * 64], DType::F16, 60 + i)).collect::<Result<_>>()?;
        let split: Vec<[Columns; 3]> = qkv.iter().map(Columns::split::<3>).collect::<Result<_>>()?;
        let cfg = FlashAttention { heads, causal: false, scale: 0.125 };
        let flop = 4.0 * (batch * heads * tokens * tokens * 64) as f64;
        let key = format!("flash_attention fused-qkv f16 b{batch} h{heads} sq{tokens} sk{tokens}");
        b.run("flash_attention", &key, 4.0 / 3.0 * qkv[0].size_bytes() as f64, flop, |k| {
            let [q, kk, v] = split[k].clone();
            flash_attention_with(&ex, q, kk, v, cfg, FlashKernel::Auto).map(drop)
        })?;
    }

    // Attention through cuBLASLt + softmax: the VAE mid-block, one head of 512 over the latent
    // pixels of a 1024x576 frame (72x128) and of a 1024x1024 image (128x128).
    for (batch, tokens) in [(4usize, 9216usize), (1, 16384)] {
        let shape = [batch, tokens, 512];
        let t: Vec<Tensor> = (0..6).map(|i| b.random(&shape, DType::F16, 50 + i)).collect::<Result<_>>()?;
        let cfg = FlashAttention { heads: 1, causal: false, scale: 1.0 / (512f32).sqrt() };
        let flop = 4.0 * (batch * tokens * tokens * 512) as f64;
        let key = format!("gemm_attention f16 b{batch} h1 d512 s{tokens}");
        b.run("gemm_attention", &key, 4.0 * t[0].size_bytes() as f64, flop, |k| {
            gemm_attention(&ex, &t[3 * k], &t[3 * k + 1], &t[3 * k + 2], cfg).map(drop)
        })?;
    }

    // Fused memory-bound passes at the three UNet levels of 2 videos x 16 frames at 1024x576, each
    // beside the passes it replaces. A ResNet's tail: conv2's and the shortcut's bias passes and the
    // residual add (7 tensor reads and writes) against residual_add (3). The motion modules'
    // LayerNorm with the position rows added in its pass (2) against LayerNorm then add (4).
    for (h, w, c) in [(72usize, 128usize, 320usize), (36, 64, 640), (18, 32, 1280)] {
        let (shape, label) = ([32, h, w, c], format!("f16 N32 C{c} H{h} W{w}"));
        let t: Vec<Tensor> = (0..4).map(|i| b.random(&shape, DType::F16, 60 + i)).collect::<Result<_>>()?;
        let (b2, bs) = (b.random(&[c], DType::F16, 64)?, b.random(&[c], DType::F16, 65)?);
        let size = t[0].size_bytes() as f64;
        b.run("resnet_tail_fused", &format!("resnet_tail fused {label}"), 3.0 * size, 0.0, |k| {
            residual_add(&ex, &t[2 * k], &t[2 * k + 1], &b2, Some(&bs), 1.0).map(drop)
        })?;
        b.run("resnet_tail_unfused", &format!("resnet_tail unfused {label}"), 7.0 * size, 0.0, |k| {
            let h = add(&ex, &t[2 * k], &b2, 1.0)?;
            let s = add(&ex, &t[2 * k + 1], &bs, 1.0)?;
            add(&ex, &s, &h, 1.0).map(drop)
        })?;
        let tokens = [32, h * w, c];
        let xs = [t[0].reshape(&tokens)?, t[1].reshape(&tokens)?];
        let (g, be, pe) =
            (b.random(&[c], DType::F16, 66)?, b.random(&[c], DType::F16, 67)?, b.random(&[32, c], DType::F16, 68)?);
        let key = format!("layer_norm_add fused {label}");
        b.run("layer_norm_add_fused", &key, 2.0 * size, 0.0, |k| {
            layer_norm_add(&ex, &xs[k], Some(&g), Some(&be), 1e-5, Some(&pe)).map(drop)
        })?;
        let key = format!("layer_norm_add unfused {label}");
        b.run("layer_norm_add_unfused", &key, 4.0 * size, 0.0, |k| {
            add(&ex, &layer_norm(&ex, &xs[k], Some(&g), Some(&be), 1e-5)?, &pe, 1.0).map(drop)
        })?;
        // The same with the stream's pending output biases added first (the motion modules).
        let key = format!("layer_norm_add shifted {label}");
        b.run("layer_norm_add_fused", &key, 2.0 * size, 0.0, |k| {
            layer_norm_shifted(&ex, &xs[k], Some(&b2), Some(&g), Some(&be), 1e-5, Some(&pe)).map(drop)
        })?;
        // A UNet ResNet's norm2 (+ SiLU) of conv1's output and the time embedding, one row per
        // image: the embedding added inside the norm (2) against the add pass first (4).
        let gn = GroupNorm { groups: 32, eps: 1e-5, silu: true, frames: 1 };
        let temb = b.random(&[32, c], DType::F16, 69)?;
        b.run("group_norm_biased", &format!("group_norm_silu time embedding inside {label}"), 2.0 * size, 0.0, |k| {
            group_norm_of_biased(&ex, &t[2 * k], &temb, &g, &be, gn).map(drop)
        })?;
        b.run(
            "group_norm_biased",
            &format!("group_norm_silu time embedding added first {label}"),
            4.0 * size,
            0.0,
            |k| group_norm(&ex, &add(&ex, &t[2 * k], &temb, 1.0)?, &g, &be, gn).map(drop),
        )?;
    }

    // cuDNN convolutions and cuBLASLt linears at UNet shapes, for the record (issue: conv choice);
    // then the b32 UNet's conv_in (4 -> 320) and conv_out (320 -> 4), beside the same with 8
    // channels (zero-padded: 16-byte pixels), a downsampler (stride 2), and the VAE decoder's
    // conv_in (4 -> 512) and conv_out (128 -> 3) on a chunk of 8 frames at 1024x576.
    let convs = [
        (2usize, 128usize, 128usize, 320usize, 320usize, 1usize),
        (2, 64, 64, 640, 640, 1),
        (2, 32, 32, 1280, 1280, 1),
        (32, 72, 128, 4, 320, 1),
        (32, 72, 128, 8, 320, 1),
        (32, 72, 128, 320, 4, 1),
        (32, 72, 128, 320, 8, 1),
        (32, 72, 128, 320, 320, 2),
        (8, 72, 128, 4, 512, 1),
        (8, 576, 1024, 128, 3, 1),
    ];
    for (n, h, w, ci, co, stride) in convs {
        let key = format!("conv3x3 f16 N{n} C{ci} H{h} W{w} K{co}{}", if stride > 1 { " s2" } else { "" });
        if !selected(&key) {
            continue;
        }
        let xs = [b.random(&[n, h, w, ci], DType::F16, 9)?, b.random(&[n, h, w, ci], DType::F16, 10)?];
        let (wt, bias) = (b.random(&[co, 3, 3, ci], DType::F16, 11)?, b.random(&[co], DType::F16, 12)?);
        let flop = 2.0 * (n * h.div_ceil(stride) * w.div_ceil(stride) * co * ci * 9) as f64;
        b.run("conv3x3", &key, 0.0, flop, |k| {
            conv2d(&ex, &xs[k], &wt, Some(&bias), Conv2d { stride, padding: 1 }).map(drop)
        })?;
    }
    // A ResNet's conv2 and tail: the 3x3 convolution then the residual_add pass (z and the summed
    // bias), against one cudnnConvolutionBiasActivationForward call adding both before its one
    // rounding (`conv2d_residual`, IMPLICIT_PRECOMP_GEMM). The UNet's three levels at 32 images
    // 1024x576 and the VAE decoder's 512- and 128-wide levels at 8 frames; both credited the
    // convolution's FLOPs. Inputs of their own per shape (the VAE's largest are 1.2 GB each).
    for (n, h, w, c) in [
        (32usize, 72usize, 128usize, 320usize),
        (32, 36, 64, 640),
        (32, 18, 32, 1280),
        (8, 144, 256, 512),
        (8, 576, 1024, 128),
    ] {
        let key = format!("conv_residual f16 N{n} H{h} W{w} C{c}");
        let (pass_key, fused_key) = (format!("{key} pass"), format!("{key} fused"));
        if !selected(&pass_key) && !selected(&fused_key) {
            continue;
        }
        let elements = n * h * w * c;
        let arena = Arena::new("conv_residual bench inputs", 2 * (3 * elements + 9 * c * c + c) + (4 << 20))?;
        let random = |shape: &[usize], seed| b.random_in(&arena, shape, DType::F16, seed);
        let xs = [random(&[n, h, w, c], 71)?, random(&[n, h, w, c], 72)?];
        let (wt, z, bias) = (random(&[c, 3, 3, c], 73)?, random(&[n, h, w, c], 74)?, random(&[c], 75)?);
        let same = Conv2d { stride: 1, padding: 1 };
        let flop = 2.0 * (elements * c * 9) as f64;
        b.run("conv_residual", &pass_key, 0.0, flop, |k| {
            let y = conv2d(&ex, &xs[k], &wt, None, same)?;
            residual_add(&ex, &y, &z, &bias, None, 1.0).map(drop)
        })?;
        if !selected(&fused_key) {
            continue;
        }
        // A shape cuDNN refuses is reported, never timed under the fused name (its fallback is the
        // pass route above).
        let fused = conv2d_residual_fused(&ex, &xs[0], &wt, &z, &bias, same)?.is_some();
        b.scratch.reset();
        if !fused {
            println!("SKIPPED {fused_key}: cuDNN refused the fused form");
            continue;
        }
        b.run("conv_residual", &fused_key, 0.0, flop, |k| {
            conv2d_residual_fused(&ex, &xs[k], &wt, &z, &bias, same)?
                .map(drop)
                .ok_or_else(|| celframe::Error::Internal(format!("{fused_key}: cuDNN refused a call it took before")))
        })?;
    }
    // Upsample2D (nearest 2x, then a 3x3 conv with bias) at the VAE's shapes (a chunk of 8 frames at
    // 1024x576) and the UNet's (32 images): composed as upsample + conv + bias pass, and in the
    // sub-pixel form the models run. Both are credited the composed form's 9-tap FLOPs.
    for (n, h, w, c) in [
        (8usize, 72usize, 128usize, 512usize),
        (8, 144, 256, 512),
        (8, 288, 512, 256),
        (32, 18, 32, 1280),
        (32, 36, 64, 640),
    ] {
        let xs = [b.random(&[n, h, w, c], DType::F16, 17)?, b.random(&[n, h, w, c], DType::F16, 18)?];
        let (wt, bias) = (b.random(&[c, 3, 3, c], DType::F16, 19)?, b.random(&[c], DType::F16, 20)?);
        let flop = 2.0 * (n * 4 * h * w * c * c * 9) as f64;
        let key = format!("upsample_conv3x3 f16 N{n} C{c} H{h} W{w}");
        b.run("upsample_conv3x3", &format!("{key} composed"), 0.0, flop, |k| {
            let up = upsample_nearest2x(&ex, &xs[k])?;
            conv2d(&ex, &up, &wt, Some(&bias), Conv2d { stride: 1, padding: 1 }).map(drop)
        })?;
        b.run("upsample_conv3x3", &format!("{key} subpixel"), 0.0, flop, |k| {
            upsample2x_conv3x3(&ex, &xs[k], &wt, Some(&bias)).map(drop)
        })?;
    }
    // The motion modules' level-0 projections (2 x 16 frames x 72 x 128 tokens) at their real M, and
    // the GEGLU projections' GEMMs alone (UNet b32 levels 1 and 2).
    for (m, kdim, ndim) in [
        (8192usize, 640usize, 640usize),
        (2048, 1280, 10240),
        (65536, 320, 320),
        (294912, 320, 320),
        (294912, 320, 960),
        (294912, 1280, 320),
        (73728, 640, 5120),
        (18432, 1280, 10240),
    ] {
        let xs = [b.random(&[m, kdim], DType::F16, 13)?, b.random(&[m, kdim], DType::F16, 14)?];
        let (wt, bias) = (b.random(&[ndim, kdim], DType::F16, 15)?, b.random(&[ndim], DType::F16, 16)?);
        let key = format!("linear f16 M{m} K{kdim} N{ndim}");
        b.run("linear", &key, 0.0, 2.0 * (m * kdim * ndim) as f64, |k| {
            linear(&ex, &xs[k], &wt, Some(&bias)).map(drop)
        })?;
    }
    // What cuBLASLt's epilogue costs at the shapes of the linears that end on the residual stream
    // (to_out, proj_out and ff.net.2 at the UNet's b32 levels 2 and 1 and the motion modules' level
    // 0): the same GEMM bare, with the bias, with the residual (C, beta 1) and with both.
    for (m, kdim, ndim) in [
        (18432usize, 1280usize, 1280usize),
        (18432, 5120, 1280),
        (73728, 640, 640),
        (73728, 2560, 640),
        (294912, 320, 320),
        (294912, 1280, 320),
    ] {
        let key = format!("linear_epilogue f16 M{m} K{kdim} N{ndim}");
        let variants = ["bare", "+bias", "+residual", "+bias+residual"];
        if !variants.iter().any(|v| selected(&format!("{key} {v}"))) {
            continue;
        }
        let arena =
            Arena::new("epilogue bench inputs", 2 * (2 * m * kdim + ndim * kdim + ndim + m * ndim) + (4 << 20))?;
        let random = |shape: &[usize], seed| b.random_in(&arena, shape, DType::F16, seed);
        let xs = [random(&[m, kdim], 51)?, random(&[m, kdim], 52)?];
        let (wt, bias, residual) = (random(&[ndim, kdim], 53)?, random(&[ndim], 54)?, random(&[m, ndim], 55)?);
        for (name, (bias, residual)) in variants.into_iter().zip([
            (None, None),
            (Some(&bias), None),
            (None, Some(&residual)),
            (Some(&bias), Some(&residual)),
        ]) {
            b.run("linear_epilogue", &format!("{key} {name}"), 0.0, 2.0 * (m * kdim * ndim) as f64, |k| {
                linear_add(&ex, &xs[k], &wt, bias, residual).map(drop)
            })?;
        }
    }
    // FP8 linears at the UNet's b32 1024x576 shapes (levels 1 and 2: q/k/v, to_out, the GEGLU
    // projection, the second feed-forward GEMM) and the motion modules' level-0 GEGLU projection
    // (32 frames, K 320): the f16 linear, the FP8 one as a forward runs it
    // (the activation quantized per call), the FP8 GEMM alone and the quantization alone; which
    // N the FP8 linear wins from is what `Fp8Linears::Wide` (N >= 1536) predicts. Compute
    // capability 8.9 or later.
    let fp8_device = b.gpu.info().compute_capability >= (8, 9);
    for (m, kdim, ndim) in [
        (73728usize, 640usize, 1920usize),
        (73728, 640, 640),
        (73728, 640, 5120),
        (73728, 2560, 640),
        (18432, 1280, 3840),
        (18432, 1280, 1280),
        (18432, 1280, 10240),
        (18432, 5120, 1280),
        (294912, 320, 2560),
    ] {
        if !fp8_device {
            println!("fp8 rows skipped: compute capability below 8.9 has no FP8 GEMMs");
            break;
        }
        // Inputs of their own, freed after each shape (the largest take ~0.8 GB each).
        let arena = Arena::new("fp8 bench inputs", 2 * (2 * m * kdim + ndim * kdim + ndim + m * ndim) + (4 << 20))?;
        let random = |shape: &[usize], seed| b.random_in(&arena, shape, DType::F16, seed);
        let xs = [random(&[m, kdim], 31)?, random(&[m, kdim], 32)?];
        let (wt, bias) = (random(&[ndim, kdim], 33)?, random(&[ndim], 34)?);
        // The linears that end on the residual stream (N = C) add it.
        let residual = if ndim <= kdim { Some(random(&[m, ndim], 37)?) } else { None };
        let flop = 2.0 * (m * kdim * ndim) as f64;
        let shape = format!("M{m} K{kdim} N{ndim}");
        b.run("linear", &format!("linear f16 {shape}"), 0.0, flop, |k| {
            linear(&ex, &xs[k], &wt, Some(&bias)).map(drop)
        })?;
        // One scale per tensor ("fp8"), then per row ("fp8 rows": tokens and output channels).
        for (scaling, name) in [(Fp8Scaling::Tensor, "fp8"), (Fp8Scaling::Rows, "fp8 rows")] {
            let wq = quantize(&ex, &wt, true, scaling)?;
            b.run("linear_fp8", &format!("linear {name} {shape}"), 0.0, flop, |k| {
                linear_fp8(&ex, &xs[k], &wq, Some(&bias), None).map(drop)
            })?;
            let xq = [quantize(&ex, &xs[0], true, scaling)?, quantize(&ex, &xs[1], true, scaling)?];
            b.run("linear_fp8", &format!("linear {name} gemm only {shape}"), 0.0, flop, |k| {
                let y = b.gpu.empty(&b.scratch, &[m, ndim], DType::F16)?;
                gemm_fp8(&ex, &xq[k], &wq, None, None, &y)
            })?;
            // Per tensor: amax reads 2 bytes an element, quantize reads 2 and writes 1; per row:
            // one read (the second from L1/L2) and the write.
            let bytes = if scaling == Fp8Scaling::Tensor { 5.0 } else { 3.0 } * (m * kdim) as f64;
            b.run("fp8_quantize", &format!("{name} quantize M{m} K{kdim}"), bytes, 0.0, |k| {
                quantize(&ex, &xs[k], false, scaling).map(drop)
            })?;
            // Bias and residual in a pass after the GEMM, then in its epilogue.
            if let Some(residual) = &residual {
                let mut wq = wq;
                for fused in [false, true] {
                    wq = wq.with_fused_epilogue(fused);
                    let how = if fused { "epilogue" } else { "pass" };
                    b.run("linear_fp8", &format!("linear {name} +bias+residual {how} {shape}"), 0.0, flop, |k| {
                        linear_fp8(&ex, &xs[k], &wq, Some(&bias), Some(residual)).map(drop)
                    })?;
                }
            }
        }
        // The LayerNorm before an FP8 linear with row scales writes e4m3 rows itself: 2 bytes read
        // and 1 written an element, against 2 + 2 for the 16-bit LayerNorm.
        let (gamma, beta) = (random(&[kdim], 35)?, random(&[kdim], 36)?);
        b.run("layer_norm", &format!("layer_norm f16 M{m} K{kdim}"), 4.0 * (m * kdim) as f64, 0.0, |k| {
            layer_norm(&ex, &xs[k], Some(&gamma), Some(&beta), 1e-5).map(drop)
        })?;
        b.run("layer_norm", &format!("layer_norm e4m3 M{m} K{kdim}"), 3.0 * (m * kdim) as f64, 0.0, |k| {
            layer_norm_fp8(&ex, &xs[k], None, Some(&gamma), Some(&beta), 1e-5, None).map(drop)
        })?;
    }
    // The GEGLU projection (ff.net.0.proj + GEGLU) at the UNet's b32 1024x576 levels 1 and 2, its
    // b2 1024x1024 level 1 and the motion modules' level 0 (32 frames x 72x128 tokens): cuBLASLt then
    // the geglu pass, the Hopper kernel with GEGLU in its epilogue (compute capability 9.0), and the
    // FP8 route (8.9 or later).
    for (m, kdim, dim) in
        [(73728usize, 640usize, 2560usize), (18432, 1280, 5120), (8192, 640, 2560), (294912, 320, 1280)]
    {
        let xs = [b.random(&[m, kdim], DType::F16, 21)?, b.random(&[m, kdim], DType::F16, 22)?];
        let (wt, bias) = (b.random(&[2 * dim, kdim], DType::F16, 23)?, b.random(&[2 * dim], DType::F16, 24)?);
        let key = format!("linear_geglu f16 M{m} K{kdim} D{dim}");
        // The fused kernel's least traffic: x, w and y once.
        let bytes = 2.0 * (m * kdim + 2 * dim * kdim + m * dim) as f64;
        let flop = 2.0 * (m * kdim * 2 * dim) as f64;
        let mut routes = vec![(GegluLinear::Composed, "composed")];
        if info.compute_capability == (9, 0) {
            routes.extend([
                (GegluLinear::Fused, "fused"),
                (GegluLinear::FusedHandoff, "fused hand-off"),
                (GegluLinear::FusedFinish, "fused finish"),
            ]);
        }
        for (route, name) in routes {
            b.run("linear_geglu", &format!("{key} {name}"), bytes, flop, |k| {
                linear_geglu_with(&ex, &xs[k], &wt, Some(&bias), route).map(drop)
            })?;
        }
        if fp8_device {
            // As `fp8 = "on"` runs it when the input is not a LayerNorm's: the activation quantized,
            // the FP8 product, then the geglu pass adding the bias.
            for (scaling, name) in [(Fp8Scaling::Tensor, "fp8"), (Fp8Scaling::Rows, "fp8 rows")] {
                let wq = quantize(&ex, &wt, true, scaling)?;
                b.run("linear_geglu", &format!("{key} {name}"), bytes, flop, |k| {
                    let weight = LinearWeight { matrix: &wt, fp8: Some(&wq) };
                    linear_geglu_with(&ex, &xs[k], weight, Some(&bias), GegluLinear::Composed).map(drop)
                })?;
            }
        }
    }
    // GEGLU alone (the pass after the projection GEMM) at the same shapes: the 16-bit output
    // against e4m3 rows with a scale each (`geglu_fp8`, an FP8 ff.net.2's input), 4 bytes read and
    // 2 or 1 written an output. One input (its ~0.4-1.5 GB are far past L2), freed after each shape.
    for (m, dim) in [(73728usize, 2560usize), (18432, 5120), (294912, 1280)] {
        let keys = [format!("geglu f16 M{m} D{dim}"), format!("geglu e4m3 M{m} D{dim}")];
        if !keys.iter().any(|k| selected(k)) {
            continue;
        }
        let arena = Arena::new("geglu bench input", 2 * (m + 1) * 2 * dim + (4 << 20))?;
        let h = b.random_in(&arena, &[m, 2 * dim], DType::F16, 25)?;
        let bias = b.random_in(&arena, &[2 * dim], DType::F16, 26)?;
        let outputs = (m * dim) as f64;
        b.run("geglu", &keys[0], 6.0 * outputs, 0.0, |_| geglu(&ex, &h, Some(&bias)).map(drop))?;
        if fp8_device {
            b.run("geglu", &keys[1], 5.0 * outputs, 0.0, |_| geglu_fp8(&ex, &h, Some(&bias)).map(drop))?;
        }
    }
    lora_merges(&b, &ex)
}

/// Ranks and scales (α/r · strength) of the four LoRAs merged per weight: three style LoRAs and the
/// LCM-LoRA (rank 64, α 8).
const LORA_TERMS: [(usize, f32); 4] = [(32, 0.5), (64, 0.4), (128, 0.25), (64, 0.125)];

/// One weight and the factors of its LoRAs (the kernel: one pair per LoRA; cuBLASLt: the pairs
/// concatenated along the rank, [out, K] and [K, cols], as models/lora/device.rs stacks them).
struct MergeSet {
    w: Tensor,
    factors: Vec<(Tensor, Tensor, f32)>,
    cat: (Tensor, Tensor),
}

impl MergeSet {
    /// The kernel's layer: one term per LoRA.
    fn layer(&self) -> LayerDelta<'_> {
        let terms = self
            .factors
            .iter()
            .map(|(up, down, scale)| DeltaTerm { factors: DeltaFactors::LowRank { up, down }, scale: *scale })
            .collect();
        LayerDelta { weight: &self.w, terms, base: None, dora: None }
    }

    /// cuBLASLt's layer (`merge_gemm`, the route device sets take): W = W + Ucat · Dcat, one GEMM
    /// with beta = 1 and C = D = W.
    fn gemm_layer(&self) -> LayerDelta<'_> {
        let (up, down) = (&self.cat.0, &self.cat.1);
        let term = DeltaTerm { factors: DeltaFactors::LowRank { up, down }, scale: 1.0 };
        LayerDelta { weight: &self.w, terms: vec![term], base: None, dora: None }
    }

    /// Minimum traffic: W read and written once, every factor read once.
    fn bytes(&self) -> f64 {
        (2 * self.w.size_bytes() + self.factors.iter().map(|(u, d, _)| u.size_bytes() + d.size_bytes()).sum::<usize>())
            as f64
    }
}

/// The SDXL base UNet's Linear and Conv2d weights as (out, kernel positions, in): diffusers'
/// UNet2DConditionModel with SDXL's config (block_out_channels 320/640/1280, transformer depths 0, 2,
/// 10 down and 10 in the mid block, 2 ResNets per down block and 3 per up block, cross-attention
/// 2048, time embedding 1280, added embedding from 2816): 794 weights, 2,565,880,320 parameters.
fn sdxl_unet_weights() -> Vec<(usize, usize, usize)> {
    fn transformer(w: &mut Vec<(usize, usize, usize)>, c: usize, depth: usize) {
        w.push((c, 1, c)); // proj_in
        for _ in 0..depth {
            w.extend([(c, 1, c); 4]); // attn1 to_q, to_k, to_v, to_out.0
            w.extend([(c, 1, c), (c, 1, 2048), (c, 1, 2048), (c, 1, c)]); // attn2
            w.extend([(8 * c, 1, c), (c, 1, 4 * c)]); // ff.net.0.proj (GEGLU), ff.net.2
        }
        w.push((c, 1, c)); // proj_out
    }
    fn resnet(w: &mut Vec<(usize, usize, usize)>, cin: usize, c: usize) {
        w.extend([(c, 9, cin), (c, 1, 1280), (c, 9, c)]); // conv1, time_emb_proj, conv2
        if cin != c {
            w.push((c, 1, cin)); // conv_shortcut
        }
    }
    // conv_in, time_embedding.linear_1/2, add_embedding.linear_1/2
    let mut w = vec![(320, 9, 4), (1280, 1, 320), (1280, 1, 1280), (1280, 1, 2816), (1280, 1, 1280)];
    // down: (channels, transformer depth, downsampler); the up path's skips come from here
    let mut skips = vec![320];
    let mut cin = 320;
    for (c, depth, down) in [(320, 0, true), (640, 2, true), (1280, 10, false)] {
        for _ in 0..2 {
            resnet(&mut w, cin, c);
            if depth > 0 {
                transformer(&mut w, c, depth);
            }
            cin = c;
            skips.push(c);
        }
        if down {
            w.push((c, 9, c));
            skips.push(c);
        }
    }
    resnet(&mut w, 1280, 1280);
    transformer(&mut w, 1280, 10);
    resnet(&mut w, 1280, 1280);
    for (c, depth, up) in [(1280, 10, true), (640, 2, true), (320, 0, false)] {
        for _ in 0..3 {
            resnet(&mut w, cin + skips.pop().expect("one skip per up layer"), c);
            if depth > 0 {
                transformer(&mut w, c, depth);
            }
            cin = c;
        }
        if up {
            w.push((c, 9, c));
        }
    }
    w.push((4, 9, 320)); // conv_out
    w
}

/// The Linear weights LoRAs target in SDXL's two text encoders (CLIP ViT-L/14: 12 layers of 768,
/// MLP 3072; OpenCLIP bigG: 32 layers of 1280, MLP 5120): q, k, v, out_proj, fc1, fc2 per layer.
fn sdxl_text_encoder_weights() -> Vec<(usize, usize, usize)> {
    let mut w = Vec::new();
    for (c, mlp, layers) in [(768, 3072, 12), (1280, 5120, 32)] {
        for _ in 0..layers {
            w.extend([(c, 1, c); 4]);
            w.extend([(mlp, 1, c), (c, 1, mlp)]);
        }
    }
    w
}

/// The LoRA merge: per SDXL weight shape, ours against cuBLASLt; then whole models in one call.
fn lora_merges(b: &Bench, ex: &Exec) -> Result<()> {
    let k: usize = LORA_TERMS.iter().map(|t| t.0).sum();
    let ranks = "r32+64+128+64";
    for kernel in ["lora_merge_f16", "lora_merge_hadamard_f16"] {
        let blocks = b.gpu.occupancy(kernel, LORA_THREADS, LORA_SHARED_BYTES as usize)?;
        println!(
            "LAYOUT {kernel}: {blocks} blocks of {LORA_THREADS} threads per multiprocessor, {LORA_SHARED_BYTES} B shared each"
        );
    }
    for (out, kernel, inner) in
        [(640, 1, 640), (1280, 1, 1280), (10240, 1, 1280), (1280, 1, 5120), (320, 9, 320), (1280, 9, 1280)]
    {
        let cols = kernel * inner;
        let sets = (0..2u32)
            .map(|s| {
                let seed = 60 + 16 * s;
                let factors = LORA_TERMS
                    .iter()
                    .enumerate()
                    .map(|(i, &(r, scale))| {
                        Ok((
                            b.random(&[out, r], DType::F16, seed + 2 * i as u32)?,
                            b.random(&[r, cols], DType::F16, seed + 2 * i as u32 + 1)?,
                            scale,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let cat = (b.random(&[out, k], DType::F16, seed + 10)?, b.random(&[k, cols], DType::F16, seed + 11)?);
                Ok(MergeSet { w: b.random(&[out, cols], DType::F16, seed + 12)?, factors, cat })
            })
            .collect::<Result<Vec<_>>>()?;
        let flop = 2.0 * (out * cols * k) as f64;
        let shape =
            if kernel == 1 { format!("O{out} C{cols}") } else { format!("O{out} C{cols} (3x3 conv, in {inner})") };
        let key = format!("lora_merge f16 {shape} {ranks}");
        b.run("lora_merge", &key, sets[0].bytes(), flop, |i| merge_deltas(ex, &[sets[i].layer()]))?;
        let key = format!("lora_merge_cublaslt f16 {shape} K{k}");
        b.run("lora_merge_cublaslt", &key, sets[0].bytes(), flop, |i| merge_gemm(ex, &[sets[i].gemm_layer()]))?;
    }

    // Whole models: every weight with the set's terms in one call (values set by memset: the
    // timing does not depend on them, and uploading 7 GB of drawn values would take minutes). The
    // LCM-LoRA alone (one rank-64 term, K = 64) checks the cuBLASLt route where K is small.
    // K = 128 and 192 bracket the crossover (models::lora::device::GEMM_MIN_RANK).
    let lcm_alone = [LORA_TERMS[3]];
    let (k128, k192) = ([LORA_TERMS[2]], [LORA_TERMS[1], LORA_TERMS[2]]);
    for (model, weights, terms) in [
        ("unet", sdxl_unet_weights(), &LORA_TERMS[..]),
        ("text_encoders", sdxl_text_encoder_weights(), &LORA_TERMS[..]),
        ("unet", sdxl_unet_weights(), &lcm_alone[..]),
        ("unet", sdxl_unet_weights(), &k128[..]),
        ("unet", sdxl_unet_weights(), &k192[..]),
    ] {
        let k: usize = terms.iter().map(|t| t.0).sum();
        let ranks = terms.iter().map(|t| t.0.to_string()).collect::<Vec<_>>().join("+");
        let elements =
            |(out, kernel, inner): (usize, usize, usize)| out * kernel * inner + 2 * (out + kernel * inner) * k;
        let bytes = weights.iter().map(|&w| elements(w) * 2 + (3 + 2 * terms.len()) * 256).sum::<usize>();
        let arena = Arena::new("bench LoRA merge", bytes)?;
        // f16 0x3C3C ≈ 1.06 for W, 0x2424 ≈ 0.016 for factors: 60 merges move W by about 2.
        let filled = |shape: &[usize], byte: u8| -> Result<Tensor> {
            let t = b.gpu.empty(&arena, shape, DType::F16)?;
            let Storage::Device(mem) = t.storage() else { unreachable!("made on the device") };
            b.gpu.fill_bytes(mem, byte)?;
            Ok(t)
        };
        let sets = weights
            .iter()
            .map(|&(out, kernel, inner)| {
                let cols = kernel * inner;
                let factors = terms
                    .iter()
                    .map(|&(r, scale)| Ok((filled(&[out, r], 0x24)?, filled(&[r, cols], 0x24)?, scale)))
                    .collect::<Result<_>>()?;
                let cat = (filled(&[out, k], 0x24)?, filled(&[k, cols], 0x24)?);
                Ok(MergeSet { w: filled(&[out, cols], 0x3C)?, factors, cat })
            })
            .collect::<Result<Vec<_>>>()?;
        let params: usize = sets.iter().map(|s| s.w.numel()).sum();
        let flop = 2.0 * (params * k) as f64;
        let traffic: f64 = sets.iter().map(MergeSet::bytes).sum();
        let layers: Vec<LayerDelta> = sets.iter().map(MergeSet::layer).collect();
        let key = format!("lora_merge_{model} f16 {} weights {:.3}B params r{ranks}", sets.len(), params as f64 / 1e9);
        b.run("lora_merge", &key, traffic, flop, |_| merge_deltas(ex, &layers))?;
        let layers: Vec<LayerDelta> = sets.iter().map(MergeSet::gemm_layer).collect();
        let key = format!("lora_merge_{model}_cublaslt f16 {} GEMMs K{k}", sets.len());
        b.run("lora_merge_cublaslt", &key, traffic, flop, |_| merge_gemm(ex, &layers))?;
    }
    Ok(())
}
