//! Linear layer: y[..., N] = x[..., K] · w[N, K]ᵀ + bias[N] (PyTorch weight layout), through
//! cuBLASLt with the bias in the epilogue and fp32 accumulation; and the GEGLU projection with GEGLU
//! in the epilogue of our own Hopper GEMM. A weight with an e4m3 twin runs as an FP8 linear
//! (`ops::fp8`).

use std::sync::OnceLock;

use super::elementwise::geglu;
use super::fp8::{Fp8Matrix, linear_fp8};
use super::{Exec, host_out, par_rows, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::ClusterScheduling;
use crate::gpu::blas::{Gemm, GemmIo};
use crate::gpu::params::{
    GEGLU_LINEAR_BK, GEGLU_LINEAR_BM, GEGLU_LINEAR_BN, GEGLU_LINEAR_SHARED, GEGLU_LINEAR_THREADS, GegluLinearParams,
};
use crate::gpu::tma::tensor_map;
use crate::tensor::{DType, Tensor};

/// A linear's weight [N, K] and, where the model runs the linear in FP8, the weight's e4m3 twin
/// (`ModelWeights::enable_fp8`), which the product then uses instead.
#[derive(Clone, Copy)]
pub struct LinearWeight<'a> {
    pub matrix: &'a Tensor,
    pub fp8: Option<&'a Fp8Matrix>,
}

impl<'a> From<&'a Tensor> for LinearWeight<'a> {
    fn from(matrix: &'a Tensor) -> LinearWeight<'a> {
        LinearWeight { matrix, fp8: None }
    }
}

pub fn linear<'w>(ex: &Exec, x: &Tensor, w: impl Into<LinearWeight<'w>>, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_add(ex, x, w, bias, None)
}

/// x · wᵀ + bias + residual: a projection and the residual stream it joins in one pass (on CUDA the
/// residual is added in cuBLASLt's epilogue, rounded once with the product). residual has the
/// output's shape.
pub fn linear_add<'w>(
    ex: &Exec,
    x: &Tensor,
    w: impl Into<LinearWeight<'w>>,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let LinearWeight { matrix: w, fp8 } = w.into();
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
    if let Some(q) = fp8 {
        if q.shape() != [n, k] {
            return Err(Error::Internal(format!("linear: the FP8 twin {q:?} of {w:?} has another shape")));
        }
        return linear_fp8(ex, x, q, bias, residual);
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
            let io = GemmIo {
                a: x.device_ptr()?,
                b: w.device_ptr()?,
                d: y.device_ptr()?,
                bias: b,
                c,
                alpha: 1.0,
                scales: None,
            };
            gpu.blas()?.gemm(gpu, &g, io)?;
            Ok(y)
        }
    }
}

/// Which route `linear_geglu` takes (tests and benchmarks pick one; model code takes `Auto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GegluLinear {
    /// On compute capability 9.0 `Fused` wherever its shape rules hold, `Composed` elsewhere
    /// (`auto_geglu_route`), unless `CELFRAME_GEGLU_LINEAR` (`fused` or `composed`, read once per
    /// process) says otherwise: for A/B runs of whole models.
    #[default]
    Auto,
    /// One Hopper kernel with GEGLU fused after the GEMM (kernels/gemm/geglu_linear_sm90.cu): the
    /// consumer warpgroups stage the biased values and gates (rounded to the dtype, as the composed
    /// route's GEMM writes them) in shared memory and go on to their next tile's products while
    /// spare warps finish GEGLU; at K <= `FINISH_MAX_K` the consumers finish it themselves
    /// (`FusedFinish`). f16 / bf16, D a multiple of GEGLU_LINEAR_BN (128) and K of 8, compute
    /// capability 9.0.
    Fused,
    /// The fused kernel's entry in which the spare warps compute GEGLU (tests and benchmarks;
    /// `Fused` picks it above `FINISH_MAX_K`).
    FusedHandoff,
    /// The fused kernel's entry in which the consumers stage finished GEGLU outputs and the spare
    /// warps only write them out (tests and benchmarks; `Fused` picks it up to `FINISH_MAX_K`).
    FusedFinish,
    /// cuBLASLt's projection to [.., 2D] (bias in its epilogue), then the `geglu` pass.
    Composed,
}

impl GegluLinear {
    /// The names `CELFRAME_GEGLU_LINEAR` takes.
    fn parse(name: &str) -> std::result::Result<GegluLinear, String> {
        match name {
            "fused" => Ok(GegluLinear::Fused),
            "composed" => Ok(GegluLinear::Composed),
            _ => Err(format!("CELFRAME_GEGLU_LINEAR='{name}' is not a route (expected fused or composed)")),
        }
    }

    fn from_env() -> Result<Option<GegluLinear>> {
        static CHOICE: OnceLock<Option<std::result::Result<GegluLinear, String>>> = OnceLock::new();
        super::env_route(&CHOICE, "CELFRAME_GEGLU_LINEAR", GegluLinear::parse)
    }
}

/// The fused kernel's shape rules: compute capability 9.0, f16 / bf16, D a multiple of
/// GEGLU_LINEAR_BN and K of 8, rows and 2D within its 32-bit indices.
fn fused_geglu_fits(cc: (i32, i32), dtype: DType, rows: usize, k: usize, dim: usize) -> bool {
    cc == (9, 0)
        && matches!(dtype, DType::F16 | DType::BF16)
        && rows > 0
        && rows < i32::MAX as usize
        && 2 * dim < i32::MAX as usize
        && k.is_multiple_of(8)
        && dim.is_multiple_of(GEGLU_LINEAR_BN as usize)
}

/// `Auto`'s route without `CELFRAME_GEGLU_LINEAR`: the fused kernel wherever its shape rules hold,
/// the composed route elsewhere. The fused kernel is the faster at every SDXL shape (H100, same
/// call, 2026-12-06): M18432 K1280 D5120 0.724 ms against composed 0.866, M73728 K640 D2560 0.885
/// against 1.104, M294912 K320 D1280 1.344 against 1.659.
fn auto_geglu_route(cc: (i32, i32), dtype: DType, rows: usize, k: usize, dim: usize) -> GegluLinear {
    if fused_geglu_fits(cc, dtype, rows, k, dim) { GegluLinear::Fused } else { GegluLinear::Composed }
}

/// The deepest K at which the fused kernel's consumers finish GEGLU themselves: at K 320 (the motion
/// modules' level 0) the three spare warps' GELU of a tile outlasted its five k steps of products.
const FINISH_MAX_K: usize = 384;

/// The GEGLU feed-forward's first step, geglu(x · wᵀ + bias): w [2D, K] holds the value rows first
/// and the gate rows second (diffusers' GEGLU projects, then chunks into hidden states and gate);
/// [.., K] -> [.., D], value · gelu(gate) with the exact GELU. The CPU twin is `linear` then `geglu`.
/// With an FP8 twin, the projection is an FP8 linear and GEGLU (with the bias) the `geglu` pass after it.
pub fn linear_geglu<'w>(
    ex: &Exec,
    x: &Tensor,
    w: impl Into<LinearWeight<'w>>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    linear_geglu_with(ex, x, w, bias, GegluLinear::Auto)
}

/// `linear_geglu` through a chosen route.
pub fn linear_geglu_with<'w>(
    ex: &Exec,
    x: &Tensor,
    w: impl Into<LinearWeight<'w>>,
    bias: Option<&Tensor>,
    route: GegluLinear,
) -> Result<Tensor> {
    let weight = w.into();
    let w = weight.matrix;
    if weight.fp8.is_some() {
        // The FP8 product alone (cuBLASLt takes no bias epilogue there), the bias inside GEGLU's
        // pass: one pass over the [.., 2D] projection instead of two.
        return geglu(ex, &linear(ex, x, weight, None)?, bias);
    }
    let Exec::Cuda { gpu, scratch } = ex else {
        return geglu(ex, &linear(ex, x, weight, bias)?, None);
    };
    let (k, two_d) = match (x.shape().last(), w.shape()) {
        (Some(&k), &[n, wk]) if wk == k && n % 2 == 0 && n > 0 => (k, n),
        _ => {
            return Err(Error::Input(format!(
                "linear_geglu: weight {w:?} must be [2D, {:?}] for input {x:?}",
                x.shape().last()
            )));
        }
    };
    let dim = two_d / 2;
    let rows = x.numel() / k.max(1);
    let dtype = x.dtype();
    let cc = gpu.info().compute_capability;
    let route = match route {
        GegluLinear::Auto => GegluLinear::from_env()?.unwrap_or_else(|| auto_geglu_route(cc, dtype, rows, k, dim)),
        r => r,
    };
    if route == GegluLinear::Composed {
        return geglu(ex, &linear(ex, x, w, bias)?, None);
    }
    if !fused_geglu_fits(cc, dtype, rows, k, dim) {
        return Err(Error::Unsupported(format!(
            "linear_geglu: the fused Hopper kernel takes f16 / bf16, D a multiple of {GEGLU_LINEAR_BN} and K of 8 on \
             compute capability 9.0 (got x {x:?}, w {w:?} on {}.{})",
            cc.0, cc.1
        )));
    }
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    ex.expect_inputs("linear_geglu", &inputs)?;
    same_dtype("linear_geglu", &inputs)?;
    if let Some(b) = bias.filter(|b| b.shape() != [two_d]) {
        return Err(Error::Input(format!("linear_geglu: bias {b:?} must be [{two_d}]")));
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = dim;
    let y = gpu.empty(scratch, &shape, dtype)?;
    // x in boxes of a tile's 128 rows, w in boxes of its 128 value (or gate) rows.
    let boxes = [GEGLU_LINEAR_BK, GEGLU_LINEAR_BM];
    let p = GegluLinearParams {
        x_map: tensor_map("linear_geglu x", x.device_ptr()?, dtype, &[k as u64, rows as u64], &[k as i64], &boxes)?,
        w_map: tensor_map("linear_geglu w", w.device_ptr()?, dtype, &[k as u64, two_d as u64], &[k as i64], &boxes)?,
        bias: bias.map(|b| b.device_ptr()).transpose()?.unwrap_or(0) as *const _,
        y: y.device_ptr()? as *mut _,
        rows: rows as i64,
        k: k as i32,
        dim: dim as i32,
    };
    // Persistent: as many 2-block clusters as run at once (a GPC's odd multiprocessor stays idle),
    // each walking the pairs of row tiles with the grid's stride.
    let finish = match route {
        GegluLinear::FusedFinish => true,
        GegluLinear::FusedHandoff => false,
        _ => k <= FINISH_MAX_K,
    };
    let kernel = match finish {
        true => kernel_for!("geglu_linear_finish_sm90", dtype),
        false => kernel_for!("geglu_linear_sm90", dtype),
    };
    let cluster = (2, ClusterScheduling::Spread);
    let pairs = rows.div_ceil(2 * GEGLU_LINEAR_BM as usize) * (dim / GEGLU_LINEAR_BN as usize);
    let resident = gpu.max_active_clusters(kernel, GEGLU_LINEAR_THREADS, cluster, GEGLU_LINEAR_SHARED as usize)?;
    if resident == 0 {
        return Err(Error::Unsupported(format!("linear_geglu: no 2-block cluster of {kernel} fits this device")));
    }
    let grid = 2 * pairs.min(resident as usize) as u32;
    gpu.launch_clustered(kernel, (grid, 1, 1), (GEGLU_LINEAR_THREADS, 1, 1), cluster, GEGLU_LINEAR_SHARED, &p)?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::KERNEL_MODULES;

    #[test]
    fn the_geglu_route_variable_takes_the_route_names_only() {
        assert_eq!(GegluLinear::parse("fused"), Ok(GegluLinear::Fused));
        assert_eq!(GegluLinear::parse("composed"), Ok(GegluLinear::Composed));
        for bad in ["", "auto", "Fused", "fused-pingpong"] {
            let err = GegluLinear::parse(bad).unwrap_err();
            assert!(err.contains("CELFRAME_GEGLU_LINEAR") && err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn auto_takes_the_fused_kernel_on_hopper_where_its_shape_rules_hold() {
        let hopper = (9, 0);
        // The motion modules' level 0 (K 320), the UNet's levels 1 and 2 at 32 and 2 images.
        for (dtype, rows, k, dim) in [
            (DType::F16, 294_912, 320, 1280),
            (DType::BF16, 333, 320, 1280),
            (DType::F16, 73_728, 640, 2560),
            (DType::F16, 8_192, 640, 2560),
            (DType::F16, 18_432, 1280, 5120),
        ] {
            assert_eq!(auto_geglu_route(hopper, dtype, rows, k, dim), GegluLinear::Fused, "{dtype:?} {rows} {k} {dim}");
        }
        // Another device, f32, no rows, a D off the 128-wide tile, a K off 8.
        for (cc, dtype, rows, k, dim) in [
            ((8, 9), DType::F16, 294_912, 320, 1280),
            (hopper, DType::F32, 294_912, 320, 1280),
            (hopper, DType::F16, 0, 320, 1280),
            (hopper, DType::F16, 100, 640, 192),
            (hopper, DType::F16, 100, 300, 1280),
        ] {
            assert_eq!(
                auto_geglu_route(cc, dtype, rows, k, dim),
                GegluLinear::Composed,
                "{cc:?} {dtype:?} {rows} {k} {dim}"
            );
        }
    }

    #[test]
    fn the_fused_geglu_entries_are_compiled_for_hopper_without_spills() {
        // ptxas's sm_90a report: a missing name would only show on a GPU; a spill (local memory
        // next to the consumers' 128 accumulators) would stall the epilogue.
        let resources: Vec<_> = KERNEL_MODULES.iter().flat_map(|m| m.sm90_resources.iter()).collect();
        for dtype in [DType::F16, DType::BF16] {
            for name in [kernel_for!("geglu_linear_sm90", dtype), kernel_for!("geglu_linear_finish_sm90", dtype)] {
                let r = resources.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{name} is not compiled"));
                assert!(r.registers > 0 && r.spill_bytes == 0 && r.stack_bytes == 0, "{r:?}");
            }
        }
    }
}
