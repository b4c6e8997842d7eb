// Matrix-vector products for small batches (decode): out[t, o] =
// x[t, :] · w[o, :] + bias[o] for up to MAX_TOKENS tokens, reading each
// weight once. One warp per output feature; lanes stride over the input in
// runs of 8 weights (one 16-byte load of bf16 when the rows allow it), and
// the partial sums meet by warp shuffles. Activations and sums are f32.
#define MAX_TOKENS 8

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* v) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(pairs[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ void load8(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <typename W>
__device__ void matvec(float* out, const float* x, const W* w, const float* bias, int in, int outs, int tokens) {
    const int o = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (o >= outs) return;
    const W* row = w + (size_t)o * in;
    float acc[MAX_TOKENS];
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) acc[t] = 0.0f;
    // 16-byte loads need every row (and x row) to start 16-byte aligned.
    const int vector_end = (in % 8 == 0) ? in : 0;
    for (int i = lane * 8; i < vector_end; i += 32 * 8) {
        float wv[8], xv[8];
        load8(row + i, wv);
        #pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t) {
            if (t >= tokens) break;
            load8(x + (size_t)t * in + i, xv);
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc[t] += wv[j] * xv[j];
        }
    }
    for (int i = vector_end + lane; i < in; i += 32) {
        const float wv = to_float(row[i]);
        #pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t) {
            if (t >= tokens) break;
            acc[t] += wv * x[(size_t)t * in + i];
        }
    }
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t >= tokens) break;
        float v = acc[t];
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
        if (lane == 0) out[(size_t)t * outs + o] = v + (bias ? bias[o] : 0.0f);
    }
}

extern "C" __global__ void matvec_bf16(
    float* __restrict__ out, const float* __restrict__ x, const __nv_bfloat16* __restrict__ w,
    const float* __restrict__ bias, int in, int outs, int tokens) {
    matvec(out, x, w, bias, in, outs, tokens);
}

extern "C" __global__ void matvec_f32(
    float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ bias, int in, int outs, int tokens) {
    matvec(out, x, w, bias, in, outs, tokens);
}
