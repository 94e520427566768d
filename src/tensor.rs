//! Tensors: a shape, a dtype and bytes on the host (owned, or borrowed from a memory-mapped
//! safetensors file) or on the device. Activations are NHWC; frames fold into the batch with the
//! frame index fastest (row = video * F + frame).

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::gpu::memory::DeviceMem;
use crate::ops::par_rows;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// Suffix of kernel names instantiated for this dtype (`group_norm_f16`).
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }

    pub fn parse(name: &str) -> Result<DType> {
        match name {
            "f16" | "fp16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            _ => Err(Error::Input(format!("unknown dtype '{name}' (expected f16, bf16 or f32)"))),
        }
    }

    /// Rounds an f32 to this dtype and back, as storing and loading would.
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::BF16 => bf16::from_f32(v).to_f32(),
            DType::F32 => v,
        }
    }
}

/// Host bytes: owned, or a range of a memory-mapped file (no copy).
#[derive(Clone)]
pub enum HostBytes {
    Owned(Arc<Vec<u8>>),
    Mapped { map: Arc<Mmap>, start: usize, len: usize },
}

impl HostBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            HostBytes::Owned(v) => v,
            HostBytes::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

#[derive(Clone)]
pub enum Storage {
    Host(HostBytes),
    Device(DeviceMem),
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = if self.is_device() { "device" } else { "host" };
        write!(f, "Tensor({:?}, {:?}, {place})", self.shape, self.dtype)
    }
}

impl Tensor {
    pub fn from_storage(shape: &[usize], dtype: DType, storage: Storage) -> Result<Tensor> {
        let expected = shape.iter().product::<usize>() * dtype.size();
        let bytes = match &storage {
            Storage::Host(h) => h.as_slice().len(),
            Storage::Device(d) => d.bytes(),
        };
        if bytes != expected {
            return Err(Error::Input(format!(
                "tensor of shape {shape:?} {dtype:?} needs {expected} bytes, storage has {bytes}"
            )));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype, storage })
    }

    /// A host tensor holding `values` rounded to `dtype`.
    pub fn from_f32(shape: &[usize], dtype: DType, values: &[f32]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if values.len() != numel {
            return Err(Error::Input(format!("shape {shape:?} needs {numel} values, got {}", values.len())));
        }
        let size = dtype.size();
        let mut bytes = vec![0u8; numel * size];
        convert_chunks(values, 1, &mut bytes, size, |values, bytes| {
            let out = bytes.chunks_exact_mut(size);
            match dtype {
                DType::F16 => {
                    values.iter().zip(out).for_each(|(v, o)| o.copy_from_slice(&f16::from_f32(*v).to_le_bytes()))
                }
                DType::BF16 => {
                    values.iter().zip(out).for_each(|(v, o)| o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes()))
                }
                DType::F32 => values.iter().zip(out).for_each(|(v, o)| o.copy_from_slice(&v.to_le_bytes())),
            }
        });
        Tensor::from_storage(shape, dtype, Storage::Host(HostBytes::Owned(Arc::new(bytes))))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    pub fn is_device(&self) -> bool {
        matches!(self.storage, Storage::Device(_))
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Host bytes, or an error naming `what` if the tensor lives on the device.
    pub fn host_bytes(&self) -> Result<&[u8]> {
        match &self.storage {
            Storage::Host(h) => Ok(h.as_slice()),
            Storage::Device(_) => Err(Error::Input(format!("{self:?} is on the device; download it first"))),
        }
    }

    /// Device address, checked against arena resets.
    pub fn device_ptr(&self) -> Result<u64> {
        match &self.storage {
            Storage::Device(d) => d.ptr(),
            Storage::Host(_) => Err(Error::Input(format!("{self:?} is on the host; upload it first"))),
        }
    }

    /// Values widened to f32 (host tensors only).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let (bytes, dtype) = (self.host_bytes()?, self.dtype);
        let mut out = vec![0f32; bytes.len() / dtype.size()];
        convert_chunks(bytes, dtype.size(), &mut out, 1, |bytes, out| {
            let values = out.iter_mut();
            match dtype {
                DType::F16 => {
                    values.zip(bytes.chunks_exact(2)).for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32())
                }
                DType::BF16 => {
                    values.zip(bytes.chunks_exact(2)).for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32())
                }
                DType::F32 => values
                    .zip(bytes.chunks_exact(4))
                    .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            }
        });
        Ok(out)
    }

    /// The same storage under another shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::Input(format!("cannot reshape {:?} to {shape:?}", self.shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: self.dtype, storage: self.storage.clone() })
    }
}

/// Elements below which a conversion stays on the calling thread (thread start-up costs more).
const PARALLEL_CONVERSION: usize = 1 << 18;

/// `convert(src_chunk, dst_chunk)` over matching chunks of `src` (`src_per` items an element) and
/// `dst` (`dst_per` items an element), on all cores (`par_rows`) for large tensors: a video step
/// converts its 1.2M latents to f16 and its output back, ~1.5-2 ms each way on one core.
fn convert_chunks<S: Sync, D: Send>(
    src: &[S],
    src_per: usize,
    dst: &mut [D],
    dst_per: usize,
    convert: impl Fn(&[S], &mut [D]) + Sync,
) {
    if dst.len() / dst_per < PARALLEL_CONVERSION {
        return convert(src, dst);
    }
    par_rows(dst, dst_per, |first, dst| convert(&src[first * src_per..][..dst.len() / dst_per * src_per], dst));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_conversions_split_over_threads_give_each_values_own_bytes() {
        // Past PARALLEL_CONVERSION on any machine with two cores or more; odd length, so the last
        // chunk is short.
        let n = 3 * PARALLEL_CONVERSION + 7;
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1000.0 + i as f32 * 1e-3).collect();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let t = Tensor::from_f32(&[n], dtype, &values).unwrap();
            let want: Vec<u8> = values
                .iter()
                .flat_map(|&v| match dtype {
                    DType::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                    DType::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                    DType::F32 => v.to_le_bytes().to_vec(),
                })
                .collect();
            assert!(t.host_bytes().unwrap() == want.as_slice(), "{dtype:?} bytes");
            let back = t.to_f32_vec().unwrap();
            let want_back: Vec<f32> = want
                .chunks_exact(dtype.size())
                .map(|b| match dtype {
                    DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                    DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                })
                .collect();
            assert_eq!(back, want_back, "{dtype:?} values");
        }
    }
}
