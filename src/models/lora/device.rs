//! LoRA sets on the device. A set's factors are laid out once on the host in the target weights'
//! own column order (KRSC for convolutions) and rounded to the weights' dtype (`HostLoraSet`,
//! which needs no GPU and can be made on any thread), then uploaded (`DeviceLoraSet::from_host`;
//! `DeviceLoraSet::upload` does both); merging is then a few launches that add every delta of the
//! set into the device weights in place, each layer by the route chosen for it at layout (`Route`).
//! `LoraSwitcher` changes the merged set per clip: it first restores the weights the current set
//! touched to their base values — from device copies taken before their first merge
//! (`Restore::Copy`), or re-uploaded from the checkpoint files (`Restore::Reload`, no device memory
//! beyond the weights) — then merges the new set. Restoring instead of subtracting keeps the base
//! exact however often sets change, and the weights keep their addresses, so a CUDA graph captured
//! over a denoising step stays valid.
//!
//! ΔW per format is the host merge's (merge.rs); the factors become:
//! - LoRA / LoCon: up [out, r] and the right factor [r, in·kh·kw] (a Tucker core folded in on the
//!   host: r²·in·kh·kw multiply-adds, far less than ΔW), columns moved to (kh, kw, in) order; a
//!   layer with only these has its LoRAs' factors stacked along the rank (`stacked_factors`);
//! - LoHa: both pairs, right factors' columns moved the same way;
//! - LoKr: W1 [a, b] and W2 [c, d, kh·kw] (product factors multiplied out on the host), the
//!   kernel placing W1[i, j] W2[k, l, y] at row i·c + k, column y·in + j·d + l;
//! - full diff: the tensor, columns moved;
//! - DoRA: the module's own factors as above, its magnitude in f32 and the norm's axis
//!   (`ops::lora::DoraTerm`).

use std::collections::HashMap;

use super::merge::{Delta, DoraAxis, LoraMerge, Scaled};
use crate::error::{Error, Result};
use crate::gpu::memory::ARENA_ALIGN;
use crate::gpu::{Arena, Gpu};
use crate::models::ModelWeights;
use crate::ops::conv::weight_oihw_to_ohwi;
use crate::ops::lora::{
    DeltaFactors, DeltaTerm, DoraNorm, DoraTerm, LayerDelta, merge_deltas, merge_gemm, merged_host,
};
use crate::ops::{Exec, par_map};
use crate::tensor::{DType, Tensor};

/// How a switch puts the touched weights back to their base values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restore {
    /// From device copies taken before a weight's first merge (memory: the touched weights once
    /// more; the fastest).
    Copy,
    /// Re-uploaded from the checkpoint's mapped files (no extra device memory; bound by the host
    /// link and the host's layout change of convolution weights).
    Reload,
    /// Never: the run has one set, merged in place once, so nothing is kept to restore (the
    /// renderer's choice for a single LoRA group; a second set is refused).
    Never,
}

impl Restore {
    pub fn parse(s: &str) -> Result<Restore> {
        match s {
            "copy" => Ok(Restore::Copy),
            "reload" => Ok(Restore::Reload),
            other => Err(Error::Input(format!("--lora-restore '{other}': expected copy or reload"))),
        }
    }
}

/// One delta's factors in the target's column order and the weights' dtype (host tensors while
/// the set is laid out, device tensors once uploaded).
enum Factors {
    LowRank(Tensor, Tensor),
    Hadamard([Tensor; 4]),
    Kronecker(Tensor, Tensor, usize),
    Full(Tensor),
}

/// A DoRA module's rescale: its own factors and scale, m in f32, the norm's axis, eps, blend.
struct Dora {
    factors: Factors,
    scale: f32,
    magnitude: Tensor,
    norm: DoraNorm,
    eps: f32,
    blend: f32,
}

/// Where one layer's merge runs, chosen at upload from the kinds of its deltas, the same for the
/// same set every run:
///
/// | the layer's deltas                                   | route                              |
/// |------------------------------------------------------|------------------------------------|
/// | LoRA / LoCon only (a Tucker core folded on the host); in bf16 only with equal scales | `Gemm`: one cuBLASLt GEMM, beta = 1 |
/// | any LoHa, LoKr or full diff                          | `Kernel`: the LoRA-delta kernel     |
/// | a DoRA module (beside any others)                    | `Kernel` with the DoRA rescale      |
///
/// Why: measured 2026-12-03 on an NVIDIA H200 in one run (benches/ops.rs `lora_merges`, f16, four
/// LoRAs of ranks 32+64+128+64, K = 288), cuBLASLt (`ops::lora::merge_gemm`) took 0.013-0.036 ms
/// per SDXL weight shape against 0.025-0.096 ms for kernels/lora/merge.cu, and 9.83 ms for the
/// whole UNet's 794 weights (one GEMM each) against 14.07 ms (one launch); 3.15 against 3.94 ms
/// over both text encoders. The kernel stays for what has no single product: LoHa's Hadamard
/// products, LoKr's Kronecker products, full deltas and DoRA (all in one batched launch).
enum Route {
    /// The layer's LoRAs as one product: up [out, K], down [K, cols] stacked along the rank, and
    /// the alpha the GEMM scales it by (`stacked_factors`).
    Gemm {
        up: Tensor,
        down: Tensor,
        alpha: f32,
    },
    Kernel {
        terms: Vec<(Factors, f32)>,
        dora: Option<Box<Dora>>,
    },
}

impl Route {
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Route::Gemm { up, down, .. } => vec![up, down],
            Route::Kernel { terms, dora } => terms
                .iter()
                .map(|(f, _)| f)
                .chain(dora.as_ref().map(|d| &d.factors))
                .flat_map(Factors::tensors)
                .chain(dora.as_ref().map(|d| &d.magnitude))
                .collect(),
        }
    }

    /// The same route with every tensor passed through `f` (the upload).
    fn map(self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Route> {
        Ok(match self {
            Route::Gemm { up, down, alpha } => Route::Gemm { up: f(&up)?, down: f(&down)?, alpha },
            Route::Kernel { terms, dora } => Route::Kernel {
                terms: terms.into_iter().map(|(t, s)| Ok((t.map(f)?, s))).collect::<Result<_>>()?,
                dora: match dora {
                    Some(d) => Some(Box::new(Dora { factors: d.factors.map(f)?, magnitude: f(&d.magnitude)?, ..*d })),
                    None => None,
                },
            },
        })
    }
}

impl Factors {
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Factors::LowRank(a, b) | Factors::Kronecker(a, b, _) => vec![a, b],
            Factors::Hadamard(p) => p.iter().collect(),
            Factors::Full(d) => vec![d],
        }
    }

    fn map(self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Factors> {
        Ok(match self {
            Factors::LowRank(u, d) => Factors::LowRank(f(&u)?, f(&d)?),
            Factors::Hadamard(p) => Factors::Hadamard([f(&p[0])?, f(&p[1])?, f(&p[2])?, f(&p[3])?]),
            Factors::Kronecker(a, b, kernel) => Factors::Kronecker(f(&a)?, f(&b)?, kernel),
            Factors::Full(d) => Factors::Full(f(&d)?),
        })
    }

    fn delta(&self) -> DeltaFactors<'_> {
        match self {
            Factors::LowRank(up, down) => DeltaFactors::LowRank { up, down },
            Factors::Hadamard([a1, b1, a2, b2]) => DeltaFactors::Hadamard { a1, b1, a2, b2 },
            Factors::Kronecker(w1, w2, kernel) => DeltaFactors::Kronecker { w1, w2, kernel: *kernel },
            Factors::Full(delta) => DeltaFactors::Full { delta },
        }
    }
}

/// A set's factors laid out on the host for one model's weights: per targeted weight its route,
/// every tensor already in the dtype and column order the device takes, so uploading it
/// (`DeviceLoraSet::from_host`) only copies. It holds host memory only and is `Send`: the renderer
/// lays out the next LoRA group's set on a thread while the GPU renders the current group.
pub struct HostLoraSet {
    dtype: DType,
    /// (weight name, the weight's graph shape it was laid out for, route with host factors)
    layers: Vec<(String, Vec<usize>, Route)>,
    /// Device bytes the factors take (each tensor on the arena's alignment).
    bytes: usize,
}

impl HostLoraSet {
    /// Lays out the factors of the deltas in `merge` for `weights` (which must hold every targeted
    /// name; only their shapes and dtype are read, so device weights in use elsewhere are fine)
    /// whose names `select` accepts, choosing each weight's route (`Route`); LoRA-only weights take
    /// cuBLASLt from a stacked rank of `gemm_min_rank` (`GEMM_MIN_RANK`; tests pass 0 to cover that
    /// route with small fixtures).
    pub fn lay_out(
        weights: &ModelWeights,
        merge: &LoraMerge,
        select: impl Fn(&str) -> bool,
        gemm_min_rank: usize,
    ) -> Result<HostLoraSet> {
        let dtype = weights.dtype();
        let mut names: Vec<&str> = merge.names().filter(|n| select(n)).collect();
        names.sort_unstable();
        // DoRA on the device is verified against the host merge in f16 only (tests/gpu_lora.rs on
        // an H200, 2026-12-03, within 2 ulps); bf16 DoRA weights stay on the host merge until a
        // GPU run checks them.
        if let Some(n) = names.iter().find(|n| dtype == DType::BF16 && !merge.is_additive(n)) {
            return Err(Error::Unsupported(format!(
                "the weight '{n}' has a DoRA module, which the device merge does not do in bf16 yet (f16 works; \
                 in bf16 it is merged on the host when a model loads)"
            )));
        }
        let targets: Vec<(&str, &[usize], &[Scaled])> = names
            .iter()
            .map(|&name| {
                let w = weights.tensor(name).ok_or_else(|| {
                    Error::Internal(format!("a LoRA delta targets '{name}', which this model does not have"))
                })?;
                let deltas = merge.deltas(name).unwrap_or(&[]);
                Ok((name, w.shape(), deltas))
            })
            .collect::<Result<_>>()?;
        // The host work (Tucker folds, products, stacking, column moves, rounding) on every core.
        let routes: Vec<Result<Route>> = par_map(targets.len(), |k| {
            let (name, shape, deltas) = targets[k];
            route(name, shape, deltas, dtype, gemm_min_rank)
        });
        let layers = targets
            .iter()
            .zip(routes)
            .map(|(&(name, shape, _), route)| Ok((name.to_string(), shape.to_vec(), route?)))
            .collect::<Result<Vec<_>>>()?;
        let bytes = layers
            .iter()
            .flat_map(|(_, _, route)| route.tensors())
            .map(|t| t.size_bytes().div_ceil(ARENA_ALIGN) * ARENA_ALIGN)
            .sum();
        Ok(HostLoraSet { dtype, layers, bytes })
    }

    /// Device bytes the factors will take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The CPU twin of uploading the set and merging it into `weights` (host weights at base):
    /// every targeted weight merged from the laid-out factors by `ops::lora::merged_host` (summed
    /// in f64, rounded once), with its name.
    pub fn merged_host(&self, weights: &ModelWeights) -> Result<Vec<(String, Tensor)>> {
        let no_copies = HashMap::new();
        let layers = self.layers.iter().map(|(n, _, r)| (n.as_str(), r));
        let (gemm, kernel) = layer_deltas(layers, weights, &no_copies)?;
        let (names, deltas): (Vec<&str>, Vec<LayerDelta>) = gemm.into_iter().chain(kernel).unzip();
        Ok(names.into_iter().map(str::to_string).zip(merged_host(&deltas)?).collect())
    }
}

/// A set of LoRA deltas for one model, uploaded: per targeted weight, its route and factors.
pub struct DeviceLoraSet {
    layers: Vec<(String, Route)>,
    bytes: usize,
    _arena: Arena,
}

/// How many of a set's weights take each route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteCounts {
    pub gemm: usize,
    pub kernel: usize,
    /// Of `kernel`, those with a DoRA module.
    pub dora: usize,
}

impl DeviceLoraSet {
    /// Lays out and uploads the factors of the deltas in `merge` for the device weights of
    /// `weights` (which must hold every targeted name) whose names `select` accepts, choosing each
    /// weight's route (`Route`): `HostLoraSet::lay_out`, then `from_host`.
    pub fn upload(
        gpu: &Gpu,
        weights: &ModelWeights,
        merge: &LoraMerge,
        select: impl Fn(&str) -> bool,
    ) -> Result<DeviceLoraSet> {
        Self::upload_routed(gpu, weights, merge, select, GEMM_MIN_RANK)
    }

    /// `upload` with the stacked rank from which LoRA-only weights take cuBLASLt given (tests
    /// pass 0 to cover that route with small fixtures).
    pub fn upload_routed(
        gpu: &Gpu,
        weights: &ModelWeights,
        merge: &LoraMerge,
        select: impl Fn(&str) -> bool,
        gemm_min_rank: usize,
    ) -> Result<DeviceLoraSet> {
        Self::from_host(gpu, weights, HostLoraSet::lay_out(weights, merge, select, gemm_min_rank)?)
    }

    /// Uploads a set laid out for `weights` (checked: the same names, shapes and dtype), each
    /// tensor as it is.
    pub fn from_host(gpu: &Gpu, weights: &ModelWeights, host: HostLoraSet) -> Result<DeviceLoraSet> {
        for (name, shape, _) in &host.layers {
            match weights.tensor(name) {
                Some(w) if w.shape() == shape.as_slice() && w.dtype() == host.dtype => {}
                found => {
                    return Err(Error::Internal(format!(
                        "a LoRA set laid out for '{name}' as {shape:?} {:?} was uploaded for {:?}",
                        host.dtype,
                        found.map(|w| (w.shape(), w.dtype()))
                    )));
                }
            }
        }
        let arena = Arena::new("LoRA factors", host.bytes.max(1))?;
        // Each tensor in the dtype it was laid out in: the weights' for factors, f32 for DoRA's m
        // (rounded to the weights' dtype it would scale whole rows by up to half an ulp).
        let up = |t: &Tensor| gpu.upload(&arena, t, t.dtype());
        let layers =
            host.layers.into_iter().map(|(name, _, route)| Ok((name, route.map(&up)?))).collect::<Result<Vec<_>>>()?;
        Ok(DeviceLoraSet { layers, bytes: host.bytes, _arena: arena })
    }

    /// Device memory the factors take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The names of the weights the set adds to.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|(n, _)| n.as_str())
    }

    /// How many weights take each route.
    pub fn routes(&self) -> RouteCounts {
        let mut c = RouteCounts::default();
        for (_, route) in &self.layers {
            match route {
                Route::Gemm { .. } => c.gemm += 1,
                Route::Kernel { dora, .. } => {
                    c.kernel += 1;
                    c.dora += usize::from(dora.is_some());
                }
            }
        }
        c
    }

    /// Adds the set's deltas into `weights` in place (queued on the stream).
    /// FP8 twins are quantized again after it (`ModelWeights::requantize_fp8`).
    pub fn merge_into(&self, ex: &Exec, weights: &ModelWeights) -> Result<()> {
        self.merge_from(ex, weights, &HashMap::new())?;
        weights.requantize_fp8(ex)
    }

    /// `merge_into` reading each weight's base values from `base` where it holds a copy (a switch
    /// restores and merges in one pass), else from the weight itself.
    fn merge_from(&self, ex: &Exec, weights: &ModelWeights, base: &HashMap<String, Tensor>) -> Result<()> {
        weights.changed();
        let (gemm, kernel) = layer_deltas(self.layers.iter().map(|(n, r)| (n.as_str(), r)), weights, base)?;
        merge_gemm(ex, &gemm.into_iter().map(|(_, d)| d).collect::<Vec<_>>())?;
        merge_deltas(ex, &kernel.into_iter().map(|(_, d)| d).collect::<Vec<_>>())
    }
}

/// Each layer's deltas on its weight in `weights` (base values from `base` where it holds a copy),
/// by name, split by route: (cuBLASLt, merge kernel).
type RouteDeltas<'a> = (Vec<(&'a str, LayerDelta<'a>)>, Vec<(&'a str, LayerDelta<'a>)>);

fn layer_deltas<'a>(
    layers: impl Iterator<Item = (&'a str, &'a Route)>,
    weights: &'a ModelWeights,
    base: &'a HashMap<String, Tensor>,
) -> Result<RouteDeltas<'a>> {
    let (mut gemm, mut kernel) = (Vec::new(), Vec::new());
    for (name, route) in layers {
        let weight = weights
            .tensor(name)
            .ok_or_else(|| Error::Internal(format!("a LoRA set targets '{name}', which this model lacks")))?;
        let base = base.get(name);
        match route {
            Route::Gemm { up, down, alpha } => {
                let term = DeltaTerm { factors: DeltaFactors::LowRank { up, down }, scale: *alpha };
                gemm.push((name, LayerDelta { weight, terms: vec![term], base, dora: None }));
            }
            Route::Kernel { terms, dora } => {
                let terms = terms.iter().map(|(f, scale)| DeltaTerm { factors: f.delta(), scale: *scale }).collect();
                let dora = dora.as_ref().map(|d| DoraTerm {
                    term: DeltaTerm { factors: d.factors.delta(), scale: d.scale },
                    magnitude: &d.magnitude,
                    norm: d.norm,
                    eps: d.eps,
                    blend: d.blend,
                });
                kernel.push((name, LayerDelta { weight, terms, base, dora }));
            }
        }
    }
    Ok((gemm, kernel))
}

/// The stacked rank (K, the sum of a weight's LoRA ranks) from which a LoRA-only weight takes one
/// cuBLASLt GEMM instead of the merge kernel. On an H200 (2026-12-03, `benches/ops.rs`, the
/// whole SDXL UNet in f16, kernel vs cuBLASLt): K = 64 5.24 vs 6.90 ms, K = 128 6.85 vs 7.24,
/// K = 192 9.55 vs 7.56, K = 288 14.19 vs 8.27. cuBLASLt's time barely moves with K (a launch
/// per weight), the kernel's grows about linearly: they cross near K = 139.
pub const GEMM_MIN_RANK: usize = 144;

/// The route and host factors of the weight `name` of shape `graph` under `deltas` (`Route`).
fn route(name: &str, graph: &[usize], deltas: &[Scaled], dtype: DType, gemm_min_rank: usize) -> Result<Route> {
    // In bf16 a scale folded into a factor costs 2^-9 of each term (2^-11 in f16), which broke the
    // 3-ulp bound against the host merge on an H200 (2026-12-03): bf16 takes cuBLASLt only when
    // the LoRAs' scales are equal (no fold), else the kernel, which scales in fp32.
    let uniform = deltas.iter().all(|d| d.scale == deltas[0].scale);
    let low_rank = deltas.iter().all(|d| d.dora.is_none() && matches!(d.delta, Delta::LowRank(_)));
    let rank: usize = deltas.iter().map(|d| if let Delta::LowRank(l) = &d.delta { l.rank() } else { 0 }).sum();
    if !deltas.is_empty() && low_rank && rank >= gemm_min_rank && (dtype != DType::BF16 || uniform) {
        let (up, down, alpha) = stacked_factors(name, graph, deltas, dtype)?;
        return Ok(Route::Gemm { up, down, alpha });
    }
    let mut terms = Vec::with_capacity(deltas.len());
    let mut dora = None;
    for d in deltas {
        let factors = host_factors(name, graph, d, dtype)?;
        let Some(r) = &d.dora else {
            terms.push((factors, d.scale as f32));
            continue;
        };
        let target = torch_shape(graph);
        r.check(&target).map_err(|why| {
            Error::Internal(format!("LoRA {} {why}, but the weight '{name}' it was matched to is {target:?}", d.source))
        })?;
        if dora.is_some() {
            return Err(Error::Internal(format!("two DoRA modules on '{name}' reached the device merge")));
        }
        let norm = match r.axis {
            DoraAxis::Output => DoraNorm::Rows,
            DoraAxis::Input => DoraNorm::Inputs(target[1]),
        };
        let m = r.magnitude.to_f32_vec()?;
        dora = Some(Box::new(Dora {
            factors,
            scale: d.scale as f32,
            magnitude: Tensor::from_f32(&[m.len()], DType::F32, &m)?,
            norm,
            eps: r.eps as f32,
            blend: r.blend as f32,
        }));
    }
    Ok(Route::Kernel { terms, dora })
}

/// A layer's LoRA / LoCon deltas (all low rank) as one product for cuBLASLt: up [out, K] with the
/// LoRAs' up matrices side by side and down [K, in·kh·kw] (KRSC column order) with their right
/// factors stacked, K the sum of the ranks, so that alpha · up · down = Σ_i s_i up_i down_i; the
/// host computes in f64 and rounds each factor to `dtype` once. Returns (up, down, alpha).
///
/// The scales: when every delta has the same s, the factors are the files' and alpha = s (the GEMM
/// scales the fp32 product, as the merge kernel does; no error beyond the kernel's). Otherwise
/// each s_i is folded into the rows of down_i (alpha = 1) before the rounding: the one error this
/// route adds. Each element of s_i · down_i then moves by at most half an ulp of the dtype
/// (2^-11 of it in f16, 2^-8 in bf16; in f16's subnormal range, below 2^-14, by at most 2^-25), so
/// ΔW moves by at most 2^-11 · Σ_i Σ_r |up_i[o, r]| · |s_i down_i[r, j]| (+ 2^-25 Σ |up|) in f16.
/// That bound is relative to ΔW's terms, not to W: for a LoRA, whose ΔW is well below W, it stays
/// under an ulp of W (the GPU test checks a few). The merge kernel avoids it by scaling the fp32
/// product instead, which a single GEMM over stacked factors cannot do per LoRA. Down takes the
/// scale because up is the factor LoRA training starts at zero (kohya sd-scripts
/// `networks/lora.py` `torch.nn.init.zeros_(self.lora_up.weight)`, PEFT's `lora_B`), so its values
/// stay the smaller ones and the nearer to f16's subnormals, where the rounding loses precision.
pub fn stacked_factors(name: &str, graph: &[usize], deltas: &[Scaled], dtype: DType) -> Result<(Tensor, Tensor, f32)> {
    let target = torch_shape(graph);
    let out = target[0];
    let inputs = target.get(1).copied().unwrap_or(1);
    let kernel: usize = target.iter().skip(2).product();
    let cols = inputs * kernel;
    let mut low = Vec::with_capacity(deltas.len());
    for d in deltas {
        d.delta.check(&target).map_err(|why| {
            Error::Internal(format!("LoRA {} {why}, but the weight '{name}' it was matched to is {target:?}", d.source))
        })?;
        match &d.delta {
            Delta::LowRank(l) => low.push((l, d.scale)),
            other => return Err(Error::Internal(format!("stacking a {other:?} delta of '{name}' as a LoRA"))),
        }
    }
    let uniform = low.windows(2).all(|p| p[0].1 == p[1].1);
    let k: usize = low.iter().map(|(l, _)| l.rank()).sum();
    let (mut up, mut down) = (vec![0f64; out * k], Vec::with_capacity(k * cols));
    let mut offset = 0;
    for (l, scale) in &low {
        let r = l.rank();
        let u = super::merge::widen(&l.up)?;
        for o in 0..out {
            up[o * k + offset..][..r].copy_from_slice(&u[o * r..][..r]);
        }
        let fold = if uniform { 1.0 } else { *scale };
        down.extend(columns_krsc(l.down_matrix()?, r, inputs, kernel).into_iter().map(|v| fold * v));
        offset += r;
    }
    let alpha = match low.first() {
        Some((_, s)) if uniform => *s as f32,
        _ => 1.0,
    };
    Ok((rounded(&[out, k], dtype, &up)?, rounded(&[k, cols], dtype, &down)?, alpha))
}

/// The PyTorch shape of a graph weight: convolutions are held KRSC [out, kh, kw, in].
fn torch_shape(graph: &[usize]) -> Vec<usize> {
    match graph {
        [o, kh, kw, i] => vec![*o, *i, *kh, *kw],
        other => other.to_vec(),
    }
}

/// `values` [rows, in·kernel] in PyTorch column order (in, then kernel position) moved to the
/// graph's (kernel position, then in) order; unchanged for kernel 1.
fn columns_krsc(values: Vec<f64>, rows: usize, inputs: usize, kernel: usize) -> Vec<f64> {
    if kernel == 1 {
        return values;
    }
    let cols = inputs * kernel;
    let mut out = vec![0f64; values.len()];
    for r in 0..rows {
        let (src, dst) = (&values[r * cols..][..cols], &mut out[r * cols..][..cols]);
        for i in 0..inputs {
            for y in 0..kernel {
                dst[y * inputs + i] = src[i * kernel + y];
            }
        }
    }
    out
}

fn rounded(shape: &[usize], dtype: DType, values: &[f64]) -> Result<Tensor> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_f32(shape, dtype, &v)
}

/// One delta's factors for the graph weight `name` of shape `graph`, laid out for the kernels.
fn host_factors(name: &str, graph: &[usize], d: &Scaled, dtype: DType) -> Result<Factors> {
    let target = torch_shape(graph);
    d.delta.check(&target).map_err(|why| {
        Error::Internal(format!("LoRA {} {why}, but the weight '{name}' it was matched to is {target:?}", d.source))
    })?;
    let out = target[0];
    let inputs = target.get(1).copied().unwrap_or(1);
    let kernel: usize = target.iter().skip(2).product();
    let cols = inputs * kernel;
    Ok(match &d.delta {
        Delta::LowRank(l) => {
            let r = l.rank();
            let up = super::merge::widen(&l.up)?;
            let down = columns_krsc(l.down_matrix()?, r, inputs, kernel);
            Factors::LowRank(rounded(&[out, r], dtype, &up)?, rounded(&[r, cols], dtype, &down)?)
        }
        Delta::Hadamard(pairs) => {
            let mut t = Vec::with_capacity(4);
            for (a, b) in pairs {
                let r = a.shape()[0..2][1];
                t.push(rounded(&[out, r], dtype, &super::merge::widen(a)?)?);
                let b = columns_krsc(super::merge::widen(b)?, r, inputs, kernel);
                t.push(rounded(&[r, cols], dtype, &b)?);
            }
            let [a1, b1, a2, b2]: [Tensor; 4] = t.try_into().map_err(|_| Error::Internal("LoHa pairs".into()))?;
            Factors::Hadamard([a1, b1, a2, b2])
        }
        Delta::Kronecker(w1, w2) => {
            let ((a, b), (c, n)) = (w1.dims(), w2.dims());
            let w1 = rounded(&[a, b], dtype, &w1.values()?)?;
            let w2 = rounded(&[c, n / kernel, kernel], dtype, &w2.values()?)?;
            Factors::Kronecker(w1, w2, kernel)
        }
        Delta::Full(t) => {
            let v = columns_krsc(super::merge::widen(t)?, out, inputs, kernel);
            Factors::Full(rounded(&[out, cols], dtype, &v)?)
        }
    })
}

/// Which LoRA set a model's device weights hold, and how to put them back.
pub struct LoraSwitcher {
    restore: Restore,
    /// Base copies of every weight any set merged so far touched (`Restore::Copy`).
    base: HashMap<String, Tensor>,
    arenas: Vec<Arena>,
    /// The weights the merged set touched.
    merged: Vec<String>,
}

impl LoraSwitcher {
    pub fn new(restore: Restore) -> LoraSwitcher {
        LoraSwitcher { restore, base: HashMap::new(), arenas: Vec::new(), merged: Vec::new() }
    }

    /// Device bytes of the base copies (`Restore::Copy`).
    pub fn base_bytes(&self) -> usize {
        self.arenas.iter().map(Arena::capacity).sum()
    }

    /// Makes `set` (None: no LoRA) the merged set of `weights`: the weights the current set touched
    /// go back to their base values, then `set` is merged. Queued on the stream.
    pub fn apply(&mut self, ex: &Exec, weights: &ModelWeights, set: Option<&DeviceLoraSet>) -> Result<()> {
        let Exec::Cuda { gpu, .. } = ex else {
            return Err(Error::Internal("LoraSwitcher runs on CUDA; the CPU path merges on the host".into()));
        };
        weights.changed();
        let weight = |name: &str| {
            weights.tensor(name).ok_or_else(|| Error::Internal(format!("LoRA switch: no weight '{name}' in the model")))
        };
        // 1. base copies of the weights the new set touches first (they hold base values now)
        if self.restore == Restore::Copy
            && let Some(set) = set
        {
            let fresh: Vec<&str> = set.names().filter(|n| !self.base.contains_key(*n)).collect();
            if !fresh.is_empty() {
                let bytes = fresh
                    .iter()
                    .map(|n| Ok(weight(n)?.size_bytes().div_ceil(ARENA_ALIGN) * ARENA_ALIGN))
                    .sum::<Result<usize>>()?;
                let arena = Arena::new("LoRA base copies", bytes)?;
                for name in fresh {
                    let w = weight(name)?;
                    let copy = gpu.empty(&arena, w.shape(), w.dtype())?;
                    gpu.copy(&copy, w)?;
                    self.base.insert(name.to_string(), copy);
                }
                self.arenas.push(arena);
            }
        }
        // 2. the current set's weights back to base; with copies, only those the new set leaves
        // alone: the merge below reads the others' base values from their copies
        let copies_merge = self.restore == Restore::Copy && set.is_some();
        let next: std::collections::HashSet<&str> = set.map(|s| s.names().collect()).unwrap_or_default();
        for name in std::mem::take(&mut self.merged) {
            if copies_merge && next.contains(name.as_str()) {
                continue;
            }
            let w = weight(&name)?;
            match self.restore {
                Restore::Copy => {
                    let base = self.base.get(&name).ok_or_else(|| {
                        Error::Internal(format!("LoRA switch: no base copy of the merged weight '{name}'"))
                    })?;
                    gpu.copy(w, base)?;
                }
                Restore::Reload => {
                    let source = weights.source(&name).ok_or_else(|| {
                        Error::Internal(format!("LoRA switch: the weight '{name}' kept no host source to reload"))
                    })?;
                    let laid_out =
                        if source.shape().len() == 4 { weight_oihw_to_ohwi(source)? } else { source.clone() };
                    let crate::tensor::Storage::Device(mem) = w.storage() else {
                        return Err(Error::Internal(format!("LoRA switch: '{name}' is not a device weight")));
                    };
                    gpu.upload_into(mem, &laid_out, w.dtype())?;
                }
                Restore::Never => {
                    return Err(Error::Internal("LoRA switch: a second set where the run was to have only one".into()));
                }
            }
        }
        // 3. the new set
        if let Some(set) = set {
            let no_copies = HashMap::new();
            set.merge_from(ex, weights, if copies_merge { &self.base } else { &no_copies })?;
            self.merged = set.names().map(str::to_string).collect();
        }
        // 4. the FP8 twins from the weights as they are now
        weights.requantize_fp8(ex)
    }
}

#[cfg(test)]
mod tests {
    use super::super::merge::{Delta, Dora, DoraAxis, Factor, LowRank, Scaled, matmul, widen};
    use super::{Factors, Route, columns_krsc, host_factors, route, stacked_factors, torch_shape};
    use crate::ops::lora::DoraNorm;
    use crate::tensor::{DType, Tensor};

    fn t(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64).map(|i| (((i * 7919 + seed * 104729) % 23) as f32 - 11.0) / 8.0).collect();
        Tensor::from_f32(shape, DType::F32, &v).unwrap()
    }

    /// ΔW rebuilt from the laid-out factors, in the graph's (KRSC) element order.
    fn rebuilt(f: &Factors, out: usize, inputs: usize, kernel: usize) -> Vec<f64> {
        let v = |t: &Tensor| widen(t).unwrap();
        match f {
            Factors::LowRank(up, down) => matmul(&v(up), &v(down), out, up.shape()[1]),
            Factors::Hadamard([a1, b1, a2, b2]) => {
                let w1 = matmul(&v(a1), &v(b1), out, a1.shape()[1]);
                let w2 = matmul(&v(a2), &v(b2), out, a2.shape()[1]);
                w1.iter().zip(&w2).map(|(x, y)| x * y).collect()
            }
            Factors::Kronecker(w1, w2, k) => {
                assert_eq!(*k, kernel);
                let (a, b) = (w1.shape()[0], w1.shape()[1]);
                let (c, d) = (w2.shape()[0], w2.shape()[1]);
                let (v1, v2) = (v(w1), v(w2));
                let mut o = vec![0f64; out * inputs * kernel];
                for i in 0..a {
                    for j in 0..b {
                        for kk in 0..c {
                            for l in 0..d {
                                for y in 0..kernel {
                                    o[(i * c + kk) * inputs * kernel + y * inputs + j * d + l] =
                                        v1[i * b + j] * v2[(kk * d + l) * kernel + y];
                                }
                            }
                        }
                    }
                }
                o
            }
            Factors::Full(d) => v(d),
        }
    }

    #[test]
    fn laid_out_factors_rebuild_the_host_delta_in_krsc_order() {
        // A 3x3 convolution [out 6, in 4, 3, 3], held KRSC [6, 3, 3, 4] on the device.
        let (out, inputs, kernel) = (6, 4, 9);
        let graph = [6, 3, 3, 4];
        let target = torch_shape(&graph);
        let deltas = [
            Delta::LowRank(LowRank { up: t(&[6, 2, 1, 1], 1), down: t(&[2, 4, 3, 3], 2), mid: None }),
            Delta::LowRank(LowRank {
                up: t(&[6, 2, 1, 1], 3),
                down: t(&[2, 4, 1, 1], 4),
                mid: Some(t(&[2, 2, 3, 3], 5)),
            }),
            Delta::Hadamard([(t(&[6, 3], 6), t(&[3, 36], 7)), (t(&[6, 2], 8), t(&[2, 36], 9))]),
            Delta::Kronecker(Factor::Full(t(&[2, 2], 10)), Factor::Full(t(&[3, 2, 3, 3], 11))),
            Delta::Kronecker(
                Factor::Product(t(&[2, 1], 12), t(&[1, 2], 13)),
                Factor::Product(t(&[3, 2], 14), t(&[2, 18], 15)),
            ),
            Delta::Full(t(&[6, 4, 3, 3], 16)),
        ];
        for delta in deltas {
            let want = columns_krsc(delta.values(&target).unwrap(), out, inputs, kernel);
            let d = Scaled { scale: 0.5, delta, source: "test".into(), dora: None };
            let f = host_factors("w", &graph, &d, DType::F32).unwrap();
            let got = rebuilt(&f, out, inputs, kernel);
            let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
            assert!(err < 1e-4, "{:?}: max error {err}", d.delta);
        }
        // A delta that does not fit its weight is the engine's error, naming both.
        let d = Scaled { scale: 1.0, delta: Delta::Full(t(&[6, 4], 1)), source: "f: m".into(), dora: None };
        let e = host_factors("conv", &graph, &d, DType::F32).err().unwrap().to_string();
        assert!(e.contains("'conv'") && e.contains("f: m"), "{e}");
    }

    #[test]
    fn columns_move_from_in_major_to_kernel_major() {
        // one row, in 2, kernel 3: PyTorch (i, y) = [i0y0, i0y1, i0y2, i1y0, i1y1, i1y2]
        let v = vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0];
        assert_eq!(columns_krsc(v.clone(), 1, 2, 3), vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
        assert_eq!(columns_krsc(v.clone(), 2, 3, 1), v);
        assert_eq!(torch_shape(&[8, 3, 3, 4]), vec![8, 4, 3, 3]);
        assert_eq!(torch_shape(&[8, 4]), vec![8, 4]);
    }

    fn scaled(delta: Delta, scale: f64) -> Scaled {
        Scaled { scale, delta, source: "test".into(), dora: None }
    }

    /// LoCon deltas for a [6, 4, 3, 3] convolution: 3x3 down of rank 2, a Tucker core of rank 2,
    /// 3x3 down of rank 3.
    fn locons() -> [Delta; 3] {
        [
            Delta::LowRank(LowRank { up: t(&[6, 2, 1, 1], 1), down: t(&[2, 4, 3, 3], 2), mid: None }),
            Delta::LowRank(LowRank {
                up: t(&[6, 2, 1, 1], 3),
                down: t(&[2, 4, 1, 1], 4),
                mid: Some(t(&[2, 2, 3, 3], 5)),
            }),
            Delta::LowRank(LowRank { up: t(&[6, 3], 6), down: t(&[3, 4, 3, 3], 7), mid: None }),
        ]
    }

    #[test]
    fn routes_follow_the_table() {
        let graph = [6, 3, 3, 4];
        let [a, b, _] = locons();
        let loha = Delta::Hadamard([(t(&[6, 3], 8), t(&[3, 36], 9)), (t(&[6, 2], 10), t(&[2, 36], 11))]);
        // LoRA / LoCon only: one GEMM over the stacked factors from the rank threshold on (K = 4
        // here), the kernel below it.
        let pair = [scaled(a.clone(), 0.5), scaled(b.clone(), 0.25)];
        let r = route("w", &graph, &pair, DType::F16, 4).unwrap();
        assert!(matches!(r, Route::Gemm { ref up, .. } if up.shape() == [6, 4]), "LoCon + Tucker LoCon");
        let r = route("w", &graph, &pair, DType::F16, 5).unwrap();
        assert!(matches!(r, Route::Kernel { ref terms, dora: None } if terms.len() == 2), "below the threshold");
        // A LoHa beside them: the kernel, every term.
        let r = route("w", &graph, &[scaled(a.clone(), 0.5), scaled(loha, 1.0)], DType::F16, 0).unwrap();
        assert!(matches!(r, Route::Kernel { ref terms, dora: None } if terms.len() == 2), "LoCon + LoHa");
        // A DoRA module: the kernel with the rescale, its own term apart, m in f32, the norm's axis.
        let dora = Dora { magnitude: t(&[1, 4, 1, 1], 12), axis: DoraAxis::Input, eps: 1e-6, blend: 0.8 };
        let with_dora = Scaled { dora: Some(dora), ..scaled(b, 0.25) };
        match route("w", &graph, &[scaled(a, 0.5), with_dora], DType::BF16, 0).unwrap() {
            Route::Kernel { terms, dora: Some(d) } => {
                assert_eq!(terms.len(), 1);
                assert_eq!((d.norm, d.scale, d.blend, d.eps), (DoraNorm::Inputs(4), 0.25, 0.8, 1e-6));
                assert_eq!((d.magnitude.shape(), d.magnitude.dtype()), (&[4][..], DType::F32));
                assert_eq!(d.magnitude.to_f32_vec().unwrap(), t(&[4], 12).to_f32_vec().unwrap());
            }
            _ => panic!("a DoRA layer did not take the kernel with its rescale"),
        }
    }

    #[test]
    fn stacked_factors_rebuild_the_scaled_sum_within_the_fold_bound() {
        let graph = [6, 3, 3, 4];
        let target = torch_shape(&graph);
        let (out, inputs, kernel) = (6, 4, 9);
        let cols = inputs * kernel;
        let want = |deltas: &[Scaled]| {
            let mut sum = vec![0f64; out * cols];
            for d in deltas {
                let v = columns_krsc(d.delta.values(&target).unwrap(), out, inputs, kernel);
                sum.iter_mut().zip(v).for_each(|(s, v)| *s += d.scale * v);
            }
            sum
        };
        // One scale for all: the files' factors (exact here in f16), alpha = the scale: no error.
        let same: Vec<Scaled> = locons().into_iter().map(|d| scaled(d, 0.3)).collect();
        let (up, down, alpha) = stacked_factors("w", &graph, &same, DType::F16).unwrap();
        assert_eq!((up.shape(), down.shape(), alpha), (&[6, 7][..], &[7, 36][..], 0.3f32));
        let got = matmul(&widen(&up).unwrap(), &widen(&down).unwrap(), out, 7);
        let want_same = want(&same);
        for (g, w) in got.iter().zip(&want_same) {
            assert!((0.3 * g - w).abs() <= 1e-12, "equal scales: {g} · 0.3 vs {w}");
        }
        // Scales that differ: folded into down's rows, which rounds s · down once. The error of
        // each element stays within u · Σ |up| |s · down| (u: half an ulp, relative).
        let scales = [0.5, 0.3, -0.125];
        let mixed: Vec<Scaled> = locons().into_iter().zip(scales).map(|(d, s)| scaled(d, s)).collect();
        for (dtype, u) in [(DType::F16, 2f64.powi(-11)), (DType::BF16, 2f64.powi(-8))] {
            let (up, down, alpha) = stacked_factors("w", &graph, &mixed, dtype).unwrap();
            assert_eq!(alpha, 1.0);
            let got = matmul(&widen(&up).unwrap(), &widen(&down).unwrap(), out, 7);
            let mut bound = vec![0f64; out * cols];
            for d in &mixed {
                let Delta::LowRank(l) = &d.delta else { unreachable!("LoCons") };
                let r = l.rank();
                let abs = |v: Vec<f64>| v.into_iter().map(f64::abs).collect::<Vec<_>>();
                let sd = abs(columns_krsc(l.down_matrix().unwrap(), r, inputs, kernel)
                    .iter()
                    .map(|v| d.scale * v)
                    .collect());
                let b = matmul(&abs(widen(&l.up).unwrap()), &sd, out, r);
                bound.iter_mut().zip(b).for_each(|(x, b)| *x += u * b);
            }
            let want = want(&mixed);
            let mut worst = 0f64;
            for ((g, w), b) in got.iter().zip(&want).zip(&bound) {
                assert!((g - w).abs() <= b + 1e-12, "{dtype:?}: {g} vs {w}, bound {b}");
                worst = worst.max((g - w).abs() / b.max(1e-300));
            }
            // The fold does round here (0.3 and 0.125 · odd eighths are not all exact), so the
            // bound is exercised, not vacuous.
            assert!(worst > 0.0, "{dtype:?}: no rounding at all");
        }
        // A delta of another kind cannot be stacked.
        let loha = Delta::Hadamard([(t(&[6, 3], 8), t(&[3, 36], 9)), (t(&[6, 2], 10), t(&[2, 36], 11))]);
        assert!(stacked_factors("w", &graph, &[scaled(loha, 1.0)], DType::F16).is_err());
    }
}
