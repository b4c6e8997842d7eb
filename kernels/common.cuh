// Helpers every kernel file may use; prepended to each file before NVRTC
// compiles it (NVRTC has no standard headers).
#include <cuda_bf16.h>

#define NEG_INF __int_as_float(0xff800000)

// Sum of `v` over the block; every thread gets it. Every thread must call.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x < warps ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    const float total = partial[0];
    __syncthreads();
    return total;
}

// Maximum of `v` over the block; every thread gets it. Every thread must call.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x < warps ? partial[threadIdx.x] : NEG_INF;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    const float total = partial[0];
    __syncthreads();
    return total;
}
