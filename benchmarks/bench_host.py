"""Benchmark: the host time detkit spends per call before a GPU gets any work.

For small ops the launch path, not the kernel, sets the speed: on the H200 one
``kernels.softmax`` call took 24 us of host time against torch's 7.4, and the mode added
about 127 us per routed call to a small model's generate (benchmarks/RESULTS.md). This
measures that path on any machine, no GPU needed: CPU tensors are routed through the CUDA
backend (``detkit.kernels.cuda``) with the driver's cuLaunchKernel replaced by a no-op, so
everything detkit does in Python (validation, dispatch, the mode's adapter, output
allocation, argument packing) is timed; the driver's own enqueue and the caching
allocator's are not (torch's CPU allocator stands in). With ``--device cuda`` the same
calls run on a GPU for real, and the time is the host's per call while the kernels are
enqueued (``scripts/gpu-check`` records it). Usage::

    python benchmarks/bench_host.py                 # the table
    python benchmarks/bench_host.py --json out.json
    python benchmarks/bench_host.py --device cuda   # on a GPU: the host time of real launches

Columns (median of interleaved repeats, us per call): torch's own op on the same
tensors (its dispatch plus a tiny kernel: the floor for a Python-level library),
``detkit.kernels`` through the CUDA launch path, and torch's op under
``detkit.batch_invariant()`` through the same path; ratios are detkit / torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

import detkit
from detkit import kernels
from detkit.kernels import _backend
from detkit.kernels import cuda as cuda_backend


@dataclass
class Row:
    op: str
    shape: str
    torch_us: float
    kernels_us: float
    mode_us: float

    @property
    def kernels_ratio(self) -> float:
        return self.kernels_us / self.torch_us

    @property
    def mode_ratio(self) -> float:
        return self.mode_us / self.torch_us


@contextlib.contextmanager
def cuda_launch_path_without_a_gpu() -> Iterator[None]:
    """CPU tensors take ``detkit.kernels.cuda``, whose launcher runs up to cuLaunchKernel,
    which does nothing (no kernel runs: the results are garbage); restored on exit."""
    cb = cuda_backend
    stand_ins: dict[str, Any] = {
        "_driver_launch": lambda *args: None,
        "_load_function": lambda index, module, entry, shared_mem: cb._Kernel(0, module, entry),
        "_stream_ptr": lambda index: 0,
        "_device_index": lambda dev: 0,
        "_device_of": lambda *ts: next(t.device for t in ts if t is not None),
        "_major": lambda dev: 9,
    }
    saved = {name: getattr(cb, name) for name in stand_ins}
    key = ("cpu", False)
    backend = _backend.BACKEND_MODULES[key]
    try:
        _backend.BACKEND_MODULES[key] = "detkit.kernels.cuda"
        for name, value in stand_ins.items():
            setattr(cb, name, value)
        yield
    finally:
        _backend.BACKEND_MODULES[key] = backend
        for name, value in saved.items():
            setattr(cb, name, value)


def _median_us(fns: list[Callable[[], object]], repeats: int, calls: int,
               sync: Callable[[], None] = lambda: None) -> list[float]:
    """Median us per call of each of ``fns``, interleaved so that a busy machine's drift
    hits all alike; each warmed up first. ``sync`` runs before each timed repeat (on a
    GPU: the previous repeat's kernels are done, so the host never waits for a full
    launch queue)."""
    for fn in fns:
        for _ in range(50):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - t0) / calls * 1e6)
    sync()
    return [statistics.median(t) for t in times]


def cases(device: str = "cpu") -> list[tuple[str, str, Callable[[], object], Callable[[], object]]]:
    """(op, shape, torch's call, detkit.kernels' call); the mode column runs torch's call."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x, x3, w, b, lin = randn(1, 64), randn(1, 1, 64), randn(64), randn(64), randn(64, 64)
    q, kv = randn(1, 4, 1, 16), randn(1, 4, 16, 16)
    # bfloat16, head dim 64: the tensor-core attention kernel (GQA, 2 query heads per K/V head)
    qh, kvh = randn(1, 4, 1, 64).bfloat16(), randn(1, 2, 16, 64).bfloat16()
    return [
        ("softmax", "1 x 64", lambda: torch.softmax(x, -1), lambda: kernels.softmax(x)),
        ("softmax", "1 x 1 x 64", lambda: torch.softmax(x3, -1), lambda: kernels.softmax(x3)),
        ("rms_norm", "1 x 64", lambda: F.rms_norm(x, (64,), w, 1e-6), lambda: kernels.rms_norm(x, w, 1e-6)),
        ("layer_norm", "1 x 64", lambda: F.layer_norm(x, (64,), w, b, 1e-5), lambda: kernels.layer_norm(x, w, b, 1e-5)),
        ("linear", "1 x 64 @ 64 x 64", lambda: F.linear(x, lin), lambda: kernels.matmul(x, lin.t())),
        ("linear", "1 x 1 x 64 @ 64 x 64", lambda: F.linear(x3, lin), lambda: kernels.matmul(x3, lin.t())),
        ("sdpa decode", "4 heads x 16, 16 keys", lambda: F.scaled_dot_product_attention(q, kv, kv),
         lambda: kernels.attention(q, kv, kv)),
        ("sdpa decode", "bf16, 4 heads x 64 on 2, 16 keys",
         lambda: F.scaled_dot_product_attention(qh, kvh, kvh, enable_gqa=True), lambda: kernels.attention(qh, kvh, kvh, enable_gqa=True)),
    ]


def run(repeats: int, calls: int, device: str = "none") -> list[Row]:
    """``device`` "none": CPU tensors through the CUDA launch path without a GPU; "cuda":
    real launches on the current GPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    on_gpu = device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    try:
        with contextlib.nullcontext() if on_gpu else cuda_launch_path_without_a_gpu():
            for op, shape, plain, ours in cases("cuda" if on_gpu else "cpu"):
                t_torch, t_kernels = _median_us([plain, ours], repeats, calls, sync)
                with detkit.batch_invariant() as mode:  # entered once, outside the timed calls
                    (t_mode,) = _median_us([plain], repeats, calls, sync)
                routed = sum(mode.routed().values())
                if routed < repeats * calls or mode.uncovered():
                    raise RuntimeError(f"{op}: the mode routed {routed} of {repeats * calls} calls "
                                       f"({mode.uncovered()}); the column would time torch's kernel")
                rows.append(Row(op, shape, t_torch, t_kernels, t_mode))
    finally:
        torch.set_num_threads(threads)
    return rows


def render(rows: list[Row], device: str = "none") -> str:
    where = (f"real launches on {torch.cuda.get_device_name()}" if device == "cuda" else
             "CPU tensors through the CUDA launch path, no GPU")
    lines = [
        f"# detkit's host time per call, up to cuLaunchKernel ({where})",
        "",
        f"torch {torch.__version__}; one thread; median of interleaved repeats; us per call; ratio = detkit / torch.",
        "",
        "| op | shape | torch us | detkit.kernels us | ratio | under the mode us | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.op} | {r.shape} | {r.torch_us:.2f} | {r.kernels_us:.2f} | {r.kernels_ratio:.2f} | "
                     f"{r.mode_us:.2f} | {r.mode_ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed repeat")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--device", choices=["none", "cuda"], default="none",
                        help="none: the launch path without a GPU (the driver call a no-op); cuda: real launches")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.calls < 1:
        parser.error("--repeats and --calls must be at least 1")
    if args.device == "cuda" and not cuda_backend.available()[0]:
        print(f"bench_host.py: --device cuda needs detkit's CUDA backend: {cuda_backend.available()[1]}",
              file=sys.stderr)
        return 2
    rows = run(args.repeats, args.calls, args.device)
    print(render(rows, args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"kernels_ratio": r.kernels_ratio, "mode_ratio": r.mode_ratio} for r in rows], f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
