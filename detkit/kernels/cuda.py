"""CUDA backend: detkit's kernels (``cuda_kernels/*.cu``) launched through CuPy.

Implements the contract of :mod:`detkit.kernels._backend` for CUDA tensors; every
function takes ``portable=`` (False: batch invariant on this device and software stack;
True: the canonical orders of ``docs/canonical-orders.md``, the same bits as the CPU
portable backend).

* Tensors stay torch tensors: kernels receive torch's device pointers (zero copy) and
  run on torch's current stream of the tensors' device; outputs are allocated by torch.
  :func:`to_cupy` / :func:`from_cupy` give DLPack views for code that wants CuPy arrays.
* Kernel configurations come from tables keyed by (dtype, compute capability major),
  never by the batch size: :data:`MATMUL_TILES`, :data:`PORTABLE_MATMUL_TILES`.
* Compilation and module caching are :mod:`detkit.kernels.cuda_loader`'s job.

float64 is not supported on CUDA (``InputError``). GPUs older than sm_80 (Ampere) are not
supported (``BackendUnavailable``): the kernels use cp.async, ldmatrix and bf16 mma.
"""

from __future__ import annotations

import ctypes
import functools
import math
import numbers
import struct
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from detkit.errors import BackendUnavailable, InputError, KernelLaunchError
from detkit.kernels import cuda_loader

__all__ = [
    "ELEMENTWISE_OPS",
    "GROUPED_TILE_CATALOGUE",
    "MATMUL_TILES",
    "PORTABLE_MATMUL_TILES",
    "PORTABLE_TILE_CATALOGUE",
    "TILE_CATALOGUE",
    "TileConfig",
    "attention",
    "available",
    "fits",
    "elementwise",
    "from_cupy",
    "grouped_matmul",
    "layer_norm",
    "matmul",
    "pow",
    "rms_norm",
    "row_cumsum",
    "row_sum",
    "softmax",
    "solve_lower",
    "status",
    "to_cupy",
]

ELEMENTWISE_OPS: tuple[str, ...] = (
    "exp", "log", "rsqrt", "sigmoid", "silu", "tanh", "erf", "gelu", "gelu_tanh", "sin", "cos", "cube", "softplus",
    "log1p",
)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_MIN_MAJOR = 8
_MAX_GRID_YZ = 65535
_ROW_THREADS = 256   # RB_NT in rowops.cu
_ROWS_PER_BLOCK = 4  # RP_ROWS in rowops.cu
_CUMSUM_WARPS = 4    # CS_WARPS in rowops.cu (32 rows per warp)
_SOLVE_THREADS = 128  # SV_THREADS in solve.cu (columns per block)
_ATT_WARPS = 4       # ATT_WARPS in attention.cu
_ATT_DMAX = 256      # ATT_DMAX in attention.cu
_ATT_SPLIT = 128     # ATS_SPLIT in attention.cu
_ATT_STAGE_DMAX = 128  # ATS_STAGE_DMAX in attention.cu
_ATC_ROWS = 64       # ATC_ROWS in attention.cu: query rows per CTA of the tensor-core kernel
_ATC_THREADS = 128   # 4 warps of 16 rows
_ATC_SPLIT = 256     # ATC_SPLIT in attention.cu
_ATC_DIMS = (64, 128)  # head dims (D = Dv) with a tensor-core entry point (DETKIT_ATC_ENTRY)
# Cap of the split-KV workspace (float32 values); queries are processed in chunks that
# fit. Chunking never changes a query's arithmetic.
_ATT_WORKSPACE_FLOATS = 32 << 20


@dataclass(frozen=True)
class TileConfig:
    """One matmul kernel configuration (instantiated in ``module`` by the matching
    ``DETKIT_*_CONFIG`` line). The arithmetic does not depend on it: every configuration
    of a kernel family gives the same bits, only the speed differs."""

    kernel: str   # entry point prefix; "_kmajor" / "_nmajor" is appended for B's layout
    bm: int
    bn: int
    bk: int
    threads: int
    stages: int
    tensor_cores: bool
    module: str = "matmul.cu"
    smem: int = 0  # dynamic shared memory per CTA, bytes (TcCfg / WgCfg::SMEM_BYTES)

    def __post_init__(self) -> None:
        if min(self.bm, self.bn, self.bk, self.threads, self.stages) <= 0:
            raise ValueError(f"tile sizes must be positive: {self}")
        if self.threads % 32:
            raise ValueError(f"threads must be a multiple of 32: {self}")
        if self.module not in cuda_loader.KERNEL_FILES:
            raise ValueError(f"unknown kernel module {self.module!r}: {self}")

    @property
    def family(self) -> str:
        """``tc`` (mma.sync, sm_80+), ``wgmma`` (sm_90 only) or ``simt`` (CUDA cores).
        Configurations of one family give the same bits; across tensor-core families that
        is up to the hardware (matmul_sm90.cu)."""
        return {"tc": "tc", "wg": "wgmma", "simt": "simt"}[self.kernel.split("_")[1]]

    @property
    def name(self) -> str:
        """The configuration's tag, e.g. ``128x64x32_2x2_s3`` or ``wgmma_128x128x64_s5``."""
        tag = self.kernel.split("_", 2)[2].rsplit("_", 1)[0]
        return f"wgmma_{tag}" if self.family == "wgmma" else tag


def _tag_sizes(tag: str) -> tuple[int, int, int, int, int]:
    """``BMxBNxBK_PxQ[_sS]`` -> (BM, BN, BK, P, Q): the CTA tile, then warps or the thread tile."""
    tile, pair = tag.split("_")[:2]
    bm, bn, bk = (int(x) for x in tile.split("x"))
    p, q = (int(x) for x in pair.split("x"))
    return bm, bn, bk, p, q


def _tc(tag: str, dtype_sfx: str, module: str) -> TileConfig:
    bm, bn, bk, wgm, wgn = _tag_sizes(tag)
    stages = int(tag.split("_s")[1])
    # TcCfg::SMEM_BYTES: STAGES x (A tile + B tile) of 16-bit values, rows padded by 8
    smem = 2 * stages * (bm * (bk + 8) + max(bn * (bk + 8), bk * (bn + 8)))
    return TileConfig(f"mm_tc_{tag}_{dtype_sfx}", bm, bn, bk, 32 * wgm * wgn, stages, True, module, smem)


def _wg(tag: str, dtype_sfx: str) -> TileConfig:
    bm, bn, bk = (int(x) for x in tag.split("_")[0].split("x"))
    stages = int(tag.split("_s")[1])
    # WgCfg::SMEM_BYTES: STAGES x (A + B) rows of 128 bytes, + 1024 to align the tiles
    smem = stages * (bm + bn) * 128 + 1024
    return TileConfig(f"mm_wg_{tag}_{dtype_sfx}", bm, bn, bk, 128 * (bm // 64), stages, True, "matmul_sm90.cu", smem)


def _simt(tag: str, dtype_sfx: str, module: str) -> TileConfig:
    bm, bn, bk, tm, tn = _tag_sizes(tag)
    return TileConfig(f"mm_simt_{tag}_{dtype_sfx}", bm, bn, bk, (bm // tm) * (bn // tn), 2, False, module)


# Every configuration compiled (matmul.cu + matmul_tiles.cu, and matmul_sm90.cu for
# sm_90), for benchmarks and tests: the tag lists must match the DETKIT_*_CONFIG lines.
TC_TAGS: tuple[str, ...] = ("128x64x32_2x2_s3", "128x128x32_2x4_s2", "64x128x32_2x2_s3", "64x64x32_2x2_s4",
                            "64x32x64_2x2_s3", "16x64x64_1x4_s3", "128x128x64_2x4_s4", "128x64x64_2x2_s4",
                            "64x64x64_2x2_s6", "16x64x128_1x4_s6", "16x32x128_1x2_s8")
WG_TAGS: tuple[str, ...] = ("128x256x64_s4", "128x128x64_s5", "128x64x64_s6", "64x128x64_s6", "64x128x64_s4",
                            "64x64x64_s8")
SIMT_TAGS: tuple[str, ...] = ("128x64x16_8x4", "128x128x16_8x8", "64x64x16_4x4")
# The tables' configurations (instantiated in matmul.cu; the others in matmul_tiles.cu).
_TC_TABLE_TAG, _SIMT_TABLE_TAG = "128x64x32_2x2_s3", "128x64x16_8x4"


def _module(tag: str) -> str:
    return "matmul.cu" if tag in (_TC_TABLE_TAG, _SIMT_TABLE_TAG) else "matmul_tiles.cu"


TILE_CATALOGUE: dict[torch.dtype, tuple[TileConfig, ...]] = {
    **{dt: (*(_tc(t, sfx, _module(t)) for t in TC_TAGS), *(_wg(t, sfx) for t in WG_TAGS))
       for dt, sfx in ((torch.bfloat16, "bf16"), (torch.float16, "f16"))},
    torch.float32: tuple(_simt(t, "f32", _module(t)) for t in SIMT_TAGS),
}
PORTABLE_TILE_CATALOGUE: dict[torch.dtype, tuple[TileConfig, ...]] = {
    dt: tuple(_simt(t, sfx, _module(t)) for t in SIMT_TAGS) for dt, sfx in _SUFFIX.items()
}

_TC_BF16 = _tc(_TC_TABLE_TAG, "bf16", "matmul.cu")
_TC_F16 = _tc(_TC_TABLE_TAG, "f16", "matmul.cu")
_SIMT = {dt: _simt(_SIMT_TABLE_TAG, sfx, "matmul.cu") for dt, sfx in _SUFFIX.items()}
_ARCH_MAJORS = (8, 9, 10, 12)

# portable=False: tensor cores for 16-bit floats; float32 on CUDA cores (never TF32),
# whose fixed order already is the canonical one. Keyed by (dtype, CC major), never M.
MATMUL_TILES: dict[tuple[torch.dtype, int], TileConfig] = {
    **{(torch.bfloat16, a): _TC_BF16 for a in _ARCH_MAJORS},
    **{(torch.float16, a): _TC_F16 for a in _ARCH_MAJORS},
    **{(torch.float32, a): _SIMT[torch.float32] for a in _ARCH_MAJORS},
}
# portable=True: the canonical order (sequential fma over k) on CUDA cores, every arch.
PORTABLE_MATMUL_TILES: dict[tuple[torch.dtype, int], TileConfig] = {
    (dt, a): _SIMT[dt] for dt in _SUFFIX for a in _ARCH_MAJORS
}
# Configurations with a grouped (MoE) kernel besides the tables' own: the wgmma one the
# H200's GPU times point at for sm_90 (benchmarks/RESULTS.md), for tests and benchmarks.
GROUPED_TILE_CATALOGUE: dict[torch.dtype, tuple[TileConfig, ...]] = {
    dt: (_wg("64x128x64_s4", sfx),) for dt, sfx in ((torch.bfloat16, "bf16"), (torch.float16, "f16"))
}


# --------------------------------------------------------------------------- plumbing


def _cupy() -> Any:
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError as err:
        raise BackendUnavailable(
            "detkit's CUDA backend needs CuPy, which is not installed: "
            "`pip install 'detkit[cuda12]'` (or [cuda13]) matching your CUDA driver."
        ) from err
    return cupy


def available() -> tuple[bool, str]:
    """(True, "") if the CUDA backend can run here, else (False, the reason). Decided
    once per process (it is asked on every call)."""
    return _availability()


@functools.cache
def _availability() -> tuple[bool, str]:
    try:
        cupy = _cupy()
        if not torch.cuda.is_available():
            return False, "torch reports no CUDA device (CPU-only torch build or no GPU/driver)"
        major = torch.cuda.get_device_capability(0)[0]
        if major < _MIN_MAJOR:
            return False, f"GPU 0 is sm_{major}x; detkit's CUDA kernels need sm_80 (Ampere) or newer"
        # CuPy loads its own CUDA runtime: a wheel for a newer CUDA than the driver (or one
        # missing its libraries) imports fine and fails at its first call, inside a launch.
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as err:  # noqa: BLE001 - CuPy's CUDARuntimeError and loader errors
            return False, (f"CuPy {getattr(cupy, '__version__', '?')} cannot use the GPU that torch sees "
                           f"({type(err).__name__}: {err}); install the CuPy wheel for the driver's CUDA "
                           "version (cupy-cuda12x or cupy-cuda13x)")
        cuda_loader.kernel_dir()
    except BackendUnavailable as err:
        return False, str(err)
    return True, ""


def status() -> dict[str, Any]:
    """Backend facts for the environment fingerprint and reports."""
    ok, reason = available()
    info: dict[str, Any] = {"available": ok, "reason": reason or None,
                            "compile": cuda_loader.recorded_compile_options()}
    if ok:
        cupy = _cupy()
        info["cupy"] = cupy.__version__
        info["devices"] = [
            {"index": i, "name": torch.cuda.get_device_name(i),
             "arch": "sm_{}{}".format(*torch.cuda.get_device_capability(i))}
            for i in range(torch.cuda.device_count())
        ]
    return info


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    dev = next(t.device for t in tensors if t is not None)
    if dev.type != "cuda":
        raise InputError(f"the CUDA backend got a tensor on {dev}; move the tensors to a CUDA device.")
    ok, reason = available()
    if not ok:
        raise BackendUnavailable(f"detkit's CUDA backend is unavailable: {reason}.")
    return dev


def _suffix(dtype: torch.dtype) -> str:
    sfx = _SUFFIX.get(dtype)
    if sfx is None:
        raise InputError(
            f"detkit's CUDA kernels take float32, bfloat16 or float16, not {dtype}; "
            "convert the tensors (float64 is CPU-only)."
        )
    return sfx


def _device_index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else torch.cuda.current_device()


# Compute capability major per device index: asked on every launch, and torch's
# get_device_capability cost more host time than the kernel of a small row op (H200).
_majors: dict[int, int] = {}


def _major(dev: torch.device) -> int:
    index = _device_index(dev)
    major = _majors.get(index)
    if major is None:
        major = torch.cuda.get_device_capability(index)[0]
        if major < _MIN_MAJOR:
            raise BackendUnavailable(f"{torch.cuda.get_device_name(index)} is sm_{major}x; detkit needs sm_80 or newer.")
        _majors[index] = major
    return major


def _stream_ptr(index: int) -> int:
    """torch's current stream on device ``index``, as a raw pointer: torch's own binding
    where the build has it (no Stream object per launch), else the public API."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return int(raw(index)) if raw is not None else torch.cuda.current_stream(index).cuda_stream


_STATIC_SMEM_LIMIT = 48 * 1024
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute in cuda.h
_CUDA_DEV_ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97  # cudaDeviceAttr in driver_types.h


class _Kernel(NamedTuple):
    """A loaded entry point: its CUfunction handle and where it comes from."""

    ptr: int
    module: str
    entry: str


# Loaded kernels by (device, file, entry point): the per-call path does no file I/O.
_functions: dict[tuple[int, str, str], _Kernel] = {}

# cuLaunchKernel's kernelParams: one 8-byte slot per argument (little-endian, so a 4-byte
# int or float is read from the slot's first bytes) and an array of pointers to the slots.
# A launch names its kernel's C parameter types in a signature, one letter per parameter:
# P a pointer, i an int, q a 64-bit int, f a float, d a double.
_SLOTS: dict[str, tuple[str, int]] = {"P": ("Q", 8), "q": ("q", 8), "d": ("d", 8), "i": ("i4x", 4), "f": ("f4x", 4)}
_MAX_PARAMS = 48


class _ParamPacker(NamedTuple):
    struct: struct.Struct
    sizes: tuple[int, ...]  # each parameter's size in bytes


_packers: dict[str, _ParamPacker] = {}


class _ParamBuffer(threading.local):
    """The kernelParams memory of one thread, refilled at every launch: the driver copies
    the values when the launch is enqueued, and a launch never runs Python in between."""

    def __init__(self) -> None:
        self.slots = ctypes.create_string_buffer(8 * _MAX_PARAMS)
        base = ctypes.addressof(self.slots)
        self.pointers = (ctypes.c_void_p * _MAX_PARAMS)(*(base + 8 * i for i in range(_MAX_PARAMS)))
        self.address = ctypes.addressof(self.pointers)


_PARAMS = _ParamBuffer()


def _packer(sig: str) -> _ParamPacker:
    packer = _packers.get(sig)
    if packer is None:
        if len(sig) > _MAX_PARAMS:
            raise ValueError(f"a kernel launch takes at most {_MAX_PARAMS} arguments, got {len(sig)}")
        unknown = sorted(set(sig) - set(_SLOTS))
        if unknown:
            raise ValueError(f"kernel signature {sig!r}: {unknown} are not parameter types ({''.join(_SLOTS)})")
        packer = _ParamPacker(struct.Struct("<" + "".join(_SLOTS[c][0] for c in sig)), tuple(_SLOTS[c][1] for c in sig))
        _packers[sig] = packer
    return packer


def _kernel_params(sig: str, args: tuple[int | float, ...]) -> tuple[int, tuple[int, ...]]:
    """``args`` written into this thread's kernelParams as the C types of ``sig``: (the
    pointer array's address, the parameters' sizes). A value that does not fit its type
    (an int past 32 bits for ``i``) raises struct.error instead of being cut."""
    packer = _packer(sig)
    if len(args) != len(sig):
        raise ValueError(f"kernel signature {sig!r} has {len(sig)} parameters, got {len(args)} arguments")
    packer.struct.pack_into(_PARAMS.slots, 0, *args)
    return _PARAMS.address, packer.sizes


def _launch(dev: torch.device, module: str, entry: str, grid: tuple[int, int, int],
            block: int, sig: str, args: tuple[int | float, ...], shared_mem: int = 0) -> None:
    """Launch ``entry`` of ``module`` with ``args`` (C types: the signature ``sig``) on
    torch's current stream of ``dev`` with ``shared_mem`` bytes of dynamic shared memory.

    The arguments go to cuLaunchKernel as packed here, not through CuPy's kernel call,
    which built a Python object per argument: the launch path is the whole cost of a small
    op (benchmarks/RESULTS.md, "Where the time goes")."""
    index = _device_index(dev)
    kernel = _functions.get((index, module, entry))
    if kernel is None:
        kernel = _load_function(index, module, entry, shared_mem)
    try:
        params, sizes = _kernel_params(sig, args)
    except (struct.error, OverflowError) as err:
        raise InputError(f"{entry} ({module}): an argument does not fit its C type (signature {sig!r}, "
                         f"arguments {args}): {err}.") from err
    try:
        _driver_launch(index, kernel, grid, block, shared_mem, _stream_ptr(index), params, sizes)
    except Exception as err:  # CuPy's CUDADriverError and friends: say which kernel
        raise KernelLaunchError(
            f"launching {entry} ({module}) on cuda:{index} with grid {grid}, {block} threads failed: "
            f"{type(err).__name__}: {err}. Errors from an earlier kernel surface here too: "
            "rerun with CUDA_LAUNCH_BLOCKING=1 to find the kernel that failed."
        ) from err


def _driver_launch(index: int, kernel: _Kernel, grid: tuple[int, int, int], block: int, shared_mem: int,
                   stream: int, params: int, sizes: tuple[int, ...]) -> None:
    """cuLaunchKernel in device ``index``'s context (``sizes``: the parameters' sizes, for
    the host emulation in the tests; the driver knows them from the kernel)."""
    cupy = _cupy()
    if cupy.cuda.runtime.getDevice() == index:
        cupy.cuda.driver.launchKernel(kernel.ptr, grid[0], grid[1], grid[2], block, 1, 1, shared_mem, stream, params, 0)
        return
    with cupy.cuda.Device(index):
        cupy.cuda.driver.launchKernel(kernel.ptr, grid[0], grid[1], grid[2], block, 1, 1, shared_mem, stream, params, 0)


def _load_function(index: int, module: str, entry: str, shared_mem: int) -> _Kernel:
    """The loaded kernel, allowed ``shared_mem`` bytes of dynamic shared memory; the first
    use on a device compiles (or reads the disk cache) and loads it."""
    kernel = _functions.get((index, module, entry))
    if kernel is None:
        cupy = _cupy()
        with cupy.cuda.Device(index):
            fn = cuda_loader.load_module(module, index).function(entry)
            if shared_mem > _STATIC_SMEM_LIMIT:  # opt in above the default limit, once
                cupy.cuda.driver.funcSetAttribute(fn.ptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                  shared_mem)
        kernel = _Kernel(int(fn.ptr), module, entry)
        _functions[(index, module, entry)] = kernel
    return kernel


def ctas_per_sm(tile: TileConfig, dev: torch.device, *, kmajor: bool = True) -> int:
    """How many CTAs of ``tile`` (its k-major or n-major kernel) one SM of ``dev`` holds
    at once, as the driver computes it from the kernel's registers, threads and shared
    memory (cuOccupancyMaxActiveBlocksPerMultiprocessor); 0 if it does not fit."""
    cupy = _cupy()
    index = _device_index(dev)
    entry = f"{tile.kernel}_{'kmajor' if kmajor else 'nmajor'}"
    kernel = _load_function(index, tile.module, entry, tile.smem)
    with cupy.cuda.Device(index):
        return int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.ptr, tile.threads, tile.smem))


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# The kernels index a row, a K loop or a group with `int`, stepping by at most 2048: sizes
# stay this far below 2**31 so that no `j += step` past the last element wraps around.
I32_LIMIT = 2**31 - 2**16


def _i32(v: int, what: str) -> int:
    if not 0 <= v < I32_LIMIT:
        raise InputError(f"{what} = {v} is past the CUDA kernels' 32-bit sizes (at most {I32_LIMIT - 1}): "
                         "split the tensor along that dimension.")
    return v


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- matmul


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, *,
           portable: bool = False, tile: TileConfig | None = None) -> torch.Tensor:
    """(M, K) @ (K, N) or (B, M, K) @ (B, K, N), plus bias (N,) after the K loop.

    ``tile`` overrides the table's configuration with one of :data:`TILE_CATALOGUE` /
    :data:`PORTABLE_TILE_CATALOGUE` (benchmarks and tests; the bits are the same)."""
    dev = _device_of(a, b, bias)
    _suffix(a.dtype)
    major = _major(dev)
    default = (PORTABLE_MATMUL_TILES if portable else MATMUL_TILES).get((a.dtype, major))
    if tile is not None:
        catalogue = (PORTABLE_TILE_CATALOGUE if portable else TILE_CATALOGUE).get(a.dtype, ())
        if tile not in catalogue and tile != default:
            raise InputError(f"matmul: {tile.kernel} is not a {'portable ' if portable else ''}configuration "
                             f"for {a.dtype}; choose one of {[c.name for c in catalogue]}.")
        _check_runs_here(tile, dev, major, "matmul")
    cfg = tile or default
    if cfg is None:
        raise BackendUnavailable(f"no matmul tile configuration for {a.dtype} on sm_{major}x.")
    batched = a.dim() == 3
    nb, m, k = a.shape if batched else (1, *a.shape)
    n = b.shape[-1]
    nb_b = b.shape[0] if b.dim() == 3 else 1
    if nb_b not in (1, nb):
        raise InputError(f"matmul: batch sizes of a ({nb}) and b ({nb_b}) differ.")
    if a.stride(-1) != 1 and k > 1:
        a = a.contiguous()  # the kernels read A along k; values (hence bits) unchanged
    b, kmajor, ld = _b_layout(b)
    sb_b = b.stride(0) if nb_b == nb and nb > 1 else 0
    sa_b = a.stride(0) if nb > 1 else 0
    sa_m = a.stride(-2)
    # 2-D operands keep a 2-D result: no view to make per call (a small product's host time)
    out = torch.empty((nb, m, n) if batched else (m, n), dtype=a.dtype, device=dev)
    if out.numel() == 0 or k == 0:  # nothing to reduce, and no grid of zero blocks to launch
        out.zero_()
        if bias is not None:
            out += bias
            if portable:  # the canonical orders' output step: NaN is the canonical quiet NaN
                out.masked_fill_(out.isnan(), math.nan)
        return out
    bias_c = None if bias is None else bias.contiguous()
    entry = f"{cfg.kernel}_{'kmajor' if kmajor else 'nmajor'}"
    M, N, K = _i32(m, "M"), _i32(n, "N"), _i32(k, "K")
    grid_x, grid_y = _cdiv(n, cfg.bn), _cdiv(m, cfg.bm)
    if grid_y > _MAX_GRID_YZ:
        raise InputError(f"matmul: M = {m} exceeds the kernel's grid limit ({_MAX_GRID_YZ * cfg.bm}).")
    esz = a.element_size()
    for z0 in range(0, nb, _MAX_GRID_YZ):
        nz = min(_MAX_GRID_YZ, nb - z0)
        a_ptr = a.data_ptr() + z0 * sa_b * esz
        b_ptr = b.data_ptr() + z0 * sb_b * esz
        c_ptr = out.data_ptr() + z0 * m * n * esz
        if cfg.tensor_cores:
            vec = _tc_vec_ok(a_ptr, b_ptr, sa_m, sa_b, ld, sb_b, k, n, kmajor, nz > 1)
            sig, args = "PPPPiiiqqqqi", (a_ptr, b_ptr, _ptr(bias_c), c_ptr, M, N, K, sa_b, sa_m, sb_b, ld, int(vec))
        else:
            sig, args = "PPPPiiiqqqq", (a_ptr, b_ptr, _ptr(bias_c), c_ptr, M, N, K, sa_b, sa_m, sb_b, ld)
        _launch(dev, cfg.module, entry, (grid_x, grid_y, nz), cfg.threads, sig, args, cfg.smem)
    return out


def _check_runs_here(tile: TileConfig, dev: torch.device, major: int, fn: str) -> None:
    """An InputError if a configuration asked for by name cannot run on ``dev``: wgmma
    off sm_90, or more shared memory than a block may have."""
    if tile.family == "wgmma" and major != 9:
        raise InputError(f"{fn}: {tile.name} uses wgmma, which only sm_90 GPUs (H100, H200, GH200) have; "
                         f"this is sm_{major}x. Choose a tc configuration.")
    if not fits(tile, dev):
        raise InputError(f"{fn}: {tile.name} needs {tile.smem} bytes of shared memory per block; "
                         f"{torch.cuda.get_device_name(dev)} allows {_smem_optin(dev)}.")


def _b_layout(b3: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
    """(b3, k-major?, leading stride) of a (K, N) or (B, K, N) operand: k-contiguous (a
    transposed nn.Linear weight, not copied) or n-contiguous; any other layout is copied first."""
    k, n = b3.shape[-2:]
    if b3.stride(-2) == 1 or k == 1:
        return b3, True, b3.stride(-1)
    if b3.stride(-1) == 1 or n == 1:
        return b3, False, b3.stride(-2)
    b3 = b3.contiguous()
    return b3, False, b3.stride(-2)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, portable: bool = False,
                   tile: TileConfig | None = None) -> torch.Tensor:
    """(S, K) x (G, K, N) with int32 ``offs`` (G,): rows ``offs[g-1]:offs[g]`` of ``a``
    times ``b[g]`` (torch._grouped_mm's MoE form); rows past ``offs[-1]`` are zero.

    One launch of the table's configuration (:data:`MATMUL_TILES` /
    :data:`PORTABLE_MATMUL_TILES`) whose CTAs find their group from ``offs`` on the device:
    the host never reads the offsets (no synchronisation with the GPU). A row's bits equal
    :func:`matmul` of its group's rows with the same configuration. Offsets that are not
    nondecreasing within [0, S] are clamped into it (see matmul.cu), not reported. ``tile``:
    one of :data:`GROUPED_TILE_CATALOGUE` instead (benchmarks and tests)."""
    dev = _device_of(a, b, offs)
    _suffix(a.dtype)
    major = _major(dev)
    cfg = (PORTABLE_MATMUL_TILES if portable else MATMUL_TILES).get((a.dtype, major))
    if tile is not None:
        catalogue = () if portable else GROUPED_TILE_CATALOGUE.get(a.dtype, ())
        if tile not in catalogue and tile != cfg:
            raise InputError(f"grouped_matmul: {tile.name} has no grouped kernel for {a.dtype}"
                             f"{' (portable)' if portable else ''}; choose one of {[c.name for c in catalogue]} "
                             "or leave tile unset.")
        _check_runs_here(tile, dev, major, "grouped_matmul")
        cfg = tile
    if cfg is None:
        raise BackendUnavailable(f"no matmul tile configuration for {a.dtype} on sm_{major}x.")
    s, k = a.shape
    g, _, n = b.shape
    out = torch.zeros((s, n), dtype=a.dtype, device=dev)
    if out.numel() == 0 or k == 0 or g == 0:
        return out
    if a.stride(-1) != 1 and k > 1:
        a = a.contiguous()
    b, kmajor, ld = _b_layout(b)
    offs_c = offs.contiguous()
    grid_y = _cdiv(s, cfg.bm) + g  # every split of S rows into G groups has at most this many row tiles
    if grid_y > _MAX_GRID_YZ:
        raise InputError(f"grouped_matmul: {s} rows in {g} groups exceed the kernel's grid limit "
                         f"({_MAX_GRID_YZ} row tiles of {cfg.bm}).")
    sb_b = b.stride(0) if g > 1 else 0
    sig, args = "PPPPiiiiqqq", (a.data_ptr(), b.data_ptr(), _ptr(offs_c), out.data_ptr(), _i32(s, "S"), _i32(g, "G"),
                                _i32(n, "N"), _i32(k, "K"), a.stride(0), sb_b, ld)
    if cfg.tensor_cores:
        # a group starts at a whole row of A: aligned when A's rows are (sa_m % 8 == 0)
        vec = _tc_vec_ok(a.data_ptr(), b.data_ptr(), a.stride(0), 0, ld, sb_b, k, n, kmajor, True)
        sig, args = sig + "i", (*args, int(vec))
    entry = f"{cfg.kernel}_grouped_{'kmajor' if kmajor else 'nmajor'}"
    _launch(dev, cfg.module, entry, (_cdiv(n, cfg.bn), grid_y, 1), cfg.threads, sig, args, cfg.smem)
    return out


def _smem_optin(dev: torch.device) -> int:
    """The most dynamic shared memory one block may opt in to on ``dev``."""
    props = torch.cuda.get_device_properties(dev)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # torch < 2.6 does not expose it: ask the driver through CuPy
        index = _device_index(dev)
        optin = _cupy().cuda.runtime.deviceGetAttribute(_CUDA_DEV_ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, index)
    return int(optin)


def fits(tile: TileConfig, dev: torch.device) -> bool:
    """Whether ``tile`` runs on ``dev``: its shared memory fits a block (the deep-pipeline
    configurations need an A100/H100-class 163-227 KiB; consumer GPUs allow 99 KiB), and a
    wgmma configuration needs an sm_90 GPU."""
    if tile.family == "wgmma" and _major(dev) != 9:
        return False
    return tile.smem <= _STATIC_SMEM_LIMIT or tile.smem <= _smem_optin(dev)


def _tc_vec_ok(a_ptr: int, b_ptr: int, sa_m: int, sa_b: int, ld: int, sb_b: int, k: int, n: int,
               kmajor: bool, many: bool) -> bool:
    """Whether every 16-byte chunk the tensor-core kernel reads is aligned and whole."""
    aligned = a_ptr % 16 == 0 and b_ptr % 16 == 0 and sa_m % 8 == 0 and ld % 8 == 0
    if many:
        aligned = aligned and sa_b % 8 == 0 and sb_b % 8 == 0
    whole = k % 8 == 0 if kmajor else (k % 8 == 0 and n % 8 == 0)
    return aligned and whole


# --------------------------------------------------------------------------- row ops


def _rows_launch(x: torch.Tensor, base: str, portable: bool, extra_ptrs: tuple[torch.Tensor | None, ...],
                 out: torch.Tensor, scalar_sig: str, scalars: tuple[int | float, ...]) -> None:
    dev = _device_of(x, *extra_ptrs)
    sfx = _suffix(x.dtype)
    _major(dev)
    r, length = x.shape
    if r == 0 or length == 0:
        raise InputError("the CUDA row kernels need at least one row of at least one element.")
    R, L = _i32(r, "rows"), _i32(length, "row length")
    ptrs = "P" * (len(extra_ptrs) + 2)
    if portable:
        grid = (_cdiv(r, _ROWS_PER_BLOCK), 1, 1)
        args = (x.data_ptr(), *map(_ptr, extra_ptrs), out.data_ptr(), R, L, *scalars)
        _launch(dev, "rowops.cu", f"{base}_p_{sfx}", grid, 32 * _ROWS_PER_BLOCK, ptrs + "ii" + scalar_sig, args)
    else:
        args = (x.data_ptr(), *map(_ptr, extra_ptrs), out.data_ptr(), L, *scalars)
        _launch(dev, "rowops.cu", f"{base}_b_{sfx}", (r, 1, 1), _ROW_THREADS, ptrs + "i" + scalar_sig, args)


def _same_dtype(x: torch.Tensor, *ps: torch.Tensor | None) -> None:
    for p in ps:
        if p is not None and p.dtype != x.dtype:
            raise InputError(f"all tensors must have the dtype of x ({x.dtype}), got {p.dtype}.")


def softmax(x: torch.Tensor, log: bool, *, portable: bool = False) -> torch.Tensor:
    """Softmax (or log-softmax) over the last dim of a contiguous (R, L) tensor."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _rows_launch(x, "softmax", portable, (), out, "i", (1 if log else 0,))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
             portable: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) (* weight) over the last dim."""
    _same_dtype(x, weight)
    x = x.contiguous()
    w = None if weight is None else weight.contiguous()
    out = torch.empty_like(x)
    _rows_launch(x, "rms_norm", portable, (w,), out, "f", (eps,))
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               *, portable: bool = False) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) (* weight) (+ bias) over the last dim (biased var)."""
    _same_dtype(x, weight, bias)
    x = x.contiguous()
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    out = torch.empty_like(x)
    _rows_launch(x, "layer_norm", portable, (w, b), out, "f", (eps,))
    return out


def row_sum(x: torch.Tensor, mean: bool, *, portable: bool = False) -> torch.Tensor:
    """Sum (or mean) over the last dim, shape (R,)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    _rows_launch(x, "row_sum", portable, (), out, "i", (1 if mean else 0,))
    return out


def row_cumsum(x: torch.Tensor, *, portable: bool = False) -> torch.Tensor:
    """Running sum over the last dim of a contiguous (R, L) tensor, in the canonical order
    under both guarantees (a sequential order is batch invariant already, and a parallel
    scan would add in another order): ``portable`` changes nothing here."""
    del portable
    dev = _device_of(x)
    sfx = _suffix(x.dtype)
    _major(dev)
    x = x.contiguous()
    r, length = x.shape
    if r == 0 or length == 0:
        raise InputError("the CUDA row kernels need at least one row of at least one element.")
    R, L = _i32(r, "rows"), _i32(length, "row length")
    out = torch.empty_like(x)
    _launch(dev, "rowops.cu", f"row_cumsum_{sfx}", (_cdiv(r, 32 * _CUMSUM_WARPS), 1, 1), 32 * _CUMSUM_WARPS,
            "PPii", (_ptr(x), _ptr(out), R, L))
    return out


# --------------------------------------------------------------------------- triangular solve


def solve_lower(a: torch.Tensor, b: torch.Tensor, unit: bool, *, portable: bool = False) -> torch.Tensor:
    """Forward substitution of (T, n, n) lower-triangular ``a`` against (T, n, k) ``b``, in
    the canonical order under both guarantees (one column is one sequential chain):
    ``portable`` changes nothing here."""
    del portable
    dev = _device_of(a, b)
    sfx = _suffix(b.dtype)
    _same_dtype(b, a)
    _major(dev)
    a, b = a.contiguous(), b.contiguous()
    batch, n, k = b.shape
    if batch == 0 or n == 0 or k == 0:
        raise InputError("the CUDA triangular solve needs a nonempty batch, matrix and right-hand side.")
    col_blocks = _cdiv(k, _SOLVE_THREADS)
    _i32(batch * col_blocks, "blocks (batch entries x column blocks)")
    _i32(n, "matrix size")
    _i32(k, "right-hand side columns")
    out = torch.empty_like(b)
    ws = out if b.dtype == torch.float32 else torch.empty(b.shape, dtype=torch.float32, device=b.device)
    _launch(dev, "solve.cu", f"solve_lower_{sfx}", (batch * col_blocks, 1, 1), _SOLVE_THREADS,
            "PPPPiiii", (_ptr(a), _ptr(b), _ptr(ws), _ptr(out), n, k, col_blocks, 1 if unit else 0))
    return out


# --------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, *, portable: bool = False) -> torch.Tensor:
    """SDPA, shapes as in the backend contract. Both kernels are batch, padding and
    decode/prefill invariant by construction:

    * ``portable=True``, or a float mask: the canonical order (one warp per query,
      sequential over kept keys), the same bits as the CPU portable backend. A float
      mask keeps this kernel under ``portable=False`` too, because additive masks often
      pad with a large finite negative (``finfo.min``) instead of ``-inf``: such keys
      are kept (with probability 0), which the canonical order absorbs exactly but which
      would move the anchor of the split kernel.
    * ``portable=False`` with no mask or a bool mask: split KV, splits anchored at the
      query's first unmasked key and merged in order. bfloat16 and float16 with head dims
      D = Dv in ``_ATC_DIMS`` take the tensor-core kernel (``ATC_SPLIT`` keys per split,
      mma.sync over blocks of 64 keys, P rounded to the input dtype as in FlashAttention);
      other shapes and float32 the CUDA-core one (``ATS_SPLIT`` keys per split). The
      choice depends on dtype and head dims only, never on the batch or the lengths.
    """
    dev = _device_of(q, k, v, mask)
    sfx = _suffix(q.dtype)
    _major(dev)
    _same_dtype(q, k, v)
    nb, h, lq, d = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    if d > _ATT_DMAX or dv > _ATT_DMAX:
        raise InputError(f"attention: head dims up to {_ATT_DMAX} are supported on CUDA, got {d} and {dv}.")
    if hk == 0 or h % hk:
        raise InputError(f"attention: query heads ({h}) must be a multiple of key/value heads ({hk}).")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kind, strides, m = 0, (0, 0, 0, 0), None
    if mask is not None:
        if mask.dtype == torch.bool:
            kind, m = 1, mask
        else:
            kind, m = 2, (mask if mask.dtype == torch.float32 else mask.to(torch.float32))
        if tuple(m.shape) != (nb, h, lq, lk):
            m = m.expand(nb, h, lq, lk)
        strides = tuple(int(s) for s in m.stride())
    out = torch.empty((nb, h, lq, dv), dtype=q.dtype, device=dev)
    n_queries = nb * h * lq
    if n_queries == 0 or dv == 0 or lk == 0:
        return out.zero_()
    dims = (_i32(nb, "batch"), _i32(h, "heads"), _i32(hk, "kv heads"), _i32(lq, "Lq"), _i32(lk, "Lk"))
    if portable or kind == 2:
        args = (_ptr(q), _ptr(k), _ptr(v), _ptr(m), kind, *strides, _ptr(out), *dims, d, dv, scale)
        _launch(dev, "attention.cu", f"attention_{sfx}", (_cdiv(n_queries, _ATT_WARPS), 1, 1),
                32 * _ATT_WARPS, "PPPPiqqqqPiiiiiiif", args)
        return out
    if q.dtype != torch.float32 and d == dv and d in _ATC_DIMS:
        _attention_tc(q, k, v, m, strides, out, sfx, dims, d, scale)
    else:
        _attention_split(q, k, v, m, strides, out, sfx, dims, d, dv, scale)
    return out


def _anchors(dev: torch.device, mask: torch.Tensor | None, strides: tuple[int, ...],
             dims: tuple[int, ...]) -> torch.Tensor | None:
    """Each query's first kept key (Lk if none), or None without a mask (all anchors 0)."""
    if mask is None:
        return None
    nb, h, _, lq, lk = dims
    n_queries = nb * h * lq
    anchor = torch.empty(n_queries, dtype=torch.int32, device=dev)
    _launch(dev, "attention.cu", "attention_anchor", (_cdiv(n_queries, _ATT_WARPS), 1, 1), 32 * _ATT_WARPS,
            "PqqqqPiiii", (_ptr(mask), *strides, _ptr(anchor), nb, h, lq, lk))
    return anchor


def _attention_tc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  strides: tuple[int, ...], out: torch.Tensor, sfx: str, dims: tuple[int, ...], d: int,
                  scale: float) -> None:
    """The tensor-core split-KV kernel: CTAs of 64 rows of one (batch, K/V head) group (its
    query heads' rows, so a GQA decode fills a tile), one per split; then the combine, or
    none when Lk fits one split."""
    dev = q.device
    nb, h, hk, lq, lk = dims
    anchor = _anchors(dev, mask, strides, dims)
    n_splits = _cdiv(lk, _ATC_SPLIT)
    if n_splits > _MAX_GRID_YZ:
        raise InputError(f"attention: Lk = {lk} exceeds the split kernel's limit ({_MAX_GRID_YZ * _ATC_SPLIT}).")
    rows = (h // hk) * lq  # rows of one (batch, K/V head) group
    groups, tiles = nb * hk, _cdiv(rows, _ATC_ROWS)
    vec = all(t.data_ptr() % 16 == 0 for t in (q, k, v))  # rows are whole 16-byte chunks (d % 8 == 0)
    smem = 5 * _ATC_ROWS * (d + 8) * q.element_size()  # Q, and two stages of K and V (attention.cu)
    if n_splits == 1:  # the kernel writes the output (the combine's arithmetic for one split)
        chunk, parts = groups, (0, 0, 0)
    else:
        per_group = rows * n_splits * (d + 2)
        chunk = max(1, min(groups, _ATT_WORKSPACE_FLOATS // per_group))
        work = torch.empty(chunk * per_group, dtype=torch.float32, device=dev)
        n_part = chunk * rows * n_splits
        parts = (_ptr(work[:n_part]), _ptr(work[n_part : 2 * n_part]), _ptr(work[2 * n_part :]))
    for g0 in range(0, groups, chunk):
        ng = min(chunk, groups - g0)
        _launch(dev, "attention.cu", f"attention_tc_{sfx}_d{d}", (ng * tiles, n_splits, 1), _ATC_THREADS,
                "PPPPqqqqPPPPPiiiiiiifi", (_ptr(q), _ptr(k), _ptr(v), _ptr(mask), *strides, _ptr(anchor), *parts,
                                           _ptr(out), g0, tiles, n_splits, h, hk, lq, lk, scale, int(vec)), smem)
        if n_splits > 1:
            _launch(dev, "attention.cu", f"attention_combine_{sfx}", (_cdiv(ng * rows, _ATT_WARPS), 1, 1),
                    32 * _ATT_WARPS, "PPPPPqiiiii", (_ptr(anchor), *parts, _ptr(out), g0 * rows, ng * rows,
                                                     n_splits, lk, d, _ATC_SPLIT))


def _attention_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     strides: tuple[int, ...], out: torch.Tensor, sfx: str, dims: tuple[int, ...],
                     d: int, dv: int, scale: float) -> None:
    dev = q.device
    nb, h, _, lq, lk = dims
    n_queries = nb * h * lq
    block = 32 * _ATT_WARPS
    mstrides = tuple(strides)
    anchor = _anchors(dev, mask, mstrides, dims)
    n_splits = _cdiv(lk, _ATT_SPLIT)
    if n_splits > _MAX_GRID_YZ:
        raise InputError(f"attention: Lk = {lk} exceeds the split kernel's limit ({_MAX_GRID_YZ * _ATT_SPLIT}).")
    # a CTA stages 32 keys' K and V rows in dynamic shared memory when both head dims are
    # at most ATS_STAGE_DMAX (attention.cu); the kernel makes the same test
    stage = 32 * (d + dv) * q.element_size() if d <= _ATT_STAGE_DMAX and dv <= _ATT_STAGE_DMAX else 0
    per_query = n_splits * (dv + 2)
    chunk = max(1, min(n_queries, _ATT_WORKSPACE_FLOATS // per_query))
    work = torch.empty(chunk * per_query, dtype=torch.float32, device=dev)
    part_m, part_l = work[: chunk * n_splits], work[chunk * n_splits : 2 * chunk * n_splits]
    part_o = work[2 * chunk * n_splits :]
    for q0 in range(0, n_queries, chunk):
        nq = min(chunk, n_queries - q0)
        grid_x = _cdiv(nq, _ATT_WARPS)
        _launch(dev, "attention.cu", f"attention_split_{sfx}", (grid_x, n_splits, 1), block,
                "PPPPqqqqPPPPqiiiiiiiif",
                (_ptr(q), _ptr(k), _ptr(v), _ptr(mask), *mstrides, _ptr(anchor), _ptr(part_m), _ptr(part_l),
                 _ptr(part_o), q0, nq, n_splits, dims[1], dims[2], dims[3], dims[4], d, dv, scale), stage)
        _launch(dev, "attention.cu", f"attention_combine_{sfx}", (grid_x, 1, 1), block,
                "PPPPPqiiiii", (_ptr(anchor), _ptr(part_m), _ptr(part_l), _ptr(part_o), _ptr(out), q0, nq,
                                n_splits, dims[4], dv, _ATT_SPLIT))


# --------------------------------------------------------------------------- elementwise


def elementwise(name: str, x: torch.Tensor) -> torch.Tensor:
    """The portable elementwise ops of the canonical orders (``ELEMENTWISE_OPS``)."""
    if name not in ELEMENTWISE_OPS:
        raise InputError(f"unknown portable elementwise op {name!r}; choose from {list(ELEMENTWISE_OPS)}")
    dev = _device_of(x)
    sfx = _suffix(x.dtype)
    _major(dev)
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    _grid_stride(dev, f"elementwise_p_{sfx}", n, "PPqi", (_ptr(x), _ptr(out), n, ELEMENTWISE_OPS.index(name)))
    return out


def _grid_stride(dev: torch.device, entry: str, n: int, sig: str, args: tuple[int | float, ...]) -> None:
    """Launch a grid-stride elementwise kernel of rowops.cu over ``n`` elements (nothing
    to launch for n == 0)."""
    if n:
        _launch(dev, "rowops.cu", entry, (min(_cdiv(n, 256), 1 << 20), 1, 1), 256, sig, args)


def pow(x: torch.Tensor, y: torch.Tensor | float) -> torch.Tensor:  # noqa: A001 - backend signature
    """``Pow(x, y)`` of the canonical orders (section 2.9) per element, in x's dtype: ``y``
    a tensor of x's dtype, shape and device (each element widened exactly), or a Python
    number, one binary64 exponent for every element. Like ``elementwise`` it takes no
    ``portable``: there is one evaluation, the canonical one, which ``cuda_portable``
    exposes."""
    dev = _device_of(x)
    sfx = _suffix(x.dtype)
    scalar = not isinstance(y, torch.Tensor)
    if scalar:
        if not isinstance(y, numbers.Real):
            raise InputError(f"pow: the exponent must be a tensor or a Python float, got {type(y).__name__}.")
        y_scalar = float(y)
    else:
        if y.dtype != x.dtype:
            raise InputError(f"pow: the exponent tensor must have x's dtype ({x.dtype}), got {y.dtype}.")
        if y.shape != x.shape:
            raise InputError(f"pow: the exponent tensor must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}.")
        if y.device != x.device:
            raise InputError(f"pow: the exponent tensor must be on x's device ({x.device}), got {y.device}.")
        y_scalar = 0.0
    _major(dev)
    x = x.contiguous()
    yt = None if scalar else y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    _grid_stride(dev, f"pow_p_{sfx}", n, "PPdiPq", (_ptr(x), _ptr(yt), y_scalar, 1 if scalar else 0, _ptr(out), n))
    return out


# --------------------------------------------------------------------------- DLPack interop


def to_cupy(t: torch.Tensor) -> Any:
    """A zero-copy CuPy view of a CUDA tensor (DLPack). 16-bit floats come back as
    uint16 bit patterns, because CuPy has no bfloat16 dtype."""
    cupy = _cupy()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.uint16) if hasattr(torch, "uint16") else t.view(torch.int16)
    return cupy.from_dlpack(t)


def from_cupy(arr: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A zero-copy torch view of a CuPy array (DLPack); ``dtype`` reinterprets the bits
    (e.g. uint16 -> torch.bfloat16)."""
    t = torch.from_dlpack(arr)
    if dtype is not None and dtype != t.dtype:
        if torch.empty((), dtype=dtype).element_size() != t.element_size():
            raise InputError(f"cannot reinterpret {t.dtype} as {dtype}: element sizes differ.")
        t = t.view(dtype)
    return t
