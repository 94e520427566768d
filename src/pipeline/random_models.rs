//! SDXL-family pipelines with seeded random weights, for `celframe demo`: no weights can ship
//! with celframe, so the demo runs the real graph (both text encoders, the UNet with AnimateDiff
//! motion modules, a ControlNet, the VAE decoder) on values drawn here.
//!
//! The folders are what the loaders read from real downloads: diffusers `config.json` +
//! `diffusion_pytorch_model.safetensors` (transformers' `model.safetensors` for the text
//! encoders), every tensor named and shaped by the models' own `tensor_specs`, stored in f16.
//!
//! Values follow PyTorch's default `nn.Linear` / `nn.Conv2d` initialisation (uniform in
//! ±1/sqrt(fan_in) for weights, `torch/nn/modules/linear.py` `reset_parameters`), norm scales 1,
//! small uniform biases. Layers real checkpoints start at zero (ControlNet zero convolutions,
//! the motion modules' `proj_out`) get random values too, so every part changes the frames; the
//! projections that close a residual branch are scaled down so 70-odd residual additions through
//! the full-size UNet stay well inside f16.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::gpu::{Arena, Gpu};
use crate::models::clip::{self, ClipConfig};
use crate::models::controlnet::ControlNetConfig;
use crate::models::vae::{Vae, VaeConfig};
use crate::models::{ControlNet, Limits, MotionConfig, MotionFormat, Unet, UnetConfig, motion};
use crate::ops::Exec;
use crate::ops::random::random_uniform;
use crate::sampling::{NoiseStream, Purpose, stream_id};
use crate::tensor::{DType, Tensor};
use crate::weights::{self, TensorSpec};

/// Which shapes the random pipeline has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelSize {
    /// The same families at tiny widths and depths: a CPU run of a few seconds.
    Small,
    /// SDXL 1.0 base, its VAE, the AnimateDiff-SDXL motion adapter and a full SDXL ControlNet.
    Full,
}

impl ModelSize {
    pub fn name(self) -> &'static str {
        match self {
            ModelSize::Small => "small",
            ModelSize::Full => "full",
        }
    }
}

/// How `random_values` draws, in words: part of the cache fingerprint, so changing the rule
/// (or the constants below) means changing this text.
const VALUES_RECIPE: &str = "f16 uniform: weights 1/sqrt(fan_in), residual outputs x0.5, biases 0.02, norms 1";
/// Bias values are uniform in ±BIAS_BOUND.
const BIAS_BOUND: f32 = 0.02;
/// Scale of the weights that end a residual branch (attention and feed-forward outputs, a
/// ResNet's second convolution, the motion modules' `proj_out`): each branch then adds about a
/// twelfth of its input's variance, so the residual stream grows slowly with depth.
const RESIDUAL_OUTPUT_SCALE: f32 = 0.5;
/// Names ending in one of these close a residual branch.
const RESIDUAL_OUTPUTS: [&str; 6] =
    ["to_out.0.weight", "ff.net.2.weight", "proj_out.weight", "conv2.weight", "out_proj.weight", "mlp.fc2.weight"];
/// CLIP's vocabulary (the tokenizer built into celframe has these ids).
const CLIP_VOCAB: usize = 49408;

/// One folder of the pipeline: its name, config, weights file and the tensors it holds.
struct Component {
    folder: &'static str,
    config: Value,
    weights_file: &'static str,
    specs: Vec<TensorSpec>,
}

/// Writes `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, `motion_adapter/` and
/// `controlnet/` into `dir` (created if absent). Full-size values are drawn on the GPU when there
/// is one (about 4.9 billion of them); everything else on the CPU.
pub fn write_random_pipeline(dir: &Path, size: ModelSize, seed: u64) -> Result<()> {
    let components = components(size)?;
    let gpu = match size {
        ModelSize::Full if Gpu::is_available() => Some(Gpu::from_env()?),
        _ => None,
    };
    // The largest tensor (bigG's token table, 63 M values) fits with room to spare.
    let scratch = gpu.as_ref().map(|_| Arena::new("random weights", 512 << 20)).transpose()?;
    let ex = match (&gpu, &scratch) {
        (Some(gpu), Some(scratch)) => Exec::Cuda { gpu, scratch },
        _ => Exec::Cpu,
    };
    for (index, component) in components.iter().enumerate() {
        let folder = dir.join(component.folder);
        std::fs::create_dir_all(&folder)
            .map_err(|e| Error::Io { context: format!("creating {}", folder.display()), source: e })?;
        let config = serde_json::to_string_pretty(&component.config)
            .map_err(|e| Error::Internal(format!("{}/config.json: {e}", component.folder)))?;
        let config_path = folder.join("config.json");
        std::fs::write(&config_path, config + "\n")
            .map_err(|e| Error::Io { context: format!("writing {}", config_path.display()), source: e })?;
        let mut tensors = Vec::with_capacity(component.specs.len());
        for (k, spec) in component.specs.iter().enumerate() {
            let stream = NoiseStream::new(seed, stream_id(&[index as u64, Purpose::Weights as u64, k as u64]));
            let values = random_values(&ex, stream, spec)?;
            tensors.push(match &ex {
                Exec::Cuda { gpu, scratch } => {
                    let host = gpu.download(&values)?;
                    drop(values);
                    scratch.reset();
                    host
                }
                Exec::Cpu => values,
            });
        }
        let named: Vec<(String, &Tensor)> =
            component.specs.iter().map(|s| s.name.clone()).zip(tensors.iter()).collect();
        weights::save(&folder.join(component.weights_file), &named, None)?;
    }
    Ok(())
}

/// The pipeline folder for `size` and `seed` under `cache_root`, written first if it is not
/// there. It is written under a temporary name and renamed when complete, so an interrupted run
/// leaves no folder that looks complete, and two runs at once both end with a whole one.
///
/// The folder's name holds a fingerprint of the configs and of how values are drawn, so a
/// celframe whose models differ never reuses an older set.
pub fn cached_random_pipeline(cache_root: &Path, size: ModelSize, seed: u64) -> Result<PathBuf> {
    let configs: Vec<String> = components(size)?.iter().map(|c| c.config.to_string()).collect();
    let recipe = format!("{VALUES_RECIPE}\n{}", configs.join("\n"));
    let name = format!("{}-{seed}-{:016x}", size.name(), fnv1a(recipe.as_bytes()));
    let target = cache_root.join(&name);
    if target.is_dir() {
        return Ok(target);
    }
    let temp = cache_root.join(format!(".{name}.{}.tmp", std::process::id()));
    let io = |what: &str, path: &Path, e| Error::Io { context: format!("{what} {}", path.display()), source: e };
    if temp.exists() {
        std::fs::remove_dir_all(&temp).map_err(|e| io("removing", &temp, e))?;
    }
    write_random_pipeline(&temp, size, seed)?;
    if let Err(e) = std::fs::rename(&temp, &target) {
        // Another run finished the same folder first: keep theirs.
        std::fs::remove_dir_all(&temp).map_err(|e| io("removing", &temp, e))?;
        if !target.is_dir() {
            return Err(io("renaming into", &target, e));
        }
    }
    Ok(target)
}

/// FNV-1a, 64 bits (Fowler, Noll, Vo): a stable fingerprint, not a secure one.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A tensor's values by its role: norm scales 1 (the only 1-d weights), biases small, other
/// weights uniform in ±1/sqrt(fan_in), smaller where they close a residual branch.
fn random_values(ex: &Exec, stream: NoiseStream, spec: &TensorSpec) -> Result<Tensor> {
    let shape = &spec.shape;
    let (low, high) = match shape.as_slice() {
        [_] if spec.name.ends_with(".weight") => (1.0, 1.0),
        [_] => (-BIAS_BOUND, BIAS_BOUND),
        [_, rest @ ..] => {
            let fan_in: usize = rest.iter().product();
            let scale =
                if RESIDUAL_OUTPUTS.iter().any(|end| spec.name.ends_with(end)) { RESIDUAL_OUTPUT_SCALE } else { 1.0 };
            let bound = scale / (fan_in.max(1) as f32).sqrt();
            (-bound, bound)
        }
        [] => return Err(Error::Internal(format!("random weights: tensor '{}' has no dimensions", spec.name))),
    };
    random_uniform(ex, stream, 0, shape, DType::F16, low, high)
}

/// The widths and depths of each size; everything else is SDXL's.
struct Shapes {
    unet_channels: Vec<usize>,
    /// Transformer depth per level (level 0 has none) and heads per level.
    transformer_depths: Vec<usize>,
    attention_heads: Vec<usize>,
    layers_per_block: usize,
    time_embed_per_id: usize,
    clip_l: ClipShape,
    clip_g: ClipShape,
    vae_channels: Vec<usize>,
    vae_groups: usize,
    vae_layers_per_block: usize,
    motion_heads: usize,
    /// The ControlNet's conditioning embedding: one stride-2 convolution between entries, so as
    /// many entries as the VAE has levels gives the VAE's factor.
    hint_channels: Vec<usize>,
}

struct ClipShape {
    hidden: usize,
    layers: usize,
    heads: usize,
    mlp: usize,
}

impl Shapes {
    fn of(size: ModelSize) -> Shapes {
        match size {
            // SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0 unet/, text_encoder/,
            // text_encoder_2/, vae/ config.json), AnimateDiff-SDXL (guoyww/animatediff-motion-
            // adapter-sdxl-beta: 8 heads, no mid block), a full SDXL ControlNet
            // (diffusers/controlnet-canny-sdxl-1.0).
            ModelSize::Full => Shapes {
                unet_channels: vec![320, 640, 1280],
                transformer_depths: vec![1, 2, 10],
                attention_heads: vec![5, 10, 20],
                layers_per_block: 2,
                time_embed_per_id: 256,
                clip_l: ClipShape { hidden: 768, layers: 12, heads: 12, mlp: 3072 },
                clip_g: ClipShape { hidden: 1280, layers: 32, heads: 20, mlp: 5120 },
                vae_channels: vec![128, 256, 512, 512],
                vae_groups: 32,
                vae_layers_per_block: 2,
                motion_heads: 8,
                hint_channels: vec![16, 32, 96, 256],
            },
            // Widths that keep a 16-frame CPU render at 256x144 to seconds; four VAE levels keep
            // SDXL's 8x latent factor.
            ModelSize::Small => Shapes {
                unet_channels: vec![32, 64],
                transformer_depths: vec![1, 1],
                attention_heads: vec![1, 1],
                layers_per_block: 1,
                time_embed_per_id: 32,
                clip_l: ClipShape { hidden: 64, layers: 2, heads: 1, mlp: 256 },
                clip_g: ClipShape { hidden: 128, layers: 2, heads: 2, mlp: 512 },
                vae_channels: vec![16, 16, 32, 32],
                vae_groups: 16,
                vae_layers_per_block: 1,
                motion_heads: 1,
                hint_channels: vec![8, 8, 16, 16],
            },
        }
    }

    fn cross_attention_dim(&self) -> usize {
        self.clip_l.hidden + self.clip_g.hidden
    }

    /// bigG's pooled projection and six time ids, each embedded at `time_embed_per_id`.
    fn text_time_dim(&self) -> usize {
        self.clip_g.hidden + 6 * self.time_embed_per_id
    }

    /// Down and up block types: no attention at level 0.
    fn block_types(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let levels = self.unet_channels.len();
        let down = (0..levels).map(|i| if i == 0 { "DownBlock2D" } else { "CrossAttnDownBlock2D" }).collect();
        let up = (0..levels).map(|i| if i + 1 == levels { "UpBlock2D" } else { "CrossAttnUpBlock2D" }).collect();
        (down, up)
    }

    /// The UNet's fields that its ControlNet shares (diffusers `UNet2DConditionModel` /
    /// `ControlNetModel` config keys).
    fn encoder_fields(&self) -> Value {
        let (down, _) = self.block_types();
        json!({
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": self.time_embed_per_id,
            "attention_head_dim": self.attention_heads,
            "block_out_channels": self.unet_channels,
            "cross_attention_dim": self.cross_attention_dim(),
            "down_block_types": down,
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-5,
            "norm_num_groups": 32,
            "num_attention_heads": null,
            "projection_class_embeddings_input_dim": self.text_time_dim(),
            "transformer_layers_per_block": self.transformer_depths,
            "upcast_attention": false,
            "use_linear_projection": true,
        })
    }

    fn unet(&self) -> Value {
        let (_, up) = self.block_types();
        let unet_only = json!({
            "_class_name": "UNet2DConditionModel",
            "up_block_types": up,
            "out_channels": 4,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "resnet_out_scale_factor": 1.0,
            "sample_size": 128,
            "time_cond_proj_dim": null,
        });
        merged(self.encoder_fields(), unet_only)
    }

    fn controlnet(&self) -> Value {
        let controlnet_only = json!({
            "_class_name": "ControlNetModel",
            "conditioning_channels": 3,
            "conditioning_embedding_out_channels": self.hint_channels,
            "controlnet_conditioning_channel_order": "rgb",
            "global_pool_conditions": false,
        });
        merged(self.encoder_fields(), controlnet_only)
    }

    fn motion_adapter(&self) -> Value {
        json!({
            "_class_name": "MotionAdapter",
            "block_out_channels": self.unet_channels,
            "motion_layers_per_block": self.layers_per_block,
            "motion_max_seq_length": 32,
            "motion_norm_num_groups": 32,
            "motion_num_attention_heads": self.motion_heads,
            "motion_transformer_layers_per_block": 1,
            "use_motion_mid_block": false,
        })
    }

    fn vae(&self) -> Value {
        let levels = self.vae_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": self.vae_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": self.vae_layers_per_block,
            "norm_num_groups": self.vae_groups,
            "sample_size": 1024,
            "scaling_factor": 0.13025,
            "force_upcast": false,
            "mid_block_add_attention": true,
            "use_post_quant_conv": true,
            "use_quant_conv": true,
        })
    }
}

/// `base` with the fields of `extra` added (both JSON objects).
fn merged(mut base: Value, extra: Value) -> Value {
    if let (Value::Object(fields), Value::Object(more)) = (&mut base, extra) {
        fields.extend(more);
    }
    base
}

/// A transformers CLIP text config. `eos_token_id` 2 is the legacy value the SDXL repository's
/// configs carry: transformers then pools at the largest id, which is `<|endoftext|>`.
fn clip_config(shape: &ClipShape, with_projection: bool) -> Value {
    json!({
        "architectures": [if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "model_type": "clip_text_model",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": if with_projection { "gelu" } else { "quick_gelu" },
        "hidden_size": shape.hidden,
        "intermediate_size": shape.mlp,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "projection_dim": shape.hidden,
        "vocab_size": CLIP_VOCAB,
    })
}

/// Every component with its tensors, taken from the configs the way the loaders read them.
fn components(size: ModelSize) -> Result<Vec<Component>> {
    let shapes = Shapes::of(size);
    let limits = Limits::engine();
    let text = |v: &Value| v.to_string();
    let unet = shapes.unet();
    let unet_specs = Unet::tensor_specs(&UnetConfig::from_diffusers_json(&text(&unet), "unet/config.json", &limits)?);
    let vae = shapes.vae();
    let vae_specs = Vae::tensor_specs(&VaeConfig::from_diffusers_json(&text(&vae), "vae/config.json", &limits)?);
    let clip_l = clip_config(&shapes.clip_l, false);
    let clip_l_specs = clip::checkpoint::tensor_specs(&ClipConfig::from_transformers_json(
        &text(&clip_l),
        "text_encoder/config.json",
        false,
    )?);
    let clip_g = clip_config(&shapes.clip_g, true);
    let clip_g_specs = clip::checkpoint::tensor_specs(&ClipConfig::from_transformers_json(
        &text(&clip_g),
        "text_encoder_2/config.json",
        true,
    )?);
    let adapter = shapes.motion_adapter();
    let adapter_config = MotionConfig::from_diffusers_json(&text(&adapter), "motion_adapter/config.json", &limits)?;
    // diffusers regenerates the position tables, so its files may leave them out.
    let (motion_specs, _) = motion::checkpoint::tensor_specs(&adapter_config, MotionFormat::Diffusers, false);
    let controlnet = shapes.controlnet();
    let controlnet_specs = ControlNet::tensor_specs(&ControlNetConfig::from_diffusers_json(
        &text(&controlnet),
        "controlnet/config.json",
        &limits,
    )?);
    let diffusers = "diffusion_pytorch_model.safetensors";
    Ok(vec![
        Component { folder: "unet", config: unet, weights_file: diffusers, specs: unet_specs },
        Component { folder: "vae", config: vae, weights_file: diffusers, specs: vae_specs },
        Component { folder: "text_encoder", config: clip_l, weights_file: "model.safetensors", specs: clip_l_specs },
        Component { folder: "text_encoder_2", config: clip_g, weights_file: "model.safetensors", specs: clip_g_specs },
        Component { folder: "motion_adapter", config: adapter, weights_file: diffusers, specs: motion_specs },
        Component { folder: "controlnet", config: controlnet, weights_file: diffusers, specs: controlnet_specs },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::clip::{TextEncoderKind, open_text_encoder};
    use crate::models::vae::open_vae;
    use crate::models::{open_controlnet, open_motion, open_unet};
    use crate::weights::LoadedWeights;

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("celframe-random-models-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn assert_shapes(what: &str, weights: &LoadedWeights, specs: &[TensorSpec]) {
        assert_eq!(weights.len(), specs.len(), "{what}: tensor count");
        for spec in specs {
            let t = weights.get(&spec.name).unwrap_or_else(|_| panic!("{what}: no {}", spec.name));
            assert_eq!(t.shape(), spec.shape.as_slice(), "{what}: {}", spec.name);
        }
    }

    fn params(specs: &[TensorSpec]) -> usize {
        specs.iter().map(|s| s.shape.iter().product::<usize>()).sum()
    }

    /// The small set loads with the loaders `celframe render` uses, every tensor where the specs
    /// say, and the parts fit together (text widths, time ids, motion modules, latent factors).
    #[test]
    fn small_pipeline_loads_with_the_real_loaders() {
        let dir = TempDir::new("small");
        write_random_pipeline(&dir.0, ModelSize::Small, 7).unwrap();
        let components = components(ModelSize::Small).unwrap();
        let specs = |folder: &str| &components.iter().find(|c| c.folder == folder).unwrap().specs;

        let unet = open_unet(&dir.0).unwrap();
        assert_shapes("unet", &unet.weights, specs("unet"));
        let vae = open_vae(&dir.0).unwrap();
        assert_shapes("vae", &vae.weights, specs("vae"));
        let clip_l = open_text_encoder(&dir.0, TextEncoderKind::ClipL).unwrap();
        assert_shapes("text_encoder", &clip_l.weights, specs("text_encoder"));
        let clip_g = open_text_encoder(&dir.0, TextEncoderKind::ClipG).unwrap();
        assert_shapes("text_encoder_2", &clip_g.weights, specs("text_encoder_2"));
        let motion = open_motion(&dir.0.join("motion_adapter")).unwrap();
        assert_shapes("motion_adapter", &motion.weights, specs("motion_adapter"));
        let controlnet = open_controlnet(&dir.0.join("controlnet")).unwrap();
        assert_shapes("controlnet", &controlnet.weights, specs("controlnet"));

        // The real tokenizer's ids index both token tables.
        assert_eq!(clip_l.config.vocab_size, 49408);
        assert_eq!(clip_g.config.vocab_size, 49408);
        assert_eq!(unet.config.cross_attention_dims()[0], clip_l.config.hidden_size + clip_g.config.hidden_size);
        let text_time = unet.config.text_time.as_ref().unwrap();
        assert_eq!(text_time.input_dim, clip_g.config.projection_dim.unwrap() + 6 * text_time.time_embed_dim);
        motion.config.check_unet(&unet.config).unwrap();
        assert!(motion.config.max_seq_length >= 16 && motion.config.mid_block.is_none());
        assert_eq!(vae.config.upsample_factor(), 8);
        assert_eq!(controlnet.config.hint_factor(), 8);
        assert_eq!(controlnet.config.encoder.block_out_channels, unet.config.block_out_channels);
    }

    /// Values follow the stated rule, checked against the uniform distribution's own moments:
    /// weights in ±bound with standard deviation bound/sqrt(3), norm scales 1, small biases.
    #[test]
    fn values_follow_pytorch_default_initialisation() {
        let dir = TempDir::new("values");
        write_random_pipeline(&dir.0, ModelSize::Small, 3).unwrap();
        let unet = open_unet(&dir.0).unwrap();
        let values = |name: &str| unet.weights.get(name).unwrap().to_f32_vec().unwrap();
        let check_uniform = |name: &str, bound: f32| {
            let v = values(name);
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max <= bound * 1.001 && max > bound * 0.9, "{name}: max |v| {max}, bound {bound}");
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            let expected = bound as f64 / 3f64.sqrt();
            assert!((std / expected - 1.0).abs() < 0.05, "{name}: std {std}, uniform's {expected}");
            assert!(mean.abs() < 0.05 * expected, "{name}: mean {mean}");
        };
        // conv [32, 4, 3, 3]: fan_in 36; a closing projection at half the bound.
        check_uniform("conv_in.weight", 1.0 / 36f32.sqrt());
        check_uniform("down_blocks.0.resnets.0.conv2.weight", 0.5 / (32f32 * 9.0).sqrt());
        check_uniform("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight", 0.5 / 8.0);
        assert!(values("conv_norm_out.weight").iter().all(|&x| x == 1.0));
        let bias = values("conv_in.bias");
        assert!(bias.iter().all(|x| x.abs() <= BIAS_BOUND * 1.001) && bias.iter().any(|&x| x != 0.0));
        // Each tensor has its own stream.
        assert_ne!(values("down_blocks.0.resnets.0.conv1.weight"), values("down_blocks.0.resnets.0.conv2.weight")[..]);
    }

    /// The cache reuses a complete folder and keys it by seed.
    #[test]
    fn cache_reuses_a_complete_folder() {
        let dir = TempDir::new("cache");
        let first = cached_random_pipeline(&dir.0, ModelSize::Small, 1).unwrap();
        let weights = first.join("unet").join("diffusion_pytorch_model.safetensors");
        let written = std::fs::metadata(&weights).unwrap().modified().unwrap();
        assert_eq!(cached_random_pipeline(&dir.0, ModelSize::Small, 1).unwrap(), first);
        assert_eq!(std::fs::metadata(&weights).unwrap().modified().unwrap(), written);
        let other = cached_random_pipeline(&dir.0, ModelSize::Small, 2).unwrap();
        assert_ne!(other, first);
        assert_ne!(
            std::fs::read(&weights).unwrap(),
            std::fs::read(other.join("unet/diffusion_pytorch_model.safetensors")).unwrap()
        );
        // Nothing half-written is left beside the finished folders.
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 2);
    }

    /// The full set has SDXL 1.0's published parameter counts (UNet, both text encoders, the
    /// AnimateDiff-SDXL adapter, a full ControlNet).
    #[test]
    fn full_shapes_are_sdxl() {
        let components = components(ModelSize::Full).unwrap();
        let count = |folder: &str| params(&components.iter().find(|c| c.folder == folder).unwrap().specs);
        assert_eq!(count("unet"), 2_567_463_684);
        assert_eq!(count("text_encoder"), 123_060_480);
        assert_eq!(count("text_encoder_2"), 694_659_840);
        assert_eq!(count("motion_adapter"), 236_779_200);
        assert_eq!(count("controlnet"), 1_251_014_160);
    }
}
