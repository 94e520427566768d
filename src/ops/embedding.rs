//! Sinusoidal timestep embedding (diffusers `get_timestep_embedding`): the UNet's timestep
//! projection (320-d, flip_sin_to_cos, shift 0) and the six time-id embeddings (256-d each).

use super::{Exec, grid_for, host_out};
use crate::error::{Error, Result};
use crate::gpu::params::TimestepEmbeddingParams;
use crate::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct TimestepEmbedding {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub shift: f32,
    pub scale: f32,
    pub max_period: f32,
}

impl TimestepEmbedding {
    /// SDXL's settings (flip_sin_to_cos true, freq_shift 0) at a given width.
    pub fn sdxl(dim: usize) -> Self {
        TimestepEmbedding { dim, flip_sin_to_cos: true, shift: 0.0, scale: 1.0, max_period: 10000.0 }
    }
}

/// `timesteps` is an f32 tensor [n]; the result is [n, dim] in `dtype`.
pub fn timestep_embedding(ex: &Exec, timesteps: &Tensor, cfg: TimestepEmbedding, dtype: DType) -> Result<Tensor> {
    ex.expect_inputs("timestep_embedding", &[timesteps])?;
    if timesteps.shape().len() != 1 || timesteps.dtype() != DType::F32 {
        return Err(Error::Input(format!("timestep_embedding: timesteps {timesteps:?} must be f32 [n]")));
    }
    let n = timesteps.numel();
    let half = cfg.dim / 2;
    if half == 0 || (half as f32) <= cfg.shift {
        return Err(Error::Input(format!("timestep_embedding: dim {} too small for shift {}", cfg.dim, cfg.shift)));
    }
    match ex {
        Exec::Cpu => {
            let t = timesteps.to_f32_vec()?;
            let mut out = vec![0f32; n * cfg.dim];
            for (row, ts) in t.iter().enumerate() {
                for k in 0..half {
                    // Same fp32 steps as diffusers: exponent, exp, t * freq, scale.
                    let exponent = -(cfg.max_period.ln()) * k as f32 / (half as f32 - cfg.shift);
                    let angle = cfg.scale * (ts * exponent.exp());
                    let (s, c) = ((angle as f64).sin() as f32, (angle as f64).cos() as f32);
                    let (first, second) = if cfg.flip_sin_to_cos { (c, s) } else { (s, c) };
                    out[row * cfg.dim + k] = first;
                    out[row * cfg.dim + half + k] = second;
                }
            }
            host_out(&[n, cfg.dim], dtype, &out)
        }
        Exec::Cuda { gpu, scratch } => {
            let y = gpu.empty(scratch, &[n, cfg.dim], dtype)?;
            let p = TimestepEmbeddingParams {
                timesteps: timesteps.device_ptr()? as *const f32,
                out: y.device_ptr()? as *mut _,
                n: n as i64,
                dim: cfg.dim as i32,
                flip_sin_to_cos: cfg.flip_sin_to_cos as i32,
                shift: cfg.shift,
                scale: cfg.scale,
                max_period: cfg.max_period,
            };
            gpu.launch(
                kernel_for!("timestep_embedding", dtype),
                (grid_for(n * cfg.dim, 256), 1, 1),
                (256, 1, 1),
                0,
                &p,
            )?;
            Ok(y)
        }
    }
}
