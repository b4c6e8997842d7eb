// Paged attention for prefill, chunked prefill and decode alike, read
// straight from the paged KV cache through each sequence's block table,
// on the tensor cores.
//
// Why this shape: with GQA each key and value serves a group of query
// heads (7 for Qwen2.5-7B), so attention does ~7 multiply-adds per byte
// of cache it reads. Scalar code that feeds each one from shared memory
// tops out near a third of an H100's bandwidth; tensor cores do the
// products (bf16 operands, f32 sums), and the cache is streamed into
// shared memory by cp.async, two key tiles in flight, with no registers
// held. A block takes one KV head for a tile of up to 8 consecutive tokens
// of one sequence (listed by the host: src/backend/cuda/step.rs); its
// query rows, token-major (row r: token r / group, head r % group), are
// 16 a warp, each warp's in one 16-row fragment. A decode step has one
// token a sequence, so a block of one warp and the group's heads as its
// rows (padded to 16), and too few blocks to keep a GPU's memory busy:
// a sequence's keys are also split across blocks (flash-decoding). Each
// split writes its rows' partial softmax state, and the split of a block
// group that finishes last merges them into the output (a counter a
// group, which that split sets back to zero for the next launch); with
// one split a block writes the output itself.
//
// A warp's tile of 32 keys: S = Q·Kᵀ on the tensor cores into shared
// memory; two lanes a row mask it (causal, and the split's end), update
// the row's running maximum and sum (online softmax, in base 2: the query
// is scaled by log2 e) and write P in bf16; the output accumulators are
// rescaled by their rows' factors (which element is in which row comes
// from a fragment loaded from a matrix of row numbers, so no lane layout
// is assumed); then O += P·V on the tensor cores.
//
// Layout: grid (tiles, kv_heads * passes, splits) of 32 · warps threads
// (1 to 4 warps); a pass takes 16 · warps rows of the tile's.
#include <cuda_pipeline_primitives.h>
#include <mma.h>

using namespace nvcuda;

#define KEY_TILE 32
#define STAGES 2
#define WARP_ROWS 16
#define MAX_WARPS 4
#define LOG2_E 1.4426950408889634f
#define MERGE_BATCH 8

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Accumulator;

// Shared memory of a block, in bytes (the host's copy of these sums is
// `shared_bytes` in src/backend/cuda/attention.rs). Rows are padded by 16
// bytes so a fragment's 16 rows start in different banks.
template <int HEAD_DIM>
struct Layout {
    static constexpr int kv_stride = HEAD_DIM + 8;  // bf16, a key or value row
    static constexpr int s_stride = KEY_TILE + 4;   // f32, a row of scores
    static constexpr int p_stride = KEY_TILE + 8;   // bf16, a row of probabilities
    static constexpr int o_stride = HEAD_DIM + 4;   // f32, a row of the output
    // The stages: [STAGES][keys, values][KEY_TILE][kv_stride] bf16.
    static constexpr int stage_bytes = 2 * KEY_TILE * kv_stride * 2;
    static constexpr int row_numbers = STAGES * stage_bytes;  // [16][16] f32, element (i, j) = i
    static constexpr int warp_parts = row_numbers + 16 * 16 * 4;
    // A warp's part: its query rows in bf16 (before the first tile), then
    // S [16][s_stride] f32 and P [16][p_stride] bf16; then its rows'
    // rescale factors and sums (f32, 16 each).
    static constexpr int q_bytes = WARP_ROWS * kv_stride * 2;
    static constexpr int sp_bytes = WARP_ROWS * s_stride * 4 + WARP_ROWS * p_stride * 2;
    static constexpr int scratch_bytes = q_bytes > sp_bytes ? q_bytes : sp_bytes;
    static constexpr int warp_bytes = scratch_bytes + 2 * WARP_ROWS * 4;
    // After the last tile each warp's output rows go out through the stages.
    static_assert(MAX_WARPS * WARP_ROWS * o_stride * 4 <= STAGES * stage_bytes, "the output fits over the stages");
    static_assert(scratch_bytes % 32 == 0 && warp_bytes % 32 == 0, "fragments stay 256-bit aligned");
};

// Called by every thread of a split's block once its rows' partial state
// is written (`partial`: [splits, rows, head_dim] sums of weighted values,
// then [splits, rows, 2] base-2 maxima and sums): the split of the block's
// group that finishes last merges the group's rows, out = Σ 2^(m_s − M)
// acc_s / Σ 2^(m_s − M) l_s with M the largest m_s (a split that held
// none of a row's keys has m_s = −∞ and adds nothing).
//
// A decode block is one warp with all of a KV head's query rows, and
// their columns from every split (16 KB a row for Qwen2.5-7B at 32
// splits) are more than a warp's registers can have in flight. So they go
// into the stages (free once the rows are written) by cp.async, as many
// rows ahead as fit: the block waits a round trip to L2 for each
// stage-full of rows, not for each 16 splits of each row. The block takes
// a row at a time: warp 0 weighs its splits (a lane a split, its state
// loaded a row ahead) while its columns land, then each thread sums four
// columns over the splits in split order, reading MERGE_BATCH splits'
// weights and columns before it adds any.
template <int HEAD_DIM, typename OutRow>
__device__ void merge_splits(float* __restrict__ out, __nv_bfloat16* __restrict__ rounded, const float* __restrict__ partial,
                             unsigned int* __restrict__ arrivals, float* __restrict__ staged, int block_rows, int first_row,
                             size_t all_rows, OutRow out_row) {
    // Rows of every split's columns the stages hold (at least two at 32 splits).
    constexpr int capacity = Layout<HEAD_DIM>::row_numbers / 4;
    static_assert(capacity >= 2 * 32 * HEAD_DIM, "the stages hold two rows of 32 splits");
    __shared__ bool merges;
    __shared__ float weights[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, splits = gridDim.z;
    __threadfence();  // this thread's partial rows are visible to every block before the count moves
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* count = arrivals + blockIdx.y * gridDim.x + blockIdx.x;
        merges = atomicAdd(count, 1u) == splits - 1;
        if (merges) *count = 0;  // for the next launch
    }
    __syncthreads();
    if (!merges) return;
    __threadfence();
    const float* state = partial + splits * all_rows * HEAD_DIM;
    const int row_floats = splits * HEAD_DIM, slots = min(block_rows, capacity / row_floats);
    // Queues row r's columns of every split into its slot, and closes a
    // copy group either way, so that waits count rows.
    auto fetch = [&](int r) {
        if (r < block_rows) {
            const size_t row = out_row(first_row + r);
            float* to = staged + (r % slots) * row_floats;
            for (int i = threadIdx.x; i < row_floats / 4; i += blockDim.x) {
                const int split = i / (HEAD_DIM / 4), d = 4 * (i % (HEAD_DIM / 4));
                __pipeline_memcpy_async(to + split * HEAD_DIM + d, partial + (split * all_rows + row) * HEAD_DIM + d, 16);
            }
        }
        __pipeline_commit();
    };
    // Row r's softmax state of this lane's split.
    auto state_of = [&](int r, float& m, float& l) {
        m = NEG_INF;
        l = 0.0f;
        if (r >= block_rows || lane >= splits) return;
        const size_t row = out_row(first_row + r);
        m = __ldcg(state + (lane * all_rows + row) * 2);
        l = __ldcg(state + (lane * all_rows + row) * 2 + 1);
    };
    float next_m, next_l;
    if (threadIdx.x < 32) state_of(0, next_m, next_l);
    for (int r = 0; r < slots; ++r) fetch(r);
    for (int r = 0; r < block_rows; ++r) {
        if (threadIdx.x < 32) {
            const float m = next_m, l = next_l;
            state_of(r + 1, next_m, next_l);
            const float best = warp_max(m);
            const float weight = m == NEG_INF ? 0.0f : exp2f(m - best);
            const float sum = warp_sum(weight * l);
            weights[lane] = weight;
            if (lane == 0) total = sum;
        }
        __pipeline_wait_prior(slots - 1);  // this thread's copies of row r have landed
        __syncthreads();                    // and every thread's, and the row's weights are written
        const float* columns = staged + (r % slots) * row_floats;
        const size_t row = out_row(first_row + r);
        for (int d = 4 * threadIdx.x; d < HEAD_DIM; d += 4 * blockDim.x) {
            float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int first = 0; first < splits; first += MERGE_BATCH) {
                float w[MERGE_BATCH];
                float4 a[MERGE_BATCH];
#pragma unroll
                for (int k = 0; k < MERGE_BATCH; ++k) {
                    const int split = min(first + k, splits - 1);
                    w[k] = first + k < splits ? weights[split] : 0.0f;
                    a[k] = *reinterpret_cast<const float4*>(columns + split * HEAD_DIM + d);
                }
#pragma unroll
                for (int k = 0; k < MERGE_BATCH; ++k) {
                    if (w[k] == 0.0f) continue;
                    sum.x += w[k] * a[k].x;
                    sum.y += w[k] * a[k].y;
                    sum.z += w[k] * a[k].z;
                    sum.w += w[k] * a[k].w;
                }
            }
            const float4 value = make_float4(sum.x / total, sum.y / total, sum.z / total, sum.w / total);
            *reinterpret_cast<float4*>(out + row * HEAD_DIM + d) = value;
            if (rounded) {
                __nv_bfloat162* pair = reinterpret_cast<__nv_bfloat162*>(rounded + row * HEAD_DIM + d);
                pair[0] = __floats2bfloat162_rn(value.x, value.y);
                pair[1] = __floats2bfloat162_rn(value.z, value.w);
            }
        }
        __syncthreads();  // every thread is done with the slot and the weights before they are refilled
        fetch(r + slots);
    }
}

template <int HEAD_DIM>
__device__ void paged_attention(
    float* __restrict__ out,                       // [tokens, heads * head_dim]: written with one split
    __nv_bfloat16* __restrict__ rounded,           // where given, `out` rounded to bf16 too
    float* __restrict__ partial,                   // with more splits: their state (merge_splits)
    unsigned int* __restrict__ arrivals,           // with more splits: a zero a block group, counting finished splits
    const float* __restrict__ qkv,                 // [tokens, (heads + 2*kv_heads) * head_dim]
    const __nv_bfloat16* __restrict__ k_cache,     // [slots, kv_heads, head_dim]
    const __nv_bfloat16* __restrict__ v_cache,
    const unsigned int* __restrict__ block_tables, // [blocks, seqs]: block j of sequence s at j·seqs + s
    const unsigned int* __restrict__ tiles,        // [tiles, 3]: first token, token count, sequence
    const unsigned int* __restrict__ token_pos,    // [tokens]: each token's position in its sequence
    int tokens, int seqs, int heads, int kv_heads, int passes, int block_size, float scale) {
    typedef Layout<HEAD_DIM> L;
    constexpr int SLICES = HEAD_DIM / 16;
    extern __shared__ __align__(128) unsigned char shared[];
    __nv_bfloat16* stages = reinterpret_cast<__nv_bfloat16*>(shared);
    float* row_numbers = reinterpret_cast<float*>(shared + L::row_numbers);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    unsigned char* mine = shared + L::warp_parts + warp * L::warp_bytes;
    __nv_bfloat16* q_rows = reinterpret_cast<__nv_bfloat16*>(mine);
    float* s = reinterpret_cast<float*>(mine);
    __nv_bfloat16* p = reinterpret_cast<__nv_bfloat16*>(mine + WARP_ROWS * L::s_stride * 4);
    float* rescale = reinterpret_cast<float*>(mine + L::scratch_bytes);
    float* sums = rescale + WARP_ROWS;

    const int group = heads / kv_heads;
    const int kv_head = blockIdx.y / passes, pass = blockIdx.y % passes;
    const unsigned int* tile = tiles + 3 * blockIdx.x;
    const int first = tile[0], count = tile[1], seq = tile[2];
    // The pass's rows, and this warp's (none: it only helps load).
    const int first_row = pass * WARP_ROWS * warps;
    const int block_rows = min(count * group - first_row, WARP_ROWS * warps);
    if (block_rows <= 0) return;  // a short tile needs fewer passes (the whole block leaves)
    const int warp_first = first_row + WARP_ROWS * warp;
    const int warp_rows = max(0, min(block_rows - WARP_ROWS * warp, WARP_ROWS));
    const int width = (heads + 2 * kv_heads) * HEAD_DIM;
    const unsigned int* table = block_tables + seq;  // its blocks, `seqs` words apart
    const size_t kv_row = (size_t)kv_heads * HEAD_DIM;

    // The tile's last token sees positions 0..=its own; the split takes its share, in whole key tiles.
    const int keys = token_pos[first + count - 1] + 1;
    const int per_split = ((keys + (int)gridDim.z - 1) / (int)gridDim.z + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
    const int begin = blockIdx.z * per_split, end = min(keys, begin + per_split);
    const int key_tiles = end > begin ? (end - begin + KEY_TILE - 1) / KEY_TILE : 0;

    // Queues key tile `t` into its stage in 16-byte copies (keys past `end`
    // are zeros: a zero probability times a stale value could be NaN), and
    // closes a copy group either way, so that waits count tiles. A thread
    // always copies the same 16 bytes of a row (a block's threads are a
    // multiple of a row's pieces), for every few keys. Lane j finds key j's
    // cache row, once; the lanes copying its pieces take it by shuffle (the
    // lanes of a warp make as many trips: KEY_TILE is a multiple of the
    // keys a warp takes at once).
    constexpr int pieces = HEAD_DIM / 8;
    const int part = threadIdx.x % pieces, keys_at_once = blockDim.x / pieces;
    const __nv_bfloat16* k_from = k_cache + (size_t)kv_head * HEAD_DIM + part * 8;
    const __nv_bfloat16* v_from = v_cache + (size_t)kv_head * HEAD_DIM + part * 8;
    auto fetch = [&](int t) {
        if (t < key_tiles) {
            __nv_bfloat16* k_to = stages + (t % STAGES) * 2 * KEY_TILE * L::kv_stride + part * 8;
            __nv_bfloat16* v_to = k_to + KEY_TILE * L::kv_stride;
            const int base = begin + t * KEY_TILE, my_key = base + lane;
            const unsigned int my_slot = my_key < end ? table[(size_t)(my_key / block_size) * seqs] * block_size + my_key % block_size : 0;
            for (int j = threadIdx.x / pieces; j < KEY_TILE; j += keys_at_once) {
                const size_t row = __shfl_sync(0xffffffff, my_slot, j) * kv_row;
                if (base + j < end) {
                    __pipeline_memcpy_async(k_to + j * L::kv_stride, k_from + row, 16);
                    __pipeline_memcpy_async(v_to + j * L::kv_stride, v_from + row, 16);
                } else {
                    *reinterpret_cast<uint4*>(k_to + j * L::kv_stride) = make_uint4(0, 0, 0, 0);
                    *reinterpret_cast<uint4*>(v_to + j * L::kv_stride) = make_uint4(0, 0, 0, 0);
                }
            }
        }
        __pipeline_commit();
    };
    for (int t = 0; t < STAGES; ++t) fetch(t);

    // While the first tiles load: the warp's query rows, scaled (by log2 e too), in bf16.
    for (int i = lane; i < WARP_ROWS * HEAD_DIM; i += 32) {
        const int r = i / HEAD_DIM, d = i % HEAD_DIM, row = warp_first + r;
        const float q = r < warp_rows ? qkv[(size_t)(first + row / group) * width + (kv_head * group + row % group) * HEAD_DIM + d] : 0.0f;
        q_rows[r * L::kv_stride + d] = __float2bfloat16(q * scale * LOG2_E);
    }
    for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) row_numbers[i] = (float)(i / 16);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> q[SLICES];
    #pragma unroll
    for (int k = 0; k < SLICES; ++k) wmma::load_matrix_sync(q[k], q_rows + 16 * k, L::kv_stride);
    Accumulator rows, o[SLICES];
    wmma::load_matrix_sync(rows, row_numbers, 16, wmma::mem_row_major);
    #pragma unroll
    for (int n = 0; n < SLICES; ++n) wmma::fill_fragment(o[n], 0.0f);

    // Lanes 2r and 2r + 1 keep row r's softmax state, each for half the tile's keys.
    const int my_row = lane >> 1, half = lane & 1;
    const int my_pos = my_row < warp_rows ? (int)token_pos[first + (warp_first + my_row) / group] : -1;
    const int warp_last = warp_rows > 0 ? (int)token_pos[first + (warp_first + warp_rows - 1) / group] : -1;
    float m = NEG_INF, l = 0.0f;

    for (int t = 0; t < key_tiles; ++t) {
        __pipeline_wait_prior(STAGES - 1);  // this thread's copies of tile t have landed
        __syncthreads();                    // and every thread's (the first time: every lane has its query fragments before S overwrites them)
        const int base = begin + t * KEY_TILE;
        const __nv_bfloat16* k_tile = stages + (t % STAGES) * 2 * KEY_TILE * L::kv_stride;
        const __nv_bfloat16* v_tile = k_tile + KEY_TILE * L::kv_stride;
        // A warp whose rows all come before the tile (causal) skips it.
        if (warp_rows > 0 && base <= warp_last) {
            #pragma unroll
            for (int n = 0; n < KEY_TILE / 16; ++n) {
                Accumulator scores;
                wmma::fill_fragment(scores, 0.0f);
                #pragma unroll
                for (int k = 0; k < SLICES; ++k) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> key;
                    wmma::load_matrix_sync(key, k_tile + 16 * n * L::kv_stride + 16 * k, L::kv_stride);
                    wmma::mma_sync(scores, q[k], key, scores);
                }
                wmma::store_matrix_sync(s + 16 * n, scores, L::s_stride, wmma::mem_row_major);
            }
            __syncwarp();
            // The lane's half row of scores, −∞ where masked (causal, or past the split).
            const int column = half * (KEY_TILE / 2);
            float score[KEY_TILE / 2];
            float tile_max = NEG_INF;
            #pragma unroll
            for (int j = 0; j < KEY_TILE / 2; ++j) {
                const int key = base + column + j;
                score[j] = key <= my_pos && key < end ? s[my_row * L::s_stride + column + j] : NEG_INF;
                tile_max = fmaxf(tile_max, score[j]);
            }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
            // A row with no key yet (or a padding row) stays at −∞ and adds nothing.
            const float new_m = fmaxf(m, tile_max);
            const float factor = new_m == NEG_INF ? 1.0f : exp2f(m - new_m);
            float sum = 0.0f;
            #pragma unroll
            for (int j = 0; j < KEY_TILE / 2; ++j) {
                const __nv_bfloat16 pj = __float2bfloat16(score[j] == NEG_INF ? 0.0f : exp2f(score[j] - new_m));
                sum += __bfloat162float(pj);
                p[my_row * L::p_stride + column + j] = pj;
            }
            sum += __shfl_xor_sync(0xffffffff, sum, 1);
            l = l * factor + sum;
            m = new_m;
            if (half == 0) rescale[my_row] = factor;
            __syncwarp();
            float by_element[Accumulator::num_elements];
            #pragma unroll
            for (int e = 0; e < Accumulator::num_elements; ++e) by_element[e] = rescale[(int)rows.x[e]];
            #pragma unroll
            for (int n = 0; n < SLICES; ++n) {
                #pragma unroll
                for (int e = 0; e < Accumulator::num_elements; ++e) o[n].x[e] *= by_element[e];
            }
            #pragma unroll
            for (int k = 0; k < KEY_TILE / 16; ++k) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> probs;
                wmma::load_matrix_sync(probs, p + 16 * k, L::p_stride);
                #pragma unroll
                for (int n = 0; n < SLICES; ++n) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> value;
                    wmma::load_matrix_sync(value, v_tile + 16 * k * L::kv_stride + 16 * n, L::kv_stride);
                    wmma::mma_sync(o[n], probs, value, o[n]);
                }
            }
        }
        __syncthreads();  // every warp is done with the stage before it refills
        fetch(t + STAGES);
    }

    // Every row of the warp is written, also where this split held none of
    // its keys, through the stages: the loop's last barrier freed them
    // (with no tile, nothing used them).
    const size_t all_rows = (size_t)tokens * heads;
    auto out_row = [&](int row_in_tile) {
        return (size_t)(first + row_in_tile / group) * heads + kv_head * group + row_in_tile % group;
    };
    if (warp_rows > 0) {
        float* o_rows = reinterpret_cast<float*>(shared) + warp * WARP_ROWS * L::o_stride;
        #pragma unroll
        for (int n = 0; n < SLICES; ++n) wmma::store_matrix_sync(o_rows + 16 * n, o[n], L::o_stride, wmma::mem_row_major);
        if (half == 0) {
            rescale[my_row] = m;  // the factors' room now holds the maxima
            sums[my_row] = l;
        }
        __syncwarp();
        float* split_acc = partial + blockIdx.z * all_rows * HEAD_DIM;
        float* split_state = partial + gridDim.z * all_rows * HEAD_DIM + blockIdx.z * all_rows * 2;
        for (int i = lane; i < warp_rows * HEAD_DIM; i += 32) {
            const int r = i / HEAD_DIM, d = i % HEAD_DIM;
            const size_t row = out_row(warp_first + r);
            const float acc = o_rows[r * L::o_stride + d];
            if (gridDim.z == 1) {
                const float value = acc / sums[r];
                out[row * HEAD_DIM + d] = value;
                if (rounded) rounded[row * HEAD_DIM + d] = __float2bfloat16(value);
            } else {
                split_acc[row * HEAD_DIM + d] = acc;
                if (d == 0) {
                    split_state[2 * row] = rescale[r];
                    split_state[2 * row + 1] = sums[r];
                }
            }
        }
    }
    if (gridDim.z > 1) {
        float* staged = reinterpret_cast<float*>(shared);
        merge_splits<HEAD_DIM>(out, rounded, partial, arrivals, staged, block_rows, first_row, all_rows, out_row);
    }
}
#define PAGED_ATTENTION(dims)                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * MAX_WARPS) paged_attention_bf16_d##dims(                         \
        float* __restrict__ out, __nv_bfloat16* __restrict__ rounded, float* __restrict__ partial,                      \
        unsigned int* __restrict__ arrivals,                                                                              \
        const float* __restrict__ qkv, const __nv_bfloat16* __restrict__ k_cache,                                       \
        const __nv_bfloat16* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,                        \
        const unsigned int* __restrict__ tiles, const unsigned int* __restrict__ token_pos, int tokens, int seqs,        \
        int heads, int kv_heads, int passes, int block_size, float scale) {                                              \
        begin_after_previous_kernels();                                                                                 \
        paged_attention<dims>(out, rounded, partial, arrivals, qkv, k_cache, v_cache, block_tables, tiles, token_pos, tokens,    \
                              seqs, heads, kv_heads, passes, block_size, scale);                                         \
    }

PAGED_ATTENTION(32)
PAGED_ATTENTION(64)
PAGED_ATTENTION(128)
