//! The UNet's architecture, resolved to what the graph needs: per level, each layer's ResNet widths
//! and its transformer (heads, depth, cross-attention width), and the samplers. The block types
//! (DownBlock, MidBlock, UpBlock) are the UNet's; the ResNet and transformer specs they hold live
//! with their blocks (`models::resnet`, `models::transformer`), shared with the other models. Read from a diffusers
//! `config.json` (UNet2DConditionModel: `from_diffusers_json`, computing the widths the way
//! diffusers' constructor does) or derived from a single-file checkpoint's tensor shapes
//! (`models::ldm`). Either way `validate` then walks the skip connections once, so a config that
//! cannot run fails at load with the layer named, not in the middle of a forward.

use std::fmt;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::fields::{Bound, Fields, Limits, MAX_LAYERS, MAX_LEVELS, MAX_WIDTH, as_usize};
use crate::models::resnet::{self, Resnet};
use crate::models::transformer::{self, Transformer};

/// A ResNet, followed by a transformer in the cross-attention block types.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub resnet: Resnet,
    pub attention: Option<Transformer>,
}

/// DownBlock2D / CrossAttnDownBlock2D: layers, then a stride-2 3x3 conv on all but the last level.
#[derive(Clone, Debug, PartialEq)]
pub struct DownBlock {
    pub layers: Vec<Layer>,
    pub downsample: bool,
}

/// UpBlock2D / CrossAttnUpBlock2D: each layer's ResNet takes `[x, skip]`; then nearest 2x + 3x3 conv
/// on all but the last level.
#[derive(Clone, Debug, PartialEq)]
pub struct UpBlock {
    pub layers: Vec<Layer>,
    pub upsample: bool,
}

/// UNetMidBlock2DCrossAttn with one layer (diffusers `models/unets/unet_2d_blocks.py`): ResNet,
/// transformer, ResNet.
#[derive(Clone, Debug, PartialEq)]
pub struct MidBlock {
    pub resnets: [Resnet; 2],
    pub attention: Transformer,
}

/// SDXL's `text_time` added embedding: the pooled text embedding beside a sinusoid of each time id,
/// through a 2-layer MLP added to the time embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTime {
    /// Sinusoid width per time id (`addition_time_embed_dim`; 256 in SDXL).
    pub time_embed_dim: usize,
    /// Input width of the MLP (`projection_class_embeddings_input_dim`): pooled + ids * time_embed_dim.
    pub input_dim: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    /// Groups of every GroupNorm (ResNets, transformers, conv_norm_out).
    pub norm_num_groups: usize,
    /// Epsilon of the ResNet GroupNorms and conv_norm_out (transformers use 1e-6 regardless).
    pub norm_eps: f32,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    /// Width of the time embedding every ResNet projects (4 x block_out_channels[0] unless set).
    pub time_embed_dim: usize,
    /// proj_in / proj_out are Linear (true) or 1x1 convolutions (false).
    pub use_linear_projection: bool,
    pub text_time: Option<TextTime>,
    pub resnet_out_scale_factor: f32,
    pub mid_block_scale_factor: f32,
}

/// What diffusers' constructor takes for `transformer_layers_per_block` entries: one depth for every
/// layer of a level, or one per layer.
#[derive(Clone, Debug)]
pub(crate) enum Depths {
    Same(usize),
    PerLayer(Vec<usize>),
}

impl Depths {
    pub(crate) fn for_layers(&self, layers: usize, what: &str) -> Result<Vec<usize>> {
        match self {
            Depths::Same(d) => Ok(vec![*d; layers]),
            Depths::PerLayer(v) if v.len() == layers => Ok(v.clone()),
            Depths::PerLayer(v) => {
                Err(Error::Input(format!("{what} lists {} transformer depths for {layers} layers", v.len())))
            }
        }
    }
}

/// An integer for every level, or one list entry per level; each within `limits` for `bound`.
pub(crate) fn per_level(
    f: &Fields,
    field: &str,
    levels: usize,
    default: Option<usize>,
    bound: Bound,
    limits: &Limits,
) -> Result<Vec<usize>> {
    let values = per_level_values(f, field, levels, default)?;
    for &v in &values {
        limits.check(f.file(), field, v, bound)?;
    }
    Ok(values)
}

fn per_level_values(f: &Fields, field: &str, levels: usize, default: Option<usize>) -> Result<Vec<usize>> {
    match f.get(field) {
        None => default.map(|d| vec![d; levels]).ok_or_else(|| f.bad(field, "an integer or a list of integers")),
        Some(Value::Array(items)) => {
            let values: Option<Vec<usize>> = items.iter().map(as_usize).collect();
            match values {
                Some(v) if v.len() == levels => Ok(v),
                Some(_) => Err(f.bad(field, &format!("a list of {levels} integers (one per down block)"))),
                None => Err(f.bad(field, "an integer or a list of integers")),
            }
        }
        Some(v) => as_usize(v).map(|d| vec![d; levels]).ok_or_else(|| f.bad(field, "an integer or a list")),
    }
}

/// `transformer_layers_per_block`-style: an integer, or a list whose entries are integers or
/// lists of integers (one per layer), each depth within `limits`. None when absent or null.
pub(crate) fn read_depths(f: &Fields, field: &str, levels: usize, limits: &Limits) -> Result<Option<Vec<Depths>>> {
    let depths = read_depths_values(f, field, levels)?;
    for d in depths.iter().flatten() {
        let values = match d {
            Depths::Same(d) => std::slice::from_ref(d),
            Depths::PerLayer(v) => v.as_slice(),
        };
        for &v in values {
            limits.check(f.file(), field, v, Bound::Layers)?;
        }
    }
    Ok(depths)
}

fn read_depths_values(f: &Fields, field: &str, levels: usize) -> Result<Option<Vec<Depths>>> {
    let expected = "an integer, or a list with one integer or list of integers per block";
    let entry = |v: &Value| -> Option<Depths> {
        match v {
            Value::Array(items) => items.iter().map(as_usize).collect::<Option<Vec<_>>>().map(Depths::PerLayer),
            other => as_usize(other).map(Depths::Same),
        }
    };
    match f.get(field) {
        None => Ok(None),
        Some(Value::Array(items)) => {
            let parsed: Option<Vec<Depths>> = items.iter().map(entry).collect();
            match parsed {
                Some(v) if v.len() == levels => Ok(Some(v)),
                _ => Err(f.bad(field, &format!("{expected} ({levels} blocks)"))),
            }
        }
        Some(v) => as_usize(v).map(|d| Some(vec![Depths::Same(d); levels])).ok_or_else(|| f.bad(field, expected)),
    }
}

impl UnetConfig {
    /// Parses a diffusers UNet2DConditionModel config.json (its text; `file` names it in errors).
    /// Absent fields take diffusers' defaults. Every count and width is checked against `limits`
    /// (the checkpoint's header) before anything is sized from it. A malformed or inconsistent
    /// config, or one asking for more than the checkpoint holds, is an `Error::Input`; a valid one
    /// using a feature the engine lacks is `Error::Unsupported`.
    pub fn from_diffusers_json(text: &str, file: &str, limits: &Limits) -> Result<UnetConfig> {
        let f = Fields::parse(text, file)?;
        if let Some(class) = f.string("_class_name")?
            && class != "UNet2DConditionModel"
        {
            return Err(Error::Input(format!("{file} describes a {class}, not a UNet2DConditionModel")));
        }
        let no = [Value::Bool(false)];
        let s = |v: &str| Value::String(v.to_string());
        f.only("center_input_sample", &no, "scaling the input to [-1, 1]")?;
        f.only("dual_cross_attention", &no, "two cross-attentions per block")?;
        f.only("class_embed_type", &[], "class embeddings")?;
        f.only("num_class_embeds", &[], "class embeddings")?;
        f.only("encoder_hid_dim_type", &[], "a projection of the text embeddings")?;
        f.only("encoder_hid_dim", &[], "a projection of the text embeddings")?;
        f.only("time_embedding_type", &[s("positional")], "the timestep projection")?;
        f.only("time_embedding_act_fn", &[], "an activation after the time embedding")?;
        f.only("timestep_post_act", &[], "an activation inside the time embedding")?;
        f.only("time_cond_proj_dim", &[], "a guidance-scale embedding (LCM-distilled UNets)")?;
        f.only("resnet_time_scale_shift", &[s("default")], "scale-shift time conditioning")?;
        f.only("resnet_skip_time_act", &no, "ResNets without SiLU on the time embedding")?;
        f.only("act_fn", &[s("silu")], "the activation function")?;
        f.only("attention_type", &[s("default")], "gated attention (GLIGEN)")?;
        f.only("class_embeddings_concat", &no, "class embeddings")?;
        f.only("cross_attention_norm", &[], "a norm on the cross-attention context")?;
        f.only("mid_block_only_cross_attention", &no, "mid blocks without self-attention")?;
        f.only("downsample_padding", &[Value::from(1)], "downsampler padding")?;
        f.only("addition_embed_type", &[s("text_time")], "the added embedding")?;
        match f.get("only_cross_attention") {
            None => {}
            Some(Value::Bool(false)) => {}
            Some(Value::Array(v)) if v.iter().all(|x| x == &no[0]) => {}
            Some(v) => {
                return Err(Error::Unsupported(format!(
                    "{file}: 'only_cross_attention' = {v} (blocks without self-attention); this engine implements false"
                )));
            }
        }
        if f.get("num_attention_heads").is_some() {
            // diffusers' UNet2DConditionModel refuses it too (its heads come from attention_head_dim).
            return Err(f.bad("num_attention_heads", "null (diffusers reads the head counts from attention_head_dim)"));
        }

        let down_types = f.strings("down_block_types", None)?;
        let up_types = f.strings("up_block_types", None)?;
        let levels = limits.check(file, "down_block_types", down_types.len(), Bound::Levels)?;
        if levels == 0 || up_types.len() != levels {
            return Err(Error::Input(format!(
                "{file}: down_block_types ({levels}) and up_block_types ({}) must list the same, non-zero number of blocks",
                up_types.len()
            )));
        }
        if f.get("block_out_channels").is_some_and(|v| !v.is_array()) {
            return Err(f.bad("block_out_channels", &format!("a list of {levels} integers")));
        }
        let block_out_channels = per_level(&f, "block_out_channels", levels, None, Bound::Width, limits)?;
        let layers_per_block = per_level(&f, "layers_per_block", levels, Some(2), Bound::Layers, limits)?;
        // The misnomer: attention_head_dim holds head COUNTS (diffusers `models/unets/
        // unet_2d_condition.py`: `num_attention_heads = num_attention_heads or attention_head_dim`).
        let heads = per_level(&f, "attention_head_dim", levels, Some(8), Bound::Width, limits)?;
        let cross_dims = per_level(&f, "cross_attention_dim", levels, Some(1280), Bound::Width, limits)?;
        let depths =
            read_depths(&f, "transformer_layers_per_block", levels, limits)?.unwrap_or(vec![Depths::Same(1); levels]);
        let reverse_depths = read_depths(&f, "reverse_transformer_layers_per_block", levels, limits)?;
        if reverse_depths.is_none() && depths.iter().any(|d| matches!(d, Depths::PerLayer(_))) {
            return Err(f.bad(
                "reverse_transformer_layers_per_block",
                "given when transformer_layers_per_block has per-layer lists (as diffusers requires)",
            ));
        }
        let groups = f.bounded("norm_num_groups", 32, Bound::Width, limits)?;
        if f.raw("norm_num_groups").is_some_and(Value::is_null) {
            return Err(Error::Unsupported(format!("{file}: 'norm_num_groups' = null (no output GroupNorm)")));
        }

        let attention_kind = |kind: &str, field: &str, down: bool| -> Result<bool> {
            let (plain, cross) =
                if down { ("DownBlock2D", "CrossAttnDownBlock2D") } else { ("UpBlock2D", "CrossAttnUpBlock2D") };
            match kind {
                k if k == plain => Ok(false),
                k if k == cross => Ok(true),
                other => Err(Error::Unsupported(format!(
                    "{file}: {field} has '{other}'; this engine implements {plain} and {cross}"
                ))),
            }
        };
        let transformer = |channels: usize,
                           heads: usize,
                           depth: usize,
                           cross: usize,
                           what: &str|
         -> Result<Transformer> {
            if heads == 0 || !channels.is_multiple_of(heads) {
                return Err(Error::Input(format!(
                    "{file}: {what}: attention_head_dim (the head count) {heads} does not divide {channels} channels"
                )));
            }
            Ok(Transformer { channels, heads, depth, cross_attention_dim: cross })
        };

        // Down path, as diffusers builds it: level i goes from block_out_channels[i - 1] to [i].
        let mut down_blocks = Vec::with_capacity(levels);
        for (i, kind) in down_types.iter().enumerate() {
            let attn = attention_kind(kind, "down_block_types", true)?;
            let out = block_out_channels[i];
            let input = if i == 0 { out } else { block_out_channels[i - 1] };
            let what = format!("down_blocks.{i}");
            let level_depths = depths[i].for_layers(layers_per_block[i], &format!("{file}: {what}"))?;
            let mut layers = Vec::new();
            for (j, &depth) in level_depths.iter().enumerate() {
                let resnet = Resnet { in_channels: if j == 0 { input } else { out }, out_channels: out };
                let attention = match attn {
                    true => Some(transformer(out, heads[i], depth, cross_dims[i], &what)?),
                    false => None,
                };
                layers.push(Layer { resnet, attention });
            }
            down_blocks.push(DownBlock { layers, downsample: i + 1 < levels });
        }

        // Absent means diffusers' default (the cross-attention mid block); null means none.
        let mid_type = match f.raw("mid_block_type") {
            None => Some("UNetMidBlock2DCrossAttn"),
            Some(_) => f.string("mid_block_type")?,
        };
        let mid_block = match mid_type {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let c = block_out_channels[levels - 1];
                let depth = match &depths[levels - 1] {
                    Depths::Same(d) => *d,
                    Depths::PerLayer(v) => {
                        *v.first().ok_or_else(|| f.bad("transformer_layers_per_block", "non-empty lists"))?
                    }
                };
                let attention = transformer(c, heads[levels - 1], depth, cross_dims[levels - 1], "mid_block")?;
                let r = Resnet { in_channels: c, out_channels: c };
                Some(MidBlock { resnets: [r.clone(), r], attention })
            }
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{file}: mid_block_type '{other}'; this engine implements UNetMidBlock2DCrossAttn (or null)"
                )));
            }
        };

        // Up path: reversed widths; layer j of level i takes the previous output (or the level's own
        // width) plus a skip of the level's width (the next level's width for the last layer).
        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<usize>>();
        let (rev_out, rev_layers, rev_heads, rev_cross) =
            (rev(&block_out_channels), rev(&layers_per_block), rev(&heads), rev(&cross_dims));
        let rev_depths = match reverse_depths {
            Some(d) => d,
            None => depths.iter().rev().cloned().collect(),
        };
        let mut up_blocks = Vec::with_capacity(levels);
        for (i, kind) in up_types.iter().enumerate() {
            let attn = attention_kind(kind, "up_block_types", false)?;
            let out = rev_out[i];
            let prev = rev_out[i.saturating_sub(1)];
            let skip_last = rev_out[(i + 1).min(levels - 1)];
            let n = rev_layers[i] + 1;
            let what = format!("up_blocks.{i}");
            let level_depths = rev_depths[i].for_layers(n, &format!("{file}: {what}"))?;
            let mut layers = Vec::new();
            for (j, &depth) in level_depths.iter().enumerate() {
                let skip = if j + 1 == n { skip_last } else { out };
                let resnet = Resnet { in_channels: if j == 0 { prev } else { out } + skip, out_channels: out };
                let attention = match attn {
                    true => Some(transformer(out, rev_heads[i], depth, rev_cross[i], &what)?),
                    false => None,
                };
                layers.push(Layer { resnet, attention });
            }
            up_blocks.push(UpBlock { layers, upsample: i + 1 < levels });
        }

        let required_width = |field: &str| limits.check(file, field, f.required_usize(field)?, Bound::Width);
        let text_time = match f.string("addition_embed_type")? {
            Some(_) => Some(TextTime {
                time_embed_dim: required_width("addition_time_embed_dim")?,
                input_dim: required_width("projection_class_embeddings_input_dim")?,
            }),
            None => None,
        };
        let width = |field: &str, default: usize| f.bounded(field, default, Bound::Width, limits);
        let config = UnetConfig {
            in_channels: width("in_channels", 4)?,
            out_channels: width("out_channels", 4)?,
            conv_in_kernel: width("conv_in_kernel", 3)?,
            conv_out_kernel: width("conv_out_kernel", 3)?,
            time_embed_dim: width("time_embedding_dim", 4 * block_out_channels[0])?,
            block_out_channels,
            down_blocks,
            mid_block,
            up_blocks,
            norm_num_groups: groups,
            norm_eps: f.f32("norm_eps", 1e-5)?,
            flip_sin_to_cos: f.bool("flip_sin_to_cos", true)?,
            freq_shift: f.f32("freq_shift", 0.0)?,
            use_linear_projection: f.bool("use_linear_projection", false)?,
            text_time,
            resnet_out_scale_factor: f.f32("resnet_out_scale_factor", 1.0)?,
            mid_block_scale_factor: f.f32("mid_block_scale_factor", 1.0)?,
        };
        config.validate().map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("{file}: {m}")),
            other => other,
        })?;
        let fields = "layers_per_block, transformer_layers_per_block and the block types";
        limits.check_total(file, fields, config.fewest_tensors())?;
        Ok(config)
    }

    /// The fewest tensors a checkpoint of this architecture holds: each ResNet has at least
    /// `resnet::MIN_TENSORS`, each transformer block `transformer::BLOCK_TENSORS`. None on overflow.
    pub(crate) fn fewest_tensors(&self) -> Option<usize> {
        let layers =
            self.down_blocks.iter().flat_map(|b| &b.layers).chain(self.up_blocks.iter().flat_map(|b| &b.layers));
        let mut resnets = 0usize;
        let mut blocks = 0usize;
        for layer in layers {
            resnets = resnets.checked_add(1)?;
            blocks = blocks.checked_add(layer.attention.as_ref().map_or(0, |t| t.depth))?;
        }
        if let Some(mid) = &self.mid_block {
            resnets = resnets.checked_add(2)?;
            blocks = blocks.checked_add(mid.attention.depth)?;
        }
        resnets.checked_mul(resnet::MIN_TENSORS)?.checked_add(blocks.checked_mul(transformer::BLOCK_TENSORS)?)
    }

    /// Checks that the architecture can run: counts and widths within the engine's limits, the
    /// norm eps and output scales positive and finite, every width positive, the groups dividing
    /// every normalised width, odd kernels, and the skip connections lining up (each up ResNet's
    /// input width is the running width plus the skip it pops, and every skip is used).
    pub fn validate(&self) -> Result<()> {
        fn bad<T>(m: String) -> Result<T> {
            Err(Error::Input(m))
        }
        let levels = self.block_out_channels.len();
        if levels == 0 || self.down_blocks.len() != levels || self.up_blocks.len() != levels {
            return bad(format!(
                "{levels} block widths, {} down blocks and {} up blocks: they must be equal and non-zero",
                self.down_blocks.len(),
                self.up_blocks.len()
            ));
        }
        let (mut c, mut skips) = self.validate_encoder()?;
        if self.out_channels == 0 {
            return bad("out_channels must be positive".into());
        }
        if self.conv_out_kernel.is_multiple_of(2) {
            return bad(format!("conv_out_kernel ({}) must be odd (same padding)", self.conv_out_kernel));
        }
        let g = self.norm_num_groups;
        for (i, block) in self.up_blocks.iter().enumerate() {
            for (j, layer) in block.layers.iter().enumerate() {
                let what = format!("up_blocks.{i} layer {j}");
                let Some(skip) = skips.pop() else {
                    return bad(format!("{what}: no skip connection left to concatenate"));
                };
                let r = &layer.resnet;
                if r.in_channels != c + skip {
                    return bad(format!(
                        "{what}: its ResNet takes {} channels but receives {c} + a {skip}-channel skip",
                        r.in_channels
                    ));
                }
                c = self.check_layer(layer, &what, r.in_channels)?;
            }
        }
        if !skips.is_empty() {
            return bad(format!("{} skip connections are never used by the up blocks", skips.len()));
        }
        let downs = self.down_blocks.iter().filter(|b| b.downsample).count();
        let ups = self.up_blocks.iter().filter(|b| b.upsample).count();
        if downs != ups {
            return bad(format!("{downs} downsamplers but {ups} upsamplers"));
        }
        check_groups(g, c, "conv_norm_out")?;
        if c != self.block_out_channels[0] {
            return bad(format!("the up path ends with {c} channels, conv_out takes {}", self.block_out_channels[0]));
        }
        Ok(())
    }

    /// `validate` up to the end of the mid block (what a ControlNet's copy of the encoder has):
    /// the caps, eps, scales and sinusoid widths, conv_in, and the down path and mid block lining
    /// up. Returns the width after the mid block and the skip connections' widths in push order.
    pub(crate) fn validate_encoder(&self) -> Result<(usize, Vec<usize>)> {
        fn bad<T>(m: String) -> Result<T> {
            Err(Error::Input(m))
        }
        let levels = self.block_out_channels.len();
        if levels == 0 || self.down_blocks.len() != levels {
            return bad(format!(
                "{levels} block widths and {} down blocks: they must be equal and non-zero",
                self.down_blocks.len()
            ));
        }
        self.check_limits()?;
        // A zero, negative or non-finite eps or scale makes every output NaN or infinite.
        for (field, value) in [
            ("norm_eps", self.norm_eps),
            ("resnet_out_scale_factor", self.resnet_out_scale_factor),
            ("mid_block_scale_factor", self.mid_block_scale_factor),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("field '{field}' = {value} must be a positive finite number"));
            }
        }
        if !(self.freq_shift.is_finite() && self.freq_shift >= 0.0) {
            return bad(format!("field 'freq_shift' = {} must be a finite number, 0 or more", self.freq_shift));
        }
        if self.in_channels == 0 || self.time_embed_dim == 0 {
            return bad("in_channels and the time embedding width must be positive".into());
        }
        if self.conv_in_kernel.is_multiple_of(2) {
            return bad(format!("conv_in_kernel ({}) must be odd (same padding)", self.conv_in_kernel));
        }
        // The sinusoids divide by (half width - freq_shift).
        let sinusoids = [Some(self.block_out_channels[0]), self.text_time.as_ref().map(|t| t.time_embed_dim)];
        if let Some(dim) = sinusoids.into_iter().flatten().find(|&d| (d / 2) as f32 <= self.freq_shift) {
            return bad(format!("a {dim}-wide sinusoid cannot take freq_shift {}", self.freq_shift));
        }
        if let Some(tt) = &self.text_time
            && tt.input_dim == 0
        {
            return bad("projection_class_embeddings_input_dim must be positive".into());
        }
        let mut c = self.block_out_channels[0];
        let mut skips = vec![c];
        for (i, block) in self.down_blocks.iter().enumerate() {
            if block.layers.is_empty() {
                return bad(format!("down_blocks.{i} has no layers"));
            }
            for (j, layer) in block.layers.iter().enumerate() {
                c = self.check_layer(layer, &format!("down_blocks.{i} layer {j}"), c)?;
                skips.push(c);
            }
            if block.downsample {
                skips.push(c);
            }
        }
        if let Some(mid) = &self.mid_block {
            for (k, r) in mid.resnets.iter().enumerate() {
                let layer = Layer { resnet: r.clone(), attention: None };
                c = self.check_layer(&layer, &format!("mid_block.resnets.{k}"), c)?;
            }
            check_transformer(&mid.attention, c, "mid_block")?;
        }
        Ok((c, skips))
    }

    /// One layer receiving `c` channels: its ResNet's input width, the norm groups dividing its
    /// widths, its transformer fitting its output; returns the output width.
    fn check_layer(&self, layer: &Layer, what: &str, c: usize) -> Result<usize> {
        let (r, g) = (&layer.resnet, self.norm_num_groups);
        if r.in_channels != c {
            return Err(Error::Input(format!("{what}: its ResNet takes {} channels but receives {c}", r.in_channels)));
        }
        check_groups(g, r.in_channels, what)?;
        check_groups(g, r.out_channels, what)?;
        if let Some(t) = &layer.attention {
            check_transformer(t, r.out_channels, what)?;
            check_groups(g, t.channels, what)?;
        }
        Ok(r.out_channels)
    }

    /// The engine's fixed caps on the resolved architecture (a config.json's fields were checked as
    /// they were read; a single file's shapes are checked here): levels, layers per block,
    /// transformer depths and every width.
    fn check_limits(&self) -> Result<()> {
        let over = |what: &str, value: usize, cap: usize| -> Result<()> {
            match value > cap {
                true => Err(Error::Input(format!("{what} = {value} exceeds the limit of {cap} this engine allows"))),
                false => Ok(()),
            }
        };
        over("the number of levels", self.block_out_channels.len(), MAX_LEVELS)?;
        let mut widths = vec![
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
            ("time_embedding_dim", self.time_embed_dim),
            ("norm_num_groups", self.norm_num_groups),
        ];
        widths.extend(self.block_out_channels.iter().map(|&c| ("block_out_channels", c)));
        if let Some(tt) = &self.text_time {
            widths.push(("addition_time_embed_dim", tt.time_embed_dim));
            widths.push(("projection_class_embeddings_input_dim", tt.input_dim));
        }
        let downs = self.down_blocks.iter().enumerate().map(|(i, b)| (format!("down_blocks.{i}"), &b.layers));
        let ups = self.up_blocks.iter().enumerate().map(|(i, b)| (format!("up_blocks.{i}"), &b.layers));
        let mut transformers: Vec<&Transformer> = self.mid_block.iter().map(|m| &m.attention).collect();
        for (name, layers) in downs.chain(ups) {
            // Up blocks have one layer more than layers_per_block.
            over(&format!("the layer count of {name}"), layers.len(), MAX_LAYERS + 1)?;
            transformers.extend(layers.iter().filter_map(|l| l.attention.as_ref()));
        }
        for t in transformers {
            over("a transformer depth (transformer_layers_per_block)", t.depth, MAX_LAYERS)?;
            widths.extend([("attention_head_dim", t.heads), ("cross_attention_dim", t.cross_attention_dim)]);
        }
        for (field, value) in widths {
            over(&format!("field '{field}'"), value, MAX_WIDTH)?;
        }
        Ok(())
    }

    /// Downsampling steps: latent height and width must be multiples of 2^this.
    pub fn downsamplers(&self) -> usize {
        self.down_blocks.iter().filter(|b| b.downsample).count()
    }

    /// Channels of each skip connection in the order diffusers pushes them (conv_in, then each down
    /// layer, then each downsampler), with its downsampling step: the shapes a ControlNet's
    /// residuals have.
    pub fn skips(&self) -> Vec<(usize, usize)> {
        let mut out = vec![(self.block_out_channels[0], 0)];
        let mut step = 0;
        for block in &self.down_blocks {
            for layer in &block.layers {
                out.push((layer.resnet.out_channels, step));
            }
            if block.downsample {
                step += 1;
                out.push((block.layers.last().map_or(0, |l| l.resnet.out_channels), step));
            }
        }
        out
    }

    /// Every cross-attention width in the model (one in practice); transformers without blocks
    /// (depth 0) have no cross-attention and do not count.
    pub fn cross_attention_dims(&self) -> Vec<usize> {
        let mut dims: Vec<usize> = self
            .down_blocks
            .iter()
            .flat_map(|b| &b.layers)
            .chain(self.up_blocks.iter().flat_map(|b| &b.layers))
            .filter_map(|l| l.attention.as_ref())
            .chain(self.mid_block.as_ref().map(|m| &m.attention))
            .filter(|t| t.depth > 0)
            .map(|t| t.cross_attention_dim)
            .collect();
        dims.sort_unstable();
        dims.dedup();
        dims
    }
}

/// `groups` norm groups dividing `c` channels.
fn check_groups(groups: usize, c: usize, what: &str) -> Result<()> {
    if c == 0 || groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::Input(format!("{what}: {groups} norm groups do not divide {c} channels")));
    }
    Ok(())
}

/// A transformer on `channels` channels. Depth 0 is a Transformer2DModel without blocks
/// (diffusers builds one for `transformer_layers_per_block` 0: GroupNorm, proj_in, proj_out and the
/// residual; the "mid" and "small" SDXL ControlNets have them), whose cross-attention width is
/// unused.
fn check_transformer(t: &Transformer, channels: usize, what: &str) -> Result<()> {
    if t.channels != channels || t.heads == 0 || !t.channels.is_multiple_of(t.heads) {
        return Err(Error::Input(format!(
            "{what}: transformer of {} channels, {} heads, depth {} does not fit {channels} channels",
            t.channels, t.heads, t.depth
        )));
    }
    if t.depth > 0 && t.cross_attention_dim == 0 {
        return Err(Error::Input(format!("{what}: cross-attention width 0")));
    }
    Ok(())
}

impl fmt::Display for UnetConfig {
    /// One line per level: widths, layers, attention (heads x head size, depths).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UNet: {} -> {} channels, {} levels, time embedding {}",
            self.in_channels,
            self.out_channels,
            self.down_blocks.len(),
            self.time_embed_dim
        )?;
        if let Some(tt) = &self.text_time {
            write!(f, ", text_time ({} wide, {} per time id)", tt.input_dim, tt.time_embed_dim)?;
        }
        for (i, b) in self.down_blocks.iter().enumerate() {
            let out = b.layers.last().map_or(0, |l| l.resnet.out_channels);
            write!(f, "\n  level {i}: {out} channels, {} layers", b.layers.len())?;
            if let Some(t) = b.layers.first().and_then(|l| l.attention.as_ref()) {
                let depths: Vec<usize> =
                    b.layers.iter().filter_map(|l| l.attention.as_ref().map(|t| t.depth)).collect();
                write!(
                    f,
                    ", attention {}x{} depth {depths:?}, context {}",
                    t.heads,
                    t.head_dim(),
                    t.cross_attention_dim
                )?;
            }
        }
        if let Some(m) = &self.mid_block {
            let t = &m.attention;
            write!(f, "\n  mid: {} channels, attention {}x{} depth {}", t.channels, t.heads, t.head_dim(), t.depth)?;
        }
        Ok(())
    }
}
