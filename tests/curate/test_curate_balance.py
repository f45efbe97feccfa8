"""Reward-model pool balanced by source model and length (paper B.1): hand-counted cells, seeded draws."""

from collections import Counter

import pytest

from caspo_jax.curate.balance import balance_responses, length_edges
from caspo_jax.curate.selection import select, uniform_from


def _r(model, k, words, total=6):
    return {"id": f"rec{k}/{model}/{words}w/{k}", "record_id": f"rec{k}", "category": "violent", "images": [],
            "query": "q", "source_model": model, "prompt_mode": "standard", "sample": 0,
            "response": " ".join(["w"] * words),
            "scores": {"risk": 2, "safety": 2, "effectiveness": total - 4, "total": total, "reasons": {}}}


def _world():
    """Edge 10 words: model a has 4 short (5 words) and 2 long (20); model b 1 short and 3 long."""
    return ([_r("a", k, 5) for k in range(4)] + [_r("a", k, 20) for k in range(2)]
            + [_r("b", 0, 5)] + [_r("b", k, 20) for k in range(3)])


def _counts(kept):
    models = Counter(r["source_model"] for r in kept)
    buckets = Counter("short" if len(r["response"].split()) < 10 else "long" for r in kept)
    return dict(models), dict(buckets)


def test_median_cap_min_and_explicit_counts():
    world = _world()
    # cells a/short 4, a/long 2, b/short 1, b/long 3 -> median_low 2: 2 + 2 + 1 + 2 = 7
    kept, report = balance_responses(world, edges=[10], seed=0)
    assert report.per_cell == 2 and report.edges == (10,)
    assert report.total == {("a", 0): 4, ("a", 1): 2, ("b", 0): 1, ("b", 1): 3}
    assert report.kept == {("a", 0): 2, ("a", 1): 2, ("b", 0): 1, ("b", 1): 2}
    assert _counts(kept) == ({"a": 4, "b": 3}, {"short": 3, "long": 4})
    assert report.summary().endswith("kept 7 of 10 responses")
    # "min": every cell cut to the smallest (1): exact balance, 2 per model and 2 per bucket
    kept, report = balance_responses(world, edges=[10], per_cell="min")
    assert report.per_cell == 1 and _counts(kept) == ({"a": 2, "b": 2}, {"short": 2, "long": 2})
    # a count: 3 per cell -> a 3 + 2, b 1 + 3
    kept, _ = balance_responses(world, edges=[10], per_cell=3)
    assert _counts(kept) == ({"a": 5, "b": 4}, {"short": 4, "long": 5})
    assert [r["id"] for r in kept] == [r["id"] for r in world if r in kept]  # input order kept


def test_the_draw_is_seeded_and_order_free():
    world = _world()
    a_short = [r["id"] for r in world if r["source_model"] == "a" and r["response"].count("w") == 5]
    seen = set()
    for seed in range(10):
        kept, _ = balance_responses(world, edges=[10], seed=seed)
        got = sorted(r["id"] for r in kept if r["id"] in a_short)
        assert got == sorted(sorted(a_short, key=lambda i: uniform_from(seed, f"rm-balance:{i}"))[:2])
        again, _ = balance_responses(list(reversed(world)), edges=[10], seed=seed)
        assert sorted(r["id"] for r in again) == sorted(r["id"] for r in kept)
        seen.add(tuple(got))
    assert len(seen) > 1  # other seeds keep other responses


def test_default_edges_are_the_quartiles():
    assert length_edges([1, 2, 3, 4, 5, 6, 7, 8]) == (3, 4, 6)  # 2.75, 4.5, 6.25 rounded
    assert length_edges([7] * 6 + [14] * 18) == (12, 14)  # duplicates merged: bucket 1 stays empty
    assert length_edges([5, 9], buckets=1) == ()
    _, report = balance_responses(_world())  # lengths 5 x5, 20 x5 -> quartiles 5, 12.5 -> 12, 20
    assert report.edges == (5, 12, 20)
    assert report.total == {("a", 1): 4, ("a", 3): 2, ("b", 1): 1, ("b", 3): 3}


def test_select_builds_rm_data_from_the_balanced_pool():
    world = _world() + [_r("b", 9, 20, total=0)]  # one low-scoring response: pairs need a partner in its record
    world[-1]["record_id"] = "rec0"
    kept, _ = balance_responses(world, edges=[10], per_cell="min")
    sel = select(world, rm_responses=kept, pair_probability=1.0)
    used = [m.id for m in sel.mse] + [i for p in sel.pairs for i in p.id.split(">")]
    assert sorted(used) == sorted(r["id"] for r in kept)  # RM data = the balanced pool, each response once
    assert len(sel.sft) == len({r["record_id"] for r in world})  # SFT still sees every response


@pytest.mark.parametrize("kwargs, match", [
    ({"per_cell": 0}, "per_cell must be >= 1"),
    ({"per_cell": "max"}, "per_cell must be a positive count or one of min, median"),
    ({"edges": [20, 10]}, "strictly increasing"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        balance_responses(_world(), **kwargs)
