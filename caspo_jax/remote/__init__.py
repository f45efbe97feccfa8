"""Rollout workers in other processes or on other hosts (imported as ``caspo_jax.remote``).

    engine = RemoteRolloutEngine.subprocess(model, WorkerSpec.jax(model))   # this host
    engine = RemoteRolloutEngine.ray(model, WorkerSpec.vllm("/models/qwen"), workers=4, num_gpus=1)
    engine.sync_weights(params)     # safetensors-bytes buckets, rebuilt in the worker
    rollouts = engine.generate(prompts, n=8, sampling=SamplingParams(max_new_tokens=256))

The worker (``RolloutWorker``) is one plain class; orchestration is somebody else's
proven code: the standard library's process pool on one host, a Ray actor across hosts
(``pip install 'ray>=2.9'``, optional). Nothing here needs torch, vLLM or Ray to import.
"""

from caspo_jax.remote.client import RemoteRolloutEngine, encode_weight_buckets
from caspo_jax.remote.worker import RolloutWorker, WorkerSpec, params_from_hf

__all__ = ["RemoteRolloutEngine", "RolloutWorker", "WorkerSpec", "encode_weight_buckets", "params_from_hf"]
