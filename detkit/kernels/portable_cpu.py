"""CPU backend for ``portable=True``: the canonical orders of ``docs/canonical-orders.md``.

Same bits as ``detkit.kernels.spec`` (the executable specification) and the CUDA
portable kernels, on any x86-64 instruction set and any thread count. Implements the
backend contract of ``detkit/kernels/_backend.py`` plus :func:`elementwise` for the
torch mode, and :func:`pow` (``Pow``, section 2.9).

Inputs are widened exactly to float32 (in torch, or inside the matmul packing), the
numba kernels in ``_portable_kernels`` compute the float32 result with canonical NaNs,
and ``round_out`` rounds it once, to nearest even, into the input dtype.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from detkit.errors import BackendUnavailable, InputError
from detkit.kernels import _portable_kernels as K
from detkit.kernels._grouped import host_grouped_matmul

__all__ = [
    "ELEMENTWISE_OPS",
    "SUPPORTED_DTYPES",
    "attention",
    "elementwise",
    "grouped_matmul",
    "layer_norm",
    "matmul",
    "pow",
    "rms_norm",
    "row_cumsum",
    "row_sum",
    "softmax",
    "solve_lower",
]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
# Stable API for the torch mode: names accepted by ``elementwise``.
ELEMENTWISE_OPS: tuple[str, ...] = (
    "exp", "log", "rsqrt", "sigmoid", "silu", "tanh", "erf", "gelu", "gelu_tanh", "sin", "cos", "cube", "softplus",
    "log1p",
)
_OP_CODES = {name: code for code, name in enumerate(ELEMENTWISE_OPS)}
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_MODE = {torch.float32: K.MODE_F32, torch.bfloat16: K.MODE_BF16, torch.float16: K.MODE_F16}
_SMALLEST_NORMAL = np.float32(2.0**-126)
# Below this much work (elements touched) a kernel runs on the calling thread: waking
# the pool costs more than it saves. Threads only split the range of independent rows
# or tiles, each computed by the same code, so the bits never depend on the split.
_PARALLEL_MIN_WORK = 1 << 17
# Up to this many rows of a, a transposed weight is read in place (no packing).
_SMALL_M = 4
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool_in_child() -> None:
    # A forked child has only the thread that forked: work submitted to the inherited
    # pool, whose workers were not copied, waited forever.
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _threads() -> int:
    """Worker count: torch's intra-op setting (torch.set_num_threads / OMP_NUM_THREADS)."""
    return max(1, int(torch.get_num_threads()))


def _run_split(kernel: Callable[..., None], n: int, work: int, *args: object) -> None:
    """Run ``kernel(*args, lo, hi)`` over [0, n), split into contiguous ranges, one per
    thread (the kernels release the GIL)."""
    global _pool, _pool_size
    threads = min(_threads(), n)
    if threads <= 1 or work < _PARALLEL_MIN_WORK:
        kernel(*args, 0, n)
        return
    with _pool_lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="detkit-portable")
            _pool_size = threads
        pool = _pool
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    kernel(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()


@njit(cache=True, error_model="numpy")
def _keeps_subnormals(x: float) -> bool:
    # x is the smallest normal: half of it is subnormal, 0 under flush-to-zero.
    return x * np.float32(0.5) != np.float32(0.0)


def _check_fp_environment() -> None:
    # torch.set_flush_denormal(True) (or a library built with -ffast-math) sets FTZ/DAZ
    # on the calling thread; the canonical orders keep subnormals.
    if not _keeps_subnormals(_SMALLEST_NORMAL):
        raise BackendUnavailable(
            "the CPU is flushing subnormal floats to zero on this thread (FTZ/DAZ, e.g. "
            "torch.set_flush_denormal(True)); portable kernels need IEEE subnormals. "
            "Call torch.set_flush_denormal(False) before using portable=True."
        )


def _check_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = next(t.dtype for t in tensors if t is not None)
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputError(
                f"portable kernels support float32, bfloat16 and float16, not {t.dtype}; "
                "convert the tensors (e.g. .float()) or use portable=False."
            )
        if t.dtype != dtype:
            raise InputError(f"portable kernels need one dtype for all inputs, got {dtype} and {t.dtype}")
    _check_fp_environment()
    return dtype


def _f32(t: torch.Tensor) -> np.ndarray:
    """Exact widening to a C-contiguous float32 numpy array (no copy for contiguous fp32)."""
    return t.detach().to(torch.float32).contiguous().numpy()


def _rows_in(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """Kernel input without a widened copy: float32 values, or the raw bf16/fp16 bits
    that the kernels widen (exactly) row by row."""
    t = t.detach().contiguous()
    if t.dtype == torch.float32:
        return t.numpy(), K.MODE_F32
    return t.view(torch.int16).numpy(), _MODE[t.dtype]


def _opt_f32(t: torch.Tensor | None) -> tuple[np.ndarray, bool]:
    if t is None:
        return np.zeros(1, dtype=np.float32), False
    return _f32(t), True


def _finish(y: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The single rounding into the output dtype (fp32 results are final already)."""
    if dtype == torch.float32:
        return torch.from_numpy(y)
    flat = np.ascontiguousarray(y).reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.int16)
    _run_split(K.round_out_range, flat.shape[0], flat.shape[0], flat, _MODE[dtype], out)
    return torch.from_numpy(out).view(dtype).reshape(y.shape)


def _matmul_2d(a32: np.ndarray, b: torch.Tensor, bias32: np.ndarray, has_bias: bool) -> np.ndarray:
    m_dim, k_dim = a32.shape
    n_dim = b.shape[1]
    c = np.empty((m_dim, n_dim), dtype=np.float32)
    tiles = K.matmul_tiles(n_dim, m_dim)
    work = m_dim * n_dim * max(k_dim, 1)
    if m_dim <= _SMALL_M and b.stride(0) == 1 and b.stride(1) >= k_dim:
        # b is a transposed weight (nn.Linear): read the weight rows directly
        w_bits = b.detach().t().contiguous().view(_BITS_VIEW[b.dtype]).numpy()
        blocks = (n_dim + K.WT_BLOCK - 1) // K.WT_BLOCK
        _run_split(K.matmul_wt_small, blocks, work, a32, w_bits, _MODE[b.dtype], bias32, has_bias, c)
    elif b.dtype == torch.float32 and b.is_contiguous():
        _run_split(K.matmul_direct, tiles, work, a32, b.detach().numpy(), bias32, has_bias, c)
    else:
        bits = b.detach().view(_BITS_VIEW[b.dtype]).numpy()
        _run_split(K.matmul_packed, tiles, work, a32, bits, _MODE[b.dtype], bias32, has_bias, c)
    return c


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, K) @ (K, N) or batched (B, M, K) @ (B, K, N), plus bias after the K loop."""
    dtype = _check_dtype(a, b, bias)
    # The numba kernels index without bounds checks: shapes that do not multiply (the front
    # end broadcasts first) would read past b instead of raising.
    if (a.dim() not in (2, 3) or b.dim() != a.dim() or b.shape[-2] != a.shape[-1]
            or b.shape[:-2] != a.shape[:-2] or (bias is not None and bias.shape != (b.shape[-1],))):
        raise InputError(f"portable matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)}"
                         f"{'' if bias is None else f' + {tuple(bias.shape)}'} do not multiply; use "
                         "detkit.kernels.matmul, which broadcasts them")
    a32 = _f32(a)
    bias32, has_bias = _opt_f32(bias)
    if a.dim() == 2:
        return _finish(_matmul_2d(a32, b, bias32, has_bias), dtype)
    batch, m_dim, k_dim = a32.shape
    n_dim = b.shape[2]
    out = np.empty((batch, m_dim, n_dim), dtype=np.float32)
    # Every entry through the packed kernel in one call; the 2-D kernels differ in speed
    # only (the same ChunkDot order, so the same bits).
    bits = b.detach().view(_BITS_VIEW[b.dtype]).numpy()
    _run_split(K.matmul_packed_batched, batch * K.matmul_tiles(n_dim, m_dim), batch * m_dim * n_dim * max(k_dim, 1),
               a32, bits, _MODE[b.dtype], bias32, has_bias, out)
    return _finish(out, dtype)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return host_grouped_matmul(matmul, a, b, offs)


def softmax(x: torch.Tensor, log: bool) -> torch.Tensor:
    dtype = _check_dtype(x)
    xin, mode = _rows_in(x)
    out = np.empty(xin.shape, dtype=np.float32)
    _run_split(K.softmax_rows, xin.shape[0], xin.size, xin, mode, bool(log), out)
    return _finish(out, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    dtype = _check_dtype(x, weight)
    xin, mode = _rows_in(x)
    w32, has_w = _opt_f32(weight)
    out = np.empty(xin.shape, dtype=np.float32)
    _run_split(K.rms_norm_rows, xin.shape[0], xin.size, xin, mode, w32, has_w, np.float32(eps), out)
    return _finish(out, dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    dtype = _check_dtype(x, weight, bias)
    xin, mode = _rows_in(x)
    w32, has_w = _opt_f32(weight)
    b32, has_b = _opt_f32(bias)
    out = np.empty(xin.shape, dtype=np.float32)
    _run_split(K.layer_norm_rows, xin.shape[0], xin.size, xin, mode, w32, has_w, b32, has_b,
               np.float32(eps), out)
    return _finish(out, dtype)


def row_sum(x: torch.Tensor, mean: bool) -> torch.Tensor:
    dtype = _check_dtype(x)
    xin, mode = _rows_in(x)
    out = np.empty(xin.shape[0], dtype=np.float32)
    _run_split(K.row_sum_rows, xin.shape[0], xin.size, xin, mode, bool(mean), out)
    return _finish(out, dtype)


def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    dtype = _check_dtype(x)
    xin, mode = _rows_in(x)
    out = np.empty(xin.shape, dtype=np.float32)
    _run_split(K.row_cumsum_rows, xin.shape[0], xin.size, xin, mode, out)
    return _finish(out, dtype)


def solve_lower(a: torch.Tensor, b: torch.Tensor, unit: bool) -> torch.Tensor:
    dtype = _check_dtype(a, b)
    a32, b32 = _f32(a), _f32(b)
    out = np.empty(b32.shape, dtype=np.float32)
    _run_split(K.solve_lower, b32.shape[0], a32.size + b32.size * b32.shape[1], a32, b32, bool(unit), out)
    return _finish(out, dtype)


def _zero_stride(dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    base = np.zeros(1, dtype=dtype)
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=(0,) * len(shape))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Softmax(q k^T * scale + mask) v with masked keys skipped (section 3, attention)."""
    dtype = _check_dtype(q, k, v)
    nb, nh, lq, _ = q.shape
    lk = k.shape[2]
    shape = (nb, nh, lq, lk)
    q32 = _f32(q)
    k32 = _f32(k)
    v32 = _f32(v)
    mask_bool = _zero_stride(np.uint8, shape)
    mask_float = _zero_stride(np.float32, shape)
    mode = 0
    if mask is not None:
        full = mask.detach().expand(shape)
        if full.dtype == torch.bool:
            mask_bool, mode = full.view(torch.uint8).numpy(), 1
        else:
            mask_float, mode = full.to(torch.float32).numpy(), 2
    out = np.empty((nb, nh, lq, v.shape[3]), dtype=np.float32)
    work = nb * nh * lq * lk * (q.shape[3] + v.shape[3])
    _run_split(K.attention, nb * nh * lq, work, q32, k32, v32, mask_bool, mask_float, mode,
               np.float32(scale), out)
    return _finish(out, dtype)


def elementwise(name: str, x: torch.Tensor) -> torch.Tensor:
    """Portable ``exp``, ``log``, ``rsqrt``, ``sigmoid``, ``silu``, ``tanh``, ``erf``, ``gelu``
    (exact), ``gelu_tanh`` (tanh approximation), ``sin``, ``cos``, ``cube`` (``pow(x, 3)``),
    ``softplus`` (beta 1, threshold 20) or ``log1p`` of any-shaped x."""
    if name not in _OP_CODES:
        raise InputError(f"unknown portable elementwise op {name!r}; choose one of {ELEMENTWISE_OPS}")
    dtype = _check_dtype(x)
    xin, mode = _rows_in(x.reshape(-1))
    out = np.empty(xin.shape, dtype=np.float32)
    _run_split(K.elementwise_range, xin.shape[0], xin.shape[0], _OP_CODES[name], xin, mode, out)
    return _finish(out.reshape(tuple(x.shape)), dtype)


def pow(x: torch.Tensor, y: torch.Tensor | float) -> torch.Tensor:  # noqa: A001 - backend contract name
    """``Pow(x, y)`` of every element: ``y`` a tensor of ``x``'s dtype and shape, or a
    Python float (a binary64 exponent for every element)."""
    scalar = not isinstance(y, torch.Tensor)
    if scalar:
        dtype = _check_dtype(x)
    else:
        dtype = _check_dtype(x, y)
        if y.shape != x.shape:
            raise InputError(f"pow: the exponent's shape {tuple(y.shape)} is not the base's {tuple(x.shape)}; "
                             "broadcast them first (torch.broadcast_tensors)")
    xin, mode = _rows_in(x.reshape(-1))
    yin = xin if scalar else _rows_in(y.reshape(-1))[0]
    out = np.empty(xin.shape, dtype=np.float32)
    _run_split(K.pow_range, xin.shape[0], xin.shape[0], xin, yin, float(y) if scalar else 0.0, scalar, mode, out)
    return _finish(out.reshape(tuple(x.shape)), dtype)
