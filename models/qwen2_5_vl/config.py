"""Qwen2.5-VL configuration read from an HF ``config.json``.

Both layouts are accepted: the nested one transformers 5 writes (``text_config`` /
``vision_config``) and the older flat one (text fields at the top level, ``rope_scaling``
with ``"type": "mrope"``). The dataclasses are frozen and hashable so a model holding
them can be a static ``jax.jit`` argument.
"""

from __future__ import annotations

import dataclasses
import json

from typing import ClassVar

from caspo_jax.models.common.config import (QwenTextConfig, QwenVisionConfig, QwenVLConfig, read_rope, read_vision,
                                            text_kwargs)

_TOP_LEVEL_KEYS = frozenset({
    "architectures", "model_type", "vision_config", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings", "transformers_version",
    "dtype", "torch_dtype",
})


@dataclasses.dataclass(frozen=True)
class VisionConfig(QwenVisionConfig):
    """The windowed ViT: the common vision fields plus its windows and full-attention blocks."""

    tokens_per_second: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]

    # transformers' defaults (a missing field reads the same there)
    DEFAULTS: ClassVar[dict] = dict(
        depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4, window_size=112, out_hidden_size=3584,
        fullatt_block_indexes=(7, 15, 23, 31), hidden_act="silu")


@dataclasses.dataclass(frozen=True)
class TextConfig(QwenTextConfig):
    """The Qwen2 decoder. Switches: q/k/v biases, no o bias, no q/k norm, contiguous M-RoPE bands."""

    qkv_bias = True
    DEFAULTS: ClassVar[dict] = dict(  # transformers'
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1000000.0, mrope_section=(16, 24, 24))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(QwenVLConfig):
    """``text``: a ``TextConfig``, ``vision``: a ``VisionConfig`` (this module's)."""

    model_type = "qwen2_5_vl"
    architecture = "Qwen2_5_VLForConditionalGeneration"

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Qwen2_5_VLConfig":
        cls.check_model_type(raw, source)
        text_raw = dict(raw.get("text_config") or {})
        # Flat (pre-transformers-5) layout: text fields live at the top level.
        for f in dataclasses.fields(TextConfig):
            if f.name not in text_raw and f.name in raw:
                text_raw[f.name] = raw[f.name]
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or raw.get(
            "rope_parameters") or raw.get("rope_scaling") or {}
        defaults = TextConfig.DEFAULTS
        theta, section = read_rope(rope, text_raw.get("rope_theta", raw.get("rope_theta", defaults["rope_theta"])),
                                   defaults["mrope_section"], source, "text")
        if text_raw.get("use_sliding_window") or ("text_config" not in raw and raw.get("use_sliding_window")):
            raise NotImplementedError(f"{source}: text_config.use_sliding_window=true is not ported")
        text = TextConfig(**text_kwargs(TextConfig, text_raw), rope_theta=theta, mrope_section=section)
        if sum(section) * 2 != text.head_dim:
            raise ValueError(f"{source}: mrope_section {list(section)} must sum to head_dim/2 = {text.head_dim // 2}")
        vision = read_vision(VisionConfig, dict(raw.get("vision_config") or {}), source, ("fullatt_block_indexes",))
        return cls.assemble(raw, text_raw, text, vision)

    def to_dict(self) -> dict:
        """The transformers-5 nested config.json (raw fields kept, ours written over them)."""
        raw = json.loads(self.raw_json)
        if "text_config" in raw:
            out = dict(raw)
            text_raw = dict(raw["text_config"])
        else:  # flat layout: move the text fields under text_config
            out = {k: v for k, v in raw.items() if k in _TOP_LEVEL_KEYS}
            text_raw = {k: v for k, v in raw.items() if k not in _TOP_LEVEL_KEYS}
        t = self.text
        text_raw["rope_parameters"] = {"rope_type": "default", "rope_theta": t.rope_theta,
                                       "mrope_section": list(t.mrope_section)}
        return self.finish_dict(out, text_raw, dict(raw.get("vision_config") or {}), ("fullatt_block_indexes",))
