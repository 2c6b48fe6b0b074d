"""2-D matmul on the CPU through BLAS on fixed-shape row tiles, verified at first use.

BLAS (MKL for float32/float64, oneDNN for bfloat16/float16 in torch's CPU build)
chooses its kernel, blocking and thread split from the whole problem shape, so the
bits of one output row change with M, and (MKL splits K across threads for small M)
with the thread count. Here BLAS only ever sees tiles whose heights come from a table
keyed by dtype (never from M), each tile copied into a fixed, freshly allocated
(64-byte aligned) buffer so that alignment and offsets cannot change the library's
path either. M is covered by tiles, the last one padded with zero rows.

That a row gets the same bits in every tile rests on the library's behaviour, so it is
verified on this machine the first time a configuration (dtype, K, N, layout and
alignment of b, bias or not) is used, on inputs built so that almost any change of the
reduction order changes the result's bits (see ``_sensitive_rows``):

* for each candidate height h, a row's bits must not change when the tile's rows are
  permuted, replaced or zeroed ("row invariant");
* "free" mode: BLAS keeps torch's threads, accepted only if 1, 2 and all-core thread
  counts give the same bits (another count, set later, is checked at its first use;
  if it disagrees, BLAS runs on the largest verified count below it); "pinned" mode: every BLAS call runs on one thread (tiles
  are spread over a small pool of one-thread workers), checked also from a worker;
* heights whose rows agree bitwise form a class; the class with the most heights is
  used (free before pinned on a tie), and M is covered greedily by its heights;
* pinned, a single smallest tile (small M) may be split into equal 64-byte aligned
  column blocks for the workers, if the blocks give the whole width's bits.

If no height is row invariant, the configuration uses the fixed-order compiled kernel
instead, with a warning and an entry in :func:`cpu_status` (never silently).

float16 uses BLAS only on a CPU with native float16 matrix instructions (AVX512-FP16 or
AMX-FP16). Elsewhere torch's float16 GEMM is a scalar reference loop: measured on a
2-core EPYC (AVX-512, no FP16), 256x2048 @ 2048x2048 took 5.5 s against 0.10 s for the
fixed-order kernel, and the first-use verification of one shape took minutes. Decided
from the CPU's flags, never from a timing (a timing could pick another kernel, hence
other bits, from one run to the next); :func:`cpu_status` lists the choice.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from detkit._reentry import own_thread, set_inside
from detkit._testing_values import same_bits  # bitwise, unlike torch.equal (NaN never equals NaN)

# Candidate tile heights per dtype. Measured on a 2-core AVX-512/AMX Xeon, torch 2.13,
# K = N = 4096: float32 (MKL) gives one class 16..512 but only on one thread; bfloat16
# (oneDNN, AMX) forms classes such as {8, 16, 32} and {64, 128, 256} that depend on b's
# layout, so several candidates let the verification find a large class.
TILE_HEIGHTS: dict[torch.dtype, tuple[int, ...]] = {
    torch.float32: (16, 64, 256),
    torch.float64: (16, 64, 256),
    torch.bfloat16: (32, 64, 128, 256),
    torch.float16: (32, 64, 128, 256),
}

_ENV_FORCE = "DETKIT_CPU_MATMUL"  # "fixed-order" bypasses BLAS (for testing the fallback)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _blas_skipped(dtype: torch.dtype) -> str | None:
    """Why BLAS is not used for ``dtype`` on this CPU (None: it is, once verified)."""
    if dtype == torch.float16 and not _cpu_flags() & {"avx512_fp16", "amx_fp16"}:
        return ("no native float16 matrix instructions (AVX512-FP16, AMX-FP16) on this CPU: torch's float16 "
                "GEMM is a scalar loop, far slower than the fixed-order kernel")
    return None


# Thread counts checked at verification, so that the verdict (and with it the algorithm)
# never depends on the thread count in force when a configuration is first used.
_THREAD_COUNTS = {1, 2, os.cpu_count() or 1, torch.get_num_threads()}


@dataclass(frozen=True)
class TileVerdict:
    """The outcome of verifying one matmul configuration on this machine."""

    dtype: str
    k: int
    n: int
    b_layout: str
    b_align: int
    bias: bool
    threads: tuple[int, ...]
    pinned: bool
    heights: tuple[int, ...]
    reason: str
    n_split: int = 1

    def __post_init__(self) -> None:
        if self.k < 1 or self.n < 1 or not self.threads:
            raise ValueError("TileVerdict needs k, n >= 1 and the thread counts checked")
        if list(self.heights) != sorted(self.heights):
            raise ValueError("TileVerdict heights must be ascending")
        if self.n_split < 1 or self.n % self.n_split:
            raise ValueError("TileVerdict n_split must be a divisor of n")

    @property
    def ok(self) -> bool:
        """True when BLAS tiles are used (at least one height verified)."""
        return len(self.heights) > 0


_VERDICTS: dict[tuple[object, ...], TileVerdict] = {}
_LOCK = threading.Lock()
_BUFFERS = threading.local()
_POOL: ThreadPoolExecutor | None = None


def cpu_status() -> dict[str, object]:
    """What the CPU matmul does on this machine: tile tables and every verdict so far."""
    with _LOCK:
        verdicts = [asdict(v) | {"ok": v.ok} for v in _VERDICTS.values()]
    return {
        "tile_heights": {str(k).removeprefix("torch."): list(v) for k, v in TILE_HEIGHTS.items()},
        "forced_fixed_order": os.environ.get(_ENV_FORCE, "") == "fixed-order",
        "fixed_order_dtypes": {str(d).removeprefix("torch."): why for d in TILE_HEIGHTS
                               if (why := _blas_skipped(d)) is not None},
        "verdicts": verdicts,
        "fallback_configs": sum(1 for v in verdicts if not v["ok"]),
    }


def _one_thread_worker() -> None:
    # torch initialises a thread's OpenMP/MKL thread count lazily, from a process-wide
    # value, on the thread's first parallel op; force that first, then pin to one. Pin
    # before that op as well: with the default count it would start a second OpenMP team,
    # owned by this thread, and while a process has more OpenMP threads than cores, libgomp
    # stops spin-waiting in every team, so torch's own small ops on the caller's thread
    # became about 5x slower (measured: a 8x256x768 linear, 17 -> 82 us on 2 cores).
    torch.set_num_threads(1)
    torch.ones(1 << 18).add_(1)
    torch.set_num_threads(1)
    # Its torch calls (BLAS on a tile) are detkit's building blocks: under the mode they
    # must reach torch's kernels, not be routed back into detkit.
    set_inside(True)


def _pool() -> ThreadPoolExecutor:
    """Workers whose BLAS runs on one thread each (torch's thread setting is per thread)."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=max(2, os.cpu_count() or 1),
                thread_name_prefix="detkit-blas",
                initializer=_one_thread_worker,
            )
        return _POOL


_FORKED = False


def _after_fork_in_child() -> None:
    # A forked child has only the thread that forked: the pool's workers did not come
    # along, and work submitted to the inherited pool waited forever (a DataLoader-style
    # child's first verification or pinned matmul hung). A lock held by another thread at
    # the fork would never be released either.
    global _POOL, _LOCK, _FORKED
    _POOL = None
    _LOCK = threading.Lock()
    _FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _buffer(kind: str, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    store: dict[tuple[object, ...], torch.Tensor] | None = getattr(_BUFFERS, "store", None)
    if store is None:
        store = {}
        _BUFFERS.store = store
    key = (kind, dtype, rows, cols)
    buf = store.get(key)
    if buf is None:
        buf = torch.zeros(rows, cols, dtype=dtype)
        store[key] = buf
    return buf


def _layout(b: torch.Tensor) -> tuple[str, torch.Tensor]:
    if b.stride(1) == 1 and b.stride(0) >= max(1, b.shape[1]):
        return "n", b
    if b.stride(0) == 1 and b.stride(1) >= max(1, b.shape[0]):
        return "t", b
    return "n", b.contiguous()


def _tile(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, h: int) -> torch.Tensor:
    """BLAS on one fixed (h, K) buffer; ``a`` has at most h rows. Returns a fresh (rows, N)."""
    rows, k = a.shape
    buf = _buffer("a", a.dtype, h, k)
    buf[:rows].copy_(a)
    if rows < h:
        buf[rows:].zero_()
    obuf = _buffer("o", a.dtype, h, b.shape[1])
    if bias is None:
        torch.mm(buf, b, out=obuf)
    else:
        torch.addmm(bias, buf, b, out=obuf)
    return obuf[:rows].clone()


def _plan(m: int, heights: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(start, rows, height) tiles covering m rows: greedy by the largest height that fits."""
    plan = []
    pos = 0
    while pos < m:
        rem = m - pos
        h = max((t for t in heights if t <= rem), default=heights[0])
        rows = min(h, rem)
        plan.append((pos, rows, h))
        pos += rows
    return plan


def _with_threads(n: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    old = torch.get_num_threads()
    if old == n:
        return fn()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


# (verdict, torch's thread count outside verdict.threads) -> the thread count free-mode
# BLAS runs at: that count if it gives the verified bits, else the largest verified one
# below it.
_FREE_THREADS: dict[tuple[TileVerdict, int], int] = {}


def _agrees_at(b: torch.Tensor, bias: torch.Tensor | None, verdict: TileVerdict, n: int) -> bool:
    """Whether BLAS on ``n`` threads gives the verified heights' one-thread bits, on the
    verification's inputs (same seed, so the same sensitive rows and synthetic b)."""
    _, sb, sbias, common = _verification_inputs(b, bias)
    for h in verdict.heights:
        a = common[:h]
        ref = _with_threads(1, lambda: _tile(a, sb, sbias, h))
        if not same_bits(_with_threads(n, lambda: _tile(a, sb, sbias, h)), ref):
            return False
    return True


def _free_threads(b: torch.Tensor, bias: torch.Tensor | None, verdict: TileVerdict) -> int:
    """The thread count for free-mode BLAS: torch's, where it gives the verified bits.

    The verification checks the thread counts in ``verdict.threads`` only (1, 2, the
    cores, torch's at import); torch.set_num_threads(8) afterwards gave float64 rows
    other bits (MKL splits the work by thread count). Another count is checked at its
    first use; if it disagrees, BLAS runs on the largest verified count below it.
    """
    n = torch.get_num_threads()
    if n in verdict.threads:
        return n
    with _LOCK:
        run = _FREE_THREADS.get((verdict, n))
    if run is None:
        if _FORKED:  # a forked child's own OpenMP team is stale (see _verify_in_child)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="detkit-verify", initializer=set_inside,
                                    initargs=(True,)) as one:
                agrees = one.submit(_agrees_at, b, bias, verdict, n).result()
        else:
            agrees = _agrees_at(b, bias, verdict, n)
        run = n if agrees else max(t for t in verdict.threads if t <= n)
        with _LOCK:
            _FREE_THREADS[(verdict, n)] = run
    return run


def _run(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, verdict: TileVerdict) -> torch.Tensor:
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    heights = verdict.heights
    plan = _plan(a.shape[0], heights)
    # Work items: (start, rows, height, column block). Column blocks are verified at
    # first use to give the whole width's bits for every height, so splitting when there
    # are fewer tiles than workers only changes who computes what, never the bits.
    items = [(pos, rows, h, slice(None)) for pos, rows, h in plan]
    threads = torch.get_num_threads()
    if verdict.pinned and len(plan) < threads and verdict.n_split > 1:
        nb = b.shape[1] // verdict.n_split
        items = [
            (pos, rows, h, slice(c * nb, (c + 1) * nb)) for pos, rows, h in plan for c in range(verdict.n_split)
        ]

    def work(chunk: list[tuple[int, int, int, slice]]) -> None:
        if verdict.pinned:
            torch.set_num_threads(1)  # idempotent; see _one_thread_worker
        for pos, rows, h, cols in chunk:
            bias_c = None if bias is None else bias[cols]
            out[pos : pos + rows, cols] = _tile(a[pos : pos + rows], b[:, cols], bias_c, h)

    if not verdict.pinned:
        _with_threads(_free_threads(b, bias, verdict), lambda: (work(items), out)[1])
        return out
    workers = min(threads, len(items))
    if workers <= 1:
        _with_threads(1, lambda: (work(items), out)[1])
        return out
    # Items are independent; which one-thread worker computes one does not matter.
    chunks = [items[i::workers] for i in range(workers)]
    try:
        for f in [_pool().submit(work, c) for c in chunks]:
            f.result()
    finally:
        # A worker's set_num_threads(1) also set torch's process-wide default that new
        # threads start from; put back this thread's value.
        torch.set_num_threads(threads)
    return out


def _split_ok(run_cols: Callable[[torch.Tensor, slice], torch.Tensor], a: torch.Tensor, n: int, split: int) -> bool:
    """Whether computing ``split`` equal column blocks gives the whole width's bits."""
    whole = run_cols(a, slice(None))
    nb = n // split
    parts = [run_cols(a, slice(c * nb, (c + 1) * nb)) for c in range(split)]
    return same_bits(torch.cat(parts, dim=1), whole)


def _random_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _synthetic_b(b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random b with b's shape, strides and 64-byte alignment; rows K/2.. repeat rows 0.."""
    k, n = b.shape
    # float64 values for float64 (float32 ones multiply exactly in float64, which hides
    # the difference between fused and separate multiply-adds and many order changes)
    vals = torch.randn(k, n, generator=gen, dtype=_random_dtype(b.dtype))
    half = k // 2
    vals[half : 2 * half] = vals[:half]
    span = (k - 1) * b.stride(0) + (n - 1) * b.stride(1) + 1
    per = 64 // b.element_size()
    store = torch.zeros(span + per, dtype=b.dtype)
    offset = (b.data_ptr() % 64) // b.element_size()
    view = store[offset:].as_strided(b.shape, b.stride())
    view.copy_(vals)
    return view


def _sensitive_rows(h: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows whose second half cancels the first against ``_synthetic_b``.

    The exact product is then zero and what remains is the rounding error of the
    partial sums, which changes with almost any change of the reduction order, so that
    even a bfloat16 result (8 bits) shows it; with plain random data an order change
    often vanishes in the final rounding. Every fourth row is ordinary random data.
    Row 2 (when there is one) overflows: its products are +-inf in the accumulation,
    and which of inf, -inf or NaN a row gets depends on how the library adds them (with
    K = 2, bfloat16's 32-row BLAS tiles gave NaN where its larger tiles gave inf).
    """
    a = torch.randn(h, k, generator=gen, dtype=_random_dtype(dtype)) * 8
    half = k // 2
    a[:, half : 2 * half] = -a[:, :half]
    a[::4] = torch.randn(a[::4].shape, generator=gen, dtype=a.dtype)
    if h > 2:
        a[2] = (1 - 2 * (torch.arange(k) % 2)).to(a.dtype) * torch.finfo(dtype).max
    return a.to(dtype)


def _row_invariant(run: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, gen: torch.Generator) -> str:
    """'' if each row's bits survive permutation, other rows and zero padding, else why not."""
    h = a.shape[0]
    ref = run(a)
    perm = torch.randperm(h, generator=gen)
    if not same_bits(run(a[perm]), ref[perm]):
        return "rows changed when the tile's rows were permuted"
    if h > 1:
        other = a.clone()
        other[1:] = _sensitive_rows(h - 1, a.shape[1], a.dtype, gen)
        if not same_bits(run(other)[:1], ref[:1]):
            return "row 0 changed when the other rows changed"
        if not same_bits(run(a[:1]), ref[:1]):
            return "row 0 changed when the other rows were zero padding"
    return ""


def _thread_invariant(run: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor) -> bool:
    ref = _with_threads(1, lambda: run(a))
    return all(same_bits(_with_threads(n, lambda: run(a)), ref) for n in sorted(_THREAD_COUNTS - {1}))


def _verification_inputs(
    b: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Generator, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(generator, synthetic b, zero bias or None, sensitive rows for the tallest tile): the
    same seed every time, so a later check sees exactly the inputs the verdict was made on."""
    gen = torch.Generator().manual_seed(0x5EED)
    sb = _synthetic_b(b, gen)
    sbias = None if bias is None else torch.zeros(b.shape[1], dtype=b.dtype)
    return gen, sb, sbias, _sensitive_rows(max(TILE_HEIGHTS[b.dtype]), b.shape[0], b.dtype, gen)


def _verify(b: torch.Tensor, bias: torch.Tensor | None, key: tuple[object, ...], layout: str) -> TileVerdict:
    dtype = b.dtype
    gen, sb, sbias, common = _verification_inputs(b, bias)
    candidates = TILE_HEIGHTS[dtype]
    h0 = candidates[0]

    def runner(h: int, pinned: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(a: torch.Tensor) -> torch.Tensor:
            return _with_threads(1, lambda: _tile(a, sb, sbias, h)) if pinned else _tile(a, sb, sbias, h)

        return run

    notes: list[str] = []
    classes: dict[tuple[bool, bytes], list[int]] = {}
    for h in candidates:
        a = common[:h]
        why = _row_invariant(runner(h, True), a, gen)
        if why:
            notes.append(f"height {h}: {why}")
            continue
        pinned_rows = runner(h, True)(a)[:h0]
        threads = torch.get_num_threads()
        from_worker = _pool().submit(runner(h, True), a).result()[:h0]
        torch.set_num_threads(threads)
        if same_bits(from_worker, pinned_rows):
            classes.setdefault((True, pinned_rows.view(torch.uint8).numpy().tobytes()), []).append(h)
        else:
            notes.append(f"height {h}: a one-thread worker gives other bits")
        if _thread_invariant(runner(h, False), a) and not _row_invariant(runner(h, False), a, gen):
            free_rows = runner(h, False)(a)[:h0]
            classes.setdefault((False, free_rows.view(torch.uint8).numpy().tobytes()), []).append(h)
        else:
            notes.append(f"height {h}: not thread-count invariant")
    heights: tuple[int, ...] = ()
    pinned = True
    if classes:
        (pinned, _), best = max(classes.items(), key=lambda kv: (len(kv[1]), not kv[0][0], -kv[1][0]))
        heights = tuple(best)
        notes.insert(0, f"verified heights {list(heights)}" + (" on one-thread BLAS" if pinned else ""))
    else:
        notes.insert(0, "no tile height is batch invariant")
    # One-thread BLAS on fewer tiles than workers leaves cores idle: split N into equal,
    # 64-byte aligned column blocks for the workers if, for every height, that gives
    # the same bits as the whole width (then the split is scheduling, not numerics).
    n = b.shape[1]
    split = max(2, os.cpu_count() or 1)
    n_split = 1
    if heights and pinned and n % split == 0 and (n // split) % 32 == 0:

        def cols_runner(h: int) -> Callable[[torch.Tensor, slice], torch.Tensor]:
            def run_cols(a: torch.Tensor, cols: slice) -> torch.Tensor:
                bias_c = None if sbias is None else sbias[cols]
                return _with_threads(1, lambda: _tile(a, sb[:, cols], bias_c, h))

            return run_cols

        if all(_split_ok(cols_runner(h), common[:h], n, split) for h in heights):
            n_split = split
            notes.append(f"tiles fewer than workers are split into {split} column blocks")
    return TileVerdict(
        dtype=str(dtype).removeprefix("torch."),
        k=b.shape[0],
        n=n,
        b_layout=layout,
        b_align=int(key[4]),  # type: ignore[call-overload]
        bias=bias is not None,
        threads=tuple(sorted(_THREAD_COUNTS)),
        pinned=pinned,
        heights=heights,
        reason="; ".join(notes),
        n_split=n_split,
    )


def _verify_in_child(b: torch.Tensor, bias: torch.Tensor | None, key: tuple[object, ...], layout: str) -> TileVerdict:
    """``_verify`` on a new thread of detkit's own. The verification runs BLAS on 2 and
    all-core OpenMP teams, and in a forked child the forking thread's team is stale
    (libgomp is not fork safe: the next parallel region there waited forever for threads
    that were not copied, even in a child that had set one thread); a new thread gets a
    new team."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="detkit-verify", initializer=set_inside,
                            initargs=(True,)) as one:
        return one.submit(_verify, b, bias, key, layout).result()


def verdict_for(b: torch.Tensor, bias: torch.Tensor | None) -> TileVerdict:
    """The (cached) verdict for multiplying by ``b`` with this bias on this machine."""
    layout, b = _layout(b)
    key = (b.dtype, b.shape[0], b.shape[1], layout, b.data_ptr() % 64, bias is not None)
    with _LOCK:
        v = _VERDICTS.get(key)
    if v is None:
        v = _verify_in_child(b, bias, key, layout) if _FORKED else _verify(b, bias, key, layout)
        with _LOCK:
            _VERDICTS[key] = v
        if not v.ok:
            warnings.warn(
                f"detkit: BLAS tiles are not batch invariant for {v.dtype} K={v.k} N={v.n} "
                f"(b layout {layout!r}): {v.reason}. Using the fixed-order kernel for this "
                "shape (slower); see detkit.kernels.cpu_status().",
                RuntimeWarning,
                stacklevel=4,
            )
    return v


def _own(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Marks the calling thread as detkit's own while ``fn`` runs. The tiles' BLAS calls
    (``torch.mm(..., out=)``) are building blocks: called directly (not from the mode's
    adapter) while the mode was on, they were routed back into detkit, once per tile (a
    second tiling inside the first, the verification's tiles retiled, and every call
    counted as a routed ``mm.out`` in the user's coverage)."""

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> torch.Tensor:
        with own_thread():
            return fn(*args, **kwargs)

    return run


@_own
def tiled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    fallback: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """(M, K) @ (K, N) (+ bias) with per-row bits independent of M; see the module doc."""
    fixed = os.environ.get(_ENV_FORCE, "") == "fixed-order" or _blas_skipped(b.dtype) is not None
    verdict = None if fixed else verdict_for(b, bias)
    if verdict is None or not verdict.ok:
        out = fallback(a.unsqueeze(0), b.unsqueeze(0))[0]
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.to(a.dtype)
    _, bl = _layout(b)
    return _run(a, bl, bias, verdict)


__all__ = ["TILE_HEIGHTS", "TileVerdict", "cpu_status", "tiled_matmul", "verdict_for"]
