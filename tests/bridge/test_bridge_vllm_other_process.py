"""The safetensors-bytes transport into a vLLM engine running in another process (real vLLM).

Runs only in the vLLM environment (``-m vllm``). Tolerance: float32 prompt log-probs
within 1e-4 of JAX after the push.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here (build it with scripts/vllm_env.sh)")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "rollout"))

import jax  # noqa: E402
from _rollout_vllm_fixtures import build_checkpoint, make_prompts  # noqa: E402

from caspo_jax.bridge import WeightSyncError, verify_sync  # noqa: E402
from caspo_jax.models import load_pretrained  # noqa: E402
from caspo_jax.rollout import SamplingParams, VllmEngine  # noqa: E402


def test_bytes_transport_pushes_into_a_multiprocess_engine(tmp_path):
    path, processor, _ = build_checkpoint(tmp_path / "ckpt")
    model, params = load_pretrained(path)
    prompts = make_prompts(processor)
    engine = VllmEngine.start(path, model, in_process=False, max_model_len=512, kv_cache_memory_bytes=64 * 2**20,
                              bucket_bytes=512 * 1024)
    try:
        assert engine.transport == "safetensors"
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
        before = engine.generate(prompts, n=1, sampling=greedy)
        other = jax.tree.map(lambda x: x * 1.3, params)
        engine.sync_weights(other, probes=prompts)  # verified within 1e-4 after the push
        with pytest.raises(WeightSyncError, match="not in-process"):
            verify_sync(engine, params, prompts)  # the engine holds `other` now
        changed = engine.generate(prompts, n=1, sampling=greedy)
        assert not np.allclose(changed.logprobs, before.logprobs)
        engine.sync_weights(params, probes=prompts)
        after = engine.generate(prompts, n=1, sampling=greedy)
        np.testing.assert_array_equal(after.tokens, before.tokens)
        np.testing.assert_array_equal(after.logprobs, before.logprobs)
    finally:
        engine.shutdown()
