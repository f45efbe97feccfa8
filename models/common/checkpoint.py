"""Table-driven conversion between HF safetensors checkpoints and our parameter pytrees.

A model declares one table of ``ParamSpec`` rows: the HF tensor name (``{i}`` for a
decoder/ViT layer index stacked on a leading axis), our pytree path, the layout
transform, our shape, the logical axis of every dimension and the initializer. The typed
weight tree (``weights``), loading, saving, random initialisation and sharding are all
derived from that table, so the names, layouts and axes are declared exactly once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from caspo_jax.errors import UserError
from caspo_jax.models.common import weights

SINGLE_FILE = "model.safetensors"

# ParamSpec.init -> leaf of (key, shape, dtype, scale), drawn by ``params.init_params``;
# "normal" draws in float32 then casts (so a bfloat16 init rounds the float32 draw).
INITIALIZERS = {
    "normal": lambda key, shape, dtype, scale: (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
    "ones": lambda key, shape, dtype, scale: jnp.ones(shape, dtype),
    "zeros": lambda key, shape, dtype, scale: jnp.zeros(shape, dtype),
}
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One leaf of the parameter pytree and the HF tensor(s) it comes from.

    hf_name: HF checkpoint key; ``{i}`` is replaced by 0..num_layers-1 when stacked.
    path: our pytree path (attribute names: ``("text", "embed")`` is ``params.text.embed``).
    shape: our leaf shape, the layer axis first when stacked.
    axes: logical axis name (or None) per dimension of ``shape``.
    transform: "identity" (linear kernels included: we store HF's [out, in]) or "flatten_in"
        (HF [out, *in] <-> our [out, prod(in)]; the Conv3d patch embedding as a matmul, a
        reshape with no copy either way).
    num_layers: stacked layer count, or None for an unstacked leaf.
    init: how ``params.init_params`` draws the leaf, a key of ``INITIALIZERS``: "normal"
        (N(0, scale)), "ones" (norm scales) or "zeros".
    """

    hf_name: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    transform: str = "identity"
    hf_shape: tuple[int, ...] | None = None
    num_layers: int | None = None
    init: str = "normal"

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"{self.path}: {len(self.axes)} axes for shape {self.shape}")
        if self.init not in INITIALIZERS:
            raise ValueError(f"{self.path}: init={self.init!r}; use one of {sorted(INITIALIZERS)}")

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.num_layers is not None else self.shape

    @property
    def hf_names(self) -> list[str]:
        if self.num_layers is None:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(self.num_layers)]

    def expected_hf_shape(self) -> tuple[int, ...]:
        if self.hf_shape is not None:
            return self.hf_shape
        return self.layer_shape

    def to_ours(self, hf_array):
        """One HF tensor (NumPy or torch) in our layout: a view, never a copy."""
        if self.transform == "identity":
            return hf_array
        if self.transform == "flatten_in":
            return hf_array.reshape(hf_array.shape[0], -1)
        raise ValueError(f"unknown transform {self.transform!r}")

    def to_hf(self, our_array):
        """One layer of our leaf (NumPy or torch) in the HF layout: a view, never a copy."""
        if self.transform == "identity":
            return our_array
        if self.transform == "flatten_in":
            return our_array.reshape(self.expected_hf_shape())
        raise ValueError(f"unknown transform {self.transform!r}")


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match the model's table (names the file and keys)."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint directory that declares code of its own (``auto_map``, ``trust_remote_code``)."""


# The files of an HF directory through which transformers would import the directory's own
# Python code, and the keys that ask for it.
CUSTOM_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
CUSTOM_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")


def custom_code_declarations(path: str | Path) -> list[str]:
    """"file: key" for every key of CUSTOM_CODE_KEYS the directory's JSON files set (a false
    ``trust_remote_code`` does not count). Unreadable files are left to their loaders."""
    found = []
    for name in CUSTOM_CODE_FILES:
        file = Path(path) / name
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found += [f"{name}: {key}" for key in CUSTOM_CODE_KEYS if data.get(key)]
    return found


def refuse_custom_code(path: str | Path, *, allow_flag: str = "--ignore-custom-code") -> None:
    """Raises UntrustedCheckpointError when the directory declares custom code.

    We load only our own Qwen2.5-VL / Qwen3-VL implementation and never import a
    checkpoint's Python files, so such a directory would load as a plain model that may
    not be what its author built; the user must say so (``allow_flag``), and even then
    its code is never run."""
    found = custom_code_declarations(path)
    if not found:
        return
    scripts = sorted(p.name for p in Path(path).glob("*.py"))
    shipped = f" and ships {', '.join(scripts)}" if scripts else ""
    raise UntrustedCheckpointError(
        f"{path}: the checkpoint asks for its own code ({'; '.join(found)}){shipped}; caspo never runs a "
        "checkpoint's code and would load it as a plain Qwen-VL model, which may not match what it was built "
        f"as. Use a checkpoint without custom code, or pass {allow_flag} to load it as a plain model anyway "
        "(its code is still never run)")


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file, for a single-file or a sharded checkpoint."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if single.exists():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = (f" (found {pickles}; pickle checkpoints are never loaded, they can run code: re-save the model with "
            "save_pretrained(..., safe_serialization=True))") if pickles else "; pass an HF checkpoint directory"
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def load_params(
    path: str | Path,
    table: Sequence[ParamSpec],
    *,
    dtype=jnp.float32,
    rename: Callable[[str], str] = lambda name: name,
    ignore: Callable[[str], bool] = lambda name: False,
    shardings: dict | None = None,
    progress: bool = True,
):
    """Read a checkpoint into the table's typed weight tree (``weights.build``), each leaf cast to ``dtype`` and placed
    (``progress``: a transient bar over the tensors; False for --no-progress callers).

    ``rename`` maps a checkpoint key to the table's spelling (e.g. alternative layouts);
    ``ignore`` marks keys that may be present and unused (e.g. a tied lm_head).
    With ``shardings`` (a tree of ``jax.sharding.Sharding`` like the params), each leaf is
    built with ``jax.make_array_from_callback`` so every device only receives its shard.
    """
    files = checkpoint_files(path)
    by_name = {rename(name): name for name in files}
    expected = {name for spec in table for name in spec.hf_names}
    missing = sorted(expected - by_name.keys())
    unexpected = sorted(n for n in by_name.keys() - expected if not ignore(n))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model config; "
            f"missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}; "
            "check that config.json describes these weights (layer counts, tie_word_embeddings)")
    np_dtype = np.dtype(jnp.dtype(dtype))
    handles: dict[Path, object] = {}

    def read(name: str, spec: ParamSpec) -> np.ndarray:
        source = by_name[name]
        file = files[source]
        if file not in handles:
            handles[file] = safe_open(file, framework="numpy")
        array = handles[file].get_tensor(source)
        if tuple(array.shape) != spec.expected_hf_shape():
            raise CheckpointError(
                f"{file}: tensor {source!r} has shape {tuple(array.shape)}, the config expects "
                f"{spec.expected_hf_shape()} (check config.json)")
        return spec.to_ours(array).astype(np_dtype)

    def load(spec: ParamSpec) -> jax.Array:
        if spec.num_layers is None:
            host = read(spec.hf_name, spec)
        else:
            host = np.stack([read(name, spec) for name in spec.hf_names])
        sharding = weights.leaf(shardings, spec.path) if shardings is not None else None
        if sharding is None:
            return jnp.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index])

    return weights.build(tqdm(table, desc=f"loading {Path(path).name}", leave=False, disable=not progress), load)


def save_params(
    params,
    table: Sequence[ParamSpec],
    out_dir: str | Path,
    *,
    dtype=None,
    max_shard_bytes: int = 5 * 1024**3,
) -> list[Path]:
    """Write the typed weight tree as HF safetensors (sharded with an index above ``max_shard_bytes``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for spec in tqdm(table, desc="gathering", leave=False):
        host = np.asarray(jax.device_get(weights.leaf(params, spec.path)))
        if dtype is not None:
            host = host.astype(np.dtype(jnp.dtype(dtype)))
        layers = [host] if spec.num_layers is None else list(host)
        for name, layer in zip(spec.hf_names, layers):
            tensors[name] = np.ascontiguousarray(spec.to_hf(layer))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for stale in [out_dir / SINGLE_FILE, out_dir / INDEX_FILE, *out_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out_dir / SINGLE_FILE, metadata=metadata)
        return [out_dir / SINGLE_FILE]
    written, weight_map = [], {}
    for k, shard in enumerate(shards):
        file = out_dir / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, file, metadata=metadata)
        weight_map.update({name: file.name for name in shard})
        written.append(file)
    total = sum(t.nbytes for t in tensors.values())
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return written
