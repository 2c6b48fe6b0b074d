"""A small OpenAI-compatible completions server over a real HF model, with real batching.

    python -m detkit.probe.server --model tiny-llama --port 8000 [--batch-invariant]

Concurrent ``POST /v1/completions`` requests that arrive within ``--window-ms`` of each
other are generated as one padded batch by :class:`~detkit.probe.hf.HFEngine`
(up to ``--max-batch``), the way serving engines batch, and answered with OpenAI-style
``logprobs`` (tokens, token_logprobs, top_logprobs). ``POST /v1/chat/completions``
takes one user message, puts it in the tokenizer's chat template and joins the same
batches; its answers carry chat-style ``logprobs.content``. So ``detkit probe --endpoint``
can be run end to end with logprobs on a machine without vLLM, and with
``--batch-invariant`` the server's batches run under ``detkit.batch_invariant()``.

It is a test and demonstration server (stdlib ``http.server``, one model, greedy
decoding only), not a production one. Also ``GET /v1/models`` and ``GET /health``.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from detkit.errors import ContextTooLong, DetkitError, InputError
from detkit.probe.engine import Request
from detkit.probe.hf import HFEngine, load_model

MAX_LOGPROBS = 20


@dataclass
class _Job:
    prompt: str
    max_tokens: int
    chat: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: str | None = None
    status: int = 500  # of an answer with an error


class Batcher:
    """Collects concurrent jobs into batches and runs them on one thread."""

    def __init__(self, engine: HFEngine, *, max_batch: int, window_s: float) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError("max_batch must be >= 1 and the window >= 0")
        self.engine = engine
        self.max_batch = max_batch
        self.window_s = window_s
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="detkit-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                batch.append(job)
            self._run(batch)

    def _fail(self, batch: list[_Job], error: str, status: int) -> None:
        self.batch_sizes.append(len(batch))
        for j in batch:
            j.error, j.status = error, status
            j.done.set()

    def _run(self, batch: list[_Job]) -> None:
        try:
            gens = self.engine.generate(
                [Request(j.prompt, chat=j.chat) for j in batch], max_new_tokens=max(j.max_tokens for j in batch),
                logsumexp=True,
            )
        except ContextTooLong as exc:
            if len(batch) == 1:
                self._fail(batch, str(exc), 400)
                return
            # One padded batch generates every row to the longest prompt plus the largest
            # max_tokens: requests that each fit alone need not fit together. Run them one
            # at a time, so that each succeeds or fails on its own request.
            for j in batch:
                self._run([j])
            return
        except (DetkitError, ValueError) as exc:
            self._fail(batch, str(exc), 500)
            return
        except Exception as exc:  # a server answers 500 and keeps serving
            self._fail(batch, f"{type(exc).__name__}: {exc}", 500)
            return
        self.batch_sizes.append(len(batch))
        for j, g in zip(batch, gens):
            n = min(j.max_tokens, len(g.tokens))
            tok = self.engine.tokenizer
            strings = [str(s) for s in tok.convert_ids_to_tokens(g.tokens[:n])]
            if g.scores is None or "logsumexp" not in g.meta:
                j.error = "the engine returned no logits"
                j.done.set()
                continue
            lse = g.meta["logsumexp"][:n]
            chosen = [s.values[0] - z for s, z in zip(g.scores[:n], lse)]
            tops = []
            for s, z in zip(g.scores[:n], lse):
                names = tok.convert_ids_to_tokens(s.ids)
                tops.append({str(name): v - z for name, v in zip(names, s.values)})
            j.result = {
                "text": tok.decode(g.tokens[:n]),
                "tokens": strings,
                "token_logprobs": chosen,
                "top_logprobs": tops,
                "batch_size": len(batch),
                # a row that ends with end-of-text stopped, even when that token was its last allowed one
                "finish_reason": "stop" if n < j.max_tokens or g.tokens[n - 1] in self.engine.eos_ids else "length",
            }
            j.done.set()


def make_handler(name: str, batcher: Batcher, timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path.rstrip("/") in ("/health", "/v1/health"):
                self._send(200, {"status": "ok"})
            elif self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "detkit"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            route = self.path.rstrip("/")
            if route not in ("/v1/completions", "/v1/chat/completions"):
                self._error(404, f"no route {self.path}; this server has /v1/completions and /v1/chat/completions")
                return
            chat = route == "/v1/chat/completions"
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            except ValueError:
                self._error(400, "the body is not JSON")
                return
            problem = _validate_chat(body, name, batcher.engine) if chat else _validate(body, name)
            if problem:
                self._error(400, problem)
                return
            prompt = body["messages"][0]["content"] if chat else body["prompt"]
            job = _Job(prompt=prompt, max_tokens=_chat_max_tokens(body) if chat else int(body.get("max_tokens", 16)),
                       chat=chat)
            batcher.submit(job)
            if not job.done.wait(timeout_s):
                self._error(504, f"generation took longer than {timeout_s} s")
                return
            if job.error is not None or job.result is None:
                self._error(job.status, job.error or "no result")
                return
            r = job.result
            if chat:
                self._send(200, _chat_answer(r, f"chatcmpl-{id(job):x}", body, name))
                return
            k = body.get("logprobs")
            logprobs = None
            if k is not None:
                top = [dict(sorted(t.items(), key=lambda kv: -kv[1])[: int(k)]) for t in r["top_logprobs"]]
                logprobs = {"tokens": r["tokens"], "token_logprobs": r["token_logprobs"], "top_logprobs": top}
            self._send(200, {
                "id": f"cmpl-{id(job):x}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "text": r["text"], "logprobs": logprobs, "finish_reason": r["finish_reason"]}],
                "usage": {"completion_tokens": len(r["tokens"])},
                "detkit": {"batch_size": r["batch_size"]},
            })

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def _chat_answer(r: dict[str, Any], answer_id: str, body: dict[str, Any], name: str) -> dict[str, Any]:
    """An OpenAI chat.completion answer for result ``r``; ``logprobs.content`` when asked for."""
    logprobs = None
    if body.get("logprobs"):
        k = int(body.get("top_logprobs") or 0)
        content = []
        for token, value, top in zip(r["tokens"], r["token_logprobs"], r["top_logprobs"]):
            best = sorted(top.items(), key=lambda kv: -kv[1])[:k]
            content.append({"token": token, "logprob": value,
                            "top_logprobs": [{"token": t, "logprob": v} for t, v in best]})
        logprobs = {"content": content}
    return {
        "id": answer_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]}, "logprobs": logprobs,
                     "finish_reason": r["finish_reason"]}],
        "usage": {"completion_tokens": len(r["tokens"])},
        "detkit": {"batch_size": r["batch_size"]},
    }


def _validate_chat(body: Any, name: str, engine: HFEngine) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    messages = body.get("messages")
    if (not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict)
            or messages[0].get("role") != "user" or not isinstance(messages[0].get("content"), str)
            or not messages[0]["content"]):
        return "messages must be one user message with non-empty string content (this test server takes no history)"
    if not getattr(engine.tokenizer, "chat_template", None):
        return f"the tokenizer of {name!r} has no chat template; use /v1/completions"
    if not isinstance(body.get("logprobs", False), bool):
        return "logprobs must be true or false in a chat request"
    k = body.get("top_logprobs")
    if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
        return f"top_logprobs must be an integer between 0 and {MAX_LOGPROBS}"
    if k and not body.get("logprobs"):  # as OpenAI and vLLM refuse it; 0 asks for nothing
        return "when using top_logprobs, logprobs must be true"
    limit = body.get("max_completion_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        return "max_completion_tokens must be a positive integer"
    rest = {key: value for key, value in body.items()
            if key not in ("messages", "logprobs", "top_logprobs", "max_completion_tokens")}
    return _validate({**rest, "prompt": messages[0]["content"]}, name)


def _chat_max_tokens(body: dict[str, Any]) -> int:
    """OpenAI's ``max_completion_tokens``, else its deprecated alias ``max_tokens`` (as vLLM reads them)."""
    limit = body.get("max_completion_tokens")
    return int(limit) if limit is not None else int(body.get("max_tokens", 16))


def _validate(body: Any, name: str) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if body.get("model") not in (None, name):
        return f"this server serves {name!r}, not {body.get('model')!r}"
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return "prompt must be a non-empty string"
    # null is OpenAI's default (1); float() of anything else but a number raised in the
    # handler thread, and the client saw its connection dropped instead of a 400.
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        return f"temperature must be a number, got {temperature!r}; this server only decodes greedily: send 0"
    if temperature != 0.0:
        return "this server only decodes greedily: send temperature 0"
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens must be a positive integer"
    k = body.get("logprobs")
    if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
        return f"logprobs must be an integer between 0 and {MAX_LOGPROBS}"
    return None


def serve(
    model: str = "tiny-llama",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    seed: int = 0,
    batch_invariant: bool = False,
    max_batch: int = 32,
    window_ms: float = 20.0,
    timeout_s: float = 600.0,
) -> tuple[ThreadingHTTPServer, Batcher]:
    """Load ``model`` and return a started-to-be server (call ``serve_forever``) and its batcher."""
    mode = None
    if batch_invariant:
        from detkit.mode import batch_invariant as bi

        mode = bi

    hf_model, tokenizer, desc = load_model(model, dtype=dtype, seed=seed)
    # a too-long request's 400 names the request's own field
    engine = HFEngine(hf_model, tokenizer, description=desc, top_k=MAX_LOGPROBS, mode=mode,
                      new_tokens_option="max_tokens")
    batcher = Batcher(engine, max_batch=max_batch, window_s=window_ms / 1000.0)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(model, batcher, timeout_s))
    except OSError as exc:  # the port is taken, the host is not this machine's
        batcher.stop()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port or --host") from exc
    server.daemon_threads = True
    return server, batcher


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m detkit.probe.server")
    parser.add_argument("--model", default="tiny-llama", help="preset or local HF model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="weights seed of presets")
    parser.add_argument("--batch-invariant", action="store_true", help="run batches under detkit.batch_invariant()")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=20.0, help="how long a batch waits for more requests")
    args = parser.parse_args(argv)
    # before the model loads; argparse's usage error (exit 2) rather than a traceback from the batcher or bind()
    if args.max_batch < 1:
        parser.error(f"--max-batch must be >= 1, got {args.max_batch}")
    if not (math.isfinite(args.window_ms) and args.window_ms >= 0):
        parser.error(f"--window-ms must be a finite number >= 0, got {args.window_ms}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}")
    try:
        server, batcher = serve(
            args.model, host=args.host, port=args.port, dtype=args.dtype, seed=args.seed,
            batch_invariant=args.batch_invariant, max_batch=args.max_batch, window_ms=args.window_ms,
        )
    except DetkitError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"serving {args.model} on http://{args.host}:{server.server_port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        batcher.stop()


if __name__ == "__main__":
    main()
