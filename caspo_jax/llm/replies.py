"""The JSON object a chat model was asked for, pulled out of its reply (fenced, prefixed or bare).

Lenient on purpose (evaluation judges and curation stages talk to arbitrary endpoints);
the R/S/E rubric parses strictly instead (`caspo_jax.rubric.parse_scores`).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["ReplyParseError", "reply_bool", "reply_json_object"]

_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


class ReplyParseError(ValueError):
    """A model reply without the JSON object the prompt asked for."""


def reply_json_object(text: str | None) -> dict[str, Any]:
    """The last JSON object in ``text``; raises ReplyParseError with a snippet."""
    if not text:
        raise ReplyParseError("empty reply")
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
    raise ReplyParseError(f"no JSON object in reply: {text[:120]!r}")


def reply_bool(obj: dict[str, Any], field: str) -> bool:
    v = obj.get(field)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "false", "no"):
        return v.strip().lower() in ("true", "yes")
    raise ReplyParseError(f"JSON field {field!r} must be true/false, got {v!r}")
