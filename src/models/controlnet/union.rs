//! ControlNet Union / ProMax (diffusers `models/controlnets/controlnet_union.py`,
//! ControlNetUnionModel; xinsir's controlnet-union-sdxl-1.0, ControlNetPlus): one network that
//! takes several conditions (pose, depth, line art, ...) in one forward. It is the plain
//! ControlNet (`ControlNet`: the UNet encoder copy, the conditioning embedding shared by every
//! condition, the zero convs) plus, per forward:
//!
//! 1. emb += control_add_embedding(sinusoid of each control-type flag), the flags 1 for the types
//!    of the given conditions (diffusers' pipeline: `zeros(N).scatter_(0, control_mode, 1)`);
//! 2. per condition i of type k_i with hint image c_i: f_i = controlnet_cond_embedding(c_i),
//!    token_i = mean_HW(f_i) + task_embedding[k_i];
//! 3. each token through `transformer_layes` (CLIP-style pre-LN blocks: attention, then a
//!    QuickGELU MLP, each with a residual), α_i = spatial_ch_projs(token_i);
//! 4. h = conv_in(sample) + Σ_i (f_i + α_i), α_i broadcast over H and W; then the plain
//!    ControlNet's down path, mid block and zero convs.
//!
//! Scales, as diffusers: with one condition (or `from_multi`, MultiControlNetUnionModel's call)
//! the residuals are scaled as a plain ControlNet's; with several, condition i's scale s_i
//! multiplies token_i, f_i and α_i inside the fusion and the residuals are not scaled again
//! (guess mode then applies the bare logspace factors).
//!
//! **Per-sample semantics (a deliberate difference from diffusers).** diffusers builds the token
//! block's `nn.MultiheadAttention` without `batch_first`, so the [batch, tokens, C] tokens are read
//! as [sequence = batch, batch = tokens, C]: the attention runs across the batch rows of each token
//! slot, never across a sample's conditions, and a row's result depends on the other rows of the
//! call. Here every sample is computed on its own: attention over one token (the row's own) is its
//! value projection, so a block is x + out_proj(v_proj(LN1(x))) followed by the MLP residual (the
//! form ComfyUI's `cldm.py` runs). The query and key rows of `in_proj_weight` are loaded and checked
//! but never read, and diffusers' extra token of conv_in's mean, whose output it discards, is not
//! computed. Both agree exactly with one sample per call, and whenever every row of a batch
//! carries the same hints (CFG pairs of one image); they differ when one batch mixes rows with
//! different hints, such as the frames of a video with their own poses, where diffusers lets the
//! frames' tokens attend to each other.
//!
//! Per-row scales (one per sample, as video keyframe strengths need) generalise diffusers' one
//! scale per condition; with one value per condition the forward is diffusers'.

use super::config::{ControlNetConfig, UnionConfig};
use super::{ControlNet, ControlNetCheckpoint, ControlScale, check_scale};
use crate::error::{Error, Result};
use crate::models::embeddings;
use crate::models::unet::{self, UnetConfig, UnetInputs, UnetResiduals};
use crate::models::weights::{ModelWeights, Place, Scope};
use crate::ops::Exec;
use crate::ops::elementwise::{add, quick_gelu, scale, scale_rows};
use crate::ops::linear::{linear, linear_add};
use crate::ops::norm::layer_norm;
use crate::ops::reduce::mean_hw;
use crate::tensor::{DType, Tensor};
use crate::weights::{LoadedWeights, TensorSpec};

/// `nn.LayerNorm`'s default eps, which the token blocks use.
const LAYER_NORM_EPS: f32 = 1e-5;

/// A Union control type: the index of its `task_embedding` row and of its flag (xinsir's
/// controlnet-union-sdxl-1.0 README; ComfyUI `comfy/cldm/control_types.py`). 0-5 exist in every
/// Union model, 6 (tile) and 7 (repaint) only in ProMax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ControlType(pub usize);

impl ControlType {
    pub const OPENPOSE: ControlType = ControlType(0);
    pub const DEPTH: ControlType = ControlType(1);
    /// Thick lines: HED, PiDi (soft edges), scribble, TEED at 512.
    pub const SOFT_EDGE: ControlType = ControlType(2);
    /// Thin lines: Canny, line art, anime line art, MLSD.
    pub const LINEART: ControlType = ControlType(3);
    pub const NORMAL: ControlType = ControlType(4);
    pub const SEGMENT: ControlType = ControlType(5);
    pub const TILE: ControlType = ControlType(6);
    /// Inpainting / outpainting: the source with masked pixels set to 0.
    pub const REPAINT: ControlType = ControlType(7);

    /// Every accepted name and its type; the first name of each type is its canonical one.
    pub const NAMES: [(&'static str, ControlType); 17] = [
        ("openpose", ControlType::OPENPOSE),
        ("depth", ControlType::DEPTH),
        ("hed", ControlType::SOFT_EDGE),
        ("pidi", ControlType::SOFT_EDGE),
        ("scribble", ControlType::SOFT_EDGE),
        ("ted", ControlType::SOFT_EDGE),
        ("softedge", ControlType::SOFT_EDGE),
        ("canny", ControlType::LINEART),
        ("lineart", ControlType::LINEART),
        ("anime_lineart", ControlType::LINEART),
        ("mlsd", ControlType::LINEART),
        ("normal", ControlType::NORMAL),
        ("segment", ControlType::SEGMENT),
        ("tile", ControlType::TILE),
        ("repaint", ControlType::REPAINT),
        ("inpaint", ControlType::REPAINT),
        ("outpaint", ControlType::REPAINT),
    ];

    /// A type by name (case-insensitive, `NAMES`).
    pub fn parse(name: &str) -> Result<ControlType> {
        let lower = name.to_ascii_lowercase();
        ControlType::NAMES.iter().find(|(n, _)| *n == lower).map(|&(_, t)| t).ok_or_else(|| {
            let names: Vec<&str> = ControlType::NAMES.iter().map(|(n, _)| *n).collect();
            Error::Input(format!("unknown Union control type '{name}' (known: {})", names.join(", ")))
        })
    }

    /// The canonical name ("openpose", "hed", "canny", ...), or "type <k>" past ProMax's 8.
    pub fn name(self) -> String {
        match ControlType::NAMES.iter().find(|(_, t)| *t == self) {
            Some((n, _)) => n.to_string(),
            None => format!("type {}", self.0),
        }
    }
}

/// One condition of a Union forward.
#[derive(Clone, Copy, Debug)]
pub struct UnionCondition<'a> {
    pub control_type: ControlType,
    /// The hint images [rows, H, W, conditioning_channels] in the compute dtype, values in [0, 1],
    /// at `hint_factor` times the latent size (as the plain ControlNet's `controlnet_cond`).
    pub image: &'a Tensor,
    /// diffusers' `conditioning_scale` entry of this condition: one value for every row, or one
    /// per row.
    pub scale: &'a [f32],
}

/// A condition whose hint images are already embedded (`ControlNetUnion::embed_hints`).
#[derive(Clone, Copy, Debug)]
pub struct UnionEmbedded<'a> {
    pub control_type: ControlType,
    /// The embedded hints [rows, h, w, block_out_channels[0]] (h, w the latent's).
    pub features: &'a Tensor,
    /// As `UnionCondition::scale`.
    pub scale: &'a [f32],
}

/// The forward's switches besides the conditions (diffusers ControlNetUnionModel.forward).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnionOptions {
    /// `guess_mode`: down residual k scaled by 10^(-1 + k / n) (`ControlScale::factors`).
    pub guess_mode: bool,
    /// `from_multi`: scale the residuals by the conditions' one scale even with several conditions
    /// (MultiControlNetUnionModel calls each net so); every condition must then give the same.
    pub from_multi: bool,
}

pub struct ControlNetUnion {
    net: ControlNet,
    union: UnionConfig,
    /// The Union's own modules (`union_tensors`).
    weights: ModelWeights,
}

/// Every tensor the Union adds to a ControlNet (empty for a plain one), by diffusers name (also
/// xinsir's), with PyTorch shapes; "transformer_layes" is the checkpoints' own spelling.
pub fn tensor_specs(cfg: &ControlNetConfig) -> Vec<TensorSpec> {
    let Some(u) = &cfg.union else { return Vec::new() };
    let c = u.token_channels;
    let mut out = vec![TensorSpec::new("task_embedding", &[u.control_types, c])];
    for l in 0..u.layers {
        let p = format!("transformer_layes.{l}");
        out.push(TensorSpec::new(format!("{p}.attn.in_proj_weight"), &[3 * c, c]));
        out.push(TensorSpec::new(format!("{p}.attn.in_proj_bias"), &[3 * c]));
        out.push(TensorSpec::new(format!("{p}.attn.out_proj.weight"), &[c, c]));
        out.push(TensorSpec::new(format!("{p}.attn.out_proj.bias"), &[c]));
        for norm in ["ln_1", "ln_2"] {
            out.push(TensorSpec::new(format!("{p}.{norm}.weight"), &[c]));
            out.push(TensorSpec::new(format!("{p}.{norm}.bias"), &[c]));
        }
        out.push(TensorSpec::new(format!("{p}.mlp.c_fc.weight"), &[4 * c, c]));
        out.push(TensorSpec::new(format!("{p}.mlp.c_fc.bias"), &[4 * c]));
        out.push(TensorSpec::new(format!("{p}.mlp.c_proj.weight"), &[c, 4 * c]));
        out.push(TensorSpec::new(format!("{p}.mlp.c_proj.bias"), &[c]));
    }
    out.push(TensorSpec::new("spatial_ch_projs.weight", &[u.proj_channels, c]));
    out.push(TensorSpec::new("spatial_ch_projs.bias", &[u.proj_channels]));
    let input = u.control_types * u.type_embed_dim;
    embeddings::mlp_specs("control_add_embedding", input, cfg.encoder.time_embed_dim, &mut out);
    out
}

/// The Union's tensors in the graph's form: `task_embedding` split into its rows
/// (`task_embedding.{k}`, [C]), and of each block's packed `in_proj` (q ‖ k ‖ v rows) only the
/// value part (`attn.v_proj.{weight,bias}`: one-token attention reads nothing else); the rest as
/// stored.
fn union_tensors(loaded: &LoadedWeights, cfg: &ControlNetConfig) -> Result<Vec<(String, Tensor)>> {
    let Some(u) = &cfg.union else {
        return Err(Error::Internal("Union tensors asked of a plain ControlNet".into()));
    };
    let c = u.token_channels;
    // Rows [first, first + count) of a [rows, c]-shaped (or [rows]) tensor, as f32.
    let rows = |name: &str, first: usize, count: usize, shape: &[usize]| -> Result<Tensor> {
        let v = loaded.get(name)?.to_f32_vec()?;
        let width = v.len() / loaded.get(name)?.shape()[0];
        Tensor::from_f32(shape, DType::F32, &v[first * width..(first + count) * width])
    };
    let mut named = Vec::new();
    for k in 0..u.control_types {
        named.push((format!("task_embedding.{k}"), rows("task_embedding", k, 1, &[c])?));
    }
    for spec in tensor_specs(cfg) {
        let name = spec.name;
        if let Some(p) = name.strip_suffix(".attn.in_proj_weight") {
            named.push((format!("{p}.attn.v_proj.weight"), rows(&name, 2 * c, c, &[c, c])?));
        } else if let Some(p) = name.strip_suffix(".attn.in_proj_bias") {
            named.push((format!("{p}.attn.v_proj.bias"), rows(&name, 2 * c, c, &[c])?));
        } else if name != "task_embedding" {
            let t = loaded.get(&name)?.clone();
            named.push((name, t));
        }
    }
    Ok(named)
}

impl ControlNetUnion {
    /// Prepares a Union checkpoint's weights for `place`, as `ControlNet::new` does.
    pub fn new(checkpoint: &ControlNetCheckpoint, place: Place) -> Result<ControlNetUnion> {
        let Some(union) = checkpoint.config.union.clone() else {
            return Err(Error::Input(
                "a plain ControlNet checkpoint (no task_embedding or control_add_embedding): it runs as \
                 models::ControlNet"
                    .into(),
            ));
        };
        let net = ControlNet::prepare(checkpoint, place)?;
        let weights = ModelWeights::from_tensors(union_tensors(&checkpoint.weights, &checkpoint.config)?, place)?;
        Ok(ControlNetUnion { net, union, weights })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.net.config
    }

    pub fn union_config(&self) -> &UnionConfig {
        &self.union
    }

    /// The weights of its ControlNet part, where the cross-attentions are (`CrossKv::compute`).
    /// `ControlNet::enable_fp8` for the ControlNet inside (the Union's own modules stay as they are).
    pub fn enable_fp8(&mut self, ex: &Exec, which: crate::models::transformer::Fp8Linears) -> Result<usize> {
        self.net.enable_fp8(ex, which)
    }

    /// `ControlNet::weights_mut` of the ControlNet inside (where its FP8 linears are).
    pub fn net_weights_mut(&mut self) -> &mut ModelWeights {
        self.net.weights_mut()
    }

    pub fn net_weights(&self) -> &ModelWeights {
        self.net.weights()
    }

    pub fn dtype(&self) -> DType {
        self.net.dtype()
    }

    /// The prepared weights no forward has read yet (the plain part's and the Union's), sorted.
    pub fn unread(&self) -> Vec<&str> {
        let mut names = self.net.weights().unread();
        names.extend(self.weights.unread());
        names.sort_unstable();
        names
    }

    /// `ControlNet::check_unet`: the residuals fit `unet`'s skips and mid block.
    pub fn check_unet(&self, unet: &UnetConfig) -> Result<()> {
        self.net.check_unet(unet)
    }

    /// The residuals for a batch of images (diffusers ControlNetUnionModel.forward with
    /// `control_type_idx` the conditions' types, `control_type` their flags, `conditioning_scale`
    /// their scales), each image computed on its own (module doc).
    pub fn forward(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        conditions: &[UnionCondition],
        options: UnionOptions,
    ) -> Result<UnetResiduals> {
        self.forward_frames(ex, x, conditions, 1, options)
    }

    /// `forward` on videos whose frames fold into the batch, as `ControlNet::forward_frames`
    /// (timestep and text_time per video, everything else per frame).
    pub fn forward_frames(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        conditions: &[UnionCondition],
        frames: usize,
        options: UnionOptions,
    ) -> Result<UnetResiduals> {
        unet::check_inputs("ControlNet Union", &self.net.config.encoder, self.net.weights(), x, frames, None)?;
        self.check_conditions(x.sample, conditions.iter().map(|c| (c.control_type, c.scale)), options)?;
        for (i, c) in conditions.iter().enumerate() {
            self.net.check_cond(x.sample, c.image).map_err(|e| match e {
                Error::Input(m) => Error::Input(format!("{m} (condition {i}, {})", c.control_type.name())),
                other => other,
            })?;
        }
        let features = {
            let _scope = ex.profile_scope("controlnet");
            conditions.iter().map(|c| self.net.conditioning_embedding(ex, c.image)).collect::<Result<Vec<_>>>()?
        };
        let embedded: Vec<UnionEmbedded> = conditions
            .iter()
            .zip(&features)
            .map(|(c, f)| UnionEmbedded { control_type: c.control_type, features: f, scale: c.scale })
            .collect();
        self.forward_frames_embedded(ex, x, &embedded, frames, options)
    }

    /// The hint images' conditioning embedding (`ControlNet::embed_hints`: the Union shares one
    /// embedding among its conditions), for `forward_frames_embedded`.
    pub fn embed_hints(&self, ex: &Exec, images: &Tensor) -> Result<Tensor> {
        self.net.embed_hints(ex, images)
    }

    /// `forward_frames` with each condition's hint images already embedded (`embed_hints`, one
    /// row per sample row of `x`): a renderer embeds each distinct hint once per segment.
    pub fn forward_frames_embedded(
        &self,
        ex: &Exec,
        x: &UnetInputs,
        conditions: &[UnionEmbedded],
        frames: usize,
        options: UnionOptions,
    ) -> Result<UnetResiduals> {
        let net = &self.net;
        unet::check_inputs("ControlNet Union", &net.config.encoder, net.weights(), x, frames, None)?;
        let _scope = ex.profile_scope("controlnet");
        self.check_conditions(x.sample, conditions.iter().map(|c| (c.control_type, c.scale)), options)?;
        let s = x.sample.shape();
        let want = [s[0], s[1], s[2], net.config.encoder.block_out_channels[0]];
        for (i, c) in conditions.iter().enumerate() {
            if c.features.shape() != want || c.features.dtype() != self.dtype() {
                return Err(Error::Input(format!(
                    "ControlNet Union input: condition {i}'s embedded hint {:?} must be {:?} {want:?}, one row per \
                     sample row",
                    c.features,
                    self.dtype()
                )));
            }
        }
        // diffusers: residuals scaled at the end with one condition or from_multi, else each
        // condition's scale inside the fusion.
        let fused = conditions.len() > 1 && !options.from_multi;

        // 1. time (+ text_time) embedding + the control-type embedding: [B, T]
        let emb = net.embedding(ex, x)?;
        let types: Vec<ControlType> = conditions.iter().map(|c| c.control_type).collect();
        let emb = add(ex, &emb, &self.control_type_embedding(ex, &types)?, 1.0)?;

        // 2. conv_in(sample): [rows, h, w, C0]
        let mut h = net.conv_in(ex, x.sample)?;

        // 3. per condition: token, token blocks, fused into h
        for c in conditions {
            let s = if fused { c.scale } else { &[1.0] };
            // f_i = controlnet_cond_embedding(c_i): [rows, h, w, C0]
            let f = c.features;
            let _scope = ex.profile_scope("union_tokens");
            // token_i = mean_HW(f_i) + task_embedding[k_i] (x s_i): [rows, C0]
            let w = self.weights.root();
            let token = add(ex, &mean_hw(ex, f)?, w.get(&format!("task_embedding.{}", c.control_type.0))?, 1.0)?;
            let mut token = scaled(ex, token, s)?;
            for l in 0..self.union.layers {
                token = token_block(ex, &w.at(&format!("transformer_layes.{l}")), &token)?;
            }
            // α_i = spatial_ch_projs(token_i): [rows, C0], broadcast over h and w
            let p = w.at("spatial_ch_projs");
            let alpha = linear(ex, &token, p.get("weight")?, Some(p.get("bias")?))?;
            // h += s_i (f_i + α_i)
            let g = match s {
                [one] => add(ex, f, &alpha, *one)?,
                _ => scaled(ex, add(ex, f, &alpha, 1.0)?, s)?,
            };
            h = add(ex, &h, &g, 1.0)?;
        }

        // 4.-6. down, mid, zero convs; the residuals scaled unless the fusion was
        let n = net.config.skips().len();
        let (uniform, per_row) = match conditions[0].scale {
            _ if fused => (1.0, None),
            [one] => (*one, None),
            many => (1.0, Some(many)),
        };
        let factors = ControlScale { conditioning_scale: uniform, guess_mode: options.guess_mode }.factors(n);
        net.encode(ex, x, &emb, h, &factors, per_row)
    }

    /// The conditions (type, scales) against the model and the batch: at least one; each type
    /// among the model's; scales finite, one or one per row; with `from_multi` the same scales
    /// for all.
    fn check_conditions<'a>(
        &self,
        sample: &Tensor,
        conditions: impl Iterator<Item = (ControlType, &'a [f32])>,
        options: UnionOptions,
    ) -> Result<()> {
        let rows = sample.shape()[0];
        let conditions: Vec<(ControlType, &[f32])> = conditions.collect();
        if conditions.is_empty() {
            return Err(Error::Input("ControlNet Union input: no conditions (give at least one hint image)".into()));
        }
        for (i, &(control_type, scales)) in conditions.iter().enumerate() {
            self.check_type(control_type).map_err(|e| match e {
                Error::Input(m) => Error::Input(format!("ControlNet Union input: condition {i} has {m}")),
                other => other,
            })?;
            if scales.len() != 1 && scales.len() != rows {
                return Err(Error::Input(format!(
                    "ControlNet Union input: condition {i} gives {} scales; give one, or one per row ({rows})",
                    scales.len()
                )));
            }
            for &s in scales {
                check_scale(&format!("conditioning_scale of condition {i}"), s)?;
            }
        }
        if options.from_multi
            && let Some(i) = conditions.iter().position(|c| c.1 != conditions[0].1)
        {
            return Err(Error::Input(format!(
                "ControlNet Union input: from_multi scales the residuals by one scale, but conditions 0 and {i} give \
                 different ones"
            )));
        }
        Ok(())
    }

    /// Whether this model has `control_type` (the error reads "control type k (name); ...").
    pub fn check_type(&self, control_type: ControlType) -> Result<()> {
        if control_type.0 < self.union.control_types {
            return Ok(());
        }
        Err(Error::Input(format!(
            "control type {} ({}); this model has {} types (0-{}){}",
            control_type.0,
            control_type.name(),
            self.union.control_types,
            self.union.control_types - 1,
            if control_type.0 >= 6 && self.union.control_types == 6 {
                ": tile and repaint need the ProMax model"
            } else {
                ""
            }
        )))
    }

    /// control_add_embedding(sinusoids of the type flags): [T], the same for every row.
    fn control_type_embedding(&self, ex: &Exec, types: &[ControlType]) -> Result<Tensor> {
        let mut flags = vec![0f32; self.union.control_types];
        for t in types {
            flags[t.0] = 1.0;
        }
        let flags = ex.constant(Tensor::from_f32(&[flags.len()], DType::F32, &flags)?)?;
        let w = self.weights.root().at("control_add_embedding");
        let enc = &self.net.config.encoder;
        let e = embeddings::control_types(ex, &w, enc, &flags, self.union.type_embed_dim, self.dtype())?;
        e.reshape(&[enc.time_embed_dim])
    }
}

/// One token block on one token per row (the module doc's per-sample form of diffusers'
/// ResidualAttentionBlock): x += out_proj(v_proj(LN1(x))); x += c_proj(QuickGELU(c_fc(LN2(x)))).
/// [rows, C] -> [rows, C]
fn token_block(ex: &Exec, w: &Scope, x: &Tensor) -> Result<Tensor> {
    let ln = |x: &Tensor, name: &str| -> Result<Tensor> {
        let n = w.at(name);
        layer_norm(ex, x, Some(n.get("weight")?), Some(n.get("bias")?), LAYER_NORM_EPS)
    };
    let a = w.at("attn");
    let v = linear(ex, &ln(x, "ln_1")?, a.get("v_proj.weight")?, Some(a.get("v_proj.bias")?))?;
    let x = linear_add(ex, &v, a.get("out_proj.weight")?, Some(a.get("out_proj.bias")?), Some(x))?;
    let m = w.at("mlp");
    let hidden = quick_gelu(ex, &linear(ex, &ln(&x, "ln_2")?, m.get("c_fc.weight")?, Some(m.get("c_fc.bias")?))?)?;
    linear_add(ex, &hidden, m.get("c_proj.weight")?, Some(m.get("c_proj.bias")?), Some(&x))
}

/// t x s: unchanged for the single scale 1, one factor for all rows, or row r times s[r]
/// (t [rows, ..., C]).
fn scaled(ex: &Exec, t: Tensor, s: &[f32]) -> Result<Tensor> {
    match s {
        [one] if *one == 1.0 => Ok(t),
        [one] => scale(ex, &t, *one),
        per_row => scale_rows(ex, &t, per_row),
    }
}
