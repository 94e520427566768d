//! Group norm (optionally fused with SiLU; statistics per image or across the frames of a video)
//! and layer norm (to the input's dtype, or to e4m3 rows for an FP8 linear). Statistics are fp32
//! on the GPU and f64 in the twins.

use super::concat::concat_last;
use super::{Exec, host_out, par_map, par_rows, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::ClusterScheduling;
use crate::gpu::params::{
    GROUP_NORM_CLUSTER_MAX_SLICE_GROUPS, GROUP_NORM_CONTROL_STRIDE, GROUP_NORM_VECS_16BIT, GROUP_NORM_VECS_F32,
    GroupNormClusterParams, GroupNormParams, LAYER_NORM_THREADS, LayerNormParams,
};
use crate::tensor::{DType, Tensor};

use super::elementwise::silu_f32;
use super::fp8::Fp8Matrix;

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

/// Work layout knobs of the GPU kernels, exposed for benchmarking sweeps.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupNormTuning {
    pub mode: GroupNormMode,
    /// Two-phase mode: resident blocks per multiprocessor (0 = as many as fit).
    pub blocks_per_sm: u32,
    /// Domains between statistics and normalisation in two-phase mode (0 = the default, 1).
    pub lag: u32,
    /// Cluster mode: pixels a block steps over at a time (0 = default_rows).
    pub cluster_rows: u32,
    /// Cluster mode: how the driver places a cluster's blocks.
    pub cluster_scheduling: ClusterScheduling,
}

/// Which GPU kernel runs a group norm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupNormMode {
    /// Clusters where the shape fits them (sm_90 and a domain slice fitting a cluster's shared
    /// memory), else two-phase.
    #[default]
    Auto,
    /// kernels/norm/group_norm.cu: statistics and normalisation as separate work items, x read twice
    /// (the second read mostly from L2). Any GPU and shape.
    TwoPhase,
    /// kernels/norm/group_norm_cluster.cu with clusters of this many blocks (0 = Auto's choice of 8
    /// or 16): one read of x, held in the cluster's shared memory; f16 and bf16. An error where the
    /// shape does not fit.
    Cluster(u32),
}

struct GnShape {
    domains: usize,
    pixels: usize,
    channels: usize,
}

fn gn_shape(s: &[usize], cfg: &GroupNorm) -> Result<GnShape> {
    if s.len() < 2 {
        return Err(Error::Input(format!("group_norm: shape {s:?} must be [N, ..., C]")));
    }
    let (n, c) = (s[0], s[s.len() - 1]);
    if cfg.groups == 0 || c % cfg.groups != 0 {
        return Err(Error::Input(format!("group_norm: {} groups do not divide {c} channels", cfg.groups)));
    }
    if cfg.frames == 0 || n % cfg.frames != 0 {
        return Err(Error::Input(format!("group_norm: batch {n} is not a multiple of {} frames", cfg.frames)));
    }
    let numel: usize = s.iter().product();
    Ok(GnShape { domains: n / cfg.frames, pixels: cfg.frames * numel / (n * c).max(1), channels: c })
}

/// Shapes the GPU kernels take (both of them).
fn gpu_limits(sh: &GnShape, cfg: &GroupNorm) -> Result<()> {
    let c = sh.channels;
    if !c.is_multiple_of(8) || c > 4096 || cfg.groups > 128 {
        return Err(Error::Unsupported(format!(
            "group_norm kernel needs channels a multiple of 8 and at most 4096, groups at most 128 (got {c} channels, {} groups)",
            cfg.groups
        )));
    }
    Ok(())
}

/// The GPU work layout group_norm_tuned takes for this input shape, in words (benchmarks and
/// profiling: which kernel, cluster and tile, and how many clusters the device runs at once).
pub fn group_norm_layout(
    gpu: &crate::gpu::Gpu,
    shape: &[usize],
    dtype: DType,
    cfg: GroupNorm,
    tuning: GroupNormTuning,
) -> Result<String> {
    let sh = gn_shape(shape, &cfg)?;
    gpu_limits(&sh, &cfg)?;
    Ok(match cluster_plan(gpu, dtype, &sh, cfg.groups, &cluster_sizes(tuning.mode), &tuning)? {
        Some(p) => format!(
            "{} cluster {} slice {} channels tile {} pixels rows {} threads {} shared {} B, {} clusters at once",
            p.kernel,
            p.cluster.0,
            p.slice_channels,
            p.tile_pixels,
            p.rows,
            p.threads,
            p.shared,
            gpu.max_active_clusters(p.kernel, p.threads, p.cluster, p.shared)?
        ),
        None => "two-phase".into(),
    })
}

/// y = (x - mean_g) / sqrt(var_g + eps) * gamma + beta, then SiLU if asked; x is NHWC [N, ..., C].
pub fn group_norm(ex: &Exec, x: &Tensor, gamma: &Tensor, beta: &Tensor, cfg: GroupNorm) -> Result<Tensor> {
    group_norm_tuned(ex, x, gamma, beta, cfg, GroupNormTuning::default())
}

/// The group norm of `x + x_bias`, added per channel: a convolution's output and its bias ([C]), or
/// a ResNet's conv1 output and its time embedding ([R, C], one row per image or video: domain d of
/// the norm reads row d / (domains / R)), normalised without the pass that adds them (the sum is
/// never rounded to the activation dtype).
pub fn group_norm_of_biased(
    ex: &Exec,
    x: &Tensor,
    x_bias: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNorm,
) -> Result<Tensor> {
    Ok(group_norm_with(ex, x, None, Some(x_bias), gamma, beta, cfg, GroupNormTuning::default())?.0)
}

pub fn group_norm_tuned(
    ex: &Exec,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNorm,
    tuning: GroupNormTuning,
) -> Result<Tensor> {
    Ok(group_norm_with(ex, x, None, None, gamma, beta, cfg, tuning)?.0)
}

/// The group norm of the concatenation `[x, tail]` on the channels (a UNet up block's
/// `[h, skip]`), read from its two parts, and the concatenation itself ([.., Cx + Ct]), written by
/// the same kernel for the consumers that read it raw (the ResNet's shortcut): the copy's pass, and
/// its second read of the parts, are gone. Bytes the same as `concat_last` then `group_norm`.
pub fn group_norm_concat(
    ex: &Exec,
    x: &Tensor,
    tail: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNorm,
) -> Result<(Tensor, Tensor)> {
    group_norm_concat_tuned(ex, x, tail, gamma, beta, cfg, GroupNormTuning::default())
}

pub fn group_norm_concat_tuned(
    ex: &Exec,
    x: &Tensor,
    tail: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNorm,
    tuning: GroupNormTuning,
) -> Result<(Tensor, Tensor)> {
    let (sx, st) = (x.shape(), tail.shape());
    let (Some((&cx, lead)), Some((&ct, lead_t))) = (sx.split_last(), st.split_last()) else {
        return Err(Error::Input(format!("group_norm_concat: {x:?} and {tail:?} need at least one dimension")));
    };
    if lead != lead_t {
        return Err(Error::Input(format!("group_norm_concat: {x:?} and {tail:?} differ before the channels")));
    }
    // The kernels take a thread's 8 channels from one part: other widths are concatenated first.
    if matches!(ex, Exec::Cuda { .. }) && !(cx.is_multiple_of(8) && ct.is_multiple_of(8)) {
        let cat = concat_last(ex, x, tail)?;
        let y = group_norm_tuned(ex, &cat, gamma, beta, cfg, tuning)?;
        return Ok((y, cat));
    }
    let (y, cat) = group_norm_with(ex, x, Some(tail), None, gamma, beta, cfg, tuning)?;
    Ok((y, cat.ok_or_else(|| Error::Internal("group_norm_concat: no concatenation written".into()))?))
}

/// The norm of x, or of [x, tail] on the channels when a tail is given, and then that
/// concatenation too.
#[allow(clippy::too_many_arguments)]
fn group_norm_with(
    ex: &Exec,
    x: &Tensor,
    tail: Option<&Tensor>,
    x_bias: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: GroupNorm,
    tuning: GroupNormTuning,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut inputs = vec![x, gamma, beta];
    inputs.extend(tail);
    inputs.extend(x_bias);
    ex.expect_inputs("group_norm", &inputs)?;
    let dtype = same_dtype("group_norm", &inputs)?;
    let x_channels = x.shape().last().copied().unwrap_or(0);
    let mut shape = x.shape().to_vec();
    if let (Some(last), Some(tail)) = (shape.last_mut(), tail) {
        *last += tail.shape().last().copied().unwrap_or(0);
    }
    let sh = gn_shape(&shape, &cfg)?;
    if gamma.shape() != [sh.channels] || beta.shape() != [sh.channels] {
        return Err(Error::Input(format!("group_norm: gamma {gamma:?} / beta {beta:?} must be [{}]", sh.channels)));
    }
    let x_bias_every = match x_bias {
        Some(b) => bias_every(b, &sh)?,
        None => 1,
    };
    match ex {
        Exec::Cpu => {
            let cat = tail.map(|tail| concat_last(ex, x, tail)).transpose()?;
            let x = cat.as_ref().unwrap_or(x);
            let y = group_norm_cpu(x, x_bias.map(|b| (b, x_bias_every)), gamma, beta, &cfg, &sh, dtype)?;
            Ok((y, cat))
        }
        Exec::Cuda { gpu, scratch } => {
            gpu_limits(&sh, &cfg)?;
            let y = gpu.empty(scratch, &shape, dtype)?;
            let cat = tail.map(|_| gpu.empty(scratch, &shape, dtype)).transpose()?;
            let ptr = |t: Option<&Tensor>| t.map(|t| t.device_ptr()).transpose().map(|p| p.unwrap_or(0));
            let pointers = GnPointers {
                x: (x.device_ptr()?, ptr(tail)?, x_channels as i32),
                x_cat: ptr(cat.as_ref())?,
                x_bias: (ptr(x_bias)?, x_bias_every),
                y: y.device_ptr()?,
                gamma: gamma.device_ptr()?,
                beta: beta.device_ptr()?,
            };
            if let Some(plan) = cluster_plan(gpu, dtype, &sh, cfg.groups, &cluster_sizes(tuning.mode), &tuning)? {
                launch_cluster_group_norm(gpu, &plan, &sh, &cfg, pointers)?;
            } else if let GroupNormMode::Cluster(_) = tuning.mode {
                return Err(Error::Unsupported(format!(
                    "group_norm: no cluster layout (cluster sizes {:?}) fits {x:?} with {} groups on {}",
                    cluster_sizes(tuning.mode),
                    cfg.groups,
                    gpu.info().name
                )));
            } else {
                launch_two_phase_group_norm(gpu, scratch, dtype, &sh, &cfg, tuning, pointers)?;
            }
            Ok((y, cat))
        }
    }
}

/// Domains per row of an input bias ([C]: all of them; [R, C]: domains / R, R dividing them).
fn bias_every(b: &Tensor, sh: &GnShape) -> Result<usize> {
    match *b.shape() {
        [c] if c == sh.channels => Ok(sh.domains.max(1)),
        [r, c] if c == sh.channels && r > 0 && sh.domains.is_multiple_of(r) => Ok(sh.domains / r),
        _ => Err(Error::Input(format!(
            "group_norm: input bias {b:?} must be [{c}] or [R, {c}] with R dividing the {d} normalised domains",
            c = sh.channels,
            d = sh.domains
        ))),
    }
}

/// Device pointers of a group norm (0: none).
struct GnPointers {
    /// x, its tail (the channels after x's) and x's channels
    x: (u64, u64, i32),
    /// [x, tail] written here
    x_cat: u64,
    /// the input bias and the domains per row of it
    x_bias: (u64, usize),
    y: u64,
    gamma: u64,
    beta: u64,
}

/// The cluster sizes a mode tries, in order.
fn cluster_sizes(mode: GroupNormMode) -> Vec<u32> {
    match mode {
        // Clusters of 8 measured faster where their tiles fit (levels 1 and 2 of the UNet), 16 where
        // only they do (level 0): benches/RESULTS.md.
        GroupNormMode::Auto | GroupNormMode::Cluster(0) => vec![8, 16],
        GroupNormMode::Cluster(n) => vec![n],
        GroupNormMode::TwoPhase => vec![],
    }
}

/// Layout of the cluster kernel for one shape (GroupNormClusterParams).
struct ClusterPlan {
    kernel: &'static str,
    cluster: (u32, ClusterScheduling),
    slice_channels: usize,
    tile_pixels: usize,
    rows: usize,
    threads: u32,
    shared: usize,
}

/// The cluster layout for this shape: per cluster size asked for, the widest slice of whole groups
/// whose tile lets two blocks share a multiprocessor (one block's copies and waits overlap the
/// other's work) and whose clusters the device can run. None before sm_90 or where nothing fits.
fn cluster_plan(
    gpu: &crate::gpu::Gpu,
    dtype: DType,
    sh: &GnShape,
    groups: usize,
    cluster_sizes: &[u32],
    tuning: &GroupNormTuning,
) -> Result<Option<ClusterPlan>> {
    let asked_rows = tuning.cluster_rows as usize;
    let kernel = match dtype {
        DType::F16 => "group_norm_cluster_f16",
        DType::BF16 => "group_norm_cluster_bf16",
        DType::F32 => return Ok(None),
    };
    if gpu.info().compute_capability.0 < 9 || sh.pixels == 0 {
        return Ok(None);
    }
    let cpg = sh.channels / groups;
    // A thread's 8 channels must span at most two groups.
    if !(cpg == 4 || cpg >= 8) {
        return Ok(None);
    }
    let max_slice_groups = (GROUP_NORM_CLUSTER_MAX_SLICE_GROUPS as usize).min(groups);
    for &cluster in cluster_sizes {
        let share = sh.pixels.div_ceil(cluster as usize);
        for slice_groups in (1..=max_slice_groups).rev().filter(|sg| groups.is_multiple_of(*sg)) {
            let slice_channels = slice_groups * cpg;
            let v = slice_channels / 8;
            // Each pixel's run of the slice is copied on its own: runs of whole 32-byte sectors (or
            // the whole pixel) keep DRAM from reading sectors twice for neighbouring slices (80-byte
            // runs measured 1.4x slower, benches/RESULTS.md).
            let whole_sectors = (slice_channels * dtype.size()).is_multiple_of(32) || slice_channels == sh.channels;
            if !slice_channels.is_multiple_of(8) || !whole_sectors || v > GROUP_NORM_CLUSTER_MAX_THREADS {
                continue;
            }
            let rows = if asked_rows > 0 {
                asked_rows.min(GROUP_NORM_CLUSTER_MAX_THREADS / v)
            } else {
                default_rows(share, v)
            }
            .min(share)
            .max(1);
            // Blocks take runs of `rows` pixels in turn; a block's tile holds its runs.
            let tile_pixels = sh.pixels.div_ceil(rows).div_ceil(cluster as usize) * rows;
            let tile = tile_pixels * slice_channels * dtype.size();
            if tile > GROUP_NORM_CLUSTER_MAX_TILE_BYTES {
                continue;
            }
            let threads = (rows * v).next_multiple_of(32) as u32;
            // The tile, one float4 of partial sums per thread, the slice's gamma and beta, every
            // cluster block's float2 sums per group.
            let shared =
                tile + threads as usize * 16 + 2 * slice_channels * dtype.size() + cluster as usize * slice_groups * 8;
            if gpu.occupancy(kernel, threads, shared)? < 2
                || gpu.max_active_clusters(kernel, threads, (cluster, tuning.cluster_scheduling), shared)? == 0
            {
                continue;
            }
            let cluster = (cluster, tuning.cluster_scheduling);
            return Ok(Some(ClusterPlan { kernel, cluster, slice_channels, tile_pixels, rows, threads, shared }));
        }
    }
    Ok(None)
}

/// Pixels a cluster block steps over at a time: about 320 threads measured fastest on the H100
/// (benches/RESULTS.md), and a row count that divides a block's share of the pixels gives every
/// thread as many pixels.
fn default_rows(share: usize, v: usize) -> usize {
    let target = (320 / v).max(1);
    (target.div_ceil(2)..=target).rev().find(|r| share.is_multiple_of(*r)).unwrap_or(target)
}

/// GROUP_NORM_CLUSTER_MAX_THREADS of group_norm_cluster.cu (its launch bound).
const GROUP_NORM_CLUSTER_MAX_THREADS: usize = 512;
/// Tiles above this cannot pair up on a multiprocessor (228 KiB of shared memory on the H100, less
/// the partial sums and tables).
const GROUP_NORM_CLUSTER_MAX_TILE_BYTES: usize = 104 << 10;

fn launch_cluster_group_norm(
    gpu: &crate::gpu::Gpu,
    plan: &ClusterPlan,
    sh: &GnShape,
    cfg: &GroupNorm,
    ptr: GnPointers,
) -> Result<()> {
    let p = GroupNormClusterParams {
        x: ptr.x.0 as *const _,
        x_tail: ptr.x.1 as *const _,
        x_cat: ptr.x_cat as *mut _,
        x_bias: ptr.x_bias.0 as *const _,
        y: ptr.y as *mut _,
        gamma: ptr.gamma as *const _,
        beta: ptr.beta as *const _,
        pixels: sh.pixels as i64,
        x_bias_every: ptr.x_bias.1 as i64,
        channels: sh.channels as i32,
        x_channels: ptr.x.2,
        group_channels: (sh.channels / cfg.groups) as i32,
        slice_channels: plan.slice_channels as i32,
        slice_groups: (plan.slice_channels * cfg.groups / sh.channels) as i32,
        tile_pixels: plan.tile_pixels as i32,
        rows: plan.rows as i32,
        silu: cfg.silu as i32,
        eps: cfg.eps,
    };
    let slices = (sh.channels / plan.slice_channels) as u32;
    let domains = u32::try_from(sh.domains)
        .ok()
        .filter(|&d| d <= 65535)
        .ok_or_else(|| Error::Unsupported(format!("group_norm: {} domains exceed a grid's 65535 rows", sh.domains)))?;
    let grid = (slices * plan.cluster.0, domains, 1);
    gpu.launch_clustered(plan.kernel, grid, (plan.threads, 1, 1), plan.cluster, plan.shared as u32, &p)
}

fn launch_two_phase_group_norm(
    gpu: &crate::gpu::Gpu,
    scratch: &crate::gpu::Arena,
    dtype: DType,
    sh: &GnShape,
    cfg: &GroupNorm,
    tuning: GroupNormTuning,
    ptr: GnPointers,
) -> Result<()> {
    let c = sh.channels;
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

    let workspace = scratch.alloc(group_norm_workspace_bytes(sh.domains, cfg.groups))?;
    gpu.fill_bytes(&workspace, 0)?;
    let p = GroupNormParams {
        x: ptr.x.0 as *const _,
        x_tail: ptr.x.1 as *const _,
        x_cat: ptr.x_cat as *mut _,
        x_bias: ptr.x_bias.0 as *const _,
        y: ptr.y as *mut _,
        gamma: ptr.gamma as *const _,
        beta: ptr.beta as *const _,
        workspace: workspace.ptr()? as *mut u32,
        domains: sh.domains as i64,
        pixels: sh.pixels as i64,
        channels: c as i32,
        x_channels: ptr.x.2,
        groups: cfg.groups as i32,
        rows: rows as i32,
        chunks: chunks as i32,
        lag: lag as i32,
        x_bias_every: ptr.x_bias.1 as i64,
        silu: cfg.silu as i32,
        eps: cfg.eps,
    };
    let (grid, block) = ((grid as u32, 1, 1), (threads, 1, 1));
    gpu.launch(kernel, grid, block, shared as u32, &p)
}

/// GROUP_NORM_WORKSPACE_BYTES of params.h (bindgen does not carry function-like macros).
fn group_norm_workspace_bytes(domains: usize, groups: usize) -> usize {
    (domains + 1) * GROUP_NORM_CONTROL_STRIDE as usize * 4 + domains * groups * 16
}

/// `x_bias` with its domains per row.
fn group_norm_cpu(
    x: &Tensor,
    x_bias: Option<(&Tensor, usize)>,
    gamma: &Tensor,
    beta: &Tensor,
    cfg: &GroupNorm,
    sh: &GnShape,
    dtype: DType,
) -> Result<Tensor> {
    let mut xv = x.to_f32_vec()?;
    if let Some((b, every)) = x_bias {
        let b = b.to_f32_vec()?;
        let c = sh.channels;
        par_rows(&mut xv, c, |first, chunk| {
            for (k, px) in chunk.chunks_mut(c).enumerate() {
                let row = (first + k) / sh.pixels.max(1) / every;
                px.iter_mut().zip(&b[row * c..][..c]).for_each(|(v, b)| *v += b);
            }
        });
    }
    let (g, b) = (gamma.to_f32_vec()?, beta.to_f32_vec()?);
    let (c, cpg) = (sh.channels, sh.channels / cfg.groups);
    let domain_len = sh.pixels * c;
    // 1. (mean, 1 / std) per (domain, group) in f64, the pairs spread over the cores (one video's
    //    frames are one domain, so domains alone would leave most cores idle).
    let stats = par_map(sh.domains * cfg.groups, |item| {
        let (domain, grp) = (item / cfg.groups, item % cfg.groups);
        let xs = &xv[domain * domain_len..(domain + 1) * domain_len];
        let values = || xs.chunks_exact(c).flat_map(|px| px[grp * cpg..(grp + 1) * cpg].iter().map(|&v| v as f64));
        let n = (sh.pixels * cpg) as f64;
        let mean = values().sum::<f64>() / n;
        let var = values().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, 1.0 / (var + cfg.eps as f64).sqrt())
    });
    // 2. normalise, pixels spread over the cores
    let mut out = vec![0f32; xv.len()];
    par_rows(&mut out, c, |first, chunk| {
        for (k, ypx) in chunk.chunks_mut(c).enumerate() {
            let p = first + k;
            let px = &xv[p * c..(p + 1) * c];
            let domain_stats = &stats[(p / sh.pixels) * cfg.groups..];
            for ch in 0..c {
                let (mean, rstd) = domain_stats[ch / cpg];
                let v = ((px[ch] as f64 - mean) * rstd) as f32 * g[ch] + b[ch];
                ypx[ch] = if cfg.silu { silu_f32(v) } else { v };
            }
        }
    });
    host_out(x.shape(), dtype, &out)
}

/// Lanes the layer-norm kernel spreads one register-resident row over (`ln_row_lanes` in
/// kernels/norm/layer_norm.cu, which this mirrors): the fewest (a power of two from 4) that hold C
/// channels in 5 vectors of 8 each; None for rows the kernel gives a whole warp (C % 8 != 0, C over
/// 1280, or a pointer not 16-byte aligned).
fn layer_norm_row_lanes(c: usize, aligned: bool) -> Option<usize> {
    const VECS: usize = 5; // LN_REG_VECS
    if !aligned || !c.is_multiple_of(8) || c > VECS * 256 {
        return None;
    }
    let mut lanes = 4;
    while lanes * VECS * 8 < c {
        lanes *= 2;
    }
    Some(lanes)
}

/// Layer norm over the last dimension; gamma / beta optional ([C] each).
pub fn layer_norm(ex: &Exec, x: &Tensor, gamma: Option<&Tensor>, beta: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    layer_norm_add(ex, x, gamma, beta, eps, None)
}

/// `layer_norm`, then `add` [N, C] added to every row of x [N, ..., C] under its first index (the
/// motion modules' position rows, one per frame, over the frame's tokens), before the output's one
/// rounding: what `add(layer_norm(x), add)` computes with one rounding and one pass fewer.
pub fn layer_norm_add(
    ex: &Exec,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    layer_norm_shifted(ex, x, None, gamma, beta, eps, add)
}

/// `layer_norm_add` of x + `shift` ([C], added per channel and rounded to x's dtype before the
/// statistics): the norm of a residual stream whose linears left their output biases to it (the
/// motion modules), as if the stream held them.
pub fn layer_norm_shifted(
    ex: &Exec,
    x: &Tensor,
    shift: Option<&Tensor>,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    let ln = LayerNormCall::new(ex, x, shift, gamma, beta, eps, add)?;
    match ex {
        Exec::Cpu => host_out(x.shape(), ln.dtype, &ln.host_values()?),
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, x.shape(), ln.dtype)?;
            ln.launch(ex, kernel_for!("layer_norm", ln.dtype), y.device_ptr()?, 0, 0)?;
            Ok(y)
        }
    }
}

/// `layer_norm_shifted` written as e4m3 rows, each with its own scale (`Fp8Scaling::Rows`): the
/// input of an FP8 linear, without a 16-bit output or a quantization pass. Row r's scale is max
/// |y[r]| / 448 over the fp32 affine outputs, which are quantized without rounding to x's dtype
/// first. f16 / bf16 inputs; the matrix is [rows, C].
pub fn layer_norm_fp8(
    ex: &Exec,
    x: &Tensor,
    shift: Option<&Tensor>,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    add: Option<&Tensor>,
) -> Result<Fp8Matrix> {
    let ln = LayerNormCall::new(ex, x, shift, gamma, beta, eps, add)?;
    if ln.dtype == DType::F32 {
        return Err(Error::Input(format!("layer_norm_fp8: {x:?} must be f16 or bf16 (FP8 linears)")));
    }
    match ex {
        Exec::Cpu => Ok(Fp8Matrix::host_rows(ln.channels, &ln.host_values()?)),
        Exec::Cuda { .. } => {
            let (q, bytes, scales) = Fp8Matrix::scratch_rows(ex, ln.rows, ln.channels)?;
            ln.launch(ex, kernel_for!("layer_norm_e4m3", ln.dtype), 0, bytes, scales)?;
            Ok(q)
        }
    }
}

/// One layer norm's checked arguments.
struct LayerNormCall<'a> {
    x: &'a Tensor,
    shift: Option<&'a Tensor>,
    gamma: Option<&'a Tensor>,
    beta: Option<&'a Tensor>,
    add: Option<&'a Tensor>,
    eps: f32,
    dtype: DType,
    channels: usize,
    rows: usize,
    /// Rows of x (as [rows, C]) per row of `add`.
    add_every: usize,
}

impl<'a> LayerNormCall<'a> {
    fn new(
        ex: &Exec,
        x: &'a Tensor,
        shift: Option<&'a Tensor>,
        gamma: Option<&'a Tensor>,
        beta: Option<&'a Tensor>,
        eps: f32,
        add: Option<&'a Tensor>,
    ) -> Result<LayerNormCall<'a>> {
        let mut inputs = vec![x];
        inputs.extend(shift);
        inputs.extend(gamma);
        inputs.extend(beta);
        inputs.extend(add);
        ex.expect_inputs("layer_norm", &inputs)?;
        let dtype = same_dtype("layer_norm", &inputs)?;
        let c = *x.shape().last().ok_or_else(|| Error::Input("layer_norm: scalar input".into()))?;
        if let Some(t) = [shift, gamma, beta].into_iter().flatten().find(|t| t.shape() != [c]) {
            return Err(Error::Input(format!("layer_norm: {t:?} must be [{c}]")));
        }
        let rows = x.numel() / c.max(1);
        let add_every = match add {
            Some(t) if x.shape().len() >= 2 && t.shape() == [x.shape()[0], c] && x.shape()[0] > 0 => {
                rows / x.shape()[0]
            }
            Some(t) => {
                return Err(Error::Input(format!("layer_norm: added rows {t:?} must be [{}, {c}]", x.shape()[0])));
            }
            None => 1,
        };
        Ok(LayerNormCall { x, shift, gamma, beta, add, eps, dtype, channels: c, rows, add_every })
    }

    /// The CPU twin's outputs in f32 (statistics in f64).
    fn host_values(&self) -> Result<Vec<f32>> {
        let c = self.channels;
        let mut xv = self.x.to_f32_vec()?;
        if let Some(shift) = self.shift {
            // x + shift rounded to x's dtype, as the kernel repacks it
            let s = shift.to_f32_vec()?;
            par_rows(&mut xv, c, |_, chunk| {
                for row in chunk.chunks_mut(c) {
                    row.iter_mut().zip(&s).for_each(|(v, s)| *v = self.dtype.round(*v + s));
                }
            });
        }
        let g = self.gamma.map(|t| t.to_f32_vec()).transpose()?;
        let b = self.beta.map(|t| t.to_f32_vec()).transpose()?;
        let a = self.add.map(|t| t.to_f32_vec()).transpose()?;
        let mut out = vec![0f32; xv.len()];
        par_rows(&mut out, c, |first, chunk| {
            for (k, y) in chunk.chunks_mut(c).enumerate() {
                let row = &xv[(first + k) * c..(first + k + 1) * c];
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
                let rstd = 1.0 / (var + self.eps as f64).sqrt();
                let added = a.as_ref().map(|a| &a[(first + k) / self.add_every * c..][..c]);
                for (j, yv) in y.iter_mut().enumerate() {
                    let n = ((row[j] as f64 - mean) * rstd) as f32;
                    *yv = n * g.as_ref().map_or(1.0, |g| g[j])
                        + b.as_ref().map_or(0.0, |b| b[j])
                        + added.map_or(0.0, |a| a[j]);
                }
            }
        });
        Ok(out)
    }

    /// Queues `kernel` writing y (a 16-bit or f32 output) or, with `q` and `q_scales` set, e4m3
    /// rows and their scales.
    fn launch(&self, ex: &Exec, kernel: &'static str, y: u64, q: u64, q_scales: u64) -> Result<()> {
        let Exec::Cuda { gpu, .. } = ex else { return Err(Error::Internal("layer norm launch on the CPU".into())) };
        let ptr = |t: Option<&Tensor>| -> Result<*const std::ffi::c_void> {
            Ok(match t {
                Some(t) => t.device_ptr()? as *const _,
                None => std::ptr::null(),
            })
        };
        let p = LayerNormParams {
            x: self.x.device_ptr()? as *const _,
            shift: ptr(self.shift)?,
            y: y as *mut _,
            gamma: ptr(self.gamma)?,
            beta: ptr(self.beta)?,
            add: ptr(self.add)?,
            q: q as *mut u8,
            q_scales: q_scales as *mut f32,
            rows: self.rows as i64,
            add_every: self.add_every as i64,
            channels: self.channels as i32,
            eps: self.eps,
        };
        // 32 / lanes rows per warp (one when a row takes the whole warp); the kernels' launch
        // bounds assume this block size.
        let aligned = [p.x, p.shift, p.y as *const _, p.add].iter().all(|&q| (q as usize).is_multiple_of(16))
            && (q as usize).is_multiple_of(8);
        let rows_per_warp = 32 / layer_norm_row_lanes(self.channels, aligned).unwrap_or(32);
        let rows_per_block = LAYER_NORM_THREADS as usize / 32 * rows_per_warp;
        gpu.launch(kernel, (self.rows.div_ceil(rows_per_block) as u32, 1, 1), (LAYER_NORM_THREADS, 1, 1), 0, &p)
    }
}
