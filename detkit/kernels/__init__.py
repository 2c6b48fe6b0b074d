"""Batch-invariant kernels: torch tensors in and out, bitwise reproducible per row.

For every function here, a row's result (one matrix row, one softmax/norm row, one
attention query) is bitwise independent of the batch size, of the row's position in
the batch, of the other rows' contents and of the thread count; for attention also of
left/right padding (masked keys) and of decode vs prefill; for softmax and log_softmax
also of masked entries (``exp == 0``: ``-inf``, ``finfo.min``) before or after a row's
others, and for sum of zeros there. ``portable=True`` asks for
the stronger guarantee of identical bits on every device (a separate backend).

This module validates input and reshapes it into the backend contract described in
``detkit.kernels._backend``; the backend is chosen by the tensors' device type and the
``portable`` flag, never by the batch size. Forward only (no autograd; an input that
requires grad, with grad enabled, gives a warning: the result carries no gradient).
"""

from __future__ import annotations

import builtins
import math
import numbers
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from detkit.errors import InputError
from detkit.kernels._backend import backend_for

__all__ = [
    "SUPPORTED_DTYPES",
    "attention",
    "cpu_status",
    "cumsum",
    "grouped_matmul",
    "layer_norm",
    "log_softmax",
    "matmul",
    "mean",
    "rms_norm",
    "softmax",
    "solve_triangular",
    "sum",
]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_F32_EPS, _F64_EPS = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def cpu_status() -> dict[str, object]:
    """How the CPU backend computes matmul here: tile tables and verification verdicts."""
    from detkit.kernels.cpu import cpu_status as status

    return status()


def batched_matmul_is_sequential_in_k(device_type: str, portable: bool) -> bool:
    """Whether the backend for ``device_type`` and ``portable`` reduces every output of a
    batched (3-D) matmul as one fma chain over k from +0, so that zeros at the start of a
    row of ``a`` change no bit (``BATCHED_MATMUL_SEQUENTIAL_IN_K`` in the backend contract)."""
    return bool(getattr(backend_for(device_type, portable), "BATCHED_MATMUL_SEQUENTIAL_IN_K", False))


# --------------------------------------------------------------------------- checks


def _dense(x: torch.Tensor, name: str, fn: str) -> None:
    # A strided nested tensor has layout torch.strided, but no sizes: torch raised
    # "Internal error: NestedTensorImpl doesn't support sizes".
    if x.is_nested:
        raise InputError(f"{fn}: {name} is a nested tensor; pass a regular tensor (e.g. x.to_padded_tensor(0.0) "
                         "with a mask), or one call per component.")
    if x.layout != torch.strided:
        raise InputError(f"{fn}: {name} is a {x.layout} tensor; pass a dense tensor (x.to_dense()).")


def _check(x: object, name: str, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}.")
    _dense(x, name, fn)
    if x.dtype not in SUPPORTED_DTYPES:
        kind = "an integer/bool" if not (x.is_floating_point() or x.is_complex()) else "a"
        raise InputError(
            f"{fn}: {name} is {kind} {x.dtype} tensor; detkit kernels take float32, bfloat16, "
            "float16 or float64. Convert it first, e.g. x.float()."
        )
    if x.requires_grad and torch.is_grad_enabled():
        # A missing gradient would be silent when the result is summed with other terms.
        warnings.warn(
            f"detkit.kernels.{fn}: {name} requires grad, but detkit.kernels are forward only: the result carries "
            "no gradient. Call them under torch.no_grad() (or on .detach()ed tensors), or use "
            "detkit.batch_invariant(), which keeps torch's autograd.",
            UserWarning,
            stacklevel=3,
        )
    return x.detach()


def _shared(fn: str, attr: str, problem: str, tensors: dict[str, torch.Tensor | None]) -> Any:
    """The value of ``attr`` (dtype, device) that every given tensor has, None if none is
    given; an InputError naming each tensor's when they differ (one pass, no sets: asked
    on every call)."""
    value = None
    for t in tensors.values():
        if t is None:
            continue
        if value is None:
            value = getattr(t, attr)
        elif getattr(t, attr) != value:
            desc = ", ".join(f"{k}: {getattr(t, attr)}" for k, t in tensors.items() if t is not None)
            raise InputError(f"{fn}: {problem.format(desc=desc)}")
    return value


def _same_dtype(fn: str, **tensors: torch.Tensor | None) -> None:
    _shared(fn, "dtype", "all tensors must have the same dtype ({desc}); convert them to one dtype.", tensors)


def _flag(value: object, name: str, fn: str) -> bool:
    if not isinstance(value, bool):
        # Truthiness would flip the result: portable="no" ran the portable kernels,
        # is_causal="no" masked causally (torch raises TypeError).
        raise InputError(f"{fn}: {name} must be True or False, got {value!r}.")
    return value


def _dispatch(fn: str, portable: bool, **tensors: torch.Tensor | None) -> ModuleType:
    portable = _flag(portable, "portable", fn)
    device = _shared(fn, "device", "all tensors must be on the same device ({desc}).", tensors)
    if device is None:
        raise InputError(f"{fn}: no tensor given.")
    return backend_for(device.type, portable)


def _dim(dim: object, ndim: int, fn: str) -> int:
    # numbers.Integral: a numpy integer is an int to torch too (np.bool_ is not Integral)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise InputError(f"{fn}: dim must be one int (reductions run over one dimension), got {dim!r}.")
    dim = int(dim)
    n = builtins.max(ndim, 1)
    if not -n <= dim < n:
        raise InputError(f"{fn}: dim {dim} is out of range for a tensor with {ndim} dimension(s).")
    return dim % n


def _eps(eps: object, default: float, fn: str) -> float:
    if eps is None:
        return default
    if type(eps) is float and eps >= 0 and math.isfinite(eps):  # the common case, without the ABC checks
        return eps
    # numbers.Real: a numpy float (np.float32 from a config) is a number to torch too
    value = math.nan
    if not isinstance(eps, bool) and isinstance(eps, numbers.Real):
        try:
            value = float(eps)
        except OverflowError:  # an int beyond float's range
            pass
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{fn}: eps must be a finite number >= 0, got {eps!r}.")
    return value


def _last_dim_param(p: torch.Tensor | None, name: str, size: int, fn: str) -> torch.Tensor | None:
    if p is None:
        return None
    if tuple(p.shape) != (size,):
        raise InputError(f"{fn}: {name} must have shape ({size},) to match the last dimension, got {tuple(p.shape)}.")
    return p.contiguous()


def _rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    """Move ``dim`` last and flatten the rest: (R, L) contiguous, plus the moved shape."""
    if x.dim() == 2 and dim == 1:  # already rows: no views to make (a small op's host time)
        return x.contiguous(), x.shape
    if x.dim() == 0:
        xm = x.reshape(1)
    elif dim == x.dim() - 1:
        xm = x
    else:
        xm = x.movedim(dim, -1)
    return xm.reshape(-1, xm.shape[-1]).contiguous(), xm.shape


def _restore(y: torch.Tensor, moved_shape: torch.Size, dim: int, ndim: int) -> torch.Tensor:
    if ndim == 2 and dim == 1:
        return y
    if ndim == 0:
        return y.reshape(())
    if dim == ndim - 1:
        return y.reshape(moved_shape)
    return y.reshape(moved_shape).movedim(-1, dim).contiguous()


# --------------------------------------------------------------------------- matmul


def matmul(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *, portable: bool = False
) -> torch.Tensor:
    """``a @ b (+ bias)`` with torch.matmul's shape rules (1-D, 2-D, batched, broadcast).

    Covers mm, addmm, linear (pass ``weight.t()``: the view is not copied), bmm and
    matmul. ``bias`` must broadcast to the result; a bias over the last dimension is
    added in the accumulation precision after the whole K reduction, any other bias is
    added elementwise to the rounded product. Only a 1-D (N,) bias (or a scalar) counts as
    one over the last dimension: a (1, N) or (B, 1, N) bias is added to the rounded
    product whatever M and B are, so that a row's bits do not depend on them.
    """
    fn = "matmul"
    a = _check(a, "a", fn)
    b = _check(b, "b", fn)
    if bias is not None:
        bias = _check(bias, "bias", fn)
    _same_dtype(fn, a=a, b=b, bias=bias)
    backend = _dispatch(fn, portable, a=a, b=b, bias=bias)
    if (a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0] and a.numel() and b.numel()
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == b.shape[1]))):
        # the mode's mm and addmm: the general path below gives the same call, after more views
        return backend.matmul(a, b, None if bias is None else bias.contiguous())
    if a.dim() == 0 or b.dim() == 0:
        raise InputError(f"{fn}: both arguments need at least 1 dimension, got shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    a_vec, b_vec = a.dim() == 1, b.dim() == 1
    a2 = a.unsqueeze(0) if a_vec else a
    b2 = b.unsqueeze(-1) if b_vec else b
    k, m, n = a2.shape[-1], a2.shape[-2], b2.shape[-1]
    if b2.shape[-2] != k:
        raise InputError(
            f"{fn}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied: "
            f"a's last dimension ({k}) must equal b's {'only' if b_vec else 'second-to-last'} dimension ({b2.shape[-2]})."
        )
    if b2.dim() == 2:
        batch: tuple[int, ...] = tuple(a2.shape[:-2])
    else:
        try:
            batch = tuple(torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]))
        except RuntimeError as e:
            raise InputError(
                f"{fn}: batch dimensions {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])} do not broadcast."
            ) from e
    out_shape = (*batch, m, n)
    # The result drops the dimension of a 1-D a (m) or b (n); bias broadcasts to it.
    res_shape = (*batch, *(() if a_vec else (m,)), *(() if b_vec else (n,)))
    vec_bias, other_bias = _split_bias(bias, res_shape, n, a_vec, b_vec, fn)

    if math.prod(out_shape) == 0:
        out = torch.empty(out_shape, dtype=a.dtype, device=a.device)
    elif k == 0:
        out = torch.zeros(out_shape, dtype=a.dtype, device=a.device)
        if vec_bias is not None:
            out = out + vec_bias
            if portable:  # the canonical orders' output step: NaN is the canonical quiet NaN
                out = out.masked_fill(out.isnan(), math.nan)
    elif b2.dim() == 2:
        out = backend.matmul(a2.reshape(-1, k), b2, vec_bias).reshape(out_shape)
    else:
        a3 = a2.expand(*batch, m, k).reshape(-1, m, k)
        b3 = b2.expand(*batch, k, n).reshape(-1, k, n)
        out = backend.matmul(a3, b3, vec_bias).reshape(out_shape)
    if other_bias is not None:
        out = (out.to(torch.float64 if a.dtype == torch.float64 else torch.float32) + other_bias).to(a.dtype)
        if portable:  # torch's add and rounding keep a NaN's sign (bfloat16: 0xFFFF here)
            out = out.masked_fill(out.isnan(), math.nan)
    if a_vec:
        out = out.squeeze(-2)
    if b_vec:
        out = out.squeeze(-1)
    return out


def grouped_matmul(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, portable: bool = False, check_offsets: bool = True
) -> torch.Tensor:
    """The experts' products of an MoE layer: ``torch._grouped_mm(a, b, offs=offs)``.

    ``a`` (S, K) holds the tokens sorted by expert, ``b`` (G, K, N) one matrix per expert
    (any strides: a transposed weight view is not copied), ``offs`` (G,) int32 the
    running ends of the groups (``torch.cumsum`` of the tokens per expert). Row ``r`` of
    group ``g`` gets ``a[r] @ b[g]``, bitwise what :func:`matmul` gives for that row
    alone: how many tokens an expert got, and where, changes no bit. Rows past
    ``offs[-1]`` are zero (torch leaves them uninitialised).

    ``check_offsets=True`` reads ``offs`` on the host and raises ``InputError`` unless
    they are nondecreasing within [0, S]; for CUDA tensors that waits for the GPU. With
    ``False`` the CUDA backend reads them on the device only (no synchronisation; invalid
    offsets are clamped into [0, S], never read past ``a``); offsets on the CPU are always
    checked.
    """
    fn = "grouped_matmul"
    a = _check(a, "a", fn)
    b = _check(b, "b", fn)
    _same_dtype(fn, a=a, b=b)
    check_offsets = _flag(check_offsets, "check_offsets", fn)
    if not isinstance(offs, torch.Tensor) or offs.dtype != torch.int32 or offs.dim() != 1:
        desc = f"a {offs.dim()}-D {offs.dtype} tensor" if isinstance(offs, torch.Tensor) else type(offs).__name__
        raise InputError(f"{fn}: offs must be a 1-D int32 tensor of group ends, got {desc}; "
                         "use torch.cumsum(counts, 0, dtype=torch.int32).")
    backend = _dispatch(fn, portable, a=a, b=b, offs=offs)
    if a.dim() != 2 or b.dim() != 3:
        raise InputError(f"{fn}: a must be 2-D (S, K) and b 3-D (G, K, N), got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    s, k = a.shape
    g, kb, n = b.shape
    if kb != k:
        raise InputError(f"{fn}: a's K ({k}) must equal b's second dimension ({kb}).")
    if g == 0:
        raise InputError(f"{fn}: b must hold at least one group (G >= 1), got shape {tuple(b.shape)}.")
    if offs.shape[0] != g:
        raise InputError(f"{fn}: offs must hold one end per group of b ({g}), got {offs.shape[0]}.")
    # Offsets on the host cost nothing to read: checked whatever check_offsets says (the
    # CPU backends read them there anyway), also when the product is empty.
    if check_offsets or offs.device.type == "cpu":
        from detkit.kernels._grouped import offsets_problem

        problem = offsets_problem(offs.tolist(), s)
        if problem:
            raise InputError(f"{fn}: {problem}; pass int32 row counts summed up (torch.cumsum).")
    if s == 0 or n == 0 or k == 0:
        return torch.zeros((s, n), dtype=a.dtype, device=a.device)
    return backend.grouped_matmul(a, b, offs)


def _split_bias(
    bias: torch.Tensor | None, res_shape: Sequence[int], n: int, a_vec: bool, b_vec: bool, fn: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(bias over the last dim as (N,), other bias) - at most one is not None.

    ``res_shape`` is the result's shape (without the dimension of a 1-D a or b); the
    other bias comes back in the layout of the (..., M, N) product, those dimensions
    restored as size 1.
    """
    if bias is None:
        return None, None
    try:
        full = torch.broadcast_shapes(bias.shape, tuple(res_shape))
    except RuntimeError as e:
        raise InputError(f"{fn}: bias of shape {tuple(bias.shape)} does not broadcast to the result {tuple(res_shape)}.") from e
    if tuple(full) != tuple(res_shape):
        raise InputError(f"{fn}: bias of shape {tuple(bias.shape)} would enlarge the result {tuple(res_shape)}.")
    # Only a bias of at most one dimension is fused: a (1, N) bias may be one row of a
    # per-row (M, N) bias (a row computed alone), and fusing it only then gave that row
    # other bits than in its batch (as addmm's adapter, which fuses only a 1-D self).
    # With a 1-D b the result's last dimension is M, not N (= 1): only a constant is fused.
    if bias.dim() == 0 or (bias.dim() == 1 and (not b_vec or bias.shape[0] == 1)):
        return bias.reshape(-1).expand(n).contiguous(), None
    if b_vec:
        bias = bias.unsqueeze(-1)
    if a_vec and bias.dim() >= 2:
        bias = bias.unsqueeze(-2)
    return None, bias


# --------------------------------------------------------------------------- softmax


def _cast_first(x: object, dtype: torch.dtype | None, fn: str) -> torch.Tensor:
    """``x`` checked, after casting it to ``dtype`` first when one is given (torch's
    ``dtype=`` of softmax and cumsum)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}.")
    if dtype is not None:
        if dtype not in SUPPORTED_DTYPES:
            raise InputError(f"{fn}: dtype {dtype!r} is not supported; use torch.float32, torch.bfloat16, "
                             "torch.float16 or torch.float64.")
        x = x.to(dtype)
    return _check(x, "x", fn)


def _softmax(x: torch.Tensor, dim: int, dtype: torch.dtype | None, portable: bool, log: bool) -> torch.Tensor:
    fn = "log_softmax" if log else "softmax"
    x = _cast_first(x, dtype, fn)
    backend = _dispatch(fn, portable, x=x)
    d = _dim(dim, x.dim(), fn)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    rows, moved = _rows(x, d)
    return _restore(backend.softmax(rows, log), moved, d, x.dim())


def softmax(x: torch.Tensor, dim: int = -1, *, dtype: torch.dtype | None = None, portable: bool = False) -> torch.Tensor:
    """Softmax over ``dim`` (``dtype``: cast the input first, like torch.softmax)."""
    return _softmax(x, dim, dtype, portable, log=False)


def log_softmax(
    x: torch.Tensor, dim: int = -1, *, dtype: torch.dtype | None = None, portable: bool = False
) -> torch.Tensor:
    """Log-softmax over ``dim`` (``dtype``: cast the input first, like torch.log_softmax)."""
    return _softmax(x, dim, dtype, portable, log=True)


# --------------------------------------------------------------------------- norms


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None, *, portable: bool = False
) -> torch.Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight.

    ``eps=None`` means torch's default: the machine epsilon of the accumulation dtype,
    ``torch.finfo(torch.float32).eps`` (``float64``'s for float64 x), also for bfloat16
    and float16 x, as torch's rms_norm (its opmath type).
    """
    fn = "rms_norm"
    x = _check(x, "x", fn)
    if weight is not None:
        weight = _check(weight, "weight", fn)
    _same_dtype(fn, x=x, weight=weight)
    backend = _dispatch(fn, portable, x=x, weight=weight)
    if x.dim() == 0:
        raise InputError(f"{fn}: x needs at least one dimension (the normalised one).")
    # torch takes the epsilon of its opmath type: bfloat16's (2^-7) or float16's (2^-10)
    # swamped mean(x^2) for rows of small values (bf16 rows near 1e-3 came out ~100x small).
    e = _eps(eps, _F64_EPS if x.dtype == torch.float64 else _F32_EPS, fn)
    weight = _last_dim_param(weight, "weight", x.shape[-1], fn)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    rows, moved = _rows(x, x.dim() - 1)
    return _restore(backend.rms_norm(rows, weight, e), moved, x.dim() - 1, x.dim())


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    portable: bool = False,
) -> torch.Tensor:
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (biased var)."""
    fn = "layer_norm"
    x = _check(x, "x", fn)
    if weight is not None:
        weight = _check(weight, "weight", fn)
    if bias is not None:
        bias = _check(bias, "bias", fn)
    _same_dtype(fn, x=x, weight=weight, bias=bias)
    backend = _dispatch(fn, portable, x=x, weight=weight, bias=bias)
    if x.dim() == 0:
        raise InputError(f"{fn}: x needs at least one dimension (the normalised one).")
    e = _eps(eps, 1e-5, fn)
    weight = _last_dim_param(weight, "weight", x.shape[-1], fn)
    bias = _last_dim_param(bias, "bias", x.shape[-1], fn)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    rows, moved = _rows(x, x.dim() - 1)
    return _restore(backend.layer_norm(rows, weight, bias, e), moved, x.dim() - 1, x.dim())


# --------------------------------------------------------------------------- sum / mean


def _reduce(x: torch.Tensor, dim: int, keepdim: bool, portable: bool, mean: bool) -> torch.Tensor:
    fn = "mean" if mean else "sum"
    x = _check(x, "x", fn)
    backend = _dispatch(fn, portable, x=x)
    d = _dim(dim, x.dim(), fn)
    keepdim = _flag(keepdim, "keepdim", fn)
    # A 0-dim tensor is a row of one, reduced by the backend like any other: returning x
    # itself kept -0.0 (the anchored sum of a zero row is +0.0, as torch's) and, under
    # portable=True, a NaN's payload (the spec's outputs carry the canonical NaN).
    out_shape = list(x.shape)
    if x.dim() > 0:
        if keepdim:
            out_shape[d] = 1
        else:
            del out_shape[d]
    if x.numel() == 0:
        fill = math.nan if mean and x.shape[d] == 0 else 0.0
        return torch.full(out_shape, fill, dtype=x.dtype, device=x.device)
    rows, _ = _rows(x, d)
    return backend.row_sum(rows, mean).reshape(out_shape)


def sum(x: torch.Tensor, dim: int = -1, keepdim: bool = False, *, portable: bool = False) -> torch.Tensor:  # noqa: A001
    """Sum over one dimension, accumulated in float32 (float64 for float64)."""
    return _reduce(x, dim, keepdim, portable, mean=False)


def mean(x: torch.Tensor, dim: int = -1, keepdim: bool = False, *, portable: bool = False) -> torch.Tensor:
    """Mean over one dimension, accumulated in float32 (float64 for float64)."""
    return _reduce(x, dim, keepdim, portable, mean=True)


# --------------------------------------------------------------------------- cumsum


def cumsum(x: torch.Tensor, dim: int = -1, *, dtype: torch.dtype | None = None,
           portable: bool = False) -> torch.Tensor:
    """Running sum along ``dim`` (torch.cumsum semantics; ``dtype``: cast the input first).

    One running sum per row, from +0.0, left to right, in float64 for float32 and float64
    inputs and in float32 for bfloat16/float16 ones, each output rounded once into the
    dtype: the order of ``docs/canonical-orders.md`` under both guarantees, and the bits of
    torch's CPU cumsum (NaN payloads aside). Zeros in front of a row change nothing. A
    0-d tensor is not summed: its cumsum is itself, as torch's (-0.0 stays -0.0).
    """
    fn = "cumsum"
    x = _cast_first(x, dtype, fn)
    backend = _dispatch(fn, portable, x=x)
    d = _dim(dim, x.dim(), fn)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    rows, moved = _rows(x, d)
    y = backend.row_cumsum(rows)
    if x.dim() == 0:
        # torch's cumsum of a 0-d tensor is a copy of it (on every device), not a running
        # sum from +0.0: -0.0 stays -0.0. +0.0 + v is v for every other v (NaN aside, which
        # keeps the kernel's canonical NaN), so only a zero takes the input's bits.
        y = torch.where(rows == 0, rows, y)
    return _restore(y, moved, d, x.dim())


# --------------------------------------------------------------------------- triangular solve


def solve_triangular(a: torch.Tensor, b: torch.Tensor, *, upper: bool, left: bool = True,
                     unitriangular: bool = False, portable: bool = False) -> torch.Tensor:
    """``torch.linalg.solve_triangular`` semantics: X with ``a @ X = b`` (``left``) or
    ``X @ a = b``, for triangular ``a`` (..., n, n); batch dimensions broadcast.

    The canonical order of ``docs/canonical-orders.md`` under both guarantees: forward
    substitution, each element one fma chain over the solved elements above it in its
    column, in order, then one division by the diagonal (none if ``unitriangular``). An
    upper solve is the lower one with rows and columns reversed; a right solve is the left
    one of the transposes. Only the triangle named by ``upper`` is read (without its
    diagonal if ``unitriangular``). A zero diagonal gives inf/NaN, as IEEE division does.
    Returns a contiguous tensor.
    """
    fn = "solve_triangular"
    a = _check(a, "a", fn)
    b = _check(b, "b", fn)
    _same_dtype(fn, a=a, b=b)
    backend = _dispatch(fn, portable, a=a, b=b)
    upper = _flag(upper, "upper", fn)
    left = _flag(left, "left", fn)
    unit = _flag(unitriangular, "unitriangular", fn)
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise InputError(f"{fn}: a must be (..., n, n) square matrices, got shape {tuple(a.shape)}.")
    n = a.shape[-1]
    if b.dim() < 2 or (b.shape[-2] if left else b.shape[-1]) != n:
        want = f"(..., {n}, k)" if left else f"(..., k, {n})"
        raise InputError(f"{fn}: b must be {want} to match a of shape {tuple(a.shape)} with left={left}, "
                         f"got shape {tuple(b.shape)}.")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError as e:
        raise InputError(f"{fn}: the batch dimensions of a {tuple(a.shape)} and b {tuple(b.shape)} do not "
                         "broadcast.") from e
    out_shape = (*batch, *b.shape[-2:])
    if not left:  # X a = b  <=>  a^T X^T = b^T
        a, b, upper = a.mT, b.mT, not upper
    if upper:  # the lower solve with rows and columns reversed
        a, b = a.flip(-2, -1), b.flip(-2)
    k = b.shape[-1]
    if math.prod(out_shape) == 0:
        return torch.zeros(out_shape, dtype=b.dtype, device=b.device)
    flat_a = a.expand(*batch, n, n).reshape(-1, n, n).contiguous()
    flat_b = b.expand(*batch, n, k).reshape(-1, n, k).contiguous()
    x = backend.solve_lower(flat_a, flat_b, unit).reshape(*batch, n, k)
    if upper:
        x = x.flip(-2)
    if not left:
        x = x.mT
    return x.contiguous()


# --------------------------------------------------------------------------- attention


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    portable: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` semantics (no dropout).

    ``q``: (..., H, Lq, E), ``k``: (..., Hk, Lk, E), ``v``: (..., Hk, Lk, Ev). A bool
    mask marks attended keys with True; a float mask is added to the scaled scores;
    ``is_causal`` is SDPA's top-left aligned causal mask. With ``enable_gqa``, query head
    h uses key/value head h // (H // Hk). A query with no attended key returns zeros,
    like torch's CPU SDPA; a NaN in a query or an attended key gives a NaN row (torch's
    CPU SDPA returns zeros for a NaN query, which hides it).
    """
    fn = "attention"
    q = _check(q, "q", fn)
    k = _check(k, "k", fn)
    v = _check(v, "v", fn)
    _same_dtype(fn, q=q, k=k, v=v)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise InputError(f"{fn}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}.")
        _dense(attn_mask, "attn_mask", fn)  # a sparse bool mask failed in expand()
        if attn_mask.dtype != torch.bool:
            attn_mask = _check(attn_mask, "attn_mask", fn)
            if attn_mask.dtype not in (torch.float32, q.dtype):
                # SDPA refuses it too; a wider mask would be rounded silently
                raise InputError(f"{fn}: a float attn_mask must be float32 or q's dtype ({q.dtype}), got "
                                 f"{attn_mask.dtype}; convert it, or pass a bool mask.")
        attn_mask = attn_mask.detach()
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise InputError(f"{fn}: scale must be a finite number or None (1/sqrt(E)), got {scale!r}.")
    backend = _dispatch(fn, portable, q=q, k=k, v=v, attn_mask=attn_mask)
    if not (q.dim() == k.dim() == v.dim() and q.dim() >= 2):
        raise InputError(
            f"{fn}: q, k, v must have the same number (>= 2) of dimensions, got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    is_causal = _flag(is_causal, "is_causal", fn)
    enable_gqa = _flag(enable_gqa, "enable_gqa", fn)
    if attn_mask is not None and is_causal:
        raise InputError(f"{fn}: pass either attn_mask or is_causal=True, not both (as in SDPA).")
    lq, e = q.shape[-2], q.shape[-1]
    lk, ev = k.shape[-2], v.shape[-1]
    if k.shape[-1] != e:
        raise InputError(f"{fn}: q and k must have the same last dimension, got {e} and {k.shape[-1]}.")
    if v.shape[-2] != lk:
        raise InputError(f"{fn}: k and v must have the same sequence length, got {lk} and {v.shape[-2]}.")
    if k.shape[:-1] != v.shape[:-1] and k.shape[:-2] != v.shape[:-2]:
        raise InputError(f"{fn}: k and v must have the same leading dimensions, got {tuple(k.shape)} and {tuple(v.shape)}.")

    # Normalise to (B, H, L, E) with the batch dims flattened.
    def four(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, 1, *t.shape) if t.dim() == 2 else t

    q4, k4, v4 = four(q), four(k), four(v)
    h, hk = q4.shape[-3], k4.shape[-3]
    if hk != h:
        if enable_gqa and hk > 0 and h % hk == 0:
            pass
        elif hk == 1:
            k4 = k4.expand(*k4.shape[:-3], h, lk, e)
            v4 = v4.expand(*v4.shape[:-3], h, lk, ev)
        else:
            hint = "" if enable_gqa else " (pass enable_gqa=True for grouped-query attention)"
            raise InputError(
                f"{fn}: q has {h} heads but k/v have {hk}; they must match{hint}, or H must be a multiple of Hk with enable_gqa."
            )
    try:
        # torch.broadcast_shapes is Python code: the same batch dims skip it (a decode
        # step's host time)
        batch = tuple(q4.shape[:-3] if q4.shape[:-3] == k4.shape[:-3] else
                      torch.broadcast_shapes(q4.shape[:-3], k4.shape[:-3]))
    except RuntimeError as err:
        raise InputError(f"{fn}: batch dimensions of q {tuple(q.shape)} and k {tuple(k.shape)} do not broadcast.") from err
    if batch != tuple(q4.shape[:-3]):
        raise InputError(f"{fn}: k/v batch dimensions {tuple(k.shape[:-3])} would enlarge q's {tuple(q.shape[:-3])}.")
    kh = k4.shape[-3]
    nb = math.prod(batch)
    q4 = q4.reshape(nb, h, lq, e)
    k4 = k4.expand(*batch, kh, lk, e).reshape(nb, kh, lk, e)
    v4 = v4.expand(*batch, kh, lk, ev).reshape(nb, kh, lk, ev)
    out_shape = (*q.shape[:-1], ev)

    target = (*batch, h, lq, lk)
    mask4: torch.Tensor | None = None
    if attn_mask is not None:
        try:
            full = target if tuple(attn_mask.shape) == target else torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError as err:
            raise InputError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}.") from err
        if tuple(full) != target:
            raise InputError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} would enlarge the scores {target}.")
        if attn_mask.dtype != torch.bool:
            # Widen before broadcasting (exact; the view stays small).
            attn_mask = attn_mask.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        mask4 = attn_mask.expand(target).reshape(nb, h, lq, lk)
    elif is_causal:
        mask4 = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril().expand(nb, h, lq, lk)

    if math.prod(out_shape) == 0:
        return torch.empty(out_shape, dtype=q.dtype, device=q.device)
    if lk == 0:
        return torch.zeros(out_shape, dtype=q.dtype, device=q.device)
    s = (1.0 / math.sqrt(e) if e > 0 else 1.0) if scale is None else float(scale)
    out = backend.attention(q4.contiguous(), k4.contiguous(), v4.contiguous(), mask4, s)
    return out.reshape(out_shape)
