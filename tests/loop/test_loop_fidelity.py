"""Every log-prob that meets another in a ratio, a KL or a token reward is computed alike:
the train step's compute dtype (model.dtype) and the rollout's temperature.

- precision (issue #17.2): with model.dtype=bfloat16 the frozen reference and teacher are
  bfloat16 copies while the policy's master weights are float32. Before the fix the old
  log-probs ran in float32 and the reference's in bfloat16, so the KL was not 0 at step 0
  and r_t not 0 for a teacher prompt equal to the student's; the DPO reference likewise.
- temperature (issue #17.4): the sampler draws from softmax(logits / T); the trainer's
  log-probs (old, reference, teacher, current) divide by the same T, and equal the
  sampler's own to 1e-5 in float32.

One tiny Qwen2.5-VL (one image per prompt, P = 2 prompts x G = 4 responses).
"""

import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "step"))
import _step_fixtures as fx  # noqa: E402

from caspo_jax.algo import CaspoConfig  # noqa: E402
from caspo_jax.models import load_pretrained  # noqa: E402
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams  # noqa: E402
from caspo_jax.rollout.types import logit_temperature  # noqa: E402
from caspo_jax.tiny import models as tm  # noqa: E402
from caspo_jax.step import (build_train_batch, compute_logprobs, init_state, make_train_step,  # noqa: E402
                             step_logprobs)
from caspo_jax.step.logprobs import cast_floats  # noqa: E402
from caspo_jax.loop.caspo import rollout_signals  # noqa: E402
from caspo_jax.loop.config import load_config, step_config  # noqa: E402
from caspo_jax.loop.sft_dpo import _supervised_step, _reference_logprobs  # noqa: E402

DTYPES = ("float32", "bfloat16")
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fidelity")
    tm.hf_model("text", seed=5, num_layers=1).save_pretrained(path)
    return path


def _step_cfg(dtype: str, temperature: float = 1.0, stage: str = "caspo"):
    """The train step's config as `caspo train` (`caspo dpo`) builds it from a run config."""
    cfg = load_config(preset="tiny-cpu", overrides=[f"model.dtype={dtype}", f"rollout.temperature={temperature}",
                                                    "algo.learning_rate=1e-3", "dpo.learning_rate=1e-3"])
    return step_config(cfg, stage)


def _same_prompt_batch(model):
    """Student and teacher layouts of the same prompts (r_t must then be 0)."""
    ids, mask, _, _, pixels, grids = fx.prompts(seed=6)
    r_ids, r_mask, index = fx.responses(seed=7)
    return build_train_batch(model, ids, mask, r_ids, r_mask, index, teacher_prompt_ids_PxL=ids,
                             teacher_prompt_mask_PxL=mask, pixel_values=pixels, image_grid_thw=grids)


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_zero_kl_and_token_rewards_are_exactly_zero(checkpoint, dtype):
    model, policy_params = load_pretrained(checkpoint, dtype=jnp.dtype(dtype))  # as build_policy loads it
    step_cfg = _step_cfg(dtype)
    assert step_cfg.compute_dtype == dtype
    state = init_state(policy_params, step_cfg)  # float32 master weights
    ref_params = cast_floats(policy_params, step_cfg.compute_dtype)  # run_caspo's frozen reference
    batch = _same_prompt_batch(model)
    rewards = np.random.default_rng(0).standard_normal((fx.P, fx.G)).astype(np.float32)
    ok = np.ones(fx.P, bool)
    for teacher in ("frozen_sft", "rollout_policy"):
        caspo = CaspoConfig(group_size=fx.G, prompts_per_step=fx.P, beta=0.05, variant="token", teacher=teacher)
        signals = rollout_signals(model, step_cfg, caspo, batch, state.params, ref_params, rewards, ok)
        np.testing.assert_array_equal(np.asarray(signals.ref_logp), np.asarray(signals.old_logp))
        np.testing.assert_array_equal(np.asarray(signals.teacher_logp), np.asarray(signals.old_logp))
        assert not np.asarray(signals.advantages).any()  # TokR: r_hat of r_t = 0 everywhere
        for key in ("token_reward_mean", "token_reward_std", "token_reward_min", "token_reward_max"):
            assert float(signals.metrics[key]) == 0.0, key
    # the train step's current log-probs (float32 master cast to the compute dtype inside the
    # gradient) equal the reference's too: KL exactly 0, no ratio clipped
    adv = np.random.default_rng(1).standard_normal(signals.old_logp.shape).astype(np.float32)
    placed = batch.with_signals(old_logp=np.asarray(signals.old_logp), ref_logp=np.asarray(signals.ref_logp),
                                advantages=adv * np.asarray(batch.response_mask))
    _, metrics = make_train_step(model, step_cfg, caspo, compiler_options=FAST)(state, placed)
    assert float(metrics["kl"]) == 0.0 and float(metrics["clipfrac"]) == 0.0
    if dtype == "bfloat16":  # the old mix: float32 old log-probs against the bfloat16 reference
        float32_old = np.asarray(compute_logprobs(model, state.params, batch)[0])
        assert np.abs(float32_old - np.asarray(signals.ref_logp)).max() > 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_dpo_reference_has_the_policys_precision(checkpoint, dtype):
    """First DPO step: policy = reference, so every margin is exactly 0 and the loss log 2."""
    from caspo_jax.loop.data import EncodedExchange, exchange_batch

    model, policy_params = load_pretrained(checkpoint, dtype=jnp.dtype(dtype))
    step_cfg = _step_cfg(dtype, temperature=0.7, stage="dpo")  # DPO scores at 1 whatever the rollout's
    assert step_cfg.temperature == 1.0
    ids, mask, _, _, pixels, grids = fx.prompts(seed=6)
    r_ids, r_mask, _ = fx.responses(seed=7)
    per_image = len(pixels) // fx.P
    chosen_rejected = [tuple(r_ids[i][r_mask[i] > 0] for i in (2 * p, 2 * p + 1)) for p in range(fx.P)]
    examples = [EncodedExchange(ids[p][mask[p] > 0], chosen_rejected[p], pixels[p * per_image:(p + 1) * per_image],
                                grids[p:p + 1]) for p in range(fx.P)]
    prompt_len, response_len = 16 * -(-ids.shape[1] // 16), fx.T
    reference = _reference_logprobs(model, policy_params, _NoMesh(), examples, np.arange(fx.P), fx.P, 0, prompt_len,
                                    response_len, False, step_cfg=step_cfg)
    batch = exchange_batch(model, examples, 0, prompt_len, response_len)
    ref = np.concatenate([reference[:, 0], reference[:, 1]])
    state = init_state(policy_params, step_cfg)
    _, metrics = _supervised_step(model, step_cfg, "dpo", 0.1, state, batch.with_signals(ref_logp=ref), ref)
    assert float(metrics["reward_margin"]) == 0.0
    assert float(metrics["chosen_reward"]) == 0.0 and float(metrics["rejected_reward"]) == 0.0
    assert float(metrics["loss"]) == pytest.approx(math.log(2.0), rel=1e-6)


class _NoMesh:
    """The one-device Placement's batch / to_host (no mesh: arrays as they are)."""

    def batch(self, batch):
        return batch

    def to_host(self, tree):
        return tree


def test_logprobs_at_the_rollout_temperature_equal_the_samplers(checkpoint):
    model, params = load_pretrained(checkpoint)
    ids, mask, _, _, pixels, grids = fx.prompts(seed=6)
    per_image = len(pixels) // fx.P
    prompts = [RolloutPrompt(ids[p][mask[p] > 0], pixels[p * per_image:(p + 1) * per_image], grids[p:p + 1])
               for p in range(fx.P)]
    sampling = SamplingParams(temperature=0.7, max_new_tokens=8, seed=3)
    rollouts = JaxSampler(model, params).generate(prompts, n=fx.G, sampling=sampling)
    assert rollouts.mask.sum() > 10
    batch = build_train_batch(model, ids, mask, rollouts.tokens, rollouts.mask, rollouts.prompt_index,
                              pixel_values=pixels, image_grid_thw=grids)
    step_cfg = _step_cfg("float32", temperature=0.7)
    assert step_cfg.temperature == 0.7
    logp = np.asarray(step_logprobs(model, step_cfg, params, batch)[0])
    np.testing.assert_allclose(logp, rollouts.logprobs, atol=1e-5, rtol=0)
    # teeth: the temperature-1 log-probs (what the trainer computed before) are far off
    untempered = np.asarray(compute_logprobs(model, params, batch)[0])
    assert np.abs(untempered - rollouts.logprobs).max() > 1e-2
    # the train step's current log-probs divide by the same T: with old = ref = the
    # sampler's T-log-probs the step-0 KL is 0 (at temperature 1 it is not)
    caspo = CaspoConfig(group_size=fx.G, prompts_per_step=fx.P, beta=0.05)
    placed = batch.with_signals(old_logp=logp, ref_logp=logp,
                                advantages=np.asarray(batch.response_mask) * np.float32(0.5))
    _, metrics = make_train_step(model, step_cfg, caspo, compiler_options=FAST)(init_state(params, step_cfg), placed)
    assert float(metrics["kl"]) == 0.0 and float(metrics["clipfrac"]) == 0.0


def test_greedy_rollouts_score_at_temperature_one():
    """Temperature 0 (greedy) has no tempered distribution: sampler and trainer use T = 1."""
    assert SamplingParams(temperature=0.0).logit_temperature == 1.0
    assert logit_temperature(0.0) == 1.0 and logit_temperature(0.7) == 0.7
    assert _step_cfg("float32", temperature=0.0).temperature == 1.0
