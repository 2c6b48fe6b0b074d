"""numba kernels implementing ``docs/canonical-orders.md`` (fp32 in, fp32 out).

Rules that keep these kernels equal to ``detkit.kernels.spec`` on every CPU:

* ``@njit`` **without** ``fastmath``: LLVM then has no ``reassoc``/``contract``/``nnan``
  flags and may neither reorder a floating-point expression nor fuse ``a * b + c``.
  The only fused operations are the explicit ``fma32`` calls (``llvm.fma.f32``).
* Every constant and every intermediate is float32 (numba would silently promote a
  float32 combined with a Python float or an int64 to float64).
* Vectorisation and threading only ever run *independent* chains side by side (lanes
  over output columns, over the 32 anchored lanes, over rows); no output's order of
  operations depends on the tile, the thread or the batch.
* Loops that must vectorise index from 0 (slices), so numba's negative-index
  wraparound check folds away.
* ``error_model="numpy"``: IEEE division (x / 0 = +-inf or NaN), as the spec says,
  instead of numba's default Python ``ZeroDivisionError``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from detkit.kernels._portable_llvm import (
    bits_to_f32,
    bits_to_f64,
    f32_to_bits,
    f64_to_bits,
    fma32,
    rint32,
    rint64,
)

F32 = np.float32
ZERO = F32(0.0)
ONE = F32(1.0)
TWO = F32(2.0)
HALF = F32(0.5)
INF = F32(np.inf)
NEG_INF = F32(-np.inf)
CANON_NAN = np.uint32(0x7FC00000).view(F32)
LOG2E = np.uint32(0x3FB8AA3B).view(F32)
LN2_HI = np.uint32(0x3F317200).view(F32)
LN2_LO = np.uint32(0x35BFBE8E).view(F32)
SQRT2 = np.uint32(0x3FB504F3).view(F32)
MIN_NORMAL = np.uint32(0x00800000).view(F32)
TWO23 = F32(2.0**23)
EXP_LO = F32(-104.0)
EXP_HI = F32(89.0)
C2 = np.uint32(0x3F000000).view(F32)
C3 = np.uint32(0x3E2AAAAB).view(F32)
C4 = np.uint32(0x3D2AAAAB).view(F32)
C5 = np.uint32(0x3C088889).view(F32)
C6 = np.uint32(0x3AB60B61).view(F32)
C7 = np.uint32(0x39500D01).view(F32)
T3, T5, T7, T9, T11, T13, T15, T17, T19 = (np.uint32(b).view(F32) for b in (
    0xbeaaaaab, 0x3e088889, 0xbd5d0dd1, 0x3cb327a4, 0xbc11371b,
    0x3b6b69e8, 0xbabed1b2, 0x3a1aac12, 0xb97abebc))
D1 = np.uint32(0x3F2AAAAB).view(F32)
D2 = np.uint32(0x3ECCCCCD).view(F32)
D3 = np.uint32(0x3E924925).view(F32)
D4 = np.uint32(0x3E638E39).view(F32)
E0, E1, E2, E3, E4, E5, E6 = (np.uint32(b).view(F32) for b in (
    0x3E0375D4, 0xBEC093A0, 0x3DE716B2, 0xBCDBFFDB, 0x3BAA1B19, 0xBA52A0F1, 0x38A6609F))
G0, G1, G2, G3, G4, G5, G6, G7, G8 = (np.uint32(b).view(F32) for b in (
    0x39AA25A8, 0xBF90AC34, 0xBF21BC6C, 0xBDE18BAA, 0x3CD8B5B6, 0xBB9C64EE, 0x3A1D487A, 0xB842F401, 0x35DEE9FF))
ERF_ONE_FROM = F32(3.875)
SQRT1_2 = np.uint32(0x3F3504F3).view(F32)
GELU_BETA = np.uint32(0x3F4C422A).view(F32)
GELU_KAPPA = np.uint32(0x3D372713).view(F32)
# 2/pi to 224 fraction bits as 32-bit words, least significant first, zero padded so that
# a 96-bit window starting anywhere in it reads whole words.
TWO_OVER_PI_WORDS = np.array([0xFE5163AB, 0x3C439041, 0xDB629599, 0xF534DDC0, 0xFC2757D1, 0x4E441529, 0xA2F9836E,
                              0, 0, 0], dtype=np.uint64)
PIO2_HI = np.uint32(0x3FC90FDB).view(F32)
PIO2_LO = np.uint32(0xB33BBD2E).view(F32)
S1, S2, S3, S4 = (np.uint32(b).view(F32) for b in (0xBE2AAAAB, 0x3C088887, 0xB95009D8, 0x3636DAFD))
K1, K2, K3, K4 = (np.uint32(b).view(F32) for b in (0xBF000000, 0x3D2AAAA7, 0xBAB6070A, 0x37CD3214))
TRIG_TINY = F32(2.0**-12)
TWO_M62 = F32(2.0**-62)
U32 = np.uint64(0xFFFFFFFF)
LANES = 32
# Pow (section 2.9) is binary64: its constants are float64 bit patterns, the spec's.
F64 = np.float64
POW_SQRT2, POW_LN2, POW_INV_LN2, POW_LN2_HI, POW_LN2_LO = (np.uint64(b).view(F64) for b in (
    0x3FF6A09E667F3BCD, 0x3FE62E42FEFA39EF, 0x3FF71547652B82FE, 0x3FE62E42FEE00000, 0x3DEA39EF35793C76))
L1, L2, L3, L4, L5, L6, L7, L8, L9, L10 = (np.uint64(b).view(F64) for b in (
    0x3FD5555555555555, 0x3FC999999999999A, 0x3FC2492492492492, 0x3FBC71C71C71C71C, 0x3FB745D1745D1746,
    0x3FB3B13B13B13B14, 0x3FB1111111111111, 0x3FAE1E1E1E1E1E1E, 0x3FAAF286BCA1AF28, 0x3FA8618618618618))
X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13 = (np.uint64(b).view(F64) for b in (
    0x3FE0000000000000, 0x3FC5555555555555, 0x3FA5555555555555, 0x3F81111111111111, 0x3F56C16C16C16C17,
    0x3F2A01A01A01A01A, 0x3EFA01A01A01A01A, 0x3EC71DE3A556C734, 0x3E927E4FB7789F5C, 0x3E5AE64567F544E4,
    0x3E21EED8EFF8D898, 0x3DE6124613A86D09))
ONE64 = F64(1.0)
TWO64 = F64(2.0)
HALF64 = F64(0.5)
ZERO64 = F64(0.0)
INF64 = F64(np.inf)
TWO53 = F64(2.0**53)
POW_T_LIMIT = F64(200.0)
MANTISSA64 = np.int64(0x000FFFFFFFFFFFFF)
ONE64_BITS = np.int64(0x3FF0000000000000)

# Tile sizes: fixed constants, never derived from M (batch size) or the thread count.
DOT_CHUNK = 256  # ChunkDot's chunk length (canonical-orders section 2.1): part of the spec
MATMUL_NB = 256
MATMUL_KB = DOT_CHUNK  # a K block is exactly one ChunkDot chunk
MATMUL_MB = 256  # rows sharing one packed B panel (more rows: fewer re-packs)
ROW_CHUNK = 4096

# Widening modes for packed matmul operands (raw bits in, fp32 out).
MODE_F32 = 0
MODE_BF16 = 1
MODE_F16 = 2


# ------------------------------------------------------------------ scalar functions


@njit(cache=True, error_model="numpy")
def exp_f32(x: float) -> float:
    """Exp of canonical-orders section 2.4, branch free so that loops vectorise."""
    xc = x if x > EXP_LO else EXP_LO
    xc = xc if xc < EXP_HI else EXP_HI
    n = rint32(xc * LOG2E)
    r = fma32(-n, LN2_HI, xc)
    r = fma32(-n, LN2_LO, r)
    q = fma32(C7, r, C6)
    q = fma32(q, r, C5)
    q = fma32(q, r, C4)
    q = fma32(q, r, C3)
    q = fma32(q, r, C2)
    q = fma32(q, r, ONE)
    p = fma32(q, r, ONE)
    ni = np.int32(n)
    n1 = ni >> np.int32(1)  # arithmetic shift: floor(n / 2)
    n2 = ni - n1
    s1 = bits_to_f32(np.int32((n1 + np.int32(127)) << np.int32(23)))
    s2 = bits_to_f32(np.int32((n2 + np.int32(127)) << np.int32(23)))
    y = (p * s1) * s2
    return y if x == x else x


@njit(cache=True, error_model="numpy")
def log_f32(x: float) -> float:
    """Log of canonical-orders section 2.5."""
    if x != x:
        return x
    if x < ZERO:
        return CANON_NAN
    if x == ZERO:
        return NEG_INF
    if x == INF:
        return INF
    k = np.int32(0)
    if x < MIN_NORMAL:
        x = x * TWO23
        k = np.int32(-23)
    bits = f32_to_bits(x)
    e = np.int32((bits >> np.int32(23)) - np.int32(127))
    m = bits_to_f32(np.int32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F800000)))
    if m > SQRT2:
        m = m * HALF
        e = np.int32(e + np.int32(1))
    f = m - ONE
    s = f / (TWO + f)
    z = s * s
    t = fma32(D4, z, D3)
    t = fma32(t, z, D2)
    t = fma32(t, z, D1)
    big_r = t * z
    hfsq = (HALF * f) * f
    dk = F32(e + k)
    u = fma32(s, hfsq + big_r, dk * LN2_LO)
    return ((u - hfsq) + f) + dk * LN2_HI


@njit(cache=True, error_model="numpy")
def tanh_f32(x: float) -> float:
    """tanh of canonical-orders section 3 (elementwise)."""
    a = abs(x)
    z = x * x
    q = fma32(T19, z, T17)
    q = fma32(q, z, T15)
    q = fma32(q, z, T13)
    q = fma32(q, z, T11)
    q = fma32(q, z, T9)
    q = fma32(q, z, T7)
    q = fma32(q, z, T5)
    q = fma32(q, z, T3)
    small = x if x == ZERO else fma32(x, q * z, x)  # keeps -0 (the fma gives +0)
    t = ONE - TWO / (exp_f32(a + a) + ONE)
    big = t if x > ZERO else -t
    return small if a < HALF else big


@njit(cache=True, error_model="numpy")
def erf_f32(x: float) -> float:
    """Erf of canonical-orders section 2.6; both branches computed, then selected, so
    that loops vectorise."""
    a = abs(x)
    z = x * x
    q = fma32(E6, z, E5)
    q = fma32(q, z, E4)
    q = fma32(q, z, E3)
    q = fma32(q, z, E2)
    q = fma32(q, z, E1)
    q = fma32(q, z, E0)
    small = fma32(x, q, x)
    p = fma32(G8, a, G7)
    p = fma32(p, a, G6)
    p = fma32(p, a, G5)
    p = fma32(p, a, G4)
    p = fma32(p, a, G3)
    p = fma32(p, a, G2)
    p = fma32(p, a, G1)
    p = fma32(p, a, G0)
    t = ONE - exp_f32(p)
    t = t if a < ERF_ONE_FROM else ONE
    big = t if x > ZERO else -t
    y = small if a < ONE else big
    return y if x == x else x


@njit(cache=True, error_model="numpy")
def gelu_f32(x: float) -> float:
    return (x * HALF) * (ONE + erf_f32(x * SQRT1_2))


@njit(cache=True, error_model="numpy")
def gelu_tanh_f32(x: float) -> float:
    x3 = (x * x) * x
    return (HALF * x) * (ONE + tanh_f32(GELU_BETA * (x + GELU_KAPPA * x3)))


@njit(cache=True, error_model="numpy")
def sin_cos_f32(x: float, want_cos: bool) -> float:
    """Sin or Cos of canonical-orders section 2.7: an exact reduction by 2/pi in 64-bit
    integer arithmetic (wraparound as the spec writes it), then polynomials in r^2."""
    a = abs(x)
    if not a < INF:  # inf or NaN
        return CANON_NAN
    if a < TRIG_TINY:
        return ONE if want_cos else x
    bits = np.uint64(f32_to_bits(a))
    m = (bits & np.uint64(0x7FFFFF)) | np.uint64(0x800000)
    t = np.uint64(130) + np.uint64(150) - (bits >> np.uint64(23))  # 224 - (e + 94), e = exponent - 150
    wq = t >> np.uint64(5)
    wr = t & np.uint64(31)
    words = TWO_OVER_PI_WORDS
    w0 = (((words[wq + np.uint64(1)] << np.uint64(32)) | words[wq]) >> wr) & U32
    w1 = (((words[wq + np.uint64(2)] << np.uint64(32)) | words[wq + np.uint64(1)]) >> wr) & U32
    w2 = (((words[wq + np.uint64(3)] << np.uint64(32)) | words[wq + np.uint64(2)]) >> wr) & U32
    v = ((m * w0) >> np.uint64(32)) + m * w1 + ((m * w2) << np.uint64(32))  # mod 2^64
    k = (v + (np.uint64(1) << np.uint64(61))) >> np.uint64(62)
    f = np.int64(v - (k << np.uint64(62)))
    hi = F32(f)
    lo = F32(f - np.int64(hi))
    r = fma32(hi, PIO2_HI, fma32(hi, PIO2_LO, lo * PIO2_HI)) * TWO_M62
    z = r * r
    sp = fma32(S4, z, S3)
    sp = fma32(sp, z, S2)
    sp = fma32(sp, z, S1)
    sn = fma32(r * z, sp, r)
    cp = fma32(K4, z, K3)
    cp = fma32(cp, z, K2)
    cp = fma32(cp, z, K1)
    cs = fma32(z, cp, ONE)
    q = np.int64(k & np.uint64(3))
    if want_cos:
        y = cs if q == 0 else (-sn if q == 1 else (-cs if q == 2 else sn))
        return y
    y = sn if q == 0 else (cs if q == 1 else (-sn if q == 2 else -cs))
    return y if x > ZERO else -y


@njit(cache=True, error_model="numpy")
def log1p_f32(x: float) -> float:
    """log1p of canonical-orders section 3: Log(1 + x) corrected by x / ((1 + x) - 1)."""
    u = ONE + x
    if u == ONE:
        return x
    if u == INF:
        return u  # the formula would give inf * NaN
    return log_f32(u) * (x / (u - ONE))


@njit(cache=True, error_model="numpy")
def softplus_f32(x: float) -> float:
    """softplus of canonical-orders section 3 (torch's defaults: beta 1, threshold 20):
    log1p(Exp(x)), whose 1 + Exp(x) is finite below the threshold."""
    if x > F32(20.0):
        return x
    return log1p_f32(exp_f32(x))


@njit(cache=True, error_model="numpy")
def _odd_integer64(y: float) -> bool:
    return abs(y) < TWO53 and rint64(y) == y and rint64(y * HALF64) != y * HALF64


@njit(cache=True, error_model="numpy")
def pow_f32(x: float, y: float) -> float:
    """Pow of section 2.9: fp32 ``x``, binary64 ``y``, binary64 arithmetic, one rounding."""
    xd = F64(x)
    if y == ZERO64 or xd == ONE64:
        return ONE
    if xd != xd or y != y:
        return CANON_NAN
    if y == TWO64:
        return np.float32(xd * xd)  # exact in binary64: fp32's x * x
    odd = _odd_integer64(y)
    if abs(y) == INF64:
        if xd == -ONE64:
            return ONE
        return INF if (abs(xd) < ONE64) == (y < ZERO64) else ZERO
    if xd == ZERO64 or abs(xd) == INF64:
        mag = INF if (xd == ZERO64) == (y < ZERO64) else ZERO
        return -mag if odd and f32_to_bits(x) < np.int32(0) else mag  # x's sign, -0.0 included
    if xd < ZERO64 and rint64(y) != y:
        return CANON_NAN
    res = _pow_positive(abs(xd), y)
    return -res if xd < ZERO64 and odd else res


@njit(cache=True, error_model="numpy")
def _pow_plain(x: float, y: float) -> bool:
    """Pow(x, y) is _pow_positive(x, y): x finite, positive and not 1; y finite, not 0 or 2."""
    return x > ZERO and x < INF and x != ONE and abs(y) < INF64 and y != ZERO64 and y != TWO64


@njit(cache=True, error_model="numpy")
def _pow_positive(a: float, y: float) -> float:
    """The general path of Pow for a finite a > 0 and a finite y, without branches (so that
    loops over it vectorise): log(a) by the atanh series, y log(a), exp by Cody-Waite."""
    bits = f64_to_bits(a)  # a normal binary64 (fp32 subnormals included)
    e = (bits >> np.int64(52)) - np.int64(1023)
    m = bits_to_f64((bits & MANTISSA64) | ONE64_BITS)  # a = m * 2^e, m in [1, 2)
    big = m > POW_SQRT2
    m = m * HALF64 if big else m
    e = e + np.int64(1) if big else e
    f = m - ONE64
    s = f / (TWO64 + f)
    z = s * s
    q = L10
    q = q * z + L9
    q = q * z + L8
    q = q * z + L7
    q = q * z + L6
    q = q * z + L5
    q = q * z + L4
    q = q * z + L3
    q = q * z + L2
    q = q * z + L1
    s2 = s + s
    lm = s2 + s2 * (z * q)
    t = y * (F64(e) * POW_LN2 + lm)
    t = min(max(t, -POW_T_LIMIT), POW_T_LIMIT)
    k = rint64(t * POW_INV_LN2)
    r = (t - k * POW_LN2_HI) - k * POW_LN2_LO
    p = X13
    p = p * r + X12
    p = p * r + X11
    p = p * r + X10
    p = p * r + X9
    p = p * r + X8
    p = p * r + X7
    p = p * r + X6
    p = p * r + X5
    p = p * r + X4
    p = p * r + X3
    p = p * r + X2
    p = p * r + ONE64
    p = p * r + ONE64
    w = p * bits_to_f64((np.int64(k) + np.int64(1023)) << np.int64(52))  # exact: 2^k is normal
    return np.float32(w)


@njit(cache=True, error_model="numpy")
def canon(y: float) -> float:
    return y if y == y else CANON_NAN


# ------------------------------------------------------------------ row building blocks


@njit(cache=True, error_model="numpy")
def _anchor(v: np.ndarray) -> int:
    """First index with v[j] != 0 (NaN counts as nonzero); len(v) if none."""
    j = 0
    n = v.shape[0]
    while j < n and v[j] == ZERO:
        j += 1
    return j


@njit(cache=True, error_model="numpy")
def _tree(lanes: np.ndarray) -> float:
    h = LANES // 2
    while h >= 1:
        for idx in range(h):
            lanes[idx] = lanes[idx] + lanes[idx + h]
        h //= 2
    return lanes[0]


@njit(cache=True, error_model="numpy")
def anchored_sum(v: np.ndarray, lanes: np.ndarray) -> float:
    """AnchoredSum (section 2.2); ``lanes`` is a float32[32] scratch buffer."""
    j0 = _anchor(v)
    if j0 == v.shape[0]:
        return ZERO
    w = v[j0:]
    n = w.shape[0]
    lanes[:] = ZERO
    full = n - n % LANES
    for base in range(0, full, LANES):
        blk = w[base:base + LANES]
        for idx in range(LANES):
            lanes[idx] = lanes[idx] + blk[idx]
    tail = w[full:]
    for idx in range(tail.shape[0]):
        lanes[idx] = lanes[idx] + tail[idx]
    return _tree(lanes)


@njit(cache=True, error_model="numpy")
def anchored_sum_sq(v: np.ndarray, lanes: np.ndarray) -> float:
    """AnchoredSumSq (section 2.2): lane = fma(v, v, lane)."""
    j0 = _anchor(v)
    if j0 == v.shape[0]:
        return ZERO
    w = v[j0:]
    n = w.shape[0]
    lanes[:] = ZERO
    full = n - n % LANES
    for base in range(0, full, LANES):
        blk = w[base:base + LANES]
        for idx in range(LANES):
            lanes[idx] = fma32(blk[idx], blk[idx], lanes[idx])
    tail = w[full:]
    for idx in range(tail.shape[0]):
        lanes[idx] = fma32(tail[idx], tail[idx], lanes[idx])
    return _tree(lanes)


@njit(cache=True, error_model="numpy")
def ieee_maximum(v: np.ndarray, lanes: np.ndarray) -> float:
    """IEEE 754-2019 maximum of v (NaN-propagating, -0 < +0). Exact, so lanes are free.

    ``lanes`` is float32[64] scratch: 32 running maxima and 32 NaN probes (x - x is
    NaN exactly for NaN and +-inf, and NaN sticks), all independent so they vectorise.
    """
    n = v.shape[0]
    mx = lanes[:LANES]
    probe = lanes[LANES:]
    mx[:] = NEG_INF
    probe[:] = ZERO
    full = n - n % LANES
    for base in range(0, full, LANES):
        blk = v[base:base + LANES]
        for idx in range(LANES):
            x = blk[idx]
            mx[idx] = x if x > mx[idx] else mx[idx]
            probe[idx] = probe[idx] + (x - x)
    tail = v[full:]
    for idx in range(tail.shape[0]):
        x = tail[idx]
        mx[idx] = x if x > mx[idx] else mx[idx]
        probe[idx] = probe[idx] + (x - x)
    m = NEG_INF
    any_special = False
    for idx in range(LANES):
        m = mx[idx] if mx[idx] > m else m
        any_special = any_special or probe[idx] != probe[idx]
    if any_special:  # some +-inf or NaN: find out whether there is a NaN
        for j in range(n):
            if v[j] != v[j]:
                return v[j]
    if m == ZERO:
        for j in range(n):
            if v[j] == ZERO and f32_to_bits(v[j]) == np.int32(0):
                return ZERO
        return -ZERO
    return m


# ------------------------------------------------------------------ input widening


def as_f32(v: np.ndarray, buf: np.ndarray, mode: int) -> np.ndarray:
    """A float32 view of the 1-D array ``v``: ``v`` itself if it is float32, else its
    raw bf16/fp16 bits (int16) widened exactly into ``buf`` (resolved at compile time)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(as_f32)
def _as_f32_impl(v, buf, mode):  # type: ignore[no-untyped-def]
    if isinstance(v, types.Array) and v.dtype == types.float32:
        return lambda v, buf, mode: v

    def widen_into(v, buf, mode):  # type: ignore[no-untyped-def]
        n = v.shape[0]
        out = buf[:n]
        for j in range(n):
            out[j] = _widen(v[j], mode)
        return out

    return widen_into


# ------------------------------------------------------------------ row ops
# Every kernel works on a range of rows / elements / tiles given by its last two
# arguments and releases the GIL; ``portable_cpu`` splits the range over threads.


@njit(cache=True, nogil=True, error_model="numpy")
def row_sum_rows(x: np.ndarray, mode: int, mean: bool, out: np.ndarray, r0: int, r1: int) -> None:
    flen = F32(x.shape[1])
    lanes = np.empty(LANES, dtype=F32)
    buf = np.empty(x.shape[1], dtype=F32)
    for r in range(r0, r1):
        s = anchored_sum(as_f32(x[r], buf, mode), lanes)
        out[r] = canon(s / flen if mean else s)


@njit(cache=True, nogil=True, error_model="numpy")
def row_cumsum_rows(x: np.ndarray, mode: int, out: np.ndarray, r0: int, r1: int) -> None:
    # The one float64 kernel: float32 inputs are summed in float64, as torch's CPU kernel
    # sums them (section 3, cumsum); bfloat16/float16 ones in float32.
    length = x.shape[1]
    buf = np.empty(length, dtype=F32)
    for r in range(r0, r1):
        xr = as_f32(x[r], buf, mode)
        yr = out[r]
        if mode == MODE_F32:
            s64 = np.float64(0.0)
            for j in range(length):
                s64 = s64 + np.float64(xr[j])
                yr[j] = canon(np.float32(s64))
        else:
            s = ZERO
            for j in range(length):
                s = s + xr[j]
                yr[j] = canon(s)


@njit(cache=True, nogil=True, error_model="numpy")
def solve_lower(a: np.ndarray, b: np.ndarray, unit: bool, out: np.ndarray, t0: int, t1: int) -> None:
    """Forward substitution (section 3, solve_triangular) of batch entries t0 .. t1-1:
    x[i, :] = b[i, :], then fma(-a[i, j], x[j, :], x[i, :]) for j = 0 .. i-1, then / a[i, i]
    unless ``unit``. The lanes of the inner loop are the right-hand side's columns, each
    its own chain."""
    n, k = b.shape[1], b.shape[2]
    for t in range(t0, t1):
        at, bt, xt = a[t], b[t], out[t]
        for i in range(n):
            xi = xt[i]
            bi = bt[i]
            for c in range(k):
                xi[c] = bi[c]
            for j in range(i):
                m = -at[i, j]
                xj = xt[j]
                for c in range(k):
                    xi[c] = fma32(m, xj[c], xi[c])
            if not unit:
                d = at[i, i]
                for c in range(k):
                    xi[c] = xi[c] / d
        for i in range(n):
            xi = xt[i]
            for c in range(k):
                xi[c] = canon(xi[c])


@njit(cache=True, nogil=True, error_model="numpy")
def softmax_rows(x: np.ndarray, mode: int, log: bool, out: np.ndarray, r0: int, r1: int) -> None:
    length = x.shape[1]
    lanes = np.empty(2 * LANES, dtype=F32)
    buf = np.empty(length, dtype=F32)
    for r in range(r0, r1):
        xr = as_f32(x[r], buf, mode)
        yr = out[r]
        m = ieee_maximum(xr, lanes)
        for j in range(length):
            yr[j] = exp_f32(xr[j] - m)
        s = anchored_sum(yr, lanes[:LANES])
        if log:
            ls = log_f32(s)
            for j in range(length):
                yr[j] = canon((xr[j] - m) - ls)
        else:
            for j in range(length):
                yr[j] = canon(yr[j] / s)


@njit(cache=True, nogil=True, error_model="numpy")
def rms_norm_rows(x: np.ndarray, mode: int, weight: np.ndarray, has_weight: bool, eps: float,
                  out: np.ndarray, r0: int, r1: int) -> None:
    length = x.shape[1]
    flen = F32(length)
    lanes = np.empty(LANES, dtype=F32)
    buf = np.empty(length, dtype=F32)
    for r in range(r0, r1):
        xr = as_f32(x[r], buf, mode)
        yr = out[r]
        ss = anchored_sum_sq(xr, lanes)
        rr = ONE / np.sqrt(ss / flen + eps)
        if has_weight:
            for j in range(length):
                yr[j] = canon((xr[j] * rr) * weight[j])
        else:
            for j in range(length):
                yr[j] = canon(xr[j] * rr)


@njit(cache=True, nogil=True, error_model="numpy")
def layer_norm_rows(x: np.ndarray, mode: int, weight: np.ndarray, has_weight: bool,
                    bias: np.ndarray, has_bias: bool, eps: float, out: np.ndarray, r0: int,
                    r1: int) -> None:
    length = x.shape[1]
    flen = F32(length)
    lanes = np.empty(LANES, dtype=F32)
    buf = np.empty(length, dtype=F32)
    for r in range(r0, r1):
        xr = as_f32(x[r], buf, mode)
        yr = out[r]
        mu = anchored_sum(xr, lanes) / flen
        for j in range(length):
            yr[j] = xr[j] - mu
        var = anchored_sum_sq(yr, lanes) / flen
        rr = ONE / np.sqrt(var + eps)
        if has_weight and has_bias:  # one fused rounding for the affine step
            for j in range(length):
                yr[j] = canon(fma32(yr[j] * rr, weight[j], bias[j]))
        else:
            for j in range(length):
                t = yr[j] * rr
                if has_weight:
                    t = t * weight[j]
                if has_bias:
                    t = t + bias[j]
                yr[j] = canon(t)


# ------------------------------------------------------------------ elementwise


@njit(cache=True, nogil=True, error_model="numpy")
def elementwise_range(op: int, x: np.ndarray, mode: int, out: np.ndarray, lo: int, hi: int) -> None:
    """op: 0 exp, 1 log, 2 rsqrt, 3 sigmoid, 4 silu, 5 tanh, 6 erf, 7 gelu, 8 gelu_tanh,
    9 sin, 10 cos, 11 cube, 12 softplus, 13 log1p on x[lo:hi] (flat; float32 or raw bf16/fp16
    bits), in blocks of ROW_CHUNK."""
    buf = np.empty(ROW_CHUNK, dtype=F32)
    for c0 in range(lo, hi, ROW_CHUNK):
        c1 = min(hi, c0 + ROW_CHUNK)
        xs = as_f32(x[c0:c1], buf, mode)
        ys = out[c0:c1]
        if op == 0:
            for j in range(xs.shape[0]):
                ys[j] = canon(exp_f32(xs[j]))
        elif op == 1:
            for j in range(xs.shape[0]):
                ys[j] = canon(log_f32(xs[j]))
        elif op == 2:
            for j in range(xs.shape[0]):
                ys[j] = canon(ONE / np.sqrt(xs[j]))
        elif op == 3:
            for j in range(xs.shape[0]):
                ys[j] = canon(ONE / (ONE + exp_f32(-xs[j])))
        elif op == 4:
            for j in range(xs.shape[0]):
                v = xs[j]
                ys[j] = canon(v / (ONE + exp_f32(-v)))
        elif op == 5:
            for j in range(xs.shape[0]):
                ys[j] = canon(tanh_f32(xs[j]))
        elif op == 6:
            for j in range(xs.shape[0]):
                ys[j] = canon(erf_f32(xs[j]))
        elif op == 7:
            for j in range(xs.shape[0]):
                ys[j] = canon(gelu_f32(xs[j]))
        elif op == 8:
            for j in range(xs.shape[0]):
                ys[j] = canon(gelu_tanh_f32(xs[j]))
        elif op == 9 or op == 10:
            want_cos = op == 10
            for j in range(xs.shape[0]):
                ys[j] = canon(sin_cos_f32(xs[j], want_cos))
        elif op == 11:
            for j in range(xs.shape[0]):
                v = xs[j]
                ys[j] = canon((v * v) * v)
        elif op == 12:
            for j in range(xs.shape[0]):
                ys[j] = canon(softplus_f32(xs[j]))
        else:
            for j in range(xs.shape[0]):
                ys[j] = canon(log1p_f32(xs[j]))


@njit(cache=True, nogil=True, error_model="numpy")
def pow_range(x: np.ndarray, y: np.ndarray, y_scalar: float, y_is_scalar: bool, mode: int, out: np.ndarray,
              lo: int, hi: int) -> None:
    """Pow (section 2.9) of x[lo:hi] to y[lo:hi], or to the binary64 ``y_scalar`` for every
    element (flat; x and y float32 or raw bf16/fp16 bits of one dtype), in blocks of ROW_CHUNK.
    The one binary64 elementwise kernel."""
    xbuf = np.empty(ROW_CHUNK, dtype=F32)
    ybuf = np.empty(ROW_CHUNK, dtype=F32)
    for c0 in range(lo, hi, ROW_CHUNK):
        c1 = min(hi, c0 + ROW_CHUNK)
        xs = as_f32(x[c0:c1], xbuf, mode)
        ys = out[c0:c1]
        # The general path for every element (a loop without branches, which vectorises),
        # then the special cases (zeros, infinities, NaN, negative bases, 1, y in {0, 2})
        # element by element: same bits as pow_f32 for each.
        if y_is_scalar:
            for j in range(xs.shape[0]):
                ys[j] = _pow_positive(abs(F64(xs[j])), y_scalar)
            for j in range(xs.shape[0]):
                if not _pow_plain(xs[j], y_scalar):
                    ys[j] = canon(pow_f32(xs[j], y_scalar))
        else:
            es = as_f32(y[c0:c1], ybuf, mode)
            for j in range(xs.shape[0]):
                ys[j] = _pow_positive(abs(F64(xs[j])), F64(es[j]))
            for j in range(xs.shape[0]):
                if not _pow_plain(xs[j], F64(es[j])):
                    ys[j] = canon(pow_f32(xs[j], F64(es[j])))


# ------------------------------------------------------------------ float16 <-> float32
# In integer arithmetic rather than LLVM's ``half`` type: on baseline x86-64 LLVM lowers
# half conversions to compiler-rt helpers that numba's JIT cannot resolve.

TWO_M24 = F32(2.0**-24)


@njit(cache=True, error_model="numpy")
def half_bits_to_f32(h: int) -> float:
    """Exact widening of binary16 bits (low 16 bits of h) to fp32."""
    h = np.int32(h) & np.int32(0xFFFF)
    sign = (h & np.int32(0x8000)) << np.int32(16)
    e = (h >> np.int32(10)) & np.int32(0x1F)
    m = h & np.int32(0x3FF)
    normal = bits_to_f32(np.int32(sign | ((e + np.int32(112)) << np.int32(23)) | (m << np.int32(13))))
    special = bits_to_f32(np.int32(sign | np.int32(0x7F800000) | (m << np.int32(13))))
    tiny = F32(m) * TWO_M24  # zero or subnormal: m * 2**-24, exact
    tiny = -tiny if sign != 0 else tiny
    return special if e == 31 else (tiny if e == 0 else normal)


@njit(cache=True, error_model="numpy")
def f32_to_half_bits(v: float) -> int:
    """Round fp32 to binary16 bits, nearest even (NaN handled by the caller)."""
    bits = f32_to_bits(v)
    sign = (bits >> np.int32(16)) & np.int32(0x8000)
    u = bits & np.int32(0x7FFFFFFF)
    # normal range: rebias the exponent, round off 13 bits (carries are correct)
    r = u - np.int32(0x38000000)
    normal = (r + np.int32(0x0FFF) + ((r >> np.int32(13)) & np.int32(1))) >> np.int32(13)
    # subnormal range: |v| + 0.5 rounds |v| to a multiple of 2**-24 (the ulp of 0.5)
    t = bits_to_f32(u) + HALF
    sub = f32_to_bits(t) - np.int32(0x3F000000)
    mag = np.int32(0x7C00) if u >= np.int32(0x477FF000) else (normal if u >= np.int32(0x38800000) else sub)
    return np.int32(sign | mag)


# ------------------------------------------------------------------ output rounding


@njit(cache=True, nogil=True, error_model="numpy")
def round_out_range(y: np.ndarray, mode: int, out: np.ndarray, lo: int, hi: int) -> None:
    """Round fp32 ``y[lo:hi]`` once, to nearest even, into bf16 (mode 1) or fp16 (mode 2)
    bits (int16 ``out``). NaN becomes the canonical 0x7FC0 / 0x7E00. Done here rather
    than by torch because torch's fp32 -> bf16 conversion of NaN differs between its
    CPU paths (0xFFFF on AVX-512 here)."""
    ys = y[lo:hi]
    os = out[lo:hi]
    if mode == MODE_BF16:
        for j in range(ys.shape[0]):
            v = ys[j]
            u = f32_to_bits(v)
            r = (u + np.int32(0x7FFF) + ((u >> np.int32(16)) & np.int32(1))) >> np.int32(16)
            os[j] = np.int16(r) if v == v else np.int16(0x7FC0)
    else:
        for j in range(ys.shape[0]):
            v = ys[j]
            os[j] = np.int16(f32_to_half_bits(v)) if v == v else np.int16(0x7E00)


# ------------------------------------------------------------------ matmul


@njit(cache=True, error_model="numpy")
def _widen(u: int, mode: int) -> float:
    """Raw bits (uint16/uint32 array element) to fp32; exact."""
    bits = np.int32(u)
    if mode == MODE_BF16:
        return bits_to_f32(np.int32(bits << np.int32(16)))
    if mode == MODE_F16:
        return half_bits_to_f32(bits)
    return bits_to_f32(bits)


@njit(cache=True, error_model="numpy")
def _tile(a: np.ndarray, panel: np.ndarray, pk0: int, pn0: int, nb: int, kb: int,
          k0: int, m0: int, m1: int, c: np.ndarray, n0: int, tmp: np.ndarray) -> None:
    """One K chunk (ChunkDot, section 2.1) for rows m0..m1 and columns n0..n0+nb:
    part = fma-sequential sum over k0..k0+kb of a[i, k] * panel[pk0 + k - k0, pn0 + j]
    from +0 (held in ``tmp``), then c[i, n0 + j] += part.

    Four rows share each loaded panel vector; the SIMD lanes run over columns j, i.e.
    over independent outputs, so every output still sees its k strictly increasing.
    """
    i = m0
    while i < m1:
        rows = min(4, m1 - i)
        t0 = tmp[0, :nb]
        t1 = tmp[1, :nb]
        t2 = tmp[2, :nb]
        t3 = tmp[3, :nb]
        t0[:] = ZERO
        t1[:] = ZERO
        t2[:] = ZERO
        t3[:] = ZERO
        a0 = a[i, k0:k0 + kb]
        a1 = a[i + 1, k0:k0 + kb] if rows > 1 else a0  # missing rows recompute row i
        a2 = a[i + 2, k0:k0 + kb] if rows > 2 else a0  # into scratch that is discarded
        a3 = a[i + 3, k0:k0 + kb] if rows > 3 else a0
        for k in range(kb):
            br = panel[pk0 + k, pn0:pn0 + nb]
            x0 = a0[k]
            x1 = a1[k]
            x2 = a2[k]
            x3 = a3[k]
            for j in range(nb):
                bj = br[j]
                t0[j] = fma32(x0, bj, t0[j])
                t1[j] = fma32(x1, bj, t1[j])
                t2[j] = fma32(x2, bj, t2[j])
                t3[j] = fma32(x3, bj, t3[j])
        for r in range(rows):
            cr = c[i + r, n0:n0 + nb]
            tr = tmp[r, :nb]
            for j in range(nb):
                cr[j] = cr[j] + tr[j]
        i += 4


@njit(cache=True, error_model="numpy")
def _finish_tile(c: np.ndarray, m0: int, m1: int, n0: int, nb: int, bias: np.ndarray,
                 has_bias: bool) -> None:
    for i in range(m0, m1):
        row = c[i, n0:n0 + nb]
        if has_bias:
            bs = bias[n0:n0 + nb]
            for j in range(nb):
                row[j] = canon(row[j] + bs[j])
        else:
            for j in range(nb):
                row[j] = canon(row[j])


@njit(cache=True, nogil=True, error_model="numpy")
def matmul_tiles(n_dim: int, m_dim: int) -> int:
    """Number of (row block, column block) tiles; tiles are the unit of threading."""
    return ((n_dim + MATMUL_NB - 1) // MATMUL_NB) * ((m_dim + MATMUL_MB - 1) // MATMUL_MB)


@njit(cache=True, inline="always")
def _start_tile(c: np.ndarray, t: int) -> tuple[int, int, int, int]:
    """Tile t of c: its rows m0..m1-1 and columns n0..n0+nb-1, zeroed (the chunk sums
    are added onto +0.0)."""
    m_dim, n_dim = c.shape
    n_tiles = (n_dim + MATMUL_NB - 1) // MATMUL_NB
    n0 = (t % n_tiles) * MATMUL_NB
    m0 = (t // n_tiles) * MATMUL_MB
    nb = min(n_dim, n0 + MATMUL_NB) - n0
    m1 = min(m_dim, m0 + MATMUL_MB)
    for i in range(m0, m1):
        c[i, n0:n0 + nb] = ZERO
    return m0, m1, n0, nb


@njit(cache=True, nogil=True, error_model="numpy")
def matmul_direct(a: np.ndarray, b: np.ndarray, bias: np.ndarray, has_bias: bool,
                  c: np.ndarray, t0: int, t1: int) -> None:
    """Tiles t0..t1 of c = a @ b (+ bias); a (M, K), b (K, N) fp32 C-contiguous."""
    k_dim = a.shape[1]
    tmp = np.empty((4, MATMUL_NB), dtype=F32)
    for t in range(t0, t1):
        m0, m1, n0, nb = _start_tile(c, t)
        for k0 in range(0, k_dim, MATMUL_KB):
            kb = min(k_dim, k0 + MATMUL_KB) - k0
            _tile(a, b, k0, n0, nb, kb, k0, m0, m1, c, n0, tmp)
        _finish_tile(c, m0, m1, n0, nb, bias, has_bias)


@njit(cache=True, error_model="numpy")
def _pack(src: np.ndarray, mode: int, panel: np.ndarray) -> None:
    """panel[:kb, :nb] = widen(src) in 16 x 16 blocks, so that both the reads (contiguous
    in k for a transposed weight) and the writes (contiguous in n) stay in cache."""
    kb, nb = src.shape
    for j0 in range(0, nb, 16):
        j1 = min(nb, j0 + 16)
        for k0 in range(0, kb, 16):
            k1 = min(kb, k0 + 16)
            for j in range(j0, j1):
                col = src[k0:k1, j]
                for k in range(k1 - k0):
                    panel[k0 + k, j] = _widen(col[k], mode)


@njit(cache=True, error_model="numpy")
def _packed_tile(a: np.ndarray, b_bits: np.ndarray, mode: int, bias: np.ndarray, has_bias: bool,
                 c: np.ndarray, t: int, panel: np.ndarray, tmp: np.ndarray) -> None:
    k_dim = a.shape[1]
    m0, m1, n0, nb = _start_tile(c, t)
    for k0 in range(0, k_dim, MATMUL_KB):
        kb = min(k_dim, k0 + MATMUL_KB) - k0
        _pack(b_bits[k0:k0 + kb, n0:n0 + nb], mode, panel)
        _tile(a, panel, 0, 0, nb, kb, k0, m0, m1, c, n0, tmp)
    _finish_tile(c, m0, m1, n0, nb, bias, has_bias)


@njit(cache=True, nogil=True, error_model="numpy")
def matmul_packed(a: np.ndarray, b_bits: np.ndarray, mode: int, bias: np.ndarray,
                  has_bias: bool, c: np.ndarray, t0: int, t1: int) -> None:
    """As matmul_direct, for b given as raw bits with any strides (e.g. a transposed
    bf16 weight); panels of b are widened to fp32 and packed row-major per tile."""
    panel = np.empty((MATMUL_KB, MATMUL_NB), dtype=F32)
    tmp = np.empty((4, MATMUL_NB), dtype=F32)
    for t in range(t0, t1):
        _packed_tile(a, b_bits, mode, bias, has_bias, c, t, panel, tmp)


@njit(cache=True, nogil=True, error_model="numpy")
def matmul_packed_batched(a: np.ndarray, b_bits: np.ndarray, mode: int, bias: np.ndarray,
                          has_bias: bool, c: np.ndarray, t0: int, t1: int) -> None:
    """matmul_packed for every entry of a batch: a (B, M, K), b_bits (B, K, N), c (B, M, N);
    t runs over (entry, tile) pairs, entry-major. One call for all entries: a depthwise
    convolution is thousands of tiny products, which cost a Python call each before."""
    tiles = matmul_tiles(b_bits.shape[2], a.shape[1])
    panel = np.empty((MATMUL_KB, MATMUL_NB), dtype=F32)
    tmp = np.empty((4, MATMUL_NB), dtype=F32)
    for t in range(t0, t1):
        e = t // tiles
        _packed_tile(a[e], b_bits[e], mode, bias, has_bias, c[e], t % tiles, panel, tmp)


WT_BLOCK = 8  # output columns computed together by matmul_wt_small


@njit(cache=True, nogil=True, error_model="numpy")
def matmul_wt_small(a: np.ndarray, w_bits: np.ndarray, mode: int, bias: np.ndarray,
                    has_bias: bool, c: np.ndarray, t0: int, t1: int) -> None:
    """c = a @ w.T (+ bias) for few rows of a (decode), straight from the weight
    ``w_bits`` (N, K) C-contiguous raw bits, without packing: eight output columns run
    as eight independent fma chains over k (ChunkDot, section 2.1, per output).
    Blocks t0..t1 of WT_BLOCK columns."""
    m_dim, k_dim = a.shape
    n_dim = w_bits.shape[0]
    for t in range(t0, t1):
        n0 = t * WT_BLOCK
        n1 = min(n_dim, n0 + WT_BLOCK)
        for i in range(m_dim):
            c[i, n0:n1] = ZERO
        for k0 in range(0, k_dim, DOT_CHUNK):
            k1 = min(k_dim, k0 + DOT_CHUNK)
            for i in range(m_dim):
                ai = a[i, k0:k1]
                if n1 - n0 == WT_BLOCK:
                    w0 = w_bits[n0, k0:k1]
                    w1 = w_bits[n0 + 1, k0:k1]
                    w2 = w_bits[n0 + 2, k0:k1]
                    w3 = w_bits[n0 + 3, k0:k1]
                    w4 = w_bits[n0 + 4, k0:k1]
                    w5 = w_bits[n0 + 5, k0:k1]
                    w6 = w_bits[n0 + 6, k0:k1]
                    w7 = w_bits[n0 + 7, k0:k1]
                    p0 = ZERO
                    p1 = ZERO
                    p2 = ZERO
                    p3 = ZERO
                    p4 = ZERO
                    p5 = ZERO
                    p6 = ZERO
                    p7 = ZERO
                    for k in range(k1 - k0):
                        x = ai[k]
                        p0 = fma32(x, _widen(w0[k], mode), p0)
                        p1 = fma32(x, _widen(w1[k], mode), p1)
                        p2 = fma32(x, _widen(w2[k], mode), p2)
                        p3 = fma32(x, _widen(w3[k], mode), p3)
                        p4 = fma32(x, _widen(w4[k], mode), p4)
                        p5 = fma32(x, _widen(w5[k], mode), p5)
                        p6 = fma32(x, _widen(w6[k], mode), p6)
                        p7 = fma32(x, _widen(w7[k], mode), p7)
                    c[i, n0] = c[i, n0] + p0
                    c[i, n0 + 1] = c[i, n0 + 1] + p1
                    c[i, n0 + 2] = c[i, n0 + 2] + p2
                    c[i, n0 + 3] = c[i, n0 + 3] + p3
                    c[i, n0 + 4] = c[i, n0 + 4] + p4
                    c[i, n0 + 5] = c[i, n0 + 5] + p5
                    c[i, n0 + 6] = c[i, n0 + 6] + p6
                    c[i, n0 + 7] = c[i, n0 + 7] + p7
                else:
                    for n in range(n0, n1):
                        wn = w_bits[n, k0:k1]
                        p = ZERO
                        for k in range(k1 - k0):
                            p = fma32(ai[k], _widen(wn[k], mode), p)
                        c[i, n] = c[i, n] + p
        _finish_tile(c, 0, m_dim, n0, n1 - n0, bias, has_bias)


# ------------------------------------------------------------------ attention


@njit(cache=True, error_model="numpy")
def _transpose_keys(kg: np.ndarray, kt: np.ndarray) -> None:
    """kt[d, j] = kg[j, d] (j < len(kg)) in 16 x 16 blocks (both sides stay in cache)."""
    lk, d_dim = kg.shape
    for j0 in range(0, lk, 16):
        j1 = min(lk, j0 + 16)
        for d0 in range(0, d_dim, 16):
            d1 = min(d_dim, d0 + 16)
            for j in range(j0, j1):
                row = kg[j, d0:d1]
                for d in range(d1 - d0):
                    kt[d0 + d, j] = row[d]


@njit(cache=True, nogil=True, error_model="numpy")
def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask_bool: np.ndarray,
              mask_float: np.ndarray, mask_mode: int, scale: float, out: np.ndarray,
              t0: int, t1: int) -> None:
    """q (B,H,Lq,D); k (B,Hk,Lk,D); v (B,Hk,Lk,Dv); masks are (B,H,Lq,Lk) views (zero
    strides allowed); mask_mode 0 none, 1 bool (uint8, 0 = skip), 2 float (added).
    Computes the query rows t0..t1 of the flattened (B, H, Lq) index. Each thread keeps
    the current head's keys transposed, so scores vectorise over keys."""
    nb, nh, lq, d_dim = q.shape
    hk = k.shape[1]
    lk = k.shape[2]
    dv = v.shape[3]
    group = nh // hk
    s = np.zeros(lk, dtype=F32)
    part = np.empty(lk, dtype=F32)
    kept = np.zeros(lk, dtype=np.uint8)
    order = np.empty(lk, dtype=np.int64)
    # Padded rows: a power-of-two row stride would make the transposing writes collide
    # in the same cache sets (4x slower at 4096 keys).
    kt = np.empty((d_dim, lk + 24), dtype=F32)
    current = -1
    for t in range(t0, t1):
        b = t // (nh * lq)
        h = (t // lq) % nh
        i = t % lq
        g = h // group
        if b * hk + g != current:
            _transpose_keys(k[b, g], kt)
            current = b * hk + g
        # With a bool mask, keys outside [jlo, jhi) are all skipped: do not score them
        # (a causal prefill then does half the work). Bits are unaffected.
        jlo = 0
        jhi = lk
        if mask_mode == 1:
            mrow = mask_bool[b, h, i]
            while jlo < lk and mrow[jlo] == 0:
                jlo += 1
            while jhi > jlo and mrow[jhi - 1] == 0:
                jhi -= 1
        kept[:] = 0
        sw = s[jlo:jhi]
        pw = part[jlo:jhi]
        sw[:] = ZERO
        qi = q[b, h, i]
        for c0 in range(0, d_dim, DOT_CHUNK):  # ChunkDot over d, lanes over keys
            pw[:] = ZERO
            for d in range(c0, min(d_dim, c0 + DOT_CHUNK)):
                qd = qi[d]
                krow = kt[d, jlo:jhi]
                for j in range(jhi - jlo):
                    pw[j] = fma32(qd, krow[j], pw[j])
            for j in range(jhi - jlo):
                sw[j] = sw[j] + pw[j]
        m = NEG_INF
        nkept = 0
        for j in range(jlo, jhi):
            if mask_mode == 1 and mask_bool[b, h, i, j] == 0:
                continue
            sj = s[j] * scale
            if mask_mode == 2:
                sj = sj + mask_float[b, h, i, j]
            if sj == NEG_INF:
                continue
            s[j] = sj
            kept[j] = 1
            nkept += 1
            # Max of the kept scores; the sign of a zero maximum cannot matter here
            # because M only enters through Exp(s - M) and Exp(+0) == Exp(-0).
            if m == m:
                if sj != sj or sj > m:
                    m = sj
        o = out[b, h, i]
        o[:] = ZERO
        if nkept == 0:
            continue
        for j in range(jhi - jlo):  # vectorised; skipped keys get a value never read
            sw[j] = exp_f32(sw[j] - m)
        nk = 0
        for j in range(jlo, jhi):
            if kept[j] == 1:
                order[nk] = j
                nk += 1
        total = ZERO
        vg = v[b, g]
        u = 0
        while u + 4 <= nk:  # four kept keys per pass over o; per d still in key order
            j0 = order[u]
            j1 = order[u + 1]
            j2 = order[u + 2]
            j3 = order[u + 3]
            p0 = s[j0]
            p1 = s[j1]
            p2 = s[j2]
            p3 = s[j3]
            total = (((total + p0) + p1) + p2) + p3
            v0 = vg[j0]
            v1 = vg[j1]
            v2 = vg[j2]
            v3 = vg[j3]
            for d in range(dv):
                o[d] = fma32(p3, v3[d], fma32(p2, v2[d], fma32(p1, v1[d], fma32(p0, v0[d], o[d]))))
            u += 4
        while u < nk:
            j0 = order[u]
            p0 = s[j0]
            total = total + p0
            v0 = vg[j0]
            for d in range(dv):
                o[d] = fma32(p0, v0[d], o[d])
            u += 1
        for d in range(dv):
            o[d] = canon(o[d] / total)
