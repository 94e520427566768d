//! Opening a VAE: a diffusers folder (config.json + diffusion_pytorch_model safetensors), a
//! pipeline folder holding `vae/`, or a single-file checkpoint with LDM names (a full SDXL file
//! with the VAE under `first_stage_model.`, or `vae.`, or a standalone VAE file without prefix).
//! Tensors keep the file's own names; `names` pairs each diffusers name the graph reads with its
//! key in the file. Loading is strict for the decoder; the encoder half (`encoder.*`,
//! `quant_conv.*`) is skipped by name, since we only decode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::Vae;
use super::config::VaeConfig;
use crate::error::{Error, Result};
use crate::models::fields::Limits;
use crate::models::files::{self, DIFFUSERS_FILES, Location};
use crate::weights::{self, LoadedWeights, TensorSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaeFormat {
    /// diffusers names, architecture from config.json.
    Diffusers,
    /// LDM names, architecture from the tensor shapes.
    SingleFile,
}

pub struct VaeCheckpoint {
    pub config: VaeConfig,
    pub weights: LoadedWeights,
    /// (diffusers name, key in the file) for every tensor the decoder reads.
    pub names: Vec<(String, String)>,
    pub format: VaeFormat,
}

/// Where single files keep the VAE (diffusers' LDM_VAE_KEYS), then a standalone VAE file.
const SINGLE_FILE_PREFIXES: [&str; 3] = ["first_stage_model.", "vae.", ""];

/// What a single file cannot say, at SDXL's values (Stability-AI generative-models
/// `configs/inference/sd_xl_base.yaml`, first_stage_config): LDM's fixed 32 norm groups,
/// SDXL's scaling factor and image size. A single file is assumed to be the fp16-fix (the engine's
/// default VAE, `force_upcast` false); the stock SDXL VAE overflows in float16, which
/// `decode_frames` reports as non-finite output.
const LDM_GROUPS: usize = 32;
const SDXL_SCALING_FACTOR: f32 = 0.13025;
const SDXL_SAMPLE_SIZE: usize = 1024;

/// The encoder half of an AutoencoderKL, which the decoder never reads.
fn encoder_side(name: &str) -> bool {
    name.starts_with("encoder.") || name.starts_with("quant_conv.")
}

/// Opens `path` (folder or file, see the module doc), checks its decoder tensors strictly against
/// the architecture and maps them without a copy.
pub fn open_vae(path: &Path) -> Result<VaeCheckpoint> {
    match files::locate(path, "vae", "a diffusers VAE folder")? {
        Location::Folder(folder) => open_diffusers(&folder),
        Location::SingleFile => open_single_file(path),
    }
}

fn open_diffusers(folder: &Path) -> Result<VaeCheckpoint> {
    let (text, config_file) = files::read_config(folder)?;
    let files = [files::weights_file(folder, &DIFFUSERS_FILES)?];
    // 1. the names present, which bound what the config may ask for before anything is sized;
    //    files saved before diffusers' attention refactor use query/key/value/proj_attn for the
    //    mid attention
    let found = weights::load_filtered(&files, None, &encoder_side)?;
    let config = VaeConfig::from_diffusers_json(&text, &config_file, &Limits::of(&found))?;
    let legacy = found.get("decoder.mid_block.attentions.0.query.weight").is_ok();
    let shapes: HashMap<&str, &[usize]> = found.iter().map(|(n, t)| (n, t.shape())).collect();
    // 2. every decoder tensor, strictly
    let mut names = Vec::new();
    let mut specs = Vec::new();
    for spec in Vae::tensor_specs(&config) {
        let key = if legacy { legacy_attention_name(&spec.name) } else { spec.name.clone() };
        let shape = match spec.shape.as_slice() {
            [_, _] => projection_shape(&spec.shape, shapes.get(key.as_str()).copied()),
            _ => spec.shape.clone(),
        };
        specs.push(TensorSpec::new(key.clone(), &shape));
        names.push((spec.name, key));
    }
    let weights = weights::load_filtered(&files, Some(&specs), &encoder_side)?;
    Ok(VaeCheckpoint { config, weights, names, format: VaeFormat::Diffusers })
}

fn open_single_file(path: &Path) -> Result<VaeCheckpoint> {
    let files: [PathBuf; 1] = [path.to_path_buf()];
    // 1. where the VAE sits
    let probe = weights::load_filtered(&files, None, &|n| !n.ends_with("decoder.conv_in.weight"))?;
    let Some(prefix) =
        SINGLE_FILE_PREFIXES.into_iter().find(|p| probe.get(&format!("{p}decoder.conv_in.weight")).is_ok())
    else {
        return Err(Error::Input(format!(
            "{}: no decoder.conv_in.weight under {}or at the top level: not a VAE nor a checkpoint holding one",
            path.display(),
            SINGLE_FILE_PREFIXES[..2].iter().map(|p| format!("{p} ")).collect::<String>()
        )));
    };
    // 2. the decoder's shapes (outside the prefix, and the encoder half, skipped) -> architecture
    let skip = |name: &str| name.strip_prefix(prefix).is_none_or(encoder_side);
    let found = weights::load_filtered(&files, None, &skip)?;
    let shapes: HashMap<String, Vec<usize>> =
        found.iter().map(|(n, t)| (n[prefix.len()..].to_string(), t.shape().to_vec())).collect();
    if shapes.contains_key("decoder.mid_block.resnets.0.conv1.weight") {
        return Err(Error::Input(format!(
            "{}: a VAE with diffusers names needs its config.json: pass the folder holding both",
            path.display()
        )));
    }
    let config = derive_config(&shapes, &path.display().to_string())?;
    // 3. every decoder tensor under its single-file name, strictly
    let levels = config.block_out_channels.len();
    let mut names = Vec::new();
    let mut specs = Vec::new();
    for spec in Vae::tensor_specs(&config) {
        let ldm = ldm_name(&spec.name, levels)
            .ok_or_else(|| Error::Input(format!("no single-file name for the VAE tensor '{}'", spec.name)))?;
        // LDM's attention projections are 1x1 convolutions; converted files may hold matrices.
        let shape = match spec.shape.as_slice() {
            &[o, i] => projection_shape(&[o, i, 1, 1], shapes.get(&ldm).map(Vec::as_slice)),
            other => other.to_vec(),
        };
        let key = format!("{prefix}{ldm}");
        specs.push(TensorSpec::new(key.clone(), &shape));
        names.push((spec.name, key));
    }
    let weights = weights::load_filtered(&files, Some(&specs), &skip)?;
    Ok(VaeCheckpoint { config, weights, names, format: VaeFormat::SingleFile })
}

/// The expected shape of a tensor, except that an attention projection may come as a matrix
/// [o, i] or as a 1x1 convolution [o, i, 1, 1] (the graph reads both): the file's form is taken.
fn projection_shape(expected: &[usize], found: Option<&[usize]>) -> Vec<usize> {
    match (expected, found) {
        (&[o, i], Some(&[fo, fi, 1, 1])) | (&[o, i, 1, 1], Some(&[fo, fi])) if (o, i) == (fo, fi) => {
            found.unwrap_or(expected).to_vec()
        }
        _ => expected.to_vec(),
    }
}

/// The pre-refactor diffusers name of a mid-attention tensor (diffusers `models/modeling_utils.py`,
/// `_convert_deprecated_attention_blocks`); others unchanged.
fn legacy_attention_name(name: &str) -> String {
    let p = "decoder.mid_block.attentions.0.";
    let Some(rest) = name.strip_prefix(p) else {
        return name.to_string();
    };
    let rest = [("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")]
        .iter()
        .find_map(|(new, old)| rest.strip_prefix(new).map(|param| format!("{old}{param}")))
        .unwrap_or_else(|| rest.to_string());
    format!("{p}{rest}")
}

/// The LDM (single-file) name of a decoder tensor, without the file's prefix (diffusers
/// `loaders/single_file_utils.py`, `convert_ldm_vae_checkpoint`):
/// LDM numbers up blocks by resolution (`up.{levels-1-i}` is diffusers' `up_blocks.{i}`), calls
/// the mid ResNets block_1/block_2, the shortcut nin_shortcut, the output norm norm_out, and the
/// attention's modules norm/q/k/v/proj_out.
pub fn ldm_name(name: &str, levels: usize) -> Option<String> {
    if name.starts_with("post_quant_conv.") {
        return Some(name.to_string());
    }
    let rest = name.strip_prefix("decoder.")?;
    let mapped = if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
        let (j, tail) = r.split_once('.')?;
        format!("mid.block_{}.{tail}", j.parse::<usize>().ok()? + 1)
    } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        let (module, param) = r.rsplit_once('.')?;
        let ldm = match module {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => return None,
        };
        format!("mid.attn_1.{ldm}.{param}")
    } else if let Some(r) = rest.strip_prefix("up_blocks.") {
        let (i, tail) = r.split_once('.')?;
        let k = levels.checked_sub(i.parse::<usize>().ok()? + 1)?;
        if let Some(t) = tail.strip_prefix("resnets.") {
            let (j, t) = t.split_once('.')?;
            format!("up.{k}.block.{j}.{}", t.replace("conv_shortcut", "nin_shortcut"))
        } else {
            format!("up.{k}.upsample.conv.{}", tail.strip_prefix("upsamplers.0.conv.")?)
        }
    } else if let Some(param) = rest.strip_prefix("conv_norm_out.") {
        format!("norm_out.{param}")
    } else {
        rest.to_string() // conv_in, conv_out
    };
    Some(format!("decoder.{mapped}"))
}

/// The decoder's architecture from LDM tensor shapes (names without the file's prefix); what
/// shapes cannot tell takes SDXL's values (`LDM_GROUPS` and the constants beside it).
fn derive_config(shapes: &HashMap<String, Vec<usize>>, file: &str) -> Result<VaeConfig> {
    let shape = |name: &str, dims: usize| -> Result<&[usize]> {
        match shapes.get(name) {
            Some(s) if s.len() == dims => Ok(s),
            Some(s) => Err(Error::Input(format!("{file}: {name} has shape {s:?}, expected {dims} dimensions"))),
            None => Err(Error::Input(format!("{file}: no {name} (needed to derive the VAE's architecture)"))),
        }
    };
    let conv1 = |k: usize, j: usize| format!("decoder.up.{k}.block.{j}.conv1.weight");
    let levels = (0..).take_while(|&k| shapes.contains_key(&conv1(k, 0))).count();
    if levels == 0 {
        return Err(Error::Input(format!("{file}: no {} (no decoder up blocks)", conv1(0, 0))));
    }
    let mut block_out_channels = Vec::with_capacity(levels);
    let mut resnets = Vec::with_capacity(levels);
    for k in 0..levels {
        block_out_channels.push(shape(&conv1(k, 0), 4)?[0]);
        resnets.push((0..).take_while(|&j| shapes.contains_key(&conv1(k, j))).count());
    }
    if resnets.iter().any(|&n| n != resnets[0]) {
        return Err(Error::Input(format!(
            "{file}: the decoder's up blocks have different ResNet counts {resnets:?} (diffusers' layers_per_block is one number)"
        )));
    }
    let config = VaeConfig {
        latent_channels: shape("decoder.conv_in.weight", 4)?[1],
        out_channels: shape("decoder.conv_out.weight", 4)?[0],
        block_out_channels,
        layers_per_block: resnets[0] - 1,
        norm_num_groups: LDM_GROUPS,
        scaling_factor: SDXL_SCALING_FACTOR,
        shift_factor: None,
        force_upcast: false,
        mid_block_attention: shapes.contains_key("decoder.mid.attn_1.q.weight"),
        post_quant_conv: shapes.contains_key("post_quant_conv.weight"),
        sample_size: SDXL_SAMPLE_SIZE,
    };
    config.validate(file)?;
    Ok(config)
}
