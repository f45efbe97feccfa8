"""rollout.workers=ray from the run config, without a Ray cluster: a stand-in `ray` module
runs each "actor" in this process, so the test checks what `make_remote_engine` asks of Ray
-- the address (only when Ray is not initialised yet), one actor per worker with
rollout.worker_gpus GPUs and rollout.worker_env in its runtime_env, the weights put once
per push -- and that the actors serve the pushed weights: their rollouts equal the JAX
sampler's with the same weights (greedy)."""

import sys
import types

import jax
import numpy as np
import pytest

from caspo_jax.loop.caspo import make_remote_engine
from caspo_jax.loop.config import load_config
from caspo_jax.loop.setup import build_policy
from caspo_jax.remote.worker import RolloutWorker
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)  # the "object ref" is the result itself


class _Actor:
    def __init__(self, worker):
        self.worker = worker

    def __getattr__(self, name):
        return _Method(getattr(self.worker, name))


def fake_ray(calls: dict, initialized: bool) -> types.ModuleType:
    ray = types.ModuleType("ray")
    ray.is_initialized = lambda: initialized
    ray.init = lambda address: calls.setdefault("init", []).append(address)

    def remote(cls):
        assert cls is RolloutWorker

        class Options:
            def options(self, **options):
                calls.setdefault("options", []).append(options)
                return types.SimpleNamespace(remote=lambda spec: _Actor(cls(spec)))

        return Options()

    ray.remote = remote
    ray.put = lambda value: calls.setdefault("put", []).append(len(value)) or value
    ray.get = lambda ref, timeout=None: ref
    ray.kill = lambda actor: calls.setdefault("killed", []).append(actor)
    return ray


@pytest.mark.parametrize("initialized", [False, True])
def test_ray_workers_come_from_the_config_and_serve_the_pushed_weights(monkeypatch, initialized):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "ray", fake_ray(calls, initialized))
    monkeypatch.setenv("CASPO_TEST_WORKER_ENV", "unset")  # the in-process "actor" sets it; restored after
    cfg = load_config(preset="tiny-cpu", overrides=[
        "model.tiny=test", "rollout.workers=ray", "rollout.num_workers=2", "rollout.worker_gpus=0.5",
        "rollout.ray_address=ray://head:10001", "rollout.worker_env={CASPO_TEST_WORKER_ENV: set}"])
    policy = build_policy(cfg.model, cfg.data)
    pushed = jax.tree.map(lambda x: x * 1.5 if x.ndim >= 2 else x, policy.params)
    engine = make_remote_engine(cfg, policy, pushed, version=3)
    assert calls.get("init") == (None if initialized else ["ray://head:10001"])
    assert len(calls["options"]) == 2 and all(o["num_gpus"] == 0.5 for o in calls["options"])
    assert all(o["runtime_env"]["env_vars"] == {"CASPO_TEST_WORKER_ENV": "set"} for o in calls["options"])
    assert len(calls["put"]) == 2 and calls["put"][0] >= 1  # one bucket list per actor, one push
    rng = np.random.default_rng(0)
    prompts = [RolloutPrompt(rng.integers(0, 200, n)) for n in (5, 9, 7)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    got = engine.generate(prompts, n=1, sampling=greedy)
    want = JaxSampler(policy.model, pushed, eos_token_ids=policy.eos_ids).generate(prompts, n=1, sampling=greedy)
    assert got.version == 3
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    engine.close()
    assert len(calls["killed"]) == 2
