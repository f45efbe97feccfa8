"""``Qwen3VL``: the common Qwen-VL model (``caspo_jax.models.common.model.QwenVLModel``)
with Qwen3-VL's parameter table, rope index and ViT with DeepStack mergers.

Qwen3-VL specifics the hooks carry: the visual features are [U, (1 + M) * D], the merger
output followed by the M DeepStack maps (the decoder adds map m after layer m), and their
width is checked on given embeddings; video time is timestamp text, not a position.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from caspo_jax.models.common.model import QwenVLModel

from . import vision as vision_lib
from .params import param_table
from .rope_index import get_rope_index, vision_metadata


@dataclasses.dataclass(frozen=True)
class Qwen3VL(QwenVLModel):
    """Qwen3-VL (``config``: a ``Qwen3VLConfig``); fields and methods: ``QwenVLModel``."""

    build_param_table = staticmethod(param_table)
    rope_index_fn = staticmethod(get_rope_index)

    def rope_index_options(self, second_per_grid_ts, mm_token_type_ids) -> dict:
        return {"mm_token_type_ids_BxL": mm_token_type_ids}

    def vision_features(self, vision_params, pixel_values, grids):
        """[U, (1 + M) * D]: per visual token, the merger output then the M DeepStack maps."""
        v = self.config.vision
        meta = vision_metadata(grids, v.spatial_merge_size, v.num_grid_per_side)
        merged, deepstack = vision_lib.encode_images(vision_params, pixel_values, meta, v, self.attn_implementation,
                                                     self.remat)
        return jnp.concatenate([merged[None], deepstack], axis=0).transpose(1, 0, 2).reshape(merged.shape[0], -1)

    def visual_input_options(self, second_per_grid_ts) -> dict:
        cfg = self.config
        return {"embed_width": (1 + cfg.num_deepstack) * cfg.text.hidden_size,
                "embed_width_terms": f"(1 + {cfg.num_deepstack} DeepStack maps) * {cfg.text.hidden_size}"}
