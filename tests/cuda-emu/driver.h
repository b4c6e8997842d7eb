// What the emulated driver's files share (driver.cpp, memory.cpp,
// graphs.cpp): the objects behind CUDA's handles, the device memory's
// bookkeeping, and the settings. Nothing here is exported.
#pragma once

#include <cuda.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "runtime.h"

namespace emu::driver {

inline size_t env_size(const char* name, size_t fallback) {
    const char* value = getenv(name);
    return value && *value ? strtoull(value, nullptr, 10) : fallback;
}

inline int gpu_count() { return (int)env_size("SHARDLINE_EMU_GPUS", 1); }

inline size_t gpu_memory() { return env_size("SHARDLINE_EMU_GPU_MEMORY", 16ull << 30); }

inline void report(const std::string& what) { fprintf(stderr, "cuda-emu: %s\n", what.c_str()); }

struct GraphMemory;

struct Allocation {
    size_t bytes;
    int device;
    // The graph whose capture made it (its memory belongs to the graph).
    GraphMemory* graph;
    // Which allocation this is, of all the process made (an address is
    // reused once freed).
    uint64_t serial;
};

// Allocations made while a stream captured: the graph owns them until it
// is destroyed; `unfreed` are those neither its own free nodes nor the
// user (after a launch) have released.
struct GraphMemory {
    std::vector<CUdeviceptr> allocations;
    std::set<CUdeviceptr> unfreed;
    ~GraphMemory();
};

// Every live device allocation, by address (device pointers are host
// pointers here), and each GPU's bytes in use.
struct Memory {
    std::mutex mutex;
    std::map<CUdeviceptr, Allocation> live;
    std::vector<size_t> used;

    CUresult allocate(CUdeviceptr* out, size_t bytes, int device, GraphMemory* graph);
    CUresult release(CUdeviceptr ptr);
    // The allocation holding [ptr, ptr + bytes); a pointer one past the end
    // counts when `bytes` is 0 (an empty view that is never read).
    bool find(CUdeviceptr ptr, size_t bytes, Allocation* found);
    // The start, size and serial of the live allocation holding ptr.
    bool extent(CUdeviceptr ptr, CUdeviceptr* base, size_t* bytes, uint64_t* serial);
    // Whether allocation `serial` is still live at base.
    bool is_live(CUdeviceptr base, uint64_t serial);
    uint64_t next_serial = 0;
};

Memory& memory();

// The calling thread's current context.
CUctx_st*& current_context();

// The device a stream's work runs on (the current context's for stream 0), or -1.
int stream_device(CUstream stream);

// A call a capture cannot hold ends the capture (its end reports it invalidated).
CUresult refuse_in_capture(CUstream stream);

}  // namespace emu::driver

struct CUctx_st {
    int device;
    int retained;
};

struct CUgraphNode_st {
    emu::NodeKind kind;
    bool programmatic;
};

struct CUgraph_st {
    std::vector<emu::Operation> nodes;
    // What each node is, in order: a capture from one stream is a chain.
    std::vector<std::unique_ptr<CUgraphNode_st>> kinds;
    std::shared_ptr<emu::driver::GraphMemory> memory = std::make_shared<emu::driver::GraphMemory>();
};

struct CUgraphExec_st {
    std::vector<emu::Operation> nodes;
    std::shared_ptr<emu::driver::GraphMemory> memory;
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
