"""The torch mode: route aten ops of unmodified model code to detkit's kernels.

>>> with detkit.batch_invariant():                 # doctest: +SKIP
...     out = model.generate(**batch, do_sample=False)

While the mode is on, the aten overloads listed in ``detkit._aten_adapters.OVERRIDES``
(matmuls, softmaxes, sums/means, norms, attention, and the elementwise functions whose
CPU loops are position dependent) have new kernels registered with
``torch.library.Library("aten", "IMPL")`` for the CPU dispatch key, and for CUDA when
``detkit.kernels.cuda`` imports and a GPU is present. Each new kernel hands its
arguments to an adapter, which calls ``detkit.kernels``; arguments the kernels do not
cover run torch's original kernel and are counted (:meth:`batch_invariant.uncovered`),
or raise with ``strict=True``. Nothing falls back silently. With ``portable=True`` the
kernels run their canonical orders, and exp/log/log1p/rsqrt/sigmoid/silu/tanh/erf/gelu/sin/cos/softplus (float32,
bfloat16, float16) go to the portable backend's ``elementwise``.

Re-entrancy: the kernels themselves call aten ops (BLAS on fixed tiles, copies, ...).
A thread-local flag is set while an adapter runs; an overridden op called under it goes
straight to the original kernel captured at registration (``torch.library.get_kernel``),
so the mode never recurses into itself.

Autograd: leaf ops (mm, _softmax, ...) keep torch's autograd formulas, which sit above
the CPU key. For CompositeImplicitAutograd ops (rms_norm, scaled_dot_product_attention)
an autograd-key gate returns the detkit kernel's values in both cases; when a gradient
is needed it also runs torch's decomposition (its leaves routed) to carry the gradient,
so the forward bits never depend on requires_grad.

torch.compile: compiled code does not dispatch the aten ops one by one (inductor emits
its own kernels), so it would bypass the overrides without a trace. While the mode is on,
the compiler's stance is ``force_eager`` (``torch.compiler.set_stance``): compiled
functions, including those compiled before the mode was entered, run their Python code
eagerly, through the overrides; the previous stance returns when the mode turns off.

The mode needs torch >= 2.9 (``torch.library.get_kernel``); on older torch turning it on
raises :class:`~detkit.errors.BackendUnavailable` (``detkit.kernels`` do not use it).

State and threads: aten registrations are process wide, so while the mode is on it
applies to every thread. The state (on, portable, strict) is one process-wide value
changed under a lock; each context restores exactly the state it found, in ``finally``.
Entering and leaving contexts from several threads at once interleaves those restores
(last writer wins): switch the mode from one thread. The counters are process wide too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detkit._aten_adapters import (
    COMPLEX_POSITION_DEPENDENT,
    COMPOSED_PORTABLE,
    ELEMENTWISE_EXACT,
    ELEMENTWISE_LIBM,
    ELEMENTWISE_PORTABLE,
    EXACT_EXPONENTS,
    EXACT_OPS,
    FOLDS,
    INTEGER_EXACT_OPS,
    KNOWN_POSITION_DEPENDENT,
    OVERRIDES,
    ROUTED_BY_DECOMPOSITION,
    Call,
    Delegated,
    Fold,
    OpOverride,
    Unsupported,
    histc_inexact_reason,
)
from detkit._reentry import is_inside, set_inside
from detkit.errors import BackendUnavailable, InputError, InvarianceViolation

__all__ = [
    "Coverage",
    "CoverageReport",
    "ModeState",
    "batch_invariant",
    "counters",
    "coverage_report",
    "disable",
    "enable",
    "is_enabled",
    "registered_keys",
    "state",
    "trace_ops",
    "TracedOps",
]

_AUTOGRAD_KEY = {"CPU": "AutogradCPU", "CUDA": "AutogradCUDA"}


def _require_torch() -> None:
    """An override calls torch's own kernel through ``torch.library.get_kernel`` (torch 2.9);
    older torch has no way to reach a kernel once it is overridden."""
    if not hasattr(torch.library, "get_kernel"):
        raise BackendUnavailable(
            f"detkit.batch_invariant() needs torch >= 2.9 (torch.library.get_kernel), and this is torch "
            f"{torch.__version__}: install a newer torch (pip install 'torch>=2.9'). detkit.kernels called "
            "directly do not use it."
        )


@dataclass(frozen=True)
class ModeState:
    """The mode's whole state; contexts save and restore it as one value."""

    enabled: bool = False
    portable: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        for name in ("enabled", "portable", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModeState.{name} must be a bool, got {getattr(self, name)!r}")
        if not self.enabled and (self.portable or self.strict):
            raise ValueError("a disabled ModeState carries no portable/strict flags")


@dataclass(frozen=True)
class Coverage:
    """Calls of overridden ops: routed to detkit, run by torch (with why), decomposed.

    ``fell_back``: the kernels did not cover the arguments; torch's kernel ran, so these
    calls carry no invariance guarantee. ``passed_through``: torch's kernel ran but its
    result is exact anyway (integer sums, empty tensors, pow(x, 2), ...).
    ``decomposed``: a composite op also ran torch's decomposition, for its gradient,
    because a gradient was needed; the values still come from the detkit kernel.
    """

    routed: dict[str, int] = field(default_factory=dict)
    fell_back: dict[str, dict[str, int]] = field(default_factory=dict)
    passed_through: dict[str, dict[str, int]] = field(default_factory=dict)
    decomposed: dict[str, int] = field(default_factory=dict)
    not_portable: dict[str, dict[str, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"routed to detkit kernels: {_fmt(self.routed) or 'none'}"]
        if self.decomposed:
            lines.append(f"decomposed for autograd (leaves routed): {_fmt(self.decomposed)}")
        tables = [("fell back to torch (NOT covered)", self.fell_back), ("passed through (exact)", self.passed_through)]
        if self.not_portable:
            tables.append(("routed, but torch's math library (NOT portable)", self.not_portable))
        for title, table in tables:
            lines.append(f"{title}: {'none' if not table else ''}")
            for op, reasons in sorted(table.items()):
                for reason, n in sorted(reasons.items()):
                    lines.append(f"  {op}: {n} x {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "routed": dict(self.routed),
            "fell_back": {k: dict(v) for k, v in self.fell_back.items()},
            "passed_through": {k: dict(v) for k, v in self.passed_through.items()},
            "decomposed": dict(self.decomposed),
            "not_portable": {k: dict(v) for k, v in self.not_portable.items()},
        }


def _fmt(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.routed: Counter[str] = Counter()
        self.fell_back: Counter[tuple[str, str]] = Counter()
        self.passed_through: Counter[tuple[str, str]] = Counter()
        self.decomposed: Counter[str] = Counter()
        self.not_portable: Counter[tuple[str, str]] = Counter()

    def add(self, table: Counter[Any], key: Any) -> None:
        with self._lock:
            table[key] += 1

    def snapshot(self) -> tuple[Counter[Any], ...]:
        with self._lock:
            return (Counter(self.routed), Counter(self.fell_back), Counter(self.passed_through), Counter(self.decomposed),
                    Counter(self.not_portable))


def _coverage(now: tuple[Counter[Any], ...], before: tuple[Counter[Any], ...] | None = None) -> Coverage:
    delta = [n - b for n, b in zip(now, before)] if before is not None else list(now)
    routed, fell_back, passed, decomposed, not_portable = delta

    def nest(c: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (op, reason), n in c.items():
            out.setdefault(op, {})[reason] = n
        return out

    return Coverage(dict(routed), nest(fell_back), nest(passed), dict(decomposed), nest(not_portable))


_LOCK = threading.RLock()
_STATE = ModeState()
_COUNTERS = _Counters()


class _Registration:
    """The torch.library objects and the compiler stance of one enabled period; ``close``
    restores the original kernels and stance."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.skipped: dict[str, str] = {}
        self._libraries: list[torch.library.Library] = []
        self._stance: Any = None
        self._mha_fastpath: bool | None = None
        self.compile_note = ""
        _require_torch()
        try:
            self._force_eager()
            self._disable_mha_fastpath()
            for key in keys:
                self._register(key)
        except BaseException:
            self.close()
            raise

    def _force_eager(self) -> None:
        """Compiled code would run inductor's kernels instead of the overrides."""
        # Sets the stance now; __exit__ restores the previous one. (Inside a compiled
        # function torch raises here: the mode belongs around the compiled call.)
        self._stance = torch.compiler.set_stance("force_eager")
        self.compile_note = "torch.compile'd code runs eagerly (stance force_eager) while the mode is on"

    def _disable_mha_fastpath(self) -> None:
        """nn.MultiheadAttention and nn.TransformerEncoderLayer in eval without grad run
        torch's fused kernels (``_native_multi_head_attention``,
        ``_transformer_encoder_layer_fwd``), which never dispatch the overridden ops: rows
        changed with the batch and with padding, and differed from the same module under
        autograd, with nothing counted as a fallback. Off, they take their Python path."""
        backends = getattr(torch.backends, "mha", None)
        if backends is not None and hasattr(backends, "set_fastpath_enabled"):
            self._mha_fastpath = bool(backends.get_fastpath_enabled())
            backends.set_fastpath_enabled(False)

    def _register(self, key: str) -> None:
        plans: list[tuple[OpOverride, Any, Any]] = []
        for spec in OVERRIDES[key]:
            try:
                spec.overload
            except AttributeError:
                self.skipped[f"{key}:{spec.name}"] = f"torch {torch.__version__} has no aten::{spec.name}"
                continue
            if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(spec.qualname, key):
                # The op cannot run on this device at all (as aten::_grouped_mm on CPU before
                # torch 2.9, below the mode's floor), so nothing escapes; get_kernel would raise.
                self.skipped[f"{key}:{spec.name}"] = f"torch {torch.__version__} has no {key} kernel for aten::{spec.name}"
                continue
            # Capture every original before the first registration changes the tables.
            original = torch.library.get_kernel(spec.qualname, key)
            if spec.numbers_as_tensors:
                original = _NumbersAsTensors(original, spec.overload._schema)
            grad_kernel = torch.library.get_kernel(spec.qualname, _AUTOGRAD_KEY[key]) if spec.composite else None
            plans.append((spec, original, grad_kernel))
        folds = [(fold, k, torch.library.get_kernel(fold.qualname, k)) for fold in FOLDS for k in (key, _AUTOGRAD_KEY[key])]
        lib = torch.library.Library("aten", "IMPL")
        self._libraries.append(lib)
        with warnings.catch_warnings():
            # torch warns once that an aten kernel is being overridden: that is the point.
            warnings.simplefilter("ignore", UserWarning)
            for spec, original, grad_kernel in plans:
                lib.impl(spec.impl_name, _make_kernel(spec, original), key, with_keyset=True)
                if grad_kernel is not None:
                    lib.impl(spec.impl_name, _make_gate(spec, grad_kernel), _AUTOGRAD_KEY[key], with_keyset=True)
            for fold, k, original in folds:
                lib.impl(fold.name, _make_fold(fold, original), k, with_keyset=True)

    def close(self) -> None:
        try:
            while self._libraries:
                self._libraries.pop()._destroy()
        finally:
            if self._mha_fastpath is not None:
                torch.backends.mha.set_fastpath_enabled(self._mha_fastpath)
                self._mha_fastpath = None
            if self._stance is not None:
                stance, self._stance = self._stance, None
                stance.__exit__(None, None, None)


_REGISTRATION: _Registration | None = None
_CUDA_NOTE: str = ""


def _dispatch_keys() -> tuple[str, ...]:
    global _CUDA_NOTE
    keys = ["CPU"]
    if torch.cuda.is_available():
        try:
            importlib.import_module("detkit.kernels.cuda")
        except Exception as e:  # noqa: BLE001 - any import failure means: no CUDA routing
            _CUDA_NOTE = f"CUDA not routed: detkit.kernels.cuda did not import ({type(e).__name__}: {e})"
        else:
            keys.append("CUDA")
            _CUDA_NOTE = ""
    else:
        _CUDA_NOTE = "CUDA not routed: no GPU visible to torch"
    return tuple(keys)


class _NumbersAsTensors:
    """An original kernel whose Tensor arguments may arrive as Python numbers: torch hands
    a Python kernel a wrapped-number tensor (a scalar that C++ code passed as a Tensor)
    as a number, and the boxed call refuses it. A number becomes a 0-d tensor of the dtype
    it would promote to, which gives the call the wrapped number's result dtype (with no
    tensor at all, as LED's ``torch.div(seq_len, window, rounding_mode="trunc")`` of two
    ints, each number's own: int64 or the default float dtype); for a 16-bit result beside
    a dimensioned tensor, a float32 one (complex64 for complex32): torch's kernels read a
    CPU scalar at its own precision in their float32 arithmetic, so bfloat16 ``x // 0.1``
    divides by 0.1 in float32, not by 0.1 rounded to bfloat16 (31 of 1,000 quotients
    differed)."""

    def __init__(self, original: Any, schema: Any) -> None:
        self._original = original
        # the positions of the schema's Tensor arguments: a number elsewhere is a number
        self._tensor_positions = frozenset(i for i, a in enumerate(schema.arguments) if str(a.type) == "Tensor")

    def call_boxed(self, keyset: Any, *args: Any, **kwargs: Any) -> Any:
        like = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)

        def as_tensor(i: int, a: Any) -> Any:
            if i not in self._tensor_positions or not isinstance(a, (bool, int, float, complex)):
                return a
            if like is None:
                return torch.tensor(a)
            dtype = torch.result_type(a, like)
            if like.dim():  # beside a 0-d tensor a float32 scalar would promote the result
                dtype = _SCALAR_PRECISION.get(dtype, dtype)
            return torch.tensor(a, dtype=dtype, device=like.device)

        return self._original.call_boxed(keyset, *(as_tensor(i, a) for i, a in enumerate(args)), **kwargs)


# A 0-d operand does not promote a dimensioned one of its category: a float32 scalar
# keeps a bfloat16 result bfloat16, at the scalar's float32 value.
_SCALAR_PRECISION = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.complex32: torch.complex64}


def _grad_needed(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


# Set by a composite op's autograd gate around its routed call: an Unsupported then
# propagates to the gate instead of running torch's kernel (see _make_gate).
class _GateState(threading.local):
    active = False


_GATE = _GateState()


def _count_unrouted(spec: OpOverride, unrouted: Unsupported, state: ModeState) -> None:
    if unrouted.benign:
        _COUNTERS.add(_COUNTERS.passed_through, (spec.name, unrouted.reason))
    else:
        _COUNTERS.add(_COUNTERS.fell_back, (spec.name, unrouted.reason))
        if state.strict:
            raise InvarianceViolation(
                f"detkit.batch_invariant(strict=True): aten::{spec.name} was called with arguments the "
                f"detkit kernels do not cover ({unrouted.reason}), so torch's own kernel would run. "
                "Change the call, or use strict=False and read batch_invariant().uncovered()."
            )


def _make_kernel(spec: OpOverride, original: Any) -> Callable[..., Any]:
    def count_not_portable(reason: str) -> None:  # made once per op, not per call
        _COUNTERS.add(_COUNTERS.not_portable, (spec.name, reason))

    claims = spec.claims

    def kernel(keyset: Any, *args: Any, **kwargs: Any) -> Any:
        if is_inside() or (claims is not None and not claims(*args, **kwargs)):
            # Called from inside a detkit kernel or adapter, or a call the op is not routed
            # for (a real mul): torch's own kernel.
            return original.call_boxed(keyset, *args, **kwargs)
        gated, _GATE.active = _GATE.active, False
        state = _STATE
        call = Call(state.portable, functools.partial(original.call_boxed, keyset), count_not_portable)
        set_inside(True)
        try:
            return_value = spec.adapter(call, *args, **kwargs)
        except Unsupported as why:
            unrouted = why
        else:
            if type(return_value) is Delegated:  # computed and counted by the op it went through
                return return_value.value
            _COUNTERS.add(_COUNTERS.routed, spec.name)
            return return_value
        finally:
            set_inside(False)
        if gated:
            raise unrouted  # the gate runs torch's decomposition instead, once
        _count_unrouted(spec, unrouted, state)
        return original.call_boxed(keyset, *args, **kwargs)

    kernel.__name__ = f"detkit_{spec.name.replace('.', '_')}"
    return kernel


class _RoutedValues(torch.autograd.Function):
    """The routed kernel's values with the decomposition's gradient (identity backward)."""

    @staticmethod
    def forward(ctx: Any, decomposed: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        return routed.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _make_fold(fold: Fold, original: Any) -> Callable[..., Any]:
    def kernel(keyset: Any, *args: Any, **kwargs: Any) -> Any:
        return fold.run(functools.partial(original.call_boxed, keyset), *args, **kwargs)

    kernel.__name__ = f"detkit_fold_{fold.name}"
    return kernel


def _make_gate(spec: OpOverride, grad_kernel: Any) -> Callable[..., Any]:
    overload = spec.overload

    def gate(keyset: Any, *args: Any, **kwargs: Any) -> Any:
        if _grad_needed(args, kwargs) and not is_inside():
            # The values must not depend on requires_grad (a trainer and a sampler must see
            # the same forward bits), so they come from the routed kernel; the gradient
            # flows through torch's decomposition of the same function. The routed call
            # comes first: where it would fall back, torch's decomposition alone gives the
            # values and the gradient. (Running the fallback as well drew SDPA's dropout
            # mask twice: the values came from one mask, the gradient from the other.)
            _GATE.active = True
            try:
                with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
                    routed = overload(*args, **kwargs)
            except Unsupported as unrouted:
                _count_unrouted(spec, unrouted, _STATE)
                return grad_kernel.call_boxed(keyset, *args, **kwargs)
            finally:
                _GATE.active = False
            _COUNTERS.add(_COUNTERS.decomposed, spec.name)
            decomposed = grad_kernel.call_boxed(keyset, *args, **kwargs)
            first = decomposed[0] if isinstance(decomposed, tuple) and decomposed else decomposed
            if not isinstance(first, torch.Tensor):
                return decomposed
            if isinstance(decomposed, tuple):
                # _fused_rms_norm's (output, rstd): returned whole, its output was torch's
                # decomposition whenever a gradient was needed. rstd only feeds the backward.
                return (_RoutedValues.apply(first, routed[0]), *decomposed[1:])
            return _RoutedValues.apply(decomposed, routed)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args, **kwargs)

    gate.__name__ = f"detkit_gate_{spec.name.replace('.', '_')}"
    return gate


def _apply(new: ModeState) -> None:
    """Switch to ``new``: register or remove the overrides as needed (under the lock)."""
    global _STATE, _REGISTRATION
    with _LOCK:
        if new.enabled and _REGISTRATION is None:
            _REGISTRATION = _Registration(_dispatch_keys())
        elif not new.enabled and _REGISTRATION is not None:
            registration, _REGISTRATION = _REGISTRATION, None
            registration.close()
        _STATE = new


def enable(portable: bool = False, *, strict: bool = False) -> None:
    """Turn the mode on for the whole process until :func:`disable` (prefer the context)."""
    _apply(ModeState(True, bool(portable), bool(strict)))


def disable() -> None:
    """Turn the mode off and restore every original aten kernel."""
    _apply(ModeState())


def is_enabled() -> bool:
    return _STATE.enabled


def state() -> ModeState:
    return _STATE


def registered_keys() -> dict[str, Any]:
    """Which dispatch keys are routed now, and why CUDA is not (if it is not)."""
    with _LOCK:
        reg = _REGISTRATION
        return {
            "keys": list(reg.keys) if reg else [],
            "skipped": dict(reg.skipped) if reg else {},
            "note": _CUDA_NOTE,
            "compile": reg.compile_note if reg else "",
            "mha_fastpath": ("torch's fused MultiheadAttention/TransformerEncoderLayer kernels are off while the "
                             "mode is on" if reg and reg._mha_fastpath is not None else ""),
        }


def counters() -> Coverage:
    """Process-wide call counts of overridden ops since import."""
    return _coverage(_COUNTERS.snapshot())


class batch_invariant(contextlib.ContextDecorator):  # noqa: N801 - reads like a function
    """Context manager (and decorator) that turns the mode on with these flags.

    It saves the state it finds and restores exactly that state on exit, also on an
    exception, so contexts nest (an inner ``portable=True`` ends with its block) and an
    inner :func:`disable` cannot outlive the outer block. :meth:`uncovered` lists the
    calls in the block (all threads) that ran torch's kernel instead of detkit's.
    """

    def __init__(self, portable: bool = False, *, strict: bool = False) -> None:
        if not isinstance(portable, bool) or not isinstance(strict, bool):
            raise TypeError("batch_invariant(portable=..., strict=...) takes bools")
        self.portable = portable
        self.strict = strict
        # Stacks, so one instance used as a decorator survives recursion.
        self._saved: list[ModeState] = []
        self._starts: list[tuple[Counter[Any], ...]] = []
        self._last: Coverage | None = None

    def __enter__(self) -> batch_invariant:
        with _LOCK:
            previous = _STATE
            _apply(ModeState(True, self.portable, self.strict))
            self._saved.append(previous)
            self._starts.append(_COUNTERS.snapshot())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with _LOCK:
            start = self._starts.pop()
            previous = self._saved.pop()
            try:
                self._last = _coverage(_COUNTERS.snapshot(), start)
            finally:
                _apply(previous)

    def coverage(self) -> Coverage:
        """Counts for the current block (while inside) or the last finished one."""
        if self._starts:
            return _coverage(_COUNTERS.snapshot(), self._starts[-1])
        return self._last if self._last is not None else Coverage()

    def uncovered(self) -> dict[str, dict[str, int]]:
        """Overridden ops whose calls fell back to torch: {op: {reason: count}}."""
        return self.coverage().fell_back

    def routed(self) -> dict[str, int]:
        return self.coverage().routed

    def not_portable(self) -> dict[str, dict[str, int]]:
        """Portable mode: routed calls whose values came from torch's math library (``mish``,
        ``sinh``, float64 ``exp``, ...): batch invariant, but their bits may differ between
        instruction sets and devices. {op: {reason: count}}; empty outside portable mode."""
        return self.coverage().not_portable


# ----------------------------------------------------------------------------- static coverage


class TracedOps(Counter):  # type: ignore[type-arg]
    """Calls per aten overload, which overloads ever took a floating-point tensor
    (``float_inputs``): an op of ``INTEGER_EXACT_OPS`` that never did is exact; which
    took a complex one (``complex_inputs``): there ``COMPLEX_POSITION_DEPENDENT`` is not;
    and which ever computed in float64 (``float64_inputs``: its first floating-point
    operand, or its ``dtype=``, was float64), which the portable and CUDA kernels do not
    take; and which ``mul``/``div`` calls took a 16-bit float tensor and an integer tensor
    that dtype cannot represent (``rounded_integer_operands``)."""

    def __init__(self) -> None:
        super().__init__()
        self.float_inputs: set[str] = set()
        self.complex_inputs: set[str] = set()
        self.float64_inputs: set[str] = set()
        # pow overloads with a scalar exponent: the exponents seen (2 and 0.5 are exact,
        # 3 is the portable cube, the others the portable Pow)
        self.pow_exponents: dict[str, set[float | complex]] = {}
        # mul/div of a 16-bit float tensor by an integer tensor holding a value that the
        # 16-bit dtype cannot represent (see _ROUNDS_INTEGER_OPERAND)
        self.rounded_integer_operands: set[str] = set()
        # histc calls torch's kernel may round in (histc_inexact_reason): the first reason
        self.inexact_histc: dict[str, str] = {}


def _first_float_dtype(values: Any) -> torch.dtype | None:
    """The dtype of the first floating-point tensor (the operand a routed op computes in)."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
        if isinstance(v, (list, tuple)):
            found = _first_float_dtype(v)
            if found is not None:
                return found
    return None


def _has_float_tensor(values: Any, complex_only: bool = False) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor) and (v.is_complex() or (v.is_floating_point() and not complex_only)):
            return True
        if isinstance(v, (list, tuple)) and _has_float_tensor(v, complex_only):
            return True
    return False


_SCALAR_POW = frozenset({"pow.Tensor_Scalar", "pow_.Scalar", "pow.Tensor_Scalar_out"})
# Reductions and scans that cast their input to ``dtype=`` first: that dtype, not the
# operands', is the type they compute in (Mixtral's router sums float counts as int32).
_COMPUTES_IN_DTYPE = frozenset({"sum", "mean", "prod", "cumsum", "cumsum_", "cumprod", "cumprod_",
                                "linalg_vector_norm"})


# torch's CPU mul and div of a 16-bit float tensor by an integer tensor round the integers
# to the 16-bit dtype first, except when the integer tensor has one element: then its
# exact value is used (read as a CPU scalar). A sum over a count, a row per batch entry,
# changes at a batch of one: bfloat16 s / 297 is s / 296 in a batch. Measured with torch
# 2.13 (add and sub do not do this; nor does float32, whose own rounding the scalar gets).
_ROUNDS_INTEGER_OPERAND = frozenset({"mul", "mul_", "div", "div_"})


def _rounds_an_integer_operand(values: tuple[Any, ...]) -> bool:
    """A 16-bit float tensor and an integer tensor (not 0-d: that is a CPU scalar at every
    batch) holding a value the 16-bit dtype cannot represent."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    half = next((t.dtype for t in tensors if t.dtype in (torch.bfloat16, torch.float16)), None)
    if half is None:
        return False
    for t in tensors:
        if t.dim() and not (t.is_floating_point() or t.is_complex()) and t.dtype != torch.bool:
            wide = t.to(torch.float64)
            if not bool((wide.to(half).to(torch.float64) == wide).all()):
                return True
    return False


def _exponent(value: Any) -> float | complex:
    """A scalar pow exponent as recorded. z ** 2j has no float(): it stays complex, and so
    equals no exact exponent; 2 + 0j is 2, as the mode's pow adapter compares it."""
    if isinstance(value, complex):
        return float(value.real) if value.imag == 0 else value
    return float(value)


class _OpTracer(TorchDispatchMode):
    # Higher-order operators (flex_attention: HF's attn_implementation="flex_attention")
    # raised NotImplementedError here. Each call is now counted under the operator's own
    # name (not routed, so listed as uncovered); the aten ops it runs inside are not traced.
    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.ops = TracedOps()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if isinstance(func, torch._ops.HigherOrderOperator):
            name = f"{func.name()}.default"
        else:
            name = f"{func._overloadpacket.__name__}.{func._overloadname}"
        self.ops[name] += 1
        values = (*args, *(kwargs or {}).values())
        dtype = (kwargs or {}).get("dtype")
        computes_in = dtype if isinstance(dtype, torch.dtype) and name.partition(".")[0] in _COMPUTES_IN_DTYPE else None
        if name not in self.ops.float_inputs:
            floats = _has_float_tensor(values)
            if computes_in is not None:
                floats = computes_in.is_floating_point or computes_in.is_complex
            if floats:
                self.ops.float_inputs.add(name)
        if name not in self.ops.float64_inputs and (computes_in or _first_float_dtype(values)) == torch.float64:
            self.ops.float64_inputs.add(name)
        if name not in self.ops.complex_inputs and _has_float_tensor(values, complex_only=True):
            self.ops.complex_inputs.add(name)
        if (name not in self.ops.rounded_integer_operands and name.partition(".")[0] in _ROUNDS_INTEGER_OPERAND
                and _rounds_an_integer_operand(values)):
            self.ops.rounded_integer_operands.add(name)
        if name.startswith("histc.") and name not in self.ops.inexact_histc:
            reason = histc_inexact_reason(*args, **{k: v for k, v in (kwargs or {}).items() if k != "out"})
            if reason is not None:
                self.ops.inexact_histc[name] = reason
        if name in _SCALAR_POW and len(args) > 1 and not isinstance(args[1], torch.Tensor):
            self.ops.pow_exponents.setdefault(name, set()).add(_exponent(args[1]))
        return func(*args, **(kwargs or {}))


def trace_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, TracedOps]:
    """Run ``fn`` and count the aten overloads that reach the backend ("mm.default", ...).

    Composite ops appear as the ops they decompose into. The counts also record which
    overloads saw a floating-point tensor (``float_inputs``; for a sum or scan with
    ``dtype=``, that dtype decides), so that :func:`coverage_report` can tell integer
    arithmetic (exact) from float arithmetic.
    Tracing goes through Python for every op: use it to find out what a model runs, not
    while measuring speed.
    """
    tracer = _OpTracer()
    with tracer:
        result = fn(*args, **kwargs)
    return result, tracer.ops


def _full_name(name: str) -> str:
    return name if "." in name else f"{name}.default"


@dataclass(frozen=True)
class CoverageReport:
    """Traced ops sorted by what the mode guarantees for them.

    ``routed``: computed by detkit. ``exact``: order free and exact anywhere (views,
    indexing, comparisons, max, integer ops, IEEE add/mul/div/sqrt). ``not_portable``:
    (portable mode only) routed or exact on this machine but from a math library whose
    bits differ between CPUs and devices; the elementwise functions the portable
    backend implements (``ELEMENTWISE_PORTABLE``, and ``pow``) are routed to it and count
    as ``routed`` where the device's table has them. The classification is by op name,
    with what :func:`trace_ops` records: a scalar ``pow`` traced with exponents 0, 1, 2 and
    0.5 only is exact (one correctly rounded operation at most), with 3 among them routed
    (the portable ``cube``); an op of ``INTEGER_EXACT_OPS`` traced with integer operands
    only is exact; ``mul`` and ``div`` (their Tensor forms) traced with a complex operand
    are routed on the CPU and in portable mode, exact otherwise; on the CPU another op of
    ``COMPLEX_POSITION_DEPENDENT`` (``square``, ``mul.Scalar``) traced with a complex
    operand is uncovered, and so is a ``mul``/``div`` traced with a 16-bit float
    tensor and an integer tensor holding values that dtype cannot represent (torch's CPU
    kernel rounds them, except from a one-element tensor); and in portable mode, or on
    CUDA, a routed op traced computing in float64 is uncovered (an elementwise one: not
    portable, in portable mode), since those kernels take float32, bfloat16 and float16
    only.
    An op torch computes from routed ops (``ROUTED_BY_DECOMPOSITION``: ``_euclidean_dist``,
    ``torch.cdist``'s matmul path) is routed.
    ``uncovered``: anything else; its bits are whatever torch gives, so check them with a
    test. ``notes``: why an op is listed.
    """

    portable: bool
    routed: dict[str, int]
    exact: dict[str, int]
    not_portable: dict[str, int]
    uncovered: dict[str, int]
    notes: dict[str, str]

    def __str__(self) -> str:
        parts = [
            f"coverage ({'portable' if self.portable else 'batch invariant'} mode)",
            f"  routed:    {_fmt(self.routed) or 'none'}",
            f"  exact:     {_fmt(self.exact) or 'none'}",
        ]
        if self.portable:
            parts.append(f"  NOT portable: {_fmt(self.not_portable) or 'none'}")
        parts.append(f"  UNCOVERED: {_fmt(self.uncovered) or 'none'}")
        parts += [f"    {op}: {note}" for op, note in sorted(self.notes.items())]
        return "\n".join(parts)


_EXACT_OR_CUBE = frozenset({*EXACT_EXPONENTS, 3.0})
# What the portable mode computes portably: the backends' unary functions, those composed
# from them (expm1), and pow (Pow, every overload the device's table routes).
_PORTABLE_FUNCTIONS = ELEMENTWISE_PORTABLE | set(COMPOSED_PORTABLE) | {"pow"}
_FLOAT_OPERAND_NOTE = ("float operands (as traced): exact only while they hold integers below 2^24, as an MoE "
                       "router's tokens per expert do (torch's CPU histc takes floats only); check with a test")


def coverage_report(ops: Mapping[str, int], *, portable: bool = False, device: str = "CPU") -> CoverageReport:
    """Classify traced ops (from :func:`trace_ops`) against the overrides for ``device``.

    An op of ``INTEGER_EXACT_OPS`` (``floor_divide``, ``histc``, ``bincount``, ...) that the
    trace saw with integer operands only is exact, and on the CPU an op of
    ``COMPLEX_POSITION_DEPENDENT`` the mode does not route (``square``, ...) it saw with a complex operand, or
    ``mul``/``div`` it saw with a 16-bit float and an integer tensor the 16-bit dtype cannot
    hold exactly, is uncovered; with ``ops`` from elsewhere (a plain mapping of counts, no
    ``float_inputs`` or ``complex_inputs``) an op is classified by name alone."""
    if device not in OVERRIDES:
        raise InputError(f"coverage_report: device must be one of {', '.join(OVERRIDES)}, got {device!r}")
    table = {_full_name(s.name): s for s in OVERRIDES[device]}
    routed: dict[str, int] = {}
    exact: dict[str, int] = {}
    not_portable: dict[str, int] = {}
    uncovered: dict[str, int] = {}
    notes: dict[str, str] = {}
    float_inputs = getattr(ops, "float_inputs", None)
    complex_inputs = getattr(ops, "complex_inputs", set())
    float64_inputs = getattr(ops, "float64_inputs", set())
    for name, n in sorted(ops.items()):
        full = _full_name(name)
        packet = full.split(".")[0]
        base = packet if packet in EXACT_OPS else packet.removesuffix("_")
        integers_only = float_inputs is not None and name not in float_inputs and base in INTEGER_EXACT_OPS
        if integers_only:
            # routed or not, the mode passes integer operands to torch: the result is exact
            exact[full] = n
            notes[full] = "integer operands only (as traced): exact"
            continue
        if packet == "histc" and float_inputs is not None and full in table:
            inexact = getattr(ops, "inexact_histc", {}).get(name)
            if inexact is not None:
                uncovered[full] = n
                notes[full] = f"{inexact} (as traced): torch's kernel, which may round"
            else:
                exact[full] = n
                notes[full] = "integer values (as traced): torch's histc counts them exactly"
            continue
        if float_inputs is not None and base in INTEGER_EXACT_OPS and full not in table:
            # listed below as uncovered; say what that means for this op
            notes[full] = _FLOAT_OPERAND_NOTE
        if device == "CPU" and name in complex_inputs and packet in COMPLEX_POSITION_DEPENDENT and full not in table:
            uncovered[full] = n
            notes[full] = ("complex operands (as traced): several roundings per element, which torch's vector path "
                           "and scalar tail order differently (position dependent)")
            continue
        if device == "CPU" and name in getattr(ops, "rounded_integer_operands", set()):
            uncovered[full] = n
            notes[full] = ("a 16-bit float times or over an integer tensor holding values the 16-bit dtype cannot "
                           "represent (as traced): torch's CPU kernel rounds them to 16 bits, except for an integer "
                           "tensor of one element (a batch of one), whose exact value it uses, so the result changes "
                           "with the batch; convert the integers to the float dtype first (or compute in float32)")
            continue
        if packet in COMPLEX_POSITION_DEPENDENT and full in table:
            # mul and div: routed with a complex operand, one IEEE operation without
            if name in complex_inputs and (device == "CPU" or portable):
                routed[full] = n
                notes[full] = ("complex operands (as traced): real IEEE products and sums, each rounded once, the "
                               "same on every device")
            else:
                exact[full] = n
            continue
        exponents = getattr(ops, "pow_exponents", {}).get(name)
        if portable and exponents is not None and exponents <= _EXACT_OR_CUBE and full in table:
            # the exponents as traced: 2 and 0.5 are one correctly rounded operation, 3
            # the portable cube; none reaches torch's math library
            listed = ", ".join(f"{e:g}" for e in sorted(exponents))
            if exponents <= set(EXACT_EXPONENTS):
                exact[full] = n
                notes[full] = f"exponents {listed} (as traced): exact"
            else:
                routed[full] = n
                notes[full] = f"exponents {listed} (as traced): 3 is the portable cube, the others exact"
            continue
        if packet in ("pow", "pow_") and name in complex_inputs:
            uncovered[full] = n
            notes[full] = "complex operands (as traced): torch's kernel (detkit's pow takes real floats)"
            continue
        if name in float64_inputs and full in table and not table[full].any_float and (portable or device == "CUDA"):
            # the portable and the CUDA kernels take float32, bfloat16 and float16 only
            if table[full].kind != "elementwise":
                uncovered[full] = n
                notes[full] = ("float64 operands (as traced): the portable and CUDA kernels take float32, bfloat16 "
                               "and float16, so torch's kernel runs (a counted fallback)")
                continue
            if portable:
                not_portable[full] = n
                notes[full] = "float64 operands (as traced): torch's math library (portable kernels take 16/32-bit)"
                continue
        if packet in ROUTED_BY_DECOMPOSITION and not (name in float64_inputs and (portable or device == "CUDA")):
            routed[full] = n
            notes[full] = ROUTED_BY_DECOMPOSITION[packet]
            continue
        if full in KNOWN_POSITION_DEPENDENT:
            notes[full] = f"position dependent {KNOWN_POSITION_DEPENDENT[full]}"
        if portable and base in ELEMENTWISE_LIBM and not (full in table and base in _PORTABLE_FUNCTIONS):
            not_portable[full] = n
            notes[full] = "math-library function: bits differ between CPU instruction sets and devices"
        elif device == "CUDA" and not portable and base in ELEMENTWISE_LIBM:
            exact[full] = n  # torch's CUDA elementwise kernels: the same code for every element
        elif full in table:
            if portable and base in _PORTABLE_FUNCTIONS:
                notes[full] = "portable kernel for float32/bfloat16/float16; float64 runs torch's kernel (not portable)"
            routed[full] = n
        elif base in EXACT_OPS or base in ELEMENTWISE_EXACT:
            exact[full] = n
        else:
            uncovered[full] = n
    return CoverageReport(portable, routed, exact, not_portable, uncovered, notes)
