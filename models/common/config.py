"""What every Qwen-VL config shares: the top-level fields, the decoder switches, and the
pieces of reading and writing an HF ``config.json`` that do not depend on the family.

A family's ``config.py`` keeps its own field lists and defaults (transformers' own, which
differ per family) and its validation; it reads and writes through the helpers here. The
dataclasses are frozen and hashable so a model holding them can be a static ``jax.jit``
argument.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

# text fields every family writes back to ``text_config`` under the same names
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "rms_norm_eps")
_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


class TextSwitches:
    """The decoder switches ``caspo_jax.models.common.decoder`` reads from a text config.

    Class constants (not dataclass fields, so they take no part in equality, hashing or
    the config.json) that a family's ``TextConfig`` overrides, with a property where a
    config field decides: ``qkv_bias`` / ``o_bias`` (biases of the q/k/v and o
    projections), ``qk_norm`` (per-head q/k RMSNorm), ``mrope_interleaved`` (the order of
    the M-RoPE frequency rows).
    """

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    mrope_interleaved: bool = False


@dataclasses.dataclass(frozen=True)
class QwenTextConfig(TextSwitches):
    """The text decoder fields every family has. No defaults here: a family's ``DEFAULTS``
    holds transformers' own (they differ per family), filled in by ``text_kwargs``; a
    missing ``num_key_value_heads`` means one key/value head per query head."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]

    DEFAULTS: ClassVar[dict] = {}


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """The vision tower fields every family has, and their derived sizes. Defaults: the
    family's ``DEFAULTS`` (transformers' own), filled in by ``read_vision``."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    hidden_act: str
    rope_theta: float

    DEFAULTS: ClassVar[dict] = {}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in ``pixel_values``: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """The fields every Qwen-VL config has; a family subclasses it with its ``model_type``,
    ``architecture`` and ``from_dict`` / ``to_dict``."""

    text: Any
    vision: Any
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    # The config.json as read, so save_pretrained writes back every field transformers
    # knows about (bos/eos ids, max_position_embeddings...). Excluded from hash/eq.
    raw_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    model_type = ""
    architecture = ""

    @classmethod
    def from_json_file(cls, path: str | Path):
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    @classmethod
    def check_model_type(cls, raw: dict, source: str) -> None:
        if raw.get("model_type") not in (None, cls.model_type):
            raise ValueError(f"{source}: model_type={raw.get('model_type')!r}, expected {cls.model_type!r}")

    @classmethod
    def assemble(cls, raw: dict, text_raw: dict, text, vision):
        """The config from its parsed parts plus the top-level fields of ``raw``."""
        tie = bool(raw.get("tie_word_embeddings", False) or text_raw.get("tie_word_embeddings", False))
        top = {k: raw[k] for k in _TOKEN_FIELDS if k in raw}
        return cls(text=text, vision=vision, tie_word_embeddings=tie, raw_json=json.dumps(raw, sort_keys=True),
                   **top)

    def finish_dict(self, out: dict, text_raw: dict, vision_raw: dict, vision_tuples: tuple[str, ...]) -> dict:
        """``out`` (the raw top level) with the text fields common to the families written into
        ``text_raw``, every vision field into ``vision_raw`` (``vision_tuples`` as lists), and
        the top-level fields: the transformers-5 nested config.json."""
        for key in ("rope_scaling", "rope_theta", "torch_dtype"):
            text_raw.pop(key, None)
        text_raw.update({name: getattr(self.text, name) for name in _TEXT_FIELDS},
                        model_type=f"{self.model_type}_text")
        v = self.vision
        vision_raw.update({f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.name != "rope_theta"})
        vision_raw.update({name: list(getattr(v, name)) for name in vision_tuples})
        vision_raw["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        vision_raw["model_type"] = f"{self.model_type}_vision"
        out.update(model_type=self.model_type, architectures=[self.architecture], text_config=text_raw,
                   vision_config=vision_raw, tie_word_embeddings=self.tie_word_embeddings,
                   **{k: getattr(self, k) for k in _TOKEN_FIELDS})
        return out


def read_rope(rope: dict, theta_default: float, section_default: tuple[int, ...], source: str,
              where: str) -> tuple[float, tuple[int, ...]]:
    """(rope_theta, mrope_section) from a ``rope_parameters`` / ``rope_scaling`` dict; only the
    default (M-)RoPE is ported. ``where`` names the field and the file to extend in errors."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise NotImplementedError(f"{source}: {where} rope_type={rope_type!r}; only default M-RoPE is ported "
                                  "(remove the rope scaling or extend models/common/decoder.py)")
    return float(rope.get("rope_theta", theta_default)), tuple(rope.get("mrope_section", section_default))


def text_kwargs(text_cls, text_raw: dict) -> dict:
    """The ``text_cls`` fields of ``text_raw`` over its ``DEFAULTS`` (rope fields aside, the
    caller's from ``read_rope``), with ``num_key_value_heads`` defaulting to the query heads
    as transformers does."""
    kwargs = {**text_cls.DEFAULTS, **{f.name: text_raw[f.name] for f in dataclasses.fields(text_cls)
                                      if f.name in text_raw}}
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    for key in ("rope_theta", "mrope_section"):
        kwargs.pop(key, None)
    return kwargs


def read_vision(vision_cls, vision_raw: dict, source: str, tuple_fields: tuple[str, ...]):
    """``vision_cls`` from a ``vision_config`` dict: its fields over its ``DEFAULTS``
    (``num_attention_heads`` read as ``num_heads``), square patch sizes given as lists
    collapsed, ``tuple_fields`` as tuples and the rotary theta from ``rope_parameters``."""
    kwargs = {f.name: vision_raw[f.name] for f in dataclasses.fields(vision_cls)
              if f.name in vision_raw and f.name != "rope_theta"}
    if "num_heads" not in kwargs and "num_attention_heads" in vision_raw:
        kwargs["num_heads"] = vision_raw["num_attention_heads"]
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(kwargs.get(key), (list, tuple)):
            values = set(kwargs[key])
            if len(values) != 1:
                raise NotImplementedError(f"{source}: vision_config.{key}={kwargs[key]} (non-square)")
            kwargs[key] = values.pop()
    for key in tuple_fields:
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    rope = vision_raw.get("rope_parameters") or {}
    return vision_cls(**{**vision_cls.DEFAULTS, **kwargs}, rope_theta=float(rope.get("rope_theta", 10000.0)))
