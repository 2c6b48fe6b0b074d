"""Benchmark: portable CPU kernels (``portable=True``) vs torch's own CPU ops.

Prints, per kernel and shape, the median time of each and the ratio portable / torch,
measured in the same run, the two interleaved. Shapes follow the CPU kernels issue. Usage::

    python benchmarks/bench_portable.py            # full table
    python benchmarks/bench_portable.py --quick    # a few shapes, fewer repeats
    python benchmarks/bench_portable.py --only matmul --json out.json
    python benchmarks/bench_portable.py --accuracy # ULP table vs detkit.reference
    python benchmarks/bench_portable.py --accuracy reductions  # only its logsumexp/var/std/norm rows

The backend module is called directly (``detkit.kernels.portable_cpu``), so the
numbers are the kernels' cost without the front end's validation.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
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


def _median_ms(ref: Callable[[], object], port: Callable[[], object], repeats: int,
               clock: Callable[[], float]) -> tuple[float, float]:
    """Median ms of ``ref`` and of ``port`` over repeats, interleaved (ref, port, ref, ...)
    so that drift on a busy machine hits both sides alike; one untimed call of each first
    (compilation on first use, caches)."""
    ref()
    port()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ref, times[0]), (port, times[1])):
            t0 = clock()
            fn()
            out.append((clock() - t0) * 1e3)
    return float(np.median(times[0])), float(np.median(times[1]))


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
    for dtype in (torch.float32, torch.bfloat16):
        xw = (torch.rand(64, 4096, generator=g) * 4).to(dtype)
        yw = torch.randn(64, 4096, generator=g).to(dtype)
        cases += [("pow(x, y)", "64x4096", dtype, lambda x=xw, y=yw: torch.pow(x, y), lambda x=xw, y=yw: P.pow(x, y)),
                  ("pow(x, 1.7)", "64x4096", dtype, lambda x=xw: torch.pow(x, 1.7), lambda x=xw: P.pow(x, 1.7))]
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


def _error_stats(side: str, err: np.ndarray) -> dict[str, float]:
    """Max, mean and median of ULP errors. NaN (``ulp_error``: exactly one of result and
    exact value is NaN) propagates, so a wrong NaN shows in the table instead of being
    skipped (``np.nanmax`` & co. would drop it)."""
    return {f"{side}_max": float(np.max(err)), f"{side}_mean": float(np.mean(err)),
            f"{side}_median": float(np.median(err))}


def _fraction(v: object) -> Fraction:
    import mpmath

    x = mpmath.mpf(v)
    man, exp = x.man_exp  # man is the magnitude
    return (-1 if x < 0 else 1) * Fraction(int(man)) * Fraction(2) ** int(exp)


def _exact_unary(name: str, x: torch.Tensor) -> np.ndarray:
    """Exact-enough values (60 digits) of an elementwise function, as Fractions."""
    import mpmath

    mpmath.mp.dps = 60
    fns = {
        "exp": mpmath.exp,
        "log": mpmath.log,
        "rsqrt": lambda t: 1 / mpmath.sqrt(t),
        "sigmoid": lambda t: 1 / (1 + mpmath.exp(-t)),
        "silu": lambda t: t / (1 + mpmath.exp(-t)),
        "tanh": mpmath.tanh,
        "erf": mpmath.erf,
        "gelu": lambda t: t / 2 * (1 + mpmath.erf(t / mpmath.sqrt(2))),
        "sin": mpmath.sin,
        "cos": mpmath.cos,
        "softplus": lambda t: t if t > 20 else mpmath.log1p(mpmath.exp(t)),
        "log1p": mpmath.log1p,
        "gelu_tanh": lambda t: t / 2 * (1 + mpmath.tanh(mpmath.sqrt(2 / mpmath.pi) * (t + mpmath.mpf("0.044715") * t**3))),
    }
    vals = [fns[name](mpmath.mpf(float(v))) for v in x.float().reshape(-1).tolist()]
    return np.array([_fraction(v) for v in vals], dtype=object).reshape(tuple(x.shape))


def _exact_pow(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Exact-enough values (60 digits) of x ** y, as Fractions."""
    import mpmath

    mpmath.mp.dps = 60
    vals = [mpmath.power(mpmath.mpf(a), mpmath.mpf(b)) for a, b in zip(x.tolist(), y.tolist(), strict=True)]
    return np.array([_fraction(v) for v in vals], dtype=object).reshape(tuple(x.shape))


def _exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     scale: float) -> np.ndarray:
    import mpmath

    mpmath.mp.dps = 60
    qf, kf, vf = (t.double().numpy() for t in (q, k, v))  # exact copies of the inputs
    nb, nh, lq, _ = qf.shape
    out = np.empty((nb, nh, lq, vf.shape[3]), dtype=object)
    sc = mpmath.mpf(float(np.float32(scale)))
    for b in range(nb):
        for h in range(nh):
            for i in range(lq):
                last = i + 1 if causal else kf.shape[2]
                s = [mpmath.fsum(mpmath.mpf(x) * mpmath.mpf(y) for x, y in zip(qf[b, h, i], kf[b, h, j]))
                     * sc for j in range(last)]
                m = max(s)
                p = [mpmath.exp(t - m) for t in s]
                tot = mpmath.fsum(p)
                for d in range(vf.shape[3]):
                    out[b, h, i, d] = _fraction(mpmath.fsum(p[j] * mpmath.mpf(vf[b, h, j, d])
                                                            for j in range(last)) / tot)
    return out


def _exact_logsumexp(x: torch.Tensor) -> np.ndarray:
    """Exact-enough logsumexp (60 digits) of each row of a 2-D tensor, as Fractions."""
    import mpmath

    mpmath.mp.dps = 60
    out = []
    for row in x.double().numpy():  # exact copies of the inputs
        m = mpmath.mpf(float(row.max()))
        out.append(_fraction(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v)) - m) for v in row)) + m))
    return np.array(out, dtype=object)


def _exact_moments(x: torch.Tensor, correction: int) -> tuple[np.ndarray, np.ndarray]:
    """(var, std) of each row of a 2-D tensor: var as an exact Fraction, std its square root
    to 60 digits."""
    import mpmath

    mpmath.mp.dps = 60
    var, std = [], []
    for row in x.double().numpy():
        vals = [Fraction(float(v)) for v in row]  # float -> Fraction is exact
        mean = sum(vals, Fraction(0)) / len(vals)
        v = sum(((t - mean) ** 2 for t in vals), Fraction(0)) / (len(vals) - correction)
        var.append(v)
        std.append(_fraction(mpmath.sqrt(mpmath.mpf(v.numerator) / v.denominator)))
    return np.array(var, dtype=object), np.array(std, dtype=object)


def _exact_norm2(x: torch.Tensor) -> np.ndarray:
    """sqrt(sum x*x) of each row of a 2-D tensor, to 60 digits, as Fractions (the sum of
    squares is exact: integers scaled by 2**149, the smallest float32 step)."""
    import mpmath

    mpmath.mp.dps = 60
    out = []
    for row in x.double().numpy():
        total = sum(int(v * 2.0**149) ** 2 for v in row)  # exact: a float32 times 2**149 is an integer
        out.append(_fraction(mpmath.sqrt(mpmath.mpf(total)) / mpmath.mpf(2) ** 149))
    return np.array(out, dtype=object)


def _add_row(rows: list[dict[str, object]], op: str, shape: str, dtype: torch.dtype, exact: np.ndarray,
             port: torch.Tensor, ref: torch.Tensor) -> None:
    """Append (and print) the ULP statistics of one case, portable vs torch."""
    from detkit import reference as R

    ep = R.ulp_error(port, exact)
    et = R.ulp_error(ref.to(port.dtype), exact)
    rows.append({"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                 **_error_stats("portable", ep), **_error_stats("torch", et)})
    r = rows[-1]
    print(f"{op:14} {shape:16} {r['dtype']:9} portable max {r['portable_max']:9.3f} "
          f"mean {r['portable_mean']:7.3f} median {r['portable_median']:6.3f} | torch max "
          f"{r['torch_max']:9.3f} mean {r['torch_mean']:7.3f} median {r['torch_median']:6.3f}", flush=True)


def reduction_accuracy() -> list[dict[str, object]]:
    """ULP table of the reductions the mode composes from routed ops (logsumexp, var, std,
    the 2-norm): each called under ``batch_invariant(portable=True)`` vs torch's own op."""
    import detkit

    # numpy's generator, of their own: torch.randn's bits differ between CPU instruction
    # sets, and the rows above keep their inputs
    rng = np.random.default_rng(6)
    rows: list[dict[str, object]] = []
    Exact = Callable[[torch.Tensor], np.ndarray]
    cases: list[tuple[str, str, np.ndarray, Exact, Callable[[torch.Tensor], object]]] = []
    for n in (50257, 1024):
        cases.append(("logsumexp", f"16x{n}", rng.standard_normal((16, n)) * 3, _exact_logsumexp,
                      lambda x: torch.logsumexp(x, -1)))
    moments = rng.standard_normal((16, 4096)) + 0.5
    cases += [("var", "16x4096", moments, lambda x: _exact_moments(x, 1)[0], lambda x: x.var(-1)),
              ("std", "16x4096", moments, lambda x: _exact_moments(x, 1)[1], lambda x: x.std(-1)),
              ("vector_norm 2", "16x4096", rng.standard_normal((16, 4096)), _exact_norm2,
               lambda x: torch.linalg.vector_norm(x, dim=-1))]
    for dtype in (torch.float32, torch.bfloat16):
        for op, shape, values, exact, fn in cases:
            x = torch.from_numpy(values).to(dtype)
            with detkit.batch_invariant(portable=True, strict=True):  # strict: a fallback would be torch's op
                port = fn(x)
            _add_row(rows, op, shape, dtype, exact(x), port, fn(x))
    return rows


def accuracy() -> list[dict[str, object]]:
    """Max / mean error in ULPs of the output format vs detkit.reference, portable vs torch."""
    from detkit import reference as R

    g = torch.Generator().manual_seed(1)
    rows: list[dict[str, object]] = []

    def add(op: str, shape: str, dtype: torch.dtype, exact: np.ndarray, port: torch.Tensor,
            ref: torch.Tensor) -> None:
        _add_row(rows, op, shape, dtype, exact, port, ref)

    xe = torch.empty(20000).uniform_(-87.0, 88.0, generator=g)
    add("exp", "20000", torch.float32, _exact_unary("exp", xe), P.elementwise("exp", xe), torch.exp(xe))
    xl = torch.exp2(torch.empty(20000).uniform_(-126.0, 127.0, generator=g))
    add("log", "20000", torch.float32, _exact_unary("log", xl), P.elementwise("log", xl), torch.log(xl))
    add("rsqrt", "20000", torch.float32, _exact_unary("rsqrt", xl), P.elementwise("rsqrt", xl), torch.rsqrt(xl))
    xs = torch.randn(20000, generator=g) * 6
    add("sigmoid", "20000", torch.float32, _exact_unary("sigmoid", xs), P.elementwise("sigmoid", xs),
        torch.sigmoid(xs))
    add("silu", "20000", torch.float32, _exact_unary("silu", xs), P.elementwise("silu", xs),
        F.silu(xs))
    xt = torch.randn(20000, generator=g) * 2
    add("tanh", "20000", torch.float32, _exact_unary("tanh", xt), P.elementwise("tanh", xt), torch.tanh(xt))
    # Their own generator, so that the inputs of the rows below stay those of earlier tables.
    xg = torch.randn(20000, generator=torch.Generator().manual_seed(2)) * 3
    add("erf", "20000", torch.float32, _exact_unary("erf", xg), P.elementwise("erf", xg), torch.erf(xg))
    xr = torch.empty(20000).uniform_(-1000.0, 1000.0, generator=torch.Generator().manual_seed(3))
    add("sin", "20000", torch.float32, _exact_unary("sin", xr), P.elementwise("sin", xr), torch.sin(xr))
    add("cos", "20000", torch.float32, _exact_unary("cos", xr), P.elementwise("cos", xr), torch.cos(xr))
    xp = torch.empty(20000).uniform_(-30.0, 30.0, generator=torch.Generator().manual_seed(4))
    add("softplus", "20000", torch.float32, _exact_unary("softplus", xp), P.elementwise("softplus", xp),
        F.softplus(xp))
    # 2^u - 1 from numpy's generator (torch.exp2's bits differ between instruction sets):
    # -1 < x < 2^64, with tiny x of both signs, where 1 + x rounds most
    rq = np.random.default_rng(7)
    xq = torch.from_numpy(np.concatenate([2.0 ** rq.uniform(-24.0, 64.0, 15000) - 1,
                                          np.exp2(rq.uniform(-40.0, -1.0, 5000)) * rq.choice([-1.0, 1.0], 5000)])
                          .astype(np.float32))
    add("log1p", "20000", torch.float32, _exact_unary("log1p", xq), P.elementwise("log1p", xq), torch.log1p(xq))
    # Below x = -3, 1 + erf (or 1 + tanh) cancels in torch's formula, which both columns
    # follow: tiny outputs with a huge relative error. The second row leaves them out.
    keep = xg > -3
    for name, torch_fn in (("gelu", F.gelu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"))):
        exact, port, ref = _exact_unary(name, xg), P.elementwise(name, xg), torch_fn(xg)
        add(name, "20000", torch.float32, exact, port, ref)
        add(name, f"{int(keep.sum())}, x > -3", torch.float32, exact[keep.numpy()], port[keep], ref[keep])
    gp = torch.Generator().manual_seed(5)
    xw = torch.exp2(torch.empty(20000).uniform_(-20.0, 20.0, generator=gp))
    yw = torch.empty(20000).uniform_(-4.0, 4.0, generator=gp)
    add("pow", "20000", torch.float32, _exact_pow(xw, yw), P.pow(xw, yw), torch.pow(xw, yw))
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(8, 1024, generator=g).to(dtype)
        w = torch.randn(128, 1024, generator=g).to(dtype)
        bias = torch.randn(128, generator=g).to(dtype)
        add("linear", "8x1024x128", dtype, R.matmul(a, w.T, bias, exact=True), P.matmul(a, w.T, bias),
            F.linear(a, w, bias))
        a = torch.randn(4, 4096, generator=g).to(dtype)
        w = torch.randn(64, 4096, generator=g).to(dtype)
        add("linear", "4x4096x64", dtype, R.matmul(a, w.T, exact=True), P.matmul(a, w.T, None),
            F.linear(a, w))
        x = (torch.randn(16, 4096, generator=g) + 0.5).to(dtype)
        add("sum", "16x4096", dtype, R.sum(x, exact=True), P.row_sum(x, False), x.sum(-1))
        add("mean", "16x4096", dtype, R.mean(x, exact=True), P.row_sum(x, True), x.mean(-1))
        x = (torch.randn(16, 1024, generator=g) * 4).to(dtype)
        add("softmax", "16x1024", dtype, R.softmax(x, exact=True), P.softmax(x, False), torch.softmax(x, -1))
        add("log_softmax", "16x1024", dtype, R.log_softmax(x, exact=True), P.softmax(x, True),
            torch.log_softmax(x, -1))
        wv = torch.randn(1024, generator=g).to(dtype)
        bv = torch.randn(1024, generator=g).to(dtype)
        eps = float(np.float32(1e-6))
        add("rms_norm", "16x1024", dtype, R.rms_norm(x, wv, eps, exact=True), P.rms_norm(x, wv, eps),
            F.rms_norm(x, (1024,), wv, eps))
        eps = float(np.float32(1e-5))
        add("layer_norm", "16x1024", dtype, R.layer_norm(x, wv, bv, eps, exact=True),
            P.layer_norm(x, wv, bv, eps), F.layer_norm(x, (1024,), wv, bv, eps))
        q = torch.randn(1, 2, 16, 32, generator=g).to(dtype)
        k = torch.randn(1, 2, 64, 32, generator=g).to(dtype)
        v = torch.randn(1, 2, 64, 32, generator=g).to(dtype)
        causal = torch.ones(16, 64, dtype=torch.bool).tril()
        add("attention", "2h 16q 64k d32", dtype, _exact_attention(q, k, v, True, 32**-0.5),
            P.attention(q, k, v, causal, 32**-0.5),
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=32**-0.5))
    return rows + reduction_accuracy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--only", default="", help="run only ops whose name contains this")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (default 3 quick / 7)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--accuracy", nargs="?", const="all", choices=("all", "reductions"),
                        help="ULP accuracy table instead of timings (reductions: only the rows of the "
                             "reductions the mode composes, logsumexp, var, std, the 2-norm)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (both sides)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time (robust on a busy "
                             "machine; use with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.accuracy:
        acc = accuracy() if args.accuracy == "all" else reduction_accuracy()
        if args.json:  # strict JSON: a NaN or infinite error as the string "nan" / "inf"
            with open(args.json, "w") as fh:
                json.dump([{k: str(v) if isinstance(v, float) and not np.isfinite(v) else v for k, v in r.items()}
                           for r in acc], fh, indent=1, allow_nan=False)
        return
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"clock {'process CPU time' if args.cpu_time else 'wall'}, median of {repeats}")
    print(f"{'op':28} {'shape':24} {'dtype':9} {'torch ms':>9} {'portable ms':>12} {'ratio':>6}")
    for op, shape, dtype, ref, port in _cases(args.quick):
        if args.only and args.only not in op:
            continue
        row = Row(op, shape, str(dtype).replace("torch.", ""), *_median_ms(ref, port, repeats, clock))
        rows.append(row)
        print(f"{op:28} {shape:24} {row.dtype:9} {row.torch_ms:9.3f} {row.portable_ms:12.3f} "
              f"{row.ratio:6.2f}", flush=True)
        if args.json:  # after each row: an interruption keeps the finished ones
            with open(args.json, "w") as fh:
                json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], fh, indent=1)


if __name__ == "__main__":
    main()
