"""Rollout correction weights (TIS, token / sequence masked IS) against hand-computed values,
and their host metrics (log-prob gap, weight statistics, corrected share)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caspo_jax.step.correction import RolloutCorrection, correction_metrics, correction_weights
from caspo_jax.step.optimizer import StepConfig
from caspo_jax.step.step import step_correction

# Row 0: log-ratios d = 0, -1, +2 (valid), padding. Row 1: d = 0.5, 0.5, padding x2.
# Row 2: d = 1.0, 0.6 (mean 0.8 > log 2 = 0.693), padding x2.
OLD = np.asarray([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, 0.0, 0.0], [-0.5, -0.4, 0.0, 0.0]], np.float32)
ROLLOUT = np.asarray([[-1.0, -1.0, -2.5, 0.0], [-1.5, -1.5, 0.0, 0.0], [-1.5, -1.0, 0.0, 0.0]], np.float32)
MASK = np.asarray([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]], np.float32)
E = math.exp


def weights(mode, threshold=2.0):
    w, c = correction_weights(OLD, ROLLOUT, MASK, RolloutCorrection(mode, threshold))
    return np.asarray(w), np.asarray(c)


def test_none_weighs_every_valid_token_one():
    w, c = weights("none")
    np.testing.assert_array_equal(w, MASK)
    assert not c.any()


def test_tis_caps_the_ratio():
    w, c = weights("tis", 2.0)
    np.testing.assert_allclose(w, [[1, E(-1), 2, 0], [E(0.5), E(0.5), 0, 0], [2, E(0.6), 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(c, [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])


def test_token_masked_is_drops_tokens_outside_the_band():
    # C = 2: keep |d| <= log 2 = 0.693: d = 0, 0.5, 0.5, 0.6 kept with weight e^d; d = -1, +2, +1 dropped
    w, c = weights("mis_token", 2.0)
    np.testing.assert_allclose(w, [[1, 0, 0, 0], [E(0.5), E(0.5), 0, 0], [0, E(0.6), 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(c, [[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    # C = e^2.5 keeps every token at its ratio
    w, c = weights("mis_token", E(2.5))
    np.testing.assert_allclose(w, np.where(MASK > 0, np.exp(OLD - ROLLOUT), 0), rtol=1e-6)
    assert not c.any()


def test_sequence_masked_is_uses_the_mean_log_ratio():
    # row means: (0 - 1 + 2) / 3 = 1/3 (kept, weight e^(1/3) on each token); 0.5 (kept); 0.8 > log 2 (dropped)
    w, c = weights("mis_seq", 2.0)
    np.testing.assert_allclose(w, [[E(1 / 3)] * 3 + [0], [E(0.5), E(0.5), 0, 0], [0, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(c, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    # a sum would have dropped row 0 (sum 1 > log 2); the mean is length-independent
    w, _ = weights("mis_seq", E(0.4))  # log C = 0.4: row 0 (1/3) kept, rows 1 (0.5) and 2 (0.8) dropped
    np.testing.assert_allclose(w[:, :3], [[E(1 / 3)] * 3, [0, 0, 0], [0, 0, 0]], rtol=1e-6)


def test_weights_are_stop_gradient():
    for mode in ("tis", "mis_token", "mis_seq"):
        correction = RolloutCorrection(mode)
        grad = jax.grad(lambda o, c=correction: correction_weights(o, jnp.asarray(ROLLOUT), jnp.asarray(MASK),
                                                                   c)[0].sum())(jnp.asarray(OLD))
        assert np.all(np.asarray(grad) == 0), mode


def test_metrics_gap_weights_and_share():
    m = correction_metrics(OLD, ROLLOUT, MASK, RolloutCorrection("mis_token", 2.0))
    gaps = [0, 1, 2, 0.5, 0.5, 1.0, 0.6]
    assert m["rollout_correction/logp_gap_mean"] == pytest.approx(np.mean(gaps), rel=1e-6)
    assert m["rollout_correction/logp_gap_max"] == pytest.approx(2.0)
    assert m["rollout_correction/weight_mean"] == pytest.approx((1 + 2 * E(0.5) + E(0.6)) / 7, rel=1e-6)
    assert m["rollout_correction/weight_max"] == pytest.approx(E(0.6), rel=1e-6)
    assert m["rollout_correction/corrected_frac"] == pytest.approx(3 / 7)
    none = correction_metrics(OLD, ROLLOUT, MASK, RolloutCorrection())
    assert none["rollout_correction/weight_mean"] == 1.0 and none["rollout_correction/corrected_frac"] == 0.0
    assert none["rollout_correction/logp_gap_max"] == pytest.approx(2.0)


def test_bad_settings_and_the_legacy_tis_cap():
    with pytest.raises(ValueError, match="RolloutCorrection.mode"):
        RolloutCorrection("clip")
    with pytest.raises(ValueError, match="must be > 1"):
        RolloutCorrection("mis_seq", 0.9)
    with pytest.raises(ValueError, match="> 0"):
        RolloutCorrection("tis", 0.0)
    assert step_correction(StepConfig(), None) == RolloutCorrection()
    assert step_correction(StepConfig(tis_cap=3.0), None) == RolloutCorrection("tis", 3.0)
    assert step_correction(StepConfig(tis_cap=3.0), RolloutCorrection("tis", 3.0)) == RolloutCorrection("tis", 3.0)
    with pytest.raises(ValueError, match="conflicts"):
        step_correction(StepConfig(tis_cap=3.0), RolloutCorrection("mis_seq"))
