"""Training the reward model (`caspo rm`): the paper's eq. 7, Bradley-Terry + lambda * MSE.

    L = -E_BT[log sigmoid(r(x, y_w) - r(x, y_l))] + lambda * E_MSE[(r(x, y) - s(x, y))^2]

Both expectations are means over their own items in the batch (a batch with no item of
one kind has that term 0). s is the RSE total (R + S + E, 0..6) divided by 6: the [0, 1]
scale of `rse_to_reward`, so the trained RM is a drop-in for the judge's reward.

One batch stream mixes both kinds. A batch has K slots and B = 2K rows: slot k owns rows
k and K + k. A pair fills a slot (row k chosen, row K + k rejected, same prompt); two MSE
records share one (one per row). Per row and per slot masks select the terms, so every
batch has one shape. Slot order is a permutation of (seed, epoch): batch `step` is a
function of step alone, and resume is exact.

Held-out split: `eval_fraction` of the pairs and of the MSE records (a seeded
permutation) are never trained on; pairwise accuracy (fraction of pairs with
r(y_w) > r(y_l)) and MSE on them are logged as eval/accuracy and eval/mse.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from caspo_jax.algo import rm_loss
from caspo_jax.rewards.reward_model import (RewardHead, RMExample, RewardModel, init_head, rm_rows, sequence_rewards,
                                            with_head)
from caspo_jax.step.optimizer import StepConfig

__all__ = ["RMBatch", "RMTrainConfig", "load_scored_responses", "make_rm_step", "train_reward_model"]

MAX_SCORE = 6.0


# --------------------------------------------------------------------------- data


def _parse_scored(obj: Any, where: str, root: Path, check_images: bool):
    from caspo_jax.curate.selection import ScoredResponse
    from caspo_jax.data.formats import _optional_category
    from caspo_jax.data.records import RecordError, parse_id, parse_images, required_text

    record_id = parse_id(obj, where)
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= MAX_SCORE:
        raise RecordError(f"{where}: field 'score' is {score!r}; it must be the R+S+E total, a number in 0..6")
    known = ("id", "images", "query", "response", "score", "category")
    return ScoredResponse(
        id=record_id,
        images=parse_images(obj, where, root, check_images),
        query=required_text(obj, "query", where, "the user's request"),
        response=required_text(obj, "response", where, "the scored response"),
        score=score,
        category=_optional_category(obj, where),
        meta={k: v for k, v in obj.items() if k not in known},
    )


def load_scored_responses(jsonl_path: str | Path, root: str | Path | None = None, *, check_images: bool = True):
    """`ScoredResponse` lines (`caspo curate select`'s mse.jsonl), validated like every format."""
    from caspo_jax.data.records import load_jsonl

    return load_jsonl(jsonl_path, _parse_scored, root, check_images=check_images)


@dataclasses.dataclass(frozen=True)
class _Unit:
    """A pair (two responses of one prompt) or one MSE record (one response, a target)."""

    example: RMExample
    target: float | None  # None: a pair


def _slots(units: list[_Unit]) -> list[tuple[_Unit | None, _Unit | None]]:
    """Units in order into slots: a pair alone, MSE records two by two."""
    slots, half = [], None
    for u in units:
        if u.target is None:
            slots.append((u, None))
        elif half is None:
            half = len(slots)
            slots.append((u, None))
        else:
            slots[half] = (slots[half][0], u)
            half = None
    return slots


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RMBatch:
    """rows: a TrainBatch of B = 2K rows; bt_mask_K: 1 where slot k is a pair (row k chosen,
    row K+k rejected); mse_mask_B: 1 on MSE rows; target_B: their scores in [0, 1]."""

    rows: Any
    bt_mask: np.ndarray
    mse_mask: np.ndarray
    target: np.ndarray


def build_rm_batch(model, slots, K: int, pad_id: int, prompt_len: int, response_len: int) -> RMBatch:
    """K slots (missing ones padded, fully masked) as one RMBatch."""
    slots = list(slots) + [(None, None)] * (K - len(slots))
    filler = next(u for s in slots for u in s if u is not None).example
    first, second = [], []
    bt = np.zeros(K, np.float32)
    mse = np.zeros(2 * K, np.float32)
    target = np.zeros(2 * K, np.float32)
    for k, (a, b) in enumerate(slots):
        if a is not None and a.target is None:
            first.append((a.example, 0))
            second.append((a.example, 1))
            bt[k] = 1
            continue
        for row, unit, out in ((k, a, first), (K + k, b, second)):
            if unit is None:
                out.append((filler, -1))
            else:
                out.append((unit.example, 0))
                mse[row], target[row] = 1, unit.target
    rows = rm_rows(model, first + second, pad_id, prompt_len, response_len)
    return RMBatch(rows, bt, mse, target)


# --------------------------------------------------------------------------- maths


def _rm_step(model, step_cfg, mse_weight: float, state, batch: RMBatch):
    from caspo_jax.step import apply_gradients

    dtype = None if step_cfg.compute_dtype == "float32" else jnp.dtype(step_cfg.compute_dtype)

    def loss_fn(params):
        r = sequence_rewards(model, params, batch.rows, dtype)
        return rm_loss(r, batch.bt_mask, batch.mse_mask, batch.target, mse_weight)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, update_metrics = apply_gradients(step_cfg, state, grads)
    return state, {**metrics, **update_metrics}


def rm_state_shardings(model, step_cfg, mesh, rules=None):
    """TrainState shardings: backbone leaves (and AdamW's mu/nu) follow the model's logical
    axes (`param_shardings`); the head and scalars are replicated."""
    from caspo_jax.sharding import LogicalRules, param_shardings
    from caspo_jax.step import TrainState, make_optimizer
    from caspo_jax.step.state import _shape_tree

    rules = rules or LogicalRules()
    replicated = NamedSharding(mesh, PartitionSpec())
    p_shard = with_head(param_shardings(model.param_table(), mesh, rules),
                        RewardHead(kernel=replicated, bias=replicated))
    D = _shape_tree(model).text.embed.shape[1]
    abstract = with_head(_shape_tree(model), jax.eval_shape(lambda: init_head(D)))
    opt = make_optimizer(step_cfg)
    opt_shard = optax.tree_map_params(opt, lambda _, s: s, jax.eval_shape(opt.init, abstract), p_shard,
                                      transform_non_params=lambda _: replicated,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(replicated, p_shard, opt_shard)


def make_rm_step(model, step_cfg, mse_weight: float, mesh=None, rules=None):
    """`step(state, RMBatch) -> (state, metrics)`, jitted; with a mesh the new state keeps
    `rm_state_shardings` (place inputs with `shard_rm_state` / `shard_rm_batch`)."""
    fn = functools.partial(_rm_step, model, step_cfg, float(mse_weight))
    if mesh is None:
        return jax.jit(fn)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, out_shardings=(rm_state_shardings(model, step_cfg, mesh, rules), replicated))


def shard_rm_batch(batch: RMBatch, mesh, rules=None) -> RMBatch:
    """Rows over the batch axes (`shard_batch`); the small masks replicated."""
    from caspo_jax.sharding import LogicalRules
    from caspo_jax.step import shard_batch

    replicated = NamedSharding(mesh, PartitionSpec())
    small = jax.device_put((batch.bt_mask, batch.mse_mask, batch.target), replicated)
    return RMBatch(shard_batch(batch.rows, mesh, rules or LogicalRules()), *small)


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_sums(model, params, batch: RMBatch):
    r = sequence_rewards(model, params, batch.rows)
    K = batch.bt_mask.shape[0]
    correct = jnp.sum(batch.bt_mask * (r[:K] > r[K:]))
    sq = jnp.sum(batch.mse_mask * (r - batch.target) ** 2)
    return jnp.stack([correct, jnp.sum(batch.bt_mask), sq, jnp.sum(batch.mse_mask)])


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class RMTrainConfig:
    """`caspo rm`'s knobs. batch_size counts slots (a pair, or two MSE records): 2x rows.
    steps: total updates (None: `epochs` passes over the training slots).
    step: the update itself -- learning rate (1e-5), warm-up, AdamW, clipping, compute
    dtype -- the `StepConfig` every trainer's `apply_gradients` reads."""

    mse_weight: float = 1.0
    batch_size: int = 8
    steps: int | None = None
    epochs: int = 1
    step: StepConfig = StepConfig(learning_rate=1e-5)
    eval_fraction: float = 0.1
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    seed: int = 0
    max_prompt_len: int = 2048
    max_response_len: int = 1024
    mesh: tuple[int, int, int] | None = None  # (data, fsdp, tensor); None: one device

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"RMTrainConfig.{field}={getattr(self, field)!r}: {why}")

        if not (self.mse_weight >= 0 and math.isfinite(self.mse_weight)):
            bad("mse_weight", "must be a finite number >= 0 (lambda of eq. 7; 0 = BT only)")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if not 0 <= self.eval_fraction < 1:
            bad("eval_fraction", "must be in [0, 1)")
        if self.steps is not None and self.steps < 1:
            bad("steps", "must be >= 1 (or unset: use epochs)")


def _split(n: int, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, salt]).permutation(n)
    n_eval = int(round(n * fraction)) if n > 1 else 0
    return order[n_eval:], order[:n_eval]


def _encode_units(processor, pairs, scored, max_prompt_len, max_response_len, progress):
    from caspo_jax.rewards.reward_model import encode_rm_example

    items = [(p, None) for p in pairs] + [(s, s.score / MAX_SCORE) for s in scored]
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="encode", unit="item")
    pair_units, mse_units, too_long = [], [], 0
    for item, target in items:
        texts = (item.chosen, item.rejected) if target is None else (item.response,)
        ex = encode_rm_example(processor, item.query, item.images, texts, max_response_len=max_response_len)
        if len(ex.prompt_ids) > max_prompt_len:
            too_long += 1
            continue
        (pair_units if target is None else mse_units).append(_Unit(ex, target))
    if too_long:
        print(f"caspo rm: dropped {too_long} items whose prompt exceeds max_prompt_len={max_prompt_len}")
    return pair_units, mse_units


def _evaluate(model, params, units, K, pad_id, prompt_len, response_len, shard) -> dict:
    if not units:
        return {}
    sums = np.zeros(4)
    slots = _slots(units)
    for i in range(0, len(slots), K):
        sums += np.asarray(_eval_sums(model, params, shard(build_rm_batch(model, slots[i:i + K], K, pad_id,
                                                                          prompt_len, response_len))))
    out = {}
    if sums[1]:
        out["eval/accuracy"] = sums[0] / sums[1]
    if sums[3]:
        out["eval/mse"] = sums[2] / sums[3]
    return out


def train_reward_model(pairs_path, scores_path, model_dir, out_dir, cfg: RMTrainConfig = RMTrainConfig(), *,
                       resume: bool = False, progress: bool = True, reward_model: RewardModel | None = None,
                       ignore_custom_code: bool = False) -> tuple[RewardModel, dict]:
    """Trains to completion (or to a stop signal); writes out_dir/{rm_config.json, checkpoints/,
    metrics.jsonl, tb/, eval.json, export/} (export/ is the directory `RewardModel.load` reads).

    pairs_path / scores_path: preference-pair and ScoredResponse JSONL (either may be None,
    not both). model_dir: the backbone's HF directory (a reward-model directory keeps its head).
    Returns the trained RewardModel and the final held-out metrics. SIGTERM / SIGINT end the
    run after the current step with a checkpoint (resume with resume=True) and return the
    model so far with {"stopped": signal name, "steps": steps done} instead.
    """
    from caspo_jax.data.formats import load_pairs
    from caspo_jax.sharding import make_mesh
    from caspo_jax.step import init_state, shard_state
    from caspo_jax.loop.checkpoint import RunCheckpointer
    from caspo_jax.loop.metrics import MetricsWriter
    from caspo_jax.loop.runtime import StopSignals

    if pairs_path is None and scores_path is None:
        raise ValueError("caspo rm: give --pairs (preference pairs JSONL) and/or --scores (scored responses JSONL)")
    pairs = load_pairs(pairs_path) if pairs_path is not None else []
    scored = load_scored_responses(scores_path) if scores_path is not None else []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if reward_model is None:
        model_dir = Path(model_dir)
        if (model_dir / "reward_head.safetensors").is_file():
            reward_model = RewardModel.load(model_dir)
        else:
            from caspo_jax.hf_checkpoint import load_hf_checkpoint

            if not (model_dir / "config.json").is_file():
                raise FileNotFoundError(f"--model {model_dir}: no config.json; pass a Qwen2.5-VL / Qwen3-VL HF "
                                        "directory (or a reward-model directory from an earlier caspo rm)")
            model, params, processor = load_hf_checkpoint(model_dir, ignore_custom_code=ignore_custom_code)
            params = with_head(params, init_head(params.text.embed.shape[1], cfg.seed))
            pad = processor.tokenizer.pad_token_id
            reward_model = RewardModel(model, params, processor, 0 if pad is None else pad)
    model, processor, pad_id = reward_model.model, reward_model.processor, reward_model.pad_id
    (out / "rm_config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "pairs": str(pairs_path),
                                                    "scores": str(scores_path), "model": str(model_dir)},
                                                   indent=2) + "\n", encoding="utf-8")

    pair_units, mse_units = _encode_units(processor, pairs, scored, cfg.max_prompt_len, cfg.max_response_len,
                                          progress)
    p_train, p_eval = _split(len(pair_units), cfg.eval_fraction, cfg.seed, 1)
    m_train, m_eval = _split(len(mse_units), cfg.eval_fraction, cfg.seed, 2)
    train_units = [pair_units[i] for i in p_train] + [mse_units[i] for i in m_train]
    eval_units = [pair_units[i] for i in p_eval] + [mse_units[i] for i in m_eval]
    if not train_units:
        raise ValueError(f"caspo rm: no training items left ({len(pair_units)} pairs, {len(mse_units)} MSE records "
                         f"after encoding, eval_fraction={cfg.eval_fraction})")
    every = [u.example for u in pair_units + mse_units]
    prompt_len = -(-max(len(e.prompt_ids) for e in every) // 16) * 16
    response_len = -(-max(len(r) for e in every for r in e.responses) // 8) * 8
    n_slots = len(_slots(train_units))
    K = min(cfg.batch_size, n_slots)
    per_epoch = -(-n_slots // K)
    total = cfg.steps or cfg.epochs * per_epoch

    step_cfg = cfg.step
    mesh = make_mesh(*cfg.mesh) if cfg.mesh else None
    state = init_state(reward_model.params, step_cfg)
    shard = (lambda b: shard_rm_batch(b, mesh)) if mesh is not None else (lambda b: b)
    if mesh is not None:
        state = shard_state(state, rm_state_shardings(model, step_cfg, mesh))
    step_fn = make_rm_step(model, step_cfg, cfg.mse_weight, mesh)

    checkpointer = RunCheckpointer(out / "checkpoints", cfg.keep_last)
    start = 0
    if not resume:
        checkpointer.refuse_overwrite("rm")
    else:
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            start, state, _ = restored
            print(f"caspo rm: resumed from step {start}", flush=True)
    writer = MetricsWriter(out, resume_step=start if resume else None, total_steps=total, progress=progress,
                           initial_step=start, desc="rm")

    def batch_at(step: int) -> RMBatch:
        epoch, position = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_units))
        slots = _slots([train_units[i] for i in order])
        return build_rm_batch(model, slots[position * K:(position + 1) * K], K, pad_id, prompt_len, response_len)

    final: dict = {}
    step = start
    stopping = False  # a stop seen after a step: save it, then leave the loop
    with StopSignals() as stop:
        while step < total and not stopping:
            state, metrics = step_fn(state, shard(batch_at(step)))
            step += 1
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
                final = _evaluate(model, state.params, eval_units, K, pad_id, prompt_len, response_len, shard)
                row.update(final)
            writer.write(step, row)
            stopping = stop.agreed()
            if (cfg.save_every and step % cfg.save_every == 0) or step == total or stopping:
                checkpointer.save(step, state, {"stage": "rm", "step": step})
    if start >= total:  # resumed a finished run: evaluate what was restored
        final = _evaluate(model, state.params, eval_units, K, pad_id, prompt_len, response_len, shard)
    checkpointer.close()
    writer.close()
    if stopping and step < total:  # saved at `step`; no export, no eval.json until the run completes
        why = stop.requested or "another process"
        print(f"caspo rm: stopped by {why} at step {step}; resume with --resume", flush=True)
        return (RewardModel(model, jax.device_get(state.params), processor, pad_id,
                            batch_size=reward_model.batch_size, name="reward_model"), {"stopped": why, "steps": step})
    params = jax.device_get(state.params)
    trained = RewardModel(model, params, processor, pad_id, batch_size=reward_model.batch_size, name="reward_model")
    trained.save(out / "export")
    final = {k: float(v) for k, v in final.items()}
    final.update({"train_pairs": len(p_train), "train_mse": len(m_train), "eval_pairs": len(p_eval),
                  "eval_mse": len(m_eval), "steps": total})
    (out / "eval.json").write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    return trained, final
