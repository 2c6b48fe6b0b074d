"""The wheel a user installs: the files the code loads are in it, and nothing else.

CI runs from an editable install, which finds ``cuda_kernels/`` next to the package; only
a built wheel shows whether the ``detkit/cuda_kernels`` symlink really ships the sources.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_cuda_sources_and_py_typed_and_no_caches(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    from detkit.kernels.cuda_loader import COMMON_HEADER, KERNEL_FILES

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    # as they are in a checkout: the symlink kept, __pycache__ (numba's caches too) included
    for name in ("detkit", "cuda_kernels", "probes"):
        shutil.copytree(ROOT / name, src / name, symlinks=True)
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"],
        cwd=src, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(out / proc.stdout.split()[-1]) as whl:
        names = set(whl.namelist())
        entry_points = whl.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for f in (COMMON_HEADER, *KERNEL_FILES):
        assert f"detkit/cuda_kernels/{f}" in names, f
    # the shipped probe suites, loadable by name from an installed wheel
    assert {f"detkit/probes/{p.name}" for p in (ROOT / "probes").glob("*.toml")} <= names
    assert "detkit/py.typed" in names
    assert {"detkit/cli/__init__.py", "detkit/probe/suite.py", "detkit/audit/isa_worker.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".nbi", ".nbc"))]
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/", "reports/"))]
    assert "detkit = detkit.cli:main" in entry_points and "detkit = detkit.pytest_plugin" in entry_points
