//! `celframe render`: a validated [`RenderConfig`] to clips in the outputs tree.
//!
//! Per clip: the prompts (and the prompt schedule's keys) are encoded once; the initial latents
//! come from our counter-based generator (or an injected noise file); every sampler evaluation
//! runs the UNet (with the motion modules for videos) on each context window as one classifier-
//! free-guidance batch `[uncond frames..., cond frames...]` (diffusers `AnimateDiffSDXLPipeline`'s
//! layout), adds the ControlNets' residuals, combines the halves with CFG, fuses overlapping
//! windows and hands the result to the sampler; the VAE then decodes the latents in chunks and
//! the frames go to the PNG pool and the mp4 encoder while the next chunk decodes.
//!
//! Latent layout on the host: frame-major NHWC, frame f occupying `[f * frame_len, (f + 1) *
//! frame_len)` with `frame_len = h * w * channels`. The generator draws element `f * frame_len +
//! e` of a stream for element e of frame f, so a frame's noise depends on the seed and the frame
//! only: the same seed gives the same frames whatever the window layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::ScopedJoinHandle;
use std::time::Instant;

use crate::control::builtin::waving_figure;
use crate::control::canny::{CANNY_HIGH, CANNY_LOW, canny};
use crate::control::depth::{DepthMap, DepthRange, depth_hint, load_depth_png};
use crate::control::image::load_image_png;
use crate::control::keyframes::{Interpolation, KeyframeSchedule};
use crate::control::pose::{PoseFrame, draw_pose, interpolate_pose, load_openpose};
use crate::control::prepare::{prepare_control_images, resize_lanczos};
use crate::control::video::{VideoRequest, VideoTools, read_video_depth, read_video_rgb};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Error, Result};
use crate::gpu::profile::format_rows;
use crate::gpu::{Arena, Gpu, nvtx};
use crate::models::clip::conditioning::{Conditioning, SdxlTextEncoders, time_ids};
use crate::models::clip::{ClipCheckpoint, ClipTextModel, TextEncoderKind, open_text_encoder};
use crate::models::controlnet::{
    ControlNet, ControlNetCheckpoint, ControlNetUnion, ControlScale, ControlType, UnionEmbedded, UnionOptions,
    open_controlnet_with_base,
};
use crate::models::layout::video_to_rows;
use crate::models::lora::device::Restore;
use crate::models::lora::{self, Component as LoraComponent, Loras, Targets};
use crate::models::transformer::{CrossKv, Fp8Linears, TextContext};
use crate::models::vae::{DecodeOptions, Vae, VaeCheckpoint, open_vae};
use crate::models::weights::Fp8SourcePlan;
use crate::models::{
    Frames, ModelWeights, MotionCheckpoint, MotionModules, Place, Unet, UnetCheckpoint, UnetInputs, UnetResiduals,
    open_motion, open_unet, with_loras,
};
use crate::ops::elementwise::{add, scale_rows};
use crate::ops::rows::{gather_rows, scatter_rows};
use crate::ops::{Exec, par_rows};
use crate::output::{ClipOptions, ClipReport, ClipWriter, Fps, OutputTree, RgbImage};
use crate::pipeline::batch::{ClipSeconds, RunReport, Shard, lora_groups, preflight, shard_clips, write_prompt_grid};
use crate::pipeline::config::{Component, ControlNetEntry, LoraEntry, RenderConfig, is_json};
use crate::pipeline::devices::{DeviceSplit, Devices, HelperKind, WindowJob, lead_sharing};
use crate::pipeline::free_init::mix_frequencies;
use crate::pipeline::graphs::{self, GraphKey, WindowGraphs};
use crate::pipeline::lora_switch::{DeviceLoras, PreparedLoras};
use crate::pipeline::noise_init::freenoise_frame_sources;
use crate::pipeline::resume::{ClipResume, Stage, check_stop, clip_identity, stop_signal};
use crate::pipeline::windows::{ContextOptions, Fuse, Fuser, Schedule, gather};
use crate::sampling::{
    NoiseRequest, NoiseSource, NoiseStream, Purpose, Sampler, SamplerConfig, cfg_combine, cfg_rescale, stream_id,
};
use crate::tensor::{DType, Tensor};
use crate::text::Tokenizer;
use crate::verify::Device;
use crate::verify::arenas::weight_bytes;
use crate::weights;

/// What a run takes besides the config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    /// A safetensors file of injected noise (`latents`, `step.<i>`: diffusers' layouts), so a run
    /// can match a diffusers run exactly.
    pub noise: Option<PathBuf>,
    /// Print a GPU time table per model part and kind of pass.
    pub timings: bool,
    /// Keep each clip's final latents and f32 frames in the report (tests).
    pub keep_tensors: bool,
    /// One clip's work over several devices of this host (`pipeline::devices`); None: one device.
    pub split: Option<DeviceSplit>,
}

/// Seconds spent per stage.
#[derive(Clone, Debug, Default)]
pub struct StageTimes {
    pub text: f64,
    pub denoise: f64,
    pub decode_and_write: f64,
}

/// One clip's result.
#[derive(Clone, Debug)]
pub struct ClipOutcome {
    /// 0-based; its folder is `video/clip_{index + 1:03}`.
    pub index: usize,
    /// Complete from an earlier run, not rendered again.
    pub skipped: bool,
    pub frames: usize,
    pub times: StageTimes,
    /// With `keep_tensors`: the final latents, frame-major NHWC [frames, h, w, c] f32.
    pub latents: Option<Tensor>,
    /// With `keep_tensors`: the frames in [0, 1] before 8-bit rounding, [frames, H, W, 3] f32.
    pub images: Option<Tensor>,
    /// Where the mp4 went, and which encoder wrote it.
    pub mp4: Option<(PathBuf, String)>,
}

pub struct RenderReport {
    pub clips: Vec<ClipOutcome>,
    /// Lines for the closing summary.
    pub summary: Vec<String>,
}

/// Every checkpoint of the run, opened (weights mapped, not yet converted), with the LoRA
/// targets they offer.
pub(super) struct Checkpoints {
    unet: UnetCheckpoint,
    motion: Option<MotionCheckpoint>,
    vae: VaeCheckpoint,
    clip_l: ClipCheckpoint,
    clip_g: ClipCheckpoint,
    controlnets: Vec<ControlNetCheckpoint>,
    /// Per ControlNet entry: its conditions' control types when the checkpoint is a Union.
    union_types: Vec<Option<Vec<ControlType>>>,
    /// Every weight a LoRA may adapt, under every spelling the formats use.
    targets: Targets,
    tokenizer: Tokenizer,
}

impl Checkpoints {
    fn open(config: &RenderConfig) -> Result<Checkpoints> {
        let models = &config.models;
        let unet = open_unet(&models.component(Component::Unet)?)?;
        let motion = models.motion_adapter.as_deref().map(open_motion).transpose()?;
        if let Some(m) = &motion {
            m.config.check_unet(&unet.config)?;
        }
        let vae = open_vae(&models.component(Component::Vae)?)?;
        let clip_l = open_text_encoder(&models.component(Component::TextEncoder)?, TextEncoderKind::ClipL)?;
        let clip_g = open_text_encoder(&models.component(Component::TextEncoder2)?, TextEncoderKind::ClipG)?;
        // A Control-LoRA is built on the render's UNet; other ControlNets hold their own encoder.
        let base = models.component(Component::Unet)?;
        let controlnets = config
            .controlnets
            .iter()
            .map(|c| open_controlnet_with_base(&c.path, Some(&base)))
            .collect::<Result<Vec<_>>>()?;
        let union_types = config
            .controlnets
            .iter()
            .zip(&controlnets)
            .enumerate()
            .map(|(i, (entry, checkpoint))| union_types(&format!("controlnets[{i}]"), entry, checkpoint))
            .collect::<Result<Vec<_>>>()?;
        let mut targets = Targets::new();
        targets.add_unet(&unet)?;
        targets.add_text_encoder(&clip_l)?;
        targets.add_text_encoder(&clip_g)?;
        if let Some(m) = &motion {
            targets.add_motion(m)?;
        }
        let tokenizer = match models.tokenizer_dir()? {
            Some(dir) => Tokenizer::from_dir(&dir)?,
            None => Tokenizer::clip()?,
        };
        Ok(Checkpoints { unet, motion, vae, clip_l, clip_g, controlnets, union_types, targets, tokenizer })
    }

    /// `config`'s LoRA set resolved against the models (None: no LoRA).
    pub(super) fn resolve_loras(&self, config: &RenderConfig) -> Result<Option<Loras>> {
        let specs = config.lora_specs()?;
        if specs.is_empty() { Ok(None) } else { Ok(Some(lora::resolve(&specs, &self.targets, false)?)) }
    }

    /// Device bytes of every model's weights in `dtype`.
    fn weight_bytes(&self, dtype: DType) -> usize {
        self.adaptable_bytes(dtype)
            + weight_bytes(&self.vae.weights, dtype)
            + self.controlnets.iter().map(|c| weight_bytes(&c.weights, dtype)).sum::<usize>()
    }

    /// The weights of the UNet, motion modules and ControlNets that get FP8 twins with `which` in
    /// `dtype` (each model's `fp8_source_plan`), from the checkpoints' shapes.
    fn fp8_plan(&self, which: Fp8Linears, dtype: DType) -> Result<Fp8SourcePlan> {
        let mut plan = Unet::fp8_source_plan(&self.unet, which, dtype)?;
        if let Some(m) = &self.motion {
            plan = plan + MotionModules::fp8_source_plan(m, which, dtype)?;
        }
        for c in &self.controlnets {
            plan = plan + ControlNet::fp8_source_plan(c, which, dtype)?;
        }
        Ok(plan)
    }

    /// Device bytes of the weights of the models LoRAs adapt (UNet, text encoders, motion modules):
    /// what base copies for switching sets take at most.
    fn adaptable_bytes(&self, dtype: DType) -> usize {
        weight_bytes(&self.unet.weights, dtype)
            + weight_bytes(&self.clip_l.weights, dtype)
            + weight_bytes(&self.clip_g.weights, dtype)
            + self.motion.as_ref().map_or(0, |m| weight_bytes(&m.weights, dtype))
    }
}

/// A Union checkpoint's control types for `entry`'s conditions (a plain-form entry is one
/// condition of its kind), checked against the model; None for a plain ControlNet, which takes
/// no conditions.
fn union_types(
    field: &str,
    entry: &ControlNetEntry,
    checkpoint: &ControlNetCheckpoint,
) -> Result<Option<Vec<ControlType>>> {
    let Some(union) = &checkpoint.config.union else {
        if entry.is_union() {
            return Err(Error::Input(format!(
                "{field}.conditions: {} is a plain ControlNet; conditions are for a ControlNet Union / ProMax \
                 checkpoint (give the entry's kind and images instead)",
                entry.path.display()
            )));
        }
        return Ok(None);
    };
    let mut types = Vec::new();
    for (j, hint) in entry.hint_entries().iter().enumerate() {
        let at = if entry.is_union() { format!("{field}.conditions[{j}].kind") } else { format!("{field}.kind") };
        let t = ControlType::parse(&hint.kind)
            .map_err(|e| Error::Input(format!("{at}: {} is a Union: {e}", entry.path.display())))?;
        if t.0 >= union.control_types {
            return Err(Error::Input(format!(
                "{at}: {} ({}) is control type {}; {} has {} types{}",
                hint.kind,
                t.name(),
                t.0,
                entry.path.display(),
                union.control_types,
                if union.control_types == 6 { " (tile and repaint need the ProMax model)" } else { "" }
            )));
        }
        types.push(t);
    }
    Ok(Some(types))
}

/// A prepared ControlNet: plain, or a Union with its entry's control types (one per condition).
/// (Boxed: a Union is the larger by its own modules' weights.)
enum Net {
    Plain(Box<ControlNet>),
    Union { net: Box<ControlNetUnion>, types: Vec<ControlType> },
}

impl Net {
    /// The weights where its FP8 linears are (a Union's ControlNet part).
    fn fp8_weights(&mut self) -> &mut ModelWeights {
        match self {
            Net::Plain(net) => net.weights_mut(),
            Net::Union { net, .. } => net.net_weights_mut(),
        }
    }
}

/// The models prepared for one place.
pub(super) struct Models {
    text: SdxlTextEncoders,
    unet: Unet,
    motion: Option<MotionModules>,
    vae: Vae,
    controlnets: Vec<Net>,
}

/// What `Models::new` did about FP8 linears.
#[derive(Default)]
pub(super) struct Fp8Load {
    /// Weights that got e4m3 twins.
    twins: usize,
    /// Bytes the twins hold.
    twin_bytes: usize,
    /// The ControlNets' 16-bit weights dropped as they loaded (weights, bytes).
    dropped: (usize, usize),
}

impl Models {
    /// The models in `place`, with `loras` merged on the host as they convert (the CPU path; on
    /// CUDA the models load once without them and `DeviceLoras` switches sets on the device), and
    /// e4m3 twins (on `ex`) for the linears of the UNet, motion modules and ControlNets that `fp8`
    /// takes, made as each model loads. A ControlNet's twins are final at once (no LoRA set adapts
    /// one), so where `place` put its 16-bit weights in the FP8 sources' arena they go back to it
    /// before the next model loads: the load holds the UNet's, the motion modules' and one
    /// ControlNet's at most (the first two wait for the LoRA merge: `drop_fp8_sources`). `plan`:
    /// `Checkpoints::fp8_plan` for `fp8`, which the twins made must match.
    pub(super) fn new(
        c: &Checkpoints,
        loras: Option<&Loras>,
        place: Place,
        ex: &Exec,
        fp8: Fp8Linears,
        plan: &Fp8SourcePlan,
    ) -> Result<(Models, Fp8Load)> {
        let merge = |component| loras.and_then(|l| l.merge(component));
        let mut load = Fp8Load::default();
        let twins = |w: &mut ModelWeights| w.enable_fp8(ex, |name, shape| fp8.takes(name, shape));
        let mut unet = Unet::new(&c.unet, with_loras(&place, merge(LoraComponent::Unet)))?;
        load.twins += twins(unet.weights_mut())?;
        let motion = match &c.motion {
            Some(m) => {
                let mut motion = MotionModules::new(m, &unet, with_loras(&place, merge(LoraComponent::Motion)))?;
                load.twins += twins(motion.weights_mut())?;
                Some(motion)
            }
            None => None,
        };
        // The models with FP8 linears are the UNet, the motion modules and the ControlNets.
        let plain = place.without_fp8_sources();
        let clip_l = ClipTextModel::new(&c.clip_l, with_loras(&plain, merge(LoraComponent::TextEncoder)))?;
        let clip_g = ClipTextModel::new(&c.clip_g, with_loras(&plain, merge(LoraComponent::TextEncoder2)))?;
        let text = SdxlTextEncoders::new(clip_l, clip_g)?;
        let vae = Vae::new(&c.vae, plain)?;
        let mut controlnets = Vec::with_capacity(c.controlnets.len());
        for (ck, types) in c.controlnets.iter().zip(&c.union_types) {
            let mut net = match types {
                None => {
                    let net = ControlNet::new(ck, place)?;
                    net.check_unet(&unet.config)?;
                    Net::Plain(Box::new(net))
                }
                Some(types) => {
                    let net = ControlNetUnion::new(ck, place)?;
                    net.check_unet(&unet.config)?;
                    Net::Union { net: Box::new(net), types: types.clone() }
                }
            };
            let weights = net.fp8_weights();
            load.twins += twins(weights)?;
            let bytes = weights.fp8_source_bytes();
            load.dropped.0 += weights.drop_fp8_sources()?;
            load.dropped.1 += bytes;
            controlnets.push(net);
        }
        let mut models = Models { text, unet, motion, vae, controlnets };
        load.twin_bytes = models.fp8_weights().map(|w| w.fp8_bytes()).sum();
        // A load sizes its arenas by the plan (`GpuModels::load`): it must be what was made.
        let twinned: usize = models.fp8_weights().map(|w| w.fp8_twinned_bytes()).sum();
        if twinned != plan.bytes {
            return Err(Error::Internal(format!(
                "the load gave FP8 twins to {twinned} bytes of 16-bit weights; the plan the arenas are sized by \
                 counted {}",
                plan.bytes
            )));
        }
        Ok((models, load))
    }

    /// The weights of the models with FP8 linears: the UNet, the motion modules, the ControlNets.
    fn fp8_weights(&mut self) -> impl Iterator<Item = &mut ModelWeights> {
        let nets = self.controlnets.iter_mut().map(Net::fp8_weights);
        std::iter::once(self.unet.weights_mut()).chain(self.motion.as_mut().map(MotionModules::weights_mut)).chain(nets)
    }

    /// Drops the 16-bit weights that `new` placed in the FP8 sources' arena, once their twins are
    /// current (`ModelWeights::drop_fp8_sources`); returns how many.
    fn drop_fp8_sources(&mut self) -> Result<usize> {
        self.fp8_weights().map(|w| w.drop_fp8_sources()).sum()
    }

    /// `new` on the host, with the linears `fp8` takes in FP8 (their twins on the host too).
    pub(super) fn on_host(c: &Checkpoints, loras: Option<&Loras>, dtype: DType, fp8: Fp8Linears) -> Result<Models> {
        let plan = c.fp8_plan(fp8, dtype)?;
        Ok(Models::new(c, loras, Place::Host(dtype), &Exec::Cpu, fp8, &plan)?.0)
    }

    /// The weights of every model LoRAs adapt, by component.
    fn adapted(&self) -> Vec<(LoraComponent, &ModelWeights)> {
        let mut list = vec![
            (LoraComponent::Unet, self.unet.weights()),
            (LoraComponent::TextEncoder, self.text.clip_l.weights()),
            (LoraComponent::TextEncoder2, self.text.clip_g.weights()),
        ];
        list.extend(self.motion.iter().map(|m| (LoraComponent::Motion, m.weights())));
        list
    }
}

/// Where the model inputs of a step go: host tensors for the CPU twins, uploads for CUDA.
#[derive(Clone, Copy)]
pub(super) struct Target<'a> {
    pub(super) ex: Exec<'a>,
    pub(super) dtype: DType,
}

impl Target<'_> {
    fn tensor(&self, shape: &[usize], dtype: DType, values: &[f32]) -> Result<Tensor> {
        self.place(Tensor::from_f32(shape, dtype, values)?)
    }

    /// A host tensor where the target computes, in its own dtype.
    fn place(&self, host: Tensor) -> Result<Tensor> {
        match self.ex {
            Exec::Cpu => Ok(host),
            Exec::Cuda { gpu, scratch } => gpu.upload(scratch, &host, host.dtype()),
        }
    }

    fn host_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        match self.ex {
            Exec::Cpu => t.to_f32_vec(),
            Exec::Cuda { gpu, .. } => gpu.download(t)?.to_f32_vec(),
        }
    }
}

/// Renders every clip of `config` into its outputs tree (`render_batch` without a shard).
pub fn render(config: &RenderConfig, options: &RenderOptions) -> Result<RenderReport> {
    render_batch(config, options, None)
}

/// What a batch has done so far.
struct Batch {
    report: RunReport,
    outcomes: Vec<ClipOutcome>,
    summary: Vec<String>,
    /// The first clip that failed and why.
    failure: Option<(usize, Error)>,
}

impl Batch {
    fn fail(&mut self, config: &RenderConfig, index: usize, e: Error) {
        self.mark_failed(config, index, &e.to_string(), e.exit_code());
        if self.failure.is_none() {
            self.failure = Some((index, e));
        }
    }

    fn mark_failed(&mut self, config: &RenderConfig, index: usize, error: &str, exit_code: u8) {
        eprintln!("clip {:03} ({}): failed: {error}", index + 1, config.clip_id(index));
        if let Some(record) = self.report.record(index) {
            record.status = "failed".into();
            record.error = Some(error.to_string());
            record.exit_code = Some(exit_code);
        }
    }
}

/// Renders the clips of `shard` (all without one) into the outputs tree. Everything is checked
/// first (`batch::preflight`); the clips run grouped by LoRA set (`batch::lora_groups`), so each
/// set's weights are prepared once. A clip that fails is recorded in the run report
/// (`configs/run_report.json`, or the shard's) and the batch goes on; the first failure is then
/// returned, with its own exit code. A whole run also writes the prompt grid; shards leave it to
/// `celframe merge-report`.
pub fn render_batch(config: &RenderConfig, options: &RenderOptions, shard: Option<Shard>) -> Result<RenderReport> {
    if let Some(split) = &options.split {
        split.check(config)?;
    }
    preflight(config)?;
    let lora_digests = LoraDigests::start(config);
    let dtype = config.dtype()?;
    let device = config.device()?;
    let clips = shard_clips(config, shard);
    let root = &config.output.root;
    let tree = match shard {
        None => OutputTree::open(root)?,
        Some(s) => {
            let numbers: Vec<u32> = clips.iter().map(|&i| i as u32 + 1).collect();
            OutputTree::open_shard(root, &format!("shard-{}-of-{}", s.index, s.count), &numbers)?
        }
    };
    let mut batch = Batch {
        report: RunReport::pending(config, shard, &clips),
        outcomes: Vec::new(),
        summary: Vec::new(),
        failure: None,
    };
    batch.report.write(&tree)?;
    let noise = options.noise.as_deref().map(|p| weights::open(p, "noise file")).transpose()?;
    let groups = lora_groups(config, &clips);
    let split = options.split.as_ref();
    match device {
        Device::Cpu => {
            if options.timings {
                eprintln!("--timings: the GPU time table needs CUDA; the CPU run reports stage times only");
            }
            match Checkpoints::open(config) {
                Err(e) => fail_group(&mut batch, config, &clips, e),
                Ok(checkpoints) => std::thread::scope(|scope| -> Result<()> {
                    let devices = match split {
                        Some(split) => Devices::spawn(scope, split, &checkpoints, HelperKind::Cpu, dtype)?,
                        None => Devices::lead_only(),
                    };
                    batch.summary.extend(devices.describe());
                    for (loras, members) in &groups {
                        let group = RenderConfig { loras: loras.clone(), ..config.clone() };
                        let started = Instant::now();
                        let pending = devices.begin_group(&group);
                        // The CPU twins merge on the host as the weights convert: one load per LoRA set.
                        let loaded = checkpoints.resolve_loras(&group).and_then(|loras| {
                            Ok((Models::on_host(&checkpoints, loras.as_ref(), dtype, group.fp8()?)?, loras))
                        });
                        let helpers = devices.finish_group(pending);
                        let (models, loras, helper_lines) = match (loaded, helpers) {
                            (Ok((models, loras)), Ok(lines)) => (models, loras, lines),
                            (Err(e), _) | (_, Err(e)) => {
                                fail_group(&mut batch, config, members, e);
                                continue;
                            }
                        };
                        batch.summary.extend(loras.iter().flat_map(|l| l.summary.iter().cloned()));
                        batch.summary.push(format!(
                            "loaded the models on the CPU twins in {:.1} s for {} clip(s)",
                            started.elapsed().as_secs_f64(),
                            members.len()
                        ));
                        batch.summary.extend(helper_lines);
                        let target = Target { ex: Exec::Cpu, dtype };
                        let group = GroupRun {
                            config: &group,
                            options,
                            checkpoints: &checkpoints,
                            models: &models,
                            target,
                            devices: &devices,
                        };
                        render_clips(&group, &tree, members, noise.as_ref(), &mut batch)?;
                    }
                    Ok(())
                })?,
            }
        }
        Device::Cuda => {
            let gpu = match split {
                Some(split) => Gpu::new(split.devices[0])?,
                None => Gpu::from_env()?,
            };
            if options.timings {
                gpu.start_profile();
            }
            let sharing = lead_sharing(split);
            let mut peak = MemoryPeak::default();
            match Checkpoints::open(config) {
                Err(e) => fail_group(&mut batch, config, &clips, e),
                Ok(checkpoints) => std::thread::scope(|scope| -> Result<()> {
                    // One LoRA group: its set is merged once and never restored, so no base copies.
                    let restore = match groups.len() {
                        1 => Restore::Never,
                        _ => Restore::parse(&config.lora_restore)?,
                    };
                    let reserve = lora_reserve(&checkpoints, &groups, restore, dtype);
                    let devices = match split {
                        Some(split) => {
                            let kind = HelperKind::Cuda { restore, reserve };
                            Devices::spawn(scope, split, &checkpoints, kind, dtype)?
                        }
                        None => Devices::lead_only(),
                    };
                    batch.summary.extend(devices.describe());
                    let mut loaded: Option<GpuModels> = None;
                    // The next group's host part (`HostGroup`), made while this group renders: at
                    // most one waits.
                    let mut ahead: Option<Result<HostGroup>> = None;
                    for (g, (loras, members)) in groups.iter().enumerate() {
                        let group = RenderConfig { loras: loras.clone(), ..config.clone() };
                        let pending = devices.begin_group(&group);
                        let host = ahead.take().unwrap_or_else(|| HostGroup::new(&checkpoints, &group, None));
                        let prepared = host.and_then(|host| {
                            prepare_group(&gpu, &checkpoints, &group, host, restore, reserve, sharing, &mut loaded)
                        });
                        let helpers = devices.finish_group(pending);
                        let run = match (prepared, helpers) {
                            (Ok((lines, run)), Ok(helper_lines)) => {
                                batch.summary.extend(lines);
                                batch.summary.extend(helper_lines);
                                run
                            }
                            (Err(e), _) | (_, Err(e)) => {
                                fail_group(&mut batch, config, members, e);
                                continue;
                            }
                        };
                        let switching = run.scratch.take_window_peak();
                        let target = Target { ex: Exec::Cuda { gpu: &gpu, scratch: &run.scratch }, dtype };
                        let group_run = GroupRun {
                            config: &group,
                            options,
                            checkpoints: &checkpoints,
                            models: &run.models,
                            target,
                            devices: &devices,
                        };
                        let next = groups.get(g + 1).map(|(l, _)| RenderConfig { loras: l.clone(), ..config.clone() });
                        let (rendered, next_host) = std::thread::scope(|scope| {
                            let checkpoints = &checkpoints;
                            let adapted = run.models.adapted();
                            let handle = next
                                .as_ref()
                                .map(|next| scope.spawn(move || HostGroup::new(checkpoints, next, Some(&adapted))));
                            let rendered = render_clips(&group_run, &tree, members, noise.as_ref(), &mut batch);
                            let next_host = handle.map(|h| {
                                h.join().unwrap_or_else(|_| {
                                    Err(Error::Internal("the thread preparing the next LoRA set panicked".into()))
                                })
                            });
                            (rendered, next_host)
                        });
                        rendered?;
                        ahead = next_host;
                        let loras = run.loras.as_ref();
                        peak.add(MemoryPeak {
                            weights: run.weights.used() + run.twin_bytes,
                            loading: run.loading,
                            switching,
                            rendering: run.scratch.take_window_peak(),
                            base_copies: loras.map_or(0, DeviceLoras::base_bytes),
                            factors: loras.map_or(0, DeviceLoras::factor_bytes),
                        });
                    }
                    Ok(())
                })?,
            }
            if options.timings {
                let table = format_rows(&gpu.finish_profile()?)?;
                batch.summary.push(format!("GPU time by model part and kind of pass (CUDA events):\n{table}"));
            }
            batch.summary.push(peak.line(if split.is_some() { " of the lead device" } else { "" }));
        }
    }
    if shard.is_none() {
        let cells: Vec<(usize, String)> = clips.iter().map(|&i| (i, config.clips[i].prompt.clone())).collect();
        if let Some(path) = write_prompt_grid(&tree, &cells)? {
            batch.summary.push(format!("prompt grid: {}", path.display()));
        }
    }
    write_configs(config, &tree, lora_digests)?;
    let report_path = batch.report.write(&tree)?;
    let mut outcomes = std::mem::take(&mut batch.outcomes);
    outcomes.sort_by_key(|c| c.index);
    let mut summary = std::mem::take(&mut batch.summary);
    summary.extend(outcomes.iter().filter(|c| !c.skipped).map(|c| {
        let t = &c.times;
        let total = t.text + t.denoise + t.decode_and_write;
        format!(
            "clip {:03}: {} frames in {total:.2} s ({:.2} frames/s): text {:.2} s, denoise {:.2} s, decode + write {:.2} s{}",
            c.index + 1,
            c.frames,
            c.frames as f64 / total.max(1e-9),
            t.text,
            t.denoise,
            t.decode_and_write,
            c.mp4.as_ref().map_or(String::new(), |(p, e)| format!("; {} by {e}", p.display()))
        )
    }));
    let r = &batch.report;
    summary.push(format!(
        "{} clip(s): {} done, {} skipped, {} failed; report {}",
        r.clips.len(),
        r.done,
        r.skipped,
        r.failed,
        report_path.display()
    ));
    if let Some((index, e)) = batch.failure {
        for line in &summary {
            eprintln!("{line}");
        }
        let prefix = format!(
            "{} of {} clip(s) failed (see {}); the first, clip {:03} ({}): ",
            r.failed,
            r.clips.len(),
            report_path.display(),
            index + 1,
            config.clip_id(index)
        );
        return Err(e.with_prefix(&prefix));
    }
    Ok(RenderReport { clips: outcomes, summary })
}

const GIB: f64 = (1u64 << 30) as f64;

/// Every clip of a LoRA group fails with the group's setup error.
fn fail_group(batch: &mut Batch, config: &RenderConfig, members: &[usize], e: Error) {
    let (text, code) = (e.to_string(), e.exit_code());
    for &index in &members[1..] {
        batch.mark_failed(config, index, &text, code);
    }
    batch.fail(config, members[0], e);
}

/// The models on the GPU, their arenas, and how LoRA sets get into them.
pub(super) struct GpuModels {
    pub(super) models: Models,
    /// Base weights with sets switched on the device; None: a set merged on the host at load.
    loras: Option<DeviceLoras>,
    weights: Arena,
    pub(super) scratch: Arena,
    /// Bytes of the FP8 twins (beside the arenas).
    twin_bytes: usize,
    /// Scratch held at most while the models loaded (the 16-bit weights that get FP8 twins).
    loading: usize,
}

impl GpuModels {
    /// Loads every model, with `loras` merged on the host (None: base weights, whose sets
    /// `DeviceLoras` switches). `reserve`: device bytes the scratch arena leaves for switching.
    /// `sharing`: device threads of a split on this one GPU (an ordinal listed more than once),
    /// which share its memory evenly. `fp8`: the config's.
    #[allow(clippy::too_many_arguments)]
    fn load(
        gpu: &Gpu,
        checkpoints: &Checkpoints,
        loras: Option<&Loras>,
        restore: Restore,
        dtype: DType,
        reserve: usize,
        sharing: usize,
        fp8: Fp8Linears,
    ) -> Result<(GpuModels, String)> {
        let started = Instant::now();
        // A run with one LoRA set (Restore::Never) reads the linears it runs in FP8 through their
        // twins only, once the set is merged: their 16-bit weights load into the scratch arena
        // and go back to it then (`GpuModels::drop_fp8_sources`; a ControlNet's at once), for the
        // activations. The weights arena holds the rest.
        let routed = restore == Restore::Never && fp8 != Fp8Linears::Off;
        let plan = checkpoints.fp8_plan(fp8, dtype)?;
        let weights_bytes = checkpoints.weight_bytes(dtype) - if routed { plan.bytes } else { 0 };
        let weights = Arena::new("weights", weights_bytes + (256 << 20))?;
        // The FP8 twins are allocated beside the arenas (with the allocator's rounding).
        let reserve = reserve + if fp8 == Fp8Linears::Off { 0 } else { plan.twin_bytes() + (256 << 20) };
        let scratch = Arena::new("scratch", render_scratch(gpu, weights.capacity(), reserve, sharing)?)?;
        let fp8_sources = routed.then_some((&scratch, fp8));
        let place = Place::Device { gpu, arena: &weights, dtype, fp8_sources };
        let (mut models, fp8_load) =
            Models::new(checkpoints, loras, place, &Exec::Cuda { gpu, scratch: &scratch }, fp8, &plan)?;
        let sources: usize = models.fp8_weights().map(|w| w.fp8_source_bytes()).sum();
        let gib = |bytes: usize| bytes as f64 / GIB;
        let mut fp8_parts = Vec::new();
        if fp8_load.twins > 0 {
            fp8_parts.push(format!("{} linears in FP8: {:.2} GiB more", fp8_load.twins, gib(fp8_load.twin_bytes)));
        }
        if fp8_load.dropped.0 > 0 {
            fp8_parts.push(format!(
                "the ControlNets' {:.2} GiB of 16-bit weights ({} linears) dropped as they loaded",
                gib(fp8_load.dropped.1),
                fp8_load.dropped.0
            ));
        }
        if sources > 0 {
            fp8_parts.push(format!("{:.2} GiB of 16-bit weights to drop once their twins are final", gib(sources)));
        }
        let line = format!(
            "loaded the models onto {} in {:.1} s ({:.2} GiB of weights{}{}; a {:.2} GiB scratch arena)",
            gpu.info().name,
            started.elapsed().as_secs_f64(),
            gib(weights.used() + sources + fp8_load.dropped.1),
            if loras.is_some() { ", LoRAs merged on the host" } else { "" },
            fp8_parts.iter().map(|p| format!(", {p}")).collect::<String>(),
            gib(scratch.capacity())
        );
        let loras = loras.is_none().then(|| DeviceLoras::new(restore));
        // The load's own peak of scratch (the sources held at once), apart from the LoRA merge's.
        let loading = scratch.take_window_peak();
        Ok((GpuModels { models, loras, weights, scratch, twin_bytes: fp8_load.twin_bytes, loading }, line))
    }

    /// Drops the 16-bit weights `load` placed in the scratch arena (their FP8 twins current:
    /// the run's only LoRA set merged); a summary line saying how much memory went back, None
    /// when there were none (`load` places them there for `Restore::Never` only).
    fn drop_fp8_sources(&mut self) -> Result<Option<String>> {
        let before = self.scratch.used();
        let dropped = self.models.drop_fp8_sources()?;
        let freed = before.saturating_sub(self.scratch.used());
        Ok((dropped > 0).then(|| {
            format!(
                "dropped the 16-bit weights of {dropped} FP8 linears (their e4m3 twins serve the forwards): {:.2} GiB back \
                 to the scratch arena",
                freed as f64 / GIB
            )
        }))
    }
}

/// Device memory a render leaves outside its arenas and reserve: the CUDA context, the kernel
/// modules loaded at first launch (ours, cuBLASLt's, cuDNN's), the libraries' workspaces (cuDNN's up
/// to 256 MiB) and CUDA graph executables; none of them grows with the device.
const RENDER_HEADROOM: usize = 2 << 30;

/// A render's scratch arena (activations), placed after the `weights` arena with `reserve` bytes
/// still to come beside them (FP8 twins, LoRA factors and base copies), at least 1 GiB. One render
/// thread on the device takes its free memory less those and `RENDER_HEADROOM`, so a card just big
/// enough for the weights and activations (SDXL W1 in f16 on 24 GB) runs, and other processes'
/// memory counts; `sharing` threads on one device load at once, so each takes an even share of its
/// total memory less the headroom.
fn render_scratch(gpu: &Gpu, weights: usize, reserve: usize, sharing: usize) -> Result<usize> {
    let free = if sharing <= 1 { Some(gpu.free_memory()?) } else { None };
    Ok(scratch_room(free, gpu.info().total_memory, weights, reserve, sharing))
}

/// `render_scratch`'s arithmetic: `free` is the device's free memory after the weights arena (one
/// render thread), None for `sharing` threads, which split `total`.
fn scratch_room(free: Option<usize>, total: usize, weights: usize, reserve: usize, sharing: usize) -> usize {
    let room = match free {
        Some(free) => free.saturating_sub(RENDER_HEADROOM),
        None => (total.saturating_sub(RENDER_HEADROOM) / sharing.max(1)).saturating_sub(weights),
    };
    room.saturating_sub(reserve).max(1 << 30)
}

/// Device bytes LoRA switching may hold beside the weights: base copies of every weight LoRAs
/// adapt (with `Restore::Copy`; at most the adapted models' weights) and the largest set's factors
/// (about its files' size).
fn lora_reserve(
    checkpoints: &Checkpoints,
    groups: &[(Vec<LoraEntry>, Vec<usize>)],
    restore: Restore,
    dtype: DType,
) -> usize {
    let file_bytes = |set: &[LoraEntry]| -> usize {
        set.iter().filter_map(|l| std::fs::metadata(&l.path).ok()).map(|m| m.len() as usize).sum()
    };
    let factors = groups.iter().map(|(set, _)| file_bytes(set)).max().unwrap_or(0);
    if factors == 0 {
        return 0;
    }
    factors + if restore == Restore::Copy { checkpoints.adaptable_bytes(dtype) } else { 0 }
}

/// A LoRA group's work that needs no GPU: its set resolved against the models and, for the device
/// merge (f16 and bf16), laid out for the loaded models. The batch makes the next group's on a
/// thread while the current group renders.
pub(super) struct HostGroup {
    loras: Option<Loras>,
    /// The set laid out (Err: what the layout refused, `Error::Unsupported` for the host-merge
    /// fallback); None where no models were loaded to lay it out for, or the merge is on the host.
    laid_out: Option<Result<PreparedLoras>>,
    /// Seconds it took.
    seconds: f64,
}

impl HostGroup {
    /// `group`'s set resolved against `checkpoints` (an error fails the group) and laid out for
    /// `models` (the adapted models' weights, device ones included: only shapes are read) where
    /// given. Touches no GPU.
    pub(super) fn new(
        checkpoints: &Checkpoints,
        group: &RenderConfig,
        models: Option<&[(LoraComponent, &ModelWeights)]>,
    ) -> Result<HostGroup> {
        let started = Instant::now();
        let loras = checkpoints.resolve_loras(group)?;
        let laid_out = match models {
            Some(models) if group.dtype()? != DType::F32 => Some(PreparedLoras::lay_out(models, loras.as_ref())),
            _ => None,
        };
        Ok(HostGroup { loras, laid_out, seconds: started.elapsed().as_secs_f64() })
    }
}

/// Makes `loaded` hold the models with `group`'s LoRA set (`host`: resolved, and laid out ahead
/// where it could be) and returns them with summary lines. f16 and bf16 models load once and the
/// set is switched on the device; what the device merge does not take (f32 weights, bf16 DoRA) is
/// merged on the host into a fresh load of the models, which the next group replaces.
#[allow(clippy::too_many_arguments)]
pub(super) fn prepare_group<'m>(
    gpu: &Gpu,
    checkpoints: &Checkpoints,
    group: &RenderConfig,
    host: HostGroup,
    restore: Restore,
    reserve: usize,
    sharing: usize,
    loaded: &'m mut Option<GpuModels>,
) -> Result<(Vec<String>, &'m GpuModels)> {
    let dtype = group.dtype()?;
    let HostGroup { loras, laid_out, seconds } = host;
    let mut lines: Vec<String> = loras.iter().flat_map(|l| l.summary.iter().cloned()).collect();
    if dtype != DType::F32 {
        if loaded.as_ref().is_some_and(|m| m.loras.is_none()) {
            *loaded = None; // a host-merged set: back to the base weights
        }
        if loaded.is_none() {
            let (models, line) =
                GpuModels::load(gpu, checkpoints, None, restore, dtype, reserve, sharing, group.fp8()?)?;
            lines.push(line);
            *loaded = Some(models);
        }
        let Some(m) = loaded.as_mut() else { unreachable!("loaded above") };
        let adapted = m.models.adapted();
        let prepared = match laid_out {
            Some(prepared) => {
                let gib = prepared.as_ref().map_or(0.0, |p| p.bytes() as f64 / GIB);
                lines.push(format!(
                    "LoRA set resolved and laid out ahead, beside the previous group ({seconds:.2} s, {gib:.3} GiB of factors)"
                ));
                prepared
            }
            None => PreparedLoras::lay_out(&adapted, loras.as_ref()),
        };
        // A layout error comes before any device work: the weights are as the last group left them.
        let switched = match prepared {
            Ok(prepared) => {
                let ex = Exec::Cuda { gpu, scratch: &m.scratch };
                let Some(switcher) = m.loras.as_mut() else { unreachable!("base weights have a switcher") };
                switcher.switch(gpu, &ex, &adapted, prepared).map_err(|e| (e, true))
            }
            Err(e) => Err((e, false)),
        };
        match switched {
            Ok(line) => {
                lines.push(line);
                let Some(m) = loaded.as_mut() else { unreachable!("loaded above") };
                lines.extend(m.drop_fp8_sources()?);
                return Ok((lines, m));
            }
            Err((Error::Unsupported(why), _)) => {
                lines.push(format!("the device merge cannot take this LoRA set ({why}): merged on the host"));
            }
            Err((e, on_device)) => {
                if on_device {
                    *loaded = None; // possibly half switched: the next group loads afresh
                }
                return Err(e);
            }
        }
    }
    *loaded = None; // free the device before loading again
    let (models, line) = GpuModels::load(gpu, checkpoints, loras.as_ref(), restore, dtype, 0, sharing, group.fp8()?)?;
    lines.push(line);
    let models = loaded.insert(models);
    lines.extend(models.drop_fp8_sources()?);
    Ok((lines, models))
}

/// Device bytes of one LoRA group's run (weights and the scratch arena's use, LoRA switching);
/// `add` keeps the group that held the most at once.
#[derive(Clone, Copy, Default)]
struct MemoryPeak {
    weights: usize,
    /// Scratch held at most while the models loaded (before the set's factors existed).
    loading: usize,
    /// Scratch held at most while the group's set merged.
    switching: usize,
    /// Scratch held at most while its clips rendered: their activations.
    rendering: usize,
    base_copies: usize,
    /// The set's factors: they live only while it merges, before the clips render.
    factors: usize,
}

impl MemoryPeak {
    fn total(&self) -> usize {
        self.weights + self.base_copies + (self.factors + self.switching).max(self.rendering).max(self.loading)
    }

    fn add(&mut self, group: MemoryPeak) {
        if group.total() > self.total() {
            *self = group;
        }
    }

    /// The summary line; `whose` qualifies it (" of the lead device").
    /// `weights` counts FP8 twins too.
    fn line(&self, whose: &str) -> String {
        let gib = |b: usize| b as f64 / GIB;
        format!(
            "peak GPU memory{whose}: {:.2} GiB (weights {:.2} GiB + LoRA base copies {:.2} GiB + the largest of activations \
             {:.2} GiB, the LoRA merge's {:.2} GiB of factors + {:.2} GiB of scratch, and the load's {:.2} GiB of scratch)",
            gib(self.total()),
            gib(self.weights),
            gib(self.base_copies),
            gib(self.rendering),
            gib(self.factors),
            gib(self.switching),
            gib(self.loading)
        )
    }
}

/// What the clips of one LoRA group share.
struct GroupRun<'a> {
    /// The config with the group's LoRA set.
    config: &'a RenderConfig,
    options: &'a RenderOptions,
    checkpoints: &'a Checkpoints,
    models: &'a Models,
    target: Target<'a>,
    /// The devices a split hands windows or CFG halves to (none without one).
    devices: &'a Devices,
}

/// Renders `members` (clip indices), skipping complete clips, recording each in the run report
/// (rewritten after every clip, so an interrupted batch leaves a report). Only a report that
/// cannot be written, or a stop asked for by a signal (the clip is recorded as interrupted and
/// `Error::Interrupted` returned), stops the batch.
///
/// Beside the GPU's work: the next clip's control inputs are built while a clip renders, and a
/// rendered clip's writer finishes (PNGs, the mp4, the folder's rename) while the next one
/// renders. At most one finish is pending: it is joined, and its clip recorded as done or failed,
/// before the next clip's own finish starts, at the end of the group, and before a stop returns.
fn render_clips(
    group: &GroupRun,
    tree: &OutputTree,
    members: &[usize],
    noise: Option<&weights::TensorFile>,
    batch: &mut Batch,
) -> Result<()> {
    let config = group.config;
    let skip = |index: usize| tree.clip_complete(index as u32 + 1) && !config.output.replace;
    std::thread::scope(|scope| {
        let mut finishing: Option<Finishing> = None;
        // (clip index, its control inputs being built)
        let mut prepared: Option<(usize, ScopedJoinHandle<Result<ClipControls>>)> = None;
        for (position, &index) in members.iter().enumerate() {
            let started = Instant::now();
            if skip(index) {
                eprintln!("clip {:03}: complete from an earlier run, skipped", index + 1);
                let outcome = ClipOutcome {
                    index,
                    skipped: true,
                    frames: config.clip_frames(index),
                    times: StageTimes::default(),
                    latents: None,
                    images: None,
                    mp4: None,
                };
                record_outcome(batch, outcome, 0.0);
                batch.report.write(tree)?;
                continue;
            }
            let clip = config.for_clip(index);
            let g = clip_geometry(&clip, group.models, index);
            let controls = match prepared.take() {
                Some((prepared_for, handle)) if prepared_for == index => handle
                    .join()
                    .unwrap_or_else(|_| Err(Error::Internal("the thread building control inputs panicked".into()))),
                _ => build_controls(&clip, g),
            };
            if let Some(&next) = members[position + 1..].iter().find(|&&i| !skip(i)) {
                let next_clip = config.for_clip(next);
                let next_g = clip_geometry(&next_clip, group.models, next);
                prepared = Some((next, scope.spawn(move || build_controls(&next_clip, next_g))));
            }
            let (o, c, m, t) = (group.options, group.checkpoints, group.models, group.target);
            match render_clip(&clip, o, c, m, t, tree, index, noise, controls, group.devices) {
                Ok((outcome, writer)) => {
                    if let Some(previous) = finishing.take() {
                        let stopped = previous.join(config, batch);
                        if let Some(stop) = stopped {
                            // This clip's writer is dropped unfinished: its folder never appears,
                            // and its saved latents let the rerun go straight to decoding.
                            mark_interrupted(config, batch, index, &stop, started.elapsed().as_secs_f64());
                            batch.report.write(tree)?;
                            return Err(stop);
                        }
                        batch.report.write(tree)?;
                    }
                    let handle = scope.spawn(move || {
                        let t = Instant::now();
                        let report = writer.finish();
                        (report, t.elapsed().as_secs_f64(), Instant::now())
                    });
                    finishing = Some(Finishing { outcome, started, handle });
                }
                Err(e) => match as_interruption(e, index) {
                    Ok(stop) => {
                        mark_interrupted(config, batch, index, &stop, started.elapsed().as_secs_f64());
                        if let Some(previous) = finishing.take() {
                            previous.join(config, batch);
                        }
                        batch.report.write(tree)?;
                        return Err(stop);
                    }
                    Err(e) => {
                        batch.fail(config, index, e);
                        if let Some(record) = batch.report.record(index) {
                            record.seconds =
                                Some(ClipSeconds { total: started.elapsed().as_secs_f64(), ..Default::default() });
                        }
                    }
                },
            }
            batch.report.write(tree)?;
        }
        if let Some(last) = finishing.take() {
            let stopped = last.join(config, batch);
            batch.report.write(tree)?;
            if let Some(stop) = stopped {
                return Err(stop);
            }
        }
        Ok(())
    })
}

/// A rendered clip whose writer finishes on its own thread: the result, the seconds it took,
/// and when it ended.
struct Finishing<'scope> {
    outcome: ClipOutcome,
    started: Instant,
    handle: ScopedJoinHandle<'scope, (Result<ClipReport>, f64, Instant)>,
}

impl Finishing<'_> {
    /// Waits for the writer and records the clip as done (or failed, with the writer's error).
    /// Returns the error that ends the batch when the writer failed because of a stop.
    fn join(self, config: &RenderConfig, batch: &mut Batch) -> Option<Error> {
        let Finishing { mut outcome, started, handle } = self;
        let (result, seconds, ended) = handle.join().unwrap_or_else(|_| {
            (Err(Error::Internal("the clip writer's thread panicked".into())), 0.0, Instant::now())
        });
        outcome.times.decode_and_write += seconds;
        let total = ended.duration_since(started).as_secs_f64();
        match result {
            Ok(report) => {
                outcome.mp4 = report.mp4.map(|p| (p, report.encoder.map_or(String::new(), |e| e.to_string())));
                record_outcome(batch, outcome, total);
            }
            Err(e) => {
                let index = outcome.index;
                // A writer that failed once a stop was asked for (ffmpeg gets the terminal's
                // SIGINT too) was stopped: the clip is interrupted, not failed.
                let e = match as_interruption(e, index) {
                    Ok(stop) => {
                        mark_interrupted(config, batch, index, &stop, total);
                        return Some(stop);
                    }
                    Err(e) => e,
                };
                batch.fail(config, index, e);
                if let Some(record) = batch.report.record(index) {
                    record.seconds = Some(clip_seconds(&outcome.times, total));
                }
            }
        }
        None
    }
}

/// `e` (of clip `index`) as the stop it is when a signal asked for one: whatever fails once a stop
/// was asked for (ffmpeg gets the terminal's SIGINT too) is the stop, not a failure. Err(e)
/// unchanged otherwise.
fn as_interruption(e: Error, index: usize) -> std::result::Result<Error, Error> {
    let Some(signal) = stop_signal() else { return Err(e) };
    Ok(match e {
        Error::Interrupted { .. } => e,
        other => Error::Interrupted { signal, at: format!("clip {:03} ({other})", index + 1) },
    })
}

/// Records clip `index` as interrupted by `stop` after `total` seconds.
fn mark_interrupted(config: &RenderConfig, batch: &mut Batch, index: usize, stop: &Error, total: f64) {
    eprintln!("clip {:03} ({}): interrupted", index + 1, config.clip_id(index));
    if let Some(record) = batch.report.record(index) {
        record.status = "interrupted".into();
        record.exit_code = Some(stop.exit_code());
        record.seconds = Some(ClipSeconds { total, ..Default::default() });
    }
}

fn clip_seconds(t: &StageTimes, total: f64) -> ClipSeconds {
    ClipSeconds { text: t.text, denoise: t.denoise, decode_and_write: t.decode_and_write, total }
}

/// Records a clip that is complete: rendered (`total` seconds from its start to its folder in
/// place) or skipped.
fn record_outcome(batch: &mut Batch, outcome: ClipOutcome, total: f64) {
    if let Some(record) = batch.report.record(outcome.index) {
        record.status = if outcome.skipped { "skipped" } else { "done" }.into();
        record.seconds = (!outcome.skipped).then(|| clip_seconds(&outcome.times, total));
    }
    batch.outcomes.push(outcome);
}

/// `configs/pipeline_config.json` (the resolved config and versions), `lora_versions.json`,
/// `controlnet_config.json`.
/// The sha256 of every LoRA file of the config, for lora_versions.json. Hashing the seed's set
/// (about 2 GB) takes seconds, during which the GPU would idle at the end of a batch: it runs on
/// threads of its own (one per file) from the start of the batch.
struct LoraDigests(std::thread::JoinHandle<Result<Vec<String>>>);

impl LoraDigests {
    fn start(config: &RenderConfig) -> LoraDigests {
        let paths: Vec<PathBuf> = config.loras.iter().map(|l| l.path.clone()).collect();
        LoraDigests(std::thread::spawn(move || {
            std::thread::scope(|s| {
                let hashing: Vec<_> = paths.iter().map(|p| s.spawn(move || sha256_file(p))).collect();
                hashing
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(Error::Internal("a LoRA hashing thread panicked".into()))))
                    .collect()
            })
        }))
    }

    fn join(self) -> Result<Vec<String>> {
        self.0.join().unwrap_or_else(|_| Err(Error::Internal("the LoRA hashing thread panicked".into())))
    }
}

fn write_configs(config: &RenderConfig, tree: &OutputTree, lora_digests: LoraDigests) -> Result<()> {
    let mut resolved = config.resolved_json();
    if let Some(map) = resolved.as_object_mut() {
        map.insert(
            "versions".into(),
            serde_json::json!({ "celframe": env!("CARGO_PKG_VERSION"), "rustc_target": std::env::consts::ARCH }),
        );
    }
    tree.write_config("pipeline_config.json", &resolved)?;
    let loras: Vec<serde_json::Value> = config
        .loras
        .iter()
        .zip(lora_digests.join()?)
        .map(|(l, sha256)| {
            serde_json::json!({
                "file": l.path.display().to_string(),
                "sha256": sha256,
                "weight": l.weight,
                "text_encoder_weight": l.text_encoder_weight.unwrap_or(l.weight),
                "role": l.role,
            })
        })
        .collect();
    tree.write_config("lora_versions.json", &serde_json::Value::Array(loras))?;
    let nets = serde_json::to_value(&config.controlnets)
        .map_err(|e| Error::Internal(format!("controlnet_config.json: {e}")))?;
    tree.write_config("controlnet_config.json", &nets)?;
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::Io { context: format!("hashing {}", path.display()), source: e })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n =
            file.read(&mut buf).map_err(|e| Error::Io { context: format!("hashing {}", path.display()), source: e })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A clip's geometry.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    frames: usize,
    width: usize,
    height: usize,
    /// Latent height, width, channels.
    h: usize,
    w: usize,
    c: usize,
}

impl Geometry {
    fn frame_len(&self) -> usize {
        self.h * self.w * self.c
    }
}

/// The conditioning of a clip: the negative, and the prompt schedule's keys (frame, conditioning),
/// all padded to one token count.
pub(super) struct ClipConditioning {
    negative: HostConditioning,
    keys: Vec<(usize, HostConditioning)>,
    tokens: usize,
    width: usize,
    pooled: usize,
}

/// One prompt's conditioning as host f32 values: the context [tokens * width] and the pooled
/// vector, read out of their tensors once per clip.
struct HostConditioning {
    context: Vec<f32>,
    pooled: Vec<f32>,
}

impl ClipConditioning {
    fn encode(ex: &Exec, models: &Models, tokenizer: &Tokenizer, config: &RenderConfig, index: usize) -> Result<Self> {
        let clip = &config.clips[index];
        let text = &models.text;
        let mut keys = Vec::new();
        for key in clip.prompt_keys() {
            let (cond, requests) = text.encode_prompt(ex, tokenizer, &key.prompt, false)?;
            if !requests.is_empty() {
                eprintln!(
                    "clip {:03}: the prompt's <lora:...> tags are ignored; list LoRAs under [[loras]] in the config",
                    index + 1
                );
            }
            keys.push((key.frame, cond));
        }
        let negative = text.encode_negative(ex, tokenizer, &clip.negative, false)?;
        let tokens_of = |c: &Conditioning| c.context.shape()[1];
        let tokens = keys.iter().map(|(_, c)| tokens_of(c)).chain([tokens_of(&negative)]).max().unwrap_or(0);
        // A1111 pads the shorter of a prompt pair with chunks of the empty prompt (encoded only when
        // some prompt is shorter).
        let empty = if keys.iter().map(|(_, c)| c).chain([&negative]).any(|c| tokens_of(c) < tokens) {
            text.encode_prompt(ex, tokenizer, "", false)?.0.context.to_f32_vec()?
        } else {
            Vec::new()
        };
        let width = text.context_width();
        let host = |c: Conditioning| -> Result<HostConditioning> {
            let mut context = c.context.to_f32_vec()?;
            while context.len() < tokens * width {
                context.extend_from_slice(&empty);
            }
            context.truncate(tokens * width);
            Ok(HostConditioning { context, pooled: c.text_embeds.to_f32_vec()? })
        };
        let negative = host(negative)?;
        let keys = keys.into_iter().map(|(f, c)| Ok((f, host(c)?))).collect::<Result<Vec<_>>>()?;
        Ok(ClipConditioning { negative, keys, tokens, width, pooled: text.pooled_width() })
    }

    /// The text contexts of the clip frames `list` for the CFG `halves`, as (rows, values of
    /// [rows, tokens, width]): one row per half when every frame has the same prompt (the
    /// cross-attentions then compute K and V once per half, not per frame: `attention_grouped`),
    /// else [uncond context x n, cond context of each frame].
    fn context_rows(&self, halves: &[Half], list: &[usize]) -> (usize, Vec<f32>) {
        let per_frame: Vec<Vec<f32>> = list.iter().map(|&f| self.at(f).0).collect();
        let shared = per_frame.windows(2).all(|w| w[0] == w[1]);
        let n = if shared { list.len().min(1) } else { list.len() };
        let mut values = Vec::with_capacity(halves.len() * n * self.tokens * self.width);
        for half in halves {
            for frame in &per_frame[..n] {
                match half {
                    Half::Uncond => values.extend_from_slice(&self.negative.context),
                    Half::Cond => values.extend_from_slice(frame),
                }
            }
        }
        (halves.len() * n, values)
    }

    /// The prompt of the clip frames `list` when their context for `halves` has `rows` rows, one
    /// per half (`context_rows`: the frames share one conditioning); None for a row per frame.
    fn shared_prompt(&self, halves: &[Half], list: &[usize], rows: usize) -> Option<PromptBlend> {
        list.first().filter(|_| rows == halves.len()).map(|&f| self.blend_at(f))
    }

    /// Which keys of the prompt schedule make `frame`'s conditioning, and how they blend.
    fn blend_at(&self, frame: usize) -> PromptBlend {
        let after = self.keys.iter().position(|(f, _)| *f > frame);
        let (a, b, t) = match after {
            None | Some(0) => {
                let k = if after == Some(0) { 0 } else { self.keys.len() - 1 };
                (k, k, 0.0f32)
            }
            Some(j) => {
                let (fa, fb) = (self.keys[j - 1].0, self.keys[j].0);
                (j - 1, j, (frame - fa) as f32 / (fb - fa) as f32)
            }
        };
        PromptBlend { a, b, t: t.to_bits() }
    }

    /// The prompt schedule at `frame`: the two keys around it blended linearly (prompt travel).
    fn at(&self, frame: usize) -> (Vec<f32>, Vec<f32>) {
        let PromptBlend { a, b, t } = self.blend_at(frame);
        let t = f32::from_bits(t);
        let lerp = |x: &[f32], y: &[f32]| -> Vec<f32> { x.iter().zip(y).map(|(p, q)| p + (q - p) * t).collect() };
        let (ka, kb) = (&self.keys[a].1, &self.keys[b].1);
        (lerp(&ka.context, &kb.context), lerp(&ka.pooled, &kb.pooled))
    }
}

/// A frame's conditioning in the prompt schedule: keys `a` and `b` blended by the f32 of bits `t`.
/// It fixes the frame's conditional text context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct PromptBlend {
    a: usize,
    b: usize,
    t: u32,
}

/// A prepared hint image, shared by the frames that show it: resized to the render size in 8 bits,
/// as diffusers' image processor resizes PIL images before scaling them to [0, 1] (kept in 8 bits:
/// a tenth-second clip of dense control holds a quarter of the memory f32 would).
type HintImage = Arc<RgbImage>;

/// One ControlNet's (or one Union condition's) per-frame hints and strengths for a clip.
pub(super) struct ClipControl {
    hints: Vec<Option<HintImage>>,
    strengths: Vec<f32>,
    scale: ControlScale,
    start: f32,
    end: f32,
}

/// A ControlNet's hint images for a `frames`-frame clip at `fps` of `width` x `height` (computed
/// from its inputs by kind, at their own size: `prepare_control_images` resizes them as diffusers'
/// image processor does), and the frames they sit on: the keyframes; every frame for a video;
/// every frame from the first keyframe to the last with `pose_interpolation = "linear"`.
pub fn control_hints(
    entry: &ControlNetEntry,
    frames: usize,
    fps: u32,
    width: u32,
    height: u32,
) -> Result<(Vec<usize>, Vec<RgbImage>)> {
    if entry.is_video() {
        let request = VideoRequest { frames, fps, timing: entry.video_timing() };
        let (path, tools) = (&entry.images, VideoTools::default());
        let images = match entry.kind.as_str() {
            "depth" => clip_depth_hints(&read_video_depth(path, request, &tools)?)?,
            "canny" => read_video_rgb(path, request, &tools)?
                .iter()
                .map(|p| canny(p, CANNY_LOW, CANNY_HIGH))
                .collect::<Result<_>>()?,
            _ => read_video_rgb(path, request, &tools)?,
        };
        return Ok(((0..frames).collect(), images));
    }
    let files = entry.image_files()?;
    let read_pose = |p: &Path| Ok(load_openpose(p, (width, height))?.with_parts(entry.hands, entry.face));
    // Poses, where every keyframe is one: what pose interpolation needs.
    let poses: Option<Vec<PoseFrame>> = if entry.is_builtin_pose() {
        let count = entry.keyframes.as_ref().map_or(5, |k| k.len()).max(1);
        Some(waving_figure(count.max(2), width, height)?.into_iter().take(count).collect())
    } else if entry.kind == "openpose" && files.iter().all(|p| is_json(p)) {
        Some(files.iter().map(|p| read_pose(p)).collect::<Result<_>>()?)
    } else {
        None
    };
    let images: Vec<RgbImage> = if let Some(poses) = &poses {
        poses.iter().map(|p| draw_pose(p, width, height)).collect::<Result<_>>()?
    } else if entry.kind == "depth" {
        clip_depth_hints(&files.iter().map(|p| load_depth_png(p)).collect::<Result<Vec<_>>>()?)?
    } else if entry.kind == "canny" {
        let pictures = files.iter().map(|p| load_image_png(p)).collect::<Result<Vec<_>>>()?;
        pictures.iter().map(|p| canny(p, CANNY_LOW, CANNY_HIGH)).collect::<Result<_>>()?
    } else {
        files
            .iter()
            .map(|p| if is_json(p) { draw_pose(&read_pose(p)?, width, height) } else { load_image_png(p) })
            .collect::<Result<_>>()?
    };
    let positions = entry.keyframe_positions(images.len());
    let last = frames.saturating_sub(1) as f32;
    let mut keyframes: Vec<usize> = positions.iter().map(|p| (p * last).round() as usize).collect();
    keyframes.dedup();
    if keyframes.len() != images.len() {
        return Err(Error::Input(format!(
            "controlnets ({}): {} images on {} distinct frames of a {frames}-frame clip: give fewer images or more frames",
            entry.path.display(),
            images.len(),
            keyframes.len(),
        )));
    }
    let Some(poses) = poses.filter(|_| entry.pose_interpolation == "linear") else {
        return Ok((keyframes, images));
    };
    // Every frame between two keyframes gets its own pose; the keyframes keep theirs.
    let (mut all_frames, mut all_images) = (Vec::new(), Vec::new());
    for (k, (image, pair)) in images.into_iter().zip(keyframes.windows(2).map(Some).chain([None])).enumerate() {
        all_frames.push(keyframes[k]);
        all_images.push(image);
        let Some(&[from, to]) = pair else { continue };
        for frame in from + 1..to {
            let t = (frame - from) as f64 / (to - from) as f64;
            all_frames.push(frame);
            all_images.push(draw_pose(&interpolate_pose(&poses[k], &poses[k + 1], t), width, height)?);
        }
    }
    Ok((all_frames, all_images))
}

/// Depth hints of a clip's maps, on one range over the clip so the hint does not flicker with
/// each map's own range.
fn clip_depth_hints(maps: &[DepthMap]) -> Result<Vec<RgbImage>> {
    let (low, high) = maps
        .iter()
        .map(DepthMap::range)
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), (a, b)| (l.min(a), h.max(b)));
    maps.iter().map(|m| depth_hint(m, DepthRange::Fixed { low, high }, false)).collect()
}

impl ClipControl {
    fn build(entry: &ControlNetEntry, g: Geometry, fps: u32) -> Result<ClipControl> {
        let (width, height) = (g.width as u32, g.height as u32);
        let (keyframes, images) = control_hints(entry, g.frames, fps, width, height)?;
        let rule = match entry.interpolation.as_str() {
            "hold" => Interpolation::Hold,
            "linear" => Interpolation::Linear,
            _ => Interpolation::OnlyKeyframes,
        };
        let schedule = KeyframeSchedule::new(g.frames, keyframes, vec![1.0; images.len()], rule)?;
        let prepared: Vec<HintImage> =
            images.iter().map(|im| resize_lanczos(im, width, height).map(Arc::new)).collect::<Result<_>>()?;
        let strengths = schedule.strengths();
        // hint_keyframe is the index of the frame's keyframe, so of its prepared hint.
        let hints =
            (0..g.frames).map(|f| (strengths[f] > 0.0).then(|| prepared[schedule.hint_keyframe(f)].clone())).collect();
        Ok(ClipControl {
            hints,
            strengths,
            scale: ControlScale { conditioning_scale: entry.scale, guess_mode: entry.guess_mode },
            start: entry.start,
            end: entry.end,
        })
    }

    /// The distinct hint images of the clip frames `list` (told apart by identity: frames holding
    /// one keyframe share its prepared image; frames without a hint share None), and for each
    /// frame the index of its image there.
    fn distinct_hints(&self, list: &[usize]) -> (Vec<Option<&HintImage>>, Vec<usize>) {
        let mut distinct: Vec<Option<&HintImage>> = Vec::new();
        let mut pick = Vec::with_capacity(list.len());
        for &f in list {
            let hint = self.hints[f].as_ref();
            let same = |d: &Option<&HintImage>| match (d, hint) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            let i = distinct.iter().position(same).unwrap_or_else(|| {
                distinct.push(hint);
                distinct.len() - 1
            });
            pick.push(i);
        }
        (distinct, pick)
    }

    /// diffusers' `controlnet_keep`: the net runs at evaluation i of n unless i/n < start or
    /// (i + 1)/n > end.
    fn active_at(&self, i: usize, n: usize) -> bool {
        !((i as f32 / n as f32) < self.start || ((i + 1) as f32 / n as f32) > self.end)
    }
}

/// Where a clip's noise comes from, for sampling pass `pass` (FreeInit runs several; pass 0 is
/// the only one otherwise).
#[derive(Clone, Copy)]
enum ClipNoise<'a> {
    Generator { seed: u64, clip: u64, pass: usize },
    File { file: &'a weights::TensorFile, pass: usize },
}

impl<'a> ClipNoise<'a> {
    /// The same source for FreeInit pass `pass`.
    fn for_pass(self, pass: usize) -> ClipNoise<'a> {
        match self {
            ClipNoise::Generator { seed, clip, .. } => ClipNoise::Generator { seed, clip, pass },
            ClipNoise::File { file, .. } => ClipNoise::File { file, pass },
        }
    }

    /// Frame-major noise for the `g.frames` frames from clip frame `first`: the initial latents
    /// (`step` None; for a FreeInit pass after the first, the fresh noise of its high frequencies)
    /// or a sampler's `step`-th draw of this pass.
    ///
    /// Streams: (clip, initial latents, pass) and (clip, step noise, step), with the pass appended
    /// after the first, so pass 0 draws what a run without FreeInit draws. Noise file tensors:
    /// `latents` and `step.<i>`, then `free_init.<k>` and `free_init.<k>.step.<i>` for pass k.
    fn draw(&self, g: Geometry, first: usize, step: Option<usize>, freenoise: Option<&[usize]>) -> Result<Vec<f32>> {
        let n = g.frames * g.frame_len();
        match *self {
            ClipNoise::Generator { seed, clip, pass } => {
                let id = match step {
                    None => stream_id(&[clip, Purpose::InitialLatents as u64, pass as u64]),
                    Some(s) if pass == 0 => stream_id(&[clip, Purpose::StepNoise as u64, s as u64]),
                    Some(s) => stream_id(&[clip, Purpose::StepNoise as u64, s as u64, pass as u64]),
                };
                let stream = NoiseStream::new(seed, id);
                let mut out = vec![0f32; n];
                let fl = g.frame_len();
                // Frames on all cores (the stream is counter-based: the same values in any order). On
                // one core a W1 step's 590k normals took ~10 ms, with the GPU waiting for them.
                par_rows(&mut out, fl, |first_frame, frames| {
                    for (k, chunk) in frames.chunks_mut(fl).enumerate() {
                        let f = first + first_frame + k;
                        let source = freenoise.map_or(f, |s| s[f]);
                        stream.fill_normal((source * fl) as u64, chunk);
                    }
                });
                Ok(out)
            }
            ClipNoise::File { file, pass } => {
                if first != 0 {
                    return Err(Error::Input(format!(
                        "{}: injected noise covers one run over the whole clip; segment chaining draws per segment",
                        file.path().display()
                    )));
                }
                let name = match (pass, step) {
                    (0, None) => "latents".to_string(),
                    (0, Some(s)) => format!("step.{s}"),
                    (k, None) => format!("free_init.{k}"),
                    (k, Some(s)) => format!("free_init.{k}.step.{s}"),
                };
                if !file.contains(&name) {
                    return Err(Error::Input(format!(
                        "{}: no tensor '{name}' (the run draws it); a noise file holds latents and step.<i>, and with \
                         FreeInit free_init.<k> and free_init.<k>.step.<i> for passes k >= 1",
                        file.path().display()
                    )));
                }
                let t = file.float(&name)?;
                diffusers_to_frames(&t, g)
                    .map_err(|e| Error::Input(format!("{}: '{name}': {e}", file.path().display())))
            }
        }
    }
}

/// diffusers' latent layout ([1, C, F, h, w] for videos, [1, C, h, w] for images) -> frame-major
/// NHWC.
fn diffusers_to_frames(t: &Tensor, g: Geometry) -> Result<Vec<f32>> {
    let want_video = [1, g.c, g.frames, g.h, g.w];
    let want_image = [1, g.c, g.h, g.w];
    if t.shape() != want_video && !(g.frames == 1 && t.shape() == want_image) {
        return Err(Error::Input(format!("shape {:?}; this clip takes {want_video:?}", t.shape())));
    }
    video_to_rows(&t.reshape(&want_video)?)?.to_f32_vec()
}

#[allow(clippy::too_many_arguments)]
fn render_clip(
    config: &RenderConfig,
    options: &RenderOptions,
    checkpoints: &Checkpoints,
    models: &Models,
    target: Target,
    tree: &OutputTree,
    index: usize,
    noise_file: Option<&weights::TensorFile>,
    controls: Result<ClipControls>,
    devices: &Devices,
) -> Result<(ClipOutcome, ClipWriter)> {
    let number = index + 1;
    check_stop(|| format!("clip {number:03}, before it started"))?;
    let video = &config.video;
    let g = clip_geometry(config, models, index);
    if g.frames > 1 && models.motion.is_none() {
        return Err(Error::Input(format!(
            "clip {number:03}: {} frames need models.motion_adapter (without one, frames = 1)",
            g.frames
        )));
    }
    let mut times = StageTimes::default();
    let t0 = Instant::now();
    let text_range = nvtx::range(&format!("clip {number} text"));
    let cond = ClipConditioning::encode(&target.ex, models, &checkpoints.tokenizer, config, index)?;
    drop(text_range);
    times.text = t0.elapsed().as_secs_f64();

    let controls = controls?;
    let seed = config.clip_seed(index);
    let noise = match noise_file {
        Some(file) => ClipNoise::File { file, pass: 0 },
        None => ClipNoise::Generator { seed, clip: index as u64, pass: 0 },
    };
    let context = context_options(config)?;
    // A window split gives the latents one device gives; the CFG halves on two GPUs do not quite
    // (cuBLAS may choose other kernels for half the batch), so their saved work is kept apart.
    let device = match target.ex {
        Exec::Cpu => "cpu".to_string(),
        Exec::Cuda { gpu, .. } if devices.splits_cfg() => format!("{} (CFG halves on two devices)", gpu.info().name),
        Exec::Cuda { gpu, .. } => gpu.info().name.clone(),
    };
    let identity = clip_identity(config, index, &device, options.noise.as_deref());
    let resume = ClipResume::open(tree.resume_dir(number as u32), number, identity)?;
    let inputs = Arc::new(ClipInputs { config: config.clone(), cond, controls });
    let run = ClipRun {
        config,
        models,
        target,
        inputs: &inputs,
        devices,
        context: &context,
        noise: &noise,
        number,
        resume: &resume,
    };
    let t1 = Instant::now();
    let x = if video.long_video == "chain" && g.frames > context.length {
        run.chained(g)?
    } else {
        let freenoise = (video.freenoise && g.frames > context.length && noise_file.is_none())
            .then(|| freenoise_frame_sources(g.frames, context.length, context.length - context.overlap, seed))
            .transpose()?;
        let initial = noise.draw(g, 0, None, freenoise.as_deref())?;
        run.sample_clip(g, &initial)?
    };
    times.denoise = t1.elapsed().as_secs_f64();
    if let Some(at) = x.iter().position(|v| !v.is_finite()) {
        // Found before anything is written, so the clip leaves no folder and a rerun tries again.
        return Err(Error::Input(format!(
            "clip {number:03}: the sampled latents of frame {} are not finite (NaN or infinity); f16 overflow is the \
             usual cause (try dtype bf16 or f32, or lower LoRA weights or cfg)",
            at / g.frame_len()
        )));
    }

    let t2 = Instant::now();
    let _decode_range = nvtx::range(&format!("clip {number} decode and write"));
    let latents = Tensor::from_f32(&[g.frames, g.h, g.w, g.c], DType::F32, &x)?;
    let fps = Fps::whole(video.fps)?;
    let mut clip_options = ClipOptions::new(g.width as u32, g.height as u32, fps);
    clip_options.png_frames = config.output.png_frames;
    clip_options.mp4 = config.output.mp4_choice()?;
    clip_options.replace = config.output.replace;
    let mut writer = tree.begin_clip(number as u32, &clip_options)?;
    let mut kept = Vec::new();
    let bar = progress_bar(g.frames as u64, &format!("clip {number:03} decode + write"), "frames");
    // Whole frames, as diffusers' pipelines decode unless VAE tiling is enabled.
    let decode = DecodeOptions { chunk_frames: video.vae_chunk_frames, tiling: None };
    models.vae.decode_frames_pixels_each(&target.ex, &latents, &decode, |_, pixels, images| {
        check_stop(|| format!("clip {number:03}, decoding frame {} of {}", writer.frames(), g.frames))?;
        for frame in pixels.chunks(g.width * g.height * 3) {
            writer.push(RgbImage::new(g.width as u32, g.height as u32, frame.to_vec())?)?;
            bar.inc(1);
        }
        if options.keep_tensors {
            let values = if images.is_device() { target.host_f32(images)? } else { images.to_f32_vec()? };
            kept.extend(values.iter().map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)));
        }
        Ok(())
    })?;
    bar.finish();
    // The writer's own time (PNGs, the mp4, the rename) is added when its finish is joined.
    times.decode_and_write = t2.elapsed().as_secs_f64();
    let images = if options.keep_tensors {
        Some(Tensor::from_f32(&[g.frames, g.height, g.width, 3], DType::F32, &kept)?)
    } else {
        None
    };
    let outcome = ClipOutcome {
        index,
        skipped: false,
        frames: g.frames,
        times,
        latents: options.keep_tensors.then_some(latents),
        images,
        mp4: None,
    };
    Ok((outcome, writer))
}

/// Clip `index`'s geometry (`config` is the clip's own, from `for_clip`).
fn clip_geometry(config: &RenderConfig, models: &Models, index: usize) -> Geometry {
    let video = &config.video;
    let factor = models.vae.config.upsample_factor();
    Geometry {
        frames: config.clip_frames(index),
        width: video.width,
        height: video.height,
        h: video.height / factor,
        w: video.width / factor,
        c: models.unet.config.in_channels,
    }
}

/// A clip's control inputs: per ControlNet entry, one control per condition (a plain entry is
/// one).
pub(super) type ClipControls = Vec<Vec<ClipControl>>;

/// Builds the control inputs of a clip of geometry `g` (`config` is the clip's own): images
/// decoded, poses drawn, Canny and depth hints computed, all prepared at the clip's size.
fn build_controls(config: &RenderConfig, g: Geometry) -> Result<ClipControls> {
    let fps = config.video.fps;
    config
        .controlnets
        .iter()
        .map(|e| e.hint_entries().iter().map(|h| ClipControl::build(h, g, fps)).collect::<Result<Vec<_>>>())
        .collect()
}

/// A clip's own config, conditioning and control inputs: what every device of a split reads.
pub(super) struct ClipInputs {
    pub(super) config: RenderConfig,
    pub(super) cond: ClipConditioning,
    pub(super) controls: ClipControls,
}

/// What every sampler evaluation of a clip shares.
struct ClipRun<'a> {
    config: &'a RenderConfig,
    models: &'a Models,
    target: Target<'a>,
    /// The clip's conditioning and control inputs, shared with the devices of a split.
    inputs: &'a Arc<ClipInputs>,
    devices: &'a Devices,
    context: &'a ContextOptions,
    noise: &'a ClipNoise<'a>,
    number: usize,
    /// What an interrupted run of this clip saved, and where this one saves.
    resume: &'a ClipResume,
}

impl ClipRun<'_> {
    /// Samples the whole clip from its initial noise `initial` (unit variance): one pass, or with
    /// FreeInit (`video.free_init`) `iterations` passes as diffusers' `FreeInitMixin` runs them.
    /// Pass k > 0 starts from the previous result noised again to the schedule's first noise
    /// level with `initial` (the sampler's `add_noise`), whose low frequencies over (frames, h, w)
    /// it keeps, the high ones coming from fresh noise at the scale of a first latent
    /// (noise x init_noise_sigma). With LCM, TCD and DDIM or DPM++ 2M with trailing spacing this
    /// is diffusers' computation (it re-noises to t = 999, where those schedules start); with
    /// leading or linspace spacing diffusers still re-noises to t = 999, and for Euler-type
    /// samplers it noises with noise already scaled by init_noise_sigma and mixes in unscaled
    /// fresh noise, neither of which matches the latent the sampler then starts from.
    ///
    /// Each finished pass is saved (`pipeline::resume`); a rerun starts after the last one saved.
    fn sample_clip(&self, g: Geometry, initial: &[f32]) -> Result<Vec<f32>> {
        let base = self.config.sampler.sampler_config()?;
        let passes = self.config.video.free_init.as_ref().map_or(1, |f| f.iterations);
        let shape = [g.frames, g.h, g.w, g.c];
        let (done, mut x) = match self.resume.last_pass(shape) {
            Some((pass, x)) if pass <= passes => {
                eprintln!(
                    "clip {:03}: resumed from pass {pass} of {passes} ({}){}",
                    self.number,
                    self.resume.dir().display(),
                    if pass == passes { ": its latents are final, decoding" } else { "" }
                );
                (pass, x.to_vec())
            }
            _ => (0, Vec::new()),
        };
        let finish_pass = |pass: usize, x: &[f32]| -> Result<()> {
            self.resume.save(Stage::Pass, (pass + 1, passes), 0, shape, x)?;
            check_stop(|| format!("clip {:03}, after sampling pass {} of {passes}", self.number, pass + 1))
        };
        let Some(free_init) = &self.config.video.free_init else {
            if done == 1 {
                return Ok(x);
            }
            let mut sampler = Sampler::new(&base)?;
            let sigma = sampler.init_noise_sigma();
            let mut x: Vec<f32> = initial.iter().map(|v| v * sigma).collect();
            self.denoise(&mut sampler, &mut x, g, 0)?;
            finish_pass(0, &x)?;
            return Ok(x);
        };
        let filter = free_init.low_pass(g.frames, g.h, g.w)?;
        for pass in done..free_init.iterations {
            let config = SamplerConfig { steps: free_init.steps(base.steps, pass), ..base.clone() };
            let mut sampler = Sampler::new(&config)?;
            let sigma = sampler.init_noise_sigma();
            let noise = self.noise.for_pass(pass);
            x = if pass == 0 {
                initial.iter().map(|v| v * sigma).collect()
            } else {
                let mut renoised = vec![0f32; x.len()];
                sampler.add_noise(&x, initial, &mut renoised)?;
                let fresh: Vec<f32> = noise.draw(g, 0, None, None)?.into_iter().map(|v| v * sigma).collect();
                mix_frequencies(&renoised, &fresh, &filter, g.c)?
            };
            eprintln!(
                "clip {:03}: FreeInit pass {}/{} ({} steps)",
                self.number,
                pass + 1,
                free_init.iterations,
                config.steps
            );
            ClipRun { noise: &noise, ..*self }.denoise(&mut sampler, &mut x, g, 0)?;
            finish_pass(pass, &x)?;
        }
        Ok(x)
    }

    /// Runs `sampler` over `x`, the latents of `g.frames` frames from clip frame `first`. Each
    /// evaluation's windows run on the devices of the run (`Devices::run_step`: all on this thread
    /// without a split) and are fused here in window order.
    fn denoise(&self, sampler: &mut Sampler, x: &mut [f32], g: Geometry, first: usize) -> Result<()> {
        let (number, context) = (self.number, self.context);
        let started = Instant::now();
        let evaluations = sampler.evaluations();
        let mut step_noise = |request: &NoiseRequest, out: &mut [f32]| -> Result<()> {
            out.copy_from_slice(&self.noise.draw(g, first, Some(request.evaluation), None)?);
            Ok(())
        };
        let mut cache = InputCache::default();
        let run = self.devices.next_run();
        let bar = progress_bar(
            evaluations as u64,
            &format!("clip {number:03} frames {first}..{}", first + g.frames),
            "steps",
        );
        for i in 0..evaluations {
            check_stop(|| {
                format!("clip {number:03}, frames {first}..{}, before step {}/{evaluations}", first + g.frames, i + 1)
            })?;
            let step_started = Instant::now();
            let _step_range = nvtx::range(&format!("clip {number} step {}", i + 1));
            let timestep = sampler.timesteps()[sampler.position()];
            let windows = if g.frames <= context.length {
                vec![(0..g.frames).collect()]
            } else {
                context.windows(g.frames, i as u64)?
            };
            let scale = sampler.model_input_scale(i)?;
            let jobs = windows
                .iter()
                .enumerate()
                .map(|(wi, window)| {
                    let latents: Vec<f32> = gather(window, x, g.frame_len())?.into_iter().map(|v| v * scale).collect();
                    let step = Step { index: i, of: evaluations, window: wi, windows: windows.len(), timestep };
                    Ok(WindowJob { frames: window.iter().map(|f| f + first).collect(), latents, step })
                })
                .collect::<Result<Vec<_>>>()?;
            let lead = WindowRun {
                config: self.config,
                models: self.models,
                target: self.target,
                cond: &self.inputs.cond,
                controls: &self.inputs.controls,
            };
            let done = self.devices.run_step(&lead, self.inputs, g, run, jobs, &mut cache, &bar)?;
            let mut fuser = Fuser::new(g.frames, g.frame_len())?;
            for (window, out) in windows.iter().zip(done.outputs) {
                let guided = guide(self.config, out, window.len(), g.frame_len())?;
                fuser.add(window, &context.fuse_weights(window, g.frames), &guided)?;
            }
            let model_output = fuser.finish()?;
            sampler.step(&model_output, x, &mut step_noise as &mut dyn NoiseSource)?;
            bar.inc(1);
            let step_s = step_started.elapsed().as_secs_f64();
            let split = done.devices.map(|d| format!(", {d}"));
            if !bar.is_hidden() {
                if let Some(split) = split {
                    bar.println(format!("clip {number:03}: step {}/{evaluations}; {step_s:.2} s{split}", i + 1));
                }
                continue;
            }
            // Not a terminal (a log): one line per step, with the step's own time (the first steps
            // of a process pay its warm-up).
            eprintln!(
                "clip {number:03}: frames {first}..{}: step {}/{evaluations} ({} window{}) {:.2} it/s; {step_s:.2} s{}",
                first + g.frames,
                i + 1,
                windows.len(),
                if windows.len() == 1 { "" } else { "s" },
                (i + 1) as f64 / started.elapsed().as_secs_f64(),
                split.unwrap_or_default()
            );
        }
        bar.finish();
        let graphs = &cache.graphs;
        if graphs.captured > 0 {
            eprintln!(
                "clip {number:03}: frames {first}..{}: CUDA graphs: {} captured, {} replays",
                first + g.frames,
                graphs.captured,
                graphs.replays
            );
        }
        if cache.text_kv_computed > 0 {
            eprintln!(
                "clip {number:03}: frames {first}..{}: cross-attention k/v of the text computed {} times, reused {} times",
                first + g.frames,
                cache.text_kv_computed,
                cache.text_kv_reused
            );
        }
        Ok(())
    }

    /// The seed's segment chaining: segments of `context.length` frames; the first from noise, each
    /// next one from the previous segment's last latent repeated over its frames and noised to
    /// `video.chain_strength` (img2img: the sampler runs that fraction of its schedule), so the
    /// segment continues from where the last one ended. Each segment's motion is its own: seams and
    /// drift at segment boundaries are what context windows avoid.
    ///
    /// Each finished segment is saved (`pipeline::resume`); a rerun takes the saved ones in order
    /// and continues after the last.
    fn chained(&self, g: Geometry) -> Result<Vec<f32>> {
        let fl = g.frame_len();
        let segments = g.frames.div_ceil(self.context.length);
        let mut clip = Vec::with_capacity(g.frames * fl);
        let mut first = 0;
        let mut resuming = true;
        for number in 1..=segments {
            let seg = Geometry { frames: self.context.length.min(g.frames - first), ..g };
            let shape = [seg.frames, g.h, g.w, g.c];
            if resuming {
                if let Some(saved) = self.resume.get(Stage::Segment, number, first, shape) {
                    clip.extend_from_slice(saved);
                    first += seg.frames;
                    continue;
                }
                resuming = false;
                if number > 1 {
                    eprintln!(
                        "clip {:03}: resumed from segment {} of {segments} ({}); denoising segment {number}",
                        self.number,
                        number - 1,
                        self.resume.dir().display()
                    );
                }
            }
            let noise = self.noise.draw(seg, first, None, None)?;
            let mut config = self.config.sampler.sampler_config()?;
            let mut x = if first == 0 {
                let sampler = Sampler::new(&config)?;
                noise.iter().map(|v| v * sampler.init_noise_sigma()).collect()
            } else {
                config.strength = self.config.video.chain_strength as f64;
                let last = &clip[clip.len() - fl..];
                let start: Vec<f32> = (0..seg.frames).flat_map(|_| last.iter().copied()).collect();
                let mut x = vec![0f32; start.len()];
                Sampler::new(&config)?.add_noise(&start, &noise, &mut x)?;
                x
            };
            let mut sampler = Sampler::new(&config)?;
            self.denoise(&mut sampler, &mut x, seg, first)?;
            self.resume.save(Stage::Segment, (number, segments), first, shape, &x)?;
            check_stop(|| format!("clip {:03}, after segment {number} of {segments}", self.number))?;
            clip.extend_from_slice(&x);
            first += seg.frames;
        }
        if resuming {
            eprintln!(
                "clip {:03}: resumed from segment {segments} of {segments} ({}): its latents are final, decoding",
                self.number,
                self.resume.dir().display()
            );
        }
        Ok(clip)
    }
}

/// A progress bar on stderr when it is a terminal (hidden otherwise: then the caller prints lines).
fn progress_bar(len: u64, prefix: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(&format!(
        "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} {{msg}} ({{elapsed}})"
    ))
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar
}

fn context_options(config: &RenderConfig) -> Result<ContextOptions> {
    let v = &config.video;
    let schedule = match v.context_schedule.as_str() {
        "uniform_looped" => Schedule::UniformLooped,
        "static_standard" => Schedule::StaticStandard,
        "batched" => Schedule::Batched,
        _ => Schedule::UniformStandard,
    };
    let fuse = match v.fuse.as_str() {
        "flat" => Fuse::Flat,
        "overlap_linear" => Fuse::OverlapLinear,
        _ => Fuse::Pyramid,
    };
    let options = ContextOptions {
        length: v.context_length,
        overlap: v.context_overlap,
        schedule,
        fuse,
        ..ContextOptions::default()
    };
    options.validate()?;
    Ok(options)
}

/// Which evaluation and window a model call serves (for errors and progress).
#[derive(Clone, Copy)]
pub(super) struct Step {
    pub(super) index: usize,
    pub(super) of: usize,
    pub(super) window: usize,
    pub(super) windows: usize,
    pub(super) timestep: f32,
}

/// Model inputs that stay the same across steps for a window (text context, control images),
/// kept on the device between steps. Cleared when it grows past a few windows.
pub(super) struct InputCache {
    entries: HashMap<CacheKey, Tensor>,
    /// Every cross-attention's k and v of a text context that all frames of a call share, per
    /// model: computed at the first call, read by the later ones (`TEXT_KV_CACHE`).
    text_kv: HashMap<TextKvKey, CrossKv>,
    /// Whether `text_kv` is used.
    text_kv_on: bool,
    /// How often k and v were computed, and read from `text_kv` instead.
    pub(super) text_kv_computed: usize,
    pub(super) text_kv_reused: usize,
    /// While a CUDA graph is captured: the entries it read, which the graph keeps.
    pub(super) recording: Option<Vec<Tensor>>,
    /// The CUDA graphs of the model calls (pipeline/graphs.rs).
    pub(super) graphs: WindowGraphs,
}

impl Default for InputCache {
    fn default() -> InputCache {
        InputCache {
            entries: HashMap::new(),
            text_kv: HashMap::new(),
            text_kv_on: std::env::var(TEXT_KV_CACHE).as_deref() != Ok("0"),
            text_kv_computed: 0,
            text_kv_reused: 0,
            recording: None,
            graphs: WindowGraphs::default(),
        }
    }
}

/// `CELFRAME_TEXT_KV_CACHE=0` computes every cross-attention's k and v in every forward, as one
/// forward alone does (A/B timing); by default a render computes them once per shared text
/// context and model.
const TEXT_KV_CACHE: &str = "CELFRAME_TEXT_KV_CACHE";

/// Which model's k and v of which text context: `model` 0 is the UNet, n + 1 ControlNet entry n;
/// the context is one row per CFG half of `part`, the conditional one `prompt`'s.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct TextKvKey {
    model: usize,
    part: Part,
    prompt: PromptBlend,
}

/// Device bytes of cached k and v past which the cache starts over (the UNet's for one SDXL
/// context row are 25.6 MB in f16: many prompts' worth).
const MAX_TEXT_KV_BYTES: usize = 2 << 30;

/// What a cached input is, for which clip frames.
#[derive(Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    /// The text context rows of these frames (the UNet's window, or a ControlNet's frames) for
    /// the CFG halves of `Part`.
    Context(Part, Vec<usize>),
    /// ControlNet `n`'s embedded distinct hint images of these frames (`distinct_hints`).
    Hints(usize, Vec<usize>),
    /// Union `n`'s condition `j`'s embedded distinct hint images of these frames, a zero image
    /// for frames without one (`ClipControl::distinct_hints`).
    ConditionHints(usize, usize, Vec<usize>),
}

const CACHED_WINDOWS: usize = 24;

impl InputCache {
    fn get_or(&mut self, key: CacheKey, make: impl FnOnce() -> Result<Tensor>) -> Result<&Tensor> {
        if !self.entries.contains_key(&key) && self.entries.len() >= CACHED_WINDOWS {
            self.entries.clear();
        }
        if !self.entries.contains_key(&key) {
            let t = make()?;
            self.entries.insert(key.clone(), t);
        }
        let t = &self.entries[&key];
        if let Some(read) = self.recording.as_mut() {
            read.push(t.clone());
        }
        Ok(t)
    }

    /// Every cross-attention's k and v of `context` for the model `model` (`TextKvKey`) with
    /// `weights`, when the context's rows are one per CFG half of `part` with the conditional one
    /// `prompt`'s (None: rows per frame, which are not cached; nor is anything with the cache
    /// off). Computed on `ex` at the first call for the key, or again when the weights changed.
    fn text_kv(
        &mut self,
        ex: &Exec,
        (model, weights): (usize, &ModelWeights),
        part: Part,
        prompt: Option<PromptBlend>,
        context: &Tensor,
    ) -> Result<Option<CrossKv>> {
        let Some(prompt) = prompt.filter(|_| self.text_kv_on) else { return Ok(None) };
        let key = TextKvKey { model, part, prompt };
        let kv = match self.text_kv.get(&key).filter(|kv| kv.holds_for(weights)) {
            Some(kv) => {
                self.text_kv_reused += 1;
                kv.clone()
            }
            None => {
                let Some(kv) = CrossKv::compute(ex, weights, context)? else { return Ok(None) };
                self.text_kv_computed += 1;
                let held: usize = self.text_kv.values().map(|kv| kv.tensor().size_bytes()).sum();
                if held + kv.tensor().size_bytes() > MAX_TEXT_KV_BYTES {
                    self.text_kv.clear();
                }
                self.text_kv.insert(key, kv.clone());
                kv
            }
        };
        if let Some(read) = self.recording.as_mut() {
            read.push(kv.tensor().clone());
        }
        Ok(Some(kv))
    }
}

/// Which halves of the classifier-free-guidance batch a model call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Part {
    /// `[uncond frames..., cond frames...]` (the conditional frames alone without CFG): one device.
    Both,
    /// One half, for `--split cfg` (the other half runs on another device).
    Half(Half),
}

/// One half of the CFG batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Half {
    Uncond,
    Cond,
}

impl Part {
    /// The halves of the model call, in batch order, for a guidance scale of `guidance`.
    fn halves(self, guidance: f32) -> &'static [Half] {
        match self {
            Part::Both if guidance > 1.0 => &[Half::Uncond, Half::Cond],
            Part::Both | Part::Half(Half::Cond) => &[Half::Cond],
            Part::Half(Half::Uncond) => &[Half::Uncond],
        }
    }
}

/// What a window's model call reads: the clip's settings, conditioning and control inputs, and
/// one device's models.
#[derive(Clone, Copy)]
pub(super) struct WindowRun<'a> {
    pub(super) config: &'a RenderConfig,
    pub(super) models: &'a Models,
    pub(super) target: Target<'a>,
    pub(super) cond: &'a ClipConditioning,
    pub(super) controls: &'a [Vec<ClipControl>],
}

/// The UNet's noise prediction for one window's `part` of the CFG batch (frame-major f32: the
/// halves one after the other, `window.len()` frames each), checked finite; `guide` turns the
/// whole batch into the guided prediction. `window` holds clip frame indices (prompt schedule,
/// control hints); `latents` its frames' model inputs.
pub(super) fn denoise_window(
    run: &WindowRun,
    g: Geometry,
    window: &[usize],
    latents: &[f32],
    step: Step,
    part: Part,
    cache: &mut InputCache,
) -> Result<Vec<f32>> {
    let (target, cond) = (run.target, run.cond);
    let call = ModelCall { run, g, window, step, part };
    let halves = call.halves();
    let videos = halves.len();
    let frames = window.len();
    let rows = videos * frames;
    let dtype = target.dtype;

    let mut sample = Vec::with_capacity(rows * g.frame_len());
    for _ in 0..videos {
        sample.extend_from_slice(latents);
    }
    let middle = window[frames / 2];
    let (_, pooled) = cond.at(middle);
    let mut text_embeds = Vec::with_capacity(videos * cond.pooled);
    for half in halves {
        text_embeds.extend_from_slice(if *half == Half::Uncond { &cond.negative.pooled } else { &pooled });
    }
    let ids = time_ids((g.height, g.width), (0, 0), (g.height, g.width));
    let host = WindowInputs {
        sample: Tensor::from_f32(&[rows, g.h, g.w, g.c], dtype, &sample)?,
        timestep: Tensor::from_f32(&[videos], DType::F32, &vec![step.timestep; videos])?,
        text_embeds: Tensor::from_f32(&[videos, cond.pooled], dtype, &text_embeds)?,
        time_ids: Tensor::from_f32(&[videos, ids.len()], DType::F32, &ids.repeat(videos))?,
    };
    let context = cache.get_or(CacheKey::Context(part, window.to_vec()), || call.context_rows(window))?.clone();
    let unet = (0, run.models.unet.weights());
    let kv = cache.text_kv(&target.ex, unet, part, call.shared_prompt(window, &context), &context)?;
    let context = TextContext { hidden: &context, kv: kv.as_ref() };
    let out = match target.ex {
        Exec::Cuda { gpu, scratch } => {
            graphs::model_output(gpu, scratch, call.graph_key(context), &call, &host, context, cache)?
        }
        Exec::Cpu => call.eager(&host, context, cache)?,
    };
    let out = target.host_f32(&out)?;
    if let Some(bad) = out.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "the UNet's output is not finite (value {bad} of {}) at step {}/{} (timestep {}), window {}/{}: a model or \
             dtype that overflows (try dtype = \"bf16\" or \"f32\")",
            out.len(),
            step.index + 1,
            step.of,
            step.timestep,
            step.window + 1,
            step.windows
        )));
    }
    Ok(out)
}

/// A window's model inputs besides the text context: host tensors (in the model's dtype, the
/// timestep and time ids in f32), or where they were placed.
pub(super) struct WindowInputs {
    pub(super) sample: Tensor,
    pub(super) timestep: Tensor,
    pub(super) text_embeds: Tensor,
    pub(super) time_ids: Tensor,
}

impl WindowInputs {
    pub(super) fn each(&self) -> [&Tensor; 4] {
        [&self.sample, &self.timestep, &self.text_embeds, &self.time_ids]
    }
}

/// One window's model call: the ControlNets acting on it (residuals summed) and the UNet or
/// motion UNet, for the CFG halves of `part`.
pub(super) struct ModelCall<'a> {
    run: &'a WindowRun<'a>,
    g: Geometry,
    window: &'a [usize],
    step: Step,
    part: Part,
}

impl ModelCall<'_> {
    fn halves(&self) -> &'static [Half] {
        self.part.halves(self.run.config.sampler.cfg)
    }

    /// The text context rows of the clip frames `list` for the call's halves.
    fn context_rows(&self, list: &[usize]) -> Result<Tensor> {
        let cond = self.run.cond;
        let (rows, values) = cond.context_rows(self.halves(), list);
        self.run.target.tensor(&[rows, cond.tokens, cond.width], self.run.target.dtype, &values)
    }

    /// `ClipConditioning::shared_prompt` for the call's halves.
    fn shared_prompt(&self, list: &[usize], context: &Tensor) -> Option<PromptBlend> {
        self.run.cond.shared_prompt(self.halves(), list, context.shape()[0])
    }

    /// What a CUDA graph of the call bakes in (pipeline/graphs.rs).
    fn graph_key(&self, context: TextContext) -> GraphKey {
        let (i, n) = (self.step.index, self.step.of);
        let active: Vec<bool> = self
            .run
            .models
            .controlnets
            .iter()
            .zip(self.run.controls)
            .map(|(net, controls)| match net {
                Net::Plain(_) => controls[0].active_at(i, n),
                Net::Union { .. } => controls.first().is_some_and(|c| c.active_at(i, n)),
            })
            .collect();
        GraphKey {
            part: self.part,
            frames: self.window.len(),
            context_rows: context.hidden.shape()[0],
            text_kv: context.kv.is_some(),
            controls: active.contains(&true).then(|| (self.window.to_vec(), active)),
        }
    }

    /// `forward` on the host inputs placed where the target computes.
    pub(super) fn eager(&self, host: &WindowInputs, context: TextContext, cache: &mut InputCache) -> Result<Tensor> {
        let [sample, timestep, text_embeds, time_ids] = host.each().map(|t| self.run.target.place(t.clone()));
        let placed =
            WindowInputs { sample: sample?, timestep: timestep?, text_embeds: text_embeds?, time_ids: time_ids? };
        self.forward(&placed, context, cache)
    }

    /// The UNet's output on `inputs` and `context` (where the target computes). Nothing here reads
    /// the host's per-step values: a CUDA graph captures it.
    pub(super) fn forward(
        &self,
        inputs: &WindowInputs,
        context: TextContext,
        cache: &mut InputCache,
    ) -> Result<Tensor> {
        let (config, models, target, controls) = (self.run.config, self.run.models, self.run.target, self.run.controls);
        let ex = target.ex;
        let frames = self.window.len();
        let inputs = UnetInputs {
            sample: &inputs.sample,
            timestep: &inputs.timestep,
            encoder_hidden_states: context.hidden,
            cross_kv: context.kv,
            text_embeds: Some(&inputs.text_embeds),
            time_ids: Some(&inputs.time_ids),
        };
        let context_rows = |list: &[usize]| self.context_rows(list);
        let shared_prompt = |list: &[usize], context: &Tensor| self.shared_prompt(list, context);
        let batch = WindowBatch {
            target,
            g: self.g,
            window: self.window,
            inputs: &inputs,
            halves: self.halves(),
            part: self.part,
            step: self.step,
            context_rows: &context_rows,
            shared_prompt: &shared_prompt,
        };
        let mut residuals: Option<UnetResiduals> = None;
        for (n, (net, controls)) in models.controlnets.iter().zip(controls).enumerate() {
            let r = match net {
                Net::Plain(net) => plain_residuals(&batch, n, net, &controls[0], cache)?,
                Net::Union { net, types } => union_residuals(&batch, n, net, types, controls, cache)?,
            };
            let Some(r) = r else { continue };
            residuals = Some(match residuals {
                None => r,
                Some(sum) => UnetResiduals {
                    down: sum.down.iter().zip(&r.down).map(|(a, b)| add(&ex, a, b, 1.0)).collect::<Result<_>>()?,
                    mid: add(&ex, &sum.mid, &r.mid, 1.0)?,
                },
            });
        }
        match &models.motion {
            Some(motion) => {
                let video = Frames { frames, group_norm_across_frames: config.video.group_norm_across_frames };
                motion.forward_unet(&ex, &models.unet, &inputs, video, residuals.as_ref())
            }
            None => models.unet.forward(&ex, &inputs, residuals.as_ref()),
        }
    }
}

/// The guided noise prediction of a window (`frames` frames of `frame_len` values) from the
/// model's output for the whole CFG batch, `[uncond..., cond...]` (the conditional frames alone
/// without CFG).
pub(super) fn guide(config: &RenderConfig, out: Vec<f32>, frames: usize, frame_len: usize) -> Result<Vec<f32>> {
    let guidance = config.sampler.cfg;
    if guidance <= 1.0 {
        return Ok(out);
    }
    let half = frames * frame_len;
    if out.len() != 2 * half {
        return Err(Error::Internal(format!("guiding {} values as two halves of {half}", out.len())));
    }
    let mut guided = vec![0f32; half];
    cfg_combine(&out[..half], &out[half..], guidance, &mut guided)?;
    if config.sampler.cfg_rescale > 0.0 {
        cfg_rescale(&mut guided, &out[half..], half, config.sampler.cfg_rescale)?;
    }
    Ok(guided)
}

/// One window's model call as the ControlNets see it: the UNet's inputs for the CFG batch
/// `[uncond frames..., cond frames...]`, one of those halves (`--split cfg`), or the conditional
/// frames alone.
struct WindowBatch<'a> {
    target: Target<'a>,
    g: Geometry,
    /// Clip frame indices.
    window: &'a [usize],
    inputs: &'a UnetInputs<'a>,
    /// The CFG halves of the batch, in row order.
    halves: &'a [Half],
    part: Part,
    step: Step,
    /// The text context rows of the frames given: one per half when the frames share a prompt,
    /// else [uncond x n, cond of each].
    context_rows: &'a dyn Fn(&[usize]) -> Result<Tensor>,
    /// The frames' prompt when their context rows are one per half (`ModelCall::shared_prompt`).
    shared_prompt: &'a dyn Fn(&[usize], &Tensor) -> Option<PromptBlend>,
}

impl WindowBatch<'_> {
    fn videos(&self) -> usize {
        self.halves.len()
    }

    fn rows(&self) -> usize {
        self.videos() * self.window.len()
    }

    /// `forward(inputs, frames)` of the ControlNet `net` (its `TextKvKey` model number and the
    /// weights of its cross-attentions) on the window positions `active` only (all when every
    /// frame is), the residuals scattered to the batch's rows with zeros for the others.
    fn on_frames(
        &self,
        active: &[usize],
        cache: &mut InputCache,
        net: (usize, &ModelWeights),
        forward: impl FnOnce(&UnetInputs, usize) -> Result<UnetResiduals>,
    ) -> Result<UnetResiduals> {
        let (ex, frames) = (self.target.ex, self.window.len());
        let with_kv = |cache: &mut InputCache, list: &[usize], context: &Tensor| {
            cache.text_kv(&ex, net, self.part, (self.shared_prompt)(list, context), context)
        };
        if active.len() == frames {
            let kv = with_kv(cache, self.window, self.inputs.encoder_hidden_states)?;
            return forward(&UnetInputs { cross_kv: kv.as_ref(), ..*self.inputs }, frames);
        }
        let list: Vec<usize> = active.iter().map(|&k| self.window[k]).collect();
        // The active frames' rows of the batch's sample (on the device: a CUDA graph reads the
        // sample's static tensor).
        let from: Vec<usize> = (0..self.videos()).flat_map(|v| active.iter().map(move |&k| v * frames + k)).collect();
        let sub_sample = gather_rows(&ex, self.inputs.sample, &from)?;
        let sub_context =
            cache.get_or(CacheKey::Context(self.part, list.clone()), || (self.context_rows)(&list))?.clone();
        let kv = with_kv(cache, &list, &sub_context)?;
        let sub_inputs = UnetInputs {
            sample: &sub_sample,
            encoder_hidden_states: &sub_context,
            cross_kv: kv.as_ref(),
            ..*self.inputs
        };
        let r = forward(&sub_inputs, active.len())?;
        let to: Vec<usize> = (0..self.videos()).flat_map(|v| active.iter().map(move |&k| v * frames + k)).collect();
        let rows = self.rows();
        Ok(UnetResiduals {
            down: r.down.iter().map(|t| scatter_rows(&ex, t, &to, rows)).collect::<Result<_>>()?,
            mid: scatter_rows(&ex, &r.mid, &to, rows)?,
        })
    }

    /// The embedded hints of the clip frames `list` for both CFG halves: each distinct hint image
    /// of `control` (a zero image for frames without one) uploaded and embedded by `embed` once
    /// per segment under `key`, then picked for every row.
    fn hint_rows(
        &self,
        cache: &mut InputCache,
        key: CacheKey,
        control: &ClipControl,
        list: &[usize],
        embed: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (target, g) = (self.target, self.g);
        let (distinct, pick) = control.distinct_hints(list);
        let embedded = cache
            .get_or(key, || {
                let side = g.height * g.width * 3;
                let mut values = Vec::with_capacity(distinct.len() * side);
                for d in &distinct {
                    match d {
                        // at the render size already: the [0, 1] scaling only
                        Some(h) => values.extend(prepare_control_images(
                            std::slice::from_ref(h.as_ref()),
                            g.width as u32,
                            g.height as u32,
                        )?),
                        None => values.resize(values.len() + side, 0.0),
                    }
                }
                embed(&target.tensor(&[distinct.len(), g.height, g.width, 3], target.dtype, &values)?)
            })?
            .clone();
        let rows_pick: Vec<usize> = (0..self.videos()).flat_map(|_| pick.iter().copied()).collect();
        gather_rows(&target.ex, &embedded, &rows_pick)
    }

    /// Every residual's row r times `factors[r]`.
    fn scale_residuals(&self, r: UnetResiduals, factors: &[f32]) -> Result<UnetResiduals> {
        let ex = self.target.ex;
        let scaled = |t: Tensor| scale_rows(&ex, &t, factors);
        Ok(UnetResiduals { down: r.down.into_iter().map(scaled).collect::<Result<_>>()?, mid: scaled(r.mid)? })
    }
}

/// A plain ControlNet's residuals for the window (None when it does not act on it).
fn plain_residuals(
    b: &WindowBatch,
    n: usize,
    net: &ControlNet,
    control: &ClipControl,
    cache: &mut InputCache,
) -> Result<Option<UnetResiduals>> {
    let (ex, window) = (b.target.ex, b.window);
    let frames = window.len();
    if !control.active_at(b.step.index, b.step.of) || window.iter().all(|&f| control.strengths[f] == 0.0) {
        return Ok(None);
    }
    // Only the frames with a hint run through the net; the others' rows get zero residuals.
    let active: Vec<usize> = (0..frames).filter(|&k| control.strengths[window[k]] > 0.0).collect();
    let list: Vec<usize> = active.iter().map(|&k| window[k]).collect();
    if let Some(f) = list.iter().find(|&&f| control.hints[f].is_none()) {
        return Err(Error::Internal(format!("a ControlNet runs on frame {f}, which has no hint image")));
    }
    // Frames holding a keyframe share its image: embedded once per segment.
    let hint =
        b.hint_rows(cache, CacheKey::Hints(n, list.clone()), control, &list, |images| net.embed_hints(&ex, images))?;
    let r = b.on_frames(&active, cache, (n + 1, net.weights()), |inputs, frames| {
        net.forward_frames_embedded(&ex, inputs, &hint, frames, control.scale)
    })?;
    // Per-row strength: the keyframe schedule's, and zero for the unconditional half in guess
    // mode (diffusers runs a guess-mode ControlNet on the conditional half only).
    let strengths: Vec<f32> = b
        .halves
        .iter()
        .flat_map(|&half| {
            let zero = control.scale.guess_mode && half == Half::Uncond;
            window.iter().map(move |&f| if zero { 0.0 } else { control.strengths[f] })
        })
        .collect();
    if strengths.iter().all(|&s| s == 1.0) {
        return Ok(Some(r));
    }
    b.scale_residuals(r, &strengths).map(Some)
}

/// A ControlNet Union's residuals for the window: one forward for every frame with any
/// condition's hint (None when no frame has one or the entry does not act at this step). Each
/// condition gives every row of the call an image: a frame without this condition's hint gets a
/// zero image at scale 0, which removes the condition from that row while every row keeps the
/// same type flags (`ControlNetUnion`: with several conditions the scale multiplies the
/// condition's features and token inside the fusion). A condition's row scale is its scale times
/// the frame's keyframe strength.
fn union_residuals(
    b: &WindowBatch,
    n: usize,
    net: &ControlNetUnion,
    types: &[ControlType],
    controls: &[ClipControl],
    cache: &mut InputCache,
) -> Result<Option<UnetResiduals>> {
    let (ex, window, videos) = (b.target.ex, b.window, b.videos());
    // start, end and guess mode are the entry's, the same in every condition.
    let Some(entry) = controls.first() else { return Ok(None) };
    if !entry.active_at(b.step.index, b.step.of) {
        return Ok(None);
    }
    let active: Vec<usize> =
        (0..window.len()).filter(|&k| controls.iter().any(|c| c.strengths[window[k]] > 0.0)).collect();
    if active.is_empty() {
        return Ok(None);
    }
    let list: Vec<usize> = active.iter().map(|&k| window[k]).collect();
    let mut features = Vec::with_capacity(controls.len());
    let mut scales = Vec::with_capacity(controls.len());
    for (j, c) in controls.iter().enumerate() {
        // A zero image stands for "no hint" on a frame.
        let key = CacheKey::ConditionHints(n, j, list.clone());
        features.push(b.hint_rows(cache, key, c, &list, |images| net.embed_hints(&ex, images))?);
        let s = c.scale.conditioning_scale;
        scales.push((0..videos).flat_map(|_| list.iter().map(move |&f| s * c.strengths[f])).collect::<Vec<f32>>());
    }
    let conditions: Vec<UnionEmbedded> = types
        .iter()
        .zip(&features)
        .zip(&scales)
        .map(|((&control_type, features), scale)| UnionEmbedded { control_type, features, scale })
        .collect();
    let guess_mode = entry.scale.guess_mode;
    let options = UnionOptions { guess_mode, from_multi: false };
    let r = b.on_frames(&active, cache, (n + 1, net.net_weights()), |inputs, frames| {
        net.forward_frames_embedded(&ex, inputs, &conditions, frames, options)
    })?;
    // Guess mode: the unconditional half gets no control (diffusers runs the net on the
    // conditional half only).
    if !(guess_mode && b.halves.contains(&Half::Uncond)) {
        return Ok(Some(r));
    }
    let frames = window.len();
    let keep: Vec<f32> = (0..b.rows()).map(|r| if b.halves[r / frames] == Half::Uncond { 0.0 } else { 1.0 }).collect();
    b.scale_residuals(r, &keep).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::controlnet::{UnionCondition, open_controlnet};
    use crate::output::write_png;

    #[test]
    fn memory_peak_counts_the_factors_only_beside_the_merge() {
        let gib = 1usize << 30;
        let group = |factors, switching, rendering, base_copies| MemoryPeak {
            weights: 11 * gib,
            loading: 0,
            switching,
            rendering,
            base_copies,
            factors,
        };
        // W1's shape: the factors freed before the activations, which are the larger.
        assert_eq!(group(2 * gib, 0, 7 * gib, 0).total(), 18 * gib);
        // A merge that needs more than the clips (factors + DoRA scratch) sets the peak.
        assert_eq!(group(2 * gib, 6 * gib, 7 * gib, 0).total(), 19 * gib);
        // The load's scratch (FP8 sources) never meets the factors: they come after it.
        assert_eq!(MemoryPeak { loading: 6 * gib, ..group(2 * gib, 5 * gib, 5 * gib, 0) }.total(), 18 * gib);
        assert_eq!(MemoryPeak { loading: 8 * gib, ..group(2 * gib, 5 * gib, 5 * gib, 0) }.total(), 19 * gib);
        let mut peak = MemoryPeak::default();
        peak.add(group(2 * gib, 0, 7 * gib, 6 * gib));
        peak.add(group(2 * gib, 0, 8 * gib, 0));
        assert_eq!((peak.total(), peak.base_copies), (24 * gib, 6 * gib));
        assert!(peak.line("").starts_with("peak GPU memory: 24.00 GiB (weights 11.00 GiB + LoRA base copies 6.00 GiB"));
    }

    #[test]
    fn a_24_gb_card_leaves_w1_its_activations() {
        let gib = |x: f64| (x * (1u64 << 30) as f64) as usize;
        // f16 W1 measured on an H100 (2026-12-06): 11.50 GiB of weights (+ 0.25 of arena slack),
        // 1.85 GiB of LoRA factors to come, 5.63 GiB of activations; the process's context and
        // everything before the weights arena took ~0.5 GiB of the 23.5 a 24 GB card leaves it.
        let (weights, factors, activations) = (gib(11.75), gib(1.85), gib(5.63));
        let free_after_weights = gib(23.5 - 0.5) - weights;
        let room = scratch_room(Some(free_after_weights), gib(23.99), weights, factors, 1);
        assert!(room >= activations, "{:.2} GiB of scratch", room as f64 / gib(1.0) as f64);
        // Another process's memory counts: with 2 GiB of it, the card no longer fits W1.
        assert!(scratch_room(Some(free_after_weights - gib(2.0)), gib(23.99), weights, factors, 1) < activations);
        // Two render threads sharing an 80 GB card split it after the headroom.
        let share = scratch_room(None, gib(79.2), weights, factors, 2);
        assert_eq!(share, (gib(79.2) - RENDER_HEADROOM) / 2 - weights - factors);
        // Nothing left: 1 GiB, which the arena then fails to get by name.
        assert_eq!(scratch_room(Some(gib(1.0)), gib(23.99), weights, factors, 1), 1 << 30);
    }

    #[test]
    fn frames_sharing_a_prompt_take_one_context_row_per_half() {
        // Keys on frames 0 (values 1) and 4 (values 5): frames 0-4 travel, 4 on hold the last key.
        let host = |v: f32| HostConditioning { context: vec![v; 6], pooled: vec![v; 2] };
        let cond = ClipConditioning {
            negative: host(-1.0),
            keys: vec![(0, host(1.0)), (4, host(5.0))],
            tokens: 3,
            width: 2,
            pooled: 2,
        };
        let both = [Half::Uncond, Half::Cond];
        // Frames past the last key share it: one row per half.
        assert_eq!(cond.context_rows(&both, &[4, 5, 6]), (2, [vec![-1.0; 6], vec![5.0; 6]].concat()));
        assert_eq!(cond.context_rows(&[Half::Cond], &[5, 6]), (1, vec![5.0; 6]));
        // Travelling frames: one row per frame in each half.
        let rows: Vec<f32> = [-1.0, -1.0, 2.0, 3.0].iter().flat_map(|&v| vec![v; 6]).collect();
        assert_eq!(cond.context_rows(&both, &[1, 2]), (4, rows));
        assert_eq!(cond.context_rows(&both, &[]), (0, Vec::new()));
        // Shared rows name their prompt (what the text k/v are cached by): frames past the last
        // key hold key 1; the travelling frames' rows are per frame.
        let held = Some(PromptBlend { a: 1, b: 1, t: 0 });
        assert_eq!(cond.shared_prompt(&both, &[4, 5, 6], 2), held);
        assert_eq!(cond.shared_prompt(&[Half::Cond], &[5, 6], 1), held);
        assert_eq!(cond.shared_prompt(&both, &[1, 2], 4), None);
        assert_eq!(cond.shared_prompt(&both, &[2], 2), Some(PromptBlend { a: 0, b: 1, t: 0.5f32.to_bits() }));
    }

    #[test]
    fn text_kv_are_computed_once_per_shared_context_and_model() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let unet = Unet::new(&open_unet(&fixtures.join("unet_a")).unwrap(), Place::Host(DType::F32)).unwrap();
        let width = unet.config.cross_attention_dims()[0];
        let values: Vec<f32> = (0..2 * 3 * width).map(|i| (i as f32 * 0.37).sin()).collect();
        let context = Tensor::from_f32(&[2, 3, width], DType::F32, &values).unwrap();
        let (ex, weights) = (Exec::Cpu, unet.weights());
        let mut cache = InputCache { text_kv_on: true, ..InputCache::default() };
        let p = |a: usize| Some(PromptBlend { a, b: a, t: 0 });
        let kv = |cache: &mut InputCache, model: usize, part: Part, prompt: Option<PromptBlend>| {
            cache.text_kv(&ex, (model, weights), part, prompt, &context).unwrap()
        };
        let first = kv(&mut cache, 0, Part::Both, p(0)).unwrap();
        let again = kv(&mut cache, 0, Part::Both, p(0)).unwrap();
        assert_eq!(first.tensor().to_f32_vec().unwrap(), again.tensor().to_f32_vec().unwrap());
        assert_eq!((cache.text_kv_computed, cache.text_kv_reused), (1, 1));
        // another half, prompt or model each have their own
        kv(&mut cache, 0, Part::Half(Half::Cond), p(0)).unwrap();
        kv(&mut cache, 0, Part::Both, p(1)).unwrap();
        kv(&mut cache, 1, Part::Both, p(0)).unwrap();
        assert_eq!((cache.text_kv_computed, cache.text_kv_reused), (4, 1));
        // rows per frame are not cached
        assert!(kv(&mut cache, 0, Part::Both, None).is_none());
        // weights changed in place (a LoRA switch): computed again
        weights.changed();
        kv(&mut cache, 0, Part::Both, p(0)).unwrap();
        assert_eq!((cache.text_kv_computed, cache.text_kv_reused), (5, 1));
        // CELFRAME_TEXT_KV_CACHE=0
        let mut off = InputCache { text_kv_on: false, ..InputCache::default() };
        assert!(kv(&mut off, 0, Part::Both, p(0)).is_none());
        assert_eq!(off.text_kv_computed, 0);
    }

    #[test]
    fn each_frame_takes_its_nearest_keyframes_hint() {
        // Three flat hints on frames 0, 4 and 8 of 9, held: frames 0-2 show the first, 3-6 the
        // second, 7-8 the third (the earlier keyframe on a tie).
        let dir = std::env::temp_dir().join(format!("celframe-hints-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, v) in [30u8, 120, 210].iter().enumerate() {
            write_png(&dir.join(format!("{i}.png")), &RgbImage::new(8, 8, vec![*v; 8 * 8 * 3]).unwrap()).unwrap();
        }
        let entry = ControlNetEntry {
            path: dir.clone(),
            kind: "openpose".into(),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            guess_mode: false,
            images: dir.clone(),
            keyframes: None,
            interpolation: "hold".into(),
            pose_interpolation: "none".into(),
            hands: true,
            face: true,
            video_timing: "time".into(),
            conditions: Vec::new(),
        };
        let g = Geometry { frames: 9, width: 8, height: 8, h: 1, w: 1, c: 4 };
        let control = ClipControl::build(&entry, g, 8).unwrap();
        let shown: Vec<u8> = control.hints.iter().map(|h| h.as_ref().unwrap().pixels()[0]).collect();
        assert_eq!(shown, vec![30, 30, 30, 120, 120, 120, 120, 210, 210]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The Union fixture (tests/fixtures/controlnet_a: unet_a's encoder tensors, the ControlNet's
    /// and the Union's own, config.union.json) as a diffusers folder under `dir`.
    fn union_fixture(dir: &Path) -> ControlNetUnion {
        use safetensors::tensor::TensorView;
        use safetensors::{SafeTensors, serialize_to_file};
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let cn = fixtures.join("controlnet_a");
        let names: serde_json::Value = serde_json::from_slice(&std::fs::read(cn.join("names.json")).unwrap()).unwrap();
        let unet = std::fs::read(fixtures.join("unet_a/diffusion_pytorch_model.safetensors")).unwrap();
        let plain = std::fs::read(cn.join("controlnet_only.safetensors")).unwrap();
        let union = std::fs::read(cn.join("union_only.safetensors")).unwrap();
        let unet = SafeTensors::deserialize(&unet).unwrap();
        let mut views: std::collections::BTreeMap<String, TensorView> = names["full"]["from_unet_a"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n.as_str().unwrap().to_string(), unet.tensor(n.as_str().unwrap()).unwrap()))
            .collect();
        let (plain, union) = (SafeTensors::deserialize(&plain).unwrap(), SafeTensors::deserialize(&union).unwrap());
        views.extend(plain.tensors());
        views.extend(union.tensors());
        let folder = dir.join("union");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(cn.join("config.union.json"), folder.join("config.json")).unwrap();
        serialize_to_file(views, None, &folder.join("diffusion_pytorch_model.safetensors")).unwrap();
        ControlNetUnion::new(&open_controlnet(&folder).unwrap(), Place::Host(DType::F32)).unwrap()
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut out = vec![0f32; n];
        NoiseStream::new(seed, 0).fill_normal(0, &mut out);
        out
    }

    #[test]
    fn a_union_window_is_its_rows_run_one_at_a_time() {
        // A 4-frame window of a CFG batch with two conditions: OpenPose on frames 0 (strength 1)
        // and 2 (strength 0.5), Depth on frames 1 and 2 (one image, shared), frame 3 none. Every
        // row of the window's one forward must equal a direct ControlNetUnion::forward on that
        // row alone with both conditions, the missing one a zero image at scale 0; frame 3's rows
        // zero; in guess mode the unconditional half zero too.
        let dir = std::env::temp_dir().join(format!("celframe-union-window-{}", std::process::id()));
        let net = union_fixture(&dir);
        let (frames, videos, hint_factor) = (4, 2, net.config().hint_factor());
        let g = Geometry { frames, width: 4 * hint_factor, height: 4 * hint_factor, h: 4, w: 4, c: 4 };
        // config.union.json: cross_attention_dim 32, text_embeds 1568 - 6 x 256 = 32 wide.
        let (tokens, width, pooled) = (3, 32, 32);
        let side = g.height * g.width * 3;
        let image = |seed| {
            let pixels =
                values(side, seed).into_iter().map(|v| ((v * 0.3 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8);
            Arc::new(RgbImage::new(g.width as u32, g.height as u32, pixels.collect()).unwrap())
        };
        let (pose_a, pose_b, depth): (HintImage, HintImage, HintImage) = (image(1), image(2), image(3));
        let control = |hints: Vec<Option<HintImage>>, strengths: Vec<f32>, scale: f32, guess_mode: bool| ClipControl {
            hints,
            strengths,
            scale: ControlScale { conditioning_scale: scale, guess_mode },
            start: 0.0,
            end: 1.0,
        };
        let types = [ControlType::OPENPOSE, ControlType::DEPTH];
        let latents = values(frames * g.frame_len(), 4);
        let sample: Vec<f32> = latents.repeat(videos);
        let uncond = values(tokens * width, 5);
        let cond: Vec<Vec<f32>> = (0..frames).map(|f| values(tokens * width, 6 + f as u64)).collect();
        let text_embeds = values(videos * pooled, 20);
        let ids = time_ids((g.height, g.width), (0, 0), (g.height, g.width));
        let t = |shape: &[usize], v: &[f32]| Tensor::from_f32(shape, DType::F32, v).unwrap();
        let context_rows = |list: &[usize]| -> Result<Tensor> {
            let mut v: Vec<f32> = list.iter().flat_map(|_| uncond.iter().copied()).collect();
            v.extend(list.iter().flat_map(|&f| cond[f].iter().copied()));
            Ok(t(&[videos * list.len(), tokens, width], &v))
        };
        let (sample_t, timestep) = (t(&[videos * frames, g.h, g.w, g.c], &sample), t(&[videos], &[500.0, 500.0]));
        let context = context_rows(&[0, 1, 2, 3]).unwrap();
        let (text_t, ids_t) = (t(&[videos, pooled], &text_embeds), t(&[videos, ids.len()], &ids.repeat(videos)));
        let inputs = UnetInputs {
            sample: &sample_t,
            timestep: &timestep,
            encoder_hidden_states: &context,
            cross_kv: None,
            text_embeds: Some(&text_t),
            time_ids: Some(&ids_t),
        };
        let step = Step { index: 0, of: 4, window: 0, windows: 1, timestep: 500.0 };
        let target = Target { ex: Exec::Cpu, dtype: DType::F32 };
        let window = [0, 1, 2, 3];
        let batch = WindowBatch {
            target,
            g,
            window: &window,
            inputs: &inputs,
            halves: &[Half::Uncond, Half::Cond],
            part: Part::Both,
            step,
            context_rows: &context_rows,
            // a context row per frame: no cached k/v
            shared_prompt: &|_, _| None,
        };
        let pose = vec![Some(pose_a.clone()), None, Some(pose_b.clone()), None];
        let depths = vec![None, Some(depth.clone()), Some(depth.clone()), None];
        for guess_mode in [false, true] {
            let controls = [
                control(pose.clone(), vec![1.0, 0.0, 0.5, 0.0], 0.8, guess_mode),
                control(depths.clone(), vec![0.0, 1.0, 1.0, 0.0], 0.6, guess_mode),
            ];
            let r = union_residuals(&batch, 0, &net, &types, &controls, &mut InputCache::default()).unwrap().unwrap();
            let got: Vec<Vec<f32>> = r.down.iter().chain([&r.mid]).map(|t| t.to_f32_vec().unwrap()).collect();
            for row in 0..videos * frames {
                let (v, k) = (row / frames, row % frames);
                let zero = k == 3 || guess_mode && v == 0;
                let expected: Vec<Vec<f32>> = if zero {
                    got.iter().map(|all| vec![0.0; all.len() / (videos * frames)]).collect()
                } else {
                    let fl = g.frame_len();
                    let one_sample = t(&[1, g.h, g.w, g.c], &latents[k * fl..(k + 1) * fl]);
                    let ctx = t(&[1, tokens, width], if v == 0 { &uncond } else { &cond[k] });
                    let te = t(&[1, pooled], &text_embeds[v * pooled..(v + 1) * pooled]);
                    let (ts, ti) = (t(&[1], &[500.0]), t(&[1, ids.len()], &ids));
                    let x = UnetInputs {
                        sample: &one_sample,
                        timestep: &ts,
                        encoder_hidden_states: &ctx,
                        cross_kv: None,
                        text_embeds: Some(&te),
                        time_ids: Some(&ti),
                    };
                    let images: Vec<Tensor> = controls
                        .iter()
                        .map(|c| match &c.hints[k] {
                            Some(h) => {
                                let unit: Vec<f32> = h.pixels().iter().map(|&v| v as f32 / 255.0).collect();
                                t(&[1, g.height, g.width, 3], &unit)
                            }
                            None => t(&[1, g.height, g.width, 3], &vec![0.0; side]),
                        })
                        .collect();
                    let scales: Vec<[f32; 1]> =
                        controls.iter().map(|c| [c.scale.conditioning_scale * c.strengths[k]]).collect();
                    let conditions: Vec<UnionCondition> = (0..2)
                        .map(|i| UnionCondition { control_type: types[i], image: &images[i], scale: &scales[i] })
                        .collect();
                    let options = UnionOptions { guess_mode, from_multi: false };
                    let e = net.forward(&Exec::Cpu, &x, &conditions, options).unwrap();
                    e.down.iter().chain([&e.mid]).map(|t| t.to_f32_vec().unwrap()).collect()
                };
                for (n, (all, want)) in got.iter().zip(&expected).enumerate() {
                    let part = &all[row * want.len()..(row + 1) * want.len()];
                    let err = part.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
                    let norm = want.iter().map(|b| b * b).sum::<f32>().sqrt();
                    assert!(
                        err <= 1e-5 * norm.max(1e-3),
                        "guess_mode {guess_mode}, row {row}, residual {n}: {err} of {norm}"
                    );
                    assert!(zero || norm > 0.0, "row {row} residual {n} is zero");
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn step_noise_drawn_on_all_cores_is_each_frames_stream_slice() {
        // 40 frames (more than the cores here, so threads take several), drawn for frames 7..47 of a
        // clip with a FreeNoise source map: frame f's values are the stream's elements from
        // source(f) * frame_len, whatever thread drew them.
        let g = Geometry { frames: 40, width: 40, height: 24, h: 3, w: 5, c: 4 };
        let fl = g.frame_len();
        let sources: Vec<usize> = (0..47).map(|f| (f * 13) % 47).collect();
        let noise = ClipNoise::Generator { seed: 11, clip: 2, pass: 0 };
        let got = noise.draw(g, 7, Some(3), Some(&sources)).unwrap();
        let stream = NoiseStream::new(11, stream_id(&[2, Purpose::StepNoise as u64, 3]));
        for f in 0..g.frames {
            let mut want = vec![0f32; fl];
            stream.fill_normal((sources[7 + f] * fl) as u64, &mut want);
            assert_eq!(&got[f * fl..(f + 1) * fl], &want[..], "frame {f}");
        }
    }
}
