//! LoRA sets on the device. A set's factors are laid out once on the host in the target weights'
//! own column order (KRSC for convolutions), rounded to the weights' dtype and uploaded
//! (`DeviceLoraSet::upload`); merging is then a few launches of the LoRA-delta kernels
//! (`ops::lora::merge_deltas`) that add every delta of the set into the device weights in place.
//! `LoraSwitcher` changes the merged set per clip: it first restores the weights the current set
//! touched to their base values — from device copies taken before their first merge
//! (`Restore::Copy`), or re-uploaded from the checkpoint files (`Restore::Reload`, no device memory
//! beyond the weights) — then merges the new set. Restoring instead of subtracting keeps the base
//! exact however often sets change, and the weights keep their addresses, so a CUDA graph captured
//! over a denoising step stays valid.
//!
//! ΔW per format is the host merge's (merge.rs); the factors become:
//! - LoRA / LoCon: up [out, r] and the right factor [r, in·kh·kw] (a Tucker core folded in on the
//!   host: r²·in·kh·kw multiply-adds, far less than ΔW), columns moved to (kh, kw, in) order;
//! - LoHa: both pairs, right factors' columns moved the same way;
//! - LoKr: W1 [a, b] and W2 [c, d, kh·kw] (product factors multiplied out on the host), the
//!   kernel placing W1[i, j] W2[k, l, y] at row i·c + k, column y·in + j·d + l;
//! - full diff: the tensor, columns moved.

use std::collections::HashMap;

use super::merge::{Delta, LoraMerge, Scaled};
use crate::error::{Error, Result};
use crate::gpu::memory::ARENA_ALIGN;
use crate::gpu::{Arena, Gpu};
use crate::models::ModelWeights;
use crate::ops::conv::weight_oihw_to_ohwi;
use crate::ops::lora::{DeltaFactors, DeltaTerm, LayerDelta, merge_deltas};
use crate::ops::{Exec, par_map};
use crate::tensor::{DType, Tensor};

/// How a switch puts the touched weights back to their base values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restore {
    /// From device copies taken before a weight's first merge (memory: the touched weights once
    /// more; the fastest).
    Copy,
    /// Re-uploaded from the checkpoint's mapped files (no extra device memory; bound by the host
    /// link and the host's layout change of convolution weights).
    Reload,
}

impl Restore {
    pub fn parse(s: &str) -> Result<Restore> {
        match s {
            "copy" => Ok(Restore::Copy),
            "reload" => Ok(Restore::Reload),
            other => Err(Error::Input(format!("--lora-restore '{other}': expected copy or reload"))),
        }
    }
}

/// One delta's factors, host side, in the target's column order and the weights' dtype.
enum HostFactors {
    LowRank(Tensor, Tensor),
    Hadamard([Tensor; 4]),
    Kronecker(Tensor, Tensor, usize),
    Full(Tensor),
}

/// The same on the device.
type DeviceFactors = HostFactors;

/// A set of LoRA deltas for one model, uploaded: per targeted weight, its terms.
pub struct DeviceLoraSet {
    layers: Vec<(String, Vec<(DeviceFactors, f32)>)>,
    bytes: usize,
    _arena: Arena,
}

impl DeviceLoraSet {
    /// Lays out and uploads the factors of the deltas in `merge` for the device weights of
    /// `weights` (which must hold every targeted name) whose names `select` accepts. The weights
    /// must be additive (no DoRA: `LoraMerge::is_additive`).
    pub fn upload(
        gpu: &Gpu,
        weights: &ModelWeights,
        merge: &LoraMerge,
        select: impl Fn(&str) -> bool,
    ) -> Result<DeviceLoraSet> {
        let dtype = weights.dtype();
        let mut names: Vec<&str> = merge.names().filter(|n| select(n)).collect();
        if let Some(n) = names.iter().find(|n| !merge.is_additive(n)) {
            return Err(Error::Unsupported(format!(
                "the weight '{n}' has a DoRA module, which the device merge does not do yet (it is merged on \
                 the host when a model loads)"
            )));
        }
        names.sort_unstable();
        let targets: Vec<(&str, &Tensor, &[Scaled])> = names
            .iter()
            .map(|&name| {
                let w = weights.tensor(name).ok_or_else(|| {
                    Error::Internal(format!("a LoRA delta targets '{name}', which this model does not have"))
                })?;
                let deltas = merge.deltas(name).unwrap_or(&[]);
                Ok((name, w, deltas))
            })
            .collect::<Result<_>>()?;
        // The host work (Tucker folds, products, column moves, rounding) on every core.
        let host: Vec<Result<Vec<(HostFactors, f32)>>> = par_map(targets.len(), |k| {
            let (name, w, deltas) = targets[k];
            deltas.iter().map(|d| Ok((host_factors(name, w.shape(), d, dtype)?, d.scale as f32))).collect()
        });
        let host: Vec<Vec<(HostFactors, f32)>> = host.into_iter().collect::<Result<_>>()?;
        let bytes: usize = host
            .iter()
            .flatten()
            .flat_map(|(f, _)| tensors(f))
            .map(|t| t.size_bytes().div_ceil(ARENA_ALIGN) * ARENA_ALIGN)
            .sum();
        let arena = Arena::new("LoRA factors", bytes.max(1))?;
        let mut layers = Vec::with_capacity(host.len());
        for ((name, _, _), terms) in targets.iter().zip(host) {
            let up = |t: &Tensor| gpu.upload(&arena, t, dtype);
            let terms = terms
                .into_iter()
                .map(|(f, scale)| {
                    let f = match f {
                        HostFactors::LowRank(u, d) => HostFactors::LowRank(up(&u)?, up(&d)?),
                        HostFactors::Hadamard(p) => {
                            HostFactors::Hadamard([up(&p[0])?, up(&p[1])?, up(&p[2])?, up(&p[3])?])
                        }
                        HostFactors::Kronecker(a, b, kernel) => HostFactors::Kronecker(up(&a)?, up(&b)?, kernel),
                        HostFactors::Full(d) => HostFactors::Full(up(&d)?),
                    };
                    Ok((f, scale))
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push((name.to_string(), terms));
        }
        Ok(DeviceLoraSet { layers, bytes, _arena: arena })
    }

    /// Device memory the factors take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The names of the weights the set adds to.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|(n, _)| n.as_str())
    }

    /// Adds the set's deltas into `weights` in place (queued on the stream).
    pub fn merge_into(&self, ex: &Exec, weights: &ModelWeights) -> Result<()> {
        self.merge_from(ex, weights, &HashMap::new())
    }

    /// `merge_into` reading each weight's base values from `base` where it holds a copy (a switch
    /// restores and merges in one pass), else from the weight itself.
    fn merge_from(&self, ex: &Exec, weights: &ModelWeights, base: &HashMap<String, Tensor>) -> Result<()> {
        let layers = self
            .layers
            .iter()
            .map(|(name, terms)| {
                let weight = weights
                    .tensor(name)
                    .ok_or_else(|| Error::Internal(format!("a LoRA set targets '{name}', which this model lacks")))?;
                let terms = terms
                    .iter()
                    .map(|(f, scale)| DeltaTerm {
                        factors: match f {
                            HostFactors::LowRank(up, down) => DeltaFactors::LowRank { up, down },
                            HostFactors::Hadamard([a1, b1, a2, b2]) => DeltaFactors::Hadamard { a1, b1, a2, b2 },
                            HostFactors::Kronecker(w1, w2, kernel) => {
                                DeltaFactors::Kronecker { w1, w2, kernel: *kernel }
                            }
                            HostFactors::Full(delta) => DeltaFactors::Full { delta },
                        },
                        scale: *scale,
                    })
                    .collect();
                Ok(LayerDelta { weight, terms, base: base.get(name.as_str()) })
            })
            .collect::<Result<Vec<_>>>()?;
        merge_deltas(ex, &layers)
    }
}

fn tensors(f: &HostFactors) -> Vec<&Tensor> {
    match f {
        HostFactors::LowRank(a, b) | HostFactors::Kronecker(a, b, _) => vec![a, b],
        HostFactors::Hadamard(p) => p.iter().collect(),
        HostFactors::Full(d) => vec![d],
    }
}

/// The PyTorch shape of a graph weight: convolutions are held KRSC [out, kh, kw, in].
fn torch_shape(graph: &[usize]) -> Vec<usize> {
    match graph {
        [o, kh, kw, i] => vec![*o, *i, *kh, *kw],
        other => other.to_vec(),
    }
}

/// `values` [rows, in·kernel] in PyTorch column order (in, then kernel position) moved to the
/// graph's (kernel position, then in) order; unchanged for kernel 1.
fn columns_krsc(values: Vec<f64>, rows: usize, inputs: usize, kernel: usize) -> Vec<f64> {
    if kernel == 1 {
        return values;
    }
    let cols = inputs * kernel;
    let mut out = vec![0f64; values.len()];
    for r in 0..rows {
        let (src, dst) = (&values[r * cols..][..cols], &mut out[r * cols..][..cols]);
        for i in 0..inputs {
            for y in 0..kernel {
                dst[y * inputs + i] = src[i * kernel + y];
            }
        }
    }
    out
}

fn rounded(shape: &[usize], dtype: DType, values: &[f64]) -> Result<Tensor> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_f32(shape, dtype, &v)
}

/// One delta's factors for the graph weight `name` of shape `graph`, laid out for the kernels.
fn host_factors(name: &str, graph: &[usize], d: &Scaled, dtype: DType) -> Result<HostFactors> {
    let target = torch_shape(graph);
    d.delta.check(&target).map_err(|why| {
        Error::Internal(format!("LoRA {} {why}, but the weight '{name}' it was matched to is {target:?}", d.source))
    })?;
    let out = target[0];
    let inputs = target.get(1).copied().unwrap_or(1);
    let kernel: usize = target.iter().skip(2).product();
    let cols = inputs * kernel;
    Ok(match &d.delta {
        Delta::LowRank(l) => {
            let r = l.rank();
            let up = super::merge::widen(&l.up)?;
            let down = columns_krsc(l.down_matrix()?, r, inputs, kernel);
            HostFactors::LowRank(rounded(&[out, r], dtype, &up)?, rounded(&[r, cols], dtype, &down)?)
        }
        Delta::Hadamard(pairs) => {
            let mut t = Vec::with_capacity(4);
            for (a, b) in pairs {
                let r = a.shape()[0..2][1];
                t.push(rounded(&[out, r], dtype, &super::merge::widen(a)?)?);
                let b = columns_krsc(super::merge::widen(b)?, r, inputs, kernel);
                t.push(rounded(&[r, cols], dtype, &b)?);
            }
            let [a1, b1, a2, b2]: [Tensor; 4] = t.try_into().map_err(|_| Error::Internal("LoHa pairs".into()))?;
            HostFactors::Hadamard([a1, b1, a2, b2])
        }
        Delta::Kronecker(w1, w2) => {
            let ((a, b), (c, n)) = (w1.dims(), w2.dims());
            let w1 = rounded(&[a, b], dtype, &w1.values()?)?;
            let w2 = rounded(&[c, n / kernel, kernel], dtype, &w2.values()?)?;
            HostFactors::Kronecker(w1, w2, kernel)
        }
        Delta::Full(t) => {
            let v = columns_krsc(super::merge::widen(t)?, out, inputs, kernel);
            HostFactors::Full(rounded(&[out, cols], dtype, &v)?)
        }
    })
}

/// Which LoRA set a model's device weights hold, and how to put them back.
pub struct LoraSwitcher {
    restore: Restore,
    /// Base copies of every weight any set merged so far touched (`Restore::Copy`).
    base: HashMap<String, Tensor>,
    arenas: Vec<Arena>,
    /// The weights the merged set touched.
    merged: Vec<String>,
}

impl LoraSwitcher {
    pub fn new(restore: Restore) -> LoraSwitcher {
        LoraSwitcher { restore, base: HashMap::new(), arenas: Vec::new(), merged: Vec::new() }
    }

    /// Makes `set` (None: no LoRA) the merged set of `weights`: the weights the current set touched
    /// go back to their base values, then `set` is merged. Queued on the stream.
    pub fn apply(&mut self, ex: &Exec, weights: &ModelWeights, set: Option<&DeviceLoraSet>) -> Result<()> {
        let Exec::Cuda { gpu, .. } = ex else {
            return Err(Error::Internal("LoraSwitcher runs on CUDA; the CPU path merges on the host".into()));
        };
        let weight = |name: &str| {
            weights.tensor(name).ok_or_else(|| Error::Internal(format!("LoRA switch: no weight '{name}' in the model")))
        };
        // 1. base copies of the weights the new set touches first (they hold base values now)
        if self.restore == Restore::Copy
            && let Some(set) = set
        {
            let fresh: Vec<&str> = set.names().filter(|n| !self.base.contains_key(*n)).collect();
            if !fresh.is_empty() {
                let bytes = fresh
                    .iter()
                    .map(|n| Ok(weight(n)?.size_bytes().div_ceil(ARENA_ALIGN) * ARENA_ALIGN))
                    .sum::<Result<usize>>()?;
                let arena = Arena::new("LoRA base copies", bytes)?;
                for name in fresh {
                    let w = weight(name)?;
                    let copy = gpu.empty(&arena, w.shape(), w.dtype())?;
                    gpu.copy(&copy, w)?;
                    self.base.insert(name.to_string(), copy);
                }
                self.arenas.push(arena);
            }
        }
        // 2. the current set's weights back to base; with copies, only those the new set leaves
        // alone: the merge below reads the others' base values from their copies
        let copies_merge = self.restore == Restore::Copy && set.is_some();
        let next: std::collections::HashSet<&str> = set.map(|s| s.names().collect()).unwrap_or_default();
        for name in std::mem::take(&mut self.merged) {
            if copies_merge && next.contains(name.as_str()) {
                continue;
            }
            let w = weight(&name)?;
            match self.restore {
                Restore::Copy => {
                    let base = self.base.get(&name).ok_or_else(|| {
                        Error::Internal(format!("LoRA switch: no base copy of the merged weight '{name}'"))
                    })?;
                    gpu.copy(w, base)?;
                }
                Restore::Reload => {
                    let source = weights.source(&name).ok_or_else(|| {
                        Error::Internal(format!("LoRA switch: the weight '{name}' kept no host source to reload"))
                    })?;
                    let laid_out =
                        if source.shape().len() == 4 { weight_oihw_to_ohwi(source)? } else { source.clone() };
                    let crate::tensor::Storage::Device(mem) = w.storage() else {
                        return Err(Error::Internal(format!("LoRA switch: '{name}' is not a device weight")));
                    };
                    gpu.upload_into(mem, &laid_out, w.dtype())?;
                }
            }
        }
        // 3. the new set
        if let Some(set) = set {
            let no_copies = HashMap::new();
            set.merge_from(ex, weights, if copies_merge { &self.base } else { &no_copies })?;
            self.merged = set.names().map(str::to_string).collect();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::merge::{Delta, Factor, LowRank, Scaled, matmul, widen};
    use super::{HostFactors, columns_krsc, host_factors, torch_shape};
    use crate::tensor::{DType, Tensor};

    fn t(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64).map(|i| (((i * 7919 + seed * 104729) % 23) as f32 - 11.0) / 8.0).collect();
        Tensor::from_f32(shape, DType::F32, &v).unwrap()
    }

    /// ΔW rebuilt from the laid-out factors, in the graph's (KRSC) element order.
    fn rebuilt(f: &HostFactors, out: usize, inputs: usize, kernel: usize) -> Vec<f64> {
        let v = |t: &Tensor| widen(t).unwrap();
        match f {
            HostFactors::LowRank(up, down) => matmul(&v(up), &v(down), out, up.shape()[1]),
            HostFactors::Hadamard([a1, b1, a2, b2]) => {
                let w1 = matmul(&v(a1), &v(b1), out, a1.shape()[1]);
                let w2 = matmul(&v(a2), &v(b2), out, a2.shape()[1]);
                w1.iter().zip(&w2).map(|(x, y)| x * y).collect()
            }
            HostFactors::Kronecker(w1, w2, k) => {
                assert_eq!(*k, kernel);
                let (a, b) = (w1.shape()[0], w1.shape()[1]);
                let (c, d) = (w2.shape()[0], w2.shape()[1]);
                let (v1, v2) = (v(w1), v(w2));
                let mut o = vec![0f64; out * inputs * kernel];
                for i in 0..a {
                    for j in 0..b {
                        for kk in 0..c {
                            for l in 0..d {
                                for y in 0..kernel {
                                    o[(i * c + kk) * inputs * kernel + y * inputs + j * d + l] =
                                        v1[i * b + j] * v2[(kk * d + l) * kernel + y];
                                }
                            }
                        }
                    }
                }
                o
            }
            HostFactors::Full(d) => v(d),
        }
    }

    #[test]
    fn laid_out_factors_rebuild_the_host_delta_in_krsc_order() {
        // A 3x3 convolution [out 6, in 4, 3, 3], held KRSC [6, 3, 3, 4] on the device.
        let (out, inputs, kernel) = (6, 4, 9);
        let graph = [6, 3, 3, 4];
        let target = torch_shape(&graph);
        let deltas = [
            Delta::LowRank(LowRank { up: t(&[6, 2, 1, 1], 1), down: t(&[2, 4, 3, 3], 2), mid: None }),
            Delta::LowRank(LowRank {
                up: t(&[6, 2, 1, 1], 3),
                down: t(&[2, 4, 1, 1], 4),
                mid: Some(t(&[2, 2, 3, 3], 5)),
            }),
            Delta::Hadamard([(t(&[6, 3], 6), t(&[3, 36], 7)), (t(&[6, 2], 8), t(&[2, 36], 9))]),
            Delta::Kronecker(Factor::Full(t(&[2, 2], 10)), Factor::Full(t(&[3, 2, 3, 3], 11))),
            Delta::Kronecker(
                Factor::Product(t(&[2, 1], 12), t(&[1, 2], 13)),
                Factor::Product(t(&[3, 2], 14), t(&[2, 18], 15)),
            ),
            Delta::Full(t(&[6, 4, 3, 3], 16)),
        ];
        for delta in deltas {
            let want = columns_krsc(delta.values(&target).unwrap(), out, inputs, kernel);
            let d = Scaled { scale: 0.5, delta, source: "test".into(), dora: None };
            let f = host_factors("w", &graph, &d, DType::F32).unwrap();
            let got = rebuilt(&f, out, inputs, kernel);
            let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
            assert!(err < 1e-4, "{:?}: max error {err}", d.delta);
        }
        // A delta that does not fit its weight is the engine's error, naming both.
        let d = Scaled { scale: 1.0, delta: Delta::Full(t(&[6, 4], 1)), source: "f: m".into(), dora: None };
        let e = host_factors("conv", &graph, &d, DType::F32).err().unwrap().to_string();
        assert!(e.contains("'conv'") && e.contains("f: m"), "{e}");
    }

    #[test]
    fn columns_move_from_in_major_to_kernel_major() {
        // one row, in 2, kernel 3: PyTorch (i, y) = [i0y0, i0y1, i0y2, i1y0, i1y1, i1y2]
        let v = vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0];
        assert_eq!(columns_krsc(v.clone(), 1, 2, 3), vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
        assert_eq!(columns_krsc(v.clone(), 2, 3, 1), v);
        assert_eq!(torch_shape(&[8, 3, 3, 4]), vec![8, 4, 3, 3]);
        assert_eq!(torch_shape(&[8, 4]), vec![8, 4]);
    }
}
