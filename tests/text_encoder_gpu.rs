//! SDXL's text encoders on the CUDA ops against the same transformers fixtures as
//! tests/text_encoder_cpu.rs (float32 references), in f16 and bf16; the CUDA result against the
//! CPU twins in the same dtype (printed, for the run's table); the SDXL conditioning on CUDA
//! against the CPU; and the two ops the encoders added (quick GELU, token embedding) against their
//! twins with poisoned outputs.
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; tools/gpu_run.sh runs them on
//! the GPU machine with `--include-ignored`. Run without a GPU they fail, never pass silently.
//!
//! Tolerances (relative L2 against the float32 reference) are `verify`'s defaults, f16 1e-2 and
//! bf16 3e-2: every op rounds its output to the working dtype and the errors compound through the
//! layers, as in the UNet. Measured on an H100 (2026-11-24): f16 7-8e-4 and bf16 7.9-8.5e-3 on
//! every output of both fixtures, level with the CPU twins in those dtypes; the conditioning in f16
//! 6.7e-4 (context) and 9.0e-4 (text_embeds) against the CPU in f32. Ops: quick GELU as gpu_ops.rs's element-wise ops (one output rounding: f16 2e-3, bf16
//! 1e-2); the token embedding adds two rounded values in fp32 and rounds once on both sides, so it
//! must match its twin exactly.

mod common;

use std::path::{Path, PathBuf};

use celframe::gpu::{Arena, Gpu};
use celframe::models::Place;
use celframe::models::clip::conditioning::SdxlTextEncoders;
use celframe::models::clip::{ClipTextModel, TextEncoderKind, open_text_encoder};
use celframe::ops::Exec;
use celframe::ops::elementwise::quick_gelu;
use celframe::ops::gather::token_embedding;
use celframe::text::{CONTEXT_TOKENS, Chunk};
use celframe::verify::text_encoder::verify_text_encoder;
use celframe::verify::{Settings, compare, default_tolerance};
use celframe::{DType, Tensor};
use common::{assert_close, random_tensor};

const SCRATCH_GB: f64 = 0.5;

fn fixtures() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if built.is_dir() { built } else { PathBuf::from("tests/fixtures") }
}
fn folder(kind: TextEncoderKind) -> PathBuf {
    fixtures().join(format!("{}_tiny", kind.folder()))
}
fn reference(kind: TextEncoderKind) -> PathBuf {
    fixtures().join(format!("{}_tiny.reference.safetensors", kind.folder()))
}

fn check(kind: TextEncoderKind, dtype: DType) {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let tol = default_tolerance(dtype);
    let (w, r) = (folder(kind), reference(kind));
    let gpu = verify_text_encoder(kind, &w, &r, &Settings::cuda(dtype, tol, SCRATCH_GB)).unwrap();
    let twin = verify_text_encoder(kind, &w, &r, &Settings::cpu(dtype, tol)).unwrap();
    for ((c, t), ((name, g), (_, cpu))) in
        gpu.comparisons.iter().zip(&twin.comparisons).zip(gpu.outputs.iter().zip(&twin.outputs))
    {
        let vs_twin = compare(name, g, cpu, tol).unwrap();
        println!(
            "GPUCHECK {} {name} {dtype:?} rel_l2={:.2e} max_abs={:.2e} tol={tol:.0e} (cpu twins {dtype:?}: {:.2e}; cuda vs twins {:.2e})",
            kind.folder(),
            c.rel_l2,
            c.max_abs,
            t.rel_l2,
            vs_twin.rel_l2
        );
        assert!(c.ok(), "{} {dtype:?}: {c:?}", kind.folder());
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn clip_l_matches_transformers_in_f16_and_bf16() {
    check(TextEncoderKind::ClipL, DType::F16);
    check(TextEncoderKind::ClipL, DType::BF16);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn clip_g_matches_transformers_in_f16_and_bf16() {
    check(TextEncoderKind::ClipG, DType::F16);
    check(TextEncoderKind::ClipG, DType::BF16);
}

/// The whole conditioning (two chunks, emphasis) on CUDA in f16 against the CPU in f32.
#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn sdxl_conditioning_on_cuda_matches_the_cpu() {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let gpu = Gpu::from_env().unwrap();
    let weights = Arena::new("weights", 64 << 20).unwrap();
    let scratch = Arena::new("scratch", 256 << 20).unwrap();
    let build = |place| {
        let model = |kind| ClipTextModel::new(&open_text_encoder(&folder(kind), kind).unwrap(), place).unwrap();
        SdxlTextEncoders::new(model(TextEncoderKind::ClipL), model(TextEncoderKind::ClipG)).unwrap()
    };
    let on_gpu = build(Place::device(&gpu, &weights, DType::F16));
    let on_cpu = build(Place::Host(DType::F32));
    let chunk = |tokens: &[(u32, f32)], bos: u32, eos: u32, pad: u32| {
        let mut c = Chunk { ids: [pad; CONTEXT_TOKENS], weights: [1.0; CONTEXT_TOKENS] };
        c.ids[0] = bos;
        for (i, &(id, w)) in tokens.iter().enumerate() {
            (c.ids[1 + i], c.weights[1 + i]) = (id, w);
        }
        c.ids[1 + tokens.len()] = eos;
        c
    };
    let prompt: Vec<Vec<(u32, f32)>> = vec![
        (1..=75).map(|i| (i * 7 % 500 + 1, if i % 4 == 0 { 1.21 } else { 1.0 })).collect(),
        vec![(5, 1.0), (9, 0.9), (300, 1.1)],
    ];
    let l: Vec<Chunk> = prompt.iter().map(|t| chunk(t, 510, 511, 511)).collect();
    let g: Vec<Chunk> = prompt.iter().map(|t| chunk(t, 508, 509, 0)).collect();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let a = on_gpu.encode_chunks(&ex, &l, &g, true).unwrap();
    let b = on_cpu.encode_chunks(&Exec::Cpu, &l, &g, true).unwrap();
    let (ctx, _) = assert_close("conditioning context", &a.context, &b.context, 1e-2);
    let (pooled, _) = assert_close("conditioning text_embeds", &a.text_embeds, &b.text_embeds, 1e-2);
    println!(
        "GPUCHECK sdxl conditioning f16 vs cpu f32: context rel_l2={ctx:.2e} text_embeds rel_l2={pooled:.2e} tol=1e-2"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn quick_gelu_and_token_embedding_match_twins() {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let gpu = Gpu::from_env().unwrap();
    gpu.set_poison_outputs(true);
    let inputs = Arena::new("inputs", 1 << 30).unwrap();
    let scratch = Arena::new("scratch", 1 << 30).unwrap();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1e-2), (DType::F32, 1e-5)] {
        // CLIP-L's MLP at batch 2 x 3 chunks, and an odd size for the scalar path.
        for shape in [[6 * 77, 3072], [3, 1001]] {
            let x = random_tensor(&shape, dtype, 11, 2.0, 0.0);
            let got = gpu.download(&quick_gelu(&ex, &gpu.upload(&inputs, &x, dtype).unwrap()).unwrap()).unwrap();
            let (rel, _) = assert_close("quick_gelu", &got, &quick_gelu(&Exec::Cpu, &x).unwrap(), tol);
            println!("GPUCHECK quick_gelu {shape:?} {dtype:?} rel_l2={rel:.2e} tol={tol:.0e}");
        }
        // bigG's tables at real size, 4 chunks of ids (vectorised path), and a width of 60 (scalar).
        for (vocab, dim) in [(49408, 1280), (100, 60)] {
            let table = random_tensor(&[vocab, dim], dtype, 12, 0.5, 0.0);
            let pos = random_tensor(&[77, dim], dtype, 13, 0.2, 0.0);
            let ids: Vec<u32> = (0..4 * 77u32).map(|i| (i * 7919 + 3) % vocab as u32).collect();
            let (td, pd) = (gpu.upload(&inputs, &table, dtype).unwrap(), gpu.upload(&inputs, &pos, dtype).unwrap());
            let got = gpu.download(&token_embedding(&ex, &ids, 77, &td, Some(&pd)).unwrap()).unwrap();
            let want = token_embedding(&Exec::Cpu, &ids, 77, &table, Some(&pos)).unwrap();
            assert_eq!(got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap(), "token_embedding {dtype:?} dim {dim}");
            let rows = gpu.download(&token_embedding(&ex, &[5, 0, 99], 1, &td, None).unwrap()).unwrap();
            let want: Tensor = token_embedding(&Exec::Cpu, &[5, 0, 99], 1, &table, None).unwrap();
            assert_eq!(rows.to_f32_vec().unwrap(), want.to_f32_vec().unwrap(), "row gather {dtype:?}");
            println!("GPUCHECK token_embedding vocab {vocab} dim {dim} {dtype:?} exact");
        }
        scratch.reset();
        inputs.reset();
    }
}
