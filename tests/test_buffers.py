"""Tables computed when a model is built (RoPE frequencies, sinusoidal positions):
check_computed_buffers against a build inside the portable mode, across instruction sets
in fresh processes, and by the logits of the fixed model."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from conftest import isa_children

import detkit
from detkit.buffers import BufferCheck, check_computed_buffers

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("mode_left_off")

_IDS = dict(vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_SMALL = _IDS | dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1)
# Real frequency tables (head dims and bases of released models) on tiny bodies: Qwen2.5-7B's
# (head 128, base 1e6), Gemma 3's per-layer-type tables (head 256), Llama 3.1's scaled
# ones, Phi-3's longrope, GPT-J's sin/cos positions.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("qwen2", dict(head_dim=128, rope_theta=1e6)),
    "gemma3": ("gemma3_text", dict(head_dim=256, num_hidden_layers=6)),
    "llama3": ("llama", dict(head_dim=128, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0})),
    "longrope": ("phi3", dict(hidden_size=192, max_position_embeddings=131072, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48,
        "original_max_position_embeddings": 4096})),
    # a sin/cos table of every position (its module keeps no config: the model's is used)
    "gptj": ("gptj", dict(n_embd=128, n_layer=1, n_head=2, rotary_dim=32, n_positions=256)),
}
# Sinusoidal position tables, which transformers computes with torch's exp, sin and cos in
# the model's _init_weights: XGLM's (and M2M100's, NLLB's) and CTRL's (a buffer of the
# model itself, beside its layers), at XGLM-564M's and NLLB-200's width (1024).
SINUSOIDAL: dict[str, tuple[str, dict[str, Any]]] = {
    "xglm": ("xglm", dict(d_model=1024, num_layers=1, attention_heads=2, ffn_dim=64, max_position_embeddings=512)),
    "ctrl": ("ctrl", dict(n_embd=1024, n_layer=1, n_head=2, dff=64, n_positions=512)),
    "m2m_100": ("m2m_100", dict(d_model=1024, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                max_position_embeddings=512, decoder_start_token_id=0)),
}
# the buffers each reports (Gemma scales its embeddings by a computed sqrt(hidden) buffer)
TABLES = {"gptj": ("embed_positions",), "xglm": ("weights",), "ctrl": ("pos_encoding",), "m2m_100": ("weights",),
          "gemma3": ("inv_freq", "embed_scale")}


def _build(name: str) -> Any:
    # the sinusoidal configs name their own sizes (their old field names alias hidden_size, ...)
    model_type, fields = CONFIGS[name] if name in CONFIGS else SINUSOIDAL[name]
    fields = (_SMALL if name in CONFIGS else _IDS) | fields
    auto = transformers.AutoModelForSeq2SeqLM if name == "m2m_100" else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_config(transformers.AutoConfig.for_model(model_type, **fields)).eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS | SINUSOIDAL))
def test_check_and_fix_give_the_buffers_of_a_build_inside_portable_mode(name: str) -> None:
    """Every reported count is the number of elements that differ from the same model built
    inside batch_invariant(portable=True); after fix=True the buffers are those bits. The
    check changes nothing else: not the model's other tensors, not the random state."""
    built = _build(name)
    with detkit.batch_invariant(portable=True):
        inside = _build(name)
    want = dict(inside.named_buffers())
    before = {n: t.clone() for n, t in built.state_dict().items()}
    rng = torch.random.get_rng_state()
    checks = check_computed_buffers(built)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(torch.equal(_bits(t), _bits(before[n])) for n, t in built.state_dict().items())
    tables = TABLES.get(name, ("inv_freq",))
    assert checks and all(c.name.endswith(tables) and not c.skipped for c in checks), checks
    if name in SINUSOIDAL:  # negative control: torch's exp, sin and cos are not the portable ones
        assert all(c.differing > 0 for c in checks), checks
    if name == "gemma3":  # one table per layer type, each with its original copy
        assert {c.name.rsplit(".", 1)[1] for c in checks} == {
            "embed_scale", "sliding_attention_inv_freq", "sliding_attention_original_inv_freq",
            "full_attention_inv_freq", "full_attention_original_inv_freq"}
    held = dict(built.named_buffers())
    for c in checks:
        assert c.differing == int((_bits(held[c.name]) != _bits(want[c.name])).sum()) and not c.fixed, c
    fixed = check_computed_buffers(built, fix=True)
    assert [(c.name, c.differing, c.fixed) for c in fixed] == [(c.name, c.differing, c.differing > 0) for c in checks]
    for n, buffer in built.named_buffers():
        if n.endswith(tables):
            assert torch.equal(_bits(buffer), _bits(want[n])), n
    assert all(c.differing == 0 and c.portable for c in check_computed_buffers(built))


_CHILD = r"""
import hashlib, json, sys, warnings
import torch, transformers, detkit
warnings.simplefilter("ignore")
small, configs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def digest(model):
    return hashlib.sha256(b"".join(b.contiguous().view(torch.uint8).numpy().tobytes()
                                   for n, b in model.named_buffers() if n.endswith(("inv_freq", "embed_positions"))
                                   )).hexdigest()
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, (model_type, fields) in configs.items():
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **(small | fields)))
    torch_built = digest(model)
    detkit.check_computed_buffers(model, fix=True)
    out[name] = {"torch": torch_built, "fixed": digest(model)}
print(json.dumps(out))
"""


def test_fixed_buffers_are_the_same_under_every_instruction_set() -> None:
    """After check_computed_buffers(fix=True) the frequency tables are the same bits with
    torch's vector kernels and with its DEFAULT (scalar) ones. Negative control: as torch
    built them they were not (torch 2.13 on an AVX-512 EPYC: Qwen2.5's, Gemma 3's and
    Phi-3's tables each had an element differ), unless this CPU already runs DEFAULT."""
    runs = isa_children(_CHILD, [json.dumps(_SMALL), json.dumps(CONFIGS)], {"host": {}, "scalar": {
        "ATEN_CPU_CAPABILITY": "default"}})
    host, scalar = runs["host"], runs["scalar"]
    assert scalar["capability"] == "DEFAULT"
    for name in CONFIGS:
        assert host[name]["fixed"] == scalar[name]["fixed"], name
    if host["capability"] == "DEFAULT":
        pytest.skip("this CPU already runs torch's DEFAULT kernels: no negative control")
    assert any(host[name]["torch"] != scalar[name]["torch"] for name in CONFIGS), "negative control: no table differed"


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), detkit.batch_invariant(portable=True):
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", sorted(SINUSOIDAL))
def test_the_fixed_model_gives_the_logits_of_the_model_built_inside_the_mode(name: str) -> None:
    """What the check is for: under portable mode, a model loaded the usual way (its
    tables computed by torch) and then fixed gives the logits, bit for bit, of the same
    weights built inside batch_invariant(portable=True). Negative control: unfixed, it did
    not."""
    built = _build(name)
    with detkit.batch_invariant(portable=True):
        inside = _build(name)
    inside.load_state_dict(built.state_dict())  # the same weights; the computed tables stay each build's own
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    want = _logits(inside, ids)
    assert not torch.equal(_bits(_logits(built, ids)), _bits(want)), "negative control: the tables changed nothing"
    check_computed_buffers(built, fix=True)
    assert torch.equal(_bits(_logits(built, ids)), _bits(want))


class _Holder(torch.nn.Module):
    """A module that computes a table at build time that no _init_weights knows."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.sin(torch.arange(8.0)), persistent=False)


def test_a_table_no_initialisation_computes_is_reported_not_checked() -> None:
    """A non-persistent buffer that no transformers model's _init_weights recomputes (the
    stand-in's NaN survives), or that has no transformers model above it, is listed as
    skipped: not counted as portable, and left as it was."""
    model = _build("xglm")
    model.model.extra = _Holder()
    checks = {c.name: c for c in check_computed_buffers(model, fix=True)}
    extra = checks["model.extra.table"]
    assert "XGLMModel._init_weights does not compute it from its module" in extra.skipped and not extra.portable
    assert checks["model.embed_positions.weights"].fixed
    assert torch.equal(model.model.extra.table, torch.sin(torch.arange(8.0)))
    (alone,) = check_computed_buffers(torch.nn.Sequential(_Holder()), fix=True)
    assert alone.name == "0.table" and "no transformers model above it" in alone.skipped
    # XGLM grows its table in a forward that needs more positions than it was built with:
    # its initialisation no longer fits the buffer
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "xglm", **(_IDS | dict(d_model=32, num_layers=1, attention_heads=2, ffn_dim=32, max_position_embeddings=8))))
    with torch.no_grad():
        model(input_ids=torch.ones(1, 12, dtype=torch.long))
    (grown,) = check_computed_buffers(model)
    assert grown.skipped.startswith("not recomputed by XGLMModel._init_weights: The size of tensor a (14)"), grown


class _RemoteCodeRotaryEmbedding(torch.nn.Module):
    """As trust_remote_code models (and transformers 4) wrote it: built from a dim, no config."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)


def test_a_rotary_embedding_without_a_config_is_reported_not_checked() -> None:
    """Every transformers 5 rotary embedding is built from its config; one built from a dim
    is listed as skipped (its buffers unknown, so not portable), not silently passed over."""
    model = torch.nn.Sequential(_RemoteCodeRotaryEmbedding(16))
    (check,) = check_computed_buffers(model, fix=True)
    assert check.name == "0" and "not rebuilt from its config" in check.skipped and not check.portable
    assert check_computed_buffers(torch.nn.Linear(2, 2)) == []


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        check_computed_buffers("Qwen/Qwen2.5-7B")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differing"):
        BufferCheck("x.inv_freq", 4, differing=5)
    with pytest.raises(ValueError, match="skipped"):
        BufferCheck("x", 0, fixed=True, skipped="no config")
