"""Executable version of ``docs/canonical-orders.md``: the oracle for ``portable=True``.

Slow and deliberately plain: one numpy float32 scalar operation per line, in the order
the document prescribes. numpy float32 ``+ - * /`` and ``sqrt`` are IEEE-754
correctly rounded (round to nearest even, subnormals kept); ``fma`` is computed exactly
with ``fractions.Fraction`` and rounded once by :func:`round_f32`. Use it on small
inputs only (tests); the fast kernels live in ``detkit.kernels.portable_cpu``.

Functions take and return torch tensors with the backend signatures of
``detkit/kernels/_backend.py``; ``*_f32`` helpers work on numpy float32 arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import torch

from detkit.errors import InputError

F32 = np.float32
LANES = 32
DOT_CHUNK = 256
CANONICAL_NAN_BITS = 0x7FC00000

LOG2E = np.uint32(0x3FB8AA3B).view(F32)
LN2_HI = np.uint32(0x3F317200).view(F32)
LN2_LO = np.uint32(0x35BFBE8E).view(F32)
SQRT2 = np.uint32(0x3FB504F3).view(F32)
# Taylor coefficients 1/k! (k = 2..7) and 2/(2k+1) (k = 1..4), rounded to fp32.
EXP_C = tuple(np.uint32(b).view(F32) for b in (
    0x3F000000, 0x3E2AAAAB, 0x3D2AAAAB, 0x3C088889, 0x3AB60B61, 0x39500D01))
# Taylor coefficients of tanh for x^3, x^5, ..., x^19, rounded to fp32.
TANH_T = tuple(np.uint32(b).view(F32) for b in (
    0xbeaaaaab, 0x3e088889, 0xbd5d0dd1, 0x3cb327a4, 0xbc11371b,
    0x3b6b69e8, 0xbabed1b2, 0x3a1aac12, 0xb97abebc)
)
LOG_D = tuple(np.uint32(b).view(F32) for b in (0x3F2AAAAB, 0x3ECCCCCD, 0x3E924925, 0x3E638E39))
# Erf (section 2.6): E0..E6 fit erf(x)/x - 1 in x^2 on [0, 1]; G0..G8 fit log(erfc(a)) in a
# on [1, 3.875] (least squares on Chebyshev nodes, rounded to fp32).
ERF_E = tuple(np.uint32(b).view(F32) for b in (
    0x3E0375D4, 0xBEC093A0, 0x3DE716B2, 0xBCDBFFDB, 0x3BAA1B19, 0xBA52A0F1, 0x38A6609F))
ERF_G = tuple(np.uint32(b).view(F32) for b in (
    0x39AA25A8, 0xBF90AC34, 0xBF21BC6C, 0xBDE18BAA, 0x3CD8B5B6, 0xBB9C64EE, 0x3A1D487A, 0xB842F401, 0x35DEE9FF))
ERF_ONE_FROM = F32(3.875)  # 1 - erf(a) < 0.72 ULP from here on; fp32 erf(a) rounds to 1.0 from about 3.92
SQRT1_2 = np.uint32(0x3F3504F3).view(F32)
# Sin/Cos (section 2.7): 2/pi to 224 fraction bits, pi/2 as an fp32 pair, and fits of
# (sin(r) - r)/r^3 and (cos(r) - 1)/r^2 in r^2 on [0, 0.8].
TWO_OVER_PI_224 = 0xA2F9836E4E441529FC2757D1F534DDC0DB6295993C439041FE5163AB
PIO2_HI = np.uint32(0x3FC90FDB).view(F32)
PIO2_LO = np.uint32(0xB33BBD2E).view(F32)
SIN_S = tuple(np.uint32(b).view(F32) for b in (0xBE2AAAAB, 0x3C088887, 0xB95009D8, 0x3636DAFD))
COS_C = tuple(np.uint32(b).view(F32) for b in (0xBF000000, 0x3D2AAAA7, 0xBAB6070A, 0x37CD3214))
TRIG_TINY = F32(2.0**-12)  # below: sin(x) rounds to x and cos(x) to 1
GELU_BETA = np.uint32(0x3F4C422A).view(F32)  # fp32(sqrt(2 / pi)), torch's kGeluBeta
GELU_KAPPA = np.uint32(0x3D372713).view(F32)  # fp32(0.044715)

ONE = F32(1.0)
ZERO = F32(0.0)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _f64(bits: int) -> float:
    return float(np.uint64(bits).view(np.float64))


# Pow (section 2.9) runs in binary64: Python floats, whose + - * / are IEEE binary64,
# correctly rounded. The constants are binary64 bit patterns.
POW_SQRT2 = _f64(0x3FF6A09E667F3BCD)
POW_LN2 = _f64(0x3FE62E42FEFA39EF)
POW_INV_LN2 = _f64(0x3FF71547652B82FE)
POW_LN2_HI = _f64(0x3FE62E42FEE00000)  # 32 significant bits: k * POW_LN2_HI is exact for |k| < 2^21
POW_LN2_LO = _f64(0x3DEA39EF35793C76)
# binary64(1 / (2k + 1)), k = 1 .. 10: log(m) = 2s (1 + z/3 + z^2/5 + ...), z = s^2
POW_L = tuple(_f64(b) for b in (
    0x3FD5555555555555, 0x3FC999999999999A, 0x3FC2492492492492, 0x3FBC71C71C71C71C, 0x3FB745D1745D1746,
    0x3FB3B13B13B13B14, 0x3FB1111111111111, 0x3FAE1E1E1E1E1E1E, 0x3FAAF286BCA1AF28, 0x3FA8618618618618))
# binary64(1 / j!), j = 2 .. 13
POW_E = tuple(_f64(b) for b in (
    0x3FE0000000000000, 0x3FC5555555555555, 0x3FA5555555555555, 0x3F81111111111111, 0x3F56C16C16C16C17,
    0x3F2A01A01A01A01A, 0x3EFA01A01A01A01A, 0x3EC71DE3A556C734, 0x3E927E4FB7789F5C, 0x3E5AE64567F544E4,
    0x3E21EED8EFF8D898, 0x3DE6124613A86D09))
POW_T_LIMIT = 200.0  # |y log x| past this is 0 or inf in fp32; keeps 2^k a normal binary64


def round_f32(q: Fraction) -> np.float32:
    """Round an exact nonzero rational to the nearest fp32 (ties to even, subnormals, overflow)."""
    sign = -1 if q < 0 else 1
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    quantum = Fraction(2) ** (max(e, -126) - 23)
    scaled = a / quantum
    n = scaled.numerator // scaled.denominator
    rem = scaled - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    value = n * quantum
    if value >= Fraction(2) ** 128:
        return F32(sign * math.inf)
    return F32(sign * float(value))  # exact: value has at most 24 significant bits


def fma_exact(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """fp32 fused multiply-add with one rounding, by exact rational arithmetic."""
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        return F32(float(a) * float(b) + float(c))  # Inf/NaN cases: no finite rounding involved
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if exact == 0:
        if a == 0 or b == 0:
            return F32(float(a) * float(b) + float(c))  # sum of zeros: float64 gets the sign right
        return ZERO  # exact cancellation rounds to +0 under round-to-nearest
    return round_f32(exact)


def fma(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """fp32 fused multiply-add with one rounding (fast path of :func:`fma_exact`).

    The product of two fp32 numbers is exact in float64; ``s = p + c`` in float64 with
    its TwoSum error ``t`` gives ``p + c == s + t`` exactly. Rounding ``s`` to fp32
    equals rounding the exact value unless ``t != 0`` and ``s`` is exactly halfway
    between two fp32 numbers (the only way double rounding can go wrong); that rare
    case, and every non-finite or zero case, goes through :func:`fma_exact`.
    """
    p = float(a) * float(b)
    cf = float(c)
    s = p + cf
    if not math.isfinite(s) or s == 0.0:
        return fma_exact(a, b, c)
    bp = s - cf
    t = (p - bp) + (cf - (s - bp))
    r = F32(s)
    if t != 0.0 and float(r) != s:
        if math.isinf(r):  # s at or past the overflow midpoint 2^128 - 2^103: no finite pair to test
            return fma_exact(a, b, c)
        other = np.nextafter(r, F32(math.copysign(math.inf, s - float(r))))
        if float(r) + float(other) == 2.0 * s:
            return fma_exact(a, b, c)
    return r


def seq_dot(a: Sequence[np.float32], b: Sequence[np.float32]) -> np.float32:
    """ChunkDot (section 2.1): fma-sequential inside chunks of 256 consecutive k (from
    k = 0), each chunk from +0; chunk results added left to right to an acc from +0."""
    acc = ZERO
    n = len(a)
    for c0 in range(0, n, DOT_CHUNK):
        part = ZERO
        for k in range(c0, min(n, c0 + DOT_CHUNK)):
            part = fma(F32(a[k]), F32(b[k]), part)
        acc = F32(acc + part)
    return acc


def _anchored(v: np.ndarray, square: bool) -> np.float32:
    nonzero = np.flatnonzero(v != 0)  # NaN != 0 is True, -0.0 != 0 is False
    if nonzero.size == 0:
        return ZERO
    j0 = int(nonzero[0])
    lane = [ZERO] * LANES
    for j in range(j0, v.shape[0]):
        lane_idx = (j - j0) % LANES
        x = F32(v[j])
        lane[lane_idx] = fma(x, x, lane[lane_idx]) if square else F32(lane[lane_idx] + x)
    h = LANES // 2
    while h >= 1:
        for idx in range(h):
            lane[idx] = F32(lane[idx] + lane[idx + h])
        h //= 2
    return lane[0]


def anchored_sum(v: np.ndarray) -> np.float32:
    """AnchoredSum: 32 lanes anchored at the first nonzero element, then a fixed tree."""
    return _anchored(v, square=False)


def anchored_sum_sq(v: np.ndarray) -> np.float32:
    """AnchoredSumSq: as AnchoredSum with lane = fma(v, v, lane)."""
    return _anchored(v, square=True)


def ieee_maximum(v: Sequence[np.float32]) -> np.float32:
    """IEEE 754-2019 maximum: NaN-propagating, -0 < +0."""
    m = F32(-math.inf)
    for x in v:
        x = F32(x)
        if math.isnan(x):
            return x
        if x > m or (x == 0 and m == 0 and math.copysign(1.0, x) > 0):
            m = x
    return m


def pow2(n: int) -> np.float32:
    """Exact 2**n for -126 <= n <= 127."""
    if not -126 <= n <= 127:
        raise ValueError(f"2**{n} is not a normal fp32")
    return F32(2.0**n)


def exp(x: np.float32) -> np.float32:
    """Exp of section 2.4."""
    x = F32(x)
    if math.isnan(x):
        return x
    x = max(x, F32(-104.0))
    x = min(x, F32(89.0))
    n = np.rint(F32(x * LOG2E))
    r = fma(-n, LN2_HI, x)
    r = fma(-n, LN2_LO, r)
    c2, c3, c4, c5, c6, c7 = EXP_C
    q = c7
    for c in (c6, c5, c4, c3, c2, ONE):
        q = fma(q, r, c)
    p = fma(q, r, ONE)
    ni = int(n)
    n1 = ni // 2  # floor division
    n2 = ni - n1
    return F32(F32(p * pow2(n1)) * pow2(n2))


def log(x: np.float32) -> np.float32:
    """Log of section 2.5."""
    x = F32(x)
    if math.isnan(x):
        return x
    if x < 0:
        return F32(math.nan)
    if x == 0:
        return F32(-math.inf)
    if math.isinf(x):
        return x
    k = 0
    if x < pow2(-126):
        x = F32(x * pow2(23))
        k = -23
    mant, e = np.frexp(x)  # x = mant * 2**e, mant in [0.5, 1)
    m = F32(mant * F32(2.0))
    e = int(e) - 1
    if m > SQRT2:
        m = F32(m * F32(0.5))
        e += 1
    f = F32(m - ONE)
    s = F32(f / F32(F32(2.0) + f))
    z = F32(s * s)
    d1, d2, d3, d4 = LOG_D
    t = fma(d4, z, d3)
    t = fma(t, z, d2)
    t = fma(t, z, d1)
    big_r = F32(t * z)
    hfsq = F32(F32(F32(0.5) * f) * f)
    dk = F32(e + k)
    u = fma(s, F32(hfsq + big_r), F32(dk * LN2_LO))
    return F32(F32(F32(u - hfsq) + f) + F32(dk * LN2_HI))


def rsqrt(x: np.float32) -> np.float32:
    return F32(ONE / np.sqrt(F32(x)))


def sigmoid(x: np.float32) -> np.float32:
    return F32(ONE / F32(ONE + exp(-F32(x))))


def silu(x: np.float32) -> np.float32:
    x = F32(x)
    return F32(x / F32(ONE + exp(-x)))


def tanh(x: np.float32) -> np.float32:
    """+-0 kept; |x| < 0.5: odd Taylor polynomial; else 1 - 2 / (Exp(2|x|) + 1) with x's sign."""
    x = F32(x)
    if x == 0:  # the polynomial's fma would give +0 for -0
        return x
    a = F32(abs(x))
    if a < F32(0.5):
        z = F32(x * x)
        q = TANH_T[-1]
        for c in TANH_T[-2::-1]:
            q = fma(q, z, c)
        return fma(x, F32(q * z), x)
    t = F32(ONE - F32(F32(2.0) / F32(exp(F32(a + a)) + ONE)))
    return t if x > 0 else F32(-t)


def erf(x: np.float32) -> np.float32:
    """Erf of section 2.6."""
    x = F32(x)
    if math.isnan(x):
        return x
    a = F32(abs(x))
    if a < ONE:
        z = F32(x * x)
        q = ERF_E[-1]
        for c in ERF_E[-2::-1]:
            q = fma(q, z, c)
        return fma(x, q, x)
    if a >= ERF_ONE_FROM:
        t = ONE
    else:
        p = ERF_G[-1]
        for c in ERF_G[-2::-1]:
            p = fma(p, a, c)
        t = F32(ONE - exp(p))
    return t if x > 0 else F32(-t)


def gelu(x: np.float32) -> np.float32:
    """Exact GELU as torch writes it: (x * 0.5) * (1 + Erf(x * SQRT1_2))."""
    x = F32(x)
    return F32(F32(x * F32(0.5)) * F32(ONE + erf(F32(x * SQRT1_2))))


def gelu_tanh(x: np.float32) -> np.float32:
    """Tanh GELU as torch writes it: (0.5 * x) * (1 + Tanh(BETA * (x + KAPPA * x^3)))."""
    x = F32(x)
    x3 = F32(F32(x * x) * x)
    inner = F32(GELU_BETA * F32(x + F32(GELU_KAPPA * x3)))
    return F32(F32(F32(0.5) * x) * F32(ONE + tanh(inner)))


def _i64_to_f32(v: int) -> np.float32:
    """An integer rounded once to fp32 (round to nearest even)."""
    return ZERO if v == 0 else round_f32(Fraction(v))


def _quarter_turns(a: np.float32) -> tuple[int, int]:
    """Section 2.7's exact reduction of a finite a >= 2^-12: (k mod 4, F), where
    a * 2/pi = k + F * 2^-62 (|F| <= 2^61), from 96 bits of 2/pi and 64-bit wraparound."""
    bits = int(np.float32(a).view(np.uint32))
    m = (bits & 0x7FFFFF) | 0x800000
    e = ((bits >> 23) & 0xFF) - 150  # a = m * 2^e
    w = (TWO_OVER_PI_224 >> (224 - (e + 94))) & (2**96 - 1)
    v = ((m * w) % 2**96) >> 32  # a * 2/pi mod 4, 62 fraction bits
    k = ((v + 2**61) % 2**64) >> 62
    f = (v - (k << 62)) % 2**64
    return k % 4, f - 2**64 if f >= 2**63 else f


def _sin_cos_reduced(a: np.float32) -> tuple[int, np.float32, np.float32]:
    """(quadrant, sin r, cos r) for a finite a >= 2^-12, r = a - quadrant * pi/2 in [-pi/4, pi/4]."""
    q, f = _quarter_turns(a)
    hi = _i64_to_f32(f)
    lo = _i64_to_f32(f - int(hi))
    r = F32(fma(hi, PIO2_HI, fma(hi, PIO2_LO, F32(lo * PIO2_HI))) * F32(2.0**-62))
    z = F32(r * r)
    s = SIN_S[-1]
    for c in SIN_S[-2::-1]:
        s = fma(s, z, c)
    c_ = COS_C[-1]
    for c in COS_C[-2::-1]:
        c_ = fma(c_, z, c)
    return q, fma(F32(r * z), s, r), fma(z, c_, ONE)


def _sin_or_cos(x: np.float32, want_cos: bool) -> np.float32:
    """Sin or Cos of section 2.7."""
    x = F32(x)
    if not math.isfinite(x):
        return F32(math.nan)
    a = F32(abs(x))
    if a < TRIG_TINY:
        return ONE if want_cos else x
    q, sn, cs = _sin_cos_reduced(a)
    if want_cos:
        return (cs, F32(-sn), F32(-cs), sn)[q]
    y = (sn, cs, F32(-sn), F32(-cs))[q]
    return y if x > 0 else F32(-y)


def sin(x: np.float32) -> np.float32:
    return _sin_or_cos(x, False)


def cos(x: np.float32) -> np.float32:
    return _sin_or_cos(x, True)


def log1p(x: np.float32) -> np.float32:
    """log1p: u = 1 + x; x if u == 1 (tiny x, -0 kept), u if u is +inf, else
    Log(u) * (x / (u - 1)), the rounding of 1 + x corrected."""
    x = F32(x)
    u = F32(ONE + x)
    if u == ONE:
        return x
    if u == F32(math.inf):
        return u  # Log(inf) * (inf / inf) would be NaN
    return F32(log(u) * F32(x / F32(u - ONE)))


def softplus(x: np.float32) -> np.float32:
    """softplus with torch's defaults (beta 1, threshold 20): x above 20, else
    log1p(Exp(x)) (1 + Exp(x) is finite there)."""
    x = F32(x)
    if x > F32(20.0):
        return x
    return log1p(exp(x))


def cube(x: np.float32) -> np.float32:
    """pow(x, 3) as torch's float32 kernels compute it: (x * x) * x."""
    x = F32(x)
    return F32(F32(x * x) * x)


def _is_odd_integer(y: float) -> bool:
    return abs(y) < 2.0**53 and float(round(y)) == y and float(round(y * 0.5)) != y * 0.5


def pow_(x: np.float32, y: float) -> np.float32:
    """Pow of section 2.9: x an fp32 value, y a binary64 value (an fp32 exponent widened
    exactly, or a scalar exponent as given); binary64 arithmetic, one rounding to fp32."""
    xd = float(F32(x))
    y = float(y)
    if y == 0.0 or xd == 1.0:
        return ONE
    if math.isnan(xd) or math.isnan(y):
        return F32(math.nan)
    if y == 2.0:
        return F32(xd * xd)  # exact in binary64, rounded once: fp32's x * x
    odd = _is_odd_integer(y)
    if math.isinf(y):
        if xd == -1.0:
            return ONE
        return F32(math.inf) if (abs(xd) < 1.0) == (y < 0.0) else F32(0.0)
    if xd == 0.0 or math.isinf(xd):
        # 0^y and inf^y: a signed zero or infinity, its sign x's for odd integer y
        big = (xd == 0.0) == (y < 0.0)
        mag = math.inf if big else 0.0
        return F32(math.copysign(mag, xd) if odd else mag)
    if xd < 0.0 and float(round(y)) != y:
        return F32(math.nan)
    a = abs(xd)
    mant, e = math.frexp(a)  # exact: a = mant * 2^e, mant in [0.5, 1)
    m = mant * 2.0
    e -= 1
    if m > POW_SQRT2:
        m = m * 0.5
        e += 1
    f = m - 1.0  # exact
    s = f / (2.0 + f)  # 2.0 + f exact
    z = s * s
    q = POW_L[9]
    for c in reversed(POW_L[:9]):
        q = q * z + c
    s2 = s + s
    lm = s2 + s2 * (z * q)
    t = y * (e * POW_LN2 + lm)
    t = min(max(t, -POW_T_LIMIT), POW_T_LIMIT)
    k = float(round(t * POW_INV_LN2))
    r = (t - k * POW_LN2_HI) - k * POW_LN2_LO
    p = POW_E[11]
    for c in reversed(POW_E[:11]):
        p = p * r + c
    p = p * r + 1.0
    p = p * r + 1.0
    w = math.ldexp(p, int(k))  # exact: 2^k is a normal binary64
    res = F32(w)
    return -res if xd < 0.0 and odd else res


ELEMENTWISE: dict[str, Callable[[np.float32], np.float32]] = {
    "exp": exp,
    "log": log,
    "rsqrt": rsqrt,
    "sigmoid": sigmoid,
    "silu": silu,
    "tanh": tanh,
    "erf": erf,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "sin": sin,
    "cos": cos,
    "cube": cube,
    "softplus": softplus,
    "log1p": log1p,
}


# ---------------------------------------------------------------- numpy-level ops


def matmul_f32(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """(M, K) @ (K, N) [+ bias] by SeqDot per output."""
    m_dim, n_dim = a.shape[0], b.shape[1]
    out = np.empty((m_dim, n_dim), dtype=F32)
    for m in range(m_dim):
        for n in range(n_dim):
            acc = seq_dot(a[m, :], b[:, n])
            if bias is not None:
                acc = F32(acc + bias[n])
            out[m, n] = acc
    return out


def row_sum_f32(x: np.ndarray, mean: bool) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=F32)
    for r in range(x.shape[0]):
        s = anchored_sum(x[r])
        out[r] = F32(s / F32(x.shape[1])) if mean else s
    return out


def row_cumsum_f32(x: np.ndarray, wide: bool) -> np.ndarray:
    """Section 3, cumsum: one running sum per row, from +0.0, left to right, in float64
    (``wide``: float32 inputs) or float32 (bfloat16/float16 inputs), each output rounded
    to float32 (numpy's float64 -> float32 conversion is IEEE nearest-even)."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        if wide:
            s64 = np.float64(0.0)
            for j in range(x.shape[1]):
                s64 = np.float64(s64 + np.float64(x[r, j]))
                out[r, j] = F32(s64)
        else:
            s = ZERO
            for j in range(x.shape[1]):
                s = F32(s + x[r, j])
                out[r, j] = s
    return out


def solve_lower_f32(a: np.ndarray, b: np.ndarray, unit: bool) -> np.ndarray:
    """Section 3, solve_triangular: forward substitution, column by column, each x[i, c]
    one fma chain from b[i, c] over j = 0 .. i-1, then a division by a[i, i] unless
    ``unit``. Only a's strict lower triangle (and its diagonal unless ``unit``) is read."""
    n, k = b.shape
    x = np.empty_like(b)
    for c in range(k):
        for i in range(n):
            acc = b[i, c]
            for j in range(i):
                acc = fma(-a[i, j], x[j, c], acc)
            x[i, c] = acc if unit else F32(acc / a[i, i])
    return x


def softmax_f32(x: np.ndarray, log_: bool) -> np.ndarray:
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        row = x[r]
        m = ieee_maximum(row)
        shifted = [F32(v - m) for v in row]
        e = np.array([exp(v) for v in shifted], dtype=F32)
        s = anchored_sum(e)
        if log_:
            ls = log(s)
            out[r] = [F32(v - ls) for v in shifted]
        else:
            out[r] = [F32(v / s) for v in e]
    return out


def rms_norm_f32(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    length = F32(x.shape[1])
    for r in range(x.shape[0]):
        ss = anchored_sum_sq(x[r])
        rr = F32(ONE / np.sqrt(F32(F32(ss / length) + F32(eps))))
        for j in range(x.shape[1]):
            y = F32(x[r, j] * rr)
            out[r, j] = F32(y * weight[j]) if weight is not None else y
    return out


def layer_norm_f32(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
                   eps: float) -> np.ndarray:
    out = np.empty_like(x)
    length = F32(x.shape[1])
    for r in range(x.shape[0]):
        mu = F32(anchored_sum(x[r]) / length)
        d = np.array([F32(v - mu) for v in x[r]], dtype=F32)
        var = F32(anchored_sum_sq(d) / length)
        rr = F32(ONE / np.sqrt(F32(var + F32(eps))))
        for j in range(x.shape[1]):
            t = F32(d[j] * rr)
            if weight is not None and bias is not None:
                t = fma(t, weight[j], bias[j])
            elif weight is not None:
                t = F32(t * weight[j])
            elif bias is not None:
                t = F32(t + bias[j])
            out[r, j] = t
    return out


def attention_f32(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                  scale: float) -> np.ndarray:
    """q (B,H,Lq,D), k (B,Hk,Lk,D), v (B,Hk,Lk,Dv), mask bool/float32 (B,H,Lq,Lk) or None."""
    nb, nh, lq, _ = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = nh // hk
    sc = F32(scale)
    out = np.zeros((nb, nh, lq, dv), dtype=F32)
    for b in range(nb):
        for h in range(nh):
            g = h // group
            for i in range(lq):
                kept: list[tuple[int, np.float32]] = []
                for j in range(lk):
                    mv = None if mask is None else mask[b, h, i, j]
                    if mv is not None and mask.dtype == np.bool_ and not mv:
                        continue
                    s = F32(seq_dot(q[b, h, i], k[b, g, j]) * sc)
                    if mv is not None and mask.dtype != np.bool_:
                        s = F32(s + F32(mv))
                    if s == -math.inf:
                        continue
                    kept.append((j, s))
                if not kept:
                    continue  # zeros
                m = ieee_maximum([s for _, s in kept])
                probs = [(j, exp(F32(s - m))) for j, s in kept]
                total = ZERO
                for _, p in probs:
                    total = F32(total + p)
                for d in range(dv):
                    o = ZERO
                    for j, p in probs:
                        o = fma(p, v[b, g, j, d], o)
                    out[b, h, i, d] = F32(o / total)
    return out


# ---------------------------------------------------------------- torch-level ops


def _quiet(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Overflow to inf and NaN results are part of the spec, not warnings."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def widen(t: torch.Tensor) -> np.ndarray:
    """Exact widening of a float32/bfloat16/float16 tensor to a float32 numpy array."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"portable kernels support float32, bfloat16 and float16, not {t.dtype}; "
            "convert the tensors to one of those dtypes."
        )
    return t.detach().cpu().to(torch.float32).numpy().astype(F32, copy=True)


def finish(y: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Canonicalise NaNs and round once, to nearest even, into the output dtype."""
    y = np.ascontiguousarray(y, dtype=F32)
    nan = np.isnan(y)
    y[nan] = np.uint32(CANONICAL_NAN_BITS).view(F32)
    if dtype == torch.float32:
        return torch.from_numpy(y)
    if dtype == torch.float16:
        h = y.astype(np.float16).view(np.uint16)  # numpy's conversion is IEEE nearest-even
        h[nan] = 0x7E00
        return torch.from_numpy(h.view(np.int16)).view(torch.float16)
    # bfloat16 keeps fp32's top 16 bits: add half an ulp of the cut, plus 1 on a tie with
    # an odd kept part, and truncate (carries into the exponent round up to inf correctly).
    u = y.view(np.uint32).astype(np.uint64)
    kept = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    hb = kept.astype(np.uint16)
    hb[nan] = 0x7FC0
    return torch.from_numpy(hb.view(np.int16)).view(torch.bfloat16)


@_quiet
def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    a32, b32 = widen(a), widen(b)
    bias32 = None if bias is None else widen(bias)
    if a32.ndim == 2:
        return finish(matmul_f32(a32, b32, bias32), a.dtype)
    outs = [matmul_f32(a32[i], b32[i], bias32) for i in range(a32.shape[0])]
    return finish(np.stack(outs), a.dtype)


@_quiet
def softmax(x: torch.Tensor, log: bool) -> torch.Tensor:  # noqa: A002 - backend signature
    return finish(softmax_f32(widen(x), log), x.dtype)


@_quiet
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    w = None if weight is None else widen(weight)
    return finish(rms_norm_f32(widen(x), w, eps), x.dtype)


@_quiet
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    w = None if weight is None else widen(weight)
    bb = None if bias is None else widen(bias)
    return finish(layer_norm_f32(widen(x), w, bb, eps), x.dtype)


@_quiet
def row_sum(x: torch.Tensor, mean: bool) -> torch.Tensor:
    return finish(row_sum_f32(widen(x), mean), x.dtype)


@_quiet
def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    return finish(row_cumsum_f32(widen(x), x.dtype == torch.float32), x.dtype)


@_quiet
def solve_lower(a: torch.Tensor, b: torch.Tensor, unit: bool) -> torch.Tensor:
    a32, b32 = widen(a), widen(b)
    return finish(np.stack([solve_lower_f32(a32[i], b32[i], unit) for i in range(a32.shape[0])]), a.dtype)


@_quiet
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    m = None
    if mask is not None:
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        full = mask.expand(shape)
        m = full.numpy().copy() if full.dtype == torch.bool else widen(full)
    return finish(attention_f32(widen(q), widen(k), widen(v), m, scale), q.dtype)


@_quiet
def elementwise(name: str, x: torch.Tensor) -> torch.Tensor:
    if name not in ELEMENTWISE:
        raise InputError(f"unknown portable elementwise op {name!r}; choose from {sorted(ELEMENTWISE)}")
    fn = ELEMENTWISE[name]
    flat = widen(x).reshape(-1)
    y = np.array([fn(F32(v)) for v in flat], dtype=F32).reshape(tuple(x.shape))
    return finish(y, x.dtype)


@_quiet
def pow(x: torch.Tensor, y: torch.Tensor | float) -> torch.Tensor:  # noqa: A001 - backend signature
    xs = widen(x).reshape(-1)
    ys = [float(y)] * xs.size if not isinstance(y, torch.Tensor) else widen(y).reshape(-1).astype(np.float64)
    out = np.array([pow_(F32(a), float(b)) for a, b in zip(xs, ys)], dtype=F32).reshape(tuple(x.shape))
    return finish(out, x.dtype)
