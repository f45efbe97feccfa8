"""Qwen3-VL configuration read from an HF ``config.json`` (the nested transformers-5 layout).

Frozen, hashable dataclasses so a model holding them can be a static ``jax.jit`` argument.
Differences from Qwen2.5-VL that the config carries: an explicit text ``head_dim``,
optional q/k/v/o biases (``attention_bias``, false in every released checkpoint),
interleaved M-RoPE, a LayerNorm + GELU vision tower with learned position embeddings
(``num_position_embeddings``) and the DeepStack taps (``deepstack_visual_indexes``).
"""

from __future__ import annotations

import dataclasses
import json
import math

from typing import ClassVar

from caspo_jax.models.common.config import (QwenTextConfig, QwenVisionConfig, QwenVLConfig, read_rope, read_vision,
                                            text_kwargs)


@dataclasses.dataclass(frozen=True)
class VisionConfig(QwenVisionConfig):
    """The ViT: the common vision fields plus its learned position grid and DeepStack taps."""

    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]

    # transformers' ``Qwen3VLVisionConfig`` defaults
    DEFAULTS: ClassVar[dict] = dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, num_position_embeddings=2304,
        deepstack_visual_indexes=(8, 16, 24), hidden_act="gelu_pytorch_tanh")

    @property
    def deepstack_order(self) -> tuple[tuple[int, int], ...]:
        """(vision block, merger) per DeepStack map, in the order the LLM receives them.

        transformers taps the blocks in ascending order (``if layer_num in indexes``) and
        applies merger ``indexes.index(layer_num)``: map k comes from the k-th smallest tapped
        block, whatever the order of ``deepstack_visual_indexes`` (a repeated index taps once).
        """
        taps = self.deepstack_visual_indexes
        return tuple((block, taps.index(block)) for block in sorted(set(taps)))

    @property
    def num_grid_per_side(self) -> int:
        """Side of the square learned position-embedding grid."""
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TextConfig(QwenTextConfig):
    """The Qwen3 decoder: the common text fields plus an explicit head dim and optional biases.
    Switches: per-head q/k RMSNorm, interleaved M-RoPE, q/k/v/o biases iff ``attention_bias``."""

    head_dim: int
    attention_bias: bool

    qk_norm = True
    mrope_interleaved = True
    DEFAULTS: ClassVar[dict] = dict(  # transformers' ``Qwen3VLTextConfig``; head_dim defaults to D / N
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
        hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False, rope_theta=500000.0, mrope_section=(24, 20, 20))

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(QwenVLConfig):
    """``text``: a ``TextConfig``, ``vision``: a ``VisionConfig`` (this module's)."""

    model_type = "qwen3_vl"
    architecture = "Qwen3VLForConditionalGeneration"

    @property
    def num_deepstack(self) -> int:
        """DeepStack feature maps added to the LLM (after decoder layers 0..num_deepstack-1):
        one per distinct tapped vision block (see ``VisionConfig.deepstack_order``)."""
        return len(self.vision.deepstack_order)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Qwen3VLConfig":
        cls.check_model_type(raw, source)
        if "text_config" not in raw:
            raise ValueError(f"{source}: Qwen3-VL config.json needs a nested 'text_config' (transformers layout)")
        text_raw = dict(raw["text_config"] or {})
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        defaults = TextConfig.DEFAULTS
        theta, section = read_rope(rope, text_raw.get("rope_theta", defaults["rope_theta"]), defaults["mrope_section"],
                                   source, "text_config.rope_parameters")
        kwargs = text_kwargs(TextConfig, text_raw)
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        text = TextConfig(**kwargs, rope_theta=theta, mrope_section=section)
        if sum(section) * 2 != text.head_dim or len(section) != 3:
            raise ValueError(f"{source}: text_config.rope_parameters.mrope_section {list(section)} must be three "
                             f"numbers summing to head_dim/2 = {text.head_dim // 2}")

        vision = read_vision(VisionConfig, dict(raw.get("vision_config") or {}), source, ("deepstack_visual_indexes",))
        if vision.num_grid_per_side**2 != vision.num_position_embeddings:
            raise ValueError(f"{source}: vision_config.num_position_embeddings={vision.num_position_embeddings} "
                             "must be a perfect square (a square grid of learned position embeddings)")
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"{source}: vision_config.out_hidden_size={vision.out_hidden_size} must equal "
                             f"text_config.hidden_size={text.hidden_size}")
        bad = [i for i in vision.deepstack_visual_indexes if not 0 <= i < vision.depth]
        if bad:
            raise ValueError(f"{source}: vision_config.deepstack_visual_indexes {bad} outside 0..depth-1 "
                             f"(depth {vision.depth})")
        return cls.assemble(raw, text_raw, text, vision)

    def to_dict(self) -> dict:
        """The transformers-5 nested config.json (raw fields kept, ours written over them)."""
        raw = json.loads(self.raw_json)
        text_raw = dict(raw.get("text_config") or {})
        t = self.text
        rope = dict(text_raw.get("rope_parameters") or {})
        rope.update(rope_type="default", rope_theta=t.rope_theta, mrope_section=list(t.mrope_section))
        rope.setdefault("mrope_interleaved", True)
        text_raw.update(head_dim=t.head_dim, attention_bias=t.attention_bias, rope_parameters=rope)
        return self.finish_dict(dict(raw), text_raw, dict(raw.get("vision_config") or {}),
                                ("deepstack_visual_indexes",))
