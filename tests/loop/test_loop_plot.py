"""`caspo plot`: figure 13's gradient-norm panel, read from the key the train step logs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from caspo_jax.algo import hybrid_factor_flips
from caspo_jax.launch.cli import main
from caspo_jax.step import StepConfig, apply_gradients, init_state
from caspo_jax.loop.metrics import MetricsWriter, read_metrics
from caspo_jax.loop.plot import INDICATORS, indicator_series, run_label


def test_grad_norm_panel_reads_the_train_steps_grad_norm(tmp_path):
    # The train step's own metric: every trainer ends its step in apply_gradients.
    params = {"w": jnp.zeros((2,)), "b": jnp.zeros(())}
    grads = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}
    _, step_metrics = apply_gradients(StepConfig(learning_rate=1e-3), init_state(params, StepConfig()), grads)
    (key,) = [k for k in INDICATORS["grad_norm"][1] if k in step_metrics]
    np.testing.assert_allclose(float(step_metrics[key]), 5.0, rtol=1e-6)  # sqrt(3^2 + 4^2)

    run = tmp_path / "run"
    writer = MetricsWriter(run, progress=False, tensorboard=False)
    norms = [5.0, 2.5, 1.25, 0.5]
    for step, norm in enumerate(norms, 1):
        writer.write(step, {"entropy": 1.0, "kl": 0.01, "response_length/mean": 10.0, key: norm})
    writer.close()
    (run / "config.yaml").write_text("algo:\n  variant: hybrid\n  lam: 0.3\n")
    (label, steps, values), = indicator_series([("x", read_metrics(run / "metrics.jsonl"))])["grad_norm"]
    np.testing.assert_array_equal(steps, [1, 2, 3, 4])
    np.testing.assert_allclose(values, norms)
    (_, _, smoothed), = indicator_series([("x", read_metrics(run / "metrics.jsonl"))], smooth=2)["grad_norm"]
    np.testing.assert_allclose(smoothed, [3.75, 1.875, 0.875])
    assert main(["plot", str(run), "--out", str(tmp_path / "p")]) == 0
    names = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    # Fig. 13's four panels (no reward logged here) and the overview.
    assert names == ["entropy.png", "grad_norm.png", "kl.png", "response_length.png", "training_indicators.png"]
    assert (tmp_path / "p" / "grad_norm.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnostic_panels_read_the_keys_the_step_and_evaluation_log(tmp_path):
    flips = hybrid_factor_flips(jnp.ones((1, 2)), jnp.full((1, 2, 3), -5.0), jnp.ones((1, 2, 3)), lam=0.3)
    assert INDICATORS["flipped"][1][0] in flips
    # run_caspo logs evaluate_policy's metrics as eval_<mode>/<key>
    for name, key in (("teacher_discrimination", "teacher_discrimination"), ("warning_auc", "warning_auc")):
        assert INDICATORS[name][1] == (f"eval_standard/{key}",)
    run = tmp_path / "run"
    writer = MetricsWriter(run, progress=False, tensorboard=False)
    for step in (1, 2):
        writer.write(step, {"adv/flipped_frac": float(flips["adv/flipped_frac"]) / step,
                            "eval_standard/teacher_discrimination": 0.5 * step})
    writer.close()
    (run / "config.yaml").write_text("algo:\n  variant: hybrid\n  lam: 0.3\n  nonneg_factor: true\n")
    assert main(["plot", str(run), "--out", str(tmp_path / "p")]) == 0
    assert {"flipped.png", "teacher_discrimination.png"} <= {p.name for p in (tmp_path / "p").glob("*.png")}
    curves = indicator_series([("x", read_metrics(run / "metrics.jsonl"))])
    np.testing.assert_allclose(curves["flipped"][0][2], [1.0, 0.5])
    assert run_label(run) == "hybrid lambda=0.3 nonneg"
