// Writes each new token's k and v heads into the paged cache at its slot
// (block * block_size + offset). Cache layout per layer:
// [num_blocks * block_size, kv_heads, head_dim], keys and values apart.
extern "C" __global__ void write_kv_bf16(
    __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
    const float* __restrict__ qkv,            // [tokens, (heads + 2*kv_heads) * head_dim]
    const unsigned int* __restrict__ slots,   // [tokens]
    int heads, int kv_heads, int head_dim) {
    const int t = blockIdx.x;
    const int width = (heads + 2 * kv_heads) * head_dim;
    const int kv_width = kv_heads * head_dim;
    const float* k = qkv + (size_t)t * width + heads * head_dim;
    const float* v = k + kv_width;
    const size_t slot = (size_t)slots[t] * kv_width;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        k_cache[slot + i] = __float2bfloat16(k[i]);
        v_cache[slot + i] = __float2bfloat16(v[i]);
    }
}
