"""caspo_jax.files.read_structured: each failure names the file and what was expected."""

import pytest

from caspo_jax.files import read_structured


class OwnError(ValueError):
    pass


def test_reads_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\ny: [2, 3]\n")
    (tmp_path / "b.json").write_text('[{"k": 1}]')
    assert read_structured(tmp_path / "a.yaml", dict, what="w", expected="e") == {"x": 1, "y": [2, 3]}
    assert read_structured(tmp_path / "b.json", list, what="w", expected="e") == [{"k": 1}]


def test_empty_yaml_takes_the_default(tmp_path):
    (tmp_path / "e.yaml").write_text("")
    assert read_structured(tmp_path / "e.yaml", dict, what="w", expected="e", empty={}) == {}
    with pytest.raises(ValueError, match="expected a mapping, got NoneType"):
        read_structured(tmp_path / "e.yaml", dict, what="w", expected="a mapping")


@pytest.mark.parametrize("name, text, error, message", [
    ("missing.yaml", None, OwnError, "missing.yaml: config file not found"),
    ("bad.yaml", "a: [b", OwnError, "bad.yaml: not valid YAML"),
    ("bad.json", "{'single': 1}", OwnError, "bad.json: not valid JSON"),
    ("list.yaml", "- 1\n- 2\n", OwnError, "list.yaml: expected a mapping of sections, got list"),
    ("missing.json", None, ValueError, "missing.json: config file not found"),
])
def test_errors_name_the_file(tmp_path, name, text, error, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    expected_type = FileNotFoundError if (text is None and error is ValueError) else error
    with pytest.raises(expected_type, match=message):
        read_structured(tmp_path / name, dict, what="config file", expected="a mapping of sections", error=error)
