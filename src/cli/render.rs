//! `celframe render CONFIG`: renders the clips of a render config (`crate::pipeline::config`),
//! with command-line overrides. `--dry-run` validates and prints the resolved config as JSON.

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::pipeline::RenderOptions;
use crate::pipeline::config::{ClipSpec, RenderConfig};

#[derive(Args, Debug, Default)]
pub struct RenderArgs {
    /// The render config, a .toml or .json file (examples/seed.toml, examples/tiny.toml).
    #[arg(value_name = "CONFIG")]
    pub config: PathBuf,
    /// The prompt of every clip (a config without clips gets one); drops the clips' prompt
    /// schedules.
    #[arg(long)]
    pub prompt: Option<String>,
    /// The negative prompt of every clip.
    #[arg(long)]
    pub negative: Option<String>,
    /// The seed: clip i uses SEED + i (the clips' own seeds are dropped).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Frames of every clip (the clips' own counts are dropped).
    #[arg(long, conflicts_with = "seconds")]
    pub frames: Option<usize>,
    /// Length of every clip in seconds: frames = round(seconds x fps).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Frames per second.
    #[arg(long)]
    pub fps: Option<u32>,
    /// Sampling steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Sampler: lcm, tcd, euler, euler_ancestral, ddim, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Width in pixels (a multiple of 8).
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels (a multiple of 8).
    #[arg(long)]
    pub height: Option<usize>,
    /// FreeInit passes (video.free_init.iterations; the other settings from the config or
    /// diffusers' defaults). 1 samples once.
    #[arg(long, value_name = "ITERATIONS")]
    pub free_init: Option<usize>,
    /// Output folder (relative to the current folder).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// auto, cuda or cpu.
    #[arg(long)]
    pub device: Option<String>,
    /// f16, bf16 or f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// auto, ffmpeg, builtin or off.
    #[arg(long)]
    pub mp4: Option<String>,
    /// A safetensors file of initial latents and per-step noise to use instead of the seed's, for
    /// exact comparison with diffusers.
    #[arg(long, value_name = "FILE")]
    pub noise: Option<PathBuf>,
    /// Print the time each stage takes.
    #[arg(long)]
    pub timings: bool,
    /// Validate, print the resolved config as JSON and exit without rendering.
    #[arg(long)]
    pub dry_run: bool,
}

/// The config with the arguments' overrides applied, validated, and the run options. Errors name
/// the config file.
pub fn config_from_args(args: &RenderArgs) -> Result<(RenderConfig, RenderOptions)> {
    let mut config = RenderConfig::load(&args.config)?;
    apply_overrides(&mut config, args);
    config.validate().map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("{}: {m}", args.config.display())),
        other => other,
    })?;
    if let Some(noise) = args.noise.as_ref().filter(|p| !p.is_file()) {
        return Err(Error::Input(format!("--noise {}: no such file", noise.display())));
    }
    Ok((config, RenderOptions { noise: args.noise.clone(), timings: args.timings, keep_tensors: false }))
}

fn apply_overrides(config: &mut RenderConfig, args: &RenderArgs) {
    if let Some(prompt) = &args.prompt {
        if config.clips.is_empty() {
            config.clips.push(ClipSpec {
                prompt: String::new(),
                negative: String::new(),
                seed: None,
                frames: None,
                prompt_schedule: Vec::new(),
            });
        }
        for clip in &mut config.clips {
            clip.prompt = prompt.clone();
            clip.prompt_schedule.clear();
        }
    }
    if let Some(negative) = &args.negative {
        config.clips.iter_mut().for_each(|c| c.negative = negative.clone());
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
        config.clips.iter_mut().for_each(|c| c.seed = None);
    }
    if args.frames.is_some() || args.seconds.is_some() {
        config.video.frames = args.frames;
        config.video.seconds = args.seconds;
        config.clips.iter_mut().for_each(|c| c.frames = None);
    }
    let video = &mut config.video;
    video.fps = args.fps.unwrap_or(video.fps);
    video.width = args.width.unwrap_or(video.width);
    video.height = args.height.unwrap_or(video.height);
    if let Some(iterations) = args.free_init {
        video.free_init.get_or_insert_with(Default::default).iterations = iterations;
    }
    let sampler = &mut config.sampler;
    sampler.steps = args.steps.unwrap_or(sampler.steps);
    sampler.cfg = args.cfg.unwrap_or(sampler.cfg);
    if let Some(name) = &args.sampler {
        sampler.name = name.clone();
    }
    for (value, target) in
        [(&args.device, &mut config.device), (&args.dtype, &mut config.dtype), (&args.mp4, &mut config.output.mp4)]
    {
        if let Some(value) = value {
            *target = value.clone();
        }
    }
    if let Some(out) = &args.out {
        config.output.root = out.clone();
    }
}

pub fn run(args: &RenderArgs) -> Result<()> {
    let (config, options) = config_from_args(args)?;
    for warning in config.warnings() {
        eprintln!("{warning}");
    }
    if args.dry_run {
        let text = serde_json::to_string_pretty(&config.resolved_json())
            .map_err(|e| Error::Internal(format!("render --dry-run: {e}")))?;
        return match writeln!(std::io::stdout().lock(), "{text}") {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(Error::Io { context: "writing to stdout".into(), source: e })
            }
            _ => Ok(()),
        };
    }
    let report = crate::pipeline::render(&config, &options)?;
    for line in &report.summary {
        eprintln!("{line}");
    }
    Ok(())
}
