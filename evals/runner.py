"""The resumable generate-then-judge loop shared by OOD-MMSafe, SIUO and MSSBench.

A run is a list of ``WorkItem`` (one response to obtain and judge, keyed). Items are
processed in chunks; after each chunk, every item's complete state (response, each
judge's verdict, the tokens spent *by this attempt*) is appended to the results store
as one JSON line. On a rerun:

* items whose latest record has a response and a successful verdict from every current
  judge (same judge model) are skipped; adding a judge later re-opens items for it only;
* a failed item keeps what succeeded (the response, the judges that answered) and only
  the missing parts are redone;
* a run killed mid-chunk loses at most that chunk's in-flight calls; the store never
  holds a partial or duplicated item (last line per key wins, a cut tail is dropped).

Token use and cost: each line's ``spent`` holds only the calls made in that attempt
(cache hits spend nothing), so summing ``spent`` over *all* lines of the store gives
what the run cost, retries of failed items included. Cost per model =
prompt_tokens / 1000 * price_in + completion_tokens / 1000 * price_out.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from caspo_jax.evals.generators import Generator, Sampling
from caspo_jax.evals.modes import Prompt
from caspo_jax.evals.store import ResultsStore, iter_lines


@dataclasses.dataclass(frozen=True)
class WorkItem:
    key: str
    prompt: Prompt
    meta: dict[str, Any]  # benchmark fields: mode, id, category, sample, ...
    sample: int = 0  # which of the n samples of this prompt


@dataclasses.dataclass(frozen=True)
class Judge:
    """A judge model: a name for reports, its ChatClient and per-1k-token prices."""

    name: str
    client: Any
    price_in_per_1k: float = 0.0
    price_out_per_1k: float = 0.0


# judge_fn(judge, [(item, response)]) -> one dict per pair:
#   {"ok": bool, "error": str|None, "verdict": dict|None, "usage": {"prompt_tokens", "completion_tokens"},
#    "cached": bool, "temperature_applied": bool|None}
JudgeFn = Callable[[Judge, list[tuple[WorkItem, str]]], list[dict[str, Any]]]


@dataclasses.dataclass
class RunStats:
    items: int = 0
    skipped_done: int = 0
    generated: int = 0
    generation_failed: int = 0
    judged: int = 0
    judge_failed: int = 0
    done: int = 0
    failed: int = 0
    # why items failed in this run: error text -> how many generations / judgements
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _usage(p: int = 0, c: int = 0) -> dict[str, int]:
    return {"prompt_tokens": int(p), "completion_tokens": int(c)}


def run_items(
    items: Sequence[WorkItem],
    store: ResultsStore,
    generator: Generator,
    sampling: Sampling,
    judges: Sequence[Judge],
    judge_fn: JudgeFn,
    *,
    chunk_size: int = 16,
    run_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> RunStats:
    """Generate and judge every item not yet done; append one line per item per chunk."""
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("work items must have unique keys")
    stats = RunStats(items=len(items))
    existing = store.records()
    pending = []
    for it in items:
        rec = existing.get(it.key)
        prev = _start_state(it, rec, judges, run_info) if rec is not None else None
        if prev is not None and prev["response"] is not None and all(j.name in prev["judges"] for j in judges):
            stats.skipped_done += 1  # done for every current judge (a new judge re-opens it)
        else:
            pending.append(it)
    bar = tqdm(total=len(pending), desc="eval items", disable=not progress)
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start : start + chunk_size]
        state = {it.key: _start_state(it, existing.get(it.key), judges, run_info) for it in chunk}
        _generate(chunk, state, generator, sampling, stats)
        for judge in judges:
            todo = [it for it in chunk if state[it.key]["response"] is not None
                    and not (state[it.key]["judges"].get(judge.name) or {}).get("ok")]
            if not todo:
                continue
            outs = judge_fn(judge, [(it, state[it.key]["response"]) for it in todo])
            for it, out in zip(todo, outs):
                out = {**out, "judge_model": _judge_model(judge)}
                usage = out.get("usage") or _usage()
                state[it.key]["judges"][judge.name] = out
                if not out.get("cached"):
                    state[it.key]["spent"][f"judge/{judge.name}"] = usage
                stats.judged += 1
                if not out.get("ok"):
                    stats.judge_failed += 1
                    stats.errors[f"judge {judge.name}: {out.get('error') or 'failed'}"] += 1
        for it in chunk:
            rec = state[it.key]
            ok = rec["response"] is not None and all((rec["judges"].get(j.name) or {}).get("ok") for j in judges)
            rec["status"] = "done" if ok else "failed"
            stats.done += ok
            stats.failed += not ok
            store.append(rec)
        bar.update(len(chunk))
    bar.close()
    return stats


def _start_state(it: WorkItem, prev: dict[str, Any] | None, judges: Sequence[Judge], run_info) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "key": it.key,
        **it.meta,
        "sample": it.sample,
        "response": None,
        "generation_error": None,
        "judges": {},
        "spent": {},
        "run": dict(run_info or {}),
    }
    if prev is not None:
        if prev.get("response") is not None:
            rec["response"] = prev["response"]
        prev_j = prev.get("judges") or {}
        # reuse a verdict only if it succeeded and came from the same judge model
        rec["judges"] = {j.name: prev_j[j.name] for j in judges
                         if (prev_j.get(j.name) or {}).get("ok") and prev_j[j.name].get("judge_model") == _judge_model(j)}
        if rec["response"] is None:
            rec["judges"] = {}
    return rec


def _judge_model(judge: Judge) -> str | None:
    return getattr(getattr(judge.client, "config", None), "model", None)


def _generate(chunk: Sequence[WorkItem], state, generator: Generator, sampling: Sampling, stats: RunStats) -> None:
    need = [it for it in chunk if state[it.key]["response"] is None]
    if not need:
        return
    # One generate call per distinct prompt, n = highest pending sample + 1 (samples
    # that are already done are re-requested only when a lower one is pending; with the
    # response cache enabled those are cache hits).
    groups: dict[Prompt, list[WorkItem]] = {}
    for it in need:
        groups.setdefault(it.prompt, []).append(it)
    prompts = list(groups)
    by_n: dict[int, list[Prompt]] = {}
    for p in prompts:
        by_n.setdefault(max(it.sample for it in groups[p]) + 1, []).append(p)
    for n, ps in by_n.items():
        gens = generator.generate(ps, n, sampling)
        for p, g in zip(ps, gens):
            its = groups[p]
            for it in its:  # the n calls' tokens, split over the pending samples
                rec = state[it.key]
                text, err = g.texts[it.sample], g.errors[it.sample]
                rec["spent"]["generation"] = _usage(g.prompt_tokens / len(its), g.completion_tokens / len(its))
                if text is None:
                    rec["generation_error"] = err or "generation failed"
                    stats.generation_failed += 1
                    stats.errors[f"generation: {rec['generation_error']}"] += 1
                else:
                    rec["response"] = text
                    rec["generation_error"] = None
                    stats.generated += 1


def spent_totals(path, judges: Sequence[Judge] = (), generator_prices: tuple[float, float] = (0.0, 0.0), generator_name: str = "generator") -> dict[str, dict[str, Any]]:
    """Tokens and cost per model over every line of the store (retries included)."""
    prices = {f"judge/{j.name}": (j.price_in_per_1k, j.price_out_per_1k) for j in judges}
    prices["generation"] = generator_prices
    totals: dict[str, dict[str, Any]] = {}
    temp_dropped: dict[str, int] = {}
    for rec in iter_lines(path):
        for who, u in (rec.get("spent") or {}).items():
            t = totals.setdefault(who, {"prompt_tokens": 0, "completion_tokens": 0, "items": 0})
            t["prompt_tokens"] += u.get("prompt_tokens", 0)
            t["completion_tokens"] += u.get("completion_tokens", 0)
            t["items"] += 1
        for name, j in (rec.get("judges") or {}).items():
            if j and j.get("temperature_applied") is False:
                temp_dropped[name] = temp_dropped.get(name, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for who, t in totals.items():
        pin, pout = prices.get(who, (0.0, 0.0))
        name = generator_name if who == "generation" else who.split("/", 1)[1]
        out[name] = {
            **t,
            "role": "generator" if who == "generation" else "judge",
            "cost": t["prompt_tokens"] / 1000 * pin + t["completion_tokens"] / 1000 * pout,
            "temperature_not_applied": temp_dropped.get(name, 0) if who != "generation" else 0,
        }
    return out
