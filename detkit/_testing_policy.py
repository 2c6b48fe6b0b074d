"""Sampler vs trainer, for ``assert_trainer_matches_sampler``.

In RL fine-tuning the sampler generates completions (incremental decoding through the KV
cache, many requests in one left-padded batch, no autograd) and the trainer scores the
same sequences again (one teacher-forced forward per training batch, right-padded, in
train mode, with autograd recording). The policy-gradient maths assumes both see the same
distribution; when their logits differ by even one ULP, "on-policy" training is silently
off-policy (sampler-trainer KL > 0). This check measures exactly that, on the user's model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from detkit import _testing_values as V
from detkit.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from detkit.testing import CheckResult

PADDING_SIDES = ("right", "left")

HINT_POLICY = (
    "What to try: run the sampler and the trainer under `with detkit.batch_invariant():` "
    "(in pytest: @pytest.mark.batch_invariant or --detkit-mode=batch-invariant); the mode makes "
    "a row's logits independent of its batch, its padding, decode vs prefill and autograd. If "
    "it already runs under the mode, an op without a detkit kernel differs between the two "
    "paths: `with detkit.batch_invariant() as mode:` then `mode.uncovered()` lists the calls that "
    "fell back to torch (or pass strict=True to raise at the first one).")


def _active_dropout(model: Any) -> str | None:
    """The first dropout that would make a train-mode forward random, or None."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"module {name or type(module).__name__} (p={module.p})"
    # Llama, Qwen2, Mistral and kin apply attention dropout functionally from the config.
    p = getattr(getattr(model, "config", None), "attention_dropout", 0.0)
    if isinstance(p, (int, float)) and p > 0:
        return f"config.attention_dropout={p}"
    return None


def _rng_states(device: Any) -> list[bytes]:
    """The states of the generators a forward on ``device`` would draw from (dropout, noise)."""
    import torch

    states = [torch.get_rng_state()]
    if getattr(device, "type", None) == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return [bytes(s.numpy()) for s in states]  # bytes, not torch.equal: nothing of the check runs through the mode


def _depends_on_rng(model: Any, inp: Any, mask: Any, pos: Any, logits: Any, device: Any) -> bool:
    """Whether the forward's values change with the random numbers it drew: run again on
    other random numbers. A draw that changes nothing (transformers' LayerDrop coin,
    tossed in train mode even at layerdrop 0) must not refuse the model."""
    import torch

    # From the state the first forward left (so other numbers); fork_rng puts it back after.
    with torch.random.fork_rng(devices=[device] if getattr(device, "type", None) == "cuda" else []):
        with torch.enable_grad():
            again = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return not V.same_bits(logits.detach(), again.detach())


def _trainer_batch(
    seqs: list[list[int]], pad_id: int, side: str, device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(input ids, attention mask, position ids, offset of each row's first real token)."""
    import torch

    width = max(len(s) for s in seqs)
    offsets = [width - len(s) if side == "left" else 0 for s in seqs]
    ids = [[pad_id] * o + s + [pad_id] * (width - len(s) - o) for s, o in zip(seqs, offsets)]
    mask = [[0] * o + [1] * len(s) + [0] * (width - len(s) - o) for s, o in zip(seqs, offsets)]
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    mask_t = torch.tensor(mask, dtype=torch.long, device=device)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0 on either side
    return ids_t, mask_t, pos, offsets


def _trainer_sizes(batch_sizes: Any) -> list[int]:
    """Batch size 1 alone is a meaningful trainer (each sequence scored on its own)."""
    import numbers

    try:
        sizes = list(batch_sizes)
    except TypeError:
        sizes = []
    if not sizes or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1 for b in sizes):
        raise InputError(f"trainer_batch_sizes must be a non-empty list of positive ints, got {batch_sizes!r}")
    return sorted({int(b) for b in sizes})


def _log_softmax64(logits: torch.Tensor) -> np.ndarray:
    import torch

    # numpy, not torch: the check's own arithmetic must not run through (or count in) the mode.
    x = logits.detach().to("cpu", torch.float64).numpy()
    with np.errstate(invalid="ignore"):  # a row of -inf logits stays -inf/NaN, as it is
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_and_logprob_gap(
    sampler: torch.Tensor, trainer: torch.Tensor, tokens: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Per step: KL(sampler || trainer) in nats and |log p_sampler(token) - log p_trainer(token)|,
    both in float64 from the logits. Equal log-probabilities (-inf included) contribute 0, and
    so does a token the sampler gives probability 0 (0 log 0/q = 0, not 0 * -inf = NaN)."""
    ls, lt = _log_softmax64(sampler), _log_softmax64(trainer)
    with np.errstate(invalid="ignore"):
        delta = np.where(ls == lt, 0.0, ls - lt)
        ps = np.exp(ls)
        kl = np.maximum(np.where(ps == 0, 0.0, ps * delta).sum(-1), 0.0)
    picked = tokens.to("cpu").numpy()[:, None]
    gap = np.abs(np.take_along_axis(delta, picked, -1)[:, 0])
    return kl, gap


def _sample(
    model: Any, ids: list[list[int]], pad_id: int, batch: int, steps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The sampler, as an inference engine runs it: weights without gradients, eval mode,
    no autograd, incremental greedy decoding through the KV cache in left-padded batches,
    logits of the last position only (HF generate's logits_to_keep=1). Per prompt: the
    tokens (steps,) and their logits (steps, V). The caller restores the model's state."""
    from detkit._testing_generation import greedy

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokens: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    for start in range(0, len(ids), batch):
        toks, logs = greedy(model, ids[start : start + batch], pad_id, steps)
        tokens.extend(toks)
        logits.extend(logs)
    return tokens, logits


def _max(a: float, b: float) -> float:
    """max that keeps a NaN (a NaN trainer logit): Python's max drops one in second place."""
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


@dataclass
class _Tally:
    """What the trainer's scoring found, for one trainer batch size or for all."""

    sequences: int = 0
    steps: int = 0
    steps_differ: int = 0
    max_ulp: int | None = None
    kl_sum: float = 0.0
    kl_max: float = 0.0
    max_logprob_gap: float = 0.0

    def add(self, kl: np.ndarray, gap: np.ndarray, differ: int, ulp: int | None) -> None:
        from detkit.testing import _worst

        self.sequences += 1
        self.steps += kl.size
        self.kl_sum += float(kl.sum())
        self.kl_max = _max(self.kl_max, float(kl.max()))
        self.max_logprob_gap = _max(self.max_logprob_gap, float(gap.max()))
        if differ:
            self.steps_differ += differ
            self.max_ulp = _worst([self.max_ulp, ulp])

    def merge(self, other: _Tally) -> None:
        from detkit.testing import _worst

        self.sequences += other.sequences
        self.steps += other.steps
        self.steps_differ += other.steps_differ
        self.max_ulp = _worst([self.max_ulp, other.max_ulp])
        self.kl_sum += other.kl_sum
        self.kl_max = _max(self.kl_max, other.kl_max)
        self.max_logprob_gap = _max(self.max_logprob_gap, other.max_logprob_gap)


@dataclass
class _Scoring:
    """The trainer's side: per trainer batch size, and the first differing step."""

    per_size: dict[str, _Tally] = field(default_factory=dict)
    first: dict[str, Any] | None = None
    first_text: str = ""

    def total(self) -> _Tally:
        out = _Tally()
        for tally in self.per_size.values():
            out.merge(tally)
        return out


def _score(model: Any, ids: list[list[int]], tokens: list[torch.Tensor], sampled: list[torch.Tensor], pad_id: int,
           sizes: list[int], side: str, rng: random.Random) -> _Scoring:
    """The trainer: one teacher-forced forward per batch of whole sequences (random
    composition, ``side``-padded), autograd recording; each prompt's completion logits
    compared with the sampler's."""
    import torch

    steps = len(tokens[0])
    seqs = [p + [int(t) for t in toks] for p, toks in zip(ids, tokens)]
    device = next(model.parameters()).device
    out = _Scoring()
    n = len(ids)
    for b in sizes:
        tally = out.per_size.setdefault(str(b), _Tally())
        order = rng.sample(range(n), n)
        for start in range(0, n, b):
            rows = order[start : start + b]
            rows += [rng.randrange(n) for _ in range(b - len(rows))]
            rng.shuffle(rows)
            inp, mask, pos, offsets = _trainer_batch([seqs[r] for r in rows], pad_id, side, device)
            before = _rng_states(device)
            with torch.enable_grad():
                logits = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=False).logits
            if _rng_states(device) != before and _depends_on_rng(model, inp, mask, pos, logits, device):
                raise InputError(
                    f"the trainer's forward ({'train' if model.training else 'eval'} mode) draws random numbers "
                    "(torch's random number generator advanced during it, and a second forward on other numbers "
                    "gave other logits): a dropout or noise that no nn.Dropout "
                    "module nor config.attention_dropout shows, such as a functional dropout from the config "
                    "(OPT's config.dropout) or an MoE router's jitter (config.router_jitter_noise); every trainer "
                    "forward then differs and no two runs can agree. Set it to 0 as RL trainers do, or pass "
                    "train=False"
                )
            for slot, r in enumerate(rows):
                at = offsets[slot] + len(ids[r]) - 1  # the logits that predict the first completion token
                mine, ref = logits[slot, at : at + steps].detach(), sampled[r]
                kl, gap = _kl_and_logprob_gap(ref, mine, tokens[r])
                bad = [] if V.same_bits(mine, ref) else [s for s in range(steps) if not V.same_bits(mine[s], ref[s])]
                tally.add(kl, gap, len(bad), V.max_ulp(mine, ref) if bad else None)
                if bad and out.first is None:
                    s = bad[0]
                    text, _, info = V.describe(mine[s], ref[s], ("sampler", f"trainer (b={b})"))
                    pad = max(len(seqs[q]) for q in rows) - len(seqs[r])
                    out.first_text = (
                        f"First difference: prompt {r} ({len(ids[r])} tokens), completion step {s} "
                        f"(token {int(tokens[r][s])}), trainer batch of {b} at position {slot}, "
                        f"{side}-padded by {pad}: {text}"
                    )
                    out.first = {"prompt": r, "step": s, "batch_size": b, "position": slot, "padding": pad,
                                 "logits_diff": info}
            del logits
    return out


def check_sampler_trainer(
    model: Any,
    prompts: Any,
    *,
    max_new_tokens: int,
    sampler_batch_size: int | None,
    trainer_batch_sizes: Sequence[int],
    padding_side: str,
    train: bool,
    tokenizer: Any,
    seed: int,
    name: str | None,
) -> tuple[CheckResult, bool]:
    """Run the check; returns (result, failed)."""
    from detkit._testing_generation import (
        _pad_id,
        _prompt_ids,
        check_fits,
        check_model_and_steps,
        is_encoder_decoder,
        mode_name,
    )
    from detkit.testing import CheckResult

    check_model_and_steps(model, max_new_tokens)
    if is_encoder_decoder(model):
        raise InputError(
            f"{type(model).__name__} is an encoder-decoder model; the sampler-trainer check scores prompt + "
            "completion as one causal sequence and takes causal LMs only (assert_generation_invariant takes both)"
        )
    if padding_side not in PADDING_SIDES:
        raise InputError(f"padding_side must be one of {', '.join(PADDING_SIDES)}, got {padding_side!r}")
    if not isinstance(train, bool):
        raise InputError(f"train must be True (score in train mode) or False (eval mode), got {train!r}")
    sizes = _trainer_sizes(trainer_batch_sizes)
    ids = _prompt_ids(prompts, tokenizer)
    check_fits(model, ids, max_new_tokens)
    n = len(ids)
    sb = n if sampler_batch_size is None else sampler_batch_size
    if isinstance(sb, bool) or not isinstance(sb, int) or sb < 1:
        raise InputError(
            f"sampler_batch_size must be a positive int or None (all prompts in one batch), got {sampler_batch_size!r}"
        )
    if train and (where := _active_dropout(model)):
        raise InputError(
            f"dropout is active in train mode ({where}), so every trainer forward draws a different mask "
            "and no two runs can agree; set dropout to 0 as RL trainers do, or pass train=False"
        )
    pad_id = _pad_id(model, tokenizer)
    label = name or f"sampler-trainer[{type(model).__name__}]"
    was_training = model.training
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    try:
        tokens, sampled = _sample(model, ids, pad_id, sb, max_new_tokens)
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        model.train(train)
        scoring = _score(model, ids, tokens, sampled, pad_id, sizes, padding_side, random.Random(seed))
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        model.train(was_training)

    total = scoring.total()
    detail = {
        "model": type(model).__name__,
        "dtype": str(params[0].dtype).removeprefix("torch."),
        "prompts": n,
        "prompt_lengths": [len(p) for p in ids],
        "max_new_tokens": max_new_tokens,
        "sampler_batch_size": sb,
        "trainer_batch_sizes": sizes,
        "padding_side": padding_side,
        "train": train,
        "trainer_autograd": any(trainable),
        "mode": mode_name(),
        "seed": seed,
        "steps_compared": total.steps,
        "steps_differ": total.steps_differ,
        "kl_mean": total.kl_sum / total.steps,
        "kl_max": total.kl_max,
        "max_logprob_gap": total.max_logprob_gap,
        "per_trainer_batch_size": {
            b: {"sequences": t.sequences, "steps_differ": t.steps_differ, "max_ulp": t.max_ulp, "kl_max": t.kl_max,
                "max_logprob_gap": t.max_logprob_gap}
            for b, t in scoring.per_size.items()
        },
        "first_difference": scoring.first,
    }
    autograd = "autograd on" if any(trainable) else "no parameter requires grad, so no autograd graph"
    scope = (
        f"{n} prompts x {max_new_tokens} steps, sampled in batches of {sb}, scored by the trainer "
        f"({'train' if train else 'eval'} mode, {autograd}, {padding_side}-padded) in batches of {sizes}; "
        f"detkit mode {detail['mode']}"
    )
    if not total.steps_differ:
        message = (
            f"{label}: {scope}: trainer logits bitwise equal to the sampler's at all {total.steps} scored steps "
            "(each prompt once per trainer batch size, last batches topped up with repeats; KL 0)"
        )
        return CheckResult("sampler_trainer", "PASS", 0, label, detail, message), False
    rows_t = [("trainer batch", "sequences", "steps differ", "max ULP", "max KL (nats)", "max |dlogp|")] + [
        (b, str(t.sequences), str(t.steps_differ), "-" if t.max_ulp is None else str(t.max_ulp), f"{t.kl_max:.3g}",
         f"{t.max_logprob_gap:.3g}")
        for b, t in scoring.per_size.items()
    ]
    message = "\n".join(
        [
            f"MISMATCH: {label}: {scope}: the trainer's logits differ from the sampler's at {total.steps_differ} of "
            f"{total.steps} scored steps ({V.share(total.steps_differ, total.steps)}); sampler-trainer KL mean "
            f"{total.kl_sum / total.steps:.3g}, max {total.kl_max:.3g} nats; sampled-token log-prob gap up to "
            f"{total.max_logprob_gap:.3g}; worst ULP {'-' if total.max_ulp is None else total.max_ulp}. "
            "Training on these samples is not on-policy.",
            *V.table(rows_t),
            scoring.first_text,
            HINT_POLICY,
        ]
    )
    return CheckResult("sampler_trainer", "MISMATCH", total.max_ulp, label, detail, message), True
