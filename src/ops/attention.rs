//! Attention ops. `temporal_attention`: AnimateDiff's motion-module self-attention over the frames
//! of every pixel, on NHWC frame-major activations (no transposes around it). `flash_attention`:
//! head dim 64 (UNet, ControlNet, text encoders). `gemm_attention`: any head dim through cuBLASLt
//! and a softmax kernel (the VAE's single 512-wide head). Each takes q, k and v as `Columns`: whole
//! tensors, or column blocks of one (a fused q/k/v projection's output) read through row strides.

use super::{Exec, GRID_X, GRID_YZ, grid_dim, kernel_i32, par_rows, same_dtype};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::gpu::blas::{Gemm, GemmIo};
use crate::gpu::params::{FlashAttentionParams, FlashTmaParams, SoftmaxRowsParams, TemporalAttentionParams, TensorMap};
use crate::gpu::tma::tensor_map;
use crate::tensor::{DType, Tensor};

/// q, k or v of the attention ops: the channels `first..first + width` of every row of `tensor`,
/// rows lying `tensor`'s last dimension apart. A whole tensor converts into one (`&q`); the output
/// of a fused projection [.., N·C] holds q, k and v side by side (`Columns::split`), and the
/// kernels read each in place through their row strides, without a copy.
#[derive(Clone)]
pub struct Columns {
    tensor: Tensor,
    first: usize,
    width: usize,
}

impl Columns {
    /// The channels `first..first + width` of every row of `t`.
    pub fn new(t: &Tensor, first: usize, width: usize) -> Result<Columns> {
        let row = t.shape().last().copied().unwrap_or(0);
        if t.shape().is_empty() || first.checked_add(width).is_none_or(|end| end > row) {
            return Err(Error::Input(format!("columns {first}..{first}+{width} of {t:?} lie outside its rows")));
        }
        Ok(Columns { tensor: t.clone(), first, width })
    }

    /// `t` [.., N·C] as its N column blocks of width C, in order (q, k, v of a fused projection).
    pub fn split<const N: usize>(t: &Tensor) -> Result<[Columns; N]> {
        let row = t.shape().last().copied().unwrap_or(0);
        if t.shape().is_empty() || N == 0 || !row.is_multiple_of(N) {
            return Err(Error::Input(format!("{t:?} does not split into {N} column blocks of one width")));
        }
        let width = row / N;
        Ok(std::array::from_fn(|i| Columns { tensor: t.clone(), first: i * width, width }))
    }

    /// The shape of the columns as a tensor of their own: `tensor`'s, the last dimension `width`.
    pub fn shape(&self) -> Vec<usize> {
        let mut shape = self.tensor.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.width;
        }
        shape
    }

    pub fn dtype(&self) -> DType {
        self.tensor.dtype()
    }

    /// Elements from one row to the next.
    fn row_stride(&self) -> usize {
        self.tensor.shape().last().copied().unwrap_or(0)
    }

    /// Device address of the first row's first column.
    fn device_ptr(&self) -> Result<u64> {
        Ok(self.tensor.device_ptr()? + (self.first * self.dtype().size()) as u64)
    }

    /// The values widened to f32 in the order of `shape()` (host tensors only).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let all = self.tensor.to_f32_vec()?;
        let stride = self.row_stride();
        if self.width == stride {
            return Ok(all);
        }
        Ok(all.chunks_exact(stride).flat_map(|row| &row[self.first..self.first + self.width]).copied().collect())
    }

    /// The same columns with the rows regrouped under the leading dimensions `lead` (same count).
    fn regrouped(&self, lead: &[usize]) -> Result<Columns> {
        let shape: Vec<usize> = lead.iter().copied().chain([self.row_stride()]).collect();
        Ok(Columns { tensor: self.tensor.reshape(&shape)?, first: self.first, width: self.width })
    }
}

impl From<&Tensor> for Columns {
    fn from(t: &Tensor) -> Columns {
        Columns { tensor: t.clone(), first: 0, width: t.shape().last().copied().unwrap_or(0) }
    }
}

impl std::fmt::Debug for Columns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.width == self.row_stride() {
            write!(f, "{:?}", self.tensor)
        } else {
            write!(f, "columns {}..{} of {:?}", self.first, self.first + self.width, self.tensor)
        }
    }
}

/// The flash and temporal kernels (and cuBLASLt's GEMM attention) read rows in 16-byte pieces:
/// `x` must start on a 16-byte boundary with its rows a multiple of 16 bytes apart.
fn check_rows16(op: &str, name: &str, x: &Columns) -> Result<()> {
    let es = x.dtype().size();
    if !x.device_ptr()?.is_multiple_of(16) || !(x.row_stride() * es).is_multiple_of(16) {
        return Err(Error::Unsupported(format!(
            "{op}: {name} ({x:?}) must start on a 16-byte boundary with rows a multiple of 16 bytes apart"
        )));
    }
    Ok(())
}

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

fn dims(q: &Columns, cfg: &TemporalAttention) -> Result<Dims> {
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
        pixels: s.iter().product::<usize>() / (n * c),
        heads: cfg.heads,
        head_dim: c / cfg.heads,
    })
}

/// O = softmax(scale * Q K^T) V over the frames of each (video, pixel, head); q, k, v and the
/// result are [videos * frames, ..., heads * head_dim] (q, k and v may be column blocks of wider
/// rows; the result is contiguous).
pub fn temporal_attention(
    ex: &Exec,
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: TemporalAttention,
) -> Result<Tensor> {
    temporal_attention_tuned(ex, q, k, v, cfg, TemporalAttentionTuning::default())
}

pub fn temporal_attention_tuned(
    ex: &Exec,
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: TemporalAttention,
    tuning: TemporalAttentionTuning,
) -> Result<Tensor> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    ex.expect_inputs("temporal_attention", &[&q.tensor, &k.tensor, &v.tensor])?;
    let dtype = same_dtype("temporal_attention", &[&q.tensor, &k.tensor, &v.tensor])?;
    if k.shape() != q.shape() || v.shape() != q.shape() {
        return Err(Error::Input(format!("temporal_attention: q {q:?}, k {k:?}, v {v:?} must have one shape")));
    }
    let d = dims(&q, &cfg)?;
    match ex {
        Exec::Cpu => temporal_attention_reference(q, k, v, cfg, None, dtype),
        Exec::Cuda { gpu, scratch } => {
            let dp = d.head_dim.div_ceil(16) * 16;
            let fp = if d.frames <= 16 { 16 } else { 32 };
            let gap = || {
                Error::Unsupported(format!(
                    "temporal_attention kernel: f16/bf16 with head_dim a multiple of 8 in 33-48, 49-64, 65-80 or \
                     129-160 (got {dtype:?}, head_dim {})",
                    d.head_dim
                ))
            };
            if dtype == DType::F32 || d.head_dim % 8 != 0 {
                return Err(gap());
            }
            let kernel = match (fp, dp) {
                (16, 48) => kernel_for!("temporal_attention_16x48", dtype),
                (16, 64) => kernel_for!("temporal_attention_16x64", dtype),
                (16, 80) => kernel_for!("temporal_attention_16x80", dtype),
                (16, 160) => kernel_for!("temporal_attention_16x160", dtype),
                (32, 48) => kernel_for!("temporal_attention_32x48", dtype),
                (32, 64) => kernel_for!("temporal_attention_32x64", dtype),
                (32, 80) => kernel_for!("temporal_attention_32x80", dtype),
                (32, 160) => kernel_for!("temporal_attention_32x160", dtype),
                _ => return Err(gap()),
            };
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                check_rows16("temporal_attention", name, x)?;
            }
            let o = gpu.empty(scratch, &q.shape(), dtype)?;
            let p = TemporalAttentionParams {
                q: q.device_ptr()? as *const _,
                k: k.device_ptr()? as *const _,
                v: v.device_ptr()? as *const _,
                o: o.device_ptr()? as *mut _,
                q_stride: q.row_stride() as i64,
                k_stride: k.row_stride() as i64,
                v_stride: v.row_stride() as i64,
                o_stride: (d.heads * d.head_dim) as i64,
                videos: kernel_i32("temporal_attention", "videos", d.videos)?,
                frames: kernel_i32("temporal_attention", "frames", d.frames)?,
                pixels: kernel_i32("temporal_attention", "pixels", d.pixels)?,
                heads: kernel_i32("temporal_attention", "heads", d.heads)?,
                head_dim: kernel_i32("temporal_attention", "head_dim", d.head_dim)?,
                scale: cfg.scale,
            };
            let warps = tuning.warps_per_block.clamp(1, 8);
            let shared = warps * 3 * fp * (dp + 8) * dtype.size();
            let sequences = d.videos * d.pixels * d.heads;
            let grid = grid_dim("temporal_attention", "sequence groups", sequences.div_ceil(warps), GRID_X)?;
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
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: TemporalAttention,
    round_to: Option<DType>,
    out_dtype: DType,
) -> Result<Tensor> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let d = dims(&q, &cfg)?;
    let (qv, kv, vv) = (q.to_f32_vec()?, k.to_f32_vec()?, v.to_f32_vec()?);
    let (f_n, hd, c) = (d.frames, d.head_dim, d.heads * d.head_dim);
    let round = |x: f64| round_to.map_or(x, |t| t.round(x as f32) as f64);
    // Results are computed pixel-major (one independent block of [frames][channels] per (video,
    // pixel), so the work splits across threads) and then scattered to the frame-major layout.
    let pixel_major: Vec<f32> = {
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
    let mut out = vec![0f32; qv.len()];
    for bp in 0..d.videos * d.pixels {
        let (b, px) = (bp / d.pixels, bp % d.pixels);
        for f in 0..f_n {
            let dst = ((b * f_n + f) * d.pixels + px) * c;
            out[dst..dst + c].copy_from_slice(&pixel_major[(bp * f_n + f) * c..][..c]);
        }
    }
    Tensor::from_f32(&q.shape(), out_dtype, &out)
}

#[derive(Clone, Copy, Debug)]
pub struct FlashAttention {
    pub heads: usize,
    /// Mask keys after the query (the CLIP text encoders); needs seq_q == seq_k.
    pub causal: bool,
    /// Softmax scale, usually 1 / sqrt(head_dim); the flash kernels take only finite scales > 0.
    pub scale: f32,
}

/// Which flash kernel runs (benchmarks and tests pick one; model code takes `Auto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlashKernel {
    /// The short-key kernel for non-causal attention over at most 256 keys, else the long-sequence
    /// kernel: `CELFRAME_FLASH_KERNEL` (`FlashKernel::parse`'s names) where set, else the device's
    /// default (`long_flash_default`).
    #[default]
    Auto,
    /// The portable mma.sync kernel for any shape (flash_attention_d64).
    Portable,
    /// The wgmma kernel (kernels/attention/flash_sm90.cu), devices of compute capability 9.0 only.
    Hopper,
    /// The warp-specialised wgmma kernel of the same file (TMA producer warpgroup, two consumer
    /// warpgroups), devices of compute capability 9.0 only.
    HopperWs,
    /// `HopperWs` with ping-pong scheduling (FlashAttention-3 section 3.1): the two consumer
    /// warpgroups take turns on the tensor cores, one's softmax overlapping the other's products.
    /// Compute capability 9.0 only; `Auto`'s self-attention kernel there for calls of fewer than
    /// `FLASH_PERSISTENT_MIN_WAVES` waves of work tiles.
    HopperWsPingpong,
    /// `HopperWsPingpong` as a persistent kernel: one block per multiprocessor walking the work
    /// tiles (128 queries of one batch and head), the next tile's Q and K/V loads overlapping this
    /// tile's last products and stores. Compute capability 9.0 only.
    HopperWsPingpongPersistent,
    /// `HopperWsPingpongPersistent` with three consumer warpgroups: 192 query rows a work tile (each
    /// K/V tile feeds half as much again work; 576 tokens are three whole tiles where 128-row tiles
    /// leave a half-empty fifth), one more warp per scheduler to hide the softmax's latency, 160
    /// registers a consumer thread (one P buffer). Compute capability 9.0 only; `Auto`'s choice
    /// there from `FLASH_PERSISTENT_MIN_WAVES` waves on.
    HopperWsPingpong3Persistent,
    /// The short-key kernel with 32-query slices per warp for key sets up to 80 (two m16 tiles of
    /// scores in registers: 200 registers at 80 keys, so 8 warps a multiprocessor), where `Auto`
    /// takes 16-query slices unless `CELFRAME_FLASH_SHORT=rows32` (`short_rows16`); above 80 keys
    /// `Auto`'s kernel. Non-causal attention over at most 256 keys only.
    ShortRows32,
}

impl FlashKernel {
    /// The names `CELFRAME_FLASH_KERNEL` takes.
    fn parse(name: &str) -> std::result::Result<FlashKernel, String> {
        match name {
            "portable" => Ok(FlashKernel::Portable),
            "hopper" => Ok(FlashKernel::Hopper),
            "hopper-ws" => Ok(FlashKernel::HopperWs),
            "hopper-wspp" => Ok(FlashKernel::HopperWsPingpong),
            "hopper-wspp-persistent" => Ok(FlashKernel::HopperWsPingpongPersistent),
            "hopper-wspp3-persistent" => Ok(FlashKernel::HopperWsPingpong3Persistent),
            _ => Err(format!(
                "CELFRAME_FLASH_KERNEL='{name}' is not a flash kernel (expected portable, hopper, hopper-ws, \
                 hopper-wspp, hopper-wspp-persistent or hopper-wspp3-persistent)"
            )),
        }
    }
}

/// Work tiles per multiprocessor from which `Auto` takes the persistent ping-pong kernel on Hopper.
/// H200, f16, same run as the one-block-per-tile form (2026-12-04): b32 x 20 heads x 576 tokens
/// (24 waves) 0.219 against 0.237 ms, b32 x 10 x 2304 (44 waves) 1.096 against 1.109; with a few
/// waves the last one's idle blocks cost more than the overlap gains (b2 x 10 x 4096, 4.8 waves:
/// 0.235 against 0.229; b1 x 2 x 9216, 1.1 waves: 0.211 against 0.200).
const FLASH_PERSISTENT_MIN_WAVES: usize = 16;

/// The long-sequence kernel `Auto` takes on a device of compute capability `cc` with `sms`
/// multiprocessors for `work` tiles of 128 queries when `CELFRAME_FLASH_KERNEL` is unset: on Hopper
/// the warp-specialised wgmma kernel with ping-pong scheduling (H200, f16, b32 x 10 heads x 2304
/// tokens: 1.049 ms against 1.092 ms without ping-pong, 4-5% faster at 576 and 4096 tokens too),
/// from FLASH_PERSISTENT_MIN_WAVES waves of tiles on without a causal mask its persistent form with
/// three consumer warpgroups (H100, f16, same run, 2026-12-06: b32 x 20 heads x 576 tokens 0.160
/// against the two-consumer persistent kernel's 0.200 ms and SDPA's 0.186, b32 x 10 x 2304 0.946
/// against 1.024 and 0.895; at b2 x 10 x 4096, 3.3 waves of its 192-query tiles, 0.242 against
/// the one-block-per-tile kernel's 0.206, hence the threshold); elsewhere the portable one. Causal
/// self-attention here is the text encoders' 77 tokens, far below that size.
fn long_flash_default(cc: (i32, i32), work: usize, sms: usize, causal: bool) -> FlashKernel {
    match cc {
        (9, 0) if !causal && work >= FLASH_PERSISTENT_MIN_WAVES * sms => FlashKernel::HopperWsPingpong3Persistent,
        (9, 0) => FlashKernel::HopperWsPingpong,
        _ => FlashKernel::Portable,
    }
}

/// The long-sequence kernel `Auto` takes (self-attention; profiling and A/B runs of whole models
/// set `CELFRAME_FLASH_KERNEL`, read once per process).
fn long_flash_kernel(cc: (i32, i32), work: usize, sms: usize, causal: bool) -> Result<FlashKernel> {
    static CHOICE: OnceLock<Option<std::result::Result<FlashKernel, String>>> = OnceLock::new();
    let choice = super::env_route(&CHOICE, "CELFRAME_FLASH_KERNEL", FlashKernel::parse)?;
    Ok(choice.unwrap_or_else(|| long_flash_default(cc, work, sms, causal)))
}

/// Whether `Auto`'s short-key calls take 16-query slices (key sets up to 80) rather than 32:
/// yes unless `CELFRAME_FLASH_SHORT=rows32` (A/B runs of whole models; read once per process).
/// H100, f16, same run (2026-12-06): 32 x 10 heads x 2304 queries over 77 keys 0.0836 against
/// 0.0897 ms, 32 x 20 x 576 0.0518 against 0.0601; batch 2 at 1024x1024 0.0162 / 0.0124 against
/// 0.0156 / 0.0124 (a wave each: 16 warps a multiprocessor in flight where 32-query slices leave 8).
fn short_rows16() -> Result<bool> {
    static CHOICE: OnceLock<Option<std::result::Result<bool, String>>> = OnceLock::new();
    let parse = |name: &str| match name {
        "rows16" => Ok(true),
        "rows32" => Ok(false),
        _ => Err(format!("CELFRAME_FLASH_SHORT='{name}' is not a short-key route (expected rows16 or rows32)")),
    };
    Ok(super::env_route(&CHOICE, "CELFRAME_FLASH_SHORT", parse)?.unwrap_or(true))
}

/// Multi-head attention, the kernel chosen by head size: `flash_attention` for head dim 64 (f16 /
/// bf16 on CUDA), `gemm_attention` otherwise (any head dim; the VAE's single head of 512). Same
/// layouts and CPU twin as both. Model code calls this, not the kernels.
pub fn attention(
    ex: &Exec,
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: FlashAttention,
) -> Result<Tensor> {
    let q = q.into();
    let c = q.width;
    let flash_fits = cfg.heads > 0 && c == 64 * cfg.heads && q.dtype() != DType::F32;
    if flash_fits { flash_attention(ex, q, k, v, cfg) } else { gemm_attention(ex, q, k, v, cfg) }
}

/// `attention` of q [B, L, C] on G contexts: k and v [G, T, C] with G dividing B, context row g
/// serving the B/G consecutive query rows from g * B/G (a render's one text context per CFG half
/// for all of its frames). The result is `attention` with every k and v row repeated B/G times,
/// without the repeats: attention without a causal mask treats each query on its own, so a group's
/// B/G query rows run as one sequence of (B/G) * L queries over its T keys, one launch for all
/// groups (q, as [G, (B/G) * L, C], is the same memory). G == B is `attention`.
pub fn attention_grouped(
    ex: &Exec,
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: FlashAttention,
) -> Result<Tensor> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let (qs, ks) = (q.shape(), k.shape());
    let fits = qs.len() == 3 && ks.len() == 3 && v.shape() == ks && ks[0] > 0 && qs[2] == ks[2];
    if !fits || !qs[0].is_multiple_of(ks[0]) {
        return Err(Error::Input(format!(
            "attention_grouped: q {q:?} must be [b, sq, c] and k {k:?}, v {v:?} [g, sk, c] with g dividing b"
        )));
    }
    let (b, g) = (qs[0], ks[0]);
    if g == b {
        return attention(ex, q, k, v, cfg);
    }
    if cfg.causal {
        return Err(Error::Input(format!(
            "attention_grouped: a causal mask needs one context per query row ({g} for {b})"
        )));
    }
    let grouped = q.regrouped(&[g, b / g * qs[1]])?;
    attention(ex, grouped, k, v, cfg)?.reshape(&qs)
}

/// The short-key kernels of kernels/attention/flash.cu (cross attention over prompt tokens): keys
/// padded up to the first size that holds them, query rows per warp slice, kernel names. Same table
/// as the FLASH_SHORT instantiations there.
const FLASH_SHORT_KERNELS: [(usize, usize, &str, &str); 8] = [
    (32, 32, "flash_attention_keys32_f16", "flash_attention_keys32_bf16"),
    (64, 32, "flash_attention_keys64_f16", "flash_attention_keys64_bf16"),
    (80, 32, "flash_attention_keys80_f16", "flash_attention_keys80_bf16"),
    (128, 16, "flash_attention_keys128_f16", "flash_attention_keys128_bf16"),
    (160, 16, "flash_attention_keys160_f16", "flash_attention_keys160_bf16"),
    (192, 16, "flash_attention_keys192_f16", "flash_attention_keys192_bf16"),
    (240, 16, "flash_attention_keys240_f16", "flash_attention_keys240_bf16"),
    (256, 16, "flash_attention_keys256_f16", "flash_attention_keys256_bf16"),
];

/// `FLASH_SHORT_KERNELS`' key sets of 32-query slices, with 16-query slices (`Auto`'s choice).
const FLASH_SHORT_ROWS16_KERNELS: [(usize, usize, &str, &str); 3] = [
    (32, 16, "flash_attention_keys32_rows16_f16", "flash_attention_keys32_rows16_bf16"),
    (64, 16, "flash_attention_keys64_rows16_f16", "flash_attention_keys64_rows16_bf16"),
    (80, 16, "flash_attention_keys80_rows16_f16", "flash_attention_keys80_rows16_bf16"),
];

/// Warps per block of both flash kernels (FLASH_WARPS), query rows per block of the general one
/// (FLASH_BM) and the padded shared-memory row in elements (FLASH_LD).
const FLASH_WARPS: usize = 4;
const FLASH_BM: usize = 128;
const FLASH_LD: usize = 72;
/// Blocks of the short-key kernel per (batch, head), given `slices` query slices per (batch, head),
/// `groups` = batch x heads and `resident` blocks the device runs at once. A block loads its K/V
/// once and its warps deal the slices round-robin, so a block costs one K/V load plus its warps'
/// slices in turn; blocks run in waves of `resident`. The count of the fewest waves x (1 + slices a
/// warp) wins, the most blocks among ties (spread over more multiprocessors). A fixed blocks-per-multiprocessor
/// aim left the small batches' grids one wave and a sliver (1024x1024 batch 2, level 2: 320 blocks
/// of one slice a warp for 264 resident, so two rounds where one of two slices a warp does).
fn short_key_blocks(groups: usize, slices: usize, resident: usize) -> usize {
    let resident = resident.max(1);
    let most = slices.div_ceil(FLASH_WARPS).max(1);
    let cost = |blocks: usize| (groups * blocks).div_ceil(resident) * (1 + slices.div_ceil(FLASH_WARPS * blocks));
    (1..=most).min_by_key(|&blocks| (cost(blocks), std::cmp::Reverse(blocks))).unwrap_or(1)
}

/// The Hopper kernel's query rows per block (FH_BM) and dynamic shared memory: the Q tile and two
/// stages of K and V tiles, 16 KiB each, plus 1 KiB to align them to 1024 bytes. FLASH_SM90_BN:
/// keys a tile (FH_BN) in it and the warp-specialised kernels.
const FLASH_SM90_BM: usize = 128;
const FLASH_SM90_BN: usize = 128;
const FLASH_SM90_SHARED: usize = 5 * 16384 + 1024;
/// The warp-specialised kernels' launch for `kernel` (one of the HopperWs forms) and `dtype` (f16,
/// else bf16): entry, consumer warpgroups (64 query rows each), persistent or not. Their dynamic
/// shared memory (`flash_ws_shared`): the Q tile (two in the persistent form), FW_STAGES (3) stages
/// of K and V tiles of 16 KiB each, 1 KiB of alignment, and the mbarriers (Q full and empty per Q
/// tile, K full, V full and empty per stage).
fn flash_ws_kernel(kernel: FlashKernel, dtype: DType) -> (&'static str, usize, bool) {
    let f16 = dtype == DType::F16;
    match kernel {
        FlashKernel::HopperWs if f16 => ("flash_attention_ws_d64_f16", 2, false),
        FlashKernel::HopperWs => ("flash_attention_ws_d64_bf16", 2, false),
        FlashKernel::HopperWsPingpong if f16 => ("flash_attention_wspp_d64_f16", 2, false),
        FlashKernel::HopperWsPingpong => ("flash_attention_wspp_d64_bf16", 2, false),
        FlashKernel::HopperWsPingpong3Persistent if f16 => ("flash_attention_wspp3_persistent_d64_f16", 3, true),
        FlashKernel::HopperWsPingpong3Persistent => ("flash_attention_wspp3_persistent_d64_bf16", 3, true),
        _ if f16 => ("flash_attention_wspp_persistent_d64_f16", 2, true),
        _ => ("flash_attention_wspp_persistent_d64_bf16", 2, true),
    }
}

fn flash_ws_shared(consumers: usize, persistent: bool) -> usize {
    let q_tiles = if persistent { 2 } else { 1 };
    q_tiles * consumers * 64 * 128 + 2 * 3 * 16384 + 1024 + (2 * q_tiles + 3 * 3) * 8
}

/// A TMA tensor map over one of flash attention's q, k, v: (64 dims, heads, tokens, batch) with
/// rows `row_stride` and images `batch_stride` elements apart, read in boxes of `box_tokens` tokens
/// of one head with the 128-byte swizzle (the layout flash_sm90.cu's wgmma descriptors declare).
/// Rows past `tokens` read as zeros.
#[allow(clippy::too_many_arguments)]
fn flash_tensor_map(
    name: &str,
    ptr: u64,
    dtype: DType,
    heads: usize,
    tokens: usize,
    batch: usize,
    row_stride: i64,
    batch_stride: i64,
    box_tokens: usize,
) -> Result<TensorMap> {
    let dims = [64, heads as u64, tokens as u64, batch as u64];
    let boxes = [64, 1, box_tokens as u32, 1];
    tensor_map(
        &format!("flash_attention (Hopper TMA kernel) {name}"),
        ptr,
        dtype,
        &dims,
        &[64, row_stride, batch_stride],
        &boxes,
    )
}

/// Which flash kernel a call takes: the short-key one for non-causal attention over at most 256 keys
/// (all keys resident in shared memory, no online rescaling), the general one otherwise.
fn flash_short_variant(seq_k: usize, causal: bool) -> Option<(usize, usize, &'static str, &'static str)> {
    if causal || seq_k == 0 {
        return None;
    }
    FLASH_SHORT_KERNELS.iter().copied().find(|v| seq_k <= v.0)
}

/// O = softmax(scale * Q K^T [+ causal mask]) V per (batch, head). q is [batch, seq_q, heads * d],
/// k and v [batch, seq_k, heads * d]; the result has q's shape. Never materialises the scores on the
/// GPU (flash attention, head dim 64; non-causal attention over at most 256 keys takes a kernel that
/// holds every key in shared memory). q, k and v may be column blocks of wider rows (`Columns`);
/// the result is contiguous.
pub fn flash_attention(
    ex: &Exec,
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: FlashAttention,
) -> Result<Tensor> {
    flash_attention_with(ex, q, k, v, cfg, FlashKernel::Auto)
}

/// `flash_attention` through a chosen kernel.
pub fn flash_attention_with(
    ex: &Exec,
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: FlashAttention,
    kernel: FlashKernel,
) -> Result<Tensor> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    ex.expect_inputs("flash_attention", &[&q.tensor, &k.tensor, &v.tensor])?;
    let dtype = same_dtype("flash_attention", &[&q.tensor, &k.tensor, &v.tensor])?;
    let (b, sq, sk, c) = flash_dims(&q, &k, &v, &cfg)?;
    match ex {
        Exec::Cpu => flash_attention_reference(q, k, v, cfg, None, dtype),
        Exec::Cuda { gpu, scratch } => {
            let d = c / cfg.heads;
            if d != 64 || dtype == DType::F32 {
                return Err(Error::Unsupported(format!(
                    "flash_attention kernel: f16/bf16 with head_dim 64 only (got {dtype:?}, head_dim {d}; gemm_attention takes any)"
                )));
            }
            // The kernels keep row maxima in raw score units and scale afterwards, which needs a
            // positive scale.
            if !(cfg.scale.is_finite() && cfg.scale > 0.0) {
                return Err(Error::Input(format!("flash_attention: scale {} must be finite and > 0", cfg.scale)));
            }
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                check_rows16("flash_attention", name, x)?;
            }
            let o = gpu.empty(scratch, &q.shape(), dtype)?;
            let (c64, sq64, sk64) = (c as i64, sq as i64, sk as i64);
            let (qs, ks, vs) = (q.row_stride() as i64, k.row_stride() as i64, v.row_stride() as i64);
            let p = FlashAttentionParams {
                q: q.device_ptr()? as *const _,
                k: k.device_ptr()? as *const _,
                v: v.device_ptr()? as *const _,
                o: o.device_ptr()? as *mut _,
                q_stride: qs,
                k_stride: ks,
                v_stride: vs,
                o_stride: c64,
                q_batch_stride: sq64 * qs,
                k_batch_stride: sk64 * ks,
                v_batch_stride: sk64 * vs,
                o_batch_stride: sq64 * c64,
                batch: kernel_i32("flash_attention", "batch", b)?,
                heads: kernel_i32("flash_attention", "heads", cfg.heads)?,
                seq_q: kernel_i32("flash_attention", "queries", sq)?,
                seq_k: kernel_i32("flash_attention", "keys", sk)?,
                causal: cfg.causal as i32,
                scale: cfg.scale,
            };
            // `bench --breakdown-gemms` files each call under its shape: one kernel runs at several.
            gpu.describe_next_launch(|| {
                (format!("b{b} h{} {sq}x{sk}", cfg.heads), 4.0 * (b * cfg.heads * sq * sk * d) as f64)
            });
            let heads = grid_dim("flash_attention", "batch x heads", b * cfg.heads, GRID_YZ)?;
            let block = ((FLASH_WARPS * 32) as u32, 1, 1);
            // The Hopper kernels' grid for blocks of `rows` queries (non-persistent), after the device check.
            let hopper = |rows: usize| {
                let cc = gpu.info().compute_capability;
                if cc != (9, 0) {
                    return Err(Error::Unsupported(format!(
                        "flash_attention: the Hopper kernels need compute capability 9.0 (this device: {}.{})",
                        cc.0, cc.1
                    )));
                }
                Ok((grid_dim("flash_attention", "query tiles", sq.div_ceil(rows), GRID_X)?, heads, 1))
            };
            let short_fits = flash_short_variant(sk, cfg.causal);
            // The Hopper kernels' work tiles (128 queries of one batch and head) and the blocks a
            // persistent one runs at once.
            let work_tiles = sq.div_ceil(FLASH_SM90_BM) * b * cfg.heads;
            let sms = gpu.info().multiprocessors as usize;
            let kernel = match kernel {
                FlashKernel::Auto if short_fits.is_none() => {
                    long_flash_kernel(gpu.info().compute_capability, work_tiles, sms, cfg.causal)?
                }
                k => k,
            };
            let short = match kernel {
                FlashKernel::Auto if short_rows16()? => short_fits
                    .map(|fits| FLASH_SHORT_ROWS16_KERNELS.iter().copied().find(|v| v.0 == fits.0).unwrap_or(fits)),
                FlashKernel::Auto => short_fits,
                FlashKernel::Portable => None,
                FlashKernel::ShortRows32 => Some(short_fits.ok_or_else(|| {
                    Error::Unsupported(format!(
                        "flash_attention: the short-key kernels take non-causal attention over at most 256 keys \
                         (got {sk} keys, causal {})",
                        cfg.causal
                    ))
                })?),
                FlashKernel::Hopper => {
                    let kernel = if dtype == DType::F16 {
                        "flash_attention_sm90_d64_f16"
                    } else {
                        "flash_attention_sm90_d64_bf16"
                    };
                    gpu.launch(kernel, hopper(FLASH_SM90_BM)?, (256, 1, 1), FLASH_SM90_SHARED as u32, &p)?;
                    return Ok(o);
                }
                FlashKernel::HopperWs
                | FlashKernel::HopperWsPingpong
                | FlashKernel::HopperWsPingpongPersistent
                | FlashKernel::HopperWsPingpong3Persistent => {
                    let (entry, consumers, persistent) = flash_ws_kernel(kernel, dtype);
                    let rows = 64 * consumers;
                    let grid = hopper(rows)?;
                    // Persistent: one block per multiprocessor at most, each walking the work tiles.
                    let grid =
                        if persistent { ((sq.div_ceil(rows) * b * cfg.heads).min(sms) as u32, 1, 1) } else { grid };
                    let map = |name, ptr, tokens, row_stride, batch_stride, box_tokens| {
                        flash_tensor_map(name, ptr, dtype, cfg.heads, tokens, b, row_stride, batch_stride, box_tokens)
                    };
                    let tp = FlashTmaParams {
                        q_map: map("q", p.q as u64, sq, p.q_stride, p.q_batch_stride, rows)?,
                        k_map: map("k", p.k as u64, sk, p.k_stride, p.k_batch_stride, FLASH_SM90_BN)?,
                        v_map: map("v", p.v as u64, sk, p.v_stride, p.v_batch_stride, FLASH_SM90_BN)?,
                        attn: p,
                    };
                    let threads = 128 * (consumers as u32 + 1);
                    gpu.launch(entry, grid, (threads, 1, 1), flash_ws_shared(consumers, persistent) as u32, &tp)?;
                    return Ok(o);
                }
            };
            match short {
                Some((keys, rows, f16, bf16)) => {
                    let kernel = if dtype == DType::F16 { f16 } else { bf16 };
                    // K and V of the key set, two slice buffers per warp
                    let shared = (2 * keys + FLASH_WARPS * 2 * rows) * FLASH_LD * dtype.size();
                    let resident = gpu.occupancy(kernel, block.0, shared)? as usize * sms;
                    let blocks = short_key_blocks(b * cfg.heads, sq.div_ceil(rows), resident);
                    let grid = (grid_dim("flash_attention", "query slice groups", blocks, GRID_X)?, heads, 1);
                    gpu.launch(kernel, grid, block, shared as u32, &p)?;
                }
                None => {
                    let kernel =
                        if dtype == DType::F16 { "flash_attention_d64_f16" } else { "flash_attention_d64_bf16" };
                    let grid = (grid_dim("flash_attention", "query tiles", sq.div_ceil(FLASH_BM), GRID_X)?, heads, 1);
                    gpu.launch(kernel, grid, block, 0, &p)?;
                }
            }
            Ok(o)
        }
    }
}

/// Scratch bytes `gemm_attention` may hold for scores and probabilities at once; batches are
/// processed in groups that fit.
const GEMM_ATTENTION_SCRATCH: usize = 1 << 30;

/// The same attention as `flash_attention` (same layouts, scale, causal mask, CPU twin), for any
/// head dim: per head, S = scale · Q Kᵀ (cuBLASLt, fp32 scores in scratch), P = softmax(S) in the
/// activation dtype, O = P V (cuBLASLt, fp32 accumulation). Materialises seq_q x seq_k scores per
/// image, so it suits few heads of large dim (the VAE mid-block: one head of 512).
pub fn gemm_attention(
    ex: &Exec,
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: FlashAttention,
) -> Result<Tensor> {
    gemm_attention_budget(ex, q, k, v, cfg, GEMM_ATTENTION_SCRATCH)
}

/// `gemm_attention` holding at most `budget` bytes of scores and probabilities at once (tests force
/// the query slicing with a small one).
pub fn gemm_attention_budget(
    ex: &Exec,
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: FlashAttention,
    budget: usize,
) -> Result<Tensor> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    ex.expect_inputs("gemm_attention", &[&q.tensor, &k.tensor, &v.tensor])?;
    let dtype = same_dtype("gemm_attention", &[&q.tensor, &k.tensor, &v.tensor])?;
    let (b, sq, sk, c) = flash_dims(&q, &k, &v, &cfg)?;
    let Exec::Cuda { gpu, scratch } = ex else {
        return flash_attention_reference(q, k, v, cfg, None, dtype);
    };
    let d = c / cfg.heads;
    if !d.is_multiple_of(8) {
        return Err(Error::Unsupported(format!(
            "gemm_attention: head_dim ({d}) must be a multiple of 8 (16-byte rows for cuBLASLt)"
        )));
    }
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        check_rows16("gemm_attention", name, x)?;
    }
    // Score and probability rows padded to 8 elements keep every row 16-byte aligned.
    let ld = sk.next_multiple_of(8);
    let row_bytes = ld * (4 + dtype.size());
    // Whole images while they fit the scratch budget; one image's queries in slices when even one
    // image's scores do not (the VAE's mid-block at 1024x1024 holds 16384 x 16384 scores).
    let (group, rows) = match budget / (sq * row_bytes).max(1) {
        0 => (1, (budget / row_bytes).max(8) / 8 * 8),
        fit => (fit.min(b), sq),
    };
    if cfg.causal && rows < sq {
        return Err(Error::Unsupported(format!(
            "gemm_attention: causal attention over {sq} queries does not fit its {budget}-byte score budget"
        )));
    }
    let o = gpu.empty(scratch, &q.shape(), dtype)?;
    let scores = gpu.empty(scratch, &[group, rows, ld], DType::F32)?;
    let probs = gpu.empty(scratch, &[group, rows, ld], dtype)?;
    let (qp, kp, vp, op) = (q.device_ptr()?, k.device_ptr()?, v.device_ptr()?, o.device_ptr()?);
    let (lq, lk, lv) = (q.row_stride(), k.row_stride(), v.row_stride());
    let (sp, pp) = (scores.device_ptr()?, probs.device_ptr()?);
    let es = dtype.size() as u64;
    let mut blas = gpu.blas()?;
    for first in (0..b).step_by(group) {
        let n = group.min(b - first);
        for q0 in (0..sq).step_by(rows) {
            let m = rows.min(sq - q0);
            // S[i] = Q[i] (m x d, rows lq apart) · K[i]ᵀ (K is sk x d, rows lk apart)
            let qk = Gemm {
                m,
                n: sk,
                k: d,
                batch: n,
                b_transposed: true,
                lda: lq,
                ldb: lk,
                ldc: ld,
                stride_a: sq * lq,
                stride_b: sk * lk,
                stride_c: m * ld,
                dtype,
                out_dtype: DType::F32,
                bias: false,
                fp8: false,
                fp8_rows: false,
            };
            // O[i] = P[i] (m x sk, rows ld apart) · V[i] (sk x d, rows lv apart)
            let pv = Gemm {
                m,
                n: d,
                k: sk,
                batch: n,
                b_transposed: false,
                lda: ld,
                ldb: lv,
                ldc: c,
                stride_a: m * ld,
                stride_b: sk * lv,
                stride_c: sq * c,
                dtype,
                out_dtype: dtype,
                bias: false,
                fp8: false,
                fp8_rows: false,
            };
            for h in 0..cfg.heads {
                // Head h of image `first`, from sequence row `row`, rows `stride` apart.
                let at = |base: u64, seq: usize, row: usize, stride: usize| {
                    base + (((first * seq + row) * stride + h * d) as u64) * es
                };
                blas.gemm(gpu, &qk, GemmIo::product(at(qp, sq, q0, lq), at(kp, sk, 0, lk), sp, cfg.scale))?;
                let p = SoftmaxRowsParams {
                    scores: sp as *const f32,
                    probs: pp as *mut _,
                    rows: (n * m) as i64,
                    cols: kernel_i32("gemm_attention", "keys", sk)?,
                    ld: kernel_i32("gemm_attention", "padded keys", ld)?,
                    causal_rows: if cfg.causal { m as i32 } else { 0 },
                };
                let grid = grid_dim("gemm_attention", "softmax rows", n * m, GRID_X)?;
                gpu.launch(kernel_for!("softmax_rows", dtype), (grid, 1, 1), (256, 1, 1), 0, &p)?;
                blas.gemm(gpu, &pv, GemmIo::product(pp, at(vp, sk, 0, lv), at(op, sq, q0, c), 1.0))?;
            }
        }
    }
    Ok(o)
}

fn flash_dims(q: &Columns, k: &Columns, v: &Columns, cfg: &FlashAttention) -> Result<(usize, usize, usize, usize)> {
    let (qs, ks) = (q.shape(), k.shape());
    if qs.len() != 3 || ks.len() != 3 || v.shape() != ks || qs[0] != ks[0] || qs[2] != ks[2] {
        return Err(Error::Input(format!(
            "flash_attention: q {q:?} must be [b, sq, c] and k {k:?}, v {v:?} [b, sk, c]"
        )));
    }
    if cfg.heads == 0 || qs[2] % cfg.heads != 0 {
        return Err(Error::Input(format!("flash_attention: {} heads do not divide {} channels", cfg.heads, qs[2])));
    }
    if cfg.causal && qs[1] != ks[1] {
        return Err(Error::Input(format!(
            "flash_attention: a causal mask needs seq_q == seq_k ({} vs {})",
            qs[1], ks[1]
        )));
    }
    Ok((qs[0], qs[1], ks[1], qs[2]))
}

/// The CPU twin in f64 (see `temporal_attention_reference` for `round_to`).
pub fn flash_attention_reference(
    q: impl Into<Columns>,
    k: impl Into<Columns>,
    v: impl Into<Columns>,
    cfg: FlashAttention,
    round_to: Option<DType>,
    out_dtype: DType,
) -> Result<Tensor> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let (_, sq, sk, c) = flash_dims(&q, &k, &v, &cfg)?;
    let d = c / cfg.heads;
    let (qv, kv, vv) = (q.to_f32_vec()?, k.to_f32_vec()?, v.to_f32_vec()?);
    let round = |x: f64| round_to.map_or(x, |t| t.round(x as f32) as f64);
    let mut out = vec![0f32; qv.len()];
    // One row of `out` per query token; each row computes all heads.
    par_rows(&mut out, c, |first, rows| {
        let mut scores = vec![0f64; sk];
        for (i, orow) in rows.chunks_mut(c).enumerate() {
            let (bi, t) = ((first + i) / sq, (first + i) % sq);
            let qrow = &qv[(bi * sq + t) * c..][..c];
            for h in 0..cfg.heads {
                let keys = if cfg.causal { t + 1 } else { sk };
                let mut mx = f64::NEG_INFINITY;
                for (j, s) in scores[..keys].iter_mut().enumerate() {
                    let krow = &kv[(bi * sk + j) * c + h * d..][..d];
                    let dot: f64 = qrow[h * d..][..d].iter().zip(krow).map(|(a, b)| *a as f64 * *b as f64).sum();
                    *s = round(dot) * cfg.scale as f64;
                    mx = mx.max(*s);
                }
                let total: f64 = scores[..keys].iter().map(|s| (s - mx).exp()).sum();
                let mut acc = vec![0f64; d];
                for (j, s) in scores[..keys].iter().enumerate() {
                    let pj = round((s - mx).exp() / total);
                    for (a, x) in acc.iter_mut().zip(&vv[(bi * sk + j) * c + h * d..][..d]) {
                        *a += pj * *x as f64;
                    }
                }
                for (o, a) in orow[h * d..][..d].iter_mut().zip(&acc) {
                    *o = *a as f32;
                }
            }
        }
    });
    Tensor::from_f32(&q.shape(), out_dtype, &out)
}

#[cfg(test)]
mod tests {
    use super::{
        FLASH_SHORT_KERNELS, FLASH_SHORT_ROWS16_KERNELS, FlashKernel, flash_short_variant, flash_ws_kernel,
        long_flash_default, short_key_blocks,
    };
    use crate::gpu::KERNEL_MODULES;
    use crate::tensor::DType;

    #[test]
    fn the_flash_kernel_variable_takes_the_kernel_names_only() {
        assert_eq!(FlashKernel::parse("portable"), Ok(FlashKernel::Portable));
        assert_eq!(FlashKernel::parse("hopper"), Ok(FlashKernel::Hopper));
        assert_eq!(FlashKernel::parse("hopper-ws"), Ok(FlashKernel::HopperWs));
        assert_eq!(FlashKernel::parse("hopper-wspp"), Ok(FlashKernel::HopperWsPingpong));
        assert_eq!(FlashKernel::parse("hopper-wspp-persistent"), Ok(FlashKernel::HopperWsPingpongPersistent));
        assert_eq!(FlashKernel::parse("hopper-wspp3-persistent"), Ok(FlashKernel::HopperWsPingpong3Persistent));
        for bad in ["", "Hopper", "auto", "sm90", "hopper-wsp"] {
            let err = FlashKernel::parse(bad).unwrap_err();
            assert!(err.contains("CELFRAME_FLASH_KERNEL") && err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn hopper_takes_the_persistent_kernel_from_sixteen_waves_of_non_causal_tiles() {
        // H200: 132 multiprocessors. b32 x 20 heads x 576 tokens: 5 tiles x 640 = 3200 >= 2112.
        assert_eq!(long_flash_default((9, 0), 3200, 132, false), FlashKernel::HopperWsPingpong3Persistent);
        assert_eq!(long_flash_default((9, 0), 2112, 132, false), FlashKernel::HopperWsPingpong3Persistent);
        // b2 x 10 heads x 4096 tokens: 640 tiles, 4.8 waves; a causal mask at any size.
        assert_eq!(long_flash_default((9, 0), 640, 132, false), FlashKernel::HopperWsPingpong);
        assert_eq!(long_flash_default((9, 0), 100_000, 132, true), FlashKernel::HopperWsPingpong);
        assert_eq!(long_flash_default((8, 9), 100_000, 128, false), FlashKernel::Portable);
    }

    #[test]
    fn the_warp_specialised_entries_are_compiled_for_hopper_without_spills() {
        // ptxas's sm_90a report for each entry the launch names: a missing name would only show on
        // a GPU, a spill (local memory in the consumers' 240 registers) costs the overlap.
        let resources: Vec<_> = KERNEL_MODULES.iter().flat_map(|m| m.sm90_resources.iter()).collect();
        let mut names = std::collections::BTreeSet::new();
        let kernels = [
            FlashKernel::HopperWs,
            FlashKernel::HopperWsPingpong,
            FlashKernel::HopperWsPingpongPersistent,
            FlashKernel::HopperWsPingpong3Persistent,
        ];
        for kernel in kernels {
            for dtype in [DType::F16, DType::BF16] {
                let (name, _, _) = flash_ws_kernel(kernel, dtype);
                let r = resources.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{name} is not compiled"));
                assert!(r.registers > 0 && r.spill_bytes == 0 && r.stack_bytes == 0, "{r:?}");
                names.insert(name);
            }
        }
        assert_eq!(names.len(), 8, "one entry per variant and dtype: {names:?}");
    }

    #[test]
    fn the_short_key_tables_match_the_compiled_kernels() {
        // FLASH_SHORT(NAME, NK, MT, MINB) lines of the kernel source, as (name, keys, rows per slice).
        let source = include_str!("../../kernels/attention/flash.cu");
        let compiled: Vec<(String, usize, usize)> = source
            .lines()
            .filter_map(|l| l.strip_prefix("FLASH_SHORT(")?.strip_suffix(')'))
            .map(|args| {
                let a: Vec<&str> = args.split(',').map(str::trim).collect();
                let (nk, mt): (usize, usize) = (a[1].parse().unwrap(), a[2].parse().unwrap());
                let keys = a[0].strip_prefix("keys").and_then(|k| k.split('_').next()?.parse().ok());
                assert_eq!(keys, Some(16 * nk), "FLASH_SHORT({args}): keys{{16 NK}} must name it");
                (a[0].to_string(), 16 * nk, 16 * mt)
            })
            .collect();
        let tables = FLASH_SHORT_KERNELS.iter().chain(&FLASH_SHORT_ROWS16_KERNELS);
        let names: Vec<&str> = KERNEL_MODULES.iter().flat_map(|m| m.kernels.iter().copied()).collect();
        let mut table = Vec::new();
        for &(keys, rows, f16, bf16) in tables {
            assert!(names.contains(&f16) && names.contains(&bf16), "{f16} / {bf16} are not compiled");
            let name = f16.strip_prefix("flash_attention_").and_then(|n| n.strip_suffix("_f16")).unwrap();
            assert_eq!(bf16, format!("flash_attention_{name}_bf16"));
            table.push((name.to_string(), keys, rows));
        }
        assert_eq!(table, compiled);
        // the 16-query forms are of key sets whose own kernels take 32-query slices
        for (keys, rows, ..) in FLASH_SHORT_ROWS16_KERNELS {
            assert_eq!(rows, 16);
            assert!(FLASH_SHORT_KERNELS.iter().any(|v| v.0 == keys && v.1 == 32), "{keys} keys");
        }
    }

    #[test]
    fn short_key_sets_take_the_smallest_kernel_that_holds_them() {
        for seq_k in 1..=256 {
            let (keys, ..) = flash_short_variant(seq_k, false).unwrap();
            let smaller = FLASH_SHORT_KERNELS.iter().filter(|v| v.0 < keys).map(|v| v.0).max().unwrap_or(0);
            assert!(smaller < seq_k && seq_k <= keys, "{seq_k} keys took the {keys}-key kernel");
        }
        assert!(flash_short_variant(257, false).is_none());
        assert!(flash_short_variant(77, true).is_none(), "causal attention takes the general kernel");
        assert!(flash_short_variant(0, false).is_none());
    }

    #[test]
    fn short_key_grids_fill_whole_waves() {
        // H100/H200 with two 4-warp blocks a multiprocessor: 264 resident. 1024x1024 batch 2,
        // level 2 (40 heads x images, 32 slices of 32 queries): six blocks each, 240 in one wave,
        // at most two slices a warp, where eight (320 blocks, one slice a warp) take two waves.
        assert_eq!(short_key_blocks(40, 32, 264), 6);
        // Level 1 (20 heads x images, 128 slices): 13 blocks each (260, three slices a warp).
        assert_eq!(short_key_blocks(20, 128, 264), 13);
        // 32 images 1024x576 level 1 (320 groups, 72 slices): 3 blocks each, four waves of six
        // slices a warp (28 units; 2 or 4 blocks cost 30, 1 costs 38).
        assert_eq!(short_key_blocks(320, 72, 264), 3);
        // Never more blocks than slices for their warps, never none.
        assert_eq!(short_key_blocks(1, 3, 264), 1);
        assert_eq!(short_key_blocks(1, 40, 264), 10);
        assert_eq!(short_key_blocks(7, 0, 0), 1);
    }
}
