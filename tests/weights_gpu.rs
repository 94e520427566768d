//! Uploading loaded weights to the device, with dtype conversion.
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; run them on the GPU machine
//! with `--include-ignored`. Run without a GPU they fail, never pass silently.

use std::path::PathBuf;

use celframe::gpu::{Arena, Gpu};
use celframe::weights;
use celframe::{DType, Error, Tensor};

fn gpu() -> Gpu {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    Gpu::from_env().unwrap()
}

/// A checkpoint with one tensor per dtype, removed on drop.
struct Checkpoint(PathBuf);

impl Checkpoint {
    fn new(test: &str, values: &[f32]) -> Checkpoint {
        let path = std::env::temp_dir().join(format!("celframe-weights-gpu-{test}-{}.safetensors", std::process::id()));
        let tensors: Vec<(String, Tensor)> = [DType::F16, DType::BF16, DType::F32]
            .into_iter()
            .map(|d| {
                let t = Tensor::from_f32(&[values.len()], d, values).unwrap();
                (d.kernel_suffix().to_string(), t)
            })
            .collect();
        let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        weights::save(&path, &refs, None).unwrap();
        Checkpoint(path)
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn upload_converts_every_tensor_to_the_compute_dtype() {
    let gpu = gpu();
    let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.0123).collect();
    let file = Checkpoint::new("convert", &values);
    let loaded = weights::load(&[&file.0]).unwrap();
    for target in [DType::F16, DType::BF16, DType::F32] {
        let arena = Arena::new("weights", 1 << 20).unwrap();
        let on_device = loaded.upload(&gpu, &arena, target).unwrap();
        assert_eq!(on_device.len(), 3);
        let report = on_device.report();
        assert_eq!(report.tensors, 3);
        assert_eq!(report.bytes, 3 * 1000 * target.size() as u64);
        for source in [DType::F16, DType::BF16, DType::F32] {
            let t = on_device.get(source.kernel_suffix()).unwrap();
            assert!(t.is_device());
            assert_eq!((t.dtype(), t.shape()), (target, &[1000][..]));
            let got = gpu.download(t).unwrap().to_f32_vec().unwrap();
            // Stored in `source`, then converted to `target` on upload.
            let want: Vec<f32> = values.iter().map(|v| target.round(source.round(*v))).collect();
            assert_eq!(got, want, "{source:?} uploaded as {target:?}");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn upload_errors_name_the_tensor() {
    let gpu = gpu();
    let file = Checkpoint::new("full", &[1.0; 128]);
    let loaded = weights::load(&[&file.0]).unwrap();
    // Room for the first tensor (name order: bf16, f16, f32) but not the second.
    let arena = Arena::new("tiny", 256).unwrap();
    let Err(Error::Cuda(m)) = loaded.upload(&gpu, &arena, DType::F16) else {
        panic!("three 256-byte tensors fit a 256-byte arena");
    };
    assert!(m.contains("'f16'") && m.contains("tiny"), "{m}");

    let arena = Arena::new("weights", 1 << 20).unwrap();
    let on_device = loaded.upload(&gpu, &arena, DType::F16).unwrap();
    let Err(Error::Input(m)) = on_device.get("absent") else {
        panic!("got a tensor that was never uploaded");
    };
    assert!(m.contains("absent"), "{m}");
}
