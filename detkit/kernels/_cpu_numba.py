"""Fixed-order CPU kernels compiled with numba (private to ``detkit.kernels.cpu``).

Every kernel reduces each output element in an order that depends only on the
problem's reduced length, never on the number of rows, the row's position or the
thread count: rows are distributed over threads with ``prange``, but one row is always
reduced by one thread in one order. No ``fastmath``: LLVM then neither reassociates nor
contracts, so the written order is the executed order.

Orders (W = 16 lanes):

* lane sum: element ``j`` goes to lane ``(j - j0) mod W`` where ``j0`` is the first
  nonzero element of the row; lanes start at +0.0 and are combined by the fixed tree
  ``lane[w] += lane[w + h]`` for h = 8, 4, 2, 1. Exact zeros before ``j0`` are skipped
  and zeros after the end add nothing, so left and right zero padding cannot change
  the sum (this is what makes eager attention's probabilities padding invariant).
* attention scores: a lane dot product over the head dimension (element d in lane
  d mod W, FMA, the same tree), times the scale, rounded.
* batched matmul and attention's probabilities @ V: one accumulator per output element,
  starting at +0.0, ``acc = fma(a_k, b_k, acc)`` for k = 0..K-1 in order. Leading and
  trailing exact-zero terms leave the accumulator unchanged.
* exp: computed in float64 (Cody-Waite reduction, degree-13 Taylor polynomial, scaling
  by two exact powers of two built from their bits) from basic IEEE operations only, so it vectorises and
  gives the same bits in every loop position; the float32 result is then within about
  0.5 ULP.

Arrays arrive as float32 or float64 (reduced precision is widened exactly before).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from detkit.kernels._portable_kernels import exp_f32

W = 16
QB = 8  # attention: queries per task (they share each loaded key/value row)
KB = 64  # attention: keys per score tile (vector lanes across keys)

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # low 32 bits zero: k * LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_SHIFTER = 6755399441055744.0  # 1.5 * 2**52: (t + S) - S rounds t to the nearest integer
_INV_FACT = tuple(1.0 / float(np.prod(np.arange(1, n + 1, dtype=np.float64))) for n in range(14))


@intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """Fused multiply-add with one rounding (``llvm.fma``), for same-typed floats."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fma(args[0], args[1], args[2])

    return a(a, b, c), codegen


@intrinsic
def _pow2(typingctx, k):  # type: ignore[no-untyped-def]
    """2.0**k as float64 for an int64 k in [-1022, 1023], by building the bits (exact)."""
    if not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i64 = ir.IntType(64)
        biased = builder.add(args[0], ir.Constant(i64, 1023))
        return builder.bitcast(builder.shl(biased, ir.Constant(i64, 52)), ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(cache=True, inline="always")
def exp64(t: float) -> float:
    """exp(t) in float64 from IEEE add/mul only; NaN, +-inf and under/overflow handled."""
    tc = t if t > -746.0 else -746.0
    tc = tc if tc < 710.0 else 710.0
    kf = (tc * _LOG2E + _SHIFTER) - _SHIFTER
    r = (tc - kf * _LN2_HI) - kf * _LN2_LO
    p = _INV_FACT[13]
    p = p * r + _INV_FACT[12]
    p = p * r + _INV_FACT[11]
    p = p * r + _INV_FACT[10]
    p = p * r + _INV_FACT[9]
    p = p * r + _INV_FACT[8]
    p = p * r + _INV_FACT[7]
    p = p * r + _INV_FACT[6]
    p = p * r + _INV_FACT[5]
    p = p * r + _INV_FACT[4]
    p = p * r + _INV_FACT[3]
    p = p * r + _INV_FACT[2]
    p = p * r + 1.0
    p = p * r + 1.0
    k = np.int64(kf)
    k1 = k >> 1
    res = p * _pow2(k1) * _pow2(k - k1)
    return res if t == t else t


def exp_w(t):  # type: ignore[no-untyped-def]
    """exp in the working dtype: ``exp_f32`` for float32, ``exp64`` for float64."""
    raise NotImplementedError("exp_w is only callable from numba-compiled code")


@overload(exp_w, inline="always")
def _exp_w_impl(t):  # type: ignore[no-untyped-def]
    if t == types.float32:
        return lambda t: exp_f32(t)
    if t == types.float64:
        return lambda t: exp64(t)
    return None


@njit(cache=True, inline="always")
def _tree(lanes):  # type: ignore[no-untyped-def]
    h = W // 2
    while h >= 1:
        for w in range(h):
            lanes[w] = lanes[w] + lanes[w + h]
        h //= 2
    return lanes[0]


@njit(cache=True, inline="always")
def first_nonzero(x, n):  # type: ignore[no-untyped-def]
    for j in range(n):
        if x[j] != 0:
            return j
    return n


@njit(cache=True, inline="always")
def anchored_sum(x, start, stop, lanes):  # type: ignore[no-untyped-def]
    """Lane sum of x[start:stop], element j in lane (j - start) mod W, then the tree."""
    for w in range(W):
        lanes[w] = 0.0
    full = start + ((stop - start) // W) * W
    j = start
    while j < full:
        for w in range(W):
            lanes[w] = lanes[w] + x[j + w]
        j += W
    for w in range(stop - full):
        lanes[w] = lanes[w] + x[full + w]
    return _tree(lanes)


@njit(cache=True, inline="always")
def _sumsq(x, n, lanes):  # type: ignore[no-untyped-def]
    for w in range(W):
        lanes[w] = 0.0
    full = (n // W) * W
    j = 0
    while j < full:
        for w in range(W):
            lanes[w] = lanes[w] + x[j + w] * x[j + w]
        j += W
    for w in range(n - full):
        lanes[w] = lanes[w] + x[full + w] * x[full + w]
    return _tree(lanes)


@njit(cache=True, inline="always")
def _sum_centered_sq(x, n, mu, lanes):  # type: ignore[no-untyped-def]
    for w in range(W):
        lanes[w] = 0.0
    full = (n // W) * W
    j = 0
    while j < full:
        for w in range(W):
            d = x[j + w] - mu
            lanes[w] = lanes[w] + d * d
        j += W
    for w in range(n - full):
        d = x[full + w] - mu
        lanes[w] = lanes[w] + d * d
    return _tree(lanes)


@njit(cache=True, inline="always")
def dot_lanes(a, b, n, lanes):  # type: ignore[no-untyped-def]
    """sum_d a[d] * b[d]: element d in lane d mod W (FMA), lanes from +0.0, then the tree."""
    for w in range(W):
        lanes[w] = 0.0
    full = (n // W) * W
    d = 0
    while d < full:
        for w in range(W):
            lanes[w] = fma(a[d + w], b[d + w], lanes[w])
        d += W
    for w in range(n - full):
        lanes[w] = fma(a[full + w], b[full + w], lanes[w])
    return _tree(lanes)


@njit(cache=True, inline="always")
def _row_max(x, n, lanes):  # type: ignore[no-untyped-def]
    for w in range(W):
        lanes[w] = -np.inf
    full = (n // W) * W
    j = 0
    while j < full:
        for w in range(W):
            v = x[j + w]
            lanes[w] = v if v > lanes[w] else lanes[w]
        j += W
    for w in range(n - full):
        v = x[full + w]
        lanes[w] = v if v > lanes[w] else lanes[w]
    m = lanes[0]
    for w in range(1, W):
        m = lanes[w] if lanes[w] > m else m
    return m


# Row kernels: one function per row (the order), driven by a parallel loop over rows
# or, for small inputs where waking threads costs more than the work, a serial one.
# Both drivers run the same row function, so they give the same bits.


@njit(cache=True, inline="always")
def _sum_row(row, r, out, mean, lanes):  # type: ignore[no-untyped-def]
    L = row.shape[0]
    s = anchored_sum(row, first_nonzero(row, L), L, lanes)
    out[r] = s / L if mean else s


@njit(cache=True, inline="always")
def _softmax_row(row, o, log, lanes):  # type: ignore[no-untyped-def]
    L = row.shape[0]
    m = np.float64(_row_max(row, L, lanes))
    for j in range(L):
        o[j] = exp64(np.float64(row[j]) - m)
    s = anchored_sum(o, first_nonzero(o, L), L, lanes)
    if log:
        ls = np.log(np.float64(s))
        for j in range(L):
            o[j] = (np.float64(row[j]) - m) - ls
    else:
        for j in range(L):
            o[j] = o[j] / s


@njit(cache=True, inline="always")
def _rms_row(row, o, weight, has_weight, eps, lanes):  # type: ignore[no-untyped-def]
    L = row.shape[0]
    ms = _sumsq(row, L, lanes) / L
    inv = 1.0 / np.sqrt(np.float64(ms) + eps)
    if has_weight:
        for j in range(L):
            o[j] = np.float64(row[j]) * inv * np.float64(weight[j])
    else:
        for j in range(L):
            o[j] = np.float64(row[j]) * inv


@njit(cache=True, inline="always")
def _layer_norm_row(row, o, weight, bias, has_weight, has_bias, eps, lanes):  # type: ignore[no-untyped-def]
    L = row.shape[0]
    mu = anchored_sum(row, 0, L, lanes) / L
    var = _sum_centered_sq(row, L, mu, lanes) / L
    inv = 1.0 / np.sqrt(np.float64(var) + eps)
    mu64 = np.float64(mu)
    for j in range(L):
        y = (np.float64(row[j]) - mu64) * inv
        if has_weight:
            y = y * np.float64(weight[j])
        if has_bias:
            y = y + np.float64(bias[j])
        o[j] = y


@njit(parallel=True, cache=True)
def row_sum(x, out, mean):  # type: ignore[no-untyped-def]
    """out[r] = sum (or mean) of x[r, :], anchored lane order."""
    for r in prange(x.shape[0]):
        _sum_row(x[r], r, out, mean, np.empty(W, x.dtype))


@njit(cache=True)
def row_sum_serial(x, out, mean):  # type: ignore[no-untyped-def]
    """``row_sum`` on one thread (same bits)."""
    lanes = np.empty(W, x.dtype)
    for r in range(x.shape[0]):
        _sum_row(x[r], r, out, mean, lanes)


@njit(parallel=True, cache=True)
def softmax(x, out, log):  # type: ignore[no-untyped-def]
    """Softmax or log-softmax of each row; the normaliser is an anchored lane sum."""
    for r in prange(x.shape[0]):
        _softmax_row(x[r], out[r], log, np.empty(W, x.dtype))


@njit(cache=True)
def softmax_serial(x, out, log):  # type: ignore[no-untyped-def]
    """``softmax`` on one thread (same bits)."""
    lanes = np.empty(W, x.dtype)
    for r in range(x.shape[0]):
        _softmax_row(x[r], out[r], log, lanes)


@njit(parallel=True, cache=True)
def rms_norm(x, weight, has_weight, eps, out):  # type: ignore[no-untyped-def]
    """y = x / sqrt(mean(x^2) + eps) * weight; sum of squares in lane order."""
    for r in prange(x.shape[0]):
        _rms_row(x[r], out[r], weight, has_weight, eps, np.empty(W, x.dtype))


@njit(cache=True)
def rms_norm_serial(x, weight, has_weight, eps, out):  # type: ignore[no-untyped-def]
    """``rms_norm`` on one thread (same bits)."""
    lanes = np.empty(W, x.dtype)
    for r in range(x.shape[0]):
        _rms_row(x[r], out[r], weight, has_weight, eps, lanes)


@njit(parallel=True, cache=True)
def layer_norm(x, weight, bias, has_weight, has_bias, eps, out):  # type: ignore[no-untyped-def]
    """y = (x - mean) / sqrt(var + eps) * weight + bias; two-pass, lane order sums."""
    for r in prange(x.shape[0]):
        _layer_norm_row(x[r], out[r], weight, bias, has_weight, has_bias, eps, np.empty(W, x.dtype))


@njit(cache=True)
def layer_norm_serial(x, weight, bias, has_weight, has_bias, eps, out):  # type: ignore[no-untyped-def]
    """``layer_norm`` on one thread (same bits)."""
    lanes = np.empty(W, x.dtype)
    for r in range(x.shape[0]):
        _layer_norm_row(x[r], out[r], weight, bias, has_weight, has_bias, eps, lanes)


@njit(parallel=True, cache=True)
def bmm(a, b, out):  # type: ignore[no-untyped-def]
    """out[n] = a[n] @ b[n] with acc = fma(a_k, b_k, acc) for k = 0..K-1 in order.

    ``a``: (B, M, K), ``b``: (B, K, N), ``out``: (B, M, N); all C-contiguous. Four rows
    share each loaded row of ``b``; each output element still sees k in order.
    """
    B, M, K = a.shape
    N = b.shape[2]
    MR = 4
    nblk = (M + MR - 1) // MR
    for t in prange(B * nblk):
        n = t // nblk
        i0 = (t % nblk) * MR
        rows = min(MR, M - i0)
        acc = np.zeros((MR, N), a.dtype)
        an = a[n]
        bn = b[n]
        if rows == MR:
            for k in range(K):
                a0 = an[i0, k]
                a1 = an[i0 + 1, k]
                a2 = an[i0 + 2, k]
                a3 = an[i0 + 3, k]
                bk = bn[k]
                for j in range(N):
                    bv = bk[j]
                    acc[0, j] = fma(a0, bv, acc[0, j])
                    acc[1, j] = fma(a1, bv, acc[1, j])
                    acc[2, j] = fma(a2, bv, acc[2, j])
                    acc[3, j] = fma(a3, bv, acc[3, j])
        else:
            for ii in range(rows):
                for k in range(K):
                    av = an[i0 + ii, k]
                    bk = bn[k]
                    for j in range(N):
                        acc[ii, j] = fma(av, bk[j], acc[ii, j])
        for ii in range(rows):
            for j in range(N):
                out[n, i0 + ii, j] = acc[ii, j]


@njit(cache=True, inline="always")
def _key_range(maskb, ms, mode, bi, h, i, Lk):  # type: ignore[no-untyped-def]
    """[first, last + 1) of the attended keys of one query (all keys unless a bool mask)."""
    if mode != 1:
        return 0, Lk
    base = bi * ms[0] + h * ms[1] + i * ms[2]
    lo = 0
    while lo < Lk and not maskb[base + lo * ms[3]]:
        lo += 1
    hi = Lk
    while hi > lo and not maskb[base + (hi - 1) * ms[3]]:
        hi -= 1
    return lo, hi


@njit(cache=True, inline="always")
def _scores_tiled(qblk, nq, kTb, jlo, jhi, s):  # type: ignore[no-untyped-def]
    """s[qi, j] = sequential-d FMA chain of q_qi . k_j for j in [jlo, jhi) (and up to KB past).

    Vectorised across the KB keys of a tile (``kTb`` is K transposed, keys padded to a
    multiple of KB with zeros); the QB queries share each loaded row of ``kTb``. Each
    score is still ``acc = fma(q[d], k[j, d], acc)`` for d = 0..D-1 from +0.0.
    """
    D = kTb.shape[0]
    acc = np.empty((QB, KB), s.dtype)
    jb = (jlo // KB) * KB
    while jb < jhi:
        for qi in range(QB):
            for w in range(KB):
                acc[qi, w] = 0.0
        for d in range(D):
            kd = kTb[d, jb : jb + KB]
            for qi in range(QB):
                qv = qblk[qi, d]
                for w in range(KB):
                    acc[qi, w] = fma(qv, kd[w], acc[qi, w])
        for qi in range(nq):
            for w in range(KB):
                s[qi, jb + w] = acc[qi, w]
        jb += KB


@njit(cache=True, inline="always")
def _scores_rows(qi_vec, kb, lo, hi, srow):  # type: ignore[no-untyped-def]
    """The same sequential-d FMA chains as ``_scores_tiled``, four keys at a time from K rows."""
    D = kb.shape[1]
    j = lo
    while j + 4 <= hi:
        k0 = kb[j]
        k1 = kb[j + 1]
        k2 = kb[j + 2]
        k3 = kb[j + 3]
        s0 = srow[j]  # +0.0 in the working dtype (srow arrives zeroed)
        s1 = s0
        s2 = s0
        s3 = s0
        for d in range(D):
            qd = qi_vec[d]
            s0 = fma(qd, k0[d], s0)
            s1 = fma(qd, k1[d], s1)
            s2 = fma(qd, k2[d], s2)
            s3 = fma(qd, k3[d], s3)
        srow[j] = s0
        srow[j + 1] = s1
        srow[j + 2] = s2
        srow[j + 3] = s3
        j += 4
    while j < hi:
        kj = kb[j]
        s0 = srow[j]
        for d in range(D):
            s0 = fma(qi_vec[d], kj[d], s0)
        srow[j] = s0
        j += 1


@njit(cache=True, inline="always")
def _probabilities(srow, lo, hi, jlo, jhi, base, maskb, maskf, ms, mode, scale):  # type: ignore[no-untyped-def]
    """Turn one query's raw scores in srow[lo:hi] into unnormalised probabilities.

    Entries of [jlo, jhi) outside [lo, hi) become 0 (they are skipped by P @ V). Returns
    (denominator, attended): the anchored lane sum of the probabilities, and False when
    no key has a score above -inf (the output row is then zeros, as torch's SDPA).
    """
    for j in range(jlo, lo):
        srow[j] = 0.0
    for j in range(hi, jhi):
        srow[j] = 0.0
    lanes = np.empty(W, srow.dtype)
    lanes[0] = -np.inf
    m = lanes[0]  # -inf in the working dtype, so that exp's argument is computed in it
    for j in range(lo, hi):
        sc = srow[j] * scale
        if mode == 1 and not maskb[base + j * ms[3]]:
            sc = -np.inf
        elif mode == 2:
            sc = sc + maskf[base + j * ms[3]]
        srow[j] = sc  # rounded to the working dtype here, once
        if srow[j] > m:
            m = srow[j]
    if m == -np.inf:
        for j in range(lo, hi):
            srow[j] = 0.0
        return srow[lo], False
    for j in range(lo, hi):
        srow[j] = exp_w(srow[j] - m)
    j0 = lo + first_nonzero(srow[lo:hi], hi - lo)
    return anchored_sum(srow, j0, hi, lanes), True


@njit(parallel=True, cache=True)
def attention(q, k, kT, tiled, v, maskb, maskf, ms, mode, scale, out):  # type: ignore[no-untyped-def]
    """Scaled dot-product attention; one task = up to QB queries of one (batch, head).

    ``q``: (B, H, Lq, D); ``k``: (B, Hk, Lk, D); ``v``: (B, Hk, Lk, Dv), contiguous;
    ``kT``: k transposed to (B, Hk, D, Lk padded to a multiple of KB with zeros) when
    ``tiled`` (otherwise unused); ``mode``: 0 no mask, 1 ``maskb`` (bool, False =
    masked), 2 ``maskf`` (added to the scaled score); both masks are flat arrays indexed
    with the element strides ``ms`` of a (B, H, Lq, Lk) view (zeros where broadcast).

    Per query, over its attended key range only: score of key j = sequential-d FMA
    chain of q . k_j from +0.0, times ``scale`` (plus the additive mask), rounded;
    p_j = exp(score_j - max); denominator = anchored lane sum of the p_j;
    out = (sum over attended j in key order of fma(p_j, v_j, acc)) / denominator,
    zero p_j skipped. The tiled and the row score paths execute the same operations
    per score, and which one runs never depends on anything but ``tiled``; a query's
    bits therefore do not depend on the other queries of its task, on padding keys,
    nor on decode vs prefill.
    """
    B, H, Lq, D = q.shape
    Hk = k.shape[1]
    Lk = k.shape[2]
    Dv = v.shape[3]
    group = H // Hk
    nqb = (Lq + QB - 1) // QB
    for t in prange(B * H * nqb):
        bi = t // (H * nqb)
        h = (t // nqb) % H
        i0 = (t % nqb) * QB
        nq = min(QB, Lq - i0)
        hk = h // group
        los = np.empty(QB, np.int64)
        his = np.empty(QB, np.int64)
        jlo = Lk
        jhi = 0
        for qi in range(nq):
            lo, hi = _key_range(maskb, ms, mode, bi, h, i0 + qi, Lk)
            los[qi] = lo
            his[qi] = hi
            if hi > lo:
                jlo = min(jlo, lo)
                jhi = max(jhi, hi)
        width = ((Lk + KB - 1) // KB) * KB
        s = np.zeros((QB, width), q.dtype)
        if tiled:
            qblk = np.zeros((QB, D), q.dtype)
            for qi in range(nq):
                for d in range(D):
                    qblk[qi, d] = q[bi, h, i0 + qi, d]
            if jhi > jlo:
                _scores_tiled(qblk, nq, kT[bi, hk], jlo, jhi, s)
        else:
            for qi in range(nq):
                _scores_rows(q[bi, h, i0 + qi], k[bi, hk], los[qi], his[qi], s[qi])
        denom = np.empty(QB, q.dtype)
        live = np.zeros(QB, np.bool_)
        for qi in range(nq):
            if his[qi] > los[qi]:
                base = bi * ms[0] + h * ms[1] + (i0 + qi) * ms[2]
                dn, ok = _probabilities(s[qi], los[qi], his[qi], jlo, jhi, base, maskb, maskf, ms, mode, scale)
                denom[qi] = dn
                live[qi] = ok
            else:
                for j in range(jlo, jhi):
                    s[qi, j] = 0.0
        acc = np.zeros((QB, Dv), q.dtype)
        vb = v[bi, hk]
        for j in range(jlo, jhi):
            vj = vb[j]
            for qi in range(nq):
                pj = s[qi, j]
                if pj != 0:
                    for d in range(Dv):
                        acc[qi, d] = fma(pj, vj[d], acc[qi, d])
        for qi in range(nq):
            if live[qi]:
                for d in range(Dv):
                    out[bi, h, i0 + qi, d] = acc[qi, d] / denom[qi]
            else:
                # No attended key (or none with a finite score): zeros, as torch's SDPA.
                for d in range(Dv):
                    out[bi, h, i0 + qi, d] = 0.0
