"""Qwen3-VL as pure functions over a parameter pytree (imported as ``caspo_jax.models.qwen3_vl``)."""

from caspo_jax.models.common.decoder import split_visual_features

from .config import Qwen3VLConfig, TextConfig, VisionConfig
from .model import Qwen3VL
from .params import canonical_hf_name, param_table
from .rope_index import VisionMetadata, get_rope_index, vision_metadata

__all__ = [
    "Qwen3VL", "Qwen3VLConfig", "TextConfig", "VisionConfig", "VisionMetadata", "canonical_hf_name",
    "get_rope_index", "param_table", "split_visual_features", "vision_metadata",
]
