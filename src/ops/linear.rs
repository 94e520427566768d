//! Linear layer: y[..., N] = x[..., K] · w[N, K]ᵀ + bias[N] (PyTorch weight layout), through
//! cuBLASLt with the bias in the epilogue and fp32 accumulation.

use super::{Exec, host_out, par_rows, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::blas::{Gemm, GemmIo};
use crate::tensor::Tensor;

pub fn linear(ex: &Exec, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_add(ex, x, w, bias, None)
}

/// x · wᵀ + bias + residual: a projection and the residual stream it joins in one pass (on CUDA the
/// residual is added in cuBLASLt's epilogue, rounded once with the product). residual has the
/// output's shape.
pub fn linear_add(
    ex: &Exec,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    inputs.extend(residual);
    ex.expect_inputs("linear", &inputs)?;
    let dtype = same_dtype("linear", &inputs)?;
    let k = *x.shape().last().ok_or_else(|| Error::Input("linear: scalar input".into()))?;
    if w.shape().len() != 2 || w.shape()[1] != k {
        return Err(Error::Input(format!("linear: weight {w:?} must be [out, {k}] for input {x:?}")));
    }
    let n = w.shape()[0];
    if let Some(b) = bias.filter(|b| b.shape() != [n]) {
        return Err(Error::Input(format!("linear: bias {b:?} must be [{n}]")));
    }
    let m = x.numel() / k.max(1);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    if let Some(r) = residual.filter(|r| r.shape() != shape) {
        return Err(Error::Input(format!("linear: residual {r:?} must be the output's shape {shape:?}")));
    }
    match ex {
        Exec::Cpu => {
            let (xv, wv) = (x.to_f32_vec()?, w.to_f32_vec()?);
            let bv = bias.map(|b| b.to_f32_vec()).transpose()?;
            let rv = residual.map(|r| r.to_f32_vec()).transpose()?;
            let mut out = vec![0f32; m * n];
            par_rows(&mut out, n, |first, chunk| {
                for (row, y) in chunk.chunks_mut(n).enumerate() {
                    let xr = &xv[(first + row) * k..(first + row + 1) * k];
                    for (j, yv) in y.iter_mut().enumerate() {
                        let wr = &wv[j * k..(j + 1) * k];
                        let residual = rv.as_ref().map_or(0.0, |r| r[(first + row) * n + j]);
                        *yv = xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>()
                            + bv.as_ref().map_or(0.0, |b| b[j])
                            + residual;
                    }
                }
            });
            host_out(&shape, dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, &shape, dtype)?;
            let b = bias.map(|b| b.device_ptr()).transpose()?;
            let g = Gemm::linear(m, n, k, dtype, b.is_some());
            let c = residual.map(|r| Ok::<_, crate::Error>((r.device_ptr()?, 1.0))).transpose()?;
            let io = GemmIo { a: x.device_ptr()?, b: w.device_ptr()?, d: y.device_ptr()?, bias: b, c, alpha: 1.0 };
            gpu.blas()?.gemm(gpu, &g, io)?;
            Ok(y)
        }
    }
}
