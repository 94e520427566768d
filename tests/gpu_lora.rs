//! The LoRA-delta merge on the GPU (ops::lora::merge_deltas, kernels/lora/merge.cu) against its
//! twin (merged_host). The merge writes weights in place, so there is no fresh output to poison:
//! instead a sentinel block follows every weight in memory and must come through untouched, and
//! the weights must keep their addresses.
//!
//! These need an NVIDIA GPU, so CI (no GPU) lists them as ignored; tools/gpu_run.sh runs them on the
//! GPU machine with `--include-ignored`. Run without a GPU they fail, never pass silently. One test,
//! `integer_cases_are_exact_in_their_dtype`, checks the exact test's premise on the host and runs
//! everywhere.
//!
//! Tolerances:
//! - Integer-valued weights and factors (factors in {-1, 0, 1}, weights in [-8, 8], scales ±2^k):
//!   every product and partial sum is a multiple of 2^-2 far below 2^24, exact in fp32 in any order
//!   (tensor-core accumulation included), and the result is exact in the weight's dtype (the premise
//!   test checks it), so the GPU must match the twin bit for bit.
//! - Random values: the kernel sums in fp32 and rounds the sum (W + Σ) once, the twin sums in f64
//!   and rounds once. They can differ only where the fp32 error (~2^-24 of the operands' size,
//!   ~1e-8 here) moves the sum across a rounding boundary of the dtype: by one ulp, at about 1e-4
//!   of the elements. Asserted: every element within 1 ulp of the twin's (f16: 2^-10 relative,
//!   bf16: 2^-7) or, where the sum cancels to near zero and a bf16 ulp shrinks below fp32's
//!   rounding of the operands, within 2^-16 of the layer's rms; at most 1% of the elements
//!   different; relative L2 error within f16 2e-3 / bf16 1e-2.

mod common;

use celframe::gpu::{Arena, Gpu};
use celframe::ops::Exec;
use celframe::ops::lora::{DeltaFactors, DeltaTerm, LayerDelta, merge_deltas, merged_host};
use celframe::{DType, Error, Tensor};
use common::{assert_close, randn};

/// A layer's weight and terms as owned tensors (host or device), made once and borrowed by
/// `LayerDelta` for either side.
#[derive(Clone)]
struct Layer {
    weight: Tensor,
    terms: Vec<(Factors, f32)>,
}

#[derive(Clone)]
enum Factors {
    LowRank(Tensor, Tensor),
    Hadamard(Tensor, Tensor, Tensor, Tensor),
    Kronecker(Tensor, Tensor, usize),
    Full(Tensor),
}

impl Layer {
    fn delta(&self) -> LayerDelta<'_> {
        let terms = self
            .terms
            .iter()
            .map(|(f, scale)| DeltaTerm {
                factors: match f {
                    Factors::LowRank(up, down) => DeltaFactors::LowRank { up, down },
                    Factors::Hadamard(a1, b1, a2, b2) => DeltaFactors::Hadamard { a1, b1, a2, b2 },
                    Factors::Kronecker(w1, w2, kernel) => DeltaFactors::Kronecker { w1, w2, kernel: *kernel },
                    Factors::Full(delta) => DeltaFactors::Full { delta },
                },
                scale: *scale,
            })
            .collect();
        LayerDelta { weight: &self.weight, terms, base: None, dora: None }
    }

    /// The same layer with every tensor passed through `f` (an upload, a conversion), the weight
    /// first.
    fn map(&self, f: &mut impl FnMut(&Tensor) -> Tensor) -> Layer {
        let weight = f(&self.weight);
        let terms = self
            .terms
            .iter()
            .map(|(factors, scale)| {
                let factors = match factors {
                    Factors::LowRank(a, b) => Factors::LowRank(f(a), f(b)),
                    Factors::Hadamard(a1, b1, a2, b2) => Factors::Hadamard(f(a1), f(b1), f(a2), f(b2)),
                    Factors::Kronecker(w1, w2, kernel) => Factors::Kronecker(f(w1), f(w2), *kernel),
                    Factors::Full(d) => Factors::Full(f(d)),
                };
                (factors, *scale)
            })
            .collect();
        Layer { weight, terms }
    }
}

/// Draws tensors: integers uniform in [-span, span], or normal values; every call a fresh seed.
struct Draw {
    dtype: DType,
    seed: u64,
    integers: Option<i64>,
    scale: f32,
}

impl Draw {
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        self.seed += 1;
        let n = shape.iter().product();
        let values: Vec<f32> = match self.integers {
            Some(span) => randn(n, self.seed, 1.0, 0.0)
                .iter()
                .map(|v| ((v.to_bits() >> 7) as i64 % (2 * span + 1) - span) as f32)
                .collect(),
            None => randn(n, self.seed, self.scale, 0.0),
        };
        Tensor::from_f32(shape, self.dtype, &values).unwrap()
    }
    fn low_rank(&mut self, rows: usize, cols: usize, rank: usize, scale: f32) -> (Factors, f32) {
        (Factors::LowRank(self.tensor(&[rows, rank]), self.tensor(&[rank, cols])), scale)
    }
    fn hadamard(&mut self, rows: usize, cols: usize, (r1, r2): (usize, usize), scale: f32) -> (Factors, f32) {
        let (a1, b1) = (self.tensor(&[rows, r1]), self.tensor(&[r1, cols]));
        (Factors::Hadamard(a1, b1, self.tensor(&[rows, r2]), self.tensor(&[r2, cols])), scale)
    }
    /// w1 [a, b], w2 [c, d, kernel].
    fn kronecker(
        &mut self,
        (a, b): (usize, usize),
        (c, d): (usize, usize),
        kernel: usize,
        scale: f32,
    ) -> (Factors, f32) {
        (Factors::Kronecker(self.tensor(&[a, b]), self.tensor(&[c, d, kernel]), kernel), scale)
    }
    fn full(&mut self, rows: usize, cols: usize, scale: f32) -> (Factors, f32) {
        (Factors::Full(self.tensor(&[rows, cols])), scale)
    }
}

/// Integer-valued layers at awkward shapes: ranks that are not multiples of 16 (nor of 8: the
/// element-wise loaders), rows and columns that are not multiples of the 128-wide tile, columns
/// that are not a multiple of 8 (the element-wise epilogue), KRSC convolutions with LoKr, every
/// format mixed in one layer, LoHa layers beside plain ones (two launches of one call), and 150
/// small layers so the tile-to-layer search takes two rounds. Scales that are not integers stay
/// on layers whose sums stay within bf16's exact range for that granularity.
fn integer_layers(dtype: DType) -> Vec<Layer> {
    let mut factors = Draw { dtype, seed: 100, integers: Some(1), scale: 0.0 };
    let mut weights = Draw { dtype, seed: 900, integers: Some(8), scale: 0.0 };
    let mut layers = Vec::new();
    let mut layer = |weights: &mut Draw, shape: &[usize], terms: Vec<(Factors, f32)>| {
        layers.push(Layer { weight: weights.tensor(shape), terms });
    };
    let f = &mut factors;
    layer(&mut weights, &[40, 24], vec![f.low_rank(40, 24, 4, 0.5), f.low_rank(40, 24, 24, -1.0), f.full(40, 24, 2.0)]);
    layer(
        &mut weights,
        &[200, 136],
        vec![f.low_rank(200, 136, 19, 0.25), f.hadamard(200, 136, (3, 5), 0.5), f.kronecker((8, 17), (25, 8), 1, 1.0)],
    );
    // conv 3x3, 40 -> 64 channels, KRSC [64, 3, 3, 40]: cols = 9 · 40
    layer(
        &mut weights,
        &[64, 3, 3, 40],
        vec![f.low_rank(64, 360, 8, 1.0), f.kronecker((4, 5), (16, 8), 9, -0.5), f.low_rank(64, 360, 33, 0.5)],
    );
    layer(
        &mut weights,
        &[300, 77],
        vec![f.low_rank(300, 77, 33, 0.5), f.full(300, 77, -1.0), f.hadamard(300, 77, (2, 2), 1.0)],
    );
    layer(
        &mut weights,
        &[256, 640],
        vec![f.low_rank(256, 640, 64, 1.0), f.low_rank(256, 640, 64, -0.5), f.low_rank(256, 640, 128, 0.5)],
    );
    // conv 3x3, 160 -> 136 channels: the ranks of a stack of real LoRAs
    layer(
        &mut weights,
        &[136, 3, 3, 160],
        vec![
            f.low_rank(136, 1440, 32, 1.0),
            f.low_rank(136, 1440, 64, 0.5),
            f.low_rank(136, 1440, 128, -1.0),
            f.low_rank(136, 1440, 64, 0.5),
        ],
    );
    for i in 0..150usize {
        let (rows, cols, rank) = (8 + i * 37 % 193, 8 * (1 + i * 13 % 29), 1 + i * 7 % 40);
        layer(&mut weights, &[rows, cols], vec![f.low_rank(rows, cols, rank, 1.0)]);
    }
    layers
}

/// Random layers at SDXL shapes, four LowRank terms each (ranks 32, 64, 128, 64 with kohya-style
/// scales α/r · strength): attention q/k/v/out at 640 and 1280, the GEGLU projection and ff.net.2
/// at 1280, 3x3 ResNet convolutions at 320 and 1280 (KRSC, cols = 9 · in).
fn sdxl_layers(dtype: DType) -> Vec<Layer> {
    let mut weights = Draw { dtype, seed: 5000, integers: None, scale: 0.05 };
    let mut factors = Draw { dtype, seed: 7000, integers: None, scale: 0.05 };
    let shapes: [&[usize]; 6] =
        [&[640, 640], &[1280, 1280], &[10240, 1280], &[1280, 5120], &[320, 3, 3, 320], &[1280, 3, 3, 1280]];
    shapes
        .iter()
        .map(|&shape| {
            let (rows, cols) = (shape[0], shape[1..].iter().product());
            let terms = [(32, 0.5), (64, 0.125), (128, 0.4), (64, 1.0)]
                .iter()
                .map(|&(rank, scale)| factors.low_rank(rows, cols, rank, scale))
                .collect();
            Layer { weight: weights.tensor(shape), terms }
        })
        .collect()
}

const SENTINEL_BYTES: usize = 4096;

struct Rig {
    gpu: Gpu,
    weights: Arena,
    scratch: Arena,
}

impl Rig {
    fn new() -> Rig {
        assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
        let gpu = Gpu::from_env().unwrap();
        gpu.set_poison_outputs(true);
        Rig {
            weights: Arena::new("test inputs", 8 << 30).unwrap(),
            scratch: Arena::new("test scratch", 1 << 30).unwrap(),
            gpu,
        }
    }
    fn exec(&self) -> Exec<'_> {
        Exec::Cuda { gpu: &self.gpu, scratch: &self.scratch }
    }
    fn upload(&self, t: &Tensor) -> Tensor {
        self.gpu.upload(&self.weights, t, t.dtype()).unwrap()
    }
    /// Device copies of the layers, each weight followed in memory by a sentinel block (returned).
    /// The inputs arena starts empty, so its allocations are consecutive: earlier inputs must be gone.
    fn upload_layers(&self, layers: &[Layer]) -> (Vec<Layer>, Vec<Tensor>) {
        self.weights.reset();
        let mut sentinels = Vec::new();
        let device = layers
            .iter()
            .map(|l| {
                let mut first = true;
                l.map(&mut |t| {
                    let d = self.upload(t);
                    if std::mem::take(&mut first) {
                        sentinels.push(self.upload(&sentinel()));
                    }
                    d
                })
            })
            .collect();
        (device, sentinels)
    }
    fn check_sentinels(&self, what: &str, sentinels: &[Tensor]) {
        for (i, s) in sentinels.iter().enumerate() {
            let got = self.gpu.download(s).unwrap();
            assert_eq!(
                got.host_bytes().unwrap(),
                sentinel().host_bytes().unwrap(),
                "{what}: memory after weight {i} was written"
            );
        }
    }
}

fn sentinel() -> Tensor {
    let v: Vec<f32> = (0..SENTINEL_BYTES / 2).map(|i| (i % 251) as f32 - 125.0).collect();
    Tensor::from_f32(&[SENTINEL_BYTES / 2], DType::F16, &v).unwrap()
}

fn deltas(layers: &[Layer]) -> Vec<LayerDelta<'_>> {
    layers.iter().map(Layer::delta).collect()
}

#[test]
fn integer_cases_are_exact_in_their_dtype() {
    // The premise of the bit-exact test: the twin's result in the dtype equals the exact sum (the
    // twin run on f32 copies, where these integers and quarters are exact).
    for dtype in [DType::F16, DType::BF16] {
        let layers = integer_layers(dtype);
        let wide: Vec<Layer> = layers
            .iter()
            .map(|l| l.map(&mut |t| Tensor::from_f32(t.shape(), DType::F32, &t.to_f32_vec().unwrap()).unwrap()))
            .collect();
        let rounded = merged_host(&deltas(&layers)).unwrap();
        let exact = merged_host(&deltas(&wide)).unwrap();
        for (i, (r, e)) in rounded.iter().zip(&exact).enumerate() {
            assert_eq!(
                r.to_f32_vec().unwrap(),
                e.to_f32_vec().unwrap(),
                "layer {i} {dtype:?}: the result is not exact in the dtype"
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn integer_valued_merges_match_the_twin_bit_for_bit() {
    let rig = Rig::new();
    for dtype in [DType::F16, DType::BF16] {
        let host = integer_layers(dtype);
        let (device, sentinels) = rig.upload_layers(&host);
        let addresses: Vec<u64> = device.iter().map(|l| l.weight.device_ptr().unwrap()).collect();
        merge_deltas(&rig.exec(), &deltas(&device)).unwrap();
        let expected = merged_host(&deltas(&host)).unwrap();
        for (i, (d, e)) in device.iter().zip(&expected).enumerate() {
            assert_eq!(d.weight.device_ptr().unwrap(), addresses[i], "layer {i}: the weight moved");
            let got = rig.gpu.download(&d.weight).unwrap();
            if got.host_bytes().unwrap() != e.host_bytes().unwrap() {
                let (g, x) = (got.to_f32_vec().unwrap(), e.to_f32_vec().unwrap());
                let k = g.iter().zip(&x).position(|(a, b)| a.to_bits() != b.to_bits()).unwrap();
                let cols = g.len() / d.weight.shape()[0];
                panic!(
                    "{dtype:?} layer {i} {:?}: element [{}, {}] is {} on the GPU, {} in the twin ({} elements differ)",
                    d.weight.shape(),
                    k / cols,
                    k % cols,
                    g[k],
                    x[k],
                    g.iter().zip(&x).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
                );
            }
        }
        rig.check_sentinels("integer merge", &sentinels);
        println!("GPUCHECK lora_merge integer-valued {} layers {dtype:?}: bit-exact, addresses kept", host.len());
        rig.scratch.reset();
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn a_merge_from_base_copies_ignores_what_the_weights_held() {
    // A LoRA switch merges the next set reading base values from copies: the weights' own values
    // (here a poison pattern, standing for the previous set's merge) must not leak in.
    let rig = Rig::new();
    for dtype in [DType::F16, DType::BF16] {
        let host = integer_layers(dtype);
        let (device, sentinels) = rig.upload_layers(&host);
        let copies: Vec<Tensor> = host.iter().map(|l| rig.upload(&l.weight)).collect();
        for d in &device {
            let poison = vec![-7.25f32; d.weight.numel()];
            let p = Tensor::from_f32(d.weight.shape(), dtype, &poison).unwrap();
            let celframe::tensor::Storage::Device(mem) = d.weight.storage() else { panic!("device weight") };
            rig.gpu.upload_into(mem, &p, dtype).unwrap();
        }
        let layers: Vec<LayerDelta> =
            device.iter().zip(&copies).map(|(d, c)| LayerDelta { base: Some(c), ..d.delta() }).collect();
        merge_deltas(&rig.exec(), &layers).unwrap();
        let expected = merged_host(&deltas(&host)).unwrap();
        for (i, ((d, e), c)) in device.iter().zip(&expected).zip(&copies).enumerate() {
            let got = rig.gpu.download(&d.weight).unwrap();
            assert_eq!(got.host_bytes().unwrap(), e.host_bytes().unwrap(), "{dtype:?} layer {i}: merged from the copy");
            let copy = rig.gpu.download(c).unwrap();
            assert_eq!(copy.host_bytes().unwrap(), host[i].weight.host_bytes().unwrap(), "layer {i}: the copy changed");
        }
        rig.check_sentinels("merge from copies", &sentinels);
        println!("GPUCHECK lora_merge from base copies {} layers {dtype:?}: bit-exact", host.len());
        rig.scratch.reset();
    }
}

/// One ulp of `dtype` at |x| (the spacing of the binade x lies in; subnormals' at the bottom).
fn ulp(dtype: DType, x: f32) -> f32 {
    let (mantissa_bits, min_exp) = match dtype {
        DType::F16 => (10, -14),
        DType::BF16 => (7, -126),
        DType::F32 => (23, -126),
    };
    let e = if x == 0.0 { min_exp } else { (x.abs().log2().floor() as i32).max(min_exp) };
    2f32.powi(e - mantissa_bits)
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn random_merges_at_sdxl_shapes_are_within_one_ulp() {
    let rig = Rig::new();
    for dtype in [DType::F16, DType::BF16] {
        let host = sdxl_layers(dtype);
        let (device, sentinels) = rig.upload_layers(&host);
        merge_deltas(&rig.exec(), &deltas(&device)).unwrap();
        let expected = merged_host(&deltas(&host)).unwrap();
        for (d, e) in device.iter().zip(&expected) {
            let shape = d.weight.shape();
            let got = rig.gpu.download(&d.weight).unwrap();
            let tol = if dtype == DType::F16 { 2e-3 } else { 1e-2 };
            let (rel, _) = assert_close(&format!("lora_merge {shape:?} {dtype:?}"), &got, e, tol);
            let (g, x) = (got.to_f32_vec().unwrap(), e.to_f32_vec().unwrap());
            let rms = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64).sqrt() as f32;
            let mut differ = 0usize;
            for (k, (a, b)) in g.iter().zip(&x).enumerate() {
                if a != b {
                    differ += 1;
                    let allowed = ulp(dtype, *b).max(rms / 65536.0);
                    assert!((a - b).abs() <= allowed, "{shape:?} {dtype:?} element {k}: GPU {a}, twin {b}");
                }
            }
            let fraction = differ as f64 / g.len() as f64;
            println!(
                "GPUCHECK lora_merge random {shape:?} ranks 32+64+128+64 {dtype:?} rel_l2={rel:.2e} differ_1ulp={differ}/{} tol=1ulp,1%",
                g.len()
            );
            assert!(fraction <= 0.01, "{shape:?} {dtype:?}: {differ} of {} elements differ by an ulp", g.len());
        }
        rig.check_sentinels("random merge", &sentinels);
        rig.scratch.reset();
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn bad_layers_are_refused_by_index_before_anything_is_written() {
    let rig = Rig::new();
    let dtype = DType::F16;
    let mut draw = Draw { dtype, seed: 1, integers: None, scale: 1.0 };
    let good = Layer { weight: draw.tensor(&[64, 32]), terms: vec![draw.low_rank(64, 32, 8, 1.0)] };
    let bad = Layer { weight: draw.tensor(&[64, 32]), terms: vec![draw.low_rank(64, 48, 8, 1.0)] };
    let (device, _) = rig.upload_layers(&[good.clone(), bad]);
    let Err(Error::Input(m)) = merge_deltas(&rig.exec(), &deltas(&device)) else { panic!("a bad layer was accepted") };
    assert!(m.contains("layer 1") && m.contains("down [8, 48]") && !m.contains("layer 0"), "{m}");
    let after = rig.gpu.download(&device[0].weight).unwrap();
    assert_eq!(after.host_bytes().unwrap(), good.weight.host_bytes().unwrap(), "layer 0 was merged before the refusal");

    // The same weight twice would be read and written by two blocks at once.
    let twice = [device[0].clone(), device[0].clone()];
    let Err(Error::Input(m)) = merge_deltas(&rig.exec(), &deltas(&twice)) else {
        panic!("a repeated weight was accepted")
    };
    assert!(m.contains("layers 0 and 1"), "{m}");

    // f32 weights merge on the host.
    let wide = good.map(&mut |t| rig.gpu.upload(&rig.weights, t, DType::F32).unwrap());
    let Err(Error::Unsupported(m)) = merge_deltas(&rig.exec(), &deltas(&[wide])) else { panic!("f32 accepted") };
    assert!(m.contains("layer 0 is f32"), "{m}");
    println!("GPUCHECK lora_merge refusals: shape by layer index, repeated weight, f32");
}
