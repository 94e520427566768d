//! Typed access to the fields of one config.json (diffusers or transformers), with errors that
//! name the file and the field. Shared by the UNet, VAE and CLIP config parsers.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

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
        let found = self.map.get(field).map_or("nothing".to_string(), |v| v.to_string());
        Error::Input(format!("{}: field '{field}' must be {expected}, found {found}", self.file))
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

pub(crate) fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}
