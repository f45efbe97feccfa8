"""Judge functions for the runner: R/S/E (OOD-MMSafe), SIUO safe/effective, MSSBench class.

Each takes ``(judge, [(item, response)])`` and returns one plain dict per pair:
``{"ok", "error", "verdict", "usage", "cached", "temperature_applied"}``. A failed or
unparseable judgement is ``ok=False`` with the reason; callers never turn it into a score.
Judges run at the client's temperature (0 by default); when an endpoint rejects
``temperature`` the client re-sends without it and ``temperature_applied`` is False.
"""

from __future__ import annotations

from typing import Any

from caspo_jax.evals import mssbench, siuo
from caspo_jax.evals.runner import Judge, WorkItem
from caspo_jax.llm.client import ChatRequest
from caspo_jax.llm.replies import ReplyParseError
from caspo_jax.rubric.rse import RSEItem, judge_rse


def _usage_dict(u) -> dict[str, int]:
    return {"prompt_tokens": int(u.prompt_tokens), "completion_tokens": int(u.completion_tokens)}


def _client_temperature_applied(client) -> bool | None:
    # RSEJudgement does not carry ChatResult.temperature_applied (noted in the report);
    # the client's own fallback flag says whether temperature is still being sent.
    if getattr(client.config, "temperature", None) is None:
        return None
    return not getattr(client, "_omit_temperature", False)


def rse_judge_fn(judge: Judge, pairs: list[tuple[WorkItem, str]]) -> list[dict[str, Any]]:
    """R/S/E scores via ``caspo_jax.rubric.rse.judge_rse`` (one repair round built in)."""
    items = [
        RSEItem(
            query=it.meta.get("query_shown", it.prompt.text),
            response=resp,
            images=tuple(it.prompt.images),
            category=it.meta.get("category"),
            hazard_reference=it.meta.get("reference"),
        )
        for it, resp in pairs
    ]
    outs = judge_rse(judge.client, items, progress=f"judge {judge.name}")
    temp = _client_temperature_applied(judge.client)
    res = []
    for j in outs:
        verdict = None
        if j.ok and j.score is not None:
            verdict = {"risk": j.score.risk, "safety": j.score.safety, "effectiveness": j.score.effectiveness,
                       "reasons": dict(j.score.reasons)}
        res.append({
            "ok": bool(j.ok), "error": j.error, "verdict": verdict, "usage": _usage_dict(j.usage),
            "cached": bool(getattr(j, "cached", False)),
            "temperature_applied": getattr(j, "temperature_applied", temp),
        })
    return res


def _chat_judge(judge: Judge, messages_list, namespace: str, parse) -> list[dict[str, Any]]:
    # only verdicts that parse are cached, so a rerun re-asks exactly the failed items
    reqs = [ChatRequest(m, json_mode=True, cache_namespace=namespace, validate=parse) for m in messages_list]
    results = judge.client.complete_many(reqs, progress=f"judge {judge.name}")
    out = []
    for r in results:
        rec = {"ok": False, "error": None, "verdict": None, "usage": _usage_dict(r.usage), "cached": bool(r.cached),
               "temperature_applied": r.temperature_applied if judge.client.config.temperature is not None else None}
        if not r.ok:
            rec["error"] = f"judge request failed: {r.error}"
        else:
            try:
                rec["verdict"] = parse(r.text)
                rec["ok"] = True
            except ReplyParseError as e:
                rec["error"] = f"unparseable verdict: {e}"
        out.append(rec)
    return out


def siuo_judge_fn(judge: Judge, pairs: list[tuple[WorkItem, str]]) -> list[dict[str, Any]]:
    def parse(text):
        safe, eff = siuo.parse_siuo_verdict(text)
        return {"safe": safe, "effective": eff}

    msgs = [siuo.siuo_judge_messages(siuo.SIUOItem(**it.meta["siuo_item"]), resp) for it, resp in pairs]
    return _chat_judge(judge, msgs, siuo.SIUO_PROMPT_VERSION, parse)


def mss_judge_fn(judge: Judge, pairs: list[tuple[WorkItem, str]]) -> list[dict[str, Any]]:
    msgs = [mssbench.mss_judge_messages(mssbench.MSSPair(**it.meta["mss_pair"]), resp) for it, resp in pairs]
    return _chat_judge(judge, msgs, mssbench.MSS_PROMPT_VERSION, lambda t: {"class": mssbench.parse_mss_class(t)})
