"""aten adapters: translate one aten op's arguments into a ``detkit.kernels`` call.

This is the middle layer between the kernels (``detkit.kernels``, which know nothing
about aten) and the mode switch (``detkit.mode``, which registers the overrides and
owns the state). An adapter receives the aten op's arguments exactly as the dispatcher
passes them, plus a :class:`Call` carrying the ``portable`` flag and the op's original
kernel, and returns what the aten op returns. When the arguments fall outside what the
kernels cover it raises :class:`Unsupported`; the mode then runs the original kernel
and counts the call, so nothing falls back silently.

Two canonicalisations make unfused ops invariant where the plain kernels alone would
not be (they are what lets eager attention and odd-sized activations pass the Hugging
Face tests); a third invariance is the kernels' own:

* **Leading zeros of a batched matmul row are skipped** (``bmm``, ``baddbmm``). Eager
  attention computes ``probs @ V`` over all keys, as a batched product (torch.matmul
  of 4-D tensors is ``bmm``), and a left-padded row has exact-zero probabilities on its
  padding keys. Each row of ``a`` is reduced from its first nonzero element on, so the
  row gives the same bits with or without padding in front, whatever blocking the
  kernel uses over K (the products skipped are exact zeros; when any skipped row of
  ``b`` holds inf/NaN nothing is skipped, so IEEE semantics are kept). A backend whose
  batched product is one fma chain over k from +0 (the CPU's ``portable=False``,
  ``BATCHED_MATMUL_SEQUENTIAL_IN_K``) gets the same bits without the skip, so it is
  not done there: it cost a pass over ``a`` and one kernel call per distinct start. 2-D products
  (``mm``, ``addmm``: every ``nn.Linear``) are left alone: their K is a feature
  dimension, which padding never lengthens, and skipping there cost a kernel call per
  distinct start after a ReLU and, on CUDA, a host synchronisation per layer.
* **Softmax needs no help**: every backend anchors its sum at the row's first entry
  whose ``exp`` is nonzero (``detkit.kernels._backend``), so masked padding keys
  (``finfo.min``) in front of a row change nothing, with no pass over the scores here
  and no host synchronisation on CUDA.
* **Position-dependent elementwise ops run in aligned slices.** torch's vectorised
  CPU loops compute the last ``n mod (2 * vector width)`` elements of a tensor, and of
  each thread's chunk, with a scalar code path that rounds differently for ``silu``,
  ``sigmoid``, ``gelu(tanh)``, ``softplus``, ``mish``, ``sinh``, ``elu``, ``exp2``,
  ``cosh``, ``pow``, ``atan2``, ``atanh``, ``digamma`` (bfloat16), and
  ``rsqrt`` in 16-bit (measured on AVX-512: ``silu`` over rows of 688 float32 values
  changes bits with the batch size). The adapter pads the flattened tensor to a
  multiple of ``_ALIGN`` elements and calls the original kernel on slices of
  ``_SLICE`` elements, below torch's parallel grain, so every element takes the
  vectorised path on one thread; ``pow`` with a tensor exponent or a scalar base, and
  ``atan2``, the same with both operands broadcast and padded alike.

In portable mode (``Call.portable``) the elementwise functions the portable backends
implement (``ELEMENTWISE_PORTABLE``: exp, log, rsqrt, sigmoid, silu, tanh, erf, sin,
cos, log1p, gelu with either ``approximate``, and softplus with torch's default beta and
threshold) go to that backend's ``elementwise(name, x)`` for
float32/bfloat16/float16 instead: one float32
evaluation per element in a fixed sequence of IEEE operations, rounded once, so the
bits are the same on every instruction set (and position independent); so does
``pow(x, 3)``, to the backend's ``cube``, and every other ``pow`` (but exponents 0, 1,
2 and 0.5) to the backend's ``pow(x, y)`` (``Pow``). On the CUDA dispatch key only these
functions (and ``pow``) are registered, and only portable mode routes them (torch's CUDA
elementwise kernels are position independent already).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch

from detkit import _interpolation
from detkit._ieee import divided
from detkit._reentry import routed
from detkit.errors import InputError
from detkit.kernels._grouped import offsets_problem

__all__ = [
    "COMPLEX_POSITION_DEPENDENT",
    "COMPOSED_PORTABLE",
    "ELEMENTWISE_EXACT",
    "ELEMENTWISE_LIBM",
    "ELEMENTWISE_PORTABLE",
    "EXACT_OPS",
    "FOLDS",
    "INTEGER_EXACT_OPS",
    "KNOWN_POSITION_DEPENDENT",
    "OVERRIDES",
    "ROUTED_BY_DECOMPOSITION",
    "Call",
    "OpOverride",
    "Unsupported",
    "kernels_module",
    "portable_backend",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# What the portable backends compute (float64 keeps the aligned torch path).
_PORTABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The portable backends' ``ELEMENTWISE_OPS`` (kept here so importing the mode does not
# import numba; tests/test_mode_portable.py checks the two agree).
ELEMENTWISE_PORTABLE: frozenset[str] = frozenset(
    {"exp", "log", "rsqrt", "sigmoid", "silu", "tanh", "erf", "gelu", "sin", "cos", "softplus", "log1p"}
)
# gelu's ``approximate`` argument picks the backend function.
_GELU_PORTABLE = {"none": "gelu", "tanh": "gelu_tanh"}
# The canonical softplus is torch's with its default beta and threshold.
_SOFTPLUS_DEFAULTS = (1, 20)
# A multiple of two AVX-512 float32 vectors (torch unrolls by 2) and of every smaller ISA.
_ALIGN = 64
# torch's at::internal::GRAIN_SIZE: TensorIterator splits work across threads only above it.
_SLICE = 32768


class Unsupported(Exception):
    """The arguments are outside what the kernels cover; run the original kernel.

    ``benign`` marks cases whose original result is already exact and order free
    (integer reductions, empty tensors, exponents whose result is correctly rounded),
    which are reported as passed through rather than as fallbacks.
    """

    def __init__(self, reason: str, *, benign: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.benign = benign


def _no_note(reason: str) -> None:
    del reason


class Call(NamedTuple):
    """What an adapter needs besides the aten arguments (a tuple: one is made per routed
    call, at half a frozen dataclass's cost)."""

    portable: bool
    original: Callable[..., Any]  # the op's previous kernel, dispatch keys already bound
    # Portable mode: an adapter that computed its result with torch's own math library
    # (batch invariant, but not in the canonical orders) reports why here; the mode counts
    # it in Coverage.not_portable, so a routed call never passes silently for portable.
    not_portable: Callable[[str], None] = _no_note


class Delegated(NamedTuple):
    """An adapter's result that another routed op computed and counted (``layer_norm``
    through ``native_layer_norm``): the mode returns ``value`` and counts nothing more."""

    value: Any


Adapter = Callable[..., Any]


@dataclass(frozen=True)
class OpOverride:
    """One aten overload routed by the mode.

    ``composite``: the op is CompositeImplicitAutograd (no autograd formula of its own);
    the mode also registers an autograd-key gate that keeps torch's decomposition when a
    gradient is needed, so training through the mode still works.
    """

    name: str
    adapter: Adapter
    kind: str
    composite: bool = False
    # C++ code may pass this op a Python scalar as a Tensor argument (a "wrapped number":
    # pow.Scalar's CPU kernel calls pow_out(wrapped(base), exponent)); a Python kernel
    # receives it as a number, which the original kernel's boxed call refuses.
    numbers_as_tensors: bool = False
    # The calls the adapter is for, tested before anything else (mul with a complex
    # operand): the others go straight to torch's kernel, uncounted, as if the op were not
    # routed. For ops called so often that an adapter call on each would cost.
    claims: Callable[..., bool] | None = None
    # The adapter computes every float dtype, float64 included, as a fixed sequence of torch
    # elementwise operations (the same bits on every device): a float64 call is routed in
    # portable mode and on CUDA too, where the kernels' own float64 is not.
    any_float: bool = False

    def __post_init__(self) -> None:
        if self.kind not in {"matmul", "softmax", "reduction", "scan", "solve", "norm", "attention", "elementwise"}:
            raise ValueError(f"unknown override kind {self.kind!r} for {self.name}")
        if "::" in self.name:
            raise ValueError(f"override names are aten overload names without a namespace, got {self.name!r}")

    @property
    def impl_name(self) -> str:
        """The name ``torch.library`` uses: the default overload has no suffix."""
        return self.name.removesuffix(".default")

    @property
    def qualname(self) -> str:
        return f"aten::{self.impl_name}"

    @property
    def overload(self) -> Any:
        packet, _, overload = self.name.partition(".")
        return getattr(getattr(torch.ops.aten, packet), overload or "default")


def kernels_module() -> ModuleType:
    """The kernel front end (a function so tests can substitute stand-ins)."""
    import detkit.kernels

    return detkit.kernels


def portable_backend(device_type: str) -> ModuleType:
    """The portable backend for a device type (a function so tests can substitute it).

    Raises ``BackendUnavailable`` when there is none: portable mode never quietly
    computes a routed function with torch's non-portable kernel instead.
    """
    from detkit.kernels._backend import backend_for

    return backend_for(device_type, True)


# ----------------------------------------------------------------------------- helpers


def _float(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.layout != torch.strided:
            raise Unsupported(f"{t.layout} tensor")
        if t.dtype not in _FLOATS:
            exact = not (t.is_floating_point() or t.is_complex())
            raise Unsupported(f"{t.dtype} input", benign=exact)


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """Detach: kernels hand tensors to numpy, which refuses tensors that require grad.

    (The override runs below autograd; torch's autograd formula still records the op.)
    """
    return None if t is None else t.detach()


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_call(fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    """Call a kernel; an input it rejects becomes a counted fallback, not a crash."""
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        raise Unsupported(f"kernel rejected the input: {e}") from e


def _scalar_is(x: Any, value: float) -> bool:
    return not isinstance(x, torch.Tensor) and not isinstance(x, bool) and x == value


# ----------------------------------------------------------------------------- matmul


def _leading_zero_starts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per row of ``a`` (shape (..., M, K)), the index of its first nonzero; None if all 0."""
    k = a.shape[-1]
    if k <= 1 or bool((a[..., 0] != 0).all()):
        return None
    nonzero = a != 0
    first = nonzero.to(torch.uint8).argmax(-1)
    # An all-zero row keeps its last term, so the result keeps the sign rules of a sum.
    starts = torch.where(nonzero.any(-1), first, torch.full_like(first, k - 1))
    skip = int(starts.max())
    if skip == 0:
        return None
    # A row skips nothing if its own batch entry's b has inf/NaN among the skipped rows
    # (0 * inf must stay NaN). Decided per batch entry: inf in another entry's b (another
    # sequence's values) or another row's longer padding must not change this row's bits.
    bad = ~torch.isfinite(b[..., :skip, :]).all(-1)  # (B, skip)
    limit = torch.where(bad.any(-1), bad.to(torch.uint8).argmax(-1), skip)  # first bad row of b
    starts = torch.where(starts <= limit.unsqueeze(-1), starts, 0)
    if int(starts.max()) == 0:
        return None
    return starts


def _sequential_in_k(kn: Any, device_type: str, portable: bool) -> bool:
    """Whether leading zeros of a batched-product row already change no bit; kernels
    that do not say (test stand-ins) are assumed to block K."""
    query = getattr(kn, "batched_matmul_is_sequential_in_k", None)
    return query is not None and bool(query(device_type, portable))


def _matmul(call: Call, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
            skip_leading_zeros: bool = False) -> torch.Tensor:
    """2-D (M,K)@(K,N) or 3-D (B,M,K)@(B,K,N); with ``skip_leading_zeros`` (3-D only: the
    batched products) each row of ``a`` is reduced from its first nonzero element on."""
    _float(a, b, bias)
    if a.dtype != b.dtype or (bias is not None and bias.dtype != a.dtype):
        raise Unsupported("mixed dtypes", benign=True)  # torch raises its own error
    if a.numel() == 0 or b.numel() == 0:
        raise Unsupported("empty operand", benign=True)
    a, b, bias = _plain(a), _plain(b), _plain(bias)
    kn = kernels_module()
    skip = skip_leading_zeros and not _sequential_in_k(kn, a.device.type, call.portable)
    starts = _leading_zero_starts(a, b) if skip else None
    if starts is None:
        return _kernel_call(kn.matmul, a, b, bias, portable=call.portable)
    out = torch.empty((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device=a.device)
    for start in torch.unique(starts).tolist():
        rows = starts == start  # (B, M): only batched products skip
        # Batch entries holding such a row; their other rows are computed and dropped.
        bidx = rows.any(-1).nonzero().squeeze(1)
        part = _kernel_call(kn.matmul, a[bidx][:, :, start:], b[bidx][:, start:], bias, portable=call.portable)
        keep = rows[bidx].unsqueeze(-1)
        out.index_copy_(0, bidx, torch.where(keep, part, out[bidx]))
    return out


def _scaled(prod: torch.Tensor, alpha: Any) -> torch.Tensor:
    return prod if _scalar_is(alpha, 1) else prod * alpha


def _add_scaled(call: Call, self: torch.Tensor, prod: torch.Tensor, beta: Any, alpha: Any) -> torch.Tensor:
    """beta * self + alpha * prod, elementwise (row independent), as torch's addmm family."""
    _float(self)
    if self.dtype != prod.dtype:
        raise Unsupported("mixed dtypes", benign=True)  # torch raises its own error
    if _scalar_is(beta, 0):  # torch ignores self entirely (even NaN) when beta == 0
        return _scaled(prod, alpha)
    term = self if _scalar_is(beta, 1) else self * beta
    return (term + _scaled(prod, alpha)).to(prod.dtype).expand(prod.shape).contiguous()


# The operand ranks each product op takes (a, b): torch refuses any other.
_PRODUCT_RANKS: dict[str, tuple[int, int]] = {
    "mm": (2, 2), "addmm": (2, 2), "bmm": (3, 3), "baddbmm": (3, 3), "mv": (2, 1), "addmv": (2, 1), "dot": (1, 1),
}


def _product_shapes(op: str, a: torch.Tensor, b: torch.Tensor, self: torch.Tensor | None = None) -> None:
    """torch's shape rules for ``op``. The kernels broadcast as ``torch.matmul`` does, so a
    call torch refuses (``mm`` of a 3-D tensor, ``bmm`` of unequal batches, a ``self`` that
    does not expand to the product) returned a result under the mode only; it goes to
    torch's kernel instead, which raises its own error (nothing is computed: benign)."""
    a_dim, b_dim = _PRODUCT_RANKS[op]
    ok = a.dim() == a_dim and b.dim() == b_dim
    if ok:
        ok = a.shape[-1] == b.shape[0 if b_dim == 1 else -2] and (a_dim < 3 or a.shape[0] == b.shape[0])
    if ok and self is not None:
        out = (*a.shape[:-1], *(b.shape[-1:] if b_dim > 1 else ()))
        ok = self.dim() <= len(out) and all(s in (1, o) for s, o in zip(reversed(self.shape), reversed(out)))
    if not ok:
        shapes = ", ".join(str(tuple(t.shape)) for t in (self, a, b) if t is not None)
        raise Unsupported(f"{op} of shapes {shapes}, which torch refuses", benign=True)


def mm(call: Call, self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    _product_shapes("mm", self, mat2)
    return _matmul(call, self, mat2)


def bmm(call: Call, self: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    _product_shapes("bmm", self, mat2)
    return _matmul(call, self, mat2, skip_leading_zeros=True)


def addmm(
    call: Call, self: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: Any = 1, alpha: Any = 1
) -> torch.Tensor:
    _product_shapes("addmm", mat1, mat2, self)
    n = mat2.shape[-1]
    if (
        _scalar_is(beta, 1)
        and _scalar_is(alpha, 1)
        and self.dtype == mat1.dtype
        and self.numel() == n
        and self.dim() <= 1  # a (1, N) self may be one row of a per-row matrix: fusing it would depend on M
    ):
        # F.linear's bias: the kernel adds it once, after the full K reduction.
        return _matmul(call, mat1, mat2, self.reshape(n))
    return _add_scaled(call, self, _matmul(call, mat1, mat2), beta, alpha)


def baddbmm(
    call: Call, self: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *, beta: Any = 1, alpha: Any = 1
) -> torch.Tensor:
    _product_shapes("baddbmm", batch1, batch2, self)
    return _add_scaled(call, self, _matmul(call, batch1, batch2, skip_leading_zeros=True), beta, alpha)


def mv(call: Call, self: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    _product_shapes("mv", self, vec)
    return _matmul(call, self, vec.unsqueeze(1)).squeeze(1)


def addmv(
    call: Call, self: torch.Tensor, mat: torch.Tensor, vec: torch.Tensor, *, beta: Any = 1, alpha: Any = 1
) -> torch.Tensor:
    _product_shapes("addmv", mat, vec, self)
    return _add_scaled(call, self, _matmul(call, mat, vec.unsqueeze(1)).squeeze(1), beta, alpha)


def dot(call: Call, self: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    _product_shapes("dot", self, tensor)
    return _matmul(call, self.unsqueeze(0), tensor.unsqueeze(1)).reshape(())


def grouped_mm(
    call: Call,
    self: torch.Tensor,
    mat2: torch.Tensor,
    offs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``torch._grouped_mm``: the expert products of MoE layers (transformers 5's default
    ``experts_implementation``). torch's CUDA kernel is a grouped GEMM that never reaches
    ``mm``; its CPU fallback happens to loop over ``mm.out``. Routed here, every token's
    row is one row-invariant product on either.

    Forms: (S, K) x (G, K, N) with ``offs`` (rows of group g end at ``offs[g]``; rows past
    ``offs[-1]``, which torch leaves uninitialised, are zero): ``kernels.grouped_matmul``,
    whose CUDA backend reads ``offs`` on the device; (S, M, K) x (S, K, N) without
    ``offs``; (M, K) x (K, N) with ``offs`` partitioning K (G results, offsets read on
    the host).
    """
    _float(self, mat2)
    if bias is not None:
        raise Unsupported("bias")
    if out_dtype is not None and out_dtype != self.dtype:
        raise Unsupported(f"out_dtype={out_dtype} for {self.dtype} operands")
    if self.dtype != mat2.dtype:
        raise Unsupported("mixed dtypes", benign=True)  # torch raises its own error
    if offs is None:
        if self.dim() == 3 and mat2.dim() == 3:
            return _matmul(call, self, mat2)
        raise Unsupported(f"{self.dim()}-D x {mat2.dim()}-D without offs", benign=True)  # torch raises
    if offs.dtype != torch.int32:
        raise Unsupported(f"{offs.dtype} offs", benign=True)  # torch raises: offsets have to be int32
    if offs.dim() == 1 and self.dim() == 2 and mat2.dim() == 3 and offs.shape[0] == mat2.shape[0] > 0:
        # The MoE form: one grouped launch that reads offs where they are (on a GPU, no
        # host synchronisation per layer).
        return _kernel_call(kernels_module().grouped_matmul, _plain(self), _plain(mat2), offs,
                            portable=call.portable, check_offsets=False)
    if offs.dim() == 1 and self.dim() == 2 and mat2.dim() == 2:
        # offs partition K (weight gradients): one product per group, offsets read on the host.
        ends = offs.tolist()
        problem = offsets_problem(ends, self.shape[-1])
        if not ends or problem:
            raise Unsupported(problem or "no offsets")
        out = torch.zeros((len(ends), self.shape[0], mat2.shape[-1]), dtype=self.dtype, device=self.device)
        for g, (start, end) in enumerate(zip([0, *ends], ends)):
            if end > start:  # an empty group sums no K: zeros
                out[g] = _matmul(call, self[:, start:end], mat2[start:end])
        return out
    what = f"{offs.shape[0]} offsets" if offs.dim() == 1 else f"{offs.dim()}-D offs of shape {tuple(offs.shape)}"
    raise Unsupported(f"{self.dim()}-D x {mat2.dim()}-D grouped product with {what}")


def _triple(values: Sequence[int], nd: int, what: str) -> list[int]:
    """One value per spatial dim, or one for all: aten.convolution's stride, padding and
    dilation, avg_pool2d's kernel_size, stride and padding."""
    values = list(values)
    if len(values) == 1:
        return values * nd
    if len(values) != nd:
        raise Unsupported(f"{len(values)} {what} values for {nd} spatial dims", benign=True)  # torch raises
    return values


# One patch product's rows (output positions of its batch entries) and patch elements: the
# CUDA kernels' grid takes 65535 blocks of 128 rows (a larger product falls back), and the
# patches are the kernel volume times the input. A convolution past either is computed a
# block of batch entries at a time; a row's bits do not depend on the other rows of its
# product, so the blocks change no bit. (One entry past them is still one product.)
_CONV_ROWS = 1 << 22
_CONV_PATCH_ELEMENTS = 1 << 28


def convolution(
    call: Call,
    input: torch.Tensor,  # noqa: A002 (aten's name)
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Every 1-D, 2-D and 3-D convolution (``F.conv1d``/``conv2d``/``conv3d``, any stride,
    zero padding, dilation and groups) as routed products of its patches (im2col); a
    transposed one as the ordinary convolution it equals (``_transposed_convolution``).

    Each output element is one row of a matmul: the input patch it reads, flattened in
    the weight's (channel, kernel position) order, times that filter. With ``groups ==
    1`` the patches of every position of every batch entry (of a block of entries, past
    ``_CONV_ROWS``/``_CONV_PATCH_ELEMENTS``) are the rows of one 2-D product and the
    bias is the kernel's (added once after the K reduction): the same bits as
    ``F.linear`` of the patches. With ``groups > 1`` (Mamba's depthwise causal conv) the
    groups are the batch of a 3-D product, and the bias is a last column of ones in the
    patches against the bias as a last row of the filters (one rounding, where adding it
    after the product would round twice in 16-bit). Rows are
    independent of how many there are, so a position's result does not depend on the
    batch, the sequence length, or prefill (one conv over the sequence) versus decode
    (one conv over the last kernel-width window): the patches are equal, so are the
    bits. torch's CPU kernels happened to give that too on the shapes measured; cuDNN's
    algorithm choice depends on the batch size. Costs a copy of the patches (the kernel
    volume times the input).
    """
    _float(input, weight, bias)
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != input.dtype):
        raise Unsupported("mixed dtypes", benign=True)  # torch raises its own error
    if transposed:
        return _transposed_convolution(call, input, weight, bias, stride, padding, dilation, output_padding, groups)
    nd = weight.dim() - 2
    # F.conv1d/2d/3d batch an unbatched input before they reach aten.convolution, which
    # itself refuses one (torch raises "Expected 3-dimensional input ...").
    if not 1 <= nd <= 3 or input.dim() != nd + 2:
        raise Unsupported(f"{input.dim()}-D input with a {weight.dim()}-D weight", benign=True)  # torch raises
    stride, padding, dilation = (_triple(v, nd, w) for v, w in ((stride, "stride"), (padding, "padding"),
                                                                (dilation, "dilation")))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or groups < 1:
        raise Unsupported("non-positive stride, dilation or groups, or negative padding", benign=True)
    x, w, b = _plain(input), _plain(weight), _plain(bias)
    n, c = x.shape[:2]
    o, cg, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    if c != cg * groups or o % groups or (b is not None and b.shape != (o,)):
        raise Unsupported("channels, groups and bias do not match", benign=True)  # torch raises
    lengths = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)]
    if min(lengths) < 1:
        raise Unsupported("the kernel is larger than the padded input", benign=True)  # torch raises
    if x.numel() == 0 or w.numel() == 0:
        raise Unsupported("empty operand", benign=True)
    # F.pad lists the last dim first; zero padding on both sides of every spatial dim.
    x = torch.nn.functional.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, (k - 1) * d + 1, s)  # windows, appended as the last dim
        if d > 1:
            x = x[..., ::d]
    g, og, kvol, rows = groups, o // groups, cg * math.prod(kernel), math.prod(lengths)
    # (N, C, *L, *k) -> (G, N, *L, Cg, *k), a view: each (entry, position) a patch
    windows = x.reshape(n, g, cg, *lengths, *kernel).permute(1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    filters = w.reshape(g, og, kvol)
    if g > 1 and b is not None:
        filters = torch.cat([filters, b.reshape(g, og, 1)], dim=2)
    per = max(1, min(_CONV_ROWS // rows, _CONV_PATCH_ELEMENTS // (g * rows * kvol)))  # batch entries a product
    outs = []
    for start in range(0, n, per):
        # (G, m, *L, Cg, *k) -> (G, m * L, Cg * k): a patch per row, in the weight's flattened order
        patches = windows[:, start : start + per].reshape(g, -1, kvol)
        if g == 1:
            outs.append(_matmul(call, patches[0], filters[0].t(), b).unsqueeze(0))
            continue
        if b is not None:
            patches = torch.cat([patches, patches.new_ones(g, patches.shape[1], 1)], dim=2)
        outs.append(_matmul(call, patches, filters.transpose(1, 2)))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    # (G, N * L, Og) -> (N, G * Og, *L), in torch's layout: channels_last (channels_last_3d)
    # when the input or the weight is (a model moved to channels_last), as torch's CPU and
    # cuDNN convolutions return; code after the conv may view it as such.
    out = out.reshape(g, n, *lengths, og).permute(1, 0, nd + 2, *range(2, 2 + nd)).reshape(n, o, *lengths)
    return _in_torchs_layout(out, input, weight)


def _in_torchs_layout(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: A002
    """A convolution's result laid out as torch's: channels_last (channels_last_3d) when
    the input or the weight is, contiguous otherwise."""
    # Tensor.suggest_memory_format, which Python lacks (imported here: a private module)
    from torch._prims_common import suggest_memory_format

    layouts = (suggest_memory_format(input), suggest_memory_format(weight))
    layout = next((f for f in layouts if f in (torch.channels_last, torch.channels_last_3d)), torch.contiguous_format)
    return out.contiguous(memory_format=layout)


def _transposed_convolution(
    call: Call,
    input: torch.Tensor,  # noqa: A002 (aten's name)
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``F.conv_transpose1d``/``2d``/``3d`` as ordinary convolutions, routed as above,
    with the filters' input and output channels swapped in each group: without dilation
    one per output phase (``_polyphase``: torch's number of products); with dilation one
    over the input with ``stride - 1`` zeros between its elements, padded by
    ``dilation * (kernel - 1) - padding`` on each side (``output_padding`` more at the
    end; a negative padding crops), against the flipped filters (``stride ** dims`` times
    the products). Each output element is one patch product, whatever the batch: torch's
    CPU transposed convolutions changed bits with the batch size (float32 and bfloat16,
    kernel 4, stride 2)."""
    nd = weight.dim() - 2
    if not 1 <= nd <= 3 or input.dim() != nd + 2:
        raise Unsupported(f"{input.dim()}-D input with a {weight.dim()}-D weight", benign=True)  # torch raises
    stride, padding, dilation, output_padding = (
        _triple(v, nd, w) for v, w in ((stride, "stride"), (padding, "padding"), (dilation, "dilation"),
                                       (output_padding, "output_padding")))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or min(output_padding) < 0 or groups < 1:
        raise Unsupported("non-positive stride, dilation or groups, or negative padding", benign=True)
    if any(op >= s and op >= d for op, s, d in zip(output_padding, stride, dilation)):
        raise Unsupported("output_padding not below stride or dilation", benign=True)  # torch raises
    x, w = _plain(input), _plain(weight)
    n, c = x.shape[:2]
    og, kernel = w.shape[1], tuple(w.shape[2:])
    if w.shape[0] != c or c % groups or (bias is not None and bias.shape != (og * groups,)):
        raise Unsupported("channels, groups and bias do not match", benign=True)  # torch raises
    if any((size - 1) * s + d * (k - 1) + op + 1 - 2 * p < 1
           for size, k, s, p, d, op in zip(x.shape[2:], kernel, stride, padding, dilation, output_padding)):
        raise Unsupported("no output position", benign=True)  # torch raises
    if x.numel() == 0 or w.numel() == 0:
        raise Unsupported("empty operand", benign=True)
    # (C, Og, *k) -> (G, Cg, Og, *k) -> (G * Og, Cg, *k): each output channel's filter
    filters = w.reshape(groups, c // groups, og, *kernel).transpose(1, 2).reshape(groups * og, c // groups, *kernel)
    if max(dilation) == 1:
        out = _polyphase(call, x, filters, bias, stride, padding, output_padding, groups)
    else:
        if max(stride) > 1:
            spread = x.new_zeros((n, c, *((size - 1) * s + 1 for size, s in zip(x.shape[2:], stride))))
            spread[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = x
            x = spread
        x = torch.nn.functional.pad(x, [e for k, p, d, op in reversed(list(zip(kernel, padding, dilation,
                                                                                output_padding)))
                                        for e in (d * (k - 1) - p, d * (k - 1) - p + op)])
        out = convolution(call, x, filters.flip(list(range(2, 2 + nd))), bias, [1] * nd, [0] * nd, dilation, False,
                          [0] * nd, groups)
    return _in_torchs_layout(out, input, weight)


def _polyphase(call: Call, x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
               padding: list[int], output_padding: list[int], groups: int) -> torch.Tensor:
    """A transposed convolution without dilation as ``prod(stride)`` ordinary ones, one
    per output phase: along a dim, output ``o`` with ``o + padding = q * s + r`` is
    ``sum_m x[q - m] * filter[r + m * s]``, so the outputs of phase ``r`` (every ``s``-th,
    from ``(r - padding) mod s``) are a stride-1 convolution of ``x`` with the flipped
    sub-filter ``filter[r::s]``. No inserted zeros: torch's number of products."""
    nd = x.dim() - 2
    kernel, lengths = filters.shape[2:], x.shape[2:]
    sizes = [(size - 1) * s - 2 * p + k + op for size, k, s, p, op in zip(lengths, kernel, stride, padding,
                                                                         output_padding)]
    out = x.new_zeros((x.shape[0], filters.shape[0], *sizes))
    if bias is not None:
        out += bias.reshape(-1, *[1] * nd)
    for phase in itertools.product(*(range(s) for s in stride)):
        pads, taps, where = [], [], []
        for r, k, s, p, size, length in zip(phase, kernel, stride, padding, sizes, lengths):
            first_q = -((r - p) // s)  # the least q with q * s + r - p >= 0
            start = first_q * s + r - p  # that output, in [0, s)
            count = max(0, -(-(size - start) // s))
            tap = max(0, -(-(k - r) // s))  # filter[r::s]
            taps.append(tap)
            where.append(slice(start, start + count * s, s))
            left = tap - 1 - first_q
            pads.append((left, count + tap - 1 - length - left))
        if 0 in taps or any(sl.start >= sl.stop for sl in where):
            continue  # no filter tap lands on this phase: its outputs are the bias alone
        sub = filters[(slice(None), slice(None), *(slice(r, None, s) for r, s in zip(phase, stride)))]
        part = torch.nn.functional.pad(x, [e for pair in reversed(pads) for e in pair])
        out[(slice(None), slice(None), *where)] = convolution(call, part, sub.flip(list(range(2, 2 + nd))), bias,
                                                              [1] * nd, [0] * nd, [1] * nd, False, [0] * nd, groups)
    return out


# ----------------------------------------------------------------------------- softmax


def _like(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``result`` laid out as torch lays out an op's output for input ``x``."""
    if x.is_contiguous() and result.is_contiguous():
        return result
    out = torch.empty_like(x, dtype=result.dtype)
    out.copy_(result)
    return out


def _softmax_rows(call: Call, x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    _float(x)
    if x.dim() == 0 or x.numel() == 0:
        raise Unsupported("0-d or empty input", benign=True)
    x = _plain(x)
    kn = kernels_module()
    fn = kn.log_softmax if log else kn.softmax
    if not -x.dim() <= dim < x.dim():
        raise Unsupported(f"dim {dim} out of range for {x.dim()}-d input", benign=True)  # torch raises
    d = dim % x.dim()
    # The kernels anchor each row's sum at its first entry with nonzero exp: masked
    # padding in front of a row changes nothing, so no canonicalisation here.
    if x.dim() == 2 and d == 1:  # already rows: the kernel's contiguous result, without the views below
        return _kernel_call(fn, x, -1, portable=call.portable)
    moved = x.movedim(d, -1)
    res = _kernel_call(fn, moved.reshape(-1, moved.shape[-1]), -1, portable=call.portable)
    # torch's CPU softmax returns a contiguous tensor whatever the input's layout (unlike
    # the elementwise ops, which keep it); code may .view() it.
    return res.reshape(moved.shape).movedim(-1, d).contiguous()


def _softmax(call: Call, self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    if half_to_float:
        raise Unsupported("half_to_float=True")
    return _softmax_rows(call, self, dim, log=False)


def _log_softmax(call: Call, self: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    if half_to_float:
        raise Unsupported("half_to_float=True")
    return _softmax_rows(call, self, dim, log=True)


def _safe_softmax(call: Call, self: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    x = self if dtype is None else self.to(dtype)
    out = _softmax_rows(call, x, dim, log=False)
    # A row masked entirely (all -inf) gives 0 instead of NaN: that is _safe_softmax.
    return out.masked_fill((x == float("-inf")).all(dim, keepdim=True), 0.0)


# ----------------------------------------------------------------------------- sum / mean


def _reduced_dims(dim: Sequence[int] | int | None, nd: int) -> list[int]:
    """The dims a reduction over ``dim`` reduces, sorted and nonnegative (None or no dims:
    all of them, as torch reads ``dim=[]``); torch's own error for a bad one."""
    dims = [dim] if isinstance(dim, int) else list(dim or [])
    span = max(nd, 1)  # torch lets a 0-d tensor be reduced over dim 0 or -1
    if any(not -span <= d < span for d in dims) or len({d % span for d in dims}) != len(dims):
        raise Unsupported(f"dim {dim} out of range or repeated for {nd}-d input", benign=True)  # torch raises
    return sorted({d % nd for d in dims}) if (dims and nd) else list(range(nd))


def _reduce(
    call: Call,
    x: torch.Tensor,
    dim: Sequence[int] | int | None,
    keepdim: bool,
    dtype: torch.dtype | None,
    mean: bool,
) -> torch.Tensor:
    if dtype is not None and dtype not in _FLOATS:
        raise Unsupported(f"dtype={dtype}", benign=not (dtype.is_floating_point or dtype.is_complex))
    if dtype is not None and isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()):
        # An integer input summed in a float dtype is a float reduction (it rounds): cast
        # first, as torch does, and route it; it is not an exact integer sum.
        x = x.to(dtype)
    _float(x)
    if x.numel() == 0:
        raise Unsupported("empty input", benign=True)
    x = _plain(x) if dtype is None else _plain(x).to(dtype)
    kn = kernels_module()
    nd = x.dim()
    reduced = _reduced_dims(dim, nd)
    kept = [d for d in range(nd) if d not in reduced]
    # Reduced dims last, flattened into one row per output element: each output is one
    # fixed-order row reduction, whatever else is in the tensor. (A 0-d tensor is one row
    # of one element: permute() of no dims raises.)
    moved = x.permute(*kept, *reduced) if nd else x
    rows = moved.reshape(-1, math.prod(x.shape[d] for d in reduced))
    fn = kn.mean if mean else kn.sum
    res = _kernel_call(fn, rows, -1, portable=call.portable).reshape([x.shape[d] for d in kept])
    if keepdim:
        for d in reduced:
            res = res.unsqueeze(d)
    return res


def mean_dim(
    call: Call, self: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    return _reduce(call, self, dim, keepdim, dtype, mean=True)


def mean_all(call: Call, self: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _reduce(call, self, None, False, dtype, mean=True)


def sum_dim(
    call: Call, self: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    return _reduce(call, self, dim, keepdim, dtype, mean=False)


def sum_all(call: Call, self: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _reduce(call, self, None, False, dtype, mean=False)


# ----------------------------------------------------------------------------- composed reductions
# logsumexp, var/std (and their _mean forms) and vector norms are compositions of routed
# ops, run with the mode's routing on inside the adapter: each is one fixed sequence of
# batch-invariant ops (the canonical sum of each output's row, elementwise functions,
# order-free max), so it inherits their guarantees, portable mode's included. 16-bit
# inputs are computed in float32 and rounded once at the end, as the row kernels do.


def _composed_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """(what the composition computes in, the result dtype) of a float input."""
    _float(x)
    if x.numel() == 0:
        raise Unsupported("empty input", benign=True)  # torch's own values (or error)
    x = _plain(x)
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x), x.dtype


def _finished(res: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``res`` rounded once into ``dtype``, a NaN as the canonical quiet NaN of
    canonical-orders.md: torch's float32-to-16-bit conversion writes a NaN as 0x7FC0 on its
    scalar path and 0xFFFF on its vector path (so by position), and a NaN's sign and
    payload from torch's arithmetic differ between devices."""
    return res.to(dtype).masked_fill(res.isnan(), math.nan)


def _squeezed(t: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return t if keepdim or not dims else t.squeeze(dims)


def logsumexp(call: Call, self: torch.Tensor, dim: Sequence[int] | int, keepdim: bool = False) -> torch.Tensor:
    """torch's definition: ``log(sum(exp(x - m))) + m``, ``m`` the max (0 where infinite)."""
    if isinstance(self, torch.Tensor) and not (self.is_floating_point() or self.is_complex()):
        self = self.to(torch.get_default_dtype())  # torch promotes integers; not an exact op
    x, dtype = _composed_input(self)
    if not keepdim and x.dim() and not (isinstance(dim, int) or dim):
        raise Unsupported("dim=() without keepdim", benign=True)  # torch's kernel raises a shape error
    dims = _reduced_dims(dim, x.dim())
    with routed():
        m = torch.amax(x, dims, keepdim=True)
        m = m.masked_fill(m.abs() == math.inf, 0)
        res = torch.log(torch.sum(torch.exp(x - m), dims, keepdim=keepdim)) + _squeezed(m, dims, keepdim)
        return _finished(res, dtype)


def _moments(self: torch.Tensor, dim: Sequence[int] | int | None, correction: Any, keepdim: bool,
             std: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(var or std, mean): the canonical mean, then the canonical sum of squared
    deviations divided by ``max(N - correction, 0)``, as torch defines them."""
    if isinstance(self, torch.Tensor) and self.is_complex():
        raise Unsupported("complex input")
    x, dtype = _composed_input(self)
    dims = _reduced_dims(dim, x.dim())
    n = math.prod(x.shape[d] for d in dims)
    divisor = max(n - (1 if correction is None else float(correction)), 0)
    with routed():
        mean = torch.mean(x, dims, keepdim=True)
        d = x - mean
        res = divided(torch.sum(d * d, dims, keepdim=keepdim), divisor)  # not a reciprocal on CUDA
        if std:
            res = torch.sqrt(res)
        return _finished(res, dtype), _finished(_squeezed(mean, dims, keepdim), dtype)


def var(call: Call, self: torch.Tensor, dim: Sequence[int] | None = None, *, correction: Any = None,
        keepdim: bool = False) -> torch.Tensor:
    return _moments(self, dim, correction, keepdim, std=False)[0]


def std(call: Call, self: torch.Tensor, dim: Sequence[int] | None = None, *, correction: Any = None,
        keepdim: bool = False) -> torch.Tensor:
    return _moments(self, dim, correction, keepdim, std=True)[0]


def var_mean(call: Call, self: torch.Tensor, dim: Sequence[int] | None = None, *, correction: Any = None,
             keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _moments(self, dim, correction, keepdim, std=False)


def std_mean(call: Call, self: torch.Tensor, dim: Sequence[int] | None = None, *, correction: Any = None,
             keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _moments(self, dim, correction, keepdim, std=True)


def linalg_vector_norm(call: Call, self: torch.Tensor, ord: Any = 2, dim: Sequence[int] | None = None,  # noqa: A002
                       keepdim: bool = False, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch's definitions: ``sum(|x|^p)^(1/p)``; 2: ``sqrt(sum(x*x))``; 1: ``sum(|x|)``;
    inf / -inf: max / min of ``|x|``; 0: the count of nonzeros."""
    if isinstance(self, torch.Tensor) and self.is_complex():
        raise Unsupported("complex input")  # |z| is a hypot: not in the canonical orders
    if isinstance(ord, (torch.Tensor, complex)):
        raise Unsupported(f"ord {ord!r}")
    if dtype is not None:
        if not dtype.is_floating_point or not self.is_floating_point():
            raise Unsupported(f"dtype={dtype} for a {self.dtype} input", benign=True)  # torch raises
        self = self.to(dtype)
    x, out_dtype = _composed_input(self)
    dims = _reduced_dims(dim, x.dim())
    p = float(ord)
    with routed():
        a = x.abs()
        if p == math.inf:
            res = torch.amax(a, dims, keepdim=keepdim)
        elif p == -math.inf:
            res = torch.amin(a, dims, keepdim=keepdim)
        elif p == 0:
            res = torch.sum(a != 0, dims, keepdim=keepdim).to(x.dtype)  # an exact integer count
        elif p == 1:
            res = torch.sum(a, dims, keepdim=keepdim)
        elif p == 2:
            res = torch.sqrt(torch.sum(a * a, dims, keepdim=keepdim))
        else:
            res = torch.pow(torch.sum(torch.pow(a, p), dims, keepdim=keepdim), 1.0 / p)
        return _finished(res, out_dtype)


def norm_dim(call: Call, self: torch.Tensor, p: Any, dim: Sequence[int], keepdim: bool = False) -> torch.Tensor:
    """The legacy ``norm`` overloads (``F.pairwise_distance``): ``linalg_vector_norm``'s."""
    return linalg_vector_norm(call, self, 2 if p is None else p, dim, keepdim)


def norm_all(call: Call, self: torch.Tensor, p: Any = 2) -> torch.Tensor:
    return linalg_vector_norm(call, self, p)


def nansum(call: Call, self: torch.Tensor, dim: Sequence[int] | None = None, keepdim: bool = False, *,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """The canonical sum with NaN read as zero (``nanmean`` is nansum over a count)."""
    if dtype is not None and isinstance(self, torch.Tensor):
        self = self.to(dtype)
    _float(self)
    if self.numel() == 0:
        raise Unsupported("empty input", benign=True)
    x = _plain(self)
    dims = _reduced_dims(dim, x.dim())
    with routed():
        return torch.sum(x.masked_fill(x.isnan(), 0), dims, keepdim=keepdim)


def nanmean(call: Call, self: torch.Tensor, dim: Sequence[int] | None = None, keepdim: bool = False, *,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """The nansum over the count of non-NaN values, 16-bit inputs in float32 and rounded
    once. torch's decomposition divides the 16-bit nansum by the integer count, which its
    CPU kernel rounds to 16 bits first unless the count is one element (a batch of one):
    a bfloat16 row's mean changed with the batch size."""
    if dtype is not None and isinstance(self, torch.Tensor):
        self = self.to(dtype)
    x, out_dtype = _composed_input(self)
    dims = _reduced_dims(dim, x.dim())
    with routed():
        kept = ~x.isnan()
        total = torch.sum(x.masked_fill(~kept, 0), dims, keepdim=keepdim)
        return _finished(total / torch.sum(kept, dims, keepdim=keepdim).to(x.dtype), out_dtype)


def _one_dim(x: torch.Tensor, dim: int) -> int | None:
    """``dim`` of ``x`` made nonnegative, or None for a 0-d ``x`` (which torch lets a
    one-dim reduction or scan take at dim 0 or -1, returning it unchanged)."""
    if x.dim() == 0:
        if dim not in (0, -1):
            raise Unsupported(f"dim {dim} of a 0-d input", benign=True)  # torch's own error
        return None
    (d,) = _reduced_dims(dim, x.dim())
    return d


def _product_tree(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The product along ``dim`` as a fixed pairwise tree: adjacent pairs (0, 1), (2, 3), ...
    multiplied, an odd last element carried up unchanged, until one remains. Each product
    one correctly rounded torch ``mul``; the tree depends on the length only."""
    while x.shape[dim] > 1:
        n = x.shape[dim]
        pairs = x.narrow(dim, 0, n - n % 2).unflatten(dim, (n // 2, 2))
        products = pairs.select(dim + 1, 0) * pairs.select(dim + 1, 1)
        x = torch.cat([products, x.narrow(dim, n - 1, 1)], dim) if n % 2 else products
    return x


def prod_dim(call: Call, self: torch.Tensor, dim: int, keepdim: bool = False, *,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.prod(x, dim)`` of floats by :func:`_product_tree` (16-bit in float32,
    rounded once; a NaN canonical): the same bits for a row alone and in any batch, on every
    thread count and device (torch's CPU product of a whole tensor changed with the thread
    count). Integer products are exact and pass through."""
    if dtype is not None and isinstance(self, torch.Tensor):
        self = self.to(dtype)
    x, out_dtype = _composed_input(self)
    d = _one_dim(x, dim)
    if d is None:
        return _finished(x.clone(), out_dtype)
    res = _product_tree(x, d)
    return _finished(res if keepdim else res.squeeze(d), out_dtype)


def prod_all(call: Call, self: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.prod(x)``: :func:`_product_tree` over the flattened elements in index order."""
    if dtype is not None and isinstance(self, torch.Tensor):
        self = self.to(dtype)
    x, out_dtype = _composed_input(self)
    return _finished(_product_tree(x.reshape(-1), 0).reshape(()), out_dtype)


def polar(call: Call, abs: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:  # noqa: A002 (aten's name)
    """``torch.polar`` (the ``freqs_cis`` of Llama 4's and DeepSeek-V2's complex RoPE):
    ``abs * cos(angle) + i * abs * sin(angle)`` with the routed ``cos`` and ``sin``, so in
    portable mode the portable ones (torch's kernel calls its math library's)."""
    _float(abs, angle)
    refused = abs.dtype == torch.bfloat16 or (abs.dtype == torch.float16 and abs.device.type == "cpu")
    if abs.dtype != angle.dtype or refused:
        raise Unsupported("dtypes torch's polar refuses", benign=True)  # torch's own error
    if abs.numel() == 0 or angle.numel() == 0:
        raise Unsupported("empty input", benign=True)
    with routed():
        return torch.complex(abs * torch.cos(angle), abs * torch.sin(angle))


def _has_complex_operand(self: Any, other: Any, *args: Any, **kwargs: Any) -> bool:
    return any(isinstance(v, complex) or (isinstance(v, torch.Tensor) and v.is_complex()) for v in (self, other))


_COMPLEX_PART = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _complex_parts(v: Any, dtype: torch.dtype, shape: torch.Size, device: torch.device) -> tuple[Any, Any]:
    """(real, imaginary) of an operand in ``dtype``, broadcast to ``shape``; a number
    rounded once from double into ``dtype``, as torch reads a scalar operand."""
    v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(complex(v), dtype=torch.complex128)
    parts = torch.view_as_real(v.to(device=device, dtype=dtype).resolve_conj().expand(shape))
    return parts[..., 0], parts[..., 1]


def _complex_binary(op: str, inplace: bool) -> Adapter:
    """``mul``/``div`` with a complex operand (Llama 4's and DeepSeek-V2's RoPE,
    ``xq * freqs_cis``), from real IEEE operations, each rounded once in the operands'
    precision: ``(a + bi)(c + di) = (ac - bd) + (ad + bc)i``, the formula of torch's CPU
    vector path (its scalar path contracts to fused multiply-adds: the bits depended on the
    element's position, 1,767 of 4,099 complex128 products), and the quotient by c10's
    (Smith's) scaling, ``r = d/c`` where ``|c| >= |d|``, else ``c/d``. The same operations
    on every device, so portable. complex32 is computed in complex64 and rounded once, as
    torch's CPU kernel computes it."""

    def adapter(call: Call, self: Any, other: Any) -> torch.Tensor:
        dtype = torch.result_type(self, other)
        if dtype not in _COMPLEX_PART:
            raise Unsupported(f"{dtype} operands")
        tensors = [t for t in (self, other) if isinstance(t, torch.Tensor)]
        if any(t.layout != torch.strided for t in tensors):
            raise Unsupported("a tensor that is not strided")
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        device = next((t.device for t in tensors if t.dim()), tensors[0].device)
        if any(t.device != device and t.dim() for t in tensors) or math.prod(shape) == 0:
            raise Unsupported("operands on two devices, or empty", benign=True)  # torch's own error or result
        if not call.portable and device.type != "cpu":
            raise Unsupported("torch's CUDA elementwise kernels are position independent", benign=True)
        if inplace and (shape != self.shape or dtype != self.dtype):
            raise Unsupported(f"in-place {op} whose result does not fit the tensor (torch says why)", benign=True)
        compute = torch.complex64 if dtype == torch.complex32 else dtype
        (a, b), (c, d) = (_complex_parts(v, compute, shape, device) for v in (self, other))
        if op == "mul":
            re, im = a * c - b * d, a * d + b * c
        else:
            wide = c.abs() >= d.abs()
            ratio = torch.where(wide, d / c, c / d)
            scale = torch.where(wide, c + d * ratio, d + c * ratio).reciprocal()  # c10's 1 / (...)
            re = torch.where(wide, (a + b * ratio) * scale, (a * ratio + b) * scale)
            im = torch.where(wide, (b - a * ratio) * scale, (b * ratio - a) * scale)
            zero = (c == 0) & (d == 0)  # c10's complex inf or nan: a / |c|, b / |d|
            re, im = torch.where(zero, a / c.abs(), re), torch.where(zero, b / d.abs(), im)
        res = torch.complex(_finished(re, _COMPLEX_PART[dtype]), _finished(im, _COMPLEX_PART[dtype]))
        if inplace:
            with torch.no_grad():
                self.copy_(res)
            return self
        return _like(res, self) if isinstance(self, torch.Tensor) and self.shape == shape else res

    return adapter


def _xlogy(inplace: bool) -> Adapter:
    def adapter(call: Call, self: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``xlogy`` (``F.kl_div``'s ``target * log(target)``: distillation, an RL KL term):
        ``x * log(y)`` with the routed ``log``, 0 where ``x == 0`` and ``y`` is not NaN, as
        torch's; 16-bit in float32, rounded once. torch's kernel calls its math library's
        log, so in portable mode it was not portable."""
        if not (isinstance(self, torch.Tensor) and isinstance(other, torch.Tensor)):
            raise Unsupported("a number operand")
        dtype = torch.result_type(self, other)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()  # torch computes integer operands in it
        if other.device != self.device and other.dim() == 0:
            other = other.to(self.device)  # a CPU scalar beside a CUDA tensor, as torch allows
        if dtype not in _FLOATS or (inplace and dtype != self.dtype) or self.device != other.device:
            raise Unsupported("dtypes or devices torch handles itself", benign=dtype not in _FLOATS)
        if self.numel() == 0 or other.numel() == 0:
            raise Unsupported("empty input", benign=True)
        compute = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        x, y = (t.detach().to(compute) for t in torch.broadcast_tensors(self, other))
        with routed():
            res = x * torch.log(y)
        res = _finished(torch.where((x == 0) & ~y.isnan(), 0.0, res), dtype)
        if inplace:
            with torch.no_grad():
                self.copy_(res)
            return self
        return res

    return adapter


def expm1_composed(x: torch.Tensor) -> torch.Tensor:
    """Portable ``expm1`` (Apertus' xIELU) from the routed ``exp`` and ``log`` (Kahan's
    correction): with ``u = exp(x)``, ``(u - 1) * (x / log(u))``; ``x`` where ``u == 1``
    (``-0.0`` kept), ``-1`` where ``u - 1 == -1``, ``inf`` where ``u`` is. ``u - 1`` is exact
    near 0 and ``x / log(u)`` corrects ``u``'s rounding; dividing first keeps the product
    finite up to ``exp``'s overflow. 16-bit inputs in float32, rounded once. Within 2.4 ULP
    of the correctly rounded float32 result over 1.8M samples (torch's: 1 ULP);
    ``tests/test_mode_portable.py`` bounds it."""
    w, dtype = _composed_input(x)
    with routed():
        u = torch.exp(w)
        res = (u - 1) * (w / torch.log(u))
    res = torch.where(u == 1, w, res)
    res = torch.where(u - 1 == -1, -1.0, res)
    res = torch.where(u == math.inf, math.inf, res)
    return _finished(res, dtype)


# Portable functions the backends have no kernel for, composed from portable ones.
COMPOSED_PORTABLE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"expm1": expm1_composed}


def log_sigmoid_forward(call: Call, self: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.logsigmoid`` (a DPO loss, a gate): torch's own formula, ``min(x, 0) - log1p(z)``
    with ``z = exp(-|x|)``, from the routed ``exp`` and ``log1p``, so in portable mode the
    portable ones; 16-bit inputs in float32, rounded once. The buffer is ``z`` on the CPU,
    which torch's CPU backward reads, and empty elsewhere, as torch's."""
    x, dtype = _composed_input(self)
    with routed():
        z = torch.exp(-x.abs())
        out = torch.clamp_max(x, 0) - torch.log1p(z)
    buffer = _finished(z, dtype) if x.device.type == "cpu" else x.new_empty(0, dtype=dtype)
    return _finished(out, dtype), buffer


_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # aten's Reduction enum


def nll_loss_forward(call: Call, self: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                     reduction: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.nll_loss`` (so ``F.cross_entropy``): each loss ``-w[t] * x[t]`` is one exact
    product; ``"sum"`` is their canonical sum and ``"mean"`` that over the canonical sum of
    the weights (16-bit inputs summed in float32, divided, rounded once), so a loss does
    not depend on the thread count, the instruction set or the device's reduction order.
    ``total_weight`` is the weights' sum, as torch's (``"none"``: 0, or one sample's weight)."""
    _float(self, weight)
    if (self.dim() not in (1, 2) or target.dim() != self.dim() - 1 or target.dtype not in (torch.int64, torch.uint8)
            or (self.dim() == 2 and target.shape[0] != self.shape[0]) or reduction not in _REDUCTIONS
            or (weight is not None and (weight.shape != self.shape[-1:] or weight.dtype != self.dtype))):
        raise Unsupported("arguments torch refuses", benign=True)  # torch's own error
    if self.numel() == 0:
        raise Unsupported("empty input", benign=True)
    x, dtype = _composed_input(self)
    t = target.long()
    kept = t != ignore_index
    if bool(((t < 0) | (t >= x.shape[-1]))[kept].any()):
        raise Unsupported("a target out of range", benign=True)  # torch raises
    with routed():
        t = t.masked_fill(~kept, 0)
        w = kept.to(x.dtype) if weight is None else _plain(weight).to(x.dtype)[t].masked_fill(~kept, 0)
        picked = x.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        loss = torch.where(kept, -(picked * w), 0.0)
        if reduction == 0:  # torch's total_weight: 0, or for one sample its weight
            return _finished(loss, dtype), (w if x.dim() == 1 else torch.zeros_like(loss[0])).to(dtype)
        total_weight = torch.sum(w)
        total = torch.sum(loss) if reduction == 2 else torch.sum(loss) / total_weight
        return _finished(total, dtype), total_weight.to(dtype)


# ----------------------------------------------------------------------------- cumsum


def _cumsum(call: Call, x: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and dtype not in _FLOATS:
        raise Unsupported(f"dtype={dtype}", benign=not (dtype.is_floating_point or dtype.is_complex))
    if dtype is not None and isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()):
        x = x.to(dtype)  # integers summed in a float dtype round: a float scan, routed
    # An integer or bool scan (HF's position ids from a mask, MoE token offsets) is exact.
    _float(x)
    if x.numel() == 0:
        raise Unsupported("empty input", benign=True)
    span = max(x.dim(), 1)  # torch lets a 0-d tensor be scanned over dim 0 or -1
    if not -span <= dim < span:
        # torch raises its IndexError; left to the kernel's InputError, it was a fallback
        # (InvarianceViolation under strict=True)
        raise Unsupported(f"dim {dim} out of range for {x.dim()}-d input", benign=True)  # torch raises
    x = _plain(x) if dtype is None else _plain(x).to(dtype)
    return _kernel_call(kernels_module().cumsum, x, dim, portable=call.portable)


def cumsum(call: Call, self: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _cumsum(call, self, dim, dtype)


def _inplace_scan(name: str, scan: Callable[..., torch.Tensor]) -> Adapter:
    """The in-place form (``cumsum_``, ``cumprod_``) of ``scan(call, self, dim, dtype)``."""

    def adapter(call: Call, self: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        if dtype is not None and dtype != self.dtype:
            # torch refuses it whatever the dtypes ("Bad in-place call"): its error stands
            raise Unsupported(f"in-place {name} of {self.dtype} with dtype={dtype}", benign=True)  # torch raises
        res = scan(call, self, dim, dtype)
        with torch.no_grad():
            self.copy_(res)
        return self

    return adapter


# ----------------------------------------------------------------------------- cumprod

# The running product's accumulator: torch's CPU ``acc_type`` (float64 for float32).
_CUMPROD_ACCUMULATOR = {torch.float32: torch.float64, torch.float64: torch.float64,
                        torch.bfloat16: torch.float32, torch.float16: torch.float32}


def _cumprod(call: Call, self: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
    """The running product along ``dim`` from 1, one rounded product per element, in
    float64 for float32/float64 and float32 for 16-bit inputs, each prefix rounded once to
    the dtype (a NaN canonical): torch's CPU kernel's order and bits (measured equal),
    on every device (torch's CUDA kernel scans in float32, in another order)."""
    if dtype is not None and isinstance(self, torch.Tensor):
        self = self.to(dtype)
    _float(self)
    if self.numel() == 0:
        raise Unsupported("empty input", benign=True)  # torch's own result
    x = _plain(self)
    d = _one_dim(x, dim)
    if d is None:
        return _finished(x.clone(), x.dtype)
    return _finished(running_product(x.to(_CUMPROD_ACCUMULATOR[x.dtype]), d), x.dtype)


def running_product(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[i] = out[i - 1] * x[i]`` along ``dim`` from ``out[0] = x[0]``, one rounded
    product per step in ``x``'s dtype. On the CPU numpy's ``multiply.accumulate``, which
    is defined as that sequence (and is fast); elsewhere one torch ``mul`` per step."""
    if x.device.type == "cpu":
        with np.errstate(all="ignore"):  # inf * 0 is NaN, as torch's, without numpy's warning
            return torch.from_numpy(np.multiply.accumulate(x.numpy(), axis=dim))
    return running_product_stepwise(x, dim)


def running_product_stepwise(x: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`running_product` as one torch ``mul`` per step (any device)."""
    running = x.select(dim, 0)
    prefixes = [running]
    for i in range(1, x.shape[dim]):
        running = running * x.select(dim, i)
        prefixes.append(running)
    return torch.stack(prefixes, dim)


def cumprod(call: Call, self: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _cumprod(call, self, dim, dtype)


# ----------------------------------------------------------------------------- histc

# Significand bits (with the implicit one): integers up to 2**p are exact in the dtype.
_SIGNIFICAND_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def histc_inexact_reason(x: torch.Tensor, bins: int = 100, min: float = 0,  # noqa: A002 (aten's names)
                         max: float = 0) -> str | None:  # noqa: A002
    """Why torch's ``histc`` of these values may round, or None when it counts exactly.

    torch bins an element as ``floor((x - lo) * bins / (hi - lo))``, in the input's dtype
    on the CPU (``getBin`` on CUDA is the same formula), and adds ones in that dtype. With
    integer values, integer limits and ``bins * (hi - lo)`` within the dtype's exact
    integers, ``x - lo`` and the product are exact and the one rounded division cannot
    cross an integer (a non-integer quotient is at least ``1 / (hi - lo)`` from one); with
    no more elements than exact integers the counts are exact too. So the result is the
    mathematical histogram on every device and at every batch size: an MoE router's
    tokens per expert, ``histc(expert_ids.float(), bins=E, min=0, max=E - 1)``."""
    if not (x.is_floating_point() or x.is_complex()):
        return None  # torch bins integer tensors (on CUDA) exactly
    if x.dtype not in _SIGNIFICAND_BITS:
        return f"{x.dtype} input"
    limit = 2 ** _SIGNIFICAND_BITS[x.dtype]
    lo, hi = float(min), float(max)
    if x.numel() > limit:
        return f"{x.numel()} elements: a count could pass {limit}, past the exact integers of {x.dtype}"
    if x.numel() and not bool((x == x.trunc()).all()):
        return "values that are not integers (or not finite): bins are computed with rounding"
    if lo == hi == 0 and x.numel():  # torch's rule: the data's own range
        lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    if not (float(lo).is_integer() and float(hi).is_integer()):
        return f"limits {lo:g} and {hi:g} that are not integers: bins are computed with rounding"
    if abs(lo) > limit or abs(hi) > limit or bins * (hi - lo) > limit:
        return f"bins * (max - min) = {bins * (hi - lo):g}, past the exact integers of {x.dtype} ({limit})"
    return None


def histc(call: Call, self: torch.Tensor, bins: int = 100, min: float = 0,  # noqa: A002 (aten's names)
          max: float = 0) -> torch.Tensor:  # noqa: A002
    """torch's own histc where it counts exactly (see ``histc_inexact_reason``), passed
    through; any other call is a fallback, counted, and an error under ``strict``."""
    reason = histc_inexact_reason(self, bins, min, max)
    if reason is None:
        raise Unsupported("integer values: torch's histc counts exactly", benign=True)
    raise Unsupported(reason)


# ----------------------------------------------------------------------------- index_add


def occurrence_ranks(index: torch.Tensor) -> torch.Tensor:
    """For each position of ``index``, how many earlier positions hold the same value."""
    n = index.numel()
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    starts = torch.ones(n, dtype=torch.bool, device=index.device)
    starts[1:] = ordered[1:] != ordered[:-1]
    positions = torch.arange(n, device=index.device)
    first = torch.cummax(torch.where(starts, positions, 0), 0).values  # where each run begins
    ranks = torch.empty_like(positions)
    ranks[order] = positions - first
    return ranks


def index_add_in_order(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *,
                       wide: bool = False) -> torch.Tensor:
    """``x.index_add_(dim, index, source)`` with each destination's additions made in the
    order of ``index``, as torch's CPU kernel makes them (one after another), on any device:
    the k-th additions of every destination together, as one gather, add and scatter of
    distinct rows, for k = 0, 1, ... (an MoE's top-k: k < top-k). torch's CUDA kernel adds
    with atomics, in whatever order the threads arrive. ``wide``: add in float32 and round
    once at the end, as torch's CPU kernel does for 16-bit tensors where it hands the call
    to its scatter_add (see ``_cpu_adds_wide``)."""
    ranks = occurrence_ranks(index)
    target = x.float() if wide else x
    source = source.float() if wide else source
    for k in range(int(ranks.max()) + 1 if ranks.numel() else 0):
        positions = (ranks == k).nonzero().squeeze(1)
        rows = index[positions]
        target.index_copy_(dim, rows, target.index_select(dim, rows) + source.index_select(dim, positions))
    if wide:
        x.copy_(target)
    return x


def _cpu_adds_wide(x: torch.Tensor, dim: int, index: torch.Tensor) -> bool:
    """Whether torch's CPU index_add of ``x`` adds in float32 and rounds once (measured with
    torch 2.13: a 16-bit tensor of 2 or more dims, along its first or last dim, with an
    int64 index, alpha 1, where it calls scatter_add) rather than rounding every addition."""
    return (x.dtype in (torch.bfloat16, torch.float16) and x.dim() > 1 and dim in (0, x.dim() - 1)
            and index.dtype == torch.int64)


def _adds_in_index_order(device: torch.device) -> bool:
    """Whether torch's index_add on ``device`` adds in the order of the index (measured
    on the CPU, on 1 and 2 threads; CUDA's uses atomics)."""
    return device.type == "cpu"


def _index_add(inplace: bool) -> Adapter:
    def adapter(call: Call, self: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *,
                alpha: Any = 1) -> torch.Tensor:
        if not (self.is_floating_point() or self.is_complex()):
            raise Unsupported("integer operands", benign=True)  # exact in any order
        if not _scalar_is(alpha, 1):
            raise Unsupported("alpha != 1 (torch's vector add fuses the multiply)")
        if _adds_in_index_order(self.device):
            raise Unsupported("torch's CPU index_add adds in index order", benign=True)
        if self.dim() == 0 or source.dim() != self.dim() or index.dim() > 1 or self.dtype != source.dtype:
            raise Unsupported("a 0-d tensor, or arguments torch refuses", benign=True)  # torch's own way
        dim = dim % self.dim()
        others = [d for d in range(self.dim()) if d != dim]
        if (index.numel() != source.size(dim) or [self.size(d) for d in others] != [source.size(d) for d in others]
                or index.dtype not in (torch.int32, torch.int64)):
            raise Unsupported("arguments torch refuses", benign=True)  # torch's own error
        wide = _cpu_adds_wide(self, dim, index)
        index = index.reshape(-1).long()
        if index.numel() and (bool((index < 0).any()) or bool((index >= self.size(dim)).any())):
            raise Unsupported("index out of range", benign=True)  # torch's own error
        target = self if inplace else self.clone()
        with torch.no_grad():
            index_add_in_order(target, dim, index, source, wide=wide)
        return target

    return adapter


# ----------------------------------------------------------------------------- avg_pool2d


def _like_layout(out: torch.Tensor, self: torch.Tensor) -> torch.Tensor:
    """``out`` in a channels-last input's layout, as torch's pooling and upsampling results
    are (``suggest_memory_format``; strides of size-1 dims included)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    fmt = formats.get(self.dim())
    if fmt is not None and self.is_contiguous(memory_format=fmt) and not self.is_contiguous():
        return torch.empty(out.shape, dtype=out.dtype, device=out.device, memory_format=fmt).copy_(out)
    return out



def _pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """torch's ``pooling_output_shape``: with ``ceil_mode`` the last window must start
    inside the input or its left padding."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def avg_pool2d_in_order(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                        ceil_mode: bool, count_include_pad: bool, divisor: int | None) -> torch.Tensor:
    """Each output the sum of its window's elements in row-major order, one rounded
    addition after another from +0, divided (one rounding) by the window's count, in
    float32 for 16-bit inputs and rounded once at the end (a NaN as the canonical quiet
    NaN): the order of torch's CPU and CUDA kernels (on the CPU equal to torch's bits over
    every dtype, layout, padding, ceil_mode and divisor option tested). Positions outside
    the input add +0, which changes no sum (torch starts from +0 too). Nothing depends on
    other images or rows."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    height, width = x.shape[-2:]
    oh = _pool_output_size(height, kh, sh, ph, ceil_mode)
    ow = _pool_output_size(width, kw, sw, pw, ceil_mode)
    wide = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    need_h, need_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    padded = torch.zeros(*x.shape[:-2], need_h, need_w, dtype=wide, device=x.device)
    rows, cols = min(height, need_h - ph), min(width, need_w - pw)
    padded[..., ph:ph + rows, pw:pw + cols] = x[..., :rows, :cols]
    total = torch.zeros(*x.shape[:-2], oh, ow, dtype=wide, device=x.device)
    for i in range(kh):
        for j in range(kw):
            total = total + padded[..., i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]
    if divisor is not None:
        counts = torch.full((oh, ow), float(divisor), dtype=wide, device=x.device)
    else:
        starts_h = torch.arange(oh, device=x.device) * sh - ph
        starts_w = torch.arange(ow, device=x.device) * sw - pw
        # windows end at the padded edge (a ceil_mode window past it counts only what it covers)
        ends_h, ends_w = (starts_h + kh).clamp(max=height + ph), (starts_w + kw).clamp(max=width + pw)
        if not count_include_pad:
            starts_h, starts_w = starts_h.clamp(min=0), starts_w.clamp(min=0)
            ends_h, ends_w = ends_h.clamp(max=height), ends_w.clamp(max=width)
        counts = ((ends_h - starts_h)[:, None] * (ends_w - starts_w)[None, :]).to(wide)
    return _finished(total / counts, x.dtype)


def avg_pool2d(call: Call, self: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int] = (),
               padding: Sequence[int] | int = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> torch.Tensor:
    """``F.avg_pool2d`` (Gemma 3's image-token pooling, ``avg_pool1d``) in the order of
    :func:`avg_pool2d_in_order`, on every device. torch's own CPU and CUDA kernels add in
    that order too, but nothing promises it; routed, the order is detkit's, which the
    portable guarantee needs."""
    _float(self)
    kernel = _triple(kernel_size, 2, "kernel_size")
    stride_hw = _triple(stride, 2, "stride") if len(stride) else kernel  # torch: empty means the kernel's
    pad = _triple([padding] if isinstance(padding, int) else padding, 2, "padding")
    if (self.dim() not in (3, 4) or min(kernel) <= 0 or min(stride_hw) <= 0 or min(pad) < 0
            or pad[0] * 2 > kernel[0] or pad[1] * 2 > kernel[1] or divisor_override == 0):
        raise Unsupported("arguments torch refuses", benign=True)  # torch's own error
    if self.numel() == 0 or any(_pool_output_size(n, k, s_, p_, ceil_mode) <= 0
                                for n, k, s_, p_ in zip(self.shape[-2:], kernel, stride_hw, pad)):
        raise Unsupported("an empty input or output", benign=True)  # torch's own result or error
    if divisor_override is not None and divisor_override < 0:
        # torch's CPU kernel gave +0 for a window summing to 0 divided by -3, not IEEE's -0
        raise Unsupported("a negative divisor_override")
    with torch.no_grad():
        out = avg_pool2d_in_order(_plain(self), kernel, stride_hw, pad, ceil_mode, count_include_pad,
                                  divisor_override)
    return _like_layout(out, self)


# ----------------------------------------------------------------------------- interpolation


def _resize_arguments(self: torch.Tensor, output_size: Sequence[int], scales: Sequence[float | None],
                      dims: int) -> tuple[list[int], list[float | None]]:
    """(output sizes, one scale or None per resized dim) of an ``upsample_*`` call; what
    torch refuses (or computes without arithmetic: an empty input) goes to its kernel."""
    _float(self)
    sizes = [int(s) for s in output_size]
    if self.dim() != dims + 2 or len(sizes) != dims or min(sizes) <= 0 or len(scales) > dims:
        raise Unsupported("arguments torch refuses", benign=True)  # torch's own error
    if self.numel() == 0:
        raise Unsupported("an empty input", benign=True)  # torch's own result or error
    return sizes, list(scales) + [None] * (dims - len(scales))


def _upsample(mode: str, dims: int) -> Adapter:
    """``upsample_linear1d``/``upsample_bilinear2d``/``upsample_trilinear3d`` (``mode``
    ``"linear"``) and ``upsample_bicubic2d`` (``"cubic"``): ``F.interpolate`` without
    antialias, in the order of :func:`detkit._interpolation.upsample_in_order` on every
    device (HunYuan-VL's and GOT-OCR2's resized position tables)."""

    def adapter(call: Call, self: torch.Tensor, output_size: Sequence[int], align_corners: bool,
                *scales: float | None) -> torch.Tensor:
        sizes, padded = _resize_arguments(self, output_size, scales, dims)
        with torch.no_grad():
            out = _interpolation.upsample_in_order(_plain(self), sizes, mode, align_corners, padded)
        return _like_layout(_finished(out, self.dtype), self)

    return adapter


def _upsample_aa(mode: str) -> Adapter:
    """``_upsample_bilinear2d_aa`` (``mode`` ``"linear"``) and ``_upsample_bicubic2d_aa``
    (``"cubic"``): ``F.interpolate(..., antialias=True)``, in the order of
    :func:`detkit._interpolation.upsample_aa_in_order` on every device (DINOv2-with-registers'
    and DeepSeek-OCR2's bicubic position tables, Cosmos3-Edge's per-image ones, SAM 2's
    mask prompts). torch's CPU kernel has no 16-bit form: there its error stands."""

    def adapter(call: Call, self: torch.Tensor, output_size: Sequence[int], align_corners: bool,
                *scales: float | None) -> torch.Tensor:
        sizes, padded = _resize_arguments(self, output_size, scales, 2)
        if self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16):
            raise Unsupported("16-bit antialiased resizing, which torch's CPU kernel refuses", benign=True)
        with torch.no_grad():
            out = _interpolation.upsample_aa_in_order(_plain(self), sizes, mode, align_corners, padded)
        return _like_layout(_finished(out, self.dtype), self)

    return adapter


def _upsample_nearest(dims: int, exact: bool) -> Adapter:
    """``upsample_nearest{1,2,3}d`` and ``_upsample_nearest_exact{1,2,3}d``: copies of the
    elements :func:`detkit._interpolation.upsample_nearest` picks, the same on every
    device; a NaN as the canonical quiet NaN (torch's CPU kernel writes 16-bit NaNs so,
    through float32, and copies float32 ones)."""

    def adapter(call: Call, self: torch.Tensor, output_size: Sequence[int], *scales: float | None) -> torch.Tensor:
        sizes, padded = _resize_arguments(self, output_size, scales, dims)
        with torch.no_grad():
            out = _interpolation.upsample_nearest(_plain(self), sizes, padded, exact)
        return _like_layout(_finished(out, self.dtype), self)  # NaN canonical, as every routed result

    return adapter


_GRID_MODES = {0: "bilinear", 1: "nearest", 2: "bicubic"}
_GRID_PADDINGS = {0: "zeros", 1: "border", 2: "reflection"}


def grid_sampler_2d(call: Call, input: torch.Tensor, grid: torch.Tensor, interpolation_mode: int,
                    padding_mode: int, align_corners: bool) -> torch.Tensor:
    """``F.grid_sample`` of 4-D inputs (GLM-4V's bicubic resampling of its position
    table) in the order of :func:`detkit._interpolation.grid_sample_in_order` on every
    device."""
    _float(input, grid)
    if (input.dim() != 4 or grid.dim() != 4 or grid.shape[0] != input.shape[0] or grid.shape[-1] != 2
            or input.dtype != grid.dtype or interpolation_mode not in _GRID_MODES
            or padding_mode not in _GRID_PADDINGS):
        raise Unsupported("arguments torch refuses", benign=True)  # torch's own error
    if input.numel() == 0 or grid.numel() == 0:
        raise Unsupported("an empty input or grid", benign=True)  # torch's own result or error
    with torch.no_grad():
        out = _interpolation.grid_sample_in_order(_plain(input), _plain(grid), _GRID_MODES[interpolation_mode],
                                                  _GRID_PADDINGS[padding_mode], align_corners)
    return _finished(out, input.dtype)


# ----------------------------------------------------------------------------- triangular solve


def _solve_shapes(a: torch.Tensor, b: torch.Tensor, left: bool) -> None:
    """torch's shape rules for linalg_solve_triangular. A call torch refuses (A not square,
    B not a matrix, B's n not A's, batches that do not broadcast) goes to torch's kernel,
    which raises its own error (nothing is computed: benign); the kernel's InputError made
    it a fallback, an InvarianceViolation with strict=True."""
    ok = a.dim() >= 2 and b.dim() >= 2 and a.shape[-1] == a.shape[-2]
    if ok:
        ok = (b.shape[-2] if left else b.shape[-1]) == a.shape[-1]
    if ok:
        try:
            torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except RuntimeError:
            ok = False
    if not ok:
        raise Unsupported(f"linalg_solve_triangular of shapes {tuple(a.shape)}, {tuple(b.shape)} with left={left}, "
                          "which torch refuses", benign=True)


def linalg_solve_triangular(call: Call, self: torch.Tensor, B: torch.Tensor, *, upper: bool, left: bool = True,
                            unitriangular: bool = False) -> torch.Tensor:
    _float(self, B)
    _solve_shapes(self, B, left)
    if self.dtype == B.dtype and self.dtype not in (torch.float32, torch.float64):
        # torch has no CPU or CUDA kernel for 16-bit floats: its error stands, nothing is computed
        raise Unsupported(f"{self.dtype} operands, which torch has no kernel for", benign=True)
    if self.dtype != B.dtype:
        raise Unsupported(f"{self.dtype} and {B.dtype} operands")  # torch computes in A's dtype
    if self.numel() == 0 or B.numel() == 0:
        raise Unsupported("empty input", benign=True)
    x = _kernel_call(kernels_module().solve_triangular, _plain(self), _plain(B), upper=upper, left=left,
                     unitriangular=unitriangular, portable=call.portable)
    # torch's layout: each matrix column major, as LAPACK leaves it. Not x.mT.contiguous().mT:
    # with a size-1 dimension (one right-hand column) the row-major x counts as contiguous
    # transposed too and kept its strides, which are not torch's.
    return torch.empty_like(x.mT, memory_format=torch.contiguous_format).mT.copy_(x)


# ----------------------------------------------------------------------------- norms


def _norm_rows(
    x: torch.Tensor, normalized_shape: Sequence[int], *params: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(x as rows of the normalised elements, params as 1-D tensors)."""
    k = len(normalized_shape)
    shape = tuple(normalized_shape)
    if k == 0 or tuple(x.shape[x.dim() - k :]) != shape:
        raise Unsupported(f"normalized_shape {shape} does not match input {tuple(x.shape)}", benign=True)
    # torch wants weight and bias of exactly normalized_shape; reshaped here, a (4,) weight
    # for (2, 2) gave a result where torch raises (and a (5,) one an unrelated reshape error).
    if any(p is not None and tuple(p.shape) != shape for p in params):
        raise Unsupported(f"weight/bias shape is not normalized_shape {shape}", benign=True)  # torch raises
    if x.numel() == 0:
        raise Unsupported("empty input", benign=True)
    if k == 1:  # a model's norm: no views to make (they cost a small op's host time)
        rows = x if x.dim() == 2 else x.reshape(-1, shape[0])
        return rows, [None if p is None else _plain(p) for p in params]
    n = math.prod(shape)
    return x.reshape(-1, n), [None if p is None else _plain(p).reshape(n) for p in params]


def native_layer_norm(
    call: Call,
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _float(input, weight, bias)
    rows, (w, b) = _norm_rows(_plain(input), normalized_shape, weight, bias)
    out = _kernel_call(kernels_module().layer_norm, rows, w, b, eps, portable=call.portable)
    # mean and rstd are outputs of the aten op (autograd saves them for the backward);
    # they come from torch's own kernels and do not feed the forward result.
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    var, mu = torch.var_mean(rows.to(acc), -1, correction=0)
    rstd = torch.rsqrt(var + eps)
    k = len(normalized_shape)
    stat_shape = (*input.shape[: input.dim() - k], *([1] * k))
    return out.reshape(input.shape), mu.to(input.dtype).reshape(stat_shape), rstd.to(input.dtype).reshape(stat_shape)


def layer_norm(
    call: Call,
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    cudnn_enable: bool = True,
) -> torch.Tensor | Delegated:
    """aten::layer_norm, what F.layer_norm and nn.LayerNorm call: native_layer_norm's
    output alone. Routed itself so that a forward pass does not also compute the mean and
    rstd that only a backward needs (four more torch ops a call: on a GPU, four launches).
    A call the kernel does not take goes through native_layer_norm's override, which
    counts it once."""
    del cudnn_enable
    try:
        _float(input, weight, bias)
        rows, (w, b) = _norm_rows(_plain(input), normalized_shape, weight, bias)
        out = _kernel_call(kernels_module().layer_norm, rows, w, b, eps, portable=call.portable)
    except Unsupported:
        with routed():
            return Delegated(torch.native_layer_norm(input, normalized_shape, weight, bias, eps)[0])
    return out if out.shape == input.shape else out.reshape(input.shape)


def rms_norm(
    call: Call,
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    _float(input, weight)
    rows, (w,) = _norm_rows(_plain(input), normalized_shape, weight)
    out = _kernel_call(kernels_module().rms_norm, rows, w, eps, portable=call.portable)
    return out if out.shape == input.shape else out.reshape(input.shape)


def _fused_rms_norm(
    call: Call,
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = rms_norm(call, input, normalized_shape, weight, eps)
    # rstd (saved for the backward) from torch's own decomposition.
    _, rstd = call.original(input, normalized_shape, weight, eps)
    return out, rstd


# ----------------------------------------------------------------------------- attention


def _attention(
    call: Call,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    _float(query, key, value)
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise Unsupported("attn_mask dtype", benign=True)  # torch raises its own error
    if dropout_p < 0.0:
        raise Unsupported("dropout_p < 0", benign=True)  # torch raises its own error
    if dropout_p > 0.0:
        raise Unsupported("dropout_p > 0")
    out = _kernel_call(
        kernels_module().attention,
        _plain(query),
        _plain(key),
        _plain(value),
        attn_mask=_plain(attn_mask),
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        portable=call.portable,
    )
    # torch lays SDPA's output out as the query (empty_like) when the value head size is
    # the query's: an HF query is a (B, L, H, E) projection viewed as (B, H, L, E), and code
    # that .view()s the output transposed back relies on that layout.
    return _like(out, query) if out.shape == query.shape else out


def scaled_dot_product_attention(
    call: Call,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    return _attention(call, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def flash_attention_for_cpu(
    call: Call,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    gqa = query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != query.shape[-3]
    out = _attention(call, query, key, value, attn_mask, dropout_p, is_causal, scale, gqa)
    if _needs_grad(query, key, value):
        # The backward needs the logsumexp; only torch's kernel produces it.
        _, lse = call.original(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    else:
        # Not used without autograd; NaN makes any accidental use visible.
        lse = torch.full(query.shape[:-1], math.nan, dtype=torch.float32, device=query.device)
    return out, lse


# ----------------------------------------------------------------------------- elementwise


def _aligned(call: Call, x: torch.Tensor, extra: tuple[Any, ...], kwargs: dict[str, Any], inplace: bool) -> torch.Tensor:
    """Run the original elementwise kernel so that every element takes its vector path."""
    _float(x)
    n = x.numel()
    if n == 0:
        raise Unsupported("empty input", benign=True)
    flat = x.detach().reshape(-1)
    padded = -(-n // _ALIGN) * _ALIGN
    if padded != n or inplace or not flat.is_contiguous():
        buf = torch.zeros(padded, dtype=x.dtype, device=x.device)
        buf[:n] = flat
    else:
        buf = flat
    parts = [call.original(buf[i : i + _SLICE], *extra, **kwargs) for i in range(0, padded, _SLICE)]
    if inplace:
        res = buf[:n]
    else:
        res = (parts[0] if len(parts) == 1 else torch.cat(parts))[:n]
    res = res.reshape(x.shape)
    if inplace:
        with torch.no_grad():
            x.copy_(res)
        return x
    return _like(res, x)


# Exact arithmetic (no math library), aligned only for torch's position-dependent sign of
# zero: softshrink gave -0.0 from its scalar tail and +0.0 from its vector body for a
# negative input inside the dead zone (279 of 4,099 elements). Portable as it is.
_ALIGNED_EXACT = frozenset({"softshrink"})


def _elementwise_result(res: torch.Tensor, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """An elementwise op's result for input ``x``: written into ``x`` in place, else laid
    out as torch lays it out."""
    if inplace:
        with torch.no_grad():
            x.copy_(res)
        return x
    return _like(res, x)


def _portable(name: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``name`` of ``x`` from the portable backend of ``x``'s device."""
    return _elementwise_result(_kernel_call(portable_backend(x.device.type).elementwise, name, x.detach()), x, inplace)


# Unary ops that compute an integer or bool input in the default float dtype (the others
# refuse such input): their results come from the same position-dependent float loops.
_PROMOTES_INTEGERS = frozenset({"sigmoid", "sinh", "rsqrt", "tanh", "exp", "erf", "log", "sin", "cos", "exp2", "cosh",
                                "logit", "atanh", "digamma", "log1p", "expm1"})


def _portable_name(op: str, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The portable backend's name for ``op`` with these arguments, or None if it has none."""
    if op not in ELEMENTWISE_PORTABLE:
        return None
    if op == "gelu" and not extra and set(kwargs) <= {"approximate"}:
        return _GELU_PORTABLE.get(kwargs.get("approximate", "none"))
    if op == "softplus" and len(extra) <= 2 and set(kwargs) <= {"beta", "threshold"}:
        given = (*extra, *(kwargs.get(k, d) for k, d in zip(("beta", "threshold")[len(extra):],
                                                              _SOFTPLUS_DEFAULTS[len(extra):])))
        return op if all(_scalar_is(v, d) for v, d in zip(given, _SOFTPLUS_DEFAULTS)) else None
    return None if extra or kwargs else op


def _composed_portable(call: Call, op: str, x: torch.Tensor, extra: tuple[Any, ...], kwargs: dict[str, Any],
                       inplace: bool) -> torch.Tensor | None:
    """Portable mode: ``op`` of ``x`` composed from portable functions (``COMPOSED_PORTABLE``),
    or None where that does not apply (another mode, op, dtype or extra arguments)."""
    if not (call.portable and op in COMPOSED_PORTABLE and not extra and not kwargs
            and isinstance(x, torch.Tensor) and x.dtype in _PORTABLE_DTYPES and x.layout == torch.strided):
        return None
    if x.numel() == 0:
        raise Unsupported("empty input", benign=True)
    return _elementwise_result(COMPOSED_PORTABLE[op](_plain(x)), x, inplace)


def _elementwise(op: str, inplace: bool = False) -> Adapter:
    """Adapter of a unary op; ``op`` is the aten name without a trailing underscore."""
    promotes = op in _PROMOTES_INTEGERS and not inplace

    def adapter(call: Call, self: torch.Tensor, *extra: Any, **kwargs: Any) -> torch.Tensor:
        if promotes and isinstance(self, torch.Tensor) and not (self.is_floating_point() or self.is_complex()):
            self = self.to(torch.get_default_dtype())  # what torch computes from; not an exact op
        composed = _composed_portable(call, op, self, extra, kwargs, inplace)
        if composed is not None:
            return composed
        portable_name = _portable_name(op, extra, kwargs) if call.portable else None
        if portable_name is not None:
            _float(self)
            if self.numel() == 0:
                raise Unsupported("empty input", benign=True)
            if self.dtype in _PORTABLE_DTYPES:
                return _portable(portable_name, self, inplace)
        res = _aligned(call, self, extra, kwargs, inplace)
        if call.portable and op not in _ALIGNED_EXACT:
            call.not_portable(_not_portable_reason(op, portable_name, self))
        return res

    return adapter


def _not_portable_reason(op: str, portable_name: str | None, x: torch.Tensor) -> str:
    if op not in ELEMENTWISE_PORTABLE:
        return "torch's math library (not in the canonical orders)"
    if portable_name is None:
        return "extra arguments: torch's math library"
    return f"{x.dtype}: torch's math library (portable kernels take float32, bfloat16, float16)"


def _cuda_elementwise(op: str, inplace: bool = False) -> Adapter:
    """CUDA adapter of a unary op the portable backends implement. torch's CUDA
    elementwise kernels evaluate every element with the same code (no scalar tail, unlike
    its CPU loops), so outside portable mode the op passes through; in portable mode it
    goes to the CUDA portable kernel, which gives the CPU portable backend's bits."""

    def adapter(call: Call, self: torch.Tensor, *extra: Any, **kwargs: Any) -> torch.Tensor:
        composed = _composed_portable(call, op, self, extra, kwargs, inplace)
        if composed is not None:
            return composed
        portable_name = _portable_name(op, extra, kwargs) if call.portable else None
        if portable_name is not None:
            _float(self)
            if self.numel() == 0:
                raise Unsupported("empty input", benign=True)
            if self.dtype in _PORTABLE_DTYPES:
                return _portable(portable_name, self, inplace)
        raise Unsupported("torch's CUDA elementwise kernels are position independent", benign=True)

    return adapter


# pow(x, e) is correctly rounded (hence position independent) for these exponents.
EXACT_EXPONENTS = (0.0, 1.0, 2.0, 0.5)  # pow: 1, x, x * x, sqrt(x): one correct rounding at most


def _portable_cube(call: Call, self: Any, exponent: Any) -> bool:
    """pow(x, 3) in portable mode: the portable backend's ``cube``, (x * x) * x in float32
    rounded once (GPT-2's gelu_new); torch's own float32 kernels compute the same, but
    on the CPU its float16 kernel rounds once and its bfloat16 one after each multiply."""
    return (call.portable and _scalar_is(exponent, 3) and isinstance(self, torch.Tensor)
            and self.dtype in _PORTABLE_DTYPES and self.numel() > 0)


def _scalar_in(value: Any, dtype: torch.dtype) -> float:
    """A Python scalar as torch uses it in ``dtype``: rounded into the dtype (nearest even)."""
    return float(torch.tensor(value, dtype=dtype))


def _portable_pow(call: Call, base: Any, exponent: Any, inplace: bool) -> torch.Tensor | None:
    """``base ** exponent`` (one of them a tensor) from the portable backend's ``pow``
    (canonical-orders section 2.9), or None when the result's dtype is not one it takes.
    The operands are what torch computes from: a tensor cast to the result dtype, a
    scalar rounded into it, except a scalar exponent of a float32 tensor, which torch's
    CPU kernel keeps in double (so does ``Pow``: its exponent is binary64)."""
    if not call.portable or not (isinstance(base, torch.Tensor) or isinstance(exponent, torch.Tensor)):
        return None
    if isinstance(exponent, bool) or isinstance(base, bool) or isinstance(exponent, complex):
        return None
    tensor = base if isinstance(base, torch.Tensor) else exponent
    dtype = torch.result_type(base, exponent)
    if dtype not in _PORTABLE_DTYPES:
        return None
    for t in (base, exponent):
        if isinstance(t, torch.Tensor) and t.layout != torch.strided:
            raise Unsupported(f"{t.layout} tensor")
    if isinstance(base, torch.Tensor) and not isinstance(exponent, torch.Tensor):
        x, y = base.detach().to(dtype), float(exponent) if dtype == torch.float32 else _scalar_in(exponent, dtype)
    else:
        if isinstance(base, torch.Tensor):
            xt = base.detach().to(dtype)
        else:
            xt = torch.tensor(_scalar_in(base, dtype), dtype=dtype)
        x, y = torch.broadcast_tensors(xt.to(tensor.device), exponent.detach().to(device=tensor.device, dtype=dtype))
        y = y.contiguous()
    if inplace and (x.shape != base.shape or dtype != base.dtype):
        raise Unsupported("in-place pow whose result does not fit the tensor (torch says why)")
    if x.numel() == 0:
        raise Unsupported("empty input", benign=True)
    res = _kernel_call(portable_backend(tensor.device.type).pow, x.contiguous(), y)
    if inplace:
        with torch.no_grad():
            base.copy_(res)
        return base
    return _like(res, base) if isinstance(base, torch.Tensor) and base.shape == res.shape else res


def _pow_not_portable(call: Call, base: Any, exponent: Any) -> None:
    dtype = torch.result_type(base, exponent)
    if call.portable and (dtype.is_floating_point or dtype.is_complex):
        call.not_portable(f"{dtype}: torch's math library (portable pow takes float32, bfloat16, float16)")


def _aligned_binary(fn: Callable[[Any, Any], torch.Tensor], base: Any, exponent: Any, inplace: bool,
                    name: str = "") -> torch.Tensor:
    """torch's binary ``fn`` (pow, atan2, ...; ``name`` for messages) with every element on
    its vector path (``_aligned``, for two operands): both broadcast, flattened and padded
    with ones to a multiple of ``_ALIGN``, in slices."""
    name = name or fn.__name__
    tensors = [t for t in (base, exponent) if isinstance(t, torch.Tensor)]
    if not tensors:  # two wrapped scalars (torch.div(7.5, 2, rounding_mode=...)): one value, no position
        raise Unsupported("scalar operands only", benign=True)
    dtype = torch.result_type(base, exponent)
    if any(t.layout != torch.strided for t in tensors):
        raise Unsupported("a tensor that is not strided")
    if dtype not in _FLOATS:
        raise Unsupported(f"{dtype} {name}")
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    n = math.prod(shape)
    if n == 0:
        raise Unsupported("empty input", benign=True)
    if inplace and shape != base.shape:
        raise Unsupported(f"in-place {name} whose result does not fit the tensor (torch says why)")
    padded = -(-n // _ALIGN) * _ALIGN

    def flat(v: Any) -> Any:
        # Beside a dimensioned operand a 0-d one stays one: torch reads it as a CPU scalar
        # at its own precision (a float32 0.1 against bfloat16 operands), and it has no
        # positions. The others in the result dtype first (a flattened 0-d operand would
        # otherwise take part in type promotion as a dimensioned one).
        if not isinstance(v, torch.Tensor) or (v.dim() == 0 and shape):
            return v
        buf = torch.ones(padded, dtype=dtype, device=v.device)
        buf[:n] = v.detach().expand(shape).reshape(-1)
        return buf

    fb, fe = flat(base), flat(exponent)

    def part(v: Any, i: int) -> Any:
        return v[i : i + _SLICE] if isinstance(v, torch.Tensor) and v.dim() else v

    parts = [fn(part(fb, i), part(fe, i)) for i in range(0, padded, _SLICE)]
    res = (parts[0] if len(parts) == 1 else torch.cat(parts))[:n].reshape(shape)
    if inplace:
        if res.dtype != base.dtype:
            raise Unsupported(f"in-place {name} whose result dtype is not the tensor's (torch says why)")
        with torch.no_grad():
            base.copy_(res)
        return base
    return _like(res, base) if isinstance(base, torch.Tensor) and base.shape == shape else res


def _pow_scalar(inplace: bool) -> Adapter:
    def adapter(call: Call, self: torch.Tensor, exponent: Any) -> torch.Tensor:
        if not isinstance(exponent, torch.Tensor) and any(_scalar_is(exponent, e) for e in EXACT_EXPONENTS):
            raise Unsupported(f"exponent {exponent} is exact", benign=True)
        if _portable_cube(call, self, exponent):
            return _portable("cube", self, inplace)
        if (not inplace and isinstance(exponent, float) and isinstance(self, torch.Tensor)
                and not (self.is_floating_point() or self.is_complex())):
            # An integer tensor to a float power is computed in the default float dtype, by
            # the same position-dependent loop: not an exact integer op.
            self = self.to(torch.get_default_dtype())
        res = _portable_pow(call, self, exponent, inplace)
        if res is not None:
            return res
        res = _aligned(call, self, (exponent,), {}, inplace)
        _pow_not_portable(call, self, exponent)
        return res

    return adapter


def _pow_tensor(inplace: bool) -> Adapter:
    """pow.Tensor_Tensor, pow_.Tensor and pow.Scalar (a scalar base) on the CPU: the
    portable ``Pow`` in portable mode, else torch's kernel with every element on its vector
    path (float32's scalar tail rounds differently: 73 of 4,099 elements changed)."""

    def adapter(call: Call, self: Any, exponent: Any) -> torch.Tensor:
        tensors = [t for t in (self, exponent) if isinstance(t, torch.Tensor)]
        if not any(t.is_floating_point() or t.is_complex() for t in tensors) and not (
                isinstance(self, float) or isinstance(exponent, float)):
            raise Unsupported("integer pow is exact", benign=True)
        res = _portable_pow(call, self, exponent, inplace)
        if res is not None:
            return res
        res = _aligned_binary(torch.pow, self, exponent, inplace)
        _pow_not_portable(call, self, exponent)
        return res

    return adapter


def _binary(fn: Callable[..., torch.Tensor], inplace: bool, *, libm: bool) -> Adapter:
    """A binary op on the CPU (atan2, logaddexp: ``libm``, from torch's math library;
    floor_divide, div with a rounding mode: IEEE operations) through torch's kernel with
    every element on its vector path: the scalar tail rounded differently (float32
    atan2 673 and logaddexp 88 of 4,099 elements; bfloat16/float16 floor division 11 and
    1). In portable mode a ``libm`` op is still torch's math library (counted as not
    portable). Integer operands: a ``libm`` op computes them in the default float dtype,
    by the same loop; the divisions are exact on them and pass through."""

    def adapter(call: Call, self: Any, other: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.result_type(self, other).is_floating_point:
            if not libm:
                raise Unsupported("integer operands: exact", benign=True)
            if not inplace:
                self, other = self.to(torch.get_default_dtype()), other.to(torch.get_default_dtype())
        if "rounding_mode" in kwargs and kwargs["rounding_mode"] is None:
            raise Unsupported("true division is one correctly rounded operation", benign=True)
        res = _aligned_binary(functools.partial(fn, **kwargs), self, other, inplace, name=fn.__name__)
        if call.portable and libm:
            call.not_portable("torch's math library (not in the canonical orders)")
        return res

    return adapter


def _cuda_pow(inplace: bool) -> Adapter:
    """CUDA pow (every overload): the portable ``Pow`` in portable mode (pow(x, 3) the
    portable ``cube``, exponents 0, 1, 2 and 0.5 exact); everything else passes through
    (torch's CUDA elementwise kernels are position independent)."""

    def adapter(call: Call, self: Any, exponent: Any) -> torch.Tensor:
        if call.portable and not isinstance(exponent, torch.Tensor):
            if any(_scalar_is(exponent, e) for e in EXACT_EXPONENTS):
                raise Unsupported(f"exponent {exponent} is exact", benign=True)
            if _portable_cube(call, self, exponent):
                return _portable("cube", self, inplace)
        res = _portable_pow(call, self, exponent, inplace)
        if res is not None:
            return res
        _pow_not_portable(call, self, exponent)
        raise Unsupported("torch's CUDA elementwise kernels are position independent", benign=True)

    return adapter


# ----------------------------------------------------------------------------- tables

_COMMON: tuple[OpOverride, ...] = (
    OpOverride("mm", mm, "matmul"),
    OpOverride("addmm", addmm, "matmul"),
    OpOverride("bmm", bmm, "matmul"),
    OpOverride("baddbmm", baddbmm, "matmul"),
    OpOverride("mv", mv, "matmul"),
    OpOverride("addmv", addmv, "matmul"),
    OpOverride("dot", dot, "matmul"),
    OpOverride("_grouped_mm", grouped_mm, "matmul"),
    OpOverride("convolution", convolution, "matmul"),
    OpOverride("_softmax", _softmax, "softmax"),
    OpOverride("_log_softmax", _log_softmax, "softmax"),
    OpOverride("_safe_softmax", _safe_softmax, "softmax"),
    OpOverride("mean.dim", mean_dim, "reduction"),
    OpOverride("mean.default", mean_all, "reduction"),
    OpOverride("sum.dim_IntList", sum_dim, "reduction"),
    OpOverride("sum.default", sum_all, "reduction"),
    OpOverride("logsumexp", logsumexp, "reduction"),
    OpOverride("var.correction", var, "reduction"),
    OpOverride("std.correction", std, "reduction"),
    OpOverride("var_mean.correction", var_mean, "reduction"),
    OpOverride("std_mean.correction", std_mean, "reduction"),
    OpOverride("linalg_vector_norm", linalg_vector_norm, "reduction"),
    OpOverride("norm.ScalarOpt_dim", norm_dim, "reduction"),
    OpOverride("norm.Scalar", norm_all, "reduction"),
    OpOverride("nansum", nansum, "reduction"),
    OpOverride("nanmean", nanmean, "reduction", composite=True),
    OpOverride("prod.dim_int", prod_dim, "reduction", any_float=True),
    OpOverride("prod.default", prod_all, "reduction", any_float=True),
    OpOverride("nll_loss_forward", nll_loss_forward, "reduction"),
    OpOverride("polar", polar, "elementwise"),
    OpOverride("cumsum", cumsum, "scan"),
    OpOverride("cumsum_", _inplace_scan("cumsum", _cumsum), "scan"),
    OpOverride("cumprod", cumprod, "scan", any_float=True),
    OpOverride("cumprod_", _inplace_scan("cumprod", _cumprod), "scan", any_float=True),
    OpOverride("histc", histc, "reduction"),
    OpOverride("index_add", _index_add(inplace=False), "scan"),
    OpOverride("index_add_", _index_add(inplace=True), "scan"),
    OpOverride("avg_pool2d", avg_pool2d, "reduction", any_float=True),
    OpOverride("upsample_linear1d", _upsample("linear", 1), "reduction", any_float=True),
    OpOverride("upsample_bilinear2d", _upsample("linear", 2), "reduction", any_float=True),
    OpOverride("upsample_trilinear3d", _upsample("linear", 3), "reduction", any_float=True),
    OpOverride("upsample_bicubic2d", _upsample("cubic", 2), "reduction", any_float=True),
    OpOverride("_upsample_bilinear2d_aa", _upsample_aa("linear"), "reduction", any_float=True),
    OpOverride("_upsample_bicubic2d_aa", _upsample_aa("cubic"), "reduction", any_float=True),
    *(OpOverride(f"{prefix}{d}d", _upsample_nearest(d, exact), "elementwise", any_float=True)
      for prefix, exact in (("upsample_nearest", False), ("_upsample_nearest_exact", True)) for d in (1, 2, 3)),
    OpOverride("grid_sampler_2d", grid_sampler_2d, "reduction", any_float=True),
    OpOverride("log_sigmoid_forward", log_sigmoid_forward, "elementwise"),
    OpOverride("xlogy.Tensor", _xlogy(inplace=False), "elementwise"),
    OpOverride("xlogy_.Tensor", _xlogy(inplace=True), "elementwise"),
    OpOverride("linalg_solve_triangular", linalg_solve_triangular, "solve"),
    OpOverride("native_layer_norm", native_layer_norm, "norm"),
    OpOverride("layer_norm", layer_norm, "norm", composite=True),
    OpOverride("rms_norm", rms_norm, "norm", composite=True),
    OpOverride("_fused_rms_norm", _fused_rms_norm, "norm", composite=True),
    OpOverride("scaled_dot_product_attention", scaled_dot_product_attention, "attention", composite=True),
)

_ELEMENTWISE_NAMES = ("silu", "sigmoid", "gelu", "softplus", "mish", "sinh", "rsqrt", "tanh", "exp", "erf", "log",
                      "sin", "cos", "elu", "exp2", "cosh", "logit", "atanh", "digamma", "log1p", "expm1",
                      "softshrink")
# Every in-place form aten has of the names above (softplus has none): an unrouted one
# would run torch's position-dependent loop without a trace in uncovered().
_ELEMENTWISE_INPLACE = ("silu_", "sigmoid_", "gelu_", "mish_", "sinh_", "rsqrt_", "tanh_", "exp_", "erf_", "log_",
                        "sin_", "cos_", "elu_", "exp2_", "cosh_", "logit_", "atanh_", "digamma_", "log1p_",
                        "expm1_")

_CPU_ELEMENTWISE: tuple[OpOverride, ...] = (
    *(OpOverride(name, _elementwise(name), "elementwise") for name in _ELEMENTWISE_NAMES),
    *(OpOverride(name, _elementwise(name.removesuffix("_"), inplace=True), "elementwise") for name in _ELEMENTWISE_INPLACE),
    OpOverride("pow.Tensor_Scalar", _pow_scalar(inplace=False), "elementwise"),
    OpOverride("pow_.Scalar", _pow_scalar(inplace=True), "elementwise"),
    OpOverride("pow.Tensor_Tensor", _pow_tensor(inplace=False), "elementwise", numbers_as_tensors=True),
    OpOverride("pow_.Tensor", _pow_tensor(inplace=True), "elementwise", numbers_as_tensors=True),
    OpOverride("pow.Scalar", _pow_tensor(inplace=False), "elementwise"),
    # floor_divide.Scalar and div.Scalar_mode call these with a wrapped number
    *(OpOverride(name, _binary(fn, inplace=name.partition(".")[0].endswith("_"), libm=libm), "elementwise",
                 numbers_as_tensors=True)
      for name, fn, libm in (("atan2", torch.atan2, True), ("atan2_", torch.atan2, True),
                             ("logaddexp", torch.logaddexp, True), ("logaddexp2", torch.logaddexp2, True),
                             ("floor_divide", torch.floor_divide, False),
                             ("floor_divide_.Tensor", torch.floor_divide, False),
                             ("div.Tensor_mode", torch.div, False), ("div_.Tensor_mode", torch.div, False))),
)

# mul and div with a complex operand; real operands are one correctly rounded operation
# (exact, not routed). A Python number reaches the kernel as a number, which torch's own
# boxed kernel refuses (x * 2.0).
_COMPLEX_PRODUCTS: tuple[OpOverride, ...] = tuple(
    OpOverride(f"{op}{'_' if inplace else ''}.Tensor", _complex_binary(op, inplace), "elementwise",
               numbers_as_tensors=True, claims=_has_complex_operand)
    for op in ("mul", "div") for inplace in (False, True)
)

# CUDA: only the functions the portable backends implement, for portable mode.
_CUDA_ELEMENTWISE: tuple[OpOverride, ...] = (
    *(OpOverride(name, _cuda_elementwise(name), "elementwise")
      for name in sorted(ELEMENTWISE_PORTABLE | set(COMPOSED_PORTABLE))),
    *(OpOverride(name, _cuda_elementwise(name.removesuffix("_"), inplace=True), "elementwise")
      for name in _ELEMENTWISE_INPLACE if name.removesuffix("_") in ELEMENTWISE_PORTABLE | set(COMPOSED_PORTABLE)),
    *(OpOverride(name, _cuda_pow(inplace=name.startswith("pow_")), "elementwise",
                 numbers_as_tensors=name in ("pow.Tensor_Tensor", "pow_.Tensor"))
      for name in ("pow.Tensor_Scalar", "pow_.Scalar", "pow.Tensor_Tensor", "pow_.Tensor", "pow.Scalar")),
)

# out= overloads (``torch.mm(a, b, out=c)``, ``torch.sum(x, 1, out=o)``, ...) of the routed
# functional forms: unrouted, they ran torch's kernel without a trace in uncovered().
_OUT_NAMES = {"mean.dim": "mean.out", "mean.default": "mean.dtype_out", "sum.dim_IntList": "sum.IntList_out",
              "sum.default": "sum.out", "pow.Tensor_Scalar": "pow.Tensor_Scalar_out",
              "pow.Tensor_Tensor": "pow.Tensor_Tensor_out", "pow.Scalar": "pow.Scalar_out",
              "div.Tensor_mode": "div.out_mode", "var.correction": "var.correction_out",
              "std.correction": "std.correction_out", "norm.ScalarOpt_dim": "norm.out",
              "norm.Scalar": "norm.Scalar_out", "xlogy.Tensor": "xlogy.OutTensor", "mul.Tensor": "mul.out",
              "div.Tensor": "div.out", "prod.dim_int": "prod.int_out", "prod.default": "prod.out"}
_NO_OUT_FORM = frozenset({"_grouped_mm", "_safe_softmax", "native_layer_norm", "layer_norm", "rms_norm",
                          "_fused_rms_norm",
                          "var_mean.correction", "std_mean.correction", "nll_loss_forward", "log_sigmoid_forward",
                          "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"})


def _out_form(spec: OpOverride) -> OpOverride:
    """The out= overload of ``spec``: its adapter computes the result, then torch's own
    resize rule and a copy put it in ``out``. A result whose dtype or device differs from
    ``out``'s (torch would cast, or refuse) is left to torch and counted as uncovered."""
    functional = spec.overload

    def adapter(call: Call, *args: Any, out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # The functional adapter's own calls of torch's kernel go through the functional
        # overload (re-dispatched; the mode passes calls from inside an adapter to torch).
        res = spec.adapter(Call(call.portable, functional, call.not_portable), *args, **kwargs)
        if res.dtype != out.dtype or res.device != out.device:
            raise Unsupported(f"out= of {out.dtype} on {out.device} for a {res.dtype} result on {res.device}")
        if out.shape != res.shape:  # torch's resize rule for out= (aten's resize_output)
            if out.numel() != 0:
                warnings.warn(f"An output with one or more elements was resized since it had shape {list(out.shape)}, "
                              f"which does not match the required output shape {list(res.shape)}. This behavior is "
                              "deprecated in torch: resize out to zero elements (out.resize_(0)) to reuse it.",
                              UserWarning, stacklevel=2)
            out.resize_(res.shape)
        with torch.no_grad():
            out.copy_(res)
        return out

    return OpOverride(_OUT_NAMES.get(spec.name, f"{spec.name}.out"), adapter, spec.kind,
                      numbers_as_tensors=spec.numbers_as_tensors, claims=spec.claims, any_float=spec.any_float)


def _with_out_forms(table: tuple[OpOverride, ...]) -> tuple[OpOverride, ...]:
    # in-place forms (silu_, pow_.Scalar: a trailing "_" on the op name) have no out= form
    return (*table, *(_out_form(s) for s in table
                      if s.name not in _NO_OUT_FORM and not s.name.partition(".")[0].endswith("_")))


# One table, keyed by dispatch key. The CPU flash entry point is what SDPA calls when a
# gradient is needed (the composite gate keeps torch's decomposition then), so the
# forward stays routed under autograd too. The aligned-slice elementwise trick is about
# torch's CPU loops; CUDA elementwise kernels have no scalar tail.
OVERRIDES: dict[str, tuple[OpOverride, ...]] = {
    "CPU": _with_out_forms((
        *_COMMON,
        OpOverride("_scaled_dot_product_flash_attention_for_cpu", flash_attention_for_cpu, "attention"),
        *_CPU_ELEMENTWISE,
        *_COMPLEX_PRODUCTS,
    )),
    "CUDA": _with_out_forms((*_COMMON, *_CUDA_ELEMENTWISE, *_COMPLEX_PRODUCTS)),
}

# ----------------------------------------------------------------------------- folds


@dataclass(frozen=True)
class Fold:
    """A composite op made to take one path through torch's decomposition.

    Not a route to a detkit kernel: ``run(original, *args, **kwargs)`` computes the op
    with value-equal arguments, or with the very ops torch's canonical path calls, so the
    ops it reaches (routed as usual) see the same problem however the caller laid its
    tensors out. The mode registers it on the backend key and on the autograd key (a
    composite op is decomposed at the latter).
    """

    name: str
    run: Callable[..., Any]

    @property
    def qualname(self) -> str:
        return f"aten::{self.name}"


# torch reduces a 3-D+ input times a matrix to one 2-D product (mm/addmm) only when the
# input's leading dimensions are contiguous or a gradient is needed; otherwise it runs bmm
# against the broadcast matrix, and F.linear then adds its bias after the product (two
# roundings in 16-bit) instead of inside addmm. So a frozen model's lm_head on HF
# generate's last-position slice took bmm while the trainer's forward took mm. Under the
# mode both always take the 2-D path.


def _foldable(x: torch.Tensor) -> bool:
    """torch's own test (``should_fold``), strides of size-1 dimensions included: a
    (1, 1, H) slice is_contiguous() and still not folded."""
    return all(x.stride(i) == x.stride(i + 1) * x.size(i + 1) for i in range(x.dim() - 2))


def _fold_linear(original: Callable[..., Any], x: Any, weight: Any, bias: Any = None) -> Any:
    """What torch does for a contiguous input, for every 3-D+ input: one mm/addmm of the
    flattened rows (a copy when x is a strided view: same values), the bias inside addmm.
    Calling mm/addmm directly spares the matmul fold a second pass."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() >= 3 and weight.dim() == 2):
        return original(x, weight, bias)
    # The row count spelled out: reshape(-1, 0) of an input with no features is ambiguous.
    flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


def _fold_matmul(original: Callable[..., Any], x: Any, other: Any) -> Any:
    """torch folds into mm/mv only when it can without a copy or when an operand requires
    grad; otherwise bmm against the broadcast matrix. Under the mode each shape takes one
    path, whatever the layout and the ``requires_grad`` flags:

    * a 3-D+ ``x`` times a matrix or vector: a copy of a non-foldable ``x`` (same values);
    * a matrix or vector times a 3-D+ ``other`` (Mamba's ``dt_proj.weight @ x.mT``): torch's
      folded form, ``(other.mT @ x.mT).mT``, which folds by the first rule;
    * a batched ``x`` times a right operand with a batch of one, e.g. (1, K, N): torch folds
      it into mm or not depending on the batch of ``x``; it is broadcast to that batch, so
      every batch entry takes bmm, as the same product with a batch of one does (a
      single-head attention's ``probs @ V`` alone and in a batch)."""
    if not (isinstance(x, torch.Tensor) and isinstance(other, torch.Tensor)):
        return original(x, other)
    if (x.dim() >= 3 and 3 <= other.dim() <= x.dim() and all(d == 1 for d in other.shape[:-2])
            and math.prod(x.shape[:-2]) > 1):
        other = other.expand(*x.shape[:-2], *other.shape[-2:])
    if x.dim() >= 3 and other.dim() <= 2:
        if not _foldable(x):
            x = x.clone(memory_format=torch.contiguous_format)  # same values; torch then folds
        return original(x, other)
    if x.dim() <= 2 and other.dim() >= 3:
        if x.dim() == 1:
            return _fold_matmul(original, other.mT, x)  # (..., N, K) @ (K,): (..., N)
        # torch's bmm path (no operand requiring grad) returns a contiguous result, and code
        # may .view() it; the folded form's .mT alone is strided.
        return _fold_matmul(original, other.mT, x.mT).mT.contiguous()
    return original(x, other)


FOLDS: tuple[Fold, ...] = (Fold("linear", _fold_linear), Fold("matmul", _fold_matmul))

# ----------------------------------------------------------------------------- coverage classes

# Ops whose result bits never depend on other rows or on the reduction order: views,
# copies, indexing, comparisons, integer/bool ops, and order-free reductions (max/argmax).
EXACT_OPS: frozenset[str] = frozenset(
    {
        "_local_scalar_dense", "_to_copy", "_unsafe_view", "alias", "all", "any", "_is_all_true", "_is_any_true",
        "arange", "argmax", "argmin",
        "as_strided", "bitwise_and", "bitwise_not", "bitwise_or", "bitwise_xor", "cat", "clone", "copy_",
        "detach", "embedding", "empty", "empty_like", "empty_strided", "eq", "expand", "eye", "fill_", "full",
        "full_like", "ge", "gt", "index", "index_select", "index_put_", "isin", "isinf", "isnan", "le", "lift_fresh",
        "logical_and", "logical_not", "logical_or", "lt", "masked_fill", "masked_fill_", "max", "amax", "min",
        "amin", "aminmax", "maximum", "minimum", "ne", "new_empty", "new_full", "new_ones", "new_zeros", "ones",
        "ones_like",
        "permute",
        "relu", "repeat", "scalar_tensor", "select", "slice", "split", "squeeze", "stack", "t", "topk", "sort",
        "transpose", "tril", "triu", "unbind", "unsqueeze", "view", "where", "zeros", "zeros_like", "contiguous",
        "gather", "scatter", "abs", "neg", "sign", "clamp", "clamp_min", "clamp_max", "round", "floor", "ceil",
        "_assert_tensor_metadata", "split_with_sizes", "narrow", "flip", "roll", "nonzero", "unique_dim",
        "_unique2", "resize_", "set_", "sym_size", "sym_stride", "view_as_complex", "view_as_real", "complex",
        # padding: copies and a fill (Mamba2's chunking, F.pad of every mode)
        "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
        "replication_pad2d", "replication_pad3d",
        # a clamp, or one correctly rounded product (hidden_act relu6, leaky_relu, prelu)
        "hardtanh", "leaky_relu", "_prelu_kernel",
        # vision towers: patches as views or copies (Idefics3's Tensor.unfold, Mistral 3's
        # patch merger's F.unfold), comparisons placing patches (Idefics3's bucketize), and
        # Qwen-VL's per-image sequence bounds (repeat_interleave, unique_consecutive)
        "unfold", "im2col", "bucketize", "searchsorted", "repeat_interleave", "unique_consecutive",
        # a multimodal model's image features copied into the text's image-token positions
        "masked_scatter", "masked_scatter_", "masked_select",
    }
)
# IEEE-754 correctly rounded elementwise arithmetic: position independent and, for one
# dtype, the same on every CPU (but see KNOWN_POSITION_DEPENDENT for add/sub with alpha).
# hardswish and hardsigmoid: x + 3, a clamp, a product and a division by 6, in that order
# on torch's CPU vector and scalar paths (no value differed between the two over 4M inputs
# of each float dtype); another device's kernel may compute them otherwise (torch's CUDA
# kernels multiply by a rounded 1/6), so they are in ELEMENTWISE_LIBM too.
ELEMENTWISE_EXACT: frozenset[str] = frozenset(
    {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub", "sqrt", "reciprocal", "square", "hardswish",
     "hardsigmoid"}
)
# Elementwise functions from a math library: not correctly rounded, so their bits differ
# between CPU instruction sets and devices (the portable guarantee does not cover them).
ELEMENTWISE_LIBM: frozenset[str] = frozenset(
    {
        "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sin", "cos", "tan", "tanh", "sinh", "cosh",
        "atan", "asin", "acos", "atan2", "sigmoid", "silu", "gelu", "erf", "erfc", "rsqrt", "pow", "softplus", "logaddexp",
        "logaddexp2",
        "mish", "elu", "logit", "hardswish", "hardsigmoid", "atanh", "digamma",
    }
)
# Exact when every tensor operand is an integer (or bool) tensor, as MoE layers call them on
# token counts and indices; on floating-point operands they round (or, for bincount and
# histc, add float weights or bin floats), so a float call stays uncovered.
INTEGER_EXACT_OPS: frozenset[str] = frozenset(
    {"floor_divide", "remainder", "fmod", "bincount", "histc", "cumsum", "cumprod", "prod", "sum", "index_add",
     "scatter_add"}
)
# Exact on real operands, but with a complex operand a product (or quotient) is several
# roundings whose order torch's CPU vector path and scalar tail do not share: measured
# with torch 2.13 on an AVX-512 CPU, 65-87% of rows of complex64/complex128 `mul` and
# `square` and 30% of complex64 `div` changed bits between alone and in a batch. The mode
# routes mul and div (``_COMPLEX_PRODUCTS``); a traced call of another with a complex
# operand is uncovered (on the CPU).
COMPLEX_POSITION_DEPENDENT: frozenset[str] = frozenset({"mul", "mul_", "div", "div_", "square"})
# Not routed, but torch computes them from ops the mode routes (their kernels are
# composites that call the dispatcher), so under the mode they are the routed ops' results.
ROUTED_BY_DECOMPOSITION: dict[str, str] = {
    "binary_cross_entropy_with_logits": ("F.binary_cross_entropy_with_logits (a reward model's or a multi-label "
                                          "head's loss): torch computes it from log_sigmoid, exact products and "
                                          "its mean or sum, which are routed"),
    "_euclidean_dist": ("torch.cdist's matmul path (p = 2, more than 25 rows or columns: an audio codec's "
                        "codebook search): torch computes it from pow, sum and a batched matmul, which are routed"),
}
# Measured on an AVX-512 CPU with torch 2.13: these change bits with a value's position in
# the tensor (vector body vs scalar tail) and are not routed by the mode.
KNOWN_POSITION_DEPENDENT: dict[str, str] = {
    **{op: "with alpha != 1 (the vector path fuses the multiply and the add; measured in bfloat16/float16, "
           "and in float32 on some batch shapes)"
       for op in ("add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor", "rsub.Tensor", "rsub.Scalar")},
}
