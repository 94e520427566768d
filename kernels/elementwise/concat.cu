// Concatenation along the last dimension (see ConcatParams): a pure copy. Each thread moves one
// 16-byte vector when both widths and all pointers allow it, else one element.
#include "common.cuh"

template <typename T> __device__ void concat_last(const ConcatParams& p) {
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    T* out = static_cast<T*>(p.out);
    constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector
    const bool vec = (p.a_cols % V == 0) && (p.b_cols % V == 0) &&
                     ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                       reinterpret_cast<uintptr_t>(out)) % 16 == 0);
    const int w = vec ? V : 1;  // elements per work item
    const int64_t a_items = p.a_cols / w, row_items = (p.a_cols + p.b_cols) / w;
    const int64_t total = p.rows * row_items;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int64_t row = i / row_items, col = i % row_items;
        const T* src = col < a_items ? a + row * p.a_cols + col * w : b + row * p.b_cols + (col - a_items) * w;
        if (vec) *reinterpret_cast<uint4*>(out + i * w) = *reinterpret_cast<const uint4*>(src);
        else out[i] = *src;
    }
}
CELFRAME_KERNELS_FOR_DTYPES(concat_last, ConcatParams, concat_last)
