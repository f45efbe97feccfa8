"""SafetyRecord JSONL loading: every kind of bad record gets an error naming file, line, field."""

import json
import logging

import pytest
from PIL import Image

from caspo_jax.data import CATEGORIES, RecordError, load_records


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "img" / "a.png")
    return tmp_path


def good(i=0, **kw):
    row = {"id": f"r{i}", "images": ["img/a.png"], "query": "Can I dry my gloves here?",
           "category": "self_harm"}
    row.update(kw)
    return row


def test_loads_valid_records_with_optional_fields_and_meta(root):
    path = write_jsonl(root / "d.jsonl", [
        good(0, malicious_query="m", reference="hot stove", split="test", source="ood"),
        "",
        good(1, category="Self-Harm", images="img/a.png", constitution="be careful"),
        good(2, id=7, images=[], category="privacy"),
    ])
    records = load_records(path)
    assert [r.id for r in records] == ["r0", "r1", "7"]
    first = records[0]
    assert first.images == ((root / "img" / "a.png").resolve(),)
    assert (first.malicious_query, first.reference, first.split) == ("m", "hot stove", "test")
    assert first.meta == {"source": "ood"}
    assert records[1].category == "self_harm" and records[1].constitution == "be careful"
    assert records[2].images == () and records[2].category == "privacy"
    # to_json round-trips through the loader
    again = write_jsonl(root / "again.jsonl", [r.to_json(root) for r in records])
    assert load_records(again) == records
    assert set(CATEGORIES) == {"violent", "illegal", "hate", "sexual", "privacy", "self_harm"}


@pytest.mark.parametrize(
    "row, field, hint",
    [
        ("{not json", "not valid JSON", "column"),
        ("[1, 2]", "expected a JSON object", "list"),
        (good(id=""), "field 'id'", "unique string id"),
        ({k: v for k, v in good().items() if k != "query"}, "field 'query'", "user's request"),
        (good(query="   "), "field 'query'", "missing or empty"),
        (good(category="weapons"), "field 'category'", "self_harm"),
        (good(category=None), "field 'category'", "use one of"),
        (good(images=[3]), "field 'images'", "relative path strings"),
        (good(images=["img/missing.png"]), "field 'images'", "not found"),
        (good(images=["../outside.png"]), "field 'images'", "outside the root"),
        (good(images=["/etc/passwd"]), "field 'images'", "outside the root"),
        (good(reference=5), "field 'reference'", "must be a string"),
    ],
)
def test_each_bad_record_names_file_line_and_field(root, row, field, hint):
    path = write_jsonl(root / "bad.jsonl", [good(0), row])
    with pytest.raises(RecordError) as info:
        load_records(path)
    message = str(info.value)
    assert f"{path}:2:" in message and field in message and hint in message


def test_symlink_escaping_root_is_rejected(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "x.png"
    Image.new("RGB", (2, 2)).save(outside)
    (root / "img" / "link.png").symlink_to(outside)
    path = write_jsonl(root / "d.jsonl", [good(images=["img/link.png"])])
    with pytest.raises(RecordError, match="outside the root"):
        load_records(path)


def test_duplicate_ids_are_rejected(root):
    path = write_jsonl(root / "d.jsonl", [good(0), good(1), good(0)])
    with pytest.raises(RecordError, match=r"d.jsonl:3: field 'id' 'r0' repeats line 1"):
        load_records(path)


def test_missing_images_allowed_without_check(root):
    path = write_jsonl(root / "d.jsonl", [good(images=["img/later.png"])])
    assert load_records(path, check_images=False)[0].images[0].name == "later.png"


def test_bad_fraction_threshold_skips_with_warning(root, caplog):
    rows = [good(i) for i in range(9)] + [good(9, category="nope")]
    path = write_jsonl(root / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        records = load_records(path, max_bad_fraction=0.1)
    assert len(records) == 9 and "skipped 1 of 10" in caplog.text
    with pytest.raises(RecordError, match=r"1 of 10 records are invalid \(10.0% > max_bad_fraction 5.0%\)"):
        load_records(path, max_bad_fraction=0.05)


def test_explicit_root_and_empty_file(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("meta")
    path = write_jsonl(elsewhere / "d.jsonl", [good()])
    assert load_records(path, root=root)[0].images[0].parent.name == "img"
    empty = elsewhere / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(RecordError, match="no records"):
        load_records(empty)
    with pytest.raises(RecordError, match="file not found"):
        load_records(elsewhere / "nope.jsonl")


def test_json_errors_say_at_column_once(root):
    path = root / "unterminated.jsonl"
    path.write_text(json.dumps(good(0)) + '\n{"id": "x", "query": "no end')  # the last line has no newline
    with pytest.raises(RecordError) as err:
        load_records(path)
    message = str(err.value)
    assert "unterminated.jsonl:2: not valid JSON (Unterminated string starting at column 22)" in message
    assert "at at" not in message and "\n" not in message


def test_too_many_bad_lists_three_problems_and_the_fraction_that_tolerates_them():
    from caspo_jax.data.records import too_many_bad

    problems = [f"f.jsonl:{i}: bad" for i in range(1, 6)]
    assert too_many_bad("f.jsonl", problems, 100, 0.05, "records are invalid") is None  # 5% is within 5%
    message = too_many_bad("f.jsonl", problems, 80, 0.05, "records are invalid")
    assert message == ("f.jsonl: 5 of 80 records are invalid (6.2% > max_bad_fraction 5.0%): f.jsonl:1: bad | "
                       "f.jsonl:2: bad | f.jsonl:3: bad | ... 2 more; fix them, or let a run skip such records with "
                       "data.max_bad_fraction (--set data.max_bad_fraction=0.07)")
    every = too_many_bad("f.jsonl", problems[:1], 1, 0.0, "records are invalid")
    assert every.endswith("(100.0% > max_bad_fraction 0.0%): f.jsonl:1: bad; fix it")  # no knob can help
