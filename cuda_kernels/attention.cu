// detkit attention: scaled-dot-product attention in the canonical order of
// docs/canonical-orders.md ("attention"), one warp per query (b, h, i).
//
// A key is skipped (takes part in no operation at all) when the bool mask is False or
// its score is -inf after the float mask. The kept keys are visited in increasing
// order: the maximum is exact (order free), the normaliser l and the outputs o[d] are
// plain sequential sums over kept keys. Hence padding keys, the KV length beyond the
// last kept key, the batch, and decode (one query) vs prefill (causal mask) cannot
// change a query's bits. Used for portable=True and portable=False alike.
//
// Lane j of the warp scores key c + j of a 32-key chunk (sequential fma over d); the
// chunk's kept keys are then consumed in order by all lanes, each lane owning the
// output dimensions d = lane, lane + 32, ...

#define ATT_WARPS 4
#define ATT_DMAX 256
#define ATT_VPL (ATT_DMAX / 32)  // output dims per lane

enum MaskKind { MASK_NONE = 0, MASK_BOOL = 1, MASK_FLOAT = 2 };

template <typename T>
__device__ __forceinline__ void attention_impl(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, const void* __restrict__ mask,
                                               int mask_kind, i64 ms0, i64 ms1, i64 ms2, i64 ms3,
                                               T* __restrict__ out, int B, int H, int Hk, int Lq, int Lk,
                                               int D, int Dv, float scale) {
    __shared__ float sq[ATT_WARPS][ATT_DMAX];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 query = (i64)blockIdx.x * ATT_WARPS + warp;  // flat (b, h, i)
    if (query >= (i64)B * H * Lq) return;                  // the whole warp leaves together
    const int i = (int)(query % Lq);
    const int h = (int)((query / Lq) % H);
    const int b = (int)(query / ((i64)Lq * H));
    const int g = h / (H / Hk);

    const T* qr = q + query * D;
    const T* kb = k + ((i64)b * Hk + g) * (i64)Lk * D;
    const T* vb = v + ((i64)b * Hk + g) * (i64)Lk * Dv;
    const unsigned char* mb = (const unsigned char*)mask;
    const float* mf = (const float*)mask;
    const i64 mrow = (i64)b * ms0 + (i64)h * ms1 + (i64)i * ms2;

    for (int d = lane; d < D; d += 32) sq[warp][d] = to_f32(qr[d]);
    __syncwarp();

    // Score of key j (every lane computes its own key), or -inf when skipped. Computed
    // twice per key (max pass, sum pass) with the same operations, hence the same bits.
    auto score = [&](int j, bool& kept) -> float {
        kept = false;
        if (j >= Lk) return 0.0f;
        if (mask_kind == MASK_BOOL && mb[mrow + (i64)j * ms3] == 0) return 0.0f;
        const T* kr = kb + (i64)j * D;
        float s = 0.0f;
        for (int d = 0; d < D; ++d) s = __fmaf_rn(sq[warp][d], to_f32(kr[d]), s);
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
        const float s = score(c + lane, kept);
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
        const float s = score(c + lane, kept);
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
#pragma unroll
    for (int t = 0; t < ATT_VPL; ++t) {
        const int d = lane + 32 * t;
        if (d < Dv) orow[d] = from_f32<T>(__fdiv_rn(o[t], l));
    }
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
