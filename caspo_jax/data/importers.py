"""Importers for BeaverTails-V and SPA-VL exports on local disk (nothing is downloaded).

Accepted input: a `.jsonl` file (one row per line) or a `.json` file holding a list of
rows, with the datasets' published column names, and images already written to files
under an image root (a Hugging Face `datasets` export writes `image` as {"path": ...}
or you save each image and store its path). Image columns accepted, in this order:
`image` (a path string or {"path": ...}), `image_path`, `image_name`.

BeaverTails-V (PKU-Alignment/BeaverTails-V), per row:
  question, image, category, image_severity, and either
  * one response: `response`, `is_response_safe` ("true"/"false" or a bool), or
  * a pair: `response_1`, `response_2` (or `response_0`, `response_1`), with
    `safer_response_id` naming the safer one, and/or `is_response_<k>_safe`.
SPA-VL (sqrti/SPA-VL), per row:
  question, image or image_name, chosen, rejected, and optionally class1, class2, class3
  (the validation config has them; the train config does not).

Outputs (our formats; `write_jsonl` writes any of them):
  * `PreferencePair`: DPO / reward-model pairs (chosen is the safer response);
  * `SFTExample`: a response known to be safe;
  * `SafetyRecord`: an RL prompt (the JSONL record of `records.py`).
Dataset categories are mapped to our six by `map_category` (keyword rules, overridable);
rows that cannot be used are skipped and counted in `ImportReport`, never crash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from caspo_jax.data.formats import PreferencePair, SFTExample
from caspo_jax.data.records import (CATEGORIES, RecordError, SafetyRecord, json_problem, normalize_category,
                                    resolve_image_path)

__all__ = [
    "ImportReport",
    "PreferencePair",
    "SFTExample",
    "import_beavertails_v",
    "import_spa_vl",
    "map_category",
    "read_rows",
    "write_jsonl",
]

# PreferencePair and SFTExample live in formats.py (with their loaders); re-exported here.

# Checked in order: the first rule whose keyword occurs in the lower-cased label wins
# ("self-harm" must win over a generic "harm"; "sexual" before "abuse"; ...).
_CATEGORY_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_harm", ("self-harm", "self_harm", "self harm", "suicid", "eating disorder", "health", "psycholog")),
    ("sexual", ("sexual", "porn", "adult content", "nsfw", "nudity", "erotic")),
    ("privacy", ("privacy", "personal information", "personal data", "surveillance", "doxx", "tracking")),
    ("hate", ("hate", "discriminat", "stereotyp", "toxic", "insult", "racis", "bias", "offensive", "harass")),
    ("illegal", ("illegal", "crime", "criminal", "fraud", "drug", "theft", "financial", "cyber", "malicious use",
                 "property", "economic", "deception", "misinformation", "copyright", "unethical")),
    ("violent", ("violen", "weapon", "terror", "dangerous", "physical", "horror", "animal abuse", "abuse",
                 "blood", "gore", "war")),
)


def map_category(label: Any, overrides: Mapping[str, str] | None = None) -> str | None:
    """One of CATEGORIES for a dataset's category label, or None when nothing matches.

    overrides: exact label -> category, checked first (case-insensitive).
    """
    if not isinstance(label, str) or not label.strip():
        return None
    if overrides:
        lowered = {k.lower(): v for k, v in overrides.items()}
        if label.lower() in lowered:
            category = normalize_category(lowered[label.lower()])
            if category is None:
                raise ValueError(f"category override {label!r} -> {lowered[label.lower()]!r} is not one of {CATEGORIES}")
            return category
    direct = normalize_category(label)
    if direct is not None:
        return direct
    text = label.lower().replace("_", " ")
    for category, keywords in _CATEGORY_RULES:
        if any(k.replace("_", " ") in text for k in keywords):
            return category
    return None


@dataclasses.dataclass
class ImportReport:
    """What happened to every row: counts per reason, and the first messages."""

    rows: int = 0
    pairs: int = 0
    sft: int = 0
    prompts: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.messages) < 50:
            self.messages.append(f"{where}: {reason}")


@dataclasses.dataclass
class ImportResult:
    pairs: list[PreferencePair]
    sft: list[SFTExample]
    prompts: list[SafetyRecord]
    report: ImportReport


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, row) for every row of a .jsonl file or a .json list; bad JSON lines are
    yielded as (location, RecordError) so the caller can count them."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RecordError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise RecordError(f"{path}: a .json export must hold a list of rows")
        for index, row in enumerate(rows):
            yield f"{path}[{index}]", row
        return
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except ValueError as exc:
                yield f"{path}:{line_no}", RecordError(json_problem(exc))


def _image_paths(row: Mapping[str, Any], image_root: Path) -> tuple[Path, ...]:
    value = row.get("image")
    if isinstance(value, Mapping):
        value = value.get("path")
    if not value:
        value = row.get("image_path") or row.get("image_name")
    if not isinstance(value, str) or not value:
        raise ValueError("no image path (columns image / image_path / image_name)")
    path = resolve_image_path(value, image_root)
    if not path.is_file():
        raise ValueError(f"image {path} not found")
    return (path,)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _text(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def import_beavertails_v(
    path: str | Path,
    image_root: str | Path,
    *,
    category_overrides: Mapping[str, str] | None = None,
    id_prefix: str = "btv",
) -> ImportResult:
    """Pairs, safe SFT responses and RL prompts from a BeaverTails-V export (see module doc)."""
    return _import(path, Path(image_root), _beavertails_row, category_overrides, id_prefix, "category")


def import_spa_vl(
    path: str | Path,
    image_root: str | Path,
    *,
    category_overrides: Mapping[str, str] | None = None,
    default_category: str | None = None,
    id_prefix: str = "spavl",
) -> ImportResult:
    """Pairs (chosen/rejected), the chosen responses as SFT, and RL prompts from SPA-VL.

    SPA-VL's train config has no class columns: give `default_category` to keep its
    prompts as RL records (pairs and SFT examples do not need a category).
    """
    if default_category is not None and normalize_category(default_category) is None:
        raise ValueError(f"default_category {default_category!r} is not one of {CATEGORIES}")
    return _import(path, Path(image_root), _spa_vl_row, category_overrides, id_prefix,
                   ("class1", "class2", "class3"), default_category)


def _import(path, image_root, parse_row, overrides, id_prefix, category_keys, default_category=None) -> ImportResult:
    result = ImportResult([], [], [], ImportReport())
    report = result.report
    seen_prompts: set[tuple[str, tuple[Path, ...]]] = set()
    for index, (where, row) in enumerate(read_rows(path)):
        report.rows += 1
        if isinstance(row, Exception):
            report.skip(str(row), where)
            continue
        if not isinstance(row, Mapping):
            report.skip("row is not a JSON object", where)
            continue
        query = _text(row, "question")
        if query is None:
            report.skip("empty or missing 'question'", where)
            continue
        try:
            images = _image_paths(row, image_root)
        except ValueError as exc:
            report.skip(str(exc) if "outside the root" not in str(exc) else "image path outside the image root", where)
            continue
        labels = [row.get(k) for k in ((category_keys,) if isinstance(category_keys, str) else category_keys)]
        category = next((c for c in (map_category(l, overrides) for l in labels) if c), None)
        category = category or (normalize_category(default_category) if default_category else None)
        row_id = str(row.get("id", f"{id_prefix}-{index:07d}"))
        meta = {"source": id_prefix, "source_category": next((l for l in labels if isinstance(l, str)), None)}
        if "image_severity" in row:
            meta["image_severity"] = row["image_severity"]
        pair, safe_responses, problem = parse_row(row)
        if problem:
            report.skip(problem, where)
        if pair is not None:
            result.pairs.append(PreferencePair(row_id, images, query, pair[0], pair[1], category, meta))
            report.pairs += 1
        for k, response in enumerate(safe_responses):
            result.sft.append(SFTExample(f"{row_id}-r{k}", images, query, response, category, meta))
            report.sft += 1
        if category is None:
            report.skip("no category maps to one of the six (prompt not kept for RL)", where)
        elif (query, images) not in seen_prompts:
            seen_prompts.add((query, images))
            result.prompts.append(SafetyRecord(row_id, images, query, category, meta=meta))
            report.prompts += 1
    return result


def _beavertails_row(row: Mapping[str, Any]) -> tuple[tuple[str, str] | None, list[str], str | None]:
    keys = sorted(int(m.group(1)) for k in row if (m := re.fullmatch(r"response_(\d+)", k)))
    if not keys:
        response = _text(row, "response")
        safe = _as_bool(row.get("is_response_safe"))
        if response is None:
            return None, [], "no response column"
        return None, [response] if safe else [], None if safe is not None else "no is_response_safe label"
    responses = {k: _text(row, f"response_{k}") for k in keys}
    safe = {k: _as_bool(row.get(f"is_response_{k}_safe")) for k in keys}
    sft = [responses[k] for k in keys if responses[k] and safe[k]]
    if len(keys) != 2 or not all(responses.values()):
        return None, sft, "pair needs exactly two non-empty responses"
    first, second = keys
    safer = row.get("safer_response_id")
    if safer is not None and int(safer) in keys:
        chosen = int(safer)
    elif safe[first] is not None and safe[second] is not None and safe[first] != safe[second]:
        chosen = first if safe[first] else second
    else:
        return None, sft, "no safer_response_id and no safety labels that separate the pair"
    rejected = second if chosen == first else first
    return (responses[chosen], responses[rejected]), sft, None


def _spa_vl_row(row: Mapping[str, Any]) -> tuple[tuple[str, str] | None, list[str], str | None]:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen is None or rejected is None:
        return None, [], "chosen/rejected missing (test-config rows only give prompts)"
    return (chosen, rejected), [chosen], None


def write_jsonl(path: str | Path, items: Iterable[Any], root: str | Path | None = None) -> int:
    """Writes objects with `to_json(root)` one per line (atomically); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.to_json(root), ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
