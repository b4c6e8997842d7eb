// Matrix-vector products for small batches (decode): out[t, o] =
// x[t, :] · w[o, :] + bias[o] for up to MAX_TOKENS tokens, reading each
// weight once. One warp per output feature (or pair of features); the
// partial sums meet by warp shuffles. Activations and sums are f32.
//
// The products that open a sublayer (qkv, gate/up) take the residual
// stream itself and apply the layer's RMSNorm on the way: RMSNorm(x) · w
// = scale · (x · (w ⊙ g)) for the norm weight g and the row's scale
// 1/rms(x), so the weights are scaled by g as they are widened and the
// sums by the scale at the end, which each block works out first from
// the few rows of x (rms_scales). The products that close one (o_proj,
// down_proj) may add into their output, the residual stream, in place.
// Neither the normalized activations nor the sublayer's output then make
// a round trip through memory, and a layer is two kernels fewer.
//
// A warp steps over the input 256 weights at a time, lane j taking the
// runs of 4 at 4j and at 128 + 4j (8 bytes of bf16 each, 16 of f32), so
// that the warp's loads of the matching activations each read 512
// contiguous bytes: one run of 8 a lane would need 32 bytes of each token's
// activations a lane, which a warp reads in two loads 1 KB wide, twice the
// L1 traffic. The activations come from L1 for every weight load and every
// token, so that traffic, not the weights', is what grows with the tokens.
//
// A lane issues LOADS_IN_FLIGHT runs of 8 before it uses any: a matrix of
// a few thousand rows gives an SM only ~27 warps, and 16 bytes in flight
// per lane (~14 KB an SM) is short of what HBM latency needs to keep the
// bus busy. Weights are read with the streaming hint (used once, not worth
// caching), so the activations stay in L1.
#define MAX_TOKENS 8
#define LOADS_IN_FLIGHT 4
#define LANE_STRIDE (32 * 8)
#define HALF_STRIDE (32 * 4)

// A lane's eight weights of a step as loaded (the runs at i and at i +
// HALF_STRIDE), widened to f32 after the loads are out.
struct Bf16x8 {
    uint2 lo, hi;
};
struct F32x8 {
    float4 lo, hi;
};

// `hi`: whether the second run lies in the row (a row's last, partial step).
__device__ __forceinline__ Bf16x8 load_weights(const __nv_bfloat16* p, bool hi) {
    return Bf16x8{__ldcs(reinterpret_cast<const uint2*>(p)), hi ? __ldcs(reinterpret_cast<const uint2*>(p + HALF_STRIDE)) : make_uint2(0, 0)};
}

__device__ __forceinline__ F32x8 load_weights(const float* p, bool hi) {
    return F32x8{__ldcs(reinterpret_cast<const float4*>(p)),
                 hi ? __ldcs(reinterpret_cast<const float4*>(p + HALF_STRIDE)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
}

__device__ __forceinline__ void widen(const Bf16x8& w, float* v) {
    const __nv_bfloat162* lo = reinterpret_cast<const __nv_bfloat162*>(&w.lo);
    const __nv_bfloat162* hi = reinterpret_cast<const __nv_bfloat162*>(&w.hi);
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float2 a = __bfloat1622float2(lo[i]), b = __bfloat1622float2(hi[i]);
        v[2 * i] = a.x;
        v[2 * i + 1] = a.y;
        v[4 + 2 * i] = b.x;
        v[4 + 2 * i + 1] = b.y;
    }
}

__device__ __forceinline__ void widen(const F32x8& w, float* v) {
    v[0] = w.lo.x; v[1] = w.lo.y; v[2] = w.lo.z; v[3] = w.lo.w;
    v[4] = w.hi.x; v[5] = w.hi.y; v[6] = w.hi.z; v[7] = w.hi.w;
}

// acc[r][t] += (w_r ⊙ g) · x[t] over the runs at i and i + HALF_STRIDE
// (the second only with `hi`) for each of the ROWS rows, where g (an
// input norm's weight, or null for none) scales the weights' columns.
template <int ROWS, typename Raw>
__device__ __forceinline__ void accumulate8(const Raw (&raw)[ROWS], const float* x, const float* g, int in, int i, bool hi, int tokens,
                                            float (&acc)[ROWS][MAX_TOKENS]) {
    float wv[ROWS][8];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) widen(raw[r], wv[r]);
    if (g) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(g + i));
        const float4 b = hi ? __ldg(reinterpret_cast<const float4*>(g + i + HALF_STRIDE)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const float gv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        #pragma unroll
        for (int r = 0; r < ROWS; ++r)
            #pragma unroll
            for (int j = 0; j < 8; ++j) wv[r][j] *= gv[j];
    }
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t >= tokens) break;
        const float4 a = __ldg(reinterpret_cast<const float4*>(x + (size_t)t * in + i));
        const float4 b = hi ? __ldg(reinterpret_cast<const float4*>(x + (size_t)t * in + i + HALF_STRIDE)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        #pragma unroll
        for (int r = 0; r < ROWS; ++r)
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc[r][t] += wv[r][j] * xv[j];
    }
}

// This lane's share of x[t, :] · (rows[r] ⊙ g) for ROWS weight rows of
// length `in` and the norm weight g (null: none); a warp's 32 lanes
// together cover the rows (sum acc over the warp).
template <int ROWS, typename W>
__device__ __forceinline__ void dot_rows(const W* const (&rows)[ROWS], const float* x, const float* g, int in, int tokens,
                                         float (&acc)[ROWS][MAX_TOKENS]) {
    constexpr int UNROLL = LOADS_IN_FLIGHT / ROWS;
    typedef decltype(load_weights(rows[0], true)) Raw;
    const int lane = threadIdx.x & 31;
    // Runs of 4 need every row (and x row) to start 8-byte aligned (bf16) or 16 (f32).
    if (in % 4 != 0) {
        for (int i = lane; i < in; i += 32) {
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float wv = to_float(rows[r][i]) * (g ? g[i] : 1.0f);
                #pragma unroll
                for (int t = 0; t < MAX_TOKENS; ++t) {
                    if (t >= tokens) break;
                    acc[r][t] += wv * x[(size_t)t * in + i];
                }
            }
        }
        return;
    }
    const int whole = in / LANE_STRIDE * LANE_STRIDE;
    int i = lane * 4;
    for (; i + (UNROLL - 1) * LANE_STRIDE < whole; i += UNROLL * LANE_STRIDE) {
        Raw raw[UNROLL][ROWS];
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) raw[u][r] = load_weights(rows[r] + i + u * LANE_STRIDE, true);
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) accumulate8<ROWS>(raw[u], x, g, in, i + u * LANE_STRIDE, true, tokens, acc);
    }
    for (; i < in; i += LANE_STRIDE) {
        // The last step may be partial: runs past the row's end are left out.
        const bool hi = i + HALF_STRIDE < in;
        Raw raw[ROWS];
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) raw[r] = load_weights(rows[r] + i, hi);
        accumulate8<ROWS>(raw, x, g, in, i, hi, tokens, acc);
    }
}

// Starts the next kernel, asks L2 for the weights of the warp's first
// loop step (LOADS_IN_FLIGHT runs a lane over its ROWS rows), then waits
// for the previous kernels (common.cuh): weights are no kernel's output,
// so fetching them may overlap the previous kernel's tail, where the bus
// would otherwise idle while this kernel's blocks start.
template <int ROWS, typename W>
__device__ __forceinline__ void prefetch_rows_then_wait(const W* const (&rows)[ROWS], int in) {
    start_next_kernel();
    const int bytes = min(in, LOADS_IN_FLIGHT / ROWS * LANE_STRIDE) * (int)sizeof(W);
    for (int at = (threadIdx.x & 31) * 128; at < bytes; at += 32 * 128)
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) prefetch_l2(reinterpret_cast<const char*>(rows[r]) + at);
    wait_for_previous_kernels();
}

// scale[t] = 1/sqrt(mean(x[t]²) + eps) for the `tokens` rows of x [tokens,
// in], as RMSNorm (kernels/rms_norm.cu) has it, into `scale` (shared,
// MAX_TOKENS): each warp sums a share of every row, and warp t adds row
// t's shares up, so a block needs MAX_TOKENS warps. Two barriers for all
// the rows, where block_sum (common.cuh) takes three a row, in the
// prologue every block waits through. Every thread must call.
__device__ void rms_scales(float* scale, const float* x, int in, int tokens, float eps) {
    __shared__ float partial[MAX_TOKENS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int t = 0; t < tokens; ++t) {
        const float squares = warp_sum(thread_squares(x + (size_t)t * in, in));
        if (lane == 0) partial[t][warp] = squares;
    }
    __syncthreads();
    if (warp < tokens) {
        const float total = warp_sum(lane < warps ? partial[warp][lane] : 0.0f);
        if (lane == 0) scale[warp] = rsqrtf(total / in + eps);
    }
    __syncthreads();
}

// The output feature of this thread's warp.
__device__ __forceinline__ int warp_feature() {
    return (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
}

// ROWS output features a warp: each load of the activations from L1 then
// serves ROWS weight rows (for a few tokens that traffic binds, see the
// top), for 1/ROWS of the warps and so of the weight bytes in flight.
template <int ROWS, typename W>
__device__ void matvec_rows(float* out, const float* x, const W* w, const float* bias, int in, int outs, int tokens, bool accumulate) {
    const int first = warp_feature() * ROWS;
    if (first >= outs) return;
    // The last warp reads the matrix's last row again for rows past its end.
    const W* rows[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = w + (size_t)min(first + r, outs - 1) * in;
    prefetch_rows_then_wait<ROWS>(rows, in);
    float acc[ROWS][MAX_TOKENS] = {};
    dot_rows<ROWS>(rows, x, nullptr, in, tokens, acc);
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t >= tokens) break;
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float sum = warp_sum(acc[r][t]);
            const int o = first + r;
            if ((threadIdx.x & 31) != 0 || o >= outs) continue;
            const float v = sum + (bias ? bias[o] : 0.0f);
            float* at = out + (size_t)t * outs + o;
            *at = accumulate ? *at + v : v;
        }
    }
}

// out = x · wᵀ + bias, or out += that with `accumulate`.
template <typename W>
__device__ void matvec(float* out, const float* x, const W* w, const float* bias, int in, int outs, int tokens, int rows_per_warp,
                       int accumulate) {
    if (rows_per_warp == 2) {
        matvec_rows<2>(out, x, w, bias, in, outs, tokens, accumulate != 0);
    } else {
        matvec_rows<1>(out, x, w, bias, in, outs, tokens, accumulate != 0);
    }
}

// Prefetches the warp's first weights and waits (prefetch_rows_then_wait),
// then puts the RMSNorm scales of x's rows into `scale` (rms_scales).
// Every thread of the block must call; a warp past the matrix's rows
// passes its last ones.
template <int ROWS, typename W>
__device__ __forceinline__ void open_normed(const W* const (&rows)[ROWS], float* scale, const float* x, int in, int tokens, float eps) {
    prefetch_rows_then_wait<ROWS>(rows, in);
    rms_scales(scale, x, in, tokens, eps);
}

// The MLP's first half for a few tokens: out[t, o] = silu(x̂[t] · gate[o]) ·
// (x̂[t] · up[o]) for x̂ = RMSNorm(x) by `norm` and a fused w = [gate (inter
// rows) | up (inter rows)], so the gate and up products never leave
// registers.
template <typename W>
__device__ void matvec_swiglu(float* out, const float* x, const W* w, const float* norm, int in, int inter, int tokens, float eps) {
    const int o = warp_feature(), row = min(o, inter - 1);
    const W* const rows[2] = {w + (size_t)row * in, w + (size_t)(inter + row) * in};
    __shared__ float scale[MAX_TOKENS];
    open_normed<2>(rows, scale, x, in, tokens, eps);
    if (o >= inter) return;
    float acc[2][MAX_TOKENS] = {};
    dot_rows<2>(rows, x, norm, in, tokens, acc);
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t >= tokens) break;
        const float g = warp_sum(acc[0][t]) * scale[t], u = warp_sum(acc[1][t]) * scale[t];
        if ((threadIdx.x & 31) == 0) out[(size_t)t * inter + o] = silu(g) * u;
    }
}

// The attention's input projection of RMSNorm(x) by `norm` for a few
// tokens, with RoPE and the KV-cache write (kernels/kv_cache.cu, whose
// arithmetic this repeats) in its epilogue: a warp takes rows i and i +
// head_dim/2 of one head of w = [q heads | k heads | v heads], the pair
// RoPE turns together. The q and k heads are written to `out` turned by
// the token's position, the k and v heads (k turned) also to the cache at
// the token's slot, in bf16.
template <typename W>
__device__ void matvec_qkv_rope(float* out, const float* x, const W* w, const float* bias, const float* norm,
                                __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const unsigned int* positions,
                                const unsigned int* slots, const float* cos_sin, int in, int heads, int kv_heads, int head_dim,
                                int tokens, float eps) {
    const int half = head_dim / 2, all_heads = heads + 2 * kv_heads;
    const int pair = warp_feature();
    const int head = min(pair, all_heads * half - 1) / half, i = pair % half;
    const int lo = head * head_dim + i, hi = lo + half;
    const W* const rows[2] = {w + (size_t)lo * in, w + (size_t)hi * in};
    __shared__ float scale[MAX_TOKENS];
    open_normed<2>(rows, scale, x, in, tokens, eps);
    if (pair >= all_heads * half) return;
    float acc[2][MAX_TOKENS] = {};
    dot_rows<2>(rows, x, norm, in, tokens, acc);
    const int outs = all_heads * head_dim, kv_width = kv_heads * head_dim;
    #pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t >= tokens) break;
        float a = warp_sum(acc[0][t]) * scale[t] + (bias ? bias[lo] : 0.0f);
        float b = warp_sum(acc[1][t]) * scale[t] + (bias ? bias[hi] : 0.0f);
        if ((threadIdx.x & 31) != 0) continue;
        if (head < heads + kv_heads) {
            const float* cs = cos_sin + (size_t)positions[t] * head_dim;
            const float c = cs[i], s = cs[half + i];
            const float turned_a = a * c - b * s;
            b = b * c + a * s;
            a = turned_a;
        }
        out[(size_t)t * outs + lo] = a;
        out[(size_t)t * outs + hi] = b;
        if (head >= heads) {
            const bool key = head < heads + kv_heads;
            __nv_bfloat16* cache = (key ? k_cache : v_cache) + (size_t)slots[t] * kv_width;
            const int at = (head - heads - (key ? 0 : kv_heads)) * head_dim + i;
            cache[at] = __float2bfloat16(a);
            cache[at + half] = __float2bfloat16(b);
        }
    }
}

// `out` is read back (not only written) with `accumulate`.
extern "C" __global__ void matvec_bf16(
    float* __restrict__ out, const float* __restrict__ x, const __nv_bfloat16* __restrict__ w,
    const float* __restrict__ bias, int in, int outs, int tokens, int rows_per_warp, int accumulate) {
    matvec(out, x, w, bias, in, outs, tokens, rows_per_warp, accumulate);
}

extern "C" __global__ void matvec_f32(
    float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ bias, int in, int outs, int tokens, int rows_per_warp, int accumulate) {
    matvec(out, x, w, bias, in, outs, tokens, rows_per_warp, accumulate);
}

// The normed products hold their norm's scales and weights in registers
// too; bounded to three blocks of eight warps an SM (at most 85 registers
// a thread, which they meet without spilling), the 7B shape's qkv matrix
// (288 blocks) still runs in one wave on 132 SMs.
#define NORMED_BOUNDS __launch_bounds__(256, 3)

extern "C" __global__ void NORMED_BOUNDS matvec_swiglu_bf16(
    float* __restrict__ out, const float* __restrict__ x, const __nv_bfloat16* __restrict__ w,
    const float* __restrict__ norm, int in, int inter, int tokens, float eps) {
    matvec_swiglu(out, x, w, norm, in, inter, tokens, eps);
}

extern "C" __global__ void NORMED_BOUNDS matvec_swiglu_f32(
    float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ norm, int in, int inter, int tokens, float eps) {
    matvec_swiglu(out, x, w, norm, in, inter, tokens, eps);
}

#define MATVEC_QKV_ROPE(name, W)                                                                                         \
    extern "C" __global__ void NORMED_BOUNDS name(                                                                      \
        float* __restrict__ out, const float* __restrict__ x, const W* __restrict__ w, const float* __restrict__ bias,  \
        const float* __restrict__ norm, __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,       \
        const unsigned int* __restrict__ positions, const unsigned int* __restrict__ slots,                             \
        const float* __restrict__ cos_sin, int in, int heads, int kv_heads, int head_dim, int tokens, float eps) {      \
        matvec_qkv_rope(out, x, w, bias, norm, k_cache, v_cache, positions, slots, cos_sin, in, heads, kv_heads,       \
                        head_dim, tokens, eps);                                                                         \
    }

MATVEC_QKV_ROPE(matvec_qkv_rope_bf16, __nv_bfloat16)
MATVEC_QKV_ROPE(matvec_qkv_rope_f32, float)
