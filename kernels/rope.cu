// Rotary embedding, neox layout, in place on the q and k heads of a fused
// qkv row: for i < head_dim/2, (x[i], x[i+half]) rotate by the angle of
// (position, i). cos_sin[p] holds cos of the half angles, then their sin.
extern "C" __global__ void rope_neox_f32(
    float* __restrict__ qkv,                 // [tokens, (heads + 2*kv_heads) * head_dim]
    const unsigned int* __restrict__ positions,
    const float* __restrict__ cos_sin,       // [max_positions, head_dim]
    int heads, int kv_heads, int head_dim) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const int rotated = heads + kv_heads;    // q heads, then k heads; v is untouched
    const int width = (heads + 2 * kv_heads) * head_dim;
    const float* cs = cos_sin + (size_t)positions[t] * head_dim;
    float* row = qkv + (size_t)t * width;
    for (int j = threadIdx.x; j < rotated * half; j += blockDim.x) {
        const int head = j / half, i = j % half;
        float* x = row + head * head_dim;
        const float c = cs[i], s = cs[half + i];
        const float a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}
