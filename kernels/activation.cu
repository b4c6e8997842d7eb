// SwiGLU: out[t, i] = silu(gate[t, i]) * up[t, i], from a fused
// gate_up row [gate (inter) | up (inter)].
extern "C" __global__ void silu_mul_f32(float* __restrict__ out, const float* __restrict__ gate_up, int inter, int tokens) {
    begin_after_previous_kernels();
    const size_t n = (size_t)tokens * inter;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        const size_t t = k / inter, i = k % inter;
        const float g = gate_up[t * 2 * inter + i];
        const float u = gate_up[t * 2 * inter + inter + i];
        out[k] = silu(g) * u;
    }
}
