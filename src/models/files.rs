//! Finding a model's files, shared by the UNet, VAE and text-encoder loaders: a model folder
//! (config.json + weights), a pipeline folder holding the model's subfolder, the config.json
//! itself, or a single-file checkpoint.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io;

/// Weight files of a diffusers model folder, in the order tried.
pub(crate) const DIFFUSERS_FILES: [&str; 4] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
];

/// What a checkpoint path points at.
pub(crate) enum Location {
    /// A model folder holding config.json.
    Folder(PathBuf),
    /// A single-file checkpoint (the path itself).
    SingleFile,
}

/// Resolves `path`: a folder with config.json, a pipeline folder with `subfolder/config.json`, a
/// config.json (its folder), or an existing file. `what` names the model folder in errors
/// (e.g. "a diffusers UNet folder").
pub(crate) fn locate(path: &Path, subfolder: &str, what: &str) -> Result<Location> {
    if path.is_dir() {
        let folder = if path.join("config.json").is_file() { path.to_path_buf() } else { path.join(subfolder) };
        if !folder.join("config.json").is_file() {
            return Err(Error::Input(format!(
                "{}: no config.json ({what}) and no {subfolder}/config.json (a pipeline folder)",
                path.display()
            )));
        }
        return Ok(Location::Folder(folder));
    }
    if path.file_name().is_some_and(|n| n == "config.json") {
        return Ok(Location::Folder(path.parent().unwrap_or(Path::new(".")).to_path_buf()));
    }
    if !path.is_file() {
        return Err(Error::Input(format!("{}: no such file or folder", path.display())));
    }
    Ok(Location::SingleFile)
}

/// The folder's config.json (a regular file of at most `io::JSON_LIMIT` bytes: a FIFO or device
/// is refused, not read): its text and its path for error messages.
pub(crate) fn read_config(folder: &Path) -> Result<(String, String)> {
    let config_path = folder.join("config.json");
    let text = io::read_text(&config_path, io::JSON_LIMIT, "model config")?;
    Ok((text, config_path.display().to_string()))
}

/// The first of `names` present in `folder` (one safetensors file or a shard index).
pub(crate) fn weights_file(folder: &Path, names: &[&str]) -> Result<PathBuf> {
    names.iter().map(|f| folder.join(f)).find(|p| p.is_file()).ok_or_else(|| {
        Error::Input(format!(
            "{}: none of {} (a .bin checkpoint is a pickle: convert it to safetensors first)",
            folder.display(),
            names.join(", ")
        ))
    })
}
