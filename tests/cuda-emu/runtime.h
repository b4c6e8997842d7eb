// What the emulated driver, cuBLAS and NCCL share: the registry of kernels
// compiled from kernels/*.cu, a launch over fibers (threads.cpp), a
// parallel loop over the CPU's cores, and the streams' ordering of work
// (driver.cpp), which a graph capture records instead of running.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace emu {

// One kernel entry point, called with cuLaunchKernel's `void** params`.
struct Kernel {
    const char* name;
    void (*call)(void* fn, void** params);
    void* fn;
    std::vector<size_t> param_sizes;
    std::vector<bool> param_is_pointer;
    // Pointers to what the kernel may write (not to const).
    std::vector<bool> param_is_output;
};

void register_kernel(Kernel kernel);
const Kernel* find_kernel(const std::string& name);

struct Dim3 {
    unsigned int x, y, z;
};

// Runs every block of a launch; returns what went wrong, or "". A
// programmatic launch must wait for the previous kernels somewhere; with
// `inputs_ready`, block 0 runs first, alone, and calls it once every one
// of its threads waits or has exited (the previous kernel's writes are
// undone until then).
std::string run_kernel(const Kernel& kernel, Dim3 grid, Dim3 block, size_t shared_bytes, void** params, bool programmatic,
                       const std::function<void()>* inputs_ready);

// body(i) for i in [0, n), spread over the emulator's threads.
void parallel_for(size_t n, const std::function<void(size_t)>& body);

// The work of one stream operation: run now, or recorded in the graph the
// stream is capturing and run at each launch of it. Returns a CUresult.
using Operation = std::function<int()>;
// What a capture records an operation as (a CUgraphNodeType).
enum class NodeKind { Kernel, Memcpy, Memset, MemAlloc, MemFree, EventRecord };
// Queues `op` on `stream` (a CUstream): runs it unless the stream captures.
// A programmatic kernel's node follows the node before it by a
// programmatic edge where that one is a kernel too.
int submit(void* stream, Operation op, NodeKind kind = NodeKind::Kernel, bool programmatic = false);
// The device (ordinal) of the calling thread's current context, or -1.
int current_device();
// Whether [ptr, ptr + bytes) lies in one live device allocation.
bool is_device_memory(uint64_t ptr, size_t bytes);

template <class... A, size_t... I>
void call_unpacked(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(p[I])...);
}

template <class... A>
void call_with(void* fn, void** params) {
    call_unpacked(reinterpret_cast<void (*)(A...)>(fn), params, std::index_sequence_for<A...>{});
}

template <class... A>
struct Registration {
    Registration(const char* name, void (*f)(A...)) {
        register_kernel(Kernel{name, &call_with<A...>, reinterpret_cast<void*>(f), {sizeof(A)...}, {std::is_pointer<A>::value...},
                               {(std::is_pointer<A>::value && !std::is_const<std::remove_pointer_t<A>>::value)...}});
    }
};

}  // namespace emu

#define EMU_REGISTER(name) static emu::Registration emu_registration_##name(#name, &name);
