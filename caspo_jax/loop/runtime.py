"""What every training stage shares: the run directory, the saved config, clean stops, export.

    run = RunDir(out_dir, cfg, stage="caspo")   # writes config.yaml, prints it
    with StopSignals() as stop:                 # SIGTERM / SIGINT set stop.requested
        while ...:
            step ...
            stopping = stop.agreed()            # every process: the same answer after each step
            if stopping: save; (the loop ends)
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from caspo_jax.distributed import is_primary
from caspo_jax.hf_checkpoint import save_hf_checkpoint
from caspo_jax.loop.config import TrainConfig, dump_config, load_config

__all__ = ["RunDir", "StopSignals", "export_final", "load_run_config"]


class StopSignals:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (save, then exit 0).

    A second signal while stopping restores the default handler's behaviour (exit now).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: saving a checkpoint after this step, then exiting",
              file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """Whether any process has been asked to stop. With several processes this is a
        collective (one bool each), called once after every step by all of them, so they
        all save the same step and leave the loop together even when the signal reaches
        them at different moments; the answer is fixed for that step (a signal arriving
        later is seen after the next one)."""
        local = self.requested is not None
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))

    def __enter__(self) -> "StopSignals":
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


class RunDir:
    """run_dir/{config.yaml, checkpoints/, metrics.jsonl, tb/, export/}."""

    def __init__(self, path: str | Path, cfg: TrainConfig, stage: str, *, echo: bool = True, primary: bool = True):
        """primary=False (processes other than 0 of a multi-process run): the directory is
        made (orbax writes checkpoints from every process) but the config is neither
        written nor printed."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.cfg = cfg
        self.primary = primary
        text = dump_config(cfg)
        if primary:
            (self.path / "config.yaml").write_text(f"# caspo {stage}\n" + text, encoding="utf-8")
        if echo and primary:
            print(f"caspo {stage}: run directory {self.path}\n--- config ---\n{text}--------------", flush=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def data(self) -> Path:
        """Where generated demo data goes: the run directory on process 0, a per-process
        directory elsewhere (hosts without a shared disk need their own copy; on a shared
        disk two processes never write one file)."""
        if self.primary:
            return self.path
        return self.path / "hosts" / str(jax.process_index())


def load_run_config(run_dir: str | Path) -> TrainConfig:
    return load_config(path=Path(run_dir) / "config.yaml")


def export_final(place, model, params, processor, out_dir: str | Path) -> Path:
    """`save_hf_checkpoint` of a (possibly multi-host sharded) policy: every process joins the
    gather (`place.to_host`), process 0 writes."""
    host = place.to_host(params) if jax.process_count() > 1 else params
    if is_primary():
        save_hf_checkpoint(model, host, processor, out_dir)
    return Path(out_dir)
