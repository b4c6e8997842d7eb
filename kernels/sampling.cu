// Sampling on the device, so a step's logits never leave the GPU: one
// block per row applies the row's bias and penalties in place, then takes
// the argmax (greedy) or draws a token from the kept set that
// src/sampling/choose.rs defines (its host reference). Where the host sorts,
// this finds each cut as a threshold by radix selection over the keys
// (four passes of 256-bin histograms), and the ties at a threshold by a scan
// in id order; the draw is a scan in id order. Sums are in double, as on the
// host, so the two agree except where a draw lands within rounding of a
// boundary.

// One row's parameters, packed by src/backend/cuda/sampling.rs (8 words).
struct RowParams {
    float temperature;
    unsigned int top_k;
    float top_p;
    float min_p;
    float repetition_penalty;
    float uniform;
    unsigned int adjust_begin;  // this row's adjustments: [adjust_begin, adjust_end)
    unsigned int adjust_end;
};

// logit += shift; then, if repeated, HF's repetition penalty (3 words).
struct Adjustment {
    unsigned int token;
    float shift;
    unsigned int repeated;
};

#define GREEDY_BELOW 1e-5f
#define NEGLIGIBLE 40.0f
#define NOT_FOUND 0x7fffffff

// A key whose unsigned order is the float order (negatives flipped).
__device__ __forceinline__ unsigned int order_key(float x) {
    const unsigned int u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive prefix sum over the block in thread order; `total` gets the
// block's sum. blockDim.x must be a multiple of 32. Every thread must call.
__device__ double block_scan(double v, double& total) {
    __shared__ double warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const double n = __shfl_up_sync(0xffffffff, v, offset);
        if (lane >= offset) v += n;
    }
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double s = lane < warps ? warp_sums[lane] : 0.0;
        for (int offset = 1; offset < 32; offset <<= 1) {
            const double n = __shfl_up_sync(0xffffffff, s, offset);
            if (lane >= offset) s += n;
        }
        if (lane < warps) warp_sums[lane] = s;
    }
    __syncthreads();
    if (warp > 0) v += warp_sums[warp - 1];
    total = warp_sums[warps - 1];
    __syncthreads();
    return v;
}

// Sum of `amount(i)` over the row; every thread gets it.
template <typename Amount>
__device__ double row_sum(Amount amount, int vocab) {
    double partial = 0.0, total;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) partial += amount(i);
    block_scan(partial, total);
    return total;
}

// The lowest id whose running sum of `amount` in id order exceeds `target`,
// or NOT_FOUND. Amounts are non-negative, so the running sum only grows.
template <typename Amount>
__device__ int first_above(Amount amount, int vocab, double target) {
    __shared__ int found;
    if (threadIdx.x == 0) found = NOT_FOUND;
    __syncthreads();
    double running = 0.0;
    for (int base = 0; base < vocab; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const double a = i < vocab ? amount(i) : 0.0;
        double total;
        const double inclusive = running + block_scan(a, total);
        if (a > 0.0 && inclusive > target) atomicMin(&found, i);
        __syncthreads();
        if (found != NOT_FOUND) break;
        running += total;
    }
    const int result = found;
    __syncthreads();
    return result;
}

// Radix selection from the top: the key at which the sum of `amount` over
// larger keys first reaches `need`, counting keys in descending order. On
// return `need` holds what the elements at exactly that key must still add.
// If rounding leaves `need` above everything, the smallest key is taken.
template <typename Key, typename Amount>
__device__ unsigned int select_from_top(Key key, Amount amount, int vocab, double& need) {
    __shared__ double histogram[256];
    __shared__ unsigned int chosen;
    __shared__ double left;
    unsigned int prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) histogram[b] = 0.0;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const double a = amount(i);
            if (a <= 0.0) continue;
            const unsigned int k = key(i);
            if ((k & mask) == prefix) atomicAdd(&histogram[(k >> shift) & 255u], a);
        }
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

// The id of the `count`-th element (from 1, in id order) at `pivot` among
// those `in_set`; elements at the pivot up to it are kept. NOT_FOUND keeps them all.
template <typename Key, typename InSet>
__device__ int tie_cutoff(Key key, InSet in_set, unsigned int pivot, double count, int vocab) {
    auto at_pivot = [&](int i) { return in_set(i) && key(i) == pivot ? 1.0 : 0.0; };
    return first_above(at_pivot, vocab, count - 0.5);
}

// The first index of the row's maximum; every thread gets it.
__device__ unsigned int row_argmax(const float* row, int vocab) {
    __shared__ float best_value[32];
    __shared__ unsigned int best_index[32];
    float value = NEG_INF;
    unsigned int index = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) max_with_index(value, index, row[i], i);
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
        index = lane < warps ? best_index[lane] : 0xffffffffu;
        warp_argmax(value, index);
        if (lane == 0) best_index[0] = index == 0xffffffffu ? 0 : index;
    }
    __syncthreads();
    const unsigned int result = best_index[0];
    __syncthreads();
    return result;
}

// Thread 0 writes row blockIdx.x's pick, to `out` and, for the rows it
// has room for, to `previous`.
__device__ __forceinline__ void put_pick(unsigned int* out, unsigned int* previous, int previous_rows, unsigned int token) {
    if (threadIdx.x != 0) return;
    out[blockIdx.x] = token;
    if ((int)blockIdx.x < previous_rows) previous[blockIdx.x] = token;
}

// out [rows]: the picked token ids, also kept in previous [previous_rows]
// for the next step's embedding (rows past it are not kept). logits [rows,
// vocab]: overwritten with the adjusted scores. params [rows]; adjustments
// [total], each row's ids distinct.
extern "C" __global__ void __launch_bounds__(512) sample_f32(unsigned int* __restrict__ out, unsigned int* __restrict__ previous,
                                      int previous_rows, float* __restrict__ logits,
                                      const RowParams* __restrict__ params,
                                      const Adjustment* __restrict__ adjustments, int vocab) {
    begin_after_previous_kernels();
    const RowParams p = params[blockIdx.x];
    float* row = logits + (size_t)blockIdx.x * vocab;
    for (unsigned int j = p.adjust_begin + threadIdx.x; j < p.adjust_end; j += blockDim.x) {
        const Adjustment a = adjustments[j];
        if (a.token >= (unsigned int)vocab) continue;
        float s = row[a.token] + a.shift;
        if (a.repeated) s = s > 0.0f ? s / p.repetition_penalty : s * p.repetition_penalty;
        row[a.token] = s;
    }
    __syncthreads();
    if (p.temperature < GREEDY_BELOW) {
        put_pick(out, previous, previous_rows, row_argmax(row, vocab));
        return;
    }
    float best = NEG_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) best = fmaxf(best, row[i]);
    const float t = p.temperature;
    const float max = block_max(best) / t;
    auto scaled = [&](int i) { return row[i] / t; };
    auto weight = [&](int i) { return expf(scaled(i) - max); };
    auto above_floor = [&](int i) { return scaled(i) >= max - NEGLIGIBLE; };

    // top-k over the whole row: when k is below the number above the
    // floor, the k best all lie above it; otherwise the floor decides.
    auto score_key = [&](int i) { return order_key(scaled(i)); };
    auto everyone = [&](int i) { return true; };
    unsigned int k_pivot = 0;
    int k_cutoff = NOT_FOUND;
    if (p.top_k > 0 && p.top_k < (unsigned int)vocab) {
        double need = (double)p.top_k;
        k_pivot = select_from_top(score_key, [&](int i) { return 1.0; }, vocab, need);
        k_cutoff = tie_cutoff(score_key, everyone, k_pivot, need, vocab);
    }
    auto in_top_k = [&](int i) {
        const unsigned int k = score_key(i);
        return k > k_pivot || (k == k_pivot && i <= k_cutoff);
    };
    auto before_top_p = [&](int i) { return above_floor(i) && in_top_k(i) && weight(i) >= p.min_p; };

    auto weight_key = [&](int i) { return __float_as_uint(weight(i)); };
    unsigned int p_pivot = 0;
    int p_cutoff = NOT_FOUND;
    if (p.top_p < 1.0f) {
        auto mass = [&](int i) { return before_top_p(i) ? (double)weight(i) : 0.0; };
        double need = (double)p.top_p * row_sum(mass, vocab);
        p_pivot = select_from_top(weight_key, mass, vocab, need);
        const double tie = (double)__uint_as_float(p_pivot);
        p_cutoff = tie_cutoff(weight_key, before_top_p, p_pivot, fmax(1.0, ceil(need / tie)), vocab);
    }
    auto kept = [&](int i) {
        if (!before_top_p(i)) return false;
        const unsigned int k = weight_key(i);
        return k > p_pivot || (k == p_pivot && i <= p_cutoff);
    };
    auto kept_mass = [&](int i) { return kept(i) ? (double)weight(i) : 0.0; };
    const double target = (double)p.uniform * row_sum(kept_mass, vocab);
    int token = first_above(kept_mass, vocab, target);
    if (token == NOT_FOUND) {
        // Rounding put the draw past the last kept token: take that one.
        __shared__ int last;
        if (threadIdx.x == 0) last = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            if (kept(i)) atomicMax(&last, i);
        __syncthreads();
        token = last;
    }
    put_pick(out, previous, previous_rows, (unsigned int)token);
}
