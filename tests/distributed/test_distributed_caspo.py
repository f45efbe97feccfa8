"""`caspo train` on a device mesh and across processes equals the one-device run.

Three runs of the same 2-step CASPO config on the tiny "test" model (2 prompts x 4
rollouts, images, token advantages, one 8-row mini-batch a step), each a `caspo train`
process: one device; one process with 8 devices on a (2, 2, 2) mesh (data, fsdp and
tensor all split); and two processes x 4 devices on a (1, 8, 1) mesh spanning both (each
reads one prompt of every step, samples and scores it on its own devices, feeds its rows).
Rollouts are sampled (temperature 1) with per-prompt seeds that do not depend on the
mesh or on which process samples, so the sampled tokens -- hence rewards -- are equal,
and every other metric agrees within rtol 1e-4 + atol 1e-5 (advantages divide token
rewards of ~1e-2 by their std, which turns 1e-7 log-prob rounding into ~1e-5).

All executables compile at LLVM -O0 (`--xla_backend_optimization_level=0`, same flags in
every run): the runs are compile-bound.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _dist_launch import launch_two  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
CONFIG = ["model.tiny=test", "data.demo_train=24", "data.demo_eval=12", "data.max_response_len=8",
          "data.max_prompt_len=256", "algo.prompts_per_step=2", "algo.group_size=4", "optim.minibatch_size=8",
          "run.steps=2", "run.save_every=0", "run.eval_every=0", "algo.variant=token", "algo.beta=0.05"]
FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false"
# the CLI, with every thread's stack dumped on SIGUSR1 (what launch_two sends before a timeout kill)
BOOT = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
        "from caspo_jax.launch.cli import main; sys.exit(main(sys.argv[1:]))")
EXACT = ("reward/mean", "reward/std", "reward/failed_groups", "reward_mean", "response_length/mean",
         "response_length/max", "response_length/truncated_frac", "learning_rate")


def train_argv(out, mesh) -> list[str]:
    sets = CONFIG + [f"run.mesh_data={mesh[0]}", f"run.mesh_fsdp={mesh[1]}", f"run.mesh_tensor={mesh[2]}"]
    return [sys.executable, "-c", BOOT, "train", "--preset", "tiny-cpu", "--out", str(out),
            *[x for s in sets for x in ("--set", s)]]


def train_one_process(out, devices: int, mesh) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FLAGS}")
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    done = subprocess.run(train_argv(out, mesh), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return read(out)


def read(out) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "mfu"))} for r in rows]


def assert_same_run(got: list[dict], want: list[dict]) -> float:
    """Equal sampled outcomes, every other metric within the tolerance; returns the worst diff."""
    assert len(got) == len(want) == 2
    worst = 0.0
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in EXACT:
            assert g[key] == w[key], (key, g[key], w[key])
        for key, value in w.items():
            if value is None or g[key] is None:
                assert value is None and g[key] is None, key
                continue
            assert abs(g[key] - value) <= ATOL + RTOL * abs(value), (key, g[key], value)
            worst = max(worst, abs(g[key] - value))
    return worst


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    rows = train_one_process(tmp_path_factory.mktemp("one_device") / "run", 1, (1, 1, 1))
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] > 0  # step 1 moved the policy: step 2 measures it
    return rows


@pytest.mark.slow
def test_caspo_train_on_a_2x2x2_mesh_equals_one_device(one_device, tmp_path):
    got = train_one_process(tmp_path / "run", 8, (2, 2, 2))
    print(f"(2, 2, 2) mesh vs one device: worst metric diff {assert_same_run(got, one_device):.2e}")


@pytest.mark.slow
def test_caspo_train_in_two_processes_equals_one_process(one_device, tmp_path):
    out = tmp_path / "run"
    logs = launch_two(train_argv(out, (1, -1, 1)), tmp_path, timeout=400,
                      xla_flags=f"--xla_force_host_platform_device_count=4 {FLAGS}")
    print(f"two processes x 4 devices, (1, 8, 1) mesh vs one device: worst metric diff "
          f"{assert_same_run(read(out), one_device):.2e}")
    # process 0 alone wrote the config, the metrics and the export; both wrote their checkpoint shards
    assert "--- config ---" in logs[0].read_text() and "--- config ---" not in logs[1].read_text()
    assert (out / "export" / "model.safetensors").exists() and (out / "config.yaml").exists()
    assert not (out / "hosts" / "1" / "metrics.jsonl").exists()
    from caspo_jax.loop.checkpoint import RunCheckpointer

    ckpt = RunCheckpointer(out / "checkpoints")
    assert ckpt.steps() == [2]
    extras = ckpt.manager.restore(2, args=__import__("orbax.checkpoint").checkpoint.args.Composite(
        extras=__import__("orbax.checkpoint").checkpoint.args.JsonRestore()))["extras"]
    assert isinstance(extras["data"], list) and len(extras["data"]) == 2  # each process's prompt position
    ckpt.close()


@pytest.mark.long
def test_caspo_train_k1_in_two_processes(one_device, tmp_path):
    """rollout.max_staleness=1 across two processes: each process's rollout thread samples its
    prompt of every step on its own device from the weights the trainer published (a host
    copy gathered in the training thread, so no collective runs in the rollout thread). Step
    1 trains on version 0's rollouts, hence equals the synchronous one-device run; step 2's
    batch is at most one version old."""
    out = tmp_path / "run"
    argv = train_argv(out, (1, -1, 1)) + ["--set", "rollout.max_staleness=1", "--set", "rollout.timeout_s=300"]
    launch_two(argv, tmp_path, timeout=400, xla_flags=f"--xla_force_host_platform_device_count=4 {FLAGS}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["async/staleness"] == 0.0 and rows[1]["async/staleness"] in (0.0, 1.0)
    got = read(out)
    for key, want in one_device[0].items():
        assert key in got[0], key
        if want is None:
            assert got[0][key] is None, key
        else:
            assert abs(got[0][key] - want) <= ATOL + RTOL * abs(want), (key, got[0][key], want)
