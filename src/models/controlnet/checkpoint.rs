//! Opening a ControlNet checkpoint, strictly: a diffusers folder (config.json +
//! diffusion_pytorch_model safetensors, one file, shards or the fp16 variant), a pipeline folder
//! holding `controlnet/`, or a single file with
//! - diffusers names (a folder's weights file on its own, as ComfyUI and A1111 users keep them), or
//! - SGM/cldm names (lllyasviel's ControlNet `cldm/cldm.py` module names, as A1111-style files
//!   have them), under `control_model.` or at the top level.
//!
//! A single file's architecture comes from its shapes (`config::derive_config`, on SGM names; a
//! diffusers-named file is read through the same names first). Tensors keep the checkpoint's own
//! names; `names` pairs each diffusers name the graph uses with the key it has in the file. The
//! diffusers <-> SGM map is the UNet's (`unet::ldm::LdmNames`) for the encoder plus the
//! ControlNet's own modules (diffusers `loaders/single_file_utils.py`,
//! `convert_controlnet_checkpoint`): `input_hint_block.{0, 2, ..}` for the conditioning
//! embedding, `zero_convs.{k}.0` and `middle_block_out.0` for the zero convs.
//!
//! A Union / ProMax checkpoint (diffusers ControlNetUnionModel, xinsir's controlnet-union-sdxl-1.0)
//! is told by its keys (`task_embedding`, `control_add_embedding.*`, ComfyUI's rule), in a folder
//! whatever config.json's `_class_name` says. Its own modules have the same names in diffusers'
//! folders and xinsir's files (`union::tensor_specs`); Union files with cldm names are not known
//! and are refused.
//!
//! A Control-LoRA (stabilityai/control-lora) is told by its `lora_controlnet` key and built over a
//! base UNet checkpoint (`control_lora`), so it opens only with one (`open_controlnet_with_base`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::ControlNet;
use super::config::{ControlNetConfig, derive_config, derive_union};
use super::control_lora::{self, MARKER};
use super::union;
use crate::error::{Error, Result};
use crate::models::fields::Limits;
use crate::models::files::{self, DIFFUSERS_FILES, Location};
use crate::models::lora::LoraMerge;
use crate::models::unet::ldm::{BlockLayout, LdmNames};
use crate::weights::{self, LoadedWeights, TensorSpec};

/// Where the ControlNet sits in a cldm file that also holds other models (lllyasviel's
/// `ControlLDM`: `control_model.*` beside `model.diffusion_model.*`), and in most A1111 files.
pub const CLDM_PREFIX: &str = "control_model.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlNetFormat {
    /// A diffusers folder: diffusers names, architecture from config.json.
    Diffusers,
    /// One file with diffusers names, architecture from its shapes.
    DiffusersSingleFile,
    /// One file with SGM/cldm names, under `CLDM_PREFIX` (`prefixed`) or at the top level.
    Cldm { prefixed: bool },
    /// A Control-LoRA file over a base UNet checkpoint (`control_lora`).
    ControlLora,
}

pub struct ControlNetCheckpoint {
    pub config: ControlNetConfig,
    pub weights: LoadedWeights,
    /// (diffusers name, checkpoint key) for every tensor of the plain ControlNet's graph; a
    /// Union's own tensors are under their diffusers names (`union::tensor_specs`).
    pub names: Vec<(String, String)>,
    pub format: ControlNetFormat,
    /// A Control-LoRA's up @ down products (scale 1), added to the weights they adapt when the
    /// net is prepared (`ControlNet::new`); None for every other format.
    pub deltas: Option<LoraMerge>,
}

/// Opens `path` (folder or file, see the module doc), checks its tensors strictly against the
/// architecture and maps them without a copy. A Control-LoRA needs its base UNet:
/// `open_controlnet_with_base`.
pub fn open_controlnet(path: &Path) -> Result<ControlNetCheckpoint> {
    open_controlnet_with_base(path, None)
}

/// `open_controlnet`, with the UNet checkpoint a Control-LoRA is built on (a render's UNet); a
/// ControlNet that holds its own encoder ignores `base`.
pub fn open_controlnet_with_base(path: &Path, base: Option<&Path>) -> Result<ControlNetCheckpoint> {
    match files::locate(path, "controlnet", "a diffusers ControlNet folder")? {
        Location::Folder(folder) => open_diffusers(&folder),
        Location::SingleFile => open_single_file(path, base),
    }
}

fn open_diffusers(folder: &Path) -> Result<ControlNetCheckpoint> {
    let (text, config_file) = files::read_config(folder)?;
    let files = [files::weights_file(folder, &DIFFUSERS_FILES)?];
    // 1. the checkpoint's header bounds what the config may ask for, before anything is sized
    let header = weights::load(&files)?;
    refuse_other_kinds(header.iter().map(|(n, _)| n), &files[0])?;
    let union_keys = has_union_keys(header.iter().map(|(n, _)| n));
    let config = ControlNetConfig::read_json(&text, &config_file, &Limits::of(&header), union_keys)?;
    drop(header);
    // 2. every tensor, strictly
    let specs = ControlNet::tensor_specs(&config);
    let names = specs.iter().map(|s| (s.name.clone(), s.name.clone())).collect();
    let all: Vec<TensorSpec> = specs.into_iter().chain(union::tensor_specs(&config)).collect();
    let weights = weights::load_strict(&files, &all, &[])?;
    Ok(ControlNetCheckpoint { config, weights, names, format: ControlNetFormat::Diffusers, deltas: None })
}

fn open_single_file(path: &Path, base: Option<&Path>) -> Result<ControlNetCheckpoint> {
    let files: [PathBuf; 1] = [path.to_path_buf()];
    let file = weights::open(path, "ControlNet checkpoint")?;
    if file.contains(MARKER) {
        let Some(base) = base else {
            return Err(Error::Input(format!(
                "{}: a Control-LoRA (stabilityai/control-lora: {MARKER}), which rebuilds a ControlNet from a base \
                 UNet's encoder: open it with the base UNet checkpoint (a render uses its models' UNet)",
                path.display()
            )));
        };
        return control_lora::open(path, &file, base);
    }
    let all: BTreeSet<&str> = file.names().collect();
    refuse_other_kinds(all.iter().copied(), path)?;
    let format = if all.iter().any(|n| n.starts_with(CLDM_PREFIX)) {
        ControlNetFormat::Cldm { prefixed: true }
    } else if all.contains("input_hint_block.0.weight") {
        ControlNetFormat::Cldm { prefixed: false }
    } else if all.contains("controlnet_cond_embedding.conv_in.weight") {
        ControlNetFormat::DiffusersSingleFile
    } else if all.iter().any(|n| n.starts_with("model.diffusion_model.")) || all.contains("conv_in.weight") {
        return Err(Error::Input(format!(
            "{}: a UNet checkpoint, not a ControlNet (no control_model.*, input_hint_block.* or \
             controlnet_cond_embedding.* tensors)",
            path.display()
        )));
    } else {
        return Err(Error::Input(format!(
            "{}: not a ControlNet checkpoint (no control_model.*, input_hint_block.* or controlnet_cond_embedding.* \
             tensors)",
            path.display()
        )));
    };
    let root = if format == (ControlNetFormat::Cldm { prefixed: true }) { CLDM_PREFIX } else { "" };
    let union_keys = has_union_keys(all.iter().copied());
    if union_keys && format != ControlNetFormat::DiffusersSingleFile {
        return Err(Error::Unsupported(format!(
            "{}: a ControlNet Union / ProMax checkpoint with cldm names (input_hint_block, zero_convs); this engine \
             reads Union files with diffusers names (xinsir's controlnet-union-sdxl-1.0 files)",
            path.display()
        )));
    }

    // 1. the shapes under SGM names below the root (a diffusers-named file's through the map of
    // the layout its names show)
    let shape = |n: &str| file.shape(n).map(<[usize]>::to_vec);
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    match format {
        ControlNetFormat::DiffusersSingleFile => {
            let map = CldmNames::from_diffusers_names(&all);
            for name in &all {
                if let Some(sgm) = map.cldm_name(name) {
                    shapes.insert(sgm, shape(name)?);
                }
            }
        }
        _ => {
            for name in all.iter().filter(|n| n.starts_with(root)) {
                shapes.insert(name[root.len()..].to_string(), shape(name)?);
            }
        }
    }
    let mut config = derive_config(&shapes, root).map_err(|e| match (e, format) {
        (Error::Input(m), ControlNetFormat::DiffusersSingleFile) => {
            Error::Input(format!("{m} (a file with diffusers names, read through their SGM equivalents)"))
        }
        (e, _) => e,
    })?;
    if union_keys {
        config.union = Some(derive_union(|n| file.shape(n).ok().map(<[usize]>::to_vec), &path.display().to_string())?);
        config.validate().map_err(|e| match e {
            Error::Input(m) => {
                Error::Input(format!("{}: the Union architecture read from its shapes: {m}", path.display()))
            }
            other => other,
        })?;
    }
    drop(file);

    // 2. every tensor checked against the architecture under the file's names
    let map = CldmNames::new(&config);
    let mut names = Vec::new();
    let mut specs = Vec::new();
    for spec in ControlNet::tensor_specs(&config) {
        let key = match format {
            ControlNetFormat::DiffusersSingleFile => spec.name.clone(),
            _ => {
                let sgm = map
                    .cldm_name(&spec.name)
                    .ok_or_else(|| Error::Internal(format!("no SGM name for the ControlNet tensor '{}'", spec.name)))?;
                format!("{root}{sgm}")
            }
        };
        specs.push(TensorSpec::new(key.clone(), &spec.shape));
        names.push((spec.name, key));
    }
    specs.extend(union::tensor_specs(&config));
    let outside = |name: &str| !name.starts_with(root);
    let weights = weights::load_filtered(&files, Some(&specs), &outside)?;
    Ok(ControlNetCheckpoint { config, weights, names, format, deltas: None })
}

/// Refuses, by name, a Control-LoRA marker where a Control-LoRA is not read: in a diffusers folder
/// or under `control_model.` (Stability's files keep their keys at the top level).
fn refuse_other_kinds<'a>(mut names: impl Iterator<Item = &'a str>, path: &Path) -> Result<()> {
    match names.any(|n| n.strip_prefix(CLDM_PREFIX).unwrap_or(n) == MARKER) {
        true => Err(Error::Unsupported(format!(
            "{}: a Control-LoRA marker ({MARKER}) in a folder or under {CLDM_PREFIX}; a Control-LoRA is read as \
             one file with its keys at the top level, as stabilityai/control-lora ships them",
            path.display()
        ))),
        false => Ok(()),
    }
}

/// Whether a checkpoint's keys hold the Union's modules (with or without the cldm prefix).
fn has_union_keys<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| {
        let n = n.strip_prefix(CLDM_PREFIX).unwrap_or(n);
        n == "task_embedding" || n.starts_with("control_add_embedding.")
    })
}

/// The diffusers -> SGM/cldm name map of one ControlNet (names below the root): the UNet's map for
/// the encoder, and the ControlNet's own modules.
pub struct CldmNames {
    encoder: LdmNames,
    /// Stages of the conditioning embedding (`conditioning_embedding_out_channels.len()`).
    stages: usize,
}

impl CldmNames {
    pub fn new(cfg: &ControlNetConfig) -> CldmNames {
        CldmNames { encoder: LdmNames::new(&cfg.encoder), stages: cfg.conditioning_embedding_out_channels.len() }
    }

    /// The map of the architecture a diffusers-named file's keys show: each down block's layers
    /// (`down_blocks.{i}.resnets.{j}`), their transformers (`attentions.{j}`) and downsampler, and
    /// the conditioning embedding's blocks.
    fn from_diffusers_names(names: &BTreeSet<&str>) -> CldmNames {
        let has = |name: String| names.contains(name.as_str());
        let mut down = Vec::new();
        for i in 0.. {
            let layers = (0..).take_while(|j| has(format!("down_blocks.{i}.resnets.{j}.conv1.weight"))).count();
            let sampler = has(format!("down_blocks.{i}.downsamplers.0.conv.weight"));
            if layers == 0 && !sampler {
                break;
            }
            let attention =
                (0..layers).map(|j| has(format!("down_blocks.{i}.attentions.{j}.proj_in.weight"))).collect();
            down.push(BlockLayout { attention, sampler });
        }
        let blocks = (0..).take_while(|b| has(format!("controlnet_cond_embedding.blocks.{b}.weight"))).count();
        CldmNames { encoder: LdmNames::from_layout(&down, &[]), stages: blocks / 2 + 1 }
    }

    /// The SGM/cldm name (below the root) of a diffusers tensor name; None outside every module.
    pub fn cldm_name(&self, diffusers: &str) -> Option<String> {
        if let Some(rest) = diffusers.strip_prefix("controlnet_cond_embedding.") {
            // Sequential indices: convs at even indices (odd ones are SiLU), conv_in at 0, blocks
            // from 2, conv_out last (14 for four stages).
            let (module, tail) = rest.split_once('.')?;
            let index = match module {
                "conv_in" => 0,
                "conv_out" => 2 * (2 * self.stages - 1),
                "blocks" => {
                    let (b, tail) = tail.split_once('.')?;
                    let index = b.parse::<usize>().ok()?.checked_mul(2)?.checked_add(2)?;
                    return Some(format!("input_hint_block.{index}.{tail}"));
                }
                _ => return None,
            };
            return Some(format!("input_hint_block.{index}.{tail}"));
        }
        if let Some(rest) = diffusers.strip_prefix("controlnet_down_blocks.") {
            let (k, tail) = rest.split_once('.')?;
            return Some(format!("zero_convs.{k}.0.{tail}"));
        }
        if let Some(tail) = diffusers.strip_prefix("controlnet_mid_block.") {
            return Some(format!("middle_block_out.0.{tail}"));
        }
        self.encoder.module_name(diffusers)
    }
}
