//! A model's weights as the graph reads them: keyed by diffusers names, in the compute dtype,
//! convolution weights already KRSC, on the host (CPU twins) or on the device (CUDA ops). Each
//! entry records whether the graph looked it up, so a test can find a loaded tensor that no
//! forward reads (`unread`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::gpu::{Arena, Gpu};
use crate::ops::conv::weight_oihw_to_ohwi;
use crate::tensor::{DType, Tensor};
use crate::weights::LoadedWeights;

/// Where prepared weights go.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// Host tensors in `DType` (for `Exec::Cpu`).
    Host(DType),
    /// Device tensors in `dtype`, allocated from `arena` (for `Exec::Cuda`).
    Device { gpu: &'a Gpu, arena: &'a Arena, dtype: DType },
}

impl Place<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            Place::Host(d) => *d,
            Place::Device { dtype, .. } => *dtype,
        }
    }
}

pub struct ModelWeights {
    tensors: HashMap<String, Entry>,
    dtype: DType,
}

/// A tensor and whether `Scope::get` has handed it out.
struct Entry {
    tensor: Tensor,
    read: AtomicBool,
}

impl Entry {
    fn new(tensor: Tensor) -> Entry {
        Entry { tensor, read: AtomicBool::new(false) }
    }
}

impl ModelWeights {
    /// Takes the tensors named by `names` (diffusers name, checkpoint key) from `loaded`: 4-d
    /// tensors (PyTorch convolutions, OIHW) become KRSC once here rather than at every forward,
    /// then everything is converted to the place's dtype on the host or on its way to the device.
    pub fn prepare(loaded: &LoadedWeights, names: &[(String, String)], place: Place) -> Result<ModelWeights> {
        let dtype = place.dtype();
        let mut tensors = HashMap::with_capacity(names.len());
        for (name, key) in names {
            let t = loaded.get(key)?;
            let t = if t.shape().len() == 4 { weight_oihw_to_ohwi(t)? } else { t.clone() };
            let t = match place {
                Place::Host(_) if t.dtype() == dtype => t,
                Place::Host(_) => Tensor::from_f32(t.shape(), dtype, &t.to_f32_vec()?)?,
                Place::Device { gpu, arena, .. } => gpu.upload(arena, &t, dtype).map_err(|e| match e {
                    Error::Cuda(m) => Error::Cuda(format!("uploading '{key}': {m}")),
                    other => other,
                })?,
            };
            tensors.insert(name.clone(), Entry::new(t));
        }
        Ok(ModelWeights { tensors, dtype })
    }

    /// Like `prepare`, for host tensors the caller has already put in the graph's form (a fused
    /// projection split into its parts, a matrix transposed): converted or uploaded the same way.
    pub fn from_tensors(named: Vec<(String, Tensor)>, place: Place) -> Result<ModelWeights> {
        let dtype = place.dtype();
        let mut tensors = HashMap::with_capacity(named.len());
        for (name, t) in named {
            let t = match place {
                Place::Host(_) if t.dtype() == dtype => t,
                Place::Host(_) => Tensor::from_f32(t.shape(), dtype, &t.to_f32_vec()?)?,
                Place::Device { gpu, arena, .. } => gpu.upload(arena, &t, dtype).map_err(|e| match e {
                    Error::Cuda(m) => Error::Cuda(format!("uploading '{name}': {m}")),
                    other => other,
                })?,
            };
            tensors.insert(name, Entry::new(t));
        }
        Ok(ModelWeights { tensors, dtype })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
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

    /// The whole model, for `Scope::get` and `Scope::at`.
    pub fn root(&self) -> Scope<'_> {
        Scope { weights: self, prefix: String::new() }
    }
}

/// The weights under one module prefix (`down_blocks.1.attentions.0`), so block code names its
/// tensors as diffusers' module does.
pub struct Scope<'a> {
    weights: &'a ModelWeights,
    prefix: String,
}

impl<'a> Scope<'a> {
    /// The sub-module `name` (`resnets.0`).
    pub fn at(&self, name: &str) -> Scope<'a> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Scope { weights: self.weights, prefix }
    }

    /// The tensor `name` (`conv1.weight`) of this module, marked as read.
    pub fn get(&self, name: &str) -> Result<&'a Tensor> {
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        // Loading checked every name the graph's specs list, so a miss is the engine's own
        // mismatch between its specs and its forward, not the user's file.
        let entry = self.weights.tensors.get(&full).ok_or_else(|| {
            Error::Internal(format!("the forward reads the weight '{full}', which the loader did not load"))
        })?;
        entry.read.store(true, Ordering::Relaxed);
        Ok(&entry.tensor)
    }
}
