// Shared device helpers: dtype conversion and 8-wide vector access (16 bytes for f16/bf16,
// 32 bytes for f32), warp reductions, math used by several families.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "params.h"

__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }

// Eight consecutive elements as one register bundle.
template <typename T> struct Vec8 {
    uint4 raw;  // 8 x 16-bit
};
template <> struct Vec8<float> {
    float4 lo, hi;
};

template <typename T> __device__ __forceinline__ Vec8<T> load8(const T* p) {
    Vec8<T> v;
    v.raw = *reinterpret_cast<const uint4*>(p);
    return v;
}
template <> __device__ __forceinline__ Vec8<float> load8<float>(const float* p) {
    Vec8<float> v;
    v.lo = reinterpret_cast<const float4*>(p)[0];
    v.hi = reinterpret_cast<const float4*>(p)[1];
    return v;
}

// Packed conversions: one instruction per pair instead of a shuffle and a convert per element.
template <typename T> __device__ __forceinline__ void unpack8(const Vec8<T>& v, float out[8]);
template <> __device__ __forceinline__ void unpack8<__half>(const Vec8<__half>& v, float out[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v.raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}
template <> __device__ __forceinline__ void unpack8<__nv_bfloat16>(const Vec8<__nv_bfloat16>& v, float out[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v.raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}
template <> __device__ __forceinline__ void unpack8<float>(const Vec8<float>& v, float out[8]) {
    out[0] = v.lo.x; out[1] = v.lo.y; out[2] = v.lo.z; out[3] = v.lo.w;
    out[4] = v.hi.x; out[5] = v.hi.y; out[6] = v.hi.z; out[7] = v.hi.w;
}

template <typename T> __device__ __forceinline__ Vec8<T> pack8(const float in[8]);
template <> __device__ __forceinline__ Vec8<__half> pack8<__half>(const float in[8]) {
    Vec8<__half> v;
    __half2* h = reinterpret_cast<__half2*>(&v.raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
    return v;
}
template <> __device__ __forceinline__ Vec8<__nv_bfloat16> pack8<__nv_bfloat16>(const float in[8]) {
    Vec8<__nv_bfloat16> v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v.raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    return v;
}
template <> __device__ __forceinline__ Vec8<float> pack8<float>(const float in[8]) {
    Vec8<float> v;
    v.lo = make_float4(in[0], in[1], in[2], in[3]);
    v.hi = make_float4(in[4], in[5], in[6], in[7]);
    return v;
}

template <typename T> __device__ __forceinline__ void store8(T* p, const float in[8]) {
    *reinterpret_cast<uint4*>(p) = pack8<T>(in).raw;
}
template <> __device__ __forceinline__ void store8<float>(float* p, const float in[8]) {
    const Vec8<float> v = pack8<float>(in);
    reinterpret_cast<float4*>(p)[0] = v.lo;
    reinterpret_cast<float4*>(p)[1] = v.hi;
}
// Stores the vector as it was loaded (a copy).
template <typename T> __device__ __forceinline__ void store8(T* p, const Vec8<T>& v) {
    *reinterpret_cast<uint4*>(p) = v.raw;
}
template <> __device__ __forceinline__ void store8<float>(float* p, const Vec8<float>& v) {
    reinterpret_cast<float4*>(p)[0] = v.lo;
    reinterpret_cast<float4*>(p)[1] = v.hi;
}

// Channels [c, c + 8) of one pixel of a concatenation [x, x_tail] on the channels that is never
// written (the group norms' params: x holds x_channels channels a pixel, x_tail, if set, the
// channels - x_channels after them; x_channels is a multiple of 8, so 8 channels never straddle
// the two): where they are, and the step to the next pixel's, in elements.
template <typename T> struct ConcatPiece {
    const T* at;
    int64_t pixel_step;
};
template <typename T, typename Params>
__device__ __forceinline__ ConcatPiece<T> concat_piece(const Params& p, int64_t pixel, int c) {
    if (p.x_tail && c >= p.x_channels) {
        const int tail = p.channels - p.x_channels;
        return {static_cast<const T*>(p.x_tail) + pixel * tail + (c - p.x_channels), tail};
    }
    return {static_cast<const T*>(p.x) + pixel * p.x_channels + c, p.x_channels};
}

// Asynchronous 16-byte global -> shared copies (sm_80+): issue, commit as a group, wait until at
// most N groups are still in flight (then __syncthreads before other threads read the data).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
// The same with L2 prefetch of the whole 128-byte line: for rows scattered in memory (the frames of
// a pixel) whose neighbouring bytes other warps read next.
__device__ __forceinline__ void cp_async16_line(void* smem_dst, const void* gmem_src) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Fast SiLU: __expf and __fdividef are within a few ulp here (an overflowing exp gives -0, the
// right limit), and a full-precision division would cost ~4x the instructions.
__device__ __forceinline__ float silu_f32(float x) { return __fdividef(x, 1.0f + __expf(-x)); }
// Exact (erf) GELU, as torch's default and diffusers' GEGLU use: x Phi(x), with Phi(-|x|) =
// erfc(|x| / sqrt 2) / 2 by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7) and 1 / sqrt 2, log2 e and
// the 1/2 folded into the constants. ~14 instructions with two special-function ops, against ~35 for
// 0.5 x (1 + erff(x / sqrt 2)), which left the GEGLU pass and the fused GEGLU GEMM's epilogue
// instruction-bound; within 4.3e-7 of the exact GELU on [-12, 12] (the erff form: 4.5e-7), and
// Phi(x) for x > 0 as 1 - Phi(-x) leaves no cancellation in the negative tail.
__device__ __forceinline__ float gelu_f32(float x) {
    const float t = __fdividef(1.0f, fmaf(0.3275911f * 0.70710678118654752f, fabsf(x), 1.0f));
    float q = fmaf(0.5f * 1.061405429f, t, 0.5f * -1.453152027f);
    q = fmaf(q, t, 0.5f * 1.421413741f);
    q = fmaf(q, t, 0.5f * -0.284496736f);
    q = fmaf(q, t, 0.5f * 0.254829592f);
    const float u = x * 0.84932180028801904f;  // x / sqrt 2 * sqrt(log2 e): exp(-x^2 / 2) = 2^-(u^2)
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-u * u));
    const float phi_neg = q * t * e;
    return x * (x < 0.0f ? phi_neg : 1.0f - phi_neg);
}
// CLIP's quick GELU, x * sigmoid(1.702 x), with the same fast exp and division as SiLU.
__device__ __forceinline__ float quick_gelu_f32(float x) { return __fdividef(x, 1.0f + __expf(-1.702f * x)); }

// Tensor-core helpers (sm_80+): mma.m16n8k16 with fp32 accumulation for f16 / bf16 operands,
// ldmatrix loads of 8x8 b16 tiles from shared memory, and packing two floats into one operand word
// (and back).
template <typename T> struct MmaType;
template <> struct MmaType<__half> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ float2 unpack(uint32_t v) { return __half22float2(*reinterpret_cast<__half2*>(&v)); }
};
template <> struct MmaType<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ float2 unpack(uint32_t v) {
        return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
    }
};

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same<T, __half>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}


// Instantiate `body<T>` as three extern "C" kernels named NAME_f16, NAME_bf16, NAME_f32.
#define CELFRAME_KERNELS_FOR_DTYPES(NAME, PARAMS, BODY)                                     \
    extern "C" __global__ void NAME##_f16(const __grid_constant__ PARAMS p) { BODY<__half>(p); } \
    extern "C" __global__ void NAME##_bf16(const __grid_constant__ PARAMS p) {                \
        BODY<__nv_bfloat16>(p);                                                                \
    }                                                                                          \
    extern "C" __global__ void NAME##_f32(const __grid_constant__ PARAMS p) { BODY<float>(p); }
