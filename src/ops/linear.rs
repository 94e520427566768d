//! Linear layer: y[..., N] = x[..., K] · w[N, K]ᵀ + bias[N] (PyTorch weight layout), through
//! cuBLASLt with the bias in the epilogue and fp32 accumulation.

use super::{Exec, host_out, par_rows, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::blas::{Blas, Gemm};
use crate::tensor::Tensor;

pub fn linear(ex: &Exec, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut inputs = vec![x, w];
    inputs.extend(bias);
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
    match ex {
        Exec::Cpu => {
            let (xv, wv) = (x.to_f32_vec()?, w.to_f32_vec()?);
            let bv = bias.map(|b| b.to_f32_vec()).transpose()?;
            let mut out = vec![0f32; m * n];
            par_rows(&mut out, n, |first, chunk| {
                for (r, y) in chunk.chunks_mut(n).enumerate() {
                    let xr = &xv[(first + r) * k..(first + r + 1) * k];
                    for (j, yv) in y.iter_mut().enumerate() {
                        let wr = &wv[j * k..(j + 1) * k];
                        *yv = xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>() + bv.as_ref().map_or(0.0, |b| b[j]);
                    }
                }
            });
            host_out(&shape, dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, &shape, dtype)?;
            let mut blas = gpu.blas.borrow_mut();
            if blas.is_none() {
                *blas = Some(Blas::new()?);
            }
            let b = bias.map(|b| b.device_ptr()).transpose()?;
            let g = Gemm::linear(m, n, k, dtype, b.is_some());
            blas.as_mut().unwrap().gemm(gpu, &g, x.device_ptr()?, w.device_ptr()?, y.device_ptr()?, b, 1.0)?;
            Ok(y)
        }
    }
}
