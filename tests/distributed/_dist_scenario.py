"""The scenario shared by the two-process test and its worker: a tiny Qwen2.5-VL, one
batch of 2 prompts x 4 responses (one image per prompt), fixed CASPO signals, two steps."""

from __future__ import annotations

import jax
import numpy as np

from caspo_jax.algo import CaspoConfig
from caspo_jax.models import load_pretrained
from caspo_jax.tiny import models as tm
from caspo_jax.step import StepConfig, build_train_batch, init_state, make_train_step

P, G, T = 2, 4, 8
GRID = (1, 4, 4)
CASPO = CaspoConfig(group_size=G, prompts_per_step=P, beta=0.04)
# lr 2e-4: Adam divides by sqrt(v), so reduction-order differences in near-zero gradients
# grow with the step size; at 1e-3 two steps measured 1.1e-5 on the patch embedding.
CFG = StepConfig(learning_rate=2e-4, max_grad_norm=1.0)
STEPS = 2


def write_checkpoint(path) -> None:
    tm.save_hf_checkpoint(path, "vision", seed=11)


def batch_for(model):
    """The full batch (every process can build it: it is deterministic)."""
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, tm.VOCAB - 8, 2).tolist() + tm.image_tokens(GRID)
            + rng.integers(0, tm.VOCAB - 8, 3 + 2 * p).tolist() for p in range(P)]
    L = max(map(len, rows))
    ids = np.zeros((P, L), np.int32)
    mask = np.zeros((P, L), np.int32)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    pixels = rng.standard_normal((P * GRID[1] * GRID[2], 3 * 2 * tm.PATCH_SIZE ** 2)).astype(np.float32)
    r_ids = rng.integers(0, tm.VOCAB - 8, (P * G, T)).astype(np.int32)
    r_mask = (np.arange(T)[None] < rng.integers(3, T + 1, P * G)[:, None]).astype(np.int32)
    batch = build_train_batch(model, ids, mask, r_ids, r_mask, np.repeat(np.arange(P), G),
                              pixel_values=pixels, image_grid_thw=np.asarray([GRID] * P))
    valid = batch.response_mask > 0
    old = np.where(valid, -rng.uniform(4, 8, (P * G, T)), 0).astype(np.float32)
    ref = np.where(valid, old + rng.normal(0, 0.3, old.shape), 0).astype(np.float32)
    adv = np.where(valid, np.repeat(rng.standard_normal(P * G)[:, None], T, 1), 0).astype(np.float32)
    return batch.with_signals(old_logp=old, ref_logp=ref, advantages=adv)


def run(model, state, batch, mesh=None):
    """(final state, [loss per step]) of STEPS train steps on one batch."""
    step = make_train_step(model, CFG, CASPO, mesh=mesh)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(np.asarray(metrics["loss"])))
    return state, losses


def single_process(path):
    model, params = load_pretrained(path)
    state, losses = run(model, init_state(params, CFG), batch_for(model))
    return jax.tree.map(np.asarray, state.params), losses


def flat(params) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
