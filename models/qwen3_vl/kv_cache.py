"""Prefill and one decode step of the Qwen3-VL text decoder over a static-shape KV cache.

The sampler reaches this module as ``Qwen3VL.kv_cache``: the twin of
``caspo_jax.models.qwen2_5_vl.kv_cache`` (same three functions, signatures and call order).
Cache layout, layer loops and grouped decode attention are shared
(``caspo_jax.models.common.kv_cache``); Qwen3-VL adds its pieces (q/k RMSNorm, o bias via
``text.project_qkv`` / ``text.attention_output``) and DeepStack inside the prefill.

Let P denote prompts, S samples, L the (left-padded) prompt length, T the response length,
D width, K key/value heads, H head dim, Y layers, M DeepStack maps. ``embed_tokens``
returns [P, L, (1 + M) * D]: the token embeddings (visual features scattered in) followed by
each DeepStack map already placed at its visual positions (zeros elsewhere); ``prefill`` adds
map m after layer m. Decoded tokens are text, so ``decode_step_shared`` has no DeepStack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caspo_jax.models.common import kv_cache as common
from caspo_jax.models.common.placeholders import place_features, placeholder_slots

from . import text as text_lib
from .config import TextConfig

PIECES = common.DecoderPieces(mrope_cos_sin=text_lib.mrope_cos_sin, project_qkv=text_lib.project_qkv,
                              attention_output=text_lib.attention_output, mlp_block=text_lib.mlp_block,
                              causal_mask=text_lib.causal_mask)


def embed_tokens(text_params: dict, input_ids_PxL, image_embeds_UxF, image_token_id: int) -> jax.Array:
    """[P, L, (1 + M) * D]: embeddings with image-pad positions replaced by the merged features,
    then the M DeepStack maps at the image positions (``image_embeds`` from
    ``Qwen3VL.encode_images``; extra padding rows at its end are never gathered)."""
    embeds = text_params["embed"][input_ids_PxL]
    if image_embeds_UxF is None:
        return embeds
    D = embeds.shape[-1]
    slot = placeholder_slots(input_ids_PxL, image_token_id, image_embeds_UxF.shape[0])
    placed = place_features(jnp.zeros((*slot.shape, image_embeds_UxF.shape[-1]), embeds.dtype), slot, image_embeds_UxF)
    merged = jnp.where((slot >= 0)[..., None], placed[..., :D], embeds)  # one gather serves both parts
    return jnp.concatenate([merged, placed[..., D:]], axis=-1)


def prefill(text_params: dict, embeds_PxLxF, position_ids_3xPxL, mask_PxL, cfg: TextConfig, attn_impl=None):
    """All layers over the prompts, DeepStack map m added after layer m. Returns final-normed
    hidden states [P, L, D] and the keys/values [Y, P, L, K, H] (rope applied to keys)."""
    D = cfg.hidden_size
    P, L, F = embeds_PxLxF.shape
    deepstack_MxPxLxD = jnp.moveaxis(embeds_PxLxF[..., D:].reshape(P, L, F // D - 1, D), 2, 0)
    M = deepstack_MxPxLxD.shape[0]

    def add_deepstack(x, i):
        add = jax.lax.dynamic_index_in_dim(deepstack_MxPxLxD, jnp.minimum(i, M - 1), keepdims=False)
        return jnp.where(i < M, x + add, x)

    return common.prefill(text_params, embeds_PxLxF[..., :D], position_ids_3xPxL, mask_PxL, cfg, PIECES, attn_impl,
                          after_layer=add_deepstack if M else None)


def decode_step_shared(text_params: dict, token_S, position_S, prompt_kv: list, prompt_mask_PxL, response_kv: list,
                       slot, cfg: TextConfig):
    """The sampler's decode step: prompt keys/values shared by a prompt's samples, per-layer
    parameters and cache arrays; see ``common.decode_step_shared``. Returns final-normed
    hidden states [S, D] and the updated per-layer response cache."""
    return common.decode_step_shared(text_params, token_S, position_S, prompt_kv, prompt_mask_PxL, response_kv, slot,
                                     cfg, PIECES)
