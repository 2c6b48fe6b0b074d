"""Shared test configuration: hypothesis profiles, and helpers several test files use."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from hypothesis import HealthCheck, settings

# "ci" keeps the whole suite well under 15 minutes on 2 cores; "dev" explores more.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("DETKIT_HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    # The Ctrl-C tests interrupt detkit in this process and in children. A shell without job
    # control starts a background command (`pytest &` in a script) with SIGINT ignored, its
    # children inherit that, and detkit's CLI keeps an ignored SIGINT ignored, as it should:
    # so those tests would fail for how the suite was started. Python's handler, restored
    # here, reaches the children as SIGINT's default action.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# Tiny configs (AutoConfig.for_model keyword arguments) of the families that the cross-ISA
# test (test_mode_portable), the emulated CUDA backend (test_cuda_emulated) and the portable
# coverage checks all build: Mamba2's chunked scan, Qwen3-Next's gated delta rule,
# Bloom's ALiBi slopes (pow).
TINY_FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "mamba2": dict(hidden_size=64, state_size=16, num_heads=8, head_dim=16, n_groups=1, num_hidden_layers=2,
                   chunk_size=8),
    "qwen3_next": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
}


def load_script(path: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> ModuleType:
    """Import a script that is not part of the package (benchmarks/*.py) as a module: fresh
    and registered for one test with ``monkeypatch``, else loaded once and kept."""
    name = f"{path.stem}_under_test"
    if monkeypatch is None and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    # dataclasses look their module up
    if monkeypatch is None:
        sys.modules[name] = mod
    else:
        monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    return mod


# The variables that choose an instruction set: torch's ATen dispatch, numba's target, oneDNN's.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "NUMBA_CPU_NAME", "ONEDNN_MAX_CPU_ISA")


def isa_children(code: str, args: list[str], envs: dict[str, dict[str, str]],
                 timeout: float = 600) -> dict[str, Any]:
    """Run ``python -c code *args`` once per entry of ``envs`` (label: variables set on top of
    this environment without its ISA variables), all at once (much of each child is
    importing torch); each child prints one JSON line last. {label: that JSON}."""
    procs = {}
    for label, extra in envs.items():
        env = {k: v for k, v in os.environ.items() if k not in ISA_VARIABLES} | extra
        procs[label] = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
    runs = {}
    try:
        for label, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{label}: child failed:\n{stderr[-3000:]}"
            runs[label] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return runs


@contextlib.contextmanager
def probe_server(model: str,
                 window_ms: float = 0) -> Iterator[Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]]:
    """detkit.probe.server over ``model`` in this process (requests that arrive within
    ``window_ms`` of the first form one batch); yields post(path, body) -> (status, json)."""
    import json
    import threading
    import urllib.error
    import urllib.request

    from detkit.probe import server as S

    srv, batcher = S.serve(model, port=0, window_ms=window_ms)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def post(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"http://127.0.0.1:{srv.server_port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        yield post
    finally:
        srv.shutdown()
        srv.server_close()
        batcher.stop()


# The architectures CI compile-checks every kernel for (no GPU needed).
COMPILE_ARCHS = ("sm_80", "sm_90")
# The files whose sm_80 PTX test_cuda_compile reads for approximate instructions.
PTX_CHECKED_FILES = ("matmul.cu", "rowops.cu", "attention.cu")

# Compiling every unit takes minutes of CPU with a cold cache (a new CI machine). A process
# started when the tests are collected compiles what the compile checks read into the disk
# cache, at a low CPU priority (above the sanitized runs below: it is wanted sooner), while
# the rest of the suite runs; the modules that use compiled_kernels run last, and the
# fixture waits for the process. It only warms the cache: the fixture's own check compiles
# whatever the process did not, and reports every error itself.
_WARM_CACHE = """
import sys
from detkit.kernels import cuda_loader as L
found = L.available_compilers()
if found:
    L.check_all(tuple(sys.argv[2:]), compiler=found[0])
    for name in sys.argv[1].split(","):
        L.compile_source(L.kernel_source(name), name, "sm_80", output="ptx", compiler=found[0])
"""
_cache_warmer: subprocess.Popen[bytes] | None = None


def _uses_compiled_kernels(item: pytest.Item) -> bool:
    return "compiled_kernels" in getattr(item, "fixturenames", ())


def _start_cache_warmer() -> None:
    global _cache_warmer
    if _cache_warmer is None and os.environ.get("DETKIT_SKIP_CUDA_COMPILE") != "1":
        _cache_warmer = subprocess.Popen([sys.executable, "-c", _WARM_CACHE, ",".join(PTX_CHECKED_FILES),
                                          *COMPILE_ARCHS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with contextlib.suppress(OSError):  # its compiler threads inherit the main thread's priority
            os.setpriority(os.PRIO_PROCESS, _cache_warmer.pid, 10)


@pytest.fixture(scope="session")
def cuda_compiler() -> str:
    """The CUDA compiler the compile checks use; with none, those tests FAIL with what to
    install (CI must not go green without compiling the kernels), unless
    DETKIT_SKIP_CUDA_COMPILE=1 skips them on purpose."""
    from detkit.kernels import cuda_loader

    if os.environ.get("DETKIT_SKIP_CUDA_COMPILE") == "1":
        pytest.skip("DETKIT_SKIP_CUDA_COMPILE=1: CUDA compile checks skipped on purpose")
    found = cuda_loader.available_compilers()
    if not found:
        pytest.fail(
            "no CUDA compiler found, so the CUDA kernels cannot be compile-checked: install the test "
            "extra (`pip install -e '.[test]'` brings nvidia-cuda-nvrtc-cu12) or put nvcc on PATH; "
            "set DETKIT_SKIP_CUDA_COMPILE=1 to skip these tests deliberately."
        )
    return found[0]


@pytest.fixture(scope="session")
def compiled_kernels(cuda_compiler: str) -> dict[tuple[str, str], Any]:
    """Every kernel file compiled for sm_80 and sm_90 to CUBIN once per session, in
    parallel threads: {(arch, file): CheckResult}. It fills the disk cache that every later
    compile of the same unit reads (the benchmark's ptxas reports, scripts/gpu-check),
    which on 2 cores would otherwise compile one unit at a time."""
    from detkit.kernels import cuda_loader

    if _cache_warmer is not None:
        _cache_warmer.wait()
    return {(r.arch, r.file): r for r in cuda_loader.check_all(COMPILE_ARCHS, compiler=cuda_compiler)}


@pytest.fixture
def mode_left_off() -> Iterator[None]:
    """Fails a test that finds detkit's mode on, or leaves it on (and turns it off)."""
    from detkit import mode

    assert not mode.is_enabled(), "a previous test left the mode on"
    yield
    if mode.is_enabled():
        mode.disable()
        pytest.fail("the test left the mode on")


# ---------------------------------------------------------------- background sanitized runs
# tests/test_cuda_emulated.py's sanitized runs take minutes of CPU: started when the tests
# are collected, at the lowest CPU priority, they use what the rest of the suite leaves
# idle; the tests that read them run last.
_emulated: ModuleType | None = None


def _sanitized_run(item: pytest.Item) -> str | None:
    module = getattr(item, "module", None)
    return getattr(module, "SANITIZED_TESTS", {}).get(getattr(item, "originalname", ""))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    compiling = {getattr(item, "module", None) for item in items if _uses_compiled_kernels(item)}
    # stable: each group keeps its order, and a module that compiles moves as a whole
    items.sort(key=lambda item: (_sanitized_run(item) is not None, getattr(item, "module", None) in compiling))


def pytest_collection_finish(session: pytest.Session) -> None:
    global _emulated
    if session.config.option.collectonly:
        return
    if any(_uses_compiled_kernels(item) for item in session.items):
        _start_cache_warmer()
    for item in session.items:
        name = _sanitized_run(item)
        if name is not None:  # started only where it can run (not inside a sanitized run)
            _emulated = item.module  # type: ignore[attr-defined]
            _emulated.start_sanitized_runs([name])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _cache_warmer is not None and _cache_warmer.poll() is None:
        _cache_warmer.kill()
        _cache_warmer.wait()
    if _emulated is not None:
        _emulated.stop_sanitized_runs()
