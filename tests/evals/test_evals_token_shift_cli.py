"""`caspo eval --token-shift`: two tiny random checkpoints score the same stored responses.

Reference: transformers' own Qwen2.5-VL (torch, float32) loaded from the same directories,
run on the full prompt + response ids; its log-probs of the response tokens must equal the
CSV's logp_base / logp_aligned, and delta their difference.
"""

import csv
import json

import jax
import numpy as np
import pytest

import _evals_fixtures as F
from caspo_jax.launch import cli


def _save_checkpoint(path, seed):
    from caspo_jax.models import save_pretrained
    from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
    from caspo_jax.tiny.tokenizer import (build_tiny_processor, build_tiny_tokenizer, save_tiny_processor,
                                                  tokenizer_info)
    from caspo_jax.loop.setup import tiny_hf_config

    tokenizer = build_tiny_tokenizer()
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tiny_hf_config("test", tokenizer_info(tokenizer))))
    save_pretrained(model, model.init(jax.random.PRNGKey(seed)), path)
    save_tiny_processor(build_tiny_processor(tokenizer), path)
    return path


def _torch_response_logp(path, prompt, response_ids):
    """log p(response token t) from transformers' model on [prompt ids | response ids]."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt.token_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=torch.tensor(prompt.pixel_values),
                       image_grid_thw=torch.tensor(prompt.image_grid_thw)).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    Lp = len(prompt.token_ids)
    return np.array([logp[Lp - 1 + t, tok].item() for t, tok in enumerate(response_ids)])


def test_token_shift_scores_stored_responses_under_two_checkpoints(tmp_path, capsys):
    base, aligned = _save_checkpoint(tmp_path / "base", 0), _save_checkpoint(tmp_path / "aligned", 1)
    F.write_records(tmp_path, n=2)
    run = tmp_path / "run"
    run.mkdir()
    responses = {"r0": "Do not dry gloves on the stove, it can start a fire.", "r1": "Sure."}
    (run / "results.jsonl").write_text("".join(
        json.dumps({"key": f"ood/standard/{rid}/0", "benchmark": "ood", "mode": "standard", "id": rid, "sample": 0,
                    "response": text, "status": "done"}) + "\n" for rid, text in responses.items()))
    out = tmp_path / "shift"
    rc = cli.main(["eval", "--token-shift", str(base), str(aligned), "--records", str(tmp_path / "records.jsonl"),
                   "--responses-from", str(run), "--out", str(out), "--top-k", "3", "--no-progress"])
    assert rc == 0
    from caspo_jax.data.records import load_records
    from caspo_jax.evals.generators import encode_local_prompt
    from caspo_jax.evals.modes import build_prompt
    from caspo_jax.hf_checkpoint import load_hf_checkpoint

    _, _, processor = load_hf_checkpoint(base)
    n_sure = len(processor.tokenizer("Sure.", add_special_tokens=False)["input_ids"])
    rows = list(csv.DictReader(open(out / "token_shift.csv")))
    assert [r["key"] for r in rows].count("ood/standard/r0/0") == 3
    assert [r["key"] for r in rows].count("ood/standard/r1/0") == min(3, n_sure)
    md = (out / "token_shift.md").read_text()
    assert f"top 3 per response by abs; {3 + min(3, n_sure)} tokens" in md
    assert (out / "token_shift.png").stat().st_size > 1000
    assert "| class | tokens | share % |" in capsys.readouterr().out

    # hand check against transformers on r0's prompt and response
    record = load_records(tmp_path / "records.jsonl", None, check_images=True)[0]
    prompt = encode_local_prompt(processor, build_prompt(record, "standard"))
    ids = processor.tokenizer(responses["r0"], add_special_tokens=False)["input_ids"]
    ref_base = _torch_response_logp(base, prompt, ids)
    ref_aligned = _torch_response_logp(aligned, prompt, ids)
    delta = ref_aligned - ref_base
    top = np.argsort(-np.abs(delta), kind="stable")[:3]
    r0 = [r for r in rows if r["key"] == "ood/standard/r0/0"]
    assert [int(r["position"]) for r in r0] == top.tolist()
    for r in r0:
        t = int(r["position"])
        assert r["token"] == processor.tokenizer.convert_ids_to_tokens(ids[t])
        assert float(r["logp_base"]) == pytest.approx(ref_base[t], abs=2e-4)
        assert float(r["logp_aligned"]) == pytest.approx(ref_aligned[t], abs=2e-4)
        assert float(r["delta"]) == pytest.approx(delta[t], abs=4e-4)


def test_token_shift_input_errors_exit_2(tmp_path, capsys):
    F.write_records(tmp_path, n=1)
    args = ["eval", "--token-shift", str(tmp_path / "a"), str(tmp_path / "b"), "--records",
            str(tmp_path / "records.jsonl"), "--out", str(tmp_path / "out")]
    assert cli.main(args) == 2
    assert "no config.json there" in capsys.readouterr().err
