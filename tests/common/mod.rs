//! Helpers shared by the test binaries: reference fixtures, error metrics, random inputs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use celframe::ops::{par_map, par_rows};
use celframe::{DType, Tensor};

/// Every tensor of a float32 safetensors fixture under tests/fixtures.
pub fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values: Vec<f32> =
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, Tensor::from_f32(view.shape(), DType::F32, &values).unwrap())
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖ and max |a − b|, in f64: summed per fixed block of values on all cores, the
/// blocks' sums added in order (the same result whatever the core count).
pub fn errors(actual: &[f32], expected: &[f32]) -> (f64, f64) {
    assert_eq!(actual.len(), expected.len(), "length");
    const BLOCK: usize = 1 << 16;
    let blocks = par_map(actual.len().div_ceil(BLOCK), |b| {
        let range = b * BLOCK..((b + 1) * BLOCK).min(actual.len());
        let (mut diff, mut norm, mut max) = (0f64, 0f64, 0f64);
        for (a, e) in actual[range.clone()].iter().zip(&expected[range]) {
            let d = (*a as f64 - *e as f64).abs();
            diff += d * d;
            norm += (*e as f64) * (*e as f64);
            max = max.max(d);
        }
        (diff, norm, max)
    });
    let (diff, norm, max) =
        blocks.into_iter().fold((0f64, 0f64, 0f64), |(d, n, m), (bd, bn, bm)| (d + bd, n + bn, m.max(bm)));
    ((diff / norm.max(1e-300)).sqrt(), max)
}

/// Asserts every value is finite (poisoned outputs are NaN) and the relative L2 error is within `tol`.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) -> (f64, f64) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shape");
    let (a, e) = (actual.to_f32_vec().unwrap(), expected.to_f32_vec().unwrap());
    let unwritten = a.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(unwritten, 0, "{what}: {unwritten} outputs not finite (unwritten or overflow)");
    let (rel, max) = errors(&a, &e);
    assert!(rel <= tol, "{what}: relative L2 error {rel:.3e} > {tol:.1e} (max abs {max:.3e})");
    (rel, max)
}

/// Deterministic normal-ish values (xorshift64 + Box-Muller, two draws a value), scaled and shifted.
/// Computed on all cores (the GPU tests draw inputs of ~100M values): each block of values starts
/// from the generator's state jumped ahead to it, so the values are one sequential stream's
/// whatever the core count (`randn_sequential` in tests/ops_cpu.rs is that stream).
pub fn randn(n: usize, seed: u64, scale: f32, shift: f32) -> Vec<f32> {
    const BLOCK: usize = 1 << 16;
    let blocks = n.div_ceil(BLOCK);
    // The state before each block's first draw: xorshift is linear over GF(2), so the 2 * BLOCK
    // steps of a block are one 64x64 bit matrix, applied block after block.
    let jump = XorshiftSteps::one().power_of_two(2 * BLOCK);
    let mut starts = Vec::with_capacity(blocks);
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    for _ in 0..blocks {
        starts.push(s);
        s = jump.apply(s);
    }
    let mut out = vec![0f32; n];
    par_rows(&mut out, BLOCK, |first_block, part| {
        for (i, block) in part.chunks_mut(BLOCK).enumerate() {
            let mut s = starts[first_block + i];
            let mut uniform = move || {
                s = xorshift(s);
                ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            };
            for v in block {
                let (u, w) = (uniform(), uniform());
                *v = ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * w).cos()) as f32 * scale + shift;
            }
        }
    });
    out
}

/// One step of Marsaglia's xorshift64 (shifts 13, 7, 17).
pub fn xorshift(mut s: u64) -> u64 {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    s
}

/// A number of xorshift64 steps as the bit matrix they are: column j is the state bit j becomes.
struct XorshiftSteps([u64; 64]);

impl XorshiftSteps {
    fn one() -> XorshiftSteps {
        XorshiftSteps(std::array::from_fn(|j| xorshift(1 << j)))
    }

    fn apply(&self, s: u64) -> u64 {
        (0..64).filter(|j| (s >> j) & 1 == 1).fold(0, |acc, j| acc ^ self.0[j])
    }

    /// These steps taken `k` times (`k` a power of two), by squaring.
    fn power_of_two(mut self, k: usize) -> XorshiftSteps {
        assert!(k.is_power_of_two());
        for _ in 0..k.trailing_zeros() {
            self = XorshiftSteps(std::array::from_fn(|j| self.apply(self.0[j])));
        }
        self
    }
}

pub fn random_tensor(shape: &[usize], dtype: DType, seed: u64, scale: f32, shift: f32) -> Tensor {
    Tensor::from_f32(shape, dtype, &randn(shape.iter().product(), seed, scale, shift)).unwrap()
}

/// A fresh folder under the system temp dir (tagged, per process and per call), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("celframe-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// The names in the folder, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
