"""2-D matmul on the CPU through BLAS on fixed-shape row tiles, verified at first use.

BLAS (MKL for float32/float64, oneDNN for bfloat16/float16 in torch's CPU build)
chooses its kernel, blocking and thread split from the whole problem shape, so the
bits of one output row change with M. Here BLAS only ever sees tiles of a few fixed
heights taken from a table keyed by dtype (never chosen from M), each tile copied into
a fixed, freshly allocated (64-byte aligned) buffer so that alignment and offsets
cannot change the library's path either. M is padded with zero rows up to a tile.

That a row gets the same bits in every tile rests on the library's behaviour, so it is
verified on this machine the first time a configuration (dtype, K, N, layout and
alignment of b, bias or not) is used: for the smallest height, a row's
bits must not change when the tile's rows are permuted, when the other rows are
replaced or zeroed, or when torch runs on 1, 2 or all cores' threads; a larger height joins the ladder
only if its rows equal the smallest height's bitwise. A configuration whose smallest
height fails is computed by the fixed-order compiled kernel instead, with a warning
and an entry in :func:`cpu_status` (never silently).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

# Tile heights per dtype, ascending; each larger height is used only if verified to give
# the same bits as the smallest. Measured on a 2-core AVX-512/AMX Xeon (torch 2.13):
# float32 MKL, K = N = 4096: M=16 costs 3x M=1 but M=256 costs only 6x M=16.
TILE_HEIGHTS: dict[torch.dtype, tuple[int, ...]] = {
    torch.float32: (16, 64, 256),
    torch.float64: (16, 64, 256),
    torch.bfloat16: (32, 128, 512),
    torch.float16: (32, 128, 512),
}

_ENV_FORCE = "DETKIT_CPU_MATMUL"  # "fixed-order" bypasses BLAS (for testing the fallback)


@dataclass(frozen=True)
class TileVerdict:
    """The outcome of verifying one matmul configuration on this machine."""

    dtype: str
    k: int
    n: int
    b_layout: str
    b_align: int
    bias: bool
    threads: tuple[int, ...]
    heights: tuple[int, ...]
    reason: str

    def __post_init__(self) -> None:
        if self.k < 1 or self.n < 1 or not self.threads:
            raise ValueError("TileVerdict needs k, n >= 1 and the thread counts checked")

    @property
    def ok(self) -> bool:
        """True when BLAS tiles are used (at least the smallest height verified)."""
        return len(self.heights) > 0


# Thread counts checked at verification, so that the verdict (and with it the algorithm)
# never depends on the thread count in force when a configuration is first used.
_THREAD_COUNTS = {1, 2, os.cpu_count() or 1, torch.get_num_threads()}

_VERDICTS: dict[tuple[object, ...], TileVerdict] = {}
_LOCK = threading.Lock()
_BUFFERS = threading.local()


def cpu_status() -> dict[str, object]:
    """What the CPU matmul does on this machine: tile tables and every verdict so far."""
    with _LOCK:
        verdicts = [asdict(v) | {"ok": v.ok} for v in _VERDICTS.values()]
    return {
        "tile_heights": {str(k).removeprefix("torch."): list(v) for k, v in TILE_HEIGHTS.items()},
        "forced_fixed_order": os.environ.get(_ENV_FORCE, "") == "fixed-order",
        "verdicts": verdicts,
        "fallback_configs": sum(1 for v in verdicts if not v["ok"]),
    }


def _buffer(kind: str, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    store: dict[tuple[object, ...], torch.Tensor] | None = getattr(_BUFFERS, "store", None)
    if store is None:
        store = {}
        _BUFFERS.store = store
    key = (kind, dtype, rows, cols)
    buf = store.get(key)
    if buf is None:
        buf = torch.zeros(rows, cols, dtype=dtype)
        store[key] = buf
    return buf


def _layout(b: torch.Tensor) -> tuple[str, torch.Tensor]:
    if b.stride(1) == 1 and b.stride(0) >= max(1, b.shape[1]):
        return "n", b
    if b.stride(0) == 1 and b.stride(1) >= max(1, b.shape[0]):
        return "t", b
    return "n", b.contiguous()


def _tile(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, h: int) -> torch.Tensor:
    """BLAS on one fixed (h, K) buffer; ``a`` has at most h rows. Returns a fresh (rows, N)."""
    rows, k = a.shape
    buf = _buffer("a", a.dtype, h, k)
    buf[:rows].copy_(a)
    if rows < h:
        buf[rows:].zero_()
    obuf = _buffer("o", a.dtype, h, b.shape[1])
    if bias is None:
        torch.mm(buf, b, out=obuf)
    else:
        torch.addmm(bias, buf, b, out=obuf)
    return obuf[:rows].clone()


def _run(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, heights: tuple[int, ...]) -> torch.Tensor:
    m = a.shape[0]
    out = torch.empty(m, b.shape[1], dtype=a.dtype)
    pos = 0
    while pos < m:
        rem = m - pos
        h = max((t for t in heights if t <= rem), default=heights[0])
        rows = min(h, rem)
        out[pos : pos + rows] = _tile(a[pos : pos + rows], b, bias, h)
        pos += rows
    return out


def _with_threads(n: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _check_height(b: torch.Tensor, bias: torch.Tensor | None, h: int, gen: torch.Generator) -> str:
    """'' if height h gives each row the same bits in every situation tried, else why not."""
    k = b.shape[0]
    dtype = b.dtype
    a = torch.randn(h, k, generator=gen).to(dtype)
    ref = _tile(a, b, bias, h)
    perm = torch.randperm(h, generator=gen)
    if not torch.equal(_tile(a[perm], b, bias, h), ref[perm]):
        return f"height {h}: rows changed when the tile's rows were permuted"
    other = a.clone()
    other[1:] = torch.randn(h - 1, k, generator=gen).to(dtype) if h > 1 else other[1:]
    if not torch.equal(_tile(other, b, bias, h)[:1], ref[:1]):
        return f"height {h}: row 0 changed when the other rows changed"
    if h > 1 and not torch.equal(_tile(a[:1], b, bias, h), ref[:1]):
        return f"height {h}: row 0 changed when the other rows were zero padding"
    threads = torch.get_num_threads()
    for n in sorted(_THREAD_COUNTS - {threads}):
        if not torch.equal(_with_threads(n, lambda: _tile(a, b, bias, h)), ref):
            return f"height {h}: rows changed between {threads} and {n} threads"
    return ""


def _verify(b: torch.Tensor, bias: torch.Tensor | None, key: tuple[object, ...], layout: str) -> TileVerdict:
    dtype = b.dtype
    gen = torch.Generator().manual_seed(0x5EED)
    heights: list[int] = []
    reason = "verified"
    base: torch.Tensor | None = None
    for h in TILE_HEIGHTS[dtype]:
        why = _check_height(b, bias, h, gen)
        if not why and base is not None:
            # A larger height must reproduce the smallest height's rows exactly.
            a = torch.randn(h, b.shape[0], generator=gen).to(dtype)
            a[: base.shape[0]] = base
            if not torch.equal(_tile(a, b, bias, h)[: base.shape[0]], _tile(base, b, bias, heights[0])):
                why = f"height {h} gives other bits than height {heights[0]}"
        if why:
            reason = why if not heights else f"ladder stops before height {h}: {why}"
            break
        if base is None:
            base = torch.randn(h, b.shape[0], generator=gen).to(dtype)
        heights.append(h)
    return TileVerdict(
        dtype=str(dtype).removeprefix("torch."),
        k=int(key[1]),  # type: ignore[call-overload]
        n=int(key[2]),  # type: ignore[call-overload]
        b_layout=layout,
        b_align=int(key[4]),  # type: ignore[call-overload]
        bias=bias is not None,
        threads=tuple(sorted(_THREAD_COUNTS)),
        heights=tuple(heights),
        reason=reason,
    )


def verdict_for(b: torch.Tensor, bias: torch.Tensor | None) -> TileVerdict:
    """The (cached) verdict for multiplying by ``b`` with this bias on this machine."""
    layout, b = _layout(b)
    key = (b.dtype, b.shape[0], b.shape[1], layout, b.data_ptr() % 64, bias is not None)
    with _LOCK:
        v = _VERDICTS.get(key)
    if v is None:
        v = _verify(b, bias, key, layout)
        with _LOCK:
            _VERDICTS[key] = v
        if not v.ok:
            warnings.warn(
                f"detkit: BLAS tiles are not batch invariant for {v.dtype} K={v.k} N={v.n} "
                f"(b layout {layout!r}): {v.reason}. Using the fixed-order kernel for this "
                "shape (slower); see detkit.kernels.cpu_status().",
                RuntimeWarning,
                stacklevel=4,
            )
    return v


def tiled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    fallback: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """(M, K) @ (K, N) (+ bias) with per-row bits independent of M; see the module doc."""
    if os.environ.get(_ENV_FORCE, "") == "fixed-order":
        heights: tuple[int, ...] = ()
    else:
        heights = verdict_for(b, bias).heights
    if not heights:
        out = fallback(a.unsqueeze(0), b.unsqueeze(0))[0]
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.to(a.dtype)
    _, bl = _layout(b)
    return _run(a, bl, bias, heights)


__all__ = ["TILE_HEIGHTS", "TileVerdict", "cpu_status", "tiled_matmul", "verdict_for"]
