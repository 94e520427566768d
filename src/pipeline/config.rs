//! The render configuration: which models, LoRAs and ControlNets, how to sample, the video's size
//! and length, where outputs go, and the clips to render. Read from TOML or JSON (by the file's
//! extension); unknown keys are errors. Relative paths in a file are relative to the file's folder,
//! so a config and its `models/` folder can move together.
//!
//! `validate` checks everything that can be checked before a weight is read (files exist, names
//! parse, numbers are in range) and reports every problem in one `Error::Input`; `warnings` lists
//! settings that run but stray from what the models were made for.
//!
//! Defaults follow the recommended anime pipeline: LCM-LoRA sampling at 4 steps and CFG 1.5,
//! 1024x576 at 10 fps, AnimateDiff context windows of 16 frames overlapping by 4
//! (ComfyUI-AnimateDiff-Evolved's "Context Options" defaults, `animatediff/context.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DType;
use crate::control::video::{VIDEO_EXTENSIONS, VideoTiming, is_video};
use crate::error::{Error, Result};
use crate::io;
use crate::models::ControlType;
use crate::models::lora::LoraSpec;
use crate::models::lora::roles::{self, Role};
use crate::models::transformer::Fp8Linears;
use crate::output::Mp4Choice;
use crate::pipeline::free_init::FreeInitSettings;
use crate::sampling::{BetaSchedule, Prediction, Sampler, SamplerConfig, SamplerKind, Spacing};
use crate::verify::Device;

/// Largest config file read.
const CONFIG_LIMIT: u64 = 4 << 20;
/// Most frames in one clip.
pub const MAX_FRAMES: usize = 1024;
/// The AnimateDiff motion module's positional encoding has 32 positions (diffusers
/// `MotionAdapter(motion_max_seq_length=32)`), so a context window holds at most 32 frames.
pub const MAX_CONTEXT_LENGTH: usize = 32;
/// Frames in a clip when neither `frames` nor `seconds` is given: the motion module's trained
/// window.
pub const DEFAULT_FRAMES: usize = 16;
/// The ControlNet `images` value that asks for the built-in pose sequence.
pub const BUILTIN_POSE: &str = "builtin:pose";
pub const CONTROLNET_KINDS: [&str; 6] = ["openpose", "depth", "canny", "lineart", "softedge", "other"];
/// Most conditions of one Union entry: ProMax's control types.
pub const MAX_UNION_CONDITIONS: usize = 8;
/// How control images between keyframes are made: the previous keyframe's image held, a linear
/// blend of the two around it, or control on the keyframe frames only (the motion module fills in).
pub const INTERPOLATIONS: [&str; 3] = ["hold", "linear", "keyframes"];
/// OpenPose JSON keyframes: each keyframe's own pose, or a pose for every frame between two
/// keyframes with the points moved linearly (`control::pose::interpolate_pose`).
pub const POSE_INTERPOLATIONS: [&str; 2] = ["none", "linear"];
/// A video's frames: the frame at each clip frame's time, or the video's frames in order
/// (`control::video::VideoTiming`).
pub const VIDEO_TIMINGS: [&str; 2] = ["time", "frames"];
/// AnimateDiff-Evolved's context schedules (`ContextSchedules`).
pub const CONTEXT_SCHEDULES: [&str; 4] = ["uniform_standard", "uniform_looped", "static_standard", "batched"];
/// AnimateDiff-Evolved's fuse methods (`ContextFuseMethod`).
pub const FUSE_METHODS: [&str; 3] = ["flat", "pyramid", "overlap_linear"];
/// Long clips: overlapping context windows at every step, or 16-frame segments chained through
/// the last latent.
pub const LONG_VIDEO_MODES: [&str; 2] = ["windows", "chain"];
pub const DEVICES: [&str; 3] = ["auto", "cuda", "cpu"];
pub const LORA_RESTORES: [&str; 2] = ["copy", "reload"];
pub const MP4_CHOICES: [&str; 4] = ["auto", "ffmpeg", "builtin", "off"];
const SIDE_MIN: usize = 64;
const SIDE_MAX: usize = 4096;
const FPS_MAX: u32 = 60;

/// Everything a render needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderConfig {
    #[serde(default)]
    pub models: ModelPaths,
    /// At most 3 LoRAs besides the LCM-LoRA and one motion LoRA (`roles::check`).
    #[serde(default)]
    pub loras: Vec<LoraEntry>,
    #[serde(default)]
    pub controlnets: Vec<ControlNetEntry>,
    #[serde(default)]
    pub sampler: SamplerSettings,
    #[serde(default)]
    pub video: VideoSettings,
    #[serde(default)]
    pub output: OutputSettings,
    /// Clip i uses `seed + i` unless it sets its own (default 0).
    #[serde(default)]
    pub seed: u64,
    /// f16 (default), bf16 or f32.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// auto (default: CUDA where there is a GPU), cuda or cpu.
    #[serde(default = "default_device")]
    pub device: String,
    /// How a batch on the GPU puts weights back when its clips change LoRA set: "copy" (default:
    /// from device copies of the touched weights, ~10 ms a switch, those weights' memory once
    /// more) or "reload" (from the mapped model files: no extra memory, seconds a switch).
    #[serde(default = "default_lora_restore")]
    pub lora_restore: String,
    /// Linears of the transformer blocks (UNet, motion modules, ControlNets) in FP8: e4m3
    /// weights and activations with one scale per tensor, cuBLASLt's FP8 GEMMs (compute capability
    /// 8.9 or later; the CPU path runs their twin). "off" (default); "on": those with at least
    /// 1536 outputs (q/k/v and the GEGLU projection), where the GEMM's saving outweighs the
    /// activation's quantization; "all": every one. Faster at a quality cost; f16 or bf16 only.
    #[serde(default = "default_fp8")]
    pub fp8: String,
    /// At least one.
    #[serde(default)]
    pub clips: Vec<ClipSpec>,
}

/// Where the models are: `base` or per-component paths, a component's own path overriding the base.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPaths {
    /// A diffusers SDXL folder (unet/, vae/, text_encoder/, text_encoder_2/), a Hugging Face cache
    /// folder `models--ORG--NAME` (its refs/main names the snapshot) or one of its snapshot
    /// folders, or a single-file checkpoint (.safetensors with SGM names holding the UNet, both
    /// text encoders and the VAE).
    pub base: Option<PathBuf>,
    pub unet: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub text_encoder_2: Option<PathBuf>,
    /// The AnimateDiff motion adapter; without it only one-frame clips (images) render.
    pub motion_adapter: Option<PathBuf>,
    /// A CLIP tokenizer folder (vocab.json, merges.txt); default: the base folder's tokenizer/
    /// where it has one, else the CLIP vocabulary built into celframe (what SDXL uses).
    pub tokenizer: Option<PathBuf>,
}

/// A LoRA file and how strongly it applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraEntry {
    pub path: PathBuf,
    /// The UNet's (and motion modules') strength (default 1.0).
    #[serde(default = "one")]
    pub weight: f64,
    /// The text encoders' strength (default: `weight`).
    pub text_encoder_weight: Option<f64>,
    /// style, character, utility, lcm or motion (`roles::Role`); none counts among the 3.
    pub role: Option<String>,
}

/// A ControlNet, its control images and when it acts. A ControlNet Union / ProMax checkpoint
/// takes `conditions` instead of the entry's own kind and images: one forward serves them all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNetEntry {
    pub path: PathBuf,
    /// openpose, depth, canny, lineart, softedge or other (empty for a Union entry).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// The residuals' scale (default 1.0).
    #[serde(default = "one_f32")]
    pub scale: f32,
    /// The fraction of the sampling steps where control starts (default 0) and ends (default 1).
    #[serde(default)]
    pub start: f32,
    #[serde(default = "one_f32")]
    pub end: f32,
    /// diffusers' guess mode: control on the conditional pass only, residuals scaled from 0.1 at
    /// the shallowest block to 1.0 at the mid block.
    #[serde(default)]
    pub guess_mode: bool,
    /// A folder of PNGs (in name order), one PNG, a video file (mp4, mov, mkv, webm, gif, ...:
    /// a hint for every frame, read through ffmpeg, see `video_timing`), or "builtin:pose" (kind
    /// openpose: a pose sequence drawn at the keyframes, by default the five at 0, 0.25, 0.5, 0.75
    /// and 1); kind openpose also takes OpenPose JSON files (`people[].pose_keypoints_2d`, COCO-18
    /// or BODY_25, with hands and face when present), drawn as the OpenPose ControlNets were
    /// trained (controlnet_aux's colours and limbs). By kind: canny takes ordinary pictures or
    /// video and computes their Canny edges (OpenCV's thresholds 100/200); depth takes depth maps
    /// (8- or 16-bit grey PNGs or a grey video, near = bright, scaled to one range over the clip);
    /// the others are used as drawn (skeletons, line art, soft edges made elsewhere). Empty for a
    /// Union entry.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub images: PathBuf,
    /// Where the images sit in the clip, as fractions of it (0 first frame, 1 last), increasing.
    /// Default: spread evenly, image i of n at i / (n - 1): five images give 0, 0.25, 0.5, 0.75, 1
    /// and one image per frame gives every frame.
    pub keyframes: Option<Vec<f32>>,
    /// hold (default), linear or keyframes (see `INTERPOLATIONS`).
    #[serde(default = "default_interpolation")]
    pub interpolation: String,
    /// OpenPose JSON keyframes: none (default: each keyframe's pose, the frames between as
    /// `interpolation` says) or linear (every frame from the first to the last keyframe gets its
    /// own pose, points known at both ends moved linearly; others not drawn between).
    #[serde(default = "default_pose_interpolation")]
    pub pose_interpolation: String,
    /// Draw the hands and the face OpenPose JSON gives (default true: the file has them because
    /// the annotator was asked for them; false for a net trained on bodies only).
    #[serde(default = "yes")]
    pub hands: bool,
    #[serde(default = "yes")]
    pub face: bool,
    /// A video's frames: time (default: clip frame i is the video frame at i / fps seconds, so
    /// motion keeps its speed) or frames (the video's frames in order, one per clip frame).
    #[serde(default = "default_video_timing")]
    pub video_timing: String,
    /// A ControlNet Union's conditions (at most `MAX_UNION_CONDITIONS`), each with its own control
    /// type (`kind`), images, scale and keyframes; the entry's start, end and guess mode apply to
    /// all. The entry then gives none of the per-image settings itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ControlCondition>,
}

/// One condition of a ControlNet Union entry: the fields of a plain entry that describe its
/// images (`ControlNetEntry` documents each), `kind` naming the Union's control type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlCondition {
    /// A Union control type (`models::ControlType::NAMES`): openpose, depth, canny, lineart,
    /// softedge, hed, scribble, normal, segment, tile, ...; depth, canny and openpose read their
    /// inputs as a plain entry of that kind does, the others take images as drawn.
    pub kind: String,
    pub images: PathBuf,
    /// This condition's conditioning scale (default 1.0).
    #[serde(default = "one_f32")]
    pub scale: f32,
    pub keyframes: Option<Vec<f32>>,
    #[serde(default = "default_interpolation")]
    pub interpolation: String,
    #[serde(default = "default_pose_interpolation")]
    pub pose_interpolation: String,
    #[serde(default = "yes")]
    pub hands: bool,
    #[serde(default = "yes")]
    pub face: bool,
    #[serde(default = "default_video_timing")]
    pub video_timing: String,
}

/// The sampler (see `crate::sampling` for each setting's meaning and its diffusers counterpart).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerSettings {
    /// lcm (default), tcd, euler, euler_ancestral, ddim, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde.
    pub name: String,
    /// Denoising steps (default 4).
    pub steps: usize,
    /// Classifier-free guidance scale (default 1.5; 1 runs no unconditional pass).
    pub cfg: f32,
    /// CFG rescale φ in [0, 1] (Lin et al. 2023; default 0).
    pub cfg_rescale: f32,
    /// tcd's stochasticity γ (default 0.3); other samplers take none.
    pub eta: Option<f64>,
    pub karras: bool,
    /// sdxl (default: β to 0.012) or animatediff (β to 0.020).
    pub beta_schedule: String,
    /// epsilon (default) or v_prediction.
    pub prediction: String,
    pub zero_snr: bool,
    /// leading, trailing or linspace (default trailing; lcm and tcd take none).
    pub spacing: Option<String>,
}

/// The video's size, length and how long clips are cut into windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoSettings {
    /// Pixels, multiples of 8 in 64..=4096 (default 1024x576).
    pub width: usize,
    pub height: usize,
    /// Frames per second, 1..=60 (default 10).
    pub fps: u32,
    /// Frames per clip; or `seconds` (frames = round(seconds x fps)); 16 when neither is given.
    pub frames: Option<usize>,
    pub seconds: Option<f64>,
    /// Frames the motion module sees at once (default 16, at most 32) and their overlap (default 4).
    pub context_length: usize,
    pub context_overlap: usize,
    /// uniform_standard (default), uniform_looped, static_standard or batched.
    pub context_schedule: String,
    /// How overlapping windows' predictions are weighted: pyramid (default), flat, overlap_linear.
    pub fuse: String,
    /// windows (default) or chain.
    pub long_video: String,
    /// chain: how much of the previous segment's last latent the next one starts from (default 0.7).
    pub chain_strength: f32,
    /// FreeNoise (Qiu et al. 2023): frames past the first window reuse shuffled noise of earlier ones.
    pub freenoise: bool,
    /// FreeInit (Wu et al. 2023), `[video.free_init]`: the clip sampled `iterations` times, each
    /// pass starting from the last one's low frequencies re-noised (off when absent).
    pub free_init: Option<FreeInitSettings>,
    /// Frames the VAE decodes at once (default 8).
    pub vae_chunk_frames: usize,
    /// Every UNet GroupNorm takes its statistics over the window's frames (AnimateDiff-Evolved's
    /// default for SDXL motion modules); off, the UNet normalises per frame as diffusers does.
    pub group_norm_across_frames: bool,
}

/// Where and how results are written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSettings {
    /// The output folder (default "outputs").
    pub root: PathBuf,
    /// auto (default: ffmpeg with libx264 where it runs, else the built-in encoder), ffmpeg,
    /// builtin or off.
    pub mp4: String,
    /// Write every frame as a PNG (default true).
    pub png_frames: bool,
    /// Replace a clip folder that already exists (default false: an error).
    pub replace: bool,
}

/// One clip. A config with many clips is a batch manifest: the top-level settings are every
/// clip's defaults, and a clip overrides its prompts, seed, length, LoRA set and control images.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipSpec {
    /// A name unique in the config (letters, digits, '-', '_', '.'); default `clip_NNN`, its
    /// folder's name. Shards take clips by their place in the id order (`crate::pipeline::batch`).
    pub id: Option<String>,
    pub prompt: String,
    /// Default "" (zeros, diffusers' `force_zeros_for_empty_prompt`).
    #[serde(default)]
    pub negative: String,
    /// Default: the config's seed + the clip's index.
    pub seed: Option<u64>,
    /// Default: the video's frames. Or `seconds` (frames = round(seconds x fps)).
    pub frames: Option<usize>,
    pub seconds: Option<f64>,
    /// This clip's LoRAs in place of the config's `loras` (an empty list: none).
    pub loras: Option<Vec<LoraEntry>>,
    /// This clip's control inputs in place of each ControlNet's `images`, one per `controlnets`
    /// entry in order (a folder, a PNG, a video, OpenPose JSON or "builtin:pose").
    pub control_images: Option<Vec<PathBuf>>,
    /// Prompt travel: the prompt from each key's frame on; frame 0 is `prompt` unless a key sets it.
    #[serde(default)]
    pub prompt_schedule: Vec<PromptKey>,
}

/// A prompt that takes over at `frame`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptKey {
    pub frame: usize,
    pub prompt: String,
}

fn one() -> f64 {
    1.0
}
fn one_f32() -> f32 {
    1.0
}
fn default_dtype() -> String {
    "f16".into()
}
fn default_device() -> String {
    "auto".into()
}
fn default_fp8() -> String {
    "off".into()
}

fn default_lora_restore() -> String {
    "copy".into()
}
fn default_interpolation() -> String {
    "hold".into()
}
fn default_pose_interpolation() -> String {
    "none".into()
}
fn default_video_timing() -> String {
    "time".into()
}
fn yes() -> bool {
    true
}
fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl Default for SamplerSettings {
    fn default() -> Self {
        SamplerSettings {
            name: "lcm".into(),
            steps: 4,
            cfg: 1.5,
            cfg_rescale: 0.0,
            eta: None,
            karras: false,
            beta_schedule: "sdxl".into(),
            prediction: "epsilon".into(),
            zero_snr: false,
            spacing: None,
        }
    }
}

impl Default for VideoSettings {
    fn default() -> Self {
        VideoSettings {
            width: 1024,
            height: 576,
            fps: 10,
            frames: None,
            seconds: None,
            context_length: 16,
            context_overlap: 4,
            context_schedule: "uniform_standard".into(),
            fuse: "pyramid".into(),
            long_video: "windows".into(),
            chain_strength: 0.7,
            freenoise: false,
            free_init: None,
            vae_chunk_frames: 8,
            group_norm_across_frames: false,
        }
    }
}

impl Default for OutputSettings {
    fn default() -> Self {
        OutputSettings { root: "outputs".into(), mp4: "auto".into(), png_frames: true, replace: false }
    }
}

/// Ok when `value` is one of `names`, else a problem naming the field and the choices. Exact
/// names: the renderer compares these strings as written.
fn choice(field: &str, value: &str, names: &[&str]) -> std::result::Result<(), String> {
    if names.contains(&value) { Ok(()) } else { Err(format!("{field}: '{value}' is not one of {}", names.join(", "))) }
}

impl SamplerSettings {
    /// The sampling module's configuration, checked (`SamplerConfig::validate`).
    pub fn sampler_config(&self) -> Result<SamplerConfig> {
        let kind = SamplerKind::parse(&self.name).map_err(|e| Error::Input(format!("sampler.name: {e}")))?;
        let mut config = SamplerConfig::new(kind, self.steps);
        config.spacing = match &self.spacing {
            None => None,
            Some(name) => Some(by_name(
                "sampler.spacing",
                name,
                &[Spacing::Leading, Spacing::Trailing, Spacing::Linspace],
                Spacing::name,
            )?),
        };
        config.eta = self.eta;
        config.karras = self.karras;
        // "v" as `celframe schedule --prediction` accepts it.
        let prediction =
            if self.prediction.trim().eq_ignore_ascii_case("v") { "v_prediction" } else { &self.prediction };
        config.prediction = by_name(
            "sampler.prediction",
            prediction,
            &[Prediction::Epsilon, Prediction::VPrediction],
            Prediction::name,
        )?;
        config.zero_snr = self.zero_snr;
        config.beta_schedule = by_name(
            "sampler.beta_schedule",
            &self.beta_schedule,
            &[BetaSchedule::Sdxl, BetaSchedule::AnimateDiff],
            BetaSchedule::name,
        )?;
        config.validate().map_err(|e| Error::Input(format!("sampler: {}", message(e))))?;
        Ok(config)
    }

    /// The CFG scales accepted for a sampler: LCM and TCD LoRAs are distilled for low guidance
    /// (diffusers' LCM-LoRA examples use 1.0-1.5) and burn out well before 3; the others take the
    /// usual 1-20.
    fn cfg_range(kind: SamplerKind) -> (f32, f32) {
        if kind.uses_distillation_grid() { (1.0, 3.0) } else { (1.0, 20.0) }
    }
}

/// The value among `all` whose `name` is `value` (any case).
fn by_name<T: Copy>(field: &str, value: &str, all: &[T], name: fn(T) -> &'static str) -> Result<T> {
    let wanted = value.trim().to_ascii_lowercase();
    all.iter().copied().find(|&v| name(v) == wanted).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|&v| name(v)).collect();
        Error::Input(format!("{field}: '{value}' is not one of {}", names.join(", ")))
    })
}

/// An error's message without its kind's prefix (an `Input` error's text is its message).
fn message(e: Error) -> String {
    match e {
        Error::Input(m) => m,
        other => other.to_string(),
    }
}

impl VideoSettings {
    /// Frames per clip: `frames`, else round(seconds x fps), else 16.
    pub fn frames(&self) -> usize {
        match (self.frames, self.seconds) {
            (Some(frames), _) => frames,
            // `as` saturates; validation refuses what lands outside 1..=MAX_FRAMES.
            (None, Some(seconds)) => (seconds * self.fps as f64).round() as usize,
            (None, None) => DEFAULT_FRAMES,
        }
    }
}

impl OutputSettings {
    /// The mp4 encoder asked for.
    pub fn mp4_choice(&self) -> Result<Mp4Choice> {
        match self.mp4.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Mp4Choice::Auto),
            "ffmpeg" => Ok(Mp4Choice::Ffmpeg),
            "builtin" => Ok(Mp4Choice::BuiltIn),
            "off" => Ok(Mp4Choice::Off),
            _ => Err(Error::Input(format!("output.mp4: '{}' is not one of {}", self.mp4, MP4_CHOICES.join(", ")))),
        }
    }
}

impl ClipSpec {
    /// The prompt schedule with frame 0 filled in from `prompt` when no key sets it.
    pub fn prompt_keys(&self) -> Vec<PromptKey> {
        let mut keys = self.prompt_schedule.clone();
        if keys.first().is_none_or(|k| k.frame != 0) {
            keys.insert(0, PromptKey { frame: 0, prompt: self.prompt.clone() });
        }
        keys
    }
}

/// A model component loaded from its own path or the base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    pub const ALL: [Component; 4] = [Component::Unet, Component::Vae, Component::TextEncoder, Component::TextEncoder2];

    /// Its subfolder in a diffusers pipeline folder, and its key under `models`.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

impl ModelPaths {
    fn own(&self, component: Component) -> Option<&PathBuf> {
        match component {
            Component::Unet => self.unet.as_ref(),
            Component::Vae => self.vae.as_ref(),
            Component::TextEncoder => self.text_encoder.as_ref(),
            Component::TextEncoder2 => self.text_encoder_2.as_ref(),
        }
    }

    /// The base model as a diffusers folder or a single file: a Hugging Face cache folder becomes
    /// the snapshot its refs/main names. None without a base.
    pub fn resolved_base(&self) -> Result<Option<PathBuf>> {
        let Some(base) = &self.base else { return Ok(None) };
        if !base.is_dir() {
            return Ok(Some(base.clone()));
        }
        let snapshots = base.join("snapshots");
        if !snapshots.is_dir() {
            return Ok(Some(base.clone()));
        }
        // huggingface_hub's cache layout: refs/main holds the commit hash of snapshots/HASH.
        let refs = base.join("refs").join("main");
        let hash = io::read_text(&refs, 256, "models.base: Hugging Face cache ref")?;
        let hash = hash.trim();
        if hash.is_empty() || !hash.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Error::Input(format!("models.base: {} does not hold a commit hash", refs.display())));
        }
        let snapshot = snapshots.join(hash);
        if !snapshot.is_dir() {
            return Err(Error::Input(format!(
                "models.base: {} names snapshot {hash}, but {} is not a folder",
                refs.display(),
                snapshot.display()
            )));
        }
        Ok(Some(snapshot))
    }

    /// The path a component's loader takes: its own path, else the base (a pipeline folder, whose
    /// subfolder the loader picks, or the single file).
    pub fn component(&self, component: Component) -> Result<PathBuf> {
        if let Some(path) = self.own(component) {
            return Ok(path.clone());
        }
        self.resolved_base()?
            .ok_or_else(|| Error::Input(format!("models: no {} and no base to take it from", component.name())))
    }

    /// The tokenizer folder to read, or None for the built-in CLIP vocabulary.
    pub fn tokenizer_dir(&self) -> Result<Option<PathBuf>> {
        if let Some(dir) = &self.tokenizer {
            return Ok(Some(dir.clone()));
        }
        Ok(self.resolved_base()?.map(|b| b.join("tokenizer")).filter(|d| d.join("vocab.json").is_file()))
    }

    fn problems(&self, problems: &mut Vec<String>) {
        if let Some(dir) = &self.tokenizer {
            exists("models.tokenizer", dir, problems);
        }
        for component in Component::ALL {
            if let Some(path) = self.own(component) {
                exists(&format!("models.{}", component.name()), path, problems);
            }
        }
        if let Some(path) = &self.motion_adapter {
            exists("models.motion_adapter", path, problems);
        }
        let missing: Vec<&str> = Component::ALL.iter().filter(|&&c| self.own(c).is_none()).map(|c| c.name()).collect();
        if missing.is_empty() {
            return;
        }
        let Some(base) = &self.base else {
            problems.push(format!("models: no base and no {} (give base, or each of them)", missing.join(", ")));
            return;
        };
        if !base.exists() {
            problems.push(format!("models.base: {}: no such file or folder", base.display()));
            return;
        }
        match self.resolved_base() {
            Err(e) => problems.push(message(e)),
            Ok(Some(folder)) if folder.is_dir() => {
                let absent: Vec<&str> = missing.iter().copied().filter(|sub| !folder.join(sub).is_dir()).collect();
                if !absent.is_empty() {
                    problems.push(format!(
                        "models.base: {} has no {} subfolder{} (a diffusers SDXL folder has unet/, vae/, text_encoder/ \
                         and text_encoder_2/)",
                        folder.display(),
                        absent.join("/, ") + "/",
                        if absent.len() > 1 { "s" } else { "" }
                    ));
                }
            }
            Ok(_) => {
                if !base.is_file() {
                    problems.push(format!(
                        "models.base: {} is neither a folder nor a regular file (a single-file checkpoint)",
                        base.display()
                    ));
                }
            }
        }
    }
}

/// `entries` (the list at `field`) as the LoRA loader takes them; a role that does not parse is an
/// error.
fn lora_specs_of(entries: &[LoraEntry], field: &str) -> Result<Vec<LoraSpec>> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let role = match &entry.role {
                Some(name) => {
                    Some(name.parse::<Role>().map_err(|e| Error::Input(format!("{field}[{i}].role: {}", message(e))))?)
                }
                None => None,
            };
            let mut spec = LoraSpec::new(&entry.path, entry.weight, role);
            spec.text_encoder = entry.text_encoder_weight.unwrap_or(entry.weight);
            Ok(spec)
        })
        .collect()
}

/// A problem when `path` is neither a file nor a folder.
fn exists(field: &str, path: &Path, problems: &mut Vec<String>) {
    if !path.exists() {
        problems.push(format!("{field}: {}: no such file or folder", path.display()));
    }
}

/// A problem when `path` is not a regular file.
fn regular_file(field: &str, path: &Path, problems: &mut Vec<String>) {
    if !path.is_file() {
        let why = if path.exists() { "not a regular file" } else { "no such file" };
        problems.push(format!("{field}: {}: {why}", path.display()));
    }
}

fn is_png(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

/// OpenPose JSON (the OpenPose output format), which an openpose entry draws into skeletons.
pub fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

impl ControlNetEntry {
    /// Whether the entry is a ControlNet Union's (it lists conditions).
    pub fn is_union(&self) -> bool {
        !self.conditions.is_empty()
    }

    /// The entry's hint inputs as plain entries, one per condition of a Union entry (with the
    /// entry's path, start, end and guess mode), else the entry itself: what `control_hints`
    /// takes.
    pub fn hint_entries(&self) -> Vec<ControlNetEntry> {
        if !self.is_union() {
            return vec![self.clone()];
        }
        self.conditions
            .iter()
            .map(|c| ControlNetEntry {
                path: self.path.clone(),
                kind: c.kind.clone(),
                scale: c.scale,
                start: self.start,
                end: self.end,
                guess_mode: self.guess_mode,
                images: c.images.clone(),
                keyframes: c.keyframes.clone(),
                interpolation: c.interpolation.clone(),
                pose_interpolation: c.pose_interpolation.clone(),
                hands: c.hands,
                face: c.face,
                video_timing: c.video_timing.clone(),
                conditions: Vec::new(),
            })
            .collect()
    }

    /// Whether the images are the built-in pose sequence.
    pub fn is_builtin_pose(&self) -> bool {
        self.images.as_os_str() == BUILTIN_POSE
    }

    /// Whether the images are one video file.
    pub fn is_video(&self) -> bool {
        is_video(&self.images) && self.images.is_file()
    }

    /// How a video's frames meet the clip's (`video_timing`, validated).
    pub fn video_timing(&self) -> VideoTiming {
        if self.video_timing == "frames" { VideoTiming::Frames } else { VideoTiming::Time }
    }

    /// The control images in order: the folder's PNGs sorted by name, or the one PNG (empty for
    /// the built-in poses). At most `MAX_FRAMES` are listed.
    pub fn image_files(&self) -> Result<Vec<PathBuf>> {
        if self.is_builtin_pose() {
            return Ok(Vec::new());
        }
        if !self.images.is_dir() {
            return Ok(vec![self.images.clone()]);
        }
        let entries = std::fs::read_dir(&self.images)
            .map_err(|e| Error::Input(format!("{}: cannot list: {e}", self.images.display())))?;
        let mut files = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::Input(format!("{}: cannot list: {e}", self.images.display())))?.path();
            if self.is_hint_file(&path) && path.is_file() {
                if files.len() == MAX_FRAMES {
                    return Err(Error::Input(format!(
                        "{}: more than {MAX_FRAMES} PNGs (a clip has at most {MAX_FRAMES} frames)",
                        self.images.display()
                    )));
                }
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Where each of `count` images sits in the clip (fractions): `keyframes`, or spread evenly.
    pub fn keyframe_positions(&self, count: usize) -> Vec<f32> {
        match &self.keyframes {
            Some(positions) => positions.clone(),
            None if count <= 1 => vec![0.0],
            None => (0..count).map(|i| i as f32 / (count - 1) as f32).collect(),
        }
    }

    /// A PNG, or for kind openpose also an OpenPose JSON file.
    fn is_hint_file(&self, path: &Path) -> bool {
        is_png(path) || self.kind == "openpose" && is_json(path)
    }

    /// The built-in pose sequence has no images to count: it is drawn at the five default keyframes.
    fn image_count(&self) -> Result<usize> {
        if self.is_builtin_pose() { Ok(5) } else { self.image_files().map(|f| f.len()) }
    }

    fn problems(&self, field: &str, problems: &mut Vec<String>) {
        exists(&format!("{field}.path"), &self.path, problems);
        if !(0.0 <= self.start && self.start < self.end && self.end <= 1.0) {
            problems.push(format!(
                "{field}: start {} and end {} must satisfy 0 <= start < end <= 1 (fractions of the sampling steps)",
                self.start, self.end
            ));
        }
        if !self.is_union() {
            for (key, missing) in [("kind", self.kind.is_empty()), ("images", is_empty_path(&self.images))] {
                if missing {
                    problems.push(format!(
                        "{field}.{key}: missing (a ControlNet Union entry lists [[controlnets.conditions]] instead)"
                    ));
                }
            }
            if !self.kind.is_empty() && !is_empty_path(&self.images) {
                self.hint_problems(field, &CONTROLNET_KINDS, problems);
            }
            return;
        }
        // A Union entry's per-image settings live on its conditions: one set on the entry would be
        // ignored, so it is refused.
        let defaults = ControlCondition {
            kind: String::new(),
            images: PathBuf::new(),
            scale: one_f32(),
            keyframes: None,
            interpolation: default_interpolation(),
            pose_interpolation: default_pose_interpolation(),
            hands: yes(),
            face: yes(),
            video_timing: default_video_timing(),
        };
        for (key, set) in [
            ("kind", !self.kind.is_empty()),
            ("images", !is_empty_path(&self.images)),
            ("scale", self.scale != defaults.scale),
            ("keyframes", self.keyframes.is_some()),
            ("interpolation", self.interpolation != defaults.interpolation),
            ("pose_interpolation", self.pose_interpolation != defaults.pose_interpolation),
            ("hands", self.hands != defaults.hands),
            ("face", self.face != defaults.face),
            ("video_timing", self.video_timing != defaults.video_timing),
        ] {
            if set {
                problems.push(format!(
                    "{field}.{key}: a ControlNet Union entry takes {key} on each of its conditions \
                     ([[controlnets.conditions]]), not on the entry"
                ));
            }
        }
        if self.conditions.len() > MAX_UNION_CONDITIONS {
            problems.push(format!(
                "{field}.conditions: {} conditions; a Union takes at most {MAX_UNION_CONDITIONS} (ProMax's control \
                 types)",
                self.conditions.len()
            ));
        }
        let union_kinds: Vec<&str> = ControlType::NAMES.iter().map(|(n, _)| *n).collect();
        for (j, condition) in self.hint_entries().iter().enumerate() {
            condition.hint_problems(&format!("{field}.conditions[{j}]"), &union_kinds, problems);
        }
    }

    /// The problems of the settings that describe the images (a plain entry's or a Union
    /// condition's), `kinds` the accepted kinds.
    fn hint_problems(&self, field: &str, kinds: &[&str], problems: &mut Vec<String>) {
        if let Err(p) = choice(&format!("{field}.kind"), &self.kind, kinds) {
            problems.push(p);
        }
        if let Err(p) = choice(&format!("{field}.interpolation"), &self.interpolation, &INTERPOLATIONS) {
            problems.push(p);
        }
        if let Err(p) = choice(&format!("{field}.pose_interpolation"), &self.pose_interpolation, &POSE_INTERPOLATIONS) {
            problems.push(p);
        }
        if let Err(p) = choice(&format!("{field}.video_timing"), &self.video_timing, &VIDEO_TIMINGS) {
            problems.push(p);
        }
        let interpolate_poses = self.pose_interpolation == "linear";
        if interpolate_poses && self.kind != "openpose" {
            problems.push(format!(
                "{field}.pose_interpolation: linear moves OpenPose keypoints, for kind openpose (not {})",
                self.kind
            ));
        }
        if !self.scale.is_finite() {
            problems.push(format!("{field}.scale: {} is not a finite number", self.scale));
        }
        let images = format!("{field}.images");
        if self.is_builtin_pose() {
            if self.kind != "openpose" {
                problems.push(format!("{images}: {BUILTIN_POSE} draws poses, for kind openpose (not {})", self.kind));
            }
        } else if !self.images.exists() {
            problems
                .push(format!("{images}: {}: no such file or folder (or \"{BUILTIN_POSE}\")", self.images.display()));
            return;
        } else if self.is_video() {
            if self.keyframes.is_some() {
                problems.push(format!(
                    "{field}.keyframes: {} is a video, which gives every frame its hint; keyframes place images",
                    self.images.display()
                ));
            }
            if interpolate_poses {
                problems.push(format!(
                    "{field}.pose_interpolation: linear needs OpenPose JSON keyframes, and {} is a video",
                    self.images.display()
                ));
            }
            return;
        } else if !(self.images.is_dir() || self.is_hint_file(&self.images) && self.images.is_file()) {
            problems.push(format!(
                "{images}: {}: neither a folder of PNGs, a .png file nor a video ({}) (nor, for openpose, OpenPose \
                 .json)",
                self.images.display(),
                VIDEO_EXTENSIONS.join(", ")
            ));
            return;
        }
        if interpolate_poses
            && let Ok(files) = self.image_files()
            && let Some(png) = files.iter().find(|f| !is_json(f))
        {
            problems.push(format!(
                "{field}.pose_interpolation: linear needs OpenPose JSON keyframes, and {} is not JSON",
                png.display()
            ));
        }
        let count = match self.image_count() {
            Ok(0) => {
                problems.push(format!("{images}: {}: no .png files in the folder", self.images.display()));
                return;
            }
            Ok(count) => count,
            Err(e) => {
                problems.push(format!("{images}: {}", message(e)));
                return;
            }
        };
        if let Some(positions) = &self.keyframes {
            let field = format!("{field}.keyframes");
            if !self.is_builtin_pose() && positions.len() != count {
                problems
                    .push(format!("{field}: {} positions for {count} image(s); give one per image", positions.len()));
            }
            if positions.iter().any(|p| !(0.0..=1.0).contains(p)) {
                problems.push(format!("{field}: {positions:?}: every position is a fraction of the clip in [0, 1]"));
            }
            if positions.is_empty() || positions.windows(2).any(|w| w[0] >= w[1]) {
                problems.push(format!("{field}: {positions:?}: positions must be given and strictly increase"));
            }
        }
    }
}

impl RenderConfig {
    /// Reads a config: `.toml` or `.json`. Errors name the file and the key (unknown keys too).
    pub fn load(path: &Path) -> Result<RenderConfig> {
        let text = io::read_text(path, CONFIG_LIMIT, "render config")?;
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let mut config: RenderConfig = match extension.as_str() {
            "toml" => toml::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?,
            "json" => serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?,
            _ => {
                return Err(Error::Input(format!(
                    "{}: a render config is a .toml or .json file (the extension says which)",
                    path.display()
                )));
            }
        };
        config.rebase(path.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    /// Makes the file's relative paths relative to `folder`, the config file's.
    fn rebase(&mut self, folder: &Path) {
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = folder.join(&*p);
            }
        };
        let models = &mut self.models;
        for path in [
            &mut models.base,
            &mut models.unet,
            &mut models.vae,
            &mut models.text_encoder,
            &mut models.text_encoder_2,
            &mut models.motion_adapter,
            &mut models.tokenizer,
        ]
        .into_iter()
        .flatten()
        {
            rebase(path);
        }
        self.loras.iter_mut().for_each(|l| rebase(&mut l.path));
        for controlnet in &mut self.controlnets {
            rebase(&mut controlnet.path);
            if !controlnet.is_builtin_pose() && !is_empty_path(&controlnet.images) {
                rebase(&mut controlnet.images);
            }
            for condition in &mut controlnet.conditions {
                if condition.images.as_os_str() != BUILTIN_POSE {
                    rebase(&mut condition.images);
                }
            }
        }
        rebase(&mut self.output.root);
        for clip in &mut self.clips {
            clip.loras.iter_mut().flatten().for_each(|l| rebase(&mut l.path));
            for images in clip.control_images.iter_mut().flatten() {
                if images.as_os_str() != BUILTIN_POSE {
                    rebase(images);
                }
            }
        }
    }

    /// Clip `index`'s seed: its own, else `seed + index` (wrapping).
    pub fn clip_seed(&self, index: usize) -> u64 {
        self.clips.get(index).and_then(|c| c.seed).unwrap_or(self.seed.wrapping_add(index as u64))
    }

    /// Clip `index`'s frame count: its own frames or seconds, else the video's.
    pub fn clip_frames(&self, index: usize) -> usize {
        let clip = self.clips.get(index);
        match (clip.and_then(|c| c.frames), clip.and_then(|c| c.seconds)) {
            (Some(frames), _) => frames,
            // `as` saturates; validation refuses what lands outside 1..=MAX_FRAMES.
            (None, Some(seconds)) => (seconds * self.video.fps as f64).round() as usize,
            (None, None) => self.video.frames(),
        }
    }

    /// Clip `index`'s id: its own, else its folder's name `clip_NNN`.
    pub fn clip_id(&self, index: usize) -> String {
        self.clips.get(index).and_then(|c| c.id.clone()).unwrap_or_else(|| format!("clip_{:03}", index + 1))
    }

    /// Clip `index`'s LoRA set: its own list, else the config's.
    pub fn clip_loras(&self, index: usize) -> &[LoraEntry] {
        self.clips.get(index).and_then(|c| c.loras.as_deref()).unwrap_or(&self.loras)
    }

    /// The config as clip `index` renders it: its LoRA set and its control images in place of the
    /// shared ones (every clip kept, so indices, seeds and folders stay those of the whole config).
    pub fn for_clip(&self, index: usize) -> RenderConfig {
        let mut config = self.clone();
        config.loras = self.clip_loras(index).to_vec();
        if let Some(images) = self.clips.get(index).and_then(|c| c.control_images.as_ref()) {
            for (net, images) in config.controlnets.iter_mut().zip(images) {
                net.images = images.clone();
            }
        }
        config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> Result<DType> {
        DType::parse(self.dtype.trim()).map_err(|e| Error::Input(format!("dtype: {}", message(e))))
    }

    /// Which linears run in FP8.
    pub fn fp8(&self) -> Result<Fp8Linears> {
        Fp8Linears::parse(&self.fp8).map_err(|e| e.with_prefix("fp8: "))
    }

    /// Where to run; "cuda" on a machine without a GPU is `Error::NoDevice`.
    pub fn device(&self) -> Result<Device> {
        Device::parse(&self.device)
    }

    /// The LoRAs as the loader takes them; an entry whose role does not parse is an error.
    pub fn lora_specs(&self) -> Result<Vec<LoraSpec>> {
        lora_specs_of(&self.loras, "loras")
    }

    /// Checks the whole config; every problem found is listed in the one `Error::Input`.
    pub fn validate(&self) -> Result<()> {
        problems_error(self.problems())
    }

    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.models.problems(&mut problems);
        self.lora_problems("loras", &self.loras, &mut problems);
        for (i, controlnet) in self.controlnets.iter().enumerate() {
            // Checked as each clip uses it when every clip brings its own control images.
            let all_own = !self.clips.is_empty()
                && self.clips.iter().all(|c| c.control_images.as_ref().is_some_and(|images| images.len() > i));
            if !all_own {
                controlnet.problems(&format!("controlnets[{i}]"), &mut problems);
            }
        }
        self.sampler_problems(&mut problems);
        self.video_problems(&mut problems);
        self.clip_problems(&mut problems);
        if let Err(e) = self.dtype() {
            problems.push(message(e));
        }
        if let Err(p) = choice("device", &self.device, &DEVICES) {
            problems.push(p);
        }
        if let Err(p) = choice("lora_restore", &self.lora_restore, &LORA_RESTORES) {
            problems.push(p);
        }
        match self.fp8() {
            Err(e) => problems.push(message(e)),
            Ok(Fp8Linears::Off) => {}
            Ok(_) if self.dtype().is_ok_and(|d| d == DType::F32) => {
                problems.push("fp8: FP8 linears quantize f16 or bf16 weights; dtype is f32".into())
            }
            Ok(_) => {}
        }
        if let Err(e) = self.output.mp4_choice() {
            problems.push(message(e));
        }
        // The resolved config is written as JSON, which holds only UTF-8 paths.
        if let Err(e) = serde_json::to_value(self) {
            problems.push(format!("a path in the config: {e}"));
        }
        problems
    }

    /// Problems of the LoRA list `entries` at `field` (the config's, or a clip's own set).
    fn lora_problems(&self, field: &str, entries: &[LoraEntry], problems: &mut Vec<String>) {
        for (i, lora) in entries.iter().enumerate() {
            regular_file(&format!("{field}[{i}].path"), &lora.path, problems);
            for (key, weight) in [("weight", Some(lora.weight)), ("text_encoder_weight", lora.text_encoder_weight)] {
                if let Some(w) = weight.filter(|w| !w.is_finite()) {
                    problems.push(format!("{field}[{i}].{key}: {w} is not a finite number"));
                }
            }
        }
        match lora_specs_of(entries, field) {
            Err(e) => problems.push(message(e)),
            Ok(specs) => {
                if let Err(e) = roles::check(&specs) {
                    problems.push(format!("{field}: {}", message(e)));
                }
                if self.models.motion_adapter.is_none() {
                    for spec in specs.iter().filter(|s| s.role == Some(Role::Motion)) {
                        problems.push(format!(
                            "{field}: {} is a motion LoRA, which needs models.motion_adapter",
                            spec.path.display()
                        ));
                    }
                }
            }
        }
    }

    fn sampler_problems(&self, problems: &mut Vec<String>) {
        let sampler = &self.sampler;
        if !(0.0..=1.0).contains(&sampler.cfg_rescale) {
            problems.push(format!("sampler.cfg_rescale: {}; it must be in [0, 1]", sampler.cfg_rescale));
        }
        match SamplerKind::parse(&sampler.name) {
            Err(e) => problems.push(format!("sampler.name: {}", message(e))),
            Ok(kind) => {
                let (lo, hi) = SamplerSettings::cfg_range(kind);
                if !(lo..=hi).contains(&sampler.cfg) {
                    problems.push(format!("sampler.cfg: {} for {kind}; it must be in {lo}..={hi}", sampler.cfg));
                }
                if let Err(e) = sampler.sampler_config() {
                    problems.push(message(e));
                }
            }
        }
    }

    fn video_problems(&self, problems: &mut Vec<String>) {
        let video = &self.video;
        for (key, side) in [("width", video.width), ("height", video.height)] {
            if side % 8 != 0 || !(SIDE_MIN..=SIDE_MAX).contains(&side) {
                problems.push(format!(
                    "video.{key}: {side}; it must be a multiple of 8 (the VAE's scale) in {SIDE_MIN}..={SIDE_MAX}"
                ));
            }
        }
        let fps_ok = (1..=FPS_MAX).contains(&video.fps);
        if !fps_ok {
            problems.push(format!("video.fps: {}; it must be in 1..={FPS_MAX}", video.fps));
        }
        if video.frames.is_some() && video.seconds.is_some() {
            problems.push("video: give frames or seconds, not both".into());
        }
        match video.seconds {
            Some(seconds) if !(seconds.is_finite() && seconds > 0.0) => {
                problems.push(format!("video.seconds: {seconds}; it must be a positive number"));
            }
            // Frames counted from a bad fps would only repeat the fps problem.
            Some(_) if video.frames.is_none() && !fps_ok => {}
            Some(_) if video.frames.is_none() => self.frame_count_problem("video.seconds", video.frames(), problems),
            _ => self.frame_count_problem("video.frames", video.frames(), problems),
        }
        if !(1..=MAX_CONTEXT_LENGTH).contains(&video.context_length) {
            problems.push(format!(
                "video.context_length: {}; it must be in 1..={MAX_CONTEXT_LENGTH} (the motion module's positions)",
                video.context_length
            ));
        }
        if video.context_overlap >= video.context_length {
            problems.push(format!(
                "video.context_overlap: {}; it must be less than context_length {}",
                video.context_overlap, video.context_length
            ));
        }
        for (key, value, names) in [
            ("context_schedule", &video.context_schedule, &CONTEXT_SCHEDULES[..]),
            ("fuse", &video.fuse, &FUSE_METHODS[..]),
            ("long_video", &video.long_video, &LONG_VIDEO_MODES[..]),
        ] {
            if let Err(p) = choice(&format!("video.{key}"), value, names) {
                problems.push(p);
            }
        }
        if !(0.0..=1.0).contains(&video.chain_strength) {
            problems.push(format!("video.chain_strength: {}; it must be in [0, 1]", video.chain_strength));
        }
        if video.vae_chunk_frames == 0 {
            problems.push("video.vae_chunk_frames: 0; it must be at least 1".into());
        }
        if let Some(free_init) = &video.free_init {
            self.free_init_problems(free_init, problems);
        }
    }

    fn free_init_problems(&self, free_init: &FreeInitSettings, problems: &mut Vec<String>) {
        let before = problems.len();
        free_init.problems("video.free_init", problems);
        if self.video.long_video == "chain" {
            problems.push(
                "video.free_init: needs video.long_video = \"windows\" (chained segments start from the previous \
                 segment's last latent, not from noise)"
                    .into(),
            );
        }
        if problems.len() > before || !free_init.use_fast_sampling {
            return;
        }
        // Coarse-to-fine passes run fewer steps, which the sampler must accept too.
        for pass in 0..free_init.iterations {
            let steps = free_init.steps(self.sampler.steps, pass);
            let sampler = SamplerSettings { steps, ..self.sampler.clone() };
            if steps != self.sampler.steps
                && let Err(e) = sampler.sampler_config().and_then(|c| Sampler::new(&c))
            {
                problems.push(format!(
                    "video.free_init.use_fast_sampling: pass {} of {} runs {steps} steps: {}",
                    pass + 1,
                    free_init.iterations,
                    message(e)
                ));
                return;
            }
        }
    }

    /// A problem when a clip's frame count is out of range or needs a motion adapter it lacks.
    fn frame_count_problem(&self, field: &str, frames: usize, problems: &mut Vec<String>) {
        if !(1..=MAX_FRAMES).contains(&frames) {
            problems.push(format!("{field}: {frames} frames; a clip has 1..={MAX_FRAMES}"));
        } else if frames > 1 && self.models.motion_adapter.is_none() {
            problems.push(format!(
                "{field}: {frames} frames need models.motion_adapter (without it only 1-frame clips render)"
            ));
        }
    }

    fn clip_problems(&self, problems: &mut Vec<String>) {
        if self.clips.is_empty() {
            problems.push("clips: none; give at least one clip (a prompt)".into());
        }
        let mut ids: HashMap<String, usize> = HashMap::new();
        for (i, clip) in self.clips.iter().enumerate() {
            let field = format!("clips[{i}]");
            if clip.prompt.trim().is_empty() {
                problems.push(format!("{field}.prompt: empty"));
            }
            let id = self.clip_id(i);
            let id_ok = !id.is_empty()
                && id.len() <= 128
                && !id.starts_with('.')
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !id_ok {
                problems.push(format!(
                    "{field}.id: {id:?}; use 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'"
                ));
            }
            if let Some(first) = ids.insert(id.clone(), i) {
                problems.push(format!("{field}.id: {id:?} is clips[{first}]'s id too; ids must be unique"));
            }
            if clip.frames.is_some() && clip.seconds.is_some() {
                problems.push(format!("{field}: give frames or seconds, not both"));
            }
            match (clip.frames, clip.seconds) {
                (Some(frames), _) => self.frame_count_problem(&format!("{field}.frames"), frames, problems),
                (None, Some(seconds)) if !(seconds.is_finite() && seconds > 0.0) => {
                    problems.push(format!("{field}.seconds: {seconds}; it must be a positive number"));
                }
                (None, Some(_)) => self.frame_count_problem(&format!("{field}.seconds"), self.clip_frames(i), problems),
                (None, None) => {}
            }
            if let Some(loras) = &clip.loras {
                self.lora_problems(&format!("{field}.loras"), loras, problems);
            }
            if let Some(images) = &clip.control_images {
                if images.len() != self.controlnets.len() {
                    problems.push(format!(
                        "{field}.control_images: {} entries for {} controlnets; give one per controlnets entry",
                        images.len(),
                        self.controlnets.len()
                    ));
                } else {
                    for (k, net) in self.for_clip(i).controlnets.iter().enumerate() {
                        net.problems(&format!("{field}.control_images[{k}] (controlnets[{k}])"), problems);
                    }
                }
            }
            let frames = self.clip_frames(i);
            if !(1..=MAX_FRAMES).contains(&frames) {
                continue; // already a problem of the frame count
            }
            let mut previous: Option<usize> = None;
            for (k, key) in clip.prompt_schedule.iter().enumerate() {
                let key_field = format!("{field}.prompt_schedule[{k}]");
                if key.frame >= frames {
                    problems.push(format!("{key_field}.frame: {}; the clip's frames are 0..{frames}", key.frame));
                }
                if previous.is_some_and(|p| key.frame <= p) {
                    problems.push(format!("{key_field}.frame: {}; frames must increase", key.frame));
                }
                if key.prompt.trim().is_empty() {
                    problems.push(format!("{key_field}.prompt: empty"));
                }
                previous = Some(key.frame);
            }
        }
    }

    /// Settings that run but stray from what the models were made for.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let specs = self.lora_specs().unwrap_or_default();
        warnings.extend(roles::check(&specs).unwrap_or_default());
        if let Ok(kind) = SamplerKind::parse(&self.sampler.name) {
            let has_lcm_lora = specs.iter().any(|s| s.role == Some(Role::Lcm));
            if kind.uses_distillation_grid() {
                if self.sampler.steps > 8 {
                    warnings.push(format!(
                        "WARNING: sampler {kind}: {} steps; distilled LoRAs are made for 1-8 (4-6 recommended)",
                        self.sampler.steps
                    ));
                }
                if self.sampler.cfg > 2.0 {
                    warnings.push(format!(
                        "WARNING: sampler {kind}: cfg {}; 1.0-2.0 is recommended with LCM/TCD LoRAs",
                        self.sampler.cfg
                    ));
                }
                if kind == SamplerKind::Lcm && !has_lcm_lora {
                    warnings.push(
                        "WARNING: sampler lcm without a LoRA of role lcm: it needs the LCM-LoRA (or an LCM-distilled UNet)"
                            .into(),
                    );
                }
            } else if has_lcm_lora {
                warnings.push(format!(
                    "WARNING: an LCM-LoRA with sampler {kind}: the LCM-LoRA is made for the lcm sampler at 4-8 steps"
                ));
            }
        }
        if self.video.context_length != DEFAULT_FRAMES && self.models.motion_adapter.is_some() {
            warnings.push(format!(
                "WARNING: video.context_length {}: the SDXL motion module was trained on {DEFAULT_FRAMES}-frame windows",
                self.video.context_length
            ));
        }
        warnings
    }

    /// A copy with every default written out: frames and seeds per clip, frame 0 of prompt
    /// schedules, text-encoder weights, keyframe positions, the sampler's spacing (or TCD's γ).
    pub fn resolved(&self) -> RenderConfig {
        let mut resolved = self.clone();
        resolved.video.frames = Some(self.video.frames());
        resolved.video.seconds = None;
        for (i, clip) in resolved.clips.iter_mut().enumerate() {
            clip.seed = Some(self.clip_seed(i));
            clip.frames = Some(self.clip_frames(i));
            clip.seconds = None;
            if !clip.prompt_schedule.is_empty() {
                clip.prompt_schedule = clip.prompt_keys();
            }
        }
        for lora in &mut resolved.loras {
            lora.text_encoder_weight = Some(lora.text_encoder_weight.unwrap_or(lora.weight));
        }
        for controlnet in &mut resolved.controlnets {
            if controlnet.is_union() {
                let hints = controlnet.hint_entries();
                for (condition, hint) in controlnet.conditions.iter_mut().zip(hints) {
                    if let Ok(count) = hint.image_count() {
                        condition.keyframes = Some(hint.keyframe_positions(count));
                    }
                }
            } else if let Ok(count) = controlnet.image_count() {
                controlnet.keyframes = Some(controlnet.keyframe_positions(count));
            }
        }
        if let Ok(config) = self.sampler.sampler_config() {
            if config.kind.uses_distillation_grid() {
                resolved.sampler.eta = (config.kind == SamplerKind::Tcd).then(|| config.eta());
            } else {
                resolved.sampler.spacing = Some(config.spacing().name().into());
            }
        }
        resolved
    }

    /// The resolved config (`resolved`) as JSON, for the output's configs/pipeline_config.json.
    pub fn resolved_json(&self) -> serde_json::Value {
        // Only a path that is not UTF-8 fails to serialise, and `validate` refuses those.
        serde_json::to_value(self.resolved()).unwrap_or(serde_json::Value::Null)
    }
}

/// Every problem found in a render config as the one `Error::Input` that lists them (Ok when none).
pub(crate) fn problems_error(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::Input(format!(
        "{} problem{} in the render config:\n  - {}",
        problems.len(),
        if problems.len() > 1 { "s" } else { "" },
        problems.join("\n  - ")
    )))
}
