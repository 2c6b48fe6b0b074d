"""IEEE arithmetic that torch's kernels, as written, do not give alike on every device."""

from __future__ import annotations

import torch

__all__ = ["divided"]


def divided(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b`` rounded once, on every device. torch's CUDA kernels divide by a Python
    number (a CPU scalar) as ``a * (1 / b)``, two roundings (``BinaryDivTrueKernel.cu``),
    where its CPU kernels divide; by a 0-d tensor on ``a``'s device, both divide."""
    return a / torch.full((), b, dtype=a.dtype, device=a.device)
