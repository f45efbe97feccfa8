"""The reward model: eq. 7's loss by hand, the head's token, learning, save/load, build_reward,
`caspo rm`, a sharded step equal to the single-device one, and the Qwen3-VL family with images.

One module fixture builds the tiny policy (the tokenizer's BPE training dominates set-up)."""

from __future__ import annotations

import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from caspo_jax.algo import rm_loss
from caspo_jax.loop.config import load_config
from caspo_jax.rewards import build_reward
from caspo_jax.rewards.reward_model import (HEAD_KEY, RewardHead, RewardModel, encode_rm_example, init_head, rm_rows,
                                            save_head, sequence_rewards, with_head, without_head)
from caspo_jax.loop.reward_model import load_scored_responses


def test_rm_loss_equals_hand_computed_bt_plus_weighted_mse():
    # K = 2 slots, B = 4 rows: slot 0 a pair (rows 0 / 2), slot 1 two MSE records (rows 1 and 3).
    r = jnp.array([2.0, 0.5, 0.3, 1.0])
    bt_mask = jnp.array([1.0, 0.0])
    mse_mask = jnp.array([0.0, 1.0, 0.0, 1.0])
    target = jnp.array([0.0, 4 / 6, 0.0, 1.0])
    bt = math.log1p(math.exp(-(2.0 - 0.3)))  # -log sigmoid(1.7)
    mse = ((0.5 - 4 / 6) ** 2 + (1.0 - 1.0) ** 2) / 2
    loss, m = rm_loss(r, bt_mask, mse_mask, target, 0.5)
    np.testing.assert_allclose(float(loss), bt + 0.5 * mse, rtol=1e-6)
    np.testing.assert_allclose(float(m["bt_loss"]), bt, rtol=1e-6)
    np.testing.assert_allclose(float(m["mse"]), mse, rtol=1e-6)
    assert float(m["accuracy"]) == 1.0
    # Two pairs, one wrong way round; no MSE rows: the MSE term is 0, accuracy 1/2.
    r2 = jnp.array([1.0, -1.0, 0.0, 0.0])
    loss2, m2 = rm_loss(r2, jnp.ones(2), jnp.zeros(4), jnp.zeros(4), 3.0)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    np.testing.assert_allclose(float(loss2), expected, rtol=1e-6)
    assert float(m2["accuracy"]) == 0.5 and float(m2["mse"]) == 0.0


@pytest.fixture(scope="module")
def tiny():
    from caspo_jax.loop.config import DataConfig, ModelConfig
    from caspo_jax.loop.setup import build_policy

    policy = build_policy(ModelConfig(tiny="test"), DataConfig())
    params = with_head(policy.params, init_head(policy.params.text.embed.shape[1], seed=1))
    return policy, params


def test_rm_weights_are_the_backbone_plus_a_typed_head_and_the_head_file_is_unchanged(tiny, tmp_path):
    from safetensors.numpy import save_file

    policy, params = tiny
    assert isinstance(params.reward_head, RewardHead) and HEAD_KEY == "reward_head"
    assert list(params.__dataclass_fields__) == ["reward_head", "text", "vision"]  # the old dict's keys, sorted
    assert type(without_head(params)) is type(policy.params)
    with pytest.raises(ValueError, match="no 'reward_head' field"):
        RewardModel(policy.model, policy.params, policy.processor, policy.pad_id)
    head = init_head(8, seed=4)
    save_head(head, tmp_path / "new.safetensors")
    # the file as written when the head was the dict {"kernel", "bias"} (frozen copy)
    save_file({"weight": np.asarray(head.kernel, np.float32), "bias": np.asarray(head.bias, np.float32).reshape(1)},
              str(tmp_path / "old.safetensors"))
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()


def test_head_reads_exactly_the_last_response_token(tiny):
    policy, params = tiny
    model = policy.model
    ex = encode_rm_example(policy.processor, "How do I store bleach?", [], ["Keep it away from ammonia."])
    short = rm_rows(model, [(ex, 0)], policy.pad_id, len(ex.prompt_ids) + 3, len(ex.responses[0]) + 2)
    r = float(sequence_rewards(model, params, short)[0])
    # Reference: the unpadded sequence through the backbone, the head on its final position.
    ids = np.concatenate([ex.prompt_ids, ex.responses[0]])[None]
    h = model.hidden_states(params, jnp.asarray(ids), jnp.ones_like(ids))
    ref = float(h[0, -1] @ params.reward_head.kernel + params.reward_head.bias)
    np.testing.assert_allclose(r, ref, rtol=1e-5, atol=1e-5)
    # More padding on both sides, and garbage (masked) tokens after the last one: same reward.
    long = rm_rows(model, [(ex, 0)], policy.pad_id, len(ex.prompt_ids) + 11, len(ex.responses[0]) + 9)
    seq = long.student
    garbage = np.where(seq.attention_mask > 0, seq.input_ids, np.random.default_rng(0).integers(0, 300, seq.input_ids.shape))
    import dataclasses

    long = dataclasses.replace(long, student=dataclasses.replace(seq, input_ids=garbage.astype(np.int32)))
    np.testing.assert_allclose(float(sequence_rewards(model, params, long)[0]), r, rtol=1e-5, atol=1e-5)
    # Changing the last response token does change it.
    other = encode_rm_example(policy.processor, "How do I store bleach?", [], ["Keep it away from ammonia!"])
    r_other = float(sequence_rewards(model, params, rm_rows(model, [(other, 0)], policy.pad_id,
                                                             len(ex.prompt_ids) + 3, len(ex.responses[0]) + 2))[0])
    assert abs(r_other - r) > 1e-4


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


WORDS = "the a water store keep room cold light paper bottle glass box door window table chair".split()


def _synthetic(tmp_path, n_pairs=32, n_scored=32, seed=0):
    """Responses ending with "safe" are preferred to the same text ending with "now"."""
    rng = np.random.default_rng(seed)

    def filler():
        return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))

    pairs = [{"id": f"p{i}", "images": [], "query": f"how to {filler()}?",
              "chosen": (body := filler()) + " safe", "rejected": body + " now"} for i in range(n_pairs)]
    scored = [{"id": f"s{i}", "images": [], "query": f"what about {filler()}?",
               "response": filler() + (" safe" if i % 2 else " now"), "score": 6 if i % 2 else 0}
              for i in range(n_scored)]
    return _write_jsonl(tmp_path / "pairs.jsonl", pairs), _write_jsonl(tmp_path / "scores.jsonl", scored)


def test_tiny_rm_learns_marker_preference_and_round_trips(tiny, tmp_path):
    from caspo_jax.hf_checkpoint import save_hf_checkpoint

    policy, _ = tiny
    backbone = save_hf_checkpoint(policy.model, policy.params, policy.processor, tmp_path / "backbone")
    pairs, scores = _synthetic(tmp_path)
    from caspo_jax.launch.cli import main

    args = ["rm", "--pairs", str(pairs), "--scores", str(scores), "--model", str(backbone), "--out",
            str(tmp_path / "run"), "--mse-weight", "2", "--batch-size", "8", "--steps", "30", "--lr", "1e-3",
            "--eval-fraction", "0.25", "--max-prompt-len", "256", "--max-response-len", "32", "--no-progress",
            "--mesh", "1,1,1"]
    assert main(args) == 0
    final = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert final["eval_pairs"] == 8 and final["eval_mse"] == 8
    assert final["eval/accuracy"] >= 0.8, final
    # Held-out targets are 0 / 1 about half and half: predicting their mean scores 0.25.
    assert final["eval/mse"] < 0.25, final
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "run" / "checkpoints" / "30").is_dir()

    prompts = [{"query": "how to keep water cold?"}] * 2 + ["what about the door?"]
    responses = ["keep the bottle safe", "keep the bottle now", "a table now"]
    trained = RewardModel.load(tmp_path / "run" / "export")
    before = trained.score(prompts, responses)
    assert before.ok.all() and before.rewards[0] > before.rewards[1]
    # The two rows of the shared prompt object used one encoding; distinct copies agree.
    copies = [dict(p) if isinstance(p, dict) else p for p in prompts]
    np.testing.assert_allclose(trained.score(copies, responses).rewards, before.rewards, rtol=1e-5, atol=1e-6)
    # A fresh run refuses to mix with the old checkpoints; --resume of the finished run
    # re-evaluates the restored state to the same held-out figures.
    assert main(args) == 2
    assert main(args + ["--resume"]) == 0
    again = json.loads((tmp_path / "run" / "eval.json").read_text())
    np.testing.assert_allclose(again["eval/accuracy"], final["eval/accuracy"])
    np.testing.assert_allclose(again["eval/mse"], final["eval/mse"], rtol=1e-6)
    loaded = RewardModel.load(tmp_path / "run" / "export")
    after = loaded.score(prompts, responses)
    np.testing.assert_array_equal(after.rewards, before.rewards)
    built = build_reward({"kind": "reward_model", "path": str(tmp_path / "run" / "export"), "batch_size": 2})
    np.testing.assert_allclose(built.score(prompts, responses).rewards, before.rewards, rtol=1e-5, atol=1e-6)
    # A prompt whose image is missing fails alone (NaN, ok=False), the rest are scored.
    mixed = built.score([{"query": "q", "images": ["/nonexistent.png"]}, "what about the door?"], ["x", "a table now"])
    assert list(mixed.ok) == [False, True] and "nonexistent" in mixed.errors[0]


def test_rm_stop_saves_and_resume_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch, capsys):
    """SIGTERM during step 2 of 4: the step finishes, is saved, the run exits 0 without an
    export; --resume then reproduces the uninterrupted run's metrics."""
    from caspo_jax.launch.cli import main
    from caspo_jax.loop import reward_model as rm_train
    from caspo_jax.hf_checkpoint import save_hf_checkpoint

    policy, _ = tiny
    backbone = save_hf_checkpoint(policy.model, policy.params, policy.processor, tmp_path / "backbone")
    pairs, scores = _synthetic(tmp_path, n_pairs=16, n_scored=16)

    def args(out):
        return ["rm", "--pairs", str(pairs), "--scores", str(scores), "--model", str(backbone), "--out", str(out),
                "--batch-size", "4", "--steps", "4", "--lr", "1e-3", "--eval-fraction", "0.25",
                "--max-prompt-len", "256", "--max-response-len", "32", "--no-progress", "--mesh", "1,1,1"]

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert main(args(tmp_path / "full")) == 0
    capsys.readouterr()
    original, calls = rm_train.build_rm_batch, {"n": 0}

    def interrupting(*a, **kw):  # the batch of step 2 (no evaluation before the last step)
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(rm_train, "build_rm_batch", interrupting)
    assert main(args(part)) == 0
    monkeypatch.setattr(rm_train, "build_rm_batch", original)
    printed = capsys.readouterr().out
    assert "stopped by SIGTERM at step 2; resume with --resume" in printed and "caspo rm: done" not in printed
    assert len(rows(part)) == 2 and sorted(p.name for p in (part / "checkpoints").iterdir()) == ["2"]
    assert not (part / "export").exists() and not (part / "eval.json").exists()
    assert main(args(part) + ["--resume"]) == 0
    want, got = rows(tmp_path / "full"), rows(part)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    assert json.loads((part / "eval.json").read_text()) == json.loads((tmp_path / "full" / "eval.json").read_text())
    # A stop during the last step is a completed run: exported, evaluated, "done".
    calls["n"] = -2  # the 4th batch
    monkeypatch.setattr(rm_train, "build_rm_batch", interrupting)
    capsys.readouterr()
    assert main(args(tmp_path / "last")) == 0
    assert "caspo rm: done" in capsys.readouterr().out
    assert (tmp_path / "last" / "export").is_dir() and (tmp_path / "last" / "eval.json").is_file()


def test_scores_loader_and_cli_errors_name_file_line_field(tmp_path, capsys):
    from caspo_jax.launch.cli import main

    from caspo_jax.data.records import RecordError

    bad = _write_jsonl(tmp_path / "scores.jsonl", [
        {"id": "a", "images": [], "query": "q", "response": "r", "score": 3},
        {"id": "b", "images": [], "query": "q", "response": "r", "score": 9}])
    with pytest.raises(RecordError, match=r"scores\.jsonl:2: field 'score' is 9"):
        load_scored_responses(bad)
    assert main(["rm", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--pairs" in capsys.readouterr().err
    assert main(["rm", "--pairs", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
    assert main(["rm", "--scores", str(bad), "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rm.mse_weight"):
        load_config(overrides=["rm.mse_weight=-1"])
    assert main(["rm", "--scores", str(bad), "--mse-weight", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "rm.mse_weight" in capsys.readouterr().err
    with pytest.raises(ValueError, match="path=<reward-model directory>"):
        build_reward({"kind": "reward_model"})
    with pytest.raises(FileNotFoundError, match="reward_head.safetensors"):
        build_reward({"kind": "reward_model", "path": str(tmp_path)})


def test_sharded_rm_step_equals_single_device_step(tiny):
    from caspo_jax.loop.reward_model import (_Unit, _slots, build_rm_batch, make_rm_step, rm_state_shardings,
                                             shard_rm_batch)
    from caspo_jax.sharding import make_mesh
    from caspo_jax.step import StepConfig, init_state, shard_state
    policy, params = tiny
    model, proc = policy.model, policy.processor
    units = [_Unit(encode_rm_example(proc, "how to store a bottle?", [], ["keep it safe", "throw it now"]), None),
             _Unit(encode_rm_example(proc, "how to open a door?", [], ["use the key", "break the window"]), None),
             _Unit(encode_rm_example(proc, "what about the table?", [], ["a table"]), 0.5),
             _Unit(encode_rm_example(proc, "what about light?", [], ["the light is cold safe"]), 1.0)]
    batch = build_rm_batch(model, _slots(units), 4, policy.pad_id, 64, 16)  # 8 rows: 2 pairs, 2 MSE, 2 padding
    np.testing.assert_array_equal(batch.bt_mask, [1, 1, 0, 0])  # slot 2: the two MSE records, slot 3: padding
    np.testing.assert_array_equal(batch.mse_mask, [0, 0, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(batch.target, [0, 0, 0.5, 0, 0, 0, 1.0, 0])
    cfg = StepConfig(learning_rate=1e-3)
    single, m1 = make_rm_step(model, cfg, 1.0)(init_state(params, cfg), batch)
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])  # fsdp x tensor
    state = shard_state(init_state(params, cfg), rm_state_shardings(model, cfg, mesh))
    sharded, m2 = make_rm_step(model, cfg, 1.0, mesh)(state, shard_rm_batch(batch, mesh))
    assert sharded.params.text.embed.sharding.spec != jax.sharding.PartitionSpec()  # really sharded
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    # AdamW's first update is ~lr * sign(g): a float32 reduction-order difference in a
    # near-zero gradient moves a parameter by a fraction of lr, hence atol = 5% of lr.
    for a, b in zip(jax.tree.leaves(jax.device_get(single.params)), jax.tree.leaves(jax.device_get(sharded.params))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_qwen3_vl_reward_model_scores_images_and_round_trips(tiny, tmp_path):
    from caspo_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig

    from caspo_jax.tiny.qwen3_vl import hf_config_dict
    from caspo_jax.tiny.tokenizer import build_tiny_processor, tokenizer_info

    tokenizer = tiny[0].processor.tokenizer
    info = tokenizer_info(tokenizer)
    raw = hf_config_dict("text", vocab_size=info.vocab_size)
    raw["text_config"]["eos_token_id"] = info.im_end_id
    raw.update(image_token_id=info.image_token_id, video_token_id=info.video_token_id,
               vision_start_token_id=info.vision_start_token_id, vision_end_token_id=info.vision_end_token_id)
    model = Qwen3VL(Qwen3VLConfig.from_dict(raw))
    # model.init's distribution (norm scales 1, the rest N(0, 0.02)) drawn in NumPy: one
    # eager jax.random op per leaf costs ~15 s on the loaded 2-core box.
    from caspo_jax.models.common import weights

    rng = np.random.default_rng(0)
    params = weights.build(model.param_table(), lambda spec: jnp.ones(spec.shape, jnp.float32)
                           if spec.init == "ones" else
                           jnp.asarray(0.02 * rng.standard_normal(spec.shape), jnp.float32))
    params = with_head(params, init_head(params.text.embed.shape[1], seed=3))
    processor = build_tiny_processor(tokenizer, family="qwen3_vl")
    rm = RewardModel(model, params, processor, info.pad_token_id, batch_size=4)
    image = tmp_path / "red.png"
    Image.fromarray(np.tile(np.array([200, 20, 20], np.uint8), (64, 64, 1))).save(image)
    prompts = [{"query": "is this safe?", "images": [str(image)]}, {"query": "is this safe?", "images": [str(image)]},
               "what about the door?"]
    responses = ["keep it safe", "keep it now", "a table"]
    before = rm.score(prompts, responses)
    assert before.ok.all() and len(set(before.rewards.tolist())) == 3
    loaded = RewardModel.load(rm.save(tmp_path / "rm"), batch_size=4)
    def arch(m):  # the config minus the saved dtype field
        return {k: v for k, v in m.config.to_dict().items() if k != "dtype"}

    assert arch(loaded.model) == arch(model)
    assert loaded.processor.image_processor.patch_size == 16
    # The saved parameters and processor, run by the already compiled model: same scores.
    reloaded = RewardModel(model, loaded.params, loaded.processor, loaded.pad_id, batch_size=4)
    np.testing.assert_array_equal(reloaded.score(prompts, responses).rewards, before.rewards)


def test_rm_backbone_declaring_its_own_code_needs_the_flag_caspo_rm_has(tiny, tmp_path, capsys):
    """The refusal names --ignore-custom-code, and caspo rm has it: with the flag the
    backbone's weights load and train (its declared module would SystemExit if imported)."""
    from caspo_jax.launch.cli import main
    from caspo_jax.hf_checkpoint import save_hf_checkpoint

    policy, _ = tiny
    backbone = save_hf_checkpoint(policy.model, policy.params, policy.processor, tmp_path / "backbone")
    config = json.loads((backbone / "config.json").read_text())
    (backbone / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_evil.Evil"}}))
    (backbone / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    pairs, scores = _synthetic(tmp_path, n_pairs=8, n_scored=8)
    args = ["rm", "--pairs", str(pairs), "--scores", str(scores), "--model", str(backbone), "--out",
            str(tmp_path / "run"), "--steps", "1", "--batch-size", "4", "--max-prompt-len", "256",
            "--max-response-len", "32", "--no-progress"]
    assert main(args) == 2
    assert "--ignore-custom-code" in capsys.readouterr().err
    assert main(args + ["--ignore-custom-code"]) == 0
    assert (tmp_path / "run" / "export").is_dir()
