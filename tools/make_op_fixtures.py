#!/usr/bin/env python3
"""Writes tests/fixtures/ops_reference.safetensors: inputs and PyTorch/diffusers outputs (float32,
CPU) for every op's CPU twin. Layout at the boundary follows the op: activations NHWC, conv
weights as PyTorch stores them (OIHW; the test rearranges them).

Run: python3 tools/make_op_fixtures.py   (needs torch, diffusers, safetensors)
"""
import pathlib

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file

torch.manual_seed(20261124)
out = {}


def put(name, t):
    out[name] = t.detach().to(torch.float32).contiguous()


def nhwc(t):
    return t.permute(0, 2, 3, 1)


# Group norm (+SiLU) per image: NCHW reference, stored NHWC. Offset mean so the statistics matter.
x = torch.randn(2, 64, 6, 10) * 3.0 + 1.5
g, b = torch.randn(64), torch.randn(64)
put("group_norm.x", nhwc(x)); put("group_norm.gamma", g); put("group_norm.beta", b)
put("group_norm.out", nhwc(F.group_norm(x, 32, g, b, eps=1e-5)))
put("group_norm_silu.out", nhwc(F.silu(F.group_norm(x, 32, g, b, eps=1e-5))))

# Group norm across the frames of each video (AnimateDiff motion module): [B*F, C, H, W] viewed as
# [B, C, F, H, W], statistics per (video, group). eps 1e-6 as the motion module uses.
B, Fr, C, H, W = 2, 4, 32, 3, 5
xv = torch.randn(B * Fr, C, H, W) * 2.0 - 0.7
gv, bv = torch.randn(C), torch.randn(C)
five = xv.view(B, Fr, C, H, W).permute(0, 2, 1, 3, 4)
yv = F.group_norm(five, 8, gv, bv, eps=1e-6).permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
put("group_norm_frames.x", nhwc(xv)); put("group_norm_frames.gamma", gv); put("group_norm_frames.beta", bv)
put("group_norm_frames.out", nhwc(yv))

# Layer norm over channels.
x = torch.randn(5, 7, 96) + 0.5
g, b = torch.randn(96), torch.randn(96)
put("layer_norm.x", x); put("layer_norm.gamma", g); put("layer_norm.beta", b)
put("layer_norm.out", F.layer_norm(x, (96,), g, b, eps=1e-5))

# Element-wise family.
a, c = torch.randn(3, 4, 5, 16) * 4, torch.randn(3, 4, 5, 16)
bias, per_image = torch.randn(16), torch.randn(3, 16)
put("elementwise.a", a); put("elementwise.b", c); put("elementwise.bias", bias); put("elementwise.per_image", per_image)
put("elementwise.add", a + c)
put("elementwise.add_scaled", (a + c) * 0.5)
put("elementwise.add_bias", a + bias)
put("elementwise.add_per_image", a + per_image[:, None, None, :])
put("elementwise.mul", a * c)
put("elementwise.scale", a * -1.25)
put("elementwise.silu", F.silu(a))
put("elementwise.gelu", F.gelu(a))
h = torch.randn(6, 2 * 24) * 3
value, gate = h.chunk(2, dim=-1)
put("geglu.x", h); put("geglu.out", value * F.gelu(gate))

# Linear (PyTorch weight layout [out, in]).
x, w, bl = torch.randn(2, 9, 40), torch.randn(24, 40) * 0.2, torch.randn(24)
put("linear.x", x); put("linear.weight", w); put("linear.bias", bl); put("linear.out", F.linear(x, w, bl))

# Convolutions: 3x3 stride 1 and 2 (padding 1), 1x1; weights OIHW.
x = torch.randn(2, 12, 9, 11)
w3, b3 = torch.randn(20, 12, 3, 3) * 0.2, torch.randn(20)
w1, b1 = torch.randn(8, 12, 1, 1) * 0.3, torch.randn(8)
put("conv.x", nhwc(x)); put("conv.w3", w3); put("conv.b3", b3); put("conv.w1", w1); put("conv.b1", b1)
put("conv.out3_s1", nhwc(F.conv2d(x, w3, b3, stride=1, padding=1)))
put("conv.out3_s2", nhwc(F.conv2d(x, w3, b3, stride=2, padding=1)))
put("conv.out1", nhwc(F.conv2d(x, w1, b1)))

# Nearest 2x upsample.
x = torch.randn(2, 5, 3, 4)
put("upsample.x", nhwc(x)); put("upsample.out", nhwc(F.interpolate(x, scale_factor=2.0, mode="nearest")))

# Timestep embeddings as the SDXL UNet uses them (320-d timesteps, 256-d time ids).
t = torch.tensor([0.0, 1.0, 261.0, 999.0, 1024.0])
put("timestep.t", t)
put("timestep.out320", get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0))
put("timestep.out256", get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0))
put("timestep.out_shift1", get_timestep_embedding(t, 33, flip_sin_to_cos=False, downscale_freq_shift=1))

# Temporal attention as the motion module computes it: [B*F, H, W, C] NHWC frame-major -> per
# (video, pixel) sequences over frames -> SDPA with 8 heads of C/8 -> back.
B, Fr, H, W, C, heads = 2, 5, 2, 3, 64, 8
q, k, v = (torch.randn(B * Fr, H, W, C) for _ in range(3))
def seqs(t):  # [B*F, H, W, C] -> [B*H*W, heads, F, C/heads]
    return t.view(B, Fr, H * W, heads, C // heads).permute(0, 2, 3, 1, 4).reshape(B * H * W, heads, Fr, C // heads)
o = F.scaled_dot_product_attention(seqs(q), seqs(k), seqs(v))
o = o.view(B, H * W, heads, Fr, C // heads).permute(0, 3, 1, 2, 4).reshape(B * Fr, H, W, C)
put("temporal.q", q); put("temporal.k", k); put("temporal.v", v); put("temporal.out", o)

# Flash attention: [b, tokens, heads * 64] rows; cross attention (7 queries, 11 keys) and causal self.
def heads_first(t, h):  # [b, s, h*d] -> [b, h, s, d]
    return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)
def heads_last(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
q, k, v = torch.randn(2, 7, 128), torch.randn(2, 11, 128), torch.randn(2, 11, 128)
put("flash.q", q); put("flash.k", k); put("flash.v", v)
put("flash.out", heads_last(F.scaled_dot_product_attention(heads_first(q, 2), heads_first(k, 2), heads_first(v, 2))))
x = torch.randn(2, 9, 128)
put("flash.x", x)
put("flash.causal", heads_last(F.scaled_dot_product_attention(heads_first(x, 2), heads_first(x, 2), heads_first(x, 2), is_causal=True)))

# Fused passes, drawn last so the tensors above keep their values.
# Layer norm with a row per frame added to its output (diffusers attention.py BasicTransformerBlock:
# `norm_hidden_states = self.pos_embed(norm_hidden_states)` in the motion modules), tokens [B*F, L, C].
x = torch.randn(6, 5, 32) - 0.3
g, b, pe = torch.randn(32), torch.randn(32), torch.randn(6, 32)
put("layer_norm_add.x", x); put("layer_norm_add.gamma", g); put("layer_norm_add.beta", b); put("layer_norm_add.rows", pe)
put("layer_norm_add.out", F.layer_norm(x, (32,), g, b, eps=1e-5) + pe[:, None, :])

# A ResNet's output (diffusers resnet.py ResnetBlock2D.forward): (shortcut(x) + conv2(h)) /
# output_scale_factor, each convolution with its bias; here the convolutions' outputs without bias.
a, sc = torch.randn(2, 3, 4, 24) * 3, torch.randn(2, 3, 4, 24)
b2, bs = torch.randn(24), torch.randn(24)
put("residual_add.conv2", a); put("residual_add.shortcut", sc); put("residual_add.conv2_bias", b2)
put("residual_add.shortcut_bias", bs)
put("residual_add.out", ((sc + bs) + (a + b2)) / 2.0)
put("residual_add.out_identity_shortcut", sc + (a + b2))

path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/ops_reference.safetensors"
path.parent.mkdir(parents=True, exist_ok=True)
save_file(out, str(path), metadata={"generator": "tools/make_op_fixtures.py", "torch": torch.__version__})
print(f"wrote {path} ({path.stat().st_size} bytes, {len(out)} tensors)")
