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


def test_inverse_cdf_draw_follows_softmax_across_blocks_and_never_draws_zero_mass():
    from caspo_jax.rollout.sampling import inverse_cdf_draw

    inverse_cdf_draw = jax.jit(inverse_cdf_draw)

    V = 300  # three 128-wide blocks, the last one partial
    logits = np.full(V, -np.inf, np.float32)
    support = np.asarray([0, 5, 127, 128, 200, 299])
    probs = np.asarray([0.1, 0.2, 0.05, 0.3, 0.25, 0.1])
    logits[support] = np.log(probs)
    u = (np.arange(6000) + 0.5) / 6000  # a uniform grid: frequencies equal probs up to 1/6000
    tokens = np.asarray(inverse_cdf_draw(jnp.asarray(u), jnp.asarray(np.tile(logits, (len(u), 1)))))
    freq = np.bincount(tokens, minlength=V)
    assert set(np.flatnonzero(freq)) <= set(support.tolist())
    np.testing.assert_allclose(freq[support] / len(u), probs, atol=2 / len(u))
    # the ends of [0, 1): the first and the last token of positive mass, never a -inf one
    edges = np.asarray(inverse_cdf_draw(jnp.asarray([0.0, np.nextafter(np.float32(1), 0)]),
                                        jnp.asarray(np.tile(logits, (2, 1)))))
    assert edges.tolist() == [0, 299]


def test_sampled_draws_are_distributed_like_the_softmax_on_a_large_vocabulary():
    V = 1000
    rng = np.random.default_rng(0)
    logits = rng.normal(size=V).astype(np.float32) * 2
    keys = step_keys(sample_keys(np.arange(10000), 1), 3)
    tokens = np.asarray(sample_tokens(keys, jnp.asarray(np.tile(logits, (10000, 1))), jnp.float32(1.0),
                                      SampleSpec(False, 0, 1.0)))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    freq = np.bincount(tokens, minlength=V) / len(tokens)
    sigma = np.sqrt(probs[top] * (1 - probs[top]) / len(tokens))
    np.testing.assert_array_less(np.abs(freq[top] - probs[top]), 4 * sigma)  # ~4 sigma each
    # the whole vocabulary: ids in ascending-probability order cut into 10 groups of ~equal mass
    order = np.argsort(probs)
    group = np.minimum((np.cumsum(probs[order]) * 10).astype(int), 9)
    mass, seen = np.bincount(group, probs[order], 10), np.bincount(group, freq[order], 10)
    np.testing.assert_array_less(np.abs(seen - mass), 4 * np.sqrt(mass * (1 - mass) / len(tokens)))


def test_shared_prompt_attention_equals_attention_over_repeated_prompt_cache():
    from caspo_jax.models.common.kv_cache import shared_prompt_attention
    from caspo_jax.models.common.layers import attention

    P, n, N, K, H, L, T = 2, 3, 8, 2, 32, 7, 5
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    q = jax.random.normal(keys[0], (P * n, N, H))
    pk = jax.random.normal(keys[1], (P, K, L, H))
    pv = jax.random.normal(keys[2], (P, K, L, H))
    k = jax.random.normal(keys[3], (P * n, K, T, H))
    v = jax.random.normal(keys[4], (P * n, K, T, H))
    prompt_mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7], bool)  # prompt 0 left-padded
    filled = jnp.arange(T) <= 2
    got = jax.jit(shared_prompt_attention)(q, pk, pv, prompt_mask, k, v, filled)
    # the plain form: every sample holds its own copy of the prompt, layout [S, C, K, H]
    full_k = jnp.concatenate([jnp.repeat(pk, n, axis=0), k], axis=2).transpose(0, 2, 1, 3)
    full_v = jnp.concatenate([jnp.repeat(pv, n, axis=0), v], axis=2).transpose(0, 2, 1, 3)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, n, axis=0), jnp.broadcast_to(filled, (P * n, T))], axis=1)
    ref = attention(q[:, None], full_k, full_v, mask[:, None, None, :])[:, 0]  # dot_product_attention
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)


def _numpy_filter(logits, top_k, top_p):
    """The filters' definition in float64 NumPy (full sorts)."""
    x = np.asarray(logits, np.float64).copy()
    for row in x:
        if top_k:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p < 1:
            desc = np.sort(row)[::-1]
            probs = np.exp(desc - desc[0])
            probs /= probs.sum()
            kept = (np.cumsum(probs) - probs) < top_p
            row[row < desc[kept].min()] = -np.inf
    return x


def test_filters_on_a_large_vocabulary_equal_full_sorts_inside_and_beyond_the_candidates():
    """V = 5000 takes the candidate path (TopK of 256, no sort) when every nucleus fits in the
    candidates, and the full sort when one does not (the flat rows)."""
    rng = np.random.default_rng(3)
    peaked = rng.normal(size=(4, 5000)).astype(np.float32) * 4
    flat = rng.normal(size=(4, 5000)).astype(np.float32) * 0.1
    jitted = jax.jit(filter_logits, static_argnums=(2, 3))
    for logits in (peaked, np.concatenate([peaked[:2], flat[:2]])):
        for top_k, top_p in [(50, 1.0), (0, 0.9), (100, 0.8), (0, 0.3)]:
            got = np.isfinite(np.asarray(jitted(jnp.asarray(logits), 1.0, top_k, top_p)))
            want = np.isfinite(_numpy_filter(logits, top_k, top_p))
            np.testing.assert_array_equal(got, want, err_msg=f"top_k={top_k} top_p={top_p}")
    assert np.isfinite(np.asarray(jitted(jnp.asarray(peaked), 1.0, 0, 0.9))).sum(1).max() < 256
    assert np.isfinite(np.asarray(jitted(jnp.asarray(flat), 1.0, 0, 0.9))).sum(1).min() > 256
