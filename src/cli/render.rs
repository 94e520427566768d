//! `celframe render CONFIG`: renders the clips of a render config (`crate::pipeline::config`),
//! with command-line overrides. `--dry-run` validates and prints the resolved config as JSON.

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::pipeline::RenderOptions;
use crate::pipeline::batch::{Shard, shard_clips};
use crate::pipeline::config::{ClipSpec, RenderConfig};
use crate::pipeline::devices::{DeviceSplit, SplitMode};

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
    /// The config's `fp8`: off, on (the default when given without a value) or all.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on")]
    pub fp8: Option<String>,
    /// A safetensors file of initial latents and per-step noise to use instead of the seed's, for
    /// exact comparison with diffusers.
    #[arg(long, value_name = "FILE")]
    pub noise: Option<PathBuf>,
    /// Print the time each stage takes.
    #[arg(long)]
    pub timings: bool,
    /// Render only shard I of N (from 0): the clips at positions p of the id order with
    /// p mod N = I. Without it, a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) or
    /// a Kubernetes Indexed Job (JOB_COMPLETION_INDEX with --shard-count) picks the shard. Shards
    /// write into one outputs tree; `celframe merge-report` then writes the combined report and
    /// prompt grid.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// One worker per GPU of this host: `all` (the devices the CUDA driver shows) or CUDA ordinals
    /// such as 0,2,3. Worker k renders --shard k/N with CUDA_VISIBLE_DEVICES set to its GPU and
    /// the other arguments unchanged; its lines are prefixed [gpu K]; then the reports are merged
    /// as `celframe merge-report` does. Exit code: the highest of the workers' and the merge's.
    /// SIGINT/SIGTERM are passed on to the workers. A list needs no driver: with a CPU config
    /// the workers run on the CPU.
    #[arg(long, value_name = "all|LIST", conflicts_with_all = ["shard", "shard_count", "dry_run"])]
    pub gpus: Option<String>,
    /// How --gpus divides the work. clips (the default): one worker per GPU, each rendering a shard
    /// of the clips. windows: every clip over all the listed devices in this process, each sampler
    /// step's context windows dealt round-robin (the frames are those one device renders, byte for
    /// byte). cfg: exactly two devices, the unconditional half of each CFG batch on the first and
    /// the conditional half on the second (for clips of one window; on CUDA close to, not equal to,
    /// one device's frames). With windows and cfg a GPU may be listed twice (two threads on it),
    /// and with a CPU config each entry is a CPU thread.
    #[arg(long, value_name = "clips|windows|cfg")]
    pub split: Option<String>,
    /// The shard count with JOB_COMPLETION_INDEX (the Job's completions), or in place of
    /// SLURM_ARRAY_TASK_COUNT; also read from CELFRAME_SHARD_COUNT.
    #[arg(long, value_name = "N")]
    pub shard_count: Option<usize>,
    /// Validate the config's rules (a render also reads every file first: headers parse, LoRAs
    /// match the models, control inputs decode), print the resolved config as JSON and exit
    /// without rendering.
    #[arg(long)]
    pub dry_run: bool,
}

/// The shard to render: `--shard`, else the job scheduler's (`Shard::from_scheduler`), else none.
pub fn shard_from_args(args: &RenderArgs, var: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
    match &args.shard {
        Some(text) => {
            let shard = Shard::parse(text)?;
            match args.shard_count {
                Some(n) if n != shard.count => {
                    Err(Error::Input(format!("--shard {text} and --shard-count {n}: the counts differ")))
                }
                _ => Ok(Some(shard)),
            }
        }
        None => Shard::from_scheduler(var, args.shard_count),
    }
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
    let options = RenderOptions { noise: args.noise.clone(), timings: args.timings, keep_tensors: false, split: None };
    Ok((config, options))
}

fn apply_overrides(config: &mut RenderConfig, args: &RenderArgs) {
    if let Some(prompt) = &args.prompt {
        if config.clips.is_empty() {
            config.clips.push(ClipSpec::default());
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
        config.clips.iter_mut().for_each(|c| (c.frames, c.seconds) = (None, None));
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
    for (value, target) in [
        (&args.device, &mut config.device),
        (&args.dtype, &mut config.dtype),
        (&args.mp4, &mut config.output.mp4),
        (&args.fp8, &mut config.fp8),
    ] {
        if let Some(value) = value {
            *target = value.clone();
        }
    }
    if let Some(out) = &args.out {
        config.output.root = out.clone();
    }
}

/// SIGINT and SIGTERM: the first sets the render's stop flag (`pipeline::resume`), so it stops at
/// the next step with the work so far saved and exits 128 + the signal; a second one exits at
/// once with that code (the next run sweeps the partial files).
fn install_stop_handlers() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let stop = crate::pipeline::resume::stop_flag();
    let seen = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        let io = |e| Error::Io { context: format!("installing the handler of signal {signal}"), source: e };
        // Registered actions run in order: the exit must come before the flag that arms it.
        flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&seen)).map_err(io)?;
        flag::register_usize(signal, Arc::clone(&stop), signal as usize).map_err(io)?;
        flag::register(signal, Arc::clone(&seen)).map_err(io)?;
    }
    Ok(())
}

/// What `--split` asks for: None for clips (or no flag), the mode of a split of each clip.
pub fn split_mode(args: &RenderArgs) -> Result<Option<SplitMode>> {
    match args.split.as_deref().map(str::trim) {
        None | Some("clips") => Ok(None),
        Some("windows") => Ok(Some(SplitMode::Windows)),
        Some("cfg") => Ok(Some(SplitMode::Cfg)),
        Some(other) => Err(Error::Input(format!("--split {other:?}: give clips, windows or cfg"))),
    }
}

/// `celframe render` in this process: one device, or with `split` one clip at a time over several.
pub fn run(args: &RenderArgs) -> Result<()> {
    if let Some(mode) = split_mode(args)? {
        return Err(Error::Input(format!(
            "--split {}: name the devices with --gpus, such as --gpus 0,1 (CUDA ordinals; with a CPU config, CPU \
             threads)",
            if mode == SplitMode::Windows { "windows" } else { "cfg" }
        )));
    }
    run_split(args, None)
}

/// `run` with one clip's work over the devices of `split` (`pipeline::devices`).
pub fn run_split(args: &RenderArgs, split: Option<DeviceSplit>) -> Result<()> {
    let (config, mut options) = config_from_args(args)?;
    options.split = split;
    let shard = shard_from_args(args, |name| std::env::var(name).ok())?;
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
    if let Some(s) = shard {
        let clips = shard_clips(&config, shard);
        eprintln!("shard {} of {}: {} of the {} clips", s.index, s.count, clips.len(), config.clips.len());
    }
    install_stop_handlers()?;
    let report = crate::pipeline::render_batch(&config, &options, shard)
        .map_err(|e| e.with_prefix(&format!("{}: ", args.config.display())))?;
    for line in &report.summary {
        eprintln!("{line}");
    }
    Ok(())
}
