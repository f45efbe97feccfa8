"""The trainer-side half: ``RemoteRolloutEngine`` (the ``RolloutEngine`` protocol) over
workers in other processes (stdlib process pool) or on other hosts (Ray actors).

A weight push gathers the parameters to the host one HF tensor at a time
(``iter_hf_arrays``), groups them into buckets and serialises each with safetensors;
every worker receives the same bytes (Ray: put once in the object store). ``generate``
splits the prompts into contiguous chunks, one per worker, and concatenates the results
in prompt order, so the output equals one engine's.

Weight versions: every worker runs its calls one at a time in submission order (a
one-process pool; a Ray actor), and one lock makes each ``generate`` submit to every
worker before any push (or after it), so all parts of a batch come from the same version
(checked: the parts' versions must agree) and a push waits for the generation in flight.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import jax
import numpy as np

from caspo_jax.bridge.hf_tensors import iter_buckets, iter_hf_arrays
from caspo_jax.bridge.transport import encode_safetensors
from caspo_jax.bridge.verify import vllm_module_order
from caspo_jax.distributed import gather_to_host
from caspo_jax.process_env import call_with_env
from caspo_jax.remote.worker import RolloutWorker, WorkerSpec, _call, _init_process
from caspo_jax.rollout import Rollouts, SamplingParams


def _spans_processes(params) -> bool:
    """True when some leaf is a global array this process holds only part of."""
    return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(params))


def encode_weight_buckets(params, model, bucket_bytes: int = 256 * 2**20, dtype=None) -> list[bytes]:
    """The full state dict as safetensors-bytes buckets (what crosses the process/host boundary).

    With parameters sharded over several trainer processes this is a collective (every
    process calls it; each leaf is all-gathered to the host in ``dtype``) and every process
    gets the same buckets. Host copies (what `Placement.sampler_params` gives a multi-process
    run) need no collective, so a rollout thread may push them while the trainer updates."""
    if _spans_processes(params):
        cast = (lambda x: x.astype(dtype)) if dtype is not None else (lambda x: x)
        params = jax.tree.map(lambda x: gather_to_host(cast(x)), params)
    # Grouped by the vLLM module that receives them: vLLM processes a fused module (q/k/v,
    # gate/up) once per load, so a bucket must never split one (harmless for JAX workers).
    order, module_of = vllm_module_order(model.param_table())
    items = iter_hf_arrays(params, model.param_table(), dtype=dtype, names=order)
    return [encode_safetensors(bucket) for bucket in iter_buckets(items, bucket_bytes, group_of=module_of.get)]


class _PoolHandle:
    """One worker in its own spawned process (a one-process pool keeps the worker alive)."""

    def __init__(self, spec: WorkerSpec):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds JAX
        # spec.env is set before the worker's modules (and JAX) are imported: see process_env
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=call_with_env,
                                        initargs=(dict(spec.env), pickle.dumps((_init_process, (spec,)))))

    def submit(self, method, *args, **kwargs):
        return self.pool.submit(_call, method, *args, **kwargs)

    @staticmethod
    def result(future, timeout=None):
        return future.result(timeout)

    def put(self, value):
        return value

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


class _RayHandle:
    """One worker as a Ray actor (``ray.init`` first: ``ray.init(address="auto")`` on a cluster)."""

    def __init__(self, spec: WorkerSpec, **actor_options):
        import ray

        # the actor's process starts with spec.env (Ray's runtime_env), so JAX reads it at import
        runtime_env = dict(actor_options.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {**spec.env, **runtime_env.get("env_vars", {})}
        self.ray = ray
        self.actor = ray.remote(RolloutWorker).options(runtime_env=runtime_env, **actor_options).remote(spec)

    def submit(self, method, *args, **kwargs):
        return getattr(self.actor, method).remote(*args, **kwargs)

    def result(self, ref, timeout=None):
        return self.ray.get(ref, timeout=timeout)

    def put(self, value):
        return self.ray.put(value)

    def close(self):
        self.ray.kill(self.actor)


def _concat_rollouts(parts, counts):
    versions = sorted({p.version for p in parts})
    if len(versions) > 1:
        raise RuntimeError(f"rollout workers answered one batch with weight versions {versions}: a push reached "
                           "some workers before the generation; every worker must serve a batch with one version")
    width = max(p.tokens.shape[1] for p in parts)

    def pad(x):
        return np.pad(x, ((0, 0), (0, width - x.shape[1])))

    offsets = np.cumsum([0] + list(counts[:-1]))
    return Rollouts(tokens=np.concatenate([pad(p.tokens) for p in parts]),
                    logprobs=np.concatenate([pad(p.logprobs) for p in parts]),
                    mask=np.concatenate([pad(p.mask) for p in parts]),
                    finish_reason=np.concatenate([p.finish_reason for p in parts]),
                    prompt_index=np.concatenate([p.prompt_index + o for p, o in zip(parts, offsets)]),
                    version=versions[0])


class RemoteRolloutEngine:
    """``generate`` / ``sync_weights`` over one or more remote ``RolloutWorker``s."""

    def __init__(self, model, handles, *, bucket_bytes: int = 256 * 2**20, push_dtype=None,
                 timeout: float | None = None):
        self.model = model
        self.handles = list(handles)
        self.bucket_bytes = bucket_bytes
        self.push_dtype = push_dtype
        self.timeout = timeout
        self.version = 0
        self.last_push_bytes = 0
        self._order = threading.Lock()  # a generate reaches every worker before (or after) a push

    @classmethod
    def subprocess(cls, model, spec: WorkerSpec, workers: int = 1, **kwargs) -> "RemoteRolloutEngine":
        """Workers in spawned processes on this host (standard library only)."""
        return cls(model, [_PoolHandle(spec) for _ in range(workers)], **kwargs)

    @classmethod
    def ray(cls, model, spec: WorkerSpec, workers: int = 1, *, actor_options: dict | None = None,
            **kwargs) -> "RemoteRolloutEngine":
        """Workers as Ray actors, placed by Ray anywhere in the cluster (e.g. ``num_gpus=1``)."""
        try:
            import ray  # noqa: F401
        except ImportError as err:
            raise ImportError("RemoteRolloutEngine.ray needs Ray: pip install 'ray>=2.9' on every host, "
                              "or use RemoteRolloutEngine.subprocess on one host") from err
        return cls(model, [_RayHandle(spec, **(actor_options or {})) for _ in range(workers)], **kwargs)

    def _gather(self, futures):
        return [h.result(f, self.timeout) for h, f in zip(self.handles, futures)]

    def info(self) -> list[dict]:
        return self._gather([h.submit("info") for h in self.handles])

    def sync_weights(self, params, version: int | None = None) -> None:
        """Push the full state dict to every worker as weight version ``version`` (None: the
        current + 1); each worker loads it after the generation it is serving. With several
        trainer processes each has its own workers (its share of the prompts) and pushes to
        them; given global arrays, every process must call this (the gather is a collective)."""
        buckets = encode_weight_buckets(params, self.model, self.bucket_bytes, self.push_dtype)
        self.last_push_bytes = sum(len(b) for b in buckets)
        version = self.version + 1 if version is None else int(version)
        expected = sum(len(spec.hf_names) for spec in self.model.param_table())
        payload = [h.put(buckets) for h in self.handles]
        with self._order:
            futures = [h.submit("load_weights", p, version) for h, p in zip(self.handles, payload)]
        counts = self._gather(futures)
        self.version = version
        if any(c != expected for c in counts):
                raise RuntimeError(f"weight push v{version}: workers loaded {counts} tensors, expected {expected}")

    def generate(self, prompts: Sequence, *, n: int = 1, sampling=None):
        sampling = sampling or SamplingParams()
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate: no prompts")
        k = min(len(self.handles), len(prompts))
        # keep every prompt's seed what one engine would give it (seed + global index)
        prompts = [p if p.seed is not None else dataclasses.replace(p, seed=sampling.seed + i)
                   for i, p in enumerate(prompts)]
        chunks = np.array_split(np.arange(len(prompts)), k)
        with self._order:
            futures = [h.submit("generate", [prompts[i] for i in c], n, sampling)
                       for h, c in zip(self.handles, chunks)]
        parts = [h.result(f, self.timeout) for h, f in zip(self.handles, futures)]
        return parts[0] if k == 1 else _concat_rollouts(parts, [len(c) for c in chunks])

    def close(self) -> None:
        for h in self.handles:
            h.close()
        self.handles = []

    shutdown = close  # what `run_caspo` calls on its rollout engine at the end

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
