// detkit attention: two kernel families.
//
// attention_<T> (portable=True, and portable=False with a float mask): scaled-dot-product
// attention in the canonical order of docs/canonical-orders.md ("attention"), one warp
// per query (b, h, i). A key is skipped (takes part in no operation at all) when the
// bool mask is False or its score is -inf after the float mask. The kept keys are
// visited in increasing order: the maximum is exact (order free), the normaliser l and
// the outputs o[d] are plain sequential sums over kept keys. Hence padding keys, the KV
// length beyond the last kept key, the batch, and decode (one query) vs prefill (causal
// mask) cannot change a query's bits. Lane j of the warp scores key c + j of a 32-key
// chunk (sequential fma over d, the chunk's rows staged through shared memory); the
// chunk's kept keys are then consumed in order by all lanes, each lane owning the output
// dimensions d = lane, lane + 32, ...
//
// attention_split_<T> + attention_combine_<T> (portable=False, no mask or a bool mask):
// split KV. A query's keys are cut into splits of ATS_SPLIT consecutive key indices
// anchored at its first unmasked key (attention_anchor), one warp per (query, split);
// each split yields (m, l, o[]) by an online softmax over its kept keys in order, and the
// combine merges the splits in order. Every boundary is fixed by the anchor and
// ATS_SPLIT, so batch, left/right padding and decode vs prefill leave a query's bits
// unchanged, as in the canonical kernel, while decode gets Lk / ATS_SPLIT warps per head.

#define ATT_WARPS 4
#define ATT_DMAX 256
#define ATT_VPL (ATT_DMAX / 32)  // output dims per lane
#define ATT_DB 64                // key dims staged in shared memory at a time

enum MaskKind { MASK_NONE = 0, MASK_BOOL = 1, MASK_FLOAT = 2 };

// A flat query index of the (B, H, Lq) grid: its batch, head, position, and the offset of
// its row in a (B, H, Lq, Lk) mask with element strides ms0, ms1, ms2.
struct QueryPos {
    int b, h, i;
    __device__ __forceinline__ QueryPos(i64 query, int H, int Lq)
        : b((int)(query / ((i64)Lq * H))), h((int)((query / Lq) % H)), i((int)(query % Lq)) {}
    __device__ __forceinline__ i64 mask_row(i64 ms0, i64 ms1, i64 ms2) const {
        return (i64)b * ms0 + (i64)h * ms1 + (i64)i * ms2;
    }
};

// out[d] = o[t] / l for the output dims d = lane + 32 t this lane owns, one rounding into T.
template <typename T>
__device__ __forceinline__ void store_normalised(T* __restrict__ orow, const float (&o)[ATT_VPL], float l, int Dv) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < ATT_VPL; ++t) {
        const int d = lane + 32 * t;
        if (d < Dv) orow[d] = from_f32<T>(__fdiv_rn(o[t], l));
    }
}

template <typename T>
__device__ __forceinline__ void attention_impl(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, const void* __restrict__ mask,
                                               int mask_kind, i64 ms0, i64 ms1, i64 ms2, i64 ms3,
                                               T* __restrict__ out, int B, int H, int Hk, int Lq, int Lk,
                                               int D, int Dv, float scale) {
    __shared__ float sq[ATT_WARPS][ATT_DMAX];
    __shared__ float sk[ATT_WARPS][32][ATT_DB + 1];  // +1: lane j reads row j without bank conflicts
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 query = (i64)blockIdx.x * ATT_WARPS + warp;  // flat (b, h, i)
    if (query >= (i64)B * H * Lq) return;                  // the whole warp leaves together
    const QueryPos pos(query, H, Lq);
    const int g = pos.h / (H / Hk);

    const T* qr = q + query * D;
    const T* kb = k + ((i64)pos.b * Hk + g) * (i64)Lk * D;
    const T* vb = v + ((i64)pos.b * Hk + g) * (i64)Lk * Dv;
    const unsigned char* mb = (const unsigned char*)mask;
    const float* mf = (const float*)mask;
    const i64 mrow = pos.mask_row(ms0, ms1, ms2);

    for (int d = lane; d < D; d += 32) sq[warp][d] = to_f32(qr[d]);
    __syncwarp();

    // Score of key c + lane (every lane computes its own key; all lanes call this
    // together), or kept = false when skipped. The arithmetic is the canonical one chain
    // of fma over d = 0 .. D-1 per key; the keys' rows are staged through shared memory
    // ATT_DB dims at a time so that global reads are coalesced (lanes read along d), and
    // rows of masked keys are not read at all. Computed twice per key (max pass, sum
    // pass) with the same operations, hence the same bits.
    auto score = [&](int c, bool& kept) -> float {
        const int j = c + lane;
        const bool live = j < Lk && !(mask_kind == MASK_BOOL && mb[mrow + (i64)j * ms3] == 0);
        const u32 rows = __ballot_sync(DETKIT_FULL, live);
        float s = 0.0f;
        if (rows != 0u) {
            for (int d0 = 0; d0 < D; d0 += ATT_DB) {
                const int nd = min(ATT_DB, D - d0);
                __syncwarp();  // the previous block's readers are done with sk
                for (u32 left = rows; left != 0u; left &= left - 1u) {
                    const int r = __ffs(left) - 1;
                    const T* kr = kb + (i64)(c + r) * D + d0;
                    for (int dd = lane; dd < nd; dd += 32) sk[warp][r][dd] = to_f32(kr[dd]);
                }
                __syncwarp();
                if (live)
                    for (int dd = 0; dd < nd; ++dd) s = __fmaf_rn(sq[warp][d0 + dd], sk[warp][lane][dd], s);
            }
        }
        kept = false;
        if (!live) return 0.0f;
        s = __fmul_rn(s, scale);
        if (mask_kind == MASK_FLOAT) s = __fadd_rn(s, mf[mrow + (i64)j * ms3]);
        kept = (s != __uint_as_float(0xFF800000u));
        return s;
    };

    // Pass 1: maximum over kept keys (IEEE maximum: exact, order free).
    float m = __uint_as_float(0xFF800000u);
    bool any = false;
    for (int c = 0; c < Lk; c += 32) {
        bool kept;
        const float s = score(c, kept);
        if (kept) m = ieee_max(m, s);
        any |= kept;
    }
    m = warp_ieee_max(m);
    T* orow = out + query * Dv;
    if (!__any_sync(DETKIT_FULL, any)) {  // no kept key: zeros, like torch's SDPA math path
        for (int d = lane; d < Dv; d += 32) orow[d] = from_f32<T>(0.0f);
        return;
    }

    // Pass 2: p_j = Exp(s_j - M); l and o[d] sequential over kept keys in order.
    float l = 0.0f;
    float o[ATT_VPL];
#pragma unroll
    for (int t = 0; t < ATT_VPL; ++t) o[t] = 0.0f;
    for (int c = 0; c < Lk; c += 32) {
        bool kept;
        const float s = score(c, kept);
        const float p = kept ? spec_exp(__fsub_rn(s, m)) : 0.0f;
        u32 keep = __ballot_sync(DETKIT_FULL, kept);
        while (keep != 0u) {
            const int jj = __ffs(keep) - 1;  // lowest remaining = next key in order
            keep &= keep - 1u;
            const float pj = __shfl_sync(DETKIT_FULL, p, jj);
            l = __fadd_rn(l, pj);
            const T* vr = vb + (i64)(c + jj) * Dv;
#pragma unroll
            for (int t = 0; t < ATT_VPL; ++t) {
                const int d = lane + 32 * t;
                if (d < Dv) o[t] = __fmaf_rn(pj, to_f32(vr[d]), o[t]);
            }
        }
    }
    store_normalised<T>(orow, o, l, Dv);
}

#define DETKIT_ATT_ENTRY(SUF, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)                                     \
    attention_##SUF(const T* q, const T* k, const T* v, const void* mask, int mask_kind, i64 ms0,     \
                    i64 ms1, i64 ms2, i64 ms3, T* out, int B, int H, int Hk, int Lq, int Lk, int D,   \
                    int Dv, float scale) {                                                           \
        attention_impl<T>(q, k, v, mask, mask_kind, ms0, ms1, ms2, ms3, out, B, H, Hk, Lq, Lk, D, Dv, \
                          scale);                                                                    \
    }
DETKIT_ATT_ENTRY(f32, float)
DETKIT_ATT_ENTRY(bf16, bf16)
DETKIT_ATT_ENTRY(f16, f16)

// ------------------------------------------------------------------ split KV (portable=False)

#define ATS_SPLIT 128  // keys per split: a constant, never derived from the batch or Lk
#define ATS_KB 8       // keys scored together (independent chains, for latency)

// First key j whose bool mask is True, or Lk if none: the anchor of the query's splits.
extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)
attention_anchor(const unsigned char* __restrict__ mask, i64 ms0, i64 ms1, i64 ms2, i64 ms3,
                 int* __restrict__ anchor, int B, int H, int Lq, int Lk) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 query = (i64)blockIdx.x * ATT_WARPS + warp;
    if (query >= (i64)B * H * Lq) return;
    const i64 mrow = QueryPos(query, H, Lq).mask_row(ms0, ms1, ms2);
    int a = Lk;
    for (int c = 0; c < Lk; c += 32) {
        const int j = c + lane;
        const u32 on = __ballot_sync(DETKIT_FULL, j < Lk && mask[mrow + (i64)j * ms3] != 0);
        if (on != 0u) {
            a = c + __ffs(on) - 1;
            break;
        }
    }
    if (lane == 0) anchor[query] = a;
}

// Number of splits of S keys of a query with anchor a.
__device__ __forceinline__ int ats_splits(int a, int Lk, int S) { return a < Lk ? (Lk - a + S - 1) / S : 0; }

// The largest head dims whose K and V rows a CTA stages in shared memory (32 keys at a
// time, in the launch's dynamic shared memory: 32 * (D + Dv) elements, which the launcher
// gives exactly when both dims are at most this); above, each warp reads its keys' rows
// from global memory itself. The split kernel's launch bounds ask for one CTA per SM at
// least: without that ptxas held it to 80 registers on sm_90 and spilled (93-96 now).
#define ATS_STAGE_DMAX 128

// One warp's online softmax over the keys of [lo, hi) that the mask keeps, in order, in
// chunks of 32 keys from c0 to c_end. STAGED: the CTA's warps share one K/V head, and the
// CTA stages each chunk's rows in sk / sv (from kb / vb) before its warps take their keys
// (every warp of the CTA runs the loop, active or not: it holds barriers); otherwise each
// warp reads its keys' rows from kb / vb. Where a row comes from changes no operation.
template <typename T, bool STAGED>
__device__ __forceinline__ void attention_split_keys(const float (&qv)[ATT_VPL], float (&o)[ATT_VPL], float& m,
                                                     float& l, bool active, int lo, int hi, int c0, int c_end,
                                                     const T* __restrict__ kb, const T* __restrict__ vb,
                                                     T* __restrict__ sk, T* __restrict__ sv,
                                                     const unsigned char* __restrict__ mask, i64 mrow, i64 ms3,
                                                     int D, int Dv, float scale) {
    const int lane = threadIdx.x & 31;
    const float NEG_INF = __uint_as_float(0xFF800000u);
    for (int c = c0; c < c_end; c += 32) {
        if constexpr (STAGED) {
            const int rows = min(32, c_end - c);
            for (int e = threadIdx.x; e < rows * D; e += 32 * ATT_WARPS) sk[e] = kb[(i64)c * D + e];
            for (int e = threadIdx.x; e < rows * Dv; e += 32 * ATT_WARPS) sv[e] = vb[(i64)c * Dv + e];
            __syncthreads();
        }
        const int j = c + lane;
        u32 keep = __ballot_sync(DETKIT_FULL, active && j >= lo && j < hi &&
                                                  (mask == nullptr || mask[mrow + (i64)j * ms3] != 0));
        while (keep != 0u) {
            int js[ATS_KB];  // the next ATS_KB kept keys, in order (-1: none); same in every lane
            float sc[ATS_KB];
#pragma unroll
            for (int u = 0; u < ATS_KB; ++u) {
                js[u] = -1;
                if (keep != 0u) {
                    js[u] = c + __ffs(keep) - 1;
                    keep &= keep - 1u;
                }
            }
#pragma unroll
            for (int u = 0; u < ATS_KB; ++u) {
                float p = 0.0f;
                if (js[u] >= 0) {
                    const T* kr = STAGED ? sk + (js[u] - c) * D : kb + (i64)js[u] * D;
#pragma unroll
                    for (int t = 0; t < ATT_VPL; ++t) {
                        const int d = lane + 32 * t;
                        if (d < D) p = __fmaf_rn(qv[t], to_f32(kr[d]), p);
                    }
                }
                sc[u] = p;
            }
#pragma unroll
            for (int o2 = 16; o2 > 0; o2 >>= 1)
#pragma unroll
                for (int u = 0; u < ATS_KB; ++u) sc[u] = __fadd_rn(sc[u], __shfl_xor_sync(DETKIT_FULL, sc[u], o2));
#pragma unroll
            for (int u = 0; u < ATS_KB; ++u) {
                if (js[u] < 0) break;
                const float s = __fmul_rn(sc[u], scale);
                if (s == NEG_INF) continue;  // skipped, as in the canonical order
                if (!(s <= m)) {             // a new maximum (or NaN): rescale what is summed so far
                    const float m_new = ieee_max(m, s);
                    if (m != NEG_INF) {
                        const float alpha = expf(__fsub_rn(m, m_new));
                        l = __fmul_rn(l, alpha);
#pragma unroll
                        for (int t = 0; t < ATT_VPL; ++t) o[t] = __fmul_rn(o[t], alpha);
                    }
                    m = m_new;
                }
                const float p = expf(__fsub_rn(s, m));
                l = __fadd_rn(l, p);
                const T* vr = STAGED ? sv + (js[u] - c) * Dv : vb + (i64)js[u] * Dv;
#pragma unroll
                for (int t = 0; t < ATT_VPL; ++t) {
                    const int d = lane + 32 * t;
                    if (d < Dv) o[t] = __fmaf_rn(p, to_f32(vr[d]), o[t]);
                }
            }
        }
        if constexpr (STAGED) __syncthreads();  // every warp is done with the chunk before the next lands
    }
}

// One warp: query q0 + (blockIdx.x * ATT_WARPS + warp), split blockIdx.y. Score of a key:
// lane l accumulates q[d] * k[d] for d = l, l + 32, ... (fma, increasing d), then the
// fixed xor butterfly; times scale. Online softmax over the split's kept keys in order:
// a larger score rescales l and o by expf(m_old - m_new) first. Writes m (-inf: no kept
// key), l and o[Dv] of the split to the workspace slot (query - q0) * NS + split.
//
// When the CTA's warps with work all read the same K/V head (consecutive queries of one
// sequence and head, as in a prefill; or the query heads of one GQA group in a decode),
// the CTA stages the rows of the union of their key ranges in shared memory, each row
// read from global memory once for all of them.
template <typename T>
__device__ __forceinline__ void attention_split_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                     const T* __restrict__ v, const unsigned char* __restrict__ mask,
                                                     i64 ms0, i64 ms1, i64 ms2, i64 ms3,
                                                     const int* __restrict__ anchor, float* __restrict__ part_m,
                                                     float* __restrict__ part_l, float* __restrict__ part_o, i64 q0,
                                                     int nq, int NS, int H, int Hk, int Lq, int Lk, int D, int Dv,
                                                     float scale) {
    DETKIT_DYNAMIC_SMEM(unsigned char, ats_stage);  // 32 * (D + Dv) elements when staged
    __shared__ i64 s_kv[ATT_WARPS];  // per warp: its K/V head (b * Hk + g), or -1 when it has no work
    __shared__ int s_lo[ATT_WARPS];
    __shared__ int s_hi[ATT_WARPS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 local = (i64)blockIdx.x * ATT_WARPS + warp;
    const i64 query = q0 + (local < nq ? local : 0);  // a warp past nq stands in for the first query
    const QueryPos pos(query, H, Lq);
    const int split = blockIdx.y;
    const int a = anchor != nullptr ? anchor[query] : 0;
    const bool active = local < nq && split < ats_splits(a, Lk, ATS_SPLIT);  // else: not one of its splits, never read
    const int lo = a + split * ATS_SPLIT;
    const int hi = min(lo + ATS_SPLIT, Lk);
    const i64 kv = (i64)pos.b * Hk + pos.h / (H / Hk);
    if (lane == 0) {
        s_kv[warp] = active ? kv : -1;
        s_lo[warp] = lo;
        s_hi[warp] = hi;
    }
    __syncthreads();
    // The same decision in every thread, from shared memory: the barriers that follow are uniform.
    i64 cta_kv = -1;
    bool staged = D <= ATS_STAGE_DMAX && Dv <= ATS_STAGE_DMAX;
    int clo = Lk, chi = 0;
    for (int w = 0; w < ATT_WARPS; ++w) {
        if (s_kv[w] < 0) continue;
        if (cta_kv < 0) cta_kv = s_kv[w];
        staged = staged && s_kv[w] == cta_kv;
        clo = min(clo, s_lo[w]);
        chi = max(chi, s_hi[w]);
    }
    if (cta_kv < 0 || (!staged && !active)) return;  // no barrier follows on these paths

    const T* qr = q + query * D;
    const i64 mrow = pos.mask_row(ms0, ms1, ms2);
    float qv[ATT_VPL], o[ATT_VPL];
#pragma unroll
    for (int t = 0; t < ATT_VPL; ++t) {
        const int d = lane + 32 * t;
        qv[t] = d < D ? to_f32(qr[d]) : 0.0f;
        o[t] = 0.0f;
    }
    float m = __uint_as_float(0xFF800000u), l = 0.0f;
    T* sk = reinterpret_cast<T*>(ats_stage);
    T* sv = sk + 32 * D;
    if (staged)
        attention_split_keys<T, true>(qv, o, m, l, active, lo, hi, clo, chi, k + cta_kv * (i64)Lk * D,
                                      v + cta_kv * (i64)Lk * Dv, sk, sv, mask, mrow, ms3, D, Dv, scale);
    else
        attention_split_keys<T, false>(qv, o, m, l, active, lo, hi, lo, hi, k + kv * (i64)Lk * D,
                                       v + kv * (i64)Lk * Dv, sk, sv, mask, mrow, ms3, D, Dv, scale);
    if (!active) return;
    const i64 slot = local * NS + split;
    if (lane == 0) {
        part_m[slot] = m;
        part_l[slot] = l;
    }
#pragma unroll
    for (int t = 0; t < ATT_VPL; ++t) {
        const int d = lane + 32 * t;
        if (d < Dv) part_o[slot * Dv + d] = o[t];
    }
}

// One warp per query, whose keys were cut into splits of S keys (ATS_SPLIT, or ATC_SPLIT
// for the tensor-core kernel): M = IEEE maximum of the splits' m; then, over the splits in order,
// w = expf(m_s - M) (1 when m_s = M), L = fma(l_s, w, L), O[d] = fma(o_s[d], w, O[d]); out = O / L.
// Splits without a kept key are skipped; a query without any gets zeros.
template <typename T>
__device__ __forceinline__ void attention_combine_impl(const int* __restrict__ anchor, const float* __restrict__ part_m,
                                                       const float* __restrict__ part_l,
                                                       const float* __restrict__ part_o, T* __restrict__ out, i64 q0,
                                                       int nq, int NS, int Lk, int Dv, int S) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 local = (i64)blockIdx.x * ATT_WARPS + warp;
    if (local >= nq) return;
    const i64 query = q0 + local;
    const int ns = ats_splits(anchor != nullptr ? anchor[query] : 0, Lk, S);
    const float NEG_INF = __uint_as_float(0xFF800000u);
    const float* pm = part_m + local * NS;
    const float* pl = part_l + local * NS;
    float M = NEG_INF;
    for (int s = 0; s < ns; ++s)
        if (pm[s] != NEG_INF) M = ieee_max(M, pm[s]);
    T* orow = out + query * Dv;
    if (M == NEG_INF) {
        for (int d = lane; d < Dv; d += 32) orow[d] = from_f32<T>(0.0f);
        return;
    }
    float L = 0.0f, O[ATT_VPL];
#pragma unroll
    for (int t = 0; t < ATT_VPL; ++t) O[t] = 0.0f;
    for (int s = 0; s < ns; ++s) {
        if (pm[s] == NEG_INF) continue;
        const float w = pm[s] == M ? 1.0f : expf(__fsub_rn(pm[s], M));  // 1 exactly: see attention_tc_impl
        L = __fmaf_rn(pl[s], w, L);
        const float* po = part_o + (local * NS + s) * Dv;
#pragma unroll
        for (int t = 0; t < ATT_VPL; ++t) {
            const int d = lane + 32 * t;
            if (d < Dv) O[t] = __fmaf_rn(po[d], w, O[t]);
        }
    }
    store_normalised<T>(orow, O, L, Dv);
}

#define DETKIT_ATS_ENTRY(SUF, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS, 1)                                  \
    attention_split_##SUF(const T* q, const T* k, const T* v, const unsigned char* mask, i64 ms0,     \
                          i64 ms1, i64 ms2, i64 ms3, const int* anchor, float* part_m, float* part_l, \
                          float* part_o, i64 q0, int nq, int NS, int H, int Hk, int Lq, int Lk, int D, \
                          int Dv, float scale) {                                                     \
        attention_split_impl<T>(q, k, v, mask, ms0, ms1, ms2, ms3, anchor, part_m, part_l, part_o, q0, \
                                nq, NS, H, Hk, Lq, Lk, D, Dv, scale);                                \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)                                     \
    attention_combine_##SUF(const int* anchor, const float* part_m, const float* part_l,              \
                            const float* part_o, T* out, i64 q0, int nq, int NS, int Lk, int Dv,      \
                            int S) {                                                                 \
        attention_combine_impl<T>(anchor, part_m, part_l, part_o, out, q0, nq, NS, Lk, Dv, S);        \
    }
DETKIT_ATS_ENTRY(f32, float)
DETKIT_ATS_ENTRY(bf16, bf16)
DETKIT_ATS_ENTRY(f16, f16)

// ------------------------------------------------------------ tensor cores (portable=False)
//
// attention_tc_<T>_d<D>: bfloat16 / float16 with head dims D = Dv in {64, 128}, no mask or
// a bool mask. Split KV as above, ATC_SPLIT keys per split anchored at the query's first
// kept key, merged by attention_combine (with one split, Lk <= ATC_SPLIT, the kernel
// writes the output itself with the combine's arithmetic); inside a split, blocks of
// ATC_KB keys from the split's first key, each done by mma.sync m16n8k16 (float32
// accumulation):
//
//   s_j   = (q . k_j: the mma chain over d = 0..15, 16..31, ... in order) * scale
//   m'    = IEEE max(m, s_j over the block's kept keys)        (exact)
//   l, o *= expf(m - m')                     (only when m' != m and m != -inf)
//   p_j   = expf(s_j - m') rounded to T,  0 for a key not kept or a score of -inf
//   l    += sum of the block's p_j           (a lane's 16 in key order, then xor 1, 2)
//   o    += P V                              (the mma chain over the block's keys, 16 at a time)
//
// What a query gets depends only on its own row of Q, its kept keys and its anchor: an
// mma output element reads its row of A and column of B only, every block boundary is
// fixed by the anchor, and a block or a key the query does not keep adds exact zeros
// (the combine turns a -0 sum into +0). So the batch, the padding, the other queries in
// the CTA and decode vs prefill leave its bits unchanged, as in the CUDA-core kernels.
// P is rounded to T before the PV product, as in FlashAttention.
//
// A CTA (4 warps, 16 rows each) takes 64 consecutive rows of one (batch, K/V head): the
// rows r = hg * Lq + i of its GQA group's query heads hg, whose flat query index is
// (b * Hk + kv) * G * Lq + r, so a decode packs the group's heads into one tile. Rows
// whose anchors differ are done one anchor at a time (a sliding window pays for it;
// causal and padding masks give the rows of a sequence one anchor). The K and V rows of
// a key no row of the CTA keeps are not read (zero-filled), so a cache's unwritten or
// padded slots may hold inf or NaN. Not so a key that one query of the CTA keeps and
// another masks (the causal triangle): an inf or NaN in its V reaches the masked query
// through 0 * inf in the mma (docs/cuda.md, "Attention").

#define ATC_ROWS 64   // query rows per CTA (16 per warp)
#define ATC_KB 64     // keys per block
#define ATC_SPLIT 256 // keys per split: a constant, never derived from the batch or Lk

__device__ __forceinline__ u32 pack_halves(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

template <typename T, int D>
__device__ __forceinline__ void attention_tc_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                  const T* __restrict__ v, const unsigned char* __restrict__ mask,
                                                  i64 ms0, i64 ms1, i64 ms2, i64 ms3, const int* __restrict__ anchor,
                                                  float* __restrict__ part_m, float* __restrict__ part_l,
                                                  float* __restrict__ part_o, T* __restrict__ out, int g0,
                                                  int tiles, int NS, int H, int Hk, int Lq, int Lk, float scale,
                                                  int vec) {
    constexpr int LD = D + 8;              // padded smem rows (halfs): conflict-free ldmatrix
    constexpr int TILE = ATC_ROWS * LD;    // one 64-row tile (Q, or one stage of K or V)
    constexpr int NT = 32 * 4, DK = D / 16, DN = D / 8, CH = D / 8;  // CH: 16-byte chunks per row
    static_assert(ATC_ROWS == ATC_KB && ATC_SPLIT % ATC_KB == 0 && D % 16 == 0, "tile shapes");
    DETKIT_DYNAMIC_SMEM(u16, atc_smem);    // 5 tiles: Q, K x 2 stages, V x 2 stages
    u16* const sQ = atc_smem;
    __shared__ u32 s_keep[2][ATC_ROWS][2];  // per block buffer: bit j of [r][h]: row r keeps key 32 h + j
    __shared__ u32 s_kor[2][4][2];          // per buffer, warp, half: keys some row of the warp keeps
    __shared__ int s_anc[ATC_ROWS];
    __shared__ int s_red[32];
    const float NEG_INF = __uint_as_float(0xFF800000u);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int G = H / Hk, R = G * Lq;
    const int gi = g0 + (int)(blockIdx.x / (unsigned)tiles);  // (batch, K/V head)
    const int r0 = (int)(blockIdx.x % (unsigned)tiles) * ATC_ROWS;
    const int split = blockIdx.y;
    const i64 qbase = (i64)gi * R;  // flat query index of the group's row 0
    const u16* const qg = reinterpret_cast<const u16*>(q) + qbase * D;
    const u16* const kg = reinterpret_cast<const u16*>(k) + (i64)gi * Lk * D;
    const u16* const vg = reinterpret_cast<const u16*>(v) + (i64)gi * Lk * D;

    if (tid < ATC_ROWS) {
        const int r = r0 + tid;
        s_anc[tid] = r < R ? (anchor != nullptr ? anchor[qbase + r] : 0) : Lk;
    }
    // Copy rows [row0, row0 + 64) of a (rows, D) matrix into a tile, zeros past `rows` or
    // where `take(row)` is false.
    auto load_tile = [&](u16* dst, const u16* src, int row0, int rows, u32 take_lo, u32 take_hi, bool keyed) {
        for (int c = tid; c < ATC_ROWS * CH; c += NT) {
            const int rr = c / CH, col = (c % CH) * 8;
            const u32 bits = rr < 32 ? take_lo : take_hi;
            const bool ok = row0 + rr < rows && (!keyed || ((bits >> (rr & 31)) & 1u));
            const u16* g = src + (i64)(row0 + rr) * D + col;
            if (vec) {
                cp_async16(dst + rr * LD + col, ok ? g : src, ok);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) dst[rr * LD + col + e] = ok ? g[e] : (u16)0;
            }
        }
    };
    load_tile(sQ, qg, r0, R, 0u, 0u, false);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[DK][4];
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) ldsm_x4(qf[kk], sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
    if (NS == 1)  // rows without a kept key have no split: zeros, as the combine gives them
        for (int e = tid; e < ATC_ROWS * D; e += NT)
            if (r0 + e / D < R && s_anc[e / D] >= Lk) out[(qbase + r0 + e / D) * D + e % D] = from_f32<T>(0.0f);

    // The mask row of the row this lane reads keep bits for (row warp * 16 + lane / 2,
    // keys 32 * (lane & 1) + 0..31 of a block).
    const int kr_row = warp * 16 + (lane >> 1), kr_half = lane & 1;
    i64 kr_mrow = 0;
    {
        const int r = min(r0 + kr_row, R - 1);
        const int b = gi / Hk, h = (gi % Hk) * G + r / Lq, i = r % Lq;
        kr_mrow = (i64)b * ms0 + (i64)h * ms1 + (i64)i * ms2;
    }
    // The rows this lane holds accumulator values of.
    const int ra = warp * 16 + (lane >> 2), rb = ra + 8;

    int prev = -1;
    for (;;) {
        // The CTA's rows' anchors, one at a time in increasing order.
        const int alpha = block_min<NT>(tid < ATC_ROWS && s_anc[tid] > prev ? s_anc[tid] : 0x7fffffff, s_red);
        if (alpha >= Lk || split >= ats_splits(alpha, Lk, ATC_SPLIT)) break;  // nor have later anchors
        const int lo = alpha + split * ATC_SPLIT;
        prev = alpha;
        const int hi = min(lo + ATC_SPLIT, Lk);
        const int nblk = (hi - lo + ATC_KB - 1) / ATC_KB;
        const bool mine = r0 + kr_row < R && s_anc[kr_row] == alpha;

        // Keep bits of block t into buffer t & 1, and per warp the keys any of its rows keeps.
        auto prepare = [&](int t) {
            const int c = lo + t * ATC_KB + 32 * kr_half;
            u32 bits = 0u;
            if (mine) {
                const int n = min(32, hi - c);
                if (mask == nullptr) {
                    bits = n >= 32 ? 0xffffffffu : (n > 0 ? (1u << n) - 1u : 0u);
                } else {
                    for (int j = 0; j < n; ++j) bits |= (u32)(mask[kr_mrow + (i64)(c + j) * ms3] != 0) << j;
                }
            }
            s_keep[t & 1][kr_row][kr_half] = bits;
            u32 any = bits;
#pragma unroll
            for (int o2 = 2; o2 < 32; o2 <<= 1) any |= __shfl_xor_sync(DETKIT_FULL, any, o2);
            if (lane < 2) s_kor[t & 1][warp][lane] = any;
        };
        auto kept_keys = [&](int t, int h) {
            return s_kor[t & 1][0][h] | s_kor[t & 1][1][h] | s_kor[t & 1][2][h] | s_kor[t & 1][3][h];
        };
        auto issue = [&](int t) {
            const int c = lo + t * ATC_KB;
            const u32 k0 = kept_keys(t, 0), k1 = kept_keys(t, 1);
            if ((k0 | k1) != 0u) {
                load_tile(atc_smem + (1 + (t & 1)) * TILE, kg, c, Lk, k0, k1, true);
                load_tile(atc_smem + (3 + (t & 1)) * TILE, vg, c, Lk, k0, k1, true);
            }
            cp_async_commit();
        };

        float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
        float o[DN][4];
#pragma unroll
        for (int nt = 0; nt < DN; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[nt][e] = 0.0f;

        prepare(0);
        __syncthreads();
        issue(0);
        for (int t = 0; t < nblk; ++t) {
            if (t + 1 < nblk) prepare(t + 1);
            __syncthreads();
            if (t + 1 < nblk) issue(t + 1);
            else cp_async_commit();  // an empty group: the wait below counts groups
            cp_async_wait<1>();
            __syncthreads();
            const int buf = t & 1;
            const u32 ka0 = s_keep[buf][ra][0], ka1 = s_keep[buf][ra][1];
            const u32 kb0 = s_keep[buf][rb][0], kb1 = s_keep[buf][rb][1];
            // A block none of the warp's rows keeps would add exact zeros: skipped.
            if ((s_kor[buf][warp][0] | s_kor[buf][warp][1]) != 0u) {
                const u16* Ks = atc_smem + (1 + buf) * TILE;
                const u16* Vs = atc_smem + (3 + buf) * TILE;
                float sc[ATC_KB / 8][4];
#pragma unroll
                for (int nt = 0; nt < ATC_KB / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < DK; ++kk) {
#pragma unroll
                    for (int np = 0; np < ATC_KB / 16; ++np) {
                        u32 r[4];
                        const int n = np * 16 + (lane & 7) + ((lane >> 4) << 3);
                        ldsm_x4(r, Ks + n * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                        Mma<T>::run(sc[2 * np], qf[kk], r[0], r[1]);
                        Mma<T>::run(sc[2 * np + 1], qf[kk], r[2], r[3]);
                    }
                }
                // Scale, mask (-inf: takes part in nothing), block maximum per row.
                float bmax[2] = {NEG_INF, NEG_INF};
#pragma unroll
                for (int nt = 0; nt < ATC_KB / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = nt * 8 + (lane & 3) * 2 + (e & 1), i = e >> 1;
                        const u32 bits = i == 0 ? (j < 32 ? ka0 : ka1) : (j < 32 ? kb0 : kb1);
                        const float x = ((bits >> (j & 31)) & 1u) ? __fmul_rn(sc[nt][e], scale) : NEG_INF;
                        sc[nt][e] = x;
                        if (x != NEG_INF) bmax[i] = ieee_max(bmax[i], x);
                    }
                }
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    bmax[i] = ieee_max(bmax[i], __shfl_xor_sync(DETKIT_FULL, bmax[i], 1));
                    bmax[i] = ieee_max(bmax[i], __shfl_xor_sync(DETKIT_FULL, bmax[i], 2));
                    const float mn = ieee_max(m[i], bmax[i]);
                    if (m[i] != NEG_INF && !(mn == m[i])) {  // a new maximum (or NaN): rescale
                        const float a = expf(__fsub_rn(m[i], mn));
                        l[i] = __fmul_rn(l[i], a);
#pragma unroll
                        for (int nt = 0; nt < DN; ++nt) {
                            o[nt][2 * i] = __fmul_rn(o[nt][2 * i], a);
                            o[nt][2 * i + 1] = __fmul_rn(o[nt][2 * i + 1], a);
                        }
                    }
                    m[i] = mn;
                }
                // P, rounded to T, as the A operand of P V (an S accumulator pair is an A pair).
                u32 pa[ATC_KB / 16][4];
                float bs[2] = {0.0f, 0.0f};
#pragma unroll
                for (int nt = 0; nt < ATC_KB / 8; ++nt) {
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const float x0 = sc[nt][2 * i], x1 = sc[nt][2 * i + 1];
                        const T p0 = from_f32<T>(x0 == NEG_INF ? 0.0f : expf(__fsub_rn(x0, m[i])));
                        const T p1 = from_f32<T>(x1 == NEG_INF ? 0.0f : expf(__fsub_rn(x1, m[i])));
                        bs[i] = __fadd_rn(__fadd_rn(bs[i], to_f32(p0)), to_f32(p1));
                        pa[nt >> 1][i + 2 * (nt & 1)] = pack_halves(p0.bits, p1.bits);
                    }
                }
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    bs[i] = __fadd_rn(bs[i], __shfl_xor_sync(DETKIT_FULL, bs[i], 1));
                    bs[i] = __fadd_rn(bs[i], __shfl_xor_sync(DETKIT_FULL, bs[i], 2));
                    l[i] = __fadd_rn(l[i], bs[i]);
                }
#pragma unroll
                for (int kk = 0; kk < ATC_KB / 16; ++kk) {
#pragma unroll
                    for (int np = 0; np < D / 16; ++np) {
                        u32 r[4];
                        const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                        ldsm_x4_trans(r, Vs + key * LD + np * 16 + (lane >> 4) * 8);
                        Mma<T>::run(o[2 * np], pa[kk], r[0], r[1]);
                        Mma<T>::run(o[2 * np + 1], pa[kk], r[2], r[3]);
                    }
                }
            }
            __syncthreads();  // every warp is done with this stage and these keep bits
        }
        // The split's (m, l, o) of each of this anchor's rows; with one split (Lk <= ATC_SPLIT)
        // the output itself, as the combine computes it from one split: w = 1, L = l + 0,
        // O = o + 0 (-0 becomes +0), out = O / L, zeros without a kept key.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int rr = i == 0 ? ra : rb, r = r0 + rr;
            if (r >= R || s_anc[rr] != alpha) continue;
            if (NS == 1) {
                T* orow = out + (qbase + r) * D;
                const float L = __fadd_rn(l[i], 0.0f);
#pragma unroll
                for (int nt = 0; nt < DN; ++nt) {
                    const int d = nt * 8 + (lane & 3) * 2;
                    const bool none = m[i] == NEG_INF;
                    orow[d] = from_f32<T>(none ? 0.0f : __fdiv_rn(__fadd_rn(o[nt][2 * i], 0.0f), L));
                    orow[d + 1] = from_f32<T>(none ? 0.0f : __fdiv_rn(__fadd_rn(o[nt][2 * i + 1], 0.0f), L));
                }
                continue;
            }
            const i64 slot = ((i64)(gi - g0) * R + r) * NS + split;
            if ((lane & 3) == 0) {
                part_m[slot] = m[i];
                part_l[slot] = l[i];
            }
            if (m[i] == NEG_INF) continue;  // the combine skips the split
#pragma unroll
            for (int nt = 0; nt < DN; ++nt) {
                const int d = nt * 8 + (lane & 3) * 2;
                part_o[slot * D + d] = o[nt][2 * i];
                part_o[slot * D + d + 1] = o[nt][2 * i + 1];
            }
        }
    }
}

#define DETKIT_ATC_ENTRY(SUF, T, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(128, 1)                                              \
    attention_tc_##SUF##_d##D(const T* q, const T* k, const T* v, const unsigned char* mask, i64 ms0, \
                              i64 ms1, i64 ms2, i64 ms3, const int* anchor, float* part_m,            \
                              float* part_l, float* part_o, T* out, int g0, int tiles, int NS, int H, \
                              int Hk, int Lq, int Lk, float scale, int vec) {                         \
        attention_tc_impl<T, D>(q, k, v, mask, ms0, ms1, ms2, ms3, anchor, part_m, part_l, part_o, out, \
                                g0, tiles, NS, H, Hk, Lq, Lk, scale, vec);                            \
    }
DETKIT_ATC_ENTRY(bf16, bf16, 64)
DETKIT_ATC_ENTRY(bf16, bf16, 128)
DETKIT_ATC_ENTRY(f16, f16, 64)
DETKIT_ATC_ENTRY(f16, f16, 128)
