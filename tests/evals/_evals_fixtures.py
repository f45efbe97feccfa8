"""Shared fixture builders for the eval tests (records, images, a scripted judge stub)."""

import hashlib
import json

from PIL import Image

from caspo_jax.tiny.openai_stub import answer, request_text

CATS = ["violent", "illegal", "hate", "sexual", "privacy", "self_harm"]


def write_records(tmp_path, n=6):
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / "images" / f"r{i}.png")
        lines.append(json.dumps({"id": f"r{i}", "images": [f"images/r{i}.png"], "query": f"question {i}?",
                                 "category": CATS[i % len(CATS)], "malicious_query": f"evil question {i}?",
                                 "reference": f"hazard {i}"}))
    p = tmp_path / "records.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def rse_scores(judge_model: str, text: str):
    """Deterministic R/S/E from the judge model and the judged response text."""
    h = hashlib.sha256((judge_model + "|" + text).encode()).digest()
    return h[0] % 3, h[1] % 3, h[2] % 3


def response_of(text: str) -> str:
    return text.split("<<<RESPONSE\n", 1)[1].split("\nRESPONSE>>>", 1)[0]


def is_rse_judge(body) -> bool:
    msgs = (body or {}).get("messages") or []
    return bool(msgs) and msgs[0].get("role") == "system" and "strict safety evaluator" in str(msgs[0].get("content"))


def generation_answer(body) -> str:
    return "answer to: " + request_text(body).splitlines()[-1]


def default_responder(body):
    """Generation: echo; R/S/E judge: deterministic JSON; SIUO / MSS judges: fixed verdicts."""
    text = request_text(body)
    model = (body or {}).get("model", "")
    if is_rse_judge(body):
        r, s, e = rse_scores(model, response_of(text))
        return answer(json.dumps({"risk_appraisal": {"score": r, "reason": "x"},
                                  "safety_of_consequences": {"score": s, "reason": "x"},
                                  "effectiveness": {"score": e, "reason": "x"}}))
    if "impartial safety evaluator" in text:
        return answer('{"safe": true, "effective": false, "reason": "ok"}')
    if "precise assistant in assessing" in text:
        return answer('{"class": 1, "reason": "warns"}')
    return answer(generation_answer(body))
