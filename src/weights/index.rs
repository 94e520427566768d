//! Sharded checkpoints' `*.safetensors.index.json`: its "weight_map" names, for every tensor, the
//! file (relative to the index's folder) that holds it. Only the set of files is used; the tensors
//! themselves are then read from those files and checked like any others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::{JSON_LIMIT, read_regular};

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// True for a path that names an index rather than a safetensors file.
pub(super) fn is_index(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".json")
}

/// The files an index names, in sorted order, as paths next to the index.
pub(super) fn files(index: &Path) -> Result<Vec<PathBuf>> {
    let bad = |why: String| Error::Input(format!("{} (weights index): {why}", index.display()));
    let text = read_regular(index, JSON_LIMIT, "weights index")?;
    let parsed: Index = serde_json::from_slice(&text).map_err(|e| {
        bad(format!(
            "not a safetensors index (a JSON object whose \"weight_map\" maps tensor names to \
             file names): {e}"
        ))
    })?;
    let names: BTreeSet<&String> = parsed.weight_map.values().collect();
    if names.is_empty() {
        return Err(bad("the weight_map names no file".into()));
    }
    let folder = index.parent().unwrap_or(Path::new(""));
    Ok(names.into_iter().map(|name| folder.join(name)).collect())
}
