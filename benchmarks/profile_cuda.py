"""GPU time against the time a caller waits: where detkit's CUDA kernels lose to torch.

``bench_cuda.py`` times each call from the caller's side (CUDA events around the Python
call), so a small problem measures the launch path as much as the kernel. This script
measures each case twice, for detkit and torch alike:

* ``call``: median milliseconds of one call, CUDA events around it (as bench_cuda.py);
* ``gpu``: milliseconds of GPU work per call, the durations of every kernel the call
  launched, as CUPTI records them (torch.profiler), averaged over the calls;

and names the kernels each side ran. ``call - gpu`` is what the launch path costs when
the GPU waits for it. Speeds are torch / detkit of each column, measured in the same run.
Then the GPU time of every tile configuration of the catalogue (the bits are the same;
which one the table should name is a question of GPU time, not of launch overhead).

    python benchmarks/profile_cuda.py --json out/profile_cuda.json --md out/profile_cuda.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MATMUL_M = (1, 16, 64, 256, 1024, 4096)
KN = 4096
ROWS = (1, 64, 1024, 8192)
TILE_M = {"bfloat16": (1, 64, 1024, 4096), "float32": (1, 4096)}


@dataclass
class KernelTime:
    """One side of a case: median call time, GPU time per call and the kernels that ran."""

    call_ms: float
    gpu_ms: float
    kernels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (self.call_ms > 0 and self.gpu_ms >= 0):
            raise ValueError(f"times must be positive: call {self.call_ms} ms, gpu {self.gpu_ms} ms")


@dataclass
class Case:
    op: str
    dtype: str
    shape: str
    variant: str
    torch: KernelTime
    detkit: KernelTime

    @property
    def call_speed(self) -> float:
        return self.torch.call_ms / self.detkit.call_ms

    @property
    def gpu_speed(self) -> float:
        return self.torch.gpu_ms / self.detkit.gpu_ms if self.detkit.gpu_ms > 0 else math.nan


@dataclass
class TileGpuTime:
    """GPU ms per call of torch and of each catalogue configuration, one (dtype, M)."""

    dtype: str
    m: int
    torch_ms: float
    config_ms: dict[str, float]

    def __post_init__(self) -> None:
        if self.torch_ms <= 0 or any(v <= 0 for v in self.config_ms.values()):
            raise ValueError(f"GPU times must be positive: torch {self.torch_ms}, {self.config_ms}")


Call = Callable[[], Any]


def _device_us(event: Any) -> float:
    """An averaged profiler entry's own device microseconds (torch renamed the field)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def call_ms(fn: Call, iters: int) -> float:
    """``fn``'s median call time, CUDA events around each call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def gpu_ms(fn: Call, iters: int) -> tuple[float, list[str]]:
    """``fn``'s GPU milliseconds per call (every kernel it launched, as CUPTI records
    them) and its three longest kernels."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    entries = sorted((e for e in prof.key_averages() if _device_us(e) > 0), key=_device_us, reverse=True)
    return (sum(_device_us(e) for e in entries) / iters / 1000.0,
            [f"{e.key[:70]} x{e.count // iters}" for e in entries[:3]])


def _iters(fn: Call) -> int:
    """About 50 ms of calls, 5 to 200."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return int(min(max(0.05 / max(time.perf_counter() - t0, 1e-6), 5), 200))


def cases() -> list[tuple[str, str, str, str, Call, Call]]:
    """(op, dtype, shape, detkit variant, torch call, detkit call) for every case."""
    from detkit.kernels import cuda as kc

    F = torch.nn.functional
    out: list[tuple[str, str, str, str, Call, Call]] = []
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(KN, KN, device="cuda").to(dtype) * 0.02
        for m in MATMUL_M if dtype == torch.bfloat16 else (1, 256, 4096):
            x = torch.randn(m, KN, device="cuda").to(dtype)
            variants: list[tuple[str, Call]] = [("table", lambda x=x, w=w: kc.matmul(x, w.t(), None))]
            if dtype == torch.float32:
                variants.append(("portable", lambda x=x, w=w: kc.matmul(x, w.t(), None, portable=True)))
            out += [("matmul", str(dtype).removeprefix("torch."), f"M={m} K=N={KN}", variant,
                     lambda x=x, w=w: F.linear(x, w), ours) for variant, ours in variants]
    # MoE experts (bench_cuda.py's largest cases): the table's grouped launch, and the wgmma one
    for experts, k, n, tokens in ((64, 2048, 1408, 4096), (8, 4096, 14336, 1024)):
        x = torch.randn(tokens, k, device="cuda").to(torch.bfloat16)
        w = (torch.randn(experts, n, k, device="cuda") * 0.02).to(torch.bfloat16).transpose(1, 2)
        routed = torch.randint(0, experts, (tokens,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        offs = torch.bincount(routed, minlength=experts).cumsum(0).to(torch.int32)
        variants = [("table", None), *((c.name, c) for c in kc.GROUPED_TILE_CATALOGUE[torch.bfloat16]
                                        if kc.fits(c, x.device))]
        out += [("grouped_mm", "bfloat16", f"G={experts} K={k} N={n} rows={tokens}", name,
                 lambda x=x, w=w, offs=offs: torch._grouped_mm(x, w, offs=offs),
                 lambda x=x, w=w, offs=offs, c=c: kc.grouped_matmul(x, w, offs, tile=c)) for name, c in variants]
    wn = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    for rows in ROWS:
        x = torch.randn(rows, 4096, device="cuda").to(torch.bfloat16)
        out.append(("softmax", "bfloat16", f"{rows}x4096", "table", lambda x=x: torch.softmax(x, -1),
                    lambda x=x: kc.softmax(x, False)))
        out.append(("rms_norm", "bfloat16", f"{rows}x4096", "table", lambda x=x: F.rms_norm(x, (4096,), wn, 1e-6),
                    lambda x=x: kc.rms_norm(x, wn, 1e-6)))
    for name, lq, lk in (("decode", 1, 4096), ("prefill", 1024, 1024)):
        q = torch.randn(1, 32, lq, 128, device="cuda").to(torch.bfloat16)
        k = torch.randn(1, 32, lk, 128, device="cuda").to(torch.bfloat16)
        v = torch.randn(1, 32, lk, 128, device="cuda").to(torch.bfloat16)
        causal = lq > 1
        mask = torch.ones(lq, lk, dtype=torch.bool, device="cuda").tril().expand(1, 32, lq, lk) if causal else None
        out.append(("attention", "bfloat16", f"{name} 32x128 Lq={lq} Lk={lk}", "table",
                    lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                    lambda q=q, k=k, v=v, m=mask: kc.attention(q, k, v, m, 1 / math.sqrt(128))))
    return out


def tile_gpu_times(deadline: float) -> Iterator[TileGpuTime]:
    """GPU time of F.linear and of every configuration that fits, x (M, 4096) @ W.T
    (k-major B, nn.Linear's layout), for TILE_M, until ``deadline``."""
    from detkit.kernels import cuda as kc

    for name, sizes in TILE_M.items():
        dtype = getattr(torch, name)
        w = torch.randn(KN, KN, device="cuda").to(dtype) * 0.02
        for m in sizes:
            if time.perf_counter() > deadline:
                return
            x = torch.randn(m, KN, device="cuda").to(dtype)
            torch_ms = gpu_ms(lambda x=x: torch.nn.functional.linear(x, w), 20)[0]
            per = {c.name: gpu_ms(lambda x=x, c=c: kc.matmul(x, w.t(), None, tile=c), 20)[0]
                   for c in kc.TILE_CATALOGUE[dtype] if kc.fits(c, x.device)}
            yield TileGpuTime(name, m, torch_ms, per)


def markdown(meta: dict[str, Any], results: list[Case], tiles: list[TileGpuTime]) -> str:
    lines = [f"# detkit CUDA kernels: call time and GPU time, {meta['device']}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}. call: median ms of one call (events around the "
             "Python call); gpu: kernel ms per call (CUPTI). Speed = torch / detkit.", "",
             "| op | dtype | shape | detkit variant | torch call | torch gpu | detkit call | detkit gpu "
             "| call speed | gpu speed | detkit kernels | torch kernels |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in results:
        lines.append(f"| {c.op} | {c.dtype} | {c.shape} | {c.variant} | {c.torch.call_ms:.4f} | {c.torch.gpu_ms:.4f} "
                     f"| {c.detkit.call_ms:.4f} | {c.detkit.gpu_ms:.4f} | {c.call_speed:.2f} | {c.gpu_speed:.2f} "
                     f"| {'; '.join(c.detkit.kernels)} | {'; '.join(c.torch.kernels)} |")
    for dtype in dict.fromkeys(t.dtype for t in tiles):
        rows = [t for t in tiles if t.dtype == dtype]
        names = list(dict.fromkeys(n for t in rows for n in t.config_ms))
        lines += ["", f"GPU ms per call of each {dtype} configuration, K = N = {KN}, k-major B "
                  "(speed = torch GPU time / configuration's)", "",
                  "| M | torch gpu ms | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
        for t in rows:
            cells = " | ".join(f"{t.config_ms[n]:.4f} ({t.torch_ms / t.config_ms[n]:.2f})" if n in t.config_ms
                               else "-" for n in names)
            lines.append(f"| {t.m} | {t.torch_ms:.4f} | {cells} |")
    lines += ["", *(f"Skipped: {why}" for why in meta.get("skipped", []))] if meta.get("skipped") else []
    if meta.get("error"):
        lines += ["", f"Stopped by {meta['error']}."]
    elif not meta.get("complete"):
        lines += ["", "Incomplete: the budget ran out or the run was interrupted; the cases above finished."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write results as JSON here")
    parser.add_argument("--md", type=Path, help="write a Markdown table here")
    parser.add_argument("--budget", type=float, default=60.0, help="stop starting new cases after this many seconds")
    parser.add_argument("--no-tiles", action="store_true", help="leave out the catalogue's GPU times")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_cuda: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    meta: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "complete": False}
    results: list[Case] = []
    tiles: list[TileGpuTime] = []

    def write() -> None:  # after every case: a timeout or a fault keeps what was measured
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "results": [
                {**asdict(c), "call_speed": round(c.call_speed, 3), "gpu_speed": round(c.gpu_speed, 3)}
                for c in results], "tiles": [asdict(t) for t in tiles]}, indent=2))
        if args.md:
            args.md.write_text(markdown(meta, results, tiles))

    start = time.perf_counter()
    try:
        # Every call time before the first profile: once CUPTI is loaded, its callbacks
        # slow every later launch (on an H200 a 0.07 ms product then took 0.19 ms a call).
        timed = []
        todo = cases()
        for op, dtype, shape, variant, theirs, ours in todo:
            if time.perf_counter() > start + args.budget / 3:
                break
            try:
                n_theirs, n_ours = _iters(theirs), _iters(ours)
                timed.append((op, dtype, shape, variant, theirs, ours, n_theirs, n_ours,
                              call_ms(theirs, n_theirs), call_ms(ours, n_ours)))
            except RuntimeError as err:  # e.g. torch._grouped_mm off sm_90: that case only
                meta.setdefault("skipped", []).append(f"{op} {dtype} {shape} {variant}: {str(err)[:200]}")
        for op, dtype, shape, variant, theirs, ours, n_theirs, n_ours, call_theirs, call_ours in timed:
            if time.perf_counter() > start + 2 * args.budget / 3:
                break
            results.append(Case(op, dtype, shape, variant, KernelTime(call_theirs, *gpu_ms(theirs, n_theirs)),
                                KernelTime(call_ours, *gpu_ms(ours, n_ours))))
            print(f"{op} {dtype} {shape} {variant}: call {results[-1].call_speed:.2f} gpu {results[-1].gpu_speed:.2f}",
                  file=sys.stderr, flush=True)
            write()
        if not args.no_tiles:
            for sweep in tile_gpu_times(start + args.budget):
                tiles.append(sweep)
                write()
        meta["complete"] = (len(results) == len(todo) - len(meta.get("skipped", []))
                            and (args.no_tiles or len(tiles) == sum(map(len, TILE_M.values()))))
    except KeyboardInterrupt:
        print("profile_cuda: interrupted; the finished cases are written", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - a kernel fault: keep what ran, say why
        meta["error"] = f"{type(err).__name__}: {err}"
        print(f"profile_cuda: stopped by {meta['error']}", file=sys.stderr)
    write()
    print(markdown(meta, results, tiles))
    return 0 if meta["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
