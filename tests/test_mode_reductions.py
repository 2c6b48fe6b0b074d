"""logsumexp, var/std (and var_mean/std_mean), the vector norms (so F.normalize),
nansum/nanmean, logsigmoid and the negative log-likelihood loss (F.cross_entropy) under
the mode: compositions of routed ops (docs/mode.md, "Composed reductions").

torch's CPU reductions split one long row across threads, so the logsumexp of a row over
a real vocabulary changes when the row is computed alone (a decode step, a sampler) instead
of in a batch (a trainer's forward): the negative control below. Under the mode each
output is the same fixed sequence of batch-invariant ops, and in portable mode of portable
ones, so its bits are also the definition's, computed here by hand from the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import detkit
from detkit import kernels as kn
from detkit import mode
from detkit.errors import InvarianceViolation
from detkit._testing_values import host_bits
from detkit.testing import assert_batch_invariant, assert_bitwise_equal

Op = Callable[[torch.Tensor], object]

# name: (the call, the aten overload it routes). Each reduces the last dim (or the last
# two), one output per row of dim 0.
OPS: dict[str, tuple[Op, str]] = {
    "logsumexp": (lambda x: torch.logsumexp(x, -1), "logsumexp"),
    "logsumexp_2d": (lambda x: torch.logsumexp(x, (-2, -1), keepdim=True), "logsumexp"),
    "var": (lambda x: x.var(-1), "var.correction"),
    "var_c0": (lambda x: torch.var(x, -1, correction=0, keepdim=True), "var.correction"),
    "std": (lambda x: x.std(-1), "std.correction"),
    "var_mean": (lambda x: torch.var_mean(x, -1), "var_mean.correction"),
    "std_mean_2d": (lambda x: torch.std_mean(x, (1, 2)), "std_mean.correction"),
    "norm2": (lambda x: torch.linalg.vector_norm(x, dim=-1), "linalg_vector_norm"),
    "norm1": (lambda x: torch.linalg.vector_norm(x, 1, dim=-1), "linalg_vector_norm"),
    "norm_inf": (lambda x: torch.linalg.vector_norm(x, math.inf, dim=-1), "linalg_vector_norm"),
    "norm_3": (lambda x: torch.linalg.vector_norm(x, 3, dim=-1), "linalg_vector_norm"),
    "norm_2.5": (lambda x: torch.linalg.vector_norm(x, 2.5, dim=-1), "linalg_vector_norm"),
    "normalize": (lambda x: F.normalize(x, dim=-1), "linalg_vector_norm"),
    "normalize_2d": (lambda x: F.normalize(x, dim=(1, 2)), "linalg_vector_norm"),
    "norm_legacy": (lambda x: torch.ops.aten.norm.ScalarOpt_dim(x, 2, [-1]), "norm.ScalarOpt_dim"),
    "nansum": (lambda x: torch.nansum(x, -1), "nansum"),
    "nanmean_2d": (lambda x: torch.nanmean(x, (1, 2)), "nanmean"),
    # elementwise, but composed the same way (a DPO loss is logsigmoid of a margin)
    "logsigmoid": (F.logsigmoid, "log_sigmoid_forward"),
    # in portable mode composed from exp and log (Kahan's correction), else torch's, aligned
    "expm1": (torch.expm1, "expm1"),
    # F.kl_div's target * log(target), zeros included (0 * log(y) is 0)
    "xlogy": (lambda x: torch.xlogy(x.abs().flip(-1) * (x > 0), x.abs()), "xlogy.Tensor"),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rows(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    # numpy's generator: torch.randn itself differs between CPU instruction sets
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype)


def _input(name: str, rows: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = _rows((rows, 3, max(n // 3, 1)) if name.endswith("_2d") else (rows, n), dtype, seed)
    if name.startswith("nan"):  # what nansum and nanmean are for
        x[torch.from_numpy(np.random.default_rng(seed + 7).random(x.shape) < 0.1)] = math.nan
    return x


def planted_input(name: str, rows: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``_input`` with an inf, a -inf and a NaN planted in rows 1, 2 and 3 (the CUDA tests
    use it too)."""
    x = _input(name, rows, n, dtype, seed)
    flat = x.view(rows, -1)
    flat[1, 0], flat[2, 3], flat[3, 5] = math.inf, -math.inf, math.nan
    return x


def _rows_alone_differing(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> int:
    """How many rows (dim 0 of every input) ``fn`` gives other bits alone than in the batch."""
    full = fn(*inputs)
    return sum(not torch.equal(fn(*(t[i : i + 1] for t in inputs)), full[i : i + 1]) for i in range(full.shape[0]))


@pytest.mark.parametrize("portable", [False, True])
def test_torchs_logsumexp_of_a_row_alone_differs_from_the_batch_and_the_modes_does_not(portable: bool) -> None:
    """A sampler's logsumexp of one row of GPT-2-sized logits (50,257) against a trainer's
    of the batch: torch's CPU sum splits a lone row across threads, the batch by rows, so
    some rows' bits differ (the negative control); under the mode none does."""
    x = _rows((64, 50257), torch.float32, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what splits the row; the CI machine has 2 cores
    try:
        def rows_differing() -> int:
            return _rows_alone_differing(lambda t: torch.logsumexp(t, -1), x)

        assert rows_differing() > 0, "negative control: torch's logsumexp did not change; the test proves nothing here"
        with detkit.batch_invariant(portable=portable, strict=True) as bi:
            assert rows_differing() == 0
        assert bi.routed()["logsumexp"] == 65 and bi.routed()["sum.dim_IntList"] == 65
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("portable", [False, True])
def test_torchs_bfloat16_nanmean_changes_at_a_batch_of_one_and_the_modes_does_not(portable: bool) -> None:
    """torch's nanmean divides the bfloat16 nansum by the integer count of non-NaN values;
    its CPU kernel rounds that count to bfloat16 first (297 becomes 296) unless the count is
    a single element, as at a batch of one. Under the mode the mean is taken in float32 and
    rounded once, whatever the batch."""
    x = _input("nanmean", 64, 333, torch.bfloat16, 5)

    def rows_differing() -> int:
        return _rows_alone_differing(lambda t: torch.nanmean(t, -1), x)

    assert rows_differing() > 0, "negative control: torch's nanmean did not change; the test proves nothing here"
    with detkit.batch_invariant(portable=portable, strict=True) as bi:
        assert rows_differing() == 0
    assert bi.routed()["nanmean"] == 65


def test_a_policys_log_probs_and_entropy_from_torch_distributions_are_batch_invariant() -> None:
    """RL code scores sampled actions with torch.distributions.Categorical(logits=...),
    which normalises the logits with logsumexp: a PPO step's log-probabilities and entropies
    of GPT-2-sized rows changed between a row alone and the batch on 2 threads (negative
    control); under the mode (logsumexp, softmax and sum routed) none does."""
    logits = _rows((32, 50257), torch.float32, 30)
    actions = torch.from_numpy(np.random.default_rng(31).integers(0, 50257, 32))

    def scored(lg: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        policy = torch.distributions.Categorical(logits=lg)
        return torch.stack([policy.log_prob(a), policy.entropy()], -1)

    def rows_differing() -> int:
        return _rows_alone_differing(scored, logits, actions)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert rows_differing() > 0, "negative control: torch did not change; the test proves nothing here"
        with detkit.batch_invariant(strict=True) as bi:
            assert rows_differing() == 0
        assert bi.uncovered() == {} and "logsumexp" in bi.routed()
    finally:
        torch.set_num_threads(threads)


@given(name=st.sampled_from(sorted(OPS)), rows=st.integers(2, 9), n=st.integers(1, 700),
       dtype=st.sampled_from(DTYPES), portable=st.booleans(), seed=st.integers(0, 2**16))
def test_every_row_has_the_same_bits_alone_in_any_batch_and_at_any_position(
    name: str, rows: int, n: int, dtype: torch.dtype, portable: bool, seed: int
) -> None:
    x = _input(name, rows, n, dtype, seed)
    filler = _input(name, 7, n, dtype, seed + 1)
    with detkit.batch_invariant(portable=portable, strict=True):
        assert_batch_invariant(OPS[name][0], x, [1, 2, 3, 8, 16], positions="random", name=name)
        assert_batch_invariant(OPS[name][0], x, [2, 5], positions="all", other=filler, name=f"{name} among others")


def _by_hand(name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The portable definition, from the portable kernels themselves (rows of dim 0; 16-bit
    inputs computed in float32 and rounded once)."""
    # imported here: tests/test_cuda_gpu.py imports OPS on GPU machines that may lack numba
    from detkit.kernels import portable_cpu as P

    dtype = x.dtype
    w = x.float().reshape(x.shape[0], -1) if name.endswith("_2d") else x.float()
    n = w.shape[-1]

    def out(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(dtype).masked_fill(t.isnan(), math.nan) for t in ts)  # the canonical NaN

    def ss(v: torch.Tensor) -> torch.Tensor:
        return kn.sum(v, -1, portable=True)

    if name.startswith("logsumexp"):
        m = w.amax(-1, keepdim=True)
        m = m.masked_fill(m.abs() == math.inf, 0)
        res = P.elementwise("log", ss(P.elementwise("exp", w - m))) + m[:, 0]
        return out(res.reshape(-1, 1, 1) if name.endswith("_2d") else res)
    if name.startswith(("var", "std")):
        mean = kn.mean(w, -1, keepdim=True, portable=True)
        d = w - mean
        v = ss(d * d) / max(n - (0 if name == "var_c0" else 1), 0)
        v = v.sqrt() if name.startswith("std") else v
        if name == "var_c0":
            v = v[:, None]
        return out(v, mean[:, 0]) if "_mean" in name else out(v)
    if name == "nansum":
        return out(ss(w.masked_fill(w.isnan(), 0)))
    if name == "logsigmoid":
        return out(w.clamp_max(0) - P.elementwise("log1p", P.elementwise("exp", -w.abs())))
    if name == "xlogy":
        a = w.abs().flip(-1) * (w > 0)
        res = torch.where((a == 0) & ~w.isnan(), 0.0, a * P.elementwise("log", w.abs()))
        return out(res)
    if name == "expm1":
        u = P.elementwise("exp", w)
        res = (u - 1) * (w / P.elementwise("log", u))
        res = torch.where(u == 1, w, torch.where(u - 1 == -1, -1.0, torch.where(u == math.inf, math.inf, res)))
        return out(res)
    if name == "nanmean_2d":
        return out(ss(w.masked_fill(w.isnan(), 0)) / (~w.isnan()).sum(-1).float())
    a = w.abs()
    if name in ("norm2", "norm_legacy"):
        return out(ss(a * a).sqrt())
    if name == "norm1":
        return out(ss(a))
    if name == "norm_inf":
        return out(a.amax(-1))
    if name == "norm_3":  # pow(x, 3) is the portable cube; the root is Pow
        return out(P.pow(ss(P.elementwise("cube", a)), 1.0 / 3))
    if name == "norm_2.5":
        return out(P.pow(ss(P.pow(a, 2.5)), 1.0 / 2.5))
    # F.normalize: x / max(norm, eps), the norm rounded to x's dtype first
    (norm,) = _by_hand("norm2", x.reshape(x.shape[0], -1))
    return (x / norm.reshape(-1, *[1] * (x.dim() - 1)).clamp_min(1e-12),)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_portable_results_are_the_composition_of_the_portable_kernels(name: str, dtype: torch.dtype) -> None:
    x = planted_input(name, 6, 333, dtype, 5)
    fn, routed_as = OPS[name]
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        got = fn(x)
    assert bi.not_portable() == {} and bi.uncovered() == {}
    assert routed_as in bi.routed()
    assert_bitwise_equal(got if isinstance(got, tuple) else (got,), _by_hand(name, x), name=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_through_the_executable_spec_the_compositions_give_the_portable_backends_bits(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU check compares the CUDA results with these where numba is missing: portable
    mode with the CPU portable backend replaced by the plain-Python spec gives the numba
    backend's bits for every composition (small rows: the spec is slow)."""
    from detkit.kernels import _backend

    inputs = {name: planted_input(name, 4, 60, dtype, 17) for name in OPS}
    with detkit.batch_invariant(portable=True, strict=True):
        want = {name: fn(inputs[name]) for name, (fn, _) in OPS.items()}
    monkeypatch.setitem(_backend.BACKEND_MODULES, ("cpu", True), "detkit.kernels.spec")
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        got = {name: fn(inputs[name]) for name, (fn, _) in OPS.items()}
    assert bi.uncovered() == {} and bi.not_portable() == {}
    assert_bitwise_equal(got, want, name=f"spec vs numba, {dtype}")


CANONICAL_NAN = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_nan_result_is_the_canonical_nan_at_every_position(dtype: torch.dtype, portable: bool) -> None:
    """torch converts a float32 NaN to 16 bits as 0x7FC0 on its scalar path and 0xFFFF on
    its vector path, so a row's NaN would depend on where the row sits in the output; and
    a NaN's sign and payload from torch's arithmetic differ between devices. Every NaN the
    compositions return is canonical-orders.md's quiet NaN."""
    with detkit.batch_invariant(portable=portable, strict=True):
        for name, (fn, _) in OPS.items():
            if name.startswith(("normalize", "nan")) or (name == "expm1" and not portable):
                continue  # a division of torch's or its aligned expm1 (NaN bits and all), or NaN read as zero
            x = _input(name, 100, 120, dtype, 3)
            x.view(100, -1)[::3, 5] = math.nan
            got = fn(x)
            for res in got if isinstance(got, tuple) else (got,):
                bits = res[res.isnan()].view(torch.int32 if dtype == torch.float32 else torch.int16)
                assert bits.numel() > 0 and bool(((bits & (2 ** (8 * res.element_size()) - 1))
                                                  == CANONICAL_NAN[dtype]).all()), (name, bits.unique())


CALLS: dict[str, Callable[[torch.Tensor], object]] = {
    "logsumexp keepdim": lambda x: torch.logsumexp(x, 1, keepdim=True),
    "logsumexp dims 0,2": lambda x: torch.logsumexp(x, (0, 2)),
    "logsumexp all": lambda x: torch.logsumexp(x, (), keepdim=True),
    "logsumexp of ints": lambda x: torch.logsumexp((x * 4).long(), -1),
    "logsumexp of -inf rows": lambda x: torch.logsumexp(torch.full_like(x, -math.inf), -1),
    "var all": lambda x: x.var(),
    "var dim 0": lambda x: x.var(0, keepdim=True),
    "var correction 2.5": lambda x: torch.var(x, -1, correction=2.5),
    "var of one value": lambda x: x[..., :1].var(-1),
    "std unbiased=False": lambda x: x.std((0, 1), unbiased=False),
    "var_mean keepdim": lambda x: torch.var_mean(x, 1, keepdim=True),
    "std_mean all": lambda x: torch.std_mean(x),
    "norm all": lambda x: torch.linalg.vector_norm(x),
    "norm ord 0": lambda x: torch.linalg.vector_norm(x.round(), 0, dim=-1),
    "norm ord -inf": lambda x: torch.linalg.vector_norm(x, -math.inf, dim=(0, 2), keepdim=True),
    "norm ord -1.5": lambda x: torch.linalg.vector_norm(x, -1.5, dim=-1),
    "norm dtype=float64": lambda x: torch.linalg.vector_norm(x.float(), dim=-1, dtype=torch.float64),
    "Tensor.norm": lambda x: x.norm(dim=1),
    "norm.Scalar": lambda x: torch.ops.aten.norm.Scalar(x, 3),
    "pairwise_distance": lambda x: F.pairwise_distance(x[0], x[1]),
    "cosine_similarity": lambda x: F.cosine_similarity(x[0], x[1], dim=-1),
    "nansum dims 0,2": lambda x: torch.nansum(x, (0, 2)),
    "nansum dtype=float64": lambda x: torch.nansum(x, -1, dtype=torch.float64),
    "nanmean": lambda x: x.nanmean(-1, keepdim=True),
    "0-d logsumexp": lambda x: torch.logsumexp(x[0, 0, 0], 0),
    "0-d var": lambda x: x[0, 0, 0].var(correction=0),
    "logsigmoid": F.logsigmoid,
    "logsigmoid of ints' float": lambda x: F.logsigmoid((x * 4).round()),
    "0-d logsigmoid": lambda x: F.logsigmoid(x[0, 0, 0]),
}


# torch's var_mean/std_mean kernel (Welford's update) gives a mean of NaN or +-inf for a
# row holding an infinity, depending on where it is; the composition's mean is torch.mean's.
WANT = {
    "var_mean keepdim": lambda x: (torch.var(x, 1, keepdim=True), torch.mean(x, 1, keepdim=True)),
    "std_mean all": lambda x: (torch.std(x), torch.mean(x)),
}


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_values_shapes_and_dtypes_are_torchs(call: str, dtype: torch.dtype, portable: bool) -> None:
    """Every argument form gives torch's shape, dtype and special values, and values within
    rounding of torch's (bfloat16 inputs are computed in float32, so closer to exact)."""
    x = _rows((4, 5, 37), dtype, 9)
    x[0, 1, 2] = math.nan
    x[1, 2, 3] = math.inf
    want = WANT.get(call, CALLS[call])(x)
    with detkit.batch_invariant(portable=portable) as bi:
        got = CALLS[call](x)
    assert bi.routed(), "nothing was routed"
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}[w.dtype]
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, equal_nan=True)


def test_outside_the_composition_torch_runs_and_says_so() -> None:
    """Complex input is left to torch and counted (strict: an error); empty input and the
    errors torch raises (var of integers, a bad dim) are torch's own."""
    z = torch.randn(3, 8, dtype=torch.complex64)
    with detkit.batch_invariant() as bi:
        torch.linalg.vector_norm(z, dim=-1)
        torch.var(z, -1)
    assert set(bi.uncovered()) == {"linalg_vector_norm", "var.correction"}
    with detkit.batch_invariant(strict=True), pytest.raises(InvarianceViolation, match="logsumexp"):
        torch.logsumexp(z, -1)
    empty = torch.empty(3, 0)
    with detkit.batch_invariant(strict=True) as bi:
        assert torch.equal(torch.logsumexp(empty, -1), torch.full((3,), -math.inf))
        assert torch.linalg.vector_norm(empty, dim=-1).tolist() == [0.0, 0.0, 0.0]
        assert torch.var(empty, -1).isnan().all()
        for bad, match in ((lambda: torch.var(torch.arange(6), -1), "floating point"),
                           (lambda: torch.logsumexp(torch.ones(2, 3), 2), "out of range"),
                           (lambda: torch.logsumexp(torch.ones(2, 3), ()), "shape")):
            with pytest.raises((RuntimeError, IndexError), match=match):
                bad()
    assert bi.uncovered() == {}


@pytest.mark.parametrize("portable", [False, True])
def test_out_forms_are_routed(portable: bool) -> None:
    x = _rows((6, 40), torch.float32, 2)
    with detkit.batch_invariant(portable=portable, strict=True) as bi:
        for fn, out_fn in ((lambda: torch.logsumexp(x, -1), lambda o: torch.logsumexp(x, -1, out=o)),
                           (lambda: torch.var(x, -1), lambda o: torch.var(x, -1, out=o)),
                           (lambda: torch.std(x, 0), lambda o: torch.std(x, 0, out=o)),
                           (lambda: torch.linalg.vector_norm(x, dim=-1), lambda o: torch.linalg.vector_norm(x, dim=-1, out=o)),
                           (lambda: torch.nansum(x, 1), lambda o: torch.nansum(x, 1, out=o)),
                           (lambda: torch.nanmean(x, 1), lambda o: torch.nanmean(x, 1, out=o)),
                           (lambda: torch.ops.aten.norm.ScalarOpt_dim(x, 1, [0]),
                            lambda o: torch.ops.aten.norm.out(x, 1, [0], out=o)),
                           (lambda: torch.ops.aten.norm.Scalar(x, 3), lambda o: torch.ops.aten.norm.Scalar_out(x, 3, out=o))):
            out = torch.empty(0)
            assert out_fn(out) is out
            assert_bitwise_equal(out, fn())
    assert {"logsumexp.out", "var.correction_out", "std.correction_out", "linalg_vector_norm.out", "nansum.out",
            "nanmean.out", "norm.out", "norm.Scalar_out"} <= set(bi.routed())


def test_gradients_are_torchs_and_values_do_not_depend_on_requires_grad() -> None:
    """A trainer (requires_grad) and a sampler (no grad) see the same forward bits; the
    gradients are torch's formulas."""
    x = _rows((5, 300), torch.float32, 4)
    for name in ("logsumexp", "var", "std_mean_2d", "norm2", "norm_2.5", "normalize", "nansum", "nanmean_2d",
                 "logsigmoid"):
        fn = OPS[name][0]
        xi = _input(name, 5, 300, torch.float32, 4) if name.endswith("_2d") else x
        leaf = xi.clone().requires_grad_(True)
        with detkit.batch_invariant(strict=True):
            frozen = fn(xi)
            trained = fn(leaf)
            first = trained[0] if isinstance(trained, tuple) else trained
            (grad,) = torch.autograd.grad(first.sum(), leaf)
        assert_bitwise_equal(tuple(t.detach() for t in (trained if isinstance(trained, tuple) else (trained,))),
                             frozen if isinstance(frozen, tuple) else (frozen,), name=name)
        ref = xi.clone().requires_grad_(True)
        want = fn(ref)
        (want_grad,) = torch.autograd.grad((want[0] if isinstance(want, tuple) else want).sum(), ref)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_coverage_report_lists_them_as_routed() -> None:
    x = torch.randn(3, 16)
    _, ops = mode.trace_ops(lambda: (torch.logsumexp(x, -1), x.var(-1), torch.std_mean(x, -1), F.normalize(x, dim=-1)))
    for portable in (False, True):
        report = mode.coverage_report(ops, portable=portable)
        assert {"logsumexp.default", "var.correction", "std_mean.correction", "linalg_vector_norm.default"} <= set(
            report.routed), str(report)
        assert report.uncovered == {} and report.not_portable == {}, str(report)
    _, ops64 = mode.trace_ops(lambda: torch.logsumexp(x.double(), -1))
    assert "logsumexp.default" in mode.coverage_report(ops64, portable=True).uncovered
    assert "logsumexp.default" in mode.coverage_report(ops64).routed


# ----------------------------------------------------------------------------- losses

LOSS_CALLS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy mean": lambda x, t, w: F.cross_entropy(x, t),
    "cross_entropy sum, weights": lambda x, t, w: F.cross_entropy(x, t, weight=w, reduction="sum"),
    "cross_entropy mean, weights, ignore_index": lambda x, t, w: F.cross_entropy(x, t.masked_fill(t < 0, 3), weight=w,
                                                                                  ignore_index=3),
    "cross_entropy label smoothing": lambda x, t, w: F.cross_entropy(x, t, label_smoothing=0.1),
    "nll_loss none, weights": lambda x, t, w: F.nll_loss(x, t, weight=w, reduction="none"),
    "nll_loss of one sample": lambda x, t, w: F.nll_loss(x[0], t[0], reduction="none"),
    "nll_loss mean, all ignored": lambda x, t, w: F.nll_loss(x, torch.full_like(t, -100)),
}


def _loss_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(21)
    x = _rows((40, 33), dtype, 20)
    t = torch.from_numpy(rng.integers(0, 33, 40))
    t[::7] = -100  # F.cross_entropy's default ignore_index: padding labels
    return x, t, torch.from_numpy(rng.random(33)).to(dtype)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("call", sorted(LOSS_CALLS))
def test_losses_are_routed_and_give_torchs_values(call: str, dtype: torch.dtype, portable: bool) -> None:
    """F.nll_loss / F.cross_entropy reach nll_loss_forward: per-token losses are torch's
    bits (one exact product each), sums and means torch's values within rounding."""
    x, t, w = _loss_inputs(dtype)
    want = LOSS_CALLS[call](x, t, w)
    with detkit.batch_invariant(portable=portable, strict=True) as bi:
        got = LOSS_CALLS[call](x, t, w)
    assert "nll_loss_forward" in bi.routed() and bi.uncovered() == {} and bi.not_portable() == {}
    assert got.shape == want.shape and got.dtype == want.dtype
    if "none" in call:
        assert_bitwise_equal(got, want, name=call)
    else:
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_mean_loss_is_the_canonical_sum_over_the_canonical_weight(dtype: torch.dtype, portable: bool) -> None:
    """The mean of weighted token losses is the canonical sum of the exact products over
    the canonical sum of the weights (16-bit in float32, rounded once): the same bits on
    every thread count, instruction set and device (tests/test_portable_isa.py)."""
    x, t, w = _loss_inputs(dtype)
    kept = t != -100
    safe = t.masked_fill(~kept, 0)
    ww = w.float()[safe].masked_fill(~kept, 0)
    loss = torch.where(kept, -(x.float().gather(1, safe[:, None])[:, 0] * ww), 0.0)
    want = kn.sum(loss, portable=portable) / kn.sum(ww, portable=portable)
    with detkit.batch_invariant(portable=portable, strict=True):
        got = F.nll_loss(x, t, weight=w)
    assert_bitwise_equal(got, want.to(dtype), name=f"mean loss {dtype}")


def test_loss_gradients_are_torchs_and_bad_targets_keep_torchs_error() -> None:
    x, t, w = _loss_inputs(torch.float32)
    leaf, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with detkit.batch_invariant(strict=True):
        loss = F.cross_entropy(leaf, t, weight=w)
        (grad,) = torch.autograd.grad(loss, leaf)
        with torch.no_grad():
            frozen = F.cross_entropy(x, t, weight=w)
        bad = t.clone()
        bad[1] = 33
        with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
            F.cross_entropy(x, bad)
    assert_bitwise_equal(loss.detach(), frozen, name="loss with and without autograd")
    (want,) = torch.autograd.grad(F.cross_entropy(ref, t, weight=w), ref)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


# Losses built from routed pieces rather than a loss kernel: a reward model's or a
# multi-label head's BCE (torch computes it from log_sigmoid), a distillation or RL KL term
# (F.kl_div: xlogy), a DPO loss (-logsigmoid of a margin).
COMPOSED_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bce_with_logits none": lambda x, y: F.binary_cross_entropy_with_logits(x, y.sigmoid(), reduction="none"),
    "bce_with_logits mean, pos_weight": lambda x, y: F.binary_cross_entropy_with_logits(
        x, y.sigmoid(), pos_weight=y[0].abs()),
    "kl_div batchmean": lambda x, y: F.kl_div(x.log_softmax(-1), y.softmax(-1), reduction="batchmean"),
    "kl_div none, log_target": lambda x, y: F.kl_div(x.log_softmax(-1), y.log_softmax(-1), reduction="none",
                                                     log_target=True),
    "dpo": lambda x, y: -F.logsigmoid(0.1 * (x.sum(-1) - y.sum(-1))).mean(),
}


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("call", sorted(COMPOSED_LOSSES))
def test_composed_losses_are_routed_batch_invariant_and_torchs_values(call: str, dtype: torch.dtype,
                                                                      portable: bool) -> None:
    """Nothing left to torch's math library or reduction order (strict, nothing not
    portable, the trace's report lists nothing uncovered); a row's elementwise loss has
    the same bits alone as in the batch; values within rounding of torch's."""
    x, y = _rows((24, 37), dtype, 60), _rows((24, 37), dtype, 61)
    fn = COMPOSED_LOSSES[call]
    want = fn(x, y)
    with detkit.batch_invariant(portable=portable, strict=True) as bi:
        got = fn(x, y)
        if "none" in call:
            assert_batch_invariant(lambda a, b: fn(a, b), (x, y), [1, 2, 5, 24], positions="all", name=call)
    assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
    report = mode.coverage_report(mode.trace_ops(fn, x, y)[1], portable=portable)
    assert report.uncovered == {} and report.not_portable == {}, str(report)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_xlogy_keeps_torchs_zeros_and_nans() -> None:
    """0 * log(y) is 0 for every y but NaN (log(0) = -inf, log of a negative NaN, y = inf),
    as torch's xlogy; integer operands compute in the default dtype; in place too."""
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -2.0, math.nan, 3.0])
    y = torch.tensor([0.0, math.nan, -1.0, math.inf, 0.0, 2.0, 1.0, -1.0])
    with detkit.batch_invariant(strict=True) as bi:
        got = torch.xlogy(x, y)
        ints = torch.xlogy(torch.tensor([0, 2]), torch.tensor([0, 3]))
        inplace = x.clone().xlogy_(y)
    want = torch.xlogy(x, y)
    assert got.isnan().tolist() == want.isnan().tolist() and inplace.isnan().tolist() == want.isnan().tolist()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=0, atol=0)
    torch.testing.assert_close(ints, torch.xlogy(torch.tensor([0, 2]), torch.tensor([0, 3])))
    assert bi.routed() == {"xlogy.Tensor": 2, "xlogy_.Tensor": 1, "log": 3}


@given(seed=st.integers(0, 2**16), divisor=st.sampled_from([3.0, 4094.0, 0.1, 7e-3, 2.0**-10, 0.0, -5.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_division_by_a_number_is_one_ieee_division(seed: int, divisor: float, dtype: torch.dtype) -> None:
    """var's and the grid sampler's division by a number (detkit._ieee.divided): the
    quotient rounded once (numpy's IEEE division in the dtype), as torch's CPU kernel gives
    it and its CUDA kernel would not (it multiplies by the rounded reciprocal: the negative
    control shows that product is another value)."""
    from detkit._ieee import divided

    a = torch.from_numpy(np.random.default_rng(seed).standard_normal(4096) * 1e3).to(dtype)
    got = divided(a, divisor)
    b = np.array(divisor, dtype=a.numpy().dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = torch.from_numpy(a.numpy() / b)
    assert (host_bits(got) == host_bits(want)).all()
    if divisor in (4094.0, 0.1):
        assert (a * (1 / torch.tensor(divisor, dtype=dtype)) != got).any()


def _tree_product(values: np.ndarray) -> np.generic:
    """The documented pairwise tree of a 1-D array, one numpy scalar product at a time:
    adjacent pairs multiplied, an odd last element carried up, until one remains."""
    level = list(values)
    if not level:
        return values.dtype.type(1)
    while len(level) > 1:
        level = [level[i] * level[i + 1] for i in range(0, len(level) - 1, 2)] + (level[-1:] if len(level) % 2 else [])
    return level[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@given(rows=st.integers(1, 4), length=st.integers(1, 40), seed=st.integers(0, 2**16), specials=st.booleans(),
       keepdim=st.booleans(), along_rows=st.booleans())
def test_prod_is_routed_and_is_the_documented_tree(dtype: torch.dtype, rows: int, length: int, seed: int,
                                                   specials: bool, keepdim: bool, along_rows: bool) -> None:
    """torch.prod of floats over a dim and over everything (LFM2-VL's SigLIP2 multiplies its
    patch grid's sides as floats): one routed call each, whose bits are the pairwise tree's
    (numpy scalars in float32, or float64; rounded once to the dtype, NaN canonical)."""
    g = np.random.default_rng(seed)
    values = 1 + g.standard_normal((rows, length)) * 0.2
    if specials:
        values.flat[g.integers(0, values.size, 3)] = [math.nan, math.inf, 0.0]
    x = torch.from_numpy(values).to(dtype)
    x = x.t().contiguous().t() if along_rows else x  # the reduced dim strided
    with mode.batch_invariant(strict=True) as bi:
        got_dim = torch.prod(x, -1, keepdim=keepdim)
        got_all = torch.prod(x)
    assert bi.routed() == {"prod.dim_int": 1, "prod.default": 1}, bi.coverage()
    work = np.float64 if dtype == torch.float64 else np.float32
    wide = x.to(torch.float64 if dtype == torch.float64 else torch.float32).numpy().astype(work)
    with np.errstate(invalid="ignore", over="ignore"):
        want_dim = torch.from_numpy(np.array([_tree_product(r) for r in wide], dtype=work)).to(dtype)
        want_all = torch.from_numpy(np.array(_tree_product(wide.reshape(-1)), dtype=work)).to(dtype)
    want_dim = want_dim.masked_fill(want_dim.isnan(), math.nan)
    want_all = want_all.masked_fill(want_all.isnan(), math.nan)
    assert (host_bits(got_dim) == host_bits(want_dim[:, None] if keepdim else want_dim)).all(), (got_dim, want_dim)
    assert (host_bits(got_all) == host_bits(want_all)).all(), (got_all, want_all)


def test_prod_rows_do_not_depend_on_the_batch_or_the_thread_count() -> None:
    """Rows of 4097 factors near 1: each row's product is the same bits alone and in any
    batch, and the product of everything the same on 1 and 2 threads, in both modes.
    Negative control: torch's own product of everything changes with the thread count
    (measured with torch 2.13 on this EPYC)."""
    x = torch.from_numpy(1 + np.random.default_rng(3).standard_normal((16, 4097)) * 0.01).float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        plain_two = torch.prod(x)
        routed_two = {}
        for portable in (False, True):
            with mode.batch_invariant(portable=portable, strict=True):
                assert_batch_invariant(lambda t: torch.prod(t, -1), x, [1, 2, 3, 5, 16], positions="all")
                routed_two[portable] = torch.prod(x)
        torch.set_num_threads(1)
        plain_one = torch.prod(x)
        for portable in (False, True):
            with mode.batch_invariant(portable=portable, strict=True):
                assert torch.equal(torch.prod(x), routed_two[portable])
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(plain_one, plain_two), "negative control: torch's prod did not change with the threads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@given(rows=st.integers(1, 4), length=st.integers(1, 60), seed=st.integers(0, 2**16), specials=st.booleans(),
       along_rows=st.booleans(), inplace=st.booleans())
def test_cumprod_is_routed_and_is_torchs_cpu_running_product(dtype: torch.dtype, rows: int, length: int, seed: int,
                                                             specials: bool, along_rows: bool, inplace: bool) -> None:
    """torch.cumprod of floats (and its in-place form): one routed call whose bits are the
    running product from the first element, each step one rounded product in float64 for
    float32/float64 and float32 for 16-bit inputs (numpy scalars here), each prefix rounded
    once; that is torch's own CPU result, a NaN aside (canonical here). On CUDA torch scans
    in float32 in another order; routed, these are the bits there too."""
    g = np.random.default_rng(seed)
    values = 1 + g.standard_normal((rows, length)) * 0.2
    if specials:
        values.flat[g.integers(0, values.size, 3)] = [math.nan, math.inf, 0.0]
    x = torch.from_numpy(values).to(dtype)
    dim = 0 if along_rows else -1
    x = x.t().contiguous() if along_rows else x
    with mode.batch_invariant(strict=True) as bi:
        got = x.clone().cumprod_(dim) if inplace else torch.cumprod(x, dim)
    assert sum(bi.routed().values()) == 1, bi.coverage()
    acc = np.float64 if dtype in (torch.float32, torch.float64) else np.float32
    series = x.t() if along_rows else x
    want = np.empty(series.shape, dtype=acc)
    with np.errstate(invalid="ignore", over="ignore"):
        for r, row in enumerate(series.to(torch.float64).numpy().astype(acc)):
            running = acc(1)
            for i, v in enumerate(row):
                running = running * v if i else v
                want[r, i] = running
    want_t = torch.from_numpy(want).to(dtype)
    want_t = (want_t.t() if along_rows else want_t).masked_fill(
        (want_t.t() if along_rows else want_t).isnan(), math.nan)
    assert (host_bits(got) == host_bits(want_t)).all(), (got, want_t)
    plain = torch.cumprod(x, dim)
    assert torch.equal(got.isnan(), plain.isnan())
    assert (host_bits(got)[~got.isnan().numpy()] == host_bits(plain)[~plain.isnan().numpy()]).all()


def test_cumprod_rows_do_not_depend_on_the_batch() -> None:
    """A discount or survival schedule per row (products of 1,000 factors near 1): each
    row's running product is the same bits alone and in any batch, at any position, in
    both modes."""
    x = torch.from_numpy(1 - np.random.default_rng(4).random((8, 1000)) * 0.01).float()
    for portable in (False, True):
        with mode.batch_invariant(portable=portable, strict=True):
            assert_batch_invariant(lambda t: torch.cumprod(t, -1), x, [1, 2, 3, 8], positions="all")


@given(rows=st.integers(1, 3), length=st.integers(1, 80), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]), dim=st.sampled_from([0, 1]))
def test_the_stepwise_running_product_is_numpys_accumulate(rows: int, length: int, seed: int, dtype: torch.dtype,
                                                           dim: int) -> None:
    """cumprod on the CPU takes numpy's multiply.accumulate; on other devices one torch mul
    per step. Both are the same sequence of rounded products: the same bits, NaN, inf and
    0 among the factors."""
    from detkit._aten_adapters import running_product, running_product_stepwise

    g = np.random.default_rng(seed)
    values = 1 + g.standard_normal((rows, length)) * 0.3
    values.flat[g.integers(0, values.size, 2)] = [math.nan, 0.0]
    x = torch.from_numpy(values).to(dtype)
    x = x if dim == 1 else x.t().contiguous()
    assert (host_bits(running_product(x, dim)) == host_bits(running_product_stepwise(x, dim))).all()
