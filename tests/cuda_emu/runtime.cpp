// Launch runtime for emu.h: compiled into the same shared object as the kernel source.
// One launch at a time: a launch's state is global.
#include <memory>
#include <string>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

static EmuBarrier g_block;
static std::vector<EmuWarp*> g_warps;
static std::vector<unsigned char> g_dynamic_smem;
static std::string g_error;

EmuWarp* emu_warp() { return g_warps[threadIdx.x / 32]; }
EmuBarrier* emu_block_barrier() { return &g_block; }
void* emu_dynamic_smem() { return g_dynamic_smem.empty() ? nullptr : g_dynamic_smem.data(); }

void emu_report(const char* what) {
    EmuUntracked untracked;  // the emulation's own record, not the kernel's memory
    if (g_error.empty())
        g_error = std::string(what) + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                  "," + std::to_string(blockIdx.z) + ", thread " + std::to_string(threadIdx.x) + ")";
}

// The kernel every thread of the launch runs, and its arguments.
static struct {
    const EmuEntry* entry;
    int argc;
    void* const* argv;
    const unsigned* sizes;
} g_call;

static void emu_run_kernel() {
    if (g_call.entry->call(g_call.argc, g_call.argv, g_call.sizes) != 0)
        emu_report("the arguments do not match the kernel's parameters (their number or a size in bytes)");
}

// The static __shared__ arrays reached so far (address, bytes): refilled with 0xFF bytes at
// every block start, and when first reached (before any thread of the block can write them:
// whoever reaches the declaration first fills it).
static std::vector<std::pair<void*, unsigned long>> g_shared;

void emu_shared_register(void* p, unsigned long bytes) {
    EmuUntracked untracked;  // the poison is the emulation's write, not the kernel's
    for (const auto& r : g_shared)
        if (r.first == p) return;
    g_shared.emplace_back(p, bytes);
    std::memset(p, 0xFF, bytes);
}

// ThreadSanitizer: the block's start (shared memory poisoned, barriers reset, fibers made,
// the launch's arguments) is ordered before every thread of the block, and every thread
// (up to its end, or up to the barrier it waits at when the block deadlocks) before the
// next block and the launch's return. Blocks run one after another here, so races between
// blocks (on a GPU they run at once) are not seen.
static char g_block_start, g_block_end;

// Every block starts with its shared memory poisoned and its barriers counting all threads.
static void emu_start_block(unsigned x, unsigned y, unsigned z, unsigned bx) {
    blockIdx = {x, y, z};
    if (!g_dynamic_smem.empty()) std::memset(g_dynamic_smem.data(), 0xFF, g_dynamic_smem.size());
    for (const auto& r : g_shared) std::memset(r.first, 0xFF, r.second);
    g_block.reset((int)bx);
    for (auto* w : g_warps) w->bar.reset(32);
}

// A thread returned from the kernel.
static void emu_end_thread() {
    if (emu_wgmma_pending()) emu_report("the kernel returned with a wgmma it never waited for");
    if (emu_cp_async_pending()) emu_report("the kernel returned with a cp.async copy it never waited for");
    g_block.drop();
    g_warps[threadIdx.x / 32]->bar.drop();
}

// ---- fibers: the block's threads take turns on the launching thread ---------------------
// A fiber runs until it waits at a barrier that is not open yet, then yields; the
// scheduler resumes the block's unfinished fibers in turn, and the order is the same in
// every run (OS threads spent most of their time in futex calls and context switches). A
// fiber is made once per launch and runs the kernel for each block in turn.
//
// On x86-64 a switch is a few instructions: push the callee-saved registers, swap stack
// pointers, pop. swapcontext also saves and restores the signal mask, two system calls per
// switch: about 70% of perf's samples of a tiny Mixtral's emulated forward (its row launches
// of up to 3,648 blocks).
// The floating-point control state (MXCSR, x87 control word) is not switched: no kernel
// changes it. Elsewhere, or built with -DEMU_UCONTEXT (tests/test_cuda_emulated.py builds
// that too), ucontext's swapcontext switches.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
using EmuContext = void*;  // the stack pointer a fiber left at its switch

// emu_switch_stacks(save, load): saves the registers and the stack pointer into *save,
// then continues on stack `load` where its own switch left it (or at a fresh fiber's entry).
extern "C" void emu_switch_stacks(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl emu_switch_stacks
    .hidden emu_switch_stacks
    .type emu_switch_stacks, @function
emu_switch_stacks:
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
    .size emu_switch_stacks, .-emu_switch_stacks
    .section .note.GNU-stack, "", @progbits
    .text
)");

static void emu_switch(EmuContext* from, EmuContext* to) { emu_switch_stacks(from, *to); }

// A fresh fiber's stack as emu_switch_stacks leaves one: six registers (zero: rbp = 0 ends
// a report's stack walk), then `entry` for its ret, then the return address a call would
// have pushed (none: the entry never returns), with the stack 16-byte aligned at the call.
static void emu_make_context(EmuContext* ctx, char* stack, size_t size, void (*entry)()) {
    auto* sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15});
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(entry);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    *ctx = sp;
}
#else
using EmuContext = ucontext_t;

static void emu_switch(EmuContext* from, EmuContext* to) { swapcontext(from, to); }

static void emu_make_context(EmuContext* ctx, char* stack, size_t size, void (*entry)()) {
    getcontext(ctx);
    ctx->uc_stack.ss_sp = stack;
    ctx->uc_stack.ss_size = size;
    ctx->uc_link = nullptr;  // the entry never returns
    makecontext(ctx, entry, 0);
#if defined(__SANITIZE_ADDRESS__)
    // The stack is in the saved registers now. Left in uc_stack, AddressSanitizer's
    // swapcontext interceptor would clear its whole shadow at every switch: the redzones
    // of the frames the fiber left waiting at a barrier (its kernel's local arrays) gone,
    // and, at 64 KiB of shadow, the pages handed back to the OS.
    ctx->uc_stack = stack_t{};
#endif
}
#endif

struct EmuFiber {
    EmuContext ctx;
    std::unique_ptr<char[]> stack;  // uninitialised: only the pages a fiber touches are mapped
    emu_dim3 tid;
    EmuLane lane;
    void* tsan = nullptr;  // ThreadSanitizer's state of this thread
    bool done = false;
};
constexpr size_t EMU_FIBER_STACK = 512 * 1024;
#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer is told of every switch between the scheduler's stack and a fiber's,
// else it takes the other stack's frames for overflows.
static const void* g_scheduler_bottom = nullptr;
static size_t g_scheduler_size = 0;
#define EMU_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define EMU_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define EMU_START_SWITCH(save, bottom, size) ((void)0)
#define EMU_FINISH_SWITCH(save, bottom, size) ((void)0)
#endif
#if defined(__SANITIZE_THREAD__)
// ThreadSanitizer is told of every switch, as one that orders nothing (no_sync): the
// orderings are the barriers' (emu_release/emu_acquire).
#define EMU_TSAN_SWITCH(fiber) __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync)
#else
#define EMU_TSAN_SWITCH(fiber) ((void)0)
#endif
static EmuContext g_scheduler;
static void* g_scheduler_tsan = nullptr;  // ThreadSanitizer's state of the scheduler's thread
static EmuFiber* g_current = nullptr;
// Barrier arrivals and finished threads: a turn of the scheduler without one is a deadlock.
static unsigned long g_progress = 0;

// From the running fiber back to the scheduler, until it resumes this fiber.
static void emu_yield() {
    EmuContext* mine;
    [[maybe_unused]] void* scheduler_tsan;
    {
        EmuUntracked untracked;  // the runtime's state: the next launch writes it after this thread's end
        mine = &g_current->ctx;
        scheduler_tsan = g_scheduler_tsan;
    }
    EMU_TSAN_SWITCH(scheduler_tsan);
    [[maybe_unused]] void* fake_stack = nullptr;
    EMU_START_SWITCH(&fake_stack, g_scheduler_bottom, g_scheduler_size);
    emu_switch(mine, &g_scheduler);
    EMU_FINISH_SWITCH(fake_stack, &g_scheduler_bottom, &g_scheduler_size);
}

EmuLane& emu_lane_state() { return g_current->lane; }

// A fiber never switches inside an untracked region: ThreadSanitizer ends a run whose
// thread (here: an abandoned fiber, destroyed) finishes with its accesses ignored.
void EmuBarrier::wait(bool orders_memory) {
    unsigned long my;
    {
        EmuUntracked untracked;  // the counters are the emulation's; every thread writes them
        if (warp && n < full) emu_report("a warp collective ran after a lane of the warp returned from the kernel");
        ++g_progress;
        my = gen;
        if (orders_memory) emu_release(&sync[my % 2]);
        if (++waiting >= n) {
            waiting = 0;
            ++gen;
        }
    }
    emu_release(&g_block_end);  // for the scheduler, should the block deadlock here
    while (true) {
        {
            EmuUntracked untracked;
            if (gen != my) break;
        }
        emu_yield();
    }
    if (orders_memory) emu_acquire(&sync[my % 2]);
}

void EmuBarrier::drop() {
    EmuUntracked untracked;
    --n;
    if (warp && waiting > 0) emu_report("a lane returned from the kernel while its warp waited in a collective");
    if (waiting > 0 && waiting >= n) {
        waiting = 0;
        ++gen;
    }
}

// A fiber: the kernel for each block of the launch, yielding at its end (and at barriers).
// When the launch ends its fibers are dropped where they stand: here, or at a barrier of
// a block that deadlocked.
[[noreturn]] static void emu_fiber_main() {
    EMU_FINISH_SWITCH(nullptr, &g_scheduler_bottom, &g_scheduler_size);
    while (true) {
        emu_acquire(&g_block_start);
        emu_run_kernel();
        emu_end_thread();
        {
            EmuUntracked untracked;  // read by the scheduler, which the barriers do not order
            g_current->done = true;
            ++g_progress;
        }
        emu_release(&g_block_end);
        emu_yield();
    }
}

// Run fiber `f` until it yields or finishes.
static void emu_resume(EmuFiber& f) {
    {
        EmuUntracked untracked;  // the fiber reads them: the runtime's writes, not a kernel's
        g_current = &f;
        threadIdx = f.tid;
    }
    [[maybe_unused]] void* fake_stack = nullptr;
    EMU_START_SWITCH(&fake_stack, f.stack.get(), EMU_FIBER_STACK);
    EMU_TSAN_SWITCH(f.tsan);
    emu_switch(&g_scheduler, &f.ctx);
    EMU_FINISH_SWITCH(fake_stack, nullptr, nullptr);
}

// Run one block; false if its threads deadlocked (then its fibers are abandoned).
static bool emu_run_block(std::vector<EmuFiber>& fibers) {
    for (EmuFiber& f : fibers) {
        f.done = false;
        f.lane = EmuLane{};
    }
    emu_release(&g_block_start);
    size_t alive = fibers.size();
    while (alive > 0) {
        const unsigned long before = g_progress;
        for (EmuFiber& f : fibers) {
            if (f.done) continue;
            emu_resume(f);
            if (f.done) --alive;
        }
        if (alive > 0 && g_progress == before) {
            emu_acquire(&g_block_end);
            emu_report("every thread left waits at a barrier that cannot open: on a GPU the launch hangs");
            return false;
        }
    }
    emu_acquire(&g_block_end);
    return true;
}

static void emu_run_blocks(std::vector<EmuFiber>& fibers, unsigned gx, unsigned gy, unsigned gz, unsigned bx) {
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                emu_start_block(x, y, z, bx);
                if (!emu_run_block(fibers)) return;
            }
}

static void emu_run_grid(unsigned gx, unsigned gy, unsigned gz, unsigned bx) {
    std::vector<EmuFiber> fibers(bx);
    for (unsigned t = 0; t < bx; ++t) {
        fibers[t].tid = {t, 0, 0};
        fibers[t].stack.reset(new char[EMU_FIBER_STACK]);
        emu_make_context(&fibers[t].ctx, fibers[t].stack.get(), EMU_FIBER_STACK, emu_fiber_main);
    }
#if defined(__SANITIZE_THREAD__)
    g_scheduler_tsan = __tsan_get_current_fiber();
    for (EmuFiber& f : fibers) f.tsan = __tsan_create_fiber(0);
#endif
    emu_run_blocks(fibers, gx, gy, gz, bx);
#if defined(__SANITIZE_THREAD__)
    for (EmuFiber& f : fibers) __tsan_destroy_fiber(f.tsan);
#endif
}

// Launch kernel `name` of `table` on a (gx, gy, gz) grid of `bx`-thread blocks (a multiple
// of 32, as in detkit's kernels), blocks in order, with `smem` bytes of dynamic shared
// memory; the launch's first error ("" if none).
extern "C" const char* emu_launch_entry_in(const EmuEntry* table, size_t n, const char* name, int argc,
                                           void* const* argv, const unsigned* sizes, unsigned gx, unsigned gy,
                                           unsigned gz, unsigned bx, unsigned smem) {
    g_error.clear();
    const EmuEntry* entry = nullptr;
    for (size_t i = 0; i < n; ++i)
        if (std::strcmp(table[i].name, name) == 0) entry = &table[i];
    if (entry == nullptr) {
        g_error = std::string("no kernel named ") + name + " in this file";
        return g_error.c_str();
    }
    g_call = {entry, argc, argv, sizes};
    gridDim = {gx, gy, gz};
    blockDim = {bx, 1, 1};
    // Exactly `smem` bytes (none when 0), so that AddressSanitizer sees an overrun.
    g_dynamic_smem = std::vector<unsigned char>(smem);
    g_dynamic_smem.shrink_to_fit();
    const unsigned nwarps = (bx + 31) / 32;
    g_warps.clear();
    for (unsigned i = 0; i < nwarps; ++i) {
        g_warps.push_back(new EmuWarp());
        g_warps.back()->bar.warp = true;
    }
    emu_run_grid(gx, gy, gz, bx);
    for (auto* w : g_warps) delete w;
    g_warps.clear();
    return g_error.c_str();
}
