"""The typed weight tree as HF checkpoint names and PyTorch layouts, streamed leaf by leaf.

This is the inverse of the loader: the same ``ParamSpec`` table (``model.param_table()``)
gives every HF name and layout transform, so names and layouts are declared once. q/k/v
and gate/up stay separate tensors, as in an HF checkpoint; vLLM fuses them itself while
loading (``is_checkpoint_format=True``).

Memory: a leaf already in host memory (JAX's CPU backend) is viewed without a copy; any
other stacked leaf [layers, ...] is gathered one layer at a time (``leaf[i]`` on the
devices, then to the host), so the host holds at most one layer of one tensor per item,
plus what a consumer keeps; ``iter_buckets`` groups items into bounded-size buckets for
transports that send batches (safetensors bytes). Sharded arrays are gathered by
``jax.device_get`` of the per-layer slice.

Importing this module needs neither torch nor vllm; ``iter_torch_tensors`` imports torch.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from caspo_jax.distributed import gather_to_host
from caspo_jax.models.common import weights
from caspo_jax.models.common.checkpoint import ParamSpec
from caspo_jax.sharding import copy_to_devices


@dataclasses.dataclass(frozen=True)
class HFTensorRef:
    """Where one HF tensor comes from: its spec and layer index (None when unstacked)."""

    name: str
    spec: ParamSpec
    layer: int | None

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.spec.expected_hf_shape()


def hf_tensor_refs(table: Sequence[ParamSpec]) -> list[HFTensorRef]:
    """Every HF tensor name of the table, in table order (layers in order within a row)."""
    refs = []
    for spec in table:
        if spec.num_layers is None:
            refs.append(HFTensorRef(spec.hf_name, spec, None))
        else:
            refs += [HFTensorRef(name, spec, i) for i, name in enumerate(spec.hf_names)]
    return refs


def _layer_of(params, ref: HFTensorRef):
    leaf = weights.leaf(params, ref.spec.path)
    if ref.layer is None:
        return leaf
    if isinstance(leaf, jax.Array):  # a static slice: no index array crosses to the device
        return jax.lax.index_in_dim(leaf, ref.layer, keepdims=False)
    return leaf[ref.layer]


def _host_layer(params, ref: HFTensorRef) -> np.ndarray | None:
    """A zero-copy NumPy view of the layer when its leaf is one array in host memory (the
    CPU backend, or NumPy); None when it must be gathered (accelerator or sharded)."""
    leaf = weights.leaf(params, ref.spec.path)
    if isinstance(leaf, np.ndarray):
        host = leaf
    elif isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) == 1 and \
            next(iter(leaf.sharding.device_set)).platform == "cpu":
        host = np.asarray(leaf)  # shares the CPU buffer
    else:
        return None
    return host if ref.layer is None else host[ref.layer]


def _ordered_refs(table, names: Sequence[str] | None) -> list[HFTensorRef]:
    refs = hf_tensor_refs(table)
    if names is None:
        return refs
    by_name = {ref.name: ref for ref in refs}
    if sorted(names) != sorted(by_name):
        raise ValueError("names must be a permutation of the table's HF tensor names")
    return [by_name[name] for name in names]


def iter_hf_arrays(params, table: Sequence[ParamSpec], *, dtype=None,
                   names: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, contiguous NumPy array in the HF layout) for every tensor, one at a time.

    Our leaves are stored in HF's layouts (linear kernels [out, in]; the patch embedding
    only reshaped), so each array is a view of the layer, never a transposed copy.
    ``dtype`` casts on the device. names: the order to produce them in (default: table
    order), e.g. grouped by the engine's fused modules so a bucket never splits one.
    """
    for ref in _ordered_refs(table, names):
        host = _host_layer(params, ref)
        if host is None:  # gather this one layer (all its shards) to the host
            layer = _layer_of(params, ref)
            if dtype is not None and layer.dtype != jnp.dtype(dtype):
                layer = layer.astype(dtype)
            host = np.asarray(jax.device_get(layer))
        elif dtype is not None and host.dtype != jnp.dtype(dtype):
            host = host.astype(jnp.dtype(dtype))
        out = ref.spec.to_hf(host)
        if tuple(out.shape) != ref.hf_shape:
            raise ValueError(f"{ref.name}: produced shape {out.shape}, the table expects {ref.hf_shape}")
        yield ref.name, out


def numpy_to_torch(array: np.ndarray):
    """A torch tensor sharing ``array``'s memory (bfloat16 through a uint16 view).

    Arrays from ``jax.device_get`` are read-only; consumers only read (copy) them, so
    torch's non-writable warning is silenced here.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def iter_torch_tensors(params, table: Sequence[ParamSpec], *, dtype=None, dlpack: bool = False,
                       names: Sequence[str] | None = None, device=None) -> Iterator[tuple]:
    """(HF name, torch tensor) for every tensor, one at a time, without extra host copies.

    dlpack=True hands each layer to torch through DLPack (zero copy; on a GPU the tensor
    stays on the GPU) and applies the layout transform as a torch view. A layer sharded
    over this process's devices is first joined on ``device`` (default: the first local
    device, the GPU an in-process vLLM engine uses), device to device
    (``sharding.copy_to_devices``), one layer at a time; only a layer that spans other
    processes goes through the host (a collective).
    """
    import torch

    if not dlpack:
        for name, array in iter_hf_arrays(params, table, dtype=dtype, names=names):
            yield name, numpy_to_torch(array)
        return
    target = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    for ref in _ordered_refs(table, names):
        layer = _layer_of(params, ref)
        if dtype is not None and layer.dtype != jnp.dtype(dtype):
            layer = layer.astype(dtype)
        if not layer.is_fully_addressable:
            tensor = numpy_to_torch(np.asarray(gather_to_host(layer)))
        else:  # already on the target: copy_to_devices puts it nowhere
            tensor = torch.from_dlpack(copy_to_devices(layer, target))
        yield ref.name, ref.spec.to_hf(tensor)


def iter_buckets(items: Iterator[tuple], bucket_bytes: int = 256 * 2**20, group_of=None) -> Iterator[list[tuple]]:
    """Group (name, tensor) items into lists of at most ``bucket_bytes`` (a larger tensor
    travels alone), so a transport holds one bucket at a time.

    group_of: name -> key; consecutive items with the same key are never split across
    buckets (vLLM processes a fused module only once all its pieces arrived in one load),
    so a bucket may exceed ``bucket_bytes`` by one group.
    """
    bucket, size, last_group = [], 0, object()
    for name, tensor in items:
        nbytes = int(tensor.nbytes) if hasattr(tensor, "nbytes") else tensor.numel() * tensor.element_size()
        group = group_of(name) if group_of is not None else object()
        if bucket and size + nbytes > bucket_bytes and group != last_group:
            yield bucket
            bucket, size = [], 0
        last_group = group
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def state_dict_bytes(params, table: Sequence[ParamSpec]) -> int:
    """Total bytes of the HF tensors (what a full push moves)."""
    return sum(int(np.prod(ref.hf_shape)) * jnp.dtype(weights.leaf(params, ref.spec.path).dtype).itemsize
               for ref in hf_tensor_refs(table))
