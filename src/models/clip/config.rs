//! A CLIP text encoder's architecture: from a transformers `config.json` (CLIPTextConfig; absent
//! fields take transformers' defaults) or, for single files, from the tensor shapes with SDXL's
//! fixed values (`checkpoint`).

use std::fmt;

use crate::error::{Error, Result};
use crate::models::fields::Fields;

/// The MLP's activation (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x * sigmoid(1.702 x): CLIP ViT-L (SDXL's text_encoder).
    QuickGelu,
    /// Exact erf GELU: OpenCLIP ViT-bigG (SDXL's text_encoder_2).
    Gelu,
}

/// Which row of the last hidden state is the pooled output (transformers' CLIPTextModel rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// `eos_token_id` 2, the value configs written before transformers PR #24773 carry (SDXL's
    /// do): the row of the largest id, first one on ties (the EOS is the largest CLIP id).
    ArgmaxId,
    /// Any other `eos_token_id`: the first row holding that id (row 0 when there is none, as
    /// transformers' argmax of an all-false mask gives).
    FirstId(u32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f32,
    /// Width of `text_projection` (CLIPTextModelWithProjection); None for CLIPTextModel.
    pub projection_dim: Option<usize>,
    pub pooling: Pooling,
}

impl ClipConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Parses a transformers CLIPTextConfig `config.json` (its text; `file` names it in errors).
    /// `with_projection` says whether the weights hold a `text_projection` (the model class);
    /// `projection_dim` is read only then. Malformed or inconsistent configs are `Error::Input`
    /// naming the field; a valid one the engine lacks is `Error::Unsupported`.
    pub fn from_transformers_json(text: &str, file: &str, with_projection: bool) -> Result<ClipConfig> {
        let f = Fields::parse(text, file)?;
        if let Some(t) = f.get("model_type").filter(|t| t.as_str() != Some("clip_text_model")) {
            return Err(Error::Input(format!("{file}: model_type {t} is not a CLIP text model (clip_text_model)")));
        }
        let hidden_act = match f.get("hidden_act").map(|v| v.as_str()) {
            None | Some(Some("quick_gelu")) => Activation::QuickGelu,
            Some(Some("gelu")) => Activation::Gelu,
            Some(Some(other)) => {
                return Err(Error::Unsupported(format!(
                    "{file}: hidden_act '{other}'; this engine implements quick_gelu and gelu"
                )));
            }
            Some(None) => return Err(f.bad("hidden_act", "an activation name")),
        };
        let pooling = match f.get("eos_token_id") {
            None => Pooling::FirstId(49407),
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(2) => Pooling::ArgmaxId,
                Some(id) => Pooling::FirstId(id),
                None => return Err(f.bad("eos_token_id", "one token id")),
            },
        };
        let hidden_size = f.usize("hidden_size", 512)?;
        let config = ClipConfig {
            vocab_size: f.usize("vocab_size", 49408)?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size", 2048)?,
            num_hidden_layers: f.usize("num_hidden_layers", 12)?,
            num_attention_heads: f.usize("num_attention_heads", 8)?,
            max_position_embeddings: f.usize("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps: f.f32("layer_norm_eps", 1e-5)?,
            projection_dim: if with_projection { Some(f.usize("projection_dim", 512)?) } else { None },
            pooling,
        };
        config.validate(file)?;
        Ok(config)
    }

    /// Checks what the graph relies on; `what` names the source in errors. Each count has a cap
    /// far above CLIP's own (OpenCLIP bigG: 49408 tokens, width 1280, MLP 5120, 32 layers, 20
    /// heads, 77 positions, projection 1280): a config beyond it is a typo or a damaged file, and
    /// refusing it by name keeps what is sized from the config small even before the weights are
    /// compared with it (`checkpoint`).
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |m: String| Err(Error::Input(format!("{what}: {m}")));
        let sizes = [
            ("vocab_size", Some(self.vocab_size), 1 << 20),
            ("hidden_size", Some(self.hidden_size), 16384),
            ("intermediate_size", Some(self.intermediate_size), 65536),
            ("num_hidden_layers", Some(self.num_hidden_layers), 256),
            ("num_attention_heads", Some(self.num_attention_heads), 256),
            ("max_position_embeddings", Some(self.max_position_embeddings), 16384),
            ("projection_dim", self.projection_dim, 16384),
        ];
        for (name, value, limit) in sizes {
            match value {
                Some(0) => return bad(format!("{name} must be positive")),
                Some(v) if v > limit => {
                    return bad(format!("{name} {v} is more than {limit}, the largest this engine accepts"));
                }
                _ => {}
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "num_attention_heads {} does not divide hidden_size {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return bad(format!(
                "layer_norm_eps {} (as float32) must be a positive finite number",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

impl fmt::Display for ClipConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CLIP text encoder: {} layers, width {}, {} heads of {}, MLP {} ({}), vocabulary {}, {} positions, pooling {}",
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.head_dim(),
            self.intermediate_size,
            match self.hidden_act {
                Activation::QuickGelu => "quick_gelu",
                Activation::Gelu => "gelu",
            },
            self.vocab_size,
            self.max_position_embeddings,
            match self.pooling {
                Pooling::ArgmaxId => "at the largest id".to_string(),
                Pooling::FirstId(id) => format!("at the first id {id}"),
            }
        )?;
        match self.projection_dim {
            Some(p) => write!(f, ", text_projection to {p}"),
            None => Ok(()),
        }
    }
}
