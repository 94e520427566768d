//! CUDA graphs: the GPU work a closure queues on the `Gpu`'s stream, captured once
//! (cuStreamBeginCapture / cuStreamEndCapture), instantiated, and replayed with one cuGraphLaunch
//! (CUDA C++ Programming Guide, "CUDA Graphs", "Creating a Graph Using Stream Capture").
//!
//! A replay runs the captured kernels with the parameters they had at capture: the same device
//! addresses, the same host scalars. So:
//! - inputs are static: tensors made before the capture, which the caller keeps and rewrites (device
//!   copies, uploads) between replays;
//! - outputs are the tensors the closure returns, rewritten by every replay;
//! - values the work uploads inside the capture (`Gpu::upload_constant`) are baked in: pinned copies
//!   the graph keeps, copied again by each replay;
//! - the scratch ranges the capture used stay out of everyone else's hands while the graph lives
//!   (`Arena::begin_recording`): the leases still alive at the end (outputs) are held by the graph,
//!   the rest is reserved by its `GraphPool`. A pool's graphs replay one at a time on one stream, so
//!   a later capture of the pool reuses the ranges of the earlier ones: memory for one working set,
//!   not one per graph. The price: a graph's outputs hold until the next replay of any graph in
//!   its pool.
//! - weights written in place (LoRA switches) keep their addresses, so a replay sees them.
//!
//! Capture mode: relaxed (cuStreamBeginCapture_v2 with CU_STREAM_CAPTURE_MODE_RELAXED). Global
//! mode would make "potentially unsafe" calls on every other thread fail while this one captures
//! (cuMemAlloc, synchronisations): the device threads of a split render, the output thread.
//! Thread-local mode would also refuse them on this thread, and a forward uploads small constants
//! mid-way, whose pinned copies (cuMemHostAlloc) are made during the capture (CUDA Runtime API,
//! cudaStreamCaptureMode). What this thread must not do while capturing, the `Gpu` refuses by name
//! (`Gpu::refuse_while_capturing`): uploads through the staging buffers, downloads, stream
//! synchronisation, profiling events, cuDNN algorithm searches and workspace growth, GEMM tuning.
//! A capture that fails ends cleanly: the capture is ended, the partial graph destroyed, and the
//! `Gpu` stays usable.

use std::cell::RefCell;
use std::rc::Rc;

use cudarc::driver::sys;

use super::device::{Gpu, Pinned};
use super::memory::{Arena, CapturedLeases, DeviceMem, Reserved};
use crate::error::{Error, Result};

/// Errs when `stream` is being captured (for code that holds the stream, not the `Gpu`).
pub(crate) fn refuse_while_capturing(stream: sys::CUstream, what: &str) -> Result<()> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    unsafe { sys::cuStreamIsCapturing(stream, &mut status).result() }
        .map_err(|e| Error::Cuda(format!("cuStreamIsCapturing failed: {e:?}")))?;
    match status {
        sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => Ok(()),
        _ => Err(Error::Internal(format!(
            "{what} while capturing a CUDA graph: warm the work up with an eager run before capturing it"
        ))),
    }
}

/// The scratch ranges reserved for a set of graphs that replay one at a time (see the module
/// comment); held until the pool and all of its graphs are gone.
#[derive(Default)]
pub struct GraphPool {
    reserved: Rc<RefCell<Option<Reserved>>>,
}

impl GraphPool {
    pub fn new() -> GraphPool {
        GraphPool::default()
    }

    /// Scratch bytes reserved for the pool's graphs (besides their outputs).
    pub fn reserved_bytes(&self) -> usize {
        self.reserved.borrow().as_ref().map_or(0, |r| r.bytes())
    }
}

/// An instantiated CUDA graph of captured work.
pub struct Graph {
    /// The stream captured on: replays go there (a `Gpu`'s one stream), and a drop waits for it.
    stream: sys::CUstream,
    exec: sys::CUgraphExec,
    graph: sys::CUgraph,
    /// The leases alive at the end of the capture (outputs): ranges each replay writes.
    leases: CapturedLeases,
    /// The pinned copies of the constants the capture uploaded, read by every replay.
    _constants: Vec<Pinned>,
    /// The library workspaces the captured calls use, kept should the libraries replace them.
    _workspaces: Vec<DeviceMem>,
    /// The pool's reservation, kept while any of its graphs lives.
    pool: Rc<RefCell<Option<Reserved>>>,
}

impl Graph {
    /// Captures the work `work` queues on `gpu`'s stream, allocating from `scratch`, into a graph of
    /// `pool`, and returns it with what `work` returned (its outputs, rewritten by each replay).
    /// The captured work does not run: launch the graph for that. Run the work eagerly once before
    /// capturing it (kernel modules load, cuDNN searches its algorithms, cuBLASLt plans).
    pub fn capture<T>(
        gpu: &Gpu,
        scratch: &Arena,
        pool: &GraphPool,
        work: impl FnOnce() -> Result<T>,
    ) -> Result<(Graph, T)> {
        let earlier = pool.reserved.borrow_mut().take();
        scratch.begin_recording(earlier)?;
        let out = gpu.begin_capture().and_then(|()| {
            let out = work();
            let (graph, collected) = gpu.end_capture();
            // The work's own error explains an invalidated capture better than the end's.
            match (out, graph) {
                (Ok(out), Ok(graph)) => Ok((out, graph, collected)),
                (Err(e), Ok(graph)) => {
                    let _ = unsafe { sys::cuGraphDestroy(graph) };
                    Err(e)
                }
                (Err(e), Err(_)) | (Ok(_), Err(e)) => Err(e),
            }
        });
        // Ended on every path: a failed capture leaves its ranges reserved for the pool's next one.
        let (leases, reserved) = scratch.end_recording();
        *pool.reserved.borrow_mut() = Some(reserved);
        let (out, graph, collected) = out?;
        let mut exec = std::ptr::null_mut();
        if let Err(e) = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0).result() } {
            let _ = unsafe { sys::cuGraphDestroy(graph) };
            return Err(Error::Cuda(format!("cuGraphInstantiateWithFlags failed: {e:?}")));
        }
        let made = Graph {
            stream: gpu.stream(),
            exec,
            graph,
            leases,
            _constants: collected.constants,
            _workspaces: gpu.workspaces(),
            pool: pool.reserved.clone(),
        };
        Ok((made, out))
    }

    /// Queues one replay on the stream of `gpu`, the `Gpu` it was captured on (drop graphs before
    /// their `Gpu`).
    pub fn launch(&self, gpu: &Gpu) -> Result<()> {
        if gpu.stream() != self.stream {
            return Err(Error::Internal("a CUDA graph launched on another Gpu than it was captured on".into()));
        }
        if self.pool.borrow().as_ref().is_some_and(|r| !r.holds()) {
            return Err(Error::Internal("a CUDA graph launched after its scratch arena was reset".into()));
        }
        gpu.refuse_while_capturing("launching a CUDA graph")?;
        unsafe { sys::cuGraphLaunch(self.exec, self.stream).result() }
            .map_err(|e| Error::Cuda(format!("cuGraphLaunch failed: {e:?}")))
    }

    /// Scratch bytes the graph's outputs and other live captured tensors hold.
    pub fn held_bytes(&self) -> usize {
        self.leases.bytes()
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // A replay in flight still reads the pinned constants and writes the held ranges.
        let _ = unsafe { cudarc::driver::result::stream::synchronize(self.stream) };
        let _ = unsafe { sys::cuGraphExecDestroy(self.exec) };
        let _ = unsafe { sys::cuGraphDestroy(self.graph) };
    }
}
