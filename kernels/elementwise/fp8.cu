// FP8 e4m3 quantization (see Fp8AmaxParams / Fp8QuantizeParams / Fp8QuantizeRowsParams): the
// activations of an FP8 linear and its weights. Per tensor: two memory-bound grid-stride passes;
// per row: one warp a row. Each moves 8 elements per step where the count and the pointers allow
// (16-byte loads of f16/bf16), else one. And GEGLU writing its rows as e4m3 (GegluE4m3Params).
#include "fp8.cuh"

template <typename T> __device__ __forceinline__ bool fp8_vectorized(const T* x, const void* q, int64_t n) {
    return n % 8 == 0 && reinterpret_cast<uintptr_t>(x) % (8 * sizeof(T)) == 0 &&
           reinterpret_cast<uintptr_t>(q) % 8 == 0;
}

template <typename T> __device__ void fp8_amax(const Fp8AmaxParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    float m = 0.0f;  // fmaxf drops NaNs: they cannot set the scale
    if (fp8_vectorized(x, nullptr, p.n)) {
        for (int64_t i = first; i < p.n / 8; i += stride) {
            float v[8];
            unpack8<T>(load8(x + i * 8), v);
#pragma unroll
            for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
        }
    } else {
        for (int64_t i = first; i < p.n; i += stride) m = fmaxf(m, fabsf(to_f32(x[i])));
    }
    m = group_max<32>(m);
    __shared__ float warps[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warps[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x + 31) / 32; ++w) m = fmaxf(m, warps[w]);
        atomicMax(reinterpret_cast<unsigned int*>(p.amax), __float_as_uint(m));
    }
}

template <typename T> __device__ void fp8_quantize(const Fp8QuantizeParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const float s = fp8_scale_of(*p.amax), inv = fp8_inverse(s);
    if (blockIdx.x == 0 && threadIdx.x == 0) *p.scale = s;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (fp8_vectorized(x, p.q, p.n)) {
        for (int64_t i = first; i < p.n / 8; i += stride) {
            float v[8];
            unpack8<T>(load8(x + i * 8), v);
            *reinterpret_cast<uint2*>(p.q + i * 8) = e4m3x8(v, inv);
        }
    } else {
        for (int64_t i = first; i < p.n; i += stride) p.q[i] = to_e4m3(to_f32(x[i]) * inv);
    }
}

// One warp per row: the row's max |x|, then the row again (from L1/L2) as e4m3 by its scale.
template <typename T> __device__ void fp8_quantize_rows(const Fp8QuantizeRowsParams& p) {
    const int lane = threadIdx.x % 32;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= p.rows) return;
    const T* x = static_cast<const T*>(p.x) + row * p.cols;
    uint8_t* q = p.q + row * p.cols;
    const bool vec = fp8_vectorized(x, q, p.cols);
    float m = 0.0f;
    if (vec) {
        for (int64_t c = lane * 8; c < p.cols; c += 256) {
            float v[8];
            unpack8<T>(load8(x + c), v);
#pragma unroll
            for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
        }
    } else {
        for (int64_t c = lane; c < p.cols; c += 32) m = fmaxf(m, fabsf(to_f32(x[c])));
    }
    const float s = fp8_scale_of(group_max<32>(m)), inv = fp8_inverse(s);
    if (lane == 0) p.scales[row] = s;
    if (vec) {
        for (int64_t c = lane * 8; c < p.cols; c += 256) {
            float v[8];
            unpack8<T>(load8(x + c), v);
            *reinterpret_cast<uint2*>(q + c) = e4m3x8(v, inv);
        }
    } else {
        for (int64_t c = lane; c < p.cols; c += 32) q[c] = to_e4m3(to_f32(x[c]) * inv);
    }
}

CELFRAME_KERNELS_FOR_DTYPES(fp8_amax, Fp8AmaxParams, fp8_amax)
CELFRAME_KERNELS_FOR_DTYPES(fp8_quantize, Fp8QuantizeParams, fp8_quantize)
CELFRAME_KERNELS_FOR_DTYPES(fp8_quantize_rows, Fp8QuantizeRowsParams, fp8_quantize_rows)

// GEGLU's output rows as e4m3 with a scale each. Each output is computed once: a row stays in
// registers (vector i of the row's thread t being outputs (t + i * GROUP) * 8 .. + 8) while its
// GROUP threads find the row's max; rows wider than GROUP * FP8_GEGLU_VECS * 8 or unaligned are
// computed twice, their inputs re-read from L1/L2. Rows of d <= FP8_GEGLU_WARP_MAX_D take a warp
// each (entry geglu_e4m3_warp: FP8_GEGLU_THREADS / 32 rows a block, no barrier), wider ones a
// block each (geglu_e4m3). History (H100, b32 UNet FP8 forward): a warp a row for every width,
// each row computed twice, was ALU-bound and missed L2 on the re-read (26.2 ms against the 16-bit
// geglu's 15.5); a block a row for every width (14.6 ms) left the motion modules' D 1280 rows
// slower than the 16-bit geglu (0.949 ms against 0.741), most of each block's threads holding one
// vector and waiting at the barrier; a warp a row there: 0.646. The arithmetic is the geglu
// kernel's (elementwise.cu) without the rounding to T.
template <typename T, int GROUP> __device__ void geglu_e4m3_row(const GegluE4m3Params& p, int64_t row, int t) {
    constexpr int VECS = FP8_GEGLU_VECS;
    const int lane = t % 32;
    const T* x = static_cast<const T*>(p.x) + row * 2 * p.d;
    const T* bias = static_cast<const T*>(p.bias);
    uint8_t* q = p.q + row * p.d;
    const bool vec = p.d % 8 == 0 &&
                     ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(bias)) % 16) == 0 &&
                     reinterpret_cast<uintptr_t>(q) % 8 == 0;
    const bool in_registers = vec && p.d <= (int64_t)GROUP * VECS * 8;
    // Outputs j .. j + 8 (vectorised rows) or j alone.
    auto out8 = [&](int64_t j, float v[8]) {
        float gate[8], bv[8] = {0, 0, 0, 0, 0, 0, 0, 0}, bg[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        unpack8<T>(load8<T>(x + j), v);
        unpack8<T>(load8<T>(x + p.d + j), gate);
        if (bias) {
            unpack8<T>(load8<T>(bias + j), bv);
            unpack8<T>(load8<T>(bias + p.d + j), bg);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (v[k] + bv[k]) * gelu_f32(gate[k] + bg[k]);
    };
    auto out1 = [&](int64_t j) {
        const float bv = bias ? to_f32(bias[j]) : 0.0f, bg = bias ? to_f32(bias[p.d + j]) : 0.0f;
        return (to_f32(x[j]) + bv) * gelu_f32(to_f32(x[p.d + j]) + bg);
    };
    float kept[VECS][8];
    float m = 0.0f;
    if (in_registers) {
#pragma unroll
        for (int i = 0; i < VECS; ++i) {
            const int64_t j = (int64_t)(t + i * GROUP) * 8;
            if (j >= p.d) continue;
            out8(j, kept[i]);
#pragma unroll
            for (int k = 0; k < 8; ++k) m = fmaxf(m, fabsf(kept[i][k]));
        }
    } else if (vec) {
        for (int64_t j = t * 8; j < p.d; j += GROUP * 8) {
            float v[8];
            out8(j, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) m = fmaxf(m, fabsf(v[k]));
        }
    } else {
        for (int64_t j = t; j < p.d; j += GROUP) m = fmaxf(m, fabsf(out1(j)));
    }
    m = group_max<32>(m);
    if constexpr (GROUP > 32) {  // a block a row: the warps' maxima through shared memory
        __shared__ float warp_max[GROUP / 32];
        if (lane == 0) warp_max[t / 32] = m;
        __syncthreads();
#pragma unroll
        for (int w = 0; w < GROUP / 32; ++w) m = fmaxf(m, warp_max[w]);
    }
    const float s = fp8_scale_of(m), inv = fp8_inverse(s);
    if (t == 0) p.q_scales[row] = s;
    if (in_registers) {
#pragma unroll
        for (int i = 0; i < VECS; ++i) {
            const int64_t j = (int64_t)(t + i * GROUP) * 8;
            if (j < p.d) *reinterpret_cast<uint2*>(q + j) = e4m3x8(kept[i], inv);
        }
    } else if (vec) {
        for (int64_t j = t * 8; j < p.d; j += GROUP * 8) {
            float v[8];
            out8(j, v);
            *reinterpret_cast<uint2*>(q + j) = e4m3x8(v, inv);
        }
    } else {
        for (int64_t j = t; j < p.d; j += GROUP) q[j] = to_e4m3(out1(j) * inv);
    }
}

// Two entries, so that each takes the registers its own path needs (one kernel holding both took
// 84 a thread against the block path's 72, and its D 2560 rows ran 18% slower for it).
template <typename T> __device__ void geglu_e4m3(const GegluE4m3Params& p) {
    // the whole block or none of it: no barrier is left waiting
    if (blockIdx.x < p.rows) geglu_e4m3_row<T, FP8_GEGLU_THREADS>(p, blockIdx.x, threadIdx.x);
}

template <typename T> __device__ void geglu_e4m3_warp(const GegluE4m3Params& p) {
    static_assert(FP8_GEGLU_WARP_MAX_D == 32 * FP8_GEGLU_VECS * 8, "a warp's row fits its registers");
    const int64_t row = (int64_t)blockIdx.x * (FP8_GEGLU_THREADS / 32) + threadIdx.x / 32;
    if (row < p.rows) geglu_e4m3_row<T, 32>(p, row, threadIdx.x % 32);
}
CELFRAME_KERNELS_FOR_DTYPES(geglu_e4m3, GegluE4m3Params, geglu_e4m3)
CELFRAME_KERNELS_FOR_DTYPES(geglu_e4m3_warp, GegluE4m3Params, geglu_e4m3_warp)
