//! Opening a UNet checkpoint: a diffusers folder (config.json + diffusion_pytorch_model
//! safetensors, one file or shards with an index, or the fp16 variant), a pipeline folder holding
//! `unet/`, or a single-file SGM/LDM checkpoint. Tensors keep the checkpoint's own names; `names`
//! pairs each diffusers name the graph uses with the key it has in the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::Unet;
use super::config::UnetConfig;
use super::ldm::{self, LdmNames};
use crate::error::{Error, Result};
use crate::models::fields::Limits;
use crate::models::files::{self, DIFFUSERS_FILES, Location};
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

/// Opens `path` (folder or file, see the module doc), checks its tensors strictly against the
/// architecture and maps them without a copy.
pub fn open_unet(path: &Path) -> Result<UnetCheckpoint> {
    match files::locate(path, "unet", "a diffusers UNet folder")? {
        Location::Folder(folder) => open_diffusers(&folder),
        Location::SingleFile => open_single_file(path),
    }
}

fn open_diffusers(folder: &Path) -> Result<UnetCheckpoint> {
    let (text, config_file) = files::read_config(folder)?;
    let files = [files::weights_file(folder, &DIFFUSERS_FILES)?];
    // 1. the checkpoint's header bounds what the config may ask for, before anything is sized
    let limits = Limits::of(&weights::load(&files)?);
    let config = UnetConfig::from_diffusers_json(&text, &config_file, &limits)?;
    // 2. every tensor, strictly
    let specs = Unet::tensor_specs(&config);
    let weights = weights::load_strict(&files, &specs, &[])?;
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
