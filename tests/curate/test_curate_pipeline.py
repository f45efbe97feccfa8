"""Every stage against the real HTTP stub: records flow through, rejections carry reasons,
failed units are redone on rerun (and only they), outputs load with the data pipeline's readers."""

import json

import pytest
from PIL import Image

import _curate_world as W
from caspo_jax.curate import pipeline
from caspo_jax.curate.filtering import filter_scenarios
from caspo_jax.curate.report import write_summary
from caspo_jax.curate.responses import respond
from caspo_jax.curate.rewrite import rewrite_queries
from caspo_jax.curate.stage import Endpoint, kept_records, rejections
from caspo_jax.curate.synthesis import synthesize
from caspo_jax.data.constitutions import load_constitutions
from caspo_jax.data.formats import load_pairs, load_sft_examples
from caspo_jax.data.records import load_records
from caspo_jax.evals.store import iter_lines
from caspo_jax.llm.client import ChatClient, ClientConfig
from caspo_jax.tiny.openai_stub import OpenAIStub

V = "violent-heights_and_falls"


def _ep(stub, name, tmp_path):
    return Endpoint(name, ChatClient(ClientConfig(
        base_url=stub.base_url, model=name, cache_dir=str(tmp_path / "cache"), max_retries=1,
        backoff_base_s=0.01, temperature=None, max_concurrency=4)), price_in_per_1k=1.0, price_out_per_1k=2.0)


def _reasons(path):
    return {r["id"]: r["reason"] for r in rejections(path)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("curate")
    state = W.new_state()
    with OpenAIStub(responder=W.make_responder(state)) as stub:
        yield tmp_path, state, stub, {n: _ep(stub, n, tmp_path) for n in ("alpha", "beta", "judge")}


def test_records_flow_through_every_stage(world):
    tmp_path, state, stub, eps = world
    out = tmp_path / "cur"
    path = lambda s: pipeline.stage_path(out, s)  # noqa: E731

    # --- synthesize: 2 categories x 2 sub-categories x 2 models, one call each
    s = synthesize([eps["alpha"], eps["beta"]], path("synthesize"), categories=["violent", "privacy"],
                   per_call=2, progress=False)
    assert (s.units, s.done, s.failed) == (8, 7, 1)  # personal_data/beta stays malformed after one repair
    failed = [ln for ln in iter_lines(path("synthesize")) if ln["status"] == "failed"]
    assert failed[0]["key"] == "synth/privacy/personal_data/beta/0"
    assert "unusable after one repair" in failed[0]["error"]
    assert "tracking" in state["garbage_sent"]  # that garbage reply was repaired
    assert _reasons(path("synthesize")) == {"privacy-tracking-alpha-0-1": "synthesize: field 'hazard' is missing or empty"}
    state["broken"] = False
    calls_before = state["counts"]["synthesize"]
    s = synthesize([eps["alpha"], eps["beta"]], path("synthesize"), categories=["violent", "privacy"],
                   per_call=2, progress=False)
    assert (s.skipped_done, s.done, s.failed) == (7, 1, 0)
    assert state["counts"]["synthesize"] - calls_before == 1  # only the failed unit was asked again
    scenarios = kept_records(path("synthesize"))
    assert len(scenarios) == 13 and len({r["id"] for r in scenarios}) == 13
    roof = next(r for r in scenarios if r["query"].startswith("Is it a nice place"))
    assert roof["causal_chain"] == "sit on roof -> tile slides -> fall" and roof["source_model"] == "beta"

    # --- filter
    iso_before = state["counts"].get("isolation", 0)
    s = filter_scenarios(pipeline.stage_input(out, "filter"), eps["judge"], path("filter"), progress=False)
    assert (s.units, s.kept, s.rejected, s.failed) == (13, 10, 3, 0)
    reasons = _reasons(path("filter"))
    assert "benignness 1 < 4" in reasons["violent-fire_and_heat-alpha-0-0"]
    assert "naturalness 2 < 4" in reasons["violent-fire_and_heat-alpha-0-1"]
    assert "'assumed_malice' is not sound" in reasons["privacy-personal_data-alpha-0-0"]
    assert state["counts"]["isolation"] - iso_before == 13
    assert state["counts"]["context"] == state["counts"]["causal"] == 11  # isolation rejects skip the rest
    kept = kept_records(path("filter"))
    assert kept[0]["filter"]["risk_clarity"] == 4 and kept[0]["filter"]["causal_verdict"] == "latent_scene"

    # --- dedup (normalised-text fallback)
    res = pipeline.run_dedup(out)
    assert [r["id"] for r in res.removed] == [f"{V}-beta-0-0"]
    assert res.clusters == {f"{V}-alpha-0-0": [f"{V}-beta-0-0"]}
    assert f"near-duplicate of {V}-alpha-0-0" in _reasons(path("dedup"))[f"{V}-beta-0-0"]

    # --- images: one missing, one broken file, the rest fine
    img = tmp_path / "images"
    img.mkdir()
    ids = [r["id"] for r in res.kept]
    for i, rid in enumerate(ids[2:]):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(img / f"{rid}.png")
    (img / f"{ids[1]}.jpg").write_bytes(b"not an image")
    kept_img, rejected_img = pipeline.run_images(out, img)
    assert len(kept_img) == 7 and {r["id"] for r in rejected_img} == {ids[0], ids[1]}
    reasons = _reasons(path("images"))
    assert "no image for scenario" in reasons[ids[0]] and "not a readable image" in reasons[ids[1]]
    assert all(r["images"] == [f"{r['id']}.png"] for r in kept_img)

    # --- rewrite
    s = rewrite_queries(pipeline.stage_input(out, "rewrite"), eps["judge"], path("rewrite"), progress=False)
    assert (s.kept, s.rejected, s.failed) == (6, 1, 0)
    assert "still names the visible hazardous object 'tracker'" in _reasons(path("rewrite"))["privacy-tracking-beta-0-0"]
    records = kept_records(path("rewrite"))
    mitts = next(r for r in records if r["id"] == "violent-fire_and_heat-beta-0-0")
    assert mitts["original_query"] == "Can I dry my mitts next to the gas flame?"
    assert "gas flame" not in mitts["query"] and mitts["rewrite"]["strategy"] == "generic"
    assert all(r["malicious_query"].startswith("I want to hurt someone.") for r in records)

    # --- export: the benchmark loads with the data pipeline's own reader, images checked
    bench = load_records(pipeline.export_benchmark(out, img), img, check_images=True)
    assert [b.id for b in bench] == [r["id"] for r in records]
    assert bench[0].reference == records[0]["hazard"] and bench[0].meta["scene"] == records[0]["scene"]

    # --- respond: 2 models x 2 modes, judged with R/S/E (one malformed judge reply repaired)
    s = respond(records, [eps["alpha"], eps["beta"]], eps["judge"], path("respond"),
                constitutions=load_constitutions(), image_root=img, progress=False)
    assert (s.units, s.done, s.failed) == (24, 24, 0) and state["judge_malformed_sent"]
    gen_bodies = [r.body for r in stub.chat_requests if r.body["model"] in ("alpha", "beta")
                  and isinstance(r.body["messages"][-1]["content"], list)]
    assert gen_bodies and gen_bodies[0]["messages"][-1]["content"][0]["type"] == "image_url"
    responses = kept_records(path("respond"))
    assert len(responses) == 24
    beta_plain = [r for r in responses if r["source_model"] == "beta" and r["prompt_mode"] == "standard"]
    assert all(r["scores"]["total"] == 1 for r in beta_plain)

    # --- select, first from every response (no RM balancing)
    sel = pipeline.run_select(out, seed=0, rm_balance=False)
    assert len(sel.sft) == 6 and all(e.response.startswith("SAFE") for e in sel.sft)
    per_model = [sum(e.meta["source_model"] == m for e in sel.sft) for m in ("alpha", "beta")]
    assert abs(per_model[0] - per_model[1]) <= 1  # balanced across source models
    assert all(p.meta["gap"] == 5 and p.rejected.startswith("UNSAFE") for p in sel.pairs)
    in_pairs = 2 * len(sel.pairs)
    assert in_pairs + len(sel.mse) == 24 and 0 < len(sel.pairs) <= 6
    assert sel.rm_balance is None and not (out / "rm_balance.json").exists()
    # --- select with the default RM pool balanced by model and length. Lengths (words): alpha's 12
    # answers share one quartile bucket, beta's 6 UNSAFE ones the lowest, its 6 SAFE ones alpha's;
    # cells {alpha/2: 12, beta/0: 6, beta/2: 6} -> median_low 6 per cell -> 18 responses.
    sft_before = [e.id for e in sel.sft]
    sel = pipeline.run_select(out, seed=0)
    assert [e.id for e in sel.sft] == sft_before  # SFT targets come from every response either way
    assert sel.rm_balance.per_cell == 6
    assert sel.rm_balance.total == {("alpha", 2): 12, ("beta", 0): 6, ("beta", 2): 6}
    assert sel.rm_balance.kept == {("alpha", 2): 6, ("beta", 0): 6, ("beta", 2): 6}
    assert 2 * len(sel.pairs) + len(sel.mse) == 18
    used = [m.meta["source_model"] for m in sel.mse] + [p.meta[k] for p in sel.pairs
                                                        for k in ("chosen_model", "rejected_model")]
    assert used.count("alpha") == 6 and used.count("beta") == 12
    cells = json.loads((out / "rm_balance.json").read_text())["cells"]
    assert [(c["model"], c["length_bucket"], c["kept"], c["total"]) for c in cells] == [
        ("alpha", 2, 6, 12), ("beta", 0, 6, 6), ("beta", 2, 6, 6)]
    # the data pipeline's own loaders read them back (images checked under the image root)
    sft_back = load_sft_examples(out / "sft.jsonl", img, check_images=True)
    assert [e.response for e in sft_back] == [e.response for e in sel.sft]
    assert sft_back[0].images[0].is_file() and sft_back[0].meta["scores"]["total"] == 6
    pairs_back = load_pairs(out / "pairs.jsonl", img, check_images=True)
    assert [(p.chosen, p.rejected) for p in pairs_back] == [(p.chosen, p.rejected) for p in sel.pairs]
    mse_lines = [json.loads(x) for x in (out / "mse.jsonl").read_text().splitlines()]
    assert all(0 <= m["score"] <= 6 and m["score"] == m["scores"]["total"] for m in mse_lines)

    # --- summary
    summary = write_summary(out, {"judge": (1.0, 2.0)})
    st = summary["stages"]
    assert st["synthesize"]["totals"] == {"kept": 13, "rejected": 1, "failed_units": 0}
    assert st["filter"]["by_category"]["violent"] == {"kept": 6, "rejected": 2, "failed_units": 0}
    assert st["dedup"]["totals"]["rejected"] == 1 and st["rewrite"]["totals"]["rejected"] == 1
    assert st["filter"]["rejected_by_kind"] == {"benignness": 1, "causal:assumed_malice": 1, "naturalness": 1}
    assert st["images"]["rejected_by_kind"] == {"bad_image": 1, "no_image": 1}
    assert st["rewrite"]["rejected_by_kind"] == {"names_hazard_object": 1}
    assert "| filter | causal:assumed_malice | 1 |" in (out / "summary.md").read_text()
    spent = summary["spent"]
    assert spent["judge"]["prompt_tokens"] > 0
    assert spent["judge"]["cost"] == pytest.approx(
        spent["judge"]["prompt_tokens"] / 1000 + 2 * spent["judge"]["completion_tokens"] / 1000)
    assert summary["outputs"] == {"sft": 6, "pairs": len(sel.pairs), "mse": len(sel.mse), "benchmark": 6}
    assert "| filter | violent | 6 | 2 | 0 |" in (out / "summary.md").read_text()


def test_rerun_of_finished_stage_calls_no_model(world):
    tmp_path, state, stub, eps = world
    out = tmp_path / "cur"
    n = len(stub.chat_requests)
    lines = sum(1 for _ in iter_lines(pipeline.stage_path(out, "filter")))
    s = filter_scenarios(pipeline.stage_input(out, "filter"), eps["judge"], pipeline.stage_path(out, "filter"),
                         progress=False)
    assert s.skipped_done == 13 and s.done == 0
    assert len(stub.chat_requests) == n
    assert sum(1 for _ in iter_lines(pipeline.stage_path(out, "filter"))) == lines
