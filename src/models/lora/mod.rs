//! LoRA files merged into the weights of the loaded models (formats as kohya sd-scripts
//! `networks/lora.py`, diffusers `loaders/lora_conversion_utils.py`, peft and LyCORIS write them).
//!
//! - `keys`: the key grammar (kohya, diffusers / PEFT, older diffusers spellings).
//! - `targets`: the one name map from a module, in any spelling, to a loaded weight (UNet, text
//!   encoders, AnimateDiff motion modules).
//! - `merge`: ΔW per format, DoRA, and the host merge `ModelWeights` applies.
//! - `roles`: the part each LoRA plays (style, character, utility, lcm, motion) and the pipeline's
//!   rules for a set of them, checked first by `resolve`.
//! - `device`: sets uploaded as factors, merged into device weights by the LoRA-delta kernels and
//!   switched per clip.
//!
//! `resolve` reads each file, accounts for every key and returns one `LoraMerge` per loaded model.
//! A key either adds to a weight, belongs to a model not loaded in this run (counted in the
//! summary), or is a problem; all problems of all files make one error: keys that target nothing
//! (a warning in the summary instead with `lenient`), unknown parameters, incomplete modules (a
//! down without its up), shapes that do not fit their weight (naming the key and both shapes), and
//! formats recognised but not merged yet (LoHa / LoKr with Tucker cores, OFT, norm deltas, two
//! DoRA modules on one weight: `Error::Unsupported`).
//!
//! Formats merged: LoRA / LoCon (3x3, Tucker `lora_mid`), LoHa (`hada_w{1,2}_{a,b}`), LoKr
//! (`lokr_w{1,2}` or their `_a`/`_b` factors), full `diff` / `diff_b` (LyCORIS `lycoris/functional/`),
//! DoRA over LoRA / LoHa / LoKr (below), AnimateDiff MotionLoRAs (attention-processor keys
//! `...motion_modules.N...processor.to_q_lora.down.weight`, no α: s = strength, guoyww/AnimateDiff
//! `animatediff/utils/util.py`; the published ones are for SD1.5's modules and do not fit SDXL's, so
//! the tests use files made at the tiny SDXL-layout module's shapes).
//!
//! LoRA scale s = strength × α / r, r the rank (down's first dimension). Where α comes from:
//! - kohya: the module's `.alpha`; without one, or with α = 0, α = r (s = strength): sd-scripts
//!   `networks/lora.py` (`create_network_from_weights` "support old LoRA without alpha",
//!   `LoRAModule.__init__` "alpha is None or alpha == 0"), as A1111 and ComfyUI do. diffusers
//!   differs: it gives a module without `.alpha` the file's most common α
//!   (`utils/peft_utils.py`, `get_peft_kwargs`); we follow kohya, whose format it is.
//! - diffusers / PEFT: the module's `.alpha` where a converted file has one; else the PEFT config
//!   diffusers writes into the safetensors metadata (`lora_adapter_metadata`, JSON with keys
//!   `<component>.lora_alpha`, `.alpha_pattern`, `.use_rslora`, `.use_dora`: diffusers
//!   `loaders/lora_base.py`, `_pack_dict_with_prefix`), an `alpha_pattern` entry matching the
//!   module's path or its end after a `.` (PEFT `utils/other.py`, `get_pattern_key`, without the
//!   regular expressions); else α = r. `use_rslora` makes s = strength × α / √r. The motion
//!   modules' keys and config are the UNet's (`unet.`), as in diffusers' UNetMotionModel.
//!
//! - LoHa: α / r with r = `hada_w1_b`'s first dimension, α missing or 0 -> r (LyCORIS
//!   `lycoris/modules/loha.py`, as kohya). LoKr: α / r only when a factor is a product, r from
//!   `lokr_w2_b`, else `lokr_w1_b`; both factors full, or no α -> 1 (diffusers
//!   `loaders/lora_conversion_utils.py` `_bake_lokr_alpha_`, LyCORIS `lycoris/modules/lokr.py`).
//!   Full diff: 1, and an α is refused.
//!
//! DoRA: with W₁ = W + cΔW, W'' = m ⊙ W₁ / (‖W₁‖ + eps) and the module changes W by
//! t · (W'' − W) (`merge::Dora`). The formats' own loaders disagree on where the strength w goes,
//! so each format follows its own:
//! - PEFT (`lora_magnitude_vector`, `use_dora`; peft `tuners/lora/dora.py` and `variants.py`
//!   `DoraLinearVariant.merge_safe`): c = w × α / r, t = 1, eps 0, the norm per output row
//!   (`torch.linalg.norm(W, dim=1)`; every dim but 0 on a convolution), m [out] ([1, out, 1, 1] on
//!   a convolution). This is what diffusers' `set_adapters` + `fuse_lora` compute.
//! - kohya / LyCORIS (`dora_scale`, written with LyCORIS' `dora_wd`): c = α / r, t = w,
//!   eps = float32's (LyCORIS `lycoris/functional/general.py` `_weight_decompose`), the norm per
//!   output row for a `dora_scale` [out, 1, ...] (`wd_on_out`, LyCORIS' default) and per input
//!   column for [1, in, ...]. W + w (W'' − W) is ComfyUI's strength rule
//!   (`comfy/weight_adapter/base.py` `weight_decompose`), linear in w and W at w = 0; LyCORIS
//!   instead scales the factor, (W + cΔW)(w (m/‖W₁‖ − 1) + 1), which keeps the whole ΔW at w = 0.
//!   ComfyUI takes the output-row norm of W, not of W₁; LyCORIS, which trains the magnitudes, takes
//!   W₁'s, and so do we. diffusers 0.42 drops `dora_scale` keys for SDXL (`loaders/lora_pipeline.py`,
//!   "not compatible in Diffusers at the moment") and merges a plain LoRA.
//!
//! W in both is the weight before any LoRA, so a DoRA module's change does not depend on the
//! order of the LoRAs; PEFT and ComfyUI apply LoRAs in turn, which gives this result when the DoRA
//! LoRA comes first. Two DoRA modules on one weight have no order-free meaning and are refused.
//!
//! Strength: each LoRA has one for the UNet (and motion modules) and one for the text encoders
//! (A1111's `<lora:name:te_w:unet_w>`).

pub mod device;
mod keys;
pub mod merge;
pub mod roles;
pub mod targets;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use serde_json::Value;

pub use merge::LoraMerge;
pub use roles::Role;
pub use targets::{Component, Lookup, Target, Targets};

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::text::prompt::MAX_WEIGHT;
use crate::weights::{self, TensorFile};
use keys::Param;
use merge::{Delta, Dora, DoraAxis, Factor, LowRank, Scaled};

/// A LoRA to apply: its file, its strengths on the UNet (and its motion modules) and on the text
/// encoders, and the part it plays (`roles`; None: only the count limits apply to it).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub unet: f64,
    pub text_encoder: f64,
    pub role: Option<Role>,
}

impl LoraSpec {
    /// A LoRA at `weight` on the UNet and the text encoders.
    pub fn new(path: impl Into<PathBuf>, weight: f64, role: Option<Role>) -> LoraSpec {
        LoraSpec { path: path.into(), unet: weight, text_encoder: weight, role }
    }

    /// `[ROLE=]PATH[:WEIGHT]`: the weight (default 1.0) applies to the UNet and the text encoders.
    /// A suffix after the last `:` that is not a number is part of the path. Text before the first
    /// `=` that holds no `/`, `\` or `.` is a role (`roles::Role`, an error when unknown); a path
    /// with such an `=` in it is written `./PATH`.
    pub fn parse(arg: &str) -> Result<LoraSpec> {
        let (role, rest) = match arg.split_once('=') {
            Some((role, rest)) if !role.contains(['/', '\\', '.']) => {
                let role = role.parse::<Role>().map_err(|e| Error::Input(format!("--lora '{arg}': {e}")))?;
                (Some(role), rest)
            }
            _ => (None, arg),
        };
        let (path, weight) = match rest.rsplit_once(':').map(|(p, w)| (p, w.trim().parse::<f64>())) {
            Some((path, Ok(weight))) => (path, weight),
            _ => (rest, 1.0),
        };
        if path.is_empty() {
            return Err(Error::Input(format!("--lora '{arg}': no file")));
        }
        if !(weight.is_finite() && weight.abs() <= MAX_WEIGHT) {
            return Err(Error::Input(format!("--lora '{arg}': the weight must be a number within ±{MAX_WEIGHT}")));
        }
        Ok(LoraSpec::new(path, weight, role))
    }

    fn strength(&self, component: Component) -> f64 {
        if component.is_text_encoder() { self.text_encoder } else { self.unet }
    }
}

/// The LoRAs resolved against the loaded models: one merge per model, and a summary line per file.
pub struct Loras {
    merges: HashMap<Component, LoraMerge>,
    pub summary: Vec<String>,
}

impl Loras {
    /// The deltas for `component`; None when no LoRA adapts it.
    pub fn merge(&self, component: Component) -> Option<&LoraMerge> {
        self.merges.get(&component).filter(|m| !m.is_empty())
    }
}

/// Problems listed by name in the error; the rest are counted.
const LISTED: usize = 20;

/// Everything wrong with the files, gathered so that one error reports it all.
#[derive(Default)]
struct Problems {
    /// (kind, detail); unsupported formats are counted apart for the error's kind.
    input: Vec<(&'static str, String)>,
    unsupported: Vec<String>,
}

impl Problems {
    fn into_result(self) -> Result<()> {
        if self.input.is_empty() && self.unsupported.is_empty() {
            return Ok(());
        }
        let mut kinds: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
        for (kind, detail) in &self.input {
            kinds.entry(kind).or_default().push(detail);
        }
        if !self.unsupported.is_empty() {
            kinds.insert("format not supported yet", self.unsupported.iter().collect());
        }
        let counts: Vec<String> = kinds.iter().map(|(k, v)| format!("{k}: {}", v.len())).collect();
        let mut message = format!("cannot apply the LoRAs ({}):", counts.join(", "));
        for (kind, details) in &kinds {
            for d in details.iter().take(LISTED) {
                message.push_str(&format!("\n  {kind}: {d}"));
            }
            if details.len() > LISTED {
                message.push_str(&format!("\n  ... and {} more {kind}", details.len() - LISTED));
            }
        }
        Err(if self.input.is_empty() { Error::Unsupported(message) } else { Error::Input(message) })
    }
}

/// Reads every LoRA of `specs`, maps each module through `targets` and gathers the deltas per
/// loaded model (see the module doc for what is refused). With `lenient`, keys that target nothing
/// become a warning line in the summary instead of an error.
pub fn resolve(specs: &[LoraSpec], targets: &Targets, lenient: bool) -> Result<Loras> {
    let warnings = roles::check(specs)?;
    let mut merges: HashMap<Component, LoraMerge> = HashMap::new();
    let mut summary = Vec::new();
    let mut problems = Problems::default();
    let mut dora_modules: HashMap<(Component, String), String> = HashMap::new();
    for spec in specs {
        let file = weights::open(&spec.path, "LoRA file")?;
        let found = read_file(&file, spec, targets, &mut problems)?;
        let mismatch = role_mismatch(spec.role, &found);
        let role = spec.role.map_or(String::new(), |r| format!(" [{r}]"));
        let mut line =
            format!("LoRA {}{role} (unet x{}, text encoders x{}):", spec.path.display(), spec.unet, spec.text_encoder);
        for c in Component::ALL {
            let modules: HashSet<&str> = found
                .deltas
                .iter()
                .filter(|(component, ..)| *component == c)
                .map(|(.., d)| d.source.as_str())
                .collect();
            let n = modules.len();
            if n > 0 {
                line.push_str(&format!(" {} {n} modules;", c.name()));
            }
        }
        for (c, n) in &found.not_loaded {
            line.push_str(&format!(" {n} modules for {} (not loaded here);", c.name()));
        }
        if found.deltas.is_empty() && found.not_loaded.is_empty() {
            line.push_str(" nothing for the loaded models;");
        }
        if !found.unmatched.is_empty() {
            if lenient {
                line.push_str(&format!(
                    " WARNING: {} keys target nothing in the loaded models, skipped (--lora-lenient): {}{}",
                    found.unmatched.len(),
                    found.unmatched.iter().take(LISTED).cloned().collect::<Vec<_>>().join(", "),
                    if found.unmatched.len() > LISTED { ", ..." } else { "" }
                ));
            } else {
                for key in found.unmatched {
                    problems
                        .input
                        .push(("targets nothing in the loaded models", format!("{}: {key}", file_name(&file))));
                }
            }
        }
        summary.push(line.trim_end_matches(';').to_string());
        if let Some(why) = mismatch {
            summary.push(format!("WARNING: LoRA {}: {why}", spec.path.display()));
        }
        for (component, tensor, delta) in &found.deltas {
            if delta.dora.is_none() {
                continue;
            }
            if let Some(first) = dora_modules.insert((*component, tensor.clone()), delta.source.clone()) {
                problems.unsupported.push(format!(
                    "{}: DoRA on {} '{tensor}', which {first} adapts with DoRA too (PEFT and ComfyUI merge two DoRA \
                     modules of one weight in turn, each in its own way)",
                    delta.source,
                    component.name()
                ));
            }
        }
        for (component, tensor, delta) in found.deltas {
            merges.entry(component).or_default().add(&tensor, delta);
        }
    }
    problems.into_result()?;
    summary.extend(warnings);
    Ok(Loras { merges, summary })
}

/// A motion LoRA that adapts more than the motion modules, or another role's LoRA that adapts
/// them: the role (which the count rules go by) does not describe the file.
fn role_mismatch(role: Option<Role>, found: &Found) -> Option<String> {
    let role = role?;
    let components: BTreeSet<Component> =
        found.deltas.iter().map(|(c, ..)| *c).chain(found.not_loaded.keys().copied()).collect();
    let motion = components.contains(&Component::Motion);
    let other: Vec<&str> = components.iter().filter(|c| **c != Component::Motion).map(|c| c.name()).collect();
    match role {
        Role::Motion if !other.is_empty() => {
            Some(format!("given the role motion, but it also adapts {}", other.join(", ")))
        }
        Role::Motion => None,
        _ if motion => Some(format!("given the role {role}, but it adapts the motion modules (a motion LoRA?)")),
        _ => None,
    }
}

/// What one file gives: deltas by target, keys that match nothing, and modules for models not
/// loaded here.
struct Found {
    /// (model, graph tensor name, delta)
    deltas: Vec<(Component, String, Scaled)>,
    unmatched: Vec<String>,
    not_loaded: BTreeMap<Component, usize>,
}

fn file_name(file: &TensorFile) -> String {
    file.path().display().to_string()
}

/// One module's keys by parameter.
type Params = BTreeMap<Param, String>;

fn read_file(file: &TensorFile, spec: &LoraSpec, targets: &Targets, problems: &mut Problems) -> Result<Found> {
    let name = file_name(file);
    let mut found = Found { deltas: Vec::new(), unmatched: Vec::new(), not_loaded: BTreeMap::new() };
    // 1. keys grouped by module
    let mut modules: BTreeMap<String, Params> = BTreeMap::new();
    for key in file.names() {
        let Some(k) = keys::split(key) else {
            found.unmatched.push(key.to_string());
            continue;
        };
        if let Some(first) = modules.entry(k.module).or_default().insert(k.param, key.to_string()) {
            problems.input.push(("duplicate parameter", format!("{name}: {first} and {key} hold the same parameter")));
        }
    }
    let metadata = PeftMetadata::read(file)?;
    // 2. each module resolved, checked and scaled
    // Keyed by model too: both text encoders name their weights alike (`text_model.encoder....`).
    let mut claimed: HashMap<(Component, &str), String> = HashMap::new();
    for (module, params) in &modules {
        let target = match targets.find(module) {
            Lookup::Found(t) => t,
            Lookup::NotLoaded(c) => {
                *found.not_loaded.entry(c).or_default() += 1;
                continue;
            }
            Lookup::Nothing => {
                found.unmatched.extend(params.values().cloned());
                continue;
            }
        };
        if let Some(first) = claimed.insert((target.component, &target.tensor), module.clone()) {
            problems.input.push((
                "two modules for one weight",
                format!("{name}: {first} and {module} both adapt {} '{}'", target.component.name(), target.tensor),
            ));
            continue;
        }
        if let Some(what) = params.keys().find_map(|p| if let Param::Unsupported(what) = p { Some(what) } else { None })
        {
            problems.unsupported.push(format!("{name}: {module}: {what}"));
            continue;
        }
        if let Some(key) = params.iter().find_map(|(p, k)| matches!(p, Param::Unknown(_)).then_some(k)) {
            problems.input.push(("unknown parameter", format!("{name}: {key}")));
            continue;
        }
        match module_delta(file, module, params, target, spec, &metadata) {
            Ok(deltas) => found.deltas.extend(deltas.into_iter().map(|(tensor, d)| (target.component, tensor, d))),
            Err(detail) => problems.input.push(("bad module", format!("{name}: {detail}"))),
        }
    }
    Ok(found)
}

/// A module's deltas (its weight's, and a `diff_b` for its bias), checked against the target and
/// scaled; Err(detail) names the key and both shapes.
fn module_delta(
    file: &TensorFile,
    module: &str,
    params: &Params,
    target: &Target,
    spec: &LoraSpec,
    metadata: &PeftMetadata,
) -> std::result::Result<Vec<(String, Scaled)>, String> {
    let tensor = |p: &Param| -> std::result::Result<Option<Tensor>, String> {
        params.get(p).map(|k| file.float(k).map_err(|e| e.to_string())).transpose()
    };
    let factor = |name: &'static str| tensor(&Param::Factor(name));
    let key = |p: &Param| params.get(p).map_or("", String::as_str);
    let alpha = match params.get(&Param::Alpha) {
        Some(key) => Some(scalar(file, key)?),
        None => None,
    };
    let strength = spec.strength(target.component);
    let source = format!("{}: {module}", file.path().display());
    let is_factor = |prefix: &str| params.keys().any(|p| matches!(p, Param::Factor(f) if f.starts_with(prefix)));
    let kinds = [
        params.contains_key(&Param::Down) || params.contains_key(&Param::Up),
        is_factor("hada_"),
        is_factor("lokr_"),
        is_factor("diff"),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        let have: Vec<&String> = params.values().collect();
        return Err(format!(
            "{module}: not one format (LoRA down/up, LoHa hada_*, LoKr lokr_*, diff): the file has {have:?}"
        ));
    }
    // ΔW and the ratio the strength multiplies (module doc)
    let (delta, ratio) = if kinds[0] {
        let (Some(down), Some(up)) = (tensor(&Param::Down)?, tensor(&Param::Up)?) else {
            let have: Vec<&String> = params.values().collect();
            return Err(format!("{module}: a LoRA module needs both a down and an up matrix; the file has {have:?}"));
        };
        let delta = low_rank(down, up, tensor(&Param::Mid)?, params)?;
        let r = delta.rank() as f64;
        let ratio = if module.starts_with("lora_") {
            match alpha {
                Some(a) if a != 0.0 => a / r,
                _ => 1.0,
            }
        } else {
            let path = module.strip_prefix(&format!("{}.", target.component.prefix())).unwrap_or(module);
            let peft = metadata.for_component(target.component);
            let alpha = alpha.or_else(|| peft.and_then(|m| m.alpha(path))).unwrap_or(r);
            if peft.is_some_and(|m| m.use_rslora) { alpha / r.sqrt() } else { alpha / r }
        };
        (Some(Delta::LowRank(delta)), ratio)
    } else if kinds[1] {
        // LoHa: α / r with r = hada_w1_b's rank; α missing or 0 -> r (LyCORIS `LohaModule`).
        let names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
        let mut f = Vec::new();
        for name in names {
            f.push(
                factor(name)?.ok_or_else(|| format!("{module}: LoHa needs {}; {name} is missing", names.join(", ")))?,
            );
        }
        let r = f[1].shape().first().copied().unwrap_or(0) as f64;
        let ratio = match alpha {
            Some(a) if a != 0.0 && r > 0.0 => a / r,
            _ => 1.0,
        };
        let [a1, b1, a2, b2]: [Tensor; 4] = f.try_into().map_err(|_| format!("{module}: LoHa factors"))?;
        (Some(Delta::Hadamard([(a1, b1), (a2, b2)])), ratio)
    } else if kinds[2] {
        // LoKr: α / r only when a factor is a product, r from w2_b else w1_b (diffusers
        // `_bake_lokr_alpha_`, LyCORIS `LokrModule`); both full -> 1.
        let w = |full: &'static str,
                 a: &'static str,
                 b: &'static str|
         -> std::result::Result<(Factor, Option<usize>), String> {
            match (factor(full)?, factor(a)?, factor(b)?) {
                (Some(t), None, None) => Ok((Factor::Full(t), None)),
                (None, Some(a), Some(b)) => {
                    let r = b.shape().first().copied();
                    Ok((Factor::Product(a, b), r))
                }
                _ => Err(format!("{module}: LoKr needs {full}, or {a} and {b}, not both or neither")),
            }
        };
        let ((w1, r1), (w2, r2)) = (w("lokr_w1", "lokr_w1_a", "lokr_w1_b")?, w("lokr_w2", "lokr_w2_a", "lokr_w2_b")?);
        let ratio = match (r2.or(r1), alpha) {
            (Some(r), Some(a)) if r > 0 => a / r as f64,
            _ => 1.0,
        };
        for f in [&w1, &w2] {
            let ok = match f {
                Factor::Full(t) => matches!(t.shape().len(), 2 | 4) && t.numel() > 0,
                Factor::Product(a, b) => matches!((a.shape(), b.shape()), ([_, r], [r2, _]) if r == r2 && *r > 0),
            };
            if !ok {
                return Err(format!("{module}: LoKr factor {f:?} is not a matrix (or a product of two of one rank)"));
            }
        }
        (Some(Delta::Kronecker(w1, w2)), ratio)
    } else {
        // Full: the tensors are the deltas; an alpha has no meaning here.
        if alpha.is_some() {
            return Err(format!("{}: a full diff module takes no alpha", key(&Param::Alpha)));
        }
        (factor("diff")?.map(Delta::Full), 1.0)
    };
    let kohya = module.starts_with("lora_");
    let dora = dora(module, key(&Param::Magnitude), tensor(&Param::Magnitude)?, target, strength, metadata, kinds[3])?;
    // A `dora_scale` module's strength blends its change (`Dora::blend`); a PEFT one's scales ΔW.
    let scale = if dora.is_some() && kohya { ratio } else { strength * ratio };
    let mut out = Vec::new();
    if let Some(delta) = delta {
        if let Err(why) = delta.check(&target.shape) {
            let keys: Vec<String> =
                params.values().map(|k| format!("{k} {:?}", file.shape(k).unwrap_or_default())).collect();
            return Err(format!(
                "{module} ({}) {why}, but {} '{}' is {:?}",
                keys.join(", "),
                target.component.name(),
                target.tensor,
                target.shape
            ));
        }
        out.push((target.tensor.clone(), Scaled { scale, delta, source: source.clone(), dora }));
    }
    if let Some(diff_b) = factor("diff_b")? {
        let Some((bias, shape)) = &target.bias else {
            return Err(format!("{}: '{}' has no bias", key(&Param::Factor("diff_b")), target.tensor));
        };
        if diff_b.shape() != shape.as_slice() {
            return Err(format!(
                "{} is {:?}, but {} '{bias}' is {shape:?}",
                key(&Param::Factor("diff_b")),
                diff_b.shape(),
                target.component.name()
            ));
        }
        out.push((bias.clone(), Scaled { scale: strength, delta: Delta::Full(diff_b), source, dora: None }));
    }
    Ok(out)
}

/// A module's DoRA decomposition, if it has one (module doc): a kohya / LyCORIS `dora_scale`, whose
/// shape gives the norm's axis, or a PEFT `lora_magnitude_vector` (per output row). Err names the
/// key and the shapes.
fn dora(
    module: &str,
    key: &str,
    magnitude: Option<Tensor>,
    target: &Target,
    strength: f64,
    metadata: &PeftMetadata,
    full: bool,
) -> std::result::Result<Option<Dora>, String> {
    let kohya = module.starts_with("lora_");
    let use_dora = !kohya && metadata.for_component(target.component).is_some_and(|m| m.use_dora);
    let Some(m) = magnitude else {
        return match use_dora {
            true => Err(format!(
                "{module}: the file's lora_adapter_metadata sets use_dora, but the module has no lora_magnitude_vector"
            )),
            false => Ok(None),
        };
    };
    let shape = target.shape.as_slice();
    let (out, inner) = match shape {
        [out, inner, ..] => (*out, *inner),
        _ => return Err(format!("{key}: DoRA on the {shape:?} weight '{}', which is not a matrix", target.tensor)),
    };
    if full {
        return Err(format!("{key}: a DoRA magnitude on a full diff module, which no format defines"));
    }
    let what = format!("{} '{}' {shape:?}", target.component.name(), target.tensor);
    let ones = |s: &[usize]| s.iter().all(|d| *d == 1);
    if kohya {
        // LyCORIS `lycoris/modules/locon.py` stores [out, 1, ...] (wd_on_out) or [1, in, ...].
        let axis = match m.shape() {
            s if s.len() == shape.len() && s[0] == out && ones(&s[1..]) => DoraAxis::Output,
            s if s.len() == shape.len() && s[0] == 1 && s[1] == inner && ones(&s[2..]) => DoraAxis::Input,
            s => {
                return Err(format!(
                    "{key} is {s:?}; a dora_scale for {what} is [{out}, 1, ...] (a norm per output row) or [1, {inner}, \
                     ...] (per input column)"
                ));
            }
        };
        // LyCORIS `functional/general.py` `_weight_decompose`: + finfo(float32).eps.
        return Ok(Some(Dora { magnitude: m, axis, eps: f64::from(f32::EPSILON), blend: strength }));
    }
    // PEFT `tuners/lora/dora.py`: [out] on a Linear, [1, out, 1, 1] on a convolution.
    let fits = match m.shape() {
        [n] => *n == out && shape.len() == 2,
        [1, n, rest @ ..] => *n == out && shape.len() > 2 && rest.len() == shape.len() - 2 && ones(rest),
        _ => false,
    };
    if !fits {
        return Err(format!(
            "{key} is {:?}; a lora_magnitude_vector for {what} is [{out}] on a Linear or [1, {out}, 1, 1] on a \
             convolution",
            m.shape()
        ));
    }
    Ok(Some(Dora { magnitude: m, axis: DoraAxis::Output, eps: 0.0, blend: 1.0 }))
}

/// LoRA factors checked among themselves: down [r, in(, kh, kw)], up [out, r(, 1, 1)], and a Tucker
/// core [r, r, kh, kw] with a 1x1 down.
fn low_rank(down: Tensor, up: Tensor, mid: Option<Tensor>, params: &Params) -> std::result::Result<LowRank, String> {
    let key = |p: &Param| params.get(p).map_or("", String::as_str);
    let (down_key, up_key) = (key(&Param::Down), key(&Param::Up));
    let rank = down.shape().first().copied().unwrap_or(0);
    let down_ok = matches!(down.shape().len(), 2 | 4) && rank > 0;
    let up_ok = match up.shape() {
        [_, r] | [_, r, 1, 1] => *r == rank,
        _ => false,
    };
    if !down_ok || !up_ok {
        return Err(format!(
            "{down_key} {:?} and {up_key} {:?} are not [rank, in(, kh, kw)] and [out, rank(, 1, 1)] of one rank",
            down.shape(),
            up.shape()
        ));
    }
    if let Some(mid) = &mid {
        let fits = matches!(mid.shape(), [a, b, _, _] if *a == rank && *b == rank)
            && matches!(down.shape(), [_, _] | [_, _, 1, 1]);
        if !fits {
            return Err(format!(
                "{} {:?} with {down_key} {:?}: a Tucker core is [rank, rank, kh, kw] with a 1x1 down of rank {rank}",
                key(&Param::Mid),
                mid.shape(),
                down.shape()
            ));
        }
    }
    Ok(LowRank { down, up, mid })
}

/// A one-element tensor's finite value.
fn scalar(file: &TensorFile, key: &str) -> std::result::Result<f64, String> {
    let t = file.float(key).map_err(|e| e.to_string())?;
    match t.to_f32_vec().map_err(|e| e.to_string())?.as_slice() {
        [v] if v.is_finite() => Ok(f64::from(*v)),
        values => Err(format!("{key} must hold one finite number; it holds {values:?} (shape {:?})", t.shape())),
    }
}

/// The PEFT LoraConfig fields diffusers writes per component into `lora_adapter_metadata`.
#[derive(Default)]
struct PeftConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
    use_dora: bool,
}

impl PeftConfig {
    /// The alpha_pattern entry matching `path` (whole, or its end after a `.`), else lora_alpha.
    fn alpha(&self, path: &str) -> Option<f64> {
        let matches = |p: &str| match p.strip_prefix('^') {
            Some(anchored) => path == anchored,
            None => path == p || path.ends_with(&format!(".{p}")),
        };
        self.alpha_pattern.iter().find(|(p, _)| matches(p)).map(|(_, a)| *a).or(self.lora_alpha)
    }
}

#[derive(Default)]
struct PeftMetadata {
    by_component: HashMap<Component, PeftConfig>,
}

impl PeftMetadata {
    fn read(file: &TensorFile) -> Result<PeftMetadata> {
        let mut out = PeftMetadata::default();
        let Some(raw) = file.metadata().get("lora_adapter_metadata") else { return Ok(out) };
        let bad = |why: String| {
            Error::Input(format!("{} (LoRA file): metadata 'lora_adapter_metadata': {why}", file.path().display()))
        };
        let json: serde_json::Map<String, Value> =
            serde_json::from_str(raw).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let number = |key: &str, v: &Value| -> Result<f64> {
            v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| bad(format!("{key} is {v}, not a finite number")))
        };
        for c in Component::ALL {
            let get = |field: &str| json.get(&format!("{}.{field}", c.prefix()));
            let mut config = PeftConfig::default();
            let mut any = false;
            if let Some(v) = get("lora_alpha") {
                config.lora_alpha = Some(number("lora_alpha", v)?);
                any = true;
            }
            if let Some(Value::Object(patterns)) = get("alpha_pattern") {
                for (p, v) in patterns {
                    config.alpha_pattern.push((p.clone(), number(&format!("alpha_pattern.{p}"), v)?));
                }
                any = true;
            }
            config.use_rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
            config.use_dora = get("use_dora").and_then(Value::as_bool).unwrap_or(false);
            if any || config.use_rslora || config.use_dora {
                out.by_component.insert(c, config);
            }
        }
        Ok(out)
    }

    fn for_component(&self, c: Component) -> Option<&PeftConfig> {
        self.by_component.get(&c)
    }
}
