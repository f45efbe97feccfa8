"""Qwen3-VL through the shared KV cache (``caspo_jax.models.common.kv_cache``, ``Qwen3VL.kv_cache``): prefill and one cached decode
step equal the full forward (DeepStack in the prefill, left-padded prompts with images)."""

import numpy as np

import jax
import jax.numpy as jnp

from caspo_jax.models import load_pretrained
from caspo_jax.models.common import kv_cache as common_kv
from caspo_jax.tiny import qwen3_vl as tq

TOL = 1e-4  # float32; measured ~1e-6


def test_prefill_and_decode_step_equal_the_full_forward(tmp_path):
    tq.save_hf_checkpoint(tmp_path, "deepstack", seed=5)
    model, params = load_pretrained(tmp_path)
    cfg = model.config.text
    batch = tq.make_batch([[2, (1, 4, 6), 3], [1, (1, 4, 4), 6, (1, 2, 4), 1]], seed=8)
    ids, mask = batch.input_ids, batch.attention_mask
    P, L = ids.shape
    position_ids, _ = model.get_rope_index(ids, batch.image_grid_thw, mask)
    features = model.encode_images(params, batch.pixel_values, batch.image_grid_thw)
    features = jnp.pad(features, ((0, 3), (0, 0)))  # a sampler's bucket padding
    text = params.text
    kv_cache = model.kv_cache
    assert kv_cache is common_kv

    embeds = kv_cache.embed_tokens(text, jnp.asarray(ids), features, model.config.image_token_id)
    prefill = jax.jit(kv_cache.prefill, static_argnums=4)
    h, k, v = prefill(text, embeds, jnp.asarray(position_ids), jnp.asarray(mask), cfg)
    full = np.asarray(model.forward(params, ids, mask, batch.pixel_values, batch.image_grid_thw))
    np.testing.assert_allclose(np.asarray(model.lm_head(params, h[:, -1])), full[:, -1], atol=TOL)

    # One new text token per prompt (one sample each) at response slot 0, position
    # max(prompt positions) + 1, through the sampler's decode step.
    new = np.array([7, 11])
    rope_next = position_ids.max(axis=(0, 2)) + 1
    K, H = k.shape[3], k.shape[4]
    response_kv = [(jnp.zeros((P, K, 2, H)), jnp.zeros((P, K, 2, H))) for _ in range(cfg.num_hidden_layers)]
    decode_params = text.replace(layers=common_kv.layer_list(text.layers, cfg.num_hidden_layers))
    h_new, _ = jax.jit(kv_cache.decode_step_shared, static_argnums=7)(
        decode_params, jnp.asarray(new), jnp.asarray(rope_next), common_kv.prompt_cache(k, v), jnp.asarray(mask),
        response_kv, jnp.int32(0), cfg)
    ids2 = np.concatenate([ids, new[:, None]], axis=1)
    mask2 = np.concatenate([mask, np.ones((P, 1), mask.dtype)], axis=1)
    full2 = np.asarray(model.forward(params, ids2, mask2, batch.pixel_values, batch.image_grid_thw))
    np.testing.assert_allclose(np.asarray(model.lm_head(params, h_new)), full2[:, -1], atol=TOL)

    # The DeepStack maps stay compact (one row per visual token), and with them zeroed the
    # prefill is measurably different: they are used.
    tokens, deepstack, visual_index = embeds
    assert tokens.shape == (P, L, cfg.hidden_size) and deepstack.shape[1:] == (features.shape[0], cfg.hidden_size)
    h_plain, _, _ = prefill(text, (tokens, jnp.zeros_like(deepstack), visual_index), jnp.asarray(position_ids),
                            jnp.asarray(mask), cfg)
    assert np.abs(np.asarray(model.lm_head(params, h_plain[:, -1])) - full[:, -1]).max() > 1e-3
