"""Pure-function layers shared by the Qwen-VL ports.

Let B denote batch, L sequence length, D model width, N query heads, K key/value heads,
H head dimension, F the MLP width. Every function is pure and jit-friendly; dtypes follow
transformers (RMSNorm statistics in float32, softmax in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from caspo_jax.models.common.attention import key_segments, pallas_flash_causal
from caspo_jax.models.common.attention import resolve as resolve_attention
from caspo_jax.models.common.flash import ATTENTION_OUTPUT, flash_causal_attention

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation transformers' ``ACT2FN[name]`` computes."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act={name!r} is not supported; known: {sorted(ACTIVATIONS)}") from None


def rms_norm(x_xD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    """T5/Qwen RMSNorm: statistics in float32, cast back, then scale (transformers' order)."""
    x32 = x_xD.astype(jnp.float32)
    variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + eps)).astype(x_xD.dtype)
    return weight_D * normed


def linear(x_xI: jax.Array, kernel_OxI: jax.Array, bias_O: jax.Array | None = None) -> jax.Array:
    """``x @ kernel.T + bias`` with the kernel stored [out, in], as HF and vLLM store it.

    Why [out, in]: the weight sync into vLLM then needs no transposition pass, and on CPU
    XLA's matmuls are no slower in this layout (an MLP forward+backward measured ~8% faster).
    """
    y = jnp.einsum("...i,oi->...o", x_xI, kernel_OxI)
    return y if bias_O is None else y + bias_O


def gated_mlp(x_xD, gate_FxD, up_FxD, down_DxF, act: str, gate_b=None, up_b=None, down_b=None):
    """``down(act(gate(x)) * up(x))``, the SwiGLU-style MLP of Qwen2 and the Qwen2.5-VL ViT."""
    hidden = activation(act)(linear(x_xD, gate_FxD, gate_b)) * linear(x_xD, up_FxD, up_b)
    return linear(hidden, down_DxF, down_b)


REMAT_POLICIES = {
    "full": None,
    "save_projections": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT)),
    "save_dots": jax.checkpoint_policies.dots_saveable,
}
REMAT_CHOICES = (False, True, "none", *REMAT_POLICIES)  # every value ``remat`` accepts


def remat(fn, policy: bool | str | None):
    """``fn`` rematerialised in the backward pass as ``policy`` says.

    False/None/"none": no remat (every residual stored). True/"full": store only the
    layer's input, recompute the whole layer. "save_projections": store the outputs of
    the weight matmuls (no batch dimensions) and of attention (``ATTENTION_OUTPUT``, so
    o_proj's weight gradient needs no recomputed probabilities-times-values; for the XLA
    causal kernel also its log-sum-exp, so its backward runs without a second forward),
    recompute attention scores/probabilities and elementwise ops (the [B, N, L, L]
    probabilities and the MLP's activation residuals are never stored). "save_dots": store every matmul
    output, including attention scores.
    """
    if policy in (False, None, "none"):
        return fn
    if policy is True:
        policy = "full"
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r} is not a known policy; use one of {list(REMAT_CHOICES)}")
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


def rotate_half(x_xH: jax.Array) -> jax.Array:
    """[-x2, x1] over the two halves of the last axis.

    Written as a reshape to [..., 2, H/2] and a stack rather than slices and a concatenate:
    the backward of slices is pad-and-add over zero-filled buffers on XLA:CPU.
    """
    halves = x_xH.reshape(*x_xH.shape[:-1], 2, x_xH.shape[-1] // 2)
    return jnp.stack([-halves[..., 1, :], halves[..., 0, :]], axis=-2).reshape(x_xH.shape)


def apply_rope(x_BxLxNxH: jax.Array, cos_BxLxH: jax.Array, sin_BxLxH: jax.Array) -> jax.Array:
    """Rotary embedding in the dtype of ``cos``/``sin`` (the caller picks it, as transformers does)."""
    cos = cos_BxLxH[..., None, :]
    sin = sin_BxLxH[..., None, :]
    return x_BxLxNxH * cos + rotate_half(x_BxLxNxH) * sin


def vision_rope(positions_Px2: np.ndarray, cfg) -> tuple[jax.Array, jax.Array]:
    """Axial 2-D rotary cos/sin [P, head_dim] of a ViT (every family's) in float32: rows use the
    first head_dim/4 frequencies, columns the next, repeated over both halves (transformers'
    layout). ``cfg``: a vision config (``head_dim``, ``rope_theta``)."""
    spatial = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = jnp.asarray(positions_Px2, jnp.float32)[..., None] * inv_freq  # [P, 2, head_dim/4]
    half = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    full = jnp.concatenate([half, half], axis=-1)
    return jnp.cos(full), jnp.sin(full)


def apply_vision_rope(x_PxNxH, cos_PxH, sin_PxH):
    """Vision rotary in float32, cast back (as transformers' apply_rotary_pos_emb_vision)."""
    x32 = x_PxNxH.astype(jnp.float32)
    out = x32 * cos_PxH[:, None, :] + rotate_half(x32) * sin_PxH[:, None, :]
    return out.astype(x_PxNxH.dtype)


def attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    mask_Bx1xTxS: jax.Array | None,
    implementation: str | None = None,
    mask_kind: str = "dense",
) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    ``mask`` is boolean (True = may attend). ``implementation``: None lets JAX choose,
    "xla" everywhere, "cudnn" for flash attention on GPU (all three passed to
    ``jax.nn.dot_product_attention``), "auto" picks per call (``common.attention``; the
    ``mask_kind`` -- "causal", "segment" or "dense" -- tells it what the mask is).
    Rows with no allowed key (left padding) produce a uniform average, never NaN.
    """
    impl = resolve_attention(implementation, mask_kind, q_BxTxNxH, k_BxSxKxH, has_mask=mask_Bx1xTxS is not None)
    if impl == "pallas_flash":
        return pallas_flash_causal(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS)
    # cuDNN skips the blocks above the diagonal only when told the mask is causal
    causal = impl == "cudnn" and mask_kind == "causal" and q_BxTxNxH.shape[1] == k_BxSxKxH.shape[1]
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, is_causal=causal, implementation=impl
    )


def causal_attention(
    q_BxLxNxH: jax.Array,
    k_BxLxKxH: jax.Array,
    v_BxLxKxH: jax.Array,
    mask_Bx1xLxL: jax.Array,
    implementation: str | None = None,
    block: int = 128,
) -> jax.Array:
    """Self-attention under a causal-and-key-padding mask (``decoder.causal_mask``).

    Fused kernels (cuDNN, Pallas flash) get the whole sequence and skip the blocks above the
    diagonal themselves. On XLA (CPU, and the GPU/TPU fallbacks: ``implementation`` None or
    "xla" after ``resolve``) it runs ``flash.flash_causal_attention``: queries ``block`` at a
    time, each attending only the keys up to the end of its block, the mask rebuilt inside
    each block from positions and the key validity (the mask's last row), and a backward
    that recomputes probabilities from the saved log-sum-exp. For every query that sees a key
    the result equals ``attention`` (padding queries that see nothing get a different
    arbitrary mean).
    """
    impl = resolve_attention(implementation, "causal", q_BxLxNxH, k_BxLxKxH)
    if impl in ("cudnn", "pallas_flash"):
        out = attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL, impl, "causal")
    else:
        out = flash_causal_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, key_segments(mask_Bx1xLxL), block)
    return checkpoint_name(out, ATTENTION_OUTPUT)


def segment_attention(q_PxNxH: jax.Array, k_PxNxH: jax.Array, v_PxNxH: jax.Array, segment_P: np.ndarray,
                      implementation: str | None = None) -> jax.Array:
    """Attention of every token to the tokens of its own segment, for the vision towers.

    ``segment_P`` (host NumPy, static) labels P tokens whose segments are contiguous runs
    (one image, or one window after the window permutation). Instead of a [P, P] mask over
    all pairs, the S runs are laid out as [S, Lmax] (shorter runs padded, their padded keys
    masked), attended, and gathered back: the score work drops from P^2 to S * Lmax^2
    (the ViT's forward+backward measured 807 -> 384 ms CPU on the train-step bench).
    Equals masked attention within float32 rounding (tested).
    """
    P, N, H = q_PxNxH.shape
    starts = np.flatnonzero(np.r_[True, segment_P[1:] != segment_P[:-1]])
    lengths = np.diff(np.r_[starts, P])
    S, Lmax = len(starts), int(lengths.max())
    if (lengths == Lmax).all():
        q, k, v = (t.reshape(S, Lmax, N, H) for t in (q_PxNxH, k_PxNxH, v_PxNxH))
        return checkpoint_name(attention(q, k, v, None, implementation, "segment").reshape(P, N, H),
                               ATTENTION_OUTPUT)
    gather_SxL = starts[:, None] + np.minimum(np.arange(Lmax)[None], lengths[:, None] - 1)
    valid_SxL = np.arange(Lmax)[None] < lengths[:, None]
    out = attention(q_PxNxH[gather_SxL], k_PxNxH[gather_SxL], v_PxNxH[gather_SxL],
                    jnp.asarray(valid_SxL)[:, None, None, :], implementation, "segment")
    back_P = np.arange(P) - np.repeat(starts, lengths) + np.repeat(np.arange(S) * Lmax, lengths)
    return checkpoint_name(out.reshape(S * Lmax, N, H)[back_P], ATTENTION_OUTPUT)
