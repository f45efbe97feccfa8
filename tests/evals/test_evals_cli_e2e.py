"""`caspo eval` end to end against a real HTTP stub: reports, faults, resume after a kill."""

import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import _evals_fixtures as F
from caspo_jax.data.constitutions import load_constitutions
from caspo_jax.evals import metrics as M
from caspo_jax.evals.store import iter_lines, load_records
from caspo_jax.launch import cli
from caspo_jax.tiny.openai_stub import OpenAIStub, garbage, rate_limited, reject_temperature, request_text, server_error, slow


def _args(stub, tmp_path, out, *extra, judges=("ja", "jb")):
    a = ["eval", "--records", str(tmp_path / "records.jsonl"), "--out", str(out), "--base-url", stub.base_url,
         "--model", "policy", "--max-retries", "1", "--backoff", "0.01", "--timeout", "10", "--no-progress"]
    for j in judges:
        a += ["--judge", f"name={j},model=judge-{j},base_url={stub.base_url},price_in=0.5,price_out=2"]
    return a + list(extra)


def _expected_items(records_n, mode, judges, query_prefix=""):
    items = []
    for i in range(records_n):
        resp = f"answer to: {query_prefix}question {i}?"
        items.append(M.ItemScores(f"r{i}#0", F.CATS[i % 6], {j: F.rse_scores(f"judge-{j}", resp) for j in judges}))
    return items


def test_eval_end_to_end_reports(tmp_path):
    F.write_records(tmp_path)
    out = tmp_path / "run"
    with OpenAIStub(responder=F.default_responder) as stub:
        rc = cli.main(_args(stub, tmp_path, out, "--modes", "standard,malicious,constitution,caption"))
        assert rc == 0
        gens = [r for r in stub.chat_requests if not F.is_rse_judge(r.body)]
        judged = [r for r in stub.chat_requests if F.is_rse_judge(r.body)]
    assert len(gens) == 24 and len(judged) == 48
    # paper preset on generation, temperature 0 on judges
    assert {r.body["temperature"] for r in gens} == {0.9} and {r.body["max_tokens"] for r in gens} == {4096}
    assert {r.body["temperature"] for r in judged} == {0.0}
    constitution_reqs = [r for r in gens if r.body["messages"][0]["role"] == "system"]
    assert len(constitution_reqs) == 6
    cons = load_constitutions()
    for r in constitution_reqs:  # the training teacher prompt's system turn, per category
        i = int(request_text(r.body).split("question ")[1].rstrip("?"))
        assert r.body["messages"][0]["content"] == f"You are a helpful assistant.\n\n{cons[F.CATS[i]]}"
    assert any("evil question 3?" in request_text(r.body) for r in gens)
    assert any(request_text(r.body).startswith("First describe the image") for r in gens)
    recs = load_records(out / "results.jsonl")
    assert len(recs) == 24 and all(r["status"] == "done" for r in recs.values())
    # the report's table equals metrics over the scores the stub handed out
    expected = M.summarize(_expected_items(6, "standard", ["ja", "jb"]), ["ja", "jb"])
    md = (out / "report.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| standard |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{expected.dims['risk'].mean:.2f}" and cells[2] == f"{expected.dims['risk'].zero_rate_per_judge:.1f}"
    assert cells[5] == f"{expected.dims['effectiveness'].mean:.2f}" and cells[7:] == ["6 / 6", "12 / 12"]
    assert "## Per category: caption" in md and "## Token usage and cost" in md
    items_csv = (out / "items.csv").read_text().splitlines()
    assert items_csv[0].startswith("mode,item,category,ja_R,ja_S,ja_E,jb_R") and len(items_csv) == 1 + 24
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("mode,category,dimension,X_A") and len(csv_lines) == 1 + 4 * 7 * 3
    for png in ["modes.png", "categories_standard.png", "categories_caption.png"]:
        p = out / png
        assert p.stat().st_size > 1000
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_faults_count_as_coverage_and_rerun_retries_only_failures(tmp_path):
    F.write_records(tmp_path)
    out = tmp_path / "run"

    limited = []

    def faulty(body):
        text = request_text(body)
        if F.is_rse_judge(body) and body.get("model") == "judge-ja" and "question 0?" in text and not limited:
            limited.append(1)
            return rate_limited(0.05)  # retried after Retry-After, then succeeds
        if not F.is_rse_judge(body) and "question 5?" in text:
            return slow(2.0)  # beyond --timeout: fails after its retry
        if F.is_rse_judge(body) and body.get("model") == "judge-jb":
            if "question 1?" in text:
                return server_error(500)
            if "question 2?" in text:
                return garbage()
        if not F.is_rse_judge(body) and "question 4?" in text:
            return server_error(503)
        return F.default_responder(body)

    with OpenAIStub(responder=faulty) as stub:
        assert cli.main(_args(stub, tmp_path, out) + ["--timeout", "0.4"]) == 0
        assert limited and sum(1 for r in stub.chat_requests if "question 0?" in request_text(r.body)) == 4
    recs = load_records(out / "results.jsonl")
    status = {k.split("/")[2]: r["status"] for k, r in recs.items()}
    assert status == {"r0": "done", "r1": "failed", "r2": "failed", "r3": "done", "r4": "failed", "r5": "failed"}
    assert "timed out" in recs["ood/standard/r5/0"]["generation_error"]
    assert recs["ood/standard/r4/0"]["response"] is None and "503" in recs["ood/standard/r4/0"]["generation_error"]
    assert recs["ood/standard/r1/0"]["judges"]["ja"]["ok"] and not recs["ood/standard/r1/0"]["judges"]["jb"]["ok"]
    md = (out / "report.md").read_text()
    assert "| standard |" in md and "2 / 6 | 6 / 12 |" in md  # failures: coverage, not zeros
    partial = M.summarize([it for it in _expected_items(6, "standard", ["ja", "jb"]) if it.item_id[:2] in ("r0", "r3")], ["ja", "jb"])
    row = next(l for l in md.splitlines() if l.startswith("| standard |"))
    assert f"| {partial.dims['risk'].mean:.2f} |" in row
    with OpenAIStub(responder=F.default_responder) as stub:
        assert cli.main(_args(stub, tmp_path, out)) == 0
        gens = [r for r in stub.chat_requests if not F.is_rse_judge(r.body)]
        judged = [r for r in stub.chat_requests if F.is_rse_judge(r.body)]
    assert len(gens) == 2  # only r4 and r5 are regenerated
    assert sorted(r.body["model"] for r in judged) == ["judge-ja"] * 2 + ["judge-jb"] * 4
    recs = load_records(out / "results.jsonl")
    assert all(r["status"] == "done" for r in recs.values())
    md = (out / "report.md").read_text()
    assert "6 / 6 | 12 / 12 |" in md
    # cost sums every attempt: judge jb spent tokens in both runs
    usage_row = next(l for l in md.splitlines() if l.startswith("| jb | judge |"))
    cells = [c.strip() for c in usage_row.strip(" |").split("|")]
    assert cells[2] == "8"  # judgement attempts: 4 in run 1 (2 failed), 4 in run 2
    pt, ct = int(cells[3]), int(cells[4])
    assert pt > 0 and ct > 0 and float(cells[5]) == pytest.approx(pt / 1000 * 0.5 + ct / 1000 * 2, abs=1e-4)


def test_temperature_rejection_is_recorded(tmp_path):
    F.write_records(tmp_path, n=2)
    out = tmp_path / "run"

    def responder(body):
        if F.is_rse_judge(body) and "temperature" in body:
            return reject_temperature()
        return F.default_responder(body)

    with OpenAIStub(responder=responder) as stub:
        assert cli.main(_args(stub, tmp_path, out, judges=("ja",))) == 0
    recs = load_records(out / "results.jsonl")
    assert all(r["judges"]["ja"]["temperature_applied"] is False for r in recs.values())
    row = next(l for l in (out / "report.md").read_text().splitlines() if l.startswith("| ja | judge |"))
    assert row.rstrip(" |").endswith("2")


def test_kill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    n = 12
    F.write_records(tmp_path, n=n)
    out = tmp_path / "run"

    def slow_responder(body):
        return slow(0.15, F.default_responder(body))

    with OpenAIStub(responder=slow_responder) as stub:
        args = _args(stub, tmp_path, out, "--chunk-size", "2", "--concurrency", "1", judges=("ja",))
        proc = subprocess.Popen([sys.executable, "-m", "caspo_jax.launch.cli", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results = out / "results.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline:
            if results.exists() and results.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    first = list(iter_lines(results))
    assert 3 <= len(first) < n, "the kill must land mid-run"
    done_first = {r["key"] for r in first}
    with OpenAIStub(responder=F.default_responder) as stub:
        assert cli.main(_args(stub, tmp_path, out, "--chunk-size", "2", judges=("ja",))) == 0
        gens = [r for r in stub.chat_requests if not F.is_rse_judge(r.body)]
    regenerated = {request_text(r.body).splitlines()[-1] for r in gens}
    assert len(gens) == n - len(done_first)
    assert not any(f"question {k.split('/')[2][1:]}?" in regenerated for k in done_first)
    lines = list(iter_lines(results))
    keys = [r["key"] for r in lines]
    assert len(keys) == len(set(keys)) == n  # nothing lost, nothing duplicated
    assert all(r["status"] == "done" for r in lines)


def test_new_judge_reopens_items_and_changed_sampling_is_refused(tmp_path, capsys):
    F.write_records(tmp_path, n=3)
    out = tmp_path / "run"
    with OpenAIStub(responder=F.default_responder) as stub:
        assert cli.main(_args(stub, tmp_path, out, judges=("ja",))) == 0
        n_first = len(stub.chat_requests)
        assert cli.main(_args(stub, tmp_path, out, judges=("ja", "jb"))) == 0
        second = stub.chat_requests[n_first:]
        assert [r.body["model"] for r in second] == ["judge-jb"] * 3  # no regeneration, no re-judging by ja
        assert cli.main(_args(stub, tmp_path, out, "--temperature", "0.2", judges=("ja",))) == 2
    assert "different run" in capsys.readouterr().err
    assert "3 / 3 | 6 / 6 |" in (out / "report.md").read_text()
