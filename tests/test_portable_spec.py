"""The fast portable CPU kernels equal the executable spec bit for bit.

``detkit.kernels.spec`` is ``docs/canonical-orders.md`` written as plain Python; the
numba kernels in ``detkit.kernels.portable_cpu`` must reproduce it exactly on random
and adversarial inputs (every fp32 bit pattern incl. NaN/Inf/subnormals, cancellation,
huge and tiny magnitudes, lengths that straddle the 32 lanes and the 256 tiles). Also:
the invariances the canonical orders promise (batch, padding, decode vs prefill,
thread count), exp/log accuracy, and clear errors.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detkit.errors import BackendUnavailable, InputError
from detkit.kernels import portable_cpu as P
from detkit.kernels import spec as S

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("normal", "bits", "cancel", "scaled", "special")
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(autouse=True)
def _quiet_numpy():
    with np.errstate(all="ignore"):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    gb, wb = bits(got), bits(want)
    if not torch.equal(gb, wb):
        idx = (gb != wb).nonzero()[0].tolist()
        raise AssertionError(
            f"{int((gb != wb).sum())} of {gb.numel()} elements differ; first at {idx}: "
            f"got {got[tuple(idx)].item()!r} want {want[tuple(idx)].item()!r}"
        )


def make(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Adversarial float tensors; reduced-precision ones are built from bit patterns."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if kind == "bits":
        if dtype == torch.float32:
            raw = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.int32)
            return torch.from_numpy(raw.copy()).view(torch.float32).reshape(shape)
        raw = rng.integers(0, 2**16, n, dtype=np.uint32).astype(np.uint16).view(np.int16)
        return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)
    v = rng.standard_normal(n) * 3.0
    if kind == "cancel":  # pairs x, -x(1 + tiny): sums cancel catastrophically
        half = n // 2
        v[1 : 2 * half : 2] = -v[0 : 2 * half : 2] * (1.0 + rng.standard_normal(half) * 1e-6)
    elif kind == "scaled":  # huge, tiny and subnormal magnitudes in one row
        lo, hi = (-24, 15) if dtype == torch.float16 else (-140, 120)
        v = v * np.exp2(rng.integers(lo, hi, n).astype(np.float64))
    elif kind == "special":
        pool = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-42, -3e-39, 3e38, -3e38])
        hit = rng.random(n) < 0.15
        v[hit] = rng.choice(pool, int(hit.sum()))
    return torch.from_numpy(v.reshape(shape)).to(dtype)


case = st.tuples(st.sampled_from(DTYPES), st.sampled_from(KINDS), st.integers(0, 2**31 - 1))


# ---------------------------------------------------------------- fast == spec


@given(case, st.integers(1, 3), st.integers(1, 300), st.sampled_from([1, 5, 16, 33, 257]),
       st.booleans(), st.booleans())
def test_matmul_matches_spec(c, m, k, n, transposed, with_bias):
    dtype, kind, seed = c
    if n * k * m > 40_000:
        k = max(1, 40_000 // (n * m))
    a = make(kind, (m, k), dtype, seed)
    b = make(kind, (n, k), dtype, seed + 1).T if transposed else make(kind, (k, n), dtype, seed + 1)
    bias = make(kind, (n,), dtype, seed + 2) if with_bias else None
    assert_same_bits(P.matmul(a, b, bias), S.matmul(a, b, bias))


@given(case, st.integers(1, 6), st.integers(1, 40), st.integers(0, 150), st.integers(1, 40), st.booleans(),
       st.booleans())
def test_batched_matmul_matches_spec_and_each_entrys_product(c, batch, m, k, n, transposed, with_bias):
    """One kernel call for all entries (a depthwise conv's thousands of tiny products) gives
    each entry the bits of its own 2-D product, which for up to 4 rows of a transposed b
    takes another kernel (matmul_wt_small)."""
    dtype, kind, seed = c
    a = make(kind, (batch, m, k), dtype, seed)
    b = make(kind, (batch, n, k), dtype, seed + 1).transpose(1, 2) if transposed else make(kind, (batch, k, n), dtype,
                                                                                            seed + 1)
    bias = make(kind, (n,), dtype, seed + 2) if with_bias else None
    got = P.matmul(a, b, bias)
    assert_same_bits(got, S.matmul(a, b, bias))
    for i in range(batch):
        assert_same_bits(got[i], P.matmul(a[i], b[i], bias))


@given(case, st.integers(1, 4), st.integers(1, 100), st.booleans())
def test_softmax_matches_spec(c, rows, length, log):
    dtype, kind, seed = c
    x = make(kind, (rows, length), dtype, seed)
    assert_same_bits(P.softmax(x, log), S.softmax(x, log))


@given(case, st.integers(1, 4), st.integers(1, 100), st.booleans())
def test_row_sum_matches_spec(c, rows, length, mean):
    dtype, kind, seed = c
    x = make(kind, (rows, length), dtype, seed)
    assert_same_bits(P.row_sum(x, mean), S.row_sum(x, mean))


@given(case, st.integers(1, 4), st.integers(1, 100))
def test_row_cumsum_matches_spec(c, rows, length):
    dtype, kind, seed = c
    x = make(kind, (rows, length), dtype, seed)
    assert_same_bits(P.row_cumsum(x), S.row_cumsum(x))


@given(case, st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.booleans())
def test_solve_lower_matches_spec(c, batch, n, k, unit):
    dtype, kind, seed = c
    a = make(kind, (batch, n, n), dtype, seed)
    b = make(kind, (batch, n, k), dtype, seed + 1)
    assert_same_bits(P.solve_lower(a, b, unit), S.solve_lower(a, b, unit))


@given(case, st.integers(1, 4), st.integers(1, 100), st.booleans(), st.booleans(),
       st.sampled_from([1e-5, 1e-6, 0.0]))
def test_norms_match_spec(c, rows, length, with_weight, with_bias, eps):
    dtype, kind, seed = c
    x = make(kind, (rows, length), dtype, seed)
    w = make("normal", (length,), dtype, seed + 1) if with_weight else None
    b = make("normal", (length,), dtype, seed + 2) if with_bias else None
    assert_same_bits(P.rms_norm(x, w, eps), S.rms_norm(x, w, eps))
    assert_same_bits(P.layer_norm(x, w, b, eps), S.layer_norm(x, w, b, eps))


@given(case, st.integers(1, 2), st.sampled_from([(2, 1), (2, 2), (4, 2)]), st.integers(1, 5),
       st.integers(1, 40), st.integers(1, 9), st.sampled_from(["none", "bool", "float", "causal"]))
def test_attention_matches_spec(c, nb, heads, lq, lk, d, mask_kind):
    dtype, kind, seed = c
    h, hk = heads
    q = make(kind, (nb, h, lq, d), dtype, seed)
    k = make(kind, (nb, hk, lk, d), dtype, seed + 1)
    v = make(kind, (nb, hk, lk, d + 1), dtype, seed + 2)
    rng = np.random.default_rng(seed)
    mask = None
    if mask_kind == "bool":
        mask = torch.from_numpy(rng.random((nb, 1, lq, lk)) < 0.7)
    elif mask_kind == "causal":  # SDPA's top-left alignment, as the front end folds it
        mask = torch.ones(lq, lk, dtype=torch.bool).tril()
    elif mask_kind == "float":
        mv = rng.standard_normal((1, h, lq, lk))
        mv[rng.random(mv.shape) < 0.3] = -np.inf
        mask = torch.from_numpy(mv).float()
    scale = float(rng.uniform(0.05, 1.0))
    assert_same_bits(P.attention(q, k, v, mask, scale), S.attention(q, k, v, mask, scale))


@given(case, st.sampled_from(P.ELEMENTWISE_OPS), st.integers(1, 300))
def test_elementwise_matches_spec(c, name, n):
    dtype, kind, seed = c
    x = make(kind, (n,), dtype, seed)
    assert_same_bits(P.elementwise(name, x), S.elementwise(name, x))


def test_elementwise_special_values():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 88.72, 88.73,
                      -103.9, -104.5, 1e-45, 1.17e-38, 3.4e38, -87.5])
    for name in P.ELEMENTWISE_OPS:
        assert_same_bits(P.elementwise(name, x), S.elementwise(name, x))
    e = P.elementwise("exp", x)
    assert e[0] == 1 and e[4] == math.inf and e[5] == 0 and e[8] == math.inf and e[10] == 0
    th = P.elementwise("tanh", x)  # odd at zero too, as torch's: -0 stays -0
    assert math.copysign(1.0, float(th[0])) == 1.0 and math.copysign(1.0, float(th[1])) == -1.0
    lg = P.elementwise("log", x)
    assert lg[0] == -math.inf and lg[2] == 0 and lg[4] == math.inf and torch.isnan(lg[3])


def test_spec_fma_fast_path_is_exact():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    b = (rng.standard_normal(20_000) * np.exp2(rng.integers(-70, 70, 20_000))).astype(np.float32)
    c = -(a.astype(np.float64) * b).astype(np.float32)  # near-total cancellation
    c[::3] = rng.standard_normal(c[::3].shape[0]).astype(np.float32)
    for x, y, z in zip(a, b, c, strict=True):
        got, want = S.fma(x, y, z), S.fma_exact(x, y, z)
        assert got.view(np.uint32) == want.view(np.uint32) or (np.isnan(got) and np.isnan(want))
    # A double-rounding trap: exact value just above an fp32 midpoint.
    one = np.float32(1.0)
    tiny = np.float32(2.0**-60)
    assert S.fma(one + np.float32(2.0**-23), one, np.float32(2.0**-24) + tiny) == S.fma_exact(
        one + np.float32(2.0**-23), one, np.float32(2.0**-24) + tiny)
    assert S.round_f32(Fraction(1) + Fraction(1, 2**24) + Fraction(1, 2**80)) == np.float32(1 + 2.0**-23)


def test_spec_fma_rounds_at_the_overflow_threshold():
    # a * b is exactly the midpoint 2^128 - 2^103 between FLT_MAX and 2^128: a tiny c
    # below it rounds to FLT_MAX, above it to inf (float64 rounds both onto the midpoint)
    a, b = np.float32(18631 * 2.0**103), np.float32(1801.0)
    tiny = np.float32(2.0**-149)
    for sign in (1, -1):
        sa, big = np.float32(sign) * a, np.float32(sign * np.finfo(np.float32).max)
        assert S.fma(sa, b, -sign * tiny) == big == S.fma_exact(sa, b, -sign * tiny)
        assert S.fma(sa, b, sign * tiny) == sign * math.inf == S.fma_exact(sa, b, sign * tiny)
    # through ChunkDot: part = -2^-149, then fma(a, b, part)
    x = torch.tensor([[-(2.0**-149), float(a)]])
    y = torch.tensor([[1.0], [float(b)]])
    assert_same_bits(P.matmul(x, y, None), S.matmul(x, y, None))


def test_nan_outputs_are_canonical():
    x = torch.tensor([[1.0, math.nan, 2.0], [math.inf, 1.0, 0.0]])
    y = P.softmax(x, False)
    assert (bits(y[torch.isnan(y)]) == 0x7FC00000).all() and torch.isnan(y).all()
    yb = P.softmax(x.bfloat16(), False)
    assert (bits(yb) == 0x7FC0).all()
    yh = P.softmax(x.half(), False)
    assert (bits(yh) == 0x7E00).all()
    # a NaN, or inf + -inf, makes every later running sum the canonical NaN
    neg_nan = torch.tensor([-(2**22) - 1], dtype=torch.int32).view(torch.float32)  # 0xFFBFFFFF
    c = P.row_cumsum(torch.cat([torch.tensor([1.0, math.inf, -math.inf, 2.0]), neg_nan]).reshape(1, 5))
    assert bits(c)[0, :2].tolist() == [0x3F800000, 0x7F800000] and (bits(c)[0, 2:] == 0x7FC00000).all()


# ---------------------------------------------------------------- promised invariances


@given(st.sampled_from(DTYPES), st.integers(0, 2**31 - 1), st.integers(1, 70))
def test_matmul_rows_are_batch_invariant(dtype, seed, m):
    a = make("normal", (m, 300), dtype, seed)
    w = make("normal", (37, 300), dtype, seed + 1)
    bias = make("normal", (37,), dtype, seed + 2)
    full = P.matmul(a, w.T, bias)
    for i in range(m):
        assert_same_bits(full[i : i + 1], P.matmul(a[i : i + 1], w.T, bias))
    # same bits whatever the layout of b
    assert_same_bits(full, P.matmul(a, w.T.contiguous(), bias))


@given(st.sampled_from(DTYPES), st.integers(0, 2**31 - 1), st.integers(0, 40), st.integers(0, 40),
       st.integers(1, 80))
def test_padding_changes_nothing_in_row_ops(dtype, seed, left, right, length):
    x = make("normal", (3, length), dtype, seed)
    pad_l = torch.full((3, left), -math.inf, dtype=dtype)
    pad_r = torch.full((3, right), -math.inf, dtype=dtype)
    padded = torch.cat([pad_l, x, pad_r], dim=1)
    assert_same_bits(P.softmax(padded, False)[:, left : left + length], P.softmax(x, False))
    assert_same_bits(P.softmax(padded, True)[:, left : left + length], P.softmax(x, True))
    zeros = torch.cat([torch.zeros_like(pad_l), x, torch.zeros_like(pad_r)], dim=1)
    assert_same_bits(P.row_sum(zeros, False), P.row_sum(x, False))
    assert_same_bits(P.row_cumsum(zeros)[:, left : left + length], P.row_cumsum(x))


@given(st.sampled_from(DTYPES), st.integers(0, 2**31 - 1), st.integers(0, 9), st.integers(1, 30))
def test_attention_padding_and_decode_change_nothing(dtype, seed, pad, lk):
    q = make("normal", (1, 4, lk, 16), dtype, seed)
    k = make("normal", (1, 2, lk, 16), dtype, seed + 1)
    v = make("normal", (1, 2, lk, 8), dtype, seed + 2)
    causal = torch.ones(lk, lk, dtype=torch.bool).tril()
    prefill = P.attention(q, k, v, causal, 0.25)
    # decode: the last query alone against all keys
    assert_same_bits(P.attention(q[:, :, -1:], k, v, None, 0.25), prefill[:, :, -1:])
    # left padding with garbage (even NaN) keys, masked out by a bool mask
    junk_k = torch.full((1, 2, pad, 16), math.nan, dtype=dtype)
    kp, vp = torch.cat([junk_k, k], 2), torch.cat([junk_k[..., :8], v], 2)
    mask = torch.cat([torch.zeros(lk, pad, dtype=torch.bool), causal], 1)
    assert_same_bits(P.attention(q, kp, vp, mask, 0.25), prefill)
    # the same with an additive -inf mask (finite junk keys)
    kf, vf = torch.cat([torch.ones_like(junk_k), k], 2), torch.cat([torch.ones_like(junk_k[..., :8]), v], 2)
    fmask = torch.zeros(lk, pad + lk).masked_fill(~mask, -math.inf)
    assert_same_bits(P.attention(q, kf, vf, fmask, 0.25), prefill)


@given(st.integers(0, 2**31 - 1), st.integers(1, 150), st.integers(150, 700))
def test_thread_count_changes_nothing(seed, rows, length):
    # sizes straddle the single-thread threshold; threads split rows / tiles / elements
    before = torch.get_num_threads()
    a = make("normal", (rows, length), torch.float32, seed)
    w = make("normal", (300, length), torch.bfloat16, seed + 1)
    x = make("special", (rows, length), torch.float32, seed + 2)
    q = make("normal", (1, 2, rows, 16), torch.float32, seed + 3)
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append([P.matmul(a.bfloat16(), w.T, None), P.matmul(a, w.float().T.contiguous(), None),
                         P.softmax(x, True), P.rms_norm(x, None, 1e-6), P.row_sum(x, False),
                         P.row_cumsum(x), P.solve_lower(x[None, :, : x.shape[0]], x[None], True),
                         P.solve_lower(x[:, :1, None], x[:, None, :], False), P.layer_norm(x, None, None, 1e-5), P.elementwise("silu", x),
                         P.attention(q, q, q, None, 0.25)])
    finally:
        torch.set_num_threads(before)
    for got in outs[1:]:
        for g, w0 in zip(got, outs[0], strict=True):
            assert_same_bits(g, w0)


# ---------------------------------------------------------------- accuracy and errors


def _ulp_err(y: float, exact: float) -> float:
    if exact == 0:
        return 0.0 if y == 0 else math.inf
    e = math.frexp(abs(exact))[1] - 1
    return abs(y - exact) / 2.0 ** (max(e, -126) - 23)


def test_exp_and_log_within_one_ulp():
    # float64 libm references are within 1e-8 fp32 ULP of exact: enough to bound by 1 ULP.
    rng = np.random.default_rng(11)
    xs = np.concatenate([rng.uniform(-103, 88.7, 20_000), rng.uniform(-1, 1, 5_000)]).astype(np.float32)
    ye = P.elementwise("exp", torch.from_numpy(xs)).numpy()
    assert max(_ulp_err(float(y), math.exp(float(x))) for x, y in zip(xs, ye, strict=True)) < 1.0
    ls = np.exp2(rng.uniform(-149, 128, 20_000)).astype(np.float32)
    ls = ls[(ls > 0) & np.isfinite(ls)]
    yl = P.elementwise("log", torch.from_numpy(ls)).numpy()
    assert max(_ulp_err(float(y), math.log(float(x))) for x, y in zip(ls, yl, strict=True)) < 1.0


def test_erf_within_two_ulp_and_its_branch_edges_match_the_spec():
    # Measured over every float32: at most 1.13 ULP (docs/canonical-orders.md, section 2.6).
    rng = np.random.default_rng(12)
    xs = np.concatenate([rng.uniform(-5, 5, 20_000), np.exp2(rng.uniform(-140, 0, 5_000))]).astype(np.float32)
    ye = P.elementwise("erf", torch.from_numpy(xs)).numpy()
    assert max(_ulp_err(float(y), math.erf(float(x))) for x, y in zip(xs, ye, strict=True)) < 2.0
    edges = [np.nextafter(np.float32(1), np.float32(0)), 1.0, np.nextafter(np.float32(3.875), np.float32(0)), 3.875]
    x = torch.tensor([v for e in edges for v in (e, -e)], dtype=torch.float32)
    got = P.elementwise("erf", x)
    assert_same_bits(got, S.elementwise("erf", x))
    assert torch.equal(got[6:], torch.tensor([1.0, -1.0])) and torch.all(got[:6].abs() < 1)
    # Erf is odd and monotone at the branch edges: no step back where the branches meet.
    assert torch.equal(got[0::2], -got[1::2]) and torch.all(got[0::2].diff() >= 0)


def test_sin_and_cos_within_two_ulp_over_the_whole_float32_range():
    # Measured over every float32: at most 1.50 ULP (section 2.7);
    # the reduction by 2/pi is exact, so huge arguments are as accurate as small ones.
    rng = np.random.default_rng(13)
    xs = np.concatenate([rng.uniform(-1000, 1000, 10_000), np.exp2(rng.uniform(-12, 127, 5_000)),
                         -np.exp2(rng.uniform(-20, 127, 5_000))]).astype(np.float32)
    x = torch.from_numpy(xs)
    for name, exact in (("sin", math.sin), ("cos", math.cos)):
        y = P.elementwise(name, x).numpy()
        assert max(_ulp_err(float(v), exact(float(u))) for u, v in zip(xs, y, strict=True)) < 2.0, name
    # Odd and even, the tiny-argument shortcut, and no value outside [-1, 1] anywhere.
    assert torch.equal(P.elementwise("sin", -x), -P.elementwise("sin", x))
    assert torch.equal(P.elementwise("cos", -x), P.elementwise("cos", x))
    tiny = torch.tensor([0.0, -0.0, 1e-40, -2.0**-13], dtype=torch.float32)
    assert_same_bits(P.elementwise("sin", tiny), tiny)
    assert bool((P.elementwise("cos", tiny) == 1).all())
    assert float(P.elementwise("sin", x).abs().max()) <= 1 and float(P.elementwise("cos", x).abs().max()) <= 1


def test_softplus_within_three_ulp_and_exact_where_torch_is():
    # log1p(y) as Log(1 + y) * (y / ((1 + y) - 1)): accurate for tiny exp(x), where a plain
    # Log(1 + y) returns 0 (below x ~ -17).
    rng = np.random.default_rng(14)
    xs = np.concatenate([rng.uniform(-100, 30, 20_000), [-17.5, -30.0, -87.0, 19.999998, 20.0, 20.000002]])
    xs = xs.astype(np.float32)
    y = P.elementwise("softplus", torch.from_numpy(xs)).numpy()
    exact = [float(v) if v > 20 else math.log1p(math.exp(float(v))) for v in xs]
    assert max(_ulp_err(float(a), e) for a, e in zip(y, exact, strict=True)) < 3.0
    assert y[-1] == xs[-1]  # above the threshold: x itself
    assert float(y[-4]) > 0  # softplus(-87) ~ exp(-87) = 1.6e-38, where Log(1 + y) would give 0


def test_log1p_within_three_ulp_exact_where_one_plus_x_is_and_c99_special_values():
    # Measured over every float32 above -1: at most 2.47 ULP (docs/accuracy-portable.md).
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(15)
    xs = np.concatenate([2.0 ** rng.uniform(-24, 64, 3_000) - 1,
                         np.exp2(rng.uniform(-40, -1, 1_000)) * rng.choice([-1.0, 1.0], 1_000)]).astype(np.float32)
    y = P.elementwise("log1p", torch.from_numpy(xs)).numpy()
    with mpmath.workdps(30):
        exact = [float(mpmath.log1p(mpmath.mpf(float(v)))) for v in xs]
    assert max(_ulp_err(float(a), e) for a, e in zip(y, exact, strict=True)) < 3.0
    # Where 1 + x is exact (Llama 4's attention temperature: log1p of a floored quotient,
    # a small integer), x / ((1 + x) - 1) is 1 and the result is Log(1 + x) itself.
    ints = np.concatenate([np.arange(0, 4097), rng.integers(4097, 2**24 - 1, 2_000)]).astype(np.float32)
    halves = np.array([-0.5, -0.75, -0.9375, 0.5, 0.25, 3.5, 1000.125], dtype=np.float32)
    for x in (torch.from_numpy(ints), torch.from_numpy(halves)):
        assert_same_bits(P.elementwise("log1p", x), P.elementwise("log", x + 1))  # x + 1: exact
    # C99's log1p: -0 and tiny x kept, -1 to -inf, below -1 and NaN to NaN, +inf to +inf.
    x = torch.tensor([-0.0, 2.0**-24, -(2.0**-25), 1e-30, 1e-45, -1.0, -1.0000001, -2.0, -math.inf, math.nan,
                      math.inf, 3.4028235e38, -0.99999994])
    got = P.elementwise("log1p", x)
    assert_same_bits(got, S.elementwise("log1p", x))
    assert_same_bits(got[:5], x[:5])
    assert got[5] == -math.inf and got[10] == math.inf and math.isfinite(float(got[11])) and float(got[12]) < -15
    assert bits(got[6:10]).tolist() == [0x7FC00000] * 4  # the canonical NaN


def test_bad_input_is_rejected():
    with pytest.raises(InputError, match="float64"):
        P.softmax(torch.zeros(2, 3, dtype=torch.float64), False)
    with pytest.raises(InputError, match="elementwise"):
        P.elementwise("mish", torch.zeros(3))
    with pytest.raises(InputError, match="float64"):
        S.softmax(torch.zeros(2, 3, dtype=torch.float64), False)


def test_flush_to_zero_is_refused():
    try:
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        with pytest.raises(BackendUnavailable, match="subnormal"):
            P.softmax(torch.zeros(1, 3), False)
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_final_rounding_is_ieee_nearest_even(dtype):
    # every fp32 bit pattern class: compare with torch's conversion for non-NaN values
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)
    raw[:4] = [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x33000001]  # ties to even, overflow, tiny
    x = torch.from_numpy(raw.view(np.int32).copy()).view(torch.float32)
    x = x[~torch.isnan(x)]
    want = x.to(dtype)
    assert_same_bits(S.finish(x.numpy(), dtype), want)
    assert_same_bits(P._finish(x.numpy().copy(), dtype), want)


@pytest.mark.parametrize("rows", [1, 5])  # in-place weight path (few rows) and packed path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widening_and_rounding_every_16_bit_pattern(dtype, rows):
    # through the matmul's in-kernel widening and the output rounding:
    # 1 * x + 0 must give x back for every pattern except -0 (-> +0) and NaN (canonical)
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    got = P.matmul(torch.ones(rows, 1, dtype=dtype), x.reshape(-1, 1).T, None)[-1]
    want = torch.where(x == 0, torch.zeros_like(x), x)
    nan = torch.isnan(x)
    assert_same_bits(got[~nan], want[~nan])
    assert (bits(got[nan]) == (0x7FC0 if dtype == torch.bfloat16 else 0x7E00)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_dots_use_256_chunks(dtype):
    # K and head dim beyond one ChunkDot chunk (and not a multiple of it)
    a, b = make("cancel", (2, 600), dtype, 21), make("normal", (600, 3), dtype, 22)
    assert_same_bits(P.matmul(a, b, None), S.matmul(a, b, None))
    q, k, v = (make("normal", s, dtype, 23 + i) for i, s in enumerate([(1, 1, 2, 300), (1, 1, 3, 300), (1, 1, 3, 4)]))
    assert_same_bits(P.attention(q, k, v, None, 0.1), S.attention(q, k, v, None, 0.1))
    # K <= 256 is the plain fma-sequential chain
    x, y = make("normal", (200,), torch.float32, 30).numpy(), make("normal", (200,), torch.float32, 31).numpy()
    acc = np.float32(0.0)
    for xi, yi in zip(x, y, strict=True):
        acc = S.fma_exact(xi, yi, acc)
    assert S.seq_dot(x, y).view(np.uint32) == acc.view(np.uint32)


def test_signed_zero_rules():
    # an fma chain can underflow to -0; ChunkDot's final `+0.0 + part` makes it +0
    a = torch.tensor([[-1e-30, 0.0]])
    b = torch.tensor([[1e-30], [5.0]])
    for got in (P.matmul(a, b, None), S.matmul(a, b, None)):
        assert bits(got).item() == 0
    # rows whose maximum is a signed zero
    x = torch.tensor([[-0.0, 0.0, -1.0], [-0.0, -0.0, -3.0], [-0.0, -math.inf, -math.inf]])
    for log in (False, True):
        assert_same_bits(P.softmax(x, log), S.softmax(x, log))


def test_the_portable_backend_refuses_shapes_that_do_not_multiply() -> None:
    """Its numba kernels index without bounds checks: a batch of b shorter than a's, or a
    K that differs, read past b (the batched kernel) instead of raising."""
    from detkit.errors import InputError

    a = torch.ones(3, 2, 4)
    for b, bias in ((torch.ones(2, 4, 5), None), (torch.ones(3, 5, 5), None), (torch.ones(3, 4, 5), torch.ones(4)),
                    (torch.ones(4, 5), None)):
        with pytest.raises(InputError, match="do not multiply"):
            P.matmul(a, b, bias)
    with pytest.raises(InputError, match="do not multiply"):
        P.matmul(a[0], torch.ones(3, 5), None)
