"""Per-token KL estimators (k1, k2, k3, abs) of KL(pi || ref)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from caspo_jax.algo import KL_KINDS, kl_penalty


def test_hand_computed_values():
    logp = jnp.array([0.0])
    ref = jnp.log(jnp.array([0.5]))
    x = np.log(0.5)  # log ref - log pi
    np.testing.assert_allclose(kl_penalty(logp, ref, kind="k1"), [-x], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, kind="k2"), [0.5 * x * x], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, kind="k3"), [0.5 - x - 1], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, kind="abs"), [-x], rtol=1e-6)


def test_k3_clamps_the_log_ratio_and_the_value():
    logp = jnp.array([0.0, 30.0, 0.0, 2.0])
    ref = jnp.array([30.0, 0.0, 2.0, 0.0])
    # x = 30 -> 20 -> e^20 - 21 -> 10;  x = -30 -> -20 -> 19 -> 10;  x = 2 -> e^2 - 3;  x = -2 -> e^-2 + 1.
    np.testing.assert_allclose(
        kl_penalty(logp, ref, kind="k3"), [10.0, 10.0, np.exp(2.0) - 3, np.exp(-2.0) + 1], rtol=1e-6
    )
    grad = jax.grad(lambda lp: jnp.sum(kl_penalty(lp, ref, kind="k3")))(logp)
    np.testing.assert_allclose(grad[:2], [0.0, 0.0])  # clamped: no gradient
    np.testing.assert_allclose(grad[2:], [-(np.exp(2.0) - 1), -(np.exp(-2.0) - 1)], rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    hnp.arrays(np.float32, (16,), elements=st.floats(-40, 0, allow_subnormal=False, width=32)),
    hnp.arrays(np.float32, (16,), elements=st.floats(-40, 0, allow_subnormal=False, width=32)),
)
def test_k2_k3_nonnegative_and_zero_at_equality(logp, ref):
    for kind in ("k2", "k3", "abs"):
        assert np.all(np.asarray(kl_penalty(logp, ref, kind=kind)) >= 0.0)
        assert np.all(np.asarray(kl_penalty(logp, logp, kind=kind)) == 0.0)
    assert np.all(np.asarray(kl_penalty(logp, logp, kind="k1")) == 0.0)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_bf16_gives_float32_and_jit_agrees(kind):
    rng = np.random.default_rng(0)
    logp = -rng.gamma(2.0, size=(4, 8)).astype(np.float32)
    ref = (logp + rng.normal(scale=0.5, size=(4, 8))).astype(np.float32)
    out16 = kl_penalty(jnp.asarray(logp, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16), kind=kind)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, kl_penalty(logp, ref, kind=kind), atol=5e-2)
    jitted = jax.jit(kl_penalty, static_argnames="kind")(logp, ref, kind=kind)
    np.testing.assert_allclose(jitted, kl_penalty(logp, ref, kind=kind), rtol=1e-6, atol=1e-7)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(jnp.zeros(2), jnp.zeros(2), kind="k4")
