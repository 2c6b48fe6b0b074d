"""benchmarks/bench_portable.py: how its numbers are computed (no timing asserted)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import load_script

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_portable.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_script(BENCH, monkeypatch)


def test_error_stats_show_a_wrong_nan_instead_of_skipping_it(bench: Any) -> None:
    # ulp_error gives NaN where exactly one of result and exact value is NaN.
    stats = bench._error_stats("portable", np.array([0.25, math.nan, 0.5]))
    assert set(stats) == {"portable_max", "portable_mean", "portable_median"}
    assert all(math.isnan(v) for v in stats.values())
    clean = bench._error_stats("torch", np.array([0.25, 0.5, 3.0]))
    assert clean == {"torch_max": 3.0, "torch_mean": pytest.approx(3.75 / 3), "torch_median": 0.5}


def test_torch_and_portable_are_timed_interleaved_after_one_untimed_call(bench: Any) -> None:
    calls: list[str] = []
    ticks = iter(range(1000))

    def clock() -> float:
        return float(next(ticks))

    ref_ms, port_ms = bench._median_ms(lambda: calls.append("torch"), lambda: calls.append("portable"), 3, clock)
    assert calls == ["torch", "portable"] * 4  # the first pair untimed, then alternating
    assert ref_ms == port_ms == 1000.0  # each timed call spans one tick of the fake clock


def test_an_interruption_keeps_the_finished_rows(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys

    import torch

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_cases", lambda quick: [("first", "1", torch.float32, lambda: None, lambda: None),
                                                        ("second", "1", torch.float32, lambda: None, interrupted)])
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench_portable.py", "--repeats", "1", "--json", str(out)])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    assert [r["op"] for r in json.loads(out.read_text())] == ["first"]


def test_accuracy_json_is_strict_json_with_a_wrong_nan(bench: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    row = {"op": "exp", **bench._error_stats("portable", np.array([0.25, math.nan])),
           **bench._error_stats("torch", np.array([0.25, math.inf]))}
    monkeypatch.setattr(bench, "accuracy", lambda: [row])
    out = tmp_path / "acc.json"
    monkeypatch.setattr(sys, "argv", ["bench_portable.py", "--accuracy", "--json", str(out)])
    bench.main()
    got = json.loads(out.read_text(), parse_constant=refuse)[0]
    # the wrong NaN (and an infinite error) still show, as strings
    assert got["portable_max"] == "nan" and got["torch_max"] == "inf" and got["op"] == "exp"
