//! Brownian-tree noise for the SDE samplers (k-diffusion `BrownianTreeNoiseSampler`, diffusers'
//! copy in `scheduling_dpmsolver_sde.py`): one Brownian motion W(σ) per run over the run's σ
//! range, and the noise of a step from σ to σ' is (W(σ') − W(σ)) / √|σ' − σ|. Because every step
//! reads the same path, a seed gives the same image whatever the step count (the increments of a
//! coarse grid are sums of the fine grid's), which per-step Gaussian noise does not.
//!
//! W is a virtual Brownian tree (Li et al. 2020, "Scalable Gradients for Stochastic Differential
//! Equations", sec. 4; torchsde's `BrownianTree`): W(σ_min) = 0, W(σ_max) = √(σ_max − σ_min)·N₁,
//! and the value at the midpoint of a node [a, b] is the Brownian bridge sample
//! (W(a) + W(b))/2 + √((b − a)/4)·N_node, with N_node drawn by the node's heap index (root 1,
//! children 2k and 2k + 1). A query descends from the root until the node is narrower than the
//! tolerance and interpolates linearly inside it, so W is a fixed function of the seed and σ,
//! whatever the order of queries. The normals come from a [`KeyedNormal`] source: the pipeline's
//! seeded counter-based generator. torchsde's own generator is not reproduced, so the values
//! differ from k-diffusion's for the same seed; the law is the same.

use super::sampler::{NoiseRequest, NoiseSource};
use crate::error::{Error, Result};

/// Standard-normal values addressed by a key: the same key always fills the same values (a
/// counter-based generator seeded once per run).
pub trait KeyedNormal {
    fn fill(&mut self, key: u64, out: &mut [f32]) -> Result<()>;
}

/// The deepest node a query visits (heap indices stay below 2^62).
const MAX_DEPTH: u32 = 61;

/// A Brownian motion over [σ_min, σ_max] for latents of `len` values, as a [`NoiseSource`].
pub struct BrownianTree<G: KeyedNormal> {
    normals: G,
    lo: f64,
    hi: f64,
    len: usize,
    tolerance: f64,
    /// W(σ_max).
    top: Vec<f64>,
    scratch: Vec<f32>,
}

impl<G: KeyedNormal> BrownianTree<G> {
    /// A tree over [sigma_min, sigma_max] (the run's smallest positive and largest σ, as
    /// k-diffusion and diffusers take them; see `Sampler::sigma_range`) for latents of `len`
    /// values. Queries are resolved to 1e-7 of the range (torchsde: tol 1e-6), far below any
    /// step.
    pub fn new(mut normals: G, sigma_min: f32, sigma_max: f32, len: usize) -> Result<Self> {
        let (lo, hi) = (sigma_min as f64, sigma_max as f64);
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo < hi) {
            return Err(Error::Input(format!(
                "Brownian tree: the σ range [{sigma_min}, {sigma_max}] must be finite, non-negative and not empty"
            )));
        }
        let mut scratch = vec![0.0f32; len];
        normals.fill(1, &mut scratch)?;
        let scale = (hi - lo).sqrt();
        let top = scratch.iter().map(|&n| scale * n as f64).collect();
        Ok(BrownianTree { normals, lo, hi, len, tolerance: (hi - lo) * 1e-7, top, scratch })
    }

    /// W(σ), σ clamped to the tree's range.
    pub fn value(&mut self, sigma: f64) -> Result<Vec<f64>> {
        let t = sigma.clamp(self.lo, self.hi);
        let (mut a, mut b) = (self.lo, self.hi);
        let mut wa = vec![0.0f64; self.len];
        let mut wb = self.top.clone();
        let mut node = 1u64;
        for _ in 0..MAX_DEPTH {
            if b - a <= self.tolerance || t == a || t == b {
                break;
            }
            let m = 0.5 * (a + b);
            self.normals.fill(node.wrapping_mul(2), &mut self.scratch)?;
            let spread = (0.25 * (b - a)).sqrt();
            let wm: Vec<f64> =
                wa.iter().zip(&wb).zip(&self.scratch).map(|((&x, &y), &n)| 0.5 * (x + y) + spread * n as f64).collect();
            if t < m {
                (b, wb, node) = (m, wm, 2 * node);
            } else {
                (a, wa, node) = (m, wm, 2 * node + 1);
            }
        }
        if t == a {
            return Ok(wa);
        }
        if t == b {
            return Ok(wb);
        }
        let f = (t - a) / (b - a);
        Ok(wa.iter().zip(&wb).map(|(&x, &y)| x + f * (y - x)).collect())
    }
}

impl<G: KeyedNormal> NoiseSource for BrownianTree<G> {
    /// (W(σ_next) − W(σ)) / √|σ_next − σ|.
    fn fill(&mut self, request: &NoiseRequest, out: &mut [f32]) -> Result<()> {
        if out.len() != self.len {
            return Err(Error::Input(format!(
                "Brownian tree for latents of {} values asked for {}",
                self.len,
                out.len()
            )));
        }
        let (s, s_next) = (request.sigma as f64, request.sigma_next as f64);
        let span = (s_next - s).abs().sqrt();
        if span == 0.0 {
            return Err(Error::Internal(format!("Brownian noise over an empty interval at σ = {s}")));
        }
        let (w, w_next) = (self.value(s)?, self.value(s_next)?);
        for ((o, &x), &y) in out.iter_mut().zip(&w).zip(&w_next) {
            *o = ((y - x) / span) as f32;
        }
        Ok(())
    }
}
