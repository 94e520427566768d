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

// Round to nearest even, saturating at +-448.
__device__ __forceinline__ uint8_t to_e4m3(float v) {
    return (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// v[0..8) / s as eight e4m3 bytes, for one 8-byte store.
__device__ __forceinline__ uint2 e4m3x8(const float v[8], float s) {
    uint2 out;
    uint8_t* b = reinterpret_cast<uint8_t*>(&out);
#pragma unroll
    for (int j = 0; j < 8; ++j) b[j] = to_e4m3(v[j] / s);
    return out;
}

// Max over the LANES lanes of an aligned lane group (LANES = 32: the warp). fmaxf drops NaNs:
// they cannot set a scale.
template <int LANES> __device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
