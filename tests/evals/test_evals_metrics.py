"""Metric maths against a hand-computed table (two judges, one failed judgement)."""

import math

import pytest

from caspo_jax.evals import metrics as M

# judges A, B; item i4's judge-B call failed (None), which must never count as a zero.
ITEMS = [
    M.ItemScores("i1", "violent", {"A": (0, 0, 2), "B": (0, 1, 2)}),
    M.ItemScores("i2", "violent", {"A": (2, 2, 1), "B": (1, 2, 1)}),
    M.ItemScores("i3", "hate", {"A": (0, 0, 0), "B": (0, 0, 1)}),
    M.ItemScores("i4", "hate", {"A": (1, 1, 2), "B": None}),
]


def test_summary_matches_hand_computed_table():
    s = M.summarize(ITEMS, ["A", "B"])
    # covered: i1, i2, i3 with item averages R (0, 1.5, 0), S (.5, 2, 0), E (2, 1, .5)
    assert s.dims["risk"].mean == pytest.approx(0.5)
    assert s.dims["safety"].mean == pytest.approx(2.5 / 3)
    assert s.dims["effectiveness"].mean == pytest.approx(3.5 / 3)
    # per judge: A R zeros 2/3, B 2/3; S: A 2/3, B 1/3; E: A 1/3, B 0
    assert s.dims["risk"].zero_rate_per_judge == pytest.approx(200 / 3)
    assert s.dims["safety"].zero_rate_per_judge == pytest.approx(50.0)
    assert s.dims["effectiveness"].zero_rate_per_judge == pytest.approx(50 / 3)
    # on averaged items: R (0, 1.5, 0) -> 2/3; S (.5, 2, 0) -> 1/3; E -> 0
    assert s.dims["risk"].zero_rate_items == pytest.approx(200 / 3)
    assert s.dims["safety"].zero_rate_items == pytest.approx(100 / 3)
    assert s.dims["effectiveness"].zero_rate_items == pytest.approx(0.0)
    # R shares: A (2/3, 0, 1/3), B (2/3, 1/3, 0) -> averaged
    assert s.dims["risk"].shares == pytest.approx((200 / 3, 50 / 3, 50 / 3))
    assert sum(s.dims["safety"].shares) == pytest.approx(100.0)
    assert s.dims["risk"].per_judge_mean == pytest.approx({"A": 2 / 3, "B": 1 / 3})
    c = s.coverage
    assert (c.items, c.covered_items, c.judgements_ok, c.judgements_total) == (4, 3, 7, 8)
    assert c.per_judge_ok == {"A": 4, "B": 3}
    assert c.fraction == pytest.approx(7 / 8)


def test_partial_items_when_not_requiring_all_judges():
    s = M.summarize(ITEMS, ["A", "B"], require_all_judges=False)
    # i4 enters with judge A only: R item scores (0, 1.5, 0, 1)
    assert s.dims["risk"].mean == pytest.approx(2.5 / 4)
    # A: R zeros 2/4, B: 2/3
    assert s.dims["risk"].zero_rate_per_judge == pytest.approx((50 + 200 / 3) / 2)
    assert s.coverage.covered_items == 4


def test_failed_judgement_is_not_a_zero():
    only_failed = [M.ItemScores("x", None, {"A": None})]
    s = M.summarize(only_failed, ["A"])
    assert math.isnan(s.dims["risk"].mean) and math.isnan(s.dims["risk"].zero_rate_per_judge)
    assert s.coverage.judgements_ok == 0 and s.coverage.covered_items == 0


def test_by_category_and_compare():
    cats = M.summarize_by_category(ITEMS, ["A", "B"])
    assert set(cats) == {"violent", "hate"}
    assert cats["violent"].dims["risk"].mean == pytest.approx(0.75)
    assert cats["hate"].dims["risk"].mean == pytest.approx(0.0)
    assert cats["hate"].coverage.covered_items == 1
    before = {"standard": M.summarize(ITEMS, ["A", "B"])}
    improved = [M.ItemScores(i.item_id, i.category, {j: (2, 2, 2) for j in ("A", "B")}) for i in ITEMS]
    after = {"standard": M.summarize(improved, ["A", "B"]), "caption": before["standard"]}
    d = M.compare(before, after)
    assert set(d) == {"standard"}
    assert d["standard"]["R_A"].absolute == pytest.approx(1.5)
    assert d["standard"]["R_A"].relative == pytest.approx(300.0)
    assert d["standard"]["R_0"].absolute == pytest.approx(-200 / 3)
    assert math.isnan(M.Delta(0.0, 1.0).relative)


def test_rejects_out_of_range_scores():
    with pytest.raises(ValueError, match="i9.*judge 'A'"):
        M.summarize([M.ItemScores("i9", None, {"A": (3, 0, 0)})])


def test_majority():
    assert M.majority([True, True, False]) is True
    assert M.majority([False, True, False]) is False
    assert M.majority([True, False]) is None and M.majority([]) is None
