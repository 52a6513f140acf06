"""The judges: a local mlx-lm model or an OpenAI-compatible HTTP endpoint, both `Judge`s
(sami_mlx.evaluation.judge), and `make_judge`, which builds one from the command line's flags."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import random
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from sami_mlx.errors import SamiError
from sami_mlx.evaluation.judge import DEFAULT_JUDGE_MAX_TOKENS, JudgeFatal, JudgeReply, Progress

MAX_RETRY_AFTER = 60.0


class LocalJudge:
    """An mlx-lm model (hub id or directory) that judges greedily, batched, loaded on first use."""

    kind = "local"

    def __init__(
        self,
        model: str,
        max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS,
        chat_template: bool | None = None,
        batch_size: int = 8,
        trust_remote_code: bool = False,
    ):
        self.model_name, self.max_tokens, self.chat_template = model, max_tokens, chat_template
        self.batch_size, self.trust_remote_code = batch_size, trust_remote_code
        self._loaded: tuple[Any, Any] | None = None  # (model, tokenizer), loaded on first use

    def describe(self) -> dict:
        return {"kind": self.kind, "model": self.model_name, "max_tokens": self.max_tokens}

    def __call__(self, prompts: Sequence[str], on_progress: Progress | None = None) -> list[JudgeReply]:
        from sami_mlx.inputs.prompts import encode_prompt
        from sami_mlx.loop.rollout import generate_batch
        from sami_mlx.model import load_model

        if self._loaded is None:
            model, tokenizer, _ = load_model(self.model_name, self.trust_remote_code)
            self._loaded = model, tokenizer
        model, tokenizer = self._loaded
        use_chat = bool(getattr(tokenizer, "chat_template", None)) if self.chat_template is None else self.chat_template
        ids = [encode_prompt(tokenizer, p, use_chat) for p in prompts]
        gens = generate_batch(
            model, tokenizer, ids, self.max_tokens, temperature=0.0, batch_size=self.batch_size, on_progress=on_progress
        )
        return [JudgeReply(g.text) for g in gens]

    def close(self) -> None:
        """Free the judge model's memory."""
        self._loaded = None

    def check(self) -> None:
        """The model directory was found when the judge was made; nothing more to check early."""


class HTTPJudge:
    """An OpenAI-compatible chat-completions endpoint, asked concurrently with retries.

    The API key is read from the environment variable `api_key_env` when the judge is built and
    is kept only in memory: it goes into the Authorization header and nowhere else.
    """

    kind = "http"

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 4,
        max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS,
        temperature: float = 0.0,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ):
        if not model:
            raise SamiError("--judge-model is required with --judge-url: the model name the endpoint serves")
        self.endpoint = chat_completions_url(url)
        self.model, self.api_key_env = model, api_key_env
        self.concurrency, self.timeout, self.retries = max(1, concurrency), timeout, max(0, retries)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.backoff, self.max_backoff = backoff, max_backoff
        self.__key = _read_key(api_key_env)
        self._params = {"max_tokens": max_tokens, "temperature": temperature}
        self._opener = _opener_for(self.endpoint)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.successes = 0
        self.requests = 0

    def describe(self) -> dict:
        # The variable's name, never its value.
        return {
            "kind": self.kind,
            "url": self.endpoint,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "max_tokens": self.max_tokens,
        }

    def __call__(self, prompts: Sequence[str], on_progress: Progress | None = None) -> list[JudgeReply]:
        replies: list[JudgeReply | None] = [None] * len(prompts)
        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
        try:
            pending = {pool.submit(self.ask, p): i for i, p in enumerate(prompts)}
            done_count = 0
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    replies[i] = fut.result()  # a JudgeFatal stops everything here
                    done_count += 1
                if on_progress:
                    on_progress(done_count, len(prompts))
        except BaseException:
            self._stop.set()  # requests in flight end at their timeout; none start or retry
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return [r if r is not None else JudgeReply("", "not asked") for r in replies]

    def close(self) -> None:
        pass

    def check(self) -> None:
        """Fail fast, before any generation, when nothing listens at the endpoint's host and port."""
        parts = urllib.parse.urlsplit(self.endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme in urllib.request.getproxies() and not _is_loopback(parts.hostname or ""):
            return  # reached through a proxy: a direct connection says nothing
        try:
            socket.create_connection((parts.hostname, port), timeout=min(self.timeout, 10.0)).close()
        except OSError as e:
            raise SamiError(
                f"--judge-url {self.endpoint}: cannot connect ({_reason(e)}); is the server running and the URL right?"
            ) from None

    def ask(self, prompt: str) -> JudgeReply:
        """One request with retries on timeouts, connection errors, malformed bodies, 429 and 5xx."""
        error, attempt = "no attempt made", 0
        while not self._stop.is_set():
            wait_for = None
            try:
                status, headers, payload = self._post(prompt)
            except (OSError, http.client.HTTPException) as e:  # timeouts and URLError are OSErrors
                error = f"request failed ({self._redact(_reason(e))})"
            else:
                if status == 200:
                    text = _completion_text(payload)
                    if text is not None:
                        with self._lock:
                            self.successes += 1
                        return JudgeReply(self._redact(text))
                    error = f"malformed response body ({self._redact(payload[:120].decode('utf-8', 'replace'))!r})"
                elif status == 429 or status >= 500:
                    error = f"HTTP {status}"
                    wait_for = _retry_after(headers)
                elif status == 400 and self._adapt(payload):
                    continue  # resent at once without the parameter the endpoint refused
                else:
                    raise JudgeFatal(self._fatal_message(status, payload))
            if attempt >= self.retries:
                break
            delay = min(self.backoff * 2**attempt, self.max_backoff) * (0.5 + random.random() / 2)
            self._stop.wait(max(delay, wait_for or 0.0))
            attempt += 1
        else:
            return JudgeReply("", "stopped")
        with self._lock:
            nothing_worked = self.successes == 0
        if nothing_worked:
            raise JudgeFatal(
                f"--judge-url {self.endpoint}: {error} after {attempt + 1} attempt(s) and no "
                "request has succeeded; check the URL, the server and --judge-timeout"
            )
        return JudgeReply("", error)

    def _post(self, prompt: str) -> tuple[int, dict, bytes]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], **self._params}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as e:
            try:
                payload = e.read()
            except (OSError, http.client.HTTPException):
                payload = b""
            return e.code, dict(e.headers.items()) if e.headers else {}, payload

    def _adapt(self, payload: bytes) -> bool:
        """Some endpoints refuse max_tokens (wanting max_completion_tokens) or a temperature."""
        message = _error_message(payload).lower()
        with self._lock:
            if "max_tokens" in self._params and "max_tokens" in message:
                self._params["max_completion_tokens"] = self._params.pop("max_tokens")
                return True
            if "temperature" in self._params and "temperature" in message:
                self._params.pop("temperature")
                return True
        return False

    def _fatal_message(self, status: int, payload: bytes) -> str:
        detail = self._redact(_error_message(payload))[:200]
        where = f"--judge-url {self.endpoint}: HTTP {status}" + (f" ({detail})" if detail else "")
        if status in (401, 403):
            hint = (
                f"check the key in ${self.api_key_env}"
                if self.api_key_env
                else "pass --judge-api-key-env VAR with the key in that environment variable"
            )
            return f"{where}; the endpoint refused the request: {hint}"
        if status == 404:
            return f"{where}; check the URL (the base URL, e.g. http://host:8080/v1) and --judge-model {self.model}"
        return f"{where}; the endpoint rejected the request"

    def _redact(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text


def chat_completions_url(url: str) -> str:
    """The chat-completions URL from a base URL ('http://host:8080/v1') or the full URL."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SamiError(f"--judge-url {url}: use an http:// or https:// URL such as http://localhost:8080/v1")
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path = (path or "/v1") + "/chat/completions"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, parsed.query, ""))


def _read_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise SamiError(
            f"--judge-api-key-env {env_name}: the environment variable {env_name} is not set; "
            f"export {env_name}=<key> (the key is read from there and never written)"
        )
    return key


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    """Loopback endpoints bypass any configured HTTP proxy; others use the environment's settings."""
    loopback = _is_loopback(urllib.parse.urlsplit(url).hostname or "")
    return urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else urllib.request.build_opener()


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _completion_text(payload: bytes) -> str | None:
    """choices[0].message.content (or a legacy completion's text); None if the body is not that."""
    try:
        data = json.loads(payload)
        choice = data["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(choice, dict):
        return None
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else None


def _error_message(payload: bytes) -> str:
    try:
        data = json.loads(payload)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", "") if isinstance(err, dict) else str(err)
        return " ".join(str(msg).split())
    except (ValueError, AttributeError):
        return " ".join(payload[:200].decode("utf-8", "replace").split())


def _retry_after(headers: dict) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER) if value is not None else None
    except ValueError:
        return None


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}".splitlines()[0][:160]


def make_judge(judge: str | None, url: str | None, model: str | None, **options) -> LocalJudge | HTTPJudge:
    """A local judge from a model name, or an HTTP judge from a URL (`--judge http://...` also works)."""
    if judge and judge.startswith(("http://", "https://")) and not url:
        url, judge = judge, None
    if url and judge:
        raise SamiError(
            "--judge and --judge-url both given; use --judge MODEL for a local judge or "
            "--judge-url URL --judge-model NAME for an HTTP one"
        )
    if url:
        http_keys = ("api_key_env", "concurrency", "timeout", "retries", "max_tokens", "temperature", "backoff")
        return HTTPJudge(url, model or "", **{k: v for k, v in options.items() if k in http_keys})
    if not judge:
        raise SamiError("no judge: pass --judge MODEL (a local mlx-lm model) or --judge-url URL --judge-model NAME")
    from sami_mlx.model import resolve_model_path

    try:
        resolve_model_path(judge)  # a missing directory or hub id fails now, not after generation
    except SamiError as e:
        raise SamiError(str(e).replace("--model", "--judge", 1)) from None
    keys = ("max_tokens", "chat_template", "batch_size", "trust_remote_code")
    return LocalJudge(judge, **{k: v for k, v in options.items() if k in keys})
