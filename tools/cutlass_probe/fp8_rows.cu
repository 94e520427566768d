// Measurement probe, not part of the crate: CUTLASS 4.2 sm90 FP8 GEMMs, e4m3 x e4m3 with fp32
// accumulation ("fast": no periodic promotion), D[m, n] = half(x_scale[m] * w_scale[n] * acc),
// the per-token and per-output-channel scales of celframe's FP8 linears (src/ops/fp8.rs) applied
// in an epilogue visitor tree. A fallback should this machine's cuBLASLt keep refusing FP8 GEMMs
// (benches/RESULTS.md, sixteenth session): timed beside torch._scaled_mm and torch.mm in f16 by
// probe.py. Built by build.sh on the build machine, linked by run.sh on the GPU machine.
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>
using namespace cute;
using E4m3 = cutlass::float_e4m3_t;
using Half = cutlass::half_t;
using RowMajor = cutlass::layout::RowMajor;
using ColMajor = cutlass::layout::ColumnMajor;
namespace fusion = cutlass::epilogue::fusion;

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule>
struct Fp8Rows {
    static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;
    // x_scale[m] * (w_scale[n] * acc), rounded once to half.
    using XScale = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>;
    using WScale = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
    using Scaled = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, Round>, WScale,
                                   fusion::Sm90AccFetch>;
    using Output = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, Half, float, Round>, XScale, Scaled>;

    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, RowMajor, 8, Half, RowMajor, 8,
        EpilogueSchedule, Output>::CollectiveOp;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E4m3, RowMajor, 16, E4m3, ColMajor, 16, float, TileShape,
        ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        KernelSchedule>::CollectiveOp;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<
        cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>>;

    // 0 on success; 1-4: cannot implement, initialise, run, or a workspace over 1 MiB.
    static int run(int m, int n, int k, const E4m3* x, const E4m3* w, const float* x_scale, const float* w_scale,
                   Half* d, void* workspace, cudaStream_t stream) {
        using K = typename Gemm::GemmKernel;
        auto sa = cutlass::make_cute_packed_stride(typename K::StrideA{}, make_shape(m, k, 1));
        auto sb = cutlass::make_cute_packed_stride(typename K::StrideB{}, make_shape(n, k, 1));
        auto sc = cutlass::make_cute_packed_stride(typename K::StrideC{}, make_shape(m, n, 1));
        auto sd = cutlass::make_cute_packed_stride(typename K::StrideD{}, make_shape(m, n, 1));
        typename Output::Arguments scales{{x_scale, 0.0f, {}}, {{w_scale, 0.0f, {}}, {}, {}}, {}};
        typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k, 1}, {x, sa, w, sb},
                                      {scales, nullptr, sc, d, sd}};
        Gemm gemm;
        if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
        if (Gemm::get_workspace_size(args) > (1 << 20)) return 4;
        if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 2;
        return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 3;
    }
};
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using CoopEpilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using PingpongEpilogue = cutlass::epilogue::TmaWarpSpecialized;
#define PROBE(NAME, ...)                                                                                    \
    extern "C" int NAME(int m, int n, int k, const E4m3* x, const E4m3* w, const float* xs, const float* ws, \
                        Half* d, void* workspace, cudaStream_t s) {                                          \
        return Fp8Rows<__VA_ARGS__>::run(m, n, k, x, w, xs, ws, d, workspace, s);                            \
    }
PROBE(fp8_coop_128x256_c2x1, Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, CoopEpilogue)
PROBE(fp8_ping_128x128_c2x1, Shape<_128, _128, _128>, Shape<_2, _1, _1>, Pingpong, PingpongEpilogue)
PROBE(fp8_ping_128x128_c1x2, Shape<_128, _128, _128>, Shape<_1, _2, _1>, Pingpong, PingpongEpilogue)
