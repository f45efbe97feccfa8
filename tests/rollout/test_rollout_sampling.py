"""Sampling maths: top-k / top-p filters against hand-computed sets, and draw frequencies."""

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.rollout.sampling import SampleSpec, filter_logits, sample_keys, sample_tokens, step_keys


def _kept(filtered):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered)[0])).tolist())


def test_top_k_keeps_the_k_largest():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 2.5]])
    assert _kept(filter_logits(logits, 1.0, 2, 1.0)) == {1, 4}
    assert _kept(filter_logits(logits, 1.0, 0, 1.0)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.asarray([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = jnp.asarray(np.log(probs)[None])
    # mass before each (descending): 0, .5, .7, .85, .95
    assert _kept(filter_logits(logits, 1.0, 0, 0.5)) == {0}
    assert _kept(filter_logits(logits, 1.0, 0, 0.51)) == {0, 1}
    assert _kept(filter_logits(logits, 1.0, 0, 0.8)) == {0, 1, 2}
    assert _kept(filter_logits(logits, 1.0, 0, 0.86)) == {0, 1, 2, 3}
    # temperature scales before the nucleus is taken: at T=0.5 probs ~ p^2 normalised
    sharp = (probs**2) / (probs**2).sum()  # 0.735, 0.118, ...
    assert sharp[0] > 0.7
    assert _kept(filter_logits(logits, 0.5, 0, 0.7)) == {0}


def test_draw_frequencies_follow_the_filtered_softmax():
    logits = jnp.asarray(np.log([0.5, 0.3, 0.15, 0.05])[None].repeat(4000, 0))
    keys = step_keys(sample_keys(np.arange(4000), 1), 0)
    tokens = np.asarray(sample_tokens(keys, logits, jnp.float32(1.0), SampleSpec(False, 3, 1.0)))
    freq = np.bincount(tokens, minlength=4) / len(tokens)
    expected = np.asarray([0.5, 0.3, 0.15, 0]) / 0.95
    assert freq[3] == 0
    np.testing.assert_allclose(freq, expected, atol=0.03)  # ~4 sigma at n=4000


def test_greedy_is_argmax_and_keys_depend_only_on_seed_and_index():
    logits = jnp.asarray([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]])
    assert np.asarray(sample_tokens(None, logits, 1.0, SampleSpec(True, 0, 1.0))).tolist() == [1, 0]
    a = sample_keys(np.asarray([5, 6]), 3)
    b = sample_keys(np.asarray([6]), 3)
    assert a.shape == (6, 2)
    np.testing.assert_array_equal(np.asarray(a[3:]), np.asarray(b))
    assert len({tuple(np.asarray(k).tolist()) for k in a}) == 6
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(jax.random.fold_in(jax.random.PRNGKey(5), 0)))


def test_grouped_decode_attention_equals_dot_product_attention():
    from caspo_jax.models.common.layers import attention
    from caspo_jax.models.common.kv_cache import decode_attention

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (3, 1, 8, 32))
    k = jax.random.normal(keys[1], (3, 20, 2, 32))
    v = jax.random.normal(keys[2], (3, 20, 2, 32))
    mask = jnp.arange(20)[None, :] < jnp.asarray([[5], [20], [1]])
    ref = attention(q, k, v, mask[:, None, None, :])[:, 0]
    np.testing.assert_allclose(np.asarray(decode_attention(q[:, 0], k, v, mask)), np.asarray(ref), atol=1e-6)
