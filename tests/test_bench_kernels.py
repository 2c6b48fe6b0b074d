"""benchmarks/bench_kernels.py: its options and what it records (no timing asserted)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_kernels.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    threads = torch.get_num_threads()
    yield load_script(BENCH, monkeypatch)
    torch.set_num_threads(threads)


def test_threads_sets_the_count_both_sides_run_with_and_records_it(bench: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--only", "rms_norm", "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["threads"] == 1 and torch.get_num_threads() == 1
    assert [r["kernel"] for r in doc["results"]] == ["rms_norm"] * 3
    assert all(r["detkit_ms"] > 0 and r["torch_ms"] > 0 for r in doc["results"])


@pytest.mark.parametrize("bad", ["-1", "two"])
def test_a_bad_thread_count_exits_2(bench: Any, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--threads", bad])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err


def test_an_interruption_keeps_the_finished_cases(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_cases", lambda quick: [
        bench.Case("first", "1x1", "float32", lambda: None, lambda: None),
        bench.Case("second", "1x1", "float32", interrupted, lambda: None)])
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--json", str(out)])
    assert [r["kernel"] for r in json.loads(out.read_text())["results"]] == ["first"]
    assert "first" in capsys.readouterr().out


def test_json_to_stdout_is_the_only_thing_on_stdout(bench: Any, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "_cases", lambda quick: [bench.Case("first", "1x1", "float32", lambda: None,
                                                                   lambda: None)])
    assert bench.main(["--quick", "--json", "-"]) == 0
    out = capsys.readouterr()
    assert [r["kernel"] for r in json.loads(out.out)["results"]] == ["first"]  # `| jq` works
    assert "first" in out.err  # the table still shows
