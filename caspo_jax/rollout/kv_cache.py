"""Prefill and one decode step of the Qwen2.5-VL text decoder over a static-shape KV cache.

Let P denote prompts, S samples, L the (bucketed, left-padded) prompt length, C = L + T
the cache length, D width, N query heads, K key/value heads, H head dim, Y layers.
The cache is a pair of arrays [Y, S, C, K, H]; the decode step carries it through the
layer scan and writes the new token's k/v in place (``dynamic_update_slice`` on the
carry), so no step copies the cache. The maths is the port's own (``project_qkv``,
``attention``, ``gated_mlp``), so a cached decode equals the full forward up to float
summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caspo_jax.models.common.layers import attention, gated_mlp, linear, rms_norm
from caspo_jax.models.qwen2_5_vl import text as text_lib
from caspo_jax.models.qwen2_5_vl.config import TextConfig


def embed_tokens(text_params: dict, input_ids_PxL, image_embeds_UxD, image_token_id: int) -> jax.Array:
    """Token embeddings [P, L, D] with image-pad positions replaced by vision features in order.

    ``image_embeds`` may carry extra (padding) rows at the end; they are never gathered.
    """
    embeds = text_params["embed"][input_ids_PxL]
    if image_embeds_UxD is None:
        return embeds
    P, L, D = embeds.shape
    is_image = (input_ids_PxL == image_token_id).reshape(-1)
    index = jnp.clip(jnp.cumsum(is_image) - 1, 0, image_embeds_UxD.shape[0] - 1)
    scattered = image_embeds_UxD.astype(embeds.dtype)[index]
    return jnp.where(is_image[:, None], scattered, embeds.reshape(P * L, D)).reshape(P, L, D)


def _mlp_block(x, layer, cfg: TextConfig):
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    return x + gated_mlp(h, layer["gate_kernel"], layer["up_kernel"], layer["down_kernel"], cfg.hidden_act)


def prefill(text_params: dict, embeds_PxLxD, position_ids_3xPxL, mask_PxL, cfg: TextConfig, attn_impl=None):
    """All layers over the prompts. Returns final-normed hidden states [P, L, D] and the
    keys/values [Y, P, L, K, H] (rope applied to keys, as the decode step expects)."""
    cos, sin = text_lib.mrope_cos_sin(position_ids_3xPxL, cfg, embeds_PxLxD.dtype)
    mask = text_lib.causal_mask(mask_PxL)
    P, L, _ = embeds_PxLxD.shape

    def body(x, layer):
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q, k, v = text_lib.project_qkv(layer, h, cos, sin, cfg)
        out = attention(q, k, v, mask, attn_impl).reshape(P, L, -1)
        x = x + linear(out, layer["o_kernel"])
        return _mlp_block(x, layer, cfg), (k, v)

    x, (k, v) = jax.lax.scan(body, embeds_PxLxD, text_params["layers"])
    return rms_norm(x, text_params["norm"], cfg.rms_norm_eps), k, v


def decode_attention(q_SxNxH, k_SxCxKxH, v_SxCxKxH, key_mask_SxC) -> jax.Array:
    """One query per sample against its cache, grouped-query without repeating k/v.

    ``jax.nn.dot_product_attention`` repeats each kv head N/K times before the product;
    with one query that repeat is most of the work (measured ~2x slower on CPU at S=64,
    C=256, N=8, K=2). Logits and softmax in float32; masked keys get the float32 minimum
    (as ``dot_product_attention``). Returns [S, N, H].
    """
    S, N, H = q_SxNxH.shape
    K = k_SxCxKxH.shape[2]
    q = q_SxNxH.reshape(S, K, N // K, H)
    logits = jnp.einsum("skgh,sckh->skgc", q, k_SxCxKxH, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / H**0.5)
    logits = jnp.where(key_mask_SxC[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_SxCxKxH.dtype)
    return jnp.einsum("skgc,sckh->skgh", probs, v_SxCxKxH).reshape(S, N, H)


def decode_step(text_params: dict, token_S, position_S, k_YxSxCxKxH, v_YxSxCxKxH, key_mask_SxC, index,
                cfg: TextConfig):
    """Run one new token per sample at cache slot ``index`` (a traced scalar).

    position_S: its M-RoPE position (the same for the t, h and w rows, as transformers'
    decode). key_mask: which cache slots each sample may attend to (slot ``index`` included).
    Returns final-normed hidden states [S, D] and the updated cache.
    """
    x = text_params["embed"][token_S][:, None, :]
    S = x.shape[0]
    pos = jnp.broadcast_to(position_S[None, :, None], (3, S, 1))
    cos, sin = text_lib.mrope_cos_sin(pos, cfg, x.dtype)

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
        out = decode_attention(q[:, 0], k_l, v_l, key_mask_SxC).reshape(S, 1, -1)
        x = x + linear(out, layer["o_kernel"])
        return (_mlp_block(x, layer, cfg), k_all, v_all), None

    n_layers = k_YxSxCxKxH.shape[0]
    (x, k_all, v_all), _ = jax.lax.scan(body, (x, k_YxSxCxKxH, v_YxSxCxKxH),
                                        (text_params["layers"], jnp.arange(n_layers, dtype=jnp.int32)))
    return rms_norm(x[:, 0], text_params["norm"], cfg.rms_norm_eps), k_all, v_all
