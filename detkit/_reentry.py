"""Which threads are running detkit's own code.

While a thread is inside a detkit kernel or adapter, the torch mode hands the torch calls
it makes to torch's own kernels (the kernels use BLAS and torch ops as building blocks).
A kernel's worker threads are detkit's own for their whole life. An adapter that is a
composition of routed ops (logsumexp, var, vector norms) runs it ``routed()``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class _ThreadState(threading.local):
    inside = False  # a class default: read on every routed call, without getattr's fallback


TLS = _ThreadState()


def is_inside() -> bool:
    return TLS.inside


def set_inside(value: bool) -> None:
    TLS.inside = value


@contextlib.contextmanager
def own_thread() -> Iterator[None]:
    """Mark the calling thread as detkit's own for the block (restored after; nests)."""
    if is_inside():
        yield
        return
    set_inside(True)
    try:
        yield
    finally:
        set_inside(False)


@contextlib.contextmanager
def routed() -> Iterator[None]:
    """Let the block's torch calls reach the mode's overrides again (restored after)."""
    before = is_inside()
    set_inside(False)
    try:
        yield
    finally:
        set_inside(before)
