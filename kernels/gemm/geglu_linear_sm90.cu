// The GEGLU feed-forward's first projection with GEGLU fused after its GEMM, on Hopper (sm_90a):
// y[r, j] = (x w^T + b)[r, j] * gelu((x w^T + b)[r, dim + j]) (params.h, GegluLinearParams); the
// [rows, 2 dim] projection never reaches global memory. A persistent warp-specialised GEMM after
// the structure of CUTLASS 3's sm90 "TMA warp-specialised cooperative" kernels with 2-block
// clusters (NVIDIA CUTLASS 3.x, sm90 GEMM collectives and PipelineTmaAsync): one thread of warpgroup
// 0 issues TMA copies (cp.async.bulk.tensor) into a ring of GEGLU_LINEAR_STAGES stages; warpgroups 1
// and 2 (the consumers) each own 64 of the tile's 128 rows and multiply them by all 256 w rows of
// the stage (wgmma m64n256k16, fp32 accumulators in 128 registers per thread).
//
// Clusters: the two blocks of a cluster take row tiles 2 i and 2 i + 1 of the same column tile, so
// they need the same w tile (the 128 value rows and the 128 gate rows for those output columns).
// Each block loads its own x tile (128 rows x 64 k) and half the w tile, multicast into both blocks'
// shared memory (block 0 the value rows, block 1 the gate rows): a block's stage completes on its
// "full" mbarrier when all three pieces (48 KiB) have landed. Halving the w traffic from L2 is what
// lets a 128 x 256 tile run at the tensor cores' pace (85 FLOP per byte loaded without it: more L2
// bandwidth than the H200 has at ~740 TFLOP/s). A stage may be refilled only when both blocks'
// consumers are done with it, since the peer's producer writes into it too: each consumer warp
// arrives on the "empty" mbarrier of the stage in both blocks (16 arrivals per phase).
//
// The clusters walk the tile pairs with a stride of the grid (one block per multiprocessor), column
// tiles fastest, so the clusters in flight share x rows and the whole w stays in L2; the producer
// runs ahead into the next tile while the consumers finish the current one. Both blocks of a
// cluster walk the same pairs (a row tile past `rows` reads zeros and writes nothing), so their
// stage uses stay paired; they meet at a cluster barrier after init (no multicast into an
// uninitialised barrier) and before exit (no remote arrival into an exited block).
//
// GEGLU is handed off the tensor cores' path. Because the w tile stacks the value rows over the
// gate rows, accumulator element i of a consumer thread (row 16 w + g + 8 ((i % 4) / 2), column
// 8 (i / 4) + 2 t + i % 2; PTX ISA "wgmma register fragments") and element i + 64 hold the value and
// the gate of the same output. The consumers add the biases, round values and gates to the
// activation dtype (as the composed route's GEMM writes them) into a staging tile in shared memory
// (128 rows x 128 values and 128 x 128 gates, 64 KiB; 16-byte chunk c of row r at chunk c ^ (r % 8),
// so the eight rows a write covers fall in distinct banks) and go on to their next tile's products.
// Warps 1-3 of warpgroup 0 read the staging tile, compute value x gelu(gate) (the exact GELU,
// gelu_f32) and write whole 256-byte row pieces. Two mbarriers pass the staging tile between them:
// "staged" (the 256 consumer threads' arrivals) and "drained" (the 96 epilogue threads'). With the
// GELU in the consumers' own epilogue (an earlier form of this kernel) the tensor cores idled ~15%
// of each tile at K 1280. At K 320 the reverse holds (the epilogue warps' GELU of a tile outlasts
// its five k steps of products), so a second entry (FINISH, `geglu_linear_finish_*`) has the
// consumers stage finished outputs and the epilogue warps only copy them. Rows past `rows` are read as zeros (TMA fills boxes past the tensor) and
// not written; k past its end is zero-filled the same way.
#include "common.cuh"
#include "sm90.cuh"

#define GL_BM GEGLU_LINEAR_BM
#define GL_BN GEGLU_LINEAR_BN
#define GL_BK GEGLU_LINEAR_BK
#define GL_STAGES GEGLU_LINEAR_STAGES
#define GL_X_TILE (GL_BM * GL_BK)      // elements of a stage's x tile (16 KiB)
#define GL_W_TILE (2 * GL_BN * GL_BK)  // elements of a stage's w tile (value and gate rows, 32 KiB)
#define GL_STAGE (GL_X_TILE + GL_W_TILE)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Box (GL_BK, 128) at (col, row) of a rank-2 tensor map into a 1024-byte aligned tile.
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, int col, int row, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            smem_addr(dst)),
        "l"(map), "r"(col), "r"(row), "r"(smem_addr(bar))
        : "memory");
}

// The same, multicast: the box lands at the same offset in the shared memory of every block of
// the cluster in `mask`, each completing bytes on its own barrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TensorMap* map, int col, int row, uint64_t* bar,
                                                      uint16_t mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
        "%3}], [%4], %5;" ::"r"(smem_addr(dst)),
        "l"(map), "r"(col), "r"(row), "r"(smem_addr(bar)), "h"(mask)
        : "memory");
}

__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// One arrival on the mbarrier at `bar`'s offset in block `rank` of the cluster (this one included).
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t rank) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(bar)), "r"(rank));
    // The default (release, CTA scope) semantics, as CUTLASS's ClusterBarrier::arrive: the products
    // that read the stage are complete (wgmma.wait_group); .release.cluster would add a GPU-wide fence.
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

// Every thread of both blocks of the cluster.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

// Shared-memory stores and loads by shared-window address: the staging tile's pointer comes from
// the aligned dynamic shared memory through integer arithmetic, after which the compiler no longer
// knows its space and would emit generic accesses.
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
    return v;
}

// value x gelu(gate) of two packed pairs (values and gates already rounded to T, as the composed
// route's GEMM writes them), rounded to T: the same arithmetic in the consumers and the epilogue
// warps.
template <typename T>
__device__ __forceinline__ uint32_t geglu_pair(uint32_t values, uint32_t gates) {
    const float2 a = MmaType<T>::unpack(values), b = MmaType<T>::unpack(gates);
    return MmaType<T>::pack(a.x * gelu_f32(b.x), a.y * gelu_f32(b.y));
}

// The consumer warpgroups: per tile, the products, then the biased values and gates into the
// staging tile, or with FINISH their GEGLU outputs.
template <typename T, bool FINISH>
__device__ __forceinline__ void consume(const GegluLinearParams& p, T* stages, T* staging, uint64_t* full, uint64_t* empty,
                                        uint64_t* staged, uint64_t* drained, int k_tiles, int col_tiles, int pairs,
                                        int first_pair, int pair_stride) {
    const int cw = threadIdx.x / 128 - 1, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32, g = lane / 4,
              t = lane % 4;
    const T* bias = static_cast<const T*>(p.bias);
    uint32_t it = 0, tile = 0;
    float acc[128];
    for (int pair = first_pair; pair < pairs; pair += pair_stride, ++tile) {
        const int col0 = (int)(pair % col_tiles * GL_BN);
        // The biases, loaded while the products run: value and gate pairs of the thread's 16
        // column groups.
        uint32_t bias_v[16], bias_g[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int col = col0 + 8 * j + 2 * t;
            bias_v[j] = bias ? *reinterpret_cast<const uint32_t*>(bias + col) : 0u;
            bias_g[j] = bias ? *reinterpret_cast<const uint32_t*>(bias + p.dim + col) : 0u;
        }
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
            const int st = it % GL_STAGES;
            mbar_wait(&full[st], (it / GL_STAGES) & 1);
            const T* xs = stages + st * GL_STAGE + cw * 64 * GL_BK;  // 8 whole swizzle atoms
            const T* ws = stages + st * GL_STAGE + GL_X_TILE;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < GL_BK / 16; ++kk)
                wgmma_m64n256<T>(acc, sw128_desc(xs + kk * 16), sw128_desc(ws + kk * 16), kt > 0 || kk > 0);
            wgmma_commit();
            // The previous stage's products are done once at most this stage's group is in flight.
            wgmma_wait<1>();
            fence_regs(acc);
            if (kt > 0 && lane == 0)
                for (uint32_t b = 0; b < 2; ++b) mbar_arrive_cluster(&empty[(it - 1) % GL_STAGES], b);
        }
        wgmma_wait<0>();
        fence_regs(acc);
        if (lane == 0)
            for (uint32_t b = 0; b < 2; ++b) mbar_arrive_cluster(&empty[(it - 1) % GL_STAGES], b);

        // Into the staging tile (element i and i + 64 of column group j = i / 4), once the epilogue
        // warps have read the last tile out of it.
        if (tile > 0) mbar_wait(drained, (tile - 1) & 1);
        const uint32_t values = smem_addr(staging), gates = values + GL_BM * GL_BN * sizeof(T);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const float2 bv = MmaType<T>::unpack(bias_v[j]), bg = MmaType<T>::unpack(bias_g[j]);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int i = 4 * j + 2 * h, r = cw * 64 + warp * 16 + g + 8 * h;
                const uint32_t at = (r * GL_BN + ((j ^ (r % 8)) * 8) + 2 * t) * sizeof(T);
                if constexpr (FINISH) {
                    const uint32_t v = MmaType<T>::pack(acc[i] + bv.x, acc[i + 1] + bv.y);
                    st_shared_u32(values + at, geglu_pair<T>(v, MmaType<T>::pack(acc[i + 64] + bg.x, acc[i + 65] + bg.y)));
                } else {
                    st_shared_u32(values + at, MmaType<T>::pack(acc[i] + bv.x, acc[i + 1] + bv.y));
                    st_shared_u32(gates + at, MmaType<T>::pack(acc[i + 64] + bg.x, acc[i + 65] + bg.y));
                }
            }
        }
        mbar_arrive(staged);
    }
}

// The epilogue warps (warps 1-3 of warpgroup 0): per tile of the block, value x gelu(gate) from the
// staging tile (with FINISH the consumers' outputs, copied), written as whole 256-byte row pieces
// (two rows a warp instruction), then the staging tile handed back.
template <typename T, bool FINISH>
__device__ __forceinline__ void drain_staging(const GegluLinearParams& p, const T* staging, uint64_t* staged,
                                              uint64_t* drained, int col_tiles, int pairs, int first_pair, int pair_stride,
                                              uint32_t rank) {
    constexpr int threads = 96, chunks = GL_BN / 8;
    const uint32_t values = smem_addr(staging), gates = values + GL_BM * GL_BN * sizeof(T);
    T* y = static_cast<T*>(p.y);
    uint32_t tile = 0;
    for (int pair = first_pair; pair < pairs; pair += pair_stride, ++tile) {
        const int64_t row0 = (int64_t)(pair / col_tiles * 2 + rank) * GL_BM;
        const int col0 = (int)(pair % col_tiles * GL_BN);
        mbar_wait(staged, tile & 1);
        for (int s = threadIdx.x - 32; s < GL_BM * chunks; s += threads) {
            const int r = s / chunks, c = s % chunks;
            const uint32_t at = (r * GL_BN + ((c ^ (r % 8)) * 8)) * sizeof(T);
            uint4 out = ld_shared_v4(values + at);
            if constexpr (!FINISH) {
                const uint4 gt = ld_shared_v4(gates + at);
                out = make_uint4(geglu_pair<T>(out.x, gt.x), geglu_pair<T>(out.y, gt.y), geglu_pair<T>(out.z, gt.z),
                                 geglu_pair<T>(out.w, gt.w));
            }
            if (row0 + r < p.rows) *reinterpret_cast<uint4*>(y + (row0 + r) * p.dim + col0 + c * 8) = out;
        }
        mbar_arrive(drained);
    }
}

template <typename T, bool FINISH>
__device__ void geglu_linear_sm90(const GegluLinearParams& p) {
    extern __shared__ unsigned char gl_smem_raw[];
    T* stages = reinterpret_cast<T*>(((uintptr_t)gl_smem_raw + 1023) & ~(uintptr_t)1023);
    T* staging = stages + GL_STAGES * GL_STAGE;  // 2 x GL_BM x GL_BN elements
    uint64_t* full = reinterpret_cast<uint64_t*>(staging + 2 * GL_BM * GL_BN);
    uint64_t* empty = full + GL_STAGES;
    uint64_t* staged = empty + GL_STAGES;
    uint64_t* drained = staged + 1;

    const int k_tiles = (p.k + GL_BK - 1) / GL_BK, col_tiles = p.dim / GL_BN;
    const int pairs = (int)(((p.rows + GL_BM - 1) / GL_BM + 1) / 2) * col_tiles;  // 2 row tiles x 1 column tile
    const uint32_t rank = cluster_rank();
    const int first_pair = blockIdx.x / 2, pair_stride = gridDim.x / 2;

    if (threadIdx.x == 0) {
        for (int st = 0; st < GL_STAGES; ++st) {
            mbar_init(&full[st], 1);
            mbar_init(&empty[st], 16);  // the 8 consumer warps of both blocks
        }
        mbar_init(staged, 256);
        mbar_init(drained, 96);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        fence_proxy_async();
    }
    cluster_sync();

    // Registers: 56 a thread of warpgroup 0 (the producer thread and the epilogue warps) and 224 a
    // consumer's (65536 in all at most).
    if (threadIdx.x / 128 == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
        if (threadIdx.x >= 32) drain_staging<T, FINISH>(p, staging, staged, drained, col_tiles, pairs, first_pair, pair_stride, rank);
        if (threadIdx.x == 0) {
            uint32_t it = 0;  // stage uses so far, over all of this block's tiles
            for (int pair = first_pair; pair < pairs; pair += pair_stride) {
                const int row0 = (int)((pair / col_tiles * 2 + rank) * GL_BM), col0 = (int)(pair % col_tiles * GL_BN);
                for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                    const int st = it % GL_STAGES;
                    // Use it / stages of the stage: wait for both blocks' release of the use before.
                    if (it >= GL_STAGES) mbar_wait(&empty[st], ((it / GL_STAGES) - 1) & 1);
                    mbar_arrive_expect_tx(&full[st], GL_STAGE * sizeof(T));
                    tma_load_2d(stages + st * GL_STAGE, &p.x_map, kt * GL_BK, row0, &full[st]);
                    // Block 0 the value rows, block 1 the gate rows, into both blocks.
                    tma_load_2d_multicast(stages + st * GL_STAGE + GL_X_TILE + rank * GL_BN * GL_BK, &p.w_map, kt * GL_BK,
                                          rank * p.dim + col0, &full[st], 0x3);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
        consume<T, FINISH>(p, stages, staging, full, empty, staged, drained, k_tiles, col_tiles, pairs, first_pair, pair_stride);
    }
    cluster_sync();
}

#endif

SM90_ENTRY(geglu_linear_sm90_f16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __half, false)
SM90_ENTRY(geglu_linear_sm90_bf16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __nv_bfloat16, false)
// The consumers finish GEGLU themselves, the epilogue warps only copy: for small K, where three
// warps' GELU of a tile outlasts its products.
SM90_ENTRY(geglu_linear_finish_sm90_f16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __half, true)
SM90_ENTRY(geglu_linear_finish_sm90_bf16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __nv_bfloat16,
           true)
