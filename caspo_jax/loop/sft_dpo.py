"""`caspo sft` and `caspo dpo`: supervised and preference training on fixed exchanges
(an exchange: one prompt with its response, or with a chosen and a rejected one).

SFT (the paper's stage before CASPO): mean negative log-likelihood over response tokens
only (prompt, image and padding tokens carry no loss), optionally with the category's
constitution in the prompt. DPO (the static-alignment baseline): Rafailov et al.'s loss
-log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))
with sequence log-probs summed over response tokens and a frozen reference (the initial
policy), whose log-probs are computed once per example before training (`_reference_logprobs`:
only the examples the run's steps use, in training-sized batches), so the reference
parameters leave the devices before the first update and later epochs reuse them.

Both run on the skeleton every trainer shares (`caspo_jax.loop.skeleton`): one typed
config, orbax checkpoints with exact resume (the batch order is a function of (seed,
step)), SIGTERM saves, JSONL + TensorBoard metrics, and an HF export at the end.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from caspo_jax.algo import dpo_loss, sft_loss
from caspo_jax.loop.config import ConfigError, TrainConfig, step_config
from caspo_jax.loop.data import encode_exchanges, exchange_batch, prepare_data
from caspo_jax.loop.metrics import PhaseTimer, count_params, mfu
from caspo_jax.loop.placement import make_placement
from caspo_jax.loop.runtime import export_final
from caspo_jax.loop.setup import Policy, build_policy
from caspo_jax.loop.skeleton import StepOutcome, TrainingRun
from caspo_jax.step import StepConfig, apply_gradients, init_state, step_logprobs
from caspo_jax.step.logprobs import cast_floats, encode_batch_images, layout_logprobs

__all__ = ["run_dpo", "run_sft", "run_supervised_stage"]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _supervised_step(model, step_cfg, kind: str, beta: float, state, batch, ref_logp):
    def loss_fn(params):
        params = cast_floats(params, step_cfg.compute_dtype)  # the reference's precision (`_reference_logprobs`)
        embeds = encode_batch_images(model, params, batch)
        logp, entropy = layout_logprobs(model, params, batch.student, batch.response_ids, embeds,
                                        step_cfg.logprob_chunk, step_cfg.temperature)
        mask = batch.response_mask
        logp = jnp.where(mask > 0, logp, 0.0)
        if kind == "sft":
            loss, metrics = sft_loss(logp, mask)
        else:
            loss, metrics = dpo_loss(logp, ref_logp, mask, beta)
        metrics["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, update_metrics = apply_gradients(step_cfg, state, grads)
    return state, {**metrics, **update_metrics}


def _reference_logprobs(model, ref_params, place, examples, used: np.ndarray, batch_size: int, pad_id: int,
                        prompt_len: int, response_len: int, progress: bool, *, step_cfg=None) -> np.ndarray:
    """[n_examples, 2, response_len] float32: the reference's log-probs of each used example's
    chosen and rejected response (zeros for unused ones), from batches of `batch_size`
    examples -- the training batch's shape, so the mesh divides the rows and the compiled
    function is the training one's (the last batch is filled up by repeating an example).
    At `step_cfg`'s compute dtype and temperature (`step_logprobs`; None: float32, 1), like
    the policy's log-probs they are compared with: the first step's margins are exactly 0."""
    step_cfg = step_cfg or StepConfig()

    out = np.zeros((len(examples), 2, response_len), np.float32)
    starts = range(0, len(used), batch_size)
    if progress:
        starts = tqdm(starts, desc="dpo reference log-probs", unit="batch", leave=False)
    for start in starts:
        idx = used[start:start + batch_size]
        chunk = np.concatenate([idx, np.repeat(idx[:1], batch_size - len(idx))])
        batch = exchange_batch(model, [examples[i] for i in chunk], pad_id, prompt_len, response_len)
        logp = np.asarray(place.to_host(step_logprobs(model, step_cfg, ref_params, place.batch(batch))[0]))
        out[idx, 0] = logp[:len(idx)]  # rows are response-major: all chosen, then all rejected
        out[idx, 1] = logp[batch_size:batch_size + len(idx)]
    return out


def _batch_rows(n_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of `step`: epoch-wise permutations of (seed, epoch), a function of step only."""
    per_epoch = max(n_examples // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[position * batch_size:(position + 1) * batch_size]


def run_sft(cfg: TrainConfig, out_dir: str | Path, **kwargs) -> Policy:
    """`caspo sft`: `run_supervised_stage` with kind="sft"."""
    return run_supervised_stage(cfg, out_dir, "sft", **kwargs)


def run_dpo(cfg: TrainConfig, out_dir: str | Path, **kwargs) -> Policy:
    """`caspo dpo`: `run_supervised_stage` with kind="dpo"."""
    return run_supervised_stage(cfg, out_dir, "dpo", **kwargs)


def run_supervised_stage(cfg: TrainConfig, out_dir: str | Path, kind: str, *, resume: bool = False,
                         policy: Policy | None = None, progress: bool = True, export: bool = True) -> Policy:
    """Runs SFT (kind="sft") or DPO (kind="dpo") to completion (or to a stop signal) on the
    run skeleton (`caspo_jax.loop.skeleton.TrainingRun`).

    Returns the policy with the trained parameters. The final policy is exported to
    out_dir/export as an HF checkpoint when `export`. On the mesh of run.mesh_*; with
    several processes every process encodes the (small) example set and feeds the rows
    its devices hold; process 0 alone writes metrics, the config and the export.
    """
    if kind not in ("sft", "dpo"):
        raise ValueError(f"kind={kind!r}: use 'sft' or 'dpo'")
    stage = cfg.sft if kind == "sft" else cfg.dpo
    run = TrainingRun(cfg, out_dir, kind, resume=resume, progress=progress)
    files = prepare_data(cfg, run.dir.data)
    source = files.sft if kind == "sft" else files.pairs
    if source is None:
        field = "sft" if kind == "sft" else "pairs"
        raise ConfigError(f"data.{field} is not set: caspo {kind} trains on a JSONL file of "
                          f"{'SFT examples' if kind == 'sft' else 'preference pairs'}; --set data.{field}=PATH")
    policy = policy or build_policy(cfg.model, cfg.data)
    model = policy.model
    examples = encode_exchanges(source, policy.processor, constitutions_path=files.constitutions,
                                with_constitution=kind == "sft" and cfg.sft.with_constitution, pairs=kind == "dpo",
                                max_prompt_len=cfg.data.max_prompt_len, max_response_len=cfg.data.max_response_len,
                                max_bad_fraction=cfg.data.max_bad_fraction)
    batch_size = min(stage.batch_size, len(examples))
    total = stage.steps or stage.epochs * max(len(examples) // batch_size, 1)
    prompt_len = -(-max(len(e.prompt_ids) for e in examples) // 16) * 16
    response_len = -(-max(len(r) for e in examples for r in e.responses) // 8) * 8
    step_cfg = step_config(cfg, kind)
    place = make_placement(cfg, model, step_cfg, rows=batch_size * (2 if kind == "dpo" else 1),
                           rows_field=f"{kind}.batch_size" + (" * 2 (chosen + rejected)" if kind == "dpo" else ""),
                           sampler_devices=0)  # no sampler in this stage: every device trains
    start, state, _ = run.restore(place.state(init_state(policy.params, step_cfg)))
    n_params = count_params(state.params)
    reference = None
    if kind == "dpo":
        used = np.unique(np.concatenate([_batch_rows(len(examples), batch_size, cfg.data.seed, s)
                                         for s in range(start, total)] or [np.zeros(0, np.int64)]))
        reference = _reference_logprobs(model, place.params(policy.params), place, examples, used, batch_size,
                                        policy.pad_id, prompt_len, response_len, progress and run.primary,
                                        step_cfg=step_cfg)

    def step_fn(state, step: int) -> StepOutcome:
        timer = PhaseTimer()
        rows = _batch_rows(len(examples), batch_size, cfg.data.seed, step)
        with timer("data"):
            batch = exchange_batch(model, [examples[i] for i in rows], policy.pad_id, prompt_len, response_len)
            if reference is not None:  # rows: every chosen response, then every rejected one
                batch = batch.with_signals(ref_logp=np.concatenate([reference[rows, 0], reference[rows, 1]]))
            placed = place.batch(batch)
        with timer("update"):
            state, metrics = _supervised_step(model, step_cfg, kind, float(cfg.dpo.beta), state, placed,
                                              placed.ref_logp)
            metrics = jax.device_get(metrics)
        seq_tokens = float(np.asarray(batch.student.attention_mask).sum())
        seconds = sum(timer.seconds.values())
        return StepOutcome(state, {**metrics, **timer.as_metrics(),
                                   "tokens_per_s": seq_tokens / max(seconds, 1e-9),
                                   "mfu": mfu(n_params, seq_tokens, 0.0, seconds)})  # the reference ran before

    end = run.loop(state, start, total, step_fn)
    policy = dataclasses.replace(policy, params=end.state.params)
    if run.finish(end) and export:
        export_final(place, model, end.state.params, policy.processor, run.dir.export)
    return policy
