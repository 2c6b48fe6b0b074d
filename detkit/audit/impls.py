"""The implementations an op is audited under, each a context manager around plain torch code.

``torch``          torch as it is;
``deterministic``  ``torch.use_deterministic_algorithms(True)`` plus the settings it asks
                   for (``CUBLAS_WORKSPACE_CONFIG``, cuDNN deterministic, no benchmark),
                   all restored afterwards;
``detkit``         ``detkit.batch_invariant()``;
``portable``       ``detkit.batch_invariant(portable=True)``.

An implementation that cannot run here is reported with its reason, never dropped.

On CUDA, cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when a handle is created: for the
``deterministic`` implementation to be faithful, export it before the process starts
(``CUBLAS_WORKSPACE_CONFIG=:4096:8 detkit audit --device cuda``); the fingerprint in
the report records whether it was set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from detkit.audit.vocab import IMPLS
from detkit.errors import InputError

# cuBLAS needs a fixed workspace to be run-to-run deterministic; torch asks for one of these.
CUBLAS_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class Availability:
    impl: str
    available: bool
    reason: str = ""

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"unknown implementation {self.impl!r}")

    def to_dict(self) -> dict[str, object]:
        return {"record": "impl", "impl": self.impl, "available": self.available, "reason": self.reason}


@contextlib.contextmanager
def _as_is() -> Iterator[None]:
    yield


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    prev_enabled = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if prev_env is None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.use_deterministic_algorithms(prev_enabled, warn_only=prev_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn
        if prev_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _detkit_mode(portable: bool) -> Callable[[], AbstractContextManager[object]]:
    def factory() -> AbstractContextManager[object]:
        from detkit.mode import batch_invariant

        return batch_invariant(portable=portable)

    return factory


FACTORIES: dict[str, Callable[[], AbstractContextManager[object]]] = {
    "torch": _as_is,
    "deterministic": _deterministic,
    "detkit": _detkit_mode(False),
    "portable": _detkit_mode(True),
}


def context(impl: str) -> AbstractContextManager[object]:
    """A fresh context manager that runs torch code under ``impl``."""
    return FACTORIES[impl]()


def availability(impl: str, device: torch.device) -> Availability:
    """Whether ``impl`` can run on ``device`` here, found by entering it once."""
    if impl not in IMPLS:
        raise InputError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    try:
        with context(impl) as mode:
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except Exception as exc:  # recorded in the report: the reason is the finding
        return Availability(impl, False, f"{type(exc).__name__}: {exc}")
    coverage = getattr(mode, "coverage", None)
    if callable(coverage) and not coverage().routed:
        # the mode ran torch's own matmul: it has no kernels registered for this device
        return Availability(impl, False, f"detkit's mode routed no call to its kernels on {device.type}; "
                                         "see `detkit env` for the backends available here")
    return Availability(impl, True)


def parse_impls(text: str | None) -> list[str]:
    """``"torch,detkit"`` -> ["torch", "detkit"]; None or "all" -> every implementation."""
    if text is None or text.strip() == "all":
        return list(IMPLS)
    if not text.replace(",", "").strip():
        raise InputError(f"--impl names no implementation; choose from {', '.join(IMPLS)}, or 'all'")
    out: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if name not in IMPLS:
            raise InputError(f"unknown implementation {raw!r} in --impl; choose from {', '.join(IMPLS)}")
        if name not in out:
            out.append(name)
    return out
