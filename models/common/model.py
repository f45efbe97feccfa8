"""``QwenVLModel``: the public model API every Qwen-VL family shares, as pure functions.

The model object holds only the config and static switches, so it can be a static
``jax.jit`` argument; parameters are a separate typed weight tree (``common.weights``, generated from the
family's parameter table in ``params.py``).
Host-side work (M-RoPE position ids, vision metadata) happens in NumPy before the jitted
core; pass ``position_ids`` from ``get_rope_index`` to call it inside your own jit.

A family subclasses it with its config type and hooks: ``build_param_table`` (its parameter
table), ``rope_index_fn`` / ``rope_index_options`` (its rope index and the arguments only it
takes), ``vision_features`` (its vision tower, traced inside ``encode_images``' jit) and
``visual_input_options`` (its extra checks on given visual inputs). The text decoder,
the KV cache and the embedding of visual features are common (``decoder``, ``kv_cache``).

Visual features travel as ONE array [U, (1 + M) * D]: the merger output followed by the M
DeepStack maps on the last axis (M = 0 for Qwen2.5-VL; ``split_visual_features`` takes it
apart). Code that gathers, pads or differentiates ``image_embeds`` by rows (the train step,
the sampler) therefore carries the DeepStack features along unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.models.common import decoder
from caspo_jax.models.common import kv_cache as kv_cache_lib
from caspo_jax.models.common.params import init_params
from caspo_jax.models.common.rope_index import as_grids
from caspo_jax.models.common.visual_inputs import prepare_visual_inputs


@dataclasses.dataclass(frozen=True)
class QwenVLModel:
    """A Qwen-VL model as pure functions of (params, inputs).

    attn_implementation: "auto" (``common.attention``: cuDNN on GPU, Pallas flash on TPU
        where the shapes allow, XLA elsewhere; on CPU the same program as None) or one of
        ``jax.nn.dot_product_attention``'s (None: JAX picks, "xla", "cudnn").
    remat: rematerialise each layer in the backward pass (``jax.checkpoint`` in the scans): False,
        True (= "full") or a policy name of ``common.layers.remat`` ("save_projections").
    attn_block: text queries are attended in blocks of this many tokens, each seeing only the
        keys up to its end (skips the invisible half of the causal scores); 0 = one dense call.
    """

    config: object
    attn_implementation: str | None = "auto"
    remat: bool | str = False
    attn_block: int = 128

    # embed_tokens / prefill / decode_step_shared over a static KV cache: what the sampler calls
    # (one module for every family; a class attribute, not a field)
    kv_cache = kv_cache_lib

    # ----- family hooks -----------------------------------------------------------
    @staticmethod
    def build_param_table(config):
        raise NotImplementedError

    @staticmethod
    def rope_index_fn(input_ids_BxL, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def rope_index_options(self, second_per_grid_ts, mm_token_type_ids) -> dict:
        """The keyword arguments only this family's ``rope_index_fn`` takes."""
        raise NotImplementedError

    def vision_features(self, vision_params, pixel_values, grids) -> jax.Array:
        """Visual features [U, (1 + M) * D] of the images with (t, h, w) ``grids`` (traced)."""
        raise NotImplementedError

    def visual_input_options(self, second_per_grid_ts) -> dict:
        """Extra keyword arguments of ``prepare_visual_inputs`` for this family."""
        raise NotImplementedError

    # ----- parameters -------------------------------------------------------------
    def param_table(self):
        """The checkpoint table: HF name, our path, layout transform, shape, logical axes."""
        return self.build_param_table(self.config)

    def init(self, key: jax.Array, dtype=jnp.float32):
        """Random typed weights (tests, benchmarks; each row drawn by its table ``init``), jitted
        so large configs initialise quickly."""
        return jax.jit(functools.partial(init_params, self.param_table(), dtype=dtype))(key)

    # ----- host-side metadata -----------------------------------------------------
    def get_rope_index(self, input_ids, image_grid_thw=None, attention_mask=None, video_grid_thw=None,
                       second_per_grid_ts=None, mm_token_type_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """M-RoPE position ids [3, B, L] and deltas [B, 1] (NumPy), as transformers computes them.

        ``second_per_grid_ts`` scales video time in Qwen2.5-VL (Qwen3-VL ignores it: its video
        time is timestamp text between frames); ``mm_token_type_ids`` (the processor's token
        types) is read by Qwen3-VL (Qwen2.5-VL reads the types from ``input_ids``).
        """
        cfg = self.config
        return self.rope_index_fn(
            input_ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, attention_mask_BxL=attention_mask,
            **self.rope_index_options(second_per_grid_ts, mm_token_type_ids))

    # ----- pieces -----------------------------------------------------------------
    def encode_images(self, params, pixel_values, image_grid_thw) -> jax.Array:
        """Visual features [sum(t*h*w)/m^2, (1 + M) * D] for all images (or videos), in order:
        the merger output then the M DeepStack maps (one call per prompt)."""
        return _encode_images_jit(self, params.vision, pixel_values, as_grids(image_grid_thw))

    def split_visual_features(self, features) -> tuple[jax.Array, jax.Array]:
        """``encode_images`` output -> (merged [U, D], DeepStack [M, U, D])."""
        return decoder.split_visual_features(features, self.config.text.hidden_size)

    def hidden_states(self, params, input_ids, attention_mask=None, pixel_values=None,
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
            video_grid_thw=video_grid_thw, video_embeds=video_embeds, image_slot=image_slot,
            **self.visual_input_options(second_per_grid_ts))
        return _hidden_states_jit(self, params.text, input_ids, attention_mask, position_ids, *features,
                                  image_slot)

    def lm_head(self, params, h_xD: jax.Array) -> jax.Array:
        """Logits [..., vocab] in float32 for hidden states [..., D] (chunk over L as you like)."""
        return decoder.lm_head(params.text, h_xD, self.config.tie_word_embeddings)

    def forward(self, params, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                position_ids=None, image_embeds=None, **video) -> jax.Array:
        """Logits [B, L, vocab], float32. Inputs as the HF processor returns them
        (``video`` takes the ``hidden_states`` video arguments)."""
        h = self.hidden_states(params, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
                               image_embeds, **video)
        return self.lm_head(params, h)

    __call__ = forward


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_images_jit(model: QwenVLModel, vision_params, pixel_values, grids):
    return model.vision_features(vision_params, pixel_values, grids)


@functools.partial(jax.jit, static_argnums=(0,))
def _hidden_states_jit(model: QwenVLModel, text_params, input_ids_BxL, attention_mask_BxL, position_ids_3xBxL,
                       image_embeds_UxF, video_embeds_VxF, image_slot_BxL=None):
    cfg = model.config
    # image_slot: host-computed image slots (the train step's), so no prefix sum over sharded rows
    visuals = ((cfg.image_token_id, image_embeds_UxF, image_slot_BxL), (cfg.video_token_id, video_embeds_VxF, None))
    embeds, deepstack, visual_index = decoder.embed_with_visuals(text_params, input_ids_BxL, visuals)
    if position_ids_3xBxL is None:
        B, L = input_ids_BxL.shape
        position_ids_3xBxL = jnp.broadcast_to(jnp.arange(L), (3, B, L))
    return decoder.decode(text_params, embeds, jnp.asarray(position_ids_3xBxL), attention_mask_BxL, cfg.text,
                          model.attn_implementation, model.remat, model.attn_block, deepstack, visual_index)
