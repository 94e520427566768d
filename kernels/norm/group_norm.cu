// Group norm (+ optional SiLU) over NHWC activations, one persistent kernel.
//
// Layout of the work: a domain (one image, or the frames of one video) is cut into chunks of
// `rows * VECS` pixels; a chunk is contiguous in memory. It is copied into shared memory with
// cp.async and read from there by both passes; thread (row, slot) handles channels
// [8 slot, 8 slot + 8) of pixels row + k * rows, k < VECS (GROUP_NORM_VECS_*). Keeping the data
// out of registers lets more blocks share a multiprocessor: the kernel is limited by instruction
// issue as much as by memory, so per-element work is kept small (group lookups and shifts come
// from shared tables, the item is decoded once per block).
//
// Statistics of a chunk: per group, the sums of (x - shift) and (x - shift)^2 over the chunk
// (fp32, data in registers), added with fp64 atomics into the domain's accumulators; then the
// domain's arrival counter is bumped. A domain is ready when all its chunks have arrived: mean and
// variance follow from the fp64 sums, and the shift (the group's first value in the domain, which
// every block reads for itself) keeps the cancellation in E[x^2] - mean^2 small.
// Normalisation: wait until the domain is ready, write (x - mean) * rstd * gamma + beta (+ SiLU),
// and x itself to x_cat when asked (the input may be a concatenation [x, x_tail] on the channels,
// read from its two parts: each thread copies its own channels, which lie in one of them).
//
// Statistics and normalisation are separate items; the order makes domain d's normalisation run
// `lag` domains after its statistics, so its second read mostly hits L2. A normalise item only
// waits for statistics items holding smaller tickets, taken by blocks already running, so the wait
// always ends whatever the residency.
//
// Dynamic shared memory, in order: the chunk (rows * VECS * channels elements), the block
// reduction buffer (rows * channels * 2 floats), the channel -> group table (channels bytes).
#include "common.cuh"

#define GROUP_NORM_MAX_THREADS 512
#define GROUP_NORM_MAX_GROUPS 128

struct GroupNormItem {
    bool statistics;
    bool normalise;
    int64_t domain;
    int64_t chunk;
};

__device__ __forceinline__ GroupNormItem decode_item(const GroupNormParams& p, int64_t t) {
    const int64_t K = p.chunks, L = p.lag, D = p.domains;
    if (t < L * K) return {true, false, t / K, t % K};
    t -= L * K;
    if (t < (D - L) * 2 * K) {
        const int64_t round = t / (2 * K), w = t % (2 * K);
        return w < K ? GroupNormItem{true, false, L + round, w} : GroupNormItem{false, true, round, w - K};
    }
    t -= (D - L) * 2 * K;
    return {false, true, D - L + t / K, t % K};
}

template <typename T, int VECS>
__device__ void group_norm(const GroupNormParams& p) {
    // Dynamic shared memory: the chunk, the block reduction buffer, the channel -> group table.
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ float g_shift[GROUP_NORM_MAX_GROUPS], g_scale[GROUP_NORM_MAX_GROUPS], g_mean[GROUP_NORM_MAX_GROUPS];
    __shared__ GroupNormItem s_item;
    __shared__ bool s_done;

    const int C = p.channels, V = C / 8, cpg = C / p.groups;
    const int row = threadIdx.x / V, slot = threadIdx.x % V;
    const int chunk_pixels = p.rows * VECS;
    T* chunk = reinterpret_cast<T*>(smem);
    float* red = reinterpret_cast<float*>(smem + (size_t)chunk_pixels * C * sizeof(T));  // [rows][C][2]
    unsigned char* group_of = reinterpret_cast<unsigned char*>(red + p.rows * C * 2);   // [C]
    T* y = static_cast<T*>(p.y);
    // Control words each sit on their own 128-byte line so pollers do not slow the atomics.
    uint32_t* ticket_counter = p.workspace;
    uint32_t* arrivals = p.workspace + GROUP_NORM_CONTROL_STRIDE;
    double* sums = reinterpret_cast<double*>(reinterpret_cast<char*>(p.workspace) + GROUP_NORM_SUMS_OFFSET(p.domains));
    const int64_t total = 2 * p.domains * p.chunks;
    for (int c = threadIdx.x; c < C; c += blockDim.x) group_of[c] = (unsigned char)(c / cpg);

    while (true) {
        // Taking the next ticket only now (not while the previous item ran) measured faster: a
        // block holding two tickets widens the window of normalise items that must wait.
        if (threadIdx.x == 0) {
            const int64_t ticket = atomicAdd(ticket_counter, 1u);
            s_done = ticket >= total;
            if (!s_done) s_item = decode_item(p, ticket);
        }
        __syncthreads();
        if (s_done) break;
        const GroupNormItem item = s_item;
        const int64_t first = item.chunk * chunk_pixels;
        const int valid = (int)min((int64_t)chunk_pixels, p.pixels - first);
        // x_bias: every value of channel c counts as x + bias[c], the domain's row of x_bias (the
        // thread's channels are fixed)
        const T* x_bias = p.x_bias ? static_cast<const T*>(p.x_bias) + item.domain / p.x_bias_every * C : nullptr;
        float bias[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (x_bias) unpack8<T>(load8<T>(x_bias + slot * 8), bias);

        // 1. the chunk into shared memory; each group's shift is its first value in the domain
        // (blockDim.x is rows * V: every piece of the chunk has its thread)
        const ConcatPiece<T> piece = concat_piece<T>(p, item.domain * p.pixels + first + row, slot * 8);
#pragma unroll
        for (int k = 0; k < VECS; ++k) {
            if (row + k * p.rows < valid) {
                const T* src = piece.at + (int64_t)k * p.rows * piece.pixel_step;
                T* dst = chunk + (row + k * p.rows) * C + slot * 8;
                constexpr int per16 = 16 / sizeof(T);  // elements a 16-byte copy moves
#pragma unroll
                for (int e = 0; e < 8; e += per16) cp_async16(dst + e, src + e);
            }
        }
        cp_async_commit();
        for (int g = threadIdx.x; g < p.groups; g += blockDim.x)
            g_shift[g] = to_f32(*concat_piece<T>(p, item.domain * p.pixels, g * cpg).at) +
                         (x_bias ? to_f32(x_bias[g * cpg]) : 0.0f);
        cp_async_wait<0>();
        __syncthreads();
        float shift[8];  // of the stored x: the group's shift less the channel's bias
#pragma unroll
        for (int j = 0; j < 8; ++j) shift[j] = g_shift[group_of[slot * 8 + j]] - bias[j];

        // 2. statistics: per-group sums of (x - shift) and (x - shift)^2 into the domain's totals
        if (item.statistics) {
            float s1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
            for (int k = 0; k < VECS; ++k) {
                const int px = row + k * p.rows;
                if (px < valid) {
                    float v[8];
                    unpack8<T>(load8<T>(chunk + px * C + slot * 8), v);
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const float d = v[j] - shift[j];
                        s1[j] += d;
                        s2[j] = fmaf(d, d, s2[j]);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                red[(row * C + slot * 8 + j) * 2 + 0] = s1[j];
                red[(row * C + slot * 8 + j) * 2 + 1] = s2[j];
            }
            __syncthreads();
            // Rows fold into row 0, then each group's channels into one pair of fp64 atomics.
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                float a = red[c * 2 + 0], b = red[c * 2 + 1];
                for (int r = 1; r < p.rows; ++r) {
                    a += red[(r * C + c) * 2 + 0];
                    b += red[(r * C + c) * 2 + 1];
                }
                red[c * 2 + 0] = a;
                red[c * 2 + 1] = b;
            }
            __syncthreads();
            double* dsums = sums + item.domain * p.groups * 2;
            for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
                float a = 0.0f, b = 0.0f;
                for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
                    a += red[c * 2 + 0];
                    b += red[c * 2 + 1];
                }
                atomicAdd(dsums + g * 2 + 0, (double)a);
                atomicAdd(dsums + g * 2 + 1, (double)b);
                __threadfence();  // the sums are visible before the arrival below
            }
            __syncthreads();
            if (threadIdx.x == 0) atomicAdd(arrivals + item.domain * GROUP_NORM_CONTROL_STRIDE, 1u);
        }

        // 3. normalisation, once every chunk of the domain has added its sums
        if (item.normalise) {
            if (threadIdx.x == 0) {
                unsigned sleep = 32;
                const volatile uint32_t* arrived = arrivals + item.domain * GROUP_NORM_CONTROL_STRIDE;
                while (*arrived < (uint32_t)p.chunks) {
                    __nanosleep(sleep);
                    sleep = min(sleep * 2, 512u);
                }
                __threadfence();
            }
            __syncthreads();
            const double n = (double)p.pixels * cpg;
            for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
                const double a = __ldcg(sums + (item.domain * p.groups + g) * 2 + 0) / n;
                const double b = __ldcg(sums + (item.domain * p.groups + g) * 2 + 1) / n;
                g_mean[g] = g_shift[g] + (float)a;
                g_scale[g] = (float)(1.0 / sqrt(fmax(b - a * a, 0.0) + (double)p.eps));
            }
            __syncthreads();
            float scale[8], offset[8];
            unpack8<T>(load8<T>(static_cast<const T*>(p.gamma) + slot * 8), scale);
            unpack8<T>(load8<T>(static_cast<const T*>(p.beta) + slot * 8), offset);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int g = group_of[slot * 8 + j];
                scale[j] *= g_scale[g];
                offset[j] = fmaf(bias[j] - g_mean[g], scale[j], offset[j]);
            }
            const int64_t at = (item.domain * p.pixels + first) * C + slot * 8;
            T* ys = y + at;
            T* raws = p.x_cat ? static_cast<T*>(p.x_cat) + at : nullptr;
#pragma unroll
            for (int k = 0; k < VECS; ++k) {
                const int px = row + k * p.rows;
                if (px < valid) {
                    float v[8];
                    const Vec8<T> raw = load8<T>(chunk + px * C + slot * 8);
                    if (raws) store8<T>(raws + (int64_t)px * C, raw);
                    unpack8<T>(raw, v);
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        v[j] = fmaf(v[j], scale[j], offset[j]);
                        if (p.silu) v[j] = silu_f32(v[j]);
                    }
                    store8<T>(ys + (int64_t)px * C, v);
                }
            }
        }
        __syncthreads();  // the chunk buffer and tables are reused by the next item
    }
}

#define GROUP_NORM_KERNEL(NAME, T, VECS)                                                       \
    extern "C" __global__ void __launch_bounds__(GROUP_NORM_MAX_THREADS)                       \
        NAME(const __grid_constant__ GroupNormParams p) {                                     \
        group_norm<T, VECS>(p);                                                                \
    }
GROUP_NORM_KERNEL(group_norm_f16, __half, GROUP_NORM_VECS_16BIT)
GROUP_NORM_KERNEL(group_norm_bf16, __nv_bfloat16, GROUP_NORM_VECS_16BIT)
GROUP_NORM_KERNEL(group_norm_f32, float, GROUP_NORM_VECS_F32)
