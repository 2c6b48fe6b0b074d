"""A small GPT-2 and a small Llama whose float32 logits under
``batch_invariant(portable=True)`` are committed (``tests/data/portable-<family>-logits.npz``),
so that a machine without the CPU portable backend (numba), such as the GPU machine, can
still check a whole model's portable logits against the CPU's bits.

The weights come from integer hashing and IEEE operations only, so they are the same bits
on every machine; torch's ``normal_`` is not (its vectorised path depends on the CPU's
instruction set). GPT-2: learned positions, LayerNorm, gelu_new (tanh and pow(x, 3)).
Llama: RoPE (its sin/cos tables), RMSNorm, SiLU, grouped-query attention; its RoPE
frequencies are set to powers of two, because transformers computes them with torch's
pow on the CPU, whose bits depend on the instruction set.

Regenerate (only when the canonical orders change on purpose): ``python tests/portable_reference.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

FAMILIES = ("gpt2", "llama")
REFERENCES = {family: Path(__file__).parent / "data" / f"portable-{family}-logits.npz" for family in FAMILIES}
PROMPTS = ("Hi", "Batch invariance", "The quick brown fox")
ATTN = ("eager", "sdpa")


def _hashed_ints(n: int, stream: int) -> np.ndarray:
    """n integers in [-2048, 2047]: the top 12 bits of outputs stream * 2^32 + 0 .. n - 1
    of splitmix64 seeded with 0 (wrapping uint64 arithmetic)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    z = (np.arange(n, dtype=np.uint64) + np.uint64((stream << 32) + 1)) * golden
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(52)).astype(np.int64) - 2048


def build_model(attn: str, family: str = "gpt2") -> Any:
    """The model, float32, on the CPU, in eval mode."""
    import transformers

    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    ids = dict(vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
               attn_implementation=attn)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                                     **ids))
    elif family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, **ids))
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    model.eval()
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            ints = _hashed_ints(p.numel(), i).astype(np.float64)
            if name.endswith("bias"):
                values = ints * (0.02 / 2048)
            elif p.dim() == 1:  # LayerNorm gains
                values = 1.0 + ints * (0.1 / 2048)
            else:
                values = ints * (0.06 / 2048)
            p.copy_(torch.from_numpy(values.astype(np.float32)).reshape(p.shape))
        for module in model.modules():  # RoPE: frequencies 1, 1/4, 1/16, ... (exact)
            for name in ("inv_freq", "original_inv_freq"):
                freqs = getattr(module, name, None)
                if isinstance(freqs, torch.Tensor):
                    freqs.copy_(torch.tensor([2.0 ** (-2 * i) for i in range(freqs.numel())], dtype=freqs.dtype))
    return model


def inputs() -> Any:
    """The left-padded batch of PROMPTS."""
    from detkit.models import build_tokenizer

    return build_tokenizer()(list(PROMPTS), padding=True, return_tensors="pt")


def portable_logits(model: Any, enc: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Logits under batch_invariant(portable=True), and the ops that fell back to torch."""
    import detkit

    with detkit.batch_invariant(portable=True) as bi, torch.no_grad():
        logits = model(**enc).logits
    return logits.cpu(), bi.uncovered()


def real_positions(logits: torch.Tensor, enc: Any) -> torch.Tensor:
    """The logits of the real tokens, (n, vocab): those of left-padding positions depend
    on how the transformers version masks a query that attends to nothing (4.x and 5.x
    differ), not on the kernels."""
    return logits[enc["attention_mask"].to(logits.device).bool()]


def load(family: str = "gpt2") -> dict[str, torch.Tensor]:
    """The committed logits of ``family`` by attention implementation."""
    with np.load(REFERENCES[family]) as data:
        return {attn: torch.from_numpy(data[attn]) for attn in ATTN}


def main() -> None:
    for family in FAMILIES:
        out = {}
        for attn in ATTN:
            logits, uncovered = portable_logits(build_model(attn, family), inputs())
            if uncovered:
                raise SystemExit(f"{family} {attn}: ops fell back to torch, so the logits are not portable: {uncovered}")
            out[attn] = logits.numpy()
        path = REFERENCES[family]
        path.parent.mkdir(exist_ok=True)
        np.savez_compressed(path, **out)
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
