"""OpenAI-compatible HTTP engine (vLLM, SGLang, ``transformers serve``, llama.cpp server).

A group of requests is sent as one burst of concurrent ``POST /v1/completions`` calls
(``temperature=0``, ``logprobs``, ``max_tokens``) released together by a barrier, so the
server batches the probe prompt with the filler requests; varying the group varies
the batch composition on the server. With ``api="chat"`` (or an endpoint that ends in
``/chat/completions``) each prompt is one user message to ``POST /v1/chat/completions``
(``logprobs=true``, ``top_logprobs``): the server applies the model's chat template, as
it does for chat clients. Only standard fields are sent: strict servers reject unknown
ones.

Scores are the server's log-probabilities (``score_kind == "logprob"``). Token strings
are interned into integer ids (first seen, first numbered) so streams are compared as
ids. A server that returns no logprobs degrades to comparing the completion text
character by character (``token_unit == "character"``), and the report says so.

Timeouts, connection errors, 429 and 5xx answers are retried with exponential backoff
(at least what a ``Retry-After`` header asks, up to the timeout); a request that still
fails is recorded as that run's error, never fatal to the probe.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from detkit.errors import EndpointError, InputError
from detkit.probe.engine import Generation, Request, StepScores

APIS = ("completions", "chat")
_PATHS = {"completions": "completions", "chat": "chat/completions"}
# finish_reason of an answer the server cut short itself (vLLM, SGLang: HTTP 200 with the tokens so far)
_ABORTED = ("abort", "error")


def _no_logprobs_note(path: str) -> str:
    return (f"the server returned no logprobs for /v1/{path}: comparing the completion text "
            "character by character (token_unit 'character'); logit/logprob metrics are null")


NO_LOGPROBS_NOTE = _no_logprobs_note("completions")


def _is_number(value: Any) -> bool:
    """A JSON number (NaN and infinities included; null, strings and booleans are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _chat_text(message: dict[str, Any]) -> str:
    """What a chat answer generated: a reasoning parser's thinking (``reasoning``, formerly
    ``reasoning_content``, which SGLang, llama.cpp and ``transformers serve`` use), then
    ``content`` (null until the thinking ends). The logprobs cover both."""
    thinking = message.get("reasoning")
    if not isinstance(thinking, str):
        thinking = message.get("reasoning_content")
    return (thinking if isinstance(thinking, str) else "") + (message.get("content") or "")


def _server_message(body: bytes) -> str:
    """The error sentence from an OpenAI-style (or FastAPI) error body, else the raw text,
    its whitespace collapsed: it is quoted in one-line errors (an HTML error page has many)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
        elif data.get("detail"):
            text = str(data["detail"])
        elif data.get("message"):
            text = str(data["message"])
    return " ".join(text.split())[:300]


def _retry_after(value: str | None, cap: float) -> float:
    """Seconds a Retry-After header asks for (a number or an HTTP date), at most ``cap``
    (the request timeout: a gateway's long pause is not waited out); 0 if none or unreadable."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return 0.0
    return min(max(seconds, 0.0), cap) if math.isfinite(seconds) else 0.0


class _NoPostRedirect(urllib.request.HTTPRedirectHandler):
    """A POST is not followed where the server redirects it (urllib would send a 301/302/303's
    target a GET without the body): the 3xx comes back as an HTTPError, said as such."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if req.get_method() == "POST":
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_NoPostRedirect)


class HTTPEngine:
    """Probe engine for an OpenAI-compatible server at ``endpoint`` (its ``/v1`` base URL)."""

    name = "http"

    def __init__(
        self,
        endpoint: str,
        served_model: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 0.5,
        top_logprobs: int = 5,
        api: str | None = None,
    ) -> None:
        if api is not None and api not in APIS:
            raise InputError(f"api must be one of {', '.join(APIS)}, got {api!r}")
        parsed = urllib.parse.urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InputError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {endpoint!r}")
        if not 0 < timeout <= threading.TIMEOUT_MAX:  # also NaN and inf, which sockets refuse
            raise InputError(f"--timeout must be > 0 seconds and at most {threading.TIMEOUT_MAX:.0f}, got {timeout}")
        if retries < 0 or backoff < 0:
            raise InputError(f"--retries and the backoff must be >= 0, got {retries} and {backoff}")
        if not 1 <= top_logprobs <= 20:
            raise InputError(f"--top-k (top_logprobs) must be between 1 and 20 for an endpoint (the OpenAI API "
                             f"limit), got {top_logprobs}")
        base = endpoint.rstrip("/")
        named = None  # the API an endpoint's own path names (".../v1/chat/completions")
        for candidate in ("chat", "completions"):
            suffix = "/" + _PATHS[candidate]
            if base.endswith(suffix):
                base, named = base[: -len(suffix)], candidate
                break
        if api is None:
            api = named or "completions"
        elif named is not None and named != api:
            # probing the other API than the URL names would test a path the user never asked about
            flag = "--chat" if named == "chat" else "--no-chat"
            raise InputError(f"--endpoint {endpoint} names /v1/{_PATHS[named]}, but the probe was asked to send "
                             f"/v1/{_PATHS[api]}: use {flag}, or give the server's /v1 base")
        self.base = base
        self.api = api
        self.path = _PATHS[api]
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.top_logprobs = top_logprobs
        self.unsupported_modes = {
            "padding": "a server decides padding itself; the padding mode needs an in-process engine",
            "decode": "OpenAI-compatible servers have no standard teacher-forced scoring call",
        }
        self.notes: list[str] = []
        self.token_unit = "token"
        self._logprobs: bool | None = None  # decided by the first successful answer
        self._vocab: dict[str, int] = {}
        self._strings: list[str] = []
        self._lock = threading.Lock()
        self.served_model = served_model or self._only_model()

    # ----- plumbing -----

    def _open(self, req: urllib.request.Request) -> bytes:
        with _OPENER.open(req, timeout=self.timeout) as resp:
            return resp.read()

    def _only_model(self) -> str:
        """The served model's name from ``GET /models`` when the user did not give one."""
        try:
            body = self._open(urllib.request.Request(f"{self.base}/models"))
        except urllib.error.HTTPError as exc:  # reached, but not an OpenAI-style API root
            raise EndpointError(
                f"{self.base}/models answered HTTP {exc.code} ({_server_message(exc.read())}); is {self.base} the "
                "server's API base (it usually ends in /v1)? Or pass --served-model NAME"
            ) from exc
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
            raise EndpointError(
                f"cannot reach {self.base}/models ({exc}); is the server running, and is the URL its /v1 base?"
            ) from exc
        try:
            names = [m["id"] for m in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise EndpointError(f"{self.base}/models did not list models; pass --served-model NAME") from exc
        if len(names) != 1:
            raise InputError(f"the server lists {len(names)} models ({', '.join(names[:8])}); pick one with --served-model")
        return str(names[0])

    def _post(self, payload: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, int]:
        """POST with retries; returns (answer, error sentence, attempts)."""
        data = json.dumps(payload).encode()
        error = "no attempt made"
        asked = 0.0  # what the last 429/503 asked for in Retry-After, in seconds
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(max(self.backoff * 2 ** (attempt - 1), asked))
                asked = 0.0
            url = f"{self.base}/{self.path}"
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
            try:
                return json.loads(self._open(req)), None, attempt + 1
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} from {url}: {_server_message(exc.read())}"
                if 300 <= exc.code < 400 and exc.headers.get("Location"):
                    target = urllib.parse.urljoin(url, exc.headers["Location"])
                    error = (f"HTTP {exc.code} from {url}: it redirects to {target}; pass the API base it "
                             "redirects to as --endpoint")
                if exc.code != 429 and exc.code < 500:
                    return None, error, attempt + 1  # the request itself is wrong: retrying cannot help
                asked = _retry_after(exc.headers.get("Retry-After"), self.timeout)
            except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
                # HTTPException: the connection closed mid-answer (IncompleteRead), a garbled status line
                reason = getattr(exc, "reason", exc)
                error = f"no answer from {url} ({reason})"
            except ValueError as exc:
                error = f"{url} answered with invalid JSON ({exc})"
        attempts = self.retries + 1
        return None, f"{error} (after {attempts} attempt{'s' if attempts > 1 else ''})", attempts

    def _intern(self, token: str) -> int:
        with self._lock:
            if token not in self._vocab:
                self._vocab[token] = len(self._strings)
                self._strings.append(token)
            return self._vocab[token]

    # ----- parsing -----

    @staticmethod
    def _chat_logprobs(lp: Any) -> dict[str, Any] | None:
        """A chat answer's ``logprobs.content`` ([{token, logprob, top_logprobs: [{token,
        logprob}]}]) in the completions layout (tokens, token_logprobs, top_logprobs)."""
        content = lp.get("content") if isinstance(lp, dict) else None
        if not isinstance(content, list) or not all(isinstance(c, dict) and "token" in c for c in content):
            return None
        tops: list[dict[str, Any] | None] = []
        for c in content:
            top = c.get("top_logprobs")
            if not isinstance(top, list):
                tops.append(None)
                continue
            # Candidates whose text is one string (a server decodes ids to text: distinct byte
            # tokens all read "\ufffd") are one candidate here: keep the first (the list is best
            # first), or a larger score that comes later.
            merged: dict[str, Any] = {}
            for t in top:
                if isinstance(t, dict) and "token" in t:
                    key, value = str(t["token"]), t.get("logprob")
                    if key not in merged or (_is_number(value) and _is_number(merged[key]) and value > merged[key]):
                        merged[key] = value
            tops.append(merged)
        return {"tokens": [c["token"] for c in content], "token_logprobs": [c.get("logprob") for c in content],
                "top_logprobs": tops}

    def _parse(self, answer: dict[str, Any]) -> Generation:
        field = "message.content" if self.api == "chat" else "text"
        try:
            choice = answer["choices"][0]
            text = _chat_text(choice["message"]) if self.api == "chat" else choice.get("text") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            return Generation(tokens=[], error=f"answer without choices[0].{field}: {json.dumps(answer)[:200]}")
        if choice.get("finish_reason") in _ABORTED:
            return Generation(tokens=[], meta={"finish_reason": choice["finish_reason"]},
                              error=f"the server ended this answer with finish_reason {choice['finish_reason']!r}: it "
                                    "stopped generating for its own reasons (see its log), so the answer proves nothing")
        lp = choice.get("logprobs")
        if self.api == "chat" or (isinstance(lp, dict) and "tokens" not in lp and "content" in lp):
            # llama.cpp's server answers /v1/completions in the chat layout too
            lp = self._chat_logprobs(lp)
        has = isinstance(lp, dict) and isinstance(lp.get("tokens"), list) and isinstance(lp.get("token_logprobs"), list)
        with self._lock:
            if self._logprobs is None:
                self._logprobs = has
                if not has:
                    self.token_unit = "character"
                    self.notes.append(_no_logprobs_note(self.path))
            supported = self._logprobs
        meta = {"finish_reason": choice.get("finish_reason")}
        if not supported:
            return Generation(tokens=[ord(c) for c in text], text=text, meta=meta)
        if not has:
            return Generation(tokens=[], error="this answer lacks the logprobs earlier answers had", meta=meta)
        tokens = [self._intern(str(t)) for t in lp["tokens"]]
        chosen = lp["token_logprobs"]
        tops = lp.get("top_logprobs") or [None] * len(tokens)
        steps = []
        for step, (tok, value, top) in enumerate(zip(tokens, chosen, tops)):
            if not _is_number(value):
                return Generation(tokens=[], error="a generated token came without its logprob", meta=meta)
            entries = {tok: float(value)}
            if isinstance(top, dict):
                if not all(_is_number(v) for v in top.values()):
                    return Generation(tokens=[], meta=meta, error="the server returned a logprob that is not a "
                                                                  f"number among the candidates of step {step}")
                for s, v in top.items():
                    entries.setdefault(self._intern(str(s)), float(v))
            if any(math.isnan(v) for v in entries.values()):
                # -inf is a probability of 0; NaN is no number at all: this answer proves nothing.
                return Generation(tokens=[], error=f"the server returned NaN among the logprobs of step {step}",
                                  meta=meta)
            # The generated token leads (greedy took it), then the rest by score.
            ranked = sorted(entries.items(), key=lambda kv: (kv[0] != tok, -kv[1]))
            steps.append(StepScores(ids=[k for k, _ in ranked], values=[v for _, v in ranked]))
        return Generation(tokens=tokens, scores=steps, score_kind="logprob", text=text, meta=meta)

    # ----- Engine -----

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "endpoint": self.base,
            "api": f"/v1/{self.path}",
            "served_model": self.served_model,
            "timeout_s": self.timeout,
            "retries": self.retries,
            "top_logprobs": self.top_logprobs,
            "logprobs_supported": self._logprobs,
            "token_unit": self.token_unit,
        }

    def _one(self, request: Request, max_new_tokens: int, barrier: threading.Barrier | None) -> Generation:
        if request.extra_left_padding:
            raise InputError("an HTTP server cannot be asked for extra left padding")
        payload: dict[str, Any] = {"model": self.served_model, "max_tokens": max_new_tokens, "temperature": 0}
        if self.api == "chat":
            payload.update(messages=[{"role": "user", "content": request.prompt}], logprobs=True,
                           top_logprobs=self.top_logprobs)
        else:
            payload.update(prompt=request.prompt, logprobs=self.top_logprobs)
        if barrier is not None:
            try:
                barrier.wait(timeout=self.timeout)
            except threading.BrokenBarrierError:
                pass  # a sibling failed to start: send anyway, the burst is still concurrent
        start = time.perf_counter()
        answer, error, attempts = self._post(payload)
        if answer is None:
            return Generation(tokens=[], error=error, meta={"attempts": attempts})
        gen = self._parse(answer)
        gen.meta.update({"attempts": attempts, "latency_s": round(time.perf_counter() - start, 4)})
        return gen

    def generate(self, requests: Sequence[Request], *, max_new_tokens: int) -> list[Generation]:
        if not requests:
            return []
        if len(requests) == 1:
            return [self._one(requests[0], max_new_tokens, None)]
        barrier = threading.Barrier(len(requests))
        # Daemon threads, not a thread pool: on Ctrl-C (or SIGTERM) the probe stops now, keeping
        # its finished runs, instead of waiting for the burst's answers (up to --timeout per attempt).
        results: list[Generation | BaseException | None] = [None] * len(requests)

        def send(row: int) -> None:
            try:
                results[row] = self._one(requests[row], max_new_tokens, barrier)
            except BaseException as exc:  # raised below, in the caller's thread
                results[row] = exc

        threads = [threading.Thread(target=send, args=(row,), name=f"detkit-http-{row}", daemon=True)
                   for row in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                # A bounded wait returns to the interpreter, which runs a pending SIGINT's
                # handler: an unbounded join() was not interrupted in every process (in the
                # full test suite it waited for the answers).
                thread.join(0.05)
        gens: list[Generation] = []
        for result in results:
            if not isinstance(result, Generation):
                raise result if isinstance(result, BaseException) else RuntimeError("a request thread returned nothing")
            gens.append(result)
        for row, g in enumerate(gens):
            g.meta.update({"concurrency": len(requests), "row": row})
        return gens

    def teacher_forced(self, prompt: str, tokens: Sequence[int]) -> list[StepScores]:
        raise InputError(self.unsupported_modes["decode"])

    def token_text(self, token: int) -> str:
        if self.token_unit == "character":
            return chr(token)
        with self._lock:
            return self._strings[token] if 0 <= token < len(self._strings) else f"<{token}>"

    def close(self) -> None:
        """Nothing held between calls: each request opens its own connection."""
