//! Writing safetensors files (test fixtures, `celframe verify --save`). The file is written under
//! a temporary name in the destination folder and renamed into place, so a failed or interrupted
//! run leaves no half-written file under the real name.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::Path;

use safetensors::{Dtype, SafeTensorError, View};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Host bytes as the safetensors writer wants them.
struct HostView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl View for HostView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes host tensors to `path` under the given names, with optional string metadata
/// (`__metadata__`). Device tensors are refused: download them first.
pub fn save(path: &Path, tensors: &[(String, &Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let bad = |why: String| Error::Input(format!("cannot save {}: {why}", path.display()));
    let mut names = HashSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !names.insert(name.as_str()) {
            return Err(bad(format!("the name '{name}' is given twice")));
        }
        let bytes =
            tensor.host_bytes().map_err(|_| bad(format!("tensor '{name}' is on the device; download it first")))?;
        let view = HostView { dtype: file_dtype(tensor.dtype()), shape: tensor.shape(), bytes };
        views.push((name.as_str(), view));
    }
    let Some(file_name) = path.file_name() else {
        return Err(bad("the path names no file".into()));
    };
    let temp = path.with_file_name(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
    let io = |e: std::io::Error| Error::Io { context: format!("writing {}", path.display()), source: e };
    let written = safetensors::serialize_to_file(views, metadata, &temp)
        .map_err(|e| match e {
            SafeTensorError::IoError(e) => io(e),
            other => bad(other.to_string()),
        })
        // On disk before the rename, so a crash cannot leave the real name with missing data.
        .and_then(|()| File::open(&temp).and_then(|f| f.sync_all()).map_err(io))
        .and_then(|()| fs::rename(&temp, path).map_err(io));
    if written.is_err() {
        // Best effort: the temporary may not even exist if creating it failed.
        let _ = fs::remove_file(&temp);
    }
    written
}

fn file_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
    }
}
