// Sinusoidal timestep embedding (see TimestepEmbeddingParams). Angles in fp32 like diffusers.
#include "common.cuh"

template <typename T> __device__ void timestep_embedding(const TimestepEmbeddingParams& p) {
    T* out = static_cast<T*>(p.out);
    const int half = p.dim / 2;
    const int64_t total = p.n * p.dim;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / p.dim;
        const int col = (int)(i % p.dim);
        float v = 0.0f;  // the padding column of an odd dim
        if (col < 2 * half) {
            const int k = col % half;
            const float freq = expf(-logf(p.max_period) * (float)k / ((float)half - p.shift));
            const float angle = p.scale * (p.timesteps[row] * freq);
            // Reduce to [-pi, pi] in fp64, then the fast intrinsics are accurate to ~4e-7 and,
            // unlike sinf's large-argument path, need no local memory.
            const double two_pi = 6.283185307179586;
            const float r = (float)((double)angle - two_pi * rint((double)angle / two_pi));
            const bool first_half = col < half;
            v = (first_half != (p.flip_sin_to_cos != 0)) ? __sinf(r) : __cosf(r);
        }
        out[i] = from_f32<T>(v);
    }
}
CELFRAME_KERNELS_FOR_DTYPES(timestep_embedding, TimestepEmbeddingParams, timestep_embedding)
