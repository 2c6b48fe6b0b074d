"""The small contract between the probe and an inference engine.

An engine runs a group of requests *together* (one batch for an in-process model, one
burst of concurrent requests for a server) at temperature 0 and returns, per request,
the generated token ids and, where it can, per-step scores: the top-k candidates and
their logits (or log-probabilities for servers). Everything else (which batches to form,
what to compare, the reference) lives in the probe modes, so an adapter for vLLM's
offline ``LLM`` or an SGLang engine is one short file implementing :class:`Engine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

SCORE_KINDS = ("logit", "logprob")


@dataclass(frozen=True)
class Request:
    """One prompt to run inside a group.

    ``extra_left_padding``: pad tokens added on the left beyond what the group needs
    (the ``padding`` mode; an engine that pads on the right, as the Hugging Face engine
    does an encoder-decoder's encoder, adds them there); engines that cannot control
    padding reject nonzero values. ``chat``: the prompt is one user message, put in the
    tokenizer's chat template (the Hugging Face engine; a server takes chat requests
    through its chat API instead).
    """

    prompt: str
    extra_left_padding: int = 0
    chat: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError("a probe request needs a non-empty prompt string")
        if self.extra_left_padding < 0:
            raise ValueError(f"extra_left_padding must be >= 0, got {self.extra_left_padding}")


@dataclass
class StepScores:
    """The top-k candidates at one generation step, best first.

    ``ids`` are token ids (int). ``values`` are logits (``kind == "logit"``) or
    log-probabilities (``"logprob"``) as float64 holding the engine's value exactly.
    """

    ids: list[int]
    values: list[float]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.values) or not self.ids:
            raise ValueError("StepScores needs as many values as ids, and at least one")
        if any(math.isnan(v) for v in self.values):
            raise ValueError("StepScores values must not be NaN")

    @property
    def margin(self) -> float | None:
        """Top-1 minus top-2 score: how close this step was to flipping."""
        return self.values[0] - self.values[1] if len(self.values) > 1 else None


@dataclass
class Generation:
    """What an engine produced for one request.

    ``tokens``: generated token ids, excluding the prompt, truncated after end-of-text.
    ``scores``: one :class:`StepScores` per generated token, or None when the engine
    cannot provide scores. ``error``: a sentence when this request failed (recorded,
    never fatal to the probe); ``tokens`` is then empty.
    """

    tokens: list[int]
    scores: list[StepScores] | None = None
    score_kind: str | None = None
    score_dtype: str | None = None
    text: str | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores is not None:
            if self.score_kind not in SCORE_KINDS:
                raise ValueError(f"score_kind must be one of {SCORE_KINDS} when scores are given")
            if len(self.scores) != len(self.tokens):
                raise ValueError(f"{len(self.scores)} score steps for {len(self.tokens)} tokens")
        if self.error is not None and self.tokens:
            raise ValueError("a failed generation carries no tokens")

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Engine(Protocol):
    """What the probe needs from an inference engine."""

    name: str
    #: what one entry of Generation.tokens is: "token" (an id), or "character" (a code
    #: point of the completion text, for servers that return neither ids nor logprobs).
    token_unit: str
    #: modes this engine cannot run, with the reason (e.g. a server cannot pad).
    unsupported_modes: dict[str, str]
    #: sentences to show the user and store in the report (degraded capabilities).
    notes: list[str]

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the report's config (model, dtype, endpoint...)."""
        ...

    def generate(self, requests: Sequence[Request], *, max_new_tokens: int) -> list[Generation]:
        """Run ``requests`` together at temperature 0; one Generation per request, in order."""
        ...

    def teacher_forced(self, prompt: str, tokens: Sequence[int]) -> list[StepScores]:
        """Scores for each of ``tokens`` from one prefill of ``prompt + tokens`` (decode mode)."""
        ...

    def token_text(self, token: int) -> str:
        """A readable form of one token id, for reports."""
        ...

    def close(self) -> None:
        """Release resources (threads, sessions)."""
        ...


# Optional: an engine that runs detkit's mode may also define
# ``mode_coverage() -> {"routed": {...}, "fell_back": {...}} | None``; the runner copies
# it into the report and turns fallbacks into a note (no silent fallback).
# An engine that knows its context may define ``context_length: int | None`` (tokens);
# the modes then keep the filler prompts they make up within it.
