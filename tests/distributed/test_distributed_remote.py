"""A rollout worker in another process receives weights as safetensors-bytes buckets and
generates with them: its rollouts equal an in-process JaxSampler's with the same weights
(same tokens, log-probs within 1e-5), before and after a second push."""

import jax
import numpy as np
import pytest

from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.remote import RemoteRolloutEngine, WorkerSpec, encode_weight_buckets, params_from_hf
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams
from caspo_jax.tiny import models as tm

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=6, seed=5)


@pytest.fixture(scope="module")
def world():
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("text")))
    init = jax.jit(model.init)
    return model, init(jax.random.key(0)), init(jax.random.key(1))


def prompts():
    rng = np.random.default_rng(0)
    return [RolloutPrompt(rng.integers(0, tm.VOCAB - 8, n)) for n in (5, 9)]


def test_params_round_trip_through_bytes(world):
    model, params, _ = world
    from safetensors.numpy import load

    arrays = {}
    for data in encode_weight_buckets(params, model, bucket_bytes=64 * 1024):
        arrays.update(load(data))
    back = params_from_hf(arrays, model.param_table())
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    del arrays[next(iter(arrays))]
    with pytest.raises(ValueError, match="1 tensors missing"):
        params_from_hf(arrays, model.param_table())


@pytest.mark.slow
def test_subprocess_worker_generates_with_pushed_weights(world):
    model, params, other = world
    spec = WorkerSpec.jax(model, env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    local = JaxSampler(model, params)
    with RemoteRolloutEngine.subprocess(model, spec, bucket_bytes=64 * 1024, timeout=600) as remote:
        with pytest.raises(RuntimeError, match="before load_weights"):
            remote.generate(prompts(), n=2, sampling=SAMPLING)
        remote.sync_weights(params)
        (info,) = remote.info()
        assert info["version"] == 1 and info["pid"] != __import__("os").getpid() and remote.last_push_bytes > 0
        for weights in (params, other):
            if weights is other:
                remote.sync_weights(other)
                local.sync_weights(other)
            got = remote.generate(prompts(), n=2, sampling=SAMPLING)
            want = local.generate(prompts(), n=2, sampling=SAMPLING)
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_array_equal(got.mask, want.mask)
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
            assert list(got.prompt_index) == [0, 0, 1, 1]
            if weights is params:
                first = got.tokens
        assert not np.array_equal(first, got.tokens)  # the second push took effect


class _InProcessHandle:
    """A worker handle without a process (the split/concatenate logic, cheaply)."""

    def __init__(self, spec):
        from caspo_jax.remote import RolloutWorker

        self.worker = RolloutWorker(spec)

    def submit(self, method, *args, **kwargs):
        from concurrent.futures import Future

        future = Future()
        future.set_result(getattr(self.worker, method)(*args, **kwargs))
        return future

    result = staticmethod(lambda future, timeout=None: future.result(timeout))
    put = staticmethod(lambda value: value)
    close = staticmethod(lambda: None)


def test_prompts_split_over_workers_equal_one_engine(world):
    model, params, _ = world
    spec = WorkerSpec.jax(model)
    remote = RemoteRolloutEngine(model, [_InProcessHandle(spec), _InProcessHandle(spec)])
    remote.sync_weights(params)
    many = prompts() + prompts()[::-1]  # 4 prompts -> 2 per worker
    got = remote.generate(many, n=2, sampling=SAMPLING)
    want = JaxSampler(model, params).generate(many, n=2, sampling=SAMPLING)
    assert got.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
