"""The run skeleton every trainer shares: `caspo train` (CASPO), `caspo sft`, `caspo dpo`, `caspo rm`.

    run = TrainingRun(cfg, out_dir, "sft", resume=resume, progress=progress)  # refuses to overwrite
    start, state, extras = run.restore(place.state(init_state(...)))           # --resume: newest readable
    end = run.loop(state, start, total, step_fn)      # stop signals, metrics, bar, periodic + final saves
    if run.finish(end):                               # RunHalted / "stopped ...; resume with --resume"
        export ...                                    # every process joins the gather, process 0 writes

What it owns: the run directory (config.yaml on process 0; a fresh run refuses a
directory that holds checkpoints, before it touches the directory's config), the
checkpointer (restore of (state, extras), keep-last-N, saves every run.save_every steps,
at the end, on a stop and on a halt), SIGTERM / SIGINT (the step in flight finishes, is
saved, and every process leaves the loop after the same step: `StopSignals.agreed`), the
metrics writer and progress bar (process 0), and `caspo_jax.errors`' contract: a halt
saves first, then raises `RunHalted` (exit 3).

What a trainer supplies: its initial state (placed with `caspo_jax.loop.placement`),
`step_fn(state, step) -> StepOutcome` (batch `step` -- a function of the step alone or of
a checkpointed data position, so resume is exact -- the jitted update, what it evaluates
and logs, and when it must halt), optional checkpoint `extras` (e.g. the data iterator's
position) and its export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from caspo_jax.distributed import is_primary
from caspo_jax.errors import RunHalted
from caspo_jax.loop.checkpoint import RunCheckpointer
from caspo_jax.loop.config import TrainConfig
from caspo_jax.loop.metrics import open_writer
from caspo_jax.loop.runtime import RunDir, StopSignals

__all__ = ["LoopEnd", "StepOutcome", "TrainingRun"]


class StepOutcome(NamedTuple):
    """What one step gives the skeleton: the new state, the metrics row to write (the
    skeleton adds "step"), and a `RunHalted` message when the run must stop after saving
    this step (None: carry on)."""

    state: Any
    metrics: dict
    halt: str | None = None


@dataclasses.dataclass(frozen=True)
class LoopEnd:
    """How `TrainingRun.loop` ended: `step` steps done (the last one saved), the state,
    `stopped` (the signal's name, or "another process") when a stop came before the last
    step, `halted` (the RunHalted message) when a step asked to halt."""

    step: int
    state: Any
    stopped: str | None = None
    halted: str | None = None


class TrainingRun:
    """One trainer run in `out_dir`: run directory, checkpoints, signals, metrics.

    `command` names the CLI command in messages and in config.yaml's header ("train",
    "sft", "dpo", "rm"); `bar` labels the progress bar (default: the command)."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, command: str, *, resume: bool = False,
                 progress: bool = True, bar: str | None = None):
        self.command = command
        self.resume = resume
        self.progress = progress
        self.bar = bar or command
        self.primary = is_primary()
        self.save_every = cfg.run.save_every
        self.checkpointer = RunCheckpointer(Path(out_dir) / "checkpoints", cfg.run.keep_last)
        if not resume:
            self.checkpointer.refuse_overwrite(command)
        self.dir = RunDir(out_dir, cfg, command, echo=progress, primary=self.primary)

    def restore(self, state) -> tuple[int, Any, dict | None]:
        """(start step, state, checkpoint extras): the newest readable checkpoint's with
        --resume (`state` gives the shapes and shardings), else (0, state, None)."""
        if self.resume:
            restored = self.checkpointer.restore_latest(state)
            if restored is not None:
                start, state, extras = restored
                if self.primary:
                    print(f"caspo {self.command}: resumed from step {start}", flush=True)
                return start, state, extras
        return 0, state, None

    def loop(self, state, start: int, total: int, step_fn: Callable[[Any, int], StepOutcome], *,
             extras: Callable[[int], dict] | None = None, before: Callable[[], dict] | None = None) -> LoopEnd:
        """Runs steps start..total-1 (`step_fn(state, step)`), writing each step's metrics as
        step + 1; saves after step n when run.save_every divides n, after the last step,
        and after a step that was stopped or asked to halt, with {"stage": command, "step":
        n, **extras(n)} beside the state (`extras` is called on every process: it may be a
        collective). `before` (a fresh run only): metrics of the untrained state, written as
        step 0 (e.g. an evaluation before RL). Waits for the saves and closes the
        checkpointer and the writer."""
        writer = open_writer(self.dir.path, resume_step=start if self.resume else None, total_steps=total,
                             progress=self.progress, initial_step=start, desc=self.bar)
        if before is not None and start == 0:
            writer.write(0, before())
        step, stopping, halt = start, False, None
        try:
            with StopSignals() as stop:
                while step < total and not stopping and halt is None:
                    state, metrics, halt = step_fn(state, step)
                    step += 1
                    writer.write(step, metrics)
                    stopping = stop.agreed()  # every process: the same answer after each step
                    if ((self.save_every and step % self.save_every == 0) or step == total or stopping
                            or halt is not None):
                        self.checkpointer.save(step, state, {"stage": self.command, "step": step,
                                                             **(extras(step) if extras else {})})
            self.checkpointer.wait()
            self.checkpointer.close()
        except BaseException:
            self.checkpointer.wait()  # the save of the step before a failure completes: it is the one to resume
            raise
        finally:
            writer.close()
        stopped = (stop.requested or "another process") if stopping and step < total else None
        return LoopEnd(step, state, stopped, halt)

    def finish(self, end: LoopEnd) -> bool:
        """True when the run completed (the caller exports). A halted run raises RunHalted
        (its step is saved); a stopped one prints how to resume and returns False."""
        if end.halted is not None:
            raise RunHalted(end.halted)
        if end.stopped is not None:
            if self.primary:
                print(f"caspo {self.command}: stopped by {end.stopped} at step {end.step}; resume with --resume",
                      flush=True)
            return False
        return True
