"""scripts/sweep_causal_lms.py: real tiny models from transformers' configs under the mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep_causal_lms.py"


def test_the_sweep_passes_architectures_the_mode_runs_and_writes_each_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    sweep = load_script(SCRIPT, monkeypatch)
    out = tmp_path / "sweep.json"
    assert sweep.main(["--only", "llama,gpt2", "--json", str(out)]) == 0
    outcomes = json.loads(out.read_text())
    assert [(o["model_type"], o["status"]) for o in outcomes] == [("llama", "passed"), ("gpt2", "passed")]
    assert all(set(o["max_rel_diff"]) == {"batch_invariant", "portable"} for o in outcomes)
    assert "passed 2, failed 0" in capsys.readouterr().out


def test_a_logit_difference_beyond_the_tolerance_fails_the_sweep(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode's logits are not torch's bits (another reduction order): with no tolerance
    at all the sweep says so and exits 1, so it can gate a CI."""
    pytest.importorskip("transformers")
    sweep = load_script(SCRIPT, monkeypatch)
    assert sweep.main(["--only", "llama", "--rtol", "0"]) == 1


def test_an_unknown_model_type_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    sweep = load_script(SCRIPT, monkeypatch)
    assert sweep.main(["--only", "no-such-model"]) == 2
    assert "not causal-LM model types here: no-such-model" in capsys.readouterr().err
