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
//!
//! A Union / ProMax checkpoint (diffusers `ControlNetUnionModel.forward`) takes instead of
//! `in.controlnet_cond` one control image per condition, `in.controlnet_cond.<i>` (i = 0..n-1),
//! with `in.control_type_idx` [n] (integers: each condition's type) and `in.control_type` [B, N]
//! (or [N]: the type flags; they must be the conditions' types, as diffusers' pipelines make
//! them), `in.conditioning_scale` one number or [n] (one per condition), and optionally
//! `in.from_multi` (a flag). A Union reference's batch must hold one sample: diffusers' token
//! attention mixes a batch's rows, celframe computes each row on its own (`models::controlnet::union`).

use std::path::Path;

use super::arenas::{model_arenas, most_of_memory, scratch_bytes};
use super::unet::{ForwardInputs, read_timestep};
use super::{Device, Reference, Settings, Verification, compare};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::controlnet::open_controlnet_with_base;
use crate::models::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::models::{
    ControlNet, ControlNetCheckpoint, ControlNetConfig, ControlNetFormat, ControlNetUnion, ControlScale, ControlType,
    Place, UnetInputs, UnetResiduals, UnionCondition, UnionOptions,
};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

pub(super) const DOWN_OUTPUT: &str = "out.down_block_res_samples.";
pub(super) const MID_OUTPUT: &str = "out.mid_block_res_sample";
/// Every input a ControlNet reference may hold (a Union's besides: `UNION_INPUTS`).
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
/// A Union reference's inputs beside `INPUTS` less `in.controlnet_cond`; its control images are
/// `COND_PREFIX<i>`.
const UNION_INPUTS: [&str; 3] = ["in.control_type", "in.control_type_idx", "in.from_multi"];
const COND_PREFIX: &str = "in.controlnet_cond.";

/// The reference's inputs in the engine's layout (NHWC, compute dtype; timestep and time ids
/// f32), the control images and scaling, and the expected outputs as stored (NCHW), down
/// residuals first.
struct ControlNetReference {
    inputs: ForwardInputs,
    control: Control,
    expected: Vec<(String, Tensor)>,
}

/// What a reference gives the net besides the UNet's inputs.
enum Control {
    Plain {
        controlnet_cond: Tensor,
        scale: ControlScale,
    },
    /// The conditions (type, control images NHWC, scale) in the file's order.
    Union {
        conditions: Vec<(ControlType, Tensor, f32)>,
        options: UnionOptions,
    },
}

impl Control {
    fn images(&self) -> Vec<&Tensor> {
        match self {
            Control::Plain { controlnet_cond, .. } => vec![controlnet_cond],
            Control::Union { conditions, .. } => conditions.iter().map(|(_, t, _)| t).collect(),
        }
    }

    /// The scaling for the summary line.
    fn describe(&self) -> String {
        match self {
            Control::Plain { scale, .. } => format!(
                "conditioning_scale {}{}",
                scale.conditioning_scale,
                if scale.guess_mode { ", guess mode" } else { "" }
            ),
            Control::Union { conditions, options } => {
                let list: Vec<String> = conditions.iter().map(|(t, _, s)| format!("{} x {s}", t.name())).collect();
                let mode = match (conditions.len(), options.from_multi) {
                    (1, _) | (_, true) => "residuals scaled",
                    _ => "scales inside the fusion",
                };
                let guess = if options.guess_mode { ", guess mode" } else { "" };
                format!("Union conditions [{}] ({mode}{guess})", list.join(", "))
            }
        }
    }
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
    let union = cfg.union.is_some();
    let known = |n: &str| match union {
        false => INPUTS.contains(&n),
        true => {
            (INPUTS.contains(&n) && n != "in.controlnet_cond")
                || UNION_INPUTS.contains(&n)
                || n.strip_prefix(COND_PREFIX).is_some_and(|i| i.parse::<usize>().is_ok())
        }
    };
    let takes = match union {
        false => INPUTS.join(", "),
        true => format!(
            "{}, {COND_PREFIX}<i>, {}",
            INPUTS.iter().filter(|n| **n != "in.controlnet_cond").copied().collect::<Vec<_>>().join(", "),
            UNION_INPUTS.join(", ")
        ),
    };
    let what = if union { "the Union ControlNet" } else { "the ControlNet" };
    r.only(
        |n| known(n) || outputs.iter().any(|o| o == n),
        &format!("{what} takes {takes}, and gives {DOWN_OUTPUT}0 to {DOWN_OUTPUT}{} and {MID_OUTPUT}", down - 1),
    )?;
    let required: &[&str] = match union {
        false => &["in.sample", "in.timestep", "in.encoder_hidden_states", "in.controlnet_cond"],
        true => &["in.sample", "in.timestep", "in.encoder_hidden_states", "in.control_type", "in.control_type_idx"],
    };
    r.require(required)?;
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
    // A control image: [batch, channels, f * height, f * width] in the file, NHWC in dtype here.
    let image = |name: &str| -> Result<Tensor> {
        let f = cfg.hint_factor();
        let c = r.shape(name)?;
        let want = [Some(batch), Some(cfg.conditioning_channels), height.checked_mul(f), width.checked_mul(f)];
        if c.iter().map(|&d| Some(d)).ne(want) {
            return Err(r.bad(format!(
                "{name} has shape {c:?}; with in.sample {s:?} this ControlNet takes [{batch}, {}, {}, {}]: the \
                 control image at {f}x the latent size",
                cfg.conditioning_channels,
                height.saturating_mul(f),
                width.saturating_mul(f)
            )));
        }
        nchw_to_nhwc(&r.float_as(name, dtype)?)
    };

    let scales = match r.contains("in.conditioning_scale") {
        true => r.float("in.conditioning_scale")?.to_f32_vec()?,
        false => vec![1.0],
    };
    let flag = |name: &str| match r.contains(name) {
        true => scalar(r, name, "true or false (a bool, or 0 or 1)", r.flags(name)?),
        false => Ok(false),
    };
    let guess_mode = flag("in.guess_mode")?;
    let control = match &cfg.union {
        None => Control::Plain {
            controlnet_cond: image("in.controlnet_cond")?,
            scale: ControlScale {
                conditioning_scale: match r.contains("in.conditioning_scale") {
                    true => scalar(r, "in.conditioning_scale", "one number", scales)?,
                    false => 1.0,
                },
                guess_mode,
            },
        },
        Some(u) => {
            if batch != 1 {
                return Err(r.bad(format!(
                    "in.sample has batch {batch}; a Union reference holds one sample (diffusers' token attention \
                     mixes the rows of a batch, celframe computes each row on its own)"
                )));
            }
            let idx = r.integers("in.control_type_idx")?;
            let n = idx.len();
            if r.shape("in.control_type_idx")?.len() != 1 || n == 0 {
                return Err(r.bad("in.control_type_idx must be a list of at least one control type".into()));
            }
            let mut conditions = Vec::with_capacity(n);
            let scale_of = |i: usize| match (scales.as_slice(), r.shape("in.conditioning_scale")) {
                ([one], _) => Ok(*one),
                (many, _) if many.len() == n => Ok(many[i]),
                (_, shape) => Err(r.bad(format!(
                    "in.conditioning_scale has shape {:?}; give one number or one per condition ([{n}])",
                    shape.unwrap_or(&[])
                ))),
            };
            for (i, &k) in idx.iter().enumerate() {
                let t = usize::try_from(k).ok().filter(|&k| k < u.control_types).ok_or_else(|| {
                    r.bad(format!(
                        "in.control_type_idx[{i}] = {k}; this model has control types 0 to {}",
                        u.control_types - 1
                    ))
                })?;
                conditions.push((ControlType(t), image(&format!("{COND_PREFIX}{i}"))?, scale_of(i)?));
            }
            if let Some(extra) = r.names().find(|name| {
                name.strip_prefix(COND_PREFIX).and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i >= n)
            }) {
                return Err(r.bad(format!("{extra}: in.control_type_idx lists {n} conditions (0 to {})", n - 1)));
            }
            // The flags: [N] or [batch, N], each row the multi-hot of the conditions' types.
            let flags = r.float("in.control_type")?.to_f32_vec()?;
            let t = r.shape("in.control_type")?;
            let want: Vec<f32> =
                (0..u.control_types).map(|k| if idx.contains(&(k as i64)) { 1.0 } else { 0.0 }).collect();
            if !(t == [u.control_types] || t == [batch, u.control_types]) {
                return Err(r.bad(format!(
                    "in.control_type has shape {t:?}; this model takes [{batch}, {}] (or [{}])",
                    u.control_types, u.control_types
                )));
            }
            if flags.chunks(u.control_types).any(|row| row != want) {
                return Err(Error::Unsupported(format!(
                    "{}: in.control_type {flags:?} is not the flags of in.control_type_idx {idx:?} ({want:?}); \
                     celframe derives the flags from the conditions, as diffusers' pipelines do",
                    r.path().display()
                )));
            }
            Control::Union { conditions, options: UnionOptions { guess_mode, from_multi: flag("in.from_multi")? } }
        }
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
        control,
        expected,
    })
}

/// Loads the ControlNet and the reference, runs the forward on `settings.device` in its dtype and
/// compares every residual.
pub fn verify_controlnet(weights_path: &Path, reference: &Path, settings: &Settings) -> Result<Verification> {
    verify_controlnet_with_base(weights_path, None, reference, settings)
}

/// `verify_controlnet` with the base UNet checkpoint a Control-LoRA is built on.
pub fn verify_controlnet_with_base(
    weights_path: &Path,
    base: Option<&Path>,
    reference: &Path,
    settings: &Settings,
) -> Result<Verification> {
    let Settings { device, dtype, tolerance, scratch_gb } = *settings;
    let checkpoint = open_controlnet_with_base(weights_path, base)?;
    let r = read_reference(&Reference::open(reference)?, &checkpoint.config, dtype)?;
    let s = r.inputs.sample.shape();
    let format = match checkpoint.format {
        ControlNetFormat::Diffusers => "diffusers",
        ControlNetFormat::DiffusersSingleFile => "single file, diffusers names",
        ControlNetFormat::Cldm { prefixed: true } => "single file, cldm names under control_model.",
        ControlNetFormat::Cldm { prefixed: false } => "single file, cldm names",
        ControlNetFormat::ControlLora => "Control-LoRA over the base UNet's encoder",
    };
    let format = match base {
        Some(b) if checkpoint.format == ControlNetFormat::ControlLora => format!("{format}: {}", b.display()),
        _ => format.to_string(),
    };
    let images = r.control.images();
    let summary = format!(
        "{} ({format}): {}\n{} on {device:?} in {dtype:?}: batch {}, latent {}x{}, control image {}x{}, {} context \
         tokens, {}",
        weights_path.display(),
        checkpoint.config,
        reference.display(),
        s[0],
        s[1],
        s[2],
        images[0].shape()[1],
        images[0].shape()[2],
        r.inputs.encoder_hidden_states.shape().get(1).unwrap_or(&0),
        r.control.describe()
    );
    let residuals = match device {
        Device::Cpu => forward(&checkpoint, Place::Host(dtype), &Exec::Cpu, &r.inputs.unet_inputs(), &r.control)?,
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

/// Prepares the net (plain or Union) for `place` and runs it on `x` and `control`, whose tensors
/// live where `ex` computes.
fn forward(
    checkpoint: &ControlNetCheckpoint,
    place: Place,
    ex: &Exec,
    x: &UnetInputs,
    control: &Control,
) -> Result<UnetResiduals> {
    match control {
        Control::Plain { controlnet_cond, scale } => {
            ControlNet::new(checkpoint, place)?.forward(ex, x, controlnet_cond, *scale)
        }
        Control::Union { conditions, options } => {
            let net = ControlNetUnion::new(checkpoint, place)?;
            let scales: Vec<[f32; 1]> = conditions.iter().map(|(_, _, s)| [*s]).collect();
            let list: Vec<UnionCondition> = conditions
                .iter()
                .zip(&scales)
                .map(|((control_type, image, _), scale)| UnionCondition { control_type: *control_type, image, scale })
                .collect();
            net.forward(ex, x, &list, *options)
        }
    }
}

fn run_cuda(
    checkpoint: &ControlNetCheckpoint,
    r: &ControlNetReference,
    dtype: DType,
    scratch_gb: Option<f64>,
) -> Result<UnetResiduals> {
    let gpu = Gpu::from_env()?;
    let explicit = scratch_gb.map(|gb| scratch_bytes(&gpu, gb)).transpose()?;
    let images = r.control.images();
    let extra = r.inputs.device_bytes() + images.iter().map(|t| t.size_bytes() + 256).sum::<usize>();
    let (weights_arena, scratch) =
        model_arenas(&checkpoint.weights, dtype, extra, |w| explicit.unwrap_or_else(|| most_of_memory(&gpu, w)))?;
    let place = Place::device(&gpu, &weights_arena, dtype);
    let inputs = r.inputs.upload(&gpu, &weights_arena)?;
    let up = |t: &Tensor| gpu.upload(&weights_arena, t, dtype);
    let control = match &r.control {
        Control::Plain { controlnet_cond, scale } => {
            Control::Plain { controlnet_cond: up(controlnet_cond)?, scale: *scale }
        }
        Control::Union { conditions, options } => Control::Union {
            conditions: conditions.iter().map(|(t, image, s)| Ok((*t, up(image)?, *s))).collect::<Result<_>>()?,
            options: *options,
        },
    };
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let out = forward(checkpoint, place, &ex, &inputs.unet_inputs(), &control)?;
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
