"""`caspo eval` when inputs are bad and services fail (issue #22), run in-process against the
HTTP stub: what is cached, what is retried, what one bad item does to the run, exit codes."""

import json

import _evals_fixtures as F
from caspo_jax.evals.store import load_records
from caspo_jax.launch import cli
from caspo_jax.tiny.openai_stub import OpenAIStub, answer, request_text, server_error

# what `vllm serve --max-model-len 512` answers when prompt + max_tokens do not fit
VLLM_CONTEXT_400 = ("This model's maximum context length is 512 tokens. However, you requested 4110 tokens "
                    "(14 in the messages, 4096 in the completion). Please reduce the length of the messages "
                    "or completion.")


def _args(stub, tmp_path, out, *extra):
    return ["eval", "--records", str(tmp_path / "records.jsonl"), "--out", str(out), "--base-url", stub.base_url,
            "--model", "policy", "--max-retries", "1", "--backoff", "0.01", "--timeout", "10",
            "--judge", f"name=ja,model=judge-ja,base_url={stub.base_url}", *extra]


def _split(stub):
    gens = [r for r in stub.chat_requests if not F.is_rse_judge(r.body)]
    return gens, [r for r in stub.chat_requests if F.is_rse_judge(r.body)]


def test_malformed_verdict_is_never_cached_and_a_rerun_reasks_exactly_it(tmp_path, capsys):
    F.write_records(tmp_path, n=3)
    out, cache = tmp_path / "run", tmp_path / "cache"

    def broken_judge(body):  # r1's verdict (and its repair) is not JSON
        if F.is_rse_judge(body) and "question 1?" in request_text(body):
            return answer("I think it is fine.")
        return F.default_responder(body)

    with OpenAIStub(responder=broken_judge) as stub:
        assert cli.main(_args(stub, tmp_path, out, "--cache-dir", str(cache), "--no-progress")) == 0
    assert "1 failed" in capsys.readouterr().err
    recs = load_records(out / "results.jsonl")
    assert recs["ood/standard/r1/0"]["status"] == "failed"
    assert "unparseable" in recs["ood/standard/r1/0"]["judges"]["ja"]["error"]
    with OpenAIStub(responder=F.default_responder) as stub:  # healthy judge, same cache
        assert cli.main(_args(stub, tmp_path, out, "--cache-dir", str(cache), "--no-progress")) == 0
        gens, judged = _split(stub)
    assert gens == []  # r1's response was kept
    assert len(judged) == 1 and "question 1?" in request_text(judged[0].body)  # r1 only, asked afresh
    recs = load_records(out / "results.jsonl")
    assert all(r["status"] == "done" for r in recs.values())
    resp = recs["ood/standard/r1/0"]["response"]
    assert tuple(recs["ood/standard/r1/0"]["judges"]["ja"]["verdict"][k] for k in
                 ("risk", "safety", "effectiveness")) == F.rse_scores("judge-ja", resp)


def test_every_generation_rejected_exits_1_and_names_the_fix(tmp_path, capsys):
    F.write_records(tmp_path, n=2)
    out = tmp_path / "run"

    def small_context(body):
        return F.default_responder(body) if F.is_rse_judge(body) else server_error(400, VLLM_CONTEXT_400)

    with OpenAIStub(responder=small_context) as stub:
        rc = cli.main(_args(stub, tmp_path, out, "--modes", "standard,caption", "--no-progress"))
        gens, judged = _split(stub)
    err = capsys.readouterr().err
    assert rc == 1
    assert len(gens) == 4 and judged == []  # a 400 is not retried
    last = err.strip().splitlines()[-1]
    assert last.startswith("caspo eval: all 4 items failed") and "(4x)" in last
    assert "maximum context length is 512" in last and "lower --max-new-tokens" in last and "(4096)" in last
    assert "a rerun repeats these errors" in err and "rerun the same command" not in err
    assert (out / "report.md").exists()
    recs = load_records(out / "results.jsonl")
    assert all("not retried" in r["generation_error"] for r in recs.values())


def test_one_unreadable_image_fails_its_item_and_the_rest_go_on(tmp_path, capsys):
    F.write_records(tmp_path, n=3)
    (tmp_path / "images" / "r1.png").write_bytes(b"this is not a png")
    out = tmp_path / "run"
    with OpenAIStub(responder=F.default_responder) as stub:
        assert cli.main(_args(stub, tmp_path, out, "--no-progress")) == 0
        gens, _ = _split(stub)
    assert "1 failed" in capsys.readouterr().err
    assert len(gens) == 2  # r1 was never sent
    recs = load_records(out / "results.jsonl")
    assert {k: r["status"] for k, r in recs.items()} == {
        "ood/standard/r0/0": "done", "ood/standard/r1/0": "failed", "ood/standard/r2/0": "done"}
    error = recs["ood/standard/r1/0"]["generation_error"]
    assert "r1.png" in error and "cannot decode image" in error


def test_no_progress_silences_the_http_clients_bars(tmp_path, capsys):
    F.write_records(tmp_path, n=2)
    with OpenAIStub(responder=F.default_responder) as stub:
        assert cli.main(_args(stub, tmp_path, tmp_path / "shown")) == 0
        shown = capsys.readouterr().err
        assert cli.main(_args(stub, tmp_path, tmp_path / "quiet", "--no-progress")) == 0
        quiet = capsys.readouterr().err
    assert "generate (policy)" in shown and "judge ja" in shown  # the bars exist without the flag
    assert "generate (policy)" not in quiet and "judge ja" not in quiet and "eval items" not in quiet
    assert "%|" not in quiet


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    F.write_records(tmp_path, n=1)
    with OpenAIStub(responder=F.default_responder) as stub:
        assert cli.main(_args(stub, tmp_path, tmp_path / "run", "--modes", "standard,spicy")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("caspo eval: --modes: unknown ['spicy']")
        assert cli.main(_args(stub, tmp_path, tmp_path / "run", "--judge", "name=jb,model=m")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--judge 'name=jb,model=m': missing base_url" in err
        # a bad records file: exit 2, the summary first, then the bad lines (up to 10)
        (tmp_path / "records.jsonl").write_text(json.dumps({"id": "x", "query": "q"}) + "\n")
        assert cli.main(_args(stub, tmp_path, tmp_path / "run")) == 2
        err = capsys.readouterr().err
        assert err.startswith("caspo eval: ") and "records.jsonl:1: field 'category'" in err
        assert stub.chat_requests == []


def test_siuo_malformed_verdict_is_reasked_on_rerun(tmp_path):
    """The SIUO / MSSBench judges (evals.judging._chat_judge) cache only verdicts that parse."""
    from PIL import Image

    (tmp_path / "siuo" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "siuo" / "images" / "1.png")
    (tmp_path / "siuo" / "siuo_gen.json").write_text(json.dumps([{
        "question_id": 1, "image": "1.png", "question": "siuo question 1", "category": "self-harm",
        "safety_warning": "w", "reference_answer": "r"}]))

    def args(stub):
        return ["eval", "--siuo", str(tmp_path / "siuo" / "siuo_gen.json"), "--siuo-samples", "1",
                "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--base-url", stub.base_url,
                "--model", "policy", "--max-retries", "0", "--no-progress",
                "--judge", f"name=ja,model=judge-ja,base_url={stub.base_url}"]

    def unparseable(body):
        return answer("safe, I guess") if "impartial safety evaluator" in request_text(body) else F.default_responder(body)

    with OpenAIStub(responder=unparseable) as stub:
        assert cli.main(args(stub)) == 1  # its only item failed
    with OpenAIStub(responder=F.default_responder) as stub:
        assert cli.main(args(stub)) == 0
        asked = [r for r in stub.chat_requests if "impartial safety evaluator" in request_text(r.body)]
    assert len(asked) == 1
    (rec,) = load_records(tmp_path / "run" / "results.jsonl").values()
    assert rec["status"] == "done" and rec["judges"]["ja"]["verdict"] == {"safe": True, "effective": False}
