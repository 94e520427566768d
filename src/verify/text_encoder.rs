//! `celframe verify text_encoder | text_encoder_2`: transformers' CLIPTextModel /
//! CLIPTextModelWithProjection forward on a reference file's `in.input_ids` ([batch, tokens], any
//! integer or float dtype holding whole ids), compared with whichever of its outputs the file
//! holds, named after transformers' output fields:
//!
//! - `out.hidden_states.<k>`: entry k of `hidden_states` (`output_hidden_states=True`): 0 the
//!   embeddings, k the output of layer k before final_layer_norm; SDXL's context is
//!   k = num_hidden_layers - 1 (`hidden_states[-2]`). [batch, tokens, hidden].
//! - `out.last_hidden_state`: after final_layer_norm. [batch, tokens, hidden].
//! - `out.pooler_output`: CLIPTextModel's pooled EOS row. [batch, hidden].
//! - `out.text_embeds`: CLIPTextModelWithProjection's projected pooled row. [batch, projection].

use std::path::Path;

use super::arenas::{model_arenas, scratch_bytes};
use super::{Device, LoraOptions, Reference, Settings, Verification, compare};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::Place;
use crate::models::clip::{
    ClipCheckpoint, ClipConfig, ClipFormat, ClipOutputs, ClipTextModel, TextEncoderKind, open_text_encoder,
};
use crate::models::lora::{Component, LoraMerge};
use crate::models::with_loras;
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

/// The reference: ids, their shape, the hidden states asked for, and the expected outputs by name.
struct TextReference {
    ids: Vec<u32>,
    batch: usize,
    tokens: usize,
    keep: Vec<usize>,
    expected: Vec<(String, Tensor)>,
}

/// Loads the encoder and the reference, runs the forward on `device` in `dtype` and compares.
pub fn verify_text_encoder(
    kind: TextEncoderKind,
    weights_path: &Path,
    reference: &Path,
    settings: &Settings,
) -> Result<Verification> {
    verify_text_encoder_with_loras(kind, weights_path, reference, settings, &LoraOptions::default())
}

/// `verify_text_encoder` with `loras` merged into the encoder's weights first.
pub fn verify_text_encoder_with_loras(
    kind: TextEncoderKind,
    weights_path: &Path,
    reference: &Path,
    settings: &Settings,
    loras: &LoraOptions,
) -> Result<Verification> {
    let Settings { device, dtype, tolerance, scratch_gb } = *settings;
    let checkpoint = open_text_encoder(weights_path, kind)?;
    let loras = loras.resolve(|t| t.add_text_encoder(&checkpoint))?;
    let component = if kind == TextEncoderKind::ClipL { Component::TextEncoder } else { Component::TextEncoder2 };
    let merge = loras.as_ref().and_then(|l| l.merge(component));
    let r = read_reference(&Reference::open(reference)?, &checkpoint.config, weights_path)?;
    let outputs = match device {
        Device::Cpu => {
            let model = ClipTextModel::new(&checkpoint, with_loras(&Place::Host(dtype), merge))?;
            let out = model.forward(&Exec::Cpu, &r.ids, r.tokens, &r.keep)?;
            named_outputs(out, |t| Ok(t.clone()))?
        }
        Device::Cuda => run_cuda(&checkpoint, merge, &r, dtype, scratch_gb)?,
    };
    let format = match checkpoint.format {
        ClipFormat::Transformers => "transformers",
        ClipFormat::SingleFile => "single file",
    };
    let mut summary = format!(
        "{} ({format}, {}): {}\n{} on {device:?} in {dtype:?}: {} sequences of {} tokens",
        weights_path.display(),
        kind.folder(),
        checkpoint.config,
        reference.display(),
        r.batch,
        r.tokens
    );
    for line in loras.iter().flat_map(|l| &l.summary) {
        summary.push_str(&format!("\n{line}"));
    }
    let mut comparisons = Vec::new();
    let mut computed = Vec::new();
    for (name, actual) in outputs {
        // Every expected name was checked against the model's outputs by read_reference.
        if let Some((_, expected)) = r.expected.iter().find(|(n, _)| *n == name) {
            let actual = Tensor::from_f32(actual.shape(), dtype, &actual.to_f32_vec()?)?;
            comparisons.push(compare(&name, &actual, expected, tolerance)?);
            computed.push((name, actual));
        }
    }
    Ok(Verification { comparisons, outputs: computed, summary })
}

/// The forward's outputs under their reference names, each passed through `host` (a download).
fn named_outputs(out: ClipOutputs, host: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Vec<(String, Tensor)>> {
    let mut named: Vec<(String, Tensor)> = out
        .hidden_states
        .iter()
        .map(|(k, t)| Ok((format!("out.hidden_states.{k}"), host(t)?)))
        .collect::<Result<_>>()?;
    named.push(("out.last_hidden_state".into(), host(&out.last_hidden_state)?));
    named.push(("out.pooler_output".into(), host(&out.pooler_output)?));
    if let Some(t) = &out.text_embeds {
        named.push(("out.text_embeds".into(), host(t)?));
    }
    Ok(named)
}

/// in.input_ids (any integer dtype, or a float one holding whole ids) and the out.* tensors, each
/// checked against `cfg`; nothing else may be in the file.
fn read_reference(r: &Reference, cfg: &ClipConfig, weights_path: &Path) -> Result<TextReference> {
    let layers = cfg.num_hidden_layers;
    r.only(
        |n| n == "in.input_ids" || n.starts_with("out."),
        "a text encoder takes in.input_ids and gives out.hidden_states.<k>, out.last_hidden_state, \
         out.pooler_output, out.text_embeds",
    )?;
    r.require(&["in.input_ids"])?;
    let shape = r.shape("in.input_ids")?;
    let &[batch, tokens] = shape else {
        return Err(r.bad(format!("in.input_ids has shape {shape:?}; give [batch, tokens]")));
    };
    if batch == 0 || tokens == 0 || tokens > cfg.max_position_embeddings {
        return Err(r.bad(format!(
            "in.input_ids has shape {shape:?}; this encoder takes [batch, tokens] with batch at least 1 and 1 to \
             {} tokens (max_position_embeddings)",
            cfg.max_position_embeddings
        )));
    }
    let ids = r
        .integers("in.input_ids")?
        .into_iter()
        .enumerate()
        .map(|(i, id)| match u32::try_from(id) {
            Ok(id) if (id as usize) < cfg.vocab_size => Ok(id),
            _ => Err(r.bad(format!(
                "in.input_ids holds {id} at index {i}; this encoder's ids are 0 to {} (vocab_size {})",
                cfg.vocab_size - 1,
                cfg.vocab_size
            ))),
        })
        .collect::<Result<Vec<u32>>>()?;

    let mut keep = Vec::new();
    let mut expected = Vec::new();
    for name in r.names().filter(|n| n.starts_with("out.")) {
        match name.strip_prefix("out.hidden_states.") {
            // Written as the forward names it ("5", not "05"), or it would never be compared.
            Some(k) => match k.parse::<usize>() {
                Ok(n) if n <= layers && n.to_string() == k => keep.push(n),
                _ => return Err(r.bad(format!("'{name}': k must be 0 to {layers} (0 = embeddings)"))),
            },
            None if name == "out.text_embeds" && cfg.projection_dim.is_none() => {
                return Err(r.bad(format!(
                    "out.text_embeds, but {} has no text_projection (a CLIPTextModel)",
                    weights_path.display()
                )));
            }
            None if ["out.last_hidden_state", "out.pooler_output", "out.text_embeds"].contains(&name) => {}
            None => {
                return Err(r.bad(format!(
                    "'{name}' is not an output of a text encoder (out.hidden_states.<k>, out.last_hidden_state, \
                     out.pooler_output, out.text_embeds)"
                )));
            }
        }
        expected.push((name.to_string(), r.float(name)?));
    }
    Ok(TextReference { ids, batch, tokens, keep, expected })
}

fn run_cuda(
    checkpoint: &ClipCheckpoint,
    loras: Option<&LoraMerge>,
    r: &TextReference,
    dtype: DType,
    scratch_gb: Option<f64>,
) -> Result<Vec<(String, Tensor)>> {
    let gpu = Gpu::from_env()?;
    // Default scratch: a quarter of the weights, at least 1 GiB.
    let explicit = scratch_gb.map(|gb| scratch_bytes(&gpu, gb)).transpose()?;
    let (weights_arena, scratch) =
        model_arenas(&checkpoint.weights, dtype, 1 << 20, |w| explicit.unwrap_or((1 << 30).max(w / 4)))?;
    let device = Place::device(&gpu, &weights_arena, dtype);
    let model = ClipTextModel::new(checkpoint, with_loras(&device, loras))?;
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let out = model.forward(&ex, &r.ids, r.tokens, &r.keep)?;
    let named = named_outputs(out, |t| gpu.download(t))?;
    eprintln!(
        "CUDA scratch arena: peak {:.3} GiB of {:.2} GiB",
        scratch.peak() as f64 / (1u64 << 30) as f64,
        scratch.capacity() as f64 / (1u64 << 30) as f64
    );
    Ok(named)
}
