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
  Sums of squares and the row maximum use the same lanes from element 0.
* attention scores: one sequential FMA chain per score over the head dimension,
  ``acc = fma(q[d], k[j, d], acc)`` for d = 0..D-1 from +0.0, times the scale,
  rounded. Vectorised across keys (K transposed) when several queries share a task,
  read from K rows otherwise (decode): the same operations either way.
* batched matmul and attention's probabilities @ V: one accumulator per output element,
  starting at +0.0, ``acc = fma(a_k, b_k, acc)`` for k = 0..K-1 in order. Leading and
  trailing exact-zero terms leave the accumulator unchanged (attention skips them, so
  a masked key's value never enters, even inf or NaN).
* exp(x - max): for float32 rows ``exp32_of64``: x - max exact in float64, Cody-Waite
  reduction in float64, the fp32 FMA polynomial of ``docs/canonical-orders.md`` section
  2.4 on the reduced argument, one rounding of p * 2^n. float64 rows use ``exp64``
  (Cody-Waite reduction, degree-13 Taylor polynomial, scaling by two exact powers of
  two built from their bits). Both are basic IEEE operations only, so every loop
  position gives the same bits.

Entry points compile with ``error_model="numpy"``: IEEE division (x / 0 = +-inf or
NaN). numba's default raises ``ZeroDivisionError`` in the serial drivers only (its
parallel loops already divide as IEEE), so a zero row with ``eps=0`` raised for a small
input and gave NaN, as torch does, for a large one.

Where LLVM would keep an accumulator in memory (numba arrays are heap objects), the
inner loops are written as LLVM IR with vector registers (``tile_scores``, the P @ V
tiles, the lane loops): ``llvm.fma``/``fadd``/``fmul`` on vectors are lane-wise, so a
lane performs exactly the scalar operations it replaces, in the same order.

Arrays arrive as float32 or float64 (reduced precision is widened exactly before).
"""

from __future__ import annotations

import inspect

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload


W = 16
VL = 16  # attention tiles: lanes per LLVM vector
NV = 2  # attention tiles: vectors per query row of a tile
QB = 8  # attention: queries per task (they share each loaded key/value row)
KB = NV * VL  # attention: keys per score tile, value columns per P @ V tile

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


# float32 Taylor coefficients 1/2! .. 1/7! of canonical-orders section 2.4 (the
# portable Exp's polynomial, accurate on |r| <= 0.35).
_C2, _C3, _C4, _C5, _C6, _C7 = (
    np.uint32(b).view(np.float32) for b in (0x3F000000, 0x3E2AAAAB, 0x3D2AAAAB, 0x3C088889, 0x3AB60B61, 0x39500D01)
)
_ONE32 = np.float32(1.0)


@njit(cache=True, inline="always")
def exp32_of64(t: float) -> float:
    """exp(t) rounded to float32, for a float64 argument (softmax's exact x - max).

    The reduction t = n ln2 + r runs in float64 (so the argument is never rounded to
    float32 first: no error growing with |x - max|), r is rounded to float32 and the
    float32 FMA polynomial of the portable Exp gives exp(r); p * 2^n is exact in float64
    and rounded once. Basic IEEE operations only and branch free, so it vectorises.
    """
    tc = t if t > -104.0 else -104.0
    tc = tc if tc < 89.0 else 89.0
    kf = (tc * _LOG2E + _SHIFTER) - _SHIFTER
    r = np.float32((tc - kf * _LN2_HI) - kf * _LN2_LO)
    q = fma(_C7, r, _C6)
    q = fma(q, r, _C5)
    q = fma(q, r, _C4)
    q = fma(q, r, _C3)
    q = fma(q, r, _C2)
    q = fma(q, r, _ONE32)
    p = fma(q, r, _ONE32)
    res = np.float32(np.float64(p) * _pow2(np.int64(kf)))
    return res if t == t else np.float32(t)


def exp_diff(x, m):  # type: ignore[no-untyped-def]
    """exp(x - m) in the dtype of x: ``exp32_of64`` for float32, ``exp64`` for float64."""
    raise NotImplementedError("exp_diff is only callable from numba-compiled code")


@overload(exp_diff, inline="always")
def _exp_diff_impl(x, m):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return lambda x, m: exp32_of64(np.float64(x) - np.float64(m))
    if x == types.float64:
        return lambda x, m: exp64(x - m)
    return None


# llvmlite >= 0.44 (numba >= 0.61) loads through opaque pointers and takes the loaded type;
# older llvmlite rejects ``typ`` and reads the type from the typed pointer, the same one here.
_LOAD_TAKES_TYPE = "typ" in inspect.signature(ir.IRBuilder.load).parameters


def _load(builder, ptr, ty, **kwargs):  # type: ignore[no-untyped-def]
    return builder.load(ptr, typ=ty, **kwargs) if _LOAD_TAKES_TYPE else builder.load(ptr, **kwargs)


def _vec_helpers(builder, fty):  # type: ignore[no-untyped-def]
    """LLVM vector type of VL lanes, its fma intrinsic, unaligned load/store, broadcast."""
    vty = ir.VectorType(fty, VL)
    fname = f"llvm.fma.v{VL}{fty.intrinsic_name}"
    fma_v = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]), fname)

    def load_v(ptr):  # type: ignore[no-untyped-def]
        return _load(builder, builder.bitcast(ptr, vty.as_pointer()), vty, align=4)

    def store_v(val, ptr):  # type: ignore[no-untyped-def]
        builder.store(val, builder.bitcast(ptr, vty.as_pointer()), align=4)

    def splat(x):  # type: ignore[no-untyped-def]
        v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), VL), [0] * VL)
        return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)

    return vty, fma_v, load_v, store_v, splat


def _make_lane_loop(kind: str):  # type: ignore[no-untyped-def]
    """A lane loop over ``nchunks`` full chunks of W elements of ``x`` from ``start``.

    Lane w of the vector accumulator (loaded from and stored back to ``lanes``) takes
    element ``start + c * W + w`` of chunk c, in chunk order: exactly the scalar
    ``lanes[w] = op(lanes[w], x[j + w])`` loops it replaces, with the accumulator in a
    register. kind: "sum" (lane + x), "sumsq" (lane + x * x), "csq" (d = x - mu;
    lane + d * d, in mu's dtype), "max" (x if x > lane else lane, so NaN is never taken).
    """

    @intrinsic
    def lane_loop(typingctx, x, start, nchunks, lanes, mu):  # type: ignore[no-untyped-def]
        if not all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" for t in (x, lanes)):
            return None

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            xa = context.make_array(sig.args[0])(context, builder, args[0])
            la = context.make_array(sig.args[3])(context, builder, args[3])
            start_v, n_v, mu_v = args[1], args[2], args[4]
            i64 = ir.IntType(64)
            fty = context.get_value_type(sig.args[0].dtype)
            vty, _, load_v, store_v, splat = _vec_helpers(builder, fty)
            # "csq" runs in mu's dtype (float64 for float32 rows: d = x - mu, d * d and
            # lane + d * d in float64, rounded once into the float32 lane, as the scalar
            # loop it replaces).
            mty = context.get_value_type(sig.args[4])
            wide = mty != fty
            vmty = ir.VectorType(mty, W)
            mu_s = None
            if kind == "csq":
                mu_s = builder.insert_element(ir.Constant(vmty, ir.Undefined), mu_v, ir.Constant(ir.IntType(32), 0))
                zeros = ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W)
                mu_s = builder.shuffle_vector(mu_s, ir.Constant(vmty, ir.Undefined), zeros)
            init = load_v(la.data)
            pre = builder.basic_block
            head = builder.append_basic_block("lane.head")
            body = builder.append_basic_block("lane.body")
            done = builder.append_basic_block("lane.done")
            builder.branch(head)
            builder.position_at_end(head)
            c = builder.phi(i64)
            c.add_incoming(ir.Constant(i64, 0), pre)
            acc = builder.phi(vty)
            acc.add_incoming(init, pre)
            builder.cbranch(builder.icmp_signed("<", c, n_v), body, done)
            builder.position_at_end(body)
            off = builder.add(start_v, builder.mul(c, ir.Constant(i64, W)))
            v = load_v(builder.gep(xa.data, [off]))
            if kind == "sum":
                new = builder.fadd(acc, v)
            elif kind == "sumsq":
                new = builder.fadd(acc, builder.fmul(v, v))
            elif kind == "csq":
                xw = builder.fpext(v, vmty) if wide else v
                aw = builder.fpext(acc, vmty) if wide else acc
                dv = builder.fsub(xw, mu_s)
                new = builder.fadd(aw, builder.fmul(dv, dv))
                new = builder.fptrunc(new, vty) if wide else new
            else:
                new = builder.select(builder.fcmp_ordered(">", v, acc), v, acc)
            c.add_incoming(builder.add(c, ir.Constant(i64, 1)), body)
            acc.add_incoming(new, body)
            builder.branch(head)
            builder.position_at_end(done)
            store_v(acc, la.data)
            return context.get_dummy_value()

        return types.void(x, start, nchunks, lanes, mu), codegen

    return lane_loop


_lanes_sum = _make_lane_loop("sum")
_lanes_sumsq = _make_lane_loop("sumsq")
_lanes_csq = _make_lane_loop("csq")
_lanes_max = _make_lane_loop("max")


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
    nch = (stop - start) // W
    _lanes_sum(x, start, nch, lanes, lanes[0])
    full = start + nch * W
    for w in range(stop - full):
        lanes[w] = lanes[w] + x[full + w]
    return _tree(lanes)


@njit(cache=True, inline="always")
def _sumsq(x, n, lanes):  # type: ignore[no-untyped-def]
    for w in range(W):
        lanes[w] = 0.0
    nch = n // W
    _lanes_sumsq(x, 0, nch, lanes, lanes[0])
    full = nch * W
    for w in range(n - full):
        lanes[w] = lanes[w] + x[full + w] * x[full + w]
    return _tree(lanes)


@njit(cache=True, inline="always")
def _sum_centered_sq(x, n, mu, lanes):  # type: ignore[no-untyped-def]
    for w in range(W):
        lanes[w] = 0.0
    nch = n // W
    _lanes_csq(x, 0, nch, lanes, mu)
    full = nch * W
    for w in range(n - full):
        d = x[full + w] - mu
        lanes[w] = lanes[w] + d * d
    return _tree(lanes)


@njit(cache=True, inline="always")
def _row_max(x, start, stop, lanes):  # type: ignore[no-untyped-def]
    """Largest non-NaN value of x[start:stop] (-inf if none); max is exact, any order."""
    for w in range(W):
        lanes[w] = -np.inf
    nch = (stop - start) // W
    _lanes_max(x, start, nch, lanes, lanes[0])
    full = start + nch * W
    for w in range(stop - full):
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
def _canon(v):  # type: ignore[no-untyped-def]
    """``v``, or the positive quiet NaN if ``v`` is a NaN.

    A NaN's sign and payload depend on which NaN operand an instruction propagated, and
    torch widens a float16 NaN with its payload in its vector loop but as 0x7FFFFFFF in
    its scalar tail: without this a row's NaN bits depended on its place in the batch.
    Applied in the final stores, where the select vectorises (a separate pass over the
    output cost the row ops 18-24%).
    """
    return v if v == v else np.nan


@njit(cache=True, inline="always")
def _sum_row(row, r, out, mean, lanes):  # type: ignore[no-untyped-def]
    L = row.shape[0]
    s = anchored_sum(row, first_nonzero(row, L), L, lanes)
    out[r] = _canon(s / L if mean else s)


@njit(cache=True, inline="always")
def _softmax_row(row, o, log, lanes):  # type: ignore[no-untyped-def]
    L = row.shape[0]
    m = _row_max(row, 0, L, lanes)
    for j in range(L):
        o[j] = exp_diff(row[j], m)
    s = anchored_sum(o, first_nonzero(o, L), L, lanes)
    if log:
        ls = np.log(np.float64(s))
        m64 = np.float64(m)
        for j in range(L):
            o[j] = _canon((np.float64(row[j]) - m64) - ls)
    else:
        for j in range(L):
            o[j] = _canon(o[j] / s)


@njit(cache=True, inline="always")
def _rms_row(row, o, weight, has_weight, eps, lanes):  # type: ignore[no-untyped-def]
    L = row.shape[0]
    ms = _sumsq(row, L, lanes) / L
    inv = 1.0 / np.sqrt(np.float64(ms) + eps)
    if has_weight:
        for j in range(L):
            o[j] = _canon(np.float64(row[j]) * inv * np.float64(weight[j]))
    else:
        for j in range(L):
            o[j] = _canon(np.float64(row[j]) * inv)


@njit(cache=True, inline="always")
def _layer_norm_row(row, o, weight, bias, has_weight, has_bias, eps, lanes):  # type: ignore[no-untyped-def]
    L = row.shape[0]
    mu64 = anchored_sum(row, 0, L, lanes) / L  # float64 division of the lane sum
    # The squares are centred on the mean rounded to the working dtype: any centre c
    # gives the variance up to (mean - c)^2, negligible here, and keeps that pass in
    # the working dtype (vector width); the output is centred on the float64 mean.
    lanes[0] = mu64
    var = _sum_centered_sq(row, L, lanes[0], lanes) / L
    inv = 1.0 / np.sqrt(np.float64(var) + eps)
    # One loop per affine variant (no branch in the loop, so it vectorises).
    if has_weight and has_bias:
        for j in range(L):
            o[j] = _canon((np.float64(row[j]) - mu64) * inv * np.float64(weight[j]) + np.float64(bias[j]))
    elif has_weight:
        for j in range(L):
            o[j] = _canon((np.float64(row[j]) - mu64) * inv * np.float64(weight[j]))
    elif has_bias:
        for j in range(L):
            o[j] = _canon((np.float64(row[j]) - mu64) * inv + np.float64(bias[j]))
    else:
        for j in range(L):
            o[j] = _canon((np.float64(row[j]) - mu64) * inv)


@njit(parallel=True, cache=True, error_model="numpy")
def row_sum(x, out, mean):  # type: ignore[no-untyped-def]
    """out[r] = sum (or mean) of x[r, :], anchored lane order."""
    for r in prange(x.shape[0]):
        _sum_row(x[r], r, out, mean, np.empty(W, x.dtype))


@njit(cache=True, error_model="numpy")
def row_sum_serial(x, out, mean):  # type: ignore[no-untyped-def]
    """``row_sum`` on one thread (same bits)."""
    lanes = np.empty(W, x.dtype)
    for r in range(x.shape[0]):
        _sum_row(x[r], r, out, mean, lanes)


@njit(cache=True, inline="always")
def _cumsum_row(row, o, wide):  # type: ignore[no-untyped-def]
    if wide:
        s64 = np.float64(0.0)
        for j in range(row.shape[0]):
            s64 = s64 + np.float64(row[j])
            o[j] = _canon(s64)  # stored as o's dtype: float64, or rounded to float32
    else:
        s = row.dtype.type(0.0)
        for j in range(row.shape[0]):
            s = s + row[j]
            o[j] = _canon(s)


@njit(parallel=True, cache=True, error_model="numpy")
def row_cumsum(x, out, wide):  # type: ignore[no-untyped-def]
    """out[r, j] = x[r, 0] + ... + x[r, j]: one running sum per row, from +0.0, left to
    right, in float64 when ``wide`` (float32 and float64 inputs), else in x's dtype."""
    for r in prange(x.shape[0]):
        _cumsum_row(x[r], out[r], wide)


@njit(cache=True, error_model="numpy")
def row_cumsum_serial(x, out, wide):  # type: ignore[no-untyped-def]
    """``row_cumsum`` on one thread (same bits)."""
    for r in range(x.shape[0]):
        _cumsum_row(x[r], out[r], wide)


@njit(cache=True, inline="always")
def _solve_lower_one(at, bt, unit, xt):  # type: ignore[no-untyped-def]
    n, k = bt.shape
    for i in range(n):
        xi = xt[i]
        bi = bt[i]
        for c in range(k):
            xi[c] = bi[c]
        for j in range(i):
            m = -at[i, j]
            xj = xt[j]
            for c in range(k):
                xi[c] = fma(m, xj[c], xi[c])
        if not unit:
            d = at[i, i]
            for c in range(k):
                xi[c] = xi[c] / d
    for i in range(n):
        xi = xt[i]
        for c in range(k):
            xi[c] = _canon(xi[c])


@njit(parallel=True, cache=True, error_model="numpy")
def solve_lower(a, b, unit, out):  # type: ignore[no-untyped-def]
    """out[t] = the forward substitution of a[t] (lower) against b[t]: x[i, :] = b[i, :],
    then fma(-a[i, j], x[j, :], x[i, :]) for j = 0 .. i-1, then / a[i, i] unless ``unit``."""
    for t in prange(a.shape[0]):
        _solve_lower_one(a[t], b[t], unit, out[t])


@njit(cache=True, error_model="numpy")
def solve_lower_serial(a, b, unit, out):  # type: ignore[no-untyped-def]
    """``solve_lower`` on one thread (same bits)."""
    for t in range(a.shape[0]):
        _solve_lower_one(a[t], b[t], unit, out[t])


@njit(parallel=True, cache=True, error_model="numpy")
def softmax(x, out, log):  # type: ignore[no-untyped-def]
    """Softmax or log-softmax of each row; the normaliser is an anchored lane sum."""
    for r in prange(x.shape[0]):
        _softmax_row(x[r], out[r], log, np.empty(W, x.dtype))


@njit(cache=True, error_model="numpy")
def softmax_serial(x, out, log):  # type: ignore[no-untyped-def]
    """``softmax`` on one thread (same bits)."""
    lanes = np.empty(W, x.dtype)
    for r in range(x.shape[0]):
        _softmax_row(x[r], out[r], log, lanes)


@njit(parallel=True, cache=True, error_model="numpy")
def rms_norm(x, weight, has_weight, eps, out):  # type: ignore[no-untyped-def]
    """y = x / sqrt(mean(x^2) + eps) * weight; sum of squares in lane order."""
    for r in prange(x.shape[0]):
        _rms_row(x[r], out[r], weight, has_weight, eps, np.empty(W, x.dtype))


@njit(cache=True, error_model="numpy")
def rms_norm_serial(x, weight, has_weight, eps, out):  # type: ignore[no-untyped-def]
    """``rms_norm`` on one thread (same bits)."""
    lanes = np.empty(W, x.dtype)
    for r in range(x.shape[0]):
        _rms_row(x[r], out[r], weight, has_weight, eps, lanes)


@njit(parallel=True, cache=True, error_model="numpy")
def layer_norm(x, weight, bias, has_weight, has_bias, eps, out):  # type: ignore[no-untyped-def]
    """y = (x - mean) / sqrt(var + eps) * weight + bias; two-pass, lane order sums."""
    for r in prange(x.shape[0]):
        _layer_norm_row(x[r], out[r], weight, bias, has_weight, has_bias, eps, np.empty(W, x.dtype))


@njit(cache=True, error_model="numpy")
def layer_norm_serial(x, weight, bias, has_weight, has_bias, eps, out):  # type: ignore[no-untyped-def]
    """``layer_norm`` on one thread (same bits)."""
    lanes = np.empty(W, x.dtype)
    for r in range(x.shape[0]):
        _layer_norm_row(x[r], out[r], weight, bias, has_weight, has_bias, eps, lanes)


@njit(parallel=True, cache=True, error_model="numpy")
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


@intrinsic
def tile_scores(typingctx, qb, kt, s, jb):  # type: ignore[no-untyped-def]
    """s[a, jb + w] = fma chain over d = 0..D-1 of qb[a, d] * kt[d, jb + w], from +0.0.

    For all QB rows of ``qb`` (QB, D) and the KB keys jb..jb+KB-1 of ``kt`` (D, width):
    the QB x KB accumulators live in vector registers (QB * KB / VL of them), each
    lane one score's own sequential chain (``llvm.fma`` on vectors is lane-wise).
    """
    if not all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in (qb, kt, s)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        qa = context.make_array(sig.args[0])(context, builder, args[0])
        ka = context.make_array(sig.args[1])(context, builder, args[1])
        sa = context.make_array(sig.args[2])(context, builder, args[2])
        jbv = args[3]
        i64 = ir.IntType(64)
        D = cgutils.unpack_tuple(builder, qa.shape)[1]
        kw = cgutils.unpack_tuple(builder, ka.shape)[1]
        sw = cgutils.unpack_tuple(builder, sa.shape)[1]
        fty = context.get_value_type(sig.args[0].dtype)
        vty, fma_v, load_v, store_v, splat = _vec_helpers(builder, fty)
        zero = ir.Constant(vty, None)
        pre = builder.basic_block
        head = builder.append_basic_block("ts.head")
        body = builder.append_basic_block("ts.body")
        done = builder.append_basic_block("ts.done")
        builder.branch(head)
        builder.position_at_end(head)
        d = builder.phi(i64)
        d.add_incoming(ir.Constant(i64, 0), pre)
        accs = []
        for _ in range(QB * NV):
            p = builder.phi(vty)
            p.add_incoming(zero, pre)
            accs.append(p)
        builder.cbranch(builder.icmp_signed("<", d, D), body, done)
        builder.position_at_end(body)
        krow = builder.add(builder.mul(d, kw), jbv)
        kv = [load_v(builder.gep(ka.data, [builder.add(krow, ir.Constant(i64, b * VL))])) for b in range(NV)]
        new = []
        for a in range(QB):
            qv = _load(builder, builder.gep(qa.data, [builder.add(builder.mul(ir.Constant(i64, a), D), d)]), fty)
            qs = splat(qv)
            for b in range(NV):
                new.append(builder.call(fma_v, [qs, kv[b], accs[a * NV + b]]))
        dn = builder.add(d, ir.Constant(i64, 1))
        d.add_incoming(dn, body)
        for p, n in zip(accs, new):
            p.add_incoming(n, body)
        builder.branch(head)
        builder.position_at_end(done)
        for a in range(QB):
            base = builder.add(builder.mul(ir.Constant(i64, a), sw), jbv)
            for b in range(NV):
                store_v(accs[a * NV + b], builder.gep(sa.data, [builder.add(base, ir.Constant(i64, b * VL))]))
        return context.get_dummy_value()

    return types.void(qb, kt, s, jb), codegen


def _make_tile_pv(rows: int, nvec: int):  # type: ignore[no-untyped-def]
    """P @ V tile over ``rows`` query rows and ``nvec * VL`` value columns (see tile_pv)."""

    @intrinsic
    def tile(typingctx, s, v, jlo, jhi, acc, c0):  # type: ignore[no-untyped-def]
        """acc[a, c] = fma(s[a, j], v[j, c], acc[a, c]) for j = jlo..jhi-1 in order, where s[a, j] != 0.

        For rows a < ``rows`` of ``s`` and columns c0..c0+nvec*VL-1 of ``v``; accumulators in
        vector registers, loaded from and stored back to ``acc``. A zero probability is
        skipped (select, not fma): a masked key's value, even inf or NaN, never enters.
        """
        if not all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in (s, v, acc)):
            return None

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            sa = context.make_array(sig.args[0])(context, builder, args[0])
            va = context.make_array(sig.args[1])(context, builder, args[1])
            aa = context.make_array(sig.args[4])(context, builder, args[4])
            jlo_v, jhi_v, c0v = args[2], args[3], args[5]
            i64 = ir.IntType(64)
            sw = cgutils.unpack_tuple(builder, sa.shape)[1]
            vw = cgutils.unpack_tuple(builder, va.shape)[1]
            aw = cgutils.unpack_tuple(builder, aa.shape)[1]
            fty = context.get_value_type(sig.args[0].dtype)
            vty, fma_v, load_v, store_v, splat = _vec_helpers(builder, fty)
            init = []
            for a in range(rows):
                base = builder.add(builder.mul(ir.Constant(i64, a), aw), c0v)
                for b in range(nvec):
                    init.append(load_v(builder.gep(aa.data, [builder.add(base, ir.Constant(i64, b * VL))])))
            pre = builder.basic_block
            head = builder.append_basic_block("pv.head")
            body = builder.append_basic_block("pv.body")
            done = builder.append_basic_block("pv.done")
            builder.branch(head)
            builder.position_at_end(head)
            j = builder.phi(i64)
            j.add_incoming(jlo_v, pre)
            accs = []
            for x in init:
                p = builder.phi(vty)
                p.add_incoming(x, pre)
                accs.append(p)
            builder.cbranch(builder.icmp_signed("<", j, jhi_v), body, done)
            builder.position_at_end(body)
            vrow = builder.add(builder.mul(j, vw), c0v)
            vv = [load_v(builder.gep(va.data, [builder.add(vrow, ir.Constant(i64, b * VL))])) for b in range(nvec)]
            zf = ir.Constant(fty, 0.0)
            pjs, nzs = [], []
            for a in range(rows):
                pj = _load(builder, builder.gep(sa.data, [builder.add(builder.mul(ir.Constant(i64, a), sw), j)]), fty)
                pjs.append(pj)
                nzs.append(builder.fcmp_unordered("!=", pj, zf))
            allnz = nzs[0]
            for nz in nzs[1:]:
                allnz = builder.and_(allnz, nz)
            # Common case, no zero probability among the rows: plain fmas; otherwise a
            # select keeps the accumulator of a zero-probability row unchanged.
            fast = builder.append_basic_block("pv.fast")
            slow = builder.append_basic_block("pv.slow")
            latch = builder.append_basic_block("pv.latch")
            builder.cbranch(allnz, fast, slow)
            builder.position_at_end(fast)
            new_fast = []
            for a in range(rows):
                ps = splat(pjs[a])
                for b in range(nvec):
                    new_fast.append(builder.call(fma_v, [ps, vv[b], accs[a * nvec + b]]))
            builder.branch(latch)
            builder.position_at_end(slow)
            new_slow = []
            for a in range(rows):
                ps = splat(pjs[a])
                for b in range(nvec):
                    f = builder.call(fma_v, [ps, vv[b], accs[a * nvec + b]])
                    new_slow.append(builder.select(nzs[a], f, accs[a * nvec + b]))
            builder.branch(latch)
            builder.position_at_end(latch)
            new = []
            for nf, ns in zip(new_fast, new_slow):
                ph = builder.phi(vty)
                ph.add_incoming(nf, fast)
                ph.add_incoming(ns, slow)
                new.append(ph)
            jn = builder.add(j, ir.Constant(i64, 1))
            j.add_incoming(jn, latch)
            for p, n in zip(accs, new):
                p.add_incoming(n, latch)
            builder.branch(head)
            builder.position_at_end(done)
            for a in range(rows):
                base = builder.add(builder.mul(ir.Constant(i64, a), aw), c0v)
                for b in range(nvec):
                    store_v(accs[a * nvec + b], builder.gep(aa.data, [builder.add(base, ir.Constant(i64, b * VL))]))
            return context.get_dummy_value()

        return types.void(s, v, jlo, jhi, acc, c0), codegen

    return tile


# P @ V for a block of QB queries, KB columns at a time (prefill), and for one query,
# 128 or KB columns at a time (decode): the same per-element operations in the same order.
tile_pv = _make_tile_pv(QB, NV)
tile_pv1_wide = _make_tile_pv(1, 8)
tile_pv1 = _make_tile_pv(1, NV)


@njit(cache=True, inline="always")
def _scores_rows(qi_vec, kb, lo, hi, srow):  # type: ignore[no-untyped-def]
    """The same sequential-d FMA chains as ``tile_scores``, eight keys at a time from K rows.

    Eight independent chains keep both FMA units busy (one chain waits on its latency).
    """
    D = kb.shape[1]
    j = lo
    while j + 8 <= hi:
        k0 = kb[j]
        k1 = kb[j + 1]
        k2 = kb[j + 2]
        k3 = kb[j + 3]
        k4 = kb[j + 4]
        k5 = kb[j + 5]
        k6 = kb[j + 6]
        k7 = kb[j + 7]
        s0 = srow[j]  # +0.0 in the working dtype (srow arrives zeroed)
        s1 = s0
        s2 = s0
        s3 = s0
        s4 = s0
        s5 = s0
        s6 = s0
        s7 = s0
        for d in range(D):
            qd = qi_vec[d]
            s0 = fma(qd, k0[d], s0)
            s1 = fma(qd, k1[d], s1)
            s2 = fma(qd, k2[d], s2)
            s3 = fma(qd, k3[d], s3)
            s4 = fma(qd, k4[d], s4)
            s5 = fma(qd, k5[d], s5)
            s6 = fma(qd, k6[d], s6)
            s7 = fma(qd, k7[d], s7)
        srow[j] = s0
        srow[j + 1] = s1
        srow[j + 2] = s2
        srow[j + 3] = s3
        srow[j + 4] = s4
        srow[j + 5] = s5
        srow[j + 6] = s6
        srow[j + 7] = s7
        j += 8
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
    no key has a score above -inf (the output row is then zeros, as torch's SDPA); scores
    that are all NaN or -inf give NaN everywhere (denominator included).
    """
    for j in range(jlo, lo):
        srow[j] = 0.0
    for j in range(hi, jhi):
        srow[j] = 0.0
    # The scaled score (plus the additive mask) is computed in float64 and rounded to
    # the working dtype once; one loop per mask mode so that the common ones vectorise.
    if mode == 2:
        for j in range(lo, hi):
            srow[j] = srow[j] * scale + maskf[base + j * ms[3]]
    else:
        for j in range(lo, hi):
            srow[j] = srow[j] * scale
        if mode == 1:
            for j in range(lo, hi):
                if not maskb[base + j * ms[3]]:
                    srow[j] = -np.inf
    lanes = np.empty(W, srow.dtype)
    m = _row_max(srow, lo, hi, lanes)  # in the working dtype, so exp's argument is too
    if m == -np.inf:
        # No key above -inf: the row is zeros, as torch's SDPA. Unless every finite score is
        # NaN (a NaN query): NaN propagates, as in the CUDA kernels and the canonical order.
        nan = False
        for j in range(lo, hi):
            nan |= srow[j] != srow[j]
        for j in range(lo, hi):
            srow[j] = np.nan if nan else 0.0
        return srow[lo], nan
    for j in range(lo, hi):
        srow[j] = exp_diff(srow[j], m)
    j0 = lo + first_nonzero(srow[lo:hi], hi - lo)
    return anchored_sum(srow, j0, hi, lanes), True


@njit(parallel=True, cache=True, error_model="numpy")
def attention(q, k, kT, tiled, v, maskb, maskf, ms, mode, ranges, scale, out):  # type: ignore[no-untyped-def]
    """Scaled dot-product attention; one task = up to QB queries of one (batch, head).

    ``q``: (B, H, Lq, D); ``k``: (B, Hk, Lk, D); ``v``: (B, Hk, Lk, Dv), contiguous;
    ``kT``: k transposed to (B, Hk, D, Lk padded to a multiple of KB with zeros) when
    ``tiled`` (otherwise unused); ``mode``: 0 no mask, 1 ``maskb`` (bool, False =
    masked), 2 ``maskf`` (added to the scaled score); both masks are flat arrays indexed
    with the element strides ``ms`` of a (B, H, Lq, Lk) view (zeros where broadcast).
    ``ranges`` (B, H, Lq, 2): with a bool mask, each query's first attended key and
    last attended key + 1 (hi <= lo: none); keys outside are never read.

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
            lo, hi = 0, Lk
            if mode == 1:
                lo = ranges[bi, h, i0 + qi, 0]
                hi = ranges[bi, h, i0 + qi, 1]
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
            kTb = kT[bi, hk]
            jb = (jlo // KB) * KB
            while jb < jhi:
                tile_scores(qblk, kTb, s, jb)
                jb += KB
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
        if nq == 1 and Dv % (8 * VL) == 0:
            for c0 in range(0, Dv, 8 * VL):
                tile_pv1_wide(s, vb, jlo, jhi, acc, c0)
        elif nq == 1 and Dv % KB == 0:
            for c0 in range(0, Dv, KB):
                tile_pv1(s, vb, jlo, jhi, acc, c0)
        elif Dv % KB == 0:
            for c0 in range(0, Dv, KB):
                tile_pv(s, vb, jlo, jhi, acc, c0)
        else:
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
                    out[bi, h, i0 + qi, d] = _canon(acc[qi, d] / denom[qi])
            else:
                # No attended key (or none with a finite score): zeros, as torch's SDPA.
                for d in range(Dv):
                    out[bi, h, i0 + qi, d] = 0.0
