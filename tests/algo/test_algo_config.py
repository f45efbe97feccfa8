"""CaspoConfig: the paper preset, validation that names the field, and use with the maths."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from caspo_jax.algo import PAPER, PRESETS, CaspoConfig, caspo_advantages, caspo_loss


def test_paper_preset_has_the_papers_values():
    cfg = CaspoConfig.preset("paper")
    assert cfg is PAPER
    assert (cfg.lam, cfg.beta, cfg.kl_kind, cfg.clip_low, cfg.clip_high) == (0.3, 0.005, "k3", 0.2, 0.2)
    assert (cfg.group_size, cfg.prompts_per_step, cfg.learning_rate) == (32, 64, 2e-6)
    assert (cfg.variant, cfg.teacher) == ("hybrid", "rollout_policy")
    assert PRESETS["paper-outr"].variant == "outcome" and PRESETS["paper-tokr"].variant == "token"


def test_config_is_frozen_plain_fields():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAPER.lam = 0.5
    for field in dataclasses.fields(CaspoConfig):
        assert isinstance(getattr(PAPER, field.name), (str, int, float, bool, type(None)))


@pytest.mark.parametrize(
    "field,value",
    [
        ("lam", -0.1),
        ("group_size", 1),
        ("clip_low", 0.0),
        ("clip_high", -0.2),
        ("variant", "mixed"),
        ("agg", "sum"),
        ("kl_kind", "k4"),
        ("token_scope", "sequence"),
        ("teacher", "gpt"),
        ("beta", -0.005),
        ("eps", 0.0),
        ("dual_clip", 1.0),
        ("norm_len", 0),
        ("prompts_per_step", 0),
        ("learning_rate", "2e-6"),
        ("token_reward_clamp", 0.0),
        ("scale_rewards", "yes"),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"CaspoConfig\.{field}="):
        CaspoConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"CaspoConfig\.{field}="):
        PAPER.replace(**{field: value})


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="paper"):
        CaspoConfig.preset("nope")


def test_paper_scale_step_shapes_at_zero_memory():
    """The full paper step (P=64, G=32, T=1024) traces with the config's kwargs."""
    cfg = PAPER
    P, G, T = cfg.prompts_per_step, cfg.group_size, 1024
    f32 = jax.ShapeDtypeStruct

    def step(rewards, teacher, logp, old, ref, mask):
        adv, _ = caspo_advantages(rewards, teacher, old, mask, **cfg.advantage_kwargs())
        return jax.value_and_grad(caspo_loss, has_aux=True)(logp, old, ref, adv, mask, **cfg.loss_kwargs())

    bt = f32((P * G, T), jnp.bfloat16)
    (loss, metrics), grad = jax.eval_shape(step, f32((P, G), jnp.float32), bt, bt, bt, bt, f32((P * G, T), jnp.bool_))
    assert loss.shape == () and loss.dtype == jnp.float32
    assert grad.shape == (P * G, T) and grad.dtype == jnp.bfloat16
    assert all(m.shape == () for m in metrics.values())
