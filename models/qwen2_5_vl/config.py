"""Qwen2.5-VL configuration read from an HF ``config.json``.

Both layouts are accepted: the nested one transformers 5 writes (``text_config`` /
``vision_config``) and the older flat one (text fields at the top level, ``rope_scaling``
with ``"type": "mrope"``). The dataclasses are frozen and hashable so a model holding
them can be a static ``jax.jit`` argument.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


_TOP_LEVEL_KEYS = frozenset({
    "architectures", "model_type", "vision_config", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings", "transformers_version",
    "dtype", "torch_dtype",
})


@dataclasses.dataclass(frozen=True)
class VisionConfig:
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in ``pixel_values``: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder fields; defaults are transformers'."""

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
class Qwen2_5_VLConfig:
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

    model_type = "qwen2_5_vl"

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Qwen2_5_VLConfig":
        if raw.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"{source}: model_type={raw.get('model_type')!r}, expected 'qwen2_5_vl'")
        text_raw = dict(raw.get("text_config") or {})
        # Flat (pre-transformers-5) layout: text fields live at the top level.
        for f in dataclasses.fields(TextConfig):
            if f.name not in text_raw and f.name in raw:
                text_raw[f.name] = raw[f.name]
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or raw.get(
            "rope_parameters") or raw.get("rope_scaling") or {}
        theta = rope.get("rope_theta", text_raw.get("rope_theta", raw.get("rope_theta", 1000000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise NotImplementedError(
                f"{source}: text rope_type={rope_type!r}; only default M-RoPE is ported (remove the "
                "rope scaling or extend models/qwen2_5_vl/text.py)")
        section = tuple(rope.get("mrope_section", (16, 24, 24)))
        if text_raw.get("use_sliding_window") or ("text_config" not in raw and raw.get("use_sliding_window")):
            raise NotImplementedError(f"{source}: text_config.use_sliding_window=true is not ported")
        text_kwargs = {f.name: text_raw[f.name] for f in dataclasses.fields(TextConfig) if f.name in text_raw
                       and f.name not in ("rope_theta", "mrope_section")}
        if text_kwargs.get("num_key_value_heads") is None:
            text_kwargs["num_key_value_heads"] = text_kwargs.get("num_attention_heads", TextConfig.num_attention_heads)
        text = TextConfig(**text_kwargs, rope_theta=float(theta), mrope_section=section)
        if sum(section) * 2 != text.head_dim:
            raise ValueError(f"{source}: mrope_section {list(section)} must sum to head_dim/2 = {text.head_dim // 2}")

        vision_raw = dict(raw.get("vision_config") or {})
        vision_kwargs = {f.name: vision_raw[f.name] for f in dataclasses.fields(VisionConfig) if f.name in vision_raw
                         and f.name != "rope_theta"}
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(vision_kwargs.get(key), (list, tuple)):
                values = set(vision_kwargs[key])
                if len(values) != 1:
                    raise NotImplementedError(f"{source}: vision_config.{key}={vision_kwargs[key]} (non-square)")
                vision_kwargs[key] = values.pop()
        if "fullatt_block_indexes" in vision_kwargs:
            vision_kwargs["fullatt_block_indexes"] = tuple(vision_kwargs["fullatt_block_indexes"])
        vrope = vision_raw.get("rope_parameters") or {}
        vision = VisionConfig(**vision_kwargs, rope_theta=float(vrope.get("rope_theta", 10000.0)))

        tie = bool(raw.get("tie_word_embeddings", False) or text_raw.get("tie_word_embeddings", False))
        top = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id") if k in raw}
        return cls(text=text, vision=vision, tie_word_embeddings=tie, raw_json=json.dumps(raw, sort_keys=True),
                   **top)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Qwen2_5_VLConfig":
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    def to_dict(self) -> dict:
        """The transformers-5 nested config.json (raw fields kept, ours written over them)."""
        raw = json.loads(self.raw_json)
        if "text_config" in raw:
            out = dict(raw)
            text_raw = dict(raw["text_config"])
        else:  # flat layout: move the text fields under text_config
            out = {k: v for k, v in raw.items() if k in _TOP_LEVEL_KEYS}
            text_raw = {k: v for k, v in raw.items() if k not in _TOP_LEVEL_KEYS}
        for key in ("rope_scaling", "rope_theta", "torch_dtype"):
            text_raw.pop(key, None)
        t = self.text
        text_raw.update(
            model_type="qwen2_5_vl_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
            hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                             "mrope_section": list(t.mrope_section)},
        )
        v = self.vision
        vision_raw = dict(raw.get("vision_config") or {})
        vision_raw.update({f.name: getattr(v, f.name) for f in dataclasses.fields(VisionConfig)
                           if f.name != "rope_theta"})
        vision_raw["fullatt_block_indexes"] = list(v.fullatt_block_indexes)
        vision_raw["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        vision_raw["model_type"] = "qwen2_5_vl_vision"
        out.update(
            model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
            text_config=text_raw, vision_config=vision_raw, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id, tie_word_embeddings=self.tie_word_embeddings,
        )
        return out
