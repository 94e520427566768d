//! Sampling: noise schedules, the samplers as step functions on plain f32 slices, and
//! classifier-free guidance. This module knows no model: the caller evaluates the UNet at the
//! timesteps a [`Sampler`] lists and hands each output to [`Sampler::step`].
//!
//! What runs here is the CPU reference twin; the pipeline will run the same updates on the GPU.
//! Every sampler is linear in its inputs, so each model evaluation reduces to a handful of
//! scalars ([`Update`]: the x̂₀ estimate from the latent and the model output, then the next
//! latent from the latent, the model output, x̂₀, one history buffer and fresh noise) computed in
//! float64 on the host, and one element-wise pass ([`Update::apply`]) that a single GPU kernel
//! can mirror.
//!
//! # Samplers (each follows the diffusers 0.42 scheduler named, `diffusers/schedulers/`)
//! | name | diffusers | kind |
//! |---|---|---|
//! | `lcm` | `scheduling_lcm.py` LCMScheduler | LCM-LoRA / LCM models, 2-8 steps, stochastic |
//! | `tcd` | `scheduling_tcd.py` TCDScheduler (Zheng et al. 2024) | TCD / Hyper-SD 1-step LoRAs, stochastic for γ > 0 |
//! | `euler` | `scheduling_euler_discrete.py` EulerDiscreteScheduler | ODE, VE space |
//! | `euler_ancestral` | `scheduling_euler_ancestral_discrete.py` | ancestral (η = 1), stochastic |
//! | `ddim` | `scheduling_ddim.py` DDIMScheduler, η = 0 | ODE, VP space |
//! | `dpmpp_2m` | `scheduling_dpmsolver_multistep.py`, `dpmsolver++`, order 2 | multistep ODE |
//! | `dpmpp_2m_sde` | the same, `sde-dpmsolver++` | multistep SDE, stochastic |
//! | `dpmpp_sde` | `scheduling_dpmsolver_sde.py` DPMSolverSDEScheduler (k-diffusion `sample_dpmpp_sde`) | 2 evaluations per step, stochastic |
//!
//! Stochastic samplers draw noise from a caller-supplied [`NoiseSource`], one standard-normal
//! tensor per request; each request names the model evaluation and the σ interval it spans, so a
//! [`BrownianTree`] (k-diffusion's `BrownianTreeNoiseSampler`, for DPM++ SDE and 2M SDE: the same
//! seed gives the same path at any step count) or plain per-evaluation noise from a seeded
//! counter-based generator can serve them. Tests inject diffusers' exact noise.
//!
//! # Schedules
//! Training schedule ([`TrainingSchedule`]): SDXL's scaled-linear betas, β from 0.00085 to 0.012
//! over 1000 steps ([`BetaSchedule::Sdxl`]), or the AnimateDiff-SDXL motion module's 0.00085 to
//! 0.020 ([`BetaSchedule::AnimateDiff`], guoyww/AnimateDiff `sdxl` branch inference.yaml);
//! zero-terminal-SNR rescale as an option (Lin et al. 2023, Algorithm 1). Prediction: ε or v
//! ([`Prediction`]). Timestep spacing ([`Spacing`]) as diffusers with steps_offset 1 (SDXL's
//! scheduler config), Karras σ (Karras et al. 2022, ρ = 7) for Euler and the DPM-Solvers.
//! img2img strength: LCM and TCD shrink their 50-step grid and still run N steps
//! (`LCMScheduler.set_timesteps(strength=...)`, as `LatentConsistencyModelImg2ImgPipeline` calls
//! it; finer than cutting 4 steps to int(4·S)); every other sampler drops the first steps
//! (`StableDiffusionXLImg2ImgPipeline.get_timesteps`, which diffusers' SDXL img2img pipeline also
//! applies to LCMScheduler: there the two differ).
//!
//! # Defaults and why
//! * Sampler: `lcm` with LCM-LoRA, 4-6 steps, low CFG (diffusers' LCM-LoRA examples use
//!   guidance 1.0-1.5) is the one to default to in the renderer: a 16-frame segment then costs
//!   4 UNet evaluations, the work that dominates a clip. [`SamplerConfig::new`] takes the sampler
//!   and step count from the caller and defaults the rest as below.
//! * TCD's γ (`eta`): 0.3, TCDScheduler.step's default and the TCD LoRA cards' value for 4 steps
//!   (diffusers' SDXL pipeline passes its own `eta`, default 0, which makes TCD deterministic).
//! * Beta schedule: the SDXL base one (0.012), also for the AnimateDiff motion module, because
//!   the LCM-LoRA and the few-step LoRAs were distilled on it; the 0.020 schedule the motion
//!   module was trained with is an option to try, not a default.
//! * Spacing: trailing. It starts at t = 999 (pure noise) for any step count, which few-step
//!   models (Lightning, Hyper-SD, PCM) require and which Lin et al. 2023 (Table 2) show is
//!   better at every count; SDXL's own config says leading, which at 4 steps starts at t = 751
//!   and leaves signal in the "noise". LCM and TCD take no spacing (their grid comes from the
//!   50-step distillation schedule).
//! * Prediction ε, zero-SNR off: what SDXL base and its anime finetunes were trained with;
//!   v-prediction zero-SNR checkpoints (NoobAI-XL V-Pred) must be declared by the user.
//!   Zero-SNR needs v-prediction: at t = 999 the latent holds no signal and ε-prediction
//!   divides by √ᾱ = 0.
//!
//! Where diffusers' numpy grids misbehave we keep the requested step count: for 62 step counts
//! up to 1000 (61, 103, 121, ...) numpy's `arange` overshoots with trailing spacing and diffusers
//! appends a step at t = -1; we run exactly N steps (the first N of diffusers', except that
//! Euler's Karras range, which diffusers takes from those timesteps, then ends at t = 0 there and
//! at the N-th timestep here). Schedules that leave the trained range or repeat a noise level
//! (leading spacing with 1000 steps) are refused.

mod brownian;
mod cfg;
mod grid;
mod rng;
mod sampler;
mod table;

pub use brownian::{BrownianTree, KeyedNormal};
pub use cfg::{cfg_combine, cfg_rescale};
pub use rng::{NoiseStream, Purpose, philox4x32_10, stream_id};
pub use sampler::{Keep, NoiseRequest, NoiseSource, Sampler, Update, no_noise};
pub use table::{TrainingSchedule, ZERO_SNR_TERMINAL_ALPHA_CUMPROD};

use crate::error::{Error, Result};

/// Training timesteps of SDXL (and of every SD model).
pub const TRAIN_STEPS: usize = 1000;

/// The distillation grid of LCM (`original_inference_steps`, LCMScheduler's default and what
/// LCM-LoRA SDXL was distilled with).
pub const LCM_ORIGINAL_STEPS: usize = 50;

/// TCD's default stochasticity γ (TCDScheduler.step `eta`).
pub const TCD_DEFAULT_ETA: f64 = 0.3;

/// The sampler algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Lcm,
    Tcd,
    Euler,
    EulerAncestral,
    Ddim,
    DpmPp2m,
    DpmPp2mSde,
    DpmPpSde,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 8] = [
        SamplerKind::Lcm,
        SamplerKind::Tcd,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Ddim,
        SamplerKind::DpmPp2m,
        SamplerKind::DpmPp2mSde,
        SamplerKind::DpmPpSde,
    ];

    /// The name on the command line and in configs (ComfyUI's sampler names).
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Lcm => "lcm",
            SamplerKind::Tcd => "tcd",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_ancestral",
            SamplerKind::Ddim => "ddim",
            SamplerKind::DpmPp2m => "dpmpp_2m",
            SamplerKind::DpmPp2mSde => "dpmpp_2m_sde",
            SamplerKind::DpmPpSde => "dpmpp_sde",
        }
    }

    /// A sampler by name; also accepts `euler_a` and dashes for underscores.
    pub fn parse(name: &str) -> Result<Self> {
        let canonical = name.trim().to_ascii_lowercase().replace('-', "_");
        if canonical == "euler_a" {
            return Ok(SamplerKind::EulerAncestral);
        }
        SamplerKind::ALL.into_iter().find(|k| k.name() == canonical).ok_or_else(|| {
            let names: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.name()).collect();
            Error::Input(format!("unknown scheduler {name:?}; the schedulers are {}", names.join(", ")))
        })
    }

    /// Whether the sampler draws fresh noise during sampling (TCD: when γ > 0, see
    /// [`SamplerConfig::is_stochastic`]).
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            SamplerKind::Lcm
                | SamplerKind::Tcd
                | SamplerKind::EulerAncestral
                | SamplerKind::DpmPp2mSde
                | SamplerKind::DpmPpSde
        )
    }

    /// LCM and TCD: timesteps from the 50-step distillation grid, no spacing.
    pub fn uses_distillation_grid(self) -> bool {
        matches!(self, SamplerKind::Lcm | SamplerKind::Tcd)
    }

    /// Whether diffusers offers Karras sigmas for it (`use_karras_sigmas`).
    pub fn supports_karras(self) -> bool {
        matches!(self, SamplerKind::Euler | SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde | SamplerKind::DpmPpSde)
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The beta schedule the UNet (and motion module) was trained with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// SDXL base: scaled_linear 0.00085 → 0.012.
    Sdxl,
    /// AnimateDiff-SDXL (mm_sdxl_v10_beta): scaled_linear 0.00085 → 0.020.
    AnimateDiff,
}

impl BetaSchedule {
    pub fn beta_start(self) -> f64 {
        0.00085
    }
    pub fn beta_end(self) -> f64 {
        match self {
            BetaSchedule::Sdxl => 0.012,
            BetaSchedule::AnimateDiff => 0.020,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            BetaSchedule::Sdxl => "sdxl",
            BetaSchedule::AnimateDiff => "animatediff",
        }
    }
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise ε (SDXL base).
    Epsilon,
    /// v = α·ε − σ·x₀ (Salimans & Ho 2022), with σ here the VP noise scale √(1 − ᾱ).
    VPrediction,
}

impl Prediction {
    pub fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::VPrediction => "v_prediction",
        }
    }
}

/// How N inference timesteps are picked from the 1000 training ones (diffusers
/// `timestep_spacing`, Lin et al. 2023 Table 2), with steps_offset 1 for leading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    pub fn name(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
        }
    }
}

/// Everything that fixes a sampling run's schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub kind: SamplerKind,
    /// Denoising steps before img2img strength (diffusers `num_inference_steps`).
    pub steps: usize,
    /// img2img strength in (0, 1]; 1 starts from pure noise.
    pub strength: f64,
    /// None: the default, trailing (LCM, TCD: their own grid, and a spacing is refused).
    pub spacing: Option<Spacing>,
    /// TCD's stochasticity γ in [0, 1] (None: 0.3); refused for other samplers.
    pub eta: Option<f64>,
    pub karras: bool,
    pub prediction: Prediction,
    pub zero_snr: bool,
    pub beta_schedule: BetaSchedule,
}

impl SamplerConfig {
    /// `steps` steps of `kind` with the defaults: full strength, trailing spacing, no Karras, ε,
    /// no zero-SNR, the SDXL base schedule.
    pub fn new(kind: SamplerKind, steps: usize) -> Self {
        SamplerConfig {
            kind,
            steps,
            strength: 1.0,
            spacing: None,
            eta: None,
            karras: false,
            prediction: Prediction::Epsilon,
            zero_snr: false,
            beta_schedule: BetaSchedule::Sdxl,
        }
    }

    /// The spacing in force (trailing unless set).
    pub fn spacing(&self) -> Spacing {
        self.spacing.unwrap_or(Spacing::Trailing)
    }

    /// TCD's γ in force.
    pub fn eta(&self) -> f64 {
        self.eta.unwrap_or(TCD_DEFAULT_ETA)
    }

    /// Whether a run draws noise: the stochastic samplers, TCD only for γ > 0.
    pub fn is_stochastic(&self) -> bool {
        match self.kind {
            SamplerKind::Tcd => self.eta() > 0.0,
            kind => kind.is_stochastic(),
        }
    }

    /// Checks the options against each other; the grid itself is checked when a [`Sampler`] is
    /// built.
    pub fn validate(&self) -> Result<()> {
        let name = self.kind.name();
        if self.steps == 0 || self.steps > TRAIN_STEPS {
            return Err(Error::Input(format!(
                "{name}: {} steps; steps must be 1 to {TRAIN_STEPS} (the model's training timesteps)",
                self.steps
            )));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(Error::Input(format!(
                "{name}: strength {}; it must be in (0, 1] (1 starts from pure noise)",
                self.strength
            )));
        }
        if self.karras && !self.kind.supports_karras() {
            return Err(Error::Input(format!(
                "{name} does not take Karras sigmas (diffusers offers them for euler, dpmpp_2m, dpmpp_2m_sde and dpmpp_sde)"
            )));
        }
        if self.zero_snr && self.prediction == Prediction::Epsilon {
            return Err(Error::Input(format!(
                "{name}: zero terminal SNR needs v-prediction: at t = 999 the latent is pure noise and an \
                 ε-prediction model cannot recover x₀ (Lin et al. 2023, sec. 3.2); add --prediction v_prediction"
            )));
        }
        if self.zero_snr && self.kind == SamplerKind::DpmPpSde {
            return Err(Error::Input(
                "dpmpp_sde does not take zero terminal SNR (diffusers' DPMSolverSDEScheduler has no such option, \
                 so there is no reference to match); use dpmpp_2m_sde or euler_ancestral"
                    .into(),
            ));
        }
        match self.eta {
            Some(_) if self.kind != SamplerKind::Tcd => {
                return Err(Error::Input(format!("{name} takes no eta (the stochasticity γ of tcd)")));
            }
            Some(eta) if !(0.0..=1.0).contains(&eta) => {
                return Err(Error::Input(format!("tcd: eta {eta}; it must be in [0, 1]")));
            }
            _ => {}
        }
        if self.kind.uses_distillation_grid() {
            if let Some(spacing) = self.spacing {
                return Err(Error::Input(format!(
                    "{name} takes no timestep spacing ({} given): its timesteps come from the {LCM_ORIGINAL_STEPS}-step \
                     distillation grid",
                    spacing.name()
                )));
            }
            if self.steps > LCM_ORIGINAL_STEPS {
                return Err(Error::Input(format!(
                    "{name}: {} steps; at most {LCM_ORIGINAL_STEPS} (its timesteps are a subset of the \
                     {LCM_ORIGINAL_STEPS}-step distillation grid)",
                    self.steps
                )));
            }
            let grid = (LCM_ORIGINAL_STEPS as f64 * self.strength) as usize;
            if grid < self.steps {
                return Err(Error::Input(format!(
                    "{name}: strength {} leaves {grid} of the {LCM_ORIGINAL_STEPS} distillation timesteps, fewer than the {} \
                     steps asked for; raise the strength to at least {} or take fewer steps",
                    self.strength,
                    self.steps,
                    self.steps as f64 / LCM_ORIGINAL_STEPS as f64
                )));
            }
        } else {
            let run = ((self.steps as f64 * self.strength) as usize).min(self.steps);
            if run == 0 {
                return Err(Error::Input(format!(
                    "{name}: strength {} of {} steps runs no step (img2img runs int(steps x strength) of them); \
                     raise the strength or the steps",
                    self.strength, self.steps
                )));
            }
        }
        Ok(())
    }
}
