"""detkit.reference: correctly rounded results checked against brute-force exact arithmetic.

The oracle below is independent of detkit's rounding code: it lets Python round the exact
value to float64 (``float(Fraction)`` is correctly rounded), lets torch convert that to the
target dtype, and then picks, among that value and its neighbours, the one nearest to the
exact value by exact rational comparison (ties to the even bit pattern; +-inf counts as
2**(emax+1), as IEEE 754's overflow rule says).
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detkit import reference as R
from detkit.compare import ulp_distance
from detkit.errors import InputError

TARGETS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
MANT_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _overflow_value(dtype: torch.dtype) -> Fraction:
    # 2**(emax + 1); the largest finite value of each format is an integer below it.
    return Fraction(2) ** int(torch.finfo(dtype).max).bit_length()


def oracle(v: Fraction, dtype: torch.dtype) -> float:
    """Round the exact ``v`` to nearest-even in ``dtype`` by brute force over neighbours."""
    big = torch.finfo(torch.float64).max
    approx = float(max(min(v, Fraction(big)), Fraction(-big)))
    c = torch.tensor([approx], dtype=torch.float64).to(dtype)
    up, down = torch.tensor([math.inf], dtype=dtype), torch.tensor([-math.inf], dtype=dtype)
    cands = [c]
    for direction in (up, down):
        t = c
        for _ in range(2):
            t = torch.nextafter(t, direction)
            cands.append(t)
    inf_value = _overflow_value(dtype)

    def value(t: torch.Tensor) -> Fraction:
        x = t.item()
        if math.isinf(x):
            return inf_value if x > 0 else -inf_value
        return Fraction(x)

    def key(t: torch.Tensor) -> tuple[Fraction, int]:
        odd = int(t.view(INT_VIEW[dtype]).item()) & 1
        return (abs(value(t) - v), odd)

    best = min(cands, key=key).item()
    if best == 0 and v < 0:
        return -0.0
    return best


def assert_correctly_rounded(got: torch.Tensor, exact: list[Fraction], dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    flat = got.reshape(-1)
    assert flat.numel() == len(exact)
    for i, v in enumerate(exact):
        want = oracle(v, dtype)
        g = flat[i].item()
        assert g == want, f"element {i}: got {g!r}, correctly rounded {want!r} (exact {float(v)!r})"
        if v != 0:
            assert math.copysign(1, g) == (1 if v > 0 else -1)


def to_fraction(m: mpmath.mpf) -> Fraction:
    sign, man, exp, _ = m._mpf_  # (man_exp drops the sign)
    return (-1 if sign else 1) * Fraction(int(man)) * Fraction(2) ** int(exp)


# ------------------------------------------------------------------ rounding itself


def test_double_rounding_through_float64_does_not_leak() -> None:
    terms = [1.0, 2.0**-24, 2.0**-60]
    via_float64 = np.float32(math.fsum(terms))  # fsum rounds to 1 + 2**-24, a float32 tie -> 1.0
    assert float(via_float64) == 1.0
    got = R.sum(np.array(terms), dtype="float32")
    assert got.dtype == torch.float32 and got.item() == 1.0 + 2.0**-23
    assert R.round_fraction(Fraction(1) + Fraction(1, 2**24) + Fraction(1, 2**60), "float32") == 1.0 + 2.0**-23
    assert R.dot(np.array([1.0, 1.0, 1.0]), np.array(terms), dtype=torch.float32).item() == 1.0 + 2.0**-23


@pytest.mark.parametrize("dtype", TARGETS)
@given(
    mant=st.integers(1, 2**70),
    exp2=st.integers(-1200, 1100),
    den=st.sampled_from([1, 3, 5, 7, 11, 1000003]),
    neg=st.booleans(),
)
def test_round_fraction_matches_oracle(dtype: torch.dtype, mant: int, exp2: int, den: int, neg: bool) -> None:
    finfo = torch.finfo(dtype)
    # Map exp2 onto this format's interesting range, below the smallest subnormal through
    # overflow (mant contributes up to 70 more bits).
    lo, hi = int(math.log2(finfo.smallest_normal)) - MANT_BITS[dtype] - 3, int(math.log2(finfo.max)) + 3
    e = lo - 70 + (exp2 + 1200) * (hi - lo + 70) // 2300
    v = Fraction(mant, den) * Fraction(2) ** e * (-1 if neg else 1)
    got = R.round_fraction(v, dtype)
    want = oracle(v, dtype)
    assert got == want and math.copysign(1, got) == math.copysign(1, want)


@pytest.mark.parametrize("dtype", TARGETS)
@given(
    frac=st.one_of(st.integers(0, 2**20), st.sampled_from([0, 1, 2**20])),
    direction=st.sampled_from([-1, 0, 1]),
)
def test_ties_go_to_even_and_near_ties_to_the_nearer(dtype: torch.dtype, frac: int, direction: int) -> None:
    # Two adjacent non-negative values a < b (b may be inf), their exact midpoint, and a hair off it.
    max_bits = int(torch.tensor([torch.finfo(dtype).max], dtype=dtype).view(INT_VIEW[dtype]).item())
    pattern = frac * max_bits // 2**20
    a = torch.tensor([pattern], dtype=INT_VIEW[dtype]).view(dtype)
    b = torch.nextafter(a, torch.tensor([math.inf], dtype=dtype))
    fa = Fraction(a.item())
    fb = _overflow_value(dtype) if math.isinf(b.item()) else Fraction(b.item())
    mid = (fa + fb) / 2 + direction * (fb - fa) / 2**80
    got = R.round_fraction(mid, dtype)
    if direction == 0:
        even = a if int(a.view(INT_VIEW[dtype]).item()) % 2 == 0 else b
        assert got == even.item()
    else:
        assert got == (b if direction > 0 else a).item()


def test_overflow_and_underflow_boundaries_float32() -> None:
    fmax = Fraction(torch.finfo(torch.float32).max)
    half_ulp = Fraction(2) ** (127 - 24)
    assert R.round_fraction(fmax + half_ulp - Fraction(1, 10**9), "float32") == float(fmax)
    assert R.round_fraction(fmax + half_ulp, "float32") == math.inf  # tie, max is odd -> inf
    tiny = Fraction(2) ** -149
    assert R.round_fraction(tiny / 2, "float32") == 0.0  # tie with 0 -> 0 (even)
    assert R.round_fraction(tiny / 2 + Fraction(2) ** -300, "float32") == 2.0**-149
    assert math.copysign(1, R.round_fraction(-tiny / 3, "float32")) == -1
    assert R.round_fraction(Fraction(3, 2) * tiny, "float32") == 2 * 2.0**-149  # tie -> even (2)


# ------------------------------------------------------------------ exact sums


def float_vectors(width: int, size: int) -> st.SearchStrategy[list[float]]:
    wide = st.floats(width=width, allow_nan=False, allow_infinity=False)
    moderate = st.floats(-4.0, 4.0, width=width)
    return st.lists(st.one_of(wide, moderate), min_size=size, max_size=size)


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.float64 if dtype == torch.float64 else np.float32


@pytest.mark.parametrize("dtype", TARGETS)
@given(data=st.data())
def test_dot_and_sum_correctly_rounded(dtype: torch.dtype, data: st.DataObject) -> None:
    width = 64 if dtype == torch.float64 else 32
    n = data.draw(st.integers(1, 12))
    x = data.draw(float_vectors(width, n))
    y = data.draw(float_vectors(width, n))
    # Cancellation: append -x[0]*y[0] as an extra term so the big part cancels exactly.
    x2 = np.array(x + [-x[0]], dtype=_np_dtype(dtype))
    y2 = np.array(y + [y[0]], dtype=_np_dtype(dtype))
    exact = sum((Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x2, y2)), Fraction(0))
    got = R.dot(torch.from_numpy(x2), torch.from_numpy(y2), dtype=dtype)
    assert got.shape == ()
    assert_correctly_rounded(got, [exact], dtype)
    exact_sum = sum((Fraction(float(a)) for a in x2), Fraction(0))
    assert_correctly_rounded(R.sum(x2, dtype=dtype).reshape(1), [exact_sum], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(data=st.data())
def test_subnormal_results(dtype: torch.dtype, data: st.DataObject) -> None:
    # Exact products are multiples of 2**-170 below 3 * 2**-130: float32/bfloat16 subnormals.
    mant = data.draw(st.lists(st.integers(-(2**20), 2**20), min_size=6, max_size=6))
    x = np.array([m * 2.0**-100 for m in mant[:3]], dtype=np.float32)
    y = np.array([m * 2.0**-70 for m in mant[3:]], dtype=np.float32)
    exact = sum((Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x, y)), Fraction(0))
    assert abs(exact) < Fraction(2) ** -126  # really subnormal (or zero)
    assert_correctly_rounded(R.dot(x, y, dtype=dtype).reshape(1), [exact], dtype)
    sx = np.array([m * 2.0**-140 for m in mant], dtype=np.float32)
    assert_correctly_rounded(
        R.sum(sx, dtype=dtype).reshape(1), [sum((Fraction(float(t)) for t in sx), Fraction(0))], dtype
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_matches_brute_force(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 7, generator=g).to(dtype)
    b = torch.randn(7, 4, generator=g).to(dtype)
    bias = torch.randn(4, generator=g).to(dtype)
    got = R.matmul(a, b, bias)
    exact = [
        sum((Fraction(a[i, k].item()) * Fraction(b[k, j].item()) for k in range(7)), Fraction(bias[j].item()))
        for i in range(5)
        for j in range(4)
    ]
    assert_correctly_rounded(got, exact, dtype)
    batched = R.matmul(torch.stack([a, a]), torch.stack([b, b]), bias)
    assert torch.equal(batched[1], got) and batched.shape == (2, 5, 4)


def test_matmul_64_cube_runs_and_is_exact_to_half_ulp() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    got = R.matmul(a, b)
    exact = R.matmul(a, b, exact=True)
    err = R.ulp_error(got, exact)
    assert err.max() <= 0.5
    # Spot-check against the oracle on one row.
    assert_correctly_rounded(got[7], list(exact[7]), torch.float32)


def test_signed_zero_of_exact_zero_sums() -> None:
    assert math.copysign(1, R.sum(np.array([-0.0, -0.0])).item()) == -1
    assert math.copysign(1, R.sum(np.array([1.0, -1.0])).item()) == 1
    assert math.copysign(1, R.dot(np.array([-0.0, 0.0]), np.array([1.0, -1.0])).item()) == -1


# ------------------------------------------------------------------ transcendental ops


def mp_softmax_row(row: list[float], log: bool) -> list[Fraction | float]:
    with mpmath.workprec(600):
        finite = [t for t in row if math.isfinite(t)]
        m = max(finite)
        s = mpmath.fsum(mpmath.exp(mpmath.mpf(t) - m) for t in finite)
        # log S = log1p(rest) when the maximum is unique: keeps log S accurate when S ~ 1.
        k = sum(1 for t in finite if t == m)
        rest = mpmath.fsum(mpmath.exp(mpmath.mpf(t) - m) for t in finite if t != m)
        log_s = mpmath.log1p(rest) if k == 1 else mpmath.log(k + rest)
        out: list[Fraction | float] = []
        for t in row:
            if not math.isfinite(t):
                out.append(-math.inf if log else 0.0)
            elif log:
                # Subtract exactly: a_j - log S can sit a hair off a rounding midpoint.
                out.append(Fraction(t) - Fraction(m) - to_fraction(log_s))
            else:
                out.append(to_fraction(mpmath.exp(mpmath.mpf(t) - m) / s))
        return out


def check_row(got: torch.Tensor, want: list[Fraction | float], dtype: torch.dtype) -> None:
    for i, w in enumerate(want):
        g = got[i].item()
        if isinstance(w, float):
            assert g == w
        else:
            o = oracle(w, dtype)
            assert g == o, f"element {i}: got {g!r}, correctly rounded {o!r}"


@pytest.mark.parametrize("dtype", TARGETS)
@pytest.mark.parametrize("log", [False, True])
@given(data=st.data())
def test_softmax_and_log_softmax_correctly_rounded(dtype: torch.dtype, log: bool, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 10))
    scale = data.draw(st.sampled_from([0.01, 1.0, 30.0, 1000.0]))
    vals = data.draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=n, max_size=n))
    row = [float(np.float32(v * scale)) for v in vals]
    if data.draw(st.booleans()) and n > 1:
        row[data.draw(st.integers(0, n - 1))] = -math.inf
    if all(math.isinf(t) for t in row):
        row[0] = 0.0
    fn = R.log_softmax if log else R.softmax
    got = fn(torch.tensor([row], dtype=torch.float32), dtype=dtype)
    assert got.dtype == dtype and got.shape == (1, n)
    check_row(got[0], mp_softmax_row(row, log), dtype)


def test_softmax_special_rows() -> None:
    # Ties give exact rationals (1/4 is exactly representable; 1/3 is not and rounds once).
    got = R.softmax(torch.tensor([[0.5, 0.5, -math.inf, 0.5, 0.5], [2.0, 2.0, 2.0, -math.inf, -math.inf]]))
    assert got[0].tolist() == [0.25, 0.25, 0.0, 0.25, 0.25]
    assert got[1, 0].item() == R.round_fraction(Fraction(1, 3), "float32")
    assert torch.isnan(R.softmax(torch.full((1, 3), -math.inf))).all()
    assert R.log_softmax(torch.tensor([[0.0, -math.inf]])).tolist() == [[0.0, -math.inf]]
    # softmax over a non-last dim equals softmax of the transpose.
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(R.softmax(x, dim=0), R.softmax(x.T).T)
    # Tiny tail terms: log_softmax of the max stays accurate (no cancellation in log S).
    got = R.log_softmax(torch.tensor([[0.0, -60.0]], dtype=torch.float64))
    with mpmath.workprec(200):
        want = to_fraction(-mpmath.log1p(mpmath.exp(mpmath.mpf(-60))))
    assert got[0, 0].item() == oracle(want, torch.float64)


@pytest.mark.parametrize("dtype", TARGETS)
def test_log_softmax_of_the_max_with_only_far_below_terms(dtype: torch.dtype) -> None:
    """A row whose other terms all lie below the cutoff (a mask of -1e5 or finfo.min) left
    the max's enclosure at [-log(1 + tiny), 0]: -0 and +0 never agreed and the Ziv loop
    raised DetkitError at 2**15 bits. The value -log(1 + e**-1e5) < 0 rounds to -0."""
    x = torch.tensor([[0.0, -1e4], [3.0, torch.finfo(dtype).min]], dtype=dtype)
    got = R.log_softmax(x)
    assert got.dtype == dtype and got[:, 1].tolist() == x[:, 1].tolist()
    assert got[:, 0].tolist() == [0.0, 0.0] and torch.signbit(got[:, 0]).all()
    assert R.softmax(x)[:, 0].tolist() == [1.0, 1.0]
    # a_1 = -65536 - 2**-8 is a float32 tie; the value, a tiny bit below it, rounds down.
    tie = R.log_softmax(torch.tensor([2.0**-8, -65536.0]))
    assert tie.tolist() == [0.0, -65536.0 - 2.0**-7] and tie[0].item() == 0.0 and torch.signbit(tie[0])


@pytest.mark.parametrize("dtype", TARGETS)
@given(x=st.lists(st.floats(-120.0, 100.0, width=32), min_size=1, max_size=8))
def test_exp_correctly_rounded(dtype: torch.dtype, x: list[float]) -> None:
    got = R.exp(torch.tensor(x, dtype=torch.float32), dtype=dtype)
    with mpmath.workprec(600):
        want = [to_fraction(mpmath.exp(mpmath.mpf(t))) for t in x]
    assert_correctly_rounded(got, want, dtype)


def test_exp_overflow_underflow_and_exact_one() -> None:
    got = R.exp(torch.tensor([89.0, -104.0, 0.0, -103.28, 88.72]))
    assert got[0].item() == math.inf and got[1].item() == 0.0 and got[2].item() == 1.0
    assert got[3].item() == 2.0**-149  # exp(-103.28) ~ 1.5e-45 rounds to the smallest subnormal
    assert math.isfinite(got[4].item())


# ------------------------------------------------------------------ norms


def mp_rms_row(row: list[float], w: list[float], eps: float) -> list[Fraction]:
    xs = [Fraction(t) for t in row]
    r = sum((t * t for t in xs), Fraction(0)) / len(xs) + Fraction(eps)
    with mpmath.workprec(600):
        inv = 1 / mpmath.sqrt(mpmath.mpf(r.numerator) / r.denominator)
        return [to_fraction(mpmath.mpf(t) * wi * inv) for t, wi in zip(row, w)]


def mp_layer_row(row: list[float], w: list[float], b: list[float], eps: float) -> list[Fraction]:
    xs = [Fraction(t) for t in row]
    mu = sum(xs, Fraction(0)) / len(xs)
    var = sum(((t - mu) ** 2 for t in xs), Fraction(0)) / len(xs) + Fraction(eps)
    with mpmath.workprec(600):
        inv = 1 / mpmath.sqrt(mpmath.mpf(var.numerator) / var.denominator)
        mu_mp = mpmath.mpf(mu.numerator) / mu.denominator
        return [to_fraction((mpmath.mpf(t) - mu_mp) * wi * inv + bi) for t, wi, bi in zip(row, w, b)]


@pytest.mark.parametrize("dtype", TARGETS)
@given(data=st.data())
def test_rms_norm_and_layer_norm_correctly_rounded(dtype: torch.dtype, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 9))
    floats = st.floats(-10.0, 10.0, width=32)
    row = [float(np.float32(t)) for t in data.draw(st.lists(floats, min_size=n, max_size=n))]
    w = [float(np.float32(t)) for t in data.draw(st.lists(floats, min_size=n, max_size=n))]
    b = [float(np.float32(t)) for t in data.draw(st.lists(floats, min_size=n, max_size=n))]
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.0]))
    if eps == 0.0 and all(t == row[0] for t in row):
        eps = 1e-5  # a zero variance with eps 0 is 0/0, covered separately
    x = torch.tensor([row], dtype=torch.float32)
    got = R.rms_norm(x, torch.tensor(w), eps=eps, dtype=dtype)
    if any(t != 0 for t in row) or eps:
        want = mp_rms_row(row, w, eps)
        for i, v in enumerate(want):
            if v != 0:  # exact zeros keep the float computation's sign (checked elsewhere)
                assert got[0, i].item() == oracle(v, dtype), f"rms_norm element {i}"
            else:
                assert got[0, i].item() == 0.0
    got = R.layer_norm(x, torch.tensor(w), torch.tensor(b), eps=eps, dtype=dtype)
    for i, v in enumerate(mp_layer_row(row, w, b, eps)):
        if v != 0:
            assert got[0, i].item() == oracle(v, dtype), f"layer_norm element {i}"


def test_norms_exact_cases_and_zero_variance() -> None:
    # Perfect squares make the result rational: x = [3, 4] -> rms = sqrt(12.5).
    got = R.rms_norm(torch.tensor([[3.0, -3.0]]), eps=0.0)
    assert got.tolist() == [[1.0, -1.0]]
    got = R.layer_norm(torch.tensor([[1.0, 3.0]]), eps=0.0)  # mean 2, var 1
    assert got.tolist() == [[-1.0, 1.0]]
    assert torch.isnan(R.rms_norm(torch.zeros(1, 3), eps=0.0)).all()
    assert R.layer_norm(torch.ones(1, 3), bias=torch.tensor([0.5, 0.25, 0.0])).tolist() == [[0.5, 0.25, 0.0]]


def test_layer_norm_zero_result_is_negative_only_when_both_terms_are() -> None:
    # (x - mu) * rstd * w + b with x == mu (x - mu is +0) or w == +-0: the product's zero
    # has the sign of (x - mu) * w, and -0 + -0 is the only sum that stays -0. The -0.0
    # bias used to become Fraction(0), so every such result was +0.
    x = torch.tensor([[1.0, 1.0, 2.0, 0.0], [1.0, 1.0, 2.0, 0.0]])
    w = torch.tensor([-1.0, 1.0, -0.0, -0.0])
    got = R.layer_norm(x, w, torch.full((4,), -0.0))
    assert got.tolist() == [[0.0] * 4] * 2
    assert torch.signbit(got).tolist() == [[True, False, True, False]] * 2
    assert torch.equal(torch.signbit(got), torch.signbit(torch.nn.functional.layer_norm(x, (4,), w, -torch.zeros(4))))
    assert not torch.signbit(R.layer_norm(x, w)).any()  # no bias: no -0 term


def test_norm_rows_are_independent_and_run_at_realistic_sizes() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 256, generator=g)
    w = torch.randn(256, generator=g)
    full = R.rms_norm(x, w)
    assert torch.equal(full[3:4], R.rms_norm(x[3:4], w))
    assert R.ulp_error(full, R.rms_norm(x, w, exact=True)).max() <= 0.5
    sm = R.softmax(x)
    assert R.ulp_error(sm, R.softmax(x, exact=True)).max() <= 0.5


# ------------------------------------------------------------------ ulp_error and errors


def test_ulp_error_fractional_and_integer() -> None:
    exact = Fraction(1, 3)
    rounded = torch.tensor([R.round_fraction(exact, "float32")])
    err = R.ulp_error(rounded, [exact])
    assert 0 < err[0] <= 0.5
    off = torch.nextafter(rounded, torch.tensor([1.0]))
    err_off = R.ulp_error(off, [exact])
    assert 0.5 < err_off[0] <= 1.5 and err_off[0] == pytest.approx(err[0] + 1.0) or err_off[0] == pytest.approx(1 - err[0])
    assert R.ulp_error(off, rounded).tolist() == [1.0]
    # float64 values as the exact reference of a float32 result.
    assert R.ulp_error(torch.tensor([1.0]), torch.tensor([1.0 + 2.0**-30], dtype=torch.float64))[0] == pytest.approx(
        2.0**-30 / 2.0**-23
    )
    nan_vs_num = R.ulp_error(torch.tensor([math.nan]), torch.tensor([1.0]))
    assert math.isnan(nan_vs_num[0])
    assert ulp_distance(rounded, rounded)[0] == 0


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="finite"):
        R.sum(np.array([1.0, math.nan]))
    with pytest.raises(InputError, match="finite values or -inf"):
        R.softmax(torch.tensor([[1.0, math.inf]]))
    with pytest.raises(InputError, match="matmul needs"):
        R.matmul(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(InputError, match="unsupported target dtype"):
        R.sum(np.ones(3), dtype="int32")
    with pytest.raises(InputError, match="weight must have shape"):
        R.rms_norm(torch.ones(2, 3), torch.ones(4))


def test_flush_denormal_mode_does_not_change_the_reference() -> None:
    """torch.set_flush_denormal(True) (FTZ/DAZ on this thread) flushed subnormal inputs and
    results of the reference to zero: sum([2**-140, 2**-140]) was 0 instead of 2**-139."""
    tiny = torch.tensor([2.0**-140, 2.0**-140], dtype=torch.float32)
    x = torch.tensor([[0.0, -100.0, -100.0]], dtype=torch.float32)
    expected = {"sum": R.sum(tiny), "softmax": R.softmax(x), "exp": R.exp(torch.tensor([-100.0]))}
    assert expected["sum"].item() == 2.0**-139
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        got = {"sum": R.sum(tiny), "softmax": R.softmax(x), "exp": R.exp(torch.tensor([-100.0]))}
        err = R.ulp_error(tiny, [Fraction(2) ** -140] * 2)
        # the user's mode is left as it was
        assert torch.tensor(2.0**-1074, dtype=torch.float64).mul(1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
    for name, value in expected.items():
        assert torch.equal(got[name].view(torch.int32), value.view(torch.int32)), name
    assert err.tolist() == [0.0, 0.0]
