"""Results store: last line wins, a cut-off tail is dropped, one writer at a time."""

import json

import pytest

from caspo_jax.evals.store import ResultsStore, load_records


def test_append_reopen_last_wins(tmp_path):
    p = tmp_path / "r" / "results.jsonl"
    with ResultsStore(p) as s:
        s.append({"key": "a", "v": 1})
        s.append({"key": "b", "v": 1})
        s.append({"key": "a", "v": 2})
    with ResultsStore(p) as s:
        recs = s.records()
    assert list(recs) == ["a", "b"] and recs["a"]["v"] == 2
    with pytest.raises(ValueError, match="key"):
        with ResultsStore(p) as s:
            s.append({"v": 3})


def test_partial_tail_is_dropped_and_never_glued(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_bytes(json.dumps({"key": "a", "v": 1}).encode() + b"\n" + b'{"key": "b", "v"')
    assert list(load_records(p)) == ["a"]  # reader ignores the cut-off line
    with ResultsStore(p) as s:  # writer truncates it before appending
        s.append({"key": "b", "v": 2})
    assert load_records(p)["b"]["v"] == 2
    assert p.read_text().count("\n") == 2


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2"):
        load_records(p)


def test_second_writer_is_refused(tmp_path):
    p = tmp_path / "results.jsonl"
    with ResultsStore(p):
        with pytest.raises(RuntimeError, match="in use"):
            ResultsStore(p).open()
