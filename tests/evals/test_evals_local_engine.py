"""`caspo eval --engine jax` end to end: a tiny random Qwen2.5-VL saved with a tiny processor,
generated in-process by the JAX sampler, judged by the HTTP judge stub, reported.

References: the prompt ids equal the unmodified transformers processor's on the same
messages and images (exact); the stored responses equal the generator's own decode of the
sampler (exact, reproducible per prompt); the judges saw exactly those responses.
"""

import json

import jax
import numpy as np
import pytest

import _evals_fixtures as F
from caspo_jax.evals import generators as G
from caspo_jax.evals.modes import Prompt
from caspo_jax.evals.store import load_records
from caspo_jax.launch import cli
from caspo_jax.tiny.openai_stub import OpenAIStub, request_text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from caspo_jax.models import save_pretrained
    from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
    from caspo_jax.tiny.tokenizer import (build_tiny_processor, build_tiny_tokenizer, save_tiny_processor,
                                                  tokenizer_info)
    from caspo_jax.loop.setup import tiny_hf_config

    tokenizer = build_tiny_tokenizer()
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tiny_hf_config("test", tokenizer_info(tokenizer))))
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, model.init(jax.random.PRNGKey(0)), path)
    processor = build_tiny_processor(tokenizer)
    save_tiny_processor(processor, path)
    return path, processor


def test_local_generator_encodes_like_the_processor(checkpoint, tmp_path):
    path, processor = checkpoint
    F.write_records(tmp_path, n=1)
    image = str(tmp_path / "images" / "r0.png")
    gen = G.local_generator("jax", str(path))
    from caspo_jax.data.pipeline import processor_resize_settings

    assert processor_resize_settings(gen.processor) == processor_resize_settings(processor)  # read from the dir
    prompt = Prompt("what is shown?", (image,), system="be careful")
    encoded = gen.encode(prompt)
    messages = [{"role": "system", "content": "be careful"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = processor(text=[text], images=list(encoded.images), return_tensors="np")
    np.testing.assert_array_equal(encoded.token_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(encoded.image_grid_thw, ref["image_grid_thw"])
    np.testing.assert_allclose(encoded.pixel_values, ref["pixel_values"], atol=1e-6)
    # an unreadable image fails that prompt alone, with the reason
    gens = gen.generate([Prompt("q", (str(tmp_path / "missing.png"),)), Prompt("hello")], 2,
                        G.Sampling(temperature=1.0, max_new_tokens=4))
    assert gens[0].texts == [None, None] and "missing.png" in gens[0].errors[0]
    assert gens[1].ok and gens[1].completion_tokens >= 2


def test_eval_engine_jax_end_to_end(checkpoint, tmp_path):
    path, _ = checkpoint
    F.write_records(tmp_path, n=2)
    out = tmp_path / "run"
    args = ["eval", "--records", str(tmp_path / "records.jsonl"), "--out", str(out), "--engine", "jax",
            "--checkpoint", str(path), "--max-new-tokens", "6", "--no-progress", "--max-retries", "1",
            "--judge", "name=ja,model=judge-a,base_url=STUB"]
    with OpenAIStub(responder=F.default_responder) as stub:
        args[-1] = args[-1].replace("STUB", stub.base_url)
        assert cli.main(args) == 0
        requests = list(stub.chat_requests)
    assert requests and all(F.is_rse_judge(r.body) for r in requests)  # generation never left the process
    recs = load_records(out / "results.jsonl")
    assert len(recs) == 2 and all(r["status"] == "done" for r in recs.values())
    responses = {k: r["response"] for k, r in recs.items()}
    assert sorted(F.response_of(request_text(r.body)) for r in requests) == sorted(responses.values())
    # the same generator outside the CLI reproduces each stored response (per-prompt seeds)
    from caspo_jax.data.records import load_records as load_safety_records
    from caspo_jax.evals.modes import build_prompt

    gen = G.local_generator("jax", str(path))
    records = load_safety_records(tmp_path / "records.jsonl", None, check_images=True)
    again = gen.generate([build_prompt(r, "standard") for r in records], 1, G.Sampling(max_new_tokens=6))
    assert [g.texts[0] for g in again] == [responses[f"ood/standard/{r.id}/0"] for r in records]
    assert all(isinstance(t, str) for t in responses.values()) and len(set(responses.values())) == 2
    assert json.loads((out / "run.json").read_text())["engine"] == "jax"
    report = (out / "report.md").read_text()
    assert any(line.startswith("| standard |") and "2 / 2" in line for line in report.splitlines())


def test_constitution_mode_encodes_to_the_training_teacher_ids(checkpoint, tmp_path):
    """Eval constitution mode and training's teacher prompt are one function: the local
    engine's token ids equal encode_prompt's teacher_input_ids for the same record."""
    from caspo_jax.data.constitutions import constitution_for, load_constitutions
    from caspo_jax.data.prompts import encode_prompt
    from caspo_jax.data.records import load_records as load_safety_records
    from caspo_jax.evals.modes import build_prompt

    path, _ = checkpoint
    F.write_records(tmp_path, n=1)
    record = load_safety_records(tmp_path / "records.jsonl", None, check_images=True)[0]
    cons = load_constitutions()
    gen = G.local_generator("jax", str(path))
    encoded = gen.encode(build_prompt(record, "constitution", cons))
    training = encode_prompt(gen.processor, record, encoded.images, constitution_for(record, cons))
    np.testing.assert_array_equal(encoded.token_ids, training.teacher_input_ids)
    assert len(training.teacher_input_ids) > len(training.input_ids)  # the constitution is in it


def test_chat_template_the_sandbox_blocks_is_a_user_error(checkpoint, tmp_path, capsys):
    import shutil

    path, _ = checkpoint
    blocked = tmp_path / "ckpt"
    shutil.copytree(path, blocked)
    (blocked / "chat_template.jinja").write_text("{% set seen = [] %}{{ seen.append(1) }}{{ messages[0].role }}")
    F.write_records(tmp_path, n=1)
    args = ["eval", "--records", str(tmp_path / "records.jsonl"), "--out", str(tmp_path / "run"), "--engine", "jax",
            "--checkpoint", str(blocked), "--max-new-tokens", "4", "--no-progress",
            "--judge", "name=ja,model=judge-a,base_url=http://127.0.0.1:9/v1"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "loading" not in err and "\r" not in err  # --no-progress reaches the weight loader's bar too
    assert err.count("\n") == 1 and err.startswith(f"caspo eval: {blocked / 'chat_template.jinja'}: the chat template")
    assert "SecurityError" in err and "append" in err


def test_checkpoint_declaring_its_own_code_needs_the_flag_caspo_eval_has(checkpoint, tmp_path, capsys):
    """The refusal names --ignore-custom-code, and caspo eval has it: with the flag the
    weights load as a plain Qwen-VL model (the declared module would SystemExit if imported)."""
    import shutil

    path, _ = checkpoint
    custom = tmp_path / "ckpt"
    shutil.copytree(path, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.Evil"}}))
    (custom / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    F.write_records(tmp_path, n=1)
    args = ["eval", "--records", str(tmp_path / "records.jsonl"), "--out", str(tmp_path / "run"), "--engine", "jax",
            "--checkpoint", str(custom), "--max-new-tokens", "4", "--no-progress", "--max-retries", "1",
            "--judge", "name=ja,model=judge-a,base_url=STUB"]
    assert cli.main(args) == 2
    assert "--ignore-custom-code" in capsys.readouterr().err
    with OpenAIStub(responder=F.default_responder) as stub:
        args[-1] = args[-1].replace("STUB", stub.base_url)
        assert cli.main(args + ["--ignore-custom-code"]) == 0
    recs = load_records(tmp_path / "run" / "results.jsonl")
    assert [r["status"] for r in recs.values()] == ["done"]
