//! The one name map from a LoRA module, in any spelling a file uses, to the weight it adapts in a
//! loaded model. It is built from the loaders' own name maps, not from a second table: for the
//! UNet the diffusers names the graph reads and `LdmNames` (the single-file SGM names), for the
//! text encoders `clip::checkpoint::transformers_name`. Each weight is entered under every
//! spelling a file may use for its module:
//!
//! - kohya: `lora_unet_` + the SGM path with `.` -> `_` (what kohya trains SDXL on), and
//!   `lora_unet_` + the diffusers path the same way (LCM-LoRA and other diffusers-trained files);
//!   `lora_te1_` (and SD 1.x's `lora_te_`) / `lora_te2_` + the transformers path;
//! - diffusers / PEFT: `unet.`, `text_encoder.`, `text_encoder_2.` + the dotted path;
//! - motion modules (AnimateDiff MotionLoRAs: guoyww/AnimateDiff `animatediff/utils/util.py`,
//!   diffusers `scripts/convert_animatediff_motion_lora_to_diffusers.py`): the diffusers path and
//!   the original AnimateDiff path, each bare as well as with the prefixes above, from the motion
//!   checkpoint loader's two name lists.
//!
//! Keys are then looked up whole. Underscores are ambiguous (`transformer_blocks`, `to_q`,
//! `in_layers`), so nothing splits on them (ComfyUI's `comfy/lora.py` `model_lora_keys_unet`
//! builds the same kind of dictionary). diffusers instead rewrites kohya keys by substring
//! (`loaders/lora_conversion_utils.py`, `_maybe_map_sgm_blocks_to_diffusers` finds the keys of
//! input block 1 by the substring `input_blocks_1`, which also matches `input_blocks_10` and up in
//! a UNet with ten or more input blocks); a whole-key lookup has no such case.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::models::clip::{ClipCheckpoint, TextEncoderKind, checkpoint as clip_checkpoint};
use crate::models::motion::{MotionCheckpoint, MotionFormat, checkpoint as motion_checkpoint};
use crate::models::unet::UnetCheckpoint;
use crate::models::unet::ldm::{self, LdmNames};

/// A model a LoRA adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
    /// AnimateDiff's motion modules (a MotionAdapter's weights, merged apart from the UNet's).
    Motion,
}

impl Component {
    pub const ALL: [Component; 4] =
        [Component::Unet, Component::TextEncoder, Component::TextEncoder2, Component::Motion];

    /// The name summaries and errors use: the diffusers pipeline component for the UNet and the
    /// text encoders, `motion_modules` for the motion modules.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Motion => "motion_modules",
        }
    }

    /// The PEFT key prefix (without its dot) and the `lora_adapter_metadata` component: the motion
    /// modules live inside diffusers' UNetMotionModel, so their keys and config are the UNet's
    /// (`unet.down_blocks.0.motion_modules.0....`: diffusers `loaders/lora_pipeline.py`,
    /// AnimateDiff pipelines load motion LoRAs with `load_lora_weights` into `pipe.unet`).
    pub fn prefix(self) -> &'static str {
        match self {
            Component::Unet | Component::Motion => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    pub fn is_text_encoder(self) -> bool {
        matches!(self, Component::TextEncoder | Component::TextEncoder2)
    }

    fn kohya_prefixes(self) -> &'static [&'static str] {
        match self {
            Component::Unet | Component::Motion => &["lora_unet_"],
            Component::TextEncoder => &["lora_te1_", "lora_te_"],
            Component::TextEncoder2 => &["lora_te2_"],
        }
    }

    pub fn of_text_encoder(kind: TextEncoderKind) -> Component {
        match kind {
            TextEncoderKind::ClipL => Component::TextEncoder,
            TextEncoderKind::ClipG => Component::TextEncoder2,
        }
    }

    /// The component whose namespace a module key is in (`lora_te2_...`, `unet....`, any key with
    /// `motion_modules` in it), whether or not it is loaded.
    pub fn of_key(module: &str) -> Option<Component> {
        if module.contains("motion_modules") {
            return Some(Component::Motion);
        }
        [Component::Unet, Component::TextEncoder, Component::TextEncoder2].into_iter().find(|c| {
            c.kohya_prefixes().iter().any(|p| module.starts_with(p)) || module.starts_with(&format!("{}.", c.prefix()))
        })
    }
}

/// A weight a LoRA module may add to: its model, graph name (`....proj_in.weight`) and PyTorch
/// shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub component: Component,
    pub tensor: String,
    pub shape: Vec<usize>,
    /// The module's bias (graph name, shape), for a full `diff_b`.
    pub bias: Option<(String, Vec<usize>)>,
}

/// Every spelling of every adaptable weight of the loaded models.
#[derive(Default)]
pub struct Targets {
    by_module: HashMap<String, Target>,
    loaded: Vec<Component>,
}

/// What a module key resolves to.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Found(&'a Target),
    /// The key names a component that is not loaded here (a text-encoder module while only the
    /// UNet runs).
    NotLoaded(Component),
    /// No weight of any loaded model, under any spelling.
    Nothing,
}

impl Targets {
    pub fn new() -> Targets {
        Targets::default()
    }

    /// The UNet's convolution and Linear weights under their diffusers and SGM paths.
    pub fn add_unet(&mut self, checkpoint: &UnetCheckpoint) -> Result<()> {
        let sgm = LdmNames::new(&checkpoint.config);
        let mut shapes = HashMap::new();
        for (name, key) in &checkpoint.names {
            shapes.insert(name.as_str(), checkpoint.weights.get(key)?.shape().to_vec());
        }
        for (name, shape) in &shapes {
            let Some(module) = adaptable(name, shape) else { continue };
            let sgm_name = sgm
                .ldm_name(name)
                .ok_or_else(|| Error::Internal(format!("the UNet weight '{name}' has no single-file name")))?;
            let sgm_module = sgm_name[ldm::PREFIX.len()..].trim_end_matches(".weight").to_string();
            let bias = bias_of(module, &shapes);
            self.add(Component::Unet, &[module.to_string(), sgm_module], name, shape.clone(), bias, false)?;
        }
        self.loaded.push(Component::Unet);
        Ok(())
    }

    /// The motion modules' Linear weights under their diffusers path (the graph's names, which
    /// diffusers' converted and PEFT motion LoRAs use: `unet.` + path, and bare) and under the
    /// original AnimateDiff path of the same tensor (`...motion_modules.0.temporal_transformer.
    /// transformer_blocks.0.attention_blocks.0.to_q`, bare: guoyww/AnimateDiff's MotionLoRA files,
    /// `animatediff/utils/util.py` `load_weights`), both taken from the checkpoint loader's own two
    /// name lists (`motion::checkpoint::tensor_specs`).
    pub fn add_motion(&mut self, checkpoint: &MotionCheckpoint) -> Result<()> {
        let (_, original) = motion_checkpoint::tensor_specs(&checkpoint.config, MotionFormat::Original, false);
        let original: HashMap<&str, &str> = original.iter().map(|(g, k)| (g.as_str(), k.as_str())).collect();
        let mut shapes = HashMap::new();
        for (name, key) in &checkpoint.names {
            shapes.insert(name.as_str(), checkpoint.weights.get(key)?.shape().to_vec());
        }
        for (name, shape) in &shapes {
            let Some(module) = adaptable(name, shape) else { continue };
            let original_module = original.get(name).and_then(|k| k.strip_suffix(".weight")).ok_or_else(|| {
                Error::Internal(format!("the motion weight '{name}' has no original AnimateDiff name"))
            })?;
            let bias = bias_of(module, &shapes);
            let paths = [module.to_string(), original_module.to_string()];
            self.add(Component::Motion, &paths, name, shape.clone(), bias, true)?;
        }
        self.loaded.push(Component::Motion);
        Ok(())
    }

    /// A text encoder's Linear weights (attention projections, MLP, bigG's text_projection) under
    /// their transformers path.
    pub fn add_text_encoder(&mut self, checkpoint: &ClipCheckpoint) -> Result<()> {
        let component = Component::of_text_encoder(checkpoint.kind);
        let specs = clip_checkpoint::tensor_specs(&checkpoint.config);
        let shapes: HashMap<&str, Vec<usize>> = specs.iter().map(|s| (s.name.as_str(), s.shape.clone())).collect();
        for spec in &specs {
            let Some(module) = adaptable(&spec.name, &spec.shape) else { continue };
            if module.starts_with("embeddings.") {
                continue;
            }
            let path = clip_checkpoint::transformers_name(module);
            let bias = bias_of(module, &shapes);
            self.add(component, &[path], &spec.name, spec.shape.clone(), bias, false)?;
        }
        self.loaded.push(component);
        Ok(())
    }

    /// Enters `tensor` under the kohya and PEFT spellings of each of its module `paths`, and with
    /// `bare` under the path itself.
    fn add(
        &mut self,
        component: Component,
        paths: &[String],
        tensor: &str,
        shape: Vec<usize>,
        bias: Option<(String, Vec<usize>)>,
        bare: bool,
    ) -> Result<()> {
        let target = Target { component, tensor: tensor.to_string(), shape, bias };
        for path in paths {
            let flat = path.replace('.', "_");
            let spellings = component
                .kohya_prefixes()
                .iter()
                .map(|p| format!("{p}{flat}"))
                .chain([format!("{}.{path}", component.prefix())])
                .chain(bare.then(|| path.clone()));
            for spelling in spellings {
                if let Some(other) = self.by_module.insert(spelling.clone(), target.clone())
                    && other != target
                {
                    return Err(Error::Internal(format!(
                        "the LoRA module name '{spelling}' fits both '{}' and '{}'",
                        other.tensor, target.tensor
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn is_loaded(&self, component: Component) -> bool {
        self.loaded.contains(&component)
    }

    /// What a file's module key (`lora_unet_...`, `unet.down_blocks....`) adapts.
    pub fn find(&self, module: &str) -> Lookup<'_> {
        if let Some(t) = self.by_module.get(module) {
            return Lookup::Found(t);
        }
        match Component::of_key(module) {
            Some(c) if !self.is_loaded(c) => Lookup::NotLoaded(c),
            _ => Lookup::Nothing,
        }
    }
}

/// The graph name and shape of `module`'s bias, if the model has one.
fn bias_of(module: &str, shapes: &HashMap<&str, Vec<usize>>) -> Option<(String, Vec<usize>)> {
    let name = format!("{module}.bias");
    shapes.get(name.as_str()).map(|s| (name, s.clone()))
}

/// The module path of a weight a LoRA can adapt (a Linear or convolution `.weight`), or None.
fn adaptable<'a>(name: &'a str, shape: &[usize]) -> Option<&'a str> {
    let module = name.strip_suffix(".weight")?;
    matches!(shape.len(), 2 | 4).then_some(module)
}
