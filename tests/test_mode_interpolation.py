"""Interpolation under the mode: ``F.interpolate`` (linear, bilinear, bicubic, trilinear,
nearest, nearest-exact) and ``F.grid_sample`` (bilinear, nearest, bicubic; every padding
mode) are routed to ``detkit._interpolation``, which computes them in a written-down
order of IEEE operations.

Vision towers resample position tables with them (GLM-4V's bicubic ``grid_sample``,
HunYuan-VL's ``interpolate``, GOT-OCR2's linear resize). torch's CPU kernels give each
output from its own neighbours, but their bits are not fixed: measured here with torch
2.13, they change with the instruction set (its AVX2/AVX-512 builds fuse a product into
the next sum), bilinear's change with the thread count for three channels and with the
layout (a second formula for small outputs and channels-last inputs). The tests check the
routed result against an independent scalar reference of the documented order, bit for
bit; against torch's own kernel where torch computes that order (its DEFAULT build, in a
child process); and for batch, thread-count, layout and instruction-set invariance. The
towers themselves are tests/test_mode_vision.py's (GLM-4V) and the vision sweep's.
"""

from __future__ import annotations

import os
import re
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import isa_children

import detkit
from detkit import _interpolation
from detkit._testing_values import host_bits
from detkit.mode import coverage_report, trace_ops

pytestmark = pytest.mark.usefixtures("mode_left_off")

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MODES = {"linear": 1, "bilinear": 2, "bicubic": 2, "trilinear": 3}
_A = -0.75


# ----------------------------------------------------------------------------- scalar reference
# One output at a time, each IEEE operation on a numpy scalar of the working type (float32,
# or float64 for float64 inputs): the order docs/mode.md documents, written independently
# of detkit._interpolation.


def _near(x: Any) -> Any:
    return ((x * type(x)(_A + 2) - type(x)(_A + 3)) * x) * x + type(x)(1)


def _far(x: Any) -> Any:
    f = type(x)
    return ((x * f(_A) - f(5 * _A)) * x + f(8 * _A)) * x - f(4 * _A)


def _ref_axis(n_in: int, n_out: int, o: int, cubic: bool, align: bool, scale: float | None,
              f: type) -> list[tuple[int, Any]]:
    """(input index, weight) of output ``o`` along one axis."""
    if align:
        ratio = f(n_in - 1) / f(n_out - 1) if n_out > 1 else f(0)
        real = ratio * f(o)
    else:
        ratio = f(1.0 / scale) if scale is not None and scale > 0 else f(n_in) / f(n_out)
        real = ratio * (f(o) + f(0.5)) - f(0.5)
    if cubic:
        i = min(int(np.floor(real)), n_in - 1)
        t = min(max(real - f(i), f(0)), f(1))
        ws = [_far(t + f(1)), _near(t), _near(f(1) - t), _far((f(1) - t) + f(1))]
        return [(min(max(i - 1 + j, 0), n_in - 1), w) for j, w in enumerate(ws)]
    if n_in == n_out:
        return [(o, f(1)), (o, f(0))]
    real = f(0) if real < 0 else real
    i = min(int(np.floor(real)), n_in - 1)
    l1 = min(max(real - f(i), f(0)), f(1))
    return [(i, f(1) - l1), (i + (1 if i < n_in - 1 else 0), l1)]


def _ref_aa_weight(x: Any, cubic: bool) -> Any:
    """torch's antialiasing filter, in x's type: ``1 - |x|`` (bilinear), Keys' cubic of
    a = -0.5 (bicubic)."""
    f = type(x)
    x = abs(x)
    if not cubic:
        return f(1) - x if x < f(1) else f(0)
    if x < f(1):
        return ((f(1.5) * x - f(2.5)) * x) * x + f(1)
    if x < f(2):
        return ((f(-0.5) * x - f(-2.5)) * x + f(-4)) * x - f(-2)
    return f(0)


def _ref_aa_axis(n_in: int, n_out: int, o: int, cubic: bool, align: bool, scale: float | None,
                 f: type) -> tuple[int, list[Any]]:
    """(first input index, weights) of output ``o`` along one axis of an antialiased
    resize: UpSampleKernel.cpp's statements one at a time, each in its C++ type (the
    working type, or double where a double literal enters)."""
    if align:
        ratio = f(n_in - 1) / f(n_out - 1) if n_out > 1 else f(0)
    else:
        ratio = f(1.0 / scale) if scale is not None and scale > 0 else f(n_in) / f(n_out)
    half = 2.0 if cubic else 1.0
    support = f(half * float(ratio)) if ratio >= 1 else f(half)
    taps = int(np.ceil(support)) * 2 + 1
    center = f(float(ratio) * (o + 0.5))
    invscale = f(1.0 / float(ratio)) if ratio >= 1 else f(1)
    xmin = max(int(float(center - support) + 0.5), 0)
    xsize = min(max(min(int(float(center + support) + 0.5), n_in) - xmin, 0), taps)
    weights, total = [], f(0)
    for j in range(xsize):
        w = _ref_aa_weight(f((float(f(j + xmin) - center) + 0.5) * float(invscale)), cubic)
        weights.append(w)
        total = total + w
    if total != f(0):
        weights = [w / total for w in weights]
    return xmin, weights


@np.errstate(invalid="ignore", over="ignore")
def _ref_interpolate_aa(x: np.ndarray, out: list[int], mode: str, align: bool,
                        scales: list[float | None]) -> np.ndarray:
    """``x``: (N, C, H, W) in the working type; the antialiased resize in it: the last
    axis first, then the other, each only where its size changes."""
    f = x.dtype.type
    for axis in (3, 2):
        if out[axis - 2] == x.shape[axis]:
            continue
        moved = np.moveaxis(x, axis, -1)
        res = np.empty(moved.shape[:-1] + (out[axis - 2],), dtype=x.dtype)
        for o in range(out[axis - 2]):
            xmin, weights = _ref_aa_axis(x.shape[axis], out[axis - 2], o, mode == "bicubic", align,
                                         scales[axis - 2], f)
            for idx in np.ndindex(*moved.shape[:-1]):
                row = moved[idx]
                acc = row[min(xmin, len(row) - 1)] * (weights[0] if weights else f(0))
                for j in range(1, len(weights)):
                    acc = acc + row[xmin + j] * weights[j]
                res[idx + (o,)] = acc
        x = np.moveaxis(res, -1, axis)
    return x


@np.errstate(invalid="ignore", over="ignore")
def _ref_interpolate(x: np.ndarray, out: list[int], mode: str, align: bool, scales: list[float | None]) -> np.ndarray:
    """``x``: (N, C, *spatial) in the working type; the result in it."""
    f = x.dtype.type
    dims = len(out)
    res = np.empty(x.shape[:2] + tuple(out), dtype=x.dtype)
    for idx in np.ndindex(*out):
        taps = [_ref_axis(x.shape[2 + d], out[d], idx[d], mode == "bicubic", align, scales[d], f) for d in range(dims)]
        for nc in np.ndindex(*x.shape[:2]):
            def combine(d: int, prefix: tuple[int, ...]) -> Any:  # the last axis innermost
                acc = None
                for i, w in taps[d]:
                    v = x[nc + prefix + (i,)] if d == dims - 1 else combine(d + 1, prefix + (i,))
                    acc = v * w if acc is None else acc + v * w
                return acc
            res[nc + idx] = combine(0, ())
    return res


def _ref_coordinate(g: Any, size: int, padding: str, align: bool, f: type, unpadded: bool = False) -> Any:
    x = (g + f(1)) * (f(size - 1) / f(2)) if align else (g + f(1)) * (f(size) / f(2)) - f(0.5)
    return x if unpadded else _ref_pad(x, size, padding, align, f)


def _ref_pad(x: Any, size: int, padding: str, align: bool, f: type) -> Any:
    if padding == "reflection":
        if align and size <= 1:
            x = f(0)
        else:
            low, span2 = (f(0), f(size - 1) * f(2)) if align else (f(-0.5), f(size) * f(2))
            away = abs(x - low)
            extra = away - f(np.trunc(away / span2)) * span2
            x = (extra if extra <= span2 - extra or np.isnan(extra) else span2 - extra) + low
    if padding in ("border", "reflection"):
        x = min(max(x, f(0)) if not np.isnan(x) else f(0), f(size - 1))
    return x


@np.errstate(invalid="ignore", over="ignore")
def _ref_grid_sample(x: np.ndarray, grid: np.ndarray, mode: str, padding: str, align: bool) -> np.ndarray:
    f = x.dtype.type
    n, c, h, w = x.shape
    res = np.empty((n, c) + grid.shape[1:3], dtype=x.dtype)

    def value(b: int, ch: int, ix: Any, iy: Any) -> Any:
        if not (-1 < ix < w and -1 < iy < h):  # NaN compares false: outside
            return f(0)
        return x[b, ch, int(iy), int(ix)]

    for b, i, j in np.ndindex(n, *grid.shape[1:3]):
        gx, gy = f(grid[b, i, j, 0]), f(grid[b, i, j, 1])
        for ch in range(c):
            if mode == "bicubic":
                px, py = _ref_coordinate(gx, w, padding, align, f, True), _ref_coordinate(gy, h, padding, align, f, True)
                fx, fy = f(np.floor(px)), f(np.floor(py))
                tx, ty = px - fx, py - fy
                wx = [_far(tx + f(1)), _near(tx), _near(f(1) - tx), _far(f(2) - tx)]
                wy = [_far(ty + f(1)), _near(ty), _near(f(1) - ty), _far(f(2) - ty)]
                acc = None
                for r in range(4):
                    yy = f(np.trunc(_ref_pad(fy + f(r - 1), h, padding, align, f)))
                    row = None
                    for q in range(4):
                        xx = f(np.trunc(_ref_pad(fx + f(q - 1), w, padding, align, f)))
                        term = value(b, ch, xx, yy) * wx[q]
                        row = term if row is None else row + term
                    acc = row * wy[r] if acc is None else acc + row * wy[r]
                res[b, ch, i, j] = acc
                continue
            px, py = _ref_coordinate(gx, w, padding, align, f), _ref_coordinate(gy, h, padding, align, f)
            if mode == "nearest":
                res[b, ch, i, j] = value(b, ch, f(np.round(px)), f(np.round(py)))
                continue
            fx, fy = f(np.floor(px)), f(np.floor(py))
            we, no = px - fx, py - fy
            e, s = f(1) - we, f(1) - no
            corners = [(fx, fy, s * e), (fx + f(1), fy, s * we), (fx, fy + f(1), no * e), (fx + f(1), fy + f(1), no * we)]
            acc = None
            for cx, cy, wt in corners:
                term = value(b, ch, cx, cy) * wt
                acc = term if acc is None else acc + term
            res[b, ch, i, j] = acc
    return res


def _working(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).numpy()


def _rounded(ref: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    out = torch.from_numpy(ref).to(dtype)
    return out.masked_fill(out.isnan(), float("nan"))  # the canonical NaN


def _values(shape: tuple[int, ...], seed: int, dtype: torch.dtype, specials: bool) -> torch.Tensor:
    """Magnitudes 2^-8..2^8, so the order of the sums shows; NaN, ±inf and -0 if asked.
    Built from random integers only (torch's randn takes other code paths on other
    instruction sets, and the tests compare across them)."""
    g = torch.Generator().manual_seed(seed)
    mantissa = torch.randint(-(2**23), 2**23, shape, generator=g).double() * 2.0**-23
    x = (mantissa * torch.exp2(torch.randint(-8, 9, shape, generator=g).double())).float()
    if specials:
        flat = x.view(-1)
        picks = torch.randperm(flat.numel(), generator=g)[:4]
        for p, v in zip(picks.tolist(), (float("nan"), float("inf"), -float("inf"), -0.0)):
            flat[p] = v
    return x.to(dtype)


def _points(shape: tuple[int, ...], seed: int, spread: float = 1.2) -> torch.Tensor:
    """Grid coordinates uniform in [-spread, spread], from random integers."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-(2**24), 2**24, shape, generator=g).double() * (spread * 2.0**-24)).float()


# ----------------------------------------------------------------------------- the documented order


@st.composite
def _resizes(draw: st.DrawFn) -> dict[str, Any]:
    mode = draw(st.sampled_from(sorted(_MODES)))
    dims = _MODES[mode]
    size_in = [draw(st.integers(1, 6 if dims < 3 else 4)) for _ in range(dims)]
    align = draw(st.booleans())
    if draw(st.booleans()):
        factors = [draw(st.sampled_from([0.5, 0.75, 1.0, 1.3, 2.0, 2.5, 3.0])) for _ in range(dims)]
        if any(int(n * s) < 1 for n, s in zip(size_in, factors)):
            factors = [2.0] * dims
        kw: dict[str, Any] = dict(scale_factor=factors, recompute_scale_factor=draw(st.booleans()))
    else:
        kw = dict(size=[draw(st.integers(1, 9 if dims < 3 else 5)) for _ in range(dims)])
    return dict(mode=mode, size_in=size_in, align_corners=align, **kw)


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "channels_last" and x.dim() in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "transposed":  # batch and channels swapped in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@given(case=_resizes(), seed=st.integers(0, 2**16), specials=st.booleans(),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed"]))
def test_interpolate_is_routed_and_is_the_documented_order(dtype: torch.dtype, case: dict[str, Any], seed: int,
                                                          specials: bool, layout: str) -> None:
    """Every mode, size or scale factor (recomputed or not), ``align_corners``, float dtype
    and layout: one routed call, whose bits are the scalar reference's rounded once (NaN
    canonical), in torch's shape and strides."""
    case = dict(case)
    size_in = case.pop("size_in")
    x = _laid_out(_values((2, 2, *size_in), seed, dtype, specials), layout)
    with detkit.batch_invariant(strict=True) as bi:
        got = F.interpolate(x, **case)
    assert len(bi.routed()) == 1 and sum(bi.routed().values()) == 1, bi.coverage()
    out = list(got.shape[2:])
    scales: list[float | None] = [None] * len(out)
    if "scale_factor" in case and not case["recompute_scale_factor"]:
        scales = list(case["scale_factor"])
    want = _rounded(_ref_interpolate(_working(x), out, case["mode"], case["align_corners"], scales), dtype)
    assert (host_bits(got) == host_bits(want)).all(), (case, got, want)
    plain = F.interpolate(x, **case)
    assert got.shape == plain.shape and got.stride() == plain.stride(), (got.stride(), plain.stride())


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@given(mode=st.sampled_from(["bilinear", "bicubic"]), size_in=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       size_out=st.tuples(st.integers(1, 14), st.integers(1, 14)),
       factor=st.one_of(st.none(), st.sampled_from([0.25, 0.4, 0.5, 0.75, 1.5, 2.0])),
       recompute=st.booleans(), align=st.booleans(), seed=st.integers(0, 2**16), specials=st.booleans(),
       layout=st.sampled_from(["contiguous", "channels_last"]))
def test_antialiased_interpolate_is_routed_and_is_the_documented_order(
        dtype: torch.dtype, mode: str, size_in: tuple[int, int], size_out: tuple[int, int], factor: float | None,
        recompute: bool, align: bool, seed: int, specials: bool, layout: str) -> None:
    """``antialias=True``, bilinear and bicubic, down and up, by size or scale factor,
    ``align_corners``, float32 and float64, NaN and infinities among the values: one routed
    call, whose bits are the scalar reference's (torch's weights with the support widened
    by the downscale factor, normalised by their sum; the last axis first), in torch's
    shape and layout."""
    x = _laid_out(_values((2, 2, *size_in), seed, dtype, specials), layout)
    if factor is not None and min(int(n * factor) for n in size_in) < 1:
        factor = 2.0
    kw: dict[str, Any] = (dict(scale_factor=factor, recompute_scale_factor=recompute) if factor is not None
                          else dict(size=size_out))
    with detkit.batch_invariant(strict=True) as bi:
        got = F.interpolate(x, mode=mode, antialias=True, align_corners=align, **kw)
    assert bi.routed() == {f"_upsample_{mode}2d_aa": 1}, bi.coverage()
    scales: list[float | None] = [factor, factor] if factor is not None and not recompute else [None, None]
    want = _rounded(_ref_interpolate_aa(_working(x), list(got.shape[2:]), mode, align, scales), dtype)
    assert (host_bits(got) == host_bits(want)).all(), (kw, got, want)
    plain = F.interpolate(x, mode=mode, antialias=True, align_corners=align, **kw)
    assert got.shape == plain.shape and got.stride() == plain.stride(), (got.stride(), plain.stride())


def test_antialiased_16_bit_keeps_torchs_cpu_error() -> None:
    """torch's CPU kernel has no bfloat16 or float16 antialiased resize: under the mode
    the call still raises torch's own error (counted as passed through), not a result
    torch would not give."""
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(1, 2, 9, 9).to(dtype)
        with pytest.raises(RuntimeError) as outside:
            F.interpolate(x, size=(4, 4), mode="bilinear", antialias=True)
        with detkit.batch_invariant() as bi, pytest.raises(RuntimeError, match=re.escape(str(outside.value)[:30])):
            F.interpolate(x, size=(4, 4), mode="bilinear", antialias=True)
        assert bi.routed() == {} and "_upsample_bilinear2d_aa" in bi.coverage().passed_through, bi.coverage()


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@given(exact=st.booleans(), dims=st.integers(1, 3), seed=st.integers(0, 2**16), data=st.data(),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed"]))
def test_nearest_is_routed_and_copies_the_documented_element(dtype: torch.dtype, exact: bool, dims: int, seed: int,
                                                             data: st.DataObject, layout: str) -> None:
    """mode="nearest" and "nearest-exact", 1 to 3 dimensions: one routed call whose every
    output is the input element at ``min(floor(dst * s), in - 1)`` per axis
    (``floor((dst + 0.5) * s)`` for exact; ``s`` the float32 size ratio or ``1 /
    scale_factor``), a NaN as the canonical one. Without a given scale it is torch's own result
    (and strides); with one, torch's CPU kernel for channels-last and small 2-D outputs
    copies ``dst`` (or ``dst >> 1``) where the sizes come out equal (doubled) whatever the
    factor, which its generic CPU and its CUDA kernels do not."""
    size_in = [data.draw(st.integers(1, 7)) for _ in range(dims)]
    if data.draw(st.booleans()):
        factors = [data.draw(st.sampled_from([0.5, 1.0, 1.0001, 1.5, 2.0, 2.0001, 3.0])) for _ in range(dims)]
        factors = factors if all(int(n * f) >= 1 for n, f in zip(size_in, factors)) else [2.0] * dims
        case: dict[str, Any] = dict(scale_factor=factors, recompute_scale_factor=data.draw(st.booleans()))
    else:
        case = dict(size=[data.draw(st.integers(1, 12)) for _ in range(dims)])
    x = _laid_out(_values((2, 2, *size_in), seed, dtype, True), layout)
    mode = "nearest-exact" if exact else "nearest"
    with detkit.batch_invariant(strict=True) as bi:
        got = F.interpolate(x, mode=mode, **case)
    assert sum(bi.routed().values()) == 1, bi.coverage()
    given_scales = "scale_factor" in case and not case["recompute_scale_factor"]
    want = x
    for d in range(dims):
        ratio = (np.float32(1.0 / case["scale_factor"][d]) if given_scales
                 else np.float32(size_in[d]) / np.float32(got.shape[2 + d]))
        dst = np.arange(got.shape[2 + d], dtype=np.float32)
        index = np.minimum(np.floor((dst + np.float32(0.5) if exact else dst) * ratio), size_in[d] - 1)
        want = want.index_select(2 + d, torch.from_numpy(index.astype(np.int64)))
    want = want.masked_fill(want.isnan(), float("nan"))  # the canonical NaN
    assert (host_bits(got) == host_bits(want)).all(), (mode, case)
    if not given_scales:  # torch's bits, but a NaN's sign and payload (16-bit: the same too)
        plain = F.interpolate(x, mode=mode, **case)
        assert torch.equal(got.isnan(), plain.isnan()) and got.stride() == plain.stride(), (mode, case)
        assert (host_bits(got)[~got.isnan().numpy()] == host_bits(plain)[~plain.isnan().numpy()]).all(), (mode, case)


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@given(mode=st.sampled_from(["bilinear", "nearest", "bicubic"]), padding=st.sampled_from(["zeros", "border",
       "reflection"]), align=st.booleans(), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1.0, 1.3, 4.0, 0.0]), specials=st.booleans(), chunk=st.sampled_from([1 << 18, 4, 9]),
       layout=st.sampled_from(["contiguous", "channels_last", "transposed"]))
def test_grid_sample_is_routed_and_is_the_documented_order(dtype: torch.dtype, mode: str, padding: str, align: bool,
                                                          h: int, w: int, seed: int, spread: float,
                                                          specials: bool, chunk: int, layout: str) -> None:
    """Every mode, padding mode and ``align_corners``, points inside and far outside the
    image, or (spread 0) within 2^-20..1 of its corner, where coordinates carry fine bits
    that expose a product or sum in another order (and NaN among them), the points
    combined all at once or a few at a time, any layout: one routed call, the scalar
    reference's bits, torch's strides."""
    x = _values((2, 2, h, w), seed, dtype, specials)
    g = torch.Generator().manual_seed(seed + 1)
    if spread:
        grid = ((torch.rand(2, 3, 4, 2, generator=g) * 2 - 1) * spread).to(dtype)
    else:
        grid = (torch.rand(2, 3, 4, 2, generator=g) * torch.exp2(-torch.randint(0, 21, (2, 3, 4, 2), generator=g))
                - 1).to(dtype)
    if specials:
        grid[1, 0, 0, 0] = float("nan")
    x, grid = _laid_out(x, layout), _laid_out(grid, layout)
    # a small chunk: the 12 points of each image combined a few at a time
    with mock.patch.object(_interpolation, "_CHUNK_ELEMENTS", chunk), detkit.batch_invariant(strict=True) as bi:
        got = F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align)
    assert bi.routed() == {"grid_sampler_2d": 1}, bi.coverage()
    want = _rounded(_ref_grid_sample(_working(x), _working(grid), mode, padding, align), dtype)
    assert (host_bits(got) == host_bits(want)).all(), (mode, padding, align, got, want)
    assert got.stride() == F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align).stride()


def test_torch_refusals_are_still_torchs() -> None:
    """What torch refuses (a grid of another dtype or batch, an output size of 0) it still
    refuses under the mode, with its own message."""
    x = torch.randn(1, 2, 4, 4)
    calls = [lambda: F.grid_sample(x, torch.zeros(1, 2, 2, 2, dtype=torch.float64), align_corners=False),
             lambda: torch.ops.aten.upsample_bilinear2d(x, [0, 3], False),
             lambda: F.grid_sample(x, torch.zeros(2, 2, 2, 2), align_corners=False)]
    for call in calls:
        with pytest.raises(RuntimeError) as outside:
            call()
        with detkit.batch_invariant(), pytest.raises(RuntimeError, match=re.escape(str(outside.value)[:40])):
            call()


# ----------------------------------------------------------------------------- invariance


def _ops(x: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
    return [F.interpolate(x[:, :, 0], size=13, mode="linear"),
            F.interpolate(x, size=(11, 9), mode="bilinear"),
            F.interpolate(x, size=(70, 70), mode="bilinear", align_corners=True),
            F.interpolate(x, size=(11, 9), mode="bicubic"),
            F.interpolate(x[:, :, None].expand(-1, -1, 3, -1, -1), size=(4, 9, 7), mode="trilinear"),
            *(F.grid_sample(x, grid[: x.shape[0]], mode=m, padding_mode=p, align_corners=False)
              for m, p in (("bilinear", "zeros"), ("nearest", "reflection"), ("bicubic", "border"))),
            F.interpolate(x, size=(13, 5), mode="nearest-exact"),
            # antialiased: float32 and float64 only (torch's CPU kernel has no 16-bit form)
            *((F.interpolate(x, size=(3, 5), mode="bilinear", antialias=True),
               F.interpolate(x, size=(4, 11), mode="bicubic", antialias=True))
              if x.dtype in (torch.float32, torch.float64) else ())]


def test_each_image_is_the_same_alone_and_at_every_place_in_every_batch() -> None:
    """Batches of 1 to 7 images at every offset, both modes: every image's outputs of
    every routed interpolation are the same bits as alone."""
    x = _values((7, 3, 6, 8), 0, torch.float32, False)
    grid = _points((7, 5, 6, 2), 1)
    for portable in (False, True):
        with detkit.batch_invariant(portable=portable, strict=True) as bi:
            alone = [_ops(x[i:i + 1], grid[i:i + 1]) for i in range(7)]
            for n in range(2, 8):
                for start in range(0, 8 - n):
                    batch = _ops(x[start:start + n], grid[start:start + n])
                    for i in range(n):
                        for k, (b, a) in enumerate(zip(batch, alone[start + i])):
                            assert (host_bits(b[i]) == host_bits(a[0])).all(), (portable, n, start, i, k)
        assert bi.not_portable() == {} and bi.uncovered() == {}, bi.coverage()


def test_bilinear_bits_do_not_depend_on_threads_or_layout() -> None:
    """An RGB image resized bilinearly: torch's CPU kernel takes another formula on one
    thread than on two, and for a channels-last input of four channels (measured with
    torch 2.13: about half the outputs differ; the negative control). Routed, the bits
    are the same on one thread and two, contiguous and channels-last."""
    x = _values((2, 3, 37, 41), 2, torch.float32, False)
    x4 = _values((2, 4, 37, 41), 3, torch.float32, False)
    threads = torch.get_num_threads()
    try:
        results: dict[str, list[torch.Tensor]] = {"torch": [], "routed": []}
        for n in (1, 2):
            torch.set_num_threads(n)
            results["torch"].append(F.interpolate(x, size=(90, 100), mode="bilinear"))
            with detkit.batch_invariant(strict=True):
                results["routed"].append(F.interpolate(x, size=(90, 100), mode="bilinear"))
    finally:
        torch.set_num_threads(threads)
    last = x4.contiguous(memory_format=torch.channels_last)
    torch_layouts = [F.interpolate(t, size=(90, 100), mode="bilinear") for t in (x4, last)]
    with detkit.batch_invariant(strict=True):
        routed_layouts = [F.interpolate(t, size=(90, 100), mode="bilinear") for t in (x4, last)]
    assert (host_bits(results["routed"][0]) == host_bits(results["routed"][1])).all()
    assert (host_bits(routed_layouts[0]) == host_bits(routed_layouts[1])).all()
    assert routed_layouts[1].is_contiguous(memory_format=torch.channels_last)  # torch's layout rule
    assert (host_bits(results["torch"][0]) != host_bits(results["torch"][1])).any(), "negative control: threads"
    assert (host_bits(torch_layouts[0]) != host_bits(torch_layouts[1])).any(), "negative control: layout"


def test_gradients_flow_through_the_routed_interpolation() -> None:
    """The route runs below autograd: torch's backward formulas still apply, so the
    gradients are torch's."""
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    grid = (torch.rand(2, 4, 4, 2) * 2 - 1).requires_grad_()
    grads = []
    for routed in (False, True):
        x.grad = grid.grad = None
        if routed:
            with detkit.batch_invariant():
                loss = F.interpolate(x, size=(7, 8), mode="bicubic").sum() + F.grid_sample(x, grid, align_corners=False).sum()
        else:
            loss = F.interpolate(x, size=(7, 8), mode="bicubic").sum() + F.grid_sample(x, grid, align_corners=False).sum()
        loss.backward()
        grads.append((x.grad.clone(), grid.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])


def test_interpolation_is_classed_routed_in_both_modes() -> None:
    """coverage_report: the traced upsample and grid_sampler ops are routed, in float32
    and float64 (computed in a fixed order in float64 too), for both modes."""
    for dtype in (torch.float32, torch.float64):
        x, grid = torch.randn(2, 3, 8, 8, dtype=dtype), torch.rand(2, 4, 4, 2, dtype=dtype)

        def interpolation() -> None:
            F.grid_sample(x, grid, mode="bicubic", align_corners=False)
            F.interpolate(x, size=(5, 5), mode="bilinear")
            F.interpolate(x, size=(5, 5), mode="bicubic")
            F.interpolate(x[:, :, 0], size=5, mode="linear")
            F.interpolate(x, size=(5, 5), mode="nearest")
            F.interpolate(x, size=(3, 5), mode="bilinear", antialias=True)
            F.interpolate(x, size=(3, 5), mode="bicubic", antialias=True)

        _, ops = trace_ops(interpolation)
        for portable in (False, True):
            report = coverage_report(ops, portable=portable)
            assert report.uncovered == {} and report.not_portable == {}, (dtype, report)
            assert {"grid_sampler_2d.default", "upsample_bilinear2d.default", "upsample_bicubic2d.default",
                    "upsample_linear1d.default", "upsample_nearest2d.default", "_upsample_bilinear2d_aa.default",
                    "_upsample_bicubic2d_aa.default"} <= set(report.routed), report


# ----------------------------------------------------------------------------- instruction sets

_CHILD = r"""
import hashlib, json, sys
import torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import detkit
from test_mode_interpolation import _ops, _points, _values
x, grid = _values((3, 3, 6, 8), 5, torch.float32, False), _points((3, 5, 6, 2), 6)
h = lambda ts: hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in ts)).hexdigest()
out = {"capability": torch.backends.cpu.get_cpu_capability()}
torch.set_num_threads(2)
for dtype in (torch.float32, torch.float64):
    xd, gd = x.to(dtype), grid.to(dtype)
    off = _ops(xd, gd)
    with detkit.batch_invariant():
        routed = _ops(xd, gd)
    # torch's kernels that compute the documented order (bilinear's generic kernel: an
    # output of more than 128 rows and columns, contiguous, on two threads)
    same = [torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)) for a, b in zip(off, routed)]
    out[str(dtype)] = {"torch": h(off), "routed": h(routed), "same": same}
print(json.dumps(out))
"""


def test_routed_bits_are_the_same_under_every_instruction_set() -> None:
    """The routed interpolations give the same bits with torch's vector kernels and with
    its DEFAULT (scalar) ones, in float32 and float64. torch's DEFAULT build fuses no
    product into a sum, and there its own kernels give the documented order's bits
    (linear, trilinear, bicubic, bilinear's generic kernel, every grid_sample mode; not
    bilinear's second formula, for outputs of at most 128 rows plus columns). Negative
    control: torch's own bits change with the instruction set (all but nearest)."""
    runs = isa_children(_CHILD, [os.path.dirname(__file__)], {"host": {}, "default": {"ATEN_CPU_CAPABILITY": "default"}})
    host, scalar = runs["host"], runs["default"]
    assert scalar["capability"] == "DEFAULT"
    for dtype in ("torch.float32", "torch.float64"):
        assert host[dtype]["routed"] == scalar[dtype]["routed"], dtype
        assert scalar[dtype]["same"] == [True, False, True, True, True, True, True, True, True, True, True], dtype
        if host["capability"] != "DEFAULT":
            assert host[dtype]["torch"] != scalar[dtype]["torch"], dtype
