//! 2-D convolution in NHWC with KRSC weights ([out, kh, kw, in]), square kernels (1x1, 3x3),
//! stride 1 or 2, zero padding, bias; and the convolution with a residual and a bias added in the
//! same call (`conv2d_residual`, the ResNet's tail). CUDA path: cuDNN (see docs/ARCHITECTURE.md for
//! the choice), except 1x1 stride-1 convolutions, which are GEMMs over the pixels (cuBLASLt).

use std::sync::OnceLock;

use super::elementwise::{add, residual_add};
use super::linear::linear;
use super::{Exec, host_out, par_rows, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::dnn::ConvShape;
use crate::tensor::{DType, Tensor};

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

/// The convolution's shape from x [N, H, W, in] and w [out, k, k, in], checked (`op` names the
/// caller in the errors); `dtype` is the inputs' common dtype.
fn conv_shape(op: &str, x: &Tensor, w: &Tensor, cfg: Conv2d, dtype: DType) -> Result<ConvShape> {
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 4 || ws.len() != 4 || ws[3] != xs[3] || ws[1] != ws[2] {
        return Err(Error::Input(format!(
            "{op}: input {x:?} must be NHWC and weight {w:?} [out, k, k, {}]",
            xs.get(3).unwrap_or(&0)
        )));
    }
    if cfg.stride == 0 || xs[1] + 2 * cfg.padding < ws[1] || xs[2] + 2 * cfg.padding < ws[1] {
        return Err(Error::Input(format!("{op}: stride {} / padding {} do not fit {x:?}", cfg.stride, cfg.padding)));
    }
    Ok(ConvShape {
        batch: xs[0],
        in_channels: xs[3],
        height: xs[1],
        width: xs[2],
        out_channels: ws[0],
        kernel: ws[1],
        stride: cfg.stride,
        padding: cfg.padding,
        dtype,
    })
}

/// The CPU twin's convolution in f32, every output starting from `init[channel]` (the bias) or 0.
fn conv_values(x: &Tensor, w: &Tensor, shape: &ConvShape, init: Option<&[f32]>) -> Result<Vec<f32>> {
    let (xv, wv) = (x.to_f32_vec()?, w.to_f32_vec()?);
    let (oh, ow) = shape.out_hw();
    let (ci, co, k) = (shape.in_channels, shape.out_channels, shape.kernel);
    let mut out = vec![0f32; shape.batch * oh * ow * co];
    // One output pixel per row: all output channels accumulate dot products over input channels.
    par_rows(&mut out, co, |first, chunk| {
        for (r, y) in chunk.chunks_mut(co).enumerate() {
            let pix = first + r;
            let (n, oy, ox) = (pix / (oh * ow), (pix / ow) % oh, pix % ow);
            for (j, yv) in y.iter_mut().enumerate() {
                *yv = init.map_or(0.0, |b| b[j]);
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
    Ok(out)
}

/// Images per cuDNN call: cuDNN's 4-d descriptors count elements in 32 bits, so batches whose
/// input or output holds 2^31 elements or more (16 VAE frames at 1024x576 x 256 channels) run in
/// slices of whole images, each a plan of its own.
fn images_per_call(shape: &ConvShape) -> usize {
    let (oh, ow) = shape.out_hw();
    let per_image = (shape.height * shape.width * shape.in_channels).max(oh * ow * shape.out_channels);
    ((i32::MAX as usize) / per_image.max(1)).clamp(1, shape.batch.max(1))
}

/// The batch as cuDNN calls take it (`images_per_call`): each slice's shape and the byte offsets of
/// its first input and output image.
fn image_slices(shape: &ConvShape) -> Vec<(ConvShape, u64, u64)> {
    let slice = images_per_call(shape);
    let (oh, ow) = shape.out_hw();
    let es = shape.dtype.size() as u64;
    (0..shape.batch)
        .step_by(slice)
        .map(|first| {
            let part = ConvShape { batch: slice.min(shape.batch - first), ..*shape };
            let x = (first * shape.height * shape.width * shape.in_channels) as u64 * es;
            (part, x, (first * oh * ow * shape.out_channels) as u64 * es)
        })
        .collect()
}

pub fn conv2d(ex: &Exec, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: Conv2d) -> Result<Tensor> {
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    ex.expect_inputs("conv2d", &inputs)?;
    let dtype = same_dtype("conv2d", &inputs)?;
    let shape = conv_shape("conv2d", x, w, cfg, dtype)?;
    if let Some(b) = bias.filter(|b| b.shape() != [shape.out_channels]) {
        return Err(Error::Input(format!("conv2d: bias {b:?} must be [{}]", shape.out_channels)));
    }
    let (oh, ow) = shape.out_hw();
    let out_shape = [shape.batch, oh, ow, shape.out_channels];
    match ex {
        Exec::Cpu => {
            let bv = bias.map(|b| b.to_f32_vec()).transpose()?;
            host_out(&out_shape, dtype, &conv_values(x, w, &shape, bv.as_deref())?)
        }
        // A 1x1 convolution of stride 1 is a GEMM over the pixels: cuBLASLt, the bias in its
        // epilogue. cuDNN's deterministic choice ran the b2 1024x1024 UNet's 1x1 shortcuts at 16
        // TFLOP/s (benches/RESULTS.md, twenty-ninth session).
        Exec::Cuda { .. } if shape.kernel == 1 && shape.stride == 1 && shape.padding == 0 => {
            let pixels = shape.batch * shape.height * shape.width;
            let rows = x.reshape(&[pixels, shape.in_channels])?;
            let matrix = w.reshape(&[shape.out_channels, shape.in_channels])?;
            linear(ex, &rows, &matrix, bias)?.reshape(&out_shape)
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, &out_shape, dtype)?;
            {
                let mut dnn = gpu.dnn()?;
                let (x0, w0, y0) = (x.device_ptr()?, w.device_ptr()?, y.device_ptr()?);
                for (part, xs, ys) in image_slices(&shape) {
                    part.profiled(gpu, "conv", || dnn.conv2d(&part, x0 + xs, w0, y0 + ys))?;
                }
            }
            match bias {
                Some(b) => add(ex, &y, b, 1.0),
                None => Ok(y),
            }
        }
    }
}

/// How a ResNet ends (`models::resnet`, output scale 1): `Fused`, conv2 with the shortcut and the
/// biases added in cuDNN's call (`conv2d_residual`), or `Pass`, conv2 alone and then the
/// `residual_add` pass. `CELFRAME_CONV_RESIDUAL` (`fused` or `pass`, read once per process) picks
/// one for A/B runs of whole models; unset, `Fused`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvResidual {
    #[default]
    Fused,
    Pass,
}

impl ConvResidual {
    /// The names `CELFRAME_CONV_RESIDUAL` takes.
    fn parse(name: &str) -> std::result::Result<ConvResidual, String> {
        match name {
            "fused" => Ok(ConvResidual::Fused),
            "pass" => Ok(ConvResidual::Pass),
            _ => Err(format!("CELFRAME_CONV_RESIDUAL='{name}' is not a route (expected fused or pass)")),
        }
    }

    /// The process's route: `CELFRAME_CONV_RESIDUAL` where set (an input error naming it and the
    /// value where that is no route), else `Fused`.
    pub fn from_env() -> Result<ConvResidual> {
        static CHOICE: OnceLock<Option<std::result::Result<ConvResidual, String>>> = OnceLock::new();
        Ok(super::env_route(&CHOICE, "CELFRAME_CONV_RESIDUAL", ConvResidual::parse)?.unwrap_or_default())
    }
}

/// conv(x, w) + z + bias, z of the convolution's output shape and bias [out]: a ResNet's conv2 with
/// its shortcut (the block input, or the 1x1 shortcut convolution taken without its bias) and the
/// two convolutions' biases summed into one. On CUDA one cudnnConvolutionBiasActivationForward call
/// (`gpu::dnn::Dnn::conv2d_residual`) where cuDNN takes the shape; where it refuses, the plain
/// convolution and `residual_add` (the refusal is said once on stderr and kept for the process).
/// The twin accumulates the convolution in f32, adds z and then the bias, and rounds once, as the
/// fused call does.
pub fn conv2d_residual(ex: &Exec, x: &Tensor, w: &Tensor, z: &Tensor, bias: &Tensor, cfg: Conv2d) -> Result<Tensor> {
    match conv2d_residual_fused(ex, x, w, z, bias, cfg)? {
        Some(y) => Ok(y),
        None => residual_add(ex, &conv2d(ex, x, w, None, cfg)?, z, bias, None, 1.0),
    }
}

/// `conv2d_residual` without the fallback: None where cuDNN refuses the fused form for the shape
/// (tests and benchmarks, which must not time or check the fallback under the fused name).
pub fn conv2d_residual_fused(
    ex: &Exec,
    x: &Tensor,
    w: &Tensor,
    z: &Tensor,
    bias: &Tensor,
    cfg: Conv2d,
) -> Result<Option<Tensor>> {
    const OP: &str = "conv2d_residual";
    let inputs = [x, w, z, bias];
    ex.expect_inputs(OP, &inputs)?;
    let dtype = same_dtype(OP, &inputs)?;
    let shape = conv_shape(OP, x, w, cfg, dtype)?;
    let (oh, ow) = shape.out_hw();
    let out_shape = [shape.batch, oh, ow, shape.out_channels];
    if z.shape() != out_shape {
        return Err(Error::Input(format!("{OP}: residual z {z:?} must be the convolution's output {out_shape:?}")));
    }
    if bias.shape() != [shape.out_channels] {
        return Err(Error::Input(format!("{OP}: bias {bias:?} must be [{}]", shape.out_channels)));
    }
    match ex {
        Exec::Cpu => {
            let mut out = conv_values(x, w, &shape, None)?;
            let (zv, bv) = (z.to_f32_vec()?, bias.to_f32_vec()?);
            let c = shape.out_channels;
            for (i, (o, zi)) in out.iter_mut().zip(&zv).enumerate() {
                *o = *o + zi + bv[i % c];
            }
            Ok(Some(host_out(&out_shape, dtype, &out)?))
        }
        Exec::Cuda { gpu, scratch } => {
            let parts = image_slices(&shape);
            let mut dnn = gpu.dnn()?;
            // Every slice's plan first, outside the profile: a shape cuDNN refuses leaves no mark.
            for (part, ..) in &parts {
                if !dnn.residual_ready(part)? {
                    return Ok(None);
                }
            }
            let y = gpu.empty(scratch, &out_shape, dtype)?;
            let (x0, w0, z0, b0, y0) =
                (x.device_ptr()?, w.device_ptr()?, z.device_ptr()?, bias.device_ptr()?, y.device_ptr()?);
            for (part, xs, out) in &parts {
                // Filed apart from "conv": this call is conv2 and the residual pass it replaces.
                let ran = part.profiled(gpu, "conv_residual", || {
                    dnn.conv2d_residual(part, x0 + xs, w0, z0 + out, b0, y0 + out)
                })?;
                if !ran {
                    // Refused at the call (remembered): y is dropped, the caller recomputes it all.
                    // Not under a capture: a graph holding the slices that ran would rewrite the
                    // dropped y at every replay, so the capture fails and its call runs eagerly.
                    if gpu.is_capturing() {
                        return Err(Error::Cuda(format!(
                            "{OP}: cuDNN refused the fused call for {part:?} while capturing a CUDA graph"
                        )));
                    }
                    return Ok(None);
                }
            }
            Ok(Some(y))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of a small deterministic pattern in [-1, 1).
    fn pattern(shape: &[usize], dtype: DType, seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 37 + seed * 101) % 97) as f32 / 48.5 - 1.0).collect();
        Tensor::from_f32(shape, dtype, &v).unwrap()
    }

    #[test]
    fn the_conv_residual_variable_takes_the_route_names_only() {
        assert_eq!(ConvResidual::parse("fused"), Ok(ConvResidual::Fused));
        assert_eq!(ConvResidual::parse("pass"), Ok(ConvResidual::Pass));
        assert_eq!(ConvResidual::default(), ConvResidual::Fused);
        for bad in ["", "Fused", "composed", "fused ", "off"] {
            let err = ConvResidual::parse(bad).unwrap_err();
            assert!(err.contains("CELFRAME_CONV_RESIDUAL") && err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn the_residual_twin_is_the_convolution_plus_z_plus_bias_rounded_once() {
        let cfg = Conv2d { stride: 1, padding: 1 };
        // 3x3 at one width, and a width change (a shortcut convolution's z).
        for (ci, co) in [(8usize, 8usize), (12, 8)] {
            let (x, w) = (pattern(&[2, 5, 4, ci], DType::F32, 1), pattern(&[co, 3, 3, ci], DType::F32, 2));
            let (z, b) = (pattern(&[2, 5, 4, co], DType::F32, 3), pattern(&[co], DType::F32, 4));
            // In f32 the pass route rounds nothing either: the same bits.
            let fused = conv2d_residual(&Exec::Cpu, &x, &w, &z, &b, cfg).unwrap();
            let conv = conv2d(&Exec::Cpu, &x, &w, None, cfg).unwrap();
            let pass = residual_add(&Exec::Cpu, &conv, &z, &b, None, 1.0).unwrap();
            assert_eq!(fused.shape(), [2, 5, 4, co]);
            assert_eq!(fused.to_f32_vec().unwrap(), pass.to_f32_vec().unwrap());
            // In f16 and bf16: the f32 result of the same values, rounded once.
            for dtype in [DType::F16, DType::BF16] {
                let cast = |t: &Tensor| Tensor::from_f32(t.shape(), dtype, &t.to_f32_vec().unwrap()).unwrap();
                let (xh, wh, zh, bh) = (cast(&x), cast(&w), cast(&z), cast(&b));
                let widen = |t: &Tensor| Tensor::from_f32(t.shape(), DType::F32, &t.to_f32_vec().unwrap()).unwrap();
                let exact =
                    conv2d_residual(&Exec::Cpu, &widen(&xh), &widen(&wh), &widen(&zh), &widen(&bh), cfg).unwrap();
                let want: Vec<f32> = exact.to_f32_vec().unwrap().iter().map(|&v| dtype.round(v)).collect();
                let got = conv2d_residual(&Exec::Cpu, &xh, &wh, &zh, &bh, cfg).unwrap();
                assert_eq!(got.dtype(), dtype);
                assert_eq!(got.to_f32_vec().unwrap(), want, "{dtype:?} {ci}->{co}");
            }
        }
    }

    #[test]
    fn residual_inputs_that_do_not_fit_are_refused_by_name() {
        let cfg = Conv2d { stride: 1, padding: 1 };
        let (x, w) = (pattern(&[1, 4, 4, 8], DType::F16, 1), pattern(&[8, 3, 3, 8], DType::F16, 2));
        let (z, b) = (pattern(&[1, 4, 4, 8], DType::F16, 3), pattern(&[8], DType::F16, 4));
        let message = |r: Result<Tensor>| match r {
            Err(Error::Input(m)) => m,
            other => panic!("expected an input error, got {other:?}"),
        };
        let m = message(conv2d_residual(&Exec::Cpu, &x, &w, &pattern(&[1, 4, 4, 16], DType::F16, 3), &b, cfg));
        assert!(m.contains("conv2d_residual") && m.contains("residual z") && m.contains("[1, 4, 4, 8]"), "{m}");
        let m = message(conv2d_residual(&Exec::Cpu, &x, &w, &z, &pattern(&[16], DType::F16, 4), cfg));
        assert!(m.contains("conv2d_residual") && m.contains("bias") && m.contains("[8]"), "{m}");
        let m = message(conv2d_residual(&Exec::Cpu, &x, &w, &pattern(&[1, 4, 4, 8], DType::BF16, 3), &b, cfg));
        assert!(m.contains("conv2d_residual") && m.contains("BF16"), "{m}");
        let m = message(conv2d_residual(&Exec::Cpu, &x, &pattern(&[8, 3, 3, 4], DType::F16, 2), &z, &b, cfg));
        assert!(m.contains("conv2d_residual") && m.contains("weight"), "{m}");
        let m = message(conv2d_residual(&Exec::Cpu, &x, &w, &z, &b, Conv2d { stride: 0, padding: 1 }));
        assert!(m.contains("conv2d_residual") && m.contains("stride 0"), "{m}");
    }
}
