"""pow: the canonical ``Pow`` (docs/canonical-orders.md section 2.9) and how the mode routes it.

``Pow`` is evaluated in binary64 and rounded once, so it is checked against the exact
power (mpmath at 300 bits, rounded exactly); the numba kernel against ``spec.pow`` bit for
bit; the mode's overloads (``pow.Tensor_Tensor``, ``pow.Scalar``, ``pow.Tensor_Scalar``,
in place and ``out=``) for position independence outside portable mode (torch's float32
vector path and scalar tail round differently) and for the spec's bits inside it.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import detkit
from detkit.errors import InputError
from detkit.kernels import portable_cpu as P
from detkit.kernels import spec as S
from detkit.reference import round_fraction
from detkit.testing import assert_bitwise_equal

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SPECIAL_X = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 3.4e38,
             -3.4e38, 1.5, -3.0]
SPECIAL_Y = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 0.5, -0.5, 2.5, math.inf, -math.inf, math.nan, 1e30, -1e30,
             16777215.0, 16777216.0, 0.3, 149.0, -149.0, 151.0]
# Float tolerances of "the same value as torch's, but for torch's own last-bit choices"
# (the mode's pow takes the vector path where torch's took the scalar tail; Pow is
# correctly rounded where torch's is 1 ULP off).
RTOL = {torch.float32: 2.0**-22, torch.float64: 2.0**-51, torch.bfloat16: 2.0**-7}

pytestmark = pytest.mark.usefixtures("mode_left_off")


@pytest.fixture(autouse=True)
def _quiet_numpy():
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _exact_power(x: float, y: float) -> Fraction:
    import mpmath

    with mpmath.workprec(300):
        r = mpmath.power(mpmath.mpf(abs(x)), mpmath.mpf(y))
        man, exp = (int(v) for v in r.man_exp)
    mag = Fraction(man) * 2**exp if exp >= 0 else Fraction(man, 2**-exp)
    return -mag if x < 0 and S._is_odd_integer(y) else mag


def _values(bits_: list[int], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.tensor(np.array(bits_, dtype=np.uint32).view(np.int32)).view(torch.float32)
    return torch.tensor(np.array(bits_, dtype=np.uint16).view(np.int16)).view(dtype)


# ----------------------------------------------------------------------------- the spec


@given(x_bits=st.integers(0, 0x7F7FFFFF), negative=st.booleans(),
       y=st.one_of(st.floats(-40, 40, width=32), st.integers(-60, 60).map(float),
                   st.floats(-1e6, 1e6, width=32)))
def test_pow_is_correctly_rounded_or_a_tie_either_way(x_bits: int, negative: bool, y: float) -> None:
    """fp32(w) is the nearest fp32 to x^y: no value is nearer (an exact tie, as an odd
    power can be, may go either way; section 2.9 says why)."""
    x = float(np.uint32(x_bits).view(np.float32)) * (-1.0 if negative else 1.0)
    if x < 0 and y != round(y):
        assert math.isnan(S.pow_(np.float32(x), y))
        return
    got = float(S.pow_(np.float32(x), y))
    exact = _exact_power(x, y)
    nearest = round_fraction(exact, "float32")
    if math.isinf(nearest) or nearest == 0.0:
        assert got == nearest, (x, y, got, nearest)
        return
    assert not math.isinf(got) and abs(Fraction(got) - exact) <= abs(Fraction(nearest) - exact), (x, y, got, nearest)


def test_pow_special_values_are_c99s_as_torch_computes_them() -> None:
    """Zeros, infinities, NaN, +-1, negative bases with integer and other exponents,
    overflow and subnormal results: the same values (NaN-ness and the sign of zero
    included) as torch's CPU pow. (Ties, as 2^-150, which torch rounds to 0, are left to
    the correct-rounding test: Pow may take either neighbour there.)"""
    x = torch.tensor(SPECIAL_X, dtype=torch.float32)[:, None].expand(-1, len(SPECIAL_Y)).contiguous()
    y = torch.tensor(SPECIAL_Y, dtype=torch.float32)[None, :].expand(len(SPECIAL_X), -1).contiguous()
    got, want = S.pow(x, y), torch.pow(x, y)
    same = (torch.isnan(got) & torch.isnan(want)) | ((got == want) & (torch.signbit(got) == torch.signbit(want)))
    bad = [(float(x[i, j]), float(y[i, j]), float(got[i, j]), float(want[i, j])) for i, j in (~same).nonzero().tolist()]
    assert not bad, bad
    # NaN results are the canonical NaN, as every portable op's
    assert bool((bits(got)[torch.isnan(got)] == 0x7FC00000).all())


def test_y_equal_to_two_is_fp32_multiplication_with_its_ties() -> None:
    """(1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 lies exactly between two fp32 values: x * x rounds
    it to even, as Pow must for y == 2 (torch's x.pow(2) is x * x)."""
    x = np.float32(1.0 + 2.0**-12)
    assert S.pow_(x, 2.0) == x * x == np.float32(1.0 + 2.0**-11)


# ----------------------------------------------------------------------------- the numba kernel


@st.composite
def pow_case(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor | float]:
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 300))
    width = 0xFFFFFFFF if dtype == torch.float32 else 0xFFFF
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["bits", "tame", "integer exponents"]))
    if kind == "bits":
        x = _values([int(v) for v in rng.integers(0, width + 1, n)], dtype)
    else:
        x = torch.from_numpy(rng.standard_normal(n) * 4).to(dtype)
    x[: min(n, len(SPECIAL_X))] = torch.tensor(SPECIAL_X[: min(n, len(SPECIAL_X))]).to(dtype)
    if draw(st.booleans()):
        y: torch.Tensor | float = draw(st.sampled_from([1.7, -2.5, 3.0, 0.1, 1e10, -1.0, math.inf, 1.0 / 3.0]))
    elif kind == "integer exponents":
        y = torch.from_numpy(rng.integers(-40, 40, n).astype(np.float32)).to(dtype)
    else:
        y = torch.from_numpy(rng.standard_normal(n) * 6).to(dtype)
        y[: min(n, len(SPECIAL_Y))] = torch.tensor(SPECIAL_Y[: min(n, len(SPECIAL_Y))]).to(dtype)
    return x, y


@given(pow_case())
def test_portable_cpu_pow_equals_the_spec(case: tuple[torch.Tensor, torch.Tensor | float]) -> None:
    x, y = case
    assert_bitwise_equal(P.pow(x, y), S.pow(x, y))


def test_portable_cpu_pow_is_the_same_in_any_shape_and_thread_split() -> None:
    """Each element is computed alone: a tensor split over threads, reshaped, or cut to
    one element gives every element the same bits."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random(70_000) * 8).float()
    y = torch.from_numpy(rng.standard_normal(70_000) * 5).float()
    whole = P.pow(x, y)
    assert_bitwise_equal(P.pow(x.reshape(350, 200), y.reshape(350, 200)).reshape(-1), whole)
    for i in (0, 1, 4095, 4096, 69_999):
        assert_bitwise_equal(P.pow(x[i : i + 1], y[i : i + 1]), whole[i : i + 1])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_bitwise_equal(P.pow(x, y), whole)
    finally:
        torch.set_num_threads(prev)


def test_portable_cpu_pow_rejects_bad_input_clearly() -> None:
    x = torch.rand(4)
    with pytest.raises(InputError, match="float32, bfloat16 and float16"):
        P.pow(x.double(), 2.5)
    with pytest.raises(InputError, match="one dtype"):
        P.pow(x, x.bfloat16())
    with pytest.raises(InputError, match="broadcast them first"):
        P.pow(x, torch.rand(2, 4))


# ----------------------------------------------------------------------------- the mode


def _position_changes(fn: object, *args: torch.Tensor) -> int:
    """Elements whose bits differ between the whole tensor and the element alone."""
    whole = fn(*args)
    alone = torch.stack([fn(*(a[i : i + 1] for a in args))[0] for i in range(whole.shape[0])])
    return int((bits(whole) != bits(alone)).sum())


def test_pow_under_the_mode_does_not_depend_on_an_elements_position() -> None:
    """torch's float32 pow rounds the scalar tail differently from the vector body (73 of
    4,099 elements here, for a tensor exponent and for a scalar base); under the mode
    every element has the same bits alone and in the tensor, and stays within 1 ULP of
    torch's."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4099, generator=g) * 3, torch.randn(4099, generator=g) * 3
    tensor_tensor = torch.pow
    scalar_base = lambda e: torch.pow(2.5, e)  # noqa: E731
    assert _position_changes(tensor_tensor, x, y) > 0, "negative control: torch's pow was position independent"
    assert _position_changes(scalar_base, y) > 0
    with detkit.batch_invariant(strict=True) as bi:
        assert _position_changes(tensor_tensor, x, y) == 0
        assert _position_changes(scalar_base, y) == 0
        routed = torch.pow(x, y)
    assert bi.routed()["pow.Tensor_Tensor"] > 0 and bi.routed()["pow.Scalar"] > 0
    assert (routed - torch.pow(x, y)).abs().le(torch.pow(x, y).abs() * 2**-23).all()


def test_pow_rows_are_batch_invariant_under_the_mode() -> None:
    """A row's pow is the same alone and at every position of batches of 1 to 9 rows
    (rows of 77: a vector body and a tail)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(9, 77, generator=g) * 4, torch.randn(9, 77, generator=g) * 4
    with detkit.batch_invariant(strict=True):
        alone = [torch.pow(x[r : r + 1], y[r : r + 1]) for r in range(9)]
        for b in range(1, 10):
            out = torch.pow(x[:b], y[:b])
            for r in range(b):
                assert_bitwise_equal(out[r : r + 1], alone[r])


def test_the_overloads_keep_torchs_dtypes_layouts_and_values_under_the_mode() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(6, 5, generator=g) + 0.5, torch.randn(6, 5, generator=g)
    cases = {
        "tensor ** tensor": lambda: x.pow(y),
        "broadcast": lambda: x.pow(y[0]),
        "transposed": lambda: torch.pow(x.t(), y.t()),
        "0-d float64 exponent": lambda: x ** torch.tensor(2.5, dtype=torch.float64),
        "integer exponents": lambda: x.pow(torch.arange(30).reshape(6, 5) % 7),
        "scalar base": lambda: torch.pow(2.0, y),
        "scalar base, integer exponents": lambda: torch.pow(1.5, torch.arange(-3, 4)),
        "bfloat16": lambda: x.bfloat16().pow(y.bfloat16()),
        "float64": lambda: x.double().pow(y.double()),
        "integers": lambda: torch.tensor([2, 3]).pow(torch.tensor([3, 2])),
        "in place": lambda: x.clone().pow_(y),
        "out=": lambda: torch.pow(x, y, out=torch.empty(0)),
        "scalar base, out=": lambda: torch.pow(2.0, y, out=torch.empty(0)),
    }
    want = {name: fn() for name, fn in cases.items()}
    for portable in (False, True):
        with detkit.batch_invariant(portable=portable) as bi:
            got = {name: fn() for name, fn in cases.items()}
        assert bi.uncovered() == {}, bi.coverage()
        for name in cases:
            g_, w = got[name], want[name]
            assert (g_.dtype, g_.shape, g_.stride()) == (w.dtype, w.shape, w.stride()), name
            if g_.is_floating_point():
                assert torch.allclose(g_.double(), w.double(), rtol=RTOL[g_.dtype], atol=0), name
            else:
                assert torch.equal(g_, w), name
        if portable:
            assert set(bi.not_portable()) == {"pow.Tensor_Tensor"}, bi.coverage()  # float64 only


def test_portable_mode_computes_pow_with_the_spec_and_torchs_operand_rounding() -> None:
    """Portable mode's pow is the spec's: a float32 tensor's scalar exponent stays a
    binary64 value (torch's CPU kernel keeps it in double), a bfloat16 tensor's is rounded
    to bfloat16 first, and a scalar base is rounded into the exponent's dtype."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(40, generator=g) * 100, torch.randn(40, generator=g) * 3
    xb = x.bfloat16()
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        got = {
            "tensor": x.pow(y), "scalar exponent": x.pow(1.7), "bf16 scalar exponent": xb.pow(1.7),
            "scalar base": torch.pow(1.1, y), "bf16 scalar base": torch.pow(1.1, y.bfloat16()),
            "in place": x.clone().pow_(y), "broadcast": x[:, None].pow(y[None, :8]),
        }
    assert bi.not_portable() == {}, bi.coverage()
    bf = lambda v: float(torch.tensor(v, dtype=torch.bfloat16))  # noqa: E731
    assert_bitwise_equal(got["tensor"], S.pow(x, y))
    assert_bitwise_equal(got["scalar exponent"], S.pow(x, 1.7))
    assert not torch.equal(S.pow(x, 1.7), S.pow(x, float(np.float32(1.7))))  # the check can tell
    assert_bitwise_equal(got["bf16 scalar exponent"], S.pow(xb, bf(1.7)))
    assert_bitwise_equal(got["scalar base"], S.pow(torch.full_like(y, float(np.float32(1.1))), y))
    assert_bitwise_equal(got["bf16 scalar base"], S.pow(torch.full((40,), bf(1.1), dtype=torch.bfloat16), y.bfloat16()))
    assert_bitwise_equal(got["in place"], S.pow(x, y))
    xx, yy = torch.broadcast_tensors(x[:, None], y[None, :8])
    assert_bitwise_equal(got["broadcast"], S.pow(xx.contiguous(), yy.contiguous()))


def test_a_scalar_base_reaches_the_kernel_through_torchs_wrapped_number() -> None:
    """torch's CPU pow.Scalar calls pow_out(wrapped(base), exponent), and a Python kernel
    receives that wrapped tensor as a number: the original kernel's boxed call refused it
    (RuntimeError: Expected a value of type 'Tensor'). Integer exponents (passed through,
    exact) and float ones both went that way."""
    e = torch.arange(-3, 4)
    with detkit.batch_invariant():
        assert torch.equal(torch.pow(2, e.clamp(min=0)), torch.tensor([1, 1, 1, 1, 2, 4, 8]))
        assert torch.equal(torch.pow(2.0, e), torch.pow(2.0, e.float()))
        assert torch.pow(2.0, e.bfloat16()).dtype == torch.bfloat16
