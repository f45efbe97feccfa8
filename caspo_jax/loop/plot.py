"""`caspo plot RUN_DIR...`: PNG figures of the training indicators (the paper's figure 13).

Reads each run's metrics.jsonl and draws figure 13's four panels -- entropy, KL,
response length, gradient norm (the train step's pre-clip global norm, key "grad_norm")
-- the outcome reward, and where logged the share of tokens whose hybrid factor flips the
outcome's sign, the teacher's decision-token discrimination and the P(warning) AUC at each
evaluation, against the step, one line per run (label: the run's
algo.variant and lambda when its config.yaml says so, else the directory name). Writes
one PNG per indicator a run logged and one overview of every panel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from caspo_jax.loop.metrics import read_metrics

__all__ = ["INDICATORS", "indicator_series", "plot_runs", "run_label"]

# (title, metric keys tried in order)
INDICATORS = {
    "entropy": ("Entropy", ("entropy", "rollout_entropy")),
    "kl": ("KL to reference", ("kl",)),
    "response_length": ("Response length (tokens)", ("response_length/mean",)),
    "grad_norm": ("Gradient norm", ("grad_norm",)),
    "reward": ("Outcome reward", ("reward/mean", "loss")),
    "flipped": ("Tokens whose hybrid factor flips the outcome's sign", ("adv/flipped_frac",)),
    "teacher_discrimination": ("Teacher discrimination: decision-token r_t, hazard - safe",
                               ("eval_standard/teacher_discrimination",)),
    "warning_auc": ("P(warning) AUC, hazard vs safe images", ("eval_standard/warning_auc",)),
}


def run_label(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if config.exists():
        try:
            raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            algo = raw.get("algo") or {}
            if "variant" in algo:
                bounded = " nonneg" if algo.get("nonneg_factor") else ""
                return f"{algo['variant']} lambda={algo.get('lam')}{bounded}"
        except yaml.YAMLError:
            pass
    return run_dir.name


def _series(rows: list[dict], keys) -> tuple[np.ndarray, np.ndarray] | None:
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            return np.asarray(steps), np.asarray(values, float)
    return None


def indicator_series(runs, smooth: int = 1) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """{indicator: [(run label, steps_N, values_N)]} of `runs` = [(label, metrics rows)]: the
    curves `plot_runs` draws (a moving average over `smooth` steps), runs without the
    indicator's key left out."""
    out: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for name, (_, keys) in INDICATORS.items():
        out[name] = []
        for label, rows in runs:
            series = _series(rows, keys)
            if series is None:
                continue
            steps, values = series
            if smooth > 1 and len(values) >= smooth:
                values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
                steps = steps[smooth - 1:]
            out[name].append((label, steps, values))
    return out


def plot_runs(run_dirs, out_dir: str | Path | None = None, labels=None, smooth: int = 1) -> list[Path]:
    """Draws the indicators of every run; returns the written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(r) for r in run_dirs]
    runs = []
    for i, run in enumerate(run_dirs):
        path = run / "metrics.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: caspo plot expects run directories of caspo train/sft/dpo")
        runs.append((labels[i] if labels else run_label(run), read_metrics(path)))
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0] / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = indicator_series(runs, smooth)

    def draw(ax, name):
        for label, steps, values in curves[name]:
            ax.plot(steps, values, label=label)
        ax.set_title(INDICATORS[name][0])
        ax.set_xlabel("step")
        if curves[name] and len(runs) > 1:
            ax.legend(fontsize=7)
        return bool(curves[name])

    written = []
    for name in INDICATORS:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if draw(ax, name):
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    columns = 3
    rows_n = -(-len(INDICATORS) // columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(5 * columns, 3.5 * rows_n))
    for ax, name in zip(axes.ravel(), INDICATORS):
        draw(ax, name)
    for ax in axes.ravel()[len(INDICATORS):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = out_dir / "training_indicators.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
