"""Eq. 6 as a loss: aggregation modes, PPO clipping, dual clip, KL term, masking, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from caspo_jax.algo import AGG_MODES, KL_KINDS, aggregate, caspo_loss, clipped_surrogate, kl_penalty, policy_loss

FEW = settings(max_examples=15, deadline=None)


# ---------------------------------------------------------------- aggregate

LOSS = jnp.array([[1.0, 2.0, 3.0], [4.0, jnp.nan, 9.0], [5.0, 6.0, 7.0]])
MASK = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2: an absent (padding) row


@pytest.mark.parametrize(
    "agg,norm_len,want",
    [
        ("token-mean", None, 10 / 4),
        ("seq-mean-token-mean", None, (2 + 4) / 2),
        ("seq-mean-token-sum", None, (6 + 4) / 2),
        ("seq-mean-token-sum-norm", None, 10 / (2 * 3)),
        ("seq-mean-token-sum-norm", 5, 10 / (2 * 5)),
    ],
)
def test_aggregate_hand_computed(agg, norm_len, want):
    np.testing.assert_allclose(aggregate(LOSS, MASK, agg=agg, norm_len=norm_len), want, rtol=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_of_nothing_is_zero(agg):
    assert aggregate(LOSS, jnp.zeros((3, 3)), agg=agg) == 0.0


def test_aggregate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="agg"):
        aggregate(LOSS, MASK, agg="sum")
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(LOSS, MASK, agg="seq-mean-token-sum-norm", norm_len=0)


# ---------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_hand_computed():
    #        A    ratio   case                      loss
    cases = [
        (1.0, 1.5),  # A>0, above 1+0.2: clipped  -1.2
        (1.0, 1.1),  # inside                     -1.1
        (1.0, 0.5),  # A>0, below: not clipped    -0.5
        (-1.0, 0.5),  # A<0, below 1-0.2: clipped  0.8
        (-1.0, 0.9),  # inside                     0.9
        (-1.0, 1.5),  # A<0, above: not clipped    1.5
        (-1.0, 5.0),  # A<0, dual clip at 3        3.0 (5.0 without)
        (2.0, 1.0),  #                             -2.0
    ]
    adv = jnp.array([[a for a, _ in cases]])
    logp = jnp.log(jnp.array([[r for _, r in cases]]))
    old = jnp.zeros_like(logp)
    mask = jnp.ones_like(logp)
    loss, parts = clipped_surrogate(logp, old, adv, mask, dual_clip=3.0)
    np.testing.assert_allclose(loss[0], [-1.2, -1.1, -0.5, 0.8, 0.9, 1.5, 3.0, -2.0], rtol=1e-6)
    assert parts["clipped_high"][0].tolist() == [True] + [False] * 7
    assert parts["clipped_low"][0].tolist() == [False] * 3 + [True] + [False] * 4
    assert parts["dual_clipped"][0].tolist() == [False] * 6 + [True, False]
    no_dual, _ = clipped_surrogate(logp, old, adv, mask)
    assert np.isclose(no_dual[0, 6], 5.0)
    _, metrics = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    np.testing.assert_allclose(metrics["clipfrac"], 2 / 8)
    np.testing.assert_allclose(metrics["clipfrac_high"], 1 / 8)
    np.testing.assert_allclose(metrics["clipfrac_low"], 1 / 8)
    np.testing.assert_allclose(metrics["dual_clipfrac"], 1 / 8)
    np.testing.assert_allclose(metrics["approx_kl"], -np.mean(np.log([r for _, r in cases])), rtol=1e-5)
    np.testing.assert_allclose(metrics["pg_loss"], np.mean([-1.2, -1.1, -0.5, 0.8, 0.9, 1.5, 3.0, -2.0]), rtol=1e-6)


def test_log_ratio_is_clamped_at_20():
    loss, parts = clipped_surrogate(jnp.array([[100.0]]), jnp.array([[0.0]]), jnp.array([[-1.0]]), jnp.ones((1, 1)))
    np.testing.assert_allclose(parts["log_ratio"], [[20.0]])
    np.testing.assert_allclose(loss, [[np.exp(np.float32(20.0))]], rtol=1e-6)


def test_clip_arguments_are_validated():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(x, x, x, x + 1, clip_low=0.0)
    with pytest.raises(ValueError, match="clip_high"):
        policy_loss(x, x, x, x + 1, clip_high=-0.2)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, x + 1, dual_clip=1.0)


def _random(B=6, T=9, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    old = -rng.gamma(2.0, size=(B, T)).astype(np.float32)
    logp = (old + rng.normal(scale=spread, size=(B, T))).astype(np.float32)
    ref = (old + rng.normal(scale=spread, size=(B, T))).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    mask[-1] = False  # one absent row
    return logp, old, ref, adv, mask


def test_token_mean_gradient_is_minus_adv_ratio_over_n_or_zero_when_clipped():
    logp, old, _, adv, mask = _random(spread=0.4)
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask)[0])(logp)
    _, parts = clipped_surrogate(logp, old, adv, mask)
    clipped = np.asarray(parts["clipped_high"] | parts["clipped_low"])
    assert 0 < clipped.sum() < mask.sum()  # the case exercises both branches
    ratio = np.exp(logp - old)
    want = np.where(mask & ~clipped, -adv * ratio / mask.sum(), 0.0)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)
    # At logp == old_logp (the first PPO epoch) nothing is clipped: -adv / num_valid.
    grad0 = jax.grad(lambda lp: policy_loss(lp, old, adv, mask)[0])(old)
    np.testing.assert_allclose(grad0, np.where(mask, -adv / mask.sum(), 0.0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_aggregates_like_aggregate(agg):
    logp, old, _, adv, mask = _random(seed=6)
    per_token, _ = clipped_surrogate(logp, old, adv, mask)
    loss, metrics = policy_loss(logp, old, adv, mask, agg=agg, norm_len=16)
    np.testing.assert_allclose(loss, aggregate(per_token, mask, agg=agg, norm_len=16), rtol=1e-6)
    np.testing.assert_allclose(metrics["pg_loss"], loss)


@FEW
@given(
    hnp.arrays(np.float32, (3, 5), elements=st.floats(-8, 8, allow_subnormal=False, width=32)),
    hnp.arrays(np.float32, (3, 5), elements=st.floats(-5, 5, allow_subnormal=False, width=32)),
    st.floats(1.5, 10),
)
def test_dual_clip_bounds_negative_advantage_losses(log_ratio, adv, c):
    loss, _ = clipped_surrogate(log_ratio, jnp.zeros_like(log_ratio), adv, jnp.ones_like(adv), dual_clip=c)
    neg = adv < 0
    assert np.all(np.asarray(loss)[neg] <= (np.float32(c) * -adv[neg]) * (1 + 1e-6))
    assert np.all(np.isfinite(loss))


# ---------------------------------------------------------------- caspo_loss


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_caspo_loss_is_pg_plus_beta_kl(kind, agg):
    logp, old, ref, adv, mask = _random(seed=1)
    loss, metrics = caspo_loss(logp, old, ref, adv, mask, beta=0.005, kl_kind=kind, agg=agg)
    pg, _ = policy_loss(logp, old, adv, mask, agg=agg)
    kl = aggregate(kl_penalty(logp, ref, kind=kind), mask, agg=agg)
    np.testing.assert_allclose(loss, pg + 0.005 * kl, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-6)
    np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-6)
    assert set(metrics) >= {"loss", "pg_loss", "kl", "clipfrac", "clipfrac_high", "clipfrac_low", "approx_kl"}


def test_caspo_loss_beta_zero_needs_no_reference_and_beta_positive_does():
    logp, old, _, adv, mask = _random(seed=2)
    loss, metrics = caspo_loss(logp, old, None, adv, mask, beta=0.0)
    assert metrics["kl"] == 0.0 and loss == policy_loss(logp, old, adv, mask)[0]
    with pytest.raises(ValueError, match="ref_logp"):
        caspo_loss(logp, old, None, adv, mask, beta=0.005)
    with pytest.raises(ValueError, match="beta"):
        caspo_loss(logp, old, old, adv, mask, beta=-1.0)
    with pytest.raises(ValueError, match="kl_kind"):
        caspo_loss(logp, old, old, adv, mask, beta=0.0, kl_kind="k4")


@pytest.mark.parametrize("agg", AGG_MODES)
def test_absent_tokens_change_nothing_including_gradients(agg):
    logp, old, ref, adv, mask = _random(seed=3)
    fn = jax.jit(
        jax.value_and_grad(
            functools.partial(caspo_loss, beta=0.1, kl_kind="k3", agg=agg, dual_clip=3.0), argnums=(0, 2), has_aux=True
        )
    )
    (clean_loss, clean_m), clean_g = fn(*(np.where(mask, x, 0.0) for x in (logp, old, ref, adv)), mask)
    dirty = [np.where(mask, x, bad).astype(np.float32) for x, bad in zip((logp, old, ref, adv), (np.nan, np.inf, -np.inf, 1e30))]
    (loss, m), g = fn(*dirty, mask)
    assert np.isfinite(loss)
    np.testing.assert_array_equal(loss, clean_loss)
    for k in clean_m:
        np.testing.assert_array_equal(m[k], clean_m[k])
    for got, want in zip(g, clean_g):
        assert np.all(np.asarray(got)[~mask] == 0.0)
        np.testing.assert_array_equal(got, want)


def test_jit_and_eager_agree():
    logp, old, ref, adv, mask = _random(seed=4)
    fn = functools.partial(caspo_loss, beta=0.005, agg="seq-mean-token-mean", dual_clip=3.0)
    (l1, m1), g1 = jax.value_and_grad(fn, has_aux=True)(logp, old, ref, adv, mask)
    (l2, m2), g2 = jax.jit(jax.value_and_grad(fn, has_aux=True))(logp, old, ref, adv, mask)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-9)
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-9)


def test_bf16_inputs_give_float32_close_to_float32():
    logp, old, ref, adv, mask = _random(seed=5)
    fn = jax.value_and_grad(functools.partial(caspo_loss, beta=0.005), has_aux=True)
    (l32, _), g32 = fn(logp, old, ref, adv, mask)
    half = [jnp.asarray(x, jnp.bfloat16) for x in (logp, old, ref, adv)]
    (l16, m16), g16 = fn(*half, mask)
    assert l16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m16.values())
    # Upcasting happens first, so bf16 inputs equal float32 maths on the rounded values...
    (l16up, _), _ = fn(*(x.astype(jnp.float32) for x in half), mask)
    np.testing.assert_allclose(l16, l16up, rtol=1e-6)
    # ...and stay close to the unrounded float32 inputs (bf16 has 8 mantissa bits).
    np.testing.assert_allclose(l16, l32, atol=2e-2)
    np.testing.assert_allclose(np.asarray(g16, np.float32), g32, atol=2e-2)
