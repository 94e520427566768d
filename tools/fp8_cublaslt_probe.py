#!/usr/bin/env python3
"""Which FP8 (e4m3) matmuls does this machine's cuBLASLt run, and how fast?

A diagnostic for the GPU machine (no Rust build needed, so one device call can try many forms):
calls libcublasLt through ctypes with the descriptors celframe's `Blas::gemm` makes for an FP8
linear (src/gpu/blas.rs: our weight [N, K] is cuBLASLt's transposed A, the activations [M, K] its
B, D [M, N] row-major), then varies one thing at a time: where the scale sits (4 bytes into an
allocation, as celframe's scalars were before 0251ffe, or at its start), C (= D, none, apart with
beta 1), fast accumulation, the output dtype, the bias epilogue, and per-row scale vectors
(CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, one scale per token and per output channel).
torch._scaled_mm on the same operands is the control. Each form prints whether the heuristic
found an algorithm, what cublasLtMatmul returned, and the output's relative L2 error from the
dequantized product computed in fp32; then the forms that ran are timed at an SDXL shape beside
torch.mm in f16.

    python3 tools/fp8_cublaslt_probe.py [--log]     (--log: cuBLASLt's error and hint messages)
"""
import ctypes
import os
import sys

if "--log" in sys.argv:
    # Errors (1) and hints (4), before the library loads.
    os.environ["CUBLASLT_LOG_MASK"] = "5"

import torch  # noqa: E402

# cuBLASLt's C enums (cublasLt.h / library_types.h of CUDA 13).
R_32F, R_16F, R_16BF, R_8F_E4M3 = 0, 2, 14, 28
COMPUTE_32F = 68
OP_N, OP_T = 0, 1
TRANSA, TRANSB, EPILOGUE, BIAS_POINTER = 3, 4, 7, 8
A_SCALE_POINTER, B_SCALE_POINTER, FAST_ACCUM, BIAS_DATA_TYPE = 17, 18, 25, 26
A_SCALE_MODE, B_SCALE_MODE = 31, 32
SCALE_SCALAR_32F, SCALE_OUTER_VEC_32F = 0, 3
EPILOGUE_BIAS = 4
PREF_MAX_WORKSPACE_BYTES = 1
STATUS = {0: "SUCCESS", 1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH",
          13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED"}
WORKSPACE = 32 << 20  # celframe's


class Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def load_cublaslt():
    torch.ones(16, 16, device="cuda") @ torch.ones(16, 16, device="cuda")  # loads cuBLAS(Lt)
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublasLt.so" in line}
    if not paths:
        sys.exit("fp8_cublaslt_probe: libcublasLt is not loaded in this process")
    path = sorted(paths)[0]
    lib = ctypes.CDLL(path)
    version = lib.cublasLtGetVersion()
    print(f"cuBLASLt {version} from {path}; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    return lib


LT = load_cublaslt()
VP = ctypes.c_void_p


def check(what, status):
    if status != 0:
        raise RuntimeError(f"{what}: {STATUS.get(status, status)}")


def set_attr(desc, attr, value):
    check(f"set attribute {attr}", LT.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(value),
                                                                  ctypes.sizeof(value)))


def layout(dtype, rows, cols, ld):
    out = VP()
    check("layout", LT.cublasLtMatrixLayoutCreate(ctypes.byref(out), dtype, ctypes.c_uint64(rows),
                                                  ctypes.c_uint64(cols), ctypes.c_int64(ld)))
    return out


HANDLE = VP()
check("cublasLtCreate", LT.cublasLtCreate(ctypes.byref(HANDLE)))
WORKSPACE_MEM = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")


def e4m3(x):
    """Per-tensor scale s = amax / 448 and x / s as e4m3 (what celframe's fp8 kernels do)."""
    s = x.abs().amax().float() / 448.0
    return (x.float() / s).to(torch.float8_e4m3fn), s


def e4m3_rows(x):
    """One scale per row."""
    s = x.abs().amax(dim=1, keepdim=True).float() / 448.0
    return (x.float() / s).to(torch.float8_e4m3fn), s


class Form:
    def __init__(self, name, scale_offset=0, c="d", fast=1, out=torch.float16, bias=False, rows=False):
        self.name, self.scale_offset, self.c, self.fast = name, scale_offset, c, fast
        self.out, self.bias, self.rows = out, bias, rows


def run_form(form, m, n, k, timed=False):
    """Returns (heuristic note, matmul status, rel L2 or None, ms or None)."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=form.out)
    w = torch.randn(n, k, device="cuda", dtype=form.out) * 0.05
    if form.rows:
        xq, sx = e4m3_rows(x)
        wq, sw = e4m3_rows(w)
        sx_buf, sw_buf = sx.reshape(-1).contiguous(), sw.reshape(-1).contiguous()
        ref = (xq.float() * sx) @ (wq.float() * sw).T
    else:
        xq, sx = e4m3(x)
        wq, sw = e4m3(w)
        # A scalar `scale_offset` bytes into its allocation.
        sx_buf = torch.zeros(64, device="cuda")
        sw_buf = torch.zeros(64, device="cuda")
        sx_buf[form.scale_offset // 4] = sx
        sw_buf[form.scale_offset // 4] = sw
        ref = (xq.float() @ wq.float().T) * (sx * sw)
    bias = torch.randn(n, device="cuda", dtype=form.out) if form.bias else None
    if bias is not None:
        ref = ref + bias.float()
    resid = torch.randn(m, n, device="cuda", dtype=form.out) if form.c == "apart" else None
    if resid is not None:
        ref = ref + resid.float()
    d = torch.full((m, n), float("nan"), device="cuda", dtype=form.out)
    out_type = R_16F if form.out == torch.float16 else R_16BF

    desc = VP()
    check("desc", LT.cublasLtMatmulDescCreate(ctypes.byref(desc), COMPUTE_32F, R_32F))
    set_attr(desc, TRANSA, ctypes.c_int32(OP_T))
    set_attr(desc, TRANSB, ctypes.c_int32(OP_N))
    set_attr(desc, FAST_ACCUM, ctypes.c_int8(form.fast))
    if form.bias:
        set_attr(desc, EPILOGUE, ctypes.c_uint32(EPILOGUE_BIAS))
        set_attr(desc, BIAS_DATA_TYPE, ctypes.c_int32(out_type))
        set_attr(desc, BIAS_POINTER, VP(bias.data_ptr()))
    if form.rows:
        set_attr(desc, A_SCALE_MODE, ctypes.c_int32(SCALE_OUTER_VEC_32F))
        set_attr(desc, B_SCALE_MODE, ctypes.c_int32(SCALE_OUTER_VEC_32F))
    # cuBLASLt's A is the weight, its B the activations.
    set_attr(desc, A_SCALE_POINTER, VP(sw_buf.data_ptr() + form.scale_offset))
    set_attr(desc, B_SCALE_POINTER, VP(sx_buf.data_ptr() + form.scale_offset))
    a_l, b_l, d_l = layout(R_8F_E4M3, k, n, k), layout(R_8F_E4M3, k, m, k), layout(out_type, n, m, n)
    try:
        return matmul_forms(form, desc, (a_l, b_l, d_l), (wq, xq, d, resid), ref, timed)
    finally:
        LT.cublasLtMatmulDescDestroy(desc)
        for lay in (a_l, b_l, d_l):
            LT.cublasLtMatrixLayoutDestroy(lay)


def heuristic(desc, a_l, b_l, d_l):
    """cuBLASLt's status, candidate count and top 8 candidates for `desc` (C laid out as D)."""
    pref = VP()
    check("pref", LT.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)))
    ws = ctypes.c_uint64(WORKSPACE)
    check("pref ws", LT.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8))
    results = (Heuristic * 8)()
    found = ctypes.c_int(0)
    status = LT.cublasLtMatmulAlgoGetHeuristic(HANDLE, desc, a_l, b_l, d_l, d_l, pref, 8, results, ctypes.byref(found))
    LT.cublasLtMatmulPreferenceDestroy(pref)
    return status, found, results


def matmul_forms(form, desc, layouts, tensors, ref, timed):
    """The heuristic's candidates for `desc`, each tried once; the first that runs checked (and timed)."""
    a_l, b_l, d_l = layouts
    wq, xq, d, resid = tensors

    status, found, results = heuristic(desc, a_l, b_l, d_l)
    if status != 0 or found.value == 0:
        return f"heuristic {STATUS.get(status, status)}, {found.value} found", "-", None, None
    alpha = ctypes.c_float(1.0)
    beta = ctypes.c_float(1.0 if form.c == "apart" else 0.0)
    c_ptr = {"d": d.data_ptr(), "none": None, "apart": resid.data_ptr() if resid is not None else None}[form.c]
    stream = VP(torch.cuda.current_stream().cuda_stream)

    def matmul(i):
        return LT.cublasLtMatmul(HANDLE, desc, ctypes.byref(alpha), VP(wq.data_ptr()), a_l, VP(xq.data_ptr()), b_l,
                                 ctypes.byref(beta), VP(c_ptr), d_l, VP(d.data_ptr()), d_l,
                                 ctypes.byref(results[i].algo), VP(WORKSPACE_MEM.data_ptr()),
                                 ctypes.c_size_t(WORKSPACE), stream)

    statuses = [matmul(i) for i in range(found.value)]
    runs = [i for i, s in enumerate(statuses) if s == 0]
    note = f"{found.value} found; matmul #1 {STATUS.get(statuses[0], statuses[0])}"
    if runs and runs[0] != 0:
        note += f"; first that runs: #{runs[0] + 1}"
    if not runs:
        return note, STATUS.get(statuses[0], statuses[0]), None, None
    matmul(runs[0])  # the output of the first candidate that runs
    torch.cuda.synchronize()
    err = ((d.float() - ref).norm() / ref.norm()).item()
    ms = time_ms(lambda: matmul(runs[0])) if timed else None
    return note, "SUCCESS", err, ms


def time_ms(fn, warmup=10, runs=50):
    for _ in range(warmup):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    return times[len(times) // 2]


def torch_control(m, n, k, rows):
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.05
    if rows:
        xq, sx = e4m3_rows(x)
        wq, sw = e4m3_rows(w)
        sw = sw.reshape(1, n)
        ref = (xq.float() * sx) @ (wq.float() * sw.T).T
    else:
        xq, sx = e4m3(x)
        wq, sw = e4m3(w)
        ref = (xq.float() @ wq.float().T) * (sx * sw)
    try:
        out = torch._scaled_mm(xq, wq.T, scale_a=sx.reshape(-1, 1) if rows else sx, scale_b=sw if rows else sw,
                               out_dtype=torch.float16, use_fast_accum=True)
    except RuntimeError as e:
        return str(e).splitlines()[0][:100], None
    return "SUCCESS", ((out.float() - ref).norm() / ref.norm()).item()


def main():
    forms = [
        Form("celframe before 0251ffe: scale 4 bytes in, C = D", scale_offset=4),
        Form("scale aligned, C = D (celframe now)"),
        Form("scale aligned, C none", c="none"),
        Form("scale 4 bytes in, C none", scale_offset=4, c="none"),
        Form("scale aligned, C = D, no fast accumulation", fast=0),
        Form("scale aligned, C = D, bf16", out=torch.bfloat16),
        Form("scale aligned, C = D, bias epilogue", bias=True),
        Form("scale aligned, C apart, beta 1", c="apart"),
        Form("per-row scales (outer vectors), C = D", rows=True),
        Form("per-row scales, C none", rows=True, c="none"),
        Form("per-row scales, bias epilogue", rows=True, bias=True),
    ]
    print(f"\n{'form':58} {'m,n,k':>16}  heuristic / matmul -> rel L2")
    for m, n, k in ((256, 256, 128), (8192, 640, 640)):
        for f in forms:
            try:
                note, status, err, _ = run_form(f, m, n, k)
            except RuntimeError as e:
                note, status, err = f"error: {e}", "-", None
            print(f"FP8PROBE {f.name:58} {f'{m},{n},{k}':>16}  {note} -> "
                  + (f"{err:.3e}" if err is not None else status))
        for rows in (False, True):
            status, err = torch_control(m, n, k, rows)
            name = "torch._scaled_mm " + ("per-row" if rows else "per-tensor")
            print(f"FP8PROBE {name:58} {f'{m},{n},{k}':>16}  {status}" + (f" -> {err:.3e}" if err is not None else ""))

    # Speed at the UNet's b32 shapes (M = tokens, K = C, N = 3C q/k/v or 8C GEGLU projection).
    print("\nFP8 speed (median of 50 after 10 warm-ups, CUDA events; TFLOP/s at 2 MNK)")
    for m, k, n in ((73728, 640, 1920), (73728, 640, 5120), (18432, 1280, 10240), (294912, 320, 960)):
        flops = 2 * m * n * k
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        f16 = time_ms(lambda: torch.mm(x, w.T))
        row = f"FP8SPEED M{m} K{k} N{n}: torch f16 {f16:.4f} ms ({flops / f16 / 1e9:.0f} TF/s)"
        for f in (Form("tensor"), Form("rows", rows=True)):
            try:
                _, status, _, ms = run_form(f, m, n, k, timed=True)
            except RuntimeError as e:
                status, ms = str(e), None
            row += f"; ours {f.name} " + (f"{ms:.4f} ms ({flops / ms / 1e9:.0f} TF/s)" if ms else status)
        xq, sx = e4m3(x)
        wq, sw = e4m3(w)
        ms = time_ms(lambda: torch._scaled_mm(xq, wq.T, scale_a=sx, scale_b=sw, out_dtype=torch.float16,
                                              use_fast_accum=True))
        row += f"; torch._scaled_mm {ms:.4f} ms ({flops / ms / 1e9:.0f} TF/s)"
        print(row)
        del x, w, xq, wq
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
