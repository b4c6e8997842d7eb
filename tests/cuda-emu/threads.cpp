// A block's threads as fibers on one OS thread, and a launch's blocks spread
// over a pool of OS threads. A fiber runs until it reaches __syncthreads or
// a warp collective, where it hands over to the next thread that can run
// (the next one up in half the blocks, down in the other half, so that a
// lane reading what another has yet to write shows in one or the other);
// the barrier opens when every thread still running has reached it (the
// last to arrive goes on without waiting). Warp collectives exchange values through two
// alternating slot arrays per warp, so a lane that runs ahead to the next
// collective never overwrites a value another lane has yet to read.
// Anything that would hang or be undefined on a GPU ends the launch with a
// message instead. Each fiber keeps the cp.async copies it queued
// (emu::pipeline_copy) until a wait lands them.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "emu.h"
#include "runtime.h"

extern "C" void emu_switch(void** save, void* load);
extern "C" void emu_fiber_start();

// Saves the callee-saved registers on the current stack, stores its
// pointer in *save, and resumes the stack `load` (System V x86-64).
// A new fiber's first switch "returns" into emu_fiber_start, which calls
// r13(r12) on the fiber's own stack.
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch

    .globl emu_fiber_start
    .hidden emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_fiber_start, .-emu_fiber_start
)");

namespace emu {

namespace {

constexpr size_t kMaxThreads = 1024;
constexpr size_t kSharedAlign = 128;
// Bytes past a block's dynamic shared memory that must keep their value:
// a kernel that writes there was launched with too little.
constexpr size_t kSharedGuard = 1024;
constexpr char kGuardByte = (char)0xa5;

enum class State : uint8_t { Runnable, AtBarrier, AtWarp, AtGridWait, Done };

struct Fiber {
    void* sp;
    ThreadHeader* header;
    State state;
};

// A fiber's queued cp.async copies, and where each committed group ends.
struct Pipeline {
    struct Copy {
        void* to;
        const void* from;
        size_t bytes;
    };
    std::vector<Copy> copies;
    std::vector<size_t> group_ends;
    size_t landed = 0;

    void reset() {
        copies.clear();
        group_ends.clear();
        landed = 0;
    }

    // Lands the copies of every group but the newest `prior`.
    void wait(size_t prior) {
        if (group_ends.size() <= prior) return;
        const size_t until = group_ends[group_ends.size() - prior - 1];
        for (; landed < until; ++landed) memcpy(copies[landed].to, copies[landed].from, copies[landed].bytes);
    }
};

struct Warp {
    unsigned int existing;  // lanes this block has in the warp
    unsigned int arrived;
    unsigned int masks[2];
    unsigned int generation;
    uint64_t slots[2][32];
};

class Scheduler {
  public:
    Scheduler() {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        // One spare stack's worth, to align every stack to its size.
        mapped_ = (kMaxThreads + 1) * kStackBytes;
        void* memory = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (memory == MAP_FAILED) {
            perror("cuda-emu: mapping fiber stacks");
            abort();
        }
        mapping_ = static_cast<char*>(memory);
        stacks_ = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(memory) + kStackBytes - 1) & ~(kStackBytes - 1));
        // A guard page under each stack turns an overflow into a fault.
        for (size_t i = 0; i < kMaxThreads; ++i) mprotect(stacks_ + i * kStackBytes, page, PROT_NONE);
        fibers_.resize(kMaxThreads);
        pipelines_.resize(kMaxThreads);
        for (size_t i = 0; i < kMaxThreads; ++i) {
            fibers_[i].header = reinterpret_cast<ThreadHeader*>(stacks_ + (i + 1) * kStackBytes - kHeaderBytes);
        }
    }

    ~Scheduler() { munmap(mapping_, mapped_); }

    // With `inputs_ready`, threads that wait for the previous kernels stop
    // until every thread of the block has waited or exited; then it is
    // called, and they go on.
    std::string run_block(const Kernel& kernel, void** params, uint3 block, Dim3 block_dim, Dim3 grid_dim, size_t shared_bytes,
                          const std::function<void()>* inputs_ready = nullptr) {
        const size_t n = (size_t)block_dim.x * block_dim.y * block_dim.z;
        kernel_ = &kernel;
        inputs_ready_ = inputs_ready;
        waited_ = false;
        at_grid_wait_ = 0;
        params_ = params;
        failure_.clear();
        block_ = block;
        block_dim_ = dim3{block_dim.x, block_dim.y, block_dim.z};
        grid_dim_ = dim3{grid_dim.x, grid_dim.y, grid_dim.z};
        // Aligned as a GPU aligns it (kernels may ask for 128 bytes); NaN in
        // f32 and bf16 alike, then the guard.
        shared_.assign(shared_bytes + kSharedAlign + kSharedGuard, (char)0xff);
        shared_base_ = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(shared_.data()) + kSharedAlign - 1) & ~(kSharedAlign - 1));
        shared_bytes_ = shared_bytes;
        memset(shared_base_ + shared_bytes, kGuardByte, kSharedGuard);
        const unsigned int parity = block.x + block.y + block.z;
        early_copies_ = parity % 2 == 0;
        upward_ = parity / 2 % 2 == 0;
        n_ = n;
        warps_.assign((n + 31) / 32, Warp{});
        for (size_t w = 0; w < warps_.size(); ++w) {
            const size_t lanes = std::min<size_t>(32, n - 32 * w);
            warps_[w].existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
        }
        for (size_t i = 0; i < n; ++i) {
            Fiber& f = fibers_[i];
            *f.header = ThreadHeader{uint3{(unsigned)(i % block_dim.x), (unsigned)(i / block_dim.x % block_dim.y), (unsigned)(i / block_dim.x / block_dim.y)},
                                     (int)(i % 32), (int)(i / 32), &block_, &block_dim_, &grid_dim_, this};
            f.state = State::Runnable;
            pipelines_[i].reset();
            // The first switch to a fiber pops six zeroed registers but r13
            // (fiber_main) and r12 (its argument), then returns into emu_fiber_start.
            uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<char*>(f.header) - 72);
            sp[0] = sp[1] = sp[4] = sp[5] = 0;
            sp[2] = reinterpret_cast<uint64_t>(&fiber_main);
            sp[3] = reinterpret_cast<uint64_t>(this);
            sp[6] = reinterpret_cast<uint64_t>(&emu_fiber_start);
            f.sp = sp;
        }
        live_ = n;
        runnable_ = n;
        at_barrier_ = 0;
        // The fibers hand over to one another; control comes back here only
        // when none can run: all have finished, one failed, or a deadlock.
        running_ = &fibers_[0];
        emu_switch(&home_, running_->sp);
        while (failure_.empty() && at_grid_wait_ > 0) {
            make_inputs_ready();
            for (size_t i = 0; i < n; ++i)
                if (fibers_[i].state == State::AtGridWait) wake(fibers_[i]);
            at_grid_wait_ = 0;
            running_ = &*std::find_if(fibers_.begin(), fibers_.begin() + n, [](const Fiber& f) { return f.state == State::Runnable; });
            emu_switch(&home_, running_->sp);
        }
        make_inputs_ready();
        if (failure_.empty() && live_ > 0) failure_ = describe_deadlock();
        if (failure_.empty() && !guard_intact())
            failure_ = std::string(kernel.name) + ": wrote past the " + std::to_string(shared_bytes) + " bytes of dynamic shared memory it was launched with";
        return failure_.empty() ? "" : "block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " + std::to_string(block.z) + "): " + failure_;
    }

    void sync_block() {
        if (++at_barrier_ == live_) return release_barrier();
        block_on(State::AtBarrier);
    }

    void wait_for_previous_kernels() {
        waited_ = true;
        if (!inputs_ready_) return;
        ++at_grid_wait_;
        block_on(State::AtGridWait);
    }

    bool waited() const { return waited_; }

    // Waits for the lanes of `mask`; returns the slot array of the exchange
    // and, in `arrived_mask`, the lanes that took part.
    const uint64_t* exchange(unsigned int mask, uint64_t value, unsigned int& arrived_mask) {
        const ThreadHeader& me = *running_->header;
        Warp& w = warps_[me.warp];
        const unsigned int bit = 1u << me.lane;
        const unsigned int expected = mask & w.existing;
        if (!(mask & bit)) fail("a warp collective by lane " + std::to_string(me.lane) + " whose mask leaves it out");
        const unsigned int g = w.generation & 1;
        if (w.arrived == 0) {
            w.masks[g] = expected;
        } else if (w.masks[g] != expected) {
            fail("lanes of one warp met at a collective with different masks");
        }
        w.slots[g][me.lane] = value;
        w.arrived |= bit;
        if (w.arrived == w.masks[g]) {
            Fiber* lanes = &fibers_[(size_t)me.warp * 32];
            for (unsigned int waiting = w.masks[g] & ~bit; waiting; waiting &= waiting - 1) wake(lanes[__builtin_ctz(waiting)]);
            w.arrived = 0;
            ++w.generation;
        } else {
            block_on(State::AtWarp);
        }
        arrived_mask = w.masks[g];
        return w.slots[g];
    }

    void* dynamic_shared() { return shared_base_; }

    bool in_shared(const void* p, size_t bytes) const {
        const char* c = static_cast<const char*>(p);
        return c >= shared_base_ && c + bytes <= shared_base_ + shared_bytes_;
    }

    void pipeline_copy(void* to, const void* from, size_t bytes) {
        if (bytes != 4 && bytes != 8 && bytes != 16) fail("a cp.async of " + std::to_string(bytes) + " bytes (4, 8 or 16)");
        if (reinterpret_cast<uintptr_t>(to) % bytes || reinterpret_cast<uintptr_t>(from) % bytes) fail("a cp.async whose addresses are not aligned to its size");
        if (!in_shared(to, bytes)) fail("a cp.async into memory outside the block's dynamic shared memory");
        if (!is_device_memory(reinterpret_cast<uint64_t>(from), bytes)) fail("a cp.async from memory outside every device allocation");
        if (early_copies_) {
            memcpy(to, from, bytes);
        } else {
            my_pipeline().copies.push_back({to, from, bytes});
        }
    }

    void pipeline_commit() { my_pipeline().group_ends.push_back(my_pipeline().copies.size()); }

    void pipeline_wait(size_t prior) { my_pipeline().wait(prior); }

    [[noreturn]] void fail(const std::string& what) {
        if (failure_.empty()) failure_ = std::string(kernel_->name) + ": thread " + std::to_string(running_ - fibers_.data()) + ": " + what;
        running_->state = State::Done;
        emu_switch(&running_->sp, home_);
        abort();
    }

  private:
    Pipeline& my_pipeline() { return pipelines_[running_ - fibers_.data()]; }

    void make_inputs_ready() {
        if (!inputs_ready_) return;
        (*inputs_ready_)();
        inputs_ready_ = nullptr;
    }

    bool guard_intact() const {
        const char* guard = shared_base_ + shared_bytes_;
        return std::all_of(guard, guard + kSharedGuard, [](char c) { return c == kGuardByte; });
    }

    static void fiber_main(Scheduler* s) {
        s->kernel_->call(s->kernel_->fn, s->params_);
        s->finish();
    }

    void wake(Fiber& f) {
        f.state = State::Runnable;
        ++runnable_;
    }

    // The running fiber stops (waiting, or done) and the next runnable one
    // after it resumes; with none, the block's scheduler does.
    void block_on(State state) {
        Fiber* me = running_;
        me->state = state;
        --runnable_;
        Fiber* next = nullptr;
        if (runnable_ > 0) {
            const size_t start = (size_t)(me - fibers_.data());
            for (size_t step = 1; step <= n_; ++step) {
                Fiber& f = fibers_[(upward_ ? start + step : start + n_ - step) % n_];
                if (f.state == State::Runnable) {
                    next = &f;
                    break;
                }
            }
        }
        running_ = next;
        emu_switch(&me->sp, next ? next->sp : home_);
    }

    void release_barrier() {
        for (size_t i = 0; i < n_; ++i)
            if (fibers_[i].state == State::AtBarrier) wake(fibers_[i]);
        at_barrier_ = 0;
    }

    [[noreturn]] void finish() {
        --live_;
        if (at_barrier_ > 0 && at_barrier_ == live_) release_barrier();
        block_on(State::Done);
        abort();
    }

    std::string describe_deadlock() const {
        size_t barrier = 0, warp = 0, done = 0;
        for (size_t i = 0; i < n_; ++i) {
            barrier += fibers_[i].state == State::AtBarrier;
            warp += fibers_[i].state == State::AtWarp;
            done += fibers_[i].state == State::Done;
        }
        return std::string(kernel_->name) + ": deadlock: " + std::to_string(barrier) + " threads wait at __syncthreads, " + std::to_string(warp) +
               " at a warp collective whose lanes never all arrive, " + std::to_string(done) + " have exited";
    }

    char* mapping_;
    size_t mapped_;
    char* stacks_;
    std::vector<Fiber> fibers_;
    size_t n_ = 0;
    std::vector<Warp> warps_;
    std::vector<Pipeline> pipelines_;
    std::vector<char> shared_;
    char* shared_base_ = nullptr;
    size_t shared_bytes_ = 0;
    bool early_copies_ = false;
    bool upward_ = true;
    uint3 block_{};
    dim3 block_dim_{}, grid_dim_{};
    const Kernel* kernel_ = nullptr;
    void** params_ = nullptr;
    void* home_ = nullptr;
    Fiber* running_ = nullptr;
    size_t live_ = 0;
    size_t runnable_ = 0;
    size_t at_barrier_ = 0;
    size_t at_grid_wait_ = 0;
    const std::function<void()>* inputs_ready_ = nullptr;
    bool waited_ = false;
    std::string failure_;
};

// The scheduler of the block the calling fiber belongs to.
Scheduler& my_scheduler() { return *static_cast<Scheduler*>(self()->scheduler); }

// The scheduler of this OS thread, for the blocks it runs.
Scheduler& thread_scheduler() {
    static thread_local std::unique_ptr<Scheduler> scheduler;
    if (!scheduler) scheduler = std::make_unique<Scheduler>();
    return *scheduler;
}

// Worker threads that take indices of the current loop until none are left;
// the caller works too. One loop at a time (launches are serialized, as on
// a GPU that runs one kernel at a time).
class Pool {
  public:
    Pool() {
        size_t threads = std::thread::hardware_concurrency();
        if (const char* env = getenv("SHARDLINE_EMU_THREADS")) threads = strtoul(env, nullptr, 10);
        for (size_t i = 1; i < std::max<size_t>(threads, 1); ++i) workers_.emplace_back([this] { work(); });
    }

    void run(size_t n, const std::function<void(size_t)>& body) {
        std::lock_guard<std::mutex> one_at_a_time(launch_);
        if (n <= 1 || workers_.empty()) {
            for (size_t i = 0; i < n; ++i) body(i);
            return;
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            body_ = &body;
            n_ = n;
            next_.store(0);
            ++epoch_;
        }
        wake_.notify_all();
        take(body, n);
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] { return busy_ == 0; });
        body_ = nullptr;
    }

  private:
    void take(const std::function<void(size_t)>& body, size_t n) {
        for (size_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) body(i);
    }

    void work() {
        uint64_t seen = 0;
        for (;;) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return epoch_ != seen && body_ != nullptr; });
            seen = epoch_;
            const auto* body = body_;
            const size_t n = n_;
            ++busy_;
            lock.unlock();
            take(*body, n);
            lock.lock();
            if (--busy_ == 0) done_.notify_all();
        }
    }

    std::vector<std::thread> workers_;
    std::mutex launch_, mutex_;
    std::condition_variable wake_, done_;
    const std::function<void(size_t)>* body_ = nullptr;
    size_t n_ = 0;
    std::atomic<size_t> next_{0};
    uint64_t epoch_ = 0;
    size_t busy_ = 0;
};

Pool& pool() {
    // Never destroyed: worker threads outlive static destructors at exit.
    static Pool* pool = new Pool();
    return *pool;
}

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> kernels;
    return kernels;
}

}  // namespace

void sync_block() { my_scheduler().sync_block(); }

uint64_t warp_exchange(unsigned int mask, uint64_t value, int source) {
    Scheduler& s = my_scheduler();
    unsigned int arrived;
    const uint64_t* slots = s.exchange(mask, value, arrived);
    if (source < 0 || source >= 32 || !(arrived >> source & 1))
        s.fail("a shuffle reads lane " + std::to_string(source) + ", which is not among the lanes that took part");
    return slots[source];
}

unsigned int warp_ballot(unsigned int mask, bool predicate) {
    unsigned int arrived;
    const uint64_t* slots = my_scheduler().exchange(mask, predicate, arrived);
    unsigned int ballot = 0;
    for (int lane = 0; lane < 32; ++lane)
        if ((arrived >> lane & 1) && slots[lane]) ballot |= 1u << lane;
    return ballot;
}

void* dynamic_shared() { return my_scheduler().dynamic_shared(); }

void fail_launch(const std::string& what) { my_scheduler().fail(what); }

bool is_kernel_memory(const void* p, size_t bytes) {
    return my_scheduler().in_shared(p, bytes) || is_device_memory(reinterpret_cast<uint64_t>(p), bytes);
}

void pipeline_copy(void* shared, const void* global, size_t bytes) { my_scheduler().pipeline_copy(shared, global, bytes); }
void pipeline_commit() { my_scheduler().pipeline_commit(); }
void pipeline_wait(size_t prior) { my_scheduler().pipeline_wait(prior); }

bool is_shared_memory(const void* p) { return my_scheduler().in_shared(p, 1); }

void wait_for_previous_kernels() { my_scheduler().wait_for_previous_kernels(); }

void register_kernel(Kernel kernel) { registry()[kernel.name] = std::move(kernel); }

const Kernel* find_kernel(const std::string& name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

std::string run_kernel(const Kernel& kernel, Dim3 grid, Dim3 block, size_t shared_bytes, void** params, bool programmatic,
                       const std::function<void()>* inputs_ready) {
    std::mutex mutex;
    std::string failure;
    std::atomic<bool> waited{false};
    const size_t blocks = (size_t)grid.x * grid.y * grid.z;
    auto run = [&](size_t b, const std::function<void()>* ready) {
        const uint3 index{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y)};
        Scheduler& scheduler = thread_scheduler();
        std::string why = scheduler.run_block(kernel, params, index, block, grid, shared_bytes, ready);
        if (scheduler.waited()) waited = true;
        if (!why.empty()) {
            std::lock_guard<std::mutex> lock(mutex);
            if (failure.empty()) failure = std::move(why);
        }
    };
    const size_t first = inputs_ready ? 1 : 0;
    if (inputs_ready) run(0, inputs_ready);
    pool().run(blocks - first, [&](size_t b) { run(b + first, nullptr); });
    if (failure.empty() && programmatic && !waited)
        failure = std::string(kernel.name) + ": launched programmatically, but no thread waits for the previous kernels";
    return failure;
}

void parallel_for(size_t n, const std::function<void(size_t)>& body) { pool().run(n, body); }

}  // namespace emu
