"""The contract between ``detkit.kernels`` (the validating front end) and its backends.

A backend is a module that exposes the functions below with exactly these signatures.
The front end (``detkit/kernels/__init__.py``) validates user input (dtypes, shapes,
devices, empties), moves the reduced dimension last, makes row inputs contiguous,
folds ``is_causal`` and GQA-free broadcasting into the arguments described here, and
only then calls the backend. Backends therefore never see bad input and never choose
anything from the batch size.

Backends, selected by tensor device and the ``portable`` flag:

==========  ==========  =====================================
device      portable    module
==========  ==========  =====================================
cpu         False       ``detkit.kernels.cpu``
cpu         True        ``detkit.kernels.portable_cpu``
cuda        False       ``detkit.kernels.cuda``
cuda        True        ``detkit.kernels.cuda_portable`` (``cuda`` with ``portable=True`` bound)
==========  ==========  =====================================

Functions (tensors are torch tensors on the backend's device; ``dtype`` is one of
float32, bfloat16, float16, float64 unless a backend raises ``InputError`` for it;
reduced-precision inputs are widened exactly to float32, reduced in float32, and
rounded once into the input dtype at the end):

``matmul(a, b, bias) -> Tensor``
    ``a``: (M, K) or (B, M, K); ``b``: (K, N) or (B, K, N), *any strides* (a
    transposed weight view must not be copied by the caller); ``bias``: (N,) or None.
    Same dtype for all. Returns (M, N) or (B, M, N), contiguous, in that dtype.
    Bias is added after the full K reduction.
    A backend whose 3-D matmul reduces every output as one fma chain over
    ``k = 0 .. K-1`` starting from ``+0.0`` sets ``BATCHED_MATMUL_SEQUENTIAL_IN_K = True``:
    zeros at the start of a row of ``a`` then change no bit (``fma(0, b, +0) == +0`` for
    finite ``b``), and the torch mode skips its leading-zero canonicalisation of batched
    products (``detkit._aten_adapters``). A backend without it is assumed to block K.

``grouped_matmul(a, b, offs) -> Tensor``
    ``a``: (S, K); ``b``: (G, K, N), any strides; ``offs``: (G,) int32 on the same
    device, the ends of the groups' rows (torch._grouped_mm's MoE form). Row ``r`` of
    group ``g`` (``offs[g-1] <= r < offs[g]``, ``offs[-1] = 0``) is ``matmul(a[r:r+1],
    b[g], None)``, bit for bit; rows past ``offs[G-1]`` are zero. A backend that reads the
    offsets on the host raises ``InputError`` for offsets that are not nondecreasing
    within [0, S]; one that reads them on the device clamps them into it and must never
    read or write outside ``a`` and the result. S, N, K, G >= 1.

``softmax(x, log) -> Tensor``
    ``x``: (R, L) contiguous. Softmax (``log=False``) or log-softmax over the last dim.
    The normaliser is anchored at the row's first element whose ``exp(x - max)`` is
    nonzero (NaN counts as nonzero): entries with ``exp == 0`` in front of a row or after
    it (masked padding: ``-inf``, ``finfo.min``) leave the other entries' bits unchanged.
    The torch mode relies on this for eager attention over padding keys.

``rms_norm(x, weight, eps) -> Tensor``
    ``x``: (R, L) contiguous; ``weight``: (L,) or None; ``eps``: float.

``layer_norm(x, weight, bias, eps) -> Tensor``
    ``x``: (R, L) contiguous; ``weight``, ``bias``: (L,) or None.

``row_sum(x, mean) -> Tensor``
    ``x``: (R, L) contiguous. Sum (or mean) over the last dim, shape (R,). The sum is
    anchored at the first nonzero element (``-0.0`` is zero): zeros in front of a row or
    after it leave a sum's bits unchanged.

``row_cumsum(x) -> Tensor``
    ``x``: (R, L) contiguous. The running sum of each row, (R, L): ``y[r, j]`` is
    ``+0.0 + x[r, 0] + ... + x[r, j]`` added left to right, in float64 for float32 and
    float64 inputs and in float32 for bfloat16/float16 ones (torch's CPU kernel's
    accumulators), each output rounded once into the dtype, NaNs canonical
    (``docs/canonical-orders.md``, cumsum; both guarantees compute that order). Zeros in
    front of a row change nothing.

``solve_lower(a, b, unit) -> Tensor``
    ``a``: (T, n, n), ``b``: (T, n, k), both contiguous, n, k, T >= 1. Forward
    substitution per batch entry and column: ``x[i] = b[i]``, then
    ``x[i] = fma(-a[i, j], x[j], x[i])`` for j = 0 .. i-1 in order, then ``x[i] / a[i, i]``
    unless ``unit``; float32 throughout (float64 for float64), rounded once into the
    dtype at the end, NaNs canonical (``docs/canonical-orders.md``, solve_triangular; both
    guarantees compute that order). Reads only a's strict lower triangle (and the diagonal
    unless ``unit``). Returns (T, n, k) contiguous.

``pow(x, y) -> Tensor``
    ``x``: a float32, bfloat16 or float16 tensor; ``y``: a tensor of x's dtype and shape
    (on x's device), or a Python float (one binary64 exponent for every element). Returns
    a tensor like ``x`` (contiguous, x's dtype) holding ``Out(Pow(x, y))`` per element:
    ``Pow`` of ``docs/canonical-orders.md`` section 2.9 (binary64 arithmetic, C99's
    special cases, one rounding to fp32), a tensor ``y``'s elements widened exactly; then
    the output step (NaN canonical, one rounding into the dtype). Portable backends only
    (``portable_cpu``, ``cuda_portable``).

``attention(q, k, v, mask, scale) -> Tensor``
    ``q``: (B, H, Lq, D); ``k``: (B, Hk, Lk, D); ``v``: (B, Hk, Lk, Dv) with ``H % Hk == 0``
    (query head ``h`` uses key/value head ``h // (H // Hk)``; that is how GQA arrives);
    ``mask``: None, or a bool or float32 (float64 when q is float64) tensor
    *broadcastable view* of shape (B, H, Lq, Lk) (zero strides allowed): bool False =
    key not attended; float = added to the scaled score. ``is_causal`` has been folded
    into a bool mask by the front end (SDPA's top-left alignment). ``scale``: float.
    Returns (B, H, Lq, Dv) contiguous.
    A key that is masked out (bool False, or score + mask == -inf) must not influence
    the result in any way: this is what makes padding and decode-vs-prefill invariant.
    A query with no attended key (or only -inf scores) returns zeros, as torch's CPU
    SDPA does. ``Lk == 0`` and other empty shapes never reach the backend.

The front end also handles K == 0 (zeros + bias) and every empty result itself, and
raises ``BackendUnavailable`` (from ``backend_for``) when a backend module is missing.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from detkit.errors import BackendUnavailable

BACKEND_MODULES: dict[tuple[str, bool], str] = {
    ("cpu", False): "detkit.kernels.cpu",
    ("cpu", True): "detkit.kernels.portable_cpu",
    ("cuda", False): "detkit.kernels.cuda",
    ("cuda", True): "detkit.kernels.cuda_portable",
}


# Packages the CPU backends import, with the requirement that installs them (pyproject).
DEPENDENCIES: dict[str, str] = {"numba": "numba>=0.60"}

# Backend modules by name, once their import has finished.
_IMPORTED: dict[str, ModuleType] = {}


def backend_for(device_type: str, portable: bool) -> ModuleType:
    """Return the backend module for a device type and guarantee, or raise a clear error."""
    key = (device_type, bool(portable))
    if key not in BACKEND_MODULES:
        raise BackendUnavailable(
            f"detkit has no kernels for device type {device_type!r}; "
            "supported: cpu, cuda. Move the tensors to one of those devices."
        )
    name = BACKEND_MODULES[key]
    # Asked on every kernel call: a module this function has seen imported is returned
    # from here while sys.modules still holds it (import_module cost 1.5 us a call).
    module = _IMPORTED.get(name)
    if module is not None and sys.modules.get(name) is module:
        return module
    # Not sys.modules directly: while one thread imports a backend (numba compiles, ~1 s)
    # the module is already there, half executed, and other threads' first calls failed
    # with AttributeError; import_module waits for the import to finish.
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        what = "portable" if key[1] else "batch-invariant"
        package = (e.name or "").partition(".")[0]
        if package in DEPENDENCIES:
            # A dependency skipped by `pip install --no-deps`: say which and how to get it,
            # rather than a bare ModuleNotFoundError from inside detkit.
            raise BackendUnavailable(
                f"detkit's {what} {device_type} kernels need {package}, which is not installed: "
                f"`pip install '{DEPENDENCIES[package]}'`."
            ) from e
        if e.name != name:
            raise
        raise BackendUnavailable(
            f"detkit's {what} {device_type} backend ({name}) is not available in this "
            "installation. Use portable=False on the CPU, or install a version that has it."
        ) from e
    _IMPORTED[name] = module
    return module
