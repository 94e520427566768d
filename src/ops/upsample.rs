//! Nearest-neighbour 2x upsampling of NHWC activations, alone or followed by a 3x3 convolution
//! (the UNet's and the VAE's `Upsample2D`).

use super::concat::concat_last;
use super::conv::{Conv2d, conv2d};
use super::{Exec, grid_for, host_out, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::params::{SubpixelShuffleParams, SubpixelWeightsParams, Upsample2xParams};
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

/// conv3x3(upsample_nearest2x(x)) + bias with padding 1: x [N, H, W, in], w [out, 3, 3, in] (KRSC)
/// -> [N, 2H, 2W, out]. The CPU twin is exactly that composition. On CUDA (in and out channels
/// multiples of 8, the folded weights under 2^31 elements) it runs in the sub-pixel form
/// (kernels/elementwise/subpixel.cu): the weights folded into a 2x2 kernel with 4 x out channels,
/// one convolution (padding 1) at the input's resolution, then a shuffle that interleaves the four
/// phases and adds the bias. That is 4 taps per output pixel instead of 9, and no upsampled copy of
/// the input is written. The sums differ from the composition only in rounding (taps folded in
/// fp32, the folded weights rounded once).
pub fn upsample2x_conv3x3(ex: &Exec, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    upsample_conv(ex, x, w, bias, None)
}

/// `concat_last(upsample2x_conv3x3(x, w, bias), skip)` with skip [N, 2H, 2W, C_skip]: an up block's
/// first layer after the previous block's upsampler. On the sub-pixel route (C_skip a multiple of 8
/// too) the shuffle writes the concatenation itself, so the upsampled tensor is never written alone
/// and read back; the bytes are the composition's.
pub fn upsample2x_conv3x3_concat(
    ex: &Exec,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    skip: &Tensor,
) -> Result<Tensor> {
    upsample_conv(ex, x, w, bias, Some(skip))
}

fn upsample_conv(ex: &Exec, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, skip: Option<&Tensor>) -> Result<Tensor> {
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    inputs.extend(skip);
    ex.expect_inputs("upsample2x_conv3x3", &inputs)?;
    let (s, ws) = (x.shape(), w.shape());
    if s.len() != 4 || ws.len() != 4 || ws[1] != 3 || ws[2] != 3 || ws[3] != s[3] {
        return Err(Error::Input(format!(
            "upsample2x_conv3x3: input {x:?} must be NHWC and weight {w:?} [out, 3, 3, {}]",
            s.get(3).unwrap_or(&0)
        )));
    }
    let same = Conv2d { stride: 1, padding: 1 };
    let (n, h, wd, cin, cout) = (s[0], s[1], s[2], s[3], ws[0]);
    let skip_channels = match skip {
        Some(k) if k.shape().len() != 4 || k.shape()[..3] != [n, 2 * h, 2 * wd] => {
            return Err(Error::Input(format!(
                "upsample2x_conv3x3: skip {k:?} must be [{n}, {}, {}, C] beside input {x:?}",
                2 * h,
                2 * wd
            )));
        }
        Some(k) => {
            same_dtype("upsample2x_conv3x3: skip", &[x, k])?;
            k.shape()[3]
        }
        None => 0,
    };
    let subpixel = cout % 8 == 0 && cin % 8 == 0 && 16 * cin * cout <= i32::MAX as usize;
    let (Exec::Cuda { gpu, scratch }, true) = (ex, subpixel) else {
        let y = conv2d(ex, &upsample_nearest2x(ex, x)?, w, bias, same)?;
        return match skip {
            Some(k) => concat_last(ex, &y, k),
            None => Ok(y),
        };
    };
    if let Some(k) = skip.filter(|_| skip_channels % 8 != 0) {
        // The shuffle moves 16-byte vectors of 8 channels: such a skip is copied after it.
        return concat_last(ex, &upsample_conv(ex, x, w, bias, None)?, k);
    }
    if let Some(b) = bias.filter(|b| b.shape() != [cout]) {
        return Err(Error::Input(format!("upsample2x_conv3x3: bias {b:?} must be [{cout}]")));
    }
    let dtype = x.dtype();
    // 1. the folded weights: [out, 3, 3, in] -> [4 out, 2, 2, in] (folded every call: a LoRA merge
    // may have changed w; 16 x in x out elements, small beside the activations)
    let folded = gpu.empty(scratch, &[4 * cout, 2, 2, cin], dtype)?;
    let p = SubpixelWeightsParams {
        w: w.device_ptr()? as *const _,
        out: folded.device_ptr()? as *mut _,
        out_channels: cout as i32,
        in_channels: cin as i32,
    };
    let work = cout * cin / 8;
    gpu.launch(kernel_for!("subpixel_weights", dtype), (grid_for(work, 256), 1, 1), (256, 1, 1), 0, &p)?;
    // 2. the four phases at the input's resolution: [N, H + 1, W + 1, 4 out]
    let phases = conv2d(ex, x, &folded, None, same)?;
    drop(folded);
    // 3. interleaved into [N, 2H, 2W, out (+ skip)], the bias added on the way
    let y = gpu.empty(scratch, &[n, 2 * h, 2 * wd, cout + skip_channels], dtype)?;
    let pointer = |t: Option<&Tensor>| t.map_or(Ok(std::ptr::null()), |t| t.device_ptr().map(|p| p as *const _));
    let p = SubpixelShuffleParams {
        conv: phases.device_ptr()? as *const _,
        bias: pointer(bias)?,
        skip: pointer(skip)?,
        out: y.device_ptr()? as *mut _,
        images: n as i64,
        height: h as i32,
        width: wd as i32,
        channels: cout as i32,
        skip_channels: skip_channels as i32,
    };
    gpu.launch(kernel_for!("subpixel_shuffle", dtype), (grid_for(y.numel() / 8, 256), 1, 1), (256, 1, 1), 0, &p)?;
    Ok(y)
}
