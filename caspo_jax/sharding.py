"""Device mesh and logical-axis rules: every partitioning decision in one small place.

Parameters declare logical axes once (in their model's checkpoint table); ``LogicalRules``
maps each logical axis to mesh axes. The mesh has three axes: ``data`` (pure data
parallelism), ``fsdp`` (data parallel with sharded parameters) and ``tensor`` (Megatron-style
heads/MLP/vocab splitting).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from caspo_jax.models.common import weights

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all global devices (multi-host: ``jax.devices()``).

    Axis types are Auto, so jit propagates shardings from the inputs (GSPMD).
    """
    devices = jax.devices() if devices is None else list(devices)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} != {len(devices)} devices")
    if devices == jax.devices():
        return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """Logical axis -> mesh axis (or axes, or None to replicate). Override per run."""

    rules: tuple[tuple[str, MeshAxes], ...] = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
        ("vision_embed", "fsdp"),
        ("vision_qkv", "tensor"),
        ("vision_heads", "tensor"),
        ("vision_mlp", "tensor"),
        ("patch", None),
    )

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        for name, target in self.rules:
            if name == logical:
                return target
        raise KeyError(f"logical axis {logical!r} has no rule; add it to LogicalRules.rules")

    def replace(self, **overrides: MeshAxes) -> "LogicalRules":
        """These rules with some logical axes remapped, e.g. ``rules.replace(embed=None)``."""
        merged = dict(self.rules)
        merged.update(overrides)
        return LogicalRules(tuple(merged.items()))

    def spec(self, axes: Iterable[str | None], shape: Iterable[int] | None = None, mesh: Mesh | None = None
             ) -> PartitionSpec:
        """PartitionSpec for one array; with ``shape``/``mesh``, a dimension that the mapped mesh
        axes do not divide is replicated instead (tiny test models, odd vocab sizes)."""
        axes = list(axes)
        shape = list(shape) if shape is not None else [None] * len(axes)
        used: set[str] = set()
        out = []
        for logical, size in zip(axes, shape):
            target = self.mesh_axes(logical)
            names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
            names = tuple(n for n in names if n not in used)
            if mesh is not None and size is not None:
                names = tuple(n for n in names if mesh.shape[n] > 1)
                if names and size % math.prod(mesh.shape[n] for n in names):
                    names = ()
            used.update(names)
            out.append(None if not names else names[0] if len(names) == 1 else names)
        return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes, shape=None, rules: LogicalRules = LogicalRules()) -> NamedSharding:
    return NamedSharding(mesh, rules.spec(axes, shape, mesh))


def param_shardings(table, mesh: Mesh, rules: LogicalRules = LogicalRules()):
    """NamedShardings of a model's typed weights, from its table of ``ParamSpec`` rows
    (anything with ``.path``, ``.axes`` and ``.shape``): the same tree as the weights."""
    return weights.build(table, lambda spec: named_sharding(mesh, spec.axes, spec.shape, rules))


def copy_to_devices(x, sharding):
    """`x` (a jax.Array this process addresses in full, on any devices) placed on
    `sharding` (a NamedSharding or a SingleDeviceSharding), whose devices may be others,
    without a trip through the host (`jax.device_put` of a sharded array onto another
    sharding copies through the host in jax 0.10: a transfer guard shows it).

    One copy of each distinct block of `x` goes to the first device of `sharding`; several
    blocks (a sharded `x`) are joined there (`_assemble`, compiled once per shape and block
    layout); `jax.device_put` then copies the whole array onto `sharding`'s devices (device
    to device for a single-device source). The source devices hold nothing extra, unlike
    replicating on them first. NumPy input is simply put."""
    if not isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    first = min(sharding.device_set, key=lambda d: d.id)  # any target device joins the blocks
    blocks = {}
    for shard in x.addressable_shards:
        start = tuple(0 if s.start is None else int(s.start) for s in shard.index)
        blocks.setdefault(start, shard.data)
    if len(blocks) == 1:
        whole = next(iter(blocks.values()))
    else:
        starts = tuple(sorted(blocks))
        whole = _assemble(x.shape, starts, *(jax.device_put(blocks[k], first) for k in starts))
    return jax.device_put(whole, sharding)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _assemble(shape, starts, *blocks):
    """The array of `shape` whose block at each start index (`starts`) is `blocks[i]`."""
    out = jnp.zeros(shape, blocks[0].dtype)
    for start, block in zip(starts, blocks):
        out = jax.lax.dynamic_update_slice(out, block, start)
    return out
