"""Two processes: the trainer (this one) with rollout.max_staleness=1 and a rollout worker in
a spawned process (`RemoteRolloutEngine.subprocess`, the JAX engine, weights pushed as
safetensors bytes). SIGKILL of the worker mid-run stops the run with one error and its last
checkpoint intact; --resume with a new worker completes it, each prompt batch trained once."""

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "loop"))
from test_loop_e2e import read, small_config  # noqa: E402
from test_loop_staleness import recording_reward  # noqa: E402

from caspo_jax.loop import caspo as caspo_mod  # noqa: E402
from caspo_jax.remote import RemoteRolloutEngine, WorkerSpec  # noqa: E402
from caspo_jax.rollout.producer import RolloutEngineError  # noqa: E402

STEPS = 4


def remote_factory(engines):
    def factory(cfg, policy, place, params, version=0):
        spec = WorkerSpec.jax(policy.model, env={"JAX_PLATFORMS": "cpu",
                                                 "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                              engine_kwargs={"eos_token_ids": policy.eos_ids})
        engine = RemoteRolloutEngine.subprocess(policy.model, spec, timeout=cfg.rollout.timeout_s)
        engine.sync_weights(params, version=version)
        engines.append(engine)
        return engine

    return factory


def killing_reward(trained, kill_on_call, engines):
    """Records the trained prompt ids; on call `kill_on_call` (in step kill_on_call) SIGKILLs
    the worker process, as an out-of-memory kill or a lost host would."""

    def kill_worker():
        (info,) = engines[-1].info()
        os.kill(info["pid"], signal.SIGKILL)

    return recording_reward(trained, on_call=kill_on_call, action=kill_worker)


@pytest.mark.slow
def test_k1_with_a_worker_process_survives_a_sigkill_through_resume(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, f"run.steps={STEPS}", "rollout.max_staleness=1", "rollout.timeout_s=120")
    from caspo_jax.loop.setup import build_policy

    policy = build_policy(cfg.model, cfg.data)
    engines, trained = [], []
    monkeypatch.setattr(caspo_mod, "make_reward", killing_reward(trained, 2, engines))
    with pytest.raises(RolloutEngineError, match="rollout engine failed while generating step"):
        caspo_mod.run_caspo(cfg, tmp_path / "run", policy=policy, progress=False, export=False,
                            engine_factory=remote_factory(engines))
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    rows = read(tmp_path / "run" / "metrics.jsonl")
    assert saved == [r["step"] for r in rows] and saved[-1] >= 1  # every finished step saved, none half-written
    done = saved[-1]
    del trained[done:]  # the steps after the last checkpoint are trained again on resume
    monkeypatch.setattr(caspo_mod, "make_reward", killing_reward(trained, -1, engines))
    caspo_mod.run_caspo(cfg, tmp_path / "run", policy=policy, progress=False, export=False, resume=True,
                        engine_factory=remote_factory(engines))
    rows = read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["async/staleness"] in (0.0, 1.0) for r in rows)
    from test_loop_staleness import expected_batches

    assert trained == expected_batches(cfg, policy, tmp_path)
