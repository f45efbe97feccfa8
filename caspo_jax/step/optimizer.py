"""StepConfig (the jitted train step's settings besides the CASPO maths) and the optax
optimiser it builds. A run builds it from its run config with
``caspo_jax.loop.config.step_config`` (the only place the two meet)."""

from __future__ import annotations

import dataclasses

import jax
import optax

from caspo_jax.models.common.layers import REMAT_CHOICES

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Optimiser and step shape. Hashable: it is a static argument of the jitted step.

    Built from a run config by ``step_config(cfg, stage)``: the AdamW knobs, micro_batches,
    freeze_vision, tis_cap and logprob_chunk from its ``optim`` section, compute_dtype and
    remat from ``model``, learning_rate and temperature from the stage.

    learning_rate: peak AdamW rate (the paper: 2e-6), reached linearly over warmup_steps,
        then constant. weight_decay, b1, b2, adam_eps: AdamW. max_grad_norm: global-norm
        clipping (None: off). micro_batches: gradient accumulation over this many
        micro-batches of each mini-batch (a ``lax.scan``; rows m, m+M, m+2M, ...).
    compute_dtype: "float32" or "bfloat16" (forward/backward in bfloat16 over float32
        master weights; log-softmax and the loss stay float32).
    freeze_vision: no update for ``params.vision`` (its features are a constant of the
        loss). Default False: trainable, the paper does not say.
    remat: rematerialise each decoder layer in the backward pass (the model's switch):
        False (store every residual), True / "full" (store each layer's input only),
        "save_projections" (store the weight matmuls' outputs, recompute attention and
        elementwise work: no [B, N, L, L] probabilities stored), "save_dots".
    tis_cap: truncated importance sampling for the trainer/inference mismatch: the
        per-token policy-gradient term is weighted by min(exp(old_logp - rollout_logp),
        tis_cap) (Yao et al. 2025); None: off.
    logprob_chunk: response positions per LM-head chunk.
    temperature: the logits are divided by it before the log-softmax (current log-probs,
        entropy): the rollout's sampling temperature, so the ratio pi_theta / pi_old, the
        KL and the token rewards are of the distribution the responses were drawn from.
        Every log-prob entering the loss comes from ``compute_logprobs`` with this
        config's ``compute_dtype`` and ``temperature`` (``step_logprobs``). 1.0: the raw
        distribution (SFT, DPO, greedy rollouts).
    """

    learning_rate: float = 2e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    micro_batches: int = 1
    compute_dtype: str = "float32"
    freeze_vision: bool = False
    remat: bool | str = False
    tis_cap: float | None = None
    logprob_chunk: int = 128
    temperature: float = 1.0

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"StepConfig.{field}={getattr(self, field)!r} is invalid: {why}")

        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0 (paper: 2e-6)")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            bad("warmup_steps", "must be an int >= 0")
        if not (isinstance(self.micro_batches, int) and self.micro_batches >= 1):
            bad("micro_batches", "must be an int >= 1 (1: no accumulation)")
        if self.compute_dtype not in COMPUTE_DTYPES:
            bad("compute_dtype", f"use one of {COMPUTE_DTYPES}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad("max_grad_norm", "must be > 0, or None to disable clipping")
        if self.tis_cap is not None and not self.tis_cap > 0:
            bad("tis_cap", "must be > 0 (verl uses 2.0), or None to disable")
        if self.remat not in REMAT_CHOICES:
            bad("remat", f"use one of {list(REMAT_CHOICES)}")
        if not (isinstance(self.logprob_chunk, int) and self.logprob_chunk >= 1):
            bad("logprob_chunk", "must be an int >= 1")
        t = self.temperature
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and t > 0):
            bad("temperature", "must be a number > 0 (the rollout's sampling temperature; 1.0 for greedy "
                "rollouts, see caspo_jax.rollout.logit_temperature)")

    def replace(self, **changes) -> "StepConfig":
        return dataclasses.replace(self, **changes)


def learning_rate_schedule(cfg: StepConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then constant."""
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.warmup_constant_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)


def vision_labels(params):
    """The tree of ``params`` (typed weights) with "frozen" at every leaf under ``params.vision``
    and "train" elsewhere."""
    return jax.tree.map(lambda _: "train", params).replace(vision=jax.tree.map(lambda _: "frozen", params.vision))


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule; vision leaves zeroed when frozen."""
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay))
    opt = optax.chain(*parts)
    if cfg.freeze_vision:
        opt = optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, vision_labels)
    return opt

