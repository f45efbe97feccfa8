"""Host-side preparation of a Qwen-VL forward's visual inputs, shared by every family.

Checks that the placeholder tokens in ``input_ids`` and the image/video grids (or
precomputed embeddings) describe the same number of merged patches, computes M-RoPE
position ids on the host when the caller did not pass them, and runs the vision tower for
inputs given as pixels. The family-specific parts come from the model:
``get_rope_index``, ``encode_images``, ``config.{image,video}_token_id`` and
``config.vision.spatial_merge_size``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.models.common.rope_index import as_grids


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def prepare_visual_inputs(model, params: dict, input_ids, attention_mask, position_ids, *, pixel_values=None,
                          image_grid_thw=None, image_embeds=None, pixel_values_videos=None, video_grid_thw=None,
                          video_embeds=None, rope_extra: tuple = (), embed_width: int | None = None,
                          embed_width_terms: str = "", image_slot=None):
    """(attention_mask [B, L], position_ids [3, B, L] or None, [image features, video features]).

    rope_extra: further positional arguments of ``model.get_rope_index`` after the video
        grids (Qwen2.5-VL: ``second_per_grid_ts``).
    embed_width: the feature width ``encode_images`` returns, checked on given embeddings
        (Qwen3-VL: the merger output plus its DeepStack maps); ``embed_width_terms`` says
        what makes it up, for the error message.
    """
    cfg = model.config
    image_grids, video_grids = as_grids(image_grid_thw), as_grids(video_grid_thw)
    if attention_mask is None:
        attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
    if position_ids is None and (image_grids or video_grids):
        if is_traced(input_ids) or is_traced(attention_mask):
            raise ValueError("position_ids must be given when input_ids are traced: compute them on the "
                             "host with model.get_rope_index(input_ids, image_grid_thw, attention_mask)")
        position_ids, _ = model.get_rope_index(input_ids, image_grids, attention_mask, video_grids, *rope_extra)
    features = []
    for kind, token_id, grids, pixels, embeds in (
            ("image", cfg.image_token_id, image_grids, pixel_values, image_embeds),
            ("video", cfg.video_token_id, video_grids, pixel_values_videos, video_embeds)):
        if embeds is not None and not grids and position_ids is None:
            raise ValueError(f"{kind}_embeds given without {kind}_grid_thw or position_ids: the M-RoPE "
                             f"positions of the {kind} tokens need one of them")
        if kind == "image" and image_slot is not None:
            _check_image_slot(input_ids, image_slot, token_id, embeds, grids, cfg.vision.spatial_merge_size)
        elif not is_traced(input_ids):
            n_tokens = int(np.sum(np.asarray(input_ids) == token_id))
            n_features = sum(t * h * w for t, h, w in grids) // cfg.vision.spatial_merge_size**2
            if embeds is not None and not grids:
                n_features = int(embeds.shape[0])
            if n_tokens != n_features:
                raise ValueError(f"input_ids has {n_tokens} {kind} tokens (id {token_id}), "
                                 f"{kind}_grid_thw / {kind}_embeds describe {n_features} merged patches")
        if embed_width is not None and embeds is not None and embeds.shape[-1] != embed_width:
            terms = f"{embed_width_terms} = " if embed_width_terms else ""
            raise ValueError(f"{kind}_embeds has width {embeds.shape[-1]}, expected {terms}{embed_width}: pass "
                             "model.encode_images' output unchanged")
        if grids and embeds is None:
            if pixels is None:
                name = "pixel_values" if kind == "image" else "pixel_values_videos"
                raise ValueError(f"{kind}_grid_thw given without {name} or {kind}_embeds")
            embeds = model.encode_images(params, pixels, grids)
        features.append(embeds)
    return attention_mask, position_ids, features


def _check_image_slot(input_ids, image_slot, token_id: int, embeds, grids, merge: int) -> None:
    """Placeholders and ``image_slot`` agree (host values only; traced ones are trusted)."""
    if jnp.shape(image_slot) != jnp.shape(input_ids):
        raise ValueError(f"image_slot has shape {jnp.shape(image_slot)}, input_ids {jnp.shape(input_ids)}: "
                         "pass one slot per token (-1 on non-image tokens)")
    if is_traced(input_ids) or is_traced(image_slot):
        return
    ids, slot = np.asarray(input_ids), np.asarray(image_slot)
    if np.any((slot >= 0) != (ids == token_id)):
        raise ValueError(f"image_slot must be >= 0 exactly on the image tokens (id {token_id}) of input_ids")
    n_rows = int(embeds.shape[0]) if embeds is not None else sum(t * h * w for t, h, w in grids) // merge**2
    if slot.size and slot.max() >= n_rows:
        raise ValueError(f"image_slot points at row {int(slot.max())}, the image features have {n_rows} rows")
