"""Who hears about detkit checks: a list of callbacks, kept in a module with no imports.

``detkit.testing`` calls each observer with every :class:`~detkit.testing.CheckResult`;
the pytest plugin registers one in ``pytest_configure`` without importing numpy or torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OBSERVERS: list[Callable[[Any], None]] = []
