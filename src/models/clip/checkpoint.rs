//! Opening SDXL's text encoders: a transformers folder (`config.json` + `model.safetensors`, one
//! file or shards with an index, or the fp16 variant), a pipeline folder holding `text_encoder/` or
//! `text_encoder_2/`, or an SDXL single-file checkpoint (CLIP-L under
//! `conditioner.embedders.0.transformer.` with transformers names, bigG under
//! `conditioner.embedders.1.model.` with OpenCLIP names; diffusers' single_file_utils.py). The graph reads
//! transformers names without the `text_model.` prefix (`encoder.layers.0.mlp.fc1.weight`);
//! `names` says where each comes from in the file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::config::{Activation, ClipConfig, Pooling};
use crate::error::{Error, Result};
use crate::models::files::{self, Location};
use crate::weights::{self, LoadedWeights, TensorSpec};

/// Which of SDXL's two text encoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// CLIP ViT-L/14 (CLIPTextModel): `text_encoder`.
    ClipL,
    /// OpenCLIP ViT-bigG/14 (CLIPTextModelWithProjection): `text_encoder_2`.
    ClipG,
}

impl TextEncoderKind {
    /// The diffusers pipeline folder (and `celframe verify` component) name.
    pub fn folder(self) -> &'static str {
        match self {
            TextEncoderKind::ClipL => "text_encoder",
            TextEncoderKind::ClipG => "text_encoder_2",
        }
    }

    /// Where an SDXL single file keeps this encoder.
    pub fn single_file_prefix(self) -> &'static str {
        match self {
            TextEncoderKind::ClipL => "conditioner.embedders.0.transformer.",
            TextEncoderKind::ClipG => "conditioner.embedders.1.model.",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipFormat {
    /// transformers names (with or without `text_model.`), architecture from config.json.
    Transformers,
    /// An SDXL single file, architecture from the tensor shapes.
    SingleFile,
}

/// Where a graph tensor comes from in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The file's tensor as it is.
    Key(String),
    /// Rows `[part * n, (part + 1) * n)` of a tensor holding `parts` stacked blocks of n rows
    /// (OpenCLIP's fused q, k, v `in_proj_weight` / `in_proj_bias`).
    Rows { key: String, part: usize, parts: usize },
    /// The transpose of a matrix (OpenCLIP's `text_projection` is applied as x P, a Linear as x Wᵀ).
    Transposed(String),
}

pub struct ClipCheckpoint {
    pub kind: TextEncoderKind,
    pub config: ClipConfig,
    pub weights: LoadedWeights,
    /// (graph name, source in the file) for every tensor the graph reads.
    pub names: Vec<(String, Source)>,
    pub format: ClipFormat,
}

/// Weight files of a transformers model folder, in the order tried.
const TRANSFORMERS_FILES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "model.fp16.safetensors",
    "model.fp16.safetensors.index.json",
];

/// What single files cannot say, at SDXL's values (generative-models' configs/inference/sd_xl_base.yaml): 64-wide heads, LayerNorm eps
/// 1e-5, pooling at the largest id (SGM and OpenCLIP take the argmax; SDXL's configs say the same
/// through the legacy eos_token_id 2).
const HEAD_DIM: usize = 64;
const LAYER_NORM_EPS: f32 = 1e-5;

/// Integer buffers some files carry (transformers' position ids); never weights.
fn is_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids")
}

/// The tensors the graph reads (graph names, PyTorch shapes).
pub fn tensor_specs(c: &ClipConfig) -> Vec<TensorSpec> {
    let (h, m) = (c.hidden_size, c.intermediate_size);
    let mut specs = vec![
        TensorSpec::new("embeddings.token_embedding.weight", &[c.vocab_size, h]),
        TensorSpec::new("embeddings.position_embedding.weight", &[c.max_position_embeddings, h]),
    ];
    for n in 0..c.num_hidden_layers {
        let l = format!("encoder.layers.{n}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            specs.push(TensorSpec::new(format!("{l}.self_attn.{proj}.weight"), &[h, h]));
            specs.push(TensorSpec::new(format!("{l}.self_attn.{proj}.bias"), &[h]));
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            specs.push(TensorSpec::new(format!("{l}.{norm}.weight"), &[h]));
            specs.push(TensorSpec::new(format!("{l}.{norm}.bias"), &[h]));
        }
        specs.push(TensorSpec::new(format!("{l}.mlp.fc1.weight"), &[m, h]));
        specs.push(TensorSpec::new(format!("{l}.mlp.fc1.bias"), &[m]));
        specs.push(TensorSpec::new(format!("{l}.mlp.fc2.weight"), &[h, m]));
        specs.push(TensorSpec::new(format!("{l}.mlp.fc2.bias"), &[h]));
    }
    specs.push(TensorSpec::new("final_layer_norm.weight", &[h]));
    specs.push(TensorSpec::new("final_layer_norm.bias", &[h]));
    if let Some(p) = c.projection_dim {
        specs.push(TensorSpec::new("text_projection.weight", &[p, h]));
    }
    specs
}

/// Opens `path` for the encoder `kind` (folder or file, see the module doc), checks its tensors
/// strictly against the architecture and maps them without a copy.
pub fn open_text_encoder(path: &Path, kind: TextEncoderKind) -> Result<ClipCheckpoint> {
    match files::locate(path, kind.folder(), "a transformers text encoder folder")? {
        Location::Folder(folder) => open_transformers(&folder, kind),
        Location::SingleFile => open_single_file(path, kind),
    }
}

fn open_transformers(folder: &Path, kind: TextEncoderKind) -> Result<ClipCheckpoint> {
    let file = files::weights_file(folder, &TRANSFORMERS_FILES)?;
    let files = [file];
    // 1. the names present: transformers 4 saves (the SDXL repository) prefix `text_model.`,
    //    transformers 5 saves CLIPTextModel without it; a projection makes it WithProjection
    let found = weights::load_filtered(&files, None, &is_buffer)?;
    let prefix = if found.get("text_model.embeddings.token_embedding.weight").is_ok() { "text_model." } else { "" };
    let with_projection = found.get("text_projection.weight").is_ok();
    // 2. the config, checked against those tensors before anything is sized from it
    let config_path = folder.join("config.json");
    let text = crate::io::read_text(&config_path, crate::io::JSON_LIMIT, "text encoder config")?;
    let config_file = config_path.display().to_string();
    let config = ClipConfig::from_transformers_json(&text, &config_file, with_projection)?;
    check_counts(&config, &found, prefix, &config_file, &files[0])?;
    // 3. every tensor, strictly
    let mut names = Vec::new();
    let mut specs = Vec::new();
    for spec in tensor_specs(&config) {
        let key =
            if spec.name == "text_projection.weight" { spec.name.clone() } else { format!("{prefix}{}", spec.name) };
        specs.push(TensorSpec::new(key.clone(), &spec.shape));
        names.push((spec.name, Source::Key(key)));
    }
    let weights = weights::load_filtered(&files, Some(&specs), &is_buffer)?;
    Ok(ClipCheckpoint { kind, config, weights, names, format: ClipFormat::Transformers })
}

/// Compares each count of a folder's `config` with the tensor that shows it in `found` (its
/// tensors, names under `prefix`), so a config that disagrees with its weights is refused by field
/// (a layer count in the billions would otherwise size a list of billions of tensor names). A
/// tensor missing here is left to strict loading, which lists it; `num_attention_heads` shows in
/// no shape and is bounded by dividing `hidden_size`.
fn check_counts(
    config: &ClipConfig,
    found: &LoadedWeights,
    prefix: &str,
    config_file: &str,
    weights: &Path,
) -> Result<()> {
    let token = format!("{prefix}embeddings.token_embedding.weight");
    let mut counts = vec![
        ("vocab_size", config.vocab_size, token.clone(), 0),
        ("hidden_size", config.hidden_size, token, 1),
        (
            "max_position_embeddings",
            config.max_position_embeddings,
            format!("{prefix}embeddings.position_embedding.weight"),
            0,
        ),
        ("intermediate_size", config.intermediate_size, format!("{prefix}encoder.layers.0.mlp.fc1.weight"), 0),
    ];
    if let Some(p) = config.projection_dim {
        counts.push(("projection_dim", p, "text_projection.weight".to_string(), 0));
    }
    for (field, value, name, dim) in counts {
        if let Ok(t) = found.get(&name)
            && t.shape().get(dim) != Some(&value)
        {
            return Err(Error::Input(format!(
                "{config_file}: {field} is {value}, but {} holds {name} of shape {:?} (dimension {dim} is {field})",
                weights.display(),
                t.shape()
            )));
        }
    }
    let layer_prefix = format!("{prefix}encoder.layers.");
    let layers: HashSet<&str> = found
        .iter()
        .filter_map(|(name, _)| name.strip_prefix(&layer_prefix)?.split_once('.').map(|(n, _)| n))
        .collect();
    if layers.len() != config.num_hidden_layers {
        return Err(Error::Input(format!(
            "{config_file}: num_hidden_layers is {}, but {} holds {} layers ({layer_prefix}<n>.*)",
            config.num_hidden_layers,
            weights.display(),
            layers.len()
        )));
    }
    Ok(())
}

fn open_single_file(path: &Path, kind: TextEncoderKind) -> Result<ClipCheckpoint> {
    let files: [PathBuf; 1] = [path.to_path_buf()];
    let prefix = kind.single_file_prefix();
    // OpenCLIP's logit_scale belongs to the contrastive head, not the text tower.
    let skip = |name: &str| !name.starts_with(prefix) || is_buffer(name) || name.ends_with("logit_scale");
    // 1. the encoder's shapes (only its tensors: the file also holds the UNet, the VAE, the other encoder)
    let found = weights::load_filtered(&files, None, &skip)?;
    if found.is_empty() {
        let all = weights::load_filtered(&files, None, &|n| !n.ends_with("token_embedding.weight")).ok();
        let transformers_named = all.as_ref().is_some_and(|w| {
            w.get("text_model.embeddings.token_embedding.weight").is_ok()
                || w.get("embeddings.token_embedding.weight").is_ok()
        });
        return Err(Error::Input(if transformers_named {
            format!(
                "{}: a text encoder with transformers names needs its config.json: pass the folder holding both",
                path.display()
            )
        } else {
            format!("{}: no {prefix}* tensors: not an SDXL single-file checkpoint", path.display())
        }));
    }
    let shapes: HashMap<String, Vec<usize>> =
        found.iter().map(|(name, t)| (name[prefix.len()..].to_string(), t.shape().to_vec())).collect();
    let file = path.display().to_string();
    // 2. the architecture, then every tensor under its single-file name
    let (config, names) = match kind {
        TextEncoderKind::ClipL => {
            let config = derive_config(&shapes, &file, &CLIP_L_NAMES)?;
            let names =
                tensor_specs(&config).into_iter().map(|s| (s.name.clone(), Source::Key(transformers_name(&s.name))));
            (config, names.collect::<Vec<_>>())
        }
        TextEncoderKind::ClipG => {
            let config = derive_config(&shapes, &file, &OPEN_CLIP_NAMES)?;
            let names = tensor_specs(&config).into_iter().map(|s| Ok((s.name.clone(), open_clip_source(&s.name)?)));
            (config, names.collect::<Result<Vec<_>>>()?)
        }
    };
    // File keys and shapes: a fused in_proj stands for three graph tensors.
    let (h, p) = (config.hidden_size, config.projection_dim.unwrap_or(0));
    let mut specs: Vec<TensorSpec> = Vec::new();
    let mut names_in_file = Vec::with_capacity(names.len());
    for ((name, source), spec) in names.into_iter().zip(tensor_specs(&config)) {
        let (key, shape) = match &source {
            Source::Key(k) => (k.clone(), spec.shape),
            Source::Rows { key, parts, .. } if key.ends_with("weight") => (key.clone(), vec![parts * h, h]),
            Source::Rows { key, parts, .. } => (key.clone(), vec![parts * h]),
            Source::Transposed(k) => (k.clone(), vec![h, p]),
        };
        if !specs.iter().any(|s| s.name == format!("{prefix}{key}")) {
            specs.push(TensorSpec::new(format!("{prefix}{key}"), &shape));
        }
        names_in_file.push((name, prefixed(source, prefix)));
    }
    let weights = weights::load_filtered(&files, Some(&specs), &skip)?;
    Ok(ClipCheckpoint { kind, config, weights, names: names_in_file, format: ClipFormat::SingleFile })
}

/// The transformers name of a graph tensor as transformers 4 saves it (`text_model.` + the graph
/// name, `text_projection.weight` as it is): what SDXL single files hold under CLIP-L's prefix and
/// what LoRA files name (kohya's `lora_te1_text_model_...`, diffusers' `text_encoder.text_model....`).
pub fn transformers_name(graph: &str) -> String {
    if graph.starts_with("text_projection.") { graph.to_string() } else { format!("text_model.{graph}") }
}

fn prefixed(source: Source, prefix: &str) -> Source {
    match source {
        Source::Key(k) => Source::Key(format!("{prefix}{k}")),
        Source::Rows { key, part, parts } => Source::Rows { key: format!("{prefix}{key}"), part, parts },
        Source::Transposed(k) => Source::Transposed(format!("{prefix}{k}")),
    }
}

/// The OpenCLIP (bigG) single-file name of a graph tensor, without the file's prefix: resblocks
/// for layers, ln_1/ln_2, c_fc/c_proj, q/k/v fused in in_proj, the bare positional_embedding and
/// text_projection parameters (diffusers' convert_open_clip_checkpoint, inverted).
pub fn open_clip_source(name: &str) -> Result<Source> {
    let unknown = || Error::Input(format!("no OpenCLIP single-file name for the text encoder tensor '{name}'"));
    let key = |k: &str| Ok(Source::Key(k.to_string()));
    match name {
        "embeddings.token_embedding.weight" => return key("token_embedding.weight"),
        "embeddings.position_embedding.weight" => return key("positional_embedding"),
        "final_layer_norm.weight" => return key("ln_final.weight"),
        "final_layer_norm.bias" => return key("ln_final.bias"),
        "text_projection.weight" => return Ok(Source::Transposed("text_projection".into())),
        _ => {}
    }
    let rest = name.strip_prefix("encoder.layers.").ok_or_else(unknown)?;
    let (n, tail) = rest.split_once('.').ok_or_else(unknown)?;
    let (module, param) = tail.rsplit_once('.').ok_or_else(unknown)?;
    let block = format!("transformer.resblocks.{n}");
    let fused = |part| Ok(Source::Rows { key: format!("{block}.attn.in_proj_{param}"), part, parts: 3 });
    let open_clip = match module {
        "self_attn.q_proj" => return fused(0),
        "self_attn.k_proj" => return fused(1),
        "self_attn.v_proj" => return fused(2),
        "self_attn.out_proj" => "attn.out_proj",
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return Err(unknown()),
    };
    key(&format!("{block}.{open_clip}.{param}"))
}

/// The names `derive_config` reads shapes from, per naming scheme.
struct ShapeNames {
    token_embedding: &'static str,
    position_embedding: &'static str,
    /// Layer n's first MLP weight, with `{n}` for the index.
    fc1: &'static str,
    projection: Option<&'static str>,
    activation: Activation,
}

const CLIP_L_NAMES: ShapeNames = ShapeNames {
    token_embedding: "text_model.embeddings.token_embedding.weight",
    position_embedding: "text_model.embeddings.position_embedding.weight",
    fc1: "text_model.encoder.layers.{n}.mlp.fc1.weight",
    projection: None,
    activation: Activation::QuickGelu,
};

const OPEN_CLIP_NAMES: ShapeNames = ShapeNames {
    token_embedding: "token_embedding.weight",
    position_embedding: "positional_embedding",
    fc1: "transformer.resblocks.{n}.mlp.c_fc.weight",
    projection: Some("text_projection"),
    activation: Activation::Gelu,
};

/// The architecture from a single file's shapes (names without the file's prefix); what shapes
/// cannot tell takes SDXL's values (the constants above).
fn derive_config(shapes: &HashMap<String, Vec<usize>>, file: &str, names: &ShapeNames) -> Result<ClipConfig> {
    let matrix = |name: &str| -> Result<(usize, usize)> {
        match shapes.get(name).map(Vec::as_slice) {
            Some(&[a, b]) => Ok((a, b)),
            Some(s) => Err(Error::Input(format!("{file}: {name} has shape {s:?}, expected a matrix"))),
            None => Err(Error::Input(format!("{file}: no {name} (needed to derive the text encoder's architecture)"))),
        }
    };
    let (vocab_size, hidden_size) = matrix(names.token_embedding)?;
    let (max_position_embeddings, _) = matrix(names.position_embedding)?;
    let fc1 = |n: usize| names.fc1.replace("{n}", &n.to_string());
    let num_hidden_layers = (0..).take_while(|&n| shapes.contains_key(&fc1(n))).count();
    if num_hidden_layers == 0 {
        return Err(Error::Input(format!("{file}: no {} (no transformer layers)", fc1(0))));
    }
    let (intermediate_size, _) = matrix(&fc1(0))?;
    if !hidden_size.is_multiple_of(HEAD_DIM) {
        return Err(Error::Input(format!(
            "{file}: width {hidden_size} is not a multiple of the {HEAD_DIM}-wide heads single files assume"
        )));
    }
    let projection_dim = names.projection.map(|p| matrix(p).map(|(_, out)| out)).transpose()?;
    let config = ClipConfig {
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads: hidden_size / HEAD_DIM,
        max_position_embeddings,
        hidden_act: names.activation,
        layer_norm_eps: LAYER_NORM_EPS,
        projection_dim,
        pooling: Pooling::ArgmaxId,
    };
    config.validate(file)?;
    Ok(config)
}
