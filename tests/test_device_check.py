"""bench/device_check.py: its smoke path's pieces on CPU (the whole smoke runs in CI, .ci/run),
and the arithmetic of its RESULT lines."""

import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


dc = _load()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke plan with one train length, and the model directory its build phase wrote."""
    plan = dataclasses.replace(dc.make_plan(dc.parse_args(["--smoke", "--lengths", "64"])), layers=1)
    workdir = tmp_path_factory.mktemp("device_check")
    dc.phase_build(plan, workdir)
    return plan, workdir


def test_phase_parity_float32_agrees(smoke):
    out = dc.phase_parity(*smoke)
    assert out["parity_max"] <= dc.PARITY_GOAL["float32"]
    assert 0 <= out["parity_mean"] <= out["parity_max"]


def test_phase_train_reports_mfu_and_memory(smoke):
    plan, workdir = smoke
    out = dc.phase_train(plan, workdir)
    assert 0 < out["mfu_64"] < 2  # of a measured CPU roof: positive and not absurd
    assert out["layers"] == plan.layers and out["note"] == ""  # no memory limit on CPU: nothing dropped
    # XLA's analysis of the tiny step lies within a factor of 2 of the dryrun arithmetic
    assert 0.5 < out["peak_bytes"] / out["estimate_bytes"] < 2


def test_phase_colocated_without_vllm_reports_the_reason(smoke):
    out = dc.phase_colocated(*smoke)
    assert out["jax_tokens_per_s"] > 0
    assert "vllm" in out["vllm_skipped"] and out["handover_s"] > 0


def test_fitting_layers_drops_layers_until_the_dryrun_estimate_fits():
    plan = dc.make_plan(dc.parse_args(["--smoke"]))
    cfg = dc.model_config(plan)
    step_cfg = dc.StepConfig(compute_dtype="float32", remat="full")
    full, estimate = dc.fitting_layers(plan, cfg, None, step_cfg)
    assert full == plan.layers
    one, small = dc.fitting_layers(plan, cfg, 1.0, step_cfg)  # nothing fits: stops at one layer
    assert one == 1 and small.total < estimate.total
    # a budget just above the one-layer estimate (/ the 0.92 margin) keeps exactly one layer
    kept, _ = dc.fitting_layers(plan, cfg, small.total / 0.92 + 1, step_cfg)
    assert kept == 1


def test_peak_flops_uses_datasheet_for_known_gpus_and_measures_otherwise():
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    pcie = types.SimpleNamespace(device_kind="NVIDIA H100 PCIe", platform="gpu")
    cpu = types.SimpleNamespace(device_kind="cpu", platform="cpu")
    assert dc.peak_flops(h100, lambda: 1.0)[0] == 989e12
    assert dc.peak_flops(pcie, lambda: 1.0)[0] == 756e12
    assert dc.peak_flops(cpu, lambda: 123.0) == (123.0, "cpu: measured matmul roof (no datasheet figure)")


def test_report_goals_and_skips():
    plan = dc.make_plan(dc.parse_args(["--smoke", "--lengths", "64"]))
    train = {"mfu_64": 0.5, "note": "", "peak_flops_source": "x", "peak_bytes": 116, "estimate_bytes": 100,
             "peak_source": "y"}
    lines = dc.report(plan, {"parity_max": 2e-4}, train,
                      {"jax_tokens_per_s": 10.0, "vllm_skipped": "no vllm", "handover_s": 0.5})
    by_name = {line.split()[1]: line for line in lines}
    assert "met=no" in by_name["name=parity"]  # 2e-4 > 1e-4
    assert "met=yes" in by_name["name=train_mfu_64"]
    assert "value=1.16" in by_name["name=peak_memory"] and "met=no" in by_name["name=peak_memory"]  # 16% > 15%
    assert "met=skipped" in by_name["name=sampler"] and "no vllm" in by_name["name=sampler"]
    assert "name=sleep_wake" not in " ".join(lines)  # no vLLM: nothing to put to sleep
    colocated = {"jax_tokens_per_s": 10.0, "vllm_tokens_per_s": 20.0, "sync_s": 0.9, "sleep_skipped": "cpu"}
    by_name = {line.split()[1]: line for line in dc.report(plan, {"parity_max": 0.0}, train, colocated)}
    assert "met=skipped" in by_name["name=sleep_wake"] and "cpu" in by_name["name=sleep_wake"]
    colocated.update(sleep_same_tokens=False, sleep_wake_s=1.5)
    lines = dc.report(plan, {"parity_max": 0.0}, dict(train, peak_bytes=114), colocated)
    by_name = {line.split()[1]: line for line in lines}
    assert "value=0 " in by_name["name=sleep_wake"] and "met=no" in by_name["name=sleep_wake"]
    assert "met=yes" in by_name["name=peak_memory"]
    assert "value=0.5 " in by_name["name=sampler"] and "met=no" in by_name["name=sampler"]
    assert "value=0.9 " in by_name["name=weight_sync"] and "met=yes" in by_name["name=weight_sync"]


def test_isolated_phase_result_travels_on_its_marked_line(smoke, tmp_path, monkeypatch, capsys):
    """The GPU layout (each phase in its own process): a child prints its result as a
    PHASE_MARK line (checked on the real entry point, in-process here), and the parent reads
    it whatever else the child prints, passing the other lines through (a stand-in child)."""
    plan, workdir = smoke
    assert dc.main(["--smoke", "--phase", "build", "--workdir", str(tmp_path)]) == 0
    marked = [line for line in capsys.readouterr().out.splitlines() if line.startswith(dc.PHASE_MARK)]
    assert len(marked) == 1 and '"params": ' in marked[0]
    child = tmp_path / "child.py"
    child.write_text('print("vllm log line")\nprint(%r + \'{"x": 1}\')\nprint("shutting down")\n' % dc.PHASE_MARK)
    monkeypatch.setattr(dc, "__file__", str(child))
    assert dc.run_phase("build", plan, workdir, [], isolate=True) == {"x": 1}
    assert capsys.readouterr().out == "vllm log line\nshutting down\n"
    child.write_text("import sys; sys.exit(3)\n")
    with pytest.raises(RuntimeError, match="phase build failed .exit 3."):
        dc.run_phase("build", plan, workdir, [], isolate=True)
