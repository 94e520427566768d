//! UNet2DConditionModel (diffusers `models/unets/unet_2d_condition.py`) for the SDXL family: the
//! same graph code runs on the CPU twins or the CUDA ops, chosen by the `Exec`. Activations are
//! NHWC; callers at the NCHW boundary convert with `models::layout`.
//!
//! - `config`: the architecture, from a diffusers config.json or a single file's shapes (`ldm`).
//! - `checkpoint`: opening a diffusers folder or a single-file checkpoint, strictly.
//! - `blocks`: the down path, mid block and up path with their hooks, which `Unet::forward`
//!   composes and a ControlNet or motion modules reuse.

pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod ldm;

pub use blocks::{Conditioning, LayerHook, LayerPos, UnetPath};
pub use checkpoint::{UnetCheckpoint, UnetFormat, open_unet};
pub use config::UnetConfig;

use super::embeddings;
use super::resnet::{self, ResnetNorm};
use super::transformer::{self, CrossKv, TextContext};
use super::weights::{Fp8SourcePlan, ModelWeights, Place, Scope, fp8_source_plan};
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::ops::conv::{Conv2d, conv2d};
use crate::ops::elementwise::{add, silu};
use crate::ops::norm::{GroupNorm, group_norm};
use crate::tensor::{DType, Tensor};
use crate::weights::TensorSpec;

/// One forward's inputs (diffusers' argument names), NHWC.
pub struct UnetInputs<'a> {
    /// Noisy latents [B, H, W, in_channels], compute dtype.
    pub sample: &'a Tensor,
    /// f32 [B]: one timestep per image.
    pub timestep: &'a Tensor,
    /// Text context [G, tokens, cross_attention_dim], compute dtype, G dividing B: row g serves the
    /// B/G sample rows from g * B/G (G == B: diffusers' one row per sample; a render passes one
    /// per CFG half when all its frames share the prompt, and the cross-attentions compute K and V
    /// on those rows only).
    pub encoder_hidden_states: &'a Tensor,
    /// Every cross-attention's k and v of `encoder_hidden_states`, computed beforehand by this
    /// model (`CrossKv::compute` on its `weights()`): a render's text context stays the same over
    /// its steps. None: each forward computes them.
    pub cross_kv: Option<&'a CrossKv>,
    /// `added_cond_kwargs.text_embeds`: pooled text embedding [B, pooled], compute dtype (text_time).
    pub text_embeds: Option<&'a Tensor>,
    /// `added_cond_kwargs.time_ids`: f32 [B, n] (SDXL: original size, crop, target size).
    pub time_ids: Option<&'a Tensor>,
}

/// Additive residuals (a ControlNet's output), NHWC in the compute dtype, added where diffusers adds
/// `down_block_additional_residuals` (to every skip connection, after the down path) and
/// `mid_block_additional_residual` (to the mid block's output).
pub struct UnetResiduals {
    /// One per skip connection, in `UnetConfig::skips` order.
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// How a forward's batch holds video frames: rows are video * frames + frame (diffusers'
/// UNetMotionModel folds them so), and whether the UNet's own group norms span them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frames {
    /// Frames per video (1: every row is an image of its own).
    pub frames: usize,
    /// Every group norm of the UNet (ResNets, Transformer2D, conv_norm_out) takes its statistics
    /// across the frames of each video instead of per frame: AnimateDiff-Evolved's default for
    /// v1-type modules such as AnimateDiff-SDXL (ComfyUI-AnimateDiff-Evolved
    /// `animatediff/sampling.py`, `groupnorm_mm_factory`). Off in diffusers and the official code.
    pub group_norm_across_frames: bool,
}

impl Frames {
    /// Images: one row per image, per-image statistics.
    pub const IMAGES: Frames = Frames { frames: 1, group_norm_across_frames: false };

    /// Images sharing one group-norm domain (1 unless the switch is on).
    pub fn norm_frames(&self) -> usize {
        if self.group_norm_across_frames { self.frames } else { 1 }
    }
}

pub struct Unet {
    pub config: UnetConfig,
    weights: ModelWeights,
}

impl Unet {
    /// Prepares a loaded checkpoint's weights for `place` (host tensors for the CPU twins, device
    /// tensors for CUDA) in the place's dtype.
    pub fn new(checkpoint: &UnetCheckpoint, place: Place) -> Result<Unet> {
        let fusions = transformer::fusions(checkpoint.names.iter().map(|(n, _)| n));
        let weights = ModelWeights::prepare_fused(&checkpoint.weights, &checkpoint.names, &fusions, place)?;
        Ok(Unet { config: checkpoint.config.clone(), weights })
    }

    /// The weights `new` would give FP8 twins with `which` in `dtype` (`weights::fp8_source_plan`).
    pub fn fp8_source_plan(
        checkpoint: &UnetCheckpoint,
        which: transformer::Fp8Linears,
        dtype: DType,
    ) -> Result<Fp8SourcePlan> {
        let fusions = transformer::fusions(checkpoint.names.iter().map(|(n, _)| n));
        fp8_source_plan(&checkpoint.weights, &checkpoint.names, &fusions, which, dtype)
    }

    pub fn dtype(&self) -> DType {
        self.weights.dtype()
    }

    /// Runs the linears of its transformer blocks that `which` takes in FP8 from now on
    /// (`ModelWeights::enable_fp8`); returns how many weights got e4m3 twins.
    pub fn enable_fp8(&mut self, ex: &Exec, which: transformer::Fp8Linears) -> Result<usize> {
        self.weights.enable_fp8(ex, |name, shape| which.takes(name, shape))
    }

    /// The prepared weights, for what changes them after the load (FP8 twins, dropping the
    /// 16-bit weights they replace: `ModelWeights::drop_fp8_sources`).
    pub fn weights_mut(&mut self) -> &mut ModelWeights {
        &mut self.weights
    }

    /// `enable_fp8` with the twins' scaling chosen (`ModelWeights::enable_fp8_scaled`).
    pub fn enable_fp8_scaled(
        &mut self,
        ex: &Exec,
        which: transformer::Fp8Linears,
        scaling: crate::ops::fp8::Fp8Scaling,
    ) -> Result<usize> {
        self.weights.enable_fp8_scaled(ex, Some(scaling), |name, shape| which.takes(name, shape))
    }

    /// The prepared weights (which of them a forward has read: `ModelWeights::unread`).
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// Every tensor the architecture has, by diffusers name, with PyTorch shapes.
    pub fn tensor_specs(cfg: &UnetConfig) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        encoder_specs(cfg, &mut out);
        let (temb, proj, c0) = (cfg.time_embed_dim, cfg.use_linear_projection, cfg.block_out_channels[0]);
        for (i, block) in cfg.up_blocks.iter().enumerate() {
            for (j, layer) in block.layers.iter().enumerate() {
                resnet::specs(&format!("up_blocks.{i}.resnets.{j}"), &layer.resnet, Some(temb), &mut out);
                if let Some(t) = &layer.attention {
                    transformer::specs(&format!("up_blocks.{i}.attentions.{j}"), t, proj, &mut out);
                }
            }
            if block.upsample {
                let c = block.layers.last().map_or(0, |l| l.resnet.out_channels);
                conv_spec(&format!("up_blocks.{i}.upsamplers.0.conv"), c, c, 3, &mut out);
            }
        }
        out.push(TensorSpec::new("conv_norm_out.weight", &[c0]));
        out.push(TensorSpec::new("conv_norm_out.bias", &[c0]));
        conv_spec("conv_out", cfg.out_channels, c0, cfg.conv_out_kernel, &mut out);
        out
    }

    /// The noise prediction [B, H, W, out_channels] (NHWC, compute dtype).
    pub fn forward(&self, ex: &Exec, x: &UnetInputs, residuals: Option<&UnetResiduals>) -> Result<Tensor> {
        self.forward_with(ex, x, residuals, &mut |_, _, h| Ok(h))
    }

    /// `forward` with `hook` called on every layer's output (see `blocks`): where motion modules
    /// go.
    pub fn forward_with(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        residuals: Option<&UnetResiduals>,
        hook: &mut LayerHook,
    ) -> Result<Tensor> {
        self.forward_frames(ex, x, Frames::IMAGES, residuals, hook)
    }

    /// `forward_with` on videos (diffusers `models/unets/unet_motion_model.py`,
    /// `UNetMotionModel.forward`): `sample`, `encoder_hidden_states` and the residuals have one row
    /// per frame (video * frames + frame), `timestep`, `text_embeds` and `time_ids` one per video:
    /// the embedding is computed once per video and every ResNet adds its projection to all of the
    /// video's frames (diffusers' `repeat_interleave(num_frames)`).
    pub fn forward_frames(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        video: Frames,
        residuals: Option<&UnetResiduals>,
        hook: &mut LayerHook,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let w = self.weights.root();
        self.check_inputs(x, video.frames, residuals)?;

        // 1. time (+ text_time) embedding: [B] -> [B, T] (B videos, or images when frames is 1);
        // every ResNet projects SiLU(emb), so once here
        let text_time = x.text_embeds.zip(x.time_ids);
        let emb = embeddings::forward(ex, &w, cfg, x.timestep, text_time, self.dtype())?;
        let emb = silu(ex, &emb)?;
        let cond = Conditioning {
            emb_act: &emb,
            context: TextContext { hidden: x.encoder_hidden_states, kv: x.cross_kv },
            norm: ResnetNorm {
                groups: cfg.norm_num_groups,
                eps: cfg.norm_eps,
                output_scale: cfg.resnet_out_scale_factor,
            },
            mid_output_scale: cfg.mid_block_scale_factor,
            norm_frames: video.norm_frames(),
        };

        // 2. conv_in: [B*F, H, W, in] -> [B*F, H, W, C0]
        let h = conv(ex, &w.at("conv_in"), x.sample, 1, cfg.conv_in_kernel)?;

        // 3. down: every layer's output and every downsampler's output is a skip connection
        let (mut h, mut skips) = blocks::down(ex, &w, &cfg.down_blocks, &cond, h, hook)?;
        // 3b. ControlNet: residuals join the skips (the down path itself ran without them)
        if let Some(r) = residuals {
            for (skip, res) in skips.iter_mut().zip(&r.down) {
                *skip = add(ex, skip, res, 1.0)?;
            }
        }

        // 4. mid: ResNet, transformer, ResNet at the lowest resolution (+ ControlNet's mid residual)
        if let Some(mid) = &cfg.mid_block {
            h = blocks::mid(ex, &w, mid, &cond, h, hook)?;
        }
        if let Some(r) = residuals {
            h = add(ex, &h, &r.mid, 1.0)?;
        }

        // 5. up: each layer takes [h, skip], the last skip first
        let h = blocks::up(ex, &w, &cfg.up_blocks, &cond, h, skips, hook)?;

        // 6. out: GroupNorm + SiLU (fused), conv_out: [B*F, H, W, C0] -> [B*F, H, W, out]
        let gn = GroupNorm { groups: cfg.norm_num_groups, eps: cfg.norm_eps, silu: true, frames: video.norm_frames() };
        let h = group_norm(ex, &h, w.get("conv_norm_out.weight")?, w.get("conv_norm_out.bias")?, gn)?;
        conv(ex, &w.at("conv_out"), &h, 1, cfg.conv_out_kernel)
    }

    fn check_inputs(&self, x: &UnetInputs, frames: usize, residuals: Option<&UnetResiduals>) -> Result<()> {
        check_inputs("UNet", &self.config, &self.weights, x, frames, residuals)
    }
}

/// The tensors of conv_in, the embeddings, the down blocks and the mid block (PyTorch shapes,
/// diffusers names): the part of the UNet a ControlNet copies.
pub(crate) fn encoder_specs(cfg: &UnetConfig, out: &mut Vec<TensorSpec>) {
    let c0 = cfg.block_out_channels[0];
    conv_spec("conv_in", c0, cfg.in_channels, cfg.conv_in_kernel, out);
    embeddings::specs(cfg, out);
    let (temb, proj) = (cfg.time_embed_dim, cfg.use_linear_projection);
    for (i, block) in cfg.down_blocks.iter().enumerate() {
        for (j, layer) in block.layers.iter().enumerate() {
            resnet::specs(&format!("down_blocks.{i}.resnets.{j}"), &layer.resnet, Some(temb), out);
            if let Some(t) = &layer.attention {
                transformer::specs(&format!("down_blocks.{i}.attentions.{j}"), t, proj, out);
            }
        }
        if block.downsample {
            let c = block.layers.last().map_or(0, |l| l.resnet.out_channels);
            conv_spec(&format!("down_blocks.{i}.downsamplers.0.conv"), c, c, 3, out);
        }
    }
    if let Some(mid) = &cfg.mid_block {
        resnet::specs("mid_block.resnets.0", &mid.resnets[0], Some(temb), out);
        transformer::specs("mid_block.attentions.0", &mid.attention, proj, out);
        resnet::specs("mid_block.resnets.1", &mid.resnets[1], Some(temb), out);
    }
}

/// A convolution's weight [o, i, k, k] and bias [o] under `name`.
pub(crate) fn conv_spec(name: &str, o: usize, i: usize, k: usize, out: &mut Vec<TensorSpec>) {
    out.push(TensorSpec::new(format!("{name}.weight"), &[o, i, k, k]));
    out.push(TensorSpec::new(format!("{name}.bias"), &[o]));
}

/// Shapes, dtypes and sizes of the inputs of a model built on the UNet's encoder (`model` names it
/// in errors: the UNet, a ControlNet) with `weights`, before any work: errors name the argument.
/// `frames` rows of sample, context and residuals make one video (one row of timestep and
/// text_time).
pub(crate) fn check_inputs(
    model: &str,
    cfg: &UnetConfig,
    weights: &ModelWeights,
    x: &UnetInputs,
    frames: usize,
    residuals: Option<&UnetResiduals>,
) -> Result<()> {
    let dtype = weights.dtype();
    let bad = |m: String| Err(Error::Input(format!("{model} input: {m}")));
    let s = x.sample.shape();
    if s.len() != 4 || s[3] != cfg.in_channels || s[0] == 0 {
        return bad(format!("sample {:?} must be NHWC [batch, height, width, {}]", x.sample, cfg.in_channels));
    }
    if frames == 0 || !s[0].is_multiple_of(frames) {
        return bad(format!("sample {:?}: its {} rows are not whole videos of {frames} frames", x.sample, s[0]));
    }
    // rows: images or frames (sample, context, residuals); b: images or videos (timestep, text_time)
    let (rows, b, h, w) = (s[0], s[0] / frames, s[1], s[2]);
    // At most MAX_LEVELS - 1 downsamplers (UnetConfig::validate), so the shift fits.
    let step = 1usize << cfg.downsamplers();
    if h == 0 || w == 0 || h % step != 0 || w % step != 0 {
        // diffusers then resizes to the skip sizes (`upsample_size`); the engine has no such resize.
        return Err(Error::Unsupported(format!(
            "latent size {h}x{w}: height and width must be positive multiples of {step} (image sides of {})",
            step.saturating_mul(8)
        )));
    }
    for (name, t) in [("sample", Some(x.sample)), ("encoder_hidden_states", Some(x.encoder_hidden_states))]
        .into_iter()
        .chain([("text_embeds", x.text_embeds)])
    {
        if let Some(t) = t.filter(|t| t.dtype() != dtype) {
            return bad(format!("{name} {t:?} must be {dtype:?}, the weights' dtype"));
        }
    }
    if x.timestep.shape() != [b] || x.timestep.dtype() != DType::F32 {
        return bad(format!("timestep {:?} must be f32 [{b}] (one per image or video)", x.timestep));
    }
    let e = x.encoder_hidden_states.shape();
    let cross = cfg.cross_attention_dims();
    if e.len() != 3 || e[0] == 0 || !rows.is_multiple_of(e[0]) || e[1] == 0 || cross.iter().any(|&d| d != e[2]) {
        return bad(format!(
            "encoder_hidden_states {:?} must be [G, tokens, {}] with G dividing the {rows} sample rows (a context \
             per row, or per group of consecutive rows)",
            x.encoder_hidden_states,
            cross.iter().map(usize::to_string).collect::<Vec<_>>().join(" / ")
        ));
    }
    if let Some(kv) = x.cross_kv {
        kv.check(model, weights, x.encoder_hidden_states)?;
    }
    match (&cfg.text_time, x.text_embeds, x.time_ids) {
        (None, None, None) => {}
        (None, _, _) => return bad("this UNet has no text_time embedding: give no text_embeds or time_ids".into()),
        (Some(_), None, _) | (Some(_), _, None) => {
            return bad("this UNet has a text_time embedding: text_embeds and time_ids are required".into());
        }
        (Some(tt), Some(te), Some(ids)) => {
            let (ts, is) = (te.shape(), ids.shape());
            if ts.len() != 2 || ts[0] != b || is.len() != 2 || is[0] != b || ids.dtype() != DType::F32 {
                return bad(format!("text_embeds {te:?} must be [{b}, pooled] and time_ids {ids:?} f32 [{b}, n]"));
            }
            let width = is[1].checked_mul(tt.time_embed_dim).and_then(|ids| ids.checked_add(ts[1]));
            if width != Some(tt.input_dim) {
                return bad(format!(
                    "text_embeds width {} + {} time ids x {} = {}, but add_embedding takes {}",
                    ts[1],
                    is[1],
                    tt.time_embed_dim,
                    width.map_or("more than usize::MAX".into(), |w| w.to_string()),
                    tt.input_dim
                ));
            }
        }
    }
    if let Some(r) = residuals {
        let skips = cfg.skips();
        if r.down.len() != skips.len() {
            return bad(format!(
                "{} down-block residuals given, the UNet has {} skip connections",
                r.down.len(),
                skips.len()
            ));
        }
        for (k, (t, &(c, level))) in r.down.iter().zip(&skips).enumerate() {
            let want = [rows, h >> level, w >> level, c];
            if t.shape() != want || t.dtype() != dtype {
                return bad(format!("down-block residual {k} {t:?} must be {dtype:?} {want:?}"));
            }
        }
        let k = cfg.downsamplers();
        let c = cfg.block_out_channels[cfg.block_out_channels.len() - 1];
        let want = [rows, h >> k, w >> k, c];
        if r.mid.shape() != want || r.mid.dtype() != dtype {
            return bad(format!("mid-block residual {:?} must be {dtype:?} {want:?}", r.mid));
        }
    }
    Ok(())
}

/// A same-padded (or stride-2, padding 1) convolution with the module's weight and bias.
pub(crate) fn conv(ex: &Exec, w: &Scope, x: &Tensor, stride: usize, kernel: usize) -> Result<Tensor> {
    conv2d(ex, x, w.get("weight")?, Some(w.get("bias")?), Conv2d { stride, padding: kernel / 2 })
}
