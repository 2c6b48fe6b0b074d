"""Render an audit report (the JSON, complete or partial) as Markdown, HTML or a rich table.

Everything is derived from the saved JSON, so ``detkit report`` re-renders any report.
The HTML is self-contained: inline CSS and inline SVG (a heat map op x check per
implementation and ULP histograms), no scripts and no network resources.
"""

from __future__ import annotations

import html
import math
from typing import Any

from rich.table import Table
from rich.text import Text

from detkit.audit.summary import impl_records, op_records, summarize, uncovered_ops
from detkit.audit.vocab import CELL_LEGEND, CHECK_HELP, CHECKS, IMPLS, ulp_bucket_label

SHORT = {
    "run-to-run": "run",
    "batch-variance": "batch",
    "batch-position": "position",
    "thread-variance": "threads",
    "padding": "padding",
    "decode-prefill": "decode",
    "isa-variance": "isa",
}

STATUS_TEXT = {
    "complete": "complete",
    "partial": "PARTIAL (interrupted; only the finished records are shown)",
    "running": "INCOMPLETE (the run stopped without finishing: crashed or still running)",
}


def shown_checks(records: list[dict[str, Any]]) -> list[str]:
    """Checks that ran for at least one record (hides e.g. isa when --isa was not given)."""
    return [c for c in CHECKS if any(r["checks"].get(c, {}).get("verdict") not in ("n/a", "skipped", None)
                                     for r in records)] or list(CHECKS[:3])


def _fmt_ulp(u: int | None) -> str:
    if u is None:
        return "-"
    return str(u) if u < 100_000 else f"{u:.2e}"


def cell(res: dict[str, Any], check: str) -> str:
    """One verdict in a few words: "pass", "FAIL from b=2, max 31616 ULP", "n/a", ..."""
    verdict = res.get("verdict", "n/a")
    if verdict != "fail":
        return {"skipped": "skip"}.get(verdict, verdict)
    parts = []
    if check == "batch-variance" and res.get("first_b"):
        parts.append(f"from b={res['first_b']}")
    elif res.get("compared"):
        parts.append(f"{100 * res['differing'] / res['compared']:.3g}% differ")
    if res.get("max_ulp") is not None:
        parts.append(f"max {_fmt_ulp(res['max_ulp'])} ULP")
    elif res.get("differing"):
        parts.append(f"{res['differing']} differ")
    return "FAIL " + ", ".join(parts)


_MARK = {"pass": "ok", "fail": "FAIL", "error": "err", "skipped": "-", "n/a": "."}


def short_cell(res: dict[str, Any], check: str) -> tuple[str, str]:
    """A verdict for terminal tables, and its rich style: at most 10 characters, or
    ``short_cell_width`` of the sweep for "FAIL b>=N"."""
    verdict = res.get("verdict", "n/a")
    text = _MARK.get(verdict, verdict)
    if verdict == "fail":
        if check == "batch-variance" and res.get("first_b"):
            text = f"FAIL b>={res['first_b']}"
        elif res.get("compared"):
            pct = 100 * res["differing"] / res["compared"]
            # a few elements of millions ("0.0001%") would overflow the column; the exact
            # share is in the report
            text = f"FAIL {pct:.0f}%" if pct >= 1 else f"FAIL {pct:.1g}%" if pct >= 0.01 else "FAIL <.01%"
    return text, _style(verdict)


def short_cell_width(batch_sizes: list[int] | tuple[int, ...]) -> int:
    """Characters of the widest ``short_cell`` of an audit over ``batch_sizes``."""
    return max(10, len(f"FAIL b>={max(batch_sizes, default=1)}"))


def _sorted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order: dict[tuple[str, str], int] = {}
    for r in records:
        order.setdefault((r["dtype"], r["op"]), len(order))
    impl_order = {"torch": 0, "deterministic": 1, "detkit": 2, "portable": 3}
    return sorted(records, key=lambda r: (order[(r["dtype"], r["op"])], impl_order.get(r["impl"], 9)))


def impl_totals(records: list[dict[str, Any]]) -> list[tuple[str, int, int, int, int]]:
    """Per implementation: (impl, records, records with a failing check, failing cells, error cells)."""
    out = []
    for impl in IMPLS:
        mine = [r for r in records if r["impl"] == impl]
        if not mine:
            continue
        verdicts = [res.get("verdict") for r in mine for res in r["checks"].values()]
        bad = sum(1 for r in mine if any(res.get("verdict") in ("fail", "error") for res in r["checks"].values()))
        out.append((impl, len(mine), bad, verdicts.count("fail"), verdicts.count("error")))
    return out


def _env_lines(report: dict[str, Any]) -> list[tuple[str, str]]:
    fp = report.get("fingerprint", {})
    v, p, t, b = (fp.get(k) if isinstance(fp.get(k), dict) else {}
                  for k in ("versions", "platform", "threads", "blas"))
    cuda = fp.get("cuda", {}) if isinstance(fp.get("cuda"), dict) else {}
    rows = [
        ("detkit", str(report.get("detkit_version", "?"))),
        ("torch", str(v.get("torch", "?"))),
        ("CPU", f"{p.get('cpu_model', '?')} ({p.get('machine', '?')}, {p.get('cpu_count', '?')} cores, "
                f"ATEN_CPU_CAPABILITY {p.get('torch_cpu_capability', '?')})"),
        ("threads", f"torch {t.get('torch_num_threads', '?')}, {t.get('parallel_backend', '?')}"),
        ("BLAS", f"torch {b.get('torch_blas', '?')}"),
        ("GPU", str(cuda.get("devices", "none")) if cuda.get("available") else "none"),
    ]
    if "error" in fp:
        rows.append(("fingerprint", str(fp["error"])))
    return rows


# --- Markdown ---------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict[str, Any]) -> str:
    records = _sorted(op_records(report))
    cfg = report.get("config", {})
    summary = report.get("summary") or summarize(report, cfg.get("fail_on", ()))
    checks = shown_checks(records)
    out = [
        "# detkit audit",
        "",
        f"- status: **{STATUS_TEXT.get(report.get('status', ''), report.get('status'))}**",
        f"- created: {report.get('created')} (updated {report.get('updated')})",
        f"- device: {cfg.get('device', '?')}; dtypes: {', '.join(cfg.get('dtypes', []))}; "
        f"batch sizes: {', '.join(map(str, cfg.get('batch_sizes', [])))}; runs: {cfg.get('runs')}; "
        f"seed: {cfg.get('seed')}; hidden: {cfg.get('hidden')}",
    ]
    if cfg.get("command"):
        out.append(f"- command: `{cfg['command']}`")
    out += ["", "## What to do", ""]
    out += [f"- {_md(line)}" for line in summary.get("advice", [])] or ["- (no records)"]
    fo = summary.get("fail_on", {})
    if fo.get("checks"):
        verdict = "passed" if fo.get("passed") else f"FAILED ({len(fo.get('failed', []))} cells)"
        out += ["", f"`--fail-on {','.join(fo['checks'])}`: **{verdict}**"]
    totals = impl_totals(records)
    if totals:
        out += ["", "## Per implementation", "",
                "| implementation | op records | with a failing check | failing checks | errors |",
                "|---|---|---|---|---|"]
        out += [f"| {i} | {n} | {bad} | {f} | {e} |" for i, n, bad, f, e in totals]
    out += ["", "## Verdicts", "", "Bitwise comparisons; ULP distances of the differing elements.", ""]
    out.append("| op | dtype | impl | " + " | ".join(checks) + " | s |")
    out.append("|---|---|---|" + "---|" * len(checks) + "---|")
    for r in records:
        cells = [cell(r["checks"].get(c, {}), c) for c in checks]
        cells = [f"**{c}**" if c.startswith("FAIL") else c for c in cells]
        out.append(f"| {r['op']} | {r['dtype']} | {r['impl']} | " + " | ".join(cells)
                   + f" | {r.get('seconds', 0):.2f} |")
    fails = [(r, c) for r in records for c in CHECKS if r["checks"].get(c, {}).get("verdict") == "fail"]
    if fails:
        out += ["", "## Failures in detail", ""]
        for r, c in fails:
            res = r["checks"][c]
            line = (f"- **{r['op']}** [{r['impl']}, {r['dtype']}] {c}: {res['differing']} of {res['compared']} "
                    f"elements differ, max ULP {_fmt_ulp(res.get('max_ulp'))}")
            if res.get("max_abs") is not None:
                line += f", max abs diff {res['max_abs']:.3g}"
            if res.get("first_b"):
                line += f", first at b={res['first_b']}"
            if res.get("variants"):
                line += f", {res['variants']} distinct results of row 0"
            changed = [p for p in res.get("per", []) if p.get("differing")]
            if changed and c == "batch-variance":
                line += "; b with changes: " + ", ".join(str(p["b"]) for p in changed)
            if c == "isa-variance":
                line += "; per ISA: " + ", ".join(f"{p['isa']} {p['differing']}" for p in res.get("per", []))
            out.append(line + (f" ({_md(res['note'])})" if res.get("note") else ""))
    out += _md_notes(records)
    impls = impl_records(report)
    if impls:
        out += ["", "## Implementations", ""]
        for i in impls:
            state = "available" if i["available"] else f"unavailable: {_md(i['reason'])}"
            out.append(f"- {i['impl']}: {state}")
    if report.get("errors"):
        out += ["", "## Errors", ""]
        out += [f"- {_md(e['where'])}: `{_md(e['error'].splitlines()[0])}`" for e in report["errors"]]
    out += ["", "## Environment", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_md(v)} |" for k, v in _env_lines(report)]
    out += ["", "The full environment fingerprint is in report.json.", "", "## Checks", ""]
    out += [f"- **{c}**: {CHECK_HELP[c]}" for c in CHECKS]
    return "\n".join(out) + "\n"


def _notes(records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """({impl: {op: why}} for calls detkit's mode did not cover, [(record label, warning)])."""
    coverage = {impl: uncovered_ops(records, impl) for impl in ("detkit", "portable")}
    warned = [(f"{r['op']} [{r['impl']}, {r['dtype']}]", w) for r in records for w in r.get("warnings", [])]
    return {k: v for k, v in coverage.items() if v}, warned


def _md_notes(records: list[dict[str, Any]]) -> list[str]:
    coverage, warned = _notes(records)
    out: list[str] = []
    if coverage:
        out += ["", "## detkit mode coverage", "",
                "Calls the mode did not run through detkit's kernels carry no guarantee from it:", ""]
        for impl, ops in coverage.items():
            for op, why in ops.items():
                out.append(f"- {op} [{impl}]: {_md(why)}")
    if warned:
        out += ["", "## Warnings raised during the audit", ""]
        out += [f"- {_md(where)}: {_md(w)}" for where, w in warned]
    return out


# --- rich table --------------------------------------------------------------------------


def _style(verdict: str) -> str:
    return {"pass": "green", "fail": "bold red", "error": "magenta", "skipped": "dim", "n/a": "dim"}.get(verdict, "")


def rich_table(records: list[dict[str, Any]], checks: list[str] | None = None, title: str | None = None) -> Table:
    """One row per op x implementation x dtype, one column per check."""
    checks = checks or shown_checks(records)
    table = Table(title=title, header_style="bold", expand=False, caption=CELL_LEGEND)
    for name in ("op", "dtype", "impl"):
        table.add_column(name, no_wrap=True)
    for c in checks:
        table.add_column(SHORT[c], no_wrap=True)
    table.add_column("s", justify="right")
    for r in _sorted(records):
        cells = [Text(*short_cell(r["checks"].get(c, {}), c)) for c in checks]
        table.add_row(r["op"], r["dtype"], r["impl"], *cells, f"{r.get('seconds', 0):.1f}")
    return table


# --- HTML ----------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#1b1b1b;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.pass{color:#1b5e20}.fail{color:#b71c1c;font-weight:600}
.error{color:#6a1b9a}.dim{color:#888}.status{padding:2px 8px;border-radius:4px;background:#e8f5e9}
.status.partial,.status.running{background:#fff3e0}.hists{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px}code{background:#f4f4f4;padding:1px 4px}
svg text{font-family:system-ui,sans-serif}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _severity(res: dict[str, Any]) -> float:
    """0..1 by log2 of the worst ULP distance: a few ULPs are mild, 2^20+ (or an index change) is 1."""
    u = res.get("max_ulp")
    return 1.0 if u is None else min(1.0, math.log2(u + 1) / 20)


def _heat_colour(res: dict[str, Any]) -> str:
    verdict = res.get("verdict", "n/a")
    if verdict == "pass":
        return "#a5d6a7"
    if verdict == "error":
        return "#ce93d8"
    if verdict != "fail":
        return "#eeeeee"
    t = _severity(res)
    r, g, b = (int(a + (z - a) * t) for a, z in ((255, 140), (183, 0), (77, 0)))
    return f"#{r:02x}{g:02x}{b:02x}"


def _heat_text(res: dict[str, Any], check: str) -> str:
    verdict = res.get("verdict", "n/a")
    if verdict == "pass":
        return "ok"
    if verdict == "fail":
        if check == "batch-variance" and res.get("first_b"):
            return f"b\u2265{res['first_b']}"
        u = res.get("max_ulp")
        return "\u2260" if u is None else f"{_fmt_ulp(u)}u" if u < 10_000 else f"2^{int(math.log2(u))}u"
    return {"skipped": "skip", "not run": "-"}.get(verdict, verdict)


def heat_map_svg(records: list[dict[str, Any]], checks: list[str]) -> str:
    """Rows: op (and dtype); column groups: implementation x check; colour: verdict and worst ULP."""
    rows = list(dict.fromkeys((r["op"], r["dtype"]) for r in _sorted(records)))
    impls = [i for i in ("torch", "deterministic", "detkit", "portable") if any(r["impl"] == i for r in records)]
    by = {(r["op"], r["dtype"], r["impl"]): r for r in records}
    multi_dtype = len({d for _, d in rows}) > 1
    names = [f"{op} ({dtype})" if multi_dtype else op for op, dtype in rows]
    # row labels at 12px are about 7px per character; leave room for the longest
    cw, ch, top, gap = 58, 20, 46, 12
    left = 16 + 7 * max((len(n) for n in names), default=10)
    width = left + len(impls) * (len(checks) * cw + gap) + 10
    height = top + len(rows) * ch + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="heat map op x check">']
    for gi, impl in enumerate(impls):
        x0 = left + gi * (len(checks) * cw + gap)
        parts.append(f'<text x="{x0 + len(checks) * cw / 2}" y="14" text-anchor="middle" font-weight="600" '
                     f'font-size="13">{_e(impl)}</text>')
        for ci, c in enumerate(checks):
            parts.append(f'<text x="{x0 + ci * cw + cw / 2}" y="{top - 8}" text-anchor="middle" font-size="11">'
                         f'{_e(SHORT[c])}<title>{_e(c)}: {_e(CHECK_HELP[c])}</title></text>')
    for ri, ((op, dtype), name) in enumerate(zip(rows, names, strict=True)):
        y = top + ri * ch
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" font-size="12">{_e(name)}</text>')
        for gi, impl in enumerate(impls):
            x0 = left + gi * (len(checks) * cw + gap)
            r = by.get((op, dtype, impl))
            for ci, c in enumerate(checks):
                res = r["checks"].get(c, {}) if r else {"verdict": "not run"}
                x = x0 + ci * cw
                tip = f"{op} [{impl}, {dtype}] {c}: {cell(res, c)}"
                if res.get("note"):
                    tip += f" ({res['note']})"
                colour = _heat_colour(res)
                ink = "#fff" if res.get("verdict") == "fail" and _severity(res) > 0.5 else "#222"
                parts.append(f'<g><title>{_e(tip)}</title><rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" '
                             f'fill="{colour}" rx="2"/><text x="{x + (cw - 2) / 2}" y="{y + 13}" text-anchor="middle" '
                             f'font-size="10" fill="{ink}">{_e(_heat_text(res, c))}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def ulp_histogram_svg(hist: list[list[int]], title: str) -> str:
    """Bars of differing elements per ULP bucket (bucket k: distances in [2^(k-1), 2^k))."""
    counts = dict((int(k), int(n)) for k, n in hist)
    if not counts:
        return ""
    ks = list(range(min(counts), max(counts) + 1))
    bw, h, left, bottom = max(10, min(26, 360 // len(ks))), 110, 44, 44
    width = max(left + bw * len(ks) + 12, 16 + 7 * len(title))  # room for the title too
    peak = max(counts.values())
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + bottom + 22}" role="img" '
             f'aria-label="ULP histogram {_e(title)}"><text x="4" y="14" font-size="12" font-weight="600">'
             f'{_e(title)}</text>']
    base = h + 22
    for i, k in enumerate(ks):
        n = counts.get(k, 0)
        bh = 0 if n == 0 else max(1.0, h * math.log10(n + 1) / math.log10(peak + 1))
        x = left + i * bw
        parts.append(f'<g><title>{_e(ulp_bucket_label(k))} ULP: {n} elements</title>'
                     f'<rect x="{x}" y="{base - bh:.1f}" width="{bw - 2}" height="{bh:.1f}" fill="#c62828"/></g>')
        if len(ks) <= 12 or i % 2 == 0:
            parts.append(f'<text x="{x + bw / 2}" y="{base + 12}" font-size="9" text-anchor="end" '
                         f'transform="rotate(-45 {x + bw / 2} {base + 12})">{_e(ulp_bucket_label(k))}</text>')
    parts.append(f'<text x="4" y="{base - h + 8}" font-size="9">{peak}</text>'
                 f'<text x="4" y="{base}" font-size="9">0</text>'
                 f'<text x="{left}" y="{base + bottom - 2}" font-size="10">ULP distance (log-scaled counts)</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: dict[str, Any]) -> str:
    records = _sorted(op_records(report))
    cfg = report.get("config", {})
    summary = report.get("summary") or summarize(report, cfg.get("fail_on", ()))
    checks = shown_checks(records)
    status = report.get("status", "")
    body = [
        "<h1>detkit audit</h1>",
        f'<p><span class="status {_e(status)}">{_e(STATUS_TEXT.get(status, status))}</span> '
        f"created {_e(report.get('created'))}, updated {_e(report.get('updated'))}; device {_e(cfg.get('device'))}; "
        f"dtypes {_e(', '.join(cfg.get('dtypes', [])))}; "
        f"batch sizes {_e(', '.join(map(str, cfg.get('batch_sizes', []))))}; "
        f"runs {_e(cfg.get('runs'))}; seed {_e(cfg.get('seed'))}; hidden {_e(cfg.get('hidden'))}</p>",
    ]
    if cfg.get("command"):
        body.append(f"<p>command: <code>{_e(cfg['command'])}</code></p>")
    body.append("<h2>What to do</h2><ul>" + "".join(f"<li>{_e(a)}</li>" for a in summary.get("advice", [])) + "</ul>")
    fo = summary.get("fail_on", {})
    if fo.get("checks"):
        ok = fo.get("passed")
        body.append(f"<p><code>--fail-on {_e(','.join(fo['checks']))}</code>: "
                    f"<span class=\"{'pass' if ok else 'fail'}\">{'passed' if ok else 'FAILED'}</span></p>")
    totals = impl_totals(records)
    if totals:
        body.append("<h2>Per implementation</h2><table><tr><th>implementation</th><th>op records</th>"
                    "<th>with a failing check</th><th>failing checks</th><th>errors</th></tr>"
                    + "".join(f"<tr><td>{_e(i)}</td><td>{n}</td><td class=\"{'fail' if bad else 'pass'}\">{bad}</td>"
                              f"<td>{f}</td><td>{e}</td></tr>" for i, n, bad, f, e in totals) + "</table>")
    body.append("<h2>Heat map</h2><p>Green: bitwise identical. Orange to dark red: bits differ, darker for a "
                "larger worst ULP distance (cell text: first batch size that changes a row, or worst ULPs). "
                "Purple: the op raised. Grey: not applicable or skipped. Hover a cell for details.</p>")
    body.append(heat_map_svg(records, checks) if records else "<p>(no records)</p>")
    body.append("<h2>Verdicts</h2><table><tr><th>op</th><th>dtype</th><th>impl</th>"
                + "".join(f'<th title="{_e(CHECK_HELP[c])}">{_e(c)}</th>' for c in checks) + "<th>s</th></tr>")
    for r in records:
        tds = "".join(f'<td class="{_e(r["checks"].get(c, {}).get("verdict", ""))}">'
                      f'{_e(cell(r["checks"].get(c, {}), c))}</td>' for c in checks)
        body.append(f"<tr><td>{_e(r['op'])}</td><td>{_e(r['dtype'])}</td><td>{_e(r['impl'])}</td>{tds}"
                    f"<td>{r.get('seconds', 0):.2f}</td></tr>")
    body.append("</table>")
    hists = [(r, c) for r in records for c in CHECKS
             if r["checks"].get(c, {}).get("verdict") == "fail" and r["checks"][c].get("ulp_hist")]
    if hists:
        body.append("<h2>ULP histograms of the differing elements</h2><div class=\"hists\">")
        for r, c in hists:
            res = r["checks"][c]
            svg = ulp_histogram_svg(res["ulp_hist"], f"{r['op']} [{r['impl']}, {r['dtype']}] {c}")
            body.append(f'<div class="card">{svg}<div class="dim">{res["differing"]} of {res["compared"]} elements '
                        f"differ; max {_e(_fmt_ulp(res.get('max_ulp')))} ULP</div></div>")
        body.append("</div>")
    detail_rows = []
    for r in records:
        res = r["checks"].get("batch-variance", {})
        if res.get("verdict") == "fail":
            per = ", ".join(f"b={p['b']}: {p['differing']}" for p in res.get("per", []))
            detail_rows.append(f"<tr><td>{_e(r['op'])}</td><td>{_e(r['impl'])}</td><td>{_e(r['dtype'])}</td>"
                               f"<td>{_e(res.get('variants'))}</td><td>{_e(per)}</td></tr>")
    if detail_rows:
        body.append("<h2>Batch sweep</h2><p>Elements of f(x[:b]) that differ from the same row computed "
                    "alone (b=1); variants: distinct results of row 0.</p><table><tr>"
                    "<th>op</th><th>impl</th><th>dtype</th><th>variants</th><th>differing per b</th></tr>"
                    + "".join(detail_rows) + "</table>")
    coverage, warned = _notes(records)
    if coverage:
        body.append("<h2>detkit mode coverage</h2><p>Calls the mode did not run through detkit's kernels carry no "
                    "guarantee from it:</p><ul>" + "".join(
                        f"<li>{_e(op)} [{_e(impl)}]: {_e(why)}</li>" for impl, ops in coverage.items()
                        for op, why in ops.items()) + "</ul>")
    if warned:
        body.append("<h2>Warnings raised during the audit</h2><ul>"
                    + "".join(f"<li>{_e(where)}: {_e(w)}</li>" for where, w in warned) + "</ul>")
    impls = impl_records(report)
    if impls:
        body.append("<h2>Implementations</h2><ul>" + "".join(
            f"<li>{_e(i['impl'])}: {'available' if i['available'] else 'unavailable: ' + _e(i['reason'])}</li>"
            for i in impls) + "</ul>")
    if report.get("errors"):
        body.append("<h2>Errors</h2><ul>" + "".join(
            f"<li>{_e(e['where'])}: <code>{_e(e['error'].splitlines()[0])}</code></li>" for e in report["errors"])
            + "</ul>")
    body.append("<h2>Environment</h2><table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
                                                        for k, v in _env_lines(report)) + "</table>")
    fp = report.get("fingerprint", {})
    if isinstance(fp, dict):
        body.append("<details><summary>full fingerprint</summary><table>")
        for section, values in fp.items():
            if isinstance(values, dict):
                for k, v in values.items():
                    body.append(f"<tr><th>{_e(section)}.{_e(k)}</th><td>{_e(v)}</td></tr>")
            else:
                body.append(f"<tr><th>{_e(section)}</th><td>{_e(values)}</td></tr>")
        body.append("</table></details>")
    body.append("<h2>Checks</h2><ul>" + "".join(f"<li><b>{_e(c)}</b>: {_e(CHECK_HELP[c])}</li>" for c in CHECKS)
                + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>detkit audit</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
