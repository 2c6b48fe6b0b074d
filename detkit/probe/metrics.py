"""Step-by-step comparison of a generation against its reference, and per-mode summaries.

Token ids are compared position by position with :func:`detkit.compare.first_divergence`.
Scores are compared only where both runs saw the same context: every step up to and
including the first divergence (after it, the two runs condition on different tokens
and their logits are no longer comparable), or every step when the context was
teacher-forced (``decode`` mode). At each such step the top-k lists of both runs are
matched by token id and the largest |delta| over the shared ids is kept, with its
distance in ULPs of the dtype the scores were produced in; an id one list kept above
everything the other kept counts with the gap, a lower bound of its difference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from detkit.probe.engine import Generation, StepScores


@dataclass
class RunComparison:
    """One run (one row of one group) against the reference of its prompt."""

    mode: str
    label: str
    prompt_id: str
    tokens: list[int]
    error: str | None = None
    divergence: int | None = None
    ref_token: int | None = None
    run_token: int | None = None
    ref_token_text: str | None = None
    run_token_text: str | None = None
    margin_ref: float | None = None
    margin_run: float | None = None
    step_max_abs: list[float] = field(default_factory=list)
    step_max_ulp: list[int] = field(default_factory=list)
    steps_compared: int = 0
    argmax_flips: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.step_max_abs) != len(self.step_max_ulp):
            raise ValueError("step_max_abs and step_max_ulp must have one entry per compared step")

    @property
    def max_abs(self) -> float | None:
        return max(self.step_max_abs) if self.step_max_abs else None

    @property
    def max_ulp(self) -> int | None:
        return max(self.step_max_ulp) if self.step_max_ulp else None

    def divergence_record(self) -> dict[str, Any]:
        return {
            "run": self.label,
            "prompt": self.prompt_id,
            "position": self.divergence,
            "ref_token": self.ref_token,
            "run_token": self.run_token,
            "ref_token_text": self.ref_token_text,
            "run_token_text": self.run_token_text,
            "margin_ref": self.margin_ref,
            "margin_run": self.margin_run,
        }


def _ulp(a: float, b: float, dtype: str | None) -> int:
    import torch

    from detkit.compare import ulp_distance

    tdtype = getattr(torch, dtype or "float32", torch.float32)
    pair = torch.tensor([a, b], dtype=torch.float64).to(tdtype)
    return int(ulp_distance(pair[:1], pair[1:])[0])


def step_diff(ref: StepScores, run: StepScores, dtype: str | None) -> tuple[float, int]:
    """Max |delta| and max ULP distance over the token ids present in both top-k lists.

    An id that one list kept and the other did not, scored above the lowest score the
    other kept (past its first entry, the token generation took), was scored no higher
    than that lowest score by the other run: the gap is a lower bound of its difference
    and counts as one. Without it, two runs whose shared scores agree but whose candidate
    lists differ were called identical. A tie with that lowest score proves nothing.
    """
    ref_by_id = dict(zip(ref.ids, ref.values))
    best_abs, best_ulp = 0.0, 0

    def differ(a: float, b: float) -> None:
        nonlocal best_abs, best_ulp
        best_abs = max(best_abs, abs(a - b))
        best_ulp = max(best_ulp, _ulp(a, b, dtype))

    for token, value in zip(run.ids, run.values):
        if token in ref_by_id and ref_by_id[token] != value:
            differ(ref_by_id[token], value)
    for mine, other in ((run, ref), (ref, run)):
        if len(other.values) < 2:
            continue
        floor, kept = min(other.values[1:]), set(other.ids)
        for token, value in zip(mine.ids, mine.values):
            if token not in kept and value > floor:
                differ(value, floor)
    return best_abs, best_ulp


def compare_run(
    mode: str,
    label: str,
    prompt_id: str,
    reference: Generation,
    run: Generation,
    *,
    token_text: Callable[[int], str] | None = None,
    aligned_context: bool = False,
) -> RunComparison:
    """Compare ``run`` with ``reference`` token by token and score by score."""
    from detkit.compare import first_divergence

    if not run.ok:
        return RunComparison(mode, label, prompt_id, tokens=[], error=run.error, meta=dict(run.meta))
    div = first_divergence(reference.tokens, run.tokens)
    cmp = RunComparison(mode, label, prompt_id, tokens=list(run.tokens), divergence=div, meta=dict(run.meta))
    if div is not None:
        cmp.ref_token = reference.tokens[div] if div < len(reference.tokens) else None
        cmp.run_token = run.tokens[div] if div < len(run.tokens) else None
        if token_text is not None:
            cmp.ref_token_text = None if cmp.ref_token is None else token_text(cmp.ref_token)
            cmp.run_token_text = None if cmp.run_token is None else token_text(cmp.run_token)
        if reference.scores is not None and div < len(reference.scores):
            cmp.margin_ref = reference.scores[div].margin
        if run.scores is not None and div < len(run.scores):
            cmp.margin_run = run.scores[div].margin
    if reference.scores is None or run.scores is None:
        return cmp
    n = min(len(reference.scores), len(run.scores))
    if not aligned_context and div is not None:
        n = min(n, div + 1)
    dtype = run.score_dtype if run.score_dtype == reference.score_dtype else "float32"
    for step in range(n):
        a, u = step_diff(reference.scores[step], run.scores[step], dtype)
        cmp.step_max_abs.append(a)
        cmp.step_max_ulp.append(u)
        cmp.argmax_flips += reference.scores[step].ids[0] != run.scores[step].ids[0]
    cmp.steps_compared = n
    return cmp


@dataclass
class ModeSummary:
    """One row of the probe report."""

    name: str
    score_kind: str | None
    token_unit: str
    runs: list[RunComparison] = field(default_factory=list)
    references: dict[str, list[int]] = field(default_factory=dict)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    complete: bool = True  # False: interrupted; ``runs`` holds what finished before

    def to_dict(self) -> dict[str, Any]:
        ok = [r for r in self.runs if r.error is None]
        unique_by_prompt: dict[str, int] = {}
        among_runs: list[int] = []  # distinct streams among the runs alone (run-to-run, for repeat)
        for pid, ref in self.references.items():
            runs = {tuple(r.tokens) for r in ok if r.prompt_id == pid}
            if runs:  # a prompt whose runs all failed shows nothing, not "1 unique"
                unique_by_prompt[pid] = len({tuple(ref)} | runs)
                among_runs.append(len(runs))
        diverging = [r for r in ok if r.divergence is not None]
        with_scores = [r for r in ok if r.step_max_abs]
        per_step: list[float] = []
        per_step_ulp: list[int] = []
        for r in with_scores:
            for i, (a, u) in enumerate(zip(r.step_max_abs, r.step_max_ulp)):
                if i == len(per_step):
                    per_step.append(a)
                    per_step_ulp.append(u)
                else:
                    per_step[i] = max(per_step[i], a)
                    per_step_ulp[i] = max(per_step_ulp[i], u)
        has_scores = self.score_kind is not None and self.skipped is None and bool(with_scores)
        max_abs = max(per_step) if has_scores else None
        steps = sum(r.steps_compared for r in ok)
        flips = sum(r.argmax_flips for r in ok)
        margins = [r.margin_ref for r in diverging if r.margin_ref is not None]
        return {
            "name": self.name,
            "skipped": self.skipped,
            "complete": self.complete,
            "runs": len(self.runs),
            "failed_runs": len(self.runs) - len(ok),
            "retried_runs": sum(1 for r in self.runs if r.meta.get("attempts", 1) > 1),
            "identical_runs": sum(1 for r in ok if r.divergence is None and not any(r.step_max_abs)),
            "unique_completions": max(unique_by_prompt.values()) if unique_by_prompt and self.skipped is None else None,
            "unique_completions_by_prompt": unique_by_prompt,
            "unique_among_runs": max(among_runs) if among_runs else None,
            "token_unit": self.token_unit,
            "score_kind": self.score_kind if has_scores else None,
            "max_abs_logit_diff": max_abs if self.score_kind == "logit" else None,
            "max_abs_logprob_diff": max_abs if self.score_kind == "logprob" else None,
            "max_ulp": max(per_step_ulp) if has_scores and self.score_kind == "logit" else None,
            "runs_with_logit_diff": sum(1 for r in with_scores if any(r.step_max_abs)),
            "per_step_max_abs_diff": per_step if has_scores else None,
            "per_step_max_ulp": per_step_ulp if has_scores and self.score_kind == "logit" else None,
            "steps_compared": steps,
            "argmax_flips": flips,
            "flip_share": (flips / steps) if steps else None,
            "divergences": [r.divergence_record() for r in diverging],
            "divergence_histogram": {str(k): v for k, v in sorted(Counter(r.divergence for r in diverging).items())},
            "min_margin_at_divergence": min(margins) if margins else None,
            "errors": [{"run": r.label, "prompt": r.prompt_id, "error": r.error} for r in self.runs if r.error],
            "notes": list(self.notes),
        }
