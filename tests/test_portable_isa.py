"""Portability proof on the CPU: identical bits under every instruction set and thread count.

The same portable computations (every op, every dtype, adversarial values) run in
fresh processes under ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` (torch's kernels,
which the portable path must not depend on), ``NUMBA_CPU_NAME=generic`` (baseline
x86-64: no AVX, no FMA unit, so ``fma`` becomes the C library's correctly rounded
``fmaf``) and 1 or 2 threads (``OMP_NUM_THREADS``); each process prints a SHA-256 per (op, dtype) and
the test requires them all to be equal. Each worker also reports what its compiler
actually emitted for a probe kernel, so the test can check that the generic build
really has no hardware FMA and that no fast-math flag appears in the IR.

Run as a script (``python tests/test_portable_isa.py``) it is the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

WORKER_TIMEOUT_S = 240


def _worker() -> None:
    import numba
    import numpy as np
    import torch

    import detkit
    from detkit.kernels import _portable_kernels as K
    from detkit.kernels import portable_cpu as P
    from detkit.kernels._portable_llvm import fma32

    def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        n = int(np.prod(shape))
        v = rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n).astype(np.float64))
        pool = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-42, 3e38, 65504.0, 6e-8])
        hit = rng.random(n) < 0.05
        v[hit] = rng.choice(pool, int(hit.sum()))
        return torch.from_numpy(v.reshape(shape)).to(dtype)

    def tame(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).to(dtype)

    results: dict[str, str] = {}

    def record(name: str, t: torch.Tensor) -> None:
        raw = t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)
        results[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).replace("torch.", "")
        a, w, bias = make((13, 300), dtype, 1), tame((37, 300), dtype, 2), tame((37,), dtype, 3)
        record(f"matmul_wT/{tag}", P.matmul(a, w.T, bias))
        record(f"matmul_decode/{tag}", P.matmul(a[:3], w.T, bias))
        record(f"matmul_big/{tag}", P.matmul(tame((9, 700), dtype, 4), tame((700, 530), dtype, 5), None))
        record(f"bmm/{tag}", P.matmul(make((3, 5, 40), dtype, 6), tame((3, 40, 11), dtype, 7), None))
        x = make((7, 333), dtype, 8)
        record(f"softmax/{tag}", P.softmax(x, False))
        record(f"log_softmax/{tag}", P.softmax(x, True))
        wv, bv = tame((333,), dtype, 9), tame((333,), dtype, 10)
        record(f"rms_norm/{tag}", P.rms_norm(x, wv, 1e-6))
        record(f"layer_norm/{tag}", P.layer_norm(x, wv, bv, 1e-5))
        record(f"sum/{tag}", P.row_sum(x, False))
        record(f"mean/{tag}", P.row_sum(x, True))
        record(f"cumsum/{tag}", P.row_cumsum(x))
        q, k, v = tame((2, 4, 9, 16), dtype, 11), tame((2, 2, 21, 16), dtype, 12), tame((2, 2, 21, 8), dtype, 13)
        causal = torch.ones(9, 21, dtype=torch.bool).tril(12)
        record(f"attention_causal/{tag}", P.attention(q, k, v, causal, 0.25))
        fmask = torch.from_numpy(np.random.default_rng(14).standard_normal((1, 4, 9, 21))).float()
        record(f"attention_float/{tag}", P.attention(q, k, v, fmask, 0.25))
        xe = make((4099,), dtype, 15) * 4
        for name in P.ELEMENTWISE_OPS:
            record(f"{name}/{tag}", P.elementwise(name, xe))
        # Pow (binary64): a tensor exponent, and a scalar one kept in double
        record(f"pow/{tag}", torch.cat([P.pow(xe.abs(), make((4099,), dtype, 18)), P.pow(xe, 3.0),
                                        P.pow(xe.abs(), 1.0 / 3.0)]))
        # RoPE's angles (1024 positions x 32 frequencies): mostly small arguments, and the
        # largest the reduction by 2/pi meets in a model.
        # (Frequencies from Python floats: torch's pow is itself ISA variant; the product is IEEE.)
        freqs = torch.tensor([10000.0 ** (-i / 32) for i in range(32)], dtype=torch.float32)
        angles = (torch.arange(1024.0)[:, None] * freqs[None]).to(dtype)
        record(f"rope/{tag}", torch.cat([P.elementwise("sin", angles), P.elementwise("cos", angles)]))
        # The mode's composed reductions (logsumexp, var/std, vector norms, and the elementwise
        # compositions logsigmoid and expm1): portable ops in
        # a fixed sequence, so the same bits too; a row of 40,000 is what torch splits across
        # threads when it is alone.
        with detkit.batch_invariant(portable=True, strict=True):
            for label, xr in (("adversarial", make((9, 517), dtype, 19)), ("tame", tame((9, 517), dtype, 20)),
                              ("long row", tame((1, 40000), dtype, 21) * 3)):
                record(f"composed {label}/{tag}", torch.cat([
                    torch.logsumexp(xr, -1), xr.var(-1), xr.std(-1, correction=0), torch.var_mean(xr, -1)[1],
                    torch.linalg.vector_norm(xr, dim=-1), torch.linalg.vector_norm(xr, 2.5, dim=-1),
                    torch.linalg.vector_norm(xr, 3, dim=-1), torch.nn.functional.logsigmoid(xr).reshape(-1),
                    torch.expm1(xr).reshape(-1)]))
            # (F.normalize's division by the norm is torch's: on NaN its 16-bit output is
            # torch's position-dependent NaN, so the adversarial values stay out of it.)
            record(f"normalize/{tag}", torch.nn.functional.normalize(tame((9, 517), dtype, 20), dim=-1))
            # a trainer's loss: token losses, their canonical sums, label smoothing's row sums
            logits, labels = tame((300, 50), dtype, 22), torch.from_numpy(np.random.default_rng(23).integers(0, 50, 300))
            labels[::9] = -100
            record(f"losses/{tag}", torch.stack([
                torch.nn.functional.cross_entropy(logits, labels), torch.nn.functional.nll_loss(logits, labels,
                                                                                                reduction="sum"),
                torch.nn.functional.cross_entropy(logits, labels, weight=tame((50,), dtype, 24).abs(),
                                                  label_smoothing=0.1),
                # BCE (log_sigmoid), KL (xlogy), DPO (-logsigmoid of a margin)
                torch.nn.functional.binary_cross_entropy_with_logits(logits, tame((300, 50), dtype, 25).sigmoid()),
                torch.nn.functional.kl_div(logits.log_softmax(-1), tame((300, 50), dtype, 25).softmax(-1),
                                           reduction="batchmean"),
                -torch.nn.functional.logsigmoid(logits[:, 0] - logits[:, 1]).mean()]))
        # large enough for the multi-threaded drivers
        xb = make((70, 600), dtype, 16)
        wb = tame((600,), dtype, 17)
        record(f"big_rows/{tag}", torch.cat([P.softmax(xb, True), P.rms_norm(xb, wb, 1e-6),
                                            P.layer_norm(xb, wb, wb, 1e-5), P.row_sum(xb, True)[:, None],
                                            P.elementwise("silu", xb), P.row_cumsum(xb)], 1))

    # What did this process's compiler emit? An uncached probe with the kernels' scalar
    # building blocks (cached kernels cannot be inspected).
    @numba.njit(cache=False)
    def probe(x: np.ndarray, y: np.ndarray) -> None:
        for j in range(x.shape[0]):
            y[j] = fma32(x[j], y[j], K.exp_f32(x[j]))

    xs = np.ones(64, dtype=np.float32)
    probe(xs, xs.copy())
    sig = probe.signatures[0]
    asm = probe.inspect_asm(sig)
    llvm_ir = probe.inspect_llvm(sig)
    kernel_ir: dict[str, dict[str, int]] = {}
    if os.environ.get("DETKIT_PORTABLE_IR_CHECK") == "1":
        kernel_ir = _inspect_real_kernels()
    info = {
        "kernel_ir": kernel_ir,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "numba_cpu": str(numba.config.CPU_NAME),
        "threads": torch.get_num_threads(),
        "hw_fma": "vfmadd" in asm,
        "fmaf_call": "fmaf" in asm,
        "fast_math_flags": any(f in llvm_ir for f in (" fast ", " contract ", " reassoc ", " nnan ", " afn ")),
        "llvm_fma": "llvm.fma.f32" in llvm_ir,
    }
    print(json.dumps({"hashes": results, "info": info}))


def _inspect_real_kernels() -> dict[str, dict[str, int]]:
    """Recompile uncached copies of the real kernels and count, in their LLVM IR, any
    fast-math flag on a float instruction, any float64 arithmetic (a silent promotion
    would round twice), and the explicit fma calls."""
    import re

    import numba
    import numpy as np

    from detkit.kernels import _portable_kernels as K

    f32 = np.float32
    x = np.ones((3, 40), f32)
    w = np.ones(40, f32)
    flat = x.reshape(-1)
    cases = {
        "softmax_rows": (x, 0, True, np.empty_like(x), 0, 3),
        "row_cumsum_rows": (np.ones((3, 40), np.int16), 2, np.empty_like(x), 0, 3),
        "layer_norm_rows": (np.ones((3, 40), np.int16), 1, w, True, w, True, f32(1e-5), np.empty_like(x), 0, 3),
        "matmul_packed": (x, np.ones((40, 5), np.int16), 1, w, False, np.empty((3, 5), f32), 0, 1),
        "elementwise_range": (4, flat, 0, np.empty_like(flat), 0, flat.shape[0]),
        "pow_range": (flat, flat, 0.5, False, 0, np.empty_like(flat), 0, flat.shape[0]),
    }
    flag_re = re.compile(r"\b(?:fadd|fsub|fmul|fdiv|fneg|fcmp|call)\b[^\n]*"
                         r"\b(?:fast|contract|reassoc|nnan|ninf|nsz|arcp|afn)\b")
    double_re = re.compile(r"\b(?:fadd|fsub|fmul|fdiv)\s+double\b|fpext float [^\n]* to double")
    out = {}
    for name, args in cases.items():
        fn = getattr(K, name)
        fresh = numba.njit(error_model="numpy")(fn.py_func)
        fresh(*args)
        ir = fresh.inspect_llvm(fresh.signatures[0])
        out[name] = {"fast_math": len(flag_re.findall(ir)), "double": len(double_re.findall(ir)),
                     "fma_calls": ir.count("@llvm.fma.f32("), "fma64_calls": ir.count("@llvm.fma.f64(")}
    return out


def _host_aten() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _configs() -> list[tuple[str, dict[str, str]]]:
    host = _host_aten()
    configs = [("host, 2 threads", {"OMP_NUM_THREADS": "2", "DETKIT_PORTABLE_IR_CHECK": "1"}),
               ("host, 1 thread", {"OMP_NUM_THREADS": "1"}),
               ("aten default", {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2"})]
    if host in ("AVX2", "AVX512"):
        configs.append(("aten avx2", {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}))
    if host == "AVX512":
        configs.append(("aten avx512", {"ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "2"}))
    configs += [("numba generic x86-64, 1 thread", {"NUMBA_CPU_NAME": "generic", "OMP_NUM_THREADS": "1"}),
                ("numba generic x86-64, 2 threads", {"NUMBA_CPU_NAME": "generic", "OMP_NUM_THREADS": "2",
                                                     "ATEN_CPU_CAPABILITY": "default"})]
    return configs


def _run(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "OMP_NUM_THREADS",
                        "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed under {env_extra}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    configs = _configs()
    generic = [c for c in configs if "generic" in c[0]]
    others = [c for c in configs if "generic" not in c[0]]
    # The first generic worker compiles every kernel for baseline x86-64 (a separate
    # cache): run it beside the host workers, and the other generic one after it.
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(_run, generic[0][1])
        outs = dict(zip([n for n, _ in others], pool.map(lambda c: _run(c[1]), others), strict=True))
        outs[generic[0][0]] = first.result()
    for name, env in generic[1:]:
        outs[name] = _run(env)
    return {name: outs[name] for name, _ in configs}


def test_workers_ran_where_asked(runs):
    for name, out in runs.items():
        info = out["info"]
        if "aten" in name and "default" in name:
            assert info["aten_capability"] == "DEFAULT", name
        if "avx2" in name:
            assert info["aten_capability"] == "AVX2", name
        if "avx512" in name:
            assert info["aten_capability"] == "AVX512", name
        assert info["threads"] == (1 if "1 thread" in name else 2), name
        if "generic" in name:
            assert info["numba_cpu"] == "generic" and not info["hw_fma"] and info["fmaf_call"], info
        assert info["llvm_fma"] and not info["fast_math_flags"], (name, info)


def test_same_bits_on_every_isa_and_thread_count(runs):
    names = list(runs)
    base = runs[names[0]]["hashes"]
    from detkit.kernels.portable_cpu import ELEMENTWISE_OPS

    assert len(base) == 3 * (21 + len(ELEMENTWISE_OPS))  # every op x dtype was hashed
    diffs = {name: sorted(k for k, h in runs[name]["hashes"].items() if base[k] != h) for name in names[1:]}
    assert all(not d for d in diffs.values()), f"hash differs from {names[0]!r}: {diffs}"


def test_real_kernels_have_no_fast_math_and_no_float64(runs):
    kernel_ir = runs["host, 2 threads"]["info"]["kernel_ir"]
    assert kernel_ir, "the host worker did not inspect the kernels"
    for name, counts in kernel_ir.items():
        assert counts["fast_math"] == 0, (name, counts)
        # cumsum sums float32 in float64 and Pow is binary64 (canonical-orders.md), neither
        # with an fma; every other kernel is float32 only, with fmas
        binary64 = name in ("row_cumsum_rows", "pow_range")
        assert (counts["double"] > 0) == binary64 and (counts["fma_calls"] > 0) != binary64, (name, counts)
        assert counts["fma64_calls"] == 0, (name, counts)  # Pow's binary64 has no fma either


def test_host_build_uses_hardware_fma(runs):
    # Guards the comparison's power: the host run must exercise the hardware FMA (and
    # the generic run the software one), otherwise equal hashes would prove less.
    try:
        with open("/proc/cpuinfo") as fh:
            has_fma = " fma " in fh.read()
    except OSError:
        pytest.skip("cannot read /proc/cpuinfo to know whether this CPU has FMA")
    if not has_fma:
        pytest.skip("this CPU has no FMA unit; only the software path was exercised")
    assert runs["host, 2 threads"]["info"]["hw_fma"]


if __name__ == "__main__":
    _worker()
