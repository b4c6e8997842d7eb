// Helpers every kernel file may use; prepended to each file before NVRTC
// compiles it (NVRTC has no standard headers).
#include <cuda_bf16.h>

#define NEG_INF __int_as_float(0xff800000)

// Programmatic dependent launch (compute capability 9.0; nothing before
// it). The backend launches every kernel so that it may start while the
// kernel before it drains (src/backend/cuda/launch.rs). Until
// wait_for_previous_kernels() returns, a kernel may read only what no
// kernel writes (its weights) and must write nothing; after it, every
// earlier kernel has finished and its writes are visible. Each kernel
// first calls start_next_kernel(): the next kernel's blocks may then take
// the SMs this one's blocks leave, and prefetch their weights meanwhile.
// The emulator (tests/cuda-emu) provides these three itself.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void start_next_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_kernels() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Asks L2 for the 128-byte line at `p`; no value comes back.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
#endif

// A kernel that reads nothing before its inputs are ready.
__device__ __forceinline__ void begin_after_previous_kernels() {
    start_next_kernel();
    wait_for_previous_kernels();
}

// A stored weight widened to f32 (weights are bf16 or f32).
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// SiLU: x · sigmoid(x).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// Sum (f32, or double for the sampler) and maximum of `v` over a warp;
// every lane gets the same bits, as each adds the same pairs. Every lane
// must call.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// `v` reduced over the block by `warp_reduce` (warp_sum, warp_max), whose
// neutral value is `identity`; every thread gets it. Every thread must call.
template <typename T, typename WarpReduce>
__device__ T block_reduce(T v, T identity, WarpReduce warp_reduce) {
    __shared__ T partial[32];
    v = warp_reduce(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x < warps ? partial[threadIdx.x] : identity;
    if (warp == 0) {
        v = warp_reduce(v);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    const T total = partial[0];
    __syncthreads();
    return total;
}

template <typename T>
__device__ T block_sum(T v) {
    return block_reduce(v, T(0), [](T x) { return warp_sum(x); });
}

// Calls use(i, v) for this thread's i (threadIdx.x, then blockDim.x on)
// in that order, v = load(i) below n and zero past it, to the end of the
// last group of LOADS: use checks i where a slot past n matters. The
// LOADS loads of a group are issued before any is used: where a kernel
// has few blocks (a decode step's one token) and reads from L2 or
// memory, one load at a time would wait n / blockDim.x round trips.
template <int LOADS, typename Load, typename Use>
__device__ __forceinline__ void strided_in_flight(int n, Load load, Use use) {
    for (int base = threadIdx.x; base < n; base += LOADS * blockDim.x) {
        decltype(load(0)) v[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int i = base + u * (int)blockDim.x;
            v[u] = i < n ? load(i) : decltype(load(0)){};
        }
#pragma unroll
        for (int u = 0; u < LOADS; ++u) use(base + u * (int)blockDim.x, v[u]);
    }
}

// This thread's share of the sum of x[i]² over x[0..n), in index order
// (slots past n add 0): the RMSNorm of a normed mat-vec's prologue, which
// every one of its blocks runs (14 round trips for a 3,584-wide row on
// 256 threads, one at a time), and of the RMSNorm kernels.
__device__ __forceinline__ float thread_squares(const float* x, int n) {
    float squares = 0.0f;
    strided_in_flight<16>(n, [&](int i) { return x[i]; }, [&](int, float v) { squares += v * v; });
    return squares;
}

__device__ float block_max(float v) {
    return block_reduce(v, NEG_INF, [](float x) { return warp_max(x); });
}

// Folds (v, j) into (value, index) by maximum, ties to the lower index.
__device__ __forceinline__ void max_with_index(float& value, unsigned int& index, float v, unsigned int j) {
    if (v > value || (v == value && j < index)) {
        value = v;
        index = j;
    }
}

// Argmax over a warp: every lane gets the warp's (value, index).
__device__ __forceinline__ void warp_argmax(float& value, unsigned int& index) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float v = __shfl_xor_sync(0xffffffff, value, offset);
        const unsigned int j = __shfl_xor_sync(0xffffffff, index, offset);
        max_with_index(value, index, v, j);
    }
}
