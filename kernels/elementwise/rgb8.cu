// Decoded images to 8-bit pixels (Rgb8Params): a grid-stride loop, one atomic per warp
// for the count of non-finite values, so a clip's frames leave the GPU as bytes (a quarter of the
// f32 traffic) and the host only encodes them.
#include "common.cuh"

template <typename T> __device__ void to_rgb8(const Rgb8Params& p) {
    const T* x = static_cast<const T*>(p.x);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    unsigned long long bad = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.count; i += stride) {
        const float v = to_f32(x[i]);
        if (!isfinite(v)) {
            bad++;
            p.out[i] = 0;
            continue;
        }
        const float unit = fminf(fmaxf(v / 2.0f + 0.5f, 0.0f), 1.0f);
        p.out[i] = (uint8_t)roundf(unit * 255.0f);
    }
    for (int offset = 16; offset > 0; offset /= 2) bad += __shfl_down_sync(0xffffffffu, bad, offset);
    if ((threadIdx.x & 31) == 0 && bad > 0) atomicAdd(p.non_finite, bad);
}
CELFRAME_KERNELS_FOR_DTYPES(to_rgb8, Rgb8Params, to_rgb8)
