"""The process-side half: a rollout engine that receives weights as safetensors bytes.

``RolloutWorker`` is deliberately a plain class with picklable arguments and results, so
the same object runs under ``concurrent.futures.ProcessPoolExecutor`` (one host) and as
a Ray actor (``ray.remote(RolloutWorker)``, other hosts). Weights arrive as buckets of
HF-named tensors in safetensors bytes (``caspo_jax.bridge.transport.encode_safetensors``):
- engine "jax": the bytes are decoded to NumPy, rebuilt into the JAX pytree with the
  model's checkpoint table (``params_from_hf``) and handed to ``JaxSampler``;
- engine "vllm": each bucket goes to the vLLM worker(s) with ``collective_rpc``
  (``load_safetensors_on_worker``), exactly the bridge's cross-process path, then the
  prefix and encoder caches are reset.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from caspo_jax.bridge.transport import in_process_worker, load_safetensors_on_worker, reset_engine_caches
from caspo_jax.models import qwen2_5_vl, qwen3_vl
from caspo_jax.models.common import weights
from caspo_jax.rollout import JaxSampler, VllmEngine


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker builds. engine: "jax" or "vllm". model_config: the HF config.json as a
    dict (the architecture; weights come later by ``load_weights``). model_dir: the HF
    directory vLLM starts from (tokenizer, processor, initial weights). env: variables set
    in the worker before JAX/vLLM import (CUDA_VISIBLE_DEVICES, JAX_PLATFORMS, ...)."""

    engine: str
    model_config: Mapping[str, Any]
    model_dir: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    engine_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.engine not in ("jax", "vllm"):
            raise ValueError(f"WorkerSpec.engine={self.engine!r}: use 'jax' or 'vllm'")
        if self.engine == "vllm" and not self.model_dir:
            raise ValueError("WorkerSpec.model_dir is required for engine='vllm' (an HF directory with tokenizer "
                             "and processor on the rollout host)")

    @classmethod
    def jax(cls, model, **kwargs) -> "WorkerSpec":
        return cls("jax", model.config.to_dict(), **kwargs)

    @classmethod
    def vllm(cls, model, model_dir: str, **kwargs) -> "WorkerSpec":
        return cls("vllm", model.config.to_dict(), model_dir=str(model_dir), **kwargs)


def build_model(config: Mapping[str, Any]):
    if config.get("model_type") == "qwen3_vl":
        return qwen3_vl.Qwen3VL(qwen3_vl.Qwen3VLConfig.from_dict(dict(config)))
    return qwen2_5_vl.Qwen2_5_VL(qwen2_5_vl.Qwen2_5_VLConfig.from_dict(dict(config)))


def params_from_hf(arrays: Mapping[str, np.ndarray], table):
    """The typed JAX weights from HF-named arrays (the inverse of ``iter_hf_arrays``)."""
    expected = {name for spec in table for name in spec.hf_names}
    missing = sorted(expected - set(arrays))
    if missing:
        raise ValueError(f"weight push incomplete: {len(missing)} tensors missing, e.g. {missing[:5]}")

    def leaf(spec):
        layers = [spec.to_ours(np.asarray(arrays[name])) for name in spec.hf_names]
        return jnp.asarray(layers[0] if spec.num_layers is None else np.stack(layers))

    return weights.build(table, leaf)


class RolloutWorker:
    """A rollout engine behind picklable calls (``load_weights``, ``generate``, ``info``)."""

    def __init__(self, spec: WorkerSpec):
        for key, value in spec.env.items():
            os.environ[key] = value
        self.spec = spec
        self.model = build_model(spec.model_config)
        self.engine = None
        self.version = -1  # no weights pushed yet (a vLLM engine serves its files meanwhile)
        if spec.engine == "vllm":
            kwargs = dict(spec.engine_kwargs)
            kwargs.setdefault("in_process", True)
            self.engine = VllmEngine.start(spec.model_dir, self.model, **kwargs)

    def info(self) -> dict:
        return {"pid": os.getpid(), "engine": self.spec.engine, "version": self.version,
                "backend": jax.default_backend(), "devices": jax.device_count()}

    def load_weights(self, buckets: Sequence[bytes], version: int = 0) -> int:
        """Replace the weights with these safetensors buckets (one full push); returns the
        number of tensors received."""
        if self.spec.engine == "vllm":
            llm, count = self.engine.llm, 0
            for data in buckets:
                if self.engine.transport == "in_process":
                    count += load_safetensors_on_worker(in_process_worker(llm), data)
                else:
                    count += sum(llm.collective_rpc(load_safetensors_on_worker, args=(data,))[:1])
            reset_engine_caches(llm)
            self.engine.version = version
        else:
            arrays: dict = {}
            for data in buckets:
                arrays.update(safetensors.numpy.load(data))
            params = params_from_hf(arrays, self.model.param_table())
            if self.engine is None:
                self.engine = JaxSampler(self.model, params, version=version, **dict(self.spec.engine_kwargs))
            else:
                self.engine.sync_weights(params, version)
            count = len(arrays)
        self.version = version
        return count

    def generate(self, prompts, n: int, sampling):
        if self.engine is None:
            raise RuntimeError("RolloutWorker.generate before load_weights: push weights first (sync_weights)")
        rollouts = self.engine.generate(list(prompts), n=n, sampling=sampling)
        return dataclasses.replace(rollouts, version=self.version)


# -- process-pool plumbing: one worker object per pool process -----------------------
_WORKER: RolloutWorker | None = None


def exit_with_parent(poll_s: float = 1.0) -> threading.Thread:
    """Ends this process (exit code 1) once the process that spawned it is gone: a trainer
    killed by SIGKILL or the OOM killer runs no clean-up, and an orphaned worker would keep
    its accelerator's memory and its vLLM engine until someone finds it. A daemon thread
    polls the parent pid (portable, unlike PR_SET_PDEATHSIG, which fires when the spawning
    *thread* ends)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def _init_process(spec: WorkerSpec) -> None:
    global _WORKER
    exit_with_parent()  # first: a parent that dies during a long engine start-up ends us too
    _WORKER = RolloutWorker(spec)


def _call(method: str, *args, **kwargs):
    if _WORKER is None:
        raise RuntimeError("rollout worker process was not initialised")
    return getattr(_WORKER, method)(*args, **kwargs)
