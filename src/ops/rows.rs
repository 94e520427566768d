//! Moving a batch's rows (its first dimension): placing them into a larger zero batch (the
//! residuals of a ControlNet run only on the frames that have a hint go back to their rows of the
//! UNet's batch, the other rows zero), and picking rows, repeats allowed (a batch of embedded hint
//! images built from the distinct ones). Copies of whole rows, so CPU and CUDA results are
//! bit-identical.

use super::Exec;
use crate::error::{Error, Result};
use crate::tensor::{HostBytes, Storage, Tensor};

/// `src` [n, ...] -> [rows, ...] with row `to[i]` = `src` row i and every other row zero. `to` is
/// strictly increasing and below `rows`.
pub fn scatter_rows(ex: &Exec, src: &Tensor, to: &[usize], rows: usize) -> Result<Tensor> {
    ex.expect_inputs("scatter_rows", &[src])?;
    let (&n, inner) = src.shape().split_first().ok_or_else(|| Error::Input(format!("scatter_rows: {src:?} is 0-d")))?;
    if to.len() != n || to.windows(2).any(|w| w[0] >= w[1]) || to.last().is_some_and(|&r| r >= rows) {
        return Err(Error::Input(format!(
            "scatter_rows: {n} rows of {src:?} to rows {to:?} of {rows}: one strictly increasing target below {rows} each"
        )));
    }
    let mut shape = vec![rows];
    shape.extend_from_slice(inner);
    let row_bytes = inner.iter().product::<usize>() * src.dtype().size();
    match ex {
        Exec::Cpu => {
            let bytes = src.host_bytes()?;
            let mut out = vec![0u8; rows * row_bytes];
            for (i, &r) in to.iter().enumerate() {
                out[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&bytes[i * row_bytes..(i + 1) * row_bytes]);
            }
            Tensor::from_storage(&shape, src.dtype(), Storage::Host(HostBytes::Owned(out.into())))
        }
        Exec::Cuda { gpu, scratch } => {
            let out = gpu.empty(scratch, &shape, src.dtype())?;
            let Storage::Device(mem) = out.storage() else {
                return Err(Error::Internal("scatter_rows: a device tensor without device memory".into()));
            };
            gpu.fill_bytes(mem, 0)?;
            // One copy per run of consecutive target rows.
            let mut i = 0;
            while i < to.len() {
                let mut j = i + 1;
                while j < to.len() && to[j] == to[j - 1] + 1 {
                    j += 1;
                }
                gpu.copy_bytes(&out, to[i] * row_bytes, src, i * row_bytes, (j - i) * row_bytes)?;
                i = j;
            }
            Ok(out)
        }
    }
}

/// `src` [n, ...] -> [from.len(), ...] with row i = `src` row `from[i]` (any order, repeats
/// allowed).
pub fn gather_rows(ex: &Exec, src: &Tensor, from: &[usize]) -> Result<Tensor> {
    ex.expect_inputs("gather_rows", &[src])?;
    let (&n, inner) = src.shape().split_first().ok_or_else(|| Error::Input(format!("gather_rows: {src:?} is 0-d")))?;
    if let Some(bad) = from.iter().find(|&&r| r >= n) {
        return Err(Error::Input(format!("gather_rows: row {bad} of {src:?}, which has {n}")));
    }
    let mut shape = vec![from.len()];
    shape.extend_from_slice(inner);
    let row_bytes = inner.iter().product::<usize>() * src.dtype().size();
    match ex {
        Exec::Cpu => {
            let bytes = src.host_bytes()?;
            let out: Vec<u8> =
                from.iter().flat_map(|&r| bytes[r * row_bytes..(r + 1) * row_bytes].iter().copied()).collect();
            Tensor::from_storage(&shape, src.dtype(), Storage::Host(HostBytes::Owned(out.into())))
        }
        Exec::Cuda { gpu, scratch } => {
            let out = gpu.empty(scratch, &shape, src.dtype())?;
            // One copy per run of consecutive source rows.
            let mut i = 0;
            while i < from.len() {
                let mut j = i + 1;
                while j < from.len() && from[j] == from[j - 1] + 1 {
                    j += 1;
                }
                gpu.copy_bytes(&out, i * row_bytes, src, from[i] * row_bytes, (j - i) * row_bytes)?;
                i = j;
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn rows_land_at_their_targets_and_the_rest_is_zero() {
        let src = Tensor::from_f32(&[3, 2, 2], DType::F16, &(1..=12).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let out = scatter_rows(&Exec::Cpu, &src, &[0, 2, 3], 5).unwrap();
        assert_eq!(out.shape(), &[5, 2, 2]);
        let v = out.to_f32_vec().unwrap();
        let want: Vec<f32> =
            [1., 2., 3., 4., 0., 0., 0., 0., 5., 6., 7., 8., 9., 10., 11., 12., 0., 0., 0., 0.].to_vec();
        assert_eq!(v, want);
        for bad in [&[0, 0, 1][..], &[2, 1, 3], &[0, 1, 5], &[0, 1]] {
            assert!(matches!(scatter_rows(&Exec::Cpu, &src, bad, 5), Err(Error::Input(_))), "{bad:?}");
        }
    }

    #[test]
    fn gathered_rows_are_the_named_source_rows() {
        let src = Tensor::from_f32(&[3, 2], DType::F16, &[1., 2., 3., 4., 5., 6.]).unwrap();
        let out = gather_rows(&Exec::Cpu, &src, &[2, 0, 0, 1, 2]).unwrap();
        assert_eq!(out.shape(), &[5, 2]);
        assert_eq!(out.to_f32_vec().unwrap(), [5., 6., 1., 2., 1., 2., 3., 4., 5., 6.]);
        assert!(matches!(gather_rows(&Exec::Cpu, &src, &[0, 3]), Err(Error::Input(_))));
    }
}
