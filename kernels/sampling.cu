// Sampling on the device, so a step's logits never leave the GPU: a
// block applies a row's bias and penalties in place, then takes the
// argmax (greedy) or draws a token from the kept set that
// src/sampling/choose.rs defines (its host reference). A row of a step of
// few rows may split over several blocks (splits_of). Where the host sorts,
// this finds each cut as a threshold by radix selection over the keys
// (four passes of 256-bin histograms), and the ties at a threshold and the
// draw by a search in id order. Sums are in double, as on the host, so the
// two agree except where a draw lands within rounding of a boundary.
//
// A histogram's bins are shared doubles, whose atomic add is a
// compare-and-swap loop: a warp whose 32 keys fall in one bin retries 32
// times, and the first pass of a row's keys puts nearly all of them in
// the few bins of their sign and exponent. So a cut first finds the
// narrowest band below the best scaled logit (bands of 40 × 2^-7 up to
// the floor's 40) that holds what it keeps, in one pass with a lane's
// sums in registers, and the histograms count only the keys in that band:
// a top-k of 20 (Qwen2.5's default) counts a few dozen keys, not 151,936.
// A band's test, and the floor's, is made on the logits themselves,
// against the least logit whose scaled value passes it (found once a row),
// so these passes divide nothing.
// Where top-k's band holds at most CANDIDATES keys, they are gathered into
// shared memory instead, and both cuts are found there by ranking them
// (what top-p weighs lies within top-k), and the draw walks the kept ones
// there in id order. So is top-p's band, for a row with no top-k, with
// the row's total mass.
//
// The passes over a row and the selections on them are in row_select.cuh.

// One row's parameters, packed by src/backend/cuda/sampling.rs (12 words).
struct RowParams {
    float temperature;
    unsigned int top_k;
    float top_p;
    float min_p;
    float repetition_penalty;
    float presence_penalty;
    float frequency_penalty;
    float uniform;
    unsigned int adjust_begin;  // this row's adjustment words: [adjust_begin, adjust_end)
    unsigned int adjust_end;
    unsigned int adjust_width;  // words an adjustment: ADJUSTMENT_WORDS, or 1 (REPEATED_IDS)
    unsigned int coming;        // the row of `coming` whose token joins the sequence first, or NO_COMING
};

// An adjustment's words: a token, its bias, and its counts: the times it
// was generated, and (the REPEATED bit) whether HF's repetition penalty
// applies to it. A row whose adjustments all have no bias, no count and
// the repetition penalty (Qwen2.5's default sampling) sends their tokens
// alone, a word each.
#define ADJUSTMENT_WORDS 3
#define REPEATED_IDS 1

#define NO_COMING 0xffffffffu
#define REPEATED 0x80000000u
#define GREEDY_BELOW 1e-5f

// Whether a row's top-k cuts anything.
__device__ __forceinline__ bool has_top_k(const RowParams& p, int vocab) {
    return p.top_k > 0 && p.top_k < (unsigned int)vocab;
}

#include "row_select.cuh"

// logit + bias, less presence + frequency × generated where generated;
// then, if repeated, HF's repetition penalty. Rounded at each operation
// as src/sampling/choose.rs computes it (no multiply-add).
__device__ __forceinline__ float adjusted(const RowParams& p, float logit, float bias, unsigned int generated,
                                          bool repeated) {
    const float penalty = __fadd_rn(p.presence_penalty, __fmul_rn(p.frequency_penalty, (float)generated));
    float s = logit + (generated == 0 ? bias : bias - penalty);
    if (repeated) s = s > 0.0f ? s / p.repetition_penalty : s * p.repetition_penalty;
    return s;
}

// One adjustment's words, with its token's logit (a token of NO_COMING
// for a slot past the row's adjustments).
struct Listed {
    unsigned int token;
    float bias;
    unsigned int counts;
    float logit;
};

// Adjustments a thread has in flight.
#define ADJUSTING 4

// Calls f(id, logit, adjusted) for each id of `owned` that row p's
// adjustments change, with its logit in the row and what it is adjusted
// to: f may store that in place (a block of a split row adjusts its
// part), or count it instead (the parts of a split row that weighs_all,
// which read the row as it came). The token joining the sequence first
// (a step planned before it reached the host) counts as generated once
// more, and as repeated: its own adjustment where the row lists it, else
// a new one. A thread loads
// ADJUSTING adjustments' words, then their logits, then calls f (a row's
// ids are distinct, so no load reads what another's store writes): one at
// a time, 2,048 adjustments on 512 threads were 4 pairs of dependent
// round trips to L2. Every thread calls it; it returns after a barrier
// that follows every call of f.
template <typename F>
__device__ void for_each_adjusted(const float* row, const RowParams& p, const unsigned int* adjustments,
                                  const unsigned int* coming, Span owned, F f) {
    auto owns = [&](unsigned int token) { return token >= (unsigned int)owned.begin && token < (unsigned int)owned.end; };
    const unsigned int joining = p.coming == NO_COMING ? NO_COMING : coming[p.coming];
    // Every thread read the same word, so all of them wait here or none:
    // a row without a joining token skips the barrier.
    const bool joins = owns(joining);
    __shared__ int joining_listed;
    if (joins) {
        if (threadIdx.x == 0) joining_listed = 0;
        __syncthreads();
    }
    const unsigned int width = p.adjust_width;
    const bool ids = width == REPEATED_IDS;
    const int count = (int)((p.adjust_end - p.adjust_begin) / width);
    for (int base = threadIdx.x; base < count; base += ADJUSTING * blockDim.x) {
        Listed a[ADJUSTING];
#pragma unroll
        for (int u = 0; u < ADJUSTING; ++u) {
            const int e = base + u * (int)blockDim.x;
            const unsigned int j = p.adjust_begin + (unsigned int)e * width;
            a[u] = {NO_COMING, 0.0f, REPEATED, 0.0f};
            if (e < count) a[u].token = adjustments[j];
            if (e < count && !ids) a[u].bias = __uint_as_float(adjustments[j + 1]);
            if (e < count && !ids) a[u].counts = adjustments[j + 2];
        }
#pragma unroll
        for (int u = 0; u < ADJUSTING; ++u) {
            if (owns(a[u].token)) a[u].logit = row[a[u].token];
        }
#pragma unroll
        for (int u = 0; u < ADJUSTING; ++u) {
            if (!owns(a[u].token)) continue;
            const bool now = a[u].token == joining;
            if (now) joining_listed = 1;
            const unsigned int generated = (a[u].counts & ~REPEATED) + now;
            f(a[u].token, a[u].logit, adjusted(p, a[u].logit, a[u].bias, generated, (a[u].counts & REPEATED) || now));
        }
    }
    __syncthreads();
    if (joins && !joining_listed) {
        if (threadIdx.x == 0) f(joining, row[joining], adjusted(p, row[joining], 0.0f, 1, true));
        __syncthreads();
    }
}

// Applies a row's adjustments to its ids in `owned`, in place.
__device__ void adjust_row(float* row, const RowParams& p, const unsigned int* adjustments, const unsigned int* coming,
                           Span owned) {
    for_each_adjusted(row, p, adjustments, coming, owned, [&](unsigned int token, float, float s) { row[token] = s; });
}

// The draw where the gathered candidates hold every kept token (they hold
// top-k's): the kept ones ranked by id, then summed and walked by one
// thread in that order, as the host does, instead of another pass over
// the row. NOT_FOUND where none is kept.
template <typename Kept, typename Weight>
__device__ int draw_gathered(Candidates& c, Kept kept, Weight weight, float uniform) {
    for (int a = threadIdx.x; a < c.count; a += blockDim.x) c.key[a] = kept((int)c.id[a], c.x[a]) ? 1u : 0u;
    const int members = order_candidates(c);
    __shared__ int token;
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int m = 0; m < members; ++m) total += (double)weight(c.x[c.order[m]]);
        double target = (double)uniform * total;
        int m = 0;
        while (m < members - 1 && (target -= (double)weight(c.x[c.order[m]])) >= 0.0) ++m;
        token = members > 0 ? (int)c.id[c.order[m]] : NOT_FOUND;
    }
    __syncthreads();
    return token;
}

// The draw among candidates that hold every token the row keeps (so its
// top_k best, where it has a top-k): top-k's cut ranks them by scaled
// logit, min-p weighs them, top-p's cut ranks the rest by weight (the most
// likely, ties to the lower id, until their mass reaches top_p of the
// total, both summed in that order), and the draw walks the kept ones in
// id order. `max` is the row's best scaled logit and `floor` the least
// logit whose scaled value lies within NEGLIGIBLE of it. The total is the
// candidates' where they hold all the row weighs before top-p (its
// top-k), else `row_mass` (a row with no top-k, whose candidates hold
// top-p's band). NOT_FOUND where none is kept.
__device__ int draw_among(Candidates& c, const RowParams& p, float max, float floor, const double* row_mass) {
    const float t = p.temperature;
    auto score_key = [&](float x) { return order_key(x / t); };
    auto weight = [&](float x) { return expf(x / t - max); };
    for (int a = threadIdx.x; a < c.count; a += blockDim.x) c.key[a] = score_key(c.x[a]);
    const int ranked = order_candidates(c);
    unsigned int k_pivot = 0;
    int k_cutoff = NOT_FOUND;
    if (p.top_k > 0 && ranked >= (int)p.top_k) {
        const int kth = c.order[p.top_k - 1];
        k_pivot = c.key[kth];
        k_cutoff = (int)c.id[kth];
    }
    __syncthreads();
    auto before_top_p = [&](int i, float x) {
        const unsigned int k = score_key(x);
        return x >= floor && (k > k_pivot || (k == k_pivot && i <= k_cutoff)) && weight(x) >= p.min_p;
    };
    auto weight_key = [&](float x) { return __float_as_uint(weight(x)); };
    unsigned int p_pivot = 0;
    int p_cutoff = NOT_FOUND;
    if (p.top_p < 1.0f) {
        for (int a = threadIdx.x; a < c.count; a += blockDim.x) {
            const float x = c.x[a];
            c.key[a] = before_top_p((int)c.id[a], x) ? weight_key(x) : 0u;
        }
        const int members = order_candidates(c);
        __shared__ int last;
        if (threadIdx.x == 0) {
            double total = 0.0, running = 0.0;
            if (row_mass) {
                total = *row_mass;
            } else {
                for (int m = 0; m < members; ++m) total += (double)__uint_as_float(c.key[c.order[m]]);
            }
            const double need = (double)p.top_p * total;
            int m = 0;
            while (m < members - 1 && (running += (double)__uint_as_float(c.key[c.order[m]])) < need) ++m;
            last = members > 0 ? c.order[m] : -1;
        }
        __syncthreads();
        if (last >= 0) {
            p_pivot = c.key[last];
            p_cutoff = (int)c.id[last];
        }
        __syncthreads();
    }
    auto kept = [&](int i, float x) {
        if (!before_top_p(i, x)) return false;
        const unsigned int k = weight_key(x);
        return k > p_pivot || (k == p_pivot && i <= p_cutoff);
    };
    return draw_gathered(c, kept, weight, p.uniform);
}

// The lowest id of row[0, n) whose running sum of `kept_weight(i, x)` (a
// kept logit's weight, else 0) passes share × the total + extra
// (first_past), or, where rounding put that past the last kept id, that
// id (0 where none is kept).
template <typename KeptWeight>
__device__ int first_kept_past(const float* row, int n, KeptWeight kept_weight, double share, double extra) {
    auto kept_mass = [&](int i, float x) { return (double)kept_weight(i, x); };
    const int token = first_past(row, kept_mass, n, share, extra);
    if (token != NOT_FOUND) return token;
    __shared__ int last;
    if (threadIdx.x == 0) last = 0;
    __syncthreads();
    for_each_logit<COSTLY_LOADS>(row, n, [&](int i, float x) {
        if (kept_weight(i, x) > 0.0f) atomicMax(&last, i);
    });
    __syncthreads();
    return last;
}

// The draw among the row's logits at or above `least` (a band of at most
// CANDIDATES that holds every kept one), gathered into `c` (draw_among).
__device__ int draw_band(const float* row, int vocab, float least, Candidates& c, const RowParams& p, float max,
                         float floor, const double* row_mass) {
    gather(row, vocab, [&](float x) { return x >= least; }, c);
    return draw_among(c, p, max, floor, row_mass);
}

// The draw from a whole row among the ids `weighed` admits (it gives an
// id's weight, or 0 where the id is not kept before top-p: a kept weight
// is at least e^-40), less, with a top-p, those past its cut: the most
// likely (ties to the lower id) until their mass reaches `need`, all at
// or above `least` (a band that holds that mass), found by radix
// selection over the row. `weight` weighs a logit with no test.
template <typename Weighed, typename Weight>
__device__ int draw_kept(const float* row, int vocab, const RowParams& p, Weighed weighed, Weight weight, double need,
                         float least) {
    auto weight_key = [&](float x) { return __float_as_uint(weight(x)); };
    auto weighed_key = [&](int i, float x) { return __float_as_uint(weighed(i, x)); };
    unsigned int p_pivot = 0;
    int p_cutoff = NOT_FOUND;
    if (p.top_p < 1.0f) {
        auto counted = [&](int i, float x) { return x >= least ? (double)weighed(i, x) : 0.0; };
        p_pivot = select_from_top(row, weight_key, counted, vocab, need);
        const double tie = (double)__uint_as_float(p_pivot);
        p_cutoff = tie_cutoff(row, weighed_key, p_pivot, fmax(1.0, ceil(need / tie)), vocab);
    }
    auto kept_weight = [&](int i, float x) {
        const float w = weighed(i, x);
        const unsigned int k = __float_as_uint(w);
        return k > p_pivot || (k == p_pivot && i <= p_cutoff) ? w : 0.0f;
    };
    return first_kept_past(row, vocab, kept_weight, (double)p.uniform, 0.0);
}

// The draw from a whole (adjusted) row on one block. `band_from` is
// shared room for band_starts'.
__device__ int draw_row(const float* row, const RowParams& p, int vocab, Candidates& candidates, float* band_from) {
    const float t = p.temperature;
    const float max = best_scaled(row, vocab, t, band_from);
    auto weight = [&](float x) { return expf(x / t - max); };
    const float floor = band_from[BANDS - 1];

    // top-k over the whole row: when k is below the number above the
    // floor, the k best all lie in the narrowest band holding k of them;
    // otherwise the floor decides. Where that band holds at most
    // CANDIDATES keys, it holds every kept one: the draw is among them.
    auto score_key = [&](float x) { return order_key(x / t); };
    unsigned int k_pivot = 0;
    int k_cutoff = NOT_FOUND;
    if (has_top_k(p, vocab)) {
        float held;
        const int band = band_holding(row, vocab, band_from, p.top_k, held);
        const float least = band_from[band];
        if (band < BANDS && held <= (float)CANDIDATES)
            return draw_band(row, vocab, least, candidates, p, max, floor, nullptr);
        if (band < BANDS) {
            double need = (double)p.top_k;
            auto counted = [&](int, float x) { return x >= least ? 1.0 : 0.0; };
            k_pivot = select_from_top(row, score_key, counted, vocab, need);
            k_cutoff = tie_cutoff(row, [&](int, float x) { return score_key(x); }, k_pivot, need, vocab);
        }
    }
    // A logit's weight where it lies above the floor, in top-k and passes
    // min-p, else 0: its scaled value and weight found once.
    auto weighed = [&](int i, float x) {
        const float s = x / t;
        const float w = expf(s - max);
        const unsigned int k = order_key(s);
        const bool in_top_k = k > k_pivot || (k == k_pivot && i <= k_cutoff);
        return x >= floor && in_top_k && w >= p.min_p ? w : 0.0f;
    };

    double need = 0.0;
    float least = 0.0f;
    if (p.top_p < 1.0f) {
        // One pass weighs each logit for the total (in double, as the host
        // sums) and for the bands (f32, which may fall short of a band's
        // mass by their rounding: asking a thousandth more keeps every band
        // chosen a true bound).
        float sums[BANDS], held;
        const double total = block_sum(band_sums<COSTLY_LOADS>(row, vocab, band_from, weighed, sums));
        need = (double)p.top_p * total;
        const int band = narrowest_of(sums, (float)(need * 1.001), held);
        least = band_from[band];
        // With no top-k, a band of few keys holds the nucleus: its cut and
        // the draw are made among them.
        if (!has_top_k(p, vocab) && band < BANDS && count_from(row, vocab, least) <= CANDIDATES)
            return draw_band(row, vocab, least, candidates, p, max, floor, &total);
    }
    return draw_kept(row, vocab, p, weighed, weight, need, least);
}

// Thread 0 writes row blockIdx.x's pick, to `out` and, for the rows it
// has room for, to `previous`.
__device__ __forceinline__ void put_pick(unsigned int* out, unsigned int* previous, int previous_rows, unsigned int token) {
    if (threadIdx.x != 0) return;
    out[blockIdx.x] = token;
    if ((int)blockIdx.x < previous_rows) previous[blockIdx.x] = token;
}

// The pick of an argmax (id 0 where no id beats -inf), or of a draw (id 0
// where nothing is kept: a row of NaNs).
__device__ __forceinline__ unsigned int argmax_pick(unsigned int index) { return index == NONE ? 0 : index; }
__device__ __forceinline__ unsigned int drawn_pick(int token) { return token == NOT_FOUND ? 0 : (unsigned int)token; }

#include "split_rows.cuh"

// out [rows]: the picked token ids, also kept in previous [previous_rows]
// for the next step's embedding (rows past it are not kept). coming
// [previous_rows]: the previous sample's tokens as this step's embedding
// read them. logits [rows, vocab]: overwritten with the adjusted scores.
// params [rows]; adjustments: the rows' words, each row's ids distinct.
// A launch of few rows may have gridDim.y blocks a row: parts [rows,
// CANDIDATES, 2], counts [rows, SPLIT_BLOCKS] and arrivals [rows] (zeros)
// serve the rows split over them (splits_of); the others run on their
// first block alone.
extern "C" __global__ void __launch_bounds__(512, 2) sample_f32(unsigned int* __restrict__ out, unsigned int* __restrict__ previous,
                                      const unsigned int* __restrict__ coming, int previous_rows,
                                      float* __restrict__ logits, const RowParams* __restrict__ params,
                                      const unsigned int* __restrict__ adjustments, unsigned int* __restrict__ parts,
                                      unsigned int* __restrict__ counts, unsigned int* __restrict__ arrivals, int vocab) {
    begin_after_previous_kernels();
    const RowParams p = params[blockIdx.x];
    float* row = logits + (size_t)blockIdx.x * vocab;
    const bool greedy = p.temperature < GREEDY_BELOW;
    __shared__ Candidates candidates;
    __shared__ float band_from[BANDS + 1];
    const bool weighs = !greedy && weighs_all(p, vocab);
    const int splits = splits_of(p, greedy || weighs, vocab);
    if ((int)blockIdx.y >= splits) return;
    unsigned int* row_parts = parts + (size_t)blockIdx.x * 2 * CANDIDATES;
    if (splits > 1 && weighs) {
        int token;
        if (draw_by_parts(row, p, adjustments, coming, vocab, splits, row_parts, arrivals, candidates, band_from, token))
            put_pick(out, previous, previous_rows, drawn_pick(token));
        return;
    }
    if (splits == 1) {
        adjust_row(row, p, adjustments, coming, Span{0, vocab});
    } else {
        const Span part = segment_of(Span{0, vocab}, splits, blockIdx.y);
        adjust_row(row, p, adjustments, coming, part);
        unsigned int* row_counts = counts + blockIdx.x * SPLIT_BLOCKS;
        unsigned int* slot = row_parts + blockIdx.y * slot_words(splits);
        leave_part(row, part, p, greedy, slot, row_counts + blockIdx.y, candidates, band_from);
        if (!last_to_finish(arrivals, splits)) return;
        if (greedy) {
            put_pick(out, previous, previous_rows, merged_argmax(row_parts, splits));
            return;
        }
        if (load_parts(row_parts, row_counts, splits, candidates)) {
            put_pick(out, previous, previous_rows, drawn_pick(draw_merged(candidates, p, band_from)));
            return;
        }
        // Every part is adjusted: the row is drawn from as one block would.
    }
    if (greedy) {
        const Best best = span_argmax(row, Span{0, vocab});
        put_pick(out, previous, previous_rows, argmax_pick(best.index));
        return;
    }
    put_pick(out, previous, previous_rows, drawn_pick(draw_row(row, p, vocab, candidates, band_from)));
}
