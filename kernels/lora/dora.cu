// DoRA's rescale over a table of layers (params.h LoraDoraLayer), after the merge kernel (merge.cu)
// wrote each layer's W₁ = base + s·ΔW, rounded to W's dtype, into a buffer:
// - lora_dora_factors: per norm group f = m / (‖W₁‖ + eps), the sum of squares in fp32 in a fixed
//   order (a warp per row: lanes stride the row, then a butterfly; a thread per input channel:
//   the channel's elements in memory order). No atomics, so equal inputs give equal bits every run.
// - lora_dora_change: the buffer becomes blend · (f ⊙ W₁ − base), rounded to W's dtype; the merge
//   kernel then adds it to W as a full term beside the layer's other terms.
// Blocks find their layer by a binary search over the table's first blocks.
#include "common.cuh"

template <bool CHANGE> __device__ __forceinline__ const LoraDoraLayer& dora_layer(const LoraDoraParams& p, int block) {
    int lo = 0, hi = p.layer_count - 1;  // the last layer whose first block is <= block
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        const LoraDoraLayer& l = p.layers[mid];
        if ((CHANGE ? l.first_change_block : l.first_factor_block) <= block) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return p.layers[lo];
}

template <typename T> __device__ void dora_factors(const LoraDoraParams& p) {
    const LoraDoraLayer& l = dora_layer<false>(p, blockIdx.x);
    const int local = blockIdx.x - l.first_factor_block;
    const T* w1 = static_cast<const T*>(l.w1);
    float sum = 0.0f;
    int group;
    if (l.inputs == 0) {
        const int lane = threadIdx.x % 32;
        group = local * (LORA_DORA_THREADS / 32) + threadIdx.x / 32;
        if (group >= l.groups) return;  // the whole warp: group is the warp's
        const T* row = w1 + (int64_t)group * l.cols;
        for (int c = lane; c < l.cols; c += 32) {
            const float x = to_f32(row[c]);
            sum = fmaf(x, x, sum);
        }
        sum = warp_sum(sum);
        if (lane != 0) return;
    } else {
        // cols is a multiple of inputs, so element i of the flat [rows, cols] matrix belongs to
        // channel i % inputs: neighbouring threads read neighbouring elements.
        group = local * LORA_DORA_THREADS + threadIdx.x;
        if (group >= l.groups) return;
        const int64_t n = (int64_t)l.rows * l.cols;
        for (int64_t i = group; i < n; i += l.inputs) {
            const float x = to_f32(w1[i]);
            sum = fmaf(x, x, sum);
        }
    }
    l.factor[group] = l.magnitude[group] / (sqrtf(sum) + l.eps);
}

template <typename T> __device__ void dora_change(const LoraDoraParams& p) {
    const LoraDoraLayer& l = dora_layer<true>(p, blockIdx.x);
    const int64_t n = (int64_t)l.rows * l.cols;
    const int64_t first = (int64_t)(blockIdx.x - l.first_change_block) * LORA_DORA_THREADS * LORA_DORA_CHANGE_ELEMS;
    T* w1 = static_cast<T*>(l.w1);
    const T* base = static_cast<const T*>(l.base);
#pragma unroll
    for (int j = 0; j < LORA_DORA_CHANGE_ELEMS; ++j) {
        const int64_t i = first + j * LORA_DORA_THREADS + threadIdx.x;
        if (i >= n) break;
        const int group = l.inputs == 0 ? (int)(i / l.cols) : (int)(i % l.inputs);
        w1[i] = from_f32<T>(l.blend * fmaf(l.factor[group], to_f32(w1[i]), -to_f32(base[i])));
    }
}

extern "C" __global__ void __launch_bounds__(LORA_DORA_THREADS)
    lora_dora_factors_f16(const __grid_constant__ LoraDoraParams p) {
    dora_factors<__half>(p);
}
extern "C" __global__ void __launch_bounds__(LORA_DORA_THREADS)
    lora_dora_factors_bf16(const __grid_constant__ LoraDoraParams p) {
    dora_factors<__nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(LORA_DORA_THREADS)
    lora_dora_change_f16(const __grid_constant__ LoraDoraParams p) {
    dora_change<__half>(p);
}
extern "C" __global__ void __launch_bounds__(LORA_DORA_THREADS)
    lora_dora_change_bf16(const __grid_constant__ LoraDoraParams p) {
    dora_change<__nv_bfloat16>(p);
}
