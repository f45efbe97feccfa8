"""`caspo curate` as a user runs it: SIGKILL mid-stage and resume without duplicates; clear errors."""

import os
import signal
import subprocess
import sys
import time

import _curate_world as W
from caspo_jax.curate import pipeline
from caspo_jax.curate.stage import kept_records, rejections, write_stage
from caspo_jax.evals.store import iter_lines
from caspo_jax.launch.cli import main
from caspo_jax.testing.openai_stub import OpenAIStub, slow


def _scenarios():
    out = []
    for (sub, model), scs in W.SCENARIOS.items():
        for j, sc in enumerate(scs):
            if "hazard" in sc:
                out.append({"id": f"{sub}-{model}-{j}", "category": "violent", **sc})
    return out


def _cli(out, base_url, *extra):
    return [sys.executable, "-m", "caspo_jax.launch.cli", "curate", "filter", "--out", str(out),
            "--judge", f"name=judge,model=judge,base_url={base_url},price_in=1,price_out=2",
            "--chunk-size", "2", "--concurrency", "2", "--max-retries", "0", "--no-progress", *extra]


def test_sigkill_mid_filter_then_resume_has_no_duplicates(tmp_path):
    out = tmp_path / "cur"
    scenarios = _scenarios()
    write_stage(pipeline.stage_path(out, "synthesize"), "synthesize", "test", scenarios, [])
    state = W.new_state()
    inner = W.make_responder(state)
    delay = {"s": 0.25}
    with OpenAIStub(responder=lambda body: slow(delay["s"], inner(body))) as stub:
        env = {**os.environ, "OPENAI_API_KEY": ""}
        proc = subprocess.Popen(_cli(out, stub.base_url), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        path = pipeline.stage_path(out, "filter")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and sum(1 for _ in iter_lines(path)) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = {ln["key"] for ln in iter_lines(path)}
        assert 2 <= len(done_before) < len(scenarios), "the kill should land mid-run"
        with open(path, "ab") as f:  # a line cut off by the kill
            f.write(b'{"key": "filter/half-writ')
        requests_before = len(stub.chat_requests)
        delay["s"] = 0.0
        res = subprocess.run(_cli(out, stub.base_url), env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        isolation_asked = [r for r in stub.chat_requests[requests_before:]
                           if "You review questions" in r.body["messages"][0]["content"]]
        assert len(isolation_asked) <= len(scenarios) - len(done_before)  # finished units never re-asked
    keys = [ln["key"] for ln in iter_lines(path)]
    assert len(keys) == len(set(keys)) == len(scenarios)  # every unit exactly once, the cut line dropped
    kept, rejected = kept_records(path), rejections(path)
    assert len(kept) + len(rejected) == len(scenarios)
    assert len({r["id"] for r in kept} | {r["id"] for r in rejected}) == len(scenarios)
    assert "filter: benignness 1 < 4" in next(r["reason"] for r in rejected if "kill" in r["record"]["query"])
    md = (out / "summary.md").read_text()
    assert "| **filter** | all |" in md and "| judge |" in md


def test_cli_errors_name_the_fix(tmp_path, capsys):
    assert main(["curate", "filter", "--out", str(tmp_path), "--judge", "name=j,model=j,base_url=http://x/v1"]) == 2
    assert "no stage output yet; run the previous stage first" in capsys.readouterr().err
    write_stage(pipeline.stage_path(tmp_path, "synthesize"), "synthesize", "t", _scenarios()[:1], [])
    assert main(["curate", "filter", "--out", str(tmp_path)]) == 2
    assert "needs --judge name=..,model=..,base_url=.." in capsys.readouterr().err
    assert main(["curate", "filter", "--out", str(tmp_path), "--judge", "model=j"]) == 2
    assert "missing base_url" in capsys.readouterr().err
    assert main(["curate", "images", "--out", str(tmp_path)]) == 2
    assert "needs --image-root" in capsys.readouterr().err
    assert main(["curate", "report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.json").exists()
