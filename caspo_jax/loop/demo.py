"""`caspo demo`: SFT with constitutions, then CASPO without them, then the risk-failure table.

1. SFT of the tiny model on the demo task with the constitution in the prompt (the
   paper's SFT stage), kept short on purpose: it teaches the answer format and only part
   of the hazard cue, as a small SFT set does.
2. Evaluation of the SFT policy: standard mode (no constitution) and constitution mode.
3. CASPO on the same prompts WITHOUT constitutions in the student prompt (the teacher
   pass alone sees them), from the SFT policy.
4. Evaluation again, a table of risk-failure rates (share of hazard cases with no
   warning), results.json, and the training-indicator plots.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from caspo_jax.loop.caspo import make_reward, run_caspo
from caspo_jax.loop.config import TrainConfig, load_config
from caspo_jax.loop.data import prepare_data, with_data_files
from caspo_jax.loop.evaluate import evaluate_modes
from caspo_jax.loop.plot import plot_runs
from caspo_jax.loop.sft_dpo import run_sft

__all__ = ["QUICK", "demo_config", "run_demo"]

# --quick: a smoke-sized run (seconds after compilation) for tests and first contact.
QUICK = ["model.tiny=test", "data.demo_train=24", "data.demo_eval=12", "data.max_response_len=8",
         "algo.prompts_per_step=2", "algo.group_size=2", "optim.minibatch_size=4", "run.steps=2",
         "run.save_every=0", "run.eval_every=0", "sft.steps=2", "sft.batch_size=4"]


def demo_config(preset: str = "tiny-cpu", path=None, overrides=(), quick: bool = False) -> TrainConfig:
    overrides = (QUICK if quick else []) + list(overrides)
    return load_config(preset=preset, path=path, overrides=overrides)


def _table(before: dict, after: dict) -> str:
    rows = [("risk-failure rate, standard mode", "standard", "risk_failure_rate"),
            ("risk-failure rate, constitution mode", "constitution", "risk_failure_rate"),
            ("over-warning rate, standard mode", "standard", "over_warning_rate"),
            ("help rate, standard mode", "standard", "help_rate"),
            ("outcome reward, standard mode (max 1.5)", "standard", "reward_mean")]
    lines = ["| metric | after SFT | after CASPO |", "|---|---|---|"]
    for name, mode, key in rows:
        lines.append(f"| {name} | {before[mode][key]:.3f} | {after[mode][key]:.3f} |")
    return "\n".join(lines)


def run_demo(cfg: TrainConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Runs the whole demo; returns (and writes to out_dir/results.json) the numbers."""
    out_dir = Path(out_dir)
    for stage in ("sft", "caspo"):  # a rerun replaces the demo's own previous stages
        if (out_dir / stage / "config.yaml").exists():
            shutil.rmtree(out_dir / stage)
    start = time.perf_counter()
    files = prepare_data(cfg, out_dir)
    cfg = with_data_files(cfg, files)
    reward = make_reward(cfg.reward)
    print("[1/4] SFT with constitutions in the prompt", flush=True)
    sft_cfg = cfg.replace(sft=dataclasses.replace(cfg.sft, with_constitution=True))
    policy = run_sft(sft_cfg, out_dir / "sft", progress=progress, export=False)
    t_sft = time.perf_counter() - start
    print("[2/4] evaluating the SFT policy", flush=True)
    before = evaluate_modes(policy, cfg, files, reward)
    print("[3/4] CASPO without constitutions (teacher pass only)", flush=True)
    policy = run_caspo(cfg, out_dir / "caspo", policy=policy, progress=progress)
    t_rl = time.perf_counter() - start - t_sft
    print("[4/4] evaluating the CASPO policy", flush=True)
    after = evaluate_modes(policy, cfg, files, reward)
    plots = plot_runs([out_dir / "caspo"], out_dir / "plots")
    table = _table(before, after)
    results = {"before": before, "after": after, "seconds": {"sft": t_sft, "caspo": t_rl,
                                                              "total": time.perf_counter() - start},
               "plots": [str(p) for p in plots], "export": str(out_dir / "caspo" / "export")}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    print("\n" + table)
    print(f"\nwall time {results['seconds']['total']:.0f} s; plots in {out_dir / 'plots'}; "
          f"policy exported to {results['export']}")
    return results
