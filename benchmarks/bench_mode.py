"""Benchmark: what ``detkit.batch_invariant()`` costs a whole model.

Greedy ``generate`` of a preset model (offline, no download) with and without the mode,
interleaved repeats in the same run, medians; ``ratio`` = mode / plain (above 1: the
mode is slower). Also reports the ops that fell back to torch under the mode. Usage::

    python benchmarks/bench_mode.py                                  # CPU, float32
    python benchmarks/bench_mode.py --device cuda --dtype bfloat16 --json out.json
    python benchmarks/bench_mode.py --portable --batch-sizes 1,8 --new-tokens 32

On the CPU the cost is mostly fixed-height BLAS tiles (a 2-row decode matmul computes a
whole 16-row float32 / 64-row bfloat16 tile, so that no row's bits depend on M) and one
Python adapter per routed op; on CUDA, the adapter, the launch and one stream
synchronisation per routed bmm and softmax (eager attention's; docs/mode.md, "Cost").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PROMPTS = ("Batch invariance means", "Hello there", "The quick brown fox jumps over", "ok",
           "Reproducible inference at temperature zero", "Left padding", "A", "Numbers: 1 2 3")


@dataclass
class Case:
    """One batch size: median milliseconds of a whole generate call, plain and under the mode."""

    batch: int
    new_tokens: int
    plain_ms: float
    mode_ms: float
    fallbacks: dict[str, int]

    def __post_init__(self) -> None:
        if self.plain_ms <= 0 or self.mode_ms <= 0:
            raise ValueError(f"times must be positive: {self}")

    @property
    def ratio(self) -> float:
        return self.mode_ms / self.plain_ms


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model: Any, tokenizer: Any, batch: int, new_tokens: int, repeats: int, device: str,
            portable: bool) -> Case:
    import detkit

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = tokenizer(prompts, padding=True, return_tensors="pt").to(device)

    def generate() -> None:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)

    plain, mode = [], []
    fallbacks: dict[str, int] = {}
    generate()  # warm up torch (and, below, detkit's kernels: compilation, tile checks)
    with detkit.batch_invariant(portable=portable) as bi:
        generate()
    for _ in range(repeats):  # interleaved, so that drift on a noisy machine hits both
        t0 = time.perf_counter()
        generate()
        plain.append((time.perf_counter() - t0) * 1e3)
        with detkit.batch_invariant(portable=portable) as bi:
            t0 = time.perf_counter()
            generate()
            mode.append((time.perf_counter() - t0) * 1e3)
        for ops in bi.uncovered().values():
            for op, n in ops.items():
                fallbacks[op] = max(fallbacks.get(op, 0), n)
    return Case(batch, new_tokens, statistics.median(plain), statistics.median(mode), fallbacks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-llama", help="a detkit.models preset")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--portable", action="store_true", help="batch_invariant(portable=True)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    from detkit.devices import resolve_device
    from detkit.errors import DetkitError
    from detkit.models import build_tokenizer, load_preset

    try:
        device = str(resolve_device(args.device))
        batches = [int(b) for b in args.batch_sizes.split(",")]
        if min(batches) < 1 or args.new_tokens < 1 or args.repeats < 1:
            raise ValueError("batch sizes, --new-tokens and --repeats must be at least 1")
        model = load_preset(args.preset, dtype=getattr(torch, args.dtype), attn_implementation=args.attn).to(device)
    except (DetkitError, ValueError) as err:
        print(f"bench_mode: {err}", file=sys.stderr)
        return 2
    tokenizer = build_tokenizer()
    meta = {"preset": args.preset, "device": device, "dtype": args.dtype, "attn": args.attn,
            "portable": args.portable, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None}
    print(f"# batch_invariant(portable={args.portable}) vs plain torch: {args.preset} {args.dtype} {args.attn} "
          f"on {meta['gpu'] or device} ({meta['threads']} threads), greedy generate, median of {args.repeats}")
    print("| batch | new tokens | plain ms | mode ms | ratio (mode / plain) | ops falling back |")
    print("|---:|---:|---:|---:|---:|---|")
    cases = []
    for batch in batches:
        case = measure(model, tokenizer, batch, args.new_tokens, args.repeats, device, args.portable)
        cases.append(case)
        fb = ", ".join(f"{op} x{n}" for op, n in sorted(case.fallbacks.items())) or "none"
        print(f"| {case.batch} | {case.new_tokens} | {case.plain_ms:.1f} | {case.mode_ms:.1f} | {case.ratio:.2f} | {fb} |",
              flush=True)
        if args.json:  # after each case: an interruption keeps the finished ones
            args.json.write_text(json.dumps({"meta": meta, "cases": [{**asdict(c), "ratio": round(c.ratio, 3)}
                                                                     for c in cases]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
