//! Opening the user's files: regular files only, read up to a stated size. A FIFO given as a
//! config or reference would block `open` forever, and `/dev/zero` would be read until memory runs
//! out; both are refused by name before anything is read.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest JSON file (config.json, a shard index, a tokenizer's vocab.json) read into memory.
pub const JSON_LIMIT: u64 = 64 << 20;

/// Opens `path` for reading if it is a regular file (symbolic links followed). `what` says what the
/// file is for in errors ("UNet config", "reference file").
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::Input(format!("{} ({what}): cannot read: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::Input(format!(
            "{} ({what}): not a regular file ({}); give a file",
            path.display(),
            kind_of(&meta)
        )));
    }
    File::open(path).map_err(|e| Error::Input(format!("{} ({what}): cannot open: {e}", path.display())))
}

/// The whole of a regular file of at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = open_regular(path, what)?;
    let too_large = |n: u64| {
        Error::Input(format!(
            "{} ({what}): {n} bytes, more than the {limit}-byte limit for such a file",
            path.display()
        ))
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > limit {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Input(format!("{} ({what}): cannot read: {e}", path.display())))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A regular UTF-8 text file of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64, what: &str) -> Result<String> {
    String::from_utf8(read_regular(path, limit, what)?)
        .map_err(|e| Error::Input(format!("{} ({what}): not UTF-8 text: {e}", path.display())))
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}
