//! Single-file (SGM/LDM) UNet checkpoints: A1111 / ComfyUI / civitai files hold the UNet under
//! `model.diffusion_model.` with the original repository's module names (diffusers
//! `loaders/single_file_utils.py`, `convert_ldm_unet_checkpoint`). This module maps diffusers
//! names to those names and derives the architecture from tensor shapes. A ControlNet's copy of
//! the encoder has the same names under its own root (`derive_encoder`, `LdmNames::module_name`).
//!
//! What shapes cannot tell takes SGM's fixed SDXL values (Stability-AI generative-models
//! `configs/inference/sd_xl_base.yaml`): 64-wide attention heads (`num_head_channels: 64`), 32
//! norm groups with eps 1e-5, 256-wide time-id sinusoids, cos-first sinusoids without shift.

use std::collections::HashMap;

use super::config::{DownBlock, Layer, MidBlock, TextTime, UnetConfig, UpBlock};
use crate::error::{Error, Result};
use crate::models::resnet::Resnet;
use crate::models::transformer::Transformer;

/// Where the UNet's tensors sit in a single-file checkpoint.
pub const PREFIX: &str = "model.diffusion_model.";

/// SGM's head size for SDXL (`num_head_channels: 64`): heads = channels / 64.
pub const HEAD_SIZE: usize = 64;
/// SGM's time-id sinusoid width (`ConcatTimestepEmbedderND(outdim=256)`).
pub const TIME_ID_WIDTH: usize = 256;

/// ResNet tensors: diffusers name -> LDM name (`ResBlock`'s Sequential indices).
const RESNET: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// One diffusers module and its LDM counterpart; inside a transformer the names are the same in
/// both formats, inside a ResNet they follow `RESNET`.
struct Module {
    diffusers: String,
    ldm: String,
    resnet: bool,
}

/// The diffusers -> single-file name map of one architecture.
pub struct LdmNames {
    modules: Vec<Module>,
}

/// What the name map needs of one down or up block: which of its layers have a transformer, and
/// whether it ends in a down- or upsampler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub attention: Vec<bool>,
    pub sampler: bool,
}

impl BlockLayout {
    fn of(layers: &[Layer], sampler: bool) -> BlockLayout {
        BlockLayout { attention: layers.iter().map(|l| l.attention.is_some()).collect(), sampler }
    }
}

impl LdmNames {
    /// The map of `cfg`'s blocks (see `from_layout`).
    pub fn new(cfg: &UnetConfig) -> LdmNames {
        let down: Vec<BlockLayout> = cfg.down_blocks.iter().map(|b| BlockLayout::of(&b.layers, b.downsample)).collect();
        let up: Vec<BlockLayout> = cfg.up_blocks.iter().map(|b| BlockLayout::of(&b.layers, b.upsample)).collect();
        LdmNames::from_layout(&down, &up)
    }

    /// Walks the blocks in LDM order: `input_blocks` count every down layer and downsampler from
    /// 1 (0 is conv_in), `output_blocks` every up layer from 0, with the upsampler inside the
    /// level's last output block after its transformer (index 2) or ResNet (index 1). A model
    /// without an up path (a ControlNet's encoder) passes no up blocks.
    pub fn from_layout(down: &[BlockLayout], up: &[BlockLayout]) -> LdmNames {
        let mut m = Vec::new();
        let mut add = |d: String, l: String, resnet: bool| m.push(Module { diffusers: d, ldm: l, resnet });
        for (d, l) in [
            ("conv_in", "input_blocks.0.0"),
            ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"),
            ("add_embedding.linear_1", "label_emb.0.0"),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("conv_norm_out", "out.0"),
            ("conv_out", "out.2"),
            ("mid_block.attentions.0", "middle_block.1"),
        ] {
            add(d.into(), l.into(), false);
        }
        add("mid_block.resnets.0".into(), "middle_block.0".into(), true);
        add("mid_block.resnets.1".into(), "middle_block.2".into(), true);
        let mut i = 1;
        for (b, block) in down.iter().enumerate() {
            for (j, &attention) in block.attention.iter().enumerate() {
                add(format!("down_blocks.{b}.resnets.{j}"), format!("input_blocks.{i}.0"), true);
                if attention {
                    add(format!("down_blocks.{b}.attentions.{j}"), format!("input_blocks.{i}.1"), false);
                }
                i += 1;
            }
            if block.sampler {
                add(format!("down_blocks.{b}.downsamplers.0.conv"), format!("input_blocks.{i}.0.op"), false);
                i += 1;
            }
        }
        let mut i = 0;
        for (b, block) in up.iter().enumerate() {
            for (j, &attention) in block.attention.iter().enumerate() {
                add(format!("up_blocks.{b}.resnets.{j}"), format!("output_blocks.{i}.0"), true);
                if attention {
                    add(format!("up_blocks.{b}.attentions.{j}"), format!("output_blocks.{i}.1"), false);
                }
                if block.sampler && j + 1 == block.attention.len() {
                    let slot = if attention { 2 } else { 1 };
                    add(format!("up_blocks.{b}.upsamplers.0.conv"), format!("output_blocks.{i}.{slot}.conv"), false);
                }
                i += 1;
            }
        }
        // Longest prefix first, so `..._blocks.1.resnets.1` never matches a `.resnets.10` tensor.
        m.sort_by_key(|x| std::cmp::Reverse(x.diffusers.len()));
        LdmNames { modules: m }
    }

    /// The single-file key (with `PREFIX`) of a diffusers tensor name; None for a name outside
    /// every module.
    pub fn ldm_name(&self, diffusers: &str) -> Option<String> {
        self.module_name(diffusers).map(|name| format!("{PREFIX}{name}"))
    }

    /// `ldm_name` without `PREFIX`: the name under the model's own root (a ControlNet file holds its
    /// encoder under `control_model.` or at the top level).
    pub fn module_name(&self, diffusers: &str) -> Option<String> {
        self.modules.iter().find_map(|m| {
            let rest = diffusers.strip_prefix(m.diffusers.as_str())?.strip_prefix('.')?;
            let rest = if m.resnet {
                let (head, tail) = rest.split_once('.')?;
                let (_, ldm) = RESNET.iter().find(|(d, _)| *d == head)?;
                format!("{ldm}.{tail}")
            } else {
                rest.to_string()
            };
            Some(format!("{}.{rest}", m.ldm))
        })
    }
}

/// Shapes of a single file's tensors, keyed by their names below the model's root (`prefix`, which
/// errors name), read into the architecture's parts.
struct Shapes<'a> {
    shapes: &'a HashMap<String, Vec<usize>>,
    prefix: &'a str,
    /// Linear (true) or 1x1-conv projections, as the first transformer read has them.
    linear_projection: Option<bool>,
}

impl Shapes<'_> {
    fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    fn need(&self, name: &str, rank: usize) -> Result<&[usize]> {
        let prefix = self.prefix;
        match self.shapes.get(name) {
            Some(s) if s.len() == rank => Ok(s),
            Some(s) => Err(Error::Input(format!(
                "single-file checkpoint: {prefix}{name} has shape {s:?}, expected {rank} dimensions"
            ))),
            None => Err(Error::Input(format!(
                "single-file checkpoint: no tensor {prefix}{name} (not an SDXL-family model, or a truncated file)"
            ))),
        }
    }

    fn resnet(&self, p: &str) -> Result<Resnet> {
        let w = self.need(&format!("{p}.in_layers.2.weight"), 4)?;
        Ok(Resnet { in_channels: w[1], out_channels: w[0] })
    }

    /// The transformer at `p`, if there is one. Linear projections are [C, C]; 1x1-conv ones
    /// [C, C, 1, 1]. One without blocks (depth 0) has no cross-attention to read a width from:
    /// `derive_encoder` gives it the model's (`fill_cross_attention`).
    fn transformer(&mut self, p: &str) -> Result<Option<Transformer>> {
        let prefix = self.prefix;
        let Some(proj) = self.shapes.get(&format!("{p}.proj_in.weight")) else { return Ok(None) };
        let linear = proj.len() == 2;
        if *self.linear_projection.get_or_insert(linear) != linear {
            return Err(Error::Input(format!(
                "single-file checkpoint: {prefix}{p}.proj_in.weight is {proj:?}, but other transformers use the other projection kind"
            )));
        }
        let channels = proj[0];
        let depth = (0..).take_while(|n| self.has(&format!("{p}.transformer_blocks.{n}.attn1.to_q.weight"))).count();
        if depth == 0 {
            // No attention: the head count is never used.
            let heads = (channels / HEAD_SIZE).max(1);
            return Ok(Some(Transformer { channels, heads, depth, cross_attention_dim: 0 }));
        }
        if !channels.is_multiple_of(HEAD_SIZE) {
            return Err(Error::Unsupported(format!(
                "single-file checkpoint: {prefix}{p} has {channels} channels, not a multiple of SDXL's head size {HEAD_SIZE}; \
                 give this model as a diffusers folder with its config.json"
            )));
        }
        let cross = self.need(&format!("{p}.transformer_blocks.0.attn2.to_k.weight"), 2)?[1];
        Ok(Some(Transformer { channels, heads: channels / HEAD_SIZE, depth, cross_attention_dim: cross }))
    }
}

/// Derives the architecture from the shapes of a single file's UNet tensors, keyed by their names
/// without `PREFIX`.
pub fn derive_config(shapes: &HashMap<String, Vec<usize>>) -> Result<UnetConfig> {
    let mut s = Shapes { shapes, prefix: PREFIX, linear_projection: None };
    let mut config = encoder(&mut s)?;
    let conv_out = s.need("out.2.weight", 4)?;
    (config.out_channels, config.conv_out_kernel) = (conv_out[0], conv_out[2]);

    // output_blocks: layers; an upsampler (after the transformer, or the ResNet) closes a level.
    let mut up_blocks = Vec::new();
    let mut layers = Vec::new();
    for i in 0.. {
        let p = format!("output_blocks.{i}");
        if !s.has(&format!("{p}.0.in_layers.2.weight")) {
            break;
        }
        let attention = s.transformer(&format!("{p}.1"))?;
        let slot = if attention.is_some() { 2 } else { 1 };
        layers.push(Layer { resnet: s.resnet(&format!("{p}.0"))?, attention });
        if s.has(&format!("{p}.{slot}.conv.weight")) {
            up_blocks.push(UpBlock { layers: std::mem::take(&mut layers), upsample: true });
        }
    }
    up_blocks.push(UpBlock { layers, upsample: false });
    config.up_blocks = up_blocks;
    config.use_linear_projection = s.linear_projection.unwrap_or(true);
    fill_cross_attention(&mut config);
    config.validate().map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("single-file checkpoint: the architecture read from its shapes: {m}")),
        other => other,
    })?;
    Ok(config)
}

/// The UNet encoder's architecture (conv_in, the embeddings, the down blocks and the mid block)
/// from the shapes of a single file's tensors in SGM/LDM names below the model's root `prefix`
/// (`model.diffusion_model.` for a UNet; a ControlNet's copy of the encoder sits under
/// `control_model.` or at the top level): a `UnetConfig` without an up path (no up blocks,
/// `out_channels` and `conv_out_kernel` 0), checked by `UnetConfig::validate_encoder`.
pub fn derive_encoder(shapes: &HashMap<String, Vec<usize>>, prefix: &str) -> Result<UnetConfig> {
    let mut s = Shapes { shapes, prefix, linear_projection: None };
    let mut config = encoder(&mut s)?;
    config.use_linear_projection = s.linear_projection.unwrap_or(true);
    fill_cross_attention(&mut config);
    config.validate_encoder().map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("single-file checkpoint: the architecture read from its shapes: {m}")),
        other => other,
    })?;
    Ok(config)
}

/// conv_in, the embeddings, the down blocks and the mid block; no up path yet.
fn encoder(s: &mut Shapes) -> Result<UnetConfig> {
    let prefix = s.prefix;
    let conv_in = s.need("input_blocks.0.0.weight", 4)?.to_vec();
    let time = s.need("time_embed.0.weight", 2)?.to_vec();
    let Some(label) = s.shapes.get("label_emb.0.0.weight") else {
        return Err(Error::Unsupported(format!(
            "single-file checkpoint without {prefix}label_emb.0.0.weight: not an SDXL-family model (SD 1.x/2.x \
             single files are not read)"
        )));
    };
    if label.len() != 2 {
        return Err(Error::Input(format!("single-file checkpoint: {prefix}label_emb.0.0.weight has shape {label:?}")));
    }
    let label_width = label[1];

    // input_blocks: ResNet (+ transformer) layers; a downsampler (`.0.op`) closes a level.
    let mut down_blocks = Vec::new();
    let mut layers = Vec::new();
    for i in 1.. {
        let p = format!("input_blocks.{i}");
        if s.has(&format!("{p}.0.op.weight")) {
            down_blocks.push(DownBlock { layers: std::mem::take(&mut layers), downsample: true });
        } else if s.has(&format!("{p}.0.in_layers.2.weight")) {
            layers.push(Layer { resnet: s.resnet(&format!("{p}.0"))?, attention: s.transformer(&format!("{p}.1"))? });
        } else {
            break;
        }
    }
    down_blocks.push(DownBlock { layers, downsample: false });

    let mid_block = if s.has("middle_block.0.in_layers.2.weight") {
        let attention = s.transformer("middle_block.1")?.ok_or_else(|| {
            Error::Unsupported(format!("single-file checkpoint: a mid block without {prefix}middle_block.1 attention"))
        })?;
        Some(MidBlock { resnets: [s.resnet("middle_block.0")?, s.resnet("middle_block.2")?], attention })
    } else {
        None
    };

    let block_out_channels = down_blocks.iter().map(|b| b.layers.last().map_or(0, |l| l.resnet.out_channels)).collect();
    Ok(UnetConfig {
        in_channels: conv_in[1],
        out_channels: 0,
        conv_in_kernel: conv_in[2],
        conv_out_kernel: 0,
        block_out_channels,
        down_blocks,
        mid_block,
        up_blocks: Vec::new(),
        norm_num_groups: 32,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        time_embed_dim: time[0],
        use_linear_projection: true,
        text_time: Some(TextTime { time_embed_dim: TIME_ID_WIDTH, input_dim: label_width }),
        resnet_out_scale_factor: 1.0,
        mid_block_scale_factor: 1.0,
    })
}

/// Gives every transformer without blocks the cross-attention width of the others (all one width in
/// the SDXL family; 0 when none has blocks), so a derived config equals the one diffusers builds
/// from config.json, where every transformer gets `cross_attention_dim`.
fn fill_cross_attention(cfg: &mut UnetConfig) {
    let width = cfg.cross_attention_dims().first().copied().unwrap_or(0);
    let layers = cfg
        .down_blocks
        .iter_mut()
        .flat_map(|b| &mut b.layers)
        .chain(cfg.up_blocks.iter_mut().flat_map(|b| &mut b.layers));
    let transformers =
        layers.filter_map(|l| l.attention.as_mut()).chain(cfg.mid_block.as_mut().map(|m| &mut m.attention));
    for t in transformers.filter(|t| t.depth == 0) {
        t.cross_attention_dim = width;
    }
}
