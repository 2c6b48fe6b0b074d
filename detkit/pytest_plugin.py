"""detkit's pytest plugin: options, markers, the ``detkit`` fixture, summary and report.

Registered through the ``pytest11`` entry point, so it is loaded in every pytest run
(``pytest -p no:detkit`` turns it off). It imports nothing heavy at import time: torch,
numpy and the rest of detkit are imported inside hooks, and only when a test or an
option asks for them.

- ``--detkit-mode=off|batch-invariant|portable``: every test (setup, body, teardown) runs
  under ``detkit.batch_invariant(portable=...)``.
- ``--detkit-report=PATH``: a JSON report (``detkit.report`` conventions, kind
  ``"pytest"``) of every detkit check and record, with the environment fingerprint.
- markers ``batch_invariant``, ``portable`` (the test body runs under the mode) and
  ``deterministic(runs=N)`` (the body runs N times; its return values and
  ``detkit.record``s must be bitwise equal; a differing run fails as NONDETERMINISTIC).
- the ``detkit`` fixture (:class:`detkit._testing_fixture.DetkitFixture`).

Checks reach the plugin through ``detkit._testing_observers``; they travel to the
controlling process as an attribute of the test reports, so pytest-xdist runs are
summarised and reported too.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Generator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from detkit._testing_observers import OBSERVERS

MODES = ("off", "batch-invariant", "portable")
DEFAULT_RUNS = 3
_PLUGIN_NAME = "detkit-session"
_REPORT_ATTR = "detkit_entries"  # entries attached to TestReport objects (survive xdist)
_MARKERS = (
    "batch_invariant(portable=False, strict=False): run the test body under detkit.batch_invariant() (detkit)",
    "portable(strict=False): run the test body under detkit.batch_invariant(portable=True), the same bits on "
    "every device (detkit)",
    f"deterministic(runs={DEFAULT_RUNS}, restore_rng=True): run the test body `runs` times (global RNG states "
    "restored before each) and require its return values and detkit.record()s to be bitwise identical; a "
    "differing run fails as NONDETERMINISTIC, never retried (detkit)",
)
_MARKER_NAMES = ("batch_invariant", "portable", "deterministic")
_SUMMARY_ROWS = 30


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("detkit", "detkit: determinism and batch invariance")
    group.addoption(
        "--detkit-mode",
        action="store",
        dest="detkit_mode",
        choices=MODES,
        default="off",
        help="run every test (setup, body, teardown) under detkit.batch_invariant(); "
        "'portable' adds portable=True (same bits on every device). Default: off.",
    )
    group.addoption(
        "--detkit-report",
        action="store",
        dest="detkit_report",
        metavar="PATH",
        default=None,
        help="write a JSON report of every detkit check and record, with the environment "
        "fingerprint, to PATH (rewritten atomically as tests finish). Default: no report.",
    )


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    config.pluginmanager.register(DetkitSession(config), _PLUGIN_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if isinstance(session, DetkitSession):
        session.close()
        config.pluginmanager.unregister(session, _PLUGIN_NAME)


@pytest.fixture
def detkit(request: pytest.FixtureRequest) -> Any:
    """detkit.testing's assertions plus ``record(name, value)``, ``check_generation(...)`` and
    ``check_sampler_trainer(...)``;
    every check is listed in the detkit summary and the --detkit-report file."""
    from detkit._testing_fixture import DetkitFixture

    session = request.config.pluginmanager.get_plugin(_PLUGIN_NAME)
    assert isinstance(session, DetkitSession)
    return DetkitFixture(request.node.nodeid, session.sink)


def _mode_marker_args(marker: pytest.Mark) -> tuple[bool, bool]:
    """(portable, strict) of a ``batch_invariant`` or ``portable`` marker, validated: a
    misspelt argument must not leave the test running under another mode than asked."""
    from detkit.errors import InputError

    allowed = ("strict",) if marker.name == "portable" else ("portable", "strict")
    unknown = set(marker.kwargs) - set(allowed)
    if marker.args or unknown or any(not isinstance(v, bool) for v in marker.kwargs.values()):
        raise InputError(
            f"@pytest.mark.{marker.name} takes only {', '.join(f'{a}=True/False' for a in allowed)}, "
            f"got args {marker.args} and kwargs {marker.kwargs}"
        )
    return marker.name == "portable" or marker.kwargs.get("portable", False), marker.kwargs.get("strict", False)


def _is_unittest(item: pytest.Item) -> bool:
    import unittest

    cls = getattr(item, "cls", None)
    return isinstance(cls, type) and issubclass(cls, unittest.TestCase)


def _marker_args(marker: pytest.Mark) -> tuple[int, bool]:
    """(runs, restore_rng) of a ``deterministic`` marker, validated."""
    from detkit.errors import InputError

    runs = marker.kwargs.get("runs", marker.args[0] if marker.args else DEFAULT_RUNS)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise InputError(f"@pytest.mark.deterministic(runs=...) needs an int >= 2, got {runs!r}")
    restore_rng = marker.kwargs.get("restore_rng", True)
    if not isinstance(restore_rng, bool):
        raise InputError(f"@pytest.mark.deterministic(restore_rng=...) takes a bool, got {restore_rng!r}")
    unknown = set(marker.kwargs) - {"runs", "restore_rng"}
    if unknown or len(marker.args) > 1 or (marker.args and "runs" in marker.kwargs):  # (5, runs=3): which?
        raise InputError(f"@pytest.mark.deterministic takes runs= and restore_rng= only, got {marker.args}, {marker.kwargs}")
    return runs, restore_rng


class DetkitSession:
    """Per-session state: the mode, the report writer, and the checks seen so far."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.mode: str = config.getoption("detkit_mode", "off") or "off"
        self.report_path: str | None = config.getoption("detkit_report", None)
        self.is_worker = hasattr(config, "workerinput")  # pytest-xdist worker
        self.current: str | None = None
        self.run: int | None = None  # 1-based run number inside @pytest.mark.deterministic
        self.pending: list[dict[str, Any]] = []
        self.entries: list[dict[str, Any]] = []
        self.touched: set[str] = set()  # tests that ran a detkit check or carry a detkit marker
        self.writer: Any = None
        self._write_failed = False
        if self.mode != "off":
            try:
                from detkit.mode import batch_invariant  # noqa: F401
            except Exception as exc:
                raise pytest.UsageError(
                    f"--detkit-mode={self.mode}: detkit.batch_invariant is unavailable here "
                    f"({type(exc).__name__}: {exc}); run with --detkit-mode=off"
                ) from exc
        if self.report_path and not self.is_worker:
            from detkit.report import ReportWriter

            try:
                self.writer = ReportWriter(
                    "pytest",
                    {
                        "mode": self.mode,
                        "args": [str(a) for a in config.invocation_params.args],
                        "rootdir": str(config.rootpath),
                    },
                    # Resolved now: a test that changes directory must not move the report.
                    config.invocation_params.dir / self.report_path,
                )
            except OSError as exc:
                raise pytest.UsageError(f"--detkit-report={self.report_path}: cannot write the report ({exc})") from exc
        OBSERVERS.append(self._observe)

    def close(self) -> None:
        if self._observe in OBSERVERS:
            OBSERVERS.remove(self._observe)

    # ------------------------------------------------------------------ collecting

    def _observe(self, result: Any) -> None:
        self.sink({"type": "check", **result.to_dict()})

    def sink(self, entry: dict[str, Any]) -> None:
        """Take one check/record entry; entries of a running test travel with its report."""
        entry = {"test": self.current or "<outside tests>", **entry}
        if self.run is not None:
            entry["run"] = self.run
        if self.current is None:
            self._consume([entry])
        else:
            self.pending.append(entry)

    def _consume(self, entries: list[dict[str, Any]]) -> None:
        self.entries.extend(entries)
        if self.writer is None or self._write_failed:
            return
        # One atomic rewrite per test report, not per entry: a hypothesis test can make
        # hundreds of checks.
        self.writer.data["results"].extend(entries)
        try:
            self.writer.flush()
        except (OSError, TypeError, ValueError) as exc:  # a report problem must not fail the tests
            self._write_failed = True
            warnings.warn(pytest.PytestWarning(f"detkit: could not update {self.report_path}: {exc}"), stacklevel=1)

    # ------------------------------------------------------------------ hooks

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
        self.current = item.nodeid
        try:
            return (yield)
        finally:
            self.current = None

    @contextmanager
    def _modes(self, item: pytest.Item, when: str) -> Iterator[None]:
        """Run one test phase under the suite mode and, for the body, the marker's mode.

        Afterwards the calls that fell back to torch (ops the kernels did not cover) are
        recorded: a test that passes under the mode with uncovered ops is no proof.
        """
        __tracebackhide__ = True
        marker = None
        if when == "call":
            # the closest of the two (iter_markers starts at the function): a function's own
            # batch_invariant(strict=True) is not overridden by a portable mark on its class
            marker = next((m for m in item.iter_markers() if m.name in ("portable", "batch_invariant")), None)
        if self.mode == "off" and marker is None:
            yield
            return
        from detkit.mode import batch_invariant

        contexts = []
        if self.mode != "off":
            contexts.append(batch_invariant(portable=self.mode == "portable"))
        if marker is not None:
            portable, strict = _mode_marker_args(marker)
            contexts.append(batch_invariant(portable=portable, strict=strict))
        try:
            with ExitStack() as stack:
                for ctx in contexts:
                    stack.enter_context(ctx)
                yield
        finally:
            # The outermost context saw every call of the phase.
            coverage = contexts[0].coverage()
            if coverage.routed or coverage.fell_back:
                self.sink(
                    {
                        "type": "mode",
                        "when": when,
                        "portable": contexts[-1].portable,
                        "routed": sum(coverage.routed.values()),
                        "fell_back": coverage.fell_back,
                        # portable: routed calls computed by torch's math library (bits may change with the CPU)
                        "not_portable": coverage.not_portable,
                    }
                )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, object]:
        __tracebackhide__ = True
        if item.get_closest_marker("deterministic") is not None and _is_unittest(item):
            from detkit.errors import InputError

            # pytest hands unittest methods to unittest, which the rerun hook never sees:
            # the marker would silently do nothing.
            raise InputError(f"@pytest.mark.deterministic cannot rerun the unittest.TestCase method {item.nodeid}; "
                             "write it as a plain test function, or call detkit.testing.assert_deterministic in it")
        with self._modes(item, "setup"):
            return (yield)

    @contextmanager
    def _body_leaves_mode_as_found(self, item: pytest.Item) -> Iterator[None]:
        """Restore the mode a test body changed without restoring it (``detkit.mode.enable()``
        then a failure before ``disable()``, a context entered and never exited): left on, it
        would run every later test of the process under the mode, so verdicts would depend on
        test order and, under xdist, on which worker ran what. Only the body: fixtures may
        turn the mode on for a whole session on purpose."""
        mode = sys.modules.get("detkit.mode")  # not imported yet: the mode is off (and stays unimported)
        before = mode.state() if mode is not None else None
        try:
            yield
        finally:
            mode = sys.modules.get("detkit.mode")
            if mode is not None and mode.state() != (before or mode.ModeState()):
                after = mode.state()
                if before is not None and before.enabled:
                    mode.enable(before.portable, strict=before.strict)
                else:
                    mode.disable()
                warnings.warn(
                    pytest.PytestWarning(
                        f"detkit: {item.nodeid} left detkit's mode {'on' if after.enabled else 'off'}; "
                        "restored for the next test. Use `with detkit.batch_invariant():` or a marker."
                    ),
                    stacklevel=1,
                )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        __tracebackhide__ = True
        with self._body_leaves_mode_as_found(item), self._modes(item, "call"):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
        __tracebackhide__ = True
        with self._modes(item, "teardown"):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        report = yield
        entries, self.pending = self.pending, []
        markers = sorted({m.name for m in item.iter_markers() if m.name in _MARKER_NAMES})
        touched = entries or markers or item.nodeid in self.touched or _failed_verdict(call) is not None
        if touched:
            self.touched.add(item.nodeid)
        # One outcome per test: the call phase, or the phase that failed before/after it.
        if touched and (call.when == "call" or report.outcome != "passed"):
            outcome = report.outcome
            if hasattr(report, "wasxfail"):  # an expected failure is not a failing test
                outcome = "xfailed" if report.skipped else "xpassed"
            entries.append(
                {
                    "type": "test",
                    "test": item.nodeid,
                    "when": call.when,
                    "outcome": outcome,
                    "failed_check": _failed_verdict(call),
                    "markers": markers,
                }
            )
        if entries:
            setattr(report, _REPORT_ATTR, entries)
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entries = getattr(report, _REPORT_ATTR, None)
        if entries:
            self._consume(list(entries))

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> object | None:
        marker = pyfuncitem.get_closest_marker("deterministic")
        if marker is None:
            return None
        __tracebackhide__ = True
        from detkit._testing_deterministic import run_deterministic

        runs, restore_rng = _marker_args(marker)
        try:
            run_deterministic(pyfuncitem, runs, self, restore_rng=restore_rng)
        finally:
            self.run = None
        return True

    def pytest_report_header(self, config: pytest.Config) -> list[str] | None:
        if self.mode == "off" and not self.report_path:
            return None
        return [f"detkit: mode {self.mode}" + (f", report {self.report_path}" if self.report_path else "")]

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.writer is None:
            return
        # -x/--maxfail/--sw stop the session with tests left unrun (xdist's controller then
        # exits INTERRUPTED; plain pytest with TESTS_FAILED and shouldfail/shouldstop set).
        stopped = bool(session.shouldfail or session.shouldstop)
        interrupted = exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR)
        try:
            self.writer.finish(self.summary(exitstatus), partial=stopped or interrupted)
        except (OSError, TypeError, ValueError) as exc:
            warnings.warn(pytest.PytestWarning(f"detkit: could not finish {self.report_path}: {exc}"), stacklevel=1)

    # ------------------------------------------------------------------ summary

    def checks(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("type") == "check"]

    def summary(self, exitstatus: int | None = None) -> dict[str, Any]:
        checks = self.checks()
        ulps = [c["worst_ulp"] for c in checks if c.get("worst_ulp") is not None]
        return {
            "checks": len(checks),
            "passed": sum(1 for c in checks if c["passed"]),
            "failed": sum(1 for c in checks if not c["passed"]),
            "verdicts": dict(Counter(c["verdict"] for c in checks)),
            "worst_ulp": max(ulps) if ulps else None,
            "records": sum(1 for e in self.entries if e.get("type") == "record"),
            "tests_with_uncovered_ops": len(self.uncovered()),
            "mode": self.mode,
            "exitstatus": None if exitstatus is None else int(exitstatus),
        }

    def uncovered(self) -> dict[str, Counter[str]]:
        """Per test: calls of overridden ops that ran torch's kernel while the mode was on."""
        out: dict[str, Counter[str]] = {}
        for e in self.entries:
            if e.get("type") == "mode" and e["fell_back"]:
                counts = out.setdefault(e["test"], Counter())
                for op, reasons in e["fell_back"].items():
                    counts[op] += sum(reasons.values())
        return out

    def tests(self) -> dict[str, dict[str, Any]]:
        """Per test: outcome, number of checks, verdict counts, worst ULP (first-seen order)."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.entries:
            t = out.setdefault(e["test"], {"outcome": "-", "failed_check": None, "checks": 0, "verdicts": Counter(), "worst_ulp": None})
            if e.get("type") == "check":
                t["checks"] += 1
                t["verdicts"][e["verdict"]] += 1
                if e.get("worst_ulp") is not None:
                    t["worst_ulp"] = max(t["worst_ulp"] or 0, e["worst_ulp"])
            elif e.get("type") == "test" and (t["outcome"] in ("-", "passed") or e["outcome"] != "passed"):
                t["outcome"] = e["outcome"]
                t["failed_check"] = t["failed_check"] or e.get("failed_check")
        return out

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        tests = {k: v for k, v in self.tests().items() if v["checks"] or v["failed_check"]}
        if not tests and not self.uncovered() and self.mode == "off" and not self.report_path:
            return
        tr = terminalreporter
        tr.write_sep("=", "detkit")
        # Failed tests first, then tests with a failing check (e.g. a negative control
        # inside pytest.raises), then the rest; -v lists every test.
        order = sorted(
            tests.items(),
            key=lambda kv: (kv[1]["outcome"] != "failed", set(kv[1]["verdicts"]) <= {"PASS"}),
        )
        shown = order if config.get_verbosity() >= 1 else order[:_SUMMARY_ROWS]
        if shown:
            rows = [("test", "outcome", "checks", "verdicts", "worst ULP")] + [
                (
                    nodeid,
                    t["outcome"] + (f" ({t['failed_check']})" if t["failed_check"] else ""),
                    str(t["checks"]),
                    ", ".join(f"{n} {v}" for v, n in sorted(t["verdicts"].items(), key=lambda vn: vn[0] == "PASS")),
                    "-" if t["worst_ulp"] is None else str(t["worst_ulp"]),
                )
                for nodeid, t in shown
            ]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for i, row in enumerate(rows):
                cells = [c.rjust(w) if j in (2, 4) else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
                markup = {} if i == 0 else ({"red": True, "bold": True} if row[1].startswith("failed") else {"green": True})
                tr.write_line("  ".join(cells).rstrip(), **markup)
            if len(shown) < len(order):
                # Failed tests come first, but more than _SUMMARY_ROWS of them leave some out too.
                hidden_failed = sum(1 for _, t in order[len(shown):] if t["outcome"] == "failed")
                tr.write_line(f"... {len(order) - len(shown)} more tests"
                              + (f" ({hidden_failed} failed)" if hidden_failed else ", none failed")
                              + " (-v lists all)")
        s = self.summary()
        failed_tests = sum(1 for t in tests.values() if t["failed_check"] and t["outcome"] == "failed")
        failed = ", ".join(f"{n} {v}" for v, n in sorted(s["verdicts"].items()) if v != "PASS")
        line = (
            f"detkit: {s['checks']} checks in {len(tests)} tests: {s['passed']} passed, {s['failed']} failed"
            + (f" ({failed})" if failed else "")
            + f"; tests failing on a detkit check: {failed_tests}"
            + f"; worst ULP {'-' if s['worst_ulp'] is None else s['worst_ulp']}; mode {self.mode}"
        )
        if self.report_path and not self.is_worker:
            line += f"; report {self.report_path}"
        tr.write_line(line, **({"red": True} if failed_tests else {}))
        uncovered = self.uncovered()
        if uncovered:
            tr.write_line(
                f"detkit: in {len(uncovered)} tests under the mode, ops fell back to torch's kernels "
                "(no invariance guarantee for them):",
                yellow=True,
            )
            for nodeid, ops in list(uncovered.items())[: 5 if config.get_verbosity() < 1 else None]:
                tr.write_line(f"  {nodeid}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())), yellow=True)
            if len(uncovered) > 5 and config.get_verbosity() < 1:
                tr.write_line(f"  ... {len(uncovered) - 5} more (-v lists all)", yellow=True)


def _failed_verdict(call: pytest.CallInfo[None]) -> str | None:
    """The verdict when the phase failed on a detkit check ("INPUT-ERROR" when a detkit call
    refused its arguments), else None."""
    if call.excinfo is None:
        return None
    exc = call.excinfo.value
    if type(exc).__name__ == "InputError" and type(exc).__module__ == "detkit.errors":
        return "INPUT-ERROR"  # a detkit call refused its arguments: no check ran, and the summary says so
    verdict = getattr(getattr(exc, "result", None), "verdict", None)
    return verdict if isinstance(verdict, str) and type(exc).__module__ == "detkit.testing" else None


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
