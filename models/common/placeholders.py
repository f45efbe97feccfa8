"""Visual features into the token stream: each placeholder token takes its row of the features.

Every path that embeds an image or video (the forward, the train step, the sampler's
prefill, both families) goes through these two functions. B rows, L tokens, U feature
rows, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def placeholder_slots(input_ids_BxL: jax.Array, token_id: int, n_rows: int) -> jax.Array:
    """[B, L] int32: each ``token_id`` placeholder's row among all placeholders in row-major
    order (image after image, row after row, as the features are laid out), -1 elsewhere.
    Clipped to ``n_rows - 1`` so padding rows at the end of a bucket are never read.

    A prefix sum over the flattened batch: a caller whose rows are sharded over devices can
    pass host-computed slots instead (the train step's ``image_slot``)."""
    is_slot = input_ids_BxL == token_id
    index = jnp.cumsum(is_slot.reshape(-1)).reshape(is_slot.shape) - 1
    return jnp.where(is_slot, jnp.clip(index, 0, max(n_rows - 1, 0)), -1).astype(jnp.int32)


def place_features(embeds_BxLxD: jax.Array, slot_BxL: jax.Array, features_UxD: jax.Array) -> jax.Array:
    """Tokens with slot >= 0 take that row of the features (cast to the embeddings' dtype): a
    per-token gather, so rows sharded over devices need no communication beyond the
    (replicated) features."""
    rows = features_UxD.astype(embeds_BxLxD.dtype)[jnp.maximum(slot_BxL, 0)]
    return jnp.where((slot_BxL >= 0)[..., None], rows, embeds_BxLxD)
