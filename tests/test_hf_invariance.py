"""Unmodified Hugging Face models under the mode: per-step logits independent of the batch.

For each preset (Llama, GPT-2, Qwen2), attention implementation (eager, sdpa) and dtype
(float32, bfloat16), a target prompt is generated greedily alone, then inside batches of
other prompts of different lengths (left padding) at several positions. Every per-step
logit vector of every copy of the target must equal the alone run bitwise. Without the
mode the same comparison must find differences (negative control).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

import detkit
from detkit import mode
from detkit.compare import diff, first_divergence

pytest.importorskip("transformers")

from detkit.models import build_tokenizer, load_preset  # noqa: E402

NEW_TOKENS = 12
TARGET = "Batch invariance means"
FILLERS = [
    "A much longer prompt, which pads the others",
    "Hi",
    "short one",
    "The quick brown fox jumps",
    "zz",
    "Reproducible inference at temperature zero",
    "ok",
    "Left padding moves the target to the right",
]
# (batch size, positions of the target copies); the longest prompt is always present, so
# every copy of the target is left padded, by a different amount in each batch.
BATCHES: tuple[tuple[int, tuple[int, ...]], ...] = ((2, (1,)), (5, (0, 3)), (16, (0, 6, 15)))


def _batch(size: int, positions: tuple[int, ...]) -> list[str]:
    fillers = iter(FILLERS * 3)
    return [TARGET if i in positions else next(fillers) for i in range(size)]


@functools.lru_cache(maxsize=None)
def _model(name: str, attn: str, dtype: torch.dtype) -> Any:
    return load_preset(name, dtype=dtype, attn_implementation=attn, seed=0)


def _generate(model: Any, prompts: list[str], new_tokens: int = NEW_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-step raw logits (B, steps, V), generated token ids (B, steps))."""
    enc = build_tokenizer()(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early EOS: every run has all steps
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return torch.stack(out.logits, 1), out.sequences[:, enc.input_ids.shape[1] :]


def _mismatches(
    model: Any, batches: tuple[tuple[int, tuple[int, ...]], ...] = BATCHES, new_tokens: int = NEW_TOKENS
) -> list[str]:
    """Describe every (batch, position) whose target logits differ from the alone run."""
    alone_logits, alone_tokens = _generate(model, [TARGET], new_tokens)
    problems = []
    for size, positions in batches:
        logits, tokens = _generate(model, _batch(size, positions), new_tokens)
        for p in positions:
            for step in range(new_tokens):
                d = diff(logits[p, step], alone_logits[0, step])
                if not d.ok:
                    div = first_divergence(tokens[p].tolist(), alone_tokens[0].tolist())
                    problems.append(f"batch {size}, position {p}, first differing step {step} (tokens diverge at {div}):\n{d}")
                    break
    return problems


CASES = [
    pytest.param(name, attn, dtype, id=f"{name}-{attn}-{str(dtype).removeprefix('torch.')}")
    for name in ("tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-mixtral")
    for attn in ("eager", "sdpa")
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize(("name", "attn", "dtype"), CASES)
def test_per_step_logits_do_not_depend_on_the_batch(name: str, attn: str, dtype: torch.dtype) -> None:
    model = _model(name, attn, dtype)
    with detkit.batch_invariant() as bi:
        problems = _mismatches(model)
    assert not problems, "\n\n".join(problems)
    assert bi.uncovered() == {}, f"ops fell back to torch:\n{bi.coverage()}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_negative_control_without_the_mode_logits_differ(attn: str) -> None:
    """The comparison above can fail: plain torch on this CPU is batch variant."""
    problems = _mismatches(_model("tiny-llama", attn, torch.float32))
    cases = sum(len(p) for _, p in BATCHES)
    assert problems, f"expected plain torch to differ for some of the {cases} batch/position cases; none did"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-mixtral"])
def test_presets_run_no_uncovered_op(name: str) -> None:
    """Every aten op the presets run is routed or exact (bitwise independent of the batch)."""
    ops = mode.TracedOps()
    for attn in ("eager", "sdpa"):
        model = _model(name, attn, torch.float32)
        enc = build_tokenizer()(["Hi", TARGET], padding=True, return_tensors="pt")
        with detkit.batch_invariant(), torch.no_grad():
            _, traced = mode.trace_ops(model.generate, **enc, max_new_tokens=2, do_sample=False)
        ops.update(traced)
        ops.float_inputs |= traced.float_inputs
        ops.inexact_histc.update(traced.inexact_histc)
        for op, exponents in traced.pow_exponents.items():
            ops.pow_exponents.setdefault(op, set()).update(exponents)
    report = mode.coverage_report(ops)
    assert report.uncovered == {}, str(report)
    if name == "tiny-mixtral":
        # the router counts tokens per expert with histc of the float expert ids (torch's
        # CPU histc takes no integers): integer values, checked as traced, so exact; its
        # index division (floor_divide) divides integers (docs/mode.md, "Model families")
        assert report.notes["histc.default"] == "integer values (as traced): torch's histc counts them exactly"
        assert report.notes["floor_divide.default"] == "integer operands only (as traced): exact", str(report)
    assert {"mm.default", "bmm.default", "_softmax.default", "scaled_dot_product_attention.default"} <= set(report.routed)
    if name == "tiny-mixtral":
        assert "_grouped_mm.default" in report.routed, str(report)
    # In portable mode every math-library function the presets call (silu, tanh, sin/cos,
    # rsqrt, RMSNorm's pow(x, 2), GPT-2's pow(x, 3)) is a portable kernel or exact.
    portable = mode.coverage_report(ops, portable=True)
    assert portable.not_portable == {}, str(portable)
    assert {"silu.default", "rsqrt.default"} <= set(portable.routed) or "tanh.default" in portable.routed, str(portable)


@pytest.mark.slow
def test_portable_mode_is_batch_invariant_too() -> None:
    """The portable kernels are much slower on the CPU: one batch, fewer steps."""
    model = _model("tiny-llama", "sdpa", torch.float32)
    with detkit.batch_invariant(portable=True) as bi:
        problems = _mismatches(model, batches=((7, (0, 6)),), new_tokens=6)
    assert not problems, "\n\n".join(problems)
    assert bi.uncovered() == {}, f"ops fell back to torch:\n{bi.coverage()}"


def test_a_mamba_models_logits_do_not_depend_on_whether_its_weights_are_frozen() -> None:
    """HF Mamba computes ``dt_proj.weight @ time_step.transpose(1, 2)``: torch folds that
    into mm only when the weight requires grad, so a frozen sampler copy and the trainer
    took different kernels (3281 of 3600 logits differed before the matmul fold)."""
    import transformers

    config = transformers.MambaConfig(vocab_size=300, hidden_size=256, state_size=16, num_hidden_layers=2,
                                      time_step_rank=256, use_mambapy=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.MambaForCausalLM(config).eval()
        ids = torch.randint(0, 300, (2, 12))
    with detkit.batch_invariant() as bi, torch.no_grad():
        trainable = model(ids).logits
        model.requires_grad_(False)
        frozen = model(ids).logits
    assert diff(frozen, trainable).ok
    assert bi.uncovered() == {}


# State-space and hybrid families, with prompts of one length: Mamba2's chunked scan rounds
# its decays differently with left padding (docs/mode.md, "Model families").
# Mamba2: chunked scan (segment sums: float cumsum), depthwise causal conv; Qwen3-Next:
# gated delta rule (linear attention) beside full attention and MoE; Lfm2: short convs.
_SSM_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
SSM_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mamba2": ("Mamba2", dict(num_heads=8, head_dim=16, state_size=16, n_groups=1, expand=2)),
    "qwen3-next": ("Qwen3Next", dict(layer_types=["linear_attention", "full_attention"], head_dim=16,
                                     linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                     linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "lfm2": ("Lfm2", dict(layer_types=["conv", "full_attention"], conv_L_cache=3)),
}
SSM_PROMPTS = [[5, 17, 33, 60, 8, 9, 10, 11], [84, 104, 101, 32, 113, 7, 7, 7], [97, 98, 99, 100, 101, 102, 103, 104],
               [3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]]


def _ssm(name: str) -> Any:
    import transformers

    from detkit.models import VOCAB_SIZE

    cls, fields = SSM_FAMILIES[name]
    config = getattr(transformers, f"{cls}Config")(vocab_size=VOCAB_SIZE, **_SSM_BASE, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, f"{cls}ForCausalLM")(config).eval()


@pytest.mark.parametrize("name", list(SSM_FAMILIES))
def test_state_space_and_hybrid_families_generate_the_same_in_any_batch(name: str) -> None:
    """float32, equal-length prompts alone and in batches of 2 and 5: token ids and every
    step's logits bitwise equal under the mode, nothing left to torch at run time; without
    it, logits differed in 11 of 16 placements for each of these (and for Mamba, Jamba,
    Bamba, FalconMamba, FalconH1 and GraniteMoeHybrid, docs/mode.md)."""
    from detkit.testing import BatchVariance, assert_generation_invariant

    model = _ssm(name)
    with detkit.batch_invariant() as bi:
        assert_generation_invariant(model, SSM_PROMPTS, batch_sizes=(1, 2, 5), max_new_tokens=4)
    assert bi.uncovered() == {}, f"ops fell back to torch:\n{bi.coverage()}"
    if name == "mamba2":  # negative control
        with pytest.raises(BatchVariance):
            assert_generation_invariant(model, SSM_PROMPTS, batch_sizes=(1, 2, 5), max_new_tokens=4)


# Tiny random members of other families (2 layers, hidden 64), each for what it adds: MoE
# routing and experts (torch._grouped_mm, transformers 5's default experts path), MLA,
# sliding windows, logit softcapping (tanh), ALiBi through baddbmm.
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(_SMALL, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(_SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         head_dim=16)),
    "deepseek-v3": ("DeepseekV3Config", dict(_SMALL, num_key_value_heads=4, moe_intermediate_size=32,
                                             first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                                             num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32,
                                             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    "mistral": ("MistralConfig", dict(_SMALL, sliding_window=8, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(_SMALL, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0)),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4)),
}
MOE = ("mixtral", "qwen3-moe", "deepseek-v3")
FAMILY_BATCHES = ((4, (0, 3)), (9, (5,)))


@functools.lru_cache(maxsize=None)
def _family(name: str, attn: str, dtype: torch.dtype) -> Any:
    import transformers

    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    cls, fields = FAMILIES[name]
    config = getattr(transformers, cls)(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                                       eos_token_id=EOS_ID, initializer_range=0.1, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = PAD_ID
    return model


FAMILY_CASES = [
    pytest.param(name, attn, dtype, id=f"{name}-{attn}-{str(dtype).removeprefix('torch.')}")
    for name, attn, dtype in (
        ("mixtral", "sdpa", torch.float32),
        ("qwen3-moe", "sdpa", torch.bfloat16),
        ("deepseek-v3", "eager", torch.float32),
        ("mistral", "sdpa", torch.float32),
        ("gemma2", "eager", torch.float32),
        ("bloom", "eager", torch.bfloat16),
    )
]


@pytest.mark.parametrize(("name", "attn", "dtype"), FAMILY_CASES)
def test_other_families_per_step_logits_do_not_depend_on_the_batch(name: str, attn: str, dtype: torch.dtype) -> None:
    model = _family(name, attn, dtype)
    with detkit.batch_invariant() as bi:
        problems = _mismatches(model, batches=FAMILY_BATCHES, new_tokens=5)
    assert not problems, "\n\n".join(problems)
    assert bi.uncovered() == {}, f"ops fell back to torch:\n{bi.coverage()}"
    if name in MOE:
        # The experts' products are detkit's own, not torch's grouped GEMM (on CUDA a
        # fused kernel that never reaches mm, so it would bypass the mode unseen).
        assert bi.routed().get("_grouped_mm", 0) > 0, bi.coverage()


def test_negative_control_a_moe_model_without_the_mode_is_batch_variant() -> None:
    problems = _mismatches(_family("mixtral", "sdpa", torch.float32), batches=FAMILY_BATCHES, new_tokens=5)
    assert problems, "expected plain torch to change the MoE model's logits with the batch; it did not"


# Encoder-decoder families, through assert_generation_invariant's encoder-decoder path
# (encoder inputs right padded, as their tokenizers pad): relative positions (T5 family,
# with Switch's MoE), sinusoidal absolute positions (Marian), positions from the padding mask (M2M100,
# with NLLB's MoE). docs/mode.md lists the 17 families measured.
_SEQ2SEQ_BART = dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
_SEQ2SEQ_T5 = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SEQ2SEQ_FAMILIES: dict[str, dict[str, Any]] = {
    "switch_transformers": dict(_SEQ2SEQ_T5, num_experts=4, expert_capacity=64, num_sparse_encoder_layers=1,
                                num_sparse_decoder_layers=1),
    "marian": dict(_SEQ2SEQ_BART, decoder_vocab_size=128),
    "nllb-moe": dict(_SEQ2SEQ_BART, num_experts=4, expert_capacity=64, encoder_sparse_step=2, decoder_sparse_step=2),
}
SEQ2SEQ_PROMPTS = [[5, 17, 33, 60, 8], [84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110], [97]]


@pytest.mark.parametrize("family", list(SEQ2SEQ_FAMILIES))
def test_encoder_decoder_families_generate_the_same_alone_and_in_a_batch(family: str) -> None:
    import transformers

    from detkit.testing import BatchVariance, assert_generation_invariant

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(family, **SEQ2SEQ_FAMILIES[family])
        model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
        with torch.no_grad():  # wider than HF's initialisation, so that completions vary
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.3)
    with pytest.raises(BatchVariance):  # negative control: float32 without the mode
        assert_generation_invariant(model, SEQ2SEQ_PROMPTS, batch_sizes=[3], max_new_tokens=3)
    with detkit.batch_invariant() as bi:
        result = assert_generation_invariant(model, SEQ2SEQ_PROMPTS, batch_sizes=[2, 3], max_new_tokens=4)
    assert result.detail["encoder_decoder"] is True and result.detail["padding_side"] == "right"
    assert bi.uncovered() == {}, f"ops fell back to torch:\n{bi.coverage()}"
