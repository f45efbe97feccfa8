"""`caspo curate dpo`: preference pairs for the DPO baselines, chosen the paper's two ways.

The paper's DPO baselines (appendix A.2.3 and B.1, "Baseline Alignment") train on
Beavertails-V pairs "selected based on significant scoring disparities" (9,247 pairs) and
on SPA-VL pairs curated "by balancing score differences against response lengths"
(17,328 pairs). Both selections are built here over `respond`'s scored responses (several
per record) as pure functions; every tie is broken by a seeded draw
(`uniform_from(seed, pair id)`), so the same seed gives the same pairs whatever the input
order, and another seed picks differently among equals.

Candidates (both modes): two responses of one record whose R+S+E totals (0..6) differ by
more than `gap_threshold`, with different texts; chosen = the higher total.

* `disparity_pairs`: each record keeps its `per_record` widest-gap candidates (default 1);
  `max_pairs`, if set, keeps the widest gaps overall. Default threshold 3: a gap of at
  least 4, two thirds of the scale (the paper does not say how large "significant" is).
* `length_balanced_pairs`: default threshold 1 (a gap of at least 2: a larger set, as the
  paper's SPA-VL set is about twice the Beavertails-V one). A candidate is "longer" when the
  chosen response has more words than the rejected one by more than `length_tolerance`
  (relative to the longer of the two), "shorter" when it has fewer, "even" otherwise.
  Within every gap value, as many "longer" as "shorter" pairs are kept (the lowest draws
  of the larger side), and every "even" pair: at each score difference the preferred
  answer is the longer one exactly as often as the shorter one, so length carries no
  preference signal. `max_pairs` trims whole (longer, shorter) couples, widest gaps first,
  so the balance survives it. `per_record` (default: no cap) is applied before balancing.

Length is counted in whitespace words (`selection.response_words`): no tokenizer is needed
and relative comparisons of two answers to one prompt barely depend on the unit.
Output: `PreferencePair`s (`caspo_jax.data.formats`; read back with `load_pairs`) whose
meta adds mode, chosen_words, rejected_words and length ("longer" / "shorter" / "even").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from caspo_jax.curate.selection import group_by_record, pair_id, preference_pair, response_words, uniform_from
from caspo_jax.data.formats import PreferencePair

__all__ = ["DPO_MODES", "disparity_pairs", "dpo_pairs", "length_balanced_pairs", "length_direction"]


@dataclasses.dataclass(frozen=True)
class _Candidate:
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    gap: int
    draw: float  # uniform_from(seed, pair id): the seeded tie-break
    order: int  # first-seen position of its record, to emit pairs in input record order

    @property
    def rank(self) -> tuple[int, float]:
        """Widest gap first, then the seeded draw."""
        return -self.gap, self.draw


def length_direction(chosen_words: int, rejected_words: int, tolerance: float) -> str:
    """How the chosen answer's length compares with the rejected one's.

    "longer" / "shorter": more / fewer words by more than `tolerance` x the longer of the two
    lengths; "even" otherwise.
    """
    if abs(chosen_words - rejected_words) <= tolerance * max(chosen_words, rejected_words):
        return "even"
    return "longer" if chosen_words > rejected_words else "shorter"


def _check(gap_threshold: int, per_record: int | None, max_pairs: int | None) -> None:
    if not 0 <= gap_threshold < 6:
        raise ValueError(f"gap_threshold must be in 0..5 (pairs need an R+S+E gap above it), got {gap_threshold}")
    if per_record is not None and per_record < 1:
        raise ValueError(f"per_record must be >= 1 (or None for no cap), got {per_record}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 (or None for no cap), got {max_pairs}")


def _candidates(responses: Sequence[dict[str, Any]], gap_threshold: int, per_record: int | None,
                seed: int) -> list[_Candidate]:
    """Every eligible pair, each record capped at its `per_record` best-ranked ones."""
    out: list[_Candidate] = []
    for order, group in enumerate(group_by_record(responses).values()):
        ranked = sorted(group, key=lambda r: (-r["scores"]["total"], r["id"]))
        found = []
        for i, hi in enumerate(ranked):
            for lo in ranked[i + 1:]:
                gap = hi["scores"]["total"] - lo["scores"]["total"]
                if gap > gap_threshold and hi["response"] != lo["response"]:
                    found.append(_Candidate(hi, lo, gap, uniform_from(seed, pair_id(hi, lo)), order))
        found.sort(key=lambda c: c.rank)
        out += found if per_record is None else found[:per_record]
    return out


def _as_pairs(chosen: list[_Candidate], mode: str, tolerance: float) -> list[PreferencePair]:
    pairs = []
    for c in sorted(chosen, key=lambda c: (c.order, *c.rank)):
        cw, rw = response_words(c.chosen), response_words(c.rejected)
        pairs.append(preference_pair(c.chosen, c.rejected, mode=mode, chosen_words=cw, rejected_words=rw,
                                     length=length_direction(cw, rw, tolerance)))
    return pairs


def disparity_pairs(
    responses: Sequence[dict[str, Any]], *, gap_threshold: int = 3, per_record: int | None = 1,
    max_pairs: int | None = None, seed: int = 0, length_tolerance: float = 0.1,
) -> list[PreferencePair]:
    """Pairs by score disparity (module doc); `length_tolerance` only labels meta["length"]."""
    _check(gap_threshold, per_record, max_pairs)
    chosen = _candidates(responses, gap_threshold, per_record, seed)
    if max_pairs is not None:
        chosen = sorted(chosen, key=lambda c: c.rank)[:max_pairs]
    return _as_pairs(chosen, "disparity", length_tolerance)


def length_balanced_pairs(
    responses: Sequence[dict[str, Any]], *, gap_threshold: int = 1, per_record: int | None = None,
    max_pairs: int | None = None, seed: int = 0, length_tolerance: float = 0.1,
) -> list[PreferencePair]:
    """Pairs balanced, per score gap, between longer-chosen and shorter-chosen (module doc)."""
    _check(gap_threshold, per_record, max_pairs)
    if not 0.0 <= length_tolerance < 1.0:
        raise ValueError(f"length_tolerance must be in [0, 1), got {length_tolerance}")
    by_gap: dict[int, dict[str, list[_Candidate]]] = {}
    for c in _candidates(responses, gap_threshold, per_record, seed):
        direction = length_direction(response_words(c.chosen), response_words(c.rejected), length_tolerance)
        by_gap.setdefault(c.gap, {"longer": [], "shorter": [], "even": []})[direction].append(c)
    units: list[tuple[_Candidate, ...]] = []  # a (longer, shorter) couple or one even pair
    for sides in by_gap.values():
        longer, shorter = (sorted(sides[k], key=lambda c: c.draw) for k in ("longer", "shorter"))
        units += list(zip(longer, shorter)) + [(c,) for c in sides["even"]]
    if max_pairs is not None:
        kept, size = [], 0
        for unit in sorted(units, key=lambda u: (-u[0].gap, min(c.draw for c in u))):
            if size + len(unit) <= max_pairs:
                kept.append(unit)
                size += len(unit)
        units = kept
    return _as_pairs([c for unit in units for c in unit], "length-balanced", length_tolerance)


DPO_MODES: dict[str, Callable[..., list[PreferencePair]]] = {
    "disparity": disparity_pairs,
    "length-balanced": length_balanced_pairs,
}


def dpo_pairs(responses: Sequence[dict[str, Any]], mode: str, **options: Any) -> list[PreferencePair]:
    """The pairs of `mode` ("disparity" or "length-balanced"); options as that function takes."""
    if mode not in DPO_MODES:
        raise ValueError(f"unknown DPO pair mode {mode!r}; choose one of {', '.join(DPO_MODES)}")
    return DPO_MODES[mode](responses, **options)
