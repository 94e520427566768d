//! Writing safetensors files (test fixtures, `celframe verify --save`). The file is written under
//! a new temporary name in the destination folder and renamed into place, so a failed or
//! interrupted run leaves no half-written file under the real name. An existing destination is
//! replaced only if it is a regular file: a symbolic link, a device or a folder is refused.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use safetensors::{Dtype, View};

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
    check_save_path(path)?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| bad(e.to_string()))?;
    let temp = path.with_file_name(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
    let io = |e: std::io::Error| Error::Io { context: format!("writing {}", path.display()), source: e };
    // create_new: never through a link or onto a file someone else placed at the temporary name.
    let mut file = OpenOptions::new().write(true).create_new(true).open(&temp).map_err(io)?;
    let written = file
        .write_all(&bytes)
        // On disk before the rename, so a crash cannot leave the real name with missing data.
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temp, path))
        .map_err(io);
    if written.is_err() {
        // Best effort: the write or the rename failed, the temporary must not stay.
        let _ = fs::remove_file(&temp);
    }
    written
}

/// Refuses a destination `save` would not replace: an existing symbolic link, device, FIFO,
/// socket or folder. Replacing one by renaming over it would destroy what the user pointed at.
pub fn check_save_path(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => Err(Error::Input(format!(
            "cannot save {}: it exists and is not a regular file ({}); give a new path or a regular file to \
             replace",
            path.display(),
            kind_of(meta.file_type())
        ))),
        _ => Ok(()),
    }
}

fn kind_of(t: fs::FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a folder"
    } else {
        "a device, FIFO or socket"
    }
}

fn file_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
    }
}
