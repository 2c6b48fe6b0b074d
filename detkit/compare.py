"""Bitwise and ULP comparison of floating-point arrays and token streams.

Public API (numpy arrays and torch tensors, any device; float64, float32, float16,
bfloat16 and torch's float8 formats; a numpy ``uint16`` array holding bfloat16 bits can
be compared as ``torch.from_numpy(u).view(torch.bfloat16)``):

``ulp_distance(a, b) -> np.ndarray[int64]``
    Elementwise distance in units in the last place. Each value's bit pattern is mapped
    to an ordered integer (sign-magnitude to two's complement), so ``-0`` and ``+0`` are
    0 apart, neighbouring floats 1 apart, the largest finite value and ``inf`` 1 apart,
    and the distance is correct across zero. Computed in (u)int64: no int32 overflow
    (float32 ``3e38`` vs ``-3e38`` is 4,274,217,932). A float64 distance above
    ``2**63 - 1`` (only possible between values of opposite sign, e.g. ``-inf`` vs
    ``inf``) saturates at ``ULP_SATURATED == 2**63 - 1`` instead of wrapping.
    NaN vs NaN (any payloads) is 0; NaN vs a number is ``NAN_MISMATCH == -1``, a
    sentinel that can never be mistaken for a (large) distance. Checks of the form
    ``(d <= k).all()`` must therefore also require ``(d >= 0).all()``, or use
    ``diff(a, b)``, which counts NaN mismatches separately.

``diff(a, b, *, max_mismatches=8) -> Diff``
    Everything about how ``a`` differs from ``b`` (``b`` is the reference for the
    relative error). Shapes and dtypes must match exactly (``InputError`` otherwise).
    ``Diff.ok`` is ``bitwise_equal``; ``str(diff)`` is a short summary with a table of
    the first mismatches; ``diff.to_dict()`` is JSON-ready (no NaN/inf floats).

``first_divergence(tokens_a, tokens_b) -> int | None``
    Index of the first differing token, ``min(len_a, len_b)`` when one stream is a
    strict prefix of the other, ``None`` when both are identical.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from detkit.errors import InputError

__all__ = [
    "FORMATS",
    "NAN_MISMATCH",
    "ULP_SATURATED",
    "Diff",
    "FloatFormat",
    "Mismatch",
    "diff",
    "first_divergence",
    "ulp_distance",
]

NAN_MISMATCH = -1
ULP_SATURATED = np.iinfo(np.int64).max


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format, described by its bit layout.

    ``kind``: ``"ieee"`` (inf and NaNs by IEEE 754 rules), ``"fn"`` (no inf; NaN is
    the all-ones magnitude, as float8_e4m3fn), ``"fnuz"`` (no inf, no -0; the single
    NaN is the -0 pattern), ``"e8m0"`` (unsigned exponent-only; NaN is all ones).
    """

    name: str
    bits: int
    exp_bits: int
    man_bits: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in {"ieee", "fn", "fnuz", "e8m0"}:
            raise ValueError(f"unknown float format kind {self.kind!r}")
        signed = 0 if self.kind == "e8m0" else 1
        if signed + self.exp_bits + self.man_bits != self.bits:
            raise ValueError(f"{self.name}: sign + exponent + mantissa bits != {self.bits}")

    @property
    def signed(self) -> bool:
        return self.kind != "e8m0"

    @property
    def precision(self) -> int:
        """Significand bits including the implicit leading one."""
        return self.man_bits + 1

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - (0 if self.kind == "fnuz" else 1)

    def nan_mask(self, bits: np.ndarray) -> np.ndarray:
        """True where the (unsigned, widened) bit patterns are NaN in this format."""
        if self.kind == "e8m0":
            return bits == (1 << self.bits) - 1
        if self.kind == "fnuz":
            return bits == 1 << (self.bits - 1)
        mag = bits & ((1 << (self.bits - 1)) - 1)
        if self.kind == "fn":
            return mag == (1 << (self.bits - 1)) - 1
        inf_bits = ((1 << self.exp_bits) - 1) << self.man_bits
        return mag > inf_bits


FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("float64", 64, 11, 52, "ieee"),
        FloatFormat("float32", 32, 8, 23, "ieee"),
        FloatFormat("float16", 16, 5, 10, "ieee"),
        FloatFormat("bfloat16", 16, 8, 7, "ieee"),
        FloatFormat("float8_e5m2", 8, 5, 2, "ieee"),
        FloatFormat("float8_e4m3fn", 8, 4, 3, "fn"),
        FloatFormat("float8_e5m2fnuz", 8, 5, 2, "fnuz"),
        FloatFormat("float8_e4m3fnuz", 8, 4, 3, "fnuz"),
        FloatFormat("float8_e8m0fnu", 8, 8, 0, "e8m0"),
    )
}

_UINT = {64: np.uint64, 32: np.uint32, 16: np.uint16, 8: np.uint8}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


@dataclass
class _Bits:
    """An array's raw bit patterns (uint64, same shape) and its format."""

    bits: np.ndarray
    fmt: FloatFormat
    source: Any  # the original array/tensor, for exact value conversion


def _bits(x: Any, what: str) -> _Bits:
    if _is_torch(x):
        import torch

        if not isinstance(x, torch.Tensor):
            raise InputError(f"{what}: expected a tensor or array, got {type(x).__name__}")
        name = str(x.dtype).removeprefix("torch.")
        fmt = FORMATS.get(name)
        if fmt is None:
            raise InputError(
                f"{what} has dtype {x.dtype}; detkit.compare handles floating tensors "
                f"({', '.join(FORMATS)}). Convert integer data with first_divergence or cast."
            )
        t = x.detach().to("cpu").contiguous()
        int_dtype = {64: torch.int64, 32: torch.int32, 16: torch.int16, 8: torch.uint8}[fmt.bits]
        raw = t.view(int_dtype).numpy().view(_UINT[fmt.bits])
        return _Bits(raw.astype(np.uint64), fmt, t)
    arr = np.asarray(x)
    name = arr.dtype.name  # ml_dtypes' bfloat16/float8 arrays report these names too
    fmt = FORMATS.get(name)
    if fmt is None or arr.dtype.itemsize * 8 != fmt.bits:
        raise InputError(
            f"{what} has dtype {arr.dtype}; detkit.compare handles floating arrays "
            f"({', '.join(FORMATS)}). For bfloat16 bits held in uint16 use "
            "torch.from_numpy(u).view(torch.bfloat16)."
        )
    if not arr.dtype.isnative:  # byte-swapped (e.g. ">f4" on x86): the uint view must see native bytes
        arr = arr.astype(arr.dtype.newbyteorder("="))
    raw = np.ascontiguousarray(arr).view(_UINT[fmt.bits]).reshape(arr.shape)  # keeps 0-d
    return _Bits(raw.astype(np.uint64), fmt, arr)


def flushes_subnormals() -> bool:
    """Whether torch.set_flush_denormal(True) (FTZ/DAZ) is on for the calling thread.
    torch has no getter for it: a subnormal that does not survive a multiplication by one
    says it is on."""
    import torch

    return torch.tensor(2.0**-1074, dtype=torch.float64).mul(1.0).item() == 0.0


@contextlib.contextmanager
def _subnormals_kept() -> Any:
    """Turn off torch.set_flush_denormal(True) while values are widened or rounded.

    That mode sets FTZ/DAZ on the calling thread, so conversions to and from float64
    (torch's and numpy's alike) would turn subnormal values into zeros."""
    import torch

    flushing = flushes_subnormals()
    if flushing:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(True)


def _values64(b: _Bits) -> np.ndarray:
    """The values widened exactly to float64 (every supported format embeds in it)."""
    if _is_torch(b.source):
        import torch

        return b.source.to(torch.float64).numpy()
    return np.asarray(b.source).astype(np.float64)


def _pair(a: Any, b: Any) -> tuple[_Bits, _Bits]:
    ba, bb = _bits(a, "a"), _bits(b, "b")
    if ba.fmt != bb.fmt:
        raise InputError(
            f"dtype mismatch: a is {ba.fmt.name}, b is {bb.fmt.name}; ULP distances are only "
            "defined within one format. Cast one side explicitly if that is what you mean."
        )
    return ba, bb


def _ulp_from_bits(xa: np.ndarray, xb: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """ULP distance of two uint64 bit arrays (broadcastable) in format ``fmt``."""
    nan_a, nan_b = fmt.nan_mask(xa), fmt.nan_mask(xb)
    if fmt.signed:
        sign_bit = np.uint64(1 << (fmt.bits - 1))
        mag_mask = np.uint64((1 << (fmt.bits - 1)) - 1)
        neg_a, neg_b = (xa & sign_bit) != 0, (xb & sign_bit) != 0
        mag_a, mag_b = xa & mag_mask, xb & mag_mask
        # Same sign: |mag_a - mag_b|; opposite signs: mag_a + mag_b (the path crosses 0).
        # In uint64 both stay exact: magnitudes are < 2**63, so the sum is < 2**64.
        same = np.maximum(mag_a, mag_b) - np.minimum(mag_a, mag_b)
        dist = np.where(neg_a == neg_b, same, mag_a + mag_b)
    else:
        dist = np.maximum(xa, xb) - np.minimum(xa, xb)
    out = np.where(dist > np.uint64(ULP_SATURATED), np.uint64(ULP_SATURATED), dist).astype(np.int64)
    out = np.where(nan_a & nan_b, np.int64(0), out)
    return np.where(nan_a ^ nan_b, np.int64(NAN_MISMATCH), out)


def ulp_distance(a: Any, b: Any) -> np.ndarray:
    """Elementwise ULP distance of ``a`` and ``b`` as an int64 numpy array.

    Shapes broadcast as in numpy; dtypes must match. NaN vs NaN is 0, NaN vs a number is
    ``NAN_MISMATCH`` (-1); float64 distances above 2**63-1 saturate at ``ULP_SATURATED``.
    """
    ba, bb = _pair(a, b)
    try:
        np.broadcast_shapes(ba.bits.shape, bb.bits.shape)
    except ValueError:
        raise InputError(
            f"shapes {ba.bits.shape} and {bb.bits.shape} do not broadcast; compare arrays of "
            "the same shape"
        ) from None
    return np.asarray(_ulp_from_bits(ba.bits, bb.bits, ba.fmt), dtype=np.int64)


@dataclass(frozen=True)
class Mismatch:
    """One element whose bits differ."""

    flat_index: int
    index: tuple[int, ...]
    a: float
    b: float
    a_bits: str
    b_bits: str
    ulp: int  # NAN_MISMATCH (-1) when exactly one side is NaN

    def to_dict(self) -> dict[str, Any]:
        return {
            "flat_index": self.flat_index,
            "index": list(self.index),
            "a": _json_float(self.a),
            "b": _json_float(self.b),
            "a_bits": self.a_bits,
            "b_bits": self.b_bits,
            "ulp": self.ulp,
        }


def _json_float(x: float) -> float | str:
    """Finite floats stay floats; inf/nan become strings (reports use strict JSON)."""
    return x if math.isfinite(x) else repr(x)


def _significant_digits(fmt: FloatFormat) -> int:
    """Decimal digits that identify every value of ``fmt`` (9 for float32, 17 for float64)."""
    return math.ceil(fmt.precision * math.log10(2)) + 1


def _bucket_label(k: int) -> str:
    """Label of log2 bucket ``k`` (ULP values of bit length k): "0", "1", "2-3", ..., "2^11..2^12-1"."""
    if k <= 1:
        return str(k)
    if k <= 11:
        return f"{1 << (k - 1)}-{(1 << k) - 1}"
    return f"2^{k - 1}..2^{k}-1"


@dataclass
class Diff:
    """How ``a`` differs from ``b``; build it with :func:`diff`.

    Counts: ``num_bit_mismatches`` (raw bits differ), of which ``signed_zero_mismatches``
    (+0 vs -0) and NaN-vs-NaN payload differences (``nan_payload_mismatches``) are not
    value mismatches; ``num_value_mismatches`` counts values that differ with +-0 equal
    and NaN == NaN, and includes ``nan_mismatches`` (NaN vs a number).
    ``max_ulp``/``ulp_histogram`` cover the pairs that are not NaN vs number.
    ``max_rel`` is ``|a - b| / |b|`` (``b`` is the reference; ``inf`` where b == 0 != a and
    where b is infinite and a differs).
    Indices are multi-indices into the common shape, None when there is nothing to point at.
    """

    shape: tuple[int, ...]
    dtype: str
    numel: int
    bitwise_equal: bool
    num_bit_mismatches: int
    num_value_mismatches: int
    signed_zero_mismatches: int
    nan_mismatches: int
    nan_payload_mismatches: int
    max_ulp: int
    max_ulp_index: tuple[int, ...] | None
    ulp_histogram: dict[str, int]
    max_abs: float
    max_abs_index: tuple[int, ...] | None
    max_rel: float
    max_rel_index: tuple[int, ...] | None
    first_mismatches: list[Mismatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_bit_mismatches < 0 or self.num_bit_mismatches > self.numel:
            raise ValueError("num_bit_mismatches must be between 0 and numel")
        if self.bitwise_equal != (self.num_bit_mismatches == 0):
            raise ValueError("bitwise_equal must be True exactly when num_bit_mismatches == 0")

    @property
    def ok(self) -> bool:
        """True when the two inputs are bitwise identical (detkit's criterion)."""
        return self.bitwise_equal

    @property
    def values_equal(self) -> bool:
        """True when all values agree, treating +-0 as equal and any NaN as equal to NaN."""
        return self.num_value_mismatches == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            "bitwise_equal": self.bitwise_equal,
            "values_equal": self.values_equal,
            "num_bit_mismatches": self.num_bit_mismatches,
            "num_value_mismatches": self.num_value_mismatches,
            "signed_zero_mismatches": self.signed_zero_mismatches,
            "nan_mismatches": self.nan_mismatches,
            "nan_payload_mismatches": self.nan_payload_mismatches,
            "max_ulp": self.max_ulp,
            "max_ulp_index": None if self.max_ulp_index is None else list(self.max_ulp_index),
            "ulp_histogram": dict(self.ulp_histogram),
            "max_abs": _json_float(self.max_abs),
            "max_abs_index": None if self.max_abs_index is None else list(self.max_abs_index),
            "max_rel": _json_float(self.max_rel),
            "max_rel_index": None if self.max_rel_index is None else list(self.max_rel_index),
            "first_mismatches": [m.to_dict() for m in self.first_mismatches],
        }

    def __str__(self) -> str:
        head = f"{self.dtype}{list(self.shape)}, {self.numel} elements: "
        if self.bitwise_equal:
            return head + "bitwise equal"
        lines = [
            head
            # The four parts partition the bit mismatches: num_value_mismatches includes the
            # NaN-vs-number pairs, so the numbers that differ are the rest of it.
            + f"{self.num_bit_mismatches} bit mismatches "
            + f"({self.num_value_mismatches - self.nan_mismatches} numbers differ, "
            + f"{self.nan_mismatches} NaN vs number, {self.signed_zero_mismatches} signed zeros, "
            + f"{self.nan_payload_mismatches} NaN payloads)",
            f"  max ULP {self.max_ulp} at {self.max_ulp_index}; "
            f"max abs {self.max_abs:.3g} at {self.max_abs_index}; "
            f"max rel {self.max_rel:.3g} at {self.max_rel_index}",
        ]
        hist = {k: v for k, v in self.ulp_histogram.items() if k != "0"}
        if hist:
            lines.append("  ULP histogram: " + ", ".join(f"{k}: {v}" for k, v in hist.items()))
        if self.first_mismatches:
            digits = _significant_digits(FORMATS[self.dtype])
            rows = [("index", "a", "b", "ulp", "a bits", "b bits")] + [
                (
                    str(m.index),
                    f"{m.a:.{digits}g}",
                    f"{m.b:.{digits}g}",
                    "NaN-vs-num" if m.ulp == NAN_MISMATCH else str(m.ulp),
                    m.a_bits,
                    m.b_bits,
                )
                for m in self.first_mismatches
            ]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
            shown = len(self.first_mismatches)
            if shown < self.num_bit_mismatches:
                lines.append(f"  ... {self.num_bit_mismatches - shown} more")
        return "\n".join(lines)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


@_subnormals_kept()
def diff(a: Any, b: Any, *, max_mismatches: int = 8) -> Diff:
    """Compare ``a`` with the reference ``b`` bitwise, in ULPs, and in absolute/relative error."""
    if max_mismatches < 0:
        raise InputError(f"max_mismatches must be >= 0, got {max_mismatches}")
    ba, bb = _pair(a, b)
    if ba.bits.shape != bb.bits.shape:
        raise InputError(
            f"shape mismatch: a is {tuple(ba.bits.shape)}, b is {tuple(bb.bits.shape)}; "
            "diff compares elementwise and does not broadcast."
        )
    fmt, shape = ba.fmt, tuple(int(s) for s in ba.bits.shape)
    xa, xb = ba.bits.reshape(-1), bb.bits.reshape(-1)
    numel = int(xa.size)
    ulp = _ulp_from_bits(xa, xb, fmt)
    nan_a, nan_b = fmt.nan_mask(xa), fmt.nan_mask(xb)
    bit_mis = xa != xb
    both_nan = nan_a & nan_b
    nan_vs_num = nan_a ^ nan_b
    value_mis = bit_mis & ~both_nan & (ulp != 0)  # ulp == 0 with differing bits: +0 vs -0
    signed_zero = bit_mis & ~both_nan & (ulp == 0)

    comparable = ulp[~nan_vs_num]
    max_ulp = int(comparable.max()) if comparable.size else 0
    max_ulp_index = None
    if max_ulp > 0:
        max_ulp_index = _unravel(int(np.argmax(np.where(nan_vs_num, -1, ulp))), shape)
    # Bucket k holds ULP values of bit_length k: 0, 1, 2-3, 4-7, ...
    pows = np.array([1 << k for k in range(63)], dtype=np.int64)
    buckets = np.searchsorted(pows, comparable, side="right")
    counts = np.bincount(buckets, minlength=1)
    histogram = {_bucket_label(k): int(c) for k, c in enumerate(counts) if c}

    va, vb = _values64(ba).reshape(-1), _values64(bb).reshape(-1)
    finite_pair = ~(np.isnan(va) | np.isnan(vb))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # Equal values (incl. equal infinities) have zero error; inf - inf would be NaN.
        abs_err = np.where(va == vb, 0.0, np.abs(va - vb))
        # A differing value against an infinite reference is infinitely wrong; inf / inf
        # would be NaN, which argmax picks first and which hides every finite error.
        rel_err = np.where(abs_err == 0, 0.0, np.where(np.isinf(vb), np.inf, abs_err / np.abs(vb)))
    abs_err = np.where(finite_pair, abs_err, -1.0)
    rel_err = np.where(finite_pair, rel_err, -1.0)
    max_abs, max_abs_index, max_rel, max_rel_index = 0.0, None, 0.0, None
    if numel and abs_err.max() > 0:
        i = int(np.argmax(abs_err))
        max_abs, max_abs_index = float(abs_err[i]), _unravel(i, shape)
        j = int(np.argmax(rel_err))
        max_rel, max_rel_index = float(rel_err[j]), _unravel(j, shape)

    first = []
    width = (fmt.bits + 3) // 4
    for i in np.flatnonzero(bit_mis)[:max_mismatches]:
        i = int(i)
        first.append(
            Mismatch(
                flat_index=i,
                index=_unravel(i, shape),
                a=float(va[i]),
                b=float(vb[i]),
                a_bits=f"0x{int(xa[i]):0{width}x}",
                b_bits=f"0x{int(xb[i]):0{width}x}",
                ulp=int(ulp[i]),
            )
        )

    n_bit = int(bit_mis.sum())
    return Diff(
        shape=shape,
        dtype=fmt.name,
        numel=numel,
        bitwise_equal=n_bit == 0,
        num_bit_mismatches=n_bit,
        num_value_mismatches=int(value_mis.sum()),
        signed_zero_mismatches=int(signed_zero.sum()),
        nan_mismatches=int(nan_vs_num.sum()),
        nan_payload_mismatches=int((bit_mis & both_nan).sum()),
        max_ulp=max_ulp,
        max_ulp_index=max_ulp_index,
        ulp_histogram=histogram,
        max_abs=max_abs,
        max_abs_index=max_abs_index,
        max_rel=max_rel,
        max_rel_index=max_rel_index,
        first_mismatches=first,
    )


def _as_token_list(tokens: Any, what: str) -> list[int]:
    if _is_torch(tokens):
        tokens = tokens.detach().to("cpu").numpy()
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise InputError(f"{what} must be a 1-D sequence of token ids, got shape {tokens.shape}")
        if tokens.dtype.kind not in "iu":
            raise InputError(f"{what} must hold integer token ids, got dtype {tokens.dtype}")
        return [int(t) for t in tokens]
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise InputError(
            f"{what} must be a sequence of integer token ids (list, 1-D array or tensor), "
            f"got {type(tokens).__name__}; compare token ids, never decoded text."
        )
    out = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise InputError(f"{what} must hold integer token ids, found {t!r}")
        out.append(int(t))
    return out


def first_divergence(tokens_a: Any, tokens_b: Any) -> int | None:
    """Index of the first position where two token streams differ, or None if identical.

    When one stream is a strict prefix of the other, the divergence is at the shorter
    length (the first position where only one stream has a token).
    """
    ta, tb = _as_token_list(tokens_a, "tokens_a"), _as_token_list(tokens_b, "tokens_b")
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x != y:
            return i
    return None if len(ta) == len(tb) else min(len(ta), len(tb))
