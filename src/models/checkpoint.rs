//! Opening a UNet checkpoint: a diffusers folder (config.json + diffusion_pytorch_model
//! safetensors, one file or shards with an index, or the fp16 variant), a pipeline folder holding
//! `unet/`, or a single-file SGM/LDM checkpoint. Tensors keep the checkpoint's own names; `names`
//! pairs each diffusers name the graph uses with the key it has in the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::config::UnetConfig;
use super::ldm::{self, LdmNames};
use super::unet::Unet;
use crate::error::{Error, Result};
use crate::weights::{self, LoadedWeights, TensorSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnetFormat {
    /// diffusers names, architecture from config.json.
    Diffusers,
    /// `model.diffusion_model.*` SGM/LDM names, architecture from the tensor shapes.
    SingleFile,
}

pub struct UnetCheckpoint {
    pub config: UnetConfig,
    pub weights: LoadedWeights,
    /// (diffusers name, checkpoint key) for every tensor the graph reads.
    pub names: Vec<(String, String)>,
    pub format: UnetFormat,
}

/// Weight files of a diffusers model folder, in the order tried.
const DIFFUSERS_FILES: [&str; 4] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
];

/// Opens `path` (folder or file, see the module doc), checks its tensors strictly against the
/// architecture and maps them without a copy.
pub fn open_unet(path: &Path) -> Result<UnetCheckpoint> {
    if path.is_dir() {
        let folder = if path.join("config.json").is_file() { path.to_path_buf() } else { path.join("unet") };
        if !folder.join("config.json").is_file() {
            return Err(Error::Input(format!(
                "{}: no config.json (a diffusers UNet folder) and no unet/config.json (a pipeline folder)",
                path.display()
            )));
        }
        return open_diffusers(&folder);
    }
    if path.file_name().is_some_and(|n| n == "config.json") {
        return open_diffusers(path.parent().unwrap_or(Path::new(".")));
    }
    if !path.is_file() {
        return Err(Error::Input(format!("{}: no such file or folder", path.display())));
    }
    open_single_file(path)
}

fn open_diffusers(folder: &Path) -> Result<UnetCheckpoint> {
    let config_path = folder.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::Input(format!("{}: cannot read: {e}", config_path.display())))?;
    let config = UnetConfig::from_diffusers_json(&text, &config_path.display().to_string())?;
    let Some(file) = DIFFUSERS_FILES.iter().map(|f| folder.join(f)).find(|p| p.is_file()) else {
        return Err(Error::Input(format!(
            "{}: none of {} (a .bin checkpoint is a pickle: convert it to safetensors first)",
            folder.display(),
            DIFFUSERS_FILES.join(", ")
        )));
    };
    let specs = Unet::tensor_specs(&config);
    let weights = weights::load_strict(&[file], &specs, &[])?;
    let names = specs.into_iter().map(|s| (s.name.clone(), s.name)).collect();
    Ok(UnetCheckpoint { config, weights, names, format: UnetFormat::Diffusers })
}

fn open_single_file(path: &Path) -> Result<UnetCheckpoint> {
    let outside = |name: &str| !name.starts_with(ldm::PREFIX);
    let files: [PathBuf; 1] = [path.to_path_buf()];
    // 1. the UNet's shapes (only its tensors: a full checkpoint also holds text encoders and a VAE)
    let found = weights::load_filtered(&files, None, &outside)?;
    if found.is_empty() {
        let all = weights::load_filtered(&files, None, &|_| false).ok();
        let diffusers_named = all.as_ref().is_some_and(|w| w.get("conv_in.weight").is_ok());
        return Err(Error::Input(if diffusers_named {
            format!(
                "{}: a UNet with diffusers names needs its config.json: pass the folder holding both",
                path.display()
            )
        } else {
            format!("{}: no {}* tensors: not a single-file SDXL checkpoint", path.display(), ldm::PREFIX)
        }));
    }
    let shapes: HashMap<String, Vec<usize>> =
        found.iter().map(|(name, t)| (name[ldm::PREFIX.len()..].to_string(), t.shape().to_vec())).collect();
    // 2. the architecture, then every tensor checked against it under its single-file name
    let config = ldm::derive_config(&shapes)?;
    let map = LdmNames::new(&config);
    let mut names = Vec::new();
    let mut specs = Vec::new();
    for spec in Unet::tensor_specs(&config) {
        let key = map
            .ldm_name(&spec.name)
            .ok_or_else(|| Error::Input(format!("no single-file name for the UNet tensor '{}'", spec.name)))?;
        specs.push(TensorSpec::new(key.clone(), &spec.shape));
        names.push((spec.name, key));
    }
    let weights = weights::load_filtered(&files, Some(&specs), &outside)?;
    Ok(UnetCheckpoint { config, weights, names, format: UnetFormat::SingleFile })
}
