"""The JAX sampler: prefill once per prompt, then a jitted ``lax.while_loop`` decode.

Let P denote prompts, n samples per prompt, S = P * n, L the prompt bucket, T the
new-token bucket, C = L + T. Prompts are left-padded to a power-of-two bucket L and the
response cap is rounded up to a power of two T, so a run of varied prompts compiles a
handful of loops. The vision tower runs once over all images of the batch; each prompt's
KV cache is computed once and repeated for its n samples. Generation stops early when
every sample has hit an end token.

Model-agnostic: the one dispatch point is ``model.kv_cache`` (``caspo_jax.models.common.kv_cache``,
the same module for every family: ``embed_tokens`` / ``prefill`` / ``decode_step_shared``),
so Qwen2.5-VL and Qwen3-VL share this loop unchanged.

Multimodal placeholders (image/video pad, vision start/end) are never sampled by default:
fed back when a response is scored they would be read as images. Their logits are set to
-inf before greedy argmax and before temperature/top-k/top-p; the returned log-probs stay
those of the tempered distribution without that suppression, like top-k/top-p.

Sharding: with a mesh, parameters are placed by the model's table under the trainer's
``LogicalRules`` and the cache's sample axis follows the "batch" rule (heads the "kv"
rule), so the same mesh serves training and sampling. A mesh of devices of its own
(rollout.devices, without the default device) is also where the sampler's small arrays
(prompts, keys, the suppressed-token mask) start: made on the default device, a trainer
device, they would queue behind the update running there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.models.common import kv_cache as kv_common
from caspo_jax.rollout.sampling import (SampleSpec, sample_keys, sample_tokens, step_keys, suppress_tokens,
                                        token_logprobs)
from caspo_jax.rollout.types import RolloutPrompt, Rollouts, SamplingParams, finish_reasons, prompt_arrays
from caspo_jax.sharding import LogicalRules, named_sharding, param_shardings


def bucket(size: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(size, minimum)."""
    size = max(int(size), int(minimum), 1)
    return 1 << (size - 1).bit_length()


def default_eos_ids(model) -> tuple[int, ...]:
    """End-of-sequence ids from the model's config.json (text_config first, then top level)."""
    raw = json.loads(model.config.raw_json)
    value = (raw.get("text_config") or {}).get("eos_token_id", raw.get("eos_token_id"))
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def multimodal_token_ids(model) -> tuple[int, ...]:
    """The placeholder ids a response must never contain: image pad, video pad, vision start
    and vision end (from the model config)."""
    cfg = model.config
    return tuple(int(getattr(cfg, name)) for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                       "vision_end_token_id"))


class JaxSampler:
    """``generate`` / ``sync_weights`` for a ported Qwen-VL model in JAX (CPU, GPU, TPU).

    model: any ``caspo_jax.models`` port exposing ``kv_cache`` (``Qwen2_5_VL``, ``Qwen3VL``);
        params its pytree.
    eos_token_ids: ids that end a response with reason "eos" (default: the config's).
    suppress_token_ids: ids never sampled (default: the multimodal placeholders,
        ``multimodal_token_ids(model)``; ``()`` turns suppression off).
    mesh / rules: place parameters and the KV cache like the trainer (optional).
    version: the weight version of ``params`` (``sync_weights`` installs later ones).

    Thread safety of pushes: ``generate`` reads (params, version) once, under a lock, and
    uses that pair for the vision tower and the decode loop, so a ``sync_weights`` from
    another thread never splits a request between two versions; it applies to the next call.
    """

    def __init__(self, model, params, *, eos_token_ids: Sequence[int] | None = None, mesh=None, rules=None,
                 min_prompt_bucket: int = 16, min_new_bucket: int = 16,
                 suppress_token_ids: Sequence[int] | None = None, version: int = 0):
        self.model = model
        self.eos_token_ids = tuple(default_eos_ids(model) if eos_token_ids is None else eos_token_ids)
        ids = multimodal_token_ids(model) if suppress_token_ids is None else suppress_token_ids
        self.suppress_token_ids = tuple(sorted(set(int(t) for t in ids)))
        vocab = model.config.text.vocab_size
        bad = [t for t in self.suppress_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"JaxSampler(suppress_token_ids=...): ids {bad} are outside the vocabulary "
                             f"[0, {vocab}) of the model config; pass ids the tokenizer knows")
        suppressed = np.zeros((vocab,), bool)
        suppressed[list(self.suppress_token_ids)] = True
        self.mesh = mesh
        with self._on_home_device():
            self._suppressed_V = jnp.asarray(suppressed)  # built once: generate() runs every RL step
        if mesh is not None and rules is None:
            rules = LogicalRules()
        self.rules = rules
        self.min_prompt_bucket = min_prompt_bucket
        self.min_new_bucket = min_new_bucket
        self._lock = threading.Lock()
        self.params = None
        self.version = version
        self.sync_weights(params, version)

    def sync_weights(self, params, version: int | None = None) -> None:
        """Use these parameters, as weight version ``version`` (None: the current + 1), from
        the next ``generate`` on (placed on the mesh when one is set)."""
        if self.mesh is not None:
            params = jax.device_put(params, param_shardings(self.model.param_table(), self.mesh, self.rules))
        with self._lock:
            self.params = params
            self.version = self.version + 1 if version is None else int(version)

    def weights(self):
        """(params, version) as one consistent pair."""
        with self._lock:
            return self.params, self.version

    def _on_home_device(self):
        """Arrays made in this context start on the mesh's first device when the mesh leaves
        out the default device (a sampler on devices of its own); else where they always do
        (a thread-local setting: the trainer's thread keeps its default)."""
        if self.mesh is None or jax.local_devices()[0] in set(self.mesh.devices.flat):
            return contextlib.nullcontext()
        return jax.default_device(self.mesh.devices.flat[0])

    def _cache_sharding(self, shape):
        """Placement of one layer's cache array [prompts or samples, K, length, H]."""
        return named_sharding(self.mesh, ("batch", "kv", None, None), shape, self.rules)

    def generate(self, prompts: Sequence[RolloutPrompt], *, n: int = 1, sampling: SamplingParams = SamplingParams()
                 ) -> Rollouts:
        """n samples per prompt (prompt-major order), all from one weight version; see ``Rollouts``."""
        with self._on_home_device():
            return self._generate(prompts, n, sampling)

    def _generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: SamplingParams) -> Rollouts:
        params, version = self.weights()
        if not prompts:
            raise ValueError("generate: no prompts")
        if n < 1:
            raise ValueError(f"generate: n={n}, must be >= 1")
        model, cfg = self.model, self.model.config
        P = len(prompts)
        L = bucket(max(len(p.token_ids) for p in prompts), self.min_prompt_bucket)
        T = bucket(sampling.max_new_tokens, self.min_new_bucket)
        for i, p in enumerate(prompts):
            _check_image_tokens(i, p, cfg)
        ids, mask, pixels, grids = prompt_arrays(prompts, L)
        image_embeds = None
        if grids is not None:
            image_embeds = model.encode_images(params, pixels, grids)
            units = image_embeds.shape[0]
            image_embeds = jnp.pad(image_embeds, ((0, bucket(units) - units), (0, 0)))
        position_ids, _ = model.get_rope_index(ids, grids, mask)
        rope_next = position_ids.max(axis=(0, 2)) + 1
        seeds = np.asarray([p.seed if p.seed is not None else sampling.seed + i for i, p in enumerate(prompts)])
        keys = sample_keys(seeds, n)
        terminators = np.asarray(sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids)) or [-1], np.int32)
        cache_sharding = None
        if self.mesh is not None:  # (prompt cache, response cache) per layer
            kv, hd = cfg.text.num_key_value_heads, cfg.text.head_dim
            cache_sharding = (self._cache_sharding((P, kv, L, hd)), self._cache_sharding((P * n, kv, T, hd)))
        tokens, logps, lengths, ended = _rollout(
            model, SampleSpec.of(sampling), n, T, cache_sharding, params, self._suppressed_V,
            jnp.asarray(ids),
            jnp.asarray(mask), jnp.asarray(position_ids, jnp.int32), jnp.asarray(rope_next, jnp.int32),
            image_embeds, keys, jnp.float32(sampling.logit_temperature), jnp.int32(sampling.max_new_tokens),
            jnp.asarray(terminators))
        tokens, logps, lengths, ended = map(np.asarray, jax.device_get((tokens, logps, lengths, ended)))
        width = max(int(lengths.max()), 1)
        tokens, logps = tokens[:, :width], logps[:, :width]
        response_mask = np.arange(width)[None, :] < lengths[:, None]
        last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
        return Rollouts(
            tokens=tokens.astype(np.int32), logprobs=logps.astype(np.float32), mask=response_mask,
            finish_reason=finish_reasons(last, lengths, ended, self.eos_token_ids),
            prompt_index=np.repeat(np.arange(P, dtype=np.int32), n), version=version)


def _check_image_tokens(i: int, prompt: RolloutPrompt, cfg) -> None:
    n_tokens = int(np.sum(prompt.token_ids == cfg.image_token_id))
    grid = prompt.image_grid_thw
    n_units = 0 if grid is None else int(np.prod(grid, axis=1).sum()) // cfg.vision.spatial_merge_size**2
    if n_tokens != n_units:
        raise ValueError(f"prompt {i}: token_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but "
                         f"image_grid_thw describes {n_units} merged patches; expand the image placeholders with "
                         "the processor (or caspo_jax.data.prompts.expand_image_tokens) using the same images")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _rollout(model, spec: SampleSpec, n: int, T: int, cache_sharding, params, suppressed_V, ids_PxL, mask_PxL,
             position_ids_3xPxL, rope_next_P, image_embeds_UxD, keys_Sx2, temperature, max_new, terminators):
    """Prefill, then decode up to ``max_new`` (<= T) tokens for the n samples of each prompt.

    The prompt's keys/values stay one copy per prompt, shared by its n samples
    (``decode_step_shared``); each sample's own tokens go to a per-layer response cache
    [S, K, T, H] written in place. Returns tokens [S, T], log-probs [S, T] (of
    softmax(logits / temperature), ``SamplingParams.logit_temperature``), response
    lengths [S] and whether each sample ended on a terminator [S]. ``suppressed_V`` (bool):
    token ids never sampled. ``params``: the model's weights; only ``params.text`` is read (the
    vision leaves are unused arguments, pruned from the compiled program).
    """
    cfg = model.config.text
    kv_cache = model.kv_cache
    text_params = params.text
    P, L = ids_PxL.shape
    S = P * n
    embeds = kv_cache.embed_tokens(text_params, ids_PxL, image_embeds_UxD, model.config.image_token_id)
    h, k, v = kv_cache.prefill(text_params, embeds, position_ids_3xPxL, mask_PxL, cfg, model.attn_implementation)
    logits = jnp.repeat(model.lm_head(params, h[:, -1]), n, axis=0)
    prompt_kv = kv_common.prompt_cache(k, v)
    response_kv = [(jnp.zeros((S, cfg.num_key_value_heads, T, cfg.head_dim), k.dtype),) * 2
                   for _ in range(cfg.num_hidden_layers)]
    if cache_sharding is not None:
        prompt_sharding, response_sharding = cache_sharding
        prompt_kv = jax.lax.with_sharding_constraint(prompt_kv, jax.tree.map(lambda _: prompt_sharding, prompt_kv))
        response_kv = jax.lax.with_sharding_constraint(response_kv,
                                                       jax.tree.map(lambda _: response_sharding, response_kv))
    decode_params = text_params.replace(layers=kv_common.layer_list(text_params.layers, cfg.num_hidden_layers))
    rope_next = jnp.repeat(rope_next_P, n)

    def emit(t, logits, tokens, logps, lengths, ended):
        token = sample_tokens(step_keys(keys_Sx2, t), suppress_tokens(logits, suppressed_V), temperature, spec)
        live = ~ended
        tokens = tokens.at[:, t].set(jnp.where(live, token, 0))
        logps = logps.at[:, t].set(jnp.where(live, token_logprobs(logits, token, temperature), 0.0))
        lengths = jnp.where(live, t + 1, lengths)
        ended = ended | jnp.isin(token, terminators)
        return token, tokens, logps, lengths, ended

    state = emit(0, logits, jnp.zeros((S, T), jnp.int32), jnp.zeros((S, T), jnp.float32),
                 jnp.zeros((S,), jnp.int32), jnp.zeros((S,), bool))

    def cond(carry):
        t, _, _, _, _, ended, _ = carry
        return (t < max_new) & ~jnp.all(ended)

    def body(carry):
        t, token, tokens, logps, lengths, ended, response_kv = carry
        h, response_kv = kv_cache.decode_step_shared(decode_params, token, rope_next + t - 1, prompt_kv, mask_PxL,
                                                      response_kv, t - 1, cfg)
        logits = model.lm_head(params, h)
        token, tokens, logps, lengths, ended = emit(t, logits, tokens, logps, lengths, ended)
        return t + 1, token, tokens, logps, lengths, ended, response_kv

    _, _, tokens, logps, lengths, ended, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), *state, response_kv))
    return tokens, logps, lengths, ended
