//! The VAE decoder's architecture and latent scaling, read from a diffusers AutoencoderKL
//! `config.json` (absent fields take diffusers' defaults) or derived from a single file's tensor
//! shapes (`checkpoint`). Only what the decoder needs; encoder fields are ignored.

use std::fmt;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::fields::{Bound, Fields, Limits, MAX_LAYERS, MAX_WIDTH, as_usize};
use crate::models::resnet;
use crate::tensor::DType;

/// Epsilon of every GroupNorm in the AutoencoderKL decoder (ResNets, mid attention, output norm):
/// diffusers hard-codes 1e-6 there (`models/autoencoders/vae.py` Decoder; the UNet's ResNets use
/// its config's norm_eps, 1e-5).
pub const NORM_EPS: f32 = 1e-6;

/// Up blocks at most (SDXL has 4): each doubles the image side, so more would overflow sizes.
const MAX_LEVELS: usize = 16;

#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    pub latent_channels: usize,
    /// Image channels (3).
    pub out_channels: usize,
    /// Widths from the highest resolution to the lowest; the decoder runs them reversed.
    pub block_out_channels: Vec<usize>,
    /// Each up block has `layers_per_block + 1` ResNets.
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// The sampler's latents are divided by this before decoding (SDXL: 0.13025).
    pub scaling_factor: f32,
    /// Added after the division when present (SD3/Flux VAEs; SDXL has none).
    pub shift_factor: Option<f32>,
    /// diffusers runs the VAE in float32 when this is set and the pipeline is float16: true for the
    /// stock SDXL VAE (fp16 overflows), false for the fp16-fix.
    pub force_upcast: bool,
    /// The mid block's self-attention (`mid_block_add_attention`).
    pub mid_block_attention: bool,
    /// A 1x1 `post_quant_conv` before the decoder (`use_post_quant_conv`).
    pub post_quant_conv: bool,
    /// Image side the VAE was configured for; diffusers' default tile is this (in pixels).
    pub sample_size: usize,
}

impl VaeConfig {
    /// Image pixels per latent pixel along a side: 2 per upsampling up block.
    pub fn upsample_factor(&self) -> usize {
        let levels = self.block_out_channels.len().saturating_sub(1) as u32;
        1usize.checked_shl(levels).unwrap_or(usize::MAX)
    }

    /// The widest level (the mid block's width).
    pub fn mid_channels(&self) -> usize {
        *self.block_out_channels.last().unwrap_or(&0)
    }

    /// The dtype to decode in when `requested` is asked for: diffusers' `force_upcast` rule (a VAE
    /// that overflows in float16 runs in float32 instead).
    pub fn compute_dtype(&self, requested: DType) -> DType {
        if self.force_upcast && requested == DType::F16 { DType::F32 } else { requested }
    }

    /// Parses a diffusers AutoencoderKL config.json (its text; `file` names it in errors). Every
    /// count and width is checked against `limits` (the checkpoint's header) before anything is
    /// sized from it. A malformed or inconsistent config, or one asking for more than the
    /// checkpoint holds, is an `Error::Input` naming the field; a valid one using something the
    /// engine lacks is `Error::Unsupported`.
    pub fn from_diffusers_json(text: &str, file: &str, limits: &Limits) -> Result<VaeConfig> {
        let f = Fields::parse(text, file)?;
        if let Some(class) = f.get("_class_name").filter(|c| c.as_str() != Some("AutoencoderKL")) {
            return Err(Error::Input(format!("{file} describes a {class}, not an AutoencoderKL")));
        }
        if let Some(act) = f.get("act_fn").filter(|v| v.as_str() != Some("silu")) {
            return Err(Error::Unsupported(format!("{file}: 'act_fn' = {act}; this engine implements silu")));
        }
        for field in ["latents_mean", "latents_std"] {
            if f.get(field).is_some() {
                return Err(Error::Unsupported(format!(
                    "{file}: '{field}' is set (per-channel latent statistics, not an SDXL VAE); this engine \
                     implements scaling_factor and shift_factor"
                )));
            }
        }
        let block_out_channels = f.usizes("block_out_channels", &[64])?;
        limits.check(file, "block_out_channels", block_out_channels.len(), Bound::Levels)?;
        for &c in &block_out_channels {
            limits.check(file, "block_out_channels", c, Bound::Width)?;
        }
        let up_types = f.strings("up_block_types", Some(&["UpDecoderBlock2D"]))?;
        if let Some(other) = up_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(Error::Unsupported(format!(
                "{file}: up_block_types has '{other}'; this engine implements UpDecoderBlock2D"
            )));
        }
        if up_types.len() != block_out_channels.len() {
            return Err(f.bad(
                "up_block_types",
                &format!("one UpDecoderBlock2D per block_out_channels entry ({})", block_out_channels.len()),
            ));
        }
        let width = |field: &str, default: usize| f.bounded(field, default, Bound::Width, limits);
        let config = VaeConfig {
            latent_channels: width("latent_channels", 4)?,
            out_channels: width("out_channels", 3)?,
            block_out_channels,
            layers_per_block: f.bounded("layers_per_block", 1, Bound::Layers, limits)?,
            norm_num_groups: width("norm_num_groups", 32)?,
            scaling_factor: f.f32("scaling_factor", 0.18215)?,
            shift_factor: match f.get("shift_factor") {
                None => None,
                Some(_) => Some(f.f32("shift_factor", 0.0)?),
            },
            force_upcast: f.bool("force_upcast", true)?,
            mid_block_attention: f.bool("mid_block_add_attention", true)?,
            post_quant_conv: f.bool("use_post_quant_conv", true)?,
            sample_size: sample_size(&f)?,
        };
        config.validate(file)?;
        limits.check_total(file, "layers_per_block and block_out_channels", config.fewest_tensors())?;
        Ok(config)
    }

    /// The fewest tensors a checkpoint of this decoder holds: `layers_per_block + 1` ResNets per
    /// up block and two in the mid block, each with at least `resnet::MIN_TENSORS`. None on overflow.
    fn fewest_tensors(&self) -> Option<usize> {
        let per_level = self.layers_per_block.checked_add(1)?;
        let resnets = self.block_out_channels.len().checked_mul(per_level)?.checked_add(2)?;
        resnets.checked_mul(resnet::MIN_TENSORS)
    }

    /// Checks what the graph relies on; `what` names the source in errors.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |m: String| Err(Error::Input(format!("{what}: {m}")));
        if self.block_out_channels.is_empty() || self.block_out_channels.contains(&0) {
            return bad(format!("block_out_channels {:?} must be a non-empty list of widths", self.block_out_channels));
        }
        if self.block_out_channels.len() > MAX_LEVELS {
            return bad(format!("{} up blocks: at most {MAX_LEVELS} are supported", self.block_out_channels.len()));
        }
        if self.layers_per_block > MAX_LAYERS {
            return bad(format!("layers_per_block = {} exceeds the limit of {MAX_LAYERS}", self.layers_per_block));
        }
        let widths = [self.latent_channels, self.out_channels, self.norm_num_groups];
        if let Some(w) = widths.iter().chain(&self.block_out_channels).find(|&&w| w > MAX_WIDTH) {
            return bad(format!("a width of {w} channels exceeds the limit of {MAX_WIDTH}"));
        }
        if self.latent_channels == 0 || self.out_channels == 0 {
            return bad("latent_channels and out_channels must be positive".into());
        }
        let g = self.norm_num_groups;
        if let Some(c) = self.block_out_channels.iter().find(|&&c| g == 0 || c % g != 0) {
            return bad(format!("norm_num_groups {g} does not divide the width {c} of block_out_channels"));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return bad(format!("scaling_factor {} must be a positive number", self.scaling_factor));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return bad("shift_factor must be a finite number".into());
        }
        Ok(())
    }
}

impl fmt::Display for VaeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VAE decoder: {} latent -> {} image channels, widths {:?} ({} ResNets per up block, x{} upsampling), \
             {} groups, scaling factor {}",
            self.latent_channels,
            self.out_channels,
            self.block_out_channels,
            self.layers_per_block + 1,
            self.upsample_factor(),
            self.norm_num_groups,
            self.scaling_factor
        )?;
        if let Some(s) = self.shift_factor {
            write!(f, ", shift {s}")?;
        }
        if !self.mid_block_attention {
            write!(f, ", no mid attention")?;
        }
        write!(f, "{}", if self.force_upcast { ", force_upcast" } else { "" })
    }
}

/// `sample_size`: an integer, or a [height, width] list of which diffusers takes the first.
fn sample_size(f: &Fields) -> Result<usize> {
    let parsed = match f.get("sample_size") {
        None => return Ok(32),
        Some(Value::Array(items)) => items.first().and_then(as_usize),
        Some(v) => as_usize(v),
    };
    parsed.ok_or_else(|| f.bad("sample_size", "an integer or a [height, width] list"))
}
