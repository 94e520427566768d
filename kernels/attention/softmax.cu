// Row softmax of fp32 attention scores (one block per row): pass 1 keeps a running max and a sum
// of exponentials rescaled to it (one read), the block merges the pairs; pass 2 re-reads the row
// (mostly from L2) and writes exp(s - max) / sum in the activation dtype.
#include "common.cuh"

#define SOFTMAX_THREADS 256

// Merges running (max, sum) pairs: the sum is rescaled to the larger max.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.0f : s * __expf(m - mx)) + (m2 == -INFINITY ? 0.0f : s2 * __expf(m2 - mx));
    m = mx;
}

template <typename T> __device__ void softmax_rows(const SoftmaxRowsParams& p) {
    __shared__ float s_max[SOFTMAX_THREADS / 32], s_sum[SOFTMAX_THREADS / 32];
    const int64_t r = blockIdx.x;
    const float* row = p.scores + r * p.ld;
    T* out = static_cast<T*>(p.probs) + r * p.ld;
    const int keep = p.causal_rows > 0 ? (int)(r % p.causal_rows) + 1 : p.cols;
    const bool vec = p.cols % 8 == 0 && p.ld % 8 == 0 && reinterpret_cast<uintptr_t>(p.scores) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.probs) % 16 == 0;

    // 1. running max and rescaled sum over this thread's columns
    float m = -INFINITY, s = 0.0f;
    auto add = [&](float x) {
        if (x > m) {
            s = s * __expf(m - x) + 1.0f;
            m = x;
        } else {
            s += __expf(x - m);
        }
    };
    if (vec) {
        for (int j = threadIdx.x * 8; j < keep; j += SOFTMAX_THREADS * 8) {
            const float4 a = *reinterpret_cast<const float4*>(row + j);
            const float4 b = *reinterpret_cast<const float4*>(row + j + 4);
            const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if (j + i < keep) add(v[i]);
        }
    } else {
        for (int j = threadIdx.x; j < keep; j += SOFTMAX_THREADS) add(row[j]);
    }
    // 2. merge across the warp, then across warps
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) merge_max_sum(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (threadIdx.x % 32 == 0) {
        s_max[threadIdx.x / 32] = m;
        s_sum[threadIdx.x / 32] = s;
    }
    __syncthreads();
    m = s_max[0];
    s = s_sum[0];
    for (int w = 1; w < SOFTMAX_THREADS / 32; ++w) merge_max_sum(m, s, s_max[w], s_sum[w]);
    const float inv = 1.0f / s;

    // 3. probabilities (masked columns get 0)
    if (vec) {
        for (int j = threadIdx.x * 8; j < p.cols; j += SOFTMAX_THREADS * 8) {
            const float4 a = *reinterpret_cast<const float4*>(row + j);
            const float4 b = *reinterpret_cast<const float4*>(row + j + 4);
            float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = j + i < keep ? __expf(v[i] - m) * inv : 0.0f;
            store8<T>(out + j, v);
        }
    } else {
        for (int j = threadIdx.x; j < p.cols; j += SOFTMAX_THREADS)
            out[j] = from_f32<T>(j < keep ? __expf(row[j] - m) * inv : 0.0f);
    }
}
CELFRAME_KERNELS_FOR_DTYPES(softmax_rows, SoftmaxRowsParams, softmax_rows)
