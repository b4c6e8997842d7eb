// The rows of a sampling launch that split over several blocks.
// kernels/sampling.cu includes this after what it reuses: RowParams,
// has_top_k, for_each_adjusted, adjust_row, draw_among, draw_band,
// draw_kept, first_kept_past and argmax_pick.

// A row of a launch of few rows (at most half as many as the GPU has SMs:
// src/backend/cuda/sampling.rs) may be split over its gridDim.y blocks,
// so that it streams through as many SMs: each block adjusts the ids of
// its part and leaves what it found in `parts` (a slot of
// CANDIDATES / splits (id, logit) pairs), and the last to finish picks
// from them all. A greedy row splits over every block: a part leaves its
// argmax. A drawn row with a top-k of at most CANDIDATES / 2 splits over
// as many as leave room for each part's k best (scaled logit, ties to the
// lower id; all it has above its own floor where fewer): the row's top-k
// lies among them, so the draw is among them. Where a part's k best lie
// in a band of more than CANDIDATES keys, it leaves OVERFLOWED, and the
// last block draws from the whole row alone. A drawn row that weighs_all
// splits over every block: a part leaves its kept mass, and with a top-p
// its band sums (draw_by_parts).
#define SPLIT_BLOCKS 32
#define OVERFLOWED 0xffffffffu

// The ids a split row that weighs_all may list as adjusted, a bit each
// in shared memory (Qwen2's 152,064).
#define LISTED_WORDS 4752

// Whether row p has nothing to adjust: no adjustment, no joining token.
__device__ __forceinline__ bool unadjusted(const RowParams& p) {
    return p.adjust_begin == p.adjust_end && p.coming == NO_COMING;
}

// Whether a drawn row weighs every id it has above the floor (no top-k),
// so that every block of it reads the whole row for its best; one with
// adjustments only where their ids fit LISTED_WORDS (draw_by_parts).
__device__ bool weighs_all(const RowParams& p, int vocab) {
    return !has_top_k(p, vocab) && (unadjusted(p) || vocab <= 32 * LISTED_WORDS);
}

// The blocks row `p` runs on: all of them for a greedy row or one that
// weighs_all (`every`), else as many as leave room for its top-k.
__device__ int splits_of(const RowParams& p, bool every, int vocab) {
    if (every) return gridDim.y;
    if (!has_top_k(p, vocab)) return 1;
    return max(1, min((int)gridDim.y, CANDIDATES / (int)p.top_k));
}

// The words of a part's slot in a row's `parts` when it splits over `splits` blocks.
__device__ __forceinline__ int slot_words(int splits) { return 2 * (CANDIDATES / splits); }

// The keys a drawn row's part `s` leaves: its top_k best, or all above
// its own floor (from its own best) where it has fewer, ranked first in
// c.order (ids from the part's start); their number, or OVERFLOWED.
__device__ unsigned int part_best(const float* row, Span s, const RowParams& p, Candidates& c, float* band_from) {
    const float* part = row + s.begin;
    const int n = s.end - s.begin;
    const float t = p.temperature;
    best_scaled(part, n, t, band_from);
    float held;
    const int band = band_holding(part, n, band_from, p.top_k, held);
    if (band < BANDS && held > (float)CANDIDATES) return OVERFLOWED;
    const float least = band_from[min(band, BANDS - 1)];
    gather(part, n, [&](float x) { return x >= least; }, c);
    for (int a = threadIdx.x; a < c.count; a += blockDim.x) c.key[a] = order_key(c.x[a] / t);
    return (unsigned int)min(order_candidates(c), (int)p.top_k);
}

// Leaves this block's part of a split row in its slot and its count.
__device__ void leave_part(const float* row, Span s, const RowParams& p, bool greedy, unsigned int* slot,
                           unsigned int* count, Candidates& c, float* band_from) {
    if (greedy) {
        const Best best = span_argmax(row, s);
        if (threadIdx.x == 0) {
            slot[0] = best.index;
            slot[1] = __float_as_uint(best.value);
            *count = 1;
        }
        return;
    }
    const unsigned int n = part_best(row, s, p, c, band_from);
    if (threadIdx.x == 0) *count = n;
    if (n == OVERFLOWED) return;
    for (int m = threadIdx.x; m < (int)n; m += blockDim.x) {
        const int a = c.order[m];
        slot[2 * m] = c.id[a] + (unsigned int)s.begin;
        slot[2 * m + 1] = __float_as_uint(c.x[a]);
    }
}

// Whether this block is the last of its row's `splits` to finish (every
// thread gets it). Every block's writes are visible to the others before
// its count moves; the last sets the count back to zero for the next launch.
__device__ bool last_to_finish(unsigned int* arrivals, int splits) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* count = arrivals + blockIdx.x;
        last = atomicAdd(count, 1u) == (unsigned int)splits - 1;
        if (last) *count = 0;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// The argmax among a greedy row's parts (ties to the lower id, as the
// parts lie in id order): a lane of warp 0 loads each part's (at most
// SPLIT_BLOCKS, so all at once), and warp 0's lanes get it (thread 0
// writes the pick).
__device__ unsigned int merged_argmax(const volatile unsigned int* row_parts, int splits) {
    const int j = threadIdx.x, slot = slot_words(splits);
    float value = j < splits ? __uint_as_float(row_parts[j * slot + 1]) : NEG_INF;
    unsigned int index = j < splits ? row_parts[j * slot] : NONE;
    warp_argmax(value, index);
    return argmax_pick(index);
}

// A weighing part's slot: its kept mass (a double, low word first), then,
// where the row has a top-p, each band's mass and number of keys (floats),
// else, where the slot has room, each of its warps' masses (doubles).
#define MASS_WORDS 2
#define SUMMARY_WORDS (MASS_WORDS + 2 * BANDS)

// The double in a slot's words at..at+1 (low word first), and its store.
__device__ __forceinline__ double double_at(const volatile unsigned int* slot, int at) {
    return __longlong_as_double((long long)slot[at] | (long long)slot[at + 1] << 32);
}

__device__ __forceinline__ void put_double(unsigned int* slot, int at, double v) {
    const unsigned long long bits = __double_as_longlong(v);
    slot[at] = (unsigned int)bits;
    slot[at + 1] = (unsigned int)(bits >> 32);
}

// Where a weighing part's slot holds its warps' masses (a block of
// blockDim.x threads).
__device__ __forceinline__ bool holds_warp_masses(int splits) {
    return MASS_WORDS + 2 * (int)(blockDim.x >> 5) <= slot_words(splits);
}

// Where a draw lands among masses in order: the first whose running sum
// passes the target, and what the draw must still pass there. Rounding may
// leave every one short: the last with any mass then, and +inf (its last
// kept token is the pick). -1 where none has mass.
struct Passing {
    int at;
    double left;
};

template <typename Mass>
__device__ Passing passing_of(int n, Mass mass, double target) {
    double running = 0.0;
    int last = -1;
    for (int j = 0; j < n; ++j) {
        const double m = mass(j);
        if (m > 0.0 && running + m > target) return Passing{j, target - running};
        if (m > 0.0) last = j;
        running += m;
    }
    return Passing{last, __longlong_as_double(0x7ff0000000000000ll)};  // +inf
}

// The ids of `part` that row p's adjustments change, where it has any.
struct AdjustedIn {
    const float* row;
    const RowParams& p;
    const unsigned int* adjustments;
    const unsigned int* coming;
    Span part;
    bool adjusts;
};

// Calls f(id, logit, adjusted) for each of them (for_each_adjusted; every
// thread calls it).
template <typename F>
__device__ void for_each_extra(const AdjustedIn& a, F f) {
    if (a.adjusts) for_each_adjusted(a.row, a.p, a.adjustments, a.coming, a.part, f);
}

// Leaves this block's part of a row that weighs_all in its slot: its kept
// mass (of `kept`, a logit's weight or 0), and with a top-p its band sums
// (band_sums, from the row's bands), else, where `warp_masses`, the mass
// of each warp's segment of the part (the part's mass is their sum, in
// order, so that the last block finds the same running sums). The pass
// reads the part as it came; `adjusted` then takes out what its adjusted
// ids added and counts them as adjusted (into a warp's mass by a shared
// atomic add, whose order may change its last bits from run to run, as
// the selection's histograms' may).
template <typename Kept>
__device__ void leave_mass(const float* row, Span part, bool nucleus, bool warp_masses, const float* band_from,
                           Kept kept, const AdjustedIn& adjusted, unsigned int* slot) {
    const float* ids = row + part.begin;
    const int n = part.end - part.begin;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float masses[BANDS], counts[BANDS];
    __shared__ double warp_mass[32];
    double mass;
    if (nucleus) {
        const double partial =
            band_sums<COSTLY_LOADS>(ids, n, band_from, [&](int, float x) { return kept(x); }, masses, adjusted);
        band_sums<CHEAP_LOADS>(ids, n, band_from, [](int, float) { return 1.0f; }, counts, adjusted);
        mass = block_sum(partial);
    } else {
        double partial = 0.0;
        for_each_logit<COSTLY_LOADS>(ids, n, [&](int, float x) { partial += (double)kept(x); });
        partial = warp_sum(partial);
        if (lane == 0) warp_mass[warp] = partial;
        __syncthreads();
        const int length = part_length(Span{0, n}, warps);
        for_each_extra(adjusted, [&](int i, float x, float counted) {
            atomicAdd(&warp_mass[(i - part.begin) / length], (double)kept(counted) - (double)kept(x));
        });
        __syncthreads();
        mass = 0.0;
        for (int w = 0; w < warps; ++w) mass += warp_mass[w];
        if (warp_masses && threadIdx.x < warps) put_double(slot, MASS_WORDS + 2 * threadIdx.x, warp_mass[threadIdx.x]);
    }
    if (threadIdx.x != 0) return;
    put_double(slot, 0, mass);
    for (int band = 0; nucleus && band < BANDS; ++band) {
        slot[MASS_WORDS + band] = __float_as_uint(masses[band]);
        slot[MASS_WORDS + BANDS + band] = __float_as_uint(counts[band]);
    }
}

// What the last block of a row that weighs_all makes of its parts'
// slots: the row's kept mass; with a top-p, the narrowest band whose
// mass reaches top_p of it (or BANDS) and how many keys that band holds;
// else the part where the draw lands (-1 where nothing is kept) and what
// the draw must still pass there.
struct Weighing {
    double total, left;
    int band, count, passing;
};

// Reads the parts' slots (all at once, into shared memory, as load_parts
// reads their counts: one thread's loads, one after another, would each
// wait a round trip) and weighs them.
__device__ Weighing weigh_parts(const volatile unsigned int* row_parts, const RowParams& p, int splits, bool nucleus) {
    __shared__ unsigned int summary[SPLIT_BLOCKS * SUMMARY_WORDS];
    __shared__ double band_mass[BANDS];
    __shared__ int band_count[BANDS];
    __shared__ Weighing weighing;
    const int words = nucleus ? SUMMARY_WORDS : MASS_WORDS, stride = slot_words(splits);
    for (int w = threadIdx.x; w < splits * words; w += blockDim.x) summary[w] = row_parts[w / words * stride + w % words];
    __syncthreads();
    auto word = [&](int j, int at) { return summary[j * words + at]; };
    if (nucleus && threadIdx.x < BANDS) {
        double mass = 0.0;
        float count = 0.0f;
        for (int j = 0; j < splits; ++j) {
            mass += (double)__uint_as_float(word(j, MASS_WORDS + threadIdx.x));
            count += __uint_as_float(word(j, MASS_WORDS + BANDS + threadIdx.x));
        }
        band_mass[threadIdx.x] = mass;
        band_count[threadIdx.x] = (int)count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        auto mass_of = [&](int j) { return double_at(summary + j * words, 0); };
        Weighing w{0.0, 0.0, BANDS, 0, -1};
        for (int j = 0; j < splits; ++j) w.total += mass_of(j);
        if (nucleus) {
            // As a block's sums are f32, a thousandth more is asked of them (draw_row).
            double held;
            w.band = narrowest_of(band_mass, (double)p.top_p * w.total * 1.001, held);
            w.count = w.band < BANDS ? band_count[w.band] : 0;
        } else {
            const Passing at = passing_of(splits, mass_of, (double)p.uniform * w.total);
            w.passing = at.at;
            w.left = at.left;
        }
        weighing = w;
    }
    __syncthreads();
    const Weighing result = weighing;
    __syncthreads();
    return result;
}

// Where in part `s` the draw lands, `left` short of its start: the
// segment of the warp whose mass passes it, with what the draw must still
// pass there, where the part's slot holds its warps' masses (every thread
// gets it), else the whole part.
__device__ Span landing_in(const volatile unsigned int* slot, Span s, int splits, double& left) {
    __shared__ double masses[32];
    __shared__ Passing at;
    if (!holds_warp_masses(splits)) return s;
    const int warps = blockDim.x >> 5;
    if (threadIdx.x < warps) masses[threadIdx.x] = double_at(slot, MASS_WORDS + 2 * threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0) at = passing_of(warps, [&](int k) { return masses[k]; }, left);
    __syncthreads();
    if (at.at < 0) return s;
    left = at.left;
    return segment(s, at.at);
}

// A split row that weighs_all: every block finds the row's best (the
// weights are relative to it, so each reads the whole row) and sums its
// own part's kept weights into its slot. No block adjusts the row in
// place before every block has read it: each marks the ids the row's
// adjustments change, leaves them out of its search for the best and
// takes the best they are adjusted to instead, and counts its own part's
// as adjusted; the last to finish adjusts the row. It then weighs the
// parts. With a top-p, where the band that holds its mass has at most
// CANDIDATES keys, it gathers them from the row and draws among them,
// else it draws from the whole row (draw_kept). Without, it searches only
// where the draw lands, as draw_row searches the row: the part, or the
// segment of one of its warps where its slot has room for their masses
// (landing_in). Returns whether this block was the last, with the pick in
// `token` (NOT_FOUND where nothing is kept).
__device__ bool draw_by_parts(float* row, const RowParams& p, const unsigned int* adjustments,
                              const unsigned int* coming, int vocab, int splits, unsigned int* row_parts,
                              unsigned int* arrivals, Candidates& c, float* band_from, int& token) {
    __shared__ unsigned int marked[LISTED_WORDS];
    const bool adjusts = !unadjusted(p);
    const int words = adjusts ? (vocab + 31) / 32 : 0;
    for (int w = threadIdx.x; w < words; w += blockDim.x) marked[w] = 0u;
    __syncthreads();
    float adjusted_best = NEG_INF;
    if (adjusts) {
        for_each_adjusted(row, p, adjustments, coming, Span{0, vocab}, [&](unsigned int token, float, float s) {
            atomicOr(&marked[token >> 5], 1u << (token & 31));
            adjusted_best = fmaxf(adjusted_best, s);
        });
    }
    auto listed = [&](int i) { return (marked[i >> 5] >> (i & 31) & 1u) != 0u; };
    const float t = p.temperature;
    const float max = adjusts ? best_scaled(row, vocab, t, band_from, listed, adjusted_best)
                              : best_scaled(row, vocab, t, band_from);
    const float floor = band_from[BANDS - 1];
    auto weight = [&](float x) { return expf(x / t - max); };
    auto kept = [&](float x) {
        const float weighs = weight(x);
        return x >= floor && weighs >= p.min_p ? weighs : 0.0f;
    };
    const bool nucleus = p.top_p < 1.0f;
    const Span part = segment_of(Span{0, vocab}, splits, blockIdx.y);
    const AdjustedIn adjusted{row, p, adjustments, coming, part, adjusts};
    leave_mass(row, part, nucleus, holds_warp_masses(splits), band_from, kept, adjusted,
               row_parts + blockIdx.y * slot_words(splits));
    if (!last_to_finish(arrivals, splits)) return false;
    if (adjusts) adjust_row(row, p, adjustments, coming, Span{0, vocab});
    auto kept_weight = [&](int, float x) { return kept(x); };
    const Weighing w = weigh_parts(row_parts, p, splits, nucleus);
    if (nucleus) {
        const float least = band_from[w.band];
        const bool few = w.band < BANDS && w.count <= CANDIDATES;
        token = few ? draw_band(row, vocab, least, c, p, max, floor, &w.total)
                    : draw_kept(row, vocab, p, kept_weight, weight, (double)p.top_p * w.total, least);
        return true;
    }
    if (w.passing < 0) {
        token = NOT_FOUND;
        return true;
    }
    double left = w.left;
    const Span s = landing_in(row_parts + w.passing * slot_words(splits), segment_of(Span{0, vocab}, splits, w.passing),
                              splits, left);
    token = s.begin + first_kept_past(row + s.begin, s.end - s.begin, kept_weight, 0.0, left);
    return true;
}

// The parts' keys of a drawn row, gathered into `c`; false where a part
// OVERFLOWED. Every thread gets it.
__device__ bool load_parts(const volatile unsigned int* row_parts, const volatile unsigned int* counts, int splits,
                           Candidates& c) {
    __shared__ int start[SPLIT_BLOCKS + 1];
    __shared__ unsigned int part_count[SPLIT_BLOCKS];
    if (threadIdx.x < splits) part_count[threadIdx.x] = counts[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        bool whole = true;
        for (int j = 0; j < splits; ++j) {
            start[j] = total;
            const unsigned int n = part_count[j];
            whole = whole && n != OVERFLOWED;
            total += whole ? (int)n : 0;
        }
        start[splits] = whole ? total : -1;
        c.count = total;
    }
    __syncthreads();
    const bool whole = start[splits] >= 0;
    const int slot = slot_words(splits), lane = threadIdx.x & 31;
    for (int j = threadIdx.x >> 5; whole && j < splits; j += blockDim.x >> 5) {
        for (int m = lane; m < start[j + 1] - start[j]; m += 32) {
            c.id[start[j] + m] = row_parts[j * slot + 2 * m];
            c.x[start[j] + m] = __uint_as_float(row_parts[j * slot + 2 * m + 1]);
        }
    }
    __syncthreads();
    return whole;
}

// Keeps the candidates whose logit is at least `least` (a thread holds at
// most one: c.count <= blockDim.x), in no particular order.
__device__ void keep_from(Candidates& c, float least) {
    __shared__ int kept;
    const int a = threadIdx.x;
    const bool mine = a < c.count && c.x[a] >= least;
    const unsigned int id = mine ? c.id[a] : 0u;
    const float x = mine ? c.x[a] : 0.0f;
    if (a == 0) kept = 0;
    __syncthreads();
    const int slot = mine ? atomicAdd(&kept, 1) : 0;
    __syncthreads();
    if (mine) {
        c.id[slot] = id;
        c.x[slot] = x;
    }
    if (a == 0) c.count = kept;
    __syncthreads();
}

// The draw among a split row's parts' keys, which hold its best logit
// and its top-k: first narrowed, as the row is, to the narrowest band
// below the best that holds k of them (or to those above the floor where
// fewer are), since ranking all of up to CANDIDATES keys thrice would
// cost more than the parts took.
__device__ int draw_merged(Candidates& c, const RowParams& p, float* band_from) {
    const float max = best_scaled(c.x, c.count, p.temperature, band_from);
    float held;
    const int band = band_holding(c.x, c.count, band_from, p.top_k, held);
    keep_from(c, band_from[min(band, BANDS - 1)]);
    return draw_among(c, p, max, band_from[BANDS - 1], nullptr);
}
