"""Qwen2.5-VL port vs the unmodified transformers forward (float32, eager attention).

Tolerance: max |logits diff| <= 1e-4 over non-padding positions (padding rows are
meaningless in both: their queries see no key). Measured: ~1.5e-6.
"""

import dataclasses

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from caspo_jax.models import load_pretrained
from caspo_jax.tiny import models as tm

TOL = 1e-4
# bfloat16 forward vs float32 (same weights): documented tolerance on logits whose
# float32 std is ~0.3 here; measured ~1e-2.
BF16_TOL = 6e-2


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vision")
    hf = tm.hf_model("vision", seed=1)
    hf.save_pretrained(path)
    model, params = load_pretrained(path)
    return hf, model, params


def reference_logits(hf, batch: tm.MultimodalBatch) -> np.ndarray:
    hf.model.rope_deltas = None  # the reference caches it between calls
    kwargs = dict(input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask))
    if batch.pixel_values is not None:
        kwargs.update(pixel_values=torch.tensor(batch.pixel_values),
                      image_grid_thw=torch.tensor(batch.image_grid_thw),
                      mm_token_type_ids=torch.tensor(batch.mm_token_type_ids))
    with torch.no_grad():
        return hf(**kwargs).logits.numpy()


def ours(model, params, batch):
    return np.asarray(model.forward(params, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw))


CASES = {
    "text_only": [[20], [20]],
    "one_image": [[3, (1, 6, 8), 5]],
    "two_images_different_sizes": [[2, (1, 4, 4), 3, (1, 10, 6), 2]],
    "left_padded_mixed": [[2, (1, 4, 6), 3], [9], [1, (1, 8, 4), 1, (1, 4, 4), 2]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_and_ours, case):
    hf, model, params = hf_and_ours
    batch = tm.make_batch(CASES[case], pad="left", seed=len(case))
    # Sequences here are 20-70 tokens: blocks of 16 exercise the blocked causal attention.
    model = dataclasses.replace(model, attn_block=16)
    expected = reference_logits(hf, batch)
    got = ours(model, params, batch)
    assert got.shape == expected.shape and got.dtype == np.float32
    valid = batch.attention_mask.astype(bool)
    assert np.abs(got - expected)[valid].max() <= TOL


def test_right_padded_batch_matches(hf_and_ours):
    hf, model, params = hf_and_ours
    batch = tm.make_batch([[1, (1, 4, 4), 8], [4]], pad="right", seed=3)
    valid = batch.attention_mask.astype(bool)
    assert np.abs(ours(model, params, batch) - reference_logits(hf, batch))[valid].max() <= TOL


def test_encode_images_matches_reference_vision_tower(hf_and_ours):
    hf, model, params = hf_and_ours
    batch = tm.make_batch([[1, (1, 6, 8), (1, 4, 4)]], seed=5)
    with torch.no_grad():
        expected = hf.model.get_image_features(torch.tensor(batch.pixel_values),
                                               torch.tensor(batch.image_grid_thw)).pooler_output
    expected = torch.cat(expected).numpy()
    got = np.asarray(model.encode_images(params, batch.pixel_values, batch.image_grid_thw))
    assert got.shape == expected.shape == (12 + 4, model.config.text.hidden_size)
    assert np.abs(got - expected).max() <= TOL


def test_pieces_compose_to_forward_and_jit_with_precomputed_positions(hf_and_ours):
    """hidden_states + lm_head == forward; one user-jitted function with host position ids."""
    _, model, params = hf_and_ours
    batch = tm.make_batch([[2, (1, 4, 6), 3], [9]], seed=7)
    full = ours(model, params, batch)
    position_ids, _ = model.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    embeds = model.encode_images(params, batch.pixel_values, batch.image_grid_thw)

    @jax.jit
    def logprobs(params, ids, mask, pos, image_embeds):
        h = model.hidden_states(params, ids, mask, position_ids=pos, image_embeds=image_embeds,
                                image_grid_thw=tuple(map(tuple, batch.image_grid_thw)))
        return jax.nn.log_softmax(model.lm_head(params, h))

    got = np.asarray(logprobs(params, batch.input_ids, batch.attention_mask, position_ids, embeds))
    np.testing.assert_allclose(got, np.asarray(jax.nn.log_softmax(full)), atol=1e-5)


def test_image_slot_gathers_shared_features_per_token(hf_and_ours):
    """hidden_states(image_slot=...) == the row-major scatter; two rows may share one image's
    features through their slots (the train batch's layout); bad slots name the fix."""
    _, model, params = hf_and_ours
    batch = tm.make_batch([[2, (1, 4, 4), 3], [1, (1, 4, 4), 4]], pad="left", seed=23)
    is_image = batch.input_ids == tm.IMAGE_TOKEN_ID
    slot = np.where(is_image, np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1, -1)
    pos, _ = model.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    embeds = model.encode_images(params, batch.pixel_values, batch.image_grid_thw)
    kw = dict(position_ids=pos, image_embeds=embeds)
    expected = model.hidden_states(params, batch.input_ids, batch.attention_mask, **kw)
    got = model.hidden_states(params, batch.input_ids, batch.attention_mask, image_slot=slot, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)
    # both rows point at the first image: row 1 then sees row 0's features
    shared = np.where(is_image, slot % 4, -1)
    row0 = model.hidden_states(params, batch.input_ids[:1], batch.attention_mask[:1], position_ids=pos[:, :1],
                               image_embeds=embeds[:4])
    both = model.hidden_states(params, batch.input_ids, batch.attention_mask, image_slot=shared, **kw)
    np.testing.assert_allclose(np.asarray(both[0]), np.asarray(row0[0]), atol=1e-6)
    assert float(np.max(np.abs(np.asarray(both[1]) - np.asarray(expected[1])))) > 1e-3
    with pytest.raises(ValueError, match="image_slot"):
        model.hidden_states(params, batch.input_ids, batch.attention_mask, image_slot=np.full_like(slot, -1), **kw)
    with pytest.raises(ValueError, match="image_slot"):
        model.hidden_states(params, batch.input_ids, batch.attention_mask, image_slot=slot + 100 * is_image, **kw)


def test_bfloat16_forward_close_to_float32(hf_and_ours):
    _, model, params = hf_and_ours
    batch = tm.make_batch(CASES["left_padded_mixed"], seed=11)
    params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    f32 = ours(model, params, batch)
    bf16 = ours(model, params_bf16, batch)
    assert bf16.dtype == np.float32
    valid = batch.attention_mask.astype(bool)
    diff = np.abs(bf16 - f32)[valid].max()
    assert 0 < diff <= BF16_TOL, diff


def test_causal_by_token_index_including_images(hf_and_ours):
    """Changing a later token (text or image pixel) never changes earlier logits."""
    _, model, params = hf_and_ours
    batch = tm.make_batch([[3, (1, 4, 4), 4]], seed=13)
    base = ours(model, params, batch)
    changed = tm.MultimodalBatch(batch.input_ids.copy(), batch.attention_mask, batch.pixel_values * 2,
                                 batch.image_grid_thw)
    changed.input_ids[0, -1] = (changed.input_ids[0, -1] + 1) % 100
    out = ours(model, params, changed)
    first_image = int(np.argmax(batch.input_ids[0] == tm.IMAGE_TOKEN_ID))
    np.testing.assert_array_equal(out[0, :first_image], base[0, :first_image])
    assert np.abs(out[0, first_image:] - base[0, first_image:]).max() > 1e-3


def test_remat_gradients_equal(hf_and_ours):
    """Same loss and gradients (text and vision) with per-layer remat."""
    _, model, params = hf_and_ours
    batch = tm.make_batch([[2, (1, 4, 4), 3], [4]], seed=19)
    position_ids, _ = model.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    grids = tuple(map(tuple, batch.image_grid_thw))

    def loss(params, model):
        h = model.hidden_states(params, batch.input_ids, batch.attention_mask, batch.pixel_values, grids,
                                position_ids=position_ids)
        logp = jax.nn.log_softmax(model.lm_head(params, h))
        return jnp.sum(logp[..., 0] * batch.attention_mask)

    value, grads = jax.value_and_grad(loss)(params, model)
    value_r, grads_r = jax.value_and_grad(loss)(params, dataclasses.replace(model, remat=True))
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(grads.vision.patch_embed)).max() > 0


def test_video_and_image_in_one_batch_match_transformers(hf_and_ours):
    """Videos (t > 1 grids, second_per_grid_ts spacing) next to images, left padded."""
    hf, model, params = hf_and_ours
    batch = tm.make_batch([[2, ("video", 4, 4, 6), 3, (1, 4, 4), 1], [5]], seed=23)
    seconds = np.array([1.5], np.float32)
    hf.model.rope_deltas = None
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask),
                      pixel_values=torch.tensor(batch.pixel_values), image_grid_thw=torch.tensor(batch.image_grid_thw),
                      pixel_values_videos=torch.tensor(batch.pixel_values_videos),
                      video_grid_thw=torch.tensor(batch.video_grid_thw), second_per_grid_ts=torch.tensor(seconds),
                      mm_token_type_ids=torch.tensor(batch.mm_token_type_ids)).logits.numpy()
    got = np.asarray(model.forward(params, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                   batch.image_grid_thw, pixel_values_videos=batch.pixel_values_videos,
                                   video_grid_thw=batch.video_grid_thw, second_per_grid_ts=seconds))
    valid = batch.attention_mask.astype(bool)
    assert np.abs(got - expected)[valid].max() <= TOL


def test_placeholder_count_mismatch_is_an_error(hf_and_ours):
    _, model, params = hf_and_ours
    ids = np.array([[1, 2, tm.VIDEO_TOKEN_ID, 3]])
    with pytest.raises(ValueError, match="1 video tokens"):
        model.forward(params, ids)
