// Element-wise family (add, mul, scale, SiLU, GELU, quick GELU with broadcasting of b), the ResNet's
// residual add with its biases, and GEGLU.
// Grid-stride loops; 8-wide vectors when every row boundary and pointer allows it.
#include "common.cuh"

__device__ __forceinline__ float apply_op(int op, float a, float b, float alpha) {
    switch (op) {
        case ELEMENTWISE_ADD: return alpha * (a + b);
        case ELEMENTWISE_MUL: return alpha * (a * b);
        case ELEMENTWISE_SCALE: return alpha * a;
        case ELEMENTWISE_SILU: return alpha * silu_f32(a);
        case ELEMENTWISE_QUICK_GELU: return alpha * quick_gelu_f32(a);
        default: return alpha * gelu_f32(a);
    }
}

__device__ __forceinline__ int64_t broadcast_index(const ElementwiseParams& p, int64_t i) {
    return (i / (p.mid * p.inner)) * p.inner + i % p.inner;
}

template <typename T> __device__ void elementwise(const ElementwiseParams& p) {
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    T* out = static_cast<T*>(p.out);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = (p.inner % 8 == 0) && ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                                             reinterpret_cast<uintptr_t>(out)) % 16 == 0);
    if (vec) {
        for (int64_t v = first; v < p.n / 8; v += stride) {
            const int64_t i = v * 8;
            float x[8], y[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            unpack8<T>(load8<T>(a + i), x);
            if (b) unpack8<T>(load8<T>(b + broadcast_index(p, i)), y);
#pragma unroll
            for (int k = 0; k < 8; ++k) x[k] = apply_op(p.op, x[k], y[k], p.alpha);
            store8<T>(out + i, x);
        }
    } else {
        for (int64_t i = first; i < p.n; i += stride) {
            const float y = b ? to_f32(b[broadcast_index(p, i)]) : 0.0f;
            out[i] = from_f32<T>(apply_op(p.op, to_f32(a[i]), y, p.alpha));
        }
    }
}
CELFRAME_KERNELS_FOR_DTYPES(elementwise, ElementwiseParams, elementwise)

// ResNet output: alpha * (a + b + bias + bias2) per element, one pass instead of a bias pass per
// convolution and a residual add.
template <typename T> __device__ void residual_add(const ResidualAddParams& p) {
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    const T* bias = static_cast<const T*>(p.bias);
    const T* bias2 = static_cast<const T*>(p.bias2);
    T* out = static_cast<T*>(p.out);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = (p.channels % 8 == 0) &&
                     ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | reinterpret_cast<uintptr_t>(bias) |
                       reinterpret_cast<uintptr_t>(bias2) | reinterpret_cast<uintptr_t>(out)) % 16 == 0);
    if (vec) {
        for (int64_t v = first; v < p.n / 8; v += stride) {
            const int64_t i = v * 8, c = i % p.channels;
            float x[8], y[8], s[8], s2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            unpack8<T>(load8<T>(a + i), x);
            unpack8<T>(load8<T>(b + i), y);
            unpack8<T>(load8<T>(bias + c), s);
            if (bias2) unpack8<T>(load8<T>(bias2 + c), s2);
#pragma unroll
            for (int k = 0; k < 8; ++k) x[k] = p.alpha * (x[k] + y[k] + s[k] + s2[k]);
            store8<T>(out + i, x);
        }
    } else {
        for (int64_t i = first; i < p.n; i += stride) {
            const int64_t c = i % p.channels;
            const float s2 = bias2 ? to_f32(bias2[c]) : 0.0f;
            out[i] = from_f32<T>(p.alpha * (to_f32(a[i]) + to_f32(b[i]) + to_f32(bias[c]) + s2));
        }
    }
}
CELFRAME_KERNELS_FOR_DTYPES(residual_add, ResidualAddParams, residual_add)

template <typename T> __device__ void geglu(const GegluParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* bias = static_cast<const T*>(p.bias);
    T* out = static_cast<T*>(p.out);
    const int64_t n = p.rows * p.d;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = (p.d % 8 == 0) && ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(bias) |
                                         reinterpret_cast<uintptr_t>(out)) % 16 == 0);
    if (vec) {
        for (int64_t v = first; v < n / 8; v += stride) {
            const int64_t r = v * 8 / p.d, j = v * 8 % p.d;
            float value[8], gate[8], bv[8] = {0, 0, 0, 0, 0, 0, 0, 0}, bg[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            unpack8<T>(load8<T>(x + r * 2 * p.d + j), value);
            unpack8<T>(load8<T>(x + r * 2 * p.d + p.d + j), gate);
            if (bias) {
                unpack8<T>(load8<T>(bias + j), bv);
                unpack8<T>(load8<T>(bias + p.d + j), bg);
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) value[k] = (value[k] + bv[k]) * gelu_f32(gate[k] + bg[k]);
            store8<T>(out + v * 8, value);
        }
    } else {
        for (int64_t i = first; i < n; i += stride) {
            const int64_t r = i / p.d, j = i % p.d;
            const float bv = bias ? to_f32(bias[j]) : 0.0f, bg = bias ? to_f32(bias[p.d + j]) : 0.0f;
            out[i] = from_f32<T>((to_f32(x[r * 2 * p.d + j]) + bv) * gelu_f32(to_f32(x[r * 2 * p.d + p.d + j]) + bg));
        }
    }
}
CELFRAME_KERNELS_FOR_DTYPES(geglu, GegluParams, geglu)

// Nearest 2x upsample in NHWC: each thread copies one 8-channel vector (or one element).
template <typename T> __device__ void upsample2x(const Upsample2xParams& p) {
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
    const int64_t ow = 2 * p.width, oh = 2 * p.height;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = (p.channels % 8 == 0) && ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out)) % 16 == 0);
    const int w = vec ? 8 : 1;  // elements per thread step
    const int64_t per_pixel = p.channels / w;
    const int64_t total = p.images * oh * ow * per_pixel;
    for (int64_t i = first; i < total; i += stride) {
        const int64_t c = (i % per_pixel) * w;
        const int64_t pix = i / per_pixel;
        const int64_t ox = pix % ow, oy = (pix / ow) % oh, n = pix / (ow * oh);
        const int64_t src = ((n * p.height + oy / 2) * p.width + ox / 2) * p.channels + c;
        const int64_t dst = pix * p.channels + c;
        if (vec) *reinterpret_cast<uint4*>(out + dst) = *reinterpret_cast<const uint4*>(x + src);
        else out[dst] = x[src];
        if (vec && sizeof(T) == 4) reinterpret_cast<uint4*>(out + dst)[1] = reinterpret_cast<const uint4*>(x + src)[1];
    }
}
CELFRAME_KERNELS_FOR_DTYPES(upsample2x, Upsample2xParams, upsample2x)
