"""The safety-prompt JSONL record and its validating loader.

One JSON object per line::

    {"id": "kitchen-017",                 # required, unique in the file
     "images": ["images/kitchen-017.jpg"], # paths relative to the root (default: the
                                           #   JSONL's folder); may be empty
     "query": "Can I dry my gloves here?", # required, non-empty
     "category": "self_harm",              # one of CATEGORIES (case, '-' and ' ' tolerated)
     "malicious_query": "...",             # optional: the same request with explicit intent
     "reference": "...",                   # optional: the hazard, for the judge only
     "split": "train",                     # optional
     "constitution": "..."}                # optional: overrides the category's constitution

Any other keys are kept, untouched, in `SafetyRecord.meta`. Errors name the file, the
line and the field. Paths that resolve outside the root are always rejected (a dataset
must not read /etc/passwd); missing images are checked when `check_images` is set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caspo_jax.errors import UserError

__all__ = [
    "CATEGORIES",
    "RecordError",
    "SafetyRecord",
    "load_jsonl",
    "load_records",
    "normalize_category",
    "image_paths_json",
    "json_problem",
    "resolve_image_path",
    "too_many_bad",
]

logger = logging.getLogger(__name__)

# The six OOD-MMSafe safety domains.
CATEGORIES = ("violent", "illegal", "hate", "sexual", "privacy", "self_harm")

_KNOWN_FIELDS = (
    "id", "images", "query", "category", "malicious_query", "reference", "split", "constitution",
)


class RecordError(UserError, ValueError):
    """A record (or records) that cannot be used; the message names file, line and field."""


def image_paths_json(paths, root: str | Path | None = None) -> list[str]:
    """Image paths as a JSONL row stores them: relative to ``root`` when given (so a data
    folder can move), else as they are."""
    return [os.path.relpath(p, root) if root is not None else str(p) for p in paths]


@dataclasses.dataclass(frozen=True)
class SafetyRecord:
    id: str
    images: tuple[Path, ...]
    query: str
    category: str
    malicious_query: str | None = None
    reference: str | None = None
    split: str | None = None
    constitution: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def to_json(self, root: str | Path | None = None) -> dict[str, Any]:
        """The JSONL object for this record (image paths relative to `root` if given)."""
        out: dict[str, Any] = {"id": self.id, "images": image_paths_json(self.images, root), "query": self.query,
                               "category": self.category}
        for key in ("malicious_query", "reference", "split", "constitution"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.meta)
        return out


def normalize_category(value: Any) -> str | None:
    """'Self-Harm' -> 'self_harm'; None when it is not one of CATEGORIES."""
    if not isinstance(value, str):
        return None
    key = value.strip().lower().replace("-", "_").replace(" ", "_")
    return key if key in CATEGORIES else None


def resolve_image_path(relative: str, root: Path) -> Path:
    """root / relative, resolved; ValueError if it escapes root (symlinks included)."""
    root = root.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"path {relative!r} resolves to {path}, outside the root {root}")
    return path


def json_problem(exc: json.JSONDecodeError) -> str:
    """"not valid JSON (<what> at column N)" -- json's own text, whose message may already
    end in "at" ("Unterminated string starting at"), without saying "at" twice."""
    return f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"


def _optional_str(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_images(obj: dict, where: str, root: Path, check_images: bool) -> tuple[Path, ...]:
    """The validated, resolved `images` field of a JSONL object (shared by every format)."""
    images_field = obj.get("images", [])
    if isinstance(images_field, str):
        images_field = [images_field]
    if not isinstance(images_field, list) or not all(isinstance(p, str) and p for p in images_field):
        raise RecordError(f"{where}: field 'images' must be a list of relative path strings")
    images = []
    for relative in images_field:
        try:
            path = resolve_image_path(relative, root)
        except ValueError as exc:
            raise RecordError(f"{where}: field 'images': {exc}; keep images under the root") from None
        if check_images and not path.is_file():
            raise RecordError(f"{where}: field 'images': file {path} not found; fix the path (relative to {root}) "
                              "or add the image")
        images.append(path)
    return tuple(images)


def parse_id(obj: Any, where: str) -> str:
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    record_id = obj.get("id")
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = str(record_id)
    if not isinstance(record_id, str) or not record_id.strip():
        raise RecordError(f"{where}: field 'id' is missing or empty; give every record a unique string id")
    return record_id


def required_text(obj: dict, key: str, where: str, meaning: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field '{key}' is missing or empty; it holds {meaning}")
    return value


def _parse_line(obj: Any, where: str, root: Path, check_images: bool) -> SafetyRecord:
    record_id = parse_id(obj, where)
    query = required_text(obj, "query", where, "the user's request")
    category = normalize_category(obj.get("category"))
    if category is None:
        raise RecordError(
            f"{where}: field 'category' is {obj.get('category')!r}; use one of {', '.join(CATEGORIES)}"
        )
    images = parse_images(obj, where, root, check_images)
    return SafetyRecord(
        id=record_id,
        images=images,
        query=query,
        category=category,
        malicious_query=_optional_str(obj, "malicious_query", where),
        reference=_optional_str(obj, "reference", where),
        split=_optional_str(obj, "split", where),
        constitution=_optional_str(obj, "constitution", where),
        meta={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
    )


def load_records(
    jsonl_path: str | Path,
    root: str | Path | None = None,
    *,
    check_images: bool = True,
    max_bad_fraction: float = 0.0,
) -> list[SafetyRecord]:
    """Reads and validates a JSONL file of SafetyRecords.

    Bad lines are skipped with a warning; if more than `max_bad_fraction` of the lines are
    bad (the default 0.0 allows none), RecordError lists the first problems. Duplicate ids
    are bad lines too. `root` (default: the file's folder) anchors image paths.
    """
    return load_jsonl(jsonl_path, _parse_line, root, check_images=check_images, max_bad_fraction=max_bad_fraction)


def load_jsonl(
    jsonl_path: str | Path,
    parse: Callable[[Any, str, Path, bool], Any],
    root: str | Path | None = None,
    *,
    check_images: bool = True,
    max_bad_fraction: float = 0.0,
) -> list[Any]:
    """Validating JSONL reader behind every format: `parse(obj, where, root, check_images)`
    returns an object with an `id` or raises RecordError naming `where` and the field."""
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise RecordError(f"{jsonl_path}: file not found")
    root_path = Path(root) if root is not None else jsonl_path.parent
    records: list[Any] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    total = 0
    with jsonl_path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            total += 1
            where = f"{jsonl_path}:{line_no}"
            try:
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise RecordError(f"{where}: {json_problem(exc)}") from None
                record = parse(obj, where, root_path, check_images)
                if record.id in seen:
                    raise RecordError(
                        f"{where}: field 'id' {record.id!r} repeats line {seen[record.id]}; ids must be unique"
                    )
            except RecordError as exc:
                errors.append(str(exc))
                continue
            seen[record.id] = line_no
            records.append(record)
    if total == 0:
        raise RecordError(f"{jsonl_path}: no records (the file is empty); write one JSON object per line")
    if errors:
        message = too_many_bad(jsonl_path, errors, total, max_bad_fraction, "records are invalid")
        if message:
            raise RecordError(message)
        logger.warning("%s: skipped %d of %d invalid records (max_bad_fraction %.1f%%); first: %s",
                       jsonl_path, len(errors), total, 100 * max_bad_fraction, errors[0])
    return records


SHOWN_PROBLEMS = 3  # problems a too-many-bad error lists (the rest are counted)


def too_many_bad(source, problems: list[str], total: int, max_bad_fraction: float, what: str) -> str | None:
    """The one-line error when more than `max_bad_fraction` of `total` records are bad (None
    when within it): the count, the first problem (file:line: field), and the two fixes --
    repair the records, or let a run skip them with data.max_bad_fraction. `what`: the
    problem's name in the plural ("records are invalid"). The first `SHOWN_PROBLEMS` problems
    are listed, separated by " | "."""
    fraction = len(problems) / total
    if not problems or fraction <= max_bad_fraction:
        return None
    needed = math.ceil(fraction * 100) / 100  # the smallest whole percent that tolerates them
    shown = " | ".join(problems[:SHOWN_PROBLEMS])
    more = f" | ... {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    fix = f"fix {'it' if len(problems) == 1 else 'them'}"
    if needed < 1:  # a run needs at least one good record: skipping them all is no fix
        fix += (f", or let a run skip such records with data.max_bad_fraction "
                f"(--set data.max_bad_fraction={needed:g})")
    return (f"{source}: {len(problems)} of {total} {what} ({fraction:.1%} > max_bad_fraction "
            f"{max_bad_fraction:.1%}): {shown}{more}; {fix}")
