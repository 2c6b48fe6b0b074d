"""detkit's real CUDA sources, run on the CPU through a host emulation (no GPU needed).

``tests/cuda_emu/emu.h`` maps the CUDA subset the kernels use (threads, shared memory,
barriers, shuffles, ballots, ldmatrix, cp.async, mma.m16n8k16, wgmma) onto the host (a
block's threads as fibers, under the sanitizers too); the ``.cu`` files are
compiled unchanged by g++ and launched through the CUDA backend's own Python launchers
(``detkit.kernels.cuda``) with CPU tensors; each launch calls the kernel from C++ with its
own parameter types (a table appended at build time). This checks, without a GPU:

* the portable kernels give exactly the bits of the specification (``spec.py``) and the
  CPU portable backend: float arithmetic on the host is IEEE binary32 like the GPU's;
* the host-side launch code (argument order and types, grids, strides, layouts): each
  kernel reads its arguments from the kernelParams buffer the launcher packed;
* the tensor-core GEMMs' fragment indexing, pipeline and bounds (mma and wgmma are
  emulated in float, so against a float64 reference with a tolerance, not bit for bit;
  wgmma through its descriptors and swizzle, completing at wait_group);
* batch invariance of every kernel over batch sizes and positions;
* a small GPT-2 under the torch mode, its ops routed from the front end to the CUDA backend;
* the host reads of tensor values the mode makes on that path (each one a wait for the GPU):
  only the documented ones;
* faults a GPU would punish: out-of-bounds accesses and undefined integer arithmetic
  (AddressSanitizer + UBSan), data races between threads (ThreadSanitizer), warp
  collectives with a lane gone, shared memory read before it is written.

It does not check GPU timing, memory-model or hardware rounding: tests/test_cuda_gpu.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_FAMILY_CONFIGS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detkit.errors import InputError, KernelLaunchError
from detkit.kernels import cuda as cuda_backend
from detkit.kernels import cuda_loader, spec

EMU_DIR = Path(__file__).parent / "cuda_emu"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(
    CXX is None, reason="no C++ compiler (g++) to build the host emulation of the CUDA kernels"
)

# DETKIT_EMU_SANITIZE=address builds the emulation with AddressSanitizer and UBSan: a
# kernel reading or writing outside a tensor, a shared array or the dynamic shared memory
# (an illegal-address fault on a GPU) or doing undefined integer arithmetic stops the
# process with a report. DETKIT_EMU_SANITIZE=thread builds it with ThreadSanitizer: two
# threads of a block touching the same memory without a barrier between them (a missing
# __syncthreads) is reported. The process must preload the runtime (_SanitizedRun).
SANITIZE = os.environ.get("DETKIT_EMU_SANITIZE", "")  # "", "address" or "thread"
# Every build runs a block's threads as fibers on one OS thread (the same order every run,
# and about 7x faster than OS threads here). The sanitizers are told of each switch
# (runtime.cpp): AddressSanitizer follows the stacks, and ThreadSanitizer sees a race by
# what orders two accesses (only the barriers do), not by when they ran. Line tables
# (-g1) are all a report's file:line needs, and build in two thirds of -g's time.
SANITIZER_FLAGS = {"": [],
                   "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                               "-fno-omit-frame-pointer", "-g1"],
                   "thread": ["-fsanitize=thread", "-fno-omit-frame-pointer", "-g1"]}


_ENTRY_RE = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(')
_SOURCE_MARK = "detkit_emu_kernel_source_starts_here"


# A static ``__shared__`` array declaration (not the ``extern`` dynamic one): the build appends
# emu_shared_register(name, sizeof(name)) to it, so that the runtime refills the array with
# 0xFF bytes at every block start, as a GPU gives a block uninitialised shared memory (a
# function-level static would otherwise carry zeros or the previous block's values).
_SHARED_DECL_RE = re.compile(r"^(\s*)__shared__\s+((?:__align__\(\d+\)\s+)?\w+\s+(\w+)\s*(?:\[[^\]\n]+\])+\s*;)",
                             re.MULTILINE)


def _register_static_shared(src: str) -> str:
    return _SHARED_DECL_RE.sub(r"\1__shared__ \2 emu_shared_register(\3, sizeof(\3));", src)


def _build(name: str, out_dir: Path, source: str | None = None, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The host build of kernel file ``name`` (or of ``source`` in its place), with the
    macros ``defines`` defined, cached by content."""
    src = _register_static_shared(cuda_loader.kernel_source(name) if source is None else source)
    emu = (EMU_DIR / "emu.h").read_text() + (EMU_DIR / "runtime.cpp").read_text()
    flags = [*SANITIZER_FLAGS[SANITIZE], *(f"-D{d}" for d in defines)]
    digest = hashlib.sha256((src + emu + " ".join(flags)).encode()).hexdigest()[:16]
    stem = f"{Path(name).stem}-{digest}{'-' + SANITIZE if SANITIZE else ''}"
    so = out_dir / f"{stem}.so"
    if not so.exists():
        # built under this thread's own names, then renamed: other processes (the sanitized
        # runs) may build the same file at the same time
        part = f"{stem}.{os.getpid()}-{threading.get_ident()}"
        cpp = out_dir / f"{part}.cpp"
        # The kernels (macros expanded; after the marker, so not the C++ library's) get a
        # table that calls each with its parameter types.
        cpp.write_text(f"{_SOURCE_MARK}\n{src}")
        common = [CXX, "-std=c++17", "-Wno-unknown-pragmas", *flags, "-include", str(EMU_DIR / "emu.h")]
        pre = subprocess.run([*common, "-E", "-P", str(cpp)], capture_output=True, text=True, check=False)
        assert pre.returncode == 0, f"host build of {name} failed:\n{pre.stderr[-4000:]}"
        entries = sorted(set(_ENTRY_RE.findall(pre.stdout.split(_SOURCE_MARK, 1)[1])))
        cpp.write_text(f"{src}\nEMU_ENTRIES({' '.join(f'EMU_ENTRY({e})' for e in entries)})\n")
        cmd = [*common, "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread",
               str(cpp), str(EMU_DIR / "runtime.cpp"), "-o", str(out_dir / f"{part}.so")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"host build of {name} failed:\n{proc.stderr[-4000:]}"
        os.replace(cpp, out_dir / f"{stem}.cpp")
        os.replace(out_dir / f"{part}.so", so)
    lib = ctypes.CDLL(str(so))
    lib.emu_launch_entry.restype = ctypes.c_char_p
    lib.emu_launch_entry.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     *[ctypes.c_uint] * 5]
    return lib


def _out_dir() -> Path:
    out_dir = Path(tempfile.gettempdir()) / "detkit-cuda-emu"
    out_dir.mkdir(exist_ok=True)
    return out_dir


class _Libs(dict[str, ctypes.CDLL]):
    """Host builds by kernel file, built at first use when not built yet."""

    def __missing__(self, name: str) -> ctypes.CDLL:
        self[name] = _build(name, _out_dir())
        return self[name]


def _driver(libs: dict[str, ctypes.CDLL]) -> Callable[..., None]:
    """A stand-in for cuLaunchKernel (``detkit.kernels.cuda._driver_launch``) that runs the
    host builds ``libs``: each kernel reads its parameters from the kernelParams array the
    launcher packed, as on a GPU."""

    def launch(index: int, kernel: cuda_backend._Kernel, grid: tuple[int, int, int], block: int, shared_mem: int,
               stream: int, params: int, sizes: tuple[int, ...]) -> None:
        entry = kernel.entry
        assert 0 <= shared_mem <= 227 * 1024, (entry, shared_mem)  # what an sm_90 block may have
        # A GPU refuses these launches; the emulation would run them.
        assert 0 < grid[0] < 2**31 and 0 < grid[1] <= 65535 and 0 < grid[2] <= 65535, (entry, grid)
        assert 0 < block <= 1024 and block % 32 == 0, (entry, block)
        lib = libs[kernel.module]
        c_sizes = (ctypes.c_uint * max(1, len(sizes)))(*sizes)
        error = lib.emu_launch_entry(entry.encode(), len(sizes), params, c_sizes, *grid, block, shared_mem).decode()
        assert not error, f"{entry} (grid {grid}, {block} threads): {error}; on a GPU this is undefined behaviour"

    return launch


def _launcher(libs: dict[str, ctypes.CDLL]) -> Callable[..., None]:
    """A launch by hand (tests of the emulation itself): the backend's packing of the
    arguments, then the host build ``libs`` in the driver's place."""
    driver = _driver(libs)

    def launch(dev: torch.device, module: str, entry: str, grid: tuple[int, int, int], block: int, sig: str,
               args: tuple[Any, ...], shared_mem: int = 0) -> None:
        params, sizes = cuda_backend._kernel_params(sig, args)
        driver(0, cuda_backend._Kernel(0, module, entry), grid, block, shared_mem, 0, params, sizes)

    return launch


def _source_launcher(name: str, source: str, defines: tuple[str, ...] = ()) -> Callable[..., None]:
    """_launcher of a test's own kernel source, built as file ``name`` (with ``defines``)."""
    return _launcher({name: _build(name, _out_dir(), source, defines)})


@pytest.fixture(scope="module")
def emulated(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[dict[str, ctypes.CDLL]]:
    """Build the kernel files for the host and route the CUDA backend's launches (with
    CPU tensors) to them: the backend's own launcher packs the arguments, the host build
    stands in for the driver. DETKIT_EMU_PREBUILD=0 builds each file at its first launch
    instead of all of them up front (for runs that need one)."""
    libs = _Libs()
    if os.environ.get("DETKIT_EMU_PREBUILD") != "0":
        with ThreadPoolExecutor(max_workers=3) as pool:
            libs.update(zip(cuda_loader.KERNEL_FILES,
                            pool.map(lambda n: _build(n, _out_dir()), cuda_loader.KERNEL_FILES), strict=True))
    mp = monkeypatch_module
    mp.setattr(cuda_backend, "_driver_launch", _driver(libs))
    mp.setattr(cuda_backend, "_functions", {})
    mp.setattr(cuda_backend, "_load_function",
               lambda index, module, entry, shared_mem: cuda_backend._Kernel(0, module, entry))
    mp.setattr(cuda_backend, "_stream_ptr", lambda index: 0)
    mp.setattr(cuda_backend, "_device_index", lambda dev: 0)
    mp.setattr(cuda_backend, "_device_of", lambda *ts: next(t.device for t in ts if t is not None))
    mp.setattr(cuda_backend, "_major", lambda dev: 9)
    mp.setattr(cuda_backend, "_smem_optin", lambda dev: 227 * 1024)  # as an H100
    yield libs


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaNs and signed zeros compare exactly."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    return t.contiguous().view(view)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    g, w = bits(got), bits(want)
    bad = (g != w).nonzero()
    assert bad.numel() == 0, (
        f"{what}: {bad.shape[0]} of {g.numel()} elements differ; first at {bad[0].tolist()}: "
        f"got {got[tuple(bad[0])].item()!r} want {want[tuple(bad[0])].item()!r}"
    )


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def adversarial_rows(dtype: torch.dtype, length: int) -> torch.Tensor:
    """Rows with leading zeros, -0, -inf, a NaN, huge and subnormal values, cancellation."""
    rows = rand((6, length), torch.float32, 7)
    rows[0, : length // 2] = 0.0
    rows[0, 1 % length] = -0.0
    rows[1, ::3] = float("-inf")
    rows[2, length // 2] = float("nan")
    rows[3] = rows[3] * 1e30 if dtype == torch.float32 else rows[3] * 3e4
    rows[4] = rows[4] * (1e-40 if dtype == torch.float32 else 1e-6)
    rows[5, 0::2], rows[5, 1::2] = 1000.0, -1000.0
    return rows.to(dtype)


# ----------------------------------------------------------------------------- portable: spec bits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 7, 33, 517])
def test_portable_row_ops_equal_spec(emulated: dict, dtype: torch.dtype, length: int) -> None:
    x = torch.cat([rand((3, length), dtype, length), adversarial_rows(dtype, length)])
    w = rand((length,), dtype, 11)
    b = rand((length,), dtype, 12)
    for log in (False, True):
        assert_bits_equal(cuda_backend.softmax(x, log, portable=True), spec.softmax(x, log), f"softmax log={log}")
    for mean in (False, True):
        assert_bits_equal(cuda_backend.row_sum(x, mean, portable=True), spec.row_sum(x, mean), f"row_sum mean={mean}")
    for wt in (None, w):
        assert_bits_equal(cuda_backend.rms_norm(x, wt, 1e-6, portable=True), spec.rms_norm(x, wt, 1e-6), "rms_norm")
    for wt, bb in ((None, None), (w, b), (w, None), (None, b)):
        assert_bits_equal(cuda_backend.layer_norm(x, wt, bb, 1e-5, portable=True),
                          spec.layer_norm(x, wt, bb, 1e-5), "layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portable", [False, True])
def test_row_cumsum_equals_spec_and_is_batch_and_padding_invariant(emulated: dict, dtype: torch.dtype,
                                                                   portable: bool) -> None:
    """One lane per row, rows moved through shared memory in 32 x 32 tiles: rows past 32
    (a second warp) and past 128 (a second block), lengths that end inside a tile, NaN,
    inf and signed zeros, and zeros in front of a row (left padding)."""
    for rows, length in ((1, 1), (3, 33), (37, 70), (130, 5)):
        x = torch.cat([rand((rows, length), dtype, rows + length, 3.0), adversarial_rows(dtype, length)])
        what = f"cumsum {tuple(x.shape)}"
        got = cuda_backend.row_cumsum(x, portable=portable)
        assert_bits_equal(got, spec.row_cumsum(x), what)
        for start, stop in ((0, 1), (1, 4), (x.shape[0] - 2, x.shape[0])):
            assert_bits_equal(cuda_backend.row_cumsum(x[start:stop].clone(), portable=portable), got[start:stop],
                              f"{what} rows {start}:{stop}")
        zeros = torch.zeros((x.shape[0], 35), dtype=dtype)
        zeros[:, ::2] = -0.0
        padded = cuda_backend.row_cumsum(torch.cat([zeros, x], 1), portable=portable)
        assert_bits_equal(padded[:, 35:], got, f"{what}, 35 zeros in front")


def _triangular_system(dtype: torch.dtype, batch: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A well-conditioned lower system (Qwen3-Next's UT system is unit lower triangular),
    with junk above the diagonal that a solve must not read."""
    a = rand((batch, n, n), torch.float32, seed, 0.3)
    a.diagonal(dim1=-2, dim2=-1).add_(2.0)
    a = a + torch.triu(torch.full((n, n), float("nan")), 1)
    return a.to(dtype), rand((batch, n, k), dtype, seed + 1, 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portable", [False, True])
def test_triangular_solve_equals_spec_and_is_batch_invariant(emulated: dict, dtype: torch.dtype,
                                                             portable: bool) -> None:
    """One thread per column: right-hand sides past one block of 128 columns, one batch
    entry or several, unit and non-unit diagonals, a zero pivot (inf/NaN as IEEE) and NaN
    above the diagonal, which must not be read."""
    for batch, n, k in ((1, 1, 1), (3, 9, 5), (2, 17, 130)):
        a, b = _triangular_system(dtype, batch, n, k, n + k)
        for unit in (False, True):
            what = f"solve {dtype} {batch}x{n}x{k} unit={unit}"
            got = cuda_backend.solve_lower(a, b, unit, portable=portable)
            assert_bits_equal(got, spec.solve_lower(a, b, unit), what)
            assert_bits_equal(cuda_backend.solve_lower(a[-1:].clone(), b[-1:].clone(), unit, portable=portable),
                              got[-1:], f"{what}, last entry alone")
            assert_bits_equal(cuda_backend.solve_lower(a, b[..., :1].clone(), unit, portable=portable),
                              got[..., :1], f"{what}, first column alone")
    a, b = _triangular_system(dtype, 1, 4, 3, 9)
    a[0, 2, 2] = 0.0
    got = cuda_backend.solve_lower(a, b, False, portable=portable)
    assert_bits_equal(got, spec.solve_lower(a, b, False), "zero pivot")
    assert bool(torch.isinf(got[0, 2]).all()) and not bool(torch.isfinite(got[0, 3]).any())


def test_elementwise_ops_track_the_cpu_backend() -> None:
    """A new op in the canonical orders must reach the CUDA backend too."""
    from detkit.kernels import portable_cpu

    assert cuda_backend.ELEMENTWISE_OPS == portable_cpu.ELEMENTWISE_OPS


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_elementwise_equals_spec(emulated: dict, dtype: torch.dtype) -> None:
    x = torch.cat([rand((200,), torch.float32, 3, 30.0),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40,
                                 88.7, 89.5, -103.9, -110.0, 1.0, 2.0, 0.5, -0.5, 0.49, -0.49, 9.0,
                                 0.99999994, 1.0, -1.25, 3.8749998, 3.875, -3.875, 1e30, -1e30,
                                 2.0**-12, -0.7853982, 12345.678, 3.0e38,
                                 -1.0, -0.99999994, 2.0**-24, -(2.0**-25), 4095.0,  # log1p's edges
                                 # within ~2^-30 of a multiple of pi/2: the hardest reductions
                                 252.89821, *torch.tensor([0x6F79BE45, 0x50A3E87F, 0x6279BE45],
                                                         dtype=torch.int32).view(torch.float32).tolist()])]).to(dtype)
    for name in cuda_backend.ELEMENTWISE_OPS:
        assert_bits_equal(cuda_backend.elementwise(name, x), spec.elementwise(name, x), name)


# Pow (section 2.9): bases and exponents of C99's special cases and of the evaluation's
# edges: signed zeros, infinities, NaN, +-1, negative bases with odd, even and non-integer
# exponents, subnormal bases (float32; bfloat16 keeps some), bases at the split's sqrt(2)
# boundary and next to 1, results that overflow or underflow (in fp32, or only in the
# 16-bit output step), y == 2 (fp32's x * x), exponents past 2^24 and 2^53.
_INF, _NAN = float("inf"), float("nan")
POW_BASES = (0.0, -0.0, _INF, -_INF, _NAN, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 10.0, -10.0, 300.0, -300.0,
             1e-40, -1e-40, 3e-39, 1e-45, 6e-8, -1e-7, 1.4142135, 1.4142137, 0.70710677, 0.99999994, 1.0000001,
             -0.99999994, 65504.0, 1e30, -1e30, 3.0e38, 2.0**-126, 7.25)
POW_EXPONENTS = (0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 0.5, -0.5, 2.5, -2.5, 1 / 3, 4.0, 7.0, -7.0, 50.0,
                 -50.0, 127.0, -149.0, 1000.0, -1001.0, 1e10, -1e10, 16777215.0, 16777216.0, 3e38, _INF, -_INF,
                 _NAN, 0.1)
# Scalar exponents are binary64 as given: values no fp32 holds, odd and even integers
# around 2^53, the smallest subnormal, huge ones.
POW_SCALARS = (2.0, 3.0, -3.0, 0.5, 1 / 3, 0.1, -1.5, 2.0**52 + 1, 2.0**53 - 1, 2.0**53, 2.0**53 + 2, 1e300,
               -1e300, 5e-324, 0.0, -0.0, _INF, -_INF, _NAN, 1.0000000000000002)


def pow_operands(dtype: torch.dtype, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of ``dtype``: every base against every exponent above, then ``n`` random
    pairs (wide magnitudes; negative bases with integer exponents; bases near 1 with
    large exponents)."""
    xs, ys = torch.meshgrid(torch.tensor(POW_BASES), torch.tensor(POW_EXPONENTS), indexing="ij")
    g = torch.Generator().manual_seed(seed)
    k = n // 3
    wide = torch.randn(k, generator=g) * torch.exp2(torch.randint(-40, 41, (k,), generator=g).float())
    wide_y = torch.randn(k, generator=g) * 6.0
    ints = torch.randn(k, generator=g) * 4.0
    ints_y = (torch.randn(k, generator=g) * 12.0).round()
    near = 1.0 + torch.randn(n - 2 * k, generator=g) * 1e-3
    near_y = torch.randn(n - 2 * k, generator=g) * 2e4
    x = torch.cat([xs.flatten(), wide, ints, near])
    y = torch.cat([ys.flatten(), wide_y, ints_y, near_y])
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_pow_equals_spec(emulated: dict, dtype: torch.dtype) -> None:
    """pow_p_*: the bits of spec.pow, with a tensor exponent (one per element, widened
    exactly) and with every scalar exponent of POW_SCALARS (binary64, as given)."""
    x, y = pow_operands(dtype, 5, 3000)
    assert_bits_equal(cuda_backend.pow(x, y), spec.pow(x, y), f"pow {dtype}, tensor exponent")
    # a 2-D strided view of both operands: the launcher makes them contiguous
    x2, y2 = x[: 34 * 30].reshape(34, 30).t(), y[: 34 * 30].reshape(34, 30).t()
    assert_bits_equal(cuda_backend.pow(x2, y2), spec.pow(x2, y2), f"pow {dtype}, transposed operands")
    xs = torch.cat([torch.tensor(POW_BASES).to(dtype), x[-300:]])
    for s in POW_SCALARS:
        assert_bits_equal(cuda_backend.pow(xs, s), spec.pow(xs, s), f"pow {dtype}, scalar exponent {s!r}")
    assert cuda_backend.pow(x[:0], y[:0]).shape == (0,)


def test_portable_pow_special_values(emulated: dict) -> None:
    """A few results written out (C99's pow), so that kernel and spec are not only
    checked against each other."""
    inf, nan = _INF, _NAN
    cases = [((-0.0, -3.0), -inf), ((-0.0, -2.0), inf), ((-0.0, 3.0), -0.0), ((-0.0, 0.5), 0.0), ((0.0, -1.0), inf),
             ((-inf, 3.0), -inf), ((-inf, -3.0), -0.0), ((-inf, 2.5), inf), ((inf, -0.5), 0.0),
             ((-1.0, inf), 1.0), ((-1.0, -inf), 1.0), ((0.5, inf), 0.0), ((0.5, -inf), inf), ((2.0, -inf), 0.0),
             ((nan, 0.0), 1.0), ((1.0, nan), 1.0), ((nan, 1.0), nan), ((-8.0, 1 / 3), nan), ((-2.0, 3.0), -8.0),
             ((-2.0, 2.0), 4.0), ((-2.0, -2.0), 0.25), ((2.0, 10.0), 1024.0), ((2.0, -149.0), 2.0**-149),
             ((10.0, 50.0), inf), ((10.0, -50.0), 0.0), ((-10.0, 51.0), -inf), ((9.0, 0.5), 3.0),
             # correctly rounded next to a midpoint (1 + 2^-24 + 2^-48 + ...; 1 - 2^-25 - ...)
             ((0.99999994, -1.0), 1.0000001192092896), ((0.99999994, 0.5), 0.99999994)]
    x = torch.tensor([c[0][0] for c in cases])
    y = torch.tensor([c[0][1] for c in cases])
    want = torch.tensor([c[1] for c in cases])
    for got in (cuda_backend.pow(x, y), spec.pow(x, y)):
        assert_bits_equal(got, want, "pow special values")
    assert_bits_equal(cuda_backend.pow(torch.tensor([-8.0, 8.0, -0.0]), 1 / 3),
                      torch.tensor([nan, 2.0, 0.0]), "pow scalar 1/3")


def test_portable_pow_refuses_a_mismatched_exponent(emulated: dict) -> None:
    x = torch.ones(4)
    with pytest.raises(InputError, match="x's dtype"):
        cuda_backend.pow(x, torch.ones(4, dtype=torch.float16))
    with pytest.raises(InputError, match="x's shape"):
        cuda_backend.pow(x, torch.ones(2, 2))
    with pytest.raises(InputError, match="x's shape"):
        cuda_backend.pow(x, torch.ones(()))  # no broadcasting: the front end expands first
    with pytest.raises(InputError, match="x's device"):
        cuda_backend.pow(x, torch.ones(4, device="meta"))
    with pytest.raises(InputError, match="tensor or a Python float"):
        cuda_backend.pow(x, "2")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="float32, bfloat16 or float16"):
        cuda_backend.pow(x.double(), 2.0)


_POW_FLOATS = st.one_of(st.floats(width=32), st.integers(-40, 40).map(float), st.floats(-30.0, 30.0, width=32))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(xs=st.lists(st.floats(width=32), min_size=1, max_size=48),
       ys=st.one_of(st.floats(), st.integers(-300, 300).map(float), st.lists(_POW_FLOATS, min_size=48, max_size=48)),
       dtype=st.sampled_from(DTYPES))
def test_portable_pow_for_drawn_operands(emulated: dict, xs: list[float], ys: float | list[float],
                                         dtype: torch.dtype) -> None:
    """Any fp32 bit pattern class (subnormals, NaN, infinities) against any binary64
    scalar exponent or any exponent tensor: spec's bits."""
    x = torch.tensor(xs, dtype=torch.float32).to(dtype)
    y = ys if isinstance(ys, float) else torch.tensor(ys[: len(xs)], dtype=torch.float32).to(dtype)
    assert_bits_equal(cuda_backend.pow(x, y), spec.pow(x, y), f"pow {dtype} y={ys!r}")


# Negative controls: the sign of 0^y for odd y taken from `X < 0` (false for -0.0, which
# gives +inf for pow(-0, -3) where C99 says -inf); the low part of ln 2 dropped from the
# reduction (up to about 289 * 2^-33 relative: last-bit changes where |y log x| is large).
_POW_MUTATIONS = {
    "sign of -0": ("return (odd && (__float_as_uint(x) >> 31)) ? -mag : mag;", "return (odd && X < 0.0) ? -mag : mag;"),
    "no LN2_LO": ("__dmul_rn(k, pow_f64(0x3DEA39EF35793C76ull))", "0.0"),
}


@pytest.mark.parametrize("mutation", sorted(_POW_MUTATIONS))
def test_mutation_pow_mistakes_change_the_bits(emulated: dict, monkeypatch: pytest.MonkeyPatch, mutation: str) -> None:
    source = _mutated("rowops.cu", cuda_loader.kernel_source("rowops.cu"), _POW_MUTATIONS[mutation])
    monkeypatch.setattr(cuda_backend, "_driver_launch", _driver({**emulated, "rowops.cu": _build("rowops.cu", _out_dir(),
                                                                                            source)}))
    x, y = pow_operands(torch.float32, 5, 600)
    with pytest.raises(AssertionError, match="elements differ"):
        assert_bits_equal(cuda_backend.pow(x, y), spec.pow(x, y), "pow, mutated kernel")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_layout", ["kmajor", "nmajor"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_portable_matmul_equals_spec(emulated: dict, dtype: torch.dtype, b_layout: str, with_bias: bool) -> None:
    m, k, n = 5, 37, 70  # K not a multiple of the 16-deep tile, N crosses a 64-wide tile
    a = rand((m, k), dtype, 1)
    a[1, :5] = 0.0
    a[2, 3] = float("nan")
    a[3] = a[3] * 1e-20 if dtype == torch.float32 else a[3]
    b = rand((n, k), dtype, 2).t() if b_layout == "kmajor" else rand((k, n), dtype, 2)
    bias = rand((n,), dtype, 3) if with_bias else None
    assert_bits_equal(cuda_backend.matmul(a, b, bias, portable=True), spec.matmul(a, b, bias), "matmul")


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_matmul_with_k_zero_gives_the_canonical_nan(emulated: dict, dtype: torch.dtype) -> None:
    """K = 0 is only the bias; a NaN in it comes out as the spec's canonical NaN, as from
    every other portable output (the backend called directly, not through the front end)."""
    bias = rand((6,), dtype, 9)
    raw = bias.view(torch.int32 if dtype == torch.float32 else torch.int16)
    raw[2] = 0x7FFFFFFF if dtype == torch.float32 else 0x7FFF  # a NaN with a payload
    a, b = torch.zeros((3, 0), dtype=dtype), torch.zeros((0, 6), dtype=dtype)
    assert_bits_equal(cuda_backend.matmul(a, b, bias, portable=True), spec.matmul(a, b, bias), "matmul K=0")


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_matmul_long_k_equals_spec(emulated: dict, dtype: torch.dtype) -> None:
    """K > 256: ChunkDot's 256-long fma chains and the chunk adds."""
    a = rand((3, 600), dtype, 7)
    b = rand((5, 600), dtype, 8).t()
    assert_bits_equal(cuda_backend.matmul(a, b, None, portable=True), spec.matmul(a, b, None), "matmul K=600")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_matmul_batched_equals_cpu_portable(emulated: dict, dtype: torch.dtype) -> None:
    from detkit.kernels import portable_cpu

    a = rand((3, 130, 40), dtype, 4)  # M crosses the 128-row tile
    b = rand((3, 40, 66), dtype, 5)
    bias = rand((66,), dtype, 6)
    assert_bits_equal(cuda_backend.matmul(a, b, bias, portable=True), portable_cpu.matmul(a, b, bias), "bmm")


def _attention_inputs(dtype: torch.dtype, lq: int, lk: int, seed: int) -> tuple[torch.Tensor, ...]:
    q = rand((2, 4, lq, 40), dtype, seed)
    k = rand((2, 2, lk, 40), dtype, seed + 1)  # GQA: 4 query heads on 2 kv heads
    v = rand((2, 2, lk, 36), dtype, seed + 2)
    return q, k, v


def _attention_mask(kind: str, lq: int, lk: int) -> torch.Tensor | None:
    if kind == "bool":
        mask = rand((2, 1, lq, lk), torch.float32, 9) > -0.3
        mask[0, 0, 1, :] = False  # a fully masked query: zeros
        return mask.expand(2, 4, lq, lk)  # zero strides, as the front end passes them
    if kind == "float":
        fmask = rand((2, 4, lq, lk), torch.float32, 9)
        fmask[1, :, :, :6] = float("-inf")  # left padding
        return fmask
    if kind == "causal":
        return torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq).expand(2, 4, lq, lk)
    return None


def _attention_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """float64 SDPA over kept keys; zeros for queries without one."""
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * float(torch.tensor(scale, dtype=torch.float32))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_attention_equals_spec(emulated: dict, dtype: torch.dtype, mask_kind: str) -> None:
    """The canonical kernel (portable=True, and portable=False with a float mask) gives
    the spec's bits."""
    q, k, v = _attention_inputs(dtype, 5, 37, 20)
    mask = _attention_mask(mask_kind, 5, 37)
    portables = (False, True) if mask_kind == "float" else (True,)
    for portable in portables:
        got = cuda_backend.attention(q, k, v, mask, 0.125, portable=portable)
        assert_bits_equal(got, spec.attention(q, k, v, mask, 0.125), f"attention mask={mask_kind}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_canonical_attention_head_dims_past_one_staged_block(emulated: dict, dtype: torch.dtype) -> None:
    """Head dims of 100: keys are staged 64 dims at a time, the fma chain runs on across blocks."""
    q, k, v = rand((1, 2, 3, 100), dtype, 22), rand((1, 1, 50, 100), dtype, 23), rand((1, 1, 50, 70), dtype, 24)
    mask = (rand((1, 1, 3, 50), torch.float32, 25) > -0.5).expand(1, 2, 3, 50)
    for m in (None, mask):
        got = cuda_backend.attention(q, k, v, m, 0.1, portable=True)
        assert_bits_equal(got, spec.attention(q, k, v, m, 0.1), f"head dim 100, mask={m is not None}")


@pytest.mark.parametrize(("mask_kind", "dtype"), [("none", torch.float32), ("bool", torch.bfloat16),
                                                   ("causal", torch.float16), ("causal", torch.bfloat16)])
def test_split_attention_values(emulated: dict, dtype: torch.dtype, mask_kind: str) -> None:
    """The split-KV kernel (portable=False, two splits of ATS_SPLIT keys) agrees with a
    float64 SDPA to float32 accuracy plus one rounding; fully masked queries are zeros."""
    lk = cuda_backend._ATT_SPLIT + 21
    q, k, v = _attention_inputs(dtype, 3, lk, 21)
    mask = _attention_mask(mask_kind, 3, lk)
    got = cuda_backend.attention(q, k, v, mask, 0.125, portable=False)
    want = _attention_f64(q, k, v, mask, 0.125)
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    err = (got.double() - want).abs()
    assert bool((err <= ulp * want.abs() + 1e-5).all()), f"max error {err.max().item()}"
    if mask_kind == "bool":
        assert bool((got[0, :, 1] == 0).all()), "a fully masked query must give zeros"


def _attention_launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...]]]:
    """The attention kernels launched from now on: (entry point, the launch's other arguments)."""
    launches: list[tuple[str, tuple[Any, ...]]] = []
    launch = cuda_backend._launch

    def recording(dev: Any, module: str, entry: str, *args: Any) -> None:
        if entry.startswith("attention_"):
            launches.append((entry, args))
        launch(dev, module, entry, *args)

    monkeypatch.setattr(cuda_backend, "_launch", recording)
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_attention_staged_rows_give_the_bits_of_rows_each_warp_reads(emulated: dict, dtype: torch.dtype,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A CTA whose warps share one K/V head stages the rows in shared memory; one whose
    warps straddle heads (3 queries per head, 4 warps per CTA, no GQA) has each warp read
    its own rows. Each head alone (one CTA, staged) gives the bits it gets in the straddling
    launch, with a causal mask, left padding (anchors past a split boundary) and 1 to 3
    splits; and the staging really is used (its dynamic shared memory is asked for)."""
    lk = 2 * cuda_backend._ATT_SPLIT + 9
    q, k, v = rand((2, 4, 3, 40), dtype, 61), rand((2, 4, lk, 40), dtype, 62), rand((2, 4, lk, 36), dtype, 63)
    mask = torch.ones(2, 4, 3, lk, dtype=torch.bool).tril(lk - 3)
    mask[1, :, :, :130] = False  # the second sequence left-padded by 130 keys
    launches = _attention_launches(monkeypatch)
    together = cuda_backend.attention(q, k, v, mask, 0.15)
    for b in range(2):
        for h in range(4):
            alone = cuda_backend.attention(q[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1],
                                           mask[b:b + 1, h:h + 1], 0.15)
            assert_bits_equal(together[b:b + 1, h:h + 1], alone, f"sequence {b}, head {h}: staged vs read per warp")
    stages = [args[-1] for entry, args in launches if entry.startswith("attention_split")]
    assert set(stages) == {32 * (40 + 36) * q.element_size()}, stages


@pytest.mark.parametrize("portable", [False, True])
def test_attention_nan_query_gives_nan_and_a_fully_masked_query_gives_zeros(emulated: dict, portable: bool) -> None:
    """The semantics the CPU kernels share (tests/test_kernels_cpu.py), over both KV splits."""
    lk = cuda_backend._ATT_SPLIT + 21
    q, k, v = _attention_inputs(torch.float32, 3, lk, 41)
    q[1, 2, 0, 5] = float("nan")
    mask = _attention_mask("bool", 3, lk)
    got = cuda_backend.attention(q, k, v, mask, 0.125, portable=portable)
    assert bool(got[1, 2, 0].isnan().all()), "the NaN query's row must be NaN"
    assert bool((got[0, :, 1] == 0).all()), "a fully masked query must give zeros"
    rest = torch.ones(got.shape[:3], dtype=torch.bool)
    rest[1, 2, 0] = False
    assert not bool(got[rest].isnan().any())


@pytest.mark.parametrize("portable", [False, True])
def test_attention_invariance(emulated: dict, portable: bool) -> None:
    """Decode (one query, no mask) equals prefill (causal) at positions on both sides of
    a split boundary; left padding that is not a multiple of the split size, the batch
    entry's position and (split KV) a chunked workspace change no bit."""
    dtype, split = torch.float32, cuda_backend._ATT_SPLIT  # float32: no rounding hides a change
    lk = split + 12
    q, k, v = _attention_inputs(dtype, lk, lk, 31)
    q, k, v = q[:1, :2, -6:], k[:1, :1], v[:1, :1]  # 2 heads on 1 kv head, the last 6 queries
    causal = torch.ones(lk, lk, dtype=torch.bool).tril()[-6:].expand(1, 2, 6, lk)
    prefill = cuda_backend.attention(q, k, v, causal, 0.15, portable=portable)
    for t in range(6):
        pos = lk - 6 + t
        decode = cuda_backend.attention(q[:, :, t : t + 1], k[:, :, : pos + 1], v[:, :, : pos + 1], None, 0.15,
                                        portable=portable)
        assert_bits_equal(decode, prefill[:, :, t : t + 1], f"decode at key {pos}")
    pad = 7
    kp = torch.cat([rand((1, 1, pad, 40), dtype, 99), k], dim=2)
    vp = torch.cat([rand((1, 1, pad, 36), dtype, 98), v], dim=2)
    padded_mask = torch.cat([torch.zeros(6, pad, dtype=torch.bool), causal[0, 0]], 1).expand(1, 2, 6, lk + pad)
    padded = cuda_backend.attention(q, kp, vp, padded_mask, 0.15, portable=portable)
    assert_bits_equal(padded, prefill, "left padding")
    other = rand(tuple(q.shape), dtype, 97)
    two = cuda_backend.attention(torch.cat([other, q]), torch.cat([k.flip(2), k]), torch.cat([v, v]),
                                 causal.expand(2, 2, 6, lk), 0.15, portable=portable)
    assert_bits_equal(two[1:], prefill, "second entry of a batch of two")
    if not portable:
        orig = cuda_backend._ATT_WORKSPACE_FLOATS
        try:
            cuda_backend._ATT_WORKSPACE_FLOATS = 3 * 2 * (36 + 2)  # 3 queries per chunk of 2 splits
            chunked = cuda_backend.attention(q, k, v, causal, 0.15)
        finally:
            cuda_backend._ATT_WORKSPACE_FLOATS = orig
        assert_bits_equal(chunked, prefill, "chunked workspace")


@pytest.mark.parametrize("portable", [False, True])
def test_attention_masked_keys_holding_inf_or_nan_change_nothing(emulated: dict, portable: bool) -> None:
    """As on the CPU (tests/test_kernels_cpu.py): a key the bool mask leaves out never
    enters, even when its k and v hold inf or NaN (a KV cache's unwritten slots), in both
    kernels and across the split-KV boundaries (left and right padding, a hole)."""
    lk = cuda_backend._ATT_SPLIT + 30
    q, k, v = _attention_inputs(torch.float32, 3, lk, 61)
    keep = torch.ones(lk, dtype=torch.bool)
    keep[:5], keep[-9:], keep[cuda_backend._ATT_SPLIT] = False, False, False
    mask = keep.expand(2, 4, 3, lk)
    want = cuda_backend.attention(q, k, v, mask, 0.125, portable=portable)
    for bad in (float("inf"), float("-inf"), float("nan")):
        kb, vb = k.clone(), v.clone()
        kb[:, :, ~keep], vb[:, :, ~keep] = bad, bad
        got = cuda_backend.attention(q, kb, vb, mask, 0.125, portable=portable)
        assert_bits_equal(got, want, f"masked keys = {bad}")


# The tensor-core kernel (bfloat16 / float16, head dims 64 and 128): blocks of 64 keys,
# splits of ATC_SPLIT keys, CTAs of 64 query rows of one (batch, K/V head).
_TC = (torch.bfloat16, torch.float16)


def _tc_inputs(dtype: torch.dtype, lq: int, lk: int, seed: int, heads: tuple[int, int] = (4, 2),
               d: int = 64) -> tuple[torch.Tensor, ...]:
    h, hk = heads
    return rand((2, h, lq, d), dtype, seed), rand((2, hk, lk, d), dtype, seed + 1), rand((2, hk, lk, d), dtype, seed + 2)


@pytest.mark.parametrize(("dtype", "mask_kind", "d"), [(torch.bfloat16, "none", 64), (torch.bfloat16, "bool", 64),
                                                       (torch.float16, "causal", 64), (torch.bfloat16, "causal", 128)])
def test_tensor_core_attention_values(emulated: dict, dtype: torch.dtype, mask_kind: str, d: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 / float16 with head dims 64 and 128 take the tensor-core kernel, over two
    splits (then the combine) and over one (the kernel writes the output); it agrees with
    a float64 SDPA to the accuracy of P rounded to the dtype (as in FlashAttention) plus
    one rounding of the output; fully masked queries give zeros."""
    launches = _attention_launches(monkeypatch)
    for lk, combined in ((cuda_backend._ATC_SPLIT + 21, True), (100, False)):
        launches.clear()
        q, k, v = _tc_inputs(dtype, 3, lk, 71, d=d)
        mask = _attention_mask(mask_kind, 3, lk)
        got = cuda_backend.attention(q, k, v, mask, 0.125)
        entries = [entry for entry, _ in launches]
        kernel = f"attention_tc_{'bf16' if dtype == torch.bfloat16 else 'f16'}_d{d}"
        assert kernel in entries and not any(e.startswith("attention_split") for e in entries), entries
        assert any(e.startswith("attention_combine") for e in entries) == combined, entries
        want = _attention_f64(q, k, v, mask, 0.125)
        ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        # P's rounding moves each weight by at most half an ulp of itself: the output by at
        # most ulp/2 * max|v| (twice that for the normaliser), then one rounding of the output.
        err = (got.double() - want).abs()
        bound = ulp * want.abs() + 1.5 * ulp * v.double().abs().amax()
        assert bool((err <= bound).all()), f"Lk={lk}: max error {err.max().item()}, bound {bound.min().item()}"
        assert float(err.mean()) > 0.0, "exactly float64's values: the check cannot see a wrong weight"
        if mask_kind == "bool":
            assert bool((got[0, :, 1] == 0).all()), f"Lk={lk}: a fully masked query must give zeros"


def test_tensor_core_attention_invariance(emulated: dict) -> None:
    """Decode (one query, no mask) equals prefill (causal) at positions on both sides of a
    64-key block boundary and of a split boundary; left padding that is not a multiple of
    64, the batch entry, a GQA group's heads packed in one tile vs one head alone, a
    chunked workspace and unaligned tensors (element-wise loads) change no bit."""
    dtype, split = torch.bfloat16, cuda_backend._ATC_SPLIT
    lk = split + 70
    q, k, v = _tc_inputs(dtype, lk, lk, 81)
    q, k, v = q[:1, :2], k[:1, :1], v[:1, :1]  # 2 heads on 1 kv head
    pos = (0, 1, 62, 63, 64, 65, split - 1, split, split + 1, lk - 1)
    causal = torch.ones(lk, lk, dtype=torch.bool).tril().expand(1, 2, lk, lk)
    prefill = cuda_backend.attention(q, k, v, causal, 0.15)
    for p in pos:
        decode = cuda_backend.attention(q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], None, 0.15)
        assert_bits_equal(decode, prefill[:, :, p : p + 1], f"decode at key {p}")
        alone = cuda_backend.attention(q[:, 1:, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], None, 0.15)
        assert_bits_equal(alone, prefill[:, 1:, p : p + 1], f"head 1 alone at key {p}")
    last = q[:, :, -6:]
    for pad in (7, 64 + 5):
        kp = torch.cat([rand((1, 1, pad, 64), dtype, 90 + pad), k], dim=2)
        vp = torch.cat([rand((1, 1, pad, 64), dtype, 91 + pad), v], dim=2)
        keep = torch.cat([torch.zeros(6, pad, dtype=torch.bool), causal[0, 0, -6:]], 1).expand(1, 2, 6, lk + pad)
        assert_bits_equal(cuda_backend.attention(last, kp, vp, keep, 0.15), prefill[:, :, -6:], f"left padding {pad}")
    other = rand(tuple(last.shape), dtype, 97)
    two = cuda_backend.attention(torch.cat([other, last]), torch.cat([k.flip(2), k]), torch.cat([v, v]),
                                 causal[:, :, -6:].expand(2, 2, 6, lk), 0.15)
    assert_bits_equal(two[1:], prefill[:, :, -6:], "second entry of a batch of two")
    orig = cuda_backend._ATT_WORKSPACE_FLOATS
    try:
        cuda_backend._ATT_WORKSPACE_FLOATS = 1  # one group per chunk
        chunked = cuda_backend.attention(torch.cat([other, last]), torch.cat([k.flip(2), k]), torch.cat([v, v]),
                                         causal[:, :, -6:].expand(2, 2, 6, lk), 0.15)
    finally:
        cuda_backend._ATT_WORKSPACE_FLOATS = orig
    assert_bits_equal(chunked, two, "chunked workspace")

    def unaligned(t: torch.Tensor) -> torch.Tensor:  # same values, one element past a 16-byte boundary
        return torch.cat([t.reshape(-1)[:1], t.reshape(-1)])[1:].view(t.shape)

    moved = cuda_backend.attention(unaligned(last), unaligned(k), unaligned(v), causal[:, :, -6:], 0.15)
    assert_bits_equal(moved, prefill[:, :, -6:], "unaligned tensors")


def test_tensor_core_attention_rows_with_other_anchors_in_the_tile(emulated: dict) -> None:
    """A sliding window gives every row of a tile its own anchor: each row gets the bits it
    gets alone (decode against its window), however many anchors share its tile."""
    dtype, lk, window = torch.float16, 150, 70
    q, k, v = _tc_inputs(dtype, lk, lk, 83, heads=(2, 1))
    q, k, v = q[:1], k[:1], v[:1]
    i, j = torch.arange(lk)[:, None], torch.arange(lk)[None, :]
    slide = ((j <= i) & (j > i - window)).expand(1, 2, lk, lk)
    full = cuda_backend.attention(q, k, v, slide, 0.2)
    for p in (0, 69, 70, 71, 100, 149):
        lo = max(0, p - window + 1)
        alone = cuda_backend.attention(q[:, :, p : p + 1], k[:, :, lo : p + 1], v[:, :, lo : p + 1], None, 0.2)
        assert_bits_equal(alone, full[:, :, p : p + 1], f"row {p} with window [{lo}, {p}]")


@pytest.mark.parametrize("dtype", _TC)
def test_tensor_core_attention_masked_keys_holding_inf_or_nan_change_nothing(emulated: dict,
                                                                             dtype: torch.dtype) -> None:
    """Keys that no query keeps (padding on both sides, a hole, an unwritten cache) are
    never read: inf and NaN there change no bit."""
    lk = cuda_backend._ATC_SPLIT + 30
    q, k, v = _tc_inputs(dtype, 3, lk, 85)
    keep = torch.ones(lk, dtype=torch.bool)
    keep[:5], keep[-9:], keep[cuda_backend._ATC_SPLIT] = False, False, False
    mask = keep.expand(2, 4, 3, lk)
    want = cuda_backend.attention(q, k, v, mask, 0.125)
    for bad in (float("inf"), float("-inf"), float("nan")):
        kb, vb = k.clone(), v.clone()
        kb[:, :, ~keep], vb[:, :, ~keep] = bad, bad
        assert_bits_equal(cuda_backend.attention(q, kb, vb, mask, 0.125), want, f"masked keys = {bad}")
    q[1, 2, 0, 5] = float("nan")
    got = cuda_backend.attention(q, k, v, mask, 0.125)
    assert bool(got[1, 2, 0].isnan().all()), "the NaN query's row must be NaN"
    rest = torch.ones(got.shape[:3], dtype=torch.bool)
    rest[1, 2, 0] = False
    assert_bits_equal(got[rest], want[rest], "the other queries, beside a NaN query")


# ----------------------------------------------------------------------------- batch invariance


def _check_rows_invariant(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, what: str) -> None:
    """Slices keep each row's address (and alignment); a copy moves it to a fresh,
    16-byte aligned allocation. Both must give the rows' bits in the full batch."""
    full = f(x)
    for start, stop in ((0, 1), (4, 5), (1, 4), (3, 5)):
        assert_bits_equal(f(x[start:stop]), full[start:stop], f"{what} rows {start}:{stop}")
        assert_bits_equal(f(x[start:stop].clone()), full[start:stop], f"{what} rows {start}:{stop}, moved")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portable", [False, True])
def test_row_ops_batch_invariant(emulated: dict, dtype: torch.dtype, portable: bool) -> None:
    length = 301  # L * sizeof(T) is not a multiple of 16: rows alternate 16-byte alignment
    x = rand((5, length), dtype, 40)
    w, b = rand((length,), dtype, 41), rand((length,), dtype, 42)
    _check_rows_invariant(lambda t: cuda_backend.softmax(t, False, portable=portable), x, "softmax")
    _check_rows_invariant(lambda t: cuda_backend.softmax(t, True, portable=portable), x, "log_softmax")
    _check_rows_invariant(lambda t: cuda_backend.rms_norm(t, w, 1e-6, portable=portable), x, "rms_norm")
    _check_rows_invariant(lambda t: cuda_backend.layer_norm(t, w, b, 1e-5, portable=portable), x, "layer_norm")
    _check_rows_invariant(lambda t: cuda_backend.row_sum(t, True, portable=portable), x, "mean")
    # weights at an odd address: the element-wise weight path
    w_odd, b_odd = torch.cat([w[:1], w])[1:], torch.cat([b[:1], b])[1:]
    assert_bits_equal(cuda_backend.layer_norm(x, w_odd, b_odd, 1e-5, portable=portable),
                      cuda_backend.layer_norm(x, w, b, 1e-5, portable=portable), "layer_norm, unaligned weights")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [7, 2048 + 13])
def test_batch_invariant_row_ops_values(emulated: dict, dtype: torch.dtype, length: int) -> None:
    """portable=False row ops against float64: float32 accumulation, one rounding."""
    x = rand((3, length), dtype, 43, 3.0)
    w, b = rand((length,), dtype, 44), rand((length,), dtype, 45)
    xd, wd, bd = x.double(), w.double(), b.double()
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    F = torch.nn.functional

    def close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float, abs_: float) -> None:
        err = (got.double() - want).abs()
        assert bool((err <= rel * want.abs() + abs_).all()), f"{what}: max error {err.max().item()}"

    close(cuda_backend.softmax(x, False), torch.softmax(xd, -1), "softmax", 2 * ulp + 1e-5, 1e-7)
    close(cuda_backend.softmax(x, True), torch.log_softmax(xd, -1), "log_softmax", 2 * ulp, 1e-5)
    close(cuda_backend.rms_norm(x, w, 1e-6), F.rms_norm(xd, (length,), wd, 1e-6), "rms_norm", 2 * ulp + 1e-5, 1e-6)
    close(cuda_backend.layer_norm(x, w, b, 1e-5), F.layer_norm(xd, (length,), wd, bd, 1e-5), "layer_norm",
          2 * ulp + 1e-5, 1e-4)
    close(cuda_backend.row_sum(x, True), xd.mean(-1), "mean", 2 * ulp, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_row_ops_put_nan_inf_and_signed_zeros_where_the_cpu_kernels_do(
    emulated: dict, dtype: torch.dtype
) -> None:
    """portable=False promises no bits across devices, but a model under the mode must not
    turn NaN or infinite on one device only: on rows with NaN, +-Inf, all -inf, all -0.0,
    huge and subnormal values, each row op's NaNs, infinities and the signs of its zeros
    fall where the CPU backend's (detkit.kernels.cpu) do."""
    from detkit.kernels import cpu

    length = 300
    extra = torch.zeros((4, length))
    extra[0, 0], extra[1], extra[2, :2], extra[3] = float("inf"), float("-inf"), torch.tensor([float("inf"), -1e30]), -0.0
    x = torch.cat([adversarial_rows(dtype, length), extra.to(dtype)])
    w, b = rand((length,), dtype, 1), rand((length,), dtype, 2)
    for name, op in (("softmax", lambda m, t: m.softmax(t, False)), ("log_softmax", lambda m, t: m.softmax(t, True)),
                     ("rms_norm", lambda m, t: m.rms_norm(t, w, 1e-6)),
                     ("layer_norm", lambda m, t: m.layer_norm(t, w, b, 1e-5)),
                     ("sum", lambda m, t: m.row_sum(t, False)), ("mean", lambda m, t: m.row_sum(t, True))):
        got, want = op(cuda_backend, x), op(cpu, x)
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN elsewhere than on the CPU"
        assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()]), name
        zeros = (got == 0) & (want == 0)
        assert torch.equal(got[zeros].signbit(), want[zeros].signbit()), f"{name}: signs of zeros"


def _masked(shape: tuple[int, int], dtype: torch.dtype, fill: str, seed: int) -> torch.Tensor:
    """Logits that left or right padding puts into a row: their exp is exactly 0."""
    if fill == "-inf":
        return torch.full(shape, float("-inf"), dtype=dtype)
    if fill == "finfo.min":  # what HF's eager attention mask adds
        return (rand(shape, torch.float32, seed) + torch.finfo(dtype).min).to(dtype)
    return (rand(shape, torch.float32, seed) - 300.0).to(dtype)  # far below the row max


def _padded_softmax_is_the_rows_softmax(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                                        portable: bool, what: str) -> None:
    pad = left.shape[1]
    padded = torch.cat([left, x, right], 1)
    for log in (False, True):
        got = cuda_backend.softmax(padded, log, portable=portable)
        assert_bits_equal(got[:, pad : pad + x.shape[1]], cuda_backend.softmax(x, log, portable=portable),
                          f"{'log_' if log else ''}softmax, {what}")
        if not log:
            assert bool((got[:, :pad] == 0).all()) and bool((got[:, pad + x.shape[1] :] == 0).all()), what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portable", [False, True])
def test_softmax_and_sum_ignore_what_padding_puts_around_a_row(emulated: dict, dtype: torch.dtype,
                                                               portable: bool) -> None:
    """Masked logits (exp == 0) before or after a row, and zeros (-0.0 too) before a sum:
    the row keeps its bits, as on the CPU and in the canonical AnchoredSum. So eager
    attention's softmax over padding keys needs no pass (no host synchronisation) in the mode."""
    length = 301
    x = rand((3, length), dtype, 46, 3.0)
    # pads of 1 and 7 move the 16-byte alignment of the row's first real element; 2051
    # spans more than one sweep of a 256-thread block over 16-byte slots
    for pad in (1, 7, 2051):
        for fill in ("-inf", "finfo.min", "far below"):
            _padded_softmax_is_the_rows_softmax(x, _masked((3, pad), dtype, fill, pad), _masked((3, 5), dtype, fill, 1),
                                                portable, f"{pad} x {fill} in front")
        zeros = torch.zeros((3, pad), dtype=dtype)
        zeros[:, ::2] = -0.0
        assert_bits_equal(cuda_backend.row_sum(torch.cat([zeros, x], 1), False, portable=portable),
                          cuda_backend.row_sum(x, False, portable=portable), f"sum, {pad} zeros in front")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_matmul_indexing(emulated: dict, dtype: torch.dtype) -> None:
    """Emulated mma: right values (vs float64), identical bits for both B layouts and for
    the cp.async and element-wise load paths, and rows independent of M."""
    m, k, n = 131, 72, 72
    a = rand((m, k), dtype, 50)
    w = rand((n, k), dtype, 51)
    bias = rand((n,), dtype, 52)
    ref = (a.double() @ w.double().t() + bias.double())
    got_k = cuda_backend.matmul(a, w.t(), bias)                # k-contiguous B, aligned: cp.async
    got_n = cuda_backend.matmul(a, w.t().contiguous(), bias)   # n-contiguous B, ldmatrix.trans
    err = (got_k.double() - ref).abs()
    tol = 2.0 * ref.abs() * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11) + 1e-3
    assert bool((err <= tol).all()), f"max error {err.max().item()} exceeds the tolerance"
    assert_bits_equal(got_n, got_k, "B layout")
    # Unaligned rows (K = 71 via a view) take the element-wise load path: same values as
    # a contiguous copy, which is aligned only when K % 8 == 0 - here neither is, so
    # compare against a zero-padded K = 72 product instead (padding adds exact zeros).
    a71, w71 = a[:, :71], w[:, :71]
    got71 = cuda_backend.matmul(a71, w71.t(), bias)
    ref71 = cuda_backend.matmul(torch.nn.functional.pad(a71, (0, 1)), torch.nn.functional.pad(w71, (0, 1)).t(), bias)
    assert_bits_equal(got71, ref71, "element-wise vs cp.async loads")
    for rows in ((0, 1), (5, 9), (127, 131)):
        part = cuda_backend.matmul(a[rows[0] : rows[1]], w.t(), bias)
        assert_bits_equal(part, got_k[rows[0] : rows[1]], f"rows {rows}")


@pytest.mark.parametrize("family", ["mma", "wgmma", "portable"])
def test_batched_matmul_entries_are_their_own_products(emulated: dict, monkeypatch: pytest.MonkeyPatch,
                                                       family: str) -> None:
    """(B, M, K) @ (B, K, N), and @ (K, N) (one weight: batch stride 0): each entry has the
    bits of its own 2-D product (blockIdx.z and the batch strides), also when the launcher
    cuts the batch into launches of grid.z <= _MAX_GRID_YZ (here 1 or 2, on a GPU 65535)
    and offsets their pointers itself, and for a batch stride that is no multiple of 16
    bytes (entries alternate between the cp.async and the element-wise loads)."""
    dtype = torch.bfloat16
    portable = family == "portable"
    tile = next(c for c in cuda_backend.TILE_CATALOGUE[dtype] if c.family == "wgmma") if family == "wgmma" else None
    a = rand((3, 20 * 40 + 4), dtype, 70)[:, : 20 * 40].reshape(3, 20, 40)  # batch stride 804 elements
    b3, w = rand((3, 40, 72), dtype, 71), rand((72, 40), dtype, 72)
    bias = rand((72,), dtype, 73)
    for b, what in ((b3, "batched n-major B"), (b3.transpose(1, 2).contiguous().transpose(1, 2), "batched k-major B"),
                    (w.t(), "one k-major B")):
        full = cuda_backend.matmul(a, b, bias, portable=portable, tile=tile)
        for i in range(3):
            entry = cuda_backend.matmul(a[i], b[i] if b.dim() == 3 else b, bias, portable=portable, tile=tile)
            assert_bits_equal(full[i], entry, f"{family} {what}, entry {i}")
        for most in (1, 2):
            with monkeypatch.context() as mp:
                mp.setattr(cuda_backend, "_MAX_GRID_YZ", most)
                chunked = cuda_backend.matmul(a, b, bias, portable=portable, tile=tile)
            assert_bits_equal(chunked, full, f"{family} {what}, launches of {most} entries")


def test_sizes_past_the_32_bit_limit_are_refused_before_launch(emulated: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels step `int` indices by up to 2048 past a row's or K's end: a size near
    2**31 would wrap them around into reads out of bounds, so the launcher refuses it
    (shown with the limit lowered to 64, as real sizes would need 8 GiB rows)."""
    monkeypatch.setattr(cuda_backend, "I32_LIMIT", 64)
    ok, long = rand((2, 63), torch.float32, 80), rand((2, 64), torch.float32, 81)
    assert cuda_backend.softmax(ok, False).shape == (2, 63)
    with pytest.raises(InputError, match=r"row length = 64 is past the CUDA kernels' 32-bit sizes \(at most 63\)"):
        cuda_backend.softmax(long, False)
    with pytest.raises(InputError, match=r"K = 64 is past .* split the tensor along that dimension"):
        cuda_backend.matmul(long, rand((64, 3), torch.float32, 82), None)


def test_fp32_matmul_batch_invariant(emulated: dict) -> None:
    a = rand((130, 50), torch.float32, 60)
    b = rand((50, 70), torch.float32, 61)
    full = cuda_backend.matmul(a, b, None)
    for rows in ((0, 1), (3, 4), (64, 130), (129, 130)):
        assert_bits_equal(cuda_backend.matmul(a[rows[0] : rows[1]], b, None), full[rows[0] : rows[1]], f"rows {rows}")


# ----------------------------------------------------------------------------- grouped (MoE experts)


def _clamped_ends(offs: list[int], rows: int) -> list[int]:
    """The group ends matmul.cu's group_tile uses: offsets clamped nondecreasing into [0, rows]."""
    ends, prev = [], 0
    for o in offs:
        prev = min(max(o, prev), rows)
        ends.append(prev)
    return ends


def _grouped_by_launches(a: torch.Tensor, b: torch.Tensor, ends: list[int], portable: bool) -> torch.Tensor:
    """The reference: one plain matmul launch per nonempty group, zeros elsewhere."""
    out = torch.zeros((a.shape[0], b.shape[-1]), dtype=a.dtype)
    for g, (start, end) in enumerate(zip([0, *ends], ends)):
        if end > start:
            out[start:end] = cuda_backend.matmul(a[start:end], b[g], None, portable=portable)
    return out


def _launched(monkeypatch: pytest.MonkeyPatch, call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """``call()``'s result and the entry points it launched, in order (still emulated)."""
    launched: list[str] = []
    emulated_launch = cuda_backend._launch
    with monkeypatch.context() as mp:
        mp.setattr(cuda_backend, "_launch", lambda dev, module, entry, *args: (launched.append(entry),
                                                                                emulated_launch(dev, module, entry, *args)))
        return call(), launched


def _experts(dtype: torch.dtype, groups: int, k: int, n: int, layout: str, seed: int) -> torch.Tensor:
    w = rand((groups, n, k), dtype, seed, 0.2)  # HF's expert weights (G, N, K)
    return w.transpose(1, 2) if layout == "kmajor" else w.transpose(1, 2).contiguous()


@pytest.mark.parametrize("layout", ["kmajor", "nmajor"])
def test_grouped_wgmma_rows_are_their_groups_products(emulated: dict, monkeypatch: pytest.MonkeyPatch,
                                                      layout: str) -> None:
    """The wgmma configuration of GROUPED_TILE_CATALOGUE (the candidate for sm_90's table):
    one grouped launch of its own kernel, each group's rows with the bits of a plain wgmma
    matmul of that group (groups crossing its 64-row tile, empty and one-row groups), rows
    past offs[-1] zero, and the table's mma.sync grouped launch's bits (the emulation gives
    both families the same arithmetic; on a GPU tests/test_cuda_gpu.py compares them)."""
    dtype = torch.bfloat16
    (tile,) = cuda_backend.GROUPED_TILE_CATALOGUE[dtype]
    s, k, n = 200, 72, 136
    a = rand((s, k), dtype, 82)
    b = _experts(dtype, 5, k, n, layout, 83)
    ends = [0, 70, 71, 71, 190]
    offs = torch.tensor(ends, dtype=torch.int32)
    got, launched = _launched(monkeypatch, lambda: cuda_backend.grouped_matmul(a, b, offs, tile=tile))
    assert launched == [f"{tile.kernel}_grouped_{layout}"], launched
    for g, (start, end) in enumerate(zip([0, *ends], ends)):
        if end > start:
            assert_bits_equal(got[start:end], cuda_backend.matmul(a[start:end], b[g], None, tile=tile),
                              f"group {g} vs a plain wgmma matmul")
    assert torch.equal(got[190:], torch.zeros_like(got[190:]))
    assert_bits_equal(got, cuda_backend.grouped_matmul(a, b, offs), "wgmma vs the table's mma.sync grouped launch")


def test_grouped_matmul_refuses_a_configuration_without_a_grouped_kernel(emulated: dict) -> None:
    """Only the tables' configurations and GROUPED_TILE_CATALOGUE's have grouped kernels;
    another catalogue configuration is an InputError naming the ones that do."""
    a, b = rand((8, 32), torch.bfloat16, 84), _experts(torch.bfloat16, 2, 32, 16, "kmajor", 85)
    offs = torch.tensor([4, 8], dtype=torch.int32)
    other = next(c for c in cuda_backend.TILE_CATALOGUE[torch.bfloat16] if c.name == "64x64x32_2x2_s4")
    with pytest.raises(InputError, match=r"64x64x32_2x2_s4 has no grouped kernel .*wgmma_64x128x64_s4"):
        cuda_backend.grouped_matmul(a, b, offs, tile=other)
    with pytest.raises(InputError, match="no grouped kernel"):
        cuda_backend.grouped_matmul(a, b, offs, portable=True, tile=cuda_backend.GROUPED_TILE_CATALOGUE[torch.bfloat16][0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("layout", ["kmajor", "nmajor"])
def test_grouped_matmul_rows_are_their_groups_products(emulated: dict, monkeypatch: pytest.MonkeyPatch,
                                                       dtype: torch.dtype, portable: bool, layout: str) -> None:
    """One grouped launch, CTAs finding their group from offs on the device: each group's
    rows have the bits of a plain matmul of that group (groups crossing a 128-row tile,
    empty groups, one-row groups, a group at the end), rows past offs[-1] are zero, a row
    alone in its group gives the same bits, and portable=True equals the CPU portable
    backend. K = 72 with k-major B takes the tensor cores' cp.async loads, N = 70 with
    n-major B the element-wise ones."""
    from detkit.kernels import portable_cpu

    s, k, n = 300, 72, 70
    a = rand((s, k), dtype, 80)
    b = _experts(dtype, 5, k, n, layout, 81)
    ends = [0, 130, 131, 131, 271]
    offs = torch.tensor(ends, dtype=torch.int32)
    got, launched = _launched(monkeypatch, lambda: cuda_backend.grouped_matmul(a, b, offs, portable=portable))
    table = cuda_backend.PORTABLE_MATMUL_TILES if portable else cuda_backend.MATMUL_TILES
    assert launched == [f"{table[(dtype, 9)].kernel}_grouped_{layout}"], launched
    assert_bits_equal(got, _grouped_by_launches(a, b, ends, portable), "grouped vs a launch per group")
    assert torch.equal(got[271:], torch.zeros_like(got[271:]))
    for row, group in ((0, 1), (129, 1), (130, 2), (200, 4), (270, 4)):
        alone = cuda_backend.grouped_matmul(a[row : row + 1], b[group : group + 1], torch.tensor([1], dtype=torch.int32),
                                            portable=portable)
        assert_bits_equal(alone[0], got[row], f"row {row} alone in expert {group}")
    if portable:
        assert_bits_equal(got, portable_cpu.grouped_matmul(a, b, offs), "portable CUDA vs portable CPU")


@pytest.mark.parametrize("portable", [False, True])
def test_grouped_matmul_clamps_offsets_it_cannot_trust(emulated: dict, portable: bool) -> None:
    """The kernel reads offs on the device, where nobody checked them: decreasing, negative
    or past-the-end offsets are clamped into [0, S] (under AddressSanitizer: never a read
    past A or a write past the result), with the clamped groups' products."""
    a = rand((150, 40), torch.bfloat16, 82)
    b = _experts(torch.bfloat16, 4, 40, 24, "kmajor", 83)
    for offs in ([-5, 140, 100, 10_000], [150, 0, 0, 150], [2**31 - 1] * 4, [-(2**31)] * 4):
        ends = _clamped_ends(offs, 150)
        got = cuda_backend.grouped_matmul(a, b, torch.tensor(offs, dtype=torch.int32), portable=portable)
        assert_bits_equal(got, _grouped_by_launches(a, b, ends, portable), f"offs {offs} (clamped to {ends})")


# float16: the same templates as bfloat16. The wgmma family (no float32, no portable
# configurations) apart, so that ThreadSanitizer can leave it to the wgmma pipeline test.
@pytest.mark.parametrize(("dtype", "family"), [(torch.float32, "mma"), (torch.bfloat16, "mma"),
                                               (torch.bfloat16, "wgmma")], ids=["float32", "bfloat16", "wgmma"])
def test_every_tile_configuration_gives_the_same_bits(emulated: dict, dtype: torch.dtype, family: str) -> None:
    """The arithmetic order never depends on the tile: every configuration of the
    catalogue (matmul_tiles.cu, matmul_sm90.cu) reproduces the default kernel's bits, for
    both B layouts, aligned (cp.async) and unaligned (element-wise) loads, M = 1 and M, N
    past a whole tile of the largest configuration (every warp of a CTA owns stored
    outputs). In the emulation that includes the wgmma family, whose arithmetic is emulated
    like mma.sync's."""
    k, n = 40, 136
    a, w = rand((140, k + 1), dtype, 80), rand((n, k + 1), dtype, 81, 0.1)
    bias = rand((n,), dtype, 82)
    cases = {"aligned k-major": (a[:, :k].contiguous(), w[:, :k].contiguous().t()),
             "n-major": (a[:, :k].contiguous(), w[:, :k].t().contiguous()),
             "unaligned": (a[:, 1:], w[:, 1:].t())}
    for portable in (False, True) if family == "mma" else (False,):
        tables = cuda_backend.PORTABLE_TILE_CATALOGUE if portable else cuda_backend.TILE_CATALOGUE
        catalogue = [c for c in tables[dtype] if (c.family == "wgmma") == (family == "wgmma")]
        assert catalogue, (family, dtype, portable)
        for what, (x, b) in cases.items():
            for m in (1, 140) if what == "aligned k-major" else (140,):
                want = cuda_backend.matmul(x[:m], b, bias, portable=portable)
                for cfg in catalogue:
                    got = cuda_backend.matmul(x[:m], b, bias, portable=portable, tile=cfg)
                    assert_bits_equal(got, want, f"{cfg.name} {what} M={m} portable={portable}")


def _special_rows(dtype: torch.dtype, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (5, k) and a weight (n, k) with positive entries: in the first n / 2 columns row
    0's products all underflow below zero (an fma chain from +0.0 ends at -0.0) and row
    1's above it (+0.0); row 2 has a NaN, row 3 an Inf, row 4 zeros in its last 16 k."""
    w = rand((n, k), torch.float32, seed, 0.1).abs() + 0.5
    w[: n // 2] = 1e-30
    a = rand((5, k), torch.float32, seed + 1)
    a[0], a[1] = -1e-30, 1e-30
    a[2, k // 3] = float("nan")
    a[3, k // 2] = float("inf")
    a[4, max(0, k - 16) :] = 0.0
    return a.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_signed_zeros_nan_and_inf_in_every_tile_configuration(emulated: dict, dtype: torch.dtype) -> None:
    """Rows ending at -0.0 or +0.0, with a NaN or an Inf, and with zeros in their last k
    steps give the default's bits (the sign of zero included) in every configuration of
    their family and at every M, for K a multiple of some tiles' depth and not of others'
    (K = 96: three 32-deep tiles, one and a half 64-deep ones, wgmma's too, three
    quarters of a 128-deep one): a configuration must not run k steps past K that others
    skip. NaN and Inf propagate as in float64; the portable kernels give the spec's bits
    (ChunkDot's +0.0 start turns -0.0 into +0.0)."""
    for k in (96, 40):
        a, w = _special_rows(dtype, k, 72, 83)
        bias = torch.cat([torch.full((36,), -0.0), rand((36,), torch.float32, 84)]).to(dtype)  # -0.0 keeps a sign
        for portable in (False, True):
            tables = cuda_backend.PORTABLE_TILE_CATALOGUE if portable else cuda_backend.TILE_CATALOGUE
            for b, layout in ((w.t(), "k-major"), (w.t().contiguous(), "n-major")):
                want = cuda_backend.matmul(a, b, bias, portable=portable)
                for cfg in tables[dtype]:
                    assert_bits_equal(cuda_backend.matmul(a, b, bias, portable=portable, tile=cfg), want,
                                      f"{cfg.name} K={k} {layout} portable={portable}")
                    assert_bits_equal(cuda_backend.matmul(a[:1], b, bias, portable=portable, tile=cfg), want[:1],
                                      f"{cfg.name} K={k} {layout} portable={portable} M=1")
            if portable:
                assert_bits_equal(want, spec.matmul(a, w.t(), bias), f"portable K={k} vs spec")
            ref = a.double() @ w.double().t() + bias.double()
            assert bool(torch.equal(want[2:4].isnan(), ref[2:4].isnan())), f"NaN rows, K={k} portable={portable}"
            inf = ref[2:4].isinf()
            assert bool(torch.equal(want[2:4][inf].double(), ref[2:4][inf])), f"Inf rows, K={k} portable={portable}"
        if dtype == torch.bfloat16 and k % 16 == 0:  # the emulated mma: -0.0 when no padded k joins the chain
            assert bool((bits(cuda_backend.matmul(a[:1], w.t(), bias))[0, :36] == -32768).all()), "row 0 not -0.0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_pipeline_values_and_layouts(emulated: dict, dtype: torch.dtype) -> None:
    """The Hopper wgmma kernels (matmul_sm90.cu) over more k tiles than any pipeline has
    stages: right values (vs float64), the bits of the mma.sync default (the emulation
    gives both families the same arithmetic, so this checks descriptors, swizzle, stage
    rotation and fragment layout exactly), both B layouts, rows independent of M."""
    m, k, n = 131, 584, 200  # 10 k tiles of 64; N not a multiple of any BN
    a, w, bias = rand((m, k), dtype, 84), rand((n, k), dtype, 85), rand((n,), dtype, 86)
    ref = a.double() @ w.double().t() + bias.double()
    want = cuda_backend.matmul(a, w.t(), bias)
    tol = 2.0 * ref.abs() * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11) + 1e-3
    configs = [c for c in cuda_backend.TILE_CATALOGUE[dtype] if c.family == "wgmma"]
    assert configs, "no wgmma configuration in the catalogue"
    for cfg in configs if dtype == torch.bfloat16 else configs[:1]:  # float16 shares the template
        got = cuda_backend.matmul(a, w.t(), bias, tile=cfg)
        assert bool(((got.double() - ref).abs() <= tol).all()), f"{cfg.name}: values off"
        assert_bits_equal(got, want, f"{cfg.name} vs the mma.sync default")
        assert_bits_equal(cuda_backend.matmul(a, w.t().contiguous(), bias, tile=cfg), got, f"{cfg.name} n-major B")
        assert_bits_equal(cuda_backend.matmul(a[64:67], w.t(), bias, tile=cfg), got[64:67], f"{cfg.name} rows 64:67")


# Negative controls of the wgmma emulation, each a mistake the GPU would punish with wrong
# bits: refilling the stage a wgmma still reads (prefetching one tile deeper than the
# wait allows), a tile's copies not waited for before the wgmma reads it, tiles not
# 1024-byte aligned (the hardware swizzles by address bits), and tiles stored without the
# swizzle their descriptors declare.
_WGMMA_MISTAKES = {
    "refill in flight": ("static constexpr int PREFETCH = STAGES - 2;", "static constexpr int PREFETCH = STAGES - 1;"),
    "copies not waited for": ("cp_async_wait<PREFETCH - 1>();  // tile kt has landed",
                              "cp_async_wait<PREFETCH>();  // tile kt has landed"),
    "unaligned tiles": ("unsigned char* const sA = wg_smem + ((1024u - (smem_addr(wg_smem) & 1023u)) & 1023u);",
                        "unsigned char* const sA = wg_smem;"),
    "unswizzled tiles": ("return row * 128 + ((chunk ^ (row & 7)) << 4);", "return row * 128 + (chunk << 4);"),
}


@pytest.mark.parametrize("mistake", sorted(_WGMMA_MISTAKES))
def test_mutation_wgmma_mistakes_change_the_bits(emulated: dict, monkeypatch: pytest.MonkeyPatch,
                                                 mistake: str) -> None:
    a, w = rand((70, 584), torch.bfloat16, 87), rand((72, 584), torch.bfloat16, 88)
    cfg = next(c for c in cuda_backend.TILE_CATALOGUE[torch.bfloat16] if c.name == "wgmma_64x64x64_s8")
    want = cuda_backend.matmul(a, w.t(), None, tile=cfg)
    source = _mutated("matmul_sm90.cu", cuda_loader.kernel_source("matmul_sm90.cu"), _WGMMA_MISTAKES[mistake])
    monkeypatch.setattr(cuda_backend, "_driver_launch",
                        _driver({**emulated, "matmul_sm90.cu": _build("matmul_sm90.cu", _out_dir(), source)}))
    got = cuda_backend.matmul(a, w.t(), None, tile=cfg)
    assert not torch.equal(bits(got), bits(want)), f"the emulation did not notice {mistake}"


def test_mutation_a_stage_read_before_its_copies_land_changes_the_bits(emulated: dict,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """cp.async lands when the kernel waits for its group, not when it is issued: the
    mma.sync pipeline waiting for one group too few reads a stage still in flight."""
    a, w = rand((70, 584), torch.bfloat16, 89), rand((72, 584), torch.bfloat16, 90)
    want = cuda_backend.matmul(a, w.t(), None)
    source = _mutated("matmul.cu", cuda_loader.kernel_source("matmul.cu"),
                      ("cp_async_wait<STAGES - 2>();", "cp_async_wait<STAGES - 1>();"))
    monkeypatch.setattr(cuda_backend, "_driver_launch",
                        _driver({**emulated, "matmul.cu": _build("matmul.cu", _out_dir(), source)}))
    got = cuda_backend.matmul(a, w.t(), None)
    assert not torch.equal(bits(got), bits(want)), "the emulation did not notice a stage read before it landed"


def test_tile_override_must_come_from_the_catalogue(emulated: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    a = rand((4, 16), torch.bfloat16, 83)
    with pytest.raises(InputError, match="not a configuration for torch.bfloat16"):
        cuda_backend.matmul(a, a.t(), None, tile=cuda_backend.TILE_CATALOGUE[torch.float32][0])
    wgmma = next(c for c in cuda_backend.TILE_CATALOGUE[torch.bfloat16] if c.family == "wgmma")
    with monkeypatch.context() as mp:  # an A100: no wgmma
        mp.setattr(cuda_backend, "_major", lambda dev: 8)
        assert not cuda_backend.fits(wgmma, a.device)
        with pytest.raises(InputError, match="only sm_90 GPUs"):
            cuda_backend.matmul(a, a.t(), None, tile=wgmma)


# ----------------------------------------------------------------------------- a whole model
# The GPU run's integration group sends a Hugging Face model's ops through the front end
# and the torch mode to the CUDA backend. Here the backend table routes CPU tensors to the
# CUDA backend modules, whose launches the emulation runs: the same calls (shapes,
# strides, views, masks, dtypes) reach the same launchers and kernels.


def _cpu_tensors_take_the_cuda_backend(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Route CPU tensors to the CUDA backend; the set fills with the entry points launched
    (the CPU backends give the same bits, so a test must see that the CUDA ones ran)."""
    from detkit.kernels import _backend

    monkeypatch.setitem(_backend.BACKEND_MODULES, ("cpu", False), "detkit.kernels.cuda")
    monkeypatch.setitem(_backend.BACKEND_MODULES, ("cpu", True), "detkit.kernels.cuda_portable")
    launched: set[str] = set()
    emulated_launch = cuda_backend._launch

    def launch(dev: torch.device, module: str, entry: str, *args: Any, **kwargs: Any) -> None:
        launched.add(entry)
        emulated_launch(dev, module, entry, *args, **kwargs)

    monkeypatch.setattr(cuda_backend, "_launch", launch)
    return launched


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_portable_mode_through_the_cuda_backend_gives_the_committed_cpu_logits(
    emulated: dict, monkeypatch: pytest.MonkeyPatch, family: str, attn: str
) -> None:
    """tests/test_cuda_gpu.py's test_portable_mode_gives_the_cpu_logits_on_the_gpu: a small
    GPT-2 or Llama (RoPE's sin/cos, RMSNorm, SiLU) under batch_invariant(portable=True),
    every op on the CUDA backend, gives the float32 logits bits committed from the CPU
    portable backend."""
    pytest.importorskip("transformers")
    import portable_reference as ref

    launched = _cpu_tensors_take_the_cuda_backend(monkeypatch)
    logits, uncovered = ref.portable_logits(ref.build_model(attn, family), ref.inputs())
    assert uncovered == {}, f"ops fell back to torch: {uncovered}"
    norm = "layer_norm_p_f32" if family == "gpt2" else "row_sum_p_f32"  # HF's RMSNorm: pow, mean, rsqrt
    assert {"mm_simt_128x64x16_8x4_f32_kmajor", norm, "elementwise_p_f32"} <= launched, launched
    assert ("softmax_p_f32" if attn == "eager" else "attention_f32") in launched, launched
    assert_bits_equal(logits, ref.load(family)[attn], f"{family} {attn}: portable logits through the CUDA backend")


# what each family must have launched besides the portable elementwise kernel
_FAMILY_KERNELS = {"mamba2": {"row_cumsum_f32"}, "qwen3_next": {"row_cumsum_f32", "solve_lower_f32"},
                   "bloom": {"pow_p_f32"}}


@pytest.mark.parametrize("family", sorted(TINY_FAMILY_CONFIGS))
def test_portable_families_through_the_cuda_backend_give_the_cpu_portable_logits(
    emulated: dict, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """A small Mamba2 (chunked scan: float cumsum of its segment sums and decays, causal
    conv, softplus, gated RMSNorm) and Qwen3-Next (gated delta rule: cumsum of the gates,
    the UT system's triangular solves; attention and MoE beside it) and Bloom (ALiBi
    slopes through Pow: pow.Tensor_Tensor) under batch_invariant(portable=True), every op
    on the CUDA backend, give the CPU portable backend's float32 logits bit for bit."""
    transformers = pytest.importorskip("transformers")
    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

    import detkit

    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                                               eos_token_id=EOS_ID, initializer_range=0.1, **TINY_FAMILY_CONFIGS[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    enc = build_tokenizer()(["Batch invariance means", "hi", "The quick brown fox"], padding=True,
                            return_tensors="pt")

    def logits() -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), detkit.batch_invariant(portable=True) as bi:
            out = model(**enc).logits
        return out, bi.uncovered()

    want, uncovered = logits()
    assert uncovered == {}, uncovered
    launched = _cpu_tensors_take_the_cuda_backend(monkeypatch)
    got, uncovered = logits()
    assert uncovered == {}, uncovered
    assert {"elementwise_p_f32", *_FAMILY_KERNELS[family]} <= launched, launched
    assert_bits_equal(got, want, f"{family} portable logits: CUDA backend vs CPU portable backend")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mode_through_the_cuda_backend_makes_a_bf16_model_batch_invariant(
    emulated: dict, monkeypatch: pytest.MonkeyPatch, attn: str
) -> None:
    """batch_invariant() on the CUDA backend, as tests/test_cuda_gpu.py's
    test_mode_makes_a_cuda_model_batch_invariant: greedy generate with a KV cache
    (tensor-core matmuls; split-KV attention or the block softmax over masked logits,
    prefill and, with sdpa, a one-query decode step): each prompt's per-step logits alone
    equal its logits in the left-padded batch, bitwise, and no op falls back to torch."""
    pytest.importorskip("transformers")
    import detkit
    import portable_reference as ref

    launched = _cpu_tensors_take_the_cuda_backend(monkeypatch)
    model = ref.build_model(attn).to(torch.bfloat16)
    enc = ref.inputs()
    steps = 2 if attn == "sdpa" else 1  # eager's emulated batched products are slow; sdpa decodes too

    def generate(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(out.logits, 1)

    with detkit.batch_invariant() as bi, torch.no_grad():
        batch = generate(enc["input_ids"], enc["attention_mask"])
        for i in range(batch.shape[0]):
            n = int(enc["attention_mask"][i].sum())
            alone = generate(enc["input_ids"][i : i + 1, -n:], enc["attention_mask"][i : i + 1, -n:])
            assert_bits_equal(batch[i], alone[0], f"{attn}: prompt {i} alone vs in the padded batch")
    assert bi.uncovered() == {}, f"ops fell back to torch: {bi.coverage()}"
    assert {"mm_tc_128x64x32_2x2_s3_bf16_kmajor", "layer_norm_b_bf16"} <= launched, launched
    assert ("softmax_b_bf16" if attn == "eager" else "attention_split_bf16") in launched, launched


def _tiny_mixtral() -> Any:
    transformers = pytest.importorskip("transformers")
    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    config = transformers.MixtralConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                        initializer_range=0.1, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(config)


def test_mode_through_the_cuda_backend_routes_a_moe_models_grouped_experts(
    emulated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_cuda_gpu.py's test_mode_makes_a_cuda_moe_model_batch_invariant, small: a
    Mixtral's experts (torch._grouped_mm over transposed expert weights, one group per
    expert) go through the mode's adapter to the grouped tensor-core kernel, and each
    prompt's last logits alone equal its row of the left-padded batch, bitwise."""
    import detkit
    import portable_reference as ref

    model = _tiny_mixtral().to(torch.bfloat16).eval()
    launched = _cpu_tensors_take_the_cuda_backend(monkeypatch)
    enc = ref.inputs()
    # a plain forward numbers positions from the padded start: give them from the mask
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with detkit.batch_invariant() as bi, torch.no_grad():
        batch = model(**enc, position_ids=positions).logits[:, -1]
        for i in range(batch.shape[0]):
            n = int(enc["attention_mask"][i].sum())
            alone = model(input_ids=enc["input_ids"][i : i + 1, -n:]).logits[0, -1]
            assert_bits_equal(batch[i], alone, f"MoE prompt {i} alone vs in the padded batch")
    assert bi.uncovered() == {}, f"ops fell back to torch: {bi.coverage()}"
    assert bi.routed().get("_grouped_mm", 0) > 0, bi.coverage()
    # the attention projections' products, and the experts' in one grouped launch each
    assert {"mm_tc_128x64x32_2x2_s3_bf16_kmajor", "mm_tc_128x64x32_2x2_s3_bf16_grouped_kmajor"} <= launched, launched


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convolutions_through_the_cuda_backend(emulated: dict, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                               portable: bool) -> None:
    """tests/test_cuda_gpu.py's test_convolutions_under_the_mode_on_cuda, small: Mamba's
    causal depthwise conv (a 3-D product over the channels, K = 4 taps + the bias column)
    a patch conv2d and a grouped transposed conv1d go through the mode's convolution
    adapter to the CUDA backend;
    decode (one window) gives the prefill bits, each batch entry its bits alone, and in
    portable mode both give the CPU portable backend's bits."""
    import torch.nn.functional as F

    import detkit

    ch, k, length = 16, 4, 9
    x, w, b = rand((3, ch, length), dtype, 130), rand((ch, 1, k), dtype, 131), rand((ch,), dtype, 132)
    img, pw, pb = rand((2, 3, 8, 8), dtype, 133), rand((5, 3, 4, 4), dtype, 134), rand((5,), dtype, 135)
    up, uw = rand((3, 6, 5), dtype, 136), rand((6, 4, 4), dtype, 137)

    def convs() -> tuple[torch.Tensor, ...]:
        prefill = F.conv1d(x, w, b, padding=k - 1, groups=ch)[..., :length]
        padded = F.pad(x, (k - 1, 0))
        decode = torch.stack([F.conv1d(padded[..., t : t + k], w, b, groups=ch)[..., 0] for t in range(length)], -1)
        alone = torch.cat([F.conv1d(x[i : i + 1], w, b, padding=k - 1, groups=ch)[..., :length] for i in range(3)])
        upsampled = F.conv_transpose1d(up, uw, stride=2, padding=1, groups=2)
        up_alone = torch.cat([F.conv_transpose1d(up[i : i + 1], uw, stride=2, padding=1, groups=2) for i in range(3)])
        return prefill, decode, alone, F.conv2d(img, pw, pb, stride=4), upsampled, up_alone

    if portable:
        with detkit.batch_invariant(portable=True):
            cpu_prefill, _, _, cpu_patches, cpu_upsampled, _ = convs()
    launched = _cpu_tensors_take_the_cuda_backend(monkeypatch)
    with detkit.batch_invariant(portable=portable) as bi:
        prefill, decode, alone, patches, upsampled, up_alone = convs()
    assert bi.uncovered() == {} and bi.routed().get("convolution") == 2 + length + 3 + 1 + 3, bi.coverage()
    assert_bits_equal(up_alone, upsampled, f"{dtype} portable={portable}: transposed conv alone vs in the batch")
    assert any(e.startswith("mm_") for e in launched), launched
    assert_bits_equal(decode, prefill, f"{dtype} portable={portable}: decode vs prefill")
    assert_bits_equal(alone, prefill, f"{dtype} portable={portable}: each sequence alone vs in the batch")
    if portable:
        assert_bits_equal(prefill, cpu_prefill, f"{dtype}: depthwise conv, CUDA vs CPU portable")
        assert_bits_equal(patches, cpu_patches, f"{dtype}: patch conv2d, CUDA vs CPU portable")
        assert_bits_equal(upsampled, cpu_upsampled, f"{dtype}: transposed conv1d, CUDA vs CPU portable")


def _composed_reduction_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """tests/test_mode_reductions.py's input for each of its OPS: 6 rows of 333 (3 x 111 for
    the 2-D forms), an inf, a -inf and a NaN planted in rows 1, 2 and 3."""
    from test_mode_reductions import OPS, planted_input

    return {name: planted_input(name, 6, 333, dtype, 5) for name in OPS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_composed_reductions_through_the_cuda_backend_give_the_cpu_portable_bits(
    emulated: dict, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """tests/test_cuda_gpu.py's test_portable_composed_reductions_on_cuda_equal_cpu, small:
    logsumexp, var/std (and var_mean/std_mean) and vector norms (F.normalize) under
    batch_invariant(portable=True) are compositions of routed ops; with every op on the
    CUDA backend (the portable row sum, elementwise and pow kernels; bfloat16 computed in
    float32) each gives the CPU portable backend's bits, rows holding inf, -inf and NaN
    included."""
    import detkit
    from detkit.testing import assert_bitwise_equal
    from test_mode_reductions import OPS

    inputs = _composed_reduction_inputs(dtype)

    def results() -> dict[str, object]:
        with detkit.batch_invariant(portable=True, strict=True) as bi:
            out = {name: fn(inputs[name]) for name, (fn, _) in OPS.items()}
        assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
        assert {routed_as for _, routed_as in OPS.values()} <= set(bi.routed()), bi.coverage()
        return out

    want = results()
    launched = _cpu_tensors_take_the_cuda_backend(monkeypatch)
    got = results()
    assert {"row_sum_p_f32", "elementwise_p_f32", "pow_p_f32"} <= launched, launched
    for name in OPS:
        assert_bitwise_equal(got[name], want[name], name=f"{name} {dtype}: CUDA backend vs CPU portable backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cross_entropy_loss_through_the_cuda_backend_gives_the_cpu_portable_bits(
    emulated: dict, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """A trainer's loss under batch_invariant(portable=True): log_softmax, nll_loss's
    canonical sums and label smoothing's row sums, every one on the CUDA backend, give the
    CPU portable backend's bits."""
    import torch.nn.functional as F

    import detkit
    from detkit.testing import assert_bitwise_equal
    from test_mode_reductions import _loss_inputs

    x, t, w = _loss_inputs(dtype)

    def losses() -> torch.Tensor:
        with detkit.batch_invariant(portable=True, strict=True) as bi:
            out = torch.stack([F.cross_entropy(x, t), F.cross_entropy(x, t, weight=w, label_smoothing=0.1),
                               F.nll_loss(F.log_softmax(x, -1), t, reduction="sum")])
        assert bi.uncovered() == {} and bi.not_portable() == {} and "nll_loss_forward" in bi.routed()
        return out

    want = losses()
    launched = _cpu_tensors_take_the_cuda_backend(monkeypatch)
    got = losses()
    tag = "f32" if dtype == torch.float32 else "bf16"
    assert {f"softmax_p_{tag}", "row_sum_p_f32"} <= launched, launched  # log_softmax; the losses' sums
    assert_bitwise_equal(got, want, name=f"{dtype} losses: CUDA backend vs CPU portable backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_composed_reductions_through_the_cuda_backend_are_batch_invariant(
    emulated: dict, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """tests/test_cuda_gpu.py's test_composed_reductions_under_the_mode_are_batch_invariant_on_cuda,
    small: under batch_invariant() on the CUDA backend each composed reduction's row has
    its bits alone at any position of a batch of 2 or 5 (its sums are the batch-invariant
    row sum's, which must have run)."""
    import detkit
    from detkit.testing import assert_batch_invariant
    from test_mode_reductions import OPS

    inputs = _composed_reduction_inputs(dtype)
    launched = _cpu_tensors_take_the_cuda_backend(monkeypatch)
    with detkit.batch_invariant(strict=True) as bi:
        for name, (fn, _) in OPS.items():
            assert_batch_invariant(fn, inputs[name], [1, 2, 5], positions="random", name=f"{name} {dtype}")
    assert bi.uncovered() == {}, bi.coverage()
    assert "row_sum_b_f32" in launched, launched


# ----------------------------------------------------------------------------- drawn shapes

_DRAWN = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_DRAWN
@given(sizes=st.lists(st.integers(0, 140), min_size=1, max_size=6), tail=st.integers(0, 20),
       k=st.integers(1, 100), n=st.integers(1, 80), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["kmajor", "nmajor"]), portable=st.booleans(), seed=st.integers(0, 2**16))
def test_grouped_matmul_for_drawn_shapes(emulated: dict, sizes: list[int], tail: int, k: int, n: int,
                                         dtype: torch.dtype, layout: str, portable: bool, seed: int) -> None:
    """Any split of the rows into experts (empty ones, a tail past offs[-1]), any K and N:
    the bits of one launch per group."""
    ends = torch.tensor(sizes).cumsum(0).tolist()
    s = ends[-1] + tail
    if s == 0:
        return  # the front end answers an empty product itself
    a = rand((s, k), dtype, seed)
    b = _experts(dtype, len(sizes), k, n, layout, seed + 1)
    got = cuda_backend.grouped_matmul(a, b, torch.tensor(ends, dtype=torch.int32), portable=portable)
    assert_bits_equal(got, _grouped_by_launches(a, b, ends, portable), f"groups {sizes} + {tail} K={k} N={n}")


@_DRAWN
@given(length=st.integers(1, 700), rows=st.integers(1, 6), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       data=st.data())
def test_batch_invariant_row_ops_for_drawn_shapes(emulated: dict, length: int, rows: int, dtype: torch.dtype,
                                                  seed: int, data: st.DataObject) -> None:
    """portable=False row ops, any length: a row alone (at its address, or moved to a
    fresh aligned buffer) has its bits in the batch."""
    x = rand((rows, length), dtype, seed, 3.0)
    w, b = rand((length,), dtype, seed + 1), rand((length,), dtype, seed + 2)
    r = data.draw(st.integers(0, rows - 1))
    for what, fn in (("softmax", lambda t: cuda_backend.softmax(t, False)),
                     ("layer_norm", lambda t: cuda_backend.layer_norm(t, w, b, 1e-5)),
                     ("rms_norm", lambda t: cuda_backend.rms_norm(t, w, 1e-6)),
                     ("cumsum", cuda_backend.row_cumsum)):
        full = fn(x)
        assert_bits_equal(fn(x[r : r + 1]), full[r : r + 1], f"{what} row {r} of {rows}x{length}")
        assert_bits_equal(fn(x[r : r + 1].clone()), full[r : r + 1], f"{what} row {r} moved")


@_DRAWN
@given(length=st.integers(1, 700), left=st.integers(0, 2200), right=st.integers(0, 40),
       dtype=st.sampled_from(DTYPES), fill=st.sampled_from(["-inf", "finfo.min", "far below"]), seed=st.integers(0, 2**16))
def test_batch_invariant_softmax_and_sum_padding_for_drawn_shapes(emulated: dict, length: int, left: int, right: int,
                                                                  dtype: torch.dtype, fill: str, seed: int) -> None:
    x = rand((2, length), dtype, seed, 3.0)
    _padded_softmax_is_the_rows_softmax(x, _masked((2, left), dtype, fill, seed + 1),
                                        _masked((2, right), dtype, fill, seed + 2), False, f"{left} + {length} + {right}")
    padded = torch.cat([torch.zeros((2, left), dtype=dtype), x, torch.zeros((2, right), dtype=dtype)], 1)
    assert_bits_equal(cuda_backend.row_sum(padded, False), cuda_backend.row_sum(x, False), f"sum, {left} + {length}")


@_DRAWN
@given(m=st.integers(1, 140), k=st.integers(1, 200), n=st.integers(1, 300),
       layout=st.sampled_from(["k-major", "n-major", "unaligned"]),
       config=st.integers(0, len(cuda_backend.WG_TAGS) - 1), seed=st.integers(0, 2**16))
def test_wgmma_for_drawn_shapes(emulated: dict, m: int, k: int, n: int, layout: str, config: int, seed: int) -> None:
    """Any (M, K, N, B layout, alignment) through a wgmma configuration: the mma.sync
    default's bits (the emulation gives both the same arithmetic), so edge tiles in M, N
    and K, K below one 16-byte chunk and N-major tails are indexed right."""
    cfg = [c for c in cuda_backend.TILE_CATALOGUE[torch.bfloat16] if c.family == "wgmma"][config]
    x = rand((m, k + 1), torch.bfloat16, seed)
    w = rand((n, k + 1), torch.bfloat16, seed + 1, 0.1)
    if layout == "unaligned":  # views one element in: element-wise loads
        a, b = x[:, 1:], w[:, 1:].t()
    else:
        a, w = x[:, :k].contiguous(), w[:, :k].contiguous()
        b = w.t() if layout == "k-major" else w.t().contiguous()
    assert_bits_equal(cuda_backend.matmul(a, b, None, tile=cfg), cuda_backend.matmul(a, b, None),
                      f"{cfg.name} M={m} K={k} N={n} {layout}")


@_DRAWN
@given(lk=st.integers(1, 300), pad=st.integers(0, 140), d=st.sampled_from((8, 40, 64)), seed=st.integers(0, 2**16))
# kept keys a whole split, one past it, two whole splits; anchors one short of and at a split
@example(lk=128, pad=127, d=8, seed=1)
@example(lk=129, pad=128, d=8, seed=2)
@example(lk=256, pad=1, d=40, seed=3)
def test_split_attention_for_drawn_shapes(emulated: dict, lk: int, pad: int, d: int, seed: int) -> None:
    """Split KV, any length and padding: the last query of a causal prefill, decode
    against the cache and the left-padded decode give the same bits."""
    dtype = torch.float32
    q = rand((1, 2, 2, d), dtype, seed)
    k, v = rand((1, 1, lk, d), dtype, seed + 1), rand((1, 1, lk, d), dtype, seed + 2)
    causal = torch.ones(lk, lk, dtype=torch.bool).tril()[-2:].expand(1, 2, 2, lk) if lk >= 2 else None
    decode = cuda_backend.attention(q[:, :, -1:], k, v, None, 0.1)
    if causal is not None:
        assert_bits_equal(cuda_backend.attention(q, k, v, causal, 0.1)[:, :, -1:], decode, f"prefill, Lk={lk}")
    kp = torch.cat([rand((1, 1, pad, d), dtype, seed + 3), k], 2)
    vp = torch.cat([rand((1, 1, pad, d), dtype, seed + 4), v], 2)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, lk, dtype=torch.bool)], 1)
    padded = cuda_backend.attention(q[:, :, -1:], kp, vp, mask.expand(1, 2, 1, lk + pad), 0.1)
    assert_bits_equal(padded, decode, f"left padding {pad}, Lk={lk}")



@_DRAWN
@given(lk=st.integers(1, 600), pad=st.integers(0, 140), heads=st.sampled_from(((1, 1), (4, 2), (6, 1))),
       dtype=st.sampled_from(_TC), seed=st.integers(0, 2**16))
# kept keys one block, one past a split; anchors one short of and at a block boundary
@example(lk=64, pad=63, heads=(1, 1), dtype=torch.bfloat16, seed=1)
@example(lk=257, pad=64, heads=(4, 2), dtype=torch.float16, seed=2)
def test_tensor_core_attention_for_drawn_shapes(emulated: dict, lk: int, pad: int, heads: tuple[int, int],
                                                dtype: torch.dtype, seed: int) -> None:
    """The tensor-core kernel, any length, padding and GQA group: the last query of a
    causal prefill, decode against the cache and the left-padded decode give the same bits."""
    h, hk = heads
    q = rand((1, h, 2, 64), dtype, seed)
    k, v = rand((1, hk, lk, 64), dtype, seed + 1), rand((1, hk, lk, 64), dtype, seed + 2)
    decode = cuda_backend.attention(q[:, :, -1:], k, v, None, 0.1)
    if lk >= 2:
        causal = torch.ones(lk, lk, dtype=torch.bool).tril()[-2:].expand(1, h, 2, lk)
        assert_bits_equal(cuda_backend.attention(q, k, v, causal, 0.1)[:, :, -1:], decode, f"prefill, Lk={lk}")
    kp = torch.cat([rand((1, hk, pad, 64), dtype, seed + 3), k], 2)
    vp = torch.cat([rand((1, hk, pad, 64), dtype, seed + 4), v], 2)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, lk, dtype=torch.bool)], 1)
    padded = cuda_backend.attention(q[:, :, -1:], kp, vp, mask.expand(1, h, 1, lk + pad), 0.1)
    assert_bits_equal(padded, decode, f"left padding {pad}, Lk={lk}")

# ----------------------------------------------------------------------------- GPU faults on the host
# Mistakes that a GPU punishes (an illegal address kills the CUDA context for the rest of
# the process; a race or a warp collective with a lane gone gives results that change
# from run to run) but that plain host runs would let pass. Each checker has a negative
# control: a one-line mutation of rowops.cu or common.cuh.

# A lane leaving early while the rest of its warp goes on into shuffles.
_LANE_EXIT = ("    if (row >= R) return;  // whole warp leaves together\n",
              "    if (row >= R || (threadIdx.x & 31) == 31) return;\n")
# One element read past each row, past the tensor for the last row.
_OVERREAD = ("for (int j = lane; j < L; j += 32) m = ieee_max(m, to_f32(xr[j]));",
             "for (int j = lane; j <= L; j += 32) m = ieee_max(m, to_f32(xr[j]));")


def _mutated(name: str, text: str, mutation: tuple[str, str]) -> str:
    """``text`` (of kernel file ``name``) with the negative control's one-line change."""
    assert mutation[0] in text, f"{name} changed: update this negative control's mutation"
    return text.replace(*mutation)


def test_mutation_tensor_core_attention_blocks_not_anchored_change_with_padding(emulated: dict,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensor-core attention with its blocks counted from a multiple of 64 below the
    anchor instead of from the anchor: left padding moves the real keys into other blocks
    (another rescaling, other P V chains), and the padding check sees the bits change."""
    source = _mutated("attention.cu", cuda_loader.kernel_source("attention.cu"),
                      ("        const int lo = alpha + split * ATC_SPLIT;\n",
                       "        const int lo = alpha / ATC_KB * ATC_KB + split * ATC_SPLIT;\n"))
    monkeypatch.setattr(cuda_backend, "_driver_launch",
                        _driver({**emulated, "attention.cu": _build("attention.cu", _out_dir(), source)}))
    q, k, v = (t[:1, :1] for t in _tc_inputs(torch.bfloat16, 1, 150, 87))
    alone = cuda_backend.attention(q, k, v, None, 0.15)
    kp = torch.cat([rand((1, 1, 7, 64), torch.bfloat16, 88), k], 2)
    vp = torch.cat([rand((1, 1, 7, 64), torch.bfloat16, 89), v], 2)
    keep = torch.cat([torch.zeros(7, dtype=torch.bool), torch.ones(150, dtype=torch.bool)]).expand(1, 1, 1, 157)
    with pytest.raises(AssertionError, match="left padding 7"):
        assert_bits_equal(cuda_backend.attention(q, kp, vp, keep, 0.15), alone, "left padding 7")


def test_mutation_an_unanchored_softmax_sum_changes_with_padding(emulated: dict,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The portable=False softmax with its slots counted from index 0 again: padding in
    front moves the real entries to other threads and the padding test sees the bits change."""
    source = _mutated("rowops.cu", cuda_loader.kernel_source("rowops.cu"),
                      ("const int a = first_nonzero<T>(xr, L, vx, [&](float v) { return expf(__fsub_rn(v, m)) != 0.0f; }, "
                       "iscratch);", "const int a = 0;"))
    monkeypatch.setattr(cuda_backend, "_driver_launch", _driver({**emulated, "rowops.cu": _build("rowops.cu", _out_dir(),
                                                                                            source)}))
    x = rand((3, 301), torch.float32, 46, 3.0)
    with pytest.raises(AssertionError, match="softmax, 7 x -inf in front"):
        _padded_softmax_is_the_rows_softmax(x, _masked((3, 7), torch.float32, "-inf", 0), x[:, :0], False,
                                            "7 x -inf in front")


# block_reduce (common.cuh) summing all 32 slots of its scratch, of which a 256-thread block
# writes 8; and only the grid's first block writing its warps' partial sums.
_SCRATCH_UNWRITTEN = ("float w = (lane < NT / 32) ? scratch[lane] : neutral;",
                      "float w = (IS_MAX && lane >= NT / 32) ? neutral : scratch[lane];")
_SCRATCH_OTHER_BLOCK = ("if (lane == 0) scratch[warp] = v;\n    __syncthreads();\n    const float neutral",
                        "if (lane == 0 && blockIdx.x == 0) scratch[warp] = v;\n    __syncthreads();\n    const float neutral")


@pytest.mark.parametrize(("mutation", "rows_hit"), [(_SCRATCH_UNWRITTEN, slice(0, None)),
                                                    (_SCRATCH_OTHER_BLOCK, slice(1, None))])
def test_mutation_static_shared_memory_read_before_the_block_writes_it_gives_nan(
    emulated: dict, monkeypatch: pytest.MonkeyPatch, mutation: tuple[str, str], rows_hit: slice
) -> None:
    """A static __shared__ array is uninitialised at the start of every block on a GPU; the
    emulation refills it with 0xFF bytes (NaN), like the dynamic shared memory. Without that
    the first mutation read zeros (and summed right) and the second the previous block's
    sums: both passed on the host."""
    source = _mutated("rowops.cu", cuda_loader.kernel_source("rowops.cu"), mutation)
    monkeypatch.setattr(cuda_backend, "_driver_launch", _driver({**emulated, "rowops.cu": _build("rowops.cu", _out_dir(),
                                                                                            source)}))
    x = rand((3, 301), torch.float32, 47)
    got = cuda_backend.row_sum(x, False)
    assert bool(got[rows_hit].isnan().all()), f"unwritten shared memory did not show up: {got.tolist()}"


def test_mutation_a_lane_leaving_before_a_warp_collective_fails_the_launch(
    emulated: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _mutated("rowops.cu", cuda_loader.kernel_source("rowops.cu"), _LANE_EXIT)
    libs = {**emulated, "rowops.cu": _build("rowops.cu", _out_dir(), source)}
    monkeypatch.setattr(cuda_backend, "_driver_launch", _driver(libs))
    # through the backend's launcher, as a failed launch on a GPU: a KernelLaunchError naming the kernel
    with pytest.raises(KernelLaunchError, match="softmax_p_f32 .*(warp collective ran after a lane|lane returned)"):
        cuda_backend.softmax(rand((2, 40), torch.float32, 1), False, portable=True)


def test_threads_waiting_at_barriers_that_cannot_open_fail_the_launch() -> None:
    """A lane waiting at __syncthreads while the rest of its warp waits in a collective: on
    a GPU the launch hangs; here the scheduler finds a turn in which no thread moved. And a
    launch whose arguments do not fit the kernel's parameters fails."""
    source = ('extern "C" __global__ void stuck(float* p) {\n'
              '    if ((threadIdx.x & 31) == 31) __syncthreads();\n'
              '    __syncwarp();\n'
              '    p[threadIdx.x] = 1.0f;\n'
              '}\n')
    launch = _source_launcher("stuck.cu", source)
    out = torch.zeros(64)
    with pytest.raises(AssertionError, match="stuck .*every thread left waits at a barrier that cannot open"):
        launch(out.device, "stuck.cu", "stuck", (2, 1, 1), 64, "P", (out.data_ptr(),))
    fine = source.replace("    if ((threadIdx.x & 31) == 31) __syncthreads();\n", "")
    launch = _source_launcher("fine.cu", fine)
    launch(out.device, "fine.cu", "stuck", (2, 1, 1), 64, "P", (out.data_ptr(),))
    assert bool((out == 1).all())
    # The entry table calls a kernel with its own parameter types: other arguments fail.
    for sig, args in [("Pi", (out.data_ptr(), 1)), ("i", (0,))]:
        with pytest.raises(AssertionError, match="arguments do not match the kernel's parameters"):
            launch(out.device, "fine.cu", "stuck", (1, 1, 1), 32, sig, args)


@pytest.mark.parametrize("defines", [(), ("EMU_UCONTEXT",)], ids=["default switch", "swapcontext"])
def test_fibers_keep_their_state_across_barriers_in_every_block(defines: tuple[str, ...]) -> None:
    """runtime.cpp's fibers, with its stack switch (x86-64) and with swapcontext (the
    switch elsewhere): a fiber is made once per launch and runs every block in turn. Each
    thread's partial sum lives through a warp shuffle and a __syncthreads, each block's
    sum lands in its row, and a later launch of another size starts fresh fibers; a block
    whose threads all wait at barriers that cannot open still fails the launch."""
    source = ('extern "C" __global__ void sums(const float* x, float* part, float* out, int n) {\n'
              "    __shared__ float warps[32];\n"
              "    float v = 0.0f;\n"
              "    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];\n"
              "    float w = v;\n"
              "    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);\n"
              "    if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = w;\n"
              "    __syncthreads();\n"
              "    part[blockIdx.x * blockDim.x + threadIdx.x] = v;\n"
              "    if (threadIdx.x == 0) {\n"
              "        float s = 0.0f;\n"
              "        for (int k = 0; k < (int)(blockDim.x >> 5); ++k) s += warps[k];\n"
              "        out[blockIdx.x] = s;\n"
              "    }\n"
              "}\n"
              'extern "C" __global__ void stuck(float* p) {\n'
              "    if ((threadIdx.x & 31) == 31) __syncthreads();\n"
              "    __syncwarp();\n"
              "    p[threadIdx.x] = 1.0f;\n"
              "}\n")
    launch = _source_launcher("fibers.cu", source, defines)
    for blocks, threads, n in ((37, 256, 1000), (5, 96, 7)):
        # small integers: every order of the sums gives the same exact value
        x = torch.randint(-50, 50, (blocks, n), generator=torch.Generator().manual_seed(blocks)).float()
        part, out = torch.full((blocks, threads), float("nan")), torch.full((blocks,), float("nan"))
        launch(x.device, "fibers.cu", "sums", (blocks, 1, 1), threads, "PPPi",
               (x.data_ptr(), part.data_ptr(), out.data_ptr(), n))
        cols = torch.arange(n) % threads
        expected = torch.zeros(blocks, threads).index_add_(1, cols, x)
        assert torch.equal(part, expected) and torch.equal(out, x.sum(1)), (blocks, threads)
    with pytest.raises(AssertionError, match="every thread left waits at a barrier that cannot open"):
        launch(x.device, "fibers.cu", "stuck", (2, 1, 1), 64, "P", (out.data_ptr(),))


def test_a_cp_async_copy_lands_at_its_wait() -> None:
    """cp.async as on a GPU: the destination holds the data only once the thread waits
    for the copy's group (before that it reads NaN, the emulation's poison), and a thread
    that returns with a copy in flight fails the launch."""
    source = ('extern "C" __global__ void copy(const float* src, float* out, int wait) {\n'
              "    __shared__ __align__(16) float s[4 * 32];\n"
              "    cp_async16(s + 4 * threadIdx.x, src + 4 * threadIdx.x, true);\n"
              "    cp_async_commit();\n"
              "    if (wait) cp_async_wait<0>();\n"
              "    out[threadIdx.x] = s[4 * threadIdx.x];\n"
              "}\n")
    launch = _source_launcher("copy.cu", source)
    src, out = torch.arange(128, dtype=torch.float32), torch.zeros(32)
    args = (src.data_ptr(), out.data_ptr())
    launch(out.device, "copy.cu", "copy", (1, 1, 1), 32, "PPi", (*args, 1))
    assert torch.equal(out, src[::4])
    with pytest.raises(AssertionError, match="returned with a cp.async copy it never waited for"):
        launch(out.device, "copy.cu", "copy", (1, 1, 1), 32, "PPi", (*args, 0))
    assert bool(out.isnan().all())  # read before the copy landed


def test_a_misaligned_16_byte_copy_fails_the_launch(emulated: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher picks 16-byte copies only for aligned operands (_tc_vec_ok): were it
    wrong, a GPU would fault on the misaligned address and lose the CUDA context. The
    emulation reports the address instead (negative control: the predicate always true)."""
    x = rand((9, 66), torch.bfloat16, 91)
    a, w = x[:, 1:65], rand((40, 64), torch.bfloat16, 92)  # a starts 2 bytes into its buffer
    cuda_backend.matmul(a, w.t(), None)  # element loads: fine
    monkeypatch.setattr(cuda_backend, "_tc_vec_ok", lambda *args: True)
    with pytest.raises(KernelLaunchError, match="not 16-byte aligned"):
        cuda_backend.matmul(a, w.t(), None)


def _runtime(kind: str) -> str | None:
    """The sanitizer runtime to preload for ``kind`` ("address" or "thread"), if g++ has it."""
    if CXX is None:
        return None
    lib = {"address": "libasan.so", "thread": "libtsan.so"}[kind]
    path = subprocess.run([CXX, f"-print-file-name={lib}"], capture_output=True, text=True, check=False).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _needs(kind: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(bool(SANITIZE) or _runtime(kind) is None,
                              reason=f"needs g++'s {kind} sanitizer runtime (and is not run inside a sanitized run)")


# AddressSanitizer: every kernel and load path once, float32 and bfloat16 (float16 shares
# bfloat16's code), every matmul tile configuration (wgmma included, through the tile
# test); not the drawn-shape tests, the wgmma pipeline test or the tensor-core attention's
# sliding-window and float16 tests, which repeat the same paths (a stage index past the
# ring would also give wrong bits there), nor the whole model (the same kernels again,
# minutes under the sanitizer), nor the probes that must fail it (test_mutation_*).
ADDRESS_SELECTION = ("not drawn_shapes and not dtype2 and not (row_ops_batch_invariant and dtype0) and not mutation "
                     "and not wgmma_pipeline and not through_the_cuda_backend and not reads_no_value "
                     "and not other_anchors and not (tensor_core_attention_masked and dtype1) and not probe_")
# ThreadSanitizer (slower): each kernel that shares memory between threads once - the
# tensor-core pipeline in every tile configuration, the wgmma pipeline through its stage
# rotation (float16: one configuration), the CUDA-core GEMM, the block reductions of the
# row ops, the attention kernels (the split one's rows staged for a CTA and read per
# warp; the tensor-core one's two stages and keep bits), the grouped GEMM (CTAs that
# return before any barrier).
THREAD_SELECTION = ("(tensor_core and dtype0) or (every_tile and bfloat16) or (row_ops_batch_invariant and dtype1) "
                    "or (split_attention_values and bool) or attention_invariance or (wgmma_pipeline and dtype1) "
                    "or (staged_rows and dtype1) "
                    "or (grouped_matmul_rows and kmajor-False-dtype1)")


# AddressSanitizer's notice at its first swapcontext (runtime.cpp's switch on hosts other
# than x86-64); runtime.cpp tells it of every switch (__sanitizer_start_switch_fiber), which
# is what the notice asks for.
_ASAN_FIBER_NOTE = re.compile(r"^==\d+==WARNING: ASan doesn't fully support makecontext/swapcontext functions and "
                              r"may produce false positives in some cases!\n?", re.MULTILINE)


class _SanitizedRun:
    """The tests of this file selected by ``select``, in a process under ``kind``
    ("address": AddressSanitizer + UBSan, "thread": ThreadSanitizer), started at once at
    the lowest CPU priority."""

    def __init__(self, tmp_path: Path, kind: str, select: str, kernels_dir: Path | None = None) -> None:
        self.kind = kind
        self.logs = tmp_path / f"{kind}-logs"
        self.logs.mkdir()
        env = {**os.environ, "DETKIT_EMU_SANITIZE": kind, "LD_PRELOAD": str(_runtime(kind))}
        if kind == "address":
            env.update({"ASAN_OPTIONS": f"detect_leaks=0:log_path={self.logs / 'asan'}",
                        "UBSAN_OPTIONS": f"print_stacktrace=1:log_path={self.logs / 'ubsan'}"})
        else:
            # torch's OpenMP and numba's workers are not instrumented: ThreadSanitizer would
            # not see their synchronisation and report races inside torch.
            env.update({"TSAN_OPTIONS": f"log_path={self.logs / 'tsan'}", "OMP_NUM_THREADS": "1",
                        "NUMBA_NUM_THREADS": "1"})
        if kernels_dir is not None:  # one test of one file: build only what it launches
            env.update({cuda_loader.ENV_KERNEL_DIR: str(kernels_dir), "DETKIT_EMU_PREBUILD": "0"})
        self.proc = subprocess.Popen([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                                      "-k", select], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        with contextlib.suppress(OSError):  # the threads it starts inherit the priority of its main thread
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)

    def result(self) -> tuple[int, str, str]:
        """(exit code, pytest's output, the sanitizer reports), once the process ended."""
        try:
            output, _ = self.proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        logs = (_ASAN_FIBER_NOTE.sub("", f.read_text(errors="replace")) for f in sorted(self.logs.iterdir()))
        reports = "\n".join(text[:6000] for text in logs if text.strip())
        return self.proc.returncode, output, reports


# The barrier between the warps' partial results and their reduction, dropped.
_NO_BARRIER = ("    if (lane == 0) scratch[warp] = v;\n    __syncthreads();\n", "    if (lane == 0) scratch[warp] = v;\n")

# The warp barrier between one key block's readers of `sk` and the next block's writers,
# dropped. With D <= 64 (one block per score) the only thing between them is the next
# chunk's __ballot_sync, which on a GPU orders no memory access (only __syncwarp does).
_NO_SYNCWARP = ("                __syncwarp();  // the previous block's readers are done with sk\n", "")


# The sanitized runs take minutes of CPU: tests/conftest.py starts each run that a collected
# test reads as soon as the tests are collected, at the lowest CPU priority, so that they use
# what the rest of the suite leaves idle, and moves the tests that read them to the end.
# name: (sanitizer, the tests of this file it runs, (kernel file, mutation) or None). Each
# mutation run is a build of the mutated file and one test, with the bug the sanitizer must find.
_RUNS: dict[str, tuple[str, str, tuple[str, tuple[str, str]] | None]] = {
    "address": ("address", ADDRESS_SELECTION, None),
    "thread": ("thread", THREAD_SELECTION, None),
    "overread": ("address", "test_portable_row_ops_equal_spec and 517 and dtype0", ("rowops.cu", _OVERREAD)),
    "local array": ("address", "probe_a_local_array", None),
    "no barrier": ("thread", "row_ops_batch_invariant and False-dtype1", ("common.cuh", _NO_BARRIER)),
    "no syncwarp": ("thread", "attention_invariance and True", ("attention.cu", _NO_SYNCWARP)),
}
# test: the run whose result it reads
SANITIZED_TESTS = {
    "test_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers": "address",
    "test_kernels_have_no_data_race_under_the_thread_sanitizer": "thread",
    "test_mutation_read_past_the_tensor_is_caught_by_the_address_sanitizer": "overread",
    "test_mutation_a_local_array_read_past_its_end_after_barriers_is_caught_by_the_address_sanitizer": "local array",
    "test_mutation_missing_barrier_is_caught_by_the_thread_sanitizer": "no barrier",
    "test_mutation_a_shuffle_in_place_of_a_syncwarp_is_caught_by_the_thread_sanitizer": "no syncwarp",
}
_background: dict[str, _SanitizedRun] = {}


def start_sanitized_runs(names: Iterable[str]) -> None:
    """Start each run of ``names`` (keys of _RUNS) that can run here, unless started."""
    for name in names:
        kind, select, mutation = _RUNS[name]
        if name not in _background and not SANITIZE and _runtime(kind) is not None:
            tmp = Path(tempfile.mkdtemp(prefix=f"detkit-emu-{name.replace(' ', '-')}-"))
            kernels = None if mutation is None else _mutated_kernels(tmp, *mutation)
            _background[name] = _SanitizedRun(tmp, kind, select, kernels)


def stop_sanitized_runs() -> None:
    """End the sanitized runs (killed if the session ended before their tests) and remove their files."""
    for run in _background.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.communicate()
        shutil.rmtree(run.logs.parent, ignore_errors=True)
    _background.clear()


def _sanitized_result(name: str) -> tuple[int, str, str]:
    start_sanitized_runs([name])  # only if the session hooks did not start it
    return _background[name].result()


def _assert_clean(kind: str, rc: int, output: str, reports: str, fault: str) -> None:
    assert rc == 0 and not reports, (
        f"the kernels under the {kind} sanitizer failed (exit code {rc}); on a GPU this is {fault}. "
        f"Sanitizer reports:\n{reports or '(none)'}\npytest:\n{output[-4000:]}")
    assert " passed" in output and "failed" not in output, output[-2000:]


def _mutated_kernels(tmp_path: Path, name: str, mutation: tuple[str, str]) -> Path:
    """A copy of the kernel directory with ``mutation`` applied to file ``name``."""
    kernels = tmp_path / "kernels"
    shutil.copytree(cuda_loader.kernel_dir(), kernels)
    (kernels / name).write_text(_mutated(name, (kernels / name).read_text(), mutation))
    return kernels


@_needs("address")
def test_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers() -> None:
    """No out-of-bounds access of a tensor, a shared array or the dynamic shared memory
    (sized by the launch), and no undefined integer arithmetic, in any kernel. Every
    test of this file: DETKIT_EMU_SANITIZE=address LD_PRELOAD=$(g++ -print-file-name=libasan.so)
    ASAN_OPTIONS=detect_leaks=0 pytest tests/test_cuda_emulated.py"""
    rc, output, reports = _sanitized_result("address")
    _assert_clean("address", rc, output, reports, "an illegal address or undefined behaviour")


@_needs("thread")
def test_kernels_have_no_data_race_under_the_thread_sanitizer() -> None:
    """No two threads touch the same shared or global memory without a barrier between
    them (a missing __syncthreads: on a GPU, results that change from run to run)."""
    rc, output, reports = _sanitized_result("thread")
    _assert_clean("thread", rc, output, reports, "a data race: results that can change from run to run")


@_needs("address")
def test_mutation_read_past_the_tensor_is_caught_by_the_address_sanitizer() -> None:
    rc, output, reports = _sanitized_result("overread")
    assert rc != 0, f"the sanitized run passed with a read past the tensor:\n{output[-2000:]}"
    assert "heap-buffer-overflow" in reports and "rowops.cu:" in reports, reports[:3000] or output[-3000:]


@pytest.mark.skipif(SANITIZE != "address", reason="runs inside the AddressSanitizer process the next test starts")
def test_probe_a_local_array_read_past_its_end_after_barriers() -> None:
    source = ('extern "C" __global__ void over(float* p, int i) {\n'
              '    float a[8];\n'
              '    for (int k = 0; k < 8; ++k) a[k] = p[k];\n'
              '    __syncthreads();\n'
              '    __syncthreads();\n'
              '    float* volatile q = a;  // hides the bound from UBSan: the redzone must catch it\n'
              '    p[threadIdx.x] = q[i];\n'
              '}\n')
    launch = _source_launcher("over.cu", source)
    out = torch.zeros(64)
    launch(out.device, "over.cu", "over", (2, 1, 1), 64, "Pi", (out.data_ptr(), 9))


@_needs("address")
def test_mutation_a_local_array_read_past_its_end_after_barriers_is_caught_by_the_address_sanitizer() -> None:
    """A kernel's own frame keeps its redzones while its fiber waits at barriers. A switch
    through swapcontext (runtime.cpp's on hosts other than x86-64) must not leave the stack
    in the context, or AddressSanitizer's interceptor would unpoison the fiber's whole stack
    at every switch and this read of a local array past its end would pass."""
    rc, output, reports = _sanitized_result("local array")
    assert rc != 0 and "stack-buffer-overflow" in reports, reports[:3000] or output[-3000:]
    assert re.search(r"#0 \S+ in over \S+:7\n", reports), reports[:3000]  # the read, in the kernel


@_needs("thread")
def test_mutation_missing_barrier_is_caught_by_the_thread_sanitizer() -> None:
    rc, output, reports = _sanitized_result("no barrier")
    assert rc != 0 and "ThreadSanitizer: data race" in reports, reports[:3000] or output[-3000:]
    # the race is on the reduction's scratch: named by its line in common.cuh, or (when the
    # symbolizer gives no line for the inlined frame) by the variable
    assert "common.cuh:" in reports or "::scratch'" in reports, reports[:3000]


@_needs("thread")
def test_mutation_a_shuffle_in_place_of_a_syncwarp_is_caught_by_the_thread_sanitizer() -> None:
    """Warp collectives synchronise the emulation's lanes but must not count as ordering
    shared memory for ThreadSanitizer (emu.h's EmuUnordered), or a race a GPU has passes."""
    rc, output, reports = _sanitized_result("no syncwarp")
    assert "ThreadSanitizer: data race" in reports and "attention" in reports, reports[:3000] or output[-3000:]


# Tensor methods that hand a value to the host: on a CUDA tensor each waits for the GPU to
# finish all queued work, and fails a CUDA graph capture.
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "__array__")


def _record_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every host read of a tensor's values made by detkit's own code (its innermost detkit
    frame: "file:line function (method)"), while the monkeypatch holds; reads in the CPU
    kernels' files are left out (they do not run on a GPU)."""
    import traceback

    package = str(Path(cuda_backend.__file__).parent.parent)
    cpu_only = ("cpu.py", "_cpu_", "portable_cpu")
    reads: list[str] = []
    for name in _HOST_READS:
        method = getattr(torch.Tensor, name)

        def wrapped(self: torch.Tensor, *args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            for frame in reversed(traceback.extract_stack(limit=16)[:-1]):
                if frame.filename.startswith(package) and not any(c in frame.filename for c in cpu_only):
                    reads.append(f"{Path(frame.filename).name}:{frame.lineno} {frame.name} ({_name})")
                    break
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return reads


# Where the mode reads values on the host by design (docs/mode.md, "Host reads on CUDA"):
# eager attention's batched products find their rows' leading zeros; an MoE router's
# histc checks that the expert ids are integers. Mixtral's grouped_matmul line is the
# front end checking offsets held on the CPU, as every tensor here is: on a GPU they are
# CUDA tensors the mode does not read (check_offsets=False), which tests/test_cuda_gpu.py's
# test_grouped_matmul_under_the_mode_never_waits_for_the_gpu checks with torch's sync
# debug mode.
_HOST_READS_BY_DESIGN = {"eager": {"_leading_zero_starts", "_matmul"}, "mixtral": {"histc_inexact_reason",
                                                                                   "grouped_matmul"}}


@pytest.mark.parametrize(("family", "attn"), [("llama", "sdpa"), ("gpt2", "sdpa"), ("mixtral", "sdpa"),
                                              ("llama", "eager")])
def test_the_mode_on_cuda_reads_no_value_on_the_host_but_where_documented(
    emulated: dict, monkeypatch: pytest.MonkeyPatch, family: str, attn: str
) -> None:
    """Greedy generate of a left-padded batch (prefill and a decode step) under the mode,
    through the CUDA backend: detkit's code (adapters, front end, launchers) reads no
    tensor's values on the host (on a GPU each read waits for all queued work, and breaks a
    CUDA graph capture), except where documented: eager attention's padded batched
    products and an MoE router's histc."""
    pytest.importorskip("transformers")
    import detkit
    import portable_reference as ref

    _cpu_tensors_take_the_cuda_backend(monkeypatch)
    model = (_tiny_mixtral() if family == "mixtral" else ref.build_model(attn, family)).to(torch.bfloat16).eval()
    enc = ref.inputs()
    with monkeypatch.context() as mp, detkit.batch_invariant() as bi, torch.no_grad():
        reads = _record_host_reads(mp)
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert bi.uncovered() == {}, bi.coverage()
    allowed = _HOST_READS_BY_DESIGN.get(attn, set()) | _HOST_READS_BY_DESIGN.get(family, set())
    sites = {r.split(" (")[0].split(" ", 1)[1] for r in reads}
    assert sites <= allowed, sorted(set(reads))
    if allowed:  # the recorder sees the documented reads, so an empty list above means none
        assert reads, "no host read recorded where the documentation says there are some"
