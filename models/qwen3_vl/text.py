"""The Qwen3 text decoder of Qwen3-VL: per-head q/k RMSNorm, interleaved M-RoPE, DeepStack.

Let B denote batch, L sequence length, D width, N query heads, K key/value heads, H head
dim, U visual (image + video) tokens, S the number of DeepStack feature maps. Function
names and signatures match ``caspo_jax.models.qwen2_5_vl.text`` (``mrope_cos_sin``,
``causal_mask``, ``project_qkv``, ``decoder_layer``, ``decode``, ``lm_head``) so KV-cache
code can take either module; ``add_deepstack`` is the one extra step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.models.common.layers import apply_rope, attention, causal_attention, gated_mlp, linear, rms_norm
from caspo_jax.models.common.layers import remat as remat_fn
from caspo_jax.models.common.placeholders import place_features, placeholder_slots

from .config import TextConfig


def mrope_rows(cfg: TextConfig) -> np.ndarray:
    """Which position row (0 t, 1 h, 2 w) drives each of the H/2 frequencies, interleaved as
    transformers' ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``: frequency j uses h
    if j % 3 == 1 and j < 3 * section[1], w if j % 3 == 2 and j < 3 * section[2], else t."""
    half = cfg.head_dim // 2
    rows = np.zeros(half, np.int32)
    for row in (1, 2):
        rows[row:3 * cfg.mrope_section[row]:3] = row
    return rows


def mrope_cos_sin(position_ids_3xBxL: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, H] of interleaved M-RoPE; angles in float32, then cast to ``dtype``."""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    pos = jnp.asarray(position_ids_3xBxL)[mrope_rows(cfg)]  # [H/2, B, L]
    half = jnp.moveaxis(pos, 0, -1).astype(jnp.float32) * inv_freq
    full = jnp.concatenate([half, half], axis=-1)
    return jnp.cos(full).astype(dtype), jnp.sin(full).astype(dtype)


def causal_mask(attention_mask_BxL: jax.Array) -> jax.Array:
    """[B, 1, L, L] boolean: query i may attend key j iff j <= i and key j is not padding.
    Causal by token index, image tokens included (as transformers)."""
    L = attention_mask_BxL.shape[-1]
    causal = jnp.tril(jnp.ones((L, L), bool))
    return causal[None, None] & attention_mask_BxL.astype(bool)[:, None, None, :]


def project_qkv(layer: dict, x_BxLxD, cos_BxLxH, sin_BxLxH, cfg: TextConfig):
    """Queries [B, L, N, H] and keys/values [B, L, K, H]: q/k RMSNorm per head, then rope."""
    B, L, _ = x_BxLxD.shape
    H = cfg.head_dim
    q = linear(x_BxLxD, layer["q_kernel"], layer.get("q_bias")).reshape(B, L, cfg.num_attention_heads, H)
    k = linear(x_BxLxD, layer["k_kernel"], layer.get("k_bias")).reshape(B, L, cfg.num_key_value_heads, H)
    v = linear(x_BxLxD, layer["v_kernel"], layer.get("v_bias")).reshape(B, L, cfg.num_key_value_heads, H)
    q = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos_BxLxH, sin_BxLxH), apply_rope(k, cos_BxLxH, sin_BxLxH), v


def attention_output(layer: dict, out_BxLxNH) -> jax.Array:
    """The o projection (with its bias when ``attention_bias``)."""
    return linear(out_BxLxNH, layer["o_kernel"], layer.get("o_bias"))


def mlp_block(x_BxLxD, layer: dict, cfg: TextConfig) -> jax.Array:
    """x + mlp(norm(x))."""
    h = rms_norm(x_BxLxD, layer["mlp_norm"], cfg.rms_norm_eps)
    return x_BxLxD + gated_mlp(h, layer["gate_kernel"], layer["up_kernel"], layer["down_kernel"], cfg.hidden_act)


def decoder_layer(x_BxLxD, layer: dict, cos_BxLxH, sin_BxLxH, mask_Bx1xLxL, cfg: TextConfig, attn_impl=None,
                  attn_block: int = 128):
    """Pre-norm block: x + o(attn(norm(x))), then x + mlp(norm(x))."""
    B, L, _ = x_BxLxD.shape
    h = rms_norm(x_BxLxD, layer["attn_norm"], cfg.rms_norm_eps)
    q, k, v = project_qkv(layer, h, cos_BxLxH, sin_BxLxH, cfg)
    if attn_block:
        out = causal_attention(q, k, v, mask_Bx1xLxL, attn_impl, block=attn_block)
    else:
        out = attention(q, k, v, mask_Bx1xLxL, attn_impl)
    x_BxLxD = x_BxLxD + attention_output(layer, out.reshape(B, L, -1))
    return mlp_block(x_BxLxD, layer, cfg)


def split_visual_features(features_UxF: jax.Array, hidden_size: int) -> tuple[jax.Array, jax.Array]:
    """[U, (1 + S) * D] -> merged features [U, D] and DeepStack features [S, U, D]."""
    U = features_UxF.shape[0]
    stacked = features_UxF.reshape(U, -1, hidden_size)
    return stacked[:, 0], jnp.moveaxis(stacked[:, 1:], 1, 0)


def embed_with_visuals(text_params: dict, input_ids_BxL, visuals):
    """(embeds [B, L, D], deepstack [S, U, D] or None, visual_index [B, L] or None): token
    embeddings with each placeholder replaced by its merged visual feature, the S DeepStack
    maps kept compact (one row per visual token, for ``decode`` / ``add_deepstack``) and each
    position's row in them (-1 for text).

    visuals: (token_id, features [U_i, (1 + S) * D] or None, slot [B, L] or None) per kind
    of visual input (images, videos), in the order their rows are stacked; a None slot is
    computed from the placeholders (``placeholder_slots``). The forward and the sampler's
    prefill both embed through here.
    """
    embeds = text_params["embed"][input_ids_BxL]
    D = embeds.shape[-1]
    stacks, visual_index, offset = [], jnp.full(input_ids_BxL.shape, -1, jnp.int32), 0
    for token_id, features, slot in visuals:
        if features is None:
            continue
        merged_UxD, stack_SxUxD = split_visual_features(features, D)
        if slot is None:
            slot = placeholder_slots(input_ids_BxL, token_id, merged_UxD.shape[0])
        slot = jnp.asarray(slot, jnp.int32)
        embeds = place_features(embeds, slot, merged_UxD)
        visual_index = jnp.where(slot >= 0, slot + offset, visual_index)
        stacks.append(stack_SxUxD)
        offset += merged_UxD.shape[0]
    if not stacks or stacks[0].shape[0] == 0:
        return embeds, None, None
    return embeds, jnp.concatenate(stacks, axis=1), visual_index


def add_deepstack(x_BxLxD, layer_index, deepstack_SxUxD, visual_index_BxL) -> jax.Array:
    """After decoder layer ``layer_index`` (< S), add DeepStack map ``layer_index`` at the visual
    positions (transformers' ``_deepstack_process``); other layers pass ``x`` through unchanged.

    visual_index_BxL: for each token, its row in ``deepstack`` (visual tokens in row-major
    order, images and videos interleaved as they appear), -1 for text and padding.
    """
    S = deepstack_SxUxD.shape[0]
    i = jnp.minimum(layer_index, S - 1)
    features_UxD = jax.lax.dynamic_index_in_dim(deepstack_SxUxD, i, keepdims=False).astype(x_BxLxD.dtype)
    add = features_UxD[jnp.maximum(visual_index_BxL, 0)]
    use = (visual_index_BxL >= 0) & (layer_index < S)
    return jnp.where(use[..., None], x_BxLxD + add, x_BxLxD)


def decode(params: dict, embeds_BxLxD, position_ids_3xBxL, attention_mask_BxL, cfg: TextConfig,
           attn_impl: str | None = None, remat: bool | str = False, attn_block: int = 128,
           deepstack_SxUxD=None, visual_index_BxL=None) -> jax.Array:
    """All decoder layers (one ``lax.scan`` over the stacked layer axis) and the final norm.

    With ``deepstack``, map i is added to the visual positions after layer i (i < S), i.e.
    after the first S decoder layers whatever the vision layers they were tapped from.
    """
    cos, sin = mrope_cos_sin(position_ids_3xBxL, cfg, embeds_BxLxD.dtype)
    mask = causal_mask(attention_mask_BxL)
    n_layers = cfg.num_hidden_layers
    if deepstack_SxUxD is not None and deepstack_SxUxD.shape[0] > n_layers:
        deepstack_SxUxD = deepstack_SxUxD[:n_layers]  # transformers ignores maps past the last layer

    def body(x, layer_and_index):
        layer, i = layer_and_index
        x = decoder_layer(x, layer, cos, sin, mask, cfg, attn_impl, attn_block)
        if deepstack_SxUxD is not None:
            x = add_deepstack(x, i, deepstack_SxUxD, visual_index_BxL)
        return x, None

    body = remat_fn(body, remat)
    x, _ = jax.lax.scan(body, embeds_BxLxD, (params["layers"], jnp.arange(n_layers, dtype=jnp.int32)))
    return rms_norm(x, params["norm"], cfg.rms_norm_eps)


def lm_head(params: dict, h_xD: jax.Array, tie_word_embeddings: bool) -> jax.Array:
    """Logits in float32 (accumulated in float32 whatever the parameter dtype)."""
    head_VxD = params["embed"] if tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", h_xD, head_VxD, preferred_element_type=jnp.float32)
