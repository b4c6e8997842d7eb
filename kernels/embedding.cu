// Token embedding lookup: out[t, :] = table[ids[t], :], widened to f32.
// Vocab-parallel ranks pass ids already mapped into their slice (ids of
// other ranks point at the slice's zero row). One block per token.
template <typename W>
__device__ void embedding(float* out, const W* table, const unsigned int* ids, int hidden) {
    const int t = blockIdx.x;
    const W* row = table + (size_t)ids[t] * hidden;
    float* dst = out + (size_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = to_float(row[i]);
}

extern "C" __global__ void embedding_bf16(
    float* __restrict__ out, const __nv_bfloat16* __restrict__ table, const unsigned int* __restrict__ ids, int hidden) {
    embedding(out, table, ids, hidden);
}

extern "C" __global__ void embedding_f32(
    float* __restrict__ out, const float* __restrict__ table, const unsigned int* __restrict__ ids, int hidden) {
    embedding(out, table, ids, hidden);
}
