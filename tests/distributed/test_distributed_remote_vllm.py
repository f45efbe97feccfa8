"""A vLLM engine in another process, fed by the bytes transport: after a push of trained
weights its greedy rollouts equal the JAX sampler's with the same weights.

Runs only in the vLLM environment: ``/work/venv-vllm/bin/python -m pytest -m vllm tests/distributed``.
Tolerance: float32 log-probs within 1e-4 (as tests/rollout/test_rollout_vllm.py).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here (build it with scripts/vllm_env.sh)")

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "rollout"))
from _rollout_vllm_fixtures import build_checkpoint, make_prompts  # noqa: E402

from caspo_jax.models import load_pretrained  # noqa: E402
from caspo_jax.remote import RemoteRolloutEngine, WorkerSpec  # noqa: E402
from caspo_jax.rollout import JaxSampler, SamplingParams  # noqa: E402


def test_vllm_worker_in_another_process_uses_pushed_weights(tmp_path):
    path, processor, eos = build_checkpoint(tmp_path / "ckpt")
    model, params = load_pretrained(path)
    # "trained" weights the checkpoint on disk does not have
    pushed = jax.tree.map(lambda x: x * 1.5 if x.ndim >= 2 else x, params)
    prompts = make_prompts(processor)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    spec = WorkerSpec.vllm(model, path, engine_kwargs=dict(max_model_len=512, kv_cache_memory_bytes=64 * 2**20))
    with RemoteRolloutEngine.subprocess(model, spec, bucket_bytes=256 * 1024, timeout=900) as remote:
        before = remote.generate(prompts, n=1, sampling=greedy)
        remote.sync_weights(pushed)
        after = remote.generate(prompts, n=1, sampling=greedy)
    ours = JaxSampler(model, pushed, eos_token_ids=(eos,)).generate(prompts, n=1, sampling=greedy)
    np.testing.assert_array_equal(after.tokens, ours.tokens)
    np.testing.assert_allclose(after.logprobs, ours.logprobs, atol=1e-4)
    assert not np.array_equal(before.tokens, after.tokens)
