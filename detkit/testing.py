"""Assertions for determinism and batch invariance, for use in any test suite.

```python
from detkit.testing import assert_batch_invariant, assert_deterministic, assert_ulp_close

def test_my_layer():
    assert_batch_invariant(my_layer, x, batch_sizes=[1, 2, 3, 8, 64])  # every row, every b
    assert_deterministic(my_layer, x, runs=5)
    assert_ulp_close(y, y_ref, max_ulp=2)
```

All functions accept torch tensors (any float dtype, bfloat16 included, any device) and
numpy arrays, and functions returning a tensor/array or a tuple/list/dict of them. A
failure raises an ``AssertionError`` subclass (:class:`DetkitAssertionError`, also a
``detkit.errors.InvarianceViolation``) whose message says what differs, where, by how
many ULPs, and what to try next; its ``result`` attribute holds the structured
:class:`CheckResult`. A pass returns the :class:`CheckResult`.

Bitwise means bitwise: ``-0.0`` differs from ``0.0`` and NaN payloads count.
"""

from __future__ import annotations

import numbers
import random
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detkit import _testing_values as V
from detkit._testing_observers import OBSERVERS
from detkit.errors import InputError, InvarianceViolation

__all__ = [
    "CHECKS",
    "VERDICTS",
    "BatchVariance",
    "BitwiseMismatch",
    "CheckResult",
    "DetkitAssertionError",
    "Nondeterminism",
    "UlpMismatch",
    "assert_batch_invariant",
    "assert_bitwise_equal",
    "assert_deterministic",
    "assert_generation_invariant",
    "assert_trainer_matches_sampler",
    "assert_ulp_close",
]

CHECKS = ("batch_invariant", "deterministic", "bitwise_equal", "ulp_close", "generation", "sampler_trainer")
VERDICTS = ("PASS", "BATCH-VARIANT", "NONDETERMINISTIC", "MISMATCH", "ULP-EXCEEDED")

DEFAULT_BATCH_SIZES = (1, 2, 3, 4, 8, 16, 32)

HINT_BATCH = (
    "What to try: wrap the call in `with detkit.batch_invariant():` (in pytest: mark the test "
    "@pytest.mark.batch_invariant, or run with --detkit-mode=batch-invariant). If it already "
    "runs under the mode, an op without a detkit kernel is batch variant: `detkit audit` "
    "lists which ops are, on this machine."
)
HINT_NONDET = (
    "What to try: look for unseeded randomness (global RNG states were restored before each "
    "run; an explicit torch.Generator passed in is not, so create it inside the function), "
    "GPU atomics (index_add, scatter_add), reductions that depend on thread timing; "
    "set torch.use_deterministic_algorithms(True); run under `detkit.batch_invariant()`. "
    "`detkit audit` measures run-to-run nondeterminism per op."
)
HINT_BITWISE = (
    "What to try: if the two sides come from different batch sizes, devices or thread counts, "
    "compute both under `detkit.batch_invariant()` (portable=True for the same bits on every "
    "device); if a few ULPs are acceptable, use assert_ulp_close(..., max_ulp=N)."
)
HINT_KIND = (
    "What to try: compare like with like (no ULP distance exists between different dtypes or shapes): "
    "fix the code that produced the other dtype or shape, or convert one side explicitly."
)
HINT_INT = (
    "What to try: integers (indices, token ids, counts) have no ULPs to allow: find where they come to "
    "differ, often a floating difference upstream that flipped an argmax or a comparison."
)
HINT_ULP = (
    "What to try: check the error against a correctly rounded reference (detkit.reference); "
    "raise max_ulp only if that much error is acceptable for this computation."
)


@dataclass
class CheckResult:
    """The outcome of one detkit check (what the pytest plugin records and reports)."""

    check: str
    verdict: str
    worst_ulp: int | None = None
    name: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}; expected one of {CHECKS}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; expected one of {VERDICTS}")
        if self.worst_ulp is not None and self.worst_ulp < 0:
            raise ValueError(f"worst_ulp must be >= 0 or None, got {self.worst_ulp}")
        if not isinstance(self.name, str):
            # it goes into the pytest report: a value JSON cannot hold (an Enum) stopped the writing
            raise InputError(f"a check's name must be a string, got {self.name!r} ({type(self.name).__name__})")

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "name": self.name,
            "verdict": self.verdict,
            "passed": self.passed,
            "worst_ulp": self.worst_ulp,
            "detail": self.detail,
            "message": self.message,
        }


class DetkitAssertionError(InvarianceViolation):
    """A detkit check failed; ``result`` is its :class:`CheckResult`."""

    def __init__(self, result: CheckResult) -> None:
        super().__init__(result.message)
        self.result = result


class BatchVariance(DetkitAssertionError):
    """A row's result depended on the batch it was computed in."""


class Nondeterminism(DetkitAssertionError):
    """Repeated runs of the same computation gave different bits."""


class BitwiseMismatch(DetkitAssertionError):
    """Two results that must be bitwise equal are not."""


class UlpMismatch(DetkitAssertionError):
    """Two results are further apart than the allowed number of ULPs."""


def _finish(result: CheckResult, error: type[DetkitAssertionError] | None) -> CheckResult:
    __tracebackhide__ = True
    if OBSERVERS:
        OBSERVERS[-1](result)
    if not result.passed:
        assert error is not None
        raise error(result)
    return result


def _fn_name(fn: Any) -> str:
    if isinstance(fn, (types.FunctionType, types.MethodType)):
        return fn.__qualname__
    if isinstance(fn, types.BuiltinFunctionType):  # torch.exp's qualname is _VariableFunctionsClass.exp
        return fn.__name__
    return getattr(fn, "__name__", None) or type(fn).__name__


def _worst(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _worst_text(worst: int | None) -> str:
    """The worst ULP of outputs that differ bitwise: 0 needs saying why."""
    if worst is None:
        return "-"
    if worst == 0:
        return "0 (the bits differ only in signs of zero, NaN payloads or NaN vs number)"
    return str(worst)


# ---------------------------------------------------------------------------- inputs


class _Inputs:
    """``x`` as given: one tensor/array, a tuple/list (``fn(*x)``) or a dict (``fn(**x)``).

    ``parts`` maps a key ("" for a single tensor, "0", "1", ... for a tuple, the names for
    a dict) to (tensor, its batch dim normalised to >= 0).
    """

    def __init__(self, kind: str, parts: dict[str, tuple[Any, int]], rows: int) -> None:
        self.kind, self.parts, self.rows = kind, parts, rows

    @classmethod
    def parse(cls, x: Any, dim: int, what: str) -> _Inputs:
        if V.is_array(x):
            kind, given = "single", {"": x}
        elif isinstance(x, Mapping):
            kind, given = "kwargs", dict(x)
        elif isinstance(x, (tuple, list)):
            kind, given = "args", {str(i): p for i, p in enumerate(x)}
        else:
            raise InputError(
                f"{what} must be a torch tensor, a numpy array, or a tuple/list/dict of them "
                f"(passed to fn as fn(*x) / fn(**x)); got {type(x).__name__}"
            )
        if not given:
            raise InputError(f"{what} is empty; pass at least one tensor or array")
        parts: dict[str, tuple[Any, int]] = {}
        for key, part in given.items():
            label = what if kind == "single" else f"{what}[{key!r}]"
            if not V.is_array(part):
                raise InputError(f"{label} is a {type(part).__name__}; expected a torch tensor or numpy array")
            parts[key] = (part, V.check_dim(part, dim, label))
        rows = {V.shape_of(p)[d] for p, d in parts.values()}
        if len(rows) != 1:
            raise InputError(f"the parts of {what} have different sizes along dim={dim}: {sorted(rows)}")
        return cls(kind, parts, rows.pop())

    def concat(self, other: _Inputs) -> _Inputs:
        """These rows followed by ``other``'s (the pool batches are drawn from)."""
        if other.kind != self.kind or list(other.parts) != list(self.parts):
            raise InputError("other must have the same structure as x (same tuple length / dict keys)")
        merged: dict[str, tuple[Any, int]] = {}
        for key, (a, d) in self.parts.items():
            b = other.parts[key][0]
            sa, sb = list(V.shape_of(a)), list(V.shape_of(b))
            if len(sa) != len(sb) or sa[:d] + sa[d + 1 :] != sb[:d] + sb[d + 1 :] or V.dtype_name(a) != V.dtype_name(b):
                raise InputError(
                    f"other{'' if self.kind == 'single' else f'[{key!r}]'} is {V.dtype_name(b)}{sb}, "
                    f"which does not match x ({V.dtype_name(a)}{sa}) outside dim={d}"
                )
            merged[key] = (V.concat_rows(a, b, d), d)
        return _Inputs(self.kind, merged, self.rows + other.rows)

    def call(self, fn: Callable[..., Any], index: Sequence[int]) -> Any:
        """``fn`` applied to the rows ``index`` (fresh contiguous copies, in that order)."""
        picked = {k: V.take_rows(p, d, index) for k, (p, d) in self.parts.items()}
        if self.kind == "single":
            return fn(picked[""])
        if self.kind == "args":
            return fn(*picked.values())
        return fn(**picked)


def _plan(
    n: int, pool: int, b: int, positions: str | Sequence[int], rng: random.Random
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Batches to run for batch size ``b``: (pool indices, [(slot, checked row), ...]).

    Rows ``0..n-1`` are the rows of ``x`` (each has a batch-of-1 reference); indices
    ``n..pool-1`` are rows of ``other`` (fillers, not checked). Without ``other`` every
    slot holds a row of ``x`` and every slot is checked.
    """
    plans: list[tuple[list[int], list[tuple[int, int]]]] = []
    fillers = pool > n

    def fill() -> int:
        return rng.randrange(n, pool) if fillers else rng.randrange(n)

    def checked(idx: list[int]) -> list[tuple[int, int]]:
        return [(s, r) for s, r in enumerate(idx) if r < n]

    if positions == "random" and not fillers:
        # Each row once at a random position; the batch is topped up with random rows.
        order = rng.sample(range(n), n)
        for start in range(0, n, b):
            idx = order[start : start + b]
            idx += [fill() for _ in range(b - len(idx))]
            rng.shuffle(idx)
            plans.append((idx, checked(idx)))
        return plans
    if positions == "all" and not fillers:
        # Cyclic shifts: row i sits at slot j in batch (i - j) mod n, so n batches put
        # every row at every position.
        for k in range(n):
            idx = [(j + k) % n for j in range(b)]
            plans.append((idx, checked(idx)))
        return plans
    def slots() -> list[int]:
        if positions == "random":
            return [rng.randrange(b)]
        if positions == "all":
            return list(range(b))
        return sorted({p % b for p in positions if -b <= p < b})

    for row in range(n):
        for slot in slots():
            idx = [fill() for _ in range(b)]
            idx[slot] = row
            # With fillers from `other` only the placed row is checked.
            plans.append((idx, [(slot, row)] if fillers else checked(idx)))
    return plans


def _check_positions(positions: Any) -> str | list[int]:
    if isinstance(positions, str):
        if positions not in ("random", "all"):
            raise InputError(f"positions must be 'random', 'all' or a list of ints, got {positions!r}")
        return positions
    try:
        out = list(positions)
    except TypeError:
        raise InputError(f"positions must be 'random', 'all' or a list of ints, got {positions!r}") from None
    if not out or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) for p in out):
        raise InputError(f"positions must be 'random', 'all' or a non-empty list of ints, got {positions!r}")
    return [int(p) for p in out]


def _check_batch_sizes(batch_sizes: Any) -> list[int]:
    try:
        sizes = list(batch_sizes)
    except TypeError:
        raise InputError(f"batch_sizes must be a list of positive ints, got {batch_sizes!r}") from None
    if not sizes or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1 for b in sizes):
        raise InputError(f"batch_sizes must be a non-empty list of positive ints, got {batch_sizes!r}")
    if max(sizes) < 2:  # a check that compares nothing must not pass
        raise InputError(f"batch_sizes={sizes} compares rows only with themselves; include a batch size of 2 or "
                         "more (e.g. [1, 2, 3, 8, 64])")
    return sorted({int(b) for b in sizes})


def _rows_of_output(leaves: V.Leaves, out_dim: int, size: int, what: str) -> None:
    for path, leaf in leaves:
        label = f"{what}{path}"
        d = V.check_dim(leaf, out_dim, label)
        if V.shape_of(leaf)[d] != size:
            raise InputError(
                f"{label} has shape {V.shape_of(leaf)} for a batch of {size}; expected size {size} "
                f"along out_dim={out_dim}. Return per-row results (pass out_dim= if the batch "
                "dimension of the output differs from dim)."
            )


# ---------------------------------------------------------------------------- checks


def assert_batch_invariant(
    fn: Callable[..., Any],
    x: Any,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    dim: int = 0,
    out_dim: int | None = None,
    positions: str | Sequence[int] = "random",
    seed: int = 0,
    other: Any = None,
    name: str | None = None,
) -> CheckResult:
    """Assert that each row of ``fn``'s result does not depend on the batch around it.

    Each row ``x[i]`` (along ``dim``) is computed alone, as a batch of 1: that is the
    reference. Then, for every batch size ``b``, every row is placed in batches of ``b``
    rows and the matching rows of the output must be bitwise equal to the references.

    ``positions``: ``"random"`` (default) puts each row at a random position (batches are
    filled with the other rows of ``x``, so every slot is checked); ``"all"`` puts every
    row at every position; a list of ints puts every row at those positions (negative
    ones count from the end; positions beyond ``b`` are skipped). ``other``: rows (same
    structure as ``x``) used only as batch fillers; then each checked row sits alone
    among them. ``x`` may be a tuple/list (``fn(*x)``) or dict (``fn(**x)``) whose parts
    share the batch dimension. ``seed`` fixes the placements.

    A check that could not fail is an ``InputError``: one row without ``other`` (batches
    of its copies), outputs without elements, nothing compared. Row 0 is computed alone
    twice first; if the two differ the verdict is NONDETERMINISTIC, not BATCH-VARIANT.
    """
    __tracebackhide__ = True
    if not callable(fn):
        raise InputError(f"fn must be callable, got {type(fn).__name__}")
    sizes = _check_batch_sizes(batch_sizes)
    where = _check_positions(positions)
    inputs = _Inputs.parse(x, dim, "x")
    n = inputs.rows
    if n == 0:
        raise InputError(f"x has no rows along dim={dim}; pass at least one row")
    if n == 1 and other is None:  # every batch would be copies of one row: rows that mix would pass
        raise InputError(
            f"x has 1 row along dim={dim}, so every batch would hold copies of it and a function that mixes "
            "rows would still pass; pass several different rows, or filler rows with other="
        )
    pool = inputs if other is None else inputs.concat(_Inputs.parse(other, dim, "other"))
    if other is not None and pool.rows == n:
        raise InputError("other has no rows along dim; pass filler rows or leave other=None")
    odim = dim if out_dim is None else out_dim
    label = name or _fn_name(fn)
    rng = random.Random(seed)

    refs: list[V.Leaves] = []
    for i in range(n):
        leaves = V.flatten(pool.call(fn, [i]), "fn(x[i])")
        if not leaves:
            raise InputError("fn returned nothing to compare (None or an empty structure)")
        _rows_of_output(leaves, odim, 1, f"fn(row {i})")
        if not any(int(np.prod(V.shape_of(leaf))) for _, leaf in leaves):
            raise InputError(f"fn(row {i}) has no elements to compare (every output is empty)")
        refs.append([(p, V.snapshot(leaf)) for p, leaf in leaves])
    # A row that differs from itself alone is nondeterminism, not batch variance: say so.
    again = V.flatten(pool.call(fn, [0]), "fn(x[0])")
    changed = [(leaf, ref) for (_, leaf), (_, ref) in zip(again, refs[0]) if not V.same_bits(leaf, ref)]
    if changed:
        text, ulp, info = V.describe(changed[0][0], changed[0][1], ("first call", "second call"))
        message = "\n".join([
            f"NONDETERMINISTIC: {label}: row 0 computed alone twice gave different bits, so batch invariance "
            "cannot be assessed (dropout in train mode? an unseeded random draw?):", text, HINT_NONDET])
        return _finish(CheckResult("batch_invariant", "NONDETERMINISTIC", ulp, label,
                                   {"fn": _fn_name(fn), "rows": n, "first_difference": info}, message), Nondeterminism)

    per_b: dict[int, dict[str, Any]] = {}
    first: dict[str, Any] | None = None
    first_text = ""
    checked_total = differing_total = 0
    ulps: list[int | None] = []
    for b in sizes:
        stats = {"placements": 0, "differing": 0, "rows_differing": 0, "max_ulp": None}
        bad_rows: set[int] = set()
        for idx, slots in _plan(n, pool.rows, b, where, rng):
            leaves = V.flatten(pool.call(fn, idx), "fn(batch)")
            if [p for p, _ in leaves] != [p for p, _ in refs[0]]:
                raise InputError(
                    f"fn returned outputs {[p for p, _ in leaves]} for a batch of {b} but "
                    f"{[p for p, _ in refs[0]]} for one row; it must return the same structure"
                )
            _rows_of_output(leaves, odim, b, "fn(batch)")
            for slot, row in slots:
                stats["placements"] += 1
                differs = False
                for (path, leaf), (_, ref) in zip(leaves, refs[row]):
                    got = V.row_of(leaf, V.check_dim(leaf, odim, "output"), slot)
                    if V.same_bits(got, ref):
                        continue
                    differs = True
                    if first is None:
                        text, ulp, info = V.describe(got, ref, ("alone (b=1)", f"in batch (b={b})"))
                        first = {"batch_size": b, "position": slot, "row": row, "output": path, "diff": info}
                        first_text = (
                            f"First difference: row {row} of x at position {slot} of a batch of {b}"
                            + (f", output {path}" if path else "")
                            + f":\n{text}"
                        )
                    else:
                        ulp = V.max_ulp(got, ref)
                    stats["max_ulp"] = _worst([stats["max_ulp"], ulp])
                if differs:
                    stats["differing"] += 1
                    bad_rows.add(row)
        stats["rows_differing"] = len(bad_rows)
        per_b[b] = stats
        checked_total += stats["placements"]
        differing_total += stats["differing"]
        ulps.append(stats["max_ulp"])

    if checked_total == 0:
        raise InputError(f"nothing was compared: positions {where} lie beyond every batch size {sizes}; "
                         "pass positions smaller than the largest batch size, or positions='random'")
    worst = _worst(ulps) if differing_total else 0
    detail = {
        "fn": _fn_name(fn),
        "rows": n,
        "batch_sizes": sizes,
        "positions": where,
        "seed": seed,
        "fillers": pool.rows - n,
        "placements_checked": checked_total,
        "placements_differing": differing_total,
        "per_batch_size": {str(b): s for b, s in per_b.items()},
        "first_difference": first,
    }
    if not differing_total:
        message = (
            f"{label}: batch invariant over {checked_total} placements of {n} rows "
            f"(batch sizes {sizes})"
        )
        return _finish(CheckResult("batch_invariant", "PASS", 0, label, detail, message), None)
    bad_sizes = [b for b in sizes if per_b[b]["differing"]]
    rows = [("batch size", "placements", "differing", "rows differing", "max ULP")] + [
        (
            str(b),
            str(s["placements"]),
            str(s["differing"]),
            f"{s['rows_differing']}/{n}",
            "-" if s["max_ulp"] is None else str(s["max_ulp"]),
        )
        for b, s in per_b.items()
    ]
    message = "\n".join(
        [
            f"BATCH-VARIANT: {label}: {differing_total} of {checked_total} placements "
            f"({V.share(differing_total, checked_total, 0)}) differ bitwise from the row computed alone; "
            f"batch sizes with differences: {bad_sizes}; worst ULP {_worst_text(worst)}.",
            *V.table(rows),
            first_text,
            HINT_BATCH,
        ]
    )
    return _finish(CheckResult("batch_invariant", "BATCH-VARIANT", worst, label, detail, message), BatchVariance)


def _compare_runs(
    runs: list[V.Leaves], labels: Sequence[str], what: str
) -> tuple[list[int], str, int | None, dict[str, Any] | None]:
    """Compare every run's leaves with run 0's.

    Returns (indices of differing runs, text about the first difference, worst ULP over all
    differing runs, JSON detail of the first difference).
    """
    base = runs[0]
    differing: list[int] = []
    text, info = "", None
    ulps: list[int | None] = []
    for k, leaves in enumerate(runs[1:], start=1):
        paths0, paths = [p for p, _ in base], [p for p, _ in leaves]
        if paths0 != paths:
            differing.append(k)
            if not text:
                text = f"{labels[k]} returned outputs {paths}, {labels[0]} returned {paths0}"
                info = {"run": k + 1, "outputs": [paths0, paths]}
            continue
        for (path, a), (_, ref) in zip(leaves, base):
            if V.same_bits(a, ref):
                continue
            if not differing or differing[-1] != k:
                differing.append(k)
            if text:  # every differing output counts in the worst ULP, not only the first
                ulps.append(V.max_ulp(a, ref))
                continue
            t, ulp, d = V.describe(a, ref, (labels[0], labels[k]))
            ulps.append(ulp)
            where = f" in {(what + path).strip()}" if (what + path).strip() else ""
            text = f"{labels[k]} differs from {labels[0]}{where}:\n{t}"
            info = {"run": k + 1, "output": path, "diff": d}  # 1-based, as in the message and runs_differing
    return differing, text, _worst(ulps), info


def assert_deterministic(
    fn: Callable[..., Any],
    *args: Any,
    runs: int = 5,
    restore_rng: bool = True,
    name: str | None = None,
    **kwargs: Any,
) -> CheckResult:
    """Assert that ``fn(*args, **kwargs)`` gives bitwise identical results ``runs`` times.

    The global RNG states (Python, numpy, torch) are restored before each run, so that
    code drawing from a seeded global generator is compared with the same draws and only
    genuine nondeterminism is reported; ``restore_rng=False`` counts RNG consumption as
    nondeterminism too. A failure is never retried.
    """
    __tracebackhide__ = True
    if not callable(fn):
        raise InputError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise InputError(f"runs must be an int >= 2 (two runs at least are compared), got {runs!r}")
    label = name or _fn_name(fn)
    state = V.RngStates() if restore_rng else None
    outputs: list[V.Leaves] = []
    for k in range(runs):
        if state is not None and k:
            state.restore()
        leaves = V.flatten(fn(*args, **kwargs), "fn(...)")
        if not leaves:
            raise InputError("fn returned nothing to compare (None or an empty structure)")
        outputs.append([(p, V.snapshot(leaf)) for p, leaf in leaves])
    labels = [f"run {k + 1}" for k in range(runs)]
    differing, text, worst, info = _compare_runs(outputs, labels, "output ")
    distinct = len({tuple((p, V.digest(leaf)) for p, leaf in out) for out in outputs})
    detail = {"fn": _fn_name(fn), "runs": runs, "restore_rng": restore_rng, "distinct_results": distinct,
              "runs_differing": [k + 1 for k in differing], "first_difference": info}
    if not differing:
        message = f"{label}: {runs} runs bitwise identical"
        return _finish(CheckResult("deterministic", "PASS", 0, label, detail, message), None)
    message = "\n".join(
        [
            f"NONDETERMINISTIC: {label}: {distinct} distinct results in {runs} runs "
            f"({len(differing)} of {runs - 1} reruns differ from run 1); worst ULP {_worst_text(worst)}.",
            text,
            HINT_NONDET,
        ]
    )
    return _finish(CheckResult("deterministic", "NONDETERMINISTIC", worst, label, detail, message), Nondeterminism)


def _pairwise(
    actual: Any, expected: Any, max_ulp: int | None
) -> tuple[int, int, list[str], int | None, list[dict[str, Any]], int, int, int]:
    """Compare two structures leaf by leaf: (leaves, failing leaves, texts, worst ULP,
    details, leaves whose dtype or shape differs, NaN-vs-number elements, failing
    integer leaves of the expected dtype and shape)."""
    la, le = V.flatten(actual, "actual"), V.flatten(expected, "expected")
    pa, pe = [p for p, _ in la], [p for p, _ in le]
    if pa != pe:
        raise InputError(f"actual has outputs {pa} but expected has {pe}; compare matching structures")
    if not la:  # a check that compares nothing must not pass
        raise InputError("actual and expected hold nothing to compare (None or empty structures); "
                         "pass the tensors you mean to compare")
    texts: list[str] = []
    details: list[dict[str, Any]] = []
    ulps: list[int | None] = []
    failing = kind = nans = ints = 0
    for (path, a), (_, e) in zip(la, le):
        same_kind = V.dtype_name(a) == V.dtype_name(e) and V.shape_of(a) == V.shape_of(e)
        kind += not same_kind
        if V.same_bits(a, e):
            ulps.append(0 if V.is_float(a) else None)
            continue
        text, ulp, info = V.describe(a, e, ("expected", "actual"), max_ulp=max_ulp)
        ulps.append(ulp)
        nans += int(info.get("nan_mismatches") or 0)
        over = not same_kind or ulp is None or (max_ulp is None) or bool(info.get("num_over_max_ulp"))
        if not over:
            continue
        failing += 1
        ints += same_kind and not V.is_float(a)
        if len(texts) < 3:
            texts.append((f"{path}: " if path else "") + text)
        details.append({"output": path, "diff": info})
    return len(la), failing, texts, _worst(ulps), details, kind, nans, ints


def _pair_message(status: str, label: str, kind: int, total: int, headline: str, texts: list[str], hint: str) -> str:
    """The failure message of a pairwise check; another dtype or shape gets its own headline and hint."""
    if kind:
        headline, hint = f"{kind} of {total} outputs have another dtype or shape than expected.", HINT_KIND
    return "\n".join([f"{status}: {label}: {headline}", *texts, hint])


def assert_bitwise_equal(actual: Any, expected: Any, *, name: str | None = None) -> CheckResult:
    """Assert that two tensors/arrays (or structures of them) have the same dtype, shape and bits."""
    __tracebackhide__ = True
    total, failing, texts, worst, details, kind, _, _ = _pairwise(actual, expected, None)
    label = name or "assert_bitwise_equal"
    detail = {"outputs": total, "outputs_differing": failing, "differences": details}
    if not failing:
        return _finish(CheckResult("bitwise_equal", "PASS", 0, label, detail, f"{label}: bitwise equal"), None)
    message = _pair_message("MISMATCH", label, kind, total,
                            f"{failing} of {total} outputs differ bitwise; worst ULP {_worst_text(worst)}.",
                            texts, HINT_BITWISE)
    return _finish(CheckResult("bitwise_equal", "MISMATCH", worst, label, detail, message), BitwiseMismatch)


def assert_ulp_close(actual: Any, expected: Any, max_ulp: int = 2, *, name: str | None = None) -> CheckResult:
    """Assert that every element of ``actual`` is within ``max_ulp`` ULPs of ``expected``.

    Same dtype and shape are required; NaN matches NaN, NaN vs a number fails, ``+0`` and
    ``-0`` are 0 ULP apart; integer outputs must match exactly.
    """
    __tracebackhide__ = True
    if isinstance(max_ulp, bool) or not isinstance(max_ulp, int) or max_ulp < 0:
        raise InputError(f"max_ulp must be an int >= 0, got {max_ulp!r}")
    total, failing, texts, worst, details, kind, nans, ints = _pairwise(actual, expected, max_ulp)
    label = name or "assert_ulp_close"
    detail = {"max_ulp": max_ulp, "outputs": total, "outputs_failing": failing, "differences": details}
    if not failing:
        message = f"{label}: within {max_ulp} ULP (worst {worst})"
        return _finish(CheckResult("ulp_close", "PASS", worst, label, detail, message), None)
    if ints == failing:  # no ULP bound applies: neither "more than max_ulp" nor "raise max_ulp" would be true
        headline, hint = (f"{failing} of {total} outputs differ; they hold integers, and integer outputs must "
                          "match exactly (ULP distances apply to floating outputs)."), HINT_INT
    else:
        headline, hint = (f"{failing} of {total} outputs are more than {max_ulp} ULP from the expected values; "
                          f"worst ULP {'-' if worst is None else worst}"
                          + (f" among numbers, and {nans} NaN vs number" if nans else "")
                          + (f"; {ints} of them hold integers, which must match exactly." if ints else ".")), HINT_ULP
    message = _pair_message("ULP-EXCEEDED", label, kind, total, headline, texts, hint)
    return _finish(CheckResult("ulp_close", "ULP-EXCEEDED", worst, label, detail, message), UlpMismatch)


def assert_generation_invariant(
    model: Any,
    prompts: Any,
    batch_sizes: Sequence[int] = (1, 4, 8),
    *,
    max_new_tokens: int = 8,
    tokenizer: Any = None,
    seed: int = 0,
    name: str | None = None,
    padding_side: str | None = None,
) -> CheckResult:
    """Assert that greedy generation of each prompt is the same alone and inside batches.

    ``model``: a Hugging Face causal LM (anything taking ``input_ids``,
    ``attention_mask``, ``position_ids``, ``use_cache`` and ``cache`` (transformers 5) or
    ``past_key_values``, and returning ``.logits`` and that cache), or an encoder-decoder
    model (``config.is_encoder_decoder``: T5, BART, Marian; ``get_encoder()``,
    ``encoder_outputs``, ``decoder_input_ids``). ``prompts``: a list of strings (with
    ``tokenizer``), a list of token-id lists, or a 2-D tensor of ids. Each prompt is
    generated alone (batch of 1, no padding) for ``max_new_tokens`` greedy steps; then, for
    every batch size, inside padded batches of random composition. Token ids and the
    logits of every step must be bitwise equal to the alone run. No early stop at EOS:
    every run takes the same number of steps. ``padding_side``: a causal LM's batches are
    padded on the left; an encoder-decoder's encoder inputs on the right unless
    ``padding_side="left"``.
    """
    __tracebackhide__ = True
    from detkit._testing_generation import check_generation

    result, error = check_generation(
        model, prompts, batch_sizes, max_new_tokens=max_new_tokens, tokenizer=tokenizer, seed=seed, name=name,
        padding_side=padding_side,
    )
    return _finish(result, BatchVariance if error else None)


def assert_trainer_matches_sampler(
    model: Any,
    prompts: Any,
    *,
    max_new_tokens: int = 8,
    sampler_batch_size: int | None = None,
    trainer_batch_sizes: Sequence[int] = (1, 3),
    padding_side: str = "right",
    train: bool = True,
    tokenizer: Any = None,
    seed: int = 0,
    name: str | None = None,
) -> CheckResult:
    """Assert that a trainer's forward reproduces, bitwise, the logits the sampler generated with.

    The RL check ("true on-policy": sampler-trainer KL exactly 0). The sampler greedily
    decodes ``max_new_tokens`` tokens for every prompt through the KV cache, in left-padded
    batches of ``sampler_batch_size`` (default: all prompts in one batch), without
    autograd, in eval mode. The trainer then scores every prompt + completion with one
    teacher-forced forward per batch, for each of ``trainer_batch_sizes`` (batches of
    random composition, ``padding_side``-padded), with autograd recording and, with
    ``train=True``, in train mode (dropout must be 0). The logits that predicted each
    completion token must be bitwise equal on both sides. The model's train/eval state is
    restored afterwards. ``model`` and ``prompts``: as for
    :func:`assert_generation_invariant`.

    A failure (:class:`BitwiseMismatch`) reports how many steps differ, the sampler-trainer
    KL (mean and max, nats), the largest gap in the sampled token's log-probability, the
    worst ULP, per trainer batch size, and the first differing step.
    """
    __tracebackhide__ = True
    from detkit._testing_policy import check_sampler_trainer

    result, error = check_sampler_trainer(
        model, prompts, max_new_tokens=max_new_tokens, sampler_batch_size=sampler_batch_size,
        trainer_batch_sizes=trainer_batch_sizes, padding_side=padding_side, train=train,
        tokenizer=tokenizer, seed=seed, name=name,
    )
    return _finish(result, BitwiseMismatch if error else None)
