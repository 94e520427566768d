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

use super::{Device, Verification, compare};
use crate::cli::arenas::{gib, model_arenas};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::Place;
use crate::models::clip::{ClipCheckpoint, ClipFormat, ClipOutputs, ClipTextModel, TextEncoderKind, open_text_encoder};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

/// The reference: ids, their shape, and the expected outputs by name.
struct TextReference {
    ids: Vec<u32>,
    batch: usize,
    tokens: usize,
    expected: Vec<(String, Tensor)>,
}

/// Loads the encoder and the reference, runs the forward on `device` in `dtype` and compares.
pub fn verify_text_encoder(
    kind: TextEncoderKind,
    weights_path: &Path,
    reference: &Path,
    device: Device,
    dtype: DType,
    tolerance: f64,
    scratch_gb: Option<f64>,
) -> Result<Verification> {
    let checkpoint = open_text_encoder(weights_path, kind)?;
    let r = read_reference(reference)?;
    let layers = checkpoint.config.num_hidden_layers;
    // Which hidden states the file asks for, checked before any work.
    let mut keep = Vec::new();
    for (name, _) in &r.expected {
        match name.strip_prefix("out.hidden_states.") {
            Some(k) => match k.parse::<usize>() {
                Ok(k) if k <= layers => keep.push(k),
                _ => {
                    return Err(Error::Input(format!(
                        "reference {}: '{name}': k must be 0..={layers} (0 = embeddings)",
                        reference.display()
                    )));
                }
            },
            None if name == "out.text_embeds" && checkpoint.config.projection_dim.is_none() => {
                return Err(Error::Input(format!(
                    "reference {}: out.text_embeds, but {} has no text_projection (a CLIPTextModel)",
                    reference.display(),
                    weights_path.display()
                )));
            }
            None => {}
        }
    }
    let outputs = match device {
        Device::Cpu => {
            let model = ClipTextModel::new(&checkpoint, Place::Host(dtype))?;
            let out = model.forward(&Exec::Cpu, &r.ids, r.tokens, &keep)?;
            named_outputs(out, |t| Ok(t.clone()))?
        }
        Device::Cuda => run_cuda(&checkpoint, &r, &keep, dtype, scratch_gb)?,
    };
    let format = match checkpoint.format {
        ClipFormat::Transformers => "transformers",
        ClipFormat::SingleFile => "single file",
    };
    let summary = format!(
        "{} ({format}, {}): {}\n{} on {device:?} in {dtype:?}: {} sequences of {} tokens",
        weights_path.display(),
        kind.folder(),
        checkpoint.config,
        reference.display(),
        r.batch,
        r.tokens
    );
    let mut comparisons = Vec::new();
    let mut computed = Vec::new();
    for (name, expected) in &r.expected {
        let Some((_, actual)) = outputs.iter().find(|(n, _)| n == name) else {
            return Err(Error::Input(format!(
                "reference {}: '{name}' is not an output of this model",
                reference.display()
            )));
        };
        let actual = Tensor::from_f32(actual.shape(), dtype, &actual.to_f32_vec()?)?;
        comparisons.push(compare(name, &actual, expected, tolerance)?);
        computed.push((name.clone(), actual));
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

/// in.input_ids (any integer or float dtype; the weights loader takes floats only, so the file is
/// read here) and the out.* tensors; nothing else may be in the file.
fn read_reference(path: &Path) -> Result<TextReference> {
    let bad = |m: String| Error::Input(format!("reference {}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let mut ids = None;
    let mut expected = Vec::new();
    for (name, view) in st.tensors() {
        if name == "in.input_ids" {
            let &[batch, tokens] = view.shape() else {
                return Err(bad(format!("in.input_ids has shape {:?}, expected [batch, tokens]", view.shape())));
            };
            ids = Some((integer_values(&name, view.dtype(), view.data()).map_err(bad)?, batch, tokens));
        } else if name.starts_with("out.") {
            let t = float_tensor(view.shape(), view.dtype(), view.data()).map_err(|m| bad(format!("{name}: {m}")))?;
            expected.push((name, t));
        } else {
            return Err(bad(format!(
                "unknown tensor '{name}' (a text encoder takes in.input_ids and gives out.hidden_states.<k>, \
                 out.last_hidden_state, out.pooler_output, out.text_embeds)"
            )));
        }
    }
    let (ids, batch, tokens) = ids.ok_or_else(|| bad("no in.input_ids".into()))?;
    if expected.is_empty() {
        return Err(bad("no out.* tensors to compare".into()));
    }
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(TextReference { ids, batch, tokens, expected })
}

/// Whole non-negative ids from an integer or float tensor's bytes.
fn integer_values(name: &str, dtype: safetensors::Dtype, data: &[u8]) -> std::result::Result<Vec<u32>, String> {
    use safetensors::Dtype as D;
    let values: Vec<f64> = match dtype {
        D::I64 => data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()) as f64).collect(),
        D::I32 => data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap_or_default()) as f64).collect(),
        D::U32 => data.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as f64).collect(),
        D::F32 | D::F16 | D::BF16 => float_tensor(&[data.len() * 8 / dtype.bitsize()], dtype, data)?
            .to_f32_vec()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(f64::from)
            .collect(),
        other => return Err(format!("{name} is {other:?}; ids must be an integer or float tensor")),
    };
    values
        .into_iter()
        .map(|v| {
            if v >= 0.0 && v.fract() == 0.0 && v <= u32::MAX as f64 {
                Ok(v as u32)
            } else {
                Err(format!("{name} holds {v}, not a token id"))
            }
        })
        .collect()
}

fn float_tensor(shape: &[usize], dtype: safetensors::Dtype, data: &[u8]) -> std::result::Result<Tensor, String> {
    let dtype = match dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => return Err(format!("dtype {other:?}; outputs must be float")),
    };
    let storage = crate::tensor::Storage::Host(crate::tensor::HostBytes::Owned(data.to_vec().into()));
    Tensor::from_storage(shape, dtype, storage).map_err(|e| e.to_string())
}

fn run_cuda(
    checkpoint: &ClipCheckpoint,
    r: &TextReference,
    keep: &[usize],
    dtype: DType,
    scratch_gb: Option<f64>,
) -> Result<Vec<(String, Tensor)>> {
    let gpu = Gpu::from_env()?;
    // Default scratch: a quarter of the weights, at least 1 GiB.
    let (weights_arena, scratch) =
        model_arenas(&checkpoint.weights, dtype, 1 << 20, |w| scratch_gb.map_or((1usize << 30).max(w / 4), gib))?;
    let model = ClipTextModel::new(checkpoint, Place::Device { gpu: &gpu, arena: &weights_arena, dtype })?;
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let out = model.forward(&ex, &r.ids, r.tokens, keep)?;
    let named = named_outputs(out, |t| gpu.download(t))?;
    eprintln!(
        "CUDA scratch arena: peak {:.3} GiB of {:.2} GiB",
        scratch.peak() as f64 / (1u64 << 30) as f64,
        scratch.capacity() as f64 / (1u64 << 30) as f64
    );
    Ok(named)
}
