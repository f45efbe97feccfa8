"""The Qwen2 text decoder of Qwen2.5-VL with multimodal rotary embeddings (M-RoPE).

Let B denote batch, L sequence length, D width, N query heads, K key/value heads, H head
dim. Attention is split into ``project_qkv`` (q/k/v with rope applied) and the attention
itself so a KV cache can be threaded in later (the sampler writes k/v, then attends).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caspo_jax.models.common.layers import apply_rope, attention, causal_attention, gated_mlp, linear, remat as remat_fn, rms_norm

from .config import TextConfig


def mrope_cos_sin(position_ids_3xBxL: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, H]: frequency band i of ``mrope_section`` takes the t, h or w row (i % 3).

    Angles in float32, then cast to the activation dtype (as transformers does).
    """
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    freqs = position_ids_3xBxL.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, H/2]
    bands, start = [], 0
    for i, width in enumerate(cfg.mrope_section):
        bands.append(freqs[i % 3, ..., start:start + width])
        start += width
    half = jnp.concatenate(bands, axis=-1)
    full = jnp.concatenate([half, half], axis=-1)
    return jnp.cos(full).astype(dtype), jnp.sin(full).astype(dtype)


def causal_mask(attention_mask_BxL: jax.Array) -> jax.Array:
    """[B, 1, L, L] boolean: query i may attend key j iff j <= i and key j is not padding.
    Causal by token index, image tokens included (as transformers)."""
    L = attention_mask_BxL.shape[-1]
    causal = jnp.tril(jnp.ones((L, L), bool))
    return causal[None, None] & attention_mask_BxL.astype(bool)[:, None, None, :]


def project_qkv(layer: dict, x_BxLxD, cos_BxLxH, sin_BxLxH, cfg: TextConfig):
    """Queries [B, L, N, H] and keys/values [B, L, K, H], rope applied to q and k."""
    B, L, _ = x_BxLxD.shape
    q = linear(x_BxLxD, layer["q_kernel"], layer["q_bias"]).reshape(B, L, cfg.num_attention_heads, cfg.head_dim)
    k = linear(x_BxLxD, layer["k_kernel"], layer["k_bias"]).reshape(B, L, cfg.num_key_value_heads, cfg.head_dim)
    v = linear(x_BxLxD, layer["v_kernel"], layer["v_bias"]).reshape(B, L, cfg.num_key_value_heads, cfg.head_dim)
    return apply_rope(q, cos_BxLxH, sin_BxLxH), apply_rope(k, cos_BxLxH, sin_BxLxH), v


def attention_output(layer: dict, out_BxLxNH) -> jax.Array:
    """The o projection (no bias in Qwen2)."""
    return linear(out_BxLxNH, layer["o_kernel"])


def mlp_block(x_BxLxD, layer: dict, cfg: TextConfig) -> jax.Array:
    """x + mlp(norm(x))."""
    h = rms_norm(x_BxLxD, layer["mlp_norm"], cfg.rms_norm_eps)
    return x_BxLxD + gated_mlp(h, layer["gate_kernel"], layer["up_kernel"], layer["down_kernel"], cfg.hidden_act)


def decoder_layer(x_BxLxD, layer: dict, cos_BxLxH, sin_BxLxH, mask_Bx1xLxL, cfg: TextConfig, attn_impl=None,
                  attn_block: int = 128):
    """Pre-norm block: x + o(attn(norm(x))), then x + mlp(norm(x))."""
    B, L, D = x_BxLxD.shape
    h = rms_norm(x_BxLxD, layer["attn_norm"], cfg.rms_norm_eps)
    q, k, v = project_qkv(layer, h, cos_BxLxH, sin_BxLxH, cfg)
    if attn_block:
        out = causal_attention(q, k, v, mask_Bx1xLxL, attn_impl, block=attn_block)
    else:
        out = attention(q, k, v, mask_Bx1xLxL, attn_impl)
    x_BxLxD = x_BxLxD + attention_output(layer, out.reshape(B, L, -1))
    return mlp_block(x_BxLxD, layer, cfg)


def decode(params: dict, embeds_BxLxD, position_ids_3xBxL, attention_mask_BxL, cfg: TextConfig,
           attn_impl: str | None = None, remat: bool | str = False, attn_block: int = 128) -> jax.Array:
    """All decoder layers (a ``lax.scan`` over the stacked layer axis) and the final norm."""
    cos, sin = mrope_cos_sin(position_ids_3xBxL, cfg, embeds_BxLxD.dtype)
    mask = causal_mask(attention_mask_BxL)

    def body(x, layer):
        return decoder_layer(x, layer, cos, sin, mask, cfg, attn_impl, attn_block), None

    body = remat_fn(body, remat)
    x, _ = jax.lax.scan(body, embeds_BxLxD, params["layers"])
    return rms_norm(x, params["norm"], cfg.rms_norm_eps)


def lm_head(params: dict, h_xD: jax.Array, tie_word_embeddings: bool) -> jax.Array:
    """Logits in float32 (accumulated in float32 whatever the parameter dtype)."""
    head_VxD = params["embed"] if tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", h_xD, head_VxD, preferred_element_type=jnp.float32)
