#!/usr/bin/env python3
"""PyTorch peer timings for benches/ops.rs, same shapes, same GPU, same run (tools/gpu_run.sh).
Prints one `PEER {json}` line per entry, keyed like the BENCH lines. PyTorch runs the way
diffusers does: NCHW contiguous activations (channels_last is timed too where it differs)."""
import json
import os

import torch
import torch.nn.functional as F

assert torch.cuda.is_available(), "the peer needs a GPU"
dev = "cuda"
torch.backends.cudnn.benchmark = True


def bench(fn, warmup=10, runs=50):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(runs + 1)]
    ev[0].record()
    for e in ev[1:]:
        fn()
        e.record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) for a, b in zip(ev[:-1], ev[1:]))
    return (t[runs // 2 - 1] + t[runs // 2]) / 2 if runs % 2 == 0 else t[runs // 2]


def wanted(key):
    """CELFRAME_BENCH_FILTER keeps the entries whose key contains one of its '|'-separated pieces, as
    benches/ops.rs does."""
    return any(piece in key for piece in os.environ.get("CELFRAME_BENCH_FILTER", "").split("|"))


def peer(key, variant, ms, bytes_=0.0, flop=0.0):
    print("PEER " + json.dumps({"key": key, "variant": variant, "ms": round(ms, 5),
                                "gbps": round(bytes_ / ms / 1e6, 1), "tflops": round(flop / ms / 1e9, 1)}), flush=True)


DT = {"f16": torch.float16, "bf16": torch.bfloat16}
gn_cases = [("group_norm_silu", (32, 72, 128, 320), True, 1, "f16"),
            ("group_norm", (32, 72, 128, 320), False, 1, "f16"),
            ("group_norm_silu", (32, 36, 64, 640), True, 1, "f16"),
            ("group_norm_silu", (32, 18, 32, 1280), True, 1, "f16"),
            ("group_norm_frames16", (32, 72, 128, 320), False, 16, "f16"),
            ("group_norm_silu", (32, 72, 128, 320), True, 1, "bf16")]
for name, (n, h, w, c), silu, frames, dt in gn_cases:
    key = f"{name} {dt} N{n} C{c} H{h} W{w}"
    if not wanted(key):
        continue
    xs = [torch.randn(n, c, h, w, device=dev, dtype=DT[dt]) for _ in range(2)]
    g, b = torch.randn(c, device=dev, dtype=DT[dt]), torch.randn(c, device=dev, dtype=DT[dt])
    nbytes = 2 * xs[0].numel() * xs[0].element_size()
    k = [0]

    def run(x_of):
        def f():
            k[0] ^= 1
            x = x_of(xs[k[0]])
            if frames > 1:  # diffusers' motion module: [B*F,C,H,W] -> [B,C,F,H,W], norm over all frames
                x = x.reshape(n // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)
            y = F.group_norm(x, 32, g, b, 1e-5)
            return F.silu(y) if silu else y
        return f
    peer(key, "torch NCHW", bench(run(lambda x: x)), nbytes)
    if frames == 1:
        cl = [x.to(memory_format=torch.channels_last) for x in xs]
        xs_cl = {id(a): c_ for a, c_ in zip(xs, cl)}
        peer(key, "torch channels_last", bench(run(lambda x: xs_cl[id(x)])), nbytes)

for n, h, w, ci, co in [(2, 128, 128, 320, 320), (2, 64, 64, 640, 640), (2, 32, 32, 1280, 1280)]:
    key = f"conv3x3 f16 N{n} C{ci} H{h} W{w} K{co}"
    if not wanted(key):
        continue
    flop = 2.0 * n * h * w * co * ci * 9
    wt, bias = torch.randn(co, ci, 3, 3, device=dev, dtype=torch.float16), torch.randn(co, device=dev, dtype=torch.float16)
    for variant, fmt in [("torch NCHW", torch.contiguous_format), ("torch channels_last", torch.channels_last)]:
        xs = [torch.randn(n, ci, h, w, device=dev, dtype=torch.float16).to(memory_format=fmt) for _ in range(2)]
        wf = wt.to(memory_format=fmt)
        k = [0]

        def f():
            k[0] ^= 1
            return F.conv2d(xs[k[0]], wf, bias, padding=1)
        peer(key, variant, bench(f), 0.0, flop)

for n, h, w, c in [(8, 72, 128, 512), (8, 144, 256, 512), (8, 288, 512, 256), (32, 18, 32, 1280), (32, 36, 64, 640)]:
    key = f"upsample_conv3x3 f16 N{n} C{c} H{h} W{w}"  # diffusers Upsample2D: interpolate, then conv
    if not wanted(key):
        continue
    flop = 2.0 * n * 4 * h * w * c * c * 9
    wt, bias = torch.randn(c, c, 3, 3, device=dev, dtype=torch.float16), torch.randn(c, device=dev, dtype=torch.float16)
    for variant, fmt in [("torch NCHW", torch.contiguous_format), ("torch channels_last", torch.channels_last)]:
        xs = [torch.randn(n, c, h, w, device=dev, dtype=torch.float16).to(memory_format=fmt) for _ in range(2)]
        wf = wt.to(memory_format=fmt)
        k = [0]

        def f():
            k[0] ^= 1
            up = F.interpolate(xs[k[0]], scale_factor=2.0, mode="nearest")
            return F.conv2d(up, wf, bias, padding=1)
        peer(f"{key} subpixel", variant, bench(f), 0.0, flop)

for m, kd, nd in [(8192, 640, 640), (2048, 1280, 10240), (65536, 320, 320), (294912, 320, 320), (294912, 320, 960),
                  (294912, 1280, 320), (73728, 640, 5120), (18432, 1280, 10240)]:
    key = f"linear f16 M{m} K{kd} N{nd}"
    if not wanted(key):
        continue
    xs = [torch.randn(m, kd, device=dev, dtype=torch.float16) for _ in range(2)]
    wt, bias = torch.randn(nd, kd, device=dev, dtype=torch.float16), torch.randn(nd, device=dev, dtype=torch.float16)
    k = [0]

    def f():
        k[0] ^= 1
        return F.linear(xs[k[0]], wt, bias)
    peer(key, "torch", bench(f), 0.0, 2.0 * m * kd * nd)

# diffusers' GEGLU (ff.net.0): the projection, chunk(2) into hidden states and gate, hidden * gelu(gate).
for m, kd, dim in [(73728, 640, 2560), (18432, 1280, 5120), (8192, 640, 2560), (294912, 320, 1280)]:
    key = f"linear_geglu f16 M{m} K{kd} D{dim}"
    if not wanted(key):
        continue
    xs = [torch.randn(m, kd, device=dev, dtype=torch.float16) for _ in range(2)]
    wt, bias = torch.randn(2 * dim, kd, device=dev, dtype=torch.float16), torch.randn(2 * dim, device=dev, dtype=torch.float16)
    k = [0]

    def f():
        k[0] ^= 1
        hidden, gate = F.linear(xs[k[0]], wt, bias).chunk(2, dim=-1)
        return hidden * F.gelu(gate)
    ms = bench(f)
    for route in ("composed", "fused"):
        peer(f"{key} {route}", "torch", ms, 2.0 * (m * kd + 2 * dim * kd + m * dim), 2.0 * m * kd * 2 * dim)

# Temporal attention as diffusers runs it: sequences [B*H*W, heads, F, d] through SDPA (the
# reshapes/transposes around it are not timed, which favours PyTorch).
for h, w, c in [(72, 128, 320), (36, 64, 640), (18, 32, 1280)]:
    key = f"temporal_attention f16 N32 C{c} H{h} W{w}"
    if not wanted(key):
        continue
    shape = (2 * h * w, 8, 16, c // 8)
    sets = [[torch.randn(shape, device=dev, dtype=torch.float16) for _ in range(3)] for _ in range(2)]
    k = [0]

    def f():
        k[0] ^= 1
        return F.scaled_dot_product_attention(*sets[k[0]])
    numel = 32 * h * w * c
    peer(key, "torch SDPA", bench(f), 4.0 * numel * 2, 4.0 * 2 * h * w * 8 * 16 * 16 * (c // 8))

# Flash attention as diffusers calls SDPA: [b, s, h*d] activations viewed as [b, h, s, d].
for batch, sq, sk, heads in [(32, 2304, 2304, 10), (32, 576, 576, 20), (2, 4096, 4096, 10), (32, 2304, 77, 10),
                             (32, 2304, 154, 10), (32, 2304, 231, 10), (32, 576, 77, 20), (2, 4096, 77, 10),
                             (2, 1024, 77, 20)]:
    key = f"flash_attention f16 b{batch} h{heads} sq{sq} sk{sk}"
    if not wanted(key):
        continue
    def view(t):
        return t.view(t.shape[0], t.shape[1], heads, 64).transpose(1, 2)
    sets = [[torch.randn(batch, n, heads * 64, device=dev, dtype=torch.float16) for n in (sq, sk, sk)] for _ in range(2)]
    k = [0]

    def f():
        k[0] ^= 1
        q_, k_, v_ = (view(t) for t in sets[k[0]])
        return F.scaled_dot_product_attention(q_, k_, v_)
    peer(key, "torch SDPA", bench(f), 2.0 * 2 * batch * (sq + sk) * heads * 64, 4.0 * batch * heads * sq * sk * 64)

# The VAE mid-block attention as diffusers runs it: SDPA on [b, 1 head, tokens, 512].
for batch, tokens in [(4, 9216), (1, 16384)]:
    key = f"gemm_attention f16 b{batch} h1 d512 s{tokens}"
    if not wanted(key):
        continue
    sets = [[torch.randn(batch, 1, tokens, 512, device=dev, dtype=torch.float16) for _ in range(3)] for _ in range(2)]
    k = [0]

    def f():
        k[0] ^= 1
        return F.scaled_dot_product_attention(*sets[k[0]])
    peer(key, "torch SDPA", bench(f), 4.0 * batch * tokens * 512 * 2, 4.0 * batch * tokens * tokens * 512)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            peer(key, "torch SDPA math", bench(f), 4.0 * batch * tokens * 512 * 2, 4.0 * batch * tokens * tokens * 512)
    except RuntimeError as e:
        print(f"# {key}: math backend failed: {e}")

# LoRA merge into one weight, four LoRAs (ranks 32, 64, 128, 64; the keys of benches/ops.rs):
# as PEFT merges adapters (per adapter: delta = (B @ A) * scaling, then weight += delta, in the
# weight's dtype: peft tuners/lora/layer.py, Linear.merge and get_delta_weight), and as one
# in-place GEMM over the concatenated factors (addmm_, beta = 1; its factors pre-scaled).
lora_terms = [(32, 0.5), (64, 0.4), (128, 0.25), (64, 0.125)]
for out, kernel, inner in [(640, 1, 640), (1280, 1, 1280), (10240, 1, 1280), (1280, 1, 5120), (320, 9, 320), (1280, 9, 1280)]:
    cols = kernel * inner
    shape = f"O{out} C{cols}" if kernel == 1 else f"O{out} C{cols} (3x3 conv, in {inner})"
    key = f"lora_merge f16 {shape} r32+64+128+64"
    if not wanted(key):
        continue
    half = dict(device=dev, dtype=torch.float16)
    sets = [(torch.randn(out, cols, **half), [(torch.randn(out, r, **half) * 0.05, torch.randn(r, cols, **half) * 0.05)
                                              for r, _ in lora_terms]) for _ in range(2)]
    cats = [(torch.cat([u for u, _ in fs], 1), torch.cat([d for _, d in fs], 0)) for _, fs in sets]
    rank_sum = sum(r for r, _ in lora_terms)
    nbytes = 2.0 * out * cols * 2 + sum((out + cols) * r * 2 for r, _ in lora_terms)
    flop = 2.0 * out * cols * rank_sum
    k = [0]

    def per_adapter():
        k[0] ^= 1
        w, fs = sets[k[0]]
        for (up, down), (_, scaling) in zip(fs, lora_terms):
            w += (up @ down) * scaling

    def one_gemm():
        k[0] ^= 1
        sets[k[0]][0].addmm_(*cats[k[0]])
    peer(key, "peft merge per adapter", bench(per_adapter), nbytes, flop)
    peer(key, f"torch addmm_ (one GEMM, K={rank_sum})", bench(one_gemm), nbytes, flop)

# Memory ceiling of this GPU: device-to-device copy of 1 GiB, bytes read + written.
src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
ms = bench(lambda: dst.copy_(src))
print("PEER " + json.dumps({"key": "copy 1GiB", "variant": "torch copy_", "ms": round(ms, 5), "gbps": round(2 * (1 << 30) / ms / 1e6, 1)}))
