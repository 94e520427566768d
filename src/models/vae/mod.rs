//! The SDXL VAE decoder (diffusers `AutoencoderKL.decode`: `post_quant_conv`, then
//! `models/autoencoders/vae.py` `Decoder`) on the ops, NHWC. The same graph runs on the CPU twins
//! or the CUDA ops, chosen by the `Exec`. Its ResNets are `models::resnet`'s, shared with the
//! UNet (no time embedding here).
//!
//! - `config`: the architecture from a diffusers config.json (or a single file's shapes).
//! - `checkpoint`: opening a diffusers folder or a single-file checkpoint (LDM names), strictly.
//! - `frames`: decoding many frames in bounded memory (chunks of frames, spatial tiles with
//!   blended seams as diffusers' `tiled_decode`), with the peak scratch memory reported.
//!
//! The decode formula (diffusers `pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py`;
//! `shift_factor` as in `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`): the
//! sampler's latents are divided by `scaling_factor` (plus `shift_factor` if any) to give `z`;
//! `decode(z)` is `post_quant_conv`, the decoder, and an image roughly in [-1, 1]
//! (`frames::decode_frames` does the division, `forward` takes `z`).

pub mod checkpoint;
pub mod config;
pub mod frames;

pub use checkpoint::{VaeCheckpoint, VaeFormat, open_vae};
pub use config::VaeConfig;
pub use frames::{DecodeOptions, DecodeReport, Tiling};

use super::resnet::{self, Resnet, ResnetNorm};
use super::weights::{ModelWeights, Place, Scope};
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::ops::attention::{self, FlashAttention};
use crate::ops::conv::{Conv2d, conv2d};
use crate::ops::elementwise::add;
use crate::ops::linear::linear;
use crate::ops::norm::{GroupNorm, group_norm};
use crate::ops::upsample::upsample2x_conv3x3;
use crate::tensor::{DType, Tensor};
use crate::weights::TensorSpec;
use config::NORM_EPS;

pub struct Vae {
    pub config: VaeConfig,
    weights: ModelWeights,
}

impl Vae {
    /// Prepares a loaded checkpoint's weights for `place` (host tensors for the CPU twins, device
    /// tensors for CUDA) in the place's dtype.
    pub fn new(checkpoint: &VaeCheckpoint, place: Place) -> Result<Vae> {
        let weights = ModelWeights::prepare(&checkpoint.weights, &checkpoint.names, place)?;
        Ok(Vae { config: checkpoint.config.clone(), weights })
    }

    pub fn dtype(&self) -> DType {
        self.weights.dtype()
    }

    /// The prepared weights (which of them a forward has read: `ModelWeights::unread`).
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// Every tensor the decoder reads, by diffusers name, with PyTorch shapes. The encoder and
    /// `quant_conv` are not listed: loaders skip them.
    pub fn tensor_specs(cfg: &VaeConfig) -> Vec<TensorSpec> {
        let mut specs = Vec::new();
        let z = cfg.latent_channels;
        let top = cfg.mid_channels();
        if cfg.post_quant_conv {
            conv_specs("post_quant_conv", z, z, 1, &mut specs);
        }
        conv_specs("decoder.conv_in", top, z, 3, &mut specs);
        let mid = Resnet { in_channels: top, out_channels: top };
        resnet::specs("decoder.mid_block.resnets.0", &mid, None, &mut specs);
        if cfg.mid_block_attention {
            let p = "decoder.mid_block.attentions.0";
            specs.push(TensorSpec::new(format!("{p}.group_norm.weight"), &[top]));
            specs.push(TensorSpec::new(format!("{p}.group_norm.bias"), &[top]));
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                specs.push(TensorSpec::new(format!("{p}.{proj}.weight"), &[top, top]));
                specs.push(TensorSpec::new(format!("{p}.{proj}.bias"), &[top]));
            }
        }
        resnet::specs("decoder.mid_block.resnets.1", &mid, None, &mut specs);
        for (i, (input, output)) in up_widths(cfg).into_iter().enumerate() {
            for j in 0..=cfg.layers_per_block {
                let r = up_resnet(input, output, j);
                resnet::specs(&format!("decoder.up_blocks.{i}.resnets.{j}"), &r, None, &mut specs);
            }
            if i + 1 < cfg.block_out_channels.len() {
                conv_specs(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), output, output, 3, &mut specs);
            }
        }
        let c0 = cfg.block_out_channels[0];
        specs.push(TensorSpec::new("decoder.conv_norm_out.weight", &[c0]));
        specs.push(TensorSpec::new("decoder.conv_norm_out.bias", &[c0]));
        conv_specs("decoder.conv_out", cfg.out_channels, c0, 3, &mut specs);
        specs
    }

    /// diffusers' `decode(z)` on one batch, untiled: z NHWC [B, h, w, latent_channels] in the
    /// weights' dtype, on the Exec's side -> image NHWC [B, f*h, f*w, out_channels] (f the
    /// upsampling factor), roughly in [-1, 1].
    pub fn forward(&self, ex: &Exec, z: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let s = z.shape();
        if s.len() != 4 || s[3] != cfg.latent_channels || s[..3].contains(&0) {
            return Err(Error::Input(format!(
                "VAE decoder input: z {z:?} must be NHWC [frames, height, width, {}]",
                cfg.latent_channels
            )));
        }
        if z.dtype() != self.dtype() {
            return Err(Error::Input(format!(
                "VAE decoder input: z {z:?} must be {:?}, the weights' dtype",
                self.dtype()
            )));
        }
        let root = self.weights.root();
        let w = root.at("decoder");
        let groups = cfg.norm_num_groups;
        // diffusers' Decoder: eps 1e-6 and output_scale_factor 1 in every ResNet.
        let norm = ResnetNorm { groups, eps: NORM_EPS, output_scale: 1.0 };

        // 1. post_quant_conv (1x1): [B, h, w, z] -> [B, h, w, z]
        let mut h = match cfg.post_quant_conv {
            true => conv(ex, &root.at("post_quant_conv"), z, 1)?,
            false => z.clone(),
        };
        // 2. conv_in (3x3): [B, h, w, z] -> [B, h, w, C_last]
        h = conv(ex, &w.at("conv_in"), &h, 3)?;

        // 3. mid block: ResNet, single-head self-attention over all h*w pixels, ResNet
        let mid = w.at("mid_block");
        let top = cfg.mid_channels();
        let mid_resnet = Resnet { in_channels: top, out_channels: top };
        h = resnet::forward(ex, &mid.at("resnets.0"), &mid_resnet, norm, &h, None)?;
        if cfg.mid_block_attention {
            h = attention(ex, &mid.at("attentions.0"), groups, &h)?;
        }
        h = resnet::forward(ex, &mid.at("resnets.1"), &mid_resnet, norm, &h, None)?;

        // 4. up blocks, lowest resolution first: layers_per_block + 1 ResNets, then (all but the
        //    last) nearest 2x + 3x3 conv: [B, h, w, C] -> [B, 2h, 2w, C]
        let levels = cfg.block_out_channels.len();
        for (i, (input, output)) in up_widths(cfg).into_iter().enumerate() {
            let up = w.at(&format!("up_blocks.{i}"));
            for j in 0..=cfg.layers_per_block {
                let r = up_resnet(input, output, j);
                h = resnet::forward(ex, &up.at(&format!("resnets.{j}")), &r, norm, &h, None)?;
            }
            if i + 1 < levels {
                let conv = up.at("upsamplers.0.conv");
                h = upsample2x_conv3x3(ex, &h, conv.get("weight")?, Some(conv.get("bias")?))?;
            }
        }

        // 5. conv_norm_out + SiLU (fused), conv_out: [B, H, W, C0] -> [B, H, W, out_channels]
        let gn = GroupNorm { groups, eps: NORM_EPS, silu: true, frames: 1 };
        h = group_norm(ex, &h, w.get("conv_norm_out.weight")?, w.get("conv_norm_out.bias")?, gn)?;
        conv(ex, &w.at("conv_out"), &h, 3)
    }
}

/// Layer `j` of an up block from `input` to `output` channels: the first ResNet changes the width.
fn up_resnet(input: usize, output: usize, j: usize) -> Resnet {
    Resnet { in_channels: if j == 0 { input } else { output }, out_channels: output }
}

/// (input, output) widths of each up block in the decoder's order: the reversed widths, each
/// block starting from the previous block's output.
fn up_widths(cfg: &VaeConfig) -> Vec<(usize, usize)> {
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    rev.iter().enumerate().map(|(i, &out)| (rev[i.saturating_sub(1)], out)).collect()
}

fn conv_specs(name: &str, o: usize, i: usize, k: usize, out: &mut Vec<TensorSpec>) {
    out.push(TensorSpec::new(format!("{name}.weight"), &[o, i, k, k]));
    out.push(TensorSpec::new(format!("{name}.bias"), &[o]));
}

/// A same-padded convolution with the module's weight and bias.
fn conv(ex: &Exec, w: &Scope, x: &Tensor, kernel: usize) -> Result<Tensor> {
    conv2d(ex, x, w.get("weight")?, Some(w.get("bias")?), Conv2d { stride: 1, padding: kernel / 2 })
}

/// The mid block's attention (diffusers `Attention` with `residual_connection`, one head as wide
/// as the block): x [B, h, w, C] -> x + to_out(softmax(q kᵀ / √C) v) over the h*w pixels.
fn attention(ex: &Exec, w: &Scope, groups: usize, x: &Tensor) -> Result<Tensor> {
    let s = x.shape().to_vec();
    let (b, pixels, c) = (s[0], s[1] * s[2], s[3]);
    // 1. group norm (no SiLU), pixels as tokens: [B, h, w, C] -> [B, h*w, C]
    let gn = GroupNorm { groups, eps: NORM_EPS, silu: false, frames: 1 };
    let n = group_norm(ex, x, w.get("group_norm.weight")?, w.get("group_norm.bias")?, gn)?;
    let tokens = n.reshape(&[b, pixels, c])?;
    // 2. q, k, v projections [B, h*w, C]
    let project = |name: &str, t: &Tensor| -> Result<Tensor> {
        let weight = matrix(w.get(&format!("{name}.weight"))?)?;
        linear(ex, t, &weight, Some(w.get(&format!("{name}.bias"))?))
    };
    let (q, k, v) = (project("to_q", &tokens)?, project("to_k", &tokens)?, project("to_v", &tokens)?);
    // 3. one head of C: softmax(q kᵀ / √C) v
    let cfg = FlashAttention { heads: 1, causal: false, scale: 1.0 / (c as f32).sqrt() };
    let o = attention::attention(ex, &q, &k, &v, cfg)?;
    // 4. to_out.0, back to [B, h, w, C], residual (rescale_output_factor 1)
    let o = project("to_out.0", &o)?.reshape(&s)?;
    add(ex, &o, x, 1.0)
}

/// A linear weight [out, in]. Single-file checkpoints store the attention projections as 1x1
/// convolutions, which `ModelWeights` turned into KRSC [out, 1, 1, in]: the same bytes as [out, in].
fn matrix(w: &Tensor) -> Result<Tensor> {
    match *w.shape() {
        [o, 1, 1, i] => w.reshape(&[o, i]),
        _ => Ok(w.clone()),
    }
}
