// Token embedding lookup: out[t, :] = table[ids[t], :], widened to f32.
// Vocab-parallel ranks pass ids already mapped into their slice (ids of
// other ranks point at the slice's zero row, its last). An id with the top
// bit set (PREVIOUS_SAMPLE in src/backend/mod.rs) is not known on the
// host yet: it names a row of the previous sampling step, whose token sits
// in `previous`, and is mapped here: row token - first of a table whose
// rows stand for ids [first, end), else that zero row. The token is also
// put in `coming` at the same row, where the step's sampler finds it
// (the sampler rewrites `previous` as it goes). One block per token,
// so a decode step of one sequence is one block: each thread has its
// share of the row's loads in flight at once.
#define PREVIOUS_SAMPLE 0x80000000u

template <typename W>
__device__ void embedding(float* out, const W* table, const unsigned int* ids, const unsigned int* previous,
                          unsigned int* coming, unsigned int first, unsigned int end, int rows, int hidden) {
    begin_after_previous_kernels();
    const int t = blockIdx.x;
    unsigned int id = ids[t];
    if (id & PREVIOUS_SAMPLE) {
        const unsigned int token = previous[id & ~PREVIOUS_SAMPLE];
        if (threadIdx.x == 0) coming[id & ~PREVIOUS_SAMPLE] = token;
        id = token >= first && token < end ? token - first : (unsigned int)rows - 1;
    }
    const W* row = table + (size_t)id * hidden;
    float* dst = out + (size_t)t * hidden;
    strided_in_flight<16>(hidden, [&](int i) { return row[i]; }, [&](int i, W v) {
        if (i < hidden) dst[i] = to_float(v);
    });
}

extern "C" __global__ void embedding_bf16(float* __restrict__ out, const __nv_bfloat16* __restrict__ table,
                                          const unsigned int* __restrict__ ids, const unsigned int* __restrict__ previous,
                                          unsigned int* __restrict__ coming, unsigned int first, unsigned int end,
                                          int rows, int hidden) {
    embedding(out, table, ids, previous, coming, first, end, rows, hidden);
}

extern "C" __global__ void embedding_f32(float* __restrict__ out, const float* __restrict__ table,
                                         const unsigned int* __restrict__ ids, const unsigned int* __restrict__ previous,
                                         unsigned int* __restrict__ coming, unsigned int first, unsigned int end,
                                         int rows, int hidden) {
    embedding(out, table, ids, previous, coming, first, end, rows, hidden);
}
