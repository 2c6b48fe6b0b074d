"""docs/canonical-orders.md, implemented a second time, independently, equals spec.py.

The functions below were written from the document alone (sections 1, 2.4 to 2.7, 2.9
and the "elementwise" table of section 3), without reading ``detkit/kernels/spec.py`` or the
kernels, in exact arithmetic: every value is a Python float holding an fp32 value, every
operation is computed exactly with ``fractions.Fraction`` and rounded once to fp32
(nearest, ties to even, subnormals kept) by ``_round`` (Pow's binary64 steps to binary64). The constants are copied from the
document by hand (nothing is parsed from it), so this is a second implementation of the
written specification: if it and ``spec.py`` disagree, the document does not pin the bits
down, or ``spec.py`` does not follow it.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

from detkit.kernels import portable_cpu as P
from detkit.kernels import spec as S

# ---------------------------------------------------------------------------------------
# fp32 arithmetic, exact then rounded once (section 1)
# ---------------------------------------------------------------------------------------


def _f(bits: int) -> float:
    """The fp32 value with this bit pattern."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _neg(x: float) -> bool:
    return math.copysign(1.0, x) < 0


def _round(q: Fraction | int, zero_sign: bool = False, p: int = 24, emin: int = -126, emax: int = 127) -> float:
    """Round-to-nearest-even of an exact rational to a binary format with a ``p``-bit
    significand (fp32 by default; a zero gets ``zero_sign``)."""
    q = Fraction(q)
    if q == 0:
        return -0.0 if zero_sign else 0.0
    neg, a = q < 0, abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2^e <= a < 2^(e+2)
    if Fraction(2) ** e > a:
        e -= 1
    quantum = Fraction(2) ** (max(e, emin) - (p - 1))
    n, rem = divmod(a, quantum)
    n = int(n)
    if rem * 2 > quantum or (rem * 2 == quantum and n % 2 == 1):
        n += 1
    v = n * quantum
    out = math.inf if v >= Fraction(2) ** (emax + 1) else float(v)
    return -out if neg else out


def _finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def add(x: float, y: float) -> float:
    if not _finite(x, y):
        return x + y  # inf/nan: float64 gives the IEEE result
    s = Fraction(x) + Fraction(y)
    return _round(s, zero_sign=(x == 0 and y == 0 and _neg(x) and _neg(y)))


def sub(x: float, y: float) -> float:
    return add(x, -y)


def mul(x: float, y: float) -> float:
    if not _finite(x, y):
        return x * y
    return _round(Fraction(x) * Fraction(y), zero_sign=_neg(x) != _neg(y))


def div(x: float, y: float) -> float:
    if not _finite(x, y) or y == 0:
        with np.errstate(all="ignore"):
            return float(np.float32(x) / np.float32(y))
    return _round(Fraction(x) / Fraction(y), zero_sign=_neg(x) != _neg(y))


def fma(a: float, b: float, c: float) -> float:
    """a*b + c rounded once; an exact zero follows IEEE 754's sign rules."""
    if not _finite(a, b, c):
        return a * b + c  # products of fp32 values are exact in float64
    p = Fraction(a) * Fraction(b)
    s = p + Fraction(c)
    if s == 0:
        psign = _neg(a) != _neg(b)
        both_zero_same_sign = p == 0 and c == 0 and psign == _neg(c)
        return _round(0, zero_sign=both_zero_same_sign and psign)
    return _round(s, zero_sign=s < 0)  # an underflow to zero keeps the exact sign


def rint(x: float) -> float:
    return float(round(x)) if math.isfinite(x) else x  # Python's round: ties to even


def p2(n: int) -> float:
    assert -126 <= n <= 127
    return float(Fraction(2) ** n)


# ---------------------------------------------------------------------------------------
# 2.4 Exp
# ---------------------------------------------------------------------------------------

LOG2E = _f(0x3FB8AA3B)
LN2_HI = _f(0x3F317200)
LN2_LO = _f(0x35BFBE8E)
C2, C3, C4, C5, C6, C7 = map(_f, (0x3F000000, 0x3E2AAAAB, 0x3D2AAAAB, 0x3C088889, 0x3AB60B61, 0x39500D01))


def Exp(x: float) -> float:
    if math.isnan(x):
        return x
    x = max(x, -104.0)
    x = min(x, 89.0)
    n = rint(mul(x, LOG2E))
    r = fma(-n, LN2_HI, x)
    r = fma(-n, LN2_LO, r)
    q = C7
    for c in (C6, C5, C4, C3, C2, 1.0):
        q = fma(q, r, c)
    p = fma(q, r, 1.0)
    n = int(n)
    n1 = n // 2
    n2 = n - n1
    return mul(mul(p, p2(n1)), p2(n2))


def sqrt(x: float) -> float:
    """Correctly rounded: float64's sqrt of an fp32 value rounds innocuously to fp32
    (53 >= 2 * 24 + 2 bits)."""
    if math.isnan(x) or x < 0:
        return math.nan
    return x if x == 0 or math.isinf(x) else _round(Fraction(math.sqrt(x)))


# ---------------------------------------------------------------------------------------
# 2.5 Log
# ---------------------------------------------------------------------------------------

SQRT2 = _f(0x3FB504F3)
D1, D2, D3, D4 = map(_f, (0x3F2AAAAB, 0x3ECCCCCD, 0x3E924925, 0x3E638E39))


def Log(x: float) -> float:
    if math.isnan(x):
        return x
    if x < 0:
        return math.nan
    if x == 0:
        return -math.inf
    if x == math.inf:
        return x
    k = 0
    if x < p2(-126):
        x, k = mul(x, p2(23)), -23
    m, e = math.frexp(x)  # m in [0.5, 1)
    m, e = m * 2, e - 1   # exact: m in [1, 2)
    if m > SQRT2:
        m, e = m * 0.5, e + 1
    f = sub(m, 1.0)
    s = div(f, add(2.0, f))
    z = mul(s, s)
    t = fma(fma(fma(D4, z, D3), z, D2), z, D1)
    r = mul(t, z)
    hfsq = mul(mul(0.5, f), f)
    dk = float(e + k)
    u = fma(s, add(hfsq, r), mul(dk, LN2_LO))
    return add(add(sub(u, hfsq), f), mul(dk, LN2_HI))


# ---------------------------------------------------------------------------------------
# 2.6 Erf
# ---------------------------------------------------------------------------------------

E = [_f(b) for b in (0x3E0375D4, 0xBEC093A0, 0x3DE716B2, 0xBCDBFFDB, 0x3BAA1B19, 0xBA52A0F1, 0x38A6609F)]
G = [_f(b) for b in (0x39AA25A8, 0xBF90AC34, 0xBF21BC6C, 0xBDE18BAA, 0x3CD8B5B6, 0xBB9C64EE, 0x3A1D487A,
                     0xB842F401, 0x35DEE9FF)]


def Erf(x: float) -> float:
    if math.isnan(x):
        return x
    a = abs(x)
    if a < 1.0:
        z = mul(x, x)
        q = E[6]
        for c in reversed(E[:6]):
            q = fma(q, z, c)
        return fma(x, q, x)
    if a >= 3.875:
        t = 1.0
    else:
        p = G[8]
        for c in reversed(G[:8]):
            p = fma(p, a, c)
        t = sub(1.0, Exp(p))
    return t if x > 0 else -t


# ---------------------------------------------------------------------------------------
# 2.7 Sin and Cos
# ---------------------------------------------------------------------------------------

TWO_OVER_PI_224 = 0xA2F9836E4E441529FC2757D1F534DDC0DB6295993C439041FE5163AB
PIO2_HI = _f(0x3FC90FDB)
PIO2_LO = _f(0xB33BBD2E)
S1, S2, S3, S4 = map(_f, (0xBE2AAAAB, 0x3C088887, 0xB95009D8, 0x3636DAFD))
K1, K2, K3, K4 = map(_f, (0xBF000000, 0x3D2AAAA7, 0xBAB6070A, 0x37CD3214))  # the doc's C1..C4


def _reduce_int(a: float) -> tuple[int, int]:
    """(k, F) of Reduce(a): the integer part."""
    b = _bits(a)
    m = (b & 0x7FFFFF) | 0x800000
    e = ((b >> 23) & 0xFF) - 150
    w = (TWO_OVER_PI_224 >> (130 - e)) % 2**96
    v = ((m * w) % 2**96) >> 32
    k = ((v + 2**61) % 2**64) >> 62
    F = (v - k * 2**62) % 2**64
    if F >= 2**63:
        F -= 2**64
    return k, F


def Reduce(a: float) -> tuple[int, float, float]:
    assert math.isfinite(a) and a >= 2.0**-12
    k, F = _reduce_int(a)
    hi = _round(F)
    lo = _round(F - int(hi))
    r = mul(fma(hi, PIO2_HI, fma(hi, PIO2_LO, mul(lo, PIO2_HI))), float(Fraction(2) ** -62))
    z = mul(r, r)
    s = fma(fma(fma(S4, z, S3), z, S2), z, S1)
    sn = fma(mul(r, z), s, r)
    c = fma(fma(fma(K4, z, K3), z, K2), z, K1)
    cs = fma(z, c, 1.0)
    return k % 4, sn, cs


def Sin(x: float) -> float:
    if not math.isfinite(x):
        return math.nan
    if abs(x) < 2.0**-12:
        return x
    q, sn, cs = Reduce(abs(x))
    y = [sn, cs, -sn, -cs][q]
    return y if x > 0 else -y


def Cos(x: float) -> float:
    if not math.isfinite(x):
        return math.nan
    if abs(x) < 2.0**-12:
        return 1.0
    q, sn, cs = Reduce(abs(x))
    return [cs, -sn, -cs, sn][q]


# ---------------------------------------------------------------------------------------
# Section 3, elementwise
# ---------------------------------------------------------------------------------------

SQRT1_2 = _f(0x3F3504F3)
BETA = _f(0x3F4C422A)
KAPPA = _f(0x3D372713)
T = [_f(b) for b in (0xBEAAAAAB, 0x3E088889, 0xBD5D0DD1, 0x3CB327A4, 0xBC11371B, 0x3B6B69E8, 0xBABED1B2,
                     0x3A1AAC12, 0xB97ABEBC)]  # T3, T5, ..., T19


def Tanh(x: float) -> float:
    if x == 0:
        return x
    if abs(x) < 0.5:
        z = mul(x, x)
        q = T[-1]
        for c in reversed(T[:-1]):
            q = fma(q, z, c)
        return fma(x, mul(q, z), x)
    ax = abs(x)
    t = sub(1.0, div(2.0, add(Exp(add(ax, ax)), 1.0)))
    return t if x > 0 else -t


def cube(x: float) -> float:
    return mul(mul(x, x), x)


def gelu(x: float) -> float:
    return mul(mul(x, 0.5), add(1.0, Erf(mul(x, SQRT1_2))))


def gelu_tanh(x: float) -> float:
    x3 = mul(mul(x, x), x)
    return mul(mul(0.5, x), add(1.0, Tanh(mul(BETA, add(x, mul(KAPPA, x3))))))


def softplus(x: float) -> float:
    if x > 20.0:
        return x
    y = Exp(x)
    u = add(1.0, y)
    return y if u == 1.0 else mul(Log(u), div(y, sub(u, 1.0)))


def log1p(x: float) -> float:
    u = add(1.0, x)
    if u == 1.0:
        return x
    return u if u == math.inf else mul(Log(u), div(x, sub(u, 1.0)))


DOC = {"erf": Erf, "sin": Sin, "cos": Cos, "cube": cube, "gelu": gelu, "gelu_tanh": gelu_tanh,
       "exp": Exp, "tanh": Tanh, "log": Log, "rsqrt": lambda x: div(1.0, sqrt(x)),
       "sigmoid": lambda x: div(1.0, add(1.0, Exp(-x))), "silu": lambda x: div(x, add(1.0, Exp(-x))),
       "softplus": softplus, "log1p": log1p}


# (significand bits, emin, emax, canonical NaN) of each output format (section 1, "Output")
_FORMATS = {torch.float32: (24, -126, 127, 0x7FC00000), torch.bfloat16: (8, -126, 127, 0x7FC0),
            torch.float16: (11, -14, 15, 0x7E00)}


def _to_bits(y: float, dtype: torch.dtype) -> int:
    """Section 1, "Output": NaN -> the canonical NaN, else round once into ``dtype``."""
    p, emin, emax, nan = _FORMATS[dtype]
    if math.isnan(y):
        return nan
    if math.isfinite(y):
        y = _round(Fraction(y), zero_sign=_neg(y), p=p, emin=emin, emax=emax)
    b32 = _bits(y)
    if dtype == torch.float32:
        return b32
    if dtype == torch.bfloat16:
        return b32 >> 16  # y is now a bf16 value, so the low half is zero
    return int(np.array([y], dtype=np.float16).view(np.uint16)[0])  # exact: y is an fp16 value


def doc_elementwise(name: str, x: torch.Tensor) -> list[int]:
    """The output bit patterns the document gives for ``name`` on ``x``."""
    xs = x.float().reshape(-1).tolist()  # widening is exact
    return [_to_bits(DOC[name](float(v)), x.dtype) for v in xs]


_INT = {torch.float32: (torch.int32, 0xFFFFFFFF), torch.bfloat16: (torch.int16, 0xFFFF),
        torch.float16: (torch.int16, 0xFFFF)}


def out_bits(y: torch.Tensor) -> list[int]:
    it, mask = _INT[y.dtype]
    return [b & mask for b in y.contiguous().view(it).reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------

# float32 values extremely close to a multiple of pi/2 (|F| < 2^35 of 2^61, i.e. |r| <
# 2^-26) or to an odd multiple of pi/4 (|F| within 2^35 of 2^61, the k boundary), found
# by running Reduce's integer arithmetic over every significand of every exponent.
HARD_REDUCTION = (0x6F79BE45, 0x50A3E87F, 0x6FF9BE45, 0x5123E87F, 0x437CE5F1, 0x7079BE45, 0x6A1976F1,
                  0x53B146A6, 0x65898498, 0x51A3E87F, 0x43FCE5F1, 0x77584625)
HARD_QUARTER = (0x6EF9BE45, 0x5023E87F, 0x42FCE5F1, 0x699976F1, 0x533146A6, 0x65098498, 0x76D84625, 0x4BA332E9)
# Its F rounds to a different hi through float64 than directly to fp32 (a double rounding).
DOUBLE_ROUNDING_HI = 0x6279BE45


def _f32s(values) -> list[float]:
    return [float(np.float32(v)) for v in values]


def _around(v: float, n: int = 1) -> list[float]:
    """v's fp32 and its n fp32 neighbours on either side."""
    b = _bits(float(np.float32(v)))
    return [_f(b + d) for d in range(-n, n + 1) if 0 <= b + d < 0x7F800000]


def edge_inputs() -> torch.Tensor:
    xs: list[float] = [0.0, math.inf, math.nan, 3.4e38, 3.4028235e38, 1e30, 12345.678, 0.49, 0.5, 88.7, 89.5,
                       103.9, 110.0, 2.0**-126, 2.0**-149, 1e-40, 5.48, 5.49, 5.5, 2.0**-24]
    for v in (1.0, 3.875, 2.0**-12, 0.5, 2.0**-126, 1.0 / SQRT1_2, 3.875 / SQRT1_2):  # branch edges
        xs += _around(v, 2)
    for v in (SQRT2, 20.0, 16.6355, 17.33, 1.5, 2.0):  # Log's m > SQRT2; softplus's threshold and u == 1
        xs += _around(v, 2)
    for v in (2.0**-24, 2.0**-25):  # log1p's u == 1 edges (1.0's neighbours, negated below, its 1 + x near 0)
        xs += _around(v, 2)
    for k in range(1, 13):  # quadrant boundaries: multiples of pi/4 and pi/2
        xs += _around(k * math.pi / 4)
    for k in (101, 1001, 10001, 2**20 + 1, 2**30 + 3):
        xs += _around(k * math.pi / 2)
    for b in HARD_REDUCTION + HARD_QUARTER + (DOUBLE_ROUNDING_HI,):
        xs += [_f(b - 1), _f(b), _f(b + 1)]
    rng = np.random.default_rng(20261130)
    xs += (rng.standard_normal(150) * 4).astype(np.float32).tolist()
    xs += rng.uniform(-12, 12, 100).astype(np.float32).tolist()
    xs += rng.integers(0, 2**32, 200, dtype=np.uint64).astype(np.uint32).view(np.float32).tolist()
    xs += (rng.integers(1, 2**23, 20) * 2.0**-149).tolist()  # subnormals
    x = torch.tensor(_f32s(xs), dtype=torch.float32)
    return torch.cat([x, -x])


INPUTS = edge_inputs()
OPS = ("erf", "sin", "cos", "cube", "gelu", "gelu_tanh", "exp", "tanh", "log", "rsqrt", "sigmoid", "silu", "softplus",
       "log1p")


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def _first_difference(want: list[int], got: list[int], x: torch.Tensor) -> str:
    bad = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
    if not bad:
        return ""
    i = bad[0]
    return f"{len(bad)} of {len(want)} differ; first x={x.reshape(-1)[i].item()!r}: doc {want[i]:#x}, got {got[i]:#x}"


@pytest.mark.parametrize("name", OPS)
def test_document_equals_spec_and_cpu_float32(name: str) -> None:
    want = doc_elementwise(name, INPUTS)
    for impl, fn in (("spec.py", S.elementwise), ("portable_cpu", P.elementwise)):
        diff = _first_difference(want, out_bits(fn(name, INPUTS)), INPUTS)
        assert not diff, f"{impl}: {diff}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ("erf", "sin", "cos", "gelu", "gelu_tanh", "cube", "log", "softplus", "log1p"))
def test_document_equals_spec_reduced_precision(name: str, dtype: torch.dtype) -> None:
    """Section 1's output rule: one rounding of the fp32 result, canonical NaN."""
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 2**16, 300, dtype=np.uint32).astype(np.uint16).view(np.int16)
    x = torch.cat([INPUTS[::4].to(dtype), torch.from_numpy(raw.copy()).view(dtype)])
    want = doc_elementwise(name, x)
    for impl, fn in (("spec.py", S.elementwise), ("portable_cpu", P.elementwise)):
        diff = _first_difference(want, out_bits(fn(name, x)), x)
        assert not diff, f"{impl}: {diff}"


def test_hard_reduction_inputs_are_hard() -> None:
    """The listed inputs keep what they claim: a * 2/pi within 2^-26 of an integer, or of
    an integer + 1/2 (the quadrant decision)."""
    for b in HARD_REDUCTION:
        assert abs(_reduce_int(_f(b))[1]) < 2**35, hex(b)
    for b in HARD_QUARTER:
        assert abs(abs(_reduce_int(_f(b))[1]) - 2**61) < 2**35, hex(b)
    f = _reduce_int(_f(DOUBLE_ROUNDING_HI))[1]
    assert _round(f) != float(np.float32(float(f)))


def test_document_constants_are_what_the_document_says() -> None:
    """Where the document defines a hex constant in words, the words give the hex."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.prec = 400

    def fp32_of(v) -> float:  # an mpmath value rounded once to fp32
        return _round(Fraction(int(mpmath.floor(v * mpmath.mpf(2) ** 300)), 2**300))

    assert [C2, C3, C4, C5, C6, C7] == [_round(Fraction(1, math.factorial(k))) for k in range(2, 8)]
    assert LOG2E == fp32_of(1 / mpmath.log(2)) and LN2_LO == fp32_of(mpmath.log(2) - LN2_HI)
    assert Fraction(LN2_HI).numerator.bit_length() == 15  # "15 significant bits"
    assert TWO_OVER_PI_224 == int(mpmath.floor(2 / mpmath.pi * mpmath.mpf(2) ** 224))
    assert PIO2_HI == fp32_of(mpmath.pi / 2) and PIO2_LO == fp32_of(mpmath.pi / 2 - PIO2_HI)
    assert SQRT1_2 == fp32_of(mpmath.sqrt(0.5))
    assert BETA == fp32_of(mpmath.sqrt(2 / mpmath.pi)) and KAPPA == _round(Fraction("0.044715"))
    taylor = mpmath.taylor(mpmath.tanh, 0, 19)
    assert T == [fp32_of(taylor[n]) for n in range(3, 20, 2)]


def test_document_claims_about_erf_sin_cos() -> None:
    """Sections 2.6 and 2.7: oddness, evenness, special values, the 2^-12 threshold."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.prec = 100
    for v in [v for v in INPUTS.tolist() if math.isfinite(v) and v > 0]:
        assert _bits(Erf(-v)) == _bits(-Erf(v)) and _bits(Sin(-v)) == _bits(-Sin(v))
        assert _bits(Cos(-v)) == _bits(Cos(v))
    assert _bits(Erf(-0.0)) == _bits(-0.0) and _bits(Sin(-0.0)) == _bits(-0.0) and Cos(-0.0) == 1.0
    assert Erf(math.inf) == 1.0 and Erf(-math.inf) == -1.0
    assert all(math.isnan(f(v)) for f in (Sin, Cos) for v in (math.inf, -math.inf, math.nan))
    # Below 2^-12, sin(x) rounds to x and cos(x) to 1 (the largest such x is the worst case).
    below = _f(_bits(2.0**-12) - 1)
    exact = lambda v: Fraction(int(mpmath.floor(v * mpmath.mpf(2) ** 150)), 2**150)  # noqa: E731
    assert _round(exact(mpmath.sin(below))) == below and _round(exact(mpmath.cos(below))) == 1.0
    # Section 2.6: from 3.875 on, erf(a) is within 0.72 ULP (of 2^-24) of 1, and it rounds
    # to 1.0 in fp32 (erfc(a) <= 2^-25) only from about 3.92 on.
    assert mpmath.erfc(3.875) < 0.72 * mpmath.mpf(2) ** -24
    assert mpmath.erfc(3.91) > mpmath.mpf(2) ** -25 > mpmath.erfc(3.93)


def test_sin_cos_accuracy_below_one_at_the_worst_points() -> None:
    """Section 2.7's "below 1" maxima: the worst float32 in [2^-12, 1) (found by scanning
    every one of them with the numba kernel against math.sin / math.cos) attains them."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.prec = 120
    for f, ref, x, claimed in ((Sin, mpmath.sin, 0.79142225, 1.07), (Cos, mpmath.cos, 0.77937406, 0.88)):
        x = float(np.float32(x))
        err = abs(mpmath.mpf(f(x)) - ref(mpmath.mpf(x))) / mpmath.mpf(2) ** -24  # results in [0.5, 1)
        assert claimed - 0.01 < err <= claimed, (f.__name__, x, float(err))


# ---------------------------------------------------------------------------------------
# 2.9 Pow: binary64 operations, each exact then rounded once (p = 53)
# ---------------------------------------------------------------------------------------


def _d(bits: int) -> float:
    """The binary64 value with this bit pattern."""
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _r64(q: Fraction) -> float:
    return _round(q, p=53, emin=-1022, emax=1023)


def dadd(x: float, y: float) -> float:
    return _r64(Fraction(x) + Fraction(y))


def dsub(x: float, y: float) -> float:
    return _r64(Fraction(x) - Fraction(y))


def dmul(x: float, y: float) -> float:
    return _r64(Fraction(x) * Fraction(y))


def ddiv(x: float, y: float) -> float:
    return _r64(Fraction(x) / Fraction(y))


SQRT2_D, LN2_D, INV_LN2 = _d(0x3FF6A09E667F3BCD), _d(0x3FE62E42FEFA39EF), _d(0x3FF71547652B82FE)
LN2_HI_D, LN2_LO_D = _d(0x3FE62E42FEE00000), _d(0x3DEA39EF35793C76)
POW_L = [_r64(Fraction(1, 2 * k + 1)) for k in range(1, 11)]  # "binary64(1/3), ..., binary64(1/21)"
POW_E = [_r64(Fraction(1, math.factorial(j))) for j in range(2, 14)]  # "binary64(1/2!), ..., binary64(1/13!)"


def _odd(y: float) -> bool:
    return abs(y) < 2.0**53 and y == rint(y) and rint(dmul(y, 0.5)) != dmul(y, 0.5)


def Pow(x: float, y: float) -> float:  # noqa: N802 - the document's name
    """Section 2.9 as written: x an fp32 value, y a binary64 value."""
    X = x
    if y == 0 or X == 1:
        return 1.0
    if math.isnan(X) or math.isnan(y):
        return math.nan
    if y == 2:
        # fp32(X * X): the binary64 product is exact (and inf * inf = inf)
        return _round(Fraction(X) * Fraction(X)) if math.isfinite(X) else X * X
    if math.isinf(y):
        if X == -1:
            return 1.0
        return math.inf if (abs(X) < 1) == (y < 0) else 0.0
    if X == 0 or math.isinf(X):
        mag = math.inf if (X == 0) == (y < 0) else 0.0
        return math.copysign(mag, X) if _odd(y) else mag
    if X < 0 and y != rint(y):
        return math.nan
    m, e = abs(X), 0
    while m >= 2:
        m, e = m / 2, e + 1
    while m < 1:
        m, e = m * 2, e - 1  # exact: powers of two
    if m > SQRT2_D:
        m, e = dmul(m, 0.5), e + 1
    f = dsub(m, 1.0)
    s = ddiv(f, dadd(2.0, f))
    z = dmul(s, s)
    q = POW_L[9]
    for c in reversed(POW_L[:9]):  # L9 .. L1
        q = dadd(dmul(q, z), c)
    s2 = dadd(s, s)
    lm = dadd(s2, dmul(s2, dmul(z, q)))
    t = dmul(y, dadd(dmul(float(e), LN2_D), lm))
    t = min(max(t, -200.0), 200.0)
    k = rint(dmul(t, INV_LN2))
    r = dsub(dsub(t, dmul(k, LN2_HI_D)), dmul(k, LN2_LO_D))
    p = POW_E[11]
    for c in reversed(POW_E[:11]):  # E12 .. E2
        p = dadd(dmul(p, r), c)
    p = dadd(dmul(p, r), 1.0)
    p = dadd(dmul(p, r), 1.0)
    w = Fraction(p) * Fraction(2) ** int(k)  # exact
    res = _round(w)
    return -res if X < 0 and _odd(y) else res


def _pow_inputs() -> tuple[list[float], list[float]]:
    """Base-exponent pairs: the special values against each other, then random ones."""
    specials_x = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, math.inf, -math.inf, math.nan, _f(1), _f(0x80000001),
                  _f(0x7F7FFFFF), 1.5, -3.0, _f(0x3F7FFFFF), _f(0x3F800001), 10.0]
    specials_y = [0.0, -0.0, 1.0, -1.0, 2.0, 3.0, -3.0, 0.5, 2.5, math.inf, -math.inf, math.nan, 1e30, 16777215.0,
                  149.0, -149.0, 0.3, 1e6]
    xs = [a for a in specials_x for _ in specials_y]
    ys = [b for _ in specials_x for b in specials_y]
    rng = np.random.default_rng(29)
    xs += [float(v) for v in (rng.random(150) * 20).astype(np.float32)]
    xs += [float(v) for v in (-rng.integers(1, 9, 50)).astype(np.float32)]
    ys += [float(v) for v in (rng.standard_normal(150) * 8).astype(np.float32)]
    ys += [float(v) for v in rng.integers(-30, 30, 50).astype(np.float32)]
    return xs, ys


def test_document_pow_equals_spec_and_cpu() -> None:
    """Section 2.9 written out in exact arithmetic rounded to binary64 at every step:
    spec.py and the numba kernel give its bits, for tensor exponents and for binary64
    scalar ones (1.7 is not an fp32 value)."""
    xs, ys = _pow_inputs()
    x, y = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.float32)
    ys = y.tolist()  # a tensor exponent is an fp32 value (0.3 is not)
    want = [_to_bits(Pow(a, b), torch.float32) for a, b in zip(xs, ys, strict=True)]
    for impl, fn in (("spec.py", S.pow), ("portable_cpu", P.pow)):
        diff = _first_difference(want, out_bits(fn(x, y)), x)
        assert not diff, f"{impl}: {diff}"
    for scalar in (1.7, 1.0 / 3.0, -2.5):
        want = [_to_bits(Pow(a, scalar), torch.float32) for a in xs]
        for impl, fn in (("spec.py", S.pow), ("portable_cpu", P.pow)):
            diff = _first_difference(want, out_bits(fn(x, scalar)), x)
            assert not diff, f"{impl}, y = {scalar}: {diff}"


def test_document_pow_constants_are_what_the_document_says() -> None:
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.prec = 300

    def d_of(v) -> float:  # an mpmath value rounded once to binary64
        return _r64(Fraction(int(mpmath.floor(v * mpmath.mpf(2) ** 250)), 2**250))

    assert SQRT2_D == d_of(mpmath.sqrt(2)) and LN2_D == d_of(mpmath.log(2)) and INV_LN2 == d_of(1 / mpmath.log(2))
    assert LN2_LO_D == d_of(mpmath.log(2) - LN2_HI_D)
    assert Fraction(LN2_HI_D).numerator.bit_length() <= 32  # "k * LN2_HI exact for |k| < 2^21"
    assert POW_L == [S.POW_L[i] for i in range(10)] and POW_E == list(S.POW_E)
