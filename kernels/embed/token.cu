// Token + position embedding lookup (see EmbeddingParams): a gather, one row per token. Each
// thread moves 8 elements when dim and pointers allow 16-byte vectors, else one.
#include "common.cuh"

template <typename T> __device__ void token_embedding(const EmbeddingParams& p) {
    const T* table = static_cast<const T*>(p.table);
    const T* pos = static_cast<const T*>(p.positions);
    T* out = static_cast<T*>(p.out);
    const bool vec = (p.dim % 8 == 0) && ((reinterpret_cast<uintptr_t>(table) | reinterpret_cast<uintptr_t>(pos) |
                                           reinterpret_cast<uintptr_t>(out)) % 16 == 0);
    const int w = vec ? 8 : 1;  // elements per work item
    const int64_t per_row = p.dim / w;
    const int64_t total = p.rows * per_row;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int64_t row = i / per_row, col = (i % per_row) * w;
        const int64_t id = (int64_t)p.ids[row];
        const T* src = table + id * p.dim + col;
        const T* add = pos ? pos + (row % p.seq) * p.dim + col : nullptr;
        if (vec) {
            float x[8], y[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            unpack8<T>(load8<T>(src), x);
            if (add) unpack8<T>(load8<T>(add), y);
#pragma unroll
            for (int k = 0; k < 8; ++k) x[k] += y[k];
            store8<T>(out + row * p.dim + col, x);
        } else {
            out[row * p.dim + col] = from_f32<T>(to_f32(*src) + (add ? to_f32(*add) : 0.0f));
        }
    }
}
CELFRAME_KERNELS_FOR_DTYPES(token_embedding, EmbeddingParams, token_embedding)
