//! LoRA sets switched on the device between the clips of a batch. The models load once with their
//! base weights; each LoRA group's set is laid out and uploaded (`DeviceLoraSet`), and one
//! `LoraSwitcher` per adapted model puts the weights the previous set touched back to their base
//! values and merges the new set in place. The weights keep their addresses, and no model is
//! loaded again when the set changes.

use std::collections::HashMap;
use std::time::Instant;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::ModelWeights;
use crate::models::lora::device::{DeviceLoraSet, LoraSwitcher, Restore};
use crate::models::lora::{Component, Loras};
use crate::ops::Exec;
use crate::tensor::Tensor;

/// The LoRA set merged into a run's device weights.
pub struct DeviceLoras {
    restore: Restore,
    switchers: HashMap<Component, LoraSwitcher>,
    /// Device bytes of the largest set's factors so far (they live while the set merges).
    factor_peak: usize,
}

impl DeviceLoras {
    pub fn new(restore: Restore) -> DeviceLoras {
        DeviceLoras { restore, switchers: HashMap::new(), factor_peak: 0 }
    }

    /// Makes `loras` (None: no LoRA) the merged set of `models` (each adapted model's weights by
    /// component) and waits for the merge. Returns a summary line.
    pub fn switch(
        &mut self,
        gpu: &Gpu,
        ex: &Exec,
        models: &[(Component, &ModelWeights)],
        loras: Option<&Loras>,
    ) -> Result<String> {
        let started = Instant::now();
        let mut sets = Vec::new();
        let mut touched = 0usize;
        for &(component, weights) in models {
            let set = match loras.and_then(|l| l.merge(component)) {
                Some(merge) => Some(DeviceLoraSet::upload(gpu, weights, merge, |_| true)?),
                None => None,
            };
            touched += set
                .iter()
                .flat_map(|s| s.names())
                .filter_map(|n| weights.tensor(n))
                .map(Tensor::size_bytes)
                .sum::<usize>();
            let restore = self.restore;
            let switcher = self.switchers.entry(component).or_insert_with(|| LoraSwitcher::new(restore));
            switcher.apply(ex, weights, set.as_ref())?;
            sets.push(set);
        }
        // The factors must outlive the queued merge.
        gpu.synchronize()?;
        let factors: usize = sets.iter().flatten().map(DeviceLoraSet::bytes).sum();
        self.factor_peak = self.factor_peak.max(factors);
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        Ok(match loras {
            None => format!("LoRAs off on the device in {:.1} ms", started.elapsed().as_secs_f64() * 1e3),
            Some(_) => format!(
                "LoRA set merged on the device in {:.1} ms ({:.2} GiB of weights touched, factors {:.3} GiB, \
                 restore by {})",
                started.elapsed().as_secs_f64() * 1e3,
                gib(touched),
                gib(factors),
                match self.restore {
                    Restore::Copy => "base copies",
                    Restore::Reload => "reloading from the files",
                }
            ),
        })
    }

    /// Device bytes the switching holds at most: the base copies and the largest set's factors.
    pub fn peak_bytes(&self) -> usize {
        self.switchers.values().map(LoraSwitcher::base_bytes).sum::<usize>() + self.factor_peak
    }
}
