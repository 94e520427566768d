//! cuDNN convolutions in NHWC (weights KRSC: [out, kh, kw, in]), fp32 accumulation, tensor-core
//! math allowed. The algorithm per shape is found once by cuDNN's own timing
//! (cudnnFindConvolutionForwardAlgorithmEx): the fastest deterministic one (the fastest of all only
//! where none is). Timings vary between runs, so two processes could pick different algorithms and
//! round differently; the choice is kept on disk per device and cuDNN version (`AlgoCache`), so
//! every later process runs the same algorithms and gives bit-identical outputs. Within a process
//! the choices are shared by every thread's `Dnn` (the device threads of a split render,
//! `pipeline::devices`), and a search runs under a lock, so two devices never run one shape with
//! different algorithms.

use std::collections::HashMap;
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
}

struct Plan {
    x: dnn::cudnnTensorDescriptor_t,
    w: dnn::cudnnFilterDescriptor_t,
    y: dnn::cudnnTensorDescriptor_t,
    conv: dnn::cudnnConvolutionDescriptor_t,
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

pub struct Dnn {
    handle: dnn::cudnnHandle_t,
    /// The compute stream the handle is bound to (checked for a CUDA graph capture under way).
    stream: cudarc::driver::sys::CUstream,
    plans: HashMap<ConvShape, Plan>,
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
        Ok(Dnn {
            handle,
            stream: gpu.stream(),
            plans: HashMap::new(),
            workspace: None,
            algos: AlgoCache::open(&gpu.info().name),
        })
    }

    unsafe fn make_plan(&mut self, s: &ConvShape, x: u64, w: u64, y: u64) -> Result<Plan> {
        let dt = data_type(s.dtype);
        let nhwc = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let (oh, ow) = s.out_hw();
        let i = |v: usize| v as i32;
        let mut plan = Plan {
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            algo: dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            workspace: 0,
        };
        unsafe {
            check("cudnnCreateTensorDescriptor", dnn::cudnnCreateTensorDescriptor(&mut plan.x))?;
            check("cudnnCreateTensorDescriptor", dnn::cudnnCreateTensorDescriptor(&mut plan.y))?;
            check("cudnnCreateFilterDescriptor", dnn::cudnnCreateFilterDescriptor(&mut plan.w))?;
            check("cudnnCreateConvolutionDescriptor", dnn::cudnnCreateConvolutionDescriptor(&mut plan.conv))?;
            check(
                "cudnnSetTensor4dDescriptor(x)",
                dnn::cudnnSetTensor4dDescriptor(
                    plan.x,
                    nhwc,
                    dt,
                    i(s.batch),
                    i(s.in_channels),
                    i(s.height),
                    i(s.width),
                ),
            )?;
            check(
                "cudnnSetTensor4dDescriptor(y)",
                dnn::cudnnSetTensor4dDescriptor(plan.y, nhwc, dt, i(s.batch), i(s.out_channels), i(oh), i(ow)),
            )?;
            check(
                "cudnnSetFilter4dDescriptor",
                dnn::cudnnSetFilter4dDescriptor(
                    plan.w,
                    dt,
                    nhwc,
                    i(s.out_channels),
                    i(s.in_channels),
                    i(s.kernel),
                    i(s.kernel),
                ),
            )?;
            let compute = dnn::cudnnDataType_t::CUDNN_DATA_FLOAT;
            check(
                "cudnnSetConvolution2dDescriptor",
                dnn::cudnnSetConvolution2dDescriptor(
                    plan.conv,
                    i(s.padding),
                    i(s.padding),
                    i(s.stride),
                    i(s.stride),
                    1,
                    1,
                    dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    compute,
                ),
            )?;
            let math = if s.dtype == DType::F32 {
                dnn::cudnnMathType_t::CUDNN_FMA_MATH
            } else {
                dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            };
            check("cudnnSetConvolutionMathType", dnn::cudnnSetConvolutionMathType(plan.conv, math))?;
        }
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
                plan.x,
                x as *const c_void,
                plan.w,
                w as *const c_void,
                plan.conv,
                plan.y,
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
            check("cudnnSetConvolutionMathType", dnn::cudnnSetConvolutionMathType(plan.conv, choice.math))?;
            check("cudnnGetConvolutionForwardWorkspaceSize", {
                dnn::cudnnGetConvolutionForwardWorkspaceSize(
                    self.handle,
                    plan.x,
                    plan.w,
                    plan.conv,
                    plan.y,
                    choice.algo,
                    &mut plan.workspace,
                )
            })
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
                plan.x,
                x as *const c_void,
                plan.w,
                w as *const c_void,
                plan.conv,
                plan.algo,
                ws as *mut c_void,
                need,
                &beta as *const f32 as *const c_void,
                plan.y,
                y as *mut c_void,
            )
        })
    }
}

impl Drop for Dnn {
    fn drop(&mut self) {
        for (_, p) in self.plans.drain() {
            unsafe {
                dnn::cudnnDestroyTensorDescriptor(p.x);
                dnn::cudnnDestroyTensorDescriptor(p.y);
                dnn::cudnnDestroyFilterDescriptor(p.w);
                dnn::cudnnDestroyConvolutionDescriptor(p.conv);
            }
        }
        unsafe { dnn::cudnnDestroy(self.handle) };
    }
}
