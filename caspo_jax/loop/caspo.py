"""`caspo train`: Algorithm 1 of the paper, end to end.

Per step: P prompts -> G rollouts each (JAX sampler) -> outcome rewards (a failed
reward takes its whole group out of the loss and of every statistic) -> old, reference
and teacher (constitution-conditioned) log-probs, all at the train step's compute dtype
(model.dtype) and the rollout temperature (`rollout_signals`) -> advantages (variant
outcome / token / hybrid, lambda) -> `ppo_epochs` passes over shuffled mini-batches
(`caspo_jax.step.make_train_step`) -> weights synced to the rollout engine -> metrics,
periodic evaluation, checkpoints.

Failing rewards stop the run instead of training on nothing: a reward that cannot score
the training records at all (`check_records`, e.g. the demo reward on other data) is a
UserError before the policy is built, and run.halt_failed_steps consecutive steps with at
least run.halt_failed_share of the groups failed save a checkpoint and raise RunHalted.

Determinism: rollout seeds, mini-batch order and the data order are functions of
(run.seed, step), and the data iterator's position is checkpointed, so `--resume`
continues exactly where the run stopped (metrics equal an uninterrupted run on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from caspo_jax.data.records import load_records
from caspo_jax.distributed import pipeline_shard
from caspo_jax.errors import UserError
from caspo_jax.loop.config import ConfigError, TrainConfig, config_to_dict, rollout_correction, step_config
from caspo_jax.loop.data import DataFiles, prepare_data, prompt_dataset
from caspo_jax.loop.dynamic_sampling import fill_groups, informative_groups
from caspo_jax.loop.evaluate import batch_prompts, decode_responses, evaluate_policy
from caspo_jax.loop.metrics import PhaseTimer, count_params, mfu
from caspo_jax.loop.placement import allgather_host, allgather_json, make_placement, merge_prompt_rows
from caspo_jax.loop.runtime import export_final
from caspo_jax.loop.setup import Policy, build_policy, load_teacher_params
from caspo_jax.loop.skeleton import StepOutcome, TrainingRun
from caspo_jax.demo.task import demo_record_problem, demo_reward
from caspo_jax.rewards import FunctionReward, build_reward, group_ok
from caspo_jax.rewards.base import records_problem
from caspo_jax.rollout import JaxSampler, SamplingParams, VllmEngine
from caspo_jax.rollout.colocate import MemorySplit, apply_memory_split, engine_asleep
from caspo_jax.remote import RemoteRolloutEngine, WorkerSpec
from caspo_jax.rollout.producer import Produced, RolloutProducer
from caspo_jax.step import (build_train_batch, init_state, make_train_step, rollout_advantages, step_logprobs,
                            take_rows, teacher_params)
from caspo_jax.step.correction import correction_metrics
from caspo_jax.step.logprobs import cast_floats

__all__ = ["RolloutSignals", "check_reward_fits_data", "make_remote_engine", "make_reward", "make_rollout_engine",
           "remote_worker_spec", "rollout_signals", "run_caspo"]


def make_reward(spec: dict):
    """The outcome reward of the config: {"kind": "demo"} or any `build_reward` spec."""
    if spec.get("kind") == "demo":
        return FunctionReward(demo_reward, name="demo", check=demo_record_problem)
    return build_reward(spec)


def check_reward_fits_data(cfg: TrainConfig, reward, files: DataFiles) -> None:
    """UserError, before any model is built, when the reward says it cannot score the
    records it will be asked to score (data.train, and data.eval when evaluated): every
    step would fail, train nothing, and say so only in its metrics."""
    splits = [("train", files.train)] + ([("eval", files.eval)] if cfg.run.eval_every and files.eval else [])
    for split, path in splits:
        problem = records_problem(reward, load_records(path, check_images=False))
        if problem is not None:
            default = " (the default)" if cfg.reward.get("kind") == "demo" else ""
            raise UserError(
                f"reward.kind={cfg.reward.get('kind')!r}{default} cannot score data.{split}={str(path)!r}: "
                f"{problem}. Set reward.kind to a reward that scores these records (e.g. 'judge' or 'function'), "
                "or fix the records")


class RolloutSignals(NamedTuple):
    """What one rollout batch gives the train step; [B, T] float32 arrays (ref / teacher
    None when unused), metrics from `rollout_advantages`."""

    old_logp: jax.Array
    ref_logp: jax.Array | None
    teacher_logp: jax.Array | None
    advantages: jax.Array
    entropy: jax.Array
    metrics: dict


def rollout_signals(model, step_cfg, caspo, batch, params, ref_params, rewards_PxG, group_ok_P,
                    original=None) -> RolloutSignals:
    """Old (`params`), reference (`ref_params`) and teacher log-probs of a placed batch,
    and its advantages (failed groups, `group_ok_P` False, out of every population).

    Every log-prob is `step_logprobs` with the train step's own config, so the one the
    step computes for the ratio and the KL shares their compute dtype (model.dtype) and
    temperature (the rollout's): at step 0 ref_logp equals old_logp bit for bit (KL 0),
    and a teacher prompt equal to the student's gives r_t = 0 exactly, in bfloat16 too.
    """
    old_logp, entropy = step_logprobs(model, step_cfg, params, batch)
    ref_logp = step_logprobs(model, step_cfg, ref_params, batch)[0] if caspo.beta > 0 else None
    teacher_logp = None
    if caspo.variant != "outcome":
        source = teacher_params(caspo.teacher, rollout_policy=params, frozen_sft=ref_params, original=original)
        teacher_logp = step_logprobs(model, step_cfg, source, batch, layout="teacher")[0]
    adv, metrics = rollout_advantages(caspo, rewards_PxG, teacher_logp, old_logp, batch.response_mask, group_ok_P)
    return RolloutSignals(old_logp, ref_logp, teacher_logp, adv, entropy, metrics)


def _halt_message(cfg: TrainConfig, step: int, checkpoints: Path, last_error: str | None) -> str:
    r = cfg.run
    share = ("every reward group" if r.halt_failed_share >= 1
             else f"at least {r.halt_failed_share:.0%} of the reward groups")
    return (f"caspo train: halted after step {step}: {share} failed in each of the last "
            f"{r.halt_failed_steps} steps (run.halt_failed_share={r.halt_failed_share}, "
            f"run.halt_failed_steps={r.halt_failed_steps}), so they trained nothing. Last reward error: "
            f"{last_error or 'none reported'}. Likely fixes: start (or point reward.base_url at) a judge that "
            "answers; make the reward function accept these records; use a reward.kind that fits data.train. "
            f"Step {step} is saved in {checkpoints}: continue with --resume. To tolerate failing rewards raise "
            "run.halt_failed_steps (0 never halts)")


def _to_width(x_SxT: np.ndarray, width: int) -> np.ndarray:
    """float32 [S, width]: `x_SxT` cut or zero-padded on the right."""
    out = np.zeros((x_SxT.shape[0], width), np.float32)
    n = min(width, x_SxT.shape[1])
    out[:, :n] = x_SxT[:, :n]
    return out


def _mean_dicts(rows: list[dict]) -> dict:
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in rows[0]} if rows else {}


def make_rollout_engine(cfg: TrainConfig, policy: Policy, place, params, version: int = 0):
    """The rollout engine of rollout.engine, holding `params` as weight version `version`
    (the number of steps they were trained for): both have `generate` (n samples per
    prompt, per-prompt seeds; `Rollouts.version`) and `sync_weights(params, version)`.

    "jax": `JaxSampler` on the placement's sampler mesh. "vllm": `VllmEngine` started in
    this process on model.path (its architecture, tokenizer and processor), then given
    `params` through the weight bridge (a resumed or --init policy differs from the files).
    On CPU the KV cache is bounded (`vllm_engine.kv_cache_bytes`); on GPUs vLLM sizes it
    itself within its share of model.gpu_memory_split (sleep mode on), and the weights go
    over DLPack.
    rollout.workers "subprocess" / "ray": a `RemoteRolloutEngine` over rollout.num_workers
    workers of rollout.engine's kind (`remote_worker_spec`).
    """
    if cfg.rollout.workers != "local":
        return make_remote_engine(cfg, policy, params, version)
    if cfg.rollout.engine == "jax":
        return JaxSampler(policy.model, params, eos_token_ids=policy.eos_ids, mesh=place.sampler_mesh,
                          version=version)
    gpu = jax.devices()[0].platform == "gpu"
    split = MemorySplit.for_engine(cfg.model.gpu_memory_split) if gpu else None
    engine = VllmEngine.start(cfg.model.path, policy.model, dtype=cfg.model.dtype, seed=cfg.run.seed,
                              max_model_len=cfg.data.max_prompt_len + cfg.data.max_response_len,
                              llm_kwargs=split.engine_kwargs() if split is not None else None,
                              eos_token_ids=policy.eos_ids, dlpack=gpu)
    engine.sync_weights(params, version=version)
    return engine


def remote_worker_spec(cfg: TrainConfig, policy: Policy) -> WorkerSpec:
    """What each remote worker builds: the JAX sampler, or vLLM from rollout.worker_model_dir
    (default model.path) on its host, its KV cache sized there (`vllm_engine.kv_cache_bytes`);
    rollout.worker_env set before either starts (e.g. CUDA_VISIBLE_DEVICES)."""
    ro = cfg.rollout
    env = dict(ro.worker_env)
    if ro.engine == "jax":
        return WorkerSpec.jax(policy.model, env=env, engine_kwargs={"eos_token_ids": policy.eos_ids})
    return WorkerSpec.vllm(policy.model, ro.worker_model_dir or cfg.model.path, env=env, engine_kwargs=dict(
        dtype=cfg.model.dtype, max_model_len=cfg.data.max_prompt_len + cfg.data.max_response_len,
        seed=cfg.run.seed, eos_token_ids=policy.eos_ids))


def make_remote_engine(cfg: TrainConfig, policy: Policy, params, version: int = 0) -> RemoteRolloutEngine:
    """rollout.num_workers workers in spawned processes ("subprocess") or Ray actors ("ray",
    connecting to rollout.ray_address unless Ray is already initialised, rollout.worker_gpus
    GPUs each), holding `params` as weight version `version`; a call that gets no answer
    within rollout.timeout_s fails (the run stops, its checkpoint intact)."""
    ro = cfg.rollout
    spec = remote_worker_spec(cfg, policy)
    if ro.workers == "subprocess":
        engine = RemoteRolloutEngine.subprocess(policy.model, spec, workers=ro.num_workers, timeout=ro.timeout_s)
    else:
        try:
            import ray
        except ImportError as err:
            raise ConfigError("rollout.workers=ray needs Ray on this host and the rollout hosts: pip install "
                              "'ray>=2.9', or use rollout.workers=subprocess (this host only)") from err
        if not ray.is_initialized():
            ray.init(address=ro.ray_address)
        engine = RemoteRolloutEngine.ray(policy.model, spec, workers=ro.num_workers, timeout=ro.timeout_s,
                                         actor_options=dict(num_gpus=ro.worker_gpus))
    try:
        engine.sync_weights(params, version=version)
    except BaseException:
        engine.close()
        raise
    return engine


def _host_step(batch, tokens, mask, truncated, rewards, ok, images_per_prompt,
               rollout_logp) -> dict[str, np.ndarray]:
    """This process's share of a step as plain arrays (what `merge_prompt_rows` gathers).
    rollout_logp: the engine's [S, max_response_len] sampled-token log-probs (for the
    rollout correction and its metrics; padded to one width on every process, so rows
    gather like any per-row field)."""
    pixels = np.asarray(batch.pixel_values if batch.pixel_values is not None else np.zeros((0, 1)), np.float32)
    return {"rollout_logp": rollout_logp, "ids": batch.input_ids, "mask": batch.attention_mask, "teacher_ids": batch.teacher_input_ids,
            "teacher_mask": batch.teacher_attention_mask,
            "pixels": pixels if pixels.ndim == 2 else np.zeros((0, 1), np.float32),
            "grids": np.asarray(batch.image_grid_thw, np.int32).reshape(-1, 3), "images": images_per_prompt,
            "tokens": tokens.astype(np.int32), "response_mask": mask, "truncated": truncated,
            "rewards": np.asarray(rewards, np.float64), "ok": ok}


def _async_metrics(got: Produced, step: int, samples: int, max_staleness: int, seconds: dict) -> dict:
    """Bounded-staleness metrics of one step: the batch's staleness (trainer version - rollout
    version) and its histogram over 0..k in samples, the trainer's wait for the batch, the
    producer's idle and push seconds since the last batch, and its data / generation seconds."""
    staleness = step - got.version
    return {"async/staleness": float(staleness),
            **{f"async/staleness_hist/{d}": float(samples if d == staleness else 0) for d in range(max_staleness + 1)},
            "async/trainer_wait_s": got.trainer_wait_s, "async/producer_idle_s": got.producer_idle_s,
            "async/producer_push_s": got.producer_push_s, "async/rollout_s": seconds.get("rollout", 0.0),
            "async/producer_reward_s": seconds.get("reward", 0.0),
            "async/data_s": seconds.get("data", 0.0)}


def run_caspo(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, policy: Policy | None = None,
              progress: bool = True, export: bool = True, eval_modes=("standard",),
              engine_factory=None) -> Policy:
    """Trains to run.steps (or run.epochs over the prompts), or until SIGTERM/SIGINT, on the
    run skeleton (`caspo_jax.loop.skeleton.TrainingRun`).

    On the mesh of run.mesh_* (`caspo_jax.loop.placement`). With several processes
    (`caspo_jax.distributed.start`): each reads its 1/n of every step's prompts,
    samples and scores their rollouts on its own devices, the step's host arrays are
    gathered (same order as one process would read them, so the run equals a
    single-process one), and each feeds its rows of the global batch; process 0 alone
    writes metrics, the config and the export, every process writes its checkpoint shards.

    rollout.max_staleness = k >= 1 (one process): a `RolloutProducer` thread draws the
    prompts and generates the rollouts of the next steps while this thread scores and
    trains, never more than k weight versions behind; the trainer publishes its weights
    after each update instead of pushing them. A checkpoint saves the data position after
    the last TRAINED batch: rollouts in flight are dropped and, on --resume, generated again
    from the checkpoint's weights (nothing is lost or trained twice; the resumed rollouts
    differ from an uninterrupted run's, which came from older weights).

    engine_factory: builds the rollout engine, `make_rollout_engine`'s signature (default:
    that function; bench/pipeline.py passes an engine that stands in for GPU hosts).
    """
    a, o = cfg.algo, cfg.optim
    if cfg.rollout.engine == "vllm" and cfg.rollout.workers == "local" and cfg.model.path is None:
        raise ConfigError("rollout.engine='vllm' needs model.path (an HF directory vLLM can load; the built-in tiny "
                          "model is JAX-only): set model.path, or use rollout.engine=jax")
    apply_memory_split(cfg.model.gpu_memory_split, cfg.rollout.engine)  # before JAX takes its GPU memory
    n_proc, pid = jax.process_count(), jax.process_index()
    P, G = a.prompts_per_step, a.group_size
    if P % n_proc:
        raise ConfigError(f"algo.prompts_per_step={P} must be divisible by the {n_proc} processes (each reads "
                          f"an equal share of a step's prompts); pick a multiple of {n_proc}")
    k = cfg.rollout.max_staleness
    if k and n_proc > 1 and cfg.rollout.dynamic_sampling:
        raise ConfigError(f"rollout.dynamic_sampling with rollout.max_staleness={k} runs in one trainer process (this "
                          f"run has {n_proc}): its draws are scored in the rollout thread, and gathering the "
                          "processes' rewards there would race the update's collectives. Set "
                          "rollout.max_staleness=0 or rollout.dynamic_sampling=false")
    run = TrainingRun(cfg, out_dir, "train", resume=resume, progress=progress, bar="caspo")
    files = prepare_data(cfg, run.dir.data)
    reward = make_reward(cfg.reward)
    check_reward_fits_data(cfg, reward, files)
    policy = policy or build_policy(cfg.model, cfg.data)
    model, tokenizer = policy.model, policy.processor.tokenizer
    dataset, _ = prompt_dataset(cfg, files, policy.processor, split="train", num_epochs=None,
                                batch_size=P // n_proc, shard=pipeline_shard())
    total = cfg.run.steps or cfg.run.epochs * max(len(dataset) // P, 1)
    step_cfg = step_config(cfg, "caspo")  # the rollout temperature; model.dtype
    place = make_placement(cfg, model, step_cfg, rows=o.minibatch_size, rows_field="optim.minibatch_size")
    # the frozen reference (and the SFT teacher): the initial policy, kept in the compute dtype
    ref_params = place.params(cast_floats(policy.params, step_cfg.compute_dtype))
    original = None  # CASPO-w.-OMC's teacher: the pre-SFT model at model.teacher_path
    if a.teacher == "original" and a.variant != "outcome":
        original = place.params(load_teacher_params(cfg.model, model))
    iterator = dataset.iterator()
    start, state, extras = run.restore(place.state(init_state(policy.params, step_cfg)))
    if extras is not None:
        data_state = extras["data"]
        iterator.set_state(data_state[pid] if isinstance(data_state, list) else data_state)
    correction = rollout_correction(cfg)
    train_step = make_train_step(model, step_cfg, a, mesh=place.mesh, correction=correction)
    sampler = (engine_factory or make_rollout_engine)(cfg, policy, place, place.sampler_params(state.params),
                                                      version=start)
    eval_set = None
    if cfg.run.eval_every and files.eval is not None:
        eval_set, _ = prompt_dataset(cfg, files, policy.processor, split="eval", num_epochs=1, shuffle=False,
                                     batch_size=min(32, cfg.data.demo_eval))
    n_params = count_params(state.params)
    global_prompt = np.arange(P // n_proc) * n_proc + pid  # grain's process sharding interleaves prompts
    sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              top_k=cfg.rollout.top_k, max_new_tokens=cfg.data.max_response_len)
    failing = {"steps": 0, "last_error": None}  # consecutive steps with too many failed rewards
    trained_data = {}  # k >= 1: the data position after the last trained batch (what a checkpoint saves)

    def draw(step: int, engine, timer: PhaseTimer, attempt: int = 0):
        """Step `step`'s prompts (the data iterator's next batch) and their rollouts; `attempt`
        > 0: dynamic sampling's further draws (other seeds)."""
        with timer("data"):
            batch = next(iterator)
        with timer("rollout"):
            seeds = (cfg.run.seed * 1_000_003 + step * P + global_prompt + attempt * 7_919 * P) % (2**31 - 1)
            rollouts = engine.generate(batch_prompts(batch, seeds=seeds), n=G, sampling=sampling)
        return batch, rollouts

    def produce(step: int, engine):  # the producer thread (k >= 1)
        """Step `step`'s draw; with dynamic sampling (one process) scored here, with its
        further draws, so the trainer gets the step's filled groups."""
        timer = PhaseTimer()
        batch, rollouts = draw(step, engine, timer)
        merged, dynamic_row = None, {}
        if cfg.rollout.dynamic_sampling:
            merged, dynamic_row = dynamic_draws(step, score_draw(batch, rollouts, timer), timer, engine)
        return (batch, rollouts, merged, dynamic_row, iterator.get_state(), timer.seconds), rollouts.version

    @contextlib.contextmanager
    def engine_at(state, version: int):
        """The rollout engine holding `state`'s weights (version `version`), for this thread alone."""
        if producer is None:
            yield sampler  # pushed at the end of every step
            return
        with producer.paused() as engine:
            if engine.version < version:
                engine.sync_weights(place.sampler_params(state.params), version=version)
            yield engine

    def score_draw(batch, rollouts, timer: PhaseTimer) -> dict:
        """One draw's rollouts scored, as the step's global host arrays (`merge_prompt_rows`)."""
        mask = np.asarray(rollouts.mask, bool)  # both engines never emit vision placeholders
        tokens = np.where(mask, rollouts.tokens, 0)
        with timer("reward"):
            texts = decode_responses(tokenizer, tokens, mask)
            scores = reward.score([batch.records[i] for i in rollouts.prompt_index], texts)
            failing["last_error"] = next((e for e in scores.errors if e is not None), failing["last_error"])
            local = _host_step(batch, tokens, mask, rollouts.finish_reason == "length", scores.rewards,
                               np.asarray(scores.ok, bool), np.asarray([len(i) for i in batch.images]),
                               _to_width(np.where(mask, rollouts.logprobs, 0.0), cfg.data.max_response_len))
            return merge_prompt_rows(allgather_host(local), G, policy.pad_id)

    def dynamic_draws(step: int, merged: dict, timer: PhaseTimer, engine) -> tuple[dict, dict]:
        """rollout.dynamic_sampling: more draws (from `engine`, in the thread that owns it)
        until P informative groups (or the draw limit)."""
        draws, flags = [merged], [informative_groups(merged["rewards"], merged["ok"], G)]
        while sum(int(f.sum()) for f in flags) < P and len(draws) < cfg.rollout.dynamic_sampling_max_draws:
            draws.append(score_draw(*draw(step, engine, timer, attempt=len(draws)), timer))
            flags.append(informative_groups(draws[-1]["rewards"], draws[-1]["ok"], G))
        merged, n_informative = fill_groups(draws, flags, P, G, policy.pad_id)
        return merged, {"dynamic_sampling/fill_rate": n_informative / P, "dynamic_sampling/draws": float(len(draws)),
                        "dynamic_sampling/dropped_groups": float(sum(int((~f).sum()) for f in flags))}

    def step_fn(state, step: int) -> StepOutcome:
        timer = PhaseTimer()
        extra_row = {}
        if producer is None:
            batch, rollouts = draw(step, sampler, timer)
            merged = score_draw(batch, rollouts, timer)
            if cfg.rollout.dynamic_sampling:
                merged, dynamic_row = dynamic_draws(step, merged, timer, sampler)
                extra_row.update(dynamic_row)
        else:
            with timer("rollout_wait"):
                got = producer.take(step)
            batch, rollouts, merged, dynamic_row, trained_data["state"], seconds = got.item
            extra_row = {**_async_metrics(got, step, len(rollouts), k, seconds), **dynamic_row}
            if merged is None:  # scored here: gathering every process's rows is a collective
                merged = score_draw(batch, rollouts, timer)
        with timer("reward"):
            tokens, mask, ok = merged["tokens"], merged["response_mask"], merged["ok"]
            raw_rewards = merged["rewards"]
            ok_P = group_ok(ok, G)
            rewards_PxG = np.where(ok_P[:, None], np.nan_to_num(raw_rewards).reshape(P, G), 0.0)
        with timer("logprobs"):
            images = merged["grids"] if len(merged["grids"]) else None
            tb = build_train_batch(model, merged["ids"], merged["mask"], tokens, mask.astype(np.float32),
                                   np.repeat(np.arange(P, dtype=np.int32), G),
                                   teacher_prompt_ids_PxL=merged["teacher_ids"],
                                   teacher_prompt_mask_PxL=merged["teacher_mask"],
                                   pixel_values=merged["pixels"] if images is not None else None,
                                   image_grid_thw=images, length_multiple=16)
            placed = place.batch(tb)
            signals = rollout_signals(model, step_cfg, a, placed, state.params, ref_params, rewards_PxG, ok_P,
                                      original)
            mask_f = np.asarray(tb.response_mask) * np.repeat(ok_P, G)[:, None]
            old_logp, ref_logp, adv, entropy, adv_metrics = place.to_host(
                (signals.old_logp, signals.ref_logp, signals.advantages, signals.entropy,
                 signals.metrics))  # also times the phase, not the dispatch
            tb = tb.with_signals(old_logp=old_logp, ref_logp=ref_logp, advantages=adv)
            rollout_logp = _to_width(merged["rollout_logp"], tb.response_len)
            if correction.active:  # the step weighs each token against the engine's log-prob
                tb = tb.with_signals(rollout_logp=rollout_logp)
            tb = dataclasses.replace(tb, response_mask=mask_f.astype(np.float32))  # failed groups: no loss
            correction_row = correction_metrics(old_logp, rollout_logp, mask_f, correction)
        # k = 0: an in-process vLLM engine sleeps through the update (its KV cache freed for
        # the trainer; the sync below pushes the new weights); k >= 1 it is generating
        asleep = engine_asleep(sampler) if producer is None else contextlib.nullcontext()
        with timer("update"), asleep:
            step_metrics = []
            rng = np.random.default_rng([cfg.run.seed, step])
            for _ in range(o.ppo_epochs):
                order = rng.permutation(P * G)
                for lo in range(0, P * G, o.minibatch_size):
                    state, m = train_step(state, place.batch(take_rows(tb, order[lo:lo + o.minibatch_size])))
                    step_metrics.append(m)
            step_metrics = _mean_dicts(jax.device_get(step_metrics))
        with timer("sync"):
            if producer is None:
                sampler.sync_weights(place.sampler_params(state.params), version=step + 1)
                jax.block_until_ready(getattr(sampler, "params", None))
            else:  # installed by the producer before its next batch
                producer.publish(place.sampler_params(state.params), step + 1)
        done = step + 1
        lengths = mask.sum(axis=1)
        valid = np.asarray(tb.response_mask) > 0
        response_tokens = float(lengths.sum())
        seq_tokens = float(np.asarray(tb.student.attention_mask).sum())
        seconds = sum(timer.seconds.values())
        scored = raw_rewards[np.repeat(ok_P, G)]  # the groups that train: a failed group is in no metric
        failed_share = float(np.mean(~ok_P))
        metrics = {
            "reward/mean": float(scored.mean()) if ok_P.any() else float("nan"),
            "reward/std": float(scored.std()) if ok_P.any() else float("nan"),
            "reward/failed_groups": float((~ok_P).sum()),
            "reward/failed_group_frac": failed_share,
            **{k: float(v) for k, v in adv_metrics.items()},
            **step_metrics,
            **correction_row,
            **extra_row,
            "rollout_entropy": float(np.asarray(entropy)[valid].mean()) if valid.any() else 0.0,
            "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
            "response_length/truncated_frac": float(np.mean(merged["truncated"])),
            **timer.as_metrics(),
            "tokens_per_s": (seq_tokens * o.ppo_epochs + response_tokens) / max(seconds, 1e-9),
            "mfu": mfu(n_params, seq_tokens * o.ppo_epochs, seq_tokens * (3 if a.variant != "outcome" else 2),
                       seconds),
        }
        if eval_set is not None and (done % cfg.run.eval_every == 0 or done == total):
            metrics.update(evaluate_now(state, done))
        failing["steps"] = failing["steps"] + 1 if failed_share >= cfg.run.halt_failed_share else 0
        halting = 0 < cfg.run.halt_failed_steps <= failing["steps"]  # every process: the same gathered ok
        halt = _halt_message(cfg, done, run.dir.checkpoints, failing["last_error"]) if halting else None
        return StepOutcome(state, metrics, halt)

    eval_teacher = {"frozen_sft": ref_params, "original": original}.get(a.teacher)  # None: the policy itself

    def evaluate_now(state, version: int) -> dict:
        """eval_<mode>/<metric> of `state`: every process evaluates the whole (small) eval set
        with its sampler (process 0 writes it); the readouts score eq. 4 with the run's teacher."""
        out = {}
        with engine_at(state, version) as sampler_now:
            policy_now = dataclasses.replace(policy, params=getattr(sampler_now, "params", state.params))
            for mode in eval_modes:
                result = evaluate_policy(policy_now, eval_set, reward, mode=mode,
                                         max_new_tokens=cfg.data.max_response_len,
                                         temperature=cfg.rollout.eval_temperature, sampler=sampler_now,
                                         teacher_params=eval_teacher)
                out.update({f"eval_{mode}/{key}": v for key, v in result.items() if key != "n"})
        return out

    def extras(step: int) -> dict:
        data_state = iterator.get_state() if producer is None else trained_data["state"]
        if n_proc > 1:
            data_state = allgather_json(data_state)  # each process resumes its own shard
        return {"stage": "caspo", "data": data_state, "config": config_to_dict(cfg)}

    producer = None
    if k:
        producer = RolloutProducer(sampler, produce, start=start, end=total, max_staleness=k,
                                   timeout_s=cfg.rollout.timeout_s, version=start)
    try:
        # the evaluation before RL (step 0 of metrics.jsonl): where the teacher and the policy start
        end = run.loop(state, start, total, step_fn, extras=extras,
                       before=None if eval_set is None else lambda: evaluate_now(state, start))
    finally:
        if producer is not None:
            producer.close()
        if hasattr(sampler, "shutdown"):
            sampler.shutdown()
    final = dataclasses.replace(policy, params=end.state.params)
    if run.finish(end) and export:
        export_final(place, model, end.state.params, policy.processor, run.dir.export)
    return final
