//! `celframe verify unet`: diffusers' `UNet2DConditionModel` forward on a reference file's inputs
//! (`in.sample` NCHW, `in.timestep`, `in.encoder_hidden_states`, `in.added_cond_kwargs.*`, and
//! optionally ControlNet residuals), compared with its `out.sample` (NCHW).

use std::path::Path;

use super::arenas::{model_arenas, most_of_memory, scratch_bytes};
use super::{Device, LoraOptions, Reference, Settings, Verification, compare};
use crate::error::{Error, Result};
use crate::gpu::{Arena, Gpu};
use crate::models::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::models::lora::{Component, LoraMerge};
use crate::models::transformer::CrossKv;
use crate::models::with_loras;
use crate::models::{
    ModelWeights, Place, Unet, UnetCheckpoint, UnetConfig, UnetFormat, UnetInputs, UnetResiduals, open_unet,
};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

/// The UNet's reference inputs, NHWC, converted to the compute dtype (timestep and time ids f32),
/// and the expected output (NCHW, as in the file).
struct UnetReference {
    inputs: ForwardInputs,
    expected: Tensor,
}

/// A UNet forward's inputs (NHWC, compute dtype; timestep and time ids f32), on the host or
/// uploaded: what `verify unet` and `verify motion_unet` read from a reference and `bench` draws.
pub struct ForwardInputs {
    pub sample: Tensor,
    pub timestep: Tensor,
    pub encoder_hidden_states: Tensor,
    pub text_embeds: Option<Tensor>,
    pub time_ids: Option<Tensor>,
    pub residuals: Option<UnetResiduals>,
}

impl ForwardInputs {
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [Some(&self.sample), Some(&self.timestep), Some(&self.encoder_hidden_states)]
            .into_iter()
            .chain([self.text_embeds.as_ref(), self.time_ids.as_ref()])
            .flatten()
            .chain(self.residuals.iter().flat_map(|r| r.down.iter().chain([&r.mid])))
    }

    /// Arena bytes the inputs take on the device (256 bytes of alignment each, 1 MiB spare).
    pub(crate) fn device_bytes(&self) -> usize {
        self.tensors().map(|t| t.size_bytes() + 256).sum::<usize>() + (1 << 20)
    }

    /// The same inputs copied into `arena`.
    pub(crate) fn upload(&self, gpu: &Gpu, arena: &Arena) -> Result<ForwardInputs> {
        let up = |t: &Tensor| gpu.upload(arena, t, t.dtype());
        Ok(ForwardInputs {
            sample: up(&self.sample)?,
            timestep: up(&self.timestep)?,
            encoder_hidden_states: up(&self.encoder_hidden_states)?,
            text_embeds: self.text_embeds.as_ref().map(up).transpose()?,
            time_ids: self.time_ids.as_ref().map(up).transpose()?,
            residuals: match &self.residuals {
                Some(r) => {
                    Some(UnetResiduals { down: r.down.iter().map(up).collect::<Result<_>>()?, mid: up(&r.mid)? })
                }
                None => None,
            },
        })
    }

    pub(crate) fn unet_inputs(&self) -> UnetInputs<'_> {
        UnetInputs {
            sample: &self.sample,
            timestep: &self.timestep,
            encoder_hidden_states: &self.encoder_hidden_states,
            cross_kv: None,
            text_embeds: self.text_embeds.as_ref(),
            time_ids: self.time_ids.as_ref(),
        }
    }
}

pub(super) const RESIDUAL_PREFIX: &str = "in.down_block_additional_residuals.";
pub(super) const MID_RESIDUAL: &str = "in.mid_block_additional_residual";
/// The input names a UNet reference may hold besides the numbered down residuals (the motion UNet
/// takes the same).
pub(super) const INPUTS: [&str; 6] = [
    "in.sample",
    "in.timestep",
    "in.encoder_hidden_states",
    "in.added_cond_kwargs.text_embeds",
    "in.added_cond_kwargs.time_ids",
    MID_RESIDUAL,
];

/// Reads and checks the reference against `cfg`; shapes in errors are the file's (NCHW).
fn read_reference(r: &Reference, cfg: &UnetConfig, dtype: DType) -> Result<UnetReference> {
    r.only(
        |n| INPUTS.contains(&n) || n.starts_with(RESIDUAL_PREFIX) || n == "out.sample",
        &format!("the UNet takes {} and {RESIDUAL_PREFIX}<k>, and gives out.sample", INPUTS.join(", ")),
    )?;
    r.require(&["in.sample", "in.timestep", "in.encoder_hidden_states", "out.sample"])?;
    let nhwc = |name: &str| -> Result<Tensor> { nchw_to_nhwc(&r.float_as(name, dtype)?) };

    let s = r.shape("in.sample")?;
    let &[batch, channels, height, width] = s else {
        return Err(r.bad(format!("in.sample has shape {s:?}; the UNet takes NCHW [batch, channels, height, width]")));
    };
    if channels != cfg.in_channels || s.contains(&0) {
        return Err(r.bad(format!(
            "in.sample has shape {s:?}; this UNet takes NCHW [batch, {}, height, width], every size positive",
            cfg.in_channels
        )));
    }
    let timestep = read_timestep(r, batch, "")?;
    let residuals = read_residuals(r, cfg, [batch, height, width], dtype, "")?;
    let optional = |name: &str, dtype: DType| r.contains(name).then(|| r.float_as(name, dtype)).transpose();
    Ok(UnetReference {
        inputs: ForwardInputs {
            sample: nhwc("in.sample")?,
            timestep,
            encoder_hidden_states: r.float_as("in.encoder_hidden_states", dtype)?,
            text_embeds: optional("in.added_cond_kwargs.text_embeds", dtype)?,
            time_ids: optional("in.added_cond_kwargs.time_ids", DType::F32)?,
            residuals,
        },
        expected: r.float("out.sample")?,
    })
}

/// `in.timestep` as f32 [n]: a scalar or one-element timestep is broadcast over the n images (or
/// videos), as diffusers does; `per` names the unit in errors.
pub(super) fn read_timestep(r: &Reference, n: usize, per: &str) -> Result<Tensor> {
    let t = r.float("in.timestep")?;
    let values = t.to_f32_vec()?;
    match (t.shape(), values.as_slice()) {
        ([], [v]) | ([1], [v]) => Tensor::from_f32(&[n], DType::F32, &vec![*v; n]),
        ([m], _) if *m == n => Tensor::from_f32(&[n], DType::F32, &values),
        (shape, _) => Err(r.bad(format!("in.timestep has shape {shape:?}; give a scalar, [1] or [{n}]{per}"))),
    }
}

/// The optional ControlNet residuals (`in.down_block_additional_residuals.<k>` for every skip
/// connection and `in.mid_block_additional_residual`), NCHW [rows, C, h, w] in the file for `rows`
/// images of `height` x `width` latents, NHWC in `dtype` here; `per` adds to shape errors.
pub(super) fn read_residuals(
    r: &Reference,
    cfg: &UnetConfig,
    [rows, height, width]: [usize; 3],
    dtype: DType,
    per: &str,
) -> Result<Option<UnetResiduals>> {
    let down = r.names().filter(|n| n.starts_with(RESIDUAL_PREFIX)).count();
    match (down, r.contains(MID_RESIDUAL)) {
        (0, false) => return Ok(None),
        (0, true) | (_, false) => {
            return Err(r.bad(format!("ControlNet residuals need both {RESIDUAL_PREFIX}<k> and {MID_RESIDUAL}")));
        }
        _ => {}
    }
    let skips = cfg.skips();
    let numbered = format!("{RESIDUAL_PREFIX}0 to {RESIDUAL_PREFIX}{}", skips.len() - 1);
    if down != skips.len() {
        return Err(r.bad(format!("{down} down-block residuals; this UNet takes {}: {numbered}", skips.len())));
    }
    let levels =
        skips.iter().copied().chain([(cfg.block_out_channels.last().copied().unwrap_or(0), cfg.downsamplers())]);
    let names = (0..skips.len()).map(|k| format!("{RESIDUAL_PREFIX}{k}")).chain([MID_RESIDUAL.to_string()]);
    let mut tensors = Vec::with_capacity(skips.len() + 1);
    for (name, (c, level)) in names.zip(levels) {
        let want = [rows, c, height >> level, width >> level];
        let found =
            r.shape(&name).map_err(|_| r.bad(format!("no {name}: residuals are {numbered} and {MID_RESIDUAL}")))?;
        if found != want {
            return Err(r.bad(format!("{name} has shape {found:?}; this UNet and in.sample need {want:?}{per}")));
        }
        tensors.push(nchw_to_nhwc(&r.float_as(&name, dtype)?)?);
    }
    let mid = tensors.pop().ok_or_else(|| Error::Internal("no mid-block residual read".into()))?;
    Ok(Some(UnetResiduals { down: tensors, mid }))
}

/// Loads the UNet and the reference, runs the forward on `device` in `dtype` and compares.
pub fn verify_unet(weights_path: &Path, reference: &Path, settings: &Settings) -> Result<Verification> {
    verify_unet_with_loras(weights_path, reference, settings, &LoraOptions::default())
}

/// `verify_unet` with `loras` merged into the UNet's weights first.
pub fn verify_unet_with_loras(
    weights_path: &Path,
    reference: &Path,
    settings: &Settings,
    loras: &LoraOptions,
) -> Result<Verification> {
    let Settings { device, dtype, tolerance, scratch_gb } = *settings;
    let checkpoint = open_unet(weights_path)?;
    let loras = loras.resolve(|t| t.add_unet(&checkpoint))?;
    let merge = loras.as_ref().and_then(|l| l.merge(Component::Unet));
    let r = read_reference(&Reference::open(reference)?, &checkpoint.config, dtype)?;
    let s = r.inputs.sample.shape();
    let format = match checkpoint.format {
        UnetFormat::Diffusers => "diffusers",
        UnetFormat::SingleFile => "single file",
    };
    let mut summary = format!(
        "{} ({format}): {}\n{} on {device:?} in {dtype:?}: batch {}, latent {}x{}, {} context tokens{}",
        weights_path.display(),
        checkpoint.config,
        reference.display(),
        s[0],
        s[1],
        s[2],
        r.inputs.encoder_hidden_states.shape().get(1).unwrap_or(&0),
        if r.inputs.residuals.is_some() { ", with ControlNet residuals" } else { "" }
    );
    for line in loras.iter().flat_map(|l| &l.summary) {
        summary.push_str(&format!("\n{line}"));
    }
    let (sample, cached) = match device {
        Device::Cpu => {
            let unet = Unet::new(&checkpoint, with_loras(&Place::Host(dtype), merge))?;
            let residuals = r.inputs.residuals.as_ref();
            twice(&Exec::Cpu, unet.weights(), &r.inputs.unet_inputs(), |x| unet.forward(&Exec::Cpu, x, residuals))?
        }
        Device::Cuda => run_cuda(&checkpoint, merge, &r.inputs, dtype, scratch_gb)?,
    };
    let sample = nhwc_to_nchw(&sample)?;
    let mut comparisons = vec![compare("out.sample", &sample, &r.expected, tolerance)?];
    if let Some(cached) = cached {
        comparisons.push(compare(CACHED_KV_OUTPUT, &nhwc_to_nchw(&cached)?, &r.expected, tolerance)?);
    }
    Ok(Verification { comparisons, outputs: vec![("out.sample".to_string(), sample)], summary })
}

/// The name the second forward's comparison goes by (`twice`).
pub(super) const CACHED_KV_OUTPUT: &str = "out.sample, text k/v computed beforehand";

/// `forward` on `x` as one call computes it, then again with every cross-attention's k and v of
/// the context computed beforehand by `weights` (as a render's steps read them): both outputs
/// on the host, the second None for a model without cross-attention.
pub(super) fn twice(
    ex: &Exec,
    weights: &ModelWeights,
    x: &UnetInputs,
    forward: impl Fn(&UnetInputs) -> Result<Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let host = |t: Tensor| match ex {
        Exec::Cpu => Ok(t),
        Exec::Cuda { gpu, .. } => gpu.download(&t),
    };
    let out = host(forward(x)?)?;
    let cached = match CrossKv::compute(ex, weights, x.encoder_hidden_states)? {
        Some(kv) => Some(host(forward(&UnetInputs { cross_kv: Some(&kv), ..*x })?)?),
        None => None,
    };
    Ok((out, cached))
}

fn run_cuda(
    checkpoint: &UnetCheckpoint,
    loras: Option<&LoraMerge>,
    r: &ForwardInputs,
    dtype: DType,
    scratch_gb: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    let gpu = Gpu::from_env()?;
    let explicit = scratch_gb.map(|gb| scratch_bytes(&gpu, gb)).transpose()?;
    let (weights_arena, scratch) = model_arenas(&checkpoint.weights, dtype, r.device_bytes(), |w| {
        explicit.unwrap_or_else(|| most_of_memory(&gpu, w))
    })?;
    let device = Place::device(&gpu, &weights_arena, dtype);
    let unet = Unet::new(checkpoint, with_loras(&device, loras))?;
    let inputs = r.upload(&gpu, &weights_arena)?;
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let residuals = inputs.residuals.as_ref();
    let outs = twice(&ex, unet.weights(), &inputs.unet_inputs(), |x| unet.forward(&ex, x, residuals))?;
    eprintln!(
        "CUDA scratch arena: peak {:.2} GiB of {:.2} GiB",
        scratch.peak() as f64 / (1u64 << 30) as f64,
        scratch.capacity() as f64 / (1u64 << 30) as f64
    );
    Ok(outs)
}
