//! FP8 linears: e4m3 (the OCP "E4M3FN" format: 1 sign bit, 4 exponent bits of bias 7, 3 mantissa
//! bits, no infinities, largest finite 448) for weights and activations alike, with one scale per
//! tensor or per row (`Fp8Scaling`): q = e4m3(x · (1 / s)), s = max|x| / 448 over the tensor or the
//! row, and the product x · wᵀ ≈ s_x s_w (q_x · q_wᵀ) (per row: s_x of the token, s_w of the
//! output channel).
//!
//! CUDA: `fp8_amax` and `fp8_quantize` (per tensor) or `fp8_quantize_rows` (kernels/elementwise/
//! fp8.cu) quantize on the device, the scales never leaving it, and cuBLASLt multiplies the e4m3
//! operands with both scales in its epilogue (fp32 accumulation, output in the activation dtype;
//! compute capability 8.9 or later); bias and residual go in that epilogue too where `probe` saw
//! it add them as a separate pass does, else in one pass after the GEMM. The CPU twin quantizes
//! with the same arithmetic (same bytes) and accumulates the decoded products in f32.

use super::elementwise::{add, residual_add};
use super::{Exec, host_out, par_rows};
use crate::error::{Error, Result};
use crate::gpu::blas::{Gemm, GemmIo, refused_before_launch};
use crate::gpu::memory::DeviceMem;
use crate::gpu::params::{FP8_ROWS_THREADS, Fp8AmaxParams, Fp8QuantizeParams, Fp8QuantizeRowsParams};
use crate::tensor::{DType, Tensor};
use crate::verify::compare;

/// The largest finite e4m3 value, 1.75 · 2^8.
pub const E4M3_MAX: f32 = 448.0;

/// `v` as e4m3, rounded to nearest (ties to even), saturating at ±448 (infinities too); NaN -> NaN.
pub fn e4m3_from_f32(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    if v.is_nan() {
        return 0x7F;
    }
    let a = v.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // Values below 2^-6 are subnormal (steps of 2^-9); above, 3 mantissa bits: steps of 2^(e-3).
    // Dividing by a power of two is exact, so one rounding to an integer count of steps is the
    // rounding to e4m3. Below 2^-126 (f32 subnormals) everything rounds to zero anyway.
    let e = if a < f32::MIN_POSITIVE { -127 } else { ((a.to_bits() >> 23) as i32) - 127 };
    let step = (e.max(-6) - 3) as f32;
    let steps = (a / step.exp2()).round_ties_even();
    if steps == 0.0 {
        return sign;
    }
    let r = steps * step.exp2(); // a multiple of its step, 448 at most
    let e = ((r.to_bits() >> 23) as i32) - 127;
    if e < -6 {
        return sign | (r / (-9f32).exp2()) as u8;
    }
    let mantissa = ((r / (e as f32).exp2() - 1.0) * 8.0) as u8;
    sign | (((e + 7) as u8) << 3) | mantissa
}

/// The value of an e4m3 byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let (exponent, mantissa) = (((b >> 3) & 0xF) as i32, (b & 7) as f32);
    let magnitude = match exponent {
        15 if b & 7 == 7 => f32::NAN,
        0 => mantissa * (-9f32).exp2(),
        _ => (1.0 + mantissa / 8.0) * ((exponent - 7) as f32).exp2(),
    };
    if b & 0x80 != 0 { -magnitude } else { magnitude }
}

/// The scale for a largest magnitude `amax` (the kernels' `fp8_scale_of`): amax maps to 448; an
/// all-zero tensor or row gets 1.
pub fn scale_of(amax: f32) -> f32 {
    if amax > 0.0 { amax.min(f32::MAX) / E4M3_MAX } else { 1.0 }
}

/// `values` as e4m3 bytes appended to `bytes` with their one scale, returned: s from max |x|,
/// each value multiplied by 1 / s in f32 before its rounding, as the kernels' `fp8_inverse` does.
fn quantize_host(values: &[f32], bytes: &mut Vec<u8>) -> f32 {
    let scale = scale_of(values.iter().fold(0f32, |m, a| m.max(a.abs())));
    let inv = 1.0 / scale;
    bytes.extend(values.iter().map(|&a| e4m3_from_f32(a * inv)));
    scale
}

/// How an e4m3 matrix is scaled. Both operands of an FP8 GEMM are scaled the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Scaling {
    /// One scale for the whole matrix: an activation is quantized in two passes (its max, then
    /// the bytes: 5 bytes of traffic an element).
    Tensor,
    /// One scale per row: a weight's output channels, an activation's tokens (cuBLASLt's
    /// "outer vector" scales). One pass (3 bytes an element), or none where the LayerNorm before
    /// the linear writes the e4m3 rows itself (`ops::norm::layer_norm_fp8`); finer scales, so a
    /// product closer to the 16-bit one.
    Rows,
}

/// A matrix [rows, cols] in e4m3 with its scales: element (r, c) is s · e4m3(bytes[r · cols + c]),
/// s the matrix's one scale or row r's.
pub struct Fp8Matrix {
    rows: usize,
    cols: usize,
    scaling: Fp8Scaling,
    storage: Fp8Storage,
    /// A weight's twin: `linear_fp8` adds bias and residual in the FP8 GEMM's epilogue (cuBLASLt)
    /// instead of a pass after it. Set by `probe` where the device's epilogue gave the pass's
    /// values; false for every other matrix.
    fused_epilogue: bool,
}

enum Fp8Storage {
    /// `scales`: one, or one per row.
    Host { bytes: Vec<u8>, scales: Vec<f32> },
    /// `scales` (f32): per tensor [scale, amax], the scale first so the GEMM reads it from the
    /// allocation's start (cuBLASLt refused FP8 GEMMs whose scale pointer was 4 bytes past it);
    /// per row [rows].
    Device { bytes: DeviceMem, scales: DeviceMem },
}

impl std::fmt::Debug for Fp8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = if matches!(self.storage, Fp8Storage::Host { .. }) { "host" } else { "device" };
        let scales = match self.scaling {
            Fp8Scaling::Tensor => "one scale",
            Fp8Scaling::Rows => "a scale per row",
        };
        write!(f, "Fp8Matrix[{}, {}] e4m3, {scales} ({place})", self.rows, self.cols)
    }
}

impl Fp8Matrix {
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn scaling(&self) -> Fp8Scaling {
        self.scaling
    }

    /// Whether `linear_fp8` through this twin adds bias and residual in the GEMM's epilogue.
    pub fn fused_epilogue(&self) -> bool {
        self.fused_epilogue
    }

    /// The matrix with `linear_fp8`'s bias and residual in the GEMM's epilogue (on) or in a pass
    /// after it (off). `probe` decides this for a device; the other twins of a model follow it.
    pub fn with_fused_epilogue(mut self, on: bool) -> Fp8Matrix {
        self.fused_epilogue = on;
        self
    }

    /// Bytes the matrix holds: one an element, and its f32 scales.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols
            + match self.scaling {
                Fp8Scaling::Tensor => 8,
                Fp8Scaling::Rows => 4 * self.rows,
            }
    }

    /// Rows already quantized on the host (the CPU twins of the ops that write e4m3 rows).
    pub(crate) fn host_rows(cols: usize, values: &[f32]) -> Fp8Matrix {
        let rows = values.len() / cols.max(1);
        let mut bytes = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(rows);
        for row in values.chunks(cols.max(1)) {
            scales.push(quantize_host(row, &mut bytes));
        }
        Fp8Matrix {
            rows,
            cols,
            scaling: Fp8Scaling::Rows,
            storage: Fp8Storage::Host { bytes, scales },
            fused_epilogue: false,
        }
    }

    /// Uninitialised per-row storage in `scratch`, for a kernel to write: (the matrix, the
    /// device addresses of its bytes and of its row scales).
    pub(crate) fn scratch_rows(ex: &Exec, rows: usize, cols: usize) -> Result<(Fp8Matrix, u64, u64)> {
        let Exec::Cuda { gpu, scratch } = ex else {
            return Err(Error::Internal("Fp8Matrix::scratch_rows is device memory".into()));
        };
        let bytes = gpu.empty_bytes(scratch, (rows * cols).max(1))?;
        let scales = gpu.empty_bytes(scratch, 4 * rows.max(1))?;
        let (b, s) = (bytes.ptr()?, scales.ptr()?);
        let storage = Fp8Storage::Device { bytes, scales };
        let m = Fp8Matrix { rows, cols, scaling: Fp8Scaling::Rows, storage, fused_epilogue: false };
        Ok((m, b, s))
    }

    /// The bytes and the scales (one, or one per row), on the host (copied from the device for a
    /// device matrix).
    pub fn to_host(&self, ex: &Exec) -> Result<(Vec<u8>, Vec<f32>)> {
        match (&self.storage, ex) {
            (Fp8Storage::Host { bytes, scales }, _) => Ok((bytes.clone(), scales.clone())),
            (Fp8Storage::Device { bytes, scales }, Exec::Cuda { gpu, .. }) => {
                let count = match self.scaling {
                    Fp8Scaling::Tensor => 1,
                    Fp8Scaling::Rows => self.rows,
                };
                let s = gpu.download_bytes(scales)?;
                let s = s.chunks_exact(4).take(count).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                Ok((gpu.download_bytes(bytes)?, s))
            }
            (Fp8Storage::Device { .. }, Exec::Cpu) => {
                Err(Error::Internal(format!("{self:?}: reading a device matrix needs the CUDA Exec")))
            }
        }
    }

    /// The values, decoded and scaled (host matrices only).
    fn host_values(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Fp8Storage::Host { bytes, scales } => {
                let per_row = self.scaling == Fp8Scaling::Rows;
                let cols = self.cols.max(1);
                Ok(bytes
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| e4m3_to_f32(b) * scales[if per_row { i / cols } else { 0 }])
                    .collect())
            }
            Fp8Storage::Device { .. } => Err(Error::Internal(format!("{self:?} is on the device"))),
        }
    }

    fn device(&self) -> Result<(u64, u64)> {
        match &self.storage {
            Fp8Storage::Device { bytes, scales } => Ok((bytes.ptr()?, scales.ptr()?)),
            Fp8Storage::Host { .. } => {
                Err(Error::Input(format!("{self:?} is on the host; the CUDA path needs it there")))
            }
        }
    }
}

/// `x` viewed as [rows, last dimension].
fn matrix_shape(what: &str, x: &Tensor) -> Result<(usize, usize)> {
    let cols = *x.shape().last().ok_or_else(|| Error::Input(format!("{what}: {x:?} is a scalar")))?;
    Ok((x.numel() / cols.max(1), cols))
}

/// `x` ([.., cols], any float dtype) quantized to e4m3 with its own scale or scales, as a [rows,
/// cols] matrix: on the host for `Exec::Cpu`; on CUDA in `scratch`, or in memory of its own when
/// `owned` (a weight's twin, which outlives the scratch).
pub fn quantize(ex: &Exec, x: &Tensor, owned: bool, scaling: Fp8Scaling) -> Result<Fp8Matrix> {
    ex.expect_inputs("fp8 quantize", &[x])?;
    let (rows, cols) = matrix_shape("fp8 quantize", x)?;
    match ex {
        Exec::Cpu => {
            let v = x.to_f32_vec()?;
            match scaling {
                Fp8Scaling::Rows => Ok(Fp8Matrix::host_rows(cols, &v)),
                Fp8Scaling::Tensor => {
                    let mut bytes = Vec::with_capacity(v.len());
                    let scale = quantize_host(&v, &mut bytes);
                    let storage = Fp8Storage::Host { bytes, scales: vec![scale] };
                    Ok(Fp8Matrix { rows, cols, scaling, storage, fused_epilogue: false })
                }
            }
        }
        Exec::Cuda { gpu, scratch } => {
            let scale_bytes = match scaling {
                Fp8Scaling::Tensor => 8,
                Fp8Scaling::Rows => 4 * rows.max(1),
            };
            let (bytes, scales) = if owned {
                (DeviceMem::owned(x.numel().max(1), "FP8 weight")?, DeviceMem::owned(scale_bytes, "FP8 weight scales")?)
            } else {
                (gpu.empty_bytes(scratch, x.numel().max(1))?, gpu.empty_bytes(scratch, scale_bytes)?)
            };
            let m =
                Fp8Matrix { rows, cols, scaling, storage: Fp8Storage::Device { bytes, scales }, fused_epilogue: false };
            quantize_into(ex, x, &m)?;
            Ok(m)
        }
    }
}

/// Quantizes `x` again into the device matrix `into`, with its scaling (a weight's twin after the
/// weight changed in place: a LoRA merge or restore). Queued on the stream.
pub fn quantize_into(ex: &Exec, x: &Tensor, into: &Fp8Matrix) -> Result<()> {
    let Exec::Cuda { gpu, .. } = ex else {
        return Err(Error::Internal("fp8 quantize_into runs on CUDA (host weights never change)".into()));
    };
    let (rows, cols) = matrix_shape("fp8 quantize", x)?;
    if [rows, cols] != into.shape() {
        return Err(Error::Internal(format!("fp8 quantize_into: {x:?} into {into:?}")));
    }
    let Fp8Storage::Device { bytes, scales } = &into.storage else {
        return Err(Error::Internal(format!("fp8 quantize_into: {into:?} is on the host")));
    };
    if into.scaling == Fp8Scaling::Rows {
        let p = Fp8QuantizeRowsParams {
            x: x.device_ptr()? as *const _,
            q: bytes.ptr()? as *mut u8,
            scales: scales.ptr()? as *mut f32,
            rows: rows as i64,
            cols: cols as i64,
        };
        let grid = rows.div_ceil(FP8_ROWS_THREADS as usize / 32).max(1) as u32;
        return gpu.launch(kernel_for!("fp8_quantize_rows", x.dtype()), (grid, 1, 1), (FP8_ROWS_THREADS, 1, 1), 0, &p);
    }
    let n = x.numel();
    gpu.fill_bytes(scales, 0)?; // amax = 0 (the scale slot is written by fp8_quantize)
    let scale = scales.ptr()? as *mut f32;
    let amax = unsafe { scale.add(1) };
    let grid = n.div_ceil(8 * 256).clamp(1, 4 * gpu.info().multiprocessors as usize) as u32;
    let a = Fp8AmaxParams { x: x.device_ptr()? as *const _, amax, n: n as i64 };
    gpu.launch(kernel_for!("fp8_amax", x.dtype()), (grid, 1, 1), (256, 1, 1), 0, &a)?;
    let q = Fp8QuantizeParams { x: x.device_ptr()? as *const _, q: bytes.ptr()? as *mut u8, amax, scale, n: n as i64 };
    gpu.launch(kernel_for!("fp8_quantize", x.dtype()), (grid, 1, 1), (256, 1, 1), 0, &q)
}

/// x · wᵀ + bias + residual with both operands in e4m3: x ([.., K], f16 or bf16) is quantized
/// per call with w's scaling, w is a weight's twin [N, K] (`quantize`); the output, bias and
/// residual are in x's dtype. K and N must be multiples of 16 (cuBLASLt's FP8 operand alignment).
pub fn linear_fp8(
    ex: &Exec,
    x: &Tensor,
    w: &Fp8Matrix,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    ex.expect_inputs("linear_fp8", &[x])?;
    fp8_operands_fit(x.dtype(), w)?;
    let (_, k) = matrix_shape("linear_fp8", x)?;
    if w.shape()[1] != k {
        return Err(Error::Input(format!("linear_fp8: input {x:?} and weight {w:?} must share K")));
    }
    let xq = quantize(ex, x, false, w.scaling())?;
    linear_fp8_quantized(ex, &xq, x.shape(), x.dtype(), w, bias, residual)
}

/// What cuBLASLt's FP8 GEMM takes: a 16-bit output, K and N multiples of 16.
fn fp8_operands_fit(dtype: DType, w: &Fp8Matrix) -> Result<()> {
    let [n, k] = w.shape();
    if !k.is_multiple_of(16) || !n.is_multiple_of(16) || dtype == DType::F32 {
        return Err(Error::Input(format!(
            "FP8 linear: weight {w:?} needs K and N multiples of 16 and an f16 or bf16 input ({dtype:?})"
        )));
    }
    Ok(())
}

/// `linear_fp8` on an activation already in e4m3: xq holds the rows of an input of shape
/// `x_shape` ([.., K]) and dtype `dtype`, scaled as w is; the output has x_shape with N last.
pub fn linear_fp8_quantized(
    ex: &Exec,
    xq: &Fp8Matrix,
    x_shape: &[usize],
    dtype: DType,
    w: &Fp8Matrix,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let mut inputs = vec![];
    inputs.extend(bias);
    inputs.extend(residual);
    ex.expect_inputs("linear_fp8", &inputs)?;
    fp8_operands_fit(dtype, w)?;
    let ([m, k], [n, wk]) = (xq.shape(), w.shape());
    if wk != k || x_shape.last() != Some(&k) || x_shape.iter().product::<usize>() != m * k {
        return Err(Error::Input(format!("linear_fp8: input {xq:?} (as {x_shape:?}) and weight {w:?} must share K")));
    }
    if xq.scaling() != w.scaling() {
        return Err(Error::Internal(format!("linear_fp8: {xq:?} by {w:?}: the scalings differ")));
    }
    if let Some(t) = inputs.iter().find(|t| t.dtype() != dtype) {
        return Err(Error::Input(format!("linear_fp8: {t:?} must be {dtype:?} like the input")));
    }
    if let Some(b) = bias.filter(|b| b.shape() != [n]) {
        return Err(Error::Input(format!("linear_fp8: bias {b:?} must be [{n}]")));
    }
    let mut shape = x_shape.to_vec();
    *shape.last_mut().unwrap() = n;
    if let Some(r) = residual.filter(|r| r.shape() != shape) {
        return Err(Error::Input(format!("linear_fp8: residual {r:?} must be the output's shape {shape:?}")));
    }
    match ex {
        Exec::Cpu => {
            let (xv, wv) = (xq.host_values()?, w.host_values()?);
            let bv = bias.map(|b| b.to_f32_vec()).transpose()?;
            let rv = residual.map(|r| r.to_f32_vec()).transpose()?;
            let mut out = vec![0f32; m * n];
            par_rows(&mut out, n, |first, chunk| {
                for (row, y) in chunk.chunks_mut(n).enumerate() {
                    let xr = &xv[(first + row) * k..][..k];
                    for (j, yv) in y.iter_mut().enumerate() {
                        let dot = xr.iter().zip(&wv[j * k..][..k]).map(|(a, b)| a * b).sum::<f32>();
                        *yv = dot
                            + bv.as_ref().map_or(0.0, |b| b[j])
                            + rv.as_ref().map_or(0.0, |r| r[(first + row) * n + j]);
                    }
                }
            });
            host_out(&shape, dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let cc = gpu.info().compute_capability;
            if cc < (8, 9) {
                return Err(Error::Unsupported(format!(
                    "linear_fp8: cuBLASLt's FP8 GEMMs need compute capability 8.9 or later (this device: {}.{})",
                    cc.0, cc.1
                )));
            }
            let y = gpu.empty(scratch, &shape, dtype)?;
            if w.fused_epilogue && (bias.is_some() || residual.is_some()) {
                // Refused before any launch (a shape for which cuBLASLt has no algorithm, or whose
                // every candidate refuses the epilogue): the pass below instead.
                match gemm_fp8(ex, xq, w, bias, residual, &y) {
                    Err(e) if refused_before_launch(&e) => {}
                    r => return r.map(|_| y),
                }
            }
            // The product alone, then bias and residual in one pass.
            gemm_fp8(ex, xq, w, None, None, &y)?;
            match (bias, residual) {
                (Some(b), Some(r)) => residual_add(ex, &y, r, b, None, 1.0),
                (Some(b), None) => add(ex, &y, b, 1.0),
                (None, Some(r)) => add(ex, &y, r, 1.0),
                (None, None) => Ok(y),
            }
        }
    }
}

/// One FP8 linear of 16 rows through `w`, waited for: a device whose cuBLASLt refuses FP8 GEMMs
/// (of w's scaling) is named when the twins are made (Error::Unsupported), not in the middle of a
/// render. Then the epilogue is tried: w is returned with `fused_epilogue` on where the GEMM's
/// epilogue adds a bias, a residual and both as the pass after it does (within the output's
/// rounding), else off (said on stderr). A scale wrongly applied to C or the bias, or an epilogue
/// dropped, moves the output by far more than the tolerance.
pub fn probe(ex: &Exec, w: Fp8Matrix, dtype: DType) -> Result<Fp8Matrix> {
    let Exec::Cuda { gpu, scratch } = ex else { return Ok(w) };
    let [n, k] = w.shape();
    let rows = 16;
    // Rows of different magnitudes, so that per-row scales differ.
    let values: Vec<f32> = (0..rows * k).map(|i| ((i % 7) as f32 * 0.25 - 0.75) * (1 + i / k) as f32).collect();
    let upload = |shape: &[usize], values: &[f32]| gpu.upload(scratch, &Tensor::from_f32(shape, dtype, values)?, dtype);
    let x = upload(&[rows, k], &values)?;
    linear_fp8(ex, &x, &w, None, None).and_then(|_| gpu.synchronize()).map_err(|e| {
        Error::Unsupported(format!("FP8 linears: this device's cuBLASLt refused an FP8 GEMM of {w:?} ({e})"))
    })?;
    let bias = upload(&[n], &(0..n).map(|j| (j % 5) as f32 * 0.5 - 1.0).collect::<Vec<_>>())?;
    let residual = upload(&[rows, n], &(0..rows * n).map(|i| (i % 11) as f32 * 0.5 - 2.5).collect::<Vec<_>>())?;
    let tolerance = match dtype {
        DType::BF16 => 1.6e-2,
        _ => 2e-3, // four units of f16 rounding: the pass rounds the product once more
    };
    let mut w = w;
    let mut run = |fused: bool, b: Option<&Tensor>, r: Option<&Tensor>| {
        w.fused_epilogue = fused;
        linear_fp8(ex, &x, &w, b, r).and_then(|y| gpu.download(&y))
    };
    let mut differs = None;
    for (b, r) in [(Some(&bias), None), (None, Some(&residual)), (Some(&bias), Some(&residual))] {
        let form = format!("bias {}, residual {}", b.is_some(), r.is_some());
        let epilogue = run(true, b, r).and_then(|got| compare("FP8 epilogue", &got, &run(false, b, r)?, tolerance));
        differs = match epilogue {
            Ok(c) if c.ok() => continue,
            Ok(c) => Some(format!(
                "{:.2e} (relative L2, {} non-finite) from the pass after it ({form})",
                c.rel_l2, c.non_finite
            )),
            Err(e) => Some(format!("{e} ({form})")),
        };
        break;
    }
    w.fused_epilogue = differs.is_none();
    if let Some(why) = differs {
        eprintln!("note: FP8 linears add bias and residual in a pass after the GEMM here: its epilogue gave {why}");
    }
    Ok(w)
}

/// The FP8 GEMM alone on quantized operands: y[m, n] = (x · wᵀ) scaled + bias + residual, with y
/// (and bias, residual) in a 16-bit dtype; CUDA only (`linear_fp8` checks the shapes; benches
/// time the product apart from the activation's quantization through it).
pub fn gemm_fp8(
    ex: &Exec,
    x: &Fp8Matrix,
    w: &Fp8Matrix,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    y: &Tensor,
) -> Result<()> {
    let Exec::Cuda { gpu, .. } = ex else { return Err(Error::Internal("gemm_fp8 runs on CUDA".into())) };
    let ([m, k], [n, wk]) = (x.shape(), w.shape());
    if wk != k || y.numel() != m * n || x.scaling() != w.scaling() {
        return Err(Error::Internal(format!("gemm_fp8: {x:?} by {w:?} into {y:?}")));
    }
    let ((xb, xs), (wb, ws)) = (x.device()?, w.device()?);
    let b = bias.map(|b| b.device_ptr()).transpose()?;
    let g =
        Gemm { fp8: true, fp8_rows: x.scaling() == Fp8Scaling::Rows, ..Gemm::linear(m, n, k, y.dtype(), b.is_some()) };
    let c = residual.map(|r| Ok::<_, Error>((r.device_ptr()?, 1.0))).transpose()?;
    let io = GemmIo { a: xb, b: wb, d: y.device_ptr()?, bias: b, c, alpha: 1.0, scales: Some((xs, ws)) };
    gpu.blas()?.gemm(gpu, &g, io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_e4m3_value_round_trips() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                assert!(b & 0x7F == 0x7F, "byte {b:#04x}");
                assert_eq!(e4m3_from_f32(v) & 0x7F, 0x7F);
            } else {
                assert_eq!(e4m3_from_f32(v), b, "byte {b:#04x} = {v}");
            }
        }
    }

    #[test]
    fn e4m3_rounds_to_nearest_even_and_saturates() {
        // the format's landmarks: 1, the largest value, the smallest normal and subnormal
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        // between 1 (mantissa 0, even) and 1.125 (odd): the tie goes to 1, above it to 1.125
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        assert_eq!(e4m3_from_f32(1.0626), 0x39);
        // between 1.125 and 1.25 (even): the tie goes up
        assert_eq!(e4m3_from_f32(1.1875), 0x3A);
        // a tie between subnormals 2^-9 (odd) and 2 · 2^-9 (even), and half the smallest (to 0)
        assert_eq!(e4m3_from_f32(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(e4m3_from_f32(0.5 * 2f32.powi(-9)), 0x00);
        assert_eq!(e4m3_from_f32(-0.75 * 2f32.powi(-9)), 0x81);
        // the largest subnormal rounds up into the normals: 7.5 · 2^-9 -> 2^-6
        assert_eq!(e4m3_from_f32(7.5 * 2f32.powi(-9)), 0x08);
        // a mantissa carry into the next exponent: 1.9375 -> 2
        assert_eq!(e4m3_from_f32(1.9375), 0x40);
        // saturation, for infinities too
        for (v, b) in [(460.0, 0x7E), (1e9, 0x7E), (f32::INFINITY, 0x7E), (-500.0, 0xFE), (f32::NEG_INFINITY, 0xFE)] {
            assert_eq!(e4m3_from_f32(v), b, "{v}");
        }
        assert!(e4m3_to_f32(e4m3_from_f32(f32::NAN)).is_nan());
    }

    #[test]
    fn quantized_values_are_within_half_a_step() {
        let x: Vec<f32> = (0..4096).map(|i| ((i as f32 * 0.37).sin() * 3.0).powi(3) * (1 + i / 64) as f32).collect();
        let t = Tensor::from_f32(&[64, 64], DType::F32, &x).unwrap();
        for scaling in [Fp8Scaling::Tensor, Fp8Scaling::Rows] {
            let q = quantize(&Exec::Cpu, &t, false, scaling).unwrap();
            let (bytes, scales) = q.to_host(&Exec::Cpu).unwrap();
            // one scale, or one per row: the largest magnitude it covers maps to 448
            let amaxes: Vec<f32> = match scaling {
                Fp8Scaling::Tensor => vec![x.iter().fold(0f32, |m, v| m.max(v.abs()))],
                Fp8Scaling::Rows => x.chunks(64).map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs()))).collect(),
            };
            assert_eq!(scales, amaxes.iter().map(|a| a / 448.0).collect::<Vec<_>>(), "{scaling:?}");
            for (i, (v, &b)) in x.iter().zip(&bytes).enumerate() {
                let scale = scales[if scaling == Fp8Scaling::Rows { i / 64 } else { 0 }];
                let back = e4m3_to_f32(b) * scale;
                // 3 mantissa bits: within 1/16 relative, or half a subnormal step absolute
                let bound = (v.abs() / 16.0).max(scale * 2f32.powi(-10));
                assert!((back - v).abs() <= bound * 1.0001, "{scaling:?}: {v} -> {back}");
            }
            // each row's largest magnitude maps to ±448 exactly with its own scale
            if scaling == Fp8Scaling::Rows {
                assert!(bytes.chunks(64).all(|r| r.iter().any(|&b| b & 0x7F == 0x7E)));
            } else {
                assert!(bytes.iter().any(|&b| b & 0x7F == 0x7E));
            }
        }
    }

    #[test]
    fn an_all_zero_tensor_or_row_gets_scale_one() {
        let t = Tensor::from_f32(&[2, 16], DType::F16, &[0.0; 32]).unwrap();
        let q = quantize(&Exec::Cpu, &t, false, Fp8Scaling::Tensor).unwrap().to_host(&Exec::Cpu).unwrap();
        assert_eq!(q, (vec![0; 32], vec![1.0]));
        let mut v = vec![0.0; 32];
        v[20] = 4.48;
        let t = Tensor::from_f32(&[2, 16], DType::F32, &v).unwrap();
        let (bytes, scales) = quantize(&Exec::Cpu, &t, false, Fp8Scaling::Rows).unwrap().to_host(&Exec::Cpu).unwrap();
        assert_eq!(scales, vec![1.0, 0.01]);
        assert_eq!(bytes[20], 0x7E);
        assert!(bytes.iter().enumerate().all(|(i, &b)| i == 20 || b == 0));
    }

    /// x · wᵀ (+ b) in f32 and through e4m3 with `scaling`: the FP8 result's rel L2 from the
    /// exact one, over the whole output and the worst over its rows (tokens).
    fn fp8_linear_error(scaling: Fp8Scaling, xv: &[f32], wv: &[f32], [m, k, n]: [usize; 3], bias: bool) -> (f32, f32) {
        let bv: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        let x = Tensor::from_f32(&[m, k], DType::F16, xv).unwrap();
        let w = Tensor::from_f32(&[n, k], DType::F16, wv).unwrap();
        let b = Tensor::from_f32(&[n], DType::F16, &bv).unwrap();
        let b = bias.then_some(&b);
        let ex = Exec::Cpu;
        let exact = super::super::linear::linear(&ex, &x, &w, b).unwrap().to_f32_vec().unwrap();
        let wq = quantize(&ex, &w, true, scaling).unwrap();
        let fp8 = linear_fp8(&ex, &x, &wq, b, None).unwrap().to_f32_vec().unwrap();
        let rel = |(e, f): (&[f32], &[f32])| {
            let err: f32 = e.iter().zip(f).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
            err / e.iter().map(|a| a * a).sum::<f32>().sqrt()
        };
        (rel((&exact, &fp8)), exact.chunks(n).zip(fp8.chunks(n)).map(rel).fold(0.0, f32::max))
    }

    #[test]
    fn the_fp8_linear_is_close_to_the_f32_one_and_refuses_odd_shapes() {
        let (m, k, n) = (8, 64, 32);
        let xv: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 2.0).collect();
        let wv: Vec<f32> = (0..n * k).map(|i| ((i * 104729 % 197) as f32 / 98.0 - 1.0) * 0.1).collect();
        for scaling in [Fp8Scaling::Tensor, Fp8Scaling::Rows] {
            // e4m3 rounds each operand by up to 1/16: the product's error averages down over K
            let (err, _) = fp8_linear_error(scaling, &xv, &wv, [m, k, n], true);
            assert!(err < 0.05 && err > 0.0, "{scaling:?}: rel L2 {err}");
            let ex = Exec::Cpu;
            let odd = Tensor::from_f32(&[m, 40], DType::F16, &vec![1.0; m * 40]).unwrap();
            let w40 = Tensor::from_f32(&[n, 40], DType::F16, &vec![1.0; n * 40]).unwrap();
            let w40 = quantize(&ex, &w40, true, scaling).unwrap();
            assert!(matches!(linear_fp8(&ex, &odd, &w40, None, None), Err(Error::Input(_))));
        }
    }

    #[test]
    fn per_row_scales_follow_rows_of_different_magnitudes() {
        // tokens whose magnitudes span 2^20, beyond e4m3's 2^15 of normal range: one scale per
        // tensor leaves the small tokens to the subnormal steps or zero, a scale per row keeps 3
        // mantissa bits for every token
        let (m, k, n) = (16, 64, 32);
        let magnitude = |r: usize| 2f32.powi((r % 11) as i32 * 2 - 10);
        let xv: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * magnitude(i / k)).collect();
        let wv: Vec<f32> = (0..n * k).map(|i| ((i * 104729 % 197) as f32 / 98.0 - 1.0) * 0.1).collect();
        let (_, tensor) = fp8_linear_error(Fp8Scaling::Tensor, &xv, &wv, [m, k, n], false);
        let (_, rows) = fp8_linear_error(Fp8Scaling::Rows, &xv, &wv, [m, k, n], false);
        assert!(rows < 0.1 && tensor > 0.5, "worst token: per tensor {tensor}, per row {rows}");
    }
}
