"""`detkit audit` and `detkit report` end to end, as subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from detkit.audit.runner import isa_environment
from detkit.report import load_report

SWEEP = "1,2,3,4,5"
SMALL = ("--ops", "sum", "--impl", "torch", "--batch-sizes", "1,2", "--runs", "2", "--hidden", "64")


def detkit(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detkit", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_torch_mm_and_linear_are_batch_variant_here(tmp_path: Path) -> None:
    proc = detkit("audit", "--ops", "mm,linear", "--impl", "torch", "--fail-on", "batch-variance",
                  "--batch-sizes", SWEEP, "--runs", "2", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert "--fail-on batch-variance: 2 failing" in proc.stdout
    # the live table is explained under it: the impls that ran and the cells
    assert "torch: torch's own kernels" in proc.stdout and "deterministic:" not in proc.stdout
    assert "FAIL b>=N: a row first changes at batch size N" in proc.stdout
    data = load_report(tmp_path / "report.json")
    assert data["kind"] == "audit" and data["status"] == "complete"
    ops = [r for r in data["results"] if r["record"] == "op"]
    assert {(r["op"], r["impl"]) for r in ops} == {("mm", "torch"), ("linear", "torch")}
    for r in ops:
        res = r["checks"]["batch-variance"]
        assert res["verdict"] == "fail" and res["first_b"] in (2, 3, 4, 5) and res["max_ulp"] >= 1
        assert r["inputs"]["input"]["shape"] == [5, 4096] and r["seed"] == 0
    assert data["summary"]["fail_on"]["passed"] is False
    assert data["config"]["command"].startswith("detkit audit --ops mm,linear --impl torch")
    assert (tmp_path / "report.md").read_text().startswith("# detkit audit")
    assert "<svg" in (tmp_path / "report.html").read_text()


def test_the_same_ops_pass_under_detkit_mode(tmp_path: Path) -> None:
    proc = detkit("audit", "--ops", "mm,linear", "--impl", "detkit", "--fail-on", "batch-variance",
                  "--batch-sizes", SWEEP, "--runs", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ops = [r for r in load_report(tmp_path / "report.json")["results"] if r["record"] == "op"]
    assert {r["op"] for r in ops} == {"mm", "linear"}
    assert all(r["checks"]["batch-variance"]["verdict"] == "pass" for r in ops)


def test_json_on_stdout_and_exit_0_without_fail_on() -> None:
    proc = detkit("audit", "--ops", "sum,argmax", "--impl", "torch,deterministic", "--batch-sizes", "1,2,3",
                  "--runs", "2", "--hidden", "256", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "complete" and data["config"]["hidden"] == 256
    ops = [(r["op"], r["impl"]) for r in data["results"] if r["record"] == "op"]
    assert ops == [("sum", "torch"), ("sum", "deterministic"), ("argmax", "torch"), ("argmax", "deterministic")]
    assert data["summary"]["advice"]


def test_a_name_given_twice_runs_once() -> None:
    proc = detkit("audit", "--ops", "sum,sum", "--impl", "torch,torch", "--dtype", "float32,float32",
                  "--batch-sizes", "1,2", "--runs", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["config"]["dtypes"] == ["float32"] and data["config"]["ops"] == ["sum"]
    assert [(r["op"], r["impl"], r["dtype"]) for r in data["results"] if r["record"] == "op"] == [("sum", "torch", "float32")]


def test_config_records_catalogue_names_in_the_order_they_run() -> None:
    """report-schema.md: config.ops holds catalogue names; an alias or a repeat there made two
    reports of the same audit differ (and named no op of the records)."""
    from detkit.audit.runner import AuditConfig

    cfg = AuditConfig(ops=("attention", "sum", "sdpa", "sum"))
    assert cfg.ops == ("sum", "scaled_dot_product_attention")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ops", "mm,frobnicate"], "unknown op 'frobnicate'"),
        (["--ops", ""], "--ops names no op"),
        (["--ops", " , "], "--ops names no op"),
        (["--impl", ""], "--impl names no implementation"),
        (["--batch-sizes", "0,2"], "from 1 to"),
        (["--batch-sizes", "1,two"], "comma-separated integers"),
        (["--batch-sizes", "4"], "at least two"),
        (["--batch-sizes", "2,2"], "without repeats"),
        (["--impl", "cublas"], "unknown implementation"),
        (["--fail-on", "speed"], "unknown check"),
        (["--fail-on", "isa-variance"], "--fail-on isa-variance needs --isa"),
        (["--fail-on", ""], "--fail-on names no check"),
        (["--fail-on", " , "], "--fail-on names no check"),
        (["--dtype", "int8"], "unknown dtype"),
        (["--dtype", ","], "no dtypes selected"),
        (["--runs", "1"], "at least 2"),
        (["--hidden", "3"], "--hidden"),
        (["--out", __file__], "is a file"),
        (["--out", f"{__file__}/report"], "cannot create this directory"),
        (["--seed", "-1"], "--seed must be an integer from 0"),
        # a small audit, so that a check made only after the run fails fast
        (["--out", "{tmp}/has-json", *SMALL], "report.json is a directory"),
        (["--out", "{tmp}/has-md", *SMALL], "report.md is a directory"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_error(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # in-process through the real entry point (the subprocess path: the --device cuda test)
    from detkit.cli import main

    for name in ("json", "md"):  # a report file's path taken by a directory
        (tmp_path / f"has-{name}" / f"report.{name}").mkdir(parents=True)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["detkit", "audit", *args, *out])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_device_cuda_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    proc = detkit("audit", "--device", "cuda", "--ops", "mm", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "--device cuda" in proc.stderr and "--device cpu" in proc.stderr
    assert not (tmp_path / "report.json").exists()


def test_interrupt_leaves_a_valid_partial_report(tmp_path: Path) -> None:
    # many small records so that SIGINT lands mid-run
    proc = subprocess.Popen(
        [sys.executable, "-m", "detkit", "audit", "--impl", "torch", "--dtype", "float32,bfloat16,float16",
         "--batch-sizes", "1,2,3,4,5,6,7,8,16,32", "--runs", "4", "--hidden", "1024", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    path = tmp_path / "report.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if path.exists():
                try:
                    records = [r for r in json.loads(path.read_text())["results"] if r["record"] == "op"]
                except json.JSONDecodeError:  # pragma: no cover - the writer replaces atomically
                    pytest.fail("report.json was observed half-written")
                if len(records) >= 2:
                    break
            assert proc.poll() is None, "the audit finished before it could be interrupted"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    data = load_report(path)
    assert data["status"] == "partial"
    done = [r for r in data["results"] if r["record"] == "op"]
    assert 2 <= len(done) < 18 * 3
    assert all(r["status"] == "ok" and set(r["checks"]) >= {"batch-variance", "run-to-run"} for r in done)
    assert "PARTIAL" in (tmp_path / "report.md").read_text()
    rendered = detkit("report", str(path), "--format", "md")
    assert rendered.returncode == 0 and "PARTIAL" in rendered.stdout


def test_report_rerenders_every_format(tmp_path: Path) -> None:
    assert detkit("audit", "--ops", "softmax,topk", "--impl", "torch", "--batch-sizes", "1,2,4", "--runs", "2",
                  "--hidden", "256", "--out", str(tmp_path)).returncode == 0
    md = detkit("report", str(tmp_path / "report.json"), "--format", "md")
    assert md.returncode == 0 and md.stdout == (tmp_path / "report.md").read_text()
    page = detkit("report", str(tmp_path), "--format", "html")  # a directory works too
    assert page.returncode == 0 and page.stdout == (tmp_path / "report.html").read_text()
    table = detkit("report", str(tmp_path), "--format", "table")
    assert table.returncode == 0 and "softmax" in table.stdout and "topk" in table.stdout
    as_json = detkit("report", str(tmp_path), "--format", "json")
    assert json.loads(as_json.stdout) == load_report(tmp_path / "report.json")
    out = tmp_path / "again.html"
    assert detkit("report", str(tmp_path), "--format", "html", "--out", str(out)).returncode == 0
    assert out.read_text() == page.stdout


def test_report_errors(tmp_path: Path) -> None:
    missing = detkit("report", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "no report at" in missing.stderr and "pytest --detkit-report" in missing.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    wrong = detkit("report", str(other))
    assert wrong.returncode == 2 and "not a detkit report" in wrong.stderr
    bad_format = detkit("report", str(other), "--format", "pdf")
    assert bad_format.returncode == 2
    saved_json = json.loads((Path(__file__).resolve().parent.parent / "reports" / "cpu-audit" / "report.json").read_text())
    (tmp_path / "odd.json").write_text(json.dumps({**saved_json, "kind": "benchmark"}))
    odd = detkit("report", str(tmp_path / "odd.json"))
    assert odd.returncode == 2 and "report kind 'benchmark'" in odd.stderr and "Traceback" not in odd.stderr
    # --out must be a writable file path: a directory, or a path under a file, is exit 2 without a traceback
    saved = Path(__file__).resolve().parent.parent / "reports" / "cpu-audit"
    for out, message in ((tmp_path, "is a directory"), (other / "x.md", "is a file, not a directory")):
        proc = detkit("report", str(saved), "--format", "json", "--out", str(out))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_report_whose_results_lack_what_the_renderers_read_is_a_report_error(tmp_path: Path) -> None:
    # a hand-edited entry was a KeyError traceback inside the renderer
    from detkit.errors import ReportError
    from detkit.report import ReportWriter

    saved = load_report(Path(__file__).resolve().parent.parent / "reports" / "cpu-audit" / "report.json")
    op = next(i for i, r in enumerate(saved["results"]) if r.get("record") == "op")
    del saved["results"][op]["checks"]
    (tmp_path / "audit.json").write_text(json.dumps(saved))
    with pytest.raises(ReportError, match=rf"results\[{op}\] lacks checks; the file is damaged"):
        load_report(tmp_path / "audit.json")
    writer = ReportWriter("pytest", {}, tmp_path / "pytest.json")
    writer.add_result({"type": "check", "check": "bitwise", "verdict": "PASS"})
    with pytest.raises(ReportError, match=r"results\[0\] lacks test;"):
        load_report(tmp_path / "pytest.json")
    proc = detkit("report", str(tmp_path / "pytest.json"))
    assert proc.returncode == 2 and "lacks test" in proc.stderr and "Traceback" not in proc.stderr


def test_list_ops(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from detkit.cli import main

    monkeypatch.setattr(sys, "argv", ["detkit", "audit", "--list-ops"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("mm", "scaled_dot_product_attention", "topk", "batch-variance", "decode-prefill"):
        assert name in out


def test_list_ops_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # --json printed the list on stderr and nothing on stdout
    from detkit.audit.catalogue import CATALOGUE
    from detkit.audit.checks import CHECKS
    from detkit.cli import main

    monkeypatch.setattr(sys, "argv", ["detkit", "audit", "--list-ops", "--json"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    listed = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in listed["ops"]] == [spec.name for spec in CATALOGUE]
    assert all(o["family"] and o["summary"] for o in listed["ops"])
    assert list(listed["checks"]) == list(CHECKS)


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") is not None, reason="ISA pinned by the environment")
def test_isa_check_runs_subprocesses(tmp_path: Path) -> None:
    if torch.backends.cpu.get_cpu_capability().lower() == "default":
        pytest.skip("this CPU has no capability above default to compare with")
    proc = detkit("audit", "--ops", "sum", "--impl", "torch", "--batch-sizes", "1,2", "--runs", "2",
                  "--hidden", "1024", "--isa", "--json")
    assert proc.returncode == 0, proc.stderr
    ops = [r for r in json.loads(proc.stdout)["results"] if r["record"] == "op"]
    for r in ops:
        res = r["checks"]["isa-variance"]
        assert res["verdict"] in ("pass", "fail"), res
        assert {p["isa"] for p in res["per"]} >= {"default"}
        assert all(p["actual"].lower() == p["isa"] for p in res["per"])
        # the worker ran with oneDNN and MKL capped too, as it recorded itself
        assert all(p["environment"] == isa_environment(p["isa"], r["impl"]) for p in res["per"]), res["per"]
        assert all(p["environment"]["ONEDNN_MAX_CPU_ISA"] for p in res["per"])


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") is not None, reason="ISA pinned by the environment")
def test_isa_workers_report_each_result_as_progress(tmp_path: Path) -> None:
    # a capped worker takes minutes over half-precision matmuls: the parent shows what it is at
    from detkit.audit.runner import AuditConfig, Event, _isa_others, _run_isa_workers

    if not _isa_others(torch.device("cpu")):
        pytest.skip("this CPU has no capability above default to compare with")
    events: list[Event] = []
    cfg = AuditConfig(ops=("sum", "mean"), impls=("torch", "detkit"), batch_sizes=(1, 2), hidden=64, isa=True)
    done = _run_isa_workers(cfg, ["torch", "detkit"], tmp_path, events.append)
    phases = [e.text for e in events if e.kind == "phase"]
    assert phases[:4] == ["ATEN_CPU_CAPABILITY=default: sum float32 torch (1/2)",
                          "ATEN_CPU_CAPABILITY=default: mean float32 torch (2/2)",
                          "ATEN_CPU_CAPABILITY=default: sum float32 detkit (1/2)",
                          "ATEN_CPU_CAPABILITY=default: mean float32 detkit (2/2)"], phases
    assert len(phases) == 4 * len(done)
    for isa, (folder, _) in done.items():
        assert {p.name for p in folder.glob("*.pt")} == {f"{op}.{impl}.float32.pt" for op in ("sum", "mean")
                                                         for impl in ("torch", "detkit")}
        # torch's libraries capped to the ISA; detkit's BLAS tiles keep this CPU's (their
        # first-use verification would take tens of minutes on a capped oneDNN)
        assert json.loads((folder / "environment.torch.json").read_text()) == isa_environment(isa)
        detkit_env = json.loads((folder / "environment.detkit.json").read_text())
        assert detkit_env["ATEN_CPU_CAPABILITY"] == isa and detkit_env["ONEDNN_MAX_CPU_ISA"] is None


@pytest.fixture
def portable_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The portable implementation cannot run here (as on a machine without its kernels)."""
    from detkit.audit import impls
    from detkit.errors import BackendUnavailable

    def missing() -> object:
        raise BackendUnavailable("no portable kernels on this machine")

    monkeypatch.setitem(impls.FACTORIES, "portable", missing)


@pytest.mark.usefixtures("portable_unavailable")
def test_explicitly_requested_unavailable_impl_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from detkit.cli import main

    monkeypatch.setattr(sys, "argv", ["detkit", "audit", "--ops", "sum", "--impl", "torch,portable",
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "portable" in err and "no portable kernels on this machine" in err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.usefixtures("portable_unavailable")
def test_the_recorded_command_reruns_the_same_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shlex

    from detkit.cli import main

    args = ["--ops", "sum", "--batch-sizes", "1,2", "--runs", "2", "--hidden", "64", "--fail-on", "batch-variance"]

    def run(argv: list[str], out: Path) -> tuple[int | None, dict[str, Any]]:
        monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
        with pytest.raises(SystemExit) as exc:
            main()
        return exc.value.code, load_report(out / "report.json")

    code, first = run(["detkit", "audit", *args], tmp_path / "first")
    assert code in (0, None)
    command = first["config"]["command"]
    assert "--fail-on batch-variance" in command
    # the default audits every available impl: the command must not name the unavailable one
    code, again = run(shlex.split(command), tmp_path / "again")
    assert code in (0, None), capsys.readouterr().err
    assert again["config"] == first["config"]


_CRASH = """
import os, sys
from detkit.audit import catalogue
from detkit.cli import main

def crash(input):
    os._exit(3)  # a hard crash: no exception, no cleanup

bad = catalogue.OpSpec("crash", "reduction", "dies", catalogue.OPS["sum"].build, crash)
catalogue.OPS["crash"] = bad
catalogue.CATALOGUE = (*catalogue.CATALOGUE, bad)
sys.argv = ["detkit", "audit", "--ops", "sum,mean,crash", "--impl", "torch", "--batch-sizes", "1,2",
            "--runs", "2", "--hidden", "64", "--out", sys.argv[1]]
main()
"""


def test_a_hard_crash_leaves_a_readable_incomplete_report(tmp_path: Path) -> None:
    # a hard crash cannot remove the audit's temporary directory: keep it inside tmp_path
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], capture_output=True, text=True,
                          timeout=240, check=False, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 3
    data = load_report(tmp_path / "report.json")
    assert data["status"] == "running"  # nobody could mark it: renderers call it incomplete
    assert [r["op"] for r in data["results"] if r["record"] == "op"] == ["sum", "mean"]
    md = detkit("report", str(tmp_path), "--format", "md")
    assert md.returncode == 0 and "INCOMPLETE" in md.stdout and "| sum |" in md.stdout


def test_report_renders_every_kind_it_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from detkit.cli import main
    from detkit.cli.report import RENDERERS
    from detkit.report import KINDS, ReportWriter

    assert set(RENDERERS) == set(KINDS)
    writer = ReportWriter("pytest", {"mode": "off", "args": []}, tmp_path / "report.json")
    writer.add_result({"type": "check", "test": "t.py::test_mm", "check": "batch_invariant", "name": "mm",
                       "verdict": "PASS", "passed": True, "worst_ulp": 0, "detail": {}})
    writer.finish({"checks": 1, "passed": 1, "failed": 0, "verdicts": {"PASS": 1}})
    for fmt, needle in (("md", "detkit pytest report"), ("html", "<!DOCTYPE html>"), ("table", "Checks (1)")):
        monkeypatch.setattr(sys, "argv", ["detkit", "report", str(tmp_path), "--format", fmt])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert needle in out and "test_mm" in out


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text: b"\xff\xfe" + text.encode(), "is not valid JSON"),
        (lambda text: text.replace('"schema_version": 1', '"schema_version": "1"'), "schema_version '1'"),
        (lambda text: text.replace('"schema_version": 1', '"schema_version": null'), "schema_version None"),
        (lambda text: text.replace('"results": [', '"results": null, "x": ['), "field 'results' is NoneType"),
        (lambda text: text.replace('"summary": {', '"summary": [], "x": {'), "field 'summary' is list"),
        (lambda text: text.replace('"results": [', '"results": [1, '), "'results' holds something other"),
    ],
)
def test_a_damaged_report_is_a_report_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], damage: Any, message: str
) -> None:
    """Before, these raised UnicodeDecodeError / TypeError / AttributeError (exit 1, a traceback)
    from load_report or a renderer; `detkit report` says what is wrong and exits 2."""
    from detkit.cli import main
    from detkit.errors import ReportError
    from detkit.report import ReportWriter

    writer = ReportWriter("audit", {"ops": ["mm"]}, tmp_path / "ok.json")
    writer.add_result({"record": "op", "op": "mm"})
    writer.finish({"advice": []})
    damaged = damage((tmp_path / "ok.json").read_text())
    path = tmp_path / "report.json"
    path.write_bytes(damaged) if isinstance(damaged, bytes) else path.write_text(damaged)
    with pytest.raises(ReportError, match=re.escape(message)):
        load_report(path)
    monkeypatch.setattr(sys, "argv", ["detkit", "report", str(path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_non_finite_numpy_values_are_written_as_strict_json(tmp_path: Path) -> None:
    """Before, a float32/float16 inf or an array holding a NaN raised ValueError (the record
    and the report were lost), and a float64 NaN was written as "np.float64(nan)"."""
    import numpy as np

    from detkit.report import ReportWriter

    class Stats:
        def to_dict(self) -> dict[str, Any]:
            return {"max": float("inf")}

    writer = ReportWriter("pytest", {}, tmp_path / "report.json")
    writer.add_result({"type": "record", "f32": np.float32("inf"), "f16": np.float16("-inf"),
                       "f64": np.float64("nan"), "array": np.array([1.0, np.nan]), "stats": Stats()})
    text = (tmp_path / "report.json").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))["results"][0]
    assert record == {"type": "record", "f32": "inf", "f16": "-inf", "f64": "nan", "array": [1.0, "nan"],
                      "stats": {"max": "inf"}}


def _audit_in_process(out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                      *extra: str) -> tuple[int, str]:
    """`detkit audit SMALL --out out` through the real entry point: (exit code, stdout + stderr)."""
    from detkit.cli import main

    monkeypatch.setattr(sys, "argv", ["detkit", "audit", *SMALL, "--out", str(out), *extra])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out + captured.err


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)  # the handler runs here, as a Ctrl-C landing inside real work


def test_interrupt_while_implementations_are_probed_says_so_and_leaves_a_partial_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the first check: exit 130 with a message (it was a silent 130), and a partial
    report, so that --out never holds a previous run's report as if it were this one's."""
    import detkit.audit.runner as runner

    (tmp_path / "report.json").write_text("an earlier run's report")

    def probe(*_a: Any) -> Any:
        _ctrl_c()
        pytest.fail("the Ctrl-C did not stop the probe")

    monkeypatch.setattr(runner, "probe_impls", probe)
    code, text = _audit_in_process(tmp_path, monkeypatch, capsys)
    assert code == 130
    assert "interrupted" in text and "before any op was audited" in text
    data = load_report(tmp_path / "report.json")
    assert data["status"] == "partial" and not [r for r in data["results"] if r["record"] == "op"]
    assert "PARTIAL" in (tmp_path / "report.md").read_text()


def test_a_ctrl_c_that_a_library_swallows_still_ends_the_audit_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C landing in torch's lazy imports (the mode's first use) came back as an
    AttributeError: the implementations were reported unavailable and the audit exited 0."""
    import detkit.audit.runner as runner

    real = runner.probe_impls

    def probe(*args: Any) -> Any:
        try:
            _ctrl_c()
        except KeyboardInterrupt:  # as a library's `except BaseException` does
            pass
        return real(*args)

    monkeypatch.setattr(runner, "probe_impls", probe)
    code, text = _audit_in_process(tmp_path, monkeypatch, capsys)
    assert code == 130, text
    assert "interrupted" in text
    assert load_report(tmp_path / "report.json")["status"] == "partial"


def test_interrupt_while_the_report_is_written_still_writes_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit finished; a Ctrl-C while report.md was rendered left report.json 'running'
    or report.html missing, with a silent 130. The files are finished first, then exit 130."""
    import detkit.audit.render as render

    real = render.to_markdown

    def to_markdown(report: dict[str, Any]) -> str:
        _ctrl_c()
        return real(report)

    monkeypatch.setattr(render, "to_markdown", to_markdown)
    code, text = _audit_in_process(tmp_path, monkeypatch, capsys)
    assert code == 130, text
    assert "interrupted" in text
    data = load_report(tmp_path / "report.json")
    assert data["status"] == "complete" and [r for r in data["results"] if r["record"] == "op"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()


def test_a_failure_halfway_keeps_the_finished_records_in_a_partial_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error that stops the audit (a full disk, a bug in the live table) left report.json
    'running' and no report.md or .html: it ends as on Ctrl-C, then exits 3 with its traceback."""
    import detkit.audit.runner as runner

    real, calls = runner._record, []

    def record(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(runner, "_record", record)
    code, text = _audit_in_process(tmp_path, monkeypatch, capsys, "--impl", "torch,deterministic")
    assert code == 3, text
    assert "No space left on device" in text
    data = load_report(tmp_path / "report.json")
    assert data["status"] == "partial"
    assert [(r["op"], r["impl"]) for r in data["results"] if r["record"] == "op"] == [("sum", "torch")]
    assert any("No space left on device" in e["error"] for e in data["errors"])
    assert "PARTIAL" in (tmp_path / "report.md").read_text() and (tmp_path / "report.html").exists()
