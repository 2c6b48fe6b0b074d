// Launch runtime for emu.h: compiled into the same shared object as the kernel source.
#include <functional>
#include <string>

thread_local emu_dim3 threadIdx;
thread_local emu_dim3 blockIdx;
emu_dim3 blockDim, gridDim;

static EmuBarrier g_block, g_all;
static std::vector<EmuWarp*> g_warps;
static std::vector<unsigned char> g_dynamic_smem;
static std::mutex g_error_mu;
static std::string g_error;

EmuWarp* emu_warp() { return g_warps[threadIdx.x / 32]; }
EmuBarrier* emu_block_barrier() { return &g_block; }
void* emu_dynamic_smem() { return g_dynamic_smem.empty() ? nullptr : g_dynamic_smem.data(); }

void emu_report(const char* what) {
    std::lock_guard<std::mutex> g(g_error_mu);
    if (g_error.empty())
        g_error = std::string(what) + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                  "," + std::to_string(blockIdx.z) + ", thread " + std::to_string(threadIdx.x) + ")";
}

// The first error of the last launch, "" if none.
extern "C" const char* emu_last_error() { return g_error.c_str(); }

typedef void (*emu_thunk)(void*);

// Run `thunk(ctx)` once per (block, thread) of the grid; blocks in order, the threads of
// a block concurrently, with `smem` bytes of dynamic shared memory. blockDim.x must be a
// multiple of 32 (as in detkit's kernels).
extern "C" void emu_launch(emu_thunk thunk, void* ctx, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                           unsigned smem) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, 1, 1};
    g_error.clear();
    // Exactly `smem` bytes (none when 0), so that AddressSanitizer sees an overrun.
    g_dynamic_smem = std::vector<unsigned char>(smem);
    g_dynamic_smem.shrink_to_fit();
    const unsigned nwarps = (bx + 31) / 32;
    g_warps.clear();
    for (unsigned i = 0; i < nwarps; ++i) {
        g_warps.push_back(new EmuWarp());
        g_warps.back()->bar.warp = true;
        g_warps.back()->bar.reset(32);
    }
    g_block.reset((int)bx);
    g_all.reset((int)bx);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < bx; ++t) {
        threads.emplace_back([=] {
            threadIdx = {t, 0, 0};
            for (unsigned z = 0; z < gz; ++z)
                for (unsigned y = 0; y < gy; ++y)
                    for (unsigned x = 0; x < gx; ++x) {
                        blockIdx = {x, y, z};
                        if (t == 0 && !g_dynamic_smem.empty()) std::memset(g_dynamic_smem.data(), 0xFF, g_dynamic_smem.size());
                        g_all.wait();  // the block starts with its shared memory poisoned
                        thunk(ctx);
                        if (emu_wgmma_pending()) emu_report("the kernel returned with a wgmma it never waited for");
                        g_block.drop();
                        g_warps[t / 32]->bar.drop();
                        g_all.wait();
                        if (t == 0) {
                            g_block.reset((int)bx);
                            for (auto* w : g_warps) w->bar.reset(32);
                        }
                        g_all.wait();
                    }
        });
    }
    for (auto& th : threads) th.join();
    for (auto* w : g_warps) delete w;
    g_warps.clear();
}
