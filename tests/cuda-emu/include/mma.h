// The WMMA API (nvcuda::wmma) for kernels compiled on the CPU under the
// emulated driver, for the one shape the kernels use: 16x16x16 tiles, bf16
// operands, f32 accumulators.
//
// CUDA leaves unspecified which lane holds which element of a fragment, so
// a kernel may only touch an accumulator's elements in ways that do not
// depend on it. Here lane L holds elements L, L + 32, … of the row-major
// tile, a different placement from a real GPU's, so a kernel that assumed
// the GPU's gives wrong results. Operand fragments hold the whole tile in
// every lane and have no elements to touch. Pointers and strides are
// checked as a GPU requires (256-bit aligned, the stride a multiple of 16
// bytes, the tile inside shared or device memory), and mma_sync waits for
// the whole warp, so a diverged warp fails the launch.
#pragma once

#include "cuda_bf16.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment;

// An operand: A (row i, column k) or B (row k, column j), widened to f32.
template <class Use, class Layout>
struct fragment<Use, 16, 16, 16, __nv_bfloat16, Layout> {
    float tile[16][16];
};

template <>
struct fragment<accumulator, 16, 16, 16, float, void> {
    static constexpr int num_elements = 8;
    float x[num_elements];
};

namespace emu_detail {

// Element `e` of this lane's accumulator: its row and column.
inline int row_of(int e) { return (e * 32 + emu::lane_id()) / 16; }
inline int col_of(int e) { return (e * 32 + emu::lane_id()) % 16; }

inline void check_tile(const void* p, unsigned ldm, size_t element, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 32) emu::fail_launch(std::string(what) + ": pointer not 256-bit aligned");
    if (ldm * element % 16 || ldm < 16) emu::fail_launch(std::string(what) + ": stride " + std::to_string(ldm) + " not a multiple of 16 bytes of at least one row");
    if (!emu::is_kernel_memory(p, (15 * (size_t)ldm + 16) * element)) emu::fail_launch(std::string(what) + ": tile outside shared and device memory");
}

inline bool row_major_layout(row_major) { return true; }
inline bool row_major_layout(col_major) { return false; }

}  // namespace emu_detail

template <class Use, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f, const __nv_bfloat16* p, unsigned ldm) {
    emu_detail::check_tile(p, ldm, sizeof(__nv_bfloat16), "wmma::load_matrix_sync");
    const bool rows = emu_detail::row_major_layout(Layout{});
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) f.tile[i][j] = __bfloat162float(rows ? p[i * ldm + j] : p[j * ldm + i]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t layout) {
    emu_detail::check_tile(p, ldm, sizeof(float), "wmma::load_matrix_sync");
    for (int e = 0; e < f.num_elements; ++e) {
        const int i = emu_detail::row_of(e), j = emu_detail::col_of(e);
        f.x[e] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
    }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
    emu_detail::check_tile(p, ldm, sizeof(float), "wmma::store_matrix_sync");
    for (int e = 0; e < f.num_elements; ++e) {
        const int i = emu_detail::row_of(e), j = emu_detail::col_of(e);
        (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[e];
    }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = v;
}

template <class LayoutA, class LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    __syncwarp();
    for (int e = 0; e < d.num_elements; ++e) {
        const int i = emu_detail::row_of(e), j = emu_detail::col_of(e);
        float sum = c.x[e];
        for (int k = 0; k < 16; ++k) sum += a.tile[i][k] * b.tile[k][j];
        d.x[e] = sum;
    }
}

}  // namespace wmma
}  // namespace nvcuda
