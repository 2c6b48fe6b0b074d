"""Markdown and self-contained HTML views of a probe report (rendered from its JSON).

The HTML has no external assets: two inline-SVG plots, the histogram of first
divergence positions (all modes, stacked by mode) and the per-step max |delta score|
curve of each mode (steps compared with identical context, see ``metrics``).
"""

from __future__ import annotations

import html
import math
import statistics
from typing import Any

_COLOURS = {
    "single": "#1f77b4",
    "mixed": "#d62728",
    "prefix": "#2ca02c",
    "padding": "#9467bd",
    "decode": "#ff7f0e",
    "repeat": "#8c564b",
}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _title(report: dict[str, Any]) -> str:
    cfg = report.get("config", {})
    eng = cfg.get("engine", {})
    what = eng.get("model") or eng.get("served_model") or "?"
    mode = ""
    if cfg.get("batch_invariant"):
        mode = " under detkit.batch_invariant(" + ("portable=True" if cfg.get("portable") else "") + ")"
    return f"detkit probe: {what}{mode}"


def _setup_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    cfg = report.get("config", {})
    eng = cfg.get("engine", {})
    suite = cfg.get("suite", {})
    fp = report.get("fingerprint", {})
    rows = [
        ("command", cfg.get("command", "-")),
        ("engine", ", ".join(f"{k}={v}" for k, v in eng.items())),
        ("suite", f"{suite.get('name', '-')} ({len(suite.get('prompts', []))} prompts), seed {suite.get('seed')}, "
                  f"max_new_tokens {suite.get('max_new_tokens')}, batch sizes {suite.get('batch', {}).get('sizes')}"),
        ("status", f"{report.get('status')} (updated {report.get('updated')})"),
        ("detkit", str(report.get("detkit_version"))),
    ]
    coverage = report.get("mode_coverage")
    if coverage is not None:
        routed, fell = coverage.get("routed", {}), coverage.get("fell_back", {})
        text = (f"{sum(routed.values())} calls of {len(routed)} ops routed to detkit's kernels; "
                f"{sum(fell.values())} fell back to torch")
        if coverage.get("not_portable"):
            text += f"; {sum(coverage['not_portable'].values())} routed to torch's math library (not portable)"
        rows.append(("mode coverage", text))
    versions, platform = fp.get("versions", {}), fp.get("platform", {})
    threads, cuda = fp.get("threads", {}), fp.get("cuda", {})
    if versions:
        rows.append(("versions", ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "numpy", "numba") if k in versions)))
    if platform:
        rows.append(("machine", f"{platform.get('cpu_model', '?')}, {platform.get('cpu_count', '?')} CPUs, "
                                f"torch CPU capability {platform.get('torch_cpu_capability', '?')}"))
    if threads:
        rows.append(("threads", f"torch {threads.get('torch_num_threads', '?')}, numba {threads.get('numba_num_threads', '?')}"))
    if cuda and cuda.get("available"):
        rows.append(("cuda", ", ".join(f"{k}={v}" for k, v in cuda.items())))
    return rows


def _positions(m: dict[str, Any]) -> str:
    pos = [d["position"] for d in m["divergences"]]
    if not pos:
        return "-"
    pos.sort()
    # the median of an even count is the mean of the middle two, not the upper one (3 / 10 / 10 for [3, 10])
    return f"{pos[0]} / {_fmt(statistics.median(pos))} / {pos[-1]}"


def _mode_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in report.get("modes", []):
        if m["skipped"]:
            rows.append([m["name"], "-", "-", "-", "-", "-", "-", "-", "-", f"skipped: {m['skipped']}"])
            continue
        diff = m["max_abs_logit_diff"] if m["max_abs_logit_diff"] is not None else m.get("max_abs_logprob_diff")
        rows.append([
            m["name"] + ("" if m.get("complete", True) else " (interrupted)"),
            f"{m['runs']}" + (f" ({m['failed_runs']} failed)" if m["failed_runs"] else ""),
            _fmt(m["unique_completions"]),
            str(len(m["divergences"])),
            _positions(m),
            _fmt(diff) + (f" ({m['score_kind']})" if m.get("score_kind") else ""),
            _fmt(m["max_ulp"]),
            _fmt(m["runs_with_logit_diff"]),
            _fmt(m["flip_share"], 3),
            _fmt(m["min_margin_at_divergence"]),
        ])
    return rows


_MODE_HEADER = [
    "mode", "runs", "unique completions", "diverging runs", "first divergence min / median / max",
    "max abs score diff", "max ULP", "runs with score diff", "argmax flip share", "min top1-top2 margin at divergence",
]
_DIV_HEADER = ["mode", "run", "position", "reference token", "run token", "margin (ref)", "margin (run)"]


def _div_rows(report: dict[str, Any], limit: int = 60) -> list[list[str]]:
    rows = []
    for m in report.get("modes", []):
        for d in m["divergences"]:
            rows.append([
                m["name"], d["run"], str(d["position"]),
                f"{d['ref_token']} {d['ref_token_text']!r}" if d["ref_token"] is not None else "(ended)",
                f"{d['run_token']} {d['run_token_text']!r}" if d["run_token"] is not None else "(ended)",
                _fmt(d["margin_ref"]), _fmt(d["margin_run"]),
            ])
    return rows[:limit]


# A report left "running" (crashed, killed, or still going) has no verdict yet.
_UNFINISHED = "INCOMPLETE: the run stopped without finishing (crashed, killed or still running)"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: setup, verdict, one row per mode, divergences, notes."""
    summary = report.get("summary") or {}
    parts = [f"# {_title(report)}", ""]
    parts.append(_md_table(["", ""], [[k, v] for k, v in _setup_rows(report)]))
    parts += ["", f"**Verdict:** {summary.get('verdict', _UNFINISHED)}", ""]
    parts += ["## Modes", "", _md_table(_MODE_HEADER, _mode_rows(report)), ""]
    parts.append(
        "Reference: each prompt alone at batch size 1. Token ids are compared step by step; "
        "scores (logits for local models, logprobs for servers) are compared over the top-k "
        "token ids both runs share, at every step up to and including the first divergence."
    )
    divs = _div_rows(report)
    if divs:
        parts += ["", "## Divergences", "", _md_table(_DIV_HEADER, divs)]
    refs = report.get("references", {})
    if refs:
        parts += ["", "## References", ""]
        for pid, ref in refs.items():
            parts.append(f"- `{pid}`: {len(ref['tokens'])} tokens, {ref.get('text', '')!r}")
    notes = list(report.get("notes", [])) + [n for m in report.get("modes", []) for n in m.get("notes", [])]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    errors = report.get("errors", []) + [
        {"where": f"{m['name']} {e['run']}", "error": e["error"]} for m in report.get("modes", []) for e in m["errors"]
    ]
    if errors:
        parts += ["", "## Errors", ""] + [f"- {e['where']}: {e['error']}" for e in errors]
    return "\n".join(parts) + "\n"


def _svg_histogram(report: dict[str, Any], width: int = 560, height: int = 220) -> str:
    modes = [m for m in report.get("modes", []) if m["divergences"]]
    # Positions count characters when a server returns no logprobs (token_unit "character"):
    # they can lie past max_new_tokens, and a bar there must still be drawn.
    steps = max([int(report.get("config", {}).get("suite", {}).get("max_new_tokens") or 1)]
                + [d["position"] for m in modes for d in m["divergences"]])
    counts: dict[str, dict[int, int]] = {m["name"]: {} for m in modes}
    for m in modes:
        for d in m["divergences"]:
            counts[m["name"]][d["position"]] = counts[m["name"]].get(d["position"], 0) + 1
    totals = [sum(c.get(p, 0) for c in counts.values()) for p in range(steps + 1)]
    top = max(totals) if totals and max(totals) else 1
    left, bottom, pad = 40, 30, 10
    plot_w, plot_h = width - left - pad, height - bottom - pad
    bar = plot_w / (steps + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="histogram of first divergence positions">']
    out.append(f'<line x1="{left}" y1="{pad + plot_h}" x2="{left + plot_w}" y2="{pad + plot_h}" stroke="#333"/>')
    out.append(f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{pad + plot_h}" stroke="#333"/>')
    for p in range(steps + 1):
        y = pad + plot_h
        for name, c in counts.items():
            n = c.get(p, 0)
            if n:
                h = plot_h * n / top
                y -= h
                out.append(f'<rect x="{left + p * bar:.1f}" y="{y:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}" '
                           f'fill="{_COLOURS.get(name, "#555")}"><title>{html.escape(name)}: {n} run(s) at step {p}</title></rect>')
    out.append(f'<text x="{left}" y="{height - 8}" font-size="11">0</text>')
    out.append(f'<text x="{left + plot_w - 30}" y="{height - 8}" font-size="11">step {steps}</text>')
    out.append(f'<text x="4" y="{pad + 10}" font-size="11">{top}</text>')
    if not modes:
        out.append(f'<text x="{left + 20}" y="{pad + plot_h / 2}" font-size="13">no divergence in any mode</text>')
    out.append("</svg>")
    return "".join(out)


def _finite(values: list[Any]) -> list[float | None]:
    """Plottable values: a non-finite difference (a -inf logprob; "inf" once read back from
    JSON) has no height on a linear axis and is left out of the curve."""
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values]


def _svg_curve(report: dict[str, Any], width: int = 560, height: int = 220) -> str:
    series = [(m["name"], _finite(m["per_step_max_abs_diff"])) for m in report.get("modes", [])
              if m.get("per_step_max_abs_diff")]
    steps = max((len(s) for _, s in series), default=1)
    top = max((v for _, s in series for v in s if v is not None), default=0.0) or 1.0
    left, bottom, pad = 50, 30, 10
    plot_w, plot_h = width - left - pad, height - bottom - pad
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="per-step max absolute score difference">']
    out.append(f'<line x1="{left}" y1="{pad + plot_h}" x2="{left + plot_w}" y2="{pad + plot_h}" stroke="#333"/>')
    out.append(f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{pad + plot_h}" stroke="#333"/>')
    for name, values in series:
        pts = " ".join(
            f"{left + plot_w * i / max(steps - 1, 1):.1f},{pad + plot_h * (1 - v / top):.1f}"
            for i, v in enumerate(values) if v is not None
        )
        out.append(f'<polyline fill="none" stroke="{_COLOURS.get(name, "#555")}" stroke-width="1.5" points="{pts}">'
                   f'<title>{html.escape(name)}</title></polyline>')
    out.append(f'<text x="4" y="{pad + 10}" font-size="11">{top:.3g}</text>')
    out.append(f'<text x="4" y="{pad + plot_h}" font-size="11">0</text>')
    out.append(f'<text x="{left}" y="{height - 8}" font-size="11">step 0</text>')
    out.append(f'<text x="{left + plot_w - 40}" y="{height - 8}" font-size="11">step {steps - 1}</text>')
    if not any(any(v for v in s if v is not None) for _, s in series):
        out.append(f'<text x="{left + 20}" y="{pad + plot_h / 2}" font-size="13">no score difference at any step</text>')
    out.append("</svg>")
    return "".join(out)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page with inline-SVG plots."""
    summary = report.get("summary") or {}
    legend = " ".join(
        f'<span style="color:{_COLOURS.get(m["name"], "#555")}">&#9632; {html.escape(m["name"])}</span>'
        for m in report.get("modes", [])
    )
    ok = summary.get("invariant")
    md = render_markdown(report)  # the notes/errors/reference lists, as preformatted text
    tail = md.split("## References", 1)[1] if "## References" in md else ""
    divs = _div_rows(report)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(_title(report))}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.ok{color:#2a7}.bad{color:#c22}.undecided{color:#b70}figure{display:inline-block;margin:0 1em}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}</style></head><body>",
        f"<h1>{html.escape(_title(report))}</h1>",
        _html_table(["", ""], [[k, v] for k, v in _setup_rows(report)]),
        # invariant null (UNDECIDED, INCOMPLETE) is no failure: amber, as the terminal's yellow
        f'<p class="{"ok" if ok is True else "bad" if ok is False else "undecided"}"><b>Verdict:</b> {html.escape(str(summary.get("verdict", _UNFINISHED)))}</p>',
        "<h2>Modes</h2>",
        _html_table(_MODE_HEADER, _mode_rows(report)),
        f"<p>{legend}</p>",
        f"<figure>{_svg_histogram(report)}<figcaption>First divergence position (runs per step, stacked by mode)</figcaption></figure>",
        f"<figure>{_svg_curve(report)}<figcaption>Max |delta score| per step vs the reference (per mode)</figcaption></figure>",
        ("<h2>Divergences</h2>" + _html_table(_DIV_HEADER, divs)) if divs else "",
        f"<h2>References, notes, errors</h2><pre>{html.escape(tail.strip())}</pre>" if tail else "",
        "</body></html>",
    ]) + "\n"
