"""Eqs. 4-5: group normalisation, token rewards, token-signal z-scores, hybrid advantages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from caspo_jax.algo import (
    caspo_advantages,
    group_normalize,
    hybrid_advantages,
    hybrid_factor_flips,
    normalize_token_signal,
    token_rewards,
)

EPS = 1e-6
FEW = settings(max_examples=15, deadline=None)
finite = st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32)


# ---------------------------------------------------------------- group_normalize


def test_group_normalize_hand_computed():
    rewards = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    # group 0: mean 2, sample std 1; group 1: mean 4/3, centred (-4/3, -4/3, 8/3),
    # sample variance (16/9 + 16/9 + 64/9) / 2 = 16/3.
    std1 = np.sqrt(16 / 3)
    want = np.array(
        [[-1 / (1 + EPS), 0.0, 1 / (1 + EPS)], [-4 / 3 / (std1 + EPS), -4 / 3 / (std1 + EPS), 8 / 3 / (std1 + EPS)]]
    )
    np.testing.assert_allclose(group_normalize(rewards), want, rtol=1e-6)
    np.testing.assert_allclose(group_normalize(rewards, scale=False), [[-1, 0, 1], [-4 / 3, -4 / 3, 8 / 3]], rtol=1e-6)


def test_group_normalize_matches_numpy_ddof1():
    rewards = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    want = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + EPS)
    np.testing.assert_allclose(group_normalize(rewards), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 1.0, -3.7, 0.1, 1234.567, 1e6])
def test_equal_rewards_give_exact_zero_and_finite_gradient(value):
    rewards = jnp.full((2, 32), value, jnp.float32)
    out = jax.jit(group_normalize)(rewards)
    assert out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)
    grad = jax.grad(lambda r: jnp.sum(group_normalize(r) * jnp.arange(32.0)))(rewards)
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(group_normalize(rewards, scale=False)) == 0.0)


def test_group_below_eps_std_is_zero_and_others_untouched():
    rewards = jnp.array([[1.0, 1.0 + 1e-7, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    out = group_normalize(rewards)
    assert np.all(np.asarray(out[0]) == 0.0)
    np.testing.assert_allclose(out[1], np.array([-1, 1, -1, 1]) * 0.5 / (np.sqrt(1 / 3) + EPS), rtol=1e-5)


def test_group_of_one_is_a_configuration_error():
    with pytest.raises(ValueError, match="G=1"):
        group_normalize(jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="G=1"):
        jax.jit(group_normalize)(jnp.ones((4, 1)))


@FEW
@given(
    hnp.arrays(np.float32, (3, 8), elements=finite),
    st.floats(0.1, 10),
    st.floats(-100, 100),
)
def test_group_normalize_is_affine_invariant(rewards, a, b):
    assume(np.all(rewards.std(1, ddof=1) > 0.1))
    base = group_normalize(rewards)
    np.testing.assert_allclose(group_normalize(a * rewards + b), base, atol=2e-3)
    np.testing.assert_allclose(group_normalize(-a * rewards + b), -base, atol=2e-3)


def test_group_normalize_bf16_gives_float32():
    rewards = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    out16 = group_normalize(jnp.asarray(rewards, jnp.bfloat16))
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, group_normalize(rewards), atol=3e-2)


# ---------------------------------------------------------------- normalize_token_signal


def test_token_signal_hand_computed_with_mask():
    r = jnp.array([[[1.0, 2.0, 99.0], [3.0, -50.0, 7.0]]])
    mask = jnp.array([[[1, 1, 0], [1, 0, 0]]])
    # valid values 1, 2, 3: mean 2, sample std 1.
    want = np.array([[[-1, 0, 0], [1, 0, 0]]]) / (1 + EPS)
    np.testing.assert_allclose(normalize_token_signal(r, mask), want, rtol=1e-6, atol=1e-7)


def test_token_signal_scope_group_vs_batch():
    r = jnp.array([[[0.0], [2.0]], [[10.0], [12.0]]])
    mask = jnp.ones_like(r)
    group = normalize_token_signal(r, mask, scope="group")
    np.testing.assert_allclose(group[:, :, 0], [[-1, 1], [-1, 1]] / (np.sqrt(2) + EPS), rtol=1e-6)
    values = np.array([0.0, 2.0, 10.0, 12.0])
    want = (values - 6.0) / (np.sqrt(104 / 3) + EPS)
    np.testing.assert_allclose(normalize_token_signal(r, mask, scope="batch").ravel(), want, rtol=1e-6)


def test_token_signal_degenerate_groups_are_exact_zero():
    r = jnp.stack([jnp.full((3, 5), 123.456), jnp.arange(15.0).reshape(3, 5)])
    mask = jnp.ones_like(r).at[1].set(0).at[1, 0, 0].set(1)  # group 1: a single valid token
    out = normalize_token_signal(r, mask)
    assert np.all(np.asarray(out) == 0.0)
    grad = jax.grad(lambda x: jnp.sum(normalize_token_signal(x, mask) ** 2))(r)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("value", [0.1, -7.3, 999.123])
def test_constant_token_signal_over_many_tokens_is_exact_zero(value):
    """The float mean of 8*512 equal values carries a residue; the corrected two-pass
    variance cancels it, so the output is 0, not +-1."""
    r = jnp.full((2, 8, 512), value, jnp.float32)
    for scope in ("group", "batch"):
        assert np.all(np.asarray(jax.jit(normalize_token_signal, static_argnames="scope")(r, r != 0, scope=scope)) == 0.0)


def test_token_signal_absent_positions_change_nothing():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(2, 4, 6)).astype(np.float32)
    mask = rng.random((2, 4, 6)) < 0.7
    garbage = np.where(mask, r, np.nan).astype(np.float32)
    for scope in ("group", "batch"):
        clean = normalize_token_signal(np.where(mask, r, 0.0), mask, scope=scope)
        dirty = normalize_token_signal(garbage, mask, scope=scope)
        np.testing.assert_array_equal(clean, dirty)
        assert np.all(np.asarray(dirty)[~mask] == 0.0)
        grad = jax.grad(lambda x: jnp.sum(normalize_token_signal(x, mask, scope=scope) * 1.7))(garbage)
        assert np.all(np.asarray(grad)[~mask] == 0.0) and np.all(np.isfinite(grad))


def test_token_signal_rejects_unknown_scope():
    with pytest.raises(ValueError, match="scope"):
        normalize_token_signal(jnp.ones((1, 2, 3)), jnp.ones((1, 2, 3)), scope="sequence")


# ---------------------------------------------------------------- token_rewards


def test_token_rewards_hand_computed_and_stop_gradient():
    teacher = jnp.array([[-1.0, -2.0, -0.5]])
    student = jnp.array([[-1.5, -1.0, jnp.nan]])
    mask = jnp.array([[1, 1, 0]])
    np.testing.assert_allclose(token_rewards(teacher, student, mask), [[0.5, -1.0, 0.0]])
    np.testing.assert_allclose(token_rewards(teacher, student, mask, clamp=0.7), [[0.5, -0.7, 0.0]])
    g_t, g_s = jax.grad(lambda t, s: jnp.sum(token_rewards(t, s, mask)), argnums=(0, 1))(teacher, student)
    assert np.all(np.asarray(g_t) == 0.0) and np.all(np.asarray(g_s) == 0.0)
    out16 = token_rewards(teacher.astype(jnp.bfloat16), jnp.zeros((1, 3), jnp.bfloat16), mask)
    assert out16.dtype == jnp.float32


def test_token_rewards_rejects_bad_clamp():
    with pytest.raises(ValueError, match="clamp"):
        token_rewards(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), clamp=0.0)


# ---------------------------------------------------------------- hybrid_advantages

R_HAT = jnp.array([[1.0, -2.0, 0.0]])
R_TOK = jnp.tile(jnp.array([0.5, -1.0]), (1, 3, 1))
ONES = jnp.ones((1, 3, 2))


def test_hybrid_hand_computed():
    out = hybrid_advantages(R_HAT, R_TOK, ONES, lam=0.3)
    # R=1: 1*(1+0.3*0.5)=1.15, 1*(1-0.3)=0.7; R=-2: -2*(1-0.15)=-1.7, -2*(1+0.3)=-2.6; R=0: 0.
    np.testing.assert_allclose(out[0], [[1.15, 0.7], [-1.7, -2.6], [0.0, 0.0]], rtol=1e-6)


def test_outcome_and_token_variants_hand_computed():
    np.testing.assert_allclose(
        hybrid_advantages(R_HAT, R_TOK, ONES, lam=0.3, variant="outcome")[0], [[1, 1], [-2, -2], [0, 0]]
    )
    np.testing.assert_allclose(hybrid_advantages(R_HAT, R_TOK, ONES, lam=0.3, variant="token"), R_TOK)


def test_nonneg_factor_bounds_the_factor_at_zero():
    R = jnp.array([[1.0, -1.0]])
    r = jnp.array([[[-3.0, 0.5]], [[3.0, 0.5]]]).reshape(1, 2, 2)
    mask = jnp.ones((1, 2, 2))
    # factor = 1 + sign(R) * r: R=1 -> (-2, 1.5); R=-1 -> (-2, 0.5).
    np.testing.assert_allclose(hybrid_advantages(R, r, mask, lam=1.0)[0], [[-2.0, 1.5], [2.0, -0.5]])
    np.testing.assert_allclose(
        hybrid_advantages(R, r, mask, lam=1.0, nonneg_factor=True)[0], [[0.0, 1.5], [0.0, -0.5]]
    )


@FEW
@given(
    hnp.arrays(np.float32, (2, 4), elements=finite),
    hnp.arrays(np.float32, (2, 4, 5), elements=finite),
    hnp.arrays(np.bool_, (2, 4, 5)),
    st.floats(0, 2),
)
def test_hybrid_identity_and_lambda_zero(R, r, mask, lam):
    lam = np.float32(lam)
    hyb = hybrid_advantages(R, r, mask, lam=lam)
    want = np.where(mask, R[:, :, None] + lam * np.abs(R)[:, :, None] * r, 0.0)
    np.testing.assert_allclose(hyb, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(
        hybrid_advantages(R, r, mask, lam=0.0), hybrid_advantages(R, r, mask, lam=0.3, variant="outcome")
    )


def test_hybrid_masked_positions_are_zero_even_with_nan():
    r = R_TOK.at[0, 1, 1].set(jnp.nan)
    mask = ONES.at[0, 1, 1].set(0)
    out = hybrid_advantages(R_HAT, r, mask, lam=0.3)
    assert out[0, 1, 1] == 0.0 and np.all(np.isfinite(out))


def test_hybrid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        hybrid_advantages(R_HAT, R_TOK, ONES, lam=0.3, variant="mixed")
    with pytest.raises(ValueError, match="lam"):
        hybrid_advantages(R_HAT, R_TOK, ONES, lam=-0.1)


# ---------------------------------------------------------------- caspo_advantages


def _random_batch(P=3, G=4, T=7, seed=0):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(P, G)).astype(np.float32)
    student = -rng.gamma(2.0, size=(P * G, T)).astype(np.float32)
    teacher = (student + rng.normal(scale=0.3, size=(P * G, T))).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=P * G)
    mask = np.arange(T)[None, :] < lengths[:, None]
    return rewards, teacher, student, mask


@pytest.mark.parametrize("variant,scope", [("hybrid", "group"), ("token", "batch"), ("outcome", "group")])
def test_caspo_advantages_composes_the_pieces(variant, scope):
    rewards, teacher, student, mask = _random_batch()
    P, G = rewards.shape
    T = mask.shape[1]
    adv, metrics = caspo_advantages(rewards, teacher, student, mask, lam=0.3, variant=variant, token_scope=scope)
    r = np.where(mask, teacher - student, 0.0)
    R_hat = group_normalize(rewards)
    r_hat = normalize_token_signal(r.reshape(P, G, T), mask.reshape(P, G, T), scope=scope)
    want = hybrid_advantages(R_hat, r_hat, mask.reshape(P, G, T), lam=0.3, variant=variant).reshape(P * G, T)
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["token_reward_mean"], 0.0 if variant == "outcome" else r[mask].mean(), atol=1e-6)


def test_caspo_advantages_jit_matches_eager_and_ignores_absent_garbage():
    rewards, teacher, student, mask = _random_batch(seed=3)
    fn = functools.partial(caspo_advantages, lam=0.3)
    eager, _ = fn(rewards, teacher, student, mask)
    jitted, _ = jax.jit(fn)(rewards, teacher, student, mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    dirty_t = np.where(mask, teacher, np.inf).astype(np.float32)
    dirty_s = np.where(mask, student, np.nan).astype(np.float32)
    dirty, _ = jax.jit(fn)(rewards, dirty_t, dirty_s, mask)
    np.testing.assert_array_equal(dirty, jitted)
    assert np.all(np.asarray(dirty)[~mask] == 0.0)


def test_caspo_advantages_bf16_inputs_close_to_float32():
    rewards, teacher, student, mask = _random_batch(seed=4)
    full, _ = caspo_advantages(rewards, teacher, student, mask, lam=0.3)
    half, _ = caspo_advantages(
        jnp.asarray(rewards, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16), jnp.asarray(student, jnp.bfloat16),
        mask, lam=0.3,
    )
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=0.1)


def test_caspo_advantages_input_errors():
    rewards, teacher, student, mask = _random_batch()
    with pytest.raises(ValueError, match="rows"):
        caspo_advantages(rewards[:2], teacher, student, mask, lam=0.3)
    with pytest.raises(ValueError, match="teacher"):
        caspo_advantages(rewards, None, None, mask, lam=0.3)
    adv, _ = caspo_advantages(rewards, None, None, mask, lam=0.3, variant="outcome")
    assert adv.shape == mask.shape


# ---------------------------------------------------------------- sign flips of eq. 5's factor


def test_hybrid_factor_flips_hand_count():
    # lam = 0.5, so the factor 1 + lam * sign(R_hat) * r_hat < 0 where sign * r_hat < -2.
    R_hat = jnp.array([[1.0, -2.0, 0.0]])
    r_hat = jnp.array([[[-3.0, -1.0, 0.5, -2.5],   # R_hat > 0: token 0 flips (token 3 is masked)
                        [3.0, 2.5, 1.0, -4.0],     # R_hat < 0: tokens 0 and 1 flip
                        [5.0, -5.0, 0.0, 0.0]]])   # R_hat = 0: no sign, nothing flips
    mask = jnp.array([[[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]])
    stats = hybrid_factor_flips(R_hat, r_hat, mask, lam=0.5)
    on_flips = np.array([-3.0, 3.0, 2.5])
    np.testing.assert_allclose(stats["adv/flipped_frac"], 3 / 11, rtol=1e-6)
    np.testing.assert_allclose(stats["adv/flipped_r_hat_mean"], on_flips.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["adv/flipped_r_hat_std"], on_flips.std(), rtol=1e-6)
    np.testing.assert_allclose(stats["adv/flipped_in_low_reward_frac"], 2 / 3, rtol=1e-6)
    # the flipped tokens are exactly those whose hybrid advantage has the outcome's opposite sign
    adv = hybrid_advantages(R_hat, r_hat, mask, lam=0.5)
    opposite = (np.sign(np.asarray(adv)) * np.sign(np.asarray(R_hat))[:, :, None] < 0) & (np.asarray(mask) > 0)
    assert opposite.sum() == 3
    nothing = hybrid_factor_flips(R_hat, r_hat, mask, lam=0.1)  # 1/lam = 10: no token passes it
    assert all(float(v) == 0.0 for v in nothing.values())
