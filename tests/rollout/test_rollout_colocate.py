"""colocate: the GPU memory split between JAX and an in-process vLLM engine, JAX's memory
fraction set before (and refused after) its start, and vLLM's sleep mode around the update
(fake engines: vLLM sleeps only on CUDA)."""

import logging
import os
import subprocess
import sys
import types

import pytest

from caspo_jax.rollout import colocate
from caspo_jax.rollout.colocate import ColocationError, MemorySplit


def test_memory_split_for_engine_share():
    split = MemorySplit.for_engine(0.3)
    assert (split.trainer, split.engine) == (0.65, 0.3)  # 1 - 0.05 headroom - 0.3
    assert split.engine_kwargs() == {"gpu_memory_utilization": 0.3, "enable_sleep_mode": True}
    assert split.engine_kwargs(sleep_mode=False) == {"gpu_memory_utilization": 0.3}
    assert split.describe(80) == ("trainer (JAX) 0.65 (52.0 GiB), vLLM engine 0.30 (24.0 GiB), "
                                  "headroom 0.05 (4.0 GiB)")
    assert MemorySplit.for_engine(None) is None


@pytest.mark.parametrize("share", [0.0, 0.95, 1.2, -0.1])
def test_memory_split_rejects_shares_that_leave_nothing(share):
    with pytest.raises(ColocationError, match="model.gpu_memory_split"):
        MemorySplit.for_engine(share)


def test_memory_split_needs_headroom():
    with pytest.raises(ColocationError, match="lower model.gpu_memory_split"):
        MemorySplit(trainer=0.7, engine=0.3)


def test_set_jax_memory_fraction_before_and_after_jax_starts():
    """In a fresh process: set before the first device use, it reaches the environment; after,
    a different value is refused (JAX would ignore it), the same one accepted."""
    code = """
import jax, os
from caspo_jax.rollout import colocate
assert not colocate.jax_started()
colocate.set_jax_memory_fraction(0.4)
assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.4"
jax.devices()
assert colocate.jax_started()
colocate.set_jax_memory_fraction(0.4)
try:
    colocate.set_jax_memory_fraction(0.5)
except colocate.ColocationError as err:
    print("REFUSED", err)
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REFUSED JAX has already started its backends" in out.stdout
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 would be ignored (now 0.4)" in out.stdout


def test_apply_memory_split_only_for_a_colocated_vllm_engine(monkeypatch, caplog):
    monkeypatch.setattr(colocate, "jax_started", lambda: False)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset")  # restored after the test
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    assert colocate.apply_memory_split(0.3, "jax") is None
    assert colocate.apply_memory_split(None, "vllm") is None
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
    split = colocate.apply_memory_split(0.3, "vllm")
    assert split == MemorySplit(0.65, 0.3)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.65"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")  # e.g. launch/recipes/slurm_gpu.sbatch's
    with caplog.at_level(logging.INFO, logger=colocate.__name__):
        colocate.apply_memory_split(0.3, "vllm")
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.65"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.65 replaces 0.90 from the environment" in caplog.text


class FakeLLM:
    """Records the calls `engine_asleep` makes on a vLLM LLM."""

    def __init__(self, calls, sleep_mode=True):
        self.calls = calls
        model_config = types.SimpleNamespace(enable_sleep_mode=sleep_mode)
        self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(model_config=model_config),
                                                reset_encoder_cache=lambda: calls.append("reset_encoder_cache"))

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self):
        self.calls.append("wake_up")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def reset_mm_cache(self):
        self.calls.append("reset_mm_cache")


def engine(calls, **kwargs):
    return types.SimpleNamespace(llm=FakeLLM(calls, **kwargs))


WAKE = ["wake_up", "reset_prefix_cache", "reset_encoder_cache", "reset_mm_cache"]


def test_level_1_sleeps_during_the_block_and_wakes_after():
    calls = []
    with colocate.engine_asleep(engine(calls)) as slept:
        calls.append("update")
    assert slept is True
    assert calls == ["sleep(1)", "update", *WAKE]


def test_level_2_requires_a_repush_and_runs_it_after_waking():
    calls = []
    with pytest.raises(ColocationError, match="trl#5312"):
        with colocate.engine_asleep(engine(calls), level=2):
            pass
    assert calls == []  # refused before sleeping
    with colocate.engine_asleep(engine(calls), level=2, repush=lambda: calls.append("repush")):
        calls.append("update")
    assert calls == ["sleep(2)", "update", *WAKE, "repush"]


def test_the_engine_wakes_even_when_the_update_fails():
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        with colocate.engine_asleep(engine(calls), level=2, repush=lambda: calls.append("repush")):
            raise RuntimeError("boom")
    assert calls == ["sleep(2)", *WAKE, "repush"]


def test_engines_that_cannot_sleep_run_the_block_awake_and_say_why_once(caplog, monkeypatch):
    monkeypatch.setattr(colocate, "_reasons_logged", set())
    calls = []
    with caplog.at_level(logging.INFO, logger=colocate.__name__):
        for _ in range(2):
            with colocate.engine_asleep(engine(calls, sleep_mode=False)) as slept:
                calls.append("update")
            assert slept is False
        with colocate.engine_asleep(types.SimpleNamespace(params=None)) as slept:  # e.g. the JAX sampler
            assert slept is False
    assert calls == ["update", "update"]
    messages = [r.getMessage() for r in caplog.records if r.name == colocate.__name__]
    assert len(messages) == 2
    assert "enable_sleep_mode=True" in messages[0] and "holds no vLLM engine" in messages[1]


def test_bad_sleep_level():
    with pytest.raises(ColocationError, match="level=3"):
        with colocate.engine_asleep(engine([]), level=3):
            pass


def test_the_kv_cache_bound_is_decided_where_the_engine_runs():
    """VllmEngine.start's "auto": vLLM sizes the cache within gpu_memory_utilization on a CUDA
    host, a fixed bound on a CPU host (vLLM-CPU's own default is GiBs); explicit values pass."""
    from caspo_jax.rollout.vllm_engine import CPU_KV_CACHE_BYTES, kv_cache_bytes

    assert kv_cache_bytes("auto", cuda=True) is None
    assert kv_cache_bytes("auto", cuda=False) == CPU_KV_CACHE_BYTES == 256 * 2**20
    assert kv_cache_bytes(64 * 2**20, cuda=True) == 64 * 2**20 and kv_cache_bytes(None, cuda=False) is None
