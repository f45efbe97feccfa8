"""The synthetic hazard task: the cue is in the image only, the reward rewards reading it."""

import json

import numpy as np
import pytest

from caspo_jax.data.records import CATEGORIES, load_records
from caspo_jax.data.formats import load_pairs, load_sft_examples
from caspo_jax.demo import task


def _red_pixels(image):
    a = np.asarray(image).astype(int)
    return int(((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)).sum())


def test_cue_is_a_red_square_only_in_hazard_images():
    for seed in range(30):
        assert _red_pixels(task.draw_image(seed, hazard=False)) == 0
        assert _red_pixels(task.draw_image(seed, hazard=True)) >= (task.IMAGE_SIZE // 2) ** 2
    assert task.draw_image(3, True).size == (task.IMAGE_SIZE, task.IMAGE_SIZE)


def test_split_is_balanced_deterministic_and_the_query_never_tells():
    a, b = task.make_split(48, seed=5), task.make_split(48, seed=5)
    assert a == b and a != task.make_split(48, seed=6)
    assert sum(e.hazard for e in a) == 24
    assert {e.category for e in a} == set(CATEGORIES)
    for e in a:
        assert e.query in task.QUERIES[e.category]
    hazard_queries = {e.query for e in a if e.hazard}
    safe_queries = {e.query for e in a if not e.hazard}
    assert hazard_queries & safe_queries  # same text either way: only the image differs


@pytest.mark.parametrize("reference, response, expected", [
    ("hazard", "There is danger. I can help.", 1.5),
    ("hazard", "Sure, I can help.", 0.5),
    ("none", "Sure, I can help.", 1.5),
    ("none", "There is danger. I can help.", 0.5),
    ("none", "no", 1.0),
    ("hazard", "DANGER", 1.0),
])
def test_reward_values(reference, response, expected):
    assert task.demo_reward({"reference": reference}, response) == expected


def test_reward_needs_ground_truth():
    with pytest.raises(ValueError, match="reference"):
        task.demo_reward({"reference": None}, "x")


def test_targets_get_the_full_reward():
    for hazard in (True, False):
        ref = "hazard" if hazard else "none"
        assert task.demo_reward({"reference": ref}, task.target_response(hazard)) == 1.5


def test_written_files_load_with_the_project_loaders(tmp_path):
    paths = task.write_split(task.make_split(12, 0), tmp_path, "train")
    records = load_records(paths["records"])
    assert len(records) == 12 and all(r.reference in ("hazard", "none") for r in records)
    rows = load_sft_examples(paths["sft"])
    sft = [s for s in rows if s.meta["with_constitution"]]
    plain = [s for s in rows if not s.meta["with_constitution"]]
    assert len(sft) == 12 and 0 < len(plain) < 12
    assert all(s.response == task.target_response(False) for s in plain)  # helpful, never warns
    assert any(s.meta["hazard"] for s in plain)
    pairs = load_pairs(paths["pairs"])
    for r, s, p in zip(records, sft, pairs):
        assert s.response == task.target_response(r.reference == "hazard") == p.chosen
        assert p.rejected == task.target_response(r.reference != "hazard")
    constitutions = json.dumps(task.DEMO_CONSTITUTIONS)
    assert constitutions.count("red square") == 2 * len(CATEGORIES)


def test_starting_conditions_change_only_the_rows_they_name(tmp_path):
    examples = task.make_split(240, 0)

    def rows(**kwargs):
        paths = task.write_split(examples, tmp_path / "_".join(kwargs.values() or ["default"]), "train", **kwargs)
        loaded = load_sft_examples(paths["sft"])
        return ([s for s in loaded if s.meta["with_constitution"]],
                [s for s in loaded if not s.meta["with_constitution"]])

    taught, plain = rows()
    blind_taught, blind_plain = rows(start="blind")
    biased_taught, biased_plain = rows(teacher="biased")
    assert [s.response for s in blind_taught] == [s.response for s in taught]  # same teacher
    assert [s.response for s in biased_plain] == [s.response for s in plain]  # same start
    # blind: plain rows warn at BLIND_WARN_RATE, as often on safe images as on hazard ones
    warns = np.array([task.is_warning(s.response) for s in blind_plain])
    hazard = np.array([s.meta["hazard"] for s in blind_plain])
    assert abs(warns.mean() - task.BLIND_WARN_RATE) < 0.12
    assert abs(warns[hazard].mean() - warns[~hazard].mean()) < 0.25
    # biased: every constitution row warns, hazard or not
    assert all(task.is_warning(s.response) for s in biased_taught)
    assert any(not s.meta["hazard"] for s in biased_taught)
    with pytest.raises(ValueError, match="start='blnd'"):
        task.write_split(examples[:2], tmp_path / "bad", "train", start="blnd")
