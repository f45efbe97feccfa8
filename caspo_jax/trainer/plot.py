"""`caspo plot RUN_DIR...`: PNG figures of the training indicators (the paper's figure 13).

Reads each run's metrics.jsonl and draws entropy, KL, response length and outcome reward
against the step, one line per run (label: the run's algo.variant and lambda when its
config.yaml says so, else the directory name). Writes one PNG per indicator and one
2x2 overview.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from caspo_jax.trainer.metrics import read_metrics

__all__ = ["INDICATORS", "plot_runs", "run_label"]

# (title, metric keys tried in order)
INDICATORS = {
    "entropy": ("Entropy", ("entropy", "rollout_entropy")),
    "kl": ("KL to reference", ("kl",)),
    "response_length": ("Response length (tokens)", ("response_length/mean",)),
    "reward": ("Outcome reward", ("reward/mean", "loss")),
}


def run_label(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if config.exists():
        try:
            raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            algo = raw.get("algo") or {}
            if "variant" in algo:
                return f"{algo['variant']} lambda={algo.get('lam')}"
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

    def draw(ax, keys, title):
        drawn = False
        for label, rows in runs:
            series = _series(rows, keys)
            if series is None:
                continue
            steps, values = series
            if smooth > 1 and len(values) >= smooth:
                values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
                steps = steps[smooth - 1:]
            ax.plot(steps, values, label=label)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        if drawn and len(runs) > 1:
            ax.legend(fontsize=7)
        return drawn

    written = []
    for name, (title, keys) in INDICATORS.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if draw(ax, keys, title):
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, (title, keys)) in zip(axes.ravel(), INDICATORS.items()):
        draw(ax, keys, title)
    fig.tight_layout()
    path = out_dir / "training_indicators.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
