//! AnimateDiffTransformer3D (diffusers `models/unets/unet_motion_model.py`) with its
//! BasicTransformerBlocks in the motion configuration (diffusers `models/attention.py`:
//! `double_self_attention`, `positional_embeddings="sinusoidal"`, GEGLU, no q/k/v bias), run
//! directly on the NHWC frame-major layout: a video's frames are consecutive rows of the batch,
//! and `temporal_attention` attends over them for every pixel without any transpose. Both
//! attentions are self-attentions: q, k and v come from one GEMM of width 3C (`fusions`).

use super::config::TemporalTransformer;
use crate::error::{Error, Result};
use crate::models::transformer::{PendingBias, QKV, block_feed_forward, norm_linear};
use crate::models::weights::{Fusion, Scope};
use crate::ops::Exec;
use crate::ops::attention::{Columns, TemporalAttention, temporal_attention};
use crate::ops::linear::{linear, linear_add};
use crate::ops::norm::{GroupNorm, group_norm};
use crate::tensor::{DType, Tensor};

/// GroupNorm eps of AnimateDiffTransformer3D (fixed in diffusers).
const GROUP_NORM_EPS: f32 = 1e-6;

/// The sinusoidal position table, positions 0..`positions`: [positions * C] (diffusers
/// `models/embeddings.py`, SinusoidalPositionalEmbedding: `pe[p, 2i] = sin(p / 10000^(2i / C))`,
/// `pe[p, 2i + 1]` the cosine of the same angle; interleaved, unlike the UNet's cos-then-sin
/// timestep embedding). For checkpoints that store none.
pub fn position_table(positions: usize, channels: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(positions * channels);
    for p in 0..positions {
        values.extend((0..channels).map(|k| {
            let freq = (-(10000f64.ln()) * (k / 2 * 2) as f64 / channels as f64).exp();
            let angle = p as f64 * freq;
            (if k % 2 == 0 { angle.sin() } else { angle.cos() }) as f32
        }));
    }
    values
}

/// The rows a forward adds: [videos * frames, C], row video * frames + f holding `table`'s position
/// f, in `dtype` on the host (the caller puts them where the forward runs).
pub fn position_rows(table: &[f32], videos: usize, frames: usize, channels: usize, dtype: DType) -> Result<Tensor> {
    let first = table.get(..frames * channels).ok_or_else(|| {
        Error::Internal(format!("a position table of {} values has no {frames} positions", table.len()))
    })?;
    Tensor::from_f32(&[videos * frames, channels], dtype, &first.repeat(videos))
}

/// The position rows of attention `attn` (1 or 2) of transformer block `block`, where the forward
/// runs.
pub type PositionRows<'a> = dyn FnMut(usize, usize) -> Result<Tensor> + 'a;

/// x [B*F, H, W, C] (row = video * F + frame) -> [B*F, H, W, C]; `pe` gives each attention's
/// position rows ([B*F, C]); `groups` of the module's GroupNorm.
pub fn forward(
    ex: &Exec,
    w: &Scope,
    m: &TemporalTransformer,
    groups: usize,
    frames: usize,
    x: &Tensor,
    pe: &mut PositionRows,
) -> Result<Tensor> {
    let _scope = ex.profile_scope("motion");
    let (n, h, wd, c) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    // 1. GroupNorm over each video's frames ([B, C, F, H, W] in diffusers: statistics per group span
    //    C/groups x F x H x W), tokens [B*F, H*W, C] (for each pixel, its F frames are the sequence)
    let gn = GroupNorm { groups, eps: GROUP_NORM_EPS, silu: false, frames };
    let mut hs = group_norm(ex, x, w.get("norm.weight")?, w.get("norm.bias")?, gn)?.reshape(&[n, h * wd, c])?;
    // 2. proj_in: [B*F, H*W, C] -> [B*F, H*W, C]. Its bias, to_out.0's and ff.net.2's are left
    //    pending (`PendingBias`) and reach proj_out through its weight, unless proj_out runs in FP8
    //    (its weight is then e4m3 only, and each linear adds its own bias).
    let (proj_out, proj_out_bias) = (w.linear("proj_out.weight")?, w.get("proj_out.bias")?);
    let proj_in_bias = w.get("proj_in.bias")?;
    let (mut pending, proj_in_bias) = match proj_out.fp8 {
        None => (PendingBias::starting_with(proj_in_bias), None),
        Some(_) => (PendingBias::default(), Some(proj_in_bias)),
    };
    hs = linear(ex, &hs, w.linear("proj_in.weight")?, proj_in_bias)?;
    // 3. blocks
    for b in 0..m.depth {
        let mut rows = |attn: usize| pe(b, attn);
        let scope = w.at(&format!("transformer_blocks.{b}"));
        hs = block(ex, &scope, m.heads, frames, &hs, &mut rows, &mut pending)?;
    }
    // 4. proj_out, + residual, back to [B*F, H, W, C]: proj_out(x + p) + b = proj_out(x) + (W p + b)
    let bias = match pending.shift() {
        Some(p) => linear(ex, &p.reshape(&[1, c])?, proj_out, Some(proj_out_bias))?.reshape(&[c])?,
        None => proj_out_bias.clone(),
    };
    let residual = x.reshape(&[n, h * wd, c])?;
    hs = linear_add(ex, &hs, proj_out, Some(&bias), Some(&residual))?;
    hs.reshape(&[n, h, wd, c])
}

/// BasicTransformerBlock with two temporal self-attentions: x += attn1(LN1(x) + pe);
/// x += attn2(LN2(x) + pe); x += FF(LN3(x)). x [B*F, L, C], lacking the `pending` biases.
fn block(
    ex: &Exec,
    w: &Scope,
    heads: usize,
    frames: usize,
    x: &Tensor,
    pe: &mut dyn FnMut(usize) -> Result<Tensor>,
    pending: &mut PendingBias,
) -> Result<Tensor> {
    // 1.-2. the two attentions; the position table is added to the normalised input, not the stream
    let mut x = x.clone();
    for (k, (norm, attn)) in [("norm1", "attn1"), ("norm2", "attn2")].into_iter().enumerate() {
        // LayerNorm(x + pending) + [B*F, C] per frame, through the fused [3C, C] weight: [B*F, L, 3C]
        let (rows, weight) = (pe(k + 1)?, w.at(attn).linear_rows(&QKV)?);
        let qkv = norm_linear(ex, w, norm, &x, pending.shift(), Some(&rows), weight)?;
        x = attention(ex, &w.at(attn), heads, frames, &qkv, &x, pending)?;
    }
    // 3. GEGLU feed-forward: [B*F, L, C] -> [B*F, L, 8C] -> [B*F, L, 4C] -> [B*F, L, C]
    block_feed_forward(ex, w, &x, pending)
}

/// The fused projections among the motion modules' weights (graph names first): every
/// attention's to_q, to_k and to_v as one [3C, C] matrix, as `attention` reads them.
pub fn fusions<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<Fusion> {
    let module = |n: &'a String| n.strip_suffix(".to_q.weight");
    names.into_iter().filter_map(module).map(|m| Fusion { module: m.to_string(), parts: &QKV, stack: None }).collect()
}

/// Self-attention over the frames of each (video, pixel, head): softmax(q k^T / sqrt(d)) v with q,
/// k and v from one GEMM by the fused [3C, C] weight (`qkv` [B*F, L, 3C]), then to_out.0, whose
/// epilogue adds the residual (and its bias, unless biases are `pending`: then it joins them).
fn attention(
    ex: &Exec,
    w: &Scope,
    heads: usize,
    frames: usize,
    qkv: &Tensor,
    residual: &Tensor,
    pending: &mut PendingBias,
) -> Result<Tensor> {
    let [q, k, v] = Columns::split(qkv)?;
    let head_dim = residual.shape()[2] / heads.max(1);
    let cfg = TemporalAttention { frames, heads, scale: 1.0 / (head_dim as f32).sqrt() };
    let o = temporal_attention(ex, q, k, v, cfg)?;
    let bias = pending.epilogue(ex, w.get("to_out.0.bias")?)?;
    linear_add(ex, &o, w.linear("to_out.0.weight")?, bias, Some(residual))
}
