"""build_train_batch: layouts, alignment, M-RoPE positions equal to transformers' rule, errors."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _step_fixtures as fx  # noqa: E402

from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from caspo_jax.tiny import models as tm  # noqa: E402
from caspo_jax.step import build_train_batch, take_rows  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("vision")))


@pytest.fixture(scope="module")
def parts():
    return fx.prompts(seed=0, constitution=5), fx.responses(seed=1)


def build(model, parts, **kwargs):
    (ids, mask, t_ids, t_mask, pixels, grids), (r_ids, r_mask, index) = parts
    return build_train_batch(model, ids, mask, r_ids, r_mask, index, teacher_prompt_ids_PxL=t_ids,
                             teacher_prompt_mask_PxL=t_mask, pixel_values=pixels, image_grid_thw=grids, **kwargs)


@pytest.mark.parametrize("multiple", [1, 8])
def test_rows_are_prompt_then_response_in_both_layouts(model, parts, multiple):
    (ids, mask, t_ids, t_mask, _, _), (r_ids, r_mask, index) = parts
    batch = build(model, parts, length_multiple=multiple)
    for seq, p_ids, p_mask in ((batch.student, ids, mask), (batch.teacher, t_ids, t_mask)):
        Lp = seq.prompt_len
        assert Lp % multiple == 0 and Lp >= p_ids.shape[1]
        T = batch.response_len
        assert seq.input_ids.shape == (fx.P * fx.G, Lp + T) and T % multiple == 0
        for b in range(batch.num_rows):
            n = int(r_mask[b].sum())
            np.testing.assert_array_equal(seq.input_ids[b, Lp:Lp + n], r_ids[b, :n])
            assert seq.attention_mask[b, Lp:].sum() == n
            prompt = p_ids[index[b]][p_mask[index[b]] > 0]
            np.testing.assert_array_equal(seq.input_ids[b, :Lp][seq.attention_mask[b, :Lp] > 0], prompt)
        np.testing.assert_array_equal(batch.response_mask[:, :r_mask.shape[1]], r_mask)


def test_positions_equal_get_rope_index_on_full_rows(model, parts):
    """Per-prompt positions + a continued response equal transformers' rule on each full row."""
    _, _, _, _, _, grids = parts[0]
    batch = build(model, parts)
    row_grids = np.repeat(grids, fx.G, axis=0)
    for seq in (batch.student, batch.teacher):
        expected, _ = model.get_rope_index(seq.input_ids, row_grids, seq.attention_mask)
        valid = seq.attention_mask > 0
        np.testing.assert_array_equal(seq.position_ids[:, valid], expected[:, valid])


def test_image_slots_point_at_each_prompts_encoding(model, parts):
    batch = build(model, parts)
    per_prompt = fx.GRID[0] * fx.GRID[1] * fx.GRID[2] // tm.MERGE**2
    for seq in (batch.student, batch.teacher):
        for b in range(batch.num_rows):
            p = b // fx.G
            slots = seq.image_slot[b][seq.image_slot[b] >= 0]
            np.testing.assert_array_equal(slots, p * per_prompt + np.arange(per_prompt))
            assert np.all(seq.input_ids[b][seq.image_slot[b] >= 0] == tm.IMAGE_TOKEN_ID)


def test_take_rows_slices_every_row_field(model, parts):
    batch = build(model, parts)
    adv = np.arange(batch.response_ids.size, dtype=np.float32).reshape(batch.response_ids.shape)
    sub = take_rows(batch.with_signals(advantages=adv), [5, 1])
    np.testing.assert_array_equal(sub.student.position_ids, batch.student.position_ids[:, [5, 1]])
    np.testing.assert_array_equal(sub.teacher.image_slot, batch.teacher.image_slot[[5, 1]])
    np.testing.assert_array_equal(sub.advantages, adv[[5, 1]])
    assert sub.pixel_values is batch.pixel_values and sub.image_grid_thw == batch.image_grid_thw


def test_bad_inputs_name_the_field(model, parts):
    (ids, mask, t_ids, t_mask, pixels, grids), (r_ids, r_mask, index) = parts
    holes = r_mask.copy()
    holes[0, 1] = 0
    with pytest.raises(ValueError, match="contiguous prefix"):
        build_train_batch(model, ids, mask, r_ids, holes, index)
    with pytest.raises(ValueError, match="image_grid_thw"):
        build_train_batch(model, ids, mask, r_ids, r_mask, index, pixel_values=pixels, image_grid_thw=grids[:1])
    with pytest.raises(ValueError, match="prompt_index"):
        build_train_batch(model, ids, mask, r_ids, r_mask, index + 5)
    with pytest.raises(TypeError, match="unknown field"):
        build(model, parts).with_signals(advantage=None)
