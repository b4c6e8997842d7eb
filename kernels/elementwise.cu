// Small element-wise ops over f32 activations, grid-strided.

#define GRID_STRIDE(k, n) for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < (n); k += (size_t)gridDim.x * blockDim.x)

// x += y.
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y, size_t n) {
    begin_after_previous_kernels();
    GRID_STRIDE(k, n) x[k] += y[k];
}

// out[r, c] += bias[c] for a [rows, cols] matrix.
extern "C" __global__ void add_bias_f32(float* __restrict__ out, const float* __restrict__ bias, int cols, size_t n) {
    begin_after_previous_kernels();
    GRID_STRIDE(k, n) out[k] += bias[k % cols];
}

// Rounds f32 activations to bf16 (the input of a bf16 GEMM).
extern "C" __global__ void cast_f32_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ x, size_t n) {
    begin_after_previous_kernels();
    GRID_STRIDE(k, n) out[k] = __float2bfloat16(x[k]);
}

// Logits gathered from `ranks` ranks of a split vocabulary, `all [ranks·rows,
// per + 1]` (each rank's slice with a padding column), laid out as
// out [rows, vocab]: column c comes from rank c / per, its column c % per.
extern "C" __global__ void lay_out_vocab_f32(
    float* __restrict__ out, const float* __restrict__ all, int rows, int per, int vocab, size_t n) {
    begin_after_previous_kernels();
    GRID_STRIDE(k, n) {
        const size_t row = k / vocab, c = k % vocab, rank = c / per;
        out[k] = all[(rank * rows + row) * (per + 1) + c % per];
    }
}
