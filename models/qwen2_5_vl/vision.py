"""The Qwen2.5-VL vision tower (ViT with window attention and a 2x2 patch merger).

Let P denote the number of patches of all images together, U = P / m^2 the merge units
(m = spatial_merge_size), E the ViT width, O the LLM width. The host-side
``VisionMetadata`` (window permutation, segments, rotary positions) is precomputed in
NumPy from the grids; everything here is traced once per grid tuple.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.models.common.layers import (apply_vision_rope, gated_mlp, linear, rms_norm,
                                            segment_attention, vision_rope)
from caspo_jax.models.common.layers import remat as remat_fn

from .config import VisionConfig
from .rope_index import VisionMetadata

VISION_NORM_EPS = 1e-6


def vision_block(x_PxE, layer, cos_PxH, sin_PxH, segment_P: np.ndarray, cfg: VisionConfig, attn_impl=None):
    """One ViT block: x + proj(attn(norm1(x))), then x + mlp(norm2(x)); tokens attend within
    their segment of ``segment_P`` (their window, or their image in full-attention blocks)."""
    P, E = x_PxE.shape
    h = rms_norm(x_PxE, layer.attn_norm, VISION_NORM_EPS)
    qkv = linear(h, layer.qkv_kernel, layer.qkv_bias).reshape(P, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = apply_vision_rope(q, cos_PxH, sin_PxH), apply_vision_rope(k, cos_PxH, sin_PxH)
    out = segment_attention(q, k, v, segment_P, attn_impl)
    x_PxE = x_PxE + linear(out.reshape(P, E), layer.proj_kernel, layer.proj_bias)
    h = rms_norm(x_PxE, layer.mlp_norm, VISION_NORM_EPS)
    return x_PxE + gated_mlp(h, layer.gate_kernel, layer.up_kernel, layer.down_kernel, cfg.hidden_act,
                             layer.gate_bias, layer.up_bias, layer.down_bias)


def encode_images(params, pixel_values_PxC: jax.Array, meta: VisionMetadata, cfg: VisionConfig,
                  attn_impl: str | None = None, remat: bool | str = False) -> jax.Array:
    """Image features [U, O] in the order of the images (and their merge units) in ``pixel_values``.

    ``pixel_values`` is laid out as the HF processor returns it: [P, C*T*patch*patch].
    """
    dtype = params.patch_embed.dtype
    unit = cfg.spatial_merge_size**2
    x = linear(pixel_values_PxC.astype(dtype), params.patch_embed)  # the Conv3d with stride = kernel
    P, E = x.shape
    if P != len(meta.positions_Px2):
        raise ValueError(f"pixel_values has {P} patches, image_grid_thw describes {len(meta.positions_Px2)}")
    x = x.reshape(P // unit, unit, E)[meta.window_index_U].reshape(P, E)
    cos, sin = vision_rope(meta.positions_Px2, cfg)
    is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])

    def body(x, layer_and_flag):
        layer, full = layer_and_flag
        x = jax.lax.cond(full,
                         lambda x: vision_block(x, layer, cos, sin, meta.image_segment_P, cfg, attn_impl),
                         lambda x: vision_block(x, layer, cos, sin, meta.window_segment_P, cfg, attn_impl), x)
        return x, None

    body = remat_fn(body, remat)
    x, _ = jax.lax.scan(body, x, (params.blocks, is_full))
    merger = params.merger
    h = rms_norm(x, merger.norm, VISION_NORM_EPS).reshape(P // unit, unit * E)
    h = jax.nn.gelu(linear(h, merger.fc1_kernel, merger.fc1_bias), approximate=False)
    out = linear(h, merger.fc2_kernel, merger.fc2_bias)
    return out[meta.reverse_index_U]
