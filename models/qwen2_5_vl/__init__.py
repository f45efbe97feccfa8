"""Qwen2.5-VL as pure functions over a parameter pytree (imported as ``caspo_jax.models.qwen2_5_vl``)."""

from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from .model import Qwen2_5_VL
from .params import canonical_hf_name, param_table
from .rope_index import VisionMetadata, get_rope_index, vision_metadata

__all__ = [
    "Qwen2_5_VL", "Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "VisionMetadata",
    "canonical_hf_name", "get_rope_index", "param_table", "vision_metadata",
]
