"""The train step's input: prompt + response rows in two layouts, built on the host in NumPy.

Let P be prompts, B = rows (trajectories; row b answers prompt ``prompt_index[b]``), Lp the
(padded) prompt length, T the (padded) response length, L = Lp + T.

Every row is ``[left-padded prompt | right-padded response]``, so response token t sits at
column Lp + t in BOTH layouts -- the student's (plain prompt) and the teacher's
(constitution-conditioned prompt, its own Lp) -- and its log-prob comes from the hidden
state at column Lp + t - 1. That is the whole alignment: no per-row offsets on the device.

Images: the P prompts' images are encoded once (``pixel_values`` / ``image_grid_thw`` in
prompt order, as ``caspo_jax.data.pipeline.PromptBatch`` holds them); ``image_slot_BxL``
maps each image-placeholder token of every row to its row of that encoding (-1 elsewhere),
computed here on the host from per-prompt offsets, so G rows sharing a prompt share one
vision forward, rows can be sliced freely, and the device gathers features per token with
no prefix sum across (sharded) rows (``model.hidden_states(image_slot=...)``).
M-RoPE positions are computed per prompt with the model's ``get_rope_index`` and the
response continues them (text tokens advance t/h/w together), equal to transformers'
positions for the full row (tested).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """One layout (student or teacher) of the B rows.

    input_ids_BxL, attention_mask_BxL: int32; position_ids_3xBxL: int32 M-RoPE ids;
    image_slot_BxL: int32 row of the batch's image encoding for placeholder tokens, else -1
    (passed to ``hidden_states(image_slot=...)``: a per-token gather, no prefix sum over
    rows). prompt_len (static): Lp.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    image_slot: np.ndarray
    prompt_len: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """B rows with everything the log-prob, advantage and loss functions need.

    response_ids_BxT (int32), response_mask_BxT (float32, 1 on response tokens).
    pixel_values [N, C] float32 for the prompts' images (or None); image_grid_thw (static)
    their grids as a tuple of (t, h, w); image_embeds [U, D] may replace pixel_values (a
    frozen vision tower encoded outside the differentiated function: no recompilation per
    image layout). teacher: the constitution-conditioned layout (None: not built).
    Per-step signals, [B, T] float32, filled by ``with_signals`` before ``train_step``:
    old_logp (pi_old, recomputed by the trainer), ref_logp (pi_ref, for the KL; may be None
    with beta = 0), advantages, rollout_logp (the rollout engine's log-probs, only for the
    truncated importance-sampling correction).
    """

    student: SequenceLayout
    teacher: SequenceLayout | None
    response_ids: np.ndarray
    response_mask: np.ndarray
    pixel_values: np.ndarray | None = None
    image_embeds: np.ndarray | None = None
    old_logp: np.ndarray | None = None
    ref_logp: np.ndarray | None = None
    advantages: np.ndarray | None = None
    rollout_logp: np.ndarray | None = None
    image_grid_thw: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def num_rows(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_len(self) -> int:
        return int(self.response_ids.shape[1])

    def with_signals(self, **signals) -> "TrainBatch":
        """A copy with some of old_logp, ref_logp, advantages, rollout_logp, image_embeds set."""
        allowed = {"old_logp", "ref_logp", "advantages", "rollout_logp", "image_embeds"}
        unknown = set(signals) - allowed
        if unknown:
            raise TypeError(f"TrainBatch.with_signals: unknown field(s) {sorted(unknown)}; allowed {sorted(allowed)}")
        return dataclasses.replace(self, **signals)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prompt_grids(prompt_ids_PxL, prompt_mask_PxL, grids, image_token_id: int, merge: int):
    """Split the prompt-order grids per prompt by counting placeholder tokens; also each
    prompt's first row in the image encoding."""
    per_prompt, offsets = [], []
    cursor, offset = 0, 0
    for p in range(prompt_ids_PxL.shape[0]):
        need = int(np.sum((prompt_ids_PxL[p] == image_token_id) & (prompt_mask_PxL[p] > 0)))
        mine, have = [], 0
        while have < need:
            if cursor >= len(grids):
                raise ValueError(f"build_train_batch: prompt {p} has {need} image tokens but image_grid_thw runs "
                                 f"out after {len(grids)} images; pass every prompt's grids in prompt order")
            t, h, w = grids[cursor]
            mine.append((t, h, w))
            have += t * h * w // merge**2
            cursor += 1
        if have != need:
            raise ValueError(f"build_train_batch: prompt {p} has {need} image tokens, its grids {mine} give {have}")
        per_prompt.append(tuple(mine))
        offsets.append(offset)
        offset += have
    if cursor != len(grids):
        raise ValueError(f"build_train_batch: image_grid_thw has {len(grids)} images, the prompts use {cursor}")
    return per_prompt, offsets


def _layout(model, prompt_ids_PxL, prompt_mask_PxL, per_prompt_grids, offsets, response_ids_BxT,
            response_mask_BxT, prompt_index_B, prompt_len: int) -> SequenceLayout:
    cfg = model.config
    P, Lraw = prompt_ids_PxL.shape
    B, T = response_ids_BxT.shape
    pad = prompt_len - Lraw
    ids_PxL = np.zeros((P, prompt_len), np.int32)
    mask_PxL = np.zeros((P, prompt_len), np.int32)
    ids_PxL[:, pad:] = prompt_ids_PxL
    mask_PxL[:, pad:] = prompt_mask_PxL
    pos_3xPxL = np.zeros((3, P, prompt_len), np.int32)
    slot_PxL = np.full((P, prompt_len), -1, np.int32)
    next_pos = np.zeros(P, np.int64)
    for p in range(P):
        pos, _ = model.get_rope_index(ids_PxL[p:p + 1], per_prompt_grids[p] or None, mask_PxL[p:p + 1])
        pos_3xPxL[:, p] = pos[:, 0]
        valid = mask_PxL[p] > 0
        next_pos[p] = pos[:, 0][:, valid].max() + 1 if valid.any() else 0
        is_image = (ids_PxL[p] == cfg.image_token_id) & valid
        slot_PxL[p, is_image] = offsets[p] + np.arange(int(is_image.sum()))
    resp_valid = response_mask_BxT > 0
    resp_pos_BxT = np.where(resp_valid, next_pos[prompt_index_B][:, None] + np.cumsum(resp_valid, 1) - 1, 0)
    position_ids = np.concatenate(
        [pos_3xPxL[:, prompt_index_B], np.broadcast_to(resp_pos_BxT, (3, B, T))], axis=2).astype(np.int32)
    slot_BxL = np.concatenate([slot_PxL[prompt_index_B], np.full((B, T), -1, np.int32)], 1)
    return SequenceLayout(
        input_ids=np.concatenate([ids_PxL[prompt_index_B], response_ids_BxT], 1).astype(np.int32),
        attention_mask=np.concatenate([mask_PxL[prompt_index_B], resp_valid.astype(np.int32)], 1),
        position_ids=position_ids,
        image_slot=slot_BxL,
        prompt_len=prompt_len,
    )


def build_train_batch(
    model,
    prompt_ids_PxL,
    prompt_mask_PxL,
    response_ids_BxT,
    response_mask_BxT,
    prompt_index_B,
    *,
    teacher_prompt_ids_PxL=None,
    teacher_prompt_mask_PxL=None,
    pixel_values=None,
    image_grid_thw=None,
    length_multiple: int = 1,
) -> TrainBatch:
    """Host-side (NumPy) builder the trainer calls once per rollout batch (or mini-batch).

    Prompts are left-padded [P, Lp] (``PromptBatch.input_ids`` / ``attention_mask``);
    teacher prompts are the constitution-conditioned ones (``PromptBatch.teacher_*``,
    same images); responses right-padded [B, T] with a contiguous mask (the rollout's);
    ``prompt_index_B`` says which prompt each row answers. ``length_multiple`` pads the
    prompt (left) and response (right) lengths up to a multiple, so one compiled step
    serves many batches. The model is used only for ``get_rope_index`` and its
    config's ``image_token_id`` / ``vision.spatial_merge_size``.
    """
    prompt_ids = np.asarray(prompt_ids_PxL)
    prompt_mask = np.asarray(prompt_mask_PxL)
    response_ids = np.asarray(response_ids_BxT)
    response_mask = np.asarray(response_mask_BxT)
    prompt_index = np.asarray(prompt_index_B).astype(np.int64)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"build_train_batch: prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} "
                         "must both be [P, Lp]")
    if response_ids.ndim != 2 or response_ids.shape != response_mask.shape:
        raise ValueError(f"build_train_batch: response_ids {response_ids.shape} and response_mask "
                         f"{response_mask.shape} must both be [B, T]")
    B, T = response_ids.shape
    if prompt_index.shape != (B,) or prompt_index.min(initial=0) < 0 or prompt_index.max(initial=0) >= len(prompt_ids):
        raise ValueError(f"build_train_batch: prompt_index must be [B={B}] ints in [0, {len(prompt_ids)})")
    valid = response_mask > 0
    if np.any(valid[:, 1:] & ~valid[:, :-1]):
        raise ValueError("build_train_batch: response_mask must be a contiguous prefix per row (right padding); "
                         "mask out nothing inside a response")
    T_pad = _round_up(max(T, 1), length_multiple)
    if T_pad != T:
        response_ids = np.pad(response_ids, ((0, 0), (0, T_pad - T)))
        response_mask = np.pad(response_mask, ((0, 0), (0, T_pad - T)))
    response_ids = np.where(response_mask > 0, response_ids, 0).astype(np.int32)

    cfg = model.config
    merge = cfg.vision.spatial_merge_size
    grids = () if image_grid_thw is None else tuple(tuple(int(x) for x in g) for g in np.asarray(image_grid_thw).reshape(-1, 3))
    if grids and pixel_values is None:
        raise ValueError("build_train_batch: image_grid_thw given without pixel_values")
    per_prompt, offsets = _prompt_grids(prompt_ids, prompt_mask, grids, cfg.image_token_id, merge)

    def layout(ids, mask):
        return _layout(model, ids, mask, per_prompt, offsets, response_ids, response_mask, prompt_index,
                       _round_up(ids.shape[1], length_multiple))

    student = layout(prompt_ids, prompt_mask)
    teacher = None
    if teacher_prompt_ids_PxL is not None:
        t_ids, t_mask = np.asarray(teacher_prompt_ids_PxL), np.asarray(teacher_prompt_mask_PxL)
        if t_ids.shape[0] != prompt_ids.shape[0] or t_ids.shape != t_mask.shape:
            raise ValueError(f"build_train_batch: teacher prompts {t_ids.shape} / mask {t_mask.shape} must be "
                             f"[P={prompt_ids.shape[0]}, Lt]")
        t_grids, _ = _prompt_grids(t_ids, t_mask, grids, cfg.image_token_id, merge)
        if t_grids != per_prompt:
            raise ValueError("build_train_batch: teacher prompts must hold the same images as the student prompts")
        teacher = layout(t_ids, t_mask)
    return TrainBatch(
        student=student,
        teacher=teacher,
        response_ids=response_ids,
        response_mask=(response_mask > 0).astype(np.float32),
        pixel_values=None if pixel_values is None else np.asarray(pixel_values, np.float32),
        image_grid_thw=grids,
    )


def take_rows(batch: TrainBatch, rows) -> TrainBatch:
    """The batch restricted to ``rows`` (host NumPy), e.g. one PPO mini-batch; images are kept
    whole (``image_slot`` indexes the full encoding)."""
    rows = np.asarray(rows)

    def sub(layout):
        if layout is None:
            return None
        slot = np.asarray(layout.image_slot)[rows]
        return SequenceLayout(np.asarray(layout.input_ids)[rows], np.asarray(layout.attention_mask)[rows],
                              np.asarray(layout.position_ids)[:, rows], slot, layout.prompt_len)

    def opt(x):
        return None if x is None else np.asarray(x)[rows]

    return dataclasses.replace(
        batch, student=sub(batch.student), teacher=sub(batch.teacher), response_ids=batch.response_ids[rows],
        response_mask=batch.response_mask[rows], old_logp=opt(batch.old_logp), ref_logp=opt(batch.ref_logp),
        advantages=opt(batch.advantages), rollout_logp=opt(batch.rollout_logp))
