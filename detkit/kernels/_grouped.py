"""Grouped products on the host: the offsets check and the per-group loop that the CPU
backends share (the CUDA backend reads the offsets on the device instead)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from detkit.errors import InputError


def offsets_problem(ends: list[int], rows: int) -> str | None:
    """Why ``ends`` are not the nondecreasing ends of groups of ``rows`` rows; None if they are."""
    if any(e < s for s, e in zip([0, *ends], ends)) or (ends and ends[-1] > rows):
        return f"offs {ends} are not nondecreasing ends within the grouped dimension ({rows})"
    return None


def host_grouped_matmul(matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
                        a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``grouped_matmul`` of the backend contract as one ``matmul`` per nonempty group."""
    ends = offs.tolist()
    problem = offsets_problem(ends, a.shape[0])
    if problem:
        raise InputError(f"grouped_matmul: {problem}; pass int32 row counts summed up (torch.cumsum).")
    out = torch.zeros((a.shape[0], b.shape[-1]), dtype=a.dtype, device=a.device)
    for g, (start, end) in enumerate(zip([0, *ends], ends)):
        if end > start:
            out[start:end] = matmul(a[start:end], b[g], None)
    return out
