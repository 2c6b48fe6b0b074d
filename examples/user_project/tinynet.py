"""A user's code under test: a small layer, a small model, and one batch-statistics bug."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TinyMLP(nn.Module):
    """norm -> up projection -> SiLU -> down projection -> softmax over classes."""

    def __init__(self, dim: int = 128, hidden: int = 256, classes: int = 32, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.norm = RMSNorm(dim)
            self.up = nn.Linear(dim, hidden)
            self.down = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.down(nn.functional.silu(self.up(self.norm(x)))), dim=-1)


def centre_by_batch_mean(x: torch.Tensor) -> torch.Tensor:
    """A classic inference bug: normalising with statistics of the whole batch."""
    return x - x.mean(dim=0, keepdim=True)
