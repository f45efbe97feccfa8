"""The loss's custom VJP and both z-scores against plain autodiff and hand values.

`caspo_loss` differentiates through `_fast._loss_row_sums`, whose backward is hand-wired
(the per-token VJP, recomputed from the inputs); here it must equal jax.grad of the same
maths written from the public pieces: `aggregate(clipped_surrogate) + beta * aggregate(kl_penalty)`.
The z-score tests run on the readable `normalize_token_signal` and on `_fast.zscore_of`
(the one-pass shifted statistics `caspo_advantages` uses by default).
"""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caspo_jax.algo import (
    AGG_MODES,
    KL_KINDS,
    aggregate,
    caspo_advantages,
    caspo_loss,
    clipped_surrogate,
    kl_penalty,
    normalize_token_signal,
)
from caspo_jax.algo import _fast

sys.path.insert(0, str(Path(__file__).parent))
from test_algo_losses import _random  # noqa: E402


def _batch(seed, dual_clip, T=9):
    """test_algo_losses' random batch; with a dual clip, two negative-advantage tokens whose
    ratio e^1.5 exceeds it, so the dual branch of the backward is exercised."""
    logp, old, ref, adv, mask = _random(T=T, seed=seed, spread=0.4)
    if dual_clip is not None:
        mask[0, :2] = True
        adv[0, :2] = -1.0
        logp[0, :2] = old[0, :2] + 1.5
    return logp, old, ref, adv, mask


def _reference_loss(logp, old, ref, adv, mask, *, beta, kl_kind, agg, dual_clip):
    """The objective from the per-token public functions, differentiated by plain autodiff."""
    pg, _ = clipped_surrogate(logp, old, adv, mask, dual_clip=dual_clip)
    valid = mask != 0
    kl = jnp.where(valid, kl_penalty(jnp.where(valid, logp, 0.0), jnp.where(valid, ref, 0.0), kind=kl_kind), 0.0)
    return aggregate(pg, mask, agg=agg) + beta * aggregate(kl, mask, agg=agg)


CASES = [(agg, "k3", None) for agg in AGG_MODES] + [
    ("token-mean", "k3", 3.0), ("seq-mean-token-mean", "k2", 3.0), ("seq-mean-token-sum-norm", "k1", None),
    ("seq-mean-token-sum", "abs", None),
]


@pytest.mark.parametrize("agg,kl_kind,dual_clip", CASES)
def test_custom_vjp_equals_autodiff_of_the_reference(agg, kl_kind, dual_clip):
    logp, old, ref, adv, mask = _batch(AGG_MODES.index(agg) + 10 * KL_KINDS.index(kl_kind) + 100 * bool(dual_clip),
                                       dual_clip)
    if dual_clip is not None:
        assert float(clipped_surrogate(logp, old, adv, mask, dual_clip=dual_clip)[1]["dual_clipped"].sum()) > 0
    kw = {"beta": 0.1, "kl_kind": kl_kind, "agg": agg, "dual_clip": dual_clip}
    args = (logp, old, ref, adv, mask)
    ours_fn = jax.value_and_grad(lambda *a: caspo_loss(*a, **kw)[0], argnums=(0, 1, 2, 3))
    want_fn = jax.value_and_grad(functools.partial(_reference_loss, **kw), argnums=(0, 1, 2, 3))
    loss, grads = ours_fn(*args)
    want_loss, want_grads = want_fn(*args)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
        assert np.all(np.asarray(got)[~mask] == 0.0)


def test_gradient_hand_computed_token_mean_k3():
    # Three valid tokens (N = 3), one absent. Token 0: A=1, ratio e^0.1 (inside the clip);
    # token 1: A=1, ratio e^0.5 > 1.2 (clipped high, no policy gradient); token 2: A=-2,
    # ratio 1. The k3 term kl = exp(x) - x - 1 with x = ref - logp has d kl / d logp =
    # 1 - exp(x).
    logp = np.array([[0.1, 0.5, 0.0, 7.0]], np.float32)
    old = np.zeros((1, 4), np.float32)
    ref = np.array([[0.3, 0.5, -0.2, 1.0]], np.float32)
    adv = np.array([[1.0, 1.0, -2.0, 5.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], bool)
    beta = 0.5
    grad = jax.grad(lambda lp: caspo_loss(lp, old, ref, adv, mask, beta=beta)[0])(logp)
    x = ref - logp
    pg = np.array([-1.0 * np.exp(0.1), 0.0, 2.0 * 1.0, 0.0])
    kl = np.array([1 - np.exp(x[0, 0]), 1 - np.exp(x[0, 1]), 1 - np.exp(x[0, 2]), 0.0])
    np.testing.assert_allclose(grad[0], (pg + beta * kl) / 3, rtol=1e-6, atol=1e-8)


def test_loss_gradient_is_one_elementwise_pass_no_residuals():
    """The jitted step (advantages + loss + gradient) keeps at most one [B, T] float32
    temporary: no saved residuals (ratio, exp, clip masks) for the backward pass."""
    P, G, T = 4, 8, 256
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(P, G)).astype(np.float32)
    old = -rng.gamma(1.5, size=(P * G, T)).astype(np.float32)
    teacher, logp, ref = (old + rng.normal(scale=0.3, size=(3, P * G, T))).astype(np.float32)
    mask = np.arange(T)[None, :] < rng.integers(1, T + 1, size=P * G)[:, None]

    def step(rewards, teacher, old, logp, ref, mask):
        adv, _ = caspo_advantages(rewards, teacher, old, mask, lam=0.3)
        return jax.grad(lambda lp: caspo_loss(lp, old, ref, adv, mask, beta=0.005)[0])(logp)

    compiled = jax.jit(step).lower(rewards, teacher, old, logp, ref, mask).compile()
    one_array = P * G * T * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= 1.5 * one_array


# ---------------------------------------------------------------- z-scores


def _fast_token_signal(r_PxGxT, mask_PxGxT, *, scope="group"):
    """`normalize_token_signal` computed by the fast path's one-pass `zscore_of`."""
    axes = (1, 2) if scope == "group" else (0, 1, 2)
    return _fast.zscore_of(lambda x: x, (r_PxGxT,), mask_PxGxT, axes, eps=1e-6)[0]


ZSCORES = pytest.mark.parametrize("normalize", [normalize_token_signal, _fast_token_signal], ids=["readable", "fast"])


@ZSCORES
@pytest.mark.parametrize("value", [7.77, 33000.1, -1e6 + 0.3])
def test_constant_signal_is_exact_zero_when_first_tokens_are_absent(value, normalize):
    """The shift comes from the first trajectory whose first token is valid; rows whose
    own first token is absent are still centred exactly."""
    mask = np.ones((2, 4, 16), bool)
    mask[:, 0, :3] = False  # trajectory 0 starts late
    mask[1, 1:, 0] = False  # in group 1 only trajectory 0 ... which starts late too
    mask[1, 2, 0] = True  # ... so trajectory 2 gives the shift
    r = jnp.where(mask, jnp.float32(value), jnp.float32(-5.0))  # absent tokens hold other values
    for scope in ("group", "batch"):
        assert np.all(np.asarray(normalize(r, mask, scope=scope)) == 0.0)


@ZSCORES
def test_zscore_without_any_valid_first_token_is_still_right(normalize):
    """Shift 0: a plain one-pass variance, whose relative error grows like
    float32 eps * (mean / std)^2 -- here mean 50, std 1: ~1e-4."""
    rng = np.random.default_rng(5)
    r = (rng.normal(size=(3, 4, 10)) + 50.0).astype(np.float32)
    mask = rng.random((3, 4, 10)) < 0.8
    mask[..., 0] = False  # no population has a valid first token: shift 0
    out = normalize(r, mask)
    for p in range(3):
        vals = r[p][mask[p]]
        want = (r[p] - vals.mean()) / (vals.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(np.asarray(out[p])[mask[p]], want[mask[p]], rtol=1e-3, atol=1e-3)
        assert np.all(np.asarray(out[p])[~mask[p]] == 0.0)


@ZSCORES
def test_zscore_matches_numpy_with_random_masks(normalize):
    rng = np.random.default_rng(6)
    r = rng.normal(2.0, 0.5, size=(4, 8, 32)).astype(np.float32)
    mask = rng.random((4, 8, 32)) < 0.6
    out = np.asarray(normalize(r, mask, scope="batch"))
    vals = r[mask]
    np.testing.assert_allclose(out[mask], (vals - vals.mean()) / (vals.std(ddof=1) + 1e-6), rtol=1e-5, atol=1e-5)

