//! The UNet fixtures (tools/make_unet_fixtures.py) and a single-file checkpoint assembled from them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, serialize_to_file};

/// tests/fixtures of the source tree, or of the current directory when the binary runs elsewhere
/// (the GPU machine runs test binaries built here from its own copy of the repository root).
pub fn fixtures() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if built.is_dir() { built } else { PathBuf::from("tests/fixtures") }
}

/// A diffusers UNet folder: `unet_a` or `unet_b`.
pub fn folder(name: &str) -> PathBuf {
    fixtures().join(format!("unet_{name}"))
}

/// `unet_<name>.reference.safetensors`, or `unet_a.residuals.reference.safetensors` for "a.residuals".
pub fn reference(name: &str) -> PathBuf {
    fixtures().join(format!("unet_{name}.reference.safetensors"))
}

/// A fresh scratch folder under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("celframe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes config a as a single-file checkpoint at `path`: every tensor of unet_a under the SGM/LDM
/// name that tools/make_unet_fixtures.py checked with diffusers' converter
/// (unet_a.single_file_names.json), plus what else a full checkpoint holds (a VAE tensor, a text
/// encoder's int64 position ids), which the loader must skip.
pub fn write_single_file_a(path: &Path) {
    let names: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("unet_a.single_file_names.json")).unwrap()).unwrap();
    let names = names["ldm_to_diffusers"].as_object().unwrap();
    let bytes = std::fs::read(folder("a").join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: BTreeMap<String, TensorView> = BTreeMap::new();
    for (ldm, diffusers) in names {
        let t = st.tensor(diffusers.as_str().unwrap()).unwrap();
        views.insert(ldm.clone(), TensorView::new(t.dtype(), t.shape().to_vec(), t.data()).unwrap());
    }
    assert_eq!(views.len(), st.len(), "the name list covers every tensor");
    let ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
    let vae = vec![0u8; 16];
    views.insert(
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids".into(),
        TensorView::new(Dtype::I64, vec![1, 77], &ids).unwrap(),
    );
    views.insert("first_stage_model.decoder.conv_in.bias".into(), TensorView::new(Dtype::F16, vec![8], &vae).unwrap());
    serialize_to_file(views, None, path).unwrap();
}
