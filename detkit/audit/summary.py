"""Turn audit records into verdict counts, findings, ``--fail-on`` results and advice.

Works on the records of a saved report too (complete or partial), so that ``detkit
report`` can re-derive everything from the JSON alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from detkit.audit.vocab import CHECKS

FAILING = ("fail", "error")

# What each detkit mode promises (docs/architecture.md); a failure there is a detkit bug.
MODE_GUARANTEES = {
    "detkit": ("run-to-run", "batch-variance", "batch-position", "thread-variance", "padding", "decode-prefill"),
    "portable": CHECKS,
}

_PHRASES = {
    "run-to-run": "run-to-run nondeterministic (the same call gives different bits)",
    "batch-variance": "batch variant (a row's bits change with the batch size)",
    "batch-position": "position variant (a row's bits change with its place in the batch)",
    "thread-variance": "thread variant (bits change with the number of threads)",
    "padding": "padding variant (masked padding changes the bits of real tokens)",
    "decode-prefill": "decode/prefill variant (a decoded token differs from the same token in prefill)",
    "isa-variance": "ISA variant (bits change with ATEN_CPU_CAPABILITY, so with the CPU generation)",
}


def op_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report.get("results", []) if r.get("record") == "op"]


def impl_records(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report.get("results", []) if r.get("record") == "impl"]


def label(record: dict[str, Any]) -> str:
    return f"{record['op']} [{record['impl']}, {record['dtype']}]"


def fail_on_failures(records: Iterable[dict[str, Any]], checks: Iterable[str]) -> list[str]:
    """``"op [impl, dtype]: check (verdict)"`` for every record failing one of ``checks``.

    An error counts as a failure: a check that could not run has not shown the property.
    """
    wanted = list(checks)
    out = []
    for r in records:
        for check in wanted:
            verdict = r["checks"].get(check, {}).get("verdict")
            if verdict in FAILING:
                out.append(f"{label(r)}: {check} ({verdict})")
    return out


def fail_on_skipped(records: Iterable[dict[str, Any]], checks: Iterable[str]) -> dict[str, str]:
    """{check: why} for ``--fail-on`` checks that some record skipped (e.g. one thread).

    A skipped check never fails, so the gate passes without having measured it: say so.
    """
    out: dict[str, str] = {}
    for check in checks:
        for r in records:
            res = r["checks"].get(check, {})
            if res.get("verdict") == "skipped":
                out.setdefault(check, res.get("note") or "skipped")
    return out


def _names(ops: Iterable[str]) -> str:
    ops = list(dict.fromkeys(ops))
    return ", ".join(ops[:8]) + (f" and {len(ops) - 8} more" if len(ops) > 8 else "")


def _verdicts(records: list[dict[str, Any]], impl: str, check: str) -> dict[str, set[str]]:
    """{op: verdicts of ``check`` under ``impl`` over dtypes}."""
    out: dict[str, set[str]] = {}
    for r in records:
        if r["impl"] == impl:
            out.setdefault(r["op"], set()).add(r["checks"].get(check, {}).get("verdict", "n/a"))
    return out


def _covered(record: dict[str, Any]) -> bool:
    """Whether detkit's mode ran its own kernels for every overridden call of this record.

    Records without coverage data (older reports) count as covered.
    """
    cov = record.get("coverage")
    if cov is None:
        return True
    return bool(cov.get("routed")) and not cov.get("fell_back")


def uncovered_ops(records: list[dict[str, Any]], impl: str) -> dict[str, str]:
    """{op: why} for records of ``impl`` in which the mode did not run its own kernels."""
    out = {}
    for r in records:
        cov = r.get("coverage")
        if r["impl"] != impl or cov is None or _covered(r):
            continue
        if cov.get("fell_back"):
            out[r["op"]] = "fell back to torch: " + "; ".join(
                f"{op} ({', '.join(reasons)})" for op, reasons in cov["fell_back"].items())
        else:
            out[r["op"]] = "not overridden by the mode (torch's kernel ran)"
    return out


def advice(records: list[dict[str, Any]], impls: list[dict[str, Any]], device: str) -> list[str]:
    """Short lines on what to do about the findings, most important first."""
    lines: list[str] = []
    audited = {r["impl"] for r in records}
    unavailable = {i["impl"]: i["reason"] for i in impls if not i.get("available")}

    def fixed_by(impl: str, check: str, ops: list[str]) -> tuple[list[str], list[str]]:
        got = _verdicts(records, impl, check)
        good = [o for o in ops if got.get(o) == {"pass"}]
        bad = [o for o in ops if got.get(o) and got[o] & set(FAILING)]
        return good, bad

    def mode_hint(impl: str) -> str:
        if impl in unavailable:
            return f" (detkit's {impl} mode is unavailable here: {unavailable[impl]})"
        return f" (rerun with --impl torch,{impl} to measure detkit's mode)"

    for check in ("batch-variance", "batch-position", "padding", "decode-prefill"):
        torch_bad = sorted(o for o, v in _verdicts(records, "torch", check).items() if "fail" in v)
        if not torch_bad:
            continue

        def where(ops: list[str], check: str = check) -> str:
            if check != "batch-variance":
                return ""
            several = len({r["dtype"] for r in records}) > 1
            firsts: dict[str, int] = {}
            for r in records:
                b = r["checks"][check].get("first_b")
                if r["impl"] == "torch" and r["op"] in ops and b:
                    firsts[f"{r['op']} {r['dtype']}" if several else r["op"]] = b
            if not firsts:
                return ""
            return " (a row first changes at " + ", ".join(f"b={b} for {op}" for op, b in firsts.items()) + ")"

        if "detkit" in audited:
            good, bad = fixed_by("detkit", check, torch_bad)
            if good:
                lines.append(f"{_names(good)}: {_PHRASES[check]} here{where(good)}; use detkit.batch_invariant(), "
                             "which passes this check.")
            # not measured under the mode (an interrupted audit): still a finding
            unmeasured = [o for o in torch_bad if o not in good and o not in bad]
            if unmeasured:
                lines.append(f"{_names(unmeasured)}: {_PHRASES[check]} here{where(unmeasured)}; "
                             "detkit.batch_invariant() is meant to fix this (not measured under it in this report).")
        else:
            lines.append(f"{_names(torch_bad)}: {_PHRASES[check]} here{where(torch_bad)}; detkit.batch_invariant() "
                         f"is meant to fix this{mode_hint('detkit')}.")

    torch_nd = sorted(o for o, v in _verdicts(records, "torch", "run-to-run").items() if "fail" in v)
    if torch_nd:
        if "deterministic" in audited:
            good, bad = fixed_by("deterministic", "run-to-run", torch_nd)
            if good:
                env = " and CUBLAS_WORKSPACE_CONFIG=:4096:8" if device == "cuda" else ""
                lines.append(f"{_names(good)}: {_PHRASES['run-to-run']}; torch.use_deterministic_algorithms(True)"
                             f"{env} fixes it here.")
            if bad:
                lines.append(f"{_names(bad)}: still nondeterministic (or raising) with "
                             "torch.use_deterministic_algorithms(True); use detkit.batch_invariant() if it passes.")
            unmeasured = [o for o in torch_nd if o not in good and o not in bad]
            if unmeasured:
                lines.append(f"{_names(unmeasured)}: {_PHRASES['run-to-run']}; not measured under "
                             "torch.use_deterministic_algorithms(True) in this report.")
        else:
            lines.append(f"{_names(torch_nd)}: {_PHRASES['run-to-run']}; set torch.use_deterministic_algorithms(True)"
                         " and CUBLAS_WORKSPACE_CONFIG=:4096:8 (rerun with --impl torch,deterministic to confirm).")
    elif device == "cuda":
        lines.append("On CUDA, keep CUBLAS_WORKSPACE_CONFIG=:4096:8 set: cuBLAS needs a fixed workspace to be "
                     "run-to-run deterministic.")

    det_errors = sorted({r["op"] for r in records if r["impl"] == "deterministic" and r["status"] == "error"})
    if det_errors:
        lines.append(f"{_names(det_errors)}: torch.use_deterministic_algorithms(True) raises for these on "
                     f"{device} (see the errors section).")

    for check, pin in (("thread-variance", "pin the thread count (torch.set_num_threads / OMP_NUM_THREADS) "
                                           "wherever results are compared"),
                       ("isa-variance", "results will differ on CPUs of another generation")):
        torch_bad = sorted(o for o, v in _verdicts(records, "torch", check).items() if "fail" in v)
        if not torch_bad:
            continue
        line = f"{_names(torch_bad)}: {_PHRASES[check]}; {pin}"
        # Thread invariance is part of the plain mode's guarantee; ISA invariance only of portable.
        fixers = (("detkit", "detkit.batch_invariant()"),) if check == "thread-variance" else ()
        fixers += (("portable", "detkit.batch_invariant(portable=True)"),)
        for impl, mode in fixers:
            if impl in audited:
                good, _bad = fixed_by(impl, check, torch_bad)
                if good:
                    line += f"; {mode} gives the same bits for {_names(good)}"
                    break
        line += "."
        lines.append(line)

    unrouted_by_mode: dict[str, list[str]] = {}
    for impl, mode in (("detkit", "detkit.batch_invariant()"), ("portable", "detkit.batch_invariant(portable=True)")):
        for check in MODE_GUARANTEES[impl]:
            failing = [r for r in records
                       if r["impl"] == impl and r["checks"].get(check, {}).get("verdict") == "fail"]
            covered = sorted({r["op"] for r in failing if _covered(r)})
            uncovered = sorted({r["op"] for r in failing if not _covered(r)})
            if covered:
                lines.append(f"{_names(covered)}: {check} fails under {mode}, which is meant to guarantee it; "
                             "please report it with this report attached.")
            if uncovered:
                lines.append(f"{_names(uncovered)}: {check} fails under {mode}, which does not cover "
                             "these calls (torch's own kernel ran; see the coverage section).")
        # The table shows these as passing under the mode; the pass is torch's, on this machine.
        unrouted = sorted({r["op"] for r in records if r["impl"] == impl and r["status"] == "ok" and not _covered(r)
                           and not any(res.get("verdict") == "fail" for res in r["checks"].values())})
        if unrouted:
            unrouted_by_mode[mode] = unrouted
    # one line when both modes leave the same ops to torch (the usual case: ops not in the table)
    for ops in dict.fromkeys(tuple(v) for v in unrouted_by_mode.values()):
        modes = " or ".join(m for m, v in unrouted_by_mode.items() if tuple(v) == ops)
        lines.append(f"{_names(ops)}: not covered by {modes} (torch's own kernel ran): their passing "
                     "verdicts there are torch's behaviour on this machine, not a detkit guarantee.")

    others = sorted({label(r) for r in records if r["status"] == "error" and r["impl"] != "deterministic"})
    if others:
        lines.append(f"{_names(others)} raised an error; see the errors section.")
    # a check that could not run inside an otherwise working record (e.g. the op raises
    # under another ATEN_CPU_CAPABILITY): one line per distinct cause
    unmeasured: dict[str, list[str]] = {}
    for r in records:
        if r["status"] != "ok":
            continue
        for check, res in r["checks"].items():
            if res.get("verdict") == "error":
                cause = f"{r['op']} ({r['dtype']}): {check} could not be measured: {res.get('note', '')}"
                unmeasured.setdefault(cause, []).append(r["impl"])
    for cause, who in unmeasured.items():
        lines.append(f"{cause} [{', '.join(who)}]")
    for impl, reason in unavailable.items():
        lines.append(f"implementation {impl} was not audited: {reason}")
    if records and not lines:
        lines.append("Every audited op passed every check it was run through.")
    return lines


def summarize(report: dict[str, Any], fail_on: Iterable[str] = ()) -> dict[str, Any]:
    """Counts of verdicts per implementation and check, the failing cells, advice, fail-on."""
    records = op_records(report)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    findings = []
    for r in records:
        per_impl = counts.setdefault(r["impl"], {})
        for check, res in r["checks"].items():
            verdict = res["verdict"]
            per_impl.setdefault(check, {}).setdefault(verdict, 0)
            per_impl[check][verdict] += 1
            if verdict in FAILING:
                findings.append({
                    "op": r["op"], "impl": r["impl"], "dtype": r["dtype"], "check": check, "verdict": verdict,
                    "differing": res.get("differing"), "compared": res.get("compared"),
                    "max_ulp": res.get("max_ulp"), "first_b": res.get("first_b"),
                })
    device = report.get("config", {}).get("device", "cpu")
    wanted = list(fail_on)
    failed = fail_on_failures(records, wanted)
    skipped = fail_on_skipped(records, wanted)
    unmeasured = [f"--fail-on {check}: not measured ({why}), so this gate passes without it."
                  for check, why in skipped.items()]
    return {
        "records": len(records),
        "errors": sum(1 for r in records if r["status"] == "error"),
        "seconds": round(sum(r.get("seconds", 0.0) for r in records), 2),
        "verdicts": counts,
        "findings": findings,
        "fail_on": {"checks": wanted, "failed": failed, "passed": not failed, "skipped": skipped},
        "advice": unmeasured + advice(records, impl_records(report), device),
    }
