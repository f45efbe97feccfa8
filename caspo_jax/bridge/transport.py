"""Moving HF-named tensors into a vLLM engine.

Built:
- in-process (JAX and vLLM in one Python process): the worker's ``reload_weights`` reads a
  lazy iterator of torch tensors that share memory with the gathered JAX arrays (host
  NumPy views, or DLPack, which stays on the GPU when both frameworks share it), so a
  push holds about one tensor at a time on the host;
- safetensors bytes: buckets of at most ``bucket_bytes`` serialised with ``safetensors``
  and loaded by ``load_safetensors_on_worker`` inside the engine's worker(s) through
  ``collective_rpc`` (vLLM engines in another process; the same bytes can cross hosts
  over any byte channel).
Planned (not built): an NCCL/``StatelessProcessGroup`` broadcast for GPU-to-GPU pushes
across processes and hosts.

After every push the prefix cache and the encoder caches are reset, so no stale KV or
vision feature survives the weights that produced it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import safetensors.numpy


def encode_safetensors(items: Iterable[tuple]) -> bytes:
    """One bucket of (name, NumPy array or torch tensor) as safetensors bytes."""
    items = list(items)
    if items and not isinstance(items[0][1], np.ndarray):
        from safetensors.torch import save

        return save({name: t.contiguous() for name, t in items})
    return safetensors.numpy.save({name: np.ascontiguousarray(a) for name, a in items})


def decode_safetensors(data: bytes) -> dict:
    """Bytes from ``encode_safetensors`` back to {name: torch tensor}."""
    from safetensors.torch import load

    return load(data)


def load_safetensors_on_worker(worker, data: bytes) -> int:
    """Runs inside a vLLM worker (``collective_rpc``): load one bucket in place; returns its count."""
    from safetensors.torch import load

    tensors = load(data)
    worker.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
    return len(tensors)


def reset_engine_caches(llm) -> None:
    """Drop every cache derived from the old weights: prefix KV, encoder outputs, mm inputs."""
    llm.reset_prefix_cache()
    engine = llm.llm_engine
    if hasattr(engine, "reset_encoder_cache"):
        engine.reset_encoder_cache()
    if hasattr(llm, "reset_mm_cache"):
        llm.reset_mm_cache()


def in_process_worker(llm):
    """The worker of an in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni executor) engine."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker
    except AttributeError as err:
        raise RuntimeError(
            "the vLLM engine is not in-process: start it with VLLM_ENABLE_V1_MULTIPROCESSING=0 and "
            "distributed_executor_backend='uni', or use transport='safetensors'") from err


def push_in_process(llm, items: Iterator[tuple]) -> None:
    """Stream (HF name, torch tensor) items into the in-process worker, then reset caches."""
    in_process_worker(llm).reload_weights(weights_iterator=items, is_checkpoint_format=True)
    reset_engine_caches(llm)


def push_safetensors(llm, buckets: Iterable[list[tuple]]) -> int:
    """Send each bucket as safetensors bytes to every worker, then reset caches; returns bytes sent."""
    sent = 0
    for bucket in buckets:
        data = encode_safetensors(bucket)
        sent += len(data)
        llm.collective_rpc(load_safetensors_on_worker, args=(data,))
    reset_engine_caches(llm)
    return sent


class Timer:
    """Wall-clock seconds of a block (``with Timer() as t: ...; t.seconds``)."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
