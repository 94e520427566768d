//! A model's weights as the graph reads them: keyed by diffusers names, in the compute dtype,
//! convolution weights already KRSC, on the host (CPU twins) or on the device (CUDA ops). Each
//! entry records whether the graph looked it up, so a test can find a loaded tensor that no
//! forward reads (`unread`). Weights a forward multiplies as one matrix (an attention's q, k and
//! v projections) can be placed as the row blocks of one (`Fusion`), and such matrices of many
//! modules as the row blocks of one larger matrix (`Fusion::stack`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::gpu::{Arena, Gpu};
use crate::models::lora::LoraMerge;
use crate::models::lora::device::DeviceLoraSet;
use crate::models::transformer::Fp8Linears;
use crate::ops::Exec;
use crate::ops::conv::weight_oihw_to_ohwi;
use crate::ops::fp8::{Fp8Matrix, Fp8Scaling, probe, quantize, quantize_into};
use crate::ops::linear::LinearWeight;
use crate::tensor::{DType, HostBytes, Storage, Tensor};
use crate::weights::LoadedWeights;

/// Where prepared weights go.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// Host tensors in `DType` (for `Exec::Cpu`).
    Host(DType),
    /// Device tensors in `dtype`, allocated from `arena` (for `Exec::Cuda`); with `fp8_sources`,
    /// the weights that choice will run in FP8 from `fp8_sources.0` instead (`Place::for_weight`).
    Device { gpu: &'a Gpu, arena: &'a Arena, dtype: DType, fp8_sources: Option<(&'a Arena, Fp8Linears)> },
    /// `place` (Host or Device), with the LoRA deltas of `loras` merged into the weights they
    /// target, each rounded once to the place's dtype: on the host before the conversion
    /// (`LoraMerge::merged`) for Host, by the LoRA-delta kernels after the upload for Device
    /// (`lora::device`).
    Merged { place: &'a Place<'a>, loras: &'a LoraMerge },
}

/// `place`, with `loras` merged on the way when there are any.
pub fn with_loras<'a>(place: &'a Place<'a>, loras: Option<&'a LoraMerge>) -> Place<'a> {
    match loras {
        Some(loras) => Place::Merged { place, loras },
        None => *place,
    }
}

impl<'a> Place<'a> {
    /// Device tensors in `dtype` from `arena`.
    pub fn device(gpu: &'a Gpu, arena: &'a Arena, dtype: DType) -> Place<'a> {
        Place::Device { gpu, arena, dtype, fp8_sources: None }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Place::Host(d) => *d,
            Place::Device { dtype, .. } => *dtype,
            Place::Merged { place, .. } => place.dtype(),
        }
    }

    /// The destination and the deltas to merge on the way; one level of `Merged` only.
    fn split(self) -> Result<(Place<'a>, Option<&'a LoraMerge>)> {
        match self {
            Place::Merged { place: Place::Merged { .. }, .. } => {
                Err(Error::Internal("Place::Merged inside Place::Merged: merge the LoRAs into one LoraMerge".into()))
            }
            Place::Merged { place, loras } => Ok((*place, Some(loras))),
            other => Ok((other, None)),
        }
    }

    /// This place with every weight in its own arena (for models without FP8 linears).
    pub fn without_fp8_sources(self) -> Place<'a> {
        match self {
            Place::Device { gpu, arena, dtype, .. } => Place::device(gpu, arena, dtype),
            other => other,
        }
    }

    /// Where the weight `name` (a plain or fused name) of `shape` goes, and whether it went to the
    /// FP8 sources' arena: a weight that will get an FP8 twin (`enable_fp8` with that choice) goes
    /// there when the place has one, so that dropping it once quantized (`drop_fp8_sources`)
    /// returns its memory to that arena (the scratch arena, for activations).
    fn for_weight(self, name: &str, shape: &[usize]) -> (Place<'a>, bool) {
        match self {
            Place::Device { gpu, dtype, fp8_sources: Some((arena, which)), .. }
                if fp8_source(which, dtype, name, shape) =>
            {
                (Place::device(gpu, arena, dtype), true)
            }
            other => (other, false),
        }
    }
}

/// Whether the weight `name` of `shape` in `dtype` gets an FP8 twin with `which` and so goes to a
/// place's FP8 sources' arena (`Place::for_weight`, `fp8_source_plan`).
fn fp8_source(which: Fp8Linears, dtype: DType, name: &str, shape: &[usize]) -> bool {
    dtype != DType::F32 && fp8_shape(shape) && which.takes(name, shape)
}

/// What a model's 16-bit weights that get FP8 twins come to (`fp8_source_plan`): their bytes in
/// the compute dtype, their elements (a byte each as e4m3) and their rows (an f32 scale each at
/// most).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fp8SourcePlan {
    pub bytes: usize,
    pub elements: usize,
    pub rows: usize,
}

impl Fp8SourcePlan {
    fn add(&mut self, shape: &[usize], dtype: DType) {
        let elements: usize = shape.iter().product();
        self.bytes += elements * dtype.size();
        self.elements += elements;
        self.rows += shape.first().copied().unwrap_or(0);
    }

    /// At most the bytes the e4m3 twins take (a byte per element, an f32 scale per row).
    pub fn twin_bytes(&self) -> usize {
        self.elements + 4 * self.rows
    }
}

impl std::ops::Add for Fp8SourcePlan {
    type Output = Fp8SourcePlan;
    fn add(self, o: Fp8SourcePlan) -> Fp8SourcePlan {
        Fp8SourcePlan { bytes: self.bytes + o.bytes, elements: self.elements + o.elements, rows: self.rows + o.rows }
    }
}

/// The weights `ModelWeights::prepare_fused` with these `names` and `fusions` places in an FP8
/// sources' arena for `which` in `dtype` (plain weights and unstacked fused matrices, by the same
/// rule as `Place::for_weight`), from the checkpoint's shapes alone: what a load with one LoRA set
/// keeps out of the weights arena, and what gets e4m3 twins. Reads no tensor data.
pub fn fp8_source_plan(
    loaded: &LoadedWeights,
    names: &[(String, String)],
    fusions: &[Fusion],
    which: Fp8Linears,
    dtype: DType,
) -> Result<Fp8SourcePlan> {
    let mut plan = Fp8SourcePlan::default();
    if which == Fp8Linears::Off {
        return Ok(plan);
    }
    let keys: HashMap<&str, &str> = names.iter().map(|(n, k)| (n.as_str(), k.as_str())).collect();
    let mut parts = std::collections::HashSet::new();
    for (stack, members) in fusion_groups(loaded, &keys, fusions) {
        let mut shapes = Vec::new();
        for f in &members {
            for part in f.parts {
                let part = format!("{}.{part}.weight", f.module);
                let key = keys.get(part.as_str()).ok_or_else(|| {
                    Error::Internal(format!("planning the FP8 weights: '{part}' is not a weight of the model"))
                })?;
                shapes.push(loaded.get(key)?.shape().to_vec());
                parts.insert(part);
            }
        }
        if let (None, Some(&[_, cols])) = (stack, shapes.first().map(Vec::as_slice)) {
            let fused = [shapes.iter().map(|s| s[0]).sum(), cols];
            if fp8_source(which, dtype, &fused_name(&members[0].module, members[0].parts), &fused) {
                plan.add(&fused, dtype);
            }
        }
    }
    for (name, key) in names.iter().filter(|(n, _)| !parts.contains(n)) {
        let shape = loaded.get(key)?.shape();
        // Convolution weights are placed KRSC (`weight_oihw_to_ohwi`).
        let placed = match shape {
            &[o, i, h, w] => vec![o, h, w, i],
            other => other.to_vec(),
        };
        if fp8_source(which, dtype, name, &placed) {
            plan.add(&placed, dtype);
        }
    }
    Ok(plan)
}

/// `fusions` grouped as `prepare_fused` places them: each fusion of no stack alone, each stack's
/// fusions together, except a stack whose fusions differ in width (cross-attentions of several
/// context widths), whose fusions then stand alone and the model has no such stack.
fn fusion_groups<'f>(
    loaded: &LoadedWeights,
    keys: &HashMap<&str, &str>,
    fusions: &'f [Fusion],
) -> Vec<(Option<&'static str>, Vec<&'f Fusion>)> {
    let mut groups: Vec<(Option<&'static str>, Vec<&Fusion>)> = Vec::new();
    for f in fusions {
        match groups.iter_mut().find(|(stack, _)| f.stack.is_some() && *stack == f.stack) {
            Some((_, members)) => members.push(f),
            None => groups.push((f.stack, vec![f])),
        }
    }
    let width = |f: &Fusion| -> Option<usize> {
        let key = keys.get(format!("{}.{}.weight", f.module, f.parts.first()?).as_str())?;
        loaded.get(key).ok()?.shape().get(1).copied()
    };
    groups
        .into_iter()
        .flat_map(|(stack, members)| {
            let one_width = members.iter().all(|f| width(f) == width(members[0]));
            match stack {
                Some(_) if !one_width => members.into_iter().map(|f| (None, vec![f])).collect(),
                _ => vec![(stack, members)],
            }
        })
        .collect()
}

/// Whether the FP8 GEMM takes a weight of `shape` (in f16 or bf16): a matrix [N, K] (or a 1x1
/// convolution's [N, 1, 1, K], a Transformer2D's proj_in without linear projection), both
/// dimensions multiples of 16.
fn fp8_shape(shape: &[usize]) -> bool {
    matches!(shape, &[n, k] | &[n, 1, 1, k] if n % 16 == 0 && k % 16 == 0)
}

pub struct ModelWeights {
    tensors: HashMap<String, Entry>,
    /// The fused matrices by `fused_name`, with the names of their parts.
    fused: HashMap<String, (Tensor, Vec<String>)>,
    /// The stacked matrices by stack name (`Fusion::stack`).
    stacks: HashMap<&'static str, Stacked>,
    dtype: DType,
    /// Which prepared weights these are, and how often they were changed in place since:
    /// `WeightsState`.
    id: u64,
    version: AtomicU64,
    /// e4m3 twins of the linear weights the model runs in FP8, by weight or fused name
    /// (`enable_fp8`).
    fp8: HashMap<String, Fp8Twin>,
    /// Weights (plain or fused names) placed in the FP8 sources' arena (`Place::for_weight`),
    /// for `drop_fp8_sources`.
    fp8_sources: Vec<String>,
}

/// A weight's e4m3 twin and the weights' version it was quantized from: a LoRA merge or restore
/// in place makes it stale until `requantize_fp8`, and a forward refuses a stale twin.
struct Fp8Twin {
    matrix: Fp8Matrix,
    version: AtomicU64,
}

/// Ids of prepared weights, unique within the process.
static NEXT_WEIGHTS_ID: AtomicU64 = AtomicU64::new(1);

/// Which prepared weights, in which state: a value computed from weights (a text context's cached
/// k and v) holds while their state is the one it was computed from. A LoRA merge or restore in
/// place moves the state on (`ModelWeights::changed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightsState {
    id: u64,
    version: u64,
}

/// Fusions of several modules placed as the consecutive row blocks of one matrix as well
/// (`ModelWeights::stack`): each module's fused matrix is a row range of it on the device (a copy
/// on the host), in the order the fusions were given.
pub struct Stacked {
    pub matrix: Tensor,
    /// (module, first row, rows) of each fusion.
    pub blocks: Vec<(String, usize, usize)>,
    /// The names of the weights it holds.
    parts: Vec<String>,
}

/// Weights of one module that the graph multiplies as one matrix: `{module}.{part}.weight` for
/// each of `parts`, all [rows_i, cols] with one cols, stacked by rows in that order and read
/// through `Scope::rows` (an attention's q, k and v projections as one GEMM). Every part stays a
/// weight of its own under its name: on the device it is a row range of the matrix's memory, so a
/// LoRA merge or restore written through the name changes the matrix; on the host the matrix is a
/// copy of the parts beside them (host weights never change after `prepare`).
#[derive(Clone, Debug, PartialEq)]
pub struct Fusion {
    pub module: String,
    pub parts: &'static [&'static str],
    /// Fusions naming one stack are placed together as one matrix too (`Stacked`).
    pub stack: Option<&'static str>,
}

/// The name a fused matrix is kept under: its parts joined by '+' under their module, with the
/// parts' suffix (`…attn1.to_q+to_k+to_v.weight`). State-dict keys are module paths of Python
/// identifiers and indices, so no checkpoint key holds a '+'. Fused matrices are not checkpoint
/// tensors: `len`, `unread`, `tensor` and LoRA targets see only their parts.
fn fused_name(module: &str, parts: &[&str]) -> String {
    let joined = parts.join("+");
    if module.is_empty() { format!("{joined}.weight") } else { format!("{module}.{joined}.weight") }
}

/// A tensor, whether `Scope::get` has handed it out, and for a device tensor the host tensor it
/// was made from (before any LoRA merge and layout change: a view of the mapped file for
/// checkpoint tensors), so a LoRA switch can re-upload the base (`lora::Restore::Reload`).
struct Entry {
    tensor: Tensor,
    read: AtomicBool,
    source: Option<Tensor>,
}

impl Entry {
    fn new(tensor: Tensor, source: Option<Tensor>) -> Entry {
        let source = source.filter(|_| tensor.is_device());
        Entry { tensor, read: AtomicBool::new(false), source }
    }
}

impl ModelWeights {
    /// Takes the tensors named by `names` (diffusers name, checkpoint key) from `loaded`: 4-d
    /// tensors (PyTorch convolutions, OIHW) become KRSC once here rather than at every forward,
    /// then everything is converted to the place's dtype on the host or on its way to the device.
    /// With `Place::Merged`, LoRA deltas are added on the host first (in PyTorch layout, before
    /// the layout change), or on the device after the upload.
    pub fn prepare(loaded: &LoadedWeights, names: &[(String, String)], place: Place) -> Result<ModelWeights> {
        Self::prepare_fused(loaded, names, &[], place)
    }

    /// `prepare`, the parts of each of `fusions` placed as the row blocks of one matrix (`Fusion`).
    pub fn prepare_fused(
        loaded: &LoadedWeights,
        names: &[(String, String)],
        fusions: &[Fusion],
        place: Place,
    ) -> Result<ModelWeights> {
        let dtype = place.dtype();
        let (place, loras) = place.split()?;
        let keys: HashMap<&str, &str> = names.iter().map(|(n, k)| (n.as_str(), k.as_str())).collect();
        let mut tensors = HashMap::with_capacity(names.len());
        let mut fused = HashMap::with_capacity(fusions.len());
        let mut stacks = HashMap::new();
        let mut fp8_sources = Vec::new();
        for (stack, members) in fusion_groups(loaded, &keys, fusions) {
            let what = match stack {
                Some(stack) => format!("the stack '{stack}'"),
                None => format!("'{}'", fused_name(&members[0].module, members[0].parts)),
            };
            let (mut parts, mut host, mut sources) = (Vec::new(), Vec::new(), Vec::new());
            for f in &members {
                for part in f.parts {
                    let part = format!("{}.{part}.weight", f.module);
                    let key = keys.get(part.as_str()).filter(|_| !tensors.contains_key(&part)).ok_or_else(|| {
                        Error::Internal(format!(
                            "fusing '{part}' into {what}: not a weight of the model, or fused twice"
                        ))
                    })?;
                    let source = loaded.get(key)?;
                    host.push(merged(host_merge(place, loras, &part), &part, source, dtype)?);
                    sources.push(source.clone());
                    parts.push(part);
                }
            }
            // A fusion of no stack is a matrix of its own, which may get an FP8 twin.
            let at = match (stack, host.first().map(Tensor::shape)) {
                (None, Some(&[_, cols])) => {
                    let name = fused_name(&members[0].module, members[0].parts);
                    let rows = host.iter().map(|t| t.shape()[0]).sum();
                    let (at, routed) = place.for_weight(&name, &[rows, cols]);
                    fp8_sources.extend(routed.then_some(name));
                    at
                }
                _ => place,
            };
            let (matrix, placed) = place_rows(at, host, dtype, &what)?;
            let (mut first_part, mut first_row, mut blocks) = (0, 0, Vec::new());
            for f in &members {
                let member = first_part..first_part + f.parts.len();
                let rows: usize = placed[member.clone()].iter().map(|t| t.shape()[0]).sum();
                let block = if members.len() == 1 {
                    matrix.clone()
                } else {
                    row_block(&matrix, &placed[member.clone()], first_row)?
                };
                fused.insert(fused_name(&f.module, f.parts), (block, parts[member.clone()].to_vec()));
                blocks.push((f.module.clone(), first_row, rows));
                (first_part, first_row) = (member.end, first_row + rows);
            }
            if let Some(stack) = stack {
                stacks.insert(stack, Stacked { matrix, blocks, parts: parts.clone() });
            }
            for ((part, t), source) in parts.into_iter().zip(placed).zip(sources) {
                tensors.insert(part, Entry::new(t, Some(source)));
            }
        }
        let rest: Vec<&(String, String)> = names.iter().filter(|(n, _)| !tensors.contains_key(n)).collect();
        for (name, key) in rest {
            let source = loaded.get(key)?;
            let t = merged(host_merge(place, loras, name), name, source, dtype)?;
            let t = if t.shape().len() == 4 { weight_oihw_to_ohwi(&t)? } else { t };
            let (at, routed) = place.for_weight(name, t.shape());
            fp8_sources.extend(routed.then(|| name.clone()));
            tensors.insert(name.clone(), Entry::new(place_tensor(at, t, dtype, key)?, Some(source.clone())));
        }
        ModelWeights::new(tensors, fused, stacks, dtype, fp8_sources).merged_on_device(place, loras)
    }

    fn new(
        tensors: HashMap<String, Entry>,
        fused: HashMap<String, (Tensor, Vec<String>)>,
        stacks: HashMap<&'static str, Stacked>,
        dtype: DType,
        fp8_sources: Vec<String>,
    ) -> ModelWeights {
        let id = NEXT_WEIGHTS_ID.fetch_add(1, Ordering::Relaxed);
        let version = AtomicU64::new(0);
        ModelWeights { tensors, fused, stacks, dtype, id, version, fp8: HashMap::new(), fp8_sources }
    }

    /// Like `prepare`, for host tensors the caller has already put in the graph's form (a fused
    /// projection split into its parts, a matrix transposed): merged, converted or uploaded the
    /// same way.
    pub fn from_tensors(named: Vec<(String, Tensor)>, place: Place) -> Result<ModelWeights> {
        let dtype = place.dtype();
        let (place, loras) = place.split()?;
        let (mut tensors, mut fp8_sources) = (HashMap::with_capacity(named.len()), Vec::new());
        for (name, source) in named {
            let t = merged(host_merge(place, loras, &name), &name, &source, dtype)?;
            let (at, routed) = place.for_weight(&name, t.shape());
            let t = place_tensor(at, t, dtype, &name)?;
            fp8_sources.extend(routed.then(|| name.clone()));
            tensors.insert(name, Entry::new(t, Some(source)));
        }
        ModelWeights::new(tensors, HashMap::new(), HashMap::new(), dtype, fp8_sources).merged_on_device(place, loras)
    }

    /// Checks that every weight `loras` targets was prepared, and on the device merges them with
    /// the LoRA-delta kernels (the host merged them already elsewhere).
    fn merged_on_device(self, place: Place, loras: Option<&LoraMerge>) -> Result<ModelWeights> {
        let Some(loras) = loras else { return Ok(self) };
        if let Some(name) = loras.names().find(|n| !self.tensors.contains_key(*n)) {
            return Err(Error::Internal(format!("a LoRA delta targets '{name}', which this model does not have")));
        }
        if let Place::Device { gpu, dtype, .. } = place
            && on_device(dtype)
        {
            let set = DeviceLoraSet::upload(gpu, &self, loras, |name| loras.is_additive(name))?;
            let scratch = Arena::new("LoRA merge", MERGE_SCRATCH)?;
            set.merge_into(&Exec::Cuda { gpu, scratch: &scratch }, &self)?;
            gpu.synchronize()?; // before the factors and the scratch go
        }
        Ok(self)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Which weights these are and in which state (`WeightsState`).
    pub fn state(&self) -> WeightsState {
        WeightsState { id: self.id, version: self.version.load(Ordering::Acquire) }
    }

    /// Records that the weights are being changed in place (a LoRA merge or restore): values
    /// computed from them before no longer hold.
    pub fn changed(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Makes an e4m3 twin (`ops::fp8`, a scale per output channel, else per weight) of every matrix
    /// weight and fused matrix whose name and shape `select` accepts and that the FP8 GEMM takes
    /// (f16 / bf16, both dimensions multiples of 16); the linears reading them through
    /// `Scope::linear` run in FP8 from then on. The twins are memory of their own beside the
    /// weights (one byte per element), which stay as they are for LoRA merges; after one,
    /// `requantize_fp8`. Returns the twins' count.
    pub fn enable_fp8(&mut self, ex: &Exec, select: impl Fn(&str, &[usize]) -> bool) -> Result<usize> {
        self.enable_fp8_scaled(ex, None, select)
    }

    /// `enable_fp8` with the twins' scaling chosen (None: as `enable_fp8` chooses), e.g. a CPU
    /// twin's to match a device's.
    pub fn enable_fp8_scaled(
        &mut self,
        ex: &Exec,
        scaling: Option<Fp8Scaling>,
        select: impl Fn(&str, &[usize]) -> bool,
    ) -> Result<usize> {
        // Parts of a fused matrix are read through it (`Scope::rows`): its twin serves them.
        let parts: std::collections::HashSet<&String> = self.fused.values().flat_map(|(_, p)| p).collect();
        let plain = self.tensors.iter().filter(|(n, _)| !parts.contains(n)).map(|(n, e)| (n, &e.tensor));
        let chosen: Vec<(String, &Tensor)> = plain
            .chain(self.fused.iter().map(|(n, (t, _))| (n, t)))
            .filter(|(n, t)| !self.fp8.contains_key(*n) && fp8_shape(t.shape()) && select(n, t.shape()))
            .map(|(n, t)| (n.clone(), t))
            .collect();
        if !chosen.is_empty() && self.dtype == DType::F32 {
            return Err(Error::Input("FP8 linears quantize f16 or bf16 weights; these are f32".into()));
        }
        let mut chosen = chosen.into_iter();
        let Some((name, first)) = chosen.next() else { return Ok(0) };
        // The first twin probes the scaling; the others follow it.
        let first = self.probed_twin(ex, first, scaling.or(self.fp8_scaling()))?;
        let (scaling, fused) = (first.scaling(), first.fused_epilogue());
        let version = self.version.load(Ordering::Acquire);
        let twin = |matrix| Fp8Twin { matrix, version: AtomicU64::new(version) };
        let mut twins = vec![(name, twin(first))];
        for (name, t) in chosen {
            twins.push((name, twin(quantize(ex, t, true, scaling)?.with_fused_epilogue(fused))));
        }
        let count = twins.len();
        self.fp8.extend(twins);
        Ok(count)
    }

    /// The twin of `weight` with `scaling`, probed (`ops::fp8::probe`: one FP8 linear through it
    /// having run, and whether its bias and residual go in the GEMM's epilogue decided). Without
    /// a scaling: a scale per output channel (and per token) where this device's cuBLASLt runs
    /// such GEMMs, finer, and the LayerNorms and GEGLU before the linears then write their e4m3
    /// rows themselves; else one scale per weight (said on stderr). Neither running is an
    /// Unsupported error.
    fn probed_twin(&self, ex: &Exec, weight: &Tensor, scaling: Option<Fp8Scaling>) -> Result<Fp8Matrix> {
        let probed = |scaling| probe(ex, quantize(ex, weight, true, scaling)?, self.dtype);
        match scaling {
            Some(s) => probed(s),
            None => probed(Fp8Scaling::Rows).or_else(|rows| {
                let twin = probed(Fp8Scaling::Tensor)?;
                eprintln!("note: FP8 linears take one scale per weight and per activation here: {rows}");
                Ok(twin)
            }),
        }
    }

    /// Quantizes every FP8 twin again from its weight as it is now (after a LoRA merge or restore
    /// in place); queued on the stream. Nothing to do without twins.
    pub fn requantize_fp8(&self, ex: &Exec) -> Result<()> {
        let version = self.version.load(Ordering::Acquire);
        for (name, twin) in &self.fp8 {
            let weight = self.tensors.get(name).map(|e| &e.tensor).or_else(|| self.fused.get(name).map(|(t, _)| t));
            let weight = weight.ok_or_else(|| Error::Internal(format!("the FP8 twin '{name}' has no weight")))?;
            quantize_into(ex, weight, &twin.matrix)?;
            twin.version.store(version, Ordering::Release);
        }
        Ok(())
    }

    /// How the e4m3 twins are scaled; None without twins. All of a model's twins scale alike.
    pub fn fp8_scaling(&self) -> Option<Fp8Scaling> {
        self.fp8_layout().map(|(scaling, _)| scaling)
    }

    /// How the e4m3 twins are scaled and whether their linears add bias and residual in the GEMM's
    /// epilogue (`Fp8Matrix::fused_epilogue`); None without twins.
    pub fn fp8_layout(&self) -> Option<(Fp8Scaling, bool)> {
        self.fp8.values().next().map(|t| (t.matrix.scaling(), t.matrix.fused_epilogue()))
    }

    /// Bytes the e4m3 twins hold (a byte per element and their f32 scales).
    pub fn fp8_bytes(&self) -> usize {
        self.fp8.values().map(|t| t.matrix.bytes()).sum()
    }

    /// Bytes of the 16-bit weights that have FP8 twins (dropped ones included): what
    /// `fp8_source_plan` predicts for the model.
    pub fn fp8_twinned_bytes(&self) -> usize {
        self.fp8.keys().map(|n| self.weight_bytes(n)).sum()
    }

    /// Bytes of the 16-bit weights in the FP8 sources' arena that `drop_fp8_sources` would give back.
    pub fn fp8_source_bytes(&self) -> usize {
        self.fp8_sources.iter().map(|n| self.weight_bytes(n)).sum()
    }

    /// Bytes of the weight or fused matrix `name` as prepared (0 for neither).
    fn weight_bytes(&self, name: &str) -> usize {
        match self.fused.get(name) {
            Some((matrix, _)) => matrix.size_bytes(),
            None => self.tensors.get(name).map_or(0, |e| e.tensor.size_bytes()),
        }
    }

    /// Drops the 16-bit weights that were placed in the FP8 sources' arena (`Place::for_weight`)
    /// once their twins are current: for a run whose weights no longer change (one LoRA set,
    /// merged), which reads those linears through their twins only. Their ranges go back to that
    /// arena as soon as the queued work reading them is done (one stream); any later read of
    /// them (a forward's, a LoRA merge's, `requantize_fp8`'s) is an error naming the weight.
    /// Returns how many were dropped; an error, before any is dropped, where one has no current
    /// twin (the weight would be lost).
    pub fn drop_fp8_sources(&mut self) -> Result<usize> {
        for name in &self.fp8_sources {
            if !self.fp8_twin(name).is_ok_and(|twin| twin.is_some()) {
                return Err(Error::Internal(format!(
                    "dropping the 16-bit weight '{name}': it has no current FP8 twin (enable_fp8 with the choice \
                     it was placed for, and requantize_fp8 after a LoRA merge)"
                )));
            }
        }
        let given_back = |t: &Tensor, name: &str| -> Result<Tensor> {
            let Storage::Device(mem) = t.storage() else {
                return Err(Error::Internal(format!("dropping the 16-bit weight '{name}': it is not on the device")));
            };
            let why = format!(
                "the 16-bit weight '{name}' was read after it was dropped (the run keeps only its FP8 twin: one LoRA \
                 set, merged once)"
            );
            Tensor::from_storage(t.shape(), t.dtype(), Storage::Device(mem.given_back(&why)))
        };
        let names = std::mem::take(&mut self.fp8_sources);
        for name in &names {
            let parts = match self.fused.get_mut(name) {
                Some((matrix, parts)) => {
                    *matrix = given_back(matrix, name)?;
                    parts.clone()
                }
                None => vec![name.clone()],
            };
            for part in parts {
                let entry = self.tensors.get_mut(&part).ok_or_else(|| {
                    Error::Internal(format!("dropping the 16-bit weight '{name}': its part '{part}' is missing"))
                })?;
                entry.tensor = given_back(&entry.tensor, &part)?;
            }
        }
        Ok(names.len())
    }

    /// The twin of `name` for a forward: None without one; refused when stale.
    fn fp8_twin(&self, name: &str) -> Result<Option<&Fp8Matrix>> {
        let Some(twin) = self.fp8.get(name) else { return Ok(None) };
        if twin.version.load(Ordering::Acquire) != self.version.load(Ordering::Acquire) {
            return Err(Error::Internal(format!(
                "the FP8 twin of '{name}' was quantized before its weights changed in place (a LoRA merge or restore \
                 not followed by requantize_fp8)"
            )));
        }
        Ok(Some(&twin.matrix))
    }

    /// The stacked matrix `name` (`Fusion::stack`), its parts marked as read; None when the model
    /// has no fusion in that stack.
    pub fn stack(&self, name: &str) -> Option<&Stacked> {
        let stacked = self.stacks.get(name)?;
        for part in &stacked.parts {
            if let Some(entry) = self.tensors.get(part) {
                entry.read.store(true, Ordering::Relaxed);
            }
        }
        Some(stacked)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Names of the tensors no `Scope::get` has looked up yet, sorted: after a forward, a tensor
    /// that was loaded but that nothing reads.
    pub fn unread(&self) -> Vec<&str> {
        let mut names: Vec<&str> =
            self.tensors.iter().filter(|(_, e)| !e.read.load(Ordering::Relaxed)).map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// The weight `name` as the graph holds it (conv weights KRSC), without marking it read.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).map(|e| &e.tensor)
    }

    /// The host tensor a device weight was made from (PyTorch layout, before LoRAs), if kept.
    pub fn source(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).and_then(|e| e.source.as_ref())
    }

    /// The whole model, for `Scope::get` and `Scope::at`.
    pub fn root(&self) -> Scope<'_> {
        Scope { weights: self, prefix: String::new() }
    }
}

/// `t` with the LoRA deltas for `name` added (rounded once to `dtype`), or `t` as it is.
fn merged(loras: Option<&LoraMerge>, name: &str, t: &Tensor, dtype: DType) -> Result<Tensor> {
    match loras {
        Some(loras) => Ok(loras.merged(name, t, dtype)?.unwrap_or_else(|| t.clone())),
        None => Ok(t.clone()),
    }
}

/// A host tensor converted to `dtype` (Host) or uploaded in `dtype` (Device); `what` names it in
/// errors.
fn place_tensor(place: Place, t: Tensor, dtype: DType, what: &str) -> Result<Tensor> {
    match place {
        Place::Host(_) if t.dtype() == dtype => Ok(t),
        Place::Host(_) => Tensor::from_f32(t.shape(), dtype, &t.to_f32_vec()?),
        Place::Device { gpu, arena, .. } => gpu.upload(arena, &t, dtype).map_err(|e| match e {
            Error::Cuda(m) => Error::Cuda(format!("uploading '{what}': {m}")),
            other => other,
        }),
        Place::Merged { .. } => Err(Error::Internal("placing a tensor in Place::Merged: split it first".into())),
    }
}

/// Host matrices [rows_i, cols] of one cols placed as the row blocks of one [Σ rows_i, cols]
/// matrix in `dtype`: returns the matrix and the blocks, on the device as row ranges of the
/// matrix's memory, on the host converted each, the matrix a copy of them. `what` names the
/// matrix in errors.
fn place_rows(place: Place, parts: Vec<Tensor>, dtype: DType, what: &str) -> Result<(Tensor, Vec<Tensor>)> {
    let cols = match parts.first().map(Tensor::shape) {
        Some(&[_, cols]) if parts.iter().all(|t| matches!(t.shape(), &[_, c] if c == cols)) => cols,
        _ => {
            let shapes: Vec<&[usize]> = parts.iter().map(Tensor::shape).collect();
            return Err(Error::Internal(format!(
                "fusing '{what}': parts of shapes {shapes:?} are not one matrix width"
            )));
        }
    };
    let rows: usize = parts.iter().map(|t| t.shape()[0]).sum();
    match place {
        Place::Host(_) => {
            let placed = parts.into_iter().map(|t| place_tensor(place, t, dtype, what)).collect::<Result<Vec<_>>>()?;
            let mut bytes = Vec::with_capacity(rows * cols * dtype.size());
            for t in &placed {
                bytes.extend_from_slice(t.host_bytes()?);
            }
            let matrix = Tensor::from_storage(&[rows, cols], dtype, Storage::Host(HostBytes::Owned(Arc::new(bytes))))?;
            Ok((matrix, placed))
        }
        Place::Device { gpu, arena, .. } => {
            let uploading = |e: Error| match e {
                Error::Cuda(m) => Error::Cuda(format!("uploading '{what}': {m}")),
                other => other,
            };
            let mem = arena.alloc(rows * cols * dtype.size()).map_err(uploading)?;
            let (mut placed, mut offset) = (Vec::with_capacity(parts.len()), 0);
            for t in &parts {
                let part = mem.range(offset, t.numel() * dtype.size())?;
                gpu.upload_into(&part, t, dtype).map_err(uploading)?;
                offset += part.bytes();
                placed.push(Tensor::from_storage(t.shape(), dtype, Storage::Device(part))?);
            }
            Ok((Tensor::from_storage(&[rows, cols], dtype, Storage::Device(mem))?, placed))
        }
        Place::Merged { .. } => Err(Error::Internal("placing a tensor in Place::Merged: split it first".into())),
    }
}

/// Rows `first..` of `matrix` that hold the placed `parts`: on the device a range of the matrix's
/// memory, on the host a copy of the parts (host weights never change after `prepare`).
fn row_block(matrix: &Tensor, parts: &[Tensor], first: usize) -> Result<Tensor> {
    let (rows, cols) = (parts.iter().map(|t| t.shape()[0]).sum::<usize>(), matrix.shape()[1]);
    let dtype = matrix.dtype();
    let storage = match matrix.storage() {
        Storage::Device(mem) => Storage::Device(mem.range(first * cols * dtype.size(), rows * cols * dtype.size())?),
        Storage::Host(_) => {
            let mut bytes = Vec::with_capacity(rows * cols * dtype.size());
            for t in parts {
                bytes.extend_from_slice(t.host_bytes()?);
            }
            Storage::Host(HostBytes::Owned(Arc::new(bytes)))
        }
    };
    Tensor::from_storage(&[rows, cols], dtype, storage)
}

/// The deltas to merge on the host for the weight `name`: all of them for host weights; for
/// device weights only where the kernels cannot (DoRA, which depends on the merged weight's norm,
/// and f32 weights, which the tensor-core kernels do not take). The kernels merge the rest after
/// the upload.
fn host_merge<'a>(place: Place, loras: Option<&'a LoraMerge>, name: &str) -> Option<&'a LoraMerge> {
    match (place, loras) {
        (Place::Device { dtype, .. }, Some(l)) if on_device(dtype) && l.is_additive(name) => None,
        _ => loras,
    }
}

/// Whether device weights of `dtype` take the LoRA-delta kernels (f16 and bf16).
fn on_device(dtype: DType) -> bool {
    dtype != DType::F32
}

/// Scratch for one device merge's launch tables (a few hundred bytes per targeted weight).
const MERGE_SCRATCH: usize = 64 << 20;

/// The weights under one module prefix (`down_blocks.1.attentions.0`), so block code names its
/// tensors as diffusers' module does.
pub struct Scope<'a> {
    weights: &'a ModelWeights,
    prefix: String,
}

impl<'a> Scope<'a> {
    /// The module's path (`down_blocks.1.attentions.0`; empty at the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The sub-module `name` (`resnets.0`).
    pub fn at(&self, name: &str) -> Scope<'a> {
        Scope { weights: self.weights, prefix: self.full_name(name) }
    }

    /// `name` under this module's path.
    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    /// The tensor `name` (`conv1.weight`) of this module, marked as read.
    pub fn get(&self, name: &str) -> Result<&'a Tensor> {
        let full = self.full_name(name);
        // Loading checked every name the graph's specs list, so a miss is the engine's own
        // mismatch between its specs and its forward, not the user's file.
        let entry = self.weights.tensors.get(&full).ok_or_else(|| {
            Error::Internal(format!("the forward reads the weight '{full}', which the loader did not load"))
        })?;
        entry.read.store(true, Ordering::Relaxed);
        Ok(&entry.tensor)
    }

    /// The weights `{part}.weight` of this module as one matrix, their rows stacked in the order
    /// of `parts` (prepared as a `Fusion`), each part marked as read.
    pub fn rows(&self, parts: &[&str]) -> Result<&'a Tensor> {
        let full = fused_name(&self.prefix, parts);
        let (matrix, names) = self.weights.fused.get(&full).ok_or_else(|| {
            Error::Internal(format!("the forward reads the fused weight '{full}', which the loader did not make"))
        })?;
        for name in names {
            if let Some(entry) = self.weights.tensors.get(name) {
                entry.read.store(true, Ordering::Relaxed);
            }
        }
        Ok(matrix)
    }

    /// The weight `name` of a linear (`get`) with its FP8 twin when the model has one.
    pub fn linear(&self, name: &str) -> Result<LinearWeight<'a>> {
        let matrix = self.get(name)?;
        Ok(LinearWeight { matrix, fp8: self.weights.fp8_twin(&self.full_name(name))? })
    }

    /// The fused weight of `parts` (`rows`) with its FP8 twin when the model has one.
    pub fn linear_rows(&self, parts: &[&str]) -> Result<LinearWeight<'a>> {
        let matrix = self.rows(parts)?;
        Ok(LinearWeight { matrix, fp8: self.weights.fp8_twin(&fused_name(&self.prefix, parts))? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{load, save};

    const KV: [&str; 2] = ["to_k", "to_v"];

    /// Modules a and b, each a to_k and a to_v of 2 (a) or 3 (b) rows and the widths given,
    /// prepared on the host with both fusions in the stack "s"; and the values of the four
    /// weights in order (a.to_k, a.to_v, b.to_k, b.to_v).
    fn prepared(tag: &str, widths: [usize; 2]) -> (ModelWeights, Vec<f32>) {
        let dir = std::env::temp_dir().join(format!("celframe-stack-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut named = Vec::new();
        for (module, rows, width) in [("a", 2, widths[0]), ("b", 3, widths[1])] {
            for part in KV {
                let values: Vec<f32> = (0..rows * width).map(|i| (named.len() * 100 + i) as f32).collect();
                named.push((
                    format!("{module}.{part}.weight"),
                    Tensor::from_f32(&[rows, width], DType::F32, &values).unwrap(),
                ));
            }
        }
        let path = dir.join("w.safetensors");
        save(&path, &named.iter().map(|(n, t)| (n.clone(), t)).collect::<Vec<_>>(), None).unwrap();
        let loaded = load(&[&path]).unwrap();
        let names: Vec<(String, String)> = named.iter().map(|(n, _)| (n.clone(), n.clone())).collect();
        let fusions: Vec<Fusion> =
            ["a", "b"].map(|m| Fusion { module: m.into(), parts: &KV, stack: Some("s") }).into_iter().collect();
        let w = ModelWeights::prepare_fused(&loaded, &names, &fusions, Place::Host(DType::F32)).unwrap();
        let values = named.iter().flat_map(|(_, t)| t.to_f32_vec().unwrap()).collect();
        std::fs::remove_dir_all(&dir).unwrap();
        (w, values)
    }

    #[test]
    fn a_stack_holds_its_fusions_as_row_blocks_and_fusions_of_other_widths_stay_apart() {
        let (w, values) = prepared("one-width", [4, 4]);
        let s = w.stack("s").unwrap();
        assert_eq!((s.matrix.shape(), s.blocks.clone()), (&[10, 4][..], vec![("a".into(), 0, 4), ("b".into(), 4, 6)]));
        assert_eq!(s.matrix.to_f32_vec().unwrap(), values);
        assert!(w.unread().is_empty(), "the stack's parts are read through it: {:?}", w.unread());
        // each module's fused matrix is its row block
        let a = w.root().at("a").rows(&KV).unwrap().to_f32_vec().unwrap();
        let b = w.root().at("b").rows(&KV).unwrap().to_f32_vec().unwrap();
        assert_eq!([a, b].concat(), values);

        let (w, values) = prepared("two-widths", [4, 6]);
        assert!(w.stack("s").is_none());
        let a = w.root().at("a").rows(&KV).unwrap().to_f32_vec().unwrap();
        let b = w.root().at("b").rows(&KV).unwrap().to_f32_vec().unwrap();
        assert_eq!([a, b].concat(), values);
    }
}
