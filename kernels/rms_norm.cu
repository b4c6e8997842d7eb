// RMSNorm over rows of f32 activations with an f32 weight; the fused
// residual form: residual += x, then out = RMSNorm(residual); and the
// model's output rows. One block per row; the sum of squares is reduced
// in f32 (block_sum, common.cuh).

__device__ void normalize_row(float* out, const float* x, const float* weight, int cols, float eps) {
    float squares = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) squares += x[i] * x[i];
    const float scale = rsqrtf(block_sum(squares) / cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) out[i] = x[i] * scale * weight[i];
}

extern "C" __global__ void rms_norm_f32(
    float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ weight, int cols, float eps) {
    begin_after_previous_kernels();
    const size_t row = (size_t)blockIdx.x * cols;
    normalize_row(out + row, x + row, weight, cols, eps);
}

extern "C" __global__ void add_rms_norm_f32(
    float* __restrict__ out, float* __restrict__ residual, const float* __restrict__ x,
    const float* __restrict__ weight, int cols, float eps) {
    begin_after_previous_kernels();
    const size_t row = (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) residual[row + i] += x[row + i];
    __syncthreads();
    normalize_row(out + row, residual + row, weight, cols, eps);
}

// The last layer's residual add, the rows a step samples and the final
// norm in one: out[i] = RMSNorm(x[rows[i]] + add[rows[i]]), with nothing
// added where `add` is null.
extern "C" __global__ void add_rms_norm_rows_f32(
    float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ add,
    const unsigned int* __restrict__ rows, const float* __restrict__ weight, int cols, float eps) {
    begin_after_previous_kernels();
    float* row = out + (size_t)blockIdx.x * cols;
    const size_t from = (size_t)rows[blockIdx.x] * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = x[from + i] + (add ? add[from + i] : 0.0f);
    normalize_row(row, row, weight, cols, eps);
}
