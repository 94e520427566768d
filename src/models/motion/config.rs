//! The motion modules' architecture: per down / up block, one temporal transformer per UNet layer
//! (width, heads, depth), an optional mid-block one, the group count and the number of positions.
//! Read from a diffusers MotionAdapter `config.json` (diffusers
//! `models/unets/unet_motion_model.py`, `MotionAdapter.__init__`: up blocks get one module more
//! than down blocks, per-block lists reversed for the up path) or derived from the tensor names and
//! shapes of one safetensors file in either key format (`checkpoint`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::fields::{Bound, Fields, Limits, as_usize};
use crate::models::unet::UnetConfig;

/// One AnimateDiffTransformer3D (diffusers `models/unets/unet_motion_model.py`).
#[derive(Clone, Debug, PartialEq)]
pub struct TemporalTransformer {
    pub channels: usize,
    pub heads: usize,
    /// Transformer blocks (each: two temporal self-attentions and a feed-forward).
    pub depth: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MotionConfig {
    /// Per down block, one module per UNet layer (`down_blocks.{i}.motion_modules.{j}`).
    pub down_blocks: Vec<Vec<TemporalTransformer>>,
    /// Per up block (the UNet's order: lowest resolution first), one module per layer.
    pub up_blocks: Vec<Vec<TemporalTransformer>>,
    /// `mid_block.motion_modules.0`, after the mid block's transformer (diffusers
    /// `use_motion_mid_block`; AnimateDiff-SDXL has none).
    pub mid_block: Option<TemporalTransformer>,
    /// Groups of every module's GroupNorm (`motion_norm_num_groups`).
    pub norm_num_groups: usize,
    /// Positions of the sinusoidal encoding (`motion_max_seq_length`): the most frames per call.
    pub max_seq_length: usize,
}

/// AnimateDiff's head count (guoyww/AnimateDiff `configs/inference/inference.yaml`
/// `num_attention_heads: 8`; diffusers' `motion_num_attention_heads` default): a single file's
/// shapes do not hold it.
pub const DEFAULT_HEADS: usize = 8;
/// AnimateDiff's and diffusers' GroupNorm groups (`motion_norm_num_groups` default).
pub const DEFAULT_GROUPS: usize = 32;
/// diffusers' `motion_max_seq_length` default, for a diffusers-named file without `pos_embed.pe`.
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 32;

/// A per-block field: an integer for every block, or a list with one entry per block.
fn per_block(
    f: &Fields,
    field: &str,
    default: usize,
    blocks: usize,
    bound: Bound,
    limits: &Limits,
) -> Result<Vec<usize>> {
    let values = match f.get(field) {
        None => vec![default; blocks],
        Some(Value::Array(items)) => {
            let values: Option<Vec<usize>> = items.iter().map(as_usize).collect();
            match values {
                Some(v) if v.len() == blocks => v,
                Some(v) => {
                    return Err(
                        f.bad(field, &format!("an integer or a list of {blocks} (one per block), not {}", v.len()))
                    );
                }
                None if items.iter().any(Value::is_array) => {
                    return Err(Error::Unsupported(format!(
                        "{}: '{field}' gives a list per layer; this engine takes one value per block",
                        f.file()
                    )));
                }
                None => return Err(f.bad(field, "an integer or a list of non-negative integers")),
            }
        }
        Some(_) => vec![f.usize(field, default)?; blocks],
    };
    values.into_iter().map(|v| limits.check(f.file(), field, v, bound)).collect()
}

impl MotionConfig {
    /// From a MotionAdapter config.json; `limits` (the checkpoint's header) bound every count.
    pub fn from_diffusers_json(text: &str, file: &str, limits: &Limits) -> Result<MotionConfig> {
        let f = Fields::parse(text, file)?;
        f.only("conv_in_channels", &[], "PIA's input convolution")?;
        let channels = f.usizes("block_out_channels", &[320, 640, 1280, 1280])?;
        limits.check(file, "block_out_channels (entries)", channels.len(), Bound::Levels)?;
        for &c in &channels {
            limits.check(file, "block_out_channels", c, Bound::Width)?;
        }
        let n = channels.len();
        if n == 0 {
            return Err(f.bad("block_out_channels", "a list of at least one width"));
        }
        let layers = per_block(&f, "motion_layers_per_block", 2, n, Bound::Layers, limits)?;
        let depths = per_block(&f, "motion_transformer_layers_per_block", 1, n, Bound::Layers, limits)?;
        let heads = per_block(&f, "motion_num_attention_heads", 8, n, Bound::Width, limits)?;
        let norm_num_groups = f.bounded("motion_norm_num_groups", DEFAULT_GROUPS, Bound::Width, limits)?;
        let max_seq_length = f.bounded("motion_max_seq_length", DEFAULT_MAX_SEQ_LENGTH, Bound::Width, limits)?;
        let module = |i: usize, depth: usize| TemporalTransformer { channels: channels[i], heads: heads[i], depth };
        let down_blocks = (0..n).map(|i| vec![module(i, depths[i]); layers[i]]).collect();
        // Up block i is down block n-1-i, one layer more (diffusers reverses every per-block list).
        let up_blocks = (0..n).rev().map(|i| vec![module(i, depths[i]); layers[i] + 1]).collect();
        let mid_block = match f.bool("use_motion_mid_block", true)? {
            false => None,
            true => {
                let mid_layers = f.usize("motion_mid_block_layers_per_block", 1)?;
                if mid_layers != 1 {
                    return Err(Error::Unsupported(format!(
                        "{file}: 'motion_mid_block_layers_per_block' = {mid_layers}; this engine runs a mid block of one layer"
                    )));
                }
                let depth = per_block(&f, "motion_transformer_layers_per_mid_block", 1, 1, Bound::Layers, limits)?[0];
                Some(module(n - 1, depth))
            }
        };
        let config = MotionConfig { down_blocks, up_blocks, mid_block, norm_num_groups, max_seq_length };
        config.validate(file)?;
        Ok(config)
    }

    /// Every module with its diffusers prefix (`down_blocks.0.motion_modules.1`), in the order the
    /// UNet runs them.
    pub fn modules(&self) -> Vec<(String, &TemporalTransformer)> {
        let mut out = Vec::new();
        for (i, block) in self.down_blocks.iter().enumerate() {
            out.extend(block.iter().enumerate().map(|(j, m)| (format!("down_blocks.{i}.motion_modules.{j}"), m)));
        }
        out.extend(self.mid_block.iter().map(|m| ("mid_block.motion_modules.0".to_string(), m)));
        for (i, block) in self.up_blocks.iter().enumerate() {
            out.extend(block.iter().enumerate().map(|(j, m)| (format!("up_blocks.{i}.motion_modules.{j}"), m)));
        }
        out
    }

    /// Heads and groups divide every width, every module has a block, at least one position.
    pub fn validate(&self, source: &str) -> Result<()> {
        if self.max_seq_length == 0 {
            return Err(Error::Input(format!("{source}: the motion modules have no positions (max_seq_length 0)")));
        }
        for (name, m) in self.modules() {
            let groups = self.norm_num_groups;
            if m.channels == 0 || m.heads == 0 || m.channels % m.heads != 0 || groups == 0 || m.channels % groups != 0 {
                return Err(Error::Input(format!(
                    "{source}: motion module {name}: {} channels must be a positive multiple of its {} heads and of {groups} norm groups",
                    m.channels, m.heads
                )));
            }
            if m.depth == 0 {
                return Err(Error::Input(format!("{source}: motion module {name} has no transformer block")));
            }
        }
        Ok(())
    }

    /// Refuses modules that do not sit on `unet`'s layers: as many blocks and layers, each module
    /// as wide as the layer it follows, a mid module only where the UNet has a mid block.
    pub fn check_unet(&self, unet: &UnetConfig) -> Result<()> {
        let refuse = |m: String| Err(Error::Input(format!("the motion modules do not fit this UNet: {m}")));
        let paths = [
            ("down_blocks", &self.down_blocks, unet.down_blocks.iter().map(|b| &b.layers).collect::<Vec<_>>()),
            ("up_blocks", &self.up_blocks, unet.up_blocks.iter().map(|b| &b.layers).collect::<Vec<_>>()),
        ];
        for (path, motion, layers) in paths {
            if motion.len() != layers.len() {
                return refuse(format!("{} {path} of motion modules, the UNet has {}", motion.len(), layers.len()));
            }
            for (i, (modules, layers)) in motion.iter().zip(layers).enumerate() {
                if modules.len() != layers.len() {
                    return refuse(format!(
                        "{path}.{i} has {} motion modules, the UNet's {path}.{i} has {} layers",
                        modules.len(),
                        layers.len()
                    ));
                }
                for (j, (m, layer)) in modules.iter().zip(layers.iter()).enumerate() {
                    if m.channels != layer.resnet.out_channels {
                        return refuse(format!(
                            "{path}.{i}.motion_modules.{j} is {} channels wide, the UNet's {path}.{i} layer {j} gives {}",
                            m.channels, layer.resnet.out_channels
                        ));
                    }
                }
            }
        }
        match (&self.mid_block, &unet.mid_block) {
            (Some(_), None) => refuse("mid_block.motion_modules.0 exists, the UNet has no mid block".into()),
            (Some(m), Some(mid)) if m.channels != mid.resnets[0].out_channels => refuse(format!(
                "mid_block.motion_modules.0 is {} channels wide, the UNet's mid block {}",
                m.channels, mid.resnets[0].out_channels
            )),
            _ => Ok(()),
        }
    }
}

/// Modules found in a file's names: per (path, block, module) index, their width and depth.
#[derive(Default)]
pub(crate) struct Found {
    /// ("down_blocks" / "up_blocks" / "mid_block", block, module) -> (channels, transformer blocks seen)
    pub modules: BTreeMap<(String, usize, usize), (usize, BTreeSet<usize>)>,
}

impl Found {
    /// Turns the modules into blocks, refusing gaps in the numbering (a module index past the
    /// count names the tensor's module), with `heads` each.
    pub(crate) fn into_config(self, source: &str, heads: usize, groups: usize, max_len: usize) -> Result<MotionConfig> {
        let mut down: Vec<Vec<TemporalTransformer>> = Vec::new();
        let mut up: Vec<Vec<TemporalTransformer>> = Vec::new();
        let mut mid = None;
        for ((path, i, j), (channels, blocks)) in self.modules {
            let name = format!("{path}.{i}.motion_modules.{j}");
            let depth = blocks.len();
            if blocks.iter().enumerate().any(|(k, &n)| k != n) {
                return Err(Error::Input(format!(
                    "{source}: motion module {name}: transformer_blocks are not numbered 0..{depth}"
                )));
            }
            let m = TemporalTransformer { channels, heads, depth };
            let list = match path.as_str() {
                "mid_block" if i == 0 && j == 0 => {
                    mid = Some(m);
                    continue;
                }
                "mid_block" => {
                    return Err(Error::Unsupported(format!(
                        "{source}: {name}: the engine runs one mid-block module (mid_block.motion_modules.0)"
                    )));
                }
                "down_blocks" => &mut down,
                _ => &mut up,
            };
            // Sorted keys: a block starts at module 0 right after the previous block, modules follow on.
            let in_order = if j == 0 { i == list.len() } else { i + 1 == list.len() && list[i].len() == j };
            if !in_order {
                return Err(Error::Input(format!(
                    "{source}: motion module {name} does not follow the modules before it (a gap in the numbering)"
                )));
            }
            if j == 0 {
                list.push(Vec::new());
            }
            list[i].push(m);
        }
        let config = MotionConfig {
            down_blocks: down,
            up_blocks: up,
            mid_block: mid,
            norm_num_groups: groups,
            max_seq_length: max_len,
        };
        if config.down_blocks.is_empty() {
            return Err(Error::Input(format!(
                "{source}: no motion modules (down_blocks.N.motion_modules.M.* tensors)"
            )));
        }
        config.validate(source)?;
        Ok(config)
    }
}

impl fmt::Display for MotionConfig {
    /// One line: modules per path, widths, heads, depths, positions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = |blocks: &[Vec<TemporalTransformer>]| -> String {
            let parts: Vec<String> = blocks
                .iter()
                .map(|b| {
                    b.first().map_or("-".into(), |m| format!("{}x{}ch/{}h/d{}", b.len(), m.channels, m.heads, m.depth))
                })
                .collect();
            parts.join(", ")
        };
        write!(
            f,
            "motion modules: down [{}], mid {}, up [{}], {} groups, {} positions",
            path(&self.down_blocks),
            self.mid_block.as_ref().map_or("none".into(), |m| format!("{}ch/{}h/d{}", m.channels, m.heads, m.depth)),
            path(&self.up_blocks),
            self.norm_num_groups,
            self.max_seq_length
        )
    }
}
