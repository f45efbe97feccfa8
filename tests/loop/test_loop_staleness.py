"""rollout.max_staleness = 1 end to end: every trained batch is at most one version behind
the trainer, a stop + --resume trains every prompt batch exactly once, and a rollout engine
that dies or hangs stops the run with one error, its last checkpoint intact."""

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop_e2e import read, small_config  # noqa: E402

from caspo_jax.loop import caspo as caspo_mod  # noqa: E402
from caspo_jax.loop.config import apply_overrides, config_from_dict, config_to_dict, load_config  # noqa: E402
from caspo_jax.rollout.producer import RolloutEngineError  # noqa: E402

STEPS = 4
MAKE_REWARD = caspo_mod.make_reward
S = 8  # prompts_per_step 2 x group_size 4


def override(cfg, *items):
    return config_from_dict(apply_overrides(config_to_dict(cfg), list(items)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("staleness")
    cfg = small_config(tmp, f"run.steps={STEPS}", "rollout.max_staleness=1")
    from caspo_jax.loop.setup import build_policy

    return tmp, cfg, build_policy(cfg.model, cfg.data)


def recording_reward(trained, on_call=None, action=lambda: os.kill(os.getpid(), signal.SIGTERM)):
    """make_reward whose scores record the prompt ids of each trained step (the reward runs
    in the trainer thread, once per trained batch) and run `action` on call `on_call`
    (default: SIGTERM to this process, a stop request)."""
    def make_reward(spec):
        inner = MAKE_REWARD(spec)

        class Recording:
            name = "recording"

            def score(self, prompts, responses):
                trained.append(sorted({p.id for p in prompts}))
                if len(trained) == on_call:
                    action()
                return inner.score(prompts, responses)

        return Recording()

    return make_reward


def expected_batches(cfg, policy, tmp):
    """The prompt ids of the first STEPS batches of the run's data order (the data iterator
    alone, no training)."""
    from caspo_jax.distributed import pipeline_shard
    from caspo_jax.loop.data import prepare_data, prompt_dataset

    files = prepare_data(cfg, tmp / "expected")
    dataset, _ = prompt_dataset(cfg, files, policy.processor, split="train", num_epochs=None,
                                batch_size=cfg.algo.prompts_per_step, shard=pipeline_shard())
    iterator = dataset.iterator()
    return [sorted({r.id for r in next(iterator).records}) for _ in range(STEPS)]


def test_k1_stays_within_one_version_and_resume_trains_each_batch_once(base, monkeypatch):
    """A stop after step 2 and --resume: every row at most one version stale (the overlap did
    happen), and the prompt batches trained are the data order's, each exactly once: the
    rollouts in flight at the stop were dropped and made again from the checkpoint."""
    tmp, cfg, policy = base
    trained = []
    monkeypatch.setattr(caspo_mod, "make_reward", recording_reward(trained, on_call=2))
    caspo_mod.run_caspo(cfg, tmp / "part", policy=policy, progress=False, export=False)
    assert len(read(tmp / "part" / "metrics.jsonl")) == 2  # stopped after step 2 (saved)
    monkeypatch.setattr(caspo_mod, "make_reward", recording_reward(trained))
    caspo_mod.run_caspo(cfg, tmp / "part", policy=policy, progress=False, export=False, resume=True)
    rows = read(tmp / "part" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert trained == expected_batches(cfg, policy, tmp)
    for r in rows:
        assert r["async/staleness"] in (0.0, 1.0)
        assert r["async/staleness_hist/0"] + r["async/staleness_hist/1"] == S
        assert r["async/trainer_wait_s"] >= 0 and r["async/producer_idle_s"] >= 0 and r["grad_norm"] > 0
    assert rows[0]["async/staleness"] == 0.0  # step 1's batch comes from the initial weights
    assert rows[2]["async/staleness"] == 0.0  # so does the first resumed one: the checkpoint's
    assert rows[1]["async/staleness"] == 1.0  # batch 2 was generated while step 1 trained


def test_a_dead_engine_stops_the_run_with_one_error_and_the_last_checkpoint(base, monkeypatch, tmp_path):
    """The engine fails on step 3's batch: one RolloutEngineError naming it; steps 1 and 2 are
    saved (the save of step 2, in flight when the error came, completes; resuming from a
    checkpoint is the first test's)."""
    tmp, cfg, policy = base
    make_engine = caspo_mod.make_rollout_engine
    calls = {"n": 0}

    class Dying:
        def __init__(self, inner):
            self.inner = inner

        def generate(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # step 3's batch
                raise BrokenPipeError("rollout worker 0 exited (SIGKILL)")
            return self.inner.generate(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(caspo_mod, "make_rollout_engine", lambda *a, **k: Dying(make_engine(*a, **k)))
    with pytest.raises(RolloutEngineError, match=r"step 3's rollouts: BrokenPipeError: rollout worker 0 exited"):
        caspo_mod.run_caspo(cfg, tmp_path / "run", policy=policy, progress=False, export=False)
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert [r["step"] for r in read(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_a_hung_engine_times_out_instead_of_deadlocking(base, monkeypatch, tmp_path):
    tmp, cfg, policy = base
    cfg = override(cfg, "rollout.timeout_s=3", "run.steps=2")
    make_engine = caspo_mod.make_rollout_engine
    release = threading.Event()

    class Hanging:
        def __init__(self, inner):
            self.inner = inner

        def generate(self, *args, **kwargs):
            release.wait(120)  # a worker that never answers
            return self.inner.generate(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(caspo_mod, "make_rollout_engine", lambda *a, **k: Hanging(make_engine(*a, **k)))
    try:
        with pytest.raises(RolloutEngineError, match=r"no rollouts for step 1 within rollout.timeout_s=3 s"):
            caspo_mod.run_caspo(cfg, tmp_path / "run", policy=policy, progress=False, export=False)
    finally:
        release.set()
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not read(metrics)  # no step trained


def test_the_async_recipe_config_is_k1_with_tis_on_vllm_logprobs():
    """launch/recipes/async_tpu_vllm.yaml validates on the 7B preset: one version of staleness,
    TIS at 2 against vLLM's temperature-1 log-probs on Ray workers, one mesh over the host."""
    path = Path(__file__).parents[2] / "launch" / "recipes" / "async_tpu_vllm.yaml"
    cfg = load_config(preset="qwen2_5_vl_7b-start-sft", path=path,
                      overrides=["model.path=/m", "reward.path=/r", "rollout.worker_model_dir=/w"])
    assert (cfg.rollout.max_staleness, cfg.rollout.engine, cfg.rollout.temperature) == (1, "vllm", 1.0)
    assert (cfg.rollout.workers, cfg.rollout.worker_gpus) == ("ray", 1.0)
    assert (cfg.optim.rollout_correction, cfg.optim.tis_cap, cfg.run.mesh_fsdp) == ("tis", 2.0, -1)
