"""scripts/check_cuda_majors.py on saved pip reports (tests/fixtures, trimmed to the packages it
reads): `pip install --dry-run --report` of jax[cuda12] + vllm 0.33 (the old gpu extra: two
majors) and of jax[cuda13] + vllm 0.33 (the new one), resolved 2026-12-07 for Python 3.11."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_cuda_majors", ROOT / "scripts" / "check_cuda_majors.py")
ccm = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ccm
spec.loader.exec_module(ccm)


def report(name):
    return json.loads((ROOT / "tests" / "fixtures" / f"pip_report_gpu_{name}.json").read_text())


def test_old_extra_mixes_cuda_12_and_13():
    old = report("jax_cuda12")
    assert (ccm.jax_cuda_major(old), ccm.torch_cuda_major(old)) == (12, 13)
    ok, lines = ccm.judge(old)
    assert not ok
    assert lines[-1].startswith("FAIL: JAX's plugin is CUDA 12 but torch is built on CUDA 13: pick jax[cuda13]")
    wheels = ccm.suffixed_wheels(old)
    assert "nvidia-cudnn-cu12==9.28.0.42" in wheels[12] and "nvidia-cudnn-cu13==9.24.0.43" in wheels[13]


def test_new_extra_has_one_major():
    new = report("jax_cuda13")
    assert (ccm.jax_cuda_major(new), ccm.torch_cuda_major(new)) == (13, 13)
    ok, lines = ccm.judge(new)
    assert ok and lines[-1] == "OK: JAX and torch share CUDA 13"
    assert lines[0] == "resolved: jax 0.10.2, torch 2.14.0, vllm 0.33.0"
    # vLLM's CUTLASS DSL ships both majors' libraries: listed, not judged
    assert ccm.suffixed_wheels(new)[12] == ["nvidia-cutlass-dsl-libs-cu12==4.8.0"]


def meta(name, version, requires=()):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


@pytest.mark.parametrize("requires, major", [
    (['cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"', "filelock"], 13),
    (['nvidia-cudnn-cu12==9.10.2.21; platform_system == "Linux" and platform_machine == "x86_64"'], 12),
    (['nvidia-nccl-cu12==2.27; extra == "distributed"', "sympy"], None),  # an extra's wheel does not count
    (["filelock", "sympy"], None),  # a CPU build
])
def test_torch_cuda_major_from_its_requirements(requires, major):
    assert ccm.torch_cuda_major({"install": [meta("torch", "2.x", requires)]}) == major


def test_missing_sides_fail():
    cpu = {"install": [meta("torch", "2.13.0+cpu", ["filelock"]), meta("jax-cuda13-plugin", "0.10.2")]}
    ok, lines = ccm.judge(cpu)
    assert not ok and lines[-1] == "FAIL: no CUDA major found for torch"
    ok, lines = ccm.judge({"install": []})
    assert not ok and lines[-1] == "FAIL: no CUDA major found for JAX and torch"


def test_main_exit_status(tmp_path, capsys):
    assert ccm.main(["--report", str(ROOT / "tests/fixtures/pip_report_gpu_jax_cuda13.json")]) == 0
    assert ccm.main(["--report", str(ROOT / "tests/fixtures/pip_report_gpu_jax_cuda12.json")]) == 1
    assert "FAIL" in capsys.readouterr().out
