//! The ControlNet fixtures (tools/make_controlnet_fixtures.py): diffusers folders and single files
//! assembled from unet_a's tensors and the ControlNet's own modules, by the lists diffusers wrote.
//! Needs the test crate to declare `mod fixtures` (common/unet_fixtures.rs).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors, serialize_to_file};

use crate::fixtures::{fixtures, folder};

/// The ControlNet variants: "full", "mid", "small".
pub const VARIANTS: [&str; 3] = ["full", "mid", "small"];

pub fn controlnet_dir() -> PathBuf {
    fixtures().join("controlnet_a")
}

/// `controlnet_a.<name>.reference.safetensors` (full, mid, small, guess).
pub fn reference(name: &str) -> PathBuf {
    fixtures().join(format!("controlnet_a.{name}.reference.safetensors"))
}

fn names() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(controlnet_dir().join("names.json")).unwrap()).unwrap()
}

/// Every tensor of `variant` by diffusers name: (dtype, shape, bytes).
pub fn tensors(variant: &str) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let unet = std::fs::read(folder("a").join("diffusion_pytorch_model.safetensors")).unwrap();
    let own = std::fs::read(controlnet_dir().join("controlnet_only.safetensors")).unwrap();
    let (unet, own) = (SafeTensors::deserialize(&unet).unwrap(), SafeTensors::deserialize(&own).unwrap());
    let view = |t: TensorView| (t.dtype(), t.shape().to_vec(), t.data().to_vec());
    let mut out = BTreeMap::new();
    for name in names()[variant]["from_unet_a"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        out.insert(name.to_string(), view(unet.tensor(name).unwrap()));
    }
    for (name, t) in own.tensors() {
        out.insert(name, view(t));
    }
    out
}

pub fn write(path: &Path, tensors: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let views: BTreeMap<&str, TensorView> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| (name.as_str(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    serialize_to_file(views, None, path).unwrap();
}

/// A diffusers folder of `variant` under `dir` (config.json + diffusion_pytorch_model.safetensors);
/// `edit` changes the tensors first.
pub fn write_folder_with(
    dir: &Path,
    variant: &str,
    edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let out = dir.join(format!("controlnet_{variant}"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(controlnet_dir().join(format!("config.{variant}.json")), out.join("config.json")).unwrap();
    let mut t = tensors(variant);
    edit(&mut t);
    write(&out.join("diffusion_pytorch_model.safetensors"), &t);
    out
}

pub fn write_folder(dir: &Path, variant: &str) -> PathBuf {
    write_folder_with(dir, variant, |_| {})
}

/// `variant` (full or mid) as one file with cldm names (the list tools/make_controlnet_fixtures.py
/// checked with diffusers' converter), under `prefix` ("control_model." or ""); with `prefix`,
/// also what a combined checkpoint holds beside the ControlNet (a UNet tensor, a text encoder's
/// int64 position ids), which the loader must skip.
pub fn write_cldm(path: &Path, variant: &str, prefix: &str) {
    let diffusers = tensors(variant);
    let names = names();
    let mut out: BTreeMap<String, _> = names[variant]["cldm_to_diffusers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(cldm, d)| (format!("{prefix}{cldm}"), diffusers[d.as_str().unwrap()].clone()))
        .collect();
    assert_eq!(out.len(), diffusers.len(), "the name list covers every tensor");
    if !prefix.is_empty() {
        let ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
        out.insert(
            "cond_stage_model.transformer.text_model.embeddings.position_ids".into(),
            (Dtype::I64, vec![1, 77], ids),
        );
        out.insert("model.diffusion_model.input_blocks.0.0.bias".into(), (Dtype::F16, vec![4], vec![0; 8]));
    }
    write(path, &out);
}

/// The Union fixture's tensors by diffusers name: the full variant's encoder and zero convs, and
/// union_only.safetensors (the Union's modules and its own conditioning embedding).
pub fn union_tensors() -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = tensors("full");
    let own = std::fs::read(controlnet_dir().join("union_only.safetensors")).unwrap();
    for (name, t) in SafeTensors::deserialize(&own).unwrap().tensors() {
        out.insert(name, (t.dtype(), t.shape().to_vec(), t.data().to_vec()));
    }
    out
}

/// The Union as a diffusers folder under `dir` (config.union.json as config.json), `edit`ed first.
pub fn write_union_folder_with(
    dir: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let out = dir.join("controlnet_union");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(controlnet_dir().join("config.union.json"), out.join("config.json")).unwrap();
    let mut t = union_tensors();
    edit(&mut t);
    write(&out.join("diffusion_pytorch_model.safetensors"), &t);
    out
}

pub fn write_union_folder(dir: &Path) -> PathBuf {
    write_union_folder_with(dir, |_| {})
}

/// `variant` as one file with diffusers names (a folder's weights without its config.json).
pub fn write_diffusers_file(path: &Path, variant: &str) {
    write(path, &tensors(variant));
}
