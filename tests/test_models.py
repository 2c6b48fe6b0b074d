"""The offline model presets: reproducible weights, byte tokenizer, real generation."""

from __future__ import annotations

import pytest
import torch

from detkit.errors import BackendUnavailable, InputError
from detkit.models import EOS_ID, PAD_ID, PRESETS, build_tokenizer, load_preset, save_preset


def test_tokenizer_round_trips_bytes_and_pads_left() -> None:
    tok = build_tokenizer()
    enc = tok(["hi", "Héllo wörld"], padding=True, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == PAD_ID  # left padding
    assert enc.input_ids[1].tolist() == list("Héllo wörld".encode())
    assert tok.batch_decode(enc.input_ids, skip_special_tokens=True) == ["hi", "Héllo wörld"]
    # Only what a causal LM takes: transformers 4.x would add token_type_ids, which
    # generate() refuses for Llama and GPT-2 turns into an extra embedding.
    assert set(enc) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("name", PRESETS)
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    a, b, c = load_preset(name, seed=3), load_preset(name, seed=3), load_preset(name, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_bf16_preset_is_the_rounded_fp32_preset() -> None:
    fp32 = load_preset("tiny-llama", seed=1)
    bf16 = load_preset("tiny-llama", seed=1, dtype=torch.bfloat16)
    assert all(torch.equal(x.to(torch.bfloat16), y) for x, y in zip(fp32.parameters(), bf16.parameters()))


def test_bad_preset_arguments_are_clear() -> None:
    with pytest.raises(InputError, match="unknown model preset"):
        load_preset("tiny-nope")
    with pytest.raises(InputError, match="attn_implementation"):
        load_preset("tiny-llama", attn_implementation="flash")
    with pytest.raises(InputError, match="floating point"):
        load_preset("tiny-llama", dtype=torch.int32)


def test_saved_preset_reloads_with_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_preset("tiny-gpt2", tmp_path / "m", seed=2)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert set(tok(["abc"])) == {"input_ids", "attention_mask"}
    ref = load_preset("tiny-gpt2", seed=2)
    ids = tok(["abc"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert tok.eos_token_id == EOS_ID


@pytest.mark.parametrize("module", ["transformers", "tokenizers"])
def test_missing_hf_extra_names_the_install_command(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers is the `hf` extra, not a core dependency: `pip install detkit` alone lacks it
    monkeypatch.setitem(__import__("sys").modules, module, None)
    for call in (lambda: load_preset("tiny-llama"), build_tokenizer):
        with pytest.raises(BackendUnavailable, match=rf"need `{module}`.*pip install 'detkit\[hf\]'"):
            call()
