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
// so a stream's order holds trivially; a capturing stream records it
// (graphs.cpp). Device memory lives in memory.cpp; this file has devices,
// contexts, streams, modules, launches, events and error names.
//
// Settings: SHARDLINE_EMU_GPUS (default 1), SHARDLINE_EMU_GPU_MEMORY (bytes
// per GPU, default 16 GiB), SHARDLINE_EMU_THREADS (CPU threads per launch).
#include <algorithm>
#include <cstring>
#include <functional>

#include "driver.h"

using namespace emu::driver;

namespace {

constexpr int kDefaultSharedLimit = 48 << 10;
constexpr int kOptInSharedLimit = 227 << 10;

std::vector<CUctx_st>& primary_contexts() {
    static std::vector<CUctx_st>* contexts = [] {
        auto* v = new std::vector<CUctx_st>(gpu_count());
        for (int i = 0; i < (int)v->size(); ++i) (*v)[i] = CUctx_st{i, 0};
        return v;
    }();
    return *contexts;
}

}  // namespace

namespace emu::driver {

CUctx_st*& current_context() {
    static thread_local CUctx_st* current;
    return current;
}

int stream_device(CUstream stream) {
    if (stream) return stream->ctx->device;
    return current_context() ? current_context()->device : -1;
}

CUresult refuse_in_capture(CUstream stream) {
    if (stream && stream->capture) {
        stream->invalidated = true;
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    return CUDA_SUCCESS;
}

}  // namespace emu::driver

int emu::current_device() { return current_context() ? current_context()->device : -1; }

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
    current_context() = ctx;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxGetCurrent(CUcontext* ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = current_context();
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxGetDevice(CUdevice* device) {
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (!current_context()) return CUDA_ERROR_INVALID_CONTEXT;
    *device = current_context()->device;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxSynchronize(void) { return current_context() ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT; }

EMU_EXPORT CUresult cuStreamCreate(CUstream* stream, unsigned int) {
    if (!stream) return CUDA_ERROR_INVALID_VALUE;
    if (!current_context()) return CUDA_ERROR_INVALID_CONTEXT;
    *stream = new CUstream_st{current_context(), nullptr, false};
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

namespace {

// Device memory a kernel changed, as it was before: `before` holds the
// bytes from `at` of allocation `serial` at `base` (which another thread
// may have made anew at that address since).
struct Written {
    CUdeviceptr base;
    uint64_t serial;
    CUdeviceptr at;
    std::vector<char> before;
};

// How far past an output argument a kernel's writes are kept: enough for
// the activations a test's model passes on, not a whole KV cache or arena.
constexpr size_t kWindow = 256 << 10;

// What the last kernel this thread ran changed, for a programmatic launch
// after it to undo while its block 0 reads ahead of its wait.
std::vector<Written>& previous_writes() {
    static thread_local std::vector<Written> writes;
    return writes;
}

// The memory from each output argument of the kernel (up to kWindow
// bytes of its allocation), as it is now.
std::vector<Written> snapshot_outputs(const emu::Kernel& kernel, const std::vector<void*>& args) {
    std::vector<Written> outputs;
    for (size_t i = 0; i < args.size(); ++i) {
        if (!kernel.param_is_output[i]) continue;
        CUdeviceptr p, base;
        size_t bytes;
        uint64_t serial;
        memcpy(&p, args[i], sizeof p);
        if (p == 0 || !memory().extent(p, &base, &bytes, &serial)) continue;
        if (std::any_of(outputs.begin(), outputs.end(), [&](const Written& w) { return w.at == p; })) continue;
        const char* at = reinterpret_cast<const char*>(p);
        outputs.push_back(Written{base, serial, p, std::vector<char>(at, at + std::min<size_t>(kWindow, base + bytes - p))});
    }
    return outputs;
}

// Exchanges the memory of each window still live with its saved bytes;
// windows may overlap, so the exchange back runs in reverse.
template <typename It>
void swap_with_memory(It first, It last) {
    for (; first != last; ++first) {
        if (!memory().is_live(first->base, first->serial)) continue;
        std::swap_ranges(first->before.begin(), first->before.end(), reinterpret_cast<char*>(first->at));
    }
}

CUresult launch(CUfunction f, emu::Dim3 grid, emu::Dim3 block, unsigned int shared, CUstream stream, void** params, void** extra,
                bool programmatic) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return CUDA_ERROR_NOT_SUPPORTED;
    const emu::Kernel& kernel = *f->kernel;
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || threads == 0 || threads > 1024 || block.z > 64) {
        report(std::string(kernel.name) + ": launch of grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
               std::to_string(grid.z) + ") x block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
               std::to_string(block.z) + ")");
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
    return (CUresult)emu::submit(stream, [&kernel, values, grid, block, shared, device, programmatic]() mutable {
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
        std::vector<Written> outputs = snapshot_outputs(kernel, args);
        std::vector<Written>& previous = previous_writes();
        const bool undo = programmatic && !previous.empty();
        if (undo) swap_with_memory(previous.begin(), previous.end());
        const std::function<void()> redo = [&previous] { swap_with_memory(previous.rbegin(), previous.rend()); };
        const std::string failure = emu::run_kernel(kernel, grid, block, shared, args.data(), programmatic, undo ? &redo : nullptr);
        // What this kernel changed, for the next one.
        previous.clear();
        for (Written& w : outputs)
            if (memcmp(w.before.data(), reinterpret_cast<const void*>(w.at), w.before.size()) != 0) previous.push_back(std::move(w));
        if (failure.empty()) return (int)CUDA_SUCCESS;
        report(failure);
        return (int)CUDA_ERROR_LAUNCH_FAILED;
    }, emu::NodeKind::Kernel, programmatic);
}

}  // namespace

EMU_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by, unsigned int bz,
                                   unsigned int shared, CUstream stream, void** params, void** extra) {
    return launch(f, emu::Dim3{gx, gy, gz}, emu::Dim3{bx, by, bz}, shared, stream, params, extra, false);
}

// Of the launch attributes, only programmatic stream serialization.
EMU_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig* config, CUfunction f, void** params, void** extra) {
    if (!config || (config->numAttrs > 0 && !config->attrs)) return CUDA_ERROR_INVALID_VALUE;
    bool programmatic = false;
    for (unsigned int i = 0; i < config->numAttrs; ++i) {
        if (config->attrs[i].id != CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) return CUDA_ERROR_NOT_SUPPORTED;
        programmatic = config->attrs[i].value.programmaticStreamSerializationAllowed != 0;
    }
    return launch(f, emu::Dim3{config->gridDimX, config->gridDimY, config->gridDimZ}, emu::Dim3{config->blockDimX, config->blockDimY, config->blockDimZ},
                  config->sharedMemBytes, config->hStream, params, extra, programmatic);
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
    }, emu::NodeKind::EventRecord);
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

