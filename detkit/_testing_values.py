"""Value plumbing for ``detkit.testing``: flatten outputs, slice batches, compare bits.

Everything here works on torch tensors and numpy arrays alike and never imports torch
unless a tensor is actually handed in (``detkit.testing`` is loaded by the pytest plugin).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from detkit.errors import InputError

# A flattened output: (path, leaf) pairs, path "" for a bare tensor, "[0]" / "['logits']" inside.
Leaves = list[tuple[str, Any]]

_SCALARS = (bool, int, float, complex, np.generic)


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "dtype") and hasattr(x, "shape")


def is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or is_torch(x)


def dtype_name(x: Any) -> str:
    if is_torch(x):
        return str(x.dtype).removeprefix("torch.")
    return np.asarray(x).dtype.name


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def is_float(x: Any) -> bool:
    if is_torch(x):
        return bool(x.dtype.is_floating_point)
    return np.asarray(x).dtype.kind == "f"


def flatten(obj: Any, what: str = "output") -> Leaves:
    """Flatten a tensor/array, a scalar, or a (nested) tuple/list/dict of them.

    ``None`` leaves are skipped (Hugging Face outputs carry many). Anything else is an
    ``InputError``: silently ignoring part of an output would hide a difference.
    """
    leaves: Leaves = []

    def walk(x: Any, path: str) -> None:
        if x is None:
            return
        if is_torch(x) and str(x.layout) != "torch.strided":
            raise InputError(f"{what}{path or ''} is a {x.layout} tensor; compare x.to_dense()")
        if is_torch(x) and x.device.type == "meta":
            raise InputError(f"{what}{path or ''} is a meta tensor: it holds no values to compare")
        if is_array(x):
            _comparable_width(x, f"{what}{path or ''}")
            leaves.append((path, _real_view(x)))
        elif isinstance(x, _SCALARS):
            arr = np.asarray(x)
            if arr.dtype == object:
                raise InputError(f"{what}{path or ''} = {x!r} does not fit a 64-bit number; compare it with ==")
            _comparable_width(arr, f"{what}{path or ''}")
            leaves.append((path, _real_view(arr)))
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        else:
            cache = (" (a Hugging Face KV cache: return out.logits, or call the model with use_cache=False)"
                     if "Cache" in type(x).__name__ else "")
            raise InputError(
                f"{what}{path or ''} is a {type(x).__name__}{cache}; detkit.testing compares torch tensors, "
                "numpy arrays, Python numbers and tuples/lists/dicts of them. Return the tensors "
                "you want compared."
            )

    walk(obj, "")
    return leaves


def _comparable_width(x: Any, where: str) -> None:
    # np.longdouble: 80-bit values padded to 12 or 16 bytes, no bit pattern to compare
    if not is_torch(x) and x.dtype.kind in "fc" and x.real.dtype.itemsize not in (2, 4, 8):
        raise InputError(f"{where} is {x.dtype} (numpy's long double), which detkit cannot compare bit for bit; "
                         "convert it with .astype(np.float64) if that keeps what matters")


def _real_view(x: Any) -> Any:
    """Complex values as (..., 2) real pairs, so that everything downstream sees real floats."""
    if is_torch(x):
        import torch

        return torch.view_as_real(x.resolve_conj()) if x.dtype.is_complex else x
    if x.dtype.kind == "c":
        arr = np.ascontiguousarray(x)
        return arr.view(arr.real.dtype).reshape(arr.shape + (2,))
    return x


def host_bits(x: Any) -> np.ndarray:
    """The raw bit patterns of ``x`` as a contiguous numpy array (same shape).

    Floats are viewed as unsigned integers of the same width, so NaN payloads and the sign
    of zero count, and equality is exactly bitwise equality.
    """
    if is_torch(x):
        import torch

        t = x.detach().to("cpu").contiguous()
        if t.dtype.is_floating_point:
            width = t.element_size()
            t = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[width])
            return t.numpy().view(f"u{width}")
        return t.numpy()
    arr = np.ascontiguousarray(np.asarray(x))
    if not arr.dtype.isnative:  # byte-swapped (">f4" on x86): the bits are those of the values, in native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f":
        return arr.view(f"u{arr.dtype.itemsize}")
    return arr


def same_bits(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bits."""
    if dtype_name(a) != dtype_name(b) or shape_of(a) != shape_of(b):
        return False
    return bool(np.array_equal(host_bits(a), host_bits(b)))


def snapshot(x: Any) -> Any:
    """A private copy of a leaf, so that later in-place writes by the caller cannot change it."""
    if is_torch(x):
        return x.detach().clone()
    return np.array(x, copy=True)


def digest(x: Any) -> str:
    """sha256 of dtype, shape and bits: two machines can compare results through reports."""
    h = hashlib.sha256()
    h.update(f"{dtype_name(x)}{list(shape_of(x))}".encode())
    h.update(host_bits(x).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- batches


def check_dim(x: Any, dim: int, what: str) -> int:
    """Normalise ``dim`` for ``x`` (negative allowed), raising a clear error when it is out of range."""
    nd = len(shape_of(x))
    if nd == 0:
        raise InputError(f"{what} is a 0-d value; it needs a batch dimension to split rows along")
    if not -nd <= dim < nd:
        raise InputError(f"dim={dim} is out of range for {what} of shape {shape_of(x)}")
    return dim % nd


def take_rows(x: Any, dim: int, index: Sequence[int]) -> Any:
    """Rows ``index`` of ``x`` along ``dim`` as a fresh contiguous tensor/array."""
    if is_torch(x):
        import torch

        idx = torch.tensor(list(index), dtype=torch.long, device=x.device)
        return x.index_select(dim, idx).contiguous()
    return np.ascontiguousarray(np.take(np.asarray(x), list(index), axis=dim))


def concat_rows(a: Any, b: Any, dim: int) -> Any:
    if is_torch(a) != is_torch(b):
        raise InputError("x and other must both be torch tensors or both numpy arrays")
    if is_torch(a):
        import torch

        return torch.cat([a, b], dim=dim)
    return np.concatenate([np.asarray(a), np.asarray(b)], axis=dim)


def row_of(x: Any, dim: int, i: int) -> Any:
    """Row ``i`` of ``x`` along ``dim``, keeping the dimension (size 1)."""
    if is_torch(x):
        return x.narrow(dim, i, 1)
    return np.asarray(x)[(slice(None),) * dim + (slice(i, i + 1),)]


# ---------------------------------------------------------------------------- messages


def share(k: int, n: int, decimals: int = 1) -> str:
    """``k / n`` as a percentage that never rounds a nonzero share to 0% nor a partial one
    to 100% ("<0.1%", ">99.9%"): a failure must not read as "0.0% differ"."""
    if n <= 0 or k <= 0:
        return f"{0:.{decimals}%}"
    if k >= n:
        return f"{1:.{decimals}%}"
    step = 10.0 ** -(decimals + 2)  # the smallest share the format shows
    if k / n < step:
        return f"<{step:.{decimals}%}"
    if 1 - k / n < step:
        return f">{1 - step:.{decimals}%}"
    return f"{k / n:.{decimals}%}"


def _fmt_value(v: float, dtype: str) -> str:
    if math.isnan(v) or math.isinf(v):
        return repr(v)
    digits = {"float64": 17, "float32": 9, "float16": 5, "bfloat16": 4}.get(dtype, 9)
    return f"{v:.{digits}g}"


def describe(
    actual: Any,
    expected: Any,
    labels: tuple[str, str],
    *,
    max_ulp: int | None = None,
    max_rows: int = 5,
) -> tuple[str, int | None, dict[str, Any]]:
    """Explain how ``actual`` differs from ``expected``.

    Returns (text, max ULP or None when ULPs do not apply, a JSON-ready dict). The text
    gives the count and share of differing elements, the max ULP and a small table of the
    first mismatches; ``labels`` names the (expected, actual) columns. With ``max_ulp``
    the table lists elements further apart than that (or NaN vs number) instead of every
    bitwise difference.
    """
    da, de = dtype_name(actual), dtype_name(expected)
    sa, se = shape_of(actual), shape_of(expected)
    if da != de or sa != se:
        text = f"{labels[1]} is {da}{list(sa)} but {labels[0]} is {de}{list(se)}"
        return text, None, {"dtype": [de, da], "shape": [list(se), list(sa)]}
    ba, be = host_bits(actual).reshape(-1), host_bits(expected).reshape(-1)
    numel = int(ba.size)
    va, ve = _values(actual), _values(expected)
    if is_float(actual):
        from detkit.compare import diff, ulp_distance

        if not sa:  # compare works elementwise; 1-element views avoid numpy's 0-d scalar paths
            actual, expected = actual.reshape(1), expected.reshape(1)
        d = diff(actual, expected, max_mismatches=max_rows)  # the report keeps them too
        ulp = ulp_distance(actual, expected).reshape(-1)
        if max_ulp is None:
            sel = np.flatnonzero(ba != be)
            head = f"{d.num_bit_mismatches:,} of {numel:,} elements differ bitwise ({share(d.num_bit_mismatches, numel)})"
        else:
            sel = np.flatnonzero((ulp > max_ulp) | (ulp < 0))
            head = (
                f"{sel.size:,} of {numel:,} elements are more than {max_ulp} ULP apart "
                f"({share(sel.size, numel)}; {d.num_bit_mismatches:,} differ bitwise)"
            )
        lines = [
            f"{head}; max ULP {d.max_ulp}, max abs diff {d.max_abs:.3g}, max rel diff {d.max_rel:.3g}"
            + (f"; {d.nan_mismatches} NaN vs number" if d.nan_mismatches else "")
        ]
        width = ba.dtype.itemsize * 2
        rows = [("index", labels[0], labels[1], "ULP")]
        for i in sel[:max_rows]:
            i = int(i)
            rows.append(
                (
                    str(_index(i, sa)),
                    f"{_fmt_value(float(ve[i]), de)} (0x{int(be[i]):0{width}x})",
                    f"{_fmt_value(float(va[i]), da)} (0x{int(ba[i]):0{width}x})",
                    "NaN" if ulp[i] < 0 else str(int(ulp[i])),
                )
            )
        info = d.to_dict()
        info["num_over_max_ulp"] = int(sel.size) if max_ulp is not None else None
        worst: int | None = d.max_ulp
    else:
        # Integers and booleans: exact equality, no ULP scale.
        sel = np.flatnonzero(ba != be)
        lines = [f"{sel.size:,} of {numel:,} elements differ ({share(sel.size, numel)})"]
        rows = [("index", labels[0], labels[1])]
        for i in sel[:max_rows]:
            i = int(i)
            rows.append((str(_index(i, sa)), repr(ve[i].item()), repr(va[i].item())))
        info = {"shape": list(sa), "dtype": da, "numel": numel, "num_bit_mismatches": int(sel.size)}
        worst = None
    if sel.size:
        lines.extend(table(rows))
    if sel.size > max_rows:
        lines.append(f"  ... and {sel.size - max_rows:,} more")
    return "\n".join(lines), worst, info


def max_ulp(a: Any, b: Any) -> int | None:
    """Largest ULP distance between two float arrays of one dtype and shape, among numbers;
    None if undefined.

    None for integer data, for mismatched dtype/shape, and when every element is NaN vs a
    number. NaN vs a number has no distance: elsewhere it is left out (0 when nothing else
    differs), as in every "worst ULP" detkit reports.
    """
    if not (is_float(a) and dtype_name(a) == dtype_name(b) and shape_of(a) == shape_of(b)):
        return None
    from detkit.compare import ulp_distance

    if not shape_of(a):  # compare works elementwise; 1-element views avoid numpy's 0-d scalar paths
        a, b = a.reshape(1), b.reshape(1)
    worst = int(ulp_distance(a, b).max()) if int(np.prod(shape_of(a))) else 0
    return None if worst < 0 else worst


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(k) for k in np.unravel_index(flat, shape)) if shape else ()


def _values(x: Any) -> np.ndarray:
    """Flat values for display: floats widened exactly to float64, integers as they are.

    Widened with torch's flush-denormal mode off: under torch.set_flush_denormal(True) the
    conversion (torch's and numpy's alike) would show subnormal values as 0."""
    if is_torch(x) or np.asarray(x).dtype.kind == "f":
        from detkit.compare import _subnormals_kept

        with _subnormals_kept():
            return _widened(x)
    return _widened(x)


def _widened(x: Any) -> np.ndarray:
    if is_torch(x):
        import torch

        t = x.detach().to("cpu")
        if t.dtype.is_floating_point:
            t = t.to(torch.float64)
        return t.reshape(-1).numpy()
    arr = np.asarray(x).reshape(-1)
    return arr.astype(np.float64) if arr.dtype.kind == "f" else arr


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Right-aligned text table, two spaces indented (one line per row)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]


class RngStates:
    """The global RNG states (Python, numpy, torch CPU and initialised CUDA devices).

    Restoring them before each rerun gives every run the same random draws, so that only
    genuine nondeterminism (thread scheduling, atomics, unseeded entropy) shows up.
    torch is only touched when it is already imported.
    """

    def __init__(self) -> None:
        import random
        import sys

        self._python = random.getstate()
        self._numpy = np.random.get_state()
        self._torch: Any = None
        self._cuda: Any = None
        torch = sys.modules.get("torch")
        if torch is not None:
            self._torch = torch.random.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self._cuda = torch.cuda.get_rng_state_all()

    def restore(self) -> None:
        import random
        import sys

        random.setstate(self._python)
        np.random.set_state(self._numpy)
        torch = sys.modules.get("torch")
        if torch is not None and self._torch is not None:
            torch.random.set_rng_state(self._torch)
            if self._cuda is not None:
                torch.cuda.set_rng_state_all(self._cuda)
