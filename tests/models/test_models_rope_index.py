"""``get_rope_index`` (host NumPy) equals transformers' ``Qwen2_5_VLModel.get_rope_index`` exactly."""

import numpy as np
import pytest
import torch

from caspo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, get_rope_index
from caspo_jax.tiny import models as tm

VIDEO_SECONDS = [0.5, 1.3, 2.0]


@pytest.fixture(scope="module")
def hf_inner():
    from transformers import Qwen2_5_VLConfig as HFConfig
    from transformers import Qwen2_5_VLModel

    torch.manual_seed(0)
    return Qwen2_5_VLModel(HFConfig(**tm.hf_config_dict("text"))).eval()


def build(samples, pad):
    """samples: segments of int (text), ("image", h, w) or ("video", t, h, w)."""
    rng = np.random.default_rng(0)
    rows, images, videos = [], [], []
    for segments in samples:
        ids = []
        for seg in segments:
            if isinstance(seg, int):
                ids += rng.integers(0, 100, seg).tolist()
            elif seg[0] == "image":
                images.append((1, seg[1], seg[2]))
                ids += [tm.VISION_START_TOKEN_ID] + [tm.IMAGE_TOKEN_ID] * (seg[1] * seg[2] // 4) + [tm.VISION_END_TOKEN_ID]
            else:
                videos.append(seg[1:])
                ids += [tm.VISION_START_TOKEN_ID] + [tm.VIDEO_TOKEN_ID] * (seg[1] * seg[2] * seg[3] // 4) + [tm.VISION_END_TOKEN_ID]
        rows.append(ids)
    L = max(map(len, rows))
    input_ids = np.full((len(rows), L), 7, np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for b, ids in enumerate(rows):
        sl = slice(L - len(ids), L) if pad == "left" else slice(0, len(ids))
        input_ids[b, sl], mask[b, sl] = ids, 1
    return input_ids, mask, (np.asarray(images) if images else None), (np.asarray(videos) if videos else None)


def reference(hf_inner, input_ids, mask, images, videos, seconds):
    types = np.where(input_ids == tm.IMAGE_TOKEN_ID, 1, np.where(input_ids == tm.VIDEO_TOKEN_ID, 2, 0))
    pos, deltas = hf_inner.get_rope_index(
        torch.tensor(input_ids), mm_token_type_ids=torch.tensor(types),
        image_grid_thw=None if images is None else torch.tensor(images),
        video_grid_thw=None if videos is None else torch.tensor(videos),
        second_per_grid_ts=None if seconds is None else torch.tensor(seconds),
        attention_mask=None if mask is None else torch.tensor(mask))
    return pos.numpy(), deltas.numpy()


def ours(input_ids, mask, images, videos, seconds):
    cfg = Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("text"))
    return get_rope_index(input_ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                          spatial_merge_size=cfg.vision.spatial_merge_size,
                          tokens_per_second=cfg.vision.tokens_per_second, image_grid_thw=images,
                          video_grid_thw=videos, second_per_grid_ts=seconds, attention_mask_BxL=mask)


CASES = {
    "text_only": [[9], [5]],
    "one_image": [[3, ("image", 4, 6), 5]],
    "two_images_different_sizes": [[2, ("image", 4, 4), 3, ("image", 10, 6), 2]],
    "image_first_and_last": [[("image", 6, 4), 2, ("image", 2, 8)]],
    "mixed_batch": [[2, ("image", 4, 6), 3], [9], [1, ("image", 8, 4), 1, ("image", 4, 4), 2]],
    "videos_and_images": [[2, ("video", 3, 4, 4), 1, ("image", 4, 6), 2], [1, ("video", 2, 6, 4), 3, ("video", 4, 2, 2)]],
}


@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_rope_index_equals_transformers(hf_inner, case, pad):
    input_ids, mask, images, videos = build(CASES[case], pad)
    seconds = VIDEO_SECONDS[: len(videos)] if videos is not None else None
    expected_pos, expected_deltas = reference(hf_inner, input_ids, mask, images, videos, seconds)
    pos, deltas = ours(input_ids, mask, images, videos, seconds)
    assert pos.dtype == np.int64 and pos.shape == (3,) + input_ids.shape
    np.testing.assert_array_equal(pos, expected_pos)
    np.testing.assert_array_equal(deltas, expected_deltas)


def test_without_mask_and_without_seconds(hf_inner):
    input_ids, _, images, videos = build([[2, ("video", 2, 4, 4), 1, ("image", 4, 6), 2]], "left")
    expected = reference(hf_inner, input_ids, None, images, videos, None)
    got = ours(input_ids, None, images, videos, None)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_random_layouts_equal_transformers(hf_inner):
    rng = np.random.default_rng(42)
    for _ in range(25):
        samples = []
        for _ in range(rng.integers(1, 4)):
            segs = []
            for _ in range(rng.integers(1, 5)):
                kind = rng.integers(0, 3)
                if kind == 0 or (segs and not isinstance(segs[-1], int)):
                    segs.append(int(rng.integers(1, 6)))
                else:
                    h, w = 2 * rng.integers(1, 6, 2)
                    segs.append(("image", h, w))
            samples.append(segs)
        pad = ["left", "right"][rng.integers(0, 2)]
        input_ids, mask, images, videos = build(samples, pad)
        for e, g in zip(reference(hf_inner, input_ids, mask, images, videos, None),
                        ours(input_ids, mask, images, videos, None)):
            np.testing.assert_array_equal(g, e)


def test_hand_computed_positions():
    """2 text tokens, a 4x6-patch image (2x3 merged), 1 text token."""
    ids = np.array([[1, 2] + [tm.IMAGE_TOKEN_ID] * 6 + [3]])
    pos, deltas = ours(ids, None, np.array([[1, 4, 6]]), None, None)
    np.testing.assert_array_equal(pos[:, 0], [
        [0, 1, 2, 2, 2, 2, 2, 2, 5],
        [0, 1, 2, 2, 2, 3, 3, 3, 5],
        [0, 1, 2, 3, 4, 2, 3, 4, 5],
    ])
    assert deltas.tolist() == [[6 - 9]]


def test_too_few_grids_is_an_error():
    ids = np.array([[1] + [tm.IMAGE_TOKEN_ID] * 4 + [2] + [tm.IMAGE_TOKEN_ID] * 4])
    with pytest.raises(ValueError, match="image_grid_thw"):
        ours(ids, None, np.array([[1, 4, 4]]), None, None)
