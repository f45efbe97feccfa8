"""The curation summary: records kept / rejected / failed per stage and category, tokens and cost.

Read-only over the stage files in an output folder, so it can be rebuilt at any time
(`caspo curate report`). Token use is the sum of `spent` over every line ever written
(retries included; cache hits cost nothing); cost = tokens / 1000 * price per endpoint.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caspo_jax.curate.stage import all_lines
from caspo_jax.evals.store import load_records

__all__ = ["STAGES", "summarize", "write_summary"]

STAGES = ("synthesize", "filter", "dedup", "images", "rewrite", "respond", "select")
_REASON_EXAMPLES = 5


def summarize(out_dir: str | Path, prices: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """{"stages": {stage: {"by_category": {cat: {kept, rejected, failed_units}}, totals,
    rejected_by_kind, reason_examples}},
    "spent": {endpoint: {prompt_tokens, completion_tokens, cost}}}."""
    out_dir = Path(out_dir)
    prices = dict(prices or {})
    summary: dict[str, Any] = {"stages": {}, "spent": {}}
    for stage in STAGES:
        path = out_dir / f"{stage}.jsonl"
        if not path.exists():
            continue
        by_cat: dict[str, Counter] = {}
        reasons: list[str] = []
        kinds: Counter = Counter()
        for line in load_records(path).values():
            counts = by_cat.setdefault(line.get("category") or "unknown", Counter())
            if line.get("status") != "done":
                counts["failed_units"] += 1
                continue
            counts["kept"] += len(line.get("records") or [])
            counts["rejected"] += len(line.get("rejected") or [])
            reasons += [r.get("reason", "") for r in line.get("rejected") or []]
            kinds.update(r.get("kind", "other") for r in line.get("rejected") or [])
        totals = Counter()
        for c in by_cat.values():
            totals.update(c)
        summary["stages"][stage] = {
            "by_category": {k: {f: v.get(f, 0) for f in ("kept", "rejected", "failed_units")}
                            for k, v in sorted(by_cat.items())},
            "totals": {f: totals.get(f, 0) for f in ("kept", "rejected", "failed_units")},
            "rejected_by_kind": dict(sorted(kinds.items())),
            "reason_examples": reasons[:_REASON_EXAMPLES],
        }
        for line in all_lines(path):
            for who, u in (line.get("spent") or {}).items():
                t = summary["spent"].setdefault(who, {"prompt_tokens": 0, "completion_tokens": 0})
                t["prompt_tokens"] += int(u.get("prompt_tokens", 0))
                t["completion_tokens"] += int(u.get("completion_tokens", 0))
    for who, t in summary["spent"].items():
        pin, pout = prices.get(who, (0.0, 0.0))
        t["cost"] = t["prompt_tokens"] / 1000 * pin + t["completion_tokens"] / 1000 * pout
    for name in ("sft", "pairs", "mse", "dpo_disparity", "dpo_length_balanced", "benchmark"):
        path = out_dir / f"{name}.jsonl"
        if path.exists():
            summary.setdefault("outputs", {})[name] = sum(1 for ln in path.read_text().splitlines() if ln.strip())
    return summary


def write_summary(out_dir: str | Path, prices: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """Writes summary.json and summary.md into `out_dir`; returns the summary."""
    out_dir = Path(out_dir)
    summary = summarize(out_dir, prices)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    lines = ["# Curation summary", "", "| stage | category | kept | rejected | failed units |", "|---|---|---|---|---|"]
    for stage, s in summary["stages"].items():
        for cat, c in s["by_category"].items():
            lines.append(f"| {stage} | {cat} | {c['kept']} | {c['rejected']} | {c['failed_units']} |")
        t = s["totals"]
        lines.append(f"| **{stage}** | all | {t['kept']} | {t['rejected']} | {t['failed_units']} |")
    lines += ["", "## Rejections by kind", "", "| stage | kind | count |", "|---|---|---|"]
    for stage, s in summary["stages"].items():
        lines += [f"| {stage} | {kind} | {n} |" for kind, n in s["rejected_by_kind"].items()]
    lines += ["", "## Rejection reasons (first few per stage; all are in the stage files)", ""]
    for stage, s in summary["stages"].items():
        lines += [f"- {stage}: {r.removeprefix(f'{stage}: ')}" for r in s["reason_examples"]]
    lines += ["", "## Tokens and cost", "", "| endpoint | prompt tokens | completion tokens | cost |", "|---|---|---|---|"]
    for who, t in sorted(summary["spent"].items()):
        lines.append(f"| {who} | {t['prompt_tokens']} | {t['completion_tokens']} | {t['cost']:.4f} |")
    if summary.get("outputs"):
        lines += ["", "## Outputs", ""] + [f"- {k}.jsonl: {v} lines" for k, v in summary["outputs"].items()]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return summary
