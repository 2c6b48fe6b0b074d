"""The environment fingerprint and `detkit env`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import detkit
from detkit import env as denv
from detkit.cli import app

SECTIONS = {"versions", "platform", "threads", "blas", "cuda", "determinism", "env_vars", "cuda_compile_options"}


def test_fingerprint_fields_reflect_this_process() -> None:
    fp = denv.fingerprint().to_dict()
    assert set(fp) == SECTIONS
    json.dumps(fp, allow_nan=False)
    assert fp["versions"]["detkit"] == detkit.__version__
    assert fp["versions"]["torch"] == torch.__version__
    assert fp["platform"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fp["threads"]["torch_num_threads"] == torch.get_num_threads()
    assert fp["cuda"]["available"] is torch.cuda.is_available()
    assert fp["determinism"]["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert fp["determinism"]["cuda_matmul_allow_tf32"] is torch.backends.cuda.matmul.allow_tf32
    for name in ("CUBLAS_WORKSPACE_CONFIG", "MKL_CBWR", "OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "NVIDIA_TF32_OVERRIDE"):
        assert fp["env_vars"][name] == os.environ.get(name, "unset")
    if not torch.cuda.is_available():
        assert fp["cuda"]["devices"] == "absent"


def test_fingerprint_tracks_flag_changes() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        fp = denv.fingerprint().to_dict()
        assert fp["threads"]["torch_num_threads"] == 1
        assert fp["determinism"]["deterministic_algorithms"] is True
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(before)


def test_fingerprint_records_the_flush_denormal_mode() -> None:
    """torch.set_flush_denormal(True) changes the bits of CPU results that pass through
    subnormals; before, the fingerprint did not say whether it was on."""
    assert denv.fingerprint().to_dict()["determinism"]["cpu_flush_denormal"] is False
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        fp = denv.fingerprint().to_dict()
    finally:
        torch.set_flush_denormal(False)
    assert fp["determinism"]["cpu_flush_denormal"] is True


def test_env_vars_by_prefix_and_secrets_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("VLLM_API_KEY", "do-not-print")
    monkeypatch.setenv("UNRELATED_SETTING_XYZ", "1")
    env_vars = denv.fingerprint().env_vars
    assert env_vars["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] == "1"
    assert env_vars["MKL_CBWR"] == "AVX2"
    assert env_vars["VLLM_API_KEY"] == "<redacted>"
    assert "UNRELATED_SETTING_XYZ" not in env_vars


def test_fingerprint_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("probe failed")

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", boom)
    monkeypatch.setattr(denv, "_cuda", boom)
    monkeypatch.setattr(denv, "_cuda_compile_options", boom)
    fp = denv.fingerprint().to_dict()
    assert fp["platform"]["torch_cpu_capability"].startswith("error: RuntimeError")
    assert fp["cuda"] == {"error": "error: RuntimeError: probe failed"}
    assert fp["cuda_compile_options"].startswith("error:")
    assert fp["versions"]["torch"] == torch.__version__  # other sections unaffected


def test_missing_optional_modules_read_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    real = denv._installed
    monkeypatch.setattr(denv, "_installed", lambda m: False if m.split(".")[0] in {"cupy", "numba", "detkit"} else real(m))
    monkeypatch.setattr(denv, "_dist_version", lambda *names: "absent")
    fp = denv.fingerprint().to_dict()
    assert fp["versions"]["cupy"] == "absent"
    assert fp["platform"]["numba_target_cpu"] == "absent"
    assert fp["cuda_compile_options"] == "absent"
    assert fp["cuda"]["cupy_runtime"] == "absent"


def test_fingerprint_differences() -> None:
    a = denv.fingerprint().to_dict()
    b = json.loads(json.dumps(a))
    assert denv.fingerprint_differences(a, b) == {}
    b["platform"]["torch_cpu_capability"] = "DEFAULT"
    del b["env_vars"]["MKL_CBWR"]
    d = denv.fingerprint_differences(a, b)
    assert d["platform.torch_cpu_capability"] == (a["platform"]["torch_cpu_capability"], "DEFAULT")
    assert d["env_vars.MKL_CBWR"] == (a["env_vars"]["MKL_CBWR"], "<missing>")
    assert len(d) == 2


def test_fingerprint_validates_sections() -> None:
    with pytest.raises(ValueError, match="versions must be a dict"):
        denv.Fingerprint(versions="x")  # type: ignore[arg-type]


def test_cli_env_json() -> None:
    result = CliRunner().invoke(app, ["env", "--json"], env={"TORCHINDUCTOR_MAX_AUTOTUNE": "1"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # JSON only on stdout
    assert set(data) == SECTIONS
    assert data["env_vars"]["TORCHINDUCTOR_MAX_AUTOTUNE"] == "1"
    assert data["versions"]["torch"] == torch.__version__


def test_cli_env_table() -> None:
    result = CliRunner().invoke(app, ["env"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    for title in ("Versions", "CPU and platform", "Threads", "BLAS / LAPACK", "CUDA", "torch determinism flags", "Environment variables"):
        assert title in out
    assert torch.backends.cpu.get_cpu_capability() in out
    assert "CUBLAS_WORKSPACE_CONFIG" in out


def test_env_json_as_a_real_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "detkit", "env", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert data["threads"]["omp_max_threads"] == 1
    assert data["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_a_broken_cupy_costs_only_its_own_entries(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """cupy installed but failing to import (built for another CUDA) on a machine where torch
    sees a GPU: the import raised inside the cuda section, which became only
    {"error": ...}, losing the driver, the devices and torch's CUDA build."""
    import importlib

    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text('raise ImportError("CuPy failed to load libnvrtc.so.12")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    importlib.invalidate_caches()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cuda = denv.fingerprint().to_dict()["cuda"]
    assert "error" not in cuda
    assert cuda["available"] is True and cuda["devices"] == [] and "driver" in cuda
    assert cuda["cupy_runtime"] == "error: ImportError: CuPy failed to load libnvrtc.so.12"
