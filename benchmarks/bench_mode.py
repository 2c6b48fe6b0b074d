"""Benchmark: what ``detkit.batch_invariant()`` costs a whole model.

Greedy ``generate`` of a preset model (offline, no download) or of a local model directory
(``--preset DIR``) with and without the mode,
interleaved repeats in the same run, medians; ``ratio`` = mode / plain (above 1: the
mode is slower). Also reports the ops that fell back to torch under the mode. Usage::

    python benchmarks/bench_mode.py                                  # CPU, float32
    python benchmarks/bench_mode.py --device cuda --dtype bfloat16 --json out.json
    python benchmarks/bench_mode.py --portable --batch-sizes 1,8 --new-tokens 32
    python benchmarks/bench_mode.py --relu-linear      # one layer whose input rows start with zeros
    python benchmarks/bench_mode.py --conv [--portable]   # convolutions (Mamba's, a ViT's), routed as patch products
    python benchmarks/bench_mode.py --reductions [--portable]   # logsumexp, var, vector_norm, F.normalize
    python benchmarks/bench_mode.py --vision [--portable]   # vision towers' pooling and interpolation

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
    routed_calls: int = 0  # calls the mode ran through detkit's kernels in one generate

    @property
    def extra_us_per_routed_call(self) -> float | None:
        """What the mode added to a generate, per routed call: its whole cost as if every
        routed call carried it (a small model's decode is per-call overhead)."""
        return (self.mode_ms - self.plain_ms) * 1e3 / self.routed_calls if self.routed_calls else None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved(call: Callable[[], None], repeats: int,
                 portable: bool) -> tuple[float, float, dict[str, int], float, int]:
    """Median ms of ``call`` plain and under the mode, interleaved so that drift on a noisy
    machine hits both (after one call of each, left out of the medians: warm-up,
    compilation, tile checks), the most calls of each op that fell back to torch in one
    run under the mode, the ms of that first call under the mode (reported apart), and
    how many calls one run under the mode routed to detkit's kernels."""
    import detkit

    plain, mode = [], []
    fallbacks: dict[str, int] = {}
    routed = 0
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
        routed = sum(bi.routed().values())
    return statistics.median(plain), statistics.median(mode), fallbacks, first_mode, routed


def _encoded(tokenizer: Any, batch: int, device: str) -> Any:
    """The benchmark's batch of ``batch`` prompts, padded, on ``device``."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    return tokenizer(prompts, padding=True, return_tensors="pt").to(device)


def measure(model: Any, tokenizer: Any, batch: int, new_tokens: int, repeats: int, device: str,
            portable: bool) -> Case:
    enc = _encoded(tokenizer, batch, device)

    def generate() -> None:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)

    return Case(batch, new_tokens, *_interleaved(generate, repeats, portable))


def profile_generate(model: Any, tokenizer: Any, batch: int, new_tokens: int, device: str, portable: bool,
                     path: Path) -> None:
    """cProfile of one generate under the mode (warm), written to ``path``: the functions
    with the most own time, then the most cumulative time. Where the per-call overhead of
    a routed op goes, on any device (on a GPU the host time is the whole story)."""
    import cProfile
    import io
    import pstats

    import detkit

    enc = _encoded(tokenizer, batch, device)
    profiler = cProfile.Profile()
    with torch.no_grad(), detkit.batch_invariant(portable=portable):  # warm: shapes compiled, tiles checked
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)
    with torch.no_grad(), detkit.batch_invariant(portable=portable) as bi:
        profiler.enable()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)
        profiler.disable()
    text = io.StringIO()
    text.write(f"# cProfile of one greedy generate under batch_invariant(portable={portable}): batch {batch}, "
               f"{new_tokens} new tokens, {device}; routed calls: {dict(sorted(bi.routed().items()))}\n")
    for key, count in (("tottime", 40), ("cumulative", 25)):
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(count)
    path.write_text(text.getvalue())


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

    plain_ms, mode_ms, *_ = _interleaved(call, repeats * 10, portable)  # one call is milliseconds
    return LayerCase(f"Linear({k}, {n}) on {rows} ReLU rows", plain_ms, mode_ms)


def measure_convs(repeats: int, device: str, dtype: torch.dtype, portable: bool) -> list[LayerCase]:
    """Convolutions as models run them, routed under the mode as products of their patches:
    Mamba-2.8B's depthwise causal conv (5120 channels, kernel 4) over a 64-token prefill
    and over one decode window for a batch of 8, a ViT-B/16 patch embedding of one
    224 x 224 image, and the first upsampling of EnCodec's 24 kHz decoder (a transposed
    conv1d, routed as the ordinary conv it equals) over one second of codes."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    ch = 5120
    w, b = r(ch, 1, 4), r(ch)
    prefill, window = r(1, ch, 64), r(8, ch, 4)
    image, pw, pb = r(1, 3, 224, 224), r(768, 3, 16, 16), r(768)
    codes, uw, ub = r(1, 512, 75), r(512, 256, 16), r(256)  # one second of 24 kHz audio, first upsampling
    return _measure_calls([
        ("Mamba-2.8B conv1d, prefill 1 x 5120 x 64", lambda: F.conv1d(prefill, w, b, padding=3, groups=ch)),
        ("Mamba-2.8B conv1d, decode 8 x 5120 x 4", lambda: F.conv1d(window, w, b, groups=ch)),
        ("ViT-B/16 patch conv2d, 1 x 3 x 224 x 224", lambda: F.conv2d(image, pw, pb, stride=16)),
        ("EnCodec decoder conv_transpose1d, 1 x 512 x 75, k16 s8",
         lambda: F.conv_transpose1d(codes, uw, ub, stride=8, padding=4)),
    ], repeats, device, portable)


def measure_reductions(repeats: int, device: str, dtype: torch.dtype, portable: bool) -> list[LayerCase]:
    """The reductions the mode composes from routed ops: logsumexp over GPT-2's and
    Qwen2's vocabularies (a sampler's, a loss's), and over hidden rows var, the 2-norm and
    F.normalize (which calls the norm)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    gpt2, qwen, hidden = r(64, 50257), r(8, 151936), r(64, 4096)
    return _measure_calls([
        ("logsumexp 64 x 50257", lambda: torch.logsumexp(gpt2, -1)),
        ("logsumexp 8 x 151936", lambda: torch.logsumexp(qwen, -1)),
        ("var 64 x 4096", lambda: hidden.var(-1)),
        ("vector_norm 64 x 4096", lambda: torch.linalg.vector_norm(hidden, dim=-1)),
        ("F.normalize 64 x 4096", lambda: F.normalize(hidden, dim=-1)),
    ], repeats, device, portable)


def measure_vision(repeats: int, device: str, dtype: torch.dtype, portable: bool) -> list[LayerCase]:
    """What vision towers route besides products and norms, at their models' sizes:
    Gemma 3's pooling of 64 x 64 patches into 256 tokens, GLM-4V's bicubic resampling of
    its 24 x 24 position table to a 64 x 64 grid, HunYuan-VL's bilinear resize of its table,
    GOT-OCR2's linear resize of relative positions, a bilinear resize of an image, and
    DINOv2-with-registers' antialiased bicubic resize of its 37 x 37 position table."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    patches, table, hunyuan, rel_pos, image = r(1, 1152, 64, 64), r(1, 1536, 24, 24), r(1, 1152, 32, 32), \
        r(1, 64, 127), r(1, 3, 224, 224)
    dino = r(1, 768, 37, 37)
    # torch's CPU kernel has no 16-bit antialiased resize (DINOv2 resizes its table in float32)
    aa = dino if device.startswith("cuda") or dtype in (torch.float32, torch.float64) else dino.float()
    points = (torch.rand(1, 4096, 1, 2, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    return _measure_calls([
        ("Gemma 3 avg_pool2d, 1 x 1152 x 64 x 64, k4", lambda: F.avg_pool2d(patches, 4)),
        ("GLM-4V grid_sample bicubic, 1 x 1536 x 24 x 24 at 4096 points",
         lambda: F.grid_sample(table, points, mode="bicubic", align_corners=False, padding_mode="border")),
        ("HunYuan-VL interpolate bilinear, 1 x 1152 x 32 x 32 to 48 x 64",
         lambda: F.interpolate(hunyuan, size=(48, 64), mode="bilinear", align_corners=False)),
        ("GOT-OCR2 interpolate linear, 1 x 64 x 127 to 255", lambda: F.interpolate(rel_pos, size=255, mode="linear")),
        ("image interpolate bilinear, 1 x 3 x 224 x 224 to 336 x 336",
         lambda: F.interpolate(image, size=(336, 336), mode="bilinear", align_corners=False)),
        ("DINOv2 interpolate bicubic antialias, 1 x 768 x 37 x 37 to 16 x 16",
         lambda: F.interpolate(aa, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)),
    ], repeats, device, portable)


def _measure_calls(calls: list[tuple[str, Callable[[], torch.Tensor]]], repeats: int, device: str,
                   portable: bool) -> list[LayerCase]:
    """One LayerCase per named call; an op falling back to torch would time torch twice."""
    cases = []
    for name, fn in calls:
        def call(fn: Callable[[], torch.Tensor] = fn) -> None:
            with torch.no_grad():
                fn()
            _sync(device)

        plain_ms, mode_ms, fallbacks, *_ = _interleaved(call, repeats * 10, portable)
        if fallbacks:
            raise RuntimeError(f"{name}: ops fell back to torch under the mode: {fallbacks}")
        cases.append(LayerCase(name, plain_ms, mode_ms))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-llama",
                        help="a detkit.models preset, or a local model directory (with its tokenizer)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--portable", action="store_true", help="batch_invariant(portable=True)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", type=Path,
                        help="after the timings, write a cProfile of one generate under the mode (first batch size) here")
    parser.add_argument("--relu-linear", action="store_true",
                        help="time one nn.Linear on ReLU rows instead of generate (no model needed)")
    parser.add_argument("--conv", action="store_true",
                        help="time convolutions (Mamba's causal conv1d, a ViT patch conv2d) instead of generate")
    parser.add_argument("--reductions", action="store_true",
                        help="time logsumexp, var, vector_norm and F.normalize instead of generate")
    parser.add_argument("--vision", action="store_true",
                        help="time avg_pool2d, grid_sample and interpolate at vision towers' sizes instead of generate")
    args = parser.parse_args(argv)
    from detkit.devices import resolve_device
    from detkit.errors import DetkitError
    from detkit.probe.hf import load_model

    try:
        device = str(resolve_device(args.device))
        batches = [int(b) for b in args.batch_sizes.split(",")]
        if min(batches) < 1 or args.new_tokens < 1 or args.repeats < 1:
            raise ValueError("batch sizes, --new-tokens and --repeats must be at least 1")
        if args.relu_linear:
            return _layers(args, device, [measure_relu_linear(args.repeats, device, getattr(torch, args.dtype),
                                                              args.portable)], "layer")
        if args.conv:
            return _layers(args, device, measure_convs(args.repeats, device, getattr(torch, args.dtype), args.portable),
                           "layers")
        if args.reductions:
            return _layers(args, device, measure_reductions(args.repeats, device, getattr(torch, args.dtype),
                                                            args.portable), "layers")
        if args.vision:
            return _layers(args, device, measure_vision(args.repeats, device, getattr(torch, args.dtype),
                                                        args.portable), "layers")
        # the probe's loader: presets, or a directory with its tokenizer, with clear errors
        model, tokenizer, _ = load_model(args.preset, dtype=args.dtype, attn_implementation=args.attn, device=device)
    except (DetkitError, ValueError) as err:
        print(f"bench_mode: {err}", file=sys.stderr)
        return 2
    meta = {"preset": args.preset, "device": device, "dtype": args.dtype, "attn": args.attn,
            "portable": args.portable, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None}
    print(f"# batch_invariant(portable={args.portable}) vs plain torch: {args.preset} {args.dtype} {args.attn} "
          f"on {meta['gpu'] or device} ({meta['threads']} threads), greedy generate, median of {args.repeats}; "
          "first call: the warm-up under the mode, timed but left out of the medians (tile checks and compilation "
          "of the shapes this process has not seen yet, so mostly the first batch size)")
    print("| batch | new tokens | plain ms | mode ms | ratio (mode / plain) | ops falling back | mode first call ms "
          "| routed calls | extra us per routed call |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    cases = []
    for batch in batches:
        case = measure(model, tokenizer, batch, args.new_tokens, args.repeats, device, args.portable)
        cases.append(case)
        fb = ", ".join(f"{op} x{n}" for op, n in sorted(case.fallbacks.items())) or "none"
        extra = case.extra_us_per_routed_call
        print(f"| {case.batch} | {case.new_tokens} | {case.plain_ms:.1f} | {case.mode_ms:.1f} | {case.ratio:.2f} | {fb} "
              f"| {case.mode_first_ms:.1f} | {case.routed_calls} | {'-' if extra is None else f'{extra:.0f}'} |",
              flush=True)
        if args.json:  # after each case: an interruption keeps the finished ones
            args.json.write_text(json.dumps({"meta": meta, "cases": [
                {**asdict(c), "ratio": round(c.ratio, 3), "extra_us_per_routed_call": c.extra_us_per_routed_call}
                for c in cases]}, indent=2))
    if args.profile:
        profile_generate(model, tokenizer, batches[0], args.new_tokens, device, args.portable, args.profile)
        print(f"cProfile of one generate under the mode: {args.profile}", file=sys.stderr)
    return 0


def _layers(args: argparse.Namespace, device: str, cases: list[LayerCase], key: str) -> int:
    """Print (and with --json write, under ``key``: one case or a list) single-layer timings."""
    print(f"# batch_invariant(portable={args.portable}) vs plain torch: {args.dtype} on {device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats * 10} calls")
    print("| layer | plain ms | mode ms | ratio (mode / plain) |\n|---|---:|---:|---:|")
    for case in cases:
        print(f"| {case.name} | {case.plain_ms:.3f} | {case.mode_ms:.3f} | {case.ratio:.2f} |")
    if args.json:
        rows = [{**asdict(case), "ratio": round(case.ratio, 3)} for case in cases]
        args.json.write_text(json.dumps({"meta": {"device": device, "dtype": args.dtype, "portable": args.portable,
                                                  "torch": torch.__version__, "threads": torch.get_num_threads()},
                                         key: rows if key == "layers" else rows[0]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
