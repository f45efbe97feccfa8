"""Host-side (NumPy) position metadata, computed before the jitted forward.

- ``get_rope_index``: the 3-row M-RoPE position ids of the text decoder (t, h, w), equal
  to transformers' ``Qwen2_5_VLModel.get_rope_index`` for any mix of text, images and
  videos per sample and left or right padding.
- ``vision_metadata``: the ViT's window permutation, attention segments (one per image,
  one per window) and 2-D rotary positions for a tuple of ``(t, h, w)`` grids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from caspo_jax.models.common.rope_index import (IMAGE, VIDEO, as_grids, position_ids_from_runs,
                                                token_types)


def _vision_positions(start: int, grid: tuple[int, int, int], spatial_merge: int, time_interval) -> np.ndarray:
    """[3, t*h*w/merge^2] positions of one image/video placed after ``start`` text positions."""
    t, h, w = grid[0], grid[1] // spatial_merge, grid[2] // spatial_merge
    steps = np.arange(t, dtype=np.float32 if isinstance(time_interval, np.floating) else np.int64)
    pos_t = (steps * time_interval).astype(np.int64)
    pos_h = np.arange(h) + start
    pos_w = np.arange(w) + start
    tt, hh, ww = np.meshgrid(pos_t, pos_h, pos_w, indexing="ij")
    out = np.stack([tt, hh, ww]).reshape(3, -1)
    out[0] += start
    return out


def get_rope_index(
    input_ids_BxL,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: int = 4,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask_BxL=None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids [3, B, L] (int64) and deltas [B, 1], as transformers computes them.

    Text tokens advance all three rows together; an image of grid (t, h, w) occupies
    (h/m) x (w/m) tokens whose rows are (start, start + row, start + col), and the next text
    position is start + max(h, w)/m. Padding (attention_mask 0) gets position 0 and is
    skipped. Images/videos are consumed in order across the batch. Note that, as in
    transformers, adjacent placeholder runs with no token between them count as one.
    """
    grids = {IMAGE: iter(as_grids(image_grid_thw)), VIDEO: iter(as_grids(video_grid_thw))}
    if second_per_grid_ts is None:
        seconds = iter([1] * np.shape(input_ids_BxL)[1])
    else:  # transformers multiplies float32 tensors: keep float32 so truncation agrees
        sec = np.asarray(second_per_grid_ts)
        seconds = iter(sec.astype(np.float32) if sec.dtype.kind == "f" else sec)

    def run_positions(modality, grid, start):
        interval = 1
        if modality == VIDEO:
            second = next(seconds)
            interval = (np.float32(tokens_per_second) * second if isinstance(second, np.floating)
                        else tokens_per_second * int(second))
        return _vision_positions(start, grid, spatial_merge_size, interval)

    types = token_types(input_ids_BxL, image_token_id, video_token_id)
    return position_ids_from_runs(types, attention_mask_BxL, grids, spatial_merge_size, run_positions)


@dataclasses.dataclass(frozen=True)
class VisionMetadata:
    """Everything the ViT needs that depends only on the grids (P = total patches).

    window_index_U: permutation of merge units (2x2 patch groups) into window order.
    reverse_index_U: its inverse, applied after the merger.
    positions_Px2: (row, col) rotary positions in window order.
    image_segment_P / window_segment_P: attention segment ids in window order (full-attention
    blocks attend within one image, the others within one window).
    """

    window_index_U: np.ndarray
    reverse_index_U: np.ndarray
    positions_Px2: np.ndarray
    image_segment_P: np.ndarray
    window_segment_P: np.ndarray


def _segments_from_cu(cu_seqlens: np.ndarray) -> np.ndarray:
    lengths = np.diff(cu_seqlens)
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


def vision_metadata(grids, spatial_merge_size: int, window_size: int, patch_size: int) -> VisionMetadata:
    """transformers' get_vision_position_ids / _attention_seqlens / _window_index, in NumPy."""
    grids = as_grids(grids)
    m = spatial_merge_size
    unit = m * m
    positions, window_index, image_lengths, window_lengths = [], [], [], []
    offset = 0
    merger_window = window_size // m // patch_size
    for t, h, w in grids:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        hpos = hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        wpos = ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        positions.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
        image_lengths.extend([h * w] * t)

        gh, gw = h // m, w // m
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h = merger_window - gh % merger_window
        pad_w = merger_window - gw % merger_window
        nwh, nww = (gh + pad_h) // merger_window, (gw + pad_w) // merger_window
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nwh, merger_window, nww, merger_window).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nwh * nww, merger_window * merger_window)
        seqlens = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        window_lengths.extend((seqlens[seqlens > 0] * unit).tolist())
        offset += t * gh * gw
    window_index_U = np.concatenate(window_index).astype(np.int32)
    positions_Px2 = np.concatenate(positions).reshape(-1, unit, 2)[window_index_U].reshape(-1, 2)
    image_cu = np.concatenate([[0], np.cumsum(image_lengths)])
    window_cu = np.concatenate([[0], np.cumsum(window_lengths)])
    return VisionMetadata(
        window_index_U=window_index_U,
        reverse_index_U=np.argsort(window_index_U).astype(np.int32),
        positions_Px2=positions_Px2.astype(np.int32),
        image_segment_P=_segments_from_cu(image_cu),
        window_segment_P=_segments_from_cu(window_cu),
    )
