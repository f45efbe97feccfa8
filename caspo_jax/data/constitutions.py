"""Category-specific safety constitutions (the teacher's context in CASPO).

The shipped text is `constitutions.yaml` next to this module. Users may replace it with
their own file (same layout, or a flat `{category: text}` mapping), override single
categories, and give one record its own constitution (`SafetyRecord.constitution`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from caspo_jax.data.records import CATEGORIES, SafetyRecord, normalize_category
from caspo_jax.errors import UserError
from caspo_jax.files import read_structured

__all__ = [
    "DEFAULT_CONSTITUTIONS_PATH",
    "ConstitutionError",
    "constitution_for",
    "constitutions_version",
    "load_constitutions",
]

DEFAULT_CONSTITUTIONS_PATH = Path(__file__).with_name("constitutions.yaml")


class ConstitutionError(UserError, ValueError):
    """A constitution file or override that cannot be used; the message names it."""


def _read(path: Path) -> tuple[str | None, dict[str, str]]:
    data = read_structured(path, dict, what="constitution file", expected="a mapping of category -> text",
                           error=ConstitutionError)
    version = data.get("version") if "constitutions" in data else None
    table = data["constitutions"] if "constitutions" in data else data
    if not isinstance(table, dict):
        raise ConstitutionError(f"{path}: 'constitutions' must map category -> text")
    return version, _validated(table, str(path))


def _validated(table: Mapping, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, text in table.items():
        category = normalize_category(key)
        if category is None:
            raise ConstitutionError(
                f"{where}: unknown category {key!r}; use one of {', '.join(CATEGORIES)}"
            )
        if not isinstance(text, str) or not text.strip():
            raise ConstitutionError(f"{where}: constitution for {category!r} must be non-empty text")
        out[category] = text.strip()
    return out


def load_constitutions(
    path: str | Path | None = None, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """category -> constitution text, for all six categories.

    path: a YAML/JSON file replacing the shipped constitutions; categories it does not
      define keep the shipped text. overrides: category -> text, applied last.
    """
    _, constitutions = _read(DEFAULT_CONSTITUTIONS_PATH)
    if path is not None:
        _, user = _read(Path(path))
        constitutions.update(user)
    if overrides:
        constitutions.update(_validated(overrides, "constitution overrides"))
    missing = [c for c in CATEGORIES if c not in constitutions]
    if missing:  # only possible if the shipped file is damaged
        raise ConstitutionError(f"no constitution for {missing}")
    return {c: constitutions[c] for c in CATEGORIES}


def constitutions_version(path: str | Path | None = None) -> str:
    """The `version` string of a constitution file ("custom" when it has none)."""
    version, _ = _read(Path(path) if path is not None else DEFAULT_CONSTITUTIONS_PATH)
    return version or "custom"


def constitution_for(record: SafetyRecord, constitutions: Mapping[str, str]) -> str:
    """The record's own constitution if it has one, else its category's."""
    if record.constitution:
        return record.constitution
    try:
        return constitutions[record.category]
    except KeyError:
        raise ConstitutionError(
            f"record {record.id!r}: no constitution for category {record.category!r}"
        ) from None
