"""detkit: batch-invariant kernels and determinism checks for LLM inference.

Submodules are imported lazily so that ``import detkit`` stays cheap (the pytest
plugin imports it at collection time).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = {"compare", "reference", "kernels", "errors", "env", "testing", "mode", "report", "buffers"}
_ATTRS = {
    "batch_invariant": ("detkit.mode", "batch_invariant"),
    "check_computed_buffers": ("detkit.buffers", "check_computed_buffers"),
    "DetkitError": ("detkit.errors", "DetkitError"),
}

if TYPE_CHECKING:  # pragma: no cover
    from detkit import compare, env, errors, kernels, reference, testing  # noqa: F401
    from detkit.buffers import check_computed_buffers  # noqa: F401
    from detkit.mode import batch_invariant  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"detkit.{name}")
    if name in _ATTRS:
        module, attr = _ATTRS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'detkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES, *_ATTRS])
