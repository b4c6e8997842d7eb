// SwiGLU: out[t, i] = silu(gate[t, i]) * up[t, i], from a fused
// gate_up row [gate (inter) | up (inter)]; where `rounded` is given, the
// same values rounded to bf16 there too (the down projection's GEMM
// operand, which then needs no cast of its own).
extern "C" __global__ void silu_mul_f32(float* __restrict__ out, __nv_bfloat16* __restrict__ rounded,
                                        const float* __restrict__ gate_up, int inter, int tokens) {
    begin_after_previous_kernels();
    const size_t n = (size_t)tokens * inter;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        const size_t t = k / inter, i = k % inter;
        const float g = gate_up[t * 2 * inter + i];
        const float u = gate_up[t * 2 * inter + inter + i];
        const float a = silu(g) * u;
        out[k] = a;
        if (rounded) rounded[k] = __float2bfloat16(a);
    }
}
