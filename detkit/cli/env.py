"""`detkit env`: print the environment fingerprint (rich table, or JSON with --json)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from detkit.report import dumps as _dumps

_SECTION_TITLES = {
    "versions": "Versions",
    "platform": "CPU and platform",
    "threads": "Threads",
    "blas": "BLAS / LAPACK",
    "cuda": "CUDA",
    "determinism": "torch determinism flags",
    "env_vars": "Environment variables",
    "cuda_compile_options": "CUDA compile options (detkit kernels)",
}


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _style(value: Any) -> str:
    text = str(value)
    if text.startswith("error"):
        return "red"
    if text.startswith("absent") or text == "unset":
        return "dim"
    return ""


def _print_table(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="detkit environment fingerprint", show_lines=False, title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for section, title in _SECTION_TITLES.items():
        values = data.get(section)
        table.add_section()
        table.add_row(f"[bold]{title}[/]", "")
        if isinstance(values, dict):
            for key, value in values.items():
                if section == "cuda" and key == "devices" and isinstance(value, list):
                    for i, dev in enumerate(value):
                        table.add_row(f"  device {i}", Text(_cell(dev)), style=_style(dev))
                    continue
                # Text(): values are shown literally, never parsed as rich markup.
                table.add_row(Text(f"  {key}"), Text(_cell(value)), style=_style(value))
        else:
            table.add_row("  value", Text(_cell(values)), style=_style(values))
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``detkit env`` to the detkit app."""

    @app.command("env")
    def env(
        as_json: Annotated[bool, typer.Option("--json", help="Print the fingerprint as JSON only.")] = False,
    ) -> None:
        """Show what on this machine decides reproducibility: versions, ISA, threads, BLAS, GPU, flags, env vars."""
        from detkit.env import fingerprint

        data = fingerprint().to_dict()
        if as_json:
            typer.echo(_dumps(data))
        else:
            _print_table(data)
