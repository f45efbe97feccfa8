"""`caspo rm` on the run skeleton: on a (2, 2, 2) mesh of the 8 simulated devices and as
two processes x 4 devices it equals the one-device run (the tolerance of the SFT / DPO
mesh test: rel 1e-4, abs 1e-5), and a fresh run refuses a directory that holds an earlier
run's checkpoints without touching its config.yaml.

The stop (SIGTERM) + resume test of `caspo rm` is tests/rewards/test_rewards_reward_model.py's.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from caspo_jax.loop import reward_model as rm_loop
from caspo_jax.loop.checkpoint import CheckpointsExist
from caspo_jax.loop.config import load_config
from caspo_jax.loop.reward_model import train_reward_model

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from _dist_launch import XLA_FLAGS, launch_two  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
COMPARED = ("loss", "bt_loss", "mse", "accuracy", "grad_norm")
BOOT = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
        "from caspo_jax.launch.cli import main; sys.exit(main(sys.argv[1:]))")


def _items(directory: Path, n: int = 12) -> list[str]:
    """n pairs ("... safe" chosen over "... now") and n scored records (6 or 0): --set entries."""
    rng = np.random.default_rng(0)
    words = "the a water store keep room cold light paper bottle glass box door window".split()
    pairs, scores = [], []
    for i in range(n):
        body = " ".join(rng.choice(words, size=4))
        pairs.append({"id": f"p{i}", "images": [], "query": f"how to {body}?", "chosen": f"{body} safe",
                      "rejected": f"{body} now"})
        scores.append({"id": f"s{i}", "images": [], "query": f"what about {body}?",
                       "response": f"{body} {'safe' if i % 2 else 'now'}", "score": 6 if i % 2 else 0})
    for name, rows in (("pairs", pairs), ("scores", scores)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return [f"data.pairs={directory / 'pairs.jsonl'}", f"data.scores={directory / 'scores.jsonl'}"]


def _sets(data: list[str], mesh=(1, 1, 1), *extra: str) -> list[str]:
    return data + ["model.tiny=test", "data.max_prompt_len=256", "data.max_response_len=32", "rm.batch_size=4",
                   "rm.steps=3", "rm.learning_rate=1e-3", "rm.eval_fraction=0.25", "run.save_every=0",
                   f"run.mesh_data={mesh[0]}", f"run.mesh_fsdp={mesh[1]}", f"run.mesh_tensor={mesh[2]}", *extra]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(got: Path, want: Path) -> None:
    g_rows, w_rows = _rows(got), _rows(want)
    assert [r["step"] for r in g_rows] == [r["step"] for r in w_rows] == [1, 2, 3]
    for g, w in zip(g_rows, w_rows):
        for key in COMPARED:
            assert g[key] == pytest.approx(w[key], rel=RTOL, abs=ATOL), key
    g_eval, w_eval = (json.loads((run / "eval.json").read_text()) for run in (got, want))
    assert set(g_eval) == set(w_eval) and w_eval["eval_pairs"] == 3
    for key, value in w_eval.items():
        assert g_eval[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """(run directory, data --set entries) of the one-device 3-step run."""
    tmp = tmp_path_factory.mktemp("rm")
    data = _items(tmp)
    train_reward_model(load_config(overrides=_sets(data)), tmp / "one", progress=False)
    return tmp / "one", data


@pytest.mark.slow
def test_rm_on_a_2x2x2_mesh_equals_one_device(one_device, tmp_path, monkeypatch):
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    run, data = one_device
    meshes = []
    original = rm_loop.make_rm_step

    def recording(model, step_cfg, mse_weight, mesh=None, rules=None):
        meshes.append(mesh)
        return original(model, step_cfg, mse_weight, mesh, rules)

    monkeypatch.setattr(rm_loop, "make_rm_step", recording)
    trained, _ = train_reward_model(load_config(overrides=_sets(data, (2, 2, 2))), tmp_path / "mesh", progress=False)
    assert dict(meshes[0].shape) == {"data": 2, "fsdp": 2, "tensor": 2}  # the run really was sharded
    _assert_same_run(tmp_path / "mesh", run)
    assert (tmp_path / "mesh" / "export" / "reward_head.safetensors").is_file()


def test_rm_refuses_an_earlier_runs_directory_without_resume(one_device):
    """Without --resume a run into a directory with checkpoints stops before writing
    anything: the earlier run's config.yaml (seed 0) is not replaced by the refused one's."""
    run, data = one_device
    before = (run / "config.yaml").read_text()
    with pytest.raises(CheckpointsExist, match="pass --resume"):
        train_reward_model(load_config(overrides=_sets(data, (1, 1, 1), "run.seed=7")), run, progress=False)
    assert (run / "config.yaml").read_text() == before and "seed: 7" not in before


@pytest.mark.slow
def test_two_process_rm_equals_one_device(one_device, tmp_path):
    """Two processes x 4 devices on a (1, 8, 1) mesh, each feeding its rows of every batch;
    process 0 alone writes the metrics, eval.json and the export."""
    run, data = one_device
    argv = [sys.executable, "-c", BOOT, "rm", "--out", str(tmp_path / "two"), "--no-progress",
            *[x for s in _sets(data, (1, 8, 1)) for x in ("--set", s)]]
    # LLVM -O0 as in test_distributed_caspo.py: the two processes are compile-bound
    logs = launch_two(argv, tmp_path, xla_flags=f"{XLA_FLAGS} --xla_backend_optimization_level=0")
    _assert_same_run(tmp_path / "two", run)
    assert "caspo rm: done" in logs[0].read_text() and "caspo rm: done" not in logs[1].read_text()
