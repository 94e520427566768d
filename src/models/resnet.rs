//! ResnetBlock2D (diffusers `models/resnet.py`): GroupNorm + SiLU + 3x3 conv twice, the time
//! embedding projected and added in between (UNet; the VAE's ResNets have none), a 1x1 shortcut
//! when the width changes. Shared by the UNet and the VAE decoder.

use super::weights::Scope;
use crate::error::Result;
use crate::ops::Exec;
use crate::ops::conv::{Conv2d, ConvResidual, conv2d, conv2d_residual};
use crate::ops::elementwise::{add, residual_add};
use crate::ops::linear::linear;
use crate::ops::norm::{GroupNorm, group_norm, group_norm_concat, group_norm_of_biased};
use crate::tensor::Tensor;
use crate::weights::TensorSpec;

/// The fewest tensors a ResNet has (norm1, conv1, norm2, conv2, weights and biases: no time
/// embedding, no shortcut), for bounding a config by its checkpoint.
pub const MIN_TENSORS: usize = 8;

/// One ResNet block (diffusers ResnetBlock2D); a 1x1 `conv_shortcut` exists iff the widths differ.
#[derive(Clone, Debug, PartialEq)]
pub struct Resnet {
    pub in_channels: usize,
    pub out_channels: usize,
}

impl Resnet {
    pub fn has_shortcut(&self) -> bool {
        self.in_channels != self.out_channels
    }
}

/// Settings shared by every ResNet of a model.
#[derive(Clone, Copy, Debug)]
pub struct ResnetNorm {
    pub groups: usize,
    pub eps: f32,
    /// The block's output is divided by this (diffusers' `output_scale_factor`, 1 in SDXL).
    pub output_scale: f32,
}

/// x [B, H, W, in] NHWC -> [B, H, W, out]. `emb_act` = SiLU(time embedding) [B, T] for the UNet's
/// ResNets; the VAE's have no time embedding (`temb_channels=None` in diffusers) and pass None.
pub fn forward(
    ex: &Exec,
    w: &Scope,
    r: &Resnet,
    cfg: ResnetNorm,
    x: &Tensor,
    emb_act: Option<&Tensor>,
) -> Result<Tensor> {
    forward_frames(ex, w, r, cfg, 1, x, emb_act)
}

/// `forward` on video frames folded into the batch (x [B*F, H, W, in], row = video * F + frame):
/// `emb_act` may hold one row per video ([B, T]; its projection is added to each of the video's
/// frames), and the group norms' statistics span `norm_frames` consecutive rows (1: per frame).
pub fn forward_frames(
    ex: &Exec,
    w: &Scope,
    r: &Resnet,
    cfg: ResnetNorm,
    norm_frames: usize,
    x: &Tensor,
    emb_act: Option<&Tensor>,
) -> Result<Tensor> {
    forward_input(ex, w, r, cfg, norm_frames, Input::One(x), emb_act)
}

/// `forward_frames` on the concatenation [x, skip] on the channels (an up block's layer input),
/// never written by a pass of its own: norm1 reads the two parts and writes the concatenation for
/// the shortcut in the same pass (`group_norm_concat`); x is dropped once read.
#[allow(clippy::too_many_arguments)]
pub fn forward_frames_concat(
    ex: &Exec,
    w: &Scope,
    r: &Resnet,
    cfg: ResnetNorm,
    norm_frames: usize,
    x: Tensor,
    skip: &Tensor,
    emb_act: Option<&Tensor>,
) -> Result<Tensor> {
    forward_input(ex, w, r, cfg, norm_frames, Input::Concat(x, skip), emb_act)
}

/// A block's input: one tensor, or the two parts of a concatenation on the channels.
enum Input<'a> {
    One(&'a Tensor),
    Concat(Tensor, &'a Tensor),
}

fn forward_input(
    ex: &Exec,
    w: &Scope,
    r: &Resnet,
    cfg: ResnetNorm,
    norm_frames: usize,
    x: Input,
    emb_act: Option<&Tensor>,
) -> Result<Tensor> {
    let _scope = ex.profile_scope("resnet");
    let gn = GroupNorm { groups: cfg.groups, eps: cfg.eps, silu: true, frames: norm_frames };
    let same = Conv2d { stride: 1, padding: 1 };
    // The convolutions' biases ride in the passes that follow them (one pass over the activation
    // where bias, time embedding and residual each took one): summed per forward, not at load, as
    // LoRA files and the device LoRA switch may change them.
    // Each step replaces `h`, so the arena gets the previous activation back at once.
    // 1. h = conv1(SiLU(norm1(x))): [B, H, W, in] -> [B, H, W, out] (x = [x, skip] from here on)
    let (norm1_weight, norm1_bias) = (w.get("norm1.weight")?, w.get("norm1.bias")?);
    let (mut h, x) = match x {
        Input::One(x) => (group_norm(ex, x, norm1_weight, norm1_bias, gn)?, x.clone()),
        Input::Concat(x, skip) => group_norm_concat(ex, &x, skip, norm1_weight, norm1_bias, gn)?,
    };
    let conv1_bias = w.get("conv1.bias")?;
    h = conv2d(ex, &h, w.get("conv1.weight")?, None, same)?;
    // 2. + time_emb_proj(SiLU(emb)) + conv1's bias per image or video: [B, T] -> [B, out] (conv1's
    // bias added to the projection's). Without a time embedding (the VAE) conv1's bias alone.
    let shift = match emb_act {
        Some(emb_act) => {
            let bias = add(ex, w.get("time_emb_proj.bias")?, conv1_bias, 1.0)?;
            linear(ex, emb_act, w.get("time_emb_proj.weight")?, Some(&bias))?
        }
        None => conv1_bias.clone(),
    };
    // 3. h = SiLU(norm2(h + shift)) (dropout is the identity at inference): the shift is added
    // inside norm2 (one row per image or video, over its frames' pixels), not by a pass over h
    h = group_norm_of_biased(ex, &h, &shift, w.get("norm2.weight")?, w.get("norm2.bias")?, gn)?;
    // 4. (shortcut(x) + conv2(h)) / output_scale with both convolutions' biases: conv2 runs here,
    // on step 3's h, and the shortcut conv without its bias, which joins conv2's.
    let (conv2_weight, conv2_bias) = (w.get("conv2.weight")?, w.get("conv2.bias")?);
    let (shortcut, shortcut_bias) = match r.has_shortcut() {
        true => (
            conv2d(ex, &x, w.get("conv_shortcut.weight")?, None, Conv2d { stride: 1, padding: 0 })?,
            Some(w.get("conv_shortcut.bias")?),
        ),
        false => (x, None),
    };
    // At output scale 1 (SDXL's UNet and VAE) one cuDNN call adds the shortcut and the biases to
    // conv2's fp32 sums before its one rounding (`conv2d_residual`; a shape cuDNN refuses takes
    // the pass below); the two biases are summed per forward, as LoRAs may change them.
    if cfg.output_scale == 1.0 && ConvResidual::from_env()? == ConvResidual::Fused {
        let bias = match shortcut_bias {
            Some(b) => add(ex, conv2_bias, b, 1.0)?,
            None => conv2_bias.clone(),
        };
        return conv2d_residual(ex, &h, conv2_weight, &shortcut, &bias, same);
    }
    // Otherwise conv2 alone, then one pass adding the shortcut and both biases in fp32.
    h = conv2d(ex, &h, conv2_weight, None, same)?;
    residual_add(ex, &h, &shortcut, conv2_bias, shortcut_bias, 1.0 / cfg.output_scale)
}

/// The block's tensors (PyTorch shapes) under `prefix`; `temb` is the time embedding width, None
/// for a ResNet without one (no `time_emb_proj`).
pub fn specs(prefix: &str, r: &Resnet, temb: Option<usize>, out: &mut Vec<TensorSpec>) {
    let (i, o) = (r.in_channels, r.out_channels);
    let mut put = |name: &str, shape: &[usize]| out.push(TensorSpec::new(format!("{prefix}.{name}"), shape));
    put("norm1.weight", &[i]);
    put("norm1.bias", &[i]);
    put("conv1.weight", &[o, i, 3, 3]);
    put("conv1.bias", &[o]);
    if let Some(temb) = temb {
        put("time_emb_proj.weight", &[o, temb]);
        put("time_emb_proj.bias", &[o]);
    }
    put("norm2.weight", &[o]);
    put("norm2.bias", &[o]);
    put("conv2.weight", &[o, o, 3, 3]);
    put("conv2.bias", &[o]);
    if r.has_shortcut() {
        put("conv_shortcut.weight", &[o, i, 1, 1]);
        put("conv_shortcut.bias", &[o]);
    }
}
