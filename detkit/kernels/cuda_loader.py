"""The one loader for detkit's CUDA source (``cuda_kernels/*.cu``).

It finds the ``.cu`` files (from a source checkout or an installed wheel), builds one
translation unit per file (``common.cuh`` first), each part preceded by a ``#line``
directive so that compiler messages point into the real file and line, and compiles it
with :data:`COMPILE_OPTIONS`, which never change numerics behind the reader's back:

* no ``--use_fast_math``; ``--ftz=false``, ``--prec-div=true``, ``--prec-sqrt=true``;
* ``--fmad=false``: the compiler never contracts ``a * b + c`` into an FMA on its own;
  every FMA in the kernels is written out (``fmaf`` / ``__fmaf_rn``), so the source text
  alone fixes the rounding steps.

We compile with NVRTC ourselves rather than through ``cupy.RawModule(code=...)``
because CuPy appends ``-ftz=true`` to every NVRTC compilation, which would flush
subnormals to zero. CuPy is used only to load the CUBIN and launch.

Without a GPU, :func:`check_all` compiles every file to CUBIN for given architectures
(sm_80 and sm_90 by default) with NVRTC (CuPy's bindings when CuPy is installed, else
the ``libnvrtc`` shared library from the ``nvidia-cuda-nvrtc-cu12`` wheel or a CUDA
toolkit) or ``nvcc``, and reads ptxas's report of each kernel's registers and spills
(:mod:`detkit.kernels.cuda_resources`); that is what CI runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from detkit.errors import BackendUnavailable, CompileError, InputError
from detkit.kernels.cuda_resources import KernelResources, cubin_entries, parse_ptxas_report, ptxas_notes

KERNEL_FILES: tuple[str, ...] = ("matmul.cu", "rowops.cu", "attention.cu", "solve.cu", "matmul_tiles.cu",
                                 "matmul_sm90.cu")
# The source files of each unit after common.cuh, in order (default: the file alone).
# matmul_tiles.cu only instantiates more configurations of matmul.cu's templates;
# matmul_sm90.cu uses matmul.cu's cp.async helpers. matmul.cu's own configurations are
# compiled in its unit only (translation_unit).
KERNEL_UNITS: dict[str, tuple[str, ...]] = {"matmul_tiles.cu": ("matmul.cu", "matmul_tiles.cu"),
                                            "matmul_sm90.cu": ("matmul.cu", "matmul_sm90.cu")}
# Units built only for some GPU architectures, and the target each is compiled for there
# (default: every architecture, for itself). wgmma exists only in sm_90a, the
# architecture-specific feature set of sm_90, whose code runs on sm_90 GPUs alone.
UNIT_ARCHS: dict[str, dict[str, str]] = {"matmul_sm90.cu": {"sm_90": "sm_90a", "sm_90a": "sm_90a"}}
COMMON_HEADER = "common.cuh"
DEFAULT_CHECK_ARCHS: tuple[str, ...] = ("sm_80", "sm_90")

# The options every kernel is compiled with (the architecture is added per target).
COMPILE_OPTIONS: tuple[str, ...] = (
    "--std=c++17",
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--fmad=false",
    "-lineinfo",
)
# Options that would change numerics; rejected if ever added.
_FORBIDDEN_OPTIONS = ("--use_fast_math", "-use_fast_math", "--ftz=true", "-ftz=true", "--fmad=true")

ENV_KERNEL_DIR = "DETKIT_CUDA_KERNELS_DIR"
ENV_NVRTC_LIB = "DETKIT_NVRTC_LIB"
ENV_COMPILER = "DETKIT_CUDA_COMPILER"  # "nvrtc" or "nvcc": force one compiler

_ARCH_RE = re.compile(r"^sm_(\d{2,3})[a-z]?$")


# --------------------------------------------------------------------------- sources


def kernel_dir() -> Path:
    """The directory holding ``common.cuh`` and the ``.cu`` files.

    ``$DETKIT_CUDA_KERNELS_DIR`` when set (an ``InputError`` if it lacks a file), else
    ``detkit/cuda_kernels`` inside the installed package (wheel), else ``cuda_kernels/``
    next to the ``detkit`` package (source checkout or editable install).
    """
    import detkit

    pkg = Path(detkit.__file__).resolve().parent
    env = os.environ.get(ENV_KERNEL_DIR)
    if env:
        # Asked for by name: compiling the packaged sources instead would test other code
        # than the user pointed at, without a word.
        missing = [f for f in (COMMON_HEADER, *KERNEL_FILES) if not (Path(env) / f).is_file()]
        if missing:
            raise InputError(f"${ENV_KERNEL_DIR}={env} lacks {', '.join(missing)}; point it at a cuda_kernels "
                             "directory, or unset it to use the sources installed with detkit")
        return Path(env).resolve()
    candidates = [pkg / "cuda_kernels", pkg.parent / "cuda_kernels"]
    for cand in candidates:
        if (cand / COMMON_HEADER).is_file() and all((cand / f).is_file() for f in KERNEL_FILES):
            return cand.resolve()  # through the detkit/cuda_kernels symlink of a checkout
    raise BackendUnavailable(
        "detkit's CUDA sources (cuda_kernels/*.cu) were not found; looked in "
        + ", ".join(str(c) for c in candidates)
        + f". Reinstall detkit, or point ${ENV_KERNEL_DIR} at the cuda_kernels directory."
    )


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def translation_unit(source: str, filename: str, *, header: str | None = None,
                     header_name: str | None = None,
                     before: tuple[tuple[str, str], ...] = ()) -> str:
    """One compilable unit: the common header, the ``before`` parts ((source, filename)
    pairs), then ``source``, each under a ``#line``.

    ``#line 1 "file"`` makes NVRTC and nvcc report errors as ``file(line)`` of the real
    file rather than of the concatenated string. The ``before`` parts are there for their
    templates: ``DETKIT_TEMPLATES_ONLY`` is defined around them, and they leave out their
    own entry points (compiled in their own units), which would double the compile time.
    """
    if header is None:
        hpath = kernel_dir() / COMMON_HEADER
        header, header_name = _read(hpath), str(hpath)
    return "".join([
        f'#line 1 "{header_name}"\n{header}\n',
        *(f'#define DETKIT_TEMPLATES_ONLY\n#line 1 "{fname}"\n{text}\n#undef DETKIT_TEMPLATES_ONLY\n'
          for text, fname in before),
        f'#line 1 "{filename}"\n{source}\n',
    ])


def kernel_source(name: str) -> str:
    """The translation unit for one of :data:`KERNEL_FILES`."""
    if name not in KERNEL_FILES:
        raise ValueError(f"unknown CUDA kernel file {name!r}; expected one of {KERNEL_FILES}")
    d = kernel_dir()
    *first, last = KERNEL_UNITS.get(name, (name,))
    before = tuple((_read(d / f), str(d / f)) for f in first)
    return translation_unit(_read(d / last), str(d / last), before=before)


def sources_digest() -> dict[str, str]:
    """sha256 (first 16 hex digits) of each source file, for reports and cache keys."""
    d = kernel_dir()
    return {
        f: hashlib.sha256((d / f).read_bytes()).hexdigest()[:16]
        for f in (COMMON_HEADER, *KERNEL_FILES)
    }


def build_arch(name: str, arch: str) -> str | None:
    """The target kernel file ``name`` is compiled for on a GPU of ``arch`` (``sm_XY``), or
    None when the file is not built for that architecture (:data:`UNIT_ARCHS`)."""
    only = UNIT_ARCHS.get(name)
    if only is None:
        return arch
    return only.get(arch)


def _check_arch(arch: str) -> str:
    match = _ARCH_RE.match(arch)
    if not match:
        raise InputError(f"architecture {arch!r} is not of the form sm_XY (e.g. sm_80, sm_90)")
    if int(match.group(1)) < 80:  # as cuda.py refuses such a GPU: bf16 MMA, cp.async
        raise InputError(f"architecture {arch}: detkit's kernels need sm_80 or newer (e.g. sm_80, sm_90)")
    return arch


def _options(arch: str) -> list[str]:
    opts = [*COMPILE_OPTIONS, f"--gpu-architecture={_check_arch(arch)}"]
    bad = [o for o in opts if o in _FORBIDDEN_OPTIONS]
    if bad:  # pragma: no cover - guards against a future edit of COMPILE_OPTIONS
        raise ValueError(f"compile options {bad} change numerics and are not allowed")
    return opts


# --------------------------------------------------------------------------- NVRTC


class _Nvrtc:
    """Minimal NVRTC wrapper: CuPy's low-level bindings, else ctypes on libnvrtc."""

    def __init__(self) -> None:
        self.kind, self.version, self.where = "", (0, 0), ""
        self._cupy: Any = None
        self._lib: Any = None
        try:
            from cupy_backends.cuda.libs import nvrtc as cupy_nvrtc  # type: ignore[import-not-found]

            self.version = tuple(cupy_nvrtc.getVersion())  # type: ignore[assignment]
            self._cupy, self.kind, self.where = cupy_nvrtc, "nvrtc (cupy bindings)", "cupy"
            return
        except Exception:  # noqa: BLE001 - CuPy missing or its NVRTC unloadable: try ctypes
            pass
        lib, where = _load_libnvrtc()
        self._lib, self.where, self.kind = lib, where, "nvrtc (ctypes)"
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = (major.value, minor.value)

    def compile(self, source: str, name: str, options: list[str], output: str) -> tuple[bytes, str, bytes | None]:
        """(output, compiler log, PTX): the log holds ptxas's report when asked for one; a
        CUBIN compilation gives its PTX too (made on the way), None for a PTX one."""
        if self._cupy is not None:
            return self._compile_cupy(source, name, options, output)
        return self._compile_ctypes(source, name, options, output)

    def _compile_cupy(self, source: str, name: str, options: list[str],
                      output: str) -> tuple[bytes, str, bytes | None]:
        n = self._cupy
        prog = n.createProgram(source, name, [], [])
        try:
            try:
                n.compileProgram(prog, options)
            except n.NVRTCError as err:
                raise CompileError(_compile_message(name, options, n.getProgramLog(prog), str(err))) from None
            if output == "ptx":
                return bytes(n.getPTX(prog)), n.getProgramLog(prog), None
            try:
                ptx: bytes | None = bytes(n.getPTX(prog))
            except n.NVRTCError:  # a byproduct: an NVRTC that keeps none costs a PTX compilation later
                ptx = None
            return bytes(n.getCUBIN(prog)), n.getProgramLog(prog), ptx
        finally:
            n.destroyProgram(prog)

    def _compile_ctypes(self, source: str, name: str, options: list[str],
                        output: str) -> tuple[bytes, str, bytes | None]:
        lib = self._lib
        prog = ctypes.c_void_p()
        self._ok(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log_buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log_buf)
            log = log_buf.value.decode(errors="replace")
            if rc != 0:
                raise CompileError(_compile_message(name, options, log, self._err(rc)))
            if output == "ptx":
                return self._get(prog, lib.nvrtcGetPTXSize, lib.nvrtcGetPTX), log, None
            try:
                ptx: bytes | None = self._get(prog, lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
            except CompileError:  # a byproduct: an NVRTC that keeps none costs a PTX compilation later
                ptx = None
            return self._get(prog, lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN), log, ptx
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def _get(self, prog: ctypes.c_void_p, get_size: Any, get: Any) -> bytes:
        size = ctypes.c_size_t()
        self._ok(get_size(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        self._ok(get(prog, buf))
        return buf.raw

    def _err(self, rc: int) -> str:
        self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return f"{self._lib.nvrtcGetErrorString(rc).decode()} ({rc})"

    def _ok(self, rc: int) -> None:
        if rc != 0:
            raise CompileError(f"NVRTC call failed: {self._err(rc)}")


def _load_libnvrtc() -> tuple[Any, str]:
    """Find libnvrtc: $DETKIT_NVRTC_LIB, the nvidia-cuda-nvrtc wheels, a CUDA toolkit."""
    cands: list[str] = []
    if os.environ.get(ENV_NVRTC_LIB):
        cands.append(os.environ[ENV_NVRTC_LIB])
    try:
        import nvidia  # type: ignore[import-not-found]  # namespace package of the NVIDIA wheels

        for root in list(nvidia.__path__):
            cands += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*[0-9]")), reverse=True)
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    found = ctypes.util.find_library("nvrtc")
    if found:
        cands.append(found)
    cands += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    errors = []
    for cand in cands:
        if "builtins" in os.path.basename(cand) or ".alt." in os.path.basename(cand):
            continue
        try:
            return ctypes.CDLL(cand), cand
        except OSError as err:
            errors.append(f"{cand}: {err}")
    raise BackendUnavailable(
        "NVRTC (libnvrtc) was not found. Install it with `pip install nvidia-cuda-nvrtc-cu12` (CUDA 12; "
        "part of detkit's `test` and `cuda12` extras) or `pip install 'nvidia-cuda-nvrtc>=13,<14'` (CUDA 13; "
        f"the `cuda13` extra), or set ${ENV_NVRTC_LIB} to the library path."
    )


_nvrtc_singleton: _Nvrtc | None = None
_nvrtc_lock = threading.Lock()


def _nvrtc() -> _Nvrtc:
    global _nvrtc_singleton
    with _nvrtc_lock:
        if _nvrtc_singleton is None:
            _nvrtc_singleton = _Nvrtc()
        return _nvrtc_singleton


def _compile_message(name: str, options: list[str], log: str, status: str) -> str:
    return (
        f"CUDA compilation of {name} failed ({status}) with options {' '.join(options)}:\n"
        + log.strip()
    )


# --------------------------------------------------------------------------- nvcc


def find_nvcc() -> str | None:
    """Path of nvcc on PATH or in $CUDA_HOME / /usr/local/cuda, or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _compile_nvcc(source: str, name: str, options: list[str], output: str) -> tuple[bytes, str, bytes | None]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BackendUnavailable("nvcc was not found on PATH, in $CUDA_HOME or /usr/local/cuda.")
    with tempfile.TemporaryDirectory(prefix="detkit-nvcc-") as tmp:
        src = Path(tmp) / (Path(name).stem + ".cu")
        out = Path(tmp) / ("out." + output)
        src.write_text(source, encoding="utf-8")
        cmd = [nvcc, f"--{output}", *options, "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CompileError(_compile_message(name, options, proc.stdout + proc.stderr,
                                                f"nvcc exit {proc.returncode}"))
        return out.read_bytes(), proc.stdout + proc.stderr, None  # its PTX was a temporary file


# --------------------------------------------------------------------------- compile API


def available_compilers() -> list[str]:
    """The compilers usable here, best first: "nvrtc", "nvcc"."""
    found = []
    try:
        _nvrtc()
        found.append("nvrtc")
    except BackendUnavailable:
        pass
    if find_nvcc() is not None:
        found.append("nvcc")
    return found


def _pick_compiler(compiler: str | None) -> str:
    compiler = compiler or os.environ.get(ENV_COMPILER) or None
    if compiler is not None:
        if compiler not in ("nvrtc", "nvcc"):
            raise InputError(f"compiler must be 'nvrtc' or 'nvcc', got {compiler!r}")
        # Asked for by name (--compiler, $DETKIT_CUDA_COMPILER): a missing nvcc is an
        # environment error to report, not something _describe may assume away.
        if compiler == "nvcc" and find_nvcc() is None:
            raise BackendUnavailable(
                f"nvcc was asked for (--compiler nvcc or ${ENV_COMPILER}) but was not found on PATH, in "
                "$CUDA_HOME or /usr/local/cuda; install the CUDA toolkit or use NVRTC (--compiler nvrtc)."
            )
        return compiler
    avail = available_compilers()
    if not avail:
        raise BackendUnavailable(
            "no CUDA compiler found: neither NVRTC (`pip install nvidia-cuda-nvrtc-cu12`) nor nvcc "
            "(CUDA toolkit) is available, so detkit's CUDA kernels cannot be compiled here."
        )
    return avail[0]


# ptxas reports each kernel's registers, stack frame, spills and shared memory; a report,
# not a code change, so it is added to CUBIN compilations outside COMPILE_OPTIONS.
PTXAS_REPORT_OPTION = "--ptxas-options=-v"


def compile_source(source: str, name: str, arch: str, *, output: str = "cubin",
                   compiler: str | None = None) -> bytes:
    """Compile a translation unit to CUBIN or PTX for ``arch``; raise CompileError with the log.

    Outputs are cached in the process and on disk (:func:`cache_dir`), keyed by everything
    that decides them: source, options, architecture, output kind and compiler version.
    Failures are never cached."""
    return _compile(source, name, arch, output, compiler)[0]


def ptxas_report(source: str, name: str, arch: str, *, compiler: str | None = None) -> str:
    """ptxas's ``-v`` report of the unit's CUBIN (compiled, or read from the cache, with it):
    :func:`detkit.kernels.cuda_resources.parse_ptxas_report` reads it."""
    return _compile(source, name, arch, "cubin", compiler)[1]


def _compile(source: str, name: str, arch: str, output: str, compiler: str | None) -> tuple[bytes, str]:
    """(output, ptxas report: empty for PTX), from the caches or compiled."""
    if output not in ("cubin", "ptx"):
        raise InputError(f"output must be 'cubin' or 'ptx', got {output!r}")
    which = _pick_compiler(compiler)
    key, path = _cache_entry(source, name, arch, output, which)
    with _compiled_lock:
        hit = _compiled.get(key)
    if hit is not None:
        return hit
    try:
        got = _unpack(zlib.decompress(path.read_bytes()), output)
        with contextlib.suppress(OSError):
            os.utime(path)  # last use, for pruning least recently used entries first
    except (OSError, zlib.error, ValueError):
        limit = cache_limit_bytes()  # a bad $DETKIT_CUDA_CACHE_MAX_MB says so before a long compile, not after
        out, log, ptx = _run_compiler(which, source, name, _output_options(arch, output), output)
        got = (out, log)
        stored = _store(path, _pack(out, log, output))
        if ptx is not None:
            # NVRTC made the PTX on the way to the CUBIN (the report option is ptxas's, so
            # it is the PTX a PTX compilation gives): kept, not compiled again
            ptx_key, ptx_path = _cache_entry(source, name, arch, "ptx", which)
            if stored and not ptx_path.exists() and _store(ptx_path, ptx):
                with contextlib.suppress(OSError):  # older than the CUBIN: pruning keeps the CUBIN
                    t = path.stat().st_mtime - 1
                    os.utime(ptx_path, (t, t))
            with _compiled_lock:
                _compiled.setdefault(ptx_key, (ptx, ""))
        if stored:
            prune_cache(limit)
    with _compiled_lock:
        _compiled[key] = got
    return got


def _cache_entry(source: str, name: str, arch: str, output: str,
                 which: str) -> tuple[tuple[str, str, str, str, str], Path]:
    """The in-process cache's key and the disk cache's file of one compilation."""
    key = (hashlib.sha256(source.encode()).hexdigest(), name, arch, output, which)
    key_text = "\n".join([source, *_output_options(arch, output), output, _describe(which)])
    # zlib-compressed: PTX is text of 1-13 MB per unit (a tenth of that compressed); a
    # CUBIN entry holds the length of ptxas's report, the report, then the CUBIN.
    suffix = "ptx.z" if output == "ptx" else "cubin.z"
    return key, cache_dir() / f"{Path(name).stem}-{arch}-{hashlib.sha256(key_text.encode()).hexdigest()[:32]}.{suffix}"


def _output_options(arch: str, output: str) -> list[str]:
    return _options(arch) + ([PTXAS_REPORT_OPTION] if output == "cubin" else [])


def _store(path: Path, data: bytes) -> bool:
    """Write a disk cache entry; False if it could not be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(zlib.compress(data, 6))
        os.replace(tmp, path)  # atomic: concurrent processes never see a partial file
    except OSError:
        return False  # a read-only home only costs a recompilation next time
    return True


def _run_compiler(which: str, source: str, name: str, options: list[str],
                  output: str) -> tuple[bytes, str, bytes | None]:
    def run(opts: list[str]) -> tuple[bytes, str, bytes | None]:
        return _nvrtc().compile(source, name, opts, output) if which == "nvrtc" else _compile_nvcc(
            source, name, opts, output)

    if PTXAS_REPORT_OPTION not in options:
        out, _log, ptx = run(options)
        return out, "", ptx
    try:
        return run(options)
    except CompileError as err:
        # A compiler that does not take the report option still builds the kernels: the
        # check then says the report is missing rather than failing every compilation.
        if "INVALID_OPTION" not in str(err).upper().replace(" ", "_"):
            raise
        out, _log, ptx = run([o for o in options if o != PTXAS_REPORT_OPTION])
        return out, "", ptx


def _pack(out: bytes, log: str, output: str) -> bytes:
    if output == "ptx":
        return out
    report = log.encode()
    return len(report).to_bytes(8, "little") + report + out


def _unpack(data: bytes, output: str) -> tuple[bytes, str]:
    if output == "ptx":
        return data, ""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 + n:
        raise ValueError("truncated cache entry")
    return data[8 + n:], data[8:8 + n].decode(errors="replace")


# In-process cache of compiler outputs and ptxas reports: (source sha256, name, arch, output, compiler).
_compiled: dict[tuple[str, str, str, str, str], tuple[bytes, str]] = {}
_compiled_lock = threading.Lock()


def compiler_description(compiler: str | None = None) -> str:
    """Which compiler (and version, library path) compiles for ``compiler`` (None: auto)."""
    which = _pick_compiler(compiler)
    return _describe(which)


@functools.cache
def _describe(which: str) -> str:
    if which == "nvrtc":
        n = _nvrtc()
        return f"NVRTC {n.version[0]}.{n.version[1]} via {n.kind.split('(')[1].rstrip(')')} [{n.where}]"
    nvcc = find_nvcc()
    assert nvcc is not None  # _pick_compiler checked it
    return f"nvcc {nvcc_version(nvcc)} [{nvcc}]"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of compiling one kernel file for one architecture."""

    file: str
    arch: str
    compiler: str
    ok: bool
    seconds: float
    entries: tuple[str, ...] = ()
    log: str = ""
    # ptxas's report per entry point, and its warnings and performance notes.
    resources: tuple[KernelResources, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError("seconds must be non-negative")
        missing = set(self.entries) - {r.entry for r in self.resources}
        if self.resources and missing:
            raise ValueError(f"no ptxas report for {sorted(missing)}")

    @property
    def spilling(self) -> tuple[KernelResources, ...]:
        """The entry points whose registers overflow to local memory."""
        return tuple(r for r in self.resources if r.spills)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "arch": self.arch, "compiler": self.compiler, "ok": self.ok,
            "seconds": round(self.seconds, 3), "entries": list(self.entries), "log": self.log,
            "resources": [r.as_dict() for r in self.resources], "notes": list(self.notes),
        }


def unit_resources(name: str, arch: str, *, compiler: str | None = None) -> dict[str, KernelResources]:
    """ptxas's report for every entry point of kernel file ``name`` built for GPUs of
    ``arch`` (e.g. ``sm_90``; matmul_sm90.cu is built as sm_90a), compiling it if needed."""
    target = build_arch(name, _check_arch(arch))
    if target is None:
        raise InputError(f"{name} is not built for {arch} (only for {', '.join(UNIT_ARCHS[name])}).")
    return {r.entry: r for r in _compiled_unit(name, target, compiler)[2]}


_Unit = tuple[bytes, tuple[str, ...], tuple[KernelResources, ...], tuple[str, ...]]


def _compiled_unit(name: str, target: str, compiler: str | None) -> _Unit:
    """(CUBIN, entry points, ptxas's report per entry, ptxas's notes) of one unit."""
    src = kernel_source(name)
    cubin, report = _compile(src, name, target, "cubin", compiler)
    entries = cubin_entries(cubin)
    if not report:
        return cubin, entries, (), (f"no ptxas report: {compiler_description(compiler)} did not take "
                                    f"{PTXAS_REPORT_OPTION}",)
    per_entry = parse_ptxas_report(report)
    missing = [e for e in entries if e not in per_entry]
    if missing:
        raise CompileError(f"ptxas reported nothing for {missing} of {name} ({target}); its report:\n{report[-2000:]}")
    return cubin, entries, tuple(per_entry[e] for e in entries), ptxas_notes(report)


def _check_unit(name: str, target: str, compiler: str | None, desc: str) -> CheckResult:
    """Compile one unit to CUBIN; a compile error becomes a failed result, not an exception."""
    t0 = time.perf_counter()
    try:
        _, entries, resources, notes = _compiled_unit(name, target, compiler)
    except CompileError as err:
        return CheckResult(name, target, desc, False, time.perf_counter() - t0, (), str(err))
    return CheckResult(name, target, desc, True, time.perf_counter() - t0, entries, resources=resources, notes=notes)


def _check_known_arch(which: str, arch: str, desc: str) -> None:
    """An architecture the compiler does not know is bad input, not a failed check."""
    try:  # compile_source caches the probe, so repeated checks compile it once
        compile_source('extern "C" __global__ void detkit_arch_probe() {}\n', "arch_probe.cu", arch,
                       output="ptx", compiler=which)
    except CompileError as err:
        if "architecture" not in str(err).lower():
            raise
        raise InputError(f"{desc} cannot compile for {arch}: it does not know that architecture "
                         f"(detkit checks {', '.join(DEFAULT_CHECK_ARCHS)} by default)") from None


def check_all(archs: tuple[str, ...] | list[str] = DEFAULT_CHECK_ARCHS, *,
              compiler: str | None = None, files: tuple[str, ...] = KERNEL_FILES,
              workers: int | None = None) -> list[CheckResult]:
    """Compile every kernel file for every architecture to CUBIN; no GPU needed. ptxas
    runs on every file (it alone checks inline assembly's operands, e.g. wgmma's) and
    reports each kernel's registers, spills and shared memory.

    Returns one :class:`CheckResult` per (arch, file), in that order, for the files built
    for that arch (a :data:`UNIT_ARCHS` file under its own target, e.g. ``sm_90a``); failures carry the
    compiler log instead of raising, so a report can show all of them. Compilations run
    in parallel threads (NVRTC and nvcc release the GIL).
    """
    which = _pick_compiler(compiler)
    desc = compiler_description(which)
    for arch in archs:
        _check_known_arch(which, _check_arch(arch), desc)

    def one(job: tuple[str, str]) -> CheckResult:
        return _check_unit(job[1], job[0], which, desc)

    # Files built only for other architectures (UNIT_ARCHS) are left out for an arch.
    jobs = [(target, name) for arch in archs for name in files if (target := build_arch(name, arch)) is not None]
    n = workers or max(1, min(len(jobs), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, jobs))


def check_device(device: int, arch: str, *, files: tuple[str, ...] = KERNEL_FILES,
                 workers: int | None = None) -> list[CheckResult]:
    """Compile every kernel file for GPU ``device`` (of architecture ``arch``) and load it
    there; one :class:`CheckResult` per file built for ``arch``.

    The CUBINs are compiled in parallel threads first, filling the disk cache, so that
    loading reads it: on a GPU machine the sequential version spent minutes of the GPU's
    time in the compiler.
    """
    jobs = [(name, target) for name in files if (target := build_arch(name, arch)) is not None]
    desc = compiler_description()

    def one(job: tuple[str, str]) -> CheckResult:
        return _check_unit(*job, None, desc)

    with ThreadPoolExecutor(max_workers=workers or max(1, min(len(jobs), os.cpu_count() or 1, 8))) as pool:
        compiled = list(pool.map(one, jobs))
    results = []
    for r in compiled:
        if r.ok:
            t0 = time.perf_counter()
            try:
                load_module(r.file, device)  # the disk cache holds the CUBIN now
            except Exception as err:  # noqa: BLE001 - CuPy/driver errors: a failed row, like a compile error
                r = replace(r, ok=False, seconds=r.seconds + time.perf_counter() - t0,
                            log=f"compiled, but loading {r.file} ({r.arch}) on cuda:{device} failed: "
                                f"{type(err).__name__}: {err}")
            else:
                r = replace(r, compiler=f"{desc} (loaded on cuda:{device})",
                            seconds=r.seconds + time.perf_counter() - t0)
        results.append(r)
    return results


def recorded_compile_options() -> dict[str, Any]:
    """What the environment fingerprint and reports record about CUDA compilation."""
    info: dict[str, Any] = {
        "options": list(COMPILE_OPTIONS),
        "fast_math": False,
        "compiled_by": "detkit (NVRTC or nvcc), not cupy.RawModule, which would add -ftz=true",
    }
    try:
        info["kernel_dir"] = str(kernel_dir())
        info["sources_sha256"] = sources_digest()
    except BackendUnavailable as err:
        info["kernel_dir"] = None
        info["sources_error"] = str(err)
    try:
        info["compiler"] = compiler_description()
    except (BackendUnavailable, InputError, OSError) as err:  # InputError: a bad $DETKIT_CUDA_COMPILER
        info["compiler"] = None
        info["compiler_error"] = str(err)
    with _modules_lock:
        info["loaded_modules"] = [
            {"file": m.name, "device": m.device, "arch": m.arch} for m in _modules.values()
        ]
    return info


# --------------------------------------------------------------------------- runtime modules


@dataclass
class LoadedModule:
    """A compiled kernel file loaded on one device, with its functions cached by name."""

    name: str
    device: int
    arch: str
    module: Any
    functions: dict[str, Any] = field(default_factory=dict)

    def function(self, entry: str) -> Any:
        fn = self.functions.get(entry)
        if fn is None:
            fn = self.module.get_function(entry)
            self.functions[entry] = fn
        return fn


_modules: dict[tuple[int, str, str, tuple[str, ...], str], LoadedModule] = {}
_modules_lock = threading.Lock()


def device_arch(device: int) -> str:
    """``sm_XY`` of a CUDA device, asked through CuPy."""
    import cupy  # type: ignore[import-not-found]

    cc = cupy.cuda.Device(device).compute_capability  # e.g. "90"
    return f"sm_{cc}"


def load_module(name: str, device: int) -> LoadedModule:
    """Compile (once per device, architecture, options and source) and load a kernel file."""
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError as err:
        raise BackendUnavailable(
            "the CUDA backend needs CuPy: `pip install detkit[cuda12]` (or [cuda13])"
        ) from err
    arch = build_arch(name, device_arch(device))
    if arch is None:
        raise BackendUnavailable(
            f"{name} is built only for {', '.join(UNIT_ARCHS[name])} GPUs; cuda:{device} is {device_arch(device)}."
        )
    src = kernel_source(name)
    key = (device, arch, name, COMPILE_OPTIONS, hashlib.sha256(src.encode()).hexdigest())
    with _modules_lock:
        mod = _modules.get(key)
        if mod is None:
            cubin = compile_source(src, name, arch, output="cubin")
            with cupy.cuda.Device(device):
                raw = cupy.cuda.function.Module()
                raw.load(cubin)
            mod = LoadedModule(name, device, arch, raw)
            _modules[key] = mod
        return mod


ENV_CACHE_DIR = "DETKIT_CUDA_CACHE_DIR"


def cache_dir() -> Path:
    """Where compiled CUBIN and PTX are kept across processes ($DETKIT_CUDA_CACHE_DIR, else
    ~/.cache/detkit/cuda)."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env) if env else Path.home() / ".cache" / "detkit" / "cuda"


ENV_CACHE_MAX_MB = "DETKIT_CUDA_CACHE_MAX_MB"
# A full set of outputs (the CUBIN of every unit, compressed, for two architectures) is about 8 MB;
# each source version and checkout location adds its own set.
DEFAULT_CACHE_MAX_MB = 256


def cache_limit_bytes() -> int:
    """The disk cache's size limit ($DETKIT_CUDA_CACHE_MAX_MB, default 256 MB)."""
    text = os.environ.get(ENV_CACHE_MAX_MB)
    if text is None:
        return DEFAULT_CACHE_MAX_MB << 20
    try:
        mb = float(text)
    except ValueError:
        raise InputError(f"{ENV_CACHE_MAX_MB}={text!r} is not a number: give the cache's size limit in MB, "
                         f"e.g. {ENV_CACHE_MAX_MB}={DEFAULT_CACHE_MAX_MB}.") from None
    if not mb >= 0:
        raise InputError(f"{ENV_CACHE_MAX_MB}={text!r}: the size limit must be 0 or more MB.")
    return int(mb * (1 << 20))


# ".cubin": raw CUBIN entries written before ptxas reports were kept; pruned like the rest.
_CACHE_SUFFIXES = (".cubin.z", ".ptx.z", ".cubin")


def prune_cache(limit_bytes: int | None = None) -> list[Path]:
    """Delete the least recently used outputs until the disk cache fits ``limit_bytes``
    (default :func:`cache_limit_bytes`); return what was deleted. Only detkit's own
    outputs (``*.cubin.z``, ``*.ptx.z``) are counted or touched; the newest one is kept even
    if it alone is over the limit, so the output just compiled is never lost."""
    limit = cache_limit_bytes() if limit_bytes is None else limit_bytes
    entries: list[tuple[float, int, Path]] = []
    for p in _iter_cache():
        with contextlib.suppress(OSError):  # another process may prune at the same time
            st = p.stat()
            entries.append((st.st_mtime, st.st_size, p))
    entries.sort(key=lambda e: e[0])
    total = sum(size for _, size, _ in entries)
    removed: list[Path] = []
    for _, size, p in entries[:-1]:
        if total <= limit:
            break
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        total -= size
        removed.append(p)
    return removed


def _iter_cache() -> Iterator[Path]:
    try:
        children = list(cache_dir().iterdir())
    except OSError:
        return
    for p in children:
        if p.name.endswith(_CACHE_SUFFIXES) and p.is_file():
            yield p
