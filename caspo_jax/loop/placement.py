"""Where a run's arrays live: the mesh of `RunConfig`, the state and batches on it.

One helper for every stage (CASPO, SFT, DPO):

    place = make_placement(cfg, model, step_cfg, rows=cfg.optim.minibatch_size,
                           rows_field="optim.minibatch_size")
    state = place.state(init_state(params, step_cfg))   # params + AdamW state sharded
    ref = place.params(ref_params)                       # frozen reference, sharded alike
    batch = place.batch(host_batch)                      # rows over (data, fsdp)
    step = make_train_step(model, step_cfg, algo, mesh=place.mesh)

`run.mesh_data/mesh_fsdp/mesh_tensor` give the mesh shape; -1 (at most one field) takes
the remaining devices. A mesh of one device is no mesh (`place.mesh is None`): nothing
is placed and every function runs as on a laptop. With several processes
(`caspo_jax.distributed.start`) the mesh spans every host's devices; each host
holds its block of every row-sharded leaf (`global_batch`), host copies of sharded arrays
come from a collective gather (`to_host`), and the rollout sampler runs on one of the
host's devices with a gathered copy of the parameters (`sampler_mesh` / `sampler_params`):
`JaxSampler` turns prompts into host NumPy arrays and reads its outputs with
`device_get`, which needs arrays each process can address.

rollout.devices = n > 0 gives the in-process JAX sampler devices of its own, so that with
rollout.max_staleness >= 1 generation and the update run on different chips: each process's
LAST n local devices form the sampler's mesh (n x 1 x 1: parameters replicated, sampled rows
split over the n), and run.mesh_* (-1 included) is resolved over the devices left. Parameters
go to the sampler device to device (`copy_to_devices`); with several processes through the
host gather, as without rollout.devices, and n must be 1 there (see `sampler_mesh`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from caspo_jax.distributed import gather_to_host, global_batch, take_local_rows
from caspo_jax.loop.config import ConfigError, RunConfig
from caspo_jax.sharding import copy_to_devices, make_mesh, param_shardings
from caspo_jax.step import batch_shardings, shard_state, state_shardings

__all__ = ["Placement", "make_placement", "mesh_shape", "split_devices"]

_FIELDS = ("mesh_data", "mesh_fsdp", "mesh_tensor")


def mesh_shape(run: RunConfig, n_devices: int, *, multi_process: bool = False) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of `run` over `n_devices` (pure); ConfigError naming the field.

    -1 in one field = n_devices // (product of the others). The product must divide
    n_devices (a single process may use the first devices only); with several processes
    it must equal it, so every host's devices take part.
    """
    sizes = [getattr(run, f) for f in _FIELDS]
    free = [f for f, s in zip(_FIELDS, sizes) if s == -1]
    fixed = math.prod(s for s in sizes if s != -1)
    if len(free) > 1:
        raise ConfigError(f"run.{free[0]} and run.{free[1]} are both -1: at most one mesh field may take the "
                          "remaining devices; set the others to a size, e.g. --set run.mesh_fsdp=1")
    if n_devices % fixed:
        which = " * ".join(f"run.{f}={s}" for f, s in zip(_FIELDS, sizes) if s != -1)
        raise ConfigError(f"{which} = {fixed} does not divide the {n_devices} devices; pick sizes whose product "
                          f"divides {n_devices} (e.g. --set run.mesh_data=-1 to use them all on data)")
    if free:
        sizes[_FIELDS.index(free[0])] = n_devices // fixed
    if multi_process and math.prod(sizes) != n_devices:
        raise ConfigError(f"run.mesh_* = {tuple(sizes)} uses {math.prod(sizes)} of the {n_devices} devices of "
                          f"{jax.process_count()} processes; a multi-process mesh must use every device "
                          "(set one field to -1)")
    return tuple(sizes)


@dataclasses.dataclass
class Placement:
    """The run's mesh (None: one device) and how arrays go onto it and back.

    sampler_devices: this process's devices reserved for the rollout sampler
    (rollout.devices; empty: the sampler shares the trainer's mesh)."""

    mesh: object | None
    model: object
    step_cfg: object
    sampler_devices: tuple = ()

    @property
    def multi_process(self) -> bool:
        return jax.process_count() > 1

    def state(self, state, shardings=None):
        """A TrainState with parameters and optimiser moments on the parameters' shardings
        (`shardings`: a TrainState of NamedShardings for a state of another shape, e.g. the
        reward model's backbone + head)."""
        if self.mesh is None:
            return state
        return shard_state(state, shardings or state_shardings(self.model, self.step_cfg, self.mesh))

    def params(self, params):
        """A parameter pytree (e.g. the frozen reference) sharded like the trained ones."""
        if self.mesh is None:
            return params
        return jax.device_put(params, param_shardings(self.model.param_table(), self.mesh))

    def batch(self, batch):
        """A host TrainBatch (every process holds the whole batch) as global arrays: one
        process places it (`shard_batch`); several feed only the rows their devices hold."""
        if self.mesh is None:
            return batch
        return self.place(batch, batch_shardings(batch, self.mesh))

    def place(self, tree, shardings):
        """A host pytree every process holds in full, on `shardings` (a matching tree of
        NamedShardings): one process puts it; several feed only the rows their devices
        hold (row-sharded leaves) or their full copy (replicated ones)."""
        if not self.multi_process:
            return jax.device_put(tree, shardings)
        return global_batch(take_local_rows(tree, shardings), shardings)

    def to_host(self, tree):
        """Full NumPy copies on every process (a collective with several processes)."""
        return gather_to_host(tree)

    @functools.cached_property
    def sampler_mesh(self):
        """The rollout sampler's mesh.

        rollout.devices = n: a mesh over this process's last n devices, (data=n, fsdp=1,
        tensor=1), so the parameters are replicated and the KV cache's sample rows split
        over the n (`JaxSampler`); its own, disjoint from the trainer's.

        Without: the run's mesh with one process; with several, None (the host's first
        device). A mesh over a host's own devices would run process-local collectives
        through the CPU collectives backend too: in a two-process gloo run the two hosts'
        4-device sampler contexts crossed ("Received data size doesn't match expected size
        ... collective mismatch", 1 run in 4), so with several processes rollouts stay on
        one local device (rollout.devices <= 1: a one-device mesh compiles no collective)."""
        if self.sampler_devices:
            return make_mesh(len(self.sampler_devices), 1, 1, devices=self.sampler_devices)
        return None if self.multi_process else self.mesh

    def sampler_params(self, params):
        """What the sampler's `sync_weights` takes.

        rollout.devices: the parameters on the sampler's mesh (its param shardings, so the
        sampler's own placement is a no-op), copied device to device with one process;
        with several, from a gathered host copy (a collective every process calls: a
        process cannot address the other hosts' shards). Without: the parameters
        themselves, or with several processes a gathered host copy."""
        if self.sampler_devices:
            shardings = param_shardings(self.model.param_table(), self.sampler_mesh)
            if self.multi_process:
                return jax.device_put(self.to_host(params), shardings)
            return jax.tree.map(copy_to_devices, params, shardings)
        return self.to_host(params) if self.multi_process else params


def split_devices(n_sampler: int) -> tuple[list, tuple]:
    """(the trainer's devices, this process's sampler devices) for rollout.devices =
    `n_sampler`, from `jax.devices()`: each process's last `n_sampler` local devices go to
    its sampler; the trainer keeps the rest of `jax.devices()`, in order. 0: every
    device to the trainer, no sampler devices."""
    if not n_sampler:
        return jax.devices(), ()
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    reserved = {d for devices in by_process.values() for d in devices[-n_sampler:]}
    mine = tuple(jax.local_devices()[-n_sampler:])
    return [d for d in jax.devices() if d not in reserved], mine


def make_placement(cfg, model, step_cfg, *, rows: int, rows_field: str,
                   sampler_devices: int | None = None) -> Placement:
    """The Placement of `cfg.run`'s mesh; `rows` (named `rows_field` in errors) is the
    row count of one update's batch, which data * fsdp must divide.

    sampler_devices: devices of each process kept for the rollout sampler (None:
    rollout.devices); the trainer's mesh is resolved over the others. 0 is the run
    without them, unchanged."""
    multi = jax.process_count() > 1
    n_sampler = cfg.rollout.devices if sampler_devices is None else sampler_devices
    local = jax.local_device_count()
    if n_sampler and n_sampler >= local:
        raise ConfigError(f"rollout.devices={n_sampler} leaves no device for the trainer: this process has {local} "
                          f"device(s); give the sampler at most {local - 1} (or 0 to share the trainer's)")
    if n_sampler > 1 and multi:
        raise ConfigError(f"rollout.devices={n_sampler} with {jax.process_count()} processes: a sampler mesh over "
                          "several of a host's devices runs process-local collectives, which crossed between hosts "
                          "in the CPU collectives backend; set rollout.devices=1 (each process's last device) or 0")
    trainer_devices, mine = split_devices(n_sampler)
    n = len(trainer_devices)
    note = (f" (the trainer's {n} devices: rollout.devices={n_sampler} of each process's {local} go to the "
            "sampler; or lower rollout.devices)") if n_sampler else ""
    try:
        data, fsdp, tensor = mesh_shape(cfg.run, n, multi_process=multi)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{note}") from None
    if rows % (data * fsdp):
        raise ConfigError(f"{rows_field}={rows} rows are not divisible by run.mesh_data * run.mesh_fsdp = "
                          f"{data} * {fsdp} = {data * fsdp} (the mesh axes that split rows); pick a multiple of "
                          f"{data * fsdp} or a smaller data/fsdp size{note}")
    if data * fsdp * tensor == 1 and not multi:
        return Placement(None, model, step_cfg, mine)
    mesh = make_mesh(data, fsdp, tensor, devices=trainer_devices[:data * fsdp * tensor])
    return Placement(mesh, model, step_cfg, mine)


def allgather_host(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every process's dict of host NumPy arrays, in process order (a collective).

    Shapes may differ between processes (prompt widths, response widths, image patches):
    the shapes go first, then each array padded to the largest, cut back on arrival.
    One process: `[arrays]`.
    """
    if jax.process_count() == 1:
        return [arrays]
    names = sorted(arrays)
    rank = max(1, max(np.ndim(arrays[k]) for k in names))
    shapes = np.zeros((len(names), rank), np.int64)
    for i, k in enumerate(names):
        shapes[i, :np.ndim(arrays[k])] = np.shape(arrays[k])
    all_shapes = np.asarray(multihost_utils.process_allgather(shapes))  # [n_proc, K, rank]
    out: list[dict[str, np.ndarray]] = [{} for _ in range(jax.process_count())]
    for i, k in enumerate(names):
        x = np.asarray(arrays[k])
        # as JAX carries them (no 64-bit without jax_enable_x64): bool as uint8, 64-bit as 32-bit
        dtype = {np.dtype(bool): np.uint8, np.dtype(np.float64): np.float32,
                 np.dtype(np.int64): np.int32}.get(x.dtype, x.dtype)
        ndim = x.ndim
        biggest = all_shapes[:, i, :ndim].max(axis=0)
        padded = np.zeros(tuple(biggest), dtype)
        padded[tuple(slice(0, s) for s in x.shape)] = x
        gathered = np.asarray(multihost_utils.process_allgather(padded))  # [n_proc, *biggest]
        for p in range(len(out)):
            got = gathered[p][tuple(slice(0, s) for s in all_shapes[p, i, :ndim])]
            out[p][k] = got.astype(x.dtype)
    return out


def allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    return [json.loads(p["json"].tobytes().decode("utf-8")) for p in allgather_host({"json": data})]


def interleaved_order(n_processes: int, local_prompts: int) -> np.ndarray:
    """(process, local index) of each global prompt j: j % n, j // n -- the order of grain's
    process sharding (`source[process_index::process_count]`), so the gathered batch of a
    step is the batch one process would have read."""
    j = np.arange(n_processes * local_prompts)
    return np.stack([j % n_processes, j // n_processes], axis=1)


def merge_prompt_rows(parts: list[dict[str, np.ndarray]], group_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """One global step from every process's host arrays (see `allgather_host`).

    Each part: ids/mask and teacher_ids/teacher_mask [P_l, L] (left-padded), pixels [N, D],
    grids [I, 3], images [P_l] (images per prompt), and per-rollout rows (G per prompt,
    prompt-major) tokens/response_mask [P_l*G, T] plus any other [P_l*G] arrays. Prompts
    are re-left-padded to the widest, responses right-padded, images kept per prompt.
    """
    if len(parts) == 1:
        return parts[0]
    local = len(parts[0]["ids"])
    order = interleaved_order(len(parts), local)
    out: dict[str, np.ndarray] = {}
    for ids, mask in (("ids", "mask"), ("teacher_ids", "teacher_mask")):
        width = max(p[ids].shape[1] for p in parts)
        out[ids] = np.full((len(order), width), pad_id, parts[0][ids].dtype)
        out[mask] = np.zeros((len(order), width), parts[0][mask].dtype)
        for j, (p, i) in enumerate(order):
            w = parts[p][ids].shape[1]
            out[ids][j, width - w:] = parts[p][ids][i]
            out[mask][j, width - w:] = parts[p][mask][i]
    pixels, grids, images = [], [], []
    for j, (p, i) in enumerate(order):
        part = parts[p]
        first_image = int(part["images"][:i].sum())
        n = int(part["images"][i])
        counts = np.prod(part["grids"], axis=1) if len(part["grids"]) else np.zeros(0, np.int64)
        lo = int(counts[:first_image].sum())
        hi = lo + int(counts[first_image:first_image + n].sum())
        pixels.append(part["pixels"][lo:hi])
        grids.append(part["grids"][first_image:first_image + n])
        images.append(n)
    out["pixels"] = np.concatenate(pixels)
    out["grids"] = np.concatenate(grids)
    out["images"] = np.asarray(images)
    G = group_size
    width = max(p["tokens"].shape[1] for p in parts)
    per_row = [k for k in parts[0] if k not in out and k not in ("tokens", "response_mask")]
    out["tokens"] = np.zeros((len(order) * G, width), parts[0]["tokens"].dtype)
    out["response_mask"] = np.zeros((len(order) * G, width), parts[0]["response_mask"].dtype)
    for k in per_row:
        out[k] = np.concatenate([parts[p][k][i * G:(i + 1) * G] for p, i in order])
    for j, (p, i) in enumerate(order):
        w = parts[p]["tokens"].shape[1]
        out["tokens"][j * G:(j + 1) * G, :w] = parts[p]["tokens"][i * G:(i + 1) * G]
        out["response_mask"][j * G:(j + 1) * G, :w] = parts[p]["response_mask"][i * G:(i + 1) * G]
    return out
