"""Rollout engines behind one interface: ``generate(prompts, n=, sampling=) -> Rollouts``.

``JaxSampler`` (the default; the only engine on TPU/CPU) and ``VllmEngine`` (GPU hosts;
imports vllm only when constructed). Importing this package needs neither vllm nor torch.
"""

from caspo_jax.rollout.jax_engine import JaxSampler, bucket
from caspo_jax.rollout.sampling import filter_logits, sample_keys, sample_tokens
from caspo_jax.rollout.vllm_engine import VllmEngine
from caspo_jax.rollout.types import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP, RolloutEngine, RolloutPrompt, Rollouts,
                                     SamplingParams, prompt_arrays)

__all__ = [
    "FINISH_EOS", "FINISH_LENGTH", "FINISH_STOP", "JaxSampler", "RolloutEngine", "RolloutPrompt", "Rollouts",
    "SamplingParams", "VllmEngine", "bucket", "filter_logits", "prompt_arrays", "sample_keys", "sample_tokens",
]
