//! Nearest-neighbour 2x upsampling of NHWC activations.

use super::{Exec, grid_for, host_out};
use crate::error::{Error, Result};
use crate::gpu::params::Upsample2xParams;
use crate::tensor::Tensor;

pub fn upsample_nearest2x(ex: &Exec, x: &Tensor) -> Result<Tensor> {
    ex.expect_inputs("upsample_nearest2x", &[x])?;
    let s = x.shape();
    if s.len() != 4 {
        return Err(Error::Input(format!("upsample_nearest2x: {x:?} must be NHWC")));
    }
    let (n, h, w, c) = (s[0], s[1], s[2], s[3]);
    let out_shape = [n, 2 * h, 2 * w, c];
    match ex {
        Exec::Cpu => {
            let v = x.to_f32_vec()?;
            let out: Vec<f32> = (0..n * 4 * h * w * c)
                .map(|i| {
                    let (ch, px) = (i % c, i / c);
                    let (ox, oy, img) = (px % (2 * w), (px / (2 * w)) % (2 * h), px / (4 * h * w));
                    v[((img * h + oy / 2) * w + ox / 2) * c + ch]
                })
                .collect();
            host_out(&out_shape, x.dtype(), &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, &out_shape, x.dtype())?;
            let p = Upsample2xParams {
                x: x.device_ptr()? as *const _,
                out: y.device_ptr()? as *mut _,
                images: n as i64,
                height: h as i32,
                width: w as i32,
                channels: c as i32,
            };
            let work = y.numel().div_ceil(if c % 8 == 0 { 8 } else { 1 });
            gpu.launch(kernel_for!("upsample2x", x.dtype()), (grid_for(work, 256), 1, 1), (256, 1, 1), 0, &p)?;
            Ok(y)
        }
    }
}
