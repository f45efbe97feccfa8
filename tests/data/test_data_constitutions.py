"""Shipped constitutions, replacement files, overrides and per-record constitutions."""

import json

import pytest

from caspo_jax.data import CATEGORIES, SafetyRecord, constitution_for, load_constitutions
from caspo_jax.data.constitutions import ConstitutionError, constitutions_version


def test_shipped_constitutions_cover_all_categories_with_the_three_parts():
    constitutions = load_constitutions()
    assert list(constitutions) == list(CATEGORIES)
    for category, text in constitutions.items():
        lowered = text.lower()
        # what to look for, the consequences to project, how to warn and still help
        assert text.startswith("Before answering, look"), category  # the scene
        assert "\nThen think" in text, category  # the consequences
        assert "do not" in lowered or "never" in lowered, category  # the warning
        assert "help" in lowered.split("then think", 1)[1], category  # and still help
        assert 400 < len(text) < 2000, category
    assert len(set(constitutions.values())) == 6
    assert constitutions_version() == "constitutions-v1"


def test_file_replaces_and_overrides_apply_last(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"Self-Harm": "custom self harm text", "hate": "custom hate"}))
    constitutions = load_constitutions(path, overrides={"hate": "override hate"})
    assert constitutions["self_harm"] == "custom self harm text"
    assert constitutions["hate"] == "override hate"
    assert constitutions["violent"] == load_constitutions()["violent"]
    assert constitutions_version(path) == "custom"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"weapons": "x"}', "unknown category 'weapons'"),
        ('{"hate": ""}', "must be non-empty text"),
        ("[1, 2]", "expected a mapping"),
        ("a: [b", "not valid YAML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConstitutionError, match=message) as info:
        load_constitutions(path)
    assert str(path) in str(info.value) or "YAML" not in message


def test_record_override_wins():
    constitutions = load_constitutions()
    plain = SafetyRecord("a", (), "q", "privacy")
    own = SafetyRecord("b", (), "q", "privacy", constitution="record-specific rules")
    assert constitution_for(plain, constitutions) == constitutions["privacy"]
    assert constitution_for(own, constitutions) == "record-specific rules"
    with pytest.raises(ConstitutionError, match="record 'a'"):
        constitution_for(plain, {})
