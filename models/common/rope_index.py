"""Host-side (NumPy) pieces of the M-RoPE position ids every Qwen-VL family shares.

The 3-row position ids (t, h, w) of the text decoder are built run by run: a run of text
tokens advances all three rows together; a run of image (or video) placeholders is placed
by the family (``run_positions``) and the next text position is start + max(h, w)/m. As in
transformers, adjacent placeholder runs with no token between them count as one. B rows,
L tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def as_grids(grid_thw) -> tuple[tuple[int, int, int], ...]:
    """``image_grid_thw`` ([n, 3] array, list or tuple) as a hashable tuple of int triples."""
    if grid_thw is None:
        return ()
    try:
        arr = np.asarray(grid_thw)
    except Exception as err:  # a jax tracer
        raise TypeError(
            "image_grid_thw must be concrete (NumPy / tuple), not traced: the vision metadata is "
            "computed on the host. Mark it static in jax.jit (pass a tuple of (t, h, w)).") from err
    arr = arr.reshape(-1, 3)
    return tuple((int(t), int(h), int(w)) for t, h, w in arr)


def token_types(input_ids_BxL, image_token_id: int, video_token_id: int) -> np.ndarray:
    """0 text, 1 image, 2 video per token: the ``mm_token_type_ids`` the HF processor returns."""
    ids = np.asarray(input_ids_BxL)
    return np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT))


def position_ids_from_runs(types_BxL: np.ndarray, attention_mask_BxL, grids: dict, spatial_merge_size: int,
                           run_positions: Callable, missing_hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids [3, B, L] (int64) and deltas [B, 1] from each token's type.

    grids: {IMAGE: iterator, VIDEO: iterator} of (t, h, w), consumed in order across the
    batch, one per placeholder run. ``run_positions(modality, grid, start)`` -> [3, n] the
    run's positions. Padding (attention_mask 0) gets position 0 and is skipped.
    """
    batch, length = types_BxL.shape
    mask = None if attention_mask_BxL is None else np.asarray(attention_mask_BxL).astype(bool)
    position_ids = np.zeros((3, batch, length), dtype=np.int64)
    deltas = []
    for b in range(batch):
        sample_types = types_BxL[b] if mask is None else types_BxL[b][mask[b]]
        pieces, current = [], 0
        for modality, group in itertools.groupby(sample_types.tolist()):
            span = len(list(group))
            if modality == TEXT:
                pieces.append(np.broadcast_to(np.arange(span) + current, (3, span)))
                current += span
                continue
            try:
                grid = next(grids[modality])
            except StopIteration:
                kind = "image_grid_thw" if modality == IMAGE else "video_grid_thw"
                raise ValueError(f"sample {b} has more {kind.split('_')[0]} placeholder runs than {kind} "
                                 f"rows{missing_hint}") from None
            pieces.append(run_positions(modality, grid, current))
            current += max(grid[1], grid[2]) // spatial_merge_size
        positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        if mask is None:
            position_ids[:, b] = positions
        else:
            position_ids[:, b, mask[b]] = positions
        deltas.append((positions.max() + 1 if positions.size else 0) - len(sample_types))
    return position_ids, np.asarray(deltas, dtype=np.int64)[:, None]
