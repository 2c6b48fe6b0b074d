"""`detkit audit`: measure which ops are nondeterministic or batch variant on this machine."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from detkit.cli import EXIT_CHECK_FAILED, output_dir, sigterm_as_interrupt
from detkit.report import dumps as _dumps

if TYPE_CHECKING:  # pragma: no cover - torch is imported only when a command runs
    from rich.console import Console

    from detkit.audit.runner import AuditConfig
    from detkit.report import ReportWriter

INTERRUPTED = 130

def _command_line(cfg: AuditConfig) -> str:
    """The canonical command that reproduces this audit (the report records it)."""
    parts = ["detkit", "audit", "--ops", ",".join(cfg.ops)]
    # Defaulted impls stay defaulted: named, one that is unavailable here would make the
    # rerun a usage error instead of the same audit (the default skips it and says so).
    if cfg.impls_explicit:
        parts += ["--impl", ",".join(cfg.impls)]
    parts += ["--dtype", ",".join(cfg.dtypes), "--batch-sizes", ",".join(map(str, cfg.batch_sizes)),
              "--runs", str(cfg.runs), "--device", cfg.device, "--seed", str(cfg.seed), "--hidden", str(cfg.hidden)]
    if cfg.isa:
        parts.append("--isa")
    if cfg.fail_on:  # the report's verdict on the gate and the exit code depend on it
        parts += ["--fail-on", ",".join(cfg.fail_on)]
    return " ".join(parts)


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


def audit(
    ops: Annotated[str | None, typer.Option(
        "--ops", help="Comma-separated ops (default: the whole catalogue; see --list-ops).")] = None,
    impl: Annotated[str | None, typer.Option(
        "--impl", help="Implementations: torch, deterministic, detkit, portable (default: all available).")] = None,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Comma-separated dtypes: float32, bfloat16, float16.")] = "float32",
    batch_sizes: Annotated[str | None, typer.Option(
        "--batch-sizes", help="Comma-separated batch sizes of the sweep (default 1,2,3,4,5,8,16; on cuda up to 256).")
    ] = None,
    runs: Annotated[int, typer.Option("--runs", help="Repetitions for the run-to-run check (>= 2).")] = 3,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Directory for report.json, report.md and report.html (JSON written as records finish).")
    ] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the report JSON on stdout (progress goes to stderr).")] = False,
    fail_on: Annotated[str | None, typer.Option(
        "--fail-on", help="Exit 1 if any audited op x implementation fails one of these checks, comma-separated: "
        "run-to-run, batch-variance, batch-position, thread-variance, padding, decode-prefill, isa-variance "
        "(needs --isa), or any (every check that runs).")] = None,
    isa: Annotated[bool, typer.Option(
        "--isa", help="Also compare against subprocesses under lower ATEN_CPU_CAPABILITY values (CPU).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the op inputs.")] = 0,
    hidden: Annotated[int, typer.Option("--hidden", help="Model width the op shapes are derived from.")] = 4096,
    list_ops: Annotated[bool, typer.Option(
        "--list-ops", help="List the op catalogue and the checks, then exit.")] = False,
) -> None:
    """Measure which ops are run-to-run nondeterministic, batch, thread, padding or ISA variant here."""
    from rich.console import Console
    from rich.markup import escape

    from detkit.audit import CATALOGUE, CHECK_HELP
    from detkit.audit.impls import parse_impls
    from detkit.audit.runner import (
        CUDA_BATCH_SIZES,
        DEFAULT_BATCH_SIZES,
        AuditConfig,
        parse_batch_sizes,
        parse_fail_on,
    )
    from detkit.errors import InputError

    console = Console(stderr=json_out, highlight=False)
    if list_ops:
        if json_out:  # for scripts that pick ops from the catalogue
            typer.echo(json.dumps({"ops": [{"name": spec.name, "family": spec.family, "summary": spec.summary}
                                           for spec in CATALOGUE], "checks": dict(CHECK_HELP)}, indent=2))
            return
        for spec in CATALOGUE:
            console.print(f"[bold]{spec.name:30}[/] {spec.family:14} {escape(spec.summary)}", soft_wrap=True)
        console.print()
        for check, text in CHECK_HELP.items():
            console.print(f"[bold]{check:30}[/] {escape(text)}", soft_wrap=True)
        return

    if ops is not None and not _split(ops):
        # an empty $OPS in a script must not quietly audit the whole catalogue
        raise InputError("--ops names no op; pass op names (see --list-ops), or leave --ops out for the "
                         "whole catalogue")
    cfg = AuditConfig(
        ops=tuple(_split(ops)) or AuditConfig.ops,
        impls=tuple(parse_impls(impl)),
        dtypes=tuple(dict.fromkeys(_split(dtype))),  # once each, as --ops and --impl
        batch_sizes=(parse_batch_sizes(batch_sizes) if batch_sizes is not None
                     else CUDA_BATCH_SIZES if device == "cuda" else DEFAULT_BATCH_SIZES),
        runs=runs,
        device=device,
        seed=seed,
        hidden=hidden,
        isa=isa,
        fail_on=parse_fail_on(fail_on, isa=isa),
        impls_explicit=impl is not None,
    )
    if out is not None:  # after the arguments are checked, before any work
        _report_files(output_dir(out))
    code = _run(cfg, out, json_out, console)
    if code:
        raise typer.Exit(code)


REPORT_FILES = ("report.json", "report.md", "report.html")


def _report_files(out: Path) -> None:
    """Refuse an --out whose report files cannot be written, before the audit runs: found
    after it, the run's Markdown and HTML were lost to a traceback (exit 1, as a failed gate)."""
    from detkit.errors import InputError

    for name in REPORT_FILES:
        path = out / name
        if path.is_dir():
            raise InputError(f"--out {out}: {path} is a directory; remove it or pass another --out directory")
        # report.json is replaced by a rename (the directory's permission); the others are rewritten
        if name != "report.json" and path.exists() and not os.access(path, os.W_OK):
            raise InputError(f"--out {out}: {path} is not writable; remove it or pass another --out directory")


def _run(cfg: AuditConfig, out: Path | None, json_out: bool, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from detkit.audit.render import SHORT, short_cell, short_cell_width
    from detkit.audit.runner import Event, probe_impls, resolve_device, run_audit
    from detkit.report import ReportWriter

    checks = [c for c in SHORT if c != "isa-variance" or cfg.isa]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    task = progress.add_task("starting", total=None)
    # cells hold up to 10 characters ("FAIL 0.02%"), more for "FAIL b>=N" of a sweep past
    # b=99 (the cuda sweep's "FAIL b>=128" is 11): one more keeps a space between them
    width = short_cell_width(cfg.batch_sizes) + 1
    header = Text(f"{'op':29}{'dtype':9}{'impl':14}" + "".join(f"{SHORT[c]:{width}}" for c in checks) + "seconds",
                  style="bold")

    def listen(event: Event) -> None:
        if event.kind == "start":
            progress.update(task, total=event.total)
            progress.console.print(header, soft_wrap=True)
        elif event.kind == "stage":
            progress.console.print(event.text, style="dim", soft_wrap=True, markup=False)
            progress.update(task, description=event.text)
        elif event.kind == "phase":
            progress.update(task, description=event.text)
        else:
            r = event.record
            line = Text(f"{r['op'][:28]:29}{r['dtype']:9}{r['impl']:14}")
            for c in checks:
                text, style = short_cell(r["checks"].get(c, {}), c)
                line.append(f"{text:{width}}", style=style)
            line.append(f"{r['seconds']:.1f}")
            progress.console.print(line, soft_wrap=True)
            progress.advance(task)

    device = resolve_device(cfg.device)
    config = {**cfg.to_dict(), "command": _command_line(cfg)}
    config.pop("impls_explicit")
    with sigterm_as_interrupt() as stop:
        interrupted = False
        try:
            # usage and environment errors (no GPU, a requested impl that cannot run) surface
            # before any report file exists
            availability = probe_impls(cfg, device)
        except KeyboardInterrupt:
            availability, interrupted = None, True
        with stop.held():  # interrupted or not, --out gets this run's report, not an earlier one
            writer = ReportWriter("audit", config, out / "report.json" if out else None)
        failure: Exception | None = None
        if availability is not None and not stop.requested:
            try:
                with progress:
                    run_audit(cfg, writer, listen, availability)
            except KeyboardInterrupt:
                interrupted = True
            except Exception as exc:
                # stopped halfway (a full disk, a bug): the finished records are kept as on
                # Ctrl-C, then the error ends the command as usual (traceback, exit 3)
                failure = exc
                writer.add_error("audit", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
        # partial: not every record was measured; a signal after that only changes the exit code
        partial = interrupted or stop.requested or failure is not None
        with stop.held():
            code = _finish(cfg, writer, partial, out, json_out, console)
        done = len([r for r in writer.data["results"] if r.get("record") == "op"])
        kept = ("the report holds them and is marked partial" if out is not None or json_out
                else "no --out or --json given, only the table above shows them")
        if failure is not None:
            console.print(f"[bold red]failed[/] after {done} op record(s): {kept}", soft_wrap=True)
            raise failure
        if partial or stop.requested:
            if not partial:
                when = "after the audit finished: the report is complete"
            elif done:
                when = f"after {done} op record(s): {kept}"
            else:
                when = "before any op was audited" + (": the report is marked partial" if out is not None or json_out
                                                      else "")
            console.print(f"[bold yellow]interrupted[/] {when}", soft_wrap=True)
            return INTERRUPTED
    return code


def _finish(cfg: AuditConfig, writer: ReportWriter, partial: bool, out: Path | None, json_out: bool,
            console: Console) -> int:
    """Write the report's files and print the summary; returns the exit code of the gate."""
    from detkit.audit.render import to_html, to_markdown
    from detkit.audit.summary import summarize
    from detkit.audit.vocab import CELL_LEGEND, IMPL_HELP

    summary = summarize(writer.data, cfg.fail_on)
    report = writer.finish(summary, partial=partial)
    if out is not None:
        (out / "report.md").write_text(to_markdown(report))
        (out / "report.html").write_text(to_html(report))

    if json_out:
        sys.stdout.write(_dumps(report) + "\n")
    # what the live table's columns mean, for a first-time reader (`--list-ops` explains the checks)
    console.print()
    console.print("; ".join(f"{i}: {IMPL_HELP[i]}" for i in cfg.impls), style="dim", markup=False, soft_wrap=True)
    console.print(f"{CELL_LEGEND} (`detkit audit --list-ops` explains each check)", style="dim", markup=False,
                  soft_wrap=True)
    console.print()
    for line in summary["advice"]:
        console.print(f"- {line}", markup=False, soft_wrap=True)
    errors = report.get("errors") or []
    if errors:  # the advice points here; the full tracebacks are in report.json
        console.print(f"\nerrors ({len(errors)}):", markup=False)
        for e in errors[:10]:
            console.print(f"  {e['where']}: {e['error'].splitlines()[0]}", markup=False, soft_wrap=True)
        if len(errors) > 10:
            console.print(f"  ... {len(errors) - 10} more (report.json)", markup=False)
    if out is not None:
        console.print(f"\nreport: {out / 'report.json'} (+ report.md, report.html)", markup=False, soft_wrap=True)
    if summary["fail_on"]["failed"]:
        failed = summary["fail_on"]["failed"]
        console.print(f"[bold red]--fail-on {','.join(cfg.fail_on)}: {len(failed)} failing[/]")
        for item in failed[:20]:
            console.print(f"  {item}", markup=False, soft_wrap=True)
        if len(failed) > 20:
            console.print(f"  ... {len(failed) - 20} more")
        return EXIT_CHECK_FAILED
    return 0


def register(app: typer.Typer) -> None:
    """Add `detkit audit` to the detkit app."""
    app.command("audit")(audit)
