"""What every training stage shares: the run directory, the saved config, clean stops, export.

    run = RunDir(out_dir, cfg, stage="caspo")   # writes config.yaml, prints it
    with StopSignals() as stop:                 # SIGTERM / SIGINT set stop.requested
        ...
        if stop.requested: save; break
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import yaml

from caspo_jax.trainer.config import TrainConfig, config_from_dict, dump_config

__all__ = ["RunDir", "StopSignals", "export_policy", "load_run_config"]


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

    def __init__(self, path: str | Path, cfg: TrainConfig, stage: str, *, echo: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.cfg = cfg
        text = dump_config(cfg)
        (self.path / "config.yaml").write_text(f"# caspo {stage}\n" + text, encoding="utf-8")
        if echo:
            print(f"caspo {stage}: run directory {self.path}\n--- config ---\n{text}--------------", flush=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "export"


def load_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))


def export_policy(model, params, processor, out_dir: str | Path) -> Path:
    """An HF checkpoint directory (config.json, safetensors, tokenizer, preprocessor config,
    chat template) that transformers' Qwen2_5_VLForConditionalGeneration and vLLM load."""
    from caspo_jax.models import save_pretrained
    from caspo_jax.testing.tiny_tokenizer import save_tiny_processor

    out_dir = Path(out_dir)
    save_pretrained(model, params, out_dir)
    save_tiny_processor(processor, out_dir)
    return out_dir

