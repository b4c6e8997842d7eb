// Paged attention for prefill, chunked prefill and decode alike: each new
// token attends causally to its sequence's keys at positions 0..=its own,
// read from the paged cache through the sequence's block table (the
// token's own key is written there first). GQA: query head h reads KV head
// h / (heads / kv_heads). One block per (token, query head); keys go in
// chunks of blockDim.x with an online softmax, so any context length fits.
// Each thread keeps up to DIMS_PER_THREAD output dimensions.
#define DIMS_PER_THREAD 4

extern "C" __global__ void paged_attention_bf16(
    float* __restrict__ out,                       // [tokens, heads * head_dim]
    const float* __restrict__ qkv,                 // [tokens, (heads + 2*kv_heads) * head_dim]
    const __nv_bfloat16* __restrict__ k_cache,     // [slots, kv_heads, head_dim]
    const __nv_bfloat16* __restrict__ v_cache,
    const unsigned int* __restrict__ block_tables, // [seqs, max_blocks]
    const unsigned int* __restrict__ token_seq,    // [tokens]: the token's sequence
    const unsigned int* __restrict__ token_pos,    // [tokens]: its position in that sequence
    int max_blocks, int heads, int kv_heads, int head_dim, int block_size, float scale) {
    extern __shared__ float shared[];
    float* q = shared;                 // [head_dim]
    float* weights = shared + head_dim; // [blockDim.x]
    const int t = blockIdx.x, h = blockIdx.y;
    const int kv_head = h / (heads / kv_heads);
    const int width = (heads + 2 * kv_heads) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q[d] = qkv[(size_t)t * width + h * head_dim + d] * scale;
    __syncthreads();
    const unsigned int* table = block_tables + (size_t)token_seq[t] * max_blocks;
    const int keys = token_pos[t] + 1;
    const size_t kv_stride = (size_t)kv_heads * head_dim;
    float running_max = NEG_INF, total = 0.0f;
    float acc[DIMS_PER_THREAD] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int base = 0; base < keys; base += blockDim.x) {
        const int j = base + threadIdx.x;
        float score = NEG_INF;
        if (j < keys) {
            const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            const __nv_bfloat16* k = k_cache + slot * kv_stride + (size_t)kv_head * head_dim;
            score = 0.0f;
            for (int d = 0; d < head_dim; ++d) score += q[d] * __bfloat162float(k[d]);
        }
        const float new_max = fmaxf(running_max, block_max(score));
        const float rescale = __expf(running_max - new_max);
        const float p = j < keys ? __expf(score - new_max) : 0.0f;
        weights[threadIdx.x] = p;
        total = total * rescale + block_sum(p);
        const int chunk = min((int)blockDim.x, keys - base);
        for (int i = 0; i < DIMS_PER_THREAD; ++i) {
            const int d = threadIdx.x + i * blockDim.x;
            if (d >= head_dim) break;
            float sum = acc[i] * rescale;
            for (int k = 0; k < chunk; ++k) {
                const int key = base + k;
                const size_t slot = (size_t)table[key / block_size] * block_size + key % block_size;
                sum += weights[k] * __bfloat162float(v_cache[slot * kv_stride + (size_t)kv_head * head_dim + d]);
            }
            acc[i] = sum;
        }
        running_max = new_max;
        __syncthreads();
    }
    for (int i = 0; i < DIMS_PER_THREAD; ++i) {
        const int d = threadIdx.x + i * blockDim.x;
        if (d < head_dim) out[(size_t)t * heads * head_dim + h * head_dim + d] = acc[i] / total;
    }
}
