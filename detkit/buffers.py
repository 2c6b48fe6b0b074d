"""Buffers a model computes when it is built, outside any forward: RoPE tables.

A Hugging Face rotary embedding computes its ``inv_freq`` in its constructor, with
torch's ``pow`` (``base ** (arange(0, dim, 2) / dim)``), and keeps it as a buffer that no
checkpoint holds (GPT-J and CodeGen keep a whole sin/cos table, ``embed_positions``).
torch's CPU ``pow`` is its math library's, which differs between instruction sets: with
torch 2.13 on an AVX-512 EPYC, the frequencies of Qwen2.5-7B,
Qwen3, Mistral, Gemma (head 256) and Phi-3's longrope each had one element of 64 (128,
48) other than under ``ATEN_CPU_CAPABILITY=default``. So a model built on one machine
rotates its queries and keys by other angles than the same model built on another, and
``batch_invariant(portable=True)`` cannot give the same logits: the mode routes ops as
they run, and these ran before it. Build the model inside ``batch_invariant(portable=
True)`` (its ``pow`` is then the portable one), or recompute the buffers of a built model
with :func:`check_rope_buffers` ``(model, fix=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from detkit._testing_values import host_bits

__all__ = ["BufferCheck", "check_rope_buffers"]


@dataclass(frozen=True)
class BufferCheck:
    """One buffer of a rotary embedding against its portable value.

    ``differing``: elements whose bits differ from the value the module's constructor
    computes under ``batch_invariant(portable=True)``; ``fixed``: the buffer now holds that
    value. ``skipped``: why the module could not be rebuilt from its config (its buffers
    were not checked; ``differing`` is 0).
    """

    name: str
    numel: int
    differing: int = 0
    fixed: bool = False
    skipped: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("BufferCheck.name must name the buffer (or the skipped module)")
        if self.numel < 0 or not 0 <= self.differing <= self.numel:
            raise ValueError(f"BufferCheck {self.name}: need 0 <= differing ({self.differing}) <= numel ({self.numel})")
        if self.skipped and (self.differing or self.fixed):
            raise ValueError(f"BufferCheck {self.name}: a skipped module has no differing or fixed buffer")

    @property
    def portable(self) -> bool:
        """The buffer holds its portable value (a skipped module's is unknown: False)."""
        return not self.skipped and (self.differing == 0 or self.fixed)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "numel": self.numel, "differing": self.differing, "fixed": self.fixed,
                "skipped": self.skipped}


def _rotary_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """transformers' rotary embeddings, by the name its own weight initialisation goes by
    (a class named ``*RotaryEmbedding``), that hold a floating-point buffer."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__.endswith("RotaryEmbedding")
            and any(b.is_floating_point() for _, b in m.named_buffers(recurse=False))]


def check_rope_buffers(model: torch.nn.Module, *, fix: bool = False) -> list[BufferCheck]:
    """Compare every rotary embedding's floating-point buffers (``inv_freq``,
    ``original_inv_freq``, Gemma 3's per-layer-type tables, GPT-J's and CodeGen's sin/cos
    ``embed_positions``) with the values its constructor computes from its config (the
    module's, else the model's) under ``batch_invariant(portable=True)``; with ``fix``,
    copy those values in (the buffers keep their dtype and device). A module that cannot
    be rebuilt from a config (remote code built from a dim) is reported as skipped.
    Returns one entry per buffer (or skipped module), in module order."""
    from detkit.mode import batch_invariant

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"check_rope_buffers takes a torch.nn.Module, got {type(model).__name__}")
    checks: list[BufferCheck] = []
    for name, module in _rotary_modules(model):
        config = getattr(module, "config", None) or getattr(model, "config", None)
        try:
            if config is None:
                raise TypeError("neither it nor the model keeps a config")
            # on the CPU, as transformers builds it (then moves it with the model)
            with torch.device("cpu"), batch_invariant(portable=True):
                fresh = type(module)(config)
        except Exception as err:  # noqa: BLE001 - any constructor failure: reported, not raised
            checks.append(BufferCheck(name or "<model>", 0, skipped=f"not rebuilt from its config: {err}"[:300]))
            continue
        current = dict(module.named_buffers(recurse=False))
        for buffer, value in fresh.named_buffers(recurse=False):
            held = current.get(buffer)
            if held is None or held.shape != value.shape or not held.dtype.is_floating_point:
                continue
            value = value.to(device=held.device, dtype=held.dtype)
            differing = int((host_bits(held) != host_bits(value)).sum())
            if fix and differing:
                with torch.no_grad():
                    held.copy_(value)
            checks.append(BufferCheck(f"{name}.{buffer}" if name else buffer, held.numel(), differing,
                                      fixed=fix and differing > 0))
    return checks
