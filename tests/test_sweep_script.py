"""scripts/sweep_causal_lms.py: real tiny models from transformers' configs under the mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep_causal_lms.py"


def _run_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """The sweep's exit code and the outcomes it wrote, for ``args`` (plus ``--json``)."""
    pytest.importorskip("transformers")
    out = tmp_path / "sweep.json"
    code = load_script(SCRIPT, monkeypatch).main([*args, "--json", str(out)])
    return code, json.loads(out.read_text())


def test_the_sweep_passes_architectures_the_mode_runs_and_writes_each_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, outcomes = _run_sweep(tmp_path, monkeypatch, "--only", "llama,gpt2")
    assert code == 0
    assert [(o["model_type"], o["status"]) for o in outcomes] == [("llama", "passed"), ("gpt2", "passed")]
    assert all(set(o["max_rel_diff"]) == {"batch_invariant", "portable"} for o in outcomes)
    assert "passed 2, uncovered 0, failed 0" in capsys.readouterr().out


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
    assert "not causal-lm model types here: no-such-model" in capsys.readouterr().err


@pytest.mark.parametrize(("model_type", "want"), [
    # a hybrid: with 2 layers of its default pattern both were linear attention
    ("qwen3_next", dict(layer_types=["linear_attention", "full_attention"], num_hidden_layers=2)),
    # multi-head latent attention: head_dim is the rotary part, one KV head per query head
    ("deepseek_v3", dict(head_dim=8, qk_rope_head_dim=8, num_key_value_heads=4, n_routed_experts=4)),
    # a pad token id past the small vocabulary made the embedding refuse it
    ("phi3", dict(pad_token_id=0, vocab_size=512)),
    # Jamba's attention and expert layers: every second layer
    ("jamba", dict(attn_layer_period=2, attn_layer_offset=1, num_hidden_layers=2)),
    # the decoder of an encoder-decoder family has its own names for the sizes
    ("bart", dict(d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128)),
])
def test_small_configs_keep_what_the_architecture_needs(model_type: str, want: dict[str, object],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    sweep = load_script(SCRIPT, monkeypatch)
    config = sweep.small_config(model_type)
    assert {k: getattr(config, k) for k in want} == want


class _LogCumSumExpGate(torch.nn.Module):
    """A user's activation on an op the mode leaves to torch (logcumsumexp)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - torch.logcumsumexp(x, -1)


def test_an_architecture_with_an_op_left_to_torch_is_listed_as_uncovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Llama whose hidden_act runs logcumsumexp, which the mode leaves to torch: it runs
    under both modes without a fallback, so the sweep does not fail, but it is not
    'passed' either, and the summary names the op. A Mixtral's router counts tokens per
    expert with histc of integer values: exact. (No architecture transformers ships leaves
    an op to torch now: Llama 4's complex RoPE, the last, is routed.)"""
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    sweep = load_script(SCRIPT, monkeypatch)
    monkeypatch.setitem(ACT2FN, "detkit_test_logcumsumexp", _LogCumSumExpGate)
    monkeypatch.setitem(sweep.PER_TYPE, "llama", {"hidden_act": "detkit_test_logcumsumexp"})
    out = tmp_path / "sweep.json"
    assert sweep.main(["--only", "llama,mixtral", "--json", str(out)]) == 0
    outcomes = {o["model_type"]: o for o in json.loads(out.read_text())}
    assert outcomes["llama"]["status"] == "uncovered" and outcomes["llama"]["uncovered"] == ["logcumsumexp.default"]
    assert outcomes["mixtral"]["status"] == "passed" and outcomes["mixtral"]["uncovered"] == []
    printed = capsys.readouterr().out
    assert "passed 1, uncovered 1, failed 0" in printed and "left to torch: logcumsumexp.default in 1: llama" in printed


def test_a_composite_models_towers_are_small_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A multimodal model's text and vision configs get the small sizes (Gemma 3's towers
    had 2.7B parameters at their defaults); their own per-layer fields are rebuilt from
    them (Gemma 4's per-layer table, past 2 layers, was refused)."""
    pytest.importorskip("transformers")
    sweep = load_script(SCRIPT, monkeypatch)
    config = sweep.small_config("gemma3")
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (64, 2)
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (64, 2)
    assert config.text_config.vocab_size == 512
    config = sweep.small_config("gemma4")
    assert config.text_config.num_hidden_layers == 2 and config.text_config.hidden_size == 64


def test_tables_built_with_torchs_math_library_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """XGLM's sinusoidal position table (torch's exp, sin and cos) differs from the portable
    values and Falcon-H1's mup_vector cannot be recomputed from its module: both listed,
    neither a failure; GPT-2 builds no such table."""
    code, (xglm, falcon, gpt2) = _run_sweep(tmp_path, monkeypatch, "--only", "xglm,falcon_h1,gpt2")
    assert code == 0
    assert xglm["status"] == falcon["status"] == "passed", (xglm, falcon)
    (table,) = xglm["buffers_differing"]
    assert table.startswith("model.embed_positions.weights: ") and xglm["buffers_unchecked"] == []
    assert int(table.split(": ")[1].split("/")[0]) > 0
    assert falcon["buffers_differing"] == [] and len(falcon["buffers_unchecked"]) == 2
    assert all("mup_vector: FalconH1Model._init_weights does not compute it" in u for u in falcon["buffers_unchecked"])
    assert gpt2["buffers_differing"] == gpt2["buffers_unchecked"] == []
    printed = capsys.readouterr().out
    assert f"computed buffer not portable: xglm {table}" in printed
    assert "computed buffer unchecked: falcon_h1 model.layers.0.mamba.mup_vector" in printed


@pytest.mark.parametrize("model_types", [
    "llama4_text,deepseek_v2",  # RoPE as a complex product
    "reformer,xlstm,xmod,zamba",  # built with PER_TYPE's sizes
    "gemma3,mllama,qwen3_5",  # multimodal: text inputs through the whole model class
])
def test_architectures_pass_covered(model_types: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """These run under both modes with nothing left to torch."""
    code, outcomes = _run_sweep(tmp_path, monkeypatch, "--only", model_types)
    assert code == 0
    assert [(o["status"], o["uncovered"], o["not_portable"]) for o in outcomes] == [("passed", [], [])] * len(
        model_types.split(",")), outcomes


def test_a_bfloat16_sweep_allows_bfloat16_rounding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In bfloat16 the mode's logits differ from torch's in their last bits (another
    reduction order, rounded to 8 bits): the default tolerance for bfloat16 passes them,
    float32's does not."""
    code, (outcome,) = _run_sweep(tmp_path, monkeypatch, "--only", "llama", "--dtype", "bfloat16")
    assert code == 0
    sweep = load_script(SCRIPT, monkeypatch)
    assert outcome["status"] == "passed" and 1e-4 < outcome["max_rel_diff"]["batch_invariant"] <= 5e-2
    assert sweep.main(["--only", "llama", "--dtype", "bfloat16", "--rtol", "1e-4"]) == 1


def test_a_seq2seq_sweep_runs_encoder_decoder_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """T5 (relative position buckets, a decoder start token its config leaves to generate)
    and Switch Transformers (an MoE router) under both modes, nothing left to torch; a
    causal LM is not a seq2seq type."""
    code, outcomes = _run_sweep(tmp_path, monkeypatch, "--task", "seq2seq", "--only", "t5,switch_transformers")
    assert code == 0
    sweep = load_script(SCRIPT, monkeypatch)
    assert [(o["model_type"], o["status"], o["uncovered"]) for o in outcomes] == [
        ("t5", "passed", []), ("switch_transformers", "passed", [])]
    assert sweep.main(["--task", "seq2seq", "--only", "llama"]) == 2
    assert "not seq2seq model types here: llama" in capsys.readouterr().err


def test_a_vision_sweep_runs_the_towers_under_both_modes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--task vision: the get_image_features of Gemma 3 (its routed avg_pool2d), Qwen2.5-VL
    (flattened patches and their grid), GLM-4V (its position table resampled by the routed
    grid_sample), LLaVA-NeXT (an image's crops and its size), LFM2-VL (SigLIP2's patches
    with spatial_shapes; a float prod), PaddleOCR-VL (per-patch tiles), MiniCPM-V (packed
    patches with target_sizes, through a pass-through signature) and Kosmos-2.5 (flattened
    patches) pass under both modes with nothing left to torch (exit 0): each family's own
    inputs."""
    types = ["gemma3", "qwen2_5_vl", "glm4v", "llava_next", "lfm2_vl", "paddleocr_vl", "minicpmv4_6", "kosmos-2.5"]
    code, outcomes = _run_sweep(tmp_path, monkeypatch, "--task", "vision", "--only", ",".join(types))
    assert code == 0
    assert [(o["model_type"], o["status"], o["uncovered"]) for o in outcomes] == [(t, "passed", []) for t in types]
    assert all(o["max_rel_diff"]["portable"] <= 1e-4 for o in outcomes), outcomes
    assert "passed 8, uncovered 0, failed 0" in capsys.readouterr().out
