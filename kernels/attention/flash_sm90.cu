// Flash attention forward for head dim 64 on Hopper (sm_90a): the QK^T and PV products run on
// wgmma (warpgroup MMA, operands from shared-memory descriptors; P from registers), after
// FlashAttention-3 (Shah et al. 2024, "FlashAttention-3", sections 3.1-3.2). Two kernels: the first
// without its warp specialisation and TMA (every thread loads with cp.async); the second
// (flash_attention_ws_*, further down) warp-specialised with TMA loads, also compiled with ping-pong
// scheduling of its two consumer warpgroups (flash_attention_wspp_*) and as a persistent kernel of
// the latter (flash_attention_wspp_persistent_*).
//
// Block: 2 warpgroups x 64 query rows of one (batch, head) = 128 rows; keys and values stream
// through shared memory in 128-row tiles, double-buffered, one barrier per tile. Per tile and
// warpgroup: S = Q K^T (wgmma m64n128k16 x 4 dim steps, fp32 in 64 registers per thread), the mask
// only where needed, the online softmax in base 2 as in flash.cu, P packed into A fragments,
// O += P V (wgmma m64n64k16 x 8 key steps, V read transposed from its row-major tile).
//
// Shared-memory tiles: rows of 64 elements (128 B), 1024-byte aligned, with the 128-byte swizzle
// (16-byte chunk c of row r stored at chunk c ^ (r % 8)) that the descriptors declare. Descriptors
// (PTX ISA, "Matrix Descriptor Format"): start address >> 4 in bits 0-13, leading-dimension byte
// offset >> 4 in 16-29 (unused: every operand is one 128-byte swizzle atom wide), stride byte
// offset >> 4 in 32-45 (1024 B: from one 8-row group to the next), swizzle mode in 62-63 (1 = 128 B).
// Q and K are K-major operands (the head dim contiguous): the dim step kd starts 32 kd bytes into
// the row, the swizzle being applied by the hardware on absolute address bits. V is an MN-major B
// operand (imm-trans-b = 1): the key step kk starts 16 kk rows (2048 kk bytes) in.
//
// Register fragments (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts" for
// wgmma.m64nNk16; warp w of the warpgroup, g = lane / 4, t = lane % 4): accumulator element i sits
// at row 16 w + g + 8 ((i % 4) / 2), column 8 (i / 4) + 2 t + i % 2; the A fragment of a 16-wide k
// step is mma.m16n8k16's (see flash.cu) for the warp's 16 rows, so the S accumulators of key n-tiles
// 2 kk and 2 kk + 1 are the A operand of key step kk.
#include "common.cuh"
#include "sm90.cuh"

#define FH_D 64
#define FH_BM 128  // query rows per block: two warpgroups of 64
#define FH_BN 128  // keys per tile
#define FH_TILE (FH_BN * FH_D)  // elements of a K or V tile (16 KiB), and of the Q tile
#define FH_LOG2E 1.4426950408889634f

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void fence_pa(uint32_t (&pa)[FH_BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < FH_BN / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(pa[kk][r])::"memory");
}

// d (64 x 128 per warpgroup) = A (64 x 16, K-major descriptor) B (16 x 128, K-major descriptor),
// or += with Accumulate; without it d is write-only (wgmma_m64n128_first: the mask's writes while
// a P V product is in flight do not serialise the wgmma pipeline).
template <typename T, bool Accumulate>
__device__ __forceinline__ void wgmma_qk(float (&d)[64], uint64_t a, uint64_t b) {
    if constexpr (Accumulate) wgmma_m64n128<T>(d, a, b, 1);
    else wgmma_m64n128_first<T>(d, a, b);
}

// d (64 x 64) += A (64 x 16, registers) B (16 x 64, MN-major descriptor)
template <typename T>
__device__ __forceinline__ void wgmma_pv(float d[32], const uint32_t a[4], uint64_t b) {
    if constexpr (std::is_same<T, __half>::value) {
            asm volatile(
                "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
    } else {
            asm volatile(
                "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
    }
}

// S = Q K^T for one warpgroup: 64 query rows (q_rows) against a 128-key tile, four 16-wide steps
// over the head dim; issued and committed as one wgmma group, not waited for.
template <typename T>
__device__ __forceinline__ void issue_qk(float (&s)[64], const T* q_rows, const T* k_tile) {
    wgmma_qk<T, false>(s, sw128_desc(q_rows), sw128_desc(k_tile));
#pragma unroll
    for (int kd = 1; kd < FH_D / 16; ++kd) wgmma_qk<T, true>(s, sw128_desc(q_rows + kd * 16), sw128_desc(k_tile + kd * 16));
    wgmma_commit();
}

// O += P V over eight 16-key steps (V read transposed from its row-major tile); one committed group.
template <typename T>
__device__ __forceinline__ void issue_pv(float acc[32], const uint32_t pa[FH_BN / 16][4], const T* v_tile) {
#pragma unroll
    for (int kk = 0; kk < FH_BN / 16; ++kk) wgmma_pv<T>(acc, pa[kk], sw128_desc(v_tile + kk * 16 * FH_D));
    wgmma_commit();
}

// Masks keys past seq_k and, causal, after the query (only the last and diagonal tiles need it).
// row0: the query of the thread's accumulator rows g (+ 8 for the second).
__device__ __forceinline__ void mask_scores(float s[64], int key0, int row0, int qwg, const FlashAttentionParams& p) {
    if (key0 + FH_BN > p.seq_k || (p.causal && key0 + FH_BN - 1 > qwg)) {
        const int cq = (threadIdx.x % 4) * 2;
#pragma unroll
        for (int i = 0; i < 64; ++i) {
            const int key = key0 + (i / 4) * 8 + cq + i % 2, query = row0 + ((i % 4) / 2) * 8;
            if (key >= p.seq_k || (p.causal && key > query)) s[i] = -INFINITY;
        }
    }
}

// Online softmax (base 2, maxima in raw score units as in flash.cu): takes the running maxima m of
// the thread's two rows over the tile, rescales the sums l, and returns the exponent bases and the
// factors `corr` the accumulators must be multiplied by.
__device__ __forceinline__ void softmax_update(const float s[64], float m[2], float l[2], float base[2], float corr[2],
                                               float scale_log2) {
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int i = 0; i < 64; ++i) mx[(i % 4) / 2] = fmaxf(mx[(i % 4) / 2], s[i]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        base[r] = mx[r] == -INFINITY ? 0.0f : mx[r] * scale_log2;
        corr[r] = exp2f(fmaf(m[r], scale_log2, -base[r]));
        m[r] = mx[r];
        l[r] *= corr[r];
    }
}

__device__ __forceinline__ void rescale_acc(float acc[32], const float corr[2]) {
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] *= corr[(i % 4) / 2];
}

// P = exp2(S scale_log2 - base) packed into the A fragments of the eight 16-key steps; adds the
// probabilities to the row sums.
template <typename T>
__device__ __forceinline__ void softmax_probs(const float s[64], const float base[2], float l[2], float scale_log2,
                                              uint32_t pa[FH_BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < FH_BN / 16; ++kk) {
        float pv[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            pv[e] = exp2f(fmaf(s[8 * kk + e], scale_log2, -base[(e % 4) / 2]));
            l[(e % 4) / 2] += pv[e];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) pa[kk][r] = MmaType<T>::pack(pv[2 * r], pv[2 * r + 1]);
    }
}

// The single-buffer form of softmax_probs (three-consumer kernel, whose 160 registers a thread
// hold no second P): the probabilities replace the scores in place, added to the row sums; they
// are packed into A fragments (pack_probs) only once the P V product reading the previous ones is
// done.
__device__ __forceinline__ void softmax_exp(float s[64], const float base[2], float l[2], float scale_log2) {
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        s[i] = exp2f(fmaf(s[i], scale_log2, -base[(i % 4) / 2]));
        l[(i % 4) / 2] += s[i];
    }
}

template <typename T>
__device__ __forceinline__ void pack_probs(const float s[64], uint32_t pa[FH_BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < FH_BN / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) pa[kk][r] = MmaType<T>::pack(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

// Normalises the warp's 16 rows, stages them in `stage` (16 rows of this warpgroup's part of the Q
// tile, swizzled chunks: the eight rows a store instruction covers fall in distinct banks) and
// stores 16-byte pieces of the rows below seq_q.
template <typename T>
__device__ __forceinline__ void store_rows(const float acc[32], const float l[2], T* stage, T* o, int first_row,
                                           const FlashAttentionParams& p) {
    const int lane = threadIdx.x % 32, g = lane / 4, cq = (lane % 4) * 2;
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
        const int rr = g + ((i % 4) / 2) * 8, n = i / 4;
        *reinterpret_cast<uint32_t*>(stage + rr * FH_D + ((n ^ (rr % 8)) * 8) + cq) =
            MmaType<T>::pack(acc[i] * inv[(i % 4) / 2], acc[i + 1] * inv[(i % 4) / 2]);
    }
    __syncwarp();
    for (int i = lane; i < 16 * (FH_D / 8); i += 32) {
        const int rr = i / (FH_D / 8), c = i % (FH_D / 8);
        const int query = first_row + rr;
        if (query < p.seq_q)
            *reinterpret_cast<uint4*>(o + (int64_t)query * p.o_stride + c * 8) =
                *reinterpret_cast<const uint4*>(stage + rr * FH_D + ((c ^ (rr % 8)) * 8));
    }
}

// Copies token rows [first, first + FH_BN) of one head into a swizzled tile; rows at or past
// `limit` are zero-filled (a NaN in a padding V row would survive a zero probability).
template <typename T>
__device__ __forceinline__ void load_swizzled(T* tile, const T* base, int64_t stride, int first, int limit) {
    for (int i = threadIdx.x; i < FH_BN * (FH_D / 8); i += blockDim.x) {
        const int r = i / (FH_D / 8), c = i % (FH_D / 8);
        T* dst = tile + r * FH_D + ((c ^ (r % 8)) * 8);
        if (first + r < limit) cp_async16(dst, base + (int64_t)(first + r) * stride + c * 8);
        else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
}

template <typename T>
__device__ void flash_attention_sm90(const FlashAttentionParams& p) {
    extern __shared__ unsigned char fh_smem_raw[];
    // Q tile, then K and V of stage 0 and stage 1; 1024-byte aligned for the 128-byte swizzle.
    T* q_s = reinterpret_cast<T*>(((uintptr_t)fh_smem_raw + 1023) & ~(uintptr_t)1023);
    auto k_tile = [&](int buf) { return q_s + (1 + 2 * buf) * FH_TILE; };
    auto v_tile = [&](int buf) { return q_s + (2 + 2 * buf) * FH_TILE; };

    const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, g = (threadIdx.x % 32) / 4;
    const int b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
    const int q0 = blockIdx.x * FH_BM, qwg = q0 + wg * 64;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * FH_D;
    const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * FH_D;
    const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * FH_D;
    T* o = static_cast<T*>(p.o) + b * p.o_batch_stride + h * FH_D;

    // Key tiles the block loads and this warpgroup uses (as in flash.cu, per 64-row warpgroup).
    int tiles = (p.seq_k + FH_BN - 1) / FH_BN;
    if (p.causal) tiles = min(tiles, (min(q0 + FH_BM, p.seq_q) + FH_BN - 1) / FH_BN);
    int wg_tiles = qwg < p.seq_q ? tiles : 0;
    if (p.causal) wg_tiles = min(wg_tiles, (min(qwg + 64, p.seq_q) + FH_BN - 1) / FH_BN);

    load_swizzled(q_s, q, p.q_stride, q0, p.seq_q);  // FH_BM == FH_BN: the Q tile has a tile's shape
    load_swizzled(k_tile(0), k, p.k_stride, 0, p.seq_k);
    load_swizzled(v_tile(0), v, p.v_stride, 0, p.seq_k);
    cp_async_commit();

    const T* q_wg = q_s + wg * 64 * FH_D;  // this warpgroup's 64 rows: 8 whole swizzle atoms
    const float scale_log2 = p.scale * FH_LOG2E;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g and g + 8 of the warp
    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.0f;

    for (int j = 0; j < tiles; ++j) {
        const int buf = j % 2;
        // Tile j has landed and is visible to wgmma; every warpgroup is done with tile j - 1.
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (j + 1 < tiles) {
            load_swizzled(k_tile(buf ^ 1), k, p.k_stride, (j + 1) * FH_BN, p.seq_k);
            load_swizzled(v_tile(buf ^ 1), v, p.v_stride, (j + 1) * FH_BN, p.seq_k);
            cp_async_commit();
        }
        if (j >= wg_tiles) continue;

        // S = Q K^T, the mask where needed, the online softmax, O += P V
        float s[64];
        wgmma_fence();
        issue_qk<T>(s, q_wg, k_tile(buf));
        wgmma_wait<0>();
        fence_regs(s);
        mask_scores(s, j * FH_BN, qwg + warp * 16 + g, qwg, p);
        float base[2], corr[2];
        softmax_update(s, m, l, base, corr, scale_log2);
        rescale_acc(acc, corr);
        uint32_t pa[FH_BN / 16][4];
        softmax_probs<T>(s, base, l, scale_log2, pa);
        fence_regs(acc);
        wgmma_fence();
        issue_pv<T>(acc, pa, v_tile(buf));
        wgmma_wait<0>();
        fence_regs(acc);
    }

    if (qwg >= p.seq_q) return;
    store_rows<T>(acc, l, const_cast<T*>(q_wg) + warp * 16 * FH_D, o, qwg + warp * 16, p);
}

// ---- The warp-specialised kernel (flash_attention_ws_d64_*), after FlashAttention-3 sections
// 3.1-3.2: warpgroup 0 is the producer (one thread issues TMA copies, cp.async.bulk.tensor, of the Q
// tile and of K / V tiles into a ring of FW_STAGES stages, each completing on a "full" mbarrier by
// its byte count); warpgroups 1 and 2 are consumers of 64 query rows each, which release a stage
// through its "empty" mbarrier (every consumer thread arrives) once their wgmma reads of it are done.
// `setmaxnreg` moves registers from the producer (24) to the consumers (240). Each consumer
// pipelines within the warpgroup: tile j's S = Q K^T is issued before tile j - 1's P V, so the
// softmax of tile j overlaps that product. TMA writes rows past the sequence as zeros; the box's
// 128-byte rows land with the same 128-byte swizzle the descriptors declare (the stage bases are
// 1024-byte aligned). Barrier protocol: PTX ISA "mbarrier" (phase parity), "cp.async.bulk.tensor".
//
// Ping-pong variant (PINGPONG = true, flash_attention_wspp_*; FlashAttention-3 section 3.1,
// "pingpong scheduling"): the two consumers take turns issuing their products, so the tensor cores
// run one consumer's S = Q K^T and P V while the other computes its softmax. Consumer c's turns,
// for its n = wg_tiles tiles: turn 0 issues S_0, turn j (0 < j < n) S_j and P_{j-1} V_{j-1}, turn n
// P_{n-1} V_{n-1}; turns n + 1 ... tiles issue nothing (all of them when n = 0), so both consumers
// take the block's tiles + 1 turns however the causal mask or seq_q splits the rows. Named barrier
// 1 + c is consumer c's (PTX ISA "bar.sync / bar.arrive": a phase completes at 256 arrivals, the
// 128 threads of a bar.sync and the other consumer's 128 of a bar.arrive). Turn t of consumer c:
// bar.sync(1 + c), except consumer 0 at t = 0 (it starts); the turn's wgmma issues and commits;
// bar.arrive(2 - c), except consumer 1 at t = tiles (no turn of consumer 0 follows).
// Why it cannot deadlock or mix phases. The turns form one chain (0,0) (1,0) (0,1) (1,1) ...
// (0,tiles) (1,tiles): the sync of (1,t) pairs with the arrive of (0,t), the sync of (0,t) with the
// arrive of (1,t-1). Each barrier gets as many arrives as syncs (tiles + 1 on barrier 2, tiles on
// barrier 1), so no phase is left open at exit; a consumer's next arrive on the other's barrier
// follows its own next sync, which needs the other's previous sync done, so a phase is always one
// arrive and one sync. The mbarriers: a consumer releases tile j after its turn j + 1 (an unused
// tile in its empty turn j + 1, once landed), with no named barrier between that turn's arrive and
// the release; it awaits tile j before turn j (K) or j + 1 (V), or after turn j + 1 (unused). Tile
// j lands once both consumers released tile j - FW_STAGES, after turns j - FW_STAGES + 1 <= j - 2,
// earlier in the chain: every wait depends only on earlier links. A hang would be on a bar.sync,
// which has no timeout (the mbarrier waits trap after SM90_WAIT_TIMEOUT_NS).

#define FW_STAGES 3

// Box (64, 1, 128, 1) at (0, head, row, batch) of a tensor map into a 1024-byte aligned tile.
__device__ __forceinline__ void tma_load_tile(void* dst, const TensorMap* map, int head, int row, int batch,
                                              uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];" ::"r"(smem_addr(dst)),
        "l"(map), "r"(0), "r"(head), "r"(row), "r"(batch), "r"(smem_addr(bar))
        : "memory");
}

// Persistent form (PERSISTENT = true, flash_attention_wspp_persistent_*; cuDNN's SDPA kernel runs
// one block per multiprocessor too): the grid is at most one block per multiprocessor and each block
// walks the work tiles (128 query rows of one batch and head) blockIdx.x, + gridDim.x, ... The K/V
// ring and its stage count run on across work tiles, Q is double-buffered (q_full / q_empty per
// buffer; a buffer is refilled once every consumer thread has stored its rows through it, the store
// staging being its own Q rows), so the next tile's loads overlap this tile's last products and
// stores. The ping-pong turns form one chain over the block's work tiles: consumer 0 skips its sync
// only on the block's first turn, consumer 1 its arrive only on the last, so both barriers stay
// balanced as in the one-tile protocol above (each work tile gives both consumers tiles + 1 turns).
//
// Three consumers (CONSUMERS = 3, flash_attention_wspp3_persistent_*; FlashAttention-3's tile for
// head dim 64): 192 query rows a work tile and 512 threads, so each K/V tile feeds half as much
// again work and each scheduler holds one more softmax warp. The turns go round: consumer c syncs on
// barrier 1 + c and arrives on the next consumer's, the chain (0,t) (1,t) (2,t) (0,t+1) ... with
// the same balance and ordering argument. 160 registers a consumer thread do not hold a second P:
// tile j's probabilities stay in its score registers while P_{j-1} V_{j-1} runs and are packed
// into the one P buffer after that product's wait, before the next issue.
template <typename T, bool PINGPONG, bool PERSISTENT, int CONSUMERS>
__device__ void flash_attention_ws(const FlashTmaParams& params) {
    static_assert(CONSUMERS == 2 || CONSUMERS == 3, "two or three consumer warpgroups");
    const FlashAttentionParams& p = params.attn;
    extern __shared__ unsigned char fh_smem_raw[];
    constexpr int q_bufs = PERSISTENT ? 2 : 1;
    constexpr int BM = 64 * CONSUMERS;  // query rows per work tile
    constexpr int Q_TILE = BM * FH_D;   // elements of a Q tile (a multiple of the 1024-byte atom)
    constexpr uint32_t consumer_threads = 128 * CONSUMERS;
    // Q tiles, K tiles of the stages, V tiles of the stages, then the barriers.
    T* q_base = reinterpret_cast<T*>(((uintptr_t)fh_smem_raw + 1023) & ~(uintptr_t)1023);
    T* kv_base = q_base + q_bufs * Q_TILE;
    auto q_tile = [&](int qb) { return q_base + qb * Q_TILE; };
    auto k_tile = [&](int st) { return kv_base + st * FH_TILE; };
    auto v_tile = [&](int st) { return kv_base + (FW_STAGES + st) * FH_TILE; };
    uint64_t* q_full = reinterpret_cast<uint64_t*>(kv_base + 2 * FW_STAGES * FH_TILE);
    uint64_t* q_empty = q_full + q_bufs;
    uint64_t* k_full = q_empty + q_bufs;
    uint64_t* v_full = k_full + FW_STAGES;
    uint64_t* empty = v_full + FW_STAGES;
    constexpr uint32_t tile_bytes = FH_TILE * sizeof(T), q_bytes = Q_TILE * sizeof(T);

    const int q_tiles = (p.seq_q + BM - 1) / BM;
    const int work = PERSISTENT ? q_tiles * p.batch * p.heads : 1;
    // Work tile w: query tile w % q_tiles of batch-head w / q_tiles (the grid's x and y otherwise).
    auto tile_of = [&](int w, int& b, int& h, int& q0) {
        const int bh = PERSISTENT ? w / q_tiles : blockIdx.y;
        b = bh / p.heads;
        h = bh % p.heads;
        q0 = (PERSISTENT ? w % q_tiles : blockIdx.x) * BM;
    };
    auto key_tiles = [&](int q0) {
        int tiles = (p.seq_k + FH_BN - 1) / FH_BN;
        if (p.causal) tiles = min(tiles, (min(q0 + BM, p.seq_q) + FH_BN - 1) / FH_BN);
        return tiles;
    };
    const int first = PERSISTENT ? blockIdx.x : 0, stride = PERSISTENT ? gridDim.x : 1;

    if (threadIdx.x == 0) {
        for (int qb = 0; qb < q_bufs; ++qb) {
            mbar_init(&q_full[qb], 1);
            mbar_init(&q_empty[qb], consumer_threads);  // every consumer thread, after its stores
        }
        for (int st = 0; st < FW_STAGES; ++st) {
            mbar_init(&k_full[st], 1);
            mbar_init(&v_full[st], 1);
            mbar_init(&empty[st], consumer_threads);  // every consumer thread
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        fence_proxy_async();
    }
    __syncthreads();

    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        // Registers a thread: 24 here; 240 (two consumers) or 160 (three) in the consumers.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x != 0) return;
        uint32_t jg = 0;  // K/V tiles loaded so far by this block
        for (int w = first, local = 0; w < work; w += stride, ++local) {
            int b, h, q0;
            tile_of(w, b, h, q0);
            const int qb = local % q_bufs;
            // Use local / q_bufs of the Q buffer: wait for the consumers' stores through the use before.
            if (local >= q_bufs) mbar_wait(&q_empty[qb], ((local / q_bufs) - 1) & 1);
            mbar_arrive_expect_tx(&q_full[qb], q_bytes);
            tma_load_tile(q_tile(qb), &params.q_map, h, q0, b, &q_full[qb]);
            const int tiles = key_tiles(q0);
            for (int j = 0; j < tiles; ++j, ++jg) {
                const int st = jg % FW_STAGES;
                // Use jg / FW_STAGES of the stage: wait for the consumers' release of the use before.
                if (jg >= FW_STAGES) mbar_wait(&empty[st], ((jg / FW_STAGES) - 1) & 1);
                mbar_arrive_expect_tx(&k_full[st], tile_bytes);
                tma_load_tile(k_tile(st), &params.k_map, h, j * FH_BN, b, &k_full[st]);
                mbar_arrive_expect_tx(&v_full[st], tile_bytes);
                tma_load_tile(v_tile(st), &params.v_map, h, j * FH_BN, b, &v_full[st]);
            }
        }
        return;
    }
    if constexpr (CONSUMERS == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    else asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n" ::: "memory");

    const int cw = wg - 1, warp = (threadIdx.x % 128) / 32, g = (threadIdx.x % 32) / 4;
    const float scale_log2 = p.scale * FH_LOG2E;
    uint32_t jbase = 0;  // K/V tiles of this block's earlier work tiles
    for (int w = first, local = 0; w < work; w += stride, ++local) {
        int b, h, q0;
        tile_of(w, b, h, q0);
        const int tiles = key_tiles(q0);
        const bool first_tile = local == 0, last_tile = w + stride >= work;
        const int qb = local % q_bufs;
        const int qwg = q0 + cw * 64, row0 = qwg + warp * 16 + g;
        int wg_tiles = qwg < p.seq_q ? tiles : 0;
        if (p.causal) wg_tiles = min(wg_tiles, (min(qwg + 64, p.seq_q) + FH_BN - 1) / FH_BN);
        const T* q_wg = q_tile(qb) + cw * 64 * FH_D;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
        float acc[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
        auto stage = [&](int j) { return (int)((jbase + j) % FW_STAGES); };
        auto parity = [&](int j) { return (uint32_t)(((jbase + j) / FW_STAGES) & 1); };
        // Ping-pong turn t of this work tile (the protocol in the comments above the kernel; with
        // three consumers the turns go round: consumer c arrives on the next one's barrier).
        auto turn_begin = [&](int t) {
            if constexpr (PINGPONG)
                if (cw != 0 || t != 0 || !first_tile) named_bar_sync(1 + cw, 256);
        };
        auto turn_end = [&](int t) {
            if constexpr (PINGPONG)
                if (cw != CONSUMERS - 1 || t != tiles || !last_tile)
                    named_bar_arrive(CONSUMERS == 2 ? 2 - cw : 1 + (cw + 1) % CONSUMERS, 256);
        };

        // The last tile's O += P V.
        auto finish = [&](uint32_t(&cur)[FH_BN / 16][4]) {
            const int last = stage(wg_tiles - 1);
            mbar_wait(&v_full[last], parity(wg_tiles - 1));
            turn_begin(wg_tiles);
            wgmma_fence();
            issue_pv<T>(acc, cur, v_tile(last));
            turn_end(wg_tiles);
            wgmma_wait<0>();
            fence_regs(acc);
            fence_pa(cur);
            mbar_arrive(&empty[last]);
        };
        if (wg_tiles > 0) {
            float s[64], base[2], corr[2];
            // P buffers. Two consumers alternate two for the even and odd tiles, so no register
            // copies sit between a P V product's issue and its wait (ptxas would serialise the wgmma
            // pipeline, note C7513). Three (160 registers a thread) hold one: tile j's probabilities
            // stay in s (fp32) while P_{j-1} V_{j-1} reads it and are packed once that product is done.
            constexpr bool one_p = CONSUMERS == 3;
            uint32_t pa[one_p ? 1 : 2][FH_BN / 16][4];
            mbar_wait(&q_full[qb], (local / q_bufs) & 1);
            mbar_wait(&k_full[stage(0)], parity(0));
            turn_begin(0);
            wgmma_fence();
            issue_qk<T>(s, q_wg, k_tile(stage(0)));
            turn_end(0);
            wgmma_wait<0>();
            fence_regs(s);
            mask_scores(s, 0, row0, qwg, p);
            softmax_update(s, m, l, base, corr, scale_log2);
            if constexpr (one_p) {
                softmax_exp(s, base, l, scale_log2);
                pack_probs<T>(s, pa[0]);
            } else {
                softmax_probs<T>(s, base, l, scale_log2, pa[0]);
            }
            // Tile j: S_j = Q K_j^T, then O += P_{j-1} V_{j-1} (from `cur`); the softmax of S_j (into
            // `next`) runs while the latter does.
            auto step = [&](int j, uint32_t(&cur)[FH_BN / 16][4], uint32_t(&next)[FH_BN / 16][4]) {
                const int st = stage(j), prev = stage(j - 1);
                mbar_wait(&k_full[st], parity(j));
                mbar_wait(&v_full[prev], parity(j - 1));
                turn_begin(j);
                wgmma_fence();
                issue_qk<T>(s, q_wg, k_tile(st));
                issue_pv<T>(acc, cur, v_tile(prev));
                turn_end(j);
                wgmma_wait<1>();
                fence_regs(s);
                mask_scores(s, j * FH_BN, row0, qwg, p);
                softmax_update(s, m, l, base, corr, scale_log2);
                if constexpr (one_p) softmax_exp(s, base, l, scale_log2);
                else softmax_probs<T>(s, base, l, scale_log2, next);
                wgmma_wait<0>();
                fence_regs(acc);
                fence_pa(cur);  // P_{j-1} stays in its registers until the product has read them
                mbar_arrive(&empty[prev]);
                rescale_acc(acc, corr);
                if constexpr (one_p) pack_probs<T>(s, next);
            };
            if constexpr (one_p) {
                for (int j = 1; j < wg_tiles; ++j) step(j, pa[0], pa[0]);
                finish(pa[0]);
            } else {
                int j = 1;
                for (; j + 1 < wg_tiles; j += 2) {
                    step(j, pa[0], pa[1]);
                    step(j + 1, pa[1], pa[0]);
                }
                if (j < wg_tiles) {
                    step(j, pa[0], pa[1]);
                    finish(pa[1]);
                } else {
                    finish(pa[0]);
                }
            }
        }
        // Tiles the block loads past this warpgroup's last (causal, or no rows): released unread, each
        // after it has landed, so the producer's phase accounting stays in step. Ping-pong: the empty
        // turns, tile j's release after turn j + 1 as for a used tile (turn 0 first when there is none).
        if constexpr (PINGPONG)
            if (wg_tiles == 0) {
                turn_begin(0);
                turn_end(0);
            }
        for (int j = wg_tiles; j < tiles; ++j) {
            turn_begin(j + 1);
            turn_end(j + 1);
            mbar_wait(&k_full[stage(j)], parity(j));
            mbar_wait(&v_full[stage(j)], parity(j));
            mbar_arrive(&empty[stage(j)]);
        }

        if (qwg < p.seq_q) {
            T* o = static_cast<T*>(p.o) + b * p.o_batch_stride + h * FH_D;
            store_rows<T>(acc, l, const_cast<T*>(q_wg) + warp * 16 * FH_D, o, qwg + warp * 16, p);
        }
        if constexpr (PERSISTENT) {
            // A warpgroup without rows never waited for this Q: it must land before its release.
            if (wg_tiles == 0) mbar_wait(&q_full[qb], (local / q_bufs) & 1);
            fence_proxy_async();  // the staging's generic-proxy writes before the TMA's refill
            mbar_arrive(&q_empty[qb]);
        }
        jbase += tiles;
    }
}

#endif

// Launched only on devices of compute capability 9.0 (src/ops/attention.rs). The cp.async kernel
// runs one block per multiprocessor: capped at 128 registers for two it spills, and the
// warp-specialised kernel is the routed one.
SM90_ENTRY(flash_attention_sm90_d64_f16, 256, FlashAttentionParams, flash_attention_sm90, __half)
SM90_ENTRY(flash_attention_sm90_d64_bf16, 256, FlashAttentionParams, flash_attention_sm90, __nv_bfloat16)
// 384 threads: the producer warpgroup and two consumer warpgroups (one block per multiprocessor);
// `true`: the ping-pong variant.
SM90_ENTRY(flash_attention_ws_d64_f16, 384, FlashTmaParams, flash_attention_ws, __half, false, false, 2)
SM90_ENTRY(flash_attention_ws_d64_bf16, 384, FlashTmaParams, flash_attention_ws, __nv_bfloat16, false, false, 2)
SM90_ENTRY(flash_attention_wspp_d64_f16, 384, FlashTmaParams, flash_attention_ws, __half, true, false, 2)
SM90_ENTRY(flash_attention_wspp_d64_bf16, 384, FlashTmaParams, flash_attention_ws, __nv_bfloat16, true, false, 2)
// The persistent ping-pong form: at most one block per multiprocessor, each walking work tiles.
SM90_ENTRY(flash_attention_wspp_persistent_d64_f16, 384, FlashTmaParams, flash_attention_ws, __half, true, true, 2)
SM90_ENTRY(flash_attention_wspp_persistent_d64_bf16, 384, FlashTmaParams, flash_attention_ws, __nv_bfloat16, true, true, 2)
// 512 threads: three consumer warpgroups (192 query rows a work tile), ping-pong, persistent. (One
// block per tile, the same code spills 276 bytes: ptxas keeps P in local memory across the loop.)
SM90_ENTRY(flash_attention_wspp3_persistent_d64_f16, 512, FlashTmaParams, flash_attention_ws, __half, true, true, 3)
SM90_ENTRY(flash_attention_wspp3_persistent_d64_bf16, 512, FlashTmaParams, flash_attention_ws, __nv_bfloat16, true, true, 3)
