//! Element-wise ops: add / mul with broadcasting, scale, SiLU, GELU (exact erf), quick GELU, GEGLU,
//! and the ResNet's residual add with its convolutions' biases.

use super::fp8::Fp8Matrix;
use super::{Exec, grid_for, host_out, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::params::{
    ElementwiseOp, ElementwiseParams, FP8_GEGLU_THREADS, FP8_GEGLU_WARP_MAX_D, GegluE4m3Params, GegluParams,
    ResidualAddParams,
};
use crate::tensor::Tensor;

const BLOCK: u32 = 256;

pub fn silu_f32(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as torch's default and diffusers' GEGLU use.
pub fn gelu_f32(x: f32) -> f32 {
    (0.5 * x as f64 * (1.0 + libm::erf(x as f64 * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// CLIP's quick GELU, x * sigmoid(1.702 x) (transformers' `quick_gelu`, CLIP ViT-L's MLP).
pub fn quick_gelu_f32(x: f32) -> f32 {
    x / (1.0 + (-1.702 * x).exp())
}

/// How `b` repeats over `a`: `a` viewed as [outer, mid, inner], `b` as [outer, inner].
#[derive(Clone, Copy, Debug)]
pub struct Broadcast {
    pub mid: usize,
    pub inner: usize,
}

impl Broadcast {
    /// Infers the view from shapes: equal shapes; `b` = [C] over [..., C] (bias); `b` = [N, C]
    /// over [N, ..., C] (per-image vector such as the time embedding).
    pub fn infer(a: &Tensor, b: &Tensor) -> Result<Broadcast> {
        let (sa, sb) = (a.shape(), b.shape());
        let n = a.numel();
        if sa == sb {
            return Ok(Broadcast { mid: 1, inner: n.max(1) });
        }
        let c = *sa.last().unwrap_or(&1);
        if sb == [c] {
            return Ok(Broadcast { mid: n / c.max(1), inner: c });
        }
        if sa.len() >= 2 && sb == [sa[0], c] {
            return Ok(Broadcast { mid: n / (sa[0] * c).max(1), inner: c });
        }
        Err(Error::Input(format!("cannot broadcast {sb:?} over {sa:?}")))
    }
}

fn binary(ex: &Exec, op: ElementwiseOp, a: &Tensor, b: Option<&Tensor>, alpha: f32) -> Result<Tensor> {
    let name = format!("{op:?}");
    let dtype = match b {
        Some(b) => same_dtype(&name, &[a, b])?,
        None => a.dtype(),
    };
    let bc = match b {
        Some(b) => Broadcast::infer(a, b)?,
        None => Broadcast { mid: 1, inner: a.numel().max(1) },
    };
    let mut inputs = vec![a];
    inputs.extend(b);
    ex.expect_inputs(&name, &inputs)?;
    match ex {
        Exec::Cpu => {
            let x = a.to_f32_vec()?;
            let y = match b {
                Some(b) => b.to_f32_vec()?,
                None => Vec::new(),
            };
            let out: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let w = if y.is_empty() { 0.0 } else { y[(i / (bc.mid * bc.inner)) * bc.inner + i % bc.inner] };
                    alpha
                        * match op {
                            ElementwiseOp::ELEMENTWISE_ADD => v + w,
                            ElementwiseOp::ELEMENTWISE_MUL => v * w,
                            ElementwiseOp::ELEMENTWISE_SCALE => v,
                            ElementwiseOp::ELEMENTWISE_SILU => silu_f32(v),
                            ElementwiseOp::ELEMENTWISE_GELU => gelu_f32(v),
                            ElementwiseOp::ELEMENTWISE_QUICK_GELU => quick_gelu_f32(v),
                        }
                })
                .collect();
            host_out(a.shape(), dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let out = gpu.empty(scratch, a.shape(), dtype)?;
            let p = ElementwiseParams {
                a: a.device_ptr()? as *const _,
                b: match b {
                    Some(b) => b.device_ptr()? as *const _,
                    None => std::ptr::null(),
                },
                out: out.device_ptr()? as *mut _,
                n: a.numel() as i64,
                mid: bc.mid as i64,
                inner: bc.inner as i64,
                alpha,
                op: op as i32,
            };
            gpu.launch(
                kernel_for!("elementwise", dtype),
                (grid_for(a.numel().div_ceil(8), BLOCK), 1, 1),
                (BLOCK, 1, 1),
                0,
                &p,
            )?;
            Ok(out)
        }
    }
}

/// alpha * (a + b), b broadcast as `Broadcast::infer` allows.
pub fn add(ex: &Exec, a: &Tensor, b: &Tensor, alpha: f32) -> Result<Tensor> {
    binary(ex, ElementwiseOp::ELEMENTWISE_ADD, a, Some(b), alpha)
}
pub fn mul(ex: &Exec, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(ex, ElementwiseOp::ELEMENTWISE_MUL, a, Some(b), 1.0)
}
/// t [N, ..., C] with its N leading slices scaled by per_row[n] (per-frame ControlNet strengths):
/// one broadcast `mul` by an [N, C] table placed as an `Exec::constant`.
pub fn scale_rows(ex: &Exec, t: &Tensor, per_row: &[f32]) -> Result<Tensor> {
    if t.shape().first() != Some(&per_row.len()) {
        return Err(Error::Input(format!("scale_rows: {} factors for {t:?}", per_row.len())));
    }
    let c = *t.shape().last().unwrap_or(&1);
    let table: Vec<f32> = per_row.iter().flat_map(|&s| std::iter::repeat_n(s, c)).collect();
    mul(ex, t, &ex.constant(Tensor::from_f32(&[per_row.len(), c], t.dtype(), &table)?)?)
}
pub fn scale(ex: &Exec, a: &Tensor, alpha: f32) -> Result<Tensor> {
    binary(ex, ElementwiseOp::ELEMENTWISE_SCALE, a, None, alpha)
}
pub fn silu(ex: &Exec, a: &Tensor) -> Result<Tensor> {
    binary(ex, ElementwiseOp::ELEMENTWISE_SILU, a, None, 1.0)
}
pub fn gelu(ex: &Exec, a: &Tensor) -> Result<Tensor> {
    binary(ex, ElementwiseOp::ELEMENTWISE_GELU, a, None, 1.0)
}
pub fn quick_gelu(ex: &Exec, a: &Tensor) -> Result<Tensor> {
    binary(ex, ElementwiseOp::ELEMENTWISE_QUICK_GELU, a, None, 1.0)
}

/// alpha * (a + b + bias + bias2) in one pass: a and b [..., C] of one shape, bias and bias2 [C]
/// (bias2 optional), summed in f32 in that order and rounded once. A ResNet's output from conv2 and
/// the shortcut taken without their bias passes (diffusers `ResnetBlock2D.forward`'s last lines).
pub fn residual_add(
    ex: &Exec,
    a: &Tensor,
    b: &Tensor,
    bias: &Tensor,
    bias2: Option<&Tensor>,
    alpha: f32,
) -> Result<Tensor> {
    let mut inputs = vec![a, b, bias];
    inputs.extend(bias2);
    ex.expect_inputs("residual_add", &inputs)?;
    let dtype = same_dtype("residual_add", &inputs)?;
    let c = *a.shape().last().unwrap_or(&0);
    if a.shape() != b.shape() || c == 0 {
        return Err(Error::Input(format!("residual_add: {a:?} and {b:?} must be one shape [..., C]")));
    }
    if let Some(t) = [Some(bias), bias2].into_iter().flatten().find(|t| t.shape() != [c]) {
        return Err(Error::Input(format!("residual_add: bias {t:?} must be [{c}]")));
    }
    match ex {
        Exec::Cpu => {
            let (x, y, s) = (a.to_f32_vec()?, b.to_f32_vec()?, bias.to_f32_vec()?);
            let s2 = match bias2 {
                Some(t) => t.to_f32_vec()?,
                None => vec![0.0; c],
            };
            // The kernel's order, zero for a missing bias2 included (-0 + 0 is +0 on both sides).
            let out: Vec<f32> =
                x.iter().zip(&y).enumerate().map(|(i, (&u, &v))| alpha * (u + v + s[i % c] + s2[i % c])).collect();
            host_out(a.shape(), dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let out = gpu.empty(scratch, a.shape(), dtype)?;
            let p = ResidualAddParams {
                a: a.device_ptr()? as *const _,
                b: b.device_ptr()? as *const _,
                bias: bias.device_ptr()? as *const _,
                bias2: match bias2 {
                    Some(t) => t.device_ptr()? as *const _,
                    None => std::ptr::null(),
                },
                out: out.device_ptr()? as *mut _,
                n: a.numel() as i64,
                channels: c as i64,
                alpha,
            };
            gpu.launch(
                kernel_for!("residual_add", dtype),
                (grid_for(a.numel().div_ceil(8), BLOCK), 1, 1),
                (BLOCK, 1, 1),
                0,
                &p,
            )?;
            Ok(out)
        }
    }
}

/// GEGLU: x [..., 2D] -> (x[..., :D] + bias[:D]) * gelu(x[..., D:] + bias[D:]) (value first, gate
/// second). The bias [2D] is the projection's, for a projection whose GEMM could not add it (FP8).
pub fn geglu(ex: &Exec, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, d, shape) = geglu_shape(ex, x, bias)?;
    match ex {
        Exec::Cpu => host_out(&shape, x.dtype(), &geglu_values(x, bias, d)?),
        Exec::Cuda { gpu, scratch } => {
            let out = gpu.empty(scratch, &shape, x.dtype())?;
            let p = GegluParams {
                x: x.device_ptr()? as *const _,
                bias: bias.map(|b| b.device_ptr()).transpose()?.unwrap_or(0) as *const _,
                out: out.device_ptr()? as *mut _,
                rows: rows as i64,
                d: d as i64,
            };
            gpu.launch(
                kernel_for!("geglu", x.dtype()),
                (grid_for((rows * d).div_ceil(8), BLOCK), 1, 1),
                (BLOCK, 1, 1),
                0,
                &p,
            )?;
            Ok(out)
        }
    }
}

/// `geglu` written as e4m3 rows, each with its own scale (`Fp8Scaling::Rows`): the input of an
/// FP8 second feed-forward GEMM, without a 16-bit output or a quantization pass. The scales and
/// bytes come from the fp32 outputs (not rounded to x's dtype first). [.., 2D] -> [rows, D].
pub fn geglu_fp8(ex: &Exec, x: &Tensor, bias: Option<&Tensor>) -> Result<Fp8Matrix> {
    let (rows, d, _) = geglu_shape(ex, x, bias)?;
    match ex {
        Exec::Cpu => Ok(Fp8Matrix::host_rows(d, &geglu_values(x, bias, d)?)),
        Exec::Cuda { gpu, .. } => {
            let (q, bytes, scales) = Fp8Matrix::scratch_rows(ex, rows, d)?;
            let p = GegluE4m3Params {
                x: x.device_ptr()? as *const _,
                bias: bias.map(|b| b.device_ptr()).transpose()?.unwrap_or(0) as *const _,
                q: bytes as *mut u8,
                q_scales: scales as *mut f32,
                rows: rows as i64,
                d: d as i64,
            };
            // A warp a row up to FP8_GEGLU_WARP_MAX_D, else a block a row (grid.x reaches
            // 2^31 - 1; checked, not assumed).
            let warp_rows = d <= FP8_GEGLU_WARP_MAX_D as usize;
            let rows_per_block = if warp_rows { FP8_GEGLU_THREADS as usize / 32 } else { 1 };
            let grid = u32::try_from(rows.div_ceil(rows_per_block).max(1))
                .ok()
                .filter(|&g| g < 1 << 31)
                .ok_or_else(|| Error::Unsupported(format!("geglu_fp8: {rows} rows, more than one launch's blocks")))?;
            let kernel = if warp_rows {
                kernel_for!("geglu_e4m3_warp", x.dtype())
            } else {
                kernel_for!("geglu_e4m3", x.dtype())
            };
            gpu.launch(kernel, (grid, 1, 1), (FP8_GEGLU_THREADS, 1, 1), 0, &p)?;
            Ok(q)
        }
    }
}

/// GEGLU's checked arguments: (rows, D, the output's shape) for x [.., 2D] and bias [2D].
fn geglu_shape(ex: &Exec, x: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, Vec<usize>)> {
    let mut inputs = vec![x];
    inputs.extend(bias);
    ex.expect_inputs("geglu", &inputs)?;
    same_dtype("geglu", &inputs)?;
    let two_d = *x.shape().last().unwrap_or(&0);
    if !two_d.is_multiple_of(2) || two_d == 0 {
        return Err(Error::Input(format!("geglu: last dimension of {x:?} must be even")));
    }
    if let Some(b) = bias.filter(|b| b.shape() != [two_d]) {
        return Err(Error::Input(format!("geglu: bias {b:?} must be [{two_d}]")));
    }
    let d = two_d / 2;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = d;
    Ok((x.numel() / two_d, d, shape))
}

/// The CPU twin's GEGLU outputs in f32.
fn geglu_values(x: &Tensor, bias: Option<&Tensor>, d: usize) -> Result<Vec<f32>> {
    let two_d = 2 * d;
    let v = x.to_f32_vec()?;
    let b = bias.map(|b| b.to_f32_vec()).transpose()?.unwrap_or_else(|| vec![0.0; two_d]);
    Ok((0..v.len() / 2)
        .map(|i| {
            let (r, j) = (i / d, i % d);
            (v[r * two_d + j] + b[j]) * gelu_f32(v[r * two_d + d + j] + b[d + j])
        })
        .collect())
}
