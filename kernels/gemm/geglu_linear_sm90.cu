// The GEGLU feed-forward's first projection with GEGLU in its epilogue, on Hopper (sm_90a):
// y[r, j] = (x w^T + b)[r, j] * gelu((x w^T + b)[r, dim + j]), the [rows, 2 dim] projection kept in
// registers (params.h, GegluLinearParams). A persistent warp-specialised GEMM after the structure of
// CUTLASS 3's sm90 "TMA warp-specialised cooperative" kernels with 2-block clusters (NVIDIA CUTLASS
// 3.x, sm90 GEMM collectives and PipelineTmaAsync): warpgroup 0 is the producer, one thread of which
// issues TMA copies (cp.async.bulk.tensor) into a ring of GEGLU_LINEAR_STAGES stages; warpgroups 1
// and 2 each own 64 of the tile's 128 rows and multiply them by all 256 w rows of the stage
// (wgmma m64n256k16, fp32 accumulators in 128 registers per thread).
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
// Because the w tile stacks the value rows over the gate rows, accumulator element i of a thread
// (row 16 w + g + 8 ((i % 4) / 2), column 8 (i / 4) + 2 t + i % 2; PTX ISA "wgmma register
// fragments") and element i + 64 hold the value and the gate of the same output: the epilogue adds
// the biases, multiplies by the exact GELU of the gate (gelu_f32), stages
// each warp's 16 x 128 outputs in shared memory (16-byte chunk c of row r at chunk c ^ (r % 8): the
// eight rows a write covers fall in distinct banks) and writes whole 256-byte row pieces. Rows past
// `rows` are read as zeros (TMA fills boxes past the tensor) and not written; k past its end is
// zero-filled the same way.
//
// The ping-pong form (PINGPONG, geglu_linear_pp_sm90_*; CUTLASS 3's sm90 "TMA warp-specialised
// ping-pong" kernels): the tile is 128 rows x 64 outputs, the product of x and 64 value + 64 gate
// rows of w (block 0 multicasts the value rows, block 1 the gate rows, as above), and each consumer
// warpgroup owns whole tiles, the block's tiles alternating between the two. A warpgroup's 128 rows
// are two m64n128k16 products per k step (fp32 in 2 x 64 registers), the value in element i and the
// gate in element i + 32 of each; its epilogue (GEGLU, staging, whole 128-byte rows) runs while the
// other warpgroup's products use the tensor cores, where the cooperative form's consumers all stop
// for it. Each stage is read by one warpgroup of each block: its empty mbarrier takes 8 arrivals
// (4 warps x 2 blocks). The mainloops take turns in tile order (CUTLASS's ordered math barrier):
// a warpgroup starts tile n's products once the other has issued tile n - 1's, through named
// barrier 1 + c ("warpgroup c may start": a bar.arrive of the other's 128 threads and the bar.sync
// of c's; every tile but the block's first syncs, every tile but its last arrives, so each phase
// is one of each). The order is what makes the shared ring safe: a parity wait cannot tell the
// phase it waits for from the one before, so a warpgroup must not wait on a stage use while an
// earlier use of that stage, the other warpgroup's, may not have landed yet.
//
// The hand-off form (HANDOFF, geglu_linear_ho_sm90_*): the cooperative tile and mainloop, with the
// GEGLU moved off the tensor cores' path. The consumers add the biases, round the tile's values and
// gates to the activation dtype (as the composed route's GEMM does) into a shared-memory staging
// tile (128 rows x 128 values + 128 x 128 gates, 64 KiB) and go on to their next tile's products;
// warps 1-3 of the producer warpgroup, idle before, read the staging tile, compute value x
// gelu(gate) and write whole 256-byte row pieces. Two mbarriers pass the staging tile between them:
// "staged" (the 256 consumer threads' arrivals) and "drained" (the 96 epilogue threads'). The
// staging takes the fourth stage's room (three stages of 48 KiB).
#include "common.cuh"
#include "sm90.cuh"

#define GL_BM GEGLU_LINEAR_BM
#define GL_BN GEGLU_LINEAR_BN
#define GL_BK GEGLU_LINEAR_BK
#define GL_STAGES GEGLU_LINEAR_STAGES
#define GL_X_TILE (GL_BM * GL_BK)  // elements of a stage's x tile (16 KiB)

enum GegluMode { COOPERATIVE, PINGPONG, HANDOFF };

// The forms' tile width (outputs), stage count and shared-memory bytes.
template <GegluMode MODE>
struct GegluForm {
    static constexpr int bn = MODE == PINGPONG ? GEGLU_LINEAR_PP_BN : GL_BN;
    static constexpr int stages = MODE == PINGPONG ? GEGLU_LINEAR_PP_STAGES : MODE == HANDOFF ? GEGLU_LINEAR_HO_STAGES : GL_STAGES;
    static constexpr int w_tile = 2 * bn * GL_BK;  // elements of a stage's w tile (value and gate rows)
    static constexpr int stage = GL_X_TILE + w_tile;
    // Output staging per consumer warp: its 16 rows of 128 outputs, or 2 x 16 rows of 64; the
    // hand-off form stages the whole tile's values and gates instead (staging elements).
    static constexpr int warp_rows = MODE == PINGPONG ? 32 : 16;
    static constexpr int staging = MODE == HANDOFF ? 2 * GL_BM * GL_BN : 8 * warp_rows * bn;
};

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

// The consumer warpgroups' side of geglu_linear_sm90 (cooperative and hand-off forms): products,
// then the GEGLU epilogue (cooperative) or the biased values and gates into the staging tile
// (hand-off), per tile.
template <typename T, GegluMode MODE>
__device__ __forceinline__ void consume(const GegluLinearParams& p, T* stages, T* out_stage, uint64_t* full,
                                        uint64_t* empty, uint64_t* staged, uint64_t* drained, int k_tiles, int col_tiles,
                                        int pairs, int first_pair, int pair_stride, uint32_t rank) {
    using F = GegluForm<MODE>;
    const int cw = threadIdx.x / 128 - 1, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32, g = lane / 4,
              t = lane % 4;
    T* stage = out_stage + (cw * 4 + warp) * 16 * GL_BN;
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    uint32_t it = 0, tile = 0;
    float acc[128];
    for (int pair = first_pair; pair < pairs; pair += pair_stride, ++tile) {
        const int64_t row0 = (int64_t)(pair / col_tiles * 2 + rank) * GL_BM;
        const int col0 = (int)(pair % col_tiles * GL_BN);
        // The hand-off form's biases, loaded while the products run: value and gate pairs of the
        // thread's 16 column groups.
        uint32_t bias_v[16], bias_g[16];
        if constexpr (MODE == HANDOFF) {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int col = col0 + 8 * j + 2 * t;
                bias_v[j] = bias ? *reinterpret_cast<const uint32_t*>(bias + col) : 0u;
                bias_g[j] = bias ? *reinterpret_cast<const uint32_t*>(bias + p.dim + col) : 0u;
            }
        }
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
            const int st = it % F::stages;
            mbar_wait(&full[st], (it / F::stages) & 1);
            const T* xs = stages + st * F::stage + cw * 64 * GL_BK;  // 8 whole swizzle atoms
            const T* ws = stages + st * F::stage + GL_X_TILE;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < GL_BK / 16; ++kk)
                wgmma_m64n256<T>(acc, sw128_desc(xs + kk * 16), sw128_desc(ws + kk * 16), kt > 0 || kk > 0);
            wgmma_commit();
            // The previous stage's products are done once at most this stage's group is in flight.
            wgmma_wait<1>();
            fence_regs(acc);
            if (kt > 0 && lane == 0)
                for (uint32_t b = 0; b < 2; ++b) mbar_arrive_cluster(&empty[(it - 1) % F::stages], b);
        }
        wgmma_wait<0>();
        fence_regs(acc);
        if (lane == 0)
            for (uint32_t b = 0; b < 2; ++b) mbar_arrive_cluster(&empty[(it - 1) % F::stages], b);

        if constexpr (MODE == HANDOFF) {
            // Values and gates (element i and i + 64 of column group j = i / 4) with their biases,
            // rounded, into the staging tile (16-byte chunk c of row r at chunk c ^ (r % 8)) once
            // the epilogue warps have read the last tile out of it.
            if (tile > 0) mbar_wait(drained, (tile - 1) & 1);
            const uint32_t values = smem_addr(out_stage), gates = values + GL_BM * GL_BN * sizeof(T);
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const float2 bv = MmaType<T>::unpack(bias_v[j]), bg = MmaType<T>::unpack(bias_g[j]);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int i = 4 * j + 2 * h, r = cw * 64 + warp * 16 + g + 8 * h;
                    const uint32_t at = (r * GL_BN + ((j ^ (r % 8)) * 8) + 2 * t) * sizeof(T);
                    st_shared_u32(values + at, MmaType<T>::pack(acc[i] + bv.x, acc[i + 1] + bv.y));
                    st_shared_u32(gates + at, MmaType<T>::pack(acc[i + 64] + bg.x, acc[i + 65] + bg.y));
                }
            }
            mbar_arrive(staged);
        } else {
            // Epilogue: element i (value) and i + 64 (gate) of column group j = i / 4 < 16.
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int col = col0 + 8 * j + 2 * t;
                const float2 bv = bias ? MmaType<T>::unpack(*reinterpret_cast<const uint32_t*>(bias + col)) : make_float2(0.0f, 0.0f);
                const float2 bg = bias ? MmaType<T>::unpack(*reinterpret_cast<const uint32_t*>(bias + p.dim + col)) : make_float2(0.0f, 0.0f);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int i = 4 * j + 2 * h, r = g + 8 * h;
                    const float y0 = (acc[i] + bv.x) * gelu_f32(acc[i + 64] + bg.x);
                    const float y1 = (acc[i + 1] + bv.y) * gelu_f32(acc[i + 65] + bg.y);
                    *reinterpret_cast<uint32_t*>(stage + r * GL_BN + ((j ^ (r % 8)) * 8) + 2 * t) = MmaType<T>::pack(y0, y1);
                }
            }
            __syncwarp();
            const int64_t first = row0 + cw * 64 + warp * 16;
#pragma unroll
            for (int s = lane; s < 16 * (GL_BN / 8); s += 32) {
                const int r = s / (GL_BN / 8), c = s % (GL_BN / 8);
                if (first + r < p.rows)
                    *reinterpret_cast<uint4*>(y + (first + r) * p.dim + col0 + c * 8) =
                        *reinterpret_cast<const uint4*>(stage + r * GL_BN + ((c ^ (r % 8)) * 8));
            }
            __syncwarp();  // the staging is read before the next tile's epilogue writes it
        }
    }
}

// The hand-off form's epilogue warps (warps 1-3 of the producer warpgroup): per tile of the block,
// value x gelu(gate) from the staging tile, written as whole 256-byte row pieces (two rows a warp
// instruction), then the staging tile handed back.
template <typename T>
__device__ __forceinline__ void drain_staging(const GegluLinearParams& p, const T* out_stage, uint64_t* staged,
                                              uint64_t* drained, int col_tiles, int pairs, int first_pair, int pair_stride,
                                              uint32_t rank) {
    constexpr int threads = 96, chunks = GL_BN / 8;
    const uint32_t values = smem_addr(out_stage), gates = values + GL_BM * GL_BN * sizeof(T);
    T* y = static_cast<T*>(p.y);
    uint32_t tile = 0;
    for (int pair = first_pair; pair < pairs; pair += pair_stride, ++tile) {
        const int64_t row0 = (int64_t)(pair / col_tiles * 2 + rank) * GL_BM;
        const int col0 = (int)(pair % col_tiles * GL_BN);
        mbar_wait(staged, tile & 1);
        for (int s = threadIdx.x - 32; s < GL_BM * chunks; s += threads) {
            const int r = s / chunks, c = s % chunks;
            const uint32_t at = (r * GL_BN + ((c ^ (r % 8)) * 8)) * sizeof(T);
            const uint4 v = ld_shared_v4(values + at), gt = ld_shared_v4(gates + at);
            const uint32_t vw[4] = {v.x, v.y, v.z, v.w}, gw[4] = {gt.x, gt.y, gt.z, gt.w};
            uint32_t out[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float2 a = MmaType<T>::unpack(vw[q]), b = MmaType<T>::unpack(gw[q]);
                out[q] = MmaType<T>::pack(a.x * gelu_f32(b.x), a.y * gelu_f32(b.y));
            }
            if (row0 + r < p.rows)
                *reinterpret_cast<uint4*>(y + (row0 + r) * p.dim + col0 + c * 8) = make_uint4(out[0], out[1], out[2], out[3]);
        }
        mbar_arrive(drained);
    }
}

// The ping-pong form's consumers: warpgroup cw takes the block's tiles of local index cw, cw + 2, ...
// (each a 128 x 64 output tile, the product two m64n128k16 per k step), then its GEGLU epilogue.
template <typename T>
__device__ __forceinline__ void consume_pingpong(const GegluLinearParams& p, T* stages, T* out_stage, uint64_t* full,
                                                 uint64_t* empty, int k_tiles, int col_tiles, int pairs, int first_pair,
                                                 int pair_stride, uint32_t rank) {
    using F = GegluForm<PINGPONG>;
    const int cw = threadIdx.x / 128 - 1, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32, g = lane / 4,
              t = lane % 4;
    T* stage = out_stage + (cw * 4 + warp) * F::warp_rows * F::bn;
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    float acc[2][64];
    const int block_tiles = first_pair < pairs ? (pairs - first_pair + pair_stride - 1) / pair_stride : 0;
    int local = cw;
    for (int pair = first_pair + cw * pair_stride; pair < pairs; pair += 2 * pair_stride, local += 2) {
        // The producer fills k_tiles stage uses per tile, in the block's tile order.
        uint32_t it = (uint32_t)local * (uint32_t)k_tiles;
        if (local > 0) named_bar_sync(1 + cw, 256);  // the other warpgroup has issued tile local - 1
        const int64_t row0 = (int64_t)(pair / col_tiles * 2 + rank) * GL_BM;
        const int col0 = (int)(pair % col_tiles * F::bn);
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
            const int st = it % F::stages;
            mbar_wait(&full[st], (it / F::stages) & 1);
            const T* xs = stages + st * F::stage;
            const T* ws = xs + GL_X_TILE;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < GL_BK / 16; ++kk)
#pragma unroll
                for (int h = 0; h < 2; ++h)  // rows 64 h ...: 8 whole swizzle atoms further
                    wgmma_m64n128<T>(acc[h], sw128_desc(xs + h * 64 * GL_BK + kk * 16), sw128_desc(ws + kk * 16),
                                     kt > 0 || kk > 0);
            wgmma_commit();
            wgmma_wait<1>();
            fence_regs(acc[0]);
            fence_regs(acc[1]);
            if (kt > 0 && lane == 0)
                for (uint32_t b = 0; b < 2; ++b) mbar_arrive_cluster(&empty[(it - 1) % F::stages], b);
        }
        if (local + 1 < block_tiles) named_bar_arrive(2 - cw, 256);  // the other's turn: tile local + 1
        wgmma_wait<0>();
        fence_regs(acc[0]);
        fence_regs(acc[1]);
        if (lane == 0)
            for (uint32_t b = 0; b < 2; ++b) mbar_arrive_cluster(&empty[(it - 1) % F::stages], b);

        // Epilogue: in each half, element i (value) and i + 32 (gate) of column group j = i / 4 < 8;
        // staged row r = 16 h + g + 8 hh is the warp's row g + 8 hh of rows 64 h ...
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = col0 + 8 * j + 2 * t;
            const float2 bv = bias ? MmaType<T>::unpack(*reinterpret_cast<const uint32_t*>(bias + col)) : make_float2(0.0f, 0.0f);
            const float2 bg = bias ? MmaType<T>::unpack(*reinterpret_cast<const uint32_t*>(bias + p.dim + col)) : make_float2(0.0f, 0.0f);
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int i = 4 * j + 2 * hh, r = 16 * h + g + 8 * hh;
                    const float y0 = (acc[h][i] + bv.x) * gelu_f32(acc[h][i + 32] + bg.x);
                    const float y1 = (acc[h][i + 1] + bv.y) * gelu_f32(acc[h][i + 33] + bg.y);
                    *reinterpret_cast<uint32_t*>(stage + r * F::bn + ((j ^ (r % 8)) * 8) + 2 * t) = MmaType<T>::pack(y0, y1);
                }
        }
        __syncwarp();
#pragma unroll
        for (int s = lane; s < F::warp_rows * (F::bn / 8); s += 32) {
            const int r = s / (F::bn / 8), c = s % (F::bn / 8);
            const int64_t row = row0 + 64 * (r / 16) + warp * 16 + r % 16;
            if (row < p.rows)
                *reinterpret_cast<uint4*>(y + row * p.dim + col0 + c * 8) =
                    *reinterpret_cast<const uint4*>(stage + r * F::bn + ((c ^ (r % 8)) * 8));
        }
        __syncwarp();  // the staging is read before the next tile's epilogue writes it
    }
}

template <typename T, GegluMode MODE>
__device__ void geglu_linear_sm90(const GegluLinearParams& p) {
    using F = GegluForm<MODE>;
    extern __shared__ unsigned char gl_smem_raw[];
    T* stages = reinterpret_cast<T*>(((uintptr_t)gl_smem_raw + 1023) & ~(uintptr_t)1023);
    auto x_tile = [&](int st) { return stages + st * F::stage; };
    auto w_tile = [&](int st) { return stages + st * F::stage + GL_X_TILE; };
    T* out_stage = stages + F::stages * F::stage;  // F::staging elements
    uint64_t* full = reinterpret_cast<uint64_t*>(out_stage + F::staging);
    uint64_t* empty = full + F::stages;
    uint64_t* staged = empty + F::stages;  // the hand-off form's two staging barriers
    uint64_t* drained = staged + 1;

    const int k_tiles = (p.k + GL_BK - 1) / GL_BK, col_tiles = p.dim / F::bn;
    const int pairs = (int)(((p.rows + GL_BM - 1) / GL_BM + 1) / 2) * col_tiles;  // 2 row tiles x 1 column tile
    const uint32_t rank = cluster_rank();
    const int first_pair = blockIdx.x / 2, pair_stride = gridDim.x / 2;

    if (threadIdx.x == 0) {
        for (int st = 0; st < F::stages; ++st) {
            mbar_init(&full[st], 1);
            // The consumer warps of both blocks that read the stage: all 8 a block, or one warpgroup's 4.
            mbar_init(&empty[st], MODE == PINGPONG ? 8 : 16);
        }
        if (MODE == HANDOFF) {
            mbar_init(staged, 256);
            mbar_init(drained, 96);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        fence_proxy_async();
    }
    cluster_sync();

    const int wg = threadIdx.x / 128;
    // Registers: 40 a producer thread and 232 a consumer's; the hand-off form's epilogue warps
    // take 56 (and the consumers 224: 65536 at most in all).
    if (wg == 0) {
        if constexpr (MODE == HANDOFF) asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
        else asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (MODE == HANDOFF && threadIdx.x >= 32)
            drain_staging<T>(p, out_stage, staged, drained, col_tiles, pairs, first_pair, pair_stride, rank);
        if (threadIdx.x == 0) {
            uint32_t it = 0;  // stage uses so far, over all of this block's tiles
            for (int pair = first_pair; pair < pairs; pair += pair_stride) {
                const int row0 = (int)((pair / col_tiles * 2 + rank) * GL_BM), col0 = (int)(pair % col_tiles * F::bn);
                for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                    const int st = it % F::stages;
                    // Use it / stages of the stage: wait for both blocks' release of the use before.
                    if (it >= F::stages) mbar_wait(&empty[st], ((it / F::stages) - 1) & 1);
                    mbar_arrive_expect_tx(&full[st], F::stage * sizeof(T));
                    tma_load_2d(x_tile(st), &p.x_map, kt * GL_BK, row0, &full[st]);
                    // Block 0 the value rows, block 1 the gate rows, into both blocks.
                    tma_load_2d_multicast(w_tile(st) + rank * F::bn * GL_BK, &p.w_map, kt * GL_BK, rank * p.dim + col0,
                                          &full[st], 0x3);
                }
            }
        }
    } else {
        if constexpr (MODE == HANDOFF) asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
        else asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        if constexpr (MODE == PINGPONG)
            consume_pingpong<T>(p, stages, out_stage, full, empty, k_tiles, col_tiles, pairs, first_pair, pair_stride, rank);
        else
            consume<T, MODE>(p, stages, out_stage, full, empty, staged, drained, k_tiles, col_tiles, pairs, first_pair,
                             pair_stride, rank);
    }
    cluster_sync();
}

#endif

SM90_ENTRY(geglu_linear_sm90_f16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __half, COOPERATIVE)
SM90_ENTRY(geglu_linear_sm90_bf16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __nv_bfloat16, COOPERATIVE)
SM90_ENTRY(geglu_linear_pp_sm90_f16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __half, PINGPONG)
SM90_ENTRY(geglu_linear_pp_sm90_bf16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __nv_bfloat16, PINGPONG)
SM90_ENTRY(geglu_linear_ho_sm90_f16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __half, HANDOFF)
SM90_ENTRY(geglu_linear_ho_sm90_bf16, GEGLU_LINEAR_THREADS, GegluLinearParams, geglu_linear_sm90, __nv_bfloat16, HANDOFF)
