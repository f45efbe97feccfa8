"""The weight bridge: JAX parameter pytree -> HF-named PyTorch tensors -> a rollout engine.

``hf_tensors`` converts (the inverse of the checkpoint table, leaf by leaf, bucketed),
``transport`` pushes into vLLM (in-process iterator or safetensors bytes), ``verify``
checks the engine's log-probs against JAX's and names the first bad tensor. Importing
the package needs neither torch nor vllm.
"""

from caspo_jax.bridge.hf_tensors import hf_tensor_refs, iter_buckets, iter_hf_arrays, iter_torch_tensors
from caspo_jax.bridge.verify import WeightSyncError, jax_prompt_logprobs, verify_sync, vllm_slots

__all__ = ["WeightSyncError", "hf_tensor_refs", "iter_buckets", "iter_hf_arrays", "iter_torch_tensors",
           "jax_prompt_logprobs", "verify_sync", "vllm_slots"]
