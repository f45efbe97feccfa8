"""Two processes: the trainer (this one) with rollout.max_staleness=1 and a rollout worker in
a spawned process, chosen by the run config (rollout.workers=subprocess; the JAX engine,
weights pushed as safetensors bytes). SIGKILL of the worker mid-run stops the run with one
error and its last checkpoint intact; --resume with a new worker completes it, each prompt
batch trained once. `sigkill_through_resume` is shared with the vLLM worker's test
(test_remote_async_vllm.py)."""

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "loop"))
from test_loop_e2e import read, small_config  # noqa: E402
from test_loop_staleness import STEPS, expected_batches, recording_reward  # noqa: E402

from caspo_jax.loop import caspo as caspo_mod  # noqa: E402
from caspo_jax.remote import RemoteRolloutEngine  # noqa: E402
from caspo_jax.rollout.producer import RolloutEngineError  # noqa: E402

ASYNC_SUBPROCESS = [f"run.steps={STEPS}", "rollout.max_staleness=1", "rollout.workers=subprocess"]


def killing_reward(trained, kill_on_call, engines):
    """Records the trained prompt ids; on call `kill_on_call` (in step kill_on_call) SIGKILLs
    the worker process, as an out-of-memory kill or a lost host would."""

    def kill_worker():
        (info,) = engines[-1].info()
        os.kill(info["pid"], signal.SIGKILL)

    return recording_reward(trained, on_call=kill_on_call, action=kill_worker)


def sigkill_through_resume(cfg, out: Path, monkeypatch, tmp_path) -> list[dict]:
    """Runs `cfg` (remote workers, k = 1), SIGKILLs the worker during step 2, checks the one
    error and the checkpoints, resumes with a new worker and checks that every step ran once
    and each prompt batch was trained once; returns the metrics rows."""
    from caspo_jax.loop.setup import build_policy

    policy = build_policy(cfg.model, cfg.data)
    engines, trained = [], []
    make_remote = caspo_mod.make_remote_engine

    def recorded(*args, **kwargs):
        engine = make_remote(*args, **kwargs)
        engines.append(engine)
        return engine

    monkeypatch.setattr(caspo_mod, "make_remote_engine", recorded)
    monkeypatch.setattr(caspo_mod, "make_reward", killing_reward(trained, 2, engines))
    with pytest.raises(RolloutEngineError, match="rollout engine failed while generating step"):
        caspo_mod.run_caspo(cfg, out, policy=policy, progress=False, export=False)
    assert isinstance(engines[0], RemoteRolloutEngine) and not engines[0].handles  # closed at the stop
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    rows = read(out / "metrics.jsonl")
    assert saved == [r["step"] for r in rows] and saved[-1] >= 1  # every finished step saved, none half-written
    done = saved[-1]
    del trained[done:]  # the steps after the last checkpoint are trained again on resume
    monkeypatch.setattr(caspo_mod, "make_reward", killing_reward(trained, -1, engines))
    caspo_mod.run_caspo(cfg, out, policy=policy, progress=False, export=False, resume=True)
    rows = read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["async/staleness"] in (0.0, 1.0) for r in rows)
    assert trained == expected_batches(cfg, policy, tmp_path)
    return rows


@pytest.mark.slow
def test_k1_with_a_worker_process_survives_a_sigkill_through_resume(tmp_path, monkeypatch):
    env = "rollout.worker_env={JAX_PLATFORMS: cpu, XLA_FLAGS: '--xla_force_host_platform_device_count=1'}"
    cfg = small_config(tmp_path, *ASYNC_SUBPROCESS, "rollout.timeout_s=120", env)
    sigkill_through_resume(cfg, tmp_path / "run", monkeypatch, tmp_path)
