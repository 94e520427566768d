//! The ControlNet's architecture: the copy of the UNet's encoder (a `UnetConfig` without an up
//! path, so the UNet's block specs, forward code and checks apply to it unchanged) and the
//! conditioning embedding that turns the control image into a latent-sized feature map.
//!
//! Read from a diffusers `config.json` the way diffusers' constructor reads it
//! (`models/controlnets/controlnet.py`, `ControlNetModel.__init__`, which differs from
//! UNet2DConditionModel's: `num_attention_heads` allowed, one `layers_per_block` and one
//! `cross_attention_dim` for every level, the time embedding always 4 x block_out_channels[0],
//! a 3x3 conv_in), or derived from a single file's shapes (`derive_config`). The "mid" and "small"
//! SDXL ControlNets are the same class with fewer transformer blocks (diffusers
//! `loaders/single_file_utils.py` tells them apart by keys: full has
//! `down_blocks.1.attentions.0.transformer_blocks.*`, mid `down_blocks.1.attentions.0.norm.*`
//! without blocks, small no `down_blocks.1.attentions` at all), so nothing here names them: their
//! configs give transformer depths of 0 (a Transformer2DModel without blocks) or no attention.
//! ControlNet Union / ProMax (diffusers `controlnet_union.py`, `ControlNetUnionModel.__init__`) is
//! the same encoder plus the modules of `UnionConfig`.

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::fields::{Bound, Fields, Limits, MAX_LEVELS, MAX_WIDTH};
use crate::models::resnet::Resnet;
use crate::models::transformer::Transformer;
use crate::models::unet::config::{Depths, DownBlock, Layer, MidBlock, TextTime, UnetConfig, per_level, read_depths};
use crate::models::unet::ldm;

/// diffusers' default `conditioning_embedding_out_channels` (the SDXL ControlNets' value too).
const DEFAULT_EMBEDDING_CHANNELS: [usize; 4] = [16, 32, 96, 256];
/// ControlNetUnionModel's default (ControlNetPlus' optional wider hint encoder; xinsir's configs
/// give [16, 32, 96, 256], which their weights have).
const UNION_DEFAULT_EMBEDDING_CHANNELS: [usize; 4] = [48, 96, 192, 384];

#[derive(Clone, Debug, PartialEq)]
pub struct ControlNetConfig {
    /// The copy of the UNet's encoder: conv_in, the time (and text_time) embedding, the down blocks
    /// and the mid block, as the UNet's config without an up path (no up blocks, `out_channels`
    /// and `conv_out_kernel` 0).
    pub encoder: UnetConfig,
    /// Channels of the control image (`conditioning_channels`; 3, RGB).
    pub conditioning_channels: usize,
    /// Widths of ControlNetConditioningEmbedding (`conditioning_embedding_out_channels`): conv_in
    /// to the first; for each later width a same-width 3x3 conv, then a stride-2 3x3 conv to it;
    /// conv_out to `block_out_channels[0]`.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// The Union / ProMax modules, for a ControlNetUnionModel.
    pub union: Option<UnionConfig>,
}

/// What ControlNetUnionModel adds to the encoder (diffusers `controlnet_union.py`): a learned
/// vector per control type (`task_embedding`), CLIP-style pre-LN blocks over one token per
/// condition (`transformer_layes`), a projection of each token back to a per-channel offset of
/// the condition's features (`spatial_ch_projs`), and an MLP on a sinusoid per control-type flag
/// (`control_add_embedding`) added to the time embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct UnionConfig {
    /// `num_control_type`: 6 for controlnet-union-sdxl-1.0, 8 for ProMax (tile, repaint).
    pub control_types: usize,
    /// `num_trans_channel`: the tokens' width; the hint features' (block_out_channels[0]).
    pub token_channels: usize,
    /// `num_trans_head`: heads of the token blocks' attention (with one token per sample the
    /// attention returns its value projection whatever the heads: see `union`).
    pub heads: usize,
    /// `num_trans_layer`: token blocks.
    pub layers: usize,
    /// `num_proj_channel`: `spatial_ch_projs`' output width (block_out_channels[0]).
    pub proj_channels: usize,
    /// `addition_time_embed_dim`: the sinusoid width per control-type flag.
    pub type_embed_dim: usize,
}

impl UnionConfig {
    /// diffusers' fixed sizes (`num_trans_*` defaults, xinsir's hard-coded values) for a file whose
    /// shapes give the rest.
    const HEADS: usize = 8;

    /// The fewest tensors its modules have: task_embedding, 12 per token block, spatial_ch_projs'
    /// 2, control_add_embedding's 4.
    fn fewest_tensors(&self) -> Option<usize> {
        self.layers.checked_mul(12)?.checked_add(7)
    }
}

impl ControlNetConfig {
    /// Parses a diffusers ControlNetModel config.json (its text; `file` names it in errors), with
    /// diffusers' defaults for absent fields. Counts and widths are checked against `limits` (the
    /// checkpoint's header) before anything is sized from them. Malformed or inconsistent:
    /// `Error::Input`; valid but using what the engine lacks: `Error::Unsupported`.
    /// A `_class_name` of ControlNetUnionModel reads the Union's fields too.
    pub fn from_diffusers_json(text: &str, file: &str, limits: &Limits) -> Result<ControlNetConfig> {
        ControlNetConfig::read_json(text, file, limits, false)
    }

    /// `from_diffusers_json` for a checkpoint whose keys show (`union_keys`) or do not show the
    /// Union's modules: keys decide, as ComfyUI classifies these files (a copy of xinsir's
    /// config_promax.json names ControlNetModel, yet diffusers' docs load that repository into
    /// ControlNetUnionModel, which reads the same fields with its own defaults).
    pub(super) fn read_json(text: &str, file: &str, limits: &Limits, union_keys: bool) -> Result<ControlNetConfig> {
        let f = Fields::parse(text, file)?;
        let union = match f.string("_class_name")? {
            None | Some("ControlNetModel") => union_keys,
            Some("ControlNetUnionModel") => true,
            Some(other) => {
                return Err(Error::Input(format!(
                    "{file} describes a {other}, not a ControlNetModel or ControlNetUnionModel"
                )));
            }
        };
        let no = [Value::Bool(false)];
        let s = |v: &str| Value::String(v.to_string());
        f.only("encoder_hid_dim_type", &[], "a projection of the text embeddings")?;
        f.only("encoder_hid_dim", &[], "a projection of the text embeddings")?;
        f.only("class_embed_type", &[], "class embeddings")?;
        f.only("num_class_embeds", &[], "class embeddings")?;
        f.only("resnet_time_scale_shift", &[s("default")], "scale-shift time conditioning")?;
        f.only("act_fn", &[s("silu")], "the activation function")?;
        f.only("downsample_padding", &[Value::from(1)], "downsampler padding")?;
        f.only("addition_embed_type", &[s("text_time")], "the added embedding")?;
        f.only("controlnet_conditioning_channel_order", &[s("rgb")], "BGR control images")?;
        f.only("global_pool_conditions", &no, "residuals pooled over the image (shuffle-style ControlNets)")?;
        match f.get("only_cross_attention") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Array(v)) if v.iter().all(|x| x == &no[0]) => {}
            Some(v) => {
                return Err(Error::Unsupported(format!(
                    "{file}: 'only_cross_attention' = {v} (blocks without self-attention); this engine implements false"
                )));
            }
        }
        // Read only so a wrong type is named; the attention already accumulates in float32.
        f.bool("upcast_attention", false)?;

        let default_types = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"];
        let down_types = f.strings("down_block_types", Some(&default_types[..]))?;
        let levels = limits.check(file, "down_block_types", down_types.len(), Bound::Levels)?;
        if levels == 0 {
            return Err(f.bad("down_block_types", "a non-empty list of block names"));
        }
        // A list (diffusers checks its length against down_block_types), not one width per level.
        if f.get("block_out_channels").is_some_and(|v| !v.is_array()) {
            return Err(f.bad("block_out_channels", &format!("a list of {levels} integers")));
        }
        let block_out_channels = f.usizes("block_out_channels", &[320, 640, 1280, 1280])?;
        if block_out_channels.len() != levels {
            return Err(f.bad("block_out_channels", &format!("a list of {levels} integers (one per down block)")));
        }
        for &c in &block_out_channels {
            limits.check(file, "block_out_channels", c, Bound::Width)?;
        }
        let layers_per_block = f.bounded("layers_per_block", 2, Bound::Layers, limits)?;
        // `num_attention_heads = num_attention_heads or attention_head_dim`: the misnamed field
        // holds head counts unless the right one is given.
        let heads = match f.get("num_attention_heads") {
            Some(_) => per_level(&f, "num_attention_heads", levels, None, Bound::Width, limits)?,
            None => per_level(&f, "attention_head_dim", levels, Some(8), Bound::Width, limits)?,
        };
        let cross = f.bounded("cross_attention_dim", 1280, Bound::Width, limits)?;
        let depths =
            read_depths(&f, "transformer_layers_per_block", levels, limits)?.unwrap_or(vec![Depths::Same(1); levels]);
        let groups = f.bounded("norm_num_groups", 32, Bound::Width, limits)?;
        if f.raw("norm_num_groups").is_some_and(Value::is_null) {
            return Err(Error::Unsupported(format!("{file}: 'norm_num_groups' = null (ResNets without GroupNorm)")));
        }
        let transformer = |channels: usize, heads: usize, depth: usize, what: &str| -> Result<Transformer> {
            if heads == 0 || !channels.is_multiple_of(heads) {
                return Err(Error::Input(format!(
                    "{file}: {what}: the head count {heads} (attention_head_dim or num_attention_heads) does not \
                     divide {channels} channels"
                )));
            }
            Ok(Transformer { channels, heads, depth, cross_attention_dim: cross })
        };

        // Down path (get_down_block): level i goes from block_out_channels[i - 1] to [i], each
        // level but the last ends in a downsampler.
        let mut down_blocks = Vec::with_capacity(levels);
        for (i, kind) in down_types.iter().enumerate() {
            let attention = match kind.as_str() {
                "DownBlock2D" => false,
                "CrossAttnDownBlock2D" => true,
                other => {
                    return Err(Error::Unsupported(format!(
                        "{file}: down_block_types has '{other}'; this engine implements DownBlock2D and CrossAttnDownBlock2D"
                    )));
                }
            };
            let out = block_out_channels[i];
            let input = if i == 0 { out } else { block_out_channels[i - 1] };
            let what = format!("down_blocks.{i}");
            let level_depths = depths[i].for_layers(layers_per_block, &format!("{file}: {what}"))?;
            let mut layers = Vec::with_capacity(layers_per_block);
            for (j, &depth) in level_depths.iter().enumerate() {
                let resnet = Resnet { in_channels: if j == 0 { input } else { out }, out_channels: out };
                let attention = attention.then(|| transformer(out, heads[i], depth, &what)).transpose()?;
                layers.push(Layer { resnet, attention });
            }
            down_blocks.push(DownBlock { layers, downsample: i + 1 < levels });
        }

        // Mid block: diffusers builds UNetMidBlock2DCrossAttn or UNetMidBlock2D and refuses
        // anything else, null included.
        let mid_block = match f.raw("mid_block_type") {
            None => "UNetMidBlock2DCrossAttn",
            Some(Value::String(t)) => t.as_str(),
            Some(_) => return Err(f.bad("mid_block_type", "\"UNetMidBlock2DCrossAttn\"")),
        };
        let mid_block = match mid_block {
            "UNetMidBlock2DCrossAttn" => {
                let c = block_out_channels[levels - 1];
                // UNetMidBlock2DCrossAttn has one layer: the first depth of a per-layer list.
                let depth = match &depths[levels - 1] {
                    Depths::Same(d) => *d,
                    Depths::PerLayer(v) => {
                        *v.first().ok_or_else(|| f.bad("transformer_layers_per_block", "non-empty lists"))?
                    }
                };
                let attention = transformer(c, heads[levels - 1], depth, "mid_block")?;
                let r = Resnet { in_channels: c, out_channels: c };
                MidBlock { resnets: [r.clone(), r], attention }
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "{file}: mid_block_type '{other}'; this engine implements UNetMidBlock2DCrossAttn"
                )));
            }
        };

        let required_width = |field: &str| limits.check(file, field, f.required_usize(field)?, Bound::Width);
        let text_time = match f.string("addition_embed_type")? {
            Some(_) => Some(TextTime {
                time_embed_dim: required_width("addition_time_embed_dim")?,
                input_dim: required_width("projection_class_embeddings_input_dim")?,
            }),
            None => None,
        };
        if f.raw("conditioning_embedding_out_channels").is_some_and(Value::is_null) {
            return Err(f.bad("conditioning_embedding_out_channels", "a list of widths (diffusers fails on null)"));
        }
        let default_embedding = if union { &UNION_DEFAULT_EMBEDDING_CHANNELS } else { &DEFAULT_EMBEDDING_CHANNELS };
        let embedding = f.usizes("conditioning_embedding_out_channels", default_embedding)?;
        if embedding.is_empty() || embedding.len() > MAX_LEVELS {
            return Err(f.bad("conditioning_embedding_out_channels", &format!("a list of 1 to {MAX_LEVELS} widths")));
        }
        for &c in &embedding {
            limits.check(file, "conditioning_embedding_out_channels", c, Bound::Width)?;
        }
        let c0 = block_out_channels[0];
        // ControlNetUnionModel.__init__'s fields; the control-type sinusoid is as wide as a time
        // id's (`addition_time_embed_dim`), which it needs even without text_time.
        let union = match union {
            true => Some(UnionConfig {
                control_types: f.bounded("num_control_type", 6, Bound::Width, limits)?,
                token_channels: f.bounded("num_trans_channel", 320, Bound::Width, limits)?,
                heads: f.bounded("num_trans_head", UnionConfig::HEADS, Bound::Width, limits)?,
                layers: f.bounded("num_trans_layer", 1, Bound::Layers, limits)?,
                proj_channels: f.bounded("num_proj_channel", 320, Bound::Width, limits)?,
                type_embed_dim: required_width("addition_time_embed_dim")?,
            }),
            false => None,
        };
        let config = ControlNetConfig {
            encoder: UnetConfig {
                in_channels: f.bounded("in_channels", 4, Bound::Width, limits)?,
                out_channels: 0,
                conv_in_kernel: 3,
                conv_out_kernel: 0,
                // `time_embed_dim = block_out_channels[0] * 4`, whatever the config says.
                time_embed_dim: c0.saturating_mul(4),
                block_out_channels,
                down_blocks,
                mid_block: Some(mid_block),
                up_blocks: Vec::new(),
                norm_num_groups: groups,
                norm_eps: f.f32("norm_eps", 1e-5)?,
                flip_sin_to_cos: f.bool("flip_sin_to_cos", true)?,
                freq_shift: f.f32("freq_shift", 0.0)?,
                use_linear_projection: f.bool("use_linear_projection", false)?,
                text_time,
                resnet_out_scale_factor: 1.0,
                mid_block_scale_factor: f.f32("mid_block_scale_factor", 1.0)?,
            },
            conditioning_channels: f.bounded("conditioning_channels", 3, Bound::Width, limits)?,
            conditioning_embedding_out_channels: embedding,
            union,
        };
        config.validate().map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("{file}: {m}")),
            other => other,
        })?;
        let fields = "layers_per_block, transformer_layers_per_block, num_trans_layer and the block types";
        limits.check_total(file, fields, config.fewest_tensors())?;
        Ok(config)
    }

    /// Checks that the architecture can run: the encoder as the UNet's (`validate_encoder`: caps,
    /// widths, norm groups, transformers, skip connections) with its mid block, and the
    /// conditioning embedding's widths positive and within the engine's caps.
    pub fn validate(&self) -> Result<()> {
        self.encoder.validate_encoder()?;
        if self.encoder.mid_block.is_none() {
            return Err(Error::Input("no mid block: diffusers' ControlNetModel always has one".into()));
        }
        let widths = &self.conditioning_embedding_out_channels;
        if widths.is_empty() || widths.len() > MAX_LEVELS {
            return Err(Error::Input(format!(
                "the conditioning embedding has {} stages; it must have 1 to {MAX_LEVELS}",
                widths.len()
            )));
        }
        for (field, c) in widths
            .iter()
            .map(|&c| ("conditioning_embedding_out_channels", c))
            .chain([("conditioning_channels", self.conditioning_channels)])
        {
            if c == 0 || c > MAX_WIDTH {
                return Err(Error::Input(format!("field '{field}' = {c} must be 1 to {MAX_WIDTH}")));
            }
        }
        if let Some(u) = &self.union {
            let c0 = self.encoder.block_out_channels[0];
            // A token is the mean of the hint features plus a task vector, and its projection is
            // added to those features: both widths are block_out_channels[0] (diffusers fails at
            // the first forward otherwise).
            for (field, c) in [("num_trans_channel", u.token_channels), ("num_proj_channel", u.proj_channels)] {
                if c != c0 {
                    return Err(Error::Input(format!(
                        "field '{field}' = {c}: a Union ControlNet needs block_out_channels[0] = {c0} there"
                    )));
                }
            }
            if u.heads == 0 || !u.token_channels.is_multiple_of(u.heads) {
                return Err(Error::Input(format!(
                    "field 'num_trans_head' = {} must divide num_trans_channel = {}",
                    u.heads, u.token_channels
                )));
            }
            for (field, c) in [("num_control_type", u.control_types), ("addition_time_embed_dim", u.type_embed_dim)] {
                if c == 0 || c > MAX_WIDTH {
                    return Err(Error::Input(format!("field '{field}' = {c} must be 1 to {MAX_WIDTH}")));
                }
            }
            if u.control_types.checked_mul(u.type_embed_dim).is_none_or(|w| w > MAX_WIDTH) {
                return Err(Error::Input(format!(
                    "num_control_type x addition_time_embed_dim = {} x {} exceeds the widest input this engine \
                     allows ({MAX_WIDTH})",
                    u.control_types, u.type_embed_dim
                )));
            }
        }
        Ok(())
    }

    /// Control-image pixels per latent pixel along each side: 2 to the number of stride-2 convs
    /// of the conditioning embedding (8 for SDXL: the image is at the output resolution).
    pub fn hint_factor(&self) -> usize {
        // At most MAX_LEVELS - 1 = 63 stride-2 convs (`validate`), so the shift fits.
        1usize << (self.conditioning_embedding_out_channels.len() - 1).min(usize::BITS as usize - 1)
    }

    /// The residuals' channels and downsampling steps, in `UnetConfig::skips` order (the mid
    /// block's residual is not among them).
    pub fn skips(&self) -> Vec<(usize, usize)> {
        self.encoder.skips()
    }

    /// The fewest tensors a checkpoint of this architecture holds: the encoder's
    /// (`UnetConfig::fewest_tensors`), two per conditioning-embedding conv and per zero conv.
    fn fewest_tensors(&self) -> Option<usize> {
        let convs = self.conditioning_embedding_out_channels.len().checked_mul(2)?;
        let zero_convs = self.encoder.skips().len().checked_add(1)?;
        let union = self.union.as_ref().map_or(Some(0), UnionConfig::fewest_tensors)?;
        self.encoder.fewest_tensors()?.checked_add(convs.checked_add(zero_convs)?.checked_mul(2)?)?.checked_add(union)
    }
}

/// Derives the architecture from a single file's tensor shapes in SGM/cldm names (keys below the
/// ControlNet's root; `prefix` is the root, for errors): the encoder as the UNet's single files
/// are read (`ldm::derive_encoder`, with SGM's fixed SDXL values), the conditioning embedding from
/// `input_hint_block`: convs at the even indices 0, 2, ..., conv_in first and conv_out last, the
/// stride-2 convs at 4, 8, ... giving the widths.
pub fn derive_config(shapes: &HashMap<String, Vec<usize>>, prefix: &str) -> Result<ControlNetConfig> {
    let encoder = ldm::derive_encoder(shapes, prefix)?;
    let hint = |k: usize| shapes.get(&format!("input_hint_block.{k}.weight"));
    let convs = (0..).take_while(|k| hint(2 * k).is_some()).count();
    let bad = |m: String| Error::Input(format!("single-file checkpoint: {prefix}input_hint_block: {m}"));
    if convs < 2 || convs % 2 != 0 {
        return Err(bad(format!(
            "{convs} convolutions at indices 0, 2, 4, ...; the conditioning embedding has an even number, at least 2"
        )));
    }
    let shape = |k: usize| -> Result<&Vec<usize>> {
        hint(2 * k)
            .filter(|s| s.len() == 4)
            .ok_or_else(|| bad(format!("input_hint_block.{}.weight must be a 4-d convolution weight", 2 * k)))
    };
    // conv_in [c0, hint channels, 3, 3]; the stride-2 conv of stage m sits at conv index 2m.
    let conv_in = shape(0)?;
    let mut widths = vec![conv_in[0]];
    for m in 1..convs / 2 {
        widths.push(shape(2 * m)?[0]);
    }
    let config = ControlNetConfig {
        encoder,
        conditioning_channels: conv_in[1],
        conditioning_embedding_out_channels: widths,
        union: None,
    };
    config.validate().map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("single-file checkpoint: the architecture read from its shapes: {m}")),
        other => other,
    })?;
    Ok(config)
}

/// The Union's sizes from a single file's shapes (diffusers names; xinsir's files have them):
/// control types and token width from `task_embedding` [types, width], token blocks counted,
/// `spatial_ch_projs` [proj, width], the sinusoid width from `control_add_embedding.linear_1`
/// [T, types x width]; 8 heads (diffusers' default and xinsir's fixed value). `shape` looks up a
/// tensor; `file` names the checkpoint in errors. The result is checked with the rest of the
/// architecture (`ControlNetConfig::validate`) and every shape by the strict load.
pub fn derive_union(shape: impl Fn(&str) -> Option<Vec<usize>>, file: &str) -> Result<UnionConfig> {
    let bad = |m: String| Error::Input(format!("single-file checkpoint {file}: Union modules: {m}"));
    let matrix = |name: &str| match shape(name) {
        Some(s) if s.len() == 2 => Ok((s[0], s[1])),
        Some(s) => Err(bad(format!("{name} has shape {s:?}; it must be a matrix"))),
        None => Err(bad(format!("no {name}"))),
    };
    let (control_types, token_channels) = matrix("task_embedding")?;
    let layers = (0..).take_while(|l| shape(&format!("transformer_layes.{l}.attn.in_proj_weight")).is_some()).count();
    let (proj_channels, _) = matrix("spatial_ch_projs.weight")?;
    let (_, types_x_width) = matrix("control_add_embedding.linear_1.weight")?;
    if control_types == 0 || !types_x_width.is_multiple_of(control_types) {
        return Err(bad(format!(
            "control_add_embedding.linear_1.weight takes {types_x_width} inputs, not a multiple of the {control_types} \
             control types of task_embedding"
        )));
    }
    Ok(UnionConfig {
        control_types,
        token_channels,
        heads: UnionConfig::HEADS,
        layers,
        proj_channels,
        type_embed_dim: types_x_width / control_types,
    })
}

impl fmt::Display for ControlNetConfig {
    /// One line for the conditioning embedding and the embeddings, one per level (widths, layers,
    /// transformer depths), one for the mid block.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.encoder;
        write!(
            f,
            "ControlNet: {}-channel control image at {}x the latent through {:?} to {} channels; {}-channel latent, \
             time embedding {}",
            self.conditioning_channels,
            self.hint_factor(),
            self.conditioning_embedding_out_channels,
            e.block_out_channels[0],
            e.in_channels,
            e.time_embed_dim
        )?;
        if let Some(tt) = &e.text_time {
            write!(f, ", text_time ({} wide, {} per time id)", tt.input_dim, tt.time_embed_dim)?;
        }
        for (i, b) in e.down_blocks.iter().enumerate() {
            let out = b.layers.last().map_or(0, |l| l.resnet.out_channels);
            write!(f, "\n  level {i}: {out} channels, {} layers", b.layers.len())?;
            if let Some(t) = b.layers.first().and_then(|l| l.attention.as_ref()) {
                let depths: Vec<usize> =
                    b.layers.iter().filter_map(|l| l.attention.as_ref().map(|t| t.depth)).collect();
                write!(f, ", attention {}x{} depth {depths:?}", t.heads, t.head_dim())?;
            }
        }
        if let Some(m) = &e.mid_block {
            let t = &m.attention;
            write!(f, "\n  mid: {} channels, attention {}x{} depth {}", t.channels, t.heads, t.head_dim(), t.depth)?;
        }
        write!(f, "\n  {} residuals + mid", self.skips().len())?;
        if let Some(u) = &self.union {
            write!(
                f,
                "\n  Union: {} control types, {} token block(s) {} wide, control-type sinusoids {} wide",
                u.control_types, u.layers, u.token_channels, u.type_embed_dim
            )?;
        }
        Ok(())
    }
}
