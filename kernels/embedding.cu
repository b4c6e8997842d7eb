// Token embedding lookup: out[t, :] = table[ids[t], :], widened to f32.
// Vocab-parallel ranks pass ids already mapped into their slice (ids of
// other ranks point at the slice's zero row).
extern "C" __global__ void embedding_bf16(
    float* __restrict__ out,                 // [tokens, hidden]
    const __nv_bfloat16* __restrict__ table, // [rows, hidden]
    const unsigned int* __restrict__ ids,    // [tokens]
    int hidden) {
    const int t = blockIdx.x;
    const __nv_bfloat16* row = table + (size_t)ids[t] * hidden;
    float* dst = out + (size_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        dst[i] = __bfloat162float(row[i]);
    }
}
