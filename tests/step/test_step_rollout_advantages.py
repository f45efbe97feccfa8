"""rollout_advantages: a group whose reward failed is in no population and no metric.

Pure arrays (no model): P = 3 prompts of G = 4 trajectories, T = 6 tokens, prompt 1's
reward failed. With token_scope="batch" (the paper-tokr preset) the token z-score runs
over the whole step, so before the fix the failed group's tokens moved every other
group's r_hat.
"""

import numpy as np
import pytest

from caspo_jax.algo import CaspoConfig
from caspo_jax.step import rollout_advantages

P, G, T = 3, 4, 6
FAILED = 1


def _step(seed: int = 0):
    rng = np.random.default_rng(seed)
    rewards = rng.standard_normal((P, G)).astype(np.float32)
    teacher = rng.normal(-2.0, 1.0, (P * G, T)).astype(np.float32)
    student = rng.normal(-2.0, 1.0, (P * G, T)).astype(np.float32)
    lengths = rng.integers(2, T + 1, P * G)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return rewards, teacher, student, mask


def _rows(p: int) -> slice:
    return slice(p * G, (p + 1) * G)


@pytest.mark.parametrize("variant", ["token", "hybrid"])
def test_a_failed_groups_tokens_do_not_move_other_groups_advantages(variant):
    caspo = CaspoConfig(variant=variant, token_scope="batch", group_size=G, prompts_per_step=P)
    rewards, teacher, student, mask = _step()
    ok = np.ones(P, bool)
    ok[FAILED] = False
    adv, metrics = rollout_advantages(caspo, rewards, teacher, student, mask, ok)
    other_teacher = teacher.copy()
    other_teacher[_rows(FAILED)] += np.random.default_rng(9).normal(0, 3.0, (G, T)).astype(np.float32)
    adv_other, metrics_other = rollout_advantages(caspo, rewards, other_teacher, student, mask, ok)
    np.testing.assert_array_equal(np.asarray(adv_other), np.asarray(adv))
    assert not np.asarray(adv)[_rows(FAILED)].any()
    # the same numbers as a step without the failed prompt at all
    keep = np.r_[0:FAILED * G, (FAILED + 1) * G:P * G]
    alone, alone_metrics = rollout_advantages(caspo.replace(prompts_per_step=P - 1), np.delete(rewards, FAILED, 0),
                                              teacher[keep], student[keep], mask[keep])
    np.testing.assert_allclose(np.asarray(adv)[keep], np.asarray(alone), rtol=1e-6, atol=1e-6)
    for key in ("token_reward_mean", "token_reward_std", "advantage_mean", "advantage_std", "reward_mean"):
        assert float(metrics[key]) == pytest.approx(float(alone_metrics[key]), rel=1e-6, abs=1e-7), key
        assert float(metrics_other[key]) == float(metrics[key]), key
    # the test has teeth: counting the failed group (the old population) moves the others
    adv_all, _ = rollout_advantages(caspo, rewards, teacher, student, mask)
    adv_all_other, _ = rollout_advantages(caspo, rewards, other_teacher, student, mask)
    assert np.abs(np.asarray(adv_all_other)[keep] - np.asarray(adv_all)[keep]).max() > 1e-2


def test_failed_groups_count_in_no_group_metric():
    caspo = CaspoConfig(variant="outcome", group_size=G, prompts_per_step=P)
    rewards = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.5]], np.float32)
    mask = np.ones((P * G, T), np.float32)
    ok = np.array([True, False, True])
    _, metrics = rollout_advantages(caspo, rewards, None, None, mask, ok)
    # of the two scored groups one is constant; the failed (all-0) group is not counted as one
    assert float(metrics["zero_variance_group_frac"]) == 0.5
    assert float(metrics["reward_mean"]) == pytest.approx((4.0 + 2.0) / 8)
    _, everything = rollout_advantages(caspo, rewards, None, None, mask)
    assert float(everything["zero_variance_group_frac"]) == pytest.approx(2 / 3)


def test_every_group_failed_gives_zero_advantages_and_finite_metrics():
    caspo = CaspoConfig(variant="hybrid", token_scope="batch", group_size=G, prompts_per_step=P)
    rewards, teacher, student, mask = _step(1)
    adv, metrics = rollout_advantages(caspo, np.full((P, G), np.nan, np.float32), teacher, student, mask,
                                      np.zeros(P, bool))
    assert not np.asarray(adv).any()
    values = {k: float(v) for k, v in metrics.items()}
    assert all(v == 0.0 for v in values.values()), values


@pytest.mark.parametrize("failed", [False, True])
def test_flip_share_counts_the_tokens_whose_advantage_opposes_the_outcome(failed):
    """adv/flipped_frac (hybrid only) equals a count on the advantages the step trains on:
    valid tokens whose sign is the opposite of their response's R_hat; a failed group is
    in neither the count nor the population."""
    from caspo_jax.algo import group_normalize

    rng = np.random.default_rng(3)
    P, G, T = 3, 4, 6
    rewards = rng.integers(0, 3, (P, G)).astype(np.float32)
    rewards[0] = [0.0, 1.0, 2.0, 0.0]
    teacher, student = rng.normal(size=(2, P * G, T)).astype(np.float32)
    teacher[0, 0] += 8.0  # a token the constitution strongly favours: |r_hat| far above 1/lam
    mask = (rng.random((P * G, T)) < 0.8).astype(np.float32)
    mask[0, 0] = 1.0
    ok = np.array([True, not failed, True])
    cfg = CaspoConfig(lam=1.0)
    adv, metrics = rollout_advantages(cfg, rewards, teacher, student, mask, ok)
    R_hat = np.asarray(group_normalize(np.where(ok[:, None], rewards, 0.0)))
    valid = (mask > 0) & np.repeat(ok, G)[:, None]
    opposite = (np.sign(np.asarray(adv)) * np.repeat(np.sign(R_hat).reshape(-1), T).reshape(P * G, T) < 0) & valid
    assert opposite.sum() > 0
    np.testing.assert_allclose(metrics["adv/flipped_frac"], opposite.sum() / valid.sum(), rtol=1e-6)
    for variant in ("outcome", "token"):
        _, other = rollout_advantages(cfg.replace(variant=variant), rewards, teacher, student, mask, ok)
        assert not any(k.startswith("adv/") for k in other)
