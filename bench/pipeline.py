"""`caspo train` step time with rollouts overlapping the update (rollout.max_staleness=1) vs
the synchronous loop (0), against a rollout engine that stands in for GPU hosts.

The trainer is the real one (`run_caspo`: reward, old/ref/teacher log-probs, the jitted
CASPO update, checkpoints off) on the tiny "demo" model. The engine (`SleepingEngine`)
computes nothing: it sleeps `token_seconds` per decode step (max_new_tokens steps per
batch, like a GPU engine that runs every sample to the cap) and returns random response
tokens, so on this 2-core machine the rollout side takes no CPU from the trainer, as
rollouts on other hosts would not.

Procedure, one process: (1) a calibration run (k=0, no sleep) measures the trainer's own
time per step u (every phase but data and rollout; median of the steps after the first
two, which compile); (2) token_seconds is set so one batch's rollout r = u (or
--token-seconds); (3) k=0 and k=1 runs, median step time of the steps after the first
two. The JAX persistent compilation cache (a temporary directory) keeps runs 2 and 3 from
compiling again. Expected: k=0 ~ r + u, k=1 ~ max(r, u).

RESULT value = k1 step time / max(r, u); goal <= 1.15.

Run: python bench/pipeline.py [--steps 8] [--token-seconds S]   (under 3 minutes here)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caspo_jax.loop.caspo import run_caspo  # noqa: E402
from caspo_jax.loop.config import load_config  # noqa: E402
from caspo_jax.loop.metrics import read_metrics  # noqa: E402
from caspo_jax.loop.setup import build_policy  # noqa: E402
from caspo_jax.rollout import Rollouts  # noqa: E402

GOAL = 1.15
CONFIG = ["model.tiny=demo", "data.demo_train=64", "data.demo_eval=8", "data.max_response_len=16",
          "data.max_prompt_len=256", "algo.prompts_per_step=4", "algo.group_size=4", "optim.minibatch_size=8",
          "optim.ppo_epochs=1", "algo.variant=token", "run.save_every=0", "run.eval_every=0", "sft.steps=1"]


class SleepingEngine:
    """A rollout engine whose generation sleeps `token_seconds` per decode step and returns
    random (non-special) tokens of the full length; sync_weights only records the version."""

    def __init__(self, vocab: int, version: int, token_seconds: float):
        self.vocab = vocab
        self.version = version
        self.token_seconds = token_seconds
        self.rng = np.random.default_rng(0)

    def sync_weights(self, params, version=None):
        self.version = self.version + 1 if version is None else version

    def generate(self, prompts, *, n, sampling):
        version = self.version
        S, T = len(prompts) * n, sampling.max_new_tokens
        time.sleep(self.token_seconds * T)
        tokens = self.rng.integers(100, self.vocab - 100, (S, T)).astype(np.int32)
        return Rollouts(tokens=tokens, logprobs=np.full((S, T), -5.0, np.float32), mask=np.ones((S, T), bool),
                        finish_reason=np.asarray(["length"] * S), prompt_index=np.repeat(np.arange(len(prompts)), n),
                        version=version)


def step_seconds(rows, trainer_only: bool = False) -> float:
    """Median over the steps after the first two (compilation) of the step's wall time (the
    sum of its phases), or of the trainer's own phases (no data, rollout or rollout wait)."""
    skip = ("time/data", "time/rollout", "time/rollout_wait") if trainer_only else ()
    times = [sum(v for k, v in r.items() if k.startswith("time/") and k not in skip) for r in rows[2:]]
    return statistics.median(times)


def run(cfg_overrides, policy, out: Path, token_seconds: float) -> list[dict]:
    cfg = load_config(preset="tiny-cpu", overrides=CONFIG + cfg_overrides)
    vocab = policy.model.config.text.vocab_size

    def factory(cfg, policy, place, params, version=0):
        return SleepingEngine(vocab, version, token_seconds)

    run_caspo(cfg, out, policy=policy, progress=False, export=False, engine_factory=factory)
    return read_metrics(out / "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first two are not timed)")
    parser.add_argument("--token-seconds", type=float, default=None,
                        help="rollout sleep per decode step (default: calibrated so rollout = update)")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="caspo_pipeline_jit_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="caspo_pipeline_") as tmp:
        tmp = Path(tmp)
        steps = [f"run.steps={args.steps}"]
        cfg = load_config(preset="tiny-cpu", overrides=CONFIG + steps)
        policy = build_policy(cfg.model, cfg.data)
        T = cfg.data.max_response_len
        calib = run(steps, policy, tmp / "calibrate", 0.0)
        update = step_seconds(calib, trainer_only=True)
        token_seconds = args.token_seconds if args.token_seconds is not None else update / T
        rollout = token_seconds * T
        k0 = run(steps + ["rollout.max_staleness=0"], policy, tmp / "k0", token_seconds)
        k1 = run(steps + ["rollout.max_staleness=1"], policy, tmp / "k1", token_seconds)
        t0, t1 = step_seconds(k0), step_seconds(k1)
        u0, u1 = step_seconds(k0, trainer_only=True), step_seconds(k1, trainer_only=True)
        stale = [r["async/staleness"] for r in k1]
    ideal = max(rollout, update)
    value = t1 / ideal
    print(f"tiny demo model, {args.steps} steps per run (median of steps 3..{args.steps}), "
          f"{cfg.algo.prompts_per_step}x{cfg.algo.group_size} rollouts x {T} tokens, {jax.devices()[0].platform}")
    print(f"update u (trainer phases, calibration run)   {update * 1e3:8.1f} ms")
    print(f"rollout r ({token_seconds * 1e3:.2f} ms/token x {T} tokens)    {rollout * 1e3:8.1f} ms")
    print(f"k=0 step time                                  {t0 * 1e3:8.1f} ms  (r + u = {(rollout + update) * 1e3:.1f};"
          f" its trainer phases {u0 * 1e3:.1f})")
    print(f"k=1 step time                                  {t1 * 1e3:8.1f} ms  (max(r, u) = {ideal * 1e3:.1f};"
          f" its trainer phases {u1 * 1e3:.1f})")
    print(f"k=1 staleness per step: {stale}; k0/k1 step time = {t0 / t1:.2f}x; bench wall "
          f"{time.perf_counter() - start:.0f} s")
    print(f"RESULT name=pipeline value={value:.3f} unit=x goal=<={GOAL} met={'yes' if value <= GOAL else 'no'}")


if __name__ == "__main__":
    main()
