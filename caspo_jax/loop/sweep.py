"""`caspo sweep`: advantage variants x lambdas x seeds from one starting policy; tables, one figure.

The starting policy is one shared SFT run (with constitutions) unless `sft_first=False`,
so every cell differs only in its CASPO settings. Each cell IS the named algo preset of
its variant (`caspo_jax.algo.config.VARIANT_PRESETS`: hybrid = "paper" at the cell's
lambda, outcome = "paper-outr", token = "paper-tokr", batch scope), on top of the run's
own sizes, rates and KL. Cells: `lambda` is irrelevant to "outcome" (run once, as table
10's lambda = 0 row) and to "token" (run once).

Every cell is evaluated greedily on the config's eval split in standard mode with the
run's reward (table.md / table.csv). With `benchmarks` (`SweepBenchmarks`), the start
policy's and every cell's export also go through `caspo eval` (generation with the JAX
engine, the given judge endpoint) on OOD-MMSafe-style records, SIUO and/or MSSBench, and
table10.md / table10.csv give the paper's table 10: rows = the start policy and the cells
(mean over seeds), columns = OOD-MMSafe R/S/E average and zero-score %, SIUO and MSSBench
safe and effective rates %.

Outputs in out_dir: table.md, table.csv (mean and per-seed values), sweep.png,
table10.md/.csv (with benchmarks), and each cell's run directory (metrics.jsonl,
config.yaml for `caspo plot`; export/ and eval/ with benchmarks).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np

from caspo_jax.algo.config import variant_config
from caspo_jax.errors import UserError
from caspo_jax.hf_checkpoint import save_hf_checkpoint
from caspo_jax.evals import cli as eval_cli
from caspo_jax.evals import suites
from caspo_jax.evals.mssbench import paper_rates
from caspo_jax.evals.store import load_records
from caspo_jax.llm.endpoint_spec import parse_endpoint_spec
from caspo_jax.loop.caspo import make_reward, run_caspo
from caspo_jax.loop.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict
from caspo_jax.loop.data import prepare_data, with_data_files
from caspo_jax.loop.evaluate import evaluate_modes
from caspo_jax.loop.setup import build_policy
from caspo_jax.loop.sft_dpo import run_sft

__all__ = ["METRICS", "SweepBenchmarks", "SweepEvalError", "cell_config", "evaluate_export", "run_sweep",
           "sweep_cells", "table10_columns", "table10_row"]

METRICS = ("risk_failure_rate", "over_warning_rate", "reward_mean")


def sweep_cells(variants, lambdas) -> list[tuple[str, float | None]]:
    """(variant, lambda) per cell: one per lambda for hybrid, (outcome, 0.0) (table 10's
    lambda = 0 row; eq. 5 at lambda 0 is the outcome advantage) and (token, None)."""
    cells: list[tuple[str, float | None]] = []
    for variant in variants:
        if variant == "hybrid":
            cells += [(variant, float(lam)) for lam in lambdas]
        elif variant == "outcome":
            cells.append((variant, 0.0))
        else:
            cells.append((variant, None))
    return cells


def _with(cfg: TrainConfig, *overrides: str) -> TrainConfig:
    return config_from_dict(apply_overrides(config_to_dict(cfg), list(overrides)))


def cell_config(cfg: TrainConfig, variant: str, lam: float | None, seed: int) -> TrainConfig:
    """The run config of one cell: cfg's algo with the variant's named preset fields
    (`variant_config`), run.seed = seed, no periodic evaluation."""
    algo = variant_config(cfg.algo, variant, lam if variant == "hybrid" else None)
    return _with(cfg.replace(algo=algo), f"run.seed={seed}", "run.eval_every=0")


def _cell_name(variant: str, lam: float | None, seed: int) -> str:
    return f"{variant}-seed{seed}" if lam is None else f"{variant}-lam{lam:g}-seed{seed}"


# --------------------------------------------------------------------------- table 10


class SweepEvalError(UserError):
    """`caspo eval` of a cell's export failed; its message was printed above."""


@dataclasses.dataclass(frozen=True)
class SweepBenchmarks:
    """What `caspo eval` runs on every export (flags of the same names in `caspo eval`).

    judges: `--judge` specs (name=..,model=..,base_url=..[,api_key_env=..]); records:
    OOD-MMSafe-style SafetyRecord JSONL (evaluated in standard mode); siuo: siuo_gen.json;
    mss: MSSBench combined.json. temperature / max_new_tokens: None keeps `caspo eval`'s
    paper preset (0.9, 4096).
    """

    judges: tuple[str, ...]
    records: str | None = None
    image_root: str | None = None
    siuo: str | None = None
    siuo_images: str | None = None
    siuo_samples: int = 3
    siuo_effective: str = "effective"
    mss: str | None = None
    mss_root: str | None = None
    mss_rates: str = "unsafe_safe"
    temperature: float | None = None
    max_new_tokens: int | None = None
    limit: int | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        if not (self.records or self.siuo or self.mss):
            raise UserError("caspo sweep: benchmarks need --eval-records, --eval-siuo and/or --eval-mss")
        if not self.judges:
            raise UserError("caspo sweep: benchmark evaluation needs --eval-judge name=..,model=..,base_url=.. "
                            "(the OpenAI-compatible judge endpoint)")
        for flag, value in (("--eval-records", self.records), ("--eval-siuo", self.siuo), ("--eval-mss", self.mss)):
            if value is not None and not Path(value).is_file():
                raise UserError(f"caspo sweep {flag} {value}: file not found")
        self.judge_names()  # a bad judge spec fails now, not after the training

    def judge_names(self) -> list[str]:
        try:
            return [parse_endpoint_spec(spec)["name"] for spec in self.judges]
        except ValueError as exc:
            raise UserError(f"caspo sweep --eval-judge: {exc}") from None

    def eval_argv(self, checkpoint: str | Path, out: str | Path) -> list[str]:
        """`caspo eval` arguments that evaluate the HF directory `checkpoint` into `out`."""
        argv = ["--out", str(out), "--engine", "jax", "--checkpoint", str(checkpoint), "--modes", "standard",
                "--no-progress", "--siuo-samples", str(self.siuo_samples), "--siuo-effective", self.siuo_effective,
                "--mss-rates", self.mss_rates]
        for spec in self.judges:
            argv += ["--judge", spec]
        for flag, value in (("--records", self.records), ("--image-root", self.image_root), ("--siuo", self.siuo),
                            ("--siuo-images", self.siuo_images), ("--mss", self.mss), ("--mss-root", self.mss_root),
                            ("--temperature", self.temperature), ("--max-new-tokens", self.max_new_tokens),
                            ("--limit", self.limit), ("--cache-dir", self.cache_dir)):
            if value is not None:
                argv += [flag, str(value)]
        return argv


def table10_columns(bench: SweepBenchmarks) -> list[str]:
    """Table 10's columns for the benchmarks given, in the paper's order."""
    columns = []
    if bench.records:
        columns += [f"ood_{x}_{k}" for x in "RSE" for k in ("A", "0")]
    if bench.siuo:
        columns += ["siuo_safe", "siuo_effective"]
    if bench.mss:
        columns += ["mss_safe", "mss_effective"]
    return columns


def table10_row(results_path: str | Path, bench: SweepBenchmarks) -> dict[str, float]:
    """One row of table 10 from a `caspo eval` results file: OOD-MMSafe standard mode X_A
    (0..2) and X_0 (%, per judge then averaged); SIUO and MSSBench (all tasks) safe and
    effective rates (%), averaged over the judges."""
    records = load_records(Path(results_path))
    judges = bench.judge_names()
    row: dict[str, float] = {}
    if bench.records:
        summaries, _ = suites.ood_summaries(records, judges, ["standard"])
        dims = summaries["standard"].dims if "standard" in summaries else {}
        for dim, letter in (("risk", "R"), ("safety", "S"), ("effectiveness", "E")):
            stats = dims.get(dim)
            row[f"ood_{letter}_A"] = stats.mean if stats else math.nan
            row[f"ood_{letter}_0"] = stats.zero_rate_per_judge if stats else math.nan
    if bench.siuo:
        rates = suites.siuo_summary(records, judges, effective_rate=bench.siuo_effective)
        row["siuo_safe"] = float(np.mean([rates[j].safe_rate for j in judges]))
        row["siuo_effective"] = float(np.mean([rates[j].effective_rate for j in judges]))
    if bench.mss:
        accuracy = suites.mss_summary(records, judges)
        pairs = [paper_rates(accuracy[j]["all"], bench.mss_rates) if "all" in accuracy[j] else (math.nan, math.nan)
                 for j in judges]
        row["mss_safe"] = float(np.mean([p[0] for p in pairs]))
        row["mss_effective"] = float(np.mean([p[1] for p in pairs]))
    return row


def evaluate_export(bench: SweepBenchmarks, checkpoint: str | Path, out: str | Path) -> dict[str, float]:
    """`caspo eval` of `checkpoint` into `out` (resumable: a rerun skips finished items),
    then its table-10 row. The row is kept in out/table10_row.json with the arguments
    that produced it, so a rerun of the sweep with the same benchmarks does not reload
    the checkpoint."""
    out = Path(out)
    argv = bench.eval_argv(checkpoint, out)
    saved = out / "table10_row.json"
    if saved.exists():
        kept = json.loads(saved.read_text(encoding="utf-8"))
        if kept.get("argv") == argv:
            return kept["row"]
    parser = argparse.ArgumentParser(prog="caspo eval")
    eval_cli.add_arguments(parser)
    if eval_cli.run(parser.parse_args(argv)) != 0:
        raise SweepEvalError(f"caspo eval of {checkpoint} failed (its message is above); rerun caspo sweep with "
                             f"the same --out to resume")
    row = table10_row(out / "results.jsonl", bench)
    saved.write_text(json.dumps({"argv": argv, "row": row}), encoding="utf-8")
    return row


def _start_export(start, cfg: TrainConfig, sft_dir: Path | None, out_dir: Path) -> Path:
    """An HF directory of the start policy: the SFT export, model.path, or a fresh export."""
    if sft_dir is not None and (sft_dir / "export" / "config.json").exists():
        return sft_dir / "export"
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    directory = out_dir / "start" / "export"
    if not (directory / "config.json").exists():
        save_hf_checkpoint(start.model, start.params, start.processor, directory)
    return directory


# --------------------------------------------------------------------------- the sweep


def run_sweep(cfg: TrainConfig, out_dir: str | Path, *, variants=("outcome", "token", "hybrid"),
              lambdas=(0.3, 0.6, 1.0), seeds=(0,), sft_first: bool = True, progress: bool = False,
              benchmarks: SweepBenchmarks | None = None) -> list[dict]:
    """Runs every (variant, lambda, seed) cell; returns the table rows (table 10's with
    `benchmarks`, else the eval-split metrics)."""
    out_dir = Path(out_dir)
    files = prepare_data(cfg, out_dir)
    cfg = with_data_files(cfg, files)
    reward = make_reward(cfg.reward)
    start, sft_dir = None, None
    if sft_first and files.sft is not None:
        sft_dir = out_dir / "sft"
        if (sft_dir / "export" / "config.json").exists():
            start = build_policy(_with(cfg, f"model.path={sft_dir / 'export'}").model, cfg.data)
        else:
            start = run_sft(cfg, sft_dir, progress=progress)
    start = start or build_policy(cfg.model, cfg.data)
    start_label = "start (SFT)" if sft_dir is not None else "start"

    def evaluate(policy, cell_cfg) -> dict:
        if files.eval is None:
            return {}
        return evaluate_modes(policy, cell_cfg, files, reward, modes=("standard",))["standard"]

    baseline = evaluate(start, cfg)
    rows = [{"variant": start_label, "lambda": "", "seeds": 0, **{m: baseline.get(m, math.nan) for m in METRICS}}]
    table10 = []
    if benchmarks is not None:
        row = evaluate_export(benchmarks, _start_export(start, cfg, sft_dir, out_dir), out_dir / "start" / "eval")
        table10.append({"variant": start_label, "lambda": "", "seeds": 0, **row})
    for variant, lam in sweep_cells(variants, lambdas):
        per_seed, per_seed10 = [], []
        for seed in seeds:
            run_dir = out_dir / _cell_name(variant, lam, seed)
            cell_cfg = cell_config(cfg, variant, lam, seed)
            done = (run_dir / "result.json").exists() and (
                benchmarks is None or (run_dir / "export" / "config.json").exists())
            if done:
                result = json.loads((run_dir / "result.json").read_text())
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                policy = run_caspo(cell_cfg, run_dir, policy=start, progress=progress, export=benchmarks is not None)
                result = evaluate(policy, cell_cfg)
                (run_dir / "result.json").write_text(json.dumps(result))
            per_seed.append(result)
            if benchmarks is not None:
                per_seed10.append(evaluate_export(benchmarks, run_dir / "export", run_dir / "eval"))
            shown = {**result, **(per_seed10[-1] if per_seed10 else {})}
            print(f"sweep {_cell_name(variant, lam, seed)}: " +
                  ", ".join(f"{m}={v:.3f}" for m, v in shown.items() if isinstance(v, (int, float))), flush=True)
        label = "" if lam is None else lam
        rows.append({"variant": variant, "lambda": label, "seeds": len(seeds),
                     **{m: _mean([r.get(m, math.nan) for r in per_seed]) for m in METRICS},
                     **{f"{m}_per_seed": [r.get(m) for r in per_seed] for m in METRICS}})
        if benchmarks is not None:
            table10.append({"variant": variant, "lambda": label, "seeds": len(seeds),
                            **{c: _mean([r.get(c, math.nan) for r in per_seed10])
                               for c in table10_columns(benchmarks)},
                            **{f"{c}_per_seed": [r.get(c) for r in per_seed10] for c in table10_columns(benchmarks)}})
    _write_table(rows, out_dir)
    _write_figure(rows[1:], out_dir / "sweep.png")
    if benchmarks is not None:
        _write_table10(table10, table10_columns(benchmarks), out_dir)
        return table10
    return rows


def _mean(values) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value) if value != "" else "-"


def _write_table(rows: list[dict], out_dir: Path) -> None:
    header = ["variant", "lambda", "seeds", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[h]) for h in header) + " |")
    (out_dir / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out_dir / "table.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header + [f"{m}_per_seed" for m in METRICS])
        for r in rows:
            writer.writerow([r[h] for h in header] + [json.dumps(r.get(f"{m}_per_seed", [])) for m in METRICS])
    print("\n".join(lines))


# table-10 column -> (benchmark heading, metric heading, decimals)
_TABLE10_HEAD = {
    **{f"ood_{x}_A": ("OOD-MMSafe", f"{x}_A", 2) for x in "RSE"},
    **{f"ood_{x}_0": ("OOD-MMSafe", f"{x}_0 %", 1) for x in "RSE"},
    "siuo_safe": ("SIUO", "safe %", 1), "siuo_effective": ("SIUO", "effective %", 1),
    "mss_safe": ("MSSBench", "safe %", 1), "mss_effective": ("MSSBench", "effective %", 1),
}


def _write_table10(rows: list[dict], columns: list[str], out_dir: Path) -> None:
    """table10.md (the paper's layout: a row per lambda, benchmark x metric columns) and
    table10.csv (the same numbers unrounded, plus per-seed values)."""
    header = ["variant", "lambda", "seeds"] + [" ".join(_TABLE10_HEAD[c][:2]) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = [_cell(r["variant"]), _cell(r["lambda"]), str(r["seeds"])]
        for c in columns:
            v = r.get(c, math.nan)
            values.append("-" if v is None or math.isnan(v) else f"{v:.{_TABLE10_HEAD[c][2]}f}")
        lines.append("| " + " | ".join(values) + " |")
    note = ("OOD-MMSafe: standard mode, X_A = mean score (0-2), X_0 = % of zero scores (per judge, averaged); "
            "SIUO / MSSBench: safe and effective rates in %. Cells: mean over seeds (per seed in table10.csv).")
    (out_dir / "table10.md").write_text("\n".join(lines) + "\n\n" + note + "\n", encoding="utf-8")
    with (out_dir / "table10.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "lambda", "seeds", *columns, *[f"{c}_per_seed" for c in columns]])
        for r in rows:
            writer.writerow([r["variant"], r["lambda"], r["seeds"], *[r.get(c) for c in columns],
                             *[json.dumps(r.get(f"{c}_per_seed", [])) for c in columns]])
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
            points = [math.nan if v is None else v for v in r[f"{metric}_per_seed"]]
            ax.scatter([i] * len(points), points, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(metric.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
