//! Typed access to the fields of one config.json (diffusers or transformers), with errors that
//! name the file and the field. Shared by the UNet, VAE and CLIP config parsers. `Limits` bounds
//! the counts and widths a config may ask for, so that nothing is sized from an absurd value.

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::weights::LoadedWeights;

/// Most levels (down / up blocks) a config may list.
pub const MAX_LEVELS: usize = 64;
/// Most layers a block may have, and most transformer blocks a Transformer2DModel may stack.
pub const MAX_LAYERS: usize = 1024;
/// Widest channel count, head count or other width a config may give.
pub const MAX_WIDTH: usize = 1 << 20;

/// What a config field counts, for its limits.
#[derive(Clone, Copy, Debug)]
pub enum Bound {
    /// Levels: at most `MAX_LEVELS`, and no more than the checkpoint's tensors.
    Levels,
    /// Layers or stacked blocks: at most `MAX_LAYERS`, and no more than the checkpoint's tensors.
    Layers,
    /// A width: at most `MAX_WIDTH`, and no more than the checkpoint's largest dimension.
    Width,
}

/// Caps on a config's counts and widths: the engine's fixed ones, lowered to what the checkpoint
/// beside the config can hold (read from its header before anything is sized from the config).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Tensors in the checkpoint: every count of levels, layers or blocks is at most this.
    pub tensors: usize,
    /// The largest dimension of any tensor in the checkpoint: every width is at most this.
    pub width: usize,
    /// The checkpoint's files, for errors (empty for `engine()`).
    pub source: String,
}

impl Limits {
    /// Only the engine's fixed caps: for a config read without its checkpoint.
    pub fn engine() -> Limits {
        Limits { tensors: usize::MAX, width: usize::MAX, source: String::new() }
    }

    /// The caps a checkpoint sets: its tensor count and its largest dimension (header only: the
    /// tensors are mapped, not read).
    pub fn of(weights: &LoadedWeights) -> Limits {
        let width = weights.iter().flat_map(|(_, t)| t.shape().iter().copied()).max().unwrap_or(0);
        let source = weights.files().iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
        Limits { tensors: weights.len(), width, source }
    }

    /// `value` of `field` in `file` if it is within the bound; otherwise an error naming the file,
    /// the field and the limit it passes.
    pub fn check(&self, file: &str, field: &str, value: usize, bound: Bound) -> Result<usize> {
        let (cap, held, noun) = match bound {
            Bound::Levels => (MAX_LEVELS, self.tensors, "levels"),
            Bound::Layers => (MAX_LAYERS, self.tensors, "layers"),
            Bound::Width => (MAX_WIDTH, self.width, "for a width"),
        };
        if value > cap {
            return Err(Error::Input(format!(
                "{file}: field '{field}' = {value} exceeds the limit this engine allows: {cap} {noun}"
            )));
        }
        if value > held {
            let what = match bound {
                Bound::Width => format!("the largest dimension of any tensor in {}, {held}", self.source),
                _ => format!("the {held} tensors in {}", self.source),
            };
            return Err(Error::Input(format!(
                "{file}: field '{field}' = {value} exceeds what the checkpoint can hold: {what}"
            )));
        }
        Ok(value)
    }

    /// Checks that the checkpoint has room for `needed` tensors, the fewest the config's blocks
    /// (counted by `fields`) have; `needed` is None when counting overflowed.
    pub fn check_total(&self, file: &str, fields: &str, needed: Option<usize>) -> Result<()> {
        match needed {
            Some(n) if n <= self.tensors => Ok(()),
            _ => Err(Error::Input(format!(
                "{file}: {fields} describe more blocks than the checkpoint can hold: they need at least {} tensors, \
                 {} holds {}",
                needed.map_or("more than usize::MAX".to_string(), |n| n.to_string()),
                self.source,
                self.tensors
            ))),
        }
    }
}

pub(crate) struct Fields<'a> {
    map: Map<String, Value>,
    file: &'a str,
}

impl<'a> Fields<'a> {
    /// Parses `text` as a JSON object; `file` names it in errors.
    pub(crate) fn parse(text: &str, file: &'a str) -> Result<Fields<'a>> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| Error::Input(format!("{file}: not valid JSON: {e}")))?;
        match value {
            Value::Object(map) => Ok(Fields { map, file }),
            _ => Err(Error::Input(format!("{file}: not a JSON object"))),
        }
    }

    pub(crate) fn bad(&self, field: &str, expected: &str) -> Error {
        let found = self.map.get(field).map_or("nothing".to_string(), |v| short(&v.to_string()));
        Error::Input(format!("{}: field '{field}' must be {expected}, found {found}", self.file))
    }

    pub(crate) fn file(&self) -> &str {
        self.file
    }

    /// The field, or None when it is absent or null (diffusers / transformers then use their default).
    pub(crate) fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// The field as written, null included (for fields where null and absent differ).
    pub(crate) fn raw(&self, field: &str) -> Option<&Value> {
        self.map.get(field)
    }

    pub(crate) fn usize(&self, field: &str, default: usize) -> Result<usize> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => as_usize(v).ok_or_else(|| self.bad(field, "a non-negative integer")),
        }
    }

    /// A count or width: `default` when absent or null, and within `limits` for its `bound`.
    pub(crate) fn bounded(&self, field: &str, default: usize, bound: Bound, limits: &Limits) -> Result<usize> {
        limits.check(self.file, field, self.usize(field, default)?, bound)
    }

    /// A field with no default: absent or null is an error.
    pub(crate) fn required_usize(&self, field: &str) -> Result<usize> {
        match self.get(field) {
            None => Err(self.bad(field, "a non-negative integer (it has no default)")),
            Some(v) => as_usize(v).ok_or_else(|| self.bad(field, "a non-negative integer")),
        }
    }

    pub(crate) fn f32(&self, field: &str, default: f32) -> Result<f32> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| self.bad(field, "a number")),
        }
    }

    pub(crate) fn bool(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(field, "true or false")),
        }
    }

    pub(crate) fn string(&self, field: &str) -> Result<Option<&str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.bad(field, "a string")),
        }
    }

    pub(crate) fn usizes(&self, field: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.get(field) {
            None => Ok(default.to_vec()),
            Some(v) => v
                .as_array()
                .and_then(|items| items.iter().map(as_usize).collect::<Option<Vec<_>>>())
                .ok_or_else(|| self.bad(field, "a list of non-negative integers")),
        }
    }

    /// A list of block names; `default` when absent or null, an error if there is none.
    pub(crate) fn strings(&self, field: &str, default: Option<&[&str]>) -> Result<Vec<String>> {
        let names = match (self.get(field), default) {
            (None, Some(d)) => return Ok(d.iter().map(|s| s.to_string()).collect()),
            (None, None) => None,
            (Some(v), _) => v
                .as_array()
                .and_then(|items| items.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>()),
        };
        names.ok_or_else(|| self.bad(field, "a list of block names"))
    }

    /// Refuses a field set to anything but what the engine implements (`accepted`, or null).
    pub(crate) fn only(&self, field: &str, accepted: &[Value], feature: &str) -> Result<()> {
        match self.get(field) {
            Some(v) if !accepted.contains(v) => Err(Error::Unsupported(format!(
                "{}: '{field}' = {v} ({feature}); this engine implements {}",
                self.file,
                if accepted.is_empty() {
                    "only null".to_string()
                } else {
                    accepted.iter().map(Value::to_string).collect::<Vec<_>>().join(" or ")
                }
            ))),
            _ => Ok(()),
        }
    }
}

/// A value's text, cut to its start when long (a list of a million entries stays one line).
fn short(text: &str) -> String {
    const KEEP: usize = 200;
    match text.char_indices().nth(KEEP) {
        Some((end, _)) => format!("{}... ({} characters)", &text[..end], text.len()),
        None => text.to_string(),
    }
}

pub(crate) fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}
