// LoRA-delta merge: for every layer of a table, W = base + Σ_t scale_t ΔW_t (base is W itself for
// a merge in place, or a copy of W's base values when switching sets), each ΔW_t rebuilt from its
// factors (params.h, LoraTermKind), summed in fp32 and rounded once to W's dtype; base is read once
// and W written once however many terms a layer has.
//
// One block per LORA_TILE_M x LORA_TILE_N tile of one layer; a launch covers a whole table of
// layers: each warp finds its block's layer by a 32-way search over the layers' first tiles.
// The tile's fp32 sum lives in shared memory. The matrix products of the low-rank terms (a LoHa
// term has two) run on tensor cores (mma.sync m16n8k16, fp32 accumulators in registers, warps 2 x 4
// of 64 x 32 outputs): their factors stream through shared memory in rank steps of LORA_TILE_K,
// LORA_STAGES deep with cp.async, as one flat sequence of steps over all of the tile's products so
// the pipeline does not drain between terms. Ranks need not be multiples of 16: the loaders fill
// zeros past the rank and past the layer's rows and columns.
// When a product's last step is done each thread adds scale · product to its own positions of the
// sum (a LoHa's first product waits in registers for the second, then scale · p1 ⊙ p2 is added).
// The scale multiplies the fp32 product, not a factor: a factor scaled before the product would be
// rounded to f16 / bf16 once more, and a small scale times small up weights lands in f16's
// subnormals.
// Epilogue: coalesced 16-byte passes over the tile: base (read here only; its lines were prefetched
// to L2 when the tile started) + the sum + the element-wise terms (full ΔW; Kronecker products
// computed per element), rounded once and stored.
#include "common.cuh"

#define WARP_M 64
#define WARP_N 32
#define FRAG_M (WARP_M / 16)  // m16 tiles per warp
#define FRAG_N (WARP_N / 8)   // n8 tiles per warp
#define WARPS_N (LORA_TILE_N / WARP_N)
#define EPILOGUE_PASSES (LORA_TILE_M * LORA_TILE_N / 8 / LORA_THREADS)

static_assert((LORA_TILE_M / WARP_M) * WARPS_N * 32 == LORA_THREADS, "the warps cover the tile");
static_assert(LORA_TILE_K == 16, "one m16n8k16 step per rank step");
static_assert(LORA_TILE_M * LORA_TILE_K / 8 == LORA_THREADS && LORA_TILE_K * LORA_TILE_N / 8 == LORA_THREADS,
              "each thread copies one 16-byte piece of each factor tile per step");
static_assert(LORA_TILE_M * (LORA_TILE_N / 64) == LORA_THREADS, "each thread prefetches one 128-byte line of W");

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The layer whose tiles hold `tile`: the last one with first_tile <= tile. Lanes probe 32 evenly
// spaced layers and the ballot narrows the range 32-fold per round (three rounds for 32768 layers).
__device__ __forceinline__ int find_layer(const LoraLayer* layers, int count, int tile, int lane) {
    int lo = 0, len = count;  // the layer is in [lo, lo + len); layers[lo].first_tile <= tile
    while (len > 1) {
        const int step = (len + 31) / 32;
        const int probe = lo + lane * step;
        const bool at_or_before = probe < lo + len && layers[probe].first_tile <= tile;
        const int last = 31 - __clz(__ballot_sync(0xffffffffu, at_or_before));
        lo += last * step;
        len = min(step, len - last * step);
    }
    return lo;
}

// A position in the flat sequence of rank steps over a tile's products: the term (index into the
// term table), which of a LoHa term's two products, and the step's first rank index.
struct Step {
    int term;
    int pair;
    int k0;
};

template <bool HADAMARD> __device__ __forceinline__ bool has_product(int kind) {
    return kind == LORA_LOW_RANK || (HADAMARD && kind == LORA_HADAMARD);
}

// The first term at or after t that has a product (end if none).
template <bool HADAMARD> __device__ __forceinline__ int next_product_term(const LoraTerm* terms, int t, int end) {
    while (t < end && !has_product<HADAMARD>(terms[t].kind)) ++t;
    return t;
}

__device__ __forceinline__ int product_rank(const LoraTerm& term, int pair) { return pair ? term.rank2 : term.rank; }

template <bool HADAMARD> __device__ __forceinline__ Step next_step(const LoraTerm* terms, Step s, int end) {
    const LoraTerm& term = terms[s.term];
    s.k0 += LORA_TILE_K;
    if (s.k0 < product_rank(term, s.pair)) return s;
    s.k0 = 0;
    if (HADAMARD && term.kind == LORA_HADAMARD && s.pair == 0) {
        s.pair = 1;
        return s;
    }
    s.pair = 0;
    s.term = next_product_term<HADAMARD>(terms, s.term + 1, end);
    return s;
}

// Elements [col, col + 8) of row `row` of a [*, len] matrix into shared memory, zeros past len or
// for a row outside the matrix: one cp.async where the piece is whole and 16-byte aligned
// (`vec`: the base is aligned and len a multiple of 8), element by element otherwise.
template <typename T>
__device__ __forceinline__ void copy8(T* dst, const T* src, bool row_inside, int64_t row, int col, int len, bool vec) {
    if (row_inside && vec && col + 8 <= len) {
        cp_async16(dst, src + row * len + col);
    } else if (!row_inside || col >= len) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[j] = col + j < len ? src[row * len + col + j] : from_f32<T>(0.0f);
    }
}

// Rank step k0 of the product a [rows, rank] · b [rank, cols] into one pipeline stage: the a tile
// (the tile's rows, ranks k0 ..) and the b tile (ranks k0 .., the tile's columns).
template <typename T>
__device__ __forceinline__ void load_step(T* stage, const T* a, const T* b, int rank, int k0, int rows, int cols,
                                          int m0, int n0) {
    T* a_s = stage;
    T* b_s = stage + LORA_TILE_M * LORA_LDA;
    const int ar = threadIdx.x / (LORA_TILE_K / 8), ac = (threadIdx.x % (LORA_TILE_K / 8)) * 8;
    copy8(a_s + ar * LORA_LDA + ac, a, m0 + ar < rows, m0 + ar, k0 + ac, rank, aligned16(a) && rank % 8 == 0);
    const int br = threadIdx.x / (LORA_TILE_N / 8), bc = (threadIdx.x % (LORA_TILE_N / 8)) * 8;
    copy8(b_s + br * LORA_LDB + bc, b, k0 + br < rank, k0 + br, n0 + bc, cols, aligned16(b) && cols % 8 == 0);
}

template <typename T>
__device__ __forceinline__ void load_product_step(T* stage, const LoraTerm& term, const Step& s, int rows, int cols,
                                                  int m0, int n0) {
    const void* a = s.pair ? term.a2 : term.a;
    const void* b = s.pair ? term.b2 : term.b;
    load_step(stage, static_cast<const T*>(a), static_cast<const T*>(b), product_rank(term, s.pair), s.k0, rows, cols,
              m0, n0);
}

// acc += a_tile · b_tile for this warp's 64 x 32 outputs (one k16 step).
template <typename T>
__device__ __forceinline__ void mma_step(float acc[FRAG_M][FRAG_N][4], const T* stage, int wm, int wn, int lane) {
    const T* a_s = stage;
    const T* b_s = stage + LORA_TILE_M * LORA_LDA;
    uint32_t af[FRAG_M][4], bf[FRAG_N / 2][4];
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i)
        ldmatrix_x4(af[i], a_s + (wm * WARP_M + i * 16 + lane % 16) * LORA_LDA + (lane / 16) * 8);
    // b is [k][n] in shared memory: transposed loads give the column-major operand, two n8 tiles
    // per ldmatrix (registers 0, 1: tile 2 jj; 2, 3: tile 2 jj + 1).
#pragma unroll
    for (int jj = 0; jj < FRAG_N / 2; ++jj)
        ldmatrix_x4_trans(bf[jj], b_s + (lane % 16) * LORA_LDB + wn * WARP_N + jj * 16 + (lane / 16) * 8);
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
        for (int j = 0; j < FRAG_N; ++j) mma16816<T>(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
}

// This thread's accumulator elements (i, j, 2 h) and (i, j, 2 h + 1) in the fp32 sum tile.
__device__ __forceinline__ float2* sum_at(float* sum_s, int wm, int wn, int i, int j, int h, int lane) {
    return reinterpret_cast<float2*>(sum_s + (wm * WARP_M + i * 16 + lane / 4 + h * 8) * LORA_LDS + wn * WARP_N +
                                     j * 8 + (lane % 4) * 2);
}

// Adds the layer's full and Kronecker terms at W[row, col + j] (j < 8, col + j < cols) to v.
template <typename T>
__device__ __forceinline__ void add_elementwise_terms(float v[8], const LoraTerm* terms, int first, int end, int row,
                                                      int col, int cols, bool vec) {
    for (int t = first; t < end; ++t) {
        const LoraTerm& term = terms[t];
        if (term.kind == LORA_FULL) {
            const T* d = static_cast<const T*>(term.a) + (int64_t)row * cols + col;
            if (vec && aligned16(term.a)) {
                float x[8];
                unpack8<T>(load8<T>(d), x);
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = fmaf(term.scale, x[j], v[j]);
            } else {
                for (int j = 0; j < 8 && col + j < cols; ++j) v[j] = fmaf(term.scale, to_f32(d[j]), v[j]);
            }
        } else if (term.kind == LORA_KRONECKER) {
            // row = i·c + k; column = y·in + jj·d + l; ΔW = a[i, jj] · b[k, l, y]. The product of
            // two 16-bit values is exact in fp32.
            const T* a = static_cast<const T*>(term.a);
            const T* b = static_cast<const T*>(term.b);
            const int c = term.kron_c, d = term.kron_d, kernel = term.kron_kernel, in = term.kron_b * term.kron_d;
            const int i = row / c, k = row - i * c;
            for (int j = 0; j < 8 && col + j < cols; ++j) {
                const int n = col + j, y = n / in, rem = n - y * in, jj = rem / d, l = rem - jj * d;
                const float p = to_f32(a[(int64_t)i * term.kron_b + jj]) * to_f32(b[((int64_t)k * d + l) * kernel + y]);
                v[j] = fmaf(term.scale, p, v[j]);
            }
        }
    }
}

template <typename T, bool HADAMARD> __device__ void lora_merge(const LoraMergeParams& p) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* sum_s = reinterpret_cast<float*>(smem);  // [LORA_TILE_M][LORA_LDS]
    T* stages = reinterpret_cast<T*>(smem + LORA_SUM_BYTES);
    constexpr int STAGE_ELEMS = LORA_STAGE_BYTES / 2;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;

    // 1. the block's layer and tile; W's lines prefetched to L2 for the epilogue
    const int tile = blockIdx.x;
    const LoraLayer& layer = p.layers[find_layer(p.layers, p.layer_count, tile, lane)];
    const int rows = layer.rows, cols = layer.cols;
    const int local = tile - layer.first_tile;
    const int m0 = (local / layer.col_tiles) * LORA_TILE_M, n0 = (local % layer.col_tiles) * LORA_TILE_N;
    T* w = static_cast<T*>(layer.w);
    const T* base = static_cast<const T*>(layer.base);
    {
        const int r = threadIdx.x / (LORA_TILE_N / 64), c = n0 + (threadIdx.x % (LORA_TILE_N / 64)) * 64;
        if (m0 + r < rows && c < cols) asm volatile("prefetch.global.L2 [%0];" ::"l"(base + (int64_t)(m0 + r) * cols + c));
    }
    const LoraTerm* terms = p.terms;
    const int first = layer.first_term, end = first + layer.term_count;

    // 2. zero this thread's positions of the sum (its own until the epilogue's barrier)
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
        for (int j = 0; j < FRAG_N; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) *sum_at(sum_s, wm, wn, i, j, h, lane) = make_float2(0.0f, 0.0f);

    // 3. the products, one pipelined sequence of rank steps over all of them
    float prod[FRAG_M][FRAG_N][4];
    float first_product[HADAMARD ? FRAG_M : 1][HADAMARD ? FRAG_N : 1][4];  // a LoHa term's a · b
    (void)first_product;
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
        for (int j = 0; j < FRAG_N; ++j) prod[i][j][0] = prod[i][j][1] = prod[i][j][2] = prod[i][j][3] = 0.0f;
    Step load = {next_product_term<HADAMARD>(terms, first, end), 0, 0};
    Step compute = load;
#pragma unroll
    for (int s = 0; s < LORA_STAGES - 1; ++s) {
        if (load.term < end) {
            load_product_step<T>(stages + s * STAGE_ELEMS, terms[load.term], load, rows, cols, m0, n0);
            load = next_step<HADAMARD>(terms, load, end);
        }
        cp_async_commit();
    }
    for (int step = 0; compute.term < end; ++step) {
        cp_async_wait<LORA_STAGES - 2>();
        __syncthreads();  // this step's stage is in; every warp is done with the stage refilled next
        if (load.term < end) {
            const int refill = (step + LORA_STAGES - 1) % LORA_STAGES;
            load_product_step<T>(stages + refill * STAGE_ELEMS, terms[load.term], load, rows, cols, m0, n0);
            load = next_step<HADAMARD>(terms, load, end);
        }
        cp_async_commit();
        mma_step<T>(prod, stages + (step % LORA_STAGES) * STAGE_ELEMS, wm, wn, lane);

        const LoraTerm& term = terms[compute.term];
        if (compute.k0 + LORA_TILE_K >= product_rank(term, compute.pair)) {
            // the product is complete: add it to the sum, or keep it for its LoHa partner
            const bool keep = HADAMARD && term.kind == LORA_HADAMARD && compute.pair == 0;
            const bool hadamard = HADAMARD && term.kind == LORA_HADAMARD && compute.pair == 1;
#pragma unroll
            for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
                for (int j = 0; j < FRAG_N; ++j) {
                    if constexpr (HADAMARD) {
                        if (keep) {
#pragma unroll
                            for (int e = 0; e < 4; ++e) first_product[i][j][e] = prod[i][j][e];
                        } else if (hadamard) {
#pragma unroll
                            for (int e = 0; e < 4; ++e) prod[i][j][e] *= first_product[i][j][e];
                        }
                    }
                    if (!keep) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            float2* s = sum_at(sum_s, wm, wn, i, j, h, lane);
                            float2 v = *s;
                            v.x = fmaf(term.scale, prod[i][j][2 * h], v.x);
                            v.y = fmaf(term.scale, prod[i][j][2 * h + 1], v.y);
                            *s = v;
                        }
                    }
                    prod[i][j][0] = prod[i][j][1] = prod[i][j][2] = prod[i][j][3] = 0.0f;
                }
        }
        compute = next_step<HADAMARD>(terms, compute, end);
    }
    cp_async_wait<0>();
    __syncthreads();

    // 4. W + sum + element-wise terms, rounded once: 16-byte pieces, a warp covers two tile rows.
    //    Every W load is issued before the first store.
    const bool vec = cols % 8 == 0 && aligned16(w) && aligned16(base);
    Vec8<T> wv[EPILOGUE_PASSES];
#pragma unroll
    for (int pass = 0; pass < EPILOGUE_PASSES; ++pass) {
        const int piece = threadIdx.x + pass * LORA_THREADS;
        const int r = piece / (LORA_TILE_N / 8), c = (piece % (LORA_TILE_N / 8)) * 8;
        if (vec && m0 + r < rows && n0 + c < cols) wv[pass] = load8<T>(base + (int64_t)(m0 + r) * cols + n0 + c);
    }
#pragma unroll
    for (int pass = 0; pass < EPILOGUE_PASSES; ++pass) {
        const int piece = threadIdx.x + pass * LORA_THREADS;
        const int r = piece / (LORA_TILE_N / 8), c = (piece % (LORA_TILE_N / 8)) * 8;
        const int row = m0 + r, col = n0 + c;
        if (row >= rows || col >= cols) continue;
        const float4 s0 = *reinterpret_cast<const float4*>(sum_s + r * LORA_LDS + c);
        const float4 s1 = *reinterpret_cast<const float4*>(sum_s + r * LORA_LDS + c + 4);
        float v[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
        add_elementwise_terms<T>(v, terms, first, end, row, col, cols, vec);
        T* out = w + (int64_t)row * cols + col;
        if (vec) {
            float x[8];
            unpack8<T>(wv[pass], x);
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] += x[j];
            store8<T>(out, v);
        } else {
            const T* in = base + (int64_t)row * cols + col;
            for (int j = 0; j < 8 && col + j < cols; ++j) out[j] = from_f32<T>(to_f32(in[j]) + v[j]);
        }
    }
}

// Two blocks per multiprocessor where shared memory allows (sm_90: 2 x 99 KiB of 228), so one
// block's epilogue and prologue overlap the other's products. These skip LoHa terms: the host
// sends layers with one to the lora_merge_hadamard_* kernels, which keep a product in registers
// (one block per multiprocessor).
extern "C" __global__ void __launch_bounds__(LORA_THREADS, 2) lora_merge_f16(const __grid_constant__ LoraMergeParams p) {
    lora_merge<__half, false>(p);
}
extern "C" __global__ void __launch_bounds__(LORA_THREADS, 2) lora_merge_bf16(const __grid_constant__ LoraMergeParams p) {
    lora_merge<__nv_bfloat16, false>(p);
}
extern "C" __global__ void __launch_bounds__(LORA_THREADS, 1)
    lora_merge_hadamard_f16(const __grid_constant__ LoraMergeParams p) {
    lora_merge<__half, true>(p);
}
extern "C" __global__ void __launch_bounds__(LORA_THREADS, 1)
    lora_merge_hadamard_bf16(const __grid_constant__ LoraMergeParams p) {
    lora_merge<__nv_bfloat16, true>(p);
}
