"""benchmarks/accuracy.py: what its JSON records (the measurement itself is not run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import load_script

BENCH = Path(__file__).parent.parent / "benchmarks" / "accuracy.py"


def test_json_is_strict_json_with_a_wrong_nan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bench: Any = load_script(BENCH, monkeypatch)

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    # ulp_error: NaN where exactly one side is NaN, inf where the result alone is infinite
    monkeypatch.setattr(bench, "run", lambda rows, length: [bench.Row("softmax", "float32", "8x256", math.nan, 0.5,
                                                                      math.inf, 0.5)])
    out = tmp_path / "acc.json"
    assert bench.main(["--json", str(out)]) == 0
    row = json.loads(out.read_text(), parse_constant=refuse)[0]
    assert row["detkit_max"] == "nan" and row["torch_max"] == "inf" and row["detkit_median"] == 0.5
