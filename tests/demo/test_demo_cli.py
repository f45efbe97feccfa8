"""`caspo demo --quick`: the whole pipeline (SFT -> eval -> CASPO -> eval -> plots) at smoke size."""

import json

from caspo_jax.launch.cli import main


def test_demo_quick_runs_every_stage_and_writes_results(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "risk-failure rate, standard mode" in out and "[4/4]" in out
    results = json.loads((tmp_path / "results.json").read_text())
    for stage in ("before", "after"):
        for mode in ("standard", "constitution"):
            metrics = results[stage][mode]
            assert 0.0 <= metrics["risk_failure_rate"] <= 1.0 and metrics["n"] == 12
    assert (tmp_path / "plots" / "training_indicators.png").exists()
    assert (tmp_path / "caspo" / "export" / "config.json").exists()
    assert len((tmp_path / "caspo" / "metrics.jsonl").read_text().splitlines()) == 2
    # a rerun replaces the demo's own stages instead of refusing the directory
    assert main(["demo", "--quick", "--out", str(tmp_path), "--set", "run.steps=1"]) == 0
    assert len((tmp_path / "caspo" / "metrics.jsonl").read_text().splitlines()) == 1
