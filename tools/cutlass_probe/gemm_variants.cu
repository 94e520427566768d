// Measurement probe, not part of the crate: CUTLASS 4.2 sm90 GEMMs (D = A B^T, f16 in, f32
// accumulate, f16 out) from the collective builders in several tile / cluster / schedule forms, to
// see which runs at cuBLAS's pace (benches/RESULTS.md, thirteenth session). Built by build.sh on the
// build machine, linked and timed beside torch.mm by run.sh on the GPU machine.
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>
using namespace cute;
using Elem = cutlass::half_t;
using RowMajor = cutlass::layout::RowMajor;
using ColMajor = cutlass::layout::ColumnMajor;

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule>
struct Probe {
    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, Elem, RowMajor, 8, Elem, RowMajor, 8,
        EpilogueSchedule>::CollectiveOp;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Elem, RowMajor, 8, Elem, ColMajor, 8, float, TileShape,
        ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        KernelSchedule>::CollectiveOp;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<
        cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>>;

    // 0 on success; 1-4: cannot implement, initialise, run, or a workspace over 1 MiB.
    static int run(int m, int n, int k, const Elem* a, const Elem* b, Elem* d, void* workspace, cudaStream_t stream) {
        using K = typename Gemm::GemmKernel;
        auto sa = cutlass::make_cute_packed_stride(typename K::StrideA{}, make_shape(m, k, 1));
        auto sb = cutlass::make_cute_packed_stride(typename K::StrideB{}, make_shape(n, k, 1));
        auto sd = cutlass::make_cute_packed_stride(typename K::StrideD{}, make_shape(m, n, 1));
        typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k, 1}, {a, sa, b, sb},
                                      {{1.0f, 0.0f}, d, sd, d, sd}};
        Gemm gemm;
        if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
        if (Gemm::get_workspace_size(args) > (1 << 20)) return 4;
        if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 2;
        return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 3;
    }
};
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpilogue = cutlass::epilogue::TmaWarpSpecialized;
#define PROBE(NAME, ...)                                                                                        \
    extern "C" int NAME(int m, int n, int k, const Elem* a, const Elem* b, Elem* d, void* ws, cudaStream_t s) { \
        return Probe<__VA_ARGS__>::run(m, n, k, a, b, d, ws, s);                                                \
    }
PROBE(coop_128x256_c2x1, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Coop, CoopEpilogue)
PROBE(coop_256x128_c2x1, Shape<_256, _128, _64>, Shape<_2, _1, _1>, Coop, CoopEpilogue)
PROBE(coop_256x128_c1x2, Shape<_256, _128, _64>, Shape<_1, _2, _1>, Coop, CoopEpilogue)
PROBE(ping_128x128_c2x1, Shape<_128, _128, _64>, Shape<_2, _1, _1>, Pingpong, PingpongEpilogue)
PROBE(ping_128x128_c1x2, Shape<_128, _128, _64>, Shape<_1, _2, _1>, Pingpong, PingpongEpilogue)
PROBE(ping_64x256_c1x1, Shape<_64, _256, _64>, Shape<_1, _1, _1>, Pingpong, PingpongEpilogue)
