// A step's new tokens into the paged KV cache: the q and k heads of each
// fused qkv row rotated in place by the token's position (RoPE, neox
// layout: for i < head_dim/2, (x[i], x[i+half]) turn by the angle of
// (position, i); cos_sin[p] holds the cos of the half angles, then their
// sin), and its rotated k and its v heads written at its slot
// (block * block_size + offset). The projection's bias (null: none) is
// added first, so a GEMM's output needs no pass of its own for it. One
// kernel, so q and k are read once.
// Cache layout per layer: [num_blocks * block_size, kv_heads, head_dim],
// keys and values apart.
extern "C" __global__ void rope_write_kv_bf16(
    float* __restrict__ qkv,                  // [tokens, (heads + 2*kv_heads) * head_dim]
    const float* __restrict__ bias,           // [(heads + 2*kv_heads) * head_dim] or null
    __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
    const unsigned int* __restrict__ positions, const unsigned int* __restrict__ slots,
    const float* __restrict__ cos_sin,        // [max_positions, head_dim]
    int heads, int kv_heads, int head_dim) {
    begin_after_previous_kernels();
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const int kv_width = kv_heads * head_dim;
    float* row = qkv + (size_t)t * (heads * head_dim + 2 * kv_width);
    const float* cs = cos_sin + (size_t)positions[t] * head_dim;
    const size_t slot = (size_t)slots[t] * kv_width;
    // q heads, then k heads; v is not rotated.
    for (int j = threadIdx.x; j < (heads + kv_heads) * half; j += blockDim.x) {
        const int head = j / half, i = j % half;
        float* x = row + head * head_dim;
        const float c = cs[i], s = cs[half + i];
        const int at = head * head_dim + i;
        const float a = x[i] + (bias ? bias[at] : 0.0f), b = x[i + half] + (bias ? bias[at + half] : 0.0f);
        const float lo = a * c - b * s, hi = b * c + a * s;
        x[i] = lo;
        x[i + half] = hi;
        if (head >= heads) {
            __nv_bfloat16* k = k_cache + slot + (head - heads) * head_dim;
            k[i] = __float2bfloat16(lo);
            k[i + half] = __float2bfloat16(hi);
        }
    }
    const int v_at = (heads + kv_heads) * head_dim;
    float* v = row + v_at;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        const float value = v[i] + (bias ? bias[v_at + i] : 0.0f);
        if (bias) v[i] = value;
        v_cache[slot + i] = __float2bfloat16(value);
    }
}
