"""Correctly rounded references: exact results rounded once into the target format.

Every function takes numpy arrays or torch tensors (any float dtype; the values are
widened exactly) and returns a CPU ``torch.Tensor`` of ``dtype`` (default: the input's
dtype; one of float64, float32, float16, bfloat16) holding, elementwise, the exact
mathematical result rounded to nearest-even *once*, with subnormals and overflow to
+-inf handled as IEEE 754 does. Nothing is computed in float64 first, so there is no
double rounding (``sum([1, 2**-24, 2**-60])`` is ``1 + 2**-23`` in float32).

``dot(x, y)``, ``matmul(a, b, bias=None)`` (2-D or batched 3-D), ``sum(x, dim=-1)``,
``mean(x, dim=-1)``, ``softmax(x, dim=-1)``, ``log_softmax(x, dim=-1)``,
``rms_norm(x, weight=None, eps=1e-6)``, ``layer_norm(x, weight=None, bias=None, eps=1e-5)``
(both over the last dim, biased variance as torch), ``exp(x)``.

With ``exact=True`` a function instead returns a numpy object array of
``fractions.Fraction``: the exact value (dot, matmul, sum, mean) or, where the result is
irrational, a rational within a relative 2**-120 of it. ``ulp_error(result, exact)``
gives the error of ``result`` in units in the last place of the exact value (a float:
a correctly rounded result has at most 0.5); passed a rounded reference tensor of the
result's own dtype instead, it gives the integer ULP distance.

``eps`` is used with the exact value of the Python float given: a kernel that adds
``float32(1e-6)`` is compared fairly by passing ``eps=float(np.float32(1e-6))``.
Inputs must be finite (softmax and log_softmax also accept -inf, as a mask).

Method (details and the proof sketch in ``docs/reference.md``): sums of products are
exact integer arithmetic on the inputs scaled to a common power of two; square roots
are enclosed with integer square roots; exp and log come from mpmath at a working
precision P with a conservative error bound. Each element is enclosed in an interval
of rationals; if both ends round to the same float, that float is the correctly
rounded result, otherwise P is doubled (Ziv's strategy). Rounding of a rational into
the target format is our own exact integer code (``round_fraction``).
"""

from __future__ import annotations

import builtins
import math
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np
import torch

from detkit.compare import FORMATS, FloatFormat, _bits, _subnormals_kept, ulp_distance
from detkit.errors import DetkitError, InputError

__all__ = [
    "TARGET_DTYPES",
    "dot",
    "exp",
    "layer_norm",
    "log_softmax",
    "matmul",
    "mean",
    "rms_norm",
    "round_fraction",
    "softmax",
    "sum",
    "ulp_error",
]

TARGET_DTYPES = ("float64", "float32", "float16", "bfloat16")
_TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Extra bits of the first Ziv attempt, and the give-up point (never reached in practice:
# a transcendental result is never exactly a rounding boundary).
_GUARD_BITS = 40
_MAX_PREC = 1 << 15
# mpmath's exp/log are assumed accurate to 2**_MP_SLACK ulps at the working precision
# (they carry 14-20 guard bits internally and are within 1 ulp); see docs/reference.md.
_MP_SLACK = 4
_EXACT_VALUE_PREC = 160  # working precision for exact=True on irrational results
# Rounding boundaries of every target format are multiples of 2**-1075 (half of float64's
# smallest subnormal); inputs widened from float64 are multiples of 2**-1074.
_SUB_GRID = Fraction(1, 1 << 1076)


# --------------------------------------------------------------------------- rounding


def _emin(fmt: FloatFormat) -> int:
    return 1 - fmt.bias


def _emax(fmt: FloatFormat) -> int:
    return fmt.bias


def _floor_log2(n: int, d: int) -> int:
    """floor(log2(n / d)) for positive integers."""
    e = n.bit_length() - d.bit_length()
    if e >= 0:
        if n < d << e:
            e -= 1
    elif n << -e < d:
        e -= 1
    return e


def _round_ratio(num: int, den: int, fmt: FloatFormat, zero_sign: int = 1) -> float:
    """Round num/den (den > 0) to nearest-even in ``fmt``; the result as an exact Python float."""
    if num == 0:
        return math.copysign(0.0, zero_sign)
    neg = num < 0
    n = -num if neg else num
    p, emin, emax = fmt.precision, _emin(fmt), _emax(fmt)
    e = _floor_log2(n, den)
    if e > emax:
        return -math.inf if neg else math.inf
    if e < emin - p:  # below half the smallest subnormal
        return -0.0 if neg else 0.0
    q = max(e, emin) - (p - 1)  # exponent of the ulp at this binade (subnormals: fixed)
    if q >= 0:
        m, r = divmod(n, den << q)
        twice, full = 2 * r, den << q
    else:
        m, r = divmod(n << -q, den)
        twice, full = 2 * r, den
    if twice > full or (twice == full and m & 1):
        m += 1
    if q == emax - (p - 1) and m >= 1 << p:  # rounded past the largest finite value
        return -math.inf if neg else math.inf
    value = math.ldexp(m, q)  # exact: m < 2**54 and the result is a float64
    return -value if neg else value


@_subnormals_kept()
def round_fraction(value: Fraction | int, dtype: Any = "float32") -> float:
    """Round an exact rational to nearest-even in ``dtype`` (subnormals, overflow to inf).

    Returns a Python float whose value is exactly representable in ``dtype``.
    """
    fmt = _target(dtype, None)
    v = Fraction(value)
    return _round_ratio(v.numerator, v.denominator, fmt)


def _same_float(a: float, b: float) -> bool:
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


Interval = tuple[Fraction, Fraction]


def _decide(
    compute: Callable[[int], Sequence[Interval | float]], count: int, fmt: FloatFormat
) -> list[float]:
    """Ziv loop: ``compute(P)`` returns, per element, a float (already final: NaN, inf,
    an exact special case) or an enclosure (lo, hi) of the exact value, tighter as P grows.
    An element is decided when both ends round to the same float."""
    out: list[float | None] = [None] * count
    pending = list(range(count))
    prec = fmt.precision + _GUARD_BITS
    while pending:
        if prec > _MAX_PREC:
            raise DetkitError(
                f"reference rounding not decided at {_MAX_PREC} bits for {len(pending)} elements; "
                "please report this input"
            )
        values = compute(prec)
        still = []
        for i in pending:
            v = values[i]
            if isinstance(v, float):
                out[i] = v
                continue
            lo, hi = v
            a = _round_ratio(lo.numerator, lo.denominator, fmt)
            if lo == hi:
                out[i] = a
                continue
            b = _round_ratio(hi.numerator, hi.denominator, fmt)
            if _same_float(a, b):
                out[i] = a
            else:
                still.append(i)
        pending = still
        prec *= 2
    return [v for v in out if v is not None]


def _exact_values(compute: Callable[[int], Sequence[Interval | float]], count: int) -> list[Fraction | float]:
    """Midpoints of enclosures at a high precision (exact where the enclosure is a point)."""
    values = compute(_EXACT_VALUE_PREC)
    out: list[Fraction | float] = []
    for v in values[:count]:
        out.append(v if isinstance(v, float) else (v[0] + v[1]) / 2)
    return out


# ----------------------------------------------------------------------------- inputs


def _target(dtype: Any, default: str | None) -> FloatFormat:
    if dtype is None:
        if default is None:
            raise InputError("dtype is required")
        name = default
    elif isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in TARGET_DTYPES:
        raise InputError(
            f"unsupported target dtype {dtype!r}; references round into one of {', '.join(TARGET_DTYPES)}"
        )
    return FORMATS[name]


def _values(x: Any, what: str) -> tuple[np.ndarray, str]:
    """Exact float64 values of ``x`` and its dtype name (Python numbers count as float64)."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise InputError(f"{what} must be a floating tensor, got {x.dtype}")
        name = str(x.dtype).removeprefix("torch.")
        if name not in FORMATS:
            raise InputError(f"{what} has unsupported dtype {x.dtype}")
        return x.detach().to("cpu", torch.float64).numpy(), name
    arr = np.asarray(x)
    if arr.dtype.kind == "f" and arr.dtype.name not in FORMATS:
        raise InputError(f"{what} has dtype {arr.dtype}, which float64 cannot hold exactly; cast it first")
    if arr.dtype.kind != "f":
        if arr.dtype.kind in "iub" and arr.size == 0:
            arr = arr.astype(np.float64)
        elif arr.dtype.kind in "iu" and not isinstance(x, np.ndarray):
            arr = arr.astype(np.float64)  # Python ints/lists of ints: exact in float64 if small
        else:
            raise InputError(f"{what} must hold floating-point values, got dtype {arr.dtype}")
    return arr.astype(np.float64), arr.dtype.name if arr.dtype.name in FORMATS else "float64"


def _check_finite(v: np.ndarray, what: str, allow_neg_inf: bool = False) -> None:
    bad = np.isnan(v) | (np.isposinf(v)) | (np.isneginf(v) & (not allow_neg_inf))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = "finite values or -inf (a mask)" if allow_neg_inf else "finite values"
        raise InputError(f"{what} has {v[idx]} at index {idx}; exact references need {allowed}")


def _to_tensor(flat: list[float], shape: tuple[int, ...], fmt: FloatFormat) -> torch.Tensor:
    # The floats are exactly representable in fmt, so this conversion does not round.
    return torch.tensor(np.array(flat, dtype=np.float64).reshape(shape), dtype=torch.float64).to(
        _TORCH_DTYPES[fmt.name]
    )


def _to_exact_array(flat: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(flat), dtype=object)
    for i, v in enumerate(flat):
        out[i] = v
    return out.reshape(shape)


def _finish(
    compute: Callable[[int], Sequence[Interval | float]],
    count: int,
    fmt: FloatFormat,
    exact: bool,
) -> list[Any]:
    return _exact_values(compute, count) if exact else _decide(compute, count, fmt)


def _scaled_ints(v: np.ndarray) -> tuple[np.ndarray, int]:
    """Integers k (object array) and one exponent E with v == k * 2**E exactly."""
    mant, ex = np.frexp(v)  # v = mant * 2**ex, 0.5 <= |mant| < 1: mant * 2**53 is an integer
    ints = (mant * 2.0**53).astype(np.int64)
    ex = ex.astype(np.int64) - 53
    nonzero = ints != 0
    base = int(ex[nonzero].min()) if nonzero.any() else 0
    flat_i, flat_e = ints.reshape(-1), ex.reshape(-1)
    out = np.empty(flat_i.size, dtype=object)
    for j in range(flat_i.size):
        k = int(flat_i[j])
        out[j] = k << int(flat_e[j] - base) if k else 0
    return out.reshape(v.shape), base


def _dyadic(k: int, e: int) -> Fraction:
    return Fraction(k << e) if e >= 0 else Fraction(k, 1 << -e)


def _neg_zero(v: np.ndarray) -> np.ndarray:
    return (v == 0) & np.signbit(v)


def _rows(x: np.ndarray, dim: int) -> tuple[np.ndarray, tuple[int, ...]]:
    if x.ndim == 0:
        raise InputError("expected at least a 1-D input to reduce over")
    if not -x.ndim <= dim < x.ndim:
        raise InputError(f"dim {dim} out of range for a {x.ndim}-D input")
    moved = np.moveaxis(x, dim, -1)
    count = int(np.prod(moved.shape[:-1], dtype=np.int64))
    return moved.reshape(count, moved.shape[-1]), moved.shape


# ------------------------------------------------------------------------- exact sums


@_subnormals_kept()
def dot(x: Any, y: Any, *, dtype: Any = None, exact: bool = False) -> Any:
    """Exact sum of exact products of two 1-D vectors, rounded once. Returns a 0-d tensor."""
    vx, nx = _values(x, "x")
    vy, _ = _values(y, "y")
    if vx.ndim != 1 or vy.shape != vx.shape:
        raise InputError(f"dot needs two 1-D inputs of the same length, got {vx.shape} and {vy.shape}")
    out = matmul(vx.reshape(1, -1), vy.reshape(-1, 1), dtype=dtype or nx, exact=exact)
    return out.reshape(())


@_subnormals_kept()
def matmul(a: Any, b: Any, bias: Any = None, *, dtype: Any = None, exact: bool = False) -> Any:
    """Exact ``a @ b (+ bias)`` rounded once per element. 2-D (M,K)x(K,N) or batched (B,M,K)x(B,K,N)."""
    va, na = _values(a, "a")
    vb, _ = _values(b, "b")
    fmt = _target(dtype, na)
    if va.ndim not in (2, 3) or vb.ndim != va.ndim or va.shape[-1] != vb.shape[-2] or va.shape[:-2] != vb.shape[:-2]:
        raise InputError(f"matmul needs (M,K)x(K,N) or (B,M,K)x(B,K,N) inputs, got {va.shape} and {vb.shape}")
    _check_finite(va, "a")
    _check_finite(vb, "b")
    vbias = None
    if bias is not None:
        vbias, _ = _values(bias, "bias")
        if vbias.shape != (vb.shape[-1],):
            raise InputError(f"bias must have shape ({vb.shape[-1]},), got {vbias.shape}")
        _check_finite(vbias, "bias")
    if va.ndim == 3:
        parts = [matmul(va[i], vb[i], vbias, dtype=fmt.name, exact=exact) for i in range(va.shape[0])]
        if not parts:
            shape = (0, va.shape[1], vb.shape[2])
            return np.empty(shape, dtype=object) if exact else torch.empty(shape, dtype=_TORCH_DTYPES[fmt.name])
        return np.stack(parts) if exact else torch.stack(parts)

    m, k = va.shape
    n = vb.shape[1]
    ia, ea = _scaled_ints(va)
    ib, eb = _scaled_ints(vb)
    prod = ia @ ib if k else np.zeros((m, n), dtype=object)
    e = ea + eb
    if vbias is not None:
        ibias, ebias = _scaled_ints(vbias)
        # Bring products and bias to one exponent so the sum stays an exact integer.
        common = min(e, ebias)
        prod = np.array([[int(p) << (e - common) for p in row] for row in prod], dtype=object).reshape(m, n)
        prod = prod + np.array([int(t) << (ebias - common) for t in ibias], dtype=object)
        e = common
    # IEEE: an exact zero sum is -0 only when every term is -0.
    neg_prod = (va[:, :, None] == 0) | (vb[None, :, :] == 0)
    neg_prod &= np.signbit(va)[:, :, None] ^ np.signbit(vb)[None, :, :]
    all_neg_zero = neg_prod.all(axis=1) if k else np.zeros((m, n), dtype=bool)
    if vbias is not None:
        all_neg_zero &= _neg_zero(vbias)[None, :]
    flat = prod.reshape(-1)
    signs = np.where(all_neg_zero.reshape(-1), -1, 1)
    if exact:
        return _to_exact_array([_dyadic(int(v), e) for v in flat], (m, n))
    if e >= 0:
        vals = [_round_ratio(int(v) << e, 1, fmt, int(s)) for v, s in zip(flat, signs)]
    else:
        den = 1 << -e
        vals = [_round_ratio(int(v), den, fmt, int(s)) for v, s in zip(flat, signs)]
    return _to_tensor(vals, (m, n), fmt)


@_subnormals_kept()
def sum(x: Any, dim: int = -1, *, dtype: Any = None, exact: bool = False) -> Any:  # noqa: A001
    """Exact sum over ``dim``, rounded once."""
    return _sum_or_mean(x, dim, dtype, exact, mean=False)


@_subnormals_kept()
def mean(x: Any, dim: int = -1, *, dtype: Any = None, exact: bool = False) -> Any:
    """Exact mean over ``dim`` (exact sum divided by the count), rounded once."""
    return _sum_or_mean(x, dim, dtype, exact, mean=True)


def _sum_or_mean(x: Any, dim: int, dtype: Any, exact: bool, mean: bool) -> Any:
    v, name = _values(x, "x")
    fmt = _target(dtype, name)
    _check_finite(v, "x")
    rows, moved_shape = _rows(v, dim)
    out_shape = moved_shape[:-1]
    n = rows.shape[1]
    if mean and n == 0:
        raise InputError("mean over an empty dimension is undefined")
    ints, e = _scaled_ints(rows)
    vals: list[Any] = []
    for r in range(rows.shape[0]):
        total = builtins.sum(int(t) for t in ints[r])
        frac = _dyadic(total, e) / (n if mean else 1)
        if exact:
            vals.append(frac)
        else:
            zero_sign = -1 if n and _neg_zero(rows[r]).all() else 1
            vals.append(_round_ratio(frac.numerator, frac.denominator, fmt, zero_sign))
    if exact:
        return _to_exact_array(vals, out_shape)
    return _to_tensor(vals, out_shape, fmt)


# ----------------------------------------------------------------------- square roots


def _sqrt_enclosure(q: Fraction, prec: int) -> Interval:
    """[lo, hi] containing sqrt(q) (q >= 0) with hi - lo <= 2**-prec * sqrt(q) roughly; a
    point when sqrt(q) is rational and found exactly."""
    if q == 0:
        return (Fraction(0), Fraction(0))
    n, d = q.numerator, q.denominator
    # Choose k so that sqrt(q) * 2**k has about prec + 2 bits.
    k = prec + 2 - (n.bit_length() - d.bit_length()) // 2
    if k >= 0:
        num, den = n << (2 * k), d
    else:
        num, den = n, d << (-2 * k)
    t, rem = divmod(num, den)
    s = math.isqrt(t)
    lo = _dyadic(s, -k)
    if rem == 0 and s * s == t:
        return (lo, lo)
    return (lo, _dyadic(s + 1, -k))


def _scaled_enclosure(sign: int, q: Fraction, offset: Fraction, prec: int) -> Interval:
    """Enclosure of sign * sqrt(q) + offset."""
    lo, hi = _sqrt_enclosure(q, prec)
    if sign < 0:
        lo, hi = -hi, -lo
    return (lo + offset, hi + offset)


def _norm_common(
    x: Any, weight: Any, bias: Any, eps: float, dtype: Any
) -> tuple[np.ndarray, tuple[int, ...], FloatFormat, np.ndarray | None, np.ndarray | None, Fraction]:
    v, name = _values(x, "x")
    fmt = _target(dtype, name)
    _check_finite(v, "x")
    if v.ndim == 0 or v.shape[-1] == 0:
        raise InputError(f"normalization needs a non-empty last dimension, got shape {v.shape}")
    length = v.shape[-1]
    vw = vbias = None
    if weight is not None:
        vw, _ = _values(weight, "weight")
        if vw.shape != (length,):
            raise InputError(f"weight must have shape ({length},), got {vw.shape}")
        _check_finite(vw, "weight")
    if bias is not None:
        vbias, _ = _values(bias, "bias")
        if vbias.shape != (length,):
            raise InputError(f"bias must have shape ({length},), got {vbias.shape}")
        _check_finite(vbias, "bias")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
    count = int(np.prod(v.shape[:-1], dtype=np.int64))
    return v.reshape(count, length), v.shape, fmt, vw, vbias, Fraction(eps)


@_subnormals_kept()
def rms_norm(
    x: Any, weight: Any = None, eps: float = 1e-6, *, dtype: Any = None, exact: bool = False
) -> Any:
    """Exact ``x / sqrt(mean(x**2) + eps) * weight`` over the last dim, rounded once."""
    rows, shape, fmt, vw, _, feps = _norm_common(x, weight, None, eps, dtype)
    length = rows.shape[1]
    w = [Fraction(1)] * length if vw is None else [Fraction(float(t)) for t in vw]
    results: list[Any] = []
    for row in rows:
        xs = [Fraction(float(t)) for t in row]
        r = builtins.sum(t * t for t in xs) / length + feps
        # y_i = sign_i * sqrt(q_i), q_i = (x_i w_i)^2 / r: one square root of a rational.
        terms: list[tuple[int, Fraction] | float] = []
        for j, (xi, wi) in enumerate(zip(xs, w)):
            num = xi * wi
            if r == 0:
                terms.append(math.nan)  # 0 / 0, as torch's x * rsqrt(0)
            elif num == 0:
                # A zero keeps the sign of the product x_j * w_j, as the float computation does.
                neg = bool(np.signbit(row[j])) != bool(vw is not None and np.signbit(vw[j]))
                terms.append(-0.0 if neg else 0.0)
            else:
                terms.append((1 if num > 0 else -1, num * num / r))

        def compute(prec: int, terms: list[tuple[int, Fraction] | float] = terms) -> list[Interval | float]:
            return [
                t if isinstance(t, float) else _scaled_enclosure(t[0], t[1], Fraction(0), prec) for t in terms
            ]

        results.extend(_finish(compute, length, fmt, exact))
    return _to_exact_array(results, shape) if exact else _to_tensor(results, shape, fmt)


@_subnormals_kept()
def layer_norm(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    dtype: Any = None,
    exact: bool = False,
) -> Any:
    """Exact ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim (biased var)."""
    rows, shape, fmt, vw, vb, feps = _norm_common(x, weight, bias, eps, dtype)
    length = rows.shape[1]
    w = [Fraction(1)] * length if vw is None else [Fraction(float(t)) for t in vw]
    b = [Fraction(0)] * length if vb is None else [Fraction(float(t)) for t in vb]
    results: list[Any] = []
    for row in rows:
        xs = [Fraction(float(t)) for t in row]
        mu = builtins.sum(xs) / length
        var = builtins.sum((t - mu) ** 2 for t in xs) / length + feps
        terms: list[tuple[int, Fraction, Fraction] | Fraction | float] = []
        for j, (xi, wi, bi) in enumerate(zip(xs, w, b)):
            num = (xi - mu) * wi
            if var == 0:
                terms.append(math.nan)
            elif num == 0 and bi == 0:
                # -0 only when both terms are: the product's zero has the sign of
                # (x_j - mu) * w_j (x_j - mu is +0 when zero), as the float computation does.
                neg_prod = (xi < mu) != bool(vw is not None and np.signbit(vw[j]))
                terms.append(-0.0 if neg_prod and vb is not None and np.signbit(vb[j]) else 0.0)
            elif num == 0:
                terms.append(bi)  # exact
            else:
                terms.append((1 if num > 0 else -1, num * num / var, bi))

        def compute(prec: int, terms: list[Any] = terms) -> list[Interval | float]:
            out: list[Interval | float] = []
            for t in terms:
                if isinstance(t, float):
                    out.append(t)
                elif isinstance(t, Fraction):
                    out.append((t, t))
                else:
                    out.append(_scaled_enclosure(t[0], t[1], t[2], prec))
            return out

        results.extend(_finish(compute, length, fmt, exact))
    return _to_exact_array(results, shape) if exact else _to_tensor(results, shape, fmt)


# --------------------------------------------------------------------- exp and softmax


def _mp() -> Any:
    from mpmath import libmp

    return libmp


def _mpf_of(q: Fraction) -> Any:
    """An exact mpmath value of a dyadic rational."""
    libmp = _mp()
    d = q.denominator
    if d & (d - 1):
        raise AssertionError("internal: expected a dyadic rational")
    return libmp.from_man_exp(q.numerator, -(d.bit_length() - 1))


def _fraction_of_mpf(v: Any) -> Fraction:
    sign, man, e, _ = v
    f = _dyadic(int(man), int(e))
    return -f if sign else f


def _widen(v: Fraction, prec: int) -> Interval:
    """Enclosure of a positive value computed at precision prec with error <= 2**_MP_SLACK ulp."""
    r = v / (1 << (prec - _MP_SLACK - 1))
    return (v - r, v + r)


def _exp_enclosure(a: Fraction, prec: int) -> Interval:
    if a == 0:
        return (Fraction(1), Fraction(1))
    libmp = _mp()
    return _widen(_fraction_of_mpf(libmp.mpf_exp(_mpf_of(a), prec, "n")), prec)


def _log_enclosure(lo: Fraction, hi: Fraction, prec: int) -> Interval:
    """Enclosure of log(s) for s in [lo, hi], lo >= 1 (mpmath's log keeps relative accuracy near 1)."""
    libmp = _mp()

    def log_of(s: Fraction) -> Fraction:
        if s == 1:
            return Fraction(0)
        # The enclosure ends are dyadic by construction, so mpmath gets them exactly.
        return _fraction_of_mpf(libmp.mpf_log(_mpf_of(s), prec, "n"))

    l_lo, l_hi = log_of(lo), log_of(hi)
    return (_widen(l_lo, prec)[0] if l_lo else l_lo, _widen(l_hi, prec)[1] if l_hi else l_hi)


@_subnormals_kept()
def exp(x: Any, *, dtype: Any = None, exact: bool = False) -> Any:
    """Correctly rounded ``exp(x)`` elementwise."""
    v, name = _values(x, "x")
    fmt = _target(dtype, name)
    _check_finite(v, "x")
    flat = v.reshape(-1)
    # Outside these bounds the result is certainly inf / certainly below half the
    # smallest subnormal (margins of one binade, ln 2 < 0.6932).
    over = (_emax(fmt) + 2) * 0.6932
    under = (_emin(fmt) - fmt.precision - 2) * 0.6931

    def compute(prec: int) -> list[Interval | float]:
        out: list[Interval | float] = []
        for t in flat:
            t = float(t)
            if t > over:
                out.append(math.inf)
            elif t < under:
                out.append(0.0)
            else:
                out.append(_exp_enclosure(Fraction(t), prec))
        return out

    vals = _finish(compute, flat.size, fmt, exact)
    return _to_exact_array(vals, v.shape) if exact else _to_tensor(vals, v.shape, fmt)


@_subnormals_kept()
def softmax(x: Any, dim: int = -1, *, dtype: Any = None, exact: bool = False) -> Any:
    """Correctly rounded softmax over ``dim``; -inf entries are masked (0); an all -inf row is NaN."""
    return _softmax(x, dim, dtype, exact, log=False)


@_subnormals_kept()
def log_softmax(x: Any, dim: int = -1, *, dtype: Any = None, exact: bool = False) -> Any:
    """Correctly rounded log-softmax over ``dim``; -inf stays -inf; an all -inf row is NaN."""
    return _softmax(x, dim, dtype, exact, log=True)


def _softmax(x: Any, dim: int, dtype: Any, exact: bool, log: bool) -> Any:
    v, name = _values(x, "x")
    fmt = _target(dtype, name)
    _check_finite(v, "x", allow_neg_inf=True)
    rows, moved_shape = _rows(v, dim)
    length = rows.shape[1]
    results: list[Any] = []
    for row in rows:
        finite = np.isfinite(row)
        if not finite.any():
            results.extend([math.nan] * length)
            continue
        m = Fraction(float(row[finite].max()))
        a: list[Fraction | None] = [Fraction(float(t)) - m if f else None for t, f in zip(row, finite)]

        def compute(prec: int, a: list[Fraction | None] = a) -> list[Interval | float]:
            # exp(a_j) < 2**a_j; below 2**-(prec + 1200) a term is irrelevant to the sum
            # at this precision and its own softmax value rounds to 0 in every format.
            cutoff = -(prec + 1200)
            tiny = Fraction(1, 1 << (prec + 1200))
            encl: list[Interval | None] = []
            for aj in a:
                if aj is None:
                    encl.append(None)
                elif aj < cutoff:
                    encl.append((Fraction(0), tiny))
                else:
                    encl.append(_exp_enclosure(aj, prec))
            zeros = builtins.sum(1 for aj in a if aj == 0)
            # S = zeros + T, T = sum of exp(a_j) over a_j < 0: enclose T, then S.
            t_lo = builtins.sum((e[0] for aj, e in zip(a, encl) if e is not None and aj != 0), Fraction(0))
            t_hi = builtins.sum((e[1] for aj, e in zip(a, encl) if e is not None and aj != 0), Fraction(0))
            s_lo, s_hi = zeros + t_lo, zeros + t_hi
            out: list[Interval | float] = []
            if log:
                # log S >= 0 and a_j <= 0: a_j - log S has no cancellation.
                l_lo, l_hi = _log_enclosure(s_lo, s_hi, prec)
                # S > 1 when some a_j < 0, even if its enclosure starts at 1 (terms below the
                # cutoff): then a_j - log S lies in [a_j - l_hi, a_j), and a_j itself (a
                # multiple of 2**-1074) may be a rounding boundary (0, a tie). No boundary lies
                # in [a_j - d, a_j) for d <= 2**-1076, so a_j - d is an upper end that rounds
                # as the value does.
                gap = min(l_hi / 2, _SUB_GRID) if l_lo == 0 and t_hi > 0 else l_lo
                for aj in a:
                    out.append(-math.inf if aj is None else (aj - l_hi, aj - gap))
            else:
                for e in encl:
                    out.append(0.0 if e is None else (e[0] / s_hi, e[1] / s_lo))
            return out

        results.extend(_finish(compute, length, fmt, exact))
    shape = moved_shape
    if exact:
        arr = _to_exact_array(results, shape)
        return np.moveaxis(arr, -1, dim)
    out = _to_tensor(results, shape, fmt)
    return out.movedim(-1, dim)


# -------------------------------------------------------------------------- ulp error


def _ulp_of(v: Fraction, fmt: FloatFormat) -> Fraction:
    """ULP of the exact value v in fmt: 2**(max(floor(log2|v|), emin) - p + 1), capped at emax."""
    if v == 0:
        e = _emin(fmt)
    else:
        n = abs(v)
        e = max(min(_floor_log2(n.numerator, n.denominator), _emax(fmt)), _emin(fmt))
    return _dyadic(1, e - fmt.precision + 1)


@_subnormals_kept()
def ulp_error(result: Any, exact: Any) -> np.ndarray:
    """Error of ``result`` in ULPs, as a float64 numpy array of ``result``'s shape.

    ``exact`` is either exact values (a ``exact=True`` reference: an object array of
    ``Fraction``; or any float array of another dtype, taken as exact numbers), giving
    ``|result - exact| / ulp(exact)`` in ``result``'s format (<= 0.5 when correctly
    rounded); or a rounded reference of ``result``'s own dtype, giving the integer ULP
    distance. NaN where exactly one side is NaN (so ``max()`` cannot hide it), 0 where
    both are; inf where ``result`` is infinite and the exact value is not.
    """
    res_bits = _bits(result, "result")
    fmt = res_bits.fmt
    if fmt.name not in TARGET_DTYPES:
        raise InputError(f"ulp_error supports results of dtype {', '.join(TARGET_DTYPES)}, got {fmt.name}")
    if isinstance(exact, (list, tuple, Fraction, int)):
        exact = np.array(exact, dtype=object)
    exact_is_objects = isinstance(exact, np.ndarray) and exact.dtype == object
    if not exact_is_objects:
        ex_bits = _bits(exact, "exact")
        if ex_bits.fmt == fmt:
            d = ulp_distance(result, exact).astype(np.float64)
            return np.where(d == -1, np.nan, d)
    rv, _ = _values(result, "result")
    if exact_is_objects:
        ev = exact
    else:
        ev, _ = _values(exact, "exact")
    if tuple(np.shape(ev)) != rv.shape:
        raise InputError(f"shape mismatch: result {rv.shape}, exact {np.shape(ev)}")
    out = np.empty(rv.size, dtype=np.float64)
    for i, (r, e) in enumerate(zip(rv.reshape(-1), np.asarray(ev, dtype=object).reshape(-1))):
        r = float(r)
        if isinstance(e, (float, np.floating)) and not math.isfinite(float(e)):
            ef = float(e)
            if math.isnan(r) and math.isnan(ef):
                out[i] = 0.0
            elif math.isnan(r) or math.isnan(ef):
                out[i] = math.nan
            else:
                out[i] = 0.0 if r == ef else math.inf
            continue
        if math.isnan(r):
            out[i] = math.nan
            continue
        if math.isinf(r):
            out[i] = math.inf
            continue
        ef = Fraction(e)
        out[i] = float(abs(Fraction(r) - ef) / _ulp_of(ef, fmt))
    return out.reshape(rv.shape)
