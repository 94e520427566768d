// e4m3 conversion shared by the FP8 quantization kernels (elementwise/fp8.cu) and the layer norm's
// e4m3 output (norm/layer_norm.cu). The CPU twins (src/ops/fp8.rs) use the same arithmetic, so
// their bytes match these.
#pragma once
#include <cuda_fp8.h>

#include "common.cuh"

// The scale for a largest magnitude amax: amax maps to 448, the largest finite e4m3 value
// (1.75 * 2^8); an all-zero tensor or row gets 1.
__device__ __forceinline__ float fp8_scale_of(float amax) {
    return amax > 0.0f ? fminf(amax, 3.402823466e38f) / 448.0f : 1.0f;
}

// What a value is multiplied by before its rounding to e4m3: 1 / s, once per row or tensor (a
// multiply an element instead of an IEEE division, which cost the e4m3 kernels more than their
// memory traffic). The CPU twins multiply by the same f32 reciprocal.
__device__ __forceinline__ float fp8_inverse(float s) { return 1.0f / s; }

// Round to nearest even, saturating at +-448.
__device__ __forceinline__ uint8_t to_e4m3(float v) {
    return (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// v[0..8) * inv as eight e4m3 bytes, for one 8-byte store: pairs through the two-value conversion
// (one cvt.e4m3x2 on sm_89+), the first value in the lower byte as to_e4m3 would place it.
__device__ __forceinline__ uint2 e4m3x8(const float v[8], float inv) {
    uint32_t w[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(v[4 * h] * inv, v[4 * h + 1] * inv), __NV_SATFINITE, __NV_E4M3);
        const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(v[4 * h + 2] * inv, v[4 * h + 3] * inv), __NV_SATFINITE, __NV_E4M3);
        w[h] = lo | (hi << 16);
    }
    return make_uint2(w[0], w[1]);
}

// Max over the LANES lanes of an aligned lane group (LANES = 32: the warp). fmaxf drops NaNs:
// they cannot set a scale.
template <int LANES> __device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
