"""The static-shape KV cache shared by the Qwen-VL ports: prefill, and the sampler's decode
step with each prompt's keys/values shared by its samples.

Let P denote prompts, n samples per prompt, S = P * n samples (prompt-major), L the
(bucketed, left-padded) prompt length, T the response length, D width, N query heads, K
key/value heads, H head dim, Y layers, U visual rows, F their width. ``prefill`` returns
the prompts' keys/values [Y, P, L, K, H] (rope applied to the keys); ``prompt_cache``
turns them into per-layer [P, K, L, H] arrays read by all n samples; each sample's own
tokens go to a per-layer response cache [S, K, T, H] that ``decode_step_shared`` writes
in place (``dynamic_update_slice`` on the while-loop carry), so no step copies a cache.

A model family plugs in through ``DecoderPieces`` (its rope, q/k/v projection, attention
output and MLP block), so a cached decode runs exactly the family's own layer maths and
equals its full forward up to float summation order. Each family's ``kv_cache`` module
(``caspo_jax.models.<family>.kv_cache``, exposed as ``Model.kv_cache``) wraps these with
its embedding rule (e.g. Qwen3-VL's DeepStack) and is what the sampler calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from caspo_jax.models.common.layers import attention, rms_norm


@dataclasses.dataclass(frozen=True)
class DecoderPieces:
    """The family-specific parts of one text decoder layer (all pure functions).

    mrope_cos_sin(position_ids_3xBxL, cfg, dtype) -> (cos, sin) [B, L, H]
    project_qkv(layer, h_BxLxD, cos, sin, cfg) -> q [B, L, N, H], k, v [B, L, K, H] (rope applied)
    attention_output(layer, out_BxLxNH) -> [B, L, D] (the o projection)
    mlp_block(x_BxLxD, layer, cfg) -> x + MLP(norm(x))
    causal_mask(mask_BxL) -> [B, 1, L, L] boolean
    """

    mrope_cos_sin: Callable
    project_qkv: Callable
    attention_output: Callable
    mlp_block: Callable
    causal_mask: Callable


def prefill(text_params: dict, x_PxLxD, position_ids_3xPxL, mask_PxL, cfg, pieces: DecoderPieces,
            attn_impl=None, after_layer: Callable | None = None):
    """All layers over the prompts. ``after_layer(x, i)`` (traced layer index) may add to the
    residual stream after layer i (DeepStack). Returns final-normed hidden states [P, L, D]
    and the keys/values [Y, P, L, K, H]."""
    cos, sin = pieces.mrope_cos_sin(position_ids_3xPxL, cfg, x_PxLxD.dtype)
    mask = pieces.causal_mask(mask_PxL)
    P, L, _ = x_PxLxD.shape

    def body(x, layer_and_i):
        layer, i = layer_and_i
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q, k, v = pieces.project_qkv(layer, h, cos, sin, cfg)
        out = attention(q, k, v, mask, attn_impl).reshape(P, L, -1)
        x = pieces.mlp_block(x + pieces.attention_output(layer, out), layer, cfg)
        if after_layer is not None:
            x = after_layer(x, i)
        return x, (k, v)

    n_layers = cfg.num_hidden_layers
    x, (k, v) = jax.lax.scan(body, x_PxLxD, (text_params["layers"], jnp.arange(n_layers, dtype=jnp.int32)))
    return rms_norm(x, text_params["norm"], cfg.rms_norm_eps), k, v


# ----- the sampler's decode: the prompt cached once per prompt, per-layer arrays, no slicing -----
#
# The plain form would keep one stacked cache row per sample and scan the layers;
# ``decode_step_shared`` does the same maths with three changes that each removed a
# measured per-step cost on CPU (S=64, L=T=128, 8 layers, width 512):
# - the prompt's keys/values are kept once per prompt [P, K, L, H] and attended by all n
#   samples together (one matmul with n*N/K query rows) instead of n repeated copies:
#   the prompt half of the cache is read n times less;
# - layers are unrolled over per-layer parameter dicts and per-layer cache arrays: the
#   layer scan's ``dynamic_slice`` of the stacked weights materialised a copy of every
#   layer's kernels each step (all ~90 MB of them), and its slice of the stacked cache a
#   transposed copy of each layer's keys and values;
# - the cache keeps heads before length ([S, K, T, H]), the layout the attention dots take
#   without a transpose; the new token's k/v are written in place (``dynamic_update_slice``
#   on the while-loop carry).


def layer_list(layers: dict, n_layers: int) -> list[dict]:
    """The stacked layer pytree [Y, ...] as Y per-layer dicts (sliced once, outside any loop)."""
    return [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n_layers)]


def prompt_cache(k_YxPxLxKxH, v_YxPxLxKxH) -> list[tuple[jax.Array, jax.Array]]:
    """``prefill``'s keys/values as per-layer pairs in the decode layout [P, K, L, H]."""
    return [(jnp.swapaxes(k_YxPxLxKxH[i], 1, 2), jnp.swapaxes(v_YxPxLxKxH[i], 1, 2))
            for i in range(k_YxPxLxKxH.shape[0])]


def shared_prompt_attention(q_SxNxH, prompt_k_PxKxLxH, prompt_v_PxKxLxH, prompt_mask_PxL, k_SxKxTxH, v_SxKxTxH,
                            filled_T) -> jax.Array:
    """One query per sample against its prompt's shared keys/values and its own response cache.

    Samples are prompt-major (sample s = p * n + j). Equals grouped-query attention over the
    concatenation [prompt keys, response keys] (one softmax over both; masked keys get the
    float32 minimum; logits and softmax in float32). ``filled_T``: which response slots hold
    a token (the same for every sample). Returns [S, N, H].
    """
    S, N, H = q_SxNxH.shape
    P, K, L, _ = prompt_k_PxKxLxH.shape
    n, g = S // P, N // K
    scale = jnp.float32(1.0 / H**0.5)
    minimum = jnp.finfo(jnp.float32).min
    q_PxnxKxgxH = q_SxNxH.reshape(P, n, K, g, H)
    prompt_logits = jnp.einsum("pnkgh,pklh->pnkgl", q_PxnxKxgxH, prompt_k_PxKxLxH,
                               preferred_element_type=jnp.float32) * scale
    prompt_logits = jnp.where(prompt_mask_PxL[:, None, None, None, :], prompt_logits, minimum)
    own_logits = jnp.einsum("skgh,skth->skgt", q_SxNxH.reshape(S, K, g, H), k_SxKxTxH,
                            preferred_element_type=jnp.float32) * scale
    own_logits = jnp.where(filled_T[None, None, None, :], own_logits, minimum)
    logits = jnp.concatenate([prompt_logits.reshape(S, K, g, L), own_logits], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_SxKxTxH.dtype)
    from_prompt = jnp.einsum("pnkgl,pklh->pnkgh", probs[..., :L].reshape(P, n, K, g, L), prompt_v_PxKxLxH)
    from_own = jnp.einsum("skgt,skth->skgh", probs[..., L:], v_SxKxTxH)
    return (from_prompt.reshape(S, K, g, H) + from_own).reshape(S, N, H)


def decode_step_shared(text_params: dict, token_S, position_S, prompt_kv: list, prompt_mask_PxL, response_kv: list,
                       slot, cfg, pieces: DecoderPieces):
    """One new (text) token per sample, written at response slot ``slot`` (a traced scalar).

    text_params["layers"]: a list of per-layer dicts (``layer_list``). prompt_kv: per layer
    (k, v) [P, K, L, H] from ``prompt_cache``; response_kv: per layer (k, v) [S, K, T, H].
    Each sample attends its prompt's non-padding slots and its response slots <= ``slot``.
    Returns final-normed hidden states [S, D] and the updated ``response_kv``.
    """
    x = text_params["embed"][token_S][:, None, :]
    S = x.shape[0]
    T = response_kv[0][0].shape[2]
    pos = jnp.broadcast_to(position_S[None, :, None], (3, S, 1))
    cos, sin = pieces.mrope_cos_sin(pos, cfg, x.dtype)
    filled = jnp.arange(T) <= slot
    prompt_mask = prompt_mask_PxL.astype(bool)
    zero = jnp.zeros((), jnp.int32)
    updated = []
    for layer, (prompt_k, prompt_v), (k_all, v_all) in zip(text_params["layers"], prompt_kv, response_kv):
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q, k, v = pieces.project_qkv(layer, h, cos, sin, cfg)
        start = (zero, zero, jnp.asarray(slot, jnp.int32), zero)
        k_all = jax.lax.dynamic_update_slice(k_all, jnp.swapaxes(k, 1, 2).astype(k_all.dtype), start)
        v_all = jax.lax.dynamic_update_slice(v_all, jnp.swapaxes(v, 1, 2).astype(v_all.dtype), start)
        out = shared_prompt_attention(q[:, 0], prompt_k, prompt_v, prompt_mask, k_all, v_all, filled)
        x = pieces.mlp_block(x + pieces.attention_output(layer, out.reshape(S, 1, -1)), layer, cfg)
        updated.append((k_all, v_all))
    return rms_norm(x[:, 0], text_params["norm"], cfg.rms_norm_eps), updated
