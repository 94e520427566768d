//! `celframe verify motion_unet`: diffusers' `UNetMotionModel.forward` (a UNet with a
//! MotionAdapter's modules) on a reference file's inputs, compared with its `out.sample`.
//!
//! Reference format (diffusers `models/unets/unet_motion_model.py` argument names):
//! `in.sample` [videos, channels, frames, height, width], `in.timestep` (scalar, [1] or [videos]),
//! `in.encoder_hidden_states` [videos * frames, tokens, width], `in.added_cond_kwargs.text_embeds`
//! [videos, pooled], `in.added_cond_kwargs.time_ids` [videos, n], optionally ControlNet residuals
//! `in.down_block_additional_residuals.<k>` [videos * frames, C, h, w] and
//! `in.mid_block_additional_residual` -> `out.sample` [videos, channels, frames, height, width].
//!
//! With LoRAs (`verify_motion_unet_with_loras`, `--lora`), one name map covers the UNet and the
//! motion modules: UNet modules merge into the UNet, AnimateDiff MotionLoRA modules into the motion
//! modules.

use std::path::Path;

use super::arenas::{model_arenas, most_of_memory, scratch_bytes, weight_bytes};
use super::unet::{CACHED_KV_OUTPUT, ForwardInputs, INPUTS, RESIDUAL_PREFIX, read_residuals, read_timestep, twice};
use super::{Device, LoraOptions, Reference, Settings, Verification, compare};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::layout::{rows_to_video, video_to_rows};
use crate::models::lora::{Component, LoraMerge};
use crate::models::with_loras;
use crate::models::{
    Frames, MotionCheckpoint, MotionFormat, MotionModules, Place, Unet, UnetCheckpoint, UnetConfig, UnetInputs,
    open_motion, open_unet,
};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

/// The reference's inputs in the engine's layout (frames folded into the batch, NHWC), compute
/// dtype (timestep and time ids f32), and the expected output as stored (5-D).
struct MotionReference {
    frames: usize,
    inputs: ForwardInputs,
    expected: Tensor,
}

/// Reads and checks the reference against the UNet's config; shapes in errors are the file's.
fn read_reference(r: &Reference, cfg: &UnetConfig, dtype: DType) -> Result<MotionReference> {
    r.only(
        |n| INPUTS.contains(&n) || n.starts_with(RESIDUAL_PREFIX) || n == "out.sample",
        &format!("the motion UNet takes {} and {RESIDUAL_PREFIX}<k>, and gives out.sample", INPUTS.join(", ")),
    )?;
    r.require(&["in.sample", "in.timestep", "in.encoder_hidden_states", "out.sample"])?;
    let s = r.shape("in.sample")?;
    let &[videos, channels, frames, height, width] = s else {
        return Err(r.bad(format!(
            "in.sample has shape {s:?}; the motion UNet takes [videos, channels, frames, height, width]"
        )));
    };
    if channels != cfg.in_channels || s.contains(&0) {
        return Err(r.bad(format!(
            "in.sample has shape {s:?}; this UNet takes [videos, {}, frames, height, width], every size positive",
            cfg.in_channels
        )));
    }
    let out = r.shape("out.sample")?;
    if out.len() != 5 {
        return Err(r.bad(format!(
            "out.sample has shape {out:?}; the motion UNet gives [videos, channels, frames, height, width]"
        )));
    }
    let timestep = read_timestep(r, videos, " (one per video)")?;
    // Per frame, as the UNet's skip connections are: [videos * frames, C, h, w].
    let residuals = read_residuals(r, cfg, [videos * frames, height, width], dtype, " (one per frame)")?;
    let optional = |name: &str, dtype: DType| r.contains(name).then(|| r.float_as(name, dtype)).transpose();
    Ok(MotionReference {
        frames,
        inputs: ForwardInputs {
            sample: video_to_rows(&r.float_as("in.sample", dtype)?)?,
            timestep,
            encoder_hidden_states: r.float_as("in.encoder_hidden_states", dtype)?,
            text_embeds: optional("in.added_cond_kwargs.text_embeds", dtype)?,
            time_ids: optional("in.added_cond_kwargs.time_ids", DType::F32)?,
            residuals,
        },
        expected: r.float("out.sample")?,
    })
}

/// Loads the UNet, the motion modules and the reference, runs the forward on `settings.device`
/// and compares. `group_norm_across_frames`: AnimateDiff-Evolved's UNet group norms (`Frames`).
pub fn verify_motion_unet(
    unet_path: &Path,
    motion_path: &Path,
    reference: &Path,
    settings: &Settings,
    group_norm_across_frames: bool,
) -> Result<Verification> {
    let no_loras = LoraOptions::default();
    verify_motion_unet_with_loras(unet_path, motion_path, reference, settings, group_norm_across_frames, &no_loras)
}

/// `verify_motion_unet` with `loras` merged first: UNet modules into the UNet, motion-module
/// modules (AnimateDiff MotionLoRAs) into the motion modules, one name map over both.
pub fn verify_motion_unet_with_loras(
    unet_path: &Path,
    motion_path: &Path,
    reference: &Path,
    settings: &Settings,
    group_norm_across_frames: bool,
    loras: &LoraOptions,
) -> Result<Verification> {
    let Settings { device, dtype, tolerance, scratch_gb } = *settings;
    let unet = open_unet(unet_path)?;
    let motion = open_motion(motion_path)?;
    motion.config.check_unet(&unet.config)?;
    let loras = loras.resolve(|t| {
        t.add_unet(&unet)?;
        t.add_motion(&motion)
    })?;
    let merges = Merges {
        unet: loras.as_ref().and_then(|l| l.merge(Component::Unet)),
        motion: loras.as_ref().and_then(|l| l.merge(Component::Motion)),
    };
    let r = read_reference(&Reference::open(reference)?, &unet.config, dtype)?;
    let video = Frames { frames: r.frames, group_norm_across_frames };
    let s = r.inputs.sample.shape();
    let format = match motion.format {
        MotionFormat::Diffusers => "diffusers",
        MotionFormat::Original => "original AnimateDiff names",
    };
    let mut summary = format!(
        "{}: {}\n{} ({format}): {}\n{} on {device:?} in {dtype:?}: {} videos x {} frames, latent {}x{}, {} context \
         tokens{}{}",
        unet_path.display(),
        unet.config,
        motion_path.display(),
        motion.config,
        reference.display(),
        s[0] / r.frames,
        r.frames,
        s[1],
        s[2],
        r.inputs.encoder_hidden_states.shape().get(1).unwrap_or(&0),
        if r.inputs.residuals.is_some() { ", with ControlNet residuals" } else { "" },
        if group_norm_across_frames { ", UNet group norms across frames" } else { "" }
    );
    for line in loras.iter().flat_map(|l| &l.summary) {
        summary.push_str(&format!("\n{line}"));
    }
    let (sample, cached) = match device {
        Device::Cpu => {
            let host = Place::Host(dtype);
            let model = Unet::new(&unet, with_loras(&host, merges.unet))?;
            let modules = MotionModules::new(&motion, &model, with_loras(&host, merges.motion))?;
            let (ex, residuals) = (Exec::Cpu, r.inputs.residuals.as_ref());
            twice(&ex, model.weights(), &r.inputs.unet_inputs(), |x| {
                modules.forward_unet(&ex, &model, x, video, residuals)
            })?
        }
        Device::Cuda => run_cuda(&unet, &motion, merges, &r.inputs, video, dtype, scratch_gb)?,
    };
    let sample = rows_to_video(&sample, r.frames)?;
    let mut comparisons = vec![compare("out.sample", &sample, &r.expected, tolerance)?];
    if let Some(cached) = cached {
        comparisons.push(compare(CACHED_KV_OUTPUT, &rows_to_video(&cached, r.frames)?, &r.expected, tolerance)?);
    }
    Ok(Verification { comparisons, outputs: vec![("out.sample".to_string(), sample)], summary })
}

/// The deltas for the UNet and for the motion modules, where a LoRA adapts them.
#[derive(Clone, Copy)]
struct Merges<'a> {
    unet: Option<&'a LoraMerge>,
    motion: Option<&'a LoraMerge>,
}

fn run_cuda(
    unet: &UnetCheckpoint,
    motion: &MotionCheckpoint,
    merges: Merges,
    r: &ForwardInputs,
    video: Frames,
    dtype: DType,
    scratch_gb: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    let gpu = Gpu::from_env()?;
    let motion_bytes = weight_bytes(&motion.weights, dtype);
    let explicit = scratch_gb.map(|gb| scratch_bytes(&gpu, gb)).transpose()?;
    let (weights_arena, scratch) = model_arenas(&unet.weights, dtype, motion_bytes + r.device_bytes(), |w| {
        explicit.unwrap_or_else(|| most_of_memory(&gpu, w + motion_bytes))
    })?;
    let place = Place::device(&gpu, &weights_arena, dtype);
    let model = Unet::new(unet, with_loras(&place, merges.unet))?;
    let modules = MotionModules::new(motion, &model, with_loras(&place, merges.motion))?;
    let inputs = r.upload(&gpu, &weights_arena)?;
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let residuals = inputs.residuals.as_ref();
    let forward = |x: &UnetInputs| modules.forward_unet(&ex, &model, x, video, residuals);
    let outs = twice(&ex, model.weights(), &inputs.unet_inputs(), forward)?;
    eprintln!(
        "CUDA scratch arena: peak {:.2} GiB of {:.2} GiB",
        scratch.peak() as f64 / (1u64 << 30) as f64,
        scratch.capacity() as f64 / (1u64 << 30) as f64
    );
    Ok(outs)
}
