"""Stage 1, `synthesize`: few-shot latent-hazard scenarios from one or more models.

For every (category, sub-category) of the prompt file, every endpoint and every call
index c < `calls`, one request asks for `per_call` new scenarios (temperature sampling;
call c uses cache namespace `<version>/c<c>`, so calls are distinct draws and a resumed
run re-reads rather than re-buys them). Scenario record::

    {"id": "violent-heights_and_falls-gpt-0-1", "category": "violent",
     "subcategory": "heights_and_falls", "scene": ..., "query": ..., "hazard": ...,
     "hazard_object": ..., "causal_chain": "a -> b -> harm", "source_model": "gpt"}

A scenario missing a field is rejected with the reason; a reply that is not the
requested JSON gets one repair turn, then the call fails (and is redone on rerun).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caspo_jax.curate.stage import (
    Endpoint, ReplyError, StageStats, Unit, add_spent, ask_json, retry_namespace, run_units,
)
from caspo_jax.curate.templates import PromptFile, PromptFileError, load_prompt_file
from caspo_jax.data.records import CATEGORIES, normalize_category

__all__ = ["SCENARIO_FIELDS", "scenario_units", "subcategories", "synthesize", "validate_scenario"]

SCENARIO_FIELDS = ("scene", "query", "hazard", "hazard_object", "causal_chain")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def subcategories(prompts: PromptFile) -> list[tuple[str, str, dict[str, Any]]]:
    """(category, sub-category, its spec) for every entry of the file's `categories`."""
    table = prompts.data.get("categories")
    if not isinstance(table, dict) or not table:
        raise PromptFileError(f"{prompts.path}: field 'categories' must map category -> {{description, subcategories}}")
    out = []
    for raw_category, spec in table.items():
        category = normalize_category(raw_category)
        if category is None:
            raise PromptFileError(f"{prompts.path}: categories.{raw_category}: not one of {', '.join(CATEGORIES)}")
        subs = (spec or {}).get("subcategories")
        if not isinstance(subs, dict) or not subs:
            raise PromptFileError(f"{prompts.path}: categories.{raw_category}.subcategories must be a non-empty mapping")
        for name, sub in subs.items():
            examples = (sub or {}).get("examples")
            if not isinstance(examples, list) or not examples:
                raise PromptFileError(
                    f"{prompts.path}: categories.{raw_category}.subcategories.{name}.examples: give at least one example"
                )
            for k, example in enumerate(examples):
                problem = validate_scenario(example)
                if problem:
                    raise PromptFileError(
                        f"{prompts.path}: categories.{raw_category}.subcategories.{name}.examples[{k}]: {problem}"
                    )
            out.append((category, str(name), {"category_description": (spec or {}).get("description", ""), **sub}))
    return out


def validate_scenario(obj: Any) -> str | None:
    """None if `obj` is a usable scenario, else what is wrong with it."""
    if not isinstance(obj, dict):
        return f"expected an object, got {type(obj).__name__}"
    for field in SCENARIO_FIELDS:
        value = obj.get(field)
        if isinstance(value, list) and field == "causal_chain" and all(isinstance(v, str) for v in value):
            value = " -> ".join(value)
        if not isinstance(value, str) or not value.strip():
            return f"field '{field}' is missing or empty"
    return None


def _scenarios_reply(obj: dict[str, Any]) -> list[Any]:
    scenarios = obj.get("scenarios")
    if not isinstance(scenarios, list) or not scenarios:
        raise ReplyError("expected {\"scenarios\": [ ... ]} with at least one scenario")
    return scenarios


def scenario_units(
    prompts: PromptFile, endpoints: Sequence[Endpoint], *, calls: int, categories: Sequence[str] | None = None
) -> list[Unit]:
    """One unit per (category, sub-category, endpoint, call index)."""
    table = subcategories(prompts)
    wanted = None if categories is None else {normalize_category(c) or c for c in categories}
    unknown = sorted((wanted or set()) - {c for c, _, _ in table})
    if unknown:
        raise ValueError(f"--categories: {unknown} not in {prompts.path}; it defines "
                         f"{sorted({c for c, _, _ in table})}")
    units = []
    for category, sub, spec in table:
        if wanted is not None and category not in wanted:
            continue
        for ep in endpoints:
            for c in range(calls):
                key = f"synth/{category}/{sub}/{ep.name}/{c}"
                units.append(Unit(key, {"category": category, "subcategory": sub, "endpoint": ep.name, "call": c,
                                        "spec": spec}, category))
    return units


def synthesize(
    endpoints: Sequence[Endpoint],
    out_path: str | Path,
    *,
    prompts: PromptFile | None = None,
    calls: int = 1,
    per_call: int = 4,
    temperature: float = 1.0,
    categories: Sequence[str] | None = None,
    chunk_size: int = 16,
    progress: bool = True,
    json_mode: bool = True,
) -> StageStats:
    """Runs (or resumes) synthesis into `out_path` (a stage JSONL, see `stage.py`)."""
    prompts = prompts or load_prompt_file("synthesize", required=("scenario",))
    template = prompts.template("scenario")
    by_name = {ep.name: ep for ep in endpoints}
    if len(by_name) != len(endpoints):
        raise ValueError("endpoint names must be unique")

    def process(chunk: list[Unit]) -> list[dict[str, Any]]:
        bodies: list[dict[str, Any] | None] = [None] * len(chunk)
        for name, ep in by_name.items():
            idx = [i for i, u in enumerate(chunk) if u.payload["endpoint"] == name]
            if not idx:
                continue
            conversations = []
            for i in idx:
                p = chunk[i].payload
                examples = "\n".join(
                    json.dumps({f: ex[f] for f in SCENARIO_FIELDS}, ensure_ascii=False) for ex in p["spec"]["examples"]
                )
                conversations.append(template.messages(
                    category=p["category"], category_description=p["spec"]["category_description"],
                    subcategory=p["subcategory"], subcategory_description=p["spec"].get("description", ""),
                    examples=examples, n=per_call,
                ))
            # One cache namespace per call index: the same prompt sampled `calls` times.
            by_call: dict[int, list[tuple[int, Any]]] = {}
            for i, conv in zip(idx, conversations):
                by_call.setdefault(chunk[i].payload["call"], []).append((i, conv))
            for c, items in by_call.items():
                got = ask_json(ep.client, [conv for _, conv in items], _scenarios_reply, temperature=temperature, json_mode=json_mode,
                               namespace=[retry_namespace(f"{prompts.version}/c{c}", chunk[i]) for i, _ in items])
                for (i, _), answer in zip(items, got):
                    bodies[i] = _body(chunk[i], answer, prompts.version)
        return bodies  # type: ignore[return-value]

    version = f"{prompts.version}|n{per_call}|t{temperature}"  # changing either redoes the calls
    return run_units(scenario_units(prompts, endpoints, calls=calls, categories=categories), out_path, process,
                     stage="synthesize", version=version, chunk_size=chunk_size, progress=progress)


def _body(unit: Unit, answer, version: str) -> dict[str, Any]:
    p = unit.payload
    spent: dict[str, dict[str, int]] = {}
    add_spent(spent, p["endpoint"], answer.usage)
    if not answer.ok:
        return {"status": "failed", "error": answer.error, "spent": spent}
    records, rejected = [], []
    for j, obj in enumerate(answer.value):
        rid = f"{p['category']}-{_slug(p['subcategory'])}-{_slug(p['endpoint'])}-{p['call']}-{j}"
        problem = validate_scenario(obj)
        if problem:
            rejected.append({"id": rid, "kind": "invalid_scenario", "reason": f"synthesize: {problem}", "record": obj})
            continue
        chain = obj["causal_chain"]
        record = {
            "id": rid, "category": p["category"], "subcategory": p["subcategory"],
            **{f: (" -> ".join(chain) if f == "causal_chain" and isinstance(chain, list) else obj[f].strip())
               for f in SCENARIO_FIELDS},
            "source_model": p["endpoint"], "synth_version": version,
        }
        records.append(record)
    return {"status": "done", "records": records, "rejected": rejected, "spent": spent}
