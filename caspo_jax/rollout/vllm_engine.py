"""vLLM behind the rollout interface, fed by the weight bridge.

vLLM is imported only when an engine is started. Prompts go in as token ids (image
placeholder runs collapsed to one ``<|image_pad|>`` each, which vLLM's processor expands
again from the images) plus the already-resized PIL images; the ids vLLM ends up with
are checked against ours, so a resize disagreement (different image-token counts)
raises instead of silently training on other prompts.

Semantics match ``JaxSampler``: eos ids and ``stop_token_ids`` both go to vLLM as stop
tokens (``ignore_eos``), the terminating token stays in the response, the reason is "eos"
for an eos id and "stop" otherwise; log-probs are vLLM's default raw (unmodified) ones;
sample j of a prompt seeded s uses seed s + j (vLLM's own rule for n > 1).

Weight versions: ``LLM.generate`` runs every request of a call to completion before it
returns, and one lock serialises ``generate``, ``prompt_logprobs`` and ``sync_weights``, so a
push from another thread waits for the call in flight: a request is served by one version
from start to end, and the version it reports is the one installed when it started. After
every push the prefix cache and the encoder (image-embedding) cache are reset
(``bridge.transport.reset_engine_caches``): a repeated image after a push is encoded again
with the new weights (vllm#44910).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from caspo_jax.bridge.hf_tensors import iter_buckets, iter_hf_arrays, iter_torch_tensors
from caspo_jax.bridge.transport import Timer, push_in_process, push_safetensors
from caspo_jax.bridge.verify import verify_sync, vllm_module_order
from caspo_jax.rollout.jax_engine import default_eos_ids, multimodal_token_ids
from caspo_jax.rollout.types import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, RolloutPrompt, Rollouts, SamplingParams

IN_PROCESS_DEFAULTS = dict(distributed_executor_backend="uni", enforce_eager=True)


def collapse_image_tokens(token_ids: np.ndarray, image_token_id: int) -> list[int]:
    """Each run of ``image_token_id`` replaced by a single one (vLLM expands it from the image)."""
    ids = np.asarray(token_ids).tolist()
    out: list[int] = []
    for t in ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(t)
    return out


# Far below any real logit, finite so vLLM's bias arithmetic stays free of inf - inf.
SUPPRESS_BIAS = -1e9


CPU_KV_CACHE_BYTES = 256 * 2**20  # vLLM-CPU's KV cache unless told otherwise (its own default is GiBs)


def kv_cache_bytes(requested: int | str | None, *, cuda: bool) -> int | None:
    """`VllmEngine.start`'s KV-cache bound: "auto" is None on a CUDA host (vLLM sizes the
    cache within gpu_memory_utilization) and CPU_KV_CACHE_BYTES on a CPU host; anything
    else is returned as given. Decided where the engine runs: a trainer cannot see a
    remote worker's host."""
    if requested == "auto":
        return None if cuda else CPU_KV_CACHE_BYTES
    return requested


class VllmEngine:
    """``generate`` / ``sync_weights`` over a vLLM ``LLM``.

    llm: a started ``vllm.LLM`` serving the same architecture as ``model`` (the JAX
    ``Qwen2_5_VL`` whose table names the tensors). transport: "in_process" (the worker's
    ``reload_weights`` reads a lazy iterator; the engine must be in-process) or
    "safetensors" (bytes in buckets of ``bucket_bytes`` through ``collective_rpc``, for
    engines in other processes). dlpack: hand single-device JAX arrays to torch via DLPack.
    Our parameters are stored in HF's layouts, so in-process the loader reads zero-copy
    views of them.
    suppress_token_ids: ids never sampled, as in ``JaxSampler`` (default: the multimodal
    placeholders; ``()`` turns it off), applied as a ``logit_bias`` of ``SUPPRESS_BIAS``:
    vLLM reports log-probs of the unbiased distribution, so they still match JAX's.
    version: the weight version the engine serves (0: the files it started from).
    """

    def __init__(self, llm, model, *, eos_token_ids: Sequence[int] | None = None, transport: str = "in_process",
                 bucket_bytes: int = 256 * 2**20, dlpack: bool = False,
                 suppress_token_ids: Sequence[int] | None = None):
        if transport not in ("in_process", "safetensors"):
            raise ValueError(f"transport={transport!r}: use 'in_process' or 'safetensors'")
        self.llm = llm
        self.model = model
        self.eos_token_ids = tuple(default_eos_ids(model) if eos_token_ids is None else eos_token_ids)
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self.dlpack = dlpack
        self.last_sync_seconds: float | None = None
        ids = multimodal_token_ids(model) if suppress_token_ids is None else suppress_token_ids
        self.logit_bias = {int(i): SUPPRESS_BIAS for i in ids} or None
        self.version = 0
        self._lock = threading.RLock()  # one caller in the engine at a time (pushes wait)

    @classmethod
    def start(cls, model_dir, model, *, dtype: str = "float32", max_model_len: int = 1024,
              kv_cache_memory_bytes: int | str | None = "auto", seed: int = 0, in_process: bool = True,
              llm_kwargs: dict | None = None, **engine_kwargs) -> "VllmEngine":
        """Start ``vllm.LLM`` on an HF directory (config, weights, tokenizer, preprocessor).

        in_process=True runs the engine in this process (no worker process; required for
        the in-process transport). ``kv_cache_memory_bytes``: a bound on the KV cache, None
        to let vLLM size it within ``gpu_memory_utilization``, or "auto"
        (`kv_cache_bytes`: None on a CUDA host, ``CPU_KV_CACHE_BYTES`` on a CPU one).
        """
        import torch  # installed with vLLM

        kv_cache_memory_bytes = kv_cache_bytes(kv_cache_memory_bytes, cuda=torch.cuda.is_available())
        kwargs = dict(dtype=dtype, max_model_len=max_model_len, seed=seed)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            kwargs.update(IN_PROCESS_DEFAULTS)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
            # the bytes transport sends a function (load_safetensors_on_worker) to the workers
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        kwargs.update(llm_kwargs or {})
        from vllm import LLM

        llm = LLM(str(model_dir), **kwargs)
        if not in_process:
            engine_kwargs.setdefault("transport", "safetensors")
        return cls(llm, model, **engine_kwargs)

    def shutdown(self) -> None:
        """Stop the engine (its worker processes, if any) and drop it."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None

    # ----- requests ---------------------------------------------------------------
    def _request(self, prompt: RolloutPrompt) -> dict:
        image_id = self.model.config.image_token_id
        request = {"prompt_token_ids": collapse_image_tokens(prompt.token_ids, image_id)}
        if prompt.num_images:
            if len(prompt.images) != prompt.num_images:
                raise ValueError(f"RolloutPrompt has {prompt.num_images} image grids but {len(prompt.images)} PIL "
                                 "images: the vLLM engine needs `images` (resized with the shared min/max pixels)")
            request["multi_modal_data"] = {"image": list(prompt.images)}
        return request

    def _check_prompt_ids(self, outputs, prompts) -> None:
        for i, (out, prompt) in enumerate(zip(outputs, prompts)):
            theirs = np.asarray(out.prompt_token_ids)
            if theirs.shape != prompt.token_ids.shape or not np.array_equal(theirs, prompt.token_ids):
                image_id = self.model.config.image_token_id
                raise ValueError(
                    f"prompt {i}: vLLM built {len(theirs)} prompt tokens ({int((theirs == image_id).sum())} image "
                    f"tokens), ours has {len(prompt.token_ids)} ({int((prompt.token_ids == image_id).sum())}): "
                    "resize images with the same min/max pixels on both sides (caspo_jax.data.images."
                    "resize_image with the processor's settings) before building the prompt")

    def generate(self, prompts: Sequence[RolloutPrompt], *, n: int = 1, sampling: SamplingParams = SamplingParams()
                 ) -> Rollouts:
        from vllm import SamplingParams as VllmSampling

        terminators = sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids))
        # vLLM refuses temperature 0 with n > 1; greedy samples are all the same sequence,
        # so one is generated and repeated n times (as the JAX sampler's n greedy rows)
        copies = n if sampling.temperature == 0 else 1
        params = []
        for i, prompt in enumerate(prompts):
            seed = prompt.seed if prompt.seed is not None else sampling.seed + i
            params.append(VllmSampling(
                n=n // copies, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
                max_tokens=sampling.max_new_tokens, stop_token_ids=terminators, ignore_eos=True, seed=seed,
                logprobs=0, skip_special_tokens=False, detokenize=False, logit_bias=self.logit_bias))
        with self._lock:
            version = self.version
            outputs = self.llm.generate([self._request(p) for p in prompts], params, use_tqdm=False)
        self._check_prompt_ids(outputs, prompts)
        samples = [(i, c) for i, out in enumerate(outputs) for c in sorted(out.outputs, key=lambda c: c.index)
                   for _ in range(copies)]
        width = max(max(len(c.token_ids) for _, c in samples), 1)
        S = len(samples)
        tokens = np.zeros((S, width), np.int32)
        logps = np.zeros((S, width), np.float32)
        mask = np.zeros((S, width), bool)
        reasons = []
        eos = set(self.eos_token_ids)
        for s, (_, c) in enumerate(samples):
            ids = list(c.token_ids)
            tokens[s, : len(ids)] = ids
            logps[s, : len(ids)] = [step[t].logprob for t, step in zip(ids, c.logprobs)]
            mask[s, : len(ids)] = True
            if c.finish_reason == "length":
                reasons.append(FINISH_LENGTH)
            else:
                reasons.append(FINISH_EOS if ids and ids[-1] in eos else FINISH_STOP)
        return Rollouts(tokens=tokens, logprobs=logps, mask=mask, finish_reason=np.asarray(reasons),
                        prompt_index=np.asarray([i for i, _ in samples], np.int32), version=version)

    def prompt_logprobs(self, prompts: Sequence[RolloutPrompt]) -> list[np.ndarray]:
        """log p(token t | tokens < t) for t = 1..L-1 of every prompt, float32 [L-1] each."""
        from vllm import SamplingParams as VllmSampling

        sp = VllmSampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        with self._lock:
            outputs = self.llm.generate([self._request(p) for p in prompts], sp, use_tqdm=False)
        self._check_prompt_ids(outputs, prompts)
        return [np.asarray([step[int(t)].logprob for t, step in zip(p.token_ids[1:], out.prompt_logprobs[1:])],
                           np.float32) for p, out in zip(prompts, outputs)]

    # ----- weights ----------------------------------------------------------------
    def sync_weights(self, params, version: int | None = None, *, probes: Sequence[RolloutPrompt] | None = None,
                     atol: float = 1e-4) -> None:
        """Push the trainer's parameters as weight version ``version`` (None: the current + 1),
        after any call in flight, then reset the prefix and encoder caches. With ``probes``,
        verify vLLM's prompt log-probs against JAX's afterwards (``bridge.verify_sync``)."""
        table = self.model.param_table()
        with self._lock, Timer() as timer:
            if self.transport == "in_process":
                push_in_process(self.llm, iter_torch_tensors(params, table, dlpack=self.dlpack))
            else:
                order, module_of = vllm_module_order(table)
                buckets = iter_buckets(iter_hf_arrays(params, table, names=order), self.bucket_bytes,
                                       group_of=module_of.get)
                push_safetensors(self.llm, buckets)
            self.version = self.version + 1 if version is None else int(version)
        self.last_sync_seconds = timer.seconds
        if probes:
            verify_sync(self, params, probes, atol=atol)
