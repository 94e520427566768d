//! The Control-LoRA fixture (tools/make_control_lora_fixtures.py): the file as Stability ships it,
//! assembled from control_lora/encoder.safetensors (the marker, the replaced tensors and the up/down
//! pairs) and the ControlNet fixtures' own modules under their cldm names (controlnet_a/names.json),
//! over the base UNet tests/fixtures/unet_a. Needs the test crate to declare `mod fixtures`
//! (common/unet_fixtures.rs) and `mod controlnet` (common/controlnet_fixtures.rs).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::controlnet::{controlnet_dir, tensors, write};
use crate::fixtures::{fixtures, folder};

/// A safetensors file's tensors by name: (dtype, shape, bytes).
pub type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// The base UNet the fixture was made over.
pub fn base_unet() -> PathBuf {
    folder("a")
}

/// diffusers' outputs for the Control-LoRA over `base_unet`.
pub fn control_lora_reference() -> PathBuf {
    fixtures().join("control_lora/reference.safetensors")
}

/// Every tensor of the Control-LoRA file, by its key.
pub fn control_lora_tensors() -> Tensors {
    let bytes = std::fs::read(fixtures().join("control_lora/encoder.safetensors")).unwrap();
    let encoder = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Tensors =
        encoder.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect();
    let names: serde_json::Value =
        serde_json::from_slice(&std::fs::read(controlnet_dir().join("names.json")).unwrap()).unwrap();
    let full = tensors("full");
    for (cldm, diffusers) in names["full"]["cldm_to_diffusers"].as_object().unwrap() {
        if cldm.starts_with("input_hint_block.")
            || cldm.starts_with("zero_convs.")
            || cldm.starts_with("middle_block_out.")
        {
            out.insert(cldm.clone(), full[diffusers.as_str().unwrap()].clone());
        }
    }
    out
}

/// The Control-LoRA file at `path`, `edit`ed first.
pub fn write_control_lora(path: &Path, edit: impl FnOnce(&mut Tensors)) {
    let mut t = control_lora_tensors();
    edit(&mut t);
    write(path, &t);
}
