//! Random tensors from a [`NoiseStream`] (the generator is described in `sampling::rng`): the
//! tensor's element j, in row-major order, is element offset + j of the stream, so a tensor cut
//! into pieces at any boundaries, drawn with the matching offsets on any device, holds the same
//! values as the whole. The value is computed in f32 as fma(std, z, mean) or
//! fma(high - low, u, low) and rounded once to the output dtype.

use super::{Exec, grid_for, host_out, par_rows};
use crate::error::{Error, Result};
use crate::gpu::params::RandomParams;
use crate::sampling::NoiseStream;
use crate::tensor::{DType, Tensor};

/// Normals with mean `mean` and standard deviation `std`: [`NoiseStream::fill_normal`] scaled.
pub fn random_normal(
    ex: &Exec,
    stream: NoiseStream,
    offset: u64,
    shape: &[usize],
    dtype: DType,
    mean: f32,
    std: f32,
) -> Result<Tensor> {
    if !(mean.is_finite() && std.is_finite() && std >= 0.0) {
        return Err(Error::Input(format!(
            "random_normal: mean {mean} and std {std} must be finite and std not negative"
        )));
    }
    random(ex, Distribution::Normal, stream, offset, shape, dtype, mean, std)
}

/// Uniforms in [low, high] (u in (0, 1) before the output rounding): [`NoiseStream::fill_uniform`]
/// mapped to the range.
pub fn random_uniform(
    ex: &Exec,
    stream: NoiseStream,
    offset: u64,
    shape: &[usize],
    dtype: DType,
    low: f32,
    high: f32,
) -> Result<Tensor> {
    let width = high - low;
    if !(low.is_finite() && high.is_finite() && width.is_finite() && low <= high) {
        return Err(Error::Input(format!(
            "random_uniform: range [{low}, {high}] must be finite, ordered and narrower than f32's largest value"
        )));
    }
    random(ex, Distribution::Uniform, stream, offset, shape, dtype, low, width)
}

#[derive(Clone, Copy)]
enum Distribution {
    Normal,
    Uniform,
}

/// `shift + scale * v` over the stream's normals or uniforms v.
#[allow(clippy::too_many_arguments)]
fn random(
    ex: &Exec,
    distribution: Distribution,
    stream: NoiseStream,
    offset: u64,
    shape: &[usize],
    dtype: DType,
    shift: f32,
    scale: f32,
) -> Result<Tensor> {
    let op = match distribution {
        Distribution::Normal => "random_normal",
        Distribution::Uniform => "random_uniform",
    };
    let n = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or_else(|| Error::Input(format!("{op}: shape {shape:?} has more elements than memory holds")))?;
    match ex {
        Exec::Cpu => {
            let mut values = Vec::new();
            values.try_reserve_exact(n).map_err(|_| {
                Error::Input(format!("{op}: shape {shape:?} ({n} f32 values) does not fit in host memory"))
            })?;
            values.resize(n, 0f32);
            // Whole Philox blocks per worker; any split gives the same values.
            par_rows(&mut values, 4, |first_block, chunk| {
                let at = offset.wrapping_add(first_block as u64 * 4);
                match distribution {
                    Distribution::Normal => stream.fill_normal(at, chunk),
                    Distribution::Uniform => stream.fill_uniform(at, chunk),
                }
                for v in chunk.iter_mut() {
                    *v = scale.mul_add(*v, shift);
                }
            });
            host_out(shape, dtype, &values)
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, shape, dtype)?;
            if n == 0 {
                return Ok(y);
            }
            let p = RandomParams {
                out: y.device_ptr()? as *mut _,
                seed: stream.seed,
                stream: stream.stream,
                offset,
                n: n as i64,
                a: shift,
                b: scale,
            };
            // One thread per Philox block, counting the partial blocks at both ends.
            let blocks = ((offset % 4) as usize + n).div_ceil(4);
            let kernel = match distribution {
                Distribution::Normal => kernel_for!("random_normal", dtype),
                Distribution::Uniform => kernel_for!("random_uniform", dtype),
            };
            gpu.launch(kernel, (grid_for(blocks, 256), 1, 1), (256, 1, 1), 0, &p)?;
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::stream_id;

    #[test]
    fn cpu_twin_is_the_stream_scaled_and_rounded_once() {
        let stream = NoiseStream::new(77, stream_id(&[2, 1]));
        let shape = [3, 5, 7, 9];
        let n = 3 * 5 * 7 * 9;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = random_normal(&Exec::Cpu, stream, 6, &shape, dtype, 0.25, 1.5).unwrap();
            assert_eq!(t.shape(), shape);
            let mut z = vec![0f32; n];
            stream.fill_normal(6, &mut z);
            let want: Vec<f32> = z.iter().map(|&z| (0.25f64 + 1.5f64 * z as f64) as f32).collect();
            let want = Tensor::from_f32(&shape, dtype, &want).unwrap().to_f32_vec().unwrap();
            let got = t.to_f32_vec().unwrap();
            for (g, w) in got.iter().zip(&want) {
                // fma in f32 vs the f64 value rounded: equal up to one f32 rounding before the
                // output rounding (zero apart for f16/bf16 except at rounding ties).
                assert!((g - w).abs() <= 2.0 * f32::EPSILON * w.abs().max(1.0), "{dtype:?}: {g} vs {w}");
            }

            let t = random_uniform(&Exec::Cpu, stream, 1, &[n], dtype, -2.0, 3.0).unwrap();
            let mut u = vec![0f32; n];
            stream.fill_uniform(1, &mut u);
            for (g, u) in t.to_f32_vec().unwrap().iter().zip(&u) {
                let w = -2.0 + 5.0 * *u as f64;
                assert!((*g as f64 - w).abs() <= 2e-2 * w.abs().max(1.0) && (-2.0..=3.0).contains(g), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn pieces_drawn_at_their_offsets_equal_the_whole() {
        let stream = NoiseStream::new(1, 2);
        let whole = random_normal(&Exec::Cpu, stream, 10, &[4, 250], DType::F32, 0.0, 1.0).unwrap();
        let whole = whole.to_f32_vec().unwrap();
        let mut joined = Vec::new();
        for (start, len) in [(0usize, 3usize), (3, 250), (253, 1), (254, 746)] {
            let part = random_normal(&Exec::Cpu, stream, 10 + start as u64, &[len], DType::F32, 0.0, 1.0).unwrap();
            joined.extend(part.to_f32_vec().unwrap());
        }
        assert_eq!(joined, whole);
    }

    #[test]
    fn bad_arguments_are_refused_by_name() {
        let s = NoiseStream::new(0, 0);
        let cases = [
            random_normal(&Exec::Cpu, s, 0, &[4], DType::F32, f32::NAN, 1.0),
            random_normal(&Exec::Cpu, s, 0, &[4], DType::F32, 0.0, -1.0),
            random_uniform(&Exec::Cpu, s, 0, &[4], DType::F32, 1.0, 0.0),
            random_uniform(&Exec::Cpu, s, 0, &[4], DType::F32, -3e38, 3e38),
            random_normal(&Exec::Cpu, s, 0, &[1 << 40, 1 << 40], DType::F32, 0.0, 1.0),
            random_uniform(&Exec::Cpu, s, 0, &[usize::MAX / 2, 3], DType::F16, 0.0, 1.0),
            random_uniform(&Exec::Cpu, s, 0, &[1 << 61], DType::F32, 0.0, 1.0),
        ];
        let names = ["NaN", "std -1", "[1, 0]", "range", "shape", "shape", "host memory"];
        for (r, name) in cases.into_iter().zip(names) {
            let Err(Error::Input(m)) = r else { panic!("{name}: not refused") };
            assert!(m.contains(name) && m.contains("random_"), "{m}");
        }
        assert_eq!(random_normal(&Exec::Cpu, s, 0, &[0, 3], DType::F16, 0.0, 1.0).unwrap().numel(), 0);
    }
}
