"""Qwen2.5-VL configuration read from an HF ``config.json``.

Both layouts are accepted: the nested one transformers 5 writes (``text_config`` /
``vision_config``) and the older flat one (text fields at the top level, ``rope_scaling``
with ``"type": "mrope"``). The dataclasses are frozen and hashable so a model holding
them can be a static ``jax.jit`` argument.
"""

from __future__ import annotations

import dataclasses
import json

from caspo_jax.models.common.config import (QwenVLConfig, TextSwitches, VisionGeometry, read_rope, read_vision,
                                            text_kwargs)

_TOP_LEVEL_KEYS = frozenset({
    "architectures", "model_type", "vision_config", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings", "transformers_version",
    "dtype", "torch_dtype",
})


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionGeometry):
    """Vision tower fields; defaults are transformers' (a missing field reads the same there)."""

    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0


@dataclasses.dataclass(frozen=True)
class TextConfig(TextSwitches):
    """Qwen2 decoder fields; defaults are transformers'. Decoder switches: q/k/v biases, no
    o bias, no q/k norm, contiguous M-RoPE bands."""

    qkv_bias = True

    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(QwenVLConfig):
    text: TextConfig
    vision: VisionConfig

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
        theta, section = read_rope(rope, text_raw.get("rope_theta", raw.get("rope_theta", 1000000.0)),
                                   (16, 24, 24), source, "text")
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
