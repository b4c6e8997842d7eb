// An emulated cuBLAS (libcublas.so): the handle calls cudarc makes and
// cublasGemmEx, computed on the CPU by cuBLAS's documented column-major
// definition, C = alpha·op(A)·op(B) + beta·C with f32 accumulation, so a
// wrong transpose, leading dimension or dtype in our GEMM call gives wrong
// numbers here as it would on a GPU. Leading dimensions below their minimum
// and operands outside device memory are refused as cuBLAS refuses them.
// A GEMM is queued on the handle's stream (so a graph capture records it).
#include <math.h>

#include <cstdint>
#include <cstring>

#include "runtime.h"

namespace {

enum Status { SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15 };
enum DataType { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum Operation { OP_N = 0, OP_T = 1, OP_C = 2 };

struct Handle {
    void* stream;
    void* workspace;
};

float from_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

float from_f16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const int exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    float magnitude;
    if (exponent == 0) {
        magnitude = ldexpf((float)mantissa, -24);
    } else if (exponent == 31) {
        magnitude = mantissa ? NAN : INFINITY;
    } else {
        magnitude = ldexpf((float)(mantissa | 0x400), exponent - 25);
    }
    uint32_t bits;
    memcpy(&bits, &magnitude, 4);
    bits |= sign;
    memcpy(&magnitude, &bits, 4);
    return magnitude;
}

uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

size_t element_size(int type) { return type == R_32F ? 4 : 2; }

float widen(float v) { return v; }
float widen(uint16_t v) { return from_bf16(v); }

struct F16 {
    uint16_t bits;
};
float widen(F16 v) { return from_f16(v.bits); }

// Σ_l a[l·sa]·b[l·sb], with eight partial sums where both are contiguous
// (so the compiler vectorizes it).
template <typename TA, typename TB>
float dot(const TA* a, size_t sa, const TB* b, size_t sb, int k) {
    if (sa == 1 && sb == 1) {
        float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int l = 0;
        for (; l + 8 <= k; l += 8)
            for (int u = 0; u < 8; ++u) partial[u] += widen(a[l + u]) * widen(b[l + u]);
        float sum = 0.0f;
        for (int u = 0; u < 8; ++u) sum += partial[u];
        for (; l < k; ++l) sum += widen(a[l]) * widen(b[l]);
        return sum;
    }
    float sum = 0.0f;
    for (int l = 0; l < k; ++l) sum += widen(a[l * sa]) * widen(b[l * sb]);
    return sum;
}

float load_c(const void* c, int type, size_t i) {
    return type == R_32F ? static_cast<const float*>(c)[i] : from_bf16(static_cast<const uint16_t*>(c)[i]);
}

// Column j of C = alpha·op(A)·op(B) + beta·C.
template <typename T>
void gemm_column(size_t j, int transa, int transb, int m, int k, float alpha, const T* A, int lda, const T* B, int ldb, float beta, void* C,
                 int c_type, int ldc) {
    const size_t a_row = transa == OP_N ? 1 : lda, a_step = transa == OP_N ? lda : 1;
    const T* b = transb == OP_N ? B + j * ldb : B + j;
    const size_t b_step = transb == OP_N ? 1 : ldb;
    for (int i = 0; i < m; ++i) {
        const size_t ci = i + j * ldc;
        // beta == 0 ignores C's old contents (which may be NaN), as cuBLAS does.
        float value = alpha * dot(A + i * a_row, a_step, b, b_step, k);
        if (beta != 0.0f) value += beta * load_c(C, c_type, ci);
        if (c_type == R_32F) {
            static_cast<float*>(C)[ci] = value;
        } else {
            static_cast<uint16_t*>(C)[ci] = to_bf16(value);
        }
    }
}

// Whether a column-major rows × cols operand with leading dimension ld lies in device memory.
bool operand_on_device(const void* p, int type, int rows, int cols, int ld) {
    if (rows == 0 || cols == 0) return true;
    const size_t elements = (size_t)ld * (cols - 1) + rows;
    return emu::is_device_memory(reinterpret_cast<uint64_t>(p), elements * element_size(type));
}

}  // namespace

EMU_EXPORT int cublasCreate_v2(void** handle) {
    if (!handle) return INVALID_VALUE;
    *handle = new Handle{nullptr, nullptr};
    return SUCCESS;
}

EMU_EXPORT int cublasDestroy_v2(void* handle) {
    if (!handle) return NOT_INITIALIZED;
    delete static_cast<Handle*>(handle);
    return SUCCESS;
}

EMU_EXPORT int cublasSetStream_v2(void* handle, void* stream) {
    if (!handle) return NOT_INITIALIZED;
    static_cast<Handle*>(handle)->stream = stream;
    return SUCCESS;
}

// A workspace the caller owns: in device memory and 256-byte aligned, as
// cuBLAS requires (the emulated GEMM needs none, so it is only checked).
EMU_EXPORT int cublasSetWorkspace_v2(void* handle, void* workspace, size_t bytes) {
    if (!handle) return NOT_INITIALIZED;
    const uint64_t address = reinterpret_cast<uint64_t>(workspace);
    if (bytes > 0 && (address % 256 != 0 || !emu::is_device_memory(address, bytes))) return INVALID_VALUE;
    static_cast<Handle*>(handle)->workspace = workspace;
    return SUCCESS;
}

EMU_EXPORT int cublasGetStream_v2(void* handle, void** stream) {
    if (!handle) return NOT_INITIALIZED;
    if (!stream) return INVALID_VALUE;
    *stream = static_cast<Handle*>(handle)->stream;
    return SUCCESS;
}

EMU_EXPORT int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int a_type, int lda,
                            const void* B, int b_type, int ldb, const void* beta, void* C, int c_type, int ldc, int compute_type, int) {
    if (!handle) return NOT_INITIALIZED;
    const bool supported = [](int t) { return t == R_32F || t == R_16F || t == R_16BF; }(a_type) && a_type == b_type && (c_type == R_32F || c_type == R_16BF);
    // CUBLAS_COMPUTE_32F (68) and its pedantic and fast variants (69, 74, 75, 77).
    const bool f32_compute = compute_type == 68 || compute_type == 69 || compute_type == 74 || compute_type == 75 || compute_type == 77;
    if (!supported || !f32_compute) return NOT_SUPPORTED;
    if (m < 0 || n < 0 || k < 0 || transa < OP_N || transa > OP_C || transb < OP_N || transb > OP_C) return INVALID_VALUE;
    const int a_rows = transa == OP_N ? m : k, a_cols = transa == OP_N ? k : m;
    const int b_rows = transb == OP_N ? k : n, b_cols = transb == OP_N ? n : k;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1)) return INVALID_VALUE;
    if (!alpha || !beta) return INVALID_VALUE;
    if (!operand_on_device(A, a_type, a_rows, a_cols, lda) || !operand_on_device(B, b_type, b_rows, b_cols, ldb) ||
        !operand_on_device(C, c_type, m, n, ldc))
        return EXECUTION_FAILED;
    const float a_scale = *static_cast<const float*>(alpha), c_scale = *static_cast<const float*>(beta);
    const int status = emu::submit(static_cast<Handle*>(handle)->stream, [=] {
        emu::parallel_for((size_t)n, [&](size_t j) {
            switch (a_type) {
                case R_32F:
                    gemm_column(j, transa, transb, m, k, a_scale, static_cast<const float*>(A), lda, static_cast<const float*>(B), ldb, c_scale, C, c_type, ldc);
                    break;
                case R_16BF:
                    gemm_column(j, transa, transb, m, k, a_scale, static_cast<const uint16_t*>(A), lda, static_cast<const uint16_t*>(B), ldb, c_scale, C, c_type,
                                ldc);
                    break;
                default:
                    gemm_column(j, transa, transb, m, k, a_scale, static_cast<const F16*>(A), lda, static_cast<const F16*>(B), ldb, c_scale, C, c_type, ldc);
                    break;
            }
        });
        return 0;
    });
    return status == 0 ? SUCCESS : EXECUTION_FAILED;
}
