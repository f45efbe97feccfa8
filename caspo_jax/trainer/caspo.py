"""`caspo train`: Algorithm 1 of the paper, end to end.

Per step: P prompts -> G rollouts each (JAX sampler) -> outcome rewards (a failed
reward masks its whole group) -> old, reference and teacher (constitution-conditioned)
log-probs -> advantages (variant outcome / token / hybrid, lambda) -> `ppo_epochs`
passes over shuffled mini-batches (`caspo_jax.train.make_train_step`) -> weights synced
to the rollout engine -> metrics, periodic evaluation, checkpoints.

Determinism: rollout seeds, mini-batch order and the data order are functions of
(run.seed, step), and the data iterator's position is checkpointed, so `--resume`
continues exactly where the run stopped (metrics equal an uninterrupted run on CPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from caspo_jax.rollout import JaxSampler, SamplingParams
from caspo_jax.trainer.checkpoint import RunCheckpointer
from caspo_jax.trainer.config import ConfigError, TrainConfig, config_to_dict
from caspo_jax.trainer.data import prepare_data, prompt_dataset
from caspo_jax.trainer.evaluate import batch_prompts, decode_responses, evaluate_policy
from caspo_jax.trainer.exchange import _step_config
from caspo_jax.trainer.metrics import MetricsWriter, PhaseTimer, count_params, mfu
from caspo_jax.trainer.runtime import RunDir, StopSignals, export_policy
from caspo_jax.trainer.setup import Policy, build_policy

__all__ = ["clip_at_vision_tokens", "make_reward", "run_caspo"]


def make_reward(spec: dict):
    """The outcome reward of the config: {"kind": "demo"} or any `build_reward` spec."""
    if spec.get("kind") == "demo":
        from caspo_jax.demo.task import demo_reward
        from caspo_jax.rewards import FunctionReward

        return FunctionReward(demo_reward, name="demo")
    from caspo_jax.rewards import build_reward

    return build_reward(spec)


def clip_at_vision_tokens(model, tokens_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
    """The response mask cut before the first vision placeholder a sampler emitted.

    An untrained policy may sample <|image_pad|> / <|video_pad|> / <|vision_start|>; such
    a response would read as an image to M-RoPE and the embedding scatter, so it is
    scored only up to that token (as if truncated there).
    """
    cfg = model.config
    special = np.isin(tokens_BxT, [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id])
    mask = np.asarray(mask_BxT).astype(bool)
    return mask & (np.cumsum(special & mask, axis=1) == 0)


def _mean_dicts(rows: list[dict]) -> dict:
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]} if rows else {}


def run_caspo(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, policy: Policy | None = None,
              progress: bool = True, export: bool = True, eval_modes=("standard",)) -> Policy:
    """Trains to run.steps (or run.epochs over the prompts), or until SIGTERM/SIGINT."""
    from caspo_jax.train import (build_train_batch, compute_logprobs, init_state, make_train_step,
                                 rollout_advantages, take_rows, teacher_params)

    a, o = cfg.algo, cfg.optim
    if a.teacher == "original":
        raise ConfigError("algo.teacher='original' (CASPO-w.-OMC) needs the pre-SFT checkpoint, which caspo train "
                          "does not load yet; use 'rollout_policy' or 'frozen_sft'")
    if cfg.rollout.engine != "jax":
        raise ConfigError("rollout.engine='vllm' is not wired into caspo train yet; use rollout.engine=jax")
    run = RunDir(out_dir, cfg, "train", echo=progress)
    files = prepare_data(cfg, run.path)
    policy = policy or build_policy(cfg.model, cfg.data)
    model, tokenizer = policy.model, policy.processor.tokenizer
    dataset, _ = prompt_dataset(cfg, files, policy.processor, split="train", num_epochs=None)
    total = cfg.run.steps or cfg.run.epochs * max(len(dataset) // a.prompts_per_step, 1)
    reward = make_reward(cfg.reward)
    step_cfg = _step_config(cfg, a.learning_rate)
    ref_params = policy.params  # the frozen reference (and the SFT teacher): the initial policy
    state = init_state(policy.params, step_cfg)
    iterator = dataset.iterator()
    checkpointer = RunCheckpointer(run.checkpoints, cfg.run.keep_last)
    start = 0
    if not resume:
        checkpointer.refuse_overwrite("train")
    if resume:
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            start, state, extras = restored
            iterator.set_state(extras["data"])
            print(f"caspo train: resumed from step {start}", flush=True)
    train_step = make_train_step(model, step_cfg, a)
    sampler = JaxSampler(model, state.params, eos_token_ids=policy.eos_ids)
    eval_set = None
    if cfg.run.eval_every and files.eval is not None:
        eval_set, _ = prompt_dataset(cfg, files, policy.processor, split="eval", num_epochs=1, shuffle=False,
                                     batch_size=min(32, cfg.data.demo_eval))
    writer = MetricsWriter(run.path, resume_step=start if resume else None, total_steps=total, progress=progress,
                           initial_step=start, desc="caspo")
    n_params = count_params(state.params)
    P, G = a.prompts_per_step, a.group_size
    step = start
    with StopSignals() as stop:
        while step < total and stop.requested is None:
            timer = PhaseTimer()
            with timer("data"):
                batch = next(iterator)
            with timer("rollout"):
                seeds = (cfg.run.seed * 1_000_003 + step * P + np.arange(P)) % (2**31 - 1)
                sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                          top_k=cfg.rollout.top_k, max_new_tokens=cfg.data.max_response_len)
                rollouts = sampler.generate(batch_prompts(batch, seeds=seeds), n=G, sampling=sampling)
                mask = clip_at_vision_tokens(model, rollouts.tokens, rollouts.mask)
                tokens = np.where(mask, rollouts.tokens, 0)
            with timer("reward"):
                texts = decode_responses(tokenizer, tokens, mask)
                scores = reward.score([batch.records[i] for i in rollouts.prompt_index], texts)
                from caspo_jax.rewards import group_ok

                ok_P = group_ok(scores.ok, G)
                rewards_PxG = np.where(ok_P[:, None], np.nan_to_num(scores.rewards).reshape(P, G), 0.0)
            with timer("logprobs"):
                tb = build_train_batch(model, batch.input_ids, batch.attention_mask, tokens, mask.astype(np.float32),
                                       rollouts.prompt_index, teacher_prompt_ids_PxL=batch.teacher_input_ids,
                                       teacher_prompt_mask_PxL=batch.teacher_attention_mask,
                                       pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                       length_multiple=16)
                old_logp, entropy = compute_logprobs(model, state.params, tb)
                ref_logp = compute_logprobs(model, ref_params, tb)[0] if a.beta > 0 else None
                teacher_logp = None
                if a.variant != "outcome":
                    source = teacher_params(a.teacher, rollout_policy=state.params, frozen_sft=ref_params)
                    teacher_logp = compute_logprobs(model, source, tb, layout="teacher")[0]
                mask_f = np.asarray(tb.response_mask) * np.repeat(ok_P, G)[:, None]
                adv, adv_metrics = rollout_advantages(a, rewards_PxG, teacher_logp, old_logp, tb.response_mask)
                jax.block_until_ready((old_logp, ref_logp, teacher_logp, adv))  # time the phase, not the dispatch
                tb = tb.with_signals(old_logp=old_logp, ref_logp=ref_logp, advantages=adv)
                tb = dataclasses.replace(tb, response_mask=mask_f.astype(np.float32))  # failed groups: no loss
            with timer("update"):
                step_metrics = []
                rng = np.random.default_rng([cfg.run.seed, step])
                for _ in range(o.ppo_epochs):
                    order = rng.permutation(P * G)
                    for lo in range(0, P * G, o.minibatch_size):
                        state, m = train_step(state, take_rows(tb, order[lo:lo + o.minibatch_size]))
                        step_metrics.append(m)
                step_metrics = _mean_dicts(jax.device_get(step_metrics))
            with timer("sync"):
                sampler.sync_weights(state.params)
                jax.block_until_ready(sampler.params)
            step += 1
            lengths = mask.sum(axis=1)
            valid = np.asarray(tb.response_mask) > 0
            response_tokens = float(lengths.sum())
            seq_tokens = float(np.asarray(tb.student.attention_mask).sum())
            seconds = sum(timer.seconds.values())
            metrics = {
                "reward/mean": float(scores.rewards[scores.ok].mean()) if scores.ok.any() else float("nan"),
                "reward/std": float(scores.rewards[scores.ok].std()) if scores.ok.any() else float("nan"),
                "reward/failed_groups": float((~ok_P).sum()),
                **{k: float(v) for k, v in jax.device_get(adv_metrics).items()},
                **step_metrics,
                "rollout_entropy": float(np.asarray(entropy)[valid].mean()) if valid.any() else 0.0,
                "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
                "response_length/truncated_frac": float(np.mean(rollouts.finish_reason == "length")),
                "lr": step_cfg.learning_rate,
                **timer.as_metrics(),
                "tokens_per_s": (seq_tokens * o.ppo_epochs + response_tokens) / max(seconds, 1e-9),
                "mfu": mfu(n_params, seq_tokens * o.ppo_epochs, seq_tokens * (3 if a.variant != "outcome" else 2),
                           seconds),
            }
            if eval_set is not None and (step % cfg.run.eval_every == 0 or step == total):
                policy_now = Policy(model, state.params, policy.processor, policy.eos_ids, policy.pad_id)
                for mode in eval_modes:
                    result = evaluate_policy(policy_now, eval_set, reward, mode=mode,
                                             max_new_tokens=cfg.data.max_response_len,
                                             temperature=cfg.rollout.eval_temperature, sampler=sampler)
                    metrics.update({f"eval_{mode}/{k}": v for k, v in result.items() if k != "n"})
            writer.write(step, metrics)
            if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == total or stop.requested:
                checkpointer.save(step, state, {"stage": "caspo", "step": step, "data": iterator.get_state(),
                                                "config": config_to_dict(cfg)})
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    final = Policy(model, state.params, policy.processor, policy.eos_ids, policy.pad_id)
    if stop.requested:
        print(f"caspo train: stopped by {stop.requested} at step {step}; continue with --resume", flush=True)
    elif export:
        export_policy(model, state.params, policy.processor, run.export)
    return final
