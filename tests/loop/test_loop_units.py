"""Loss values by hand, metrics files, plots, and the CLI's config handling (no model compute)."""

import jax.numpy as jnp
import numpy as np
import pytest
from caspo_jax.launch.cli import main

from caspo_jax.algo import dpo_loss, sft_loss
from caspo_jax.loop.sft_dpo import _batch_rows
from caspo_jax.loop.metrics import MetricsWriter, mfu, read_metrics


def test_sft_loss_is_the_mean_nll_over_response_tokens_only():
    logp = jnp.array([[-1.0, -2.0, -9.0], [-3.0, -7.0, -7.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    loss, metrics = sft_loss(logp, mask)
    assert float(loss) == pytest.approx((1 + 2 + 3) / 3)
    assert float(metrics["ppl"]) == pytest.approx(np.exp(2.0), rel=1e-6)


def test_dpo_loss_by_hand():
    # two pairs: rows 0,1 chosen; rows 2,3 rejected
    logp = jnp.array([[-1.0, -1.0], [-2.0, 0.0], [-3.0, -1.0], [-1.0, 0.0]])
    ref = jnp.array([[-1.5, -1.0], [-1.0, 0.0], [-2.0, -1.0], [-1.0, 0.0]])
    mask = jnp.array([[1, 1], [1, 0], [1, 1], [1, 0]])
    beta = 0.5
    chosen = np.array([-2.0 - -2.5, -2.0 - -1.0])
    rejected = np.array([-4.0 - -3.0, -1.0 - -1.0])
    margin = beta * (chosen - rejected)
    expected = -np.mean(np.log(1 / (1 + np.exp(-margin))))
    loss, metrics = dpo_loss(logp, ref, mask, beta)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["reward_accuracy"]) == pytest.approx(np.mean(margin > 0))
    same, _ = dpo_loss(ref, ref, mask, beta)
    assert float(same) == pytest.approx(np.log(2.0), rel=1e-6)  # policy == reference


def test_batch_order_is_a_function_of_the_step():
    a = [_batch_rows(10, 4, seed=1, step=s).tolist() for s in range(4)]
    assert a == [_batch_rows(10, 4, seed=1, step=s).tolist() for s in range(4)]
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1]))  # no repeats within an epoch


def test_mfu_by_hand():
    assert mfu(1000, trained_tokens=10, scored_tokens=5, seconds=2.0, n_devices=1, peak=1e6) == pytest.approx(
        1000 * (60 + 10) / (2.0 * 1e6))


def test_metrics_writer_truncates_on_resume(tmp_path):
    w = MetricsWriter(tmp_path, progress=False, tensorboard=True)
    for step in (1, 2, 3):
        w.write(step, {"loss": jnp.float32(step), "nan": float("nan"), "name": "x"})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["nan"] is None and rows[2]["loss"] == 3.0
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-line
    w = MetricsWriter(tmp_path, progress=False, tensorboard=False, resume_step=2)
    w.write(3, {"loss": 30.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0),
                                                                                          (3, 30.0)]
    assert list((tmp_path / "tb").rglob("events.*"))


def test_plot_writes_pngs_per_indicator_and_run(tmp_path, capsys):
    for name, lam in (("a", 0.0), ("b", 0.3)):
        run = tmp_path / name
        w = MetricsWriter(run, progress=False, tensorboard=False)
        for step in range(1, 5):
            w.write(step, {"entropy": 1.0 / step, "kl": 0.01 * step, "response_length/mean": 10 + step,
                           "reward/mean": lam + 0.1 * step})
        w.close()
        (run / "config.yaml").write_text(f"algo:\n  variant: hybrid\n  lam: {lam}\n")
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "p")]) == 0
    names = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    assert names == ["entropy.png", "kl.png", "response_length.png", "reward.png", "training_indicators.png"]
    assert (tmp_path / "p" / "kl.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_cli_config_errors_fail_before_any_compute(capsys):
    assert main(["train", "--set", "algo.group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert main(["sft", "--set", "algo.lamda=0.1"]) == 2
    assert "lamda" in capsys.readouterr().err
    assert main(["dpo", "--preset", "qwen2_5_vl_7b", "--set", "algo.lam=0.6", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lam: 0.6" in out and "group_size: 32" in out
    assert main(["demo", "--quick", "--print-config"]) == 0
    assert "tiny: test" in capsys.readouterr().out


def test_train_saves_the_config_it_prints(tmp_path):
    from caspo_jax.loop.config import TrainConfig
    from caspo_jax.loop.runtime import RunDir, load_run_config

    cfg = TrainConfig()
    RunDir(tmp_path, cfg, "train", echo=False)
    assert load_run_config(tmp_path) == cfg


def test_with_data_files_pins_only_the_paths_a_run_has(tmp_path):
    from pathlib import Path

    from caspo_jax.loop.config import TrainConfig
    from caspo_jax.loop.data import DataFiles, with_data_files

    files = DataFiles(train=tmp_path / "train.jsonl", eval=None, sft=None, pairs=tmp_path / "pairs.jsonl",
                      constitutions=None, demo=False)
    cfg = with_data_files(TrainConfig(), files)
    assert cfg.data.train == str(tmp_path / "train.jsonl") and cfg.data.pairs == str(Path(tmp_path / "pairs.jsonl"))
    assert cfg.data.eval is None and cfg.data.sft is None and cfg.data.constitutions is None  # never "None"


def test_stop_signals_are_agreed_after_a_step():
    """One process: `agreed` is the local flag; SIGTERM sets it, and leaving restores the handler."""
    import signal

    from caspo_jax.loop.runtime import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.agreed() is False
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == "SIGTERM" and stop.agreed() is True
    assert signal.getsignal(signal.SIGTERM) is before
