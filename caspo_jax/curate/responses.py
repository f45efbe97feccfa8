"""Stage 6, `respond`: sample responses from several models and score them with the R/S/E judge.

One unit per (record, model, prompt mode), mode "standard" (the query alone) or
"constitution" (the category's constitution as the system message, as `caspo eval`'s
Constitution mode builds it: `caspo_jax.evals.modes.build_prompt`). Each unit draws
`samples` responses (`caspo_jax.evals.generators.OpenAIGenerator`: sample k is cache
namespace gen/k) and judges each with `caspo_jax.rubric.rse.judge_rse` (hazard as the
judge-only reference). A unit with any failed generation or judgement is "failed" and is
redone on the next run (with a response cache, what already succeeded costs nothing).
`judge_rse` caches under the rubric version, so a cached malformed verdict would come back
on every retry: a retried unit is therefore judged by a cache-less twin of the judge client.

Scored response record::

    {"id": "<record>/<model>/<mode>/<k>", "record_id", "category", "images", "query",
     "hazard", "source_model", "prompt_mode", "sample", "response",
     "scores": {"risk", "safety", "effectiveness", "total", "reasons"}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caspo_jax.curate.stage import Endpoint, StageStats, Unit, add_spent, run_units
from caspo_jax.data.records import SafetyRecord, resolve_image_path
from caspo_jax.evals.generators import OpenAIGenerator, Sampling
from caspo_jax.evals.modes import PROMPTS_VERSION, build_prompt
from caspo_jax.llm.client import ChatClient, Usage
from caspo_jax.rubric.rse import RUBRIC_VERSION, RSEItem, judge_rse

__all__ = ["PROMPT_MODES", "respond"]

PROMPT_MODES = ("standard", "constitution")


def _safety_record(rec: dict[str, Any], image_root: Path | None) -> SafetyRecord:
    images = tuple(resolve_image_path(p, image_root) if image_root is not None else Path(p)
                   for p in rec.get("images") or ())
    return SafetyRecord(id=rec["id"], images=images, query=rec["query"], category=rec["category"],
                        malicious_query=rec.get("malicious_query"), reference=rec.get("hazard"))


def respond(
    records: Sequence[dict[str, Any]],
    models: Sequence[Endpoint],
    judge: Endpoint,
    out_path: str | Path,
    *,
    constitutions: Mapping[str, str],
    image_root: str | Path | None = None,
    modes: Sequence[str] = PROMPT_MODES,
    samples: int = 1,
    sampling: Sampling = Sampling(temperature=0.9, max_new_tokens=1024),
    chunk_size: int = 8,
    progress: bool = True,
    json_mode: bool = True,
) -> StageStats:
    """Runs (or resumes) response sampling and R/S/E judging into `out_path`."""
    bad = [m for m in modes if m not in PROMPT_MODES]
    if bad:
        raise ValueError(f"respond modes: unknown {bad}; choose from {', '.join(PROMPT_MODES)}")
    if samples < 1:
        raise ValueError(f"respond samples must be >= 1, got {samples}")
    root = Path(image_root) if image_root is not None else None
    if root is None and any(r.get("images") for r in records):
        raise ValueError("the records have images (paths relative to the image root): pass image_root / --image-root")
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise ValueError("model names must be unique")
    units = [Unit(f"respond/{r['id']}/{m.name}/{mode}", {"record": r, "model": m.name, "mode": mode}, r.get("category"))
             for r in records for m in models for mode in modes]
    twin: list[ChatClient] = []

    def uncached_judge() -> ChatClient:
        if not twin:
            twin.append(ChatClient(dataclasses.replace(judge.client.config, cache_dir=None)))
        return twin[0]

    version = f"{PROMPTS_VERSION}+{RUBRIC_VERSION}+n{samples}+t{sampling.temperature}+max{sampling.max_new_tokens}"

    def process(chunk: list[Unit]) -> list[dict[str, Any]]:
        spent: list[dict[str, dict[str, int]]] = [{} for _ in chunk]
        texts: list[list[str | None]] = [[] for _ in chunk]
        errors: list[list[str | None]] = [[] for _ in chunk]
        srecs = [_safety_record(u.payload["record"], root) for u in chunk]
        for name, model in by_name.items():
            idx = [i for i, u in enumerate(chunk) if u.payload["model"] == name]
            if not idx:
                continue
            prompts = [build_prompt(srecs[i], chunk[i].payload["mode"], constitutions) for i in idx]
            gens = OpenAIGenerator(model.client, name).generate(prompts, samples, sampling)
            for i, g in zip(idx, gens):
                texts[i], errors[i] = g.texts, g.errors
                add_spent(spent[i], name, Usage(g.prompt_tokens, g.completion_tokens))
        to_judge = [(i, k) for i in range(len(chunk)) for k in range(samples) if texts[i][k] is not None]
        items = [RSEItem(query=srecs[i].query, response=texts[i][k], images=srecs[i].images,
                         category=srecs[i].category, hazard_reference=chunk[i].payload["record"].get("hazard"))
                 for i, k in to_judge]
        first = [n for n, (i, _) in enumerate(to_judge) if chunk[i].attempt == 0]
        retry = [n for n, (i, _) in enumerate(to_judge) if chunk[i].attempt > 0]
        verdicts: list[Any] = [None] * len(to_judge)
        for subset, client in ((first, judge.client), (retry, uncached_judge() if retry else None)):
            if subset:
                for n, v in zip(subset, judge_rse(client, [items[n] for n in subset], json_mode=json_mode,
                                                          progress=None)):
                    verdicts[n] = v
        judged: dict[tuple[int, int], Any] = {}
        for (i, k), v in zip(to_judge, verdicts):
            judged[(i, k)] = v
            if not v.cached:
                add_spent(spent[i], judge.name, v.usage)
        bodies = []
        for i, unit in enumerate(chunk):
            rec, p = unit.payload["record"], unit.payload
            problems = [f"sample {k}: generation failed: {errors[i][k]}" for k in range(samples) if texts[i][k] is None]
            problems += [f"sample {k}: judge failed: {judged[(i, k)].error}" for k in range(samples)
                         if (i, k) in judged and not judged[(i, k)].ok]
            if problems:
                bodies.append({"status": "failed", "error": "; ".join(problems), "spent": spent[i]})
                continue
            out = []
            for k in range(samples):
                s = judged[(i, k)].score
                out.append({
                    "id": f"{rec['id']}/{p['model']}/{p['mode']}/{k}", "record_id": rec["id"],
                    "category": rec["category"], "images": list(rec.get("images") or []), "query": rec["query"],
                    "hazard": rec.get("hazard"), "source_model": p["model"], "prompt_mode": p["mode"], "sample": k,
                    "response": texts[i][k],
                    "scores": {"risk": s.risk, "safety": s.safety, "effectiveness": s.effectiveness,
                               "total": s.total, "reasons": dict(s.reasons)},
                })
            bodies.append({"status": "done", "records": out, "spent": spent[i]})
        return bodies

    return run_units(units, out_path, process, stage="respond", version=version, chunk_size=chunk_size,
                     progress=progress)
