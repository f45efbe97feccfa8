"""The device step: the sharded, jitted CASPO train step and what it reads (batch, log-probs,
optimizer, state); the host loops around it live in ``caspo_jax.loop``.

Per rollout batch the trainer calls (``step_cfg = caspo_jax.loop.config.step_config(run_cfg, "caspo")``)::

    batch = build_train_batch(model, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index,
                              teacher_prompt_ids=..., teacher_prompt_mask=..., pixel_values=..., image_grid_thw=...)
    batch = shard_batch(batch, mesh)                                   # optional
    old_logp, _ = step_logprobs(model, step_cfg, state.params, batch)   # the step's dtype and temperature
    ref_logp, _ = step_logprobs(model, step_cfg, ref_params, batch)
    teacher_logp, _ = step_logprobs(model, step_cfg, teacher_params(caspo.teacher, rollout_policy=state.params,
                                    frozen_sft=ref_params), batch, layout="teacher")
    adv, adv_metrics = rollout_advantages(caspo, rewards_PxG, teacher_logp, old_logp, batch.response_mask,
                                          group_ok_P)           # failed reward groups: out of every statistic
    batch = batch.with_signals(old_logp=old_logp, ref_logp=ref_logp, advantages=adv)
    # (and response_mask 0 on the failed groups' rows: no loss either)
    step = make_train_step(model, step_cfg, caspo, mesh=mesh)
    for rows in minibatches: state, metrics = step(state, take_rows(batch, rows))
"""

from caspo_jax.step.batch import SequenceLayout, TrainBatch, build_train_batch, take_rows
from caspo_jax.step.logprobs import (
    TEACHER_SOURCES,
    compute_logprobs,
    layout_logprobs,
    response_logprobs_from_hidden,
    step_logprobs,
    teacher_params,
)
from caspo_jax.step.optimizer import StepConfig, learning_rate_schedule, make_optimizer
from caspo_jax.step.rollout_advantages import rollout_advantages
from caspo_jax.step.state import (
    TrainState,
    batch_shardings,
    init_state,
    shard_batch,
    shard_state,
    state_shardings,
)
from caspo_jax.step.correction import RolloutCorrection, correction_weights, truncated_is_weights
from caspo_jax.step.step import apply_gradients, loss_and_grads, make_train_step

__all__ = [
    "TEACHER_SOURCES", "SequenceLayout", "StepConfig", "TrainBatch", "TrainState", "apply_gradients",
    "batch_shardings",
    "build_train_batch", "compute_logprobs", "init_state", "layout_logprobs", "learning_rate_schedule",
    "loss_and_grads", "make_optimizer", "make_train_step", "response_logprobs_from_hidden", "rollout_advantages",
    "shard_batch", "shard_state", "state_shardings", "step_logprobs", "take_rows", "teacher_params",
    "truncated_is_weights",
    "RolloutCorrection",
    "correction_weights",
]
