"""One GPU shared by the JAX trainer and an in-process vLLM engine: the memory split, and
vLLM's sleep mode around the update.

Why: JAX preallocates 75% of a GPU's memory when its backend starts and vLLM takes
``gpu_memory_utilization`` of the same GPU, so without a plan the second to start fails
(or both run out). ``MemorySplit`` divides the GPU once; ``set_jax_memory_fraction`` must run
before anything touches a JAX device (JAX reads ``XLA_PYTHON_CLIENT_MEM_FRACTION`` when its
GPU client is created, not at ``import jax``); the engine gets ``split.engine`` as its
``gpu_memory_utilization``.

    split = MemorySplit.for_engine(cfg.model.gpu_memory_split)
    set_jax_memory_fraction(split.trainer)            # first thing, before any jax.devices()
    engine = VllmEngine.start(..., llm_kwargs=split.engine_kwargs())
    with engine_asleep(engine.llm, level=1, repush=lambda: engine.sync_weights(params)):
        state = train_step(state, batch)               # the engine's KV cache is freed meanwhile

Sleep levels (vLLM ``LLM.sleep(level)``): 1 frees the KV cache and moves the weights to host
memory, ``wake_up`` brings them back; 2 frees the weights too, which are then garbage until
new ones are pushed (trl#5312: the rollout/trainer log-prob gap went from 0.015 to 0.2).
``engine_asleep`` therefore requires a ``repush`` for level 2 and calls it after waking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable

import jax._src.xla_bridge as xla_bridge

from caspo_jax.bridge.transport import reset_engine_caches
from caspo_jax.errors import UserError

log = logging.getLogger(__name__)

JAX_MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# what neither side may take: CUDA context, NCCL and cuBLAS workspaces, fragmentation
DEFAULT_HEADROOM = 0.05


class ColocationError(UserError, RuntimeError):
    """A memory split that cannot work, or one requested too late; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class MemorySplit:
    """Fractions of one GPU's memory: ``trainer`` for JAX (its preallocated pool) and
    ``engine`` for vLLM (its ``gpu_memory_utilization``), leaving ``1 - trainer - engine``
    as headroom."""

    trainer: float
    engine: float

    def __post_init__(self):
        for name, value in (("trainer", self.trainer), ("engine", self.engine)):
            if not 0.0 <= value < 1.0:
                raise ColocationError(f"MemorySplit.{name}={value!r} must be in [0, 1)")
        if self.trainer + self.engine > 1.0 - DEFAULT_HEADROOM / 2:
            raise ColocationError(
                f"MemorySplit: trainer {self.trainer:g} + engine {self.engine:g} leaves under "
                f"{DEFAULT_HEADROOM / 2:g} of the GPU for CUDA contexts and workspaces; lower model.gpu_memory_split")

    @classmethod
    def for_engine(cls, engine: float | None, headroom: float = DEFAULT_HEADROOM) -> "MemorySplit | None":
        """The split giving the engine ``engine`` of the GPU and the trainer the rest less
        ``headroom``; None (no colocated engine) -> None (JAX keeps its own default)."""
        if engine is None:
            return None
        if not 0.0 < engine < 1.0 - headroom:
            raise ColocationError(f"model.gpu_memory_split={engine!r} must be in (0, {1 - headroom:g}): the share "
                                  "of each GPU given to the in-process vLLM engine (e.g. 0.3)")
        return cls(trainer=round(1.0 - headroom - engine, 4), engine=engine)

    def engine_kwargs(self, sleep_mode: bool = True) -> dict:
        """The ``vllm.LLM`` keyword arguments that hold the engine to its share (and let it
        sleep during the update: vLLM needs ``enable_sleep_mode`` at start; CUDA only)."""
        return {"gpu_memory_utilization": self.engine, **({"enable_sleep_mode": True} if sleep_mode else {})}

    def describe(self, memory_gib: float | None = None) -> str:
        """One line for `caspo dryrun` and logs: the shares, in GiB when the size is known."""
        def part(f):
            return f"{f:.2f}" + (f" ({f * memory_gib:.1f} GiB)" if memory_gib else "")
        headroom = 1.0 - self.trainer - self.engine
        return f"trainer (JAX) {part(self.trainer)}, vLLM engine {part(self.engine)}, headroom {part(headroom)}"


def jax_started() -> bool:
    """Whether JAX has created its backends (after which its memory fraction is fixed)."""
    return xla_bridge.backends_are_initialized()


def set_jax_memory_fraction(fraction: float) -> None:
    """Give JAX ``fraction`` of each GPU (``XLA_PYTHON_CLIENT_MEM_FRACTION``). Call before
    anything touches a JAX device; afterwards it would silently do nothing, so it raises."""
    if not 0.0 < fraction < 1.0:
        raise ColocationError(f"JAX memory fraction {fraction!r} must be in (0, 1)")
    value = f"{fraction:.4g}"
    environ = os.environ
    if jax_started():
        if environ.get(JAX_MEM_FRACTION_ENV) == value:
            return
        raise ColocationError(
            f"JAX has already started its backends, so {JAX_MEM_FRACTION_ENV}={value} would be ignored "
            f"(now {environ.get(JAX_MEM_FRACTION_ENV, 'unset: JAX takes 0.75')}); set the memory split before "
            "the first jax.devices() / jnp array (e.g. first thing in the trainer's entry point), or export "
            f"{JAX_MEM_FRACTION_ENV}={value} in the job's environment")
    if environ.get(JAX_MEM_FRACTION_ENV, value) != value:
        log.info("memory split: %s=%s replaces %s from the environment", JAX_MEM_FRACTION_ENV, value,
                 environ[JAX_MEM_FRACTION_ENV])
    environ[JAX_MEM_FRACTION_ENV] = value


def apply_memory_split(gpu_memory_split: float | None, rollout_engine: str) -> MemorySplit | None:
    """The trainer's first call (before any JAX device is touched): with an in-process vLLM
    engine (``rollout_engine == "vllm"``) and ``model.gpu_memory_split`` set, fix JAX's share
    and return the split (its ``engine_kwargs()`` go to ``VllmEngine.start``); else None."""
    if rollout_engine != "vllm" or gpu_memory_split is None:
        return None
    split = MemorySplit.for_engine(gpu_memory_split)
    set_jax_memory_fraction(split.trainer)
    return split


def sleep_unavailable(engine) -> str | None:
    """Why ``engine`` (a ``VllmEngine``, or anything with ``.llm``) cannot sleep; None if it can."""
    llm = getattr(engine, "llm", None)
    if llm is None:
        return f"{type(engine).__name__} holds no vLLM engine"
    model_config = getattr(getattr(getattr(llm, "llm_engine", None), "vllm_config", None), "model_config", None)
    if not getattr(model_config, "enable_sleep_mode", False):
        return ("the vLLM engine was started without enable_sleep_mode=True (pass MemorySplit.engine_kwargs() to "
                "VllmEngine.start's llm_kwargs; CUDA GPUs only)")
    return None


_reasons_logged: set = set()


@contextlib.contextmanager
def engine_asleep(engine, *, level: int = 1, repush: Callable[[], None] | None = None):
    """The block runs with the rollout engine asleep (its KV cache freed for the trainer);
    it wakes afterwards, even if the block raised. Yields whether it slept.

    level 1: weights offloaded to host memory and restored on waking (the trainer's sync
    after the update then pushes the new ones). level 2: weights discarded, so ``repush``
    (e.g. ``lambda: engine.sync_weights(params)``) is required and runs right after waking
    (trl#5312: waking without it served garbage weights). Engines that cannot sleep (the
    JAX sampler, vLLM on CPU or started without sleep mode) run the block awake; the
    reason is logged once.
    """
    if level not in (1, 2):
        raise ColocationError(f"sleep level={level!r}: use 1 (weights kept in host memory) or 2 (weights dropped)")
    if level == 2 and repush is None:
        raise ColocationError("sleep level 2 discards the engine's weights: pass repush= (e.g. lambda: "
                              "engine.sync_weights(params)) so they are pushed again on waking (trl#5312), or use "
                              "level 1")
    reason = sleep_unavailable(engine)
    if reason is not None:
        if reason not in _reasons_logged:
            _reasons_logged.add(reason)
            log.info("rollout engine stays awake during the update: %s", reason)
        yield False
        return
    engine.llm.sleep(level=level)
    try:
        yield True
    finally:
        engine.llm.wake_up()
        reset_engine_caches(engine.llm)  # nothing cached before the sleep is valid after it
        if repush is not None:
            repush()
