"""train_step: mesh equivalence, PyTorch-autograd gradient parity, micro-batching, one
step reduces the loss, zero-variance groups add nothing. One tiny model, compiled steps
reused across tests (module fixtures).

The mesh tests use the image batch (vision tower, shared per-prompt encoding, placeholder
features gathered by the host-computed ``image_slot``). Before the slots, the model's
placeholder scatter did a prefix sum over the flattened, row-sharded batch, whose ring
collective-permutes deadlocked XLA:CPU's thread pool on (2, 2, 2); see BUILD_NOTES."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _step_fixtures as fx  # noqa: E402

from caspo_jax.algo import CaspoConfig  # noqa: E402
from caspo_jax.bridge.hf_tensors import iter_hf_arrays  # noqa: E402
from caspo_jax.models import load_pretrained  # noqa: E402
from caspo_jax.models.qwen2_5_vl import canonical_hf_name  # noqa: E402
from caspo_jax.sharding import make_mesh  # noqa: E402
from caspo_jax.tiny import models as tm  # noqa: E402
from caspo_jax.step import (  # noqa: E402
    StepConfig,
    build_train_batch,
    compute_logprobs,
    init_state,
    make_train_step,
    rollout_advantages,
    shard_batch,
    shard_state,
    state_shardings,
)

MESH_TOL = 1e-5
# JAX vs PyTorch autograd, float32, same weights: |g_jax - g_torch| <= TORCH_TOL * max|g_torch|
# per tensor (different op order and attention kernels); measured ~1e-6.
TORCH_TOL = 1e-4
CASPO = CaspoConfig(group_size=fx.G, prompts_per_step=fx.P, beta=0.04)
# AdamW's first update is lr * g / (|g| + eps): with eps = 1e-8 a float32 rounding
# difference of 1e-9 in a 1e-8 gradient moves a parameter by ~1e-5 * lr / 1e-3, so the
# mesh comparison of updated parameters uses eps = 1e-6 (gradients are compared directly).
CFG = StepConfig(learning_rate=1e-3, max_grad_norm=1.0, adam_eps=1e-6)
# LLVM -O0 for the test executables: compile ~2.3x faster (8.7 s vs 20.3 s measured for
# the (2, 2, 2) step); every compared step uses it.
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_train_step")
    hf = tm.hf_model("vision", seed=5)
    hf.save_pretrained(path)
    model, params = load_pretrained(path)
    ids, mask, t_ids, t_mask, pixels, grids = fx.prompts(seed=6, constitution=4)
    r_ids, r_mask, index = fx.responses(seed=7)
    batch = build_train_batch(model, ids, mask, r_ids, r_mask, index, teacher_prompt_ids_PxL=t_ids,
                              teacher_prompt_mask_PxL=t_mask, pixel_values=pixels, image_grid_thw=grids)
    logp, _ = compute_logprobs(model, params, batch)
    teacher, _ = compute_logprobs(model, params, batch, layout="teacher")
    rng = np.random.default_rng(8)
    rewards = rng.standard_normal((fx.P, fx.G)).astype(np.float32)
    adv, _ = rollout_advantages(CASPO, rewards, teacher, logp, batch.response_mask)
    valid = batch.response_mask > 0
    noise = lambda: rng.normal(0, 0.3, logp.shape).astype(np.float32)  # noqa: E731
    batch = batch.with_signals(old_logp=np.where(valid, np.asarray(logp) + noise(), 0.0),
                               ref_logp=np.where(valid, np.asarray(logp) + noise(), 0.0), advantages=np.asarray(adv))
    step = make_train_step(model, CFG, CASPO, return_grads=True, compiler_options=FAST)
    state = init_state(params, CFG)
    new_state, metrics, grads = step(state, batch)
    return dict(hf=hf, model=model, params=params, batch=batch, step=step, state=state, new_state=new_state,
                metrics=metrics, grads=grads, teacher=teacher, logp=logp)


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2), (1, 8, 1), (2, 1, 4)])
def test_mesh_step_equals_single_device(world, shape):
    """Images included: loss, gradients (text, vision) and updated parameters <= 1e-5."""
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    model = world["model"]
    step = make_train_step(model, CFG, CASPO, mesh=mesh, return_grads=True, compiler_options=FAST)
    shardings = state_shardings(model, CFG, mesh)
    state = shard_state(init_state(world["params"], CFG), shardings)
    new_state, metrics, grads = step(state, shard_batch(world["batch"], mesh))
    assert abs(float(metrics["loss"]) - float(world["metrics"]["loss"])) <= MESH_TOL
    assert max_diff(grads, world["grads"]) <= MESH_TOL
    assert float(jnp.max(jnp.abs(world["grads"].vision.patch_embed))) > 0  # images reached the loss
    assert max_diff(new_state.params, world["new_state"].params) <= MESH_TOL
    q = new_state.params.text.layers.q_kernel
    assert q.sharding.spec == shardings.params.text.layers.q_kernel.spec
    assert len(q.sharding.device_set) == n
    mu = new_state.opt_state[1][0].mu.text.layers.q_kernel
    assert mu.sharding.spec == q.sharding.spec  # AdamW moments sharded like the parameter


def torch_loss_and_grads(hf, batch):
    """The same loss written in torch on the transformers model: full-row forward, response
    log-probs, PPO clipped surrogate + beta * k3 KL, token mean."""
    hf.zero_grad()
    hf.model.rope_deltas = None
    seq = batch.student
    patches = batch.pixel_values.shape[0] // fx.P
    rows = [batch.pixel_values[(b // fx.G) * patches:(b // fx.G + 1) * patches] for b in range(batch.num_rows)]
    out = hf(input_ids=torch.tensor(seq.input_ids, dtype=torch.long),
             attention_mask=torch.tensor(seq.attention_mask, dtype=torch.long),
             pixel_values=torch.tensor(np.concatenate(rows)),
             image_grid_thw=torch.tensor(np.asarray([fx.GRID] * batch.num_rows)),
             mm_token_type_ids=torch.tensor((seq.input_ids == tm.IMAGE_TOKEN_ID).astype(np.int64)))
    T, Lp = batch.response_len, seq.prompt_len
    logits = out.logits[:, Lp - 1:Lp - 1 + T]
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch.response_ids, dtype=torch.long)[..., None])[..., 0]
    mask = torch.tensor(batch.response_mask)
    old, ref, adv = (torch.tensor(np.asarray(x)) for x in (batch.old_logp, batch.ref_logp, batch.advantages))
    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CASPO.clip_low, 1 + CASPO.clip_high))
    x = torch.clamp(ref - logp, -20, 20)
    kl = torch.clamp(torch.exp(x) - x - 1, 0, 10)
    n = mask.sum()
    loss = (pg * mask).sum() / n + CASPO.beta * (kl * mask).sum() / n
    loss.backward()
    return float(loss.detach()), {canonical_hf_name(k): p.grad.numpy() for k, p in hf.named_parameters()}


def test_gradient_equals_pytorch_autograd(world):
    loss, torch_grads = torch_loss_and_grads(world["hf"], world["batch"])
    assert abs(loss - float(world["metrics"]["loss"])) <= 1e-5
    table = world["model"].param_table()
    seen = 0
    for name, ours in iter_hf_arrays(world["grads"], table):
        ref = torch_grads[name]
        scale = max(float(np.abs(ref).max()), 1e-8)
        assert np.abs(ours - ref).max() <= TORCH_TOL * scale, name
        seen += 1
    assert seen == len(torch_grads)
    assert np.abs(torch_grads["visual.patch_embed.proj.weight"]).max() > 0  # the ViT is trained too


def test_step_reduces_loss_and_reports_metrics(world):
    m = world["metrics"]
    for key in ("loss", "pg_loss", "kl", "entropy", "clipfrac", "approx_kl", "grad_norm", "learning_rate",
                "advantage_mean", "advantage_std"):
        assert np.isfinite(float(m[key])), key
    assert float(m["clipfrac"]) > 0 and float(m["kl"]) > 0  # the noisy old/ref log-probs exercise both
    assert float(m["learning_rate"]) == pytest.approx(CFG.learning_rate)
    _, again, _ = world["step"](world["new_state"], world["batch"])
    assert float(again["loss"]) < float(m["loss"]) - 1e-3


@pytest.fixture(scope="module")
def micro_step(world):
    return make_train_step(world["model"], CFG.replace(micro_batches=2), CASPO, return_grads=True,
                           compiler_options=FAST)


def test_micro_batches_match_one_batch(world, micro_step):
    new_state, metrics, grads = micro_step(world["state"], world["batch"])
    assert abs(float(metrics["loss"]) - float(world["metrics"]["loss"])) <= 1e-6
    assert max_diff(grads, world["grads"]) <= 1e-6
    assert max_diff(new_state.params, world["new_state"].params) <= 1e-5


def test_zero_variance_groups_add_nothing(world, micro_step):
    """Group 0 has equal rewards: its advantages are exactly 0, and replacing its responses
    by other tokens leaves the gradient unchanged. The KL term is neutralised without a
    recompile: ref_logp = logp + 100 puts k3 on its clamp (constant 10, zero gradient)."""
    batch, mask = world["batch"], world["batch"].response_mask
    rewards = np.asarray([[1.0] * fx.G, [0.0, 1.0, 0.0, 1.0]], np.float32)
    adv, metrics = rollout_advantages(CASPO, rewards, world["teacher"], world["logp"], mask)
    assert np.all(np.asarray(adv)[:fx.G] == 0.0) and float(metrics["zero_variance_group_frac"]) == 0.5
    base = batch.with_signals(advantages=np.asarray(adv), ref_logp=np.asarray(batch.old_logp) + 100.0)
    _, _, grads = micro_step(world["state"], base)
    rows = np.arange(batch.num_rows)[:, None] < fx.G
    other = np.where(rows & (mask > 0), (batch.response_ids + 7) % 500, batch.response_ids).astype(np.int32)
    ids = base.student.input_ids.copy()
    ids[:, base.student.prompt_len:] = other
    changed = dataclasses.replace(base, response_ids=other, student=dataclasses.replace(base.student, input_ids=ids))
    assert np.any(changed.student.input_ids != base.student.input_ids)
    _, _, grads_changed = micro_step(world["state"], changed)
    assert max_diff(grads, grads_changed) <= 1e-7
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4


def test_bfloat16_step_with_truncated_is(world):
    """One executable, bfloat16 compute + TIS (cap 2): with rollout_logp == old_logp every
    weight is 1 and the loss matches float32; with the rollout engine 3x less likely than
    pi_old every weight is capped at 2, doubling the policy term."""
    cfg = CFG.replace(compute_dtype="bfloat16", tis_cap=2.0)
    step = make_train_step(world["model"], cfg, CASPO.replace(beta=0.0), compiler_options=FAST)
    state = init_state(world["params"], cfg)
    old = np.asarray(world["batch"].old_logp)
    _, same = step(state, world["batch"].with_signals(rollout_logp=old))
    assert float(same["is_weight_mean"]) == pytest.approx(1.0) and float(same["is_corrected_frac"]) == 0.0
    assert float(same["pg_loss"]) == pytest.approx(float(world["metrics"]["pg_loss"]), abs=5e-3)
    _, capped = step(state, world["batch"].with_signals(rollout_logp=old - np.log(3.0)))
    assert float(capped["is_weight_mean"]) == pytest.approx(2.0) and float(capped["is_corrected_frac"]) == 1.0
    assert float(capped["pg_loss"]) == pytest.approx(2 * float(same["pg_loss"]), rel=1e-4)
    for leaf in jax.tree.leaves(state.params):
        assert leaf.dtype == jnp.float32  # master weights stay float32


def test_sequence_masked_is_in_the_step_equals_zeroed_advantages(world):
    """rollout_correction mis_seq inside the jitted step: rows whose rollout log-probs sit
    log 3 below pi_old (mean log-ratio 1.10 > log 2) leave the loss; the others, with
    rollout == old, weigh 1. Loss and gradients equal the uncorrected step on advantages
    zeroed on the dropped rows."""
    from caspo_jax.step.correction import RolloutCorrection

    batch = world["batch"]
    old = np.asarray(batch.old_logp)
    dropped = (np.arange(batch.num_rows) % 2 == 0)[:, None]
    rollout = np.where(dropped, old - np.log(3.0), old)
    step = make_train_step(world["model"], CFG, CASPO, return_grads=True, compiler_options=FAST,
                           correction=RolloutCorrection("mis_seq", 2.0))
    _, metrics, grads = step(world["state"], batch.with_signals(rollout_logp=rollout))
    zeroed = batch.with_signals(advantages=np.where(dropped, 0.0, np.asarray(batch.advantages)))
    _, expected, expected_grads = world["step"](world["state"], zeroed)
    assert float(metrics["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-6, abs=1e-7)
    assert max_diff(grads, expected_grads) <= 1e-7
    valid = np.asarray(batch.response_mask) > 0
    assert float(metrics["is_corrected_frac"]) == pytest.approx(valid[dropped[:, 0]].sum() / valid.sum(), rel=1e-6)
    assert float(metrics["is_weight_mean"]) == pytest.approx(valid[~dropped[:, 0]].sum() / valid.sum(), rel=1e-6)
