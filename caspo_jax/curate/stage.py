"""What every curation stage shares: endpoints, JSON answers with one repair, resumable units.

A stage turns input records into *units* (one LLM job each, with a stable key). After each
chunk of units, one line per unit is appended to the stage's `ResultsStore` JSONL
(`caspo_jax.evals.store`: whole-line appends, a cut-off tail dropped, last line per key
wins, an flock against a second writer)::

    {"key": ..., "stage": "filter", "version": "filter-v1", "status": "done" | "failed",
     "category": ..., "records": [kept output records], "rejected": [{"id", "kind", "reason", "record"}],
     "error": null | "why the unit failed", "spent": {endpoint: {prompt_tokens, completion_tokens}}}

"done" units are final (their outputs are read by the next stage); "failed" ones (endpoint
errors, replies still malformed after one repair) are redone on the next run. A unit whose
line has another prompt version is redone too. `spent` holds only the tokens that
attempt paid for (cache hits spend nothing), so summing it over *all* lines gives the cost.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from caspo_jax.llm.replies import ReplyParseError, reply_json_object
from caspo_jax.evals.store import ResultsStore, iter_lines, load_records
from caspo_jax.llm.client import ChatClient, ChatRequest, Usage
from caspo_jax.llm.messages import assistant_message, user_message

__all__ = [
    "Endpoint",
    "JsonAnswer",
    "ReplyError",
    "StageStats",
    "Unit",
    "ask_json",
    "kept_records",
    "rejections",
    "retry_namespace",
    "run_units",
    "write_stage",
]

REPAIR_PROMPT = (
    "Your reply could not be used: {error}\n"
    "Reply again with exactly one JSON object in the requested form and nothing else."
)


class ReplyError(ValueError):
    """A model reply that is not what the prompt asked for; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A model behind an OpenAI-compatible endpoint: a report name, its client, prices per 1k tokens."""

    name: str
    client: ChatClient
    price_in_per_1k: float = 0.0
    price_out_per_1k: float = 0.0


@dataclasses.dataclass(frozen=True)
class JsonAnswer:
    """value is the validated JSON reply, or None with an error. usage: tokens paid (no cache hits)."""

    value: Any
    ok: bool
    error: str | None
    usage: Usage
    raw: str | None


def _paid(result) -> Usage:
    return Usage() if result.cached else result.usage


def ask_json(
    client: ChatClient,
    conversations: Sequence[list[dict[str, Any]]],
    validate: Callable[[dict[str, Any]], Any],
    *,
    namespace: str | Sequence[str],
    temperature: float | None = None,
    json_mode: bool = True,
    progress: str | None = None,
) -> list[JsonAnswer]:
    """Sends every conversation, parses a JSON object and validates it (raising ReplyError).

    A malformed or invalid reply gets one repair turn (as `judge_rse` does); if that fails
    too the answer is ok=False with the reason. Endpoint failures are ok=False as well.
    namespace: the cache namespace, one for all or one per conversation (see `Unit.attempt`).
    json_mode: send `response_format={"type": "json_object"}`; turn off for endpoints that
      reject it (the prompts ask for JSON either way, and the parser finds it in prose).
    """
    namespaces = [namespace] * len(conversations) if isinstance(namespace, str) else list(namespace)

    def request(messages, i):
        return ChatRequest(messages, temperature=temperature, json_mode=json_mode, cache_namespace=namespaces[i])

    def attempt(text: str | None) -> tuple[Any, str | None]:
        try:
            return validate(reply_json_object(text)), None
        except (ReplyParseError, ReplyError) as exc:
            return None, str(exc)

    first = client.complete_many([request(m, i) for i, m in enumerate(conversations)], progress=progress)
    answers: list[JsonAnswer | None] = [None] * len(first)
    repairs: dict[int, ChatRequest] = {}
    for i, result in enumerate(first):
        if not result.ok:
            answers[i] = JsonAnswer(None, False, f"request failed: {result.error}", _paid(result), None)
            continue
        value, error = attempt(result.text)
        if error is None:
            answers[i] = JsonAnswer(value, True, None, _paid(result), result.text)
        else:
            repair = list(conversations[i]) + [
                assistant_message(result.text or ""), user_message(REPAIR_PROMPT.format(error=error))
            ]
            repairs[i] = request(repair, i)
    if repairs:
        order = list(repairs)
        second = client.complete_many([repairs[i] for i in order], progress=None)
        for i, result in zip(order, second):
            usage = _paid(first[i]) + _paid(result)
            if not result.ok:
                answers[i] = JsonAnswer(None, False, f"repair request failed: {result.error}", usage, first[i].text)
                continue
            value, error = attempt(result.text)
            if error is None:
                answers[i] = JsonAnswer(value, True, None, usage, result.text)
            else:
                answers[i] = JsonAnswer(None, False, f"unusable after one repair: {error}", usage, result.text)
    return answers  # type: ignore[return-value]


def add_spent(spent: dict[str, dict[str, int]], who: str, usage: Usage) -> None:
    """Adds `usage` to spent[who] in place (the line's per-endpoint token accounting)."""
    entry = spent.setdefault(who, {"prompt_tokens": 0, "completion_tokens": 0})
    entry["prompt_tokens"] += int(usage.prompt_tokens)
    entry["completion_tokens"] += int(usage.completion_tokens)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One job of a stage: a stable key, its input (any JSON-able value) and its category.

    attempt: how many earlier runs ended this unit "failed" (set by `run_units`). Stages put
    it in the cache namespace (`retry_namespace`), because a malformed reply is a
    successful HTTP call and is cached: without this a retry would re-read the same bad
    answer forever.
    """

    key: str
    payload: Any
    category: str | None = None
    attempt: int = 0


def retry_namespace(base: str, unit: Unit) -> str:
    """`base` for a first attempt, `base/retry<k>` for the k-th retry of a failed unit."""
    return base if unit.attempt == 0 else f"{base}/retry{unit.attempt}"


@dataclasses.dataclass
class StageStats:
    units: int = 0
    skipped_done: int = 0
    done: int = 0
    failed: int = 0
    kept: int = 0
    rejected: int = 0


# process(chunk) -> one line body per unit, in order: {"status", "records", "rejected", "error", "spent"}
ProcessFn = Callable[[list[Unit]], list[dict[str, Any]]]


def run_units(
    units: Sequence[Unit],
    path: str | Path,
    process: ProcessFn,
    *,
    stage: str,
    version: str,
    chunk_size: int = 16,
    progress: bool = True,
) -> StageStats:
    """Processes every unit whose latest line is not "done" under `version`; appends per chunk."""
    keys = [u.key for u in units]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"stage {stage}: unit key {dup!r} repeats; unit keys must be unique")
    stats = StageStats(units=len(units))
    with ResultsStore(path) as store:
        existing = store.records()
        failures: dict[str, int] = {}
        for line in iter_lines(store.path):
            if line.get("status") != "done":
                failures[line["key"]] = failures.get(line["key"], 0) + 1
        pending = []
        for unit in units:
            line = existing.get(unit.key)
            if line is not None and line.get("status") == "done" and line.get("version") == version:
                stats.skipped_done += 1
            else:
                pending.append(dataclasses.replace(unit, attempt=failures.get(unit.key, 0)))
        bar = tqdm(total=len(pending), desc=f"curate {stage}", disable=not progress)
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start : start + chunk_size]
            bodies = process(chunk)
            if len(bodies) != len(chunk):
                raise RuntimeError(f"stage {stage}: process returned {len(bodies)} lines for {len(chunk)} units")
            for unit, body in zip(chunk, bodies):
                line = {
                    "key": unit.key, "stage": stage, "version": version, "category": unit.category,
                    "status": body.get("status", "done"), "records": body.get("records", []),
                    "rejected": body.get("rejected", []), "error": body.get("error"),
                    "spent": body.get("spent", {}),
                }
                store.append(line)
                stats.done += line["status"] == "done"
                stats.failed += line["status"] != "done"
                stats.kept += len(line["records"])
                stats.rejected += len(line["rejected"])
            bar.update(len(chunk))
        bar.close()
    return stats


def _done_lines(path: str | Path) -> Iterable[dict[str, Any]]:
    for line in load_records(path).values():
        if line.get("status") == "done":
            yield line


def kept_records(path: str | Path) -> list[dict[str, Any]]:
    """The output records of every done unit (latest line per key, first-seen key order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no stage output yet; run the previous stage first")
    return [rec for line in _done_lines(path) for rec in line["records"]]


def rejections(path: str | Path) -> list[dict[str, Any]]:
    """Every rejection of every done unit: {"id", "reason", "category", "record"}."""
    out = []
    for line in _done_lines(path):
        for rej in line["rejected"]:
            out.append({"category": line.get("category"), **rej})
    return out


def all_lines(path: str | Path) -> Iterable[dict[str, Any]]:
    """Every line ever written (retries included): what the cost report sums."""
    return iter_lines(path)


def write_stage(
    out_path: str | Path, stage: str, version: str,
    kept: Sequence[dict[str, Any]], rejected: Sequence[dict[str, Any]],
) -> None:
    """Writes a whole stage file for a local, deterministic stage (dedup, images).

    Such stages are recomputed rather than resumed. The file is written under a temporary
    name with `ResultsStore` and renamed over `out_path`, so a killed run leaves the
    previous file intact. One line per record: kept ones in `records`, removed ones in
    `rejected` (each {"id", "reason", "record", ...}).
    """
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with ResultsStore(tmp) as store:
        for rec in kept:
            store.append({"key": f"{stage}/{rec['id']}", "stage": stage, "version": version,
                          "category": rec.get("category"), "status": "done", "records": [rec], "rejected": [],
                          "error": None, "spent": {}})
        for rej in rejected:
            store.append({"key": f"{stage}/{rej['id']}", "stage": stage, "version": version,
                          "category": (rej.get("record") or {}).get("category"), "status": "done",
                          "records": [], "rejected": [rej], "error": None, "spent": {}})
    os.replace(tmp, out_path)
    Path(str(tmp) + ".lock").unlink(missing_ok=True)
