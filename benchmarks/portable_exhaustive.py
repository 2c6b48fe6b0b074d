"""Accuracy of the portable Erf, Sin and Cos over every positive finite float32.

    python benchmarks/portable_exhaustive.py                 # erf, sin, cos (about 3 minutes on 2 cores)
    python benchmarks/portable_exhaustive.py --ops erf --json out.json

Runs the numba kernels of ``detkit.kernels._portable_kernels`` (the same bits as
``detkit.kernels.spec``, held by tests/test_portable_spec.py) on all 2,139,095,039
positive finite float32 values (the functions are odd or even, so the negative half says
nothing new) and measures each result in ULPs of the float32 nearest the float64 libm
value (``math.erf``/``math.sin``/``math.cos``, within 1e-8 float32 ULP of exact). The
numbers quoted in docs/canonical-orders.md sections 2.6 and 2.7 come from this script.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
from numba import njit, prange

from detkit.kernels._portable_kernels import erf_f32, sin_cos_f32
from detkit.kernels._portable_llvm import bits_to_f32

OPS = ("erf", "sin", "cos")
LAST = int(np.float32(np.finfo(np.float32).max).view(np.int32))  # bit pattern of the largest finite float32
BELOW_ONE = int(np.float32(1.0).view(np.int32))  # patterns under this are the values in (0, 1)
CHUNKS = 4096


@njit(cache=False)
def _ulps(y: float, exact: float) -> float:
    r32 = np.float32(exact)
    ulp = np.float32(np.nextafter(abs(r32), np.float32(np.inf)) - abs(r32))
    return abs(np.float64(y) - exact) / np.float64(ulp)


@njit(parallel=True, cache=False)
def _scan(op: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    size = (LAST + CHUNKS - 1) // CHUNKS
    worst = np.zeros(CHUNKS)
    where = np.zeros(CHUNKS, dtype=np.int64)
    worst_small = np.zeros(CHUNKS)  # the same over (0, 1)
    where_small = np.zeros(CHUNKS, dtype=np.int64)
    total = np.zeros(CHUNKS)
    for c in prange(CHUNKS):
        for i in range(1 + c * size, min(LAST + 1, 1 + (c + 1) * size)):
            x = bits_to_f32(np.int32(i))
            if op == 0:
                e = _ulps(erf_f32(x), math.erf(np.float64(x)))
            elif op == 1:
                e = _ulps(sin_cos_f32(x, False), math.sin(np.float64(x)))
            else:
                e = _ulps(sin_cos_f32(x, True), math.cos(np.float64(x)))
            total[c] += e
            if e > worst[c]:
                worst[c] = e
                where[c] = i
            if i < BELOW_ONE and e > worst_small[c]:
                worst_small[c] = e
                where_small[c] = i
    return worst, where, worst_small, where_small, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        sys.exit(f"unknown op(s) {unknown}; choose from {list(OPS)}")
    rows = []
    for name in ops:
        start = time.perf_counter()
        worst, where, worst_small, where_small, total = _scan(OPS.index(name))
        i, j = int(worst.argmax()), int(worst_small.argmax())
        rows.append({"op": name, "values": LAST, "max_ulp": float(worst[i]),
                     "at": float(np.int32(where[i]).view(np.float32)), "mean_ulp": float(total.sum() / LAST),
                     "max_ulp_below_1": float(worst_small[j]),
                     "at_below_1": float(np.int32(where_small[j]).view(np.float32)),
                     "seconds": round(time.perf_counter() - start, 1)})
        r = rows[-1]
        print(f"{name}: {r['values']:,} positive finite float32: max {r['max_ulp']:.4f} ULP at {r['at']!r}, "
              f"mean {r['mean_ulp']:.4f}; below 1: max {r['max_ulp_below_1']:.4f} at {r['at_below_1']!r} "
              f"({r['seconds']} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
