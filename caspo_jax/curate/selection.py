"""Stage 7, `select`: SFT targets, Bradley-Terry preference pairs and MSE records from scored responses.

Pure functions over `respond`'s scored response records (appendix B of the paper):

* SFT: per record, among responses with R+S+E >= `min_total`, the best total wins; ties go
  to the source model picked least so far (balance across models), then to the length
  closest to the median length of all eligible responses (length balance), then the id.
* Pairs: per record, responses sorted by total (best first) are paired best-with-worst,
  second-best with second-worst, ... (disjoint, so no response appears twice). A pair
  whose summed-score gap exceeds `gap_threshold` (paper: 4) is kept for the BT loss with
  probability `pair_probability` (paper: 0.85), drawn from a hash of (seed, pair ids) so
  the draw does not depend on order. Every response not in a kept pair becomes an MSE
  record (its absolute R+S+E score, the regression target). Pairs and MSE records are
  built from `rm_responses` when given: `pipeline.run_select` passes the pool balanced by
  source model and length (`balance.py`, the paper's appendix B.1).

Formats: SFT lines are `caspo_jax.data.formats.SFTExample`, pairs `PreferencePair`
(chosen = higher score; read back with `load_sft_examples` / `load_pairs`), MSE lines
`ScoredResponse` below (our format: `caspo_jax.data` defines none); extra fields
(scores, models, gap) ride in `meta`. Two responses with identical text never form a
pair (the pair loader rejects chosen == rejected).
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caspo_jax.data.formats import PreferencePair, SFTExample
from caspo_jax.data.records import image_paths_json

__all__ = ["ScoredResponse", "Selection", "build_preferences", "group_by_record", "pair_id", "preference_pair",
           "response_words", "select", "select_sft", "uniform_from"]


@dataclasses.dataclass(frozen=True)
class ScoredResponse:
    """An MSE-term record: a response and its absolute R/S/E score (score = R+S+E, 0..6)."""

    id: str
    images: tuple[Path, ...]
    query: str
    response: str
    score: int
    category: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def to_json(self, root: str | Path | None = None) -> dict[str, Any]:
        return {"id": self.id, "images": image_paths_json(self.images, root), "query": self.query, "response": self.response,
                "score": self.score, "category": self.category, **self.meta}


@dataclasses.dataclass
class Selection:
    sft: list[SFTExample]
    pairs: list[PreferencePair]
    mse: list[ScoredResponse]
    rejected: list[dict[str, Any]]  # records without an SFT target: {"id", "reason", "category"}
    rm_balance: Any = None  # `balance.BalanceReport` when pairs / mse came from a balanced pool


def uniform_from(seed: int, key: str) -> float:
    """A uniform [0, 1) number determined by (seed, key) alone."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def response_words(r: dict[str, Any]) -> int:
    """A response's length in whitespace-separated words (the length every balance here uses)."""
    return len(r["response"].split())


def group_by_record(responses: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """record_id -> its responses, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in responses:
        groups.setdefault(r["record_id"], []).append(r)
    return groups


def _meta(r: dict[str, Any]) -> dict[str, Any]:
    return {"record_id": r["record_id"], "source_model": r["source_model"], "prompt_mode": r["prompt_mode"],
            "scores": {k: r["scores"][k] for k in ("risk", "safety", "effectiveness", "total")}}


def pair_id(chosen: dict[str, Any], rejected: dict[str, Any]) -> str:
    """The id of the pair (chosen, rejected): "<chosen id>><rejected id>"."""
    return f"{chosen['id']}>{rejected['id']}"


def preference_pair(chosen: dict[str, Any], rejected: dict[str, Any], **extra: Any) -> PreferencePair:
    """Two scored responses of one record as a `PreferencePair` (chosen = the higher total).

    meta carries record_id, gap, both source models and both score sets (plus `extra`).
    """
    gap = chosen["scores"]["total"] - rejected["scores"]["total"]
    return PreferencePair(
        pair_id(chosen, rejected), tuple(Path(p) for p in chosen["images"]), chosen["query"], chosen["response"],
        rejected["response"], chosen.get("category"),
        {"record_id": chosen["record_id"], "gap": gap, "chosen_model": chosen["source_model"],
         "rejected_model": rejected["source_model"], "chosen_scores": _meta(chosen)["scores"],
         "rejected_scores": _meta(rejected)["scores"], **extra},
    )


def select_sft(responses: Sequence[dict[str, Any]], *, min_total: int = 5) -> tuple[list[SFTExample], list[dict[str, Any]]]:
    """One SFT target per record (see module doc); records without one come back as rejections."""
    if not 0 <= min_total <= 6:
        raise ValueError(f"min_total must be in 0..6, got {min_total}")
    groups = group_by_record(responses)
    eligible = [r for r in responses if r["scores"]["total"] >= min_total]
    median_len = statistics.median(response_words(r) for r in eligible) if eligible else 0
    picks_per_model: dict[str, int] = {}
    sft, rejected = [], []
    for record_id, group in groups.items():
        cands = [r for r in group if r["scores"]["total"] >= min_total]
        if not cands:
            best = max(r["scores"]["total"] for r in group)
            rejected.append({"id": record_id, "category": group[0].get("category"), "kind": "no_sft_target",
                             "reason": f"select: no response with R+S+E >= {min_total} (best {best})"})
            continue
        pick = min(cands, key=lambda r: (-r["scores"]["total"], picks_per_model.get(r["source_model"], 0),
                                         abs(response_words(r) - median_len), r["id"]))
        picks_per_model[pick["source_model"]] = picks_per_model.get(pick["source_model"], 0) + 1
        sft.append(SFTExample(f"{record_id}/sft", tuple(Path(p) for p in pick["images"]), pick["query"],
                              pick["response"], pick.get("category"), {**_meta(pick), "response_id": pick["id"]}))
    return sft, rejected


def build_preferences(
    responses: Sequence[dict[str, Any]], *, gap_threshold: int = 4, pair_probability: float = 0.85, seed: int = 0
) -> tuple[list[PreferencePair], list[ScoredResponse]]:
    """BT pairs (gap > threshold, kept with probability p) and MSE records for the rest."""
    if not 0.0 <= pair_probability <= 1.0:
        raise ValueError(f"pair_probability must be in [0, 1], got {pair_probability}")
    pairs, mse = [], []
    for group in group_by_record(responses).values():
        ranked = sorted(group, key=lambda r: (-r["scores"]["total"], r["id"]))
        in_pair: set[str] = set()
        for k in range(len(ranked) // 2):
            hi, lo = ranked[k], ranked[-1 - k]
            gap = hi["scores"]["total"] - lo["scores"]["total"]
            eligible = gap > gap_threshold and hi["response"] != lo["response"]
            if eligible and uniform_from(seed, pair_id(hi, lo)) < pair_probability:
                in_pair.update((hi["id"], lo["id"]))
                pairs.append(preference_pair(hi, lo))
        for r in group:
            if r["id"] not in in_pair:
                mse.append(ScoredResponse(r["id"], tuple(Path(p) for p in r["images"]), r["query"], r["response"],
                                          int(r["scores"]["total"]), r.get("category"), _meta(r)))
    return pairs, mse


def select(
    responses: Sequence[dict[str, Any]], *, min_total: int = 5, gap_threshold: int = 4,
    pair_probability: float = 0.85, seed: int = 0, rm_responses: Sequence[dict[str, Any]] | None = None,
) -> Selection:
    """SFT targets from every response; BT pairs and MSE records from `rm_responses` (the
    reward-model pool, e.g. `balance.balance_responses`'s output), by default every response."""
    sft, rejected = select_sft(responses, min_total=min_total)
    pairs, mse = build_preferences(responses if rm_responses is None else rm_responses, gap_threshold=gap_threshold,
                                   pair_probability=pair_probability, seed=seed)
    return Selection(sft, pairs, mse, rejected)
