"""Hugging Face ``transformers`` engine: batched greedy generation with padding.

Generation goes through ``model.generate`` (KV cache on, greedy, no sampling warpers),
so the probe measures what users of ``transformers`` actually run. A causal LM's batch
is padded on the left; an encoder-decoder model's (T5, BART, Marian) encoder inputs are
padded on the right, as most seq2seq tokenizers pad, and its decoder starts from
``decoder_start_token_id`` in every row, so the decoder sees no padding. A logits processor,
the last one in the chain, records the top-k logits each row's argmax was taken from,
step by step, without keeping whole-vocabulary tensors alive.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

from detkit._testing_generation import decoder_start_id
from detkit.devices import resolve_device
from detkit.errors import ContextTooLong, InputError, ModelLoadError
from detkit.probe.engine import Generation, Request, StepScores

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Presets are small random-weight models: probe them in the dtype LLMs are served in.
PRESET_DEFAULT_DTYPE = "bfloat16"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer_config.json")


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` from transformers 4.56 on (``torch_dtype``
    is deprecated there), ``torch_dtype`` before (older versions reject ``dtype``)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def load_model(
    model: str, *, dtype: str = "auto", attn_implementation: str = "eager", seed: int = 0, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load a preset name or a local model directory with its tokenizer, on ``device``.

    Returns ``(model, tokenizer, description)``. Raises :class:`ModelLoadError` with
    what to do when the directory, its weights or its tokenizer are missing.
    """
    from detkit.models import PRESETS, build_tokenizer, load_preset, require_transformers

    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    require_transformers()
    dev = resolve_device(device)
    if model in PRESETS:
        if Path(model).expanduser().is_dir():
            # loading the preset would probe another model than the directory, without a word
            raise InputError(f"--model {model} names a built-in preset and also a directory here; pass "
                             f"./{model} for the directory, or run from elsewhere for the preset")
        name = PRESET_DEFAULT_DTYPE if dtype == "auto" else dtype
        # built on the CPU from the seed (the same weights wherever the model then runs)
        hf_model = load_preset(model, dtype=_torch_dtype(name), attn_implementation=attn_implementation, seed=seed)
        desc = {"model": model, "source": "preset", "dtype": name, "weights_seed": seed, "device": str(dev)}
        return hf_model.to(dev), build_tokenizer(), {**desc, "attn_implementation": attn_implementation}

    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"no model at {model!r}: give a built-in preset ({', '.join(PRESETS)}) or a local "
            f"directory saved with save_pretrained (download hub models first, e.g. `hf download`)"
        )
    if path.is_file():
        raise ModelLoadError(f"{path} is a file, not a model directory; pass the directory that holds it "
                             f"({path.parent}), as saved by save_pretrained")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; it is not a Hugging Face model directory")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    # The tokenizer loader reads config.json too: a broken one would read as a tokenizer problem.
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"could not read {path / 'config.json'} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); save the model with save_pretrained, or fix the file"
        ) from exc
    # transformers 5 builds an *empty* tokenizer from config.json alone, without error.
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            f"save one next to the weights with tokenizer.save_pretrained({str(path)!r})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load a tokenizer from {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"save one next to the weights with tokenizer.save_pretrained({str(path)!r})"
        ) from exc
    if tokenizer is None or isinstance(tokenizer, bool) or len(tokenizer) < 2:
        raise ModelLoadError(f"the tokenizer in {path} is empty; save a real one with tokenizer.save_pretrained({str(path)!r})")
    # AutoModelForCausalLM would load BART's, mBART's or Marian's decoder alone (they have a
    # ForCausalLM class), dropping the encoder without a word.
    seq2seq = _is_encoder_decoder_checkpoint(path)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"local_files_only": True, "attn_implementation": attn_implementation}
    kwargs[_dtype_keyword()] = "auto" if dtype == "auto" else _torch_dtype(dtype)
    try:
        hf_model = auto.from_pretrained(path, **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        kind = "an encoder-decoder (seq2seq) LM" if seq2seq else "a causal LM"
        raise ModelLoadError(f"could not load {kind} from {path} ({type(exc).__name__}: {first})") from exc
    hf_model = hf_model.to(dev).eval()
    desc = {
        "model": str(path),
        "device": str(dev),
        "source": "path",
        "dtype": str(hf_model.dtype).removeprefix("torch."),
        "architecture": type(hf_model).__name__,
        "attn_implementation": attn_implementation,
    }
    return hf_model, tokenizer, desc


def _is_encoder_decoder_checkpoint(path: Path) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - from_pretrained reports an unreadable config
        return False
    return getattr(config, "is_encoder_decoder", False) is True


def _context_length(model: PreTrainedModel, *first: str) -> int | None:
    cfg = model.config
    for key in (*first, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def _no_model_generation_defaults(model: PreTrainedModel) -> Iterator[None]:
    """Hide the model's own generation_config from ``generate`` for the block.

    ``generate`` fills every field the given config leaves unset from
    ``model.generation_config``: a checkpoint's ``repetition_penalty`` or
    ``no_repeat_ngram_size`` would rescale the logits and change the "greedy" tokens.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class _TopKRecorder:
    """Logits processor that records top-k (values, ids) per step and changes nothing."""

    def __init__(self, k: int, model_dtype: torch.dtype, logsumexp: bool = False) -> None:
        self.k = k
        self.model_dtype = model_dtype
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Per step, each row's logsumexp over the vocabulary (to turn logits into logprobs).
        self.logsumexp: list[torch.Tensor] | None = [] if logsumexp else None
        # Whether every recorded logit is exactly representable in the model's dtype,
        # i.e. the float32 scores are an exact upcast and ULPs can be counted there.
        self.exact_in_model_dtype = True

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values, ids = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
        values = values.detach().to("cpu")
        if self.exact_in_model_dtype and values.dtype != self.model_dtype:
            back = values.to(self.model_dtype).to(values.dtype)
            self.exact_in_model_dtype = bool((back == values).all())
        self.steps.append((values, ids.detach().to("cpu")))
        if self.logsumexp is not None:
            self.logsumexp.append(scores.float().logsumexp(dim=-1).detach().to("cpu"))
        return scores


def _steps(values: torch.Tensor, ids: torch.Tensor) -> list[StepScores]:
    """One StepScores per row of a (n, k) pair of tensors.

    Ties are ordered by token id, as greedy argmax (first maximal index) breaks them, so
    that the first entry is always the token generation picked; ``topk`` leaves the
    order of equal values unspecified, and bfloat16 logits tie often.
    """
    out = []
    for ti, vi in zip(ids.tolist(), values.double().tolist()):
        ranked = sorted(zip(vi, ti), key=lambda vt: (-vt[0], vt[1]))
        out.append(StepScores(ids=[int(t) for _, t in ranked], values=[float(v) for v, _ in ranked]))
    return out


class HFEngine:
    """A local ``transformers`` causal LM or encoder-decoder LM as a probe engine.

    ``mode``: a zero-argument factory of the context every forward pass runs in (e.g.
    ``lambda: detkit.batch_invariant()``); None runs the model as is.
    ``new_tokens_option``: how a too-long prompt's error names the new-token limit (the
    CLI's ``--max-new-tokens``; the server's ``max_tokens``).
    """

    name = "hf"
    token_unit = "token"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        description: dict[str, Any] | None = None,
        top_k: int = 5,
        mode: Callable[[], ContextManager[Any]] | None = None,
        chat: bool = False,
        new_tokens_option: str = "--max-new-tokens",
    ) -> None:
        if top_k < 2:
            raise InputError(f"--top-k must be >= 2 (the margin needs the top-2 logit), got {top_k}")
        if chat and not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"--chat: the tokenizer of {(description or {}).get('model', type(model).__name__)} has no chat "
                "template; probe it without --chat, or save a tokenizer whose chat_template is set"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.chat = chat
        # Tokens the chat template adds around every prompt (the probe sizes fillers by it).
        self.prompt_overhead = len(self.encode("x")) - len(self.tokenizer("x")["input_ids"]) if chat else 0
        self.top_k = top_k
        self.mode = mode
        self.unsupported_modes: dict[str, str] = {}
        self.notes: list[str] = []
        self._description = dict(description or {})
        self._routed: Counter[str] = Counter()
        self._fell_back: Counter[str] = Counter()
        self._not_portable: Counter[str] = Counter()
        self.context_length = _context_length(model)
        self.new_tokens_option = new_tokens_option
        self.encoder_decoder = getattr(model.config, "is_encoder_decoder", False) is True
        self.padding_side = "right" if self.encoder_decoder else "left"
        self.decoder_start_id = decoder_start_id(model) if self.encoder_decoder else None
        # LED sizes the encoder's and the decoder's position tables apart
        self._positions = (
            (_context_length(model, "max_encoder_position_embeddings"), _context_length(model, "max_decoder_position_embeddings"))
            if self.encoder_decoder else (self.context_length, self.context_length)
        )
        gen_cfg = model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = next(iter(sorted(self.eos_ids)), 0)
            self.notes.append(f"the tokenizer has no pad token; padding with id {pad} (masked out)")
        self.pad_id = int(pad)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            **self._description,
            "top_k": self.top_k,
            "context_length": self.context_length,
            "generate": (f"model.generate, greedy, use_cache=True, {self.padding_side} padding"
                         + (" of the encoder inputs" if self.encoder_decoder else "")),
            "chat_template": self.chat,
        }

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """Run the block under ``mode`` and add up what the mode routed and what fell back."""
        if self.mode is None:
            yield
            return
        ctx = self.mode()
        with ctx:
            yield
        coverage = getattr(ctx, "coverage", None)
        if coverage is not None:
            cov = coverage()
            self._routed.update(cov.routed)
            for op, reasons in cov.fell_back.items():
                for reason, n in reasons.items():
                    self._fell_back[f"{op}: {reason}"] += n
            for op, reasons in getattr(cov, "not_portable", {}).items():
                for reason, n in reasons.items():
                    self._not_portable[f"{op}: {reason}"] += n

    def mode_coverage(self) -> dict[str, Any] | None:
        """Calls the mode routed to detkit's kernels, calls that fell back to torch, and (portable
        mode) routed calls whose values came from torch's math library."""
        if self.mode is None:
            return None
        return {"routed": dict(sorted(self._routed.items())), "fell_back": dict(sorted(self._fell_back.items())),
                "not_portable": dict(sorted(self._not_portable.items()))}

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        """Token ids of ``prompt``; with ``chat`` (or an engine built with ``chat=True``) the
        prompt is one user message in the tokenizer's chat template, generation prompt added."""
        if chat and not getattr(self.tokenizer, "chat_template", None):
            raise InputError("a chat request needs a tokenizer with a chat template; this one has none")
        if chat or self.chat:
            message = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise InputError(f"prompt {prompt[:40]!r} tokenizes to nothing")
        return [int(t) for t in ids]

    def check_fits(self, n_prompt: int, max_new_tokens: int, what: str) -> None:
        opt = self.new_tokens_option
        if self.encoder_decoder:
            # the encoder holds the prompt, the decoder the start token and the new tokens
            enc, dec = self._positions
            if (enc is not None and n_prompt > enc) or (dec is not None and max_new_tokens > dec):
                each = (f"its encoder and decoder each take {enc} positions" if enc == dec else
                        f"its encoder takes {enc or 'any number of'} positions, its decoder {dec or 'any number'}")
                raise ContextTooLong(
                    f"{what} has {n_prompt} tokens and {opt} is {max_new_tokens}, past the model's context: "
                    f"{each}. Shorten the prompt or lower {opt}."
                )
            return
        if self.context_length is not None and n_prompt + max_new_tokens > self.context_length:
            raise ContextTooLong(
                f"{what} has {n_prompt} tokens; with {opt} {max_new_tokens} that is "
                f"{n_prompt + max_new_tokens} > the model's context of {self.context_length} tokens. "
                f"Shorten the prompt or lower {opt}."
            )

    def generate(
        self, requests: Sequence[Request], *, max_new_tokens: int, logsumexp: bool = False
    ) -> list[Generation]:
        """Generate for ``requests`` as one padded batch (on the left; an encoder-decoder's
        encoder inputs on the right, ``extra_left_padding`` included: it is extra padding on
        the side this engine pads).

        ``logsumexp``: also store each step's logsumexp over the vocabulary in
        ``meta["logsumexp"]`` (what a server needs to answer with logprobs).
        """
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        if not requests:
            return []
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        encoded = [self.encode(r.prompt, chat=r.chat) for r in requests]
        widths = [len(ids) + r.extra_left_padding for ids, r in zip(encoded, requests)]
        width = max(widths)
        longest = requests[widths.index(width)]
        self.check_fits(width, max_new_tokens, f"prompt {longest.prompt[:40]!r} (with its padding)")
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            start = 0 if self.encoder_decoder else width - len(ids)
            input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, start : start + len(ids)] = 1
        input_ids, mask = input_ids.to(self.model.device), mask.to(self.model.device)
        # A fresh config: greedy with nothing that rescales logits, whatever the model's
        # own generation_config asks for (sampling settings do not apply at temperature 0).
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            decoder_start_token_id=self.decoder_start_id,
        )
        recorder = _TopKRecorder(self.top_k, self.model.dtype, logsumexp=logsumexp)
        with torch.inference_mode(), self._context(), _no_model_generation_defaults(self.model):
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
            )
        # an encoder-decoder returns the decoder's sequence: its start token, then the new ones
        new = (out[:, 1:] if self.encoder_decoder else out[:, width:]).tolist()
        score_dtype = str(self.model.dtype).removeprefix("torch.") if recorder.exact_in_model_dtype else "float32"
        results = []
        for row, tokens in enumerate(new):
            n = len(tokens)
            for i, t in enumerate(tokens):
                if t in self.eos_ids:
                    n = i + 1
                    break
            tokens = tokens[:n]
            steps = [_steps(v[row : row + 1], ids[row : row + 1])[0] for v, ids in recorder.steps[:n]]
            meta: dict[str, Any] = {"batch_size": len(requests), "row": row,
                                    f"{self.padding_side}_padding": width - len(encoded[row])}
            if recorder.logsumexp is not None:
                meta["logsumexp"] = [float(lse[row]) for lse in recorder.logsumexp[:n]]
            results.append(
                Generation(
                    tokens=[int(t) for t in tokens],
                    scores=steps,
                    score_kind="logit",
                    score_dtype=score_dtype,
                    meta=meta,
                )
            )
        return results

    def teacher_forced(self, prompt: str, tokens: Sequence[int]) -> list[StepScores]:
        import torch

        if not tokens:
            return []
        ids = self.encode(prompt)
        self.check_fits(len(ids), len(tokens), f"prompt {prompt[:40]!r}")
        device = self.model.device
        if self.encoder_decoder:
            # the decoder's whole input at once: the start token, then every token but the last
            encoder_ids = torch.tensor([ids], dtype=torch.long, device=device)
            decoder_ids = torch.tensor([[self.decoder_start_id, *(int(t) for t in tokens[:-1])]], dtype=torch.long,
                                       device=device)
            with torch.inference_mode(), self._context():
                logits = self.model(input_ids=encoder_ids, attention_mask=torch.ones_like(encoder_ids),
                                    decoder_input_ids=decoder_ids, use_cache=False).logits
            picked = logits[0].float()
        else:
            full = torch.tensor([ids + [int(t) for t in tokens]], dtype=torch.long, device=device)
            with torch.inference_mode(), self._context():
                logits = self.model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False).logits
            # Position p predicts token p+1: the scores for generated token j sit at len(ids)-1+j.
            picked = logits[0, len(ids) - 1 : len(ids) - 1 + len(tokens)].float()
        values, top = picked.topk(min(self.top_k, picked.shape[-1]), dim=-1)
        return _steps(values.to("cpu"), top.to("cpu"))

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def close(self) -> None:
        """Nothing to release: the model is owned by the caller."""
