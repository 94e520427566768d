//! Concatenation along the last dimension: the UNet's skip connections (`[x, skip]` on the channels
//! of NHWC activations) and the pooled text embedding beside the time-id embedding.

use super::{Exec, grid_for, same_dtype};
use crate::error::{Error, Result};
use crate::gpu::params::ConcatParams;
use crate::tensor::{HostBytes, Storage, Tensor};

/// [..., Ca] and [..., Cb] with the same leading dimensions -> [..., Ca + Cb], a first.
pub fn concat_last(ex: &Exec, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ex.expect_inputs("concat_last", &[a, b])?;
    let dtype = same_dtype("concat_last", &[a, b])?;
    let (sa, sb) = (a.shape(), b.shape());
    let (Some((&ca, lead_a)), Some((&cb, lead_b))) = (sa.split_last(), sb.split_last()) else {
        return Err(Error::Input(format!("concat_last: {a:?} and {b:?} need at least one dimension")));
    };
    if lead_a != lead_b {
        return Err(Error::Input(format!("concat_last: {a:?} and {b:?} differ before the last dimension")));
    }
    let rows: usize = lead_a.iter().product();
    let mut shape = lead_a.to_vec();
    shape.push(ca + cb);
    match ex {
        Exec::Cpu => {
            // A copy of whole rows: exact, so the twin works on the bytes.
            let (ab, bb, es) = (a.host_bytes()?, b.host_bytes()?, dtype.size());
            let mut out = Vec::with_capacity(ab.len() + bb.len());
            for r in 0..rows {
                out.extend_from_slice(&ab[r * ca * es..(r + 1) * ca * es]);
                out.extend_from_slice(&bb[r * cb * es..(r + 1) * cb * es]);
            }
            Tensor::from_storage(&shape, dtype, Storage::Host(HostBytes::Owned(out.into())))
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, &shape, dtype)?;
            let p = ConcatParams {
                a: a.device_ptr()? as *const _,
                b: b.device_ptr()? as *const _,
                out: y.device_ptr()? as *mut _,
                rows: rows as i64,
                a_cols: ca as i64,
                b_cols: cb as i64,
            };
            let vector = 16 / dtype.size();
            let work = if ca % vector == 0 && cb % vector == 0 { y.numel() / vector } else { y.numel() };
            gpu.launch(kernel_for!("concat_last", dtype), (grid_for(work, 256), 1, 1), (256, 1, 1), 0, &p)?;
            Ok(y)
        }
    }
}
