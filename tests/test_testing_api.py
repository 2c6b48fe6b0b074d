"""detkit.testing: the assertions on real batch-variant and batch-invariant functions."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from detkit import _testing_values as V
from detkit import testing as T
from detkit._testing_observers import OBSERVERS
from detkit.errors import InputError, InvarianceViolation
from detkit.testing import (
    BatchVariance,
    BitwiseMismatch,
    CheckResult,
    Nondeterminism,
    UlpMismatch,
    assert_batch_invariant,
    assert_bitwise_equal,
    assert_deterministic,
    assert_ulp_close,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


W64 = torch.randn(64, 64, generator=_gen(0))
X8 = torch.randn(8, 64, generator=_gen(1))


def linear(t: torch.Tensor) -> torch.Tensor:
    return F.linear(t, W64)


# ---------------------------------------------------------------- batch invariance


def test_linear_is_batch_variant_on_this_cpu_and_every_b_ge_2_is_flagged() -> None:
    # Measured on this machine: F.linear fp32 differs from the single-row result for
    # every b >= 2 (MKL picks a different kernel), so the check must flag each of them.
    with pytest.raises(BatchVariance) as info:
        assert_batch_invariant(linear, X8, batch_sizes=[1, 2, 3, 8, 16])
    err = info.value
    assert isinstance(err, AssertionError) and isinstance(err, InvarianceViolation)
    per_b = err.result.detail["per_batch_size"]
    assert per_b["1"]["differing"] == 0
    for b in ("2", "3", "8", "16"):
        assert per_b[b]["differing"] > 0, b
    assert err.result.verdict == "BATCH-VARIANT" and not err.result.passed
    assert err.result.worst_ulp is not None and err.result.worst_ulp >= 1
    first = err.result.detail["first_difference"]
    assert first["batch_size"] >= 2 and 0 <= first["position"] < first["batch_size"]
    # the report keeps the first mismatching elements, not only the message's table
    mismatches = first["diff"]["first_mismatches"]
    assert mismatches and all(m["a_bits"] != m["b_bits"] for m in mismatches)


def test_failure_message_says_what_differs_where_and_what_to_try() -> None:
    with pytest.raises(BatchVariance) as info:
        assert_batch_invariant(linear, X8, batch_sizes=[2, 4])
    msg = str(info.value)
    assert msg.startswith("BATCH-VARIANT: linear:")
    assert "placements" in msg and "%" in msg and "worst ULP" in msg
    assert "batch size  placements  differing  rows differing  max ULP" in msg
    assert "First difference: row " in msg and " at position " in msg and "of a batch of " in msg
    assert "elements differ bitwise" in msg and "max ULP" in msg
    # The table of first mismatches shows both values with their bits and the ULP distance.
    assert "alone (b=1)" in msg and "in batch (b=" in msg and "(0x" in msg
    assert "detkit.batch_invariant()" in msg


@given(
    rows=st.integers(2, 6),  # one row is refused (test_checks_that_could_not_fail_are_refused)
    cols=st.integers(1, 33),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4).filter(lambda s: max(s) >= 2),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    dim=st.sampled_from([0, 1]),
    positions=st.sampled_from(["random", "all", [0, -1]]),
    seed=st.integers(0, 2**16),
)
def test_elementwise_ops_are_batch_invariant(
    rows: int, cols: int, sizes: list[int], dtype: torch.dtype, dim: int, positions: object, seed: int
) -> None:
    x = torch.randn(rows, cols, generator=_gen(seed)).to(dtype)
    if dim == 1:
        x = x.T.contiguous()
    fn = lambda t: torch.tanh(t) * 3 + torch.exp(-t)  # noqa: E731
    result = assert_batch_invariant(fn, x, batch_sizes=sizes, dim=dim, positions=positions, seed=seed)
    assert result.passed and result.worst_ulp == 0
    assert result.detail["placements_checked"] >= rows * len(set(sizes)) or positions == [0, -1]


@given(rows=st.integers(2, 5), cols=st.integers(1, 20), seed=st.integers(0, 1000))
def test_numpy_functions_and_arrays(rows: int, cols: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    assert assert_batch_invariant(np.exp, x, batch_sizes=[1, 2, 5]).passed


def test_checks_that_could_not_fail_are_refused() -> None:
    """One row (batches of its copies), or outputs without elements, compare nothing that
    could reveal a function that mixes rows."""
    mixes_rows = lambda t: t - t.mean(0, keepdim=True)  # noqa: E731
    with pytest.raises(InputError, match="x has 1 row along dim=0, so every batch would hold copies"):
        assert_batch_invariant(mixes_rows, torch.randn(1, 8), batch_sizes=[1, 2, 4])
    with pytest.raises(BatchVariance):  # two rows: the same function is caught
        assert_batch_invariant(mixes_rows, torch.randn(2, 8), batch_sizes=[1, 2, 4])
    with pytest.raises(InputError, match=r"fn\(row 0\) has no elements to compare"):
        assert_batch_invariant(lambda t: t[:, :0], torch.randn(4, 8), batch_sizes=[1, 2])
    assert assert_batch_invariant(torch.exp, torch.randn(1, 8), batch_sizes=[1, 4], other=torch.randn(3, 8)).passed


def test_a_function_that_differs_from_itself_is_nondeterministic_not_batch_variant() -> None:
    dropout = torch.nn.Dropout(0.5).train()
    with pytest.raises(Nondeterminism, match="row 0 computed alone twice gave different bits") as info:
        assert_batch_invariant(dropout, torch.randn(4, 8), batch_sizes=[1, 2])
    assert info.value.result.verdict == "NONDETERMINISTIC" and info.value.result.check == "batch_invariant"


def test_values_that_cannot_be_compared_are_input_errors() -> None:
    with pytest.raises(InputError, match="does not fit a 64-bit number; compare it with =="):
        assert_bitwise_equal(2**70, 2**70 + 1)
    with pytest.raises(InputError, match=r"is a torch.sparse_coo tensor; compare x.to_dense\(\)"):
        assert_bitwise_equal(torch.eye(3).to_sparse(), torch.eye(3).to_sparse())
    with pytest.raises(InputError, match="is a meta tensor: it holds no values"):
        assert_bitwise_equal(torch.empty(3, device="meta"), torch.empty(3, device="meta"))


def test_a_nan_against_a_number_is_named_not_reported_as_zero_ulp() -> None:
    with pytest.raises(UlpMismatch, match=r"worst ULP 0 among numbers, and 1 NaN vs number\."):
        assert_ulp_close(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), max_ulp=0)


def test_a_worst_ulp_of_zero_says_why_the_bits_differ() -> None:
    """Bits can differ at 0 ULP: -0 vs +0, NaN payloads, NaN vs a number (no distance).
    A bare "worst ULP 0" in a failure read as a contradiction."""
    why = r"worst ULP 0 \(the bits differ only in signs of zero, NaN payloads or NaN vs number\)\."
    with pytest.raises(BitwiseMismatch, match=why):
        assert_bitwise_equal(torch.tensor([1.0, -0.0]), torch.tensor([1.0, 0.0]))

    def nan_in_company(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        if x.shape[0] > 1:
            y[-1, 0] = float("nan")
        return y

    with pytest.raises(BatchVariance, match=why):
        assert_batch_invariant(nan_in_company, torch.randn(8, 16), batch_sizes=[1, 2, 4])
    with pytest.raises(BitwiseMismatch, match=r"worst ULP 1\.\n"):
        assert_bitwise_equal(torch.tensor([1.0]), torch.tensor([1.0]).nextafter(torch.tensor([2.0])))


def test_numpy_matmul_is_batch_variant_on_this_cpu() -> None:
    # Measured here: np.matmul fp32 (OpenBLAS) differs from the single-row result for b >= 2.
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 64), dtype=np.float32), rng.standard_normal((64, 64), dtype=np.float32)
    with pytest.raises(BatchVariance) as info:
        assert_batch_invariant(lambda a: a @ w, x, batch_sizes=[1, 2, 4, 8])
    assert info.value.result.detail["per_batch_size"]["8"]["rows_differing"] > 0


def test_every_row_is_checked_not_only_row_0() -> None:
    sentinel = 1234.5

    def variant_for_one_row(t: torch.Tensor) -> torch.Tensor:
        out = t * 2
        if t.shape[0] > 1:  # a batch: nudge only the rows holding the sentinel by 1 ULP
            hit = t[:, 0] == sentinel
            out[hit] = torch.nextafter(out[hit], torch.full_like(out[hit], float("inf")))
        return out

    x = torch.randn(7, 5, generator=_gen(3))
    x[5, 0] = sentinel
    with pytest.raises(BatchVariance) as info:
        assert_batch_invariant(variant_for_one_row, x, batch_sizes=[2, 3])
    result = info.value.result
    assert result.detail["first_difference"]["row"] == 5
    assert result.worst_ulp == 1
    assert all(s["rows_differing"] == 1 for s in result.detail["per_batch_size"].values())


def test_positions_all_puts_every_row_at_every_position() -> None:
    seen: set[tuple[int, int, int]] = set()

    def spy(t: torch.Tensor) -> torch.Tensor:
        for pos, row in enumerate(t[:, 0].tolist()):
            seen.add((t.shape[0], pos, int(row)))
        return t.clone()

    x = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 3)
    assert_batch_invariant(spy, x, batch_sizes=[2, 3, 7], positions="all")
    for b in (2, 3, 7):
        assert {(b, p, r) for p in range(b) for r in range(5)} <= seen

    def variant_at_one_place(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        if t.shape[0] == 3 and t[2, 0] == 4:  # row 4 at position 2 of a batch of 3 only
            out[2] = -out[2]
        return out

    with pytest.raises(BatchVariance) as info:
        assert_batch_invariant(variant_at_one_place, x, batch_sizes=[3], positions="all")
    assert info.value.result.detail["first_difference"] | {"diff": None} == {
        "batch_size": 3, "position": 2, "row": 4, "output": "", "diff": None
    }


def test_explicit_positions_and_random_positions_are_seeded() -> None:
    places: list[list[tuple[int, int]]] = []

    def spy(t: torch.Tensor) -> torch.Tensor:
        places[-1].append(tuple(int(v) for v in t[:, 0].tolist()))  # type: ignore[arg-type]
        return t.clone()

    x = torch.arange(6, dtype=torch.float32)[:, None]
    for _ in range(2):
        places.append([])
        assert_batch_invariant(spy, x, batch_sizes=[4], seed=7)
    assert places[0] == places[1]
    places.append([])
    assert_batch_invariant(spy, x, batch_sizes=[4], positions=[-1])
    batches = [p for p in places[-1] if len(p) == 4]
    assert sorted(p[3] for p in batches) == list(range(6))  # each row once at the last slot


def test_other_rows_are_used_as_fillers() -> None:
    def normalise_by_batch_max(t: torch.Tensor) -> torch.Tensor:
        return t / t.abs().max()

    x = torch.ones(3, 4)
    # Identical rows: every batch made of them has the same max, so this passes ...
    assert assert_batch_invariant(normalise_by_batch_max, x, batch_sizes=[2, 5]).passed
    # ... but placed among other rows the result depends on the neighbours.
    other = torch.full((4, 4), 8.0)
    with pytest.raises(BatchVariance) as info:
        assert_batch_invariant(normalise_by_batch_max, x, batch_sizes=[2, 5], other=other)
    detail = info.value.result.detail
    assert detail["fillers"] == 4 and detail["placements_checked"] == 3 * 2


def test_tuple_and_dict_inputs_and_outputs() -> None:
    a = torch.randn(5, 16, generator=_gen(4))
    b = torch.randn(5, 16, generator=_gen(5))
    assert assert_batch_invariant(lambda p, q: (p * q, {"s": p + q}), (a, b), batch_sizes=[2, 3]).passed
    assert assert_batch_invariant(lambda p, q: p - q, {"p": a, "q": b}, batch_sizes=[2]).passed
    with pytest.raises(BatchVariance) as info:
        assert_batch_invariant(lambda p, q: {"exact": p * q, "mm": linear(p.repeat(1, 4))}, (a, b), batch_sizes=[4])
    assert "output ['mm']" in str(info.value)


def test_out_dim_and_bad_outputs() -> None:
    x = torch.randn(4, 6, generator=_gen(6))
    assert assert_batch_invariant(lambda t: t.T * 2, x, batch_sizes=[3], out_dim=1).passed
    with pytest.raises(InputError, match="has shape \\(6, 1\\) for a batch of 1; expected size 1 along out_dim=0"):
        assert_batch_invariant(lambda t: t.T * 2, x, batch_sizes=[3])
    with pytest.raises(InputError, match="0-d"):
        assert_batch_invariant(lambda t: t.sum(), x, batch_sizes=[2])
    with pytest.raises(InputError, match="returned nothing"):
        assert_batch_invariant(lambda t: None, x, batch_sizes=[2])
    with pytest.raises(InputError, match="tensors"):
        assert_batch_invariant(lambda t: "text", x, batch_sizes=[2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_sizes": []}, "non-empty"),
        ({"batch_sizes": [0, 2]}, "positive"),
        ({"batch_sizes": [True]}, "positive"),
        ({"positions": "first"}, "positions"),
        ({"positions": []}, "positions"),
        ({"dim": 2}, "out of range"),
        ({"other": torch.zeros(3, 5)}, "does not match x"),
        ({"other": torch.zeros(0, 4)}, "no rows"),
        # a check that compares nothing must not pass
        ({"batch_sizes": [1]}, "compares rows only with themselves"),
        ({"batch_sizes": [8, 64], "positions": [99]}, "nothing was compared"),
    ],
)
def test_bad_arguments_raise_input_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        assert_batch_invariant(torch.exp, torch.zeros(3, 4), **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="tensor"):
        assert_batch_invariant(torch.exp, [[1.0, 2.0]], batch_sizes=[2])
    with pytest.raises(InputError, match="different sizes"):
        assert_batch_invariant(torch.add, (torch.zeros(3, 2), torch.zeros(4, 2)), batch_sizes=[2])
    with pytest.raises(InputError, match="callable"):
        assert_batch_invariant("exp", torch.zeros(3, 2))  # type: ignore[arg-type]


# ---------------------------------------------------------------- determinism


def _random_order_sum(v: torch.Tensor) -> torch.Tensor:
    """Genuinely nondeterministic: sequential float32 addition (numpy's accumulate) in an
    order drawn from OS entropy; 10^6 values take hundreds of distinct sums, so runs
    agreeing by chance are out of reach."""
    perm = np.random.default_rng(random.SystemRandom().getrandbits(64)).permutation(v.shape[0])
    return torch.from_numpy(np.add.accumulate(v.numpy()[perm])[-1:]).reshape(())


def test_deterministic_passes_for_a_deterministic_function() -> None:
    result = assert_deterministic(linear, X8, runs=4)
    assert result.passed and result.detail["distinct_results"] == 1


def test_deterministic_catches_a_random_summation_order() -> None:
    v = torch.randn(1_000_000, generator=_gen(8))
    with pytest.raises(Nondeterminism) as info:
        assert_deterministic(_random_order_sum, v, runs=5)
    msg = str(info.value)
    assert msg.startswith("NONDETERMINISTIC: _random_order_sum:")
    assert "distinct results in 5 runs" in msg and "differs from run 1" in msg
    assert info.value.result.detail["distinct_results"] >= 2


def test_deterministic_restores_global_rng_states_between_runs() -> None:
    def noisy(t: torch.Tensor) -> torch.Tensor:
        return t + torch.randn(t.shape) + float(np.random.rand()) + random.random()

    assert assert_deterministic(noisy, X8, runs=3).passed
    with pytest.raises(Nondeterminism):
        assert_deterministic(noisy, X8, runs=3, restore_rng=False)


def test_deterministic_copies_outputs_returned_by_reference() -> None:
    buf = torch.zeros(3)

    def accumulate() -> torch.Tensor:
        buf.add_(1.0)
        return buf  # the same tensor every time, mutated in place

    with pytest.raises(Nondeterminism):
        assert_deterministic(accumulate, runs=2)


def test_deterministic_worst_ulp_covers_every_differing_output_not_only_the_first() -> None:
    calls = []

    def two_outputs() -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        bump = len(calls) > 1
        # A 1-ULP difference in the first output, 1024 ULP in the second.
        return (torch.tensor([1.0]) + bump * 2.0**-23, torch.tensor([1.0]) + bump * 2.0**-13)

    with pytest.raises(Nondeterminism) as info:
        assert_deterministic(two_outputs, runs=2)
    assert info.value.result.worst_ulp == 1024
    assert "worst ULP 1024." in str(info.value)


def test_deterministic_first_difference_names_runs_as_the_message_does() -> None:
    calls = []

    def third_run_differs() -> torch.Tensor:
        calls.append(1)
        return torch.tensor([1.0 + (len(calls) == 3)])

    with pytest.raises(Nondeterminism, match="run 3 differs from run 1") as info:
        assert_deterministic(third_run_differs, runs=3)
    detail = info.value.result.detail
    assert detail["runs_differing"] == [3] and detail["first_difference"]["run"] == 3


def test_deterministic_arguments() -> None:
    with pytest.raises(InputError, match="runs"):
        assert_deterministic(torch.exp, X8, runs=1)
    with pytest.raises(InputError, match="returned nothing"):
        assert_deterministic(lambda: None)
    assert assert_deterministic(lambda: 3.5).passed  # Python numbers are compared too


# ---------------------------------------------------------------- bitwise and ULP


def test_bitwise_equal_is_bitwise() -> None:
    x = X8.clone()
    assert assert_bitwise_equal(x, X8).passed
    assert assert_bitwise_equal(X8.numpy(), X8).passed  # numpy vs torch: same bits
    with pytest.raises(BitwiseMismatch, match="1 of 1 outputs differ"):
        assert_bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    nan_a = torch.tensor([0x7FC00000], dtype=torch.int32).view(torch.float32)
    nan_b = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    with pytest.raises(BitwiseMismatch):
        assert_bitwise_equal(nan_a, nan_b)
    with pytest.raises(BitwiseMismatch, match="float64"):
        assert_bitwise_equal(X8.double(), X8)
    with pytest.raises(BitwiseMismatch, match=r"\[8, 64\]"):
        assert_bitwise_equal(X8[:4], X8)
    with pytest.raises(BitwiseMismatch, match="1 of 3 elements differ"):
        assert_bitwise_equal(np.array([1, 2, 3]), np.array([1, 5, 3]))


def test_bitwise_equal_structures() -> None:
    a = {"logits": X8, "ids": torch.arange(3)}
    b = {"logits": X8.clone(), "ids": torch.tensor([0, 1, 3])}
    with pytest.raises(BitwiseMismatch) as info:
        assert_bitwise_equal(a, b)
    assert "['ids']" in str(info.value) and "['logits']" not in str(info.value)
    with pytest.raises(InputError, match="matching structures"):
        assert_bitwise_equal((X8,), (X8, X8))


@pytest.mark.parametrize("empty", [None, (), {}, [None], {"past_key_values": None}])
def test_pairwise_checks_that_compare_nothing_are_refused(empty: object) -> None:
    # HF outputs hold None for what was not asked for: comparing two of them is no check.
    with pytest.raises(InputError, match="nothing to compare"):
        assert_bitwise_equal(empty, empty)
    with pytest.raises(InputError, match="nothing to compare"):
        assert_ulp_close(empty, empty)


def _ulps_up(x: torch.Tensor, k: int) -> torch.Tensor:
    for _ in range(k):
        x = torch.nextafter(x, torch.full_like(x, float("inf")))
    return x


@given(
    # Any finite float32, subnormals and -0 included (nextafter of the largest is inf: 1 ULP).
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=20),
    k=st.integers(0, 4),
    max_ulp=st.integers(0, 4),
)
def test_ulp_close_matches_nextafter_steps(values: list[float], k: int, max_ulp: int) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = _ulps_up(x, k)
    if k <= max_ulp:
        result = assert_ulp_close(y, x, max_ulp=max_ulp)
        assert result.worst_ulp == k
    else:
        with pytest.raises(UlpMismatch) as info:
            assert_ulp_close(y, x, max_ulp=max_ulp)
        assert info.value.result.worst_ulp == k
        assert f"more than {max_ulp} ULP" in str(info.value)


@given(bits=st.lists(st.integers(0, 0x7F7F - 3), min_size=1, max_size=16), k=st.integers(1, 3))
def test_ulp_close_bfloat16_from_bit_patterns(bits: list[int], k: int) -> None:
    # numpy has no bfloat16: build values from uint16 bit patterns through torch.
    base = torch.tensor(bits, dtype=torch.int16)
    x = base.view(torch.bfloat16)
    y = (base + k).view(torch.bfloat16)  # k ULP up: non-negative and still finite (max is 0x7F7F)
    assert assert_ulp_close(y, x, max_ulp=k).worst_ulp == k
    with pytest.raises(UlpMismatch):
        assert_ulp_close(y, x, max_ulp=k - 1)


def test_ulp_close_special_values() -> None:
    nan, inf = float("nan"), float("inf")
    assert assert_ulp_close(torch.tensor([nan, 0.0, inf]), torch.tensor([nan, -0.0, inf]), max_ulp=0).passed
    with pytest.raises(UlpMismatch, match="NaN vs number"):
        assert_ulp_close(torch.tensor([nan]), torch.tensor([1.0]), max_ulp=1000)
    # No int32 overflow: 3e38 and -3e38 are 4,274,217,932 float32 ULPs apart.
    with pytest.raises(UlpMismatch) as info:
        assert_ulp_close(np.float32([3e38]), np.float32([-3e38]), max_ulp=2**31)
    assert info.value.result.worst_ulp == 4_274_217_932
    with pytest.raises(InputError, match="max_ulp"):
        assert_ulp_close(X8, X8, max_ulp=-1)
    with pytest.raises(UlpMismatch, match="differ") as info:
        assert_ulp_close(torch.tensor([1, 2]), torch.tensor([1, 3]), max_ulp=5)  # integers: exact
    # the headline said "more than 5 ULP ... worst ULP -" and the hint to raise max_ulp, which cannot help
    message = str(info.value)
    assert "integer outputs must match exactly" in message.splitlines()[0]
    assert "more than 5 ULP" not in message and "raise max_ulp" not in message


# ---------------------------------------------------------------- results and observers


def test_results_reach_observers_and_serialise() -> None:
    seen: list[CheckResult] = []
    OBSERVERS.append(seen.append)
    try:
        assert_bitwise_equal(X8, X8)
        with pytest.raises(BatchVariance):
            assert_batch_invariant(linear, X8, batch_sizes=[2])
    finally:
        OBSERVERS.remove(seen.append)
    assert [r.verdict for r in seen] == ["PASS", "BATCH-VARIANT"]
    import json

    json.dumps([r.to_dict() for r in seen], allow_nan=False)  # report-ready


def test_check_result_validates() -> None:
    with pytest.raises(ValueError, match="verdict"):
        CheckResult("batch_invariant", "OK")
    with pytest.raises(ValueError, match="check"):
        CheckResult("speed", "PASS")
    with pytest.raises(ValueError, match="worst_ulp"):
        CheckResult("ulp_close", "PASS", -1)
    assert set(T.VERDICTS) >= {"PASS", "BATCH-VARIANT", "NONDETERMINISTIC"}


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    from detkit.models import load_preset

    return load_preset("tiny-llama")


PROMPT_IDS = [[72, 101, 108, 108, 111], [84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110], [97]]


def test_generation_is_batch_variant_without_the_mode(tiny_llama: torch.nn.Module) -> None:
    # Negative control: plain HF Llama on this CPU gives different logits in a batch.
    with pytest.raises(BatchVariance) as info:
        T.assert_generation_invariant(tiny_llama, PROMPT_IDS, batch_sizes=[2, 3], max_new_tokens=3)
    detail = info.value.result.detail
    assert detail["placements_logits_differ"] > 0
    msg = str(info.value)
    assert "First difference: prompt" in msg and "left-padded by" in msg and "logits first differ at step" in msg


def test_generation_is_batch_invariant_under_the_mode(tiny_llama: torch.nn.Module) -> None:
    import detkit

    with detkit.batch_invariant():
        result = T.assert_generation_invariant(tiny_llama, PROMPT_IDS, batch_sizes=[1, 2, 3], max_new_tokens=3)
    assert result.passed and result.detail["placements_checked"] == 3 + 4 + 3


def test_a_model_whose_prepare_inputs_raises_is_still_checked(tiny_llama: torch.nn.Module,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom model's prepare_inputs_for_generation that refuses the decode step's
    arguments the check asks it with: the check says so and passes the mask on every step
    (what HF's generate does for every model but the state-space ones)."""
    import detkit

    def refuse(*args: object, **kwargs: object) -> None:
        raise TypeError("prepare_inputs_for_generation() got an unexpected keyword argument 'is_first_iteration'")

    monkeypatch.setattr(tiny_llama, "prepare_inputs_for_generation", refuse)
    with detkit.batch_invariant(), pytest.warns(UserWarning, match=r"prepare_inputs_for_generation raised TypeError"):
        result = T.assert_generation_invariant(tiny_llama, PROMPT_IDS, batch_sizes=[2], max_new_tokens=2)
    assert result.passed


def test_generation_arguments(tiny_llama: torch.nn.Module) -> None:
    tiny_llama.train()
    try:
        with pytest.raises(InputError, match="training mode"):
            T.assert_generation_invariant(tiny_llama, PROMPT_IDS, max_new_tokens=1)
    finally:
        tiny_llama.eval()
    with pytest.raises(InputError, match="tokenizer"):
        T.assert_generation_invariant(tiny_llama, ["hello"], max_new_tokens=1)
    with pytest.raises(InputError, match="max_new_tokens"):
        T.assert_generation_invariant(tiny_llama, PROMPT_IDS, max_new_tokens=0)
    with pytest.raises(InputError, match="prompts"):
        T.assert_generation_invariant(tiny_llama, "hello", max_new_tokens=1)
    with pytest.raises(InputError, match="2-D integer"):
        T.assert_generation_invariant(tiny_llama, torch.zeros(3), max_new_tokens=1)


def _tiny_seq2seq(family: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if family == "t5":  # relative position buckets
        config = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return transformers.T5ForConditionalGeneration(config).eval()
    # learned absolute positions, counted from the first (possibly padded) encoder position
    config = transformers.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=32)
    return transformers.BartForConditionalGeneration(config).eval()


SEQ2SEQ_PROMPTS = [[t % 128 for t in p] for p in PROMPT_IDS]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_generation_is_batch_variant_without_the_mode(family: str) -> None:
    with pytest.raises(BatchVariance) as info:
        T.assert_generation_invariant(_tiny_seq2seq(family), SEQ2SEQ_PROMPTS, batch_sizes=[2, 3], max_new_tokens=3)
    detail = info.value.result.detail
    assert detail["encoder_decoder"] is True and detail["padding_side"] == "right"
    assert detail["placements_logits_differ"] > 0
    assert "right-padded by" in str(info.value) and "padded on the left" not in str(info.value)


@pytest.mark.parametrize(("family", "side"), [("t5", "right"), ("t5", "left"), ("bart", "right")])
def test_encoder_decoder_generation_is_batch_invariant_under_the_mode(family: str, side: str) -> None:
    import detkit

    model = _tiny_seq2seq(family)
    with detkit.batch_invariant():
        result = T.assert_generation_invariant(model, SEQ2SEQ_PROMPTS, batch_sizes=[1, 2, 3], max_new_tokens=3,
                                               padding_side=side)
    assert result.passed and result.detail["placements_checked"] == 3 + 4 + 3
    assert result.detail["padding_side"] == side
    # The written-out loop is HF generate's greedy decoding (without the model's own
    # generation defaults, such as BART's forced EOS): the same tokens for a prompt alone.
    from transformers import GenerationConfig

    from detkit._testing_generation import greedy_seq2seq
    from detkit.probe.hf import _no_model_generation_defaults

    start = model.config.decoder_start_token_id
    with detkit.batch_invariant(), _no_model_generation_defaults(model):
        for prompt in SEQ2SEQ_PROMPTS:
            tokens, _ = greedy_seq2seq(model, [prompt], 0, 3, start, side)
            config = GenerationConfig(max_new_tokens=3, do_sample=False, decoder_start_token_id=start)
            generated = model.generate(torch.tensor([prompt]), generation_config=config)
            assert generated[0, 1:].tolist() == tokens[0].tolist()


def test_a_left_padded_bart_encoder_is_batch_variant_even_under_the_mode() -> None:
    # Not rounding: BART's learned positions count from the padded start, so left padding
    # changes what the encoder sees. The check catches it and says to pad on the right.
    import detkit

    with detkit.batch_invariant(), pytest.raises(BatchVariance) as info:
        T.assert_generation_invariant(_tiny_seq2seq("bart"), SEQ2SEQ_PROMPTS, batch_sizes=[2], max_new_tokens=2,
                                      padding_side="left")
    assert "left-padded by" in str(info.value) and "Pad it on the right" in str(info.value)
    # without the mode a left-padded T5 differs by rounding alone: no word about positions
    with pytest.raises(BatchVariance) as info:
        T.assert_generation_invariant(_tiny_seq2seq("t5"), SEQ2SEQ_PROMPTS, batch_sizes=[2], max_new_tokens=2,
                                      padding_side="left")
    assert "left-padded by" in str(info.value) and "Pad it on the right" not in str(info.value)


def test_a_left_padded_marian_encoder_fails_and_the_hint_does_not_call_its_positions_learned() -> None:
    # Marian's absolute positions are sinusoidal (MarianSinusoidalPositionalEmbedding), not
    # learned; counted from the padded start all the same.
    import transformers

    import detkit

    torch.manual_seed(0)
    marian = transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=128, decoder_vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_position_embeddings=32, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)).eval()
    assert type(marian.model.encoder.embed_positions).__name__ == "MarianSinusoidalPositionalEmbedding"
    with detkit.batch_invariant(), pytest.raises(BatchVariance) as info:
        T.assert_generation_invariant(marian, SEQ2SEQ_PROMPTS, batch_sizes=[2], max_new_tokens=2, padding_side="left")
    assert "sinusoidal in Marian" in str(info.value) and "Pad it on the right" in str(info.value)


def test_encoder_decoder_arguments(tiny_llama: torch.nn.Module) -> None:
    import transformers

    with pytest.raises(InputError, match="causal LM generates after the prompt"):
        T.assert_generation_invariant(tiny_llama, PROMPT_IDS, max_new_tokens=1, padding_side="right")
    bart = _tiny_seq2seq("bart")
    with pytest.raises(InputError, match="padding_side must be"):
        T.assert_generation_invariant(bart, SEQ2SEQ_PROMPTS, max_new_tokens=1, padding_side="middle")
    with pytest.raises(InputError, match="decoder needs 40 positions; the model has 32"):
        T.assert_generation_invariant(bart, SEQ2SEQ_PROMPTS, max_new_tokens=40)
    with pytest.raises(InputError, match="the model has 32"):
        T.assert_generation_invariant(bart, [[5] * 33], max_new_tokens=1)
    with pytest.raises(InputError, match="encoder-decoder model; the sampler-trainer check"):
        T.assert_trainer_matches_sampler(bart, SEQ2SEQ_PROMPTS, max_new_tokens=1)
    torch.manual_seed(0)
    speech = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=0, pad_token_id=1, bos_token_id=2, eos_token_id=3)).eval()
    with pytest.raises(InputError, match="encoder does not take token ids"):
        T.assert_generation_invariant(speech, SEQ2SEQ_PROMPTS, max_new_tokens=1)
    bart.generation_config.decoder_start_token_id = None
    bart.config.decoder_start_token_id = None
    bart.generation_config.bos_token_id = None  # generate's fallback
    with pytest.raises(InputError, match="decoder_start_token_id"):
        T.assert_generation_invariant(bart, SEQ2SEQ_PROMPTS, max_new_tokens=1)


def _tiny_led() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LEDConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_encoder_position_embeddings=64,
                                    max_decoder_position_embeddings=8, attention_window=[4], pad_token_id=1,
                                    bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return transformers.LEDForConditionalGeneration(config).eval()


def test_an_encoder_decoder_with_separate_position_tables_is_checked_against_each() -> None:
    # LED has no max_position_embeddings: max_encoder_/max_decoder_position_embeddings.
    # Past the decoder's 8 positions was an IndexError inside the model, not an InputError.
    led = _tiny_led()
    with pytest.raises(InputError, match="decoder needs 9 positions; the model has 64 in its encoder and 8 in its decoder"):
        T.assert_generation_invariant(led, [[5, 6, 7], [8, 9]], batch_sizes=[2], max_new_tokens=9)
    with pytest.raises(InputError, match="the longest prompt has 65 tokens"):
        T.assert_generation_invariant(led, [[5] * 65, [6]], batch_sizes=[2], max_new_tokens=1)
    import detkit

    with detkit.batch_invariant():  # at both limits: runs
        assert T.assert_generation_invariant(led, [[5, 6, 7] * 21 + [8], [9]], batch_sizes=[2], max_new_tokens=8).passed


def test_encoder_decoder_generation_starts_the_decoder_where_generate_does() -> None:
    # generation_config without decoder_start_token_id, config with one: generate starts
    # from generation_config.bos_token_id, not from the config's decoder_start_token_id.
    from detkit._testing_generation import decoder_start_id

    bart = _tiny_seq2seq("bart")
    bart.config.decoder_start_token_id = 5
    bart.generation_config.decoder_start_token_id = None
    bart.generation_config.forced_eos_token_id = None
    with torch.no_grad():
        generated = bart.generate(torch.tensor([SEQ2SEQ_PROMPTS[0]]), max_new_tokens=2, do_sample=False)
    assert decoder_start_id(bart) == generated[0, 0].item() == bart.generation_config.bos_token_id


def test_another_dtype_or_shape_is_named_as_such_not_as_ulp_distance() -> None:
    for check, error in ((T.assert_ulp_close, T.UlpMismatch), (T.assert_bitwise_equal, T.BitwiseMismatch)):
        for actual, expected, what in ((torch.ones(2), torch.ones(1), "float32[2] but expected is float32[1]"),
                                       (torch.ones(2), torch.ones(2, dtype=torch.float64), "but expected is float64[2]")):
            with pytest.raises(error) as info:
                check(actual, expected)
            text = str(info.value)
            assert "1 of 1 outputs have another dtype or shape than expected" in text and what in text
            assert "compare like with like" in text and "raise max_ulp" not in text


def test_failure_table_shows_subnormal_values_under_flush_denormal_mode() -> None:
    """Under torch.set_flush_denormal(True) the table of first mismatches widened the values
    with the mode on and showed two different subnormals as "0 (0x00022d85)" and
    "0 (0x000116c2)": values that read equal next to bits that differ."""
    a, b = torch.tensor([2.0**-140, 1.0]), torch.tensor([2.0**-141, 1.0])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        with pytest.raises(BitwiseMismatch) as info:
            assert_bitwise_equal(a, b)
        with pytest.raises(UlpMismatch) as info_np:
            assert_ulp_close(a.numpy(), b.numpy(), max_ulp=0)
    finally:
        torch.set_flush_denormal(False)
    for text in (str(info.value), str(info_np.value)):
        row = next(line for line in text.splitlines() if line.strip().startswith("(0,)"))
        assert f"{2.0**-141:.9g} (0x" in row and f"{2.0**-140:.9g} (0x" in row, row


def test_a_failure_never_reports_its_share_as_0_or_100_percent() -> None:
    """1 differing element of 100,000 read "(0.0%)", 99,999 of 100,000 "(100.0%)", and 10
    differing placements of 2128 "(0%)": shares that say nothing or everything differs."""
    x = np.zeros(100_000, dtype=np.float32)
    one = x.copy()
    one[7] = 1
    with pytest.raises(BitwiseMismatch, match=r"1 of 100,000 elements differ bitwise \(<0\.1%\)"):
        assert_bitwise_equal(one, x)
    almost = x + 1
    almost[7] = 0
    with pytest.raises(UlpMismatch, match=r"99,999 of 100,000 elements are more than 2 ULP apart \(>99\.9%;"):
        assert_ulp_close(almost, x)
    with pytest.raises(BitwiseMismatch, match=r"1 of 100,000 elements differ \(<0\.1%\)"):
        assert_bitwise_equal(one.astype(np.int32), x.astype(np.int32))

    def slot5_of_b32(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        if t.shape[0] == 32:
            out[5] += 1
        return out

    with pytest.raises(BatchVariance, match=r"10 of 2128 placements \(<1%\) differ"):
        assert_batch_invariant(slot5_of_b32, torch.randn(300, 4, generator=_gen(3)))


@given(st.integers(0, 10**6), st.integers(1, 10**6), st.integers(0, 2))
def test_share_is_never_rounded_to_a_false_extreme(k: int, n: int, decimals: int) -> None:
    from detkit._testing_values import share

    k = min(k, n)
    text = share(k, n, decimals)
    zero, full = f"{0:.{decimals}%}", f"{1:.{decimals}%}"
    assert (text == zero) == (k == 0) and (text == full) == (k == n)


def test_byte_swapped_arrays_compare_by_their_bits_not_their_bytes() -> None:
    """A big-endian float32 array (">f4", as np.frombuffer of a file gives) against the same
    values in native order failed assert_bitwise_equal with "0 of 2 elements differ bitwise",
    the table printed byte-swapped bits (0x0000803f for 1.0) and digests differed."""
    big = np.array([1.0, 2.0, -0.0], dtype=">f4")
    native = big.astype("=f4")
    assert assert_bitwise_equal(big, native).passed
    assert V.digest(big) == V.digest(native)
    other = np.array([1.0, 2.001953125], dtype=">f2")
    with pytest.raises(BitwiseMismatch) as info:
        assert_bitwise_equal(other, np.array([1.0, 2.0], dtype=">f2"))
    assert "2.002 (0x4001)" in str(info.value) and "2 (0x4000)" in str(info.value)
    assert V.digest(np.array([7], dtype=">i4")) == V.digest(np.array([7], dtype="<i4"))


def test_report_table_says_where_a_pairwise_check_first_differs() -> None:
    """docs/pytest.md: the report has, per check, "where the first difference is"; for
    assert_bitwise_equal and assert_ulp_close (whose detail lists "differences", not a
    "first_difference") that column was empty, and a dtype clash was not named."""
    from detkit._testing_render import to_markdown

    def row(fn: object, *args: object, **kwargs: object) -> str:
        with pytest.raises(T.DetkitAssertionError) as info:
            fn(*args, **kwargs)  # type: ignore[operator]
        entry = {"type": "check", "test": "t.py::t", **info.value.result.to_dict()}
        return next(line for line in to_markdown({"results": [entry]}).splitlines() if line.startswith("| t.py::t"))

    a = np.zeros((2, 3), dtype=np.float32)
    b = a.copy()
    b[1, 2] = 1
    assert row(assert_bitwise_equal, {"logits": a}, {"logits": b}).endswith("| output ['logits'], index (1, 2) |")
    assert row(assert_ulp_close, a, b, max_ulp=1).endswith("| index (1, 2) |")
    assert row(assert_bitwise_equal, a, a.astype(np.float64)).endswith("| expected float64[2, 3], got float32[2, 3] |")


def test_a_check_name_that_is_not_a_string_is_an_input_error() -> None:
    # an Enum name reached the pytest report, which could then not be written any more
    import enum

    class Colour(enum.Enum):
        RED = 1

    x = torch.ones(3)
    with pytest.raises(InputError, match="a check's name must be a string, got <Colour.RED: 1>"):
        assert_bitwise_equal(x, x, name=Colour.RED)  # type: ignore[arg-type]
    assert assert_bitwise_equal(x, x, name="ones").passed


@pytest.mark.parametrize("dtype", [np.longdouble, np.clongdouble])
def test_numpys_long_double_is_an_input_error_not_a_type_error(dtype: type) -> None:
    # it failed in a numpy view with "data type 'u16' not understood"
    values = np.ones(3, dtype=dtype)
    for actual in (values, values[0]):
        with pytest.raises(InputError, match="long double.*astype\\(np.float64\\)"):
            assert_bitwise_equal(actual, actual)
