"""`detkit probe`: temperature-0 generation under varied batches, diffed against a reference."""

from __future__ import annotations

import functools
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from detkit.cli import EXIT_CHECK_FAILED, EXIT_USAGE, output_dir, sigterm_as_interrupt
from detkit.errors import BackendUnavailable, InputError
from detkit.report import dumps as _dumps

INTERRUPTED = 130


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in _split(text))
    except ValueError as exc:
        raise InputError(f"{option} takes comma-separated positive integers such as 1,8,32, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise InputError(f"{option} takes comma-separated positive integers such as 1,8,32, got {text!r}")
    return values


def _command_line(argv: list[str]) -> str:
    # quoted for a shell: the report's command must reproduce the run when pasted, also
    # with a path that holds a space or a --modes list written "single, mixed"
    return shlex.join(["detkit", "probe", *argv])


def probe(
    suite_file: Annotated[
        Path | None, typer.Argument(help="A probe suite: a TOML file, or a shipped suite by name (default, feynman, tiny-llama-divergence); default: the built-in default suite.")
    ] = None,
    # model, dtype, attn, timeout and retries default to None so that one given to the
    # wrong engine (a local model's --dtype with --endpoint) is refused, not ignored.
    model: Annotated[
        str | None, typer.Option("--model", help="A preset (tiny-llama, tiny-gpt2, tiny-qwen2, tiny-mixtral; no download) or a local HF model directory (default: tiny-llama).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="auto, float32, bfloat16 or float16 (default auto: bfloat16 for presets, the checkpoint's dtype otherwise).")
    ] = None,
    attn: Annotated[str | None, typer.Option("--attn", help="Attention implementation for HF models: eager (default) or sdpa.")] = None,
    device: Annotated[
        str, typer.Option("--device", help="Where a local model runs: cpu, cuda or cuda:N (needs CUDA torch; CuPy for --batch-invariant).")
    ] = "cpu",
    modes: Annotated[
        str | None, typer.Option("--modes", help="Comma-separated: single, mixed, prefix, padding, decode, repeat (default: the suite's).")
    ] = None,
    batch_invariant: Annotated[
        bool, typer.Option("--batch-invariant", help="Run every forward pass (reference included) under detkit.batch_invariant().")
    ] = False,
    portable: Annotated[
        bool, typer.Option("--portable", help="Like --batch-invariant with portable=True: the same reference bits on every machine.")
    ] = False,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Probe an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1.")
    ] = None,
    served_model: Annotated[
        str | None, typer.Option("--served-model", help="Model name the server serves (default: the only one in GET /v1/models).")
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Send each prompt as one user chat message: a server through "
                                              "/v1/chat/completions, a local model through its tokenizer's chat "
                                              "template. Default: a server's as its --endpoint path names "
                                              "(.../chat/completions), else not."),
    ] = None,
    concurrency: Annotated[
        str | None, typer.Option("--concurrency", help="HTTP: comma-separated concurrency levels, e.g. 1,8,32 (the batch sizes).")
    ] = None,
    batch_sizes: Annotated[
        str | None, typer.Option("--batch-sizes", help="HF: comma-separated batch sizes (default: the suite's, 1,2,4,8).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Tokens to generate per request (default: the suite's).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the batch compositions and of preset weights (default: the suite's, 0).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Candidates kept per step (HF logits; HTTP logprobs, max 20).")] = 5,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="HTTP: seconds a request waits for the server to connect, to "
                                                     "start answering (generation included), and between reads of "
                                                     "the answer (default 120).")
    ] = None,
    retries: Annotated[int | None, typer.Option("--retries", help="HTTP: retries per request, exponential backoff (default 2).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory for report.json (written as modes finish), report.md and report.html.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report JSON on stdout (progress goes to stderr).")] = False,
    fail_on_divergence: Annotated[
        bool, typer.Option("--fail-on-divergence", help="Exit 1 unless every mode matches the reference (tokens and scores).")
    ] = False,
) -> None:
    """Generate at temperature 0 under varied batches and diff tokens and logits against a reference.

    The reference is the prompt alone at batch size 1. Each mode varies one thing
    (batch size, batch composition, shared prefixes, padding, prefill vs decode,
    repetition) and compares the token ids and per-step scores of every run with it.
    """
    from rich.console import Console

    from detkit.probe.runner import ProbeInterrupted
    from detkit.probe.suite import MODES, default_suite, load_suite

    console = Console(stderr=json_out, highlight=False)
    err_console = Console(stderr=True, highlight=False)
    suite = load_suite(suite_file) if suite_file is not None else default_suite()
    overrides: dict[str, Any] = {}
    if modes is not None:
        chosen = tuple(_split(modes))
        bad = [m for m in chosen if m not in MODES]
        if bad or not chosen:
            raise InputError(f"unknown mode(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(MODES)}")
        overrides["modes"] = chosen
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        overrides["max_new_tokens"] = max_new_tokens
    if seed is not None:
        overrides["seed"] = seed
    if endpoint is None and concurrency is not None:
        raise InputError("--concurrency applies to --endpoint; use --batch-sizes for a local model")
    if endpoint is not None and batch_sizes is not None:
        raise InputError("--batch-sizes applies to local models; use --concurrency with --endpoint")
    sizes_text = concurrency if endpoint is not None else batch_sizes
    import dataclasses

    batch = suite.batch
    if sizes_text is not None:
        option = "--concurrency" if endpoint is not None else "--batch-sizes"
        sizes = _ints(sizes_text, option)
        try:
            batch = dataclasses.replace(batch, sizes=sizes)
        except ValueError as exc:  # BatchPlan's own checks
            raise InputError(f"{option}: {exc}") from None
    try:
        suite = dataclasses.replace(suite, batch=batch, **overrides)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if out is not None:
        output_dir(out)  # before loading a model: a bad --out fails in a second
    try:
        # loading a model (or reaching a server) is the longest wait before the probe
        with sigterm_as_interrupt() as setup:
            engine = _engine(
                model=model, dtype=dtype, attn=attn, device=device, endpoint=endpoint, served_model=served_model,
                seed=suite.seed, top_k=top_k, timeout=timeout, retries=retries, batch_invariant=batch_invariant,
                portable=portable, chat=chat,
            )
        if setup.requested:  # a Ctrl-C that the model's loading caught (a library's except BaseException)
            engine.close()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/] before the probe started (while the engine was set up), nothing kept")
        raise typer.Exit(INTERRUPTED) from None
    unsupported = [m for m in suite.modes if m in engine.unsupported_modes] if modes is not None else []
    if unsupported:  # asked for by name: say so now, not after the references ran
        engine.close()
        raise InputError("; ".join(f"--modes {m}: {engine.unsupported_modes[m]}" for m in unsupported)
                         + "; leave it out for this engine")
    config = {
        "command": _command_line(sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "probe" else sys.argv[1:]),
        "engine": engine.describe(),
        "batch_invariant": batch_invariant or portable,
        "portable": portable,
        "suite": suite.to_dict(),
        "suite_file": str(suite_file) if suite_file is not None else None,
    }
    report_path = out / "report.json" if out is not None else None

    try:
        with sigterm_as_interrupt() as stop:
            report = _run(engine, suite, config, report_path, err_console)
    except KeyboardInterrupt as exc:
        engine.close()
        if not isinstance(exc, ProbeInterrupted):  # stopped before run_probe wrote anything
            err_console.print("[yellow]interrupted[/] before the probe started, nothing kept")
            raise typer.Exit(INTERRUPTED) from None
        if out is not None:
            _render_files(out)
            err_console.print(f"[yellow]interrupted:[/] finished modes kept in {escape(str(report_path))} (status partial)")
        if json_out:  # a pipe gets what finished, as with --out
            typer.echo(_dumps(exc.report))
            err_console.print("[yellow]interrupted:[/] the JSON on stdout holds the finished modes (status partial)")
        if out is None and not json_out:
            err_console.print("[yellow]interrupted[/] (no --out or --json given, nothing kept)")
        raise typer.Exit(INTERRUPTED)
    except Exception as exc:
        # A failure halfway (a CUDA out-of-memory at the largest batch, a server gone):
        # the finished modes are kept as on Ctrl-C, then the error is reported as usual.
        engine.close()
        partial = getattr(exc, "partial_report", None)
        if partial is not None:
            if out is not None:
                _render_files(out)
                err_console.print(f"[yellow]failed:[/] finished modes kept in {escape(str(report_path))} (status partial)")
            if json_out:
                typer.echo(_dumps(partial))
        raise
    engine.close()
    if out is not None:
        _render_files(out)
    if json_out:
        typer.echo(_dumps(report))
    else:
        _print_table(console, report)
        if out is not None:
            console.print(f"report: {out / 'report.json'}, {out / 'report.md'}, {out / 'report.html'}", markup=False)
    if stop.requested:  # a Ctrl-C or SIGTERM that a library caught: the run went on, but it was asked to stop
        err_console.print("[yellow]interrupted:[/] a Ctrl-C or SIGTERM arrived and was caught inside a library, "
                          "so the probe ran to the end; the report is written, and the exit is 130 so that a CI "
                          "does not take this run as passing")
        raise typer.Exit(INTERRUPTED)
    if fail_on_divergence and not report["summary"]["invariant"]:
        # 1: a difference was found; 2: nothing differed, but the probe could not decide
        # (failed runs, no mode ran): an environment problem, not a verdict on the engine.
        found = report["summary"]["differences_found"]
        code = EXIT_CHECK_FAILED if found else EXIT_USAGE
        verdict = report["summary"]["verdict"]
        prefix = "" if found or verdict.startswith("UNDECIDED") else "could not decide: "
        err_console.print(f"--fail-on-divergence: exit {code}: {prefix}{verdict}", markup=False, highlight=False,
                          soft_wrap=True)
        raise typer.Exit(code)


def _engine(
    *, model: str | None, dtype: str | None, attn: str | None, device: str, endpoint: str | None,
    served_model: str | None, seed: int, top_k: int, timeout: float | None, retries: int | None,
    batch_invariant: bool, portable: bool, chat: bool | None,
) -> Any:
    if endpoint is not None:
        from detkit.probe.http import HTTPEngine

        local = [opt for opt, value in (("--model", model), ("--dtype", dtype), ("--attn", attn)) if value is not None]
        if local:
            raise InputError(f"{', '.join(local)} {'applies' if len(local) == 1 else 'apply'} to local models; a server "
                             "runs its own model "
                             "(name it with --served-model)")
        if batch_invariant or portable:
            raise InputError("--batch-invariant/--portable switch detkit's kernels in this process; a server needs them on its side")
        if device != "cpu":
            raise InputError("--device applies to local models; a server runs where it runs")
        return HTTPEngine(endpoint, served_model, timeout=120.0 if timeout is None else timeout,
                          retries=2 if retries is None else retries, top_logprobs=top_k,
                          api=None if chat is None else "chat" if chat else "completions")
    if served_model is not None:
        raise InputError("--served-model applies to --endpoint; use --model for a local model")
    http = [opt for opt, value in (("--timeout", timeout), ("--retries", retries)) if value is not None]
    if http:
        raise InputError(f"{', '.join(http)} {'applies' if len(http) == 1 else 'apply'} to --endpoint; a local model "
                         "runs in this process")
    if model is not None and not model.strip():  # Path("") is the current directory
        raise InputError("--model is empty: give a preset name (tiny-llama, ...) or a model directory")
    model = "tiny-llama" if model is None else model
    dtype = "auto" if dtype is None else dtype
    attn = "eager" if attn is None else attn
    from detkit.buffers import check_computed_buffers
    from detkit.probe.hf import HFEngine, load_model

    if attn not in ("eager", "sdpa"):
        raise InputError(f"--attn must be eager or sdpa, got {attn!r}")
    mode = None
    if batch_invariant or portable:
        try:
            from detkit.mode import batch_invariant as bi
        except ImportError as exc:
            raise BackendUnavailable(f"detkit.batch_invariant is unavailable here ({exc}); run without --batch-invariant") from exc
        mode = functools.partial(bi, portable=portable)

    hf_model, tokenizer, desc = load_model(model, dtype=dtype, attn_implementation=attn, seed=seed, device=device)
    # torch's pow, exp, sin, cos computed the RoPE and position tables at load: portable ones instead
    checks = check_computed_buffers(hf_model, fix=True) if portable else []
    engine = HFEngine(hf_model, tokenizer, description=desc, top_k=top_k, mode=mode, chat=bool(chat))
    for c in checks:
        if c.fixed:
            engine.notes.append(f"--portable: {c.name} recomputed with the portable kernels ({c.differing} of {c.numel} "
                                "elements changed: torch's math library computed them when the model was loaded)")
        elif c.skipped:
            engine.notes.append(f"--portable: {c.name} not checked ({c.skipped}): its table is torch's")
    return engine


def _run(engine: Any, suite: Any, config: dict[str, Any], report_path: Path | None, err: Any) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from detkit.probe.runner import run_probe, total_work

    for note in engine.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")
    seen = len(engine.notes)
    with Progress(
        TextColumn("[bold]probe[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, transient=True,
    ) as progress:
        task = progress.add_task("references", total=total_work(engine, suite, suite.seed))

        def advance(label: str) -> None:
            nonlocal seen
            progress.update(task, advance=1, description=label)
            for note in engine.notes[seen:]:
                progress.console.print(f"[yellow]note:[/] {escape(note)}")
            seen = len(engine.notes)

        return run_probe(engine, suite, seed=suite.seed, config=config, out=report_path, advance=advance)


def _render_files(out: Path) -> None:
    from detkit.probe.render import render_html, render_markdown
    from detkit.report import load_report

    report = load_report(out / "report.json")
    (out / "report.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _print_table(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    engine = report["config"]["engine"]
    what = engine.get("model") or engine.get("served_model")
    title = f"detkit probe: {what} ({engine.get('dtype', engine.get('endpoint'))})"
    if report["config"].get("batch_invariant"):
        title += ", batch_invariant" + ("(portable=True)" if report["config"].get("portable") else "()")
    # a title is rich markup: a model path such as runs/[/x] must be printed as text
    table = Table(title=escape(title))
    for col in ("mode", "runs", "uniq", "div", "1st", "max|Δ|", "ULP", "flips", "margin"):
        table.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    for m in report["modes"]:
        if m["skipped"]:
            table.add_row(m["name"], "skip", "-", "-", "-", "-", "-", "-", "-")
            continue
        positions = [d["position"] for d in m["divergences"]]
        diff = m["max_abs_logit_diff"] if m["max_abs_logit_diff"] is not None else m["max_abs_logprob_diff"]
        table.add_row(
            m["name"],
            f"{m['runs']}" + (f" ({m['failed_runs']} failed)" if m["failed_runs"] else ""),
            _fmt(m["unique_completions"]),
            str(len(positions)),
            _fmt(min(positions)) if positions else "-",
            _fmt(diff),
            _fmt(m["max_ulp"]),
            _fmt(m["flip_share"], 3),
            _fmt(m["min_margin_at_divergence"]),
        )
    console.print(table)
    console.print(
        "uniq: unique completions incl. the reference; div: diverging runs; 1st: earliest divergence step; "
        "max|Δ|: max |delta score| (logit or logprob) up to and including the divergence step; flips: share of compared steps whose "
        "argmax flipped; margin: smallest reference top1-top2 margin at a divergence",
        style="dim",
    )
    for m in report["modes"]:
        if m["skipped"]:
            console.print(f"[yellow]skipped {escape(m['name'])}:[/] {escape(m['skipped'])}")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}")
    colour = {True: "green", False: "red"}.get(report["summary"]["invariant"], "yellow")
    console.print(f"[{colour}]{escape(report['summary']['verdict'])}[/]")


def register(app: typer.Typer) -> None:
    """Add ``detkit probe`` to the detkit app."""
    app.command(name="probe")(probe)
