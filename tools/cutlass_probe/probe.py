# Measurement probe (tools/cutlass_probe/run.sh): the CUTLASS GEMM forms, the GEGLU epilogue and
# the FP8 GEMMs with per-row scales beside torch.mm, PyTorch's composed GEGLU and torch._scaled_mm
# on the same GPU in one run; median of 50 after 10 warm-ups, inputs alternating between two
# buffers, outputs checked against f32 references.
import ctypes
import os
import sys

import torch
import torch.nn.functional as F

folder = sys.argv[1]


def library(name):
    """The probe object's shared library, or None where run.sh had no object to link."""
    path = f"{folder}/{name}.so"
    return ctypes.CDLL(path) if os.path.exists(path) else None


gemms, geglu, fp8 = library("gemm_variants"), library("geglu_epilogue"), library("fp8_rows")
FORMS = ["coop_128x256_c2x1", "coop_256x128_c2x1", "coop_256x128_c1x2", "ping_128x128_c2x1", "ping_128x128_c1x2",
         "ping_64x256_c1x1"]
P = ctypes.c_void_p
workspace = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")


def stream():
    return P(torch.cuda.current_stream().cuda_stream)


def median_ms(fn, reps=50, warm=10):
    for r in range(warm):
        fn(r)
    times = []
    for r in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(r)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[reps // 2]


def rel(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


print("| M K N | torch.mm ms (TFLOP/s) | " + " | ".join(FORMS) + " |")
for m, k, n in [(73728, 640, 5120), (18432, 1280, 10240), (294912, 320, 2560), (8192, 640, 5120),
                (294912, 320, 320), (294912, 320, 960), (294912, 1280, 320)] if gemms else []:
    xs = [torch.randn(m, k, device="cuda", dtype=torch.half) for _ in range(2)]
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).half()
    d = torch.empty(m, n, device="cuda", dtype=torch.half)
    want = xs[0].float() @ w.float().t()
    flop = 2 * m * k * n
    t = median_ms(lambda r: torch.mm(xs[r % 2], w.t(), out=d))
    row = [f"M{m} K{k} N{n}", f"{t:.4f} ({flop / t / 1e9:.0f})"]
    for form in FORMS:
        f = getattr(gemms, form)
        d.fill_(float("nan"))
        rc = f(m, n, k, P(xs[0].data_ptr()), P(w.data_ptr()), P(d.data_ptr()), P(workspace.data_ptr()), stream())
        torch.cuda.synchronize()
        if rc:
            row.append(f"rc {rc}")
            continue
        err = rel(d, want)
        t = median_ms(lambda r: f(m, n, k, P(xs[r % 2].data_ptr()), P(w.data_ptr()), P(d.data_ptr()),
                                  P(workspace.data_ptr()), stream()))
        row.append(f"{t:.4f} ({flop / t / 1e9:.0f}) err {err:.1e}")
    print("| " + " | ".join(row) + " |", flush=True)
    del xs, d, want
    torch.cuda.empty_cache()

print("\n| M K D | torch composed GEGLU ms | geglu_coop_128x256 | geglu_ping_128x128 |")
for m, k, dim in [(73728, 640, 2560), (18432, 1280, 5120), (294912, 320, 1280), (8192, 640, 2560)] if geglu else []:
    n = 2 * dim
    xs = [torch.randn(m, k, device="cuda", dtype=torch.half) for _ in range(2)]
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).half()
    bias = (0.1 * torch.randn(n, device="cuda")).half()
    # Rows 16 b + i: value 8 b + i; rows 16 b + 8 + i: its gate.
    order = torch.stack([torch.arange(dim, device="cuda").view(-1, 8), dim + torch.arange(dim, device="cuda").view(-1, 8)],
                        1).reshape(-1)
    w_interleaved, bias_interleaved = w[order].contiguous(), bias[order].contiguous()
    y = torch.empty(m, dim, device="cuda", dtype=torch.half)
    h = xs[0].float() @ w.float().t() + bias.float()
    want = h[:, :dim] * F.gelu(h[:, dim:])
    del h

    def composed(r):
        value, gate = F.linear(xs[r % 2], w, bias).chunk(2, -1)
        return value * F.gelu(gate)

    row = [f"M{m} K{k} D{dim}", f"{median_ms(composed):.4f}"]
    for form in ["geglu_coop_128x256", "geglu_ping_128x128"]:
        f = getattr(geglu, form)
        args = lambda r: (m, n, k, P(xs[r % 2].data_ptr()), P(w_interleaved.data_ptr()), P(bias_interleaved.data_ptr()),
                          P(y.data_ptr()), P(workspace.data_ptr()), stream())
        y.fill_(float("nan"))
        rc = f(*args(0))
        torch.cuda.synchronize()
        if rc:
            row.append(f"rc {rc}")
            continue
        err = rel(y, want)
        row.append(f"{median_ms(lambda r: f(*args(r))):.4f} err {err:.1e}")
    print("| " + " | ".join(row) + " |", flush=True)
    del xs, y, want
    torch.cuda.empty_cache()


# FP8 (e4m3) with a scale per token and per output channel: the shapes of celframe's FP8 linears
# (q/k/v 3C and the GEGLU projection 8C at the UNet's b32 levels 1 and 2, the motion modules'
# level-0 q/k/v, level 1 at b2 1024x1024).
FP8_FORMS = ["fp8_coop_128x256_c2x1", "fp8_ping_128x128_c2x1", "fp8_ping_128x128_c1x2"]
E4M3 = torch.float8_e4m3fn


def rows_e4m3(t):
    s = t.float().abs().amax(dim=1, keepdim=True) / 448.0
    return (t.float() / s).to(E4M3), s


print("\n| M K N | torch.mm f16 ms (TFLOP/s) | _scaled_mm per tensor | _scaled_mm per row | " + " | ".join(FP8_FORMS) + " |")
for m, k, n in [(73728, 640, 1920), (73728, 640, 5120), (18432, 1280, 3840), (18432, 1280, 10240),
                (294912, 320, 960), (8192, 640, 1920)] if fp8 else []:
    xs = [torch.randn(m, k, device="cuda", dtype=torch.half) for _ in range(2)]
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).half()
    d = torch.empty(m, n, device="cuda", dtype=torch.half)
    flop = 2 * m * k * n
    t = median_ms(lambda r: torch.mm(xs[r % 2], w.t(), out=d))
    row = [f"M{m} K{k} N{n}", f"{t:.4f} ({flop / t / 1e9:.0f})"]
    xq = [rows_e4m3(x) for x in xs]
    wq, sw = rows_e4m3(w)
    want = (xq[0][0].float() * xq[0][1]) @ (wq.float() * sw).t()
    # per tensor: the rows' scales folded into one
    xt = [((x.float() / (x.float().abs().amax() / 448.0)).to(E4M3), x.float().abs().amax() / 448.0) for x in xs]
    wt_scale = w.float().abs().amax() / 448.0
    wt = (w.float() / wt_scale).to(E4M3)
    for rowwise in (False, True):
        try:
            if rowwise:
                f = lambda r: torch._scaled_mm(xq[r % 2][0], wq.t(), scale_a=xq[r % 2][1], scale_b=sw.reshape(1, n),
                                               out_dtype=torch.half, use_fast_accum=True)
            else:
                f = lambda r: torch._scaled_mm(xt[r % 2][0], wt.t(), scale_a=xt[r % 2][1], scale_b=wt_scale,
                                               out_dtype=torch.half, use_fast_accum=True)
            f(0)
            t = median_ms(f)
            row.append(f"{t:.4f} ({flop / t / 1e9:.0f})")
        except RuntimeError as e:
            row.append(str(e).splitlines()[0][:60])
    sws = sw.reshape(-1).contiguous()
    for form in FP8_FORMS:
        g = getattr(fp8, form)
        args = lambda r: (m, n, k, P(xq[r % 2][0].data_ptr()), P(wq.data_ptr()), P(xq[r % 2][1].data_ptr()),
                          P(sws.data_ptr()), P(d.data_ptr()), P(workspace.data_ptr()), stream())
        d.fill_(float("nan"))
        rc = g(*args(0))
        torch.cuda.synchronize()
        if rc:
            row.append(f"rc {rc}")
            continue
        err = rel(d, want)
        t = median_ms(lambda r: g(*args(r)))
        row.append(f"{t:.4f} ({flop / t / 1e9:.0f}) err {err:.1e}")
    print("| " + " | ".join(row) + " |", flush=True)
    del xs, d, want, xq, xt
    torch.cuda.empty_cache()
