//! The CUDA random kernels (kernels/sampling/philox.cu) against their CPU twin (src/sampling/rng.rs
//! through ops::random): ragged lengths, offsets that are not multiples of 4, offsets that wrap
//! past 2^64, every output dtype. Outputs are poisoned (NaN bytes) before each kernel runs, so an
//! element left unwritten fails.
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; tools/gpu_run.sh runs them on
//! the GPU machine with `--include-ignored`. Run without a GPU they fail, never pass silently.
//!
//! Tolerances: uniforms are bit-identical (u is exact in f32 and both sides compute one fma and
//! one output rounding). Normals differ where CUDA's logf and sincospif (within an ulp or two)
//! differ from the twin's correctly rounded f64 values: |Δ| <= 1e-6 · max(1, |z|) in f32, plus one
//! unit of the output's rounding for f16 (2^-10 |v|) and bf16 (2^-7 |v|), where a value close to a
//! rounding midpoint may round the other way.

use celframe::gpu::timing::time_gpu;
use celframe::gpu::{Arena, Gpu};
use celframe::ops::Exec;
use celframe::ops::random::{random_normal, random_uniform};
use celframe::sampling::{NoiseStream, Purpose, stream_id};
use celframe::{DType, Tensor};

struct Rig {
    gpu: Gpu,
    scratch: Arena,
}

impl Rig {
    fn new() -> Rig {
        assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
        let gpu = Gpu::from_env().unwrap();
        gpu.set_poison_outputs(true);
        Rig { scratch: Arena::new("test scratch", 4 << 30).unwrap(), gpu }
    }
    fn exec(&self) -> Exec<'_> {
        Exec::Cuda { gpu: &self.gpu, scratch: &self.scratch }
    }
    fn values(&self, t: Tensor) -> Vec<f32> {
        let host = self.gpu.download(&t).unwrap();
        self.scratch.reset();
        host.to_f32_vec().unwrap()
    }
}

fn output_rounding(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => 1.0 / 1024.0,
        DType::BF16 => 1.0 / 128.0,
    }
}

/// (element count, offset): ragged tails, every offset phase, offsets near and past 2^64.
const CASES: [(usize, u64); 9] = [
    (1, 0),
    (3, 1),
    (5, 2),
    (4, 3),
    (1001, 7),
    (4096, 1 << 40),
    (37, u64::MAX - 5),
    (16 * 128 * 128 * 4, 0), // a 16-frame 1024x1024 SDXL latent
    (16 * 128 * 128 * 4 + 3, 123_456_789),
];

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn normals_match_the_twin() {
    let rig = Rig::new();
    let stream = NoiseStream::new(0x5eed_1234_abcd, stream_id(&[0, Purpose::InitialLatents as u64]));
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (n, offset) in CASES {
            let (mean, std) = (0.5, 2.0);
            let gpu = rig.values(random_normal(&rig.exec(), stream, offset, &[n], dtype, mean, std).unwrap());
            let cpu = random_normal(&Exec::Cpu, stream, offset, &[n], dtype, mean, std).unwrap().to_f32_vec().unwrap();
            let mut worst = (0f32, 0f32);
            for (j, (&g, &c)) in gpu.iter().zip(&cpu).enumerate() {
                assert!(g.is_finite(), "{dtype:?} n {n} offset {offset}: element {j} unwritten or not finite: {g}");
                let z = (c - mean) / std;
                let tol = std * 1e-6 * z.abs().max(1.0) + output_rounding(dtype) * c.abs();
                let d = (g - c).abs();
                assert!(d <= tol, "{dtype:?} n {n} offset {offset} element {j}: GPU {g} vs CPU {c}");
                worst = (worst.0.max(d), worst.1.max(d / (std * z.abs().max(1.0))));
            }
            println!(
                "GPUCHECK random_normal n={n} offset={offset} {dtype:?} max_abs={:.2e} max_rel_to_max1z={:.2e}",
                worst.0, worst.1
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn uniforms_are_bit_identical_to_the_twin() {
    let rig = Rig::new();
    let stream = NoiseStream::new(42, stream_id(&[0, Purpose::Weights as u64, 7]));
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (n, offset) in CASES {
            let gpu = rig.values(random_uniform(&rig.exec(), stream, offset, &[n], dtype, -0.25, 0.75).unwrap());
            let cpu =
                random_uniform(&Exec::Cpu, stream, offset, &[n], dtype, -0.25, 0.75).unwrap().to_f32_vec().unwrap();
            let first_difference = gpu.iter().zip(&cpu).position(|(g, c)| g.to_bits() != c.to_bits());
            assert_eq!(first_difference, None, "{dtype:?} n {n} offset {offset}");
            println!("GPUCHECK random_uniform n={n} offset={offset} {dtype:?} bit-identical");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn pieces_equal_the_whole_on_the_device() {
    let rig = Rig::new();
    let stream = NoiseStream::new(9, stream_id(&[3, Purpose::StepNoise as u64, 2]));
    // A 24-frame latent drawn whole, then as windows of 16 frames with stride 4 and a ragged split.
    let frame = 96 * 96 * 4;
    let whole = rig.values(random_normal(&rig.exec(), stream, 0, &[24 * frame], DType::F32, 0.0, 1.0).unwrap());
    for first in [0usize, 4, 8] {
        let window = rig.values(
            random_normal(&rig.exec(), stream, (first * frame) as u64, &[16, 96, 96, 4], DType::F32, 0.0, 1.0).unwrap(),
        );
        assert!(window == whole[first * frame..(first + 16) * frame], "window at frame {first}");
    }
    let mut joined = Vec::new();
    for (start, end) in [(0usize, 5usize), (5, 1234), (1234, 24 * frame)] {
        let piece = random_normal(&rig.exec(), stream, start as u64, &[end - start], DType::F32, 0.0, 1.0).unwrap();
        joined.extend(rig.values(piece));
    }
    assert!(joined == whole, "ragged pieces");
    println!("GPUCHECK random_normal windows and pieces equal the whole");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn normal_fill_throughput() {
    let rig = Rig::new();
    rig.gpu.set_poison_outputs(false);
    let stream = NoiseStream::new(1, 2);
    let n = 64 << 20;
    for dtype in [DType::F32, DType::F16] {
        let t = time_gpu(&rig.gpu, 3, 20, || {
            random_normal(&rig.exec(), stream, 0, &[n], dtype, 0.0, 1.0)?;
            rig.scratch.reset();
            Ok(())
        })
        .unwrap();
        let ms = t.median_ms();
        let gbps = (n * dtype.size()) as f64 / ms / 1e6;
        println!(
            "GPUCHECK random_normal {n} values {dtype:?}: {ms:.3} ms, {:.3e} values/s, {gbps:.0} GB/s",
            n as f64 / ms * 1e3
        );
    }
}
