"""One typed config for `caspo train`, `caspo sft`, `caspo dpo`, `caspo rm` and `caspo demo`.

Frozen dataclasses of plain fields, so a run's config is a YAML file, every field is
overridable from the command line as a dotted key (`--set algo.lam=0.6`), and the exact
config is printed and saved beside the run. Every check runs in `validate` -- before any
model is built -- and every error names the field and the fix.

    cfg = load_config(preset="tiny-cpu", path="my.yaml", overrides=["algo.lam=0.6"])
    step_cfg = step_config(cfg, "caspo")   # the jitted train step's StepConfig ("sft", "dpo", "rm")

The step's knobs live in `optim` (AdamW, micro-batches, frozen vision, truncated IS,
LM-head chunk) and `model` (dtype = compute dtype, remat, attention implementation);
`step_config` is the one place they become the step's config, for runs and dry runs.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from caspo_jax.algo.config import CaspoConfig
from caspo_jax.demo.task import DEMO_STARTS, DEMO_TEACHERS
from caspo_jax.errors import UserError
from caspo_jax.files import read_structured
from caspo_jax.loop.presets import preset_dict
from caspo_jax.models.common.layers import REMAT_CHOICES
from caspo_jax.rollout.types import logit_temperature
from caspo_jax.step.correction import CORRECTIONS, RolloutCorrection
from caspo_jax.step.optimizer import COMPUTE_DTYPES, StepConfig

__all__ = [
    "ConfigError",
    "DPOConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RMConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "TrainConfig",
    "STAGES",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "rollout_correction",
    "step_config",
]


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the source, the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """path: an HF checkpoint directory (config.json + safetensors + tokenizer/processor).
    None builds the built-in tiny random model (`tiny`: its size name) with the tiny
    offline tokenizer -- the default for tests and `caspo demo`.

    teacher_path: the ORIGINAL (pre-SFT) model's HF directory, the teacher of
    algo.teacher='original' (the paper's CASPO-w.-OMC): it scores the
    constitution-conditioned prompt; same architecture as the policy.

    ignore_custom_code: load a checkpoint directory that declares its own code (auto_map,
    trust_remote_code) as a plain Qwen-VL model (`--ignore-custom-code`); its code is never
    run either way. False refuses such a directory (exit 2).

    dtype: the parameters' load dtype and the compute dtype of every forward -- rollout,
    the old / reference / teacher log-probs and the train step (float32 master weights
    either way): log-probs that meet in a ratio, a KL or a token reward must share it.
    remat: the train step's backward rematerialisation (see `StepConfig.remat`).
    attn_implementation: the attention kernel of every forward of the model: "auto"
    (cuDNN flash attention on NVIDIA GPUs in bf16, Pallas flash on TPU for causal text
    attention where the shapes allow, XLA elsewhere; each choice and fallback logged once,
    `caspo_jax.models.common.attention`), null (JAX picks: XLA), "xla", or "cudnn"; a model
    property, not a step one, so the sampler, the log-prob passes and the step agree. On
    CPU "auto" compiles the same program as null.
    gpu_memory_split: the share of each GPU given to an in-process vLLM engine
    (rollout.engine=vllm on the trainer's GPUs; its gpu_memory_utilization); JAX gets the
    rest less 0.05 of headroom (`caspo_jax.rollout.colocate.MemorySplit`). null: no
    colocated engine (JAX keeps its default of 0.75)."""

    path: str | None = None
    teacher_path: str | None = None
    tiny: str = "demo"
    dtype: str = "float32"
    remat: bool | str = False
    attn_implementation: str | None = "auto"
    gpu_memory_split: float | None = None
    seed: int = 0
    ignore_custom_code: bool = False

    def __post_init__(self):
        if self.gpu_memory_split is not None and not 0.0 < self.gpu_memory_split < 0.95:
            raise ValueError(f"gpu_memory_split={self.gpu_memory_split!r} must be in (0, 0.95): the share of each GPU "
                             "for the in-process vLLM engine (e.g. 0.3), or null for no colocated engine")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """train / eval: safety-record JSONL (caspo_jax.data.records). sft: SFT JSONL;
    pairs: preference-pair JSONL (DPO's pairs; the reward model's Bradley-Terry pairs).
    None with the tiny model: the built-in demo task (`demo_train` / `demo_eval` examples
    generated into the run directory). scores: RSE-scored responses JSONL (id, images,
    query, response, score 0..6; `caspo curate select`'s mse.jsonl), the reward model's
    MSE records (`caspo rm` only).

    demo_start / demo_teacher: the demo's SFT rows, i.e. the starting policy of its RL
    stage (`caspo_jax.demo.task.write_split`): "suppressed" (plain rows never warn) or
    "blind" (plain rows warn at a fixed rate whatever the image); "discriminating"
    (constitution rows warn iff the hazard is there) or "biased" (they always warn), so
    the constitution-conditioned teacher is right or biased towards warning.

    max_bad_fraction: the share of a file's records a run may skip -- invalid JSONL lines,
    images that cannot be read -- each skip counted and reported once; more stops the run
    before training (exit 2). 0: any bad record stops it."""

    train: str | None = None
    eval: str | None = None
    sft: str | None = None
    pairs: str | None = None
    scores: str | None = None
    constitutions: str | None = None
    max_prompt_len: int = 2048
    max_response_len: int = 1024
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280
    demo_train: int = 480
    demo_eval: int = 96
    demo_start: str = "suppressed"
    demo_teacher: str = "discriminating"
    seed: int = 0
    max_bad_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """engine: "jax" (the JAX sampler; CPU/TPU/GPU) or "vllm" (GPU hosts).
    temperature 0.9 as in the paper's evaluation; 1.0 is verl's RL default.

    max_staleness: k, how many weight versions a trained sample may lag the trainer. 0
    (default): the synchronous loop (generate, score, update, push, in turn). k >= 1: a
    producer thread generates the next steps' rollouts while the trainer updates, each
    tagged with the weight version that produced it; step s trains only on rollouts of
    version >= s - k (`caspo_jax.rollout.producer`). timeout_s: the longest the trainer waits
    for a rollout batch before the run stops with an error (a dead or hung rollout engine),
    the last checkpoint intact.

    dynamic_sampling: DAPO's dynamic sampling (`caspo_jax.loop.dynamic_sampling`): prompt
    groups whose outcome rewards are all equal are dropped and more prompt batches drawn
    (at most dynamic_sampling_max_draws per step, the first included) until the step's
    algo.prompts_per_step groups are full; short of that, dropped groups fill the rest.
    With max_staleness >= 1 the producer thread draws them, scoring each draw itself.

    workers: where the engine runs. "local": in this process, on its devices ("jax": the
    trainer's devices, or with devices = n the last n of them, the trainer's mesh on the
    rest; "vllm": this process's GPUs). "subprocess": num_workers spawned processes on this
    host (each with the variables of worker_env set before JAX or vLLM starts, e.g.
    CUDA_VISIBLE_DEVICES). "ray": num_workers Ray actors (ray_address; worker_gpus GPUs
    each) anywhere in the cluster. Remote workers get the trainer's weights as safetensors
    buckets after every update (`caspo_jax.remote`); with several trainer processes each
    has its own num_workers and generates its own share of the prompts.
    worker_model_dir: the HF directory vLLM workers start from on their hosts
    (architecture, tokenizer, processor; null: model.path).

    devices: with workers "local" and engine "jax", the number of this process's devices
    given to the sampler alone (the last ones; the trainer's mesh takes the others), so
    with max_staleness >= 1 generation and the update run on different chips. 0: the
    sampler shares the trainer's devices. With several processes at most 1 (each
    process's last device; `caspo_jax.loop.placement`)."""

    engine: str = "jax"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eval_temperature: float = 0.0
    max_staleness: int = 0
    timeout_s: float = 1800.0
    dynamic_sampling: bool = False
    dynamic_sampling_max_draws: int = 4
    workers: str = "local"
    num_workers: int = 1
    worker_env: dict = dataclasses.field(default_factory=dict)
    worker_gpus: float = 0.0
    worker_model_dir: str | None = None
    ray_address: str = "auto"
    devices: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The update: AdamW, its batching and the train step's own knobs. With model.dtype,
    model.remat and the stage's learning rate and temperature it is the whole of the
    jitted step's `StepConfig` (`step_config`, the one place they meet).

    ppo_epochs: passes over the step's rollouts; minibatch_size: trajectories per
    optimizer update (must divide prompts_per_step * group_size). micro_batches: the
    CASPO step accumulates gradients over this many micro-batches of each mini-batch
    (same loss and gradient, less activation memory; must divide minibatch_size).
    AdamW with linear warm-up then constant lr (the lr itself is algo.learning_rate for
    RL, sft.learning_rate / dpo.learning_rate for those stages): weight_decay, b1, b2,
    adam_eps; grad_clip: global-norm clipping (null: off). freeze_vision: no update for
    the vision tower. rollout_correction: how the CASPO step weighs each token against the
    rollout engine's own log-probs (`caspo_jax.step.correction`): "none", "tis" (truncated
    IS, weight min(pi_old / pi_rollout, tis_cap); tis_cap defaults to 2.0, verl's value),
    "mis_token" / "mis_seq" (masked IS: tokens, or whole sequences by their mean
    log-ratio, whose ratio is outside [1 / mis_threshold, mis_threshold] get weight 0).
    tis_cap alone (rollout_correction "none") still turns TIS on, as before the field
    existed. logprob_chunk: response positions per LM-head
    chunk in every log-prob pass (memory of one [rows, chunk, vocab] float32 block)."""

    ppo_epochs: int = 1
    minibatch_size: int = 512
    micro_batches: int = 1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    freeze_vision: bool = False
    tis_cap: float | None = None
    rollout_correction: str = "none"
    mis_threshold: float = 2.0
    logprob_chunk: int = 128


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """steps: RL steps (None: `epochs` passes over the prompts). eval_every / save_every /
    log_every in steps (0 disables). keep_last: checkpoints kept.

    mesh_data / mesh_fsdp / mesh_tensor: the (data, fsdp, tensor) device mesh of every
    stage (`caspo_jax.loop.placement`); -1 (one field at most) = all remaining
    devices. Rows of an update split over data * fsdp, which must divide them.

    halt_failed_share / halt_failed_steps: `caspo train` saves and stops with RunHalted
    (exit 3) after halt_failed_steps consecutive steps in which at least halt_failed_share
    of the prompt groups had a failed reward (a judge that is down, a reward that cannot
    score the records): such steps train nothing. Default: every group, 3 steps in a row;
    halt_failed_steps=0 never stops."""

    out_dir: str = "runs/caspo"
    steps: int | None = None
    epochs: int = 3
    eval_every: int = 0
    save_every: int = 50
    keep_last: int = 3
    seed: int = 0
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    halt_failed_share: float = 1.0
    halt_failed_steps: int = 3


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The paper's SFT stage: lr 1e-5, 2 epochs, loss on response tokens only.

    with_constitution (default true): the SFT prompt carries the example's category
    constitution (the teacher prompt of eq. 4), as appendix B.1's SFT "instill[s] initial
    adherence to category-specific safety constitutions" and sec. 5.2's SFT model has
    stronger "constitution-following capabilities". SFT records (`caspo curate select`)
    hold the plain query and the category; the constitution is added here, at encoding.
    An example's own "with_constitution" field overrides this for that example.
    """

    learning_rate: float = 1e-5
    epochs: int = 2
    batch_size: int = 8
    with_constitution: bool = True
    steps: int | None = None


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO on preference pairs against the frozen initial policy (the static baseline)."""

    beta: float = 0.1
    learning_rate: float = 1e-6
    epochs: int = 1
    batch_size: int = 8
    steps: int | None = None


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """`caspo rm`: the reward model of eq. 7 (Bradley-Terry on data.pairs + mse_weight *
    MSE on data.scores), trained from model.path (a backbone, or an earlier reward model).

    batch_size counts slots (a pair, or two MSE records): 2 * batch_size rows. steps: total
    updates (None: `epochs` passes over the training slots). eval_fraction: the held-out
    share of the pairs and of the MSE records; eval_every: steps between held-out
    evaluations (0: at the end only). The update is `optim`'s AdamW at `learning_rate`;
    the compute dtype is model.dtype, the mesh run.mesh_*, the seed run.seed (head
    initialisation, held-out split, batch order)."""

    mse_weight: float = 1.0
    learning_rate: float = 1e-5
    epochs: int = 1
    batch_size: int = 8
    steps: int | None = None
    eval_fraction: float = 0.1
    eval_every: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    algo: CaspoConfig = CaspoConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    sft: SFTConfig = SFTConfig()
    dpo: DPOConfig = DPOConfig()
    rm: RMConfig = RMConfig()
    # outcome reward spec for caspo_jax.rewards.build_reward, or {"kind": "demo"}
    reward: dict = dataclasses.field(default_factory=lambda: {"kind": "demo"})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def rollouts_per_step(self) -> int:
        return self.algo.prompts_per_step * self.algo.group_size


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}

STAGES = ("caspo", "sft", "dpo", "rm")


def step_config(cfg: TrainConfig, stage: str) -> StepConfig:
    """The jitted train step's config for `stage` of run config `cfg` -- what `caspo train`
    ("caspo"), `caspo sft` and `caspo dpo` train with, and what `caspo dryrun` sizes.

    optim gives the AdamW knobs, micro_batches, freeze_vision, the TIS cap (of
    `rollout_correction` "tis"; the masked modes reach the step as `rollout_correction(cfg)`)
    and logprob_chunk;
    model gives compute_dtype (model.dtype: the frozen reference, the teacher and the
    rollout share it) and remat; the stage gives the learning rate (algo / sft / dpo
    / rm .learning_rate) and the logits' temperature: CASPO scores at the rollout's sampling
    temperature (`logit_temperature`: 1 for greedy), SFT, DPO and the reward model at 1."""
    if stage not in STAGES:
        raise ValueError(f"step_config: stage={stage!r}; use one of {STAGES}")
    o = cfg.optim
    rates = {"caspo": cfg.algo.learning_rate, "sft": cfg.sft.learning_rate, "dpo": cfg.dpo.learning_rate,
             "rm": cfg.rm.learning_rate}
    temperature = logit_temperature(cfg.rollout.temperature) if stage == "caspo" else 1.0
    return StepConfig(learning_rate=rates[stage], warmup_steps=o.warmup_steps, weight_decay=o.weight_decay,
                      b1=o.b1, b2=o.b2, adam_eps=o.adam_eps, max_grad_norm=o.grad_clip,
                      micro_batches=o.micro_batches, compute_dtype=cfg.model.dtype,
                      freeze_vision=o.freeze_vision, remat=cfg.model.remat, tis_cap=_step_tis_cap(cfg),
                      logprob_chunk=o.logprob_chunk, temperature=temperature)


def rollout_correction(cfg: TrainConfig) -> RolloutCorrection:
    """The CASPO step's rollout correction from optim.rollout_correction, optim.tis_cap and
    optim.mis_threshold (ConfigError when they contradict each other)."""
    o = cfg.optim
    mode = o.rollout_correction
    if mode not in CORRECTIONS:
        raise ConfigError(f"optim.rollout_correction={mode!r} must be one of {list(CORRECTIONS)}")
    if mode.startswith("mis") and o.tis_cap is not None:
        raise ConfigError(f"optim.tis_cap={o.tis_cap} is set with optim.rollout_correction={mode!r}: tis_cap is the "
                          "cap of 'tis'; masked IS uses optim.mis_threshold. Drop optim.tis_cap or use "
                          "rollout_correction=tis")
    if mode == "none" and o.tis_cap is None:
        return RolloutCorrection()
    if mode in ("none", "tis"):
        return RolloutCorrection("tis", 2.0 if o.tis_cap is None else o.tis_cap)
    try:
        return RolloutCorrection(mode, o.mis_threshold)
    except ValueError:
        raise ConfigError(f"optim.mis_threshold={o.mis_threshold} must be > 1: masked IS drops tokens whose ratio "
                          "pi_old / pi_rollout is outside [1 / mis_threshold, mis_threshold] (2.0 is usual)") from None


def _step_tis_cap(cfg: TrainConfig) -> float | None:
    correction = rollout_correction(cfg)
    return correction.threshold if correction.mode == "tis" else None


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_type(value, annotation, where: str):
    """Coerces YAML scalars to the annotated type (int -> float is allowed); else ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # bool | str: the first type that accepts the value
            try:
                return _check_type(value, option, where)
            except ConfigError:
                pass
        return _check_type(value, inner[-1], where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "2e-6" (no dot) as a string
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and not (isinstance(value, annotation)
                                                      and not (annotation is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
    if annotation is dict and not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _build_section(cls, raw: Mapping, where: str):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of fields, got {raw!r}")
    types = _field_types(cls)
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(types)}")
    kwargs = {k: _check_type(v, types[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_from_dict(raw: Mapping, source: str = "config") -> TrainConfig:
    """A validated TrainConfig from a nested mapping (missing fields keep their defaults)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known sections: {sorted(_SECTIONS)}")
    kwargs = {}
    for name, value in raw.items():
        if name == "reward":
            kwargs[name] = dict(_check_type(value, dict, f"{source}: reward"))
        else:
            kwargs[name] = _build_section(_field_types(TrainConfig)[name], value, f"{source}: {name}")
    cfg = TrainConfig(**kwargs)
    validate(cfg, source)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "reward":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict, overrides: Iterable[str], source: str = "--set") -> dict:
    """Applies "section.field=value" strings (values parsed as YAML) to a nested dict."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected section.field=value, e.g. algo.lam=0.6")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"{source} {item!r}: the key must be dotted, e.g. algo.lam=0.6 or run.steps=10")
        if parts[0] not in _SECTIONS:
            raise ConfigError(f"{source} {item!r}: unknown section {parts[0]!r}; known: {sorted(_SECTIONS)}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} {item!r}: value is not valid YAML ({exc})") from None
        node = out
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = value
    return out


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: Iterable[str] = ()) -> TrainConfig:
    """preset (caspo_jax/loop/presets.py) <- YAML file <- dotted overrides, validated once at the end."""
    raw: dict = {}
    source = "config"
    if preset is not None:
        raw = preset_dict(preset)
        source = f"preset {preset!r}"
    if path is not None:
        path = Path(path)
        loaded = read_structured(path, Mapping, what="config file", expected="a mapping of sections",
                                 error=ConfigError, empty={})
        raw = _merge(raw, loaded)
        source = str(path)
    overrides = list(overrides)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} + --set"
    return config_from_dict(raw, source)


def validate(cfg: TrainConfig, source: str = "config") -> None:
    """Cross-field checks (each field's own range is checked by its dataclass)."""

    def fail(field: str, why: str):
        raise ConfigError(f"{source}: {field} {why}")

    a, o, d, r = cfg.algo, cfg.optim, cfg.data, cfg.run
    if o.ppo_epochs < 1:
        fail("optim.ppo_epochs", f"={o.ppo_epochs} must be >= 1")
    if o.minibatch_size < 1:
        fail("optim.minibatch_size", f"={o.minibatch_size} must be >= 1")
    total = a.prompts_per_step * a.group_size
    if o.micro_batches < 1 or o.minibatch_size % o.micro_batches:
        fail("optim.micro_batches", f"={o.micro_batches} must be >= 1 and divide optim.minibatch_size="
             f"{o.minibatch_size} (each micro-batch holds minibatch_size / micro_batches rows); 1: no accumulation")
    if o.logprob_chunk < 1:
        fail("optim.logprob_chunk", f"={o.logprob_chunk} must be >= 1 (response positions per LM-head chunk; "
             "128 is the default)")
    if not o.adam_eps > 0:
        fail("optim.adam_eps", f"={o.adam_eps} must be > 0 (AdamW's denominator term; 1e-8 is usual)")
    if o.grad_clip is not None and not o.grad_clip > 0:
        fail("optim.grad_clip", f"={o.grad_clip} must be > 0, or null to disable clipping")
    if o.warmup_steps < 0:
        fail("optim.warmup_steps", f"={o.warmup_steps} must be >= 0")
    if o.tis_cap is not None and not o.tis_cap > 0:
        fail("optim.tis_cap", f"={o.tis_cap} must be > 0 (verl uses 2.0), or null to disable truncated "
             "importance sampling")
    if total % o.minibatch_size:
        fail("optim.minibatch_size", f"={o.minibatch_size} must divide algo.prompts_per_step * algo.group_size = "
             f"{a.prompts_per_step} * {a.group_size} = {total}; pick a divisor such as {a.group_size}")
    if o.minibatch_size % a.group_size and a.group_size % o.minibatch_size:
        fail("optim.minibatch_size", f"={o.minibatch_size} must be a multiple of algo.group_size={a.group_size} "
             "(or divide it), so mini-batches do not split groups unevenly")
    for field in ("max_prompt_len", "max_response_len", "image_min_pixels", "image_max_pixels", "demo_train",
                  "demo_eval"):
        if getattr(d, field) < 1:
            fail(f"data.{field}", f"={getattr(d, field)} must be >= 1")
    if d.demo_start not in DEMO_STARTS:
        fail("data.demo_start", f"={d.demo_start!r} must be one of {list(DEMO_STARTS)}")
    if d.demo_teacher not in DEMO_TEACHERS:
        fail("data.demo_teacher", f"={d.demo_teacher!r} must be one of {list(DEMO_TEACHERS)}")
    if not 0.0 <= d.max_bad_fraction < 1.0:
        fail("data.max_bad_fraction", f"={d.max_bad_fraction} must be in [0, 1): the share of records a run may "
             "skip (0: none)")
    if d.image_min_pixels > d.image_max_pixels:
        fail("data.image_min_pixels", f"={d.image_min_pixels} exceeds data.image_max_pixels={d.image_max_pixels}")
    if cfg.rollout.engine not in ("jax", "vllm"):
        fail("rollout.engine", f"={cfg.rollout.engine!r} must be 'jax' or 'vllm'")
    if cfg.rollout.temperature < 0 or cfg.rollout.eval_temperature < 0:
        fail("rollout.temperature", "must be >= 0 (0 = greedy)")
    try:
        correction = rollout_correction(cfg)  # optim.rollout_correction / tis_cap / mis_threshold agree
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if (correction.active and cfg.rollout.engine == "vllm"
            and logit_temperature(cfg.rollout.temperature) != 1):
        field = "optim.tis_cap" if o.rollout_correction == "none" else "optim.rollout_correction"
        fail(field, f"with rollout.engine='vllm' needs rollout.temperature 1 (or 0, greedy): vLLM returns "
             f"raw log-probs (T = 1) while the step scores at rollout.temperature={cfg.rollout.temperature}, so "
             "the weights would compare two distributions; use the jax engine or set optim.rollout_correction=none "
             "and drop optim.tis_cap")
    if cfg.rollout.max_staleness < 0:
        fail("rollout.max_staleness", f"={cfg.rollout.max_staleness} must be >= 0 (0: the synchronous loop; 1: "
             "rollouts one weight version behind the trainer)")
    if cfg.rollout.dynamic_sampling_max_draws < 1:
        fail("rollout.dynamic_sampling_max_draws", f"={cfg.rollout.dynamic_sampling_max_draws} must be >= 1 (prompt "
             "batches drawn per step at most, the first included)")
    ro = cfg.rollout
    if ro.workers not in ROLLOUT_WORKERS:
        fail("rollout.workers", f"={ro.workers!r} must be one of {list(ROLLOUT_WORKERS)} (where the rollout engine "
             "runs: this process, spawned processes on this host, or Ray actors)")
    if ro.num_workers < 1:
        fail("rollout.num_workers", f"={ro.num_workers} must be >= 1")
    if ro.workers == "local" and (ro.num_workers != 1 or ro.worker_env or ro.worker_gpus):
        fail("rollout.num_workers / worker_env / worker_gpus", "are for remote workers: set rollout.workers="
             "subprocess or ray, or drop them (rollout.workers=local runs one engine in this process)")
    if ro.worker_gpus < 0:
        fail("rollout.worker_gpus", f"={ro.worker_gpus} must be >= 0 (GPUs Ray gives each worker)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in ro.worker_env.items()):
        fail("rollout.worker_env", f"={ro.worker_env!r} must map variable names to strings (quote numbers: "
             "CUDA_VISIBLE_DEVICES: '0')")
    if ro.engine == "vllm" and ro.workers != "local" and (ro.worker_model_dir or cfg.model.path) is None:
        fail("rollout.worker_model_dir", "is not set: vLLM workers start from an HF directory on their hosts "
             "(architecture, tokenizer, processor); set rollout.worker_model_dir, or model.path when it is the "
             "same path there")
    if ro.worker_model_dir is not None and not (ro.engine == "vllm" and ro.workers != "local"):
        fail("rollout.worker_model_dir", "is only for remote vLLM workers (rollout.engine=vllm with "
             "rollout.workers=subprocess or ray); drop it")
    if ro.devices < 0:
        fail("rollout.devices", f"={ro.devices} must be >= 0 (0: the sampler shares the trainer's devices)")
    if ro.devices and (ro.engine != "jax" or ro.workers != "local"):
        fail("rollout.devices", f"={ro.devices} is the in-process JAX sampler's own devices: it needs "
             f"rollout.engine=jax and rollout.workers=local (got {ro.engine!r}, {ro.workers!r})")
    if not cfg.rollout.timeout_s > 0:
        fail("rollout.timeout_s", f"={cfg.rollout.timeout_s} must be > 0 (seconds the trainer waits for a rollout "
             "batch before it stops with an error)")
    if r.steps is not None and r.steps < 1:
        fail("run.steps", f"={r.steps} must be >= 1 (or null to run run.epochs epochs)")
    if r.epochs < 1:
        fail("run.epochs", f"={r.epochs} must be >= 1")
    if r.keep_last < 1:
        fail("run.keep_last", f"={r.keep_last} must be >= 1")
    for field in ("eval_every", "save_every", "halt_failed_steps"):
        if getattr(r, field) < 0:
            fail(f"run.{field}", "must be >= 0 (0 disables)")
    if not 0 < r.halt_failed_share <= 1:
        fail("run.halt_failed_share", f"={r.halt_failed_share} must be in (0, 1] (1: every group of a step failed)")
    if cfg.model.remat not in REMAT_CHOICES:
        fail("model.remat", f"={cfg.model.remat!r} must be one of {list(REMAT_CHOICES)} (false: keep every "
             "activation; true/'full': keep layer inputs; 'save_projections': keep matmul outputs)")
    if cfg.model.dtype not in COMPUTE_DTYPES:
        fail("model.dtype", f"={cfg.model.dtype!r} must be 'float32' or 'bfloat16'")
    if cfg.model.attn_implementation not in ATTN_IMPLEMENTATIONS:
        fail("model.attn_implementation", f"={cfg.model.attn_implementation!r} must be one of "
             f"{list(ATTN_IMPLEMENTATIONS)} (null: JAX picks; 'cudnn' needs an NVIDIA GPU)")
    if cfg.model.path is None and cfg.model.tiny not in TINY_SIZES:
        fail("model.tiny", f"={cfg.model.tiny!r} must be one of {sorted(TINY_SIZES)} (or set model.path)")
    for name, section in (("sft", cfg.sft), ("dpo", cfg.dpo), ("rm", cfg.rm)):
        if not section.learning_rate > 0:
            fail(f"{name}.learning_rate", "must be > 0")
        if section.epochs < 1 or section.batch_size < 1:
            fail(f"{name}.epochs / {name}.batch_size", "must be >= 1")
        if section.steps is not None and section.steps < 1:
            fail(f"{name}.steps", "must be >= 1 or null")
    if not cfg.dpo.beta > 0:
        fail("dpo.beta", f"={cfg.dpo.beta} must be > 0 (0.1 is usual)")
    if not (cfg.rm.mse_weight >= 0 and math.isfinite(cfg.rm.mse_weight)):
        fail("rm.mse_weight", f"={cfg.rm.mse_weight} must be a finite number >= 0 (lambda of eq. 7; 0 = BT only)")
    if not 0 <= cfg.rm.eval_fraction < 1:
        fail("rm.eval_fraction", f"={cfg.rm.eval_fraction} must be in [0, 1) (the held-out share)")
    if cfg.rm.eval_every < 0:
        fail("rm.eval_every", "must be >= 0 (0: evaluate at the end only)")
    mesh = {f: getattr(r, f) for f in ("mesh_data", "mesh_fsdp", "mesh_tensor")}
    for field, size in mesh.items():
        if size == 0 or size < -1:
            fail(f"run.{field}", f"={size} must be >= 1, or -1 for all remaining devices")
    if list(mesh.values()).count(-1) > 1:
        fail("run.mesh_data / run.mesh_fsdp / run.mesh_tensor", f"={tuple(mesh.values())}: at most one may be -1 "
             "(the remaining devices); give the others sizes")
    if r.mesh_data > 0 and r.mesh_fsdp > 0 and o.minibatch_size % (r.mesh_data * r.mesh_fsdp):
        fail("optim.minibatch_size", f"={o.minibatch_size} must be divisible by run.mesh_data * run.mesh_fsdp = "
             f"{r.mesh_data * r.mesh_fsdp} (each device holds an equal share of an update's rows); pick a "
             f"multiple of {r.mesh_data * r.mesh_fsdp} or smaller data/fsdp sizes")
    if cfg.algo.teacher == "original" and cfg.model.teacher_path is None:
        fail("model.teacher_path", "is not set: algo.teacher='original' (CASPO-w.-OMC) scores the constitution-"
             "conditioned prompt with the original pre-SFT model; set model.teacher_path to its HF directory "
             "(or use algo.teacher=rollout_policy / frozen_sft)")
    if cfg.model.teacher_path is not None and cfg.algo.teacher != "original":
        fail("model.teacher_path", f"is set but algo.teacher={cfg.algo.teacher!r} does not use it; set "
             "algo.teacher=original or drop model.teacher_path")
    if "kind" not in cfg.reward:
        fail("reward.kind", "is missing: use 'reward_model' (the paper's RM, from `caspo rm`), 'judge', "
             "'function' or 'demo'")
    if cfg.reward["kind"] == "reward_model" and not isinstance(cfg.reward.get("path"), str):
        fail("reward.path", "is missing: reward.kind='reward_model' loads the export of `caspo rm --out DIR` "
             "(DIR/export); set it with --set reward.path=DIR/export")
    for stage in STAGES:  # StepConfig's own checks, on exactly what each stage will train with
        try:
            step_config(cfg, stage)
        except ValueError as exc:
            raise ConfigError(f"{source}: {stage} step: {exc}") from None


ROLLOUT_WORKERS = ("local", "subprocess", "ray")

# model.attn_implementation: "auto" (common.attention) or jax.nn.dot_product_attention's values.
ATTN_IMPLEMENTATIONS = ("auto", None, "xla", "cudnn")

# Tiny model sizes for model.path = None (text hidden, layers, heads, kv heads, ViT depth/hidden).
TINY_SIZES = {
    "demo": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_depth=2, vision_hidden=32),
    "test": dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_depth=1, vision_hidden=16),
}
