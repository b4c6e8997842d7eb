// An emulated CUDA driver (libcuda.so) that runs on the CPU, so that CI,
// which has no GPU, runs the CUDA backend end to end: cudarc's calls, our
// launch arguments and grid shapes, and kernels/*.cu themselves (compiled
// by g++ against emu.h and registered by name). It checks what a real
// driver would refuse: launch shapes and shared memory over the limits,
// device memory over the emulated capacity, copies outside an allocation,
// a kernel handed a pointer that is not live device memory of its GPU, an
// entry point missing from the PTX, and, during stream capture, any call a
// capture cannot hold (host copies, synchronizations, graph relaunches with
// unfreed allocations). Work runs in the calling thread as it is queued,
// so a stream's order holds trivially; a capturing stream records it.
//
// Settings: SHARDLINE_EMU_GPUS (default 1), SHARDLINE_EMU_GPU_MEMORY (bytes
// per GPU, default 16 GiB), SHARDLINE_EMU_THREADS (CPU threads per launch).
#include <cuda.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "runtime.h"

namespace {

size_t env_size(const char* name, size_t fallback) {
    const char* value = getenv(name);
    return value && *value ? strtoull(value, nullptr, 10) : fallback;
}

int gpu_count() { return (int)env_size("SHARDLINE_EMU_GPUS", 1); }

size_t gpu_memory() { return env_size("SHARDLINE_EMU_GPU_MEMORY", 16ull << 30); }

struct GraphMemory;

struct Allocation {
    size_t bytes;
    int device;
    // The graph whose capture made it (its memory belongs to the graph).
    GraphMemory* graph;
};

// Allocations made while a stream captured: the graph owns them until it
// is destroyed; `unfreed` are those neither its own free nodes nor the
// user (after a launch) have released.
struct GraphMemory {
    std::vector<CUdeviceptr> allocations;
    std::set<CUdeviceptr> unfreed;
    ~GraphMemory();
};

struct Memory {
    std::mutex mutex;
    std::map<CUdeviceptr, Allocation> live;
    std::vector<size_t> used;

    CUresult allocate(CUdeviceptr* out, size_t bytes, int device, GraphMemory* graph) {
        if (!out || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
        std::lock_guard<std::mutex> lock(mutex);
        used.resize(gpu_count(), 0);
        if (used[device] + bytes > gpu_memory()) return CUDA_ERROR_OUT_OF_MEMORY;
        const size_t rounded = (bytes + 255) / 256 * 256;
        void* p = aligned_alloc(256, rounded);
        if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
        // Fresh device memory holds whatever it held: here all bits set (NaN).
        memset(p, 0xff, rounded);
        *out = reinterpret_cast<CUdeviceptr>(p);
        live[*out] = Allocation{bytes, device, graph};
        used[device] += bytes;
        return CUDA_SUCCESS;
    }

    CUresult release(CUdeviceptr ptr) {
        std::lock_guard<std::mutex> lock(mutex);
        auto it = live.find(ptr);
        if (it == live.end()) return CUDA_ERROR_INVALID_VALUE;
        used[it->second.device] -= it->second.bytes;
        free(reinterpret_cast<void*>(ptr));
        live.erase(it);
        return CUDA_SUCCESS;
    }

    // The allocation holding [ptr, ptr + bytes); a pointer one past the end
    // counts when `bytes` is 0 (an empty view that is never read).
    bool find(CUdeviceptr ptr, size_t bytes, Allocation* found) {
        std::lock_guard<std::mutex> lock(mutex);
        auto it = live.upper_bound(ptr);
        if (it == live.begin()) return false;
        --it;
        if (ptr + bytes > it->first + it->second.bytes || (bytes == 0 && ptr > it->first + it->second.bytes)) return false;
        if (found) *found = it->second;
        return true;
    }
};

Memory& memory() {
    static Memory* m = new Memory();
    return *m;
}

GraphMemory::~GraphMemory() {
    for (CUdeviceptr p : allocations) memory().release(p);
}

}  // namespace

struct CUctx_st {
    int device;
    int retained;
};

struct CUgraph_st {
    std::vector<emu::Operation> nodes;
    std::shared_ptr<GraphMemory> memory = std::make_shared<GraphMemory>();
};

struct CUgraphExec_st {
    std::vector<emu::Operation> nodes;
    std::shared_ptr<GraphMemory> memory;
    unsigned long long flags;
    bool launched;
};

struct CUstream_st {
    CUctx_st* ctx;
    CUgraph_st* capture;
    bool invalidated;
};

struct CUmod_st {
    std::string ptx;
};

struct CUfunc_st {
    const emu::Kernel* kernel;
    int max_dynamic_shared;
};

struct CUevent_st {
    std::chrono::steady_clock::time_point at;
};

namespace {

thread_local CUctx_st* current_context;

std::vector<CUctx_st>& primary_contexts() {
    static std::vector<CUctx_st>* contexts = [] {
        auto* v = new std::vector<CUctx_st>(gpu_count());
        for (int i = 0; i < (int)v->size(); ++i) (*v)[i] = CUctx_st{i, 0};
        return v;
    }();
    return *contexts;
}

int stream_device(CUstream stream) {
    if (stream) return stream->ctx->device;
    return current_context ? current_context->device : -1;
}

// A call a capture cannot hold ends the capture (its end reports it invalidated).
CUresult refuse_in_capture(CUstream stream) {
    if (stream && stream->capture) {
        stream->invalidated = true;
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    return CUDA_SUCCESS;
}

constexpr int kDefaultSharedLimit = 48 << 10;
constexpr int kOptInSharedLimit = 227 << 10;

void report(const std::string& what) { fprintf(stderr, "cuda-emu: %s\n", what.c_str()); }

}  // namespace

namespace emu {

int submit(void* s, Operation op) {
    auto* stream = static_cast<CUstream>(s);
    if (stream && stream->capture) {
        stream->capture->nodes.push_back(std::move(op));
        return CUDA_SUCCESS;
    }
    return op();
}

int current_device() { return current_context ? current_context->device : -1; }

bool is_device_memory(uint64_t ptr, size_t bytes) { return memory().find(ptr, bytes, nullptr); }

}  // namespace emu

EMU_EXPORT CUresult cuInit(unsigned int flags) { return flags == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }

EMU_EXPORT CUresult cuDriverGetVersion(int* version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGetCount(int* count) {
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = gpu_count();
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice device) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
    switch (attribute) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *value = 1; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = 132; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *value = kDefaultSharedLimit; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = kOptInSharedLimit; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *value = 1; break;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "shardline emulated GPU %d", device);
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceTotalMem(size_t* bytes, CUdevice device) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = gpu_memory();
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice device) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
    CUctx_st& c = primary_contexts()[device];
    ++c.retained;
    *ctx = &c;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice device) {
    if (device < 0 || device >= gpu_count()) return CUDA_ERROR_INVALID_DEVICE;
    CUctx_st& c = primary_contexts()[device];
    if (c.retained == 0) return CUDA_ERROR_INVALID_CONTEXT;
    --c.retained;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    current_context = ctx;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxGetCurrent(CUcontext* ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = current_context;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxGetDevice(CUdevice* device) {
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (!current_context) return CUDA_ERROR_INVALID_CONTEXT;
    *device = current_context->device;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxSynchronize(void) { return current_context ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT; }

EMU_EXPORT CUresult cuStreamCreate(CUstream* stream, unsigned int) {
    if (!stream) return CUDA_ERROR_INVALID_VALUE;
    if (!current_context) return CUDA_ERROR_INVALID_CONTEXT;
    *stream = new CUstream_st{current_context, nullptr, false};
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamDestroy(CUstream stream) {
    if (!stream) return CUDA_ERROR_INVALID_HANDLE;
    delete stream->capture;
    delete stream;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamSynchronize(CUstream stream) { return refuse_in_capture(stream); }

EMU_EXPORT CUresult cuStreamWaitEvent(CUstream, CUevent event, unsigned int) { return event ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

EMU_EXPORT CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    if (!current_context) return CUDA_ERROR_INVALID_CONTEXT;
    std::lock_guard<std::mutex> lock(memory().mutex);
    memory().used.resize(gpu_count(), 0);
    *total = gpu_memory();
    *free_bytes = *total - memory().used[current_context->device];
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuMemAlloc(CUdeviceptr* ptr, size_t bytes) {
    if (!current_context) return CUDA_ERROR_INVALID_CONTEXT;
    return memory().allocate(ptr, bytes, current_context->device, nullptr);
}

EMU_EXPORT CUresult cuMemAllocAsync(CUdeviceptr* ptr, size_t bytes, CUstream stream) {
    const int device = stream_device(stream);
    if (device < 0) return CUDA_ERROR_INVALID_CONTEXT;
    GraphMemory* graph = stream && stream->capture ? stream->capture->memory.get() : nullptr;
    const CUresult r = memory().allocate(ptr, bytes, device, graph);
    if (r == CUDA_SUCCESS && graph) {
        graph->allocations.push_back(*ptr);
        graph->unfreed.insert(*ptr);
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
            return CUDA_SUCCESS;
        }
        if (a.graph) return CUDA_ERROR_INVALID_VALUE;
        return (CUresult)emu::submit(stream, [ptr] { return (int)memory().release(ptr); });
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
    });
}

EMU_EXPORT CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoDAsync(dst, src, bytes, nullptr); }

EMU_EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream stream) {
    if (!on_device(dst, n)) return CUDA_ERROR_INVALID_VALUE;
    return (CUresult)emu::submit(stream, [=] {
        if (!on_device(dst, n)) return (int)CUDA_ERROR_ILLEGAL_ADDRESS;
        memset(reinterpret_cast<void*>(dst), value, n);
        return (int)CUDA_SUCCESS;
    });
}

EMU_EXPORT CUresult cuMemsetD8(CUdeviceptr dst, unsigned char value, size_t n) { return cuMemsetD8Async(dst, value, n, nullptr); }

EMU_EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int value, size_t n, CUstream stream) {
    if (!on_device(dst, 4 * n) || dst % 4) return CUDA_ERROR_INVALID_VALUE;
    return (CUresult)emu::submit(stream, [=] {
        auto* words = reinterpret_cast<unsigned int*>(dst);
        for (size_t i = 0; i < n; ++i) words[i] = value;
        return (int)CUDA_SUCCESS;
    });
}

EMU_EXPORT CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
    std::string ptx(static_cast<const char*>(image));
    if (ptx.find(".version") == std::string::npos || ptx.find(".target") == std::string::npos) return CUDA_ERROR_INVALID_IMAGE;
    *module = new CUmod_st{std::move(ptx)};
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuModuleUnload(CUmodule module) {
    if (!module) return CUDA_ERROR_INVALID_HANDLE;
    delete module;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
    if (!function || !module || !name) return CUDA_ERROR_INVALID_VALUE;
    const std::string entry = std::string(".entry ") + name;
    const size_t at = module->ptx.find(entry);
    const bool in_ptx = at != std::string::npos && !isalnum((unsigned char)module->ptx[at + entry.size()]) && module->ptx[at + entry.size()] != '_';
    const emu::Kernel* kernel = emu::find_kernel(name);
    if (!in_ptx || !kernel) {
        report(std::string("no entry point ") + name + (in_ptx ? " among the emulated kernels" : " in the module's PTX"));
        return CUDA_ERROR_NOT_FOUND;
    }
    *function = new CUfunc_st{kernel, kDefaultSharedLimit};
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) {
    if (!function) return CUDA_ERROR_INVALID_HANDLE;
    if (attribute != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) return CUDA_ERROR_NOT_SUPPORTED;
    if (value < 0 || value > kOptInSharedLimit) return CUDA_ERROR_INVALID_VALUE;
    function->max_dynamic_shared = value;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuFuncGetAttribute(int* value, CUfunction_attribute attribute, CUfunction function) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    if (!function) return CUDA_ERROR_INVALID_HANDLE;
    switch (attribute) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *value = function->max_dynamic_shared; break;
        default: return CUDA_ERROR_NOT_SUPPORTED;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by, unsigned int bz,
                                   unsigned int shared, CUstream stream, void** params, void** extra) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return CUDA_ERROR_NOT_SUPPORTED;
    const emu::Kernel& kernel = *f->kernel;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535 || threads == 0 || threads > 1024 || bz > 64) {
        report(std::string(kernel.name) + ": launch of grid (" + std::to_string(gx) + ", " + std::to_string(gy) + ", " + std::to_string(gz) +
               ") x block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " + std::to_string(bz) + ")");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((int)shared > f->max_dynamic_shared) {
        report(std::string(kernel.name) + ": " + std::to_string(shared) + " bytes of dynamic shared memory over the function's limit");
        return CUDA_ERROR_INVALID_VALUE;
    }
    const int device = stream_device(stream);
    if (device < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (!params && !kernel.param_sizes.empty()) return CUDA_ERROR_INVALID_VALUE;
    // The driver copies the argument values at launch (and capture) time.
    std::vector<std::vector<char>> values;
    for (size_t i = 0; i < kernel.param_sizes.size(); ++i) {
        const char* p = static_cast<const char*>(params[i]);
        values.emplace_back(p, p + kernel.param_sizes[i]);
    }
    const emu::Dim3 grid{gx, gy, gz}, block{bx, by, bz};
    return (CUresult)emu::submit(stream, [&kernel, values, grid, block, shared, device]() mutable {
        std::vector<void*> args;
        for (size_t i = 0; i < values.size(); ++i) {
            args.push_back(values[i].data());
            if (!kernel.param_is_pointer[i]) continue;
            CUdeviceptr p;
            memcpy(&p, values[i].data(), sizeof p);
            Allocation a;
            if (p != 0 && (!memory().find(p, 0, &a) || a.device != device)) {
                report(std::string(kernel.name) + ": argument " + std::to_string(i) + " is not live device memory of GPU " + std::to_string(device));
                return (int)CUDA_ERROR_ILLEGAL_ADDRESS;
            }
        }
        const std::string failure = emu::run_kernel(kernel, grid, block, shared, args.data());
        if (failure.empty()) return (int)CUDA_SUCCESS;
        report(failure);
        return (int)CUDA_ERROR_LAUNCH_FAILED;
    });
}

EMU_EXPORT CUresult cuStreamBeginCapture(CUstream stream, CUstreamCaptureMode) {
    if (!stream) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (stream->capture) return CUDA_ERROR_ILLEGAL_STATE;
    stream->capture = new CUgraph_st();
    stream->invalidated = false;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
    if (!stream || !graph) return CUDA_ERROR_INVALID_VALUE;
    if (!stream->capture) return CUDA_ERROR_ILLEGAL_STATE;
    CUgraph_st* captured = stream->capture;
    stream->capture = nullptr;
    if (stream->invalidated) {
        delete captured;
        *graph = nullptr;
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    *graph = captured;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus* status) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    *status = !stream || !stream->capture ? CU_STREAM_CAPTURE_STATUS_NONE
              : stream->invalidated       ? CU_STREAM_CAPTURE_STATUS_INVALIDATED
                                          : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphInstantiate(CUgraphExec* exec, CUgraph graph, unsigned long long flags) {
    if (!exec || !graph) return CUDA_ERROR_INVALID_VALUE;
    *exec = new CUgraphExec_st{graph->nodes, graph->memory, flags, false};
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
    if (!exec) return CUDA_ERROR_INVALID_HANDLE;
    if (stream && stream->capture) return CUDA_ERROR_NOT_SUPPORTED;
    const bool auto_free = exec->flags & CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
    if (exec->launched && !exec->memory->unfreed.empty() && !auto_free) {
        report("a graph relaunched while allocations of its last launch are unfreed");
        return CUDA_ERROR_INVALID_VALUE;
    }
    exec->launched = true;
    for (auto& node : exec->nodes) {
        const int r = node();
        if (r != CUDA_SUCCESS) return (CUresult)r;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphUpload(CUgraphExec exec, CUstream) { return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

EMU_EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
    if (!exec) return CUDA_ERROR_INVALID_HANDLE;
    delete exec;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphDestroy(CUgraph graph) {
    if (!graph) return CUDA_ERROR_INVALID_HANDLE;
    delete graph;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuEventCreate(CUevent* event, unsigned int) {
    if (!event) return CUDA_ERROR_INVALID_VALUE;
    *event = new CUevent_st{std::chrono::steady_clock::now()};
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuEventRecord(CUevent event, CUstream stream) {
    if (!event) return CUDA_ERROR_INVALID_HANDLE;
    return (CUresult)emu::submit(stream, [event] {
        event->at = std::chrono::steady_clock::now();
        return (int)CUDA_SUCCESS;
    });
}

EMU_EXPORT CUresult cuEventSynchronize(CUevent event) { return event ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

EMU_EXPORT CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    if (!start || !end) return CUDA_ERROR_INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuEventDestroy(CUevent event) {
    if (!event) return CUDA_ERROR_INVALID_HANDLE;
    delete event;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGetErrorName(CUresult error, const char** name) {
    if (!name) return CUDA_ERROR_INVALID_VALUE;
    switch (error) {
#define NAME(e) \
    case e: *name = #e; break;
        NAME(CUDA_SUCCESS)
        NAME(CUDA_ERROR_INVALID_VALUE)
        NAME(CUDA_ERROR_OUT_OF_MEMORY)
        NAME(CUDA_ERROR_NOT_INITIALIZED)
        NAME(CUDA_ERROR_INVALID_DEVICE)
        NAME(CUDA_ERROR_INVALID_IMAGE)
        NAME(CUDA_ERROR_INVALID_CONTEXT)
        NAME(CUDA_ERROR_INVALID_HANDLE)
        NAME(CUDA_ERROR_NOT_FOUND)
        NAME(CUDA_ERROR_ILLEGAL_ADDRESS)
        NAME(CUDA_ERROR_LAUNCH_FAILED)
        NAME(CUDA_ERROR_ILLEGAL_STATE)
        NAME(CUDA_ERROR_NOT_SUPPORTED)
        NAME(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
        NAME(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)
#undef NAME
        default: *name = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGetErrorString(CUresult error, const char** text) {
    if (!text) return CUDA_ERROR_INVALID_VALUE;
    cuGetErrorName(error, text);
    return CUDA_SUCCESS;
}

// NVRTC opens libcuda for private tables of the real driver: there are none here.
EMU_EXPORT CUresult cuGetExportTable(const void** table, const CUuuid*) {
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_FOUND;
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
