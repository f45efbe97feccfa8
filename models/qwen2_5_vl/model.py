"""``Qwen2_5_VL``: the common Qwen-VL model (``caspo_jax.models.common.model.QwenVLModel``)
with Qwen2.5-VL's parameter table, rope index and windowed ViT.

Qwen2.5-VL specifics the hooks carry: video M-RoPE positions scale time by
``second_per_grid_ts`` (an extra ``get_rope_index`` argument), and the visual features are
the merger output alone ([U, D], no DeepStack maps).
"""

from __future__ import annotations

import dataclasses

from caspo_jax.models.common.model import QwenVLModel

from . import vision as vision_lib
from .params import param_table
from .rope_index import get_rope_index, vision_metadata


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VL(QwenVLModel):
    """Qwen2.5-VL (``config``: a ``Qwen2_5_VLConfig``); fields and methods: ``QwenVLModel``."""

    build_param_table = staticmethod(param_table)
    rope_index_fn = staticmethod(get_rope_index)

    def rope_index_options(self, second_per_grid_ts, mm_token_type_ids) -> dict:
        return {"tokens_per_second": self.config.vision.tokens_per_second, "second_per_grid_ts": second_per_grid_ts}

    def vision_features(self, vision_params, pixel_values, grids):
        """The windowed ViT's merged features [U, D]."""
        v = self.config.vision
        meta = vision_metadata(grids, v.spatial_merge_size, v.window_size, v.patch_size)
        return vision_lib.encode_images(vision_params, pixel_values, meta, v, self.attn_implementation, self.remat)

    def visual_input_options(self, second_per_grid_ts) -> dict:
        return {"rope_extra": (second_per_grid_ts,)}
