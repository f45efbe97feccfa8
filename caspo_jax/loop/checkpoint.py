"""Run checkpoints with orbax: state pytree + JSON extras, keep-last-N, safe resume.

A checkpoint holds two items: "state" (parameters, optimiser state, step -- any pytree
of arrays, saved with `StandardSave`) and "extras" (JSON: data-iterator state, RNG
seeds, the config, the stage). Orbax writes each step into a temporary directory and
renames it when complete, so a crash mid-save leaves nothing `latest_step` lists.
Saves are asynchronous where orbax supports it; `wait()` before exit.

`restore_latest` walks the saved steps newest first and falls back to the previous
one, with a warning, when the newest cannot be read (a corrupted disk, a truncated
file): resume never silently starts from scratch while an older checkpoint is usable.
The unreadable step is renamed aside (kept, no longer listed), and the warning names
what is damaged in it (`describe_damage`): a metadata file that is no longer JSON, the
file tensorstore failed to decode, or the array it could not read -- not orbax's
exception text, which is a page of tensorstore spec.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from caspo_jax.errors import UserError

__all__ = ["CheckpointsExist", "RunCheckpointer", "describe_damage"]

logger = logging.getLogger(__name__)


class CheckpointsExist(UserError, FileExistsError):
    """A fresh run pointed at a directory that already holds a run's checkpoints."""


class RunCheckpointer:
    """directory/<step>/{state,extras}; keeps the newest `keep_last` steps."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True,
                                               enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extras"))

    def refuse_overwrite(self, stage: str) -> None:
        """Raises when a fresh (non-resume) run would mix with an old run's checkpoints."""
        if self.steps():
            raise CheckpointsExist(
                f"{self.directory} already holds checkpoints {self.steps()}: pass --resume to continue that run, "
                f"or choose a new --out directory for a fresh caspo {stage} run")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, extras: dict) -> None:
        """Saves asynchronously and returns; call `wait()` before reading it back."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        extras=ocp.args.JsonSave(extras)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 extras=ocp.args.JsonRestore()))
        return out["state"], dict(out["extras"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, extras) of the newest readable checkpoint, or None when there is none."""
        unreadable = []
        for step in reversed(self.steps()):
            try:
                state, extras = self.restore(step, abstract_state)
            except Exception as exc:  # noqa: BLE001 -- any unreadable checkpoint falls back
                message = (f"checkpoint {self.directory / str(step)} cannot be restored: "
                           f"{describe_damage(self.directory / str(step), exc)}; falling back to the previous one")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                logger.warning(message)
                unreadable.append(step)
                continue
            self._set_aside(unreadable)
            return step, state, extras
        return None

    def _set_aside(self, steps) -> None:
        """Renames unreadable newer steps to <step>.unreadable-N (kept for inspection, no
        longer listed), so the resumed run can save those steps again."""
        for step in steps:
            path = self.directory / str(step)
            n = 0
            while (self.directory / f"{step}.unreadable-{n}").exists():
                n += 1
            path.rename(self.directory / f"{step}.unreadable-{n}")
        if steps:
            self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _unreadable_json(step_dir: Path) -> list[Path]:
    """The step's metadata files (orbax writes them as JSON) that no longer parse."""
    bad = []
    for path in sorted(step_dir.rglob("*")):
        if (not path.is_file() or path.suffix in (".ocdbt", ".txt") or "d" in path.relative_to(step_dir).parts[:-1]
                or path.stat().st_size > 2**24):
            continue  # array data (under d/), OCDBT manifests and commit markers are not JSON
        try:
            json.loads(path.read_bytes())
        except ValueError:
            bad.append(path)
    return bad


def describe_damage(step_dir: Path, exc: BaseException) -> str:
    """What is damaged in a checkpoint step that failed to restore with `exc`, for a user:
    the first metadata file that no longer parses, else the file tensorstore names as
    undecodable, else the array it could not read, else the innermost error's first line."""
    step_dir = Path(step_dir)
    bad = _unreadable_json(step_dir)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return f"damaged file {bad[0]}{more} (not valid JSON)"
    chain = _exception_chain(exc)
    text = " ".join(str(e) for e in chain)
    files = [f for f in re.findall(r'local file "([^"]+)"', text) if Path(f).is_file()]
    if files:
        return f"damaged file {files[0]}"
    arrays = re.findall(r'Error reading "([^"]+)"', text)
    innermost = chain[-1]
    reason = f"{type(innermost).__name__}: {(str(innermost).splitlines() or [''])[0][:160]}"
    if arrays:
        name = arrays[0].rsplit("/", 1)[0]
        return f"array {name!r} in {step_dir / 'state'} is damaged ({reason})"
    return reason
