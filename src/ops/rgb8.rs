//! Decoded images to 8-bit pixels, the way diffusers' image processor makes PIL images from the
//! VAE's output (`VaeImageProcessor.postprocess`: `(x / 2 + 0.5).clamp(0, 1)`, then
//! `(x * 255).round()` as uint8), computed in fp32 from the stored values; halves round away from
//! zero. On CUDA the frames leave the device as bytes, a quarter of their f32 size, and the host
//! only encodes them.

use super::{Exec, grid_for};
use crate::error::{Error, Result};
use crate::gpu::params::Rgb8Params;
use crate::tensor::Tensor;

/// 8-bit pixels and how many input values were not finite (those pixels are 0).
pub struct Rgb8 {
    pub bytes: Vec<u8>,
    pub non_finite: u64,
}

/// One value in [-1, 1] -> one 8-bit pixel value (None when it is not finite).
pub fn unit_to_u8(v: f32) -> Option<u8> {
    v.is_finite().then(|| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
}

/// `images` (any shape, values in [-1, 1]) -> their 8-bit pixels in the same order.
pub fn to_rgb8(ex: &Exec, images: &Tensor) -> Result<Rgb8> {
    ex.expect_inputs("to_rgb8", &[images])?;
    match ex {
        Exec::Cpu => {
            let values = images.to_f32_vec()?;
            let mut non_finite = 0;
            let bytes = values
                .iter()
                .map(|&v| {
                    unit_to_u8(v).unwrap_or_else(|| {
                        non_finite += 1;
                        0
                    })
                })
                .collect();
            Ok(Rgb8 { bytes, non_finite })
        }
        Exec::Cuda { gpu, scratch } => {
            let count = images.numel();
            let out = gpu.empty_bytes(scratch, count.max(1))?;
            let counter = scratch.alloc(8)?;
            gpu.fill_bytes(&counter, 0)?;
            let p = Rgb8Params {
                x: images.device_ptr()? as *const _,
                out: out.ptr()? as *mut _,
                non_finite: counter.ptr()? as *mut _,
                count: count as i64,
            };
            // A grid-stride loop: enough blocks to fill the device, not one per 256 values.
            gpu.launch(
                kernel_for!("to_rgb8", images.dtype()),
                (grid_for(count, 256).min(4096), 1, 1),
                (256, 1, 1),
                0,
                &p,
            )?;
            let mut bytes = gpu.download_bytes(&out)?;
            bytes.truncate(count);
            let n = gpu.download_bytes(&counter)?;
            let non_finite = u64::from_le_bytes(
                n.try_into().map_err(|_| Error::Internal("to_rgb8: the counter is not 8 bytes".into()))?,
            );
            Ok(Rgb8 { bytes, non_finite })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn pixels_follow_diffusers_postprocess() {
        // -1 -> 0, 1 -> 255, 0 -> 127.5 rounds up to 128, clamped outside [-1, 1], NaN counted.
        let x = Tensor::from_f32(&[6], DType::F32, &[-1.0, 1.0, 0.0, -3.0, 2.0, f32::NAN]).unwrap();
        let r = to_rgb8(&Exec::Cpu, &x).unwrap();
        assert_eq!(r.bytes, [0, 255, 128, 0, 255, 0]);
        assert_eq!(r.non_finite, 1);
    }
}
