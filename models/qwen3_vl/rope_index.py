"""Host-side (NumPy) position metadata for Qwen3-VL, computed before the jitted forward.

- ``get_rope_index``: the 3-row M-RoPE position ids of the text decoder (t, h, w), equal to
  transformers' ``Qwen3VLModel.get_rope_index``. Unlike Qwen2.5-VL, a video of grid (t, h, w)
  is split into t single-frame grids (the processor separates frames with timestamp text
  such as ``<1.0 seconds>``), and every image/frame takes temporal position ``start``.
- ``vision_metadata``: the ViT's 2-D rotary positions, per-frame attention segments and the
  bilinear (align_corners=True) taps that resample the learned square position-embedding
  grid to each image's grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from caspo_jax.models.common.rope_index import (IMAGE, VIDEO, as_grids, position_ids_from_runs,
                                                token_types)

def split_video_grids(video_grid_thw) -> tuple[tuple[int, int, int], ...]:
    """Each video (t, h, w) as t frames (1, h, w), in order (transformers' timestamp layout)."""
    return tuple((1, h, w) for t, h, w in as_grids(video_grid_thw) for _ in range(t))


def get_rope_index(
    input_ids_BxL,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask_BxL=None,
    mm_token_type_ids_BxL=None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids [3, B, L] (int64) and deltas [B, 1], as transformers computes them.

    Text tokens advance all three rows together. A run of image (or video-frame) tokens for
    grid (t, h, w) gets rows (start, start + row, start + col) over its (h/m) x (w/m) merged
    patches, and the next text position is start + max(h, w)/m. Padding (attention_mask 0)
    gets position 0 and is skipped. Grids are consumed in order across the batch; as in
    transformers, adjacent placeholder runs with no token between them count as one.
    """
    types = (token_types(input_ids_BxL, image_token_id, video_token_id) if mm_token_type_ids_BxL is None
             else np.asarray(mm_token_type_ids_BxL))
    grids = {IMAGE: iter(as_grids(image_grid_thw)), VIDEO: iter(split_video_grids(video_grid_thw))}
    m = spatial_merge_size

    def run_positions(modality, grid, start):
        t, h, w = grid
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m) + start, np.arange(w // m) + start, indexing="ij")
        return np.stack([tt + start, hh, ww]).reshape(3, -1)

    return position_ids_from_runs(types, attention_mask_BxL, grids, m, run_positions,
                                  " (frames of a video must be separated by timestamp text)")


@dataclasses.dataclass(frozen=True)
class VisionMetadata:
    """Everything the ViT needs that depends only on the grids (P = total patches, in the
    HF processor's merge-block order: each m x m block of patches is contiguous).

    positions_Px2: (row, col) rotary positions.
    segment_P: attention segment id (one per image and per video frame).
    interp_index_Px4 / interp_weight_Px4: bilinear taps into the flattened G x G learned
        position-embedding table (align_corners=True), weights in float32.
    """

    positions_Px2: np.ndarray
    segment_P: np.ndarray
    interp_index_Px4: np.ndarray
    interp_weight_Px4: np.ndarray


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two linear-interpolation taps along one axis (align_corners=True, border clamp), float32
    arithmetic as transformers' ``_interpolation_axis_taps_weights``."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def vision_metadata(grids, spatial_merge_size: int, num_grid_per_side: int) -> VisionMetadata:
    """transformers' get_vision_position_ids / get_vision_cu_seqlens /
    get_vision_interpolation_indices_and_weights, in NumPy."""
    grids = as_grids(grids)
    m, side = spatial_merge_size, num_grid_per_side
    positions, segments, indices, weights = [], [], [], []
    segment = 0
    for t, h, w in grids:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        row = hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        col = ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        h_taps, h_w = _axis_taps(row, h, side)
        w_taps, w_w = _axis_taps(col, w, side)
        index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            positions.append(np.stack([row, col], axis=-1))
            indices.append(index)
            weights.append(weight)
            segments.append(np.full(h * w, segment, np.int32))
            segment += 1
    if not grids:
        raise ValueError("vision_metadata needs at least one (t, h, w) grid")
    return VisionMetadata(
        positions_Px2=np.concatenate(positions).astype(np.int32),
        segment_P=np.concatenate(segments),
        interp_index_Px4=np.concatenate(indices).astype(np.int32),
        interp_weight_Px4=np.concatenate(weights).astype(np.float32),
    )
