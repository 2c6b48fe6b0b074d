"""`detkit coverage`: which of a model's ops the mode computes, and which it leaves to torch.

Runs a short greedy ``generate`` of the model twice: once traced (``trace_ops``: every
aten op that reaches a backend, sorted by ``coverage_report`` into routed, exact, not
portable and uncovered), once under ``batch_invariant()`` (the calls that were routed,
that fell back to torch, and in portable mode that took torch's math library). With
``--portable`` it also checks the tables the model computed when it was built (RoPE
frequencies, sinusoidal positions: ``detkit.check_computed_buffers``). Exit 1 when
anything is uncovered (or, with ``--portable``, not portable): a CI can gate on it.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from detkit.report import dumps as _dumps

DEFAULT_PROMPTS = ("Batch invariance means", "hi")
INTERRUPTED = 130


def _trace_and_run(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, portable: bool,
                   device: str) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    import detkit
    from detkit.buffers import check_computed_buffers
    from detkit.mode import coverage_report, trace_ops
    from detkit.probe.hf import HFEngine, _no_model_generation_defaults

    # The batch is padded here, as probe pads it: a causal LM on the left, an encoder on the
    # right. tokenizer(padding=True) needs a pad token, and a tokenizer may have no pad and
    # no eos token either: then probe's fallback (a model eos id, else 0), masked out.
    engine = HFEngine(model, tokenizer, new_tokens_option="--new-tokens")
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, engine.pad_id) if i is not None)
    if tokenizer.pad_token_id is None:
        print(f"note: the tokenizer has no pad token; padding with id {pad_id} (masked out)", file=sys.stderr)
    encoded = [engine.encode(p) for p in prompts]
    width = max(len(ids) for ids in encoded)
    # past its position table a model raises IndexError deep in generate (GPT-2's wpe)
    longest = prompts[[len(ids) for ids in encoded].index(width)]
    engine.check_fits(width, new_tokens, f"prompt {longest[:40]!r}")
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        start = 0 if engine.encoder_decoder else width - len(ids)
        input_ids[row, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, start:start + len(ids)] = 1
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)

    # A fresh config, as probe's: generate fills what it is not given from the checkpoint's
    # generation_config, whose num_beams or no_repeat_ngram_size would trace beam search or an
    # n-gram blocker, not the greedy decoding the table reports. min_new_tokens: an early eos
    # would leave the decode steps untraced.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              use_cache=True, pad_token_id=pad_id, eos_token_id=sorted(engine.eos_ids) or None,
                              decoder_start_token_id=engine.decoder_start_id)

    def generate() -> None:
        with torch.no_grad(), _no_model_generation_defaults(model):
            model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)

    _, ops = trace_ops(generate)
    static = coverage_report(ops, portable=portable, device="CUDA" if device.startswith("cuda") else "CPU")
    with detkit.batch_invariant(portable=portable) as bi:
        generate()
    # the overrides' names ("mm", "sum.dim_IntList") as full overload names, as the static report has them
    runtime = {key: {op if "." in op else f"{op}.default": v for op, v in counts.items()}
               for key, counts in (("routed", bi.routed()), ("uncovered", bi.uncovered()),
                                   ("not_portable", bi.not_portable()))}
    # RoPE and sinusoidal tables, computed by torch's pow, exp, sin, cos when the model was built
    buffers = [c.to_dict() for c in check_computed_buffers(model)] if portable else []
    findings = bool(static.uncovered or runtime["uncovered"]
                    or (portable and (static.not_portable or runtime["not_portable"]
                                      or any(b["differing"] for b in buffers))))
    return {
        "static": {"routed": static.routed, "exact": static.exact, "not_portable": static.not_portable,
                   "uncovered": static.uncovered, "notes": static.notes},
        "runtime": runtime,
        "buffers": buffers,
        "ok": not findings,
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _print(result: dict[str, Any], show_exact: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=max(Console().width, 120))
    static, runtime, portable = result["static"], result["runtime"], result["portable"]
    m = result["model"]
    # Text, not a str: a str title is rich markup, and a model path such as runs/x[/y] is not
    table = Table(title=Text(f"detkit coverage: {m['model']} ({m['dtype']}, {m['attn_implementation']}, "
                             f"{m['device']}), {'portable' if portable else 'batch-invariant'} mode, greedy generate "
                             f"of {_count(len(result['prompts']), 'prompt')} x "
                             f"{_count(result['new_tokens'], 'token')}"),
                  title_justify="left")
    for col in ("aten op", "calls", "under the mode", "why"):
        table.add_column(col, overflow="fold")
    styles = {"routed": ("routed", "green"), "exact": ("exact", ""), "not_portable": ("NOT PORTABLE", "bold yellow"),
              "uncovered": ("UNCOVERED", "bold red")}
    for key in ("uncovered", "not_portable", "routed", "exact") if show_exact else ("uncovered", "not_portable", "routed"):
        label, style = styles[key]
        for op, n in sorted(static[key].items()):
            table.add_row(Text(op), str(n), Text(label, style=style), Text(static["notes"].get(op, "")))
    console.print(table)
    if not show_exact:
        console.print(Text(f"and {len(static['exact'])} exact ops (views, indexing, comparisons, integer ops, IEEE "
                           "add/mul/div/sqrt: the same bits in any order and batch); --all lists them", style="dim"))
    routed_calls = sum(runtime["routed"].values())
    console.print(Text(f"under batch_invariant(portable={portable}): {routed_calls} routed calls"
                       f"{'' if runtime['uncovered'] else ', none fell back to torch'}"))
    for key, what in (("uncovered", "fell back to torch"), ("not_portable", "took torch's math library")):
        for op, reasons in sorted(runtime[key].items()):
            for reason, n in sorted(reasons.items()):
                console.print(Text(f"  {op}: {n} calls {what} ({reason})", style="yellow"))
    for b in result["buffers"]:
        if b["differing"]:
            console.print(Text(f"  buffer {b['name']}: {b['differing']} of {b['numel']} elements, computed by torch's "
                               "math library when the model was built, differ from the portable values: build the "
                               "model inside batch_invariant(portable=True), or call "
                               "detkit.check_computed_buffers(model, fix=True)", style="yellow"))
        elif b["skipped"]:
            console.print(Text(f"  buffer {b['name']} not checked: {b['skipped']}", style="dim"))
    if result["ok"]:
        console.print(Text("verdict: every op is computed by detkit or exact"
                           + (" and portable" if portable else ""), style="green"))
    else:
        console.print(Text("verdict: ops or buffers left to torch (UNCOVERED" + (" / NOT PORTABLE" if portable else "")
                           + "): their bits are torch's; check them with a test (detkit.testing), and see "
                             "docs/mode.md for what each note means", style="bold red"))


def register(app: typer.Typer) -> None:
    """Add ``detkit coverage`` to the detkit app."""

    @app.command("coverage")
    def coverage(
        model: Annotated[str, typer.Option(
            "--model", help="A built-in preset (tiny-llama, tiny-gpt2, tiny-qwen2, tiny-mixtral) or a local HF "
                            "model directory.")] = "tiny-llama",
        dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")] = "auto",
        attn: Annotated[str, typer.Option("--attn", help="Attention implementation: eager or sdpa.")] = "eager",
        device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
        portable: Annotated[bool, typer.Option(
            "--portable", help="Check batch_invariant(portable=True): math-library functions count too.")] = False,
        prompts: Annotated[list[str] | None, typer.Option(
            "--prompt", help="A prompt (repeat for several; default two of different lengths, so the batch is "
                             "padded).")] = None,
        new_tokens: Annotated[int, typer.Option("--new-tokens", help="Greedy tokens generated per run.")] = 4,
        show_all: Annotated[bool, typer.Option("--all", help="List the exact ops too.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")] = False,
    ) -> None:
        """Which of a model's ops the mode computes, which are exact, and which it leaves to torch."""
        from detkit.cli import EXIT_CHECK_FAILED, sigterm_as_interrupt
        from detkit.errors import InputError
        from detkit.probe.hf import load_model

        if new_tokens < 1:
            raise InputError(f"--new-tokens must be at least 1, got {new_tokens}")
        if attn not in ("eager", "sdpa"):
            raise InputError(f"--attn must be eager or sdpa, got {attn!r}")
        if not model.strip():  # Path("") is the current directory
            raise InputError("--model is empty: give a preset name (tiny-llama, ...) or a model directory")
        texts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
        if any(not p for p in texts):
            raise InputError("--prompt must not be empty")
        try:
            # SIGTERM (a CI timeout, docker stop) ends the run as Ctrl-C does: exit 130
            with sigterm_as_interrupt() as stop:
                hf_model, tokenizer, desc = load_model(model, dtype=dtype, attn_implementation=attn, device=device)
                print(f"tracing and running {desc['model']} ...", file=sys.stderr)
                result = {"model": desc, "portable": portable, "prompts": texts, "new_tokens": new_tokens,
                          **_trace_and_run(hf_model, tokenizer, texts, new_tokens, portable, desc["device"])}
            if stop.requested:
                # caught inside a library (a lazy import, an except BaseException): the run went
                # on, but it was asked to stop, and a CI must not read it as passing
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            print(f"interrupted: no coverage reported (exit {INTERRUPTED})", file=sys.stderr)
            raise typer.Exit(INTERRUPTED) from None
        if json_out:
            typer.echo(_dumps(json.loads(json.dumps(result, default=str))))
        else:
            _print(result, show_all)
        if not result["ok"]:
            raise typer.Exit(EXIT_CHECK_FAILED)
