// Launch runtime for emu.h: compiled into the same shared object as the kernel source.
#include <functional>

thread_local emu_dim3 threadIdx;
thread_local emu_dim3 blockIdx;
emu_dim3 blockDim, gridDim;

static EmuBarrier g_block, g_all;
static std::vector<EmuWarp*> g_warps;

EmuWarp* emu_warp() { return g_warps[threadIdx.x / 32]; }
EmuBarrier* emu_block_barrier() { return &g_block; }

typedef void (*emu_thunk)(void*);

// Run `thunk(ctx)` once per (block, thread) of the grid; blocks in order, the threads of
// a block concurrently. blockDim.x must be a multiple of 32 (as in detkit's kernels).
extern "C" void emu_launch(emu_thunk thunk, void* ctx, unsigned gx, unsigned gy, unsigned gz, unsigned bx) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, 1, 1};
    const unsigned nwarps = (bx + 31) / 32;
    g_warps.clear();
    for (unsigned i = 0; i < nwarps; ++i) {
        g_warps.push_back(new EmuWarp());
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
                        thunk(ctx);
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
