//! 2-D convolution in NHWC with KRSC weights ([out, kh, kw, in]), square kernels (1x1, 3x3),
//! stride 1 or 2, zero padding, bias. CUDA path: cuDNN (see docs/ARCHITECTURE.md for the choice).

use super::elementwise::add;
use super::{Exec, host_out, par_rows, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::dnn::ConvShape;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug)]
pub struct Conv2d {
    pub stride: usize,
    pub padding: usize,
}

/// PyTorch's conv weight [out, in, kh, kw] rearranged to KRSC [out, kh, kw, in] (host tensors).
pub fn weight_oihw_to_ohwi(w: &Tensor) -> Result<Tensor> {
    let s = w.shape();
    if s.len() != 4 {
        return Err(Error::Input(format!("conv weight {w:?} must be [out, in, kh, kw]")));
    }
    let (o, i, kh, kw) = (s[0], s[1], s[2], s[3]);
    let v = w.to_f32_vec()?;
    let mut out = vec![0f32; v.len()];
    for oc in 0..o {
        for ic in 0..i {
            for y in 0..kh {
                for x in 0..kw {
                    out[((oc * kh + y) * kw + x) * i + ic] = v[((oc * i + ic) * kh + y) * kw + x];
                }
            }
        }
    }
    Tensor::from_f32(&[o, kh, kw, i], w.dtype(), &out)
}

pub fn conv2d(ex: &Exec, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: Conv2d) -> Result<Tensor> {
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    ex.expect_inputs("conv2d", &inputs)?;
    let dtype = same_dtype("conv2d", &inputs)?;
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 4 || ws.len() != 4 || ws[3] != xs[3] || ws[1] != ws[2] {
        return Err(Error::Input(format!(
            "conv2d: input {x:?} must be NHWC and weight {w:?} [out, k, k, {}]",
            xs.get(3).unwrap_or(&0)
        )));
    }
    if cfg.stride == 0 || xs[1] + 2 * cfg.padding < ws[1] || xs[2] + 2 * cfg.padding < ws[1] {
        return Err(Error::Input(format!("conv2d: stride {} / padding {} do not fit {x:?}", cfg.stride, cfg.padding)));
    }
    let shape = ConvShape {
        batch: xs[0],
        in_channels: xs[3],
        height: xs[1],
        width: xs[2],
        out_channels: ws[0],
        kernel: ws[1],
        stride: cfg.stride,
        padding: cfg.padding,
        dtype,
    };
    if let Some(b) = bias.filter(|b| b.shape() != [shape.out_channels]) {
        return Err(Error::Input(format!("conv2d: bias {b:?} must be [{}]", shape.out_channels)));
    }
    let (oh, ow) = shape.out_hw();
    let out_shape = [shape.batch, oh, ow, shape.out_channels];
    match ex {
        Exec::Cpu => {
            let (xv, wv) = (x.to_f32_vec()?, w.to_f32_vec()?);
            let bv = bias.map(|b| b.to_f32_vec()).transpose()?;
            let (ci, co, k) = (shape.in_channels, shape.out_channels, shape.kernel);
            let mut out = vec![0f32; out_shape.iter().product()];
            // One output pixel per row: all output channels accumulate dot products over input channels.
            par_rows(&mut out, co, |first, chunk| {
                for (r, y) in chunk.chunks_mut(co).enumerate() {
                    let pix = first + r;
                    let (n, oy, ox) = (pix / (oh * ow), (pix / ow) % oh, pix % ow);
                    for (j, yv) in y.iter_mut().enumerate() {
                        *yv = bv.as_ref().map_or(0.0, |b| b[j]);
                    }
                    for ky in 0..k {
                        let iy = (oy * shape.stride + ky) as isize - shape.padding as isize;
                        if iy < 0 || iy >= shape.height as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (ox * shape.stride + kx) as isize - shape.padding as isize;
                            if ix < 0 || ix >= shape.width as isize {
                                continue;
                            }
                            let xp = &xv[((n * shape.height + iy as usize) * shape.width + ix as usize) * ci..][..ci];
                            for (j, yv) in y.iter_mut().enumerate() {
                                let wp = &wv[((j * k + ky) * k + kx) * ci..][..ci];
                                *yv += xp.iter().zip(wp).map(|(a, b)| a * b).sum::<f32>();
                            }
                        }
                    }
                }
            });
            host_out(&out_shape, dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, &out_shape, dtype)?;
            {
                let mut dnn = gpu.dnn()?;
                // cuDNN's 4-d descriptors count elements in 32 bits: batches whose input or output
                // holds 2^31 elements or more (16 VAE frames at 1024x576 x 256 channels) run in
                // slices of whole images, each a plan of its own.
                let per_image = (shape.height * shape.width * shape.in_channels).max(oh * ow * shape.out_channels);
                let slice = ((i32::MAX as usize) / per_image.max(1)).clamp(1, shape.batch);
                let (x0, w0, y0) = (x.device_ptr()?, w.device_ptr()?, y.device_ptr()?);
                let es = dtype.size() as u64;
                for first in (0..shape.batch).step_by(slice) {
                    let part = ConvShape { batch: slice.min(shape.batch - first), ..shape };
                    let xs = x0 + (first * shape.height * shape.width * shape.in_channels) as u64 * es;
                    let ys = y0 + (first * oh * ow * shape.out_channels) as u64 * es;
                    gpu.profiled("conv", || dnn.conv2d(&part, xs, w0, ys))?;
                }
            }
            match bias {
                Some(b) => add(ex, &y, b, 1.0),
                None => Ok(y),
            }
        }
    }
}
