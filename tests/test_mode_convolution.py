"""Convolutions under the mode: routed as products of their patches (im2col).

torch's CPU convolutions happened to be batch invariant on every shape measured, but
their bits change with oneDNN's instruction set (``ONEDNN_MAX_CPU_ISA``; see
``test_mode_portable.py`` for tiny Mamba's logits), and cuDNN picks its algorithm by
shape, batch size included. Routed, every output element is one row of a detkit matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import detkit
from detkit import kernels
from detkit.compare import diff

pytestmark = pytest.mark.usefixtures("mode_left_off")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def _rand(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(dtype)


def _assert_routed_close_and_invariant(conv: Callable[..., torch.Tensor], x: torch.Tensor, w: torch.Tensor,
                                       b: torch.Tensor | None, kw: dict[str, Any], p: dict[str, Any]) -> None:
    """``conv`` under the mode: routed once, torch's shape, within a rounding-error bound of
    the float64 result, and every batch entry's output the same bits alone, in every prefix
    of the batch and in the batch reversed."""
    with detkit.batch_invariant(portable=p["portable"], strict=True) as bi:
        y = conv(x, w, b, **kw)
        assert bi.routed().get("convolution") == 1 and bi.uncovered() == {}
        batches = [conv(x[:m], w, b, **kw) for m in range(1, p["n"])] + [conv(x.flip(0), w, b, **kw).flip(0)]
    ref = conv(x.double(), w.double(), None if b is None else b.double(), **kw)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous()
    # float32 accumulation of kvol products (+ bias), then one rounding to the dtype
    kvol = p["cg"] * math.prod(p["kernel"])
    scale = conv(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(), **kw)
    bound = (kvol + 1) * 2.0**-23 * scale + _EPS[p["dtype"]] * ref.abs() + 1e-30
    assert bool(((y.double() - ref).abs() <= bound).all()), float(((y.double() - ref).abs() / bound).max())
    for got in batches:
        d = diff(got, y[: got.shape[0]])
        assert d.ok, f"{p}:\n{d}"


@st.composite
def _problems(draw: st.DrawFn) -> dict[str, Any]:
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilation = [draw(st.integers(1, 2)) for _ in range(nd)]
    padding = [draw(st.integers(0, 2)) for _ in range(nd)]
    stride = [draw(st.integers(1, 2)) for _ in range(nd)]
    # long enough for at least one output position along every dim
    reach = [d * (k - 1) + 1 - 2 * p for k, d, p in zip(kernel, dilation, padding)]
    sizes = [draw(st.integers(max(1, r), max(1, r) + (9 if nd == 1 else 4))) for r in reach]
    return dict(nd=nd, n=draw(st.integers(1, 5)), groups=groups, cg=draw(st.integers(1, 3)), og=draw(st.integers(1, 3)),
                kernel=kernel, stride=stride, padding=padding, dilation=dilation, sizes=sizes, bias=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                portable=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@given(_problems())
def test_convolutions_are_routed_right_and_batch_invariant(p: dict[str, Any]) -> None:
    """Any 1-3-D convolution: routed, torch's shape, within a rounding-error bound of the
    float64 result, and every batch entry's output the same bits alone, in every prefix of
    the batch and in the batch reversed."""
    g = torch.Generator().manual_seed(p["seed"])
    c, o = p["cg"] * p["groups"], p["og"] * p["groups"]
    x = _rand((p["n"], c, *p["sizes"]), p["dtype"], g)
    w = _rand((o, p["cg"], *p["kernel"]), p["dtype"], g)
    b = _rand((o,), p["dtype"], g) if p["bias"] else None
    kw = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"])
    conv = _CONV[p["nd"]]
    _assert_routed_close_and_invariant(conv, x, w, b, kw, p)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_causal_depthwise_conv_gives_decode_the_prefill_bits(dtype: torch.dtype, portable: bool) -> None:
    """Mamba's conv (groups = channels, kernel 4, padding 3 and the tail cut): one conv over
    the sequence (prefill) and one conv per position over the last 4 inputs (decode, as HF
    Mamba's ``causal_conv1d_update``) give every position of every sequence the same bits,
    with and without a bias, and whatever the batch."""
    g = torch.Generator().manual_seed(5)
    channels, k, length = 96, 4, 21
    x = _rand((6, channels, length), dtype, g)
    w = _rand((channels, 1, k), dtype, g)
    for b in (None, _rand((channels,), dtype, g)):
        with detkit.batch_invariant(portable=portable, strict=True):
            prefill = F.conv1d(x, w, b, padding=k - 1, groups=channels)[..., :length]
            padded = F.pad(x, (k - 1, 0))
            decode = torch.stack([F.conv1d(padded[..., t : t + k], w, b, groups=channels)[..., 0]
                                  for t in range(length)], -1)
            alone = torch.cat([F.conv1d(x[i : i + 1], w, b, padding=k - 1, groups=channels)[..., :length]
                               for i in range(x.shape[0])])
        assert diff(decode, prefill).ok, diff(decode, prefill)
        assert diff(alone, prefill).ok, diff(alone, prefill)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_routed_convolution_is_the_documented_product_of_patches(dtype: torch.dtype, portable: bool) -> None:
    """The definition docs/mode.md gives, spelled out with detkit.kernels.matmul: groups = 1
    is the 2-D product of the patches with the bias the kernel's (F.linear's bits on the
    patches: a ViT patch embedding); groups > 1 a 3-D product over the groups, with a last
    column of ones against the bias."""
    g = torch.Generator().manual_seed(6)
    # ViT-style patch embedding: kernel = stride, so the patches are the image's tiles.
    img, w, b = _rand((2, 3, 8, 12), dtype, g), _rand((10, 3, 4, 4), dtype, g), _rand((10,), dtype, g)
    with detkit.batch_invariant(portable=portable):
        got = F.conv2d(img, w, b, stride=4)
    patches = img.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(12, 48)
    want = kernels.matmul(patches, w.reshape(10, 48).t(), b, portable=portable).reshape(2, 2, 3, 10).permute(0, 3, 1, 2)
    assert diff(got, want).ok, diff(got, want)
    # grouped: 6 channels in 3 groups, 2 filters each, kernel 3, padding 1
    x, w, b = _rand((2, 6, 7), dtype, g), _rand((6, 2, 3), dtype, g), _rand((6,), dtype, g)
    with detkit.batch_invariant(portable=portable):
        got = F.conv1d(x, w, b, padding=1, groups=3)
    windows = F.pad(x, (1, 1)).unfold(2, 3, 1)  # (2, 6, 7, 3)
    patches = windows.reshape(2, 3, 2, 7, 3).permute(1, 0, 3, 2, 4).reshape(3, 14, 6)
    patches = torch.cat([patches, torch.ones(3, 14, 1, dtype=dtype)], 2)
    filters = torch.cat([w.reshape(3, 2, 6), b.reshape(3, 2, 1)], 2).transpose(1, 2)
    want = kernels.matmul(patches, filters, portable=portable).reshape(3, 2, 7, 2).permute(1, 0, 3, 2).reshape(2, 6, 7)
    assert diff(got, want).ok, diff(got, want)


def test_unbatched_input_and_the_out_form() -> None:
    g = torch.Generator().manual_seed(7)
    x, w = _rand((4, 9), torch.float32, g), _rand((4, 1, 3), torch.float32, g)
    with detkit.batch_invariant(strict=True) as bi:
        got = F.conv1d(x, w, padding=1, groups=4)
        batched = F.conv1d(x[None], w, padding=1, groups=4)
        out = torch.empty(0)
        torch.ops.aten.convolution.out(x[None], w, None, [1], [1], [1], False, [0], 4, out=out)
    assert got.shape == (4, 9) and diff(got, batched[0]).ok
    assert diff(out, batched).ok
    assert bi.routed() == {"convolution": 2, "convolution.out": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_result_has_torchs_memory_format(dtype: torch.dtype) -> None:
    """torch's convolution returns channels_last (channels_last_3d) when its input or its
    weight is (a model moved to channels_last, usual for vision inference); the routed
    result used to be contiguous always, so a view that relies on the layout, such as the
    patch embedding's ``.permute(0, 2, 3, 1).view(n, h * w, c)``, raised under the mode only."""
    g = torch.Generator().manual_seed(10)
    cl = torch.channels_last
    x, w = _rand((2, 4, 9, 9), dtype, g), _rand((6, 4, 3, 3), dtype, g)
    xd, wd = _rand((2, 4, 5, 5, 5), dtype, g), _rand((3, 4, 3, 3, 3), dtype, g)
    cases = {
        "input": lambda: F.conv2d(x.to(memory_format=cl), w, padding=1),
        "weight": lambda: F.conv2d(x, w.to(memory_format=cl), padding=1),
        "both, grouped": lambda: F.conv2d(x.to(memory_format=cl), w[:, :2].to(memory_format=cl), padding=1, groups=2),
        "depthwise": lambda: F.conv2d(x.to(memory_format=cl), w[:4, :1].contiguous(), padding=1, groups=4),
        "sliced channels_last input": lambda: F.conv2d(x.to(memory_format=cl)[:, :, ::2], w, padding=1),
        "one pixel": lambda: F.conv2d(x[:1, :, :1, :1].to(memory_format=cl), w[:, :, :1, :1]),
        "contiguous": lambda: F.conv2d(x, w, padding=1),
        "1-D": lambda: F.conv1d(x[..., 0], w[..., 0]),
    }
    # torch's CPU conv3d returns channels_last_3d from oneDNN, contiguous from its slow path
    # (float16 without AVX512-FP16, float64); cuDNN returns channels_last_3d. The mode
    # follows oneDNN and cuDNN.
    if dtype in (torch.float32, torch.bfloat16):
        cases["3-D"] = lambda: F.conv3d(xd.to(memory_format=torch.channels_last_3d), wd)
    for name, conv in cases.items():
        want = conv()
        with detkit.batch_invariant(strict=True):
            got = conv()
        assert got.stride() == want.stride(), name
    with detkit.batch_invariant(strict=True):
        y, plain = cases["input"](), cases["contiguous"]()
        tokens = y.permute(0, 2, 3, 1).view(2, 81, 6)
    assert diff(y, plain).ok and diff(tokens, plain.flatten(2).transpose(1, 2)).ok  # the layout changes no bit


def test_a_large_convolution_is_computed_in_blocks_of_batch_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows of a patch product are the output positions of every batch entry. One CUDA
    product takes at most 65535 x 128 rows (its grid): past that the kernel refuses and
    the conv fell back to cuDNN, counted, for a large enough batch only (8 entries of a
    1024 x 1024 feature map routed, 9 did not); and the patches (the kernel volume times
    the input) were built for the whole batch at once. Blocks of batch entries keep every
    product below both limits and change no bit."""
    from detkit import _aten_adapters
    from detkit.errors import InputError

    g = torch.Generator().manual_seed(11)
    # Rows past the CUDA grid, in a product cheap enough here (depthwise, kernel 4, one channel).
    limit = 65535 * 128
    x, w, b = _rand((9, 1, limit // 8), torch.float32, g), _rand((1, 1, 4), torch.float32, g), _rand((1,), torch.float32, g)
    seen: list[int] = []

    def matmul(a: torch.Tensor, bm: torch.Tensor, bias: torch.Tensor | None = None, *, portable: bool) -> torch.Tensor:
        seen.append(a.shape[-2])
        if a.shape[-2] > limit:  # as detkit.kernels.cuda.matmul
            raise InputError(f"matmul: M = {a.shape[-2]} exceeds the kernel's grid limit")
        return kernels.matmul(a, bm, bias, portable=portable)

    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: SimpleNamespace(matmul=matmul))
    with detkit.batch_invariant(strict=True):
        got = F.conv1d(x, w, b, padding=3, groups=1)[..., : x.shape[-1]]
    assert max(seen) <= limit and len(seen) > 1
    monkeypatch.undo()
    with detkit.batch_invariant(strict=True):
        assert diff(got[:1], F.conv1d(x[:1], w, b, padding=3)[..., : x.shape[-1]]).ok
    # Blocks of entries give the bits of the whole product, grouped and dense, with a bias.
    x, w, b = _rand((5, 6, 11, 7), torch.bfloat16, g), _rand((6, 6, 3, 2), torch.bfloat16, g), _rand((6,), torch.bfloat16, g)
    for groups in (1, 2):
        with detkit.batch_invariant(strict=True):
            whole = F.conv2d(x, w[:, : 6 // groups], b, padding=1, groups=groups)
            monkeypatch.setattr(_aten_adapters, "_CONV_ROWS", 2 * 11 * 8)  # 2 entries a block
            blocks = F.conv2d(x, w[:, : 6 // groups], b, padding=1, groups=groups)
            monkeypatch.undo()
        assert diff(blocks, whole).ok, groups


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@st.composite
def _transposed_problems(draw: st.DrawFn) -> dict[str, Any]:
    nd = draw(st.integers(1, 3))
    stride = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilation = [draw(st.integers(1, 2)) for _ in range(nd)]
    kernel = [draw(st.integers(1, 4)) for _ in range(nd)]
    # output_padding below stride or dilation, as torch requires; padding may exceed
    # dilation * (kernel - 1) (a crop) while an output position is left
    output_padding = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
    padding = [draw(st.integers(0, 2)) for _ in range(nd)]
    sizes = [draw(st.integers(1, 7 if nd == 1 else 4)) for _ in range(nd)]
    if any((n - 1) * s + d * (k - 1) + op + 1 - 2 * p < 1
           for n, k, s, p, d, op in zip(sizes, kernel, stride, padding, dilation, output_padding)):
        padding = [0] * nd
    return dict(nd=nd, n=draw(st.integers(1, 5)), groups=draw(st.integers(1, 3)), cg=draw(st.integers(1, 3)),
                og=draw(st.integers(1, 3)), kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                output_padding=output_padding, sizes=sizes, bias=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                portable=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@given(_transposed_problems())
def test_transposed_convolutions_are_routed_right_and_batch_invariant(p: dict[str, Any]) -> None:
    """Any 1-3-D transposed convolution (stride, padding, output_padding, dilation,
    groups): routed as the ordinary convolution it equals, torch's shape, within a
    rounding-error bound of the float64 result, and every batch entry's output the same
    bits alone, in every prefix of the batch and in the batch reversed."""
    g = torch.Generator().manual_seed(p["seed"])
    c, o = p["cg"] * p["groups"], p["og"] * p["groups"]
    x = _rand((p["n"], c, *p["sizes"]), p["dtype"], g)
    w = _rand((c, p["og"], *p["kernel"]), p["dtype"], g)
    b = _rand((o,), p["dtype"], g) if p["bias"] else None
    kw = dict(stride=p["stride"], padding=p["padding"], output_padding=p["output_padding"], groups=p["groups"],
              dilation=p["dilation"])
    conv = _CONV_T[p["nd"]]
    _assert_routed_close_and_invariant(conv, x, w, b, kw, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchs_transposed_convolution_changes_with_the_batch_and_the_modes_does_not(dtype: torch.dtype) -> None:
    """An upsampling ConvTranspose2d (kernel 4, stride 2, padding 1: GAN generators, some
    vocoders' and decoders' upsampling): torch's CPU kernel gave batch prefixes other bits
    (negative control); routed, no prefix differs. Whether torch's own kernel changes
    depends on the CPU: on an Intel Xeon with AVX512-BF16 its bfloat16 kernel gave every
    prefix the same bits (for this and six other shapes tried), and there the negative
    control is reported as a skip after the routed check has run."""
    g = torch.Generator().manual_seed(12)
    x, w, b = _rand((16, 64, 16, 16), dtype, g), _rand((64, 32, 4, 4), dtype, g), _rand((32,), dtype, g)

    def prefixes_differing() -> int:
        full = F.conv_transpose2d(x, w, b, stride=2, padding=1)
        return sum(not torch.equal(F.conv_transpose2d(x[:m], w, b, stride=2, padding=1), full[:m])
                   for m in (1, 2, 3, 5, 8))

    torch_differs = prefixes_differing()
    with detkit.batch_invariant(strict=True):
        assert prefixes_differing() == 0
    if torch_differs == 0:
        pytest.skip(f"negative control: torch's {dtype} conv_transpose2d gave every batch prefix the same bits on "
                    "this CPU, so the routed check above (which passed) cannot show it fixes anything here")


_R = torch.randn
REFUSED: dict[str, Callable[[], torch.Tensor]] = {
    "channels that do not match the weight": lambda: F.conv1d(_R(1, 3, 9), _R(4, 2, 3)),
    "a kernel larger than the input": lambda: F.conv1d(_R(1, 2, 2), _R(4, 2, 3)),
    "a bias of the wrong size": lambda: F.conv1d(_R(1, 2, 9), _R(4, 2, 3), _R(3)),
    "a float64 bias for float32 operands": lambda: F.conv1d(_R(1, 2, 9), _R(4, 2, 3), _R(4).double()),
    # F.conv1d batches an unbatched input before aten.convolution, which refuses one
    "an unbatched input to aten.convolution": lambda: torch.ops.aten.convolution(
        _R(2, 9), _R(4, 2, 3), None, [1], [0], [1], False, [0], 1),
    "a transposed weight whose channels do not match": lambda: F.conv_transpose1d(_R(1, 3, 9), _R(4, 2, 3)),
    "an output_padding not below stride or dilation": lambda: F.conv_transpose1d(_R(1, 4, 9), _R(4, 2, 3), stride=2,
                                                                                   output_padding=2),
    "a transposed convolution with no output position": lambda: F.conv_transpose1d(_R(1, 4, 1), _R(4, 2, 1),
                                                                                     padding=1),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_convolutions_torch_refuses_raise_torchs_error(name: str) -> None:
    with pytest.raises(RuntimeError) as want:
        REFUSED[name]()
    with detkit.batch_invariant(strict=True) as bi, pytest.raises(RuntimeError) as got:
        REFUSED[name]()
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
    assert bi.uncovered() == {}


def test_empty_and_float64_convolutions() -> None:
    """An empty batch passes through (torch's empty result); float64 is routed to the
    float64 kernels like every other product."""
    w = torch.randn(4, 2, 3, dtype=torch.float64)
    with detkit.batch_invariant(strict=True) as bi:
        empty = F.conv1d(torch.randn(0, 2, 9, dtype=torch.float64), w)
        y = F.conv1d(torch.randn(3, 2, 9, dtype=torch.float64), w, padding=2)
    assert empty.shape == (0, 4, 7) and y.shape == (3, 4, 11)
    assert bi.routed().get("convolution") == 1 and bi.uncovered() == {}


@pytest.mark.parametrize("transposed", [False, True])
def test_gradients_flow_through_a_routed_convolution(transposed: bool) -> None:
    """The forward is routed under autograd; the backward is torch's formula."""
    g = torch.Generator().manual_seed(9)
    x = _rand((2, 3, 10, 10), torch.float32, g).requires_grad_()
    w = _rand((3, 5, 3, 3) if transposed else (5, 3, 3, 3), torch.float32, g).requires_grad_()
    b = _rand((5,), torch.float32, g).requires_grad_()

    def conv() -> torch.Tensor:
        return F.conv_transpose2d(x, w, b, stride=2, padding=1) if transposed else F.conv2d(x, w, b, padding=1)

    conv().square().sum().backward()
    want = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    with detkit.batch_invariant() as bi:
        conv().square().sum().backward()
    assert bi.routed().get("convolution") == 1
    for t, e in zip((x, w, b), want):
        torch.testing.assert_close(t.grad, e, rtol=1e-4, atol=1e-4)
