"""The probe modes: which groups of requests to run, and which rows to compare.

Each mode turns a suite into a list of :class:`Group` s (requests run together) whose
watched rows are compared with the reference of their prompt: the prompt alone, batch
size 1, no extra padding.

- ``single``: the prompt replicated at every batch size; every row is compared.
- ``mixed``: the prompt at a random position in batches of random size, among filler
  prompts of random lengths.
- ``prefix``: the prompt among prompts that share its first 25/50/75% of characters.
- ``padding``: the prompt alone with extra padding (left; an encoder-decoder engine pads its encoder on the right).
- ``decode``: logits of the reference's tokens from one teacher-forced prefill of the
  whole sequence vs those from incremental decoding.
- ``repeat``: one fixed mixed batch run several times.

All randomness comes from one ``random.Random(seed)`` per mode and prompt, so a run is
reproducible from the suite and ``--seed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from detkit.probe.engine import Engine, Generation, Request
from detkit.probe.metrics import ModeSummary, compare_run
from detkit.probe.suite import MODES, BatchPlan, ProbeSuite, Prompt


@dataclass(frozen=True)
class Watch:
    """A row of a group to compare with the reference of ``prompt_id``."""

    row: int
    prompt_id: str
    label: str


@dataclass(frozen=True)
class Group:
    label: str
    requests: tuple[Request, ...]
    watch: tuple[Watch, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"group {self.label!r} has no requests")
        if any(not 0 <= w.row < len(self.requests) for w in self.watch):
            raise ValueError(f"group {self.label!r} watches a row outside the batch")


_SPECIAL_TOKENS = 8  # BOS and the like, added by a tokenizer around a prompt


def filler(rng: random.Random, plan: BatchPlan, target_chars: int) -> str:
    """A filler prompt of about ``target_chars`` characters cut from the suite's fillers."""
    base = rng.choice(plan.fillers)
    text = (base + " ") * (target_chars // (len(base) + 1) + 1)
    start = rng.randrange(len(base))
    return text[start : start + max(1, target_chars)].strip() or base[:1]


def _room(chars: int, max_chars: int | None, used: int = 0) -> int:
    """The upper bound of a filler's length: ``chars``, within ``max_chars - used``."""
    return chars if max_chars is None else max(1, min(chars, max_chars - used))


def filler_limit(engine: Engine, suite: ProbeSuite) -> int | None:
    """The longest filler (in characters) that fits the engine's context, or None.

    Fillers are drawn up to four times the prompt's length; for a prompt that fits, they
    must not be what overflows the model. A filler of n characters is taken to have at
    most n tokens (every token covers at least one character: true of ASCII text for
    byte-level and BPE tokenizers), with a few tokens spare for specials, and room for
    what a chat template adds around every prompt (``prompt_overhead``).
    """
    context = getattr(engine, "context_length", None)
    if context is None:
        return None
    return context - suite.max_new_tokens - _SPECIAL_TOKENS - getattr(engine, "prompt_overhead", 0)


def _rng(seed: int, mode: str, prompt: Prompt) -> random.Random:
    # A string seed is hashed deterministically (not with the per-process hash salt).
    return random.Random(f"{seed}:{mode}:{prompt.id}")


def groups_single(prompt: Prompt, plan: BatchPlan, seed: int, max_chars: int | None) -> list[Group]:
    out = []
    for size in plan.sizes:
        reqs = tuple(Request(prompt.text) for _ in range(size))
        watch = tuple(Watch(row, prompt.id, f"{prompt.id} b={size} row={row}") for row in range(size))
        out.append(Group(f"single {prompt.id} b={size}", reqs, watch))
    return out


def groups_mixed(prompt: Prompt, plan: BatchPlan, seed: int, max_chars: int | None) -> list[Group]:
    rng = _rng(seed, "mixed", prompt)
    out = []
    for trial in range(plan.mixed_trials):
        size = rng.randint(min(2, plan.max_size), plan.max_size)
        pos = rng.randrange(size)
        reqs = [
            Request(filler(rng, plan, rng.randint(1, _room(4 * len(prompt.text), max_chars))))
            if row != pos
            else Request(prompt.text)
            for row in range(size)
        ]
        label = f"{prompt.id} trial={trial} b={size} pos={pos}"
        out.append(Group(f"mixed {label}", tuple(reqs), (Watch(pos, prompt.id, label),)))
    return out


def groups_prefix(prompt: Prompt, plan: BatchPlan, seed: int, max_chars: int | None) -> list[Group]:
    rng = _rng(seed, "prefix", prompt)
    out = []
    size = max(2, min(plan.max_size, 4))
    for frac in plan.prefix_fractions:
        shared = max(1, int(len(prompt.text) * frac))
        others = [
            Request(prompt.text[:shared]
                    + filler(rng, plan, rng.randint(1, _room(2 * len(prompt.text), max_chars, shared))))
            for _ in range(size - 1)
        ]
        pos = rng.randrange(size)
        reqs = others[:pos] + [Request(prompt.text)] + others[pos:]
        label = f"{prompt.id} shared={shared}ch b={size} pos={pos}"
        out.append(Group(f"prefix {label}", tuple(reqs), (Watch(pos, prompt.id, label),)))
    return out


def groups_padding(prompt: Prompt, plan: BatchPlan, seed: int, max_chars: int | None) -> list[Group]:
    return [
        Group(
            f"padding {prompt.id} pad={pad}",
            (Request(prompt.text, extra_left_padding=pad),),
            (Watch(0, prompt.id, f"{prompt.id} pad={pad}"),),
        )
        for pad in plan.padding
    ]


def groups_repeat(prompt: Prompt, plan: BatchPlan, seed: int, max_chars: int | None) -> list[Group]:
    # One fixed mixed batch (drawn once), run `repeats` times.
    base = groups_mixed(prompt, BatchPlan(sizes=plan.sizes, mixed_trials=1, fillers=plan.fillers), seed + 1, max_chars)[0]
    out = []
    for rep in range(plan.repeats):
        label = f"{prompt.id} repeat={rep} b={len(base.requests)}"
        out.append(Group(f"repeat {label}", base.requests, (Watch(base.watch[0].row, prompt.id, label),)))
    return out


BUILDERS: dict[str, Callable[[Prompt, BatchPlan, int, int | None], list[Group]]] = {
    "single": groups_single,
    "mixed": groups_mixed,
    "prefix": groups_prefix,
    "padding": groups_padding,
    "repeat": groups_repeat,
}


# Modes that put the prompt among other requests: with batches of 1 they would exceed the
# sizes asked for, or compare the prompt with itself.
_NEED_COMPANY = ("mixed", "prefix", "repeat")


def batch_too_small(mode: str, suite: ProbeSuite) -> str | None:
    """Why ``mode`` cannot run with the suite's batch sizes, or None."""
    if mode in _NEED_COMPANY and suite.batch.max_size < 2:
        return f"{mode} puts the prompt among other requests; the largest batch size asked for is 1"
    return None


def plan_mode(mode: str, suite: ProbeSuite, seed: int, max_chars: int | None = None) -> list[Group]:
    """All groups ``mode`` runs for ``suite`` (``decode`` has none: it is not batched).

    ``max_chars``: the longest filler prompt the engine can hold, or None for no limit.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "decode" or batch_too_small(mode, suite):
        return []
    return [g for p in suite.prompts for g in BUILDERS[mode](p, suite.batch, seed, max_chars)]


def work_units(mode: str, suite: ProbeSuite, seed: int) -> int:
    """How many engine calls ``mode`` makes (for the progress bar)."""
    return len(suite.prompts) if mode == "decode" else len(plan_mode(mode, suite, seed))


class ModeInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) inside a mode: ``summary`` holds the runs that finished."""

    def __init__(self, summary: ModeSummary) -> None:
        super().__init__()
        self.summary = summary


def run_mode(
    mode: str,
    engine: Engine,
    suite: ProbeSuite,
    references: dict[str, Generation],
    *,
    seed: int,
    score_kind: str | None,
    token_unit: str,
    advance: Callable[[str], None] = lambda label: None,
) -> ModeSummary:
    """Run every group of ``mode`` and compare each watched row with its reference.

    Interrupted, it raises :class:`ModeInterrupted` carrying the runs finished so far."""
    summary = ModeSummary(
        name=mode,
        score_kind=score_kind,
        token_unit=token_unit,
        references={pid: list(g.tokens) for pid, g in references.items()},
    )
    try:
        return _run_mode(mode, engine, suite, references, summary, seed=seed, advance=advance)
    except KeyboardInterrupt as stop:
        summary.complete = False
        raise ModeInterrupted(summary) from stop


def _run_mode(
    mode: str,
    engine: Engine,
    suite: ProbeSuite,
    references: dict[str, Generation],
    summary: ModeSummary,
    *,
    seed: int,
    advance: Callable[[str], None],
) -> ModeSummary:
    if mode in engine.unsupported_modes:
        summary.skipped = engine.unsupported_modes[mode]
        return summary
    if (why := batch_too_small(mode, suite)) is not None:
        summary.skipped = why
        return summary
    if mode == "decode":
        for prompt in suite.prompts:
            ref = references[prompt.id]
            steps = engine.teacher_forced(prompt.text, ref.tokens)
            forced = Generation(
                tokens=[s.ids[0] for s in steps],
                scores=steps,
                score_kind=ref.score_kind,
                score_dtype=ref.score_dtype,
            )
            summary.runs.append(
                compare_run(
                    mode,
                    f"{prompt.id} prefill vs incremental",
                    prompt.id,
                    ref,
                    forced,
                    token_text=engine.token_text,
                    aligned_context=True,
                )
            )
            advance(f"decode {prompt.id}")
        summary.notes.append(
            "decode compares the argmax of a teacher-forced prefill of prompt + reference tokens "
            "with the incrementally decoded reference; every step is comparable."
        )
        return summary
    for group in plan_mode(mode, suite, seed, filler_limit(engine, suite)):
        gens = engine.generate(group.requests, max_new_tokens=suite.max_new_tokens)
        for w in group.watch:
            summary.runs.append(
                compare_run(mode, w.label, w.prompt_id, references[w.prompt_id], gens[w.row], token_text=engine.token_text)
            )
        advance(group.label)
    return summary
