//! Group norm (optionally fused with SiLU; statistics per image or across the frames of a video)
//! and layer norm. Statistics are fp32 on the GPU and f64 in the twins.

use super::{Exec, host_out, par_rows, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::params::{
    GROUP_NORM_CONTROL_STRIDE, GROUP_NORM_VECS_16BIT, GROUP_NORM_VECS_F32, GroupNormParams, LayerNormParams,
};
use crate::tensor::{DType, Tensor};

use super::elementwise::silu_f32;

#[derive(Clone, Copy, Debug)]
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f32,
    /// Apply SiLU to the output (ResNet blocks: GN then SiLU).
    pub silu: bool,
    /// Images sharing statistics: 1 = per image; F = across the F frames of each video
    /// (AnimateDiff's motion-module norm). The batch must be a multiple of it.
    pub frames: usize,
}

/// Work layout knobs of the GPU kernel, exposed for benchmarking sweeps.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupNormTuning {
    /// Resident blocks per multiprocessor (0 = as many as fit).
    pub blocks_per_sm: u32,
    /// Domains between statistics and normalisation in two-phase mode (0 = the default, 1).
    pub lag: u32,
    /// Resident mode (one read of x; needs a domain's chunks to fit the grid). Measured slower than
    /// two-phase on the H100 (benches/RESULTS.md), so opt-in.
    pub resident: bool,
}

struct GnShape {
    domains: usize,
    pixels: usize,
    channels: usize,
}

fn gn_shape(x: &Tensor, cfg: &GroupNorm) -> Result<GnShape> {
    let s = x.shape();
    if s.len() < 2 {
        return Err(Error::Input(format!("group_norm: {x:?} must be [N, ..., C]")));
    }
    let (n, c) = (s[0], s[s.len() - 1]);
    if cfg.groups == 0 || c % cfg.groups != 0 {
        return Err(Error::Input(format!("group_norm: {} groups do not divide {c} channels", cfg.groups)));
    }
    if cfg.frames == 0 || n % cfg.frames != 0 {
        return Err(Error::Input(format!("group_norm: batch {n} is not a multiple of {} frames", cfg.frames)));
    }
    Ok(GnShape { domains: n / cfg.frames, pixels: cfg.frames * x.numel() / (n * c).max(1), channels: c })
}

/// y = (x - mean_g) / sqrt(var_g + eps) * gamma + beta, then SiLU if asked; x is NHWC [N, ..., C].
pub fn group_norm(ex: &Exec, x: &Tensor, gamma: &Tensor, beta: &Tensor, cfg: GroupNorm) -> Result<Tensor> {
    group_norm_tuned(ex, x, gamma, beta, cfg, GroupNormTuning::default())
}

pub fn group_norm_tuned(
    ex: &Exec,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNorm,
    tuning: GroupNormTuning,
) -> Result<Tensor> {
    ex.expect_inputs("group_norm", &[x, gamma, beta])?;
    let dtype = same_dtype("group_norm", &[x, gamma, beta])?;
    let sh = gn_shape(x, &cfg)?;
    if gamma.shape() != [sh.channels] || beta.shape() != [sh.channels] {
        return Err(Error::Input(format!("group_norm: gamma {gamma:?} / beta {beta:?} must be [{}]", sh.channels)));
    }
    match ex {
        Exec::Cpu => group_norm_cpu(x, gamma, beta, &cfg, &sh, dtype),
        Exec::Cuda { gpu, scratch } => {
            let c = sh.channels;
            if c % 8 != 0 || c > 4096 || cfg.groups > 128 {
                return Err(Error::Unsupported(format!(
                    "group_norm kernel needs channels a multiple of 8 and at most 4096, groups at most 128 (got {c} channels, {} groups)",
                    cfg.groups
                )));
            }
            let kernel = kernel_for!("group_norm", dtype);
            let v = c / 8;
            let rows = (256 / v).clamp(1, 512 / v);
            let threads = (rows * v) as u32;
            let vecs = if dtype == DType::F32 { GROUP_NORM_VECS_F32 } else { GROUP_NORM_VECS_16BIT } as usize;
            let chunks = sh.pixels.div_ceil(rows * vecs);
            // The chunk, the block reduction buffer, the channel -> group table (params.h).
            let shared = rows * vecs * c * dtype.size() + rows * c * 2 * 4 + c;
            let items = 2 * sh.domains * chunks;
            let fit = gpu.occupancy(kernel, threads, shared)?.max(1);
            let per_sm = if tuning.blocks_per_sm > 0 { tuning.blocks_per_sm.min(fit) } else { fit };
            let grid = ((gpu.info().multiprocessors * per_sm) as usize).min(items).max(1);
            // Lag 1 measured fastest on the H100 (benches/RESULTS.md): the second read stays in L2.
            let lag = if tuning.lag > 0 { tuning.lag as usize } else { 1 }.clamp(1, sh.domains);
            // Resident mode keeps a whole domain on chip across the grid: one read of x.
            let resident = tuning.resident && chunks <= grid;

            let y = gpu.empty(scratch, x.shape(), dtype)?;
            let workspace = scratch.alloc(group_norm_workspace_bytes(sh.domains, cfg.groups))?;
            gpu.fill_bytes(&workspace, 0)?;
            let p = GroupNormParams {
                x: x.device_ptr()? as *const _,
                y: y.device_ptr()? as *mut _,
                gamma: gamma.device_ptr()? as *const _,
                beta: beta.device_ptr()? as *const _,
                workspace: workspace.ptr()? as *mut u32,
                domains: sh.domains as i64,
                pixels: sh.pixels as i64,
                channels: c as i32,
                groups: cfg.groups as i32,
                rows: rows as i32,
                chunks: chunks as i32,
                lag: lag as i32,
                resident: resident as i32,
                silu: cfg.silu as i32,
                eps: cfg.eps,
            };
            let (grid, block) = ((grid as u32, 1, 1), (threads, 1, 1));
            if resident {
                gpu.launch_cooperative(kernel, grid, block, shared as u32, &p)?;
            } else {
                gpu.launch(kernel, grid, block, shared as u32, &p)?;
            }
            Ok(y)
        }
    }
}

/// GROUP_NORM_WORKSPACE_BYTES of params.h (bindgen does not carry function-like macros).
fn group_norm_workspace_bytes(domains: usize, groups: usize) -> usize {
    (domains + 1) * GROUP_NORM_CONTROL_STRIDE as usize * 4 + domains * groups * 16
}

fn group_norm_cpu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: &GroupNorm,
    sh: &GnShape,
    dtype: DType,
) -> Result<Tensor> {
    let xv = x.to_f32_vec()?;
    let (g, b) = (gamma.to_f32_vec()?, beta.to_f32_vec()?);
    let (c, cpg) = (sh.channels, sh.channels / cfg.groups);
    let domain_len = sh.pixels * c;
    let mut out = vec![0f32; xv.len()];
    par_rows(&mut out, domain_len, |first, chunk| {
        for (k, y) in chunk.chunks_mut(domain_len).enumerate() {
            let xs = &xv[(first + k) * domain_len..(first + k + 1) * domain_len];
            for grp in 0..cfg.groups {
                let values =
                    || xs.chunks_exact(c).flat_map(|px| px[grp * cpg..(grp + 1) * cpg].iter().map(|&v| v as f64));
                let n = (sh.pixels * cpg) as f64;
                let mean = values().sum::<f64>() / n;
                let var = values().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
                let rstd = 1.0 / (var + cfg.eps as f64).sqrt();
                for (px, ypx) in xs.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
                    for ch in grp * cpg..(grp + 1) * cpg {
                        let v = ((px[ch] as f64 - mean) * rstd) as f32 * g[ch] + b[ch];
                        ypx[ch] = if cfg.silu { silu_f32(v) } else { v };
                    }
                }
            }
        }
    });
    host_out(x.shape(), dtype, &out)
}

/// Layer norm over the last dimension; gamma / beta optional ([C] each).
pub fn layer_norm(ex: &Exec, x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    let mut inputs = vec![x];
    inputs.extend(gamma);
    inputs.extend(beta);
    ex.expect_inputs("layer_norm", &inputs)?;
    let dtype = same_dtype("layer_norm", &inputs)?;
    let c = *x.shape().last().ok_or_else(|| Error::Input("layer_norm: scalar input".into()))?;
    if let Some(t) = [gamma, beta].into_iter().flatten().find(|t| t.shape() != [c]) {
        return Err(Error::Input(format!("layer_norm: {t:?} must be [{c}]")));
    }
    let rows = x.numel() / c.max(1);
    match ex {
        Exec::Cpu => {
            let xv = x.to_f32_vec()?;
            let g = gamma.map(|t| t.to_f32_vec()).transpose()?;
            let b = beta.map(|t| t.to_f32_vec()).transpose()?;
            let mut out = vec![0f32; xv.len()];
            par_rows(&mut out, c, |first, chunk| {
                for (k, y) in chunk.chunks_mut(c).enumerate() {
                    let row = &xv[(first + k) * c..(first + k + 1) * c];
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
                    let rstd = 1.0 / (var + eps as f64).sqrt();
                    for (j, yv) in y.iter_mut().enumerate() {
                        let n = ((row[j] as f64 - mean) * rstd) as f32;
                        *yv = n * g.as_ref().map_or(1.0, |g| g[j]) + b.as_ref().map_or(0.0, |b| b[j]);
                    }
                }
            });
            host_out(x.shape(), dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, x.shape(), dtype)?;
            let ptr = |t: Option<&Tensor>| -> Result<*const std::ffi::c_void> {
                Ok(match t {
                    Some(t) => t.device_ptr()? as *const _,
                    None => std::ptr::null(),
                })
            };
            let p = LayerNormParams {
                x: x.device_ptr()? as *const _,
                y: y.device_ptr()? as *mut _,
                gamma: ptr(gamma)?,
                beta: ptr(beta)?,
                rows: rows as i64,
                channels: c as i32,
                eps,
            };
            const WARPS: usize = 8;
            gpu.launch(
                kernel_for!("layer_norm", dtype),
                (rows.div_ceil(WARPS) as u32, 1, 1),
                (32 * WARPS as u32, 1, 1),
                0,
                &p,
            )?;
            Ok(y)
        }
    }
}
