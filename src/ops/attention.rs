//! Attention ops. `temporal_attention`: AnimateDiff's motion-module self-attention over the frames
//! of every pixel, on NHWC frame-major activations (no transposes around it).

use super::{Exec, par_rows, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::params::TemporalAttentionParams;
use crate::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct TemporalAttention {
    /// Frames per video (1..=32); the batch is videos * frames with the frame index fastest.
    pub frames: usize,
    pub heads: usize,
    /// Softmax scale, usually 1 / sqrt(head_dim).
    pub scale: f32,
}

/// Warps per block of the temporal kernel (one sequence each), exposed for benchmark sweeps.
#[derive(Clone, Copy, Debug)]
pub struct TemporalAttentionTuning {
    /// 1..=8 (TEMPORAL_MAX_WARPS in kernels/attention/temporal.cu).
    pub warps_per_block: usize,
}

impl Default for TemporalAttentionTuning {
    fn default() -> Self {
        TemporalAttentionTuning { warps_per_block: 4 }
    }
}

struct Dims {
    videos: usize,
    frames: usize,
    pixels: usize,
    heads: usize,
    head_dim: usize,
}

fn dims(q: &Tensor, cfg: &TemporalAttention) -> Result<Dims> {
    let s = q.shape();
    if s.len() < 2 {
        return Err(Error::Input(format!("temporal_attention: {q:?} must be [videos * frames, ..., channels]")));
    }
    let (n, c) = (s[0], s[s.len() - 1]);
    if cfg.frames == 0 || cfg.frames > 32 || n % cfg.frames != 0 {
        return Err(Error::Input(format!(
            "temporal_attention: {} frames must be 1..=32 and divide the batch {n} (longer clips need context windows)",
            cfg.frames
        )));
    }
    if cfg.heads == 0 || c % cfg.heads != 0 {
        return Err(Error::Input(format!("temporal_attention: {} heads do not divide {c} channels", cfg.heads)));
    }
    Ok(Dims {
        videos: n / cfg.frames,
        frames: cfg.frames,
        pixels: q.numel() / (n * c),
        heads: cfg.heads,
        head_dim: c / cfg.heads,
    })
}

/// O = softmax(scale * Q K^T) V over the frames of each (video, pixel, head); q, k, v and the
/// result are [videos * frames, ..., heads * head_dim].
pub fn temporal_attention(ex: &Exec, q: &Tensor, k: &Tensor, v: &Tensor, cfg: TemporalAttention) -> Result<Tensor> {
    temporal_attention_tuned(ex, q, k, v, cfg, TemporalAttentionTuning::default())
}

pub fn temporal_attention_tuned(
    ex: &Exec,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: TemporalAttention,
    tuning: TemporalAttentionTuning,
) -> Result<Tensor> {
    ex.expect_inputs("temporal_attention", &[q, k, v])?;
    let dtype = same_dtype("temporal_attention", &[q, k, v])?;
    if k.shape() != q.shape() || v.shape() != q.shape() {
        return Err(Error::Input(format!("temporal_attention: q {q:?}, k {k:?}, v {v:?} must have one shape")));
    }
    let d = dims(q, &cfg)?;
    match ex {
        Exec::Cpu => temporal_attention_reference(q, k, v, cfg, None, dtype),
        Exec::Cuda { gpu, scratch } => {
            let dp = d.head_dim.div_ceil(16) * 16;
            let kernel = match (d.frames <= 16, dp, dtype) {
                (true, 48, DType::F16) => "temporal_attention_16x48_f16",
                (true, 64, DType::F16) => "temporal_attention_16x64_f16",
                (true, 80, DType::F16) => "temporal_attention_16x80_f16",
                (true, 160, DType::F16) => "temporal_attention_16x160_f16",
                (false, 48, DType::F16) => "temporal_attention_32x48_f16",
                (false, 64, DType::F16) => "temporal_attention_32x64_f16",
                (false, 80, DType::F16) => "temporal_attention_32x80_f16",
                (false, 160, DType::F16) => "temporal_attention_32x160_f16",
                (true, 48, DType::BF16) => "temporal_attention_16x48_bf16",
                (true, 64, DType::BF16) => "temporal_attention_16x64_bf16",
                (true, 80, DType::BF16) => "temporal_attention_16x80_bf16",
                (true, 160, DType::BF16) => "temporal_attention_16x160_bf16",
                (false, 48, DType::BF16) => "temporal_attention_32x48_bf16",
                (false, 64, DType::BF16) => "temporal_attention_32x64_bf16",
                (false, 80, DType::BF16) => "temporal_attention_32x80_bf16",
                (false, 160, DType::BF16) => "temporal_attention_32x160_bf16",
                _ => {
                    return Err(Error::Unsupported(format!(
                        "temporal_attention kernel: f16/bf16 with head_dim 33-48, 49-64, 65-80 or 129-160 and a multiple of 8 \
                         (got {dtype:?}, head_dim {})",
                        d.head_dim
                    )));
                }
            };
            if d.head_dim % 8 != 0 {
                return Err(Error::Unsupported(format!(
                    "temporal_attention kernel: head_dim {} is not a multiple of 8",
                    d.head_dim
                )));
            }
            let o = gpu.empty(scratch, q.shape(), dtype)?;
            let c = (d.heads * d.head_dim) as i64;
            let p = TemporalAttentionParams {
                q: q.device_ptr()? as *const _,
                k: k.device_ptr()? as *const _,
                v: v.device_ptr()? as *const _,
                o: o.device_ptr()? as *mut _,
                q_stride: c,
                k_stride: c,
                v_stride: c,
                o_stride: c,
                videos: d.videos as i32,
                frames: d.frames as i32,
                pixels: d.pixels as i32,
                heads: d.heads as i32,
                head_dim: d.head_dim as i32,
                scale: cfg.scale,
            };
            let fp = if d.frames <= 16 { 16 } else { 32 };
            let warps = tuning.warps_per_block.clamp(1, 8);
            let shared = warps * 3 * fp * (dp + 8) * dtype.size();
            let sequences = d.videos * d.pixels * d.heads;
            let grid = sequences.div_ceil(warps) as u32;
            gpu.launch(kernel, (grid, 1, 1), ((warps * 32) as u32, 1, 1), shared as u32, &p)?;
            Ok(o)
        }
    }
}

/// The CPU twin, in f64, returning `out_dtype`. With `round_to` set it instead models a plain
/// half-precision implementation (scores and probabilities rounded to that dtype before use), the
/// yardstick of the attention accuracy rule: a kernel's error against the f64 result may be at
/// most twice that implementation's.
pub fn temporal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: TemporalAttention,
    round_to: Option<DType>,
    out_dtype: DType,
) -> Result<Tensor> {
    let d = dims(q, &cfg)?;
    let (qv, kv, vv) = (q.to_f32_vec()?, k.to_f32_vec()?, v.to_f32_vec()?);
    let (f_n, hd, c) = (d.frames, d.head_dim, d.heads * d.head_dim);
    let round = |x: f64| round_to.map_or(x, |t| t.round(x as f32) as f64);
    // One "row" of the output per (video, pixel): all frames and channels of that pixel.
    let mut out = vec![0f32; qv.len()];
    let pixel_major: Vec<f32> = {
        // Gather per (video, pixel) blocks of [frames][channels] so rows are independent.
        let mut buf = vec![0f32; qv.len()];
        par_rows(&mut buf, f_n * c, |first, chunk| {
            for (i, blk) in chunk.chunks_mut(f_n * c).enumerate() {
                let bp = first + i;
                let (b, px) = (bp / d.pixels, bp % d.pixels);
                let mut scores = vec![0f64; f_n];
                for h in 0..d.heads {
                    for fq in 0..f_n {
                        let at =
                            |t: &[f32], f: usize, e: usize| t[((b * f_n + f) * d.pixels + px) * c + h * hd + e] as f64;
                        let mut mx = f64::NEG_INFINITY;
                        for (fk, s) in scores.iter_mut().enumerate() {
                            let dot: f64 = (0..hd).map(|e| at(&qv, fq, e) * at(&kv, fk, e)).sum();
                            *s = round(dot) * cfg.scale as f64;
                            mx = mx.max(*s);
                        }
                        let total: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                        for e in 0..hd {
                            let acc: f64 = scores
                                .iter()
                                .enumerate()
                                .map(|(fk, s)| round((s - mx).exp() / total) * at(&vv, fk, e))
                                .sum();
                            blk[fq * c + h * hd + e] = acc as f32;
                        }
                    }
                }
            }
        });
        buf
    };
    // Scatter back to the frame-major layout.
    for bp in 0..d.videos * d.pixels {
        let (b, px) = (bp / d.pixels, bp % d.pixels);
        for f in 0..f_n {
            let dst = ((b * f_n + f) * d.pixels + px) * c;
            out[dst..dst + c].copy_from_slice(&pixel_major[(bp * f_n + f) * c..][..c]);
        }
    }
    Tensor::from_f32(q.shape(), out_dtype, &out)
}
