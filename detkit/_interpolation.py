"""Interpolation in a fixed order of IEEE operations: ``F.interpolate`` (linear,
bilinear, bicubic, trilinear; nearest and nearest-exact as copies) and ``F.grid_sample``
(bilinear, nearest, bicubic), as the mode routes them.

Vision towers resample position-embedding tables with these (GLM-4V's bicubic
``grid_sample``, HunYuan-VL's ``interpolate``, GOT-OCR2's linear resize of relative
positions). torch's kernels compute each output from its own neighbours, so no other
image enters it, but their bits are not fixed: measured with torch 2.13 on the CPU, they
change with the instruction set (its AVX2 and AVX-512 builds fuse a product into the next
sum, its DEFAULT build does not), and bilinear's with the thread count and the layout (a
second formula, of products of the two axes' weights, for small outputs, channels-last
inputs and RGB images on one thread). Its CUDA kernels are other code again. Here every
step is one torch elementwise operation: an IEEE product, sum, difference or quotient
rounded once, or an exact ``floor``/``trunc``/``round``/clamp/select (a sum with
``alpha = -1`` included: its product is exact). Such an operation gives the same bits on
every CPU instruction set and on CUDA, so the result does too. The formulas and their
order are those of torch's CPU kernels (its vectorised grid sampler; for ``interpolate``,
``UpSample.h``'s weights and the separable ``t0 * w0 + t1 * w1``) with every product and
sum rounded: torch's DEFAULT build gives these bits, except by bilinear's second formula.

Arithmetic is in float32 for float32, bfloat16 and float16 inputs (rounded once at the
end by the caller; torch's CPU ``interpolate`` also rounds its weights to the 16-bit
dtype, these stay float32), in float64 for float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from detkit._ieee import divided

__all__ = ["grid_sample_in_order", "upsample_aa_in_order", "upsample_in_order", "upsample_nearest"]

# The cubic convolution constant of torch's bicubic modes (UpSample.h, GridSamplerKernel.cpp).
_A = -0.75
# grid_sample's values are combined this many at a time (float32: 1 MiB, in cache).
_CHUNK_ELEMENTS = 1 << 18


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch's opmath type: float32 for the 16-bit floats."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _rounded(value: float, wide: torch.dtype) -> float:
    """``value`` rounded to ``wide`` (a Python float holds it exactly)."""
    return float(np.float32(value)) if wide == torch.float32 else float(value)


def _quotient(a: int | float, b: int | float, wide: torch.dtype) -> float:
    """``a / b`` in ``wide``: both operands converted to it, one rounded division."""
    if wide == torch.float32:
        return float(np.float32(a) / np.float32(b))
    return float(a) / float(b)


# ----------------------------------------------------------------------------- interpolate


def _axis_scale(in_size: int, out_size: int, align_corners: bool, scale: float | None, wide: torch.dtype) -> float:
    """torch's ``area_pixel_compute_scale``: the step in input coordinates per output index."""
    if align_corners:
        return _quotient(in_size - 1, out_size - 1, wide) if out_size > 1 else 0.0
    if scale is not None and scale > 0:
        return _rounded(1.0 / scale, wide)  # a double quotient, rounded once to wide
    return _quotient(in_size, out_size, wide)


def _source_index(out_size: int, ratio: float, align_corners: bool, wide: torch.dtype) -> torch.Tensor:
    """torch's ``area_pixel_compute_source_index`` (before its clamp at 0)."""
    dst = torch.arange(out_size, dtype=wide)
    if align_corners:
        return dst * ratio
    return (dst + 0.5) * ratio - 0.5


def _cubic_near(x: torch.Tensor) -> torch.Tensor:
    """``((A + 2) x - (A + 3)) x x + 1``: the weight of a neighbour at distance ``x <= 1``."""
    return ((x * (_A + 2) - (_A + 3)) * x) * x + 1


def _cubic_far(x: torch.Tensor) -> torch.Tensor:
    """``((A x - 5 A) x + 8 A) x - 4 A``: the weight of a neighbour at distance ``1 < x < 2``."""
    return ((x * _A - 5 * _A) * x + 8 * _A) * x - 4 * _A


def _axis_taps(in_size: int, out_size: int, mode: str, align_corners: bool, scale: float | None,
               wide: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (input index, weight) pairs each output index along one axis combines, in the
    order they are added: two for linear, four for cubic. Computed on the CPU (their
    bits so do not depend on the device)."""
    ratio = _axis_scale(in_size, out_size, align_corners, scale, wide)
    real = _source_index(out_size, ratio, align_corners, wide)
    if mode == "cubic":
        # UpSample.h's guard_index_and_lambda; the taps at index - 1 .. index + 2 read clamped
        index = torch.floor(real).clamp(max=in_size - 1)
        t = (real - index).clamp(0, 1)
        one_minus = 1 - t
        weights = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(one_minus), _cubic_far(one_minus + 1))
        base = index.to(torch.int64)
        return [((base + j - 1).clamp(0, in_size - 1), w) for j, w in enumerate(weights)]
    if out_size == in_size:  # torch's shortcut: weights 1 and 0 on the same element
        same = torch.arange(out_size)
        return [(same, torch.ones(out_size, dtype=wide)), (same, torch.zeros(out_size, dtype=wide))]
    real = torch.where(real < 0, 0, real)
    index = torch.floor(real).clamp(max=in_size - 1)
    lambda1 = (real - index).clamp(0, 1)
    first = index.to(torch.int64)
    second = first + (first < in_size - 1).to(torch.int64)
    return [(first, 1 - lambda1), (second, lambda1)]


def _sum_in_order(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``((t0 + t1) + t2) + ...``: each sum rounded, left to right."""
    it = iter(terms)
    out = next(it)
    for term in it:
        out = out + term
    return out


def _combine(x: torch.Tensor, dim: int, taps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Along ``dim``: ``x[i0] * w0 + x[i1] * w1 + ...``, each product and sum rounded, left to right."""
    shape = [1] * x.dim()
    shape[dim] = -1
    return _sum_in_order(x.index_select(dim, index.to(x.device)) * weight.to(x.device).view(shape)
                         for index, weight in taps)


def upsample_in_order(x: torch.Tensor, out_sizes: Sequence[int], mode: str, align_corners: bool,
                      scales: Sequence[float | None]) -> torch.Tensor:
    """``F.interpolate`` of the last ``len(out_sizes)`` dimensions of ``x`` with ``mode``
    ``"linear"`` (one to three dimensions: linear, bilinear, trilinear) or ``"cubic"``
    (bicubic), ``antialias=False``, in ``wide_dtype(x.dtype)``.

    Per axis, torch's weights: the source coordinate ``(dst + 0.5) * scale - 0.5``
    (``dst * scale`` with ``align_corners``), ``scale`` the input/output size ratio rounded
    once (or ``1 / scale_factor``); linear clamps it at 0 and weights ``1 - l, l``,
    cubic weights its four neighbours with the cubic convolution of ``A = -0.75``. Then
    separably, the last axis first: ``t = x0 * w0 + x1 * w1 (+ x2 * w2 + x3 * w3)``,
    each product and sum rounded, left to right; the next axis combines those ``t`` the
    same way. The result is in the wide dtype (the caller rounds it).
    """
    wide = wide_dtype(x.dtype)
    out = x.to(wide)
    dims = len(out_sizes)
    for axis in reversed(range(dims)):
        dim = x.dim() - dims + axis
        taps = _axis_taps(x.shape[dim], out_sizes[axis], mode, align_corners, scales[axis], wide)
        out = _combine(out, dim, taps)
    return out


# The cubic convolution constant of torch's antialiased bicubic (Keys' -0.5, as PIL).
_A_AA = -0.5


def _aa_filter(x: np.ndarray, mode: str) -> np.ndarray:
    """torch's ``aa_filter`` of ``UpSampleKernel.cpp`` in ``x``'s type, each operation rounded:
    ``1 - |x|`` inside 1 (linear); Keys' cubic of ``a = -0.5`` inside 1 and 2 (cubic)."""
    f = x.dtype.type
    x = np.abs(x)
    if mode == "linear":
        return np.where(x < f(1), f(1) - x, f(0))
    near = ((f(_A_AA + 2) * x - f(_A_AA + 3)) * x) * x + f(1)
    far = ((f(_A_AA) * x - f(5 * _A_AA)) * x + f(8 * _A_AA)) * x - f(4 * _A_AA)
    return np.where(x < f(1), near, np.where(x < f(2), far, f(0)))


def _aa_axis_taps(in_size: int, out_size: int, mode: str, align_corners: bool, scale: float | None,
                  wide: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (input index, weight, taken) triples of one axis of an antialiased resize, in
    the order they are added, computed on the CPU as torch's
    ``_compute_indices_min_size_weights_aa`` computes them in the working type: the
    filter's support widened by the downscale factor, ``center = scale * (i + 0.5)``
    (a double product rounded once), the taps ``xmin .. xmin + xsize - 1`` around it, each
    weight ``filter((j + xmin - center + 0.5) / scale)``, then divided by their sequential
    sum. ``taken`` is False past a row's ``xsize`` (those taps add nothing)."""
    f = np.float32 if wide == torch.float32 else np.float64
    ratio = f(_axis_scale(in_size, out_size, align_corners, scale, wide))
    half_width = 1.0 if mode == "linear" else 2.0
    support = f(half_width * float(ratio)) if ratio >= 1 else f(half_width)
    taps = int(np.ceil(support)) * 2 + 1
    invscale = f(1.0 / float(ratio)) if ratio >= 1 else f(1)
    center = (np.float64(ratio) * (np.arange(out_size, dtype=np.float64) + 0.5)).astype(f)
    xmin = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    xsize = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, taps)
    weights, total = [], np.zeros(out_size, dtype=f)
    for j in range(taps):
        # (j + xmin - center) in the working type, + 0.5 and * invscale in double, then
        # rounded once as the filter's argument
        arg = (((j + xmin).astype(f) - center).astype(np.float64) + 0.5) * np.float64(invscale)
        w = np.where(j < xsize, _aa_filter(arg.astype(f), mode), f(0))
        total = np.where(j < xsize, total + w, total)
        weights.append(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = [np.where((j < xsize) & (total != 0), w / total, w) for j, w in enumerate(weights)]
    dtype = torch.float32 if f is np.float32 else torch.float64
    return [(torch.from_numpy(np.clip(xmin + j, 0, in_size - 1)), torch.from_numpy(w).to(dtype),
             torch.from_numpy(j < xsize) if j else torch.ones(out_size, dtype=torch.bool))
            for j, w in enumerate(weights)]


def upsample_aa_in_order(x: torch.Tensor, out_sizes: Sequence[int], mode: str, align_corners: bool,
                         scales: Sequence[float | None]) -> torch.Tensor:
    """``F.interpolate(..., antialias=True)`` of the last two dimensions of ``x``,
    ``mode`` ``"linear"`` (bilinear) or ``"cubic"`` (bicubic), in ``wide_dtype(x.dtype)``,
    in the order of torch's separable CPU kernel: the last axis first, then the other,
    each only where its size changes (equal shapes are a copy); per output ``t = x0 * w0``,
    then ``t = t + xj * wj`` for its taps in order, each product and sum rounded
    (:func:`_aa_axis_taps` for the weights). The result is in the wide dtype."""
    wide = wide_dtype(x.dtype)
    out = x.to(wide)
    for axis in (1, 0):
        dim = x.dim() - 2 + axis
        if out_sizes[axis] == x.shape[dim]:
            continue
        taps = _aa_axis_taps(x.shape[dim], out_sizes[axis], mode, align_corners, scales[axis], wide)
        n_taps, n_out = len(taps), out_sizes[axis]
        index, weight, taken = (torch.stack(parts).to(x.device) for parts in zip(*taps))
        # every tap's products at once (one gather, one multiply: each product rounded
        # once, as alone), then the sums in tap order
        split = list(out.shape[:dim]) + [n_taps, n_out] + list(out.shape[dim + 1:])
        shape = [1] * dim + [n_taps, n_out] + [1] * (x.dim() - dim - 1)
        terms = out.index_select(dim, index.reshape(-1)).reshape(split) * weight.view(shape)
        taken = taken.view(shape)
        acc = terms.select(dim, 0)
        for j in range(1, n_taps):
            acc = torch.where(taken.select(dim, j), acc + terms.select(dim, j), acc)
        out = acc
    return out


def _nearest_index(in_size: int, out_size: int, scale: float | None, exact: bool) -> torch.Tensor:
    """The input index each output index copies: ``floor(dst * s)``, or ``floor((dst +
    0.5) * s)`` for nearest-exact, in float32 with ``s`` the size ratio (or ``1 /
    scale_factor``) rounded once, clamped to ``in - 1``. torch's CUDA kernels and its
    generic CPU kernel compute these; its CPU kernel for channels-last (and small 2-D)
    outputs copies ``dst`` for equal sizes and ``dst >> 1`` for doubled ones whatever a
    given ``scale_factor`` says (``UpSample.h``'s ``nearest_idx``)."""
    ratio = _rounded(1.0 / scale, torch.float32) if scale is not None and scale > 0 else _quotient(
        in_size, out_size, torch.float32)
    dst = torch.arange(out_size, dtype=torch.float32)
    return torch.floor((dst + 0.5 if exact else dst) * ratio).to(torch.int64).clamp(max=in_size - 1)


def upsample_nearest(x: torch.Tensor, out_sizes: Sequence[int], scales: Sequence[float | None],
                     exact: bool) -> torch.Tensor:
    """``F.interpolate`` with ``mode="nearest"`` (or ``"nearest-exact"``) of the last
    ``len(out_sizes)`` dimensions of ``x``: each output a copy of the input element that
    :func:`_nearest_index` picks per axis, so the same bits on every device (no
    arithmetic on the values)."""
    dims = len(out_sizes)
    out = x
    for axis in range(dims):
        dim = x.dim() - dims + axis
        index = _nearest_index(x.shape[dim], out_sizes[axis], scales[axis], exact)
        out = out.index_select(dim, index.to(x.device))
    return out


# ----------------------------------------------------------------------------- grid_sample


class _Axis:
    """One axis of the grid sampler: torch's vectorised CPU ``ComputeLocation``."""

    def __init__(self, size: int, padding: str, align_corners: bool, wide: torch.dtype) -> None:
        self.size, self.padding, self.align_corners = size, padding, align_corners
        if align_corners:
            self.scaling = _quotient(size - 1, 2, wide)
            self.low, self.twice_span = 0.0, _rounded(float(size - 1) * 2, wide)
        else:
            self.scaling = _quotient(size, 2, wide)
            self.low, self.twice_span = -0.5, _rounded(float(size) * 2, wide)

    def unnormalize(self, g: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` to pixel coordinates: ``(g + 1) * (size - 1) / 2`` with corners
        aligned, ``(g + 1) * size / 2 - 0.5`` without (the factor rounded once)."""
        x = (g + 1) * self.scaling
        return x if self.align_corners else x - 0.5

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Into ``[0, size - 1]``; a NaN to 0 (torch's operand order does that)."""
        return torch.where(x > 0, x, 0).clamp(max=self.size - 1)

    def reflect(self, x: torch.Tensor) -> torch.Tensor:
        """Folded into the reflection range by torch's trunc-based formula."""
        if self.align_corners and self.size <= 1:
            return torch.zeros_like(x)
        away = (x - self.low).abs()
        extra = away - torch.trunc(divided(away, self.twice_span)) * self.twice_span
        return torch.minimum(extra, self.twice_span - extra) + self.low

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``padding_mode``'s coordinate mapping (zeros: none; out-of-range taps read 0)."""
        if self.padding == "border":
            return self.clip(x)
        if self.padding == "reflection":
            return self.clip(self.reflect(x))
        return x


class _Reader:
    """Reads ``input[n, :, y, x]`` at integral coordinates (floats), 0 outside the image, as
    rows of channels (one row copy a point: far fewer memory passes than a per-channel gather)."""

    def __init__(self, x: torch.Tensor, bounded: bool) -> None:
        self.n, self.c, self.h, self.w = x.shape
        self.rows = x.permute(0, 2, 3, 1).reshape(self.n * self.h * self.w, self.c)
        self.bounded = bounded  # border or reflection: coordinates clipped into the image

    def read(self, ix: torch.Tensor, iy: torch.Tensor, check_x: bool, check_y: bool) -> torch.Tensor:
        """``ix``/``iy``: (N, P) integral floats; ``check_x``/``check_y``: whether that
        coordinate may lie outside (both ends; only past the far one, by one, where the
        padding mode bounds the coordinates). The values as (N, P, C)."""
        inside = None
        for coord, size, check in ((ix, self.w, check_x), (iy, self.h, check_y)):
            if check:
                ok = coord < size if self.bounded else (coord > -1) & (coord < size)
                inside = ok if inside is None else inside & ok
        if inside is not None:
            ix, iy = torch.where(inside, ix, 0), torch.where(inside, iy, 0)
        base = torch.arange(self.n, device=ix.device)[:, None] * (self.h * self.w)
        index = base + iy.to(torch.int64) * self.w + ix.to(torch.int64)
        values = self.rows.index_select(0, index.reshape(-1)).view(*index.shape, self.c)
        return values if inside is None else torch.where(inside[..., None], values, 0)


def _grid_cubic_weights(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The grid sampler's cubic weights: distances ``t + 1``, ``t``, ``1 - t``, ``2 - t``."""
    return _cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)


def grid_sample_in_order(x: torch.Tensor, grid: torch.Tensor, mode: str, padding: str,
                         align_corners: bool) -> torch.Tensor:
    """``F.grid_sample`` of a 4-D ``x`` (N, C, H, W) at ``grid`` (N, Ho, Wo, 2) with ``mode``
    ``"bilinear"``, ``"nearest"`` or ``"bicubic"`` and ``padding`` ``"zeros"``,
    ``"border"`` or ``"reflection"``, in ``wide_dtype(x.dtype)``, in the formulas of
    torch's vectorised CPU kernel:

    * coordinates: ``(g + 1) * s`` with ``s = (size - 1) / 2`` (``align_corners``), else
      ``(g + 1) * s - 0.5`` with ``s = size / 2``; border clips into ``[0, size - 1]``
      (NaN to 0), reflection folds with ``trunc`` then clips;
    * bilinear: ``w = x - floor(x)``, ``e = 1 - w`` (and ``n``, ``s`` for y); the corner
      weights ``s*e, s*w, n*e, n*w``; ``((nw*v_nw + ne*v_ne) + sw*v_sw) + se*v_se``;
    * nearest: the value at ``round(x)`` (half to even);
    * bicubic: unpadded coordinates, ``t = x - floor(x)``, weights at distances
      ``t + 1, t, 1 - t, 2 - t``; each of the four rows ``((w0*v0 + w1*v1) + w2*v2) +
      w3*v3`` (each tap's coordinate padded, then truncated), the rows combined alike.

    A tap outside the image reads 0 (zeros padding).
    """
    wide = wide_dtype(x.dtype)
    n, c, height, width = x.shape
    points = grid.shape[1] * grid.shape[2]
    g = grid.reshape(n, points, 2).to(wide)
    ax, ay = _Axis(width, padding, align_corners, wide), _Axis(height, padding, align_corners, wide)
    reader = _Reader(x.to(wide), bounded=padding != "zeros")
    check = not reader.bounded  # a bounded coordinate can pass only the far end, by one
    if mode == "bicubic":
        gx, gy = ax.unnormalize(g[..., 0]), ay.unnormalize(g[..., 1])
        fx, fy = torch.floor(gx), torch.floor(gy)
        wx, wy = _grid_cubic_weights(gx - fx), _grid_cubic_weights(gy - fy)
        # every tap's coordinate padded on its own (with border or reflection, all inside)
        xs = [torch.trunc(ax.pad(fx + (i - 1))) for i in range(4)]
        ys = [torch.trunc(ay.pad(fy + (j - 1))) for j in range(4)]

        def sample(p: slice) -> torch.Tensor:
            def row(j: int) -> torch.Tensor:
                return _sum_in_order(reader.read(xs[i][:, p], ys[j][:, p], check, check) * wx[i][:, p, None]
                                     for i in range(4))

            return _sum_in_order(row(j) * wy[j][:, p, None] for j in range(4))
    elif mode == "nearest":
        gx, gy = ax.pad(ax.unnormalize(g[..., 0])), ay.pad(ay.unnormalize(g[..., 1]))
        rx, ry = torch.round(gx), torch.round(gy)

        def sample(p: slice) -> torch.Tensor:
            return reader.read(rx[:, p], ry[:, p], check, check)
    else:
        gx, gy = ax.pad(ax.unnormalize(g[..., 0])), ay.pad(ay.unnormalize(g[..., 1]))
        fx, fy = torch.floor(gx), torch.floor(gy)
        w, nn = gx - fx, gy - fy
        e, s = 1 - w, 1 - nn
        corners = ((fx, fy, s * e, check, check), (fx + 1, fy, s * w, True, check),
                   (fx, fy + 1, nn * e, check, True), (fx + 1, fy + 1, nn * w, True, True))

        def sample(p: slice) -> torch.Tensor:
            return _sum_in_order(reader.read(cx[:, p], cy[:, p], check_x, check_y) * weight[:, p, None]
                                 for cx, cy, weight, check_x, check_y in corners)

    # points in chunks whose values stay in cache (every operation is elementwise: the
    # chunking changes no bit)
    out = torch.empty(n, points, c, dtype=wide, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * c))
    for lo in range(0, points, step):
        out[:, lo:lo + step] = sample(slice(lo, lo + step))
    return out.permute(0, 2, 1).reshape(n, c, grid.shape[1], grid.shape[2])
