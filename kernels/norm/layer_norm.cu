// Layer norm over the last dimension, exact two-pass fp32 statistics, optional affine, optional
// per-row table added before the output's one rounding, optional per-channel shift added to x
// first (x + shift rounded to x's dtype, as a stream that had the shift added in a GEMM epilogue
// would hold it). Aligned rows of at most LN_REG_VECS * 256
// channels (every SDXL and motion-module width) stay in registers after one load, each row spread
// over the fewest lanes that hold it in LN_REG_VECS 8-element vectors a lane (ln_row_lanes: 8 lanes
// at C 320, 16 at 640, 32 at 1280), so a warp loads 32 / lanes rows at once; one warp per row left
// most of the lanes idle in the second load round at C 320 and 640 and kept too few bytes in flight
// (46% and 63% of the copy ceiling, against 64% at C 1280). Wider or unaligned rows take one warp
// each and are re-read from L1/L2 for the second and third pass. The e4m3 variant (E4M3, entry
// layer_norm_e4m3_*) writes each row as e4m3 bytes with its own scale (LayerNormParams::q) for an
// FP8 linear: the affine outputs are computed once and kept in registers (80 of them a thread,
// 3 blocks a multiprocessor: under the 64-register bound they spilled) while the row's max |y|
// is found, then written (multiplied by the row's 1 / scale).
#include "common.cuh"
#include "fp8.cuh"

#define LN_REG_VECS 5  // 8-element vectors per lane: 1280 channels

// Lanes a register-resident row is spread over (a power of two, so a warp holds whole rows): the
// fewest that hold C channels in LN_REG_VECS vectors each; 0 when the row does not qualify (C % 8,
// wider than LN_REG_VECS * 256, or a pointer not 16-byte aligned). The host computes the same to
// size the grid (src/ops/norm.rs, `layer_norm_row_lanes`).
__device__ __forceinline__ int ln_row_lanes(int C, bool aligned) {
    if (!aligned || C % 8 != 0 || C > LN_REG_VECS * 256) return 0;
    int lanes = 4;
    while (lanes * LN_REG_VECS * 8 < C) lanes *= 2;
    return lanes;
}

// Sum over the LANES lanes of a row's group (aligned groups of LANES lanes in the warp).
template <int LANES>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The register-resident path: a row of C <= LN_REG_VECS * 256 channels over LANES lanes, lane `sub`
// holding vectors sub, sub + LANES, ... Every lane of the warp runs the shuffles; a lane past the
// last row (`live` false) loads and stores nothing. The row stays packed (4 registers per 8 halves)
// and is unpacked in each pass: 8 floats per vector kept for all three passes took 66 registers (3
// blocks per multiprocessor); the same conversions in the same order give the same bits.
template <typename T, int LANES, bool E4M3>
__device__ __forceinline__ void layer_norm_in_registers(const LayerNormParams& p, int64_t row, int sub, bool live) {
    const int C = p.channels;
    const T* x = static_cast<const T*>(p.x) + row * C;
    T* y = static_cast<T*>(p.y) + row * C;
    const T* add = p.add ? static_cast<const T*>(p.add) + row / p.add_every * C : nullptr;
    const T* gamma = static_cast<const T*>(p.gamma);
    const T* beta = static_cast<const T*>(p.beta);
    const T* shift = static_cast<const T*>(p.shift);
    auto has = [&](int i) { return live && (sub + i * LANES) * 8 < C; };
    Vec8<T> raw[LN_REG_VECS];
    // All loads issue before the first use, so each lane keeps up to five 16-byte loads in flight.
#pragma unroll
    for (int i = 0; i < LN_REG_VECS; ++i)
        if (has(i)) raw[i] = load8<T>(x + (sub + i * LANES) * 8);
    // The shifted row, repacked: the three passes read it as they read x.
    if (shift) {
#pragma unroll
        for (int i = 0; i < LN_REG_VECS; ++i)
            if (has(i)) {
                float v[8], s[8];
                unpack8<T>(raw[i], v);
                unpack8<T>(load8<T>(shift + (sub + i * LANES) * 8), s);
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] += s[j];
                raw[i] = pack8<T>(v);
            }
    }
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_REG_VECS; ++i)
        if (has(i)) {
            float v[8];
            unpack8<T>(raw[i], v);
#pragma unroll
            for (int j = 0; j < 8; ++j) sum += v[j];
        }
    const float mean = group_sum<LANES>(sum) / C;
    float m2 = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_REG_VECS; ++i)
        if (has(i)) {
            float v[8];
            unpack8<T>(raw[i], v);
#pragma unroll
            for (int j = 0; j < 8; ++j) m2 += (v[j] - mean) * (v[j] - mean);
        }
    const float rstd = rsqrtf(group_sum<LANES>(m2) / C + p.eps);
    // The affine output of vector i, in fp32.
    auto affine = [&](int i, float v[8]) {
        const int c = (sub + i * LANES) * 8;
        float g[8] = {1, 1, 1, 1, 1, 1, 1, 1}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        unpack8<T>(raw[i], v);
        if (gamma) unpack8<T>(load8<T>(gamma + c), g);
        if (beta) unpack8<T>(load8<T>(beta + c), b);
        if (add) unpack8<T>(load8<T>(add + c), a);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = (v[j] - mean) * rstd * g[j] + b[j] + a[j];
    };
    if constexpr (E4M3) {
        // The affine outputs kept in registers (each packed vector dies as its outputs are made)
        // while the row's max is found, then written.
        float kept[LN_REG_VECS][8];
        float m = 0.0f;
#pragma unroll
        for (int i = 0; i < LN_REG_VECS; ++i) {
            if (!has(i)) continue;
            affine(i, kept[i]);
#pragma unroll
            for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(kept[i][j]));
        }
        const float s = fp8_scale_of(group_max<LANES>(m)), inv = fp8_inverse(s);
        if (live && sub == 0) p.q_scales[row] = s;
        uint8_t* q = p.q + row * C;
#pragma unroll
        for (int i = 0; i < LN_REG_VECS; ++i)
            if (has(i)) *reinterpret_cast<uint2*>(q + (sub + i * LANES) * 8) = e4m3x8(kept[i], inv);
    } else {
#pragma unroll
        for (int i = 0; i < LN_REG_VECS; ++i) {
            if (!has(i)) continue;
            float v[8];
            affine(i, v);
            store8<T>(y + (sub + i * LANES) * 8, v);
        }
    }
}

// Rows of one warp in the register-resident path: 32 / LANES, lane l on row warp * 32 / LANES + l / LANES.
template <typename T, int LANES, bool E4M3>
__device__ __forceinline__ void layer_norm_rows_in_registers(const LayerNormParams& p, int64_t warp, int lane) {
    const int64_t row = warp * (32 / LANES) + lane / LANES;
    const bool live = row < p.rows;
    layer_norm_in_registers<T, LANES, E4M3>(p, live ? row : 0, lane % LANES, live);
}

template <typename T, bool E4M3> __device__ void layer_norm(const LayerNormParams& p) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int C = p.channels;
    // 16-byte loads and stores of 8 elements; e4m3 rows take 8-byte stores.
    const bool aligned = ((reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.y) |
                           reinterpret_cast<uintptr_t>(p.add) | reinterpret_cast<uintptr_t>(p.shift)) % 16) == 0 &&
                         reinterpret_cast<uintptr_t>(p.q) % 8 == 0;
    switch (ln_row_lanes(C, aligned)) {
        case 4: return layer_norm_rows_in_registers<T, 4, E4M3>(p, warp, lane);
        case 8: return layer_norm_rows_in_registers<T, 8, E4M3>(p, warp, lane);
        case 16: return layer_norm_rows_in_registers<T, 16, E4M3>(p, warp, lane);
        case 32: return layer_norm_rows_in_registers<T, 32, E4M3>(p, warp, lane);
        default: break;
    }

    // One warp per row: wider rows (re-read for each pass) and unaligned ones (scalar).
    const int64_t row = warp;
    if (row >= p.rows) return;
    const T* x = static_cast<const T*>(p.x) + row * C;
    T* y = static_cast<T*>(p.y) + row * C;
    const T* gamma = static_cast<const T*>(p.gamma);
    const T* beta = static_cast<const T*>(p.beta);
    const T* add = p.add ? static_cast<const T*>(p.add) + row / p.add_every * C : nullptr;
    const bool vec = C % 8 == 0 && aligned;
    const T* shift = static_cast<const T*>(p.shift);
    // x + shift rounded to T (as the register path's repacked row), 8 channels from c or channel c.
    auto row8 = [&](int c, float v[8]) {
        unpack8<T>(load8<T>(x + c), v);
        if (shift) {
            float s[8];
            unpack8<T>(load8<T>(shift + c), s);
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = to_f32(from_f32<T>(v[j] + s[j]));
        }
    };
    auto row1 = [&](int c) { return shift ? to_f32(from_f32<T>(to_f32(x[c]) + to_f32(shift[c]))) : to_f32(x[c]); };

    float sum = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8];
            row8(c, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) sum += v[j];
        }
    } else {
        for (int c = lane; c < C; c += 32) sum += row1(c);
    }
    const float mean = warp_sum(sum) / C;

    float m2 = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8];
            row8(c, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) m2 += (v[j] - mean) * (v[j] - mean);
        }
    } else {
        for (int c = lane; c < C; c += 32) m2 += (row1(c) - mean) * (row1(c) - mean);
    }
    const float rstd = rsqrtf(warp_sum(m2) / C + p.eps);

    // The affine outputs of the 8 channels from c (vectorised rows) or of channel c alone.
    auto affine8 = [&](int c, float v[8]) {
        float g[8] = {1, 1, 1, 1, 1, 1, 1, 1}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        row8(c, v);
        if (gamma) unpack8<T>(load8<T>(gamma + c), g);
        if (beta) unpack8<T>(load8<T>(beta + c), b);
        if (add) unpack8<T>(load8<T>(add + c), a);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = (v[j] - mean) * rstd * g[j] + b[j] + a[j];
    };
    auto affine1 = [&](int c) {
        const float g = gamma ? to_f32(gamma[c]) : 1.0f, b = beta ? to_f32(beta[c]) : 0.0f;
        const float a = add ? to_f32(add[c]) : 0.0f;
        return (row1(c) - mean) * rstd * g + b + a;
    };
    if constexpr (E4M3) {
        float m = 0.0f;
        if (vec) {
            for (int c = lane * 8; c < C; c += 256) {
                float v[8];
                affine8(c, v);
#pragma unroll
                for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
            }
        } else {
            for (int c = lane; c < C; c += 32) m = fmaxf(m, fabsf(affine1(c)));
        }
        const float s = fp8_scale_of(group_max<32>(m)), inv = fp8_inverse(s);
        if (lane == 0) p.q_scales[row] = s;
        uint8_t* q = p.q + row * C;
        if (vec) {
            for (int c = lane * 8; c < C; c += 256) {
                float v[8];
                affine8(c, v);
                *reinterpret_cast<uint2*>(q + c) = e4m3x8(v, inv);
            }
        } else {
            for (int c = lane; c < C; c += 32) q[c] = to_e4m3(affine1(c) * inv);
        }
    } else if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8];
            affine8(c, v);
            store8<T>(y + c, v);
        }
    } else {
        for (int c = lane; c < C; c += 32) y[c] = from_f32<T>(affine1(c));
    }
}
// f16 / bf16 at most 64 registers, so 4 blocks (32 warps) fit a multiprocessor: unbounded, ptxas
// took 66-72 (3 blocks), and a memory-bound pass wants every warp it can get loading (Little's
// law: ~25 KB in flight per multiprocessor at the H200's bandwidth, 1.25-2.5 KB a row per warp).
// f32 (f32 models only) at 2 blocks: under 85 registers (3 blocks) its row-group variants spill.
#define LN_ENTRY(NAME, T, E4M3, MIN_BLOCKS)                                                                  \
    extern "C" __global__ void __launch_bounds__(LAYER_NORM_THREADS, MIN_BLOCKS)                           \
        NAME(const __grid_constant__ LayerNormParams p) {                                                  \
        layer_norm<T, E4M3>(p);                                                                            \
    }
LN_ENTRY(layer_norm_f16, __half, false, 4)
LN_ENTRY(layer_norm_bf16, __nv_bfloat16, false, 4)
LN_ENTRY(layer_norm_f32, float, false, 2)
// FP8 linears take f16 / bf16 models only.
LN_ENTRY(layer_norm_e4m3_f16, __half, true, 3)
LN_ENTRY(layer_norm_e4m3_bf16, __nv_bfloat16, true, 3)
