// Hopper tensor-core GEMM, portable=False, for bfloat16 / float16 with float32
// accumulation: wgmma.mma_async (sm_90a only). Compiled after matmul.cu in one unit, and
// only for sm_90 GPUs (cuda_loader.UNIT_ARCHS), with the same options as every kernel.
//
// Batch invariance as for tc_mm (matmul.cu): one CTA reduces the whole K of its BM x BN
// tile in a fixed loop (no split-K, no atomics), rows outside [0, M) are zero-filled and
// never stored, the bias is added after the K loop. Every output element is the chain of
// wgmma.m64nBNk16 over k = 0..15, 16..31, ... in order, whatever M is, so every
// configuration of this family gives the same bits. Whether they are also the mma.sync
// family's bits depends on how the hardware sums the 16 products inside one instruction:
// tests/test_cuda_gpu.py checks this family against itself, benchmarks/bench_cuda.py
// reports the comparison.
//
// Shared memory, per stage: A as BM rows and B as BN rows of BK = 64 16-bit values
// (128 bytes, k-contiguous: "K-major" for wgmma) in the 128-byte swizzle that the
// descriptors declare: 16-byte chunk c of row r lies at chunk c ^ (r % 8) of the row, and
// rows are 128 bytes apart (so 8-row groups 1024). The hardware swizzles address bits 4-6
// with bits 7-9, so the tiles start 1024-byte aligned; a k step of 16 inside the 64 adds
// 32 bytes to the descriptors' start address.
//
// Pipeline: cp.async fills stage kt + STAGES - 2 while the tensor cores work on kt and may
// still finish kt - 1 (wgmma.wait_group 1): a stage is refilled only after every
// warpgroup has retired the wgmma that read it (its wait, then the barrier).

typedef unsigned long long u64;

template <int BM_, int BN_, int STAGES_>
struct WgCfg {
    static constexpr int BM = BM_, BN = BN_, BK = 64, STAGES = STAGES_;
    static constexpr int WGS = BM / 64, NT = 128 * WGS;           // a warpgroup per 64 rows
    static constexpr int A_STAGE = BM * 128, B_STAGE = BN * 128;  // bytes
    static constexpr int PREFETCH = STAGES - 2;                   // k tiles loading during a wgmma
    static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) + 1024;  // + alignment slack
    static_assert(BM % 64 == 0 && (WGS == 1 || WGS == 2), "one or two warpgroups of 64 rows");
    static_assert(BN == 64 || BN == 128 || BN == 256, "the instantiated wgmma widths");
    static_assert(STAGES >= 4 && SMEM_BYTES <= 227 * 1024, "a tile in flight during the wgmma; shared memory");
    static_assert((BM * 8) % NT == 0 && (BN * 8) % NT == 0, "whole 16-byte chunks per thread");
};

#ifndef DETKIT_HOST_EMU  // tests/cuda_emu/emu.h supplies these on the host
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "matmul_sm90.cu uses wgmma: compile it for sm_90a (detkit.kernels.cuda_loader does)"
#endif
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// This thread's shared-memory writes (st.shared and completed cp.async) become visible to
// the async proxy, through which wgmma reads its operands.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins the accumulators: the compiler may not move their reads or writes across this
// point (a wgmma in flight writes them behind the compiler's back).
template <int R> __device__ __forceinline__ void wg_fence_acc(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x N] += A[64 x 16] B[16 x N], both operands in shared memory (descriptors), f32 D.
// The N / 2 accumulators of a thread are asm operands %0 .. %(N/2 - 1), then come the two
// descriptors and the accumulate flag; inline asm has to name each one, 32 at a time here.
template <typename T, int N> struct Wgmma;
#define DETKIT_WG_NAMES_0 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
                          "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define DETKIT_WG_NAMES_32 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
                          "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define DETKIT_WG_NAMES_64 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
                          "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define DETKIT_WG_NAMES_96 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
                          "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define DETKIT_WG_ACC(o)                                                                            \
    "+f"(d[o + 0]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]), "+f"(d[o + 7]), \
    "+f"(d[o + 8]), "+f"(d[o + 9]), "+f"(d[o + 10]), "+f"(d[o + 11]), "+f"(d[o + 12]), "+f"(d[o + 13]), "+f"(d[o + 14]), "+f"(d[o + 15]), \
    "+f"(d[o + 16]), "+f"(d[o + 17]), "+f"(d[o + 18]), "+f"(d[o + 19]), "+f"(d[o + 20]), "+f"(d[o + 21]), "+f"(d[o + 22]), "+f"(d[o + 23]), \
    "+f"(d[o + 24]), "+f"(d[o + 25]), "+f"(d[o + 26]), "+f"(d[o + 27]), "+f"(d[o + 28]), "+f"(d[o + 29]), "+f"(d[o + 30]), "+f"(d[o + 31])
#define DETKIT_WG_NAMES64 DETKIT_WG_NAMES_0
#define DETKIT_WG_NAMES128 DETKIT_WG_NAMES_0 ", " DETKIT_WG_NAMES_32
#define DETKIT_WG_NAMES256 DETKIT_WG_NAMES128 ", " DETKIT_WG_NAMES_64 ", " DETKIT_WG_NAMES_96
#define DETKIT_WG_ACC64 DETKIT_WG_ACC(0)
#define DETKIT_WG_ACC128 DETKIT_WG_ACC(0), DETKIT_WG_ACC(32)
#define DETKIT_WG_ACC256 DETKIT_WG_ACC128, DETKIT_WG_ACC(64), DETKIT_WG_ACC(96)
#define DETKIT_WG_DESC64 "%32, %33"
#define DETKIT_WG_DESC128 "%64, %65"
#define DETKIT_WG_DESC256 "%128, %129"
#define DETKIT_WG_FLAG64 "%34"
#define DETKIT_WG_FLAG128 "%66"
#define DETKIT_WG_FLAG256 "%130"
#define DETKIT_WGMMA(T, PTX_T, N)                                                                    \
    template <> struct Wgmma<T, N> {                                                                \
        static __device__ __forceinline__ void run(float (&d)[N / 2], u64 da, u64 db) {             \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " DETKIT_WG_FLAG##N ", 0;\n"              \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_T "." PTX_T              \
                         " {" DETKIT_WG_NAMES##N "}, " DETKIT_WG_DESC##N ", p, 1, 1, 0, 0;\n}\n"       \
                         : DETKIT_WG_ACC##N : "l"(da), "l"(db), "r"(1) : "memory");                  \
        }                                                                                           \
    };
DETKIT_WGMMA(bf16, "bf16", 64)
DETKIT_WGMMA(bf16, "bf16", 128)
DETKIT_WGMMA(bf16, "bf16", 256)
DETKIT_WGMMA(f16, "f16", 64)
DETKIT_WGMMA(f16, "f16", 128)
DETKIT_WGMMA(f16, "f16", 256)
#endif

// Byte offset of 16-byte chunk `chunk` of row `row` in a 128-byte-swizzled tile.
__device__ __forceinline__ int wg_swizzle(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// Shared-memory matrix descriptor of a K-major tile in the 128-byte swizzle: start
// address >> 4 (bits 0-13), leading-dimension offset 16 bytes (unused by this swizzle),
// stride 1024 bytes between 8-row groups (bits 32-45), swizzle mode 1 = 128 bytes (62-63).
__device__ __forceinline__ u64 wg_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFFu) >> 4) | ((u64)(16 >> 4) << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

template <typename T, bool B_KMAJOR, typename CFG>
__device__ __forceinline__ void wg_mm(const T* __restrict__ A, const T* __restrict__ B,
                                      const T* __restrict__ bias, T* __restrict__ C, int M, int N,
                                      int K, i64 sa_b, i64 sa_m, i64 sb_b, i64 sb_ld, int vec, int mt,
                                      int z) {
    constexpr int BM = CFG::BM, BN = CFG::BN, BK = CFG::BK, NT = CFG::NT, STAGES = CFG::STAGES;
    constexpr int A_STAGE = CFG::A_STAGE, B_STAGE = CFG::B_STAGE, PREFETCH = CFG::PREFETCH;
    DETKIT_DYNAMIC_SMEM(unsigned char, wg_smem);  // CFG::SMEM_BYTES, passed at launch
    unsigned char* const sA = wg_smem + ((1024u - (smem_addr(wg_smem) & 1023u)) & 1023u);
    unsigned char* const sB = sA + STAGES * A_STAGE;

    const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid & 31;
    const int m0 = mt * BM, n0 = blockIdx.x * BN;
    const u16* Ag = reinterpret_cast<const u16*>(A) + (i64)z * sa_b;
    const u16* Bg = reinterpret_cast<const u16*>(B) + (i64)z * sb_b;
    C += (i64)z * (i64)M * (i64)N;

    // Element (row, k) of a stage's tile, k in [0, 64).
    auto at = [](unsigned char* tile, int row, int k) -> u16* {
        return reinterpret_cast<u16*>(tile + wg_swizzle(row, k / 8) + (k % 8) * 2);
    };
    auto load_stage = [&](int stage, int k0) {
        unsigned char* a_s = sA + stage * A_STAGE;
        unsigned char* b_s = sB + stage * B_STAGE;
        if (vec) {
#pragma unroll
            for (int i = 0; i < BM * 8 / NT; ++i) {
                const int c = tid + i * NT, row = c / 8, ch = c % 8;
                const bool ok = (m0 + row < M) && (k0 + ch * 8 < K);
                cp_async16(a_s + wg_swizzle(row, ch), ok ? Ag + (i64)(m0 + row) * sa_m + (k0 + ch * 8) : Ag, ok);
            }
            if (B_KMAJOR) {  // global b[k, n] at n * sb_ld + k: 16-byte chunks along k
#pragma unroll
                for (int i = 0; i < BN * 8 / NT; ++i) {
                    const int c = tid + i * NT, row = c / 8, ch = c % 8;
                    const bool ok = (n0 + row < N) && (k0 + ch * 8 < K);
                    cp_async16(b_s + wg_swizzle(row, ch), ok ? Bg + (i64)(n0 + row) * sb_ld + (k0 + ch * 8) : Bg, ok);
                }
            } else {  // global b[k, n] at k * sb_ld + n: chunks along n, transposed here
                // Four 16-byte loads in flight, not all eight: fully unrolled, the loads'
                // registers on top of 128 accumulators made the 128x256 tile spill.
                // A warp's 32 threads take 32 consecutive k of one 8-column chunk, so
                // each of the 8 stores writes one 128-byte row: 16 words in 16 banks. With
                // consecutive threads along n (coalesced loads) every store of a warp hit
                // one bank in BN / 8 rows: an 8- to 32-way conflict.
#pragma unroll 4
                for (int i = 0; i < BN * 8 / NT; ++i) {
                    const int c = tid + i * NT, k = c % BK, nc = (c / BK) * 8;
                    const bool ok = (k0 + k < K) && (n0 + nc < N);
                    uint4 v = {0u, 0u, 0u, 0u};
                    if (ok) v = *reinterpret_cast<const uint4*>(Bg + (i64)(k0 + k) * sb_ld + (n0 + nc));
                    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                    for (int j = 0; j < 8; ++j) *at(b_s, nc + j, k) = (u16)(w[j / 2] >> (16 * (j % 2)));
                }
            }
        } else {
            for (int e = tid; e < BM * BK; e += NT) {
                const int row = e / BK, k = e % BK;
                const bool ok = (m0 + row < M) && (k0 + k < K);
                *at(a_s, row, k) = ok ? Ag[(i64)(m0 + row) * sa_m + (k0 + k)] : (u16)0;
            }
            for (int e = tid; e < BN * BK; e += NT) {
                const int n = B_KMAJOR ? e / BK : e % BN, k = B_KMAJOR ? e % BK : e / BN;
                const bool ok = (n0 + n < N) && (k0 + k < K);
                *at(b_s, n, k) = !ok ? (u16)0
                                     : B_KMAJOR ? Bg[(i64)(n0 + n) * sb_ld + (k0 + k)] : Bg[(i64)(k0 + k) * sb_ld + (n0 + n)];
            }
        }
    };

    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;

    const int ktiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < PREFETCH; ++s) {
        if (s < ktiles) load_stage(s, s * BK);
        cp_async_commit();
    }
    const u32 a_base = smem_addr(sA) + wg * 64 * 128;  // this warpgroup's 64 rows of A
    const u32 b_base = smem_addr(sB);
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<PREFETCH - 1>();  // tile kt has landed (this thread's part)
        fence_proxy_async();
        __syncthreads();  // everyone's part has; everyone has retired the wgmma of kt - 2
        const int nk = kt + PREFETCH;
        if (nk < ktiles) load_stage(nk % STAGES, nk * BK);  // the stage of kt - 2
        cp_async_commit();

        const int s = kt % STAGES;
        // The k steps that hold a real k, as in tc_mm: ceil(K / 16) steps in all, so that
        // both tensor-core families run the same chain (no all-zero step past K).
        const int ksteps = min(BK / 16, (K - kt * BK + 15) / 16);
        wg_fence_acc(acc);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks)
            if (ks < ksteps)
                Wgmma<T, BN>::run(acc, wg_desc(a_base + s * A_STAGE + ks * 32),
                                  wg_desc(b_base + s * B_STAGE + ks * 32));
        wgmma_commit();
        wgmma_wait<1>();  // the wgmma of kt - 1 is done: its stage may be refilled after the next barrier
        wg_fence_acc(acc);
    }
    wgmma_wait<0>();
    wg_fence_acc(acc);
    cp_async_wait<0>();

    // Epilogue: accumulator i of a thread holds row 16 * warp + lane / 4 (+ 8 for i % 4 >= 2)
    // of its warpgroup's 64, column 8 * (i / 4) + 2 * (lane % 4) + i % 2; the bias after
    // the full K reduction, one rounding to T.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int m = m0 + wg * 64 + warp * 16 + (lane >> 2) + half * 8;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int n = n0 + j * 8 + (lane & 3) * 2 + q;
                if (n >= N) continue;
                float v = acc[4 * j + 2 * half + q];
                if (bias != nullptr) v = __fadd_rn(v, to_f32(bias[n]));
                C[(i64)m * N + n] = from_f32<T>(v);
            }
        }
    }
}

#define DETKIT_WG_ENTRY(NAME, T, KMAJOR, CFG)                                                 \
    extern "C" __global__ void __launch_bounds__(CFG::NT)                                     \
    NAME(const T* A, const T* B, const T* bias, T* C, int M, int N, int K, i64 sa_b,           \
         i64 sa_m, i64 sb_b, i64 sb_ld, int vec) {                                             \
        wg_mm<T, KMAJOR, CFG>(A, B, bias, C, M, N, K, sa_b, sa_m, sb_b, sb_ld, vec, blockIdx.y, \
                              blockIdx.z);                                                    \
    }
// The grouped form (torch._grouped_mm's MoE experts), as matmul.cu's: a CTA row finds its
// group and tile from offs on the device (group_tile) and runs the plain kernel on the
// group's rows, so a row's bits are those of the plain kernel on its group.
#define DETKIT_WG_GROUPED_ENTRY(NAME, T, KMAJOR, CFG)                                        \
    extern "C" __global__ void __launch_bounds__(CFG::NT)                                     \
    NAME(const T* A, const T* B, const int* offs, T* C, int S, int G, int N, int K,           \
         i64 sa_m, i64 sb_b, i64 sb_ld, int vec) {                                            \
        int t = blockIdx.y, g, start, rows;                                                   \
        if (!group_tile<CFG::BM>(offs, G, S, t, g, start, rows)) return;                      \
        wg_mm<T, KMAJOR, CFG>(A + (i64)start * sa_m, B + (i64)g * sb_b, nullptr,              \
                              C + (i64)start * N, rows, N, K, 0, sa_m, 0, sb_ld, vec, t, 0);  \
    }
// mm_wg_<BM>x<BN>x64_s<stages>_<dtype>_<B layout>: detkit.kernels.cuda.WG_TAGS.
#define DETKIT_WG_CONFIG(TAG, BM, BN, S)                                                      \
    using WgCfg_##TAG = WgCfg<BM, BN, S>;                                                      \
    extern "C" __device__ const int mm_wg_##TAG##_smem_bytes = WgCfg_##TAG::SMEM_BYTES;        \
    DETKIT_WG_ENTRY(mm_wg_##TAG##_bf16_kmajor, bf16, true, WgCfg_##TAG)                        \
    DETKIT_WG_ENTRY(mm_wg_##TAG##_bf16_nmajor, bf16, false, WgCfg_##TAG)                       \
    DETKIT_WG_ENTRY(mm_wg_##TAG##_f16_kmajor, f16, true, WgCfg_##TAG)                          \
    DETKIT_WG_ENTRY(mm_wg_##TAG##_f16_nmajor, f16, false, WgCfg_##TAG)
// Two warpgroups (256 threads) for large M; one for fewer rows; 64 wide for N / 64 CTAs
// at decode sizes. All but one take a whole SM's shared memory for pipeline depth;
// 64x128x64_s4 (97 KiB) fits two CTAs per SM instead, so one CTA's barrier wait overlaps
// the other's wgmma.
DETKIT_WG_CONFIG(128x256x64_s4, 128, 256, 4)
DETKIT_WG_CONFIG(128x128x64_s5, 128, 128, 5)
DETKIT_WG_CONFIG(128x64x64_s6, 128, 64, 6)
DETKIT_WG_CONFIG(64x128x64_s6, 64, 128, 6)
DETKIT_WG_CONFIG(64x128x64_s4, 64, 128, 4)
DETKIT_WG_CONFIG(64x64x64_s8, 64, 64, 8)
// Grouped entries of the configuration the H200's GPU times point at for the sm_90 table
// (benchmarks/RESULTS.md): 1.5x the mma.sync default's speed at every M measured.
DETKIT_WG_GROUPED_ENTRY(mm_wg_64x128x64_s4_bf16_grouped_kmajor, bf16, true, WgCfg_64x128x64_s4)
DETKIT_WG_GROUPED_ENTRY(mm_wg_64x128x64_s4_bf16_grouped_nmajor, bf16, false, WgCfg_64x128x64_s4)
DETKIT_WG_GROUPED_ENTRY(mm_wg_64x128x64_s4_f16_grouped_kmajor, f16, true, WgCfg_64x128x64_s4)
DETKIT_WG_GROUPED_ENTRY(mm_wg_64x128x64_s4_f16_grouped_nmajor, f16, false, WgCfg_64x128x64_s4)
