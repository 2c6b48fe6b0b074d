"""The HTTP engine against a real OpenAI-compatible server: ``transformers serve``.

The server is started on loopback by the fixture on a tiny-llama saved to a temporary
directory (offline), with and without ``--continuous-batching``. ``transformers serve``
(5.x) ignores ``logprobs`` on ``/v1/completions``, so it also exercises the degraded
path (text compared character by character, said in the report).

Error handling (retries, server errors recorded per run, logprob parsing) is tested
against small scripted servers on loopback: real sockets and real HTTP, answering
what a failing or logprob-capable server answers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import probe_server
from detkit.errors import EndpointError, InputError
from detkit.probe.engine import Request
from detkit.probe.http import NO_LOGPROBS_NOTE, HTTPEngine
from detkit.probe.runner import run_probe
from detkit.probe.suite import BatchPlan, ProbeSuite, Prompt

pytest.importorskip("fastapi", reason="transformers serve needs the serving extras (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="transformers serve needs the serving extras (pip install -e '.[test]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SUITE = ProbeSuite(
    name="http-test",
    prompts=(Prompt("fox", "The quick brown fox"),),
    max_new_tokens=6,
    modes=("single", "mixed", "padding", "decode", "repeat"),
    batch=BatchPlan(sizes=(1, 3), mixed_trials=1, repeats=2),
)


def _wait_until_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Poll GET /health until the server answers; fail with its log if it dies or hangs."""
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from detkit.models import save_preset

    return save_preset("tiny-llama", tmp_path_factory.mktemp("served") / "tiny-llama", dtype=torch.bfloat16)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "continuous-batching"])
def server(request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu"]
    if request.param:
        # A small paged cache: sized from free memory by default, its first allocation
        # takes most of a minute on a CPU.
        cmd += ["--continuous-batching", "--cb-num-blocks", "64", "--cb-block-size", "32", "--cb-max-batch-tokens", "512"]
    # One thread: the 2-core machine is shared with the test process itself.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_healthy(port, proc, log, "transformers serve")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_probe_against_transformers_serve(server: str, model_dir: Path) -> None:
    engine = HTTPEngine(server, timeout=60, retries=1)
    assert engine.served_model == str(model_dir)  # found through GET /v1/models
    report = run_probe(engine, SUITE, seed=0, config={"engine": engine.describe()})
    assert report["status"] == "complete"
    assert NO_LOGPROBS_NOTE in report["notes"]
    modes = {m["name"]: m for m in report["modes"]}
    assert modes["padding"]["skipped"] and modes["decode"]["skipped"]
    for name in ("single", "mixed", "repeat"):
        m = modes[name]
        assert m["skipped"] is None and m["failed_runs"] == 0, m["errors"]
        assert m["token_unit"] == "character"
        assert m["max_abs_logit_diff"] is None and m["max_abs_logprob_diff"] is None and m["score_kind"] is None
        assert m["unique_completions"] >= 1
        assert all(isinstance(d["position"], int) for d in m["divergences"])
    if report["summary"]["invariant"]:  # only tokens were compared, and the verdict says so
        assert "(tokens only: the engine returned no scores)" in report["summary"]["verdict"]
    assert report["summary"]["modes_skipped"].keys() == {"padding", "decode"}
    # what the engine learnt from the first answer is in the report, not the guess before it
    assert report["config"]["engine"]["logprobs_supported"] is False
    assert report["config"]["engine"]["token_unit"] == "character"
    assert modes["single"]["runs"] == 1 + 3  # every concurrent copy is compared
    assert len(report["references"]["fox"]["tokens"]) > 0
    burst = [r for r in report["results"] if r["mode"] == "single"][0]["runs"]
    assert {r["concurrency"] for r in burst if "concurrency" in r} == {3}


def test_chat_probe_against_transformers_serve(server: str) -> None:
    engine = HTTPEngine(server, timeout=60, retries=1, api="chat")
    suite = ProbeSuite(name="chat", prompts=SUITE.prompts, max_new_tokens=6, modes=("single",),
                       batch=BatchPlan(sizes=(1, 3)))
    report = run_probe(engine, suite, seed=0, config={})
    assert report["status"] == "complete" and report["modes"][0]["failed_runs"] == 0, report["modes"][0]["errors"]
    # transformers serve applies the preset's chat template and, as on /v1/completions, returns no logprobs
    assert report["notes"] == [NO_LOGPROBS_NOTE.replace("/v1/completions", "/v1/chat/completions")]
    assert report["modes"][0]["token_unit"] == "character" and report["references"]["fox"]["text"]
    assert report["modes"][0]["runs"] == 1 + 3


def test_a_wrong_served_model_name_fails_the_reference_with_the_servers_message(server: str) -> None:
    engine = HTTPEngine(server, "no-such-model", timeout=30, retries=0)
    with pytest.raises(EndpointError, match=r"HTTP 4\d\d .*no-such-model"):
        run_probe(engine, SUITE, seed=0, config={})


def test_an_endpoint_that_is_down_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(EndpointError, match="cannot reach .* is the server running"):
        HTTPEngine(url, timeout=2, retries=0)
    engine = HTTPEngine(url, "m", timeout=2, retries=1, backoff=0.01)
    with pytest.raises(EndpointError, match=r"no answer from .*after 2 attempts"):
        run_probe(engine, SUITE, seed=0, config={})


def test_bad_endpoint_urls_are_input_errors() -> None:
    with pytest.raises(InputError, match="http"):
        HTTPEngine("127.0.0.1:8000", "m")


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 1e12])
def test_a_timeout_sockets_cannot_take_is_an_input_error(timeout: float) -> None:
    # not a ValueError/OverflowError traceback from socket.settimeout at the first request
    with pytest.raises(InputError, match="--timeout must be"):
        HTTPEngine("http://127.0.0.1:8000/v1", "m", timeout=timeout)


# ---------------------------------------------------------------- scripted servers


def modes_by_name(modes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in modes}


class _Scripted(BaseHTTPRequestHandler):
    """Answers /v1/completions as ``server.script(count, body)`` says: (status, json) or
    (status, json, extra headers)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.paths.add(self.path)  # type: ignore[attr-defined]
            self.server.count += 1  # type: ignore[attr-defined]
            count = self.server.count  # type: ignore[attr-defined]
        status, answer, *headers = self.server.script(count, body)  # type: ignore[attr-defined]
        data = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in (headers[0] if headers else {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _completion(body: dict[str, Any]) -> dict[str, Any]:
    """A completion with logprobs, as vLLM answers: the same for the same prompt."""
    n = int(body["max_tokens"])
    tokens = [f"t{i}" for i in range(n)]
    return {
        "choices": [{
            "text": "".join(tokens),
            "finish_reason": "length",
            "logprobs": {
                "tokens": tokens,
                "token_logprobs": [-0.5] * n,
                "top_logprobs": [{t: -0.5, "alt": -1.25} for t in tokens],
            },
        }]
    }


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.count = 0  # type: ignore[attr-defined]
    srv.paths = set()  # type: ignore[attr-defined]
    srv.lock = threading.Lock()  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _chat_completion(body: dict[str, Any]) -> dict[str, Any]:
    """A chat completion with logprobs, as vLLM answers /v1/chat/completions."""
    tokens = [f"t{i}" for i in range(int(body["max_tokens"]))]
    content = [{"token": t, "logprob": -0.5, "top_logprobs": [{"token": t, "logprob": -0.5}, {"token": "alt", "logprob": -1.25}]}
               for t in tokens]
    return {"choices": [{"message": {"role": "assistant", "content": "".join(tokens)}, "finish_reason": "length",
                         "logprobs": {"content": content}}]}


def test_the_chat_api_sends_one_user_message_and_reads_chat_logprobs(scripted: ThreadingHTTPServer) -> None:
    bodies: list[dict[str, Any]] = []

    def script(count: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        bodies.append(body)
        return 200, _chat_completion(body)

    scripted.script = script  # type: ignore[attr-defined]
    # the chat route itself given as the endpoint: its /v1 base is kept
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1/chat/completions", "m", timeout=5, retries=0,
                        api="chat", top_logprobs=3)
    assert engine.base.endswith(":%d/v1" % scripted.server_port) and engine.describe()["api"] == "/v1/chat/completions"
    report = run_probe(engine, SUITE, seed=0, config={})
    assert scripted.paths == {"/v1/chat/completions"}  # type: ignore[attr-defined]
    assert bodies[0] == {"model": "m", "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3,
                         "messages": [{"role": "user", "content": "The quick brown fox"}]}
    assert report["notes"] == [] and report["references"]["fox"]["text"] == "t0t1t2t3t4t5"
    for m in report["modes"]:
        if m["skipped"] is None:
            assert m["failed_runs"] == 0 and m["score_kind"] == "logprob" and m["token_unit"] == "token", m
            assert m["max_abs_logprob_diff"] == 0.0 and m["unique_completions"] == 1


@pytest.mark.parametrize(("path", "api", "sent"), [
    ("/v1", None, "/v1/completions"),
    ("/v1/", "chat", "/v1/chat/completions"),
    ("/v1/chat/completions", None, "/v1/chat/completions"),  # the URL names the chat API: no --chat needed
    ("/v1/chat/completions/", "chat", "/v1/chat/completions"),
    ("/v1/completions", None, "/v1/completions"),
    ("/v1/completions", "completions", "/v1/completions"),
])
def test_the_api_is_the_one_asked_for_or_the_one_the_url_names(path: str, api: str | None, sent: str) -> None:
    engine = HTTPEngine(f"http://127.0.0.1:8000{path}", "m", api=api)
    assert engine.base == "http://127.0.0.1:8000/v1" and engine.describe()["api"] == sent


@pytest.mark.parametrize(("path", "api", "advice"), [
    ("/v1/chat/completions", "completions", "use --chat"),
    ("/v1/completions", "chat", "use --no-chat"),
])
def test_an_api_the_url_contradicts_is_an_input_error(path: str, api: str, advice: str) -> None:
    # before, a chat URL without --chat was silently probed through /v1/completions
    with pytest.raises(InputError, match=f"names /v1/.*but the probe was asked to send .*{advice}, or give the server's /v1 base"):
        HTTPEngine(f"http://127.0.0.1:8000{path}", "m", api=api)


def test_a_chat_answer_without_logprobs_compares_characters_and_one_without_a_message_fails_its_run(
        scripted: ThreadingHTTPServer) -> None:
    plain = {"choices": [{"message": {"role": "assistant", "content": "abc"}, "finish_reason": "length"}]}
    scripted.script = lambda count, body: (200, plain if count % 2 else {"choices": [{"text": "abc"}]})  # type: ignore[attr-defined]
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0, api="chat")
    suite = ProbeSuite(name="chat", prompts=SUITE.prompts, max_new_tokens=3, modes=("single",),
                       batch=BatchPlan(sizes=(2,)))
    report = run_probe(engine, suite, seed=0, config={})
    assert report["notes"] == [
        "the server returned no logprobs for /v1/chat/completions: comparing the completion text character by "
        "character (token_unit 'character'); logit/logprob metrics are null"]
    errors = report["modes"][0]["errors"]
    assert len(errors) == 1 and "answer without choices[0].message.content" in errors[0]["error"]
    with pytest.raises(InputError, match="api must be one of completions, chat"):
        HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", api="responses")


def test_server_errors_are_retried_then_reported(scripted: ThreadingHTTPServer) -> None:
    scripted.script = lambda count, body: (503, {"error": {"message": "overloaded, try later"}})  # type: ignore[attr-defined]
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=2, backoff=0.01)
    with pytest.raises(EndpointError, match=r"HTTP 503 .*overloaded, try later \(after 3 attempts\)"):
        run_probe(engine, SUITE, seed=0, config={})
    assert scripted.count == 3  # type: ignore[attr-defined]


def test_failed_requests_are_recorded_and_never_fatal(scripted: ThreadingHTTPServer) -> None:
    # The reference succeeds; afterwards every second request fails with a 500.
    scripted.script = lambda count, body: (  # type: ignore[attr-defined]
        (200, _completion(body)) if count == 1 or count % 2 else (500, {"error": {"message": "boom"}})
    )
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0)
    report = run_probe(engine, SUITE, seed=0, config={})
    assert report["status"] == "complete"
    ran = [m for m in report["modes"] if m["skipped"] is None]
    failed = sum(m["failed_runs"] for m in ran)
    assert failed > 0 and report["summary"]["failed_runs"] == failed
    assert all("HTTP 500" in e["error"] and "boom" in e["error"] for m in ran for e in m["errors"])
    # the answers that came back carried logprobs: compared as logprobs, not logits
    # (which rows of a burst fail is up to thread scheduling; single b=1 is request 2)
    assert modes_by_name(ran)["single"]["failed_runs"] >= 1
    for m in ran:
        if m["failed_runs"] == m["runs"]:
            continue
        assert m["score_kind"] == "logprob" and m["max_abs_logprob_diff"] == 0.0 and m["max_abs_logit_diff"] is None
        assert m["token_unit"] == "token" and m["divergences"] == []
    assert report["summary"]["invariant"] is None  # failed runs prove nothing


def _with_top(body: dict[str, Any], value: float) -> dict[str, Any]:
    answer = _completion(body)
    answer["choices"][0]["logprobs"]["top_logprobs"][1]["alt"] = value
    return answer


def test_a_minus_inf_logprob_is_a_score_and_the_report_stays_strict_json(scripted: ThreadingHTTPServer,
                                                                          tmp_path: Path) -> None:
    # Concurrent requests see probability 0 (-inf) for a candidate the reference gave -1.25.
    scripted.script = lambda count, body: (  # type: ignore[attr-defined]
        200, _with_top(body, float("-inf")) if count > 2 else _completion(body))
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0)
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",),
                       batch=BatchPlan(sizes=(1, 3)))
    report = run_probe(engine, suite, seed=0, config={"engine": engine.describe()}, out=tmp_path / "report.json")
    on_disk = json.loads((tmp_path / "report.json").read_text())  # strict JSON: Python's parser accepts it
    assert on_disk["status"] == "complete" and on_disk["modes"][0]["max_abs_logprob_diff"] == "inf"
    from detkit.probe.render import render_html, render_markdown

    assert "| inf (logprob) |" in render_markdown(on_disk) and "<svg" in render_html(on_disk)
    assert report["summary"]["invariant"] is False and report["summary"]["differences_found"]
    assert report["config"]["engine"]["logprobs_supported"] is True


def test_a_nan_logprob_fails_that_run_and_nothing_else(scripted: ThreadingHTTPServer) -> None:
    scripted.script = lambda count, body: (  # type: ignore[attr-defined]
        200, _with_top(body, float("nan")) if count == 2 else _completion(body))
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0)
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",),
                       batch=BatchPlan(sizes=(1, 3)))
    report = run_probe(engine, suite, seed=0, config={})
    (mode,) = report["modes"]
    assert mode["failed_runs"] == 1 and "NaN among the logprobs of step 1" in mode["errors"][0]["error"]
    assert report["summary"]["invariant"] is None and not report["summary"]["differences_found"]
    assert "1 run(s) failed" in report["summary"]["verdict"]


def test_retries_are_counted_and_named_in_the_verdict(scripted: ThreadingHTTPServer) -> None:
    scripted.script = lambda count, body: (  # type: ignore[attr-defined]
        (503, {"error": {"message": "busy"}}) if count == 2 else (200, _completion(body)))
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=1, backoff=0.01)
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",), batch=BatchPlan(sizes=(1,)))
    report = run_probe(engine, suite, seed=0, config={})
    assert report["modes"][0]["retried_runs"] == 1 and report["summary"]["invariant"] is True
    assert report["summary"]["verdict"].endswith("1 run(s) needed a retry, sent alone outside their burst")


def test_modes_that_need_company_are_skipped_with_batches_of_one(scripted: ThreadingHTTPServer) -> None:
    scripted.script = lambda count, body: (200, _completion(body))  # type: ignore[attr-defined]
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0)
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single", "mixed", "prefix", "repeat"),
                       batch=BatchPlan(sizes=(1,)))
    report = run_probe(engine, suite, seed=0, config={})
    skipped = report["summary"]["modes_skipped"]
    assert set(skipped) == {"mixed", "prefix", "repeat"} and "largest batch size asked for is 1" in skipped["prefix"]
    assert scripted.count == 2  # type: ignore[attr-defined]  # the reference and single's one run: no burst of 2


def test_only_modes_a_server_cannot_run_is_an_input_error(scripted: ThreadingHTTPServer) -> None:
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0)
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("padding", "decode"),
                       batch=BatchPlan(sizes=(1, 2)))
    with pytest.raises(InputError, match="none of the modes asked for can run on this engine: padding: .*decode: "):
        run_probe(engine, suite, seed=0, config={})
    assert scripted.count == 0  # type: ignore[attr-defined]  # not even the references


def _cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``detkit probe ARGS`` through the console entry point: (exit code, stderr)."""
    from detkit.cli import main

    monkeypatch.setattr(sys, "argv", ["detkit", "probe", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0), capsys.readouterr().err


def test_cli_exit_codes_against_a_server(scripted: ThreadingHTTPServer, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{scripted.server_port}/v1"
    scripted.script = lambda count, body: (  # type: ignore[attr-defined]  # the default suite's 2 references pass
        (200, _completion(body)) if count <= 2 else (500, {"error": {"message": "boom"}}))
    # a mode a server cannot run, asked for by name: exit 2 before any request
    code, err = _cli(["--endpoint", url, "--served-model", "m", "--modes", "single,padding"], capsys, monkeypatch)
    assert code == 2 and "--modes padding: a server decides padding itself" in err
    assert scripted.count == 0  # type: ignore[attr-defined]
    # every run after the reference fails: nothing differed, but nothing was decided either
    code, err = _cli(["--endpoint", url, "--served-model", "m", "--modes", "single", "--concurrency", "1,2",
                      "--retries", "0", "--max-new-tokens", "3", "--fail-on-divergence"], capsys, monkeypatch)
    assert code == 2 and "--fail-on-divergence: exit 2: UNDECIDED: 6 run(s) failed, so they prove nothing" in err
    # GET /models answered with an HTTP error (this server has no GET): reached, wrong base URL
    code, err = _cli(["--endpoint", url, "--modes", "single"], capsys, monkeypatch)
    assert code == 2 and "/v1/models answered HTTP 501" in err and "usually ends in /v1" in err
    # the server's HTML error page is quoted on that one line, not printed as 12 (probe.md: one line on stderr)
    assert len(err.strip().splitlines()) == 1 and "Error code: 501" in err


def test_cli_probes_the_chat_api_a_chat_url_names(scripted: ThreadingHTTPServer, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    scripted.script = lambda count, body: (200, _chat_completion(body))  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{scripted.server_port}/v1/chat/completions"
    code, err = _cli(["--endpoint", url, "--served-model", "m", "--modes", "single", "--concurrency", "1,2",
                      "--max-new-tokens", "3", "--fail-on-divergence"], capsys, monkeypatch)
    assert code == 0, err
    assert scripted.paths == {"/v1/chat/completions"}  # type: ignore[attr-defined]
    sent = scripted.count  # type: ignore[attr-defined]
    code, err = _cli(["--endpoint", url, "--served-model", "m", "--no-chat"], capsys, monkeypatch)
    assert code == 2 and "use --chat, or give the server's /v1 base" in err
    assert scripted.count == sent  # type: ignore[attr-defined]  # refused before any request


# ---------------------------------------------------------------- detkit's own server, with logprobs


def test_logprob_probe_of_a_batching_server_under_the_mode_is_invariant(tmp_path: Path) -> None:
    """End to end over HTTP with logprobs: detkit.probe.server batches concurrent requests
    (left padding, one generate call) under detkit.batch_invariant(); every burst must
    give the reference's tokens and bit-identical logprobs."""
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "detkit.probe.server", "--port", str(port), "--batch-invariant", "--window-ms", "200"],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )
    try:
        _wait_until_healthy(port, proc, log, "detkit.probe.server")
        engine = HTTPEngine(f"http://127.0.0.1:{port}/v1", timeout=120, retries=0)
        suite = ProbeSuite(
            name="server", prompts=(Prompt("fox", "The quick brown fox"),), max_new_tokens=6,
            modes=("single", "mixed"), batch=BatchPlan(sizes=(1, 3), mixed_trials=1),
        )
        report = run_probe(engine, suite, seed=0, config={})
        # the chat API: each prompt as one user message in the tokenizer's chat template
        chat = HTTPEngine(f"http://127.0.0.1:{port}/v1", timeout=120, retries=0, api="chat")
        chat_report = run_probe(chat, suite, seed=0, config={})
        for body, message in (
            ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
             "messages must be one user message"),
            ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 5}, "logprobs must be true or false"),
            ({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}, "only decodes greedily"),
        ):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                         data=json.dumps({"temperature": 0, **body}).encode(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(req, timeout=30)
            assert answer.value.code == 400 and message in answer.value.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for r in (report, chat_report):
        assert r["notes"] == []  # logprobs came back: nothing degraded
        for m in r["modes"]:
            assert m["failed_runs"] == 0, m["errors"]
            assert m["token_unit"] == "token" and m["score_kind"] == "logprob"
            assert m["unique_completions"] == 1 and m["divergences"] == []
            assert m["max_abs_logprob_diff"] == 0.0 and m["max_abs_logit_diff"] is None
            assert m["steps_compared"] >= suite.max_new_tokens
    # The server's chat answer is the preset's greedy completion of the templated prompt.
    import detkit
    from detkit.probe.engine import Request
    from detkit.probe.hf import HFEngine, load_model

    local = HFEngine(*load_model("tiny-llama")[:2], mode=detkit.batch_invariant, chat=True)
    expected = local.generate([Request("The quick brown fox")], max_new_tokens=suite.max_new_tokens)[0]
    assert chat_report["references"]["fox"]["text"] == local.tokenizer.decode(expected.tokens)
    assert chat_report["references"]["fox"]["text"] != report["references"]["fox"]["text"]


def test_a_chat_top_logprob_without_its_number_fails_that_run_and_nothing_else(scripted: ThreadingHTTPServer) -> None:
    # a top_logprobs entry whose logprob is null (or missing) once raised TypeError out of the
    # probe: it is a malformed answer, recorded as that run's error like a NaN
    def script(count: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        answer = _chat_completion(body)
        if count == 2:
            answer["choices"][0]["logprobs"]["content"][1]["top_logprobs"][1]["logprob"] = None
        if count == 3:
            del answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["logprob"]
        return 200, answer

    scripted.script = script  # type: ignore[attr-defined]
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0, api="chat")
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",),
                       batch=BatchPlan(sizes=(1, 3)))
    report = run_probe(engine, suite, seed=0, config={})
    (mode,) = report["modes"]
    assert mode["failed_runs"] == 2, mode["errors"]
    assert sorted(e["error"] for e in mode["errors"]) == [
        "the server returned a logprob that is not a number among the candidates of step 0",
        "the server returned a logprob that is not a number among the candidates of step 1",
    ]
    assert report["summary"]["invariant"] is None and not report["summary"]["differences_found"]


def test_chat_candidates_that_decode_to_one_string_keep_the_best_logprob() -> None:
    # vLLM decodes each candidate id to text, so distinct byte tokens all read "\ufffd"; the
    # list comes best first, and a later duplicate must not replace the runner-up's score
    engine = HTTPEngine("http://127.0.0.1:9/v1", "m", api="chat")
    top = [{"token": "a", "logprob": -0.1}, {"token": "\ufffd", "logprob": -2.0}, {"token": "\ufffd", "logprob": -9.0},
           {"token": "b", "logprob": -3.0}]
    answer = {"choices": [{"message": {"role": "assistant", "content": "a"}, "finish_reason": "length",
                           "logprobs": {"content": [{"token": "a", "logprob": -0.1, "top_logprobs": top}]}}]}
    gen = engine._parse(answer)
    assert gen.error is None and gen.scores is not None
    (step,) = gen.scores
    assert [(engine.token_text(i), v) for i, v in zip(step.ids, step.values)] == [("a", -0.1), ("\ufffd", -2.0),
                                                                                   ("b", -3.0)]


def test_a_reasoning_models_chat_text_includes_its_reasoning(scripted: ThreadingHTTPServer) -> None:
    # Reasoning parsers move the thinking out of message.content (vLLM into `reasoning`, formerly
    # `reasoning_content`, as SGLang, llama.cpp and transformers serve still do); content is null
    # until the thinking ends. Reading content alone compared nothing of the thinking: a server
    # without logprobs failed the reference ("generated no tokens"), or passed runs whose
    # thinking differed.
    def script(count: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        thinking = "think it over" if count == 1 else "think it out"
        message = {"role": "assistant", "content": None if count == 1 else "ok", "reasoning_content": thinking}
        return 200, {"choices": [{"message": message, "finish_reason": "length", "logprobs": None}]}

    scripted.script = script  # type: ignore[attr-defined]
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0, api="chat")
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",), batch=BatchPlan(sizes=(2,)))
    report = run_probe(engine, suite, seed=0, config={})
    assert report["references"]["fox"]["text"] == "think it over"
    assert report["modes"][0]["failed_runs"] == 0 and report["summary"]["invariant"] is False
    assert report["modes"][0]["divergences"] and report["summary"]["differences_found"]
    # vLLM's current field; with logprobs the text covers what logprobs.content does
    answer = _chat_completion({"max_tokens": 2})
    answer["choices"][0]["message"].update(content=None, reasoning="t0t1")
    assert HTTPEngine("http://127.0.0.1:9/v1", "m", api="chat")._parse(answer).text == "t0t1"


@pytest.fixture
def detkit_server() -> Iterator[Any]:
    """detkit.probe.server over tiny-llama in this process; yields post(path, body) -> (status, json)."""
    with probe_server("tiny-llama") as post:
        yield post


def test_the_servers_chat_api_takes_max_completion_tokens(detkit_server: Any) -> None:
    # OpenAI's chat field (max_tokens is its deprecated alias); the server ignored it and
    # generated its default 16 tokens
    hi = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    status, answer = detkit_server("/v1/chat/completions", {**hi, "max_completion_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer
    status, answer = detkit_server("/v1/chat/completions", {**hi, "max_completion_tokens": 2, "max_tokens": 5})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
    status, answer = detkit_server("/v1/chat/completions", {**hi, "max_completion_tokens": 0})
    assert status == 400 and "max_completion_tokens must be a positive integer" in answer["error"]["message"]


def test_the_servers_chat_api_refuses_top_logprobs_without_logprobs(detkit_server: Any) -> None:
    # OpenAI and vLLM answer 400 ("when using `top_logprobs`, `logprobs` must be set to true");
    # the server answered 200 with logprobs null, so a client's mistake passed as "no logprobs"
    hi = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 2}
    for extra in ({"top_logprobs": 3}, {"top_logprobs": 3, "logprobs": False}):
        status, answer = detkit_server("/v1/chat/completions", {**hi, **extra})
        assert status == 400 and "logprobs must be true" in answer["error"]["message"], (extra, status, answer)
    status, answer = detkit_server("/v1/chat/completions", {**hi, "top_logprobs": 0})  # 0 asks for nothing
    assert status == 200 and answer["choices"][0]["logprobs"] is None
    status, answer = detkit_server("/v1/chat/completions", {**hi, "top_logprobs": 2, "logprobs": True})
    assert status == 200 and [len(c["top_logprobs"]) for c in answer["choices"][0]["logprobs"]["content"]] == [2, 2]


def test_the_server_answers_requests_that_fit_alone_even_when_their_batch_would_not() -> None:
    """One padded batch generates every row to the longest prompt plus the largest
    max_tokens. A long prompt asking for few tokens and a short one asking for many each
    fit the context (1024) alone; batched they did not, and both got a 400 naming the
    other request's prompt and the CLI's --max-new-tokens."""
    import concurrent.futures

    long_prompt = " ".join(["the"] * 250)  # 999 tokens with tiny-llama's tokenizer
    requests = [{"prompt": long_prompt, "max_tokens": 4, "temperature": 0},
                {"prompt": "hi", "max_tokens": 200, "temperature": 0}]
    with probe_server("tiny-llama", window_ms=2000) as post, concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda body: post("/v1/completions", body), requests))
        assert [status for status, _ in answers] == [200, 200], answers
        assert answers[0][1]["usage"]["completion_tokens"] == 4
        # alone, a request past the context is the client's error, in the request's own terms
        status, answer = post("/v1/completions", {"prompt": long_prompt, "max_tokens": 300, "temperature": 0})
        assert status == 400 and "with max_tokens 300 that is" in answer["error"]["message"], answer
        assert "--max-new-tokens" not in answer["error"]["message"]


def test_a_completion_that_ends_with_eos_at_max_tokens_finishes_with_stop() -> None:
    from detkit.probe.engine import Request
    from detkit.probe.hf import HFEngine, load_model
    from detkit.probe.server import Batcher, _Job

    model, tokenizer, desc = load_model("tiny-llama", dtype="auto", seed=0)
    prompt = "My favourite colour is"
    tokens = HFEngine(model, tokenizer, description=desc).generate([Request(prompt)], max_new_tokens=32)[0].tokens
    # make end-of-text a token generated late, for the first time
    stop = max(i for i, t in enumerate(tokens) if t not in tokens[:i])
    assert stop >= 4
    model.generation_config.eos_token_id = tokens[stop]
    batcher = Batcher(HFEngine(model, tokenizer, description=desc), max_batch=1, window_s=0.0)
    for max_tokens in (stop + 1, stop + 3):  # the same tokens, the last one end-of-text, both times
        job = _Job(prompt, max_tokens=max_tokens)
        batcher._run([job])
        assert job.result is not None and len(job.result["tokens"]) == stop + 1
        assert job.result["finish_reason"] == "stop", max_tokens
    job = _Job(prompt, max_tokens=stop)  # cut before end-of-text
    batcher._run([job])
    assert job.result is not None and job.result["finish_reason"] == "length"


class _CutShort(BaseHTTPRequestHandler):
    """Answers /v1/completions like a server that dies mid-answer on its second request:
    the headers promise the whole body, half of it comes, then the connection closes."""

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.count += 1  # type: ignore[attr-defined]
            count = self.server.count  # type: ignore[attr-defined]
        data = json.dumps(_completion(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if count == 2 else data)
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


def test_a_connection_cut_mid_body_is_retried_and_then_a_failed_run() -> None:
    # http.client raises IncompleteRead (not an OSError) when the body ends early: it escaped
    # the retries and the per-run error handling and stopped the whole probe with a traceback
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _CutShort)
    srv.count, srv.lock = 0, threading.Lock()  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",),
                           batch=BatchPlan(sizes=(1,)))
        url = f"http://127.0.0.1:{srv.server_port}/v1"
        report = run_probe(HTTPEngine(url, "m", timeout=5, retries=1, backoff=0.01), suite, seed=0, config={})
        (mode,) = report["modes"]
        assert mode["failed_runs"] == 0 and mode["retried_runs"] == 1 and report["summary"]["invariant"] is True
        srv.count = 0  # type: ignore[attr-defined]  # its first run is cut again: no retry left
        report = run_probe(HTTPEngine(url, "m", timeout=5, retries=0), suite, seed=0, config={})
        (mode,) = report["modes"]
        assert report["status"] == "complete" and mode["failed_runs"] == 1, mode
        assert mode["errors"][0]["error"].startswith(f"no answer from {url}/completions (IncompleteRead")
    finally:
        srv.shutdown()
        srv.server_close()


def test_ctrl_c_during_a_burst_stops_now_and_keeps_the_finished_runs(scripted: ThreadingHTTPServer,
                                                                      tmp_path: Path) -> None:
    # The burst's requests ran in a thread pool whose shutdown waited for every answer (up to
    # --timeout per attempt, retries included) before Ctrl-C/SIGTERM reached the runner: the
    # report stayed "running" meanwhile (lost to the SIGKILL that follows a SIGTERM), and the
    # process still waited for the pool's threads at exit.
    import signal

    main = threading.main_thread().ident
    assert main is not None
    pressed: list[float] = []

    def ctrl_c() -> None:
        pressed.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGINT)

    answered = threading.Event()  # set once a slow answer has gone out

    def script(count: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if count == 3:  # the burst of 2 is in flight: the user presses Ctrl-C
            threading.Timer(0.3, ctrl_c).start()
        if count >= 3:
            time.sleep(8)
            answered.set()
        return 200, _completion(body)

    scripted.script = script  # type: ignore[attr-defined]
    scripted.daemon_threads = True  # type: ignore[attr-defined]  # closing it does not wait for the slow answers
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=10, retries=0)
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",),
                       batch=BatchPlan(sizes=(1, 2)))
    from detkit.probe.runner import ProbeInterrupted

    with pytest.raises(ProbeInterrupted):
        run_probe(engine, suite, seed=0, config={}, out=tmp_path / "report.json")
    # back before any slow answer came (not a timed bound: this machine may be loaded)
    assert pressed and not answered.is_set()
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["status"] == "partial"
    (mode,) = on_disk["modes"]
    assert mode["complete"] is False and mode["runs"] == 1


@pytest.mark.parametrize("after", ["1", "Sun, 06 Nov 1994 08:49:37 GMT", "soon"])
def test_a_retry_waits_at_least_what_retry_after_asks(scripted: ThreadingHTTPServer, after: str) -> None:
    # A gateway's 429 says when to come back; the 0.5 s, 1 s backoff ignored it and gave up
    # before the gateway would answer. A date in the past or an unreadable value: the
    # backoff alone.
    times: list[float] = []

    def script(count: int, body: dict[str, Any]) -> tuple[Any, ...]:
        times.append(time.monotonic())
        if count == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": after}
        return 200, _completion(body)

    scripted.script = script  # type: ignore[attr-defined]
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=1, backoff=0.01)
    (gen,) = engine.generate([Request("fox")], max_new_tokens=2)
    assert gen.error is None and gen.meta["attempts"] == 2
    if after == "1":  # a lower bound only: sleeping never takes less than asked
        assert times[1] - times[0] >= 0.95, times


def test_an_answer_the_server_aborted_fails_its_run_and_is_no_divergence(scripted: ThreadingHTTPServer) -> None:
    # vLLM ends a request its engine aborts (shutdown, sleep mode, a scale-down) with HTTP 200,
    # the tokens so far and finish_reason "abort"; SGLang does the same. That cut was counted
    # as a divergence: a server problem reported as batch variance (exit 1 under --fail-on-divergence).
    def script(count: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if count != 3:
            return 200, _completion(body)
        answer = _completion({**body, "max_tokens": 2})
        answer["choices"][0]["finish_reason"] = "abort"
        return 200, answer

    scripted.script = script  # type: ignore[attr-defined]
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0)
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",),
                       batch=BatchPlan(sizes=(1, 2)))
    report = run_probe(engine, suite, seed=0, config={})
    (mode,) = report["modes"]
    assert mode["failed_runs"] == 1 and mode["divergences"] == [], mode
    assert "finish_reason 'abort'" in mode["errors"][0]["error"]
    assert report["summary"]["invariant"] is None and not report["summary"]["differences_found"]


def test_llama_cpp_completions_logprobs_in_the_chat_layout_are_read(scripted: ThreadingHTTPServer) -> None:
    # llama.cpp's server answers /v1/completions with logprobs {"content": [{id, token, bytes,
    # logprob, top_logprobs}]}, the chat layout: they were taken for no logprobs at all, the
    # probe compared characters and noted a server "without logprobs"
    def script(count: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        answer = _chat_completion(body)
        choice = answer["choices"][0]
        if count > 2:  # the burst sees another score for the runner-up
            for c in choice["logprobs"]["content"]:
                c["top_logprobs"][1]["logprob"] = -1.75
        text = choice.pop("message")["content"]
        return 200, {"choices": [{**choice, "text": text, "index": 0}], "object": "text_completion"}

    scripted.script = script  # type: ignore[attr-defined]
    engine = HTTPEngine(f"http://127.0.0.1:{scripted.server_port}/v1", "m", timeout=5, retries=0)
    suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",),
                       batch=BatchPlan(sizes=(1, 2)))
    report = run_probe(engine, suite, seed=0, config={})
    assert report["notes"] == [] and scripted.paths == {"/v1/completions"}  # type: ignore[attr-defined]
    (mode,) = report["modes"]
    assert mode["token_unit"] == "token" and mode["score_kind"] == "logprob" and mode["failed_runs"] == 0
    assert mode["max_abs_logprob_diff"] == 0.5 and mode["divergences"] == []


class _Redirecting(BaseHTTPRequestHandler):
    """A proxy in front of a server that moved: POSTs are redirected (301, as an http-to-https
    rule does; 307 as FastAPI's slash redirect does), and a GET there is not allowed."""

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(307 if self.path.startswith("/b/") else 301)
        self.send_header("Location", "/moved/v1/completions")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        data = b'{"detail": "Method Not Allowed"}'
        self.send_response(405)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_redirected_request_names_where_it_was_sent() -> None:
    # urllib follows a 301/302/303 to a POST by sending a GET without the body: the probe
    # reported the target's "HTTP 405 ... Method Not Allowed" for a request it never made
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        suite = ProbeSuite(name="t", prompts=SUITE.prompts, max_new_tokens=4, modes=("single",),
                           batch=BatchPlan(sizes=(1,)))
        for base, code in (("v1", 301), ("b/v1", 307)):
            engine = HTTPEngine(f"http://127.0.0.1:{srv.server_port}/{base}", "m", timeout=5, retries=0)
            with pytest.raises(EndpointError) as err:
                run_probe(engine, suite, seed=0, config={})
            url = f"http://127.0.0.1:{srv.server_port}"
            assert f"HTTP {code} from {url}/{base}/completions: it redirects to {url}/moved/v1/completions; pass the " \
                   "API base it redirects to as --endpoint" in str(err.value)
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(("args", "message"), [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--window-ms", "-1"], "--window-ms must be a finite number >= 0, got -1.0"),
    (["--window-ms", "nan"], "--window-ms must be a finite number >= 0, got nan"),
    (["--port", "99999"], "--port must be from 0 to 65535, got 99999"),
])
def test_the_server_refuses_bad_options_before_loading_the_model(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from detkit.probe.server import main

    # not a ValueError/OverflowError traceback (or, for NaN, a server that never batches)
    with pytest.raises(SystemExit) as exc:
        main(["--model", "/no/such/model", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_port_the_server_cannot_listen_on_is_a_one_line_error() -> None:
    from detkit.probe.server import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit, match=r"error: cannot listen on 127\.0\.0\.1:\d+ \(Address already in use\)"):
            main(["--port", str(taken.getsockname()[1])])
