// Temporal self-attention for AnimateDiff motion modules (see TemporalAttentionParams).
//
// One warp per (video, pixel, head) sequence of at most 32 frames; the warps of a block (4 or 8, set
// by the launch) take consecutive heads of the same pixel, so together they read whole contiguous
// stretches of each token row. Each warp copies its Q, K and V rows into its own shared-memory tiles with cp.async,
// zero-padded to FP rows (16 or 32 frames) and DP columns (head_dim rounded up to 16), computes
// S = scale * Q K^T on tensor cores (mma.m16n8k16, fp32 accumulation), a row softmax in fp32 in
// registers, O = P V on tensor cores (P re-used from the S accumulators as the A operand), stages O
// in shared memory and writes its rows back with 16-byte stores.
#include "common.cuh"

#define TEMPORAL_MAX_WARPS 8

// FP: frames padded (16 or 32); DP: head_dim padded to a multiple of 16. Shared-memory rows carry 8
// extra elements so that ldmatrix's eight row addresses fall in different banks.
template <typename T, int FP, int DP>
__device__ void temporal_attention(const TemporalAttentionParams& p) {
    constexpr int LD = DP + 8;
    constexpr int TILE = FP * LD;  // elements per tile
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    T* q_s = reinterpret_cast<T*>(smem) + warp * 3 * TILE;
    T* k_s = q_s + TILE;
    T* v_s = k_s + TILE;

    const int64_t sequences = (int64_t)p.videos * p.pixels * p.heads;
    const int64_t seq = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
    if (seq >= sequences) return;
    const int h = (int)(seq % p.heads);
    const int64_t bp = seq / p.heads;  // video * pixels + pixel
    const int64_t b = bp / p.pixels, px = bp % p.pixels;
    const int D = p.head_dim, F = p.frames;
    auto row_of = [&](int f) { return (b * F + f) * p.pixels + px; };

    // 1. Q, K, V rows into shared memory (16-byte copies), zeros in the padding.
    const int chunks = D / 8;  // 16-byte pieces per row
    for (int i = lane; i < FP * (DP / 8); i += 32) {
        const int f = i / (DP / 8), c = i % (DP / 8);
        const int off = f * LD + c * 8;
        if (f < F && c < chunks) {
            const int64_t r = row_of(f);
            const int col = h * D + c * 8;
            cp_async16_line(q_s + off, static_cast<const T*>(p.q) + r * p.q_stride + col);
            cp_async16_line(k_s + off, static_cast<const T*>(p.k) + r * p.k_stride + col);
            cp_async16_line(v_s + off, static_cast<const T*>(p.v) + r * p.v_stride + col);
        } else {
            const uint4 zero = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(q_s + off) = zero;
            *reinterpret_cast<uint4*>(k_s + off) = zero;
            *reinterpret_cast<uint4*>(v_s + off) = zero;
        }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();

    const int r = lane / 4, cq = (lane % 4) * 2;  // accumulator row / column within a tile
    constexpr int MT = FP / 16, NT = FP / 8, KD = DP / 16, NO = DP / 8;
    const float scale_log2 = p.scale * 1.4426950408889634f;

    for (int mt = 0; mt < MT; ++mt) {
        // 2. S = Q K^T for query rows [16 mt, 16 mt + 16)
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
            uint32_t a[4];
            ldmatrix_x4(a, q_s + (mt * 16 + lane % 16) * LD + kd * 16 + (lane / 16) * 8);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                uint32_t b0, b1;
                ldmatrix_x2(b0, b1, k_s + (n * 8 + lane % 8) * LD + kd * 16 + ((lane / 8) % 2) * 8);
                mma16816<T>(s[n], a, b0, b1);
            }
        }
        // 3. row softmax (base 2, scale folded in); keys >= F are masked out
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = n * 8 + cq + (e % 2);
                s[n][e] = key < F ? s[n][e] * scale_log2 : -INFINITY;
                mx[e / 2] = fmaxf(mx[e / 2], s[n][e]);
            }
        }
        float sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = exp2f(s[n][e] - mx[e / 2]);
                sum[e / 2] += s[n][e];
            }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
            sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
        }
        // 4. O = P V: the S accumulators of key tiles 2j, 2j + 1 are the A operand for keys
        //    16j..16j+15. Wide heads go in two column halves to keep the accumulators in registers.
        uint32_t pa[FP / 16][4];
#pragma unroll
        for (int j = 0; j < FP / 16; ++j) {
            pa[j][0] = MmaType<T>::pack(s[2 * j][0], s[2 * j][1]);
            pa[j][1] = MmaType<T>::pack(s[2 * j][2], s[2 * j][3]);
            pa[j][2] = MmaType<T>::pack(s[2 * j + 1][0], s[2 * j + 1][1]);
            pa[j][3] = MmaType<T>::pack(s[2 * j + 1][2], s[2 * j + 1][3]);
        }
        const float inv0 = 1.0f / sum[0], inv1 = 1.0f / sum[1];
        constexpr int HALVES = NO > 10 ? 2 : 1, NOH = NO / HALVES;
        // 5. normalise and stage the rows in the Q tile (this m-tile's Q rows are no longer read)
        __syncwarp();
#pragma unroll
        for (int half = 0; half < HALVES; ++half) {
            float o[NOH][4];
#pragma unroll
            for (int n = 0; n < NOH; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
#pragma unroll
            for (int j = 0; j < FP / 16; ++j) {
#pragma unroll
                for (int n = 0; n < NOH; ++n) {
                    uint32_t b0, b1;
                    ldmatrix_x2_trans(b0, b1, v_s + (j * 16 + lane % 16) * LD + (half * NOH + n) * 8);
                    mma16816<T>(o[n], pa[j], b0, b1);
                }
            }
#pragma unroll
            for (int n = 0; n < NOH; ++n) {
                const int col = (half * NOH + n) * 8 + cq;
                *reinterpret_cast<uint32_t*>(q_s + (mt * 16 + r) * LD + col) = MmaType<T>::pack(o[n][0] * inv0, o[n][1] * inv0);
                *reinterpret_cast<uint32_t*>(q_s + (mt * 16 + r + 8) * LD + col) =
                    MmaType<T>::pack(o[n][2] * inv1, o[n][3] * inv1);
            }
        }
    }
    __syncwarp();
    // 6. O rows back to global memory, 16 bytes at a time
    for (int i = lane; i < F * chunks; i += 32) {
        const int f = i / chunks, c = i % chunks;
        *reinterpret_cast<uint4*>(static_cast<T*>(p.o) + row_of(f) * p.o_stride + h * D + c * 8) =
            *reinterpret_cast<const uint4*>(q_s + f * LD + c * 8);
    }
}

#define TEMPORAL_KERNEL(FP, DP, T, SUFFIX)                                                             \
    extern "C" __global__ void __launch_bounds__(TEMPORAL_MAX_WARPS * 32)                                  \
        temporal_attention_##FP##x##DP##_##SUFFIX(const __grid_constant__ TemporalAttentionParams p) { \
        temporal_attention<T, FP, DP>(p);                                                             \
    }
#define TEMPORAL_KERNELS(FP, DP)                 \
    TEMPORAL_KERNEL(FP, DP, __half, f16)         \
    TEMPORAL_KERNEL(FP, DP, __nv_bfloat16, bf16)
TEMPORAL_KERNELS(16, 48)
TEMPORAL_KERNELS(16, 64)
TEMPORAL_KERNELS(16, 80)
TEMPORAL_KERNELS(16, 160)
TEMPORAL_KERNELS(32, 48)
TEMPORAL_KERNELS(32, 64)
TEMPORAL_KERNELS(32, 80)
TEMPORAL_KERNELS(32, 160)
