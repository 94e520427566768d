//! `celframe verify controlnet`: diffusers' `ControlNetModel.forward` on a reference file's inputs,
//! compared output by output.
//!
//! Reference format (diffusers `models/controlnets/controlnet.py` argument and output names, NCHW):
//! `in.sample` [B, C, h, w], `in.timestep` (scalar, [1] or [B]), `in.encoder_hidden_states`
//! [B, tokens, width], `in.controlnet_cond` [B, conditioning_channels, f * h, f * w] (the control
//! image, values in [0, 1]; f = 8 for SDXL), optionally `in.conditioning_scale` (scalar or [1],
//! default 1) and `in.guess_mode` (scalar or [1], 0 / 1 or a bool, default 0),
//! `in.added_cond_kwargs.text_embeds` [B, pooled], `in.added_cond_kwargs.time_ids` [B, n] ->
//! `out.down_block_res_samples.<k>` (one per UNet skip connection, k = 0..8 for SDXL) and
//! `out.mid_block_res_sample`.

use std::path::Path;

use super::arenas::{model_arenas, most_of_memory, scratch_bytes};
use super::unet::{ForwardInputs, read_timestep};
use super::{Device, Reference, Settings, Verification, compare};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::models::{
    ControlNet, ControlNetCheckpoint, ControlNetConfig, ControlNetFormat, ControlScale, Place, UnetResiduals,
    open_controlnet,
};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

pub(super) const DOWN_OUTPUT: &str = "out.down_block_res_samples.";
pub(super) const MID_OUTPUT: &str = "out.mid_block_res_sample";
/// Every input a ControlNet reference may hold.
const INPUTS: [&str; 8] = [
    "in.sample",
    "in.timestep",
    "in.encoder_hidden_states",
    "in.controlnet_cond",
    "in.conditioning_scale",
    "in.guess_mode",
    "in.added_cond_kwargs.text_embeds",
    "in.added_cond_kwargs.time_ids",
];

/// The reference's inputs in the engine's layout (NHWC, compute dtype; timestep and time ids
/// f32), the scaling, and the expected outputs as stored (NCHW), down residuals first.
struct ControlNetReference {
    inputs: ForwardInputs,
    controlnet_cond: Tensor,
    scale: ControlScale,
    expected: Vec<(String, Tensor)>,
}

/// The names of the outputs, in `UnetResiduals` order (down 0..n, then mid).
fn output_names(down: usize) -> Vec<String> {
    (0..down).map(|k| format!("{DOWN_OUTPUT}{k}")).chain([MID_OUTPUT.to_string()]).collect()
}

/// A scalar input (0-d or [1]) as its one value; `what` says what it must be.
fn scalar<T>(r: &Reference, name: &str, what: &str, values: Vec<T>) -> Result<T> {
    let shape = r.shape(name)?;
    let mut values = values.into_iter();
    match (shape, values.next(), values.next()) {
        ([] | [1], Some(v), None) => Ok(v),
        _ => Err(r.bad(format!("{name} has shape {shape:?}; it must be {what}, a scalar or [1]"))),
    }
}

/// Reads and checks the reference against `cfg`; shapes in errors are the file's (NCHW).
fn read_reference(r: &Reference, cfg: &ControlNetConfig, dtype: DType) -> Result<ControlNetReference> {
    let down = cfg.skips().len();
    let outputs = output_names(down);
    r.only(
        |n| INPUTS.contains(&n) || outputs.iter().any(|o| o == n),
        &format!(
            "the ControlNet takes {}, and gives {DOWN_OUTPUT}0 to {DOWN_OUTPUT}{} and {MID_OUTPUT}",
            INPUTS.join(", "),
            down - 1
        ),
    )?;
    let required = ["in.sample", "in.timestep", "in.encoder_hidden_states", "in.controlnet_cond"];
    r.require(&required)?;
    if let Some(missing) = outputs.iter().find(|o| !r.contains(o)) {
        return Err(r.bad(format!(
            "no {missing}: a ControlNet reference holds {DOWN_OUTPUT}0 to {DOWN_OUTPUT}{} and {MID_OUTPUT}",
            down - 1
        )));
    }

    let enc = &cfg.encoder;
    let s = r.shape("in.sample")?;
    let &[batch, channels, height, width] = s else {
        return Err(
            r.bad(format!("in.sample has shape {s:?}; the ControlNet takes NCHW [batch, channels, height, width]"))
        );
    };
    if channels != enc.in_channels || s.contains(&0) {
        return Err(r.bad(format!(
            "in.sample has shape {s:?}; this ControlNet takes NCHW [batch, {}, height, width], every size positive",
            enc.in_channels
        )));
    }
    let f = cfg.hint_factor();
    let c = r.shape("in.controlnet_cond")?;
    let want = [Some(batch), Some(cfg.conditioning_channels), height.checked_mul(f), width.checked_mul(f)];
    if c.iter().map(|&d| Some(d)).ne(want) {
        return Err(r.bad(format!(
            "in.controlnet_cond has shape {c:?}; with in.sample {s:?} this ControlNet takes [{batch}, {}, {}, {}]: \
             the control image at {f}x the latent size",
            cfg.conditioning_channels,
            height.saturating_mul(f),
            width.saturating_mul(f)
        )));
    }
    // Output shapes: [batch, C, h >> step, w >> step] per skip, then the mid block's.
    let levels =
        cfg.skips().into_iter().chain([(enc.block_out_channels.last().copied().unwrap_or(0), enc.downsamplers())]);
    for (name, (c, step)) in outputs.iter().zip(levels) {
        let want = [batch, c, height >> step, width >> step];
        let found = r.shape(name)?;
        if found != want {
            return Err(
                r.bad(format!("{name} has shape {found:?}; this ControlNet gives {want:?} for in.sample {s:?}"))
            );
        }
    }

    let conditioning_scale = match r.contains("in.conditioning_scale") {
        true => {
            let t = r.float("in.conditioning_scale")?;
            scalar(r, "in.conditioning_scale", "one number", t.to_f32_vec()?)?
        }
        false => 1.0,
    };
    let guess_mode = match r.contains("in.guess_mode") {
        true => scalar(r, "in.guess_mode", "true or false (a bool, or 0 or 1)", r.flags("in.guess_mode")?)?,
        false => false,
    };
    let optional = |name: &str, dtype: DType| r.contains(name).then(|| r.float_as(name, dtype)).transpose();
    let expected = outputs.iter().map(|n| Ok((n.clone(), r.float(n)?))).collect::<Result<Vec<_>>>()?;
    Ok(ControlNetReference {
        inputs: ForwardInputs {
            sample: nchw_to_nhwc(&r.float_as("in.sample", dtype)?)?,
            timestep: read_timestep(r, batch, "")?,
            encoder_hidden_states: r.float_as("in.encoder_hidden_states", dtype)?,
            text_embeds: optional("in.added_cond_kwargs.text_embeds", dtype)?,
            time_ids: optional("in.added_cond_kwargs.time_ids", DType::F32)?,
            residuals: None,
        },
        controlnet_cond: nchw_to_nhwc(&r.float_as("in.controlnet_cond", dtype)?)?,
        scale: ControlScale { conditioning_scale, guess_mode },
        expected,
    })
}

/// Loads the ControlNet and the reference, runs the forward on `settings.device` in its dtype and
/// compares every residual.
pub fn verify_controlnet(weights_path: &Path, reference: &Path, settings: &Settings) -> Result<Verification> {
    let Settings { device, dtype, tolerance, scratch_gb } = *settings;
    let checkpoint = open_controlnet(weights_path)?;
    let r = read_reference(&Reference::open(reference)?, &checkpoint.config, dtype)?;
    let s = r.inputs.sample.shape();
    let format = match checkpoint.format {
        ControlNetFormat::Diffusers => "diffusers",
        ControlNetFormat::DiffusersSingleFile => "single file, diffusers names",
        ControlNetFormat::Cldm { prefixed: true } => "single file, cldm names under control_model.",
        ControlNetFormat::Cldm { prefixed: false } => "single file, cldm names",
    };
    let summary = format!(
        "{} ({format}): {}\n{} on {device:?} in {dtype:?}: batch {}, latent {}x{}, control image {}x{}, {} context \
         tokens, conditioning_scale {}{}",
        weights_path.display(),
        checkpoint.config,
        reference.display(),
        s[0],
        s[1],
        s[2],
        r.controlnet_cond.shape()[1],
        r.controlnet_cond.shape()[2],
        r.inputs.encoder_hidden_states.shape().get(1).unwrap_or(&0),
        r.scale.conditioning_scale,
        if r.scale.guess_mode { ", guess mode" } else { "" }
    );
    let residuals = match device {
        Device::Cpu => {
            let cn = ControlNet::new(&checkpoint, Place::Host(dtype))?;
            cn.forward(&Exec::Cpu, &r.inputs.unet_inputs(), &r.controlnet_cond, r.scale)?
        }
        Device::Cuda => run_cuda(&checkpoint, &r, dtype, scratch_gb)?,
    };
    let mut comparisons = Vec::new();
    let mut outputs = Vec::new();
    for (computed, (name, expected)) in residuals.down.iter().chain([&residuals.mid]).zip(&r.expected) {
        let computed = nhwc_to_nchw(computed)?;
        comparisons.push(compare(name, &computed, expected, tolerance)?);
        outputs.push((name.clone(), computed));
    }
    Ok(Verification { comparisons, outputs, summary })
}

fn run_cuda(
    checkpoint: &ControlNetCheckpoint,
    r: &ControlNetReference,
    dtype: DType,
    scratch_gb: Option<f64>,
) -> Result<UnetResiduals> {
    let gpu = Gpu::from_env()?;
    let explicit = scratch_gb.map(|gb| scratch_bytes(&gpu, gb)).transpose()?;
    let extra = r.inputs.device_bytes() + r.controlnet_cond.size_bytes() + 256;
    let (weights_arena, scratch) =
        model_arenas(&checkpoint.weights, dtype, extra, |w| explicit.unwrap_or_else(|| most_of_memory(&gpu, w)))?;
    let cn = ControlNet::new(checkpoint, Place::Device { gpu: &gpu, arena: &weights_arena, dtype })?;
    let inputs = r.inputs.upload(&gpu, &weights_arena)?;
    let cond = gpu.upload(&weights_arena, &r.controlnet_cond, dtype)?;
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let out = cn.forward(&ex, &inputs.unet_inputs(), &cond, r.scale)?;
    let host = UnetResiduals {
        down: out.down.iter().map(|t| gpu.download(t)).collect::<Result<_>>()?,
        mid: gpu.download(&out.mid)?,
    };
    eprintln!(
        "CUDA scratch arena: peak {:.2} GiB of {:.2} GiB",
        scratch.peak() as f64 / (1u64 << 30) as f64,
        scratch.capacity() as f64 / (1u64 << 30) as f64
    );
    Ok(host)
}
