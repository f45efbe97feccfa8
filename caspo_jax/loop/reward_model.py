"""`caspo rm`: training the reward model on the run skeleton; the paper's eq. 7,
Bradley-Terry + lambda * MSE.

    L = -E_BT[log sigmoid(r(x, y_w) - r(x, y_l))] + lambda * E_MSE[(r(x, y) - s(x, y))^2]

Both expectations are means over their own items in the batch (a batch with no item of
one kind has that term 0). s is the RSE total (R + S + E, 0..6) divided by 6: the [0, 1]
scale of `rse_to_reward`, so the trained RM is a drop-in for the judge's reward.

One batch stream mixes both kinds. A batch has K slots and B = 2K rows: slot k owns rows
k and K + k. A pair fills a slot (row k chosen, row K + k rejected, same prompt); two MSE
records share one (one per row). Per row and per slot masks select the terms, so every
batch has one shape. Slot order is a permutation of (run.seed, epoch): batch `step` is a
function of step alone, and resume is exact.

Held-out split: rm.eval_fraction of the pairs and of the MSE records (a seeded
permutation) are never trained on; pairwise accuracy (fraction of pairs with
r(y_w) > r(y_l)) and MSE on them are logged as eval/accuracy and eval/mse.

The run is the skeleton CASPO, SFT and DPO use (`caspo_jax.loop.skeleton.TrainingRun`):
config.yaml, refuse-overwrite / --resume, SIGTERM saves, metrics; the mesh of run.mesh_*
(backbone and AdamW moments sharded like the policy's, the head replicated, rows over
(data, fsdp)); with several processes every process encodes the (small) item set and
feeds the rows its devices hold, process 0 alone writes metrics, eval.json and the export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from caspo_jax.algo import rm_loss
from caspo_jax.curate.selection import ScoredResponse
from caspo_jax.data.formats import _optional_category, load_pairs
from caspo_jax.data.records import RecordError, load_jsonl, parse_id, parse_images, required_text
from caspo_jax.hf_checkpoint import load_hf_checkpoint
from caspo_jax.loop.config import ConfigError, TrainConfig, step_config
from caspo_jax.loop.placement import make_placement
from caspo_jax.loop.setup import build_policy
from caspo_jax.loop.skeleton import StepOutcome, TrainingRun
from caspo_jax.rewards.reward_model import (RewardHead, RewardModel, RMExample, encode_rm_example, init_head, rm_rows,
                                            sequence_rewards, with_head)
from caspo_jax.sharding import LogicalRules, param_shardings
from caspo_jax.step import TrainState, apply_gradients, batch_shardings, init_state, make_optimizer
from caspo_jax.step.state import _shape_tree

__all__ = ["RMBatch", "load_scored_responses", "make_rm_step", "train_reward_model"]

MAX_SCORE = 6.0


# --------------------------------------------------------------------------- data


def _parse_scored(obj: Any, where: str, root: Path, check_images: bool):
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
    `rm_state_shardings` (place batches with `rm_batch_shardings`)."""
    fn = functools.partial(_rm_step, model, step_cfg, float(mse_weight))
    if mesh is None:
        return jax.jit(fn)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, out_shardings=(rm_state_shardings(model, step_cfg, mesh, rules), replicated))


def rm_batch_shardings(batch: RMBatch, mesh, rules=None) -> RMBatch:
    """An RMBatch of NamedShardings: rows over the batch axes (`batch_shardings`); the
    small masks and targets replicated (`Placement.place` puts a batch on them)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return RMBatch(batch_shardings(batch.rows, mesh, rules or LogicalRules()), replicated, replicated, replicated)


def shard_rm_batch(batch: RMBatch, mesh, rules=None) -> RMBatch:
    """`batch` placed on `mesh` from one process (`rm_batch_shardings`)."""
    return jax.device_put(batch, rm_batch_shardings(batch, mesh, rules))


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_sums(model, params, batch: RMBatch):
    r = sequence_rewards(model, params, batch.rows)
    K = batch.bt_mask.shape[0]
    correct = jnp.sum(batch.bt_mask * (r[:K] > r[K:]))
    sq = jnp.sum(batch.mse_mask * (r - batch.target) ** 2)
    return jnp.stack([correct, jnp.sum(batch.bt_mask), sq, jnp.sum(batch.mse_mask)])


# --------------------------------------------------------------------------- the run


def _split(n: int, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, salt]).permutation(n)
    n_eval = int(round(n * fraction)) if n > 1 else 0
    return order[n_eval:], order[:n_eval]


def _encode_units(processor, pairs, scored, max_prompt_len, max_response_len, progress, primary):
    items = [(p, None) for p in pairs] + [(s, s.score / MAX_SCORE) for s in scored]
    if progress and primary:
        items = tqdm(items, desc="encode", unit="item")
    pair_units, mse_units, too_long = [], [], 0
    for item, target in items:
        texts = (item.chosen, item.rejected) if target is None else (item.response,)
        ex = encode_rm_example(processor, item.query, item.images, texts, max_response_len=max_response_len)
        if len(ex.prompt_ids) > max_prompt_len:
            too_long += 1
            continue
        (pair_units if target is None else mse_units).append(_Unit(ex, target))
    if too_long and primary:
        print(f"caspo rm: dropped {too_long} items whose prompt exceeds data.max_prompt_len={max_prompt_len}")
    return pair_units, mse_units


def _evaluate(model, params, units, K, pad_id, prompt_len, response_len, put, to_host) -> dict:
    """Held-out accuracy and MSE (every process runs it: the parameters may be sharded)."""
    if not units:
        return {}
    sums = np.zeros(4)
    slots = _slots(units)
    for i in range(0, len(slots), K):
        batch = build_rm_batch(model, slots[i:i + K], K, pad_id, prompt_len, response_len)
        sums += np.asarray(to_host(_eval_sums(model, params, put(batch))))
    out = {}
    if sums[1]:
        out["eval/accuracy"] = sums[0] / sums[1]
    if sums[3]:
        out["eval/mse"] = sums[2] / sums[3]
    return out


def initial_reward_model(cfg: TrainConfig) -> RewardModel:
    """What `caspo rm` starts from: model.path holding a reward model (its head kept), an HF
    backbone (a fresh head from run.seed), or, with no model.path, the built-in tiny model."""
    seed = cfg.run.seed
    if cfg.model.path is None:
        policy = build_policy(cfg.model, cfg.data)
        params = with_head(policy.params, init_head(policy.params.text.embed.shape[1], seed))
        return RewardModel(policy.model, params, policy.processor, policy.pad_id)
    model_dir = Path(cfg.model.path)
    if (model_dir / "reward_head.safetensors").is_file():
        return RewardModel.load(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.path={str(model_dir)!r} (--model): no config.json; pass a Qwen2.5-VL / Qwen3-VL "
                          "HF directory (or a reward-model directory from an earlier caspo rm)")
    model, params, processor = load_hf_checkpoint(model_dir, ignore_custom_code=cfg.model.ignore_custom_code)
    params = with_head(params, init_head(params.text.embed.shape[1], seed))
    pad = processor.tokenizer.pad_token_id
    return RewardModel(model, params, processor, 0 if pad is None else pad)


def train_reward_model(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                       reward_model: RewardModel | None = None) -> tuple[RewardModel, dict]:
    """Trains to completion (or to a stop signal); writes out_dir/{config.yaml, checkpoints/,
    metrics.jsonl, tb/, eval.json, export/} (export/ is the directory `RewardModel.load` reads).

    data.pairs / data.scores: preference-pair and ScoredResponse JSONL (either may be unset,
    not both); the knobs are cfg.rm's (`RMConfig`). Returns the trained RewardModel and the
    final held-out metrics. SIGTERM / SIGINT end the run after the current step with a
    checkpoint (resume with resume=True) and return the model so far with {"stopped": signal
    name, "steps": steps done} instead.
    """
    d, rm = cfg.data, cfg.rm
    if d.pairs is None and d.scores is None:
        raise ConfigError("caspo rm: give --pairs (preference pairs JSONL) and/or --scores (scored responses "
                          "JSONL), or --set data.pairs=PATH / data.scores=PATH")
    run = TrainingRun(cfg, out_dir, "rm", resume=resume, progress=progress)
    pairs = load_pairs(d.pairs) if d.pairs is not None else []
    scored = load_scored_responses(d.scores) if d.scores is not None else []
    reward_model = reward_model or initial_reward_model(cfg)
    model, processor, pad_id = reward_model.model, reward_model.processor, reward_model.pad_id

    pair_units, mse_units = _encode_units(processor, pairs, scored, d.max_prompt_len, d.max_response_len,
                                          progress, run.primary)
    seed = cfg.run.seed
    p_train, p_eval = _split(len(pair_units), rm.eval_fraction, seed, 1)
    m_train, m_eval = _split(len(mse_units), rm.eval_fraction, seed, 2)
    train_units = [pair_units[i] for i in p_train] + [mse_units[i] for i in m_train]
    eval_units = [pair_units[i] for i in p_eval] + [mse_units[i] for i in m_eval]
    if not train_units:
        raise ConfigError(f"caspo rm: no training items left ({len(pair_units)} pairs, {len(mse_units)} MSE "
                          f"records after encoding, rm.eval_fraction={rm.eval_fraction})")
    every = [u.example for u in pair_units + mse_units]
    prompt_len = -(-max(len(e.prompt_ids) for e in every) // 16) * 16
    response_len = -(-max(len(r) for e in every for r in e.responses) // 8) * 8
    n_slots = len(_slots(train_units))
    K = min(rm.batch_size, n_slots)
    per_epoch = -(-n_slots // K)
    total = rm.steps or rm.epochs * per_epoch

    step_cfg = step_config(cfg, "rm")
    place = make_placement(cfg, model, step_cfg, rows=2 * K,
                           rows_field="2 * rm.batch_size (two rows a slot; rm.batch_size is capped at the slots)",
                           sampler_devices=0)  # no sampler in this stage: every device trains
    mesh = place.mesh
    put = (lambda b: b) if mesh is None else (lambda b: place.place(b, rm_batch_shardings(b, mesh)))
    state = place.state(init_state(reward_model.params, step_cfg),
                        None if mesh is None else rm_state_shardings(model, step_cfg, mesh))
    start, state, _ = run.restore(state)
    step_fn = make_rm_step(model, step_cfg, rm.mse_weight, mesh)

    def evaluate(params) -> dict:
        return _evaluate(model, params, eval_units, K, pad_id, prompt_len, response_len, put, place.to_host)

    def batch_at(step: int) -> RMBatch:
        epoch, position = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(train_units))
        slots = _slots([train_units[i] for i in order])
        return build_rm_batch(model, slots[position * K:(position + 1) * K], K, pad_id, prompt_len, response_len)

    final: dict = {}

    def rm_step(state, step: int) -> StepOutcome:
        state, metrics = step_fn(state, put(batch_at(step)))
        row = {k: float(v) for k, v in jax.device_get(metrics).items()}
        done = step + 1
        if (rm.eval_every and done % rm.eval_every == 0) or done == total:
            final.update(evaluate(state.params))
            row.update(final)
        return StepOutcome(state, row)

    end = run.loop(state, start, total, rm_step)
    if start >= total:  # resumed a finished run: evaluate what was restored
        final = evaluate(end.state.params)
    completed = run.finish(end)  # a stop before the last step: saved; no export, no eval.json
    params = place.to_host(end.state.params)  # every process joins the gather
    trained = RewardModel(model, params, processor, pad_id, batch_size=reward_model.batch_size, name="reward_model")
    if not completed:
        return trained, {"stopped": end.stopped, "steps": end.step}
    final = {k: float(v) for k, v in final.items()}
    final.update({"train_pairs": len(p_train), "train_mse": len(m_train), "eval_pairs": len(p_eval),
                  "eval_mse": len(m_eval), "steps": total})
    if run.primary:
        trained.save(run.dir.export)
        (run.dir.path / "eval.json").write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    return trained, final
