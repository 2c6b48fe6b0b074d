"""Sampler vs trainer, for ``assert_trainer_matches_sampler``.

In RL fine-tuning the sampler generates completions (incremental decoding through the KV
cache, many requests in one left-padded batch, no autograd) and the trainer scores the
same sequences again (one teacher-forced forward per training batch, right-padded, in
train mode, with autograd recording). The policy-gradient maths assumes both see the same
distribution; when their logits differ by even one ULP, "on-policy" training is silently
off-policy (sampler-trainer KL > 0). This check measures exactly that, on the user's model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
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
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_and_logprob_gap(sampler: torch.Tensor, trainer: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per step: KL(sampler || trainer) in nats and |log p_sampler(token) - log p_trainer(token)|,
    both in float64 from the logits."""
    ls, lt = _log_softmax64(sampler), _log_softmax64(trainer)
    kl = np.maximum((np.exp(ls) * (ls - lt)).sum(-1), 0.0)
    picked = tokens.to("cpu").numpy()[:, None]
    gap = np.abs(np.take_along_axis(ls - lt, picked, -1)[:, 0])
    return kl, gap


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
    import torch

    from detkit._testing_generation import _pad_id, _prompt_ids, check_fits, greedy, mode_name
    from detkit.testing import CheckResult, _worst

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not callable(model) or not hasattr(model, "parameters") or not hasattr(model, "train"):
        raise InputError(f"model must be a torch causal LM (a Hugging Face model), got {type(model).__name__}")
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
        raise InputError(f"sampler_batch_size must be a positive int or None (all prompts in one batch), got {sampler_batch_size!r}")
    if train and (where := _active_dropout(model)):
        raise InputError(
            f"dropout is active in train mode ({where}), so every trainer forward draws a different mask "
            "and no two runs can agree; set dropout to 0 as RL trainers do, or pass train=False"
        )
    pad_id = _pad_id(model, tokenizer)
    label = name or f"sampler-trainer[{type(model).__name__}]"
    rng = random.Random(seed)
    was_training = model.training
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]

    try:
        # The sampler, as an inference engine runs it: weights without gradients, eval mode,
        # no autograd, incremental greedy decoding through the KV cache in left-padded
        # batches, logits of the last position only (HF generate's logits_to_keep=1).
        model.eval()
        for p in params:
            p.requires_grad_(False)
        tokens: list[torch.Tensor] = []
        sampled: list[torch.Tensor] = []
        for start in range(0, n, sb):
            toks, logs = greedy(model, ids[start : start + sb], pad_id, max_new_tokens)
            tokens.extend(toks)
            sampled.extend(logs)
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        seqs = [p + [int(t) for t in toks] for p, toks in zip(ids, tokens)]

        # The trainer: one teacher-forced forward per batch of whole sequences, autograd on.
        model.train(train)
        device = next(model.parameters()).device
        per_b: dict[str, dict[str, Any]] = {}
        first: dict[str, Any] | None = None
        first_text = ""
        steps_total = steps_differ = 0
        kl_sum, kl_max, gap_max = 0.0, 0.0, 0.0
        ulps: list[int | None] = []
        for b in sizes:
            stats: dict[str, Any] = {"sequences": 0, "steps_differ": 0, "max_ulp": None, "kl_max": 0.0, "max_logprob_gap": 0.0}
            order = rng.sample(range(n), n)
            for start in range(0, n, b):
                rows = order[start : start + b]
                rows += [rng.randrange(n) for _ in range(b - len(rows))]
                rng.shuffle(rows)
                inp, mask, pos, offsets = _trainer_batch([seqs[r] for r in rows], pad_id, padding_side, device)
                with torch.enable_grad():
                    logits = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=False).logits
                for slot, r in enumerate(rows):
                    at = offsets[slot] + len(ids[r]) - 1  # the logits that predict the first completion token
                    mine = logits[slot, at : at + max_new_tokens].detach()
                    ref = sampled[r]
                    stats["sequences"] += 1
                    steps_total += max_new_tokens
                    kl, gap = _kl_and_logprob_gap(ref, mine, tokens[r])
                    kl_sum += float(kl.sum())
                    kl_max, gap_max = max(kl_max, float(kl.max())), max(gap_max, float(gap.max()))
                    stats["kl_max"] = max(stats["kl_max"], float(kl.max()))
                    stats["max_logprob_gap"] = max(stats["max_logprob_gap"], float(gap.max()))
                    if V.same_bits(mine, ref):
                        continue
                    bad = [s for s in range(max_new_tokens) if not V.same_bits(mine[s], ref[s])]
                    stats["steps_differ"] += len(bad)
                    steps_differ += len(bad)
                    stats["max_ulp"] = _worst([stats["max_ulp"], V.max_ulp(mine, ref)])
                    if first is None:
                        s = bad[0]
                        text, _, info = V.describe(mine[s], ref[s], ("sampler", f"trainer (b={b})"))
                        pad = max(len(seqs[q]) for q in rows) - len(seqs[r])
                        first_text = (
                            f"First difference: prompt {r} ({len(ids[r])} tokens), completion step {s} "
                            f"(token {int(tokens[r][s])}), trainer batch of {b} at position {slot}, "
                            f"{padding_side}-padded by {pad}: {text}"
                        )
                        first = {"prompt": r, "step": s, "batch_size": b, "position": slot,
                                 "padding": pad, "logits_diff": info}
                del logits
            per_b[str(b)] = stats
            ulps.append(stats["max_ulp"])
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        model.train(was_training)

    detail = {
        "model": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
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
        "steps_compared": steps_total,
        "steps_differ": steps_differ,
        "kl_mean": kl_sum / steps_total,
        "kl_max": kl_max,
        "max_logprob_gap": gap_max,
        "per_trainer_batch_size": per_b,
        "first_difference": first,
    }
    autograd = "autograd on" if any(trainable) else "no parameter requires grad, so no autograd graph"
    scope = (
        f"{n} prompts x {max_new_tokens} steps, sampled in batches of {sb}, scored by the trainer "
        f"({'train' if train else 'eval'} mode, {autograd}, {padding_side}-padded) in batches of {sizes}; "
        f"detkit mode {mode_name()}"
    )
    if not steps_differ:
        message = (
            f"{label}: {scope}: trainer logits bitwise equal to the sampler's at all {steps_total} scored steps "
            "(each prompt once per trainer batch size, last batches topped up with repeats; KL 0)"
        )
        return CheckResult("sampler_trainer", "PASS", 0, label, detail, message), False
    worst = _worst(ulps)
    rows_t = [("trainer batch", "sequences", "steps differ", "max ULP", "max KL (nats)", "max |dlogp|")] + [
        (b, str(s["sequences"]), str(s["steps_differ"]), "-" if s["max_ulp"] is None else str(s["max_ulp"]),
         f"{s['kl_max']:.3g}", f"{s['max_logprob_gap']:.3g}")
        for b, s in per_b.items()
    ]
    message = "\n".join(
        [
            f"MISMATCH: {label}: {scope}: the trainer's logits differ from the sampler's at {steps_differ} of "
            f"{steps_total} scored steps ({steps_differ / steps_total:.1%}); sampler-trainer KL mean {kl_sum / steps_total:.3g}, "
            f"max {kl_max:.3g} nats; sampled-token log-prob gap up to {gap_max:.3g}; worst ULP "
            f"{'-' if worst is None else worst}. Training on these samples is not on-policy.",
            *V.table(rows_t),
            first_text,
            HINT_POLICY,
        ]
    )
    return CheckResult("sampler_trainer", "MISMATCH", worst, label, detail, message), True
