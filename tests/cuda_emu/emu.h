// Host emulation of the small CUDA subset detkit's kernels use, so that the real
// cuda_kernels/*.cu sources can run on a CPU in tests (tests/test_cuda_emulated.py).
//
// Model: a launch runs the blocks of the grid one after another. The threads of a block
// are fibers taking turns on one OS thread, switching at barriers; the sanitizers are told
// of every switch (runtime.cpp), and ThreadSanitizer of exactly the orderings a GPU gives:
// a barrier's arrivals before its departures, nothing else between threads. __shared__
// (mapped to function-level statics) is shared by exactly the threads of one block,
// __syncthreads is a barrier, and the warp collectives (shuffles, ballots, ldmatrix, mma)
// exchange values through per-warp buffers around a warp barrier. Dynamic shared memory is a heap buffer of exactly
// the launch's size, refilled with 0xFF bytes (NaN in every float type) before each
// block, so an overrun is a heap overflow under AddressSanitizer and a read of memory the
// block did not write shows up as NaN; static __shared__ arrays are refilled the same way
// (emu_shared_register). A warp collective that a lane of the warp has left
// (returned from the kernel) is undefined on a GPU; here it fails the launch
// (its error is the launch's result). float and double arithmetic is IEEE binary32 and
// binary64 (x86-64 SSE2; built with -ffp-contract=off, so no contraction), rint rounds to
// nearest even, fmaf is correctly rounded, so the canonical-order kernels give the same
// bits as on a GPU. Tensor-core mma is emulated in float (fragment layout exact, rounding
// not the hardware's): use it to check indexing, not bits.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#define DETKIT_HOST_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__
// A static __shared__ array is a function-level static here, so it would keep the previous
// block's (or launch's) values, and start as zeros, where a GPU gives a block uninitialised
// shared memory: a kernel reading a slot it never wrote would pass on the host (a sum
// reading zeros is even right) and be wrong on the GPU. The test harness appends
// emu_shared_register(name, sizeof(name)) to each such declaration; the runtime fills a
// registered array with 0xFF bytes (NaN in every float type) when it is first reached and
// at the start of every block, as it does the dynamic shared memory.
void emu_shared_register(void* p, unsigned long bytes);
// Dynamic shared memory: the launch's buffer (blocks run one after another, so one buffer
// serves every block).
void* emu_dynamic_smem();
#define DETKIT_DYNAMIC_SMEM(T, name) T* const name = static_cast<T*>(emu_dynamic_smem())
#define __align__(n) __attribute__((aligned(n)))

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
// threadIdx: set by the runtime when a fiber resumes.
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
static inline float __ll2float_rn(long long v) { return (float)v; }  // one rounding, to nearest even
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline long long __double_as_longlong(double d) { long long u; std::memcpy(&u, &d, 8); return u; }
static inline double __longlong_as_double(long long u) { double d; std::memcpy(&d, &u, 8); return d; }
static inline float __double2float_rn(double a) { return (float)a; }  // x86-64: IEEE nearest even
static inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

// ---- ThreadSanitizer's view ------------------------------------------------------------
// The fibers switch without telling ThreadSanitizer of any ordering (runtime.cpp); the
// runtime tells it of the orderings a GPU gives with emu_release/emu_acquire on an address.
// The emulation's own bookkeeping (barrier counters, the buffers a warp collective
// exchanges values through), which every thread touches, runs untracked (EmuUntracked).
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreReadsBegin(const char*, int);
extern "C" void AnnotateIgnoreReadsEnd(const char*, int);
extern "C" void AnnotateIgnoreWritesBegin(const char*, int);
extern "C" void AnnotateIgnoreWritesEnd(const char*, int);
static inline void emu_release(void* sync) { __tsan_release(sync); }
static inline void emu_acquire(void* sync) { __tsan_acquire(sync); }
struct EmuUntracked {
    EmuUntracked() {
        AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
        AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    }
    ~EmuUntracked() {
        AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
        AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    }
};
#else
static inline void emu_release(void*) {}
static inline void emu_acquire(void*) {}
struct EmuUntracked {};
#endif

// ---- barriers -------------------------------------------------------------------------
// The first error of a launch (a collective with exited lanes), the launch's result.
void emu_report(const char* what);

// wait() and drop() are the runtime's (runtime.cpp): a fiber yields until the barrier
// opens. wait(true) orders every access before it, in every thread, before every access
// after it (__syncthreads, __syncwarp); wait(false) only synchronises (a warp collective).
struct EmuBarrier {
    int n = 0, full = 0, waiting = 0;
    bool warp = false;  // a warp's barrier: every lane must take part (a block's: the threads left)
    unsigned long gen = 0;
    // ThreadSanitizer: generation g's arrivals release sync[g % 2], its departures acquire
    // it; a thread already arriving at the next generation releases the other one.
    char sync[2] = {};
    void reset(int count) { n = full = count; waiting = 0; }
    void wait(bool orders_memory);
    void drop();  // a thread left the kernel: it no longer takes part in this block
};

// A collective is one warp barrier: lanes publish into buffer `phase`, wait, read. The
// buffers alternate, so a lane that runs ahead into the next collective writes the other
// buffer, and the one after that only after every lane has reached the next barrier,
// that is, has finished reading this one.
struct EmuWarp {
    EmuBarrier bar;
    int phase[32];
    uint64_t slot[2][32];
    const void* ptr[2][32];
    uint32_t regs[2][32][6];
};
EmuWarp* emu_warp();
EmuBarrier* emu_block_barrier();

static inline int emu_lane() { return (int)(threadIdx.x & 31u); }
static inline void __syncthreads() { emu_block_barrier()->wait(true); }
static inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp()->bar.wait(true); }

// A warp collective (shuffle, ballot, ldmatrix, mma): `publish(warp, phase)` writes this
// lane's part, then, once every lane of the warp has, `collect(warp, phase)` reads the
// others'. On a GPU a collective synchronises the lanes but orders no memory access: only
// __syncwarp and __syncthreads do (CUDA C++ Programming Guide, "Warp Shuffle Functions" vs
// "__syncwarp()"). So its barrier orders nothing for ThreadSanitizer, and a lane writing
// shared memory that another lane read before the same shuffle, with no __syncwarp in
// between, is a race.
template <typename Publish, typename Collect> static inline void emu_collective(Publish publish, Collect collect) {
    EmuWarp* w = emu_warp();
    int ph;
    {
        EmuUntracked untracked;
        ph = w->phase[emu_lane()];
        w->phase[emu_lane()] = ph ^ 1;
        publish(w, ph);
    }
    w->bar.wait(false);
    EmuUntracked untracked;
    collect(w, ph);
}

template <typename V> static inline V emu_exchange(V v, int src) {
    static_assert(sizeof(V) <= 8, "8 bytes at most");
    uint64_t bits = 0, got = 0;
    std::memcpy(&bits, &v, sizeof(V));
    emu_collective([&](EmuWarp* w, int ph) { w->slot[ph][emu_lane()] = bits; },
                   [&](EmuWarp* w, int ph) { got = w->slot[ph][src & 31]; });
    V r;
    std::memcpy(&r, &got, sizeof(V));
    return r;
}
template <typename V> static inline V __shfl_xor_sync(unsigned, V v, int o) { return emu_exchange(v, emu_lane() ^ o); }
template <typename V> static inline V __shfl_sync(unsigned, V v, int src) { return emu_exchange(v, src); }
static inline unsigned __ballot_sync(unsigned, bool pred) {
    unsigned r = 0;
    emu_collective([&](EmuWarp* w, int ph) { w->slot[ph][emu_lane()] = pred ? 1u : 0u; },
                   [&](EmuWarp* w, int ph) {
                       for (int l = 0; l < 32; ++l) r |= (unsigned)(w->slot[ph][l] & 1u) << l;
                   });
    return r;
}
static inline bool __any_sync(unsigned m, bool pred) { return __ballot_sync(m, pred) != 0u; }

// ---- 16-bit float conversions (the .cu files use PTX cvt for these) ----------------------
struct f16;
struct bf16;
static inline float emu_f16_to_f32(unsigned short b) { _Float16 h; std::memcpy(&h, &b, 2); return (float)h; }
static inline unsigned short emu_f32_to_f16(float x) { _Float16 h = (_Float16)x; unsigned short b; std::memcpy(&b, &h, 2); return b; }

// ---- cp.async / ldmatrix / mma (matmul.cu's tensor-core path) ----------------------------
// cp.async is asynchronous: a copy joins the thread's open group, commit closes it, and
// cp.async.wait_group N completes all but the newest N committed groups. The emulation
// makes a copy land when its group completes, and fills the destination with 0xFF bytes
// (NaN in every float type) when it is issued, so a kernel that reads a stage before
// waiting for it (a wait count one too small) reads NaN, and a stage refilled before the
// wgmma reading it was retired feeds NaN to that wgmma.
struct EmuCopy { void* dst; const void* src; bool valid; };
struct EmuWgmmaOp { float* d; int n; uint64_t da, db; bool is_bf16; };
// A CUDA thread's asynchronous operations in flight: its fiber's (runtime.cpp).
struct EmuLane {
    std::vector<EmuCopy> cp_open;
    std::vector<std::vector<EmuCopy>> cp_groups;
    std::vector<EmuWgmmaOp> wg_open;
    std::vector<std::vector<EmuWgmmaOp>> wg_groups;
};
EmuLane& emu_lane_state();
// A GPU faults on a misaligned address (and the CUDA context is lost with it).
static inline bool emu_aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0u; }
static inline void cp_async16(void* smem, const void* gmem, bool valid) {
    if (!emu_aligned16(smem) || (valid && !emu_aligned16(gmem)))
        emu_report("cp.async of 16 bytes at an address that is not 16-byte aligned: a GPU faults");
    std::memset(smem, 0xFF, 16);
    emu_lane_state().cp_open.push_back({smem, gmem, valid});
}
static inline void cp_async_commit() {
    EmuLane& lane = emu_lane_state();
    lane.cp_groups.push_back(std::move(lane.cp_open));
    lane.cp_open.clear();
}
template <int N> static inline void cp_async_wait() {
    EmuLane& lane = emu_lane_state();
    while ((int)lane.cp_groups.size() > N) {
        for (const EmuCopy& c : lane.cp_groups.front()) {
            if (c.valid) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);  // src-size 0: zero fill
        }
        lane.cp_groups.erase(lane.cp_groups.begin());
    }
}
// At the end of a thread: copies still in flight into shared memory nobody waited for.
static inline bool emu_cp_async_pending() {
    EmuLane& lane = emu_lane_state();
    bool pending = !lane.cp_open.empty();
    for (const auto& g : lane.cp_groups) pending = pending || !g.empty();
    lane.cp_open.clear();
    lane.cp_groups.clear();
    return pending;
}

static inline uint32_t emu_ld2(const void* p) { uint32_t r; std::memcpy(&r, p, 4); return r; }
static inline uint16_t emu_ld1(const void* p) { uint16_t r; std::memcpy(&r, p, 2); return r; }

// Lanes 8i..8i+7 give the row addresses of matrix i; lane l receives row l/4, columns
// 2(l%4), 2(l%4)+1 of each matrix (of its transpose with .trans).
static inline void emu_ldsm(uint32_t (&r)[4], const void* p, bool trans) {
    const int lane = emu_lane();
    if (!emu_aligned16(p)) emu_report("ldmatrix row address not 16-byte aligned: a GPU faults");
    const void* rows[4][2];  // the row addresses this lane reads, from the lanes that gave them
    emu_collective([&](EmuWarp* w, int ph) { w->ptr[ph][lane] = p; },
                   [&](EmuWarp* w, int ph) {
                       for (int i = 0; i < 4; ++i) {
                           rows[i][0] = w->ptr[ph][trans ? 8 * i + 2 * (lane % 4) : 8 * i + lane / 4];
                           rows[i][1] = w->ptr[ph][trans ? 8 * i + 2 * (lane % 4) + 1 : 8 * i + lane / 4];
                       }
                   });
    // The shared-memory reads themselves stay visible to ThreadSanitizer.
    for (int i = 0; i < 4; ++i) {
        if (!trans) {
            r[i] = emu_ld2((const uint16_t*)rows[i][0] + 2 * (lane % 4));
        } else {
            const uint16_t lo = emu_ld1((const uint16_t*)rows[i][0] + lane / 4);
            const uint16_t hi = emu_ld1((const uint16_t*)rows[i][1] + lane / 4);
            r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
}
static inline void ldsm_x4(uint32_t (&r)[4], const void* p) { emu_ldsm(r, p, false); }
static inline void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { emu_ldsm(r, p, true); }

// mma.m16n8k16.row.col, f32 accumulate, emulated with sequential fmaf over k.
template <bool IS_BF16>
static inline void emu_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const int lane = emu_lane();
    emu_collective(
        [&](EmuWarp* w, int ph) {
            for (int i = 0; i < 4; ++i) w->regs[ph][lane][i] = a[i];
            w->regs[ph][lane][4] = b0;
            w->regs[ph][lane][5] = b1;
        },
        [&](EmuWarp* w, int ph) {  // registers only
            auto half = [&](int ln, int reg, int hi) -> float {
                const uint16_t bits = (uint16_t)(w->regs[ph][ln][reg] >> (16 * hi));
                return IS_BF16 ? __uint_as_float((uint32_t)bits << 16) : emu_f16_to_f32(bits);
            };
            const int g = lane / 4, t = lane % 4;
            float out[4];
            for (int r = 0; r < 4; ++r) {
                const int row = g + (r >= 2 ? 8 : 0), col = 2 * t + (r & 1);
                float acc = c[r];
                for (int k = 0; k < 16; ++k) {
                    const float av = half((row % 8) * 4 + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k % 2);
                    const float bv = half(col * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0), k % 2);
                    acc = std::fma(av, bv, acc);
                }
                out[r] = acc;
            }
            for (int r = 0; r < 4; ++r) c[r] = out[r];
        });
}

// ---- wgmma (matmul_sm90.cu) -------------------------------------------------------------
// A shared-memory address is the offset into the dynamic shared memory plus an origin that
// is 16-byte but not 1024-byte aligned: a kernel whose swizzled tiles need 1024-byte
// alignment has to align them itself, as on a GPU.
// 16-byte aligned as CUDA's: a 16-byte load from a misaligned address is an error that
// the UndefinedBehaviorSanitizer run reports (a GPU faults).
struct alignas(16) uint4 { unsigned x, y, z, w; };
constexpr uint32_t EMU_SMEM_ORIGIN = 0x10;
static inline uint32_t smem_addr(const void* p) {
    return (uint32_t)((const unsigned char*)p - (const unsigned char*)emu_dynamic_smem()) + EMU_SMEM_ORIGIN;
}

// wgmma.mma_async is asynchronous: an issued operation joins the open group, commit closes
// it, and wait_group N completes all but the newest N groups. The emulation computes an
// operation when it completes, reading shared memory then, so a kernel that refills a
// stage before the wgmma reading it has been waited for gets the new values (and, under
// ThreadSanitizer, a race report), and one that reads the accumulators early reads stale
// ones. Each thread computes its own accumulator fragment: rows 16 * (warp % 4) + lane / 4
// (+ 8) of the 64, columns 8 * (i / 4) + 2 * (lane % 4) + i % 2, by sequential fma over
// the instruction's 16 k (like emu_mma: the layout is exact, the rounding not the hardware's).

// Element (row, k) of a K-major operand in the 128-byte swizzle: rows 128 bytes apart
// within an 8-row group, groups `stride` bytes apart (descriptor bits 32-45), and the
// 16-byte chunk bits 4-6 of the address xor-ed with its bits 7-9.
static inline float emu_wg_operand(uint64_t desc, int row, int k, bool is_bf16) {
    if ((desc >> 62) != 1u || ((desc >> 49) & 7u) != 0u) {
        emu_report("wgmma descriptor: only the 128-byte swizzle with base offset 0 is emulated");
        return 0.0f;
    }
    const uint32_t start = (uint32_t)(desc & 0x3FFFu) << 4, stride = (uint32_t)((desc >> 32) & 0x3FFFu) << 4;
    uint32_t addr = start + (uint32_t)(row / 8) * stride + (uint32_t)(row % 8) * 128u + (uint32_t)k * 2u;
    addr ^= ((addr >> 7) & 7u) << 4;
    uint16_t bits;
    std::memcpy(&bits, (const unsigned char*)emu_dynamic_smem() + (addr - EMU_SMEM_ORIGIN), 2);
    return is_bf16 ? __uint_as_float((uint32_t)bits << 16) : emu_f16_to_f32(bits);
}
static inline void emu_wgmma_run(const EmuWgmmaOp& op) {
    const int w = (int)(threadIdx.x / 32) % 4, lane = emu_lane();
    for (int i = 0; i < op.n / 2; ++i) {
        const int row = 16 * w + lane / 4 + 8 * ((i % 4) / 2), col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
        float acc = op.d[i];
        for (int k = 0; k < 16; ++k)
            acc = std::fma(emu_wg_operand(op.da, row, k, op.is_bf16), emu_wg_operand(op.db, col, k, op.is_bf16), acc);
        op.d[i] = acc;
    }
}
template <typename T, int N> struct Wgmma {
    static inline void run(float (&d)[N / 2], uint64_t da, uint64_t db) {
        emu_lane_state().wg_open.push_back({d, N, da, db, std::is_same<T, bf16>::value});
    }
};
static inline void wgmma_fence() {}
static inline void fence_proxy_async() {}
template <int R> static inline void wg_fence_acc(float (&)[R]) {}
static inline void wgmma_commit() {
    EmuLane& lane = emu_lane_state();
    lane.wg_groups.push_back(std::move(lane.wg_open));
    lane.wg_open.clear();
}
template <int N> static inline void wgmma_wait() {
    EmuLane& lane = emu_lane_state();
    while ((int)lane.wg_groups.size() > N) {
        for (const EmuWgmmaOp& op : lane.wg_groups.front()) emu_wgmma_run(op);
        lane.wg_groups.erase(lane.wg_groups.begin());
    }
}
// At the end of a thread: a wgmma never waited for is undefined behaviour.
static inline bool emu_wgmma_pending() {
    EmuLane& lane = emu_lane_state();
    const bool pending = !lane.wg_open.empty() || !lane.wg_groups.empty();
    lane.wg_open.clear();
    lane.wg_groups.clear();
    return pending;
}

static inline float f16_bits_to_f32(unsigned short b) { return emu_f16_to_f32(b); }
static inline unsigned short f32_to_f16_bits(float x) { return emu_f32_to_f16(x); }

// ---- entry points ---------------------------------------------------------------------
// The test harness appends an EMU_ENTRIES(...) table of the file's extern "C" kernels, so
// that a launch calls a kernel from C++ with its real parameter types (no Python on a
// fiber's stack). Each argument arrives as a pointer to its value and its size in bytes.
struct EmuEntry {
    const char* name;
    int (*call)(int argc, void* const* argv, const unsigned* sizes);  // -1: the arguments do not fit
};
template <typename... A, size_t... I>
static inline int emu_invoke_at(void (*f)(A...), void* const* argv, const unsigned* sizes, std::index_sequence<I...>) {
    const bool fit = ((sizes[I] == sizeof(std::decay_t<A>)) && ... && true);
    if (!fit) return -1;
    f(*static_cast<const std::decay_t<A>*>(argv[I])...);
    return 0;
}
template <typename... A>
static inline int emu_invoke(void (*f)(A...), int argc, void* const* argv, const unsigned* sizes) {
    if (argc != (int)sizeof...(A)) return -1;
    return emu_invoke_at(f, argv, sizes, std::index_sequence_for<A...>{});
}
extern "C" const char* emu_launch_entry_in(const EmuEntry* table, size_t n, const char* name, int argc,
                                           void* const* argv, const unsigned* sizes, unsigned gx, unsigned gy,
                                           unsigned gz, unsigned bx, unsigned smem);
#define EMU_ENTRY(f) {#f, [](int argc, void* const* argv, const unsigned* sizes) { return emu_invoke(&f, argc, argv, sizes); }},
#define EMU_ENTRIES(...)                                                                                         \
    static const EmuEntry emu_entry_table[] = {__VA_ARGS__};                                                     \
    extern "C" const char* emu_launch_entry(const char* name, int argc, void* const* argv, const unsigned* sizes, \
                                            unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem) {  \
        return emu_launch_entry_in(emu_entry_table, sizeof(emu_entry_table) / sizeof(emu_entry_table[0]), name,  \
                                   argc, argv, sizes, gx, gy, gz, bx, smem);                                     \
    }
