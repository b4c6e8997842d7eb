// Matrix-vector products for small batches (decode): out[t, o] =
// x[t, :] · w[o, :] + bias[o] for up to MAX_TOKENS tokens, reading each
// weight once. One warp per output feature; lanes stride over the input in
// runs of 8 weights (one 16-byte load of bf16 when the rows allow it), and
// the partial sums meet by warp shuffles. Activations and sums are f32.
//
// A lane issues LOADS_IN_FLIGHT weight loads before it uses any: a matrix
// of a few thousand rows gives an SM only ~27 warps, and one 16-byte load
// in flight per lane (~14 KB an SM) is short of what HBM latency needs to
// keep the bus busy. Weights are read with the streaming hint (used once,
// not worth caching), so the activations stay in L1.
#define MAX_TOKENS 8
#define LOADS_IN_FLIGHT 4
#define LANE_STRIDE (32 * 8)

// Eight stored weights as loaded, widened to f32 after the loads are out.
struct Bf16x8 {
    uint4 raw;
};
struct F32x8 {
    float4 a, b;
};

__device__ __forceinline__ Bf16x8 load_weights(const __nv_bfloat16* p) {
    return Bf16x8{__ldcs(reinterpret_cast<const uint4*>(p))};
}

__device__ __forceinline__ F32x8 load_weights(const float* p) {
    return F32x8{__ldcs(reinterpret_cast<const float4*>(p)), __ldcs(reinterpret_cast<const float4*>(p + 4))};
}

__device__ __forceinline__ void widen(const Bf16x8& w, float* v) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&w.raw);
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(pairs[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ void widen(const F32x8& w, float* v) {
    v[0] = w.a.x; v[1] = w.a.y; v[2] = w.a.z; v[3] = w.a.w;
    v[4] = w.b.x; v[5] = w.b.y; v[6] = w.b.z; v[7] = w.b.w;
}

// acc[r][t] += w_r[i..i+8] · x[t, i..i+8] for each of the ROWS rows.
template <int ROWS, typename Raw>
__device__ __forceinline__ void accumulate8(const Raw (&raw)[ROWS], const float* x, int in, int i, int tokens, float (&acc)[ROWS][MAX_TOKENS]) {
    float wv[ROWS][8];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) widen(raw[r], wv[r]);
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t >= tokens) break;
        const float4 a = __ldg(reinterpret_cast<const float4*>(x + (size_t)t * in + i));
        const float4 b = __ldg(reinterpret_cast<const float4*>(x + (size_t)t * in + i + 4));
        const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        #pragma unroll
        for (int r = 0; r < ROWS; ++r)
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc[r][t] += wv[r][j] * xv[j];
    }
}

// This lane's share of x[t, :] · rows[r] for ROWS weight rows of length `in`
// (a warp's 32 lanes together cover the rows; sum acc over the warp).
template <int ROWS, typename W>
__device__ __forceinline__ void dot_rows(const W* const (&rows)[ROWS], const float* x, int in, int tokens, float (&acc)[ROWS][MAX_TOKENS]) {
    constexpr int UNROLL = LOADS_IN_FLIGHT / ROWS;
    typedef decltype(load_weights(rows[0])) Raw;
    const int lane = threadIdx.x & 31;
    // 16-byte loads need every row (and x row) to start 16-byte aligned.
    const int vector_end = (in % 8 == 0) ? in : 0;
    int i = lane * 8;
    for (; i + (UNROLL - 1) * LANE_STRIDE < vector_end; i += UNROLL * LANE_STRIDE) {
        Raw raw[UNROLL][ROWS];
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) raw[u][r] = load_weights(rows[r] + i + u * LANE_STRIDE);
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) accumulate8<ROWS>(raw[u], x, in, i + u * LANE_STRIDE, tokens, acc);
    }
    for (; i < vector_end; i += LANE_STRIDE) {
        Raw raw[ROWS];
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) raw[r] = load_weights(rows[r] + i);
        accumulate8<ROWS>(raw, x, in, i, tokens, acc);
    }
    for (i = vector_end + lane; i < in; i += 32) {
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float wv = to_float(rows[r][i]);
            #pragma unroll
            for (int t = 0; t < MAX_TOKENS; ++t) {
                if (t >= tokens) break;
                acc[r][t] += wv * x[(size_t)t * in + i];
            }
        }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// The output feature of this thread's warp.
__device__ __forceinline__ int warp_feature() {
    return (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
}

template <typename W>
__device__ void matvec(float* out, const float* x, const W* w, const float* bias, int in, int outs, int tokens) {
    const int o = warp_feature();
    if (o >= outs) return;
    const W* const rows[1] = {w + (size_t)o * in};
    float acc[1][MAX_TOKENS] = {};
    dot_rows<1>(rows, x, in, tokens, acc);
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t >= tokens) break;
        const float v = warp_sum(acc[0][t]);
        if ((threadIdx.x & 31) == 0) out[(size_t)t * outs + o] = v + (bias ? bias[o] : 0.0f);
    }
}

// The MLP's first half for a few tokens: out[t, o] = silu(x[t] · gate[o]) ·
// (x[t] · up[o]) for a fused w = [gate (inter rows) | up (inter rows)], so
// the gate and up products never leave registers.
template <typename W>
__device__ void matvec_swiglu(float* out, const float* x, const W* w, int in, int inter, int tokens) {
    const int o = warp_feature();
    if (o >= inter) return;
    const W* const rows[2] = {w + (size_t)o * in, w + (size_t)(inter + o) * in};
    float acc[2][MAX_TOKENS] = {};
    dot_rows<2>(rows, x, in, tokens, acc);
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t >= tokens) break;
        const float g = warp_sum(acc[0][t]), u = warp_sum(acc[1][t]);
        if ((threadIdx.x & 31) == 0) out[(size_t)t * inter + o] = silu(g) * u;
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

extern "C" __global__ void matvec_swiglu_bf16(
    float* __restrict__ out, const float* __restrict__ x, const __nv_bfloat16* __restrict__ w,
    int in, int inter, int tokens) {
    matvec_swiglu(out, x, w, in, inter, tokens);
}

extern "C" __global__ void matvec_swiglu_f32(
    float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ w,
    int in, int inter, int tokens) {
    matvec_swiglu(out, x, w, in, inter, tokens);
}
