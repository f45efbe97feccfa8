"""Prompt files, JSON answers with one repair, the hazard-object check, images, retries of failed units."""

import json

import pytest
from PIL import Image

import _curate_world as W
from caspo_jax.curate import pipeline
from caspo_jax.curate.filtering import FilterThresholds
from caspo_jax.curate.images import attach_images, load_image_map
from caspo_jax.curate.responses import respond
from caspo_jax.curate.rewrite import names_object
from caspo_jax.curate.stage import Endpoint, ReplyError, Unit, ask_json, kept_records, run_units, write_stage
from caspo_jax.curate.synthesis import subcategories
from caspo_jax.curate.templates import PromptFileError, load_prompt_file, render
from caspo_jax.data.constitutions import load_constitutions
from caspo_jax.evals.store import iter_lines
from caspo_jax.launch.cli import main
from caspo_jax.llm.client import ChatClient, ClientConfig
from caspo_jax.tiny.openai_stub import OpenAIStub, answer, garbage, server_error


def _client(stub, tmp_path=None, **kw):
    return ChatClient(ClientConfig(base_url=stub.base_url, model="m", max_retries=0, backoff_base_s=0.0,
                                   cache_dir=str(tmp_path / "cache") if tmp_path else None, **kw))


def test_shipped_prompt_files_load_and_examples_validate():
    synth = load_prompt_file("synthesize", required=("scenario",))
    subs = subcategories(synth)
    assert {c for c, _, _ in subs} == {"violent", "illegal", "hate", "sexual", "privacy", "self_harm"}
    assert all(len(spec["examples"]) >= 2 for _, _, spec in subs)
    for name, templates in (("filter", ("isolation", "context", "causal")), ("rewrite", ("rewrite",))):
        pf = load_prompt_file(name, required=templates)
        assert pf.version.startswith(name)
    msgs = load_prompt_file("filter").template("isolation").messages(query="Can I dry mitts here?")
    assert "<<<Can I dry mitts here?>>>" in msgs[1]["content"] and "scene" not in msgs[1]["content"].lower()


def test_prompt_file_errors_name_file_and_field(tmp_path):
    with pytest.raises(PromptFileError, match="placeholder {{who}} has no value"):
        render("hello {{who}}", {}, "t")
    assert render('{"a": 1} {{ x }}', {"x": 2}) == '{"a": 1} 2'
    p = tmp_path / "mine.yaml"
    p.write_text("scenario: {system: s, user: u}\n")
    with pytest.raises(PromptFileError, match=r"mine.yaml: field 'version' is missing"):
        load_prompt_file(p)
    p.write_text("version: v1\nother: {system: s, user: u}\n")
    with pytest.raises(PromptFileError, match=r"missing template\(s\) \['scenario'\]"):
        load_prompt_file(p, required=("scenario",))
    p.write_text("version: v1\nscenario: {system: s, user: u}\ncategories:\n  weather:\n    subcategories: {}\n")
    with pytest.raises(PromptFileError, match="categories.weather: not one of"):
        subcategories(load_prompt_file(p))
    p.write_text("version: v1\ncategories:\n  violent:\n    subcategories:\n      x:\n        examples: [{scene: s}]\n")
    with pytest.raises(PromptFileError, match=r"x.examples\[0\]: field 'query' is missing"):
        subcategories(load_prompt_file(p))


def test_ask_json_repairs_once_then_reports():
    def validate(obj):
        if not isinstance(obj.get("n"), int):
            raise ReplyError("field 'n' must be an integer")
        return obj["n"]

    script = [answer("Sure! n is three."), answer('{"n": 3}'),  # no JSON in the text -> repaired
              answer('{"n": "x"}'), answer('```json\n{"n": "y"}\n```'),  # invalid twice -> failed
              garbage()]                                    # HTTP body that is not JSON at all
    with OpenAIStub(script=script) as stub:
        client = _client(stub, max_concurrency=1)
        a = ask_json(client, [[{"role": "user", "content": "go"}]], validate, namespace="t")
        b = ask_json(client, [[{"role": "user", "content": "go2"}]], validate, namespace="t")
        c = ask_json(client, [[{"role": "user", "content": "go3"}]], validate, namespace="t")
        repair_turn = stub.chat_requests[1].body["messages"]
    assert a[0].ok and a[0].value == 3 and a[0].usage.total_tokens > 0
    assert repair_turn[-1]["content"].startswith("Your reply could not be used")
    assert repair_turn[-2]["role"] == "assistant"
    assert not b[0].ok and "unusable after one repair: field 'n' must be an integer" in b[0].error
    assert not c[0].ok and c[0].error.startswith("request failed: response body is not JSON")
    with OpenAIStub(script=[server_error(500)]) as stub:
        d = ask_json(_client(stub), [[{"role": "user", "content": "go4"}]], validate, namespace="t")
    assert not d[0].ok and "HTTP 500" in d[0].error


@pytest.mark.parametrize("query,obj,named", [
    ("Can I dry my mitts next to the gas flame?", "gas flame", True),
    ("Can I dry my mitts next to the flames?", "open gas flame", True),      # head noun, plural
    ("Is this a good breezy spot?", "widely spaced railings", False),
    ("How long can I leave this on?", "space heater", False),
    ("Where do I hide the TRACKER?", "tracker", True),
    ("Any ideas?", "", False),
])
def test_names_object(query, obj, named):
    assert names_object(query, obj) is named


def test_unknown_categories_are_named():
    from caspo_jax.curate.synthesis import scenario_units

    with pytest.raises(ValueError, match=r"--categories: \['weather'\] not in .*prompt_synthesize.yaml"):
        scenario_units(load_prompt_file("synthesize"), [], calls=1, categories=["Violent", "weather"])
    assert scenario_units(load_prompt_file("synthesize"), [], calls=1, categories=["Self-Harm"]) == []


def test_filter_thresholds_validate():
    with pytest.raises(ValueError, match="min_naturalness must be in 1..5"):
        FilterThresholds(min_naturalness=6)
    with pytest.raises(ValueError, match="unknown"):
        FilterThresholds(sound_verdicts=("maybe",))


def test_run_units_rejects_duplicate_keys(tmp_path):
    with pytest.raises(ValueError, match="unit key 'k' repeats"):
        run_units([Unit("k", 1), Unit("k", 2)], tmp_path / "s.jsonl", lambda c: [], stage="s", version="v")


def test_images_by_name_and_by_mapping(tmp_path):
    root = tmp_path / "img"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "a.jpg")
    Image.new("RGB", (4, 4)).save(root / "sub" / "b-photo.png")
    recs = [{"id": "a", "category": "violent"}, {"id": "b", "category": "violent"}, {"id": "c", "category": "hate"}]
    kept, rejected = attach_images(recs, root)
    assert [r["images"] for r in kept] == [["a.jpg"]] and [r["id"] for r in rejected] == ["b", "c"]
    m = tmp_path / "map.jsonl"
    m.write_text(json.dumps({"id": "b", "image": "sub/b-photo.png"}) + "\n" + json.dumps({"id": "c", "images": ["../x.png"]}) + "\n")
    kept, rejected = attach_images(recs, root, load_image_map(m))
    assert [(r["id"], r["images"]) for r in kept] == [("a", ["a.jpg"]), ("b", ["sub/b-photo.png"])]
    assert "outside the root" in rejected[0]["reason"]
    m.write_text('{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"map.jsonl:1: field 'image'"):
        load_image_map(m)


def test_failed_units_retry_with_fresh_requests_despite_the_cache(tmp_path):
    """A malformed reply is a successful (cached) HTTP call: the retry must not re-read it."""
    out = tmp_path / "cur"
    root = tmp_path / "img"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(root / "r0.png")
    write_stage(pipeline.stage_path(out, "rewrite"), "rewrite", "t",
                [{"id": "r0", "category": "violent", "images": ["r0.png"], "query": "Can I sit here?",
                  "hazard": "loose tiles"}], [])
    state = W.new_state()
    inner = W.make_responder(state)
    broken = {"judge": True}

    def responder(body):
        if broken["judge"] and "strict safety evaluator" in body["messages"][0]["content"]:
            return answer("no json")
        return inner(body)

    with OpenAIStub(responder=responder) as stub:
        def ep(name):
            return Endpoint(name, ChatClient(ClientConfig(base_url=stub.base_url, model=name, max_retries=0,
                                                          cache_dir=str(tmp_path / "cache"), temperature=None)))
        args = dict(constitutions=load_constitutions(), image_root=root, modes=("standard",), progress=False)
        with pytest.raises(ValueError, match="--image-root"):
            respond(pipeline.stage_input(out, "respond"), [ep("alpha")], ep("judge"), tmp_path / "x.jsonl",
                    **{**args, "image_root": None})
        s = respond(pipeline.stage_input(out, "respond"), [ep("alpha")], ep("judge"), pipeline.stage_path(out, "respond"), **args)
        assert s.failed == 1 and "judge failed" in next(iter_lines(pipeline.stage_path(out, "respond")))["error"]
        broken["judge"] = False
        gen_before = state["counts"]["generate"]
        s = respond(pipeline.stage_input(out, "respond"), [ep("alpha")], ep("judge"), pipeline.stage_path(out, "respond"), **args)
        assert s.done == 1 and state["counts"]["generate"] == gen_before  # the response came from the cache
    assert kept_records(pipeline.stage_path(out, "respond"))[0]["scores"]["total"] == 6


def test_cli_exit_status_says_rerun_when_units_failed(tmp_path, capsys):
    write_stage(pipeline.stage_path(tmp_path, "synthesize"), "synthesize", "t",
                [{"id": "s0", "category": "violent", "query": "q?", "scene": "s", "hazard": "h",
                  "hazard_object": "o", "causal_chain": "c"}], [])
    with OpenAIStub(default=answer("not json")) as stub:
        rc = main(["curate", "filter", "--out", str(tmp_path), "--no-progress", "--max-retries", "0",
                   "--judge", f"name=j,model=j,base_url={stub.base_url}"])
    assert rc == 1 and "rerun the same command to retry only those" in capsys.readouterr().err


def test_new_filter_thresholds_redecide_from_the_cache(tmp_path):
    from caspo_jax.curate.filtering import filter_scenarios

    scen = [{"id": "s0", "category": "violent", "query": "Can I dry my mitts here?", "scene": "stove",
             "hazard": "fire", "hazard_object": "stove", "causal_chain": "c"}]
    state = W.new_state()
    with OpenAIStub(responder=W.make_responder(state)) as stub:
        judge = Endpoint("judge", ChatClient(ClientConfig(base_url=stub.base_url, model="judge",
                                                          cache_dir=str(tmp_path / "cache"))))
        path = tmp_path / "filter.jsonl"
        assert filter_scenarios(scen, judge, path, progress=False).kept == 1  # risk clarity 4 >= 4
        n = len(stub.chat_requests)
        s = filter_scenarios(scen, judge, path, thresholds=FilterThresholds(min_risk_clarity=5), progress=False)
        assert (s.kept, s.rejected, s.skipped_done) == (0, 1, 0)
        assert len(stub.chat_requests) == n  # re-decided from cached verdicts
    assert "risk_clarity 4 < 5" in list(iter_lines(path))[-1]["rejected"][0]["reason"]


def test_prompt_files_sit_in_a_package_folder_so_they_ship():
    """`tool.setuptools.package-data` globs match files directly inside a package directory only."""
    import pathlib

    import caspo_jax.curate as pkg

    root = pathlib.Path(pkg.__file__).parent
    yamls = list(root.rglob("*.yaml"))
    assert len(yamls) == 3
    assert all((y.parent / "__init__.py").exists() for y in yamls)


def test_summary_names_each_stage_once_per_reason(tmp_path):
    """summary.md printed "- images: images: no image ..." (the reason already starts with its stage)."""
    from caspo_jax.curate.report import write_summary

    rec = {"id": "s1", "category": "violent", "query": "q"}
    kept, rejected = attach_images([rec], tmp_path)  # no s1.png under the root
    write_stage(pipeline.stage_path(tmp_path, "images"), "images", "t", kept, rejected)
    write_stage(pipeline.stage_path(tmp_path, "filter"), "filter", "t", [],
                [{"id": "s2", "kind": "benignness", "reason": "benignness 1 < 4", "record": rec}])
    write_summary(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "- images: no image for scenario s1" in md and "images: images:" not in md
    assert "- filter: benignness 1 < 4" in md  # a reason without the prefix gets it once
