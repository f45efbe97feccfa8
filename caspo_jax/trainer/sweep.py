"""`caspo sweep`: advantage variants x lambdas x seeds from one starting policy; one table, one figure.

On the demo task the starting policy is one shared SFT run (with constitutions), so
every cell differs only in its CASPO settings -- the shape of the paper's table 10
(outcome / token / hybrid and lambda) in miniature. Every cell is evaluated greedily on
the eval split in standard mode (no constitution). Cells: `lambda` is irrelevant to
"outcome" (run once as lambda=0) and to "token" (run once).

Outputs in out_dir: table.md, table.csv (mean and per-seed values), sweep.png, and each
cell's run directory (metrics.jsonl, config.yaml) for `caspo plot`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from caspo_jax.trainer.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict

__all__ = ["sweep_cells", "run_sweep"]

METRICS = ("risk_failure_rate", "over_warning_rate", "reward_mean")


def sweep_cells(variants, lambdas) -> list[tuple[str, float]]:
    cells = []
    for variant in variants:
        if variant == "hybrid":
            cells += [(variant, float(lam)) for lam in lambdas]
        elif variant == "outcome":
            cells.append((variant, 0.0))
        else:
            cells.append((variant, 1.0))
    return cells


def _with(cfg: TrainConfig, *overrides: str) -> TrainConfig:
    return config_from_dict(apply_overrides(config_to_dict(cfg), list(overrides)))


def run_sweep(cfg: TrainConfig, out_dir: str | Path, *, variants=("outcome", "token", "hybrid"),
              lambdas=(0.3, 0.6, 1.0), seeds=(0,), sft_first: bool = True, progress: bool = False) -> list[dict]:
    """Runs every (variant, lambda, seed) cell; returns the table rows."""
    from caspo_jax.demo.run import _evaluate
    from caspo_jax.trainer.caspo import make_reward, run_caspo
    from caspo_jax.trainer.data import prepare_data, with_data_files
    from caspo_jax.trainer.exchange import run_exchange_stage
    from caspo_jax.trainer.setup import build_policy

    out_dir = Path(out_dir)
    files = prepare_data(cfg, out_dir)
    cfg = with_data_files(cfg, files)
    reward = make_reward(cfg.reward)
    start = None
    if sft_first and files.sft is not None:
        sft_dir = out_dir / "sft"
        if (sft_dir / "export" / "config.json").exists():
            start = build_policy(_with(cfg, f"model.path={sft_dir / 'export'}").model, cfg.data)
        else:
            start = run_exchange_stage(cfg, sft_dir, "sft", progress=progress)
    start = start or build_policy(cfg.model, cfg.data)
    baseline = _evaluate(start, cfg, files, reward, modes=("standard",))["standard"]
    rows = [{"variant": "start (SFT)" if sft_first else "start", "lambda": "", "seeds": 0,
             **{m: baseline.get(m, float("nan")) for m in METRICS}}]
    results = {}
    for variant, lam in sweep_cells(variants, lambdas):
        per_seed = []
        for seed in seeds:
            run_dir = out_dir / f"{variant}-lam{lam:g}-seed{seed}"
            cell_cfg = _with(cfg, f"algo.variant={variant}", f"algo.lam={lam}", f"run.seed={seed}",
                             "run.eval_every=0")
            if (run_dir / "result.json").exists():
                result = json.loads((run_dir / "result.json").read_text())
            else:
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                policy = run_caspo(cell_cfg, run_dir, policy=start, progress=progress, export=False)
                result = _evaluate(policy, cell_cfg, files, reward, modes=("standard",))["standard"]
                (run_dir / "result.json").write_text(json.dumps(result))
            per_seed.append(result)
            print(f"sweep {variant} lambda={lam:g} seed={seed}: " +
                  ", ".join(f"{m}={result.get(m, float('nan')):.3f}" for m in METRICS), flush=True)
        results[(variant, lam)] = per_seed
        rows.append({"variant": variant, "lambda": lam, "seeds": len(seeds),
                     **{m: float(np.mean([r.get(m, np.nan) for r in per_seed])) for m in METRICS},
                     **{f"{m}_per_seed": [r.get(m) for r in per_seed] for m in METRICS}})
    _write_table(rows, out_dir)
    _write_figure(rows[1:], out_dir / "sweep.png")
    return rows


def _write_table(rows: list[dict], out_dir: Path) -> None:
    header = ["variant", "lambda", "seeds", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in header)
                     + " |")
    (out_dir / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out_dir / "table.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header + [f"{m}_per_seed" for m in METRICS])
        for r in rows:
            writer.writerow([r[h] for h in header] + [json.dumps(r.get(f"{m}_per_seed", [])) for m in METRICS])
    print("\n".join(lines))


def _write_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['variant']}\nλ={r['lambda']:g}" if r["variant"] == "hybrid" else r["variant"] for r in rows]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.5))
    for ax, metric in zip(axes, METRICS):
        ax.bar(range(len(rows)), [r[metric] for r in rows])
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r[f"{metric}_per_seed"]), r[f"{metric}_per_seed"], color="k", s=8, zorder=3)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(metric.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
