"""Prefill and one decode step of the Qwen2.5-VL text decoder over a static-shape KV cache.

The sampler reaches this module as ``Qwen2_5_VL.kv_cache`` (Qwen3-VL has a twin with the
same three functions, signatures and call order). Cache layout, the layer loops and the
grouped decode attention live in ``caspo_jax.models.common.kv_cache``; the layer pieces
(biased q/k/v, o without bias, the MLP block) are ``text``'s own; this module adds the
embedding rule.

Let P denote prompts, S samples, L the (left-padded) prompt length, C = L + T the cache
length, D width, K key/value heads, H head dim, Y layers, U visual rows.
"""

from __future__ import annotations

import jax

from caspo_jax.models.common import kv_cache as common
from caspo_jax.models.common.placeholders import place_features, placeholder_slots

from . import text as text_lib
from .config import TextConfig

PIECES = common.DecoderPieces(mrope_cos_sin=text_lib.mrope_cos_sin, project_qkv=text_lib.project_qkv,
                              attention_output=text_lib.attention_output, mlp_block=text_lib.mlp_block,
                              causal_mask=text_lib.causal_mask)


def embed_tokens(text_params: dict, input_ids_PxL, image_embeds_UxD, image_token_id: int) -> jax.Array:
    """Token embeddings [P, L, D] with image-pad positions replaced by vision features in order.

    ``image_embeds`` may carry extra (padding) rows at the end; they are never gathered.
    """
    embeds = text_params["embed"][input_ids_PxL]
    if image_embeds_UxD is None:
        return embeds
    return place_features(embeds, placeholder_slots(input_ids_PxL, image_token_id, image_embeds_UxD.shape[0]),
                          image_embeds_UxD)


def prefill(text_params: dict, embeds_PxLxD, position_ids_3xPxL, mask_PxL, cfg: TextConfig, attn_impl=None):
    """All layers over the prompts. Returns final-normed hidden states [P, L, D] and the
    keys/values [Y, P, L, K, H] (rope applied to keys, as the decode step expects)."""
    return common.prefill(text_params, embeds_PxLxD, position_ids_3xPxL, mask_PxL, cfg, PIECES, attn_impl)


def decode_step_shared(text_params: dict, token_S, position_S, prompt_kv: list, prompt_mask_PxL, response_kv: list,
                       slot, cfg: TextConfig):
    """The sampler's decode step: prompt keys/values shared by a prompt's samples, per-layer
    parameters and cache arrays; see ``common.decode_step_shared``. Returns final-normed
    hidden states [S, D] and the updated per-layer response cache."""
    return common.decode_step_shared(text_params, token_S, position_S, prompt_kv, prompt_mask_PxL, response_kv, slot,
                                     cfg, PIECES)
