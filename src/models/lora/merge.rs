//! The merge on the host: W' = W + Σᵢ sᵢ ΔWᵢ for every weight a LoRA targets, with ΔW rebuilt from
//! its factors and everything summed in f64 (each product of two f32 values is exact there), then
//! rounded once to the dtype the graph computes in. `ModelWeights` calls `LoraMerge::merged` for
//! each weight it prepares, before the conversion or upload; a device kernel that adds the deltas
//! after the upload replaces that one call.
//!
//! ΔW per format (FORMATS.md §6.1; kohya sd-scripts `networks/lora.py` `LoRAModule.merge_to`,
//! LyCORIS `lycoris/modules/locon.py`; PEFT `tuners/lora/layer.py` `get_delta_weight`):
//! - LoRA / LoCon: ΔW[o, j] = Σ_r up[o, r] down[r, j], j running over in·kh·kw (a 3x3 LoCon down
//!   keeps the target's kernel; up is 1x1).
//! - LoCon Tucker (`lora_mid` [r, r, kh, kw], down [r, in(,1,1)], up [out, r(,1,1)]):
//!   ΔW[o, i, y, x] = Σ_{p,q} up[o, p] mid[p, q, y, x] down[q, i].

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
    /// The rank: the down matrix's first dimension (FORMATS.md §6 pitfalls: never up's).
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
        let widen = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_f32_vec()?.into_iter().map(f64::from).collect()) };
        let (up, down) = (widen(&self.up)?, widen(&self.down)?);
        let (out, rank) = (self.up.shape()[0], self.rank());
        let inner = self.down.numel() / rank;
        let down = match &self.mid {
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
        };
        let cols = down.len() / rank;
        let mut delta = vec![0f64; out * cols];
        for o in 0..out {
            let row = &mut delta[o * cols..][..cols];
            for r in 0..rank {
                let u = up[o * rank + r];
                row.iter_mut().zip(&down[r * cols..][..cols]).for_each(|(w, &d)| *w += u * d);
            }
        }
        Ok(delta)
    }
}

/// A delta and its total scale: the user's strength × alpha / rank.
#[derive(Clone, Debug)]
pub struct Scaled {
    pub scale: f64,
    pub delta: LowRank,
    /// The LoRA module it comes from (`file: module`), for errors.
    pub source: String,
}

/// The deltas for one model, keyed by the graph name of the weight each adds to
/// (`down_blocks.1.attentions.0.proj_in.weight`), in the order the LoRAs were given.
#[derive(Clone, Debug, Default)]
pub struct LoraMerge {
    deltas: HashMap<String, Vec<Scaled>>,
}

impl LoraMerge {
    pub(super) fn add(&mut self, tensor: &str, delta: Scaled) {
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

    /// `base` (a host tensor in PyTorch layout) plus every delta for `name`, rounded once to
    /// `dtype`; None when no delta targets `name`.
    pub fn merged(&self, name: &str, base: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        let Some(deltas) = self.deltas.get(name) else { return Ok(None) };
        let mut w: Vec<f64> = base.to_f32_vec()?.into_iter().map(f64::from).collect();
        for d in deltas {
            // Shapes were matched to the target when the LoRA was resolved; a mismatch here is ours.
            if d.delta.shape() != base.shape() {
                return Err(Error::Internal(format!(
                    "LoRA {} has shape {:?}, but the weight '{name}' it was matched to is {:?}",
                    d.source,
                    d.delta.shape(),
                    base.shape()
                )));
            }
            w.iter_mut().zip(d.delta.delta()?).for_each(|(w, v)| *w += d.scale * v);
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
    fn merged_adds_scaled_deltas_and_rounds_once() {
        let lr = LowRank { up: t(&[1, 1], &[1.0]), down: t(&[1, 2], &[1.0, 1.0]), mid: None };
        let mut m = LoraMerge::default();
        m.add("w", Scaled { scale: 0.25, delta: lr.clone(), source: "a".into() });
        m.add("w", Scaled { scale: 2.0, delta: lr, source: "b".into() });
        let base = t(&[1, 2], &[1.0, -1.0]);
        let out = m.merged("w", &base, DType::F32).unwrap().unwrap();
        assert_eq!(out.to_f32_vec().unwrap(), vec![3.25, 1.25]);
        assert!(m.merged("other", &base, DType::F32).unwrap().is_none());
        // 1 + 3·2^-12 lies between the f16 neighbours 1 and 1 + 2^-10, nearer the second.
        let small = LowRank { up: t(&[1, 1], &[1.0]), down: t(&[1, 1], &[1.0]), mid: None };
        let mut m = LoraMerge::default();
        m.add("w", Scaled { scale: 3.0 / 4096.0, delta: small, source: "c".into() });
        let out = m.merged("w", &t(&[1, 1], &[1.0]), DType::F16).unwrap().unwrap();
        assert_eq!(out.dtype(), DType::F16);
        assert_eq!(out.to_f32_vec().unwrap(), vec![1.0 + 1.0 / 1024.0]);
    }
}
