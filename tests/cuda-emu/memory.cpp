// The emulated driver's device memory: allocations (filled with all bits
// set, as fresh memory may hold anything), frees in stream order or into a
// capturing graph, copies and sets checked against the allocations they
// touch, and page-locked host memory (ordinary memory here).
#include <cstring>

#include "driver.h"

using namespace emu::driver;

namespace emu::driver {

CUresult Memory::allocate(CUdeviceptr* out, size_t bytes, int device, GraphMemory* graph) {
    if (!out || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(mutex);
    used.resize(gpu_count(), 0);
    if (used[device] + bytes > gpu_memory()) return CUDA_ERROR_OUT_OF_MEMORY;
    const size_t rounded = (bytes + 255) / 256 * 256;
    void* p = aligned_alloc(256, rounded);
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    memset(p, 0xff, rounded);
    *out = reinterpret_cast<CUdeviceptr>(p);
    live[*out] = Allocation{bytes, device, graph, next_serial++};
    used[device] += bytes;
    return CUDA_SUCCESS;
}

CUresult Memory::release(CUdeviceptr ptr) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = live.find(ptr);
    if (it == live.end()) return CUDA_ERROR_INVALID_VALUE;
    used[it->second.device] -= it->second.bytes;
    free(reinterpret_cast<void*>(ptr));
    live.erase(it);
    return CUDA_SUCCESS;
}

bool Memory::find(CUdeviceptr ptr, size_t bytes, Allocation* found) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = live.upper_bound(ptr);
    if (it == live.begin()) return false;
    --it;
    if (ptr + bytes > it->first + it->second.bytes || (bytes == 0 && ptr > it->first + it->second.bytes)) return false;
    if (found) *found = it->second;
    return true;
}

bool Memory::extent(CUdeviceptr ptr, CUdeviceptr* base, size_t* bytes, uint64_t* serial) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = live.upper_bound(ptr);
    if (it == live.begin()) return false;
    --it;
    if (ptr >= it->first + it->second.bytes) return false;
    *base = it->first;
    *bytes = it->second.bytes;
    *serial = it->second.serial;
    return true;
}

bool Memory::is_live(CUdeviceptr base, uint64_t serial) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = live.find(base);
    return it != live.end() && it->second.serial == serial;
}

Memory& memory() {
    static Memory* m = new Memory();
    return *m;
}

GraphMemory::~GraphMemory() {
    for (CUdeviceptr p : allocations) memory().release(p);
}

}  // namespace emu::driver

bool emu::is_device_memory(uint64_t ptr, size_t bytes) { return memory().find(ptr, bytes, nullptr); }

EMU_EXPORT CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    if (!current_context()) return CUDA_ERROR_INVALID_CONTEXT;
    std::lock_guard<std::mutex> lock(memory().mutex);
    memory().used.resize(gpu_count(), 0);
    *total = gpu_memory();
    *free_bytes = *total - memory().used[current_context()->device];
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuMemAlloc(CUdeviceptr* ptr, size_t bytes) {
    if (!current_context()) return CUDA_ERROR_INVALID_CONTEXT;
    return memory().allocate(ptr, bytes, current_context()->device, nullptr);
}

EMU_EXPORT CUresult cuMemAllocAsync(CUdeviceptr* ptr, size_t bytes, CUstream stream) {
    const int device = stream_device(stream);
    if (device < 0) return CUDA_ERROR_INVALID_CONTEXT;
    GraphMemory* graph = stream && stream->capture ? stream->capture->memory.get() : nullptr;
    const CUresult r = memory().allocate(ptr, bytes, device, graph);
    if (r == CUDA_SUCCESS && graph) {
        graph->allocations.push_back(*ptr);
        graph->unfreed.insert(*ptr);
        emu::submit(stream, [] { return (int)CUDA_SUCCESS; }, emu::NodeKind::MemAlloc);
    }
    return r;
}

EMU_EXPORT CUresult cuMemFree(CUdeviceptr ptr) { return memory().release(ptr); }

EMU_EXPORT CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream stream) {
    Allocation a;
    if (!memory().find(ptr, 1, &a)) return CUDA_ERROR_INVALID_VALUE;
    if (stream && stream->capture) {
        if (a.graph == stream->capture->memory.get()) {
            a.graph->unfreed.erase(ptr);
            return (CUresult)emu::submit(stream, [] { return (int)CUDA_SUCCESS; }, emu::NodeKind::MemFree);
        }
        if (a.graph) return CUDA_ERROR_INVALID_VALUE;
        return (CUresult)emu::submit(stream, [ptr] { return (int)memory().release(ptr); }, emu::NodeKind::MemFree);
    }
    // Memory a graph made: released for its next launch, kept until it goes.
    if (a.graph) {
        a.graph->unfreed.erase(ptr);
        return CUDA_SUCCESS;
    }
    return memory().release(ptr);
}

namespace {

CUresult copy(CUstream stream, void* dst, const void* src, size_t bytes) {
    const CUresult refused = refuse_in_capture(stream);
    if (refused == CUDA_SUCCESS) memcpy(dst, src, bytes);
    return refused;
}

bool on_device(CUdeviceptr p, size_t bytes) { return memory().find(p, bytes, nullptr); }

}  // namespace

EMU_EXPORT CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream) {
    if (!on_device(dst, bytes) || !src) return CUDA_ERROR_INVALID_VALUE;
    return copy(stream, reinterpret_cast<void*>(dst), src, bytes);
}

EMU_EXPORT CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    if (!on_device(src, bytes) || !dst) return CUDA_ERROR_INVALID_VALUE;
    return copy(stream, dst, reinterpret_cast<const void*>(src), bytes);
}

EMU_EXPORT CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t bytes) { return cuMemcpyHtoDAsync(dst, src, bytes, nullptr); }

EMU_EXPORT CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoHAsync(dst, src, bytes, nullptr); }

EMU_EXPORT CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    if (!on_device(dst, bytes) || !on_device(src, bytes)) return CUDA_ERROR_INVALID_VALUE;
    return (CUresult)emu::submit(stream, [=] {
        if (!on_device(dst, bytes) || !on_device(src, bytes)) return (int)CUDA_ERROR_ILLEGAL_ADDRESS;
        memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
        return (int)CUDA_SUCCESS;
    }, emu::NodeKind::Memcpy);
}

EMU_EXPORT CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoDAsync(dst, src, bytes, nullptr); }

EMU_EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream stream) {
    if (!on_device(dst, n)) return CUDA_ERROR_INVALID_VALUE;
    return (CUresult)emu::submit(stream, [=] {
        if (!on_device(dst, n)) return (int)CUDA_ERROR_ILLEGAL_ADDRESS;
        memset(reinterpret_cast<void*>(dst), value, n);
        return (int)CUDA_SUCCESS;
    }, emu::NodeKind::Memset);
}

EMU_EXPORT CUresult cuMemsetD8(CUdeviceptr dst, unsigned char value, size_t n) { return cuMemsetD8Async(dst, value, n, nullptr); }

EMU_EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int value, size_t n, CUstream stream) {
    if (!on_device(dst, 4 * n) || dst % 4) return CUDA_ERROR_INVALID_VALUE;
    return (CUresult)emu::submit(stream, [=] {
        auto* words = reinterpret_cast<unsigned int*>(dst);
        for (size_t i = 0; i < n; ++i) words[i] = value;
        return (int)CUDA_SUCCESS;
    }, emu::NodeKind::Memset);
}

// Page-locked host memory is ordinary memory here: copies run as they are queued.
EMU_EXPORT CUresult cuMemHostAlloc(void** ptr, size_t bytes, unsigned int) {
    if (!ptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    *ptr = aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    return *ptr ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

EMU_EXPORT CUresult cuMemAllocHost(void** ptr, size_t bytes) { return cuMemHostAlloc(ptr, bytes, 0); }

EMU_EXPORT CUresult cuMemFreeHost(void* ptr) {
    free(ptr);
    return CUDA_SUCCESS;
}
