//! cuBLASLt matrix products for the linear op: y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N]), inputs
//! f16 / bf16 / f32, fp32 accumulation, the bias added in the epilogue. Algorithms come from the
//! heuristic once per shape and are cached.

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
    plans: HashMap<(usize, usize, usize, DType, bool), Plan>,
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

    fn plan(&mut self, m: usize, n: usize, k: usize, dtype: DType, bias: bool) -> Result<&Plan> {
        let key = (m, n, k, dtype, bias);
        if !self.plans.contains_key(&key) {
            let plan = unsafe { self.make_plan(m, n, k, dtype, bias)? };
            self.plans.insert(key, plan);
        }
        Ok(&self.plans[&key])
    }

    /// Column-major view: y_cm[N, M] = op(w_cm)[N, K] · x_cm[K, M], with w_cm = w stored [N, K]
    /// row-major read as K x N (transposed by op), x_cm = x row-major read as K x M.
    unsafe fn make_plan(&self, m: usize, n: usize, k: usize, dtype: DType, bias: bool) -> Result<Plan> {
        let dt = data_type(dtype);
        let compute = if dtype == DType::F32 {
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
        } else {
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let mut desc = std::ptr::null_mut();
        check("cublasLtMatmulDescCreate", unsafe {
            lt::cublasLtMatmulDescCreate(&mut desc, compute, lt::cudaDataType::CUDA_R_32F)
        })?;
        unsafe {
            set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &CUBLAS_OP_T)?;
            set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &CUBLAS_OP_N)?;
            if bias {
                set_desc(
                    desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                )?;
                set_desc(desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt)?;
            }
        }
        let layout = |rows: usize, cols: usize| -> Result<lt::cublasLtMatrixLayout_t> {
            let mut l = std::ptr::null_mut();
            check("cublasLtMatrixLayoutCreate", unsafe {
                lt::cublasLtMatrixLayoutCreate(&mut l, dt, rows as u64, cols as u64, rows as i64)
            })?;
            Ok(l)
        };
        let layouts = [layout(k, n)?, layout(k, m)?, layout(n, m)?];
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
            return Err(Error::Cuda(format!("cuBLASLt has no algorithm for linear M={m} N={n} K={k} {dtype:?}")));
        }
        Ok(Plan { desc, layouts, algo: result.algo })
    }

    /// y = x · wᵀ (+ bias). Pointers are device addresses of row-major x [m, k], w [n, k], y [m, n].
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &mut self,
        gpu: &Gpu,
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        dtype: DType,
    ) -> Result<()> {
        let handle = self.handle;
        let (ws_ptr, ws_len) = (self.workspace.ptr()?, self.workspace.bytes());
        let plan = self.plan(m, n, k, dtype, bias.is_some())?;
        if let Some(b) = bias {
            unsafe { set_desc(plan.desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b)? };
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        check(&format!("cublasLtMatmul (linear M={m} N={n} K={k} {dtype:?})"), unsafe {
            lt::cublasLtMatmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                plan.layouts[0],
                x as *const c_void,
                plan.layouts[1],
                &beta as *const f32 as *const c_void,
                y as *const c_void,
                plan.layouts[2],
                y as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                ws_ptr as *mut c_void,
                ws_len,
                gpu.stream() as lt::cudaStream_t,
            )
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
