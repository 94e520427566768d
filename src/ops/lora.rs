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
//! Host: `merged_host` is the twin. Host tensors are immutable (shared or memory-mapped bytes), so
//! it returns each layer's merged weight rather than writing in place.

use std::collections::BTreeMap;
use std::ffi::c_void;

use half::{bf16, f16};

use super::{Exec, GRID_X, grid_dim, kernel_i32, par_rows};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::memory::Arena;
use crate::gpu::params::{
    LORA_SHARED_BYTES, LORA_THREADS, LORA_TILE_M, LORA_TILE_N, LoraLayer, LoraMergeParams, LoraTerm, LoraTermKind,
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

#[derive(Clone, Debug)]
pub struct LayerDelta<'t> {
    pub weight: &'t Tensor,
    pub terms: Vec<DeltaTerm<'t>>,
    /// Where the base values are read from: None for `weight` itself (a merge in place), or a copy
    /// of the weight's base values (same shape and dtype), so a LoRA switch restores and merges in
    /// one pass.
    pub base: Option<&'t Tensor>,
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
    for (t, term) in layer.terms.iter().enumerate() {
        let why = |msg: String| format!("term {t} ({}): {msg}", term.factors.name());
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
    Ok((rows, cols))
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

/// W = base + Σ scale·ΔW for every layer (base: W itself unless the layer names a copy), written
/// in place (device weights keep their addresses). The weights
/// must be distinct; an empty list is a no-op. Host weights: see `merged_host`.
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
    let work: Vec<usize> =
        (0..layers.len()).filter(|&i| !layers[i].terms.is_empty() && dims[i].0 * dims[i].1 > 0).collect();
    check_distinct(layers, &work)?;
    if !work.is_empty() && gpu.info().max_shared_per_block < LORA_SHARED_BYTES as usize {
        return Err(Error::Unsupported(format!(
            "{OP} needs {LORA_SHARED_BYTES} bytes of shared memory per block; {} offers {}",
            gpu.info().name,
            gpu.info().max_shared_per_block
        )));
    }
    // One launch per kernel: dtype, and whether LoHa terms need the kernel that keeps a product.
    let mut launches: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
    for &i in &work {
        let hadamard = layers[i].terms.iter().any(|t| matches!(t.factors, DeltaFactors::Hadamard { .. }));
        let kernel = match (layers[i].weight.dtype(), hadamard) {
            (DType::F16, false) => "lora_merge_f16",
            (DType::BF16, false) => "lora_merge_bf16",
            (DType::F16, true) => "lora_merge_hadamard_f16",
            (DType::BF16, true) => "lora_merge_hadamard_bf16",
            (DType::F32, _) => {
                return Err(Error::Unsupported(format!(
                    "{OP}: layer {i} is f32; the GPU merge takes f16 or bf16 weights (its products run on tensor \
                     cores), merged_host merges f32 ones"
                )));
            }
        };
        launches.entry(kernel).or_default().push(i);
    }
    for (kernel, members) in launches {
        launch(gpu, scratch, kernel, members.iter().map(|&i| (&layers[i], dims[i])))?;
    }
    Ok(())
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

/// The twin: each layer's weight (host tensors) plus Σ scale·ΔW, summed in f64 and rounded once to
/// the weight's dtype, as new tensors in the list's order (f16, bf16 or f32 weights).
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
        let merged = merged_host(&[LayerDelta { weight: &w, terms, base: None }]).unwrap();
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
        let merged = merged_host(&[LayerDelta { weight: &one, terms: vec![term, term], base: None }]).unwrap();
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
            LayerDelta { weight: &w, terms: vec![term(DeltaFactors::LowRank { up: &up, down: &down })], base: None },
            LayerDelta {
                weight: &w,
                terms: vec![term(DeltaFactors::LowRank { up: &up, down: &bad_down })],
                base: None,
            },
            LayerDelta {
                weight: &w,
                terms: vec![term(DeltaFactors::LowRank { up: &up, down: &down_f32 })],
                base: None,
            },
            LayerDelta {
                weight: &w,
                terms: vec![term(DeltaFactors::Kronecker { w1: &w1, w2: &w2, kernel: 2 })],
                base: None,
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
        };
        merged_host(&[ok]).unwrap();
    }

    #[test]
    fn empty_lists_are_no_ops_and_host_weights_are_not_written_in_place() {
        merge_deltas(&Exec::Cpu, &[]).unwrap();
        assert!(merged_host(&[]).unwrap().is_empty());
        let w = t(&[2, 2], 1, DType::F16);
        let layer = LayerDelta { weight: &w, terms: vec![], base: None };
        let Err(Error::Internal(m)) = merge_deltas(&Exec::Cpu, std::slice::from_ref(&layer)) else { panic!() };
        assert!(m.contains("merged_host"), "{m}");
        // A layer without terms comes back as it was.
        assert_eq!(merged_host(&[layer]).unwrap()[0].host_bytes().unwrap(), w.host_bytes().unwrap());
    }
}
