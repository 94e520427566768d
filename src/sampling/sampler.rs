//! The samplers: a run's timestep and σ grid (diffusers' `set_timesteps`), and each model
//! evaluation's update (diffusers' `step`) as scalars applied element-wise.
//!
//! Conventions (diffusers' own): VE space x = x₀ + σ·ε for Euler, Euler
//! ancestral and DPM++ SDE (the latent starts at noise × `init_noise_sigma`, the UNet sees
//! x / √(σ² + 1)); VP space x = α·x₀ + s·ε with α = √ᾱ, s = √(1 − ᾱ) for DDIM, LCM and the
//! DPM-Solver multistep family (the latent starts as plain noise, the UNet sees it unscaled). Both
//! describe the same noise level, σ = s / α.

use super::grid::{arange, interp, linspace, round};
use super::table::{TrainingSchedule, sigma_of};
use super::{LCM_ORIGINAL_STEPS, Prediction, SamplerConfig, SamplerKind, Spacing, TRAIN_STEPS};
use crate::error::{Error, Result};

/// One request for noise: which model evaluation of the run (0-based, counted from the first
/// evaluation after img2img strength) and the σ interval (VE) it spans.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseRequest {
    pub evaluation: usize,
    pub sigma: f32,
    pub sigma_next: f32,
}

/// Where stochastic samplers take their noise: each call fills `out` (the latent's length) with
/// standard-normal values for one request. A closure `FnMut(&NoiseRequest, &mut [f32]) ->
/// Result<()>` is one.
pub trait NoiseSource {
    fn fill(&mut self, request: &NoiseRequest, out: &mut [f32]) -> Result<()>;
}

impl<F: FnMut(&NoiseRequest, &mut [f32]) -> Result<()>> NoiseSource for F {
    fn fill(&mut self, request: &NoiseRequest, out: &mut [f32]) -> Result<()> {
        self(request, out)
    }
}

/// A noise source for deterministic samplers: asking it for noise is an internal error.
pub fn no_noise() -> impl NoiseSource {
    |request: &NoiseRequest, _: &mut [f32]| -> Result<()> {
        Err(Error::Internal(format!(
            "a deterministic sampling run asked for noise (evaluation {})",
            request.evaluation
        )))
    }
}

/// What the history buffer holds after an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    Unchanged,
    /// x̂₀ of this evaluation (DPM-Solver multistep: the previous data prediction).
    Denoised,
    /// The latent before this update (DPM++ SDE: the step's start for its second stage).
    Sample,
}

/// One model evaluation's update, every sampler's `step` reduced to scalars (float64 on the host,
/// rounded to f32 as a kernel takes them):
/// ```text
/// d      = denoised_x·x + denoised_m·m                       (x̂₀; LCM: the boundary-scaled one)
/// x_next = next_x·x + next_m·m + next_denoised·d + next_aux·aux + next_noise·z
/// aux    = d, x or unchanged (`keep`)
/// ```
/// with x the latent, m the model output, aux the one history buffer and z standard-normal noise
/// (drawn only when `noise` is a request).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Update {
    pub denoised_x: f32,
    pub denoised_m: f32,
    pub next_x: f32,
    pub next_m: f32,
    pub next_denoised: f32,
    pub next_aux: f32,
    pub next_noise: f32,
    pub keep: Keep,
    pub noise: Option<NoiseRequest>,
}

impl Update {
    fn new() -> Self {
        Update {
            denoised_x: 0.0,
            denoised_m: 0.0,
            next_x: 0.0,
            next_m: 0.0,
            next_denoised: 0.0,
            next_aux: 0.0,
            next_noise: 0.0,
            keep: Keep::Unchanged,
            noise: None,
        }
    }

    /// The element-wise pass (the CPU twin of the sampler kernel). `noise` is required exactly
    /// when `self.noise` is a request; every slice has the latent's length.
    pub fn apply(&self, x: &mut [f32], model_output: &[f32], aux: &mut [f32], noise: Option<&[f32]>) -> Result<()> {
        let n = x.len();
        if model_output.len() != n || aux.len() != n || noise.is_some_and(|z| z.len() != n) {
            return Err(Error::Input(format!(
                "sampler update: latent of {n}, model output of {}, history of {} and noise of {} values differ",
                model_output.len(),
                aux.len(),
                noise.map_or(0, <[f32]>::len)
            )));
        }
        if noise.is_some() != self.noise.is_some() {
            return Err(Error::Internal(format!(
                "sampler update: noise {} where the update {} it",
                if noise.is_some() { "given" } else { "missing" },
                if self.noise.is_some() { "needs" } else { "takes no" }
            )));
        }
        for k in 0..n {
            let (xv, mv) = (x[k], model_output[k]);
            let d = self.denoised_x * xv + self.denoised_m * mv;
            let mut next = self.next_x * xv + self.next_m * mv + self.next_denoised * d + self.next_aux * aux[k];
            if let Some(z) = noise {
                next += self.next_noise * z[k];
            }
            match self.keep {
                Keep::Unchanged => {}
                Keep::Denoised => aux[k] = d,
                Keep::Sample => aux[k] = xv,
            }
            x[k] = next;
        }
        Ok(())
    }
}

/// A sampling run: its grid, and its state between model evaluations (the history buffer).
///
/// ```text
/// let mut s = Sampler::new(&config)?;
/// x = noise · s.init_noise_sigma()            // or s.add_noise(image, noise, &mut x) for img2img
/// for i in 0..s.evaluations() {
///     m = unet(x · s.model_input_scale(i)?, s.timesteps()[i])
///     s.step(&m, &mut x, &mut noise_source)?  // evaluation i
/// }
/// ```
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplerConfig,
    /// ᾱ as this scheduler holds it (zero-SNR terminal clamped for the Euler and DPM families).
    alphas_cumprod: Vec<f32>,
    /// The UNet timestep of every model evaluation of the full schedule (before strength).
    timesteps: Vec<f32>,
    /// Step boundaries (VE σ), steps + 1, of the full schedule.
    sigmas: Vec<f32>,
    /// DPM++ SDE: the σ of each step's midpoint evaluation.
    mid_sigmas: Vec<f32>,
    /// DDIM: the timestep each step lands on (-1: ᾱ₀, diffusers' final_alpha_cumprod with
    /// set_alpha_to_one false as in SDXL's config).
    ddim_prev: Vec<i64>,
    /// Steps of the full schedule (diffusers' num_inference_steps).
    full_steps: usize,
    /// The first step and first evaluation run (img2img strength).
    begin_step: usize,
    begin_eval: usize,
    init_noise_sigma: f32,
    /// Next evaluation to run, relative to begin_eval.
    next: usize,
    aux: Vec<f32>,
    noise: Vec<f32>,
}

impl Sampler {
    /// Builds the run's grid; refuses inconsistent options and grids outside the trained range.
    pub fn new(config: &SamplerConfig) -> Result<Self> {
        config.validate()?;
        let base = TrainingSchedule::new(config.beta_schedule, config.zero_snr);
        let table = match config.kind {
            SamplerKind::Ddim | SamplerKind::Lcm | SamplerKind::Tcd => base,
            _ => base.clamped_terminal(),
        };
        let n = config.steps;
        let mut sampler = Sampler {
            config: config.clone(),
            alphas_cumprod: table.alphas_cumprod().to_vec(),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            mid_sigmas: Vec::new(),
            ddim_prev: Vec::new(),
            full_steps: n,
            begin_step: 0,
            begin_eval: 0,
            init_noise_sigma: 1.0,
            next: 0,
            aux: Vec::new(),
            noise: Vec::new(),
        };
        let table_sigmas = table.sigmas();
        match config.kind {
            SamplerKind::Lcm | SamplerKind::Tcd => sampler.build_distilled(),
            SamplerKind::Ddim => sampler.build_ddim(),
            SamplerKind::Euler | SamplerKind::EulerAncestral => sampler.build_euler(&table_sigmas),
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde => sampler.build_dpm(&table_sigmas),
            SamplerKind::DpmPpSde => sampler.build_dpm_sde(&table_sigmas),
        }
        sampler.check_grid()?;
        // img2img strength (StableDiffusionXLImg2ImgPipeline.get_timesteps); LCM and TCD took it
        // in their grid.
        if !config.kind.uses_distillation_grid() {
            let run = ((n as f64 * config.strength) as usize).min(n);
            sampler.begin_step = n - run;
            sampler.begin_eval =
                if config.kind == SamplerKind::DpmPpSde { 2 * sampler.begin_step } else { sampler.begin_step };
        }
        Ok(sampler)
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// The UNet timestep of each model evaluation of this run (DPM++ SDE: 2 per step but the
    /// last, midpoints interleaved).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps[self.begin_eval..]
    }

    /// The number of model evaluations of this run.
    pub fn evaluations(&self) -> usize {
        self.timesteps.len() - self.begin_eval
    }

    /// The steps' noise levels (VE σ): one per step plus where the last step lands (0, or for
    /// DDIM the σ of ᾱ₀). DDIM and LCM give σ(ᾱ_t) at each step's timestep.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas[self.begin_step..]
    }

    /// The run's smallest positive and largest σ, the span of its Brownian tree (k-diffusion and
    /// diffusers take `sigmas[sigmas > 0].min()` and `sigmas.max()`); infinite for zero-SNR DDIM,
    /// LCM and TCD, which take plain noise.
    pub fn sigma_range(&self) -> (f32, f32) {
        let sigmas = self.sigmas();
        let min = sigmas.iter().copied().filter(|&s| s > 0.0).fold(f32::INFINITY, f32::min);
        let max = sigmas.iter().copied().fold(0.0f32, f32::max);
        (min, max)
    }

    /// What the initial noise is multiplied by (a full-strength run starts at noise × this).
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// ᾱ_t, t = 0..999, as this sampler uses it.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The factor the latent is multiplied by before the UNet at evaluation `i` (diffusers'
    /// `scale_model_input`: 1/√(σ² + 1) in VE space, 1 in VP space).
    pub fn model_input_scale(&self, i: usize) -> Result<f32> {
        self.check_evaluation(i)?;
        let e = self.begin_eval + i;
        let sigma = match self.config.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => self.sigmas[e] as f64,
            SamplerKind::DpmPpSde if e.is_multiple_of(2) => self.sigmas[e / 2] as f64,
            SamplerKind::DpmPpSde => self.mid_sigmas[e / 2] as f64,
            _ => return Ok(1.0),
        };
        Ok((1.0 / (sigma * sigma + 1.0).sqrt()) as f32)
    }

    fn check_evaluation(&self, i: usize) -> Result<()> {
        if i >= self.evaluations() {
            return Err(Error::Input(format!(
                "{}: evaluation {i} asked of a run of {}",
                self.config.kind,
                self.evaluations()
            )));
        }
        Ok(())
    }

    /// LCM's boundary-condition scalings (c_skip, c_out) per step of the run
    /// (`LCMScheduler.get_scalings_for_boundary_condition_discrete`, timestep_scaling 10,
    /// σ_data 0.5): c_skip = σ_d² / (τ² + σ_d²), c_out = τ / √(τ² + σ_d²), τ = 10·t.
    pub fn lcm_scalings(&self) -> Option<Vec<(f32, f32)>> {
        (self.config.kind == SamplerKind::Lcm).then(|| {
            self.timesteps().iter().map(|&t| lcm_scalings(t as f64)).map(|(s, o)| (s as f32, o as f32)).collect()
        })
    }

    /// TCD's intermediate timestep s per step of the run, s = floor((1 − γ)·t_next) (t_next = 0
    /// after the last step; TCDScheduler.step computes it in float32).
    pub fn tcd_s_timesteps(&self) -> Option<Vec<i64>> {
        (self.config.kind == SamplerKind::Tcd)
            .then(|| (self.begin_eval..self.timesteps.len()).map(|e| self.tcd_s(e) as i64).collect())
    }

    /// DDIM's target timestep per step of the run (-1: ᾱ₀).
    pub fn ddim_prev_timesteps(&self) -> Option<&[i64]> {
        (self.config.kind == SamplerKind::Ddim).then(|| &self.ddim_prev[self.begin_step..])
    }

    /// The index of the next evaluation `step` runs.
    pub fn position(&self) -> usize {
        self.next
    }

    /// img2img / segment chaining: noises `original` (clean latents) to the run's first noise
    /// level into `out` (diffusers' `add_noise` at the first timestep: x₀ + σ·ε in VE space,
    /// α·x₀ + s·ε in VP space).
    pub fn add_noise(&self, original: &[f32], noise: &[f32], out: &mut [f32]) -> Result<()> {
        if original.len() != noise.len() || original.len() != out.len() {
            return Err(Error::Input(format!(
                "add_noise: latents of {}, noise of {} and output of {} values differ",
                original.len(),
                noise.len(),
                out.len()
            )));
        }
        let (a, s) = match self.config.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral | SamplerKind::DpmPpSde => {
                (1.0f32, self.sigmas[self.begin_step])
            }
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde => {
                let (alpha, s) = vp_of_sigma(self.sigmas[self.begin_step] as f64);
                (alpha as f32, s as f32)
            }
            SamplerKind::Ddim | SamplerKind::Lcm | SamplerKind::Tcd => {
                let abar = self.abar(self.timesteps[self.begin_eval] as f64);
                (abar.sqrt(), (1.0 - abar).sqrt())
            }
        };
        for ((o, &x0), &z) in out.iter_mut().zip(original).zip(noise) {
            *o = a * x0 + s * z;
        }
        Ok(())
    }

    /// The update of evaluation `i` of the run.
    pub fn update(&self, i: usize) -> Result<Update> {
        self.check_evaluation(i)?;
        let e = self.begin_eval + i;
        let mut u = Update::new();
        match self.config.kind {
            SamplerKind::Lcm => self.update_lcm(e, &mut u),
            SamplerKind::Tcd => self.update_tcd(e, &mut u),
            SamplerKind::Ddim => self.update_ddim(e, &mut u),
            SamplerKind::Euler | SamplerKind::EulerAncestral => self.update_euler(e, &mut u),
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde => self.update_dpm(e, i > 0, &mut u),
            SamplerKind::DpmPpSde => self.update_dpm_sde(e, &mut u),
        }
        if let Some(request) = u.noise.as_mut() {
            request.evaluation = i;
        }
        Ok(u)
    }

    /// Runs the next evaluation's update on `sample` in place, given the model's output for it.
    pub fn step(&mut self, model_output: &[f32], sample: &mut [f32], noise: &mut dyn NoiseSource) -> Result<()> {
        if model_output.len() != sample.len() {
            return Err(Error::Input(format!(
                "{} step: model output of {} values for a latent of {}",
                self.config.kind,
                model_output.len(),
                sample.len()
            )));
        }
        if self.next == 0 {
            self.aux = vec![0.0; sample.len()];
        } else if self.aux.len() != sample.len() {
            return Err(Error::Input(format!(
                "{} step: a latent of {} values in a run begun with {}",
                self.config.kind,
                sample.len(),
                self.aux.len()
            )));
        }
        let u = self.update(self.next)?;
        let z = match &u.noise {
            Some(request) => {
                self.noise.resize(sample.len(), 0.0);
                noise.fill(request, &mut self.noise)?;
                Some(&self.noise[..])
            }
            None => None,
        };
        u.apply(sample, model_output, &mut self.aux, z)?;
        self.next += 1;
        Ok(())
    }

    // ---- grids (diffusers' set_timesteps) -------------------------------------------------------

    /// LCMScheduler.set_timesteps (TCDScheduler's is the same): the distillation grid
    /// (1..=int(50·strength))·20 − 1, reversed, indexed at floor(linspace(0, len, N,
    /// endpoint=False)). σ: at each timestep, then 0 (LCM returns x̂₀) or σ(ᾱ₀) (TCD lands on t = 0).
    fn build_distilled(&mut self) {
        let k = TRAIN_STEPS / LCM_ORIGINAL_STEPS;
        let len = (LCM_ORIGINAL_STEPS as f64 * self.config.strength) as usize;
        let origin: Vec<usize> = (1..=len).rev().map(|i| i * k - 1).collect();
        let picks = linspace(0.0, origin.len() as f64, self.config.steps, false);
        self.timesteps = picks.iter().map(|&p| origin[p.floor() as usize] as f32).collect();
        self.sigmas = self.timesteps.iter().map(|&t| sigma_of(self.abar(t as f64))).collect();
        self.sigmas.push(if self.config.kind == SamplerKind::Tcd { sigma_of(self.alphas_cumprod[0]) } else { 0.0 });
    }

    /// DDIMScheduler.set_timesteps (integer timesteps) and the target of each step,
    /// t − 1000 // N (ᾱ₀ below 0).
    fn build_ddim(&mut self) {
        let n = self.config.steps;
        let ts: Vec<f64> = match self.config.spacing() {
            Spacing::Linspace => {
                linspace(0.0, (TRAIN_STEPS - 1) as f64, n, true).iter().rev().map(|&t| round(t)).collect()
            }
            spacing => euler_spacing(spacing, n),
        };
        let ratio = (TRAIN_STEPS / n) as i64;
        self.ddim_prev = ts.iter().map(|&t| (t as i64 - ratio).max(-1)).collect();
        self.timesteps = ts.iter().map(|&t| t as f32).collect();
        self.sigmas = ts.iter().map(|&t| sigma_of(self.abar(t))).collect();
        let last = *self.ddim_prev.last().unwrap_or(&-1);
        self.sigmas.push(sigma_of(self.abar_prev(last)));
    }

    /// EulerDiscreteScheduler / EulerAncestralDiscreteScheduler.set_timesteps: float32 timesteps,
    /// σ interpolated over the table at them; Karras (Euler only) spans the interpolated range
    /// and maps each σ back to a fractional timestep.
    fn build_euler(&mut self, table_sigmas: &[f32]) {
        let n = self.config.steps;
        let ts: Vec<f32> = match self.config.spacing() {
            Spacing::Linspace => {
                linspace(0.0, (TRAIN_STEPS - 1) as f64, n, true).iter().rev().map(|&t| t as f32).collect()
            }
            spacing => euler_spacing(spacing, n).iter().map(|&t| t as f32).collect(),
        };
        let mut sig: Vec<f64> = ts.iter().map(|&t| interp(t as f64, table_sigmas)).collect();
        self.timesteps = ts;
        if self.config.karras {
            let log_sigmas = log_f32(table_sigmas);
            sig = karras(sig[sig.len() - 1], sig[0], n);
            self.timesteps = sig.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect();
        }
        self.sigmas = sig.iter().map(|&s| s as f32).collect();
        self.sigmas.push(0.0);
        self.init_noise_sigma = self.ve_init_noise_sigma();
    }

    /// DPMSolverMultistepScheduler.set_timesteps: integer timesteps from its own spacing rules
    /// (leading divides by N + 1); Karras spans the whole table and rounds the timesteps.
    fn build_dpm(&mut self, table_sigmas: &[f32]) {
        let n = self.config.steps;
        let ts: Vec<f64> = match self.config.spacing() {
            Spacing::Linspace => {
                let grid = linspace(0.0, (TRAIN_STEPS - 1) as f64, n + 1, true);
                grid.iter().rev().take(n).map(|&t| round(t)).collect()
            }
            Spacing::Leading => {
                let ratio = TRAIN_STEPS / (n + 1);
                (0..=n).rev().take(n).map(|i| (i * ratio) as f64 + 1.0).collect()
            }
            Spacing::Trailing => euler_spacing(Spacing::Trailing, n),
        };
        if self.config.karras {
            let log_sigmas = log_f32(table_sigmas);
            let sig = karras(table_sigmas[0] as f64, table_sigmas[TRAIN_STEPS - 1] as f64, n);
            self.timesteps = sig.iter().map(|&s| round(sigma_to_t(s, &log_sigmas)) as f32).collect();
            self.sigmas = sig.iter().map(|&s| s as f32).collect();
        } else {
            self.timesteps = ts.iter().map(|&t| t as f32).collect();
            self.sigmas = ts.iter().map(|&t| interp(t, table_sigmas) as f32).collect();
        }
        self.sigmas.push(0.0);
    }

    /// DPMSolverSDEScheduler.set_timesteps: float64 timesteps, σ interpolated (Karras over the
    /// interpolated range), and a midpoint evaluation between consecutive σ at
    /// exp(−(t + t_next)/2) in t = −ln σ, interleaved: t₀, mid₀, t₁, mid₁, ..., t_{N−1}.
    fn build_dpm_sde(&mut self, table_sigmas: &[f32]) {
        let n = self.config.steps;
        let mut ts: Vec<f64> = match self.config.spacing() {
            Spacing::Linspace => linspace(0.0, (TRAIN_STEPS - 1) as f64, n, true).into_iter().rev().collect(),
            spacing => euler_spacing(spacing, n),
        };
        let log_sigmas = log_f32(table_sigmas);
        let mut sig: Vec<f64> = ts.iter().map(|&t| interp(t, table_sigmas)).collect();
        if self.config.karras {
            sig = karras(sig[sig.len() - 1], sig[0], n);
            ts = sig.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let mids: Vec<f64> = sig
            .windows(2)
            .map(|w| {
                let (t, t_next) = (-w[0].ln(), -w[1].ln());
                sigma_to_t((-(t + (t_next - t) * 0.5)).exp(), &log_sigmas)
            })
            .collect();
        self.timesteps = Vec::with_capacity(2 * n - 1);
        for (i, &t) in ts.iter().enumerate() {
            if i > 0 {
                self.timesteps.push(mids[i - 1] as f32);
            }
            self.timesteps.push(t as f32);
        }
        self.sigmas = sig.iter().map(|&s| s as f32).collect();
        self.sigmas.push(0.0);
        // The σ the midpoint evaluation sees, from the float32 σ as the step computes it.
        self.mid_sigmas = self.sigmas.windows(2).map(|w| midpoint_sigma(w[0] as f64, w[1] as f64) as f32).collect();
        self.init_noise_sigma = self.ve_init_noise_sigma();
    }

    /// Euler-family init_noise_sigma: σ_max for linspace and trailing, √(σ_max² + 1) for leading
    /// (float32, over the full schedule).
    fn ve_init_noise_sigma(&self) -> f32 {
        let max = self.sigmas.iter().copied().fold(0.0f32, f32::max);
        if self.config.spacing() == Spacing::Leading { (max * max + 1.0).sqrt() } else { max }
    }

    /// Refuses grids outside the trained timesteps or with a repeated noise level.
    fn check_grid(&self) -> Result<()> {
        let c = &self.config;
        let setting = match c.kind {
            SamplerKind::Lcm | SamplerKind::Tcd => format!("{} with {} steps", c.kind, c.steps),
            kind => format!(
                "{kind} with {} spacing{} and {} steps",
                c.spacing().name(),
                if c.karras { ", Karras sigmas" } else { "" },
                c.steps
            ),
        };
        if let Some(t) = self.timesteps.iter().find(|&&t| !(0.0..=(TRAIN_STEPS - 1) as f32).contains(&t)) {
            return Err(Error::Input(format!(
                "{setting} gives timestep {t}, outside the trained 0..{}; use another spacing or fewer steps",
                TRAIN_STEPS - 1
            )));
        }
        // The DPM-Solvers divide by the step in λ = −ln σ; the others only need no ascent.
        let strict = matches!(c.kind, SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde);
        let descends = |w: &[f32]| if strict { w[1] < w[0] } else { w[1] <= w[0] };
        if let Some(w) = self.sigmas.windows(2).find(|w| !descends(w)) {
            return Err(Error::Input(format!(
                "{setting} repeats the noise level {} (the steps do not descend); use another spacing or fewer steps",
                w[0]
            )));
        }
        Ok(())
    }

    /// ᾱ at an integer timestep (clamped to the table; `check_grid` refuses grids outside it).
    fn abar(&self, t: f64) -> f32 {
        self.alphas_cumprod[(t.max(0.0) as usize).min(TRAIN_STEPS - 1)]
    }

    /// ᾱ of a DDIM target: the table, or ᾱ₀ for -1 (final_alpha_cumprod, set_alpha_to_one false).
    fn abar_prev(&self, prev: i64) -> f32 {
        self.abar(prev.max(0) as f64)
    }

    // ---- updates (diffusers' step) ----------------------------------------------------------

    /// LCMScheduler.step: x̂₀ at ᾱ_t, denoised = c_out·x̂₀ + c_skip·x; then, except on the last
    /// step, re-noise to the next timestep: √ᾱ'·denoised + √(1 − ᾱ')·z; the last returns denoised.
    fn update_lcm(&self, e: usize, u: &mut Update) {
        let t = self.timesteps[e] as f64;
        let abar = self.abar(t) as f64;
        let (a, b) = vp_denoise(self.config.prediction, abar.sqrt(), (1.0 - abar).sqrt());
        let (c_skip, c_out) = lcm_scalings(t);
        u.denoised_x = (c_out * a + c_skip) as f32;
        u.denoised_m = (c_out * b) as f32;
        if e + 1 == self.timesteps.len() {
            u.next_denoised = 1.0;
            return;
        }
        let t_next = self.timesteps[e + 1] as f64;
        let abar_next = self.abar(t_next) as f64;
        u.next_denoised = abar_next.sqrt() as f32;
        u.next_noise = (1.0 - abar_next).sqrt() as f32;
        u.noise =
            Some(NoiseRequest { evaluation: 0, sigma: sigma_of(abar as f32), sigma_next: sigma_of(abar_next as f32) });
    }

    /// TCD's s for evaluation e: floor((1 − γ)·t_next) with float32 operands, as
    /// `torch.floor((1 - eta) * prev_timestep)` on an integer tensor computes it.
    fn tcd_s(&self, e: usize) -> f64 {
        let t_next = self.timesteps.get(e + 1).copied().unwrap_or(0.0);
        ((1.0 - self.config.eta()) as f32 * t_next).floor() as f64
    }

    /// TCDScheduler.step: x̂₀ and ε̂ at ᾱ_t, then x_s = √ᾱ_s·x̂₀ + √(1 − ᾱ_s)·ε̂ at s (above); for
    /// γ > 0 and every step but the last, re-noise to the next timestep:
    /// √(ᾱ'/ᾱ_s)·x_s + √(1 − ᾱ'/ᾱ_s)·z; otherwise x_s is the result (the last step lands on t = 0).
    fn update_tcd(&self, e: usize, u: &mut Update) {
        let t = self.timesteps[e] as f64;
        let abar = self.abar(t) as f64;
        let (alpha, s) = (abar.sqrt(), (1.0 - abar).sqrt());
        let (a, b) = vp_denoise(self.config.prediction, alpha, s);
        u.denoised_x = a as f32;
        u.denoised_m = b as f32;
        let abar_s = self.abar(self.tcd_s(e)) as f64;
        let last = e + 1 == self.timesteps.len();
        let mut scale = 1.0;
        if self.config.eta() > 0.0 && !last {
            let abar_next = self.abar(self.timesteps[e + 1] as f64) as f64;
            scale = (abar_next / abar_s).sqrt();
            u.next_noise = (1.0 - abar_next / abar_s).sqrt() as f32;
            u.noise = Some(NoiseRequest {
                evaluation: 0,
                sigma: sigma_of(abar as f32),
                sigma_next: sigma_of(abar_next as f32),
            });
        }
        u.next_denoised = (scale * abar_s.sqrt()) as f32;
        let direction = scale * (1.0 - abar_s).sqrt();
        match self.config.prediction {
            Prediction::Epsilon => u.next_m = direction as f32,
            Prediction::VPrediction => {
                u.next_m = (direction * alpha) as f32;
                u.next_x = (direction * s) as f32;
            }
        }
    }

    /// DDIMScheduler.step with η = 0: x_prev = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev)·ε̂.
    fn update_ddim(&self, e: usize, u: &mut Update) {
        let abar = self.abar(self.timesteps[e] as f64) as f64;
        let abar_prev = self.abar_prev(self.ddim_prev[e]) as f64;
        let (alpha, s) = (abar.sqrt(), (1.0 - abar).sqrt());
        let (a, b) = vp_denoise(self.config.prediction, alpha, s);
        u.denoised_x = a as f32;
        u.denoised_m = b as f32;
        u.next_denoised = abar_prev.sqrt() as f32;
        let direction = (1.0 - abar_prev).sqrt();
        match self.config.prediction {
            // ε̂ = m
            Prediction::Epsilon => u.next_m = direction as f32,
            // ε̂ = α·m + s·x
            Prediction::VPrediction => {
                u.next_m = (direction * alpha) as f32;
                u.next_x = (direction * s) as f32;
            }
        }
    }

    /// EulerDiscreteScheduler.step (s_churn 0): x + (x − x̂₀)/σ·(σ_next − σ).
    /// EulerAncestralDiscreteScheduler.step: the same to σ_down, plus σ_up·z, with
    /// σ_up = √(σ_next²(σ² − σ_next²)/σ²), σ_down = √(σ_next² − σ_up²).
    fn update_euler(&self, e: usize, u: &mut Update) {
        let (sigma, sigma_next) = (self.sigmas[e] as f64, self.sigmas[e + 1] as f64);
        let (a, b) = ve_denoise(self.config.prediction, sigma);
        u.denoised_x = a as f32;
        u.denoised_m = b as f32;
        let target = if self.config.kind == SamplerKind::EulerAncestral {
            let up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma)).sqrt();
            if up > 0.0 {
                u.next_noise = up as f32;
                u.noise = Some(NoiseRequest { evaluation: 0, sigma: sigma as f32, sigma_next: sigma_next as f32 });
            }
            (sigma_next * sigma_next - up * up).sqrt()
        } else {
            sigma_next
        };
        u.next_x = (target / sigma) as f32;
        u.next_denoised = ((sigma - target) / sigma) as f32;
    }

    /// DPMSolverMultistepScheduler.step, dpmsolver++ / sde-dpmsolver++, order 2, midpoint,
    /// lower_order_final, final σ 0 (VP space, λ = −ln σ, h = λ_next − λ):
    /// first order  x' = (s'/s)·x + α'(1 − e^{−h})·D₀                       (dpmsolver++)
    ///              x' = (s'/s)e^{−h}·x + α'(1 − e^{−2h})·D₀ + s'√(1 − e^{−2h})·z  (sde)
    /// second order adds ½·(same coefficient)·D₁ with D₁ = (D₀ − D_prev)/r, r = h_prev/h.
    /// The first step of a run and the last step are first order.
    fn update_dpm(&self, e: usize, history: bool, u: &mut Update) {
        let (sigma, sigma_next) = (self.sigmas[e] as f64, self.sigmas[e + 1] as f64);
        let (alpha, s) = vp_of_sigma(sigma);
        let (a, b) = vp_denoise(self.config.prediction, alpha, s);
        u.denoised_x = a as f32;
        u.denoised_m = b as f32;
        u.keep = Keep::Denoised;
        if sigma_next == 0.0 {
            // λ_next = ∞: every form reduces to x' = D₀.
            u.next_denoised = 1.0;
            return;
        }
        let sde = self.config.kind == SamplerKind::DpmPp2mSde;
        let (alpha_next, s_next) = vp_of_sigma(sigma_next);
        let h = sigma.ln() - sigma_next.ln();
        let (x_coef, d_coef) = if sde {
            ((s_next / s) * (-h).exp(), alpha_next * -(-2.0 * h).exp_m1())
        } else {
            (s_next / s, alpha_next * -(-h).exp_m1())
        };
        u.next_x = x_coef as f32;
        let last = e + 1 == self.full_steps;
        if history && !last {
            let h_prev = (self.sigmas[e - 1] as f64).ln() - sigma.ln();
            let r = h_prev / h;
            u.next_denoised = (d_coef * (1.0 + 0.5 / r)) as f32;
            u.next_aux = (-d_coef * 0.5 / r) as f32;
        } else {
            u.next_denoised = d_coef as f32;
        }
        if sde {
            u.next_noise = (s_next * (-(-2.0 * h).exp_m1()).sqrt()) as f32;
            u.noise = Some(NoiseRequest { evaluation: 0, sigma: sigma as f32, sigma_next: sigma_next as f32 });
        }
    }

    /// DPMSolverSDEScheduler.step (k-diffusion sample_dpmpp_sde, r = ½, η = 1): stage 1 at σ
    /// takes an ancestral step to the midpoint σ_mid = √(σ·σ_next) (keeping x); stage 2 at σ_mid
    /// takes the ancestral step from the kept x to σ_next with the midpoint's x̂₀. Each ancestral
    /// step to σ_to: σ_up = min(σ_to, √(σ_to²(σ² − σ_to²)/σ²)), σ_down = √(σ_to² − σ_up²),
    /// x' = (σ_down/σ)·x − expm1(ln σ_down − ln σ)·x̂₀ + σ_up·z. The last step (σ_next = 0) is
    /// one Euler evaluation.
    fn update_dpm_sde(&self, e: usize, u: &mut Update) {
        let j = e / 2;
        let (sigma, sigma_next) = (self.sigmas[j] as f64, self.sigmas[j + 1] as f64);
        let second = e % 2 == 1;
        let sigma_input = if second { self.mid_sigmas[j] as f64 } else { sigma };
        let (a, b) = ve_denoise(self.config.prediction, sigma_input);
        u.denoised_x = a as f32;
        u.denoised_m = b as f32;
        if sigma_next == 0.0 {
            u.next_denoised = 1.0;
            return;
        }
        let sigma_to = if second { sigma_next } else { midpoint_sigma(sigma, sigma_next) };
        let up = sigma_to.min((sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt());
        let down = (sigma_to * sigma_to - up * up).sqrt();
        let keep_coef = (down / sigma) as f32;
        u.next_denoised = (-(down.ln() - sigma.ln()).exp_m1()) as f32;
        if second {
            u.next_aux = keep_coef;
        } else {
            u.next_x = keep_coef;
            u.keep = Keep::Sample;
        }
        if up > 0.0 {
            u.next_noise = up as f32;
            u.noise = Some(NoiseRequest { evaluation: 0, sigma: sigma as f32, sigma_next: sigma_to as f32 });
        }
    }
}

/// Timesteps of the Euler/DDIM family's leading and trailing spacing (the same formula in
/// EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler, DPMSolverSDEScheduler;
/// DPMSolverMultistepScheduler shares trailing): leading (0..N)·(1000 // N) reversed + 1
/// (steps_offset); trailing round(arange(1000, 0, −1000/N)) − 1, first N values.
fn euler_spacing(spacing: Spacing, n: usize) -> Vec<f64> {
    match spacing {
        Spacing::Leading => {
            let ratio = TRAIN_STEPS / n;
            (0..n).rev().map(|i| (i * ratio) as f64 + 1.0).collect()
        }
        Spacing::Trailing => {
            let grid = arange(TRAIN_STEPS as f64, 0.0, -(TRAIN_STEPS as f64 / n as f64));
            grid.iter().take(n).map(|&t| round(t) - 1.0).collect()
        }
        Spacing::Linspace => linspace(0.0, (TRAIN_STEPS - 1) as f64, n, true).into_iter().rev().collect(),
    }
}

/// Karras et al. 2022 (eq. 5), ρ = 7: (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ
/// (diffusers `_convert_to_karras`).
fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n, true).iter().map(|&r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// `np.log` of a float32 table (float32 results).
fn log_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| (v as f64).ln() as f32).collect()
}

/// diffusers `_sigma_to_t`: the fractional timestep whose log σ interpolates linearly to
/// log(σ) between the two table entries around it (clamped to the table's ends). The
/// difference `low − high` is a float32 subtraction there, as here.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // np.cumsum(dists >= 0).argmax(), clipped to len − 2. σ grows with t (every β > 0), so the
    // entries at or below log σ are a prefix and the argmax is its last index (0 if empty).
    let count = log_sigmas.partition_point(|&l| log_sigma - l as f64 >= 0.0);
    let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// DPM++ SDE's midpoint in t = −ln σ: exp(−(t + (t_next − t)·½)).
fn midpoint_sigma(sigma: f64, sigma_next: f64) -> f64 {
    let (t, t_next) = (-sigma.ln(), -sigma_next.ln());
    (-(t + (t_next - t) * 0.5)).exp()
}

/// LCM's boundary-condition scalings at discrete timestep t.
fn lcm_scalings(t: f64) -> (f64, f64) {
    let sigma_data = 0.5f64;
    let tau = t * 10.0;
    let c_skip = sigma_data * sigma_data / (tau * tau + sigma_data * sigma_data);
    let c_out = tau / (tau * tau + sigma_data * sigma_data).sqrt();
    (c_skip, c_out)
}

/// VP scales of a VE σ (DPMSolverMultistepScheduler `_sigma_to_alpha_sigma_t`):
/// α = 1/√(σ² + 1), s = σ·α.
fn vp_of_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// x̂₀ = a·x + b·m in VE space at σ: ε: x − σ·ε̂; v: x/(σ² + 1) − σ/√(σ² + 1)·v̂.
fn ve_denoise(prediction: Prediction, sigma: f64) -> (f64, f64) {
    match prediction {
        Prediction::Epsilon => (1.0, -sigma),
        Prediction::VPrediction => (1.0 / (sigma * sigma + 1.0), -sigma / (sigma * sigma + 1.0).sqrt()),
    }
}

/// x̂₀ = a·x + b·m in VP space (α, s): ε: (x − s·ε̂)/α; v: α·x − s·v̂.
fn vp_denoise(prediction: Prediction, alpha: f64, s: f64) -> (f64, f64) {
    match prediction {
        Prediction::Epsilon => (1.0 / alpha, -s / alpha),
        Prediction::VPrediction => (alpha, -s),
    }
}
