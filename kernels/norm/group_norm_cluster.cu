// Group norm (+ optional SiLU) over NHWC activations with thread block clusters (sm_90).
//
// One cluster per (domain, channel slice): the slice is whole groups, and its pixels are dealt to
// the cluster's blocks in runs of `rows` pixels. Each block copies its pixels' part of the slice
// into shared memory (16-byte cp.async; one bulk copy per pixel run measured slower,
// benches/RESULTS.md), so x is read from memory once. Statistics: per group, sums of (x - shift)
// and (x - shift)^2 over the block (shift = the group's first value in the domain, which keeps
// E[d^2] - E[d]^2 from cancelling): each block writes its sums into every block of the cluster
// (distributed shared memory), and after one cluster barrier each block adds them up from its own
// shared memory. Every block adds the ranks in the same order, so all blocks of a cluster use
// identical statistics (fp32 throughout: the shift keeps the sums small). Then each block
// normalises its pixels from shared memory and writes y (and, when asked, the raw values to
// x_cat: the input may be a concatenation [x, x_tail] on the channels that is read from its two
// parts and, for the consumers reading it besides the norm, written only here).
//
// Launch (src/ops/norm.rs picks the layout): grid (channels / slice_channels * cluster blocks,
// domains), cluster x of row y being slice x of domain y; blockDim.x = rows * slice_channels / 8
// rounded up to whole warps. Dynamic shared memory, in order: the tile (tile_pixels *
// slice_channels elements), one float4 of partial sums per thread, the slice's gamma and beta
// (slice_channels elements each), every cluster block's float2 sums per slice group. Each thread's
// 8 channels may span at most two groups (4 or at least 8 channels per group).
//
// The host picks this kernel when a slice fits the cluster; other shapes, and GPUs before sm_90,
// use the two-phase kernel of group_norm.cu.
#include "common.cuh"

#define GROUP_NORM_CLUSTER_MAX_THREADS 512

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_blocks() {
    unsigned n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
    return n;
}
// The cluster's x index in the grid of clusters.
__device__ __forceinline__ unsigned cluster_x() {
    unsigned x;
    asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(x));
    return x;
}
// Cluster barrier: every thread's earlier writes to any block's shared memory (release) are seen by
// every thread of the cluster after it (acquire). All threads of the block take part.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// Split form of the same: arrive without ordering memory, and wait.
__device__ __forceinline__ void cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory"); }

// Stores v at the address `p` has in our shared memory, in block `rank`'s.
__device__ __forceinline__ void store_cluster_f32x2(float2* p, unsigned rank, float2 v) {
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_u32(p)), "r"(rank));
    asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};\n" ::"r"(remote), "f"(v.x), "f"(v.y) : "memory");
}

// y = x * scale + offset (+ SiLU) for the thread's pixels, read from the tile in shared memory;
// x itself to raw_at unless it is null.
template <typename T, bool SILU>
__device__ __forceinline__ void normalise_rows(const T* tile_at, int tile_step, T* y_at, T* raw_at, int64_t y_step,
                                               int count, const float scale[8], const float offset[8]) {
#pragma unroll 4
    for (int k = 0; k < count; ++k) {
        float v[8];
        const Vec8<T> x = load8<T>(tile_at);
        if (raw_at) {
            store8<T>(raw_at, x);
            raw_at += y_step;
        }
        unpack8<T>(x, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            v[j] = fmaf(v[j], scale[j], offset[j]);
            if (SILU) v[j] = silu_f32(v[j]);
        }
        store8<T>(y_at, v);
        tile_at += tile_step;
        y_at += y_step;
    }
}

// T is __half or __nv_bfloat16: a thread's 8 channels are one 16-byte piece.
template <typename T>
__device__ void group_norm_cluster(const GroupNormClusterParams& p) {
    extern __shared__ __align__(128) unsigned char smem[];  // the tile, then the thread partials
    __shared__ float g_shift[GROUP_NORM_CLUSTER_MAX_SLICE_GROUPS];
    __shared__ float g_mean[GROUP_NORM_CLUSTER_MAX_SLICE_GROUPS], g_scale[GROUP_NORM_CLUSTER_MAX_SLICE_GROUPS];

    // Grid (slices * cluster blocks, domains): cluster x of row y is slice x of domain y.
    const int C = p.channels, SC = p.slice_channels, V = SC / 8, cpg = p.group_channels;
    const unsigned rank = cluster_rank(), blocks = cluster_blocks();
    const int slice = (int)cluster_x();
    const int64_t base = blockIdx.y * p.pixels * C + slice * SC;  // pixel 0 of this slice in y
    T* tile = reinterpret_cast<T*>(smem);
    float4* partials = reinterpret_cast<float4*>(smem + (size_t)p.tile_pixels * SC * sizeof(T));  // [blockDim.x]
    T* affine = reinterpret_cast<T*>(partials + blockDim.x);  // the slice's gamma, then its beta
    // [cluster blocks][slice groups]: every block's sums, written by that block into all blocks
    float2* block_sums = reinterpret_cast<float2*>(affine + 2 * SC);

    // Thread (row, slot) handles channels [8 slot, 8 slot + 8) of the slice at its tile's pixels
    // row + k * rows. Those channels span at most two groups (the host ensures it): lo, and hi from
    // channel split. Threads past rows * V (the block is whole warps) only help with the sums.
    const int row = threadIdx.x / V, slot = threadIdx.x % V;
    // The thread's pixels: first_pixel + k * pixel_step, runs of `rows` pixels dealt round-robin to
    // the blocks, so the cluster's blocks sweep the domain together (their copies land at more even
    // times than with a contiguous range per block, and the barrier waits less: 0.7% faster).
    const int64_t first_pixel = (int64_t)rank * p.rows + row, pixel_step = (int64_t)blocks * p.rows;
    const int count =
        row < p.rows && first_pixel < p.pixels ? (int)((p.pixels - first_pixel + pixel_step - 1) / pixel_step) : 0;
    const int lo = slot * 8 / cpg, split = min(8, (lo + 1) * cpg - slot * 8);

    // Another block's shared memory may only be written once that block runs: this barrier phase
    // (waited on before the sums go out) says so, and costs nothing by then.
    cluster_arrive_relaxed();

    // 1. the tile's copies (each thread copies the pieces it reads itself); the group tables
    const T* tile_at = tile + row * SC + slot * 8;
    const int tile_step = p.rows * SC;
    {
        const ConcatPiece<T> piece = concat_piece<T>(p, blockIdx.y * p.pixels + first_pixel, slice * SC + slot * 8);
        const T* src = piece.at;
        const int64_t src_step = pixel_step * piece.pixel_step;
        T* dst = tile + row * SC + slot * 8;
        for (int k = 0; k < count; ++k, src += src_step, dst += tile_step) cp_async16(dst, src);
        // gamma and beta come along, so normalising does not wait on global loads
        if (threadIdx.x < V) {
            cp_async16(affine + slot * 8, static_cast<const T*>(p.gamma) + slice * SC + slot * 8);
            cp_async16(affine + SC + slot * 8, static_cast<const T*>(p.beta) + slice * SC + slot * 8);
        }
        cp_async_commit();
    }
    // x_bias: every value of channel c counts as x + bias[c], the domain's row of x_bias (the
    // thread's channels are fixed)
    const T* x_bias =
        p.x_bias ? static_cast<const T*>(p.x_bias) + blockIdx.y / p.x_bias_every * C + slice * SC : nullptr;
    float bias[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (x_bias) unpack8<T>(load8<T>(x_bias + slot * 8), bias);
    for (int g = threadIdx.x; g < p.slice_groups; g += blockDim.x)
        g_shift[g] = to_f32(*concat_piece<T>(p, blockIdx.y * p.pixels, slice * SC + g * cpg).at) +
                     (x_bias ? to_f32(x_bias[g * cpg]) : 0.0f);
    __syncthreads();
    float shift[8];  // of the stored x: the group's shift less the channel's bias
#pragma unroll
    for (int j = 0; j < 8; ++j) shift[j] = g_shift[j < split ? lo : lo + 1] - bias[j];
    cp_async_wait<0>();

    // 2. the thread's shifted sums for its two groups, then the block's per group
    float s1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    {
        const T* at = tile_at;
#pragma unroll 4
        for (int k = 0; k < count; ++k, at += tile_step) {
            float v[8];
            unpack8<T>(load8<T>(at), v);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float d = v[j] - shift[j];
                s1[j] += d;
                s2[j] = fmaf(d, d, s2[j]);
            }
        }
    }
    float4 mine = make_float4(0.0f, 0.0f, 0.0f, 0.0f);  // (lo sum, lo squares, hi sum, hi squares)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (j < split) {
            mine.x += s1[j];
            mine.y += s2[j];
        } else {
            mine.z += s1[j];
            mine.w += s2[j];
        }
    }
    partials[threadIdx.x] = mine;
    __syncthreads();
    // One warp per group: its lanes add the partials of the slots holding the group's channels.
    // (blockDim.x is a multiple of 32, so every warp is whole for the shuffles.)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    cluster_wait();
    for (int g = warp; g < p.slice_groups; g += blockDim.x / 32) {
        float a = 0.0f, b = 0.0f;
        for (int s = g * cpg / 8; s <= ((g + 1) * cpg - 1) / 8; ++s) {
            const bool is_lo = s * 8 >= g * cpg;  // the slot starts in this group, else in the one before
            for (int r = lane; r < p.rows; r += 32) {
                const float4 q = partials[r * V + s];
                a += is_lo ? q.x : q.z;
                b += is_lo ? q.y : q.w;
            }
        }
        a = warp_sum(a);
        b = warp_sum(b);
        // Lane r hands them to block r: after the barrier each block adds them from its own memory.
        if (lane < (int)blocks) store_cluster_f32x2(&block_sums[rank * p.slice_groups + g], lane, make_float2(a, b));
    }

    // 3. the cluster's totals: lane r of a 16-lane segment reads block r's sums of group g (from the
    //    copy block r wrote here), and the segment adds them (the same order in every block, so all
    //    blocks agree exactly). After this barrier no block touches another's memory, so blocks may
    //    exit as they finish.
    cluster_sync();
    const float inv_n = 1.0f / ((float)p.pixels * cpg);
    for (int t0 = warp * 32; t0 < p.slice_groups * 16; t0 += blockDim.x) {  // whole warps iterate together
        const int t = t0 + lane, g = t >> 4, r = t & 15;
        float2 q = make_float2(0.0f, 0.0f);
        if (g < p.slice_groups && r < (int)blocks) q = block_sums[r * p.slice_groups + g];
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) {
            q.x += __shfl_xor_sync(0xffffffffu, q.x, o);
            q.y += __shfl_xor_sync(0xffffffffu, q.y, o);
        }
        if (r == 0 && g < p.slice_groups) {
            const float mean = q.x * inv_n;  // of x - shift
            g_mean[g] = g_shift[g] + mean;
            g_scale[g] = rsqrtf(fmaxf(q.y * inv_n - mean * mean, 0.0f) + p.eps);
        }
    }
    __syncthreads();

    // 4. normalise from shared memory
    float scale[8], offset[8];
    unpack8<T>(load8<T>(affine + slot * 8), scale);
    unpack8<T>(load8<T>(affine + SC + slot * 8), offset);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int g = j < split ? lo : lo + 1;
        scale[j] *= g_scale[g];
        offset[j] = fmaf(bias[j] - g_mean[g], scale[j], offset[j]);
    }
    const int64_t at = base + first_pixel * C + slot * 8;
    T* y_at = static_cast<T*>(p.y) + at;
    T* raw_at = p.x_cat ? static_cast<T*>(p.x_cat) + at : nullptr;
    const int64_t y_step = pixel_step * C;
    if (p.silu) {
        normalise_rows<T, true>(tile_at, tile_step, y_at, raw_at, y_step, count, scale, offset);
    } else {
        normalise_rows<T, false>(tile_at, tile_step, y_at, raw_at, y_step, count, scale, offset);
    }
}

#define GROUP_NORM_CLUSTER_KERNEL(NAME, T)                                                      \
    extern "C" __global__ void __launch_bounds__(GROUP_NORM_CLUSTER_MAX_THREADS)                \
        NAME(const __grid_constant__ GroupNormClusterParams p) {                               \
        group_norm_cluster<T>(p);                                                               \
    }
#else
// Before sm_90 there are no clusters; the host never launches these.
#define GROUP_NORM_CLUSTER_KERNEL(NAME, T) \
    extern "C" __global__ void NAME(const __grid_constant__ GroupNormClusterParams p) { __trap(); }
#endif

GROUP_NORM_CLUSTER_KERNEL(group_norm_cluster_f16, __half)
GROUP_NORM_CLUSTER_KERNEL(group_norm_cluster_bf16, __nv_bfloat16)
