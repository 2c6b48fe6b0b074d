"""Run a probe suite on an engine and write the report incrementally.

The report is a ``detkit.report`` of kind ``probe``. On top of the shared conventions it
carries ``references`` (the reference token stream per prompt) and ``modes`` (one
summary per finished mode, see :class:`detkit.probe.metrics.ModeSummary`); ``results``
holds the raw token stream of every compared run, so every number can be recomputed.
The file is rewritten after every mode: Ctrl-C keeps the finished modes and marks the
report ``partial``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from detkit.errors import ContextTooLong, EndpointError, InputError
from detkit.probe.engine import Engine, Generation, Request
from detkit.probe.metrics import ModeSummary
from detkit.probe.modes import ModeInterrupted, run_mode, work_units
from detkit.probe.suite import ProbeSuite
from detkit.report import ReportWriter


def total_work(engine: Engine, suite: ProbeSuite, seed: int) -> int:
    """Engine calls the whole probe makes: references plus every supported mode."""
    return len(suite.prompts) + sum(
        work_units(m, suite, seed) for m in suite.modes if m not in engine.unsupported_modes
    )


def _runs(summary: ModeSummary) -> list[dict[str, Any]]:
    return [{"run": r.label, "prompt": r.prompt_id, "tokens": r.tokens, "error": r.error, **r.meta}
            for r in summary.runs]


def _summary(modes: list[dict[str, Any]], planned: list[str], *, complete: bool) -> dict[str, Any]:
    ran = [m for m in modes if m["skipped"] is None]
    cut = [m["name"] for m in modes if not m.get("complete", True)]
    skipped = {m["name"]: m["skipped"] for m in modes if m["skipped"] is not None}
    not_run = [name for name in planned if name not in {m["name"] for m in modes}]
    diffs = [m["max_abs_logit_diff"] for m in ran if m["max_abs_logit_diff"] is not None]
    diffs += [m["max_abs_logprob_diff"] for m in ran if m["max_abs_logprob_diff"] is not None]
    unique = [m["unique_completions"] for m in ran if m["unique_completions"] is not None]
    diverging = sum(len(m["divergences"]) for m in ran)
    failed = sum(m["failed_runs"] for m in ran)
    retried = sum(m.get("retried_runs", 0) for m in ran)
    differences = diverging > 0 or any(u > 1 for u in unique) or any(d != 0 for d in diffs)
    # Say which criterion failed: scores can differ while every token agrees.
    reasons = [text for bad, text in (
        (not ran, "no mode ran"),
        (diverging > 0, f"{diverging} run(s) diverge from the reference in tokens"),
        (any(u > 1 for u in unique), f"up to {max(unique, default=0)} distinct completions of one prompt"),
        (any(d != 0 for d in diffs), f"scores differ from the reference by up to {max(diffs, default=0)}"
                                     f"{' (tokens identical)' if diverging == 0 else ''}"),
        (failed > 0, f"{failed} run(s) failed, so they prove nothing"),
    ) if bad]
    compared = "tokens and scores" if diffs else "tokens only: the engine returned no scores"
    scope = "every mode" if not skipped else f"the {len(ran)} mode(s) run"
    caveats = ([f"skipped: {', '.join(skipped)}"] if skipped else []) + (
        [f"{retried} run(s) needed a retry, sent alone outside their burst"] if retried else [])
    if not complete:
        invariant = None
        where = (f"stopped in {', '.join(cut)} (its finished runs kept)" + (f", before {', '.join(not_run)}"
                 if not_run else "")) if cut else f"stopped before {', '.join(not_run) or 'the end'}"
        verdict = (f"INCOMPLETE: {where}; "
                   + ("; ".join(reasons) if reasons else f"so far identical to the reference ({compared})"))
    elif differences:
        invariant = False
        verdict = "NOT invariant: " + "; ".join(reasons)
    elif reasons:
        # Nothing differed, but failed runs (or no mode at all) leave the question open:
        # an environment problem, not a verdict on the engine.
        invariant = None
        answered = any(m["runs"] > m["failed_runs"] for m in ran)
        verdict = "UNDECIDED: " + "; ".join(reasons) + (
            f"; the rest identical to the reference ({compared})" if answered else "")
    else:
        invariant = True
        verdict = "; ".join([f"identical to the reference in {scope} ({compared})", *caveats])
    return {
        "modes_run": [m["name"] for m in ran],
        "modes_skipped": skipped,
        "modes_not_reached": not_run,
        "runs": sum(m["runs"] for m in ran),
        "failed_runs": failed,
        "retried_runs": retried,
        "diverging_runs": diverging,
        "max_unique_completions": max(unique) if unique else None,
        "max_abs_score_diff": max(diffs) if diffs else None,
        "differences_found": differences,
        "invariant": invariant,
        "verdict": verdict,
    }


def _sync_notes(writer: ReportWriter, engine: Engine) -> None:
    """Copy the engine's notes, and what detkit's mode covered (no silent fallback)."""
    notes = list(engine.notes)
    coverage = getattr(engine, "mode_coverage", None)
    data = coverage() if callable(coverage) else None
    if data is not None:
        writer.data["mode_coverage"] = data
        if data["fell_back"]:
            notes.append(
                "under the mode, some calls ran torch's kernel (no invariance guarantee for them): "
                + ", ".join(f"{k} x{v}" for k, v in data["fell_back"].items())
            )
        if data.get("not_portable"):
            notes.append(
                "portable mode: some calls' values came from torch's math library (batch invariant, but their bits "
                "may differ on another CPU or a GPU): "
                + ", ".join(f"{k} x{v}" for k, v in data["not_portable"].items())
            )
    writer.data["notes"] = notes
    if "engine" in writer.data["config"]:  # what the engine learnt on the way (logprobs, token unit)
        writer.data["config"]["engine"] = engine.describe()


def check_context(engine: Engine, suite: ProbeSuite) -> None:
    """Raise :class:`ContextTooLong` now if a prompt, with the new tokens and the ``padding``
    mode's largest extra padding, is past the model's context.

    The engine would say so itself, but only when that run comes: the padding mode's
    prompt is its longest input, and finding that out after the other modes ran would
    throw their work away. Engines that know their context have ``encode`` and
    ``check_fits`` (the Hugging Face engine); others are not checked here.
    """
    encode, check_fits = getattr(engine, "encode", None), getattr(engine, "check_fits", None)
    if not callable(encode) or not callable(check_fits):
        return
    padding = "padding" in suite.modes and "padding" not in engine.unsupported_modes
    pad = max(suite.batch.padding) if padding else 0
    for prompt in suite.prompts:
        n = len(encode(prompt.text))
        check_fits(n, suite.max_new_tokens, f"prompt {prompt.id!r}")
        if pad:
            try:
                check_fits(n + pad, suite.max_new_tokens,
                           f"prompt {prompt.id!r} with the padding mode's {pad} extra pad tokens")
            except ContextTooLong as exc:
                raise ContextTooLong(f"{exc} Or lower the suite's [batch] padding (largest {pad}), "
                                     "or leave the padding mode out (--modes).") from None


class ProbeInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a probe: ``report`` is the partial report (``status: partial``)."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__()
        self.report = report


def run_probe(
    engine: Engine,
    suite: ProbeSuite,
    *,
    seed: int,
    config: dict[str, Any],
    out: Path | None = None,
    advance: Callable[[str], None] = lambda label: None,
    on_mode: Callable[[dict[str, Any]], None] = lambda record: None,
) -> dict[str, Any]:
    """Run ``suite`` on ``engine``; returns the finished report (also written to ``out``).

    Failures of single requests are recorded in the modes; a reference that cannot be
    produced is fatal (:class:`EndpointError`), since nothing could be compared. An
    exception that stops the probe carries the partial report (``status: partial``, the
    finished modes, the error) as its ``partial_report`` attribute.
    """
    runnable = [m for m in suite.modes if m not in engine.unsupported_modes]
    if not runnable:
        raise InputError("none of the modes asked for can run on this engine: " + "; ".join(
            f"{m}: {engine.unsupported_modes[m]}" for m in suite.modes))
    check_context(engine, suite)
    writer = ReportWriter("probe", config, out)
    writer.data["notes"] = list(engine.notes)
    writer.data["references"] = {}
    writer.data["modes"] = []
    try:
        references: dict[str, Generation] = {}
        for prompt in suite.prompts:
            gen = engine.generate([Request(prompt.text)], max_new_tokens=suite.max_new_tokens)[0]
            if not gen.ok:
                raise EndpointError(f"the reference run of prompt {prompt.id!r} (alone, batch size 1) failed: {gen.error}")
            if not gen.tokens:
                raise InputError(f"the reference of prompt {prompt.id!r} generated no tokens; nothing to compare")
            references[prompt.id] = gen
            writer.data["references"][prompt.id] = {
                "tokens": gen.tokens,
                "text": gen.text if gen.text is not None else "".join(engine.token_text(t) for t in gen.tokens),
                "score_kind": gen.score_kind,
                "score_dtype": gen.score_dtype,
            }
            _sync_notes(writer, engine)
            writer.flush()
            advance(f"reference {prompt.id}")
        first = next(iter(references.values()))
        score_kind = first.score_kind if all(g.scores is not None for g in references.values()) else None
        for mode in suite.modes:
            summary = run_mode(
                mode,
                engine,
                suite,
                references,
                seed=seed,
                score_kind=score_kind,
                token_unit=engine.token_unit,
                advance=advance,
            )
            record = summary.to_dict()
            writer.data["modes"].append(record)
            _sync_notes(writer, engine)
            writer.add_result({"mode": mode, "runs": _runs(summary)})
            on_mode(record)
    except BaseException as exc:
        if isinstance(exc, ModeInterrupted) and exc.summary.runs:  # keep the interrupted mode's finished runs
            writer.data["modes"].append(exc.summary.to_dict())
            writer.add_result({"mode": exc.summary.name, "complete": False, "runs": _runs(exc.summary)})
        _sync_notes(writer, engine)
        if not isinstance(exc, KeyboardInterrupt):
            writer.add_error("probe", exc)
        partial = writer.finish(_summary(writer.data["modes"], list(suite.modes), complete=False), partial=True)
        if isinstance(exc, KeyboardInterrupt):
            raise ProbeInterrupted(partial) from exc
        # so that a caller without a report file (``--json`` alone) can still show what finished
        exc.partial_report = partial  # type: ignore[attr-defined]
        raise
    _sync_notes(writer, engine)
    return writer.finish(_summary(writer.data["modes"], list(suite.modes), complete=True))
