"""BeaverTails-V and SPA-VL importers on small fixture exports written by the tests."""

import json

import pytest
from PIL import Image

from caspo_jax.data import RecordError, load_records
from caspo_jax.data.formats import load_pairs, load_sft_examples
from caspo_jax.data.importers import import_beavertails_v, import_spa_vl, map_category, write_jsonl


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    return tmp_path


def write_rows(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_category_mapping():
    assert map_category("dangerous_behavior") == "violent"
    assert map_category("pornographic_content") == "sexual"
    assert map_category("psychological_harm_and_manipulation") == "self_harm"
    assert map_category("Privacy Violation") == "privacy"
    assert map_category("Discrimination/Stereotype/Injustice") == "hate"
    assert map_category("Financial Crime/Property Crime/Theft") == "illegal"
    assert map_category("Self-Harm") == "self_harm"
    assert map_category("something else") is None
    assert map_category("something else", {"Something Else": "hate"}) == "hate"
    with pytest.raises(ValueError, match="not one of"):
        map_category("x", {"x": "nope"})


def test_beavertails_v_pairs_singles_and_skips(root):
    rows = [
        {"question": "Q1", "image": {"path": "images/a.jpg"}, "category": "dangerous_behavior",
         "image_severity": 2, "response_1": "unsafe answer", "response_2": "safe answer",
         "is_response_1_safe": False, "is_response_2_safe": True, "safer_response_id": 2},
        {"question": "Q2", "image": "images/b.jpg", "category": "privacy_invasion",
         "response_0": "r0", "response_1": "r1", "is_response_0_safe": "true", "is_response_1_safe": "false"},
        {"question": "Q3", "image": "images/c.jpg", "category": "pornographic_content",
         "response": "fine", "is_response_safe": "true"},
        {"question": "Q4", "image": "images/c.jpg", "category": "hate_speech",
         "response_1": "x", "response_2": "y", "is_response_1_safe": True, "is_response_2_safe": True},
        {"question": "Q5", "image": "images/missing.jpg", "category": "violence"},
        {"question": "Q6", "image": "../escape.jpg", "category": "violence"},
        {"question": "", "image": "images/a.jpg"},
        "{broken json",
        {"question": "Q9", "image": "images/a.jpg", "category": "weird stuff", "response": "r", "is_response_safe": False},
    ]
    result = import_beavertails_v(write_rows(root / "btv.jsonl", rows), root)
    pairs = {p.query: p for p in result.pairs}
    assert (pairs["Q1"].chosen, pairs["Q1"].rejected) == ("safe answer", "unsafe answer")
    assert (pairs["Q2"].chosen, pairs["Q2"].rejected) == ("r0", "r1")  # from the safety labels
    assert pairs["Q1"].category == "violent" and pairs["Q2"].category == "privacy"
    assert pairs["Q1"].meta["image_severity"] == 2 and pairs["Q1"].meta["source_category"] == "dangerous_behavior"
    assert "Q4" not in pairs  # both safe, no safer id: not a pair, but both are SFT examples
    sft = sorted((e.query, e.response) for e in result.sft)
    assert sft == [("Q1", "safe answer"), ("Q2", "r0"), ("Q3", "fine"), ("Q4", "x"), ("Q4", "y")]
    assert sorted(r.query for r in result.prompts) == ["Q1", "Q2", "Q3", "Q4"]
    report = result.report
    assert report.rows == 9 and (report.pairs, report.sft, report.prompts) == (2, 5, 4)
    assert report.skipped["empty or missing 'question'"] == 1
    assert report.skipped["image path outside the image root"] == 1
    assert any("not found" in reason for reason in report.skipped)
    assert any("not valid JSON" in reason for reason in report.skipped)
    assert report.skipped["no category maps to one of the six (prompt not kept for RL)"] == 1
    assert any("btv.jsonl:9" in m for m in report.messages)


def test_spa_vl_pairs_and_round_trip_through_the_record_loader(root):
    rows = [
        {"question": "S1", "image": {"path": "images/a.jpg"}, "chosen": "good", "rejected": "bad",
         "image_name": "ignored.jpg"},
        {"question": "S2", "image_name": "images/b.jpg", "chosen": "good2", "rejected": "bad2",
         "class1": "Representation & Toxicity Harms", "class2": "Toxic", "class3": "hate_speech"},
        {"question": "S3", "image_name": "images/c.jpg", "class1": "Malicious Use", "class2": "Illegal activities"},
    ]
    path = root / "spa.json"
    path.write_text(json.dumps(rows))
    result = import_spa_vl(path, root)
    assert [(p.query, p.chosen, p.rejected) for p in result.pairs] == [("S1", "good", "bad"), ("S2", "good2", "bad2")]
    assert [e.response for e in result.sft] == ["good", "good2"]
    assert [(r.query, r.category) for r in result.prompts] == [("S2", "hate"), ("S3", "illegal")]
    with_default = import_spa_vl(path, root, default_category="privacy")
    assert [r.category for r in with_default.prompts] == ["privacy", "hate", "illegal"]
    # RL prompts written in our JSONL format load back with the validating loader
    out = root / "prompts.jsonl"
    assert write_jsonl(out, with_default.prompts, root=root) == 3
    loaded = load_records(out)
    assert [r.query for r in loaded] == ["S1", "S2", "S3"]
    assert loaded[1].images == with_default.prompts[1].images
    assert loaded[1].meta["source"] == "spavl"
    pairs_out = root / "pairs.jsonl"
    write_jsonl(pairs_out, result.pairs, root=root)
    first = json.loads(pairs_out.read_text().splitlines()[0])
    assert first["images"] == ["images/a.jpg"] and first["chosen"] == "good"
    with pytest.raises(ValueError, match="default_category"):
        import_spa_vl(path, root, default_category="nope")


def test_pairs_and_sft_formats_round_trip_and_validate(root):
    rows = [
        {"question": "P1", "image": "images/a.jpg", "category": "violence", "response_1": "bad",
         "response_2": "good", "safer_response_id": 2, "is_response_2_safe": True},
    ]
    result = import_beavertails_v(write_rows(root / "btv.jsonl", rows), root)
    write_jsonl(root / "pairs.jsonl", result.pairs, root=root)
    write_jsonl(root / "sft.jsonl", result.sft, root=root)
    pairs, sft = load_pairs(root / "pairs.jsonl"), load_sft_examples(root / "sft.jsonl")
    assert pairs == result.pairs and pairs[0].meta["source"] == "btv"
    assert sft == result.sft and sft[0].response == "good"
    bad = write_rows(root / "bad_pairs.jsonl", [
        {"id": "a", "images": [], "query": "q", "chosen": "same", "rejected": "same"},
    ])
    with pytest.raises(RecordError, match=r"bad_pairs.jsonl:1: fields 'chosen' and 'rejected' are identical"):
        load_pairs(bad)
    bad = write_rows(root / "bad_sft.jsonl", [
        {"id": "a", "images": [], "query": "q", "response": "r", "category": "gore"},
        {"id": "b", "images": ["../x.png"], "query": "q", "response": "r"},
        {"id": "c", "images": [], "query": "q"},
    ])
    with pytest.raises(RecordError) as info:
        load_sft_examples(bad)
    message = str(info.value)
    assert "bad_sft.jsonl:1: field 'category'" in message
    assert "bad_sft.jsonl:2: field 'images'" in message and "outside the root" in message
    assert "bad_sft.jsonl:3: field 'response' is missing" in message
