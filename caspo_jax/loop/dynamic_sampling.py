"""DAPO's dynamic sampling (`rollout.dynamic_sampling`): a step trains only prompt groups
whose outcome rewards vary; groups with one reward for every sample (all safe, all
unsafe) carry no group-relative outcome advantage and are dropped, and more prompts are
drawn until the step's P groups are full (at most rollout.dynamic_sampling_max_draws
batches). If they are still short, the remaining slots take the dropped groups, in draw
order, so the step keeps its shape; the fill rate (informative groups / P) says how often.

The arrays are one draw's host arrays as `caspo_jax.loop.placement.merge_prompt_rows`
returns them: per prompt ids/mask and teacher_ids/teacher_mask [P, L] (left-padded),
pixels [N, D] and grids [I, 3] in prompt order with images [P] per prompt; per rollout
(G per prompt, prompt-major) tokens/response_mask [P*G, T] (right-padded) and any other
[P*G, ...] array.
"""

from __future__ import annotations

import numpy as np

__all__ = ["concat_prompt_rows", "fill_groups", "informative_groups", "take_prompts"]

PROMPT_ROWS = (("ids", "mask"), ("teacher_ids", "teacher_mask"))
IMAGE_KEYS = ("pixels", "grids", "images")
RIGHT_PADDED = ("tokens", "response_mask")


def informative_groups(rewards_S: np.ndarray, ok_S: np.ndarray, group_size: int) -> np.ndarray:
    """bool [P]: the group's rewards all scored (ok) and not all equal."""
    rewards = np.asarray(rewards_S, np.float64).reshape(-1, group_size)
    ok = np.asarray(ok_S, bool).reshape(-1, group_size).all(axis=1)
    spread = np.where(ok, np.nan_to_num(rewards).max(axis=1) - np.nan_to_num(rewards).min(axis=1), 0.0)
    return ok & (spread > 0)


def take_prompts(part: dict, index, group_size: int) -> dict:
    """The prompts `index` of one draw (in that order) with their images and G rollouts each."""
    index = np.asarray(index, np.int64)
    G = group_size
    images = np.asarray(part["images"], np.int64)
    first_image = np.concatenate([[0], np.cumsum(images)])
    grids = np.asarray(part["grids"]).reshape(-1, 3)
    patches = np.prod(grids, axis=1) if len(grids) else np.zeros(0, np.int64)
    first_patch = np.concatenate([[0], np.cumsum(patches)])
    image_rows = np.concatenate([np.arange(first_image[p], first_image[p + 1]) for p in index] or [[]]).astype(int)
    pixel_rows = np.concatenate([np.arange(first_patch[i], first_patch[i + 1]) for i in image_rows] or [[]])
    rows = (index[:, None] * G + np.arange(G)[None]).reshape(-1)
    out = {}
    for key, value in part.items():
        if key in ("ids", "mask", "teacher_ids", "teacher_mask", "images"):
            out[key] = np.asarray(value)[index]
        elif key == "grids":
            out[key] = grids[image_rows]
        elif key == "pixels":
            out[key] = np.asarray(value)[pixel_rows.astype(int)]
        else:
            out[key] = np.asarray(value)[rows]
    return out


def concat_prompt_rows(parts: list[dict], pad_id: int) -> dict:
    """Draws one after another: prompts re-left-padded to the widest, responses right-padded
    to the longest, images and every other array concatenated."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for ids, mask in PROMPT_ROWS:
        width = max(p[ids].shape[1] for p in parts)
        out[ids] = np.concatenate([np.pad(p[ids], ((0, 0), (width - p[ids].shape[1], 0)), constant_values=pad_id)
                                   for p in parts])
        out[mask] = np.concatenate([np.pad(p[mask], ((0, 0), (width - p[mask].shape[1], 0))) for p in parts])
    for key in RIGHT_PADDED:
        width = max(p[key].shape[1] for p in parts)
        out[key] = np.concatenate([np.pad(p[key], ((0, 0), (0, width - p[key].shape[1]))) for p in parts])
    for key in parts[0]:
        if key not in out:
            out[key] = np.concatenate([np.asarray(p[key]) for p in parts])
    return out


def fill_groups(draws: list[dict], informative: list[np.ndarray], prompts: int, group_size: int,
                pad_id: int) -> tuple[dict, int]:
    """(the step's arrays, informative groups in it): the first `prompts` informative groups
    over the draws in order, then dropped ones (in draw order) for any slot left."""
    chosen = [[] for _ in draws]
    left = prompts
    for keep in (True, False):
        for d, flags in enumerate(informative):
            picked = [int(p) for p in np.flatnonzero(np.asarray(flags) == keep)][:left]
            chosen[d].extend(picked)
            left -= len(picked)
    n_informative = sum(int(np.asarray(f)[c].sum()) for f, c in zip(informative, chosen) if c)
    parts = [take_prompts(part, sorted(c), group_size) for part, c in zip(draws, chosen) if c]
    return concat_prompt_rows(parts, pad_id), n_informative
