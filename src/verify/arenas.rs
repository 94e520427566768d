//! Device memory for running one model on CUDA, shared by `verify` and `bench`: a weights arena
//! sized from the checkpoint and a scratch arena.

use crate::error::{Error, Result};
use crate::gpu::{Arena, Gpu};
use crate::tensor::DType;
use crate::weights::LoadedWeights;

/// Device bytes a checkpoint's tensors take in `dtype` (256 bytes of alignment slack each).
pub(crate) fn weight_bytes(weights: &LoadedWeights, dtype: DType) -> usize {
    weights.iter().map(|(_, t)| t.numel() * dtype.size() + 256).sum()
}

/// Largest `--scratch-gb`: more than any GPU holds, small enough that its byte count is exact.
pub const MAX_SCRATCH_GB: f64 = 4096.0;

const GIB: f64 = (1u64 << 30) as f64;

/// `--scratch-gb` (checked to be in (0, MAX_SCRATCH_GB] by the command) as bytes, refused when
/// the device holds less.
pub(crate) fn scratch_bytes(gpu: &Gpu, gb: f64) -> Result<usize> {
    let total = gpu.info().total_memory;
    if gb * GIB > total as f64 {
        return Err(Error::Input(format!(
            "--scratch-gb {gb}: more than the {:.2} GiB the device holds",
            total as f64 / GIB
        )));
    }
    Ok((gb * GIB) as usize)
}

/// The "weights" arena (the checkpoint in `dtype` plus `extra` bytes, for inputs uploaded beside
/// it) and the "scratch" arena (`scratch_bytes` of the weights' byte count), created in that order.
pub(crate) fn model_arenas(
    weights: &LoadedWeights,
    dtype: DType,
    extra: usize,
    scratch_bytes: impl FnOnce(usize) -> usize,
) -> Result<(Arena, Arena)> {
    let bytes = weight_bytes(weights, dtype);
    let weights = Arena::new("weights", bytes + extra)?;
    let scratch = Arena::new("scratch", scratch_bytes(bytes))?;
    Ok((weights, scratch))
}

/// verify's default scratch: three quarters of the device memory less the weights, at least 1 GiB.
pub(crate) fn most_of_memory(gpu: &Gpu, weight_bytes: usize) -> usize {
    (gpu.info().total_memory / 4 * 3).saturating_sub(weight_bytes).max(1 << 30)
}
