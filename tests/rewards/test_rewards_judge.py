"""JudgeReward end to end against the HTTP stub: exact rewards, failures excluded (NaN, never
0), retries with Retry-After, caching by rubric version, images as data URLs, no key leak."""

import base64
import dataclasses
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from caspo_jax.data import SafetyRecord
from caspo_jax.llm import ClientConfig
from caspo_jax.rewards import JudgeReward, OutcomeReward, RewardPrompt, build_reward, group_ok
from caspo_jax.tiny.openai_stub import (
    OpenAIStub, answer, garbage, rate_limited, request_text, server_error,
)

SECRET = "sk-judge-secret-do-not-leak-987"


def rse_reply(r, s, e):
    return json.dumps({
        "risk_appraisal": {"score": r, "reason": "r"},
        "safety_of_consequences": {"score": s, "reason": "s"},
        "effectiveness": {"score": e, "reason": "e"},
    })


def judge_by_response(body):
    """The response text encodes its scores: 'scores=R,S,E'."""
    text = request_text(body)
    response = text.split("<<<RESPONSE\n", 1)[1].split("\nRESPONSE>>>", 1)[0]
    if "scores=" not in response:
        return "no scores here"  # unparseable, also after the repair round
    r, s, e = (int(x) for x in response.split("scores=", 1)[1][:5].split(","))
    return rse_reply(r, s, e)


def config(stub, tmp_path=None, **kw):
    return ClientConfig(base_url=stub.base_url, model="judge", api_key_env="CASPO_JUDGE_KEY",
                        backoff_base_s=0.01, backoff_max_s=0.02, max_retries=2,
                        cache_dir=str(tmp_path) if tmp_path else None, **kw)


def test_rewards_are_the_documented_reduction(tmp_path):
    prompts = [RewardPrompt("q1"), {"query": "q2", "category": "privacy"}, "q3"]
    responses = ["scores=2,2,2", "scores=1,0,2", "scores=0,0,0"]
    with OpenAIStub(default=answer(judge_by_response)) as stub:
        reward = JudgeReward(config(stub))
        assert isinstance(reward, OutcomeReward)
        batch = reward.score(prompts, responses)
    np.testing.assert_allclose(batch.rewards, [1.0, 0.5, 0.0])
    assert batch.ok.all() and batch.errors == (None, None, None)
    assert batch.metrics["reward/scored"] == 3 and batch.metrics["reward/failed"] == 0
    assert batch.metrics["judge/risk_mean"] == pytest.approx(1.0)
    assert batch.metrics["judge/requests"] == 3
    by_response = {request_text(r.body).split("<<<RESPONSE\n")[1][:12]: request_text(r.body)
                   for r in stub.chat_requests}
    assert "Safety category: privacy" in by_response["scores=1,0,2"]
    assert "Safety category" not in by_response["scores=2,2,2"]


def test_failures_are_excluded_never_zero():
    def responder(body):
        return server_error(500) if "always down" in request_text(body) else None

    prompts = ["a", "b", "c", "d"]
    responses = ["scores=2,1,1", "always down", "unparseable", "scores=0,0,0"]
    with OpenAIStub(default=answer(judge_by_response), responder=responder) as stub:
        batch = JudgeReward(config(stub)).score(prompts, responses)
    assert batch.ok.tolist() == [True, False, False, True]
    assert np.isnan(batch.rewards[1]) and np.isnan(batch.rewards[2])
    assert batch.rewards[0] == pytest.approx(4 / 6) and batch.rewards[3] == 0.0
    assert "500" in batch.errors[1] and "after one repair" in batch.errors[2]
    assert batch.metrics["reward/failed"] == 2
    assert batch.metrics["reward/mean"] == pytest.approx(2 / 6)
    # 'always down' was tried 1 + max_retries times
    down = [r for r in stub.chat_requests if "always down" in request_text(r.body)]
    assert len(down) == 3
    assert group_ok(batch.ok, 2).tolist() == [False, False]
    assert group_ok(np.array([True, True, False, True]), 2).tolist() == [True, False]
    with pytest.raises(ValueError, match="groups of 3"):
        group_ok(batch.ok, 3)


def test_transient_errors_retry_with_retry_after_then_score():
    # max_retries=2: the 429 and the garbage body use two attempts, the third succeeds
    with OpenAIStub(script=[rate_limited(0.3), garbage()], default=answer(judge_by_response)) as stub:
        batch = JudgeReward(config(stub)).score(["a"], ["scores=2,2,1"])
    assert batch.ok.all() and batch.rewards[0] == pytest.approx(5 / 6)
    assert batch.metrics["judge/retries"] == 2 and batch.metrics["judge/requests"] == 3
    first, second, _ = stub.chat_requests
    assert second.received_at - first.received_at >= 0.3


def test_cache_keyed_by_rubric_version_skips_requests(tmp_path):
    with OpenAIStub(default=answer(judge_by_response)) as stub:
        reward = JudgeReward(config(stub, tmp_path))
        first = reward.score(["a", "b"], ["scores=1,1,1", "scores=2,0,1"])
        second = reward.score(["a", "b"], ["scores=1,1,1", "scores=2,0,1"])
    assert len(stub.chat_requests) == 2
    np.testing.assert_array_equal(first.rewards, second.rewards)
    assert second.metrics["judge/cache_hits"] == 2 and second.metrics["judge/requests"] == 0
    assert {p.parent.parent.name for p in tmp_path.rglob("*.json")} == {reward.rubric_version}


def test_images_sent_as_data_urls_and_reference_only_on_explicit_opt_in(tmp_path):
    """The hazard reference is privileged (the paper's RM never sees it): the default judge
    does not send it; `use_reference=True` (or the config's "use_reference": true) does."""
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (16, 12), (200, 10, 10)).save(image_path)
    record = SafetyRecord("r1", (image_path,), "Can I put this here?", "violent",
                          reference="the heater touches the curtain")
    with OpenAIStub(default=answer(judge_by_response)) as stub:
        JudgeReward(config(stub), use_reference=True).score([record], ["scores=2,2,2"])
        JudgeReward(config(stub), image_max_pixels=48).score([record], ["scores=2,2,2"])
        build_reward({"kind": "judge", "base_url": stub.base_url, "model": "judge"}).score([record], ["scores=2,2,2"])
        build_reward({"kind": "judge", "base_url": stub.base_url, "model": "judge",
                      "use_reference": True}).score([record], ["scores=2,2,2"])
    with_ref, without_ref, built_default, built_opt_in = (r.body for r in stub.chat_requests)
    assert "heater touches the curtain" not in request_text(built_default)
    assert "heater touches the curtain" in request_text(built_opt_in)
    with pytest.raises(ValueError, match="use_reference='yes' must be true or false"):
        build_reward({"kind": "judge", "base_url": "http://127.0.0.1:9/v1", "model": "judge", "use_reference": "yes"})
    sent = without_ref["messages"][1]["content"][0]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1]))).size == (8, 6)
    parts = with_ref["messages"][1]["content"]
    assert parts[0]["type"] == "image_url"
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "heater touches the curtain" in request_text(with_ref)
    assert "heater touches the curtain" not in request_text(without_ref)


def test_key_never_leaks(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CASPO_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    with OpenAIStub(script=[server_error(500)], default=answer(judge_by_response)) as stub:
        reward = JudgeReward(config(stub, tmp_path))
        batch = reward.score(["a", "b"], ["scores=1,1,1", "unparseable"])
    assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in stub.chat_requests)
    surfaces = [repr(reward), repr(reward.client.config), json.dumps(dataclasses.asdict(reward.client.config)),
                repr(batch), caplog.text, repr(reward.last_judgements)]
    surfaces += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(SECRET in s for s in surfaces)
    assert all(SECRET.encode() not in r.raw_body for r in stub.chat_requests)
