//! TMA tensor maps (cuda.h's CUtensorMap) for the Hopper kernels' cp.async.bulk.tensor loads: a
//! tiled view of a 16-bit activation or weight tensor in global memory, read in boxes that land in
//! shared memory with the 128-byte swizzle the kernels' wgmma descriptors declare.

use super::params::TensorMap;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Encodes a map over `dims` (innermost first; the innermost is contiguous) with `strides` in
/// elements for dims 1.. (the rank - 1 outer strides), read in boxes of `boxes` elements. The
/// innermost box must span 128 bytes (one swizzle atom). Boxes past the tensor's end read as zeros.
/// `what` names the kernel and operand in errors.
pub fn tensor_map(
    what: &str,
    ptr: u64,
    dtype: DType,
    dims: &[u64],
    strides: &[i64],
    boxes: &[u32],
) -> Result<TensorMap> {
    use cudarc::driver::sys;
    let rank = dims.len();
    assert!(rank >= 1 && strides.len() + 1 == rank && boxes.len() == rank, "tensor_map: rank mismatch");
    let data_type = match dtype {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        other => {
            return Err(Error::Unsupported(format!("{what}: TMA maps of {other:?} are not built (f16 / bf16 only)")));
        }
    };
    let es = dtype.size() as u64;
    // cuTensorMapEncodeTiled: a 16-byte aligned base; strides multiples of 16 bytes below 2^40.
    let byte_strides: Vec<u64> = strides.iter().map(|&s| s.max(0) as u64 * es).collect();
    if !ptr.is_multiple_of(16)
        || strides.iter().any(|&s| s < 0)
        || byte_strides.iter().any(|s| !s.is_multiple_of(16) || *s >= 1 << 40)
    {
        return Err(Error::Unsupported(format!(
            "{what}: the TMA load needs a 16-byte aligned base and strides that are multiples of 16 bytes (base \
             {ptr:#x}, strides {strides:?} elements of {dtype:?})"
        )));
    }
    let element_strides = vec![1u32; rank];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: dims, boxes and element_strides hold `rank` entries, byte_strides rank - 1; `map` is
    // written only.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            rank as u32,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            byte_strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|e| Error::Cuda(format!("cuTensorMapEncodeTiled for {what} failed: {e:?}")))?;
    Ok(TensorMap { opaque: map.opaque })
}
