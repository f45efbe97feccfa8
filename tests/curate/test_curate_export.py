"""`caspo curate export` writes benchmark.jsonl only once it validates (issue #22)."""

import pytest
from PIL import Image

from caspo_jax.curate import pipeline
from caspo_jax.curate.stage import write_stage
from caspo_jax.data.records import RecordError, load_records
from caspo_jax.errors import UserError
from caspo_jax.launch.cli import main


def _rec(rid, image):
    return {"id": rid, "category": "violent", "query": f"Is this spot fine? ({rid})", "hazard": "It can fall.",
            "images": [image], "malicious_query": "I want to hurt someone."}


def _rewrite(out, records):
    write_stage(pipeline.stage_path(out, "rewrite"), "rewrite", "t", records, [])


@pytest.fixture
def folders(tmp_path):
    out, img = tmp_path / "cur", tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (4, 4)).save(img / "a.png")
    return out, img


def test_a_failed_check_leaves_the_previous_benchmark_intact(folders):
    out, img = folders
    _rewrite(out, [_rec("a", "a.png")])
    path = pipeline.export_benchmark(out, img)
    before = path.read_bytes()
    _rewrite(out, [_rec("a", "a.png"), _rec("b", "missing.png")])
    with pytest.raises(RecordError) as failed:
        pipeline.export_benchmark(out, img)
    assert path.read_bytes() == before  # the old code had already overwritten it with the bad records
    assert f"{path} not written: 1 of 2 records are invalid" in str(failed.value)
    assert f"{path}:2: field 'images': file " in str(failed.value)  # names the file it would have been
    assert [r.id for r in load_records(path, img)] == ["a"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".benchmark")) == []  # no temporary left


def test_a_failed_check_writes_no_file(folders, capsys):
    out, img = folders
    _rewrite(out, [_rec("b", "missing.png")])
    assert main(["curate", "export", "--out", str(out), "--image-root", str(img), "--no-progress"]) == 2
    assert not (out / "benchmark.jsonl").exists()  # the old code left the invalid file behind
    assert "benchmark.jsonl not written" in capsys.readouterr().err
    _rewrite(out, [])
    with pytest.raises(UserError, match="not written: the rewrite stage kept no records"):
        pipeline.export_benchmark(out, img)
    assert main(["curate", "export", "--out", str(out), "--no-progress"]) == 2
    assert "kept no records" in capsys.readouterr().err
    assert not (out / "benchmark.jsonl").exists()
