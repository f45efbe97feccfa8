"""The Qwen3-VL vision tower: ViT with learned + rotary positions, patch merger, DeepStack.

Let P denote the patches of all images together (in the processor's merge-block order),
U = P / m^2 the merged tokens (m = spatial_merge_size), E the ViT width, O the LLM width,
S the number of DeepStack taps. The host-side ``VisionMetadata`` (rotary positions,
per-frame segments, position-embedding interpolation taps) is precomputed in NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.models.common.layers import (activation, apply_vision_rope, linear, segment_attention,
                                            vision_rope)
from caspo_jax.models.common.layers import remat as remat_fn

from .config import VisionConfig
from .rope_index import VisionMetadata

LAYER_NORM_EPS = 1e-6


def layer_norm(x_xE: jax.Array, scale_E: jax.Array, bias_E: jax.Array, eps: float = LAYER_NORM_EPS) -> jax.Array:
    """torch ``nn.LayerNorm``: statistics, scale and bias in float32, the result cast back."""
    x32 = x_xE.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale_E.astype(jnp.float32) + bias_E.astype(jnp.float32)).astype(x_xE.dtype)


def position_embeddings(pos_embed_GGxE: jax.Array, meta: VisionMetadata, dtype) -> jax.Array:
    """[P, E] learned position embeddings bilinearly resampled to each image's grid
    (four taps per patch, weights in float32 as transformers), cast to ``dtype``."""
    taps = pos_embed_GGxE.astype(jnp.float32)[jnp.asarray(meta.interp_index_Px4)]  # [P, 4, E]
    return jnp.sum(taps * jnp.asarray(meta.interp_weight_Px4)[..., None], axis=1).astype(dtype)


def vision_block(x_PxE, layer, cos_PxH, sin_PxH, segment_P: np.ndarray, cfg: VisionConfig, attn_impl=None):
    """One ViT block: x + proj(attn(norm1(x))), then x + fc2(act(fc1(norm2(x)))); tokens
    attend within their image (``segment_P``)."""
    P, E = x_PxE.shape
    h = layer_norm(x_PxE, layer.attn_norm, layer.attn_norm_bias)
    qkv = linear(h, layer.qkv_kernel, layer.qkv_bias).reshape(P, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = apply_vision_rope(q, cos_PxH, sin_PxH), apply_vision_rope(k, cos_PxH, sin_PxH)
    out = segment_attention(q, k, v, segment_P, attn_impl)
    x_PxE = x_PxE + linear(out.reshape(P, E), layer.proj_kernel, layer.proj_bias)
    h = layer_norm(x_PxE, layer.mlp_norm, layer.mlp_norm_bias)
    h = activation(cfg.hidden_act)(linear(h, layer.fc1_kernel, layer.fc1_bias))
    return x_PxE + linear(h, layer.fc2_kernel, layer.fc2_bias)


def patch_merger(merger, x_PxE: jax.Array, unit: int, postshuffle_norm: bool) -> jax.Array:
    """[U, O]: LayerNorm (over E before the m x m shuffle, or over the m*m*E concatenation
    after it for DeepStack), then fc1, exact GELU, fc2."""
    P, E = x_PxE.shape
    if postshuffle_norm:
        h = layer_norm(x_PxE.reshape(P // unit, unit * E), merger.norm_scale, merger.norm_bias)
    else:
        h = layer_norm(x_PxE, merger.norm_scale, merger.norm_bias).reshape(P // unit, unit * E)
    h = jax.nn.gelu(linear(h, merger.fc1_kernel, merger.fc1_bias), approximate=False)
    return linear(h, merger.fc2_kernel, merger.fc2_bias)


def encode_images(params, pixel_values_PxC: jax.Array, meta: VisionMetadata, cfg: VisionConfig,
                  attn_impl: str | None = None, remat: bool | str = False) -> tuple[jax.Array, jax.Array]:
    """Merged features [U, O] and DeepStack features [S, U, O], in the order of the images (and
    their merge units) in ``pixel_values`` ([P, C*T*patch*patch], the HF processor's layout).

    Map s is DeepStack merger ``cfg.deepstack_order[s][1]`` applied to the hidden state after
    block ``cfg.deepstack_order[s][0]`` (ascending blocks, as transformers). That state is
    carried out of the layer scan in slot s of a [S + 1, P, E] buffer (slot S is a scratch row for untapped blocks), so
    one scan serves all blocks and the backward pass stores no per-block copies.
    """
    dtype = params.patch_embed.dtype
    unit = cfg.spatial_merge_size**2
    x = linear(pixel_values_PxC.astype(dtype), params.patch_embed, params.patch_bias)  # the Conv3d
    P, E = x.shape
    if P != len(meta.positions_Px2):
        raise ValueError(f"pixel_values has {P} patches, image_grid_thw describes {len(meta.positions_Px2)}")
    x = x + position_embeddings(params.pos_embed, meta, dtype)
    cos, sin = vision_rope(meta.positions_Px2, cfg)
    order = cfg.deepstack_order
    S = len(order)
    slot = np.full(cfg.depth, S, np.int32)
    for s, (block, _) in enumerate(order):
        slot[block] = s

    def body(carry, layer_and_slot):
        x, taps = carry
        layer, tap_slot = layer_and_slot
        x = vision_block(x, layer, cos, sin, meta.segment_P, cfg, attn_impl)
        return (x, jax.lax.dynamic_update_index_in_dim(taps, x, tap_slot, 0)), None

    body = remat_fn(body, remat)
    taps = jnp.zeros((S + 1, P, E), dtype)
    (x, taps), _ = jax.lax.scan(body, (x, taps), (params.blocks, jnp.asarray(slot)))
    merged = patch_merger(params.merger, x, unit, postshuffle_norm=False)
    if S == 0:
        return merged, jnp.zeros((0, *merged.shape), merged.dtype)
    mergers = jax.tree.map(lambda leaf: leaf[np.asarray([m for _, m in order])], params.deepstack)
    deepstack = jax.vmap(lambda m, h: patch_merger(m, h, unit, postshuffle_norm=True))(mergers, taps[:S])
    return merged, deepstack
