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
#include <cstring>

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

