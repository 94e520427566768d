//! The UNet's down path, mid block and up path (diffusers `models/unets/unet_2d_blocks.py`:
//! DownBlock2D / CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D / CrossAttnUpBlock2D) as
//! free functions over block specs and a weight `Scope`, so that models with the same blocks reuse
//! them: a ControlNet runs `down` and `mid` on its own weights, and motion modules slot in through
//! the per-layer hook.
//!
//! Hooks: `down` hands out the skip connections, the caller may add residuals to them before `up`
//! takes them (ControlNet's down residuals, and its mid residual after `mid`), and `hook` is called
//! with every layer's output (`LayerPos`), where AnimateDiff inserts a temporal transformer
//! (diffusers `models/unets/unet_motion_model.py`: after each ResNet [+ Transformer2D] of the down
//! and up blocks, before the skip is taken and before the down- or up-sampler; in
//! UNetMidBlockCrossAttnMotion, after the mid transformer, before the second ResNet).

use super::config::{DownBlock, Layer, MidBlock, UpBlock};
use super::conv;
use crate::error::{Error, Result};
use crate::models::resnet::{self, ResnetNorm};
use crate::models::transformer::{self, TextContext};
use crate::models::weights::Scope;
use crate::ops::Exec;
use crate::ops::upsample::{upsample2x_conv3x3, upsample2x_conv3x3_concat};
use crate::tensor::Tensor;

/// The part of the UNet a layer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnetPath {
    Down,
    Mid,
    Up,
}

/// Where a layer sits: layer `layer` (its ResNet and, in cross-attention blocks, its transformer)
/// of `down_blocks.{block}` or `up_blocks.{block}`; the mid block is block 0, layer 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerPos {
    pub path: UnetPath,
    pub block: usize,
    pub layer: usize,
}

/// Called with each layer's output [B, H, W, C]; the path continues with what it returns (the
/// identity when no module is inserted).
pub type LayerHook<'a> = dyn FnMut(LayerPos, &Exec, Tensor) -> Result<Tensor> + 'a;

/// What every layer reads besides its own weights.
pub struct Conditioning<'a> {
    /// SiLU(time embedding) [B, T] (B images, or videos whose frames share it): every ResNet
    /// projects it.
    pub emb_act: &'a Tensor,
    /// Text context [G, tokens, X] for the cross-attentions, G dividing the rows: row g serves the
    /// rows / G images or frames from g * rows / G (one per row, or one per video of a render),
    /// with their k and v when computed beforehand.
    pub context: TextContext<'a>,
    /// The ResNets' GroupNorm and output scale (`resnet_out_scale_factor`).
    pub norm: ResnetNorm,
    /// The mid block's ResNets' output scale (`mid_block_scale_factor`).
    pub mid_output_scale: f32,
    /// Rows sharing one group-norm domain (`Frames::norm_frames`: 1, or a video's frames).
    pub norm_frames: usize,
}

/// The down blocks on `h` [B, H, W, C0] (conv_in's output): the lowest-resolution activation and
/// the skip connections in diffusers' order (`h` itself, each layer's output after the hook, each
/// downsampler's output).
pub fn down(
    ex: &Exec,
    w: &Scope,
    blocks: &[DownBlock],
    cond: &Conditioning,
    h: Tensor,
    hook: &mut LayerHook,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut h = h;
    let mut skips = vec![h.clone()];
    for (i, block) in blocks.iter().enumerate() {
        let bw = w.at(&format!("down_blocks.{i}"));
        for (j, layer) in block.layers.iter().enumerate() {
            h = layer_forward(ex, &bw, j, layer, cond, h, None)?;
            h = hook(LayerPos { path: UnetPath::Down, block: i, layer: j }, ex, h)?;
            skips.push(h.clone());
        }
        if block.downsample {
            // [B, H, W, C] -> [B, H/2, W/2, C]
            h = conv(ex, &bw.at("downsamplers.0.conv"), &h, 2, 3)?;
            skips.push(h.clone());
        }
    }
    Ok((h, skips))
}

/// The mid block at the lowest resolution: ResNet, transformer, (hook), ResNet; [B, h, w, C] in
/// and out.
pub fn mid(
    ex: &Exec,
    w: &Scope,
    mid: &MidBlock,
    cond: &Conditioning,
    h: Tensor,
    hook: &mut LayerHook,
) -> Result<Tensor> {
    let mw = w.at("mid_block");
    let norm = ResnetNorm { output_scale: cond.mid_output_scale, ..cond.norm };
    let frames = cond.norm_frames;
    let mut h = resnet::forward_frames(ex, &mw.at("resnets.0"), &mid.resnets[0], norm, frames, &h, Some(cond.emb_act))?;
    h = transformer::forward(ex, &mw.at("attentions.0"), &mid.attention, norm.groups, frames, &h, cond.context)?;
    h = hook(LayerPos { path: UnetPath::Mid, block: 0, layer: 0 }, ex, h)?;
    resnet::forward_frames(ex, &mw.at("resnets.1"), &mid.resnets[1], norm, frames, &h, Some(cond.emb_act))
}

/// The up blocks: each layer takes [h, skip] (channels concatenated), the last skip first, then
/// the hook; all but the last block end in nearest 2x + 3x3 conv, which the next block's first
/// layer runs together with its concatenation (the upsampler writes [h, skip] itself). -> [B, H, W, C0]
pub fn up(
    ex: &Exec,
    w: &Scope,
    blocks: &[UpBlock],
    cond: &Conditioning,
    h: Tensor,
    mut skips: Vec<Tensor>,
    hook: &mut LayerHook,
) -> Result<Tensor> {
    let mut h = h;
    // The previous block's upsampler (`upsamplers.0.conv`), not yet applied to h.
    let mut upsampler = None;
    for (i, block) in blocks.iter().enumerate() {
        let bw = w.at(&format!("up_blocks.{i}"));
        for (j, layer) in block.layers.iter().enumerate() {
            // UnetConfig::validate matched every up layer with a skip.
            let skip = skips.pop().ok_or_else(|| Error::Internal(format!("up_blocks.{i} layer {j}: no skip left")))?;
            // on [B, H, W, C + C_skip]: written by the upsampler, else read from its two parts
            h = match upsampler.take() {
                Some(up) => layer_forward(ex, &bw, j, layer, cond, upsample_concat(ex, &up, &h, Some(&skip))?, None)?,
                None => layer_forward(ex, &bw, j, layer, cond, h, Some(&skip))?,
            };
            h = hook(LayerPos { path: UnetPath::Up, block: i, layer: j }, ex, h)?;
        }
        if block.upsample {
            upsampler = Some(bw.at("upsamplers.0.conv"));
        }
    }
    match upsampler {
        Some(up) => upsample_concat(ex, &up, &h, None),
        None => Ok(h),
    }
}

/// [B, H, W, C] -> nearest [B, 2H, 2W, C] -> 3x3 conv, then the skip's channels after it.
fn upsample_concat(ex: &Exec, up: &Scope, h: &Tensor, skip: Option<&Tensor>) -> Result<Tensor> {
    let (weight, bias) = (up.get("weight")?, Some(up.get("bias")?));
    match skip {
        Some(skip) => upsample2x_conv3x3_concat(ex, h, weight, bias, skip),
        None => upsample2x_conv3x3(ex, h, weight, bias),
    }
}

/// One layer of a down or up block: `resnets.{j}` (on [h, skip] when a skip is given), then
/// `attentions.{j}` in cross-attention blocks.
fn layer_forward(
    ex: &Exec,
    bw: &Scope,
    j: usize,
    layer: &Layer,
    cond: &Conditioning,
    h: Tensor,
    skip: Option<&Tensor>,
) -> Result<Tensor> {
    let (rw, frames, emb) = (bw.at(&format!("resnets.{j}")), cond.norm_frames, Some(cond.emb_act));
    let h = match skip {
        Some(skip) => resnet::forward_frames_concat(ex, &rw, &layer.resnet, cond.norm, frames, h, skip, emb)?,
        None => resnet::forward_frames(ex, &rw, &layer.resnet, cond.norm, frames, &h, emb)?,
    };
    match &layer.attention {
        Some(t) => {
            let aw = bw.at(&format!("attentions.{j}"));
            transformer::forward(ex, &aw, t, cond.norm.groups, frames, &h, cond.context)
        }
        None => Ok(h),
    }
}
