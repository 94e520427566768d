//! cuDNN convolutions in NHWC (weights KRSC: [out, kh, kw, in]), fp32 accumulation, tensor-core
//! math allowed. The algorithm per shape is found once by cuDNN's own timing
//! (cudnnFindConvolutionForwardAlgorithmEx): the fastest deterministic one (the fastest of all only
//! where none is). Timings vary between runs, so two processes could pick different algorithms and
//! round differently; the choice is kept on disk per device and cuDNN version (`AlgoCache`), so
//! every later process runs the same algorithms and gives bit-identical outputs. Within a process
//! the choices are shared by every thread's `Dnn` (the device threads of a split render,
//! `pipeline::devices`), and a search runs under a lock, so two devices never run one shape with
//! different algorithms.
//!
//! `conv2d_residual` is the ResNet tail's fused form, y = conv(x, w) + z + bias in one
//! cudnnConvolutionBiasActivationForward call, with plans of its own (`ResidualPlan`): it never
//! searches and never touches the plain convolutions' plans or recorded choices.

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::{LazyLock, Mutex, MutexGuard};

use cudarc::cudnn::sys as dnn;

use super::device::Gpu;
use super::graph::refuse_while_capturing;
use super::memory::DeviceMem;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Everything that decides a convolution plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dtype: DType,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.height), o(self.width))
    }

    /// Runs `f` (this convolution's cuDNN call), filed in an open profile under `kind` ("conv",
    /// "conv_residual") with its FLOPs; under `--breakdown-gemms` with its shape too
    /// (`conv n32 72x128 320->4 k3 s1`). Without a profile the kind is not built.
    pub fn profiled<T>(&self, gpu: &Gpu, kind: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !gpu.is_profiling() {
            return f();
        }
        let (oh, ow) = self.out_hw();
        let flop =
            2.0 * (self.batch * oh * ow * self.out_channels * self.in_channels * self.kernel * self.kernel) as f64;
        let kind = match gpu.profiles_gemm_shapes() {
            true => format!(
                "{kind} n{} {}x{} {}->{} k{} s{}",
                self.batch, self.height, self.width, self.in_channels, self.out_channels, self.kernel, self.stride
            ),
            false => kind.to_string(),
        };
        gpu.profiled_work(&kind, flop, f)
    }
}

/// A convolution's cuDNN descriptors: x, y (NHWC) and w (KRSC) of its shape, and the convolution
/// (fp32 compute, tensor-op math for 16-bit tensors, FMA for f32); destroyed with it.
struct ConvDescriptors {
    x: dnn::cudnnTensorDescriptor_t,
    w: dnn::cudnnFilterDescriptor_t,
    y: dnn::cudnnTensorDescriptor_t,
    conv: dnn::cudnnConvolutionDescriptor_t,
}

impl ConvDescriptors {
    unsafe fn new(s: &ConvShape) -> Result<ConvDescriptors> {
        let dt = data_type(s.dtype);
        let nhwc = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let (oh, ow) = s.out_hw();
        let i = |v: usize| v as i32;
        // Made one by one; a failure drops what was made (the rest are null).
        let (x, y) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut d = ConvDescriptors { x, w: std::ptr::null_mut(), y, conv: std::ptr::null_mut() };
        unsafe {
            check("cudnnCreateTensorDescriptor", dnn::cudnnCreateTensorDescriptor(&mut d.x))?;
            check("cudnnCreateTensorDescriptor", dnn::cudnnCreateTensorDescriptor(&mut d.y))?;
            check("cudnnCreateFilterDescriptor", dnn::cudnnCreateFilterDescriptor(&mut d.w))?;
            check("cudnnCreateConvolutionDescriptor", dnn::cudnnCreateConvolutionDescriptor(&mut d.conv))?;
            check(
                "cudnnSetTensor4dDescriptor(x)",
                dnn::cudnnSetTensor4dDescriptor(d.x, nhwc, dt, i(s.batch), i(s.in_channels), i(s.height), i(s.width)),
            )?;
            check(
                "cudnnSetTensor4dDescriptor(y)",
                dnn::cudnnSetTensor4dDescriptor(d.y, nhwc, dt, i(s.batch), i(s.out_channels), i(oh), i(ow)),
            )?;
            check(
                "cudnnSetFilter4dDescriptor",
                dnn::cudnnSetFilter4dDescriptor(
                    d.w,
                    dt,
                    nhwc,
                    i(s.out_channels),
                    i(s.in_channels),
                    i(s.kernel),
                    i(s.kernel),
                ),
            )?;
            check(
                "cudnnSetConvolution2dDescriptor",
                dnn::cudnnSetConvolution2dDescriptor(
                    d.conv,
                    i(s.padding),
                    i(s.padding),
                    i(s.stride),
                    i(s.stride),
                    1,
                    1,
                    dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
            )?;
            let math = if s.dtype == DType::F32 {
                dnn::cudnnMathType_t::CUDNN_FMA_MATH
            } else {
                dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            };
            check("cudnnSetConvolutionMathType", dnn::cudnnSetConvolutionMathType(d.conv, math))?;
        }
        Ok(d)
    }

    /// cuDNN's workspace query for `algo` under the convolution's current math type, into `bytes`.
    unsafe fn workspace_size(
        &self,
        handle: dnn::cudnnHandle_t,
        algo: dnn::cudnnConvolutionFwdAlgo_t,
        bytes: &mut usize,
    ) -> dnn::cudnnStatus_t {
        unsafe { dnn::cudnnGetConvolutionForwardWorkspaceSize(handle, self.x, self.w, self.conv, self.y, algo, bytes) }
    }
}

impl Drop for ConvDescriptors {
    fn drop(&mut self) {
        unsafe {
            for t in [self.x, self.y] {
                if !t.is_null() {
                    dnn::cudnnDestroyTensorDescriptor(t);
                }
            }
            if !self.w.is_null() {
                dnn::cudnnDestroyFilterDescriptor(self.w);
            }
            if !self.conv.is_null() {
                dnn::cudnnDestroyConvolutionDescriptor(self.conv);
            }
        }
    }
}

struct Plan {
    d: ConvDescriptors,
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

/// The fused convolution + residual of one shape: y = act(alpha1 * conv(x) + alpha2 * z + bias)
/// through cudnnConvolutionBiasActivationForward, with the identity activation and alpha1 = alpha2
/// = 1. cuDNN documents CUDNN_ACTIVATION_IDENTITY in that call as working only with
/// CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, so the algorithm is fixed (no search, nothing
/// recorded: the plan is the same in every process, so are the bytes). z has y's shape and
/// dtype, so `y` describes both.
struct ResidualPlan {
    d: ConvDescriptors,
    bias: dnn::cudnnTensorDescriptor_t,
    act: dnn::cudnnActivationDescriptor_t,
    workspace: usize,
}

impl Drop for ResidualPlan {
    /// Destroys what was made (a plan refused half-way holds nulls for the rest).
    fn drop(&mut self) {
        unsafe {
            if !self.bias.is_null() {
                dnn::cudnnDestroyTensorDescriptor(self.bias);
            }
            if !self.act.is_null() {
                dnn::cudnnDestroyActivationDescriptor(self.act);
            }
        }
    }
}

/// The algorithm of every fused plan (see `ResidualPlan`).
const RESIDUAL_ALGO: dnn::cudnnConvolutionFwdAlgo_t =
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;

/// The library functions the fused form calls, looked up once: a libcudnn without one of them
/// refuses the fused form for every shape instead of panicking in the loader.
const RESIDUAL_SYMBOLS: [&str; 4] = [
    "cudnnConvolutionBiasActivationForward",
    "cudnnCreateActivationDescriptor",
    "cudnnSetActivationDescriptor",
    "cudnnDestroyActivationDescriptor",
];

/// Shapes whose fused form cuDNN refused in this process, by `AlgoCache` name (cuDNN version and
/// device): every thread's `Dnn` (the device threads of a split render) then runs them the same
/// way, the plain convolution and the residual pass.
static REFUSED: LazyLock<Mutex<HashSet<(String, ConvShape)>>> = LazyLock::new(Mutex::default);

fn refused_shapes() -> MutexGuard<'static, HashSet<(String, ConvShape)>> {
    REFUSED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct Dnn {
    handle: dnn::cudnnHandle_t,
    /// The compute stream the handle is bound to (checked for a CUDA graph capture under way).
    stream: cudarc::driver::sys::CUstream,
    plans: HashMap<ConvShape, Plan>,
    /// Fused convolution + residual plans (`conv2d_residual`), apart from `plans`.
    residual: HashMap<ConvShape, ResidualPlan>,
    /// Whether libcudnn exports every function of RESIDUAL_SYMBOLS.
    residual_symbols: bool,
    workspace: Option<DeviceMem>,
    algos: AlgoCache,
}

/// Algorithm choices by convolution shape, read from and written to one file per device and cuDNN
/// version under the cache folder: `CELFRAME_CACHE_DIR`, else `$XDG_CACHE_HOME/celframe`, else
/// `~/.cache/celframe`. A line is `<ConvShape debug form>\t<algorithm number>\t<math type number>`.
/// With no usable folder the choices live for the process only.
struct AlgoCache {
    file: Option<std::path::PathBuf>,
    /// The choices' key in `CHOSEN`: cuDNN version and device name.
    name: String,
}

/// Every `AlgoCache`'s choices in this process, by its `name`, each by convolution shape:
/// (algorithm, math type) numbers.
type Choices = HashMap<String, HashMap<String, (u32, u32)>>;

static CHOSEN: LazyLock<Mutex<Choices>> = LazyLock::new(Mutex::default);

/// The process's choices, locked (a thread that panicked holding them left whole entries only).
fn shared_choices() -> MutexGuard<'static, Choices> {
    CHOSEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An algorithm and the math type it was timed with: cuDNN's search may time an algorithm under
/// another math type than the descriptor's (CUDNN_DEFAULT_MATH for a TENSOR_OP descriptor, say),
/// and runs it correctly only under that one.
#[derive(Clone, Copy)]
struct Choice {
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    math: dnn::cudnnMathType_t,
}

impl AlgoCache {
    fn open(device: &str) -> AlgoCache {
        let folder = std::env::var_os("CELFRAME_CACHE_DIR")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| std::path::Path::new(&d).join("celframe")))
            .or_else(|| std::env::var_os("HOME").map(|d| std::path::Path::new(&d).join(".cache/celframe")));
        let version = unsafe { dnn::cudnnGetVersion() };
        let device: String = device.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let name = format!("cudnn-{version}-{device}");
        let file = folder.map(|f| f.join(format!("{name}.v2.tsv")));
        // Read once per process: later threads find the choices in CHOSEN.
        shared_choices().entry(name.clone()).or_insert_with(|| {
            // A missing, unreadable or oversized file is an empty cache (it is only a memo of timings).
            let text = file.as_deref().and_then(|f| crate::io::read_text(f, 16 << 20, "cuDNN algorithm cache").ok());
            text.iter()
                .flat_map(|t| t.lines())
                .filter_map(|l| {
                    let mut fields = l.split('\t');
                    let (key, algo, math) =
                        (fields.next()?, fields.next()?.parse().ok()?, fields.next()?.parse().ok()?);
                    Some((key.to_string(), (algo, math)))
                })
                .collect()
        });
        AlgoCache { file, name }
    }

    fn get(&self, chosen: &Choices, s: &ConvShape) -> Option<Choice> {
        let (algo, math) = *chosen.get(&self.name)?.get(&format!("{s:?}"))?;
        Some(Choice {
            algo: ALGOS.into_iter().find(|a| *a as u32 == algo)?,
            math: MATH_TYPES.into_iter().find(|m| *m as u32 == math)?,
        })
    }

    /// Records a choice; the file is rewritten whole through a temporary name, so a reader never
    /// sees half a file. Failing to write only costs the next process a search.
    fn put(&mut self, chosen: &mut Choices, s: &ConvShape, choice: Choice) {
        let mine = chosen.entry(self.name.clone()).or_default();
        mine.insert(format!("{s:?}"), (choice.algo as u32, choice.math as u32));
        let Some(file) = &self.file else { return };
        let mut lines: Vec<String> = mine.iter().map(|(k, (a, m))| format!("{k}\t{a}\t{m}\n")).collect();
        lines.sort();
        let temp = file.with_extension(format!("tmp{}", std::process::id()));
        let written = file.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
            std::fs::write(&temp, lines.concat())?;
            std::fs::rename(&temp, file)
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            eprintln!("note: cuDNN algorithm choices not saved to {}: {e}", file.display());
            self.file = None;
        }
    }
}

const MATH_TYPES: [dnn::cudnnMathType_t; 4] = [
    dnn::cudnnMathType_t::CUDNN_DEFAULT_MATH,
    dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
    dnn::cudnnMathType_t::CUDNN_FMA_MATH,
];

const ALGOS: [dnn::cudnnConvolutionFwdAlgo_t; 8] = [
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
    dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
];

fn check(call: &str, s: dnn::cudnnStatus_t) -> Result<()> {
    if s == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{call} failed: {s:?}")))
    }
}

fn data_type(d: DType) -> dnn::cudnnDataType_t {
    match d {
        DType::F16 => dnn::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F32 => dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
    }
}

impl Dnn {
    pub fn new(gpu: &Gpu) -> Result<Dnn> {
        if !unsafe { dnn::is_culib_present() } {
            return Err(Error::Cuda("libcudnn.so (cuDNN 9) was not found on the library path".into()));
        }
        let mut handle = std::ptr::null_mut();
        check("cudnnCreate", unsafe { dnn::cudnnCreate(&mut handle) })?;
        check("cudnnSetStream", unsafe { dnn::cudnnSetStream(handle, gpu.stream() as dnn::cudaStream_t) })?;
        // SAFETY: the library is present (checked above); looking a symbol up calls nothing.
        let lib = unsafe { dnn::culib() };
        let residual_symbols =
            RESIDUAL_SYMBOLS.iter().all(|name| unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_ok());
        Ok(Dnn {
            handle,
            stream: gpu.stream(),
            plans: HashMap::new(),
            residual: HashMap::new(),
            residual_symbols,
            workspace: None,
            algos: AlgoCache::open(&gpu.info().name),
        })
    }

    unsafe fn make_plan(&mut self, s: &ConvShape, x: u64, w: u64, y: u64) -> Result<Plan> {
        let mut plan = Plan {
            d: unsafe { ConvDescriptors::new(s)? },
            algo: dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            workspace: 0,
        };
        // Held through the search and its record: another thread's search of the shape waits and
        // then takes this one's choice.
        let mut chosen = shared_choices();
        if let Some(choice) = self.algos.get(&chosen, s) {
            unsafe { self.apply(&mut plan, choice)? };
            return Ok(plan);
        }
        // The search times its candidates with events and waits for them.
        refuse_while_capturing(self.stream, &format!("a cuDNN algorithm search for {s:?}"))?;
        // Let cuDNN time its candidates on the real buffers, with up to 256 MiB of workspace.
        let budget = 256usize << 20;
        let scratch = self.workspace_of(budget)?;
        let mut perf: [dnn::cudnnConvolutionFwdAlgoPerf_t; 8] = unsafe { std::mem::zeroed() };
        let mut returned = 0;
        check("cudnnFindConvolutionForwardAlgorithmEx", unsafe {
            dnn::cudnnFindConvolutionForwardAlgorithmEx(
                self.handle,
                plan.d.x,
                x as *const c_void,
                plan.d.w,
                w as *const c_void,
                plan.d.conv,
                plan.d.y,
                y as *mut c_void,
                perf.len() as i32,
                &mut returned,
                perf.as_mut_ptr(),
                scratch as *mut c_void,
                budget,
            )
        })?;
        // Fastest first; the fastest deterministic one, else the fastest.
        let ran: Vec<_> =
            perf[..returned as usize].iter().filter(|p| p.status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS).collect();
        let best = ran
            .iter()
            .find(|p| p.determinism == dnn::cudnnDeterminism_t::CUDNN_DETERMINISTIC)
            .or(ran.first())
            .ok_or_else(|| Error::Cuda(format!("cuDNN found no algorithm for {s:?}")))?;
        let choice = Choice { algo: best.algo, math: best.mathType };
        unsafe { self.apply(&mut plan, choice)? };
        self.algos.put(&mut chosen, s, choice);
        Ok(plan)
    }

    /// Sets the plan to `choice`: the descriptor's math type to the one the algorithm was timed
    /// with, and the workspace to what the algorithm needs under it. Running a found algorithm under
    /// the descriptor's original math type failed now and then with CUDNN_STATUS_BAD_PARAM
    /// ("workSpaceSizeInBytes < requiredWorkspace") when the search's fastest entry had been timed
    /// under another (bf16 VAE convolutions on the H200; the EXECUTION_FAILED once seen there was
    /// most likely the same).
    unsafe fn apply(&self, plan: &mut Plan, choice: Choice) -> Result<()> {
        plan.algo = choice.algo;
        unsafe {
            check("cudnnSetConvolutionMathType", dnn::cudnnSetConvolutionMathType(plan.d.conv, choice.math))?;
            check(
                "cudnnGetConvolutionForwardWorkspaceSize",
                plan.d.workspace_size(self.handle, choice.algo, &mut plan.workspace),
            )
        }
    }

    fn workspace_of(&mut self, bytes: usize) -> Result<u64> {
        if self.workspace.as_ref().is_none_or(|w| w.bytes() < bytes) {
            // A graph captured earlier keeps the old workspace; one under capture would lose it.
            refuse_while_capturing(self.stream, &format!("growing the cuDNN workspace to {bytes} bytes"))?;
            self.workspace = Some(DeviceMem::owned(bytes, "cuDNN workspace")?);
        }
        self.workspace.as_ref().unwrap().ptr()
    }

    /// The workspace the convolutions run with (None before the first that needs one).
    pub fn workspace(&self) -> Option<&DeviceMem> {
        self.workspace.as_ref()
    }

    /// y = conv(x, w) without bias. x, w, y are device addresses in NHWC / KRSC.
    pub fn conv2d(&mut self, s: &ConvShape, x: u64, w: u64, y: u64) -> Result<()> {
        if !self.plans.contains_key(s) {
            let plan = unsafe { self.make_plan(s, x, w, y)? };
            self.plans.insert(*s, plan);
        }
        let need = self.plans[s].workspace;
        let ws = if need > 0 { self.workspace_of(need)? } else { 0 };
        let plan = &self.plans[s];
        let (alpha, beta) = (1.0f32, 0.0f32);
        check(&format!("cudnnConvolutionForward ({s:?}, algo {:?})", plan.algo), unsafe {
            dnn::cudnnConvolutionForward(
                self.handle,
                &alpha as *const f32 as *const c_void,
                plan.d.x,
                x as *const c_void,
                plan.d.w,
                w as *const c_void,
                plan.d.conv,
                plan.algo,
                ws as *mut c_void,
                need,
                &beta as *const f32 as *const c_void,
                plan.d.y,
                y as *mut c_void,
            )
        })
    }

    /// Whether the fused form runs for `s`: its plan is made on first use (descriptors and
    /// cuDNN's workspace query; no timing, nothing recorded). Where cuDNN refuses it (any status
    /// but success from making the plan or its workspace query), the refusal is said once on
    /// stderr and remembered for the process, and this answers false from then on. Making a plan
    /// queues nothing on the stream, so it may happen under a CUDA graph capture (growing the
    /// workspace may not: `workspace_of`); the renderer's warm-up run makes them first anyway.
    pub fn residual_ready(&mut self, s: &ConvShape) -> Result<bool> {
        if self.residual.contains_key(s) {
            return Ok(true);
        }
        if refused_shapes().contains(&(self.algos.name.clone(), *s)) {
            return Ok(false);
        }
        if !self.residual_symbols {
            self.refuse(s, "libcudnn lacks cudnnConvolutionBiasActivationForward or the activation descriptors");
            return Ok(false);
        }
        match unsafe { self.make_residual_plan(s) } {
            Ok(plan) => {
                self.residual.insert(*s, plan);
                Ok(true)
            }
            Err(why) => {
                self.refuse(s, &why);
                Ok(false)
            }
        }
    }

    /// Remembers that cuDNN refused the fused form for `s` (said on stderr the first time).
    fn refuse(&mut self, s: &ConvShape, why: &str) {
        self.residual.remove(s);
        if refused_shapes().insert((self.algos.name.clone(), *s)) {
            eprintln!(
                "note: cuDNN refused the fused convolution + residual for {s:?} ({why}); that shape runs the \
                 convolution, then the residual pass"
            );
        }
    }

    /// The fused plan of `s`, or the failing call and its status.
    unsafe fn make_residual_plan(&self, s: &ConvShape) -> std::result::Result<ResidualPlan, String> {
        let ok = |call: &str, status: dnn::cudnnStatus_t| {
            if status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS { Ok(()) } else { Err(format!("{call}: {status:?}")) }
        };
        let d = unsafe { ConvDescriptors::new(s) }.map_err(|e| e.to_string())?;
        let mut plan = ResidualPlan { d, bias: std::ptr::null_mut(), act: std::ptr::null_mut(), workspace: 0 };
        unsafe {
            ok("cudnnCreateTensorDescriptor", dnn::cudnnCreateTensorDescriptor(&mut plan.bias))?;
            ok("cudnnCreateActivationDescriptor", dnn::cudnnCreateActivationDescriptor(&mut plan.act))?;
            // The bias is [1, K, 1, 1] in the tensors' own type. cuDNN's table of data-type
            // configurations for cudnnConvolutionBiasActivationForward asks for a float bias only
            // in the INT8 configurations; the floating ones (PSEUDO_HALF, PSEUDO_BFLOAT16, FLOAT:
            // 16-bit or float tensors, float compute) take it in the tensors' type, as PyTorch's
            // cudnn_convolution_add_relu passes it.
            let nhwc = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
            ok(
                "cudnnSetTensor4dDescriptor(bias)",
                dnn::cudnnSetTensor4dDescriptor(plan.bias, nhwc, data_type(s.dtype), 1, s.out_channels as i32, 1, 1),
            )?;
            ok(
                "cudnnSetActivationDescriptor(identity)",
                dnn::cudnnSetActivationDescriptor(
                    plan.act,
                    dnn::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY,
                    dnn::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN,
                    0.0,
                ),
            )?;
            ok(
                "cudnnGetConvolutionForwardWorkspaceSize(IMPLICIT_PRECOMP_GEMM)",
                plan.d.workspace_size(self.handle, RESIDUAL_ALGO, &mut plan.workspace),
            )?;
        }
        Ok(plan)
    }

    /// y = conv(x, w) + z + bias in one cudnnConvolutionBiasActivationForward call: the
    /// convolution accumulated in fp32, z and the bias added before the one rounding to the dtype.
    /// x, w, z, bias, y are device addresses (NHWC / KRSC, z as y, bias [K]). Ok(false) where cuDNN
    /// refuses the fused form for `s` (`residual_ready`) or the call returns any status but
    /// success: then nothing may be assumed of y, the refusal is remembered, and the caller
    /// computes y by the plain convolution and the residual pass. Errors are for what the caller
    /// must hear (a workspace that may not grow under a CUDA graph capture).
    pub fn conv2d_residual(&mut self, s: &ConvShape, x: u64, w: u64, z: u64, bias: u64, y: u64) -> Result<bool> {
        if !self.residual_ready(s)? {
            return Ok(false);
        }
        let need = self.residual[s].workspace;
        let ws = if need > 0 { self.workspace_of(need)? } else { 0 };
        let plan = &self.residual[s];
        // Scaling factors are float for every configuration but the double one (cuDNN's rule for
        // alpha and beta), here alpha1 (the convolution) and alpha2 (z).
        let (alpha1, alpha2) = (1.0f32, 1.0f32);
        let status = unsafe {
            dnn::cudnnConvolutionBiasActivationForward(
                self.handle,
                &alpha1 as *const f32 as *const c_void,
                plan.d.x,
                x as *const c_void,
                plan.d.w,
                w as *const c_void,
                plan.d.conv,
                RESIDUAL_ALGO,
                ws as *mut c_void,
                need,
                &alpha2 as *const f32 as *const c_void,
                plan.d.y,
                z as *const c_void,
                plan.bias,
                bias as *const c_void,
                plan.act,
                plan.d.y,
                y as *mut c_void,
            )
        };
        if status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
            return Ok(true);
        }
        self.refuse(s, &format!("cudnnConvolutionBiasActivationForward: {status:?}"));
        Ok(false)
    }
}

impl Drop for Dnn {
    fn drop(&mut self) {
        // The plans' descriptors go first, then the handle.
        self.residual.clear();
        self.plans.clear();
        unsafe { dnn::cudnnDestroy(self.handle) };
    }
}
