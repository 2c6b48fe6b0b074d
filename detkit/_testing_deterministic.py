"""The ``@pytest.mark.deterministic(runs=N)`` rerun loop (called from the plugin's pyfunc hook)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from detkit import _testing_values as V
from detkit import testing as T
from detkit._testing_fixture import DetkitFixture
from detkit.errors import InputError


def run_deterministic(item: Any, runs: int, session: Any, *, restore_rng: bool = True) -> None:
    """Run the test function ``runs`` times with the same fixtures and compare the runs.

    Compared: the return value and everything recorded through the ``detkit`` fixture,
    bitwise. The global RNG states are restored before each rerun (unless ``restore_rng``
    is False), so seeded draws repeat.
    A rerun that differs (or fails while run 1 passed) raises ``Nondeterminism``; nothing is
    retried. A failure in run 1 is reported as the test's own failure.
    """
    __tracebackhide__ = True
    fn = item.obj
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise InputError(f"@pytest.mark.deterministic does not support async tests ({item.nodeid})")
    testargs = {arg: item.funcargs[arg] for arg in item._fixtureinfo.argnames}
    fixture = item.funcargs.get("detkit")
    if not isinstance(fixture, DetkitFixture):
        fixture = None
    state = V.RngStates() if restore_rng else None
    outputs: list[V.Leaves] = []
    label = item.name
    for k in range(runs):
        session.run = k + 1
        if k and state is not None:
            state.restore()
        if fixture is not None:  # run 1 too: records a fixture made once at setup belong to no run
            fixture._begin_rerun()
        try:
            returned = fn(**testargs)
        except (KeyboardInterrupt, SystemExit, pytest.exit.Exception):  # stopping the session is no run's result
            raise
        except BaseException as exc:  # pytest.fail/skip outcomes are BaseExceptions too
            if k == 0 or _timed_out(exc):
                raise
            session.run = None
            detail = {"runs": runs, "runs_completed": k, "failed_run": k + 1, "error": f"{type(exc).__name__}: {exc}"}
            message = "\n".join(
                [
                    f"NONDETERMINISTIC: {item.nodeid}: run {k + 1} of {runs} raised {type(exc).__name__} "
                    "while run 1 passed (same fixtures" + (", same RNG states):" if restore_rng else "):"),
                    f"  {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    T.HINT_NONDET,
                ]
            )
            T._finish(T.CheckResult("deterministic", "NONDETERMINISTIC", None, label, detail, message), T.Nondeterminism)
        if hasattr(returned, "__await__"):
            raise InputError(f"@pytest.mark.deterministic does not support async tests ({item.nodeid})")
        leaves = [(f"the return value{p}", V.snapshot(leaf)) for p, leaf in V.flatten(returned, "the return value")]
        if fixture is not None:
            for name, recorded in fixture.records.items():
                leaves += [(f"detkit.record({name!r}){p}", leaf) for p, leaf in recorded]
        if not leaves:
            raise InputError(
                f"@pytest.mark.deterministic: {item.nodeid} returned nothing and recorded nothing, so "
                "there is nothing to compare between runs; return the tensors to compare or call "
                "detkit.record(name, tensor) through the detkit fixture"
            )
        outputs.append(leaves)

    session.run = None  # the verdict belongs to the test, not to one run
    labels = [f"run {k + 1}" for k in range(runs)]
    differing, text, worst, info = T._compare_runs(outputs, labels, "")
    distinct = len({tuple((p, V.digest(leaf)) for p, leaf in out) for out in outputs})
    detail = {
        "runs": runs,
        "restore_rng": restore_rng,
        "compared": [p for p, _ in outputs[0]],
        "distinct_results": distinct,
        "runs_differing": [k + 1 for k in differing],
        "first_difference": info,
    }
    if not differing:
        message = f"{item.nodeid}: {runs} runs bitwise identical ({len(outputs[0])} outputs)"
        T._finish(T.CheckResult("deterministic", "PASS", 0, label, detail, message), None)
        return
    message = "\n".join(
        [
            f"NONDETERMINISTIC: {item.nodeid}: {distinct} distinct results in {runs} runs of the "
            f"same test ({len(differing)} of {runs - 1} reruns differ from run 1); worst ULP "
            f"{'-' if worst is None else worst}. Not retried: a differing rerun is the finding.",
            text,
            T.HINT_NONDET,
        ]
    )
    T._finish(T.CheckResult("deterministic", "NONDETERMINISTIC", worst, label, detail, message), T.Nondeterminism)


def _timed_out(exc: BaseException) -> bool:
    """pytest-timeout's limit (signal method: a ``pytest.fail`` raised in the body) covers all
    runs together; hitting it in a rerun is the test's own failure, not a differing run."""
    return isinstance(exc, pytest.fail.Exception) and str(exc).endswith("from pytest-timeout.")
