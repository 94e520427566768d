//! LoRA deltas merged into weights: for each layer of a list, W += Σ_t scale_t · ΔW_t, each ΔW_t
//! rebuilt from its factors, the sum taken in fp32 on the GPU (f64 in the twin) and rounded once to
//! W's dtype, so several LoRAs stacked on one weight read and write it once.
//!
//! The formats' maths are the host merge's (models/lora/merge.rs, after kohya sd-scripts
//! `networks/lora.py` and LyCORIS `lycoris/functional/{loha,lokr}.py`). Here the factors arrive in
//! W's dtype with their columns in W's order (a convolution's KRSC [out, kh, kw, in]): the caller
//! folds a Tucker `lora_mid` into down, multiplies out LoKr product factors and permutes columns.
//!
//! GPU: kernels/lora/merge.cu (its header gives the design). One launch per weight dtype covers all
//! of its layers through a device table of layer and term descriptors; layers with a LoHa term go
//! to one more launch, of the kernel that keeps a LoHa's first product in registers. The low-rank
//! products run on tensor cores, so the GPU merge takes f16 and bf16 weights.
//!
//! `merge_gemm` is the other route for layers whose one term is low rank (a LoRA set's factors
//! stacked along the rank, models/lora/device.rs): one cuBLASLt GEMM per layer with beta = 1.
//!
//! DoRA (`DoraTerm`, models/lora/merge.rs `Dora`): a layer's merge adds
//! blend · (m ⊙ W₁ / (‖W₁‖ + eps) − base) with W₁ = base + s·ΔW of the DoRA module's own term, in
//! three steps: the merge kernel writes W₁ into a scratch buffer, rounded to W's dtype;
//! kernels/lora/dora.cu takes the norms of that buffer in fp32 and turns it into the change,
//! rounded to W's dtype; the merge kernel adds the change to W as a full term beside the layer's
//! other terms. The norm is taken of W₁ rounded to W's dtype, as PEFT's merge does
//! (`tuners/lora/dora.py` `get_weight_norm`: `weight + scaling * lora_weight` in the weight's
//! dtype), not of its fp32 sum: so W₁ fits a buffer of W's dtype that the merge kernel writes, and
//! the difference is at most half an ulp per element of W₁ (2^-11 relative in f16, 2^-8 in bf16),
//! which moves each norm by less than that. With the change's own rounding, the result is within
//! about two ulps of W of the host merge (f64, rounded once), where a plain merge is within one.
//!
//! Host: `merged_host` is the twin. Host tensors are immutable (shared or memory-mapped bytes), so
//! it returns each layer's merged weight rather than writing in place.

use std::collections::BTreeMap;
use std::ffi::c_void;

use half::{bf16, f16};

use super::{Exec, GRID_X, grid_dim, kernel_i32, par_rows};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::blas::{Gemm, GemmIo};
use crate::gpu::memory::{ARENA_ALIGN, Arena};
use crate::gpu::params::{
    LORA_DORA_CHANGE_ELEMS, LORA_DORA_THREADS, LORA_SHARED_BYTES, LORA_THREADS, LORA_TILE_M, LORA_TILE_N,
    LoraDoraLayer, LoraDoraParams, LoraLayer, LoraMergeParams, LoraTerm, LoraTermKind,
};
use crate::tensor::{DType, Tensor};

/// One ΔW of a weight W [out, cols] (row-major, the weight's own element order), as factors
/// already in W's dtype and on the device (host tensors for the twin).
#[derive(Clone, Copy, Debug)]
pub enum DeltaFactors<'t> {
    /// ΔW = up · down; up [out, r], down [r, cols].
    LowRank { up: &'t Tensor, down: &'t Tensor },
    /// LoHa: ΔW = (a1 · b1) ⊙ (a2 · b2); a_k [out, r_k], b_k [r_k, cols].
    Hadamard { a1: &'t Tensor, b1: &'t Tensor, a2: &'t Tensor, b2: &'t Tensor },
    /// LoKr on a weight whose columns run (kernel position y, input channel i) — the device's KRSC
    /// conv layout [out, kh, kw, in]; a Linear has kernel 1: with w1 [a, b] and w2 [c, d, kernel]
    /// (PyTorch order of LyCORIS' W2 [c, d, kh, kw]), out = a·c, in = b·d,
    /// ΔW[i·c + k, y·in + j·d + l] = w1[i, j] · w2[k, l, y].
    Kronecker { w1: &'t Tensor, w2: &'t Tensor, kernel: usize },
    /// ΔW = delta [out, cols].
    Full { delta: &'t Tensor },
}

#[derive(Clone, Copy, Debug)]
pub struct DeltaTerm<'t> {
    pub factors: DeltaFactors<'t>,
    pub scale: f32,
}

/// DoRA's rescale of a layer (models/lora/merge.rs `Dora`): with W₁ = base + scale · ΔW of `term`,
/// the layer's merge adds blend · (m ⊙ W₁ / (‖W₁‖ + eps) − base) beside its other terms.
#[derive(Clone, Copy, Debug)]
pub struct DoraTerm<'t> {
    pub term: DeltaTerm<'t>,
    /// m: f32, one value per norm group (`norm`), any shape of that many elements.
    pub magnitude: &'t Tensor,
    pub norm: DoraNorm,
    pub eps: f32,
    pub blend: f32,
}

/// The elements of W [rows, cols] one DoRA norm runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoraNorm {
    /// A row: an output channel (PEFT; LyCORIS `wd_on_out`).
    Rows,
    /// One of n input channels: the columns c with equal c % n, over every row (LyCORIS
    /// `wd_on_out=False`; a KRSC convolution's columns run kernel position, then channel).
    Inputs(usize),
}

impl DoraNorm {
    fn groups(self, rows: usize) -> usize {
        match self {
            DoraNorm::Rows => rows,
            DoraNorm::Inputs(n) => n,
        }
    }
    /// The group of flat element `idx` of a [rows, cols] matrix.
    fn group(self, idx: usize, cols: usize) -> usize {
        match self {
            DoraNorm::Rows => idx / cols,
            DoraNorm::Inputs(n) => idx % n,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerDelta<'t> {
    pub weight: &'t Tensor,
    pub terms: Vec<DeltaTerm<'t>>,
    /// Where the base values are read from: None for `weight` itself (a merge in place), or a copy
    /// of the weight's base values (same shape and dtype), so a LoRA switch restores and merges in
    /// one pass.
    pub base: Option<&'t Tensor>,
    /// A DoRA module's rescale (its own term is `DoraTerm::term`, not in `terms`).
    pub dora: Option<DoraTerm<'t>>,
}

const OP: &str = "merge_deltas";

impl DeltaFactors<'_> {
    fn name(&self) -> &'static str {
        match self {
            DeltaFactors::LowRank { .. } => "LowRank",
            DeltaFactors::Hadamard { .. } => "Hadamard",
            DeltaFactors::Kronecker { .. } => "Kronecker",
            DeltaFactors::Full { .. } => "Full",
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match *self {
            DeltaFactors::LowRank { up, down } => vec![up, down],
            DeltaFactors::Hadamard { a1, b1, a2, b2 } => vec![a1, b1, a2, b2],
            DeltaFactors::Kronecker { w1, w2, .. } => vec![w1, w2],
            DeltaFactors::Full { delta } => vec![delta],
        }
    }
}

/// A tensor as a matrix: its first dimension by the product of the others.
fn matrix(t: &Tensor) -> Option<(usize, usize)> {
    let (&rows, rest) = t.shape().split_first()?;
    Some((rows, rest.iter().product()))
}

/// LoKr's dimensions from w1 [a, b] and w2 [c, d, ...]: (a, b, c, d).
fn kron_dims(w1: &Tensor, w2: &Tensor) -> (usize, usize, usize, usize) {
    let dim = |t: &Tensor, i: usize| t.shape().get(i).copied().unwrap_or(1);
    (dim(w1, 0), dim(w1, 1), dim(w2, 0), dim(w2, 1))
}

/// Whether `a` [rows, r] and `b` [r, cols] make a [rows, cols] product (r >= 1).
fn check_product(
    a: &Tensor,
    b: &Tensor,
    rows: usize,
    cols: usize,
    names: (&str, &str),
) -> std::result::Result<(), String> {
    match (matrix(a), matrix(b)) {
        (Some((ar, r)), Some((r2, bc))) if ar == rows && r == r2 && r >= 1 && bc == cols => Ok(()),
        _ => Err(format!(
            "{} {:?} and {} {:?} do not make a [{rows}, {cols}] product ({} [{rows}, rank], {} [rank, {cols}], rank >= 1)",
            names.0,
            a.shape(),
            names.1,
            b.shape(),
            names.0,
            names.1
        )),
    }
}

/// The layer's weight as a [rows, cols] matrix, after checking every term's dtype, place and
/// shapes against it; Err says what does not fit.
fn check_layer(layer: &LayerDelta, on_device: bool) -> std::result::Result<(usize, usize), String> {
    let w = layer.weight;
    let place = |device: bool| if device { "device" } else { "host" };
    if w.is_device() != on_device {
        return Err(format!(
            "the weight is on the {} but the merge runs on the {}",
            place(w.is_device()),
            place(on_device)
        ));
    }
    let (rows, cols) = matrix(w).ok_or("the weight is a scalar")?;
    if let Some(b) = layer.base
        && (b.shape() != w.shape() || b.dtype() != w.dtype() || b.is_device() != w.is_device())
    {
        return Err(format!("its base copy {b:?} is not the weight's shape, dtype and place ({w:?})"));
    }
    let dora_term = layer.dora.as_ref().map(|d| d.term);
    for (t, term) in layer.terms.iter().chain(&dora_term).enumerate() {
        let label = if t < layer.terms.len() { format!("term {t}") } else { "DoRA term".to_string() };
        let why = |msg: String| format!("{label} ({}): {msg}", term.factors.name());
        if !term.scale.is_finite() {
            return Err(why(format!("scale {} is not finite", term.scale)));
        }
        for f in term.factors.tensors() {
            if f.dtype() != w.dtype() {
                return Err(why(format!("factor {f:?} is not {:?} like the weight", w.dtype())));
            }
            if f.is_device() != on_device {
                return Err(why(format!(
                    "factor {f:?} is on the {}, the weight on the {}",
                    place(f.is_device()),
                    place(on_device)
                )));
            }
        }
        match term.factors {
            DeltaFactors::LowRank { up, down } => check_product(up, down, rows, cols, ("up", "down")).map_err(why)?,
            DeltaFactors::Hadamard { a1, b1, a2, b2 } => {
                check_product(a1, b1, rows, cols, ("a1", "b1")).map_err(why)?;
                check_product(a2, b2, rows, cols, ("a2", "b2")).map_err(why)?;
            }
            DeltaFactors::Kronecker { w1, w2, kernel } => {
                let (a, b, c, d) = kron_dims(w1, w2);
                let w2_kernel: usize = w2.shape().iter().skip(2).product();
                let weight_kernel = match w.shape() {
                    [_, kh, kw, _] => kh * kw,
                    _ => kernel,
                };
                let fits = kernel >= 1
                    && kernel == weight_kernel
                    && cols.is_multiple_of(kernel)
                    && w1.shape().len() == 2
                    && w2.shape().len() >= 2
                    && w2_kernel == kernel
                    && a * c == rows
                    && b * d == cols / kernel;
                if !fits {
                    return Err(why(format!(
                        "w1 {:?} ⊗ w2 {:?} with kernel {kernel} does not make the weight's [{rows}, {cols}] \
                         (w1 [a, b], w2 [c, d, kernel], a·c = {rows}, b·d·kernel = {cols}, kernel = kh·kw of a 4-d weight)",
                        w1.shape(),
                        w2.shape()
                    )));
                }
            }
            DeltaFactors::Full { delta } => {
                if matrix(delta) != Some((rows, cols)) {
                    return Err(why(format!("delta {:?} is not [{rows}, {cols}]", delta.shape())));
                }
            }
        }
    }
    if let Some(d) = &layer.dora {
        check_dora(d, rows, cols, on_device).map_err(|msg| format!("DoRA: {msg}"))?;
    }
    Ok((rows, cols))
}

fn check_dora(d: &DoraTerm, rows: usize, cols: usize, on_device: bool) -> std::result::Result<(), String> {
    if let DoraNorm::Inputs(n) = d.norm
        && (n == 0 || !cols.is_multiple_of(n))
    {
        return Err(format!("{n} input channels do not divide the weight's {cols} columns"));
    }
    let groups = d.norm.groups(rows);
    let m = d.magnitude;
    if m.dtype() != DType::F32 || m.is_device() != on_device || m.numel() != groups {
        return Err(format!(
            "the magnitude {m:?} is not {groups} f32 values (one per {:?} group) on the weight's side",
            d.norm
        ));
    }
    if !(d.eps.is_finite() && d.eps >= 0.0 && d.blend.is_finite()) {
        return Err(format!("eps {} must be finite and >= 0, blend {} finite", d.eps, d.blend));
    }
    Ok(())
}

/// Every layer checked; one error lists every layer that does not fit, by index.
fn check_layers(layers: &[LayerDelta], on_device: bool) -> Result<Vec<(usize, usize)>> {
    let mut problems = Vec::new();
    let mut dims = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        match check_layer(layer, on_device) {
            Ok(d) => dims.push(d),
            Err(why) => problems.push(format!("layer {i} (weight {:?}): {why}", layer.weight)),
        }
    }
    if problems.is_empty() {
        Ok(dims)
    } else {
        Err(Error::Input(format!(
            "{OP}: {} of {} layers do not fit their deltas: {}",
            problems.len(),
            layers.len(),
            problems.join("; ")
        )))
    }
}

/// W = base + Σ scale·ΔW for every layer (base: W itself unless the layer names a copy), plus a
/// DoRA layer's change (`DoraTerm`), written in place (device weights keep their addresses). The
/// weights must be distinct; an empty list is a no-op. Host weights: see `merged_host`.
pub fn merge_deltas(ex: &Exec, layers: &[LayerDelta]) -> Result<()> {
    if layers.is_empty() {
        return Ok(());
    }
    let Exec::Cuda { gpu, scratch } = ex else {
        return Err(Error::Internal(format!(
            "{OP} writes device weights in place; host tensors are immutable, merged_host returns merged copies"
        )));
    };
    let dims = check_layers(layers, true)?;
    let work: Vec<usize> = (0..layers.len())
        .filter(|&i| (!layers[i].terms.is_empty() || layers[i].dora.is_some()) && dims[i].0 * dims[i].1 > 0)
        .collect();
    check_distinct(layers, &work)?;
    if let Some(&i) = work.iter().find(|&&i| layers[i].weight.dtype() == DType::F32) {
        return Err(Error::Unsupported(format!(
            "{OP}: layer {i} is f32; the GPU merge takes f16 or bf16 weights (its products run on tensor cores), \
             merged_host merges f32 ones"
        )));
    }
    if !work.is_empty() && gpu.info().max_shared_per_block < LORA_SHARED_BYTES as usize {
        return Err(Error::Unsupported(format!(
            "{OP} needs {LORA_SHARED_BYTES} bytes of shared memory per block; {} offers {}",
            gpu.info().name,
            gpu.info().max_shared_per_block
        )));
    }
    let (plain, dora): (Vec<usize>, Vec<usize>) = work.into_iter().partition(|&i| layers[i].dora.is_none());
    launch_merges(gpu, scratch, plain.iter().map(|&i| (&layers[i], dims[i])).collect())?;
    merge_dora(gpu, scratch, dora.iter().map(|&i| (&layers[i], dims[i])).collect())
}

/// A checked layer and its weight's [rows, cols].
type Checked<'a, 't> = (&'a LayerDelta<'t>, (usize, usize));

/// One launch per merge kernel over `layers` (checked, f16 or bf16, distinct weights): by dtype,
/// and whether LoHa terms need the kernel that keeps a product.
fn launch_merges(gpu: &Gpu, scratch: &Arena, layers: Vec<Checked>) -> Result<()> {
    let mut launches: BTreeMap<&'static str, Vec<Checked>> = BTreeMap::new();
    for (layer, dims) in layers {
        let hadamard = layer.terms.iter().any(|t| matches!(t.factors, DeltaFactors::Hadamard { .. }));
        let kernel = match (layer.weight.dtype(), hadamard) {
            (DType::F16, false) => "lora_merge_f16",
            (DType::BF16, false) => "lora_merge_bf16",
            (DType::F16, true) => "lora_merge_hadamard_f16",
            (DType::BF16, true) => "lora_merge_hadamard_bf16",
            (DType::F32, _) => return Err(Error::Internal(format!("{OP}: an f32 layer reached the kernels"))),
        };
        launches.entry(kernel).or_default().push((layer, dims));
    }
    for (kernel, members) in launches {
        launch(gpu, scratch, kernel, members.into_iter())?;
    }
    Ok(())
}

/// The DoRA layers (checked, f16 or bf16, distinct weights), in batches of one dtype whose
/// buffers (W₁ in W's dtype, the norms' factors) take at most half of the scratch arena's free
/// bytes (at least one layer each): W₁ is as large as the weight, and a LoRA with DoRA on every
/// UNet linear would otherwise need gigabytes of scratch at once.
fn merge_dora(gpu: &Gpu, scratch: &Arena, layers: Vec<Checked>) -> Result<()> {
    let budget = scratch.capacity().saturating_sub(scratch.used()) / 2;
    for dtype in [DType::F16, DType::BF16] {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for &(layer, (rows, cols)) in layers.iter().filter(|(l, _)| l.weight.dtype() == dtype) {
            let groups = layer.dora.as_ref().map_or(0, |d| d.norm.groups(rows));
            let need = aligned(rows * cols * dtype.size()) + aligned(groups * 4);
            if !batch.is_empty() && bytes + need > budget {
                dora_batch(gpu, scratch, dtype, &std::mem::take(&mut batch))?;
                bytes = 0;
            }
            batch.push((layer, (rows, cols)));
            bytes += need;
        }
        if !batch.is_empty() {
            dora_batch(gpu, scratch, dtype, &batch)?;
        }
    }
    Ok(())
}

fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ARENA_ALIGN) * ARENA_ALIGN
}

/// One batch of DoRA layers of `dtype`: W₁ into buffers (the merge kernel), the norms and the
/// change (kernels/lora/dora.cu), then W = base + the other terms + the change (the merge kernel).
/// The buffers go back to the arena when this returns; later work on the stream comes after.
fn dora_batch(gpu: &Gpu, scratch: &Arena, dtype: DType, batch: &[Checked]) -> Result<()> {
    fn dora<'t>(layer: &LayerDelta<'t>) -> Result<DoraTerm<'t>> {
        layer.dora.ok_or_else(|| Error::Internal(format!("{OP}: a layer without DoRA in a DoRA batch")))
    }
    // 1. W₁ = base + s·ΔW, rounded to W's dtype
    let (mut w1, mut factors) = (Vec::with_capacity(batch.len()), Vec::with_capacity(batch.len()));
    for &(layer, (rows, _)) in batch {
        w1.push(gpu.empty(scratch, layer.weight.shape(), dtype)?);
        factors.push(gpu.empty(scratch, &[dora(layer)?.norm.groups(rows)], DType::F32)?);
    }
    let firsts = batch
        .iter()
        .zip(&w1)
        .map(|(&(layer, _), buffer)| {
            let base = Some(layer.base.unwrap_or(layer.weight));
            Ok(LayerDelta { weight: buffer, terms: vec![dora(layer)?.term], base, dora: None })
        })
        .collect::<Result<Vec<_>>>()?;
    launch_merges(gpu, scratch, firsts.iter().zip(batch).map(|(l, &(_, dims))| (l, dims)).collect())?;

    // 2. f = m / (‖W₁‖ + eps) per group; 3. W₁ -> blend · (f ⊙ W₁ − base)
    let threads = LORA_DORA_THREADS as usize;
    let (mut table, mut factor_blocks, mut change_blocks) = (Vec::with_capacity(batch.len()), 0usize, 0usize);
    for ((&(layer, (rows, cols)), buffer), f) in batch.iter().zip(&w1).zip(&factors) {
        let d = dora(layer)?;
        let inputs = match d.norm {
            DoraNorm::Rows => 0,
            DoraNorm::Inputs(n) => n,
        };
        table.push(LoraDoraLayer {
            w1: buffer.device_ptr()? as *mut c_void,
            base: layer.base.unwrap_or(layer.weight).device_ptr()? as *const c_void,
            magnitude: d.magnitude.device_ptr()? as *const f32,
            factor: f.device_ptr()? as *mut f32,
            eps: d.eps,
            blend: d.blend,
            rows: kernel_i32(OP, "weight rows", rows)?,
            cols: kernel_i32(OP, "weight columns", cols)?,
            inputs: kernel_i32(OP, "DoRA input channels", inputs)?,
            groups: kernel_i32(OP, "DoRA norm groups", d.norm.groups(rows))?,
            first_factor_block: kernel_i32(OP, "DoRA norm blocks", factor_blocks)?,
            first_change_block: kernel_i32(OP, "DoRA change blocks", change_blocks)?,
        });
        factor_blocks += match d.norm {
            DoraNorm::Rows => rows.div_ceil(threads / 32),
            DoraNorm::Inputs(n) => n.div_ceil(threads),
        };
        change_blocks += (rows * cols).div_ceil(threads * LORA_DORA_CHANGE_ELEMS as usize);
    }
    // SAFETY: LoraDoraLayer is a plain C struct without padding (asserted below); reading it as
    // bytes reads initialised memory of exactly size_of_val bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts(table.as_ptr() as *const u8, std::mem::size_of_val(table.as_slice())) };
    let uploaded = gpu.upload_bytes(scratch, bytes)?;
    let p = LoraDoraParams {
        layers: uploaded.ptr()? as *const LoraDoraLayer,
        layer_count: kernel_i32(OP, "DoRA layers", table.len())?,
    };
    let (norms, change) = match dtype {
        DType::F16 => ("lora_dora_factors_f16", "lora_dora_change_f16"),
        DType::BF16 => ("lora_dora_factors_bf16", "lora_dora_change_bf16"),
        DType::F32 => return Err(Error::Internal(format!("{OP}: an f32 layer reached the DoRA kernels"))),
    };
    let block = (LORA_DORA_THREADS, 1, 1);
    gpu.launch(norms, (grid_dim(OP, "DoRA norm blocks", factor_blocks, GRID_X)?, 1, 1), block, 0, &p)?;
    gpu.launch(change, (grid_dim(OP, "DoRA change blocks", change_blocks, GRID_X)?, 1, 1), block, 0, &p)?;

    // 4. W = base + Σ scale·ΔW of the other terms + the change, rounded once more
    let finals: Vec<LayerDelta> = batch
        .iter()
        .zip(&w1)
        .map(|(&(layer, _), change)| {
            let mut terms = layer.terms.clone();
            terms.push(DeltaTerm { factors: DeltaFactors::Full { delta: change }, scale: 1.0 });
            LayerDelta { weight: layer.weight, terms, base: layer.base, dora: None }
        })
        .collect();
    launch_merges(gpu, scratch, finals.iter().zip(batch).map(|(l, &(_, dims))| (l, dims)).collect())
}

/// Refuses two layers whose weights share memory: one launch would read and write it twice.
fn check_distinct(layers: &[LayerDelta], work: &[usize]) -> Result<()> {
    let mut spans = work
        .iter()
        .map(|&i| Ok((layers[i].weight.device_ptr()?, layers[i].weight.size_bytes() as u64, i)))
        .collect::<Result<Vec<_>>>()?;
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((p, bytes, i), (q, _, j)) = (pair[0], pair[1]);
        if p + bytes > q {
            return Err(Error::Input(format!(
                "{OP}: layers {i} and {j} have overlapping weights ({:?} and {:?}); give each weight once, with all its terms",
                layers[i].weight, layers[j].weight
            )));
        }
    }
    Ok(())
}

/// The descriptor tables of `layers` (checked, all one dtype) uploaded, and one launch over their tiles.
fn launch<'a, 't: 'a>(
    gpu: &Gpu,
    scratch: &Arena,
    kernel: &'static str,
    layers: impl Iterator<Item = (&'a LayerDelta<'t>, (usize, usize))>,
) -> Result<()> {
    let (mut table, mut terms, mut tiles) = (Vec::new(), Vec::new(), 0usize);
    for (layer, (rows, cols)) in layers {
        let col_tiles = cols.div_ceil(LORA_TILE_N as usize);
        table.push(LoraLayer {
            w: layer.weight.device_ptr()? as *mut c_void,
            base: layer.base.unwrap_or(layer.weight).device_ptr()? as *const c_void,
            rows: kernel_i32(OP, "weight rows", rows)?,
            cols: kernel_i32(OP, "weight columns", cols)?,
            col_tiles: col_tiles as i32,
            first_tile: kernel_i32(OP, "tiles", tiles)?,
            first_term: kernel_i32(OP, "terms", terms.len())?,
            term_count: kernel_i32(OP, "terms", layer.terms.len())?,
        });
        tiles += rows.div_ceil(LORA_TILE_M as usize) * col_tiles;
        for term in &layer.terms {
            terms.push(descriptor(term)?);
        }
    }
    let grid = grid_dim(OP, "tiles", tiles, GRID_X)?;
    let layer_bytes = std::mem::size_of_val(table.as_slice());
    let uploaded = gpu.upload_bytes(scratch, &table_bytes(&table, &terms))?;
    let base = uploaded.ptr()?;
    let p = LoraMergeParams {
        layers: base as *const LoraLayer,
        terms: (base + layer_bytes as u64) as *const LoraTerm,
        layer_count: kernel_i32(OP, "layers", table.len())?,
    };
    gpu.launch(kernel, (grid, 1, 1), (LORA_THREADS, 1, 1), LORA_SHARED_BYTES, &p)
}

fn descriptor(term: &DeltaTerm) -> Result<LoraTerm> {
    let ptr = |t: &Tensor| -> Result<*const c_void> { Ok(t.device_ptr()? as *const c_void) };
    let rank = |t: &Tensor| kernel_i32(OP, "rank", t.shape()[0]);
    let mut d = LoraTerm { scale: term.scale, ..Default::default() };
    match term.factors {
        DeltaFactors::LowRank { up, down } => {
            (d.kind, d.a, d.b, d.rank) = (LoraTermKind::LORA_LOW_RANK as i32, ptr(up)?, ptr(down)?, rank(down)?);
        }
        DeltaFactors::Hadamard { a1, b1, a2, b2 } => {
            (d.kind, d.a, d.b, d.rank) = (LoraTermKind::LORA_HADAMARD as i32, ptr(a1)?, ptr(b1)?, rank(b1)?);
            (d.a2, d.b2, d.rank2) = (ptr(a2)?, ptr(b2)?, rank(b2)?);
        }
        DeltaFactors::Kronecker { w1, w2, kernel } => {
            let (_, b, c, dd) = kron_dims(w1, w2);
            (d.kind, d.a, d.b) = (LoraTermKind::LORA_KRONECKER as i32, ptr(w1)?, ptr(w2)?);
            d.kron_b = kernel_i32(OP, "LoKr w1 columns", b)?;
            d.kron_c = kernel_i32(OP, "LoKr w2 rows", c)?;
            d.kron_d = kernel_i32(OP, "LoKr w2 columns", dd)?;
            d.kron_kernel = kernel_i32(OP, "LoKr kernel", kernel)?;
        }
        DeltaFactors::Full { delta } => (d.kind, d.a) = (LoraTermKind::LORA_FULL as i32, ptr(delta)?),
    }
    Ok(d)
}

// params.h lays both descriptors out without padding (pointers first, then 4-byte fields filling
// whole 8-byte words), so their bytes are all initialised and the table goes up as plain bytes.
const _: () = assert!(std::mem::size_of::<LoraLayer>() == 2 * 8 + 6 * 4);
const _: () = assert!(std::mem::size_of::<LoraTerm>() == 4 * 8 + 8 * 4);
const _: () = assert!(std::mem::size_of::<LoraDoraLayer>() == 4 * 8 + 8 * 4);

/// The layer table followed by the term table.
fn table_bytes(layers: &[LoraLayer], terms: &[LoraTerm]) -> Vec<u8> {
    // SAFETY: both types are plain C structs without padding (asserted above); reading them as
    // bytes reads initialised memory of exactly size_of_val bytes.
    let (l, t) = unsafe {
        (
            std::slice::from_raw_parts(layers.as_ptr() as *const u8, std::mem::size_of_val(layers)),
            std::slice::from_raw_parts(terms.as_ptr() as *const u8, std::mem::size_of_val(terms)),
        )
    };
    [l, t].concat()
}

/// W = base + scale · up · down through cuBLASLt for layers whose one term is low rank (a LoRA set's
/// factors stacked along the rank: models/lora/device.rs), the route that measured faster than
/// the merge kernel (models/lora/device.rs `Route`): per layer one GEMM, D = alpha · A · B + beta · C
/// with A = up [rows, rank], B = down [rank, cols], alpha = the scale, beta = 1, C = the base (W
/// itself, or a copy: cuBLASLt takes C and D apart with one layout) and D = W. fp32 accumulation
/// and one rounding to W's dtype, as the kernel; only the order of the fp32 sums differs, so
/// `merged_host` is its twin too. cuBLASLt gives the same bits for the same call every run on one
/// GPU and library (its algorithm comes from the heuristic once per shape; no atomics are asked
/// for). Distinct weights; no DoRA; f16, bf16 or f32.
pub fn merge_gemm(ex: &Exec, layers: &[LayerDelta]) -> Result<()> {
    const GEMM_OP: &str = "merge_gemm";
    if layers.is_empty() {
        return Ok(());
    }
    let Exec::Cuda { gpu, .. } = ex else {
        return Err(Error::Internal(format!("{GEMM_OP} writes device weights in place; merged_host is its twin")));
    };
    let dims = check_layers(layers, true)?;
    let mut problems = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let one_low_rank = matches!(layer.terms.as_slice(), [DeltaTerm { factors: DeltaFactors::LowRank { .. }, .. }]);
        if !one_low_rank || layer.dora.is_some() {
            problems.push(format!(
                "layer {i} (weight {:?}) has {} terms{}",
                layer.weight,
                layer.terms.len(),
                if layer.dora.is_some() { " and DoRA" } else { "" }
            ));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Internal(format!(
            "{GEMM_OP} takes layers with one low-rank term and no DoRA (merge_deltas the others): {}",
            problems.join("; ")
        )));
    }
    let work: Vec<usize> = (0..layers.len()).filter(|&i| dims[i].0 * dims[i].1 > 0).collect();
    check_distinct(layers, &work)?;
    let mut blas = gpu.blas()?;
    for i in work {
        let (layer, (rows, cols)) = (&layers[i], dims[i]);
        let term = layer.terms[0];
        let DeltaFactors::LowRank { up, down } = term.factors else {
            return Err(Error::Internal(format!("{GEMM_OP}: layer {i} lost its low-rank term")));
        };
        let rank = down.shape()[0];
        let dtype = layer.weight.dtype();
        let g = Gemm {
            m: rows,
            n: cols,
            k: rank,
            batch: 1,
            b_transposed: false,
            lda: rank,
            ldb: cols,
            ldc: cols,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            dtype,
            out_dtype: dtype,
            bias: false,
            fp8: false,
            fp8_rows: false,
        };
        let w = layer.weight.device_ptr()?;
        let base = layer.base.map_or(Ok(w), |b| b.device_ptr())?;
        let io = GemmIo {
            a: up.device_ptr()?,
            b: down.device_ptr()?,
            d: w,
            bias: None,
            c: Some((base, 1.0)),
            alpha: term.scale,
            scales: None,
        };
        blas.gemm(gpu, &g, io)?;
    }
    Ok(())
}

/// The twin: each layer's weight (host tensors) plus Σ scale·ΔW, summed in f64 and rounded once to
/// the weight's dtype, as new tensors in the list's order (f16, bf16 or f32 weights). A DoRA layer
/// follows the GPU's three steps and their roundings (module doc): W₁ rounded to the dtype, the
/// norms of that in f64, the change rounded to the dtype, then the other terms and the change
/// summed with the base and rounded once.
pub fn merged_host(layers: &[LayerDelta]) -> Result<Vec<Tensor>> {
    let dims = check_layers(layers, false)?;
    layers.iter().zip(dims).map(|(layer, (rows, cols))| merged_layer(layer, rows, cols)).collect()
}

/// A term's factors widened to f64 once per layer.
enum Wide {
    LowRank { up: Vec<f64>, down: Vec<f64>, rank: usize },
    Hadamard { pairs: [(Vec<f64>, Vec<f64>, usize); 2] },
    Kronecker { w1: Vec<f64>, w2: Vec<f64>, b: usize, c: usize, d: usize, kernel: usize },
    Full(Vec<f64>),
}

fn widen(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_f32_vec()?.into_iter().map(f64::from).collect())
}

fn merged_layer(layer: &LayerDelta, rows: usize, cols: usize) -> Result<Tensor> {
    let dtype = layer.weight.dtype();
    let base = layer.base.unwrap_or(layer.weight);
    if let Some(d) = &layer.dora {
        let w1 = LayerDelta { weight: layer.weight, terms: vec![d.term], base: layer.base, dora: None };
        let w1 = merged_layer(&w1, rows, cols)?;
        let change = dora_change_host(&w1, base, d, rows, cols)?;
        let mut terms = layer.terms.clone();
        terms.push(DeltaTerm { factors: DeltaFactors::Full { delta: &change }, scale: 1.0 });
        return merged_layer(&LayerDelta { weight: layer.weight, terms, base: layer.base, dora: None }, rows, cols);
    }
    if layer.terms.is_empty() || rows * cols == 0 {
        return Ok(base.clone());
    }
    let pair =
        |a: &Tensor, b: &Tensor| -> Result<(Vec<f64>, Vec<f64>, usize)> { Ok((widen(a)?, widen(b)?, b.shape()[0])) };
    let wide = layer
        .terms
        .iter()
        .map(|term| {
            Ok((
                term.scale as f64,
                match term.factors {
                    DeltaFactors::LowRank { up, down } => {
                        let (up, down, rank) = pair(up, down)?;
                        Wide::LowRank { up, down, rank }
                    }
                    DeltaFactors::Hadamard { a1, b1, a2, b2 } => {
                        Wide::Hadamard { pairs: [pair(a1, b1)?, pair(a2, b2)?] }
                    }
                    DeltaFactors::Kronecker { w1, w2, kernel } => {
                        let (_, b, c, d) = kron_dims(w1, w2);
                        Wide::Kronecker { w1: widen(w1)?, w2: widen(w2)?, b, c, d, kernel }
                    }
                    DeltaFactors::Full { delta } => Wide::Full(widen(delta)?),
                },
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let w = base.to_f32_vec()?;
    let mut out = vec![0f32; rows * cols];
    par_rows(&mut out, cols, |first, chunk| {
        let (mut sum, mut p1, mut p2) = (vec![0f64; cols], vec![0f64; cols], vec![0f64; cols]);
        for (k, out_row) in chunk.chunks_mut(cols).enumerate() {
            let o = first + k;
            sum.iter_mut().zip(&w[o * cols..][..cols]).for_each(|(s, &x)| *s = x as f64);
            for (scale, term) in &wide {
                match term {
                    Wide::LowRank { up, down, rank } => {
                        product_row(up, down, *rank, o, &mut p1);
                        sum.iter_mut().zip(&p1).for_each(|(s, &x)| *s += scale * x);
                    }
                    Wide::Hadamard { pairs: [(a1, b1, r1), (a2, b2, r2)] } => {
                        product_row(a1, b1, *r1, o, &mut p1);
                        product_row(a2, b2, *r2, o, &mut p2);
                        sum.iter_mut().zip(p1.iter().zip(&p2)).for_each(|(s, (&x, &y))| *s += scale * (x * y));
                    }
                    Wide::Kronecker { w1, w2, b, c, d, kernel } => {
                        let (i, kk, inner) = (o / c, o % c, cols / kernel);
                        for (n, s) in sum.iter_mut().enumerate() {
                            let (y, rem) = (n / inner, n % inner);
                            let (j, l) = (rem / d, rem % d);
                            *s += scale * (w1[i * b + j] * w2[(kk * d + l) * kernel + y]);
                        }
                    }
                    Wide::Full(delta) => {
                        sum.iter_mut().zip(&delta[o * cols..][..cols]).for_each(|(s, &x)| *s += scale * x);
                    }
                }
            }
            out_row.iter_mut().zip(&sum).for_each(|(y, &s)| *y = round_once(dtype, s));
        }
    });
    Tensor::from_f32(layer.weight.shape(), dtype, &out)
}

/// The twin of kernels/lora/dora.cu: blend · (f ⊙ W₁ − base) with f = m / (‖W₁‖ + eps) per group,
/// the sums of squares in f64, rounded once to W₁'s dtype.
fn dora_change_host(w1: &Tensor, base: &Tensor, d: &DoraTerm, rows: usize, cols: usize) -> Result<Tensor> {
    let (w1v, b) = (widen(w1)?, widen(base)?);
    let mut sums = vec![0f64; d.norm.groups(rows)];
    for (idx, x) in w1v.iter().enumerate() {
        sums[d.norm.group(idx, cols)] += x * x;
    }
    let m = widen(d.magnitude)?;
    let f: Vec<f64> = sums.iter().zip(&m).map(|(s, m)| m / (s.sqrt() + d.eps as f64)).collect();
    let change: Vec<f32> = w1v
        .iter()
        .zip(&b)
        .enumerate()
        .map(|(idx, (x, b))| round_once(w1.dtype(), d.blend as f64 * (f[d.norm.group(idx, cols)] * x - b)))
        .collect();
    Tensor::from_f32(w1.shape(), w1.dtype(), &change)
}

/// Row o of a [rows, rank] · b [rank, cols] into `out`, in f64 (the host merge's order).
fn product_row(a: &[f64], b: &[f64], rank: usize, o: usize, out: &mut [f64]) {
    let cols = out.len();
    out.fill(0.0);
    for r in 0..rank {
        let x = a[o * rank + r];
        out.iter_mut().zip(&b[r * cols..][..cols]).for_each(|(y, &v)| *y += x * v);
    }
}

/// An f64 rounded once to `dtype`, as an f32 holding that value exactly (models/lora/merge.rs
/// rounds the same way).
fn round_once(dtype: DType, v: f64) -> f32 {
    match dtype {
        DType::F16 => f16::from_f64(v).to_f32(),
        DType::BF16 => bf16::from_f64(v).to_f32(),
        DType::F32 => v as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::lora::merge::{Delta, Factor, LowRank};

    /// Small integers (every product and sum exact in f64 and f32), deterministic.
    fn ints(n: usize, seed: u64, span: i64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as i64 % (2 * span + 1) - span) as f32
            })
            .collect()
    }

    fn t(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        Tensor::from_f32(shape, dtype, &ints(shape.iter().product(), seed, 3)).unwrap()
    }

    /// Columns of a [rows, in, kernel] (PyTorch) matrix in KRSC order [rows, kernel, in].
    fn to_krsc(values: &[f64], rows: usize, inner: usize, kernel: usize) -> Vec<f64> {
        let mut out = vec![0.0; values.len()];
        for o in 0..rows {
            for i in 0..inner {
                for y in 0..kernel {
                    out[(o * kernel + y) * inner + i] = values[(o * inner + i) * kernel + y];
                }
            }
        }
        out
    }

    fn krsc_tensor(x: &Tensor, inner: usize, kernel: usize) -> Tensor {
        let v: Vec<f64> = widen(x).unwrap();
        let p = to_krsc(&v, x.shape()[0], inner, kernel);
        let f: Vec<f32> = p.iter().map(|&v| v as f32).collect();
        Tensor::from_f32(&[x.shape()[0], kernel * inner], x.dtype(), &f).unwrap()
    }

    /// One weight [out, in, kh, kw] (PyTorch) with one delta of each format: the twin on the KRSC
    /// layout against W + Σ s · Delta::values of the host merge, permuted to KRSC.
    fn twin_matches_host_merge(out: usize, inner: usize, (kh, kw): (usize, usize), dtype: DType) {
        let kernel = kh * kw;
        let cols = inner * kernel;
        let torch = [out, inner, kh, kw];
        let w = t(&[out, kh, kw, inner], 1, dtype);
        // LoRA / LoCon: down [r, in, kh, kw]
        let (up, down) = (t(&[out, 3], 2, dtype), t(&[3, inner, kh, kw], 3, dtype));
        // LoHa: b [r, in·kh·kw] in PyTorch column order
        let (a1, b1, a2, b2) =
            (t(&[out, 2], 4, dtype), t(&[2, cols], 5, dtype), t(&[out, 5], 6, dtype), t(&[5, cols], 7, dtype));
        // LoKr: out = a·c, in = b·d
        let (a, c) = (2, out / 2);
        let (b, d) = (inner / 2, 2);
        let (w1, w2) = (t(&[a, b], 8, dtype), t(&[c, d, kh, kw], 9, dtype));
        let full = t(&torch, 10, dtype);
        let scales = [0.5f32, -1.0, 0.25, 2.0];
        let host: [Delta; 4] = [
            Delta::LowRank(LowRank { up: up.clone(), down: down.clone(), mid: None }),
            Delta::Hadamard([(a1.clone(), b1.clone()), (a2.clone(), b2.clone())]),
            Delta::Kronecker(Factor::Full(w1.clone()), Factor::Full(w2.clone())),
            Delta::Full(full.clone()),
        ];
        let mut expected = widen(&w).unwrap();
        for (delta, s) in host.iter().zip(scales) {
            delta.check(&torch).unwrap();
            let v = to_krsc(&delta.values(&torch).unwrap(), out, inner, kernel);
            expected.iter_mut().zip(v).for_each(|(e, v)| *e += s as f64 * v);
        }
        let (down_k, b1_k, b2_k, full_k) = (
            krsc_tensor(&down, inner, kernel),
            krsc_tensor(&b1, inner, kernel),
            krsc_tensor(&b2, inner, kernel),
            krsc_tensor(&full, inner, kernel),
        );
        let w2_k = w2.reshape(&[c, d, kernel]).unwrap();
        let factors = [
            DeltaFactors::LowRank { up: &up, down: &down_k },
            DeltaFactors::Hadamard { a1: &a1, b1: &b1_k, a2: &a2, b2: &b2_k },
            DeltaFactors::Kronecker { w1: &w1, w2: &w2_k, kernel },
            DeltaFactors::Full { delta: &full_k },
        ];
        let terms = factors.iter().zip(scales).map(|(&factors, scale)| DeltaTerm { factors, scale }).collect();
        let merged = merged_host(&[LayerDelta { weight: &w, terms, base: None, dora: None }]).unwrap();
        let expected: Vec<f32> = expected.iter().map(|&v| round_once(dtype, v)).collect();
        assert_eq!(merged[0].shape(), w.shape());
        assert_eq!(merged[0].to_f32_vec().unwrap(), expected, "{out}x{inner} kernel {kh}x{kw} {dtype:?}");
    }

    #[test]
    fn twin_matches_the_host_merge_for_each_format_in_krsc_order() {
        twin_matches_host_merge(6, 4, (1, 1), DType::F32);
        twin_matches_host_merge(4, 2, (3, 3), DType::F32);
        twin_matches_host_merge(8, 6, (3, 3), DType::F16);
        twin_matches_host_merge(4, 4, (1, 3), DType::BF16);
    }

    #[test]
    fn terms_are_summed_before_the_one_rounding() {
        // 1 + 2 · (0.75 · 2^-11): each term alone is under half an f16 ulp of 1 (2^-11), both
        // together are over it, so the sum rounds up to 1 + 2^-10 only if it is rounded once.
        let one = Tensor::from_f32(&[1, 1], DType::F16, &[1.0]).unwrap();
        let term = DeltaTerm { factors: DeltaFactors::LowRank { up: &one, down: &one }, scale: 0.75 / 2048.0 };
        let merged =
            merged_host(&[LayerDelta { weight: &one, terms: vec![term, term], base: None, dora: None }]).unwrap();
        assert_eq!(merged[0].to_f32_vec().unwrap(), vec![1.0 + 1.0 / 1024.0]);
    }

    #[test]
    fn shape_dtype_and_place_errors_name_the_layer() {
        let w = t(&[8, 6], 1, DType::F16);
        let (up, down) = (t(&[8, 4], 2, DType::F16), t(&[4, 6], 3, DType::F16));
        let (bad_down, down_f32) = (t(&[4, 5], 4, DType::F16), t(&[4, 6], 5, DType::F32));
        let (w1, w2) = (t(&[2, 3], 6, DType::F16), t(&[4, 2, 1], 7, DType::F16));
        let term = |factors| DeltaTerm { factors, scale: 1.0 };
        let layers = [
            LayerDelta {
                weight: &w,
                terms: vec![term(DeltaFactors::LowRank { up: &up, down: &down })],
                base: None,
                dora: None,
            },
            LayerDelta {
                weight: &w,
                terms: vec![term(DeltaFactors::LowRank { up: &up, down: &bad_down })],
                base: None,
                dora: None,
            },
            LayerDelta {
                weight: &w,
                terms: vec![term(DeltaFactors::LowRank { up: &up, down: &down_f32 })],
                base: None,
                dora: None,
            },
            LayerDelta {
                weight: &w,
                terms: vec![term(DeltaFactors::Kronecker { w1: &w1, w2: &w2, kernel: 2 })],
                base: None,
                dora: None,
            },
        ];
        let Err(Error::Input(m)) = merged_host(&layers) else { panic!("bad layers accepted") };
        assert!(m.contains("3 of 4 layers"), "{m}");
        assert!(
            m.contains("layer 1 (weight Tensor([8, 6], F16, host)): term 0 (LowRank): up [8, 4] and down [4, 5]"),
            "{m}"
        );
        assert!(m.contains("layer 2") && m.contains("Tensor([4, 6], F32, host) is not F16"), "{m}");
        assert!(m.contains("layer 3") && m.contains("w1 [2, 3] ⊗ w2 [4, 2, 1] with kernel 2"), "{m}");
        assert!(!m.contains("layer 0"), "{m}");
        // The same LoKr with kernel 1 fits.
        let ok = LayerDelta {
            weight: &w,
            terms: vec![term(DeltaFactors::Kronecker { w1: &w1, w2: &w2, kernel: 1 })],
            base: None,
            dora: None,
        };
        merged_host(&[ok]).unwrap();
    }

    #[test]
    fn empty_lists_are_no_ops_and_host_weights_are_not_written_in_place() {
        merge_deltas(&Exec::Cpu, &[]).unwrap();
        assert!(merged_host(&[]).unwrap().is_empty());
        let w = t(&[2, 2], 1, DType::F16);
        let layer = LayerDelta { weight: &w, terms: vec![], base: None, dora: None };
        let Err(Error::Internal(m)) = merge_deltas(&Exec::Cpu, std::slice::from_ref(&layer)) else { panic!() };
        assert!(m.contains("merged_host"), "{m}");
        // A layer without terms comes back as it was.
        assert_eq!(merged_host(&[layer]).unwrap()[0].host_bytes().unwrap(), w.host_bytes().unwrap());
    }

    /// Values in [-span, span] in steps of span/1000, rounded to `dtype`.
    fn real(shape: &[usize], seed: u64, span: f32, dtype: DType) -> Tensor {
        let v: Vec<f32> = ints(shape.iter().product(), seed, 1000).iter().map(|x| x / 1000.0 * span).collect();
        Tensor::from_f32(shape, dtype, &v).unwrap()
    }

    /// One ulp of `dtype` at |x| (the spacing of the binade x lies in; subnormals' at the bottom).
    fn ulp(dtype: DType, x: f64) -> f64 {
        let (mantissa_bits, min_exp) = match dtype {
            DType::F16 => (10, -14),
            DType::BF16 => (7, -126),
            DType::F32 => (23, -126),
        };
        let e = if x == 0.0 { min_exp } else { (x.abs().log2().floor() as i32).max(min_exp) };
        2f64.powi(e - mantissa_bits)
    }

    #[test]
    fn dora_twin_is_within_three_ulps_of_the_host_merge_and_the_check_can_fail() {
        use crate::models::lora::merge::{Dora, DoraAxis};
        // A 3x3 convolution [out 12, in 10, 3, 3], held KRSC [12, 90]: the DoRA module's LoCon, and
        // a plain LoCon and a full delta beside it.
        let (out, inner, kernel) = (12, 10, 9);
        let torch = [out, inner, 3, 3];
        let eps = f32::EPSILON;
        let (s_dora, s_low, s_full, blend) = (0.625f32, -0.375f32, 0.5f32, 0.75f32);
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for axis in [DoraAxis::Output, DoraAxis::Input] {
                let w = real(&torch, 1, 0.5, dtype);
                let (up, down) = (real(&[out, 4], 2, 0.3, dtype), real(&[4, inner, 3, 3], 3, 0.3, dtype));
                let (up2, down2) = (real(&[out, 3], 4, 0.3, dtype), real(&[3, inner, 3, 3], 5, 0.3, dtype));
                let full = real(&torch, 6, 0.1, dtype);
                let groups = if axis == DoraAxis::Output { out } else { inner };
                let m: Vec<f32> = ints(groups, 7, 100).iter().map(|v| 2.5 + v / 100.0).collect();
                let magnitude = Tensor::from_f32(&[groups], DType::F32, &m).unwrap();
                // The host merge's maths (models/lora/merge.rs), in f64 and PyTorch layout.
                let dora = Dora { magnitude: magnitude.clone(), axis, eps: f64::from(eps), blend: f64::from(blend) };
                let low =
                    |u: &Tensor, d: &Tensor| LowRank { up: u.clone(), down: d.clone(), mid: None }.delta().unwrap();
                let (base, d1, d2, d3) =
                    (widen(&w).unwrap(), low(&up, &down), low(&up2, &down2), widen(&full).unwrap());
                let change = dora.change(&base, &d1, f64::from(s_dora), &torch).unwrap();
                let host: Vec<f64> = (0..base.len())
                    .map(|i| base[i] + f64::from(s_low) * d2[i] + f64::from(s_full) * d3[i] + change[i])
                    .collect();
                let w1: Vec<f64> = (0..base.len()).map(|i| base[i] + f64::from(s_dora) * d1[i]).collect();
                let [host, w1, base] = [host, w1, base].map(|v| to_krsc(&v, out, inner, kernel));
                // The twin on the KRSC layout.
                let k = |t: &Tensor| krsc_tensor(t, inner, kernel);
                let (wk, down_k, down2_k, full_k) = (k(&w), k(&down), k(&down2), k(&full));
                let norm = if axis == DoraAxis::Output { DoraNorm::Rows } else { DoraNorm::Inputs(inner) };
                let terms = vec![
                    DeltaTerm { factors: DeltaFactors::LowRank { up: &up2, down: &down2_k }, scale: s_low },
                    DeltaTerm { factors: DeltaFactors::Full { delta: &full_k }, scale: s_full },
                ];
                let term = DeltaTerm { factors: DeltaFactors::LowRank { up: &up, down: &down_k }, scale: s_dora };
                let dora = DoraTerm { term, magnitude: &magnitude, norm, eps, blend };
                let layer = LayerDelta { weight: &wk, terms, base: None, dora: Some(dora) };
                // The largest error in ulps of the largest of the merged value, W and W₁ there.
                let worst = |layer: LayerDelta| {
                    let got = merged_host(&[layer]).unwrap()[0].to_f32_vec().unwrap();
                    let err = |i: usize| {
                        let size = host[i].abs().max(w1[i].abs()).max(base[i].abs());
                        (f64::from(got[i]) - host[i]).abs() / ulp(dtype, size)
                    };
                    (0..got.len()).map(err).fold(0.0, f64::max)
                };
                let e = worst(layer.clone());
                assert!(e <= 3.0, "{dtype:?} {axis:?}: the twin is {e:.2} ulps from the host merge");
                // Without the rescale the same layer is far off: the check can fail.
                let e = worst(LayerDelta { dora: None, ..layer });
                assert!(e > 30.0, "{dtype:?} {axis:?}: without DoRA only {e:.2} ulps off");
            }
        }
    }

    #[test]
    fn dora_magnitudes_and_axes_that_do_not_fit_are_refused() {
        let w = t(&[6, 12], 1, DType::F16);
        let (up, down) = (t(&[6, 2], 2, DType::F16), t(&[2, 12], 3, DType::F16));
        let term = DeltaTerm { factors: DeltaFactors::LowRank { up: &up, down: &down }, scale: 1.0 };
        let m6 = Tensor::from_f32(&[6], DType::F32, &[1.0; 6]).unwrap();
        let m6_half = Tensor::from_f32(&[6], DType::F16, &[1.0; 6]).unwrap();
        let m5 = Tensor::from_f32(&[5], DType::F32, &[1.0; 5]).unwrap();
        let layer = |magnitude, norm, eps| LayerDelta {
            weight: &w,
            terms: vec![],
            base: None,
            dora: Some(DoraTerm { term, magnitude, norm, eps, blend: 1.0 }),
        };
        for (l, want) in [
            (layer(&m6, DoraNorm::Rows, 0.0), None),
            (layer(&m6, DoraNorm::Inputs(6), 0.0), None),
            (layer(&m6, DoraNorm::Inputs(5), 0.0), Some("5 input channels do not divide the weight's 12 columns")),
            (layer(&m5, DoraNorm::Rows, 0.0), Some("is not 6 f32 values")),
            (layer(&m6_half, DoraNorm::Rows, 0.0), Some("is not 6 f32 values")),
            (layer(&m6, DoraNorm::Rows, -1.0), Some("eps -1 must be finite and >= 0")),
        ] {
            match (merged_host(&[l]), want) {
                (Ok(_), None) => {}
                (Err(Error::Input(m)), Some(want)) => assert!(m.contains("layer 0") && m.contains(want), "{m}"),
                (r, want) => panic!("expected {want:?}, got {:?}", r.map(|_| ())),
            }
        }
    }
}
