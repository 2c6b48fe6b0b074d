"""Turning a ``--device`` value into a torch device, with an error that says what to do."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from detkit.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, *, allow_index: bool = True, instead: str = "use --device cpu") -> torch.device:
    """``cpu``, ``cuda`` (and ``cuda:N`` if ``allow_index``) as a torch device.

    Raises :class:`InputError` for another name or a missing index and
    :class:`BackendUnavailable` when torch sees no CUDA device; ``instead`` ends that
    message with what the user can do on this machine.
    """
    import torch

    if name == "cpu":
        return torch.device("cpu")
    pattern = r"cuda(:\d+)?" if allow_index else r"cuda"
    if not re.fullmatch(pattern, name):
        choices = "cpu, cuda or cuda:N" if allow_index else "cpu or cuda"
        raise InputError(f"--device must be {choices}, got {name!r}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no NVIDIA GPU is visible"
        raise BackendUnavailable(
            f"--device {name}: torch reports no CUDA device ({why}; torch {torch.__version__}). Run on a machine "
            f"with an NVIDIA GPU and a CUDA build of torch, or {instead}."
        )
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
