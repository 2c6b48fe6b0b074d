"""Batch invariance of detkit's CPU kernels (portable=False), checked bitwise on every row.

Each property compares a row's bits computed in one situation (alone, in a batch of a
given size, at a given position, among other rows, with 1 or 2 threads, padded, as a
decode step) with the same row computed in another. Values come from a seeded torch
generator so that bfloat16/float16 are covered (hypothesis draws shapes and seeds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from detkit import kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}

dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**31 - 1)


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included, -0.0 != +0.0)."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    iv = _INT_VIEW[x.dtype]
    return torch.equal(x.contiguous().view(iv), y.contiguous().view(iv))


def assert_rows_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    for r in range(got.shape[0]):
        assert same_bits(got[r], want[r]), f"{what}: row {r} differs"


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@contextmanager
def threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_row_invariance(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, gen: torch.Generator, n_sizes: int = 4
) -> None:
    """f's rows must not depend on batch size, position, other rows or threads."""
    m = x.shape[0]
    with threads(2):
        full = f(x)
    sizes = {1, m} | {int(s) for s in torch.randint(1, m + 1, (n_sizes,), generator=gen)}
    for b in sorted(sizes):
        assert_rows_equal(f(x[:b]), full[:b], f"first {b} of {m} rows")
    # Every row at a random position among fresh rows (other contents, other size).
    other = torch.randn(x.shape, generator=gen).to(x.dtype)
    perm = torch.randperm(m, generator=gen)
    mixed = torch.cat([other[: m // 2 + 1], x[perm]])
    got = f(mixed)[m // 2 + 1 :]
    assert_rows_equal(got, full[perm], "rows placed after other rows, permuted")
    with threads(1):
        assert_rows_equal(f(x), full, "1 thread vs 2 threads")


# --------------------------------------------------------------------------- matmul


@given(
    dtype=dtypes,
    m=st.integers(1, 300),
    k=st.integers(1, 2048),
    n=st.integers(1, 80),
    transposed=st.booleans(),
    with_bias=st.booleans(),
    seed=seeds,
)
def test_matmul_2d_row_invariance(
    dtype: torch.dtype, m: int, k: int, n: int, transposed: bool, with_bias: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, m, k, dtype=dtype)
    # A transposed weight view, as F.linear passes it, must work uncopied.
    w = randn(gen, n, k, dtype=dtype).t() if transposed else randn(gen, k, n, dtype=dtype)
    bias = randn(gen, n, dtype=dtype) if with_bias else None
    check_row_invariance(lambda a: kernels.matmul(a, w, bias), x, gen)


@given(
    dtype=dtypes,
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    tail=st.integers(0, 5),
    k=st.integers(1, 300),
    n=st.integers(1, 48),
    portable=st.booleans(),
    seed=seeds,
)
def test_grouped_matmul_rows_do_not_depend_on_their_experts_other_tokens(
    dtype: torch.dtype, sizes: list[int], tail: int, k: int, n: int, portable: bool, seed: int
) -> None:
    """MoE: every token's row is its own product with its expert's matrix, whatever else
    the expert got and wherever the token sits; rows past the last group are zero."""
    gen = torch.Generator().manual_seed(seed)
    ends = torch.tensor(sizes).cumsum(0)
    s = int(ends[-1]) + tail
    x = randn(gen, s, k, dtype=dtype)
    w = randn(gen, len(sizes), n, k, dtype=dtype).transpose(1, 2)  # HF's weight.transpose(-2, -1)
    got = kernels.grouped_matmul(x, w, ends.to(torch.int32), portable=portable)
    expert = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    for r in range(int(ends[-1])):
        alone = kernels.matmul(x[r : r + 1], w[int(expert[r])], portable=portable)
        assert same_bits(got[r : r + 1], alone), f"row {r} (expert {int(expert[r])}) differs from its product alone"
    assert torch.equal(got[int(ends[-1]) :], torch.zeros(tail, n, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_model_sized_weight(dtype: torch.dtype) -> None:
    """A GPT-2-sized linear layer (K=768, N=1024): every row, many batch sizes."""
    gen = torch.Generator().manual_seed(8)
    x = randn(gen, 160, 768, dtype=dtype)
    w = randn(gen, 1024, 768, dtype=dtype)
    bias = randn(gen, 1024, dtype=dtype)
    check_row_invariance(lambda a: kernels.matmul(a, w.t(), bias), x, gen, n_sizes=3)


def test_matmul_fixed_order_fallback_is_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETKIT_CPU_MATMUL", "fixed-order")
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = randn(gen, 67, 129, dtype=dtype)
        w = randn(gen, 33, 129, dtype=dtype).t()
        bias = randn(gen, 33, dtype=dtype)
        check_row_invariance(lambda a: kernels.matmul(a, w, bias), x, gen)
        ref = x.double() @ w.double() + bias.double()
        assert ((kernels.matmul(x, w, bias).double() - ref).abs() / (ref.abs() + 1)).max() < 1e-2
    assert kernels.cpu_status()["forced_fixed_order"] is True


@pytest.mark.parametrize("flags", [frozenset({"avx512f"}), frozenset({"avx512f", "avx512_fp16"})])
def test_float16_uses_blas_only_with_native_float16_instructions(monkeypatch: pytest.MonkeyPatch,
                                                                 flags: frozenset[str]) -> None:
    """Without AVX512-FP16/AMX-FP16, torch's float16 GEMM is a scalar loop (5.5 s where the
    fixed-order kernel takes 0.1 s, and minutes to verify one shape): float16 then takes the
    fixed-order kernel, decided from the CPU's flags and listed in cpu_status()."""
    from detkit.kernels import _cpu_tiles

    monkeypatch.setattr(_cpu_tiles, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(_cpu_tiles, "_VERDICTS", {})
    gen = torch.Generator().manual_seed(6)
    x = randn(gen, 40, 72, dtype=torch.float16)
    w = randn(gen, 72, 24, dtype=torch.float16)
    check_row_invariance(lambda a: kernels.matmul(a, w), x, gen, n_sizes=3)
    status = kernels.cpu_status()
    native = "avx512_fp16" in flags
    assert ("float16" in status["fixed_order_dtypes"]) is not native  # type: ignore[operator]
    assert any(v["dtype"] == "float16" for v in status["verdicts"]) is native  # type: ignore[union-attr]
    with monkeypatch.context() as mp:
        mp.setenv("DETKIT_CPU_MATMUL", "fixed-order")
        fixed = kernels.matmul(x, w)
    if not native:  # the very kernel DETKIT_CPU_MATMUL=fixed-order forces
        assert same_bits(kernels.matmul(x, w), fixed)


def test_matmul_bits_do_not_depend_on_a_thread_count_the_verification_left_out() -> None:
    """The verification checks 1, 2, all-core and torch's thread count at import; MKL's
    float64 GEMM on a transposed b gave other bits on 8 or 16 threads (2-core machine),
    set after import. Such a count is checked at first use (or BLAS keeps a verified one)."""
    from detkit.kernels import _cpu_tiles

    gen = torch.Generator().manual_seed(12)
    x = randn(gen, 40, 1024, dtype=torch.float64)
    w = randn(gen, 256, 1024, dtype=torch.float64).t()
    with threads(1):
        want = kernels.matmul(x, w)
    for n in sorted({8, 16} - set(_cpu_tiles._THREAD_COUNTS)):
        with threads(n):
            assert same_bits(kernels.matmul(x, w), want), n


def test_a_thread_count_that_disagrees_runs_blas_on_a_verified_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from detkit.kernels import _cpu_tiles

    gen = torch.Generator().manual_seed(13)
    x = randn(gen, 20, 64)
    w = randn(gen, 64, 48)
    kernels.matmul(x, w)  # the verdict
    verdict = next(v for v in _cpu_tiles._VERDICTS.values() if (v.k, v.n, v.dtype) == (64, 48, "float32"))
    if verdict.pinned or not verdict.ok:
        pytest.skip("BLAS tiles run on one thread for this shape here")
    n = max(verdict.threads) + 3
    monkeypatch.setattr(_cpu_tiles, "_FREE_THREADS", {})
    monkeypatch.setattr(_cpu_tiles, "_agrees_at", lambda *args: False)
    seen: list[int] = []
    tile = _cpu_tiles._tile
    monkeypatch.setattr(_cpu_tiles, "_tile", lambda *args: (seen.append(torch.get_num_threads()), tile(*args))[1])
    with threads(n):
        kernels.matmul(x, w)
        assert torch.get_num_threads() == n
    assert seen and set(seen) == {max(verdict.threads)}, seen


def test_matmul_verdicts_are_recorded() -> None:
    gen = torch.Generator().manual_seed(2)
    kernels.matmul(randn(gen, 5, 77), randn(gen, 77, 19))
    status = kernels.cpu_status()
    verdicts = [v for v in status["verdicts"] if v["k"] == 77 and v["n"] == 19]  # type: ignore[index, union-attr]
    assert verdicts, status
    assert all(v["reason"] for v in verdicts)


@given(
    dtype=dtypes,
    batch=st.integers(1, 6),
    m=st.integers(1, 40),
    k=st.integers(1, 300),
    n=st.integers(1, 70),
    pad_left=st.integers(0, 37),
    pad_right=st.integers(0, 37),
    seed=seeds,
)
def test_bmm_rows_and_zero_padding_along_k(
    dtype: torch.dtype, batch: int, m: int, k: int, n: int, pad_left: int, pad_right: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = randn(gen, batch, m, k, dtype=dtype)
    b = randn(gen, batch, k, n, dtype=dtype)
    full = kernels.matmul(a, b)
    for i in range(batch):
        check_row_invariance(lambda r: kernels.matmul(r.unsqueeze(0), b[i : i + 1])[0], a[i], gen, n_sizes=2)
        assert_rows_equal(kernels.matmul(a[i : i + 1], b[i : i + 1])[0], full[i], f"batch entry {i} alone")
    # Exact-zero coefficients (left/right padding of attention probabilities) change nothing,
    # whatever the (finite) padded rows of b hold: what BATCHED_MATMUL_SEQUENTIAL_IN_K
    # promises, and why the torch mode skips no leading zeros on this backend.
    assert kernels.batched_matmul_is_sequential_in_k("cpu", False)
    zl = torch.zeros(batch, m, pad_left, dtype=dtype)
    zr = torch.zeros(batch, m, pad_right, dtype=dtype)
    a_pad = torch.cat([zl, a, zr], dim=2)
    b_pad = torch.cat([randn(gen, batch, pad_left, n, dtype=dtype), b, randn(gen, batch, pad_right, n, dtype=dtype)], dim=1)
    out = kernels.matmul(a_pad, b_pad)
    for i in range(batch):
        assert_rows_equal(out[i], full[i], "zero-padded along K")


def test_matmul_bits_do_not_depend_on_the_layout_of_a() -> None:
    """a is copied into fixed tiles (2-D) or read element by element (3-D): a column-major
    or strided a gives the contiguous a's bits, and so does a transposed 3-D b."""
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        x = randn(gen, 50, 96, dtype=dtype)
        w = randn(gen, 96, 40, dtype=dtype)
        want = kernels.matmul(x, w)
        x_t = x.t().contiguous().t()  # column-major view of the same values
        x_s = torch.cat([x, x], dim=1)[:, ::2]
        assert same_bits(kernels.matmul(x_t, w), want)
        x_s.copy_(x)
        assert same_bits(kernels.matmul(x_s, w), want)
        a3 = randn(gen, 3, 9, 96, dtype=dtype)
        b3 = randn(gen, 3, 40, 96, dtype=dtype).transpose(1, 2)
        assert same_bits(kernels.matmul(a3, b3), kernels.matmul(a3, b3.contiguous()))


def test_layout_of_b_matters_only_to_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    """BLAS may take another path for a transposed b (oneDNN's float16 GEMM does on an
    AVX-512 EPYC without AMX), so the tiles are verified per layout of b and each layout is
    batch invariant on its own (test_matmul_2d_row_invariance). The fixed-order kernel and
    the portable kernel give the same bits for both layouts."""
    from detkit.kernels import _cpu_tiles

    monkeypatch.setattr(_cpu_tiles, "_blas_skipped", lambda dtype: None)  # float16 tiles too, on any CPU
    gen = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        x = randn(gen, 20, 96, dtype=dtype)
        w = randn(gen, 96, 40, dtype=dtype)
        w_t = w.t().contiguous().t()
        for b in (w, w_t):  # BLAS: one verdict per layout
            kernels.matmul(x, b)
        assert same_bits(kernels.matmul(x, w_t, portable=True), kernels.matmul(x, w, portable=True))
        with monkeypatch.context() as mp:
            mp.setenv("DETKIT_CPU_MATMUL", "fixed-order")
            assert same_bits(kernels.matmul(x, w_t), kernels.matmul(x, w))
    layouts = {(v["dtype"], v["b_layout"]) for v in kernels.cpu_status()["verdicts"] if (v["k"], v["n"]) == (96, 40)}
    assert {(str(d).removeprefix("torch."), lay) for d in DTYPES for lay in "nt"} <= layouts


# --------------------------------------------------------------------------- softmax


@given(dtype=dtypes, r=st.integers(1, 300), length=st.integers(1, 2048), log=st.booleans(), seed=seeds)
def test_softmax_row_invariance(dtype: torch.dtype, r: int, length: int, log: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, r, length, dtype=dtype, scale=4.0)
    f = kernels.log_softmax if log else kernels.softmax
    check_row_invariance(lambda t: f(t), x, gen)


@given(
    dtype=st.sampled_from([*DTYPES, torch.float64]),
    length=st.integers(1, 600),
    pad_left=st.integers(0, 70),
    pad_right=st.integers(0, 70),
    additive=st.booleans(),
    portable=st.booleans(),
    seed=seeds,
)
def test_softmax_padding_invariance(
    dtype: torch.dtype, length: int, pad_left: int, pad_right: int, additive: bool, portable: bool, seed: int
) -> None:
    """Masked scores (-inf, or finfo.min added as HF does) must not change the real entries:
    the backend contract the torch mode relies on for eager attention over padding keys."""
    portable = portable and dtype != torch.float64  # the portable kernels take no float64
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, 3, length, dtype=dtype, scale=3.0)
    if additive:
        # HF adds finfo(dtype).min to masked scores: exp underflows to exact zeros.
        left = randn(gen, 3, pad_left, dtype=dtype) + torch.finfo(dtype).min
        right = randn(gen, 3, pad_right, dtype=dtype) + torch.finfo(dtype).min
    else:
        left = torch.full((3, pad_left), float("-inf"), dtype=dtype)
        right = torch.full((3, pad_right), float("-inf"), dtype=dtype)
    padded = torch.cat([left, x, right], dim=1)
    want = kernels.softmax(x, portable=portable)
    got = kernels.softmax(padded, portable=portable)
    assert same_bits(got[:, pad_left : pad_left + length], want)
    assert torch.all(got[:, :pad_left] == 0) and torch.all(got[:, pad_left + length :] == 0)
    assert same_bits(kernels.log_softmax(padded, portable=portable)[:, pad_left : pad_left + length],
                     kernels.log_softmax(x, portable=portable))


# --------------------------------------------------------------------------- norms and reductions


@given(
    dtype=dtypes,
    r=st.integers(1, 300),
    length=st.integers(1, 2048),
    kind=st.sampled_from(["rms", "rms_noweight", "layer", "layer_noaffine", "sum", "mean"]),
    seed=seeds,
)
def test_row_kernels_invariance(dtype: torch.dtype, r: int, length: int, kind: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, r, length, dtype=dtype, scale=2.0) + 0.5
    w = randn(gen, length, dtype=dtype)
    b = randn(gen, length, dtype=dtype)
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "rms": lambda t: kernels.rms_norm(t, w, 1e-6),
        "rms_noweight": lambda t: kernels.rms_norm(t),
        "layer": lambda t: kernels.layer_norm(t, w, b),
        "layer_noaffine": lambda t: kernels.layer_norm(t, eps=1e-3),
        "sum": lambda t: kernels.sum(t, -1, keepdim=True),
        "mean": lambda t: kernels.mean(t, 1, keepdim=True),
    }
    check_row_invariance(fns[kind], x, gen)


@given(
    dtype=st.sampled_from([*DTYPES, torch.float64]),
    portable=st.booleans(),
    r=st.integers(1, 200),
    length=st.integers(1, 700),
    left=st.integers(0, 40),
    seed=seeds,
)
def test_cumsum_rows_are_batch_and_left_padding_invariant(dtype: torch.dtype, portable: bool, r: int, length: int,
                                                          left: int, seed: int) -> None:
    portable = portable and dtype != torch.float64  # the portable kernels take no float64
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, r, length, dtype=dtype, scale=3.0)

    def f(t: torch.Tensor) -> torch.Tensor:
        return kernels.cumsum(t, -1, portable=portable)

    check_row_invariance(f, x, gen)
    # A left-padded batch: zeros in front of a row leave its running sums' bits alone.
    padded = torch.cat([torch.zeros(r, left, dtype=dtype), x], 1)
    assert_rows_equal(f(padded)[:, left:], f(x), f"{left} zeros in front")
    # Along dim 0 of the transposed tensor: the same rows, the same bits.
    assert same_bits(kernels.cumsum(x.t(), 0, portable=portable), f(x).t().contiguous())


@pytest.mark.parametrize("portable", [False, True])
def test_cumsum_is_the_sequential_running_sum(portable: bool) -> None:
    """Two independent oracles of the order. numpy adds left to right in the array's
    dtype: its float64 running sum of float32 inputs, rounded per output, and its float32
    one of widened bfloat16/float16 inputs. torch's CPU cumsum does the same (float32 in
    float64, the 16-bit types in float32), so its bits must come back too."""
    gen = torch.Generator().manual_seed(3)
    x = randn(gen, 7, 2, 3000, scale=5.0)
    x[0, 0, :50] = 0.0  # leading zeros, and a -0.0 first entry (the sum starts at +0.0)
    x[0, 1, 0] = -0.0

    def running(a: torch.Tensor, d: int) -> torch.Tensor:
        wide = np.float64 if a.dtype == torch.float32 else np.float32
        # numpy starts from the first element, so a leading -0.0 stays -0.0 there; adding
        # +0.0 gives the +0.0 of a sum started at +0.0 and changes nothing else
        y = np.cumsum(a.float().numpy().astype(wide), axis=d) + wide(0.0)
        return torch.from_numpy(y.astype(np.float32)).to(a.dtype)

    for d in (0, 1, 2, -1):
        for a in (x, x.transpose(0, 2), (x / 64).bfloat16(), (x / 64).half()):
            got = kernels.cumsum(a, d, portable=portable)
            assert same_bits(got, running(a, d)), (d, a.dtype, a.stride())
            assert same_bits(got, torch.cumsum(a, d)), (d, a.dtype, a.stride())
    if not portable:
        assert same_bits(kernels.cumsum(x.double(), 1), torch.cumsum(x.double(), 1))


def _lower_system(gen: torch.Generator, batch: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Unit-diagonal-dominant lower systems (Qwen3-Next's UT system is unit lower
    triangular) with NaN above the diagonal, which a solve must not read."""
    a = randn(gen, batch, n, n, scale=0.3) + 2.0 * torch.eye(n)
    a = (a + torch.triu(torch.full((n, n), float("nan")), 1)).to(dtype)
    return a, randn(gen, batch, n, k, dtype=dtype)


@given(
    dtype=st.sampled_from([*DTYPES, torch.float64]),
    portable=st.booleans(),
    batch=st.integers(1, 40),
    n=st.integers(1, 70),
    k=st.integers(1, 40),
    unit=st.booleans(),
    seed=seeds,
)
def test_solve_triangular_entries_and_columns_are_invariant(dtype: torch.dtype, portable: bool, batch: int, n: int,
                                                            k: int, unit: bool, seed: int) -> None:
    portable = portable and dtype != torch.float64
    gen = torch.Generator().manual_seed(seed)
    a, b = _lower_system(gen, batch, n, k, dtype)

    def solve(a_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        return kernels.solve_triangular(a_, b_, upper=False, unitriangular=unit, portable=portable)

    full = solve(a, b)
    # every batch entry alone, and at a random place among other systems
    check_row_invariance(lambda t: solve(t[:, :, :n], t[:, :, n:]), torch.cat([a, b], -1), gen)
    # every column of the right-hand side alone: columns are independent chains
    c = int(torch.randint(0, k, (1,), generator=gen))
    assert same_bits(solve(a, b[..., c : c + 1]), full[..., c : c + 1]), f"column {c} alone"
    if dtype == torch.float32:  # one order for both guarantees
        assert same_bits(kernels.solve_triangular(a, b, upper=False, unitriangular=unit, portable=not portable), full)


@pytest.mark.parametrize("portable", [False, True])
def test_solve_triangular_variants_are_the_lower_left_solve_and_close_to_torch(portable: bool) -> None:
    """upper: the lower solve with rows and columns reversed; left=False: the left solve of
    the transposes; broadcast batch dimensions; the values within a few ULP of torch's."""
    gen = torch.Generator().manual_seed(5)
    a = randn(gen, 3, 1, 12, 12, scale=0.3) + 2.0 * torch.eye(12)
    b = randn(gen, 1, 4, 12, 7)
    for unit in (False, True):
        def solve(a_: torch.Tensor, b_: torch.Tensor, upper: bool, left: bool = True) -> torch.Tensor:
            return kernels.solve_triangular(a_, b_, upper=upper, left=left, unitriangular=unit, portable=portable)

        lower = solve(a, b, False)
        assert lower.shape == (3, 4, 12, 7) and lower.is_contiguous()
        assert same_bits(lower, solve(a.expand(3, 4, 12, 12), b.expand(3, 4, 12, 7), False))
        flipped = solve(a.flip(-2, -1), b.flip(-2), True).flip(-2)
        assert same_bits(flipped, lower), "upper = lower reversed"
        assert same_bits(solve(a.mT, b.mT, True, left=False), lower.mT.contiguous()), "right = left transposed"
        for upper in (False, True):
            for left in (True, False):
                bb = b if left else b.mT
                got = solve(a, bb, upper, left)
                want = torch.linalg.solve_triangular(a.double(), bb.double(), upper=upper, left=left,
                                                     unitriangular=unit)
                assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (upper, left, unit)


def test_reductions_over_other_dims_and_transposed_inputs() -> None:
    gen = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        x = randn(gen, 4, 30, 50, dtype=dtype)
        xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
        for d in (0, 1, 2, -1):
            moved = x.movedim(d, -1)
            for red in (kernels.sum, kernels.mean):
                assert same_bits(red(xt, d), red(x, d)), (red, d)
                # Reducing dim d must equal the last-dim kernel on the moved tensor.
                assert same_bits(red(x, d), red(moved, -1)), (red, d)
            for sm in (kernels.softmax, kernels.log_softmax):
                assert same_bits(sm(xt, d), sm(x, d)), (sm, d)
                assert same_bits(sm(x, d), sm(moved, -1).movedim(-1, d)), (sm, d)
        w = randn(gen, 50, dtype=dtype)
        assert same_bits(kernels.rms_norm(xt, w), kernels.rms_norm(x, w))
        assert same_bits(kernels.layer_norm(xt, w, w), kernels.layer_norm(x, w, w))


# --------------------------------------------------------------------------- attention


@given(
    dtype=dtypes,
    heads=st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 1)]),
    length=st.integers(1, 48),
    d=st.sampled_from([1, 8, 16, 24, 64, 80]),
    pad_left=st.integers(0, 9),
    pad_right=st.integers(0, 9),
    seed=seeds,
)
def test_attention_padding_and_decode_vs_prefill(
    dtype: torch.dtype, heads: tuple[int, int], length: int, d: int, pad_left: int, pad_right: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, hk = heads
    q = randn(gen, 1, h, length, d, dtype=dtype)
    k = randn(gen, 1, hk, length, d, dtype=dtype)
    v = randn(gen, 1, hk, length, d, dtype=dtype)
    gqa = h != hk
    prefill = kernels.attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Decode: query t alone against the cache of keys 0..t.
    for t in range(length):
        step = kernels.attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], enable_gqa=gqa)
        assert same_bits(step[:, :, 0], prefill[:, :, t]), f"decode step {t} differs from prefill"
    # Left/right padding with arbitrary junk keys that the mask excludes.
    total = pad_left + length + pad_right
    kp = randn(gen, 1, hk, total, d, dtype=dtype, scale=50.0)
    vp = randn(gen, 1, hk, total, d, dtype=dtype, scale=50.0)
    kp[:, :, pad_left : pad_left + length] = k
    vp[:, :, pad_left : pad_left + length] = v
    mask = torch.zeros(length, total, dtype=torch.bool)
    mask[:, pad_left : pad_left + length] = torch.ones(length, length, dtype=torch.bool).tril()
    padded = kernels.attention(q, kp, vp, attn_mask=mask, enable_gqa=gqa)
    assert same_bits(padded, prefill), "padding changed the result"
    # The same as an additive mask (0 / -inf), the form HF models build.
    add = torch.zeros(length, total, dtype=dtype).masked_fill(~mask, float("-inf"))
    assert same_bits(kernels.attention(q, kp, vp, attn_mask=add, enable_gqa=gqa), prefill)


@given(dtype=dtypes, batch=st.integers(1, 12), lq=st.integers(1, 9), lk=st.integers(1, 40), seed=seeds)
def test_attention_batch_invariance(dtype: torch.dtype, batch: int, lq: int, lk: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = randn(gen, batch, 2, lq, 32, dtype=dtype)
    k = randn(gen, batch, 2, lk, 32, dtype=dtype)
    v = randn(gen, batch, 2, lk, 16, dtype=dtype)
    mask = torch.rand(batch, 1, lq, lk, generator=gen) > 0.3
    with threads(2):
        full = kernels.attention(q, k, v, attn_mask=mask)
    with threads(1):
        assert same_bits(kernels.attention(q, k, v, attn_mask=mask), full)
    perm = torch.randperm(batch, generator=gen)
    assert same_bits(kernels.attention(q[perm], k[perm], v[perm], attn_mask=mask[perm]), full[perm])
    for i in range(batch):
        alone = kernels.attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], attn_mask=mask[i : i + 1])
        assert same_bits(alone, full[i : i + 1]), f"sequence {i} alone differs"


# --------------------------------------------------------------------------- accuracy sanity


@pytest.mark.parametrize("dtype", DTYPES)
def test_accuracy_close_to_float64(dtype: torch.dtype) -> None:
    """Loose sanity bound vs float64 torch: reduced in float32, rounded once."""
    gen = torch.Generator().manual_seed(5)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    x = randn(gen, 64, 512, dtype=dtype)
    w = randn(gen, 512, dtype=dtype)
    x64, w64 = x.double(), w.double()

    def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
        return float(((got.double() - ref).abs() / (ref.abs() + 1)).max())

    assert rel(kernels.softmax(x), torch.softmax(x64, -1)) < tol
    assert rel(kernels.log_softmax(x), torch.log_softmax(x64, -1)) < tol
    assert rel(kernels.rms_norm(x, w, 1e-6), F.rms_norm(x64, (512,), w64, 1e-6)) < tol
    assert rel(kernels.layer_norm(x, w, w), F.layer_norm(x64, (512,), w64, w64)) < tol
    assert rel(kernels.mean(x), x64.mean(-1)) < tol
    assert rel(kernels.sum(x) / 512, x64.sum(-1) / 512) < tol
    b = randn(gen, 512, 96, dtype=dtype)
    assert rel(kernels.matmul(x, b) / 512**0.5, (x64 @ b.double()) / 512**0.5) < tol
    q = randn(gen, 2, 4, 17, 32, dtype=dtype)
    kv = randn(gen, 2, 4, 23, 32, dtype=dtype)
    mask = torch.rand(17, 23, generator=gen) > 0.2
    ref = F.scaled_dot_product_attention(q.double(), kv.double(), kv.double(), attn_mask=mask)
    assert rel(kernels.attention(q, kv, kv, attn_mask=mask), ref) < tol
    causal = F.scaled_dot_product_attention(q.double(), kv.double(), kv.double(), is_causal=True)
    assert rel(kernels.attention(q, kv, kv, is_causal=True), causal) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_semantics(dtype: torch.dtype) -> None:
    """Same function as torch (compared loosely): masks, GQA, scale, broadcasting."""
    gen = torch.Generator().manual_seed(6)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    q = randn(gen, 2, 6, 5, 16, dtype=dtype)
    k = randn(gen, 2, 3, 7, 16, dtype=dtype)
    v = randn(gen, 2, 3, 7, 8, dtype=dtype)
    bool_mask = torch.rand(2, 1, 5, 7, generator=gen) > 0.4
    bool_mask[0, 0, 1] = False  # a query with no attended key: zeros, like torch
    float_mask = randn(gen, 5, 7, dtype=dtype)
    for kw in (
        {"attn_mask": bool_mask},
        {"attn_mask": float_mask},
        {"is_causal": True},
        {"scale": 0.3},
    ):
        got = kernels.attention(q, k, v, enable_gqa=True, **kw)
        kw64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, **kw64)
        assert (got.double() - ref).abs().max() < tol, kw
    a = randn(gen, 3, 1, 4, 10, dtype=dtype)
    b = randn(gen, 5, 10, 6, dtype=dtype)
    assert kernels.matmul(a, b).shape == torch.matmul(a, b).shape == (3, 5, 4, 6)
    assert (kernels.matmul(a, b).double() - a.double() @ b.double()).abs().max() < tol * 10
    vec = randn(gen, 10, dtype=dtype)
    assert kernels.matmul(vec, b).shape == torch.matmul(vec, b).shape
    assert kernels.matmul(a, vec).shape == torch.matmul(a, vec).shape
    assert kernels.matmul(vec, vec).shape == ()
    bias2 = randn(gen, 4, 6, dtype=dtype)
    want = a[0, 0].double() @ b[0].double() + bias2.double()
    assert (kernels.matmul(a[0, 0], b[0], bias2).double() - want).abs().max() < tol * 10


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("rows", [2, 20000])  # the serial and the parallel driver
def test_norms_of_a_zero_row_with_eps_zero_give_nan_like_torch(rows: int, portable: bool) -> None:
    """0 / sqrt(0): NaN, as torch gives, whatever the batch size (the serial driver used
    to raise ZeroDivisionError, the parallel one to give NaN)."""
    x = torch.zeros(rows, 8)
    x[0] = torch.arange(8.0)
    for got, want in (
        (kernels.rms_norm(x, eps=0.0, portable=portable), F.rms_norm(x, (8,), eps=0.0)),
        (kernels.layer_norm(x, eps=0.0, portable=portable), F.layer_norm(x, (8,), eps=0.0)),
    ):
        assert got[1:].isnan().all() and want[1:].isnan().all()
        assert (got[0] - want[0]).abs().max() < 1e-5


def test_float64_supported() -> None:
    gen = torch.Generator().manual_seed(7)
    x = randn(gen, 20, 33, dtype=torch.float64)
    assert (kernels.softmax(x) - torch.softmax(x, -1)).abs().max() < 1e-14
    assert (kernels.rms_norm(x) - F.rms_norm(x, (33,))).abs().max() < 1e-13
    check_row_invariance(lambda t: kernels.matmul(t, x.t()), x, gen)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_nan_bits_of_a_row_do_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    # A row holding NaN and +inf: the NaN that reached the output (an input's, or the
    # default one of inf - inf) differed between the serial and the parallel driver;
    # float16 NaNs were widened by torch with a payload that depends on the position.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(100, 1000, generator=gen, dtype=torch.float64) * 10
    m = torch.rand(100, 1000, generator=gen)
    x[m < 0.05] = float("-inf")
    x[(m > 0.05) & (m < 0.07)] = float("inf")
    x[(m > 0.07) & (m < 0.09)] = float("nan")
    x = x.to(dtype)
    for f in (kernels.softmax, kernels.log_softmax):
        full = f(x)
        for r in (0, 41, 99):
            assert same_bits(f(x[r : r + 1]), full[r : r + 1]), (f.__name__, r)
    a = torch.randn(9, 5, generator=gen).to(dtype)
    a[:, 2] = float("nan")
    b = torch.randn(5, 40, generator=gen).to(dtype)
    for bb in (b, b.unsqueeze(0).expand(9, 5, 40)):
        aa = a if bb.dim() == 2 else a.unsqueeze(1)
        full = kernels.matmul(aa, bb)
        for r in range(9):
            alone = kernels.matmul(aa[r : r + 1], bb[r : r + 1] if bb.dim() == 3 else bb)
            assert same_bits(alone, full[r : r + 1]), ("matmul", bb.dim(), r)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_every_nan_out_of_a_row_op_or_attention_is_the_canonical_nan(dtype: torch.dtype) -> None:
    # Input NaNs with a sign and payloads; 1001 columns put some of them in torch's
    # scalar tail when it widens float16, which used to keep other payload bits there.
    # Canonical: the positive quiet float32/float64 NaN, rounded to ``dtype`` by torch
    # from a contiguous tensor (its vectorised bfloat16 rounding gives 0xFFFF).
    gen = torch.Generator().manual_seed(9)
    x = randn(gen, 12, 1001, dtype=dtype)
    nans = torch.tensor([0xFFF8000000000ABC - (1 << 64), 0x7FF8000000123000], dtype=torch.int64).view(torch.float64)  # sign set, payloads
    for r, c in ((0, 3), (5, 998), (11, 1000), (11, 17)):
        x[r, c] = nans[(r + c) % 2].to(dtype)
    iv = _INT_VIEW[dtype]
    canonical = torch.full((1,), float("nan"), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    canonical = canonical.to(dtype).view(iv).item()
    q = randn(gen, 2, 2, 6, 32, dtype=dtype)
    q[1, 0, 3, 7] = nans[0].to(dtype)
    outs = {
        "softmax": kernels.softmax(x),
        "log_softmax": kernels.log_softmax(x),
        "rms_norm": kernels.rms_norm(x, x[1].abs()),
        "layer_norm": kernels.layer_norm(x, x[2], x[3]),
        "sum": kernels.sum(x),
        "mean": kernels.mean(x),
    }
    if dtype != torch.float64:  # the float64 attention kernel's compile alone took 14 s of CI
        outs["attention"] = kernels.attention(q, q, q, is_causal=True)
    for name, y in outs.items():
        nan = y.isnan()
        assert nan.any(), name
        assert (y[nan].view(iv) == canonical).all(), f"{name}: NaN bits {y[nan].view(iv).unique().tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matmul_rows_whose_products_overflow_do_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    # Products of +-inf added in the accumulation: whether a row gets inf, -inf or NaN
    # depends on the library's order. With K = 2, bfloat16's 32-row BLAS tiles gave
    # other bits than its larger tiles, and the tile verification had no such row.
    gen = torch.Generator().manual_seed(1)
    big = torch.finfo(dtype).max
    for k in (1, 2, 3):
        b = (torch.randn(k, 64, generator=gen) * 4).to(dtype)
        a = torch.randn(300, k, generator=gen).to(dtype)
        for r in range(0, 300, 7):
            sign = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
            a[r] = sign * big * (0.25 + torch.rand(k, generator=gen)).to(dtype)
        full = kernels.matmul(a, b)
        assert full.isinf().any() and (k == 1 or full.isnan().any())
        for m in (1, 7, 33, 65, 129, 257):
            assert same_bits(kernels.matmul(a[:m], b), full[:m]), (k, m)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_per_row_bias_rows_alone_and_in_the_batch(dtype: torch.dtype, portable: bool) -> None:
    # A per-row bias (M, N): row r alone gets bias[r:r+1], of shape (1, N), which was
    # fused into the product while the batch's (M, N) bias was added after rounding.
    gen = torch.Generator().manual_seed(11)
    a = randn(gen, 8, 300, dtype=dtype)
    b = randn(gen, 300, 40, dtype=dtype)
    bias = randn(gen, 8, 40, dtype=dtype, scale=3.0)
    full = kernels.matmul(a, b, bias, portable=portable)
    for r in range(8):
        assert same_bits(kernels.matmul(a[r : r + 1], b, bias[r : r + 1], portable=portable), full[r : r + 1]), r
    a3 = randn(gen, 4, 3, 300, dtype=dtype)
    bias3 = randn(gen, 4, 1, 40, dtype=dtype, scale=3.0)
    full3 = kernels.matmul(a3, b, bias3, portable=portable)
    for i in range(4):
        assert same_bits(kernels.matmul(a3[i : i + 1], b, bias3[i : i + 1], portable=portable), full3[i : i + 1]), i


@pytest.mark.parametrize(("k", "n", "transposed"), [(8, 3, False), (7, 128, True), (9, 129, False), (17, 3, True)])
def test_float64_matmul_rows_with_full_precision_values(k: int, n: int, transposed: bool) -> None:
    # float64 data with 53-bit mantissas: MKL's small-K dgemm gives even and odd rows of
    # a tile other bits here, which a verification on float32-valued data (products exact
    # in float64) did not see, so BLAS tiles were accepted and rows depended on M.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, k, generator=gen, dtype=torch.float64) * torch.exp(
        torch.randn(300, k, generator=gen, dtype=torch.float64))
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    b = w.t() if transposed else w.t().contiguous()
    full = kernels.matmul(x, b)
    for r in range(0, 300, 7):
        assert same_bits(kernels.matmul(x[r : r + 1], b), full[r : r + 1]), f"row {r} alone differs from M=300"


# --------------------------------------------------------------------------- compiled paths agree


@given(
    dtype=dtypes,
    heads=st.sampled_from([(2, 2), (4, 2)]),
    lq=st.integers(1, 40),
    lk=st.integers(1, 90),
    d=st.sampled_from([1, 16, 40, 64]),
    dv=st.sampled_from([8, 32, 128]),
    seed=seeds,
)
def test_attention_tiled_and_row_paths_give_the_same_bits(
    dtype: torch.dtype,
    heads: tuple[int, int],
    lq: int,
    lk: int,
    d: int,
    dv: int,
    seed: int,
) -> None:
    """Scores from K-transposed tiles (several queries) == scores from K rows (decode)."""
    from detkit.kernels import cpu

    gen = torch.Generator().manual_seed(seed)
    h, hk = heads
    q = randn(gen, 2, h, lq, d, dtype=dtype)
    k = randn(gen, 2, hk, lk, d, dtype=dtype)
    v = randn(gen, 2, hk, lk, dv, dtype=dtype)
    mask = torch.rand(2, 1, lq, lk, generator=gen) > 0.3
    results = []
    for threshold in (1, 10**9):  # always tiled, never tiled
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu, "_TILED_MIN_QUERIES", threshold)
            results.append(
                [
                    kernels.attention(q, k, v, attn_mask=mask, enable_gqa=True),
                    kernels.attention(q, k, v, is_causal=True, enable_gqa=True),
                    kernels.attention(q, k, v, enable_gqa=True),
                ]
            )
    for tiled, rows in zip(*results):
        assert same_bits(tiled, rows)


@pytest.mark.parametrize("tiled_min", [1, 10**9])
def test_attention_masked_keys_with_inf_and_nan_change_nothing(monkeypatch: pytest.MonkeyPatch, tiled_min: int) -> None:
    """A masked key's k and v never enter, even when they hold inf or NaN."""
    from detkit.kernels import cpu

    monkeypatch.setattr(cpu, "_TILED_MIN_QUERIES", tiled_min)
    gen = torch.Generator().manual_seed(9)
    q = randn(gen, 1, 4, 12, 32)
    k = randn(gen, 1, 4, 20, 32)
    v = randn(gen, 1, 4, 20, 128)
    mask = torch.ones(12, 20, dtype=torch.bool)
    mask[:, :3] = False  # left padding
    mask[:, 17:] = False  # right padding
    mask[:, 9] = False  # a hole inside the attended range
    want = kernels.attention(q, k, v, attn_mask=mask)
    for bad in (float("inf"), float("-inf"), float("nan")):
        kb, vb = k.clone(), v.clone()
        kb[..., ~mask[0], :] = bad
        vb[..., ~mask[0], :] = bad
        assert same_bits(kernels.attention(q, kb, vb, attn_mask=mask), want), bad


@pytest.mark.parametrize("tiled_min", [1, 10**9])
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_nan_query_gives_nan_and_a_fully_masked_query_gives_zeros(
    monkeypatch: pytest.MonkeyPatch, tiled_min: int, portable: bool, dtype: torch.dtype
) -> None:
    """A NaN must not turn into plausible zeros (torch's CPU SDPA returns 0 for a NaN query);
    both guarantees and the CUDA kernels agree on these semantics. Other rows are untouched."""
    from detkit.kernels import cpu

    monkeypatch.setattr(cpu, "_TILED_MIN_QUERIES", tiled_min)
    gen = torch.Generator().manual_seed(4)
    q, k, v = randn(gen, 2, 2, 9, 16, dtype=dtype), randn(gen, 2, 2, 9, 16, dtype=dtype), randn(gen, 2, 2, 9, 32, dtype=dtype)
    want = kernels.attention(q, k, v, is_causal=True, portable=portable)
    bad = q.clone()
    bad[1, 0, 5, 3] = float("nan")
    mask = torch.ones(2, 2, 9, 9, dtype=torch.bool).tril()
    mask[0, 1, 2] = False  # a query with no key at all
    for label, got in (
        ("causal", kernels.attention(bad, k, v, is_causal=True, portable=portable)),
        ("bool mask", kernels.attention(bad, k, v, attn_mask=mask, portable=portable)),
    ):
        assert bool(got[1, 0, 5].isnan().all()), f"{label}: the NaN query's row must be NaN"
        keep = torch.ones(2, 2, 9, dtype=torch.bool)
        keep[1, 0, 5] = False
        if label == "causal":
            assert same_bits(got[keep], want[keep]), f"{label}: other rows changed"
        else:
            assert bool((got[0, 1, 2] == 0).all()), "a query with no key gives zeros"
            assert not bool(got[keep].isnan().any()), f"{label}: NaN leaked into other rows"
    decode = kernels.attention(bad[:, :, 5:6], k[:, :, :6], v[:, :, :6], portable=portable)
    assert bool(decode[1, 0, 0].isnan().all()) and same_bits(decode[0], want[0, :, 5:6])


def _lane_sum_reference(x: torch.Tensor) -> torch.Tensor:
    """The documented anchored lane order, one float32 operation at a time (numpy)."""

    out = []
    for row in x.numpy():
        nz = np.flatnonzero(row != 0)
        j0 = int(nz[0]) if nz.size else row.size
        lanes = np.zeros(16, np.float32)
        for j in range(j0, row.size):
            w = (j - j0) % 16
            lanes[w] = np.float32(lanes[w] + row[j])
        for hh in (8, 4, 2, 1):
            for w in range(hh):
                lanes[w] = np.float32(lanes[w] + lanes[w + hh])
        out.append(lanes[0])
    return torch.from_numpy(np.array(out, np.float32))


@given(r=st.integers(1, 6), length=st.integers(1, 300), lead=st.integers(0, 40), seed=seeds)
def test_row_sum_is_the_documented_lane_order(r: int, length: int, lead: int, seed: int) -> None:
    """The vectorised lane loop performs exactly the scalar lane additions, in order."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.zeros(r, lead), randn(gen, r, length, scale=3.0)], dim=1)
    assert same_bits(kernels.sum(x, -1), _lane_sum_reference(x))


_WORKER_THREADS = """
import os, threading, torch
torch.set_num_threads(2)
torch.ones(1 << 18).add_(1)  # the main thread's own OpenMP team exists
from detkit.kernels import _cpu_tiles
before = len(os.listdir("/proc/self/task"))
started, release = threading.Event(), threading.Event()
def worker():
    _cpu_tiles._one_thread_worker()
    torch.ones(1 << 18).add_(1)  # a parallel op on the worker afterwards, as a tile's copy
    started.set()
    release.wait()
t = threading.Thread(target=worker)
t.start()
started.wait()
print(len(os.listdir("/proc/self/task")) - before)
release.set()
t.join()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts OS threads through /proc (Linux)")
def test_one_thread_blas_workers_start_no_openmp_team() -> None:
    """A pinned BLAS worker adds exactly one OS thread (itself). A second OpenMP team would
    be a regression with a cost outside detkit: while a process has more OpenMP threads
    than cores, libgomp stops spin-waiting in every team, and torch's own small ops on the
    caller's thread became about 5x slower after the first detkit matmul."""
    proc = subprocess.run([sys.executable, "-c", _WORKER_THREADS], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "1", f"threads added by one BLAS worker: {proc.stdout.split()[-1]} (want 1)"


_FORKED_CHILDREN = """
import os, signal, torch
import detkit
def in_child(work):
    pid = os.fork()
    if pid == 0:
        signal.alarm(50)  # a hung child ends (and the check fails) instead of staying behind
        ok = False
        try:
            ok = work()
        finally:
            os._exit(0 if ok else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
big = torch.randn(64, 4096)  # above the portable pool's serial limit
with detkit.batch_invariant(portable=True):
    want = torch.softmax(big, -1)  # the portable pool's workers started
def portable_softmax():  # torch's thread count (2): the portable pool
    with detkit.batch_invariant(portable=True):
        return torch.equal(torch.softmax(big, -1), want)
first = in_child(portable_softmax)
with detkit.batch_invariant():
    torch.nn.functional.linear(torch.randn(40, 64), torch.randn(32, 64))  # verified: OpenMP teams, BLAS pool
def new_shape():
    torch.set_num_threads(1)  # what a DataLoader worker does: torch's own ops are fork safe then
    x, w = torch.randn(24, 96), torch.randn(80, 96)
    with detkit.batch_invariant():  # verified in the child
        return torch.equal(torch.nn.functional.linear(x, w)[5], torch.nn.functional.linear(x[5:6], w)[0])
print("children exit", first, in_child(new_shape))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_forked_child_uses_the_kernels_without_hanging() -> None:
    """A forked child (multiprocessing's default start on Linux, DataLoader workers) has only
    the thread that forked: submitting to the parent's worker pools, and the verification's
    OpenMP teams on the forking thread, waited forever."""
    proc = subprocess.run([sys.executable, "-c", _FORKED_CHILDREN], capture_output=True, text=True, timeout=150,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["0", "0"], proc.stdout[-2000:]


_CONCURRENT_FIRST_USE = """
import threading, torch
from detkit import kernels
barrier = threading.Barrier(4)
errors = []
def first_use():
    barrier.wait()
    try:
        kernels.softmax(torch.randn(3, 5), -1)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=first_use) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors or "ok")
"""


def test_first_use_from_several_threads_waits_for_the_backend_import() -> None:
    """Threads that call a kernel while another imports the backend (a second, numba) got
    the half-executed module and an AttributeError."""
    for _ in range(3):  # the import is slow, so the race is hit nearly every time; 3 tries
        proc = subprocess.run([sys.executable, "-c", _CONCURRENT_FIRST_USE], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "ok", proc.stdout[-2000:]
