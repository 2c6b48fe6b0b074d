"""The environment fingerprint: everything on this machine that decides the bits.

Every detkit guarantee is conditional on the software stack, the device and a handful
of flags and environment variables, so every report carries ``fingerprint().to_dict()``.

``fingerprint() -> Fingerprint`` never raises and is fast (a few tenths of a second once
torch is imported; it never initialises a CUDA context when torch reports no GPU).
Anything missing reads ``"absent"``; a probe that failed reads ``"error: <why>"``.
Sections: ``versions``, ``platform``, ``threads``, ``blas``, ``cuda``, ``determinism``,
``env_vars``, ``cuda_compile_options``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["ABSENT", "WATCHED_ENV_VARS", "ENV_VAR_PREFIXES", "Fingerprint", "fingerprint", "fingerprint_differences"]

ABSENT = "absent"

# Always listed (as "unset" when unset): these change numerics or determinism.
WATCHED_ENV_VARS = (
    "CUBLAS_WORKSPACE_CONFIG",
    "CUDA_LAUNCH_BLOCKING",
    "NVIDIA_TF32_OVERRIDE",
    "MKL_CBWR",
    "MKL_NUM_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "VLLM_BATCH_INVARIANT",
    "PYTHONHASHSEED",
    "CUDA_VISIBLE_DEVICES",
)
# Any set variable with one of these prefixes is listed too.
ENV_VAR_PREFIXES = (
    "TORCHINDUCTOR_",
    "TORCH_",
    "PYTORCH_",
    "ATEN_",
    "CUBLAS",
    "CUBLASLT_",
    "CUDNN_",
    "CUDA_",
    "NVIDIA_",
    "NVRTC_",
    "CUPY_",
    "MKL_",
    "KMP_",
    "OMP_",
    "GOMP_",
    "OPENBLAS_",
    "ONEDNN_",
    "DNNL_",
    "NUMBA_",
    "VLLM_",
    "SGLANG_",
    "XLA_",
    "DETKIT_",
)
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


@dataclass
class Fingerprint:
    """What decides reproducibility on this machine, grouped in sections of plain values."""

    versions: dict[str, Any] = field(default_factory=dict)
    platform: dict[str, Any] = field(default_factory=dict)
    threads: dict[str, Any] = field(default_factory=dict)
    blas: dict[str, Any] = field(default_factory=dict)
    cuda: dict[str, Any] = field(default_factory=dict)
    determinism: dict[str, Any] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    cuda_compile_options: Any = ABSENT

    def __post_init__(self) -> None:
        for name in ("versions", "platform", "threads", "blas", "cuda", "determinism", "env_vars"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"Fingerprint.{name} must be a dict")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (only str/int/float/bool/None, lists and dicts)."""
        return _jsonable(asdict(self))

    def summary(self) -> str:
        """One line for headers: versions, ISA, threads and device."""
        v, p, c = self.versions, self.platform, self.cuda
        device = "no CUDA"
        devices = c.get("devices")
        if c.get("available") is True and isinstance(devices, list) and devices:
            dev = devices[0]
            if isinstance(dev, dict):
                device = f"{dev.get('name')} (sm_{str(dev.get('compute_capability', '?')).replace('.', '')})"
            else:
                device = f"CUDA device ({dev})"
        return (
            f"detkit {v.get('detkit')}, python {v.get('python')}, torch {v.get('torch')}, "
            f"numpy {v.get('numpy')}; {p.get('cpu_model')} ISA {p.get('torch_cpu_capability')}, "
            f"{self.threads.get('torch_num_threads')} torch threads; {device}"
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else repr(obj)
    return str(obj)


def _safe(fn: Callable[[], Any]) -> Any:
    """Run one probe; a failure becomes a value, never an exception (fingerprint never raises)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - by contract nothing escapes a probe
        return f"error: {type(exc).__name__}: {exc}"


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ABSENT


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _torch() -> Any:
    try:
        import torch

        return torch
    except Exception:  # noqa: BLE001 - a broken torch install is reported, not raised
        return None


def _versions(torch: Any) -> dict[str, Any]:
    from detkit import __version__

    import numpy

    out: dict[str, Any] = {
        "detkit": __version__,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": numpy.__version__,
        "torch": torch.__version__ if torch is not None else ABSENT,
        "torch_git": _safe(lambda: torch.version.git_version) if torch is not None else ABSENT,
        "cupy": _dist_version("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x"),
        "numba": _dist_version("numba"),
        "llvmlite": _dist_version("llvmlite"),
        "mpmath": _dist_version("mpmath"),
        "gmpy2": _dist_version("gmpy2"),
        "transformers": _dist_version("transformers"),
    }
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name") or line.startswith("Model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ABSENT


def _numba_target() -> dict[str, Any]:
    if not _installed("numba"):
        return {"numba_target_cpu": ABSENT, "numba_cpu_features": ABSENT}
    import numba

    name = numba.config.CPU_NAME
    if not name:
        import llvmlite.binding as llvm

        name = f"host ({llvm.get_host_cpu_name()})"
    return {
        "numba_target_cpu": name,
        "numba_cpu_features": numba.config.CPU_FEATURES or "host",
        "numba_opt_level": int(numba.config.OPT),
    }


def _platform(torch: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count() or ABSENT,
        "affinity_cpus": _safe(lambda: len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ABSENT,
        "torch_cpu_capability": (
            _safe(lambda: torch.backends.cpu.get_cpu_capability()) if torch is not None else ABSENT
        ),
        "byteorder": sys.byteorder,
    }
    numba_info = _safe(_numba_target)
    if isinstance(numba_info, dict):
        out.update(numba_info)
    else:
        out["numba_target_cpu"] = numba_info
    return out


def _threads(torch: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if torch is not None:
        out["torch_num_threads"] = _safe(torch.get_num_threads)
        out["torch_num_interop_threads"] = _safe(torch.get_num_interop_threads)
        parallel = _safe(lambda: str(torch.__config__.parallel_info()))
        for key, pattern in (
            ("omp_max_threads", r"omp_get_max_threads\(\)\s*:\s*(\d+)"),
            ("mkl_max_threads", r"mkl_get_max_threads\(\)\s*:\s*(\d+)"),
            ("parallel_backend", r"ATen parallel backend:\s*(.+)"),
        ):
            m = re.search(pattern, parallel) if isinstance(parallel, str) else None
            out[key] = (int(m.group(1)) if m.group(1).isdigit() else m.group(1).strip()) if m else ABSENT
    else:
        out["torch_num_threads"] = ABSENT
    if _installed("numba"):
        out["numba_num_threads"] = _safe(lambda: importlib.import_module("numba").config.NUMBA_NUM_THREADS)
        out["numba_threading_layer"] = _safe(lambda: importlib.import_module("numba").config.THREADING_LAYER)
    else:
        out["numba_num_threads"] = ABSENT
    return out


def _numpy_blas() -> dict[str, Any]:
    import numpy

    out: dict[str, Any] = {}
    config = numpy.show_config(mode="dicts")
    deps = config.get("Build Dependencies", {})
    for lib in ("blas", "lapack"):
        info = deps.get(lib, {})
        out[f"numpy_{lib}"] = f"{info.get('name', ABSENT)} {info.get('version', '')}".strip()
    openblas = deps.get("blas", {}).get("openblas configuration")
    if openblas:
        out["numpy_openblas_config"] = openblas
    if _installed("threadpoolctl"):
        from threadpoolctl import threadpool_info

        out["threadpools"] = [
            {k: pool.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture")}
            for pool in threadpool_info()
        ]
    else:
        out["threadpools"] = "absent (install threadpoolctl for runtime BLAS thread counts)"
    return out


def _blas(torch: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if torch is not None:
        show = _safe(lambda: str(torch.__config__.show()))
        if isinstance(show, str):
            for key, pattern in (
                ("torch_blas", r"BLAS_INFO=([^,\s]+)"),
                ("torch_lapack", r"LAPACK_INFO=([^,\s]+)"),
            ):
                m = re.search(pattern, show)
                out[key] = m.group(1) if m else ABSENT
            mkl = re.search(r"Intel\(R\) (?:oneAPI )?Math Kernel Library Version [^\n]*", show)
            out["torch_mkl"] = mkl.group(0).strip() if mkl else ABSENT
            dnn = re.search(r"(?:MKL-DNN|oneDNN) (v[\d.]+)", show)
            out["torch_onednn"] = dnn.group(1) if dnn else ABSENT
            omp = re.search(r"OpenMP (\d+)", show)
            out["torch_openmp"] = omp.group(1) if omp else ABSENT
        else:
            out["torch_config"] = show
        out["torch_mkl_available"] = _safe(torch.backends.mkl.is_available)
        mkldnn = torch.backends.mkldnn
        out["torch_mkldnn_enabled"] = _safe(lambda: bool(mkldnn.is_available() and mkldnn.enabled))
    numpy_info = _safe(_numpy_blas)
    if isinstance(numpy_info, dict):
        out.update(numpy_info)
    else:
        out["numpy_blas"] = numpy_info
    return out


def _nvidia_driver_from_proc() -> str:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            m = re.search(r"Kernel Module\s+([\d.]+)", fh.read())
            return m.group(1) if m else ABSENT
    except OSError:
        return ABSENT


def _cuda_int_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _cuda(torch: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch_built_with_cuda": (torch.version.cuda or ABSENT) if torch is not None else ABSENT,
        "available": False,
        "driver": _nvidia_driver_from_proc(),
    }
    if torch is not None and torch.cuda.is_available():
        out["available"] = True
        out["device_count"] = torch.cuda.device_count()
        out["cudnn"] = _safe(lambda: torch.backends.cudnn.version() or ABSENT)
        def device(i: int) -> dict[str, Any]:
            p = torch.cuda.get_device_properties(i)
            return {
                "index": i,
                "name": p.name,
                "compute_capability": f"{p.major}.{p.minor}",
                "sm_count": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1),
            }

        out["devices"] = [_safe(lambda i=i: device(i)) for i in range(torch.cuda.device_count())]
    else:
        out["devices"] = ABSENT
    cupy_loaded = "cupy" in sys.modules
    cupy: Any = None
    if _installed("cupy") and (out["available"] or cupy_loaded):
        # An installed but broken cupy (built for another CUDA) must not cost the devices above.
        cupy = _safe(lambda: importlib.import_module("cupy"))
        if isinstance(cupy, str):
            out["cupy_runtime"] = cupy
    if cupy is not None and not isinstance(cupy, str):
        out["cupy_runtime"] = _safe(lambda: _cuda_int_version(cupy.cuda.runtime.runtimeGetVersion()))
        out["cupy_driver_api"] = _safe(lambda: _cuda_int_version(cupy.cuda.runtime.driverGetVersion()))
        out["cupy_device_count"] = _safe(cupy.cuda.runtime.getDeviceCount)
    elif cupy is None:
        out["cupy_runtime"] = ABSENT if not _installed("cupy") else "not probed (no CUDA device seen by torch)"
    return out


def _flushes_subnormals() -> bool:
    from detkit.compare import flushes_subnormals

    return flushes_subnormals()


def _determinism(torch: Any) -> dict[str, Any]:
    if torch is None:
        return {"torch": ABSENT}
    b = torch.backends
    probes: dict[str, Callable[[], Any]] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled,
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled,
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "cuda_matmul_allow_tf32": lambda: b.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": lambda: b.cudnn.allow_tf32,
        "matmul_fp16_reduced_precision": lambda: b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "matmul_bf16_reduced_precision": lambda: b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cudnn_deterministic": lambda: b.cudnn.deterministic,
        "cudnn_benchmark": lambda: b.cudnn.benchmark,
        "mkldnn_enabled": lambda: b.mkldnn.enabled,
        # torch.set_flush_denormal(True) (FTZ/DAZ on this thread) changes CPU results that
        # pass through subnormals
        "cpu_flush_denormal": _flushes_subnormals,
    }
    out = {k: _safe(fn) for k, fn in probes.items()}
    # Newer torch exposes a per-backend precision API ("ieee" / "tf32"); record it when present.
    out["fp32_precision_matmul"] = _safe(lambda: getattr(b.cuda.matmul, "fp32_precision", ABSENT))
    out["fp32_precision_cudnn"] = _safe(lambda: getattr(b.cudnn, "fp32_precision", ABSENT))
    return {k: (v if isinstance(v, (bool, int, float)) else str(v)) for k, v in out.items()}


def _env_vars() -> dict[str, str]:
    out = {name: os.environ.get(name, "unset") for name in WATCHED_ENV_VARS}
    for name in sorted(os.environ):
        if name.startswith(ENV_VAR_PREFIXES) and name not in out:
            out[name] = os.environ[name]
    return {k: ("<redacted>" if _SECRET.search(k) and v != "unset" else v) for k, v in out.items()}


def _cuda_compile_options() -> Any:
    if not _installed("detkit.kernels.cuda_loader"):
        return ABSENT
    module = importlib.import_module("detkit.kernels.cuda_loader")
    recorded = getattr(module, "recorded_compile_options", None)
    if recorded is None:
        return ABSENT
    value = recorded()
    return _jsonable(value) if value else "none recorded (no CUDA kernel compiled in this process)"


def fingerprint() -> Fingerprint:
    """Collect the environment fingerprint. Never raises; missing things read ``"absent"``."""
    torch = _torch()

    def section(fn: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        value = _safe(lambda: fn(torch))
        return value if isinstance(value, dict) else {"error": value}

    env_vars = _safe(_env_vars)
    return Fingerprint(
        versions=section(_versions),
        platform=section(_platform),
        threads=section(_threads),
        blas=section(_blas),
        cuda=section(_cuda),
        determinism=section(_determinism),
        env_vars=env_vars if isinstance(env_vars, dict) else {"error": env_vars},
        cuda_compile_options=_safe(_cuda_compile_options),
    )


def fingerprint_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Entries that differ between two ``Fingerprint.to_dict()`` results, keyed ``section.key``.

    Use it to explain why two reports may legitimately disagree (other ISA, threads, GPU).
    """

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out.update(flat(v, key) if isinstance(v, dict) else {key: v})
        return out

    fa, fb = flat(a), flat(b)
    missing = "<missing>"
    keys = sorted(set(fa) | set(fb))
    return {k: (fa.get(k, missing), fb.get(k, missing)) for k in keys if fa.get(k, missing) != fb.get(k, missing)}
