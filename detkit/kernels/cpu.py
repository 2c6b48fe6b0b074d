"""CPU backend for ``portable=False``: batch invariant on this machine and software stack.

* 2-D matmul: BLAS (``torch.mm`` / ``torch.addmm``, i.e. MKL or oneDNN) called only on
  fixed-shape row tiles copied into fixed, aligned buffers (see ``_cpu_tiles``). Whether
  the library really gives a row the same bits in every tile is verified at first use
  per (dtype, K, N, layout of b, bias); a failure is recorded in :func:`cpu_status` and
  that configuration uses the fixed-order compiled kernel instead.
* batched 3-D matmul, softmax, log-softmax, norms, row sums and attention: fixed-order
  numba kernels (``_cpu_numba``), reduced in float32 (float64 for float64 inputs).

Reduced-precision inputs are widened exactly to float32 and the result is rounded once.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numba
import numpy as np
import torch

if "NUMBA_THREADING_LAYER" not in os.environ:
    # numba's OpenMP layer takes milliseconds to start each parallel region next to
    # torch's own OpenMP runtime; the workqueue layer starts in microseconds. It is not
    # re-entrant, so calls are serialised by _NUMBA_LOCK. (Results never depend on it.)
    numba.config.THREADING_LAYER = "workqueue"

from detkit.kernels import _cpu_numba as nk  # noqa: E402
from detkit.kernels._cpu_tiles import cpu_status, tiled_matmul  # noqa: E402
from detkit.kernels._grouped import host_grouped_matmul  # noqa: E402

# nk.bmm: acc = fma(a_k, b_k, acc) for k = 0..K-1 from +0 (see detkit.kernels._backend).
BATCHED_MATMUL_SEQUENTIAL_IN_K = True

_NUMBA_LOCK = threading.Lock()
# Below this many elements a row kernel runs serially: waking numba's threads costs
# more than the work. Same row function either way, so the same bits.
_SERIAL_MAX_ELEMENTS = 1 << 16
# From this many queries on, attention scores come from K-transposed tiles (the copy of
# K pays for itself); fewer queries (decode) read K rows directly. Same bits either way.
_TILED_MIN_QUERIES = 4


def _row_kernel(parallel: Any, serial: Any, x: np.ndarray) -> Any:
    """The serial or the parallel driver of a row kernel (numba dispatchers)."""
    if x.size <= _SERIAL_MAX_ELEMENTS:
        return serial
    _sync_threads()
    return parallel

__all__ = [
    "attention",
    "cpu_status",
    "grouped_matmul",
    "layer_norm",
    "matmul",
    "rms_norm",
    "row_cumsum",
    "row_sum",
    "softmax",
    "solve_lower",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32/float64 numpy view (copy only when needed)."""
    return x.to(_acc_dtype(x.dtype)).contiguous().numpy()


def _empty_like(xn: np.ndarray) -> np.ndarray:
    """An uninitialised array like ``xn`` from torch's allocator (cheaper first touch of
    large outputs than numpy's); ``_finish`` wraps it back without a copy."""
    return torch.empty(xn.shape, dtype=torch.float32 if xn.dtype == np.float32 else torch.float64).numpy()


def _canonical_nan(out: np.ndarray) -> np.ndarray:
    """Every NaN of ``out`` as the positive quiet NaN, in place.

    A NaN's payload and sign depend on which NaN operand an instruction propagated, and
    torch's float16 -> float32 widening keeps an input NaN's payload in its vector loop
    but makes it 0x7FFFFFFF in its scalar tail (the last numel % 8 elements): a row's
    NaN bits depended on its position in the flat tensor, so on the batch.
    """
    np.copyto(out, np.nan, where=np.isnan(out))
    return out


def _finish(out: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Round the float32/float64 result once into ``dtype`` (the row kernels store NaNs
    canonical already: ``_cpu_numba._canon``)."""
    return torch.from_numpy(out).to(dtype)


def _sync_threads() -> None:
    """Use as many numba threads as torch would (results do not depend on it)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def bmm_fixed_order(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, K) @ (B, K, N) in the fixed sequential-k order; returns the accumulation dtype."""
    _sync_threads()
    an, bn = _np(a), _np(b)
    out = np.empty((an.shape[0], an.shape[1], bn.shape[2]), an.dtype)
    with _NUMBA_LOCK:
        nk.bmm(an, bn, out)
    return torch.from_numpy(_canonical_nan(out))


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    dtype = a.dtype
    if a.dim() == 2:
        return tiled_matmul(a, b, bias, fallback=bmm_fixed_order)
    out = bmm_fixed_order(a, b)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(dtype)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    return host_grouped_matmul(matmul, a, b, offs)


def softmax(x: torch.Tensor, log: bool) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    xn = _np(x)
    out = _empty_like(xn)
    with _NUMBA_LOCK:
        _row_kernel(nk.softmax, nk.softmax_serial, xn)(xn, out, bool(log))
    return _finish(out, x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    xn = _np(x)
    wn = _np(weight) if weight is not None else np.ones(1, xn.dtype)
    out = _empty_like(xn)
    with _NUMBA_LOCK:
        _row_kernel(nk.rms_norm, nk.rms_norm_serial, xn)(xn, wn, weight is not None, float(eps), out)
    return _finish(out, x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    xn = _np(x)
    wn = _np(weight) if weight is not None else np.ones(1, xn.dtype)
    bn = _np(bias) if bias is not None else np.zeros(1, xn.dtype)
    out = _empty_like(xn)
    with _NUMBA_LOCK:
        kern = _row_kernel(nk.layer_norm, nk.layer_norm_serial, xn)
        kern(xn, wn, bn, weight is not None, bias is not None, float(eps), out)
    return _finish(out, x.dtype)


def row_sum(x: torch.Tensor, mean: bool) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    xn = _np(x)
    out = np.empty(xn.shape[0], xn.dtype)
    with _NUMBA_LOCK:
        _row_kernel(nk.row_sum, nk.row_sum_serial, xn)(xn, out, bool(mean))
    return _finish(out, x.dtype)


def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    xn = _np(x)
    out = _empty_like(xn)
    # float32 and float64 inputs are summed in float64, bfloat16/float16 ones in float32
    wide = x.dtype in (torch.float32, torch.float64)
    with _NUMBA_LOCK:
        _row_kernel(nk.row_cumsum, nk.row_cumsum_serial, xn)(xn, out, wide)
    return _finish(out, x.dtype)


def solve_lower(a: torch.Tensor, b: torch.Tensor, unit: bool) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    an, bn = _np(a), _np(b)
    out = _empty_like(bn)
    with _NUMBA_LOCK:
        _row_kernel(nk.solve_lower, nk.solve_lower_serial, bn)(an, bn, bool(unit), out)
    return _finish(out, b.dtype)


def _key_ranges(mask: torch.Tensor) -> np.ndarray:
    """(B, H, Lq, 2) int64: first attended key and last attended key + 1 of each query.

    Computed once per distinct mask row (broadcast dimensions are not expanded);
    numpy's ``argmax`` returns the first maximal index. A query with no attended key
    gets (0, 0).
    """
    compact = mask
    for dim in range(3):
        if mask.stride(dim) == 0:
            compact = compact.narrow(dim, 0, 1)
    rows = compact.numpy()
    lo = rows.argmax(-1)
    hi = rows.shape[-1] - rows[..., ::-1].argmax(-1)
    none = ~rows.any(-1)
    lo[none] = 0
    hi[none] = 0
    out = np.empty((*mask.shape[:3], 2), np.int64)
    out[..., 0] = lo
    out[..., 1] = hi
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """See ``detkit.kernels._backend``."""
    _sync_threads()
    qn, vn = _np(q), _np(v)
    B, H, Lq, _ = qn.shape
    # Masks travel as a flat array plus element strides (zero where broadcast): one
    # compiled signature per dtype whatever the mask's layout.
    maskb = np.ones(1, np.bool_)
    maskf = np.zeros(1, qn.dtype)
    ms = np.zeros(4, np.int64)
    ranges = np.zeros((1, 1, 1, 2), np.int64)
    mode = 0
    if mask is not None:
        mode = 1 if mask.dtype == torch.bool else 2
        span = 1 + sum((n - 1) * st for n, st in zip(mask.shape, mask.stride()))
        flat_t = mask.as_strided((span,), (1,))
        flat = (flat_t if mode == 1 else flat_t.to(_acc_dtype(q.dtype))).contiguous().numpy()
        ms[:] = mask.stride()
        if mode == 1:
            maskb = flat
            ranges = _key_ranges(mask)
        else:
            maskf = flat
    out = np.empty((B, H, Lq, vn.shape[3]), qn.dtype)
    kn = _np(k)
    # Several queries per (batch, head): score tiles vectorised across keys need K
    # transposed. Both score paths give the same bits (see _cpu_numba.attention).
    tiled = Lq >= _TILED_MIN_QUERIES
    if tiled:
        Lk, D = kn.shape[2], kn.shape[3]
        kT = np.zeros((kn.shape[0], kn.shape[1], D, -(-Lk // nk.KB) * nk.KB), kn.dtype)
        kT[..., :Lk] = kn.transpose(0, 1, 3, 2)
    else:
        kT = np.zeros((1, 1, 1, 1), kn.dtype)
    with _NUMBA_LOCK:
        nk.attention(qn, kn, kT, tiled, vn, maskb, maskf, ms, mode, ranges, float(scale), out)
    return _finish(out, q.dtype)
