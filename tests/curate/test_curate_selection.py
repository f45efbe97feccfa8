"""SFT target choice, BT pair construction (threshold, seeded probability) and MSE records."""

import itertools
import math

import pytest

from caspo_jax.curate.selection import build_preferences, select_sft, uniform_from


def _resp(record, model, mode, total, text=None, words=5):
    r = min(2, total)
    s = min(2, total - r)
    e = total - r - s
    return {"id": f"{record}/{model}/{mode}/0", "record_id": record, "category": "violent", "images": ["a.png"],
            "query": f"q {record}", "source_model": model, "prompt_mode": mode,
            "response": text or " ".join([f"{model}{mode}{total}"] * words),
            "scores": {"risk": r, "safety": s, "effectiveness": e, "total": total, "reasons": {}}}


def _world(n_records, totals_by_model):
    return [_resp(f"r{i}", m, "standard", t) for i in range(n_records) for m, t in totals_by_model.items()]


def test_pairs_obey_the_gap_threshold_and_every_response_is_used_once():
    totals = [0, 1, 2, 3, 4, 5, 6]
    responses = []
    for i, combo in enumerate(itertools.combinations(totals, 4)):
        responses += [_resp(f"r{i}", f"m{k}", "standard", t) for k, t in enumerate(combo)]
    pairs, mse = build_preferences(responses, gap_threshold=4, pair_probability=1.0, seed=0)
    by_id = {r["id"]: r for r in responses}
    for p in pairs:
        chosen_total = p.meta["chosen_scores"]["total"]
        rejected_total = p.meta["rejected_scores"]["total"]
        assert chosen_total - rejected_total == p.meta["gap"] > 4
    used = [i for p in pairs for i in p.id.split(">")] + [m.id for m in mse]
    assert sorted(used) == sorted(by_id)  # each response exactly once, in a pair or as an MSE record
    # with p = 1 every record whose best-worst gap exceeds 4 yields its pair
    groups = {}
    for r in responses:
        groups.setdefault(r["record_id"], []).append(r["scores"]["total"])
    expected = sum(max(t) - min(t) > 4 for t in groups.values())
    assert len(pairs) == expected > 0
    assert all(m.score == by_id[m.id]["scores"]["total"] for m in mse)


def test_pair_probability_is_respected_and_seeded():
    responses = _world(2000, {"good": 6, "bad": 1})  # every record has one eligible pair (gap 5)
    pairs0, mse0 = build_preferences(responses, gap_threshold=4, pair_probability=0.85, seed=0)
    n = 2000
    sd = math.sqrt(n * 0.85 * 0.15)
    assert abs(len(pairs0) - 0.85 * n) < 4 * sd  # binomial(2000, 0.85): within 4 sigma
    assert len(mse0) == 2 * (n - len(pairs0))
    again, _ = build_preferences(list(reversed(responses)), gap_threshold=4, pair_probability=0.85, seed=0)
    assert sorted(p.id for p in again) == sorted(p.id for p in pairs0)  # order-independent draw
    other, _ = build_preferences(responses, gap_threshold=4, pair_probability=0.85, seed=1)
    assert sorted(p.id for p in other) != sorted(p.id for p in pairs0)
    assert build_preferences(responses, pair_probability=0.0)[0] == []
    # a gap of exactly the threshold is not enough
    assert build_preferences(_world(50, {"a": 5, "b": 1}), gap_threshold=4, pair_probability=1.0)[0] == []


def test_uniform_from_is_uniform_enough():
    xs = [uniform_from(7, f"k{i}") for i in range(5000)]
    assert all(0.0 <= x < 1.0 for x in xs)
    assert abs(sum(xs) / len(xs) - 0.5) < 0.02
    assert sum(x < 0.25 for x in xs) == pytest.approx(1250, abs=150)


def test_identical_texts_never_pair():
    rs = [_resp("r0", "a", "standard", 6, text="same"), _resp("r0", "b", "standard", 0, text="same")]
    pairs, mse = build_preferences(rs, pair_probability=1.0)
    assert pairs == [] and len(mse) == 2


def test_sft_prefers_score_then_balances_models_then_length():
    # r0: alpha 6 beats beta 5. r1..r4: alpha and beta tie at 6 -> picks alternate across models.
    responses = [_resp("r0", "alpha", "standard", 6), _resp("r0", "beta", "standard", 5)]
    for i in range(1, 5):
        responses += [_resp(f"r{i}", "alpha", "standard", 6), _resp(f"r{i}", "beta", "standard", 6)]
    responses += [_resp("r5", "alpha", "standard", 3), _resp("r5", "beta", "standard", 4)]
    sft, rejected = select_sft(responses, min_total=5)
    picks = [e.meta["source_model"] for e in sft]
    assert picks == ["alpha", "beta", "alpha", "beta", "alpha"]
    assert rejected == [{"id": "r5", "category": "violent", "kind": "no_sft_target", "reason": "select: no response with R+S+E >= 5 (best 4)"}]
    # length balance: among equal scores and equal model counts, the length nearest the median wins
    rs = [_resp("x", "m1", "standard", 6, words=50), _resp("x", "m1", "constitution", 6, words=6),
          _resp("y", "m2", "standard", 6, words=5), _resp("z", "m3", "standard", 6, words=7)]
    sft, _ = select_sft(rs)
    assert sft[0].meta["response_id"] == "x/m1/constitution/0"
    with pytest.raises(ValueError, match="min_total"):
        select_sft(rs, min_total=7)
