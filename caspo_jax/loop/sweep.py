"""`caspo sweep`: advantage cells x seeds from one starting policy; a table with intervals, one figure.

The starting policy is one shared SFT run (with constitutions) unless `sft_first=False`,
so every cell differs only in its CASPO settings. Each cell IS the named algo preset of
its variant (`caspo_jax.algo.config.VARIANT_PRESETS`: hybrid = "paper" at the cell's
lambda, outcome = "paper-outr", token = "paper-tokr", batch scope), on top of the run's
own sizes, rates and KL, plus the cell's `nonneg_factor`. The default cells are table 10
in miniature (`DEFAULT_CELLS`: outcome, token, hybrid at lambda 0.1 / 0.3 / 0.6 / 1.0,
hybrid 0.3 with the factor bounded at 0), 8 seeds each (`DEFAULT_SEEDS`).

Every (cell, seed) is evaluated on the config's eval split in standard mode with the
run's reward: greedy rates, the teacher-forced P(warning) readout and its AUC, the
teacher's decision-token discrimination (`caspo_jax.loop.evaluate`), plus the run's
late-training entropy and sign-flip share (`run_summary`). table.md shows the mean and
a 95% t interval over seeds (`caspo_jax.loop.stats.mean_interval`), table.csv every
seed too. `run_study` repeats the sweep under the demo's (start, teacher) conditions.
With `benchmarks` (`SweepBenchmarks`), the start
policy's and every cell's export also go through `caspo eval` (generation with the JAX
engine, the given judge endpoint) on OOD-MMSafe-style records, SIUO and/or MSSBench, and
table10.md / table10.csv give the paper's table 10: rows = the start policy and the cells
(mean over seeds), columns = OOD-MMSafe R/S/E average and zero-score %, SIUO and MSSBench
safe and effective rates %.

Outputs in out_dir: table.md, table.csv (mean, interval, per-seed values), sweep.png,
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

from caspo_jax.algo.config import VARIANT_PRESETS, variant_config
from caspo_jax.demo.task import DEMO_STARTS, DEMO_TEACHERS
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
from caspo_jax.loop.metrics import read_metrics
from caspo_jax.loop.setup import build_policy
from caspo_jax.loop.sft_dpo import run_sft
from caspo_jax.loop.stats import mean_interval

__all__ = ["DEFAULT_CELLS", "DEFAULT_SEEDS", "DIAGNOSTICS", "METRICS", "STUDY_CELLS", "Cell", "SweepBenchmarks",
           "SweepEvalError", "cell_config", "evaluate_export", "run_study", "run_summary", "run_sweep",
           "table10_columns", "table10_row"]

# The table's metrics: eval split, standard mode (`evaluate_policy`), and what the run logged.
METRICS = ("risk_failure_rate", "over_warning_rate", "warning_auc", "reward_mean")
DIAGNOSTICS = ("p_warning_hazard", "p_warning_safe", "first_token_auc", "teacher_discrimination", "rollout_entropy",
               "adv/flipped_frac")
# columns that live in [0, 1]: their intervals are cut there
UNIT_COLUMNS = ("risk_failure_rate", "over_warning_rate", "warning_auc", "p_warning_hazard", "p_warning_safe",
                "first_token_auc", "adv/flipped_frac")
UNIT_RANGE = (0.0, 1.0)
# training metrics summarised per run: the mean of the last LAST_STEPS steps
LAST_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Cell:
    """One advantage setting of a sweep: `variant` ("outcome" | "token" | "hybrid"), its
    lambda (hybrid; outcome is table 10's lambda = 0 row; token has none) and whether
    the hybrid factor is bounded at 0 (`CaspoConfig.nonneg_factor`)."""

    variant: str
    lam: float | None = None
    nonneg: bool = False

    def __post_init__(self):
        if self.variant not in VARIANT_PRESETS:
            raise UserError(f"sweep cell {self.variant!r}: the variant must be one of {sorted(VARIANT_PRESETS)}")
        if self.variant == "hybrid" and (self.lam is None or self.lam < 0):
            raise UserError(f"sweep cell hybrid: lambda must be given and >= 0, got {self.lam}")
        if self.nonneg and self.variant != "hybrid":
            raise UserError("sweep cell: nonneg applies to the hybrid factor only")

    @classmethod
    def parse(cls, spec: str) -> Cell:
        """"outcome", "token", "hybrid:0.3" or "hybrid:0.3:nonneg"."""
        parts = spec.split(":")
        try:
            if parts[0] == "hybrid" and len(parts) in (2, 3) and parts[2:] in ([], ["nonneg"]):
                return cls("hybrid", float(parts[1]), len(parts) == 3)
            if parts in (["outcome"], ["token"]):
                return cls(parts[0], 0.0 if parts[0] == "outcome" else None)
        except ValueError:
            pass
        raise UserError(f"caspo sweep --cells {spec!r}: write outcome, token, hybrid:LAMBDA (LAMBDA >= 0) or "
                        "hybrid:LAMBDA:nonneg (e.g. hybrid:0.3)")

    @property
    def label(self) -> str:
        return self.variant + (" (nonneg)" if self.nonneg else "")

    def run_name(self, seed: int) -> str:
        lam = "" if self.variant != "hybrid" else f"-lam{self.lam:g}"
        return f"{self.variant}{lam}{'-nonneg' if self.nonneg else ''}-seed{seed}"


# Table 10 in miniature: outcome only, token only (the paper's batch scope), the hybrid at
# four lambdas, and the hybrid with its factor bounded at 0.
DEFAULT_CELLS = (Cell("outcome", 0.0), Cell("token"), *(Cell("hybrid", lam) for lam in (0.1, 0.3, 0.6, 1.0)),
                 Cell("hybrid", 0.3, nonneg=True))
STUDY_CELLS = (Cell("outcome", 0.0), Cell("hybrid", 0.3), Cell("token"))
DEFAULT_SEEDS = tuple(range(8))


def _with(cfg: TrainConfig, *overrides: str) -> TrainConfig:
    return config_from_dict(apply_overrides(config_to_dict(cfg), list(overrides)))


def cell_config(cfg: TrainConfig, cell: Cell, seed: int) -> TrainConfig:
    """The run config of one cell: cfg's algo with the variant's named preset fields
    (`variant_config`), the cell's nonneg_factor, run.seed = seed, no periodic evaluation."""
    algo = variant_config(cfg.algo, cell.variant, cell.lam if cell.variant == "hybrid" else None)
    return _with(cfg.replace(algo=algo.replace(nonneg_factor=cell.nonneg)), f"run.seed={seed}", "run.eval_every=0")


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


def run_summary(run_dir: Path, last: int = LAST_STEPS) -> dict[str, float]:
    """Training diagnostics of one run from its metrics.jsonl: the mean of the last `last`
    steps' rollout entropy and sign-flip share, and the flip share over the whole run."""
    rows = read_metrics(run_dir / "metrics.jsonl")

    def mean(key, chosen):
        values = [float(r[key]) for r in chosen if isinstance(r.get(key), (int, float))]
        return float(np.mean(values)) if values else math.nan

    return {"rollout_entropy": mean("rollout_entropy", rows[-last:]),
            "adv/flipped_frac": mean("adv/flipped_frac", rows[-last:]),
            "adv/flipped_frac_all_steps": mean("adv/flipped_frac", rows), "kl": mean("kl", rows[-last:])}


def _start_policy(cfg: TrainConfig, out_dir: Path, files, sft_first: bool, progress: bool):
    """(policy, sft_dir): the shared start of every cell: one SFT run (reused when its
    export exists) or, without SFT data or with sft_first False, model.path / the tiny model."""
    if sft_first and files.sft is not None:
        sft_dir = out_dir / "sft"
        if (sft_dir / "export" / "config.json").exists():
            return build_policy(_with(cfg, f"model.path={sft_dir / 'export'}").model, cfg.data), sft_dir
        return run_sft(cfg, sft_dir, progress=progress), sft_dir
    return build_policy(cfg.model, cfg.data), None


def _cell_row(cell: Cell | None, label: str, per_seed: list[dict], columns) -> dict:
    """A table row: per column the mean and 95% interval over seeds (`mean_interval`) and
    the per-seed values."""
    row = {"cell": label, "variant": cell.variant if cell else label, "lambda": "" if cell is None or cell.lam is None
           else cell.lam, "nonneg": bool(cell and cell.nonneg), "seeds": len(per_seed)}
    for c in columns:
        values = [r.get(c, math.nan) for r in per_seed]
        row[c] = mean_interval(values, bounds=UNIT_RANGE if c in UNIT_COLUMNS else None)
        row[f"{c}_per_seed"] = values
    return row


def run_sweep(cfg: TrainConfig, out_dir: str | Path, *, cells=DEFAULT_CELLS, seeds=DEFAULT_SEEDS,
              sft_first: bool = True, progress: bool = False, benchmarks: SweepBenchmarks | None = None,
              write_outputs: bool = True) -> list[dict]:
    """Runs every (cell, seed) from one shared start policy; returns the table rows (table
    10's with `benchmarks`, else the eval-split metrics: mean, 95% interval, per seed).

    Each (cell, seed) run keeps result.json in its directory, so a rerun with the same
    out_dir resumes at the first unfinished run. Seeds run one after another in this
    process: their compiled programs are shared (the CLI also keeps XLA's persistent
    compilation cache in --compile-cache). write_outputs False: the rows only, no table
    or figure (`run_study` writes its own).
    """
    out_dir = Path(out_dir)
    files = prepare_data(cfg, out_dir)
    cfg = with_data_files(cfg, files)
    reward = make_reward(cfg.reward)
    start, sft_dir = _start_policy(cfg, out_dir, files, sft_first, progress)
    start_label = "start (SFT)" if sft_dir is not None else "start"

    def evaluate(policy, cell_cfg) -> dict:
        if files.eval is None:
            return {}
        return evaluate_modes(policy, cell_cfg, files, reward, modes=("standard",))["standard"]

    saved = out_dir / "start_result.json"
    baseline = json.loads(saved.read_text()) if saved.exists() else evaluate(start, cfg)
    saved.write_text(json.dumps(baseline))
    columns = METRICS + DIAGNOSTICS
    rows = [_cell_row(None, start_label, [baseline], columns)]
    table10 = []
    if benchmarks is not None:
        row = evaluate_export(benchmarks, _start_export(start, cfg, sft_dir, out_dir), out_dir / "start" / "eval")
        table10.append({"variant": start_label, "lambda": "", "seeds": 0, **row})
    for cell in cells:
        per_seed, per_seed10 = [], []
        for seed in seeds:
            run_dir = out_dir / cell.run_name(seed)
            done = (run_dir / "result.json").exists() and (
                benchmarks is None or (run_dir / "export" / "config.json").exists())
            if done:
                result = json.loads((run_dir / "result.json").read_text())
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                policy = run_caspo(cell_config(cfg, cell, seed), run_dir, policy=start, progress=progress,
                                   export=benchmarks is not None)
                result = {**evaluate(policy, cfg), **run_summary(run_dir)}
                (run_dir / "result.json").write_text(json.dumps(result))
            per_seed.append(result)
            if benchmarks is not None:
                per_seed10.append(evaluate_export(benchmarks, run_dir / "export", run_dir / "eval"))
            shown = {**{k: result.get(k, math.nan) for k in columns}, **(per_seed10[-1] if per_seed10 else {})}
            print(f"sweep {cell.run_name(seed)}: " + ", ".join(f"{m}={v:.3f}" for m, v in shown.items()), flush=True)
        rows.append(_cell_row(cell, cell.label, per_seed, columns))
        if benchmarks is not None:
            columns10 = table10_columns(benchmarks)
            table10.append({"variant": cell.label, "lambda": "" if cell.lam is None else cell.lam,
                            "seeds": len(seeds),
                            **{c: mean_interval([r.get(c, math.nan) for r in per_seed10]).mean for c in columns10},
                            **{f"{c}_per_seed": [r.get(c) for r in per_seed10] for c in columns10}})
    if not write_outputs:
        return rows
    _write_table(rows, columns, out_dir)
    _write_figure(rows, METRICS + ("teacher_discrimination", "rollout_entropy"), out_dir / "sweep.png")
    if benchmarks is not None:
        _write_table10(table10, table10_columns(benchmarks), out_dir)
        return table10
    return rows


def run_study(cfg: TrainConfig, out_dir: str | Path, *, cells=STUDY_CELLS, seeds=DEFAULT_SEEDS,
              starts=DEMO_STARTS, teachers=DEMO_TEACHERS, progress: bool = False) -> dict[str, list[dict]]:
    """The demo sweep under every (start, teacher) condition (`data.demo_start`,
    `data.demo_teacher`): each its own data, SFT and cells in out_dir/<start>-<teacher>,
    except the default condition (suppressed, discriminating), which is out_dir itself: a
    study after `caspo sweep` with the same --out reuses that table's runs of the same
    cells and seeds. Then study.md / study.csv (condition x cell x metric) and study.png.
    Demo data only."""
    if cfg.data.train is not None:
        raise UserError("caspo sweep --study varies the demo task's SFT rows; it needs the built-in demo data "
                        "(leave data.train / data.sft unset)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {}
    for start in starts:
        for teacher in teachers:
            name = f"{start}-{teacher}"
            print(f"study: condition {name}", flush=True)
            condition = _with(cfg, f"data.demo_start={start}", f"data.demo_teacher={teacher}")
            default = (start, teacher) == (DEMO_STARTS[0], DEMO_TEACHERS[0])
            tables[name] = run_sweep(condition, out_dir if default else out_dir / name, cells=cells, seeds=seeds,
                                     progress=progress, write_outputs=False)
    columns = METRICS + DIAGNOSTICS
    lines = ["| start | teacher | cell | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 3)]
    for name, rows in tables.items():
        start, teacher = name.split("-", 1)
        for r in rows:
            lines.append(f"| {start} | {teacher} | {_cell_label(r)} | " + " | ".join(str(r[c]) for c in columns) + " |")
    note = f"mean [95% interval] over {len(seeds)} seeds; metrics as in each condition's table.md"
    (out_dir / "study.md").write_text("\n".join(lines) + "\n\n" + note + "\n", encoding="utf-8")
    with (out_dir / "study.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["start", "teacher", "cell", *[f"{c}_{k}" for c in columns for k in ("mean", "low", "high")]])
        for name, rows in tables.items():
            for r in rows:
                writer.writerow([*name.split("-", 1), _cell_label(r),
                                 *[v for c in columns for v in (r[c].mean, r[c].low, r[c].high)]])
    print("\n".join(lines))
    _write_study_figure(tables, METRICS, out_dir / "study.png")
    return tables


def _cell_label(row: dict) -> str:
    lam = row["lambda"]
    return row["cell"] + ("" if lam == "" or row["variant"] == "outcome" else f" λ={lam:g}")


def _write_table(rows: list[dict], columns, out_dir: Path) -> None:
    """table.md (mean [95% interval] per cell and column) and table.csv (mean, low, high
    and the per-seed values)."""
    lines = [
        "| cell | seeds | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for r in rows:
        lines.append(f"| {_cell_label(r)} | {r['seeds']} | " + " | ".join(str(r[c]) for c in columns) + " |")
    lines += ["", ("mean [95% t interval] over seeds; eval split, standard mode, greedy; entropy and flip "
                   f"share: mean of the last {LAST_STEPS} training steps")]
    (out_dir / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out_dir / "table.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "lambda", "nonneg", "seeds", *[f"{c}_{k}" for c in columns for k in
                                                                   ("mean", "low", "high")],
                         *[f"{c}_per_seed" for c in columns]])
        for r in rows:
            writer.writerow([r["variant"], r["lambda"], r["nonneg"], r["seeds"],
                             *[v for c in columns for v in (r[c].mean, r[c].low, r[c].high)],
                             *[json.dumps(r[f"{c}_per_seed"]) for c in columns]])
    print("\n".join(lines))


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value) if value != "" else "-"


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


def _error_bars(ax, positions, rows, column, **style):
    means = [r[column].mean for r in rows]
    low = [0 if math.isnan(r[column].low) else r[column].mean - r[column].low for r in rows]
    high = [0 if math.isnan(r[column].high) else r[column].high - r[column].mean for r in rows]
    ax.bar(positions, means, yerr=[low, high], capsize=3, **style)


def _write_figure(rows: list[dict], columns, path: Path) -> None:
    """One panel per column: a bar per cell (mean), its 95% interval, and every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_cell_label(r).replace(" (nonneg)", " nonneg").replace(" ", "\n", 1) for r in rows]
    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.ravel()[len(columns):]:
        ax.set_visible(False)
    for ax, column in zip(axes.ravel(), columns):
        _error_bars(ax, range(len(rows)), rows, column, color="#8fb3d9")
        for i, r in enumerate(rows):
            points = [math.nan if v is None else v for v in r[f"{column}_per_seed"]]
            ax.scatter([i] * len(points), points, color="k", s=7, zorder=3, alpha=0.6)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(column.replace("_", " "), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_study_figure(tables: dict[str, list[dict]], columns, path: Path) -> None:
    """Grouped bars: per metric, the cells (groups) under each condition (bars), with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tables)
    cells = [r for r in next(iter(tables.values()))]
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.8))
    for ax, column in zip(axes, columns):
        for k, name in enumerate(names):
            positions = [i + (k - (len(names) - 1) / 2) * width for i in range(len(cells))]
            _error_bars(ax, positions, tables[name], column, width=width, label=name)
        ax.set_xticks(range(len(cells)), [_cell_label(r).replace(" ", "\n", 1) for r in cells], fontsize=6)
        ax.set_title(column.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
