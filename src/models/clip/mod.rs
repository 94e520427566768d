//! The CLIP text encoders SDXL uses, as transformers' CLIPTextModel (CLIP ViT-L/14) and
//! CLIPTextModelWithProjection (OpenCLIP ViT-bigG/14) compute them (`models/clip/modeling_clip.py`):
//! token + learned position embeddings, pre-LayerNorm layers of causal self-attention and an MLP
//! (quick GELU or GELU), a final LayerNorm, pooling at the EOS row, and for bigG a bias-free
//! text_projection. `conditioning` turns prompts into SDXL's UNet inputs.

pub mod checkpoint;
pub mod conditioning;
pub mod config;

pub use checkpoint::{ClipCheckpoint, ClipFormat, Source, TextEncoderKind, open_text_encoder};
pub use config::{Activation, ClipConfig, Pooling};

use super::weights::{ModelWeights, Place, Scope};
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::ops::attention::{FlashAttention, attention};
use crate::ops::elementwise::{gelu, quick_gelu};
use crate::ops::gather::token_embedding;
use crate::ops::linear::{linear, linear_add};
use crate::ops::norm::layer_norm;
use crate::tensor::{HostBytes, Storage, Tensor};

/// What one forward returns (transformers' output fields).
pub struct ClipOutputs {
    /// The requested entries of transformers' `hidden_states` tuple, by index: 0 is the
    /// embeddings, k the output of layer k (before final_layer_norm); [batch, tokens, hidden].
    /// SDXL's context is index `num_hidden_layers - 1` (`hidden_states[-2]`).
    pub hidden_states: Vec<(usize, Tensor)>,
    /// The last layer's output after final_layer_norm: [batch, tokens, hidden].
    pub last_hidden_state: Tensor,
    /// `pooler_output`: last_hidden_state at each sequence's EOS row (`Pooling`): [batch, hidden].
    pub pooler_output: Tensor,
    /// `text_embeds` = text_projection(pooler_output) for a model with a projection: [batch, proj].
    pub text_embeds: Option<Tensor>,
}

pub struct ClipTextModel {
    pub kind: TextEncoderKind,
    pub config: ClipConfig,
    weights: ModelWeights,
}

impl ClipTextModel {
    /// Prepares the checkpoint's weights for `place` (host dtype for the CPU twins, or uploaded);
    /// OpenCLIP's fused q/k/v are split and its text_projection transposed here, once.
    pub fn new(checkpoint: &ClipCheckpoint, place: Place) -> Result<ClipTextModel> {
        let mut named = Vec::with_capacity(checkpoint.names.len());
        for (name, source) in &checkpoint.names {
            let t = match source {
                Source::Key(key) => checkpoint.weights.get(key)?.clone(),
                Source::Rows { key, part, parts } => row_block(checkpoint.weights.get(key)?, *part, *parts)?,
                Source::Transposed(key) => transpose(checkpoint.weights.get(key)?)?,
            };
            named.push((name.clone(), t));
        }
        let weights = ModelWeights::from_tensors(named, place)?;
        Ok(ClipTextModel { kind: checkpoint.kind, config: checkpoint.config.clone(), weights })
    }

    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// The pooled row of each sequence of `ids` ([batch * seq] ids, row-major), transformers' rule.
    pub fn eos_positions(&self, ids: &[u32], seq: usize) -> Vec<usize> {
        ids.chunks(seq.max(1))
            .map(|row| match self.config.pooling {
                // max_by_key keeps the last maximum; scan reversed to keep the first, as argmax does.
                Pooling::ArgmaxId => {
                    row.len() - 1 - row.iter().rev().enumerate().max_by_key(|(_, id)| **id).map_or(0, |(i, _)| i)
                }
                Pooling::FirstId(eos) => row.iter().position(|&id| id == eos).unwrap_or(0),
            })
            .collect()
    }

    /// Runs the encoder on `ids` ([batch * seq] token ids, row-major, seq <= max positions),
    /// keeping the hidden states listed in `keep` (indices into transformers' `hidden_states`:
    /// 0..=num_hidden_layers).
    pub fn forward(&self, ex: &Exec, ids: &[u32], seq: usize, keep: &[usize]) -> Result<ClipOutputs> {
        let c = &self.config;
        if seq == 0 || seq > c.max_position_embeddings {
            return Err(Error::Input(format!(
                "text encoder: sequences of {seq} tokens; this encoder takes 1 to {} tokens per sequence \
                 (max_position_embeddings)",
                c.max_position_embeddings
            )));
        }
        if ids.is_empty() || !ids.len().is_multiple_of(seq) {
            return Err(Error::Input(format!(
                "text encoder: {} ids do not make whole sequences of {seq} tokens (need a positive multiple of {seq})",
                ids.len()
            )));
        }
        if let Some(k) = keep.iter().find(|&&k| k > c.num_hidden_layers) {
            return Err(Error::Input(format!(
                "text encoder: hidden state {k} requested; there are {} (0 = embeddings)",
                c.num_hidden_layers + 1
            )));
        }
        let batch = ids.len() / seq;
        let w = self.weights.root();
        let mut hidden_states = Vec::new();
        // 1. token + position embeddings: [B, T, D]
        let mut x = token_embedding(
            ex,
            ids,
            seq,
            w.get("embeddings.token_embedding.weight")?,
            Some(w.get("embeddings.position_embedding.weight")?),
        )?;
        if keep.contains(&0) {
            hidden_states.push((0, x.clone()));
        }
        // 2. layers: [B, T, D] -> [B, T, D]
        for n in 0..c.num_hidden_layers {
            x = self.layer(ex, &w.at(&format!("encoder.layers.{n}")), &x)?;
            if keep.contains(&(n + 1)) {
                hidden_states.push((n + 1, x.clone()));
            }
        }
        // 3. final_layer_norm: [B, T, D]
        let last_hidden_state = layer_norm(
            ex,
            &x,
            Some(w.get("final_layer_norm.weight")?),
            Some(w.get("final_layer_norm.bias")?),
            c.layer_norm_eps,
        )?;
        // 4. pooled rows (a gather of one row per sequence): [B, D]
        let rows: Vec<u32> =
            self.eos_positions(ids, seq).iter().enumerate().map(|(b, &pos)| (b * seq + pos) as u32).collect();
        let flat = last_hidden_state.reshape(&[batch * seq, c.hidden_size])?;
        let pooler_output = token_embedding(ex, &rows, 1, &flat, None)?.reshape(&[batch, c.hidden_size])?;
        // 5. text_projection (no bias): [B, P]
        let text_embeds = match c.projection_dim {
            Some(_) => Some(linear(ex, &pooler_output, w.get("text_projection.weight")?, None)?),
            None => None,
        };
        Ok(ClipOutputs { hidden_states, last_hidden_state, pooler_output, text_embeds })
    }

    /// CLIPEncoderLayer: x += attn(LN1(x)) with a causal mask; x += fc2(act(fc1(LN2(x)))).
    fn layer(&self, ex: &Exec, w: &Scope, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let ln = |name: &str, x: &Tensor| -> Result<Tensor> {
            layer_norm(
                ex,
                x,
                Some(w.get(&format!("{name}.weight"))?),
                Some(w.get(&format!("{name}.bias"))?),
                c.layer_norm_eps,
            )
        };
        // x · Wᵀ + b, + a residual in the same epilogue where one is given
        let lin_add = |name: &str, x: &Tensor, residual: Option<&Tensor>| -> Result<Tensor> {
            linear_add(ex, x, w.get(&format!("{name}.weight"))?, Some(w.get(&format!("{name}.bias"))?), residual)
        };
        let lin = |name: &str, x: &Tensor| lin_add(name, x, None);
        // 1. causal self-attention: [B, T, D]
        let x = {
            let n = ln("layer_norm1", x)?;
            let (q, k, v) = (lin("self_attn.q_proj", &n)?, lin("self_attn.k_proj", &n)?, lin("self_attn.v_proj", &n)?);
            let cfg = FlashAttention {
                heads: c.num_attention_heads,
                causal: true,
                scale: 1.0 / (c.head_dim() as f32).sqrt(),
            };
            let o = attention(ex, &q, &k, &v, cfg)?;
            lin_add("self_attn.out_proj", &o, Some(x))?
        };
        // 2. MLP: [B, T, D] -> [B, T, M] -> [B, T, D]
        let mut f = lin("mlp.fc1", &ln("layer_norm2", &x)?)?;
        f = match c.hidden_act {
            Activation::QuickGelu => quick_gelu(ex, &f)?,
            Activation::Gelu => gelu(ex, &f)?,
        };
        lin_add("mlp.fc2", &f, Some(&x))
    }
}

/// Block `part` of `parts` equal row blocks of a host tensor (a byte copy, no rounding).
fn row_block(t: &Tensor, part: usize, parts: usize) -> Result<Tensor> {
    let rows = *t.shape().first().unwrap_or(&0);
    if parts == 0 || !rows.is_multiple_of(parts) || part >= parts {
        return Err(Error::Input(format!("cannot split {t:?} into {parts} row blocks")));
    }
    let mut shape = t.shape().to_vec();
    shape[0] = rows / parts;
    let block = t.size_bytes() / parts;
    let bytes = t.host_bytes()?[part * block..(part + 1) * block].to_vec();
    Tensor::from_storage(&shape, t.dtype(), Storage::Host(HostBytes::Owned(bytes.into())))
}

/// The transpose of a host matrix (a byte copy, no rounding).
fn transpose(t: &Tensor) -> Result<Tensor> {
    let &[r, c] = t.shape() else {
        return Err(Error::Input(format!("cannot transpose {t:?}: not a matrix")));
    };
    let (e, src) = (t.dtype().size(), t.host_bytes()?);
    let mut out = vec![0u8; src.len()];
    for i in 0..r {
        for j in 0..c {
            out[(j * r + i) * e..][..e].copy_from_slice(&src[(i * c + j) * e..][..e]);
        }
    }
    Tensor::from_storage(&[c, r], t.dtype(), Storage::Host(HostBytes::Owned(out.into())))
}
