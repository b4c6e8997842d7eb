// The CUDA device language as plain C++, so that kernels/*.cu compile with
// g++ and run on the CPU under the emulated driver (driver.cpp). It is
// force-included in front of each kernel file. Every thread of a block runs
// as a fiber (threads.cpp); __syncthreads and the warp collectives are the
// points where a fiber yields, so a block's threads interleave exactly where
// the CUDA memory model lets them. __shared__ variables are per OS thread
// (a block never leaves the OS thread that runs it), and undefined
// behaviour the CPU would hide (a shuffle waiting on a lane that exited,
// reading a lane outside the mask, a barrier not every thread reaches)
// fails the launch instead.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <string>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(16) int4 {
    int x, y, z, w;
};

inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

namespace emu {
// What a thread of a block sees. It lies at the top of the thread's fiber
// stack, and stacks are aligned to their size, so finding it from the stack
// pointer needs no thread-local storage.
struct ThreadHeader {
    uint3 thread;
    int lane;
    int warp;
    const uint3* block;
    const dim3* block_dim;
    const dim3* grid_dim;
    void* scheduler;
};
constexpr uintptr_t kStackBytes = 64 << 10;
constexpr uintptr_t kHeaderBytes = (sizeof(ThreadHeader) + 15) / 16 * 16;

inline ThreadHeader* self() {
    uintptr_t sp;
    asm("movq %%rsp, %0" : "=r"(sp));
    return reinterpret_cast<ThreadHeader*>((sp & ~(kStackBytes - 1)) + kStackBytes - kHeaderBytes);
}

void sync_block();
// Waits until every lane of `mask` in this warp has arrived with its
// `value`, then returns lane `source`'s (a lane outside the mask fails the launch).
uint64_t warp_exchange(unsigned int mask, uint64_t value, int source);
// The lanes of `mask` whose `predicate` holds.
unsigned int warp_ballot(unsigned int mask, bool predicate);
inline int lane_id() { return self()->lane; }
void* dynamic_shared();
// Ends the launch with `what`, as a GPU would fault or hang.
[[noreturn]] void fail_launch(const std::string& what);
// Whether [p, p + bytes) lies in the block's dynamic shared memory, or in
// one live device allocation.
bool is_kernel_memory(const void* p, size_t bytes);
// cp.async (the __pipeline_* primitives): `bytes` copied from device
// memory into the block's dynamic shared memory, in groups that land when
// a wait covers them; a block of even index lands each copy at once
// instead, so that both a read before the wait and a copy queued over
// data still being read show as wrong results.
void pipeline_copy(void* shared, const void* global, size_t bytes);
void pipeline_commit();
void pipeline_wait(size_t prior);
// Whether p lies in the block's dynamic shared memory.
bool is_shared_memory(const void* p);
// griddepcontrol.wait: where block 0 of a programmatic launch waits until
// every one of its threads has arrived or exited, and the previous
// kernel's writes come back.
void wait_for_previous_kernels();
}  // namespace emu

#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static thread_local
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n)
#define threadIdx (emu::self()->thread)
#define blockIdx (*emu::self()->block)
#define blockDim (*emu::self()->block_dim)
#define gridDim (*emu::self()->grid_dim)

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { emu::warp_ballot(mask, true); }

template <typename T>
inline uint64_t emu_bits(T v) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <typename T>
inline T emu_from_bits(uint64_t bits) {
    T v;
    memcpy(&v, &bits, sizeof(T));
    return v;
}

template <typename T>
inline T __shfl_sync(unsigned int mask, T v, int source, int width = 32) {
    const int lane = emu::lane_id();
    const int src = (lane / width) * width + (source % width);
    return emu_from_bits<T>(emu::warp_exchange(mask, emu_bits(v), src));
}

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    const int lane = emu::lane_id();
    int src = lane ^ lane_mask;
    if (src / width != lane / width) src = lane;
    return emu_from_bits<T>(emu::warp_exchange(mask, emu_bits(v), src));
}

template <typename T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    const int lane = emu::lane_id();
    const int src = (lane % width) >= (int)delta ? lane - (int)delta : lane;
    return emu_from_bits<T>(emu::warp_exchange(mask, emu_bits(v), src));
}

template <typename T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    const int lane = emu::lane_id();
    const int src = (lane % width) + (int)delta < width ? lane + (int)delta : lane;
    return emu_from_bits<T>(emu::warp_exchange(mask, emu_bits(v), src));
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate) { return emu::warp_ballot(mask, predicate != 0); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __any_sync(unsigned int mask, int predicate) { return emu::warp_ballot(mask, predicate != 0) != 0; }
inline int __all_sync(unsigned int mask, int predicate) { return emu::warp_ballot(mask, predicate != 0) == (mask & emu::warp_ballot(mask, true)); }

// Atomics: blocks run on several OS threads, so global memory needs real ones.
template <typename T>
inline T emu_atomic_update(T* address, T (*update)(T, T), T v) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(address, &old, update(old, v), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

template <typename F, typename U>
inline F emu_atomic_float(F* address, F (*update)(F, F), F v) {
    U* bits = reinterpret_cast<U*>(address);
    U old = __atomic_load_n(bits, __ATOMIC_RELAXED);
    for (;;) {
        F before;
        memcpy(&before, &old, sizeof(F));
        const F after = update(before, v);
        U want;
        memcpy(&want, &after, sizeof(F));
        if (__atomic_compare_exchange_n(bits, &old, want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return before;
    }
}

inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float* a, float v) {
    return emu_atomic_float<float, uint32_t>(a, [](float x, float y) { return x + y; }, v);
}
inline double atomicAdd(double* a, double v) {
    return emu_atomic_float<double, uint64_t>(a, [](double x, double y) { return x + y; }, v);
}
inline int atomicMin(int* a, int v) { return emu_atomic_update<int>(a, [](int x, int y) { return x < y ? x : y; }, v); }
inline int atomicMax(int* a, int v) { return emu_atomic_update<int>(a, [](int x, int y) { return x > y ? x : y; }, v); }
inline unsigned int atomicMin(unsigned int* a, unsigned int v) {
    return emu_atomic_update<unsigned int>(a, [](unsigned int x, unsigned int y) { return x < y ? x : y; }, v);
}
inline unsigned int atomicMax(unsigned int* a, unsigned int v) {
    return emu_atomic_update<unsigned int>(a, [](unsigned int x, unsigned int y) { return x > y ? x : y; }, v);
}
inline unsigned int atomicOr(unsigned int* a, unsigned int v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicExch(unsigned int* a, unsigned int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline int atomicCAS(int* a, int compare, int v) {
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}
inline unsigned int atomicCAS(unsigned int* a, unsigned int compare, unsigned int v) {
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Reinterpretations and the fast-math intrinsics (exact here).
inline float __int_as_float(int v) { return emu_from_bits<float>((uint32_t)v); }
inline int __float_as_int(float v) { return (int)(uint32_t)emu_bits(v); }
inline float __uint_as_float(unsigned int v) { return emu_from_bits<float>(v); }
inline unsigned int __float_as_uint(float v) { return (uint32_t)emu_bits(v); }
inline long long __double_as_longlong(double v) { return (long long)emu_bits(v); }
inline double __longlong_as_double(long long v) { return emu_from_bits<double>((uint64_t)v); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }

// Programmatic dependent launch (kernels/common.cuh). Block 0 of a kernel
// launched programmatically runs first, with the writes of the kernel
// before it undone until its threads wait: a read of them before the wait
// sees what was there before, and a write before it is lost.
inline void start_next_kernel() {}
inline void wait_for_previous_kernels() { emu::wait_for_previous_kernels(); }
inline void prefetch_l2(const void* p) {
    if (!emu::is_kernel_memory(p, 1) || emu::is_shared_memory(p)) emu::fail_launch("a prefetch of memory outside every device allocation");
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
