//! Writing files so that a reader never sees half of one: write under a temporary name in the same
//! folder (same file system, so the rename is atomic, POSIX rename(2)), flush to disk, rename.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// `Error::Io` with a context naming what was being done to which path.
pub(crate) fn io_error(what: &str, path: &Path) -> impl Fn(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |source| Error::Io { context: context.clone(), source }
}

/// A temporary name beside `path`: hidden (leading dot), unique per process and call, ending in
/// `.tmp` so [`sweep_temporaries`] recognises it after an interrupted run.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

/// Writes `path` through `write` under a temporary name, syncs it and renames it into place. An
/// existing regular file at `path` is replaced; a folder, link or device there is refused. On any
/// error the temporary file is removed.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    crate::weights::check_save_path(path)?;
    let temp = temp_path(path);
    let io = io_error("writing", path);
    // create_new: never through a link or onto a file someone else placed at the temporary name.
    let file = OpenOptions::new().write(true).create_new(true).open(&temp).map_err(&io)?;
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        write(&mut out)?;
        out.flush()?;
        drop(out);
        // On disk before the rename, so a crash cannot leave the real name with missing data.
        file.sync_all()?;
        fs::rename(&temp, path)
    })()
    .map_err(io);
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Writes `bytes` to `path` atomically (temporary name, sync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |out| out.write_all(bytes))
}

/// Makes renames inside `dir` durable (fsync of the folder, as POSIX requires for the entry).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("syncing folder", dir))
}

/// Removes the temporaries an interrupted run left in `dir` (hidden names ending in `.tmp`).
pub(crate) fn sweep_temporaries(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("listing", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error("listing", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") && entry.file_type().is_ok_and(|t| t.is_file()) {
            fs::remove_file(entry.path()).map_err(io_error("removing leftover", &entry.path()))?;
        }
    }
    Ok(())
}
