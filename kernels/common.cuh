// Helpers every kernel file may use; prepended to each file before NVRTC
// compiles it (NVRTC has no standard headers).
#include <cuda_bf16.h>

#define NEG_INF __int_as_float(0xff800000)

// A stored weight widened to f32 (weights are bf16 or f32).
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// SiLU: x · sigmoid(x).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// Sum and maximum of `v` over a warp; every lane gets it. Every lane must call.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// `v` reduced over the block by `warp_reduce` (warp_sum, warp_max), whose
// neutral value is `identity`; every thread gets it. Every thread must call.
template <typename WarpReduce>
__device__ float block_reduce(float v, float identity, WarpReduce warp_reduce) {
    __shared__ float partial[32];
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
    const float total = partial[0];
    __syncthreads();
    return total;
}

__device__ float block_sum(float v) {
    return block_reduce(v, 0.0f, [](float x) { return warp_sum(x); });
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
