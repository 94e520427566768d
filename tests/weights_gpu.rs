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

/// Fusions in one stack on the device: the stacked matrix holds each module's fused matrix as a
/// row range of its memory (the same addresses), so a weight rewritten through its name (a LoRA
/// merge) is what the stack's GEMM reads.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn a_stack_on_the_device_is_its_fusions_memory() {
    use celframe::models::weights::Fusion;
    use celframe::models::{ModelWeights, Place};
    const KV: [&str; 2] = ["to_k", "to_v"];
    let gpu = gpu();
    let path = std::env::temp_dir().join(format!("celframe-weights-gpu-stack-{}.safetensors", std::process::id()));
    let mut named = Vec::new();
    for (module, rows) in [("a", 2), ("b", 3)] {
        for part in KV {
            let values: Vec<f32> = (0..rows * 8).map(|i| (named.len() * 100 + i) as f32).collect();
            named.push((format!("{module}.{part}.weight"), Tensor::from_f32(&[rows, 8], DType::F16, &values).unwrap()));
        }
    }
    weights::save(&path, &named.iter().map(|(n, t)| (n.clone(), t)).collect::<Vec<_>>(), None).unwrap();
    let file = Checkpoint(path);
    let loaded = weights::load(&[&file.0]).unwrap();
    let names: Vec<(String, String)> = named.iter().map(|(n, _)| (n.clone(), n.clone())).collect();
    let fusions: Vec<Fusion> =
        ["a", "b"].map(|m| Fusion { module: m.into(), parts: &KV, stack: Some("s") }).into_iter().collect();
    let arena = Arena::new("weights", 1 << 20).unwrap();
    let place = Place::device(&gpu, &arena, DType::F16);
    let w = ModelWeights::prepare_fused(&loaded, &names, &fusions, place).unwrap();
    let stack = w.stack("s").unwrap();
    let values: Vec<f32> = named.iter().flat_map(|(_, t)| t.to_f32_vec().unwrap()).collect();
    assert_eq!(gpu.download(&stack.matrix).unwrap().to_f32_vec().unwrap(), values);
    let base = stack.matrix.device_ptr().unwrap();
    let b = w.root().at("b").rows(&KV).unwrap();
    assert_eq!(b.device_ptr().unwrap(), base + 4 * 8 * 2, "module b's matrix is rows 4.. of the stack");
    // b.to_v rewritten in place: the stack reads the new values
    let new = Tensor::from_f32(&[3, 8], DType::F16, &[7.0; 24]).unwrap();
    let celframe::tensor::Storage::Device(mem) = w.tensor("b.to_v.weight").unwrap().storage() else {
        panic!("on the host")
    };
    gpu.upload_into(mem, &new, DType::F16).unwrap();
    let after = gpu.download(&stack.matrix).unwrap().to_f32_vec().unwrap();
    assert_eq!((&after[..7 * 8], &after[7 * 8..]), (&values[..7 * 8], &[7.0; 24][..]));
}

/// A run that keeps only the FP8 twins: the 16-bit weights that get twins load into their own
/// arena (the renderer's scratch), and dropping them returns all of it while the forwards give
/// the same bytes through the twins; a later read of a dropped weight is an error naming it, and
/// weights without current twins are refused before anything is dropped.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dropped_fp8_sources_return_their_arena_and_refuse_reads() {
    use celframe::models::transformer::Fp8Linears;
    use celframe::models::weights::Fusion;
    use celframe::models::{ModelWeights, Place};
    use celframe::ops::Exec;
    use celframe::ops::linear::linear;
    const QKV: [&str; 3] = ["to_q", "to_k", "to_v"];
    let gpu = gpu();
    let block = "m.transformer_blocks.0";
    // (name, shape): q, k, v fused and ff.net.2 get twins under "on"; to_out (N < FP8_MIN_OUT) and
    // the bias stay 16-bit in the weights arena.
    let specs: Vec<(String, Vec<usize>)> = QKV
        .iter()
        .map(|p| (format!("{block}.attn1.{p}.weight"), vec![32, 64]))
        .chain([
            (format!("{block}.attn1.to_out.0.weight"), vec![64, 32]),
            (format!("{block}.ff.net.2.weight"), vec![64, 128]),
            (format!("{block}.ff.net.2.bias"), vec![64]),
        ])
        .collect();
    let named: Vec<(String, Tensor)> = specs
        .iter()
        .enumerate()
        .map(|(i, (n, shape))| {
            let count: usize = shape.iter().product();
            let values: Vec<f32> =
                (0..count).map(|j| (((i * 7919 + j * 104729) % 2003) as f32 / 1001.0 - 1.0) * 0.1).collect();
            (n.clone(), Tensor::from_f32(shape, DType::F16, &values).unwrap())
        })
        .collect();
    let path = std::env::temp_dir().join(format!("celframe-weights-gpu-fp8-drop-{}.safetensors", std::process::id()));
    weights::save(&path, &named.iter().map(|(n, t)| (n.clone(), t)).collect::<Vec<_>>(), None).unwrap();
    let file = Checkpoint(path);
    let loaded = weights::load(&[&file.0]).unwrap();
    let names: Vec<(String, String)> = named.iter().map(|(n, _)| (n.clone(), n.clone())).collect();
    let fusions = [Fusion { module: format!("{block}.attn1"), parts: &QKV, stack: None }];
    let (arena, sources, work) = (
        Arena::new("weights", 1 << 20).unwrap(),
        Arena::new("sources", 1 << 20).unwrap(),
        Arena::new("scratch", 64 << 20).unwrap(),
    );
    let place =
        Place::Device { gpu: &gpu, arena: &arena, dtype: DType::F16, fp8_sources: Some((&sources, Fp8Linears::Wide)) };
    let prepare = || ModelWeights::prepare_fused(&loaded, &names, &fusions, place).unwrap();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &work };

    // Without twins nothing is dropped.
    let mut untwinned = prepare();
    let held = sources.used();
    let err = untwinned.drop_fp8_sources().unwrap_err().to_string();
    assert!(err.contains("no current FP8 twin"), "{err}");
    assert_eq!(sources.used(), held);
    drop(untwinned);
    assert_eq!(sources.used(), 0);

    let mut w = prepare();
    assert_eq!(sources.used(), (3 * 32 * 64 + 64 * 128) * 2, "the fused q, k, v and ff.net.2 in the sources' arena");
    // to_out's 4096 bytes and the bias's 128 (a 256-byte range) in the weights arena
    let weights_bytes = 64 * 32 * 2 + 256;
    assert_eq!(arena.used(), weights_bytes);
    assert_eq!(w.enable_fp8(&ex, |n, s| Fp8Linears::Wide.takes(n, s)).unwrap(), 2);
    let x = {
        let values: Vec<f32> = (0..48 * 128).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.5).collect();
        gpu.upload(&work, &Tensor::from_f32(&[48, 128], DType::F16, &values).unwrap(), DType::F16).unwrap()
    };
    let forwards = |w: &ModelWeights| {
        let attn = w.root().at(&format!("{block}.attn1"));
        let ff = w.root().at(&format!("{block}.ff.net.2"));
        let y = linear(&ex, &x, ff.linear("weight").unwrap(), Some(ff.get("bias").unwrap())).unwrap();
        let qkv = linear(&ex, &y, attn.linear_rows(&QKV).unwrap(), None).unwrap();
        [y, qkv].map(|t| gpu.download(&t).unwrap().to_f32_vec().unwrap())
    };
    let before = forwards(&w);

    assert_eq!(w.drop_fp8_sources().unwrap(), 2);
    assert_eq!(sources.used(), 0, "every dropped weight's range is back");
    assert_eq!(arena.used(), weights_bytes);
    assert_eq!(forwards(&w), before, "the twins serve the forwards as before");
    // Reads of the dropped weights, whole or by part, name them; the others still read.
    for name in [format!("{block}.ff.net.2.weight"), format!("{block}.attn1.to_k.weight")] {
        let err = w.tensor(&name).unwrap().device_ptr().unwrap_err().to_string();
        assert!(err.contains(&name) && err.contains("dropped"), "{err}");
    }
    let err = w.root().at(&format!("{block}.attn1")).rows(&QKV).unwrap().device_ptr().unwrap_err().to_string();
    assert!(err.contains("to_q+to_k+to_v"), "{err}");
    assert!(w.tensor(&format!("{block}.attn1.to_out.0.weight")).unwrap().device_ptr().is_ok());
    let err = w.requantize_fp8(&ex).unwrap_err().to_string();
    assert!(err.contains("dropped"), "{err}");
}
