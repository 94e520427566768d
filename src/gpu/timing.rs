//! CUDA-event timing: warm-up, then the median of many timed runs.

use cudarc::driver::{result, sys};

use super::device::Gpu;
use crate::error::{Error, Result};

pub(super) struct Event(sys::CUevent);

impl Event {
    pub(super) fn new() -> Result<Event> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(Event)
            .map_err(|e| Error::Cuda(format!("cuEventCreate failed: {e:?}")))
    }

    /// Records the event on `stream` (it completes when the work queued before it does).
    pub(super) fn record(&self, stream: sys::CUstream) -> Result<()> {
        unsafe { result::event::record(self.0, stream) }
            .map_err(|e| Error::Cuda(format!("cuEventRecord failed: {e:?}")))
    }

    /// Milliseconds from this event to `end`, both completed.
    pub(super) fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        unsafe { result::event::elapsed(self.0, end.0) }
            .map_err(|e| Error::Cuda(format!("cuEventElapsedTime failed: {e:?}")))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// Milliseconds of each timed run, sorted, and their median.
#[derive(Clone, Debug)]
pub struct Timing {
    pub runs_ms: Vec<f32>,
}

impl Timing {
    pub fn median_ms(&self) -> f64 {
        let n = self.runs_ms.len();
        if n % 2 == 1 {
            self.runs_ms[n / 2] as f64
        } else {
            (self.runs_ms[n / 2 - 1] as f64 + self.runs_ms[n / 2] as f64) / 2.0
        }
    }
    pub fn min_ms(&self) -> f64 {
        self.runs_ms[0] as f64
    }
}

/// Runs `f` `warmup` times, then times each of `runs` calls with events on the GPU's stream.
pub fn time_gpu(gpu: &Gpu, warmup: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    gpu.synchronize()?;
    let mut events = Vec::with_capacity(runs + 1);
    for _ in 0..=runs {
        events.push(Event::new()?);
    }
    events[0].record(gpu.stream())?;
    for e in &events[1..] {
        f()?;
        e.record(gpu.stream())?;
    }
    gpu.synchronize()?;
    let mut runs_ms = Vec::with_capacity(runs);
    for pair in events.windows(2) {
        runs_ms.push(pair[0].elapsed_ms(&pair[1])?);
    }
    runs_ms.sort_by(f32::total_cmp);
    Ok(Timing { runs_ms })
}
