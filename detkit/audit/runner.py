"""Run the audit: every op x dtype x implementation through every applicable check.

Each finished op x implementation x dtype is one record appended to the report (written
to disk atomically at once), so an interrupt or a crash keeps everything finished so far.
An op that raises becomes a record with its error, and the audit goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detkit.audit import impls as _impls
from detkit.audit.catalogue import DEFAULT_HIDDEN, FLOAT_DTYPES, OPS, Inputs, OpSpec, build_inputs, resolve_ops
from detkit.audit.checks import (
    CHECKS,
    PAD,
    CheckResult,
    attention_decode,
    attention_padding,
    compare,
    digest,
)
from detkit.devices import resolve_device as _resolve_device
from detkit.errors import BackendUnavailable, InputError
from detkit.report import ReportWriter

DEFAULT_BATCH_SIZES = (1, 2, 3, 4, 5, 8, 16)
# GPU libraries switch kernels at larger M (cuBLAS heuristics, split-K): sweep further there.
CUDA_BATCH_SIZES = (1, 2, 3, 4, 5, 8, 16, 32, 64, 128, 256)
MAX_BATCH = 4096

# ATEN_CPU_CAPABILITY values from the most basic up; a CPU runs the ones up to its own.
ISA_LEVELS = ("default", "avx2", "avx512")
# numba compiles detkit's CPU kernels for the host; the ISA run asks it for a matching CPU.
NUMBA_CPU_FOR_ISA = {"default": "generic", "avx2": "haswell", "avx512": "skylake-avx512"}
# The libraries under torch's matmuls pick their own code paths: capped to match, since a
# CPU of that generation would run those paths (oneDNN's bfloat16 matmul changes bits).
# Not for detkit's own kernels: their BLAS tiles verify themselves with many BLAS calls at
# first use, which oneDNN's reference path below AVX-512 stretches to tens of minutes.
LIBRARY_CAPS_FOR_ISA = {
    "default": {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
UNCAPPED_LIBRARIES_IMPLS = ("detkit",)
# What an ISA worker records of its own environment, so the report shows what it ran under.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "NUMBA_CPU_NAME", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_environment(isa: str, impl: str = "torch") -> dict[str, str]:
    """The variables an ISA worker runs ``impl`` under: ATen's kernels and detkit's numba
    kernels, and (but for ``UNCAPPED_LIBRARIES_IMPLS``) oneDNN and MKL."""
    env = {"ATEN_CPU_CAPABILITY": isa, "NUMBA_CPU_NAME": NUMBA_CPU_FOR_ISA[isa]}
    return env if impl in UNCAPPED_LIBRARIES_IMPLS else {**env, **LIBRARY_CAPS_FOR_ISA[isa]}


@dataclass(frozen=True)
class AuditConfig:
    """What to audit. Validates on construction (``InputError`` with what to change)."""

    ops: tuple[str, ...] = tuple(OPS)
    impls: tuple[str, ...] = _impls.IMPLS
    dtypes: tuple[str, ...] = ("float32",)
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    runs: int = 3
    device: str = "cpu"
    seed: int = 0
    hidden: int = DEFAULT_HIDDEN
    isa: bool = False
    fail_on: tuple[str, ...] = ()
    impls_explicit: bool = False  # an explicitly requested impl that cannot run is an error

    def __post_init__(self) -> None:
        if not self.ops:
            raise InputError("no ops selected; pass --ops with names from `detkit audit --list-ops`")
        # the report's config.ops: catalogue names, once each, in the order they run (not aliases)
        object.__setattr__(self, "ops", tuple(spec.name for spec in resolve_ops(list(self.ops))))
        # an empty selection would audit nothing and exit 0: a CI gate that passes unchecked
        if not self.impls:
            raise InputError(f"no implementations selected; pass --impl with names from {', '.join(_impls.IMPLS)}")
        if not self.dtypes:
            raise InputError(f"no dtypes selected; pass --dtype with names from {', '.join(FLOAT_DTYPES)}")
        for impl in self.impls:
            if impl not in _impls.IMPLS:
                raise InputError(f"unknown implementation {impl!r}; choose from {', '.join(_impls.IMPLS)}")
        for dt in self.dtypes:
            if dt not in FLOAT_DTYPES:
                raise InputError(f"unknown dtype {dt!r}; choose from {', '.join(FLOAT_DTYPES)}")
        sizes = self.batch_sizes
        if len(sizes) < 2:
            raise InputError(f"--batch-sizes needs at least two sizes to compare, got {list(sizes)}")
        if any(not isinstance(b, int) or b < 1 or b > MAX_BATCH for b in sizes):
            raise InputError(f"batch sizes must be integers from 1 to {MAX_BATCH}, got {list(sizes)}")
        if len(set(sizes)) != len(sizes) or list(sizes) != sorted(sizes):
            raise InputError(f"batch sizes must be increasing without repeats, got {list(sizes)}")
        if self.runs < 2:
            raise InputError(f"--runs must be at least 2 to compare runs, got {self.runs}")
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"unknown device {self.device!r}; use cpu or cuda")
        if self.isa and self.device != "cpu":
            # the ISA check is "n/a" on every cuda record: --isa would be ignored, and a
            # --fail-on isa-variance gate would pass without having measured anything
            raise InputError("--isa compares CPU instruction sets (ATEN_CPU_CAPABILITY) and applies to --device cpu "
                             "only; leave it out, or audit the CPU with --device cpu --isa")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= 2**31 - 1:
            raise InputError(f"--seed must be an integer from 0 to 2147483647, got {self.seed!r}")
        if self.hidden < 16 or self.hidden > 65536:
            raise InputError(f"--hidden must be between 16 and 65536, got {self.hidden}")
        for check in self.fail_on:
            if check not in CHECKS:
                raise InputError(f"unknown check {check!r} in --fail-on; choose from {', '.join(CHECKS)} or any")
        if "isa-variance" in self.fail_on and not self.isa:
            # without --isa the check is "skipped", which never fails: the gate would pass unchecked
            raise InputError("--fail-on isa-variance needs --isa: without it the ISA check does not run")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4), sorted and validated by ``AuditConfig``."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--batch-sizes must be comma-separated integers like 1,2,3,4,8, got {text!r}") from None
    return tuple(sorted(sizes))


def parse_fail_on(text: str | None, isa: bool = False) -> tuple[str, ...]:
    """``"any"`` means every check that runs: isa-variance only with ``isa`` (--isa)."""
    if text is None:
        return ()
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        # an empty $CHECKS in a CI script must not turn the gate off and exit 0
        raise InputError(f"--fail-on names no check; choose from {', '.join(CHECKS)} or any, "
                         "or leave --fail-on out for no gate")
    # every name is checked, "any" or not: a typo next to it, or an isa-variance that
    # needs --isa, must not be dropped in silence
    for name in names:
        if name not in CHECKS and name not in ("any", "all"):
            raise InputError(f"unknown check {name!r} in --fail-on; choose from {', '.join(CHECKS)} or any")
    if "any" in names or "all" in names:
        ran = CHECKS if isa else tuple(c for c in CHECKS if c != "isa-variance")
        return tuple(dict.fromkeys([*ran, *(n for n in names if n in CHECKS)]))
    return tuple(dict.fromkeys(names))


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name`` (cpu or cuda), or a clear error when it is not usable here."""
    return _resolve_device(name, allow_index=False, instead="audit this machine with --device cpu")


@dataclass
class Event:
    """Progress for the caller: ``start`` (total), ``stage`` (a long step worth a line),
    ``phase`` (what runs now), or one finished ``record``."""

    kind: str  # "start" | "stage" | "phase" | "record"
    total: int = 0
    text: str = ""
    record: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[Event], None]


def _set_threads(n: int) -> Callable[[], None]:
    """Set torch's (and numba's, if loaded) thread count; return the undo.

    numba first: its first thread call launches its OpenMP threading layer, which sets
    OpenMP's thread count to NUMBA_NUM_THREADS and so would undo torch.set_num_threads.
    """
    prev_torch = torch.get_num_threads()
    numba = sys.modules.get("numba")
    prev_numba = numba.get_num_threads() if numba is not None else None
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(n)

    def undo() -> None:
        if numba is not None and prev_numba is not None:
            numba.set_num_threads(prev_numba)
        torch.set_num_threads(prev_torch)

    return undo


def _isa_others(device: torch.device) -> list[str]:
    """The ATEN_CPU_CAPABILITY values below this CPU's own (the ones it can also run)."""
    if device.type != "cpu":
        return []
    current = torch.backends.cpu.get_cpu_capability().lower()
    if current in ISA_LEVELS:
        return list(ISA_LEVELS[: ISA_LEVELS.index(current)])
    return ["default"] if current != "default" else []


def _key(op: str, impl: str, dtype: str) -> str:
    return f"{op}.{impl}.{dtype}"


def _run_isa_workers(
    cfg: AuditConfig, impls: list[str], workdir: Path, listener: Listener
) -> dict[str, tuple[Path, str]]:
    """Run the suite at the largest batch size under each other ISA; {isa: (dir, actual capability)}.

    One subprocess per ISA for the impls that run under capped libraries, another for
    those that do not (``UNCAPPED_LIBRARIES_IMPLS``), both writing into the ISA's folder.
    """
    groups = [g for g in ([i for i in impls if i not in UNCAPPED_LIBRARIES_IMPLS],
                          [i for i in impls if i in UNCAPPED_LIBRARIES_IMPLS]) if g]
    done: dict[str, tuple[Path, str]] = {}
    for isa in _isa_others(torch.device(cfg.device)):
        listener(Event("stage", text=f"running the suite in subprocesses under ATEN_CPU_CAPABILITY={isa}, numba, "
                                     "oneDNN and MKL capped to match (oneDNN and MKL not for detkit's own kernels; "
                                     "half-precision matmuls are slow there)"))
        out = workdir / isa
        out.mkdir()
        for n, group in enumerate(groups):
            spec = {"ops": list(cfg.ops), "impls": group, "dtypes": list(cfg.dtypes), "batch": max(cfg.batch_sizes),
                    "seed": cfg.seed, "hidden": cfg.hidden}
            (out / f"spec{n}.json").write_text(json.dumps(spec))
            _run_isa_worker(out, f"spec{n}.json", {**os.environ, **isa_environment(isa, group[0])},
                            f"ATEN_CPU_CAPABILITY={isa}", listener)
        cap_file = out / "capability.txt"
        done[isa] = (out, cap_file.read_text().strip() if cap_file.exists() else "?")
    return done


def _run_isa_worker(out: Path, spec_name: str, env: dict[str, str], label: str, listener: Listener) -> None:
    log = out / f"{Path(spec_name).stem}.log"
    with log.open("w") as stderr:
        # the worker names each result as it starts it (capped, one takes seconds): shown as the phase
        proc = subprocess.Popen([sys.executable, "-m", "detkit.audit.isa_worker", str(out), spec_name], env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            for line in proc.stdout or ():
                listener(Event("phase", text=f"{label}: {line.strip()}"))
            proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the worker must not outlive the audit
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        with (out / "worker.err").open("a") as err:
            err.write(log.read_text()[-4000:])


def _op_inputs(spec: OpSpec, cfg: AuditConfig, dtype: str, device: torch.device) -> Inputs:
    return build_inputs(spec, max(cfg.batch_sizes), FLOAT_DTYPES[dtype], cfg.seed, cfg.hidden).to(device)


def audit_one(
    spec: OpSpec,
    impl: str,
    dtype: str,
    cfg: AuditConfig,
    device: torch.device,
    isa_dirs: dict[str, tuple[Path, str]] | None = None,
) -> dict[str, Any]:
    """All checks of one op x implementation x dtype; raises only if the op itself cannot run."""
    inputs = _op_inputs(spec, cfg, dtype, device)
    sizes = list(cfg.batch_sizes)
    bmax = sizes[-1]
    results = {c: CheckResult(c) for c in CHECKS}
    # The sweep must run (an op that cannot run is an error record); every other part is
    # attempted on its own, so one failing part marks only its own check as an error.
    failed: dict[str, str] = {}

    def attempt(check: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # recorded as that check's error
            failed[check] = f"{type(exc).__name__}: {exc}"
            return None

    threads_all = torch.get_num_threads()
    perm = _permutation(bmax, cfg.seed)
    with _impls.context(impl) as mode:
        outs = {b: spec.run(inputs.rows(slice(0, b))) for b in sizes}
        # Each row's reference is that row alone (a batch of 1), as in assert_batch_invariant:
        # a row first seen at b=8 may already differ from itself alone there.
        alone = [outs[1] if i == 0 and 1 in outs else spec.run(inputs.rows(slice(i, i + 1))) for i in range(bmax)]
        # inputs are built at bmax: the sweep's last call is run 1, these are runs 2..N
        repeats = attempt("run-to-run", lambda: [spec.run(inputs) for _ in range(cfg.runs - 1)])
        shuffled = None if perm is None else attempt("batch-position", lambda: spec.run(inputs.rows(perm)))
        single = None
        if device.type == "cpu" and threads_all > 1:
            # at every b of the sweep, not only the largest: libraries split the reduction
            # across threads when there are few rows (torch's sum of one long row, BLAS for
            # small M) and split the rows when there are many, which is thread invariant
            def one_thread() -> dict[int, tuple[torch.Tensor, ...]]:
                if torch.get_num_threads() != 1:
                    raise RuntimeError(f"torch.set_num_threads(1) did not take effect ({torch.get_num_threads()} threads)")
                return {b: spec.run(inputs.rows(slice(0, b))) for b in sizes}

            undo = _set_threads(1)
            try:
                single = attempt("thread-variance", one_thread)
            finally:
                undo()
        padding = decode = None
        if spec.attention:
            q, k, v = (inputs.batched[n] for n in ("query", "key", "value"))
            rng = np.random.default_rng(cfg.seed + 1)
            padding = attempt("padding", lambda: attention_padding(q, k, v, rng))
            decode = attempt("decode-prefill", lambda: attention_decode(q, k, v, outs[bmax][0]))

    res = results["run-to-run"]
    for i, rep in enumerate(repeats or [], start=2):
        res.add(compare(rep, outs[bmax]), run=i)
    res.note = f"{cfg.runs} runs at b={bmax}"

    _batch_sweep(results["batch-variance"], outs, alone, sizes)

    res = results["batch-position"]
    if perm is None:
        res.verdict, res.note = "n/a", "needs a largest batch size of at least 2"
    elif shuffled is not None:
        res.add(compare(shuffled, tuple(o[perm] for o in outs[bmax])), b=bmax)
        res.note = f"rows permuted at b={bmax}"

    res = results["thread-variance"]
    if device.type != "cpu":
        res.verdict, res.note = "n/a", "CPU only"
    elif threads_all == 1:
        res.verdict, res.note = "skipped", "torch runs with 1 thread here: nothing to compare"
    elif single is not None:
        for b in sizes:
            res.add(compare(single[b], outs[b]), threads=1, b=b)
        res.note = f"1 vs {threads_all} threads at every b of the sweep"

    res = results["padding"]
    if not spec.attention:
        res.verdict, res.note = "n/a", "attention only"
    elif padding is not None:
        plain, cropped = padding
        res.add(compare((cropped,), (plain,)), pad=PAD)
        res.note = f"{PAD} masked left-padding tokens with random contents"

    res = results["decode-prefill"]
    if not spec.attention:
        res.verdict, res.note = "n/a", "attention only"
    elif decode is not None:
        for t, pre, step in decode:
            res.add(compare((step,), (pre,)), position=t)
        res.note = "decode of token t over keys 0..t vs row t of the causal prefill"

    for check, text in failed.items():
        results[check].verdict, results[check].note = "error", text

    _isa_check(results["isa-variance"], spec, impl, dtype, cfg, device, outs[bmax], isa_dirs)

    body: dict[str, Any] = {
        "inputs": inputs.describe(),
        "threads": threads_all,
        "checks": {c: r.to_dict() for c, r in results.items()},
    }
    coverage = getattr(mode, "coverage", None)
    if callable(coverage):
        # which aten calls detkit's mode routed to its kernels, and which ran torch's
        body["coverage"] = coverage().to_dict()
    return body


def _permutation(n: int, seed: int) -> torch.Tensor | None:
    if n < 2:
        return None
    g = torch.Generator().manual_seed(seed + 2)
    perm = torch.randperm(n, generator=g)
    if torch.equal(perm, torch.arange(n)):
        perm = perm.roll(1)
    return perm


def _batch_sweep(
    res: CheckResult, outs: dict[int, tuple[torch.Tensor, ...]], alone: list[tuple[torch.Tensor, ...]],
    sizes: list[int],
) -> None:
    """Every row of f(x[:b]) against the same row computed alone, for every b of the sweep."""
    ref = tuple(torch.cat(rows) for rows in zip(*alone, strict=True))
    for b in sizes:
        if b == 1:  # row 0 alone is its own reference
            continue
        c = compare(outs[b], tuple(r[:b] for r in ref))
        res.add(c, b=b)
        if c.differing and res.first_b is None:
            res.first_b = b
    res.variants = len({digest(tuple(o[:1] for o in outs[b])) for b in sizes})
    res.note = f"every row of b in {sizes} vs the row alone (b=1); variants = distinct results of row 0"


def _isa_check(
    res: CheckResult,
    spec: OpSpec,
    impl: str,
    dtype: str,
    cfg: AuditConfig,
    device: torch.device,
    here: tuple[torch.Tensor, ...],
    isa_dirs: dict[str, tuple[Path, str]] | None,
) -> None:
    if device.type != "cpu":
        res.verdict, res.note = "n/a", "CPU only"
        return
    if not cfg.isa:
        res.verdict, res.note = "skipped", "not requested (--isa)"
        return
    if not isa_dirs:
        res.verdict, res.note = "skipped", "this CPU has no lower ATEN_CPU_CAPABILITY to compare with"
        return
    current = torch.backends.cpu.get_cpu_capability()
    notes = []
    for isa, (folder, actual) in isa_dirs.items():
        path = folder / f"{_key(spec.name, impl, dtype)}.pt"
        err = folder / f"{_key(spec.name, impl, dtype)}.err"
        if path.exists():
            other = tuple(torch.load(path))
            env_file = folder / f"environment.{impl}.json"
            env = json.loads(env_file.read_text()) if env_file.exists() else {}
            res.add(compare(tuple(o.cpu() for o in here), other), isa=isa, actual=actual, environment=env)
        else:
            crash = folder / "worker.err"
            why = (err.read_text() if err.exists() else crash.read_text() if crash.exists() else "").strip()
            notes.append(f"{isa}: {why.splitlines()[-1] if why else 'the ISA worker produced no result'}")
    if notes and res.verdict != "fail":  # a difference found under one ISA stays a finding
        res.verdict = "error"
    res.note = "; ".join([f"{current} vs {', '.join(isa_dirs)}", *notes])


def probe_impls(cfg: AuditConfig, device: torch.device) -> list[_impls.Availability]:
    """Which requested implementations can run here; raises if an explicitly requested one cannot."""
    found = [_impls.availability(impl, device) for impl in cfg.impls]
    missing = [a for a in found if not a.available]
    if cfg.impls_explicit and missing:
        raise BackendUnavailable(
            "requested implementation(s) cannot run here: "
            + "; ".join(f"{a.impl}: {a.reason}" for a in missing)
            + ". Leave them out of --impl (the default audits every available one)."
        )
    return found


def run_audit(
    cfg: AuditConfig,
    writer: ReportWriter,
    listener: Listener | None = None,
    availability: list[_impls.Availability] | None = None,
) -> list[dict[str, Any]]:
    """Run the audit, appending records to ``writer``; returns the op records.

    ``availability`` is ``probe_impls``'s answer when the caller already asked (so that
    usage errors surface before a report file exists). ``KeyboardInterrupt`` propagates
    after the finished records are on disk; the caller finishes the report as partial.
    """
    emit = listener or (lambda _e: None)
    device = resolve_device(cfg.device)
    specs = resolve_ops(list(cfg.ops))
    available = []
    for a in availability if availability is not None else probe_impls(cfg, device):
        writer.add_result(a.to_dict())
        if a.available:
            available.append(a.impl)
        else:
            writer.add_error(f"impl {a.impl}", f"unavailable: {a.reason}")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="detkit-isa-") as tmp:
        isa_dirs = _run_isa_workers(cfg, available, Path(tmp), emit) if cfg.isa else None
        emit(Event("start", total=len(specs) * len(cfg.dtypes) * len(available)))
        for dtype in cfg.dtypes:
            for spec in specs:
                for impl in available:
                    emit(Event("phase", text=f"{spec.name} {dtype} {impl}"))
                    record = _record(spec, impl, dtype, cfg, device, isa_dirs, writer)
                    records.append(record)
                    writer.add_result(record)
                    emit(Event("record", record=record))
    return records


def _record(
    spec: OpSpec,
    impl: str,
    dtype: str,
    cfg: AuditConfig,
    device: torch.device,
    isa_dirs: dict[str, tuple[Path, str]] | None,
    writer: ReportWriter,
) -> dict[str, Any]:
    base: dict[str, Any] = {
        "record": "op", "op": spec.name, "family": spec.family, "impl": impl, "dtype": dtype,
        "device": cfg.device, "seed": cfg.seed, "hidden": cfg.hidden, "batch_sizes": list(cfg.batch_sizes),
        "runs": cfg.runs, "summary": spec.summary,
    }
    start = time.perf_counter()
    # Warnings raised while the op runs (e.g. a kernel choosing a slower path) are
    # findings too: they go into the record instead of scrolling past the live table.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            body = audit_one(spec, impl, dtype, cfg, device, isa_dirs)
            base.update(status="ok", error=None, **body)
        except Exception as exc:  # an op that raises is a finding; the audit goes on
            text = f"{type(exc).__name__}: {exc}"
            base.update(status="error", error=text,
                        checks={c: CheckResult(c, "error", note=text).to_dict() for c in CHECKS})
            writer.add_error(f"{spec.name} [{impl}, {dtype}]", text + "\n" + "".join(traceback.format_exc(limit=3)))
    base["warnings"] = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    base["seconds"] = round(time.perf_counter() - start, 3)
    return base
