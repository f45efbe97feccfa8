"""``Qwen2_5_VL``: a frozen, hashable model description whose methods are pure functions.

The model object holds only the config and static switches, so it can be a static
``jax.jit`` argument; parameters are a separate plain pytree (see ``params.py``).
Host-side work (M-RoPE position ids, vision metadata) happens in NumPy before the
jitted core; pass ``position_ids`` from ``get_rope_index`` to call it inside your own jit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.models.common.placeholders import place_features, placeholder_slots
from caspo_jax.models.common.visual_inputs import prepare_visual_inputs

from . import kv_cache as kv_cache_lib
from . import text as text_lib
from . import vision as vision_lib
from .config import Qwen2_5_VLConfig
from .params import init_params, param_table
from .rope_index import _as_grids, get_rope_index, vision_metadata


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VL:
    """Qwen2.5-VL as pure functions of (params, inputs).

    attn_implementation: passed to ``jax.nn.dot_product_attention`` (None: JAX picks,
        "xla", or "cudnn" for flash attention on GPU).
    remat: rematerialise each layer in the backward pass (``jax.checkpoint`` in the scan): False,
        True (= "full") or a policy name of ``common.layers.remat`` ("save_projections").
    attn_block: text queries are attended in blocks of this many tokens, each seeing only the
        keys up to its end (skips the invisible half of the causal scores); 0 = one dense call.
    """

    config: Qwen2_5_VLConfig
    attn_implementation: str | None = None
    remat: bool | str = False
    attn_block: int = 128

    # embed_tokens / prefill / decode_step_shared over a static KV cache: what the sampler calls
    # (each family owns its module; a class attribute, not a field)
    kv_cache = kv_cache_lib

    # ----- parameters -------------------------------------------------------------
    def param_table(self):
        """The checkpoint table: HF name, our path, layout transform, shape, logical axes."""
        return param_table(self.config)

    def init(self, key: jax.Array, dtype=jnp.float32) -> dict:
        """Random parameters (tests, benchmarks), jitted so large configs initialise quickly."""
        return jax.jit(init_params, static_argnums=(0, 2))(self.config, key, dtype)

    # ----- host-side metadata -----------------------------------------------------
    def get_rope_index(self, input_ids, image_grid_thw=None, attention_mask=None, video_grid_thw=None,
                       second_per_grid_ts=None) -> tuple[np.ndarray, np.ndarray]:
        """M-RoPE position ids [3, B, L] and deltas [B, 1] (NumPy), as transformers computes them."""
        cfg = self.config
        return get_rope_index(
            input_ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size, tokens_per_second=cfg.vision.tokens_per_second,
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, attention_mask_BxL=attention_mask)

    # ----- pieces -----------------------------------------------------------------
    def encode_images(self, params: dict, pixel_values, image_grid_thw) -> jax.Array:
        """Vision features [sum(t*h*w)/m^2, D] for all images, in order (one call per prompt)."""
        return _encode_images_jit(self, params["vision"], pixel_values, _as_grids(image_grid_thw))

    def hidden_states(self, params: dict, input_ids, attention_mask=None, pixel_values=None,
                      image_grid_thw=None, position_ids=None, image_embeds=None, pixel_values_videos=None,
                      video_grid_thw=None, second_per_grid_ts=None, video_embeds=None, image_slot=None) -> jax.Array:
        """Final-normed hidden states [B, L, D].

        ``image_embeds`` / ``video_embeds`` (from ``encode_images``) may replace the pixels.
        ``image_slot`` [B, L] (host-computed: each image token's row of the features, -1
        elsewhere) lets rows share one encoding in any order; without it the image tokens
        take the features in row-major order (a prefix sum over the whole batch).
        Without ``position_ids`` they are computed on the host: M-RoPE from ``get_rope_index``
        when images or videos are given, else 0..L-1 for every row (transformers' behaviour;
        pass ``position_ids`` from ``get_rope_index`` to skip padding in text-only batches).
        """
        attention_mask, position_ids, features = prepare_visual_inputs(
            self, params, input_ids, attention_mask, position_ids, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, image_embeds=image_embeds, pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw, video_embeds=video_embeds,
            rope_extra=(second_per_grid_ts,), image_slot=image_slot)
        return _hidden_states_jit(self, params["text"], input_ids, attention_mask, position_ids, *features,
                                  image_slot)

    def lm_head(self, params: dict, h_xD: jax.Array) -> jax.Array:
        """Logits [..., vocab] in float32 for hidden states [..., D] (chunk over L as you like)."""
        return text_lib.lm_head(params["text"], h_xD, self.config.tie_word_embeddings)

    def forward(self, params: dict, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                position_ids=None, image_embeds=None, **video) -> jax.Array:
        """Logits [B, L, vocab], float32. Inputs as the HF processor returns them
        (``video`` takes the ``hidden_states`` video arguments)."""
        h = self.hidden_states(params, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
                               image_embeds, **video)
        return self.lm_head(params, h)

    __call__ = forward


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_images_jit(model: Qwen2_5_VL, vision_params, pixel_values, grids):
    v = model.config.vision
    meta = vision_metadata(grids, v.spatial_merge_size, v.window_size, v.patch_size)
    return vision_lib.encode_images(vision_params, pixel_values, meta, v, model.attn_implementation, model.remat)


@functools.partial(jax.jit, static_argnums=(0,))
def _hidden_states_jit(model: Qwen2_5_VL, text_params, input_ids_BxL, attention_mask_BxL, position_ids_3xBxL,
                       image_embeds_UxD, video_embeds_VxD, image_slot_BxL=None):
    cfg = model.config
    embeds = text_params["embed"][input_ids_BxL]
    if image_embeds_UxD is not None:
        slot = image_slot_BxL if image_slot_BxL is not None else \
            placeholder_slots(input_ids_BxL, cfg.image_token_id, image_embeds_UxD.shape[0])
        embeds = place_features(embeds, slot, image_embeds_UxD)
    if video_embeds_VxD is not None:
        slot = placeholder_slots(input_ids_BxL, cfg.video_token_id, video_embeds_VxD.shape[0])
        embeds = place_features(embeds, slot, video_embeds_VxD)
    if position_ids_3xBxL is None:
        B, L = input_ids_BxL.shape
        position_ids_3xBxL = jnp.broadcast_to(jnp.arange(L), (3, B, L))
    return text_lib.decode(text_params, embeds, jnp.asarray(position_ids_3xBxL), attention_mask_BxL, cfg.text,
                           model.attn_implementation, model.remat, model.attn_block)
