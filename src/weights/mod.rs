//! Model weights: safetensors checkpoints (one file, several shards, or a
//! `*.safetensors.index.json`) memory-mapped without a copy, checked against the tensors a model
//! expects, and uploaded to the device in the compute dtype.
//!
//! Everything wrong with a checkpoint's contents (missing, unexpected, misshapen, duplicated or
//! non-float tensors) is gathered into one `Error::Input` that lists it all, so a user fixes a
//! conversion in one round rather than one name at a time.

mod file;
mod index;
mod report;
mod save;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::{Arena, Gpu};
use crate::tensor::{DType, Tensor};

pub use file::{MAX_HEADER_BYTES, MAX_TENSORS};
pub use report::{LoadReport, UploadReport};
pub use save::{check_save_path, save};

/// A tensor a model expects, by its name in the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), shape: shape.to_vec() }
    }
}

/// One safetensors file read whole, whatever its tensors' dtypes: a reference file's inputs and
/// outputs, with its `__metadata__`. Values come out as float tensors or as integers, converted
/// only where that is exact.
pub struct TensorFile {
    path: PathBuf,
    what: String,
    tensors: BTreeMap<String, file::FileTensor>,
    metadata: BTreeMap<String, String>,
}

/// Reads `path` (`what` says what the file is for in errors: "reference file").
pub fn open(path: &Path, what: &str) -> Result<TensorFile> {
    let contents = file::read(path, what)?;
    let tensors = contents.tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    Ok(TensorFile { path: path.to_path_buf(), what: what.to_string(), tensors, metadata: contents.metadata })
}

/// Integers up to this magnitude are exact in f32 (a 24-bit significand).
const F32_EXACT: i128 = 1 << 24;
/// Whole numbers up to this magnitude are exact in f64 (a 53-bit significand).
const F64_EXACT: f64 = (1u64 << 53) as f64;

impl TensorFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The header's `__metadata__` (empty when it has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.tensor(name)?.shape)
    }

    /// A float tensor: F16, BF16 and F32 as stored (a view of the file); F64 rounded to F32; an
    /// integer tensor converted to F32 when every value is exact there (|v| <= 2^24).
    pub fn float(&self, name: &str) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if let Some(tensor) = &t.tensor {
            return Ok(tensor.clone());
        }
        let values: Vec<f32> = if t.dtype == Dtype::F64 {
            f64_values(t.bytes.as_slice()).map(|v| v as f32).collect()
        } else if let Some(ints) = integer_values(t.dtype, t.bytes.as_slice()) {
            let mut values = Vec::with_capacity(ints.len());
            for (i, v) in ints.into_iter().enumerate() {
                if v.abs() > F32_EXACT {
                    return Err(self.bad(format!(
                        "tensor '{name}' ({}) holds {v} at index {i}, beyond the integers float32 holds exactly \
                         (|v| <= 2^24)",
                        t.dtype
                    )));
                }
                values.push(v as f32);
            }
            values
        } else {
            return Err(self.bad(format!(
                "tensor '{name}' is {}; expected a float (F16, BF16, F32, F64) or integer tensor",
                t.dtype
            )));
        };
        Tensor::from_f32(&t.shape, DType::F32, &values).map_err(|e| self.bad(format!("tensor '{name}': {e}")))
    }

    /// Every value of an integer tensor (I8 to I64, U8 to U64), or of a float tensor holding only
    /// whole numbers that the float represents exactly; row-major.
    pub fn integers(&self, name: &str) -> Result<Vec<i64>> {
        let t = self.tensor(name)?;
        let not_integer = |i: usize, v: String| {
            self.bad(format!(
                "tensor '{name}' ({}) holds {v} at index {i}, not an integer that fits in 64 bits",
                t.dtype
            ))
        };
        if let Some(ints) = integer_values(t.dtype, t.bytes.as_slice()) {
            return ints
                .into_iter()
                .enumerate()
                .map(|(i, v)| i64::try_from(v).map_err(|_| not_integer(i, v.to_string())))
                .collect();
        }
        let floats: Vec<f64> = match (&t.tensor, t.dtype) {
            (Some(tensor), _) => tensor.to_f32_vec()?.into_iter().map(f64::from).collect(),
            (None, Dtype::F64) => f64_values(t.bytes.as_slice()).collect(),
            _ => {
                return Err(self.bad(format!(
                    "tensor '{name}' is {}; expected an integer tensor (I8 to I64, U8 to U64) or a float one \
                     holding whole numbers",
                    t.dtype
                )));
            }
        };
        floats
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                if v.fract() == 0.0 && v.abs() <= F64_EXACT { Ok(v as i64) } else { Err(not_integer(i, v.to_string())) }
            })
            .collect()
    }

    /// A flag tensor's values: BOOL (what PyTorch saves for `torch.tensor(True)`), or integers or
    /// whole floats that are 0 or 1; row-major.
    pub fn flags(&self, name: &str) -> Result<Vec<bool>> {
        let t = self.tensor(name)?;
        if t.dtype == Dtype::BOOL {
            return Ok(t.bytes.as_slice().iter().map(|&b| b != 0).collect());
        }
        let flag = |(i, v): (usize, i64)| match v {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.bad(format!("tensor '{name}' holds {v} at index {i}; a flag is 0 or 1 (false or true)"))),
        };
        self.integers(name)?.into_iter().enumerate().map(flag).collect()
    }

    fn tensor(&self, name: &str) -> Result<&file::FileTensor> {
        self.tensors.get(name).ok_or_else(|| self.bad(format!("no tensor '{name}'")))
    }

    fn bad(&self, why: String) -> Error {
        Error::Input(format!("{} ({}): {why}", self.path.display(), self.what))
    }
}

/// Every value of an integer tensor's little-endian bytes, widened exactly; None for a dtype that
/// is not an integer one.
fn integer_values(dtype: Dtype, bytes: &[u8]) -> Option<Vec<i128>> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> i128) -> Vec<i128> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact gives N bytes"))).collect()
    }
    Some(match dtype {
        Dtype::I8 => each(bytes, |b: [u8; 1]| i8::from_le_bytes(b).into()),
        Dtype::U8 => each(bytes, |b: [u8; 1]| u8::from_le_bytes(b).into()),
        Dtype::I16 => each(bytes, |b: [u8; 2]| i16::from_le_bytes(b).into()),
        Dtype::U16 => each(bytes, |b: [u8; 2]| u16::from_le_bytes(b).into()),
        Dtype::I32 => each(bytes, |b: [u8; 4]| i32::from_le_bytes(b).into()),
        Dtype::U32 => each(bytes, |b: [u8; 4]| u32::from_le_bytes(b).into()),
        Dtype::I64 => each(bytes, |b: [u8; 8]| i64::from_le_bytes(b).into()),
        Dtype::U64 => each(bytes, |b: [u8; 8]| u64::from_le_bytes(b).into()),
        _ => return None,
    })
}

fn f64_values(bytes: &[u8]) -> impl Iterator<Item = f64> + '_ {
    bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("chunks_exact gives 8 bytes")))
}

/// Host tensors, keyed by the checkpoint's own names, viewing memory-mapped files.
pub struct LoadedWeights {
    tensors: BTreeMap<String, Tensor>,
    files: Vec<PathBuf>,
    report: LoadReport,
}

/// Device tensors, keyed by the checkpoint's own names.
pub struct DeviceWeights {
    tensors: BTreeMap<String, Tensor>,
    report: UploadReport,
}

/// Loads every tensor of `paths` (safetensors files, or index JSONs standing for the files they
/// name). Fails on duplicate names and on tensors whose dtype is not F16, BF16 or F32.
pub fn load<P: AsRef<Path>>(paths: &[P]) -> Result<LoadedWeights> {
    load_checked(paths, None, &|_| false)
}

/// Like `load`, and the checkpoint must hold exactly the `expected` tensors with their shapes.
/// Tensors whose name starts with one of `ignore_prefixes` are skipped whatever their dtype (an
/// EMA copy, a text encoder's integer position ids); they are not loaded.
pub fn load_strict<P: AsRef<Path>>(
    paths: &[P],
    expected: &[TensorSpec],
    ignore_prefixes: &[&str],
) -> Result<LoadedWeights> {
    load_checked(paths, Some(expected), &|name| ignore_prefixes.iter().any(|p| name.starts_with(p)))
}

/// Like `load` (`expected` None) or `load_strict`, skipping the tensors for which `skip` is true:
/// a single-file checkpoint's UNet is what sits under one prefix, whatever else the file holds.
pub fn load_filtered<P: AsRef<Path>>(
    paths: &[P],
    expected: Option<&[TensorSpec]>,
    skip: &dyn Fn(&str) -> bool,
) -> Result<LoadedWeights> {
    load_checked(paths, expected, skip)
}

fn load_checked<P: AsRef<Path>>(
    paths: &[P],
    expected: Option<&[TensorSpec]>,
    skip: &dyn Fn(&str) -> bool,
) -> Result<LoadedWeights> {
    let started = Instant::now();
    let mut files = Vec::new();
    for path in paths {
        let path = path.as_ref();
        if index::is_index(path) {
            files.extend(index::files(path)?);
        } else {
            files.push(path.to_path_buf());
        }
    }
    if files.is_empty() {
        return Err(Error::Input("no weights file given".into()));
    }

    let mut problems = Problems::default();
    let mut found = BTreeMap::new();
    // Which file each name came from, to name both files of a duplicate.
    let mut origin: HashMap<String, usize> = HashMap::new();
    for (i, path) in files.iter().enumerate() {
        for t in file::read(path, "weights file")?.tensors {
            if let Some(&first) = origin.get(&t.name) {
                problems.add(
                    Problem::Duplicate,
                    format!("{} (in {} and {})", t.name, files[first].display(), path.display()),
                );
                continue;
            }
            origin.insert(t.name.clone(), i);
            if !skip(&t.name) {
                found.insert(t.name.clone(), t);
            }
        }
    }

    if let Some(expected) = expected {
        for spec in expected {
            match found.get(&spec.name) {
                None => problems.add(Problem::Missing, format!("{}, expected shape {:?}", spec.name, spec.shape)),
                Some(t) if t.shape != spec.shape => problems
                    .add(Problem::WrongShape, format!("{}: expected {:?}, found {:?}", spec.name, spec.shape, t.shape)),
                Some(_) => {}
            }
        }
    }
    let expected_names: Option<HashSet<&str>> = expected.map(|e| e.iter().map(|s| s.name.as_str()).collect());
    for t in found.values() {
        if expected_names.as_ref().is_some_and(|e| !e.contains(t.name.as_str())) {
            problems.add(Problem::Unexpected, format!("{}, {} {:?}", t.name, t.dtype, t.shape));
        } else if t.tensor.is_none() {
            problems.add(Problem::Unsupported, format!("{} is {} (only F16, BF16 and F32 load)", t.name, t.dtype));
        }
    }
    problems.into_result(&files)?;

    // With no problems left, every remaining tensor has a supported dtype.
    let tensors: BTreeMap<String, Tensor> =
        found.into_iter().filter_map(|(name, t)| t.tensor.map(|t| (name, t))).collect();
    let report = LoadReport {
        tensors: tensors.len(),
        bytes: tensors.values().map(|t| t.size_bytes() as u64).sum(),
        files: files.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(LoadedWeights { tensors, files, report })
}

/// Kinds of problem, in the order the error lists them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    Duplicate,
    Unsupported,
    Missing,
    Unexpected,
    WrongShape,
}

impl Problem {
    fn label(self) -> &'static str {
        match self {
            Problem::Duplicate => "duplicate name",
            Problem::Unsupported => "unsupported dtype",
            Problem::Missing => "missing",
            Problem::Unexpected => "unexpected",
            Problem::WrongShape => "wrong shape",
        }
    }
}

#[derive(Default)]
struct Problems(Vec<(Problem, String)>);

impl Problems {
    fn add(&mut self, kind: Problem, detail: String) {
        self.0.push((kind, detail));
    }

    /// One error listing every problem: counts by kind first, then one line each, at most
    /// `LISTED_PER_KIND` of a kind (a config of absurd depth expects millions of tensors).
    fn into_result(mut self, files: &[PathBuf]) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        self.0.sort_by_key(|(kind, _)| *kind);
        let groups: Vec<&[(Problem, String)]> = self.0.chunk_by(|a, b| a.0 == b.0).collect();
        let summary: Vec<String> = groups.iter().map(|g| format!("{}: {}", g[0].0.label(), g.len())).collect();
        let mut message = format!("cannot use the weights in {} ({}):", list(files), summary.join(", "));
        for group in groups {
            let label = group[0].0.label();
            for (_, detail) in group.iter().take(LISTED_PER_KIND) {
                message.push_str(&format!("\n  {label}: {detail}"));
            }
            if group.len() > LISTED_PER_KIND {
                message.push_str(&format!("\n  ... and {} more {label}", group.len() - LISTED_PER_KIND));
            }
        }
        Err(Error::Input(message))
    }
}

/// Problems of one kind listed by name in the error; the rest are counted.
pub const LISTED_PER_KIND: usize = 20;

fn list(files: &[PathBuf]) -> String {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    names.join(", ")
}

impl LoadedWeights {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::Input(format!("no tensor '{name}' in the weights loaded from {}", list(&self.files))))
    }

    /// Tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// The safetensors files read (an index replaced by the files it names).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// Copies every tensor into `arena`, converted to `dtype`. Errors name the tensor.
    pub fn upload(&self, gpu: &Gpu, arena: &Arena, dtype: DType) -> Result<DeviceWeights> {
        let started = Instant::now();
        let mut tensors = BTreeMap::new();
        for (name, t) in &self.tensors {
            let on_device = gpu.upload(arena, t, dtype).map_err(|e| match e {
                Error::Input(m) => Error::Input(format!("uploading '{name}': {m}")),
                Error::Cuda(m) => Error::Cuda(format!("uploading '{name}': {m}")),
                other => other,
            })?;
            tensors.insert(name.clone(), on_device);
        }
        // Uploads return once staged; the rate counts the copies' end.
        gpu.synchronize()?;
        let report = UploadReport {
            tensors: tensors.len(),
            bytes: tensors.values().map(|t| t.size_bytes() as u64).sum(),
            dtype,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(DeviceWeights { tensors, report })
    }
}

impl DeviceWeights {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Input(format!("no tensor '{name}' among the uploaded weights")))
    }

    /// Tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    pub fn report(&self) -> &UploadReport {
        &self.report
    }
}
