//! One safetensors file: memory-mapped, its header checked, its tensors handed out as views of the
//! map (no copy).
//!
//! The header is decoded here with the crate's own `TensorInfo` and `Dtype` rather than by
//! `SafeTensors::read_metadata`, because that function names no tensor when a byte count or dtype
//! is wrong, and adds the declared data size to the header size unchecked (an absurd header
//! panics in debug builds). The rules are the format's: offsets start at 0, leave no hole, do not
//! overlap, and end exactly at the end of the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::tensor::{DType, HostBytes, Storage, Tensor};

/// Bytes of the little-endian u64 that gives the header's length.
const LEN_BYTES: usize = 8;

/// A tensor as one file declares it.
pub(super) struct FileTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// None when the dtype is not one the engine computes in; kept so that the error can name
    /// it, or an ignored prefix can skip it.
    pub tensor: Option<Tensor>,
}

/// Maps `path` and returns its tensors in file order. Errors name the file, and the tensor when
/// one is at fault.
pub(super) fn read(path: &Path) -> Result<Vec<FileTensor>> {
    let bad = |why: String| Error::Input(format!("weights file {}: {why}", path.display()));
    let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    // SAFETY: the map is only read. As with any map, the file must not be truncated or rewritten
    // while it is mapped; checkpoints are written once and then only read.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| bad(format!("cannot map: {e}")))?);

    let file_len = map.len();
    let Some(len_bytes) = map.get(..LEN_BYTES).and_then(|b| <[u8; LEN_BYTES]>::try_from(b).ok()) else {
        return Err(bad(format!("only {file_len} bytes, too short for the 8-byte header length (truncated file?)")));
    };
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(LEN_BYTES))
        .filter(|&end| end <= file_len)
        .ok_or_else(|| {
            bad(format!(
                "the header length says {header_len} bytes but only {} follow it \
                 (truncated file, or not a safetensors file)",
                file_len - LEN_BYTES
            ))
        })?;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&map[LEN_BYTES..data_start])
        .map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;

    let mut infos = Vec::with_capacity(header.len());
    for (name, value) in header {
        // Free-form string metadata, not a tensor.
        if name == "__metadata__" {
            continue;
        }
        let info =
            TensorInfo::deserialize(value).map_err(|e| bad(format!("tensor '{name}' has an invalid entry: {e}")))?;
        infos.push((name, info));
    }
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
        let tensor = match engine_dtype(info.dtype) {
            Some(dtype) => {
                let bytes = HostBytes::Mapped { map: map.clone(), start: data_start + start, len: end - start };
                let t = Tensor::from_storage(&info.shape, dtype, Storage::Host(bytes))
                    .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
                Some(t)
            }
            None => None,
        };
        tensors.push(FileTensor { name, dtype: info.dtype, shape: info.shape, tensor });
    }
    if covered != data_len {
        return Err(bad(format!(
            "the tensors cover {covered} bytes of data but the file holds {data_len} after the header"
        )));
    }
    Ok(tensors)
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
