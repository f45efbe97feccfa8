"""`caspo train` at rollout.max_staleness=1 with its rollout worker in a spawned process
(rollout.workers=subprocess), the TRAINER SIGKILLed mid-run (a lost host, an OOM kill):
its worker exits with it (no orphan holding an accelerator), and `--resume` completes the
run with every step in the metrics once and every prompt batch trained once (what the
surviving checkpoint holds plus what the resumed run trains is the data order, in order).
Two CLI runs of a few steps each: marker `long`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "loop"))
from test_loop_e2e import small_config  # noqa: E402
from test_loop_staleness import STEPS, expected_batches  # noqa: E402

from caspo_jax.loop.config import config_to_dict  # noqa: E402

HERE = Path(__file__).parent


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def read_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.long
def test_a_sigkilled_trainer_takes_its_worker_along_and_resumes_each_batch_once(tmp_path):
    cfg = small_config(tmp_path, f"run.steps={STEPS}", "rollout.max_staleness=1", "rollout.workers=subprocess",
                       "rollout.timeout_s=300", "rollout.worker_env={JAX_PLATFORMS: cpu, XLA_FLAGS: "
                       "'--xla_force_host_platform_device_count=1'}")
    raw = config_to_dict(cfg)
    raw["reward"] = {"kind": "function", "target": "_recording_reward:score", "batched": True}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    out, trained = tmp_path / "run", tmp_path / "trained.jsonl"
    env = dict(os.environ, CASPO_TEST_TRAINED=str(trained),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "caspo_jax.launch.cli", "train", "--config", str(config), "--out", str(out)]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    def saved() -> list[int]:
        root = out / "checkpoints"
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []

    # kill once a checkpoint is final and a later step trained (so the run has state to lose)
    while not (saved() and len(read_lines(out / "metrics.jsonl")) > saved()[0]):
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the first run never saved a step and trained the next"
        time.sleep(0.2)
    workers = children(first.pid)
    assert workers, "the rollout worker runs in a child process"
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stdout.close()
    deadline = time.monotonic() + 30
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "the rollout worker outlived its SIGKILLed trainer"
    before = read_lines(trained)
    second = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = read_lines(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    resumed = read_lines(trained)[len(before):]
    done = STEPS - len(resumed)  # the step the resumed run restored
    assert 1 <= done <= len(before)
    from caspo_jax.loop.setup import build_policy

    assert before[:done] + resumed == expected_batches(cfg, build_policy(cfg.model, cfg.data), tmp_path)


def test_a_worker_process_exits_when_its_parent_is_killed(tmp_path):
    """`exit_with_parent` on its own (fast): a parent spawns a child that calls it, then the
    parent is SIGKILLed; the child ends within a few polls. Without the watcher it would
    sleep on (the check has teeth: the child sleeps 60 s otherwise)."""
    ready = tmp_path / "watching"
    child_code = ("import pathlib, time; from caspo_jax.remote.worker import exit_with_parent; "
                  f"exit_with_parent(poll_s=0.05); pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")
    parent_code = ("import subprocess, sys, time; "
                   f"c = subprocess.Popen([sys.executable, '-c', {child_code!r}]); "
                   "print(c.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 120
    while not ready.exists():  # the child has imported and started its watcher
        assert time.monotonic() < deadline and alive(child)
        time.sleep(0.05)
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 20
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)
