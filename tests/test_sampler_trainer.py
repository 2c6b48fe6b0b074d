"""assert_trainer_matches_sampler: the RL sampler's logits vs the trainer's forward, on real HF models."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import detkit
from detkit import testing as T
from detkit._testing_policy import _kl_and_logprob_gap, _trainer_batch
from detkit.errors import InputError
from detkit.models import build_tokenizer, load_preset

PROMPTS = ["Tell me about Richard Feynman", "hi", "The quick brown fox jumps over", "2+2=", "a"]


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    return load_preset("tiny-llama", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.mark.parametrize(
    ("preset", "dtype", "attn", "side", "portable"),
    [
        ("tiny-llama", torch.float32, "sdpa", "right", False),
        ("tiny-llama", torch.bfloat16, "eager", "left", False),
        ("tiny-qwen2", torch.bfloat16, "sdpa", "right", False),
        ("tiny-qwen2", torch.float32, "eager", "left", True),
        # MoE: the experts' grouped products (routed) in the sampler and, with autograd, the trainer
        ("tiny-mixtral", torch.bfloat16, "sdpa", "left", False),
    ],
)
def test_the_trainer_reproduces_the_samplers_logits_under_the_mode(
    preset: str, dtype: torch.dtype, attn: str, side: str, portable: bool, tokenizer: Any
) -> None:
    model = load_preset(preset, dtype=dtype, attn_implementation=attn)
    with detkit.batch_invariant(portable=portable) as mode:
        result = T.assert_trainer_matches_sampler(
            model, PROMPTS, tokenizer=tokenizer, max_new_tokens=6, trainer_batch_sizes=[1, 2, 4], padding_side=side
        )
    assert mode.uncovered() == {}, "the check's own arithmetic must not run through the mode"
    d = result.detail
    # Every sequence scored once per trainer batch size, plus the random rows that top up the last batch.
    assert d["steps_compared"] == 6 * (5 + 6 + 8)
    assert (d["steps_differ"], d["kl_mean"], d["kl_max"], d["max_logprob_gap"]) == (0, 0.0, 0.0, 0.0)
    assert result.worst_ulp == 0 and "KL 0" in result.message


def test_negative_control_without_the_mode_the_trainer_is_off_policy(tiny_llama: torch.nn.Module, tokenizer: Any) -> None:
    with pytest.raises(T.BitwiseMismatch) as info:
        T.assert_trainer_matches_sampler(tiny_llama, PROMPTS, tokenizer=tokenizer, max_new_tokens=4)
    result = info.value.result
    d = result.detail
    assert result.check == "sampler_trainer" and result.verdict == "MISMATCH"
    assert 0 < d["steps_differ"] <= d["steps_compared"] and d["kl_max"] > 0 and d["max_logprob_gap"] > 0
    assert result.worst_ulp is not None and result.worst_ulp > 0
    assert set(d["per_trainer_batch_size"]) == {"1", "3"}
    first = d["first_difference"]
    assert {"prompt", "step", "batch_size", "position", "padding"} <= set(first)
    msg = str(info.value)
    for part in ("MISMATCH: sampler-trainer[LlamaForCausalLM]", "sampler-trainer KL mean", "not on-policy",
                 "trainer batch  sequences  steps differ", "First difference: prompt", "detkit.batch_invariant()"):
        assert part in msg


def _tiny_mamba(dtype: torch.dtype) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    config = transformers.MambaConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                                      eos_token_id=EOS_ID, hidden_size=64, state_size=16, num_hidden_layers=2,
                                      use_mambapy=False, initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.MambaForCausalLM(config).eval().to(dtype)


# Prompts of one length: the sampler's batch is then unpadded, whatever the model does with padding.
MAMBA_PROMPTS = [[5, 17, 33, 60, 8], [84, 104, 101, 32, 113], [97, 98, 99, 100, 101]]


def test_the_sampler_decodes_a_mamba_model_as_generate_does() -> None:
    """HF Mamba's generate drops the attention mask on decode steps; the check's sampler
    passed the full-length mask, which the mixer multiplied into the step's hidden
    states, broadcasting the new token over every position: steps 2 on computed
    something else (0.1 nats of sampler-trainer KL, with or without the mode)."""
    from detkit._testing_generation import greedy

    model = _tiny_mamba(torch.float32)
    ids = torch.tensor(MAMBA_PROMPTS)
    with detkit.batch_invariant(), torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        tokens, logits = greedy(model, MAMBA_PROMPTS, pad_id=0, steps=5)
    assert torch.equal(tokens, out.sequences[:, ids.shape[1]:])
    assert torch.equal(logits, torch.stack(out.logits, 1))


def test_a_mamba_trainer_reproduces_its_sampler_under_the_mode(tokenizer: Any) -> None:
    """float32 Mamba: the sampler's cached decode (the causal conv over the last 4
    inputs and the recurrent state) and the trainer's teacher-forced forward (one conv and
    one scan over the sequence) agree bitwise under the mode, not without it. (bfloat16
    does not, under the mode either: HF keeps Mamba's cached state in the model's dtype
    and the forward's scan in float32, docs/mode.md.)"""
    model = _tiny_mamba(torch.float32)
    with detkit.batch_invariant() as bi:
        result = T.assert_trainer_matches_sampler(model, MAMBA_PROMPTS, tokenizer=tokenizer, max_new_tokens=5,
                                                  trainer_batch_sizes=[1, 3])
    assert result.detail["kl_max"] == 0.0 and bi.uncovered() == {}
    assert bi.routed().get("convolution", 0) > 0
    with pytest.raises(T.BitwiseMismatch) as info:
        T.assert_trainer_matches_sampler(model, MAMBA_PROMPTS, tokenizer=tokenizer, max_new_tokens=5,
                                         trainer_batch_sizes=[1, 3])
    assert 0 < info.value.result.detail["kl_max"] < 1e-9  # rounding, not another computation


class _Calls:
    """Records how the model is called: grad mode, train flag and batch shape of each forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[bool, bool, tuple[int, ...]]] = []
        self.frozen: list[bool] = []
        self.keep: list[int | None] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.calls.append((torch.is_grad_enabled(), module.training, tuple(kwargs["input_ids"].shape)))
        self.frozen.append(not any(p.requires_grad for p in module.parameters()))
        # transformers < 4.50 names it num_logits_to_keep
        self.keep.append(kwargs.get("logits_to_keep", kwargs.get("num_logits_to_keep")))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("start_training", [True, False])
def test_sampler_and_trainer_run_as_in_rl_and_the_model_state_is_restored(
    tiny_llama: torch.nn.Module, tokenizer: Any, train: bool, start_training: bool
) -> None:
    tiny_llama.train(start_training)
    rec = _Calls(tiny_llama)
    try:
        with detkit.batch_invariant():
            T.assert_trainer_matches_sampler(tiny_llama, PROMPTS, tokenizer=tokenizer, max_new_tokens=3,
                                             sampler_batch_size=2, trainer_batch_sizes=[2, 5], train=train)
    finally:
        rec.handle.remove()
    assert tiny_llama.training is start_training
    tiny_llama.eval()
    sampler = [c for c in rec.calls if not c[0]]
    trainer = [c for c in rec.calls if c[0]]
    # Sampler: batches of 2, 2, 1; a prefill and 2 decode steps each; eval mode, no autograd.
    assert [s[2][0] for s in sampler] == [2, 2, 2, 2, 2, 2, 1, 1, 1]
    assert all(not training for _, training, _ in sampler)
    # As an inference engine: weights without gradients, last-position logits (HF generate's logits_to_keep=1).
    n_s = len(sampler)
    assert rec.frozen[:n_s] == [True] * n_s and rec.keep[:n_s] == [1] * n_s
    assert not any(rec.frozen[n_s:]) and rec.keep[n_s:] == [None] * len(trainer)
    assert all(p.requires_grad for p in tiny_llama.parameters()), "the parameters' flags are restored"
    assert [s[2][1] for s in sampler[1:3]] == [1, 1]  # decode steps feed one token through the cache
    # Trainer: 3 batches of 2, 1 batch of 5, whole sequences, autograd on, in the asked mode.
    assert [t[2][0] for t in trainer] == [2, 2, 2, 5]
    assert all(training is train for _, training, _ in trainer)
    assert all(p.grad is None for p in tiny_llama.parameters()), "the check runs no backward"


def test_the_frozen_sampler_catches_a_product_whose_path_depends_on_the_input_layout(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    """Without the mode's folds, a frozen lm_head on the prefill's last-position slice runs
    bmm while the trainer's forward runs mm (float32: other bits). The check's sampler is
    frozen and keeps only the last position, so it sees it. The model is tiny-llama with a
    hidden size of 512: bmm's fixed-order chain sums two chunks of 256 terms, which mm's
    BLAS tiles do not reproduce on any CPU measured; at 256 (one chunk) Intel's MKL on a
    Xeon gives the chain's own bits."""
    import dataclasses

    from detkit import mode, models

    h, w = torch.zeros(2, 3, 8), torch.zeros(5, 8)
    if "bmm.default" not in mode.trace_ops(torch.nn.functional.linear, h[:, -1:], w)[1]:
        pytest.skip(f"torch {torch.__version__} runs mm itself for a one-position slice: no layout-dependent "
                    "path to catch (tests/test_mode.py keeps a negative control for the folds)")
    preset = models._PRESETS["tiny-llama"]
    monkeypatch.setitem(models._PRESETS, "tiny-llama",
                        dataclasses.replace(preset, config={**preset.config, "hidden_size": 512}))
    wide = load_preset("tiny-llama", attn_implementation="sdpa")
    monkeypatch.setattr(mode, "FOLDS", ())
    with detkit.batch_invariant() as bi, pytest.raises(T.BitwiseMismatch) as info:
        T.assert_trainer_matches_sampler(wide, PROMPTS, tokenizer=tokenizer, max_new_tokens=3)
    assert bi.routed().get("bmm", 0) > 0 and bi.uncovered() == {}
    d = info.value.result.detail
    assert d["mode"] == "batch-invariant" and d["first_difference"]["step"] == 0  # the prefill's slice


def test_the_result_says_whether_the_mode_was_on_and_whether_autograd_ran(tiny_llama: torch.nn.Module,
                                                                           tokenizer: Any) -> None:
    llama_bf16 = load_preset("tiny-llama", dtype=torch.bfloat16)  # eager bf16 agrees by chance on this CPU
    plain = T.assert_trainer_matches_sampler(llama_bf16, PROMPTS[:2], tokenizer=tokenizer, max_new_tokens=2)
    assert plain.detail["mode"] == "off" and "detkit mode off" in plain.message
    with detkit.batch_invariant(portable=True):
        result = T.assert_trainer_matches_sampler(tiny_llama, PROMPTS[:2], tokenizer=tokenizer, max_new_tokens=2)
    assert result.detail["mode"] == "portable" and result.detail["trainer_autograd"] and "autograd on" in result.message
    frozen = load_preset("tiny-llama").requires_grad_(False)
    with detkit.batch_invariant():
        result = T.assert_trainer_matches_sampler(frozen, PROMPTS[:2], tokenizer=tokenizer, max_new_tokens=2)
    assert not result.detail["trainer_autograd"] and "no parameter requires grad" in result.message


def test_active_dropout_is_refused_in_train_mode(tokenizer: Any) -> None:
    gpt2 = load_preset("tiny-gpt2")  # GPT-2's config keeps dropout at 0.1
    with pytest.raises(InputError, match=r"dropout is active in train mode \(module .*p=0.1\).*train=False"):
        T.assert_trainer_matches_sampler(gpt2, PROMPTS, tokenizer=tokenizer, max_new_tokens=2)
    with detkit.batch_invariant():  # eval mode: dropout is off, and the check passes
        T.assert_trainer_matches_sampler(gpt2, PROMPTS, tokenizer=tokenizer, max_new_tokens=2, train=False)
    llama = load_preset("tiny-llama")
    llama.config.attention_dropout = 0.1
    with pytest.raises(InputError, match=r"config.attention_dropout=0.1"):
        T.assert_trainer_matches_sampler(llama, PROMPTS, tokenizer=tokenizer, max_new_tokens=2)


def test_randomness_in_the_trainer_forward_that_no_dropout_module_shows_is_refused(tokenizer: Any) -> None:
    # OPT applies config.dropout functionally (no nn.Dropout module), Mixtral's router jitter
    # multiplies by uniform noise in train mode: both made every step "differ" and the message
    # blamed the kernels, under the mode.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                                 max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1)
    opt = transformers.OPTForCausalLM(cfg).eval()
    assert cfg.dropout == 0.1 and not any(isinstance(m, torch.nn.Dropout) for m in opt.modules())
    with detkit.batch_invariant(), pytest.raises(InputError, match=r"trainer's forward \(train mode\) draws random"):
        T.assert_trainer_matches_sampler(opt, [[2, 5, 7], [2, 9]], max_new_tokens=2)
    assert opt.training is False
    with detkit.batch_invariant():  # eval mode, and dropout 0: no randomness, and the check passes
        T.assert_trainer_matches_sampler(opt, [[2, 5, 7], [2, 9]], max_new_tokens=2, train=False)
        opt.config.dropout = 0.0
        for layer in opt.model.decoder.layers:
            layer.dropout = 0.0
        T.assert_trainer_matches_sampler(opt, [[2, 5, 7], [2, 9]], max_new_tokens=2)
    # a draw that changes nothing (transformers 5.17's OPT tosses its LayerDrop coin in train
    # mode at layerdrop 0) is no reason to refuse: only randomness that reaches the logits is
    def toss(module: Any, args: Any) -> None:
        torch.rand([])

    coin = opt.model.decoder.register_forward_pre_hook(toss)
    with detkit.batch_invariant():
        T.assert_trainer_matches_sampler(opt, [[2, 5, 7], [2, 9]], max_new_tokens=2)
    coin.remove()
    mixtral = load_preset("tiny-mixtral")
    jittered = [m for m in mixtral.modules() if hasattr(m, "jitter_noise")]
    assert jittered
    for m in jittered:
        m.jitter_noise = 0.1
    with detkit.batch_invariant(), pytest.raises(InputError, match="router_jitter_noise"):
        T.assert_trainer_matches_sampler(mixtral, PROMPTS[:2], tokenizer=tokenizer, max_new_tokens=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
        ({"padding_side": "middle"}, "padding_side must be one of right, left"),
        ({"trainer_batch_sizes": []}, "trainer_batch_sizes must be a non-empty list"),
        ({"trainer_batch_sizes": [0, 2]}, "trainer_batch_sizes must be a non-empty list"),
        ({"trainer_batch_sizes": "12"}, "trainer_batch_sizes must be a non-empty list"),
        ({"trainer_batch_sizes": 4}, "trainer_batch_sizes must be a non-empty list"),
        ({"sampler_batch_size": 0}, "sampler_batch_size must be a positive int or None"),
        ({"tokenizer": None}, "no tokenizer was given"),
        ({"train": None}, "train must be True"),
        ({"train": "no"}, "train must be True"),
        ({"max_new_tokens": 1020}, "past the model's 1024 positions"),
    ],
)
def test_bad_arguments_say_what_to_do(tiny_llama: torch.nn.Module, tokenizer: Any, kwargs: dict[str, Any],
                                       match: str) -> None:
    args = {"tokenizer": tokenizer, **kwargs}
    with pytest.raises(InputError, match=match):
        T.assert_trainer_matches_sampler(tiny_llama, PROMPTS, **args)
    with pytest.raises(InputError, match="must be a torch causal LM"):
        T.assert_trainer_matches_sampler(lambda x: x, PROMPTS, tokenizer=tokenizer)
    with pytest.raises(InputError, match="prompt 1 holds token id 300, outside the model's vocabulary"):
        T.assert_trainer_matches_sampler(tiny_llama, [[1, 2], [3, 300]])


@pytest.mark.parametrize("side", ["right", "left"])
def test_trainer_batches_pad_on_the_asked_side_and_count_positions_from_the_first_real_token(side: str) -> None:
    ids, mask, pos, offsets = _trainer_batch([[5, 6, 7], [8]], 0, side, "cpu")
    if side == "right":
        assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]] and offsets == [0, 0]
        assert pos[1, 0] == 0
    else:
        assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]] and offsets == [0, 2]
        assert pos[1, 2] == 0
    assert pos[0].tolist() == [0, 1, 2]


@given(
    logits=st.lists(st.floats(-30, 30, width=32), min_size=2, max_size=40),
    shift=st.lists(st.floats(-2, 2, width=32), min_size=2, max_size=40),
    token=st.integers(0, 39),
)
def test_kl_and_logprob_gap_agree_with_torch_in_float64(logits: list[float], shift: list[float], token: int) -> None:
    n = min(len(logits), len(shift))
    a = torch.tensor([logits[:n]], dtype=torch.float32)
    b = a + torch.tensor([shift[:n]], dtype=torch.float32)
    tok = torch.tensor([token % n])
    kl, gap = _kl_and_logprob_gap(a, b, tok)
    la, lb = a.double().log_softmax(-1), b.double().log_softmax(-1)
    want_kl = torch.nn.functional.kl_div(lb, la, log_target=True, reduction="sum").clamp(min=0).item()
    assert kl[0] == pytest.approx(want_kl, abs=1e-12)
    assert gap[0] == pytest.approx(abs((la - lb)[0, tok].item()), abs=1e-12)
    same_kl, same_gap = _kl_and_logprob_gap(a, a.clone(), tok)
    assert (same_kl == 0).all() and (same_gap == 0).all()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=24), min_size=1, max_size=5),
    sampler_batch=st.integers(1, 5),
    trainer_sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    side=st.sampled_from(["right", "left"]),
    seed=st.integers(0, 2**16),
)
def test_drawn_prompts_and_batchings_stay_on_policy_under_the_mode(
    tiny_llama: torch.nn.Module, prompts: list[list[int]], sampler_batch: int, trainer_sizes: list[int], side: str,
    seed: int,
) -> None:
    with detkit.batch_invariant():
        result = T.assert_trainer_matches_sampler(
            tiny_llama, prompts, max_new_tokens=3, sampler_batch_size=sampler_batch,
            trainer_batch_sizes=trainer_sizes, padding_side=side, seed=seed,
        )
    assert result.detail["steps_differ"] == 0 and result.detail["steps_compared"] >= 3 * len(prompts)
    assert np.isfinite(result.detail["kl_mean"])


def test_the_rl_example_runs_generate_and_a_train_step_on_policy_under_the_mode() -> None:
    # The example uses HF generate (sampling, temperature 1) and a real backward + SGD step.
    script = Path(__file__).resolve().parents[1] / "examples" / "rl_sampler_trainer.py"
    out = subprocess.run([sys.executable, str(script), "--new-tokens", "6", "--trainer-batch", "4"],
                         capture_output=True, text=True, check=True).stdout
    (plain,) = [line for line in out.splitlines() if line.startswith("│ torch ")]
    (mode,) = [line for line in out.splitlines() if line.startswith("│ detkit.batch_invariant() ")]
    cells = [c.strip() for c in mode.strip("│").split("│")]
    assert cells[1:] == ["0 of 36", "0", "0", "yes"], mode
    assert [c.strip() for c in plain.strip("│").split("│")][-1] == "no", "negative control: torch's kernels differ"


@pytest.mark.parametrize(("script", "args"), [
    ("rl_sampler_trainer.py", ["--trainer-batch", "0"]),
    ("rl_sampler_trainer.py", ["--new-tokens", "-1"]),
    ("hf_batch_invariance.py", ["--new-tokens", "0"]),
])
def test_the_examples_refuse_counts_below_one_with_a_usage_error(script: str, args: list[str]) -> None:
    # not a traceback from range() or from generate() after the model was built
    path = Path(__file__).resolve().parents[1] / "examples" / script
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{args[0]}: must be an integer >= 1, got {args[1]!r}" in proc.stderr


def test_kl_ignores_vocabulary_entries_masked_to_minus_inf_on_both_sides() -> None:
    logits = torch.tensor([[0.5, float("-inf"), 1.0, float("-inf")]])
    kl, gap = _kl_and_logprob_gap(logits, logits.clone(), torch.tensor([1]))
    assert kl.tolist() == [0.0] and gap.tolist() == [0.0]
    shifted = logits.clone()
    shifted[0, 0] = 0.25
    kl, gap = _kl_and_logprob_gap(logits, shifted, torch.tensor([2]))
    assert np.isfinite(kl).all() and kl[0] > 0 and gap[0] > 0


def test_kl_counts_a_token_the_sampler_masks_to_minus_inf_as_zero_not_nan() -> None:
    # e.g. a float16 logit that overflowed to -inf on the sampler's path only: p_sampler = 0 there,
    # so it adds 0 * log(0 / q) = 0 to KL(sampler || trainer); 0 * -inf gave NaN.
    sampler = torch.tensor([[0.5, float("-inf"), 1.0]])
    trainer = torch.tensor([[0.5, -30.0, 1.0]])
    kl, gap = _kl_and_logprob_gap(sampler, trainer, torch.tensor([2]))
    ls, lt = sampler.double().log_softmax(-1), trainer.double().log_softmax(-1)
    want = float((ls.exp() * (ls - lt))[0, [0, 2]].sum())
    assert np.isfinite(kl).all() and kl[0] == pytest.approx(want, abs=1e-15) and kl[0] > 0
    assert gap[0] == pytest.approx(abs(float((ls - lt)[0, 2])), abs=1e-15)
    kl, _ = _kl_and_logprob_gap(trainer, sampler, torch.tensor([2]))  # the other way round: KL is infinite
    assert kl.tolist() == [float("inf")]


@pytest.mark.parametrize("pad", [-1, 10_000])
def test_a_declared_pad_id_outside_the_embeddings_does_not_crash_the_checks(pad: int) -> None:
    # config.pad_token_id = -1 (old Llama conversions), or a tokenizer's added pad the embeddings were
    # not resized for: the padded positions are masked, so any id inside the table does; was an IndexError.
    model = load_preset("tiny-llama")
    model.config.pad_token_id = model.generation_config.pad_token_id = pad
    with detkit.batch_invariant():
        result = T.assert_trainer_matches_sampler(model, [[1, 2, 3], [4]], max_new_tokens=2)
        assert result.detail["steps_differ"] == 0
        T.assert_generation_invariant(model, [[1, 2, 3], [4]], batch_sizes=[2], max_new_tokens=2)


def test_a_nan_kl_is_the_worst_not_dropped() -> None:
    # Python's max(0.25, nan) is 0.25: a NaN trainer logit vanished from the KL max
    from detkit._testing_policy import _Tally

    nan = float("nan")
    for kls in ([0.25, nan], [nan, 0.25]):
        tally = _Tally()
        for kl in kls:
            tally.add(np.array([kl]), np.array([kl]), 1, 3)
        assert math.isnan(tally.kl_max) and math.isnan(tally.max_logprob_gap), (kls, tally)
    total = _Tally()
    good, bad = _Tally(), _Tally()
    good.add(np.array([0.5]), np.array([0.5]), 1, 3)
    bad.add(np.array([nan]), np.array([nan]), 1, 3)
    total.merge(good)
    total.merge(bad)
    assert math.isnan(total.kl_max) and total.steps == 2
