//! cuBLASLt matrix products: strided-batched D[m, n] = alpha · A[m, k] · op(B) in row-major terms,
//! where B is [n, k] (transposed, the PyTorch linear weight layout) or [k, n]; inputs f16 / bf16 /
//! f32, fp32 accumulation, output in the input dtype or f32, an optional bias[n] and beta · C (C of
//! D's layout, D itself allowed) in the epilogue.
//! Algorithms come from the heuristic once per description and are cached.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::sys as lt;

use super::device::Gpu;
use super::memory::DeviceMem;
use crate::error::{Error, Result};
use crate::tensor::DType;

const WORKSPACE_BYTES: usize = 32 << 20;
// cublasOperation_t values (the cuBLASLt bindings do not carry the enum).
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;

pub struct Blas {
    handle: lt::cublasLtHandle_t,
    workspace: DeviceMem,
    plans: HashMap<Gemm, Plan>,
}

/// One strided-batched product in row-major terms (strides and leading dimensions in elements):
/// for each of `batch` items, C = alpha · A · Bᵀ (`b_transposed`, B stored [n, k]) or A · B (B
/// stored [k, n]), + bias[n] when the call passes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    pub dtype: DType,
    pub out_dtype: DType,
    pub bias: bool,
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
        }
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
}

impl GemmIo {
    /// D = alpha · A · op(B), nothing else.
    pub fn product(a: u64, b: u64, d: u64, alpha: f32) -> GemmIo {
        GemmIo { a, b, d, bias: None, c: None, alpha }
    }
}

struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: [lt::cublasLtMatrixLayout_t; 3], // w, x, y (column-major views)
    algo: lt::cublasLtMatmulAlgo_t,
}

fn check(call: &str, s: lt::cublasStatus_t) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{call} failed: {s:?}")))
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

impl Blas {
    pub fn new() -> Result<Blas> {
        if !unsafe { lt::is_culib_present() } {
            return Err(Error::Cuda("libcublasLt.so (CUDA 13) was not found on the library path".into()));
        }
        let mut handle = std::ptr::null_mut();
        check("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut handle) })?;
        Ok(Blas { handle, workspace: DeviceMem::owned(WORKSPACE_BYTES, "cuBLASLt workspace")?, plans: HashMap::new() })
    }

    fn plan(&mut self, g: &Gemm) -> Result<&Plan> {
        if !self.plans.contains_key(g) {
            let plan = unsafe { self.make_plan(g)? };
            self.plans.insert(*g, plan);
        }
        Ok(&self.plans[g])
    }

    /// cuBLASLt is column-major: a row-major [r, c] matrix is its transpose there. So the call
    /// computes Cᵀ[n, m] = op(B)ᵀ · Aᵀ: cuBLASLt's "A" is our B (transposed by op when B is [n, k]),
    /// its "B" is our A read as k x m.
    unsafe fn make_plan(&self, g: &Gemm) -> Result<Plan> {
        let (dt, out) = (data_type(g.dtype), data_type(g.out_dtype));
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
        let mut pref = std::ptr::null_mut();
        check("cublasLtMatmulPreferenceCreate", unsafe { lt::cublasLtMatmulPreferenceCreate(&mut pref) })?;
        let ws = WORKSPACE_BYTES as u64;
        check("cublasLtMatmulPreferenceSetAttribute", unsafe {
            lt::cublasLtMatmulPreferenceSetAttribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
        })?;
        let mut result: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut found = 0;
        let status = unsafe {
            lt::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                layouts[0],
                layouts[1],
                layouts[2],
                layouts[2],
                pref,
                1,
                &mut result,
                &mut found,
            )
        };
        unsafe { lt::cublasLtMatmulPreferenceDestroy(pref) };
        check("cublasLtMatmulAlgoGetHeuristic", status)?;
        if found == 0 {
            return Err(Error::Cuda(format!("cuBLASLt has no algorithm for {g:?}")));
        }
        Ok(Plan { desc, layouts, algo: result.algo })
    }

    /// Runs `g`: D = alpha · A · op(B) [+ bias] [+ beta · C], on device addresses. C has D's layout
    /// and dtype and may be D itself (an in-place accumulate).
    pub fn gemm(&mut self, gpu: &Gpu, g: &Gemm, io: GemmIo) -> Result<()> {
        if g.bias != io.bias.is_some() {
            return Err(Error::Internal(format!("gemm {g:?} called with bias {:?}", io.bias)));
        }
        let handle = self.handle;
        let (ws_ptr, ws_len) = (self.workspace.ptr()?, self.workspace.bytes());
        let plan = self.plan(g)?;
        if let Some(bias) = io.bias {
            unsafe {
                set_desc(plan.desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?
            };
        }
        let GemmIo { a, b, d, alpha, .. } = io;
        let (c, beta) = io.c.unwrap_or((d, 0.0));
        gpu.profiled("gemm", || {
            check(&format!("cublasLtMatmul ({g:?})"), unsafe {
                lt::cublasLtMatmul(
                    handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    b as *const c_void,
                    plan.layouts[0],
                    a as *const c_void,
                    plan.layouts[1],
                    &beta as *const f32 as *const c_void,
                    c as *const c_void,
                    plan.layouts[2],
                    d as *mut c_void,
                    plan.layouts[2],
                    &plan.algo,
                    ws_ptr as *mut c_void,
                    ws_len,
                    gpu.stream() as lt::cudaStream_t,
                )
            })
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        for (_, p) in self.plans.drain() {
            unsafe {
                lt::cublasLtMatmulDescDestroy(p.desc);
                for l in p.layouts {
                    lt::cublasLtMatrixLayoutDestroy(l);
                }
            }
        }
        unsafe { lt::cublasLtDestroy(self.handle) };
    }
}
