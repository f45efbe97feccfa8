"""Prefill and one decode step of the Qwen3-VL text decoder over a static-shape KV cache.

The sampler reaches this module as ``Qwen3VL.kv_cache``: the twin of
``caspo_jax.models.qwen2_5_vl.kv_cache`` (same three functions, signatures and call order).
Cache layout, layer loops and grouped decode attention are shared
(``caspo_jax.models.common.kv_cache``); Qwen3-VL adds its pieces (q/k RMSNorm, o bias via
``text.project_qkv`` / ``text.attention_output``) and DeepStack inside the prefill.

Let P denote prompts, S samples, L the (left-padded) prompt length, T the response length,
D width, K key/value heads, H head dim, Y layers, U visual tokens, M DeepStack maps.
``embed_tokens`` returns the embedded prompts as (embeds [P, L, D], deepstack [M, U, D] or
None, visual_index [P, L] or None): the merged visual features scattered into the token
embeddings, the DeepStack maps kept compact (one row per visual token, as the training
forward keeps them, instead of [P, L, M * D] mostly zeros) and each position's row in them
(-1 for text). ``prefill`` adds map m at the visual positions after layer m
(``text.add_deepstack``). Decoded tokens are text, so ``decode_step_shared`` has no DeepStack.
"""

from __future__ import annotations

from caspo_jax.models.common import kv_cache as common

from . import text as text_lib
from .config import TextConfig

PIECES = common.DecoderPieces(mrope_cos_sin=text_lib.mrope_cos_sin, project_qkv=text_lib.project_qkv,
                              attention_output=text_lib.attention_output, mlp_block=text_lib.mlp_block,
                              causal_mask=text_lib.causal_mask)


def embed_tokens(text_params: dict, input_ids_PxL, image_embeds_UxF, image_token_id: int):
    """(embeds [P, L, D], deepstack [M, U, D] or None, visual_index [P, L] or None) of the
    prompts (``text.embed_with_visuals``): image-pad positions hold the merged features of
    ``image_embeds`` (from ``Qwen3VL.encode_images``; extra padding rows at its end are
    never gathered)."""
    return text_lib.embed_with_visuals(text_params, input_ids_PxL, ((image_token_id, image_embeds_UxF, None),))


def prefill(text_params: dict, embedded, position_ids_3xPxL, mask_PxL, cfg: TextConfig, attn_impl=None):
    """All layers over ``embed_tokens``' prompts, DeepStack map m added after layer m. Returns
    final-normed hidden states [P, L, D] and the keys/values [Y, P, L, K, H] (rope applied to
    keys)."""
    embeds_PxLxD, deepstack_MxUxD, visual_index_PxL = embedded
    after_layer = None
    if deepstack_MxUxD is not None:
        def after_layer(x, i):
            return text_lib.add_deepstack(x, i, deepstack_MxUxD, visual_index_PxL)

    return common.prefill(text_params, embeds_PxLxD, position_ids_3xPxL, mask_PxL, cfg, PIECES, attn_impl,
                          after_layer=after_layer)


def decode_step_shared(text_params: dict, token_S, position_S, prompt_kv: list, prompt_mask_PxL, response_kv: list,
                       slot, cfg: TextConfig):
    """The sampler's decode step: prompt keys/values shared by a prompt's samples, per-layer
    parameters and cache arrays; see ``common.decode_step_shared``. Returns final-normed
    hidden states [S, D] and the updated per-layer response cache."""
    return common.decode_step_shared(text_params, token_S, position_S, prompt_kv, prompt_mask_PxL, response_kv, slot,
                                     cfg, PIECES)
