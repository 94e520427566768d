//! Opening motion-module weights: a diffusers MotionAdapter folder (config.json +
//! diffusion_pytorch_model safetensors), a pipeline folder holding `motion_adapter/`, or one
//! safetensors file with either diffusers' names or the original AnimateDiff ones (converted from
//! the pickled `.ckpt` by tools/convert_motion_ckpt.py). Loading is strict: every tensor the
//! architecture has, nothing else, every shape, listed in one error.
//!
//! Key names (diffusers `loaders/single_file_utils.py`, `convert_animatediff_checkpoint_to_diffusers`):
//! the original `{block}.motion_modules.{j}.temporal_transformer.{rest}` is diffusers'
//! `{block}.motion_modules.{j}.{rest}` with, inside `transformer_blocks.{n}`,
//! `attention_blocks.0/1` -> `attn1/attn2`, `norms.0/1` -> `norm1/norm2`, `ff_norm` -> `norm3`. The
//! original stores the sinusoidal position table per attention block
//! (`attention_blocks.{k}.pos_encoder.pe` [1, positions, C]); diffusers one per transformer block,
//! shared by attn1 and attn2 (`pos_embed.pe`, a persistent buffer that older adapters lack). Where
//! the file has them they are used as stored (diffusers and the original code load them: a table
//! saved in float16 is float16-rounded there too); where it has none the forward computes them.

use std::path::{Path, PathBuf};

use super::config::{DEFAULT_GROUPS, DEFAULT_HEADS, DEFAULT_MAX_SEQ_LENGTH, Found, MotionConfig, TemporalTransformer};
use crate::error::{Error, Result};
use crate::models::fields::Limits;
use crate::models::files::{self, DIFFUSERS_FILES, Location};
use crate::weights::{self, LoadedWeights, TensorSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MotionFormat {
    /// diffusers MotionAdapter names.
    Diffusers,
    /// The original AnimateDiff names (`...temporal_transformer...`, `pos_encoder.pe`).
    Original,
}

pub struct MotionCheckpoint {
    pub config: MotionConfig,
    pub weights: LoadedWeights,
    /// (graph name, checkpoint key) for every tensor the forward reads: diffusers names, and
    /// `...transformer_blocks.{n}.attn{1,2}.pe` for stored position tables.
    pub names: Vec<(String, String)>,
    pub format: MotionFormat,
}

/// Opens `path` (see the module doc) and loads it strictly.
pub fn open_motion(path: &Path) -> Result<MotionCheckpoint> {
    match files::locate(path, "motion_adapter", "a diffusers MotionAdapter folder")? {
        Location::Folder(folder) => open_diffusers(&folder),
        Location::SingleFile => open_single_file(path),
    }
}

fn open_diffusers(folder: &Path) -> Result<MotionCheckpoint> {
    let (text, config_file) = files::read_config(folder)?;
    let files = [files::weights_file(folder, &DIFFUSERS_FILES)?];
    // 1. the header bounds the config before anything is sized from it
    let header = weights::load(&files)?;
    let config = MotionConfig::from_diffusers_json(&text, &config_file, &Limits::of(&header))?;
    let with_pe = header.iter().any(|(name, _)| name.ends_with(".pos_embed.pe"));
    // 2. every tensor, strictly
    load(&files, config, MotionFormat::Diffusers, with_pe)
}

fn open_single_file(path: &Path) -> Result<MotionCheckpoint> {
    let files = [path.to_path_buf()];
    let header = weights::load(&files)?;
    let source = path.display().to_string();
    // 1. the format, then the architecture from the names and shapes
    let format = match header.iter().any(|(name, _)| name.contains(".temporal_transformer.")) {
        true => MotionFormat::Original,
        false => MotionFormat::Diffusers,
    };
    let mut found = Found::default();
    let mut widths = Vec::new();
    let mut positions = None;
    let mut with_pe = false;
    for (name, t) in header.iter() {
        let Some((path, i, j, rest)) = split_module(name, format) else { continue };
        let entry = found.modules.entry((path.to_string(), i, j)).or_default();
        if let Some(n) = rest.strip_prefix("transformer_blocks.").and_then(|r| r.split('.').next()) {
            match n.parse::<usize>() {
                Ok(n) => {
                    entry.1.insert(n);
                }
                Err(_) => {
                    return Err(Error::Input(format!(
                        "{source}: tensor '{name}': transformer block '{n}' is not a number"
                    )));
                }
            }
        }
        if let ("norm.weight", &[c]) = (rest, t.shape()) {
            entry.0 = c;
            widths.push(c);
        }
        if rest.ends_with("pos_encoder.pe") || rest.ends_with("pos_embed.pe") {
            with_pe = true;
            positions = positions.or(t.shape().get(1).copied());
        }
    }
    if let Some(((path, i, j), _)) = found.modules.iter().find(|(_, (c, _))| *c == 0) {
        return Err(Error::Input(format!(
            "{source}: motion module {path}.{i}.motion_modules.{j} has no 1-d norm.weight"
        )));
    }
    let max_len = positions.unwrap_or(DEFAULT_MAX_SEQ_LENGTH);
    let config = found.into_config(&source, DEFAULT_HEADS, DEFAULT_GROUPS, max_len)?;
    // 2. every tensor, strictly, under the file's names
    load(&files, config, format, with_pe)
}

/// (path, block, module, rest) of a motion-module tensor name in `format`; None for any other name
/// (strict loading then lists it as unexpected).
fn split_module(name: &str, format: MotionFormat) -> Option<(&str, usize, usize, &str)> {
    let (path, i, tail) = match name.strip_prefix("mid_block.motion_modules.") {
        Some(tail) => ("mid_block", 0, tail),
        None => {
            let (path, tail) = name.split_once('.')?;
            if path != "down_blocks" && path != "up_blocks" {
                return None;
            }
            let (i, tail) = tail.split_once('.')?;
            (path, i.parse().ok()?, tail.strip_prefix("motion_modules.")?)
        }
    };
    let (j, rest) = tail.split_once('.')?;
    let rest = match format {
        MotionFormat::Original => rest.strip_prefix("temporal_transformer.")?,
        MotionFormat::Diffusers => rest,
    };
    Some((path, i, j.parse().ok()?, rest))
}

fn load(files: &[PathBuf], config: MotionConfig, format: MotionFormat, with_pe: bool) -> Result<MotionCheckpoint> {
    let (specs, names) = tensor_specs(&config, format, with_pe);
    let weights = weights::load_strict(files, &specs, &[])?;
    Ok(MotionCheckpoint { config, weights, names, format })
}

/// Every tensor of the modules under its name in `format` (PyTorch shapes), and the (graph name,
/// key) pairs the forward reads: diffusers names, and `transformer_blocks.{n}.attn{1,2}.pe` for the
/// position tables (one key for both in diffusers' format). `with_pe`: the diffusers file stores
/// `pos_embed.pe` (the original format always stores its tables).
pub fn tensor_specs(
    cfg: &MotionConfig,
    format: MotionFormat,
    with_pe: bool,
) -> (Vec<TensorSpec>, Vec<(String, String)>) {
    let (mut specs, mut names) = (Vec::new(), Vec::new());
    for (prefix, m) in cfg.modules() {
        for t in module_tensors(m, cfg.max_seq_length, with_pe) {
            let key = match (format, t.diffusers, t.original) {
                (MotionFormat::Diffusers, Some(d), _) => format!("{prefix}.{d}"),
                (MotionFormat::Original, _, Some(o)) => format!("{prefix}.temporal_transformer.{o}"),
                _ => continue,
            };
            names.extend(t.graph.into_iter().map(|g| (format!("{prefix}.{g}"), key.clone())));
            specs.push(TensorSpec::new(key, &t.shape));
        }
    }
    (specs, names)
}

/// One tensor of a module: its name in each format (None where that format has no such tensor:
/// the position tables differ, and diffusers' are optional), the graph names it serves, its shape.
struct ModuleTensor {
    diffusers: Option<String>,
    original: Option<String>,
    graph: Vec<String>,
    shape: Vec<usize>,
}

fn module_tensors(m: &TemporalTransformer, positions: usize, with_pe: bool) -> Vec<ModuleTensor> {
    let c = m.channels;
    let renamed = |d: String, o: String, shape: &[usize]| ModuleTensor {
        graph: vec![d.clone()],
        diffusers: Some(d),
        original: Some(o),
        shape: shape.to_vec(),
    };
    let same = |name: String, shape: &[usize]| renamed(name.clone(), name, shape);
    let mut out = Vec::new();
    for module in ["norm", "proj_in", "proj_out"] {
        let w: &[usize] = if module == "norm" { &[c] } else { &[c, c] };
        out.push(same(format!("{module}.weight"), w));
        out.push(same(format!("{module}.bias"), &[c]));
    }
    for n in 0..m.depth {
        let b = format!("transformer_blocks.{n}");
        for (d, o) in [("norm1", "norms.0"), ("norm2", "norms.1"), ("norm3", "ff_norm")] {
            for p in ["weight", "bias"] {
                out.push(renamed(format!("{b}.{d}.{p}"), format!("{b}.{o}.{p}"), &[c]));
            }
        }
        for (d, o) in [("attn1", "attention_blocks.0"), ("attn2", "attention_blocks.1")] {
            for (p, shape) in [
                ("to_q.weight", &[c, c][..]),
                ("to_k.weight", &[c, c]),
                ("to_v.weight", &[c, c]),
                ("to_out.0.weight", &[c, c]),
                ("to_out.0.bias", &[c]),
            ] {
                out.push(renamed(format!("{b}.{d}.{p}"), format!("{b}.{o}.{p}"), shape));
            }
            out.push(ModuleTensor {
                diffusers: None,
                original: Some(format!("{b}.{o}.pos_encoder.pe")),
                graph: vec![format!("{b}.{d}.pe")],
                shape: vec![1, positions, c],
            });
        }
        for (p, shape) in [
            ("ff.net.0.proj.weight", &[8 * c, c][..]),
            ("ff.net.0.proj.bias", &[8 * c]),
            ("ff.net.2.weight", &[c, 4 * c]),
            ("ff.net.2.bias", &[c]),
        ] {
            out.push(same(format!("{b}.{p}"), shape));
        }
        if with_pe {
            out.push(ModuleTensor {
                diffusers: Some(format!("{b}.pos_embed.pe")),
                original: None,
                graph: vec![format!("{b}.attn1.pe"), format!("{b}.attn2.pe")],
                shape: vec![1, positions, c],
            });
        }
    }
    out
}
