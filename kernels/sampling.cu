// Greedy sampling on the device: the first index of each row's maximum
// (ties to the lowest id, as torch.argmax), one block per row.
extern "C" __global__ void argmax_f32(unsigned int* __restrict__ out, const float* __restrict__ logits, int vocab) {
    __shared__ float best_value[32];
    __shared__ unsigned int best_index[32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float value = NEG_INF;
    unsigned int index = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) max_with_index(value, index, row[i], i);
    warp_argmax(value, index);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_value[warp] = value;
        best_index[warp] = index;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        value = lane < warps ? best_value[lane] : NEG_INF;
        index = lane < warps ? best_index[lane] : 0xffffffffu;
        warp_argmax(value, index);
        if (lane == 0) out[blockIdx.x] = index == 0xffffffffu ? 0 : index;
    }
}
