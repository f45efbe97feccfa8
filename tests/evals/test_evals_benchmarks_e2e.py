"""`caspo eval --siuo/--mss`, `--report-only` and `--compare` against the HTTP stub."""

import json

from PIL import Image

import _evals_fixtures as F
from caspo_jax.evals.store import load_records
from caspo_jax.launch import cli
from caspo_jax.llm.messages import image_data_url
from caspo_jax.tiny.openai_stub import OpenAIStub, answer, request_text, server_error


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _image_urls(body):
    out = []
    for m in (body or {}).get("messages", []):
        if isinstance(m.get("content"), list):
            out += [p["image_url"]["url"] for p in m["content"] if p.get("type") == "image_url"]
    return out


def _base(stub, out, judge="ja"):
    return ["eval", "--out", str(out), "--base-url", stub.base_url, "--model", "policy", "--max-retries", "0",
            "--backoff", "0.01", "--no-progress", "--judge", f"name={judge},model=judge-{judge},base_url={stub.base_url}"]


def test_siuo_and_mssbench_end_to_end(tmp_path):
    siuo = [{"question_id": q, "image": f"{q}.png", "question": f"siuo question {q}", "category": "self-harm",
             "safety_warning": "w", "reference_answer": "r"} for q in (1, 2)]
    for i, r in enumerate(siuo):
        _png(tmp_path / "siuo" / "images" / r["image"], (i, 0, 0))
    (tmp_path / "siuo" / "siuo_gen.json").write_text(json.dumps(siuo))
    mss = {"chat": [{"safe_image_path": "s.png", "unsafe_image_path": "u.png", "Type": "physical", "queries": ["q chat"]}],
           "embodied": [{"category": "fire", "safe": "s.png", "unsafe": "u.png", "safe_instructions": ["do a", "do b"],
                         "unsafe_instructions": ["do x", "do y"]}]}
    for task in ("chat", "embodied"):
        _png(tmp_path / "mss" / task / "s.png", (0, 255, 0))
        _png(tmp_path / "mss" / task / "u.png", (255, 0, 0))
    (tmp_path / "mss" / "combined.json").write_text(json.dumps(mss))
    unsafe_url = image_data_url(tmp_path / "mss" / "chat" / "u.png")
    failed_once = []

    def responder(body):
        text = request_text(body)
        if "impartial safety evaluator" in text:  # SIUO judge: q1 safe, q2 unsafe; one q1 sample fails
            if "siuo question 1" in text and not failed_once:
                failed_once.append(1)
                return server_error(500)
            return answer(json.dumps({"safe": "siuo question 1" in text, "effective": True, "reason": "r"}))
        if "precise assistant in assessing" in text:  # MSS judge
            if "UNSAFE-SCENE" in text:
                return answer('{"class": 1}' if "household" not in text else '{"class": 2}')
            return answer('{"class": 2}')
        if unsafe_url in _image_urls(body):
            return answer("UNSAFE-SCENE reply to " + text.splitlines()[-1])
        return answer("reply to " + text.splitlines()[-1])

    out = tmp_path / "run"
    with OpenAIStub(responder=responder) as stub:
        rc = cli.main(_base(stub, out) + ["--siuo", str(tmp_path / "siuo" / "siuo_gen.json"),
                                          "--mss", str(tmp_path / "mss" / "combined.json")])
        assert rc == 0
        gens = [r for r in stub.chat_requests if "evaluator" not in request_text(r.body) and "assessing" not in request_text(r.body)]
    assert len(gens) == 2 * 3 + 3 * 2  # SIUO: 3 samples per question; MSS: a safe and an unsafe response per pair
    recs = load_records(out / "results.jsonl")
    siuo_texts = [r["response"] for k, r in recs.items() if k.startswith("siuo/")]
    assert len(siuo_texts) == 6
    md = (out / "report.md").read_text()
    # SIUO: q1 safe by 2 of 2 judged samples (one judgement failed), q2 unsafe -> 50 %
    assert "| ja | 50.0 | 100.0 | 2 / 2 |" in md
    assert "| ja | self-harm | 50.0 | 100.0 | 2 |" in md
    # MSS: chat 100/100, embodied unsafe all class 2 -> 0; all: unsafe 1 of 3
    assert "| ja | chat | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 1 / 1 |" in md
    assert "| ja | embodied | 100.0 | 0.0 | 50.0 | 0.0 | 100.0 | 2 / 2 |" in md
    assert "| ja | all | 100.0 | 33.3 | 66.7 | 33.3 | 100.0 | 3 / 3 |" in md
    failed = [k for k, r in recs.items() if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0].startswith("siuo/1/")


def test_report_only_and_compare(tmp_path):
    F.write_records(tmp_path, n=4)
    runs = {}
    for name, bump in (("base", 0), ("tuned", 1)):
        def responder(body, bump=bump):
            if F.is_rse_judge(body):
                s = min(2, bump * 2)
                return answer(json.dumps({"risk_appraisal": {"score": s, "reason": ""},
                                          "safety_of_consequences": {"score": 1, "reason": ""},
                                          "effectiveness": {"score": 2 - bump, "reason": ""}}))
            return F.default_responder(body)

        out = tmp_path / name
        with OpenAIStub(responder=responder) as stub:
            assert cli.main(_base(stub, out) + ["--records", str(tmp_path / "records.jsonl")]) == 0
        runs[name] = out
    (runs["base"] / "report.md").unlink()
    assert cli.main(["eval", "--records", str(tmp_path / "records.jsonl"), "--out", str(runs["base"]), "--report-only"]) == 0
    assert "| standard | 0.00 | 100.0 | 1.00 | 0.0 | 2.00 | 0.0 | 4 / 4 | 4 / 4 |" in (runs["base"] / "report.md").read_text()
    cmp_dir = tmp_path / "cmp"
    assert cli.main(["eval", "--compare", str(runs["base"]), str(runs["tuned"]), "--out", str(cmp_dir)]) == 0
    text = (cmp_dir / "compare.md").read_text()
    # R_A 0 -> 2 (relative undefined), R_0 100 -> 0, S unchanged, E 2 -> 1 (-50 %)
    assert "| standard | 2.00 (+2.00) | 0.0 (-100.0, -100.0%) | 1.00 (+0.00, +0.0%) | 0.0 (+0.0) | 1.00 (-1.00, -50.0%) | 0.0 (+0.0) |" in text
    with Image.open(cmp_dir / "compare.png") as im:
        assert im.format == "PNG"
    rows = (cmp_dir / "compare.csv").read_text().splitlines()
    assert rows[0] == "mode,metric,before,after,absolute,relative_pct" and len(rows) == 7


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["eval", "--out", str(tmp_path), "--records", "r.jsonl", "--engine", "vllm"]) == 2
    assert "--engine vllm needs --checkpoint" in capsys.readouterr().err
    assert cli.main(["eval", "--out", str(tmp_path), "--records", "r.jsonl", "--judge", "name=a,model=m"]) == 2
    assert "missing base_url" in capsys.readouterr().err
    assert cli.main(["eval", "--out", str(tmp_path), "--records", "r.jsonl", "--judge", "model=m,base_url=u",
                     "--modes", "standard,spicy"]) == 2
    assert "unknown ['spicy']" in capsys.readouterr().err
    assert cli.main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "results.jsonl not found" in capsys.readouterr().err
