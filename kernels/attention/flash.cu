// Fused flash attention forward, head dim 64, portable tensor-core path (mma.sync, sm_80+).
//
// Block: 4 warps and 64 query rows of one (batch, head); warp w owns rows [16 w, 16 w + 16). Keys
// and values stream through shared memory in tiles of 64 rows, double-buffered with cp.async.
// Per tile: S = Q K^T (fp32 accumulators), masking (key >= seq_k; key > query when causal), an
// online softmax in base 2 with the scale folded in (running max per row, partial row sums per
// thread), P re-packed from the S accumulators as the A operand, O += P V. Scores never leave
// registers. The output is normalised, staged in the Q tile and written with 16-byte stores.
#include "common.cuh"

#define FLASH_D 64
#define FLASH_BM 64
#define FLASH_BN 64
#define FLASH_LD (FLASH_D + 8)  // padded shared-memory row: ldmatrix rows in distinct banks

// Copies `rows` token rows (64 elements each) starting at token `first` into a tile; rows past
// `limit` are zero-filled.
template <typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t stride, int first, int limit) {
    for (int i = threadIdx.x; i < FLASH_BM * (FLASH_D / 8); i += blockDim.x) {
        const int r = i / (FLASH_D / 8), c = (i % (FLASH_D / 8)) * 8;
        T* dst = tile + r * FLASH_LD + c;
        if (first + r < limit) cp_async16(dst, base + (int64_t)(first + r) * stride + c);
        else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
}

template <typename T>
__device__ void flash_attention(const FlashAttentionParams& p) {
    __shared__ __align__(16) T q_s[FLASH_BM * FLASH_LD];
    __shared__ __align__(16) T k_s[2][FLASH_BN * FLASH_LD];
    __shared__ __align__(16) T v_s[2][FLASH_BN * FLASH_LD];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
    const int q0 = blockIdx.x * FLASH_BM;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * FLASH_D;
    const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * FLASH_D;
    const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * FLASH_D;
    T* o = static_cast<T*>(p.o) + b * p.o_batch_stride + h * FLASH_D;

    // Key tiles this block needs: all of them, or with a causal mask those up to its last query.
    int tiles = (p.seq_k + FLASH_BN - 1) / FLASH_BN;
    if (p.causal) tiles = min(tiles, (min(q0 + FLASH_BM, p.seq_q) + FLASH_BN - 1) / FLASH_BN);

    load_tile(q_s, q, p.q_stride, q0, p.seq_q);
    cp_async_commit();
    load_tile(k_s[0], k, p.k_stride, 0, p.seq_k);
    load_tile(v_s[0], v, p.v_stride, 0, p.seq_k);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    uint32_t qa[FLASH_D / 16][4];
#pragma unroll
    for (int kd = 0; kd < FLASH_D / 16; ++kd)
        ldmatrix_x4(qa[kd], q_s + (warp * 16 + lane % 16) * FLASH_LD + kd * 16 + (lane / 16) * 8);

    const int r = lane / 4, cq = (lane % 4) * 2;
    const int row0 = q0 + warp * 16 + r;  // query of accumulator elements 0, 1 (elements 2, 3: row0 + 8)
    const float scale_log2 = p.scale * 1.4426950408889634f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float acc[FLASH_D / 8][4];
#pragma unroll
    for (int n = 0; n < FLASH_D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    for (int j = 0; j < tiles; ++j) {
        const int buf = j % 2;
        if (j + 1 < tiles) {
            load_tile(k_s[buf ^ 1], k, p.k_stride, (j + 1) * FLASH_BN, p.seq_k);
            load_tile(v_s[buf ^ 1], v, p.v_stride, (j + 1) * FLASH_BN, p.seq_k);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys
        float s[FLASH_BN / 8][4];
#pragma unroll
        for (int n = 0; n < FLASH_BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kd = 0; kd < FLASH_D / 16; ++kd) {
#pragma unroll
            for (int n = 0; n < FLASH_BN / 8; ++n) {
                uint32_t b0, b1;
                ldmatrix_x2(b0, b1, k_s[buf] + (n * 8 + lane % 8) * FLASH_LD + kd * 16 + ((lane / 8) % 2) * 8);
                mma16816<T>(s[n], qa[kd], b0, b1);
            }
        }
        // mask, scale, running max
        const int key0 = j * FLASH_BN;
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int n = 0; n < FLASH_BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = key0 + n * 8 + cq + (e % 2), query = row0 + (e / 2) * 8;
                const bool masked = key >= p.seq_k || (p.causal && key > query);
                s[n][e] = masked ? -INFINITY : s[n][e] * scale_log2;
                mx[e / 2] = fmaxf(mx[e / 2], s[n][e]);
            }
        }
        float corr[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            // A row with every key so far masked keeps max -inf: subtract 0 instead (all p are 0).
            const float base = mx[i] == -INFINITY ? 0.0f : mx[i];
            corr[i] = exp2f(m[i] - base);
            m[i] = mx[i];
            mx[i] = base;
            l[i] *= corr[i];
        }
#pragma unroll
        for (int n = 0; n < FLASH_D / 8; ++n) {
            acc[n][0] *= corr[0];
            acc[n][1] *= corr[0];
            acc[n][2] *= corr[1];
            acc[n][3] *= corr[1];
        }
        // P = exp2(S - max), partial row sums, then O += P V
#pragma unroll
        for (int kk = 0; kk < FLASH_BN / 16; ++kk) {
            float pv[2][4];
#pragma unroll
            for (int t = 0; t < 2; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    pv[t][e] = exp2f(s[2 * kk + t][e] - mx[e / 2]);
                    l[e / 2] += pv[t][e];
                }
            }
            uint32_t pa[4];
            pa[0] = MmaType<T>::pack(pv[0][0], pv[0][1]);
            pa[1] = MmaType<T>::pack(pv[0][2], pv[0][3]);
            pa[2] = MmaType<T>::pack(pv[1][0], pv[1][1]);
            pa[3] = MmaType<T>::pack(pv[1][2], pv[1][3]);
#pragma unroll
            for (int n = 0; n < FLASH_D / 8; ++n) {
                uint32_t b0, b1;
                ldmatrix_x2_trans(b0, b1, v_s[buf] + (kk * 16 + lane % 16) * FLASH_LD + n * 8);
                mma16816<T>(acc[n], pa, b0, b1);
            }
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    cp_async_wait<0>();

    // normalise (row sums are spread over the quad), stage in the Q tile, store 16-byte pieces
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    const float inv0 = l[0] > 0.0f ? 1.0f / l[0] : 0.0f, inv1 = l[1] > 0.0f ? 1.0f / l[1] : 0.0f;
    T* stage = q_s + warp * 16 * FLASH_LD;
#pragma unroll
    for (int n = 0; n < FLASH_D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(stage + r * FLASH_LD + n * 8 + cq) = MmaType<T>::pack(acc[n][0] * inv0, acc[n][1] * inv0);
        *reinterpret_cast<uint32_t*>(stage + (r + 8) * FLASH_LD + n * 8 + cq) =
            MmaType<T>::pack(acc[n][2] * inv1, acc[n][3] * inv1);
    }
    __syncwarp();
    for (int i = lane; i < 16 * (FLASH_D / 8); i += 32) {
        const int rr = i / (FLASH_D / 8), c = (i % (FLASH_D / 8)) * 8;
        const int query = q0 + warp * 16 + rr;
        if (query < p.seq_q)
            *reinterpret_cast<uint4*>(o + (int64_t)query * p.o_stride + c) =
                *reinterpret_cast<const uint4*>(stage + rr * FLASH_LD + c);
    }
}

extern "C" __global__ void __launch_bounds__(128) flash_attention_d64_f16(const __grid_constant__ FlashAttentionParams p) {
    flash_attention<__half>(p);
}
extern "C" __global__ void __launch_bounds__(128) flash_attention_d64_bf16(const __grid_constant__ FlashAttentionParams p) {
    flash_attention<__nv_bfloat16>(p);
}
