"""Qwen3-VL port vs the unmodified transformers forward (float32, eager attention).

Tolerance: max |logits diff| <= 1e-4 over non-padding positions (padding rows are
meaningless in both: their queries see no key). Measured: ~2e-6.
"""

import dataclasses

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from caspo_jax.models import load_pretrained
from caspo_jax.tiny import qwen3_vl as tq

TOL = 1e-4
# bfloat16 forward vs float32 (same weights), on logits whose float32 std is ~0.24.
BF16_TOL = 6e-2


def _load(tmp_path_factory, variant, seed):
    path = tmp_path_factory.mktemp(f"q3_{variant}")
    hf = tq.hf_model(variant, seed=seed)
    hf.save_pretrained(path)
    model, params = load_pretrained(path)
    return hf, model, params


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    return _load(tmp_path_factory, "vision", seed=1)


@pytest.fixture(scope="module")
def deep_hf_and_ours(tmp_path_factory):
    return _load(tmp_path_factory, "deepstack", seed=2)


def reference_logits(hf, batch) -> np.ndarray:
    hf.model.rope_deltas = None  # the reference caches it between calls
    kwargs = dict(input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask))
    if batch.pixel_values is not None:
        kwargs.update(pixel_values=torch.tensor(batch.pixel_values), image_grid_thw=torch.tensor(batch.image_grid_thw))
    if batch.pixel_values_videos is not None:
        kwargs.update(pixel_values_videos=torch.tensor(batch.pixel_values_videos),
                      video_grid_thw=torch.tensor(batch.video_grid_thw))
    if batch.pixel_values is not None or batch.pixel_values_videos is not None:
        kwargs.update(mm_token_type_ids=torch.tensor(batch.mm_token_type_ids))
    with torch.no_grad():
        return hf(**kwargs).logits.numpy()


def ours(model, params, batch):
    return np.asarray(model.forward(params, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                    batch.image_grid_thw, pixel_values_videos=batch.pixel_values_videos,
                                    video_grid_thw=batch.video_grid_thw))


def max_valid_diff(a, b, batch):
    return np.abs(a - b)[batch.attention_mask.astype(bool)].max()


CASES = {
    "text_only": [[20], [20]],
    "one_image": [[3, (1, 6, 8), 5]],
    "two_images_different_sizes": [[2, (1, 4, 4), 3, (1, 10, 6), 2]],
    "left_padded_mixed": [[2, (1, 4, 6), 3], [9], [1, (1, 8, 4), 1, (1, 4, 4), 2]],
    "video_and_image": [[2, ("video", 2, 4, 6), 3, (1, 4, 4), 1], [5]],
    "right_padded": [[1, (1, 4, 4), 8], [4]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_and_ours, case):
    hf, model, params = hf_and_ours
    batch = tq.make_batch(CASES[case], pad="right" if case == "right_padded" else "left", seed=len(case))
    # Sequences are 20-70 tokens: blocks of 16 exercise the blocked causal attention.
    model = dataclasses.replace(model, attn_block=16)
    expected = reference_logits(hf, batch)
    got = ours(model, params, batch)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert max_valid_diff(got, expected, batch) <= TOL


def test_several_deepstack_layers_match_and_placement_errors_are_seen(deep_hf_and_ours):
    """Taps [3, 0, 2] of a 4-block ViT into a 5-layer LLM. As transformers: map s comes from the
    s-th smallest tapped block (0, 2, 3) through merger indexes.index(block) (1, 2, 0), and is
    added after LLM layer s.

    Feeding the same features with the maps in another order (each added after the wrong LLM
    layer), or with the DeepStack maps zeroed (no DeepStack), is far outside the tolerance:
    the parity check sees placement errors.
    """
    hf, model, params = deep_hf_and_ours
    assert model.config.vision.deepstack_visual_indexes == (3, 0, 2)
    assert model.config.vision.deepstack_order == ((0, 1), (2, 2), (3, 0))
    batch = tq.make_batch([[2, (1, 4, 6), 3, (1, 6, 4), 2], [7, (1, 4, 4), 1]], seed=29)
    expected = reference_logits(hf, batch)
    assert max_valid_diff(ours(model, params, batch), expected, batch) <= TOL

    position_ids, _ = model.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    features = model.encode_images(params, batch.pixel_values, batch.image_grid_thw)
    U, D = features.shape[0], model.config.text.hidden_size
    maps = features.reshape(U, 4, D)

    def logits(image_embeds):
        return np.asarray(model.forward(params, batch.input_ids, batch.attention_mask, position_ids=position_ids,
                                        image_embeds=image_embeds))

    assert max_valid_diff(logits(features), expected, batch) <= TOL
    for wrong in ([0, 3, 2, 1], [0, 2, 1, 3]):
        assert max_valid_diff(logits(maps[:, wrong].reshape(U, -1)), expected, batch) > 100 * TOL
    no_deepstack = maps.at[:, 1:].set(0.0).reshape(U, -1)
    assert max_valid_diff(logits(no_deepstack), expected, batch) > 100 * TOL


def test_encode_images_matches_reference_vision_tower(deep_hf_and_ours):
    """Merged features and every DeepStack map equal transformers' get_image_features."""
    hf, model, params = deep_hf_and_ours
    batch = tq.make_batch([[1, (1, 6, 8), (1, 4, 4)]], seed=5)
    with torch.no_grad():
        out = hf.model.get_image_features(torch.tensor(batch.pixel_values), torch.tensor(batch.image_grid_thw))
    expected_merged = torch.cat(out.pooler_output).numpy()
    expected_stack = np.stack([torch.cat(f).numpy() for f in out.deepstack_features])
    features = model.encode_images(params, batch.pixel_values, batch.image_grid_thw)
    assert features.shape == (12 + 4, 4 * 64)
    merged, stack = model.split_visual_features(features)
    assert stack.shape == expected_stack.shape == (3, 16, 64)
    assert np.abs(np.asarray(merged) - expected_merged).max() <= TOL
    assert np.abs(np.asarray(stack) - expected_stack).max() <= TOL


def test_pieces_compose_to_forward_and_jit_with_precomputed_positions(hf_and_ours):
    """hidden_states + lm_head == forward; one user-jitted function with host position ids and
    row-gathered image_embeds (as the train step passes them)."""
    _, model, params = hf_and_ours
    batch = tq.make_batch([[2, (1, 4, 6), 3], [9]], seed=7)
    full = ours(model, params, batch)
    position_ids, _ = model.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    embeds = model.encode_images(params, batch.pixel_values, batch.image_grid_thw)
    padded = jnp.pad(embeds, ((0, 5), (0, 0)))  # extra rows (a sampler's bucket) are never read

    @jax.jit
    def logprobs(params, ids, mask, pos, image_embeds):
        h = model.hidden_states(params, ids, mask, position_ids=pos, image_embeds=image_embeds)
        return jax.nn.log_softmax(model.lm_head(params, h))

    got = np.asarray(logprobs(params, batch.input_ids, batch.attention_mask, position_ids, padded))
    np.testing.assert_allclose(got, np.asarray(jax.nn.log_softmax(full)), atol=1e-5)


def test_bfloat16_forward_close_to_float32(hf_and_ours):
    _, model, params = hf_and_ours
    batch = tq.make_batch(CASES["left_padded_mixed"], seed=11)
    params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    f32 = ours(model, params, batch)
    bf16 = ours(model, params_bf16, batch)
    assert bf16.dtype == np.float32
    diff = max_valid_diff(bf16, f32, batch)
    assert 0 < diff <= BF16_TOL, diff


def test_causal_by_token_index_including_images(hf_and_ours):
    """Changing a later token never changes earlier logits: a later text token, or the last
    image token's features (merged and DeepStack) leave every earlier position, earlier image
    tokens included, bit-identical. (Pixels are not the probe: the ViT is bidirectional
    within an image.)"""
    _, model, params = hf_and_ours
    batch = tq.make_batch([[3, (1, 4, 4), 4]], seed=13)
    position_ids, _ = model.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    embeds = model.encode_images(params, batch.pixel_values, batch.image_grid_thw)

    def logits(ids, image_embeds):
        return np.asarray(model.forward(params, ids, batch.attention_mask, position_ids=position_ids,
                                        image_embeds=image_embeds))

    base = logits(batch.input_ids, embeds)
    last_image = int(np.flatnonzero(batch.input_ids[0] == tq.IMAGE_TOKEN_ID)[-1])
    out = logits(batch.input_ids, embeds.at[-1].multiply(2.0))
    np.testing.assert_array_equal(out[0, :last_image], base[0, :last_image])
    assert np.abs(out[0, last_image:] - base[0, last_image:]).max() > 1e-3
    deepstack_only = embeds.at[-1, 64:].multiply(2.0)  # the merged features unchanged
    out = logits(batch.input_ids, deepstack_only)
    np.testing.assert_array_equal(out[0, :last_image], base[0, :last_image])
    assert np.abs(out[0, last_image:] - base[0, last_image:]).max() > 1e-3
    ids = batch.input_ids.copy()
    ids[0, -1] = (ids[0, -1] + 1) % 100
    out = logits(ids, embeds)
    np.testing.assert_array_equal(out[0, :-1], base[0, :-1])


def test_remat_gradients_equal(hf_and_ours):
    """Same loss and gradients (text, vision, DeepStack mergers) with per-layer remat."""
    _, model, params = hf_and_ours
    batch = tq.make_batch([[2, (1, 4, 4), 3], [4]], seed=19)
    position_ids, _ = model.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    grids = tuple(map(tuple, batch.image_grid_thw))

    def loss(params, model):
        h = model.hidden_states(params, batch.input_ids, batch.attention_mask, batch.pixel_values, grids,
                                position_ids=position_ids)
        logp = jax.nn.log_softmax(model.lm_head(params, h))
        return jnp.sum(logp[..., 0] * batch.attention_mask)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value, grads = value_and_grad(params, model)
    value_r, grads_r = value_and_grad(params, dataclasses.replace(model, remat=True))
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for leaf in ("fc1_kernel", "norm_scale"):
        assert np.abs(np.asarray(getattr(grads.vision.deepstack, leaf))).min(axis=tuple(range(1, 3)) if leaf ==
                                                                               "fc1_kernel" else 1).max() > 0
    assert np.abs(np.asarray(grads.vision.pos_embed)).max() > 0


def test_placeholder_count_mismatch_is_an_error(hf_and_ours):
    _, model, params = hf_and_ours
    ids = np.array([[1, 2, tq.VIDEO_TOKEN_ID, 3]])
    with pytest.raises(ValueError, match="1 video tokens"):
        model.forward(params, ids)
    batch = tq.make_batch([[2, (1, 4, 4)]], seed=1)
    merged_only = model.encode_images(params, batch.pixel_values, batch.image_grid_thw)[:, :64]
    with pytest.raises(ValueError, match="DeepStack"):
        model.forward(params, batch.input_ids, image_grid_thw=batch.image_grid_thw, image_embeds=merged_only)
