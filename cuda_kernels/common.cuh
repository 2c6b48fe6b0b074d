// Shared helpers for every detkit CUDA kernel. Prepended by the loader (with a #line
// directive) to each .cu file, so this file is compiled into every module.
//
// Deliberately free of CUDA headers (cuda_fp16.h / cuda_bf16.h): 16-bit floats travel as
// raw 16-bit patterns and are converted with exact bit manipulation or single PTX
// instructions, so the same source compiles with any NVRTC or nvcc without include
// paths. Every floating-point contraction is explicit (the loader compiles with
// -fmad=false): numerics follow the source text, not the optimizer.

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

// ---- exact widening to float32 -------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((u32)x.bits) << 16); }
#ifndef DETKIT_HOST_EMU  // tests/cuda_emu/emu.h supplies these on the host
// The launch's dynamic shared memory (its size is a launch argument).
#define DETKIT_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
__device__ __forceinline__ float f16_bits_to_f32(u16 b) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(b));
    return r;
}
__device__ __forceinline__ u16 f32_to_f16_bits(float x) {  // IEEE round to nearest even
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
#endif
__device__ __forceinline__ float to_f32(f16 x) { return f16_bits_to_f32(x.bits); }

// ---- one rounding from float32 to the storage type ---------------------------------
// Output step of docs/canonical-orders.md: NaN becomes the canonical quiet NaN
// (0x7FC00000; bf16 0x7FC0; fp16 0x7E00), then one round-to-nearest-even into T. The
// bf16 rounding is the exact integer trick c10::BFloat16 uses on the CPU.
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) {
    return (x != x) ? __uint_as_float(0x7FC00000u) : x;
}
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    bf16 r;
    if (x != x) { r.bits = 0x7FC0u; return r; }
    u32 u = __float_as_uint(x);
    u32 bias = ((u >> 16) & 1u) + 0x7FFFu;
    r.bits = (u16)((u + bias) >> 16);
    return r;
}
// float16: IEEE round to nearest even (PTX cvt.rn handles subnormals and overflow).
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 r;
    r.bits = (x != x) ? (u16)0x7E00u : f32_to_f16_bits(x);
    return r;
}

template <typename T> __device__ __forceinline__ float load_f32(const T* p, i64 i) { return to_f32(p[i]); }

// ---- fixed-shape warp and block reductions ------------------------------------------
// The xor butterfly leaves the same value in every lane (IEEE add and max are
// commutative, so the partner pairs compute identical sums), and its shape depends only
// on the warp size, never on the data or the number of rows.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction for blockDim.x == NT (a multiple of 32, at most 1024): lanes,
// then warps, both by the fixed butterfly. `scratch` holds 32 floats. Every thread
// receives the result.
template <int NT, bool IS_MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const float neutral = IS_MAX ? __int_as_float(0xff800000) : 0.0f;
    float w = (lane < NT / 32) ? scratch[lane] : neutral;
    return IS_MAX ? warp_max(w) : warp_sum(w);
}

// Block-wide minimum of an int (exact: any order), for blockDim.x == NT; `scratch` holds
// 32 ints. Every thread receives the result.
template <int NT>
__device__ __forceinline__ int block_min(int v, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int w = (lane < NT / 32) ? scratch[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w = min(w, __shfl_xor_sync(0xffffffffu, w, o));
    return w;
}

// =====================================================================================
// Building blocks of docs/canonical-orders.md (section 2), each operation correctly
// rounded and written out; the spec's oracle is detkit/kernels/spec.py.
// =====================================================================================
#define DETKIT_FULL 0xffffffffu

// IEEE 754-2019 maximum: NaN-propagating, -0 < +0. Exact, so any evaluation order.
__device__ __forceinline__ float ieee_max(float a, float b) {
    if (a != a) return a;
    if (b != b) return b;
    if (a > b) return a;
    if (b > a) return b;
    return __int_as_float(__float_as_int(a) & __float_as_int(b));  // +0 wins over -0
}
__device__ __forceinline__ float warp_ieee_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = ieee_max(v, __shfl_xor_sync(DETKIT_FULL, v, o));
    return v;
}

// Exact 2^n for -126 <= n <= 127.
__device__ __forceinline__ float pow2i(int n) { return __int_as_float((n + 127) << 23); }

// Exp (section 2.4).
__device__ __forceinline__ float spec_exp(float x) {
    if (x != x) return x;
    x = fmaxf(x, -104.0f);
    x = fminf(x, 89.0f);
    const float n = rintf(__fmul_rn(x, __uint_as_float(0x3FB8AA3Bu)));
    float r = __fmaf_rn(-n, __uint_as_float(0x3F317200u), x);
    r = __fmaf_rn(-n, __uint_as_float(0x35BFBE8Eu), r);
    float q = __uint_as_float(0x39500D01u);                 // C7
    q = __fmaf_rn(q, r, __uint_as_float(0x3AB60B61u));      // C6
    q = __fmaf_rn(q, r, __uint_as_float(0x3C088889u));      // C5
    q = __fmaf_rn(q, r, __uint_as_float(0x3D2AAAABu));      // C4
    q = __fmaf_rn(q, r, __uint_as_float(0x3E2AAAABu));      // C3
    q = __fmaf_rn(q, r, __uint_as_float(0x3F000000u));      // C2
    q = __fmaf_rn(q, r, 1.0f);
    const float p = __fmaf_rn(q, r, 1.0f);
    const int ni = (int)n;                                   // exact, in [-150, 128]
    const int n1 = (ni >= 0) ? ni / 2 : -((1 - ni) / 2);     // floor(ni / 2)
    const int n2 = ni - n1;
    return __fmul_rn(__fmul_rn(p, pow2i(n1)), pow2i(n2));
}

// Log (section 2.5).
__device__ __forceinline__ float spec_log(float x) {
    if (x != x) return x;
    if (x < 0.0f) return __uint_as_float(0x7FC00000u);
    if (x == 0.0f) return __uint_as_float(0xFF800000u);
    if (x == __uint_as_float(0x7F800000u)) return x;
    int k = 0;
    if (x < __uint_as_float(0x00800000u)) {                 // subnormal: scale by 2^23 (exact)
        x = __fmul_rn(x, 8388608.0f);
        k = -23;
    }
    const u32 b = __float_as_uint(x);
    int e = (int)((b >> 23) & 0xFFu) - 127;
    float m = __uint_as_float((b & 0x007FFFFFu) | 0x3F800000u);
    if (m > __uint_as_float(0x3FB504F3u)) {
        m = __fmul_rn(m, 0.5f);
        e += 1;
    }
    const float f = __fsub_rn(m, 1.0f);
    const float s = __fdiv_rn(f, __fadd_rn(2.0f, f));
    const float z = __fmul_rn(s, s);
    float t = __fmaf_rn(__uint_as_float(0x3E638E39u), z, __uint_as_float(0x3E924925u));
    t = __fmaf_rn(t, z, __uint_as_float(0x3ECCCCCDu));
    t = __fmaf_rn(t, z, __uint_as_float(0x3F2AAAABu));
    const float R = __fmul_rn(t, z);
    const float hfsq = __fmul_rn(__fmul_rn(0.5f, f), f);
    const float dk = (float)(e + k);
    const float u = __fmaf_rn(s, __fadd_rn(hfsq, R), __fmul_rn(dk, __uint_as_float(0x35BFBE8Eu)));
    return __fadd_rn(__fadd_rn(__fsub_rn(u, hfsq), f), __fmul_rn(dk, __uint_as_float(0x3F317200u)));
}

// AnchoredSum / AnchoredSumSq (section 2.2) by one warp: lane l accumulates the terms
// j0 + l, j0 + l + 32, ... in order, then the fixed tree lane[l] += lane[l + h] for
// h = 16 .. 1 (the xor butterfly computes exactly that in lanes l < h). `val(j)` returns
// the fp32 term j; every lane receives lane 0's result.
template <bool SQUARE, typename F>
__device__ __forceinline__ float anchored_sum_warp(const F& val, int L) {
    const int lane = threadIdx.x & 31;
    int j0 = -1;
    for (int c = 0; c < L; c += 32) {
        const int j = c + lane;
        const float v = (j < L) ? val(j) : 0.0f;
        const u32 nz = __ballot_sync(DETKIT_FULL, v != 0.0f);  // NaN counts, -0 does not
        if (nz != 0u) {
            j0 = c + __ffs(nz) - 1;
            break;
        }
    }
    if (j0 < 0) return 0.0f;
    float acc = 0.0f;
    for (int j = j0 + lane; j < L; j += 32) {
        const float v = val(j);
        acc = SQUARE ? __fmaf_rn(v, v, acc) : __fadd_rn(acc, v);
    }
#pragma unroll
    for (int h = 16; h > 0; h >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(DETKIT_FULL, acc, h));
    return __shfl_sync(DETKIT_FULL, acc, 0);
}

// ---- tensor-core building blocks (matmul.cu, attention.cu) -----------------------------
// cp.async, ldmatrix and mma.sync.m16n8k16 with float32 accumulation.
#ifndef DETKIT_HOST_EMU  // tests/cuda_emu/emu.h supplies these on the host
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    // src-size 0 zero-fills the 16 bytes without reading global memory.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#else
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma<true>(c, a, b0, b1); }
__device__ __forceinline__ void mma_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma<false>(c, a, b0, b1); }
#endif

template <typename T> struct Mma;
template <> struct Mma<bf16> {
    static __device__ __forceinline__ void run(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma_bf16(c, a, b0, b1); }
};
template <> struct Mma<f16> {
    static __device__ __forceinline__ void run(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma_f16(c, a, b0, b1); }
};
