// detkit row kernels: softmax, log_softmax, rms_norm, layer_norm, row sum / mean over
// the last dimension of a contiguous (R, L) tensor, plus the portable elementwise ops
// the torch mode uses.
//
// Batch invariance: a row is reduced by one fixed group of threads in an order that
// depends only on L, never on R or on the row's index.
//   * portable=True  (``*_p_*``): one warp per row, exactly docs/canonical-orders.md
//     (AnchoredSum, IEEE maximum, Exp/Log from correctly rounded operations);
//   * portable=False (``*_b_*``): one block of RB_NT threads per row; thread t reduces
//     elements t, t + RB_NT, ... sequentially, then the fixed block tree of common.cuh;
//     CUDA's expf/logf (deterministic on one device and toolkit).
// Every intermediate is float32; the result is rounded once into T.

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

// ------------------------------------------------------------------ batch invariant (one block)

template <typename T>
__device__ __forceinline__ void b_softmax(const T* __restrict__ x, T* __restrict__ y, int L, bool log_) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * L;
    T* yr = y + (i64)blockIdx.x * L;
    float m = __uint_as_float(0xFF800000u);
    for (int j = threadIdx.x; j < L; j += RB_NT) m = fmaxf(m, to_f32(xr[j]));
    m = block_reduce<RB_NT, true>(m, scratch);
    float s = 0.0f;
    for (int j = threadIdx.x; j < L; j += RB_NT) s = __fadd_rn(s, expf(__fsub_rn(to_f32(xr[j]), m)));
    s = block_reduce<RB_NT, false>(s, scratch);
    if (log_) {
        const float ls = logf(s);
        for (int j = threadIdx.x; j < L; j += RB_NT) yr[j] = from_f32<T>(__fsub_rn(__fsub_rn(to_f32(xr[j]), m), ls));
    } else {
        const float inv = __fdiv_rn(1.0f, s);
        for (int j = threadIdx.x; j < L; j += RB_NT)
            yr[j] = from_f32<T>(__fmul_rn(expf(__fsub_rn(to_f32(xr[j]), m)), inv));
    }
}

template <typename T>
__device__ __forceinline__ void b_rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                           int L, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * L;
    T* yr = y + (i64)blockIdx.x * L;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < L; j += RB_NT) {
        const float v = to_f32(xr[j]);
        ss = __fmaf_rn(v, v, ss);
    }
    ss = block_reduce<RB_NT, false>(ss, scratch);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)L), eps)));
    for (int j = threadIdx.x; j < L; j += RB_NT) {
        float t = __fmul_rn(to_f32(xr[j]), r);
        if (w != nullptr) t = __fmul_rn(t, to_f32(w[j]));
        yr[j] = from_f32<T>(t);
    }
}

template <typename T>
__device__ __forceinline__ void b_layer_norm(const T* __restrict__ x, const T* __restrict__ w,
                                             const T* __restrict__ b, T* __restrict__ y, int L, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * L;
    T* yr = y + (i64)blockIdx.x * L;
    const float fl = (float)L;
    float s = 0.0f;
    for (int j = threadIdx.x; j < L; j += RB_NT) s = __fadd_rn(s, to_f32(xr[j]));
    const float mu = __fdiv_rn(block_reduce<RB_NT, false>(s, scratch), fl);
    float ss = 0.0f;
    for (int j = threadIdx.x; j < L; j += RB_NT) {
        const float d = __fsub_rn(to_f32(xr[j]), mu);
        ss = __fmaf_rn(d, d, ss);
    }
    const float var = __fdiv_rn(block_reduce<RB_NT, false>(ss, scratch), fl);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
    for (int j = threadIdx.x; j < L; j += RB_NT) {
        float t = __fmul_rn(__fsub_rn(to_f32(xr[j]), mu), r);
        if (w != nullptr) t = __fmul_rn(t, to_f32(w[j]));
        if (b != nullptr) t = __fadd_rn(t, to_f32(b[j]));
        yr[j] = from_f32<T>(t);
    }
}

template <typename T>
__device__ __forceinline__ void b_row_sum(const T* __restrict__ x, T* __restrict__ y, int L, bool mean) {
    __shared__ float scratch[32];
    const T* xr = x + (i64)blockIdx.x * L;
    float s = 0.0f;
    for (int j = threadIdx.x; j < L; j += RB_NT) s = __fadd_rn(s, to_f32(xr[j]));
    s = block_reduce<RB_NT, false>(s, scratch);
    if (mean) s = __fdiv_rn(s, (float)L);
    if (threadIdx.x == 0) y[blockIdx.x] = from_f32<T>(s);
}

// ------------------------------------------------------------------ portable elementwise

enum EwOp { EW_EXP = 0, EW_LOG = 1, EW_RSQRT = 2, EW_SIGMOID = 3, EW_SILU = 4, EW_TANH = 5 };

// tanh of the canonical orders: odd Taylor polynomial below 0.5, else 1 - 2/(Exp(2|x|)+1).
__device__ __forceinline__ float spec_tanh(float x) {
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
            default: r = spec_tanh(v); break;
        }
        y[i] = from_f32<T>(r);
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
    extern "C" __global__ void elementwise_p_##SUF(const T* x, T* y, i64 n, int op) {             \
        p_elementwise<T>(x, y, n, op);                                                             \
    }

DETKIT_ROW_ENTRIES(f32, float)
DETKIT_ROW_ENTRIES(bf16, bf16)
DETKIT_ROW_ENTRIES(f16, f16)
