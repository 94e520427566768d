//! The device: context, one stream, lazily loaded kernel modules, checked launches, copies.
//!
//! `Gpu` is deliberately neither Send nor Sync: it binds its context to the creating thread and
//! every call happens there.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, result, sys};

use super::memory::{Arena, DeviceMem};
use super::profile::{Profile, ProfileRow, kernel_kind};
use super::timing::Event;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostBytes, Storage, Tensor};

include!(concat!(env!("OUT_DIR"), "/kernel_modules.rs"));

/// One `kernels/**/*.cu` file compiled to a fatbin, with the kernels it defines.
pub struct KernelModule {
    pub name: &'static str,
    pub fatbin: &'static [u8],
    pub kernels: &'static [&'static str],
    pub sm90_resources: &'static [KernelResources],
}

/// ptxas's report for one kernel on sm_90a, recorded at build time.
#[derive(Debug)]
pub struct KernelResources {
    pub name: &'static str,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_bytes: u32,
    pub static_smem_bytes: u32,
}

/// Marker for the `#[repr(C)]` parameter structs of kernels/include/params.h.
/// # Safety
/// The type must be the exact C layout the kernel declares as its single parameter.
pub unsafe trait KernelParams: Copy {}

#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: u32,
    pub l2_bytes: usize,
    pub total_memory: usize,
    /// The most shared memory one block may ask for (by opting in).
    pub max_shared_per_block: usize,
}

pub struct Gpu {
    /// Holds the retained primary context for as long as the Gpu lives.
    _ctx: Arc<CudaContext>,
    stream: sys::CUstream,
    info: DeviceInfo,
    modules: RefCell<HashMap<&'static str, sys::CUmodule>>,
    functions: RefCell<HashMap<&'static str, Function>>,
    /// Occupancy answers by OccupancyKey: ops choose layouts per call, and the driver's occupancy
    /// calculator is not free.
    occupancy: RefCell<HashMap<OccupancyKey, u32>>,
    /// Synchronise after every launch so an asynchronous fault names its kernel (CELFRAME_SYNC_LAUNCHES=1).
    sync_launches: bool,
    /// Fill every output allocation with NaN bytes before the kernel writes it (tests).
    poison_outputs: std::cell::Cell<bool>,
    blas: RefCell<Option<super::blas::Blas>>,
    dnn: RefCell<Option<super::dnn::Dnn>>,
    /// Pinned host buffers that uploads stage through (created on the first upload).
    staging: RefCell<Option<Staging>>,
    /// The open profile, if any (`start_profile`).
    profile: RefCell<Option<Profile>>,
    /// The CUDA graph capture under way on the stream (gpu/graph.rs), if any.
    capture: RefCell<Option<Capture>>,
}

/// What a capture under way collects: the pinned copies of the constants uploaded inside it
/// (`upload_constant`), which its memcpy nodes read at every replay.
#[derive(Default)]
pub(super) struct Capture {
    pub(super) constants: Vec<Pinned>,
}

/// Pinned host memory holding one constant of a captured graph; freed on drop.
pub(super) struct Pinned(*mut u8);

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = unsafe { result::free_host(self.0 as *mut c_void) };
    }
}

/// The guard of `Gpu::profile_scope`.
pub struct ProfileScope<'a> {
    gpu: &'a Gpu,
    open: bool,
}

impl Drop for ProfileScope<'_> {
    fn drop(&mut self) {
        if self.open
            && let Some(p) = self.gpu.profile.borrow_mut().as_mut()
        {
            p.pop_scope();
        }
    }
}

thread_local! {
    /// The context of the Gpu made on this thread: every device allocation holds it, so memory is
    /// always freed before the context can go, whatever order the owners drop in.
    static CONTEXT: RefCell<Option<Arc<CudaContext>>> = const { RefCell::new(None) };
}

/// The CUDA context of the `Gpu` made on this thread (device allocations keep it alive).
pub(crate) fn current_context() -> Result<Arc<CudaContext>> {
    CONTEXT
        .with(|c| c.borrow().clone())
        .ok_or_else(|| Error::Internal("device memory asked for on a thread with no Gpu: create the Gpu first".into()))
}

/// Two pinned host buffers that uploads alternate between: the host copies a piece into one while
/// the stream copies the other to the device; an event per buffer says when it may be refilled.
struct Staging {
    buffers: [(*mut u8, sys::CUevent); 2],
    next: usize,
}

/// Bytes per staging buffer: large enough that a copy runs near PCIe speed, small enough to pin.
const STAGING_BYTES: usize = 32 << 20;

impl Staging {
    fn new() -> Result<Staging> {
        let make = || -> Result<(*mut u8, sys::CUevent)> {
            let host = cuda("cuMemHostAlloc (upload staging)", unsafe { result::malloc_host(STAGING_BYTES, 0) })?;
            let event = cuda(
                "cuEventCreate (upload staging)",
                result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING),
            )?;
            Ok((host as *mut u8, event))
        };
        Ok(Staging { buffers: [make()?, make()?], next: 0 })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for (host, event) in self.buffers {
            let _ = unsafe { result::event::synchronize(event) };
            let _ = unsafe { result::event::destroy(event) };
            let _ = unsafe { result::free_host(host as *mut c_void) };
        }
    }
}

fn cuda<T>(call: &str, r: std::result::Result<T, result::DriverError>) -> Result<T> {
    r.map_err(|e| Error::Cuda(format!("{call} failed: {e:?}")))
}

/// A loaded kernel and what its launches need to know about shared memory.
#[derive(Clone, Copy)]
struct Function {
    handle: sys::CUfunction,
    /// Shared memory the kernel declares statically (`__shared__` arrays).
    static_shared: usize,
    /// The dynamic shared-memory limit currently set on the function (48 KiB less the static part
    /// until raised).
    dynamic_limit: usize,
}

/// Shared memory a block gets without opting in, static and dynamic together.
const DEFAULT_SHARED_PER_BLOCK: usize = 48 << 10;

/// (kernel, block threads, cluster size and placement for cluster queries, dynamic shared bytes).
type OccupancyKey = (&'static str, u32, Option<(u32, ClusterScheduling)>, usize);

/// How the driver places a cluster's blocks on the multiprocessors of a GPC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ClusterScheduling {
    /// One block of a cluster per multiprocessor where it can (the driver's default on the H100).
    #[default]
    Spread,
    /// Blocks of one cluster may share a multiprocessor, so more clusters may fit a GPC.
    LoadBalancing,
}

/// The launch attributes of a cluster launch: its size along x and the scheduling policy.
fn cluster_attributes(cluster: u32, scheduling: ClusterScheduling) -> [sys::CUlaunchAttribute; 2] {
    // SAFETY: plain C structs and unions; all-zero is a valid value before the fields are set.
    let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    attrs[0].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attrs[0].value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x: cluster, y: 1, z: 1 };
    attrs[1].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE;
    attrs[1].value.clusterSchedulingPolicyPreference = match scheduling {
        ClusterScheduling::Spread => sys::CUclusterSchedulingPolicy::CU_CLUSTER_SCHEDULING_POLICY_SPREAD,
        ClusterScheduling::LoadBalancing => sys::CUclusterSchedulingPolicy::CU_CLUSTER_SCHEDULING_POLICY_LOAD_BALANCING,
    };
    attrs
}

fn launch_config(
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    stream: sys::CUstream,
    attrs: &mut [sys::CUlaunchAttribute],
) -> sys::CUlaunchConfig {
    sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: shared_bytes,
        hStream: stream,
        attrs: attrs.as_mut_ptr(),
        numAttrs: attrs.len() as u32,
    }
}

impl Gpu {
    /// True when a CUDA driver is installed and reports at least one device. Never panics.
    pub fn is_available() -> bool {
        (unsafe { sys::is_culib_present() })
            && result::init().is_ok()
            && result::device::get_count().is_ok_and(|n| n > 0)
    }

    /// The device named by CELFRAME_DEVICE (an ordinal), else device 0.
    pub fn from_env() -> Result<Gpu> {
        let ordinal = match std::env::var("CELFRAME_DEVICE") {
            Ok(v) => v.parse().map_err(|_| Error::Input(format!("CELFRAME_DEVICE='{v}' is not a device ordinal")))?,
            Err(_) => 0,
        };
        Gpu::new(ordinal)
    }

    pub fn new(ordinal: usize) -> Result<Gpu> {
        if !Gpu::is_available() {
            return Err(Error::NoDevice("no CUDA driver or device on this machine".into()));
        }
        let count = cuda("cuDeviceGetCount", result::device::get_count())? as usize;
        if ordinal >= count {
            return Err(Error::Input(format!("CUDA device {ordinal} does not exist ({count} present)")));
        }
        let ctx = cuda("cuDevicePrimaryCtxRetain", CudaContext::new(ordinal))?;
        CONTEXT.with(|c| *c.borrow_mut() = Some(ctx.clone()));
        let stream = cuda("cuStreamCreate", result::stream::create(result::stream::StreamKind::NonBlocking))?;
        let attr = |a: CUdevice_attribute| cuda("cuDeviceGetAttribute", ctx.attribute(a));
        let info = DeviceInfo {
            ordinal,
            name: cuda("cuDeviceGetName", ctx.name())?,
            compute_capability: cuda("cuDeviceGetAttribute", ctx.compute_capability())?,
            multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            l2_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
            max_shared_per_block: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as usize,
            total_memory: cuda("cuDeviceTotalMem", ctx.total_mem())?,
        };
        Ok(Gpu {
            _ctx: ctx,
            stream,
            info,
            modules: RefCell::default(),
            functions: RefCell::default(),
            occupancy: RefCell::default(),
            sync_launches: std::env::var("CELFRAME_SYNC_LAUNCHES").is_ok_and(|v| v == "1"),
            poison_outputs: std::cell::Cell::new(false),
            blas: RefCell::new(None),
            dnn: RefCell::new(None),
            staging: RefCell::new(None),
            profile: RefCell::new(None),
            capture: RefCell::new(None),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Device memory no allocation holds now (this process's and others').
    pub fn free_memory(&self) -> Result<usize> {
        cuda("cuMemGetInfo", result::mem_get_info()).map(|(free, _)| free)
    }
    pub fn stream(&self) -> sys::CUstream {
        self.stream
    }

    pub fn set_poison_outputs(&self, on: bool) {
        self.poison_outputs.set(on);
    }

    /// Memory from `arena` for a kernel's raw output; filled with 0xFF bytes when poisoning is on.
    pub fn empty_bytes(&self, arena: &Arena, bytes: usize) -> Result<DeviceMem> {
        let mem = arena.alloc(bytes)?;
        if self.poison_outputs.get() {
            self.fill_bytes(&mem, 0xFF)?;
        }
        Ok(mem)
    }

    /// The device's cuBLASLt handle with its workspace and plans (made on first use).
    pub fn blas(&self) -> Result<std::cell::RefMut<'_, super::blas::Blas>> {
        let mut blas = self.blas.borrow_mut();
        if blas.is_none() {
            *blas = Some(super::blas::Blas::new(&self.info)?);
        }
        Ok(std::cell::RefMut::map(blas, |b| b.as_mut().expect("made above")))
    }

    /// The device's cuDNN handle, bound to the compute stream, with its plans (made on first use).
    pub fn dnn(&self) -> Result<std::cell::RefMut<'_, super::dnn::Dnn>> {
        let mut dnn = self.dnn.borrow_mut();
        if dnn.is_none() {
            *dnn = Some(super::dnn::Dnn::new(self)?);
        }
        Ok(std::cell::RefMut::map(dnn, |d| d.as_mut().expect("made above")))
    }

    /// The function `kernel`, loading its module on first use.
    fn loaded(&self, kernel: &'static str) -> Result<Function> {
        if let Some(f) = self.functions.borrow().get(kernel) {
            return Ok(*f);
        }
        let module = KERNEL_MODULES
            .iter()
            .find(|m| m.kernels.contains(&kernel))
            .ok_or_else(|| Error::Internal(format!("no compiled kernel is named {kernel}")))?;
        let loaded = self.modules.borrow().get(module.name).copied();
        let cu_module = match loaded {
            Some(m) => m,
            None => {
                let m = cuda(&format!("cuModuleLoadData for module {}", module.name), unsafe {
                    result::module::load_data(module.fatbin.as_ptr() as *const c_void)
                })?;
                self.modules.borrow_mut().insert(module.name, m);
                m
            }
        };
        let name = CString::new(kernel).expect("kernel names have no NUL");
        let handle =
            cuda(&format!("cuModuleGetFunction({kernel})"), unsafe { result::module::get_function(cu_module, name) })?;
        let attribute = |a| {
            cuda(&format!("cuFuncGetAttribute({a:?}) of {kernel}"), unsafe {
                result::function::get_function_attribute(handle, a)
            })
        };
        let static_shared = attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)? as usize;
        // Until raised, static and dynamic shared memory share the default 48 KiB (taken as the
        // smaller of that and what the driver reports, so the raise is never skipped).
        let dynamic_limit = (attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)?
            as usize)
            .min(DEFAULT_SHARED_PER_BLOCK.saturating_sub(static_shared));
        let f = Function { handle, static_shared, dynamic_limit };
        self.functions.borrow_mut().insert(kernel, f);
        Ok(f)
    }

    /// Launches `kernel` with its parameter struct passed by value. Errors name the kernel, grid,
    /// block and the call that failed.
    pub fn launch<P: KernelParams>(
        &self,
        kernel: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        let describe = || format!("{kernel} grid {grid:?} block {block:?} shared {shared_bytes} B");
        let f = self.allow_shared(kernel, shared_bytes as usize)?;
        let mut args = [params as *const P as *mut c_void];
        self.profiled(kernel_kind(kernel), || {
            cuda(&format!("cuLaunchKernel of {}", describe()), unsafe {
                result::launch_kernel(f, grid, block, shared_bytes, self.stream, &mut args)
            })
        })?;
        if self.sync_launches && !self.is_capturing() {
            cuda(&format!("synchronising after {}", describe()), self.synchronize_raw())?;
        }
        Ok(())
    }

    /// A launch in thread block clusters of `cluster` blocks along x (sm_90; the grid's x is a
    /// multiple of it). Clusters above 8 blocks are non-portable and are allowed on the function first.
    pub fn launch_clustered<P: KernelParams>(
        &self,
        kernel: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        (cluster, scheduling): (u32, ClusterScheduling),
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        let describe = || {
            format!("{kernel} grid {grid:?} block {block:?} cluster {cluster} {scheduling:?} shared {shared_bytes} B")
        };
        let f = self.allow_shared(kernel, shared_bytes as usize)?;
        self.allow_cluster(f, kernel, cluster)?;
        let mut attrs = cluster_attributes(cluster, scheduling);
        let config = launch_config(grid, block, shared_bytes, self.stream, &mut attrs);
        let mut args = [params as *const P as *mut c_void];
        self.profiled(kernel_kind(kernel), || {
            cuda(&format!("cuLaunchKernelEx of {}", describe()), unsafe {
                sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()).result()
            })
        })?;
        if self.sync_launches && !self.is_capturing() {
            cuda(&format!("synchronising after {}", describe()), self.synchronize_raw())?;
        }
        Ok(())
    }

    /// Clusters of `cluster` blocks of `kernel` the device runs at once at this block size (0: none
    /// fits).
    pub fn max_active_clusters(
        &self,
        kernel: &'static str,
        block_threads: u32,
        (cluster, scheduling): (u32, ClusterScheduling),
        shared_bytes: usize,
    ) -> Result<u32> {
        self.cached_occupancy((kernel, block_threads, Some((cluster, scheduling)), shared_bytes), |f| {
            let mut attrs = cluster_attributes(cluster, scheduling);
            let config =
                launch_config((cluster, 1, 1), (block_threads, 1, 1), shared_bytes as u32, self.stream, &mut attrs);
            let mut n = 0i32;
            cuda(&format!("cuOccupancyMaxActiveClusters({kernel}, cluster {cluster})"), unsafe {
                sys::cuOccupancyMaxActiveClusters(&mut n, f, &config).result()
            })?;
            Ok(n)
        })
    }

    fn allow_cluster(&self, f: sys::CUfunction, kernel: &str, cluster: u32) -> Result<()> {
        if cluster <= 8 {
            return Ok(());
        }
        cuda(&format!("cuFuncSetAttribute(non-portable cluster size {cluster}) for {kernel}"), unsafe {
            result::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )
        })
    }

    /// The kernel's handle, its dynamic shared-memory limit raised where this launch needs it. A block
    /// gets 48 KiB of static and dynamic shared memory together unless the function opts in: a
    /// 48000-byte request of a kernel with 1.5 KiB of static arrays failed with
    /// CUDA_ERROR_INVALID_VALUE before the static part was counted here.
    fn allow_shared(&self, kernel: &'static str, dynamic: usize) -> Result<sys::CUfunction> {
        let f = self.loaded(kernel)?;
        let total = f.static_shared + dynamic;
        if total > self.info.max_shared_per_block.max(DEFAULT_SHARED_PER_BLOCK) {
            return Err(Error::Internal(format!(
                "{kernel}: {dynamic} B of dynamic shared memory plus {} B static exceed the device's {} B per block",
                f.static_shared, self.info.max_shared_per_block
            )));
        }
        if dynamic > f.dynamic_limit {
            cuda(&format!("cuFuncSetAttribute(max dynamic shared {dynamic} B) for {kernel}"), unsafe {
                result::function::set_function_attribute(
                    f.handle,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic as i32,
                )
            })?;
            self.functions.borrow_mut().insert(kernel, Function { dynamic_limit: dynamic, ..f });
        }
        Ok(f.handle)
    }

    /// Most blocks of `kernel` one multiprocessor holds at this block size.
    pub fn occupancy(&self, kernel: &'static str, block_threads: u32, shared_bytes: usize) -> Result<u32> {
        self.cached_occupancy((kernel, block_threads, None, shared_bytes), |f| {
            cuda(&format!("cuOccupancyMaxActiveBlocksPerMultiprocessor({kernel})"), unsafe {
                result::occupancy::max_active_block_per_multiprocessor(f, block_threads as i32, shared_bytes)
            })
        })
    }

    fn cached_occupancy(&self, key: OccupancyKey, query: impl FnOnce(sys::CUfunction) -> Result<i32>) -> Result<u32> {
        if let Some(&n) = self.occupancy.borrow().get(&key) {
            return Ok(n);
        }
        let (kernel, _, cluster, shared_bytes) = key;
        if self.loaded(kernel)?.static_shared + shared_bytes > self.info.max_shared_per_block {
            return Ok(0); // no block of this size runs at all
        }
        let f = self.allow_shared(kernel, shared_bytes)?;
        if let Some((size, _)) = cluster {
            self.allow_cluster(f, kernel, size)?;
        }
        let n = query(f)?.max(0) as u32;
        self.occupancy.borrow_mut().insert(key, n);
        Ok(n)
    }

    fn synchronize_raw(&self) -> std::result::Result<(), result::DriverError> {
        unsafe { result::stream::synchronize(self.stream) }
    }

    /// Opens a profile: from now until `finish_profile`, each launch, matmul and convolution on the
    /// stream is timed (see gpu/profile.rs). A profile already open is discarded.
    pub fn start_profile(&self) {
        *self.profile.borrow_mut() = Some(Profile::default());
    }

    /// As `start_profile`, with each GEMM filed under its description (shape, bias, residual)
    /// rather than as "gemm".
    pub fn start_profile_by_gemm_shape(&self) {
        *self.profile.borrow_mut() = Some(Profile::by_gemm_shape());
    }

    /// True while an open profile files GEMMs by description.
    pub(crate) fn profiles_gemm_shapes(&self) -> bool {
        self.profile.borrow().as_ref().is_some_and(|p| p.gemm_shapes)
    }

    /// Under a profile that files GEMMs by description, files the next launch under its kind and
    /// the shape `describe` gives, with its floating-point operations (a kernel that runs at
    /// several shapes in a forward, such as flash attention); costs nothing otherwise.
    pub(crate) fn describe_next_launch(&self, describe: impl FnOnce() -> (String, f64)) {
        if let Some(p) = self.profile.borrow_mut().as_mut().filter(|p| p.gemm_shapes) {
            p.next_shape = Some(describe());
        }
    }

    /// True while a profile is open.
    pub fn is_profiling(&self) -> bool {
        self.profile.borrow().is_some()
    }

    /// Waits for the stream, closes the profile and returns its time per (scope, kind).
    pub fn finish_profile(&self) -> Result<Vec<ProfileRow>> {
        self.synchronize()?;
        let profile = self.profile.borrow_mut().take();
        profile.ok_or_else(|| Error::Internal("finish_profile without start_profile".into()))?.rows()
    }

    /// Files the work `f` queues under `kind` while a profile is open; just runs `f` otherwise.
    pub(crate) fn profiled<T>(&self, kind: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.profiled_work(kind, 0.0, f)
    }

    /// `profiled` for work whose floating-point operations are known (`flop`).
    pub(crate) fn profiled_work<T>(&self, kind: &str, flop: f64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.profile.borrow().is_none() {
            return f();
        }
        self.refuse_while_capturing("profiling (CUDA events around each launch)")?;
        let start = Event::new()?;
        start.record(self.stream)?;
        let out = f()?;
        let end = Event::new()?;
        end.record(self.stream)?;
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            p.push(kind, flop, start, end);
        }
        Ok(out)
    }

    /// Names the model part the work queued until the guard drops belongs to, for an open profile
    /// (scopes nest: "motion/..."). Costs nothing without one.
    pub fn profile_scope(&self, name: &'static str) -> ProfileScope<'_> {
        let open = self.profile.borrow_mut().as_mut().map(|p| p.push_scope(name)).is_some();
        ProfileScope { gpu: self, open }
    }

    pub fn synchronize(&self) -> Result<()> {
        self.refuse_while_capturing("synchronising the stream")?;
        cuda("cuStreamSynchronize", self.synchronize_raw())
    }

    /// True while a CUDA graph is captured on the stream (gpu/graph.rs): work queued now is
    /// recorded, not run.
    pub fn is_capturing(&self) -> bool {
        self.capture.borrow().is_some()
    }

    /// Refuses `what` while a capture is under way: it is not capture-safe (it waits for the
    /// stream, reads a result, or reuses a host buffer a replay would read later).
    pub(crate) fn refuse_while_capturing(&self, what: &str) -> Result<()> {
        match self.is_capturing() {
            false => Ok(()),
            true => Err(Error::Internal(format!(
                "{what} while capturing a CUDA graph: only work whose inputs stay in device memory can be captured"
            ))),
        }
    }

    /// Starts capturing the stream's work into a graph, in relaxed mode (see gpu/graph.rs).
    pub(super) fn begin_capture(&self) -> Result<()> {
        if self.is_capturing() {
            return Err(Error::Internal("a CUDA graph capture began inside another".into()));
        }
        if self.profile.borrow().is_some() {
            return Err(Error::Internal(
                "a CUDA graph capture began with a profile open (profiling runs eager)".into(),
            ));
        }
        cuda("cuStreamBeginCapture", unsafe {
            sys::cuStreamBeginCapture_v2(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).result()
        })?;
        *self.capture.borrow_mut() = Some(Capture::default());
        Ok(())
    }

    /// Ends the capture under way: the graph (or why there is none) and what the capture collected.
    pub(super) fn end_capture(&self) -> (Result<sys::CUgraph>, Capture) {
        let collected = self.capture.borrow_mut().take().unwrap_or_default();
        let mut graph = std::ptr::null_mut();
        let ended = unsafe { sys::cuStreamEndCapture(self.stream, &mut graph).result() };
        let graph = ended.map(|()| graph).map_err(|e| {
            Error::Cuda(format!(
                "cuStreamEndCapture failed: {e:?} (an operation the stream capture does not allow invalidated it)"
            ))
        });
        (graph, collected)
    }

    /// The library workspaces made so far (cuBLASLt's, cuDNN's): a graph that captured their
    /// calls keeps them, in case the libraries replace them while it lives.
    pub(super) fn workspaces(&self) -> Vec<DeviceMem> {
        let blas = self.blas.borrow().as_ref().map(|b| b.workspace().clone());
        let dnn = self.dnn.borrow().as_ref().and_then(|d| d.workspace().cloned());
        blas.into_iter().chain(dnn).collect()
    }

    /// A device tensor of `shape` from `arena`; filled with NaN bytes when poisoning is on.
    pub fn empty(&self, arena: &Arena, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape.iter().try_fold(dtype.size(), |n, &d| n.checked_mul(d)).ok_or_else(|| {
            Error::Input(format!("a {dtype:?} tensor of shape {shape:?} has more bytes than memory holds"))
        })?;
        let mem = arena.alloc(bytes)?;
        if self.poison_outputs.get() {
            self.fill_bytes(&mem, 0xFF)?;
        }
        Tensor::from_storage(shape, dtype, Storage::Device(mem))
    }

    pub fn fill_bytes(&self, mem: &DeviceMem, byte: u8) -> Result<()> {
        cuda("cuMemsetD8Async", unsafe { result::memset_d8_async(mem.ptr()?, byte, mem.bytes(), self.stream) })
    }

    /// Copies a host tensor into `arena`, converting it to `dtype` on the way.
    pub fn upload(&self, arena: &Arena, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let mem = arena.alloc(t.numel() * dtype.size())?;
        self.upload_into(&mem, t, dtype)?;
        Tensor::from_storage(t.shape(), dtype, Storage::Device(mem))
    }

    /// Copies (and converts) a host tensor into existing device memory, on the compute stream: kernels
    /// queued before it finish before the copy lands and kernels queued after see it. The host's
    /// bytes go through pinned staging buffers, so the call returns once they are staged and the
    /// tensor may be dropped.
    pub fn upload_into(&self, mem: &DeviceMem, t: &Tensor, dtype: DType) -> Result<()> {
        let in_dtype = host_tensor_in(t, dtype)?;
        let bytes = in_dtype.host_bytes()?;
        self.copy_to_device(mem, bytes)
    }

    /// Copies raw bytes (a kernel's descriptor table) into new memory from `arena`, on the compute
    /// stream and staged as `upload_into` stages them.
    pub fn upload_bytes(&self, arena: &Arena, bytes: &[u8]) -> Result<DeviceMem> {
        let mem = arena.alloc(bytes.len())?;
        self.copy_to_device(&mem, bytes)?;
        Ok(mem)
    }

    /// A small host tensor of values fixed for the work around it (position rows, per-row
    /// scales, a vector of ones) copied into `arena` as `upload` copies it. Inside a CUDA graph
    /// capture the bytes go to pinned memory the graph keeps, and every replay copies them again:
    /// the graph bakes the values in, so whoever keys the graph must key them too.
    pub fn upload_constant(&self, arena: &Arena, t: &Tensor, dtype: DType) -> Result<Tensor> {
        if !self.is_capturing() {
            return self.upload(arena, t, dtype);
        }
        let in_dtype = host_tensor_in(t, dtype)?;
        let bytes = in_dtype.host_bytes()?;
        let mem = arena.alloc(bytes.len())?;
        // cuMemHostAlloc is allowed in a relaxed-mode capture (gpu/graph.rs).
        let host = cuda("cuMemHostAlloc (graph constant)", unsafe { result::malloc_host(bytes.len().max(1), 0) })?;
        let pinned = Pinned(host as *mut u8);
        // SAFETY: `host` holds bytes.len() pinned bytes that nothing else references yet.
        let copy = unsafe { std::slice::from_raw_parts_mut(pinned.0, bytes.len()) };
        copy.copy_from_slice(bytes);
        cuda("cuMemcpyHtoDAsync (graph constant)", unsafe {
            result::memcpy_htod_async(mem.ptr()?, &*copy, self.stream)
        })?;
        if let Some(c) = self.capture.borrow_mut().as_mut() {
            c.constants.push(pinned);
        }
        Tensor::from_storage(t.shape(), dtype, Storage::Device(mem))
    }

    /// `bytes` into `mem` (the same length) on the compute stream, through the pinned staging buffers.
    fn copy_to_device(&self, mem: &DeviceMem, bytes: &[u8]) -> Result<()> {
        if bytes.len() != mem.bytes() {
            return Err(Error::Internal(format!("upload of {} bytes into {} bytes", bytes.len(), mem.bytes())));
        }
        // The staging buffers are refilled by the next upload, long before a replay reads them.
        self.refuse_while_capturing("an upload through the staging buffers")?;
        let mut staging = self.staging.borrow_mut();
        if staging.is_none() {
            *staging = Some(Staging::new()?);
        }
        let staging = staging.as_mut().expect("made above");
        let dst = mem.ptr()?;
        for (k, piece) in bytes.chunks(STAGING_BYTES).enumerate() {
            let (host, event) = staging.buffers[staging.next];
            staging.next ^= 1;
            // The buffer's previous copy must have left it before it is refilled.
            cuda("cuEventSynchronize (upload staging)", unsafe { result::event::synchronize(event) })?;
            // SAFETY: `host` holds STAGING_BYTES pinned bytes and no copy reads it (event above).
            let pinned = unsafe { std::slice::from_raw_parts_mut(host, piece.len()) };
            pinned.copy_from_slice(piece);
            let at = dst + (k * STAGING_BYTES) as u64;
            cuda("cuMemcpyHtoDAsync", unsafe { result::memcpy_htod_async(at, &*pinned, self.stream) })?;
            cuda("cuEventRecord (upload staging)", unsafe { result::event::record(event, self.stream) })?;
        }
        Ok(())
    }

    /// Copies the device tensor `src` into the device tensor `dst` (same shape and dtype) on the
    /// compute stream.
    pub fn copy(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        if dst.shape() != src.shape() || dst.dtype() != src.dtype() {
            return Err(Error::Internal(format!("device copy of {src:?} into {dst:?}")));
        }
        let (d, s) = (dst.device_ptr()?, src.device_ptr()?);
        self.profiled("copy", || {
            cuda("cuMemcpyDtoDAsync", unsafe { result::memcpy_dtod_async(d, s, src.size_bytes(), self.stream) })
        })
    }

    /// Copies `bytes` bytes from byte `src_offset` of the device tensor `src` to byte `dst_offset`
    /// of the device tensor `dst` on the compute stream.
    pub fn copy_bytes(
        &self,
        dst: &Tensor,
        dst_offset: usize,
        src: &Tensor,
        src_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        if dst_offset + bytes > dst.size_bytes() || src_offset + bytes > src.size_bytes() {
            return Err(Error::Internal(format!(
                "device copy of {bytes} bytes from byte {src_offset} of {src:?} to byte {dst_offset} of {dst:?}"
            )));
        }
        let (d, s) = (dst.device_ptr()? + dst_offset as u64, src.device_ptr()? + src_offset as u64);
        self.profiled("copy", || {
            cuda("cuMemcpyDtoDAsync", unsafe { result::memcpy_dtod_async(d, s, bytes, self.stream) })
        })
    }

    /// Waits for the stream and copies raw device memory (a kernel's byte output) to the host.
    pub fn download_bytes(&self, mem: &DeviceMem) -> Result<Vec<u8>> {
        self.refuse_while_capturing("a download")?;
        self.synchronize()?;
        let mut bytes = vec![0u8; mem.bytes()];
        cuda("cuMemcpyDtoH", unsafe { result::memcpy_dtoh_sync(&mut bytes, mem.ptr()?) })?;
        Ok(bytes)
    }

    /// Waits for the stream and copies a device tensor to a new host tensor.
    pub fn download(&self, t: &Tensor) -> Result<Tensor> {
        self.refuse_while_capturing("a download")?;
        self.synchronize()?;
        let mut bytes = vec![0u8; t.size_bytes()];
        cuda("cuMemcpyDtoH", unsafe { result::memcpy_dtoh_sync(&mut bytes, t.device_ptr()?) })?;
        Tensor::from_storage(t.shape(), t.dtype(), Storage::Host(HostBytes::Owned(Arc::new(bytes))))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.synchronize_raw();
        *self.blas.borrow_mut() = None;
        *self.dnn.borrow_mut() = None;
        *self.staging.borrow_mut() = None;
        for (_, m) in self.modules.borrow_mut().drain() {
            let _ = unsafe { result::module::unload(m) };
        }
        let _ = unsafe { result::stream::destroy(self.stream) };
    }
}

/// A host tensor in `dtype`: itself (a shared handle) where it already has that dtype, else converted.
fn host_tensor_in(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    Tensor::from_f32(t.shape(), dtype, &t.to_f32_vec()?)
}
