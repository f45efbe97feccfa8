"""Shared layers: hand-computed values and the blocked causal attention equalling the dense one."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from caspo_jax.models.common import layers


def test_rms_norm_hand_computed():
    x = jnp.array([[3.0, 4.0]])
    # rms = sqrt((9 + 16) / 2) = sqrt(12.5)
    expected = np.array([[3.0, 4.0]]) / np.sqrt(12.5) * np.array([2.0, 0.5])
    np.testing.assert_allclose(layers.rms_norm(x, jnp.array([2.0, 0.5]), eps=0.0), expected, rtol=1e-6)


def test_rotate_half_and_rope_identity_at_zero_angle():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    np.testing.assert_array_equal(layers.rotate_half(x)[0, 0, 0], [-4, -5, -6, -7, 0, 1, 2, 3])
    ones, zeros = jnp.ones((1, 1, 8)), jnp.zeros((1, 1, 8))
    np.testing.assert_array_equal(layers.apply_rope(x, ones, zeros), x)


def test_linear_takes_hf_out_by_in_kernels():
    x = jnp.array([[1.0, 2.0, 3.0]])
    kernel = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # [out=2, in=3], torch.nn.Linear's weight
    np.testing.assert_array_equal(layers.linear(x, kernel, jnp.array([10.0, 20.0])), [[11.0, 25.0]])


def test_gated_mlp_hand_computed():
    x = jnp.array([[1.0, 2.0]])
    gate, up, down = jnp.eye(2), 2 * jnp.eye(2), jnp.ones((1, 2))  # kernels [out, in]
    silu = lambda z: z / (1 + np.exp(-z))
    expected = silu(1.0) * 2 + silu(2.0) * 4
    np.testing.assert_allclose(layers.gated_mlp(x, gate, up, down, "silu"), [[expected]], rtol=1e-6)


def test_blocked_causal_attention_equals_dense_with_left_padding():
    B, L, N, K, H = 2, 150, 4, 2, 8
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, L, N, H), np.float32)
    k = rng.standard_normal((B, L, K, H), np.float32)
    v = rng.standard_normal((B, L, K, H), np.float32)
    valid = jnp.arange(L)[None] >= jnp.array([[0], [37]])
    mask = jnp.tril(jnp.ones((L, L), bool))[None, None] & valid[:, None, None, :]
    dense = jax.jit(layers.attention)(q, k, v, mask)
    blocked = jax.jit(layers.causal_attention, static_argnames="block")(q, k, v, mask, block=64)
    # Queries that see at least one key agree; padding queries (no visible key) are an
    # arbitrary average in both and never reach a valid position.
    np.testing.assert_allclose(np.asarray(blocked)[np.asarray(valid)], np.asarray(dense)[np.asarray(valid)],
                               atol=1e-6)
    assert np.isfinite(np.asarray(blocked)).all()


def _toy_layer(x, w):
    """A matmul with no batch dims, an attention-like batched einsum, elementwise work."""
    h = jnp.tanh(x @ w)
    scores = jnp.einsum("bld,bmd->blm", h, h)
    return jax.nn.softmax(scores, axis=-1) @ h


def test_remat_policies_give_the_same_gradients_and_unknown_ones_fail():
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    w = jax.random.normal(jax.random.key(1), (4, 4))
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) ** 2)  # noqa: E731
    expected = jax.grad(loss(_toy_layer), argnums=(0, 1))(x, w)
    for policy in (False, True, "full", "save_projections", "save_dots"):
        got = jax.jit(jax.grad(loss(layers.remat(_toy_layer, policy)), argnums=(0, 1)))(x, w)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert layers.remat(_toy_layer, False) is _toy_layer
    with pytest.raises(ValueError, match="save_projections"):
        layers.remat(_toy_layer, "everything")


@pytest.mark.parametrize("segment_P", [np.repeat([0, 1, 2], 4), np.repeat([3, 0, 1, 5], [2, 5, 1, 4])],
                         ids=["equal_runs", "unequal_runs"])
def test_segment_attention_equals_masked_attention_with_gradients(segment_P):
    P, N, H = len(segment_P), 2, 8
    q, k, v = (jax.random.normal(key, (P, N, H)) for key in jax.random.split(jax.random.PRNGKey(0), 3))
    mask = jnp.asarray(segment_P[:, None] == segment_P[None, :])[None, None]

    def masked(q, k, v):
        return layers.attention(q[None], k[None], v[None], mask)[0]

    def by_segment(q, k, v):
        return layers.segment_attention(q, k, v, segment_P)

    np.testing.assert_allclose(by_segment(q, k, v), masked(q, k, v), atol=1e-6, rtol=0)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (P, N, H))
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
             for f in (by_segment, masked)]
    for ours, ref in zip(*grads):
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_placeholder_slots_number_placeholders_row_major_and_features_land_there():
    from caspo_jax.models.common.placeholders import place_features, placeholder_slots

    ids = jnp.array([[5, 9, 9, 5], [9, 5, 5, 9]])
    slots = placeholder_slots(ids, 9, n_rows=3)  # 4 placeholders, 3 rows: the last is clipped
    np.testing.assert_array_equal(slots, [[-1, 0, 1, -1], [2, -1, -1, 2]])
    embeds = jnp.zeros((2, 4, 2))
    features = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    placed = place_features(embeds, slots, features)
    np.testing.assert_array_equal(placed[..., 0], [[0, 1, 2, 0], [3, 0, 0, 3]])
