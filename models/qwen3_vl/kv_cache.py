"""Prefill and one decode step of the Qwen3-VL text decoder over a static-shape KV cache.

Drop-in twin of ``caspo_jax.rollout.kv_cache`` (same three functions, same signatures and
call order) for Qwen3-VL: q/k RMSNorm and the o bias come from ``text.project_qkv`` /
``text.attention_output``, and DeepStack rides inside the prefill embeddings.

Let P denote prompts, S samples, L the (left-padded) prompt length, C = L + T the cache
length, D width, K key/value heads, H head dim, Y layers, M DeepStack maps. ``embed_tokens``
returns [P, L, (1 + M) * D]: the token embeddings (visual features scattered in) followed by
each DeepStack map already placed at its visual positions (zeros elsewhere); ``prefill`` adds
map m after layer m. Decoded tokens are text, so ``decode_step`` has no DeepStack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caspo_jax.models.common.layers import attention, rms_norm

from . import text as text_lib
from .config import TextConfig


def embed_tokens(text_params: dict, input_ids_PxL, image_embeds_UxF, image_token_id: int) -> jax.Array:
    """[P, L, (1 + M) * D]: embeddings with image-pad positions replaced by the merged features,
    then the M DeepStack maps at the image positions (``image_embeds`` from
    ``Qwen3VL.encode_images``; extra padding rows at its end are never gathered)."""
    embeds = text_params["embed"][input_ids_PxL]
    if image_embeds_UxF is None:
        return embeds
    P, L, D = embeds.shape
    is_image = (input_ids_PxL == image_token_id)[..., None]
    index = jnp.clip(jnp.cumsum((input_ids_PxL == image_token_id).reshape(-1)) - 1, 0, image_embeds_UxF.shape[0] - 1)
    rows = image_embeds_UxF.astype(embeds.dtype)[index].reshape(P, L, -1)
    placed = jnp.where(is_image, rows, 0.0)
    return jnp.concatenate([jnp.where(is_image, rows[..., :D], embeds), placed[..., D:]], axis=-1)


def prefill(text_params: dict, embeds_PxLxF, position_ids_3xPxL, mask_PxL, cfg: TextConfig, attn_impl=None):
    """All layers over the prompts. Returns final-normed hidden states [P, L, D] and the
    keys/values [Y, P, L, K, H] (rope applied to keys, as the decode step expects)."""
    D = cfg.hidden_size
    P, L, F = embeds_PxLxF.shape
    x = embeds_PxLxF[..., :D]
    deepstack_MxPxLxD = jnp.moveaxis(embeds_PxLxF[..., D:].reshape(P, L, F // D - 1, D), 2, 0)
    M = deepstack_MxPxLxD.shape[0]
    cos, sin = text_lib.mrope_cos_sin(position_ids_3xPxL, cfg, x.dtype)
    mask = text_lib.causal_mask(mask_PxL)

    def body(x, layer_and_i):
        layer, i = layer_and_i
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q, k, v = text_lib.project_qkv(layer, h, cos, sin, cfg)
        out = attention(q, k, v, mask, attn_impl).reshape(P, L, -1)
        x = text_lib.mlp_block(x + text_lib.attention_output(layer, out), layer, cfg)
        if M:
            add = jax.lax.dynamic_index_in_dim(deepstack_MxPxLxD, jnp.minimum(i, M - 1), keepdims=False)
            x = jnp.where(i < M, x + add, x)
        return x, (k, v)

    x, (k, v) = jax.lax.scan(body, x, (text_params["layers"], jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)))
    return rms_norm(x, text_params["norm"], cfg.rms_norm_eps), k, v


def decode_step(text_params: dict, token_S, position_S, k_YxSxCxKxH, v_YxSxCxKxH, key_mask_SxC, index,
                cfg: TextConfig, attn_impl=None):
    """Run one new token per sample at cache slot ``index`` (a traced scalar).

    position_S: its M-RoPE position (the same for the t, h and w rows, as transformers'
    decode). key_mask: which cache slots each sample may attend to (slot ``index`` included).
    Returns final-normed hidden states [S, D] and the updated cache.
    """
    x = text_params["embed"][token_S][:, None, :]
    S = x.shape[0]
    pos = jnp.broadcast_to(position_S[None, :, None], (3, S, 1))
    cos, sin = text_lib.mrope_cos_sin(pos, cfg, x.dtype)
    mask = key_mask_SxC[:, None, None, :]

    def body(carry, layer_and_i):
        x, k_all, v_all = carry
        layer, i = layer_and_i
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q, k, v = text_lib.project_qkv(layer, h, cos, sin, cfg)
        zero = jnp.zeros((), jnp.int32)
        start = (i, zero, index, zero, zero)
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
        k_l = jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False)
        v_l = jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False)
        out = attention(q, k_l, v_l, mask, attn_impl).reshape(S, 1, -1)
        x = text_lib.mlp_block(x + text_lib.attention_output(layer, out), layer, cfg)
        return (x, k_all, v_all), None

    n_layers = k_YxSxCxKxH.shape[0]
    (x, k_all, v_all), _ = jax.lax.scan(body, (x, k_YxSxCxKxH, v_YxSxCxKxH),
                                        (text_params["layers"], jnp.arange(n_layers, dtype=jnp.int32)))
    return rms_norm(x[:, 0], text_params["norm"], cfg.rms_norm_eps), k_all, v_all
