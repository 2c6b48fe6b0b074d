"""The CUDA backend with ``portable=True`` bound: the canonical orders of
``docs/canonical-orders.md`` on the GPU, bit-identical to ``detkit.kernels.portable_cpu``.

It has exactly the backend signatures of ``detkit/kernels/_backend.py`` (no ``portable``
keyword), so it can be the ``("cuda", True)`` entry of ``BACKEND_MODULES`` just as
``portable_cpu`` is the ``("cpu", True)`` one.
"""

from __future__ import annotations

import torch

from detkit.kernels import cuda as _cuda

ELEMENTWISE_OPS = _cuda.ELEMENTWISE_OPS


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _cuda.matmul(a, b, bias, portable=True)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _cuda.grouped_matmul(a, b, offs, portable=True)


def softmax(x: torch.Tensor, log: bool) -> torch.Tensor:  # noqa: A002 - backend signature
    return _cuda.softmax(x, log, portable=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _cuda.rms_norm(x, weight, eps, portable=True)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    return _cuda.layer_norm(x, weight, bias, eps, portable=True)


def row_sum(x: torch.Tensor, mean: bool) -> torch.Tensor:
    return _cuda.row_sum(x, mean, portable=True)


def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    return _cuda.row_cumsum(x, portable=True)


def solve_lower(a: torch.Tensor, b: torch.Tensor, unit: bool) -> torch.Tensor:
    return _cuda.solve_lower(a, b, unit, portable=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    return _cuda.attention(q, k, v, mask, scale, portable=True)


def elementwise(name: str, x: torch.Tensor) -> torch.Tensor:
    return _cuda.elementwise(name, x)


def pow(x: torch.Tensor, y: torch.Tensor | float) -> torch.Tensor:  # noqa: A001 - backend signature
    return _cuda.pow(x, y)
