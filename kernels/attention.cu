// Paged attention for prefill, chunked prefill and decode alike, read
// straight from the paged KV cache through each sequence's block table.
//
// Why this shape: the cache is what attention streams, so each key and
// value is loaded once per block into shared memory and used by every
// query row the block holds: all the query heads of one KV head (GQA's
// group), for up to 8 consecutive tokens of one sequence (a tile, listed
// by the host: src/backend/cuda/step.rs). A decode step has one token per sequence,
// too few blocks to keep a GPU's memory busy, so a sequence's keys are
// also split across blocks (flash-decoding): each split writes its rows'
// partial softmax state and attention_combine_f32 merges them. With one
// split the block writes the output itself.
//
// Layout: grid (tiles, kv_heads * passes, splits) of ATTENTION_THREADS
// threads. A tile's rows are token-major (row r: its token r / group, head
// r % group); a pass takes ROWS_PER_BLOCK of them. Each warp owns every
// fourth row of the pass and each lane one key of a 32-key tile: the
// lane's score, the warp's online-softmax update, then each lane adds up
// its DIMS output dimensions (d = lane + 32 i). Sums are f32.
#define ATTENTION_THREADS 128
#define KEY_TILE 32
#define ROWS_PER_BLOCK 32
#define ROWS_PER_WARP (ROWS_PER_BLOCK / (ATTENTION_THREADS / 32))

template <int DIMS>
__device__ void paged_attention(
    float* __restrict__ out,                       // [tokens, heads * head_dim]: written with one split
    float* __restrict__ partial,                   // [splits, tokens * heads, head_dim + 2]: acc, max, sum; with more
    const float* __restrict__ qkv,                 // [tokens, (heads + 2*kv_heads) * head_dim]
    const __nv_bfloat16* __restrict__ k_cache,     // [slots, kv_heads, head_dim]
    const __nv_bfloat16* __restrict__ v_cache,
    const unsigned int* __restrict__ block_tables, // [blocks, seqs]: block j of sequence s at j·seqs + s
    const unsigned int* __restrict__ tiles,        // [tiles, 3]: first token, token count, sequence
    const unsigned int* __restrict__ token_pos,    // [tokens]: each token's position in its sequence
    int tokens, int seqs, int heads, int kv_heads, int passes, int block_size, float scale) {
    constexpr int head_dim = 32 * DIMS;
    // Key rows in bf16 with one spare word: an odd stride in words, so the
    // 32 lanes reading 32 keys' same dimensions hit 32 banks.
    constexpr int k_stride = head_dim + 2;
    extern __shared__ float shared[];
    float* q = shared;                                                                      // [ROWS_PER_BLOCK, head_dim]
    float* weights = q + ROWS_PER_BLOCK * head_dim;                                         // [warps, 32]
    __nv_bfloat16* k_tile = reinterpret_cast<__nv_bfloat16*>(weights + ATTENTION_THREADS);  // [KEY_TILE, k_stride]
    __nv_bfloat16* v_tile = k_tile + KEY_TILE * k_stride;                                   // [KEY_TILE, head_dim]

    const int group = heads / kv_heads;
    const int kv_head = blockIdx.y / passes, pass = blockIdx.y % passes;
    const unsigned int* tile = tiles + 3 * blockIdx.x;
    const int first = tile[0], count = tile[1], seq = tile[2];
    const int rows = min(count * group - pass * ROWS_PER_BLOCK, ROWS_PER_BLOCK);
    if (rows <= 0) return;  // a short tile needs fewer passes (the whole block leaves)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int width = (heads + 2 * kv_heads) * head_dim;
    const unsigned int* table = block_tables + seq;  // its blocks, `seqs` words apart
    const size_t kv_stride = (size_t)kv_heads * head_dim;

    // This pass's query rows, scaled; row r of the pass is row pass·ROWS_PER_BLOCK + r of the tile.
    for (int i = threadIdx.x; i < rows * head_dim; i += blockDim.x) {
        const int r = pass * ROWS_PER_BLOCK + i / head_dim;
        q[i] = qkv[(size_t)(first + r / group) * width + (kv_head * group + r % group) * head_dim + i % head_dim] * scale;
    }
    // The tile's last token sees positions 0..=its own; the split takes its share, in whole key tiles.
    const int keys = token_pos[first + count - 1] + 1;
    const int per_split = ((keys + (int)gridDim.z - 1) / (int)gridDim.z + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
    const int begin = blockIdx.z * per_split, end = min(keys, begin + per_split);

    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][DIMS];
    int pos[ROWS_PER_WARP];  // the row's token position, or -1 past the pass's rows
    #pragma unroll
    for (int k = 0; k < ROWS_PER_WARP; ++k) {
        const int r = warp + 4 * k;
        m[k] = NEG_INF;
        l[k] = 0.0f;
        pos[k] = r < rows ? (int)token_pos[first + (pass * ROWS_PER_BLOCK + r) / group] : -1;
        #pragma unroll
        for (int i = 0; i < DIMS; ++i) acc[k][i] = 0.0f;
    }

    for (int base = begin; base < end; base += KEY_TILE) {
        __syncthreads();  // the last tile is used up (and, the first time, q is written)
        // The tile's key and value rows in 16-byte pieces; keys past `end` are zeros.
        constexpr int pieces = head_dim / 8;
        for (int c = threadIdx.x; c < KEY_TILE * pieces; c += blockDim.x) {
            const int j = c / pieces, part = c % pieces, key = base + j;
            uint4 k_piece = make_uint4(0, 0, 0, 0), v_piece = make_uint4(0, 0, 0, 0);
            if (key < end) {
                const size_t slot = (size_t)table[(size_t)(key / block_size) * seqs] * block_size + key % block_size;
                const size_t at = slot * kv_stride + (size_t)kv_head * head_dim + part * 8;
                k_piece = *reinterpret_cast<const uint4*>(k_cache + at);
                v_piece = *reinterpret_cast<const uint4*>(v_cache + at);
            }
            unsigned int* k_words = reinterpret_cast<unsigned int*>(k_tile + j * k_stride + part * 8);
            k_words[0] = k_piece.x;
            k_words[1] = k_piece.y;
            k_words[2] = k_piece.z;
            k_words[3] = k_piece.w;
            *reinterpret_cast<uint4*>(v_tile + j * head_dim + part * 8) = v_piece;
        }
        __syncthreads();
        const int key = base + lane;
        const __nv_bfloat162* my_key = reinterpret_cast<const __nv_bfloat162*>(k_tile + lane * k_stride);
        #pragma unroll
        for (int k = 0; k < ROWS_PER_WARP; ++k) {
            // Rows the tile is wholly after (causal) skip it; the test is the same on every lane.
            if (pos[k] < base) continue;
            const float* qr = q + (warp + 4 * k) * head_dim;
            float score = NEG_INF;
            if (key <= pos[k] && key < end) {
                score = 0.0f;
                for (int d = 0; d < head_dim / 2; ++d) {
                    const float2 kk = __bfloat1622float2(my_key[d]);
                    score += qr[2 * d] * kk.x + qr[2 * d + 1] * kk.y;
                }
            }
            float tile_max = score;
            for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, o));
            // Key `base` is at or before pos[k], so the tile's maximum is finite.
            const float new_m = fmaxf(m[k], tile_max);
            const float p = score == NEG_INF ? 0.0f : __expf(score - new_m);
            const float rescale = __expf(m[k] - new_m);
            float sum = p;
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
            l[k] = l[k] * rescale + sum;
            m[k] = new_m;
            weights[warp * 32 + lane] = p;
            __syncwarp();
            #pragma unroll
            for (int i = 0; i < DIMS; ++i) {
                float a = acc[k][i] * rescale;
                const int d = lane + 32 * i;
                for (int j = 0; j < KEY_TILE; ++j) a += weights[warp * 32 + j] * __bfloat162float(v_tile[j * head_dim + d]);
                acc[k][i] = a;
            }
            __syncwarp();
        }
    }

    // Every row of the pass is written, also where this split held none of its keys.
    #pragma unroll
    for (int k = 0; k < ROWS_PER_WARP; ++k) {
        const int r = warp + 4 * k;
        if (r >= rows) continue;
        const int tr = pass * ROWS_PER_BLOCK + r;
        const size_t row = (size_t)(first + tr / group) * heads + kv_head * group + tr % group;
        if (gridDim.z == 1) {
            #pragma unroll
            for (int i = 0; i < DIMS; ++i) out[row * head_dim + lane + 32 * i] = acc[k][i] / l[k];
        } else {
            float* at = partial + ((size_t)blockIdx.z * tokens * heads + row) * (head_dim + 2);
            #pragma unroll
            for (int i = 0; i < DIMS; ++i) at[lane + 32 * i] = acc[k][i];
            if (lane == 0) {
                at[head_dim] = m[k];
                at[head_dim + 1] = l[k];
            }
        }
    }
}

#define PAGED_ATTENTION(dims)                                                                                             \
    extern "C" __global__ void __launch_bounds__(ATTENTION_THREADS) paged_attention_bf16_d##dims(                      \
        float* __restrict__ out, float* __restrict__ partial, const float* __restrict__ qkv,                            \
        const __nv_bfloat16* __restrict__ k_cache, const __nv_bfloat16* __restrict__ v_cache,                           \
        const unsigned int* __restrict__ block_tables, const unsigned int* __restrict__ tiles,                           \
        const unsigned int* __restrict__ token_pos, int tokens, int seqs, int heads, int kv_heads, int passes,            \
        int block_size, float scale) {                                                                                   \
        paged_attention<dims / 32>(out, partial, qkv, k_cache, v_cache, block_tables, tiles, token_pos, tokens,       \
                                   seqs, heads, kv_heads, passes, block_size, scale);                                     \
    }

PAGED_ATTENTION(32)
PAGED_ATTENTION(64)
PAGED_ATTENTION(128)

// Merges the splits of each (token, head) row: out = Σ e^(m_s − M) acc_s /
// Σ e^(m_s − M) l_s, M the largest m_s (a split that held none of the
// row's keys has m_s = −∞ and adds nothing). One warp per row.
extern "C" __global__ void attention_combine_f32(
    float* __restrict__ out,            // [rows, head_dim]
    const float* __restrict__ partial,  // [splits, rows, head_dim + 2]
    int rows, int splits, int head_dim) {
    const size_t row = blockIdx.x;
    const size_t stride = (size_t)rows * (head_dim + 2);
    float best = NEG_INF;
    for (int s = 0; s < splits; ++s) best = fmaxf(best, partial[s * stride + row * (head_dim + 2) + head_dim]);
    float total = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float* at = partial + s * stride + row * (head_dim + 2);
        total += at[head_dim] == NEG_INF ? 0.0f : __expf(at[head_dim] - best) * at[head_dim + 1];
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float* at = partial + s * stride + row * (head_dim + 2);
            if (at[head_dim] != NEG_INF) sum += __expf(at[head_dim] - best) * at[d];
        }
        out[row * head_dim + d] = sum / total;
    }
}
