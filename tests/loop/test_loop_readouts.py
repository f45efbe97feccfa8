"""Evaluation readouts: teacher-forced P(warning), decision-token r_t, and their statistics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from caspo_jax.demo.task import warning_token_id
from caspo_jax.loop.caspo import make_reward
from caspo_jax.loop.data import prepare_data, prompt_dataset, with_data_files
from caspo_jax.loop.demo import demo_config
from caspo_jax.loop import evaluate
from caspo_jax.loop.evaluate import (batch_prompts, decision_token_rewards, decode_responses, evaluate_policy,
                                     first_token_logprob)
from caspo_jax.loop.setup import build_policy
from caspo_jax.loop.stats import mean_interval, rank_auc
from caspo_jax.rollout import JaxSampler, SamplingParams


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cfg = demo_config(quick=True)
    files = prepare_data(cfg, tmp_path_factory.mktemp("readouts"))
    cfg = with_data_files(cfg, files)
    policy = build_policy(cfg.model, cfg.data)
    dataset, _ = prompt_dataset(cfg, files, policy.processor, split="eval", num_epochs=1, shuffle=False,
                                batch_size=6)
    return cfg, files, policy, dataset, next(dataset.iterator())


def test_teacher_forced_first_token_probability_equals_the_samplers(demo):
    _, _, policy, _, batch = demo
    sampler = JaxSampler(policy.model, policy.params, eos_token_ids=policy.eos_ids)
    rollouts = sampler.generate(batch_prompts(batch, seeds=np.arange(len(batch.input_ids))), n=4,
                                sampling=SamplingParams(temperature=1.0, max_new_tokens=2))
    first, logp = rollouts.tokens[:, 0], rollouts.logprobs[:, 0]
    for row, prompt in enumerate(rollouts.prompt_index):
        forced = first_token_logprob(policy, batch, int(first[row]))[prompt]
        np.testing.assert_allclose(forced, logp[row], rtol=1e-5, atol=1e-5)
    # the warning token's probability, over the whole vocabulary, is a probability of one token
    p = np.exp(first_token_logprob(policy, batch, warning_token_id(policy.processor.tokenizer)))
    assert np.all((p > 0) & (p < 1))


def test_decision_token_reward_is_the_first_tokens_teacher_minus_student(demo):
    _, _, policy, _, batch = demo
    P = len(batch.input_ids)
    tokens = np.tile(np.array([[7, 9, 11]], np.int32), (P, 1))
    mask = np.ones((P, 3), np.float32)
    mask[0, 1:] = 0  # a one-token response
    r1 = decision_token_rewards(policy, batch, tokens, mask, decision_tokens=1)
    want = first_token_logprob(policy, batch, 7, teacher=True) - first_token_logprob(policy, batch, 7)
    np.testing.assert_allclose(r1, want, rtol=1e-4, atol=1e-5)
    assert np.any(np.abs(want) > 1e-3)  # the constitution moves the random model at all
    # with the teacher prompt equal to the student's, r_t is exactly 0 on every token
    same = dataclasses.replace(batch, teacher_input_ids=batch.input_ids, teacher_attention_mask=batch.attention_mask)
    np.testing.assert_array_equal(decision_token_rewards(policy, same, tokens, mask, decision_tokens=3), 0.0)
    empty = np.zeros_like(mask)
    assert np.isnan(decision_token_rewards(policy, batch, tokens, empty)).all()


def test_evaluate_policy_reports_the_readouts(demo, monkeypatch):
    cfg, _, policy, dataset, _ = demo
    # the random model never says "danger": count a response as a warning by its length's
    # parity instead, so the sampled readout has something to average
    monkeypatch.setattr(evaluate, "is_warning", lambda text: len(text) % 2 == 0)
    metrics = evaluate_policy(policy, dataset, make_reward(cfg.reward), max_new_tokens=4, readout_samples=4)
    sampler = JaxSampler(policy.model, policy.params, eos_token_ids=policy.eos_ids)
    shares, hazard = [], []
    for batch in dataset.iterator():
        draws = sampler.generate(batch_prompts(batch), n=4, sampling=SamplingParams(temperature=1.0, max_new_tokens=4))
        texts = decode_responses(policy.processor.tokenizer, draws.tokens, draws.mask)
        for p in range(len(batch.records)):
            shares.append(np.mean([len(t) % 2 == 0 for t in texts[4 * p:4 * p + 4]]))
            hazard.append(batch.records[p].reference == "hazard")
    shares, hazard = np.array(shares), np.array(hazard)
    assert 0 < shares.mean() < 1
    np.testing.assert_allclose([metrics["p_warning_hazard"], metrics["p_warning_safe"], metrics["warning_auc"]],
                               [shares[hazard].mean(), shares[~hazard].mean(), rank_auc(shares, hazard)])
    for key in ("p_warning_hazard", "p_warning_safe", "warning_auc", "p_first_warning_hazard",
                "p_first_warning_safe", "first_token_auc", "teacher_r_hazard", "teacher_r_safe",
                "teacher_discrimination"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["warning_auc"] <= 1.0
    np.testing.assert_allclose(metrics["teacher_discrimination"],
                               metrics["teacher_r_hazard"] - metrics["teacher_r_safe"])
    plain = evaluate_policy(policy, dataset, make_reward(cfg.reward), max_new_tokens=4, mode="constitution")
    assert "warning_auc" not in plain


def test_rank_auc_hand_values():
    assert rank_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert rank_auc([0.1, 0.9], [True, False]) == 0.0
    # one positive tied with the negative, one above it: (1 + 0.5) / 2
    assert rank_auc([0.5, 0.7, 0.5], [True, True, False]) == 0.75
    assert math.isnan(rank_auc([0.5, 0.7], [True, True]))
    rng = np.random.default_rng(0)
    scores, labels = rng.random(40), rng.random(40) < 0.5
    pairs = [(p > n) + 0.5 * (p == n) for p in scores[labels] for n in scores[~labels]]
    np.testing.assert_allclose(rank_auc(scores, labels), np.mean(pairs))


def test_mean_interval_hand_values_and_coverage():
    iv = mean_interval([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302653; s = 1; half width = 4.302653 / sqrt(3)
    np.testing.assert_allclose([iv.mean, iv.high - iv.mean], [2.0, 4.302653 / math.sqrt(3)], rtol=1e-6)
    assert mean_interval([0.5, 0.5]).low == mean_interval([0.5, 0.5]).high == 0.5
    cut = mean_interval([0.0, 0.0, 1.0], bounds=(0.0, 1.0))  # t interval [-1.101, 1.768], cut to the rate's range
    assert (cut.low, cut.high) == (0.0, 1.0) and abs(cut.mean - 1 / 3) < 1e-12
    assert math.isnan(mean_interval([0.2]).low) and mean_interval([float("nan"), 0.2, None]).n == 1
    # a known distribution: the 95% interval of 8 normal draws covers the true mean ~95% of the time
    rng = np.random.default_rng(1)
    draws = rng.normal(3.0, 2.0, (4000, 8))
    covered = np.mean([iv.low <= 3.0 <= iv.high for iv in map(mean_interval, draws)])
    assert abs(covered - 0.95) < 0.015, covered  # binomial sd of the estimate: 0.0034
