"""Benchmark: portable CPU kernels (``portable=True``) vs torch's own CPU ops.

Prints, per kernel and shape, the median time of each and the ratio portable / torch,
measured in the same run. Shapes follow the CPU kernels issue. Usage::

    python benchmarks/bench_portable.py            # full table
    python benchmarks/bench_portable.py --quick    # a few shapes, fewer repeats
    python benchmarks/bench_portable.py --only matmul --json out.json

The backend module is called directly (``detkit.kernels.portable_cpu``), so the
numbers are the kernels' cost without the front end's validation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from detkit.kernels import portable_cpu as P


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    torch_ms: float
    portable_ms: float

    @property
    def ratio(self) -> float:
        return self.portable_ms / self.torch_ms


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up (and compile on first use)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cases(quick: bool) -> list[tuple[str, str, torch.dtype, Callable[[], object], Callable[[], object]]]:
    g = torch.Generator().manual_seed(0)
    cases = []
    ms = (1, 8, 64) if quick else (1, 8, 64, 512)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(4096, 4096, generator=g).to(dtype)  # nn.Linear weight (N, K)
        for m in ms:
            a = torch.randn(m, 4096, generator=g).to(dtype)
            cases.append(("matmul(a, W.T)", f"{m}x4096x4096", dtype,
                          lambda a=a, w=w: F.linear(a, w),
                          lambda a=a, w=w: P.matmul(a, w.T, None)))
        if dtype == torch.float32:
            b = torch.randn(4096, 4096, generator=g)
            a = torch.randn(8, 4096, generator=g)
            cases.append(("matmul(a, B)", "8x4096x4096", dtype,
                          lambda a=a, b=b: torch.mm(a, b), lambda a=a, b=b: P.matmul(a, b, None)))
    rows_set = (1, 64) if quick else (1, 64, 1024)
    for dtype in (torch.float32, torch.bfloat16):
        wv = torch.randn(4096, generator=g).to(dtype)
        bv = torch.randn(4096, generator=g).to(dtype)
        for r in rows_set:
            x = torch.randn(r, 4096, generator=g).to(dtype)
            shape = f"{r}x4096"
            cases += [
                ("softmax", shape, dtype, lambda x=x: torch.softmax(x, -1),
                 lambda x=x: P.softmax(x, False)),
                ("log_softmax", shape, dtype, lambda x=x: torch.log_softmax(x, -1),
                 lambda x=x: P.softmax(x, True)),
                ("rms_norm", shape, dtype, lambda x=x, w=wv: F.rms_norm(x, (4096,), w, 1e-6),
                 lambda x=x, w=wv: P.rms_norm(x, w, 1e-6)),
                ("layer_norm", shape, dtype,
                 lambda x=x, w=wv, b=bv: F.layer_norm(x, (4096,), w, b, 1e-5),
                 lambda x=x, w=wv, b=bv: P.layer_norm(x, w, b, 1e-5)),
                ("sum", shape, dtype, lambda x=x: x.sum(-1), lambda x=x: P.row_sum(x, False)),
            ]
    heads, d = 32, 128
    kv = 1024 if quick else 4096
    q = torch.randn(1, heads, 1, d, generator=g)
    k = torch.randn(1, heads, kv, d, generator=g)
    v = torch.randn(1, heads, kv, d, generator=g)
    cases.append(("attention decode", f"1 q x {kv} kv, 32x128", torch.float32,
                  lambda: F.scaled_dot_product_attention(q, k, v),
                  lambda: P.attention(q, k, v, None, d**-0.5)))
    lq = 256 if quick else 1024
    qp = torch.randn(1, heads, lq, d, generator=g)
    kp = torch.randn(1, heads, lq, d, generator=g)
    vp = torch.randn(1, heads, lq, d, generator=g)
    causal = torch.ones(lq, lq, dtype=torch.bool).tril()
    cases.append(("attention prefill causal", f"{lq} x {lq}, 32x128", torch.float32,
                  lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True),
                  lambda: P.attention(qp, kp, vp, causal, d**-0.5)))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--only", default="", help="run only ops whose name contains this")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (default 3 quick / 7)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'op':28} {'shape':24} {'dtype':9} {'torch ms':>9} {'portable ms':>12} {'ratio':>6}")
    for op, shape, dtype, ref, port in _cases(args.quick):
        if args.only and args.only not in op:
            continue
        row = Row(op, shape, str(dtype).replace("torch.", ""), _median_ms(ref, repeats),
                  _median_ms(port, repeats))
        rows.append(row)
        print(f"{op:28} {shape:24} {row.dtype:9} {row.torch_ms:9.3f} {row.portable_ms:12.3f} "
              f"{row.ratio:6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], fh, indent=1)


if __name__ == "__main__":
    main()
