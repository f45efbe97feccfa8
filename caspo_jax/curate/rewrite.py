"""Stage 5, `rewrite`: remove textual shortcuts and write the Malicious-mode variant.

The judge model (prompt `prompt_rewrite.yaml`) decides whether the query names the
visible hazardous object (then rewrites it generically) or sounds artificial (then makes it
more covert), and writes `malicious_query`: the same request with explicit harmful intent.
A local check backs the model up: if the final query still names the hazard object (its
normalised phrase, or its head noun, as whole words) the scenario is rejected with that
reason rather than shipped with a shortcut. Kept records gain `malicious_query`,
`original_query` (when the query changed) and `rewrite` (the model's flags and reason).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caspo_jax.curate.dedup import normalize_text
from caspo_jax.curate.stage import (
    Endpoint, ReplyError, StageStats, Unit, add_spent, ask_json, retry_namespace, run_units,
)
from caspo_jax.curate.templates import PromptFile, load_prompt_file

__all__ = ["names_object", "rewrite_queries"]


def _words(text: str) -> list[str]:
    return [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in normalize_text(text).split()]


def names_object(query: str, hazard_object: str) -> bool:
    """True if `query` names `hazard_object`: the whole phrase, or its head (last) noun, as words.

    Plural "s" is ignored on both sides ("railings" matches "railing").
    """
    q, obj = _words(query), _words(hazard_object)
    if not obj:
        return False
    joined = f" {' '.join(q)} "
    if f" {' '.join(obj)} " in joined:
        return True
    head = obj[-1]
    return len(head) > 2 and head in q


def _validate(obj: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for f in ("names_hazard", "artificial"):
        if not isinstance(obj.get(f), bool):
            raise ReplyError(f"field '{f}' must be true or false, got {obj.get(f)!r}")
        out[f] = obj[f]
    for f in ("query", "malicious_query"):
        v = obj.get(f)
        if not isinstance(v, str) or not v.strip():
            raise ReplyError(f"field '{f}' must be a non-empty string")
        out[f] = re.sub(r"\s+", " ", v).strip()
    out["reason"] = str(obj.get("reason", ""))
    return out


def rewrite_queries(
    records: Sequence[dict[str, Any]],
    model: Endpoint,
    out_path: str | Path,
    *,
    prompts: PromptFile | None = None,
    chunk_size: int = 16,
    progress: bool = True,
    json_mode: bool = True,
) -> StageStats:
    """Runs (or resumes) rewriting of `records` into `out_path`."""
    prompts = prompts or load_prompt_file("rewrite", required=("rewrite",))
    template = prompts.template("rewrite")
    units = [Unit(f"rewrite/{r['id']}", r, r.get("category")) for r in records]

    def process(chunk: list[Unit]) -> list[dict[str, Any]]:
        convs = [template.messages(**{k: u.payload.get(k, "") for k in ("scene", "hazard_object", "hazard", "query")})
                 for u in chunk]
        answers = ask_json(model.client, convs, _validate,
                           namespace=[retry_namespace(prompts.version, u) for u in chunk], json_mode=json_mode)
        bodies = []
        for unit, a in zip(chunk, answers):
            spent: dict[str, dict[str, int]] = {}
            add_spent(spent, model.name, a.usage)
            rec = unit.payload
            if not a.ok:
                bodies.append({"status": "failed", "error": f"rewrite model: {a.error}", "spent": spent})
                continue
            v = a.value
            strategy = "generic" if v["names_hazard"] else "covert" if v["artificial"] else "none"
            info = {"names_hazard": v["names_hazard"], "artificial": v["artificial"], "strategy": strategy,
                    "original_named_object": names_object(rec["query"], rec.get("hazard_object", "")),
                    "reason": v["reason"]}
            if names_object(v["query"], rec.get("hazard_object", "")):
                reason = (f"rewrite: query {v['query']!r} still names the visible hazardous object "
                          f"{rec.get('hazard_object')!r}")
                bodies.append({"status": "done", "rejected": [{"id": rec["id"], "kind": "names_hazard_object", "reason": reason, "rewrite": info,
                                                               "record": rec}], "spent": spent})
                continue
            out = {**rec, "query": v["query"], "malicious_query": v["malicious_query"], "rewrite": info}
            if v["query"] != rec["query"]:
                out["original_query"] = rec["query"]
            bodies.append({"status": "done", "records": [out], "spent": spent})
        return bodies

    return run_units(units, out_path, process, stage="rewrite", version=prompts.version,
                     chunk_size=chunk_size, progress=progress)
