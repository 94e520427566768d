// Layer norm over the last dimension, one warp per row: exact two-pass fp32 statistics, optional
// affine, optional per-row table added before the output's one rounding. Rows of at most
// LN_REG_VECS * 256 channels (every SDXL and motion-module width) stay in registers after one
// load; wider or unaligned rows are re-read from L1/L2 for the second and third pass. Both paths
// sum in the same order (lane-strided 8-element vectors), so they give identical bits.
#include "common.cuh"

#define LN_REG_VECS 5  // 8-element vectors per lane: 1280 channels

// The register-resident path for aligned rows of C % 8 == 0 and C <= LN_REG_VECS * 256. The row
// stays packed (4 registers per 8 halves) and is unpacked in each pass: 8 floats per vector kept
// for all three passes took 66 registers (3 blocks per multiprocessor); the same conversions in
// the same order give the same bits.
template <typename T>
__device__ __forceinline__ void layer_norm_in_registers(const LayerNormParams& p, const T* x, T* y, const T* add,
                                                        int lane) {
    const int C = p.channels;
    const T* gamma = static_cast<const T*>(p.gamma);
    const T* beta = static_cast<const T*>(p.beta);
    Vec8<T> raw[LN_REG_VECS];
    // All loads issue before the first use, so each lane keeps up to five 16-byte loads in flight.
#pragma unroll
    for (int i = 0; i < LN_REG_VECS; ++i) {
        const int c = lane * 8 + i * 256;
        if (c < C) raw[i] = load8<T>(x + c);
    }
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_REG_VECS; ++i)
        if (lane * 8 + i * 256 < C) {
            float v[8];
            unpack8<T>(raw[i], v);
#pragma unroll
            for (int j = 0; j < 8; ++j) sum += v[j];
        }
    const float mean = warp_sum(sum) / C;
    float m2 = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_REG_VECS; ++i)
        if (lane * 8 + i * 256 < C) {
            float v[8];
            unpack8<T>(raw[i], v);
#pragma unroll
            for (int j = 0; j < 8; ++j) m2 += (v[j] - mean) * (v[j] - mean);
        }
    const float rstd = rsqrtf(warp_sum(m2) / C + p.eps);
#pragma unroll
    for (int i = 0; i < LN_REG_VECS; ++i) {
        const int c = lane * 8 + i * 256;
        if (c >= C) continue;
        float v[8], g[8] = {1, 1, 1, 1, 1, 1, 1, 1}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        unpack8<T>(raw[i], v);
        if (gamma) unpack8<T>(load8<T>(gamma + c), g);
        if (beta) unpack8<T>(load8<T>(beta + c), b);
        if (add) unpack8<T>(load8<T>(add + c), a);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = (v[j] - mean) * rstd * g[j] + b[j] + a[j];
        store8<T>(y + c, v);
    }
}

template <typename T> __device__ void layer_norm(const LayerNormParams& p) {
    const int lane = threadIdx.x % 32;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= p.rows) return;
    const int C = p.channels;
    const T* x = static_cast<const T*>(p.x) + row * C;
    T* y = static_cast<T*>(p.y) + row * C;
    const T* gamma = static_cast<const T*>(p.gamma);
    const T* beta = static_cast<const T*>(p.beta);
    const T* add = p.add ? static_cast<const T*>(p.add) + row / p.add_every * C : nullptr;
    const bool vec = C % 8 == 0 && ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y) |
                                     reinterpret_cast<uintptr_t>(add)) % 16 == 0);
    if (vec && C <= LN_REG_VECS * 256) {
        layer_norm_in_registers<T>(p, x, y, add, lane);
        return;
    }

    float sum = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8];
            unpack8<T>(load8<T>(x + c), v);
#pragma unroll
            for (int j = 0; j < 8; ++j) sum += v[j];
        }
    } else {
        for (int c = lane; c < C; c += 32) sum += to_f32(x[c]);
    }
    const float mean = warp_sum(sum) / C;

    float m2 = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8];
            unpack8<T>(load8<T>(x + c), v);
#pragma unroll
            for (int j = 0; j < 8; ++j) m2 += (v[j] - mean) * (v[j] - mean);
        }
    } else {
        for (int c = lane; c < C; c += 32) m2 += (to_f32(x[c]) - mean) * (to_f32(x[c]) - mean);
    }
    const float rstd = rsqrtf(warp_sum(m2) / C + p.eps);

    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8], g[8] = {1, 1, 1, 1, 1, 1, 1, 1}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            unpack8<T>(load8<T>(x + c), v);
            if (gamma) unpack8<T>(load8<T>(gamma + c), g);
            if (beta) unpack8<T>(load8<T>(beta + c), b);
            if (add) unpack8<T>(load8<T>(add + c), a);
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = (v[j] - mean) * rstd * g[j] + b[j] + a[j];
            store8<T>(y + c, v);
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            const float g = gamma ? to_f32(gamma[c]) : 1.0f, b = beta ? to_f32(beta[c]) : 0.0f;
            const float a = add ? to_f32(add[c]) : 0.0f;
            y[c] = from_f32<T>((to_f32(x[c]) - mean) * rstd * g + b + a);
        }
    }
}
// f16 / bf16 at most 64 registers, so 4 blocks (32 warps) fit a multiprocessor: unbounded, ptxas
// took 66-72 (3 blocks), and a memory-bound pass wants every warp it can get loading (Little's
// law: ~25 KB in flight per multiprocessor at the H200's bandwidth, 1.25-2.5 KB a row per warp).
// f32 (f32 models only) at 3 blocks, as before: under 64 registers it spills.
#define LN_ENTRY(SUFFIX, T, MIN_BLOCKS)                                                                      \
    extern "C" __global__ void __launch_bounds__(LAYER_NORM_THREADS, MIN_BLOCKS)                           \
        layer_norm_##SUFFIX(const __grid_constant__ LayerNormParams p) {                                   \
        layer_norm<T>(p);                                                                                  \
    }
LN_ENTRY(f16, __half, 4)
LN_ENTRY(bf16, __nv_bfloat16, 4)
LN_ENTRY(f32, float, 3)
