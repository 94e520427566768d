//! Kernel benchmarks on the GPU: CUDA-event timing, warm-up, median of many runs, inputs rotated
//! between two buffers. Prints one `BENCH {json}` line per entry; tools/report.py pairs them with
//! tools/peer_torch.py's `PEER` lines from the same GPU run. Needs a GPU (tools/gpu_run.sh).
//! CELFRAME_BENCH_FILTER=text runs only the entries whose key contains the text (for profiling).

use celframe::gpu::timing::time_gpu;
use celframe::gpu::{Arena, ClusterScheduling, Gpu, nvtx};
use celframe::ops::Exec;
use celframe::ops::attention::{
    FlashAttention, TemporalAttention, TemporalAttentionTuning, flash_attention, gemm_attention, temporal_attention,
    temporal_attention_tuned,
};
use celframe::ops::conv::{Conv2d, conv2d};
use celframe::ops::linear::linear;
use celframe::ops::norm::{GroupNorm, GroupNormMode, GroupNormTuning, group_norm_layout, group_norm_tuned};
use celframe::{DType, Result, Tensor};

const WARMUP: usize = 10;
const RUNS: usize = 50;

struct Bench {
    gpu: Gpu,
    inputs: Arena,
    scratch: Arena,
}

impl Bench {
    fn random(&self, shape: &[usize], dtype: DType, seed: u32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        // A cheap hash gives varied, non-zero values in [-2, 2).
        let v: Vec<f32> = (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(97)) >> 8) as f32
                    / (1u32 << 24) as f32
                    * 4.0
                    - 2.0
            })
            .collect();
        self.gpu.upload(&self.inputs, &Tensor::from_f32(shape, dtype, &v)?, dtype)
    }

    /// Times `f(input k % 2)` and prints the entry. `bytes` is the minimum traffic, `flop` the arithmetic.
    fn run(&self, name: &str, key: &str, bytes: f64, flop: f64, mut f: impl FnMut(usize) -> Result<()>) -> Result<()> {
        if std::env::var("CELFRAME_BENCH_FILTER").is_ok_and(|filter| !key.contains(&filter)) {
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

    // Flash attention, head dim 64: SDXL self attention (64x64 latent tokens at 1024x576 level 1, 24x24
    // at level 2, 64x64 for a 1024x1024 image) and cross attention over 77 prompt tokens.
    for (batch, sq, sk, heads) in
        [(32usize, 2304usize, 2304usize, 10usize), (32, 576, 576, 20), (32, 2304, 77, 10), (2, 4096, 4096, 10)]
    {
        let (qn, kn) = ([batch, sq, heads * 64], [batch, sk, heads * 64]);
        let t: Vec<Tensor> = (0..6)
            .map(|i| b.random(if i % 3 == 0 { &qn } else { &kn }, DType::F16, 40 + i as u32))
            .collect::<Result<_>>()?;
        let cfg = FlashAttention { heads, causal: false, scale: 0.125 };
        let flop = 4.0 * (batch * heads * sq * sk * 64) as f64;
        let bytes = (2 * t[0].size_bytes() + 2 * t[1].size_bytes()) as f64;
        let key = format!("flash_attention f16 b{batch} h{heads} sq{sq} sk{sk}");
        b.run("flash_attention", &key, bytes, flop, |k| {
            flash_attention(&ex, &t[3 * k], &t[3 * k + 1], &t[3 * k + 2], cfg).map(drop)
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

    // cuDNN convolutions and cuBLASLt linears at UNet shapes, for the record (issue: conv choice).
    for (n, h, w, ci, co) in
        [(2usize, 128usize, 128usize, 320usize, 320usize), (2, 64, 64, 640, 640), (2, 32, 32, 1280, 1280)]
    {
        let xs = [b.random(&[n, h, w, ci], DType::F16, 9)?, b.random(&[n, h, w, ci], DType::F16, 10)?];
        let (wt, bias) = (b.random(&[co, 3, 3, ci], DType::F16, 11)?, b.random(&[co], DType::F16, 12)?);
        let flop = 2.0 * (n * h * w * co * ci * 9) as f64;
        let key = format!("conv3x3 f16 N{n} C{ci} H{h} W{w} K{co}");
        b.run("conv3x3", &key, 0.0, flop, |k| {
            conv2d(&ex, &xs[k], &wt, Some(&bias), Conv2d { stride: 1, padding: 1 }).map(drop)
        })?;
    }
    for (m, kdim, ndim) in [(8192usize, 640usize, 640usize), (2048, 1280, 10240), (65536, 320, 320)] {
        let xs = [b.random(&[m, kdim], DType::F16, 13)?, b.random(&[m, kdim], DType::F16, 14)?];
        let (wt, bias) = (b.random(&[ndim, kdim], DType::F16, 15)?, b.random(&[ndim], DType::F16, 16)?);
        let key = format!("linear f16 M{m} K{kdim} N{ndim}");
        b.run("linear", &key, 0.0, 2.0 * (m * kdim * ndim) as f64, |k| {
            linear(&ex, &xs[k], &wt, Some(&bias)).map(drop)
        })?;
    }
    Ok(())
}
