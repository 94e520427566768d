// Group norm (+ optional SiLU) over NHWC activations, one persistent kernel.
//
// Layout of the work: a domain (one image, or the frames of one video) is cut into chunks of
// `rows * VECS` pixels. Thread (row, slot) owns channels [8 slot, 8 slot + 8) of pixels
// chunk_start + row + k * rows, k < VECS (GROUP_NORM_VECS_*), so each step of a block reads `rows` whole
// contiguous pixels (coalesced 16-byte loads).
//
// Two kinds of work item, taken in ticket order (see GroupNormParams):
//  - statistics(d, k): exact two-pass mean / M2 of every group over the chunk (data stays in
//    registers), written as a partial; the last chunk of a domain to arrive merges all partials
//    (Chan's formula, fp64) into mean / rstd and raises the domain's ready flag.
//  - normalise(d, k): loads the chunk (usually from L2: its statistics item ran `lag` domains
//    earlier), waits for the flag, writes (x - mean) * rstd * gamma + beta, SiLU if asked.
// A normalise item only waits for statistics items holding smaller tickets, which were taken by
// blocks already running, so the wait always ends.
#include "common.cuh"

#define GROUP_NORM_MAX_THREADS 512
#define GROUP_NORM_MAX_GROUPS 128

struct GroupNormItem {
    bool statistics;
    int64_t domain;
    int64_t chunk;
};

__device__ __forceinline__ GroupNormItem decode_item(const GroupNormParams& p, int64_t t) {
    const int64_t K = p.chunks, L = p.lag, D = p.domains;
    if (t < L * K) return {true, t / K, t % K};
    t -= L * K;
    if (t < (D - L) * 2 * K) {
        const int64_t round = t / (2 * K), w = t % (2 * K);
        return w < K ? GroupNormItem{true, L + round, w} : GroupNormItem{false, round, w - K};
    }
    t -= (D - L) * 2 * K;
    return {false, D - L + t / K, t % K};
}

// Sum `per_thread[8]` over the block's rows into chan[c], then over each group into out[g].
__device__ __forceinline__ void reduce_to_groups(const GroupNormParams& p, const float per_thread[8], float* red,
                                                 float* chan, float* out) {
    const int C = p.channels, cpg = C / p.groups;
    const int row = threadIdx.x / (C / 8), slot = threadIdx.x % (C / 8);
#pragma unroll
    for (int j = 0; j < 8; ++j) red[row * C + slot * 8 + j] = per_thread[j];
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = 0.0f;
        for (int r = 0; r < p.rows; ++r) s += red[r * C + c];
        chan[c] = s;
    }
    __syncthreads();
    for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
        float s = 0.0f;
        for (int c = g * cpg; c < (g + 1) * cpg; ++c) s += chan[c];
        out[g] = s;
    }
    __syncthreads();
}

template <typename T, int VECS>
__device__ void group_norm(const GroupNormParams& p) {
    extern __shared__ float red[];  // [rows][channels]
    __shared__ float chan[GROUP_NORM_MAX_THREADS * 8];  // [channels]
    __shared__ float g_mean[GROUP_NORM_MAX_GROUPS], g_aux[GROUP_NORM_MAX_GROUPS];
    __shared__ int64_t s_ticket;
    __shared__ int s_last;

    const int C = p.channels, V = C / 8, cpg = C / p.groups;
    const int row = threadIdx.x / V, slot = threadIdx.x % V;
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    uint32_t* arrivals = p.control + 1;
    uint32_t* ready = p.control + 1 + p.domains;
    const int64_t chunk_pixels = (int64_t)p.rows * VECS;
    const int64_t total = 2 * p.domains * p.chunks;

    float gamma[8], beta[8];
    unpack8<T>(load8<T>(static_cast<const T*>(p.gamma) + slot * 8), gamma);
    unpack8<T>(load8<T>(static_cast<const T*>(p.beta) + slot * 8), beta);

    while (true) {
        if (threadIdx.x == 0) s_ticket = atomicAdd(p.control, 1u);
        __syncthreads();
        const int64_t ticket = s_ticket;
        __syncthreads();
        if (ticket >= total) break;
        const GroupNormItem item = decode_item(p, ticket);
        const int64_t first = item.chunk * chunk_pixels;
        const int64_t valid = min(chunk_pixels, p.pixels - first);
        const T* xs = x + (item.domain * p.pixels + first) * C + slot * 8;

        Vec8<T> data[VECS];
#pragma unroll
        for (int k = 0; k < VECS; ++k) {
            const int64_t px = row + (int64_t)k * p.rows;
            if (px < valid) data[k] = load8<T>(xs + px * C);
        }

        if (item.statistics) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
            for (int k = 0; k < VECS; ++k) {
                if (row + (int64_t)k * p.rows < valid) {
                    float v[8];
                    unpack8<T>(data[k], v);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[j] += v[j];
                }
            }
            reduce_to_groups(p, acc, red, chan, g_mean);
            const float count = (float)(valid * cpg);
            for (int g = threadIdx.x; g < p.groups; g += blockDim.x) g_mean[g] /= count;
            __syncthreads();
            float mean[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) { mean[j] = g_mean[(slot * 8 + j) / cpg]; acc[j] = 0.0f; }
#pragma unroll
            for (int k = 0; k < VECS; ++k) {
                if (row + (int64_t)k * p.rows < valid) {
                    float v[8];
                    unpack8<T>(data[k], v);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[j] += (v[j] - mean[j]) * (v[j] - mean[j]);
                }
            }
            reduce_to_groups(p, acc, red, chan, g_aux);
            float* part = p.partials + (item.domain * p.chunks + item.chunk) * p.groups * 4;
            for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
                part[g * 4 + 0] = count;
                part[g * 4 + 1] = g_mean[g];
                part[g * 4 + 2] = g_aux[g];
            }
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) s_last = atomicAdd(arrivals + item.domain, 1u) == (uint32_t)(p.chunks - 1);
            __syncthreads();
            if (s_last) {
                __threadfence();
                const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
                const float* parts = p.partials + item.domain * p.chunks * p.groups * 4;
                for (int g = threadIdx.x / 32; g < p.groups; g += warps) {
                    double n = 0.0, m = 0.0, m2 = 0.0;
                    for (int64_t k = lane; k < p.chunks; k += 32) {
                        const float4 q = __ldcg(reinterpret_cast<const float4*>(parts + (k * p.groups + g) * 4));
                        const double nb = q.x, delta = (double)q.y - m, nt = n + nb;
                        m += delta * nb / nt;
                        m2 += (double)q.z + delta * delta * n * nb / nt;
                        n = nt;
                    }
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) {
                        const double nb = __shfl_xor_sync(0xffffffffu, n, o);
                        const double mb = __shfl_xor_sync(0xffffffffu, m, o);
                        const double m2b = __shfl_xor_sync(0xffffffffu, m2, o);
                        const double nt = n + nb;
                        if (nt > 0.0) {
                            const double delta = mb - m;
                            m2 += m2b + delta * delta * n * nb / nt;
                            m += delta * nb / nt;
                        }
                        n = nt;
                    }
                    if (lane == 0) {
                        p.stats[(item.domain * p.groups + g) * 2 + 0] = (float)m;
                        p.stats[(item.domain * p.groups + g) * 2 + 1] = (float)(1.0 / sqrt(m2 / n + (double)p.eps));
                    }
                }
                __threadfence();
                __syncthreads();
                if (threadIdx.x == 0) atomicExch(ready + item.domain, 1u);
            }
        } else {
            if (threadIdx.x == 0) {
                while (*reinterpret_cast<volatile uint32_t*>(ready + item.domain) == 0u) __nanosleep(64);
                __threadfence();
            }
            __syncthreads();
            for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
                g_mean[g] = __ldcg(p.stats + (item.domain * p.groups + g) * 2 + 0);
                g_aux[g] = __ldcg(p.stats + (item.domain * p.groups + g) * 2 + 1);
            }
            __syncthreads();
            float scale[8], shift[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int g = (slot * 8 + j) / cpg;
                scale[j] = g_aux[g] * gamma[j];
                shift[j] = beta[j] - g_mean[g] * scale[j];
            }
            T* ys = y + (item.domain * p.pixels + first) * C + slot * 8;
#pragma unroll
            for (int k = 0; k < VECS; ++k) {
                const int64_t px = row + (int64_t)k * p.rows;
                if (px < valid) {
                    float v[8];
                    unpack8<T>(data[k], v);
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        v[j] = v[j] * scale[j] + shift[j];
                        if (p.silu) v[j] = silu_f32(v[j]);
                    }
                    store8<T>(ys + px * C, v);
                }
            }
        }
    }
}

#define GROUP_NORM_KERNEL(NAME, T, VECS)                                                                      \
    extern "C" __global__ void __launch_bounds__(GROUP_NORM_MAX_THREADS) NAME(const __grid_constant__ GroupNormParams p) { \
        group_norm<T, VECS>(p);                                                                              \
    }
GROUP_NORM_KERNEL(group_norm_f16, __half, GROUP_NORM_VECS_16BIT)
GROUP_NORM_KERNEL(group_norm_bf16, __nv_bfloat16, GROUP_NORM_VECS_16BIT)
GROUP_NORM_KERNEL(group_norm_f32, float, GROUP_NORM_VECS_F32)
