"""``detkit probe``: temperature-0 generation under varied batches, diffed against a reference.

- :mod:`detkit.probe.engine`: the :class:`Engine` protocol, :class:`Request`, :class:`Generation`.
- :mod:`detkit.probe.hf`: Hugging Face engine (presets or local model directories).
- :mod:`detkit.probe.http`: OpenAI-compatible server engine.
- :mod:`detkit.probe.modes`: single, mixed, prefix, padding, decode, repeat.
- :mod:`detkit.probe.metrics`: step-by-step comparison and per-mode summaries.
- :mod:`detkit.probe.suite`: probe suites as TOML data.
- :mod:`detkit.probe.runner`: :func:`run_probe`, incremental JSON report.
- :mod:`detkit.probe.render`: Markdown and self-contained HTML.
- :mod:`detkit.probe.server`: a small batching OpenAI-compatible server over a HF model.

Submodules import torch/transformers lazily; importing this package is cheap.
"""

from __future__ import annotations

from detkit.probe.engine import Engine, Generation, Request, StepScores

__all__ = ["Engine", "Generation", "Request", "StepScores"]
