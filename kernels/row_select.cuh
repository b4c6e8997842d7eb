// Passes over a row of logits, and the selections sample_f32
// (kernels/sampling.cu) builds from them: keys in float order, the bands
// below a row's best scaled logit, radix selection and the search in id
// order, the candidates gathered into shared memory, and the argmax.
//
// Each pass over a row gives each warp a contiguous segment of it, read
// 32 ids a load and several loads a lane at a time: a decode step
// of few rows has one block on each of few SMs, and a lane that waited
// for each logit before loading the next would keep 2 KB of the row in
// flight an SM (≈ 15 GB/s from L2; 40 µs for a 151,936-id row). The
// search in id order sums each warp's segment, then each warp's share of
// the segment it passes in, and one warp scans from there, 8 ids a lane.

// Scaled logits more than NEGLIGIBLE below the best are never kept (the
// host's floor, src/sampling/choose.rs); the bands below the best narrow
// a cut's search; NOT_FOUND is a search that found no id.
#define NEGLIGIBLE 40.0f
#define BANDS 8
#define CANDIDATES 512
#define NOT_FOUND 0x7fffffff

// A key whose unsigned order is the float order (negatives flipped).
__device__ __forceinline__ unsigned int order_key(float x) {
    const unsigned int u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float whose order_key is k.
__device__ __forceinline__ float from_key(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The least logit x with x / t >= s, or NaN (which no comparison admits)
// where none has. x / t rounds monotonically in x, so the logits whose
// scaled value reaches s are those from this one up: a pass tests
// x >= it, dividing nothing, exactly where the host tests x / t >= s (ties
// of scaled values included). A binary search over the floats in order.
__device__ float least_scaling_to(float s, float t) {
    unsigned int lo = order_key(NEG_INF), hi = order_key(-NEG_INF);
    if (!(from_key(hi) / t >= s)) return __int_as_float(0x7fffffff);
    while (lo < hi) {
        const unsigned int mid = lo + (hi - lo) / 2;
        if (from_key(mid) / t >= s) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return from_key(lo);
}

// Loads a lane has in flight in a pass: many where each logit costs a
// compare, fewer where it costs an exp (the arithmetic binds first there,
// and each one is another inlined copy of the pass's work).
#define CHEAP_LOADS 16
#define COSTLY_LOADS 4
#define SCAN_RUN 8

// Calls f(i, row[i]) for every i in [begin, end), the warp's lanes taking
// consecutive ids, with LOADS loads a lane issued before any is used (all
// of them checked against `end` only on the last trip). A lane meets its
// ids in increasing order.
template <int LOADS, typename F>
__device__ __forceinline__ void warp_for_each(const float* row, int begin, int end, F f) {
    const int lane = threadIdx.x & 31;
    int base = begin;
    for (; base + 32 * LOADS <= end; base += 32 * LOADS) {
        float x[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) x[u] = row[base + 32 * u + lane];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) f(base + 32 * u + lane, x[u]);
    }
    if (base >= end) return;
    float x[LOADS];
#pragma unroll
    for (int u = 0; u < LOADS; ++u) {
        const int i = base + 32 * u + lane;
        x[u] = i < end ? row[i] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < LOADS; ++u) {
        const int i = base + 32 * u + lane;
        if (i < end) f(i, x[u]);
    }
}

// Ids [begin, end) of a row.
struct Span {
    int begin, end;
};

// The length of each of `parts` contiguous parts of `s`, in whole 32-id
// loads (the last ones short or empty where `s` is short).
__device__ __forceinline__ int part_length(Span s, int parts) { return ((s.end - s.begin + parts - 1) / parts + 31) & ~31; }

// Part `part` of `s` split into `parts` (part_length).
__device__ __forceinline__ Span segment_of(Span s, int parts, int part) {
    const int length = part_length(s, parts);
    const int first = min(s.end, s.begin + part * length);
    return Span{first, min(s.end, first + length)};
}

// Warp `warp`'s segment of `s` when the block's warps split it.
__device__ __forceinline__ Span segment(Span s, int warp) { return segment_of(s, blockDim.x >> 5, warp); }

// Calls f(i, row[i]) for every id of the row, each warp taking its segment.
template <int LOADS, typename F>
__device__ __forceinline__ void for_each_logit(const float* row, int vocab, F f) {
    const Span s = segment(Span{0, vocab}, threadIdx.x >> 5);
    warp_for_each<LOADS>(row, s.begin, s.end, f);
}

// The lowest id whose running sum of `amount` (non-negative) in id order,
// from `before` at `begin`, exceeds `target`, or NOT_FOUND: one warp scans
// runs of SCAN_RUN ids a lane. The lane whose run passes the target finds
// the id in it, summing its run in the order that decided it passes, so
// it always does. Called by one whole warp; every lane gets the id.
template <typename Amount>
__device__ int scan_from(const float* row, Amount amount, int begin, int vocab, double before, double target) {
    const int lane = threadIdx.x & 31;
    for (int base = begin; base < vocab; base += 32 * SCAN_RUN) {
        const int first = base + lane * SCAN_RUN;
        float x[SCAN_RUN];
#pragma unroll
        for (int j = 0; j < SCAN_RUN; ++j) x[j] = first + j < vocab ? row[first + j] : 0.0f;
        double a[SCAN_RUN], mine = 0.0;
#pragma unroll
        for (int j = 0; j < SCAN_RUN; ++j) {
            a[j] = first + j < vocab ? amount(first + j, x[j]) : 0.0;
            mine += a[j];
        }
        double inclusive = mine;
        for (int offset = 1; offset < 32; offset <<= 1) {
            const double n = __shfl_up_sync(0xffffffff, inclusive, offset);
            if (lane >= offset) inclusive += n;
        }
        double start = __shfl_up_sync(0xffffffff, inclusive, 1);
        start = before + (lane == 0 ? 0.0 : start);
        const unsigned int passes = __ballot_sync(0xffffffff, mine > 0.0 && start + mine > target);
        if (passes) {
            const int decider = __ffs(passes) - 1;
            int id = NOT_FOUND;
            if (lane == decider) {
                double sum = 0.0;
#pragma unroll
                for (int j = 0; j < SCAN_RUN; ++j) {
                    sum += a[j];
                    if (id == NOT_FOUND && a[j] > 0.0 && start + sum > target) id = first + j;
                }
            }
            return __shfl_sync(0xffffffff, id, decider);
        }
        before += __shfl_sync(0xffffffff, inclusive, 31);
    }
    return NOT_FOUND;
}

// The lowest id whose running sum of `amount` (non-negative) in id order
// exceeds share × the row's total + extra, or NOT_FOUND. Two rounds
// narrow the search: the warps sum their segments of the row, then their
// parts of the segment where the sum passes the target; one warp then
// scans from the part where it does. A rounding that leaves a round
// without a passing part sends the scan past it.
template <typename Amount>
__device__ int first_past(const float* row, Amount amount, int vocab, double share, double extra) {
    __shared__ double sums[32];
    __shared__ double before_at;
    __shared__ Span passing;
    __shared__ int found;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    Span range{0, vocab};
    double before = 0.0, target = 0.0;
    for (int round = 0; round < 2; ++round) {
        const Span mine = segment(range, warp);
        double partial = 0.0;
        warp_for_each<COSTLY_LOADS>(row, mine.begin, mine.end, [&](int i, float x) { partial += amount(i, x); });
        partial = warp_sum(partial);
        if (lane == 0) sums[warp] = partial;
        __syncthreads();
        if (round == 0) {
            double total = 0.0;
            for (int w = 0; w < warps; ++w) total += sums[w];
            target = share * total + extra;
        }
        if (threadIdx.x == 0) {
            double running = before;
            int w = 0;
            while (w < warps && !(sums[w] > 0.0 && running + sums[w] > target)) running += sums[w++];
            // With no part passing, nothing in the row does (first round) or
            // rounding hid it (second): the scan starts after the range.
            passing = w < warps ? segment(range, w) : Span{range.end, range.end};
            before_at = running;
        }
        __syncthreads();
        range = passing;
        before = before_at;
        __syncthreads();
    }
    if (warp == 0) {
        const int id = scan_from(row, amount, range.begin, vocab, before, target);
        if (lane == 0) found = id;
    }
    __syncthreads();
    const int result = found;
    __syncthreads();
    return result;
}

// Radix selection from the top: the key at which the sum of `amount` over
// larger keys first reaches `need`, counting keys in descending order. On
// return `need` holds what the elements at exactly that key must still add.
// If rounding leaves `need` above everything, the smallest key is taken.
template <typename Key, typename Amount>
__device__ unsigned int select_from_top(const float* row, Key key, Amount amount, int vocab, double& need) {
    __shared__ double histogram[256];
    __shared__ unsigned int chosen;
    __shared__ double left;
    unsigned int prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) histogram[b] = 0.0;
        __syncthreads();
        for_each_logit<COSTLY_LOADS>(row, vocab, [&](int i, float x) {
            const double a = amount(i, x);
            if (a <= 0.0) return;
            const unsigned int k = key(x);
            if ((k & mask) == prefix) atomicAdd(&histogram[(k >> shift) & 255u], a);
        });
        __syncthreads();
        if (threadIdx.x == 0) {
            double above = 0.0;
            int pick = -1, lowest = 0;
            for (int b = 255; b >= 0; --b) {
                if (histogram[b] <= 0.0) continue;
                lowest = b;
                if (above + histogram[b] >= need) {
                    pick = b;
                    break;
                }
                above += histogram[b];
            }
            if (pick < 0) {
                pick = lowest;
                above -= histogram[lowest];
            }
            chosen = (unsigned int)pick;
            left = need - above;
        }
        __syncthreads();
        prefix |= chosen << shift;
        mask |= 0xffu << shift;
        need = left;
        __syncthreads();
    }
    return prefix;
}

// The id of the `count`-th element (from 1, in id order) whose key(i, x)
// is `pivot`; elements at the pivot up to it are kept. NOT_FOUND keeps
// them all.
template <typename Key>
__device__ int tie_cutoff(const float* row, Key key, unsigned int pivot, double count, int vocab) {
    auto at_pivot = [&](int i, float x) { return key(i, x) == pivot ? 1.0 : 0.0; };
    return first_past(row, at_pivot, vocab, 0.0, count - 0.5);
}

// Fills from[0..BANDS] with each band's least logit: band j holds the
// logits whose scaled value lies within 40 × 2^(j − 7) of the best one
// `max` (band BANDS − 1 is the floor's; band BANDS, "none", takes in
// everything above the floor too). Warp 0's lanes find one each.
__device__ void band_starts(float max, float t, float* from) {
    if (threadIdx.x <= BANDS) from[threadIdx.x] = least_scaling_to(max - ldexpf(NEGLIGIBLE, (int)threadIdx.x - (BANDS - 1)), t);
    __syncthreads();
}

// The best scaled logit of row[0, n) but the ids `skipped(i)` and of the
// threads' `best` (every thread gets it), with the bands below it filled
// into `band_from` (band_starts).
template <typename Skipped>
__device__ float best_scaled(const float* row, int n, float t, float* band_from, Skipped skipped, float best) {
    for_each_logit<CHEAP_LOADS>(row, n, [&](int i, float x) { best = skipped(i) ? best : fmaxf(best, x); });
    const float max = block_max(best) / t;
    band_starts(max, t, band_from);
    return max;
}

// The best scaled logit of row[0, n), with the bands below it.
__device__ float best_scaled(const float* row, int n, float t, float* band_from) {
    return best_scaled(row, n, t, band_from, [](int) { return false; }, NEG_INF);
}

// Where band_sums has no logits to count otherwise than the row holds
// them. An extra is a type with a for_each_extra overload (found where
// band_sums is instantiated), not a generic lambda or a member template:
// NVRTC compiles no generic lambda in device code, and the emulator
// (tests/cuda-emu, where __device__ is `static`) no member function.
struct NoExtra {};

template <typename F>
__device__ void for_each_extra(NoExtra, F) {}

// Each band's sum of `amount(i, x)` over row[0, n), into `sums`; every
// thread gets them. for_each_extra(extra, f) calls f(i, x, counted) for
// ids whose logit the pass read as x but which count as `counted` (each
// thread its own, after the pass). A lane sums each band in f32
// registers (exact for counts below 2^24; a caller that sums masses
// allows for their rounding). Returns this thread's share of the sum over
// the floor's band in double (for a caller to block_sum where it needs
// the total: the pass then weighs each logit once).
template <int LOADS, typename Amount, typename Extra>
__device__ double band_sums(const float* row, int n, const float* band_from, Amount amount, float (&sums)[BANDS],
                            Extra extra) {
    float from[BANDS];
#pragma unroll
    for (int band = 0; band < BANDS; ++band) {
        from[band] = band_from[band];
        sums[band] = 0.0f;
    }
    double total = 0.0;
    auto add = [&](int i, float x, float sign) {
        if (!(x >= from[BANDS - 1])) return;
        const float a = sign * amount(i, x);
        total += (double)a;
#pragma unroll
        for (int band = 0; band < BANDS; ++band)
            if (x >= from[band]) sums[band] += a;
    };
    for_each_logit<LOADS>(row, n, [&](int i, float x) { add(i, x, 1.0f); });
    for_each_extra(extra, [&](int i, float x, float counted) {
        add(i, x, -1.0f);
        add(i, counted, 1.0f);
    });
#pragma unroll
    for (int band = 0; band < BANDS; ++band) sums[band] = block_sum(sums[band]);
    return total;
}

// band_sums of the row as it is.
template <int LOADS, typename Amount>
__device__ double band_sums(const float* row, int n, const float* band_from, Amount amount, float (&sums)[BANDS]) {
    return band_sums<LOADS>(row, n, band_from, amount, sums, NoExtra{});
}

// The narrowest band whose sum reaches `need`, with that sum in `held`,
// or BANDS where not even the floor's does.
template <typename Sum>
__device__ __forceinline__ int narrowest_of(const Sum (&sums)[BANDS], Sum need, Sum& held) {
    int narrowest = BANDS;
    held = 0;
#pragma unroll
    for (int band = BANDS - 1; band >= 0; --band) {
        if (sums[band] >= need) {
            narrowest = band;
            held = sums[band];
        }
    }
    return narrowest;
}

// The narrowest band whose sum of `amount(i, x)` reaches `need`, with
// that sum in `held`, or BANDS where not even the floor's does; every
// thread gets them (band_sums).
template <int LOADS, typename Amount>
__device__ int narrowest_band(const float* row, int vocab, const float* band_from, Amount amount, float need, float& held) {
    float sums[BANDS];
    band_sums<LOADS>(row, vocab, band_from, amount, sums);
    return narrowest_of(sums, need, held);
}

// The narrowest band holding `count` logits of row[0, n), with how many
// it holds in `held`, or BANDS where not even the floor's does.
__device__ int band_holding(const float* row, int n, const float* band_from, unsigned int count, float& held) {
    auto one = [](int, float) { return 1.0f; };
    return narrowest_band<CHEAP_LOADS>(row, n, band_from, one, (float)count, held);
}

// How many logits of row[0, n) are at least `least`; every thread gets it.
__device__ int count_from(const float* row, int n, float least) {
    int count = 0;
    for_each_logit<CHEAP_LOADS>(row, n, [&](int, float x) { count += x >= least; });
    return block_sum(count);
}

// A row's keys in one band, gathered into shared memory in no particular
// order, where a cut's band holds at most CANDIDATES of them: the top-k
// and top-p thresholds are then found there, where otherwise each
// takes a radix selection of four passes over the row and a search for
// its ties. `key` holds what the cut at hand orders them by.
struct Candidates {
    int count;
    unsigned int id[CANDIDATES];
    float x[CANDIDATES];
    unsigned int key[CANDIDATES];
    unsigned short order[CANDIDATES];
};

// Gathers the logits `in(x)` admits; `c.count` of them, which the caller
// knows to be at most CANDIDATES.
template <typename In>
__device__ void gather(const float* row, int vocab, In in, Candidates& c) {
    if (threadIdx.x == 0) c.count = 0;
    __syncthreads();
    for_each_logit<CHEAP_LOADS>(row, vocab, [&](int i, float x) {
        if (!in(x)) return;
        const int slot = atomicAdd(&c.count, 1);
        c.id[slot] = i;
        c.x[slot] = x;
    });
    __syncthreads();
}

// Writes into c.order the candidates whose c.key is not 0, by key
// descending and ties by id (a candidate's place is the number before
// it); returns how many there are. Every thread gets it.
__device__ int order_candidates(Candidates& c) {
    __shared__ int members;
    if (threadIdx.x == 0) members = 0;
    __syncthreads();
    for (int a = threadIdx.x; a < c.count; a += blockDim.x) {
        const unsigned int key = c.key[a], id = c.id[a];
        if (key == 0) continue;
        int before = 0;
        for (int b = 0; b < c.count; ++b) before += c.key[b] > key || (c.key[b] == key && c.id[b] < id);
        c.order[before] = (unsigned short)a;
        atomicAdd(&members, 1);
    }
    __syncthreads();
    const int result = members;
    __syncthreads();
    return result;
}

#define NONE 0xffffffffu

// A row's maximum and its first index.
struct Best {
    float value;
    unsigned int index;
};

// The first index of the maximum of row[s.begin, s.end), with that
// maximum (-inf and NONE where no id beats -inf); every thread gets it.
__device__ Best span_argmax(const float* row, Span s) {
    __shared__ float best_value[32];
    __shared__ unsigned int best_index[32];
    float value = NEG_INF;
    unsigned int index = NONE;
    // A lane meets its ids in increasing order, so its first maximum is the
    // one a strict comparison keeps; lanes and warps merge ties by index.
    const Span mine = segment(s, threadIdx.x >> 5);
    warp_for_each<CHEAP_LOADS>(row, mine.begin, mine.end, [&](int i, float x) {
        if (x > value) {
            value = x;
            index = i;
        }
    });
    warp_argmax(value, index);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_value[warp] = value;
        best_index[warp] = index;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        value = lane < warps ? best_value[lane] : NEG_INF;
        index = lane < warps ? best_index[lane] : NONE;
        warp_argmax(value, index);
        if (lane == 0) {
            best_value[0] = value;
            best_index[0] = index;
        }
    }
    __syncthreads();
    const Best result{best_value[0], best_index[0]};
    __syncthreads();
    return result;
}
