"""Shared tiny-model fixtures for tests/step (one checkpoint, one batch layout)."""

from __future__ import annotations

import numpy as np

from caspo_jax.tiny import models as tm

P, G, T = 2, 4, 8
GRID = (1, 4, 4)  # 4 merged image tokens


def prompts(seed: int = 0, constitution: int = 0):
    """Left-padded student prompts [P, Lp] (one image each) and teacher prompts with
    `constitution` extra text tokens before the question; pixel values and grids."""
    rng = np.random.default_rng(seed)
    rows, teacher_rows = [], []
    for p in range(P):
        n_text = 3 + 2 * p
        before = rng.integers(0, tm.VOCAB - 8, 2).tolist()
        after = rng.integers(0, tm.VOCAB - 8, n_text).tolist()
        const = rng.integers(0, tm.VOCAB - 8, constitution).tolist()
        rows.append(before + tm.image_tokens(GRID) + after)
        teacher_rows.append(const + before + tm.image_tokens(GRID) + after)

    def pad(rs):
        L = max(len(r) for r in rs)
        ids = np.zeros((len(rs), L), np.int32)
        mask = np.zeros((len(rs), L), np.int32)
        for i, r in enumerate(rs):
            ids[i, L - len(r):] = r
            mask[i, L - len(r):] = 1
        return ids, mask

    ids, mask = pad(rows)
    t_ids, t_mask = pad(teacher_rows)
    patch_dim = 3 * 2 * tm.PATCH_SIZE * tm.PATCH_SIZE
    pixels = rng.standard_normal((P * GRID[0] * GRID[1] * GRID[2], patch_dim)).astype(np.float32)
    grids = np.asarray([GRID] * P)
    return ids, mask, t_ids, t_mask, pixels, grids


def responses(seed: int = 1):
    """[B, T] right-padded responses with varying lengths, prompt-major rows."""
    rng = np.random.default_rng(seed)
    B = P * G
    ids = rng.integers(0, tm.VOCAB - 8, (B, T)).astype(np.int32)
    lengths = rng.integers(3, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    return ids, mask, np.repeat(np.arange(P), G)
