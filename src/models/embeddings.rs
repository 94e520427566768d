//! The UNet's conditioning vector (diffusers `get_time_embed`, `TimestepEmbedding`, `get_aug_embed`
//! for `text_time`): emb = MLP(sinusoid(t)) + MLP([pooled text, sinusoid(each time id)]).

use super::unet::UnetConfig;
use super::weights::Scope;
use crate::error::Result;
use crate::ops::Exec;
use crate::ops::concat::concat_last;
use crate::ops::elementwise::{add, silu};
use crate::ops::embedding::{TimestepEmbedding, timestep_embedding};
use crate::ops::linear::linear;
use crate::tensor::{DType, Tensor};
use crate::weights::TensorSpec;

/// diffusers `Timesteps` with the model's flip and shift at width `dim`.
fn sinusoid(cfg: &UnetConfig, dim: usize) -> TimestepEmbedding {
    TimestepEmbedding {
        dim,
        flip_sin_to_cos: cfg.flip_sin_to_cos,
        shift: cfg.freq_shift,
        scale: 1.0,
        max_period: 10000.0,
    }
}

/// TimestepEmbedding: linear_1, SiLU, linear_2.
fn mlp(ex: &Exec, w: &Scope, x: &Tensor) -> Result<Tensor> {
    let h = linear(ex, x, w.get("linear_1.weight")?, Some(w.get("linear_1.bias")?))?;
    linear(ex, &silu(ex, &h)?, w.get("linear_2.weight")?, Some(w.get("linear_2.bias")?))
}

/// emb [B, T] in `dtype`. `timestep` is f32 [B]; `text_time` is (text_embeds [B, pooled] in
/// `dtype`, time_ids f32 [B, n]) when the model has the `text_time` embedding.
pub fn forward(
    ex: &Exec,
    w: &Scope,
    cfg: &UnetConfig,
    timestep: &Tensor,
    text_time: Option<(&Tensor, &Tensor)>,
    dtype: DType,
) -> Result<Tensor> {
    // 1. sinusoid of t (fp32, then the compute dtype): [B] -> [B, C0] -> MLP -> [B, T]
    let t = timestep_embedding(ex, timestep, sinusoid(cfg, cfg.block_out_channels[0]), dtype)?;
    let emb = mlp(ex, &w.at("time_embedding"), &t)?;
    let (Some(tt), Some((text_embeds, time_ids))) = (&cfg.text_time, text_time) else {
        return Ok(emb);
    };
    // 2. one sinusoid per time id: [B, n] -> [B*n] -> [B*n, A] -> [B, n*A]
    let (b, n) = (time_ids.shape()[0], time_ids.shape()[1]);
    let ids = timestep_embedding(ex, &time_ids.reshape(&[b * n])?, sinusoid(cfg, tt.time_embed_dim), dtype)?;
    let ids = ids.reshape(&[b, n * tt.time_embed_dim])?;
    // 3. [pooled text, time ids] -> MLP -> [B, T], added to the time embedding
    let added = mlp(ex, &w.at("add_embedding"), &concat_last(ex, text_embeds, &ids)?)?;
    add(ex, &emb, &added, 1.0)
}

/// The Union ControlNet's control-type embedding (diffusers `controlnet_union.py`: `control_type_proj`
/// and `control_add_embedding`): each of the N flags of `flags` (f32 [N], 1 for a type in use, else
/// 0) becomes a sinusoid of `width` with the time embedding's flip and shift (an unused type gives
/// cos 0 = 1 and sin 0 = 0, not zeros), concatenated in type order -> MLP -> [1, T] in `dtype`.
pub fn control_types(
    ex: &Exec,
    w: &Scope,
    cfg: &UnetConfig,
    flags: &Tensor,
    width: usize,
    dtype: DType,
) -> Result<Tensor> {
    let n = flags.numel();
    let s = timestep_embedding(ex, flags, sinusoid(cfg, width), dtype)?.reshape(&[1, n * width])?;
    mlp(ex, w, &s)
}

pub fn specs(cfg: &UnetConfig, out: &mut Vec<TensorSpec>) {
    let t = cfg.time_embed_dim;
    mlp_specs("time_embedding", cfg.block_out_channels[0], t, out);
    if let Some(tt) = &cfg.text_time {
        mlp_specs("add_embedding", tt.input_dim, t, out);
    }
}

/// A TimestepEmbedding MLP's tensors: `input` -> `t` -> `t`.
pub fn mlp_specs(prefix: &str, input: usize, t: usize, out: &mut Vec<TensorSpec>) {
    out.push(TensorSpec::new(format!("{prefix}.linear_1.weight"), &[t, input]));
    out.push(TensorSpec::new(format!("{prefix}.linear_1.bias"), &[t]));
    out.push(TensorSpec::new(format!("{prefix}.linear_2.weight"), &[t, t]));
    out.push(TensorSpec::new(format!("{prefix}.linear_2.bias"), &[t]));
}
