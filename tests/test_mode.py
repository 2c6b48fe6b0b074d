"""The torch mode: routing, restore/nesting, re-entrancy, fallback accounting, invariance."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import detkit
from detkit import _aten_adapters, mode
from detkit.compare import diff
from detkit.errors import BackendUnavailable, InputError, InvarianceViolation


pytestmark = pytest.mark.usefixtures("mode_left_off")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(diff(a, b).ok)


class _StubKernels(SimpleNamespace):
    """Kernels that record their calls and compute with torch (reached re-entrantly)."""

    def __init__(self, reject: bool = False) -> None:
        super().__init__(calls=[], reject=reject)

    def _rec(self, name: str) -> None:
        self.calls.append(name)
        if self.reject:
            raise InputError(f"stub rejects {name}")

    def matmul(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *, portable: bool = False) -> torch.Tensor:
        self._rec("matmul")
        out = torch.matmul(a, b)  # an overridden op, called from inside a kernel
        return out if bias is None else out + bias

    def softmax(self, x: torch.Tensor, dim: int = -1, *, portable: bool = False) -> torch.Tensor:
        self._rec("softmax")
        return torch.softmax(x, dim)

    def log_softmax(self, x: torch.Tensor, dim: int = -1, *, portable: bool = False) -> torch.Tensor:
        self._rec("log_softmax")
        return torch.log_softmax(x, dim)

    def sum(self, x: torch.Tensor, dim: int = -1, keepdim: bool = False, *, portable: bool = False) -> torch.Tensor:
        self._rec("sum")
        return x.sum(dim, keepdim=keepdim)

    def mean(self, x: torch.Tensor, dim: int = -1, keepdim: bool = False, *, portable: bool = False) -> torch.Tensor:
        self._rec("mean")
        return x.mean(dim, keepdim=keepdim)

    def layer_norm(self, x: torch.Tensor, w: Any = None, b: Any = None, eps: float = 1e-5, *, portable: bool = False) -> torch.Tensor:
        self._rec("layer_norm")
        return F.layer_norm(x, x.shape[-1:], w, b, eps)

    def rms_norm(self, x: torch.Tensor, w: Any = None, eps: Any = None, *, portable: bool = False) -> torch.Tensor:
        self._rec("rms_norm")
        return F.rms_norm(x, x.shape[-1:], w, eps)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        self._rec("attention")
        kw.pop("portable")
        return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> _StubKernels:
    kernels = _StubKernels()
    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: kernels)
    return kernels


def _model_like_ops(x: torch.Tensor) -> list[torch.Tensor]:
    w = torch.randn(24, x.shape[-1], generator=torch.Generator().manual_seed(1))
    b = torch.randn(24, generator=torch.Generator().manual_seed(2))
    q = x.reshape(2, 2, -1, 8)
    return [
        F.linear(x, w),
        F.linear(x, w, b),
        torch.matmul(x.reshape(2, -1, 8), x.reshape(2, 8, -1)),
        F.softmax(x, -1),
        F.softmax(x, 0),
        F.log_softmax(x, -1),
        x.mean(-1),
        x.sum((0, 1)),
        F.layer_norm(x, x.shape[-1:]),
        F.rms_norm(x, x.shape[-1:]),
        F.scaled_dot_product_attention(q, q, q, is_causal=True),
        F.silu(x),
    ]


def test_ops_are_routed_and_results_match_torch(stub: _StubKernels) -> None:
    x = torch.randn(4, 16)
    expected = _model_like_ops(x)
    with detkit.batch_invariant() as bi:
        got = _model_like_ops(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    assert {"matmul", "softmax", "log_softmax", "mean", "sum", "layer_norm", "rms_norm", "attention"} <= set(stub.calls)
    routed = bi.routed()
    for op in ("mm", "addmm", "bmm", "_softmax", "_log_softmax", "mean.dim", "sum.dim_IntList", "layer_norm",
               "rms_norm", "scaled_dot_product_attention", "silu"):
        assert routed.get(op, 0) >= 1, (op, routed)
    assert bi.uncovered() == {}


def test_reentrant_kernels_do_not_recurse(stub: _StubKernels) -> None:
    # The stub matmul calls torch.matmul (an overridden op): it must reach torch's kernel.
    with detkit.batch_invariant() as bi:
        torch.mm(torch.randn(3, 4), torch.randn(4, 5))
    assert stub.calls == ["matmul"]
    assert bi.routed() == {"mm": 1}


def test_exit_restores_torch_kernels_bitwise() -> None:
    a, b = torch.randn(37, 300), torch.randn(300, 129)
    before = torch.mm(a, b)
    with detkit.batch_invariant():
        inside = torch.mm(a, b)
    after = torch.mm(a, b)
    assert _bits_equal(after, before)
    torch.testing.assert_close(inside, before)
    # The composite op has no CPU kernel of its own again.
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "CPU")
    start = mode.counters().routed.get("mm", 0)
    torch.mm(a, b)
    assert mode.counters().routed.get("mm", 0) == start


def test_nesting_restores_the_exact_outer_state(stub: _StubKernels) -> None:
    assert mode.state() == mode.ModeState()
    with detkit.batch_invariant():
        assert mode.state() == mode.ModeState(True, False, False)
        with detkit.batch_invariant(strict=True):
            assert mode.state() == mode.ModeState(True, False, True)
            mode.disable()  # an inner disable must not outlive its block
            assert not mode.is_enabled()
            with detkit.batch_invariant():
                mode.enable(strict=True)
            assert not mode.is_enabled()
        assert mode.state() == mode.ModeState(True, False, False)
        torch.mm(torch.randn(2, 3), torch.randn(3, 2))
        assert stub.calls[-1] == "matmul"
    assert mode.state() == mode.ModeState()


def test_portable_flag_reaches_the_kernels_and_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def matmul(a: torch.Tensor, b: torch.Tensor, bias: Any = None, *, portable: bool = False) -> torch.Tensor:
        seen.append(portable)
        return torch.mm(a, b)

    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: SimpleNamespace(matmul=matmul))
    a, b = torch.randn(2, 3), torch.randn(3, 2)
    with detkit.batch_invariant():
        torch.mm(a, b)
        with detkit.batch_invariant(portable=True):
            torch.mm(a, b)
        torch.mm(a, b)
    assert seen == [False, True, False]


def test_restores_on_exception(stub: _StubKernels) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with detkit.batch_invariant():
            with detkit.batch_invariant(portable=True):
                raise RuntimeError("boom")
    assert mode.state() == mode.ModeState()
    n = len(stub.calls)
    torch.mm(torch.randn(2, 3), torch.randn(3, 2))
    assert len(stub.calls) == n


def test_decorator_and_enable_disable(stub: _StubKernels) -> None:
    @detkit.batch_invariant()
    def f(depth: int) -> bool:
        if depth:
            f(depth - 1)  # the same instance re-entered (recursion)
        return mode.is_enabled()

    assert f(2) and not mode.is_enabled()
    mode.enable()
    try:
        assert mode.is_enabled()
        torch.mm(torch.randn(2, 3), torch.randn(3, 2))
        assert stub.calls == ["matmul"]
    finally:
        mode.disable()
    assert not mode.is_enabled()


def test_fallbacks_are_counted_and_strict_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = _StubKernels(reject=True)
    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: kernels)
    a, b = torch.randn(2, 3), torch.randn(3, 2)
    with detkit.batch_invariant() as bi:
        out = torch.mm(a, b)
        torch.arange(10).sum()  # integer sum: exact, passed through
    assert _bits_equal(out, torch.mm(a, b))  # torch's kernel ran, visibly
    assert list(bi.uncovered()) == ["mm"]
    assert "stub rejects matmul" in next(iter(bi.uncovered()["mm"]))
    assert "sum.default" in bi.coverage().passed_through
    assert "mm" in str(bi.coverage())
    with pytest.raises(InvarianceViolation, match="aten::mm"):
        with detkit.batch_invariant(strict=True):
            torch.mm(a, b)
    assert not mode.is_enabled()


def test_autograd_still_works_through_the_mode() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(F.linear(x, w), (16,))
        q = h.reshape(3, 5, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()

    f(x).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with detkit.batch_invariant() as bi:
        loss = f(x)
        loss.backward()
        with torch.no_grad():
            no_grad_loss = f(x)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw)
    assert _bits_equal(loss.detach(), no_grad_loss)  # forward routed alike with and without grad
    assert bi.coverage().decomposed.get("rms_norm", 0) >= 1
    assert bi.uncovered() == {}


def test_fused_rms_norm_gives_the_same_bits_with_and_without_requires_grad() -> None:
    # The autograd gate returned a composite's tuple result (_fused_rms_norm's output, rstd)
    # straight from torch's decomposition when a gradient was needed: its output differed
    # from the no-grad (routed) one by up to 1e-6. Now the output is routed, the gradient
    # torch's.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=g), torch.randn(64, generator=g)
    trainable = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.ops.aten._fused_rms_norm(x, [64], trainable, None)[0].square().sum(), trainable)
    with detkit.batch_invariant() as bi:
        frozen = torch.ops.aten._fused_rms_norm(x, [64], w, None)[0]
        out, _ = torch.ops.aten._fused_rms_norm(x, [64], trainable, None)
        (got,) = torch.autograd.grad(out.square().sum(), trainable)
    assert _bits_equal(out.detach(), frozen)
    torch.testing.assert_close(got, want)
    assert bi.coverage().decomposed == {"_fused_rms_norm": 1}


def test_attention_dropout_under_autograd_takes_one_mask_for_values_and_gradient() -> None:
    # With a gradient needed, the SDPA gate ran torch's decomposition (one dropout mask, the
    # gradient's) and then the routed call, which fell back to torch's kernel (a second
    # mask, the values'): the output was not the function whose gradient came back, and the
    # generator advanced twice. Now the fallback is torch's decomposition alone.
    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        q = torch.randn(1, 2, 6, 8, requires_grad=True)
        out = F.scaled_dot_product_attention(q, q.detach(), q.detach(), dropout_p=0.5)
        (grad,) = torch.autograd.grad(out, q, torch.ones_like(out))
        return out.detach(), grad, torch.rand(4)

    want = run()
    with detkit.batch_invariant() as bi:
        got = run()
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)  # the leaves (bmm, softmax) are routed: rounding only
    assert bi.uncovered() == {"scaled_dot_product_attention": {"dropout_p > 0": 1}}
    with detkit.batch_invariant(strict=True), pytest.raises(InvarianceViolation, match="dropout_p"):
        run()


def test_a_negative_dropout_is_refused_as_torch_refuses_it() -> None:
    # it ran as dropout_p = 0 under the mode only: code that passed there failed without it
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError) as plain:
        F.scaled_dot_product_attention(q, q, q, dropout_p=-0.1)
    with detkit.batch_invariant(strict=True) as bi, pytest.raises(RuntimeError) as under:
        F.scaled_dot_product_attention(q, q, q, dropout_p=-0.1)
    assert str(under.value) == str(plain.value)
    assert bi.uncovered() == {}


def test_mode_applies_to_other_threads_while_on(stub: _StubKernels) -> None:
    def work() -> None:
        torch.mm(torch.randn(2, 3), torch.randn(3, 2))

    with detkit.batch_invariant():
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert stub.calls == ["matmul"]


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        detkit.batch_invariant(portable="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mode.ModeState(False, True, False)


# ----------------------------------------------------------------------------- real kernels


def _rowwise_invariant(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sizes: list[int]) -> None:
    """Row r of op(x[:b]) must equal op(x[r:r+1]) bitwise for every b and r < b."""
    alone = [op(x[r : r + 1]) for r in range(max(sizes))]
    for b in sizes:
        out = op(x[:b])
        for r in range(b):
            d = diff(out[r : r + 1], alone[r])
            assert d.ok, f"batch {b}, row {r}:\n{d}"


@given(
    m=st.integers(1, 24),
    k=st.integers(1, 300),
    n=st.integers(1, 80),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_is_batch_invariant_under_the_mode(m: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    with detkit.batch_invariant():
        _rowwise_invariant(lambda t: F.linear(t, w, b), x, sorted({1, (m + 1) // 2, m}))


_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "last position": lambda x: x[:, -1:],  # HF generate's logits_to_keep=1
    "middle": lambda x: x[:, 1:-1] if x.shape[1] > 2 else x[:, :1],
    "every other": lambda x: x[:, ::2],
    "one row of one entry": lambda x: x[-1:, :1],  # (1, 1, K): is_contiguous() yet not folded by torch
    "transposed batch": lambda x: x.transpose(0, 1),
    "whole": lambda x: x,
}
_PRODUCTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "F.linear": lambda x, w, b: F.linear(x, w, b),
    "x @ w.T": lambda x, w, b: x @ w.t() if b is None else x @ w.t() + b,
    "torch.matmul": lambda x, w, b: torch.matmul(x, w.t()) if b is None else torch.matmul(x, w.t()) + b,
}


@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 9),
    k=st.integers(1, 70),
    n=st.integers(1, 40),
    view=st.sampled_from(sorted(_VIEWS)),
    product=st.sampled_from(sorted(_PRODUCTS)),
    frozen=st.booleans(),
    bias=st.booleans(),
    grad_mode=st.sampled_from(["grad", "no_grad", "inference_mode"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    portable=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_weight_product_gives_each_row_the_2d_bits_whatever_the_input_layout(
    batch: int, length: int, k: int, n: int, view: str, product: str, frozen: bool, bias: bool, grad_mode: str,
    dtype: torch.dtype, portable: bool, seed: int,
) -> None:
    """torch runs bmm against the broadcast weight for a non-foldable 3-D input whose
    weight needs no gradient, mm/addmm otherwise; under the mode a row's bits must not
    depend on which (a frozen sampler's sliced lm_head vs the trainer's forward)."""
    g = torch.Generator().manual_seed(seed)
    x = _VIEWS[view](torch.randn(batch, length, k, generator=g).to(dtype))
    w = torch.randn(n, k, generator=g).to(dtype).requires_grad_(not frozen)
    b = torch.randn(n, generator=g).to(dtype).requires_grad_(not frozen) if bias else None
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
    with detkit.batch_invariant(portable=portable) as bi:
        with torch.no_grad():  # the reference: the same code on every row at once, 2-D and contiguous
            want = _PRODUCTS[product](x.reshape(-1, k).contiguous(), w, b).reshape(*x.shape[:-1], n)
        with ctx():
            got = _PRODUCTS[product](x, w, b)
    assert bi.uncovered() == {}
    assert diff(got.detach(), want).ok, f"{product} on a {view} view: a row's bits depend on the layout"


@pytest.mark.parametrize("view", ["last position", "every other", "transposed batch"])
def test_gradients_flow_through_the_folds(view: str) -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 7, 24, generator=g)
    w, b = torch.randn(10, 24, generator=g), torch.randn(10, generator=g)
    grads = []
    for on in (False, True):
        x, wg, bg = (t.clone().requires_grad_(True) for t in (base, w, b))
        with detkit.batch_invariant() if on else torch.enable_grad():
            y = F.linear(_VIEWS[view](x), wg, bg) + torch.matmul(_VIEWS[view](x), wg.t())
            (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        grads.append([t.grad for t in (x, wg, bg)])
    for plain, routed in zip(*grads):
        torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-4)


_BATCH_PRODUCTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "W @ X.mT (Mamba's dt_proj)": lambda w, x: w @ x.mT,
    "v @ X.mT": lambda w, x: w[0] @ x.mT,
    "X @ W[None].mT": lambda w, x: x @ w[None].mT,
    "X[:, ::2] @ W.T": lambda w, x: x[:, ::2] @ w.t(),
}


@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 8),
    k=st.integers(1, 300),
    n=st.integers(1, 24),
    product=st.sampled_from(sorted(_BATCH_PRODUCTS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_a_matrix_and_a_batch_give_the_same_bits_frozen_or_trainable(
    batch: int, length: int, k: int, n: int, product: str, dtype: torch.dtype, seed: int
) -> None:
    """torch folds these products into mm/mv only when an operand requires grad; a frozen
    sampler and a trainer must still get the same bits, and each batch entry its own."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(batch, length, k, generator=g).to(dtype)
    f = _BATCH_PRODUCTS[product]
    with detkit.batch_invariant() as bi:
        with torch.no_grad():
            frozen = f(w, x)
            trainable = f(w.clone().requires_grad_(True), x)
            entries = [f(w, x[i : i + 1]) for i in range(batch)]
        with torch.inference_mode():
            inference = f(w, x)
    assert bi.uncovered() == {}
    assert diff(trainable, frozen).ok and diff(inference, frozen).ok, f"{product}: bits depend on requires_grad"
    for i, entry in enumerate(entries):
        assert diff(entry, frozen[i : i + 1]).ok, f"{product}: batch entry {i} changed with the batch"


def test_without_the_folds_a_frozen_matrix_on_the_left_takes_bmm_and_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mode, "FOLDS", ())
    # K = 1024: bmm's fixed-order chain sums four chunks of 256 terms, which mm's BLAS
    # tiles do not reproduce (at K = 256, one chunk, MKL on an Intel Xeon gives its bits)
    g = torch.Generator().manual_seed(0)
    w, ts = torch.randn(512, 1024, generator=g), torch.randn(2, 12, 1024, generator=g)
    with detkit.batch_invariant() as bi, torch.no_grad():
        frozen = w @ ts.mT
        trainable = w.clone().requires_grad_(True) @ ts.mT
    assert bi.routed() == {"mm": 1, "bmm": 1} and not diff(frozen, trainable).ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_addmm_with_a_per_row_matrix_does_not_depend_on_the_row_count(dtype: torch.dtype) -> None:
    """Only a vector bias is fused into the kernel: a (1, N) ``self`` that is one row of a
    per-row matrix (decode) must get the bits of the same row among many (prefill)."""
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(*shape, generator=g).to(dtype) for shape in ((4, 1024), (1024, 256), (4, 256)))
    with detkit.batch_invariant():
        whole = torch.addmm(c, a, b)
        for i in range(4):
            assert diff(torch.addmm(c[i : i + 1], a[i : i + 1], b), whole[i : i + 1]).ok, f"row {i}"


def test_integer_input_of_a_float_function_is_routed_not_passed_as_exact() -> None:
    x = torch.randint(-20, 20, (33, 100), generator=torch.Generator().manual_seed(2))
    with detkit.batch_invariant() as bi:
        whole = torch.sigmoid(x)
        rows = [torch.sigmoid(x[i : i + 1]) for i in range(33)]
    assert whole.dtype == torch.float32
    assert bi.routed().get("sigmoid") == 34 and not bi.coverage().passed_through
    assert all(diff(r, whole[i : i + 1]).ok for i, r in enumerate(rows))


def _encoder_rows_invariant() -> bool:
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    x = torch.randn(8, 6, 64, generator=g)
    with detkit.batch_invariant(), torch.no_grad():
        full = layer(x)
        rows = [layer(x[i : i + 1]) for i in range(8)]
    with detkit.batch_invariant():  # with autograd torch never took the fused path
        graded = layer(x.requires_grad_(True)).detach()
    return all(diff(r, full[i : i + 1]).ok for i, r in enumerate(rows)) and diff(graded, full).ok


def test_torchs_fused_transformer_kernels_are_off_under_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """nn.TransformerEncoderLayer/MultiheadAttention in eval without grad run fused kernels
    that never reach the overridden ops; the mode turns that fast path off, and back on."""
    assert torch.backends.mha.get_fastpath_enabled()
    assert _encoder_rows_invariant()
    assert torch.backends.mha.get_fastpath_enabled(), "restored when the mode ends"
    with detkit.batch_invariant():
        assert not torch.backends.mha.get_fastpath_enabled() and mode.registered_keys()["mha_fastpath"]
    monkeypatch.setattr(mode._Registration, "_disable_mha_fastpath", lambda self: None)
    assert not _encoder_rows_invariant(), "negative control: the fused kernels change rows with the batch"


def test_without_the_folds_a_frozen_weights_sliced_product_takes_bmm_and_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control for the test above (float32: mm's BLAS tiles and bmm's fma chain
    over chunks of 256 terms round differently; K = 1024, since at K = 256 MKL on an
    Intel Xeon gives the one chunk's bits). Two positions, not one: torch >= 2.14 itself
    views a one-position slice as 2-D and runs mm."""
    monkeypatch.setattr(mode, "FOLDS", ())
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 40, 1024, generator=g), torch.randn(259, 1024, generator=g)
    with detkit.batch_invariant() as bi:
        full = F.linear(h, w)
        last = F.linear(h[:, -2:], w)
    assert bi.routed() == {"mm": 1, "bmm": 1}
    assert not diff(last, full[:, -2:]).ok


@given(
    rows=st.integers(1, 12),
    length=st.integers(1, 700),
    op=st.sampled_from(["silu", "sigmoid", "gelu_tanh", "softplus", "rsqrt", "pow", "elu", "exp2", "cosh", "atan2",
                        "pow_tensor", "pow_scalar_base", "expm1"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_position_dependent_elementwise_ops_are_invariant(rows: int, length: int, op: str, dtype: torch.dtype, seed: int) -> None:
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "silu": F.silu,
        "sigmoid": torch.sigmoid,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "softplus": F.softplus,
        "rsqrt": torch.rsqrt,
        "pow": lambda t: t.pow(1.7),
        "elu": F.elu,
        "exp2": torch.exp2,
        "cosh": lambda t: torch.cosh(t * 0.1),
        "atan2": lambda t: torch.atan2(t, t.flip(-1) - 1),  # row by row, as the check needs
        "pow_tensor": lambda t: torch.pow(t, t.flip(-1) * 0.3),
        "pow_scalar_base": lambda t: torch.pow(2.5, t * 0.1),
        "expm1": torch.expm1,  # Apertus' xIELU activation
    }
    x = (torch.randn(rows, length, generator=torch.Generator().manual_seed(seed)) * 3).abs().add(0.1).to(dtype)
    with detkit.batch_invariant():
        _rowwise_invariant(fns[op], x, sorted({1, (rows + 1) // 2, rows}))
        torch.testing.assert_close(fns[op](x[:, :5]), _outside(fns[op], x[:, :5]))


@pytest.mark.parametrize(("op", "dtype"), [(op, torch.float32) for op in ("elu", "exp2", "cosh", "atan2", "pow",
                                                                           "pow_scalar_base", "logaddexp", "logaddexp2",
                                                                           "logit", "atanh")]
                         + [(op, torch.bfloat16) for op in ("floor_divide", "div_floor", "div_trunc", "digamma")]
                         + [("softshrink", torch.float32), ("softshrink", torch.bfloat16)])
def test_ops_whose_scalar_tail_rounds_differently_are_position_independent_under_the_mode(
        op: str, dtype: torch.dtype) -> None:
    """torch's float32 elu (so selu and celu), exp2, cosh, atan2, logaddexp, logit, atanh
    and pow with a tensor exponent or a scalar base, and bfloat16 floor division and
    digamma, round the scalar tail of their vector loop differently: an element alone and
    in a tensor of 4,099 got other bits (176, 244, 840, 673, 88, 77, 393, 73 and 73
    elements; floor division 11, 11 and 24, digamma 29, measured with other inputs); so
    do float32 logaddexp2 (114) and softshrink's sign of zero (279, any dtype). Under the
    mode every element has the same bits both ways."""
    g = torch.Generator().manual_seed(11)
    x, y = (torch.randn(4099, generator=g) * 3).to(dtype), (torch.randn(4099, generator=g) * 3).to(dtype)
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "elu": lambda a, b: F.elu(a), "exp2": lambda a, b: torch.exp2(a), "cosh": lambda a, b: torch.cosh(a),
        "atan2": torch.atan2, "pow": lambda a, b: torch.pow(a.abs(), b),
        "pow_scalar_base": lambda a, b: torch.pow(2.5, a), "logaddexp": torch.logaddexp, "logaddexp2": torch.logaddexp2,
        "logit": lambda a, b: torch.logit(torch.sigmoid(a)), "floor_divide": torch.floor_divide,
        "atanh": lambda a, b: torch.atanh(torch.tanh(a) * 0.999), "digamma": lambda a, b: torch.digamma(a),
        "div_floor": lambda a, b: torch.div(a, b, rounding_mode="floor"),
        "div_trunc": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
        # the sign of zero: -0.0 from the scalar tail, +0.0 from the vector body (279 elements)
        "softshrink": lambda a, b: F.softshrink(a, 0.5),
    }
    fn = fns[op]
    view = torch.int32 if dtype == torch.float32 else torch.int16

    def changed() -> int:
        whole = fn(x, y)
        alone = torch.stack([fn(x[i : i + 1], y[i : i + 1])[0] for i in range(x.shape[0])])
        return int((whole.view(view) != alone.view(view)).sum())

    assert changed() > 0, f"negative control: torch's {op} was position independent here"
    with detkit.batch_invariant(strict=True) as bi:
        assert changed() == 0
    assert bi.uncovered() == {} and sum(bi.routed().values()) > 0, bi.coverage()


def _outside(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with detkit.batch_invariant():
        mode.disable()
        return fn(x)


@given(
    pad=st.integers(0, 40),
    keys=st.integers(1, 90),
    d=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_eager_attention_ignores_left_padding(pad: int, keys: int, d: int, dtype: torch.dtype, seed: int) -> None:
    """softmax(scores + mask) @ V over padded keys == the same without the padding, as
    eager attention computes it: a batched product (torch.matmul of 3-D or 4-D is bmm)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, keys, generator=g)
    v = torch.randn(keys, d, generator=g).to(dtype)
    masked = torch.cat([torch.full((3, pad), torch.finfo(torch.float32).min), scores], 1)
    v_padded = torch.cat([torch.randn(pad, d, generator=g).to(dtype), v], 0)
    with detkit.batch_invariant():
        p_alone, p_pad = F.softmax(scores, -1), F.softmax(masked, -1)
        assert diff(p_pad[:, pad:], p_alone).ok and bool((p_pad[:, :pad] == 0).all())
        alone = torch.matmul(p_alone.to(dtype)[None], v[None])[0]
        padded = torch.matmul(p_pad.to(dtype)[None, None], v_padded[None, None])[0, 0]
        batched = torch.bmm(torch.stack([p_pad, p_pad.roll(1, 0)]).to(dtype), torch.stack([v_padded, v_padded]))
    assert diff(padded, alone).ok
    assert diff(batched[0], alone).ok


def test_leading_zero_skip_keeps_ieee_nan() -> None:
    a = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    b = torch.tensor([[[float("inf"), 1.0], [2.0, 3.0]]])
    with detkit.batch_invariant():
        out = torch.bmm(a, b)[0]
    assert torch.isnan(out[0, 0]) and torch.isinf(out[1, 0])  # 0 * inf stays NaN


def test_leading_zero_skip_does_not_depend_on_other_batch_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a padded row skips its leading zeros is decided by its own batch entry:
    inf in another entry's b, or a longer padding in another row, once turned the skip
    off for every row, changing this row's bits with the batch (with a kernel that
    blocks K)."""
    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: _OrderSensitiveKernels())
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 2, 23, generator=g)
    a[0, 0, :5] = 0.0  # a padded row
    a[1, 0, :9] = 0.0  # a longer padding in the other entry, over a row of b holding inf
    b = torch.randn(2, 23, 3, generator=g)
    b[1, 7, 0] = float("inf")
    with detkit.batch_invariant():
        alone = torch.bmm(a[:1], b[:1])
        batched = torch.bmm(a, b)
    assert diff(batched[0], alone[0]).ok
    assert torch.isnan(batched[1, 0, 0])  # that row still keeps 0 * inf = NaN


@pytest.mark.parametrize(
    "call",
    [
        lambda: torch.addmm(torch.randn(5), torch.randn(3, 4).bfloat16(), torch.randn(4, 5).bfloat16()),
        lambda: torch.addmm(torch.randn(3, 5), torch.randn(3, 4).bfloat16(), torch.randn(4, 5).bfloat16(), beta=2),
        lambda: torch.baddbmm(torch.randn(2, 3, 5).double(), torch.randn(2, 3, 4), torch.randn(2, 4, 5)),
        lambda: F.scaled_dot_product_attention(*[torch.randn(1, 1, 3, 4)] * 3, attn_mask=torch.zeros(3, 3).double()),
        lambda: F.scaled_dot_product_attention(*[torch.randn(1, 1, 3, 4)] * 3, attn_mask=torch.zeros(3, 3).half()),
    ],
)
def test_arguments_torch_refuses_are_refused_under_the_mode(call: Callable[[], torch.Tensor]) -> None:
    """A self or an attn_mask of another dtype: torch raises, and so must the mode (it
    used to cast and return a result, so code that ran under the mode failed without it)."""
    with pytest.raises(RuntimeError, match="dtype"):
        call()
    with detkit.batch_invariant(), pytest.raises(RuntimeError, match="dtype"):
        call()


_R = torch.randn
REFUSED_SHAPES: dict[str, Callable[[], torch.Tensor]] = {
    "mm of a 3-D tensor": lambda: torch.mm(_R(2, 3, 4), _R(4, 2)),
    "mm of a vector": lambda: torch.mm(_R(4), _R(4, 2)),
    "mm with unequal K": lambda: torch.mm(_R(3, 4), _R(5, 2)),
    "bmm of matrices": lambda: torch.bmm(_R(3, 4), _R(4, 2)),
    "bmm of unequal batches": lambda: torch.bmm(_R(2, 3, 4), _R(1, 4, 2)),
    "mv of a 3-D tensor": lambda: torch.mv(_R(2, 3, 4), _R(4)),
    "mv of a matrix": lambda: torch.mv(_R(3, 4), _R(4, 1)),
    "dot of matrices": lambda: torch.dot(_R(3, 1), _R(3, 1)),
    "addmm with beta 0 and a 3-D self": lambda: torch.addmm(_R(4, 3, 2), _R(3, 4), _R(4, 2), beta=0),
    "baddbmm with beta 0 and a self of another batch": lambda: torch.baddbmm(_R(3, 3, 2), _R(2, 3, 4), _R(2, 4, 2),
                                                                              beta=0),
    "addmv with a matrix as vec": lambda: torch.addmv(_R(3), _R(3, 4), _R(4, 1)),
    "mm.out of a 3-D tensor": lambda: torch.mm(_R(2, 3, 4), _R(4, 2), out=torch.empty(0)),
    "solve_triangular of a non-square A": lambda: torch.linalg.solve_triangular(_R(4, 3), _R(4, 2), upper=False),
    "solve_triangular of a vector A": lambda: torch.linalg.solve_triangular(_R(4), _R(4, 2), upper=False),
    "solve_triangular of a vector B": lambda: torch.linalg.solve_triangular(_R(4, 4), _R(4), upper=True),
    "solve_triangular with unequal n": lambda: torch.linalg.solve_triangular(_R(4, 4), _R(3, 2), upper=False),
    "solve_triangular right with unequal n": lambda: torch.linalg.solve_triangular(_R(4, 4), _R(4, 3), upper=False,
                                                                                     left=False),
    "solve_triangular of batches that do not broadcast": lambda: torch.linalg.solve_triangular(_R(2, 4, 4), _R(3, 4, 2),
                                                                                                 upper=False),
    "solve_triangular.out of a non-square A": lambda: torch.linalg.solve_triangular(_R(4, 3), _R(4, 2), upper=False,
                                                                                      out=torch.empty(0)),
}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", sorted(REFUSED_SHAPES))
def test_product_shapes_torch_refuses_raise_torchs_error_under_the_mode(name: str, strict: bool) -> None:
    """The kernels broadcast as torch.matmul does, so mm of a 3-D tensor, bmm of unequal
    batches, mv of a 3-D tensor or a beta=0 addmm whose self does not expand returned a
    result under the mode, where torch raises (code that ran under the mode failed without
    it); dot of matrices raised an unrelated reshape error, and a K mismatch became an
    InvarianceViolation with strict=True. linalg_solve_triangular's shape errors (A not
    square, B's n not A's, batches that do not broadcast) were fallbacks in uncovered() and
    InvarianceViolations with strict=True. Now torch's own error, in every case."""
    call = REFUSED_SHAPES[name]
    with pytest.raises(RuntimeError) as want:
        call()
    with detkit.batch_invariant(strict=strict) as bi, pytest.raises(RuntimeError) as got:
        call()
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
    assert not bi.uncovered()


OUT_FORMS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    # name: (the out= call, the functional call)
    "mm": (lambda x, o: torch.mm(x, x.mT[:, :5], out=o), lambda x: torch.mm(x, x.mT[:, :5])),
    "addmm": (lambda x, o: torch.addmm(x[0, :5], x, x.mT[:, :5], out=o), lambda x: torch.addmm(x[0, :5], x, x.mT[:, :5])),
    "bmm": (lambda x, o: torch.bmm(x[None], x.mT[None], out=o), lambda x: torch.bmm(x[None], x.mT[None])),
    "mv": (lambda x, o: torch.mv(x, x[0], out=o), lambda x: torch.mv(x, x[0])),
    "sum": (lambda x, o: torch.sum(x, -1, out=o), lambda x: torch.sum(x, -1)),
    "mean": (lambda x, o: torch.mean(x, 0, keepdim=True, out=o), lambda x: torch.mean(x, 0, keepdim=True)),
    "softmax": (lambda x, o: torch.softmax(x, -1, out=o), lambda x: torch.softmax(x, -1)),
    "log_softmax": (lambda x, o: torch.log_softmax(x, -1, out=o), lambda x: torch.log_softmax(x, -1)),
    "silu": (lambda x, o: torch.ops.aten.silu.out(x, out=o), lambda x: F.silu(x)),
    "gelu": (lambda x, o: torch.ops.aten.gelu.out(x, approximate="tanh", out=o), lambda x: F.gelu(x, approximate="tanh")),
    "exp": (lambda x, o: torch.exp(x, out=o), lambda x: torch.exp(x)),
    "tanh": (lambda x, o: torch.tanh(x, out=o), lambda x: torch.tanh(x)),
    "pow": (lambda x, o: torch.pow(x, 3, out=o), lambda x: torch.pow(x, 3)),
}


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("name", sorted(OUT_FORMS))
def test_out_forms_are_routed_and_give_the_functional_bits(name: str, portable: bool) -> None:
    """``torch.mm(a, b, out=c)`` and the other out= overloads of routed ops give the
    functional form's bits (routed; they used to run torch's kernel without a trace in
    uncovered()), resized as torch resizes an empty out."""
    into, functional = OUT_FORMS[name]
    x = torch.randn(37, 19, generator=torch.Generator().manual_seed(3))
    with detkit.batch_invariant(portable=portable, strict=True) as bi:
        want = functional(x)
        out = torch.empty(0)
        got = into(x, out)
        assert bi.uncovered() == {}
    assert got is out and diff(out, want).ok, diff(out, want).summary()


def test_out_forms_keep_rows_batch_invariant() -> None:
    """A row of ``torch.mm(a, b, out=c)`` under the mode has the same bits at every M;
    with torch's kernels the same call changes (the negative control)."""
    a = torch.randn(64, 512, generator=torch.Generator().manual_seed(4))
    b = torch.randn(512, 96, generator=torch.Generator().manual_seed(5))

    def changed_rows() -> int:
        full = torch.mm(a, b, out=torch.empty(0))
        return sum(not torch.equal(torch.mm(a[:m], b, out=torch.empty(0)), full[:m]) for m in range(1, 65))

    with detkit.batch_invariant():
        assert changed_rows() == 0
    assert changed_rows() > 0


def test_an_out_of_another_dtype_is_left_to_torch_and_counted() -> None:
    """An out= whose dtype differs from the result's: torch's kernel decides (here it
    refuses), and uncovered() says so; strict mode refuses it up front."""
    x = torch.randn(4, 6)
    with detkit.batch_invariant() as bi:
        with pytest.raises(RuntimeError, match="dtype"):
            torch.mm(x, x.mT, out=torch.empty(0, dtype=torch.float64))
        assert "mm.out" in bi.uncovered()
        with pytest.warns(UserWarning, match="was resized"):  # torch's rule for a non-empty out of another shape
            torch.mm(x, x.mT, out=torch.zeros(2, 2))
    with detkit.batch_invariant(strict=True), pytest.raises(InvarianceViolation, match=r"aten::sum\.IntList_out"):
        torch.sum(x, -1, out=torch.empty(0, dtype=torch.float64))


def test_reductions_over_several_dims_and_dtype_args() -> None:
    x = torch.randn(4, 5, 6, dtype=torch.float32)
    with detkit.batch_invariant() as bi:
        got = [x.sum((0, 2)), x.mean((-1, -2), keepdim=True), x.sum(), x.mean(), x.bfloat16().sum(-1, dtype=torch.float32)]
    want = [x.sum((0, 2)), x.mean((-1, -2), keepdim=True), x.sum(), x.mean(), x.bfloat16().sum(-1, dtype=torch.float32)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert bi.uncovered() == {}
    assert bi.routed().get("sum.dim_IntList", 0) == 2


def test_cumsum_is_routed_in_every_form() -> None:
    """Float running sums (Mamba2's segment sums along dim -2 of masked blocks, its decay
    cumsum along -1) go to kernels.cumsum under the mode, in functional, in-place, out=
    and dtype= form; integer ones (position ids from a mask) are exact and stay torch's.
    The canonical order is torch's CPU one, so the CPU bits are torch's."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, 40, generator=gen) * 4
    keep = torch.ones(40, 40, dtype=torch.bool).tril(-1)
    with detkit.batch_invariant(strict=True) as bi:
        full = torch.cumsum(x, -1)
        segsum = x[..., None].expand(6, 3, 40, 40).masked_fill(~keep, 0.0).cumsum(-2)
        inplace = x.clone().cumsum_(1)
        out = torch.cumsum(x, 0, out=torch.empty(0))
        cast = x.bfloat16().cumsum(-1, dtype=torch.float32)
        ids = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]).cumsum(-1)
    assert bi.routed() == {"cumsum": 3, "cumsum_": 1, "cumsum.out": 1}
    assert bi.uncovered() == {} and bi.coverage().passed_through == {"cumsum": {"torch.int64 input": 1}}
    assert torch.equal(full, torch.cumsum(x, -1)) and torch.equal(full, detkit.kernels.cumsum(x, -1))
    blocks = x[..., None].expand(6, 3, 40, 40).masked_fill(~keep, 0.0)
    assert torch.equal(segsum, torch.cumsum(blocks, -2))
    assert torch.equal(inplace, detkit.kernels.cumsum(x, 1)) and torch.equal(out, detkit.kernels.cumsum(x, 0))
    assert torch.equal(cast, detkit.kernels.cumsum(x.bfloat16().float(), -1))
    assert ids.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]


def test_cumsum_refuses_bad_arguments_as_torch_does_even_when_strict() -> None:
    # An out-of-range dim (the kernel's InputError) and an in-place dtype= of another dtype
    # were counted as fallbacks, so strict=True raised InvarianceViolation where torch
    # raises its own IndexError / RuntimeError, and uncovered() listed calls that fail.
    x = torch.randn(4, 6)
    calls = [(lambda: x.cumsum(2), IndexError), (lambda: x.cumsum(-3), IndexError),
             (lambda: torch.tensor(2.0).cumsum(1), IndexError),
             (lambda: torch.cumsum(x, 5, out=torch.empty(0)), IndexError),
             (lambda: x.clone().cumsum_(2), IndexError),
             (lambda: x.clone().cumsum_(0, dtype=torch.float64), RuntimeError)]
    for call, error in calls:
        with pytest.raises(error):
            call()
        with detkit.batch_invariant(strict=True) as bi, pytest.raises(error):
            call()
        assert bi.uncovered() == {}, bi.uncovered()


def test_linalg_solve_triangular_is_routed_with_torchs_layout() -> None:
    """Qwen3-Next's UT transform: a unit lower-triangular solve per (batch, head, chunk).
    Under the mode every variant is kernels.solve_triangular (within a few ULP of torch's
    LAPACK), laid out as torch lays it out (each matrix column major); 16-bit operands,
    which torch has no kernel for, keep torch's error and are counted."""
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(2, 3, 16, 16, generator=gen) * 0.3 + 2.0 * torch.eye(16)
    b = torch.randn(2, 3, 16, 8, generator=gen)
    with detkit.batch_invariant(strict=True) as bi:
        got = {(upper, left, unit): torch.linalg.solve_triangular(a, b if left else b.mT, upper=upper, left=left,
                                                                  unitriangular=unit)
               for upper in (False, True) for left in (True, False) for unit in (False, True)}
        out = torch.linalg.solve_triangular(a, b, upper=False, out=torch.empty(0))
    assert bi.routed() == {"linalg_solve_triangular": 8, "linalg_solve_triangular.out": 1}
    for (upper, left, unit), x in got.items():
        bb = b if left else b.mT
        want = torch.linalg.solve_triangular(a, bb, upper=upper, left=left, unitriangular=unit)
        assert x.shape == want.shape and x.stride() == want.stride(), (upper, left, unit)
        assert torch.equal(x, detkit.kernels.solve_triangular(a, bb, upper=upper, left=left, unitriangular=unit))
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out, got[(False, True, False)])
    # torch has no 16-bit kernel: its error stands, under strict=True too (nothing computed)
    with detkit.batch_invariant(strict=True) as bi, pytest.raises(NotImplementedError, match="BFloat16"):
        torch.linalg.solve_triangular(a.bfloat16(), b.bfloat16(), upper=False)
    assert bi.uncovered() == {} and "linalg_solve_triangular" in bi.coverage().passed_through
    # mixed dtypes: torch computes (in A's dtype), so it is a counted fallback
    with detkit.batch_invariant() as bi:
        mixed = torch.linalg.solve_triangular(a, b.double(), upper=False)
    assert mixed.dtype == torch.float32 and "linalg_solve_triangular" in bi.uncovered()


@pytest.mark.parametrize("a_shape, b_shape", [((4, 4), (4, 1)), ((1, 1), (1, 5)), ((4, 4), (3, 4, 1)),
                                              ((2, 1, 1), (2, 1, 1)), ((3, 1, 4, 4), (1, 1, 4, 3))])
def test_linalg_solve_triangular_keeps_torchs_strides_with_size_one_dims(a_shape: tuple[int, ...],
                                                                         b_shape: tuple[int, ...]) -> None:
    """One right-hand column (a vector solve), a 1 x 1 system, size-1 batch dimensions:
    torch's result is column major there too, strides of size-1 dimensions included
    (``x.mT.contiguous()`` kept a row-major x that also counts as contiguous transposed)."""
    gen = torch.Generator().manual_seed(9)
    n = a_shape[-1]
    a = torch.randn(a_shape, generator=gen) * 0.3 + 2.0 * torch.eye(n)
    b = torch.randn(b_shape, generator=gen)
    for upper in (False, True):
        want = torch.linalg.solve_triangular(a, b, upper=upper)
        with detkit.batch_invariant(strict=True) as bi:
            got = torch.linalg.solve_triangular(a, b, upper=upper)
        assert bi.routed() == {"linalg_solve_triangular": 1}
        assert got.shape == want.shape and got.stride() == want.stride(), (upper, got.stride(), want.stride())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_coverage_report_classifies_traced_ops() -> None:
    x = torch.randn(2, 8)
    _, ops = mode.trace_ops(lambda: torch.logcumsumexp(F.softmax(F.linear(x, torch.randn(4, 8)), -1).atan2(x[:, :4]),
                                                       -1))
    report = mode.coverage_report(ops)
    assert "_softmax.default" in report.routed and "mm.default" in report.routed
    assert "logcumsumexp.default" in report.uncovered
    assert "atan2.default" in report.routed  # torch's kernel, every element on its vector path
    portable = mode.coverage_report(ops, portable=True)
    assert "atan2.default" in portable.not_portable
    assert "UNCOVERED" in str(report)


def test_coverage_report_tells_integer_arithmetic_from_float_arithmetic() -> None:
    # MoE routers divide token indices and count tokens per expert on integers: exact.
    # The same ops on floats round (floor_divide in bfloat16 is even position dependent).
    ids = torch.tensor([5, 3, 8, 1])
    _, ints = mode.trace_ops(lambda: (torch.floor_divide(ids, 2), torch.bincount(ids), ids.remainder(3)))
    report = mode.coverage_report(ints)
    assert {"floor_divide.default", "bincount.default", "remainder.Scalar"} <= set(report.exact), str(report)
    assert report.uncovered == {} and report.notes["bincount.default"] == "integer operands only (as traced): exact"
    x = torch.randn(4, dtype=torch.bfloat16)
    _, floats = mode.trace_ops(lambda: (torch.floor_divide(x, 2), torch.bincount(ids, weights=x.float())))
    report = mode.coverage_report(floats)
    assert "bincount.default" in report.uncovered and "float operands" in report.notes["bincount.default"]
    assert "floor_divide.default" in report.routed, str(report)  # on floats: torch's vector path throughout
    # counts from elsewhere (a plain mapping) are classified by name alone, as before
    assert "bincount.default" in mode.coverage_report(dict(ints)).uncovered


def test_coverage_report_tells_a_position_id_cumsum_from_a_running_float_sum_and_padding_is_exact() -> None:
    """HF models take position ids from mask.cumsum (integers: exact, passed to torch);
    Mamba2-style segment sums are float cumsums, which the mode routes. F.pad (Mamba2's
    chunking) is a copy and a fill, which the report once called uncovered."""
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    _, ints = mode.trace_ops(lambda: (mask.cumsum(-1) - 1, F.pad(mask.float(), (2, 0)), F.pad(mask[None].float(), (1, 1),
                                                                                         mode="reflect")))
    report = mode.coverage_report(ints)
    assert "cumsum.default" in report.exact and not report.uncovered, str(report)
    assert {"constant_pad_nd.default", "reflection_pad1d.default"} <= set(report.exact)
    # dtype= is the type the scan computes in: float counts cast to int32 (Mixtral's router)
    # are an integer scan, integers cast to float16 a float one
    _, cast = mode.trace_ops(lambda: (torch.ones(4).cumsum(0, dtype=torch.int32), torch.arange(4).sum(dtype=torch.int64)))
    assert {"cumsum.default", "sum.default"} <= set(mode.coverage_report(cast).exact), str(mode.coverage_report(cast))
    _, cast = mode.trace_ops(lambda: torch.arange(4).cumsum(0, dtype=torch.float16))
    assert "cumsum.default" in mode.coverage_report(cast).routed
    _, floats = mode.trace_ops(lambda: torch.randn(2, 8).cumsum(-1))
    for device in ("CPU", "CUDA"):
        for portable in (False, True):
            assert "cumsum.default" in mode.coverage_report(floats, portable=portable, device=device).routed
    assert "cumsum.default" in mode.coverage_report({"cumsum.default": 1}).routed


_HARD_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hardtanh": lambda t: F.hardtanh(t, 0.0, 6.0),  # hidden_act="relu6"
    "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
    "prelu": lambda t: F.prelu(t, torch.tensor([0.25], dtype=t.dtype)),
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
}


@given(
    op=st.sampled_from(sorted(_HARD_ACTIVATIONS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**16),
)
def test_clamp_activations_give_the_same_values_in_torchs_vector_body_and_scalar_tail(
        op: str, dtype: torch.dtype, n: int, seed: int) -> None:
    """Why coverage_report calls them exact: a strided input runs torch's scalar loop, a
    contiguous one its vector loop, and on inputs of every bit pattern their values agree
    (NaN payloads aside, as for any 16-bit arithmetic)."""
    view = torch.int32 if dtype == torch.float32 else torch.int16
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(torch.iinfo(view).min, torch.iinfo(view).max, (n,), generator=g, dtype=view).view(dtype)
    x = torch.where(torch.rand(n, generator=g) < 0.5, torch.randn(n, generator=g).to(dtype) * 4, x)
    strided = torch.empty(2 * n, dtype=dtype)[::2]
    strided.copy_(x)
    vector, scalar = _HARD_ACTIVATIONS[op](x), _HARD_ACTIVATIONS[op](strided).contiguous()
    d = diff(vector, scalar)
    assert d.num_bit_mismatches == d.nan_payload_mismatches, str(d)


def test_the_strided_input_check_finds_a_position_dependent_op() -> None:
    """Negative control for the check above: float32 exp2's scalar loop rounds otherwise."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(0)) * 3
    strided = torch.empty(6000)[::2]
    strided.copy_(x)
    assert diff(torch.exp2(x), torch.exp2(strided).contiguous()).num_value_mismatches > 0


def test_coverage_report_lists_clamp_activations_as_exact() -> None:
    """hidden_act relu6 (hardtanh), leaky_relu and prelu: a clamp or one correctly rounded
    product, exact anywhere; hardswish and hardsigmoid: exact on the CPU, but not portable
    (torch's CUDA kernels multiply by a rounded 1/6 where the CPU's divide by 6)."""
    x = torch.randn(4, 8)
    _, ops = mode.trace_ops(lambda: [fn(x) for fn in _HARD_ACTIVATIONS.values()])
    names = {"hardtanh.default", "leaky_relu.default", "_prelu_kernel.default", "hardswish.default",
             "hardsigmoid.default"}
    assert names <= set(mode.coverage_report(ops).exact), str(mode.coverage_report(ops))
    portable = mode.coverage_report(ops, portable=True)
    assert set(portable.not_portable) == {"hardswish.default", "hardsigmoid.default"}, str(portable)
    assert names - set(portable.not_portable) <= set(portable.exact) and portable.uncovered == {}, str(portable)


def test_trace_ops_lists_a_higher_order_operator_instead_of_raising() -> None:
    # HF's attn_implementation="flex_attention" runs the flex_attention higher-order
    # operator (eagerly under the mode's force_eager stance); trace_ops raised
    # NotImplementedError on it, so no coverage report could be made for such a model.
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with detkit.batch_invariant(), pytest.warns(UserWarning):  # torch warns that flex_attention is not compiled
        out, ops = mode.trace_ops(flex_attention, q, k, v)
        want = flex_attention(q, k, v)
    assert diff(out, want).ok
    report = mode.coverage_report(ops)
    assert report.uncovered.get("flex_attention.default") == 1, str(report)


class _OrderSensitiveKernels(SimpleNamespace):
    """Stand-ins that reduce in blocks of 4 (like a blocked BLAS).

    matmul's blocks are aligned to index 0: leading zeros shift every block, so it alone
    is NOT padding invariant, and the mode's leading-zero canonicalisation of batched
    products has to make it so. softmax's blocks start at the row's first entry with
    nonzero exp, as the backend contract (detkit.kernels._backend) requires of softmax.
    """

    @staticmethod
    def _blocked(terms: torch.Tensor) -> torch.Tensor:  # (..., K) -> (...), fixed blocks of 4
        acc = torch.zeros(terms.shape[:-1], dtype=torch.float32)
        for s in range(0, terms.shape[-1], 4):
            acc = acc + terms[..., s : s + 4].sum(-1)
        return acc

    def matmul(self, a: torch.Tensor, b: torch.Tensor, bias: Any = None, *, portable: bool = False) -> torch.Tensor:
        prods = a.float().unsqueeze(-1) * b.float().unsqueeze(-3)  # (..., M, K, N)
        return self._blocked(prods.transpose(-1, -2)).to(a.dtype)

    def softmax(self, x: torch.Tensor, dim: int = -1, *, portable: bool = False) -> torch.Tensor:
        e = torch.exp(x.float() - x.float().amax(-1, keepdim=True))
        sums = torch.stack([self._blocked(row[int((row != 0).to(torch.uint8).argmax()) :]) for row in e])
        return (e / sums.unsqueeze(-1)).to(x.dtype)


def test_left_padding_invariance_does_not_rely_on_the_kernels_order(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = _OrderSensitiveKernels()
    g = torch.Generator().manual_seed(0)
    pads = range(1, 8)
    scores = torch.randn(6, 37, generator=g)
    v = torch.randn(37, 16, generator=g)

    def padded(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.cat([torch.full((6, pad), torch.finfo(torch.float32).min), scores], 1)
        return s, torch.cat([torch.randn(pad, 16, generator=g), v], 0)

    # The stand-in really is order sensitive: called directly, padding changes the bits.
    direct = kernels.matmul(kernels.softmax(scores), v)
    assert any(not diff(kernels.matmul(kernels.softmax(s), vp), direct).ok for s, vp in map(padded, pads))

    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: kernels)
    with detkit.batch_invariant():
        alone = (torch.softmax(scores, -1)[None] @ v[None])[0]
        assert diff(alone, direct).ok
        for pad in pads:
            s, vp = padded(pad)
            assert diff((torch.softmax(s, -1)[None] @ vp[None])[0], alone).ok, pad
            batched = torch.bmm(torch.softmax(torch.stack([s, s.flip(0)]), -1), torch.stack([vp, vp]))
            assert diff(batched[0], alone).ok and diff(batched[1], alone.flip(0)).ok, pad
        # 2-D products (mm: nn.Linear) are not canonicalised: their K is never padding.
        assert any(not diff(torch.softmax(s, -1) @ vp, alone).ok for s, vp in map(padded, pads))


def test_linear_after_relu_is_one_kernel_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """ReLU zeros at the start of an activation row are not padding: nn.Linear (mm, addmm)
    computes the whole batch in one kernel call, with the bits of that call, where the
    skip used to cost one call per distinct start (3.9x the time at 128 x 3072 x 768)."""
    from detkit import kernels as real

    calls: list[tuple[int, ...]] = []

    def matmul(a: torch.Tensor, b: torch.Tensor, bias: Any = None, **kw: Any) -> torch.Tensor:
        calls.append(tuple(a.shape))
        return real.matmul(a, b, bias, **kw)

    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: SimpleNamespace(matmul=matmul))
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(96, 24)
    x = torch.relu(torch.randn(40, 96, generator=g))
    assert len(torch.unique((x != 0).to(torch.uint8).argmax(-1))) > 2  # several distinct starts
    with torch.no_grad(), detkit.batch_invariant():
        got = lin(x)
        got_3d = lin(x.reshape(4, 10, 96))
    assert calls == [(40, 96), (40, 96)]
    want = real.matmul(x, lin.weight.detach().t(), lin.bias.detach())
    assert diff(got, want).ok and diff(got_3d.reshape(40, 24), want).ok


def test_padded_batched_product_is_one_kernel_call_where_k_is_sequential(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager attention's probs @ V with left padding: the CPU's portable=False batched
    product is one fma chain over k from +0, so leading zeros change no bit and the mode
    makes one kernel call; the portable kernel chunks K from k = 0, so the mode starts
    each row at its first nonzero (one call per distinct start). Both give every row the
    bits it has without padding."""
    from detkit import kernels as real

    calls: list[tuple[int, ...]] = []

    def matmul(a: torch.Tensor, b: torch.Tensor, bias: Any = None, *, portable: bool = False) -> torch.Tensor:
        calls.append(tuple(a.shape))
        return real.matmul(a, b, bias, portable=portable)

    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: SimpleNamespace(
        matmul=matmul, batched_matmul_is_sequential_in_k=real.batched_matmul_is_sequential_in_k))
    assert real.batched_matmul_is_sequential_in_k("cpu", False)
    assert not real.batched_matmul_is_sequential_in_k("cpu", True)
    g = torch.Generator().manual_seed(5)
    keys, total, pads = 300, 311, (0, 3, 7, 11)  # K past one 256-chunk of the portable order
    probs = torch.softmax(torch.randn(2, 4, keys, generator=g), -1)
    v = torch.randn(2, total, 16, generator=g)  # rows before a row's keys: other rows' keys
    padded = torch.zeros(2, 4, total)
    for i in range(2):
        for r in range(4):
            pad = pads[(i + r) % 4]
            padded[i, r, pad : pad + keys] = probs[i, r]
    for portable, want_calls in ((False, 1), (True, 4)):
        calls.clear()
        with detkit.batch_invariant(portable=portable):
            got = torch.bmm(padded, v)
        assert len(calls) == want_calls, (portable, calls)
        for i in range(2):
            for r in range(4):
                pad = pads[(i + r) % 4]
                # the row without padding, as a batched product of its own
                alone = real.matmul(probs[i, r][None, None], v[i, pad : pad + keys][None], portable=portable)[0, 0]
                assert _bits_equal(got[i, r], alone), (portable, i, r)


_G = torch.Generator().manual_seed(7)
_X = torch.randn(6, 40, generator=_G)
_W = torch.randn(40, 40, generator=_G)
_Q = torch.randn(2, 4, 5, 8, generator=_G)
_KV = torch.randn(2, 2, 7, 8, generator=_G)
_MASK = torch.rand(2, 1, 5, 7, generator=_G) > 0.3

EVERY_OVERRIDE: dict[str, Callable[[], Any]] = {
    "mm": lambda: torch.mm(_X, _W),
    "addmm": lambda: torch.addmm(_W[0], _X, _W, beta=0.5, alpha=2.0),
    "bmm": lambda: torch.bmm(_X.reshape(2, 3, 40), _W.expand(2, 40, 40)),
    "baddbmm": lambda: torch.baddbmm(_X.reshape(2, 3, 40)[:, :, :3], _X.reshape(2, 3, 40), _W.expand(2, 40, 40)[:, :, :3]),
    "mv": lambda: torch.mv(_W, _X[0]),
    "addmv": lambda: torch.addmv(_X[1], _W, _X[0], beta=2.0),
    "dot": lambda: torch.dot(_X[0], _X[1]),
    "_softmax": lambda: F.softmax(_X.reshape(2, 3, 40), 1),
    "_log_softmax": lambda: F.log_softmax(_X, -1),
    "_safe_softmax": lambda: torch.ops.aten._safe_softmax(torch.cat([_X, torch.full((1, 40), float("-inf"))]), -1),
    "mean.dim": lambda: _X.bfloat16().mean((0, 1), keepdim=True),
    "mean.default": lambda: _X.mean(),
    "sum.dim_IntList": lambda: _X.sum(0, dtype=torch.float64),
    "sum.default": lambda: _X.sum(),
    "native_layer_norm": lambda: torch.native_layer_norm(_X.reshape(6, 5, 8), (5, 8), _W[:5, :8],
                                                         _W[5, :40].reshape(5, 8), 1e-5),
    "layer_norm": lambda: F.layer_norm(_X.reshape(6, 5, 8), (5, 8), _W[:5, :8], _W[5, :40].reshape(5, 8)),
    "rms_norm": lambda: F.rms_norm(_X.bfloat16(), (40,), _W[0].bfloat16(), 1e-6),
    "_fused_rms_norm": lambda: torch.ops.aten._fused_rms_norm(_X, [40], _W[0], 1e-6),
    "scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(_Q, _KV, _KV, attn_mask=_MASK, enable_gqa=True),
    "_scaled_dot_product_flash_attention_for_cpu": lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _Q, _KV.repeat(1, 2, 1, 1), _KV.repeat(1, 2, 1, 1), is_causal=True
    )[0],
    "_grouped_mm": lambda: torch._grouped_mm(_X, _W.expand(2, 40, 40), offs=torch.tensor([2, 6], dtype=torch.int32)),
    "convolution": lambda: F.conv1d(_X.reshape(3, 8, 10), _W[:8, :6].reshape(4, 4, 3), _W[9, :4], padding=1, groups=2),
    "silu_": lambda: F.silu(_X.clone(), inplace=True),
    "gelu": lambda: F.gelu(_X.t(), approximate="tanh"),
    "pow.Tensor_Scalar": lambda: _X.abs().pow(1.3),
    "pow_.Scalar": lambda: _X.abs().pow_(0.7),
    "exp_": lambda: _X.clone().exp_(),
}


@pytest.mark.parametrize("op", list(EVERY_OVERRIDE))
def test_every_override_matches_torch_and_is_routed(op: str) -> None:
    fn = EVERY_OVERRIDE[op]
    expected = fn()
    with detkit.batch_invariant() as bi:
        got = fn()
    assert bi.routed().get(op, 0) >= 1, bi.coverage()
    assert bi.uncovered() == {}
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert g.shape == e.shape and g.dtype == e.dtype
        tol = {"atol": 2e-2, "rtol": 2e-2} if e.dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(g, e, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_gives_a_token_the_same_bits_whatever_its_group_holds(dtype: torch.dtype) -> None:
    """MoE experts (transformers 5's default ``experts_implementation``) run
    ``torch._grouped_mm``; torch's CUDA kernel never reaches ``mm``, so it is routed
    itself: a token's row must not depend on how many tokens share its expert."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(48, 64, generator=g).to(dtype)
    w = torch.randn(4, 96, 64, generator=g).to(dtype).transpose(-2, -1)  # HF's weight.transpose(-2, -1)
    ends = torch.tensor([5, 5, 40, 46], dtype=torch.int32)  # an empty group; rows 46.. belong to none
    with detkit.batch_invariant(strict=True) as bi:
        full = torch._grouped_mm(x, w, offs=ends)
        alone = [torch._grouped_mm(x[i : i + 1], w[e : e + 1], offs=torch.tensor([1], dtype=torch.int32))
                 for i, e in ((0, 0), (5, 2), (39, 2), (45, 3))]
        batched = torch._grouped_mm(x[:8].reshape(2, 4, 64), w[:2])
        one_entry = torch.bmm(x[4:8][None], w[1][None])
        k_split = torch._grouped_mm(x[:, :6].t(), x[:, :16], offs=torch.tensor([20, 20, 48], dtype=torch.int32))
    assert bi.routed().get("_grouped_mm", 0) == 7 and bi.uncovered() == {}, bi.coverage()
    for got, i in zip(alone, (0, 5, 39, 45)):
        assert _bits_equal(got[0], full[i]), i
    assert torch.equal(full[46:], torch.zeros_like(full[46:]))
    assert _bits_equal(batched[1], one_entry[0])
    assert torch.equal(k_split[1], torch.zeros_like(k_split[1]))
    tol = {"atol": 5e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-5}
    torch.testing.assert_close(full[:46], torch._grouped_mm(x, w, offs=ends)[:46], **tol)
    torch.testing.assert_close(k_split[2], x[20:, :6].t() @ x[20:, :16], **tol)


def test_grouped_mm_arguments_the_kernels_do_not_take_are_counted() -> None:
    x = torch.randn(8, 32)
    w = torch.randn(2, 32, 16)
    bad_offs = torch.tensor([6, 2], dtype=torch.int32)  # torch's CPU kernel runs this anyway
    with detkit.batch_invariant() as bi:
        torch._grouped_mm(x, w, offs=bad_offs)
    assert "not nondecreasing" in next(iter(bi.uncovered()["_grouped_mm"])), bi.coverage()
    with detkit.batch_invariant(strict=True), pytest.raises(InvarianceViolation, match="_grouped_mm"):
        torch._grouped_mm(x, w, offs=bad_offs)
    # (G, M, K) x (K, N) with offs over N: valid offsets, a form the adapter does not take;
    # the reason names the form, not the offsets (they were checked against K)
    a, b = torch.randn(2, 4, 16), torch.randn(16, 40)
    with detkit.batch_invariant() as bi:
        torch._grouped_mm(a, b, offs=torch.tensor([20, 40], dtype=torch.int32))
    assert list(bi.uncovered()["_grouped_mm"]) == ["3-D x 2-D grouped product with 2 offsets"], bi.coverage()
    # a 2-D offs (torch refuses it): the reason gives its shape, not its first dimension as a count
    with detkit.batch_invariant() as bi, pytest.raises(RuntimeError):
        torch._grouped_mm(x, w, offs=torch.tensor([[2, 8]], dtype=torch.int32))
    assert list(bi.uncovered()["_grouped_mm"]) == ["2-D x 3-D grouped product with 2-D offs of shape (1, 2)"], \
        bi.coverage()
    # offsets torch refuses are refused under the mode too, by torch, with torch's error
    for dtype in (torch.int64, torch.int16):
        with pytest.raises(RuntimeError) as plain:
            torch._grouped_mm(x, w, offs=torch.tensor([2, 6], dtype=dtype))
        with detkit.batch_invariant(strict=True), pytest.raises(RuntimeError) as routed:
            torch._grouped_mm(x, w, offs=torch.tensor([2, 6], dtype=dtype))
        assert str(routed.value) == str(plain.value) and not isinstance(routed.value, InvarianceViolation)


@pytest.mark.parametrize("name", _aten_adapters._ELEMENTWISE_INPLACE)
def test_in_place_elementwise_forms_are_routed_like_their_functional_forms(name: str) -> None:
    """An unrouted in-place form (sinh_ was one) runs torch's position-dependent loop
    with nothing in uncovered(): measured, x.sinh_() on 33 x 100 float32 rows changed a
    row's bits with the batch under the mode while sinh did not."""
    x = (torch.randn(33, 100, generator=torch.Generator().manual_seed(9)) * 0.5).abs().add(0.1)
    inplace, functional = getattr(torch.ops.aten, name), getattr(torch.ops.aten, name.removesuffix("_"))
    with detkit.batch_invariant() as bi:
        full = inplace(x.clone())
        rows = [inplace(x[i : i + 1].clone()) for i in (0, 17, 32)]
        want = functional(x)
    assert bi.routed().get(name, 0) >= 4 and bi.uncovered() == {}, bi.coverage()
    assert _bits_equal(full, want)
    for got, i in zip(rows, (0, 17, 32)):
        assert _bits_equal(got[0], full[i]), (name, i)


def test_override_table_is_complete_for_this_torch() -> None:
    with detkit.batch_invariant():
        info = mode.registered_keys()
    assert info["keys"] == ["CPU"] or "CUDA" in info["keys"]
    assert info["skipped"] == {}


def test_an_op_without_a_kernel_for_the_device_is_skipped_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    """An overridden op with no kernel for a device cannot run there (aten::_grouped_mm
    had only a CUDA kernel before torch 2.9); capturing its original raised, so the mode
    could not be entered at all."""
    if torch._C._dispatch_has_computed_kernel_for_dispatch_key("aten::_scaled_grouped_mm", "CPU"):
        pytest.skip(f"torch {torch.__version__} has a CPU kernel for aten::_scaled_grouped_mm: no CUDA-only op to try")
    cuda_only = _aten_adapters.OpOverride("_scaled_grouped_mm", _aten_adapters.mm, "matmul")
    monkeypatch.setitem(_aten_adapters.OVERRIDES, "CPU", (*_aten_adapters.OVERRIDES["CPU"], cuda_only))
    with detkit.batch_invariant() as bi:
        info = mode.registered_keys()
        torch.mm(_X, _W)
    assert "no CPU kernel for aten::_scaled_grouped_mm" in info["skipped"]["CPU:_scaled_grouped_mm"]
    assert bi.routed().get("mm") == 1


class _RecordingBackend:
    """A torch.compile backend that counts its compilations and its compiled runs. Its
    compiled code calls the graph's aten ops like eager code would, so only the counts
    (not the bits) tell whether compiled code ran; inductor would emit its own kernels."""

    def __init__(self) -> None:
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        self.compiles += 1

        def run(*args: Any) -> Any:
            self.runs += 1
            return gm.forward(*args)

        return run


def test_compiled_code_runs_eagerly_under_the_mode() -> None:
    """torch.compile'd code does not dispatch aten ops one by one, so under the mode it
    would bypass detkit's kernels without a trace (measured with inductor: the bits were
    neither detkit's nor batch invariant, and uncovered() was empty). The mode sets the
    compiler's stance to force_eager: code compiled before the mode, or inside it, runs
    eagerly, through the overrides; the stance returns when the mode ends."""
    from detkit import kernels

    backend = _RecordingBackend()
    g = torch.Generator().manual_seed(11)
    w, bias, x = torch.randn(64, 48, generator=g), torch.randn(48, generator=g), torch.randn(9, 64, generator=g)

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(t @ w + bias, -1)

    compiled = torch.compile(f, backend=backend)
    compiled(x)
    assert (backend.compiles, backend.runs) == (1, 1)
    want = kernels.softmax(kernels.matmul(x, w, bias))
    with detkit.batch_invariant() as outer:
        assert "force_eager" in mode.registered_keys()["compile"]
        with detkit.batch_invariant(portable=True):
            pass  # an inner context ends; the outer one still forces eager
        got = compiled(x)
        alone = compiled(x[4:5])
        late = torch.compile(lambda t: torch.softmax(t, -1), backend=backend)(x)
    assert (backend.compiles, backend.runs) == (1, 1), "compiled code ran under the mode"
    assert _bits_equal(got, want) and _bits_equal(alone[0], got[4])
    assert _bits_equal(late, kernels.softmax(x))
    assert outer.routed().get("_softmax", 0) >= 3 and outer.uncovered() == {}
    compiled(x)  # the stance is back: compiled code runs again
    assert backend.runs == 2 and mode.registered_keys()["compile"] == ""


def test_torch_without_get_kernel_is_refused_with_the_version_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.9 has no torch.library.get_kernel: the mode says which torch it needs and
    stays off, registering nothing; the kernels, which do not use it, still run."""
    from detkit import kernels

    monkeypatch.delattr(torch.library, "get_kernel")
    with pytest.raises(BackendUnavailable, match=r"needs torch >= 2\.9 .*pip install 'torch>=2\.9'"):
        with detkit.batch_invariant():
            pass
    with pytest.raises(BackendUnavailable, match="torch.library.get_kernel"):
        mode.enable()
    assert not mode.is_enabled() and mode.registered_keys()["keys"] == []
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "CPU")
    assert kernels.matmul(torch.ones(2, 3), torch.ones(3, 4), bias=None).eq(3).all()


def test_kernels_called_directly_under_the_mode_are_not_routed_back() -> None:
    """The CPU matmul's tiles call torch.mm(..., out=) on BLAS; a direct kernel call while the
    mode is on (not through an adapter) routed each tile back into detkit as mm.out."""
    from detkit import kernels

    a, b = torch.randn(20, 56), torch.randn(56, 24)
    want = kernels.matmul(a, b)
    with detkit.batch_invariant() as bi:
        got = kernels.matmul(a, b)
        kernels.matmul(torch.randn(20, 72), torch.randn(72, 40))  # a new shape: verified under the mode
    assert _bits_equal(got, want)
    assert bi.routed() == {}


def test_reductions_of_a_0d_tensor() -> None:
    # x.sum() / x.mean() of a scalar (a loss) raised TypeError from permute() under the mode.
    x = torch.tensor(-1.5)
    with detkit.batch_invariant() as bi:
        got = [x.sum(), x.mean(), x.sum(0), x.sum(-1, keepdim=True), x.mean([]), x.sum(dtype=torch.float64)]
    want = [x.sum(), x.mean(), x.sum(0), x.sum(-1, keepdim=True), x.mean([]), x.sum(dtype=torch.float64)]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and _bits_equal(g, w)
    assert bi.uncovered() == {} and bi.routed().get("sum.default", 0) == 2


def test_reductions_and_softmax_refuse_bad_dims_as_torch_does() -> None:
    # An out-of-range or repeated dim was wrapped (dim % ndim) or deduplicated under the
    # mode, so x.sum(5) of a 2-D x silently summed over dim 1 where torch raises.
    x = torch.randn(4, 6)
    calls = [lambda: x.sum(5), lambda: x.mean(-3), lambda: x.sum((0, 0)), lambda: x.sum((1, -1)),
             lambda: torch.tensor(2.0).sum(1), lambda: torch.softmax(x, 3), lambda: torch.log_softmax(x, -3)]
    for call in calls:
        with pytest.raises((IndexError, RuntimeError)):
            call()
        with detkit.batch_invariant(), pytest.raises((IndexError, RuntimeError)):
            call()


def test_softmax_of_a_strided_input_is_contiguous_as_torch_makes_it() -> None:
    # The result was laid out like the input, so softmax(x.t(), 0).view(-1) raised under the
    # mode only; torch's CPU softmax is contiguous for every input layout.
    x = torch.randn(2, 3, 4, 5)
    inputs = [(x.transpose(0, 3), 2), (x[:, :, ::2], 1), (x.to(memory_format=torch.channels_last), 1), (x[0, 0].t(), 0)]
    for fn in (torch.softmax, torch.log_softmax, torch.ops.aten._safe_softmax):
        for t, d in inputs:
            want = fn(t, d)
            with detkit.batch_invariant() as bi:
                got = fn(t, d)
                got.view(-1)
            assert got.stride() == want.stride() and bi.uncovered() == {}
            torch.testing.assert_close(got, want)


def _bhle(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, E) values in (B, L, H, E) memory: an HF projection viewed per head."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


_Q, _K, _V = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
_V16, _KEEP = torch.randn(2, 4, 7, 16), torch.rand(2, 1, 5, 7) > 0.3
SDPA_LAYOUTS: dict[str, Callable[[], torch.Tensor]] = {
    "contiguous": lambda: F.scaled_dot_product_attention(_Q, _K, _V),
    "HF query": lambda: F.scaled_dot_product_attention(_bhle(_Q), _bhle(_K), _bhle(_V)),
    "HF query, causal": lambda: F.scaled_dot_product_attention(_bhle(_Q), _K, _V, is_causal=True),
    "HF query, bool mask": lambda: F.scaled_dot_product_attention(_bhle(_Q), _K, _V, attn_mask=_KEEP),
    "HF query, gqa": lambda: F.scaled_dot_product_attention(_bhle(_Q), _K[:, :2], _V[:, :2], enable_gqa=True),
    "HF query, bfloat16": lambda: F.scaled_dot_product_attention(_bhle(_Q).bfloat16(), _K.bfloat16(), _V.bfloat16()),
    "heads outermost": lambda: F.scaled_dot_product_attention(_Q.transpose(0, 1).contiguous().transpose(0, 1), _K, _V),
    "a sliced query": lambda: F.scaled_dot_product_attention(_Q[:, :, ::2], _K, _V),
    "another value head size": lambda: F.scaled_dot_product_attention(_bhle(_Q), _K, _V16),
    "flash entry point": lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(_bhle(_Q), _K, _V)[0],
}


@pytest.mark.parametrize("case", list(SDPA_LAYOUTS))
def test_attention_output_is_laid_out_as_torch_lays_it_out(case: str) -> None:
    """torch's CPU SDPA lays its output out as the query (an HF query: (B, L, H, E) memory);
    the mode's was always contiguous, so out.transpose(1, 2).view(B, L, H * E) (the value
    layout torch's callers may rely on) raised under the mode only."""
    want = SDPA_LAYOUTS[case]()
    with detkit.batch_invariant(strict=True) as bi:
        got = SDPA_LAYOUTS[case]()
    assert sum(bi.routed().values()) == 1
    assert got.shape == want.shape and got.stride() == want.stride(), (got.stride(), want.stride())
    torch.testing.assert_close(got, want, atol=2e-2 if want.dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    if case.startswith("HF query") and "head size" not in case:
        b, h, length, e = got.shape
        assert torch.equal(got.transpose(1, 2).view(b, length, h * e), got.transpose(1, 2).reshape(b, length, h * e))


def test_a_matrix_times_a_batch_is_contiguous_as_without_the_mode() -> None:
    # The fold's (x.mT @ w.mT).mT was returned strided, so (w @ x).view(...) raised under
    # the mode only (torch's frozen path, bmm, gives a contiguous result).
    w, x = torch.randn(4, 6), torch.randn(2, 3, 6, 5)
    want = w @ x
    with detkit.batch_invariant(), torch.no_grad():
        got = w @ x
        got.view(2, 3, -1)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want)


def test_an_integer_tensor_summed_in_a_float_dtype_is_routed() -> None:
    # torch.sum(ints, dtype=float32) rounds (torch's bits changed with the layout: 51 of 64
    # rows here), yet it ran torch's kernel and was counted as an exact pass-through.
    x = torch.randint(-2**30, 2**30, (64, 3001), generator=torch.Generator().manual_seed(0))
    strided = x.t().contiguous().t()
    with detkit.batch_invariant() as bi:
        got = [torch.sum(x, 1, dtype=torch.float32), torch.sum(strided, 1, dtype=torch.float32),
               x.mean(1, dtype=torch.float64), x.sum(dtype=torch.bfloat16)]
        ints = x.sum(1)
    assert _bits_equal(got[0], got[1])
    torch.testing.assert_close(got[0], x.double().sum(1).float(), rtol=1e-4, atol=1e6)
    torch.testing.assert_close(got[2], x.double().mean(1))
    assert got[3].dtype == torch.bfloat16 and torch.equal(ints, x.sum(1))
    cov = bi.coverage()
    assert cov.fell_back == {} and set(cov.passed_through) == {"sum.dim_IntList"}, str(cov)
    assert cov.routed["sum.dim_IntList"] == 2 and cov.routed["mean.dim"] == 1 and cov.routed["sum.default"] == 1


def test_an_integer_tensor_to_a_float_power_is_routed() -> None:
    # torch.pow(ints, 1.7) is float32 from torch's position-dependent loop (670 of 700
    # elements differed from the element alone), yet it was counted as an exact pass-through.
    x = torch.randint(1, 1000, (700,), generator=torch.Generator().manual_seed(0))
    with detkit.batch_invariant() as bi:
        full = torch.pow(x, 1.7)
        alone = torch.cat([torch.pow(x[i : i + 1], 1.7) for i in range(700)])
        ints = torch.pow(x, 2)
    assert full.dtype == torch.float32 and _bits_equal(full, alone)
    torch.testing.assert_close(full, x.double().pow(1.7).float())
    assert torch.equal(ints, x * x)
    cov = bi.coverage()
    assert cov.routed["pow.Tensor_Scalar"] == 701 and cov.fell_back == {}, str(cov)


def test_a_linear_of_a_3d_input_with_no_features_gives_torchs_result() -> None:
    # The linear fold flattened the rows with reshape(-1, 0), which torch refuses as
    # ambiguous, so F.linear of a (B, T, 0) input raised under the mode only.
    x, w, b = torch.randn(2, 3, 0), torch.randn(4, 0), torch.randn(4)
    want = F.linear(x, w, b)
    with detkit.batch_invariant():
        got = F.linear(x, w, b), F.linear(x, w)
    assert _bits_equal(got[0], want)
    assert _bits_equal(got[1], torch.zeros(2, 3, 4))


@pytest.mark.parametrize(
    "call",
    [
        lambda: F.layer_norm(torch.randn(3, 2, 2), (2, 2), torch.randn(4)),
        lambda: F.rms_norm(torch.randn(3, 2, 2), (2, 2), torch.randn(4)),
        lambda: F.rms_norm(torch.randn(3, 2, 2), (2, 2), torch.randn(4).requires_grad_()),
        lambda: F.layer_norm(torch.randn(3, 4), (4,), torch.randn(5)),
        lambda: F.layer_norm(torch.randn(3, 4), (4,), torch.randn(4), torch.randn(1, 4)),
    ],
)
def test_a_norm_weight_of_another_shape_raises_torchs_error(call: Callable[[], torch.Tensor]) -> None:
    """torch wants weight and bias of exactly normalized_shape. The adapters reshaped them,
    so a (4,) weight for normalized_shape (2, 2) gave a result under the mode only, and a
    (5,) weight for (4,) an unrelated reshape error."""
    with pytest.raises(RuntimeError, match="same shape as normalized_shape"):
        call()
    with detkit.batch_invariant(), pytest.raises(RuntimeError, match="same shape as normalized_shape"):
        call()


def test_scalar_overloads_that_call_a_routed_op_with_a_wrapped_number_still_run() -> None:
    """floor_divide.Scalar and div.Scalar_mode call floor_divide / div.Tensor_mode with the
    scalar wrapped as a tensor, which a Python kernel receives as a Python number: passed
    on as such, torch's kernel refused it (Expected a value of type 'Tensor'), and every
    MoE model (token // top_k) failed under the mode, and LED's torch.div of two ints."""
    ints, floats = torch.arange(-7, 9), torch.linspace(-4, 4, 37).bfloat16()
    calls = {
        "ints // 2": lambda: ints // 2, "floats // 2": lambda: floats // 2,
        "div floor": lambda: torch.div(floats, 3, rounding_mode="floor"),
        "div trunc, ints": lambda: torch.div(ints, 3, rounding_mode="trunc"),
        "in place": lambda: floats.clone().floor_divide_(2),
        "div_ floor": lambda: floats.clone().div_(3, rounding_mode="floor"),
        # two Python ints, both wrapped (LED's chunk count): no tensor to take a dtype from
        "ints only": lambda: torch.div(64, 2, rounding_mode="trunc"),
        "floats only": lambda: torch.div(7.5, 2, rounding_mode="floor"),
    }
    want = {name: fn() for name, fn in calls.items()}
    with detkit.batch_invariant(strict=True) as bi:
        got = {name: fn() for name, fn in calls.items()}
    for name in calls:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert bi.uncovered() == {} and bi.routed().get("floor_divide", 0) >= 1, bi.coverage()


def test_coverage_report_lists_a_16_bit_mean_over_an_integer_count_on_the_cpu() -> None:
    """torch's CPU div of a bfloat16 tensor by an integer tensor rounds the integers to
    bfloat16 (297 becomes 296), except from a one-element tensor, whose exact value it uses:
    a masked mean written as sum / count changes at a batch of one (shown here). The
    trace lists such a call as uncovered; a 0/1 mask, which bfloat16 holds exactly, is not."""
    gen = torch.Generator().manual_seed(11)
    emb = torch.randn(6, 297, 8, generator=gen).bfloat16()
    count = torch.full((6, 1), 297)

    def pooled(e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return e.sum(1) / c

    full = pooled(emb, count)
    assert any(not torch.equal(pooled(emb[i : i + 1], count[i : i + 1]), full[i : i + 1]) for i in range(6))
    _, ops = mode.trace_ops(pooled, emb, count)
    report = mode.coverage_report(ops)
    assert "div.Tensor" in report.uncovered and "one element" in report.notes["div.Tensor"], str(report)
    assert "div.Tensor" not in mode.coverage_report(ops, device="CUDA").uncovered  # no CPU scalars there
    _, masked = mode.trace_ops(lambda e, m: e * m, emb, torch.ones(6, 297, 1, dtype=torch.long))
    assert "mul.Tensor" in mode.coverage_report(masked).exact
    _, wide = mode.trace_ops(pooled, emb.float(), count)  # float32 gets the same rounding either way
    assert "div.Tensor" in mode.coverage_report(wide).exact


def test_cdist_is_computed_from_routed_ops_and_the_report_says_so() -> None:
    """torch.cdist's matmul path (an audio codec's codebook search: 64 frames against 2048
    codes) gave every frame alone other bits than in the batch (negative control); torch
    computes _euclidean_dist from pow, sum and bmm, which the mode routes, so under the mode
    no frame differs, and coverage_report lists it as routed, not uncovered."""
    gen = torch.Generator().manual_seed(13)
    frames, codes = torch.randn(1, 64, 256, generator=gen), torch.randn(1, 2048, 256, generator=gen)

    def frames_differing() -> int:
        full = torch.cdist(frames, codes)
        return sum(not torch.equal(torch.cdist(frames[:, i : i + 1], codes), full[:, i : i + 1]) for i in range(64))

    assert frames_differing() > 0, "negative control: torch did not change; the test proves nothing here"
    with detkit.batch_invariant(strict=True) as bi:
        assert frames_differing() == 0
    assert {"bmm", "sum.dim_IntList"} <= set(bi.routed())
    _, ops = mode.trace_ops(torch.cdist, frames, codes)
    for portable in (False, True):
        report = mode.coverage_report(ops, portable=portable)
        assert "_euclidean_dist.default" in report.routed and "cdist" in report.notes["_euclidean_dist.default"]
    _, ops64 = mode.trace_ops(torch.cdist, frames.double(), codes.double())
    assert "_euclidean_dist.default" in mode.coverage_report(ops64, portable=True).uncovered


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("call", ["floor_divide", "div floor", "div trunc", "floor_divide by a 0-d float32",
                                  "atan2 with a 0-d float32", "logaddexp with a 0-d float32",
                                  "pow with a 0-d float32 exponent", "pow of a 0-d float32 base"])
def test_a_scalar_operand_keeps_its_precision_against_16_bit_tensors(call: str, dtype: torch.dtype) -> None:
    """torch's kernels read a Python number, or a 0-d tensor, as a CPU scalar at its own
    precision in their float32 arithmetic: bfloat16 ``x // 0.1`` divides by 0.1 in float32.
    The routed binary ops did it by 0.1 rounded to bfloat16 (31 of 1,000 quotients
    differed). On a length where torch takes its vector path throughout, the mode's
    values are torch's bits."""
    x = (torch.randn(1024, generator=torch.Generator().manual_seed(14)) * 10).to(dtype)
    point_one = torch.tensor(0.1)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "floor_divide": lambda: torch.floor_divide(x, 0.1),
        "div floor": lambda: torch.div(x, 0.1, rounding_mode="floor"),
        "div trunc": lambda: torch.div(x, 0.3, rounding_mode="trunc"),
        "floor_divide by a 0-d float32": lambda: torch.floor_divide(x, point_one),
        "atan2 with a 0-d float32": lambda: torch.atan2(x, point_one),
        "logaddexp with a 0-d float32": lambda: torch.logaddexp(x, point_one),
        "pow with a 0-d float32 exponent": lambda: torch.pow(x.abs(), point_one),
        "pow of a 0-d float32 base": lambda: torch.pow(point_one, x),
    }
    want = calls[call]()
    with detkit.batch_invariant(strict=True) as bi:
        got = calls[call]()
    assert sum(bi.routed().values()) == 1, bi.coverage()
    assert got.dtype == want.dtype and diff(got, want).ok, diff(got, want).summary()


@pytest.mark.parametrize("call", ["floor_divide", "atan2"])
def test_a_0d_operand_alone_gives_the_bits_it_has_in_a_tensor(call: str) -> None:
    """A 0-d bfloat16 tensor (a value alone) against a Python number or a 0-d tensor keeps
    torch's result dtype and gets the bits the same value gets inside a tensor."""
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "floor_divide": lambda t: torch.floor_divide(t, 0.1),
        "atan2": lambda t: torch.atan2(t, torch.tensor(0.3, dtype=torch.bfloat16)),
    }
    values = (torch.randn(100, generator=torch.Generator().manual_seed(16)) * 10).bfloat16()
    with detkit.batch_invariant(strict=True):
        whole = fns[call](values)
        alone = [fns[call](v) for v in values]
    assert all(a.dtype == torch.bfloat16 and a.dim() == 0 for a in alone)
    assert diff(torch.stack(alone), whole).ok
