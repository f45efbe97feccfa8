"""Size a CASPO run before paying for it: mesh, per-device memory and step FLOPs.

Nothing is allocated and no accelerator is needed: parameter shapes come from the
model's checkpoint table (``jax.eval_shape`` for the optimiser state), shardings from
``LogicalRules`` over an ``AbstractMesh`` of the requested shape, so a 7B run on a
v5p-64 or 16 A100s is sized on a laptop.

    topo = Topology.parse("32x95:1,32,1")          # devices x GiB per device : data,fsdp,tensor
    print(dry_run_report("qwen2_5_vl_7b", topo))   # or a trainer config / nested dict

Memory per device (bytes), for one optimiser step on a mini-batch:
  params       float32 master weights, sharded by their logical axes
  grads        float32, sharded like the parameters
  optimizer    every parameter-shaped optimiser leaf (AdamW: mu, nu)
  updates      the optimiser's parameter-shaped update, alive beside the new parameters
  compute      a bfloat16 copy of the weights when compute is bfloat16
  reference    the frozen reference policy (model dtype) for the KL term's log-probs
  activations  what the backward pass keeps, per micro-batch (formula in ``activation_bytes``)
Step FLOPs: 2 * N * tokens per forward matmul pass (N: the text decoder's layer weights
at every position, the LM head at response positions) plus causal attention, for the
rollout (prefill + decode), the three log-prob passes (old, reference, teacher) and the
train step (forward + backward = 3 passes, 4 with remat). The vision tower is left out
(its patches depend on the images; image tokens are counted as text positions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from caspo_jax.launch.cli import one_line
from caspo_jax.launch.run_args import resolve
from caspo_jax.loop.config import TrainConfig, config_from_dict, step_config
from caspo_jax.loop.presets import preset_dict
from caspo_jax.models import qwen2_5_vl, qwen3_vl
from caspo_jax.rollout.colocate import MemorySplit
from caspo_jax.sharding import MESH_AXES, LogicalRules
from caspo_jax.step import StepConfig, make_optimizer
from caspo_jax.tiny import models as tm

GIB = 2**30

# Parameter-shaping fields of the released checkpoints' config.json (used when the preset's
# model.path is not on this machine: a dry run needs no weights).
ARCHITECTURES: dict[str, dict] = {
    "qwen2_5_vl_7b": {
        "model_type": "qwen2_5_vl", "tie_word_embeddings": False, "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "temporal_patch_size": 2}},
    "qwen3_vl_4b": {
        "model_type": "qwen3_vl", "tie_word_embeddings": True,
        "text_config": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000,
                                            "mrope_section": [24, 20, 20], "mrope_interleaved": True}},
        "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                          "out_hidden_size": 2560, "num_position_embeddings": 2304, "patch_size": 16,
                          "deepstack_visual_indexes": [5, 11, 17]}},
}

# Named accelerator slices: (devices JAX sees, GiB of memory per device). TPU v5p names
# count TensorCores (2 per chip, one JAX device per chip).
ACCELERATORS: dict[str, tuple[int, float]] = {"v5p": (2, 95.0), "v4": (2, 32.0), "v5e": (1, 16.0),
                                               "v6e": (1, 32.0)}
GPUS: dict[str, float] = {"a100-40gb": 40.0, "a100-80gb": 80.0, "a100": 80.0, "h100": 80.0, "h200": 141.0}


@dataclasses.dataclass(frozen=True)
class Topology:
    """devices: how many JAX devices; memory_gib: per device; mesh: (data, fsdp, tensor) of
    the trainer; sampler_devices: those kept for the JAX sampler alone (rollout.devices),
    which the trainer's mesh leaves out: mesh covers devices - sampler_devices."""

    devices: int
    memory_gib: float
    mesh: tuple[int, int, int]
    name: str = ""
    sampler_devices: int = 0

    @property
    def trainer_devices(self) -> int:
        return self.devices - self.sampler_devices

    def __post_init__(self):
        if not 0 <= self.sampler_devices < self.devices:
            raise ValueError(f"topology {self.name or ''}: rollout.devices={self.sampler_devices} leaves no device of "
                             f"{self.devices} for the trainer; give the sampler at most {self.devices - 1}")
        if math.prod(self.mesh) != self.trainer_devices:
            kept = f" (rollout.devices={self.sampler_devices} go to the sampler)" if self.sampler_devices else ""
            raise ValueError(f"topology {self.name or ''}: mesh data*fsdp*tensor={self.mesh} has {math.prod(self.mesh)} "
                             f"devices, not the trainer's {self.trainer_devices}{kept}; pass --mesh D,F,T with "
                             f"D*F*T={self.trainer_devices}")

    @classmethod
    def parse(cls, text: str, mesh: str | tuple[int, int, int] | None = None,
              sampler_devices: int = 0) -> "Topology":
        """"v5p-64", "16xa100-80gb", or "DEVICESxGIB" ("32x95"); optional ":D,F,T" or ``mesh``.
        Without a mesh every trainer device goes to fsdp (parameters sharded, rows split).
        sampler_devices: rollout.devices, kept out of the trainer's mesh (one trainer
        process: with several hosts each keeps its own, so size the trainer with --mesh)."""
        name, _, mesh_text = text.partition(":")
        mesh = mesh if mesh is not None else (mesh_text or None)
        key = name.strip().lower()
        if "-" in key and key.split("-")[0] in ACCELERATORS and key.split("-")[1].isdigit():
            per_chip, gib = ACCELERATORS[key.split("-")[0]]
            devices = max(1, int(key.split("-")[1]) // per_chip)
        elif "x" in key:
            count, _, kind = key.partition("x")
            if not count.isdigit():
                raise ValueError(f"topology {text!r}: expected COUNTxGPU (16xa100-80gb) or COUNTxGIB (32x95)")
            devices = int(count)
            if kind in GPUS:
                gib = GPUS[kind]
            else:
                try:
                    gib = float(kind)
                except ValueError:
                    raise ValueError(f"topology {text!r}: unknown device {kind!r}; use one of {sorted(GPUS)} "
                                     "or the GiB per device (32x95)") from None
        else:
            raise ValueError(f"topology {text!r}: use a slice name ({', '.join(k + '-N' for k in ACCELERATORS)}), "
                             f"COUNTxGPU ({', '.join(sorted(GPUS))}) or COUNTxGIB")
        if mesh is None:
            shape = (1, devices - sampler_devices, 1)
        elif isinstance(mesh, str):
            try:
                shape = tuple(int(x) for x in mesh.split(","))
            except ValueError:
                shape = ()
            if len(shape) != 3:
                raise ValueError(f"mesh {mesh!r}: expected three integers data,fsdp,tensor (e.g. 1,32,1)")
        else:
            shape = tuple(mesh)
        return cls(devices, gib, shape, name=name, sampler_devices=sampler_devices)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device; ``total`` is the peak estimate."""

    params: int
    grads: int
    optimizer: int
    updates: int
    compute: int
    reference: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.updates + self.compute + self.reference + self.activations


def _abstract_mesh(mesh_shape):
    return AbstractMesh(tuple(mesh_shape), MESH_AXES)


def shard_elements(table, mesh_shape, rules=None) -> tuple[int, int]:
    """(per-device elements, global elements) of a parameter table under ``rules``."""
    rules = rules or LogicalRules()
    mesh = _abstract_mesh(mesh_shape)
    sizes = dict(zip(MESH_AXES, mesh_shape))
    local = total = 0
    for spec in table:
        n = math.prod(spec.shape)
        split = 1
        for names in rules.spec(spec.axes, spec.shape, mesh):
            for name in ((names,) if isinstance(names, str) else names or ()):
                split *= sizes[name]
        local += -(-n // split)
        total += n
    return local, total


def optimizer_copies(table, step_cfg=None) -> int:
    """How many parameter-shaped float32 leaves the optimiser keeps per parameter
    (``jax.eval_shape`` of its init: AdamW gives 2)."""
    leaf = {f"p{i}": jax.ShapeDtypeStruct(s.shape, jnp.float32) for i, s in enumerate(table)}
    state = jax.eval_shape(make_optimizer(step_cfg or StepConfig()).init, leaf)
    param_elems = sum(math.prod(s.shape) for s in table)
    opt_elems = sum(math.prod(x.shape) for x in jax.tree.leaves(state) if x.ndim > 0)
    return round(opt_elems / param_elems)


def text_dims(config) -> dict:
    """Decoder sizes of a Qwen2.5-VL or Qwen3-VL config."""
    t = config.text
    return dict(D=t.hidden_size, I=t.intermediate_size, H=t.num_attention_heads, K=t.num_key_value_heads,
                hd=getattr(t, "head_dim", t.hidden_size // t.num_attention_heads), V=t.vocab_size,
                layers=t.num_hidden_layers)


def activation_bytes(dims: Mapping[str, int], mesh_shape, *, rows: int, seq_len: int, response_len: int,
                     compute_bytes: int, remat: bool, micro_batches: int = 1, attn_block: int = 128,
                     logprob_chunk: int = 128) -> int:
    """Activation bytes per device kept for the backward pass of one micro-batch.

    b rows per device = rows / (data*fsdp) / micro_batches, L = seq_len, t = tensor.
    Per layer and token the backward needs: layer input, two norm outputs, the attention
    output and residual (5 D), q/k/v and the attention output (2 H hd + 2 K hd) / t,
    gate/up/product (3 I / t), and the attention's float32 log-sum-exp (H / t per token:
    every kernel -- the XLA blocked kernel of ``models/common/flash.py``, cuDNN, Pallas --
    keeps it instead of the probabilities, and rebuilds one query block's probabilities
    at a time in the backward: about three [block, L] float32 tiles at the peak). With
    remat only each layer's input is kept (D per token per layer) and one layer's full
    set is rebuilt at a time. The LM head works on ``logprob_chunk`` response positions
    at a time: float32 logits, softmax and their gradient (3 V / t per position).
    """
    data, fsdp, t = mesh_shape
    b = max(1, -(-rows // (data * fsdp * micro_batches)))
    L = seq_len
    D, I, H, K, hd, V, layers = (dims[k] for k in ("D", "I", "H", "K", "hd", "V", "layers"))
    per_token = 5 * D + (2 * H * hd + 2 * K * hd) / t + 3 * I / t
    block_probs = 3 * 4 * b * (H / t) * min(L, attn_block) * L  # the backward's float32 tiles of one query block
    log_sum_exp = 4 * b * (H / t) * L
    if remat:
        kept = layers * b * L * D * compute_bytes + b * L * per_token * compute_bytes + block_probs
    else:
        kept = layers * (b * L * per_token * compute_bytes + log_sum_exp) + block_probs
    head = 3 * 4 * b * min(response_len, logprob_chunk) * V / t
    return int(kept + head)


def estimate_memory(table, dims: Mapping[str, int], mesh_shape, *, rows: int, seq_len: int, response_len: int,
                    compute_dtype: str = "float32", reference_dtype: str | None = None, remat: bool = False,
                    micro_batches: int = 1, optimizer_leaves: int = 2, rules=None, attn_block: int = 128,
                    logprob_chunk: int = 128) -> MemoryEstimate:
    """Per-device bytes of one train step (pure arithmetic; see the module docstring).

    reference_dtype: dtype of a separately held reference policy (None: not held)."""
    width = {"float32": 4, "bfloat16": 2, "float16": 2}
    for name, value in (("compute_dtype", compute_dtype), ("reference_dtype", reference_dtype)):
        if value is not None and value not in width:
            raise ValueError(f"estimate_memory: {name}={value!r}; use one of {sorted(width)}")
    local, _ = shard_elements(table, mesh_shape, rules)
    cb = width[compute_dtype]
    return MemoryEstimate(
        params=4 * local, grads=4 * local, optimizer=4 * local * optimizer_leaves, updates=4 * local,
        compute=cb * local if cb != 4 else 0,
        reference=width[reference_dtype] * local if reference_dtype else 0,
        activations=activation_bytes(dims, mesh_shape, rows=rows, seq_len=seq_len, response_len=response_len,
                                     compute_bytes=cb, remat=remat, micro_batches=micro_batches,
                                     attn_block=attn_block, logprob_chunk=logprob_chunk))


def matmul_params(table) -> tuple[int, int]:
    """(decoder-layer weights, LM-head weights) of the text model: the weights that multiply
    every position, and those applied only where a log-prob is taken (the embedding
    lookup is not a matmul; a tied embedding counts once, as the head)."""
    body = head = 0
    paths = {tuple(s.path) for s in table}
    for spec in table:
        per_layer_ndim = len(spec.shape) - (1 if getattr(spec, "num_layers", None) else 0)
        if spec.path[0] != "text" or per_layer_ndim < 2:  # norms and biases are not matmuls
            continue
        if spec.path[-1] == "embed":
            head += 0 if ("text", "lm_head") in paths else math.prod(spec.shape)
        elif spec.path[-1] == "lm_head":
            head += math.prod(spec.shape)
        else:
            body += math.prod(spec.shape)
    return body, head


def step_flops(table, dims: Mapping[str, int], *, prompts: int, group: int, prompt_len: int, response_len: int,
               ppo_epochs: int = 1, remat: bool = False) -> dict[str, float]:
    """FLOPs of one RL step by phase (whole job, all devices).

    A forward pass over one row: 2 * body * L + 2 * head * T (the LM head runs on the T
    response positions only) + causal attention. Backward = 2 forwards; remat re-runs
    the decoder layers (not the head) once more."""
    body, head = matmul_params(table)
    layers, H, hd = dims["layers"], dims["H"], dims["hd"]
    rows, L, T = prompts * group, prompt_len + response_len, response_len

    def attention(q_len, k_len, causal=True):  # q.k and p.v, 2 flops per multiply-add
        return 4 * layers * H * hd * q_len * k_len * (0.5 if causal else 1.0)

    layers_fwd = rows * (2 * body * L + attention(L, L))
    forward = layers_fwd + rows * 2 * head * T
    rollout = prompts * (2 * body * prompt_len + attention(prompt_len, prompt_len)) + rows * (
        2 * (body + head) * T + attention(T, prompt_len + T / 2, causal=False))
    return {"rollout": rollout, "logprobs": 3 * forward,
            "train": ppo_epochs * (3 * forward + (layers_fwd if remat else 0))}


# -- configs ------------------------------------------------------------------------------
def _as_dict(config) -> dict:
    """The run config a dry run sizes, as a nested dict (a preset's name kept as "_preset")."""
    if isinstance(config, str):
        out = preset_dict(config)
        out.setdefault("_preset", config)
        return out
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"dry run: expected a preset name, a config dataclass or a dict, got {type(config).__name__}")


def run_config(config_or_preset):
    """The validated run config (`caspo_jax.loop.config.TrainConfig`) of a preset name,
    a nested dict of overrides on the defaults, or a run config itself."""
    if isinstance(config_or_preset, TrainConfig):
        return config_or_preset
    raw = {k: v for k, v in _as_dict(config_or_preset).items() if k != "_preset"}
    return config_from_dict(raw, f"preset {config_or_preset!r}" if isinstance(config_or_preset, str) else "dry run")


def model_for(cfg: Mapping[str, Any]):
    """The model (parameter table only, nothing loaded) a config trains."""
    model_cfg = cfg.get("model", {}) or {}
    path = model_cfg.get("path")
    raw = None
    if path and (Path(path) / "config.json").exists():
        raw = json.loads((Path(path) / "config.json").read_text())
    elif path:
        key = cfg.get("_preset") or next((k for k in ARCHITECTURES if k.replace("_", "").lower()
                                          in Path(path).name.replace(".", "").replace("-", "").replace("_", "").lower()),
                                         None)
        if key not in ARCHITECTURES:
            raise FileNotFoundError(f"dry run: model.path={path!r} has no config.json and names no known architecture "
                                    f"({sorted(ARCHITECTURES)}); point model.path at a local HF directory")
        raw = ARCHITECTURES[key]
    else:
        raw = tm.hf_config_dict("vision")
    if raw.get("model_type") == "qwen3_vl":
        return qwen3_vl.Qwen3VL(qwen3_vl.Qwen3VLConfig.from_dict(raw))
    return qwen2_5_vl.Qwen2_5_VL(qwen2_5_vl.Qwen2_5_VLConfig.from_dict(raw))


def _gib(n: float) -> str:
    return f"{n / GIB:9.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:9.2f} MiB"


def run_memory(cfg, model, topology: Topology) -> MemoryEstimate:
    """Per-device bytes of `cfg`'s CASPO train step on `topology`, sized with the step config
    the run itself builds (`step_config(cfg, "caspo")`: micro-batches, compute dtype,
    remat, LM-head chunk) and the model's attention block. Only full remat (layer inputs
    kept) is modelled; the partial policies ("save_projections", "save_dots") keep less
    than no remat, so they are estimated as no remat (an upper bound)."""
    step = step_config(cfg, "caspo")
    table = model.param_table()
    rows = min(cfg.optim.minibatch_size, cfg.rollouts_per_step)
    return estimate_memory(table, text_dims(model.config), topology.mesh, rows=rows,
                           seq_len=cfg.data.max_prompt_len + cfg.data.max_response_len,
                           response_len=cfg.data.max_response_len, compute_dtype=step.compute_dtype,
                           reference_dtype=step.compute_dtype, remat=step.remat in (True, "full"),
                           micro_batches=step.micro_batches, optimizer_leaves=optimizer_copies(table, step),
                           attn_block=getattr(model, "attn_block", 128), logprob_chunk=step.logprob_chunk)


def dry_run_report(config_or_preset, topology: Topology | str) -> str:
    """The text ``caspo train --dry-run`` / ``caspo dryrun`` prints for a run config, a
    preset name or a nested dict of overrides (validated like a run's)."""
    raw = _as_dict(config_or_preset)
    cfg = run_config(config_or_preset)
    n_sampler = cfg.rollout.devices
    topo = Topology.parse(topology, sampler_devices=n_sampler) if isinstance(topology, str) else topology
    if topo.sampler_devices != n_sampler:
        raise ValueError(f"topology {topo.name or ''} keeps {topo.sampler_devices} device(s) for the sampler but the "
                         f"config has rollout.devices={n_sampler}; build it with Topology.parse(..., "
                         f"sampler_devices={n_sampler})")
    model = model_for({**dataclasses.asdict(cfg), "_preset": raw.get("_preset")})
    table = model.param_table()
    dims = text_dims(model.config)
    prompts, group = cfg.algo.prompts_per_step, cfg.algo.group_size
    prompt_len, response_len = cfg.data.max_prompt_len, cfg.data.max_response_len
    rows = min(cfg.optim.minibatch_size, prompts * group)
    step = step_config(cfg, "caspo")
    micro, dtype, policy = step.micro_batches, step.compute_dtype, step.remat
    remat = policy in (True, "full")
    partial = policy in ("save_projections", "save_dots")
    mem = run_memory(cfg, model, topo)
    local, total = shard_elements(table, topo.mesh)
    flops = step_flops(table, dims, prompts=prompts, group=group, prompt_len=prompt_len, response_len=response_len,
                       ppo_epochs=cfg.optim.ppo_epochs, remat=remat)
    split = MemorySplit.for_engine(cfg.model.gpu_memory_split) if cfg.rollout.engine == "vllm" else None
    budget = (split.trainer if split else 1.0) * topo.memory_gib * GIB  # the trainer's share of a device
    fits = mem.total <= budget
    data, fsdp, tensor = topo.mesh
    lines = [
        f"caspo dry run: {raw.get('_preset') or cfg.model.path or 'tiny model'} on "
        f"{topo.name or 'topology'} ({topo.devices} devices x {topo.memory_gib:g} GiB)",
        f"mesh            data={data} fsdp={fsdp} tensor={tensor}"
        + (f" (the trainer's {topo.trainer_devices}; rollout.devices={n_sampler} for the sampler alone)"
           if n_sampler else ""),
        f"model           {type(model).__name__}: {total / 1e9:.3f} B parameters, {local / 1e6:.1f} M per device",
        f"step            {prompts} prompts x {group} samples, mini-batch {rows} rows "
        f"({-(-rows // (data * fsdp * micro))} per device per micro-batch, {micro} micro-batch(es)), "
        f"sequence {prompt_len}+{response_len}, compute {dtype}, remat {policy if isinstance(policy, str) else ('on' if remat else 'off')}"
        + (" (estimated as no remat: an upper bound)" if partial else ""),
        "memory per device:",
        f"  params (f32)  {_gib(mem.params)}",
        f"  grads (f32)   {_gib(mem.grads)}",
        f"  optimizer     {_gib(mem.optimizer)}",
        f"  updates       {_gib(mem.updates)}",
        f"  compute copy  {_gib(mem.compute)}",
        f"  reference     {_gib(mem.reference)}",
        f"  activations   {_gib(mem.activations)}",
        f"  total         {_gib(mem.total)} of {budget / GIB:g} GiB"
        + (" (the trainer's share)" if split else "") + ": "
        + ("fits" if fits else "DOES NOT FIT (add fsdp/tensor, turn model.remat on, or raise optim.micro_batches"
           + (", or lower model.gpu_memory_split)" if split else ")")),
        "memory split    " + (split.describe(topo.memory_gib) + " (model.gpu_memory_split)" if split else
                                "none: no in-process vLLM engine (rollout.engine=vllm with model.gpu_memory_split "
                                "on GPUs sets one)"),
        "FLOPs per RL step (all devices):",
        *(f"  {k:<13} {v:.3e}" for k, v in flops.items()),
        f"  total         {sum(flops.values()):.3e}  ({sum(flops.values()) / topo.devices:.3e} per device)",
        "rollout FLOPs assume the JAX sampler on the same devices; with vLLM hosts they move there."
        if not n_sampler else
        f"rollout FLOPs run on the sampler's {n_sampler} device(s) (rollout.devices), each holding the float32 "
        f"weights whole ({_gib(4 * total).strip()}) plus the KV cache.",
    ]
    return "\n".join(lines) + "\n"


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    """--topology and --mesh: the devices a dry run sizes the job for."""
    parser.add_argument("--topology", default="1x16",
                        help="for --dry-run: v5p-64, 16xa100-80gb or DEVICESxGIB (32x95); optional :data,fsdp,tensor")
    parser.add_argument("--mesh", default=None, help="for --dry-run: data,fsdp,tensor (default: all devices on fsdp)")


def print_dry_run(cfg, args: argparse.Namespace) -> int:
    try:
        topology = Topology.parse(args.topology, args.mesh, sampler_devices=cfg.rollout.devices)
    except ValueError as exc:
        print(f"caspo: --topology/--mesh: {one_line(exc)}", file=sys.stderr)
        return 2
    print(dry_run_report(cfg, topology), end="")
    return 0


# -- `caspo dryrun` (the same as `caspo train --dry-run`) ------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="tiny-cpu", help="a preset name (caspo_jax.loop.presets) (default tiny-cpu)")
    parser.add_argument("--config", metavar="YAML", help="YAML file of overrides on the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set optim.minibatch_size=256 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_topology_arguments(parser)


def run(args) -> int:
    cfg, status = resolve(args)
    if status is not None:
        return status
    return print_dry_run(cfg, args)
