"""`detkit report`: re-render a saved report (audit, probe or pytest) from its JSON."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from detkit.cli import output_file
from detkit.report import dumps as _dumps


class Format(str, Enum):
    md = "md"
    html = "html"
    table = "table"
    json = "json"


# kind -> (module, Markdown renderer, HTML renderer): every kind detkit.report accepts
RENDERERS: dict[str, tuple[str, str, str]] = {
    "audit": ("detkit.audit.render", "to_markdown", "to_html"),
    "probe": ("detkit.probe.render", "render_markdown", "render_html"),
    "pytest": ("detkit._testing_render", "to_markdown", "to_html"),
}


def _renderers(kind: str) -> tuple[Callable[[dict[str, Any]], str], Callable[[dict[str, Any]], str]]:
    module_name, md, page = RENDERERS[kind]  # load_report has checked the kind
    module = importlib.import_module(module_name)
    return getattr(module, md), getattr(module, page)


def render(report: dict[str, Any], fmt: Format) -> str | Any:
    """The report as text (md/html/json) or a rich renderable (table)."""
    if fmt is Format.json:
        return _dumps(report) + "\n"
    to_md, to_page = _renderers(str(report.get("kind")))
    if fmt is Format.table:
        if report.get("kind") == "audit":
            from detkit.audit.render import rich_table
            from detkit.audit.summary import op_records

            return rich_table(op_records(report), title=f"detkit audit ({report.get('status')})")
        from rich.markdown import Markdown

        return Markdown(to_md(report))
    return to_md(report) if fmt is Format.md else to_page(report)


def report(
    path: Annotated[Path, typer.Argument(help="A report.json, or the directory holding one.")],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="md, html, table (terminal) or json.")] = Format.md,
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Re-render a saved detkit report (complete or partial) as Markdown, HTML or a table."""
    from rich.console import Console

    from detkit.report import load_report

    data = load_report(path / "report.json" if path.is_dir() else path)
    if out is not None:
        output_file(out)
    rendered = render(data, fmt)
    if isinstance(rendered, str):
        if out is not None:
            out.write_text(rendered)
        else:
            typer.echo(rendered, nl=False)
        return
    # The table has one column per check: never squeeze it below its natural width.
    console = Console(record=out is not None, width=max(Console().width, 140))
    console.print(rendered)
    if data.get("kind") == "audit":
        for line in (data.get("summary") or {}).get("advice", []):
            console.print(f"- {line}", highlight=False, markup=False)
    if out is not None:
        out.write_text(console.export_text())


def register(app: typer.Typer) -> None:
    """Add `detkit report` to the detkit app."""
    app.command("report")(report)
