// Hopper (sm_90a) building blocks shared by the warp-specialised kernels: shared-memory matrix
// descriptors, wgmma with both operands in shared memory and its group fences, mbarriers (PTX ISA "mbarrier": phase parity, transaction
// counts), named barriers and the entry guard that compiles a kernel body for sm_90a only. Included
// by kernels after common.cuh; everything but the entry macro exists only on sm_90a.
#pragma once

#define SM90_WAIT_TIMEOUT_NS 2000000000ull  // an mbarrier wait this long is a protocol bug: trap rather than hang

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
// Waits until at most N committed wgmma groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Makes this thread's shared-memory writes (cp.async included) visible to the async proxy wgmma
// reads through.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// One arrival that also tells the barrier to expect `bytes` more of asynchronous copies.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return done != 0;
}

// Waits for the phase of parity `parity` to complete; traps after SM90_WAIT_TIMEOUT_NS of spinning.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    if (mbar_try_wait(bar, parity)) return;
    const uint64_t start = global_timer_ns();
    while (!mbar_try_wait(bar, parity))
        if (global_timer_ns() - start > SM90_WAIT_TIMEOUT_NS) asm volatile("trap;");
}

// Named barrier `id` (1-15; 0 is __syncthreads) over `threads` threads, a multiple of 32: bar.sync
// counts this warp and waits for the phase to complete, bar.arrive only counts it.
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// m64nNk16 wgmma with both operands K-major shared-memory descriptors of 128-byte swizzled tiles
// (f16 or bf16 in, fp32 accumulators: N / 2 registers a thread). The accumulator operand lists, each
// with constraint M, and the instruction with its register list REGS and the predicate operand PRED.
#define SM90_D64(M) M(d[0]), M(d[1]), M(d[2]), M(d[3]), M(d[4]), M(d[5]), M(d[6]), M(d[7]), M(d[8]), M(d[9]), M(d[10]), M(d[11]), M(d[12]), M(d[13]), M(d[14]), M(d[15]), M(d[16]), M(d[17]), M(d[18]), M(d[19]), M(d[20]), M(d[21]), M(d[22]), M(d[23]), M(d[24]), M(d[25]), M(d[26]), M(d[27]), M(d[28]), M(d[29]), M(d[30]), M(d[31]), M(d[32]), M(d[33]), M(d[34]), M(d[35]), M(d[36]), M(d[37]), M(d[38]), M(d[39]), M(d[40]), M(d[41]), M(d[42]), M(d[43]), M(d[44]), M(d[45]), M(d[46]), M(d[47]), M(d[48]), M(d[49]), M(d[50]), M(d[51]), M(d[52]), M(d[53]), M(d[54]), M(d[55]), M(d[56]), M(d[57]), M(d[58]), M(d[59]), M(d[60]), M(d[61]), M(d[62]), M(d[63])
#define SM90_D128(M) SM90_D64(M), M(d[64]), M(d[65]), M(d[66]), M(d[67]), M(d[68]), M(d[69]), M(d[70]), M(d[71]), M(d[72]), M(d[73]), M(d[74]), M(d[75]), M(d[76]), M(d[77]), M(d[78]), M(d[79]), M(d[80]), M(d[81]), M(d[82]), M(d[83]), M(d[84]), M(d[85]), M(d[86]), M(d[87]), M(d[88]), M(d[89]), M(d[90]), M(d[91]), M(d[92]), M(d[93]), M(d[94]), M(d[95]), M(d[96]), M(d[97]), M(d[98]), M(d[99]), M(d[100]), M(d[101]), M(d[102]), M(d[103]), M(d[104]), M(d[105]), M(d[106]), M(d[107]), M(d[108]), M(d[109]), M(d[110]), M(d[111]), M(d[112]), M(d[113]), M(d[114]), M(d[115]), M(d[116]), M(d[117]), M(d[118]), M(d[119]), M(d[120]), M(d[121]), M(d[122]), M(d[123]), M(d[124]), M(d[125]), M(d[126]), M(d[127])
#define SM90_WGMMA_SS(SHAPE, TY, REGS, A, B, PRED, OPERANDS, ACC)                                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                                   \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " REGS ", " A ", " B ", p, 1, 1, 0, 0;\n}\n" \
                 : OPERANDS                                                                         \
                 : "l"(a), "l"(b), "r"(ACC))
#define SM90_WGMMA_N128(TY, M, ACC) \
    SM90_WGMMA_SS("m64n128k16", TY, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}", "%64", "%65", "%66", SM90_D64(M), ACC)
#define SM90_WGMMA_N256(TY, M, ACC) \
    SM90_WGMMA_SS("m64n256k16", TY, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}", "%128", "%129", "%130", SM90_D128(M), ACC)

// d (64 x 128) = A (64 x 16) B (16 x 128), or += when `accumulate` (a run-time choice).
template <typename T>
__device__ __forceinline__ void wgmma_m64n128(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    if constexpr (std::is_same<T, __half>::value) SM90_WGMMA_N128("f16", "+f", accumulate);
    else SM90_WGMMA_N128("bf16", "+f", accumulate);
}

// d (64 x 128) = A B with d a write-only operand: its registers are not inputs, so writes to them
// before the issue (say while another wgmma group is in flight) do not make ptxas serialise the
// wgmma pipeline (its C7513 note).
template <typename T>
__device__ __forceinline__ void wgmma_m64n128_first(float (&d)[64], uint64_t a, uint64_t b) {
    if constexpr (std::is_same<T, __half>::value) SM90_WGMMA_N128("f16", "=f", 0);
    else SM90_WGMMA_N128("bf16", "=f", 0);
}

// d (64 x 256) = A (64 x 16) B (16 x 256), or += when `accumulate`.
template <typename T>
__device__ __forceinline__ void wgmma_m64n256(float (&d)[128], uint64_t a, uint64_t b, int accumulate) {
    if constexpr (std::is_same<T, __half>::value) SM90_WGMMA_N256("f16", "+f", accumulate);
    else SM90_WGMMA_N256("bf16", "+f", accumulate);
}

#endif

// Entries launched only on devices of compute capability 9.0: each runs BODY<template arguments>(p)
// on sm_90a and holds a trap on the other targets, since wgmma exists only there (the macro is
// variadic: the template arguments may hold a comma). One block per multiprocessor.
#define SM90_ENTRY(NAME, THREADS, PARAMS, BODY, ...)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const __grid_constant__ PARAMS p) { \
        SM90_ONLY(BODY<__VA_ARGS__>(p));                                                              \
    }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SM90_ONLY(...) __VA_ARGS__
#else
#define SM90_ONLY(...) __trap()
#endif
