"""Pull the JSON object out of a judge's reply (fenced, prefixed or bare)."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


class VerdictParseError(ValueError):
    """A judge reply without the JSON object the prompt asked for."""


def json_object(text: str | None) -> dict[str, Any]:
    """The last JSON object in ``text``; raises VerdictParseError with a snippet."""
    if not text:
        raise VerdictParseError("empty judge reply")
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    start = text.find("{")
    end = text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    for c in reversed(candidates):
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise VerdictParseError(f"no JSON object in judge reply: {text[:120]!r}")


def as_bool(obj: dict[str, Any], field: str) -> bool:
    v = obj.get(field)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "false", "no"):
        return v.strip().lower() in ("true", "yes")
    raise VerdictParseError(f"judge JSON field {field!r} must be true/false, got {v!r}")
