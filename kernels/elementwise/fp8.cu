// FP8 e4m3 quantization (see Fp8AmaxParams / Fp8QuantizeParams / Fp8QuantizeRowsParams): the
// activations of an FP8 linear and its weights. Per tensor: two memory-bound grid-stride passes;
// per row: one warp a row. Each moves 8 elements per step where the count and the pointers allow
// (16-byte loads of f16/bf16), else one.
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
    const float s = fp8_scale_of(*p.amax);
    if (blockIdx.x == 0 && threadIdx.x == 0) *p.scale = s;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (fp8_vectorized(x, p.q, p.n)) {
        for (int64_t i = first; i < p.n / 8; i += stride) {
            float v[8];
            unpack8<T>(load8(x + i * 8), v);
            *reinterpret_cast<uint2*>(p.q + i * 8) = e4m3x8(v, s);
        }
    } else {
        for (int64_t i = first; i < p.n; i += stride) p.q[i] = to_e4m3(to_f32(x[i]) / s);
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
    const float s = fp8_scale_of(group_max<32>(m));
    if (lane == 0) p.scales[row] = s;
    if (vec) {
        for (int64_t c = lane * 8; c < p.cols; c += 256) {
            float v[8];
            unpack8<T>(load8(x + c), v);
            *reinterpret_cast<uint2*>(q + c) = e4m3x8(v, s);
        }
    } else {
        for (int64_t c = lane; c < p.cols; c += 32) q[c] = to_e4m3(to_f32(x[c]) / s);
    }
}

CELFRAME_KERNELS_FOR_DTYPES(fp8_amax, Fp8AmaxParams, fp8_amax)
CELFRAME_KERNELS_FOR_DTYPES(fp8_quantize, Fp8QuantizeParams, fp8_quantize)
CELFRAME_KERNELS_FOR_DTYPES(fp8_quantize_rows, Fp8QuantizeRowsParams, fp8_quantize_rows)
