// Hopper (sm_90a) building blocks shared by the warp-specialised kernels: shared-memory matrix
// descriptors and the wgmma group fences, mbarriers (PTX ISA "mbarrier": phase parity, transaction
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
