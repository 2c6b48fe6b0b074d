"""Greedy generation alone vs inside padded batches, for ``assert_generation_invariant``.

The loop is written out (prefill, then one token per step with the KV cache) instead of
calling ``model.generate``: it never stops at EOS, so every run takes the same number of
steps, and it passes position ids derived from the attention mask, which is what makes a
left-padded row see the same positions as the row alone. An encoder-decoder model (T5,
BART, Marian) runs its encoder once over the padded prompts, as ``generate`` does, and
its decoder from the start token: the decoder inputs of a batch all have one length, so
only the encoder sees padding (on the right by default, as most seq2seq tokenizers pad).
"""

from __future__ import annotations

import inspect
import random
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from detkit import _testing_values as V
from detkit.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from detkit.testing import CheckResult


def _prompt_ids(prompts: Any, tokenizer: Any) -> list[list[int]]:
    import torch

    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise InputError(
                f"a tensor of prompts must be 2-D integer token ids (one prompt per row), got "
                f"{prompts.dtype}{list(prompts.shape)}"
            )
        return [[int(t) for t in row] for row in prompts.tolist()]
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError(
            "prompts must be a non-empty list of strings (with tokenizer=), a list of token-id "
            f"lists, or a 2-D tensor of ids; got {type(prompts).__name__}"
        )
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise InputError(
                    "prompts are strings but no tokenizer was given; pass tokenizer= (for detkit's "
                    "presets: detkit.models.build_tokenizer()) or pass token ids"
                )
            ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        elif isinstance(p, torch.Tensor):
            ids = p.reshape(-1).tolist()
        else:
            ids = list(p)
        if not ids or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise InputError(f"prompt {i} must be a non-empty sequence of int token ids, got {p!r}")
        out.append([int(t) for t in ids])
    return out


def _padded(prompts: list[list[int]], pad_id: int, side: str, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts padded to one width on ``side``: (ids, attention mask)."""
    import torch

    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    if side == "right":
        rows, marks = [p + [pad_id] * n for p, n in zip(prompts, pads)], [[1] * len(p) + [0] * n for p, n in zip(prompts, pads)]
    else:
        rows, marks = [[pad_id] * n + p for p, n in zip(prompts, pads)], [[0] * n + [1] * len(p) for p, n in zip(prompts, pads)]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(marks, dtype=torch.long, device=device)


def _decode(
    model: Any, steps: int, inputs: dict[str, Any], advance: Callable[[torch.Tensor, dict[str, Any]], dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` greedy steps through the KV cache: ``inputs`` are the first call's
    arguments, ``advance(next_ids, inputs)`` the next call's. (token ids, logits) per step."""
    import torch

    # transformers 5.x renamed past_key_values to cache; accept models from either side.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, logits = [], []
    past = None
    with torch.no_grad():
        for _ in range(steps):
            out = model(**inputs, use_cache=True, **{cache_arg: past})
            step_logits = out.logits[:, -1, :]
            nxt = step_logits.argmax(-1)
            tokens.append(nxt)
            logits.append(step_logits)
            past = getattr(out, cache_arg, None)
            if past is None:
                raise InputError(f"{type(model).__name__} returned no KV cache ({cache_arg}); check_generation needs use_cache=True support")
            inputs = advance(nxt, inputs)
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


def greedy(model: Any, prompts: list[list[int]], pad_id: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy-decode a left-padded batch: (token ids (B, steps), logits (B, steps, V))."""
    import torch

    ids, mask = _padded(prompts, pad_id, "left", next(model.parameters()).device)
    # Positions count real tokens only, so a padded row sees the positions it has alone.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # Logits of the last position only, as HF generate computes them (the lm_head then
    # sees a slice of the hidden states, as in a real sampler).
    params = inspect.signature(model.forward).parameters
    keep = next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})

    step_mask = _passes_mask_when_decoding(model, ids, mask)
    grown = mask  # kept growing even where the steps go without it

    def advance(nxt: torch.Tensor, prev: dict[str, Any]) -> dict[str, Any]:
        nonlocal grown
        grown = torch.cat([grown, torch.ones_like(grown[:, :1])], dim=-1)
        return {**prev, "input_ids": nxt[:, None], "position_ids": prev["position_ids"][:, -1:] + 1,
                "attention_mask": grown if step_mask else None}

    return _decode(model, steps, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **keep}, advance)


def _passes_mask_when_decoding(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the model's own ``generate`` passes the attention mask on decode steps.

    HF's Mamba, Mamba2 and FalconMamba drop it there (their ``prepare_inputs_for_generation``):
    their mixers multiply the step's hidden states by the mask, and a mask of the full
    length broadcasts the one new token over every position. Fed that mask, a tiny Mamba
    computed something else than ``generate`` (and than a teacher-forced forward: 0.1
    nats of sampler-trainer KL, with or without the mode). Asked with a decode step's
    arguments as transformers 5 (``is_first_iteration``) and 4 (``cache_position``) take them.
    """
    import torch

    prepare = getattr(model, "prepare_inputs_for_generation", None)
    if prepare is None:
        return True
    try:
        prepared = prepare(ids, attention_mask=mask, use_cache=True, is_first_iteration=False,
                           cache_position=torch.tensor([ids.shape[1]], device=ids.device))
    except Exception as e:  # noqa: BLE001 - a custom model's own method, any failure
        warnings.warn(f"detkit's generation check asked {type(model).__name__}.prepare_inputs_for_generation whether "
                      f"decode steps take the attention mask, and prepare_inputs_for_generation raised "
                      f"{type(e).__name__}: {e}. Every step gets the mask, as HF's generate gives it to every model "
                      "but the state-space ones; if this model's generate drops it, the check computes something "
                      "else than generate does.", UserWarning, stacklevel=2)
        return True
    return not (isinstance(prepared, dict) and "attention_mask" in prepared and prepared["attention_mask"] is None)


def greedy_seq2seq(
    model: Any, prompts: list[list[int]], pad_id: int, steps: int, start_id: int, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy-decode an encoder-decoder model over padded prompts: (token ids (B, steps),
    logits (B, steps, V)). The encoder runs once, as in ``generate``."""
    import torch

    device = next(model.parameters()).device
    ids, mask = _padded(prompts, pad_id, padding_side, device)
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
    start = torch.full((len(prompts), 1), start_id, dtype=torch.long, device=device)
    inputs = {"encoder_outputs": encoded, "attention_mask": mask, "decoder_input_ids": start}
    return _decode(model, steps, inputs, lambda nxt, prev: {**prev, "decoder_input_ids": nxt[:, None]})


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face encoder-decoder (T5, BART, Marian, ...)."""
    return getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True


def _text_decoder_start_id(model: Any) -> int:
    """The decoder's first input, for an encoder that takes token ids."""
    encoder = model.get_encoder() if callable(getattr(model, "get_encoder", None)) else None
    if encoder is None or "input_ids" not in inspect.signature(encoder.forward).parameters:
        raise InputError(
            f"{type(model).__name__} is an encoder-decoder model whose encoder does not take token ids "
            "(get_encoder() with input_ids); the generation check feeds text prompts to text encoders only"
        )
    return decoder_start_id(model)


def decoder_start_id(model: Any) -> int:
    """The token an encoder-decoder's decoder starts from, as ``generate`` picks it."""
    # generate's order: generation_config's decoder_start_token_id, else its bos_token_id
    gen, config = getattr(model, "generation_config", None), getattr(model, "config", None)
    for source, key in ((gen, "decoder_start_token_id"), (gen, "bos_token_id"), (config, "decoder_start_token_id")):
        start = getattr(source, key, None)
        if isinstance(start, int):
            return start
    raise InputError(
        f"{type(model).__name__} is an encoder-decoder model without a decoder_start_token_id (nor a "
        "bos_token_id) in its generation_config or config; set model.generation_config.decoder_start_token_id "
        "(and save it)"
    )


def _padding_side(model: Any, padding_side: Any) -> str:
    """'left' for a causal LM; 'right' (default) or 'left' for an encoder-decoder model."""
    if padding_side not in (None, "left", "right"):
        raise InputError(f"padding_side must be 'left', 'right' or None (left for a causal LM, right for an encoder-decoder), got {padding_side!r}")
    if not is_encoder_decoder(model):
        if padding_side == "right":
            raise InputError(
                "a causal LM generates after the prompt's last token, so its batches are padded on the left; "
                "padding_side='right' applies to encoder-decoder models only"
            )
        return "left"
    return padding_side or "right"


def check_model_and_steps(model: Any, max_new_tokens: Any) -> None:
    """The arguments both generation checks share: a torch model and a step count."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not callable(model) or not hasattr(model, "parameters") or not hasattr(model, "train"):
        raise InputError(f"model must be a torch causal LM or encoder-decoder model (a Hugging Face model), got {type(model).__name__}")


def check_fits(model: Any, ids: list[list[int]], max_new_tokens: int) -> None:
    """Token ids inside the vocabulary and sequences inside the position table, or an
    InputError now (instead of an IndexError deep in the model)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    for i, p in enumerate(ids):
        if vocab is not None and not all(0 <= t < vocab for t in p):
            bad = next(t for t in p if not 0 <= t < vocab)
            raise InputError(f"prompt {i} holds token id {bad}, outside the model's vocabulary (0..{vocab - 1})")
    config = getattr(model, "config", None)

    def positions(*keys: str) -> int | None:
        return next((getattr(config, a) for a in keys if isinstance(getattr(config, a, None), int)), None)

    limit = positions("max_position_embeddings", "n_positions")
    longest = max(len(p) for p in ids)
    if is_encoder_decoder(model):
        # The encoder sees the prompt, the decoder the start token and the generated tokens;
        # LED sizes their position tables apart.
        enc = positions("max_encoder_position_embeddings", "max_position_embeddings", "n_positions")
        dec = positions("max_decoder_position_embeddings", "max_position_embeddings", "n_positions")
        if (enc is not None and longest > enc) or (dec is not None and max_new_tokens > dec):
            has = f"{enc}" if enc == dec else f"{enc or 'any number'} in its encoder and {dec or 'any number'} in its decoder"
            raise InputError(f"the longest prompt has {longest} tokens and the decoder needs {max_new_tokens} positions; "
                             f"the model has {has}; shorten the prompts or lower max_new_tokens")
        return
    if limit is None:
        return
    if longest + max_new_tokens > limit:
        raise InputError(f"the longest prompt plus max_new_tokens is {longest + max_new_tokens} tokens, past the model's "
                         f"{limit} positions; shorten the prompts or lower max_new_tokens")


def mode_name() -> str:
    """Whether the check ran under detkit's mode: 'off', 'batch-invariant' or 'portable'."""
    from detkit.mode import state

    s = state()
    return "off" if not s.enabled else "portable" if s.portable else "batch-invariant"


def check_generation(
    model: Any,
    prompts: Any,
    batch_sizes: Sequence[int],
    *,
    max_new_tokens: int,
    tokenizer: Any,
    seed: int,
    name: str | None,
    padding_side: str | None = None,
) -> tuple[CheckResult, bool]:
    """Run the generation check; returns (result, failed)."""
    from detkit.compare import first_divergence
    from detkit.testing import HINT_BATCH, CheckResult, _check_batch_sizes, _worst

    check_model_and_steps(model, max_new_tokens)
    if getattr(model, "training", False):
        raise InputError(
            "model is in training mode (dropout would make every run differ); call model.eval() first"
        )
    sizes = _check_batch_sizes(batch_sizes)
    side = _padding_side(model, padding_side)
    ids = _prompt_ids(prompts, tokenizer)
    check_fits(model, ids, max_new_tokens)
    pad_id = _pad_id(model, tokenizer)
    if is_encoder_decoder(model):
        start_id = _text_decoder_start_id(model)

        def run(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            return greedy_seq2seq(model, batch, pad_id, max_new_tokens, start_id, side)
    else:

        def run(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            return greedy(model, batch, pad_id, max_new_tokens)
    label = name or f"generation[{type(model).__name__}]"
    n = len(ids)
    rng = random.Random(seed)

    alone = [run([p]) for p in ids]
    per_b: dict[str, dict[str, Any]] = {}
    first: dict[str, Any] | None = None
    first_text = ""
    checked = token_diffs = logit_diffs = 0
    ulps: list[int | None] = []
    for b in sizes:
        stats: dict[str, Any] = {"placements": 0, "token_diverged": 0, "logits_differ": 0, "max_ulp": None}
        order = rng.sample(range(n), n)
        for start in range(0, n, b):
            rows = order[start : start + b]
            rows += [rng.randrange(n) for _ in range(b - len(rows))]
            rng.shuffle(rows)
            toks, logs = run([ids[r] for r in rows])
            width = max(len(ids[r]) for r in rows)
            for slot, r in enumerate(rows):
                stats["placements"] += 1
                ref_toks, ref_logs = alone[r][0][0], alone[r][1][0]
                step = first_divergence(ref_toks, toks[slot])
                same_logits = V.same_bits(logs[slot], ref_logs)
                if step is None and same_logits:
                    continue
                if step is not None:
                    stats["token_diverged"] += 1
                if not same_logits:
                    stats["logits_differ"] += 1
                    # The first step whose logits differ: later steps see different contexts.
                    bad_step = next(s for s in range(max_new_tokens) if not V.same_bits(logs[slot, s], ref_logs[s]))
                    text, ulp, info = V.describe(logs[slot, bad_step], ref_logs[bad_step], ("alone", f"in batch (b={b})"))
                    stats["max_ulp"] = _worst([stats["max_ulp"], ulp])
                if first is None:
                    pad = width - len(ids[r])
                    where = f"prompt {r} ({len(ids[r])} tokens) at position {slot} of a batch of {b}, {side}-padded by {pad}"
                    parts = [f"First difference: {where}:"]
                    if step is not None:
                        parts.append(
                            f"  token ids diverge at step {step}: alone {int(ref_toks[step])}, in batch {int(toks[slot, step])}"
                            f"\n  alone:    {ref_toks.tolist()}\n  in batch: {toks[slot].tolist()}"
                        )
                    else:
                        parts.append("  token ids identical")
                    if not same_logits:
                        parts.append(f"  logits first differ at step {bad_step}: {text}")
                    first_text = "\n".join(parts)
                    first = {
                        "prompt": r,
                        "batch_size": b,
                        "position": slot,
                        "padding": pad,
                        "token_divergence_step": step,
                        "logits_first_differ_step": None if same_logits else bad_step,
                        "logits_diff": None if same_logits else info,
                    }
        per_b[str(b)] = stats
        checked += stats["placements"]
        token_diffs += stats["token_diverged"]
        logit_diffs += stats["logits_differ"]
        ulps.append(stats["max_ulp"])

    worst = _worst(ulps) if logit_diffs else 0
    detail = {
        "model": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompts": n,
        "prompt_lengths": [len(p) for p in ids],
        "max_new_tokens": max_new_tokens,
        "encoder_decoder": is_encoder_decoder(model),
        "padding_side": side,
        "batch_sizes": sizes,
        "seed": seed,
        "mode": mode_name(),
        "placements_checked": checked,
        "placements_token_diverged": token_diffs,
        "placements_logits_differ": logit_diffs,
        "per_batch_size": per_b,
        "first_difference": first,
    }
    if not (token_diffs or logit_diffs):
        message = (
            f"{label}: {n} prompts x {max_new_tokens} greedy steps: token ids and logits bitwise "
            f"equal alone and in {checked} batch placements (batch sizes {sizes}); detkit mode {detail['mode']}"
        )
        return CheckResult("generation", "PASS", 0, label, detail, message), False
    rows_t = [("batch size", "placements", "tokens diverged", "logits differ", "max ULP")] + [
        (b, str(s["placements"]), str(s["token_diverged"]), str(s["logits_differ"]), "-" if s["max_ulp"] is None else str(s["max_ulp"]))
        for b, s in per_b.items()
    ]
    message = "\n".join(
        [
            f"BATCH-VARIANT: {label}: of {checked} batch placements of {n} prompts, {token_diffs} "
            f"generated different token ids and {logit_diffs} different logits than the prompt alone; "
            f"worst ULP {'-' if worst is None else worst}; detkit mode {detail['mode']}.",
            *V.table(rows_t),
            first_text,
            *([HINT_LEFT_PADDED_ENCODER] if detail["encoder_decoder"] and side == "left" and detail["mode"] != "off" else []),
            HINT_BATCH,
        ]
    )
    return CheckResult("generation", "BATCH-VARIANT", worst, label, detail, message), True


HINT_LEFT_PADDED_ENCODER = (
    "The encoder was padded on the left: an encoder with absolute positions (learned in BART, sinusoidal in Marian) "
    "counts them from the padded start, so left padding changes its input, not only its rounding. "
    "Pad it on the right (padding_side='right', the default)."
)


def _pad_id(model: Any, tokenizer: Any) -> int:
    """The id fed at padded positions (masked out, so only its validity matters): the first
    declared pad id inside the embedding table (a config's -1, or a tokenizer's added pad the
    embeddings were never resized for, would be an IndexError deep in the model), else 0."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    for source in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int) and not isinstance(pad, bool) and (vocab is None or 0 <= pad < vocab):
            return pad
    return 0
