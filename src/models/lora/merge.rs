//! The merge on the host: W' = W + Σᵢ sᵢ ΔWᵢ for every weight a LoRA targets, with ΔW rebuilt from
//! its factors and everything summed in f64 (each product of two f32 values is exact there), then
//! rounded once to the dtype the graph computes in. `ModelWeights` calls `LoraMerge::merged` for
//! each weight it prepares, before the conversion or upload; a device kernel that adds the deltas
//! after the upload replaces that one call.
//!
//! ΔW per format (kohya sd-scripts `networks/lora.py` `LoRAModule.merge_to`,
//! LyCORIS `lycoris/modules/locon.py`; PEFT `tuners/lora/layer.py` `get_delta_weight`):
//! - LoRA / LoCon: ΔW[o, j] = Σ_r up[o, r] down[r, j], j running over in·kh·kw (a 3x3 LoCon down
//!   keeps the target's kernel; up is 1x1).
//! - LoCon Tucker (`lora_mid` [r, r, kh, kw], down [r, in(,1,1)], up [out, r(,1,1)]):
//!   ΔW[o, i, y, x] = Σ_{p,q} up[o, p] mid[p, q, y, x] down[q, i].
//! - LoHa (LyCORIS `lycoris/functional/loha.py` `diff_weight`):
//!   ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b), a [out, in·kh·kw] matrix read in the target's shape.
//! - LoKr (§6.5; LyCORIS `lycoris/functional/lokr.py`): ΔW = kron(W1, W2) with each factor a full
//!   matrix or a product a · b; W2 is [c, d·kh·kw] (or [c, d, kh, kw]) and W1 [a, b] acts as
//!   [a, b, 1, 1], so ΔW[i·c + k, j·d + l, y, x] = W1[i, j] W2[k, l, y, x].
//! - Full (LyCORIS `full`, `diff` / `diff_b`): ΔW is the tensor itself.
//!
//! DoRA (`Dora`) rescales W + sΔW by a stored magnitude over a norm of it; its change to W is
//! computed from the weight before any LoRA, so it is the one non-additive entry.

use std::collections::HashMap;
use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::tensor::{DType, HostBytes, Storage, Tensor};

/// One module's low-rank factors (views of its file), shapes checked against their target.
#[derive(Clone, Debug)]
pub struct LowRank {
    pub down: Tensor,
    pub up: Tensor,
    pub mid: Option<Tensor>,
}

impl LowRank {
    /// The rank: the down matrix's first dimension (kohya `networks/lora.py` reads it from lora_down, never up).
    pub fn rank(&self) -> usize {
        self.down.shape()[0]
    }

    /// The weight shape this delta has: [out, in] for a Linear, [out, in, kh, kw] for a
    /// convolution (kernel from lora_mid, else from a 4-d down), in PyTorch layout.
    pub fn shape(&self) -> Vec<usize> {
        let (out, inner) = (self.up.shape()[0], self.down.shape()[1]);
        let kernel = match (&self.mid, self.down.shape()) {
            (Some(mid), _) => &mid.shape()[2..],
            (None, [_, _, kh, kw]) => &[*kh, *kw][..],
            (None, _) => &[][..],
        };
        [&[out, inner][..], kernel].concat()
    }

    /// ΔW in f64, row-major over the target's PyTorch layout ([out, in, kh, kw]).
    pub fn delta(&self) -> Result<Vec<f64>> {
        Ok(matmul(&widen(&self.up)?, &self.down_matrix()?, self.up.shape()[0], self.rank()))
    }

    /// The right factor as a [rank, in·kh·kw] matrix in f64 (PyTorch column order), with a Tucker
    /// core folded in: ΔW = up · this.
    pub fn down_matrix(&self) -> Result<Vec<f64>> {
        let down = widen(&self.down)?;
        let rank = self.rank();
        let inner = self.down.numel() / rank;
        Ok(match &self.mid {
            None => down,
            Some(mid) => {
                // core[p, i, k] = Σ_q mid[p, q, k] down[q, i]: the Tucker core and down folded into
                // one [rank, in·kh·kw] matrix, then up as for plain LoCon.
                let mid = widen(mid)?;
                let kernel = mid.len() / (rank * rank);
                let mut core = vec![0f64; rank * inner * kernel];
                for p in 0..rank {
                    for q in 0..rank {
                        let m = &mid[(p * rank + q) * kernel..][..kernel];
                        for i in 0..inner {
                            let d = down[q * inner + i];
                            let row = &mut core[(p * inner + i) * kernel..][..kernel];
                            row.iter_mut().zip(m).for_each(|(c, &m)| *c += m * d);
                        }
                    }
                }
                core
            }
        })
    }
}

/// A factor of a LoKr module: a full matrix, or the product of two.
#[derive(Clone, Debug)]
pub enum Factor {
    Full(Tensor),
    Product(Tensor, Tensor),
}

impl Factor {
    /// Rows and the values per row (a 4-d full factor keeps its kernel in the row).
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Factor::Full(t) => (t.shape()[0], t.numel() / t.shape()[0].max(1)),
            Factor::Product(a, b) => (a.shape()[0], b.shape()[1]),
        }
    }

    /// The factor's values, row-major [rows, values per row].
    pub fn values(&self) -> Result<Vec<f64>> {
        match self {
            Factor::Full(t) => widen(t),
            Factor::Product(a, b) => Ok(matmul(&widen(a)?, &widen(b)?, a.shape()[0], a.shape()[1])),
        }
    }
}

/// A module's ΔW, in one of the formats the module doc lists. Shapes are checked against the
/// target by `check` before any is computed.
#[derive(Clone, Debug)]
pub enum Delta {
    LowRank(LowRank),
    /// LoHa: (w1_a, w1_b), (w2_a, w2_b).
    Hadamard([(Tensor, Tensor); 2]),
    /// LoKr: W1, W2.
    Kronecker(Factor, Factor),
    Full(Tensor),
}

impl Delta {
    /// Whether this delta fits a weight of `target` shape (PyTorch layout); Err says why, with
    /// the delta's shapes.
    pub fn check(&self, target: &[usize]) -> std::result::Result<(), String> {
        let out = target.first().copied().unwrap_or(0);
        let cols = target.iter().skip(1).product::<usize>();
        match self {
            Delta::LowRank(l) if l.shape() == target => Ok(()),
            Delta::LowRank(l) => Err(format!("makes a {:?} delta", l.shape())),
            Delta::Full(t) if t.shape() == target => Ok(()),
            Delta::Full(t) => Err(format!("is {:?}", t.shape())),
            Delta::Hadamard(pairs) => {
                for (a, b) in pairs {
                    match (a.shape(), b.shape()) {
                        ([o, r], [r2, n]) if *o == out && r == r2 && *n == cols => {}
                        (sa, sb) => {
                            return Err(format!("has factors {sa:?} and {sb:?}; [{out}, rank] and [rank, {cols}] fit"));
                        }
                    }
                }
                Ok(())
            }
            Delta::Kronecker(w1, w2) => {
                let ((a, b), (c, n)) = (w1.dims(), w2.dims());
                let kernel: usize = target.iter().skip(2).product();
                let kernel_ok = match w2 {
                    Factor::Full(t) if t.shape().len() == 4 => t.shape()[2..] == target[2..],
                    _ => true,
                };
                if a * c == out && n.is_multiple_of(kernel) && b * (n / kernel) == cols / kernel && kernel_ok {
                    Ok(())
                } else {
                    Err(format!("makes kron([{a}, {b}], [{c}, {n}]), which does not give {target:?}"))
                }
            }
        }
    }

    /// ΔW in f64, row-major over `target` (checked by `check`).
    pub fn values(&self, target: &[usize]) -> Result<Vec<f64>> {
        match self {
            Delta::LowRank(l) => l.delta(),
            Delta::Full(t) => widen(t),
            Delta::Hadamard([(a1, b1), (a2, b2)]) => {
                let w1 = matmul(&widen(a1)?, &widen(b1)?, a1.shape()[0], a1.shape()[1]);
                let w2 = matmul(&widen(a2)?, &widen(b2)?, a2.shape()[0], a2.shape()[1]);
                Ok(w1.iter().zip(&w2).map(|(x, y)| x * y).collect())
            }
            Delta::Kronecker(w1, w2) => {
                let ((a, b), (c, n)) = (w1.dims(), w2.dims());
                let (v1, v2) = (w1.values()?, w2.values()?);
                let kernel: usize = target.iter().skip(2).product();
                let d = n / kernel;
                let cols = b * n;
                let mut out = vec![0f64; a * c * cols];
                for i in 0..a {
                    for j in 0..b {
                        let s = v1[i * b + j];
                        for k in 0..c {
                            // row i·c + k, columns (j·d + l)·kernel + y: one run of d·kernel values
                            let dst = &mut out[(i * c + k) * cols + j * d * kernel..][..n];
                            dst.iter_mut().zip(&v2[k * n..][..n]).for_each(|(o, &w)| *o = s * w);
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

pub(super) fn widen(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_f32_vec()?.into_iter().map(f64::from).collect())
}

/// [m, k] · [k, n] in f64, row-major.
pub(super) fn matmul(a: &[f64], b: &[f64], m: usize, k: usize) -> Vec<f64> {
    let n = b.len() / k.max(1);
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        let row = &mut out[i * n..][..n];
        for r in 0..k {
            let x = a[i * k + r];
            row.iter_mut().zip(&b[r * n..][..n]).for_each(|(o, &y)| *o += x * y);
        }
    }
    out
}

/// Which norm DoRA takes of W₁ = W + sΔW (PyTorch layout [out, in(, kh, kw)]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoraAxis {
    /// One norm per output row, over in·kh·kw: PEFT (`tuners/lora/dora.py`, `get_weight_norm`:
    /// `torch.linalg.norm(weight, dim=1)` on a Linear, every dim but 0 on a convolution) and
    /// LyCORIS `wd_on_out=True`, its default (`dora_scale` [out, 1(, 1, 1)]).
    Output,
    /// One norm per input column, over out·kh·kw: LyCORIS `wd_on_out=False`
    /// (`dora_scale` [1, in(, 1, 1)]; `lycoris/functional/general.py`, `_weight_decompose`).
    Input,
}

/// DoRA's weight decomposition over a module's delta: with W₁ = W + sΔW,
/// W'' = m ⊙ W₁ / (‖W₁‖ + eps), the norm over `axis`, and the module adds blend · (W'' − W).
/// W is the weight before any LoRA: each module's change is taken against it, so the result does
/// not depend on the order of the LoRAs (PEFT's and ComfyUI's sequential merges give this when
/// the DoRA module comes first; a weight takes at most one DoRA module, `resolve` refuses more).
#[derive(Clone, Debug)]
pub struct Dora {
    /// m: one value per output row (`Output`) or input column (`Input`).
    pub magnitude: Tensor,
    pub axis: DoraAxis,
    /// Added to the norm: LyCORIS adds `torch.finfo(float32).eps`, PEFT nothing.
    pub eps: f64,
    /// The share of W'' − W merged: the LoRA's strength for `dora_scale` files, 1 for PEFT files,
    /// whose strength is in `Scaled::scale` instead (see `resolve`'s module doc).
    pub blend: f64,
}

impl Dora {
    /// The dimension the magnitude runs along and its length for a `target`-shaped weight.
    fn length(&self, target: &[usize]) -> usize {
        let dim = if self.axis == DoraAxis::Output { 0 } else { 1 };
        target.get(dim).copied().unwrap_or(0)
    }

    /// Whether the magnitude has one value per row or column of `target`.
    pub fn check(&self, target: &[usize]) -> std::result::Result<(), String> {
        let n = self.length(target);
        if target.len() >= 2 && self.magnitude.numel() == n {
            Ok(())
        } else {
            let axis = if self.axis == DoraAxis::Output { "output row" } else { "input column" };
            Err(format!("has a {:?} DoRA magnitude, not one value per {axis} ({n})", self.magnitude.shape()))
        }
    }

    /// blend · (m ⊙ W₁ / (‖W₁‖ + eps) − W) in f64 with W₁ = `base` + `scale` · `delta`, row-major
    /// over `target`.
    pub fn change(&self, base: &[f64], delta: &[f64], scale: f64, target: &[usize]) -> Result<Vec<f64>> {
        let m = widen(&self.magnitude)?;
        let (out, inner) = (target[0], target[1]);
        let kernel: usize = target[2..].iter().product();
        let w1: Vec<f64> = base.iter().zip(delta).map(|(w, d)| w + scale * d).collect();
        // index of the norm each element belongs to
        let group = |idx: usize| match self.axis {
            DoraAxis::Output => idx / (inner * kernel),
            DoraAxis::Input => (idx / kernel) % inner,
        };
        let mut norms = vec![0f64; if self.axis == DoraAxis::Output { out } else { inner }];
        for (idx, v) in w1.iter().enumerate() {
            norms[group(idx)] += v * v;
        }
        let factors: Vec<f64> = norms.iter().zip(&m).map(|(n, m)| m / (n.sqrt() + self.eps)).collect();
        Ok(w1.iter().zip(base).enumerate().map(|(idx, (w1, w))| self.blend * (factors[group(idx)] * w1 - w)).collect())
    }
}

/// A delta and its total scale: the user's strength × alpha / rank (for a `dora_scale` module,
/// alpha / rank: the strength is `Dora::blend`).
#[derive(Clone, Debug)]
pub struct Scaled {
    pub scale: f64,
    pub delta: Delta,
    /// The LoRA module it comes from (`file: module`), for errors.
    pub source: String,
    /// DoRA's decomposition: this module then changes W by `Dora::change`, which depends on W,
    /// instead of adding scale · ΔW.
    pub dora: Option<Dora>,
}

/// The deltas for one model, keyed by the graph name of the weight each adds to
/// (`down_blocks.1.attentions.0.proj_in.weight`), in the order the LoRAs were given.
#[derive(Clone, Debug, Default)]
pub struct LoraMerge {
    deltas: HashMap<String, Vec<Scaled>>,
}

impl LoraMerge {
    /// Adds `delta` to the weight `tensor` (a graph name); its shapes must fit that weight
    /// (`Delta::check`), which `resolve` and the Control-LoRA loader check first.
    pub fn add(&mut self, tensor: &str, delta: Scaled) {
        self.deltas.entry(tensor.to_string()).or_default().push(delta);
    }

    /// Weights with at least one delta.
    pub fn len(&self) -> usize {
        self.deltas.len()
    }
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }
    /// The graph names of the weights with a delta.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.deltas.keys().map(String::as_str)
    }

    /// The scaled deltas for the weight `name`, in the order the LoRAs were given. An entry with
    /// `dora` is not additive (its change depends on the weight: `Dora::change`); `is_additive`
    /// tells whether every entry of a weight is.
    pub fn deltas(&self, name: &str) -> Option<&[Scaled]> {
        self.deltas.get(name).map(Vec::as_slice)
    }

    /// Whether the weight `name`'s merge is W + Σ scale · ΔW (no DoRA module adapts it).
    pub fn is_additive(&self, name: &str) -> bool {
        self.deltas.get(name).is_none_or(|d| d.iter().all(|d| d.dora.is_none()))
    }

    /// `base` (a host tensor in PyTorch layout) plus every delta for `name`, rounded once to
    /// `dtype`; None when no delta targets `name`.
    pub fn merged(&self, name: &str, base: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        let Some(deltas) = self.deltas.get(name) else { return Ok(None) };
        let pristine: Vec<f64> = base.to_f32_vec()?.into_iter().map(f64::from).collect();
        let mut w = pristine.clone();
        for d in deltas {
            // Shapes were matched to the target when the LoRA was resolved; a mismatch here is ours.
            if let Err(why) =
                d.delta.check(base.shape()).and_then(|_| d.dora.as_ref().map_or(Ok(()), |r| r.check(base.shape())))
            {
                return Err(Error::Internal(format!(
                    "LoRA {} {why}, but the weight '{name}' it was matched to is {:?}",
                    d.source,
                    base.shape()
                )));
            }
            let values = d.delta.values(base.shape())?;
            match &d.dora {
                None => w.iter_mut().zip(values).for_each(|(w, v)| *w += d.scale * v),
                Some(dora) => {
                    let change = dora.change(&pristine, &values, d.scale, base.shape())?;
                    w.iter_mut().zip(change).for_each(|(w, c)| *w += c);
                }
            }
        }
        Ok(Some(round_to(base.shape(), dtype, &w)?))
    }
}

/// A host tensor of `values` rounded once to `dtype` (round to nearest even).
fn round_to(shape: &[usize], dtype: DType, values: &[f64]) -> Result<Tensor> {
    let mut bytes = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F16 => values.iter().for_each(|&v| bytes.extend_from_slice(&f16::from_f64(v).to_le_bytes())),
        DType::BF16 => values.iter().for_each(|&v| bytes.extend_from_slice(&bf16::from_f64(v).to_le_bytes())),
        DType::F32 => values.iter().for_each(|&v| bytes.extend_from_slice(&(v as f32).to_le_bytes())),
    }
    Tensor::from_storage(shape, dtype, Storage::Host(HostBytes::Owned(Arc::new(bytes))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_f32(shape, DType::F32, v).unwrap()
    }

    #[test]
    fn linear_delta_is_up_times_down() {
        // up [2, 1] = [1, 2]ᵀ, down [1, 3] = [1, 0, -1]
        let lr = LowRank { up: t(&[2, 1], &[1.0, 2.0]), down: t(&[1, 3], &[1.0, 0.0, -1.0]), mid: None };
        assert_eq!(lr.shape(), vec![2, 3]);
        assert_eq!(lr.delta().unwrap(), vec![1.0, 0.0, -1.0, 2.0, 0.0, -2.0]);
    }

    #[test]
    fn tucker_delta_contracts_up_mid_and_down() {
        // rank 2, in 1, out 1, kernel 1x2: ΔW[0,0,0,x] = Σ_{p,q} up[0,p] mid[p,q,0,x] down[q,0]
        let up = t(&[1, 2, 1, 1], &[1.0, 10.0]);
        let down = t(&[2, 1, 1, 1], &[2.0, 3.0]);
        let mid = t(&[2, 2, 1, 2], &[1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 2.0]);
        let lr = LowRank { up, down, mid: Some(mid) };
        assert_eq!(lr.shape(), vec![1, 1, 1, 2]);
        // x=0: p0: 1*(1*2 + 0*3) = 2; p1: 10*(0.5*2 + 0*3) = 10 -> 12
        // x=1: p0: 1*(0*2 + 1*3) = 3; p1: 10*(0*2 + 2*3) = 60 -> 63
        assert_eq!(lr.delta().unwrap(), vec![12.0, 63.0]);
    }

    #[test]
    fn loha_is_the_hadamard_product_of_two_low_rank_products() {
        // w1 = [1, 2]ᵀ [1, 1, 1, 1] and w2 = [1, -1]ᵀ [0, 1, 2, 3], on a [2, 1, 2, 2] conv weight
        let d = Delta::Hadamard([
            (t(&[2, 1], &[1.0, 2.0]), t(&[1, 4], &[1.0; 4])),
            (t(&[2, 1], &[1.0, -1.0]), t(&[1, 4], &[0.0, 1.0, 2.0, 3.0])),
        ]);
        d.check(&[2, 1, 2, 2]).unwrap();
        assert!(d.check(&[2, 2, 2, 2]).is_err());
        assert_eq!(d.values(&[2, 1, 2, 2]).unwrap(), vec![0.0, 1.0, 2.0, 3.0, 0.0, -2.0, -4.0, -6.0]);
    }

    #[test]
    fn lokr_is_the_kronecker_product_with_the_kernel_in_the_second_factor() {
        // kron([[1, 2]], W2) with W2 [2, 1, 1, 2] = [[[[1, 2]]], [[[3, 4]]]]: ΔW [2, 2, 1, 2]
        let w2 = t(&[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
        let d = Delta::Kronecker(Factor::Full(t(&[1, 2], &[1.0, 2.0])), Factor::Full(w2));
        d.check(&[2, 2, 1, 2]).unwrap();
        assert!(d.check(&[2, 2, 2, 1]).is_err(), "the kernel must be W2's");
        // ΔW[k, j, 0, x] = W1[0, j] W2[k, 0, 0, x]
        assert_eq!(d.values(&[2, 2, 1, 2]).unwrap(), vec![1.0, 2.0, 2.0, 4.0, 3.0, 4.0, 6.0, 8.0]);
        // The same W2 as a product [2, 1] · [1, 2] on a Linear: kron([[1], [2]], [[1, 2], [3, 6]])
        let w2 = Factor::Product(t(&[2, 1], &[1.0, 3.0]), t(&[1, 2], &[1.0, 2.0]));
        let d = Delta::Kronecker(Factor::Full(t(&[2, 1], &[1.0, 2.0])), w2);
        d.check(&[4, 2]).unwrap();
        assert_eq!(d.values(&[4, 2]).unwrap(), vec![1.0, 2.0, 3.0, 6.0, 2.0, 4.0, 6.0, 12.0]);
    }

    #[test]
    fn dora_rescales_w_plus_s_delta_by_the_magnitude_over_its_norm_on_either_axis() {
        // W = [[3, 0], [0, 1]], ΔW = [[0, 2], [0, 0]], s = 2: W₁ = [[3, 4], [0, 1]].
        // Output rows: norms 5 and 1; m = [10, 2] -> W'' = [[6, 8], [0, 2]], W'' − W = [[3, 8], [0, 1]].
        // Input columns: norms 3 and √17; m = [6, 2√17] -> the same W''.
        let base = [3.0, 0.0, 0.0, 1.0];
        let delta = [0.0, 2.0, 0.0, 0.0];
        let m = |v: &[f32]| t(&[v.len()], v);
        let out = Dora { magnitude: m(&[10.0, 2.0]), axis: DoraAxis::Output, eps: 0.0, blend: 1.0 };
        let inn = Dora { magnitude: m(&[6.0, 2.0 * 17f32.sqrt()]), axis: DoraAxis::Input, eps: 0.0, blend: 0.5 };
        let close = |a: Vec<f64>, b: [f64; 4]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(out.change(&base, &delta, 2.0, &[2, 2]).unwrap(), [3.0, 8.0, 0.0, 1.0]));
        assert!(close(inn.change(&base, &delta, 2.0, &[2, 2]).unwrap(), [1.5, 4.0, 0.0, 0.5]), "blend halves it");
        out.check(&[2, 2]).unwrap();
        assert!(out.check(&[3, 2]).is_err() && inn.check(&[2, 3]).is_err());
        // A convolution [out 1, in 2, 1, 2] per input column: column i holds W[0, i, 0, 0..2].
        let base = [3.0, 4.0, 0.0, 2.0];
        let conv = Dora { magnitude: m(&[1.0, 1.0]), axis: DoraAxis::Input, eps: 0.0, blend: 1.0 };
        let got = conv.change(&base, &[0.0; 4], 1.0, &[1, 2, 1, 2]).unwrap();
        assert!(close(got, [0.6 - 3.0, 0.8 - 4.0, 0.0, 1.0 - 2.0]));
    }

    #[test]
    fn merged_adds_scaled_deltas_and_rounds_once() {
        let lr = LowRank { up: t(&[1, 1], &[1.0]), down: t(&[1, 2], &[1.0, 1.0]), mid: None };
        let mut m = LoraMerge::default();
        m.add("w", Scaled { scale: 0.25, delta: Delta::LowRank(lr.clone()), source: "a".into(), dora: None });
        m.add("w", Scaled { scale: 2.0, delta: Delta::LowRank(lr), source: "b".into(), dora: None });
        let base = t(&[1, 2], &[1.0, -1.0]);
        let out = m.merged("w", &base, DType::F32).unwrap().unwrap();
        assert_eq!(out.to_f32_vec().unwrap(), vec![3.25, 1.25]);
        assert!(m.merged("other", &base, DType::F32).unwrap().is_none());
        // 1 + 3·2^-12 lies between the f16 neighbours 1 and 1 + 2^-10, nearer the second.
        let small = LowRank { up: t(&[1, 1], &[1.0]), down: t(&[1, 1], &[1.0]), mid: None };
        let mut m = LoraMerge::default();
        m.add("w", Scaled { scale: 3.0 / 4096.0, delta: Delta::LowRank(small), source: "c".into(), dora: None });
        let out = m.merged("w", &t(&[1, 1], &[1.0]), DType::F16).unwrap().unwrap();
        assert_eq!(out.dtype(), DType::F16);
        assert_eq!(out.to_f32_vec().unwrap(), vec![1.0 + 1.0 / 1024.0]);
    }
}
