"""ChatClient against the real HTTP stub on 127.0.0.1: retries, Retry-After, timeouts,
temperature fallback, caching, bounded concurrency and that the key never leaks."""

import base64
import dataclasses
import io
import json
import logging
import time

import pytest
from PIL import Image

from caspo_jax.llm import ChatClient, ChatRequest, ClientConfig, image_data_url, user_message
from caspo_jax.llm.client import parse_retry_after
from caspo_jax.tiny.openai_stub import (
    OpenAIStub,
    answer,
    garbage,
    malformed,
    rate_limited,
    reject_temperature,
    request_text,
    server_error,
    slow,
)

SECRET = "sk-test-THIS-MUST-NEVER-LEAK-0123456789"


def make_client(stub, **overrides):
    fields = dict(
        base_url=stub.base_url,
        model="judge-model",
        api_key_env="CASPO_TEST_KEY",
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        timeout_s=5.0,
        max_retries=3,
    )
    fields.update(overrides)
    return ChatClient(ClientConfig(**fields))


def echo(body):
    return "echo: " + request_text(body)


def test_answers_with_text_usage_and_stats():
    with OpenAIStub(default=answer(echo)) as stub:
        client = make_client(stub)
        result = client.complete(ChatRequest([user_message("one two three")]))
    assert result.ok and result.error is None
    assert result.text == "echo: one two three"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 4)
    assert result.attempts == 1 and not result.cached and result.temperature_applied
    body = stub.chat_requests[0].body
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "user", "content": "one two three"}]
    stats = client.stats
    assert (stats.calls, stats.requests, stats.retries, stats.failures) == (1, 1, 0, 0)
    assert (stats.prompt_tokens, stats.completion_tokens) == (3, 4)


@pytest.mark.parametrize(
    "failure", [server_error(500), server_error(503), garbage(), malformed(), rate_limited(0.01)],
    ids=["500", "503", "garbage", "malformed", "429"],
)
def test_transient_failures_are_retried_then_succeed(failure):
    with OpenAIStub(script=[failure, failure], default=answer("fine")) as stub:
        client = make_client(stub)
        result = client.complete(ChatRequest([user_message("q")]))
    assert result.ok and result.text == "fine"
    assert result.attempts == 3
    assert len(stub.chat_requests) == 3
    assert client.stats.retries == 2 and client.stats.failures == 0


def test_rate_limit_honours_retry_after():
    with OpenAIStub(script=[rate_limited(0.4)], default=answer("ok")) as stub:
        client = make_client(stub)
        result = client.complete(ChatRequest([user_message("q")]))
    first, second = stub.chat_requests
    assert result.ok
    # backoff alone would wait <= 0.02s; the server asked for 0.4s
    assert second.received_at - first.received_at >= 0.4


def test_retry_after_parsing():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after({"retry-after": date}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_exhausted_retries_report_failure_not_text():
    with OpenAIStub(default=server_error(500)) as stub:
        client = make_client(stub, max_retries=2)
        result = client.complete(ChatRequest([user_message("q")]))
    assert not result.ok and result.text is None
    assert "500" in result.error and result.status_code == 500
    assert result.attempts == 3 and len(stub.chat_requests) == 3
    assert client.stats.failures == 1 and client.stats.retries == 2


def test_client_errors_are_not_retried():
    with OpenAIStub(default=server_error(404)) as stub:
        client = make_client(stub)
        result = client.complete(ChatRequest([user_message("q")]))
    assert not result.ok and result.attempts == 1 and result.status_code == 404


def test_slow_server_times_out_and_is_retried():
    with OpenAIStub(script=[slow(1.5, answer("late"))], default=answer("fast")) as stub:
        client = make_client(stub, timeout_s=0.3)
        result = client.complete(ChatRequest([user_message("q")]))
    assert result.ok and result.text == "fast" and result.attempts == 2
    with OpenAIStub(default=slow(1.0)) as stub:
        client = make_client(stub, timeout_s=0.2, max_retries=1)
        result = client.complete(ChatRequest([user_message("q")]))
    assert not result.ok and "timed out" in result.error and result.attempts == 2


def test_temperature_rejection_falls_back_and_is_recorded():
    with OpenAIStub(default=reject_temperature(answer("ok"))) as stub:
        client = make_client(stub)
        first = client.complete(ChatRequest([user_message("a")]))
        second = client.complete(ChatRequest([user_message("b")]))
    assert client.temperature_dropped
    assert first.ok and not first.temperature_applied and first.attempts == 2
    assert second.ok and not second.temperature_applied and second.attempts == 1
    bodies = [r.body for r in stub.chat_requests]
    assert "temperature" in bodies[0]
    assert all("temperature" not in b for b in bodies[1:])


def test_json_mode_and_max_tokens_are_sent():
    with OpenAIStub() as stub:
        client = make_client(stub, max_tokens=77)
        client.complete(ChatRequest([user_message("a")], json_mode=True, temperature=0.5))
        client.complete(ChatRequest([user_message("a")], max_tokens=5))
    first, second = (r.body for r in stub.chat_requests)
    assert first["response_format"] == {"type": "json_object"}
    assert first["max_tokens"] == 77 and first["temperature"] == 0.5
    assert second["max_tokens"] == 5 and "response_format" not in second


def test_cache_hits_skip_http_and_respect_namespace(tmp_path):
    with OpenAIStub(default=answer(echo)) as stub:
        client = make_client(stub, cache_dir=str(tmp_path))
        req = ChatRequest([user_message("cached question")], cache_namespace="rse-v1")
        first = client.complete(req)
        second = client.complete(req)
        other_ns = client.complete(dataclasses.replace(req, cache_namespace="rse-v2"))
        # a fresh client (new process) reads the same cache
        third = make_client(stub, cache_dir=str(tmp_path)).complete(req)
    assert first.ok and not first.cached
    assert second.cached and second.text == first.text and second.attempts == 0
    assert second.usage == first.usage
    assert not other_ns.cached
    assert third.cached
    assert len(stub.chat_requests) == 2
    assert client.stats.cache_hits == 1
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2 and all(not p.name.startswith(".tmp") for p in files)
    entry = json.loads(files[0].read_text())
    assert entry["model"] == "judge-model" and entry["text"].startswith("echo: ")


def test_failures_are_never_cached(tmp_path):
    with OpenAIStub(script=[server_error(500)], default=answer("ok")) as stub:
        client = make_client(stub, cache_dir=str(tmp_path), max_retries=0)
        req = ChatRequest([user_message("q")])
        assert not client.complete(req).ok
        assert list(tmp_path.rglob("*.json")) == []
        retried = client.complete(req)
        assert retried.ok and not retried.cached
        assert client.complete(req).cached


def test_api_key_only_in_authorization_header(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CASPO_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    with OpenAIStub(script=[server_error(500), rate_limited(0.01)], default=answer("ok")) as stub:
        client = make_client(stub, cache_dir=str(tmp_path))
        ok = client.complete(ChatRequest([user_message("q")]))
        stub.push(server_error(401))
        failed = client.complete(ChatRequest([user_message("other")]))
    assert ok.ok and not failed.ok
    for request in stub.chat_requests:
        assert request.headers["authorization"] == f"Bearer {SECRET}"
        others = {k: v for k, v in request.headers.items() if k != "authorization"}
        assert SECRET not in json.dumps(others)
        assert SECRET.encode() not in request.raw_body
    surfaces = [
        repr(client.config), str(dataclasses.asdict(client.config)), repr(client),
        repr(ok), repr(failed), caplog.text, str(client.stats),
    ]
    surfaces += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(SECRET in s for s in surfaces)


def test_complete_many_keeps_order_and_bounds_concurrency():
    with OpenAIStub(default=slow(0.15, answer(echo))) as stub:
        client = make_client(stub, max_concurrency=3)
        reqs = [ChatRequest([user_message(f"item {i}")]) for i in range(9)]
        results = client.complete_many(reqs, progress=None)
    assert [r.text for r in results] == [f"echo: item {i}" for i in range(9)]
    assert stub.max_in_flight == 3


def test_image_data_url_and_user_message_roundtrip():
    image = Image.new("RGBA", (5, 3), (10, 20, 30, 255))
    image.putpixel((0, 0), (200, 100, 50, 0))  # fully transparent -> white
    url = image_data_url(image)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.mode == "RGB" and decoded.size == (5, 3)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (10, 20, 30)
    jpeg = image_data_url(image, image_format="jpeg")
    assert jpeg.startswith("data:image/jpeg;base64,")
    message = user_message("what is this?", images=[image])
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image_url", "text"]
    assert message["content"][0]["image_url"]["url"] == url
    assert user_message("plain") == {"role": "user", "content": "plain"}
    big = Image.new("RGB", (1000, 500))
    small_url = user_message("x", images=[big], max_pixels=20_000)["content"][0]["image_url"]["url"]
    small = Image.open(io.BytesIO(base64.b64decode(small_url.split(",", 1)[1])))
    assert small.size == (200, 100)
    assert image_data_url(image, max_pixels=20_000) == url  # small images are untouched


def test_image_data_url_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    decoded = Image.open(io.BytesIO(base64.b64decode(image_data_url(path).split(",", 1)[1])))
    assert decoded.size == (2, 4)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_concurrency"):
        ClientConfig(base_url="http://x/v1", model="m", max_concurrency=0)
    with pytest.raises(ValueError, match="base_url"):
        ClientConfig(base_url="", model="m")
