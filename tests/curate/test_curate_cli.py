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
from caspo_jax.tiny.openai_stub import OpenAIStub, slow


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


def test_every_stage_through_the_cli(tmp_path, capsys):
    from PIL import Image

    out, img = tmp_path / "cur", tmp_path / "img"
    state = W.new_state()
    state["broken"] = False
    with OpenAIStub(responder=W.make_responder(state)) as stub:
        spec = lambda n: f"name={n},model={n},base_url={stub.base_url},price_in=0.5,price_out=1.5"  # noqa: E731
        common = ["--out", str(out), "--no-progress", "--max-retries", "0"]
        assert main(["curate", "synthesize", *common, "--model", spec("alpha"), "--model", spec("beta"),
                     "--categories", "violent", "--per-call", "2", "--temperature", "0.7"]) == 0
        assert main(["curate", "filter", *common, "--judge", spec("judge"), "--min-risk-clarity", "3"]) == 0
        assert main(["curate", "dedup", *common, "--dedup-fields", "query,hazard"]) == 0
        assert "removed 1 in 1 clusters" in capsys.readouterr().out
        img.mkdir()
        for rec in kept_records(pipeline.stage_path(out, "dedup")):
            Image.new("RGB", (4, 4)).save(img / f"{rec['id']}.png")
        assert main(["curate", "images", *common, "--image-root", str(img)]) == 0
        assert main(["curate", "rewrite", *common, "--judge", spec("judge"), "--no-json-mode"]) == 0
        assert main(["curate", "export", *common, "--image-root", str(img)]) == 0
        assert main(["curate", "respond", *common, "--image-root", str(img), "--model", spec("alpha"),
                     "--model", spec("beta"), "--judge", spec("judge"), "--samples", "2", "--max-new-tokens", "64"]) == 0
        assert main(["curate", "select", *common, "--pair-prob", "1.0", "--seed", "3", "--rm-balance", "none"]) == 0
        printed = capsys.readouterr().out
        # the default RM pool, balanced by model and length: SAFE answers have 14 words, UNSAFE 7 ->
        # quartile edges [12, 14]; cells alpha/long 20, beta/short 10, beta/long 10 -> 10 per cell, 30 kept;
        # every record keeps its 2 UNSAFE and >= 2 beta SAFE answers, so still 10 pairs and 30 - 20 = 10 MSE
        assert main(["curate", "select", *common, "--pair-prob", "1.0", "--seed", "3"]) == 0
        balanced = capsys.readouterr().out
        assert ("sft 5, pairs 10, mse 10, no SFT target 0; RM pool balanced by model and length "
                "(word edges [12, 14], <= 10 per cell): kept 30 of 40 responses") in balanced
        # DPO pairs: disparity keeps one gap-5 pair per record; every pair prefers the longer (SAFE)
        # answer, so the length-balanced mode finds none and writes nothing
        assert main(["curate", "dpo", *common, "--dpo-mode", "disparity", "--seed", "3"]) == 0
        assert "dpo_disparity.jsonl: 5 pairs (disparity); chosen longer 5, shorter 0, even 0" in capsys.readouterr().out
        assert main(["curate", "dpo", *common, "--dpo-mode", "length-balanced"]) == 2
        assert "dpo_length_balanced.jsonl not written: no length-balanced pair" in capsys.readouterr().err
        assert not (out / "dpo_length_balanced.jsonl").exists()
    rewrite_bodies = [r.body for r in stub.chat_requests if "You edit" in r.body["messages"][0]["content"]]
    assert rewrite_bodies and all("response_format" not in b for b in rewrite_bodies)  # --no-json-mode
    synth_bodies = [r.body for r in stub.chat_requests if "You design" in r.body["messages"][0]["content"]]
    assert all(b["response_format"] == {"type": "json_object"} for b in synth_bodies)
    assert synth_bodies and all(b["temperature"] == 0.7 for b in synth_bodies)
    gen = [r.body for r in stub.chat_requests if r.body["model"] in ("alpha", "beta")
           and "You design" not in r.body["messages"][0]["content"]]
    assert gen and all(b["max_tokens"] == 64 for b in gen)
    # 5 records x 2 models x 2 modes x 2 samples = 40 responses; per record 2 UNSAFE (total 1) pair with
    # 2 of the 6 SAFE (total 6): gap 5 > 4, p = 1 -> 10 pairs, the other 20 responses are MSE records
    assert "sft 5, pairs 10, mse 20" in printed
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == {"sft": 5, "pairs": 10, "mse": 10, "dpo_disparity": 5, "benchmark": 5}
    assert set(summary["spent"]) == {"alpha", "beta", "judge"}
    t = summary["spent"]["alpha"]
    assert t["cost"] == t["prompt_tokens"] / 1000 * 0.5 + t["completion_tokens"] / 1000 * 1.5
    assert json.loads((out / "prices.json").read_text())["judge"] == [0.5, 1.5]
