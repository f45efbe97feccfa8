"""StepConfig validation, the warmup + constant schedule, frozen-vision updates, truncated IS."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from caspo_jax.algo import caspo_loss
from caspo_jax.models.common import weights
from caspo_jax.models.common.checkpoint import ParamSpec
from caspo_jax.step import StepConfig, learning_rate_schedule, make_optimizer, truncated_is_weights


def test_schedule_warms_up_linearly_then_stays_constant():
    schedule = learning_rate_schedule(StepConfig(learning_rate=2e-6, warmup_steps=4))
    got = [float(schedule(i)) for i in (0, 1, 2, 4, 100)]
    np.testing.assert_allclose(got, [0.0, 0.5e-6, 1e-6, 2e-6, 2e-6], rtol=1e-6)
    assert float(learning_rate_schedule(StepConfig(learning_rate=3e-6))(0)) == pytest.approx(3e-6)


def test_frozen_vision_gets_no_update_and_clipping_bounds_the_rest():
    table = [ParamSpec("w", ("text", "w"), (3,), (None,)), ParamSpec("v", ("vision", "v"), (2,), (None,))]
    params = weights.build(table, lambda spec: jnp.ones(spec.shape))
    grads = weights.build(table, lambda spec: jnp.asarray({"w": [30.0, 40.0, 0.0], "v": [5.0, 5.0]}[spec.hf_name]))
    for freeze in (False, True):
        cfg = StepConfig(learning_rate=0.1, freeze_vision=freeze, max_grad_norm=1.0, weight_decay=0.0)
        opt = make_optimizer(cfg)
        updates, _ = opt.update(grads, opt.init(params), params)
        assert np.any(np.asarray(updates.text.w) != 0)
        assert np.all(np.asarray(updates.vision.v) == 0) == freeze
    # clipping alone: the clipped gradient has global norm 1
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="StepConfig.micro_batches"):
        StepConfig(micro_batches=0)
    with pytest.raises(ValueError, match="StepConfig.compute_dtype"):
        StepConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="StepConfig.tis_cap"):
        StepConfig(tis_cap=0.0)
    with pytest.raises(ValueError, match="StepConfig.remat"):
        StepConfig(remat="save_everything")
    assert StepConfig(remat="save_projections").remat == "save_projections"
    for bad in (0.0, -0.7, True):  # greedy rollouts score at 1.0 (caspo_jax.rollout.types.logit_temperature)
        with pytest.raises(ValueError, match="StepConfig.temperature"):
            StepConfig(temperature=bad)


def test_truncated_is_weights_by_hand_and_as_verl_applies_them():
    old = jnp.asarray([[-1.0, -2.0, -0.5, -9.0]])
    rollout = jnp.asarray([[-1.0, -1.0, -2.5, 0.0]])
    mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
    w, ratio = truncated_is_weights(old, rollout, mask, 2.0)
    np.testing.assert_allclose(np.asarray(w), [[1.0, np.exp(-1.0), 2.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ratio)[0, :3], [1.0, np.exp(-1.0), np.exp(2.0)], rtol=1e-6)
    # scaling the advantage by w == verl's per-token pg_loss * w (token-mean, no KL)
    logp = jnp.asarray([[-0.9, -2.3, -0.2, -1.0]])
    adv = jnp.asarray([[1.0, -1.5, 0.7, 2.0]])
    ours, _ = caspo_loss(logp, old, None, adv * w, mask, beta=0.0)
    ratio_new = jnp.exp(logp - old)
    pg = jnp.maximum(-adv * ratio_new, -adv * jnp.clip(ratio_new, 0.8, 1.2)) * w
    expected = jnp.sum(pg * mask) / jnp.sum(mask)
    assert float(ours) == pytest.approx(float(expected), rel=1e-6)
    assert np.all(np.asarray(jax.grad(lambda o: truncated_is_weights(o, rollout, mask, 2.0)[0].sum())(old)) == 0)
