"""Buffers a model computes when it is built, outside any forward: RoPE and sinusoidal tables.

A Hugging Face rotary embedding computes its ``inv_freq`` in its constructor, with
torch's ``pow`` (``base ** (arange(0, dim, 2) / dim)``), and keeps it as a buffer that no
checkpoint holds (GPT-J and CodeGen keep a whole sin/cos table, ``embed_positions``).
torch's CPU ``pow`` is its math library's, which differs between instruction sets: with
torch 2.13 on an AVX-512 EPYC, the frequencies of Qwen2.5-7B,
Qwen3, Mistral, Gemma (head 256) and Phi-3's longrope each had one element of 64 (128,
48) other than under ``ATEN_CPU_CAPABILITY=default``. So a model built on one machine
rotates its queries and keys by other angles than the same model built on another, and
``batch_invariant(portable=True)`` cannot give the same logits: the mode routes ops as
they run, and these ran before it.

Sinusoidal position tables (XGLM, CTRL, M2M100 and NLLB, NLLB-MoE, SeamlessM4T, Qwen3-ASR's
audio tower) and other non-persistent buffers are computed the same way, with torch's
``exp``, ``sin`` and ``cos``: transformers 5 builds a model on the meta device and then
computes every tensor its checkpoint lacks with the model's ``_init_weights`` (on the CPU,
or on the GPU under a CUDA default device). Those tables agree between torch's CPU code
paths here but not with the portable values (19% of XGLM-564M's elements), and nothing
promises that a GPU's agree.

Build the model inside ``batch_invariant(portable=True)`` (its ``pow``, ``exp``, ``sin``
and ``cos`` are then the portable ones), or recompute the buffers of a built model with
:func:`check_computed_buffers` ``(model, fix=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from detkit._testing_values import host_bits

__all__ = ["BufferCheck", "check_computed_buffers"]


@dataclass(frozen=True)
class BufferCheck:
    """One computed buffer against its portable value.

    ``differing``: elements whose bits differ from the value its module's constructor (a
    rotary embedding) or its model's ``_init_weights`` (any other module) computes under
    ``batch_invariant(portable=True)``; ``fixed``: the buffer now holds that value.
    ``skipped``: why the value could not be recomputed (the buffer was not checked;
    ``differing`` is 0).
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


def _is_rotary(module: torch.nn.Module) -> bool:
    """transformers' rotary embeddings, by the name its own weight initialisation goes by."""
    return type(module).__name__.endswith("RotaryEmbedding")


def _computed_buffers(module: torch.nn.Module) -> list[str]:
    """A module's own floating-point buffers that no checkpoint holds (``persistent=False``)."""
    transient = getattr(module, "_non_persistent_buffers_set", set())
    return [n for n, b in module.named_buffers(recurse=False) if n in transient and b.is_floating_point()]


def _initialiser(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The nearest transformers model at or above ``name`` (its ``_init_weights`` computes
    what the checkpoint lacks; a composite model's parts each have their own)."""
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        candidate = model.get_submodule(".".join(parts[:i]))
        if callable(getattr(candidate, "_init_weights", None)) and getattr(candidate, "config", None) is not None:
            return candidate
    return None


def _compare(name: str, held: torch.Tensor, value: torch.Tensor, fix: bool) -> BufferCheck:
    value = value.to(device=held.device, dtype=held.dtype)
    differing = int((host_bits(held) != host_bits(value)).sum())
    if fix and differing:
        with torch.no_grad():
            held.copy_(value)
    return BufferCheck(name, held.numel(), differing, fixed=fix and differing > 0)


def _check_rotary(name: str, module: torch.nn.Module, model: torch.nn.Module, fix: bool) -> list[BufferCheck]:
    """Rebuild a rotary embedding from its config (the module's, else the model's)."""
    from detkit.mode import batch_invariant

    config = getattr(module, "config", None) or getattr(model, "config", None)
    try:
        if config is None:
            raise TypeError("neither it nor the model keeps a config")
        # on the CPU, as transformers builds it (then moves it with the model)
        with torch.device("cpu"), batch_invariant(portable=True):
            fresh = type(module)(config)
    except Exception as err:  # noqa: BLE001 - any constructor failure: reported, not raised
        return [BufferCheck(name or "<model>", 0, skipped=f"not rebuilt from its config: {err}"[:300])]
    current = dict(module.named_buffers(recurse=False))
    checks = []
    for buffer, value in fresh.named_buffers(recurse=False):
        held = current.get(buffer)
        if held is None or held.shape != value.shape or not held.dtype.is_floating_point:
            continue
        checks.append(_compare(f"{name}.{buffer}" if name else buffer, held, value, fix))
    return checks


def _check_initialised(name: str, module: torch.nn.Module, model: torch.nn.Module, buffers: list[str],
                       fix: bool) -> list[BufferCheck]:
    """Recompute a module's non-persistent buffers with its model's ``_init_weights``, as
    transformers does after loading, on a stand-in: a shallow copy of the module with its
    own tensors cloned to the CPU (the targets filled with NaN, so that a buffer the
    initialisation leaves alone is seen) and no submodules (so nothing of the model is
    written). The random draws it makes for the module's parameters come from a forked
    generator: the caller's random state is unchanged."""
    import copy

    from detkit.mode import batch_invariant

    names = [f"{name}.{b}" if name else b for b in buffers]
    owner = _initialiser(model, name)
    if owner is None:
        return [BufferCheck(n, 0, skipped="no transformers model above it to recompute it (_init_weights)")
                for n in names]
    try:
        stand_in = copy.copy(module)
        stand_in._parameters = {k: None if p is None else torch.nn.Parameter(p.detach().to("cpu", copy=True),
                                                                            requires_grad=False)
                                for k, p in module._parameters.items()}
        stand_in._buffers = {k: None if b is None else (torch.full_like(b, float("nan"), device="cpu") if k in buffers
                                                        else b.detach().to("cpu", copy=True))
                             for k, b in module._buffers.items()}
        stand_in._modules = {}
        with torch.random.fork_rng(devices=[]), torch.device("cpu"), batch_invariant(portable=True):
            owner._init_weights(stand_in)
    except Exception as err:  # noqa: BLE001 - any initialisation failure: reported, not raised
        return [BufferCheck(n, 0, skipped=f"not recomputed by {type(owner).__name__}._init_weights: {err}"[:300])
                for n in names]
    checks = []
    initialiser = f"{type(owner).__name__}._init_weights"
    for buffer, full_name in zip(buffers, names):
        held, value = module._buffers[buffer], stand_in._buffers[buffer]
        if value is None or bool(torch.isnan(value).any()):
            # Falcon-H1's mup_vector, say, is written by its model's branch, not its own module's
            checks.append(BufferCheck(full_name, 0, skipped=f"{initialiser} does not compute it from its module"))
        else:
            checks.append(_compare(full_name, held, value, fix))
    return checks


def check_computed_buffers(model: torch.nn.Module, *, fix: bool = False) -> list[BufferCheck]:
    """Compare the floating-point buffers a model computes when it is built (no checkpoint
    holds them) with the values ``batch_invariant(portable=True)`` computes on the CPU; with
    ``fix``, copy those values in (the buffers keep their dtype and device).

    * Rotary embeddings (``*RotaryEmbedding``: ``inv_freq``, ``original_inv_freq``, Gemma 3's
      per-layer-type tables, GPT-J's and CodeGen's sin/cos ``embed_positions``) are rebuilt
      from their config (the module's, else the model's).
    * Every other module's non-persistent floating-point buffers (sinusoidal position
      tables: XGLM, CTRL, M2M100/NLLB, SeamlessM4T, ...) are recomputed by the nearest
      transformers model's ``_init_weights``, as transformers 5 computes them after loading.

    A buffer that cannot be recomputed this way (remote code built from a dim, a model
    whose initialisation does not compute it) is reported as skipped, its value unknown.
    Returns one entry per buffer (or skipped rotary module), in module order."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"check_computed_buffers takes a torch.nn.Module, got {type(model).__name__}")
    checks: list[BufferCheck] = []
    for name, module in model.named_modules():
        if _is_rotary(module):
            if any(b.is_floating_point() for _, b in module.named_buffers(recurse=False)):
                checks += _check_rotary(name, module, model, fix)
        elif buffers := _computed_buffers(module):
            checks += _check_initialised(name, module, model, buffers, fix)
    return checks
