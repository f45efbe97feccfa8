"""Reward-model data balanced by source model and response length (paper appendix B.1).

"During sampling, we meticulously balanced the data based on response length and
originating model architecture to mitigate over-fitting to superficial linguistic
patterns." The paper gives no procedure; ours, a pure seeded function over `respond`'s
scored responses, runs before `build_preferences` pairs them (BT pairs and MSE records
then come from the balanced pool):

1. Each response falls in a cell (source_model, length bucket). Length is in whitespace
   words; bucket k holds lengths in [edges[k-1], edges[k]) (bucket 0 below edges[0], the
   last at or above edges[-1]). Default edges: the quartiles of all responses' lengths
   (`length_edges`), so four buckets that adapt to how long the generators write.
2. Every cell keeps at most `per_cell` responses: those with the lowest
   `uniform_from(seed, "rm-balance:" + id)` (so the draw ignores input order).
   `per_cell="min"` is exact balance (every non-empty cell cut to the smallest one);
   the default `"median"` (the median_low of the non-empty cell sizes) caps the
   over-represented cells without letting one rare cell (a terse model's few long
   answers) shrink the whole set to its size.

Cells a model never fills stay empty: balancing only removes data, it cannot create it.
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from caspo_jax.curate.selection import response_words, uniform_from

__all__ = ["BalanceReport", "balance_responses", "length_edges"]

PER_CELL_RULES = ("min", "median")


@dataclasses.dataclass(frozen=True)
class BalanceReport:
    """What balancing kept: edges used, quota per cell, and kept / total counts per cell."""

    edges: tuple[int, ...]
    per_cell: int
    kept: dict[tuple[str, int], int]
    total: dict[tuple[str, int], int]

    def summary(self) -> str:
        return (f"balanced by model and length (word edges {list(self.edges)}, <= {self.per_cell} per cell): "
                f"kept {sum(self.kept.values())} of {sum(self.total.values())} responses")


def length_edges(lengths: Sequence[int], buckets: int = 4) -> tuple[int, ...]:
    """Bucket edges at the `buckets`-quantiles of `lengths` (duplicates merged), e.g. the quartiles."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    if buckets == 1 or len(lengths) < 2:
        return ()
    qs = statistics.quantiles(lengths, n=buckets, method="inclusive")
    return tuple(sorted({int(round(q)) for q in qs}))


def _quota(sizes: list[int], per_cell: int | str) -> int:
    if isinstance(per_cell, str):
        if per_cell not in PER_CELL_RULES:
            raise ValueError(f"per_cell must be a positive count or one of {', '.join(PER_CELL_RULES)}, "
                             f"got {per_cell!r}")
        return min(sizes) if per_cell == "min" else statistics.median_low(sizes)
    if per_cell < 1:
        raise ValueError(f"per_cell must be >= 1, got {per_cell}")
    return per_cell


def balance_responses(
    responses: Sequence[dict[str, Any]], *, per_cell: int | str = "median",
    edges: Sequence[int] | None = None, seed: int = 0,
) -> tuple[list[dict[str, Any]], BalanceReport]:
    """(the kept responses in input order, a report); see the module doc for the rule."""
    if not responses:
        return [], BalanceReport(tuple(edges or ()), 0, {}, {})
    words = [response_words(r) for r in responses]
    edges = tuple(edges) if edges is not None else length_edges(words)
    if list(edges) != sorted(set(edges)):
        raise ValueError(f"length edges must be strictly increasing word counts, got {list(edges)}")
    cells: dict[tuple[str, int], list[int]] = {}
    for i, (r, n) in enumerate(zip(responses, words)):
        cells.setdefault((r["source_model"], bisect.bisect_right(edges, n)), []).append(i)
    quota = _quota([len(v) for v in cells.values()], per_cell)
    keep: set[int] = set()
    for members in cells.values():
        keep.update(sorted(members, key=lambda i: uniform_from(seed, f"rm-balance:{responses[i]['id']}"))[:quota])
    kept = [r for i, r in enumerate(responses) if i in keep]
    kept_cells = Counter(cell for cell, members in cells.items() for i in members if i in keep)
    report = BalanceReport(edges, quota, dict(kept_cells), {cell: len(m) for cell, m in cells.items()})
    return kept, report
