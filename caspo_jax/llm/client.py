"""A chat-completions client for OpenAI-compatible endpoints (OpenAI, vLLM, SGLang, ...).

Why not the `openai` package's own retries: a judge run sends tens of thousands of
requests, and we need (1) every failure reported per item rather than raised, (2)
Retry-After honoured with jitter, (3) accounting of retries, cache hits and tokens, and
(4) the "retry without temperature" fallback for reasoning models. So `openai` is used
as the transport only (`max_retries=0`) and everything else lives here.

The API key is read from the environment variable named in the config at client
construction. The config holds the variable's *name*, never its value, so config dumps,
reprs, logs and cache entries cannot contain it; it travels only in the Authorization
header.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import openai
from tqdm.auto import tqdm

from caspo_jax.llm.cache import ResponseCache, request_hash

__all__ = [
    "ChatClient",
    "ChatRequest",
    "ChatResult",
    "ClientConfig",
    "ClientStats",
    "Usage",
    "is_retriable_status",
]

logger = logging.getLogger(__name__)

# Statuses worth retrying: timeouts, conflicts, rate limits, server errors. Other 4xx
# are the caller's fault and would fail the same way again.
_RETRIABLE_STATUS = {408, 409, 425, 429}


def is_retriable_status(status: int | None) -> bool:
    """Whether a request that ended with HTTP ``status`` may succeed when sent again
    (None: no HTTP status, i.e. a timeout or a connection error, which may)."""
    return status is None or status in _RETRIABLE_STATUS or status >= 500 or status == 200


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Where and how to send chat requests.

    api_key_env: name of the environment variable holding the key. When it is unset the
      placeholder "EMPTY" is sent (what local vLLM/SGLang servers expect).
    max_retries: retries after the first attempt (so at most max_retries + 1 requests).
    backoff_base_s / backoff_max_s: retry k waits uniform(0.5, 1) * min(max, base * 2**k).
    max_retry_after_s: cap on a server's Retry-After (a broken proxy may say "3600").
    temperature: default sampling temperature; None sends none (server default).
    cache_dir: directory of the on-disk response cache; None disables caching.
    progress: False hides every progress bar `complete_many` would draw (`--no-progress`).
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0
    cache_dir: str | None = None
    temperature: float | None = 0.0
    max_tokens: int | None = None
    seed: int | None = None
    progress: bool = True

    def __post_init__(self):
        if not self.base_url:
            raise ValueError("ClientConfig.base_url is empty: set it to e.g. http://host:8000/v1")
        if not self.model:
            raise ValueError("ClientConfig.model is empty: set the served model name")
        if self.max_concurrency < 1:
            raise ValueError(f"ClientConfig.max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"ClientConfig.max_retries must be >= 0, got {self.max_retries}")
        if self.timeout_s <= 0:
            raise ValueError(f"ClientConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("ClientConfig.backoff_base_s and backoff_max_s must be >= 0")


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion to make.

    messages: OpenAI-format messages (see `caspo_jax.llm.messages.user_message`).
    temperature / max_tokens: override the config's defaults when not None.
    json_mode: ask for `response_format={"type": "json_object"}`.
    cache_namespace: part of the cache key, e.g. the rubric version, so a new rubric
      never reuses judgements made under the old one.
    validate: called with the reply text; when it raises, the reply is still returned
      (ok=True: the HTTP call worked, the caller parses and reports it) but is not
      cached, and a cached reply it rejects counts as a miss. Without it a malformed
      judgement would be cached and replayed on every rerun, which could then never
      retry it. Not part of the cache key.
    """

    messages: Sequence[dict[str, Any]]
    temperature: float | None = None
    max_tokens: int | None = None
    json_mode: bool = False
    cache_namespace: str = ""
    validate: Callable[[str], Any] | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclasses.dataclass(frozen=True)
class ChatResult:
    """The outcome of one request. A failure has ok=False, text=None and an error string.

    usage: tokens of the call that produced `text` (for a cache hit: of the original call).
    attempts: HTTP requests made for this result (0 for a cache hit).
    temperature_applied: False when the endpoint rejected `temperature` and the request
      was re-sent without it.
    """

    text: str | None
    ok: bool
    error: str | None
    usage: Usage
    cached: bool
    attempts: int
    temperature_applied: bool
    status_code: int | None = None


@dataclasses.dataclass
class ClientStats:
    """Counters since the client was created (a snapshot is returned by ChatClient.stats)."""

    calls: int = 0  # complete() calls
    requests: int = 0  # HTTP requests sent
    retries: int = 0  # requests that were retries of a failed attempt
    failures: int = 0  # calls that ended with ok=False
    cache_hits: int = 0
    prompt_tokens: int = 0  # tokens actually spent (cache hits add nothing)
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Retriable(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    if headers is None:
        return None
    value_ms = headers.get("retry-after-ms")
    if value_ms:
        try:
            return max(0.0, float(value_ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_completion(raw_text: str) -> tuple[str, Usage]:
    """Text and usage of a chat-completion body; raises _Retriable on anything malformed."""
    try:
        body = json.loads(raw_text)
    except ValueError:
        snippet = raw_text[:80].replace("\n", " ")
        raise _Retriable(f"response body is not JSON: {snippet!r}") from None
    if not isinstance(body, dict):
        raise _Retriable("response body is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Retriable("response has no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        refusal = message.get("refusal") if isinstance(message, dict) else None
        raise _Retriable(f"response has no text content (refusal={refusal!r})")
    usage_body = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    usage = Usage(
        int(usage_body.get("prompt_tokens") or 0), int(usage_body.get("completion_tokens") or 0)
    )
    return content, usage


def _valid(req: ChatRequest, text: str | None) -> bool:
    """Whether ``text`` passes the request's ``validate`` (always, without one)."""
    if req.validate is None:
        return True
    try:
        req.validate(text)
    except Exception:  # any rejection: the caller reports the reason when it parses
        return False
    return True


def _rejects_temperature(error: openai.APIStatusError) -> bool:
    if error.status_code != 400:
        return False
    body = error.body if isinstance(error.body, dict) else {}
    inner = body.get("error", body) if isinstance(body, dict) else {}
    param = inner.get("param") if isinstance(inner, dict) else None
    return param == "temperature" or "temperature" in str(error.message).lower()


class ChatClient:
    """Thread-safe client; `complete` never raises for endpoint failures, it reports them."""

    def __init__(self, config: ClientConfig):
        self.config = config
        api_key = os.environ.get(config.api_key_env) or "EMPTY"
        self._secrets = [api_key] if api_key != "EMPTY" else []
        self._openai = openai.OpenAI(
            base_url=config.base_url,
            api_key=api_key,
            max_retries=0,
            timeout=config.timeout_s,
        )
        self._cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._lock = threading.Lock()
        self._stats = ClientStats()
        self._omit_temperature = False
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.config.base_url!r}, model={self.config.model!r})"

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._openai.close()

    @property
    def temperature_dropped(self) -> bool:
        """True once the endpoint rejected `temperature` and requests are sent without it."""
        return self._omit_temperature

    @property
    def stats(self) -> ClientStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    # -- public API -------------------------------------------------------------------
    def complete(self, req: ChatRequest) -> ChatResult:
        """One completion with retries and caching; failures come back as ok=False."""
        self._count(calls=1)
        temperature = req.temperature if req.temperature is not None else self.config.temperature
        max_tokens = req.max_tokens if req.max_tokens is not None else self.config.max_tokens
        key = request_hash(
            {
                "model": self.config.model,
                "messages": list(req.messages),
                "temperature": temperature,
                "max_tokens": max_tokens,
                "json_mode": req.json_mode,
                "seed": self.config.seed,
            }
        )
        if self._cache is not None:
            entry = self._cache.get(self.config.model, req.cache_namespace, key)
            if entry is not None and isinstance(entry.get("text"), str) and _valid(req, entry["text"]):
                self._count(cache_hits=1)
                usage = entry.get("usage") or {}
                return ChatResult(
                    text=entry["text"],
                    ok=True,
                    error=None,
                    usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
                    cached=True,
                    attempts=0,
                    temperature_applied=bool(entry.get("temperature_applied", True)),
                )
        result = self._complete_uncached(req, temperature, max_tokens)
        if result.ok and self._cache is not None and _valid(req, result.text):
            self._cache.put(
                self.config.model,
                req.cache_namespace,
                key,
                {
                    "text": result.text,
                    "usage": dataclasses.asdict(result.usage),
                    "temperature_applied": result.temperature_applied,
                },
            )
        return result

    def complete_many(
        self, reqs: Sequence[ChatRequest], progress: str | None = "chat"
    ) -> list[ChatResult]:
        """All requests with at most `max_concurrency` in flight; results in input order.

        progress: tqdm bar description, or None for no bar.
        """
        reqs = list(reqs)
        results: list[ChatResult | None] = [None] * len(reqs)
        if not reqs:
            return []
        workers = min(self.config.max_concurrency, len(reqs))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(self.complete, req): i for i, req in enumerate(reqs)}
            hidden = progress is None or not self.config.progress
            with tqdm(total=len(reqs), desc=progress or "", disable=hidden) as bar:
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
        return results  # type: ignore[return-value]

    # -- internals --------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _backoff_s(self, retry_index: int) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * (2**retry_index))
        return cap * (0.5 + 0.5 * self._rng.random())

    def _complete_uncached(
        self, req: ChatRequest, temperature: float | None, max_tokens: int | None
    ) -> ChatResult:
        attempts = 0
        retries = 0
        last_error = "no attempt made"
        last_status: int | None = None
        while True:
            send_temperature = temperature is not None and not self._omit_temperature
            attempts += 1
            try:
                text, usage = self._send_once(req, temperature if send_temperature else None, max_tokens)
                self._count(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
                return ChatResult(
                    text=text,
                    ok=True,
                    error=None,
                    usage=usage,
                    cached=False,
                    attempts=attempts,
                    temperature_applied=send_temperature or temperature is None,
                    status_code=200,
                )
            except openai.APIStatusError as error:
                last_status = error.status_code
                if send_temperature and _rejects_temperature(error):
                    logger.warning(
                        "%s rejected `temperature`; re-sending without it from now on",
                        self.config.base_url,
                    )
                    self._omit_temperature = True
                    continue
                message = self._redact(f"HTTP {error.status_code}: {error.message}")
                if is_retriable_status(error.status_code):
                    failure = _Retriable(message, error.status_code, parse_retry_after(error.response.headers))
                else:
                    failure = _Fatal(message, error.status_code)
            except openai.APITimeoutError:
                failure = _Retriable(f"timed out after {self.config.timeout_s}s")
                last_status = None
            except openai.APIConnectionError as error:
                failure = _Retriable(self._redact(f"connection error: {error}"))
                last_status = None
            except _Retriable as error:
                failure = error
                last_status = 200
            last_error = str(failure)
            if isinstance(failure, _Fatal) or retries >= self.config.max_retries:
                self._count(failures=1)
                logger.warning("chat request failed after %d attempt(s): %s", attempts, last_error)
                return ChatResult(
                    text=None,
                    ok=False,
                    error=last_error,
                    usage=Usage(),
                    cached=False,
                    attempts=attempts,
                    temperature_applied=not self._omit_temperature or temperature is None,
                    status_code=last_status,
                )
            if failure.retry_after is not None:
                wait = min(failure.retry_after, self.config.max_retry_after_s)
                wait += 0.1 * wait * self._rng.random()  # spread a thundering herd
            else:
                wait = self._backoff_s(retries)
            logger.info("retrying in %.2fs after: %s", wait, last_error)
            retries += 1
            self._count(retries=1)
            time.sleep(wait)

    def _send_once(
        self, req: ChatRequest, temperature: float | None, max_tokens: int | None
    ) -> tuple[str, Usage]:
        kwargs: dict[str, Any] = {"model": self.config.model, "messages": list(req.messages)}
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if req.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        if self.config.seed is not None:
            kwargs["seed"] = self.config.seed
        with self._slots:
            self._count(requests=1)
            raw = self._openai.chat.completions.with_raw_response.create(**kwargs)
            body = raw.http_response.text
        return _parse_completion(body)
