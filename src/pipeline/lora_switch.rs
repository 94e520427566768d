//! LoRA sets switched on the device between the clips of a batch. The models load once with their
//! base weights. A switch has a host part and a device part: `PreparedLoras::lay_out` resolves
//! nothing on the GPU (it lays out each adapted model's factors on the host, `HostLoraSet`), so the
//! renderer runs it for the next LoRA group on a thread while the current group renders;
//! `DeviceLoras::switch` then uploads the factors and has one `LoraSwitcher` per adapted model put
//! the weights the previous set touched back to their base values and merge the new set in place.
//! The weights keep their addresses, and no model is loaded again when the set changes.

use std::collections::HashMap;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::ModelWeights;
use crate::models::lora::device::{DeviceLoraSet, GEMM_MIN_RANK, HostLoraSet, LoraSwitcher, Restore};
use crate::models::lora::{Component, Loras};
use crate::ops::Exec;
use crate::tensor::Tensor;

/// A LoRA set laid out on the host for each adapted model (None: no LoRA, or none for that
/// model): the part of a switch that needs no GPU. `Send`, so it can be made on another thread.
pub struct PreparedLoras {
    sets: Vec<(Component, Option<HostLoraSet>)>,
    /// Seconds the layout took.
    seconds: f64,
}

impl PreparedLoras {
    /// Lays out `loras` (None: no LoRA) for `models` (each adapted model's weights by component;
    /// only their names, shapes and dtype are read, so the GPU may be using them meanwhile).
    /// `Error::Unsupported` where the device merge cannot take the set (bf16 DoRA).
    pub fn lay_out(models: &[(Component, &ModelWeights)], loras: Option<&Loras>) -> Result<PreparedLoras> {
        let started = Instant::now();
        let sets = models
            .iter()
            .map(|&(component, weights)| {
                let set = match loras.and_then(|l| l.merge(component)) {
                    Some(merge) => Some(HostLoraSet::lay_out(weights, merge, |_| true, GEMM_MIN_RANK)?),
                    None => None,
                };
                Ok((component, set))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PreparedLoras { sets, seconds: started.elapsed().as_secs_f64() })
    }

    /// Device bytes the factors will take.
    pub fn bytes(&self) -> usize {
        self.sets.iter().flat_map(|(_, s)| s).map(HostLoraSet::bytes).sum()
    }

    /// Whether the set is empty (no LoRA for any model).
    fn is_empty(&self) -> bool {
        self.sets.iter().all(|(_, s)| s.is_none())
    }
}

/// The LoRA set merged into a run's device weights.
pub struct DeviceLoras {
    restore: Restore,
    switchers: HashMap<Component, LoraSwitcher>,
    /// Device bytes of the last set's factors (they live only while the set merges).
    factors: usize,
}

impl DeviceLoras {
    pub fn new(restore: Restore) -> DeviceLoras {
        DeviceLoras { restore, switchers: HashMap::new(), factors: 0 }
    }

    /// Makes `prepared` (laid out for these `models`, each adapted model's weights by component)
    /// the merged set and waits for the merge. Returns a summary line.
    pub fn switch(
        &mut self,
        gpu: &Gpu,
        ex: &Exec,
        models: &[(Component, &ModelWeights)],
        prepared: PreparedLoras,
    ) -> Result<String> {
        let started = Instant::now();
        let (layout_seconds, empty) = (prepared.seconds, prepared.is_empty());
        let mut host: HashMap<Component, HostLoraSet> =
            prepared.sets.into_iter().filter_map(|(c, s)| Some((c, s?))).collect();
        let sets = models
            .iter()
            .map(|&(component, weights)| host.remove(&component).map(|h| DeviceLoraSet::from_host(gpu, weights, h)))
            .map(Option::transpose)
            .collect::<Result<Vec<_>>>()?;
        if let Some(component) = host.keys().next() {
            return Err(Error::Internal(format!(
                "a LoRA set was laid out for {}, which is not among the models switched",
                component.name()
            )));
        }
        // Timed apart from the merge: the upload is what the host link bounds.
        gpu.synchronize()?;
        let uploaded = started.elapsed().as_secs_f64();
        let mut touched = 0usize;
        for (&(component, weights), set) in models.iter().zip(&sets) {
            touched += set
                .iter()
                .flat_map(|s| s.names())
                .filter_map(|n| weights.tensor(n))
                .map(Tensor::size_bytes)
                .sum::<usize>();
            let restore = self.restore;
            let switcher = self.switchers.entry(component).or_insert_with(|| LoraSwitcher::new(restore));
            switcher.apply(ex, weights, set.as_ref())?;
        }
        // The factors must outlive the queued merge.
        gpu.synchronize()?;
        let factors: usize = sets.iter().flatten().map(DeviceLoraSet::bytes).sum();
        self.factors = factors;
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let total = started.elapsed().as_secs_f64();
        Ok(if empty {
            format!("LoRAs off on the device in {:.1} ms", total * 1e3)
        } else {
            format!(
                "LoRA set switched on the device in {:.1} ms: factors {:.3} GiB uploaded in {:.1} ms ({:.1} GB/s), \
                 restored + merged in {:.1} ms ({:.2} GiB of weights touched, restore by {}); laid out on the host \
                 in {:.2} s beforehand",
                total * 1e3,
                gib(factors),
                uploaded * 1e3,
                factors as f64 / uploaded.max(1e-9) / 1e9,
                (total - uploaded) * 1e3,
                gib(touched),
                match self.restore {
                    Restore::Copy => "base copies",
                    Restore::Reload => "reloading from the files",
                    Restore::Never => "none needed: the run's only set",
                },
                layout_seconds
            )
        })
    }

    /// Device bytes of the base copies, held from the first merge on.
    pub fn base_bytes(&self) -> usize {
        self.switchers.values().map(LoraSwitcher::base_bytes).sum()
    }

    /// Device bytes the last switch's factors took while they merged (freed before it returned).
    pub fn factor_bytes(&self) -> usize {
        self.factors
    }
}
