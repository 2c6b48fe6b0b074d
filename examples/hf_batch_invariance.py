"""A Hugging Face model's greedy logits change with the batch on this CPU; not under detkit.

Runs one prompt alone, then inside batches of other prompts (left padded) at several
positions, greedy, with and without ``detkit.batch_invariant()``, and prints per batch
how the target's per-step logits and tokens compare with the alone run.

    python examples/hf_batch_invariance.py [--model tiny-llama] [--dtype float32] [--attn eager]
    # greedy tokens flip too: bf16 + sdpa, tokens differ from step 6 in 5 of 6 batches here
    python examples/hf_batch_invariance.py --dtype bfloat16 --attn sdpa --target "The quick brown fox" --new-tokens 26

Uses detkit's offline presets (seeded random weights, byte tokenizer): no download.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import detkit
from detkit.compare import diff, first_divergence
from detkit.models import PRESETS, build_tokenizer, load_preset

TARGET = "Batch invariance means"
OTHERS = ["A much longer prompt, which pads the others", "Hi", "short one", "The quick brown fox jumps", "zz"]
BATCHES = [(2, 1), (3, 0), (4, 3), (8, 5), (16, 0), (16, 15)]  # (batch size, target position)


def generate(model: object, tokenizer: object, prompts: list[str], new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(prompts, padding=True, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        out = model.generate(  # type: ignore[attr-defined]
            **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    return torch.stack(out.logits, 1), out.sequences[:, enc.input_ids.shape[1] :]


def compare(model: object, tokenizer: object, target: str, new_tokens: int) -> list[tuple[str, str]]:
    """For each batch: (logits verdict, tokens verdict) of the target vs its alone run."""
    alone_logits, alone_tokens = generate(model, tokenizer, [target], new_tokens)
    rows = []
    for size, pos in BATCHES:
        prompts = [OTHERS[i % len(OTHERS)] for i in range(size)]
        prompts[pos] = target
        logits, tokens = generate(model, tokenizer, prompts, new_tokens)
        steps = [s for s in range(new_tokens) if not diff(logits[pos, s], alone_logits[0, s]).ok]
        if steps:
            worst = max(float((logits[pos, s].float() - alone_logits[0, s].float()).abs().max()) for s in steps)
            verdict = f"[red]{len(steps)}/{new_tokens} steps differ[/], max |d| {worst:.1e}"
        else:
            verdict = "[green]bitwise equal[/]"
        div = first_divergence(tokens[pos].tolist(), alone_tokens[0].tolist())
        rows.append((verdict, "[green]same[/]" if div is None else f"[red]differ from token {div}[/]"))
    return rows


def count(text: str) -> int:
    """argparse type for --new-tokens: a usage error, not a traceback, below 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=PRESETS, default="tiny-llama")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    parser.add_argument("--new-tokens", type=count, default=16)
    parser.add_argument("--target", default=TARGET, help="the prompt whose generation is compared")
    args = parser.parse_args()

    model = load_preset(args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn)
    tokenizer = build_tokenizer()
    t0 = time.perf_counter()
    plain = compare(model, tokenizer, args.target, args.new_tokens)
    t1 = time.perf_counter()
    with detkit.batch_invariant() as bi:
        routed = compare(model, tokenizer, args.target, args.new_tokens)
    t2 = time.perf_counter()

    table = Table(title=f"{args.model} {args.dtype} {args.attn}: target prompt vs. generated alone ({args.new_tokens} greedy steps)")
    for col in ("batch", "position", "torch: logits", "torch: tokens", "detkit mode: logits", "detkit mode: tokens"):
        table.add_column(col)
    for (size, pos), (pl, pt), (rl, rt) in zip(BATCHES, plain, routed):
        table.add_row(str(size), str(pos), pl, pt, rl, rt)
    console = Console(width=130)
    console.print(table)
    console.print(f"time: torch {t1 - t0:.1f} s, detkit mode {t2 - t1:.1f} s (includes first-use compilation)")
    console.print(f"ops that fell back to torch under the mode: {bi.uncovered() or 'none'}")


if __name__ == "__main__":
    main()
