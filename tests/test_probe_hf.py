"""The probe on a real Hugging Face model (tiny-llama preset): metrics, engine, and the proof.

The proof (issue 7): on the CPUs measured (docs/probe.md), tiny-llama in bfloat16
without detkit's mode shows logit differences and a token divergence for the documented
suite ``probes/tiny-llama-divergence.toml`` (one prompt per CPU); with ``detkit.batch_invariant()`` every mode of
the same suite has one unique completion and zero logit difference.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detkit.errors import InputError, ModelLoadError
from detkit.probe.engine import Generation, Request, StepScores
from detkit.probe.hf import HFEngine, load_model
from detkit.probe.metrics import ModeSummary, compare_run
from detkit.probe.runner import run_probe
from detkit.probe.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
DIVERGENCE_SUITE = ROOT / "probes" / "tiny-llama-divergence.toml"


# ---------------------------------------------------------------- metrics (synthetic streams)


def _gen(tokens: list[int], values: list[list[float]]) -> Generation:
    steps = [StepScores(ids=[t] + [1000 + j for j in range(len(v) - 1)], values=v) for t, v in zip(tokens, values)]
    return Generation(tokens=tokens, scores=steps, score_kind="logit", score_dtype="float32")


@given(
    tokens=st.lists(st.integers(0, 50), min_size=1, max_size=30),
    data=st.data(),
)
def test_compare_run_finds_the_first_divergence_and_compares_scores_only_up_to_it(tokens, data):
    n = len(tokens)
    values = [[float(5 + i), float(4 + i), 0.0] for i in range(n)]
    ref = _gen(tokens, values)
    div = data.draw(st.integers(0, n - 1), label="divergence")
    bump = data.draw(st.integers(0, div), label="perturbed step")
    run_tokens = tokens[:div] + [tokens[div] + 100] + tokens[div + 1 :]
    run_values = [list(v) for v in values]
    run_values[bump][1] += 0.5  # the runner-up logit moved at a step with the same context
    cmp = compare_run("mixed", "r", "p", ref, _gen(run_tokens, run_values))
    assert cmp.divergence == div
    assert (cmp.ref_token, cmp.run_token) == (tokens[div], tokens[div] + 100)
    assert cmp.steps_compared == div + 1  # after the divergence the contexts differ
    assert cmp.margin_ref == 1.0
    # At the divergence each run's top id is missing from the other's list, scored above all
    # the other kept (0.0): a difference of at least 5 + div. Elsewhere only the bump.
    assert cmp.step_max_abs[div] == 5.0 + div
    assert cmp.step_max_abs[:div] == [0.5 if i == bump else 0.0 for i in range(div)]
    assert cmp.argmax_flips == 1  # the top-1 id differs exactly at the divergence step
    assert cmp.max_ulp is not None and cmp.max_ulp > 0


@given(tokens=st.lists(st.integers(0, 50), min_size=1, max_size=30))
def test_identical_streams_compare_equal(tokens):
    values = [[2.0, 1.0] for _ in tokens]
    cmp = compare_run("single", "r", "p", _gen(tokens, values), _gen(list(tokens), [list(v) for v in values]))
    assert cmp.divergence is None and cmp.max_abs == 0.0 and cmp.max_ulp == 0 and cmp.argmax_flips == 0
    summary = ModeSummary("single", "logit", "token", runs=[cmp], references={"p": tokens}).to_dict()
    assert summary["unique_completions"] == 1 and summary["divergences"] == []
    assert summary["max_abs_logit_diff"] == 0.0 and summary["identical_runs"] == 1


def test_a_candidate_one_run_kept_above_all_the_other_kept_is_a_difference():
    """Both top-k lists agree on every id they share, but the run kept id 9 at 2.0 and the
    reference did not keep it although the lowest score it kept is 1.0: the reference
    scored id 9 at most 1.0, so the scores differ by at least 1.0 and the run is not
    identical. A candidate tied with the other list's lowest score proves nothing (a tie
    broken another way)."""
    def gen(ids: list[int], values: list[float]) -> Generation:
        return Generation(tokens=[7], scores=[StepScores(ids=ids, values=values)], score_kind="logit",
                          score_dtype="float32")

    ref = gen([7, 1, 2], [5.0, 3.0, 1.0])
    cmp = compare_run("single", "r", "p", ref, gen([7, 1, 9], [5.0, 3.0, 2.0]))
    assert cmp.divergence is None and cmp.max_abs == 1.0 and cmp.max_ulp == 2**23  # 1.0 to 2.0 in float32
    summary = ModeSummary("single", "logit", "token", runs=[cmp], references={"p": [7]}).to_dict()
    assert summary["identical_runs"] == 0 and summary["runs_with_logit_diff"] == 1
    tie = compare_run("single", "r", "p", ref, gen([7, 1, 9], [5.0, 3.0, 1.0]))
    assert tie.max_abs == 0.0
    assert ModeSummary("single", "logit", "token", runs=[tie], references={"p": [7]}).to_dict()["identical_runs"] == 1


def test_a_strict_prefix_diverges_where_the_shorter_stream_ends():
    ref = _gen([1, 2, 3, 4], [[1.0, 0.0]] * 4)
    run = _gen([1, 2], [[1.0, 0.0]] * 2)
    cmp = compare_run("mixed", "r", "p", ref, run)
    assert cmp.divergence == 2 and cmp.ref_token == 3 and cmp.run_token is None


def test_failed_runs_are_recorded_not_compared():
    ref = _gen([1, 2], [[1.0, 0.0]] * 2)
    cmp = compare_run("mixed", "r", "p", ref, Generation(tokens=[], error="HTTP 500"))
    summary = ModeSummary("mixed", "logit", "token", runs=[cmp], references={"p": [1, 2]}).to_dict()
    assert summary["failed_runs"] == 1 and summary["errors"][0]["error"] == "HTTP 500"
    assert summary["unique_completions"] is None, "nothing succeeded: no count of completions, not 1"
    assert summary["unique_completions_by_prompt"] == {}


# ---------------------------------------------------------------- the engine on a real model


@pytest.fixture(scope="module")
def bf16_engine() -> HFEngine:
    model, tokenizer, desc = load_model("tiny-llama", dtype="bfloat16", seed=0)
    return HFEngine(model, tokenizer, description=desc)


def test_every_row_of_a_padded_batch_reports_the_token_greedy_chose(bf16_engine):
    prompts = ["The quick brown fox", "a", "Tell me about Richard Feynman", "def fib(n):"]
    gens = bf16_engine.generate([Request(p) for p in prompts], max_new_tokens=6)
    width = max(len(bf16_engine.encode(p)) for p in prompts)
    for row, (p, g) in enumerate(zip(prompts, gens)):
        assert g.ok and 1 <= len(g.tokens) <= 6 and len(g.scores) == len(g.tokens)
        # ties are ordered as argmax breaks them, so the first candidate is the token taken
        assert [s.ids[0] for s in g.scores] == g.tokens
        assert all(s.values == sorted(s.values, reverse=True) for s in g.scores)
        assert g.meta["left_padding"] == width - len(bf16_engine.encode(p)) and g.meta["row"] == row
        assert g.score_dtype == "bfloat16"  # logits are exact upcasts of bf16 values


def test_teacher_forced_prefill_scores_the_given_tokens(bf16_engine):
    ref = bf16_engine.generate([Request("def fib(n):")], max_new_tokens=5)[0]
    forced = bf16_engine.teacher_forced("def fib(n):", ref.tokens)
    assert len(forced) == len(ref.tokens)
    assert all(set(f.ids) & set(r.ids) for f, r in zip(forced, ref.scores))


def test_a_prompt_longer_than_the_context_is_an_input_error(bf16_engine):
    with pytest.raises(InputError, match="context of 1024 tokens"):
        bf16_engine.generate([Request("x" * 1020)], max_new_tokens=8)


def test_fillers_made_up_by_the_probe_fit_the_context_when_the_prompt_does(bf16_engine):
    # fillers are drawn up to 4x (mixed) and 2x (prefix) the prompt's length: a 500-byte
    # prompt fits tiny-llama's 1024 tokens, its fillers must too
    from detkit.probe.suite import BatchPlan, ProbeSuite, Prompt

    suite = ProbeSuite(
        name="long", prompts=(Prompt("long", "abcdefghij" * 50),), max_new_tokens=2, modes=("mixed", "prefix"),
        batch=BatchPlan(sizes=(2,), mixed_trials=4, prefix_fractions=(0.5,)),
    )
    report = run_probe(bf16_engine, suite, seed=suite.seed, config={})
    assert report["status"] == "complete" and report["errors"] == []
    assert [m["runs"] for m in report["modes"]] == [4, 1]
    # the longest filler any draw can make fits, in the chat template too (50 bytes more per prompt)
    from detkit.probe.modes import filler_limit

    chat = HFEngine(bf16_engine.model, bf16_engine.tokenizer, chat=True)
    assert chat.prompt_overhead == 50 and bf16_engine.prompt_overhead == 0
    for engine in (bf16_engine, chat):
        longest = filler_limit(engine, suite)
        engine.check_fits(len(engine.encode("a" * longest)), suite.max_new_tokens, "the longest filler")


def test_missing_model_and_missing_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        load_model(str(tmp_path / "nope"))
    from detkit.models import build_tokenizer, load_preset

    load_preset("tiny-gpt2").save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(str(tmp_path / "m"))
    # a broken config.json (which the tokenizer loader reads too) is named as such
    build_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(ModelLoadError, match=r"could not read .*config\.json \(") as exc:
        load_model(str(tmp_path / "m"))
    assert "tokenizer" not in str(exc.value)


def test_a_directory_named_like_a_preset_is_not_silently_replaced_by_it(tmp_path, monkeypatch):
    from detkit.models import build_tokenizer, load_preset

    monkeypatch.chdir(tmp_path)
    load_preset("tiny-gpt2").save_pretrained(tmp_path / "tiny-llama")
    build_tokenizer().save_pretrained(tmp_path / "tiny-llama")
    with pytest.raises(InputError, match="names a built-in preset and also a directory here; pass ./tiny-llama"):
        load_model("tiny-llama")
    _, _, desc = load_model("./tiny-llama")  # the directory, by its path
    assert desc["source"] != "preset" and "gpt2" in str(desc).lower(), desc


def _save_seq2seq(path: Path, family: str, dtype: str) -> Path:
    import torch
    import transformers

    from detkit.models import build_tokenizer

    torch.manual_seed(0)
    if family == "t5":  # relative position buckets
        config = transformers.T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=None,
                                       tie_word_embeddings=False)
        model = transformers.T5ForConditionalGeneration(config)
    else:  # learned absolute positions; has a BartForCausalLM that would drop the encoder
        config = transformers.BartConfig(vocab_size=300, d_model=64, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                         decoder_ffn_dim=128, max_position_embeddings=256, eos_token_id=None,
                                         forced_eos_token_id=None)
        model = transformers.BartForConditionalGeneration(config)
    # HF's initialisation makes a tiny random model repeat one token; wider weights give varied completions
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


SEQ2SEQ_SUITE = dict(
    name="seq2seq", max_new_tokens=6, modes=("single", "mixed", "prefix", "padding", "decode", "repeat"),
)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_an_encoder_decoder_model_is_probed_with_right_padded_encoder_inputs(tmp_path, family):
    import detkit
    from detkit.probe.suite import BatchPlan, ProbeSuite, Prompt

    path = _save_seq2seq(tmp_path / "m", family, "float32")
    model, tokenizer, desc = load_model(str(path))
    assert desc["architecture"].endswith("ForConditionalGeneration")  # the encoder too, not BartForCausalLM
    suite = ProbeSuite(prompts=(Prompt("a", "Translate the quick brown fox"), Prompt("b", "hi")),
                       batch=BatchPlan(sizes=(1, 3), mixed_trials=2, prefix_fractions=(0.5,), padding=(3,), repeats=2),
                       **SEQ2SEQ_SUITE)
    engine = HFEngine(model, tokenizer, description=desc)
    assert engine.describe()["generate"] == "model.generate, greedy, use_cache=True, right padding of the encoder inputs"
    plain = run_probe(engine, suite, seed=0, config={})
    batched = [r for m in plain["results"] if m["mode"] != "decode" for r in m["runs"]]
    assert batched and all("right_padding" in r and "left_padding" not in r for r in batched)
    assert any(r["right_padding"] > 0 for r in batched)
    # negative control: float32 without the mode, the padded encoder's logits move
    assert plain["summary"]["invariant"] is False
    assert max(m["max_ulp"] or 0 for m in plain["modes"] if m["name"] in ("mixed", "padding")) > 0
    engine = HFEngine(model, tokenizer, description=desc, mode=lambda: detkit.batch_invariant())
    report = run_probe(engine, suite, seed=0, config={})
    for m in report["modes"]:
        assert m["failed_runs"] == 0 and m["skipped"] is None, (m["name"], m["errors"])
        # decode: a teacher-forced decoder over the whole reference gives the bits incremental decoding gave
        assert m["unique_completions"] == 1 and m["max_ulp"] == 0 and m["steps_compared"] > 0, m["name"]
    assert report["summary"]["invariant"] is True
    refs = list(report["references"].values())
    assert all(len(ref["tokens"]) == suite.max_new_tokens for ref in refs)  # no EOS configured: every step generated
    assert any(len(set(ref["tokens"])) > 1 for ref in refs), refs  # a real completion, not one token repeated


def test_an_encoder_decoder_model_without_a_decoder_start_token_is_a_clear_error(tmp_path):
    path = _save_seq2seq(tmp_path / "m", "t5", "float32")
    model, tokenizer, desc = load_model(str(path))
    model.generation_config.decoder_start_token_id = None
    model.config.decoder_start_token_id = None
    with pytest.raises(InputError, match="without a decoder_start_token_id"):
        HFEngine(model, tokenizer, description=desc)


def test_an_encoder_decoder_with_separate_position_tables_is_checked_against_each():
    # LED: max_encoder_/max_decoder_position_embeddings, no max_position_embeddings. Past
    # the decoder's positions was an IndexError inside generate, not an InputError.
    import torch
    import transformers

    from detkit.models import build_tokenizer

    torch.manual_seed(0)
    config = transformers.LEDConfig(vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_encoder_position_embeddings=64,
                                    max_decoder_position_embeddings=8, attention_window=[4], eos_token_id=None,
                                    forced_eos_token_id=None)
    engine = HFEngine(transformers.LEDForConditionalGeneration(config).eval(), build_tokenizer())
    assert len(engine.generate([Request("hello")], max_new_tokens=8)[0].tokens) == 8
    with pytest.raises(InputError, match="past the model's context: its encoder takes 64 positions, its decoder 8"):
        engine.generate([Request("hello")], max_new_tokens=9)
    with pytest.raises(InputError, match="has 70 tokens"):
        engine.generate([Request("x" * 70)], max_new_tokens=1)
    with pytest.raises(InputError, match="its decoder 8"):
        engine.teacher_forced("hello", list(range(10, 19)))


def test_an_encoder_decoder_checkpoint_without_a_generation_decoder_start_starts_where_generate_does(tmp_path):
    # A generation_config.json without decoder_start_token_id (config.json has BART's 2):
    # generate starts the decoder from generation_config.bos_token_id (0), and so must the
    # probe, or its references are not what users of the checkpoint generate.
    import json

    import torch

    path = _save_seq2seq(tmp_path / "m", "bart", "float32")
    gen_file = path / "generation_config.json"
    gen_file.write_text(json.dumps({k: v for k, v in json.loads(gen_file.read_text()).items()
                                    if k != "decoder_start_token_id"}))
    model, tokenizer, desc = load_model(str(path))
    assert model.config.decoder_start_token_id == 2 and model.generation_config.bos_token_id == 0
    engine = HFEngine(model, tokenizer, description=desc)
    ids = torch.tensor([engine.encode("Translate the quick brown fox")])
    with torch.inference_mode():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert engine.decoder_start_id == generated[0, 0].item() == 0
    assert engine.generate([Request("Translate the quick brown fox")], max_new_tokens=4)[0].tokens == generated[0, 1:].tolist()


def test_the_server_answers_400_to_an_encoder_decoder_prompt_past_the_models_positions(tmp_path):
    # detkit.probe.server tells a client error (400) from a server error (500) by the
    # word "context" in the engine's message: the encoder-decoder message lacked it.
    from conftest import probe_server

    path = _save_seq2seq(tmp_path / "m", "bart", "float32")  # 256 positions
    with probe_server(str(path)) as post:
        status, answer = post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
        for body in ({"prompt": "x" * 300, "max_tokens": 2, "temperature": 0},
                     {"prompt": "hi", "max_tokens": 300, "temperature": 0}):
            status, answer = post("/v1/completions", body)
            assert status == 400 and "256 positions" in answer["error"]["message"], (status, answer)


@pytest.mark.parametrize(("temperature", "message"), [(None, "send temperature 0"), ("zero", "must be a number"),
                                                      ([0], "must be a number"), (True, "must be a number")])
def test_the_server_answers_a_temperature_that_is_not_a_number_with_a_message(temperature, message):
    # float() of it raised in the handler thread: the client's connection was dropped, no answer
    from detkit.probe.server import _validate, _validate_chat

    body = {"prompt": "hi", "temperature": temperature, "max_tokens": 2}
    assert message in (_validate(body, "m") or "")
    chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": temperature}
    engine = type("E", (), {"tokenizer": type("T", (), {"chat_template": "x"})()})()
    assert message in (_validate_chat(chat, "m", engine) or "")
    assert "max_tokens must be a positive integer" in (_validate({**body, "temperature": 0, "max_tokens": True}, "m") or "")
    assert _validate({**body, "temperature": 0}, "m") is None and _validate({**body, "temperature": 0.0}, "m") is None


def test_the_models_generation_config_does_not_rescale_the_greedy_logits(tmp_path):
    # Real checkpoints ship generation_config.json with e.g. repetition_penalty; generate()
    # fills every field the probe leaves unset from it, which would make the "greedy"
    # reference and its recorded logits something else than argmax of the model's logits.
    import torch
    from transformers import GenerationConfig

    from detkit.models import save_preset

    path = save_preset("tiny-llama", tmp_path / "m", dtype=torch.float32)
    GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=2, eos_token_id=258, pad_token_id=256).save_pretrained(path)
    model, tokenizer, desc = load_model(str(path))
    engine = HFEngine(model, tokenizer, description=desc)
    prompt = "The quick brown fox"
    gen = engine.generate([Request(prompt)], max_new_tokens=12)[0]
    ids = engine.encode(prompt)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + gen.tokens])).logits[0, len(ids) - 1 : -1]
    assert gen.tokens == logits.argmax(-1).tolist()
    # a penalty of 1.3 moves logits by far more than the prefill-vs-decode rounding
    assert torch.allclose(torch.tensor([s.values[0] for s in gen.scores], dtype=torch.float64), logits.max(-1).values.double(), atol=1e-4)
    assert model.generation_config.repetition_penalty == 1.3  # the caller's model is left as it was


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_directory_loads_in_the_asked_dtype(tmp_path, dtype):
    import torch

    from detkit.models import save_preset

    path = save_preset("tiny-gpt2", tmp_path / "m", dtype=torch.float16)
    model, _, desc = load_model(str(path), dtype=dtype)
    assert str(model.dtype) == f"torch.{dtype}" and desc["dtype"] == dtype
    assert load_model(str(path))[2]["dtype"] == "float16"  # "auto": the checkpoint's own


@pytest.mark.parametrize(("version", "keyword"), [("4.46.3", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                                  ("4.56.0", "dtype"), ("5.0.0.dev0", "dtype")])
def test_from_pretrained_gets_the_dtype_keyword_of_the_installed_transformers(monkeypatch, version, keyword):
    # transformers < 4.56 rejects dtype= (TypeError in the model's __init__); >= 4.56 deprecates torch_dtype=.
    import transformers

    from detkit.probe.hf import _dtype_keyword

    monkeypatch.setattr(transformers, "__version__", version)
    assert _dtype_keyword() == keyword


# ---------------------------------------------------------------- the proof


def test_without_the_mode_bf16_tiny_llama_diverges(bf16_engine):
    suite = load_suite(DIVERGENCE_SUITE)
    report = run_probe(bf16_engine, suite, seed=suite.seed, config={"test": "no mode"})
    modes = {m["name"]: m for m in report["modes"]}
    assert set(modes) == set(suite.modes)
    # logits move when the batch around the prompt (padding, composition) changes ...
    assert max(m["max_abs_logit_diff"] for m in modes.values()) > 0
    assert max(m["max_ulp"] for m in modes.values()) >= 1
    # ... and greedy decoding follows them to another completion
    divergences = [d for m in modes.values() for d in m["divergences"]]
    assert divergences, "expected a token divergence for the documented suite"
    assert max(m["unique_completions"] for m in modes.values()) >= 2
    for d in divergences:
        assert d["ref_token"] != d["run_token"] and d["margin_ref"] is not None
    assert report["summary"]["invariant"] is False


def test_with_the_mode_every_mode_matches_the_reference_bitwise():
    import detkit

    model, tokenizer, desc = load_model("tiny-llama", dtype="bfloat16", seed=0)
    engine = HFEngine(model, tokenizer, description=desc, mode=lambda: detkit.batch_invariant(portable=False))
    suite = load_suite(DIVERGENCE_SUITE)
    report = run_probe(engine, suite, seed=suite.seed, config={"test": "batch_invariant"})
    assert [m["name"] for m in report["modes"]] == list(suite.modes)
    for m in report["modes"]:
        assert m["failed_runs"] == 0, m["errors"]
        assert m["unique_completions"] == 1, m["name"]
        assert m["divergences"] == [], m["name"]
        assert m["max_abs_logit_diff"] == 0.0 and m["max_ulp"] == 0, m["name"]
        assert m["steps_compared"] >= suite.max_new_tokens  # scores were compared at every step
    assert report["summary"]["invariant"] is True


def test_a_portable_probe_names_the_calls_torchs_math_library_computed():
    # tiny-llama with a Mish MLP: mish is batch invariant under the mode, but not in the
    # canonical orders; the report used to show only "routed" and "fell back". RoPE's
    # sin/cos are portable kernels and must not be listed.
    import torch

    import detkit
    from detkit.probe.render import render_markdown
    from detkit.probe.suite import BatchPlan, ProbeSuite, Prompt

    model, tokenizer, desc = load_model("tiny-llama", dtype="float32", seed=0)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.Mish()
    engine = HFEngine(model, tokenizer, description=desc, mode=lambda: detkit.batch_invariant(portable=True))
    suite = ProbeSuite(name="p", prompts=(Prompt("p", "The fox"),), max_new_tokens=2, modes=("single",),
                       batch=BatchPlan(sizes=(1,)))
    report = run_probe(engine, suite, seed=0, config={})
    not_portable = report["mode_coverage"]["not_portable"]
    assert any(k.startswith("mish: ") for k in not_portable), not_portable
    assert not any(k.startswith(("sin: ", "cos: ")) for k in not_portable), not_portable
    assert any(n.startswith("portable mode: some calls' values came from torch's math library") and "mish: " in n
               for n in report["notes"]), report["notes"]
    assert "routed to torch's math library (not portable)" in render_markdown(report)


def test_a_prompt_that_only_the_padding_mode_pushes_past_the_context_fails_before_anything_runs(bf16_engine):
    # 1015 bytes + 4 new tokens fit tiny-llama's 1024 positions; with 16 extra pad tokens they do not.
    # The error must come first, not after the single mode ran (whose work would be thrown away).
    from detkit.errors import ContextTooLong
    from detkit.probe.suite import BatchPlan, ProbeSuite, Prompt

    suite = ProbeSuite(name="long", prompts=(Prompt("long", "a" * 1015),), max_new_tokens=4,
                       modes=("single", "padding"), batch=BatchPlan(sizes=(1,), padding=(1, 16)))
    calls: list[str] = []
    with pytest.raises(ContextTooLong, match=r"prompt 'long' with the padding mode's 16 extra pad tokens.*\[batch\] padding"):
        run_probe(bf16_engine, suite, seed=0, config={}, advance=calls.append)
    assert calls == []
    # without the padding mode the same suite runs
    report = run_probe(bf16_engine, replace(suite, modes=("single",)), seed=0, config={})
    assert report["status"] == "complete"
