"""FunctionReward and the RewardBatch invariants."""

import numpy as np
import pytest

from caspo_jax.rewards import FunctionReward, OutcomeReward, RewardBatch, RewardPrompt, prompt_fields
from caspo_jax.data import SafetyRecord


def length_reward(prompt, response):
    if response == "boom":
        raise RuntimeError("cannot score boom")
    if response == "none":
        return None
    if response == "nan":
        return float("nan")
    return len(response) / 10


def test_per_item_scores_and_failures():
    reward = FunctionReward(length_reward)
    assert isinstance(reward, OutcomeReward) and reward.name == "length_reward"
    batch = reward.score(["p"] * 5, ["abcde", "boom", "none", "nan", ""])
    assert batch.ok.tolist() == [True, False, False, False, True]
    assert batch.rewards[0] == pytest.approx(0.5) and batch.rewards[4] == 0.0
    assert np.isnan(batch.rewards[1:4]).all()
    assert "RuntimeError: cannot score boom" in batch.errors[1]
    assert "not a finite number" in batch.errors[2] and "not a finite number" in batch.errors[3]
    assert batch.num_failed == 3 and batch.metrics["reward/mean"] == pytest.approx(0.25)
    assert batch.rewards.dtype == np.float32


def test_batched_function_and_whole_batch_failure():
    batched = FunctionReward(lambda ps, rs: [float(r == "yes") for r in rs], name="yes", batched=True)
    batch = batched.score(["a", "b"], ["yes", "no"])
    assert batch.rewards.tolist() == [1.0, 0.0] and batch.ok.all()

    def broken(ps, rs):
        raise ValueError("service down")

    failed = FunctionReward(broken, batched=True).score(["a", "b"], ["x", "y"])
    assert not failed.ok.any() and all("service down" in e for e in failed.errors)
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        FunctionReward(lambda ps, rs: [1.0], batched=True).score(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        FunctionReward(length_reward).score(["a", "b"], ["x"])


def test_reward_batch_invariants():
    with pytest.raises(ValueError, match="failed item has a numeric reward"):
        RewardBatch(np.array([0.0], np.float32), np.array([False]), ("err",))
    with pytest.raises(ValueError, match="ok item has a NaN"):
        RewardBatch(np.array([np.nan], np.float32), np.array([True]), (None,))


def test_prompt_fields_accepts_records_mappings_and_strings():
    record = SafetyRecord("r", (), "query text", "hate", reference="ref")
    assert prompt_fields(record) == RewardPrompt("query text", (), "hate", "ref", "r")
    assert prompt_fields({"query": "q", "category": "sexual"}).category == "sexual"
    assert prompt_fields("just text").query == "just text"
    with pytest.raises(TypeError, match="no string 'query'"):
        prompt_fields({"prompt": "q"})


def test_build_reward_from_config():
    from caspo_jax.rewards import JudgeReward, build_reward, register_reward_kind, reward_kinds

    fn = build_reward({"kind": "function", "target": "operator:sub"})
    assert isinstance(fn, FunctionReward) and fn.score([5.0], [2.5]).rewards.tolist() == [2.5]
    judge = build_reward({"kind": "judge", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                          "use_reference": False, "max_retries": 1})
    assert isinstance(judge, JudgeReward) and not judge.use_reference
    assert judge.client.config.max_retries == 1
    with pytest.raises(ValueError, match="must not hold API keys"):
        build_reward({"kind": "judge", "base_url": "http://x/v1", "model": "m", "api_key": "sk-1"})
    with pytest.raises(ValueError, match="unknown judge reward fields"):
        build_reward({"kind": "judge", "base_url": "http://x/v1", "model": "m", "temprature": 0})
    with pytest.raises(ValueError, match="reward kind 'rm'"):
        build_reward({"kind": "rm"})
    register_reward_kind("constant", lambda f: FunctionReward(lambda p, r: f["value"], name="constant"))
    assert "constant" in reward_kinds()
    assert build_reward({"kind": "constant", "value": 0.25}).score(["p"], ["r"]).rewards.tolist() == [0.25]
