//! Ops: each runs as CUDA kernel(s) or as its CPU reference twin with the same semantics, chosen by
//! the `Exec` it is given, so graph code is written once for both. Twins read inputs widened to
//! f32, accumulate in f32 (statistics in f64) and round the output to its dtype, like the kernels.

/// The kernel of `family` instantiated for a dtype: `kernel_for!("geglu", DType::F16)` is "geglu_f16".
macro_rules! kernel_for {
    ($family:literal, $dtype:expr) => {
        match $dtype {
            $crate::tensor::DType::F16 => concat!($family, "_f16"),
            $crate::tensor::DType::BF16 => concat!($family, "_bf16"),
            $crate::tensor::DType::F32 => concat!($family, "_f32"),
        }
    };
}

pub mod attention;
pub mod concat;
pub mod conv;
pub mod elementwise;
pub mod embedding;
pub mod fp8;
pub mod gather;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod random;
pub mod reduce;
pub mod rgb8;
pub mod rows;
pub mod upsample;

use crate::error::{Error, Result};
use crate::gpu::device::ProfileScope;
use crate::gpu::{Arena, Gpu};
use crate::tensor::{DType, Tensor};
use std::sync::OnceLock;

/// A kernel route chosen by the environment variable `var` for A/B runs and profiling, read once per
/// process into `cell`: `None` where it is unset, else `parse`'s choice for its value (an input error
/// naming the variable and the value where it names no route).
fn env_route<T: Clone>(
    cell: &'static OnceLock<Option<std::result::Result<T, String>>>,
    var: &str,
    parse: fn(&str) -> std::result::Result<T, String>,
) -> Result<Option<T>> {
    let choice = cell.get_or_init(|| std::env::var(var).ok().map(|v| parse(&v)));
    choice.clone().transpose().map_err(Error::Input)
}

/// Where an op runs. CUDA outputs come from the scratch arena.
#[derive(Clone, Copy)]
pub enum Exec<'a> {
    Cpu,
    Cuda { gpu: &'a Gpu, scratch: &'a Arena },
}

impl<'a> Exec<'a> {
    /// Names the model part the ops until the guard drops belong to, for an open GPU profile
    /// (`Gpu::profile_scope`); nothing on the CPU.
    pub fn profile_scope(&self, name: &'static str) -> Option<ProfileScope<'a>> {
        match self {
            Exec::Cpu => None,
            Exec::Cuda { gpu, .. } => Some(gpu.profile_scope(name)),
        }
    }

    /// A small host tensor of fixed values (per-row factors, flags, position rows) placed where
    /// this Exec computes: on CUDA through `Gpu::upload_constant`, so a CUDA graph under capture
    /// bakes the values in (whoever keys the graph keys them).
    pub fn constant(&self, host: Tensor) -> Result<Tensor> {
        match self {
            Exec::Cpu => Ok(host),
            Exec::Cuda { gpu, scratch } => gpu.upload_constant(scratch, &host, host.dtype()),
        }
    }

    /// Checks that every input lives where this Exec computes.
    fn expect_inputs(&self, op: &str, inputs: &[&Tensor]) -> Result<()> {
        let on_device = matches!(self, Exec::Cuda { .. });
        match inputs.iter().find(|t| t.is_device() != on_device) {
            Some(t) => Err(Error::Input(format!(
                "{op}: input {t:?} is on the {} but the op runs on the {}",
                if t.is_device() { "device" } else { "host" },
                if on_device { "device" } else { "host" }
            ))),
            None => Ok(()),
        }
    }
}

/// A host tensor from f32 values rounded to `dtype` (the twins' output path).
fn host_out(shape: &[usize], dtype: DType, values: &[f32]) -> Result<Tensor> {
    Tensor::from_f32(shape, dtype, values)
}

fn same_dtype(op: &str, tensors: &[&Tensor]) -> Result<DType> {
    let d = tensors[0].dtype();
    match tensors.iter().find(|t| t.dtype() != d) {
        Some(t) => Err(Error::Input(format!("{op}: dtype {:?} of {t:?} differs from {d:?}", t.dtype()))),
        None => Ok(d),
    }
}

/// A size passed to a kernel as a 32-bit int, refused (naming the op and the size) when it is larger.
fn kernel_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Unsupported(format!("{op}: {what} = {v} exceeds the kernel's 32-bit limit of {}", i32::MAX))
    })
}

/// A launch grid dimension, refused when above `limit` (2^31 - 1 for x, 65535 for y and z).
fn grid_dim(op: &str, what: &str, v: usize, limit: u32) -> Result<u32> {
    u32::try_from(v).ok().filter(|&g| g <= limit).ok_or_else(|| {
        Error::Unsupported(format!("{op}: {what} = {v} blocks exceed the launch grid's limit of {limit}"))
    })
}

/// Launch grid limits: x, and y / z.
const GRID_X: u32 = i32::MAX as u32;
const GRID_YZ: u32 = 65535;

/// Grid size for a grid-stride loop over `n` work items of `block` threads.
fn grid_for(n: usize, block: u32) -> u32 {
    (n.div_ceil(block as usize)).clamp(1, 65535 * 8) as u32
}

/// `f(0..n)` computed on all cores, in order (the CPU twins' and the tests' splitter).
pub fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.max(1));
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..n)
            .step_by(per)
            .map(|first| {
                let f = &f;
                s.spawn(move || (first..(first + per).min(n)).map(f).collect::<Vec<T>>())
            })
            .collect();
        parts.into_iter().flat_map(|p| p.join().expect("a twin worker panicked")).collect()
    })
}

/// Splits `rows` into contiguous ranges processed on all cores; `f(first_row, out_chunk)` fills the
/// rows' slice of `out` (each row `row_len` values).
pub fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len() / row_len.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.max(1));
    let per = rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * row_len.max(1)).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{GRID_YZ, grid_dim, kernel_i32};
    use crate::error::Error;

    #[test]
    fn kernel_sizes_past_their_limits_are_refused_by_name() {
        assert_eq!(kernel_i32("op", "rows", 5).unwrap(), 5);
        let Err(Error::Unsupported(m)) = kernel_i32("flash_attention", "queries", 1 << 31) else { panic!() };
        assert!(m.contains("flash_attention") && m.contains("queries") && m.contains("2147483647"), "{m}");
        // 1025 images x 64 heads: one past the 65535 rows a grid's y dimension takes.
        assert_eq!(grid_dim("op", "b x h", 65535, GRID_YZ).unwrap(), 65535);
        let Err(Error::Unsupported(m)) = grid_dim("flash_attention", "batch x heads", 1025 * 64, GRID_YZ) else {
            panic!()
        };
        assert!(m.contains("batch x heads = 65600") && m.contains("65535"), "{m}");
    }
}
