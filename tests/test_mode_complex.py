"""Complex products and quotients under the mode (Llama 4's and DeepSeek-V2's complex RoPE).

torch's CPU complex ``mul`` and ``div`` round differently in their vector body and scalar
tail, so an element's bits depended on its place in the tensor. The mode computes them
from real IEEE operations, each rounded once: checked here bit for bit against the same
formula in numpy, over batch sizes and rows, for every operand form (broadcast, Python
numbers, real operands, conjugate views, in place, out=), and on a complex-RoPE model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import detkit
from detkit import mode

pytestmark = pytest.mark.usefixtures("mode_left_off")

_PART = {torch.complex32: np.float16, torch.complex64: np.float32, torch.complex128: np.float64}


def _parts(t: torch.Tensor, compute: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(real, imaginary) of ``t`` in ``compute`` as numpy arrays."""
    r = torch.view_as_real(t.resolve_conj().to(compute)).numpy()
    return r[..., 0], r[..., 1]


def _reference(op: str, a: torch.Tensor, b: torch.Tensor | complex, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The formula in numpy, one IEEE operation per step: (ac - bd) + (ad + bc)i, and c10's
    (Smith's) quotient, for a result of ``dtype``; complex32 in complex64, rounded once. A
    Python number is rounded once from double, as torch reads a scalar."""
    compute = torch.complex64 if dtype == torch.complex32 else dtype
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(b, dtype=torch.complex128)
    (x, y), (c, d) = _parts(a, compute), _parts(b, compute)
    x, y, c, d = np.broadcast_arrays(x, y, c, d)
    with np.errstate(all="ignore"):
        if op == "mul":
            re, im = x * c - y * d, x * d + y * c
        else:
            wide = np.abs(c) >= np.abs(d)
            ratio = np.where(wide, d / c, c / d)
            scale = np.ones_like(c) / np.where(wide, c + d * ratio, d + c * ratio)
            re = np.where(wide, (x + y * ratio) * scale, (x * ratio + y) * scale)
            im = np.where(wide, (y - x * ratio) * scale, (y * ratio - x) * scale)
            zero = (c == 0) & (d == 0)
            re, im = np.where(zero, x / np.abs(c), re), np.where(zero, y / np.abs(d), im)
    return re.astype(_PART[dtype]), im.astype(_PART[dtype])


def _assert_bits(got: torch.Tensor, want: tuple[np.ndarray, np.ndarray]) -> None:
    """Bit for bit, a NaN as any NaN (the mode writes one quiet NaN)."""
    parts = torch.view_as_real(got.to(torch.complex128)).numpy()
    for k, w in enumerate(want):
        g = parts[..., k].astype(w.dtype)
        nan = np.isnan(w)
        assert np.array_equal(np.isnan(g), nan), f"NaN in {int((np.isnan(g) != nan).sum())} other places"
        differ = (g.view(f"u{w.itemsize}") != w.view(f"u{w.itemsize}")) & ~nan
        assert not differ.any(), f"{int(differ.sum())} of {w.size} {'imaginary' if k else 'real'} parts differ"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor's bits, NaNs included (widening is exact and keeps them apart)."""
    return torch.view_as_real(t.to(torch.complex128)).view(torch.int64)


_SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3.5, 2.0**100, 1e-30]


@st.composite
def _complex(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    compute = torch.complex64 if dtype == torch.complex32 else dtype
    z = torch.randn(shape, generator=g, dtype=compute) * draw(st.sampled_from([1.0, 1e-3, 1e20]))
    flat = torch.view_as_real(z).reshape(-1)
    for i in draw(st.lists(st.integers(0, flat.numel() - 1), max_size=8)):
        flat[i] = draw(st.sampled_from(_SPECIALS))
    return z.to(dtype)


@pytest.mark.parametrize("form", ["tensors", "row_vector", "number", "real_operand", "conj", "transposed"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.complex32])
@settings(max_examples=10)
@given(
    data=st.data(),
    rows=st.integers(1, 12),
    cols=st.integers(1, 70),
    op=st.sampled_from(["mul", "div"]),
    seed=st.integers(0, 2**16),
)
def test_complex_products_and_quotients_are_the_formula_for_every_row_and_batch(
        data: st.DataObject, rows: int, cols: int, op: str, dtype: torch.dtype, form: str, seed: int) -> None:
    """Every operand form gives the formula's bits (numpy, one operation per step), and a
    row's result does not depend on how many rows are with it."""
    if dtype == torch.complex32 and op == "div":
        dtype = torch.complex64  # torch's CPU has no complex32 division
    x = data.draw(_complex((rows, cols), dtype, seed))
    y = data.draw(_complex((rows, cols), dtype, seed + 1))
    if form == "transposed":
        x = x.t().contiguous().t()  # column major: the rows are strided
    # the other operand for rows ``sl`` of x
    operand: Callable[[slice], Any] = {
        "tensors": lambda sl: y[sl], "transposed": lambda sl: y[sl],
        "row_vector": lambda sl: y[:1],  # freqs_cis: one row for every batch row
        # at double precision: torch rounds it once into the result's
        "number": lambda sl: complex(y[0, 0].to(torch.complex128).item()) * (1 + 1e-9j),
        "real_operand": lambda sl: y[:1].real.contiguous(),
        "conj": lambda sl: y[:1].conj(),
    }[form]

    def fn(sl: slice) -> torch.Tensor:
        return x[sl] * operand(sl) if op == "mul" else x[sl] / operand(sl)

    with detkit.batch_invariant(strict=True) as bi:
        whole = fn(slice(None))
        alone = [_bits(fn(slice(r, r + 1))) for r in range(rows)]
        for b in sorted({1, (rows + 1) // 2, rows}):
            part = fn(slice(0, b))
            for r in range(b):
                assert torch.equal(_bits(part[r : r + 1]), alone[r]), f"batch {b}, row {r}"
    _assert_bits(whole, _reference(op, x, operand(slice(None)), whole.dtype))
    assert set(bi.routed()) == {f"{op}.Tensor"} and bi.uncovered() == {}, bi.coverage()


def test_torchs_complex_products_and_quotients_change_with_position_and_the_modes_do_not() -> None:
    """Negative control: torch's complex128 product and complex64 quotient of an element
    alone and inside a tensor of 4,099 differ (its scalar path fuses multiply-adds; its
    vector quotient scales differently). Under the mode they do not, and the product in
    the vector body is torch's own."""
    g = torch.Generator().manual_seed(3)
    a128, b128 = (torch.randn(4099, dtype=torch.complex128, generator=g) for _ in range(2))
    a64, b64 = (torch.randn(4099, dtype=torch.complex64, generator=g) for _ in range(2))

    def changed(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> int:
        whole = torch.view_as_real(fn(a, b))
        alone = torch.view_as_real(torch.stack([fn(a[i : i + 1], b[i : i + 1])[0] for i in range(a.shape[0])]))
        return int((whole != alone).any(-1).sum())

    plain_product = a128 * b128
    assert changed(torch.mul, a128, b128) > 0, "negative control: torch's complex product was position independent"
    assert changed(torch.div, a64, b64) > 0, "negative control: torch's complex quotient was position independent"
    with detkit.batch_invariant(strict=True) as bi:
        assert changed(torch.mul, a128, b128) == 0 and changed(torch.div, a64, b64) == 0
        product = a128 * b128
    assert bi.routed()["mul.Tensor"] > 4099 and bi.uncovered() == {}
    body = 4099 // 64 * 64
    assert torch.equal(torch.view_as_real(product[:body]), torch.view_as_real(plain_product[:body]))


def test_in_place_out_and_real_calls() -> None:
    """mul_, div_, out= and /= give the functional result; real operands and Python
    numbers beside real tensors go to torch's kernel uncounted, with torch's result."""
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(33, 9, dtype=torch.complex64, generator=g) for _ in range(2))
    real, half = torch.randn(33, 9, generator=g), torch.randn(33, 9, generator=g).bfloat16()
    plain = [real * 2.5, real * True, half * 0.1, half / 3, torch.arange(6) * 2, real / real.flip(0)]
    with detkit.batch_invariant(strict=True) as bi:
        product, quotient = a * b, a / b
        into = torch.empty(0, dtype=torch.complex64)
        torch.mul(a, b, out=into)
        c, d = a.clone(), a.clone()
        c.mul_(b)
        d /= b
        under = [real * 2.5, real * True, half * 0.1, half / 3, torch.arange(6) * 2, real / real.flip(0)]
        with pytest.raises(RuntimeError):
            real.mul_(b)  # a complex result does not fit a real tensor: torch's error
    for x, y in ((into, product), (c, product), (d, quotient)):
        assert torch.equal(torch.view_as_real(x), torch.view_as_real(y))
    for x, y in zip(plain, under, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert set(bi.routed()) == {"mul.Tensor", "div.Tensor", "mul.out", "mul_.Tensor", "div_.Tensor"}, bi.coverage()
    # the in-place product that does not fit: torch's error, counted as passed through
    assert bi.uncovered() == {} and set(bi.coverage().passed_through) == {"mul_.Tensor"}, bi.coverage()


def test_a_complex_product_keeps_its_gradient() -> None:
    """The mode computes the values below autograd: the product's gradient (itself a
    complex product) is torch's formula, equal to plain torch's within rounding."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 8, dtype=torch.complex64, generator=g, requires_grad=True)
    b = torch.randn(4, 8, dtype=torch.complex64, generator=g)
    (plain,) = torch.autograd.grad((a * b).abs().sum(), a)
    with detkit.batch_invariant(strict=True):
        (under,) = torch.autograd.grad((a * b).abs().sum(), a)
    torch.testing.assert_close(under, plain)


def test_coverage_report_lists_complex_products_as_routed() -> None:
    """mul and div with a complex operand are routed on the CPU and in portable mode; on
    CUDA outside it torch's kernels compute every element alike (exact). Real ones are one
    IEEE operation (exact); a complex square (pow) is still torch's."""
    x = torch.randn(3, 5, dtype=torch.complex64)
    real = torch.randn(3, 5)
    _, ops = mode.trace_ops(lambda: (x * x, x / 2, x + x, x.square(), real * real / 3))
    report = mode.coverage_report(ops)
    assert {"mul.Tensor", "div.Tensor"} <= set(report.routed), str(report)
    assert "complex operands" in report.notes["mul.Tensor"]
    assert "add.Tensor" in report.exact and set(report.uncovered) == {"pow.Tensor_Scalar"}, str(report)
    _, real_ops = mode.trace_ops(lambda: real * real / 3)
    for device in ("CPU", "CUDA"):
        for portable in (False, True):
            assert {"mul.Tensor", "div.Tensor"} <= set(mode.coverage_report(real_ops, portable=portable,
                                                                            device=device).exact)
    assert "mul.Tensor" in mode.coverage_report(ops, device="CUDA").exact
    assert "mul.Tensor" in mode.coverage_report(ops, device="CUDA", portable=True).routed
    assert "mul.Tensor" in mode.coverage_report({"mul.Tensor": 1}).exact  # counts alone: by name


def test_a_complex_rope_model_generates_the_same_in_any_batch() -> None:
    """A tiny Llama 4 (RoPE as a complex product with freqs_cis from torch.polar, its
    attention temperature, MoE), equal-length prompts (its RoPE positions ignore left
    padding) alone and in batches of 2 and 5: token ids and every step's logits bit for
    bit, nothing left to torch; without the mode they differ."""
    transformers = pytest.importorskip("transformers")
    from test_hf_invariance import SSM_PROMPTS

    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
    from detkit.testing import BatchVariance, assert_generation_invariant

    config = transformers.AutoConfig.for_model(
        "llama4_text", vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, no_rope_layers=[1, 0], attn_temperature_tuning=True,
        floor_scale=2, initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with warnings.catch_warnings(), detkit.batch_invariant() as bi:
        warnings.simplefilter("ignore")
        assert_generation_invariant(model, SSM_PROMPTS, batch_sizes=(1, 2, 5), max_new_tokens=4)
    assert bi.routed()["mul.Tensor"] > 0 and bi.uncovered() == {}, bi.coverage()
    with pytest.raises(BatchVariance):  # negative control: 11 of 16 placements differed
        assert_generation_invariant(model, SSM_PROMPTS, batch_sizes=(1, 2, 5), max_new_tokens=4)
