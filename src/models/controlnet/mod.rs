//! ControlNetModel (diffusers `models/controlnets/controlnet.py`) for the SDXL family: a copy of the
//! UNet's encoder that reads a control image and returns one residual per UNet skip connection
//! plus one for the mid block, in the form `Unet::forward` takes them (`UnetResiduals`). The
//! encoder runs on the UNet's own block code (`unet::blocks::down` and `mid`, `embeddings`) with
//! the ControlNet's weights; the same graph runs on the CPU twins or the CUDA ops, chosen by the
//! `Exec`. Activations are NHWC; the control image is NHWC [rows, H, W, 3] with values in [0, 1]
//! at `hint_factor` times the latent size (the output image's size for SDXL).
//!
//! - `config`: the architecture (config.json, or a single file's shapes): full, "mid" and "small"
//!   variants differ only in their transformer depths.
//! - `checkpoint`: opening a diffusers folder or a single file with diffusers or SGM/cldm names
//!   (with or without the `control_model.` prefix), strictly.
//! - `control_lora`: a Control-LoRA file (stabilityai/control-lora) over a base UNet checkpoint,
//!   opened as a checkpoint whose low-rank deltas merge into the weights as they are prepared.
//! - `union`: ControlNet Union / ProMax (diffusers ControlNetUnionModel): this encoder, the same
//!   conditioning embedding and zero convs, plus its condition tokens and control-type embedding.

pub mod checkpoint;
pub mod config;
pub mod control_lora;
pub mod union;

pub use checkpoint::{ControlNetCheckpoint, ControlNetFormat, open_controlnet, open_controlnet_with_base};
pub use config::{ControlNetConfig, UnionConfig};
pub use union::{ControlNetUnion, ControlType, UnionCondition, UnionEmbedded, UnionOptions};

use super::embeddings;
use super::resnet::ResnetNorm;
use super::transformer::{self, TextContext};
use super::unet::{self, Conditioning, UnetConfig, UnetInputs, UnetResiduals, blocks};
use super::weights::{Fp8SourcePlan, ModelWeights, Place, Scope, fp8_source_plan, with_loras};
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::ops::conv::{Conv2d, conv2d};
use crate::ops::elementwise::{add, scale_rows, silu};
use crate::tensor::{DType, Tensor};
use crate::weights::TensorSpec;

/// How the residuals are scaled: diffusers ControlNetModel.forward's `conditioning_scale` and
/// `guess_mode` (step 6, "scaling").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ControlScale {
    /// Multiplies every residual.
    pub conditioning_scale: f32,
    /// Down residual k of n also scaled by 10^(-1 + k / n) (`torch.logspace(-1, 0, n + 1)`: 0.1 for
    /// conv_in's up to 10^(-1/n) for the last), the mid residual by 1. diffusers' pipelines run a
    /// guess-mode ControlNet on the conditional half of a CFG batch only and give the
    /// unconditional half zero residuals; that is the caller's part.
    pub guess_mode: bool,
}

impl ControlScale {
    /// `conditioning_scale`, without guess mode.
    pub fn new(conditioning_scale: f32) -> ControlScale {
        ControlScale { conditioning_scale, guess_mode: false }
    }

    /// The factor of each of `down` down residuals, then the mid residual's.
    pub fn factors(&self, down: usize) -> Vec<f32> {
        let s = self.conditioning_scale;
        if !self.guess_mode {
            return vec![s; down + 1];
        }
        // diffusers computes the logspace in float32 and multiplies by the scale there.
        let n = down.max(1) as f64;
        (0..=down).map(|k| 10f64.powf(-1.0 + k as f64 / n) as f32 * s).collect()
    }
}

pub struct ControlNet {
    pub config: ControlNetConfig,
    weights: ModelWeights,
}

impl ControlNet {
    /// Prepares a loaded checkpoint's weights for `place` (host tensors for the CPU twins, device
    /// tensors for CUDA) in the place's dtype, a Control-LoRA's deltas merged on the way. A Union
    /// checkpoint is refused: `ControlNetUnion`.
    pub fn new(checkpoint: &ControlNetCheckpoint, place: Place) -> Result<ControlNet> {
        if checkpoint.config.union.is_some() {
            return Err(Error::Unsupported(
                "a ControlNet Union / ProMax checkpoint runs as models::ControlNetUnion (its forward takes the \
                 conditions and their control types), not as a plain ControlNet"
                    .into(),
            ));
        }
        ControlNet::prepare(checkpoint, place)
    }

    /// The plain ControlNet's weights of any checkpoint (a Union's own modules are left out).
    fn prepare(checkpoint: &ControlNetCheckpoint, place: Place) -> Result<ControlNet> {
        let place = with_loras(&place, checkpoint.deltas.as_ref());
        let fusions = transformer::fusions(checkpoint.names.iter().map(|(n, _)| n));
        let weights = ModelWeights::prepare_fused(&checkpoint.weights, &checkpoint.names, &fusions, place)?;
        Ok(ControlNet { config: checkpoint.config.clone(), weights })
    }

    /// The weights `new` (or a Union's ControlNet part: its own modules have no transformer-block
    /// linears) would give FP8 twins with `which` in `dtype` (`weights::fp8_source_plan`).
    pub fn fp8_source_plan(
        checkpoint: &ControlNetCheckpoint,
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

    /// The prepared weights (which of them a forward has read: `ModelWeights::unread`).
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// Every tensor the architecture has, by diffusers name, with PyTorch shapes: the UNet
    /// encoder's, the conditioning embedding's convs, and a 1x1 conv per residual
    /// (`controlnet_down_blocks.{k}`, `controlnet_mid_block`).
    pub fn tensor_specs(cfg: &ControlNetConfig) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        unet::encoder_specs(&cfg.encoder, &mut out);
        let widths = &cfg.conditioning_embedding_out_channels;
        let e = "controlnet_cond_embedding";
        unet::conv_spec(&format!("{e}.conv_in"), widths[0], cfg.conditioning_channels, 3, &mut out);
        for (m, pair) in widths.windows(2).enumerate() {
            unet::conv_spec(&format!("{e}.blocks.{}", 2 * m), pair[0], pair[0], 3, &mut out);
            unet::conv_spec(&format!("{e}.blocks.{}", 2 * m + 1), pair[1], pair[0], 3, &mut out);
        }
        let (first, last) = (cfg.encoder.block_out_channels[0], widths[widths.len() - 1]);
        unet::conv_spec(&format!("{e}.conv_out"), first, last, 3, &mut out);
        for (k, (c, _)) in cfg.skips().into_iter().enumerate() {
            unet::conv_spec(&format!("controlnet_down_blocks.{k}"), c, c, 1, &mut out);
        }
        let mid = cfg.encoder.block_out_channels[cfg.encoder.block_out_channels.len() - 1];
        unet::conv_spec("controlnet_mid_block", mid, mid, 1, &mut out);
        out
    }

    /// Checks that the residuals fit `unet`'s skip connections and mid block (count, channels,
    /// resolution), naming the first that does not.
    pub fn check_unet(&self, unet: &UnetConfig) -> Result<()> {
        let (ours, theirs) = (self.config.skips(), unet.skips());
        let mid = |cfg: &UnetConfig| (cfg.block_out_channels.last().copied().unwrap_or(0), cfg.downsamplers());
        let (our_mid, their_mid) = (mid(&self.config.encoder), mid(unet));
        if ours.len() != theirs.len() {
            return Err(Error::Input(format!(
                "the ControlNet gives {} down-block residuals; the UNet has {} skip connections",
                ours.len(),
                theirs.len()
            )));
        }
        let describe = |(c, step): (usize, usize)| format!("{c} channels at 1/{} the latent size", 1usize << step);
        for (k, (a, b)) in ours.into_iter().zip(theirs).enumerate() {
            if a != b {
                return Err(Error::Input(format!(
                    "ControlNet residual {k} has {}; the UNet's skip connection {k} {}",
                    describe(a),
                    describe(b)
                )));
            }
        }
        if our_mid != their_mid {
            return Err(Error::Input(format!(
                "the ControlNet's mid-block residual has {}; the UNet's mid block {}",
                describe(our_mid),
                describe(their_mid)
            )));
        }
        Ok(())
    }

    /// The residuals for a batch of images: `x` as the UNet takes it (one timestep and text_time
    /// row per image), `controlnet_cond` the control images [B, H, W, conditioning_channels] in
    /// the compute dtype, values in [0, 1] (diffusers' control image processor; no [-1, 1]
    /// normalisation), H and W `hint_factor` times the latent's.
    pub fn forward(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        controlnet_cond: &Tensor,
        scale: ControlScale,
    ) -> Result<UnetResiduals> {
        self.forward_frames(ex, x, controlnet_cond, 1, scale)
    }

    /// `forward` on videos whose frames fold into the batch (row = video * frames + frame):
    /// `sample` and `controlnet_cond` have a row per frame, `encoder_hidden_states` one per frame
    /// or per group of consecutive frames (`UnetInputs`), `timestep`, `text_embeds` and `time_ids`
    /// one per video (their embedding is added to each of the video's frames, as
    /// `Unet::forward_frames` does); the residuals have a row per frame, as the video UNet takes
    /// them. With `frames` 1 this is diffusers ControlNetModel.forward.
    pub fn forward_frames(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        controlnet_cond: &Tensor,
        frames: usize,
        scale: ControlScale,
    ) -> Result<UnetResiduals> {
        unet::check_inputs("ControlNet", &self.config.encoder, &self.weights, x, frames, None)?;
        self.check_cond(x.sample, controlnet_cond)?;
        let hint = {
            let _scope = ex.profile_scope("controlnet");
            self.conditioning_embedding(ex, controlnet_cond)?
        };
        self.forward_frames_embedded(ex, x, &hint, frames, scale)
    }

    /// The control images' conditioning embedding (the second half of step 2):
    /// [n, H, W, conditioning_channels] -> [n, H / hint_factor, W / hint_factor, C0]. It depends on
    /// neither the timestep nor the text, so a renderer embeds each distinct hint image once per
    /// segment and hands `forward_frames_embedded` its rows.
    pub fn embed_hints(&self, ex: &Exec, images: &Tensor) -> Result<Tensor> {
        let (f, c, dtype) = (self.config.hint_factor(), self.config.conditioning_channels, self.dtype());
        let s = images.shape();
        if s.len() != 4 || !s[1].is_multiple_of(f) || !s[2].is_multiple_of(f) || s[3] != c || images.dtype() != dtype {
            return Err(Error::Input(format!(
                "ControlNet input: control images {images:?} must be {dtype:?} [n, H, W, {c}] (NHWC) with H and W \
                 multiples of {f}"
            )));
        }
        let _scope = ex.profile_scope("controlnet");
        self.conditioning_embedding(ex, images)
    }

    /// `forward_frames` with the control images already embedded (`embed_hints`, one row per
    /// sample row of `x`).
    pub fn forward_frames_embedded(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        hint: &Tensor,
        frames: usize,
        scale: ControlScale,
    ) -> Result<UnetResiduals> {
        unet::check_inputs("ControlNet", &self.config.encoder, &self.weights, x, frames, None)?;
        // The GPU profile files everything below under controlnet/ (resnet, transformer, hint, ...).
        let _scope = ex.profile_scope("controlnet");
        let s = x.sample.shape();
        let want = [s[0], s[1], s[2], self.config.encoder.block_out_channels[0]];
        if hint.shape() != want || hint.dtype() != self.dtype() {
            return Err(Error::Input(format!(
                "ControlNet input: the embedded hint {hint:?} must be {:?} {want:?}, one row per sample row",
                self.dtype()
            )));
        }
        check_scale("conditioning_scale", scale.conditioning_scale)?;

        // 1. time (+ text_time) embedding: [B] -> [B, T]
        let emb = self.embedding(ex, x)?;
        // 2. conv_in(sample) + the control images' embedding: [rows, h, w, C0]
        let h = add(ex, &self.conv_in(ex, x.sample)?, hint, 1.0)?;
        // 3.-6. down, mid, zero convs, scaling
        self.encode(ex, x, &emb, h, &scale.factors(self.config.skips().len()), None)
    }

    /// Step 1 of the forward: emb [B, T] = time_embedding(t) (+ add_embedding(text_time)).
    fn embedding(&self, ex: &Exec, x: &UnetInputs) -> Result<Tensor> {
        let text_time = x.text_embeds.zip(x.time_ids);
        embeddings::forward(ex, &self.weights.root(), &self.config.encoder, x.timestep, text_time, self.dtype())
    }

    /// conv_in of the noisy latent: [rows, h, w, in] -> [rows, h, w, C0].
    fn conv_in(&self, ex: &Exec, sample: &Tensor) -> Result<Tensor> {
        unet::conv(ex, &self.weights.root().at("conv_in"), sample, 1, self.config.encoder.conv_in_kernel)
    }

    /// Steps 3-6 on h = conv_in(sample) + the conditions' features: the down path collecting the
    /// skips, the mid block, the zero conv of each, residual k scaled by `factors[k]` (the mid
    /// residual by the last) and, with `rows`, row r also by `rows[r]`.
    fn encode(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        emb: &Tensor,
        h: Tensor,
        factors: &[f32],
        rows: Option<&[f32]>,
    ) -> Result<UnetResiduals> {
        let cfg = &self.config.encoder;
        let w = self.weights.root();
        // every ResNet projects SiLU(emb), so once
        let emb = silu(ex, emb)?;
        let cond = Conditioning {
            emb_act: &emb,
            context: TextContext { hidden: x.encoder_hidden_states, kv: x.cross_kv },
            norm: ResnetNorm {
                groups: cfg.norm_num_groups,
                eps: cfg.norm_eps,
                output_scale: cfg.resnet_out_scale_factor,
            },
            mid_output_scale: cfg.mid_block_scale_factor,
            norm_frames: 1,
        };

        // 3. down: the skip connections, as the UNet's down path collects them
        let (h, skips) = blocks::down(ex, &w, &cfg.down_blocks, &cond, h, &mut |_, _, h| Ok(h))?;

        // 4. mid (`ControlNetConfig::validate` requires one)
        let h = match &cfg.mid_block {
            Some(mid) => blocks::mid(ex, &w, mid, &cond, h, &mut |_, _, h| Ok(h))?,
            None => return Err(Error::Internal("a ControlNet without a mid block passed validation".into())),
        };

        // 5. zero convs (1x1) on every skip and on the mid output; 6. scaling, in the same pass
        let _zero = ex.profile_scope("zero_convs");
        let zero = |name: &str, x: &Tensor, factor: f32| -> Result<Tensor> {
            let y = zero_conv(ex, &w.at(name), x, factor)?;
            match rows {
                Some(r) => scale_rows(ex, &y, r),
                None => Ok(y),
            }
        };
        let mut down = Vec::with_capacity(skips.len());
        for (k, skip) in skips.into_iter().enumerate() {
            down.push(zero(&format!("controlnet_down_blocks.{k}"), &skip, factors[k])?);
        }
        let mid = zero("controlnet_mid_block", &h, factors[factors.len() - 1])?;
        Ok(UnetResiduals { down, mid })
    }

    /// The control images' shape and dtype: [rows, hint_factor * h, hint_factor * w, channels].
    fn check_cond(&self, sample: &Tensor, cond: &Tensor) -> Result<()> {
        let (s, f, dtype) = (sample.shape(), self.config.hint_factor(), self.dtype());
        let want = [Some(s[0]), s[1].checked_mul(f), s[2].checked_mul(f), Some(self.config.conditioning_channels)];
        if cond.shape().iter().map(|&d| Some(d)).ne(want) || cond.dtype() != dtype {
            let size = |d: Option<usize>| d.map_or("more than usize::MAX".to_string(), |d| d.to_string());
            return Err(Error::Input(format!(
                "ControlNet input: controlnet_cond {cond:?} must be {dtype:?} [{}, {}, {}, {}] (NHWC): the control \
                 images at {f}x the {}x{} latent",
                s[0],
                size(want[1]),
                size(want[2]),
                self.config.conditioning_channels,
                s[1],
                s[2]
            )));
        }
        Ok(())
    }

    /// ControlNetConditioningEmbedding: conv_in + SiLU; per later stage a same-width conv + SiLU
    /// and a stride-2 conv + SiLU; conv_out without activation.
    /// [rows, H, W, channels] -> [rows, H / hint_factor, W / hint_factor, C0]
    fn conditioning_embedding(&self, ex: &Exec, image: &Tensor) -> Result<Tensor> {
        let _scope = ex.profile_scope("hint");
        let w = self.weights.root();
        let w = w.at("controlnet_cond_embedding");
        let mut e = silu(ex, &unet::conv(ex, &w.at("conv_in"), image, 1, 3)?)?;
        let blocks = 2 * (self.config.conditioning_embedding_out_channels.len() - 1);
        for b in 0..blocks {
            // Odd blocks halve the resolution: [rows, H, W, c_m] -> [rows, H/2, W/2, c_m+1]
            let stride = if b % 2 == 1 { 2 } else { 1 };
            e = silu(ex, &unet::conv(ex, &w.at(&format!("blocks.{b}")), &e, stride, 3)?)?;
        }
        unet::conv(ex, &w.at("conv_out"), &e, 1, 3)
    }
}

/// Refuses a NaN or infinite scale, naming it.
fn check_scale(what: &str, scale: f32) -> Result<()> {
    match scale.is_finite() {
        true => Ok(()),
        false => Err(Error::Input(format!("ControlNet input: {what} {scale} must be a finite number"))),
    }
}

/// A zero conv (1x1, with bias) and its residual's factor: factor * (conv(x) + bias), the bias and
/// the scaling in one pass.
fn zero_conv(ex: &Exec, w: &Scope, x: &Tensor, factor: f32) -> Result<Tensor> {
    let y = conv2d(ex, x, w.get("weight")?, None, Conv2d { stride: 1, padding: 0 })?;
    add(ex, &y, w.get("bias")?, factor)
}
