//! The reference-file harness behind `celframe verify`: runs a component on a reference file's
//! inputs (`in.<name>`, diffusers argument names, NCHW) and compares with its outputs
//! (`out.<name>`) by max abs and relative L2 error. Used by the CLI and by the tests.
//!
//! A reference file is bad input (an `Error::Input`, exit code 2) when it holds a tensor the
//! component does not take, a shape the model cannot run, or a NaN or infinity in any input or
//! output. A computed output with a NaN or infinity is a failed comparison (`Comparison::ok` is
//! false; the CLI prints "NOT FINITE" and exits 1), as is one outside its tolerance.

pub(crate) mod arenas;
pub mod controlnet;
pub mod motion_unet;
pub mod text_encoder;
pub mod unet;
pub mod vae;

use std::path::Path;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::lora::{self, LoraSpec, Loras, Targets};
use crate::tensor::{DType, Tensor};
use crate::weights::{self, TensorFile};

pub use controlnet::{verify_controlnet, verify_controlnet_with_base};
pub use motion_unet::{verify_motion_unet, verify_motion_unet_with_loras};
pub use text_encoder::{verify_text_encoder, verify_text_encoder_with_loras};
pub use unet::{verify_unet, verify_unet_with_loras};
pub use vae::verify_vae_decoder;

/// LoRAs merged into the component before it runs (`--lora [ROLE=]PATH[:WEIGHT]`,
/// `--lora-lenient`); `lora::resolve` checks the roles' rules first.
#[derive(Clone, Debug, Default)]
pub struct LoraOptions {
    pub files: Vec<LoraSpec>,
    /// Keys that target nothing in the component: a warning in the summary instead of an error.
    pub lenient: bool,
}

impl LoraOptions {
    /// Resolves the files against the model `add` enters into the name map; None without LoRAs.
    fn resolve(&self, add: impl FnOnce(&mut Targets) -> Result<()>) -> Result<Option<Loras>> {
        if self.files.is_empty() {
            return Ok(None);
        }
        let mut targets = Targets::new();
        add(&mut targets)?;
        lora::resolve(&self.files, &targets, self.lenient).map(Some)
    }
}

/// Where to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    /// "cpu", "cuda" or "auto" (CUDA when a GPU is present). "cuda" without a driver or device is
    /// `Error::NoDevice` (exit code 3) here, before any file is read.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" if Gpu::is_available() => Ok(Device::Cuda),
            "cuda" => Err(Error::NoDevice(
                "--device cuda, but this machine has no CUDA driver or device (--device cpu runs the CPU twins)".into(),
            )),
            "auto" if Gpu::is_available() => Ok(Device::Cuda),
            "auto" => Ok(Device::Cpu),
            other => Err(Error::Input(format!("--device must be cpu, cuda or auto (got '{other}')"))),
        }
    }
}

/// How a verification runs: where, in which dtype, against which tolerance, with how much CUDA
/// scratch (GiB; None: the default).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub device: Device,
    pub dtype: DType,
    pub tolerance: f64,
    pub scratch_gb: Option<f64>,
}

impl Settings {
    /// The CPU twins in `dtype`.
    pub fn cpu(dtype: DType, tolerance: f64) -> Settings {
        Settings { device: Device::Cpu, dtype, tolerance, scratch_gb: None }
    }
    /// CUDA in `dtype` with `scratch_gb` GiB of scratch.
    pub fn cuda(dtype: DType, tolerance: f64, scratch_gb: f64) -> Settings {
        Settings { device: Device::Cuda, dtype, tolerance, scratch_gb: Some(scratch_gb) }
    }
}

/// Default tolerances (relative L2 against a float32 reference). f32: the reference and the twins
/// both compute in fp32 and differ by summation order over a few hundred layers (~9e-7 measured on
/// the fixtures). f16 / bf16: every op rounds its output (2^-11 / 2^-8 relative) and the errors
/// compound through the residual stream: measured on the fixtures 1.3e-3 / 1.3e-2 through the CPU
/// twins in those dtypes and 1.5e-3 / 1.4e-2 through CUDA on an H100, so 1e-2 / 3e-2 leave room for
/// deeper models without hiding a wrong layer (those move the output by 1e-1 or more).
pub fn default_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 3e-2,
    }
}

/// One output compared with its reference.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    pub shape: Vec<usize>,
    /// Over the finite computed values.
    pub max_abs: f64,
    /// Over the finite computed values.
    pub rel_l2: f64,
    pub tolerance: f64,
    /// NaN or infinite values in the computed output: any makes the comparison fail.
    pub non_finite: usize,
}

impl Comparison {
    pub fn ok(&self) -> bool {
        self.non_finite == 0 && self.rel_l2 <= self.tolerance
    }
}

/// The outcome of one verification: comparisons and the computed outputs (NCHW, host).
pub struct Verification {
    pub comparisons: Vec<Comparison>,
    pub outputs: Vec<(String, Tensor)>,
    pub summary: String,
}

/// ‖actual − expected‖ / ‖expected‖ and max |actual − expected| in f64 over the finite computed
/// values, and the count of the others; shapes must match. `expected` is finite (read by
/// `Reference`).
pub fn compare(name: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) -> Result<Comparison> {
    if actual.shape() != expected.shape() {
        return Err(Error::Input(format!(
            "{name}: the model computes {:?}, the reference holds {:?}",
            actual.shape(),
            expected.shape()
        )));
    }
    let (a, e) = (actual.to_f32_vec()?, expected.to_f32_vec()?);
    let (mut diff, mut norm, mut max, mut non_finite) = (0f64, 0f64, 0f64, 0);
    for (&x, &y) in a.iter().zip(&e) {
        if !x.is_finite() {
            non_finite += 1;
            continue;
        }
        let d = (x as f64 - y as f64).abs();
        diff += d * d;
        norm += (y as f64) * (y as f64);
        max = max.max(d);
    }
    let rel_l2 = if norm > 0.0 { (diff / norm).sqrt() } else { diff.sqrt() };
    Ok(Comparison {
        name: name.to_string(),
        shape: actual.shape().to_vec(),
        max_abs: max,
        rel_l2,
        tolerance,
        non_finite,
    })
}

/// A reference file: its tensors are read only through `float` and `integers`, which refuse a
/// NaN or infinity, and every name is checked against what the component takes and gives.
pub struct Reference {
    file: TensorFile,
}

impl Reference {
    /// Opens `path`; every tensor must be named `in.<name>` or `out.<name>`.
    pub fn open(path: &Path) -> Result<Reference> {
        let file = weights::open(path, "reference file")?;
        let reference = Reference { file };
        if let Some(name) = reference.file.names().find(|n| !n.starts_with("in.") && !n.starts_with("out.")) {
            return Err(reference.bad(format!("'{name}' is neither an input (in.<name>) nor an output (out.<name>)")));
        }
        if !reference.file.names().any(|n| n.starts_with("out.")) {
            return Err(reference.bad("no out.<name> tensor to compare with".into()));
        }
        Ok(reference)
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
    pub fn metadata(&self) -> &std::collections::BTreeMap<String, String> {
        self.file.metadata()
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.file.names()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.file.contains(name)
    }
    /// The file's shape of `name` (NCHW for images), for errors and checks before any conversion.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.file.shape(name)
    }

    /// Refuses every name the component neither takes nor gives; `takes` explains what it does.
    pub fn only(&self, known: impl Fn(&str) -> bool, takes: &str) -> Result<()> {
        match self.names().find(|n| !known(n)) {
            Some(name) => Err(self.bad(format!("unknown tensor '{name}' ({takes})"))),
            None => Ok(()),
        }
    }

    /// Refuses a file that lacks one of `names`.
    pub fn require(&self, names: &[&str]) -> Result<()> {
        match names.iter().find(|n| !self.contains(n)) {
            Some(name) => Err(self.bad(format!("no {name}"))),
            None => Ok(()),
        }
    }

    /// A float (or exactly convertible integer) tensor as stored in the file; NaN or infinity in
    /// it is bad input.
    pub fn float(&self, name: &str) -> Result<Tensor> {
        let t = self.file.float(name)?;
        let values = t.to_f32_vec()?;
        if let Some(first) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.bad(format!(
                "tensor '{name}' holds {} NaN or infinite values of {} (the first at index {first}, {}); a \
                 reference must be finite",
                values.iter().filter(|v| !v.is_finite()).count(),
                values.len(),
                values[first]
            )));
        }
        Ok(t)
    }

    /// The float tensor `name` converted to `dtype`.
    pub fn float_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let t = self.float(name)?;
        if t.dtype() == dtype { Ok(t) } else { Tensor::from_f32(t.shape(), dtype, &t.to_f32_vec()?) }
    }

    /// An integer tensor's values (or a float one's, when all are whole numbers).
    pub fn integers(&self, name: &str) -> Result<Vec<i64>> {
        self.file.integers(name)
    }

    /// A flag tensor's values (BOOL, or 0 / 1 as integers or floats).
    pub fn flags(&self, name: &str) -> Result<Vec<bool>> {
        self.file.flags(name)
    }

    /// An error naming the reference file.
    pub fn bad(&self, why: String) -> Error {
        Error::Input(format!("{} (reference file): {why}", self.path().display()))
    }
}
