"""Tiny Hugging Face model presets, built offline from a config with seeded weights.

They let the probe, the torch-mode tests and the examples run real ``transformers``
models (real attention, KV cache, left padding, RoPE, GQA) with no download. Weights are
initialised in float32 from ``seed`` and then cast, so a bfloat16 preset holds exactly
the rounded float32 weights of the same seed.

The tokenizer is byte level (256 byte tokens + 3 specials), so any text round-trips and
nothing has to be trained or fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detkit.errors import BackendUnavailable, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# Byte tokens take ids 0..255; the specials follow.
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class Preset:
    """A named small architecture: the ``transformers`` config class and its fields."""

    name: str
    architecture: str
    config: dict[str, Any]

    def __post_init__(self) -> None:
        if not self.name.startswith("tiny-"):
            raise ValueError(f"preset names start with 'tiny-', got {self.name!r}")


_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    # HF's default 0.02 makes a random tiny model repeat one token forever; 0.1 gives
    # varied greedy continuations, so token divergences are visible and meaningful.
    "initializer_range": 0.1,
}
# The Llama-style decoders' shared size (Llama, Qwen2, Mixtral): each preset adds what
# makes it its family.
_DECODER = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, max_position_embeddings=MAX_POSITIONS,
                tie_word_embeddings=False, **_COMMON)

_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny-llama",
            "LlamaForCausalLM",
            dict(_DECODER, intermediate_size=688, num_key_value_heads=4, rms_norm_eps=1e-5),  # GQA, as in Llama
        ),
        Preset(
            "tiny-gpt2",
            "GPT2LMHeadModel",
            dict(n_embd=256, n_layer=4, n_head=8, n_positions=MAX_POSITIONS, **_COMMON),
        ),
        Preset(
            "tiny-qwen2",
            "Qwen2ForCausalLM",
            dict(_DECODER, intermediate_size=688, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True),
        ),
        Preset(
            "tiny-mixtral",
            "MixtralForCausalLM",
            # MoE: a router picks 2 of 4 experts per token (transformers 5 runs the experts
            # through torch._grouped_mm, a fused grouped GEMM on CUDA).
            dict(_DECODER, intermediate_size=256, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                 rms_norm_eps=1e-5),
        ),
    )
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")


def require_transformers() -> None:
    """Raise :class:`BackendUnavailable` with the install command when Hugging Face
    ``transformers`` or ``tokenizers`` (the ``hf`` extra, not a core dependency) is missing."""
    for module in ("transformers", "tokenizers"):
        try:
            __import__(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise BackendUnavailable(
                f"Hugging Face models (the presets such as tiny-llama, local model directories) need "
                f"`{module}`, which is not installed: `pip install 'detkit[hf]'`"
            ) from exc


def _config(preset: Preset, attn_implementation: str) -> Any:
    import transformers

    config_cls = getattr(transformers, preset.architecture.replace("LMHeadModel", "Config").replace("ForCausalLM", "Config"))
    config = config_cls(**preset.config)
    config._attn_implementation = attn_implementation
    return config


def load_preset(
    name: str,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> PreTrainedModel:
    """Build preset ``name`` with weights drawn from ``seed``, in eval mode, on the CPU."""
    import torch

    require_transformers()
    import transformers

    if name not in _PRESETS:
        raise InputError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} or give a model path")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise InputError(
            f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r}"
        )
    # torch.manual_seed's range; past it, torch raises a bare "Overflow when unpacking long long"
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise InputError(f"the weights seed must be an integer from -2**63 to 2**64-1, got {seed!r}")
    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise InputError(f"model dtype must be a floating point dtype, got {dtype}")
    preset = _PRESETS[name]
    config = _config(preset, attn_implementation)
    model_cls = getattr(transformers, preset.architecture)
    # Seed a private generator state, not the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


# ChatML's layout, spelled out in bytes (the byte tokenizer has no special tokens for it):
# what `detkit probe --chat` and the probe server's chat API feed the presets.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """An offline byte-level tokenizer: ids 0..255 are bytes, then pad, bos, eos; a
    ChatML-style chat template (:data:`CHAT_TEMPLATE`)."""
    require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({PAD_TOKEN: PAD_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        # transformers 4.x also returns token_type_ids by default: generate() then refuses
        # them for Llama, and GPT-2 adds a token-type embedding to every position.
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_of(ch: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to ``ch``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def save_preset(name: str, path: str | Path, *, dtype: torch.dtype | None = None, seed: int = 0) -> Path:
    """Write preset ``name`` and the tokenizer as a normal HF model directory (for servers)."""
    out = Path(path)
    model = load_preset(name, dtype=dtype, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out
