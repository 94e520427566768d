//! One safetensors file: memory-mapped, its header checked, its tensors handed out as views of the
//! map (no copy).
//!
//! The header is decoded here with the crate's own `TensorInfo` and `Dtype` rather than by
//! `SafeTensors::read_metadata`, because that function names no tensor when a byte count or dtype
//! is wrong, and adds the declared data size to the header size unchecked (an absurd header
//! panics in debug builds). The rules are the format's: offsets start at 0, leave no hole, do not
//! overlap, and end exactly at the end of the file. Every safetensors file the crate reads (a
//! checkpoint, a shard, a reference file) comes through here, under the same header limits.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::error::{Error, Result};
use crate::tensor::{DType, HostBytes, Storage, Tensor};

/// Bytes of the little-endian u64 that gives the header's length.
const LEN_BYTES: usize = 8;

/// Longest header read, in bytes: the safetensors crate's own limit (`MAX_HEADER_SIZE`,
/// safetensors/src/tensor.rs), so every file its writers make is accepted.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Most tensors one file may declare, checked while the header is parsed so that a header of
/// millions of tiny entries is refused before it costs gigabytes. An SDXL single-file checkpoint
/// holds about 2,600 tensors, a large LoRA file a few thousand.
pub const MAX_TENSORS: usize = 100_000;

/// A tensor as one file declares it.
pub(super) struct FileTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The tensor's bytes, a view of the map.
    pub bytes: HostBytes,
    /// None when the dtype is not one the engine computes in; kept so that the error can name
    /// it, or an ignored prefix can skip it.
    pub tensor: Option<Tensor>,
}

/// A file's tensors in file order and its `__metadata__` (empty when it has none).
pub(super) struct FileContents {
    pub tensors: Vec<FileTensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Maps `path` (a regular file; `what` says what it is for, "weights file") and returns its
/// contents. Errors name the file, and the tensor when one is at fault.
pub(super) fn read(path: &Path, what: &str) -> Result<FileContents> {
    let bad = |why: String| Error::Input(format!("{} ({what}): {why}", path.display()));
    let file = crate::io::open_regular(path, what)?;
    // SAFETY: the map is only read. As with any map, the file must not be truncated or rewritten
    // while it is mapped; checkpoints are written once and then only read.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| bad(format!("cannot map: {e}")))?);

    let file_len = map.len();
    let Some(len_bytes) = map.get(..LEN_BYTES).and_then(|b| <[u8; LEN_BYTES]>::try_from(b).ok()) else {
        return Err(bad(format!("only {file_len} bytes, too short for the 8-byte header length (truncated file?)")));
    };
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "the header length says {header_len} bytes, more than the {MAX_HEADER_BYTES}-byte limit for a \
             safetensors header (not a safetensors file?)"
        )));
    }
    // At most MAX_HEADER_BYTES, so the sum cannot overflow.
    let data_start = header_len as usize + LEN_BYTES;
    if data_start > file_len {
        return Err(bad(format!(
            "the header length says {header_len} bytes but only {} follow it (truncated file, or not a \
             safetensors file)",
            file_len - LEN_BYTES
        )));
    }
    let header: Header = serde_json::from_slice(&map[LEN_BYTES..data_start]).map_err(|e| {
        if e.is_data() {
            bad(format!("invalid header: {e}"))
        } else {
            bad(format!("the header is not a JSON object: {e}"))
        }
    })?;

    let mut infos = header.tensors;
    infos.sort_by_key(|(_, info)| info.data_offsets);
    let data_len = file_len - data_start;
    let mut covered = 0;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let (start, end) = info.data_offsets;
        let what = format!("tensor '{name}' ({} {:?}, data_offsets [{start}, {end}])", info.dtype, info.shape);
        if end < start {
            return Err(bad(format!("{what} ends before it starts")));
        }
        if end > data_len {
            return Err(bad(format!("{what} ends past the {data_len} bytes of data (truncated file?)")));
        }
        if start != covered {
            return Err(bad(format!("{what} should start at byte {covered}: the offsets overlap or leave a hole")));
        }
        match byte_count(info.dtype, &info.shape) {
            Some(needed) if needed == end - start => {}
            Some(needed) => {
                return Err(bad(format!("{what} holds {} bytes but its dtype and shape need {needed}", end - start)));
            }
            None => {
                return Err(bad(format!("{what}: the shape's size overflows or is not a whole number of bytes")));
            }
        }
        covered = end;
        let bytes = HostBytes::Mapped { map: map.clone(), start: data_start + start, len: end - start };
        let tensor = match engine_dtype(info.dtype) {
            Some(dtype) => Some(
                Tensor::from_storage(&info.shape, dtype, Storage::Host(bytes.clone()))
                    .map_err(|e| bad(format!("tensor '{name}': {e}")))?,
            ),
            None => None,
        };
        tensors.push(FileTensor { name, dtype: info.dtype, shape: info.shape, bytes, tensor });
    }
    if covered != data_len {
        return Err(bad(format!(
            "the tensors cover {covered} bytes of data but the file holds {data_len} after the header"
        )));
    }
    Ok(FileContents { tensors, metadata: header.metadata })
}

/// A header as the format defines it: a JSON object of tensor entries, plus an optional
/// `__metadata__` object of strings (safetensors' README, "Format").
struct Header {
    tensors: Vec<(String, TensorInfo)>,
    metadata: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Header, D::Error> {
        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// Reads the header's entries one at a time, so that the tensor count is checked as they come.
struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> std::result::Result<Header, A::Error> {
        let mut header = Header { tensors: Vec::new(), metadata: BTreeMap::new() };
        let mut names = HashSet::new();
        while let Some(name) = entries.next_key::<String>()? {
            if name == "__metadata__" {
                header.metadata = entries
                    .next_value()
                    .map_err(|e| de::Error::custom(format!("__metadata__ must map names to strings ({e})")))?;
                continue;
            }
            if header.tensors.len() == MAX_TENSORS {
                return Err(de::Error::custom(format!(
                    "it declares more than {MAX_TENSORS} tensors, the most a file may hold here (and at most \
                     {MAX_HEADER_BYTES} header bytes)"
                )));
            }
            // Through a JSON value, so that the error names the tensor without a second position.
            let value: serde_json::Value = entries.next_value()?;
            let info = TensorInfo::deserialize(value)
                .map_err(|e| de::Error::custom(format!("tensor '{name}' has an invalid entry: {e}")))?;
            if !names.insert(name.clone()) {
                return Err(de::Error::custom(format!("tensor '{name}' is declared twice")));
            }
            header.tensors.push((name, info));
        }
        Ok(header)
    }
}

/// Bytes a tensor of this dtype and shape occupies; None if that overflows or is not whole bytes.
fn byte_count(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let bits = shape.iter().try_fold(dtype.bitsize(), |acc, &d| acc.checked_mul(d))?;
    (bits % 8 == 0).then_some(bits / 8)
}

fn engine_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F32 => Some(DType::F32),
        _ => None,
    }
}
