"""DPO pair selection (paper A.2.3 / B.1): by score disparity and length-balanced, seeded."""

from collections import Counter

import pytest

from caspo_jax.curate.dpo_pairs import disparity_pairs, dpo_pairs, length_balanced_pairs, length_direction
from caspo_jax.curate.selection import uniform_from
from caspo_jax.data.formats import load_pairs
from caspo_jax.data.importers import write_jsonl


def _r(record, name, total, words=5, text=None):
    return {"id": f"{record}/{name}", "record_id": record, "category": "violent", "images": [], "query": f"q {record}",
            "source_model": f"m-{name}", "prompt_mode": "standard", "sample": 0,
            "response": text or " ".join([f"{name}w"] * words),
            "scores": {"risk": 0, "safety": 0, "effectiveness": 0, "total": total, "reasons": {}}}


def _disparity_world():
    return [
        # r0: a>c gap 5, a>b gap 4, d>c gap 4; b>c (1) and d>b (3) are not above 3
        _r("r0", "a", 6), _r("r0", "b", 2), _r("r0", "c", 1, words=3), _r("r0", "d", 5),
        _r("r1", "e", 6), _r("r1", "f", 3),  # gap 3: not above 3
        # r2: g and h have one text, so g>h is no pair; g>i gap 5
        _r("r2", "g", 6, text="same words"), _r("r2", "h", 0, text="same words"), _r("r2", "i", 1),
    ]


def test_disparity_keeps_the_widest_gap_per_record():
    pairs = disparity_pairs(_disparity_world(), seed=0)
    assert [p.id for p in pairs] == ["r0/a>r0/c", "r2/g>r2/i"]
    assert [p.meta["gap"] for p in pairs] == [5, 5]
    first = pairs[0]
    assert (first.meta["chosen_words"], first.meta["rejected_words"], first.meta["length"]) == (5, 3, "longer")
    assert first.meta["mode"] == "disparity" and first.meta["chosen_model"] == "m-a"


def test_disparity_without_a_per_record_cap_and_with_max_pairs_breaks_ties_by_seed():
    world = _disparity_world()
    every = disparity_pairs(world, per_record=None)
    assert sorted(p.id for p in every) == ["r0/a>r0/b", "r0/a>r0/c", "r0/d>r0/c", "r2/g>r2/i"]
    # max 3: both gap-5 pairs, then the gap-4 tie (a>b or d>c) goes to the lower draw
    picks = set()
    for seed in range(20):
        ids = [p.id for p in disparity_pairs(world, per_record=None, max_pairs=3, seed=seed)]
        tie = min(("r0/a>r0/b", "r0/d>r0/c"), key=lambda k: uniform_from(seed, k))
        assert sorted(ids) == sorted(["r0/a>r0/c", "r2/g>r2/i", tie])
        again = disparity_pairs(list(reversed(world)), per_record=None, max_pairs=3, seed=seed)
        assert sorted(p.id for p in again) == sorted(ids)  # the input order does not matter
        picks.add(tie)
    assert picks == {"r0/a>r0/b", "r0/d>r0/c"}  # different seeds pick differently
    # a lower threshold admits d>b (gap 3) and e>f (gap 3)
    ids = {p.id for p in disparity_pairs(world, gap_threshold=2, per_record=None)}
    assert {"r0/d>r0/b", "r1/e>r1/f"} <= ids


def test_length_direction_uses_a_relative_tolerance():
    assert length_direction(10, 11, 0.1) == "even"  # |1| <= 0.1 * 11
    assert length_direction(10, 12, 0.1) == "shorter"  # |2| > 1.2
    assert length_direction(12, 10, 0.1) == "longer"
    assert length_direction(10, 10, 0.0) == "even" and length_direction(10, 11, 0.0) == "shorter"


def _length_world():
    """One pair per record; (gap, direction) planted: gap 4: 3 longer, 1 shorter, 1 even;
    gap 2: 2 longer, 2 shorter; gap 5: 2 shorter only; gap 1: 1 longer (not above the threshold)."""
    plan = [(4, "longer")] * 3 + [(4, "shorter"), (4, "even")] + [(2, "longer")] * 2 + [(2, "shorter")] * 2 \
        + [(5, "shorter")] * 2 + [(1, "longer")]
    words = {"longer": (20, 10), "shorter": (10, 20), "even": (10, 10)}
    out = []
    for k, (gap, direction) in enumerate(plan):
        cw, rw = words[direction]
        out += [_r(f"{gap}{direction}{k}", "hi", 6, words=cw), _r(f"{gap}{direction}{k}", "lo", 6 - gap, words=rw)]
    return out


def test_length_balanced_keeps_as_many_longer_as_shorter_at_every_gap():
    world = _length_world()
    pairs = length_balanced_pairs(world, seed=0)
    counts = Counter((p.meta["gap"], p.meta["length"]) for p in pairs)
    # gap 4: min(3, 1) = 1 of each + the even one; gap 2: 2 and 2; gap 5: no longer -> none; gap 1: below
    assert counts == {(4, "longer"): 1, (4, "shorter"): 1, (4, "even"): 1, (2, "longer"): 2, (2, "shorter"): 2}
    assert all(p.meta["mode"] == "length-balanced" for p in pairs)
    # the kept gap-4 "longer" pair is the one with the lowest seeded draw, so seeds choose differently
    kept_longer = set()
    for seed in range(12):
        got = [p.id for p in length_balanced_pairs(world, seed=seed) if p.meta["gap"] == 4 and p.meta["length"] == "longer"]
        candidates = [f"4longer{k}/hi>4longer{k}/lo" for k in range(3)]
        assert got == [min(candidates, key=lambda c: uniform_from(seed, c))]
        assert [p.id for p in length_balanced_pairs(list(reversed(world)), seed=seed)
                if p.meta["gap"] == 4 and p.meta["length"] == "longer"] == got  # the input order does not matter
        kept_longer.update(got)
    assert len(kept_longer) > 1
    # chosen / rejected word totals are equal: length tells nothing about preference
    assert sum(p.meta["chosen_words"] for p in pairs) == sum(p.meta["rejected_words"] for p in pairs)


def test_length_balanced_max_pairs_trims_whole_couples_widest_gap_first():
    world = _length_world()
    # units by gap: gap 4 -> one couple (2) + one even (1); gap 2 -> two couples (2 each)
    assert len(length_balanced_pairs(world, max_pairs=4)) == 3  # a gap-2 couple does not fit in the 1 left
    five = length_balanced_pairs(world, max_pairs=5)
    counts = Counter((p.meta["gap"], p.meta["length"]) for p in five)
    assert counts == {(4, "longer"): 1, (4, "shorter"): 1, (4, "even"): 1, (2, "longer"): 1, (2, "shorter"): 1}
    # a wider tolerance turns the 20-vs-10-word pairs "even" (|10| <= 0.5 * 20): all 11 above the threshold kept
    assert len(length_balanced_pairs(world, length_tolerance=0.5)) == 11


def test_dpo_pairs_round_trip_through_the_pair_loader(tmp_path):
    pairs = dpo_pairs(_disparity_world(), "disparity", per_record=None)
    write_jsonl(tmp_path / "dpo.jsonl", pairs)
    back = load_pairs(tmp_path / "dpo.jsonl", tmp_path)
    assert [(p.id, p.chosen, p.rejected) for p in back] == [(p.id, p.chosen, p.rejected) for p in pairs]
    assert back[0].meta["gap"] == pairs[0].meta["gap"]


@pytest.mark.parametrize("call, match", [
    (lambda w: dpo_pairs(w, "random"), "unknown DPO pair mode 'random'"),
    (lambda w: disparity_pairs(w, gap_threshold=6), "gap_threshold must be in 0..5"),
    (lambda w: disparity_pairs(w, per_record=0), "per_record must be >= 1"),
    (lambda w: length_balanced_pairs(w, max_pairs=0), "max_pairs must be >= 1"),
    (lambda w: length_balanced_pairs(w, length_tolerance=1.0), "length_tolerance must be in"),
])
def test_bad_options_name_the_option(call, match):
    with pytest.raises(ValueError, match=match):
        call(_disparity_world())


def test_cli_dpo_options_reach_the_selection(tmp_path, capsys):
    from caspo_jax.curate import pipeline
    from caspo_jax.curate.stage import write_stage
    from caspo_jax.launch.cli import main

    out = tmp_path / "cur"
    world = _disparity_world()
    write_stage(pipeline.stage_path(out, "respond"), "respond", "t", world, [])
    args = ["curate", "dpo", "--out", str(out), "--no-progress", "--seed", "5"]
    assert main([*args, "--dpo-per-record", "0", "--dpo-max-pairs", "3"]) == 0
    written = [p.id for p in load_pairs(out / "dpo_disparity.jsonl", out)]
    assert written == [p.id for p in disparity_pairs(world, per_record=None, max_pairs=3, seed=5)]
    assert "dpo_disparity.jsonl: 3 pairs (disparity)" in capsys.readouterr().out
    # --dpo-gap 2 admits the gap-3 pairs d>b and e>f; one per record by default
    assert main([*args, "--dpo-gap", "2"]) == 0
    assert [p.id for p in load_pairs(out / "dpo_disparity.jsonl", out)] == ["r0/a>r0/c", "r1/e>r1/f", "r2/g>r2/i"]
    assert main([*args, "--dpo-mode", "length-balanced", "--dpo-length-tolerance", "0.9"]) == 0
    even = load_pairs(out / "dpo_length_balanced.jsonl", out)
    assert {p.meta["length"] for p in even} == {"even"} and len(even) == 6  # r0's 4 gaps above 1, e>f, g>i
    capsys.readouterr()
    assert main(["curate", "select", "--out", str(out), "--rm-per-cell", "lots"]) == 2
    assert "--rm-per-cell 'lots': give a positive count, 'min' or 'median'" in capsys.readouterr().err
    assert main(["curate", "select", "--out", str(out), "--rm-length-edges", "10,x"]) == 2
    assert "--rm-length-edges '10,x'" in capsys.readouterr().err
