"""The static-shape KV cache shared by the Qwen-VL ports: prefill, and the sampler's decode
step with each prompt's keys/values shared by its samples.

Let P denote prompts, n samples per prompt, S = P * n samples (prompt-major), L the
(bucketed, left-padded) prompt length, T the response length, D width, N query heads, K
key/value heads, H head dim, Y layers, U visual rows, F their width. ``prefill`` returns
the prompts' keys/values [Y, P, L, K, H] (rope applied to the keys); ``prompt_cache``
turns them into per-layer [P, K, L, H] arrays read by all n samples; each sample's own
tokens go to a per-layer response cache [S, K, T, H] that ``decode_step_shared`` writes
in place (``dynamic_update_slice`` on the while-loop carry), so no step copies a cache.

Both families share every function here (``Model.kv_cache`` is this module): the layer
maths is ``decoder.decoder_layer``, the one the training forward runs, switched by the
family's text config, so a cached decode equals the full forward up to float summation
order. ``prefill`` is ``decoder.decode`` keeping the keys/values; the decode step gives
each layer a ``ResponseCache`` to write and attend.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from caspo_jax.models.common import decoder
from caspo_jax.models.common.layers import rms_norm


def embed_tokens(text_params, input_ids_PxL, image_features_UxF, image_token_id: int):
    """The prompts embedded for ``prefill``: (embeds [P, L, D], deepstack [M, U, D] or None,
    visual_index [P, L] or None), as ``decoder.embed_with_visuals`` returns them. Image-pad
    positions take the merged rows of ``image_features`` (``encode_images``' output; extra
    padding rows at its end are never gathered)."""
    return decoder.embed_with_visuals(text_params, input_ids_PxL, ((image_token_id, image_features_UxF, None),))


def prefill(text_params, embedded, position_ids_3xPxL, mask_PxL, cfg, attn_impl=None):
    """All layers over ``embed_tokens``' prompts (DeepStack map m added after layer m when the
    features carry maps): the training forward's ``decoder.decode`` keeping each layer's keys
    and values, one dense attention call per layer (no query blocks, no remat). Returns
    final-normed hidden states [P, L, D] and the keys/values [Y, P, L, K, H] (rope applied
    to keys, as the decode step expects)."""
    embeds_PxLxD, deepstack_MxUxD, visual_index_PxL = embedded
    return decoder.decode(text_params, embeds_PxLxD, position_ids_3xPxL, mask_PxL, cfg, attn_impl, remat=False,
                          attn_block=0, deepstack_MxUxD=deepstack_MxUxD, visual_index_BxL=visual_index_PxL,
                          keep_kv=True)


# ----- the sampler's decode: the prompt cached once per prompt, per-layer arrays, no slicing -----
#
# The plain form would keep one stacked cache row per sample and scan the layers;
# ``decode_step_shared`` does the same maths with three changes that each removed a
# measured per-step cost on CPU (S=64, L=T=128, 8 layers, width 512):
# - the prompt's keys/values are kept once per prompt [P, K, L, H] and attended by all n
#   samples together (one matmul with n*N/K query rows) instead of n repeated copies:
#   the prompt half of the cache is read n times less;
# - layers are unrolled over per-layer weight nodes and per-layer cache arrays: the
#   layer scan's ``dynamic_slice`` of the stacked weights materialised a copy of every
#   layer's kernels each step (all ~90 MB of them), and its slice of the stacked cache a
#   transposed copy of each layer's keys and values;
# - the cache keeps heads before length ([S, K, T, H]), the layout the attention dots take
#   without a transpose; the new token's k/v are written in place (``dynamic_update_slice``
#   on the while-loop carry).


def layer_list(layers, n_layers: int) -> list:
    """The stacked layer node [Y, ...] as Y per-layer nodes of the same class (sliced once,
    outside any loop)."""
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


@dataclasses.dataclass(frozen=True)
class ResponseCache:
    """One layer's cache for the decode step: what ``decoder.decoder_layer`` attends.

    prompt_k/v [P, K, L, H] (``prompt_cache``), prompt_mask [P, L] bool, response k/v
    [S, K, T, H], ``slot`` (traced scalar) where the new token's keys/values go, ``filled``
    [T]: which response slots hold a token.
    """

    prompt_k: jax.Array
    prompt_v: jax.Array
    prompt_mask: jax.Array
    k: jax.Array
    v: jax.Array
    slot: jax.Array
    filled: jax.Array

    def attend(self, q_Sx1xNxH, k_Sx1xKxH, v_Sx1xKxH):
        """Write the new token's k/v in place at ``slot`` and attend prompt + response.
        Returns (out [S, N, H], the updated (k, v) [S, K, T, H])."""
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, jnp.asarray(self.slot, jnp.int32), zero)
        k_all = jax.lax.dynamic_update_slice(self.k, jnp.swapaxes(k_Sx1xKxH, 1, 2).astype(self.k.dtype), start)
        v_all = jax.lax.dynamic_update_slice(self.v, jnp.swapaxes(v_Sx1xKxH, 1, 2).astype(self.v.dtype), start)
        out = shared_prompt_attention(q_Sx1xNxH[:, 0], self.prompt_k, self.prompt_v, self.prompt_mask, k_all, v_all,
                                      self.filled)
        return out, (k_all, v_all)


def decode_step_shared(text_params, token_S, position_S, prompt_kv: list, prompt_mask_PxL, response_kv: list,
                       slot, cfg):
    """One new (text) token per sample, written at response slot ``slot`` (a traced scalar).

    text_params.layers: a list of per-layer nodes (``layer_list``). prompt_kv: per layer
    (k, v) [P, K, L, H] from ``prompt_cache``; response_kv: per layer (k, v) [S, K, T, H].
    Each sample attends its prompt's non-padding slots and its response slots <= ``slot``.
    Decoded tokens are text, so no DeepStack. Returns final-normed hidden states [S, D] and
    the updated ``response_kv``.
    """
    x = text_params.embed[token_S][:, None, :]
    S = x.shape[0]
    T = response_kv[0][0].shape[2]
    pos = jnp.broadcast_to(position_S[None, :, None], (3, S, 1))
    cos, sin = decoder.mrope_cos_sin(pos, cfg, x.dtype)
    filled = jnp.arange(T) <= slot
    prompt_mask = prompt_mask_PxL.astype(bool)
    caches = [ResponseCache(prompt_k, prompt_v, prompt_mask, k_all, v_all, slot, filled)
              for (prompt_k, prompt_v), (k_all, v_all) in zip(prompt_kv, response_kv)]

    def layer_fn(x, layer, i, cache):
        return decoder.decoder_layer(x, layer, cos, sin, cfg, cache=cache)

    x, updated = decoder.run_layers(text_params.layers, x, layer_fn, caches=caches)
    return rms_norm(x[:, 0], text_params.norm, cfg.rms_norm_eps), updated
