"""The CASPO train step: forward with gradient, ``caspo_loss``, AdamW, under one ``jax.jit``.

Let B be mini-batch rows, T response tokens, M micro-batches. The vision tower runs once
per mini-batch (its features are shared by all rows of a prompt); the text decoder and
loss run per micro-batch in a ``lax.scan`` that sums parameter and image-feature
gradients; the image-feature gradient is then pulled back through the vision tower with
its VJP. Each micro-batch's loss is weighted by its share of the mini-batch's tokens
(token-mean) or sequences (seq-mean modes), so M micro-batches give the same loss and
gradient as one (tested). Metrics other than ``loss`` are token-weighted averages of the
micro-batches' values (exact for token-level means; for pg_loss/kl under seq-mean ``agg``
an approximation).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from caspo_jax.algo import CaspoConfig, caspo_loss
from caspo_jax.sharding import LogicalRules
from caspo_jax.step.batch import TrainBatch
from caspo_jax.step.correction import RolloutCorrection, correction_weights
from caspo_jax.step.logprobs import cast_floats, layout_logprobs
from caspo_jax.step.optimizer import StepConfig, learning_rate_schedule, make_optimizer
from caspo_jax.step.state import TrainState, state_shardings

F32 = jnp.float32


def _micro(x, M, axis=0):
    """[..., B, ...] -> [M, ..., B/M, ...]: micro-batch m holds rows m, m+M, m+2M, ..."""
    if x is None:
        return None
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // M, M) + shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0)


def _split_micro(batch: TrainBatch, M: int) -> TrainBatch:
    s = batch.student
    # image_slot indexes the whole mini-batch's encoding, so it splits like any row field
    student = type(s)(_micro(s.input_ids, M), _micro(s.attention_mask, M), _micro(s.position_ids, M, 1),
                      _micro(s.image_slot, M), s.prompt_len)
    return TrainBatch(student=student, teacher=None, response_ids=_micro(batch.response_ids, M),
                      response_mask=_micro(batch.response_mask, M), old_logp=_micro(batch.old_logp, M),
                      ref_logp=_micro(batch.ref_logp, M), advantages=_micro(batch.advantages, M),
                      rollout_logp=_micro(batch.rollout_logp, M), image_grid_thw=batch.image_grid_thw)


def _agg_weight(mask_BxT, agg: str):
    """What a micro-batch's mean is normalised by under ``agg``: tokens or sequences."""
    valid = (mask_BxT > 0).astype(F32)
    if agg == "token-mean":
        return jnp.sum(valid)
    return jnp.sum(jnp.any(valid > 0, axis=-1).astype(F32))


def _micro_loss(model, cfg: StepConfig, caspo: CaspoConfig, correction: RolloutCorrection, params_c, embeds,
                mb: TrainBatch):
    """caspo_loss on one micro-batch; returns (loss, metrics) with token sums for metrics."""
    logp, entropy = layout_logprobs(model, params_c, mb.student, mb.response_ids, embeds, cfg.logprob_chunk,
                                    float(cfg.temperature))
    mask = mb.response_mask
    valid = mask > 0
    adv = mb.advantages
    metrics = {}
    if correction.active:
        if mb.rollout_logp is None:
            raise ValueError(f"rollout correction {correction.mode!r} is set but the batch has no rollout_logp; pass "
                             "the rollout engine's log-probs with batch.with_signals(rollout_logp=...)")
        weight, corrected = correction_weights(mb.old_logp, mb.rollout_logp, mask, correction)
        adv = adv * weight
        metrics["is_weight_mean"] = jnp.sum(weight)
        metrics["is_corrected_frac"] = jnp.sum(corrected.astype(F32))
    loss, parts = caspo_loss(logp, mb.old_logp, mb.ref_logp, adv, mask, **caspo.loss_kwargs())
    n_tokens = jnp.sum(valid.astype(F32))
    metrics.update({k: v * n_tokens for k, v in parts.items()})  # token-weighted, divided later
    metrics["entropy"] = jnp.sum(jnp.where(valid, entropy, 0.0))
    return loss, metrics


def step_correction(cfg: StepConfig, correction: RolloutCorrection | None) -> RolloutCorrection:
    """The correction a step applies: ``correction``, else TIS at ``cfg.tis_cap`` when that is
    set, else none. Both set must agree (TIS at the same cap)."""
    legacy = RolloutCorrection("tis", cfg.tis_cap) if cfg.tis_cap is not None else None
    if correction is None:
        return legacy or RolloutCorrection()
    if legacy is not None and correction != legacy:
        raise ValueError(f"StepConfig.tis_cap={cfg.tis_cap} conflicts with correction={correction}; set one of them")
    return correction


def loss_and_grads(model, cfg: StepConfig, caspo: CaspoConfig, params: dict, batch: TrainBatch,
                   correction: RolloutCorrection | None = None):
    """(loss, grads, metrics) of one mini-batch; traceable. grads are float32 like ``params``.
    ``correction``: the rollout correction (`step_correction`: default TIS at cfg.tis_cap, or none)."""
    correction = step_correction(cfg, correction)
    for name in ("old_logp", "advantages"):
        if getattr(batch, name) is None:
            raise ValueError(f"train_step: batch.{name} is missing; set it with batch.with_signals({name}=...)")
    if caspo.beta != 0 and batch.ref_logp is None:
        raise ValueError("train_step: CaspoConfig.beta > 0 needs batch.ref_logp (or set beta=0)")
    dtype = None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype)
    M = cfg.micro_batches
    if batch.num_rows % M:
        raise ValueError(f"train_step: {batch.num_rows} rows do not split into StepConfig.micro_batches={M}")

    # Image features once per mini-batch, with a VJP back into the vision parameters.
    pullback = None
    if batch.image_embeds is not None:
        embeds = jax.lax.stop_gradient(batch.image_embeds)
    elif batch.image_grid_thw:
        def encode(p):
            return model.encode_images(cast_floats(p, dtype), batch.pixel_values, batch.image_grid_thw)
        if cfg.freeze_vision:
            embeds = jax.lax.stop_gradient(encode(params))
        else:
            embeds, pullback = jax.vjp(encode, params)
    else:
        embeds = None

    agg = caspo.agg
    total_weight = jnp.maximum(_agg_weight(batch.response_mask, agg), 1.0)
    total_tokens = jnp.maximum(jnp.sum((batch.response_mask > 0).astype(F32)), 1.0)

    def weighted_loss(p, e, mb):
        loss, metrics = _micro_loss(model, cfg, caspo, correction, cast_floats(p, dtype), e, mb)
        w = _agg_weight(mb.response_mask, agg) / total_weight
        return loss * w, metrics

    grad_fn = jax.value_and_grad(weighted_loss, argnums=(0, 1), has_aux=True)
    if M == 1:
        (loss, metrics), (g_params, g_embeds) = grad_fn(params, embeds, batch)
    else:
        micro = _split_micro(batch, M)

        def body(carry, mb):
            (loss, metrics), grads = grad_fn(params, embeds, mb)
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, embeds, first))
        zeros = (zeros[0][0], zeros[0][1], zeros[1])
        (loss, metrics, (g_params, g_embeds)), _ = jax.lax.scan(body, zeros, micro)
    if pullback is not None:
        (g_vision,) = pullback(g_embeds.astype(embeds.dtype))
        g_params = jax.tree.map(jnp.add, g_params, g_vision)
    metrics = {k: v / total_tokens for k, v in metrics.items()}
    metrics["loss"] = loss
    return loss, g_params, metrics


def apply_gradients(cfg: StepConfig, state: TrainState, grads) -> tuple[TrainState, dict]:
    """One AdamW update (``make_optimizer(cfg)``) of ``state``; traceable. Metrics:
    grad_norm, update_norm and the scheduled learning_rate of this step. Every trainer
    (CASPO, SFT, DPO, reward model) ends its step here."""
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    metrics = {"grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
               "learning_rate": learning_rate_schedule(cfg)(state.step)}
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics


def _train_step(model, cfg: StepConfig, caspo: CaspoConfig, correction, return_grads: bool, state: TrainState,
                batch: TrainBatch):
    loss, grads, metrics = loss_and_grads(model, cfg, caspo, state.params, batch, correction)
    new_state, update_metrics = apply_gradients(cfg, state, grads)
    metrics.update(update_metrics)
    valid = batch.response_mask > 0
    n = jnp.maximum(jnp.sum(valid.astype(F32)), 1.0)
    adv = jnp.where(valid, batch.advantages, 0.0)
    adv_mean = jnp.sum(adv) / n
    metrics["advantage_mean"] = adv_mean
    metrics["advantage_std"] = jnp.sqrt(jnp.sum(jnp.where(valid, (adv - adv_mean) ** 2, 0.0)) / n)
    metrics["advantage_abs_max"] = jnp.max(jnp.abs(adv))
    metrics["response_tokens"] = jnp.sum(valid.astype(F32))
    if return_grads:
        return new_state, metrics, grads
    return new_state, metrics


def make_train_step(model, cfg: StepConfig, caspo: CaspoConfig, *, mesh: Mesh | None = None,
                    rules: LogicalRules = LogicalRules(), donate: bool = False, return_grads: bool = False,
                    compiler_options: dict | None = None, correction: RolloutCorrection | None = None):
    """``train_step(state, minibatch) -> (state, metrics)``, jitted.

    With ``mesh`` the new state keeps the parameters' shardings (``state_shardings``);
    place the state and batch with ``shard_state`` / ``shard_batch``. ``donate`` reuses
    the old state's buffers. ``return_grads`` also returns the gradients (tests).
    The model's remat switch is set from ``cfg.remat``. ``correction``: the rollout
    correction (``caspo_jax.step.correction``; None: TIS at ``cfg.tis_cap`` when set, else none).
    """
    correction = step_correction(cfg, correction)
    if getattr(model, "remat", cfg.remat) != cfg.remat:
        model = dataclasses.replace(model, remat=cfg.remat)
    fn = functools.partial(_train_step, model, cfg, caspo, correction, return_grads)
    out_shardings = None
    if mesh is not None:
        shard = state_shardings(model, cfg, mesh, rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        out_shardings = (shard, replicated, shard.params) if return_grads else (shard, replicated)
    return jax.jit(fn, out_shardings=out_shardings, donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options)
