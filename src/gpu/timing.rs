//! CUDA-event timing: warm-up, then the median of many timed runs.

use cudarc::driver::{result, sys};

use super::device::Gpu;
use crate::error::{Error, Result};

struct Event(sys::CUevent);

impl Event {
    fn new() -> Result<Event> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(Event)
            .map_err(|e| Error::Cuda(format!("cuEventCreate failed: {e:?}")))
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
    let record = |e: &Event| {
        unsafe { result::event::record(e.0, gpu.stream()) }
            .map_err(|e| Error::Cuda(format!("cuEventRecord failed: {e:?}")))
    };
    record(&events[0])?;
    for e in &events[1..] {
        f()?;
        record(e)?;
    }
    gpu.synchronize()?;
    let mut runs_ms = Vec::with_capacity(runs);
    for pair in events.windows(2) {
        runs_ms.push(
            unsafe { result::event::elapsed(pair[0].0, pair[1].0) }
                .map_err(|e| Error::Cuda(format!("cuEventElapsedTime failed: {e:?}")))?,
        );
    }
    runs_ms.sort_by(f32::total_cmp);
    Ok(Timing { runs_ms })
}
