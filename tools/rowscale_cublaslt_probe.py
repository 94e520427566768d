#!/usr/bin/env python3
"""Does this machine's cuBLASLt scale a 16-bit GEMM's output rows by a device vector, and how fast?

A diagnostic for the GPU machine, for folding a LayerNorm into the GEMM after it: LN(x) W^T =
rstd * ((x - mean) W'^T) + W beta with W' = W diag(gamma). The statistics pass would write -mean
and the std into spare columns of x (its row stride K + 8, the weights' extra columns holding
the column sums of W' and W beta), so the GEMM reads raw x and needs only one scale per token
(alpha, CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO: "alpha/beta vector lengths must match
number of output matrix rows"). In celframe's layout (tools/fp8_cublaslt_probe.py's: our weight
[N, K] is cuBLASLt's transposed A, the activations [M, K] its B, D column-major N x M) D's rows
are the channels, so the forms below also try row-major layouts (CUBLASLT_ORDER_ROW), where D's
rows are the tokens. Each form prints whether the heuristic found an algorithm, what
cublasLtMatmul returned and the relative L2 error from the product in fp32; then the fold itself
runs end to end against an fp32 LayerNorm-then-linear beside today's f16 path, and the forms are
timed at the UNet's q/k/v shapes (K + 8) beside the plain GEMM celframe runs today (K).

    python3 tools/rowscale_cublaslt_probe.py [--log]     (--log: cuBLASLt's error and hint messages)
"""
import ctypes

import torch

# The FP8 probe's ctypes bindings (loading it loads cuBLASLt and makes the handle).
from fp8_cublaslt_probe import (COMPUTE_32F, HANDLE, LT, OP_N, OP_T, R_16F, R_32F, STATUS, TRANSA, TRANSB, VP,
                                WORKSPACE, WORKSPACE_MEM, check, heuristic, layout, set_attr, time_ms)

POINTER_MODE = 2  # CUBLASLT_MATMUL_DESC_POINTER_MODE
ALPHA_VECTOR_BETA_ZERO = 3  # cublasLtPointerMode_t
LAYOUT_ORDER, ORDER_ROW = 1, 1  # CUBLASLT_MATRIX_LAYOUT_ORDER, CUBLASLT_ORDER_ROW


def row_layout(rows, cols):
    out = layout(R_16F, rows, cols, cols)
    order = ctypes.c_int32(ORDER_ROW)
    check("layout order", LT.cublasLtMatrixLayoutSetAttribute(out, LAYOUT_ORDER, ctypes.byref(order),
                                                                     ctypes.c_size_t(4)))
    return out


def gemm(rows_order, x, w, alpha=None, timed=False):
    """D [M, N] = alpha * (x [M, K] . w [N, K]^T) in f16: row-major layouts or celframe's, alpha a
    device vector (per token with rows_order, per channel without) or 1. Returns (note, D or None,
    ms or None)."""
    (m, k), n = x.shape, w.shape[0]
    d = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    desc = VP()
    check("desc", LT.cublasLtMatmulDescCreate(ctypes.byref(desc), COMPUTE_32F, R_32F))
    if rows_order:
        set_attr(desc, TRANSA, ctypes.c_int32(OP_N))
        set_attr(desc, TRANSB, ctypes.c_int32(OP_T))
        a_l, b_l, d_l = row_layout(m, k), row_layout(n, k), row_layout(m, n)
        a, b = x, w
    else:
        set_attr(desc, TRANSA, ctypes.c_int32(OP_T))
        set_attr(desc, TRANSB, ctypes.c_int32(OP_N))
        a_l, b_l, d_l = layout(R_16F, k, n, k), layout(R_16F, k, m, k), layout(R_16F, n, m, n)
        a, b = w, x
    if alpha is not None:
        set_attr(desc, POINTER_MODE, ctypes.c_int32(ALPHA_VECTOR_BETA_ZERO))
    try:
        status, found, results = heuristic(desc, a_l, b_l, d_l)
        if status != 0 or found.value == 0:
            return f"heuristic {STATUS.get(status, status)}, {found.value} found", None, None
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        alpha_arg = VP(alpha.data_ptr()) if alpha is not None else ctypes.byref(one)
        stream = VP(torch.cuda.current_stream().cuda_stream)

        def matmul():
            return LT.cublasLtMatmul(HANDLE, desc, alpha_arg, VP(a.data_ptr()), a_l, VP(b.data_ptr()), b_l,
                                     ctypes.byref(zero), VP(d.data_ptr()), d_l, VP(d.data_ptr()), d_l,
                                     ctypes.byref(results[0].algo), VP(WORKSPACE_MEM.data_ptr()),
                                     ctypes.c_size_t(WORKSPACE), stream)

        status = matmul()
        torch.cuda.synchronize()
        note = f"{found.value} found; matmul #1 {STATUS.get(status, status)}"
        if status != 0:
            return note, None, None
        return note, d, time_ms(matmul) if timed else None
    finally:
        LT.cublasLtMatmulDescDestroy(desc)
        for lay in (a_l, b_l, d_l):
            LT.cublasLtMatrixLayoutDestroy(lay)


def run_form(rows_order, vector, m, n, k, timed=False):
    """One form on random operands: (note, rel L2 from the fp32 product or None, ms or None)."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.05
    alpha = (torch.rand(m if rows_order else n, device="cuda") + 0.5) if vector else None
    ref = x.float() @ w.float().T
    if vector:
        ref = ref * (alpha[:, None] if rows_order else alpha[None, :])
    note, d, ms = gemm(rows_order, x, w, alpha, timed)
    return note, None if d is None else rel_l2(d, ref), ms


def rel_l2(d, ref):
    return ((d.float() - ref).norm() / ref.norm()).item()


def hi_lo(v):
    """v (fp32) as two f16 parts whose sum carries ~22 bits."""
    hi = v.half()
    return hi, (v - hi.float()).half()


def fold_check(m, n, k, mean_over_std):
    """LayerNorm then linear as the fold computes it (statistics in x's spare columns, rstd as the
    per-token alpha) beside today's f16 LayerNorm then GEMM, both against fp32: rel L2 of each."""
    torch.manual_seed(1)
    x = (torch.randn(m, k, device="cuda") + mean_over_std * torch.randn(m, 1, device="cuda")).half()
    gamma = (1 + 0.2 * torch.randn(k, device="cuda")).half()
    beta = (0.1 * torch.randn(k, device="cuda")).half()
    w = (0.04 * torch.randn(n, k, device="cuda")).half()
    ref = torch.nn.functional.layer_norm(x.float(), (k,), gamma.float(), beta.float()) @ w.float().T
    today = torch.nn.functional.layer_norm(x, (k,), gamma, beta) @ w.T
    mean = x.float().mean(1)
    var = x.float().var(1, unbiased=False)
    rstd = torch.rsqrt(var + 1e-5)
    w_folded = (w.float() * gamma.float()).half()
    u, b_folded = w_folded.float().sum(1), w.float() @ beta.float()
    (m_hi, m_lo), (s_hi, s_lo) = hi_lo(-mean), hi_lo(1 / rstd)
    (u_hi, u_lo), (b_hi, b_lo) = hi_lo(u), hi_lo(b_folded)
    zero_x, zero_w = torch.zeros(m, device="cuda").half(), torch.zeros(n, device="cuda").half()
    x_aug = torch.cat([x, torch.stack([m_hi, m_hi, m_lo, s_hi, s_hi, s_lo, zero_x, zero_x], 1)], 1)
    w_aug = torch.cat([w_folded, torch.stack([u_hi, u_lo, u_hi, b_hi, b_lo, b_hi, zero_w, zero_w], 1)], 1)
    note, d, _ = gemm(True, x_aug.contiguous(), w_aug.contiguous(), rstd.contiguous())
    fold = "did not run: " + note if d is None else f"{rel_l2(d, ref):.3e}"
    return f"today {rel_l2(today, ref):.3e}, fold {fold}"


FORMS = [("celframe's layout, alpha 1 (today)", False, False),
         ("celframe's layout, alpha per channel", False, True),
         ("row-major, alpha 1", True, False),
         ("row-major, alpha per token (the fold's form)", True, True)]


def main():
    print(f"\n{'form':48} {'m,n,k':>16}  heuristic / matmul -> rel L2")
    for m, n, k in ((256, 384, 136), (8192, 1920, 648)):
        for name, rows_order, vector in FORMS:
            note, err, _ = run_form(rows_order, vector, m, n, k)
            print(f"ROWPROBE {name:48} {f'{m},{n},{k}':>16}  {note}" + (f" -> {err:.3e}" if err is not None else ""))

    print("\nThe fold end to end (f16 operands, fp32 LayerNorm-then-linear as the reference)")
    for mean_over_std in (0.1, 1.0, 5.0, 20.0):
        print(f"ROWFOLD M8192 N1920 K640, row means {mean_over_std} x the deviation: "
              + fold_check(8192, 1920, 640, mean_over_std))

    # The UNet's q/k/v GEMMs at b32 1024x576 (levels 1 and 2) and the motion modules' level 0, each
    # with K + 8 for the fold's columns beside today's K.
    print("\nSpeed (median of 50 after 10 warm-ups, CUDA events; TFLOP/s at 2 MNK)")
    for m, n, k in ((73728, 1920, 640), (18432, 3840, 1280), (294912, 960, 320)):
        flops = 2 * m * n * k
        _, _, today = run_form(False, False, m, n, k, timed=True)
        row = f"ROWSPEED M{m} N{n} K{k}: today {today:.4f} ms ({flops / today / 1e9:.0f} TF/s)"
        for name, rows_order, vector in FORMS[1:]:
            _, _, ms = run_form(rows_order, vector, m, n, k + 8, timed=True)
            row += f"; {name} at K{k + 8} " + (f"{ms:.4f} ms" if ms else "did not run")
        print(row)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
