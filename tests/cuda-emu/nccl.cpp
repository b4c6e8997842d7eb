// An emulated NCCL (libnccl.so) for ranks that are threads of one process,
// each on its own emulated GPU: the calls cudarc makes, with the rules a
// real NCCL enforces that our code depends on (every rank joins before any
// proceeds, two ranks of a group may not share a GPU, peers agree on sizes,
// types and operations). A collective is queued on the rank's stream, so a
// graph capture records it; when it runs, the rank waits for its peers and
// the last to arrive does the whole reduction. Sends are buffered, so a
// group of sends and receives needs no ncclGroupStart to avoid a deadlock.
// An abort fails the peers' waiting calls (a real NCCL would leave them
// waiting); a wait of over two minutes is an error, never a hang.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime.h"

namespace {

enum Result { Success = 0, SystemError = 2, InternalError = 3, InvalidArgument = 4, InvalidUsage = 5, RemoteError = 6 };
enum Kind { AllReduce, AllGather };

constexpr auto kPatience = std::chrono::seconds(120);

struct UniqueId {
    char internal[128];
};

size_t element_size(int type) {
    switch (type) {
        case 0: case 1: return 1;        // int8, uint8
        case 6: case 9: return 2;        // float16, bfloat16
        case 2: case 3: case 7: return 4; // int32, uint32, float32
        case 4: case 5: case 8: return 8; // int64, uint64, float64
        default: return 0;
    }
}

void report(const std::string& what) { fprintf(stderr, "cuda-emu nccl: %s\n", what.c_str()); }

struct Contribution {
    Kind kind;
    const void* send;
    void* recv;
    size_t count;
    int type;
    int op;
};

struct Group {
    explicit Group(int size) : size(size), devices(size, -1), slots(size) {}

    const int size;
    std::mutex mutex;
    std::condition_variable changed;
    std::vector<int> devices;
    int joined = 0;
    bool aborted = false;
    uint64_t generation = 0;
    int arrived = 0;
    int outcome = Success;
    std::vector<Contribution> slots;
    std::map<std::pair<int, int>, std::deque<std::vector<char>>> mailboxes;

    // Waits (holding `lock`) until `done`; false on an abort or after kPatience.
    template <typename Done>
    int wait(std::unique_lock<std::mutex>& lock, Done done, const char* what) {
        if (!changed.wait_for(lock, kPatience, [&] { return done() || aborted; })) {
            report(std::string(what) + " waited two minutes for its peers");
            return SystemError;
        }
        return done() ? Success : RemoteError;
    }
};

struct Comm {
    std::shared_ptr<Group> group;
    int rank;
    int device;
};

std::mutex groups_mutex;
std::map<std::string, std::shared_ptr<Group>>& groups() {
    static auto* g = new std::map<std::string, std::shared_ptr<Group>>();
    return *g;
}

template <typename T>
void reduce_as(const std::vector<Contribution>& slots, int op) {
    const size_t n = slots[0].count;
    std::vector<T> acc(static_cast<const T*>(slots[0].send), static_cast<const T*>(slots[0].send) + n);
    for (size_t r = 1; r < slots.size(); ++r) {
        const T* v = static_cast<const T*>(slots[r].send);
        for (size_t i = 0; i < n; ++i) {
            switch (op) {
                case 1: acc[i] *= v[i]; break;
                case 2: acc[i] = acc[i] > v[i] ? acc[i] : v[i]; break;
                case 3: acc[i] = acc[i] < v[i] ? acc[i] : v[i]; break;
                default: acc[i] += v[i]; break;
            }
        }
    }
    if (op == 4)
        for (T& a : acc) a /= (T)slots.size();
    for (const Contribution& c : slots) memcpy(c.recv, acc.data(), n * sizeof(T));
}

// The whole collective, by the last rank to arrive.
int perform(const std::vector<Contribution>& slots) {
    const Contribution& first = slots[0];
    for (const Contribution& c : slots) {
        if (c.kind != first.kind || c.count != first.count || c.type != first.type || c.op != first.op) {
            report("ranks met at a collective with different kinds, counts, types or operations");
            return InvalidUsage;
        }
    }
    if (first.kind == AllGather) {
        const size_t bytes = first.count * element_size(first.type);
        std::vector<char> all(bytes * slots.size());
        for (size_t r = 0; r < slots.size(); ++r) memcpy(all.data() + r * bytes, slots[r].send, bytes);
        for (const Contribution& c : slots) memcpy(c.recv, all.data(), all.size());
        return Success;
    }
    switch (first.type) {
        case 7: reduce_as<float>(slots, first.op); return Success;
        case 8: reduce_as<double>(slots, first.op); return Success;
        case 2: reduce_as<int32_t>(slots, first.op); return Success;
        case 3: reduce_as<uint32_t>(slots, first.op); return Success;
        case 4: reduce_as<int64_t>(slots, first.op); return Success;
        case 5: reduce_as<uint64_t>(slots, first.op); return Success;
        default: report("a reduction over a type the emulator does not add"); return InvalidArgument;
    }
}

int collective(Comm* comm, Contribution mine, void* stream) {
    const size_t bytes = mine.count * element_size(mine.type);
    const size_t received = mine.kind == AllGather ? bytes * comm->group->size : bytes;
    if (element_size(mine.type) == 0 || mine.op < 0 || mine.op > 4) return InvalidArgument;
    if (!emu::is_device_memory(reinterpret_cast<uint64_t>(mine.send), bytes) || !emu::is_device_memory(reinterpret_cast<uint64_t>(mine.recv), received))
        return InvalidArgument;
    return emu::submit(stream, [comm, mine] {
        Group& g = *comm->group;
        std::unique_lock<std::mutex> lock(g.mutex);
        if (g.aborted) return (int)RemoteError;
        const uint64_t generation = g.generation;
        g.slots[comm->rank] = mine;
        if (++g.arrived == g.size) {
            g.outcome = perform(g.slots);
            g.arrived = 0;
            ++g.generation;
            g.changed.notify_all();
            return g.outcome;
        }
        const int waited = g.wait(lock, [&] { return g.generation != generation; }, "a collective");
        return waited == Success ? g.outcome : waited;
    });
}

}  // namespace

EMU_EXPORT int ncclGetVersion(int* version) {
    if (!version) return InvalidArgument;
    *version = 22800;
    return Success;
}

EMU_EXPORT int ncclGetUniqueId(UniqueId* id) {
    static std::mutex mutex;
    static uint64_t next = 0;
    if (!id) return InvalidArgument;
    std::lock_guard<std::mutex> lock(mutex);
    memset(id->internal, 0, sizeof id->internal);
    snprintf(id->internal, sizeof id->internal, "shardline-emu %llu %llu", (unsigned long long)std::chrono::steady_clock::now().time_since_epoch().count(),
             (unsigned long long)next++);
    return Success;
}

EMU_EXPORT int ncclCommInitRank(Comm** out, int nranks, UniqueId id, int rank) {
    if (!out || nranks < 1 || rank < 0 || rank >= nranks) return InvalidArgument;
    std::shared_ptr<Group> group;
    {
        std::lock_guard<std::mutex> lock(groups_mutex);
        auto& slot = groups()[std::string(id.internal, sizeof id.internal)];
        if (!slot) slot = std::make_shared<Group>(nranks);
        group = slot;
    }
    if (group->size != nranks) {
        report("ranks joined one group with different world sizes");
        return InvalidArgument;
    }
    // NCCL takes the calling thread's current device (0 if none is set).
    const int device = emu::current_device() < 0 ? 0 : emu::current_device();
    std::unique_lock<std::mutex> lock(group->mutex);
    if (group->devices[rank] >= 0) {
        report("rank " + std::to_string(rank) + " joined its group twice");
        return InvalidUsage;
    }
    for (int r = 0; r < nranks; ++r) {
        if (group->devices[r] == device) {
            report("Duplicate GPU detected: ranks " + std::to_string(r) + " and " + std::to_string(rank) + " both on GPU " + std::to_string(device));
            return InvalidUsage;
        }
    }
    group->devices[rank] = device;
    ++group->joined;
    group->changed.notify_all();
    const int waited = group->wait(lock, [&] { return group->joined == group->size; }, "ncclCommInitRank");
    if (waited != Success) return waited;
    *out = new Comm{group, rank, device};
    return Success;
}

EMU_EXPORT int ncclCommAbort(Comm* comm) {
    if (!comm) return InvalidArgument;
    {
        std::lock_guard<std::mutex> lock(comm->group->mutex);
        comm->group->aborted = true;
        comm->group->changed.notify_all();
    }
    delete comm;
    return Success;
}

EMU_EXPORT int ncclCommDestroy(Comm* comm) {
    if (!comm) return InvalidArgument;
    delete comm;
    return Success;
}

EMU_EXPORT int ncclCommFinalize(Comm* comm) { return comm ? Success : InvalidArgument; }

EMU_EXPORT int ncclCommCount(const Comm* comm, int* count) {
    if (!comm || !count) return InvalidArgument;
    *count = comm->group->size;
    return Success;
}

EMU_EXPORT int ncclCommUserRank(const Comm* comm, int* rank) {
    if (!comm || !rank) return InvalidArgument;
    *rank = comm->rank;
    return Success;
}

EMU_EXPORT int ncclCommCuDevice(const Comm* comm, int* device) {
    if (!comm || !device) return InvalidArgument;
    *device = comm->device;
    return Success;
}

EMU_EXPORT int ncclCommGetAsyncError(Comm* comm, int* result) {
    if (!comm || !result) return InvalidArgument;
    *result = Success;
    return Success;
}

EMU_EXPORT const char* ncclGetErrorString(int result) {
    switch (result) {
        case Success: return "no error";
        case SystemError: return "unhandled system error (emulated NCCL: a peer never came)";
        case InternalError: return "internal error";
        case InvalidArgument: return "invalid argument";
        case InvalidUsage: return "invalid usage";
        case RemoteError: return "remote process exited or there was a network error";
        default: return "unknown result";
    }
}

EMU_EXPORT const char* ncclGetLastError(Comm*) { return ""; }

EMU_EXPORT int ncclGroupStart() { return Success; }

EMU_EXPORT int ncclGroupEnd() { return Success; }

EMU_EXPORT int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, Comm* comm, void* stream) {
    if (!comm) return InvalidArgument;
    return collective(comm, Contribution{AllReduce, send, recv, count, type, op}, stream);
}

EMU_EXPORT int ncclAllGather(const void* send, void* recv, size_t count, int type, Comm* comm, void* stream) {
    if (!comm) return InvalidArgument;
    return collective(comm, Contribution{AllGather, send, recv, count, type, 0}, stream);
}

EMU_EXPORT int ncclSend(const void* send, size_t count, int type, int peer, Comm* comm, void* stream) {
    if (!comm || peer < 0 || peer >= comm->group->size || element_size(type) == 0) return InvalidArgument;
    const size_t bytes = count * element_size(type);
    if (!emu::is_device_memory(reinterpret_cast<uint64_t>(send), bytes)) return InvalidArgument;
    return emu::submit(stream, [=] {
        Group& g = *comm->group;
        std::lock_guard<std::mutex> lock(g.mutex);
        if (g.aborted) return (int)RemoteError;
        const char* p = static_cast<const char*>(send);
        g.mailboxes[{comm->rank, peer}].emplace_back(p, p + bytes);
        g.changed.notify_all();
        return (int)Success;
    });
}

EMU_EXPORT int ncclRecv(void* recv, size_t count, int type, int peer, Comm* comm, void* stream) {
    if (!comm || peer < 0 || peer >= comm->group->size || element_size(type) == 0) return InvalidArgument;
    const size_t bytes = count * element_size(type);
    if (!emu::is_device_memory(reinterpret_cast<uint64_t>(recv), bytes)) return InvalidArgument;
    return emu::submit(stream, [=] {
        Group& g = *comm->group;
        std::unique_lock<std::mutex> lock(g.mutex);
        auto& box = g.mailboxes[{peer, comm->rank}];
        const int waited = g.wait(lock, [&] { return !box.empty(); }, "a receive");
        if (waited != Success) return waited;
        std::vector<char> message = std::move(box.front());
        box.pop_front();
        if (message.size() != bytes) {
            report("a receive of " + std::to_string(bytes) + " bytes met a send of " + std::to_string(message.size()));
            return (int)InvalidUsage;
        }
        memcpy(recv, message.data(), bytes);
        return (int)Success;
    });
}
