// Measurement probe, not part of the crate: the GEGLU projection as one CUTLASS 4.2 sm90 GEMM with
// an epilogue of our own (benches/RESULTS.md, thirteenth session). The weight and bias rows are
// interleaved by 8 (row 16 b + i = value 8 b + i, row 16 b + 8 + i = its gate), so in the wgmma
// accumulator layout (element i = column pair x row half + 4 x column group) element i of an even
// column group and element i + 4 hold a value and its gate: the epilogue writes
// y[m, 8 b + i] = (v + bv) * gelu(g + bg) straight from registers, an output half as wide as N.
// Two mainloops: cooperative 128 x 256 and ping-pong 128 x 128, both with 2 x 1 clusters.
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/default_epilogue.hpp>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "common.cuh"  // gelu_f32, the crate's GELU

using namespace cute;
using Elem = cutlass::half_t;
using RowMajor = cutlass::layout::RowMajor;
using ColMajor = cutlass::layout::ColumnMajor;
using StrideCD = cute::Stride<int64_t, cute::Int<1>, int64_t>;
using Base = cutlass::epilogue::collective::DefaultEpilogue<
    Elem, StrideCD, StrideCD, cutlass::epilogue::thread::LinearCombination<Elem, 1, float, float>,
    cutlass::gemm::EpilogueDefault>;

// The DefaultEpilogue interface with its operator() replaced: ptr_C is the interleaved bias [N] (or
// null), ptr_D is y [M, N / 2] with dD's first mode as its row stride.
struct GegluEpilogue : Base {
    Params args;
    CUTLASS_HOST_DEVICE GegluEpilogue(Params const& p, SharedStorage const& s = SharedStorage()) : Base(p, s), args(p) {}
    template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
              class TiledMma, class ResidueMNK>
    CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem, BlockShapeMNK blk_shape, BlockCoordMNKL blk_coord,
                                   cute::Tensor<FrgEngine, FrgLayout> const& acc, TiledMma tiled_mma, ResidueMNK,
                                   int thread_idx, char*) {
        const int M = get<0>(problem), N = get<1>(problem);
        Tensor coords = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape),
                                   make_coord(get<0>(blk_coord), get<1>(blk_coord)));
        Tensor thread_coords = tiled_mma.get_thread_slice(thread_idx).partition_C(coords);
        const __half* bias = reinterpret_cast<const __half*>(args.ptr_C);
        __half* y = reinterpret_cast<__half*>(args.ptr_D);
        const int64_t ldy = get<0>(args.dD);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(acc); i += 8) {
            CUTLASS_PRAGMA_UNROLL
            for (int h = 0; h < 2; ++h) {
                const int e = i + 2 * h;
                const int m = get<0>(thread_coords(e)), n = get<1>(thread_coords(e));
                float2 bv = make_float2(0.0f, 0.0f), bg = bv;
                if (bias) {
                    bv = __half22float2(*reinterpret_cast<const __half2*>(bias + n));
                    bg = __half22float2(*reinterpret_cast<const __half2*>(bias + n + 8));
                }
                if (m < M && n < N)
                    *reinterpret_cast<__half2*>(y + m * ldy + (n / 16) * 8 + n % 8) = __floats2half2_rn(
                        (acc(e) + bv.x) * gelu_f32(acc(e + 4) + bg.x), (acc(e + 1) + bv.y) * gelu_f32(acc(e + 5) + bg.y));
            }
        }
    }
};

template <class TileShape, class KernelSchedule>
struct GegluProbe {
    using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<GegluEpilogue>;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Elem, RowMajor, 8, Elem, ColMajor, 8, float, TileShape,
        Shape<_2, _1, _1>, cutlass::gemm::collective::StageCountAutoCarveout<0>, KernelSchedule>::CollectiveOp;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<
        cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>>;

    // y [m, n / 2] = GEGLU(A B^T + bias), B and bias interleaved by 8; 0 on success.
    static int run(int m, int n, int k, const Elem* a, const Elem* b, const Elem* bias, Elem* y, void* workspace,
                   cudaStream_t stream) {
        using K = typename Gemm::GemmKernel;
        auto sa = cutlass::make_cute_packed_stride(typename K::StrideA{}, make_shape(m, k, 1));
        auto sb = cutlass::make_cute_packed_stride(typename K::StrideB{}, make_shape(n, k, 1));
        StrideCD sy{int64_t(n / 2), Int<1>{}, int64_t(0)};
        typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k, 1}, {a, sa, b, sb},
                                      {{}, bias, sy, y, sy}};
        Gemm gemm;
        if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
        if (Gemm::get_workspace_size(args) > (1 << 20)) return 4;
        if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 2;
        return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 3;
    }
};
#define GEGLU_PROBE(NAME, ...)                                                                                 \
    extern "C" int NAME(int m, int n, int k, const Elem* a, const Elem* b, const Elem* bias, Elem* y, void* ws, \
                        cudaStream_t s) {                                                                      \
        return GegluProbe<__VA_ARGS__>::run(m, n, k, a, b, bias, y, ws, s);                                    \
    }
GEGLU_PROBE(geglu_coop_128x256, Shape<_128, _256, _64>, cutlass::gemm::KernelTmaWarpSpecializedCooperative)
GEGLU_PROBE(geglu_ping_128x128, Shape<_128, _128, _64>, cutlass::gemm::KernelTmaWarpSpecializedPingpong)
