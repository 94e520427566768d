//! `celframe demo`: the whole render pipeline (both text encoders with the real CLIP tokenizer,
//! the UNet with AnimateDiff motion modules, an OpenPose ControlNet on the built-in pose, LCM
//! sampling, the VAE, PNG frames and an mp4) on an SDXL-family model with seeded random weights,
//! since no weights ship with celframe. Full SDXL shapes on CUDA, a small model on the CPU twins.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use crate::error::{Error, Result};
use crate::pipeline::config::{BUILTIN_POSE, ClipSpec, ControlNetEntry, MAX_FRAMES, ModelPaths, RenderConfig};
use crate::pipeline::random_models::{ModelSize, cached_random_pipeline};
use crate::pipeline::{RenderOptions, render};
use crate::verify::Device;

#[derive(Args)]
pub struct DemoArgs {
    /// Where to run: auto (CUDA if present), cuda or cpu.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Model shapes: auto (full on CUDA, small on the CPU), small or full (SDXL 1.0).
    #[arg(long, default_value = "auto")]
    pub size: String,
    /// Frames in the clip (8 per second).
    #[arg(long, default_value_t = 16)]
    pub frames: usize,
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value = "outputs/demo")]
    pub out: PathBuf,
    /// Seed of the random weights and of the clip's noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

const FPS: u32 = 8;
const PROMPT: &str = "1girl, silver hair, waving, city street at night, cel shading, anime";
const NEGATIVE: &str = "lowres, blurry";

pub fn run(args: &DemoArgs) -> Result<()> {
    let device = Device::parse(&args.device)?;
    let size = match (args.size.as_str(), device) {
        ("auto", Device::Cuda) | ("full", _) => ModelSize::Full,
        ("auto", Device::Cpu) | ("small", _) => ModelSize::Small,
        (other, _) => return Err(Error::Input(format!("--size must be auto, small or full (got '{other}')"))),
    };
    if size == ModelSize::Small && device == Device::Cuda {
        return Err(Error::Input(
            "--size small runs on the CPU only (its 32-wide motion heads are below the CUDA temporal-attention \
             kernel's 33); use --size full on CUDA"
                .into(),
        ));
    }
    if !(1..=MAX_FRAMES).contains(&args.frames) {
        return Err(Error::Input(format!("--frames must be 1 to {MAX_FRAMES} (got {})", args.frames)));
    }
    let place = match device {
        Device::Cuda => "CUDA",
        Device::Cpu => "the CPU twins",
    };
    println!(
        "celframe demo: an SDXL-family pipeline ({} shapes) with RANDOM weights (seed {}) on {place}",
        size.name(),
        args.seed
    );

    let cache_root = cache_root();
    std::fs::create_dir_all(&cache_root)
        .map_err(|e| Error::Io { context: format!("creating {}", cache_root.display()), source: e })?;
    let started = Instant::now();
    let models = cached_random_pipeline(&cache_root, size, args.seed)?;
    println!("random models: {} ({:.1} s)", models.display(), started.elapsed().as_secs_f64());

    let config = demo_config(&models, size, device, args);
    let report = render(&config, &RenderOptions::default())?;
    for line in &report.summary {
        println!("{line}");
    }
    let clip = report.clips.first().ok_or_else(|| Error::Internal("demo: the render returned no clip".into()))?;
    println!("frames: {}", args.out.join("video").join("clip_001").join("frames").display());
    if let Some((mp4, _)) = &clip.mp4 {
        println!("video: {}", mp4.display());
    }
    println!(
        "\nThe weights are random, so the frames are noise-like patterns, not pictures: this run shows the \
         pipeline and its speed.\nThe demo runs LCM sampling without the LCM-LoRA it is made for (the UNet is \
         random anyway).\nTo render real anime clips, point `celframe render` at real weights: put the downloads \
         examples/seed.toml names (SDXL base, the fp16-fix VAE, an AnimateDiff-SDXL motion adapter, OpenPose and \
         depth ControlNets, the LCM-LoRA) in examples/models/ and your control images in examples/control/, then \
         run `celframe render examples/seed.toml`."
    );
    Ok(())
}

/// Where the built-in pose's keyframes sit: its five spread over the clip, fewer on clips too
/// short to hold five on distinct frames.
fn pose_keyframes(frames: usize) -> Vec<f32> {
    let poses = frames.clamp(1, 5);
    (0..poses).map(|i| if poses == 1 { 0.0 } else { i as f32 / (poses - 1) as f32 }).collect()
}

/// `$CELFRAME_DEMO_CACHE`, else `target/celframe-demo` under the current folder (beside the
/// build, and removed by `cargo clean`).
fn cache_root() -> PathBuf {
    std::env::var_os("CELFRAME_DEMO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("target").join("celframe-demo"))
}

/// One clip at 8 fps with an OpenPose ControlNet on the built-in pose keyframes; the sampler,
/// context windows and mp4 choice are the renderer's defaults (LCM, 4 steps, CFG 1.5).
fn demo_config(models: &Path, size: ModelSize, device: Device, args: &DemoArgs) -> RenderConfig {
    let mut config = RenderConfig {
        models: ModelPaths {
            base: Some(models.to_path_buf()),
            motion_adapter: Some(models.join("motion_adapter")),
            ..ModelPaths::default()
        },
        loras: Vec::new(),
        controlnets: vec![ControlNetEntry {
            path: models.join("controlnet"),
            kind: "openpose".into(),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            guess_mode: false,
            images: BUILTIN_POSE.into(),
            keyframes: Some(pose_keyframes(args.frames)),
            interpolation: "hold".into(),
            pose_interpolation: "none".into(),
            hands: true,
            face: true,
            video_timing: "time".into(),
            conditions: Vec::new(),
        }],
        sampler: Default::default(),
        video: Default::default(),
        output: Default::default(),
        seed: args.seed,
        // f16 on CUDA, and for the full set anywhere (its weights take 10 GB in f16, twice that in
        // f32); the CPU twins accumulate in f32 either way, so the small set skips the roundings.
        dtype: if device == Device::Cuda || size == ModelSize::Full { "f16" } else { "f32" }.into(),
        device: if device == Device::Cuda { "cuda" } else { "cpu" }.into(),
        lora_restore: "copy".into(),
        fp8: "off".into(),
        clips: vec![ClipSpec { prompt: PROMPT.into(), negative: NEGATIVE.into(), ..Default::default() }],
    };
    // 16:9 either way: SDXL's 1024x576, or a size the small model renders on two cores in seconds.
    (config.video.width, config.video.height) = match size {
        ModelSize::Full => (1024, 576),
        ModelSize::Small => (256, 144),
    };
    config.video.fps = FPS;
    config.video.frames = Some(args.frames);
    config.output.root = args.out.clone();
    // A demo run replaces the previous one rather than skipping the finished clip.
    config.output.replace = true;
    config
}
