"""caspo train end to end on the smallest tiny model: every phase, exact resume, SIGTERM,
corrupt-checkpoint fallback (at the checkpointer), and the HF export against transformers.

One module-scoped SFT policy and shared jit caches keep this file to about a minute of
compilation on 2 cores; the runs themselves take seconds.
"""

import json
import os
import signal

import numpy as np
import pytest

from caspo_jax.loop.config import apply_overrides, config_from_dict, config_to_dict, load_config

SMALL = ["model.tiny=test", "data.demo_train=24", "data.demo_eval=12", "data.max_response_len=8",
         "data.max_prompt_len=256", "algo.prompts_per_step=2", "algo.group_size=2",
         "run.steps=3", "run.save_every=1", "run.eval_every=0", "run.keep_last=5", "sft.steps=1",
         "sft.batch_size=4", "rollout.temperature=1.0", "algo.variant=token", "algo.group_size=4",
         "optim.minibatch_size=4"]
TIMING = ("time/", "tokens_per_s", "mfu")


def small_config(tmp_path, *extra):
    cfg = load_config(preset="tiny-cpu", overrides=SMALL + list(extra))
    from caspo_jax.loop.data import prepare_data

    files = prepare_data(cfg, tmp_path / "shared")
    data = {"train": str(files.train), "eval": str(files.eval), "sft": str(files.sft), "pairs": str(files.pairs),
            "constitutions": str(files.constitutions)}
    raw = config_to_dict(cfg)
    raw["data"].update(data)
    return config_from_dict(raw)


def strip_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    cfg = small_config(tmp)
    from caspo_jax.loop.setup import build_policy

    return tmp, cfg, build_policy(cfg.model, cfg.data)


@pytest.fixture(scope="module")
def one_step_run(base):
    """(run dir, final state) of a one-step run; a fixture, not a test's side effect, so the
    tests reading its export also pass when pytest-xdist sends them to another worker."""
    tmp, cfg, policy = base
    from caspo_jax.loop.caspo import run_caspo

    cfg = config_from_dict(apply_overrides(config_to_dict(cfg), ["run.steps=1", "run.eval_every=1"]))
    out = tmp / "one"
    final = run_caspo(cfg, out, policy=policy, progress=False, eval_modes=("standard", "constitution"))
    return out, final


def test_one_full_step_through_every_phase(base, one_step_run):
    tmp, cfg, policy = base
    out, final = one_step_run
    before, row = read(out / "metrics.jsonl")
    # step 0: the evaluation before RL (the teacher's discrimination where the policy starts)
    assert before["step"] == 0 and set(before) == {"step"} | {k for k in row if k.startswith("eval_")}
    assert "eval_standard/teacher_discrimination" in before and "eval_standard/warning_auc" in before
    for key in ("reward/mean", "reward/std", "token_reward_mean", "advantage_mean", "advantage_std", "kl",
                "entropy", "clipfrac", "response_length/mean", "response_length/max",
                "response_length/truncated_frac", "grad_norm", "learning_rate", "time/rollout", "time/reward",
                "time/logprobs", "time/update", "time/sync", "tokens_per_s", "mfu",
                "eval_standard/risk_failure_rate", "eval_constitution/reward_mean"):
        assert key in row and row[key] is not None, key
    assert 0.0 <= row["reward/mean"] <= 1.5
    assert row["grad_norm"] > 0
    changed = [not np.array_equal(a, b) for a, b in zip(
        np.asarray(__import__("jax").tree.leaves(final.params), dtype=object),
        np.asarray(__import__("jax").tree.leaves(policy.params), dtype=object))]
    assert any(changed)
    assert (out / "config.yaml").exists() and (out / "export" / "config.json").exists()
    assert list((out / "tb").rglob("events.*"))


def test_resume_after_a_stop_equals_an_uninterrupted_run(base):
    tmp, cfg, policy = base
    from caspo_jax.loop.caspo import run_caspo

    full = tmp / "full"
    run_caspo(cfg, full, policy=policy, progress=False, export=False)
    # The interrupted run: SIGTERM arrives during step 2 (from the reward function).
    calls = {"n": 0}
    from caspo_jax.loop import caspo as caspo_mod
    original = caspo_mod.make_reward

    def make_reward(spec):
        inner = original(spec)

        class Interrupting:
            name = "interrupting"

            def score(self, prompts, responses):
                calls["n"] += 1
                if calls["n"] == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return inner.score(prompts, responses)

        return Interrupting()

    caspo_mod.make_reward = make_reward
    try:
        part = tmp / "part"
        run_caspo(cfg, part, policy=policy, progress=False, export=False)
    finally:
        caspo_mod.make_reward = original
    assert len(read(part / "metrics.jsonl")) == 2  # step 2 finished, was saved, then the run exited
    assert sorted(int(p.name) for p in (part / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert not (part / "export").exists()
    run_caspo(cfg, part, policy=policy, progress=False, export=False, resume=True)
    assert strip_timing(read(part / "metrics.jsonl")) == strip_timing(read(full / "metrics.jsonl"))


def test_tis_cap_and_micro_batches_reach_the_caspo_step(base, tmp_path):
    """optim.tis_cap weighs each token by min(pi_old / pi_rollout, cap) with the rollout
    engine's own log-probs: the JAX sampler's, at the step's dtype and temperature, match
    the trainer's old log-probs, so the weights are 1 and none is capped (log-probs on the
    wrong tokens or positions would be far from 1). optim.micro_batches=2 runs beside it."""
    from caspo_jax.loop.caspo import run_caspo

    tmp, cfg, policy = base
    cfg = config_from_dict(apply_overrides(config_to_dict(cfg), ["run.steps=1", "optim.tis_cap=2.0",
                                                                 "optim.micro_batches=2"]))
    run_caspo(cfg, tmp_path / "tis", policy=policy, progress=False, export=False)
    (row,) = read(tmp_path / "tis" / "metrics.jsonl")
    assert row["is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert row["is_corrected_frac"] == 0.0
    assert row["rollout_correction/weight_mean"] == pytest.approx(row["is_weight_mean"], abs=1e-6)
    assert 0.0 <= row["rollout_correction/logp_gap_mean"] <= row["rollout_correction/logp_gap_max"] < 1e-3
    assert np.isfinite(row["loss"])


def test_original_teacher_is_loaded_from_model_teacher_path(base, one_step_run, tmp_path):
    """algo.teacher='original' (CASPO-w.-OMC) scores with the parameters at model.teacher_path.
    At step 1 pi_old and an export of the initial policy are the same model, so that step
    equals the default teacher's one-step run; another architecture is refused by name."""
    tmp, cfg, policy = base
    from caspo_jax.loop.caspo import run_caspo
    from caspo_jax.loop.config import ConfigError, ModelConfig
    from caspo_jax.hf_checkpoint import save_hf_checkpoint
    from caspo_jax.loop.setup import build_policy

    initial = save_hf_checkpoint(policy.model, policy.params, policy.processor, tmp_path / "initial")
    omc = config_from_dict(apply_overrides(config_to_dict(cfg), [
        "run.steps=1", "algo.teacher=original", f"model.teacher_path={initial}"]))
    run_caspo(omc, tmp_path / "omc", policy=policy, progress=False, export=False)
    (got,) = strip_timing(read(tmp_path / "omc" / "metrics.jsonl"))
    _, want = strip_timing(read(one_step_run[0] / "metrics.jsonl"))  # after step 0's evaluation before RL
    want = {k: v for k, v in want.items() if not k.startswith("eval_")}
    assert got.keys() == want.keys() and got["token_reward_std"] > 0
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    other = build_policy(ModelConfig(tiny="demo"), cfg.data)  # a 64-wide model, the policy is 32-wide
    wrong = save_hf_checkpoint(other.model, other.params, other.processor, tmp_path / "other")
    bad = config_from_dict(apply_overrides(config_to_dict(omc), [f"model.teacher_path={wrong}"]))
    with pytest.raises(ConfigError, match="model.teacher_path=.*architecture differs"):
        run_caspo(bad, tmp_path / "bad", policy=policy, progress=False, export=False)


def test_fresh_run_refuses_an_old_run_directory(base, one_step_run):
    tmp, cfg, policy = base
    from caspo_jax.loop.caspo import run_caspo

    # the fixture's run (not another test's side effect: xdist may run that one elsewhere)
    with pytest.raises(FileExistsError, match="--resume"):
        run_caspo(cfg, one_step_run[0], policy=policy, progress=False)


def test_export_loads_in_transformers_with_equal_logits(base, one_step_run):
    tmp, cfg, policy = base
    torch = pytest.importorskip("torch")
    from caspo_jax.models import load_pretrained
    from transformers import Qwen2_5_VLForConditionalGeneration

    export = one_step_run[0] / "export"
    model, params = load_pretrained(export)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, torch_dtype=torch.float32).eval()
    ids = np.array([[5, 17, 42, 99, 3, 250, 7, 8]], np.int64)
    ours = np.asarray(model.forward(params, ids))
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(export).convert_tokens_to_ids("<|im_end|>") == policy.eos_ids[0]


def test_checkpointer_keeps_last_n_and_sets_unreadable_steps_aside(tmp_path):
    import jax.numpy as jnp

    from caspo_jax.loop.checkpoint import RunCheckpointer

    ckpt = RunCheckpointer(tmp_path / "c", keep_last=2)
    state = {"w": jnp.arange(3.0), "step": jnp.int32(0)}
    for step in (1, 2, 3):
        ckpt.save(step, {"w": state["w"] * step, "step": jnp.int32(step)}, {"step": step, "data": {"pos": step}})
    ckpt.wait()
    assert ckpt.steps() == [2, 3]
    (tmp_path / "c" / "3" / "extras" / "metadata").write_text("{not json")
    for f in (tmp_path / "c" / "3").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00")
    with pytest.warns(RuntimeWarning, match="falling back"):
        step, restored, extras = ckpt.restore_latest(state)
    assert step == 2 and extras["data"] == {"pos": 2}
    np.testing.assert_array_equal(restored["w"], [0.0, 2.0, 4.0])
    assert ckpt.steps() == [2] and (tmp_path / "c" / "3.unreadable-0").is_dir()
    ckpt.save(3, state, {"step": 3})
    ckpt.close()


@pytest.fixture(scope="module")
def sft_dpo_runs(base):
    """(config, SFT policy) after `caspo sft` (3 steps) then `caspo dpo` (2 steps) on one device."""
    tmp, cfg, policy = base
    from caspo_jax.loop.sft_dpo import run_dpo, run_sft

    cfg = config_from_dict(apply_overrides(config_to_dict(cfg), ["sft.steps=3", "dpo.steps=2", "dpo.batch_size=2",
                                                                 "sft.learning_rate=0.003"]))
    sft = run_sft(cfg, tmp / "sft", policy=policy, progress=False)
    run_dpo(cfg, tmp / "dpo", policy=sft, progress=False)
    return cfg, sft


def test_sft_then_dpo_runs_and_exports(base, sft_dpo_runs):
    tmp = base[0]
    losses = [r["loss"] for r in read(tmp / "sft" / "metrics.jsonl")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp / "sft" / "export" / "model.safetensors").exists()
    rows = read(tmp / "dpo" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-5)  # step 1: policy == frozen reference
    assert {"reward_accuracy", "reward_margin", "grad_norm"} <= set(rows[0])


def test_dpo_reference_logprobs_are_each_examples_own(base):
    """The reference computed once before training (5 used examples in batches of 2, so the
    last batch is filled up) equals each example's log-probs computed alone, chosen and
    rejected in their places; unused examples stay 0."""
    tmp, cfg, policy = base
    from caspo_jax.step import compute_logprobs
    from caspo_jax.loop.data import encode_exchanges, exchange_batch
    from caspo_jax.loop.sft_dpo import _reference_logprobs
    from caspo_jax.loop.placement import Placement

    examples = encode_exchanges(cfg.data.pairs, policy.processor, constitutions_path=cfg.data.constitutions,
                                with_constitution=False, pairs=True, max_prompt_len=cfg.data.max_prompt_len,
                                max_response_len=cfg.data.max_response_len)[:7]
    prompt_len = -(-max(len(e.prompt_ids) for e in examples) // 16) * 16
    response_len = -(-max(len(r) for e in examples for r in e.responses) // 8) * 8
    place = Placement(None, policy.model, None)
    used = np.array([0, 2, 3, 5, 6])
    got = _reference_logprobs(policy.model, policy.params, place, examples, used, 2, policy.pad_id, prompt_len,
                              response_len, progress=False)
    assert got.shape == (7, 2, response_len) and not got[[1, 4]].any()
    for i in used:
        alone = exchange_batch(policy.model, [examples[i]], policy.pad_id, prompt_len, response_len)
        want = np.asarray(compute_logprobs(policy.model, policy.params, alone)[0])  # rows: chosen, rejected
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
        assert np.any(got[i, 0] != got[i, 1])


@pytest.mark.slow
def test_sft_and_dpo_on_a_2x2x2_mesh_equal_one_device(base, sft_dpo_runs):
    """The same stages on a (2, 2, 2) mesh of the 8 simulated devices (state, reference and
    rows sharded): equal losses, gradient norms and entropies (rtol 1e-4, atol 1e-5)."""
    import jax

    from caspo_jax.loop.sft_dpo import run_dpo, run_sft

    tmp, _, policy = base
    cfg, sft = sft_dpo_runs
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    mesh = config_from_dict(apply_overrides(config_to_dict(cfg), ["run.mesh_data=2", "run.mesh_fsdp=2",
                                                                  "run.mesh_tensor=2"]))
    sft_mesh = run_sft(mesh, tmp / "sft_mesh", policy=policy, progress=False, export=False)
    assert len(jax.tree.leaves(sft_mesh.params)[0].sharding.device_set) == 8
    run_dpo(mesh, tmp / "dpo_mesh", policy=sft, progress=False, export=False)
    for stage in ("sft", "dpo"):
        want, got = read(tmp / stage / "metrics.jsonl"), read(tmp / f"{stage}_mesh" / "metrics.jsonl")
        for w, g in zip(want, got, strict=True):
            for key in ("loss", "grad_norm", "entropy"):
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), (stage, key)


def test_local_jax_generator_for_caspo_eval_matches_the_training_prompts(base, one_step_run):
    tmp, cfg, policy = base
    from caspo_jax.evals.generators import Sampling, local_generator
    from caspo_jax.evals.modes import Prompt

    from caspo_jax.data.images import load_image, resize_image
    from caspo_jax.data.pipeline import processor_resize_settings
    from caspo_jax.data.prompts import encode_prompt
    from caspo_jax.data.records import load_records

    gen = local_generator("jax", str(one_step_run[0] / "export"))
    record = load_records(cfg.data.eval)[0]
    prompt = Prompt(record.query, tuple(str(p) for p in record.images), system="You are a helpful assistant.")
    factor, lo, hi = processor_resize_settings(policy.processor)
    image = resize_image(load_image(record.images[0]), factor, lo, hi)
    expected = encode_prompt(policy.processor, record, [image], "").input_ids
    np.testing.assert_array_equal(gen.encode(prompt).token_ids, expected)
    out = gen.generate([prompt, Prompt("hello")], n=2, sampling=Sampling(temperature=0.0, max_new_tokens=4))
    assert len(out) == 2 and all(len(g.texts) == 2 and g.ok for g in out)
    assert out[0].texts[0] == out[0].texts[1]  # greedy
    assert out[0].completion_tokens <= 8


def test_sweep_table_prints_mean_and_interval_per_cell(tmp_path):
    from caspo_jax.loop.sweep import Cell, _cell_row, _write_figure, _write_table

    columns = ("risk_failure_rate", "reward_mean")
    per_seed = [{"risk_failure_rate": 0.0, "reward_mean": 1.0}, {"risk_failure_rate": 1.0, "reward_mean": 1.5},
                {"risk_failure_rate": 0.5, "reward_mean": float("nan")}]
    rows = [_cell_row(None, "start (SFT)", per_seed[:1], columns), _cell_row(Cell("hybrid", 0.3), "hybrid", per_seed,
                                                                             columns)]
    _write_table(rows, columns, tmp_path)
    _write_figure(rows, columns, tmp_path / "sweep.png")
    # risk failure: mean 0.5, s = 0.5, t_{0.975,2} = 4.302653 -> half width 1.242, cut to [0, 1];
    # reward (unbounded, NaN left
    # out): mean 1.25, s = 0.3536, t_{0.975,1} = 12.706 -> half width 3.1765
    assert "| hybrid λ=0.3 | 3 | 0.500 [0.000, 1.000] | 1.250 [-1.927, 4.427] |" in (tmp_path / "table.md").read_text()
    assert "| start (SFT) | 1 | 0.000 | 1.000 |" in (tmp_path / "table.md").read_text()
    header = (tmp_path / "table.csv").read_text().splitlines()[0]
    assert header.startswith("variant,lambda,nonneg,seeds,risk_failure_rate_mean,risk_failure_rate_low")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
