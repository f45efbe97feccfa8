"""Stage 2, `filter`: vet each scenario with an LLM judge; every rejection keeps its reason.

Three judgements per scenario (prompts in `prompt_filter.yaml`, wording ours):

1. isolation (the judge sees the query only, never the scene): benignness, naturalness;
2. context (scene + query + hazard): contextual relevance, risk clarity;
3. causal soundness: the harm must follow from the requested action in that scene
   ("direct_action" or "latent_scene"), not from assumed malice or speculation.

Scores are integers 1-5 compared with `FilterThresholds`. A scenario failing (1) is
rejected without paying for (2) and (3). The kept record gains a `filter` field with all
scores and the judge's reasons.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caspo_jax.curate.stage import (
    Endpoint, ReplyError, StageStats, Unit, add_spent, ask_json, retry_namespace, run_units,
)
from caspo_jax.curate.templates import PromptFile, load_prompt_file

__all__ = ["CAUSAL_VERDICTS", "FilterThresholds", "filter_scenarios"]

CAUSAL_VERDICTS = ("direct_action", "latent_scene", "assumed_malice", "speculative")


@dataclasses.dataclass(frozen=True)
class FilterThresholds:
    """Minimum 1-5 scores to keep a scenario, and the causal verdicts that count as sound."""

    min_benignness: int = 4
    min_naturalness: int = 4
    min_relevance: int = 4
    min_risk_clarity: int = 4
    sound_verdicts: tuple[str, ...] = ("direct_action", "latent_scene")

    def __post_init__(self):
        for f in ("min_benignness", "min_naturalness", "min_relevance", "min_risk_clarity"):
            if not 1 <= getattr(self, f) <= 5:
                raise ValueError(f"FilterThresholds.{f} must be in 1..5, got {getattr(self, f)}")
        bad = [v for v in self.sound_verdicts if v not in CAUSAL_VERDICTS]
        if bad:
            raise ValueError(f"FilterThresholds.sound_verdicts: unknown {bad}; choose from {CAUSAL_VERDICTS}")


def _scores(*fields: str):
    def validate(obj: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for f in fields:
            v = obj.get(f)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
                raise ReplyError(f"field '{f}' must be an integer 1-5, got {v!r}")
            out[f] = v
        out["reason"] = str(obj.get("reason", ""))
        return out

    return validate


def _causal(obj: dict[str, Any]) -> dict[str, Any]:
    verdict = obj.get("verdict")
    if verdict not in CAUSAL_VERDICTS:
        raise ReplyError(f"field 'verdict' must be one of {list(CAUSAL_VERDICTS)}, got {verdict!r}")
    return {"verdict": verdict, "reason": str(obj.get("reason", ""))}


def _below(scores: dict[str, Any], limits: dict[str, int]) -> list[tuple[str, str]]:
    """(criterion, "criterion score < minimum") for every score under its minimum."""
    return [(f, f"{f} {scores[f]} < {m}") for f, m in limits.items() if scores[f] < m]


def filter_scenarios(
    scenarios: Sequence[dict[str, Any]],
    judge: Endpoint,
    out_path: str | Path,
    *,
    thresholds: FilterThresholds = FilterThresholds(),
    prompts: PromptFile | None = None,
    chunk_size: int = 16,
    progress: bool = True,
    json_mode: bool = True,
) -> StageStats:
    """Runs (or resumes) the filter over `scenarios` (synthesize's records) into `out_path`."""
    prompts = prompts or load_prompt_file("filter", required=("isolation", "context", "causal"))
    iso_t, ctx_t, causal_t = (prompts.template(n) for n in ("isolation", "context", "causal"))
    ns = prompts.version
    units = [Unit(f"filter/{s['id']}", s, s.get("category")) for s in scenarios]

    def process(chunk: list[Unit]) -> list[dict[str, Any]]:
        spent = [dict() for _ in chunk]
        iso = ask_json(judge.client, [iso_t.messages(query=u.payload["query"]) for u in chunk],
                       _scores("benignness", "naturalness"),
                       namespace=[retry_namespace(f"{ns}/isolation", u) for u in chunk], json_mode=json_mode)
        bodies: list[dict[str, Any] | None] = [None] * len(chunk)
        onward = []
        for i, (unit, a) in enumerate(zip(chunk, iso)):
            add_spent(spent[i], judge.name, a.usage)
            if not a.ok:
                bodies[i] = {"status": "failed", "error": f"isolation judge: {a.error}", "spent": spent[i]}
                continue
            low = _below(a.value, {"benignness": thresholds.min_benignness, "naturalness": thresholds.min_naturalness})
            if low:
                reason = f"filter: {'; '.join(m for _, m in low)} (query judged alone: {a.value['reason']})"
                rejection = _rejection(unit, [k for k, _ in low], reason, a.value)
                bodies[i] = {"status": "done", "rejected": [rejection], "spent": spent[i]}
            else:
                onward.append(i)
        if onward:
            fields = [dict(chunk[i].payload) for i in onward]
            ctx = ask_json(judge.client, [ctx_t.messages(**_fill(f)) for f in fields],
                           _scores("contextual_relevance", "risk_clarity"),
                           namespace=[retry_namespace(f"{ns}/context", chunk[i]) for i in onward], json_mode=json_mode)
            cau = ask_json(judge.client, [causal_t.messages(**_fill(f)) for f in fields], _causal,
                           namespace=[retry_namespace(f"{ns}/causal", chunk[i]) for i in onward], json_mode=json_mode)
            for i, c, k in zip(onward, ctx, cau):
                add_spent(spent[i], judge.name, c.usage)
                add_spent(spent[i], judge.name, k.usage)
                errors = [f"{n} judge: {a.error}" for n, a in (("context", c), ("causal", k)) if not a.ok]
                if errors:
                    bodies[i] = {"status": "failed", "error": "; ".join(errors), "spent": spent[i]}
                    continue
                scores = {
                    **{f: iso[i].value[f] for f in ("benignness", "naturalness")},
                    "contextual_relevance": c.value["contextual_relevance"], "risk_clarity": c.value["risk_clarity"],
                    "causal_verdict": k.value["verdict"],
                    "reasons": {"isolation": iso[i].value["reason"], "context": c.value["reason"],
                                "causal": k.value["reason"]},
                }
                problems = _below(c.value, {"contextual_relevance": thresholds.min_relevance,
                                            "risk_clarity": thresholds.min_risk_clarity})
                if k.value["verdict"] not in thresholds.sound_verdicts:
                    problems.append((f"causal:{k.value['verdict']}",
                                     f"causal verdict {k.value['verdict']!r} is not sound ({k.value['reason']})"))
                if problems:
                    reason = f"filter: {'; '.join(m for _, m in problems)}"
                    rejection = _rejection(chunk[i], [k for k, _ in problems], reason, scores)
                    bodies[i] = {"status": "done", "rejected": [rejection], "spent": spent[i]}
                else:
                    bodies[i] = {"status": "done", "records": [{**chunk[i].payload, "filter": scores}],
                                 "spent": spent[i]}
        return bodies  # type: ignore[return-value]

    # Thresholds are part of the version: new thresholds re-decide every unit (from the cache).
    version = (f"{prompts.version}|b{thresholds.min_benignness}n{thresholds.min_naturalness}"
               f"r{thresholds.min_relevance}c{thresholds.min_risk_clarity}|{','.join(thresholds.sound_verdicts)}")
    return run_units(units, out_path, process, stage="filter", version=version,
                     chunk_size=chunk_size, progress=progress)


def _fill(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s.get(k, "") for k in ("category", "scene", "query", "hazard", "causal_chain")}


def _rejection(unit: Unit, kinds: list[str], reason: str, scores: dict[str, Any]) -> dict[str, Any]:
    """kind: the failed criteria joined by "+" (e.g. "benignness+naturalness", "causal:assumed_malice")."""
    return {"id": unit.payload["id"], "kind": "+".join(kinds), "reason": reason, "scores": scores,
            "record": unit.payload}
