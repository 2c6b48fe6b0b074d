"""``detkit audit``: measure which ops are nondeterministic or batch variant on this machine.

``AuditConfig`` says what to run, ``run_audit`` runs it into a ``detkit.report.ReportWriter``
(one record per op x implementation x dtype, written as it finishes), ``summarize`` turns
the records into verdict counts and advice, and ``detkit.audit.render`` renders a saved
report as Markdown, self-contained HTML or a rich table. The op catalogue is in
``detkit.audit.catalogue``; the checks in ``detkit.audit.checks``.

Names are imported lazily: rendering a saved report does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from detkit.audit.vocab import CHECK_HELP, CHECKS, IMPLS

_LAZY = {
    "CATALOGUE": "detkit.audit.catalogue",
    "OPS": "detkit.audit.catalogue",
    "OpSpec": "detkit.audit.catalogue",
    "resolve_ops": "detkit.audit.catalogue",
    "AuditConfig": "detkit.audit.runner",
    "DEFAULT_BATCH_SIZES": "detkit.audit.runner",
    "Event": "detkit.audit.runner",
    "run_audit": "detkit.audit.runner",
    "summarize": "detkit.audit.summary",
}

__all__ = ["CHECKS", "CHECK_HELP", "IMPLS", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from detkit.audit.catalogue import CATALOGUE, OPS, OpSpec, resolve_ops  # noqa: F401
    from detkit.audit.runner import DEFAULT_BATCH_SIZES, AuditConfig, Event, run_audit  # noqa: F401
    from detkit.audit.summary import summarize  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detkit.audit' has no attribute {name!r}")
