//! Spatial mean: [B, H, W, C] -> [B, C], `torch.mean(x, dim=(2, 3))` on NCHW (the Union
//! ControlNet's condition tokens, diffusers `controlnet_union.py`). On CUDA one strided-batched
//! cuBLASLt product per call, mean_b = (1 / HW) · 1[1, HW] · x_b[HW, C], the ones row shared by
//! every image (batch stride 0): fp32 accumulation, one rounding to the output dtype.

use super::{Exec, host_out, par_rows};
use crate::error::{Error, Result};
use crate::gpu::blas::{Gemm, GemmIo};
use crate::tensor::Tensor;

/// The mean over H and W of each image and channel, in x's dtype.
pub fn mean_hw(ex: &Exec, x: &Tensor) -> Result<Tensor> {
    ex.expect_inputs("mean_hw", &[x])?;
    let &[b, h, w, c] = x.shape() else {
        return Err(Error::Input(format!("mean_hw: {x:?} must be NHWC [batch, height, width, channels]")));
    };
    let hw = h * w;
    if hw == 0 {
        return Err(Error::Input(format!("mean_hw: {x:?} has no pixels to average")));
    }
    let dtype = x.dtype();
    match ex {
        Exec::Cpu => {
            // f64 sums: the twin is the yardstick for the kernel's fp32 accumulation.
            let v = x.to_f32_vec()?;
            let mut out = vec![0f32; b * c];
            par_rows(&mut out, c, |first, chunk| {
                for (i, row) in chunk.chunks_mut(c.max(1)).enumerate() {
                    let image = &v[(first + i) * hw * c..(first + i + 1) * hw * c];
                    let mut sums = vec![0f64; c];
                    for pixel in image.chunks(c.max(1)) {
                        for (s, &p) in sums.iter_mut().zip(pixel) {
                            *s += p as f64;
                        }
                    }
                    for (o, s) in row.iter_mut().zip(sums) {
                        *o = (s / hw as f64) as f32;
                    }
                }
            });
            host_out(&[b, c], dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let ones = gpu.upload_constant(scratch, &Tensor::from_f32(&[hw], dtype, &vec![1.0; hw])?, dtype)?;
            let y = gpu.empty(scratch, &[b, c], dtype)?;
            let g = Gemm {
                m: 1,
                n: c,
                k: hw,
                batch: b,
                b_transposed: false,
                lda: hw,
                ldb: c,
                ldc: c,
                stride_a: 0,
                stride_b: hw * c,
                stride_c: c,
                dtype,
                out_dtype: dtype,
                bias: false,
                fp8: false,
                fp8_rows: false,
            };
            let io = GemmIo::product(ones.device_ptr()?, x.device_ptr()?, y.device_ptr()?, (1.0 / hw as f64) as f32);
            gpu.blas()?.gemm(gpu, &g, io)?;
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mean_hw;
    use crate::ops::Exec;
    use crate::tensor::{DType, Tensor};

    /// Each image's channel means, from values whose sums are exact.
    #[test]
    fn twin_averages_each_image_and_channel() {
        // [2, 2, 3, 2]: image i, pixel p, channel ch holds 100 i + 10 ch + p.
        let v: Vec<f32> = (0..2)
            .flat_map(|i| (0..6).flat_map(move |p| (0..2).map(move |ch| (100 * i + 10 * ch + p) as f32)))
            .collect();
        let x = Tensor::from_f32(&[2, 2, 3, 2], DType::F32, &v).unwrap();
        let m = mean_hw(&Exec::Cpu, &x).unwrap();
        assert_eq!(m.shape(), [2, 2]);
        assert_eq!(m.to_f32_vec().unwrap(), [2.5, 12.5, 102.5, 112.5]);
        assert!(mean_hw(&Exec::Cpu, &Tensor::from_f32(&[2, 6], DType::F32, &[0.0; 12]).unwrap()).is_err());
    }
}
