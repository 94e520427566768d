// Seeded counter-based random numbers (see RandomParams): Philox4x32-10 (Salmon, Moraes, Dror,
// Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011; constants as Random123's
// philox.h). Each thread of a grid-stride loop makes one Philox block, i.e. four consecutive
// elements, and stores the ones inside [offset, offset + n); the first block may start before
// offset and the last may end after it. The CPU twin (src/sampling/rng.rs) does the same f32
// operations; only logf and sincospif may differ from its correctly rounded values by an ulp.
#include "common.cuh"

struct PhiloxBlock {
    uint32_t x[4];
};

__device__ __forceinline__ PhiloxBlock philox4x32_10(uint64_t block, uint64_t stream, uint64_t seed) {
    uint32_t c0 = (uint32_t)block, c1 = (uint32_t)(block >> 32);
    uint32_t c2 = (uint32_t)stream, c3 = (uint32_t)(stream >> 32);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;  // the Weyl key schedule (an unused bump after the last round)
        k1 += 0xBB67AE85u;
    }
    return {{c0, c1, c2, c3}};
}

// The top 23 bits as the midpoint of one of 2^23 equal cells of (0, 1): exact in f32, never 0
// (so the logarithm is finite) nor 1.
__device__ __forceinline__ float open_uniform(uint32_t bits) {
    return ((float)(bits >> 9) + 0.5f) * 0x1p-23f;
}

// Box-Muller: r = sqrt(-2 ln u0), (r cos 2 pi u1, r sin 2 pi u1). sincospif takes the exact 2 u1
// and needs no large-argument reduction.
__device__ __forceinline__ void box_muller(uint32_t bits0, uint32_t bits1, float& z0, float& z1) {
    const float r = sqrtf(-2.0f * logf(open_uniform(bits0)));
    float s, c;
    sincospif(2.0f * open_uniform(bits1), &s, &c);
    z0 = r * c;
    z1 = r * s;
}

template <typename T, bool NORMAL> __device__ void random_fill(const RandomParams& p) {
    T* out = static_cast<T*>(p.out);
    const int64_t skip = (int64_t)(p.offset & 3);  // lanes of the first block before the range
    const uint64_t first_block = p.offset >> 2;
    const int64_t blocks = (skip + p.n + 3) / 4;
    for (int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; b < blocks; b += (int64_t)gridDim.x * blockDim.x) {
        // Element indices wrap modulo 2^64, so block numbers wrap modulo 2^62.
        const uint64_t block = (first_block + (uint64_t)b) & 0x3FFFFFFFFFFFFFFFull;
        const PhiloxBlock bits = philox4x32_10(block, p.stream, p.seed);
        float v[4];
        if (NORMAL) {
            box_muller(bits.x[0], bits.x[1], v[0], v[1]);
            box_muller(bits.x[2], bits.x[3], v[2], v[3]);
        } else {
#pragma unroll
            for (int lane = 0; lane < 4; ++lane) v[lane] = open_uniform(bits.x[lane]);
        }
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
            const int64_t j = b * 4 + lane - skip;
            if (j >= 0 && j < p.n) out[j] = from_f32<T>(fmaf(p.b, v[lane], p.a));
        }
    }
}

template <typename T> __device__ void random_normal(const RandomParams& p) { random_fill<T, true>(p); }
template <typename T> __device__ void random_uniform(const RandomParams& p) { random_fill<T, false>(p); }
CELFRAME_KERNELS_FOR_DTYPES(random_normal, RandomParams, random_normal)
CELFRAME_KERNELS_FOR_DTYPES(random_uniform, RandomParams, random_uniform)
