// Layer norm over the last dimension, one warp per row: exact two-pass fp32 statistics
// (the row is re-read from L1/L2 for the second and third pass), optional affine, optional
// per-row table added before the output's one rounding.
#include "common.cuh"

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
CELFRAME_KERNELS_FOR_DTYPES(layer_norm, LayerNormParams, layer_norm)
