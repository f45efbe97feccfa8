"""The XLA causal attention (``common.flash``): values and gradients equal the dense masked
attention, its backward needs no second forward under the "save_projections" remat, and
``causal_attention`` dispatches to it on CPU (and only where the kernel is XLA's)."""

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from caspo_jax.models.common import decoder, flash, layers

B, N, K, H = 3, 4, 2, 8


def _inputs(L, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, L, N, H), dtype)
    k = jax.random.normal(keys[1], (B, L, K, H), dtype)
    v = jax.random.normal(keys[2], (B, L, K, H), dtype)
    cotangent = jax.random.normal(keys[3], (B, L, N, H), dtype)
    return q, k, v, cotangent


def _left_padded(L, pads=(0, 5, 41)):
    """[B, L] key validity with left padding, as the rollout and train batches have."""
    return jnp.arange(L)[None] >= jnp.array(pads)[:, None]


@pytest.mark.parametrize("L, block", [(100, 32), (67, 16), (64, 64), (40, 128)],
                         ids=["not_a_multiple", "odd_length", "one_block", "block_longer_than_L"])
def test_flash_equals_dense_attention_values_and_gradients(L, block):
    """Every real query (a key to see) gets the dense masked attention's output, and the
    gradients of a loss on the real queries equal the dense ones for q, k and v (float32)."""
    q, k, v, cotangent = _inputs(L)
    valid = _left_padded(L)
    mask = decoder.causal_mask(valid)
    cotangent = cotangent * valid[:, :, None, None]  # padding queries' outputs are never used

    def dense(q, k, v):
        return layers.attention(q, k, v, mask)

    def blocked(q, k, v):
        return flash.flash_causal_attention(q, k, v, valid, block)

    real = np.asarray(valid)
    out = jax.jit(blocked)(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(dense(q, k, v))[real], atol=2e-6, rtol=0)
    assert np.isfinite(np.asarray(out)).all()
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))(q, k, v)
             for f in (blocked, dense)]
    for ours, ref in zip(*grads):
        assert np.isfinite(np.asarray(ours)).all()
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=0)


def test_flash_hand_computed_two_tokens():
    """One head, L = 2: query 0 sees only key 0 (output v0); query 1 averages v0, v1 with
    softmax weights of q1.k0 / sqrt(H), q1.k1 / sqrt(H)."""
    q = jnp.array([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]
    k = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    v = jnp.array([[[[3.0, 0.0]], [[0.0, 5.0]]]])
    out = flash.flash_causal_attention(q, k, v, jnp.ones((1, 2), bool), 1)
    w1 = np.exp(2.0 / np.sqrt(2.0)) / (1.0 + np.exp(2.0 / np.sqrt(2.0)))  # weight of key 1 for query 1
    np.testing.assert_allclose(np.asarray(out)[0, :, 0], [[3.0, 0.0], [3.0 * (1 - w1), 5.0 * w1]], rtol=1e-6)


def test_causal_attention_runs_flash_on_cpu_and_equals_dense_attention():
    """On CPU every XLA choice (auto, None, "xla") runs the custom-VJP kernel; the output
    equals the dense attention for real queries (left-padded batch of 3)."""
    L = 150
    q, k, v, _ = _inputs(L, seed=1)
    valid = _left_padded(L, pads=(0, 37, 149))
    mask = decoder.causal_mask(valid)
    for impl in ("auto", None, "xla"):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v, i=impl: layers.causal_attention(q, k, v, mask, i, block=64))(q, k, v))
        assert "custom_vjp_call" in jaxpr, impl
    dense_jaxpr = str(jax.make_jaxpr(lambda q, k, v: layers.attention(q, k, v, mask, "auto", "causal"))(q, k, v))
    assert "custom_vjp_call" not in dense_jaxpr
    real = np.asarray(valid)
    out = jax.jit(lambda q, k, v: layers.causal_attention(q, k, v, mask, "auto", block=64))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(layers.attention(q, k, v, mask))[real], atol=2e-6)


def _exp_count(policy):
    """exp instructions in the compiled loss and gradient of a remat'ed projection + attention
    layer (the loss keeps the first forward alive)."""
    L, D = 96, N * H
    x = jax.random.normal(jax.random.PRNGKey(0), (1, L, D))
    w = jax.random.normal(jax.random.PRNGKey(1), (D, D)) * 0.1
    valid = jnp.ones((1, L), bool)
    mask = decoder.causal_mask(valid)

    def layer(x, w):
        q = layers.linear(x, w).reshape(1, L, N, H)
        kv = q[:, :, :K]
        return jnp.sum(layers.causal_attention(q, kv, kv, mask, "auto", block=32) ** 2)

    text = jax.jit(jax.value_and_grad(layers.remat(layer, policy), argnums=1)).lower(x, w).compile().as_text()
    return len(re.findall(r"exponential\(", text))


def test_save_projections_keeps_the_log_sum_exp_so_the_backward_runs_no_second_forward():
    """3 query blocks: the forward has one exp per block and the backward one per block; the
    "full" remat recomputes the forward (a third set), "save_projections" must not (the saved
    output and log-sum-exp carry the ATTENTION_OUTPUT name)."""
    none, saved, full = (_exp_count(p) for p in ("none", "save_projections", "full"))
    assert saved == none
    assert full > none
