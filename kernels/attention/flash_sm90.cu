// Flash attention forward for head dim 64 on Hopper (sm_90a): the QK^T and PV products run on
// wgmma (warpgroup MMA, operands from shared-memory descriptors; P from registers), after
// FlashAttention-3 (Shah et al. 2024, "FlashAttention-3", sections 3.1-3.2) without its warp
// specialisation and TMA: every thread loads with cp.async.
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

#define FH_D 64
#define FH_BM 128  // query rows per block: two warpgroups of 64
#define FH_BN 128  // keys per tile
#define FH_TILE (FH_BN * FH_D)  // elements of a K or V tile (16 KiB), and of the Q tile
#define FH_LOG2E 1.4426950408889634f

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Leading-dimension offset 16 B as CUTLASS's make_gmma_desc sets it for swizzled layouts
// (cute/atom/mma_traits_sm90_gmma.hpp), stride 1024 B, 128-byte swizzle.
__device__ __forceinline__ uint64_t sw128_desc(const void* smem) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(smem);
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

// Pins accumulator registers at this point: the compiler sees a wgmma's outputs as written when
// the instruction issues, not when wgmma.wait_group returns (CUTLASS's warpgroup_fence_operand).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Makes this thread's shared-memory writes (cp.async included) visible to the async proxy wgmma
// reads through.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d (64 x 128 per warpgroup) = or += A (64 x 16, K-major descriptor) B (16 x 128, K-major descriptor)
template <typename T>
__device__ __forceinline__ void wgmma_qk(float d[64], uint64_t a, uint64_t b, int scale_d) {
    if constexpr (std::is_same<T, __half>::value) {
            asm volatile(
                "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                : "l"(a), "l"(b), "r"(scale_d));
    } else {
            asm volatile(
                "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                : "l"(a), "l"(b), "r"(scale_d));
    }
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

    const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, cq = (lane % 4) * 2;
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

        // 1. S = Q K^T: four 16-wide steps over the head dim
        float s[64];
        wgmma_fence();
#pragma unroll
        for (int kd = 0; kd < FH_D / 16; ++kd)
            wgmma_qk<T>(s, sw128_desc(q_wg + kd * 16), sw128_desc(k_tile(buf) + kd * 16), kd);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(s);

        // 2. mask keys past seq_k and, causal, after the query: only the last and diagonal tiles
        const int key0 = j * FH_BN, row0 = qwg + warp * 16 + g;
        if (key0 + FH_BN > p.seq_k || (p.causal && key0 + FH_BN - 1 > qwg)) {
#pragma unroll
            for (int i = 0; i < 64; ++i) {
                const int key = key0 + (i / 4) * 8 + cq + i % 2, query = row0 + ((i % 4) / 2) * 8;
                if (key >= p.seq_k || (p.causal && key > query)) s[i] = -INFINITY;
            }
        }

        // 3. running max (raw units), rescale sums and accumulators
        float mx[2] = {m[0], m[1]}, base[2];
#pragma unroll
        for (int i = 0; i < 64; ++i) mx[(i % 4) / 2] = fmaxf(mx[(i % 4) / 2], s[i]);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            base[r] = mx[r] == -INFINITY ? 0.0f : mx[r] * scale_log2;
            const float corr = exp2f(fmaf(m[r], scale_log2, -base[r]));
            m[r] = mx[r];
            l[r] *= corr;
#pragma unroll
            for (int n = 0; n < FH_D / 8; ++n) {
                acc[4 * n + 2 * r] *= corr;
                acc[4 * n + 2 * r + 1] *= corr;
            }
        }

        // 4. P = exp2(S scale_log2 - max) as A fragments, then O += P V over eight 16-key steps
        uint32_t pa[FH_BN / 16][4];
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
        fence_regs(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < FH_BN / 16; ++kk) wgmma_pv<T>(acc, pa[kk], sw128_desc(v_tile(buf) + kk * 16 * FH_D));
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(acc);
    }

    // 5. normalise, stage the warp's 16 rows in its part of the Q tile (swizzled chunks: the eight
    //    rows a store instruction covers fall in distinct banks), store 16-byte pieces
    if (qwg >= p.seq_q) return;
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    T* stage = const_cast<T*>(q_wg) + warp * 16 * FH_D;
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
        const int rr = g + ((i % 4) / 2) * 8, n = i / 4;
        *reinterpret_cast<uint32_t*>(stage + rr * FH_D + ((n ^ (rr % 8)) * 8) + cq) =
            MmaType<T>::pack(acc[i] * inv[(i % 4) / 2], acc[i + 1] * inv[(i % 4) / 2]);
    }
    __syncwarp();
    for (int i = lane; i < 16 * (FH_D / 8); i += 32) {
        const int rr = i / (FH_D / 8), c = i % (FH_D / 8);
        const int query = qwg + warp * 16 + rr;
        if (query < p.seq_q)
            *reinterpret_cast<uint4*>(o + (int64_t)query * p.o_stride + c * 8) =
                *reinterpret_cast<const uint4*>(stage + rr * FH_D + ((c ^ (rr % 8)) * 8));
    }
}

#endif

// Launched only on devices of compute capability 9.0 (src/ops/attention.rs); the other targets of
// this file hold a trap, since wgmma exists only on sm_90a. Two blocks per multiprocessor (128
// registers, no spills; 2 x 82 KiB of shared memory): each warpgroup runs its QK^T, softmax and PV
// in sequence, so a second block's warpgroups keep the tensor cores busy during the softmax
// (at 157 registers only one block fit).
extern "C" __global__ void __launch_bounds__(256, 2) flash_attention_sm90_d64_f16(const __grid_constant__ FlashAttentionParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    flash_attention_sm90<__half>(p);
#else
    __trap();
#endif
}
extern "C" __global__ void __launch_bounds__(256, 2) flash_attention_sm90_d64_bf16(const __grid_constant__ FlashAttentionParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    flash_attention_sm90<__nv_bfloat16>(p);
#else
    __trap();
#endif
}
