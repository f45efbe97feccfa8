"""Benchmarks as work items for the runner, and their summaries from stored results.

Keys: ``ood/<mode>/<record id>/<sample>``, ``siuo/<question_id>/<sample>``,
``mss/<pair key>/<safe|unsafe>``. Summaries read only the store, so a report can be
rebuilt from any results file without calling a model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from caspo_jax.data.prompts import PromptConfig
from caspo_jax.evals import metrics as M
from caspo_jax.evals import mssbench as MSS
from caspo_jax.evals import siuo as SIUO
from caspo_jax.evals.modes import PROMPTS_VERSION, Prompt, build_prompt
from caspo_jax.evals.runner import WorkItem

# -- OOD-MMSafe ---------------------------------------------------------------------------


def _query_shown(record: Any, mode: str) -> str:
    return record.malicious_query if mode == "malicious" else record.query


def _reference_text(ref: Any) -> str | None:
    if ref is None or ref == "":
        return None
    if isinstance(ref, str):
        return ref
    if isinstance(ref, Mapping):
        for k in ("hazard", "safety_warning", "risk", "text"):
            if isinstance(ref.get(k), str):
                return ref[k]
    return str(ref)


def ood_items(records: Sequence[Any], modes: Sequence[str], constitutions: Mapping[str, str] | None = None, samples: int = 1,
              *, prompt_config: PromptConfig = PromptConfig()) -> list[WorkItem]:
    """Work items of every record in every mode; ``prompt_config``: the training
    ``PromptConfig`` the constitution mode reproduces (default: the trainer's)."""
    items = []
    for mode in modes:
        for rec in records:
            prompt = build_prompt(rec, mode, constitutions, prompt_config=prompt_config)
            meta = {
                "benchmark": "ood", "mode": mode, "id": str(rec.id), "category": rec.category,
                "query_shown": _query_shown(rec, mode), "reference": _reference_text(getattr(rec, "reference", None)),
                "prompts_version": PROMPTS_VERSION,
            }
            for k in range(samples):
                items.append(WorkItem(f"ood/{mode}/{rec.id}/{k}", prompt, meta, k))
    return items


def _triple(j: Mapping[str, Any] | None) -> M.Triple | None:
    if not j or not j.get("ok") or not j.get("verdict"):
        return None
    v = j["verdict"]
    return (int(v["risk"]), int(v["safety"]), int(v["effectiveness"]))


def ood_item_scores(records: Mapping[str, Mapping[str, Any]], judges: Sequence[str]) -> dict[str, list[M.ItemScores]]:
    """``{mode: [ItemScores]}`` from stored records (failed generations: all judges None)."""
    by_mode: dict[str, list[M.ItemScores]] = {}
    for rec in records.values():
        if rec.get("benchmark") != "ood":
            continue
        js = rec.get("judges") or {}
        by_mode.setdefault(rec["mode"], []).append(
            M.ItemScores(f"{rec['id']}#{rec.get('sample', 0)}", rec.get("category"), {j: _triple(js.get(j)) for j in judges})
        )
    return by_mode


def ood_summaries(records, judges: Sequence[str], modes: Sequence[str] | None = None, *, require_all_judges: bool = True):
    """(``{mode: ModeSummary}``, ``{mode: {category: ModeSummary}}``) in ``modes`` order."""
    by_mode = ood_item_scores(records, judges)
    order = [m for m in (modes or sorted(by_mode)) if m in by_mode]
    summaries = {m: M.summarize(by_mode[m], judges, require_all_judges=require_all_judges) for m in order}
    by_cat = {m: M.summarize_by_category(by_mode[m], judges, require_all_judges=require_all_judges) for m in order}
    return summaries, by_cat


# -- SIUO ---------------------------------------------------------------------------------


def siuo_items(items: Sequence[SIUO.SIUOItem], samples: int = SIUO.SIUO_SAMPLES) -> list[WorkItem]:
    out = []
    for it in items:
        meta = {"benchmark": "siuo", "id": it.question_id, "category": it.category, "siuo_item": dataclasses.asdict(it)}
        for k in range(samples):
            out.append(WorkItem(f"siuo/{it.question_id}/{k}", Prompt(it.question, (it.image,)), meta, k))
    return out


def siuo_summary(records, judges: Sequence[str], *, effective_rate: str = "effective") -> dict[str, SIUO.SIUORates]:
    """Per judge rates, plus ``"mean"`` (judge average of the rates) when several judges."""
    out: dict[str, SIUO.SIUORates] = {}
    recs = [r for r in records.values() if r.get("benchmark") == "siuo"]
    cats = {r["id"]: r.get("category", "") for r in recs}
    for j in judges:
        verdicts: dict[str, list] = {}
        for r in sorted(recs, key=lambda r: r.get("sample", 0)):
            v = (r.get("judges") or {}).get(j)
            ok = v and v.get("ok") and v.get("verdict")
            verdicts.setdefault(r["id"], []).append((bool(v["verdict"]["safe"]), bool(v["verdict"]["effective"])) if ok else None)
        out[j] = SIUO.siuo_rates(verdicts, cats, effective_rate=effective_rate)
    if len(judges) > 1:
        rs = [out[j] for j in judges]
        out["mean"] = SIUO.SIUORates(
            safe_rate=sum(r.safe_rate for r in rs) / len(rs), effective_rate=sum(r.effective_rate for r in rs) / len(rs),
            covered=min(r.covered for r in rs), questions=rs[0].questions, per_category={},
        )
    return out


def siuo_table(rates: Mapping[str, SIUO.SIUORates], effective_rate: str) -> str:
    lines = [f"effective rate mapping: `{effective_rate}`; majority vote over samples; ties/failed are uncovered", "",
             "| judge | safe rate % | effective rate % | covered / questions |", "| --- | --- | --- | --- |"]
    for j, r in rates.items():
        lines.append(f"| {j} | {_p(r.safe_rate)} | {_p(r.effective_rate)} | {r.covered} / {r.questions} |")
    per_cat = [(j, c, v) for j, r in rates.items() for c, v in r.per_category.items()]
    if per_cat:
        lines += ["", "| judge | category | safe rate % | effective rate % | covered |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {j} | {c} | {_p(v[0])} | {_p(v[1])} | {v[2]} |" for j, c, v in per_cat]
    return "\n".join(lines)


# -- MSSBench -----------------------------------------------------------------------------


def mss_items(pairs: Sequence[MSS.MSSPair]) -> list[WorkItem]:
    out = []
    for p in pairs:
        meta = {"benchmark": "mss", "id": p.key, "task": p.task, "category": p.category, "mss_pair": dataclasses.asdict(p)}
        out.append(WorkItem(f"mss/{p.key}/safe", Prompt(p.safe_prompt, (p.safe_image,)), {**meta, "situation": "safe"}))
        out.append(WorkItem(f"mss/{p.key}/unsafe", Prompt(p.unsafe_prompt, (p.unsafe_image,)), {**meta, "situation": "unsafe"}))
    return out


def mss_summary(records, judges: Sequence[str]) -> dict[str, dict[str, MSS.MSSAccuracy]]:
    """``{judge: {task: MSSAccuracy}}`` (tasks: chat, embodied, all)."""
    recs = [r for r in records.values() if r.get("benchmark") == "mss"]
    pairs = {r["id"]: MSS.MSSPair(**r["mss_pair"]) for r in recs}
    out = {}
    for j in judges:
        labels: dict[str, list] = {k: [None, None] for k in pairs}
        for r in recs:
            v = (r.get("judges") or {}).get(j)
            if v and v.get("ok") and v.get("verdict"):
                labels[r["id"]][0 if r["situation"] == "safe" else 1] = int(v["verdict"]["class"])
        out[j] = MSS.mss_by_task({k: tuple(v) for k, v in labels.items()}, list(pairs.values()))
    return out


def mss_table(acc: Mapping[str, Mapping[str, MSS.MSSAccuracy]], mapping: str) -> str:
    lines = [f"paper-rate mapping: `{mapping}` (safe rate, effective rate)", "",
             "| judge | task | safe-situation acc % | unsafe-situation acc % | total % | safe rate % | effective rate % | judged safe / unsafe |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for j, tasks in acc.items():
        for task, a in tasks.items():
            sr, er = MSS.paper_rates(a, mapping)
            lines.append(f"| {j} | {task} | {_p(a.safe_acc)} | {_p(a.unsafe_acc)} | {_p(a.total_acc)} | {_p(sr)} | {_p(er)} | {a.safe_n} / {a.unsafe_n} |")
    return "\n".join(lines)


def _p(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1f}"
