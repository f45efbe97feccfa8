"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests and demos.

Why a real server instead of mocking the `openai` package: retries, timeouts,
Retry-After handling and "the key only travels in the Authorization header" are
properties of the bytes on the wire, so tests must see real HTTP.

Usage::

    with OpenAIStub(script=[rate_limited(0.2), answer("hi")]) as stub:
        client = ChatClient(ClientConfig(base_url=stub.base_url, model="m"))
        ...
        stub.requests  # every request, headers and parsed body included

Each incoming request consumes the next behaviour of `script`; when the script is
exhausted, `default` answers. `responder`, if given, is called first with the parsed
request and may return a behaviour (or None to fall through to the script), which lets
tests script by content ("fail every request mentioning item 3").
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Behaviour",
    "OpenAIStub",
    "RecordedRequest",
    "answer",
    "garbage",
    "malformed",
    "rate_limited",
    "reject_temperature",
    "server_error",
    "slow",
    "request_text",
]


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it (headers lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    body: dict[str, Any] | None  # parsed JSON, None when the body was not JSON
    received_at: float  # time.monotonic()


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """What the server does with one request.

    kind: "answer" | "slow" | "error" | "garbage" | "malformed" | "reject_temperature".
    """

    kind: str
    text: str | Callable[[dict[str, Any]], str] | None = None
    status: int = 200
    delay_s: float = 0.0
    retry_after: str | None = None
    body: bytes = b""
    then: "Behaviour | None" = None


def answer(text: str | Callable[[dict[str, Any]], str] = "ok") -> Behaviour:
    """A normal completion; `text` may be a callable of the parsed request body."""
    return Behaviour("answer", text=text)


def slow(delay_s: float, then: Behaviour | None = None) -> Behaviour:
    """Sleep `delay_s` seconds, then behave as `then` (default: answer "ok")."""
    return Behaviour("slow", delay_s=delay_s, then=then or answer())


def server_error(status: int = 500, message: str | None = None) -> Behaviour:
    """An HTTP error with an OpenAI-style JSON error body (``message``, default
    "stub error <status>"), e.g. HTTP 400 with vLLM's context-length wording."""
    return Behaviour("error", status=status, text=message)


def rate_limited(retry_after: float | str | None = 1.0) -> Behaviour:
    """HTTP 429 with a `Retry-After` header (seconds, or any string such as an HTTP date)."""
    value = None if retry_after is None else str(retry_after)
    return Behaviour("error", status=429, retry_after=value)


def garbage(body: bytes = b"<html>upstream proxy error</html>") -> Behaviour:
    """HTTP 200 with a body that is not JSON (content-type still says JSON)."""
    return Behaviour("garbage", body=body)


def malformed() -> Behaviour:
    """HTTP 200 with valid JSON that is not a chat completion (no `choices`)."""
    return Behaviour("malformed", body=b'{"object": "chat.completion", "id": "x"}')


def reject_temperature(then: Behaviour | None = None) -> Behaviour:
    """HTTP 400 if the request sets `temperature` (as reasoning models do), else `then`."""
    return Behaviour("reject_temperature", then=then or answer())


def request_text(body: dict[str, Any] | None) -> str:
    """All text parts of all messages of a chat request, joined by newlines."""
    if not body:
        return ""
    parts: list[str] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return "\n".join(parts)


def _error_body(status: int, message: str, param: str | None = None) -> bytes:
    kind = {429: "rate_limit_error", 400: "invalid_request_error"}.get(status, "server_error")
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": None}}
    ).encode()


class OpenAIStub:
    """Threaded HTTP server speaking `POST /v1/chat/completions`; a context manager."""

    def __init__(
        self,
        script: Sequence[Behaviour] = (),
        default: Behaviour | None = None,
        responder: Callable[[dict[str, Any] | None], Behaviour | None] | None = None,
        model: str = "stub-model",
    ):
        self._script = list(script)
        self._default = default or answer()
        self._responder = responder
        self._model = model
        self._lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self.max_in_flight = 0  # most chat requests being answered at the same time

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "OpenAIStub":
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                stub._handle(self)

            def do_GET(self):
                stub._handle(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "use OpenAIStub as a context manager"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *behaviours: Behaviour) -> None:
        """Append behaviours to the script (consumed by the next requests)."""
        with self._lock:
            self._script.extend(behaviours)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- request handling ----------------------------------------------------------------
    def _next_behaviour(self, body: dict[str, Any] | None) -> Behaviour:
        if self._responder is not None:
            chosen = self._responder(body)
            if chosen is not None:
                return chosen
        with self._lock:
            return self._script.pop(0) if self._script else self._default

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = RecordedRequest(
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            raw_body=raw,
            body=body,
            received_at=time.monotonic(),
        )
        with self._lock:
            self.requests.append(record)
        if not handler.path.endswith("/chat/completions"):
            self._send(handler, 404, _error_body(404, f"no route {handler.path}"))
            return
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            self._respond(handler, self._next_behaviour(body), body)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _respond(self, handler, behaviour: Behaviour, body: dict[str, Any] | None) -> None:
        kind = behaviour.kind
        if kind == "slow":
            time.sleep(behaviour.delay_s)
            self._respond(handler, behaviour.then or answer(), body)
        elif kind == "reject_temperature":
            if body is not None and "temperature" in body:
                message = (
                    "Unsupported value: 'temperature' does not support this value with "
                    "this model. Only the default (1) value is supported."
                )
                self._send(handler, 400, _error_body(400, message, param="temperature"))
            else:
                self._respond(handler, behaviour.then or answer(), body)
        elif kind == "error":
            headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else {}
            message = behaviour.text if isinstance(behaviour.text, str) else f"stub error {behaviour.status}"
            self._send(handler, behaviour.status, _error_body(behaviour.status, message), headers)
        elif kind in ("garbage", "malformed"):
            self._send(handler, 200, behaviour.body)
        elif kind == "answer":
            text = behaviour.text(body or {}) if callable(behaviour.text) else behaviour.text
            self._send(handler, 200, self._completion(text or "", body))
        else:
            raise ValueError(f"unknown stub behaviour kind {kind!r}")

    def _completion(self, text: str, body: dict[str, Any] | None) -> bytes:
        prompt_tokens = len(request_text(body).split())
        completion_tokens = len(text.split())
        return json.dumps(
            {
                "id": f"chatcmpl-stub-{len(self.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": (body or {}).get("model", self._model),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        ).encode()

    @staticmethod
    def _send(handler, status: int, payload: bytes, headers: dict[str, str] | None = None):
        try:
            handler.send_response(status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(payload)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(payload)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to tell it
