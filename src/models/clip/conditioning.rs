//! SDXL's text conditioning from prompts (diffusers' pipeline_stable_diffusion_xl.py encode_prompt; A1111's sd_hijack_clip.py for chunks): both encoders run on the same
//! A1111-chunked prompt (77 ids per chunk, the encoder's own padding), each chunk's penultimate
//! hidden states (transformers' `hidden_states[-2]`, no final LayerNorm) get A1111's emphasis per
//! encoder, the two are concatenated on channels (CLIP-L first) and the chunks along tokens:
//! `context` [1, 77 k, 768 + 1280]. The pooled vector is bigG's `text_embeds` of the FIRST chunk,
//! as A1111 and ComfyUI take it, and what diffusers gets since it truncates to one chunk; emphasis
//! does not touch it (neither UI applies it there).
//!
//! Empty negative prompt: like diffusers' SDXL base pipeline (`force_zeros_for_empty_prompt`, on
//! in its config) and A1111, an empty (or whitespace-only) negative prompt gives an all-zero
//! context and an all-zero pooled vector instead of encoding "". A non-empty negative prompt is
//! encoded like any prompt. (diffusers zeroes only when no negative prompt is passed and encodes
//! an explicit "", so "" here matches diffusers called with `negative_prompt=None`.)
//!
//! The encoders run on the `Exec` given (CPU twins or CUDA); emphasis and concatenation run on the
//! host in f32 on the downloaded [77, D] chunks (a few hundred KB per prompt, once per render),
//! and the results are host f32 tensors for the caller to upload.

use super::{ClipTextModel, TextEncoderKind};
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};
use crate::text::{CONTEXT_TOKENS, Chunk, Encoder, LoraRequest, Tokenizer, apply_emphasis, tokenize_prompt};

/// A prompt's conditioning for the UNet (host, f32).
pub struct Conditioning {
    /// `encoder_hidden_states`: [1, 77 * chunks, clip_l width + clip_g width].
    pub context: Tensor,
    /// `added_cond_kwargs.text_embeds`: [1, projection width] (bigG's text_embeds, first chunk).
    pub text_embeds: Tensor,
}

/// The pair of encoders SDXL conditions on.
pub struct SdxlTextEncoders {
    pub clip_l: ClipTextModel,
    pub clip_g: ClipTextModel,
}

impl SdxlTextEncoders {
    /// Checks the roles: `clip_l` is SDXL's text_encoder, `clip_g` text_encoder_2 with a projection.
    pub fn new(clip_l: ClipTextModel, clip_g: ClipTextModel) -> Result<SdxlTextEncoders> {
        if clip_l.kind != TextEncoderKind::ClipL || clip_g.kind != TextEncoderKind::ClipG {
            return Err(Error::Input(format!(
                "SDXL conditioning needs text_encoder then text_encoder_2 (got {} and {})",
                clip_l.kind.folder(),
                clip_g.kind.folder()
            )));
        }
        if clip_g.config.projection_dim.is_none() {
            return Err(Error::Input(
                "text_encoder_2 has no text_projection: SDXL's pooled text_embeds need CLIPTextModelWithProjection"
                    .into(),
            ));
        }
        Ok(SdxlTextEncoders { clip_l, clip_g })
    }

    /// Channels of the context: CLIP-L's width + bigG's (2048 for SDXL).
    pub fn context_width(&self) -> usize {
        self.clip_l.config.hidden_size + self.clip_g.config.hidden_size
    }

    /// Width of the pooled vector (1280 for SDXL).
    pub fn pooled_width(&self) -> usize {
        self.clip_g.config.projection_dim.unwrap_or(0)
    }

    /// A prompt in A1111 syntax -> its conditioning and the LoRAs its `<lora:...>` tags ask for.
    /// `renormalize` is A1111's "Original" emphasis (rescale each chunk to its old mean); false is
    /// its "No norm".
    pub fn encode_prompt(
        &self,
        ex: &Exec,
        tokenizer: &Tokenizer,
        prompt: &str,
        renormalize: bool,
    ) -> Result<(Conditioning, Vec<LoraRequest>)> {
        let l = tokenize_prompt(prompt, tokenizer, Encoder::ClipL)?;
        let g = tokenize_prompt(prompt, tokenizer, Encoder::ClipG)?;
        Ok((self.encode_chunks(ex, &l.chunks, &g.chunks, renormalize)?, l.loras))
    }

    /// The negative prompt's conditioning: zeros when it is empty (module doc), else encoded.
    pub fn encode_negative(
        &self,
        ex: &Exec,
        tokenizer: &Tokenizer,
        prompt: &str,
        renormalize: bool,
    ) -> Result<Conditioning> {
        if prompt.trim().is_empty() {
            return self.zeros();
        }
        Ok(self.encode_prompt(ex, tokenizer, prompt, renormalize)?.0)
    }

    /// All-zero conditioning of one chunk (diffusers' `force_zeros_for_empty_prompt`). Zero keys
    /// and values attend the same whatever their count, so it pairs with prompts of any length.
    pub fn zeros(&self) -> Result<Conditioning> {
        let width = self.context_width();
        Ok(Conditioning {
            context: Tensor::from_f32(&[1, CONTEXT_TOKENS, width], DType::F32, &vec![0.0; CONTEXT_TOKENS * width])?,
            text_embeds: Tensor::from_f32(&[1, self.pooled_width()], DType::F32, &vec![0.0; self.pooled_width()])?,
        })
    }

    /// Encodes chunks already tokenized for each encoder (same count: the same prompt chunks the
    /// same way for both, only the padding differs).
    pub fn encode_chunks(&self, ex: &Exec, l: &[Chunk], g: &[Chunk], renormalize: bool) -> Result<Conditioning> {
        if l.is_empty() || l.len() != g.len() {
            return Err(Error::Input(format!(
                "SDXL conditioning: {} CLIP-L chunks and {} bigG chunks (need the same number, at least one)",
                l.len(),
                g.len()
            )));
        }
        let chunks = l.len();
        // 1. each encoder on all chunks at once: penultimate hidden states [chunks, 77, D]
        let hidden_l = penultimate(ex, &self.clip_l, l)?;
        let (hidden_g, pooled) = {
            let c = &self.clip_g;
            let ids: Vec<u32> = g.iter().flat_map(|c| c.ids).collect();
            let out = c.forward(ex, &ids, CONTEXT_TOKENS, &[c.config.num_hidden_layers - 1])?;
            let hidden = host_values(ex, &out.hidden_states[0].1)?;
            let embeds =
                out.text_embeds.as_ref().ok_or_else(|| Error::Input("text_encoder_2: no text_embeds".into()))?;
            (hidden, host_values(ex, embeds)?)
        };
        // 2. emphasis per chunk and encoder, then [L | G] per token, chunks along tokens
        let (dl, dg) = (self.clip_l.config.hidden_size, self.clip_g.config.hidden_size);
        let mut context = Vec::with_capacity(chunks * CONTEXT_TOKENS * (dl + dg));
        for i in 0..chunks {
            let mut hl = hidden_l[i * CONTEXT_TOKENS * dl..][..CONTEXT_TOKENS * dl].to_vec();
            let mut hg = hidden_g[i * CONTEXT_TOKENS * dg..][..CONTEXT_TOKENS * dg].to_vec();
            apply_emphasis(&mut hl, &l[i].weights, renormalize)?;
            apply_emphasis(&mut hg, &g[i].weights, renormalize)?;
            for t in 0..CONTEXT_TOKENS {
                context.extend_from_slice(&hl[t * dl..][..dl]);
                context.extend_from_slice(&hg[t * dg..][..dg]);
            }
        }
        // 3. pooled: the first chunk's text_embeds
        let p = self.pooled_width();
        Ok(Conditioning {
            context: Tensor::from_f32(&[1, chunks * CONTEXT_TOKENS, dl + dg], DType::F32, &context)?,
            text_embeds: Tensor::from_f32(&[1, p], DType::F32, &pooled[..p])?,
        })
    }
}

/// The encoder's `hidden_states[-2]` for the chunks, as host f32 [chunks * 77 * D].
fn penultimate(ex: &Exec, model: &ClipTextModel, chunks: &[Chunk]) -> Result<Vec<f32>> {
    let ids: Vec<u32> = chunks.iter().flat_map(|c| c.ids).collect();
    let out = model.forward(ex, &ids, CONTEXT_TOKENS, &[model.config.num_hidden_layers - 1])?;
    host_values(ex, &out.hidden_states[0].1)
}

/// A tensor's values on the host in f32 (downloaded first when the Exec is CUDA).
fn host_values(ex: &Exec, t: &Tensor) -> Result<Vec<f32>> {
    match ex {
        Exec::Cuda { gpu, .. } if t.is_device() => gpu.download(t)?.to_f32_vec(),
        _ => t.to_f32_vec(),
    }
}

/// SDXL's six micro-conditioning scalars in the UNet's order: original size (height, width), crop
/// top-left (top, left), target size (height, width), in pixels. diffusers' defaults are
/// original = target = the requested image size and crop (0, 0); the negative branch uses the same.
pub fn time_ids(original: (usize, usize), crop_top_left: (usize, usize), target: (usize, usize)) -> [f32; 6] {
    [original.0, original.1, crop_top_left.0, crop_top_left.1, target.0, target.1].map(|v| v as f32)
}

/// `added_cond_kwargs.time_ids` for a batch: one row per image, f32 [rows, 6] (host).
pub fn time_ids_tensor(rows: &[[f32; 6]]) -> Result<Tensor> {
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_f32(&[rows.len(), 6], DType::F32, &values)
}
