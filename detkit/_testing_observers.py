"""Who hears about detkit checks: a list of callbacks, kept in a module with no imports.

``detkit.testing`` calls the most recently registered observer with every
:class:`~detkit.testing.CheckResult`; the pytest plugin registers one in
``pytest_configure`` without importing numpy or torch. Only the innermost observer
hears a result, so a pytest session run inside another (pytester's in-process runs)
records its own checks and the outer session does not count them twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OBSERVERS: list[Callable[[Any], None]] = []
