"""Markdown and HTML views of a pytest report (``pytest --detkit-report=PATH``).

``detkit report PATH --format md|html|table`` uses them: the summary line, one row per
check (failures first), the mode's coverage per test and the recorded values. The JSON
report stays the source of truth (``docs/report-schema.md``).
"""

from __future__ import annotations

import html
from typing import Any


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")




def _checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    checks = [r for r in report.get("results", []) if r.get("type") == "check"]
    return sorted(checks, key=lambda r: bool(r.get("passed")))  # failures first, otherwise in run order


def _first_difference(detail: dict[str, Any]) -> str:
    first = detail.get("first_difference")
    if not isinstance(first, dict):  # assert_bitwise_equal / assert_ulp_close: the failing outputs
        differences = detail.get("differences")
        first = differences[0] if isinstance(differences, list) and differences else None
        if not isinstance(first, dict):
            return ""
    names = {"row": "row", "prompt": "prompt", "step": "step", "position": "position", "batch_size": "batch of",
             "token_divergence_step": "tokens diverge at step", "logits_first_differ_step": "logits differ at step"}
    where = [f"{label} {first[k]}" for k, label in names.items() if first.get(k) is not None]
    if first.get("output"):
        where.append(f"output {first['output']}")
    where.extend(_diff_location(first.get("diff")))
    if "runs_differing" in detail:  # assert_deterministic
        where.append(f"runs {detail['runs_differing']} differ from run 1")
    return ", ".join(where)


def _diff_location(diff: Any) -> list[str]:
    """Where a ``describe`` diff first differs: the element index, or the dtype/shape clash."""
    if not isinstance(diff, dict):
        return []
    if isinstance(diff.get("dtype"), list) and isinstance(diff.get("shape"), list):
        (de, da), (se, sa) = diff["dtype"], diff["shape"]
        return [f"expected {de}{se}, got {da}{sa}"]
    mismatches = diff.get("first_mismatches")
    if isinstance(mismatches, list) and mismatches and isinstance(mismatches[0], dict):
        return [f"index {tuple(mismatches[0].get('index') or ())}"]
    return []


def _sections(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table."""
    out: list[tuple[str, list[str], list[list[str]]]] = []
    checks = _checks(report)
    outcomes = _outcomes(report)
    out.append((f"Checks ({len(checks)})",
                ["test", "test outcome", "check", "name", "verdict", "worst ULP", "first difference"],
                [[c["test"], outcomes.get(c["test"], "-"), c.get("check", ""), c.get("name", ""), c.get("verdict", ""),
                  "-" if c.get("worst_ulp") is None else str(c["worst_ulp"]),
                  _first_difference(c.get("detail") or {})] for c in checks]))
    modes = [r for r in report.get("results", []) if r.get("type") == "mode"]
    if modes:
        rows = []
        for m in modes:
            fell = "; ".join(f"{op}: {n} x {why}" for op, reasons in sorted((m.get("fell_back") or {}).items())
                             for why, n in sorted(reasons.items()))
            rows.append([m["test"], "portable" if m.get("portable") else "batch invariant",
                         str(m.get("routed", 0)), fell or "none"])
        out.append(("Mode coverage per test", ["test", "mode", "routed calls", "fell back to torch"], rows))
    records = [r for r in report.get("results", []) if r.get("type") == "record"]
    if records:
        rows = [[r["test"], r.get("name", ""), str(r.get("run", "")),
                 ", ".join(f"{o.get('output') or 'out'} {o.get('dtype')}{o.get('shape')} {str(o.get('sha256', ''))[:12]}"
                           for o in r.get("outputs", []))] for r in records]
        out.append(("Recorded values", ["test", "name", "run", "outputs (dtype, shape, sha256)"], rows))
    return out


def _outcomes(report: dict[str, Any]) -> dict[str, str]:
    """Per test: its pytest outcome (failed wins over passed), from the ``test`` records."""
    out: dict[str, str] = {}
    for r in report.get("results", []):
        if r.get("type") == "test" and out.get(r["test"]) in (None, "passed"):
            out[r["test"]] = str(r.get("outcome", "-"))
    return out


def _headline(report: dict[str, Any]) -> str:
    s = report.get("summary") or {}
    failed = ", ".join(f"{n} {v}" for v, n in sorted((s.get("verdicts") or {}).items()) if v != "PASS")
    worst = "-" if s.get("worst_ulp") is None else s["worst_ulp"]
    return (f"{s.get('checks', 0)} checks: {s.get('passed', 0)} passed, {s.get('failed', 0)} failed"
            f"{f' ({failed})' if failed else ''}; worst ULP {worst}; mode {s.get('mode', '-')}; "
            f"tests with uncovered ops {s.get('tests_with_uncovered_ops', 0)}; pytest exit status "
            f"{s.get('exitstatus', '-')}")


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# detkit pytest report ({report.get('status')})", "",
             f"- {_headline(report)}", f"- created {report.get('created')}, detkit {report.get('detkit_version')}",
             f"- pytest {' '.join((report.get('config') or {}).get('args', []))}"]
    for title, header, rows in _sections(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['where']}: {e['error'].splitlines()[0]}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def to_html(report: dict[str, Any]) -> str:
    e = html.escape
    body = [f"<h1>detkit pytest report ({e(str(report.get('status')))})</h1>", f"<p>{e(_headline(report))}</p>"]
    for title, header, rows in _sections(report):
        body.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows]
        body.append("</table>")
    if report.get("errors"):
        body.append("<h2>Errors</h2><ul>" + "".join(
            f"<li>{e(x['where'])}: <code>{e(x['error'].splitlines()[0])}</code></li>" for x in report["errors"]) + "</ul>")
    style = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>detkit pytest report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
