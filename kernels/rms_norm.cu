// RMSNorm over rows of f32 activations with an f32 weight, in f32 or
// rounded to bf16 (the operand of a bf16 GEMM, so no cast follows), and
// over the model's output rows. One block per row, with a thread's share
// of it in flight at once (a decode step's final norm is one block); the
// sum of squares is reduced in f32 (block_sum, common.cuh). A decode step's
// norms inside the layers run in the mat-vecs that follow them
// (kernels/linear.cu).

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__device__ void normalize_row(T* out, const float* x, const float* weight, int cols, float eps) {
    const float scale = rsqrtf(block_sum(thread_squares(x, cols)) / cols + eps);
    strided_in_flight<16>(
        cols, [&](int i) { return make_float2(x[i], weight[i]); },
        [&](int i, float2 v) {
            if (i < cols) store(out + i, v.x * scale * v.y);
        });
}

extern "C" __global__ void rms_norm_f32(
    float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ weight, int cols, float eps) {
    begin_after_previous_kernels();
    const size_t row = (size_t)blockIdx.x * cols;
    normalize_row(out + row, x + row, weight, cols, eps);
}

extern "C" __global__ void rms_norm_bf16(
    __nv_bfloat16* __restrict__ out, const float* __restrict__ x, const float* __restrict__ weight, int cols, float eps) {
    begin_after_previous_kernels();
    const size_t row = (size_t)blockIdx.x * cols;
    normalize_row(out + row, x + row, weight, cols, eps);
}

// The model's output rows: out[i] = RMSNorm(x[rows[i]]), the final norm of
// only the rows a step samples.
extern "C" __global__ void rms_norm_rows_f32(
    float* __restrict__ out, const float* __restrict__ x, const unsigned int* __restrict__ rows,
    const float* __restrict__ weight, int cols, float eps) {
    begin_after_previous_kernels();
    normalize_row(out + (size_t)blockIdx.x * cols, x + (size_t)rows[blockIdx.x] * cols, weight, cols, eps);
}
