//! Control-LoRA (stabilityai/control-lora model card): a ControlNet stored as changes to the base
//! UNet's encoder. The file, marked by a `lora_controlnet` key, holds in SGM/cldm names at the top
//! level full tensors for the ControlNet's own modules (`input_hint_block.*`, `zero_convs.*`,
//! `middle_block_out.0.*`) and for whatever else it replaces (Stability's files: every bias and
//! norm), and a pair `<module>.up` / `<module>.down` for each Linear or Conv2d weight it adapts.
//!
//! The construction is ComfyUI's (`comfy/controlnet.py`, `ControlLora.pre_run` and
//! `ControlLoraOps`): the architecture is the base UNet's encoder with the hint's channels from dim
//! 1 of `input_hint_block.0.weight`; every tensor starts as the base UNet's, a tensor in the file
//! replaces it, and an adapted weight becomes W + up.flatten(1) @ down.flatten(1) reshaped to W's
//! shape, with no alpha (diffusers' converter, `convert_sai_sd_control_lora_state_dict_to_peft`,
//! gives PEFT lora_alpha = rank: the same). diffusers' loader differs in one point: it leaves the
//! full weight and bias of an adapted module at the base's, where ComfyUI sets them from the file;
//! this module follows ComfyUI. Unlike ComfyUI, a tensor found in neither file is an error rather
//! than left at its random initialisation.
//!
//! Nothing is copied when the file opens: the checkpoint maps the base UNet's files and the
//! Control-LoRA together, pairs each graph tensor with its key in one or the other, and carries
//! the up/down pairs as a `LoraMerge` at scale 1. `ControlNet::new` merges it as models merge
//! LoRAs (`Place::Merged`): on the host in f64, rounded once to the compute dtype; on the device by
//! the LoRA-delta kernels after the upload. The base is the UNet checkpoint as stored, without the
//! LoRAs a render merges into the UNet.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::ControlNet;
use super::checkpoint::{CldmNames, ControlNetCheckpoint, ControlNetFormat};
use super::config::ControlNetConfig;
use crate::error::{Error, Result};
use crate::models::lora::LoraMerge;
use crate::models::lora::merge::{Delta, LowRank, Scaled};
use crate::models::unet::{UnetConfig, open_unet};
use crate::weights::{self, LISTED_PER_KIND, TensorFile, TensorSpec};

/// The key that marks a Control-LoRA (ComfyUI's and diffusers' test: `"lora_controlnet" in sd`).
pub const MARKER: &str = "lora_controlnet";

/// Whether `path` is a single file holding the Control-LoRA marker (false for a folder or a file
/// that does not read: opening it reports that).
pub fn is_control_lora(path: &Path) -> bool {
    path.is_file() && weights::open(path, "ControlNet checkpoint").is_ok_and(|f| f.contains(MARKER))
}

/// Opens the Control-LoRA at `path` (its header read as `file`) over the UNet checkpoint `base`
/// (a diffusers folder or a single file, as `open_unet` takes it). Every problem with the file's
/// tensors (missing own modules, up without down, up @ down not fitting its weight, tensors the
/// encoder does not have) is gathered into one `Error::Input` naming the file and the tensors.
pub(super) fn open(path: &Path, file: &TensorFile, base: &Path) -> Result<ControlNetCheckpoint> {
    let describe = format!("{} (a Control-LoRA over the base UNet {})", path.display(), base.display());
    let unet = open_unet(base)?;

    // 1. the architecture: the base UNet's encoder, the file's conditioning embedding
    let (conditioning_channels, widths) = hint_widths(file, &describe)?;
    let encoder = UnetConfig { out_channels: 0, conv_out_kernel: 0, up_blocks: Vec::new(), ..unet.config.clone() };
    let config =
        ControlNetConfig { encoder, conditioning_channels, conditioning_embedding_out_channels: widths, union: None };
    config.validate().map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("{describe}: the ControlNet on the base UNet's encoder: {m}")),
        other => other,
    })?;

    // 2. each graph tensor's key: the file's where it has one, else the base UNet's; each adapted
    // weight's up/down pair, their shapes checked against the weight
    let base_keys: HashMap<&str, &str> = unet.names.iter().map(|(d, k)| (d.as_str(), k.as_str())).collect();
    let map = CldmNames::new(&config);
    let mut used: HashSet<String> = HashSet::from([MARKER.to_string()]);
    let mut problems = Vec::new();
    let mut names = Vec::new();
    let mut specs = Vec::new();
    let mut pairs = Vec::new();
    for spec in ControlNet::tensor_specs(&config) {
        let sgm = map
            .cldm_name(&spec.name)
            .ok_or_else(|| Error::Internal(format!("no cldm name for the ControlNet tensor '{}'", spec.name)))?;
        let key = if file.contains(&sgm) {
            used.insert(sgm.clone());
            sgm.clone()
        } else if let Some(key) = base_keys.get(spec.name.as_str()) {
            key.to_string()
        } else {
            problems.push(format!("missing {sgm} {:?} (the ControlNet's own modules come from the file)", spec.shape));
            continue;
        };
        if let Some(module) = sgm.strip_suffix(".weight") {
            let (up, down) = (format!("{module}.up"), format!("{module}.down"));
            match (file.shape(&up), file.shape(&down)) {
                (Ok(u), Ok(d)) => match factor_shapes(&spec.shape, u, d) {
                    Some((u_shape, d_shape)) => {
                        specs.push(TensorSpec::new(up.clone(), u));
                        specs.push(TensorSpec::new(down.clone(), d));
                        pairs.push((spec.name.clone(), module.to_string(), u_shape, d_shape));
                    }
                    None => problems.push(format!(
                        "{up} {u:?} @ {down} {d:?} does not make the weight {:?} of {} (up must be [out, rank] or \
                         [out, rank, 1, 1], down [rank, in] or [rank, in, kh, kw], rank > 0)",
                        spec.shape,
                        if key == sgm { format!("{sgm} in the file") } else { format!("{key} in the base UNet") }
                    )),
                },
                (Ok(_), Err(_)) => problems.push(format!("{up} without {down}")),
                (Err(_), Ok(_)) => problems.push(format!("{down} without {up}")),
                (Err(_), Err(_)) => {}
            }
            used.extend([up, down]);
        }
        specs.push(TensorSpec::new(key.clone(), &spec.shape));
        names.push((spec.name, key));
    }
    let extra: Vec<&str> = file.names().filter(|n| !used.contains(*n)).collect();
    for name in &extra {
        let shape = file.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        problems.push(format!(
            "{name} {shape:?}: the ControlNet on the base UNet's encoder has no such tensor (a deeper or \
             different encoder than the base's?)"
        ));
    }
    if !problems.is_empty() {
        let mut message = format!("{describe}: {} problem(s):", problems.len());
        for p in problems.iter().take(LISTED_PER_KIND) {
            message.push_str(&format!("\n  {p}"));
        }
        if problems.len() > LISTED_PER_KIND {
            message.push_str(&format!("\n  ... and {} more", problems.len() - LISTED_PER_KIND));
        }
        return Err(Error::Input(message));
    }

    // 3. both checkpoints mapped as one (keys from the base UNet's files or the Control-LoRA),
    // shapes and dtypes checked strictly; everything else in either is skipped
    let mut files = unet.weights.files().to_vec();
    files.push(path.to_path_buf());
    drop(unet);
    let wanted: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let weights = weights::load_filtered(&files, Some(&specs), &|n| !wanted.contains(n))?;

    // 4. the deltas: up [out, r] and down [r, in(, kh, kw)] views, scale 1
    let mut deltas = LoraMerge::default();
    for (name, module, up_shape, down_shape) in pairs {
        let low_rank = LowRank {
            up: weights.get(&format!("{module}.up"))?.reshape(&up_shape)?,
            down: weights.get(&format!("{module}.down"))?.reshape(&down_shape)?,
            mid: None,
        };
        let source = format!("{}: {module}", path.display());
        deltas.add(&name, Scaled { scale: 1.0, delta: Delta::LowRank(low_rank), source, dora: None });
    }
    Ok(ControlNetCheckpoint { config, weights, names, format: ControlNetFormat::ControlLora, deltas: Some(deltas) })
}

/// The control image's channels (dim 1 of `input_hint_block.0.weight`, ComfyUI's
/// `hint_channels`) and the conditioning embedding's widths: its convs sit at the even indices of
/// `input_hint_block` (SiLUs between them), conv_in first, conv_out last, each stage's stride-2
/// conv at 4, 8, ... giving the stage's width.
fn hint_widths(file: &TensorFile, describe: &str) -> Result<(usize, Vec<usize>)> {
    let conv = |k: usize| file.shape(&format!("input_hint_block.{}.weight", 2 * k)).ok();
    let convs = (0..).take_while(|&k| conv(k).is_some()).count();
    let bad = |m: String| Error::Input(format!("{describe}: input_hint_block: {m}"));
    if convs < 2 || convs % 2 != 0 {
        return Err(bad(format!(
            "{convs} convolution weights at indices 0, 2, 4, ...; the conditioning embedding has an even number, at \
             least 2"
        )));
    }
    let shape = |k: usize| match conv(k) {
        Some(s) if s.len() == 4 => Ok(s),
        s => Err(bad(format!("input_hint_block.{}.weight {s:?} must be a 4-d convolution weight", 2 * k))),
    };
    let conv_in = shape(0)?;
    let mut widths = vec![conv_in[0]];
    for m in 1..convs / 2 {
        widths.push(shape(2 * m)?[0]);
    }
    Ok((conv_in[1], widths))
}

/// The shapes the factors take for a weight of shape `w` ([out, in(, kh, kw)]): up [out, r] and
/// down [r, in(, kh, kw)], r = down's first dimension; None when up.flatten(1) @ down.flatten(1)
/// (ComfyUI's product) does not give out x (in·kh·kw) values.
fn factor_shapes(w: &[usize], up: &[usize], down: &[usize]) -> Option<(Vec<usize>, Vec<usize>)> {
    let (&out, cols) = (w.first()?, w.iter().skip(1).product::<usize>());
    let r = *down.first()?;
    let fits = r > 0
        && w.len() >= 2
        && up.len() >= 2
        && down.len() >= 2
        && up[0] == out
        && up[1..].iter().product::<usize>() == r
        && down[1..].iter().product::<usize>() == cols;
    fits.then(|| (vec![out, r], [&[r][..], &w[1..]].concat()))
}

#[cfg(test)]
mod tests {
    use super::factor_shapes;

    #[test]
    fn factors_flatten_as_comfyui_does() {
        let conv = [32, 16, 3, 3];
        let want = Some((vec![32, 4], vec![4, 16, 3, 3]));
        assert_eq!(factor_shapes(&conv, &[32, 4, 1, 1], &[4, 16, 3, 3]), want, "PEFT's conv shapes");
        assert_eq!(factor_shapes(&conv, &[32, 4], &[4, 144]), want, "flattened");
        assert_eq!(factor_shapes(&[8, 5], &[8, 2], &[2, 5]), Some((vec![8, 2], vec![2, 5])));
        assert_eq!(factor_shapes(&conv, &[32, 4, 3, 3], &[4, 16, 3, 3]), None, "up's columns are not the rank");
        assert_eq!(factor_shapes(&conv, &[16, 4], &[4, 144]), None, "wrong out");
        assert_eq!(factor_shapes(&conv, &[32, 4], &[4, 16, 1, 1]), None, "kernel missing");
        assert_eq!(factor_shapes(&conv, &[32, 0], &[0, 144]), None, "rank 0");
        assert_eq!(factor_shapes(&[8], &[8, 1], &[1, 1]), None, "a vector has no factors");
    }
}
