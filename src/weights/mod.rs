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
use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::{Arena, Gpu};
use crate::tensor::{DType, Tensor};

pub use report::{LoadReport, UploadReport};
pub use save::save;

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
        for t in file::read(path)? {
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

    /// One error listing every problem, counts by kind first, then one line each.
    fn into_result(mut self, files: &[PathBuf]) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        self.0.sort_by_key(|(kind, _)| *kind);
        let mut counts: Vec<(Problem, usize)> = Vec::new();
        for (kind, _) in &self.0 {
            match counts.last_mut() {
                Some((k, n)) if k == kind => *n += 1,
                _ => counts.push((*kind, 1)),
            }
        }
        let counts: Vec<String> = counts.iter().map(|(kind, n)| format!("{}: {n}", kind.label())).collect();
        let mut message = format!("cannot use the weights in {} ({}):", list(files), counts.join(", "));
        for (kind, detail) in &self.0 {
            message.push_str(&format!("\n  {}: {detail}", kind.label()));
        }
        Err(Error::Input(message))
    }
}

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
