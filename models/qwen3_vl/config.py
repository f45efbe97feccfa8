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

from caspo_jax.models.common.config import (QwenVLConfig, TextSwitches, VisionGeometry, read_rope, read_vision,
                                            text_kwargs)


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionGeometry):
    """Vision tower fields; defaults are transformers' ``Qwen3VLVisionConfig``."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

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
class TextConfig(TextSwitches):
    """Qwen3 decoder fields; defaults are transformers' ``Qwen3VLTextConfig``. Decoder switches:
    per-head q/k RMSNorm, interleaved M-RoPE, q/k/v/o biases iff ``attention_bias``."""

    qk_norm = True
    mrope_interleaved = True

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float = 500000.0
    mrope_section: tuple[int, ...] = (24, 20, 20)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(QwenVLConfig):
    text: TextConfig
    vision: VisionConfig

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
        theta, section = read_rope(rope, text_raw.get("rope_theta", TextConfig.rope_theta), (24, 20, 20), source,
                                   "text_config.rope_parameters")
        kwargs = text_kwargs(TextConfig, text_raw)
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = (kwargs.get("hidden_size", TextConfig.hidden_size)
                                  // kwargs.get("num_attention_heads", TextConfig.num_attention_heads))
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
