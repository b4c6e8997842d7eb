// The cp.async primitives for kernels compiled on the CPU under the
// emulated driver: each copy waits in its thread's queue until a
// __pipeline_wait_prior covers its group (threads.cpp), so a kernel that
// reads shared memory before waiting reads stale bytes, as on a GPU.
#pragma once

#include <stddef.h>

inline void __pipeline_memcpy_async(void* shared, const void* global, size_t bytes, size_t zero_fill = 0) {
    if (zero_fill != 0) emu::fail_launch("__pipeline_memcpy_async with zero fill is not emulated");
    emu::pipeline_copy(shared, global, bytes);
}

inline void __pipeline_commit() { emu::pipeline_commit(); }

inline void __pipeline_wait_prior(size_t prior) { emu::pipeline_wait(prior); }
