"""The run skeleton (`caspo_jax.loop.skeleton.TrainingRun`) with a toy step, no model:
its save cadence and extras, a halt (save, then RunHalted), a stop signal (save, exit
without completing) followed by --resume equal to an uninterrupted run, and a fresh run
refused before it rewrites the earlier run's config.yaml."""

import json
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from caspo_jax.errors import RunHalted
from caspo_jax.loop.checkpoint import CheckpointsExist
from caspo_jax.loop.config import load_config
from caspo_jax.loop.skeleton import StepOutcome, TrainingRun


def _cfg(*sets):
    return load_config(overrides=["run.save_every=2", "run.keep_last=10", *sets])


def _toy_step(signal_at=None, halt_at=None):
    """w <- 2 w + step (a function of the state and the step alone); metrics: w's sum."""

    def step_fn(state, step):
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        w = state["w"] * 2.0 + step
        return StepOutcome({"w": w}, {"w_sum": float(jnp.sum(w))}, "halted here" if step == halt_at else None)

    return step_fn


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _saved(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_saves_every_n_steps_and_at_the_end_with_extras(tmp_path):
    run = TrainingRun(_cfg(), tmp_path, "toy", progress=False)
    start, state, extras = run.restore({"w": jnp.ones(3)})
    assert (start, extras) == (0, None)
    end = run.loop(state, start, 5, _toy_step(), extras=lambda step: {"data": {"pos": step * 10}})
    assert run.finish(end) and end.step == 5 and end.stopped is None
    assert _saved(tmp_path) == [2, 4, 5]
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]
    again = TrainingRun(_cfg(), tmp_path, "toy", resume=True, progress=False)
    start, state, extras = again.restore({"w": jnp.ones(3)})
    assert start == 5 and extras == {"stage": "toy", "step": 5, "data": {"pos": 50}}
    np.testing.assert_array_equal(state["w"], end.state["w"])


def test_a_halt_saves_its_step_then_raises(tmp_path):
    run = TrainingRun(_cfg(), tmp_path, "toy", progress=False)
    end = run.loop({"w": jnp.ones(2)}, 0, 6, _toy_step(halt_at=2))  # the third step asks to halt
    assert end.step == 3 and end.halted == "halted here"
    assert _saved(tmp_path) == [2, 3] and len(_rows(tmp_path)) == 3
    with pytest.raises(RunHalted, match="halted here"):
        run.finish(end)


def test_stop_then_resume_equals_an_uninterrupted_run_and_fresh_runs_refuse(tmp_path, capsys):
    full = TrainingRun(_cfg(), tmp_path / "full", "toy", progress=False)
    full.finish(full.loop({"w": jnp.ones(2)}, 0, 5, _toy_step()))
    part = TrainingRun(_cfg(), tmp_path / "part", "toy", progress=False)
    end = part.loop({"w": jnp.ones(2)}, 0, 5, _toy_step(signal_at=2))  # SIGTERM during the third step
    assert end.stopped == "SIGTERM" and end.step == 3 and not part.finish(end)
    assert "caspo toy: stopped by SIGTERM at step 3; resume with --resume" in capsys.readouterr().out
    assert _saved(tmp_path / "part") == [2, 3]
    config = (tmp_path / "part" / "config.yaml").read_text()
    with pytest.raises(CheckpointsExist, match="pass --resume"):
        TrainingRun(_cfg("run.seed=7"), tmp_path / "part", "toy", progress=False)
    assert (tmp_path / "part" / "config.yaml").read_text() == config  # the refused run wrote nothing
    resumed = TrainingRun(_cfg(), tmp_path / "part", "toy", resume=True, progress=False)
    start, state, _ = resumed.restore({"w": jnp.ones(2)})
    assert start == 3
    assert resumed.finish(resumed.loop(state, start, 5, _toy_step()))
    assert _rows(tmp_path / "part") == _rows(tmp_path / "full")


def test_before_metrics_are_step_0_of_a_fresh_run_only(tmp_path):
    run = TrainingRun(_cfg(), tmp_path, "toy", progress=False)
    start, state, _ = run.restore({"w": jnp.ones(2)})
    run.loop(state, start, 2, _toy_step(), before=lambda: {"eval/x": 0.5})
    assert [(r["step"], r.get("eval/x")) for r in _rows(tmp_path)] == [(0, 0.5), (1, None), (2, None)]
    again = TrainingRun(_cfg(), tmp_path, "toy", resume=True, progress=False)
    start, state, _ = again.restore({"w": jnp.ones(2)})
    calls = []
    again.loop(state, start, 3, _toy_step(), before=lambda: calls.append(1) or {"eval/x": 9.0})
    assert not calls and [r["step"] for r in _rows(tmp_path)] == [0, 1, 2, 3]
