//! Transformer2DModel with BasicTransformerBlocks (diffusers `models/transformers/
//! transformer_2d.py`, `models/attention.py`): GroupNorm, proj_in, per block self-attention,
//! cross-attention on the text context and a GEGLU feed-forward (each pre-LayerNorm, residual),
//! proj_out, residual. Self-attention computes q, k and v in one GEMM of width 3C and
//! cross-attention k and v in one of width 2C, the attention reading them in place through row
//! strides (the weights placed fused at load: `fusions`). The k and v of every cross-attention
//! can also come precomputed for a text context that stays the same over many forwards
//! (`CrossKv`).

use std::collections::HashMap;
use std::sync::Arc;

use super::weights::{Fusion, ModelWeights, Scope, WeightsState};
use crate::error::{Error, Result};
use crate::ops::Exec;
use crate::ops::attention::{Columns, FlashAttention, attention_grouped};
use crate::ops::elementwise::{add, geglu, geglu_fp8};
use crate::ops::fp8::{Fp8Scaling, linear_fp8_quantized};
use crate::ops::linear::{LinearWeight, linear, linear_add, linear_geglu};
use crate::ops::norm::{GroupNorm, group_norm, layer_norm_fp8, layer_norm_shifted};
use crate::tensor::Tensor;
use crate::weights::TensorSpec;

/// GroupNorm eps of Transformer2DModel (fixed in diffusers, unlike the ResNets' norm_eps).
const GROUP_NORM_EPS: f32 = 1e-6;
/// LayerNorm eps of BasicTransformerBlock.
const LAYER_NORM_EPS: f32 = 1e-5;

/// One Transformer2DModel: GroupNorm, proj_in, `depth` BasicTransformerBlocks, proj_out.
#[derive(Clone, Debug, PartialEq)]
pub struct Transformer {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub cross_attention_dim: usize,
}

impl Transformer {
    pub fn head_dim(&self) -> usize {
        self.channels / self.heads.max(1)
    }
}

/// Tensors of one BasicTransformerBlock (three norms, two attentions, the feed-forward; `specs`),
/// for bounding a config by its checkpoint.
pub const BLOCK_TENSORS: usize = 20;

/// The text context the cross-attentions read: the hidden states [G, T, X], and optionally every
/// cross-attention's k and v of them computed beforehand (`CrossKv`, made from these hidden states
/// by the same model's weights).
#[derive(Clone, Copy)]
pub struct TextContext<'a> {
    pub hidden: &'a Tensor,
    pub kv: Option<&'a CrossKv>,
}

/// x [B, H, W, C] NHWC, context [G, T, X] -> [B, H, W, C], G dividing B: context row g serves the
/// B/G images from g * B/G (`attention_grouped`). The group norm's statistics span `norm_frames`
/// consecutive images (1: per image; see `unet::Frames`).
pub fn forward(
    ex: &Exec,
    w: &Scope,
    t: &Transformer,
    groups: usize,
    norm_frames: usize,
    x: &Tensor,
    context: TextContext,
) -> Result<Tensor> {
    let _scope = ex.profile_scope("transformer");
    let (b, h, wd, c) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    // 1. norm, then tokens: [B, H, W, C] -> [B, H*W, C] (NHWC is already token-major)
    let gn = GroupNorm { groups, eps: GROUP_NORM_EPS, silu: false, frames: norm_frames };
    let mut hs = group_norm(ex, x, w.get("norm.weight")?, w.get("norm.bias")?, gn)?.reshape(&[b, h * wd, c])?;
    // 2. proj_in (a Linear, or a 1x1 conv stored [C, 1, 1, C], the same matrix on tokens)
    let proj_in = w.linear("proj_in.weight")?;
    hs =
        linear(ex, &hs, LinearWeight { matrix: &as_matrix(proj_in.matrix)?, ..proj_in }, Some(w.get("proj_in.bias")?))?;
    // 3. blocks: [B, H*W, C] -> [B, H*W, C]
    for n in 0..t.depth {
        hs = block(ex, &w.at(&format!("transformer_blocks.{n}")), t, &hs, context)?;
    }
    // 4. proj_out, back to [B, H, W, C], + residual
    let residual = x.reshape(&[b, h * wd, c])?;
    let proj_out = w.linear("proj_out.weight")?;
    let proj_out = LinearWeight { matrix: &as_matrix(proj_out.matrix)?, ..proj_out };
    hs = linear_add(ex, &hs, proj_out, Some(w.get("proj_out.bias")?), Some(&residual))?;
    hs.reshape(&[b, h, wd, c])
}

/// A 1x1 conv weight (KRSC [C, 1, 1, C] after loading) viewed as the [C, C] matrix it is.
fn as_matrix(w: &Tensor) -> Result<Tensor> {
    match w.shape() {
        &[o, 1, 1, i] => w.reshape(&[o, i]),
        _ => Ok(w.clone()),
    }
}

/// Output biases a residual stream has not received yet. The motion modules' linears that end in
/// the stream (proj_in, to_out.0, ff.net.2) leave their biases out of the GEMM's epilogue: the
/// next LayerNorm adds their sum to the stream before its statistics (`layer_norm_shifted`), and
/// the stream's last linear, proj_out, takes the sum through its weight. At the motion modules'
/// level 0 (N = 320) cuBLASLt's bias epilogue makes a GEMM with the residual 1.5-1.8x slower
/// (benches/RESULTS.md); the norm's shift costs ~2-3 us a call (0.0419 -> 0.0446 ms at C 1280),
/// which is why the UNet's own transformers, at N = 1280 and 640 where the bias epilogue costs
/// 6-11% or nothing, keep their biases in the epilogues. `Default`: none pending, each linear adds
/// its own bias.
#[derive(Default)]
pub(crate) struct PendingBias(Option<Tensor>);

impl PendingBias {
    /// The stream lacks `bias` (its first linear's).
    pub(crate) fn starting_with(bias: &Tensor) -> PendingBias {
        PendingBias(Some(bias.clone()))
    }

    /// What the stream lacks, for the next LayerNorm to add.
    pub(crate) fn shift(&self) -> Option<&Tensor> {
        self.0.as_ref()
    }

    /// The bias for the epilogue of a linear ending in the stream: none while biases are pending
    /// (`bias` joins their sum), else `bias` itself.
    pub(crate) fn epilogue<'b>(&mut self, ex: &Exec, bias: &'b Tensor) -> Result<Option<&'b Tensor>> {
        match &mut self.0 {
            Some(sum) => {
                *sum = add(ex, sum, bias, 1.0)?;
                Ok(None)
            }
            None => Ok(Some(bias)),
        }
    }
}

/// BasicTransformerBlock's LayerNorm `name` (norm1, norm2, norm3) of `w` on x + `shift` (pending
/// output biases), then `rows` [B, C] added to each of x [B, L, C]'s rows in the same pass
/// (`layer_norm_shifted`).
pub(crate) fn block_norm(
    ex: &Exec,
    w: &Scope,
    name: &str,
    x: &Tensor,
    shift: Option<&Tensor>,
    rows: Option<&Tensor>,
) -> Result<Tensor> {
    let (weight, bias) = (w.get(&format!("{name}.weight"))?, w.get(&format!("{name}.bias"))?);
    layer_norm_shifted(ex, x, shift, Some(weight), Some(bias), LAYER_NORM_EPS, rows)
}

/// `block_norm` (LayerNorm `norm` of x + `shift`, then `rows`), then the linear `weight` without
/// bias. With a per-row FP8 twin the LayerNorm writes e4m3 rows and their scales itself
/// (`layer_norm_fp8`) and the FP8 GEMM reads them: no 16-bit LayerNorm output, no quantization
/// pass.
pub(crate) fn norm_linear(
    ex: &Exec,
    w: &Scope,
    norm: &str,
    x: &Tensor,
    shift: Option<&Tensor>,
    rows: Option<&Tensor>,
    weight: LinearWeight,
) -> Result<Tensor> {
    match weight.fp8.filter(|q| q.scaling() == Fp8Scaling::Rows) {
        Some(q) => {
            let (gamma, beta) = (w.get(&format!("{norm}.weight"))?, w.get(&format!("{norm}.bias"))?);
            let xq = layer_norm_fp8(ex, x, shift, Some(gamma), Some(beta), LAYER_NORM_EPS, rows)?;
            linear_fp8_quantized(ex, &xq, x.shape(), x.dtype(), q, None, None)
        }
        None => linear(ex, &block_norm(ex, w, norm, x, shift, rows)?, weight, None),
    }
}

/// BasicTransformerBlock's last step, x + FF(LN3(x)) with the GEGLU feed-forward:
/// [B, L, C] -> [B, L, 4C] (the [B, L, 8C] projection and GEGLU as one `linear_geglu`) -> [B, L, C],
/// the residual added in ff.net.2's epilogue, and ff.net.2's bias too unless biases are `pending`
/// (then it joins them). With an FP8 projection, GEGLU and the projection's bias are one pass
/// after the FP8 product (cuBLASLt takes no bias epilogue there); with a per-row FP8 twin of
/// ff.net.2, that pass writes ff.net.2's e4m3 rows (`geglu_fp8`).
pub(crate) fn block_feed_forward(ex: &Exec, w: &Scope, x: &Tensor, pending: &mut PendingBias) -> Result<Tensor> {
    let (proj, bias) = (w.linear("ff.net.0.proj.weight")?, w.get("ff.net.0.proj.bias")?);
    let (out, out_bias) = (w.linear("ff.net.2.weight")?, w.get("ff.net.2.bias")?);
    let out_rows = out.fp8.filter(|q| q.scaling() == Fp8Scaling::Rows);
    // LN3 reads the stream as it is now; ff.net.2's bias then joins the pending ones (or rides in
    // its epilogue when none are pending).
    let shift = pending.shift().cloned();
    let shift = shift.as_ref();
    let out_bias = pending.epilogue(ex, out_bias)?;
    if proj.fp8.is_none() && out_rows.is_none() {
        let f = linear_geglu(ex, &block_norm(ex, w, "norm3", x, shift, None)?, proj, Some(bias))?;
        return linear_add(ex, &f, out, out_bias, Some(x));
    }
    // The projection alone, then GEGLU: an FP8 projection leaves its bias to GEGLU's pass.
    let (h, geglu_bias) = match proj.fp8 {
        Some(_) => (norm_linear(ex, w, "norm3", x, shift, None, proj)?, Some(bias)),
        None => (linear(ex, &block_norm(ex, w, "norm3", x, shift, None)?, proj, Some(bias))?, None),
    };
    match out_rows {
        Some(q) => {
            let hq = geglu_fp8(ex, &h, geglu_bias)?;
            let mut shape = x.shape().to_vec();
            *shape.last_mut().unwrap() = hq.shape()[1];
            linear_fp8_quantized(ex, &hq, &shape, x.dtype(), q, out_bias, Some(x))
        }
        None => linear_add(ex, &geglu(ex, &h, geglu_bias)?, out, out_bias, Some(x)),
    }
}

/// BasicTransformerBlock: x += attn1(LN1(x)); x += attn2(LN2(x), context); x += FF(LN3(x)).
fn block(ex: &Exec, w: &Scope, t: &Transformer, x: &Tensor, context: TextContext) -> Result<Tensor> {
    // Intermediates live in their step's scope, so the arena reuses them for the next step.
    // 1. self-attention: [B, L, C]
    let x = {
        let attn = w.at("attn1");
        let qkv = norm_linear(ex, w, "norm1", x, None, None, attn.linear_rows(&QKV)?)?; // [B, L, 3C]
        self_attention(ex, &attn, t.heads, &qkv, x)?
    };
    // 2. cross-attention on the context: queries [B, L, C], keys and values from [G, T, X]
    let x = {
        let attn = w.at("attn2");
        let q = norm_linear(ex, w, "norm2", &x, None, None, attn.linear("to_q.weight")?)?; // [B, L, C]
        cross_attention(ex, &attn, t.heads, &q, context, &x)?
    };
    // 3. GEGLU feed-forward
    block_feed_forward(ex, w, &x, &mut PendingBias::default())
}

/// The projections a self-attention reads as one matrix, in the order of its output's columns.
pub const QKV: [&str; 3] = ["to_q", "to_k", "to_v"];
/// The projections a cross-attention reads as one matrix (to_q reads x, not the context).
pub const KV: [&str; 2] = ["to_k", "to_v"];

/// The stack of every cross-attention's fused k and v projections (`fusions`, `CrossKv`).
pub const CROSS_KV_STACK: &str = "cross-attention k/v";

/// The fused projections of the transformer blocks among a model's weights (graph names first):
/// every attn1's to_q, to_k, to_v ([3C, C]) and every attn2's to_k, to_v ([2C, X]), as
/// `self_attention` and `cross_attention` read them; the attn2 matrices stacked into one
/// [Σ 2C, X] as well, which `CrossKv::compute` multiplies.
pub fn fusions<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<Fusion> {
    let module = |name: &'a String, suffix: &str| name.strip_suffix(suffix).map(str::to_string);
    names
        .into_iter()
        .filter_map(|n| match module(n, ".attn1.to_q.weight") {
            Some(m) => Some(Fusion { module: format!("{m}.attn1"), parts: &QKV, stack: None }),
            None => module(n, ".attn2.to_k.weight").map(|m| Fusion {
                module: format!("{m}.attn2"),
                parts: &KV,
                stack: Some(CROSS_KV_STACK),
            }),
        })
        .collect()
}

/// Which of a model's linears run in FP8 (`ModelWeights::enable_fp8`): the render config's `fp8`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fp8Linears {
    #[default]
    Off,
    /// The transformer blocks' linears whose input is a LayerNorm's or GEGLU's output (the
    /// attentions' q, k and v, the GEGLU projection, the second feed-forward GEMM), whose e4m3
    /// rows that kernel writes itself with per-row scales, and any other with at least
    /// `FP8_MIN_OUT` outputs ("on"): all but to_out and proj_in/out.
    Wide,
    /// Every linear of the transformer blocks and their projections in and out ("all").
    All,
}

/// The fewest outputs N for which a linear not fed by a LayerNorm or GEGLU runs in FP8 under
/// `Fp8Linears::Wide`. Quantizing its activation costs 5 bytes per input element with one scale
/// per tensor (amax read, then read and e4m3 write), 3 with one per row, ~m·k · bytes / 3.5 TB/s;
/// the FP8 GEMM saves 2·m·n·k · (1/750 - 1/~1300) per TFLOP/s (the H200's cuBLASLt f16 rate
/// measured, FP8's assumed): the saving wins from n ~ 1200-1700 (per row: ~800). SDXL's other
/// block linears have N = C (to_out, proj_in/out) and stay in the compute dtype.
pub const FP8_MIN_OUT: usize = 1536;

impl Fp8Linears {
    /// "off", "on" or "all".
    pub fn parse(value: &str) -> Result<Fp8Linears> {
        match value.trim() {
            "off" => Ok(Fp8Linears::Off),
            "on" => Ok(Fp8Linears::Wide),
            "all" => Ok(Fp8Linears::All),
            other => Err(Error::Input(format!("'{other}' is not an FP8 choice (expected off, on or all)"))),
        }
    }

    /// Whether the weight `name` of shape `shape` ([N, K], or a 1x1 convolution's [N, 1, 1, K])
    /// belongs to a linear this choice runs in FP8: the transformer blocks' (UNet, ControlNet,
    /// motion modules) and their projections in and out, whose inputs are the image or video
    /// tokens, where the GEMM time is. The cross-attentions' k and v project the text context (77
    /// rows, once per clip: `CrossKv`) and stay in the compute dtype.
    pub fn takes(self, name: &str, shape: &[usize]) -> bool {
        let block = name.contains(".transformer_blocks.")
            || name.ends_with(".proj_in.weight")
            || name.ends_with(".proj_out.weight");
        let linear = block && !name.contains(".attn2.to_k") && !name.contains(".attn2.to_v");
        // A block's q (fused with k and v in self-attention) and its GEGLU projection read
        // LayerNorm outputs (`norm_linear`), its ff.net.2 GEGLU's (`block_feed_forward`).
        let rows_written =
            name.contains(".to_q") || name.ends_with(".ff.net.0.proj.weight") || name.ends_with(".ff.net.2.weight");
        match self {
            Fp8Linears::Off => false,
            Fp8Linears::Wide => linear && (rows_written || shape.first().is_some_and(|&n| n >= FP8_MIN_OUT)),
            Fp8Linears::All => linear,
        }
    }
}

/// Every cross-attention's k and v on one text context [G, T, X]: [G, T, Σ 2C] from one GEMM by
/// the model's stacked attn2 projections, each module's k and v a column range that the attention
/// reads in place. A clip's text context does not change between its denoising steps, so a render
/// computes this once per context and model instead of once per forward (`UnetInputs::cross_kv`).
#[derive(Clone)]
pub struct CrossKv {
    kv: Tensor,
    /// attn2 module -> (first column of its k, C); its v follows.
    columns: Arc<HashMap<String, (usize, usize)>>,
    /// The weights' state it was computed from, and the context's shape.
    state: WeightsState,
    context: Vec<usize>,
}

impl CrossKv {
    /// The k and v of every cross-attention of the model with `weights` on `context` [G, T, X];
    /// None when the model has no cross-attention.
    pub fn compute(ex: &Exec, weights: &ModelWeights, context: &Tensor) -> Result<Option<CrossKv>> {
        let Some(stacked) = weights.stack(CROSS_KV_STACK) else { return Ok(None) };
        let kv = {
            let _scope = ex.profile_scope("cross_kv");
            linear(ex, context, &stacked.matrix, None)?
        };
        let columns = stacked.blocks.iter().map(|(module, first, rows)| (module.clone(), (*first, rows / 2))).collect();
        let (state, context) = (weights.state(), context.shape().to_vec());
        Ok(Some(CrossKv { kv, columns: Arc::new(columns), state, context }))
    }

    /// The values, [G, T, Σ 2C].
    pub fn tensor(&self) -> &Tensor {
        &self.kv
    }

    /// The same k and v read from `kv`, a tensor of the same shape and dtype holding a copy of
    /// them (a CUDA graph's static input).
    pub fn reading(&self, kv: Tensor) -> Result<CrossKv> {
        if kv.shape() != self.kv.shape() || kv.dtype() != self.kv.dtype() {
            return Err(Error::Internal(format!("cached text k/v {:?} read from {kv:?}", self.kv)));
        }
        Ok(CrossKv { kv, ..self.clone() })
    }

    /// Whether these k and v were computed by `weights` as they are now.
    pub fn holds_for(&self, weights: &ModelWeights) -> bool {
        self.state == weights.state()
    }

    /// Checks that these k and v were computed by `weights` as they are now (`model` names it in
    /// the error) on a context of `context`'s shape and dtype.
    pub fn check(&self, model: &str, weights: &ModelWeights, context: &Tensor) -> Result<()> {
        if !self.holds_for(weights) {
            return Err(Error::Input(format!(
                "{model} input: cross_kv was computed by other weights, or before these changed (a LoRA merge): \
                 compute it again with this model"
            )));
        }
        if context.shape() != self.context || context.dtype() != self.kv.dtype() {
            return Err(Error::Input(format!(
                "{model} input: cross_kv was computed on a context {:?} {:?}, encoder_hidden_states is {context:?}",
                self.context,
                self.kv.dtype()
            )));
        }
        Ok(())
    }

    /// The k and v of the cross-attention whose weights `w` reads (the model's input check made
    /// sure they were computed by those weights as they are: `check`).
    fn of(&self, w: &Scope) -> Result<[Columns; 2]> {
        let module = w.prefix();
        let &(first, c) = self.columns.get(module).ok_or_else(|| {
            Error::Internal(format!("the cached text k/v hold none for '{module}', a cross-attention of the model"))
        })?;
        Ok([Columns::new(&self.kv, first, c)?, Columns::new(&self.kv, first + c, c)?])
    }
}

/// diffusers Attention without biases on q, k, v (attn1): softmax(q k^T / sqrt(d)) v with q, k
/// and v from one GEMM by the fused [3C, C] weight (`qkv` [B, L, 3C], `norm_linear`), then
/// to_out.0, whose epilogue adds the residual stream.
fn self_attention(ex: &Exec, w: &Scope, heads: usize, qkv: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let [q, k, v] = Columns::split(qkv)?;
    let o = attention_grouped(ex, q, k, v, scaled(heads, residual.shape()[2]))?; // [B, L, C]
    linear_add(ex, &o, w.linear("to_out.0.weight")?, Some(w.get("to_out.0.bias")?), Some(residual))
}

/// The same on the context (attn2): queries q [B, L, C] (to_q of the normalised stream), k and v
/// from one GEMM of the context's G rows by the fused [2C, X] weight (G divides the B rows:
/// `attention_grouped`), or the context's cached k and v.
fn cross_attention(
    ex: &Exec,
    w: &Scope,
    heads: usize,
    q: &Tensor,
    context: TextContext,
    residual: &Tensor,
) -> Result<Tensor> {
    let [k, v] = match context.kv {
        Some(cached) => cached.of(w)?,
        None => {
            // Profiled apart: what caching k and v per text context saves (`--breakdown`'s
            // transformer/cross_kv row).
            let _scope = ex.profile_scope("cross_kv");
            Columns::split(&linear(ex, context.hidden, w.rows(&KV)?, None)?)? // [G, T, 2C]
        }
    };
    let o = attention_grouped(ex, q, k, v, scaled(heads, q.shape()[2]))?;
    linear_add(ex, &o, w.linear("to_out.0.weight")?, Some(w.get("to_out.0.bias")?), Some(residual))
}

/// Attention over `channels` in `heads` heads, scaled by 1 / sqrt(head dim), no mask.
fn scaled(heads: usize, channels: usize) -> FlashAttention {
    let head_dim = channels / heads.max(1);
    FlashAttention { heads, causal: false, scale: 1.0 / (head_dim as f32).sqrt() }
}

/// The module's tensors (PyTorch shapes) under `prefix`.
pub fn specs(prefix: &str, t: &Transformer, linear_projection: bool, out: &mut Vec<TensorSpec>) {
    let (c, x) = (t.channels, t.cross_attention_dim);
    let mut put = |name: String, shape: &[usize]| out.push(TensorSpec::new(format!("{prefix}.{name}"), shape));
    let proj: &[usize] = if linear_projection { &[c, c] } else { &[c, c, 1, 1] };
    put("norm.weight".into(), &[c]);
    put("norm.bias".into(), &[c]);
    put("proj_in.weight".into(), proj);
    put("proj_in.bias".into(), &[c]);
    for n in 0..t.depth {
        let b = format!("transformer_blocks.{n}");
        for norm in ["norm1", "norm2", "norm3"] {
            put(format!("{b}.{norm}.weight"), &[c]);
            put(format!("{b}.{norm}.bias"), &[c]);
        }
        for (attn, kv) in [("attn1", c), ("attn2", x)] {
            put(format!("{b}.{attn}.to_q.weight"), &[c, c]);
            put(format!("{b}.{attn}.to_k.weight"), &[c, kv]);
            put(format!("{b}.{attn}.to_v.weight"), &[c, kv]);
            put(format!("{b}.{attn}.to_out.0.weight"), &[c, c]);
            put(format!("{b}.{attn}.to_out.0.bias"), &[c]);
        }
        put(format!("{b}.ff.net.0.proj.weight"), &[8 * c, c]);
        put(format!("{b}.ff.net.0.proj.bias"), &[8 * c]);
        put(format!("{b}.ff.net.2.weight"), &[c, 4 * c]);
        put(format!("{b}.ff.net.2.bias"), &[c]);
    }
    put("proj_out.weight".into(), proj);
    put("proj_out.bias".into(), &[c]);
}

#[cfg(test)]
mod tests {
    use super::Fp8Linears;

    #[test]
    fn fp8_choices_take_the_block_linears_they_name() {
        let block = "up_blocks.0.attentions.1.transformer_blocks.3";
        // (name, [N, K], on, all): SDXL's 1280-wide level
        let cases = [
            (format!("{block}.attn1.to_q+to_k+to_v.weight"), [3840, 1280], true, true),
            (format!("{block}.attn1.to_out.0.weight"), [1280, 1280], false, true),
            (format!("{block}.attn2.to_q.weight"), [1280, 1280], true, true),
            (format!("{block}.attn2.to_k+to_v.weight"), [2560, 2048], false, false),
            (format!("{block}.attn2.to_k.weight"), [1280, 2048], false, false),
            (format!("{block}.ff.net.0.proj.weight"), [10240, 1280], true, true),
            (format!("{block}.ff.net.2.weight"), [1280, 5120], true, true),
            ("up_blocks.0.attentions.1.proj_in.weight".into(), [1280, 1280], false, true),
            ("up_blocks.0.attentions.1.proj_out.weight".into(), [1280, 1280], false, true),
            // a motion module's second (temporal self-) attention keeps its k and v
            (
                "down_blocks.1.motion_modules.0.transformer_blocks.0.attn2.to_q+to_k+to_v.weight".into(),
                [1920, 640],
                true,
                true,
            ),
            // at level 0 (320 wide): q, k, v read the LayerNorm's rows though N = 960
            (
                "down_blocks.0.motion_modules.1.transformer_blocks.0.attn1.to_q+to_k+to_v.weight".into(),
                [960, 320],
                true,
                true,
            ),
            // outside the transformer blocks: the time embedding, a ResNet's, the VAE's attention
            ("time_embedding.linear_2.weight".into(), [1280, 1280], false, false),
            ("down_blocks.1.resnets.0.time_emb_proj.weight".into(), [640, 1280], false, false),
            ("decoder.mid_block.attentions.0.to_q.weight".into(), [512, 512], false, false),
        ];
        for (name, shape, on, all) in cases {
            assert!(!Fp8Linears::Off.takes(&name, &shape), "off: {name}");
            assert_eq!(Fp8Linears::Wide.takes(&name, &shape), on, "on: {name}");
            assert_eq!(Fp8Linears::All.takes(&name, &shape), all, "all: {name}");
        }
        assert_eq!(Fp8Linears::parse("on").unwrap(), Fp8Linears::Wide);
        assert_eq!(Fp8Linears::parse(" all ").unwrap(), Fp8Linears::All);
        assert!(Fp8Linears::parse("yes").unwrap_err().to_string().contains("off, on or all"));
    }
}
