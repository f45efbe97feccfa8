"""Per-step metrics: JSONL (the source of truth `caspo plot` reads), TensorBoard, a console bar.

Phase timings come from `PhaseTimer`; `mfu` estimates model-FLOPs utilisation from the
parameter count (6 N FLOPs per trained token, 2 N per scored or generated token, the
usual dense-transformer estimate, attention ignored) and the accelerator's peak.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from caspo_jax.distributed import is_primary

__all__ = ["PROGRESS_METRICS", "MetricsWriter", "NullWriter", "PhaseTimer", "count_params", "mfu", "open_writer",
           "peak_flops", "read_metrics"]

# Dense peak FLOP/s per device (bfloat16 where the chip has it). CPU: this project's
# measured float32 matmul ceiling on the 2-core dev box (shared/notes/offline-tiny-models.md).
_PEAK = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5e": 197e12, "v5p": 459e12, "v4": 275e12,
         "v6e": 918e12, "l4": 121e12, "a10": 125e12, "cpu": 0.29e12}


def peak_flops(device=None) -> float:
    device = device or jax.devices()[0]
    kind = (getattr(device, "device_kind", "") or device.platform).lower()
    for key, value in _PEAK.items():
        if key in kind:
            return value
    return _PEAK["cpu"] if device.platform == "cpu" else 100e12


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def mfu(n_params: int, trained_tokens: float, scored_tokens: float, seconds: float, n_devices: int | None = None,
        peak: float | None = None) -> float:
    """Model FLOPs / (seconds * peak * devices): 6N per trained token, 2N per scored one."""
    if seconds <= 0:
        return 0.0
    flops = n_params * (6.0 * trained_tokens + 2.0 * scored_tokens)
    n_devices = n_devices or jax.device_count()
    if peak is None:
        peak = peak_flops()
        if jax.devices()[0].platform == "cpu":
            n_devices = 1  # simulated CPU devices share the same cores
    return flops / (seconds * peak * n_devices)


class PhaseTimer:
    """`with timer("rollout"): ...` accumulates wall seconds per phase into `timer.seconds`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def _plain(value):
    try:
        value = float(np.asarray(value))
    except (TypeError, ValueError):
        return value
    return value if math.isfinite(value) else None


# What the console bar shows of a step's metrics (absent or null ones are left out), and
# under which label: "failed" is the share of prompt groups whose reward failed, so a run
# whose judge is down shows it at once instead of a bar of zero losses.
PROGRESS_METRICS = {"reward/mean": "reward", "reward/failed_group_frac": "failed", "loss": "loss", "kl": "kl",
                    "entropy": "entropy"}


class MetricsWriter:
    """Appends one JSON object per step to run_dir/metrics.jsonl and scalars to run_dir/tb.

    On resume (`resume_step`), lines of steps after the checkpoint are dropped first, so
    the file always describes the one history that led to the current state.
    """

    def __init__(self, run_dir: str | Path, *, name: str = "metrics", resume_step: int | None = None,
                 tensorboard: bool = True, total_steps: int | None = None, progress: bool = True,
                 initial_step: int = 0, desc: str = "train"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / f"{name}.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            self._tb = SummaryWriter(str(self.run_dir / "tb" / name))
        self._bar = None
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, float):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            shown = {label: f"{row[k]:.3g}" for k, label in PROGRESS_METRICS.items() if isinstance(row.get(k), float)}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1 if step > 0 else 0)  # step 0 (an evaluation before training) is no step
        return row

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


class NullWriter:
    """The MetricsWriter of processes other than 0 in a multi-process run: writes nothing."""

    def write(self, step: int, metrics: dict) -> dict:
        return {"step": int(step), **metrics}

    def close(self) -> None:
        pass


def open_writer(run_dir, **kwargs):
    """A MetricsWriter on process 0 (JSONL, TensorBoard, progress bar), else a NullWriter."""
    return MetricsWriter(run_dir, **kwargs) if is_primary() else NullWriter()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (a truncated last line from a crash is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
