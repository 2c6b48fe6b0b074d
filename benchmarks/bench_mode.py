"""Benchmark: what ``detkit.batch_invariant()`` costs a whole model.

Greedy ``generate`` of a preset model (offline, no download) with and without the mode,
interleaved repeats in the same run, medians; ``ratio`` = mode / plain (above 1: the
mode is slower). Also reports the ops that fell back to torch under the mode. Usage::

    python benchmarks/bench_mode.py                                  # CPU, float32
    python benchmarks/bench_mode.py --device cuda --dtype bfloat16 --json out.json
    python benchmarks/bench_mode.py --portable --batch-sizes 1,8 --new-tokens 32
    python benchmarks/bench_mode.py --relu-linear      # one layer whose input rows start with zeros

On the CPU the cost is mostly fixed-height BLAS tiles (a 2-row decode matmul computes a
whole 16-row float32 tile, or bfloat16 one of the smallest height that verifies: 64 rows
on an AMX Xeon, 32 on an AVX-512 EPYC; so that no row's bits depend on M) and one
Python adapter per routed op; on CUDA, the adapter, the launch and one stream
synchronisation per routed bmm and softmax (eager attention's; docs/mode.md, "Cost").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PROMPTS = ("Batch invariance means", "Hello there", "The quick brown fox jumps over", "ok",
           "Reproducible inference at temperature zero", "Left padding", "A", "Numbers: 1 2 3")


class _Timed:
    """Validation and ratio of a result with ``plain_ms`` and ``mode_ms`` (median ms)."""

    plain_ms: float
    mode_ms: float

    def __post_init__(self) -> None:
        if self.plain_ms <= 0 or self.mode_ms <= 0:
            raise ValueError(f"times must be positive: {self}")

    @property
    def ratio(self) -> float:
        return self.mode_ms / self.plain_ms


@dataclass
class Case(_Timed):
    """One batch size: median milliseconds of a whole generate call, plain and under the mode."""

    batch: int
    new_tokens: int
    plain_ms: float
    mode_ms: float
    fallbacks: dict[str, int]
    mode_first_ms: float  # the first call under the mode in this process for this batch size


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved(call: Callable[[], None], repeats: int,
                 portable: bool) -> tuple[float, float, dict[str, int], float]:
    """Median ms of ``call`` plain and under the mode, interleaved so that drift on a noisy
    machine hits both (after one call of each, left out of the medians: warm-up,
    compilation, tile checks), the most calls of each op that fell back to torch in one
    run under the mode, and the ms of that first call under the mode (reported apart)."""
    import detkit

    plain, mode = [], []
    fallbacks: dict[str, int] = {}
    call()
    with detkit.batch_invariant(portable=portable):
        t0 = time.perf_counter()
        call()
        first_mode = (time.perf_counter() - t0) * 1e3
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        plain.append((time.perf_counter() - t0) * 1e3)
        with detkit.batch_invariant(portable=portable) as bi:
            t0 = time.perf_counter()
            call()
            mode.append((time.perf_counter() - t0) * 1e3)
        for ops in bi.uncovered().values():
            for op, n in ops.items():
                fallbacks[op] = max(fallbacks.get(op, 0), n)
    return statistics.median(plain), statistics.median(mode), fallbacks, first_mode


def measure(model: Any, tokenizer: Any, batch: int, new_tokens: int, repeats: int, device: str,
            portable: bool) -> Case:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = tokenizer(prompts, padding=True, return_tensors="pt").to(device)

    def generate() -> None:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)

    return Case(batch, new_tokens, *_interleaved(generate, repeats, portable))


@dataclass
class LayerCase(_Timed):
    """One layer, plain vs under the mode: median milliseconds per call."""

    name: str
    plain_ms: float
    mode_ms: float


def measure_relu_linear(repeats: int, device: str, dtype: torch.dtype, portable: bool,
                        rows: int = 128, k: int = 3072, n: int = 768) -> LayerCase:
    """nn.Linear(k, n) on ``rows`` ReLU outputs: about half the rows start with exact
    zeros. The mode once skipped leading zeros in every matmul, which split this call into
    one kernel call per distinct start; now only batched products (attention) skip."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(k, n).to(device=device, dtype=dtype)
    x = torch.relu(torch.randn(rows, k, generator=g)).to(device=device, dtype=dtype)

    def call() -> None:
        with torch.no_grad():
            layer(x)
        _sync(device)

    plain_ms, mode_ms, _, _ = _interleaved(call, repeats * 10, portable)  # one call is milliseconds
    return LayerCase(f"Linear({k}, {n}) on {rows} ReLU rows", plain_ms, mode_ms)


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
    parser.add_argument("--relu-linear", action="store_true",
                        help="time one nn.Linear on ReLU rows instead of generate (no model needed)")
    args = parser.parse_args(argv)
    from detkit.devices import resolve_device
    from detkit.errors import DetkitError
    from detkit.models import build_tokenizer, load_preset

    try:
        device = str(resolve_device(args.device))
        batches = [int(b) for b in args.batch_sizes.split(",")]
        if min(batches) < 1 or args.new_tokens < 1 or args.repeats < 1:
            raise ValueError("batch sizes, --new-tokens and --repeats must be at least 1")
        if args.relu_linear:
            return _relu_linear(args, device)
        model = load_preset(args.preset, dtype=getattr(torch, args.dtype), attn_implementation=args.attn).to(device)
    except (DetkitError, ValueError) as err:
        print(f"bench_mode: {err}", file=sys.stderr)
        return 2
    tokenizer = build_tokenizer()
    meta = {"preset": args.preset, "device": device, "dtype": args.dtype, "attn": args.attn,
            "portable": args.portable, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None}
    print(f"# batch_invariant(portable={args.portable}) vs plain torch: {args.preset} {args.dtype} {args.attn} "
          f"on {meta['gpu'] or device} ({meta['threads']} threads), greedy generate, median of {args.repeats}; "
          "first call: the warm-up under the mode, timed but left out of the medians (tile checks and compilation "
          "of the shapes this process has not seen yet, so mostly the first batch size)")
    print("| batch | new tokens | plain ms | mode ms | ratio (mode / plain) | ops falling back | mode first call ms |")
    print("|---:|---:|---:|---:|---:|---|---:|")
    cases = []
    for batch in batches:
        case = measure(model, tokenizer, batch, args.new_tokens, args.repeats, device, args.portable)
        cases.append(case)
        fb = ", ".join(f"{op} x{n}" for op, n in sorted(case.fallbacks.items())) or "none"
        print(f"| {case.batch} | {case.new_tokens} | {case.plain_ms:.1f} | {case.mode_ms:.1f} | {case.ratio:.2f} | {fb} "
              f"| {case.mode_first_ms:.1f} |", flush=True)
        if args.json:  # after each case: an interruption keeps the finished ones
            args.json.write_text(json.dumps({"meta": meta, "cases": [{**asdict(c), "ratio": round(c.ratio, 3)}
                                                                     for c in cases]}, indent=2))
    return 0


def _relu_linear(args: argparse.Namespace, device: str) -> int:
    case = measure_relu_linear(args.repeats, device, getattr(torch, args.dtype), args.portable)
    print(f"# batch_invariant(portable={args.portable}) vs plain torch: {args.dtype} on {device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats * 10} calls")
    print("| layer | plain ms | mode ms | ratio (mode / plain) |\n|---|---:|---:|---:|")
    print(f"| {case.name} | {case.plain_ms:.2f} | {case.mode_ms:.2f} | {case.ratio:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": {"device": device, "dtype": args.dtype, "portable": args.portable,
                                                  "torch": torch.__version__, "threads": torch.get_num_threads()},
                                         "layer": {**asdict(case), "ratio": round(case.ratio, 3)}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
