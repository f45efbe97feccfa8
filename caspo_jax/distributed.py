"""Multi-host start-up and data placement on JAX's own multi-controller runtime.

Every host runs the same program (SPMD). ``start()`` reads the environment once and calls
``jax.distributed.initialize`` when there is more than one process, after which
``jax.devices()`` lists every host's devices and ``caspo_jax.sharding.make_mesh`` spans
them all. Which launcher we are under is decided by a pure function (``plan_start``) so
it is tested without a cluster:

    explicit  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (any launcher:
              torchrun-style scripts, Kubernetes indexed jobs, two processes on a laptop)
    slurm     srun with SLURM_NTASKS > 1: JAX's own SLURM detection picks coordinator,
              count and id (one task per node, all its GPUs; or one task per GPU)
    tpu       a TPU VM pod slice (TPU_WORKER_HOSTNAMES lists > 1 host, or MEGASCALE_*):
              JAX's Cloud TPU detection does everything
    single    none of the above: no initialize, one process

Roles: only process 0 writes logs, metrics and HF exports (``is_primary``); every process
takes part in orbax checkpoint saves (orbax coordinates the hosts itself) and in every
jitted step.

Data: each host reads its own shard of prompts (``pipeline_shard`` gives
``PipelineConfig(process_index=..., process_count=...)`` for the grain pipeline), builds
its rows, and ``global_batch`` assembles global ``jax.Array``s with
``jax.make_array_from_process_local_data``. ``local_rows`` says which rows of the
global batch this host's devices hold (the host's block), so a host that has the full
batch (tests, small eval sets) can cut its block with ``take_local_rows``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

__all__ = [
    "StartPlan", "plan_start", "start", "shutdown", "is_primary", "pipeline_shard",
    "local_rows", "take_local_rows", "global_batch", "gather_to_host", "barrier",
]

EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """How this process joins the job: ``kind`` (explicit/slurm/tpu/single) and the keyword
    arguments for ``jax.distributed.initialize`` (empty: JAX auto-detects the cluster)."""

    kind: str
    initialize_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def multi_process(self) -> bool:
        return self.kind != "single"


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} must be an integer") from None


def plan_start(env: Mapping[str, str] | None = None) -> StartPlan:
    """Which launcher started this process, from the environment alone (pure)."""
    env = os.environ if env is None else env
    present = [v for v in EXPLICIT_VARS if env.get(v)]
    if present:
        missing = [v for v in EXPLICIT_VARS if not env.get(v)]
        if missing:
            raise ValueError(f"explicit multi-process start: {present} set but {missing} missing; set all of "
                             f"{list(EXPLICIT_VARS)} (e.g. JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 "
                             "JAX_PROCESS_ID=0) or none")
        n, pid = _int_var(env, "JAX_NUM_PROCESSES"), _int_var(env, "JAX_PROCESS_ID")
        if not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID={pid} must lie in [0, JAX_NUM_PROCESSES={n})")
        kwargs: dict[str, Any] = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                      process_id=pid)
        if env.get("JAX_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [int(x) for x in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
        return StartPlan("explicit" if n > 1 else "single", kwargs if n > 1 else {})
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS") and _int_var(env, "SLURM_NTASKS") > 1:
        if not env.get("SLURM_STEP_NODELIST"):
            raise ValueError("SLURM_NTASKS > 1 but SLURM_STEP_NODELIST is unset: start the trainer with `srun` "
                             "inside the sbatch script (see launch/recipes/slurm_gpu.sbatch)")
        return StartPlan("slurm")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return StartPlan("tpu")
    return StartPlan("single")


def start(env: Mapping[str, str] | None = None, *, cpu_collectives: str = "gloo") -> StartPlan:
    """Join the job described by the environment (idempotent); returns the plan used.

    CPU-only multi-process runs (tests, debugging) need a CPU collectives backend:
    ``cpu_collectives`` sets ``jax_cpu_collectives_implementation`` before initialize
    (GPU and TPU collectives are unaffected).
    """
    plan = plan_start(env)
    if not plan.multi_process or jax.distributed.is_initialized():
        return plan
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**plan.initialize_kwargs)
    return plan


def shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics, HF exports and prints."""
    return jax.process_index() == 0


def pipeline_shard() -> dict[str, int]:
    """``PipelineConfig`` fields giving this host its own 1/process_count of the prompts."""
    return dict(process_index=jax.process_index(), process_count=jax.process_count())


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int = 0) -> slice:
    """The contiguous block of ``axis`` this process's devices hold under ``sharding``.

    Raises when the host's devices hold a non-contiguous set (a mesh whose device order
    interleaves hosts along the batch axes): build the mesh with ``make_mesh``, which
    keeps each host's devices together.
    """
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        s = index[axis] if len(index) > axis else slice(None)
        lo, hi, _ = s.indices(global_shape[axis])
        starts.append(lo)
        stops.append(hi)
    lo, hi = min(starts), max(stops)
    covered = np.zeros(hi - lo, bool)
    for a, b in zip(starts, stops):
        covered[a - lo:b - lo] = True
    if not covered.all():
        raise ValueError(f"process {jax.process_index()} holds a non-contiguous part of axis {axis} "
                         f"(rows {sorted(set(zip(starts, stops)))}); build the mesh with caspo_jax.sharding.make_mesh")
    return slice(lo, hi)


def _row_axis(sharding: NamedSharding) -> int | None:
    """The first sharded axis of a leaf (its batch rows), or None when replicated."""
    for axis, names in enumerate(sharding.spec):
        if names is not None:
            return axis
    return None


def take_local_rows(full_tree, shardings):
    """This host's block of every row-sharded leaf of a batch every host holds in full."""

    def cut(x, sharding):
        if x is None:
            return None
        axis = _row_axis(sharding)
        if axis is None:
            return np.asarray(x)
        rows = local_rows(sharding, np.shape(x), axis)
        return np.asarray(x)[(slice(None),) * axis + (rows,)]

    return jax.tree.map(cut, full_tree, shardings, is_leaf=lambda x: x is None)


def global_batch(local_tree, shardings):
    """Global ``jax.Array``s from each host's block (row-sharded leaves) or full copy
    (replicated leaves); the global row count is the local one times the hosts that hold
    distinct blocks (``make_array_from_process_local_data`` infers it)."""

    def make(x, sharding):
        if x is None:
            return None
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(make, local_tree, shardings, is_leaf=lambda x: x is None)


def gather_to_host(tree):
    """Full NumPy copies of (possibly multi-host sharded) arrays on every process.

    A collective: every process must call it (then let only ``is_primary()`` write)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
