"""``Qwen2_5_VL``: the common Qwen-VL model (``caspo_jax.models.common.model.QwenVLModel``)
with Qwen2.5-VL's parameter table, rope index and windowed ViT.

Qwen2.5-VL specifics the hooks carry: video M-RoPE positions scale time by
``second_per_grid_ts`` (an extra ``get_rope_index`` argument), and the visual features are
the merger output alone ([U, D], no DeepStack maps).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from caspo_jax.models.common.model import QwenVLModel

from . import vision as vision_lib
from .config import Qwen2_5_VLConfig
from .params import init_params, param_table
from .rope_index import get_rope_index, vision_metadata


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VL(QwenVLModel):
    """Qwen2.5-VL as pure functions of (params, inputs); fields and methods: ``QwenVLModel``."""

    config: Qwen2_5_VLConfig

    build_param_table = staticmethod(param_table)
    build_init_params = staticmethod(init_params)

    def get_rope_index(self, input_ids, image_grid_thw=None, attention_mask=None, video_grid_thw=None,
                       second_per_grid_ts=None) -> tuple[np.ndarray, np.ndarray]:
        """M-RoPE position ids [3, B, L] and deltas [B, 1] (NumPy), as transformers computes them."""
        cfg = self.config
        return get_rope_index(
            input_ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size, tokens_per_second=cfg.vision.tokens_per_second,
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, attention_mask_BxL=attention_mask)

    def vision_features(self, vision_params: dict, pixel_values, grids):
        """The windowed ViT's merged features [U, D]."""
        v = self.config.vision
        meta = vision_metadata(grids, v.spatial_merge_size, v.window_size, v.patch_size)
        return vision_lib.encode_images(vision_params, pixel_values, meta, v, self.attn_implementation, self.remat)

    def visual_input_options(self, second_per_grid_ts) -> dict:
        return {"rope_extra": (second_per_grid_ts,)}
