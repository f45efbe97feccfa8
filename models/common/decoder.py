"""The one Qwen-VL text decoder: Qwen2 (Qwen2.5-VL) and Qwen3 (Qwen3-VL) as config switches.

Let B denote batch, L sequence length, D width, N query heads, K key/value heads, H head
dim, U visual (image + video) rows, M DeepStack maps, Y layers.

The families differ in four places, each read from the text config (``TextConfig`` of the
family; see ``caspo_jax.models.common.config.TextSwitches``):

- ``qkv_bias`` / ``o_bias``: biases of the q/k/v and o projections (Qwen2: q/k/v only;
  Qwen3: all four iff ``attention_bias``);
- ``qk_norm``: per-head RMSNorm of queries and keys before rope (Qwen3);
- ``mrope_interleaved``: which position row (t, h, w) drives each rotary frequency
  (``mrope_rows``: contiguous bands for Qwen2.5-VL, interleaved for Qwen3-VL);
- DeepStack: visual features wider than D carry M extra maps, added at the visual positions
  after decoder layers 0..M-1 (Qwen3-VL; Qwen2.5-VL features have M = 0).

One layer (``decoder_layer``) serves the training forward, the sampler's prefill and its
cached decode step: without a cache it attends causally over its own keys; with one (a
``kv_cache.ResponseCache``) it writes its new keys/values there and attends the cache.
One loop (``run_layers``) runs it: a ``lax.scan`` over the stacked layer axis (forward,
prefill) or, for the decode step, unrolled over per-layer weight nodes and caches.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.models.common.layers import apply_rope, attention, causal_attention, gated_mlp, linear, rms_norm
from caspo_jax.models.common.layers import remat as remat_fn
from caspo_jax.models.common.placeholders import place_features, placeholder_slots


def mrope_rows(cfg) -> np.ndarray:
    """Which position row (0 t, 1 h, 2 w) drives each of the H/2 rotary frequencies.

    Contiguous (Qwen2.5-VL): band i of ``mrope_section`` takes row i % 3. Interleaved
    (Qwen3-VL, transformers' ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``):
    frequency j uses h if j % 3 == 1 and j < 3 * section[1], w if j % 3 == 2 and
    j < 3 * section[2], else t.
    """
    if not cfg.mrope_interleaved:
        return np.concatenate([np.full(width, i % 3, np.int32) for i, width in enumerate(cfg.mrope_section)])
    rows = np.zeros(cfg.head_dim // 2, np.int32)
    for row in (1, 2):
        rows[row:3 * cfg.mrope_section[row]:3] = row
    return rows


def mrope_cos_sin(position_ids_3xBxL: jax.Array, cfg, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, H] of M-RoPE (rows per frequency as ``mrope_rows``); angles in float32,
    then cast to ``dtype`` (as transformers).

    Contiguous bands are sliced from the [3, B, L, H/2] angles (a few static slices);
    interleaved rows gather the positions first (one gather instead of H/2 slices).
    """
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    if cfg.mrope_interleaved:
        pos = jnp.asarray(position_ids_3xBxL)[mrope_rows(cfg)]  # [H/2, B, L]
        half = jnp.moveaxis(pos, 0, -1).astype(jnp.float32) * inv_freq
    else:
        freqs = jnp.asarray(position_ids_3xBxL).astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, H/2]
        starts = np.cumsum((0, *cfg.mrope_section))
        half = jnp.concatenate([freqs[i % 3, ..., start:start + width]
                                for i, (start, width) in enumerate(zip(starts, cfg.mrope_section))], axis=-1)
    full = jnp.concatenate([half, half], axis=-1)
    return jnp.cos(full).astype(dtype), jnp.sin(full).astype(dtype)


def causal_mask(attention_mask_BxL: jax.Array) -> jax.Array:
    """[B, 1, L, L] boolean: query i may attend key j iff j <= i and key j is not padding.
    Causal by token index, image tokens included (as transformers)."""
    L = attention_mask_BxL.shape[-1]
    causal = jnp.tril(jnp.ones((L, L), bool))
    return causal[None, None] & attention_mask_BxL.astype(bool)[:, None, None, :]


def project_qkv(layer, x_BxLxD, cos_BxLxH, sin_BxLxH, cfg):
    """Queries [B, L, N, H] and keys/values [B, L, K, H]: biases when ``cfg.qkv_bias``, per-head
    q/k RMSNorm when ``cfg.qk_norm``, then rope on q and k."""
    B, L, _ = x_BxLxD.shape
    H = cfg.head_dim

    bias = cfg.qkv_bias
    q = linear(x_BxLxD, layer.q_kernel, layer.q_bias if bias else None).reshape(B, L, cfg.num_attention_heads, H)
    k = linear(x_BxLxD, layer.k_kernel, layer.k_bias if bias else None).reshape(B, L, cfg.num_key_value_heads, H)
    v = linear(x_BxLxD, layer.v_kernel, layer.v_bias if bias else None).reshape(B, L, cfg.num_key_value_heads, H)
    if cfg.qk_norm:
        q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
    return apply_rope(q, cos_BxLxH, sin_BxLxH), apply_rope(k, cos_BxLxH, sin_BxLxH), v


def attention_output(layer, out_BxLxNH, cfg) -> jax.Array:
    """The o projection [B, L, D] (with its bias when ``cfg.o_bias``)."""
    return linear(out_BxLxNH, layer.o_kernel, layer.o_bias if cfg.o_bias else None)


def mlp_block(x_BxLxD, layer, cfg) -> jax.Array:
    """x + mlp(norm(x))."""
    h = rms_norm(x_BxLxD, layer.mlp_norm, cfg.rms_norm_eps)
    return x_BxLxD + gated_mlp(h, layer.gate_kernel, layer.up_kernel, layer.down_kernel, cfg.hidden_act)


def decoder_layer(x_BxLxD, layer, cos_BxLxH, sin_BxLxH, cfg, *, mask_Bx1xLxL=None, attn_impl=None,
                  attn_block: int = 0, cache=None):
    """Pre-norm block: x + o(attn(norm(x))), then x + mlp(norm(x)). Returns (x [B, L, D], kv).

    Without ``cache``: causal self-attention under ``mask`` (in query blocks of
    ``attn_block`` tokens, or one dense call when 0); kv = this layer's (k, v) [B, L, K, H]
    (the prefill keeps them, the training forward drops them). With ``cache`` (an object
    whose ``attend(q, k, v)`` writes k/v and attends the cache, e.g.
    ``kv_cache.ResponseCache``): kv = the updated cache.
    """
    B, L, _ = x_BxLxD.shape
    h = rms_norm(x_BxLxD, layer.attn_norm, cfg.rms_norm_eps)
    q, k, v = project_qkv(layer, h, cos_BxLxH, sin_BxLxH, cfg)
    if cache is not None:
        out, kv = cache.attend(q, k, v)
    elif attn_block:
        out, kv = causal_attention(q, k, v, mask_Bx1xLxL, attn_impl, block=attn_block), (k, v)
    else:
        out, kv = attention(q, k, v, mask_Bx1xLxL, attn_impl), (k, v)
    x_BxLxD = x_BxLxD + attention_output(layer, out.reshape(B, L, -1), cfg)
    return mlp_block(x_BxLxD, layer, cfg), kv


def run_layers(layers, x_BxLxD, layer_fn: Callable, *, caches: list | None = None, remat: bool | str = False,
               keep_kv: bool = False):
    """``layer_fn(x, layer, i, cache) -> (x, kv)`` over every layer. Returns (x, kvs).

    Stacked ``layers`` (a ``TextLayers`` node of [Y, ...] arrays, ``caches`` None): one ``lax.scan`` (the
    body rematerialised as ``remat`` says); kvs = the stacked (k [Y, B, L, K, H], v) when
    ``keep_kv``, else None. A list of per-layer nodes with one cache each (the decode step):
    unrolled, so no step slices a copy of the stacked weights or cache; kvs = the list of
    updated caches.
    """
    if caches is not None:
        kvs = []
        for i, (layer, cache) in enumerate(zip(layers, caches)):
            x_BxLxD, kv = layer_fn(x_BxLxD, layer, i, cache)
            kvs.append(kv)
        return x_BxLxD, kvs

    def body(x, layer_and_index):
        layer, i = layer_and_index
        x, kv = layer_fn(x, layer, i, None)
        return x, (kv if keep_kv else None)

    n_layers = jax.tree.leaves(layers)[0].shape[0]
    return jax.lax.scan(remat_fn(body, remat), x_BxLxD, (layers, jnp.arange(n_layers, dtype=jnp.int32)))


def split_visual_features(features_UxF: jax.Array, hidden_size: int) -> tuple[jax.Array, jax.Array]:
    """[U, (1 + M) * D] -> merged features [U, D] and DeepStack features [M, U, D] (M = 0 for
    Qwen2.5-VL, whose features are [U, D])."""
    U = features_UxF.shape[0]
    stacked = features_UxF.reshape(U, -1, hidden_size)
    return stacked[:, 0], jnp.moveaxis(stacked[:, 1:], 1, 0)


def embed_with_visuals(text_params, input_ids_BxL, visuals):
    """(embeds [B, L, D], deepstack [M, U, D] or None, visual_index [B, L] or None): token
    embeddings with each placeholder replaced by its merged visual feature, the M DeepStack
    maps kept compact (one row per visual token, for ``add_deepstack``) and each position's
    row in them (-1 for text). Both are None when the features carry no DeepStack maps.

    visuals: (token_id, features [U_i, (1 + M) * D] or None, slot [B, L] or None) per kind
    of visual input (images, videos), in the order their rows are stacked; a None slot is
    computed from the placeholders (``placeholder_slots``). The forward and the sampler's
    prefill both embed through here.
    """
    embeds = text_params.embed[input_ids_BxL]
    D = embeds.shape[-1]
    stacks, visual_index, offset = [], jnp.full(input_ids_BxL.shape, -1, jnp.int32), 0
    for token_id, features, slot in visuals:
        if features is None:
            continue
        merged_UxD, stack_MxUxD = split_visual_features(features, D)
        if slot is None:
            slot = placeholder_slots(input_ids_BxL, token_id, merged_UxD.shape[0])
        slot = jnp.asarray(slot, jnp.int32)
        embeds = place_features(embeds, slot, merged_UxD)
        visual_index = jnp.where(slot >= 0, slot + offset, visual_index)
        stacks.append(stack_MxUxD)
        offset += merged_UxD.shape[0]
    if not stacks or stacks[0].shape[0] == 0:
        return embeds, None, None
    return embeds, jnp.concatenate(stacks, axis=1), visual_index


def add_deepstack(x_BxLxD, layer_index, deepstack_MxUxD, visual_index_BxL) -> jax.Array:
    """After decoder layer ``layer_index`` (< M), add DeepStack map ``layer_index`` at the visual
    positions (transformers' ``_deepstack_process``); other layers pass ``x`` through unchanged.

    visual_index_BxL: for each token, its row in ``deepstack`` (visual tokens in row-major
    order, images and videos interleaved as they appear), -1 for text and padding.
    """
    M = deepstack_MxUxD.shape[0]
    i = jnp.minimum(layer_index, M - 1)
    features_UxD = jax.lax.dynamic_index_in_dim(deepstack_MxUxD, i, keepdims=False).astype(x_BxLxD.dtype)
    add = features_UxD[jnp.maximum(visual_index_BxL, 0)]
    use = (visual_index_BxL >= 0) & (layer_index < M)
    return jnp.where(use[..., None], x_BxLxD + add, x_BxLxD)


def decode(params, embeds_BxLxD, position_ids_3xBxL, attention_mask_BxL, cfg, attn_impl: str | None = None,
           remat: bool | str = False, attn_block: int = 128, deepstack_MxUxD=None, visual_index_BxL=None,
           keep_kv: bool = False):
    """All decoder layers (one ``lax.scan``) and the final norm: hidden states [B, L, D], and
    with ``keep_kv`` also the keys/values [Y, B, L, K, H] (rope applied to the keys).

    The training forward calls it with ``remat`` / ``attn_block``; the sampler's prefill
    (``kv_cache.prefill``) with ``keep_kv``. With ``deepstack``, map i is added to the visual
    positions after layer i (i < M), i.e. after the first M decoder layers whatever the
    vision layers they were tapped from.
    """
    cos, sin = mrope_cos_sin(position_ids_3xBxL, cfg, embeds_BxLxD.dtype)
    mask = causal_mask(attention_mask_BxL)
    if deepstack_MxUxD is not None and deepstack_MxUxD.shape[0] > cfg.num_hidden_layers:
        deepstack_MxUxD = deepstack_MxUxD[:cfg.num_hidden_layers]  # transformers ignores maps past the last layer

    def layer_fn(x, layer, i, cache):
        x, kv = decoder_layer(x, layer, cos, sin, cfg, mask_Bx1xLxL=mask, attn_impl=attn_impl,
                              attn_block=attn_block)
        if deepstack_MxUxD is not None:
            x = add_deepstack(x, i, deepstack_MxUxD, visual_index_BxL)
        return x, kv

    x, kv = run_layers(params.layers, embeds_BxLxD, layer_fn, remat=remat, keep_kv=keep_kv)
    h = rms_norm(x, params.norm, cfg.rms_norm_eps)
    return (h, *kv) if keep_kv else h


def lm_head(params, h_xD: jax.Array, tie_word_embeddings: bool) -> jax.Array:
    """Logits in float32 (accumulated in float32 whatever the parameter dtype)."""
    head_VxD = params.embed if tie_word_embeddings else params.lm_head
    return jnp.einsum("...d,vd->...v", h_xD, head_VxD, preferred_element_type=jnp.float32)
