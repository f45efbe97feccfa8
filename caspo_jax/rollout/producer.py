"""Bounded-staleness rollouts: a producer thread generates the next steps' rollouts while
the trainer updates (`rollout.max_staleness = k >= 1`).

Versions: weight version v is the policy after v RL steps. Step s trains the policy of
version s on rollouts of version v with s - k <= v <= s. The producer makes batch j only
once the trainer has published version j - k (`publish`), installs the newest published
weights into the engine before each batch (between requests: one version per batch), and
tags the batch with the version the engine reports (`Rollouts.version`). So it runs at most
k + 1 batches ahead, and `take(s)` checks the bound again (an error, never a silent stale
sample).

One thread owns the engine: every `generate` and every push happens in it, except while
the trainer holds `paused()` (evaluation), when the producer waits between batches and the
trainer may use the engine itself. JAX releases the GIL while compiled work runs, vLLM and
remote workers while they wait on their engines, so the two sides overlap in one process.

Failures: an exception in the producer (a dead worker, a broken engine) reaches the
trainer's next `take` as `RolloutEngineError`; a batch that does not arrive within
`timeout_s` raises it too (a hung worker), so a run never deadlocks: it stops with one
line, and the last checkpoint, written before, is intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from caspo_jax.errors import CaspoError

__all__ = ["Produced", "RolloutEngineError", "RolloutProducer"]


class RolloutEngineError(CaspoError):
    """The rollout side failed or stopped answering; the run stops (exit 1) and resumes
    from its last checkpoint once the engine is back."""


@dataclasses.dataclass(frozen=True)
class Produced:
    """What `take(step)` returns: the producer's item for `step` (whatever `produce` built),
    the weight version that generated it, and the seconds the trainer waited for it
    (`trainer_wait_s`), the producer spent idle (waiting for a version or paused) and pushing
    weights since the previous take."""

    item: Any
    version: int
    trainer_wait_s: float
    producer_idle_s: float
    producer_push_s: float


class RolloutProducer:
    """Runs `produce(step, engine) -> (item, version)` for steps start, start + 1, ... in a
    background thread, at most `max_staleness` weight versions behind the trainer.

    engine: has `sync_weights(params, version=...)` and `version` (the installed one).
    version: the version the engine holds at `start` (normally `start`). end: the first step
    not to produce (None: no end).
    """

    def __init__(self, engine, produce: Callable[[int, Any], tuple[Any, int]], *, start: int, end: int | None = None,
                 max_staleness: int, timeout_s: float, version: int):
        if max_staleness < 1:
            raise ValueError(f"RolloutProducer(max_staleness={max_staleness}): must be >= 1 (0 is the synchronous "
                             "loop, without a producer)")
        self.engine = engine
        self.max_staleness = max_staleness
        self.timeout_s = timeout_s
        self._produce = produce
        self._end = end
        self._cond = threading.Condition()
        self._published = version
        self._pending: tuple[Any, int] | None = None  # newest published weights not yet installed
        self._ready: dict[int, tuple[Any, int]] = {}
        self._error: tuple[int, BaseException] | None = None
        self._pause_requested = False
        self._paused = False
        self._stopping = False
        self._idle = 0.0
        self._push = 0.0
        self._thread = threading.Thread(target=self._run, args=(start,), name="rollout-producer", daemon=True)
        self._thread.start()

    # ----- producer thread ------------------------------------------------------------
    def _wait_for_turn(self, step: int) -> tuple[Any, int] | None:
        """Under the lock: waits (idle) until batch `step` may be made, returns the weights to
        install first (None: the engine's are the newest). None also when stopping."""
        start = time.perf_counter()
        while not self._stopping and (self._pause_requested or self._published < step - self.max_staleness):
            if self._pause_requested and not self._paused:
                self._paused = True
                self._cond.notify_all()
            self._cond.wait()
        self._paused = False
        self._idle += time.perf_counter() - start
        pending, self._pending = self._pending, None
        if pending is not None and pending[1] <= self.engine.version:
            pending = None  # the trainer installed it (or a newer one) itself while paused
        return pending

    def _run(self, step: int) -> None:
        try:
            while self._end is None or step < self._end:
                with self._cond:
                    pending = self._wait_for_turn(step)
                    if self._stopping:
                        return
                if pending is not None:
                    start = time.perf_counter()
                    self.engine.sync_weights(pending[0], version=pending[1])
                    with self._cond:
                        self._push += time.perf_counter() - start
                item, version = self._produce(step, self.engine)
                with self._cond:
                    self._ready[step] = (item, version)
                    self._cond.notify_all()
                step += 1
        except BaseException as exc:  # reaches the trainer at its next take
            with self._cond:
                self._error = (step, exc)
                self._cond.notify_all()

    # ----- trainer side ---------------------------------------------------------------
    def take(self, step: int) -> Produced:
        """Batch `step` (waits for it); raises RolloutEngineError if the producer failed or
        nothing arrived within timeout_s, and RuntimeError if the batch is staler than
        max_staleness (a bug: the producer never makes one)."""
        start = time.perf_counter()
        with self._cond:
            ready = self._cond.wait_for(lambda: step in self._ready or self._error is not None, self.timeout_s)
            waited = time.perf_counter() - start
            if step not in self._ready:
                if self._error is not None:
                    failed, exc = self._error
                    raise RolloutEngineError(
                        f"the rollout engine failed while generating step {failed + 1}'s rollouts: "
                        f"{type(exc).__name__}: {exc}. Training stopped before step {step + 1}; the last checkpoint "
                        "is intact: bring the rollout engine back and continue with --resume") from exc
                assert not ready
                raise RolloutEngineError(
                    f"no rollouts for step {step + 1} within rollout.timeout_s={self.timeout_s:g} s: the rollout engine "
                    "is hung or far slower than expected (a dead worker, a stuck weight push). Training stopped; the "
                    "last checkpoint is intact: check the rollout workers, raise rollout.timeout_s if generation is "
                    "just slow, and continue with --resume")
            item, version = self._ready.pop(step)
            idle, push, self._idle, self._push = self._idle, self._push, 0.0, 0.0
        staleness = step - version
        if not 0 <= staleness <= self.max_staleness:
            raise RuntimeError(f"step {step} got rollouts of weight version {version}: staleness {staleness} is "
                               f"outside [0, rollout.max_staleness={self.max_staleness}]")
        return Produced(item, version, waited, idle, push)

    def publish(self, params, version: int) -> None:
        """The trainer's weights after `version` steps; installed before the next batch (never
        during one). Returns at once."""
        with self._cond:
            self._pending = (params, version)
            self._published = max(self._published, version)
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self):
        """The producer waits between batches while the block runs: the caller may use the
        engine alone (e.g. evaluate with it). Raises RolloutEngineError when the batch in
        flight does not finish within timeout_s."""
        with self._cond:
            self._pause_requested = True
            self._cond.notify_all()
            parked = self._cond.wait_for(lambda: self._paused or self._error is not None
                                         or not self._thread.is_alive(), self.timeout_s)
        try:
            if not parked:
                raise RolloutEngineError(f"the rollout producer did not pause within rollout.timeout_s="
                                         f"{self.timeout_s:g} s (a generation that never ends)")
            yield self.engine
        finally:
            with self._cond:
                self._pause_requested = False
                self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Stops the producer after the batch in flight (waits at most `timeout` s for it; the
        thread is a daemon, so a hung engine cannot keep the process alive)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
