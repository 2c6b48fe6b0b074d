// detkit row kernels: softmax, log_softmax, rms_norm, layer_norm, row sum / mean and
// the running sum (cumsum) over the last dimension of a contiguous (R, L) tensor, plus
// the portable elementwise ops the torch mode uses and Pow (in binary64, section 2.9).
//
// Batch invariance: a row is reduced by one fixed group of threads in an order that
// depends only on L, never on R or on the row's index.
//   * portable=True  (``*_p_*``): one warp per row, exactly docs/canonical-orders.md
//     (AnchoredSum, IEEE maximum, Exp/Log from correctly rounded operations);
//   * portable=False (``*_b_*``): one block of RB_NT threads per row. The row is cut into
//     16-byte slots of V = 16 / sizeof(T) elements; thread t owns slots t, t + RB_NT, ...
//     and reduces their elements sequentially (slot by slot, in element order), then the
//     fixed block tree of common.cuh; CUDA's expf/logf (deterministic on one device and
//     toolkit). A slot is read with one 16-byte load when the row is 16-byte aligned and
//     element by element otherwise: the same values in the same order, so a row's bits
//     do not depend on its alignment (which changes with its index when L * sizeof(T) is
//     not a multiple of 16). The sums of softmax and row sum are anchored, like the CPU
//     kernels and the canonical AnchoredSum: slots are counted from the first nonzero
//     term (for softmax, the first element whose exp is nonzero), so masked or zero
//     entries in front of a row (left padding) do not change its bits.
// Every intermediate is float32 (but cumsum's float64 sums and Pow's binary64); the result
// is rounded once into T.

#define RB_NT 256  // threads per row, portable=False
#define RP_ROWS 4  // rows (warps) per block, portable=True

enum RowOp { OP_SOFTMAX = 0, OP_LOG_SOFTMAX = 1, OP_SUM = 2, OP_MEAN = 3 };

// ------------------------------------------------------------------ portable (one warp)

template <typename T>
__device__ __forceinline__ void p_softmax(const T* __restrict__ x, T* __restrict__ y, int R, int L, bool log_) {
    const int row = blockIdx.x * RP_ROWS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= R) return;  // whole warp leaves together
    const T* xr = x + (i64)row * L;
    T* yr = y + (i64)row * L;
    float m = __uint_as_float(0xFF800000u);
    for (int j = lane; j < L; j += 32) m = ieee_max(m, to_f32(xr[j]));
    m = warp_ieee_max(m);
    auto e = [&](int j) { return spec_exp(__fsub_rn(to_f32(xr[j]), m)); };
    const float S = anchored_sum_warp<false>(e, L);
    if (log_) {
        const float ls = spec_log(S);
        for (int j = lane; j < L; j += 32) yr[j] = from_f32<T>(__fsub_rn(__fsub_rn(to_f32(xr[j]), m), ls));
    } else {
        for (int j = lane; j < L; j += 32) yr[j] = from_f32<T>(__fdiv_rn(e(j), S));
    }
}

template <typename T>
__device__ __forceinline__ void p_rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                           int R, int L, float eps) {
    const int row = blockIdx.x * RP_ROWS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= R) return;
    const T* xr = x + (i64)row * L;
    T* yr = y + (i64)row * L;
    auto v = [&](int j) { return to_f32(xr[j]); };
    const float SS = anchored_sum_warp<true>(v, L);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(SS, (float)L), eps)));
    for (int j = lane; j < L; j += 32) {
        float t = __fmul_rn(to_f32(xr[j]), r);
        if (w != nullptr) t = __fmul_rn(t, to_f32(w[j]));
        yr[j] = from_f32<T>(t);
    }
}

template <typename T>
__device__ __forceinline__ void p_layer_norm(const T* __restrict__ x, const T* __restrict__ w,
                                             const T* __restrict__ b, T* __restrict__ y, int R, int L, float eps) {
    const int row = blockIdx.x * RP_ROWS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= R) return;
    const T* xr = x + (i64)row * L;
    T* yr = y + (i64)row * L;
    const float fl = (float)L;
    auto v = [&](int j) { return to_f32(xr[j]); };
    const float mu = __fdiv_rn(anchored_sum_warp<false>(v, L), fl);
    auto d = [&](int j) { return __fsub_rn(to_f32(xr[j]), mu); };
    const float var = __fdiv_rn(anchored_sum_warp<true>(d, L), fl);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
    for (int j = lane; j < L; j += 32) {
        float t = __fmul_rn(d(j), r);
        if (w != nullptr && b != nullptr) t = __fmaf_rn(t, to_f32(w[j]), to_f32(b[j]));
        else if (w != nullptr) t = __fmul_rn(t, to_f32(w[j]));
        else if (b != nullptr) t = __fadd_rn(t, to_f32(b[j]));
        yr[j] = from_f32<T>(t);
    }
}

template <typename T>
__device__ __forceinline__ void p_row_sum(const T* __restrict__ x, T* __restrict__ y, int R, int L, bool mean) {
    const int row = blockIdx.x * RP_ROWS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= R) return;
    const T* xr = x + (i64)row * L;
    auto v = [&](int j) { return to_f32(xr[j]); };
    float S = anchored_sum_warp<false>(v, L);
    if (mean) S = __fdiv_rn(S, (float)L);
    if (lane == 0) y[row] = from_f32<T>(S);
}

// ------------------------------------------------------------------ running sum (both guarantees)
// docs/canonical-orders.md, cumsum: one running sum per row, from +0.0, left to right, in
// float64 for float32 inputs and in float32 for bfloat16/float16 ones (torch's CPU
// kernel's order and accumulators), each output rounded once into T. The order is
// sequential, so one thread owns one row; a warp takes 32 rows and moves them through
// shared memory in 32 x 32 tiles, so that global loads and stores run along a row
// (coalesced) while each lane adds along its own row. The tile is padded to 33 columns:
// lane i reading column j of row i then hits bank (i + j) % 32, no conflicts.

#define CS_WARPS 4  // warps per block, 32 rows each

template <typename T> struct CumsumAcc { using type = float; };
template <> struct CumsumAcc<float> { using type = double; };
__device__ __forceinline__ float cumsum_add(float s, float v) { return __fadd_rn(s, v); }
__device__ __forceinline__ double cumsum_add(double s, float v) { return __dadd_rn(s, (double)v); }
__device__ __forceinline__ float cumsum_out(float s) { return s; }
__device__ __forceinline__ float cumsum_out(double s) { return __double2float_rn(s); }

template <typename T>
__device__ __forceinline__ void row_cumsum(const T* __restrict__ x, T* __restrict__ y, int R, int L) {
    __shared__ float tile[CS_WARPS][32][33];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * CS_WARPS + warp) * 32;
    if (r0 >= R) return;  // whole warp leaves together
    const int nr = min(32, R - r0);
    float(*t)[33] = tile[warp];
    typename CumsumAcc<T>::type s = 0;
    for (int c0 = 0; c0 < L; c0 += 32) {
        const int nc = min(32, L - c0);
        if (lane < nc)
            for (int i = 0; i < nr; ++i) t[i][lane] = to_f32(x[(i64)(r0 + i) * L + c0 + lane]);
        __syncwarp();
        if (lane < nr)
            for (int j = 0; j < nc; ++j) {
                s = cumsum_add(s, t[lane][j]);
                t[lane][j] = cumsum_out(s);
            }
        __syncwarp();
        if (lane < nc)
            for (int i = 0; i < nr; ++i) y[(i64)(r0 + i) * L + c0 + lane] = from_f32<T>(t[i][lane]);
        __syncwarp();  // the next tile overwrites t
    }
}

// ------------------------------------------------------------------ batch invariant (one block)

template <typename T> struct Slot { static constexpr int V = 16 / (int)sizeof(T); };
struct __align__(16) u32x4 { u32 w[4]; };

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15ull) == 0ull; }

__device__ __forceinline__ float slot_elem(const u32x4& r, int e, float*) { return __uint_as_float(r.w[e]); }
__device__ __forceinline__ float slot_elem(const u32x4& r, int e, bf16*) {
    bf16 h; h.bits = (u16)(r.w[e >> 1] >> (16 * (e & 1))); return to_f32(h);
}
__device__ __forceinline__ float slot_elem(const u32x4& r, int e, f16*) {
    f16 h; h.bits = (u16)(r.w[e >> 1] >> (16 * (e & 1))); return to_f32(h);
}
__device__ __forceinline__ u32 slot_bits(float x) { return __float_as_uint(from_f32<float>(x)); }
template <typename T> __device__ __forceinline__ u32 slot_bits16(float x) { return (u32)from_f32<T>(x).bits; }

// Elements j0 .. j0 + n - 1 (n <= V) of p as float32, into v[0 .. n-1].
template <typename T>
__device__ __forceinline__ void load_slot(const T* __restrict__ p, int j0, int n, bool vec, float (&v)[Slot<T>::V]) {
    constexpr int V = Slot<T>::V;
    if (vec && n == V) {
        const u32x4 r = *reinterpret_cast<const u32x4*>(p + j0);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = slot_elem(r, e, (T*)nullptr);
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = e < n ? to_f32(p[j0 + e]) : 0.0f;
    }
}

// Round v[0 .. n-1] into T and store them at p + j0.
template <typename T>
__device__ __forceinline__ void store_slot(T* __restrict__ p, int j0, int n, bool vec, const float (&v)[Slot<T>::V]) {
    constexpr int V = Slot<T>::V;
    if (vec && n == V) {
        u32x4 r;
        if constexpr (sizeof(T) == 4) {
#pragma unroll
            for (int e = 0; e < 4; ++e) r.w[e] = slot_bits(v[e]);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) r.w[e] = slot_bits16<T>(v[2 * e]) | (slot_bits16<T>(v[2 * e + 1]) << 16);
        }
        *reinterpret_cast<u32x4*>(p + j0) = r;
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
            if (e < n) p[j0 + e] = from_f32<T>(v[e]);
    }
}

// f(j0, n, v) for each slot this thread owns, in order, with its n values loaded into v.
template <typename T, typename F>
__device__ __forceinline__ void for_owned_slots(const T* __restrict__ xr, int L, bool vec, const F& f) {
    constexpr int V = Slot<T>::V;
    for (int j0 = threadIdx.x * V; j0 < L; j0 += RB_NT * V) {
        const int n = min(V, L - j0);
        float v[V];
        load_slot<T>(xr, j0, n, vec, v);
        f(j0, n, v);
    }
}

// The anchor of a row: the first index j whose value satisfies nonzero(x[j]), L if none.
// Each thread stops at the first hit among its own slots; the block takes the minimum.
template <typename T, typename P>
__device__ __forceinline__ int first_nonzero(const T* __restrict__ xr, int L, bool vec, const P& nonzero,
                                             int* scratch) {
    constexpr int V = Slot<T>::V;
    int first = L;
    for (int j0 = threadIdx.x * V; j0 < L && first == L; j0 += RB_NT * V) {
        const int n = min(V, L - j0);
        float v[V];
        load_slot<T>(xr, j0, n, vec, v);
#pragma unroll
        for (int e = 0; e < V; ++e)
            if (first == L && e < n && nonzero(v[e])) first = j0 + e;
    }
    return block_min<RB_NT>(first, scratch);
}

template <typename T>
__device__ __forceinline__ void b_softmax(const T* __restrict__ x, T* __restrict__ y, int L, bool log_) {
    constexpr int V = Slot<T>::V;
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * L;
    T* yr = y + (i64)blockIdx.x * L;
    const bool vx = aligned16(xr), vy = aligned16(yr);
    float m = __uint_as_float(0xFF800000u);
    for_owned_slots<T>(xr, L, vx, [&](int j0, int n, float (&v)[V]) {
#pragma unroll
        for (int e = 0; e < V; ++e)
            if (e < n) m = fmaxf(m, v[e]);
    });
    m = block_reduce<RB_NT, true>(m, scratch);
    // Entries before the anchor have exp == 0 (NaN counts as nonzero): skipping them changes
    // no term, and slots counted from the anchor make the sum padding invariant.
    __shared__ int iscratch[32];
    const int a = first_nonzero<T>(xr, L, vx, [&](float v) { return expf(__fsub_rn(v, m)) != 0.0f; }, iscratch);
    float s = 0.0f;
    for_owned_slots<T>(xr + a, L - a, aligned16(xr + a), [&](int j0, int n, float (&v)[V]) {
#pragma unroll
        for (int e = 0; e < V; ++e)
            if (e < n) s = __fadd_rn(s, expf(__fsub_rn(v[e], m)));
    });
    s = block_reduce<RB_NT, false>(s, scratch);
    if (log_) {
        const float ls = logf(s);
        for_owned_slots<T>(xr, L, vx, [&](int j0, int n, float (&v)[V]) {
#pragma unroll
            for (int e = 0; e < V; ++e) v[e] = __fsub_rn(__fsub_rn(v[e], m), ls);
            store_slot<T>(yr, j0, n, vy, v);
        });
    } else {
        const float inv = __fdiv_rn(1.0f, s);
        for_owned_slots<T>(xr, L, vx, [&](int j0, int n, float (&v)[V]) {
#pragma unroll
            for (int e = 0; e < V; ++e) v[e] = __fmul_rn(expf(__fsub_rn(v[e], m)), inv);
            store_slot<T>(yr, j0, n, vy, v);
        });
    }
}

template <typename T>
__device__ __forceinline__ void b_rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                           int L, float eps) {
    constexpr int V = Slot<T>::V;
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * L;
    T* yr = y + (i64)blockIdx.x * L;
    const bool vx = aligned16(xr), vy = aligned16(yr), vw = w != nullptr && aligned16(w);
    float ss = 0.0f;
    for_owned_slots<T>(xr, L, vx, [&](int j0, int n, float (&v)[V]) {
#pragma unroll
        for (int e = 0; e < V; ++e)
            if (e < n) ss = __fmaf_rn(v[e], v[e], ss);
    });
    ss = block_reduce<RB_NT, false>(ss, scratch);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)L), eps)));
    for_owned_slots<T>(xr, L, vx, [&](int j0, int n, float (&v)[V]) {
        float wv[V];
        if (w != nullptr) load_slot<T>(w, j0, n, vw, wv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            v[e] = __fmul_rn(v[e], r);
            if (w != nullptr) v[e] = __fmul_rn(v[e], wv[e]);
        }
        store_slot<T>(yr, j0, n, vy, v);
    });
}

template <typename T>
__device__ __forceinline__ void b_layer_norm(const T* __restrict__ x, const T* __restrict__ w,
                                             const T* __restrict__ b, T* __restrict__ y, int L, float eps) {
    constexpr int V = Slot<T>::V;
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * L;
    T* yr = y + (i64)blockIdx.x * L;
    const bool vx = aligned16(xr), vy = aligned16(yr);
    const bool vw = w != nullptr && aligned16(w), vb = b != nullptr && aligned16(b);
    const float fl = (float)L;
    float s = 0.0f;
    for_owned_slots<T>(xr, L, vx, [&](int j0, int n, float (&v)[V]) {
#pragma unroll
        for (int e = 0; e < V; ++e)
            if (e < n) s = __fadd_rn(s, v[e]);
    });
    const float mu = __fdiv_rn(block_reduce<RB_NT, false>(s, scratch), fl);
    float ss = 0.0f;
    for_owned_slots<T>(xr, L, vx, [&](int j0, int n, float (&v)[V]) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float d = __fsub_rn(v[e], mu);
            if (e < n) ss = __fmaf_rn(d, d, ss);
        }
    });
    const float var = __fdiv_rn(block_reduce<RB_NT, false>(ss, scratch), fl);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
    for_owned_slots<T>(xr, L, vx, [&](int j0, int n, float (&v)[V]) {
        float wv[V], bv[V];
        if (w != nullptr) load_slot<T>(w, j0, n, vw, wv);
        if (b != nullptr) load_slot<T>(b, j0, n, vb, bv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            v[e] = __fmul_rn(__fsub_rn(v[e], mu), r);
            if (w != nullptr) v[e] = __fmul_rn(v[e], wv[e]);
            if (b != nullptr) v[e] = __fadd_rn(v[e], bv[e]);
        }
        store_slot<T>(yr, j0, n, vy, v);
    });
}

template <typename T>
__device__ __forceinline__ void b_row_sum(const T* __restrict__ x, T* __restrict__ y, int L, bool mean) {
    constexpr int V = Slot<T>::V;
    __shared__ float scratch[32];
    __shared__ int iscratch[32];
    const T* xr = x + (i64)blockIdx.x * L;
    // Anchored at the first nonzero term (-0.0 is zero, NaN is not): zeros in front change nothing.
    const int a = first_nonzero<T>(xr, L, aligned16(xr), [](float v) { return v != 0.0f; }, iscratch);
    float s = 0.0f;
    for_owned_slots<T>(xr + a, L - a, aligned16(xr + a), [&](int j0, int n, float (&v)[V]) {
#pragma unroll
        for (int e = 0; e < V; ++e)
            if (e < n) s = __fadd_rn(s, v[e]);
    });
    s = block_reduce<RB_NT, false>(s, scratch);
    if (mean) s = __fdiv_rn(s, (float)L);
    if (threadIdx.x == 0) y[blockIdx.x] = from_f32<T>(s);
}

// ------------------------------------------------------------------ portable elementwise

enum EwOp {
    EW_EXP = 0, EW_LOG = 1, EW_RSQRT = 2, EW_SIGMOID = 3, EW_SILU = 4, EW_TANH = 5,
    EW_ERF = 6, EW_GELU = 7, EW_GELU_TANH = 8, EW_SIN = 9, EW_COS = 10, EW_CUBE = 11, EW_SOFTPLUS = 12,
    EW_LOG1P = 13
};

// tanh of the canonical orders: odd Taylor polynomial below 0.5, else 1 - 2/(Exp(2|x|)+1).
__device__ __forceinline__ float spec_tanh(float x) {
    if (x == 0.0f) return x;  // keeps -0 (the polynomial's fma gives +0)
    const float a = fabsf(x);
    if (a < 0.5f) {
        const float z = __fmul_rn(x, x);
        float q = __uint_as_float(0xB97ABEBCu);              // T19
        q = __fmaf_rn(q, z, __uint_as_float(0x3A1AAC12u));  // T17
        q = __fmaf_rn(q, z, __uint_as_float(0xBABED1B2u));  // T15
        q = __fmaf_rn(q, z, __uint_as_float(0x3B6B69E8u));  // T13
        q = __fmaf_rn(q, z, __uint_as_float(0xBC11371Bu));  // T11
        q = __fmaf_rn(q, z, __uint_as_float(0x3CB327A4u));  // T9
        q = __fmaf_rn(q, z, __uint_as_float(0xBD5D0DD1u));  // T7
        q = __fmaf_rn(q, z, __uint_as_float(0x3E088889u));  // T5
        q = __fmaf_rn(q, z, __uint_as_float(0xBEAAAAABu));  // T3
        return __fmaf_rn(x, __fmul_rn(q, z), x);
    }
    const float t = __fsub_rn(1.0f, __fdiv_rn(2.0f, __fadd_rn(spec_exp(__fadd_rn(a, a)), 1.0f)));
    return (x > 0.0f) ? t : -t;
}

// erf of the canonical orders (section 2.6): x + x*E(x^2) below 1, else 1 - Exp(G(|x|)),
// 1 from 3.875 on.
__device__ __forceinline__ float spec_erf(float x) {
    if (x != x) return x;
    const float a = fabsf(x);
    if (a < 1.0f) {
        const float z = __fmul_rn(x, x);
        float q = __uint_as_float(0x38A6609Fu);              // E6
        q = __fmaf_rn(q, z, __uint_as_float(0xBA52A0F1u));  // E5
        q = __fmaf_rn(q, z, __uint_as_float(0x3BAA1B19u));  // E4
        q = __fmaf_rn(q, z, __uint_as_float(0xBCDBFFDBu));  // E3
        q = __fmaf_rn(q, z, __uint_as_float(0x3DE716B2u));  // E2
        q = __fmaf_rn(q, z, __uint_as_float(0xBEC093A0u));  // E1
        q = __fmaf_rn(q, z, __uint_as_float(0x3E0375D4u));  // E0
        return __fmaf_rn(x, q, x);
    }
    float t = 1.0f;
    if (a < 3.875f) {
        float p = __uint_as_float(0x35DEE9FFu);              // G8
        p = __fmaf_rn(p, a, __uint_as_float(0xB842F401u));  // G7
        p = __fmaf_rn(p, a, __uint_as_float(0x3A1D487Au));  // G6
        p = __fmaf_rn(p, a, __uint_as_float(0xBB9C64EEu));  // G5
        p = __fmaf_rn(p, a, __uint_as_float(0x3CD8B5B6u));  // G4
        p = __fmaf_rn(p, a, __uint_as_float(0xBDE18BAAu));  // G3
        p = __fmaf_rn(p, a, __uint_as_float(0xBF21BC6Cu));  // G2
        p = __fmaf_rn(p, a, __uint_as_float(0xBF90AC34u));  // G1
        p = __fmaf_rn(p, a, __uint_as_float(0x39AA25A8u));  // G0
        t = __fsub_rn(1.0f, spec_exp(p));
    }
    return (x > 0.0f) ? t : -t;
}

// GELU as torch writes it: exact (x*0.5)*(1+Erf(x*SQRT1_2)); tanh (0.5*x)*(1+Tanh(BETA*(x+KAPPA*x^3))).
__device__ __forceinline__ float spec_gelu(float x) {
    const float e = spec_erf(__fmul_rn(x, __uint_as_float(0x3F3504F3u)));  // SQRT1_2
    return __fmul_rn(__fmul_rn(x, 0.5f), __fadd_rn(1.0f, e));
}

__device__ __forceinline__ float spec_gelu_tanh(float x) {
    const float x3 = __fmul_rn(__fmul_rn(x, x), x);
    const float inner = __fmul_rn(__uint_as_float(0x3F4C422Au),                          // BETA
                                  __fadd_rn(x, __fmul_rn(__uint_as_float(0x3D372713u), x3)));  // KAPPA
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, spec_tanh(inner)));
}

typedef unsigned long long u64;

// 2/pi to 224 fraction bits as 32-bit words, least significant first, zero padded so that
// a 96-bit window starting anywhere in it reads whole words (section 2.7).
__constant__ u64 kTwoOverPi[10] = {0xFE5163ABull, 0x3C439041ull, 0xDB629599ull, 0xF534DDC0ull, 0xFC2757D1ull,
                                   0x4E441529ull, 0xA2F9836Eull, 0ull, 0ull, 0ull};

// Sin or Cos of the canonical orders (section 2.7): exact reduction by 2/pi in 64-bit
// integer arithmetic (wraparound as the spec writes it), then polynomials in r^2.
__device__ __forceinline__ float spec_sin_cos(float x, bool want_cos) {
    const float a = fabsf(x);
    if (!(a < __uint_as_float(0x7F800000u))) return __uint_as_float(0x7FC00000u);  // inf or NaN
    if (a < __uint_as_float(0x39800000u)) return want_cos ? 1.0f : x;
    const u64 bits = __float_as_uint(a);
    const u64 m = (bits & 0x7FFFFFull) | 0x800000ull;
    const u64 t = 280ull - (bits >> 23);  // 224 - (e + 94), e = exponent - 150
    const u64 wq = t >> 5, wr = t & 31ull;
    const u64 w0 = (((kTwoOverPi[wq + 1] << 32) | kTwoOverPi[wq]) >> wr) & 0xFFFFFFFFull;
    const u64 w1 = (((kTwoOverPi[wq + 2] << 32) | kTwoOverPi[wq + 1]) >> wr) & 0xFFFFFFFFull;
    const u64 w2 = (((kTwoOverPi[wq + 3] << 32) | kTwoOverPi[wq + 2]) >> wr) & 0xFFFFFFFFull;
    const u64 v = ((m * w0) >> 32) + m * w1 + ((m * w2) << 32);  // a * 2/pi mod 4, 62 fraction bits
    const u64 k = (v + (1ull << 61)) >> 62;
    const long long f = (long long)(v - (k << 62));
    const float hi = __ll2float_rn(f);
    const float lo = __ll2float_rn(f - (long long)hi);
    const float pio2_hi = __uint_as_float(0x3FC90FDBu), pio2_lo = __uint_as_float(0xB33BBD2Eu);
    const float r = __fmul_rn(__fmaf_rn(hi, pio2_hi, __fmaf_rn(hi, pio2_lo, __fmul_rn(lo, pio2_hi))),
                              __uint_as_float(0x20800000u));  // 2^-62
    const float z = __fmul_rn(r, r);
    float sp = __fmaf_rn(__uint_as_float(0x3636DAFDu), z, __uint_as_float(0xB95009D8u));  // S4, S3
    sp = __fmaf_rn(sp, z, __uint_as_float(0x3C088887u));                                  // S2
    sp = __fmaf_rn(sp, z, __uint_as_float(0xBE2AAAABu));                                  // S1
    const float sn = __fmaf_rn(__fmul_rn(r, z), sp, r);
    float cp = __fmaf_rn(__uint_as_float(0x37CD3214u), z, __uint_as_float(0xBAB6070Au));  // C4, C3
    cp = __fmaf_rn(cp, z, __uint_as_float(0x3D2AAAA7u));                                  // C2
    cp = __fmaf_rn(cp, z, __uint_as_float(0xBF000000u));                                  // C1
    const float cs = __fmaf_rn(z, cp, 1.0f);
    const int q = (int)(k & 3ull);
    if (want_cos) return q == 0 ? cs : q == 1 ? -sn : q == 2 ? -cs : sn;
    const float y = q == 0 ? sn : q == 1 ? cs : q == 2 ? -sn : -cs;
    return x > 0.0f ? y : -y;
}

// log1p: u = 1 + x; x if u == 1 (tiny x, -0 kept), u if u is +inf (Log(u) * (x / (u - 1))
// would be inf * NaN), else Log(u) corrected for the rounding of 1 + x.
__device__ __forceinline__ float spec_log1p(float x) {
    const float u = __fadd_rn(1.0f, x);
    if (u == 1.0f) return x;
    if (u == __uint_as_float(0x7F800000u)) return u;
    return __fmul_rn(spec_log(u), __fdiv_rn(x, __fsub_rn(u, 1.0f)));
}

// softplus with torch's defaults (beta 1, threshold 20): x above 20, else log1p(Exp(x))
// (1 + Exp(x) is finite there).
__device__ __forceinline__ float spec_softplus(float x) {
    if (x > 20.0f) return x;
    return spec_log1p(spec_exp(x));
}

template <typename T>
__device__ __forceinline__ void p_elementwise(const T* __restrict__ x, T* __restrict__ y, i64 n, int op) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]);
        float r;
        switch (op) {
            case EW_EXP: r = spec_exp(v); break;
            case EW_LOG: r = spec_log(v); break;
            case EW_RSQRT: r = __fdiv_rn(1.0f, __fsqrt_rn(v)); break;
            case EW_SIGMOID: r = __fdiv_rn(1.0f, __fadd_rn(1.0f, spec_exp(-v))); break;
            case EW_SILU: r = __fdiv_rn(v, __fadd_rn(1.0f, spec_exp(-v))); break;
            case EW_TANH: r = spec_tanh(v); break;
            case EW_ERF: r = spec_erf(v); break;
            case EW_GELU: r = spec_gelu(v); break;
            case EW_GELU_TANH: r = spec_gelu_tanh(v); break;
            case EW_SIN: r = spec_sin_cos(v, false); break;
            case EW_COS: r = spec_sin_cos(v, true); break;
            case EW_CUBE: r = __fmul_rn(__fmul_rn(v, v), v); break;  // pow(x, 3)
            case EW_SOFTPLUS: r = spec_softplus(v); break;
            default: r = spec_log1p(v); break;
        }
        y[i] = from_f32<T>(r);
    }
}

// ------------------------------------------------------------------ pow (section 2.9)
// Pow(x, y) of the canonical orders: x fp32, y binary64 (an fp32 exponent widened exactly,
// or the caller's scalar), evaluated in binary64 with correctly rounded add/sub/mul/div
// (the _rn intrinsics: never contracted into an fma), rint, and exact bit-level splitting
// and scaling by powers of two; rounded once to fp32. Special cases are C99's pow.

__device__ __forceinline__ double pow_f64(unsigned long long bits) { return __longlong_as_double((long long)bits); }

// y an odd integer: |y| < 2^53 (past it every double is even), integral, y/2 not integral.
__device__ __forceinline__ bool pow_odd(double y) {
    const double h = __dmul_rn(y, 0.5);
    return fabs(y) < 9007199254740992.0 && rint(y) == y && rint(h) != h;
}

__device__ __forceinline__ float spec_pow(float x, double y) {
    const double X = (double)x;  // exact
    if (y == 0.0 || X == 1.0) return 1.0f;  // NaN included
    if (X != X || y != y) return __uint_as_float(0x7FC00000u);
    if (y == 2.0) return __double2float_rn(__dmul_rn(X, X));  // exact product: fp32's x * x
    const double inf = pow_f64(0x7FF0000000000000ull);
    const double A = fabs(X);
    if (y == inf || y == -inf) {
        if (X == -1.0) return 1.0f;
        return ((A < 1.0) == (y < 0.0)) ? __uint_as_float(0x7F800000u) : 0.0f;
    }
    const bool odd = pow_odd(y);
    if (X == 0.0 || A == inf) {
        const float mag = ((X == 0.0) == (y < 0.0)) ? __uint_as_float(0x7F800000u) : 0.0f;
        return (odd && (__float_as_uint(x) >> 31)) ? -mag : mag;  // copysign(mag, x) for odd y: -0 counts
    }
    if (X < 0.0 && rint(y) != y) return __uint_as_float(0x7FC00000u);
    // |x| = m * 2^e, m in [1, 2): fp32 subnormals are normal in binary64, so the fields split it.
    const unsigned long long b = (unsigned long long)__double_as_longlong(A);
    int e = (int)((b >> 52) & 0x7FFull) - 1023;
    double m = pow_f64((b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
    if (m > pow_f64(0x3FF6A09E667F3BCDull)) {  // SQRT2_D
        m = __dmul_rn(m, 0.5);
        e += 1;
    }
    const double f = __dsub_rn(m, 1.0);                 // exact
    const double s = __ddiv_rn(f, __dadd_rn(2.0, f));   // 2 + f exact
    const double z = __dmul_rn(s, s);
    double q = pow_f64(0x3FA8618618618618ull);                       // L10 = 1/21
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FAAF286BCA1AF28ull));  // L9
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FAE1E1E1E1E1E1Eull));  // L8
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FB1111111111111ull));  // L7
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FB3B13B13B13B14ull));  // L6
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FB745D1745D1746ull));  // L5
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FBC71C71C71C71Cull));  // L4
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FC2492492492492ull));  // L3
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FC999999999999Aull));  // L2
    q = __dadd_rn(__dmul_rn(q, z), pow_f64(0x3FD5555555555555ull));  // L1 = 1/3
    const double s2 = __dadd_rn(s, s);
    const double lm = __dadd_rn(s2, __dmul_rn(s2, __dmul_rn(z, q)));  // log(m) = 2 atanh(s)
    double t = __dmul_rn(y, __dadd_rn(__dmul_rn((double)e, pow_f64(0x3FE62E42FEFA39EFull)), lm));  // LN2_D
    t = t < -200.0 ? -200.0 : (t > 200.0 ? 200.0 : t);  // past +-200 the fp32 result is 0 or inf
    const double k = rint(__dmul_rn(t, pow_f64(0x3FF71547652B82FEull)));  // INV_LN2; |k| <= 289
    const double r = __dsub_rn(__dsub_rn(t, __dmul_rn(k, pow_f64(0x3FE62E42FEE00000ull))),  // LN2_HI
                               __dmul_rn(k, pow_f64(0x3DEA39EF35793C76ull)));              // LN2_LO
    double p = pow_f64(0x3DE6124613A86D09ull);                       // E13 = 1/13!
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3E21EED8EFF8D898ull));  // E12
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3E5AE64567F544E4ull));  // E11
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3E927E4FB7789F5Cull));  // E10
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3EC71DE3A556C734ull));  // E9
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3EFA01A01A01A01Aull));  // E8
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3F2A01A01A01A01Aull));  // E7
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3F56C16C16C16C17ull));  // E6
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3F81111111111111ull));  // E5
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3FA5555555555555ull));  // E4
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3FC5555555555555ull));  // E3
    p = __dadd_rn(__dmul_rn(p, r), pow_f64(0x3FE0000000000000ull));  // E2 = 1/2
    p = __dadd_rn(__dmul_rn(p, r), 1.0);
    p = __dadd_rn(__dmul_rn(p, r), 1.0);
    // 2^k is a normal binary64 (|k| <= 289), so the product is exact: p scaled, not rounded.
    const double w = __dmul_rn(p, pow_f64((unsigned long long)((long long)k + 1023) << 52));
    const float res = __double2float_rn(w);
    return (X < 0.0 && odd) ? -res : res;
}

// out[i] = Pow(x[i], y[i]), or Pow(x[i], y_scalar) for every i when y_is_scalar (y unused).
template <typename T>
__device__ __forceinline__ void p_pow(const T* __restrict__ x, const T* __restrict__ y, double y_scalar,
                                      bool y_is_scalar, T* __restrict__ out, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const double yv = y_is_scalar ? y_scalar : (double)to_f32(y[i]);  // exact widening
        out[i] = from_f32<T>(spec_pow(to_f32(x[i]), yv));
    }
}

// ------------------------------------------------------------------ entry points

#define DETKIT_ROW_ENTRIES(SUF, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * RP_ROWS)                                     \
    softmax_p_##SUF(const T* x, T* y, int R, int L, int log_) { p_softmax<T>(x, y, R, L, log_ != 0); } \
    extern "C" __global__ void __launch_bounds__(32 * RP_ROWS)                                     \
    rms_norm_p_##SUF(const T* x, const T* w, T* y, int R, int L, float eps) {                      \
        p_rms_norm<T>(x, w, y, R, L, eps);                                                         \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * RP_ROWS)                                     \
    layer_norm_p_##SUF(const T* x, const T* w, const T* b, T* y, int R, int L, float eps) {        \
        p_layer_norm<T>(x, w, b, y, R, L, eps);                                                    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * RP_ROWS)                                     \
    row_sum_p_##SUF(const T* x, T* y, int R, int L, int mean) { p_row_sum<T>(x, y, R, L, mean != 0); } \
    extern "C" __global__ void __launch_bounds__(RB_NT)                                            \
    softmax_b_##SUF(const T* x, T* y, int L, int log_) { b_softmax<T>(x, y, L, log_ != 0); }      \
    extern "C" __global__ void __launch_bounds__(RB_NT)                                            \
    rms_norm_b_##SUF(const T* x, const T* w, T* y, int L, float eps) { b_rms_norm<T>(x, w, y, L, eps); } \
    extern "C" __global__ void __launch_bounds__(RB_NT)                                            \
    layer_norm_b_##SUF(const T* x, const T* w, const T* b, T* y, int L, float eps) {               \
        b_layer_norm<T>(x, w, b, y, L, eps);                                                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(RB_NT)                                            \
    row_sum_b_##SUF(const T* x, T* y, int L, int mean) { b_row_sum<T>(x, y, L, mean != 0); }      \
    extern "C" __global__ void __launch_bounds__(32 * CS_WARPS)                                    \
    row_cumsum_##SUF(const T* x, T* y, int R, int L) { row_cumsum<T>(x, y, R, L); }               \
    extern "C" __global__ void elementwise_p_##SUF(const T* x, T* y, i64 n, int op) {             \
        p_elementwise<T>(x, y, n, op);                                                             \
    }                                                                                              \
    extern "C" __global__ void pow_p_##SUF(const T* x, const T* y, double y_scalar, int y_is_scalar, \
                                           T* out, i64 n) {                                        \
        p_pow<T>(x, y, y_scalar, y_is_scalar != 0, out, n);                                        \
    }

DETKIT_ROW_ENTRIES(f32, float)
DETKIT_ROW_ENTRIES(bf16, bf16)
DETKIT_ROW_ENTRIES(f16, f16)
