"""`detkit probe` end to end: JSON shape, report files, suites, bad input, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detkit.cli import main
from detkit.errors import InputError
from detkit.probe.suite import default_suite, load_suite, shipped_suites

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run ``detkit probe ARGS`` through the console entry point; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["detkit", "probe", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_json_report_and_files(tmp_path, capsys, monkeypatch):
    suite = tmp_path / "two.toml"
    suite.write_text(
        'name = "two"\n[[prompts]]\nid = "fox"\ntext = "The quick brown fox"\n'
        '[[prompts]]\nid = "fib"\ntext = "def fib(n):"\n[batch]\nmixed_trials = 1\n'
    )
    code, out, err = run_cli(
        [str(suite), "--model", "tiny-llama", "--modes", "single,mixed,decode", "--batch-sizes", "1,2",
         "--max-new-tokens", "4", "--seed", "3", "--json", "--out", str(tmp_path)],
        capsys, monkeypatch,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "probe" and report["status"] == "complete"
    assert [m["name"] for m in report["modes"]] == ["single", "mixed", "decode"]
    for m in report["modes"]:
        assert {"name", "unique_completions", "max_abs_logit_diff", "divergences"} <= set(m)
        assert isinstance(m["unique_completions"], int) and m["unique_completions"] >= 1
        assert isinstance(m["max_abs_logit_diff"], float)  # a local model has logits
        assert all(isinstance(d["position"], int) for d in m["divergences"])
    single = report["modes"][0]
    assert single["runs"] == 2 * (1 + 2)  # every row of every batch size, 2 prompts
    assert report["config"]["engine"]["dtype"] == "bfloat16" and report["config"]["suite"]["seed"] == 3
    assert report["config"]["engine"]["device"] == "cpu"
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["modes"] == report["modes"]
    md = (tmp_path / "report.md").read_text()
    assert "| single |" in md and "Verdict" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 2 and "src=" not in page and "href=" not in page  # self-contained


def test_chat_puts_each_prompt_in_the_tokenizers_chat_template(tmp_path, capsys, monkeypatch):
    from detkit.models import build_tokenizer, load_preset
    from detkit.probe.engine import Request
    from detkit.probe.hf import HFEngine

    args = ["--model", "tiny-llama", "--modes", "single", "--batch-sizes", "1,2", "--max-new-tokens", "4", "--json"]
    code, out, err = run_cli([*args, "--chat"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(out)
    assert report["config"]["engine"]["chat_template"] is True and report["status"] == "complete"
    # the reference is what the model generates after the templated prompt, not after the bare one
    engine = HFEngine(load_preset("tiny-llama", dtype=__import__("torch").bfloat16), build_tokenizer(), chat=True)
    prompt = next(iter(default_suite().prompts))
    templated = build_tokenizer().apply_chat_template([{"role": "user", "content": prompt.text}],
                                                      add_generation_prompt=True, tokenize=False)
    assert templated.startswith("<|im_start|>user\n") and engine.encode(prompt.text) == list(templated.encode())
    alone = engine.generate([Request(prompt.text)], max_new_tokens=4)[0]
    assert report["references"][prompt.id]["tokens"] == alone.tokens
    bare = json.loads(run_cli(args, capsys, monkeypatch)[1])
    assert bare["config"]["engine"]["chat_template"] is False
    no_template = build_tokenizer()
    no_template.chat_template = None
    with pytest.raises(InputError, match="--chat: the tokenizer of .* has no chat template"):
        HFEngine(engine.model, no_template, chat=True)


def test_fail_on_divergence_exits_1_on_the_documented_divergence(capsys, monkeypatch):
    suite = str(ROOT / "probes" / "tiny-llama-divergence.toml")
    code, out, err = run_cli([suite, "--modes", "padding", "--fail-on-divergence"], capsys, monkeypatch)
    assert code == 1, err
    assert "padding" in out and "diverging run" in out
    # stderr says which gate failed and why
    assert "--fail-on-divergence: exit 1: NOT invariant:" in err and "diverge from the reference in tokens" in err


def test_default_toml_is_the_built_in_default_suite():
    assert load_suite(ROOT / "probes" / "default.toml") == default_suite()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "probes").glob("*.toml")))
def test_shipped_suites_load(name):
    suite = load_suite(ROOT / "probes" / name)
    assert suite.prompts and suite.modes


def test_a_shipped_suite_loads_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(shipped_suites()) == {p.stem for p in (ROOT / "probes").glob("*.toml")}
    assert load_suite("feynman") == load_suite(ROOT / "probes" / "feynman.toml")
    # a file of that name in the working directory wins over the shipped suite
    (tmp_path / "feynman").write_text('[[prompts]]\nid = "mine"\ntext = "my prompt"\n')
    assert [p.id for p in load_suite("feynman").prompts] == ["mine"]


@pytest.mark.parametrize("arg", ["feynmann", "probes/feynman", "feynman.toml"])
def test_a_missing_suite_names_the_shipped_ones(tmp_path, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"no probe suite at .*shipped suite \(default, feynman, tiny-llama-divergence\)"):
        load_suite(arg)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model"], "no model at"),
        # brackets are text, not rich markup: the path is printed as given, with no MarkupError
        (["--model", "/no/such/run[bold]1"], "no model at '/no/such/run[bold]1'"),
        (["--model", "/no/such/a[/b]"], "no model at '/no/such/a[/b]'"),
        # a file inside the model directory (config.json, the weights): said "<file> has no config.json"
        (["--model", __file__], f"{__file__} is a file, not a model directory; pass the directory that holds it"),
        (["--max-new-tokens", "2000", "--modes", "single"], "context of 1024 tokens"),
        (["--modes", "single,bogus"], "unknown mode"),
        (["--concurrency", "1,8"], "--concurrency applies to --endpoint"),
        (["--batch-sizes", "1,x"], "comma-separated positive integers"),
        (["--batch-sizes", "1,100000"], "--batch-sizes: batch sizes (and concurrency) must be at most 4096"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--batch-invariant"], "server needs them on its side"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--retries", "0"], "cannot reach"),
        (["--dtype", "int8"], "--dtype must be one of"),
        (["--out", __file__], "is a file; pass a directory"),
        (["--out", f"{__file__}/x"], "cannot create this directory"),
        (["--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--device", "cuda"], "--device applies to local models"),
        pytest.param(["--device", "cuda", "--modes", "single"], "torch reports no CUDA device",
                     marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, message, capsys, monkeypatch):
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2
    assert message in err and "Traceback" not in err + out


def test_probe_without_transformers_is_one_clear_line_and_exit_2(capsys, monkeypatch):
    # `pip install detkit` (no `hf` extra) then `detkit probe`: the install command, not a traceback
    monkeypatch.setitem(sys.modules, "transformers", None)
    code, out, err = run_cli(["--max-new-tokens", "1"], capsys, monkeypatch)
    assert code == 2
    assert "pip install 'detkit[hf]'" in err and "Traceback" not in err + out


def test_a_model_without_tokenizer_and_bad_suites_exit_2(tmp_path, capsys, monkeypatch):
    from detkit.models import load_preset

    load_preset("tiny-llama").save_pretrained(tmp_path / "model")
    code, _, err = run_cli(["--model", str(tmp_path / "model")], capsys, monkeypatch)
    assert code == 2 and "has no tokenizer" in err
    (tmp_path / "empty.toml").write_text('name = "t"\n')
    code, _, err = run_cli([str(tmp_path / "empty.toml")], capsys, monkeypatch)
    assert code == 2 and "needs at least one [[prompts]] entry" in err  # printed, not read as markup
    (tmp_path / "broken.toml").write_text("name = [")
    code, _, err = run_cli([str(tmp_path / "broken.toml")], capsys, monkeypatch)
    assert code == 2 and "not valid TOML" in err
    (tmp_path / "typo.toml").write_text('name = "t"\nmax_new_token = 3\n[[prompts]]\nid = "a"\ntext = "b"\n')
    code, _, err = run_cli([str(tmp_path / "typo.toml")], capsys, monkeypatch)
    assert code == 2 and "unknown key(s) ['max_new_token']" in err
    code, _, err = run_cli([str(tmp_path / "missing.toml")], capsys, monkeypatch)
    assert code == 2 and "no probe suite at" in err
    # a scalar where a list belongs is an error, not a list of its characters
    for line, message in [('modes = "single"', "modes must be a list"), ("max_new_tokens = 2.5", "must be an integer"),
                          ('[batch]\nfillers = "lorem ipsum"', "fillers must be a list"),
                          ("[batch]\nsizes = 2", "sizes must be a list"), ("[batch]\nrepeats = true", "must be an integer")]:
        (tmp_path / "scalar.toml").write_text(f'name = "t"\n{line}\n[[prompts]]\nid = "a"\ntext = "b"\n')
        code, _, err = run_cli([str(tmp_path / "scalar.toml")], capsys, monkeypatch)
        assert code == 2 and message in err, (line, err)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; a CI timeout, docker stop
def test_ctrl_c_keeps_finished_modes_and_marks_the_report_partial(tmp_path, signum):
    suite = tmp_path / "long.toml"
    suite.write_text(
        'name = "long"\nmax_new_tokens = 6\nmodes = ["single", "repeat"]\n'
        '[[prompts]]\nid = "fox"\ntext = "The quick brown fox"\n'
        "[batch]\nsizes = [1, 2]\nrepeats = 500\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "detkit", "probe", str(suite), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((out / "report.json").read_text())["modes"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        time.sleep(1.5)  # into the repeat mode: some of its runs finish
        assert proc.poll() is None, "the probe ended before it could be interrupted"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr.decode()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "partial"
    # the finished mode, and the runs of the interrupted one that finished (not lost)
    assert [(m["name"], m["complete"]) for m in report["modes"]] == [("single", True), ("repeat", False)]
    assert report["modes"][1]["runs"] > 0
    assert [r["mode"] for r in report["results"]] == ["single", "repeat"]
    assert len(report["results"][1]["runs"]) == report["modes"][1]["runs"]
    assert report["summary"]["verdict"].startswith("INCOMPLETE: stopped in repeat (its finished runs kept)")
    md = (out / "report.md").read_text()
    assert "partial" in md and "repeat (interrupted)" in md
    assert b"Traceback" not in stderr


def test_ctrl_c_with_json_and_no_out_prints_the_partial_report(tmp_path, capsys, monkeypatch):
    from detkit.probe import runner

    real_run_mode = runner.run_mode

    def interrupted_after_single(mode, *args, **kwargs):
        if mode != "single":
            raise KeyboardInterrupt
        return real_run_mode(mode, *args, **kwargs)

    monkeypatch.setattr(runner, "run_mode", interrupted_after_single)
    code, out, err = run_cli(["--model", "tiny-llama", "--modes", "single,decode", "--batch-sizes", "1,2",
                              "--max-new-tokens", "3", "--json"], capsys, monkeypatch)
    assert code == 130, err
    report = json.loads(out)  # nothing else on stdout
    assert report["status"] == "partial" and [m["name"] for m in report["modes"]] == ["single"]
    assert report["summary"]["verdict"].startswith("INCOMPLETE")
    assert "the JSON on stdout holds the finished modes" in err


def test_ctrl_c_before_the_probe_starts_says_so(tmp_path, capsys, monkeypatch):
    from detkit.probe import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "total_work", interrupted)  # before run_probe: no partial report
    code, out, err = run_cli(["--model", "tiny-llama", "--modes", "single", "--json"], capsys, monkeypatch)
    assert code == 130 and out == "", err
    assert "before the probe started" in err and "no --out or --json given" not in err
    # with --out, no report.json exists yet: said so, not a traceback from rendering it
    code, out, err = run_cli(["--model", "tiny-llama", "--modes", "single", "--out", str(tmp_path)], capsys, monkeypatch)
    assert code == 130 and "before the probe started" in err and "Traceback" not in err, err
    assert not (tmp_path / "report.json").exists()


def _swallowing_a_ctrl_c(real):
    """``real``, after a Ctrl-C that arrives and is caught, as a library's ``except BaseException`` does."""

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here
        except KeyboardInterrupt:
            pass
        return real(*args, **kwargs)

    return swallowing


def test_a_ctrl_c_that_a_library_swallows_still_ends_the_probe_as_interrupted(capsys, monkeypatch):
    """A KeyboardInterrupt caught inside torch or transformers (an ``except BaseException``)
    let the probe run on and exit 0, as if it had passed."""
    from detkit.probe import runner

    monkeypatch.setattr(runner, "total_work", _swallowing_a_ctrl_c(runner.total_work))
    code, out, err = run_cli(["--model", "tiny-llama", "--modes", "single", "--max-new-tokens", "2", "--json"],
                             capsys, monkeypatch)
    assert code == 130, err
    assert "caught inside a library" in err and json.loads(out)["status"] == "complete"


def test_a_ctrl_c_swallowed_while_the_model_loads_stops_the_probe_before_it_starts(capsys, monkeypatch):
    from detkit.probe import hf

    monkeypatch.setattr(hf, "load_model", _swallowing_a_ctrl_c(hf.load_model))
    code, out, err = run_cli(["--model", "tiny-llama", "--modes", "single", "--json"], capsys, monkeypatch)
    assert code == 130 and out == "", err
    assert "before the probe started" in err


def test_ctrl_c_while_the_model_loads_says_so(capsys, monkeypatch):
    """Loading the model is the longest wait before the probe: a Ctrl-C there exited 130 in
    silence (typer turns the KeyboardInterrupt into its exit)."""
    from detkit.probe import hf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "load_model", interrupted)
    code, out, err = run_cli(["--model", "tiny-llama", "--modes", "single", "--json"], capsys, monkeypatch)
    assert code == 130 and out == "", err
    assert "interrupted" in err and "before the probe started" in err


def test_a_report_left_running_renders_as_incomplete(tmp_path):
    # what a SIGKILL or a segfault leaves behind: status running, no summary
    from detkit.probe.render import render_html, render_markdown
    from detkit.report import ReportWriter

    writer = ReportWriter("probe", {"engine": {"model": "m"}, "suite": default_suite().to_dict()}, tmp_path / "r.json")
    writer.data.update(references={}, modes=[])
    writer.flush()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "running"
    assert "**Verdict:** INCOMPLETE" in render_markdown(report)
    assert "<b>Verdict:</b> INCOMPLETE" in render_html(report)
    # neither red (a difference found) nor green: no verdict yet
    assert '<p class="undecided"><b>Verdict:</b> INCOMPLETE' in render_html(report)
    for invariant, css in ((True, "ok"), (False, "bad"), (None, "undecided")):
        report["summary"] = {"invariant": invariant, "verdict": "V"}
        assert f'<p class="{css}"><b>Verdict:</b> V' in render_html(report)


def test_verdict_names_what_failed():
    from detkit.probe.runner import _summary

    def mode(unique: int | None, diff: float | None, divergences: int = 0, failed: int = 0, name: str = "m",
             skipped: str | None = None, retried: int = 0) -> dict:
        return {"name": name, "skipped": skipped, "runs": 4, "failed_runs": failed, "retried_runs": retried,
                "unique_completions": unique, "max_abs_logit_diff": None, "max_abs_logprob_diff": diff,
                "divergences": [{}] * divergences}

    def summary(modes: list[dict], complete: bool = True) -> dict:
        return _summary(modes, ["m", "padding", "repeat"], complete=complete)

    ok = summary([mode(1, 0.0), mode(None, None, name="padding", skipped="no padding on a server"),
                  mode(1, 0.0, name="repeat", retried=2)])
    assert ok["invariant"] is True and ok["verdict"] == (
        "identical to the reference in the 2 mode(s) run (tokens and scores); skipped: padding; "
        "2 run(s) needed a retry, sent alone outside their burst")
    assert ok["retried_runs"] == 2 and not ok["differences_found"]
    tokens_only = summary([mode(1, None), mode(1, None, name="padding"), mode(1, None, name="repeat")])
    assert tokens_only["verdict"] == "identical to the reference in every mode (tokens only: the engine returned no scores)"
    scores = summary([mode(1, 0.03125)])
    assert scores["invariant"] is False and scores["differences_found"]
    assert scores["verdict"] == "NOT invariant: scores differ from the reference by up to 0.03125 (tokens identical)"
    tokens = summary([mode(2, 0.5, divergences=1), mode(1, 0.0, failed=1)])["verdict"]
    assert "1 run(s) diverge" in tokens and "up to 2 distinct completions" in tokens and "1 run(s) failed" in tokens
    assert "tokens identical" not in tokens
    failed_only = summary([mode(None, None, failed=4), mode(1, 0.0, name="padding"), mode(1, 0.0, name="repeat")])
    # Failures alone decide nothing: not "NOT invariant" (that would blame the engine).
    assert failed_only["invariant"] is None and not failed_only["differences_found"]
    assert failed_only["verdict"] == ("UNDECIDED: 4 run(s) failed, so they prove nothing; the rest identical to the "
                                      "reference (tokens and scores)")
    all_failed = summary([mode(None, None, failed=4), mode(None, None, name="padding", failed=4),
                          mode(None, None, name="repeat", failed=4)])
    assert all_failed["invariant"] is None and all_failed["verdict"] == "UNDECIDED: 12 run(s) failed, so they prove nothing"
    nothing = summary([], complete=True)
    assert nothing["invariant"] is None and nothing["verdict"].startswith("UNDECIDED: no mode ran")
    stopped = summary([mode(1, 0.0)], complete=False)
    assert stopped["invariant"] is None and stopped["modes_not_reached"] == ["padding", "repeat"]
    assert stopped["verdict"] == ("INCOMPLETE: stopped before padding, repeat; so far identical to the reference "
                                  "(tokens and scores)")
    cut = summary([mode(1, 0.0), {**mode(1, 0.0, name="padding"), "complete": False}], complete=False)
    assert cut["verdict"] == ("INCOMPLETE: stopped in padding (its finished runs kept), before repeat; so far "
                              "identical to the reference (tokens and scores)")


def test_the_histogram_draws_divergences_past_max_new_tokens() -> None:
    # A server without logprobs is compared character by character: 32 new tokens are
    # ~150 characters, so a divergence can sit past max_new_tokens and must still be drawn.
    import re

    from detkit.probe.engine import Generation
    from detkit.probe.metrics import ModeSummary, compare_run
    from detkit.probe.render import _svg_histogram

    ref_text, run_text = "x" * 150, "x" * 120 + "y" * 30
    ref = Generation(tokens=[ord(c) for c in ref_text], text=ref_text)
    run = Generation(tokens=[ord(c) for c in run_text], text=run_text)
    summary = ModeSummary("single", None, "character", runs=[compare_run("single", "p", "p", ref, run)],
                          references={"p": ref.tokens})
    mode = summary.to_dict()
    assert [d["position"] for d in mode["divergences"]] == [120]
    svg = _svg_histogram({"config": {"suite": {"max_new_tokens": 32}}, "modes": [mode]})
    assert len(re.findall("<rect", svg)) == 1 and "1 run(s) at step 120" in svg


def test_the_median_divergence_position_of_an_even_count_is_the_middle_two_averaged() -> None:
    from detkit.probe.render import _positions

    assert _positions({"divergences": [{"position": 3}, {"position": 10}]}) == "3 / 6.5 / 10"
    assert _positions({"divergences": [{"position": p} for p in (30, 3, 5, 20)]}) == "3 / 12.5 / 30"
    assert _positions({"divergences": [{"position": p} for p in (3, 5, 9)]}) == "3 / 5 / 9"


@pytest.mark.parametrize("line", ["prefix_fractions = []", "padding = []"])
def test_an_empty_list_of_prefix_fractions_or_padding_is_an_input_error(tmp_path, line):
    # it would run no prefix (padding) run at all, and the verdict would still say
    # "identical to the reference in every mode"
    (tmp_path / "empty.toml").write_text(f'name = "t"\n[[prompts]]\nid = "a"\ntext = "b"\n[batch]\n{line}\n')
    with pytest.raises(InputError, match="need at least one entry"):
        load_suite(tmp_path / "empty.toml")


def test_a_mode_listed_twice_is_an_input_error(tmp_path, capsys, monkeypatch):
    # it ran twice: two "single" records, its runs counted twice in the summary
    code, out, err = run_cli(["--modes", "single,mixed,single", "--max-new-tokens", "1"], capsys, monkeypatch)
    assert code == 2 and "listed more than once: single" in err and "Traceback" not in err + out
    (tmp_path / "twice.toml").write_text('name = "t"\nmodes = ["decode", "decode"]\n[[prompts]]\nid = "a"\ntext = "b"\n')
    with pytest.raises(InputError, match="listed more than once: decode"):
        load_suite(tmp_path / "twice.toml")


def test_a_failure_halfway_keeps_the_finished_modes_in_the_json_and_the_report_files(tmp_path, capsys, monkeypatch):
    # e.g. CUDA out of memory at the largest batch size, after the decode mode finished: the
    # report.json was partial, but --json printed nothing and report.md/.html were not written
    from detkit.probe import hf

    generate = hf.HFEngine.generate

    def out_of_memory_at_4(self, requests, **kwargs):
        if len(requests) > 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return generate(self, requests, **kwargs)

    monkeypatch.setattr(hf.HFEngine, "generate", out_of_memory_at_4)
    monkeypatch.setattr(sys, "argv", ["detkit", "probe", "--modes", "decode,single", "--batch-sizes", "1,2,4",
                                      "--max-new-tokens", "3", "--json", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    # not 1, which --fail-on-divergence gives a difference: a CI must not read a crash as one
    assert exc.value.code == 3
    out, err = capsys.readouterr()
    assert "RuntimeError: CUDA out of memory (simulated)" in err and "unexpected error (exit 3)" in err
    report = json.loads(out)
    assert report["status"] == "partial" and [m["name"] for m in report["modes"]] == ["decode"]
    assert "out of memory" in report["errors"][0]["error"]
    assert report["summary"]["verdict"].startswith("INCOMPLETE") and report["summary"]["invariant"] is None
    assert "| decode |" in (tmp_path / "report.md").read_text() and (tmp_path / "report.html").is_file()
    assert "finished modes kept in" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--endpoint", "http://127.0.0.1:9/v1", "--dtype", "bfloat16"], "--dtype applies to local models"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--model", "tiny-gpt2", "--attn", "sdpa"],
         "--model, --attn apply to local models"),
        (["--timeout", "5", "--modes", "single"], "--timeout applies to --endpoint"),
        (["--model", "tiny-llama", "--retries", "0", "--modes", "single"], "--retries applies to --endpoint"),
    ],
)
def test_an_option_of_the_other_engine_is_refused_not_ignored(args, message, capsys, monkeypatch):
    # they were accepted and silently ignored (a server's dtype is the server's; a local model has no timeout)
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and message in err and "Traceback" not in err + out


def test_an_empty_model_is_refused_not_read_as_the_current_directory(capsys, monkeypatch):
    code, out, err = run_cli(["--model", "", "--modes", "single"], capsys, monkeypatch)
    assert code == 2 and "--model is empty" in err and "Traceback" not in err + out


def test_a_seed_past_torchs_range_is_one_clear_line_and_exit_2(capsys, monkeypatch):
    # torch.manual_seed raised "ValueError: Overflow when unpacking long long" with a traceback (exit 1)
    code, out, err = run_cli(["--seed", str(2**64), "--modes", "single", "--max-new-tokens", "1"], capsys, monkeypatch)
    assert code == 2 and "seed must be an integer from -2**63 to 2**64-1" in err and "Traceback" not in err + out


def test_the_reports_command_line_is_quoted_for_a_shell():
    # joined with spaces, a model path holding a space came back as two arguments when pasted
    import shlex

    from detkit.cli.probe import _command_line

    argv = ["/my suites/s.toml", "--model", "/my models/m", "--modes", "single, mixed", "--json"]
    line = _command_line(argv)
    assert shlex.split(line) == ["detkit", "probe", *argv]
    assert _command_line(["--model", "tiny-llama"]) == "detkit probe --model tiny-llama"


@pytest.mark.parametrize("model", ["/runs/mm[/x]", "/runs/r[red]/m"])
def test_the_tables_title_prints_a_model_path_with_brackets_as_text(model):
    # the title went through rich markup: "[/x]" raised MarkupError after the probe had
    # finished (a traceback instead of the table), and "[red]" vanished from the path
    from rich.console import Console

    from detkit.cli.probe import _print_table

    report = {"config": {"engine": {"model": model, "dtype": "bfloat16"}}, "modes": [], "notes": [],
              "summary": {"invariant": True, "verdict": "identical"}}
    console = Console(record=True, width=200)
    _print_table(console, report)
    assert f"detkit probe: {model} (bfloat16)" in console.export_text()


@pytest.mark.parametrize(("line", "message"), [("sizes = [true, 2]", "batch sizes must be positive integers"),
                                               ("padding = [1, true]", "padding amounts must be positive integers")])
def test_a_boolean_batch_size_or_padding_is_an_input_error(tmp_path, line, message):
    # true ran as 1 (labels "b=True"), as the scalar keys already refuse it
    (tmp_path / "bool.toml").write_text(f'name = "t"\n[[prompts]]\nid = "a"\ntext = "b"\n[batch]\n{line}\n')
    with pytest.raises(InputError, match=message):
        load_suite(tmp_path / "bool.toml")


@pytest.mark.parametrize(("model_type", "fields"), [
    ("qwen2", dict(num_key_value_heads=1, head_dim=128, rope_theta=1e6)),
    ("xglm", dict(ffn_dim=128)),
])
def test_portable_probe_recomputes_the_tables_torch_built_at_load(model_type, fields, tmp_path, capsys, monkeypatch):
    """--portable promises the same reference bits on every machine, but torch's math
    library built the model's tables when it was loaded (the RoPE frequencies of
    Qwen2.5-7B: head 128, base 1e6; XGLM's sinusoidal positions): probe recomputes them
    with the portable kernels and says so in the report's notes, for exactly the buffers
    that changed (XGLM's always: torch's sin and cos are not the portable ones)."""
    import torch
    import transformers

    from detkit.buffers import check_computed_buffers
    from detkit.models import build_tokenizer

    tokenizer = build_tokenizer()
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    changed = [c for c in check_computed_buffers(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
               if c.differing]
    if model_type == "xglm":
        assert [c.name for c in changed] == ["model.embed_positions.weights"]
    code, out, err = run_cli(["--model", str(tmp_path / "m"), "--portable", "--modes", "single", "--batch-sizes", "1",
                              "--max-new-tokens", "2", "--json"], capsys, monkeypatch)
    assert code == 0, err
    notes = [n for n in json.loads(out)["notes"] if n.startswith("--portable: ")]
    assert notes == [f"--portable: {c.name} recomputed with the portable kernels ({c.differing} of {c.numel} elements "
                     "changed: torch's math library computed them when the model was loaded)" for c in changed], notes
