//! `celframe schedule`: a sampler's timesteps and noise levels as JSON, to compare with diffusers
//! (tests/sampling.rs does, against tools/make_schedule_fixtures.py) or to see what a setting
//! runs before rendering.

use std::io::Write as _;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::sampling::{BetaSchedule, Prediction, Sampler, SamplerConfig, SamplerKind, Spacing};

#[derive(Args)]
pub struct ScheduleArgs {
    /// lcm, tcd, euler, euler_ancestral (euler_a), ddim, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde.
    #[arg(long, value_name = "NAME", value_parser = parse_scheduler)]
    pub scheduler: SamplerKind,
    /// Denoising steps, 1 to 1000 (lcm, tcd: 1 to 50).
    #[arg(long, value_name = "N")]
    pub steps: usize,
    /// img2img strength in (0, 1]: lcm and tcd shrink their 50-step grid to int(50 x S)
    /// timesteps; the others run the last int(N x S) of N steps (diffusers' pipelines).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub strength: f64,
    /// Timestep spacing (default trailing; lcm and tcd take none).
    #[arg(long, value_enum)]
    pub spacing: Option<SpacingArg>,
    /// tcd's stochasticity γ in [0, 1] (default 0.3; 0 is deterministic).
    #[arg(long, value_name = "G")]
    pub eta: Option<f64>,
    /// Karras sigmas (euler, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde).
    #[arg(long)]
    pub karras: bool,
    /// What the model predicts.
    #[arg(long, value_enum, default_value = "epsilon")]
    pub prediction: PredictionArg,
    /// Zero-terminal-SNR betas (Lin et al. 2023); needs --prediction v_prediction.
    #[arg(long)]
    pub zero_snr: bool,
    /// Training betas: sdxl (0.00085..0.012) or animatediff (0.00085..0.020, the AnimateDiff-SDXL
    /// motion module's).
    #[arg(long, value_enum, default_value = "sdxl")]
    pub beta_schedule: BetaArg,
}

fn parse_scheduler(name: &str) -> std::result::Result<SamplerKind, String> {
    SamplerKind::parse(name).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SpacingArg {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PredictionArg {
    Epsilon,
    #[value(name = "v_prediction", alias = "v")]
    VPrediction,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BetaArg {
    Sdxl,
    Animatediff,
}

#[derive(Serialize)]
struct ScheduleJson {
    scheduler: &'static str,
    steps: usize,
    strength: f64,
    spacing: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eta: Option<f64>,
    karras: bool,
    prediction: &'static str,
    zero_snr: bool,
    beta_schedule: &'static str,
    /// Model evaluations of the run (DPM++ SDE: two per step but the last).
    evaluations: usize,
    init_noise_sigma: f32,
    timesteps: Vec<f32>,
    /// VE σ per step plus where the last lands; infinite (zero-SNR DDIM/LCM at t = 999) is null.
    sigmas: Vec<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    c_skip: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    c_out: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_timesteps: Option<Vec<i64>>,
    /// tcd: the intermediate timestep s of each step.
    #[serde(skip_serializing_if = "Option::is_none")]
    s_timesteps: Option<Vec<i64>>,
}

/// The sampler configuration the arguments describe.
pub fn config(args: &ScheduleArgs) -> SamplerConfig {
    SamplerConfig {
        kind: args.scheduler,
        steps: args.steps,
        strength: args.strength,
        spacing: args.spacing.map(|s| match s {
            SpacingArg::Leading => Spacing::Leading,
            SpacingArg::Trailing => Spacing::Trailing,
            SpacingArg::Linspace => Spacing::Linspace,
        }),
        eta: args.eta,
        karras: args.karras,
        prediction: match args.prediction {
            PredictionArg::Epsilon => Prediction::Epsilon,
            PredictionArg::VPrediction => Prediction::VPrediction,
        },
        zero_snr: args.zero_snr,
        beta_schedule: match args.beta_schedule {
            BetaArg::Sdxl => BetaSchedule::Sdxl,
            BetaArg::Animatediff => BetaSchedule::AnimateDiff,
        },
    }
}

pub fn run(args: &ScheduleArgs) -> Result<()> {
    let config = config(args);
    let sampler = Sampler::new(&config)?;
    let scalings = sampler.lcm_scalings();
    let json = ScheduleJson {
        scheduler: config.kind.name(),
        steps: config.steps,
        strength: config.strength,
        spacing: (!config.kind.uses_distillation_grid()).then(|| config.spacing().name()),
        eta: (config.kind == SamplerKind::Tcd).then(|| config.eta()),
        karras: config.karras,
        prediction: config.prediction.name(),
        zero_snr: config.zero_snr,
        beta_schedule: config.beta_schedule.name(),
        evaluations: sampler.evaluations(),
        init_noise_sigma: sampler.init_noise_sigma(),
        timesteps: sampler.timesteps().to_vec(),
        sigmas: sampler.sigmas().to_vec(),
        c_skip: scalings.as_ref().map(|s| s.iter().map(|p| p.0).collect()),
        c_out: scalings.as_ref().map(|s| s.iter().map(|p| p.1).collect()),
        prev_timesteps: sampler.ddim_prev_timesteps().map(<[i64]>::to_vec),
        s_timesteps: sampler.tcd_s_timesteps(),
    };
    let text = serde_json::to_string(&json).map_err(|e| Error::Internal(format!("schedule: {e}")))?;
    // A closed pipe (`celframe schedule ... | head`) is not an error worth reporting.
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::Io { context: "writing to stdout".into(), source: e })
        }
        _ => Ok(()),
    }
}
