"""`detkit coverage`: a model's ops as the mode treats them, from a real traced generate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from detkit.cli import app
from detkit.errors import InputError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("mode_left_off")


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["coverage", *args], env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


def test_a_llama_is_covered_and_the_json_says_what_ran() -> None:
    code, out = _run("--model", "tiny-llama", "--attn", "sdpa", "--json")
    assert code == 0, out
    data = json.loads(out)
    static, runtime = data["static"], data["runtime"]
    assert data["ok"] is True and static["uncovered"] == {} and runtime["uncovered"] == {}
    assert {"mm.default", "mean.dim", "rsqrt.default"} <= set(static["routed"])
    assert any("scaled_dot_product" in op for op in static["routed"]), static["routed"]
    assert runtime["routed"].get("mm.default", 0) > 0 and "view.default" in static["exact"]
    # one naming for both: full overload names (the mode routes SDPA at its composite entry
    # point, which the trace sees decomposed)
    assert all("." in op for op in runtime["routed"]) and "mean.dim" in runtime["routed"], runtime["routed"]
    assert data["model"]["model"] == "tiny-llama" and data["model"]["attn_implementation"] == "sdpa"


def test_portable_gpt2_routes_its_cube_and_the_table_says_so() -> None:
    code, out = _run("--model", "tiny-gpt2", "--portable", "--dtype", "float32")
    assert code == 0, out
    assert "portable mode" in out and "verdict: every op is computed by detkit or exact and portable" in out
    assert "pow.Tensor_Scalar" in out and "portable cube" in out  # gelu_new's pow(x, 3)
    assert "exact ops" in out and "--all lists them" in out and "view.default" not in out
    code, everything = _run("--model", "tiny-gpt2", "--portable", "--dtype", "float32", "--all")
    assert code == 0 and "view.default" in everything


def test_a_routers_histc_of_integer_values_is_exact() -> None:
    """tiny-mixtral's router counts tokens per expert with histc of the float expert ids
    (torch's CPU histc takes floats only): integer values, counted exactly (checked as
    traced), and sums the float counts with cumsum(dtype=int32): an integer scan, exact."""
    code, out = _run("--model", "tiny-mixtral", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["ok"] is True and data["static"]["uncovered"] == {}
    assert "histc.default" in data["static"]["exact"] and "integer values" in data["static"]["notes"]["histc.default"]
    assert data["runtime"]["uncovered"] == {} and data["runtime"]["routed"].get("_grouped_mm.default", 0) > 0
    assert "cumsum.default" in data["static"]["exact"]


def _save_tiny(tmp_path: Path, model_type: str, dtype: torch.dtype = torch.float32, **fields: Any) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from detkit.models import build_tokenizer

    tokenizer = build_tokenizer()
    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **(sizes | fields))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(tmp_path / model_type)
    tokenizer.save_pretrained(tmp_path / model_type)
    return tmp_path / model_type


def test_a_saved_complex_rope_model_is_covered(tmp_path: Path) -> None:
    """A small Llama 4 multiplies complex tensors in its RoPE: routed, with why, exit 0."""
    model = _save_tiny(tmp_path, "llama4_text", intermediate_size_mlp=128, num_local_experts=2)
    code, out = _run("--model", str(model), "--new-tokens", "2", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["ok"] is True and data["static"]["uncovered"] == {} and "mul.Tensor" in data["static"]["routed"]
    assert "complex operands" in data["static"]["notes"]["mul.Tensor"]
    assert data["runtime"]["uncovered"] == {} and data["runtime"]["routed"]["mul.Tensor"] > 0


def test_an_uncovered_op_is_exit_1_with_its_note(tmp_path: Path) -> None:
    """A float64 model under --portable: the portable kernels take 16- and 32-bit floats,
    so its products are torch's (a counted fallback), listed with why, and exit 1."""
    model = _save_tiny(tmp_path, "llama", torch.float64)
    code, out = _run("--model", str(model), "--portable", "--new-tokens", "2", "--json")
    assert code == 1, out
    data = json.loads(out)
    assert data["ok"] is False and set(data["static"]["uncovered"]) == {"mm.default", "bmm.default"}, out
    assert "float64 operands" in data["static"]["notes"]["mm.default"]
    assert set(data["runtime"]["uncovered"]) == {"mm.default", "bmm.default"}
    assert "not torch.float64" in next(iter(data["runtime"]["uncovered"]["mm.default"]))


def test_portable_coverage_checks_the_rope_frequencies_the_model_was_built_with(tmp_path: Path) -> None:
    """With --portable the report lists the RoPE tables (Qwen2.5-7B's: head 128, base 1e6)
    with how many elements torch's pow gave other than the portable values when the model
    was loaded; any such element is NOT PORTABLE (exit 1). The counts are those of the same
    checkpoint loaded here."""
    from transformers import AutoModelForCausalLM

    from detkit.buffers import check_computed_buffers

    model = _save_tiny(tmp_path, "qwen2", head_dim=128, rope_theta=1e6)
    code, out = _run("--model", str(model), "--portable", "--new-tokens", "2", "--json")
    data = json.loads(out)
    want = [c.to_dict() for c in check_computed_buffers(AutoModelForCausalLM.from_pretrained(model))]
    assert [b["name"] for b in want] == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    assert data["buffers"] == want
    differs = any(b["differing"] for b in want)
    assert code == (1 if differs else 0) and data["ok"] is not differs, out
    assert data["static"]["not_portable"] == {} and data["static"]["uncovered"] == {}
    code, out = _run("--model", str(model), "--new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["buffers"] == []


def test_portable_coverage_counts_a_sinusoidal_table_torch_computed_at_load(tmp_path: Path) -> None:
    """XGLM's position table is computed with torch's exp, sin and cos when the checkpoint
    is loaded (its _init_weights): with --portable the table is listed with its differing
    elements and the model is NOT PORTABLE (exit 1), though every op is covered; without
    --portable the same model passes (exit 0)."""
    model = _save_tiny(tmp_path, "xglm", ffn_dim=128)
    code, out = _run("--model", str(model), "--portable", "--new-tokens", "2", "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False, out
    assert data["static"]["uncovered"] == {} and data["static"]["not_portable"] == {}
    (table,) = [b for b in data["buffers"] if b["name"] == "model.embed_positions.weights"]
    assert table["differing"] > 0 and not table["skipped"], table
    code, out = _run("--model", str(model), "--new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["buffers"] == [], out


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/no/such/model"], "no model at"),
    (["--new-tokens", "0"], "--new-tokens must be at least 1"),
    (["--attn", "flash"], "--attn must be eager or sdpa"),
    (["--device", "cuda:7"], "cuda"),
])
def test_bad_input_is_exit_2_with_what_to_do(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "detkit", "coverage", *args], capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr


def _tiny_gpt2_dir(path: Path, **tokenizer_attrs: None) -> Path:
    """A small GPT-2 saved with the preset tokenizer (``pad_token=None``: a tokenizer without one)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from detkit.models import build_tokenizer

    tokenizer = build_tokenizer()
    for name, value in tokenizer_attrs.items():
        setattr(tokenizer, name, value)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                       bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_model_path_with_brackets_is_printed_as_it_is(tmp_path: Path) -> None:
    """The title was rich markup: x[/y] raised MarkupError (exit 3), a[bold]b printed as ab."""
    for name in ("x[/y]", "a[bold]b"):
        model = _tiny_gpt2_dir(tmp_path / name)
        code, out = _run("--model", str(model), "--new-tokens", "1")
        assert code == 0, out
        assert f"detkitcoverage:{model}(" in "".join(out.split())  # the title wraps at the table's width


def test_a_tokenizer_without_pad_and_eos_tokens_pads_with_a_masked_id(tmp_path: Path) -> None:
    """tokenizer(padding=True) raised ValueError (exit 3, a traceback) when there was no eos token
    to pad with either; probe's engine pads such a batch with id 0, masked out."""
    model = _tiny_gpt2_dir(tmp_path / "m", pad_token=None, eos_token=None)
    code, out = _run("--model", str(model), "--new-tokens", "2", "--json")
    assert code == 0, out
    assert json.loads(out)["ok"] is True


@pytest.mark.parametrize("args", [["--new-tokens", "1100"], ["--prompt", "x" * 1100]])
def test_past_the_context_is_exit_2_before_tracing(args: list[str]) -> None:
    """tiny-gpt2 has 1024 positions: past them its position embedding raised IndexError (exit 3)."""
    proc = subprocess.run([sys.executable, "-m", "detkit", "coverage", "--model", "tiny-gpt2", *args],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "the model's context of 1024 tokens" in proc.stderr and "Traceback" not in proc.stderr
    assert "--new-tokens" in proc.stderr


def test_the_checkpoints_generation_config_does_not_turn_greedy_into_beam_search(tmp_path: Path) -> None:
    """generate fills what it is not given from model.generation_config: a checkpoint's num_beams
    and no_repeat_ngram_size (Marian's and BART-CNN's have them) traced beam search, and the
    n-gram blocker's unfold was UNCOVERED (exit 1), under a title that says greedy."""
    from transformers import GenerationConfig

    model = _tiny_gpt2_dir(tmp_path / "m")
    GenerationConfig(num_beams=2, no_repeat_ngram_size=2, eos_token_id=258, pad_token_id=256).save_pretrained(model)
    code, out = _run("--model", str(model), "--new-tokens", "3", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert "unfold.default" not in data["static"]["uncovered"] and data["ok"] is True


def test_sigterm_ends_the_run_as_ctrl_c_does() -> None:
    """A CI's timeout or docker stop sends SIGTERM: the process died of it (-15), without the
    exit 130 and the line that probe and audit give."""
    proc = subprocess.Popen([sys.executable, "-m", "detkit", "coverage", "--model", "tiny-llama", "--new-tokens", "500"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "tracing and running" not in seen:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line, "the run ended before tracing"
            seen += line
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted" in err and "Traceback" not in err and out == ""


def test_a_ctrl_c_that_a_library_caught_is_still_exit_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt swallowed inside a library (a lazy import, an except BaseException) let
    the run go on and exit 0: a CI read a run it had stopped as passing."""
    from detkit.cli import coverage

    real = coverage._trace_and_run

    def swallowing(*args: object, **kwargs: object) -> object:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the signal handler raises here
        except KeyboardInterrupt:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(coverage, "_trace_and_run", swallowing)
    code, out = _run("--model", "tiny-gpt2", "--new-tokens", "1")
    assert code == 130, out


def test_an_empty_model_is_refused_not_read_as_the_current_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Path("") is ".": --model "$MODEL" with MODEL unset checked whatever model the CI's working
    directory held, under the title "."; probe refuses an empty --model."""
    monkeypatch.chdir(_tiny_gpt2_dir(tmp_path / "m"))
    result = CliRunner().invoke(app, ["coverage", "--model", "", "--new-tokens", "1"])
    assert isinstance(result.exception, InputError) and "--model is empty" in str(result.exception)
