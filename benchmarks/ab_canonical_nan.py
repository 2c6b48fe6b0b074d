"""A/B: canonical NaNs stored by the CPU row kernels vs a numpy pass over the output.

    python benchmarks/ab_canonical_nan.py              # the table in RESULTS.md
    python benchmarks/ab_canonical_nan.py --rounds 3 --calls 10

The row kernels make every output NaN the positive quiet NaN with a select in their
final stores (``_cpu_numba._canon``). Before, they stored whatever NaN the arithmetic
gave and ``cpu._finish`` replaced NaNs with ``np.copyto(out, nan, where=isnan(out))``.
This script builds both versions from the current ``_cpu_numba.py`` (the old one with
``_canon`` returning its argument) in a temporary directory, runs each call of the table
through both on the same input, alternately, and prints new / old: the median of
``--rounds`` ratios, each between the medians of ``--calls`` timed calls. It checks that
both give the same bits first. The first run compiles both versions (about a minute).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import numba
import numpy as np
import torch

numba.config.THREADING_LAYER = "workqueue"  # as detkit.kernels.cpu

_SOURCE = Path(__file__).resolve().parents[1] / "detkit" / "kernels" / "_cpu_numba.py"
_CANON = "    return v if v == v else np.nan\n"
CASES = (
    ("softmax", 64, 32000, torch.float32),
    ("softmax", 8, 4096, torch.bfloat16),
    ("rms_norm", 64, 4096, torch.float32),
    ("layer_norm", 64, 4096, torch.float32),
    ("softmax", 1024, 4096, torch.float32),
    ("rms_norm", 8, 4096, torch.bfloat16),
)


def _load(name: str, source: str, where: Path) -> ModuleType:
    path = where / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _call(nk: ModuleType, numpy_pass: bool, kind: str, x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
    """What ``detkit.kernels.cpu`` does around the row kernel (widen, run, finish)."""
    xn = x.to(torch.float32).contiguous().numpy()
    out = torch.empty(xn.shape, dtype=torch.float32).numpy()
    kernel = getattr(nk, kind if xn.size > 1 << 16 else kind + "_serial")
    if kind == "softmax":
        kernel(xn, out, False)
    elif kind == "rms_norm":
        kernel(xn, w, True, 1e-6, out)
    else:
        kernel(xn, w, w, True, True, 1e-5, out)
    if numpy_pass:
        np.copyto(out, np.nan, where=np.isnan(out))
    return torch.from_numpy(out).to(x.dtype)


def _median_time(fn: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="ratios whose median is reported")
    p.add_argument("--calls", type=int, default=30, help="timed calls per median")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        p.error("--rounds and --calls must be >= 1")
    source = _SOURCE.read_text()
    if source.count(_CANON) != 1:
        p.error(f"{_SOURCE} no longer has {_CANON.strip()!r} once: update this script")
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    with tempfile.TemporaryDirectory() as tmp:
        new = _load("_ab_nk_new", source, Path(tmp))
        old = _load("_ab_nk_old", source.replace(_CANON, "    return v\n"), Path(tmp))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; new / old: median of {args.rounds} "
              f"ratios of {args.calls}-call medians")
        print(f"{'call':28} {'new / old':>9}  {'ratios':32} {'new ms':>8}")
        for kind, m, n, dtype in CASES:
            x = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to(dtype)
            x[0, 1] = float("nan")  # a NaN row: both versions must canonicalise it
            w = np.ones(n, np.float32)
            a_new = _call(new, False, kind, x, w)
            a_old = _call(old, True, kind, x, w)
            if not torch.equal(a_new.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               a_old.view(torch.int16 if dtype != torch.float32 else torch.int32)):
                print(f"{kind} {m}x{n}: the two versions give other bits", file=sys.stderr)
                return 1
            ratios, new_ms = [], []
            for _ in range(args.rounds):
                t_old = _median_time(lambda: _call(old, True, kind, x, w), args.calls)
                t_new = _median_time(lambda: _call(new, False, kind, x, w), args.calls)
                ratios.append(t_new / t_old)
                new_ms.append(t_new * 1e3)
            label = f"{kind} {m}x{n} {str(dtype).removeprefix('torch.')}"
            print(f"{label:28} {statistics.median(ratios):9.2f}  {', '.join(f'{r:.2f}' for r in ratios):32} "
                  f"{statistics.median(new_ms):8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
