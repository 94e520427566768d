//! cuBLASLt matrix products: strided-batched D[m, n] = alpha · A[m, k] · op(B) in row-major terms,
//! where B is [n, k] (transposed, the PyTorch linear weight layout) or [k, n]; inputs f16 / bf16 /
//! f32, fp32 accumulation, output in the input dtype or f32, an optional bias[n] and beta · C (C of
//! D's layout, D itself allowed) in the epilogue.
//!
//! The algorithm per description is cuBLASLt's heuristic #1, made once and cached, unless a tuning
//! file (`gpu::tuning`: `CELFRAME_GEMM_TUNING`, else the built-in one made for this device and
//! cuBLASLt) names another of its candidates; `tune_into` times the candidates of every description
//! met and records the fastest.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};

use cudarc::cublaslt::sys as lt;
use serde::{Deserialize, Serialize};

use super::device::{DeviceInfo, Gpu};
use super::memory::DeviceMem;
use super::timing::time_gpu;
use super::tuning::{AlgoConfig, BuiltIn, CANDIDATES, ENV, Entry, Identity, NONE, Tuning};
use crate::error::{Error, Result};
use crate::tensor::DType;

const WORKSPACE_BYTES: usize = 32 << 20;
// cublasOperation_t values (the cuBLASLt bindings do not carry the enum).
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;
/// Untimed, then timed runs of each candidate when tuning; the median of the timed ones counts.
const TUNE_WARMUP: usize = 3;
const TUNE_RUNS: usize = 10;
/// Milliseconds each candidate runs back to back before it is timed when tuning (default 0): the
/// whole forward runs at the GPU's power cap, where a candidate's time is its energy over the cap,
/// so timings taken at the clock the GPU holds under sustained load rank the candidates as the
/// forward sees them, where a few runs from idle rank them at the boost clock.
const SUSTAIN_ENV: &str = "CELFRAME_GEMM_TUNE_SUSTAIN_MS";
/// A bound on the sustained runs (a candidate, per description met).
const SUSTAIN_MAX_MS: u64 = 10_000;

pub struct Blas {
    handle: lt::cublasLtHandle_t,
    workspace: DeviceMem,
    plans: HashMap<Gemm, Plan>,
    identity: Identity,
    tuning: Option<TuningState>,
}

/// The tuning file in use: read from `CELFRAME_GEMM_TUNING`, built in, or opened by `tune_into`
/// to be extended and written back.
struct TuningState {
    file: Tuning,
    /// The file's path ("built-in NAME" for a built-in one).
    path: PathBuf,
    /// Who named the file, for messages.
    origin: &'static str,
    source: Source,
    /// A description missing from a read file was reported (once per process).
    said_missing: bool,
}

impl TuningState {
    fn tuning(&self) -> bool {
        matches!(self.source, Source::Tune { .. })
    }
}

/// Where a `TuningState`'s choices come from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// A file named by the user (`CELFRAME_GEMM_TUNING`).
    Read,
    /// A built-in file: an entry this cuBLASLt does not list runs heuristic #1 (said once) rather
    /// than failing, and `tune_into` sets it aside.
    BuiltIn,
    /// `tune_into`: descriptions the file lacks are timed and added, each candidate first run
    /// back to back for `sustain_ms` milliseconds (SUSTAIN_ENV).
    Tune { sustain_ms: u64 },
}

/// One strided-batched product in row-major terms (strides and leading dimensions in elements):
/// for each of `batch` items, C = alpha · A · Bᵀ (`b_transposed`, B stored [n, k]) or A · B (B
/// stored [k, n]), + bias[n] when the call passes one. Tuning files key their entries by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub b_transposed: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    #[serde(with = "super::tuning::dtype_name")]
    pub dtype: DType,
    #[serde(with = "super::tuning::dtype_name")]
    pub out_dtype: DType,
    pub bias: bool,
    /// A and B are e4m3 (quantized from `dtype`, `ops::fp8`), each with a per-tensor scale that
    /// the call passes by device pointer (`GemmIo::scales`); D, C and the bias are `out_dtype`.
    #[serde(default)]
    pub fp8: bool,
    /// With `fp8`: the scales are vectors ("outer vectors"), one per row of A (the tokens) and one
    /// per row of B [n, k] (the output channels).
    #[serde(default)]
    pub fp8_rows: bool,
}

impl Gemm {
    /// y[m, n] = x[m, k] · w[n, k]ᵀ, all contiguous.
    pub fn linear(m: usize, n: usize, k: usize, dtype: DType, bias: bool) -> Gemm {
        Gemm {
            m,
            n,
            k,
            batch: 1,
            b_transposed: true,
            lda: k,
            ldb: k,
            ldc: n,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            dtype,
            out_dtype: dtype,
            bias,
            fp8: false,
            fp8_rows: false,
        }
    }

    /// Its kind in a `bench --breakdown` profile: FP8 GEMMs apart from the 16-bit ones; with
    /// `by_shape` (`--breakdown-gemms`), its description too and whether the call adds a
    /// residual (`residual`: C given).
    fn profile_kind(&self, by_shape: bool, residual: bool) -> String {
        let kind = if self.fp8 { "gemm fp8" } else { "gemm" };
        if !by_shape {
            return kind.to_string();
        }
        let batch = if self.batch > 1 { format!(" batch {}", self.batch) } else { String::new() };
        let bias = if self.bias { " +bias" } else { "" };
        let residual = if residual { " +C" } else { "" };
        format!("{kind} m{} n{} k{}{batch}{bias}{residual}", self.m, self.n, self.k)
    }

    /// Runs `f` (one matmul of this GEMM on `io`), filed under its profile kind and FLOPs while a
    /// profile is open; without one the kind is not built (every GEMM call passes here).
    fn profiled<T>(&self, gpu: &Gpu, io: &GemmIo, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !gpu.is_profiling() {
            return f();
        }
        let kind = self.profile_kind(gpu.profiles_gemm_shapes(), io.c.is_some());
        gpu.profiled_work(&kind, 2.0 * (self.m * self.n * self.k * self.batch) as f64, f)
    }

    /// Elements from D's first to one past its last (the extent a stand-in output must cover).
    fn output_extent(&self) -> usize {
        (self.batch - 1) * self.stride_c + (self.m - 1) * self.ldc + self.n
    }
}

impl std::fmt::Display for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = if self.b_transposed { "B[n,k]" } else { "B[k,n]" };
        write!(
            f,
            "m {} n {} k {} batch {} {b} {}->{} ld {}/{}/{} strides {}/{}/{}{}",
            self.m,
            self.n,
            self.k,
            self.batch,
            match (self.fp8, self.fp8_rows) {
                (true, true) => "e4m3 (row scales)",
                (true, false) => "e4m3",
                _ => self.dtype.kernel_suffix(),
            },
            self.out_dtype.kernel_suffix(),
            self.lda,
            self.ldb,
            self.ldc,
            self.stride_a,
            self.stride_b,
            self.stride_c,
            if self.bias { " bias" } else { "" }
        )
    }
}

/// The device addresses and scalars of one `Blas::gemm` call.
#[derive(Clone, Copy, Debug)]
pub struct GemmIo {
    pub a: u64,
    pub b: u64,
    /// The output.
    pub d: u64,
    /// The bias[n] added in the epilogue (the Gemm's `bias` says whether there is one).
    pub bias: Option<u64>,
    /// C and beta: D += beta · C in the epilogue (a residual add, a weight merge); C may equal D.
    pub c: Option<(u64, f32)>,
    pub alpha: f32,
    /// For an FP8 Gemm: the device addresses of A's and B's f32 scales (D = scale_a · scale_b ·
    /// alpha · A · op(B) + ...; with `fp8_rows`, of A's [m] and B's [n] scales).
    pub scales: Option<(u64, u64)>,
}

impl GemmIo {
    /// D = alpha · A · op(B), nothing else.
    pub fn product(a: u64, b: u64, d: u64, alpha: f32) -> GemmIo {
        GemmIo { a, b, d, bias: None, c: None, alpha, scales: None }
    }
}

struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: [lt::cublasLtMatrixLayout_t; 3], // w, x, y (column-major views)
    /// cuBLASLt's heuristic #1 (asked for alone, as without a tuning file).
    first: lt::cublasLtMatmulAlgo_t,
    /// The tuning file's choice and what it can run. A call it cannot run runs `first`: the
    /// heuristic lists candidates for 256-byte aligned operands without knowing whether C is D, and
    /// a candidate other than #1 may rely on more than the call gives.
    tuned: Option<(lt::cublasLtMatmulAlgo_t, Caps)>,
    /// Calls since the plan was made.
    calls: u64,
}

impl Plan {
    fn algo_for(&self, io: &GemmIo, d: u64) -> &lt::cublasLtMatmulAlgo_t {
        match &self.tuned {
            Some((algo, caps)) if caps.runs(io, d) => algo,
            _ => &self.first,
        }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            lt::cublasLtMatmulDescDestroy(self.desc);
            for l in self.layouts {
                lt::cublasLtMatrixLayoutDestroy(l);
            }
        }
    }
}

/// What an algorithm needs of a call's operands.
#[derive(Clone, Copy)]
struct Caps {
    /// Pointer alignments in bytes for cuBLASLt's A, B, C and D (our B, A, C, D).
    align: [u64; 4],
    /// Whether C may be another buffer than D.
    out_of_place: bool,
}

impl Caps {
    fn of(algo: &lt::cublasLtMatmulAlgo_t) -> Result<Caps> {
        use lt::cublasLtMatmulAlgoCapAttributes_t as A;
        let get = |attr: A| {
            attribute("cublasLtMatmulAlgoCapGetAttribute", |buf, size, written| unsafe {
                lt::cublasLtMatmulAlgoCapGetAttribute(algo, attr, buf, size, written)
            })
        };
        Ok(Caps {
            align: [
                get(A::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_A_BYTES)?,
                get(A::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_B_BYTES)?,
                get(A::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_C_BYTES)?,
                get(A::CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_D_BYTES)?,
            ],
            out_of_place: get(A::CUBLASLT_ALGO_CAP_OUT_OF_PLACE_RESULT_SUPPORT)? != 0,
        })
    }

    /// Whether the algorithm can run `io` with output `d`.
    fn runs(&self, io: &GemmIo, d: u64) -> bool {
        let c = io.c.map_or(d, |(c, _)| c);
        let aligned = [io.b, io.a, c, d].iter().zip(&self.align).all(|(p, a)| p % (*a).max(1) == 0);
        aligned && (c == d || self.out_of_place)
    }
}

/// Whether `Blas::gemm` failed before queueing anything (cuBLASLt refused the call, or its
/// heuristic had no algorithm), so the product can be made another way.
pub fn refused_before_launch(e: &Error) -> bool {
    matches!(e, Error::Refused(_))
}

/// A cuBLASLt status as a result: CUBLAS_STATUS_NOT_SUPPORTED (checked before any launch) is a
/// refusal, any other failure a failed call.
fn check(call: &str, s: lt::cublasStatus_t) -> Result<()> {
    match s {
        lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Err(Error::Refused(format!("{call} failed: {s:?}"))),
        _ => Err(Error::Cuda(format!("{call} failed: {s:?}"))),
    }
}

fn data_type(d: DType) -> lt::cudaDataType {
    match d {
        DType::F16 => lt::cudaDataType::CUDA_R_16F,
        DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
        DType::F32 => lt::cudaDataType::CUDA_R_32F,
    }
}

unsafe fn set_desc<T>(
    desc: lt::cublasLtMatmulDesc_t,
    attr: lt::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    check("cublasLtMatmulDescSetAttribute", unsafe {
        lt::cublasLtMatmulDescSetAttribute(desc, attr, value as *const T as *const c_void, std::mem::size_of::<T>())
    })
}

/// One attribute of an algorithm query whose size varies by attribute (2 to 8 bytes), as u64:
/// `get(buf, size, written)` is cuBLASLt's getter; size 0 asks for the size first.
fn attribute(call: &str, get: impl Fn(*mut c_void, usize, *mut usize) -> lt::cublasStatus_t) -> Result<u64> {
    let mut size = 0usize;
    check(call, get(std::ptr::null_mut(), 0, &mut size))?;
    if size == 0 || size > 8 {
        return Err(Error::Cuda(format!("{call}: an attribute of {size} bytes")));
    }
    let mut buf = [0u8; 8];
    let mut written = 0usize;
    check(call, get(buf.as_mut_ptr() as *mut c_void, size, &mut written))?;
    Ok(u64::from_le_bytes(buf))
}

/// The milliseconds `SUSTAIN_ENV` asks for (0 when unset).
fn sustain_ms(value: Option<&std::ffi::OsStr>) -> Result<u64> {
    let Some(v) = value else { return Ok(0) };
    v.to_str()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms <= SUSTAIN_MAX_MS)
        .ok_or_else(|| Error::Input(format!("{SUSTAIN_ENV}={v:?}: expected whole milliseconds, 0 to {SUSTAIN_MAX_MS}")))
}

/// Runs `f` back to back for `ms` milliseconds (in batches of 16 launches between waits).
fn sustain(gpu: &Gpu, ms: u64, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while std::time::Instant::now() < until {
        for _ in 0..16 {
            f()?;
        }
        gpu.synchronize()?;
    }
    Ok(())
}

/// An algorithm's identity: its configuration attributes.
fn algo_config(algo: &lt::cublasLtMatmulAlgo_t) -> Result<AlgoConfig> {
    use lt::cublasLtMatmulAlgoConfigAttributes_t as A;
    let get = |attr: A| {
        attribute("cublasLtMatmulAlgoConfigGetAttribute", |buf, size, written| unsafe {
            lt::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, buf, size, written)
        })
    };
    Ok(AlgoConfig {
        id: get(A::CUBLASLT_ALGO_CONFIG_ID)?,
        tile: get(A::CUBLASLT_ALGO_CONFIG_TILE_ID)?,
        stages: get(A::CUBLASLT_ALGO_CONFIG_STAGES_ID)?,
        splitk: get(A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM)?,
        reduction: get(A::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME)?,
        swizzle: get(A::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING)?,
        custom: get(A::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION)?,
        inner_shape: get(A::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID)?,
        cluster_shape: get(A::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)?,
    })
}

impl Blas {
    /// The handle and workspace for the device `info` describes, with the tuning file
    /// `CELFRAME_GEMM_TUNING` names, if set (refused when made for another device or cuBLASLt;
    /// `none`: heuristic #1 throughout), else the built-in file made under this identity, if any.
    pub fn new(info: &DeviceInfo) -> Result<Blas> {
        let mut blas = Blas::heuristic_only(info)?;
        match std::env::var_os(ENV).filter(|p| !p.is_empty()) {
            Some(v) if v == NONE => {}
            Some(path) => blas.read_tuning(Path::new(&path), ENV)?,
            None => blas.use_built_in()?,
        }
        Ok(blas)
    }

    /// As `new`, with no tuning file whatever `CELFRAME_GEMM_TUNING` says: heuristic #1 for every
    /// description until `read_tuning` or `tune_into`.
    pub fn heuristic_only(info: &DeviceInfo) -> Result<Blas> {
        if !unsafe { lt::is_culib_present() } {
            return Err(Error::Cuda("libcublasLt.so (CUDA 13) was not found on the library path".into()));
        }
        let mut handle = std::ptr::null_mut();
        check("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut handle) })?;
        let (major, minor) = info.compute_capability;
        let identity = Identity {
            device: info.name.clone(),
            compute_capability: format!("{major}.{minor}"),
            multiprocessors: info.multiprocessors,
            cublaslt_version: unsafe { lt::cublasLtGetVersion() } as u64,
            workspace_bytes: WORKSPACE_BYTES as u64,
            candidates: CANDIDATES,
        };
        Ok(Blas {
            handle,
            workspace: DeviceMem::owned(WORKSPACE_BYTES, "cuBLASLt workspace")?,
            plans: HashMap::new(),
            identity,
            tuning: None,
        })
    }

    /// The built-in tuning file made under this identity, where there is one; a note where files
    /// for this device exist but were made under another cuBLASLt or build.
    fn use_built_in(&mut self) -> Result<()> {
        match Tuning::built_in(&self.identity)? {
            BuiltIn::Applies(name, file) => {
                self.tuning = Some(TuningState {
                    file,
                    path: PathBuf::from(format!("built-in {name}")),
                    origin: "built in",
                    source: Source::BuiltIn,
                    said_missing: false,
                });
            }
            BuiltIn::OtherSetup(why) => eprintln!(
                "note: the built-in GEMM tuning for {} does not apply ({why}); cuBLASLt's heuristic #1 runs every \
                 GEMM (CELFRAME_GEMM_TUNING=FILE from `celframe bench ... --tune-gemms FILE` tunes for this setup)",
                self.identity.device
            ),
            BuiltIn::NoneForDevice => {}
        }
        Ok(())
    }

    /// From now on, descriptions with an entry in the tuning file `path` run its choice (checked
    /// against cuBLASLt's candidates when first met), the others heuristic #1. `origin` says who
    /// named the file, for messages. Refused while tuning.
    pub fn read_tuning(&mut self, path: &Path, origin: &'static str) -> Result<()> {
        if self.tuning.as_ref().is_some_and(TuningState::tuning) {
            return Err(Error::Input(format!("{} ({origin}): cannot read a tuning file while tuning", path.display())));
        }
        let file = Tuning::load(path, &self.identity, origin)?;
        // Descriptions planned before now run heuristic #1: plan them again.
        self.plans.clear();
        self.tuning =
            Some(TuningState { file, path: path.to_path_buf(), origin, source: Source::Read, said_missing: false });
        Ok(())
    }

    /// The device, cuBLASLt version and settings a tuning file made here records.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// From now on, every description met that `path` (read if it exists) has no entry for is
    /// tuned: heuristic #1 and the heuristic's other candidates are timed on the call's own inputs
    /// (into a stand-in output, so the real one, which may be C or alias an input, is written
    /// only by the real call) and the fastest is recorded and used. `save_tuning` writes the file.
    /// A built-in file in use is set aside (heuristic #1 is what tuning compares with).
    pub fn tune_into(&mut self, path: &Path) -> Result<()> {
        if let Some(t) = self.tuning.as_ref().filter(|t| t.source == Source::Read) {
            return Err(Error::Input(format!(
                "--tune-gemms {}: {} names a tuning file to read too ({}); unset it (tuning reads and extends the \
                 file it writes)",
                path.display(),
                t.origin,
                t.path.display()
            )));
        }
        crate::weights::check_save_path(path)?;
        // Refused now rather than when the file is written, after all the timing.
        if let Some(folder) = path.parent().filter(|f| !f.as_os_str().is_empty() && !f.is_dir()) {
            return Err(Error::Input(format!(
                "--tune-gemms {}: the folder {} does not exist",
                path.display(),
                folder.display()
            )));
        }
        let sustain_ms = sustain_ms(std::env::var_os(SUSTAIN_ENV).as_deref())?;
        let file = if path.exists() {
            Tuning::load(path, &self.identity, "--tune-gemms")?
        } else {
            Tuning::new(self.identity.clone())
        };
        // Descriptions planned before now run heuristic #1 untimed: plan them again.
        self.plans.clear();
        self.tuning = Some(TuningState {
            file,
            path: path.to_path_buf(),
            origin: "--tune-gemms",
            source: Source::Tune { sustain_ms },
            said_missing: false,
        });
        Ok(())
    }

    /// Writes the file `tune_into` opened, with every description tuned since; its path, or None
    /// when not tuning.
    pub fn save_tuning(&self) -> Result<Option<&Path>> {
        match &self.tuning {
            Some(t) if t.tuning() => {
                t.file.save(&t.path)?;
                Ok(Some(&t.path))
            }
            _ => Ok(None),
        }
    }

    /// The tuning file in use (read or being written) and its path.
    pub fn tuning(&self) -> Option<(&Path, &Tuning)> {
        self.tuning.as_ref().map(|t| (t.path.as_path(), &t.file))
    }

    /// The workspace every matmul runs with.
    pub fn workspace(&self) -> &DeviceMem {
        &self.workspace
    }

    /// Each description planned so far and how many calls ran it.
    pub fn calls(&self) -> Vec<(Gemm, u64)> {
        self.plans.iter().map(|(g, p)| (*g, p.calls)).collect()
    }

    /// Runs `g`: D = alpha · A · op(B) [+ bias] [+ beta · C], on device addresses. C has D's layout
    /// and dtype and may be D itself (an in-place accumulate).
    pub fn gemm(&mut self, gpu: &Gpu, g: &Gemm, io: GemmIo) -> Result<()> {
        if g.bias != io.bias.is_some() || g.fp8 != io.scales.is_some() {
            return Err(Error::Internal(format!("gemm {g:?} called with bias {:?}, scales {:?}", io.bias, io.scales)));
        }
        if !self.plans.contains_key(g) {
            let plan = self.make_plan(gpu, g, &io)?;
            self.plans.insert(*g, plan);
        }
        let plan = self.plans.get_mut(g).ok_or_else(|| Error::Internal(format!("gemm {g}: no plan")))?;
        plan.calls += 1;
        let (first_call, plan) = (plan.calls == 1, &self.plans[g]);
        let algo = plan.algo_for(&io, io.d);
        let result = g.profiled(gpu, &io, || self.matmul(gpu, g, plan, algo, &io, io.d));
        match result {
            Err(Error::Refused(e)) if first_call => {
                if self.first_runnable(gpu, g, &io)? {
                    Ok(())
                } else {
                    Err(Error::Refused(e))
                }
            }
            r => r,
        }
    }

    /// A plan's first call refused (CUBLAS_STATUS_NOT_SUPPORTED: checked before any launch, so
    /// nothing ran): the heuristic's further candidates in order, the first that runs kept as the
    /// plan's algorithm (true; false when none runs). Meant for FP8 operands, whose heuristic #1
    /// the H200 refused.
    fn first_runnable(&mut self, gpu: &Gpu, g: &Gemm, io: &GemmIo) -> Result<bool> {
        let plan = &self.plans[g];
        for (i, candidate) in self.heuristic(g, plan, CANDIDATES)?.iter().enumerate().skip(1) {
            if g.profiled(gpu, io, || self.matmul(gpu, g, plan, &candidate.algo, io, io.d)).is_ok() {
                eprintln!("gemm {g}: cuBLASLt refused its heuristic #1; candidate #{} runs", i + 1);
                let algo = candidate.algo;
                if let Some(plan) = self.plans.get_mut(g) {
                    plan.first = algo;
                    plan.tuned = None;
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Queues one cublasLtMatmul of `plan` with `algo`, writing `d` (io.d, or a stand-in output
    /// when timing); C is io's, or `d` itself with beta 0.
    fn matmul(
        &self,
        gpu: &Gpu,
        g: &Gemm,
        plan: &Plan,
        algo: &lt::cublasLtMatmulAlgo_t,
        io: &GemmIo,
        d: u64,
    ) -> Result<()> {
        Self::set_pointers(plan, io)?;
        let (c, beta) = io.c.unwrap_or((d, 0.0));
        check(&format!("cublasLtMatmul ({g:?})"), unsafe {
            lt::cublasLtMatmul(
                self.handle,
                plan.desc,
                &io.alpha as *const f32 as *const c_void,
                io.b as *const c_void,
                plan.layouts[0],
                io.a as *const c_void,
                plan.layouts[1],
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                plan.layouts[2],
                d as *mut c_void,
                plan.layouts[2],
                algo,
                self.workspace.ptr()? as *mut c_void,
                self.workspace.bytes(),
                gpu.stream() as lt::cudaStream_t,
            )
        })
    }

    /// The call's bias and scale pointers on the plan's description.
    fn set_pointers(plan: &Plan, io: &GemmIo) -> Result<()> {
        use lt::cublasLtMatmulDescAttributes_t as D;
        if let Some(bias) = io.bias {
            unsafe { set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)? };
        }
        // cuBLASLt's A is our B (the weight) and its B our A (the activations).
        if let Some((scale_a, scale_b)) = io.scales {
            unsafe {
                set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scale_b)?;
                set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scale_a)?;
            }
        }
        Ok(())
    }

    /// The plan of a description met for the first time: heuristic #1, and the tuning file's
    /// choice where it has one (timed and added first when tuning).
    fn make_plan(&mut self, gpu: &Gpu, g: &Gemm, io: &GemmIo) -> Result<Plan> {
        let (desc, layouts) = unsafe { self.describe(g)? };
        let mut plan = Plan { desc, layouts, first: unsafe { std::mem::zeroed() }, tuned: None, calls: 0 };
        // The heuristic sees the description as the calls will use it, this first call's bias and
        // scale pointers set (as NVIDIA's LtFp8Matmul sample does for FP8).
        Self::set_pointers(&plan, io)?;
        plan.first = self.heuristic(g, &plan, 1)?[0].algo;
        let entry = self.tuning.as_ref().and_then(|t| t.file.get(g).cloned());
        let tuning = self.tuning.as_ref().is_some_and(TuningState::tuning);
        let built_in = self.tuning.as_ref().is_some_and(|t| t.source == Source::BuiltIn);
        let chosen = match entry {
            Some(e) => match self.recall(g, &plan, &e) {
                Ok(algo) => Some(algo),
                // A built-in file cannot be tuned again by its user: its stale entries give way.
                Err(Error::Input(why)) if built_in => {
                    self.note_missing(&format!("{why}; heuristic #1 runs it"));
                    None
                }
                Err(e) => return Err(e),
            },
            None if tuning => {
                gpu.refuse_while_capturing(&format!("GEMM tuning of {g}"))?;
                let tuned = self.tune(gpu, g, &plan, io)?;
                tuned.map(|(e, algo)| {
                    if let Some(t) = self.tuning.as_mut() {
                        t.file.insert(e);
                    }
                    algo
                })
            }
            None => {
                // A built-in file covers the sizes it was tuned at; other sizes run the heuristic
                // unremarked, as without tuning.
                if let Some(t) = self.tuning.as_ref().filter(|t| t.source != Source::BuiltIn) {
                    let what = format!("{} ({}) has no entry for gemm {g}", t.path.display(), t.origin);
                    self.note_missing(&format!("{what}; it runs cuBLASLt's heuristic #1"));
                }
                None
            }
        };
        plan.tuned = chosen.map(|algo| Ok::<_, Error>((algo, Caps::of(&algo)?))).transpose()?;
        Ok(plan)
    }

    /// Says `what` on stderr, once per process: later descriptions the file lacks or cannot run
    /// are left unsaid.
    fn note_missing(&mut self, what: &str) {
        if let Some(t) = self.tuning.as_mut().filter(|t| !t.said_missing) {
            eprintln!(
                "note: {what}, as does any other description the file lacks or names a candidate missing for (said once)"
            );
            t.said_missing = true;
        }
    }

    /// The candidate `e` records, checked to be the one the file describes.
    fn recall(&self, g: &Gemm, plan: &Plan, e: &Entry) -> Result<lt::cublasLtMatmulAlgo_t> {
        let results = self.heuristic(g, plan, CANDIDATES)?;
        let found = results.get(e.index).filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        let config = found.map(|r| algo_config(&r.algo)).transpose()?;
        match (found, config) {
            (Some(r), Some(c)) if c == e.algo => Ok(r.algo),
            (_, c) => {
                let (path, origin) =
                    self.tuning.as_ref().map_or(("?".into(), ""), |t| (t.path.display().to_string(), t.origin));
                Err(Error::Input(format!(
                    "{path} ({origin}): the entry for gemm {g} chose candidate {} = {:?}, but cuBLASLt lists {} there: \
                     the file does not describe this cuBLASLt's candidates; tune again",
                    e.index,
                    e.algo,
                    c.map_or("no usable candidate".to_string(), |c| format!("{c:?}"))
                )))
            }
        }
    }

    /// Times the heuristic's candidates for `g` on `io`'s inputs into a stand-in output (the real
    /// one may be C or alias an input, and is written only by the real call) and returns the entry
    /// for the fastest (heuristic #1 on ties) and its algorithm; None where heuristic #1 cannot run.
    fn tune(&self, gpu: &Gpu, g: &Gemm, plan: &Plan, io: &GemmIo) -> Result<Option<(Entry, lt::cublasLtMatmulAlgo_t)>> {
        let sustain_ms = match self.tuning.as_ref().map(|t| t.source) {
            Some(Source::Tune { sustain_ms }) => sustain_ms,
            _ => 0,
        };
        let results = self.heuristic(g, plan, CANDIDATES)?;
        let out =
            DeviceMem::owned(g.output_extent() * g.out_dtype.size(), "the output GEMM candidates are timed into")?;
        let d = out.ptr()?;
        // An in-place call (C = D) stays in place, on the stand-in: the candidates run with the
        // real call's aliasing.
        let io = &GemmIo { c: io.c.map(|(c, beta)| (if c == io.d { d } else { c }, beta)), d, ..*io };
        let mut times: Vec<(usize, f64)> = Vec::new();
        for (i, r) in results.iter().enumerate() {
            if r.state != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS || !Caps::of(&r.algo)?.runs(io, d) {
                continue;
            }
            let run = || self.matmul(gpu, g, plan, &r.algo, io, d);
            match sustain(gpu, sustain_ms, run).and_then(|()| time_gpu(gpu, TUNE_WARMUP, TUNE_RUNS, run)) {
                Ok(t) => times.push((i, t.median_ms())),
                Err(e) if i == 0 => return Err(e),
                // A candidate cuBLASLt will not run on these operands is left out.
                Err(_) => gpu.synchronize()?,
            }
        }
        let Some(&(0, heuristic_ms)) = times.first() else {
            // Nothing to compare with: left to heuristic #1, untuned, as a reader of the file will.
            eprintln!("note: gemm {g}: heuristic #1 cannot run on the stand-in output; not tuned");
            return Ok(None);
        };
        let (index, tuned_ms) =
            times.iter().copied().fold((0, heuristic_ms), |best, t| if t.1 < best.1 { t } else { best });
        let algo = results[index].algo;
        let entry = Entry { gemm: *g, index, algo: algo_config(&algo)?, heuristic_ms, tuned_ms, timed: times.len() };
        eprintln!(
            "tuned gemm {g}: heuristic #1 {heuristic_ms:.4} ms, candidate {index} {tuned_ms:.4} ms ({:.2}x), {} of {} \
             candidates timed",
            entry.speedup(),
            times.len(),
            results.len()
        );
        Ok(Some((entry, algo)))
    }

    /// The heuristic's first `count` candidates for `plan` (at least one).
    fn heuristic(&self, g: &Gemm, plan: &Plan, count: usize) -> Result<Vec<lt::cublasLtMatmulHeuristicResult_t>> {
        let mut pref = std::ptr::null_mut();
        check("cublasLtMatmulPreferenceCreate", unsafe { lt::cublasLtMatmulPreferenceCreate(&mut pref) })?;
        let ws = WORKSPACE_BYTES as u64;
        let mut results: Vec<lt::cublasLtMatmulHeuristicResult_t> = vec![unsafe { std::mem::zeroed() }; count];
        let mut found = 0;
        let status = unsafe {
            let set = lt::cublasLtMatmulPreferenceSetAttribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            );
            let status = if set == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                lt::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                    count as i32,
                    results.as_mut_ptr(),
                    &mut found,
                )
            } else {
                set
            };
            lt::cublasLtMatmulPreferenceDestroy(pref);
            status
        };
        check("cublasLtMatmulAlgoGetHeuristic", status)?;
        if found <= 0 {
            return Err(Error::Refused(format!("cuBLASLt has no algorithm for {g:?}")));
        }
        results.truncate(found as usize);
        Ok(results)
    }

    /// cuBLASLt is column-major: a row-major [r, c] matrix is its transpose there. So the call
    /// computes Cᵀ[n, m] = op(B)ᵀ · Aᵀ: cuBLASLt's "A" is our B (transposed by op when B is [n, k]),
    /// its "B" is our A read as k x m.
    ///
    /// FP8 operands need this "TN" form (cuBLASLt's A transposed, B not): our B must be [n, k].
    unsafe fn describe(&self, g: &Gemm) -> Result<(lt::cublasLtMatmulDesc_t, [lt::cublasLtMatrixLayout_t; 3])> {
        if g.fp8 && (!g.b_transposed || g.dtype == DType::F32) || g.fp8_rows && (!g.fp8 || g.batch > 1) {
            return Err(Error::Internal(format!(
                "gemm {g}: FP8 operands need B[n,k] and a 16-bit output, row scales one product"
            )));
        }
        let dt = if g.fp8 { lt::cudaDataType::CUDA_R_8F_E4M3 } else { data_type(g.dtype) };
        let out = data_type(g.out_dtype);
        let compute = if g.dtype == DType::F32 {
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
        } else {
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let mut desc = std::ptr::null_mut();
        check("cublasLtMatmulDescCreate", unsafe {
            lt::cublasLtMatmulDescCreate(&mut desc, compute, lt::cudaDataType::CUDA_R_32F)
        })?;
        let op_b = if g.b_transposed { CUBLAS_OP_T } else { CUBLAS_OP_N };
        unsafe {
            set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op_b)?;
            set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &CUBLAS_OP_N)?;
            if g.bias {
                set_desc(
                    desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                )?;
                set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out)?;
            }
            if g.fp8 {
                // Hopper's FP8 MMAs accumulate in fp32 either way; "fast" skips the periodic
                // promotion to a separate fp32 accumulator, as inference (and TransformerEngine's
                // forward pass) runs it: a precision cost measured with the rest of FP8's.
                set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
            }
            if g.fp8_rows {
                // Row scales of our A (tokens) are cuBLASLt's B column scales, of our B (output
                // channels) its A row scales: "outer vectors" of [n] and [m] in its terms.
                let outer = lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
                set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
                set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
            }
        }
        let layout = |dt, rows: usize, cols: usize, ld: usize, stride: usize| -> Result<lt::cublasLtMatrixLayout_t> {
            let mut l = std::ptr::null_mut();
            check("cublasLtMatrixLayoutCreate", unsafe {
                lt::cublasLtMatrixLayoutCreate(&mut l, dt, rows as u64, cols as u64, ld as i64)
            })?;
            if g.batch > 1 {
                let (count, offset) = (g.batch as i32, stride as i64);
                for (attr, value, size) in [
                    (
                        lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        4,
                    ),
                    (
                        lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &offset as *const i64 as *const c_void,
                        8,
                    ),
                ] {
                    check("cublasLtMatrixLayoutSetAttribute", unsafe {
                        lt::cublasLtMatrixLayoutSetAttribute(l, attr, value, size)
                    })?;
                }
            }
            Ok(l)
        };
        let b_layout = if g.b_transposed {
            layout(dt, g.k, g.n, g.ldb, g.stride_b)?
        } else {
            layout(dt, g.n, g.k, g.ldb, g.stride_b)?
        };
        let layouts = [b_layout, layout(dt, g.k, g.m, g.lda, g.stride_a)?, layout(out, g.n, g.m, g.ldc, g.stride_c)?];
        Ok((desc, layouts))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // Plans hold descriptors of this handle: they go first.
        self.plans.clear();
        unsafe { lt::cublasLtDestroy(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_before_launch_are_told_from_other_failures() {
        let refused = check("cublasLtMatmul", lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED).unwrap_err();
        assert!(refused_before_launch(&refused), "{refused}");
        let none = Error::Refused("cuBLASLt has no algorithm for m 16 n 640 k 640".into());
        assert!(refused_before_launch(&none.with_prefix("linear: ")));
        assert_eq!(refused.exit_code(), 4);
        let failed = check("cublasLtMatmul", lt::cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED).unwrap_err();
        assert!(!refused_before_launch(&failed), "{failed}");
        assert!(!refused_before_launch(&Error::Unsupported("CUBLAS_STATUS_NOT_SUPPORTED".into())));
    }

    #[test]
    fn the_sustained_runs_take_whole_bounded_milliseconds() {
        use std::ffi::OsStr;
        assert_eq!(sustain_ms(None).unwrap(), 0);
        assert_eq!(sustain_ms(Some(OsStr::new("150"))).unwrap(), 150);
        for bad in ["", "-1", "1.5", "100ms", "10001"] {
            let e = sustain_ms(Some(OsStr::new(bad))).unwrap_err();
            assert!(e.to_string().contains(SUSTAIN_ENV), "{bad:?}: {e}");
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}
