"""Accuracy of detkit's CPU kernels (portable=False) and of torch's ops, in ULPs of the exact result.

    python benchmarks/accuracy.py            # Markdown table for docs/accuracy.md
    python benchmarks/accuracy.py --json -   # the same numbers as JSON

Both detkit and torch run on the same random inputs, in the input dtype; the error of
each output element is measured against ``detkit.reference`` (the exact value, see
``docs/reference.md``) with ``detkit.reference.ulp_error``: 0.5 means correctly
rounded. Attention has no exact reference; it is measured against torch's float64
SDPA rounded once to the dtype (integer ULP distance, so 0 = that rounding).
Inputs are standard normal (softmax inputs times 4, sum/matmul inputs as is), sizes
small enough for exact arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from detkit import kernels, reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Row:
    """Max and median ULP error of detkit and torch for one kernel and dtype."""

    kernel: str
    dtype: str
    shape: str
    detkit_max: float
    detkit_median: float
    torch_max: float
    torch_median: float

    def __post_init__(self) -> None:
        if min(self.detkit_max, self.detkit_median, self.torch_max, self.torch_median) < 0:
            raise ValueError("ULP errors are non-negative")


def _stats(err: np.ndarray) -> tuple[float, float]:
    return float(np.max(err)), float(np.median(err))


def _measure(
    name: str, dtype: str, shape: str, ours: torch.Tensor, theirs: torch.Tensor, exact: object
) -> Row:
    dm, dmed = _stats(reference.ulp_error(ours, exact))
    tm, tmed = _stats(reference.ulp_error(theirs, exact))
    return Row(name, dtype, shape, dm, dmed, tm, tmed)


def run(rows: int = 8, length: int = 256, seed: int = 0) -> list[Row]:
    """Measure every kernel for every dtype on seeded random inputs."""
    out: list[Row] = []
    for dname, dtype in DTYPES.items():
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, length, generator=gen).to(dtype)
        w = torch.randn(length, generator=gen).to(dtype)
        bvec = torch.randn(length, generator=gen).to(dtype)
        xs = (torch.randn(rows, length, generator=gen) * 4).to(dtype)
        shape = f"{rows}x{length}"
        eps = float(np.float32(1e-6))
        cases: list[tuple[str, str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], Callable[[], object]]] = [
            ("softmax", shape, lambda: kernels.softmax(xs), lambda: torch.softmax(xs, -1),
             lambda: reference.softmax(xs, exact=True)),
            ("log_softmax", shape, lambda: kernels.log_softmax(xs), lambda: torch.log_softmax(xs, -1),
             lambda: reference.log_softmax(xs, exact=True)),
            ("rms_norm", shape, lambda: kernels.rms_norm(x, w, eps), lambda: F.rms_norm(x, (length,), w, eps),
             lambda: reference.rms_norm(x, w, eps, exact=True)),
            ("layer_norm", shape, lambda: kernels.layer_norm(x, w, bvec),
             lambda: F.layer_norm(x, (length,), w, bvec), lambda: reference.layer_norm(x, w, bvec, exact=True)),
            ("sum", shape, lambda: kernels.sum(x), lambda: x.sum(-1), lambda: reference.sum(x, exact=True)),
            ("mean", shape, lambda: kernels.mean(x), lambda: x.mean(-1), lambda: reference.mean(x, exact=True)),
        ]
        a = torch.randn(rows, length, generator=gen).to(dtype)
        bm = torch.randn(length, 32, generator=gen).to(dtype)
        bias = torch.randn(32, generator=gen).to(dtype)
        cases.append(
            ("matmul (+bias)", f"{rows}x{length} @ {length}x32", lambda: kernels.matmul(a, bm, bias),
             lambda: torch.addmm(bias, a, bm), lambda: reference.matmul(a, bm, bias, exact=True))
        )
        a3 = torch.randn(4, rows, length, generator=gen).to(dtype)
        b3 = torch.randn(4, length, 16, generator=gen).to(dtype)
        cases.append(
            ("bmm", f"4x{rows}x{length} @ 4x{length}x16", lambda: kernels.matmul(a3, b3),
             lambda: torch.bmm(a3, b3), lambda: reference.matmul(a3, b3, exact=True))
        )
        for name, shp, ours, theirs, exact in cases:
            out.append(_measure(name, dname, shp, ours(), theirs(), exact()))
        q = torch.randn(2, 4, 16, 64, generator=gen).to(dtype)
        k = torch.randn(2, 4, 128, 64, generator=gen).to(dtype)
        v = torch.randn(2, 4, 128, 64, generator=gen).to(dtype)
        ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).to(dtype)
        out.append(
            _measure("attention (vs float64)", dname, "2x4 heads, 16 q, 128 kv, d 64",
                     kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), ref64)
        )
    return out


def markdown(rows: list[Row]) -> str:
    """The table for docs/accuracy.md."""
    lines = [
        "| kernel | dtype | shape | detkit max | detkit median | torch max | torch median |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.dtype} | {r.shape} | {r.detkit_max:.3g} | {r.detkit_median:.3g} "
            f"| {r.torch_max:.3g} | {r.torch_median:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="write JSON instead of Markdown ('-' for stdout)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args(argv)
    rows = run(args.rows, args.length)
    if args.json:
        # strict JSON: a NaN or infinite error (ulp_error's wrong NaN / inf) as the string "nan" / "inf"
        text = json.dumps([{k: str(v) if isinstance(v, float) and not np.isfinite(v) else v
                            for k, v in asdict(r).items()} for r in rows], indent=2, allow_nan=False)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
