"""An MoE layer's bookkeeping under the mode: ``histc`` counting tokens per expert and
``index_add`` gathering the experts' outputs (docs/mode.md, "Counts and index_add").

A sweep of transformers' causal LMs (scripts/sweep_causal_lms.py) found ``histc`` of
float expert ids in 49 MoE architectures and ``index_add`` in JetMoE and LongCat-Flash
(and in every MoE's eager experts loop). ``histc`` of integer values counts exactly,
which the mode checks at run time; torch's CPU ``index_add`` adds in index order, and on
CUDA (atomics, in arrival order) the mode adds in that same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import detkit
from detkit import mode
from detkit._aten_adapters import _cpu_adds_wide, histc_inexact_reason, index_add_in_order, occurrence_ranks
from detkit.errors import InvarianceViolation
from detkit.testing import assert_bitwise_equal

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _exact_histogram(values: np.ndarray, bins: int, lo: int, hi: int) -> np.ndarray:
    """The mathematical histogram, in integers: floor((x - lo) * bins / (hi - lo))."""
    kept = values[(values >= lo) & (values <= hi)].astype(np.int64)
    index = np.minimum((kept - lo) * bins // (hi - lo), bins - 1)
    return np.bincount(index, minlength=bins)


@given(experts=st.integers(1, 300), tokens=st.integers(0, 200), dtype=st.sampled_from(FLOATS),
       lo=st.integers(-5, 5), seed=st.integers(0, 2**16))
def test_histc_of_integer_values_is_the_exact_histogram_and_passes_through(
    experts: int, tokens: int, dtype: torch.dtype, lo: int, seed: int
) -> None:
    """An MoE router's ``histc(expert_ids.float(), bins=E, min=0, max=E - 1)`` (and other
    integer limits): torch's kernel gives the mathematical counts, so the mode lets it run
    (passed through, not a fallback; strict does not raise)."""
    if dtype in (torch.bfloat16, torch.float16):
        experts = min(experts, 15)  # bins * (max - min) within the exact integers of 16 bits
    ids = np.random.default_rng(seed).integers(lo - 2, lo + experts + 2, tokens)  # some outside the limits
    x = torch.from_numpy(ids).to(dtype)
    hi = lo + max(experts - 1, 1)
    with detkit.batch_invariant(strict=True) as bi:
        got = torch.histc(x, bins=experts, min=lo, max=hi)
    passed = bi.coverage().passed_through
    assert bi.uncovered() == {} and passed.get("histc") == {"integer values: torch's histc counts exactly": 1}
    assert got.dtype == dtype
    assert got.tolist() == _exact_histogram(ids, experts, lo, hi).tolist()


@pytest.mark.parametrize(("values", "kwargs", "reason"), [
    ([0.5, 1.0], dict(bins=4, min=0, max=2), "not integers"),
    ([0.0, float("nan")], dict(bins=4, min=0, max=2), "not integers"),
    ([0.0, 1.0], dict(bins=4, min=0, max=2.5), "limits 0 and 2.5"),
    ([0.0, 1.0], dict(bins=4096, min=0, max=4097), "past the exact integers of torch.float32"),
])
def test_histc_that_may_round_is_a_counted_fallback(values: list[float], kwargs: dict[str, Any], reason: str) -> None:
    x = torch.tensor(values)
    with detkit.batch_invariant() as bi:
        got = torch.histc(x, **kwargs)
    assert_bitwise_equal(got, torch.histc(x, **kwargs))  # torch's own kernel ran
    (why,) = bi.uncovered()["histc"]
    assert reason in why
    with detkit.batch_invariant(strict=True), pytest.raises(InvarianceViolation, match="histc"):
        torch.histc(x, **kwargs)


def test_histc_limits_follow_torchs_rules() -> None:
    """min = max = 0: the data's range; a range of one value widened by 1 each side; 16-bit
    counts bounded by the exact integers of the dtype."""
    assert histc_inexact_reason(torch.tensor([2.0, 9.0]), 7, 0, 0) is None
    assert histc_inexact_reason(torch.tensor([2.5, 2.5]), 3, 0, 0) is not None
    assert histc_inexact_reason(torch.full((3,), 2.0), 3, 2, 2) is None
    assert histc_inexact_reason(torch.zeros(256, dtype=torch.bfloat16), 1, 0, 1) is None
    assert "257 elements" in str(histc_inexact_reason(torch.zeros(257, dtype=torch.bfloat16), 1, 0, 1))
    assert histc_inexact_reason(torch.arange(5), 5, 0, 4) is None  # an integer tensor (CUDA takes them)
    with detkit.batch_invariant(strict=True):
        assert torch.histc(torch.full((3,), 2.0), bins=3).tolist() == [0.0, 3.0, 0.0]


@given(index=st.lists(st.integers(0, 6), max_size=60))
def test_occurrence_ranks_count_the_earlier_equal_indices(index: list[int]) -> None:
    ranks = occurrence_ranks(torch.tensor(index, dtype=torch.int64)).tolist()
    assert ranks == [index[:i].count(v) for i, v in enumerate(index)]


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data(), n=st.integers(0, 120),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       index_dtype=st.sampled_from([torch.int64, torch.int32]), seed=st.integers(0, 2**16))
def test_index_add_in_order_gives_torchs_cpu_bits(shape: list[int], data: st.DataObject, n: int,
                                                  dtype: torch.dtype, index_dtype: torch.dtype, seed: int) -> None:
    """The CUDA adapter's computation, run on the CPU, against torch's CPU kernel: each
    destination's additions in index order, 16-bit tensors added in float32 and rounded
    once exactly where torch's CPU kernel does so (first or last dim, int64 index) and
    rounded at every addition elsewhere. So on a GPU the mode gives the CPU's bits."""
    dim = data.draw(st.integers(0, len(shape) - 1))
    rng = np.random.default_rng(seed)
    index = torch.from_numpy(rng.integers(0, shape[dim], n)).to(index_dtype)
    x = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    source_shape = list(shape)
    source_shape[dim] = n
    source = torch.from_numpy(rng.standard_normal(source_shape) * 100).to(dtype)
    want = x.clone().index_add_(dim, index, source)
    got = index_add_in_order(x.clone(), dim, index.long(), source, wide=_cpu_adds_wide(x, dim, index))
    assert_bitwise_equal(got, want, name=f"{shape} dim {dim} {dtype} {index_dtype}")


@pytest.mark.parametrize(("dim", "index_dtype", "wide"), [(0, torch.int64, True), (2, torch.int64, True),
                                                          (1, torch.int64, False), (0, torch.int32, False)])
def test_torchs_cpu_index_add_of_16_bit_tensors_rounds_as_the_rule_says(dim: int, index_dtype: torch.dtype,
                                                                        wide: bool) -> None:
    """The rule ``_cpu_adds_wide`` encodes, against torch: many additions to few rows, so
    rounding every addition and rounding once give different bits."""
    x = torch.zeros(3, 3, 3, dtype=torch.bfloat16)
    source_shape = [3, 3, 3]
    source_shape[dim] = 400
    source = torch.from_numpy(np.random.default_rng(0).standard_normal(source_shape)).to(torch.bfloat16)
    index = torch.arange(400).remainder(3).to(index_dtype)
    assert _cpu_adds_wide(x, dim, index) == wide
    rounded_once = index_add_in_order(x.clone(), dim, index.long(), source, wide=True)
    every_addition = index_add_in_order(x.clone(), dim, index.long(), source, wide=False)
    assert not torch.equal(rounded_once, every_addition), "the two roundings agree here: the test proves nothing"
    assert_bitwise_equal(x.clone().index_add_(dim, index, source), rounded_once if wide else every_addition)


def test_index_add_on_the_cpu_passes_through_and_alpha_is_a_fallback() -> None:
    x, source, index = torch.zeros(4, 3), torch.randn(5, 3), torch.tensor([1, 1, 2, 0, 1])
    with detkit.batch_invariant(strict=True) as bi:
        got = x.index_add(0, index, source)
        x.clone().index_add_(0, index, source)
        torch.zeros(4, dtype=torch.int64).index_add_(0, index, torch.arange(5))
    assert_bitwise_equal(got, torch.zeros(4, 3).index_add(0, index, source))
    assert bi.uncovered() == {} and set(bi.coverage().passed_through) == {"index_add", "index_add_"}
    with detkit.batch_invariant() as bi:
        x.index_add(0, index, source, alpha=2.0)
    assert "alpha" in next(iter(bi.uncovered()["index_add"]))


def test_an_eager_moe_layer_is_batch_invariant_and_fully_covered() -> None:
    """A Mixtral-style experts loop as transformers' eager implementation writes it: route,
    count tokens per expert with histc, run each expert on its tokens, index_add the
    weighted outputs back. Every token's output has the same bits alone and in the batch,
    and the trace lists nothing uncovered."""
    g = torch.Generator().manual_seed(0)
    hidden, experts, top_k = 32, 4, 2
    router = torch.randn(experts, hidden, generator=g)
    w_in, w_out = torch.randn(experts, 64, hidden, generator=g) / 8, torch.randn(experts, hidden, 64, generator=g) / 8

    def moe(x: torch.Tensor) -> torch.Tensor:
        weights, chosen = torch.topk(torch.softmax(x @ router.T, -1), top_k, -1)
        flat = chosen.reshape(-1)
        counts = torch.histc(flat.float(), bins=experts, min=0, max=experts - 1).long()
        order = torch.argsort(flat, stable=True)
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts.tolist()):
            picked = order[start : start + count]
            start += count
            tokens = picked // top_k
            y = torch.nn.functional.silu(x[tokens] @ w_in[e].T) @ w_out[e].T
            out.index_add_(0, tokens, y * weights.reshape(-1)[picked, None])
        return out

    x = torch.randn(24, hidden, generator=g)
    with detkit.batch_invariant(strict=True) as bi:
        whole = moe(x)
        for i in range(x.shape[0]):
            assert_bitwise_equal(moe(x[i : i + 1]), whole[i : i + 1], name=f"token {i}")
    assert bi.uncovered() == {} and {"histc", "index_add_"} <= set(bi.coverage().passed_through)
    _, ops = mode.trace_ops(moe, x)
    report = mode.coverage_report(ops)
    assert report.uncovered == {}, str(report)
    assert "histc.default" in report.exact and "index_add_.default" in report.routed, str(report)


def test_coverage_report_checks_histc_values_as_traced() -> None:
    _, ops = mode.trace_ops(lambda: (torch.histc(torch.tensor([0.0, 3.0]), bins=4, min=0, max=3),
                                     torch.eye(3), torch.zeros(2).new_full((2,), 1.5)))
    report = mode.coverage_report(ops)
    assert {"histc.default", "eye.default", "new_full.default"} <= set(report.exact), str(report)
    assert "integer values" in report.notes["histc.default"]
    _, ops = mode.trace_ops(lambda: torch.histc(torch.tensor([0.25, 3.0]), bins=4, min=0, max=3))
    report = mode.coverage_report(ops)
    assert "histc.default" in report.uncovered and "not integers" in report.notes["histc.default"], str(report)


@pytest.mark.parametrize(("shape", "dim", "index_dtype"), [((6, 5), 0, torch.int64), ((3, 6, 4), 1, torch.int64),
                                                           ((5, 6), -1, torch.int32), ((6,), 0, torch.int64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_adapter_run_on_the_cpu_gives_torchs_cpu_bits(shape: tuple[int, ...], dim: int,
                                                               index_dtype: torch.dtype, dtype: torch.dtype,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter's own path (what CUDA tensors take: arguments checked, the 16-bit rule,
    the in-order additions), forced on CPU tensors, against torch's CPU kernel; functional
    and in-place forms. A bad index keeps torch's error."""
    from detkit import _aten_adapters

    monkeypatch.setattr(_aten_adapters, "_adds_in_index_order", lambda device: False)
    rng = np.random.default_rng(3)
    index = torch.from_numpy(rng.integers(0, shape[dim], 200)).to(index_dtype)
    source_shape = list(shape)
    source_shape[dim] = 200
    source = torch.from_numpy(rng.standard_normal(source_shape) * 50).to(dtype)
    x = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    want = x.index_add(dim, index, source)
    with detkit.batch_invariant(strict=True) as bi:
        got = x.index_add(dim, index, source)
        inplace = x.clone()
        inplace.index_add_(dim, index, source)
        with pytest.raises((IndexError, RuntimeError), match="out of"):  # torch's message
            x.index_add(dim, index.clamp_max(0) - 1, source)
    assert bi.routed() == {"index_add": 1, "index_add_": 1}, bi.coverage()
    assert_bitwise_equal(got, want)
    assert_bitwise_equal(inplace, want)
