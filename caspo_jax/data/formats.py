"""Our JSONL formats besides RL prompts: preference pairs and SFT examples.

    pairs:  {"id", "images": [...], "query", "chosen", "rejected", "category"?: str|null, ...}
    SFT:    {"id", "images": [...], "query", "response", "category"?: str|null, ...}

Image paths are relative to a root (default: the file's folder) and may not leave it;
other keys are kept in `meta`. Validation errors name the file, the line and the field,
exactly as for SafetyRecord (`records.load_jsonl`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from caspo_jax.data.records import (
    CATEGORIES,
    RecordError,
    image_paths_json,
    load_jsonl,
    normalize_category,
    parse_id,
    parse_images,
    required_text,
)

__all__ = ["PreferencePair", "SFTExample", "load_pairs", "load_sft_examples"]


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (safer) and a dispreferred response."""

    id: str
    images: tuple[Path, ...]
    query: str
    chosen: str
    rejected: str
    category: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def to_json(self, root: str | Path | None = None) -> dict[str, Any]:
        return {"id": self.id, "images": image_paths_json(self.images, root), "query": self.query,
                "chosen": self.chosen, "rejected": self.rejected, "category": self.category, **self.meta}


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """A prompt with one response to imitate."""

    id: str
    images: tuple[Path, ...]
    query: str
    response: str
    category: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def to_json(self, root: str | Path | None = None) -> dict[str, Any]:
        return {"id": self.id, "images": image_paths_json(self.images, root), "query": self.query,
                "response": self.response, "category": self.category, **self.meta}


def _optional_category(obj: dict, where: str) -> str | None:
    value = obj.get("category")
    if value is None:
        return None
    category = normalize_category(value)
    if category is None:
        raise RecordError(f"{where}: field 'category' is {value!r}; use one of {', '.join(CATEGORIES)} or null")
    return category


def _parse_pair(obj: Any, where: str, root: Path, check_images: bool) -> PreferencePair:
    pair_id = parse_id(obj, where)
    chosen = required_text(obj, "chosen", where, "the preferred response")
    rejected = required_text(obj, "rejected", where, "the dispreferred response")
    if chosen == rejected:
        raise RecordError(f"{where}: fields 'chosen' and 'rejected' are identical; a pair needs two responses")
    known = ("id", "images", "query", "chosen", "rejected", "category")
    return PreferencePair(
        id=pair_id,
        images=parse_images(obj, where, root, check_images),
        query=required_text(obj, "query", where, "the user's request"),
        chosen=chosen,
        rejected=rejected,
        category=_optional_category(obj, where),
        meta={k: v for k, v in obj.items() if k not in known},
    )


def _parse_sft(obj: Any, where: str, root: Path, check_images: bool) -> SFTExample:
    known = ("id", "images", "query", "response", "category")
    return SFTExample(
        id=parse_id(obj, where),
        images=parse_images(obj, where, root, check_images),
        query=required_text(obj, "query", where, "the user's request"),
        response=required_text(obj, "response", where, "the response to imitate"),
        category=_optional_category(obj, where),
        meta={k: v for k, v in obj.items() if k not in known},
    )


def load_pairs(jsonl_path: str | Path, root: str | Path | None = None, *, check_images: bool = True,
               max_bad_fraction: float = 0.0) -> list[PreferencePair]:
    """Validated preference pairs (see the module doc for the layout)."""
    return load_jsonl(jsonl_path, _parse_pair, root, check_images=check_images, max_bad_fraction=max_bad_fraction)


def load_sft_examples(jsonl_path: str | Path, root: str | Path | None = None, *, check_images: bool = True,
                      max_bad_fraction: float = 0.0) -> list[SFTExample]:
    """Validated SFT examples (see the module doc for the layout)."""
    return load_jsonl(jsonl_path, _parse_sft, root, check_images=check_images, max_bad_fraction=max_bad_fraction)
