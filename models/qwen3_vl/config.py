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
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class VisionConfig:
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
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in ``pixel_values``: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

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
class TextConfig:
    """Qwen3 decoder fields; defaults are transformers' ``Qwen3VLTextConfig``."""

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


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    # The config.json as read, so save_pretrained writes back every field transformers
    # knows about (bos/eos ids, max_position_embeddings...). Excluded from hash/eq.
    raw_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    model_type = "qwen3_vl"

    @property
    def num_deepstack(self) -> int:
        """DeepStack feature maps added to the LLM (after decoder layers 0..num_deepstack-1):
        one per distinct tapped vision block (see ``VisionConfig.deepstack_order``)."""
        return len(self.vision.deepstack_order)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Qwen3VLConfig":
        if raw.get("model_type") not in (None, "qwen3_vl"):
            raise ValueError(f"{source}: model_type={raw.get('model_type')!r}, expected 'qwen3_vl'")
        if "text_config" not in raw:
            raise ValueError(f"{source}: Qwen3-VL config.json needs a nested 'text_config' (transformers layout)")
        text_raw = dict(raw["text_config"] or {})
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise NotImplementedError(
                f"{source}: text_config.rope_parameters.rope_type={rope_type!r}; only default interleaved "
                "M-RoPE is ported (remove the rope scaling or extend models/qwen3_vl/text.py)")
        theta = rope.get("rope_theta", text_raw.get("rope_theta", TextConfig.rope_theta))
        section = tuple(rope.get("mrope_section", (24, 20, 20)))
        skip = ("rope_theta", "mrope_section")
        text_kwargs = {f.name: text_raw[f.name] for f in dataclasses.fields(TextConfig)
                       if f.name in text_raw and f.name not in skip}
        if text_kwargs.get("num_key_value_heads") is None:
            text_kwargs["num_key_value_heads"] = text_kwargs.get("num_attention_heads", TextConfig.num_attention_heads)
        if text_kwargs.get("head_dim") is None:
            text_kwargs["head_dim"] = (text_kwargs.get("hidden_size", TextConfig.hidden_size)
                                       // text_kwargs.get("num_attention_heads", TextConfig.num_attention_heads))
        text = TextConfig(**text_kwargs, rope_theta=float(theta), mrope_section=section)
        if sum(section) * 2 != text.head_dim or len(section) != 3:
            raise ValueError(f"{source}: text_config.rope_parameters.mrope_section {list(section)} must be three "
                             f"numbers summing to head_dim/2 = {text.head_dim // 2}")

        vision_raw = dict(raw.get("vision_config") or {})
        vision_kwargs = {f.name: vision_raw[f.name] for f in dataclasses.fields(VisionConfig)
                         if f.name in vision_raw and f.name != "rope_theta"}
        if "num_heads" not in vision_kwargs and "num_attention_heads" in vision_raw:
            vision_kwargs["num_heads"] = vision_raw["num_attention_heads"]
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(vision_kwargs.get(key), (list, tuple)):
                values = set(vision_kwargs[key])
                if len(values) != 1:
                    raise NotImplementedError(f"{source}: vision_config.{key}={vision_kwargs[key]} (non-square)")
                vision_kwargs[key] = values.pop()
        if "deepstack_visual_indexes" in vision_kwargs:
            vision_kwargs["deepstack_visual_indexes"] = tuple(vision_kwargs["deepstack_visual_indexes"])
        vrope = vision_raw.get("rope_parameters") or {}
        vision = VisionConfig(**vision_kwargs, rope_theta=float(vrope.get("rope_theta", 10000.0)))
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

        tie = bool(raw.get("tie_word_embeddings", False) or text_raw.get("tie_word_embeddings", False))
        top = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id") if k in raw}
        return cls(text=text, vision=vision, tie_word_embeddings=tie, raw_json=json.dumps(raw, sort_keys=True),
                   **top)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Qwen3VLConfig":
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    def to_dict(self) -> dict:
        """The transformers-5 nested config.json (raw fields kept, ours written over them)."""
        raw = json.loads(self.raw_json)
        out = dict(raw)
        text_raw = dict(raw.get("text_config") or {})
        for key in ("rope_scaling", "rope_theta", "torch_dtype"):
            text_raw.pop(key, None)
        t = self.text
        rope = dict((raw.get("text_config") or {}).get("rope_parameters") or {})
        rope.update(rope_type="default", rope_theta=t.rope_theta, mrope_section=list(t.mrope_section))
        rope.setdefault("mrope_interleaved", True)
        text_raw.update(
            model_type="qwen3_vl_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
            head_dim=t.head_dim, hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps,
            attention_bias=t.attention_bias, rope_parameters=rope,
        )
        v = self.vision
        vision_raw = dict(raw.get("vision_config") or {})
        vision_raw.update({f.name: getattr(v, f.name) for f in dataclasses.fields(VisionConfig)
                           if f.name != "rope_theta"})
        vision_raw["deepstack_visual_indexes"] = list(v.deepstack_visual_indexes)
        vision_raw["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        vision_raw["model_type"] = "qwen3_vl_vision"
        out.update(
            model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"],
            text_config=text_raw, vision_config=vision_raw, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id, tie_word_embeddings=self.tie_word_embeddings,
        )
        return out
