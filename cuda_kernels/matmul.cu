// detkit matmul kernels: C[b] = A[b] @ B[b] (+ bias), C contiguous (batch, M, N).
//
// Batch invariance: the reduction order of every output element depends only on K and
// the tile configuration, which is fixed per dtype and architecture (never chosen from
// M). One CTA reduces the whole K in a fixed loop; no split-K, no atomics; the bias is
// added after the K loop; rows outside [0, M) are zero-filled and never stored.

// =====================================================================================
// Fixed-order CUDA-core GEMM: the canonical order (docs/canonical-orders.md, ChunkDot).
//   acc = +0
//   for each chunk of 256 consecutive k (from k = 0):
//       part = +0;  for k in the chunk, increasing:  part = fma(a[m,k], b[k,n], part)
//       acc = acc + part
//   if bias:   acc = acc + bias[n]
//   out = round_to_T(acc)                     (every step one IEEE rounding)
// Inputs are widened exactly to float32. Used for portable=True (every dtype) and for
// float32 portable=False (CUDA cores, never TF32: this order is already as fast as any).
// =====================================================================================
// A configuration: CTA tile BM x BN, K step BK, per-thread micro tile TM x TN. The
// arithmetic (ChunkDot) is the same for every configuration; only speed differs.
template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct SimtCfg {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
    static constexpr int NT = (BM / TM) * (BN / TN);
    static constexpr int PAD = 4;      // smem row padding (floats) against bank conflicts
    static constexpr int CHUNK = 256;  // ChunkDot chunk: a whole number of BK tiles
    static_assert(CHUNK % BK == 0, "K tiles must coincide with the 256-chunks");
    static_assert(NT % BK == 0 && NT % BN == 0 && (BM * BK) % NT == 0 && (BK * BN) % NT == 0,
                  "the load mapping needs whole rows per pass");
};

template <typename T, bool B_KMAJOR, typename CFG>
__device__ __forceinline__ void simt_mm(const T* __restrict__ A, const T* __restrict__ B,
                                        const T* __restrict__ bias, T* __restrict__ C,
                                        int M, int N, int K, i64 sa_b, i64 sa_m,
                                        i64 sb_b, i64 sb_ld, int mt, int z) {
    constexpr int BM = CFG::BM, BN = CFG::BN, BK = CFG::BK, TM = CFG::TM, TN = CFG::TN;
    constexpr int NT = CFG::NT, PAD = CFG::PAD, CHUNK = CFG::CHUNK;
    __shared__ __align__(16) float As[2][BK][BM + PAD];
    __shared__ __align__(16) float Bs[2][BK][BN + PAD];

    const int tid = threadIdx.x;
    const int tr = tid / (BN / TN), tc = tid % (BN / TN);
    const int m0 = mt * BM, n0 = blockIdx.x * BN;
    A += (i64)z * sa_b;
    B += (i64)z * sb_b;
    C += (i64)z * (i64)M * (i64)N;

    // Global -> shared mapping (follows the unit stride for coalescing; it decides only
    // where values are loaded from, never the arithmetic order). A is k-contiguous:
    // thread loads k = tid % BK of rows tid / BK + i * (NT / BK). B is k-contiguous
    // (b[k, n] at n * ld + k, a transposed nn.Linear weight) or n-contiguous (k * ld + n).
    constexpr int A_PER = BM * BK / NT, B_PER = BK * BN / NT;
    const int a_k = tid % BK, a_m = tid / BK;
    const int b_k = B_KMAJOR ? tid % BK : tid / BN;
    const int b_n = B_KMAJOR ? tid / BK : tid % BN;
    const T* a_ptr = A + (i64)(m0 + a_m) * sa_m + a_k;
    const T* b_ptr = B_KMAJOR ? B + (i64)(n0 + b_n) * sb_ld + b_k : B + (i64)b_k * sb_ld + (n0 + b_n);
    float ra[A_PER], rb[B_PER];

    auto load_tiles = [&](int k0) {
        const bool ak = a_k + k0 < K;
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            const bool ok = ak && (m0 + a_m + i * (NT / BK) < M);
            ra[i] = ok ? load_f32(a_ptr, (i64)i * (NT / BK) * sa_m + k0) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            if (B_KMAJOR) {
                const bool ok = (b_k + k0 < K) && (n0 + b_n + i * (NT / BK) < N);
                rb[i] = ok ? load_f32(b_ptr, (i64)i * (NT / BK) * sb_ld + k0) : 0.0f;
            } else {
                const bool ok = (b_k + k0 + i * (NT / BN) < K) && (n0 + b_n < N);
                rb[i] = ok ? load_f32(b_ptr, (i64)(k0 + i * (NT / BN)) * sb_ld) : 0.0f;
            }
        }
    };
    auto store_tiles = [&](int buf) {
#pragma unroll
        for (int i = 0; i < A_PER; ++i) As[buf][a_k][a_m + i * (NT / BK)] = ra[i];
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            if (B_KMAJOR) Bs[buf][b_k][b_n + i * (NT / BK)] = rb[i];
            else Bs[buf][b_k + i * (NT / BN)][b_n] = rb[i];
        }
    };

    float acc[TM][TN], part[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = part[i][j] = 0.0f;

    const int ktiles = (K + BK - 1) / BK;
    if (ktiles > 0) {
        load_tiles(0);
        store_tiles(0);
    }
    __syncthreads();
    for (int t = 0; t < ktiles; ++t) {
        const int buf = t & 1;
        if (t + 1 < ktiles) load_tiles((t + 1) * BK);
        // Only the real k of the last tile take part: a padded fma(0, 0, part) would turn
        // a partial sum of -0 (an underflowed product) into +0.
        const int kn = min(BK, K - t * BK);
        // One k step of the register tile, in increasing k (the spec's fma chain).
        auto step = [&](int kk) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[buf][kk][tr * TM + i];
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = Bs[buf][kk][tc * TN + j];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) part[i][j] = __fmaf_rn(a[i], b[j], part[i][j]);
        };
        if (kn == BK) {
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) step(kk);  // full tile: constant trip count, unrolled
        } else {
            for (int kk = 0; kk < kn; ++kk) step(kk);
        }
        if ((t + 1) % (CHUNK / BK) == 0 || t + 1 == ktiles) {  // chunk complete: one add
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) {
                    acc[i][j] = __fadd_rn(acc[i][j], part[i][j]);
                    part[i][j] = 0.0f;
                }
        }
        if (t + 1 < ktiles) store_tiles(buf ^ 1);
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + tr * TM + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tc * TN + j;
            if (n >= N) continue;
            float v = acc[i][j];
            if (bias != nullptr) v = __fadd_rn(v, load_f32(bias, n));
            C[(i64)m * N + n] = from_f32<T>(v);
        }
    }
}

#define DETKIT_SIMT_ENTRY(NAME, T, KMAJOR, CFG)                                              \
    extern "C" __global__ void __launch_bounds__(CFG::NT)                                     \
    NAME(const T* A, const T* B, const T* bias, T* C, int M, int N, int K, i64 sa_b,          \
         i64 sa_m, i64 sb_b, i64 sb_ld) {                                                     \
        simt_mm<T, KMAJOR, CFG>(A, B, bias, C, M, N, K, sa_b, sa_m, sb_b, sb_ld, blockIdx.y,  \
                                blockIdx.z);                                                  \
    }
// mm_simt_<BM>x<BN>x<BK>_<TM>x<TN>_<dtype>_<B layout>. This file instantiates the
// configurations detkit.kernels.cuda's tables use; matmul_tiles.cu (compiled together with
// this file) adds the alternatives that benchmarks/bench_cuda.py compares.
// ENTRY for every dtype and B layout of configuration TAG; KIND is empty or _grouped.
#define DETKIT_SIMT_ENTRIES(ENTRY, TAG, KIND)                                                 \
    ENTRY(mm_simt_##TAG##_f32##KIND##_kmajor, float, true, SimtCfg_##TAG)                      \
    ENTRY(mm_simt_##TAG##_f32##KIND##_nmajor, float, false, SimtCfg_##TAG)                     \
    ENTRY(mm_simt_##TAG##_bf16##KIND##_kmajor, bf16, true, SimtCfg_##TAG)                      \
    ENTRY(mm_simt_##TAG##_bf16##KIND##_nmajor, bf16, false, SimtCfg_##TAG)                     \
    ENTRY(mm_simt_##TAG##_f16##KIND##_kmajor, f16, true, SimtCfg_##TAG)                        \
    ENTRY(mm_simt_##TAG##_f16##KIND##_nmajor, f16, false, SimtCfg_##TAG)
#define DETKIT_SIMT_CONFIG(TAG, BM, BN, BK, TM, TN)                                           \
    using SimtCfg_##TAG = SimtCfg<BM, BN, BK, TM, TN>;                                         \
    DETKIT_SIMT_ENTRIES(DETKIT_SIMT_ENTRY, TAG, )
// The configurations are instantiated in this file's own unit only: matmul_tiles.cu and
// matmul_sm90.cu are compiled after this file for its templates, with
// DETKIT_TEMPLATES_ONLY defined (cuda_loader.translation_unit), and would compile them again.
#ifndef DETKIT_TEMPLATES_ONLY
DETKIT_SIMT_CONFIG(128x64x16_8x4, 128, 64, 16, 8, 4)
#endif

// =====================================================================================
// Tensor-core GEMM for bfloat16 / float16 with float32 accumulation (portable=False).
// mma.sync.m16n8k16, ldmatrix, cp.async 3-stage pipeline. Every output element is the
// chain of mma instructions over k = 0..15, 16..31, ... in order, whatever M is, so a
// row's bits do not depend on the batch. B may be k-contiguous (a transposed nn.Linear
// weight) or n-contiguous; both layouts feed identical fragments to the mma, so the
// bits do not depend on B's layout either.
// =====================================================================================
// A configuration: CTA tile BM x BN, K step BK, WGM x WGN warps (each a (BM / WGM) x
// (BN / WGN) warp tile), STAGES-deep cp.async pipeline. Every configuration feeds each
// output element the same chain of mma over k = 0..15, 16..31, ..., so all give the same
// bits (tests/test_cuda_*.py check it); they differ only in speed.
template <int BM_, int BN_, int BK_, int WGM_, int WGN_, int STAGES_>
struct TcCfg {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
    static constexpr int WGM = WGM_, WGN = WGN_, NT = 32 * WGM * WGN;
    static constexpr int WM = BM / WGM, WN = BN / WGN;    // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;       // mma tiles per warp
    static constexpr int LDA = BK + 8;                    // padded smem rows (halfs): conflict-free ldmatrix
    static constexpr int LDB_K = BK + 8, LDB_N = BN + 8;
    static constexpr int A_STAGE = BM * LDA;
    static constexpr int B_STAGE = (BN * LDB_K > BK * LDB_N) ? BN * LDB_K : BK * LDB_N;
    static_assert(WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0, "whole mma tiles, B fragments in pairs");
    static_assert((BM * BK / 8) % NT == 0 && (BN * BK / 8) % NT == 0, "whole 16-byte chunks per thread");
    // Dynamic shared memory (launch argument); above 48 KiB the launcher raises the
    // kernel's limit first. 227 KiB is the most an sm_90 CTA may have.
    static constexpr int SMEM_BYTES = 2 * STAGES * (A_STAGE + B_STAGE);
    static_assert(STAGES >= 2 && SMEM_BYTES <= 227 * 1024, "shared memory");
};

// vec != 0: every 8-element chunk the tiles read is 16-byte aligned and either wholly
// inside or wholly outside the matrix (the host checks pointers, strides, K and N), so
// cp.async can be used; otherwise the tiles are loaded element by element. Both paths
// put the same values in shared memory.
template <typename T, bool B_KMAJOR, typename CFG>
__device__ __forceinline__ void tc_mm(const T* __restrict__ A, const T* __restrict__ B,
                                      const T* __restrict__ bias, T* __restrict__ C, int M, int N,
                                      int K, i64 sa_b, i64 sa_m, i64 sb_b, i64 sb_ld, int vec,
                                      int mt, int z) {
    constexpr int BM = CFG::BM, BN = CFG::BN, BK = CFG::BK, NT = CFG::NT, STAGES = CFG::STAGES;
    constexpr int WM = CFG::WM, WN = CFG::WN, MI = CFG::MI, NI = CFG::NI, WGN = CFG::WGN;
    constexpr int LDA = CFG::LDA, LDB_K = CFG::LDB_K, LDB_N = CFG::LDB_N;
    constexpr int A_STAGE = CFG::A_STAGE, B_STAGE = CFG::B_STAGE;
    DETKIT_DYNAMIC_SMEM(u16, tc_smem);  // CFG::SMEM_BYTES, passed at launch
    u16* const sA = tc_smem;
    u16* const sB = tc_smem + STAGES * A_STAGE;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WGN, wn = warp % WGN;
    const int m0 = mt * BM, n0 = blockIdx.x * BN;
    const u16* Ag = reinterpret_cast<const u16*>(A) + (i64)z * sa_b;
    const u16* Bg = reinterpret_cast<const u16*>(B) + (i64)z * sb_b;
    C += (i64)z * (i64)M * (i64)N;

    auto load_stage = [&](int stage, int k0) {
        u16* a_s = sA + stage * A_STAGE;
        u16* b_s = sB + stage * B_STAGE;
        if (vec) {
            // A: BM rows x BK halfs = BM * BK / 8 chunks of 16 bytes.
#pragma unroll
            for (int i = 0; i < BM * BK / 8 / NT; ++i) {
                const int c = tid + i * NT;
                const int row = c / (BK / 8), col = (c % (BK / 8)) * 8;
                const bool ok = (m0 + row < M) && (k0 + col < K);
                const u16* src = ok ? Ag + (i64)(m0 + row) * sa_m + (k0 + col) : Ag;
                cp_async16(a_s + row * LDA + col, src, ok);
            }
#pragma unroll
            for (int i = 0; i < BN * BK / 8 / NT; ++i) {
                const int c = tid + i * NT;
                if (B_KMAJOR) {  // smem [n][k]; global b[k, n] at n * sb_ld + k
                    const int row = c / (BK / 8), col = (c % (BK / 8)) * 8;
                    const bool ok = (n0 + row < N) && (k0 + col < K);
                    const u16* src = ok ? Bg + (i64)(n0 + row) * sb_ld + (k0 + col) : Bg;
                    cp_async16(b_s + row * LDB_K + col, src, ok);
                } else {         // smem [k][n]; global b[k, n] at k * sb_ld + n
                    const int row = c / (BN / 8), col = (c % (BN / 8)) * 8;
                    const bool ok = (k0 + row < K) && (n0 + col < N);
                    const u16* src = ok ? Bg + (i64)(k0 + row) * sb_ld + (n0 + col) : Bg;
                    cp_async16(b_s + row * LDB_N + col, src, ok);
                }
            }
        } else {
            for (int e = tid; e < BM * BK; e += NT) {
                const int row = e / BK, col = e % BK;
                const bool ok = (m0 + row < M) && (k0 + col < K);
                a_s[row * LDA + col] = ok ? Ag[(i64)(m0 + row) * sa_m + (k0 + col)] : (u16)0;
            }
            for (int e = tid; e < BN * BK; e += NT) {
                if (B_KMAJOR) {
                    const int row = e / BK, col = e % BK;
                    const bool ok = (n0 + row < N) && (k0 + col < K);
                    b_s[row * LDB_K + col] = ok ? Bg[(i64)(n0 + row) * sb_ld + (k0 + col)] : (u16)0;
                } else {
                    const int row = e / BN, col = e % BN;
                    const bool ok = (k0 + row < K) && (n0 + col < N);
                    b_s[row * LDB_N + col] = ok ? Bg[(i64)(k0 + row) * sb_ld + (n0 + col)] : (u16)0;
                }
            }
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    const int ktiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s * BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        // Refill the stage computed in the previous iteration (everyone is past it now).
        const int nk = kt + STAGES - 1;
        if (nk < ktiles) load_stage(nk % STAGES, nk * BK);
        cp_async_commit();

        const u16* a_s = sA + (kt % STAGES) * A_STAGE;
        const u16* b_s = sB + (kt % STAGES) * B_STAGE;
        // Only the k steps that hold a real k: every configuration runs the same ceil(K / 16)
        // mma steps. A deeper tile's all-zero steps past K would turn a -0.0 accumulator
        // (products that underflowed below zero) into +0.0 where a shallower tile keeps it.
        const int ksteps = min(BK / 16, (K - kt * BK + 15) / 16);
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            if (ks >= ksteps) break;
            u32 af[MI][4];
            u32 bfr[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const int row = wm * WM + mi * 16 + (lane & 15);
                const int col = ks * 16 + (lane >> 4) * 8;
                ldsm_x4(af[mi], a_s + row * LDA + col);
            }
#pragma unroll
            for (int np = 0; np < NI / 2; ++np) {
                u32 r[4];
                if (B_KMAJOR) {
                    const int n = wn * WN + np * 16 + (lane & 7) + ((lane >> 4) << 3);
                    const int k = ks * 16 + ((lane >> 3) & 1) * 8;
                    ldsm_x4(r, b_s + n * LDB_K + k);
                } else {
                    const int k = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int n = wn * WN + np * 16 + (lane >> 4) * 8;
                    ldsm_x4_trans(r, b_s + k * LDB_N + n);
                }
                bfr[2 * np][0] = r[0];
                bfr[2 * np][1] = r[1];
                bfr[2 * np + 1][0] = r[2];
                bfr[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) Mma<T>::run(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: bias after the full K reduction, one rounding to T.
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + wm * WM + mi * 16 + (lane >> 2) + half * 8;
            if (m >= M) continue;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const int n = n0 + wn * WN + ni * 8 + (lane & 3) * 2;
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    if (n + q >= N) continue;
                    float v = acc[mi][ni][half * 2 + q];
                    if (bias != nullptr) v = __fadd_rn(v, to_f32(bias[n + q]));
                    C[(i64)m * N + n + q] = from_f32<T>(v);
                }
            }
        }
    }
}

#define DETKIT_TC_ENTRY(NAME, T, KMAJOR, CFG)                                                 \
    extern "C" __global__ void __launch_bounds__(CFG::NT)                                     \
    NAME(const T* A, const T* B, const T* bias, T* C, int M, int N, int K, i64 sa_b,           \
         i64 sa_m, i64 sb_b, i64 sb_ld, int vec) {                                             \
        tc_mm<T, KMAJOR, CFG>(A, B, bias, C, M, N, K, sa_b, sa_m, sb_b, sb_ld, vec, blockIdx.y, \
                              blockIdx.z);                                                    \
    }
// mm_tc_<BM>x<BN>x<BK>_<warps>_s<stages>_<dtype>_<B layout>: the configuration of
// detkit.kernels.cuda.MATMUL_TILES here, the alternatives in matmul_tiles.cu.
// ENTRY for every dtype and B layout of configuration TAG; KIND is empty or _grouped.
#define DETKIT_TC_ENTRIES(ENTRY, TAG, KIND)                                                   \
    ENTRY(mm_tc_##TAG##_bf16##KIND##_kmajor, bf16, true, TcCfg_##TAG)                          \
    ENTRY(mm_tc_##TAG##_bf16##KIND##_nmajor, bf16, false, TcCfg_##TAG)                         \
    ENTRY(mm_tc_##TAG##_f16##KIND##_kmajor, f16, true, TcCfg_##TAG)                            \
    ENTRY(mm_tc_##TAG##_f16##KIND##_nmajor, f16, false, TcCfg_##TAG)
#define DETKIT_TC_CONFIG(TAG, BM, BN, BK, WGM, WGN, S)                                        \
    using TcCfg_##TAG = TcCfg<BM, BN, BK, WGM, WGN, S>;                                        \
    /* the dynamic shared memory to launch with, for tests/test_cuda_compile.py */             \
    extern "C" __device__ const int mm_tc_##TAG##_smem_bytes = TcCfg_##TAG::SMEM_BYTES;        \
    DETKIT_TC_ENTRIES(DETKIT_TC_ENTRY, TAG, )
#ifndef DETKIT_TEMPLATES_ONLY
DETKIT_TC_CONFIG(128x64x32_2x2_s3, 128, 64, 32, 2, 2, 3)
#endif

// =====================================================================================
// Grouped GEMM: torch._grouped_mm's (S, K) x (G, K, N) form, the experts of MoE layers.
// Rows offs[g-1] .. offs[g] of A (offs[-1] = 0) times B[g], into the same rows of C.
// The offsets are read on the device, so the host never waits for the routing: grid.y
// covers cdiv(S, BM) + G row tiles, at least as many as any split of S rows into G
// groups has, and a CTA past the last tile returns at once. Each CTA runs the plain
// kernel on its group (same configuration, same K loop), so a row's bits are those of
// the plain kernel on the group's rows, which do not depend on how many rows that is.
// Offsets that are not nondecreasing within [0, S] are clamped into it (a group then
// takes no rows, or fewer), never read past A or C; rows past the last offset are not
// written (the launcher zeroes them).
// =====================================================================================
// Which tile of which group CTA row `t` computes: false when t is past the last one.
template <int BM>
__device__ __forceinline__ bool group_tile(const int* __restrict__ offs, int G, int S, int& t, int& g,
                                           int& start, int& rows) {
    int prev = 0;
    for (int i = 0; i < G; ++i) {
        const int end = min(max(offs[i], prev), S);
        const int tiles = (end - prev + BM - 1) / BM;
        if (t < tiles) {
            g = i;
            start = prev;
            rows = end - prev;
            return true;
        }
        t -= tiles;
        prev = end;
    }
    return false;
}

#define DETKIT_SIMT_GROUPED_ENTRY(NAME, T, KMAJOR, CFG)                                      \
    extern "C" __global__ void __launch_bounds__(CFG::NT)                                     \
    NAME(const T* A, const T* B, const int* offs, T* C, int S, int G, int N, int K,           \
         i64 sa_m, i64 sb_b, i64 sb_ld) {                                                     \
        int t = blockIdx.y, g, start, rows;                                                   \
        if (!group_tile<CFG::BM>(offs, G, S, t, g, start, rows)) return;                      \
        simt_mm<T, KMAJOR, CFG>(A + (i64)start * sa_m, B + (i64)g * sb_b, nullptr,            \
                                C + (i64)start * N, rows, N, K, 0, sa_m, 0, sb_ld, t, 0);     \
    }
#define DETKIT_TC_GROUPED_ENTRY(NAME, T, KMAJOR, CFG)                                        \
    extern "C" __global__ void __launch_bounds__(CFG::NT)                                     \
    NAME(const T* A, const T* B, const int* offs, T* C, int S, int G, int N, int K,           \
         i64 sa_m, i64 sb_b, i64 sb_ld, int vec) {                                            \
        int t = blockIdx.y, g, start, rows;                                                   \
        if (!group_tile<CFG::BM>(offs, G, S, t, g, start, rows)) return;                      \
        tc_mm<T, KMAJOR, CFG>(A + (i64)start * sa_m, B + (i64)g * sb_b, nullptr,              \
                              C + (i64)start * N, rows, N, K, 0, sa_m, 0, sb_ld, vec, t, 0);  \
    }
// <configuration's entry prefix>_grouped_<B layout>, for the configurations of
// detkit.kernels.cuda's tables only.
#ifndef DETKIT_TEMPLATES_ONLY
DETKIT_SIMT_ENTRIES(DETKIT_SIMT_GROUPED_ENTRY, 128x64x16_8x4, _grouped)
DETKIT_TC_ENTRIES(DETKIT_TC_GROUPED_ENTRY, 128x64x32_2x2_s3, _grouped)
#endif
