//! The training noise schedule: 1000 betas and their cumulative products (ᾱ_t), with the
//! zero-terminal-SNR rescale as an option.
//!
//! Reproduces diffusers' float32 arithmetic (the `__init__` of every scheduler in
//! `diffusers/schedulers/`, plus `rescale_zero_terminal_snr`) rather than computing in float64 as
//! SGM does: torch's CPU `linspace` (float32 start, end and step; each value
//! `start + step * i` for the first half and `end - step * (n - 1 - i)` for the second, rounded
//! once), squares, `1 - beta` and divisions in float32, and `cumprod` accumulated in float64 and
//! rounded per element (ATen's CPU cumulative kernels accumulate floats in double). The table
//! then equals diffusers' bit for bit; the difference from a float64 table is ~1e-7 relative,
//! irrelevant to images but visible to a test.

use super::{BetaSchedule, TRAIN_STEPS};

/// ᾱ_t for t = 0..999 (`alphas_cumprod`), float32 as diffusers holds it.
#[derive(Clone, Debug)]
pub struct TrainingSchedule {
    alphas_cumprod: Vec<f32>,
}

/// diffusers' Euler, Euler ancestral and DPM-Solver schedulers replace ᾱ_999 = 0 of a zero-SNR
/// table with 2^-24 so that σ_999 = √((1 − ᾱ)/ᾱ) stays finite (4096); DDIM and LCM keep 0.
pub const ZERO_SNR_TERMINAL_ALPHA_CUMPROD: f32 = 1.0 / 16_777_216.0;

impl TrainingSchedule {
    /// SDXL's "scaled_linear" betas, β_t = linspace(√β_start, √β_end, 1000)\[t\]², optionally
    /// rescaled to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
    /// Sample Steps are Flawed", Algorithm 1).
    pub fn new(beta: BetaSchedule, zero_snr: bool) -> Self {
        let (start, end) = (beta.beta_start(), beta.beta_end());
        let roots = torch_linspace_f32(start.powf(0.5) as f32, end.powf(0.5) as f32, TRAIN_STEPS);
        let mut betas: Vec<f32> = roots.iter().map(|r| r * r).collect();
        if zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        TrainingSchedule { alphas_cumprod: cumprod(&alphas) }
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The table with a zero terminal ᾱ replaced by 2^-24, as diffusers' Euler-family and
    /// DPM-Solver schedulers hold it (a no-op for tables without zero terminal SNR).
    pub fn clamped_terminal(&self) -> TrainingSchedule {
        let mut alphas_cumprod = self.alphas_cumprod.clone();
        if let Some(last) = alphas_cumprod.last_mut()
            && *last == 0.0
        {
            *last = ZERO_SNR_TERMINAL_ALPHA_CUMPROD;
        }
        TrainingSchedule { alphas_cumprod }
    }

    /// σ_t = √((1 − ᾱ_t)/ᾱ_t) per training timestep, in float32 as diffusers computes it
    /// (infinite where ᾱ_t = 0).
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| sigma_of(a)).collect()
    }
}

/// The VE noise level of ᾱ, `((1 - a) / a) ** 0.5` in float32.
pub(crate) fn sigma_of(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// torch.linspace(start, end, n, dtype=float32) on the CPU (ATen `linspace_kernel`).
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                (start as f64 + step as f64 * i as f64) as f32
            } else {
                (end as f64 - step as f64 * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// torch.cumprod on a float32 CPU tensor: a float64 running product, rounded per element.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr` (every scheduler file carries a copy), in float32:
/// shift √ᾱ so the last is 0, scale so the first is unchanged, and derive betas back.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut roots: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (roots[0], roots[roots.len() - 1]);
    let scale = first / (first - last);
    for r in roots.iter_mut() {
        *r -= last;
        *r *= scale;
    }
    let bars: Vec<f32> = roots.iter().map(|r| r * r).collect();
    let mut out = Vec::with_capacity(bars.len());
    out.push(1.0 - bars[0]);
    out.extend(bars.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}
