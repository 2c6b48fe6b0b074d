"""The GPU benchmark's bookkeeping, run on the CPU with a stand-in timer (the kernels are
never called): every case is recorded, the targets are checked, and an interruption
keeps the finished cases on disk. The GPU numbers themselves come from scripts/gpu-check."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script
from test_cuda_compile import KNOWN_SPILLS  # the spills the compile check allows, with reasons

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cuda.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch, compiled_kernels: dict) -> Any:
    # compiled_kernels: the tile sweep reads real sm_90 ptxas reports from the disk cache
    mod = load_script(BENCH, monkeypatch)
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "MATMUL_KN", (64,))
    monkeypatch.setattr(mod, "ROW_LEN", 32)
    monkeypatch.setattr(mod, "ATTENTION_CASES", (("decode", 1, 16), ("prefill", 8, 8)))
    monkeypatch.setattr(mod, "GROUPED_CASES", ((4, 64, 32, 8),))
    monkeypatch.setattr(mod, "TILE_KN", 64)
    monkeypatch.setattr(mod, "TILE_M", (1, 16))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__="0-test"))
    from detkit.kernels import cuda as kc

    # a stand-in GPU that grants no shared memory beyond the default 48 KiB
    monkeypatch.setattr(kc, "fits", lambda cfg, dev: cfg.smem <= 48 * 1024)
    # an sm_90 with 132 SMs holding two CTAs of any k-major kernel, one of any n-major one
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(kc, "_majors", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(kc, "ctas_per_sm", lambda cfg, dev, kmajor=True: 2 if kmajor else 1)
    # the kernels are never called: the stand-in says only the first configuration keeps the bits
    monkeypatch.setattr(mod, "bits_agree", lambda x, w, configs: {c.name: i == 0 for i, c in enumerate(configs)})
    return mod


def test_every_case_is_recorded_with_its_targets(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch takes 1 ms; detkit 1.25 ms (speed 0.8), portable 4 ms (0.25)
    times = iter([1.0, 1.25, 4.0] * 1000)
    monkeypatch.setattr(bench, "time_call", lambda fn, min_time: next(times))
    cases = ["--only", "matmul", "--only", "rows", "--only", "attention"]
    rc = bench.main([*cases, "--json", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")])
    assert rc == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["complete"] and data["meta"]["device"] == "stand-in GPU"
    ops = [(r["op"], r["dtype"]) for r in data["results"]]
    n_mm = len(bench.MATMUL_M)
    assert ops.count(("matmul", "bfloat16")) == n_mm and ops.count(("matmul", "float32")) == n_mm
    assert ops.count(("softmax", "float32")) == len(bench.ROWS) and ops.count(("attention", "bfloat16")) == 2
    assert {r["speed"] for r in data["results"]} == {0.8} and {r["portable_speed"] for r in data["results"]} == {0.25}
    checks = {c["case"]: c for c in data["targets"]}
    assert checks["matmul bf16 M=1 K=N=64 portable=False"]["met"]          # needs 0.8
    assert not checks["matmul bf16 M=256 K=N=64 portable=False"]["met"]    # needs 0.9
    assert not checks["matmul fp32 M=16 K=N=64 portable=True"]["met"]      # needs 0.5
    assert not checks["softmax bfloat16 1x32 portable=False"]["met"]       # needs 0.9
    assert "| missed target |" in (tmp_path / "b.md").read_text()
    # The tile sweep (a run of its own here: it times 1 + one per configuration per case).
    assert bench.main(["--only", "tiles", "--json", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    from detkit.kernels import cuda as kc
    from detkit.kernels import cuda_loader

    assert [(t["dtype"], t["m"]) for t in data["tiles"]] == [("bfloat16", 1), ("bfloat16", 16), ("float32", 1),
                                                              ("float32", 16)]
    small = {c.name for c in kc.TILE_CATALOGUE[torch.bfloat16] if c.smem <= 48 * 1024}
    assert set(data["tiles"][0]["config_ms"]) == small and len(small) < len(kc.TILE_CATALOGUE[torch.bfloat16])
    assert data["tile_choice"]["bfloat16"]["best"] in data["tiles"][0]["config_ms"]
    assert "Best single configuration for float32" in (tmp_path / "b.md").read_text()
    # n-contiguous B is timed at the largest M only, for every configuration swept
    assert [bool(t["nmajor_ms"]) for t in data["tiles"]] == [False, True, False, True]
    assert set(data["tiles"][1]["nmajor_ms"]) == set(data["tiles"][1]["config_ms"])
    assert "B n-contiguous (x @ W, W stored K x N), bfloat16, M=16: torch" in (tmp_path / "b.md").read_text()
    # each dtype's table has its own catalogue's columns, so every swept speed is shown
    for line in (tmp_path / "b.md").read_text().splitlines():
        if line.startswith(("| bfloat16 | 1 | ", "| float32 | 1 | ")):
            assert " - " not in line, line
    assert data["tiles"][0]["same_bits_as_default"][kc.TC_TAGS[0]] is True
    differ = f"`bfloat16 {kc.TILE_CATALOGUE[torch.bfloat16][1].name}`"
    assert differ in (tmp_path / "b.md").read_text().split("Bits differ from the table's default configuration:")[1]
    # What each swept configuration occupies: ptxas's registers (a real sm_90 compile here)
    # and the stand-in driver's CTAs per SM, with the grids' waves.
    res = {(r["dtype"], r["config"]): r for r in data["tile_resources"]}
    assert set(res) == {(t["dtype"], n) for t in data["tiles"] for n in t["config_ms"]}
    default = kc.MATMUL_TILES[(torch.bfloat16, 9)]
    want = cuda_loader.unit_resources("matmul.cu", "sm_90")[f"{default.kernel}_kmajor"].registers
    r = res[("bfloat16", default.name)]
    assert r["registers"]["kmajor"] == want and r["ctas_per_sm"] == {"kmajor": 2, "nmajor": 1}
    assert r["grid_ctas"] == {"1": 1, "16": 1} and r["threads"] == default.threads and r["sms"] == 132
    row = next(line for line in (tmp_path / "b.md").read_text().splitlines() if f"| bfloat16 | {default.name} |" in line
               and "/" in line)
    assert f"| {want}/" in row and "| 2/1 | 1 | 0.01 | 1 | 0.01 |" in row  # 1 CTA / (132 SMs x 1)


def test_a_failed_resource_query_keeps_the_sweep(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detkit.kernels import cuda as kc

    monkeypatch.setattr(bench, "time_call", lambda fn, min_time: 1.0)

    def broken(cfg: Any, dev: Any, kmajor: bool = True) -> int:
        raise RuntimeError("CUDA_ERROR_INVALID_HANDLE")

    monkeypatch.setattr(kc, "ctas_per_sm", broken)
    assert bench.main(["--only", "tiles", "--json", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert len(data["tiles"]) == 4 and data["tile_resources"] == [] and data["meta"]["complete"]
    assert "CUDA_ERROR_INVALID_HANDLE" in data["meta"]["tile_resources_error"]
    assert "Tile resources not measured: RuntimeError: CUDA_ERROR_INVALID_HANDLE" in (tmp_path / "b.md").read_text()


def test_the_sweep_leaves_wgmma_out_when_asked(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu-check passes --no-wgmma when the wgmma tests failed: the sweep must not run them."""
    from detkit.kernels import cuda as kc

    monkeypatch.setattr(bench, "time_call", lambda fn, min_time: 1.0)
    monkeypatch.setattr(kc, "fits", lambda cfg, dev: True)  # an H100: everything fits
    for flags, has_wgmma in (([], True), (["--no-wgmma"], False)):
        assert bench.main(["--only", "tiles", "--json", str(tmp_path / "b.json"), *flags]) == 0
        data = json.loads((tmp_path / "b.json").read_text())
        names = set(data["tiles"][0]["config_ms"])
        assert any(n.startswith("wgmma_") for n in names) is has_wgmma, names
        assert data["meta"]["wgmma_in_sweep"] is has_wgmma


def test_tile_choice_maximises_the_worst_case(bench: Any) -> None:
    same = {"fast_small": True, "even": True}
    sweeps = [bench.TileSweep("bfloat16", 1, 4096, 1.0, {"fast_small": 1.1, "even": 1.4}, same),
              bench.TileSweep("bfloat16", 4096, 4096, 1.0, {"fast_small": 2.0, "even": 1.25}, same)]
    choice = bench.tile_choice(sweeps)["bfloat16"]
    assert choice["best"] == "even" and choice["worst_speed"] == 0.714


def test_an_interruption_keeps_the_finished_cases(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def timer(fn: Any, min_time: float) -> float:
        calls["n"] += 1
        if calls["n"] > 3 * 5:  # five whole cases, then Ctrl-C
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(bench, "time_call", timer)
    rc = bench.main(["--json", str(tmp_path / "b.json"), "--only", "matmul"])
    assert rc == 130
    data = json.loads((tmp_path / "b.json").read_text())
    assert len(data["results"]) == 5 and not data["meta"]["complete"]


def _gpu_check_without_a_gpu(out: Path, *, compile_s: int, timeout: int) -> dict[str, Any]:
    """scripts/gpu-check run into ``out`` on this machine, which must exit 1 (no GPU test
    ran); its summary.json."""
    import os
    import subprocess

    script = BENCH.parent.parent / "scripts" / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable, "DETKIT_GPU_CHECK_COMPILE_S": str(compile_s)}
    proc = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine scripts/gpu-check runs for real (minutes)")
def test_gpu_check_without_a_gpu_fails_and_says_why(tmp_path: Path, compiled_kernels: dict) -> None:
    """scripts/gpu-check end to end on this CPU machine: it compiles every kernel, finds
    that no GPU test ran, writes its summary and exits 1 (a skip-only run is no proof).
    Run into a directory holding an earlier run's outputs: a step that writes nothing this
    time (here: no GPU, so no benchmark or audit output) must not leave them in
    summary.json as if they were this run's."""
    import importlib.metadata
    import shutil
    import subprocess

    (tmp_path / "gpu-audit").mkdir()
    (tmp_path / "gpu-audit" / "report.json").write_text("{}")
    (tmp_path / "bench_cuda.json").write_text(json.dumps(
        {"meta": {"device": "an earlier run"}, "targets": [{"met": True}], "tile_choice": "stale"}))
    (tmp_path / "gpu_tests_stale.xml").write_text('<testsuite><testcase classname="t" name="old"/></testsuite>')
    # Without a GPU the check compiles for sm_80 and sm_90 (every unit to CUBIN), which
    # compiled_kernels has put in the disk cache; the limit covers a cold cache on 2 busy cores.
    summary = _gpu_check_without_a_gpu(tmp_path, compile_s=600, timeout=600)
    assert summary["ok"] is False and summary["tests"]["passed"] == 0 and summary["tests"]["skipped"] > 0
    if shutil.which("nvidia-smi") is None:
        assert summary["device"] == ["unknown (nvidia-smi not found)"]
    assert "error" in summary["bench"], summary["bench"]
    assert summary["audit"]["report"] is None
    # the GPU machine's own versions, to read its failures against
    assert summary["versions"]["torch"] == importlib.metadata.version("torch")
    assert summary["versions"]["mode_supported"] is hasattr(torch.library, "get_kernel")
    assert summary["kernels_check"]["ok"] is True and summary["kernels_check"]["exit"] == 0
    assert set(summary["kernels_check"]["files"]) == {"matmul.cu", "rowops.cu", "attention.cu", "solve.cu",
                                                      "matmul_tiles.cu", "matmul_sm90.cu"}
    assert set(summary["kernels_check"]["spilling"]) <= set(KNOWN_SPILLS)
    assert summary["kernels_check"]["ptxas_notes"] == []
    md = (tmp_path / "summary.md").read_text()
    assert "Verdict: FAIL" in md and "No GPU test ran" in md
    # The five test processes partition tests/test_cuda_gpu.py: every test in exactly one.
    groups = summary["tests"]["groups"]
    assert set(groups) == {"wgmma", "matmul", "rows", "attention", "integration"}
    assert all("wgmma" in t for t in groups["wgmma"]["tests"]) and groups["wgmma"]["tests"]
    assert all(g["passed"] + g["failed"] + g["errors"] == 0 and g["skipped"] > 0 for g in groups.values()), groups
    names = [t for g in groups.values() for t in g["tests"]]
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              str(BENCH.parent.parent / "tests" / "test_cuda_gpu.py")],
                             capture_output=True, text=True, check=False)
    collected = [line for line in collect.stdout.splitlines() if "::" in line]
    assert len(names) == len(set(names)) == len(collected), (len(names), len(set(names)), len(collected))


def test_the_summary_says_when_the_compile_check_ran_out_of_time(tmp_path: Path) -> None:
    """The compile check stopped by its time limit leaves no JSON and no stderr: the
    summary says it timed out (and which variable sets the limit), not just 'no JSON'."""
    (tmp_path / "nvidia-smi.txt").write_text("unknown (nvidia-smi not found)\n")
    (tmp_path / "versions.json").write_text("{}")
    (tmp_path / "kernels_check.json").write_text("")
    (tmp_path / "kernels_check.err").write_text("")
    (tmp_path / "kernels_check.rc").write_text("kernels check exit: 124\n")
    summarize = load_script(BENCH.parent.parent / "scripts" / "gpu_check_summary.py")
    assert summarize.main([str(tmp_path), "1", "3", "1"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kernels_check"]["exit"] == 124 and "time limit (1 s" in summary["kernels_check"]["timed_out"]
    assert "time limit" in (tmp_path / "summary.md").read_text()
    assert summary["tests"]["groups"] == {} and "error" in summary["bench"] and summary["ok"] is False


def test_the_summary_lists_what_the_tests_measured(tmp_path: Path) -> None:
    """A GPU test's record_property (e.g. how often torch's own kernel changed bits)
    reaches summary.md and summary.json, with the test that measured it."""
    (tmp_path / "nvidia-smi.txt").write_text("NVIDIA H200, 580, 143771 MiB\n")
    (tmp_path / "versions.json").write_text("{}")
    (tmp_path / "gpu_tests_integration.xml").write_text(
        '<testsuite><testcase classname="t" name="test_index_add"><properties>'
        '<property name="torch_cuda_index_add_runs_differing_of_20" value="20"/></properties></testcase>'
        '<testcase classname="t" name="test_plain"/></testsuite>')
    summarize = load_script(BENCH.parent.parent / "scripts" / "gpu_check_summary.py")
    summarize.main([str(tmp_path), "0", "3", "120"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tests"]["passed"] == 2 and summary["tests"]["measured"] == [
        {"test": "test_index_add", "name": "torch_cuda_index_add_runs_differing_of_20", "value": "20"}]
    assert "- torch_cuda_index_add_runs_differing_of_20: 20" in (tmp_path / "summary.md").read_text()


def test_a_kernel_fault_keeps_the_sweep_and_says_what_stopped_it(bench: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault ends the process's CUDA context: attention runs after the tile sweep, and
    what finished before the fault is written with the error."""
    monkeypatch.setattr(bench, "time_call", lambda fn, min_time: 1.0)

    def faulting_attention(min_time: float, deadline: float) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield  # a generator, as bench_attention

    monkeypatch.setattr(bench, "bench_attention", faulting_attention)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench.main(["--json", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md")])
    data = json.loads((tmp_path / "b.json").read_text())
    assert "illegal memory access" in data["meta"]["error"] and not data["meta"]["complete"]
    assert {r["op"] for r in data["results"]} == {"matmul", "grouped_mm", "grouped_mm per expert", "launch overhead",
                                                  "softmax", "rms_norm", "layer_norm", "cumsum"}
    assert len(data["tiles"]) == 4 and data["tile_choice"]
    assert "**Stopped early by RuntimeError: CUDA error" in (tmp_path / "b.md").read_text()


def test_the_markdown_says_when_cases_are_missing(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_cuda.md is the table that gets published: a run cut short by --budget or by
    Ctrl-C must say so above its 'Targets met: N of M', which counts finished cases only."""
    monkeypatch.setattr(bench, "time_call", lambda fn, min_time: 1.0)
    md = tmp_path / "b.md"
    assert bench.main(["--only", "matmul", "--only", "rows", "--budget", "0", "--md", str(md)]) == 0
    text = md.read_text()
    assert "Targets met: 0 of 0." in text and "budget" in text.split("| op |")[0]
    calls = {"n": 0}

    def timer(fn: Any, min_time: float) -> float:
        calls["n"] += 1
        if calls["n"] > 3:  # one whole case, then Ctrl-C
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(bench, "time_call", timer)
    assert bench.main(["--only", "matmul", "--md", str(md)]) == 130
    text = md.read_text()
    assert "Targets met: 1 of 1." in text and "Interrupted" in text.split("| op |")[0]


def test_a_target_is_met_on_the_unrounded_speed(bench: Any) -> None:
    # speed 0.89951 is stored rounded to 0.9; it does not meet a 0.9 target
    short = bench.Result("matmul", "bfloat16", "M=256 K=N=4096", 0.89951, 1.0, None)
    exact = bench.Result("matmul", "bfloat16", "M=256 K=N=4096", 0.9, 1.0, None)
    assert short.speed == 0.9
    assert [c["met"] for c in bench.targets([short, exact])] == [False, True]


PROFILE = BENCH.parent / "profile_cuda.py"


@pytest.fixture
def profile(monkeypatch: pytest.MonkeyPatch) -> Any:
    """benchmarks/profile_cuda.py with a stand-in GPU: two cases of CPU calls, call times
    and GPU times from a table (the profiler is never started)."""
    mod = load_script(PROFILE, monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    monkeypatch.setattr(mod, "cases", lambda: [("matmul", "bfloat16", "M=1", "table", lambda: "torch", lambda: "detkit"),
                                               ("softmax", "bfloat16", "1x4096", "table", lambda: "torch",
                                                lambda: "detkit")])
    monkeypatch.setattr(mod, "_iters", lambda fn: 5)
    monkeypatch.setattr(mod, "call_ms", lambda fn, iters: {"torch": 0.02, "detkit": 0.05}[fn()])
    monkeypatch.setattr(mod, "gpu_ms", lambda fn, iters: ({"torch": 0.01, "detkit": 0.04}[fn()], [f"{fn()}_kernel x1"]))
    monkeypatch.setattr(mod, "TILE_M", {"bfloat16": (1, 64)})
    monkeypatch.setattr(mod, "tile_gpu_times", lambda deadline: iter(
        [mod.TileGpuTime("bfloat16", m, 0.01, {"128x64x32_2x2_s3": 0.04, "wgmma_64x128x64_s4": 0.02}) for m in (1, 64)]))
    return mod


def test_the_profile_records_call_and_gpu_time_of_both_sides(profile: Any, tmp_path: Path) -> None:
    """Each case's call time and GPU time for torch and detkit, their speeds, the kernels
    each side ran, and the catalogue's GPU times, in the JSON and the Markdown."""
    assert profile.main(["--json", str(tmp_path / "p.json"), "--md", str(tmp_path / "p.md")]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["meta"]["complete"] is True and [r["op"] for r in data["results"]] == ["matmul", "softmax"]
    row = data["results"][0]
    assert row["torch"] == {"call_ms": 0.02, "gpu_ms": 0.01, "kernels": ["torch_kernel x1"]}
    assert row["detkit"]["kernels"] == ["detkit_kernel x1"] and row["call_speed"] == 0.4 and row["gpu_speed"] == 0.25
    assert [t["m"] for t in data["tiles"]] == [1, 64]
    md = (tmp_path / "p.md").read_text()
    assert "| matmul | bfloat16 | M=1 | table | 0.0200 | 0.0100 | 0.0500 | 0.0400 | 0.40 | 0.25 |" in md
    assert "| 64 | 0.0100 | 0.0400 (0.25) | 0.0200 (0.50) |" in md and "Incomplete" not in md


def test_an_exhausted_profile_budget_is_said(profile: Any, tmp_path: Path) -> None:
    """With no time for the GPU times, the call times are kept out (they mean nothing
    alone), the run exits 1 and the Markdown says it is incomplete."""
    assert profile.main(["--budget", "0", "--md", str(tmp_path / "p.md"), "--no-tiles"]) == 1
    assert "Incomplete" in (tmp_path / "p.md").read_text()


def test_a_case_torch_cannot_run_is_skipped_and_said(profile: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """torch._grouped_mm refuses some GPUs: that case is left out, named, and the others
    are still measured."""
    def refusing() -> str:
        raise RuntimeError("grouped gemm is only supported on SM90")

    monkeypatch.setattr(profile, "cases", lambda: [
        ("grouped_mm", "bfloat16", "G=8", "table", refusing, lambda: "detkit"),
        ("softmax", "bfloat16", "1x4096", "table", lambda: "torch", lambda: "detkit")])
    monkeypatch.setattr(profile, "_iters", lambda fn: (fn(), 5)[1])
    assert profile.main(["--json", str(tmp_path / "p.json"), "--md", str(tmp_path / "p.md")]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert [r["op"] for r in data["results"]] == ["softmax"] and data["meta"]["complete"] is True
    assert "Skipped: grouped_mm bfloat16 G=8 table: grouped gemm is only supported on SM90" in (
        tmp_path / "p.md").read_text()


def test_profile_times_are_validated(profile: Any) -> None:
    with pytest.raises(ValueError, match="positive"):
        profile.KernelTime(0.0, 0.01)
    with pytest.raises(ValueError, match="positive"):
        profile.TileGpuTime("bfloat16", 1, 0.01, {"x": 0.0})


def test_the_profile_without_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    mod = load_script(PROFILE, monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.main([]) == 2 and "no CUDA device" in capsys.readouterr().err
