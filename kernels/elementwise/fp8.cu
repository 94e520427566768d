// FP8 e4m3 per-tensor quantization (see Fp8AmaxParams / Fp8QuantizeParams): the activations of an
// FP8 linear and its weights. Both passes are memory-bound grid-stride loops moving 8 elements per
// step where the count and the pointers allow (16-byte loads of f16/bf16), else one.
#include <cuda_fp8.h>

#include "common.cuh"

// 448 = the largest finite e4m3 value (1.75 * 2^8); the CPU twin (src/ops/fp8.rs) uses the same
// arithmetic, so its bytes match these.
__device__ __forceinline__ float fp8_scale_of(float amax) {
    return amax > 0.0f ? fminf(amax, 3.402823466e38f) / 448.0f : 1.0f;
}

__device__ __forceinline__ uint8_t to_e4m3(float v) {
    return (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

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
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
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
    const float s = fp8_scale_of(*p.amax);
    if (blockIdx.x == 0 && threadIdx.x == 0) *p.scale = s;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (fp8_vectorized(x, p.q, p.n)) {
        for (int64_t i = first; i < p.n / 8; i += stride) {
            float v[8];
            unpack8<T>(load8(x + i * 8), v);
            uint2 out;
            uint8_t* b = reinterpret_cast<uint8_t*>(&out);
#pragma unroll
            for (int j = 0; j < 8; ++j) b[j] = to_e4m3(v[j] / s);
            *reinterpret_cast<uint2*>(p.q + i * 8) = out;
        }
    } else {
        for (int64_t i = first; i < p.n; i += stride) p.q[i] = to_e4m3(to_f32(x[i]) / s);
    }
}

CELFRAME_KERNELS_FOR_DTYPES(fp8_amax, Fp8AmaxParams, fp8_amax)
CELFRAME_KERNELS_FOR_DTYPES(fp8_quantize, Fp8QuantizeParams, fp8_quantize)
