"""Time detkit's batch-invariant CPU kernels against torch's own ops, in the same run.

    python benchmarks/bench_kernels.py            # all shapes of issue 3
    python benchmarks/bench_kernels.py --quick    # fewer repeats, smaller attention
    python benchmarks/bench_kernels.py --json out.json
    python benchmarks/bench_kernels.py --threads 1  # one thread each (a shared machine)

For every case it prints the median wall time of detkit and of torch and the ratio
detkit / torch. The two are interleaved (detkit, torch, detkit, ...) so that a noisy
machine disturbs both alike. The first call of each (numba compile, BLAS-tile
verification) is a warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from detkit import kernels


@dataclass(frozen=True)
class Case:
    """One benchmark case: a name and the two functions to time on the same inputs."""

    kernel: str
    shape: str
    dtype: str
    detkit: Callable[[], object]
    torch: Callable[[], object]


@dataclass(frozen=True)
class Result:
    """Median seconds of detkit and torch for one case."""

    kernel: str
    shape: str
    dtype: str
    detkit_ms: float
    torch_ms: float
    repeats: int

    def __post_init__(self) -> None:
        if self.detkit_ms < 0 or self.torch_ms <= 0 or self.repeats < 1:
            raise ValueError("Result needs non-negative times and at least one repeat")

    @property
    def ratio(self) -> float:
        """detkit time / torch time."""
        return self.detkit_ms / self.torch_ms


def _cases(quick: bool) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    cases: list[Case] = []
    k = n = 4096
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        w = torch.randn(n, k, generator=gen).to(dtype)  # nn.Linear layout: matmul(x, w.t())
        for m in (1, 8, 64, 512):
            x = torch.randn(m, k, generator=gen).to(dtype)
            cases.append(
                Case("matmul (linear)", f"{m}x{k} @ {k}x{n}", name,
                     lambda x=x, w=w: kernels.matmul(x, w.t()), lambda x=x, w=w: F.linear(x, w))
            )
    for rows in (1, 64, 1024):
        x = torch.randn(rows, 4096, generator=gen)
        wt = torch.randn(4096, generator=gen)
        shape = f"{rows}x4096"
        cases.append(Case("softmax", shape, "float32", lambda x=x: kernels.softmax(x), lambda x=x: torch.softmax(x, -1)))
        cases.append(
            Case("rms_norm", shape, "float32",
                 lambda x=x, wt=wt: kernels.rms_norm(x, wt, 1e-6), lambda x=x, wt=wt: F.rms_norm(x, (4096,), wt, 1e-6))
        )
        cases.append(
            Case("layer_norm", shape, "float32",
                 lambda x=x, wt=wt: kernels.layer_norm(x, wt, wt), lambda x=x, wt=wt: F.layer_norm(x, (4096,), wt, wt))
        )
        cases.append(Case("cumsum", shape, "float32", lambda x=x: kernels.cumsum(x), lambda x=x: torch.cumsum(x, -1)))
    # Mamba2's segment sums: a running sum down dim -2 of (batch x heads x chunks) masked
    # 256 x 256 blocks (the front end moves the dim last and back: two copies).
    blocks = torch.randn(16, 256, 256, generator=gen).tril(-1)
    cases.append(Case("cumsum", "16x256x256, dim -2", "float32", lambda: kernels.cumsum(blocks, -2),
                      lambda: torch.cumsum(blocks, -2)))
    # Qwen3-Next's UT systems: unit lower triangular 64 x 64, 128 columns, one per (batch,
    # head, chunk); torch's is LAPACK's trsm
    ut = torch.randn(64, 64, 64, generator=gen).tril(-1) * 0.1 + torch.eye(64)
    rhs = torch.randn(64, 64, 128, generator=gen)
    cases.append(Case("solve_triangular", "64 x (64x64 \\ 64x128), unit lower", "float32",
                      lambda: kernels.solve_triangular(ut, rhs, upper=False, unitriangular=True),
                      lambda: torch.linalg.solve_triangular(ut, rhs, upper=False, unitriangular=True)))
    heads, d = 32, 128
    kv_len = 1024 if quick else 4096
    q = torch.randn(1, heads, 1, d, generator=gen)
    kc = torch.randn(1, heads, kv_len, d, generator=gen)
    vc = torch.randn(1, heads, kv_len, d, generator=gen)
    cases.append(
        Case("attention decode", f"1 query, KV {kv_len}, {heads}x{d}", "float32",
             lambda: kernels.attention(q, kc, vc), lambda: F.scaled_dot_product_attention(q, kc, vc))
    )
    seq = 256 if quick else 1024
    qp = torch.randn(1, heads, seq, d, generator=gen)
    kp = torch.randn(1, heads, seq, d, generator=gen)
    vp = torch.randn(1, heads, seq, d, generator=gen)
    cases.append(
        Case("attention prefill (causal)", f"{seq}x{seq}, {heads}x{d}", "float32",
             lambda: kernels.attention(qp, kp, vp, is_causal=True),
             lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True))
    )
    return cases


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(quick: bool = False, only: str | None = None,
        on_result: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Time every case (medians of interleaved repeats) and return the results;
    ``on_result(results so far)`` after each case."""
    results: list[Result] = []
    for case in _cases(quick):
        if only and only not in case.kernel:
            continue
        case.detkit()  # warm-up: numba compile / BLAS-tile verification
        case.torch()
        budget = 0.5 if quick else 2.0
        repeats = 3 if quick else 5
        t_d: list[float] = []
        t_t: list[float] = []
        start = time.perf_counter()
        while len(t_d) < repeats or (time.perf_counter() - start < budget and len(t_d) < 50):
            t_d.append(_time(case.detkit))
            t_t.append(_time(case.torch))
        results.append(
            Result(case.kernel, case.shape, case.dtype, statistics.median(t_d) * 1e3, statistics.median(t_t) * 1e3, len(t_d))
        )
        if on_result:
            on_result(results)
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller attention shapes")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    p.add_argument("--only", metavar="TEXT", help="only kernels whose name contains TEXT")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch.set_num_threads(N) before timing; detkit's kernels follow torch's count")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 1 (0: keep torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    table = sys.stderr if args.json == "-" else sys.stdout  # stdout: the JSON alone
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}",
          file=table)
    print(f"{'kernel':28} {'shape':34} {'dtype':9} {'detkit ms':>10} {'torch ms':>10} {'ratio':>7}", file=table)

    def json_text(results: list[Result]) -> str:
        doc = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "quick": args.quick,
            "results": [asdict(r) | {"ratio": r.ratio} for r in results],
            "cpu_status": kernels.cpu_status(),
        }
        return json.dumps(doc, indent=2, default=str)

    def write(results: list[Result]) -> None:
        if args.json == "-":
            print(json_text(results))
        elif args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(json_text(results) + "\n")

    def finished(results: list[Result]) -> None:
        r = results[-1]
        print(f"{r.kernel:28} {r.shape:34} {r.dtype:9} {r.detkit_ms:10.3f} {r.torch_ms:10.3f} {r.ratio:7.2f}",
              file=table, flush=True)
        if args.json != "-":  # after each case: an interruption keeps the finished ones
            write(results)

    write(run(args.quick, args.only, finished))
    return 0


if __name__ == "__main__":
    sys.exit(main())
