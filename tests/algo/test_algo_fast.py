"""The fast path (`caspo_jax.algo._fast`) against the readable maths it stands in for.

`caspo_loss` / `policy_loss` and `caspo_advantages` dispatch to `_fast` by default; with
`fast=False` they run the plain formulas, the reference here: same loss, gradients,
metrics and advantages on random masked batches with NaN at absent positions. Also: many
small row blocks give the same numbers as one, and the packed clip counts are exact.
The other tests use arrays that fit one block; here `BLOCK_ELEMENTS` is shrunk so that
the row-block loop (`map_row_blocks`) really runs over several blocks (the loss's, and
the token-reward statistics' of the advantages).
"""

import contextlib
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caspo_jax.algo import (
    caspo_advantages,
    caspo_loss,
    group_normalize,
    hybrid_advantages,
    normalize_token_signal,
    policy_loss,
)
from caspo_jax.algo import _fast
from caspo_jax.algo._fast import _count_codes, _decode_counts

sys.path.insert(0, str(Path(__file__).parent))
from test_algo_gradients import _batch, _fast_token_signal, _reference_loss  # noqa: E402
from test_algo_losses import _random  # noqa: E402


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 18 values: 2 rows of the 9-token loss batch, 3 of the 6-token advantages'."""
    monkeypatch.setattr(_fast, "BLOCK_ELEMENTS", 18)
    jax.clear_caches()
    yield
    jax.clear_caches()


@contextlib.contextmanager
def one_block():
    """Blocks large enough for the whole test batch. The caches are cleared so that a
    function traced under the small blocks is traced again (else jit would replay it)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_fast, "BLOCK_ELEMENTS", 1 << 17)
        jax.clear_caches()
        yield
    jax.clear_caches()


def test_rows_per_block_is_the_largest_divisor_that_fits(monkeypatch):
    monkeypatch.setattr(_fast, "BLOCK_ELEMENTS", 100)
    assert _fast.rows_per_block(12, 10) == 6  # 10 rows fit, 6 is the largest divisor
    assert _fast.rows_per_block(7, 10) == 7  # prime, all fit
    assert _fast.rows_per_block(13, 10) == 1  # prime, only single rows divide it
    assert _fast.rows_per_block(3, 40) == 1  # groups of 40 values: 2 fit, but 2 does not divide 3
    assert _fast.rows_per_block(6, 1000) == 1  # a row larger than a block still goes alone
    monkeypatch.setattr(_fast.jax, "default_backend", lambda: "gpu")
    assert _fast.rows_per_block(12, 10) == 12  # off the CPU: one block, XLA fuses the pass


@pytest.mark.parametrize("agg,kl_kind,dual_clip,beta", [
    ("token-mean", "k3", None, 0.1), ("seq-mean-token-mean", "k2", 3.0, 0.1),
    ("seq-mean-token-sum", "abs", None, 0.1), ("seq-mean-token-sum-norm", "k1", 3.0, 0.1),
    ("token-mean", "k3", 3.0, 0.0),
])
def test_blocked_loss_and_gradients_equal_the_reference(small_blocks, agg, kl_kind, dual_clip, beta):
    logp, old, ref, adv, mask = _batch(7, dual_clip)
    logp[~mask] = np.nan  # absent garbage must not leak from any block
    kw = {"beta": beta, "kl_kind": kl_kind, "agg": agg, "dual_clip": dual_clip}
    args = (logp, old, ref, adv, mask)
    (loss, metrics), grads = jax.value_and_grad(lambda *a: caspo_loss(*a, **kw), argnums=(0, 1, 2, 3),
                                                has_aux=True)(*args)
    clean = np.where(mask, logp, old)
    want_loss, want_grads = jax.value_and_grad(functools.partial(_reference_loss, **kw),
                                               argnums=(0, 1, 2, 3))(clean, old, ref, adv, mask)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
        assert np.all(np.asarray(got)[~mask] == 0.0)
    # Metrics: the same as one block holding everything.
    with one_block():
        _, whole = caspo_loss(clean, old, ref, adv, mask, **kw)
    for key, value in whole.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_blocked_policy_loss_counts_clipped_tokens_exactly(small_blocks):
    """32-token rows, one per block: the counts take the packed bfloat16 path inside the loop."""
    logp, old, _, adv, mask = _random(T=32, seed=3, spread=0.4)
    mask[0, :2], adv[0, :2], logp[0, :2] = True, -1.0, old[0, :2] + 1.5  # two dual-clipped tokens
    _, metrics = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    ratio = np.exp(np.clip(logp - old, -20, 20))
    n = mask.sum()
    high = mask & (adv > 0) & (ratio > 1.2)
    low = mask & (adv < 0) & (ratio < 0.8)
    dual = mask & (adv < 0) & (ratio > 3.0)
    assert high.sum() > 0 and low.sum() > 0 and dual.sum() > 0
    np.testing.assert_allclose(metrics["clipfrac_high"], high.sum() / n, rtol=1e-6)
    np.testing.assert_allclose(metrics["clipfrac_low"], low.sum() / n, rtol=1e-6)
    np.testing.assert_allclose(metrics["dual_clipfrac"], dual.sum() / n, rtol=1e-6)


@pytest.mark.parametrize("T", [1024, 200, 17, 13])
def test_packed_counts_are_exact_even_when_every_token_counts(T):
    """T=1024: chunks of 128 with every field at its maximum; 200: chunks of 100; 17: one
    chunk of 17; 13: no chunk of at least 16 tokens, so the counts are summed separately."""
    rng = np.random.default_rng(T)
    valid = np.ones((5, T), bool)
    high = np.zeros((5, T), bool)
    low = np.zeros((5, T), bool)
    high[1] = True  # a row of only clipped-high tokens
    low[2] = True  # a row of only clipped-low tokens
    valid[3] = rng.random(T) < 0.5
    high[3] = valid[3] & (rng.random(T) < 0.5)
    low[3] = valid[3] & ~high[3] & (rng.random(T) < 0.5)
    valid[4] = False
    counts = jax.jit(lambda *a: _decode_counts(_count_codes(*a)))(valid, high, low)
    np.testing.assert_array_equal(counts["valid"], valid.sum(-1))
    np.testing.assert_array_equal(counts["clipped_high"], high.sum(-1))
    np.testing.assert_array_equal(counts["clipped_low"], low.sum(-1))


def _groups(P=5, G=3, T=6, seed=0):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(P, G)).astype(np.float32)
    student = -rng.gamma(2.0, size=(P * G, T)).astype(np.float32)
    teacher = (student + rng.normal(scale=0.3, size=(P * G, T))).astype(np.float32)
    mask = np.arange(T)[None, :] < rng.integers(1, T + 1, size=P * G)[:, None]
    mask[0, 0] = False  # group 0's shift comes from its second trajectory
    mask[3:6] = False  # group 1 has no valid token at all
    teacher[6:9] = 2.5  # group 2: a constant signal ...
    student[6:9] = 0.5  # ... must give exactly 0 token advantage
    return rewards, teacher, student, mask


@pytest.mark.parametrize("variant,clamp,nonneg", [("hybrid", None, False), ("hybrid", 0.2, True),
                                                  ("token", None, False)])
def test_blocked_advantages_equal_the_public_pieces(small_blocks, variant, clamp, nonneg):
    rewards, teacher, student, mask = _groups()
    P, G = rewards.shape
    T = mask.shape[1]
    dirty_teacher = np.where(mask, teacher, np.nan).astype(np.float32)
    adv, metrics = caspo_advantages(rewards, dirty_teacher, student, mask, lam=0.3, variant=variant,
                                    token_reward_clamp=clamp, nonneg_factor=nonneg)
    r = np.where(mask, teacher - student, 0.0)
    if clamp is not None:
        r = np.clip(r, -clamp, clamp)
    with one_block():  # the public pieces, each in one block
        r_hat = normalize_token_signal(r.reshape(P, G, T), mask.reshape(P, G, T), scope="group")
        want = hybrid_advantages(group_normalize(rewards), r_hat, mask.reshape(P, G, T), lam=0.3, variant=variant,
                                 nonneg_factor=nonneg).reshape(P * G, T)
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(adv)[~mask] == 0.0)
    np.testing.assert_allclose(metrics["token_reward_mean"], r[mask].mean(), rtol=1e-6, atol=1e-7)
    if variant == "token":
        assert np.all(np.asarray(adv)[6:9] == 0.0)  # the constant group


def _numpy_zscore(r, mask, axes):
    """The z-score written out: mean and sample std (ddof=1) over each population's valid values."""
    out = np.zeros_like(r, dtype=np.float64)
    keep = tuple(a for a in range(r.ndim) if a not in axes)
    for idx in np.ndindex(*(r.shape[a] for a in keep)):
        sel = [slice(None)] * r.ndim
        for a, i in zip(keep, idx):
            sel[a] = i
        x, m = r[tuple(sel)], mask[tuple(sel)]
        vals = x[m].astype(np.float64)
        if vals.size >= 2 and vals.std(ddof=1) >= 1e-6:
            out[tuple(sel)] = np.where(m, (x - vals.mean()) / (vals.std(ddof=1) + 1e-6), 0.0)
    return out


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_blocked_token_signal_equals_numpy(small_blocks, scope):
    """Statistics over 3-row blocks merged across blocks (batch scope: across every group)."""
    rewards, teacher, student, mask = _groups(seed=4)
    P, G = rewards.shape
    T = mask.shape[1]
    r = np.where(mask, teacher - student, 0.0).astype(np.float32).reshape(P, G, T)
    m = mask.reshape(P, G, T)
    want = _numpy_zscore(r, m, (1, 2) if scope == "group" else (0, 1, 2))
    np.testing.assert_allclose(_fast_token_signal(r, m, scope=scope), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(normalize_token_signal(r, m, scope=scope), want, rtol=1e-5, atol=1e-6)
    adv, metrics = caspo_advantages(rewards, teacher, student, mask, lam=0.3, variant="token", token_scope=scope)
    np.testing.assert_allclose(adv, want.reshape(P * G, T), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["token_reward_mean"], r[m].mean(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_blocked_token_signal_gradients_ignore_absent_garbage(small_blocks, scope):
    rewards, teacher, student, mask = _groups(seed=5)
    P, G = rewards.shape
    T = mask.shape[1]
    m = mask.reshape(P, G, T)
    r = np.where(m, (teacher - student).reshape(P, G, T), np.nan).astype(np.float32)
    weights = np.random.default_rng(5).normal(size=r.shape).astype(np.float32)

    def objective(z_of, x):
        return jnp.sum(z_of(x, m, scope=scope) * weights)

    grad = jax.grad(functools.partial(objective, _fast_token_signal))(r)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~m] == 0.0)
    with one_block():
        want = jax.grad(functools.partial(objective, _fast_token_signal))(np.where(m, r, 0.0))
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
    # ... and the readable z-score's gradient, NaN and all.
    readable = jax.grad(functools.partial(objective, normalize_token_signal))(r)
    assert np.all(np.asarray(readable)[~m] == 0.0)
    np.testing.assert_allclose(grad, readable, rtol=1e-4, atol=1e-6)


def test_map_row_blocks_rejects_blocks_that_do_not_divide_the_rows():
    with pytest.raises(ValueError, match="do not divide"):
        _fast.map_row_blocks(lambda x: jnp.sum(x, -1), (jnp.ones((5, 2)),), 2)


def test_blocked_step_under_jit_matches_one_block(small_blocks):
    rewards, teacher, student, mask = _groups(seed=2)
    logp = (student + 0.1).astype(np.float32)

    def step(rewards, teacher, student, logp, mask):
        adv, _ = caspo_advantages(rewards, teacher, student, mask, lam=0.3)
        return jax.grad(lambda lp: caspo_loss(lp, student, student, adv, mask, beta=0.005)[0])(logp), adv

    calls = []
    counting = _fast.rows_per_block

    def spy(num_rows, row_elements):
        calls.append((num_rows, row_elements, counting(num_rows, row_elements)))
        return calls[-1][-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_fast, "rows_per_block", spy)
        grad, adv = jax.jit(step)(rewards, teacher, student, logp, mask)
        blocked = list(calls)
        with one_block():
            want_grad, want_adv = jax.jit(step)(rewards, teacher, student, logp, mask)
    # Traced twice: the 15 token rows (the advantages' statistics, the loss) 3 per block,
    # then in one block; the [5, 3] rewards fit one block either way.
    token_rows = lambda traced: sorted({rows for n, width, rows in traced if (n, width) == (15, 6)})  # noqa: E731
    assert token_rows(blocked) == [3] and token_rows(calls[len(blocked):]) == [15]
    assert sum((n, width) == (15, 6) for n, width, _ in blocked) == 2  # advantages and loss
    np.testing.assert_allclose(adv, want_adv, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-10)
    assert jnp.asarray(grad).dtype == jnp.float32


# ---------------------------------------------------------------- fast == readable


@pytest.fixture
def blocks(request, monkeypatch):
    """"one": the default blocks (each test batch fits one); "small": 18-value blocks."""
    if request.param == "small":
        monkeypatch.setattr(_fast, "BLOCK_ELEMENTS", 18)
    jax.clear_caches()
    yield request.param
    jax.clear_caches()


def _with_absent_nan(*arrays_BxT, mask):
    return tuple(np.where(mask, a, np.nan).astype(np.float32) for a in arrays_BxT)


LOSS_CASES = [  # (agg, kl_kind, dual_clip, beta); beta 0 runs without ref_logp
    ("token-mean", "k3", None, 0.005), ("seq-mean-token-mean", "k2", 3.0, 0.1),
    ("seq-mean-token-sum", "abs", None, 0.1), ("seq-mean-token-sum-norm", "k1", 3.0, 0.1),
    ("token-mean", "k3", 3.0, 0.0), ("seq-mean-token-mean", "k3", None, 0.0),
]


@pytest.mark.parametrize("blocks", ["one", "small"], indirect=True)
@pytest.mark.parametrize("agg,kl_kind,dual_clip,beta", LOSS_CASES)
def test_fast_loss_equals_the_readable_loss(blocks, agg, kl_kind, dual_clip, beta):
    """Loss, gradients w.r.t. every input and every metric: fast vs fast=False, with NaN
    in all four inputs at absent positions and an all-absent row. T = 32, so the clip
    counts take the packed path (`_count_codes`)."""
    logp, old, ref, adv, mask = _batch(31 + len(agg) + 7 * bool(dual_clip) + int(100 * beta), dual_clip, T=32)
    logp, old, ref, adv = _with_absent_nan(logp, old, ref, adv, mask=mask)
    with_ref = beta > 0
    kw = {"beta": beta, "kl_kind": kl_kind, "agg": agg, "dual_clip": dual_clip}

    def run(fast):
        def loss(logp, old, ref, adv):
            return caspo_loss(logp, old, ref if with_ref else None, adv, mask, fast=fast, **kw)

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(logp, old, ref, adv)

    (loss, metrics), grads = run(True)
    (want_loss, want_metrics), want_grads = run(False)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-7)
    assert metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    assert float(metrics["clipfrac"]) > 0 and (dual_clip is None or float(metrics["dual_clipfrac"]) > 0)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
        assert np.all(np.asarray(got)[~mask] == 0.0) and np.all(np.asarray(want)[~mask] == 0.0)
    if not with_ref:
        assert np.all(np.asarray(grads[2]) == 0.0) and metrics["kl"] == 0.0
    fast_pg, fast_m = policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual_clip)
    slow_pg, slow_m = policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual_clip, fast=False)
    np.testing.assert_allclose(fast_pg, slow_pg, rtol=1e-6, atol=1e-7)
    assert fast_m.keys() == slow_m.keys() == set(metrics) - {"loss", "kl"}


ADVANTAGE_CASES = [  # (variant, token_scope, clamp, nonneg_factor, scale_rewards)
    ("hybrid", "group", None, False, True), ("hybrid", "batch", 0.2, True, True),
    ("token", "group", None, False, True), ("token", "batch", None, False, False),
    ("outcome", "group", None, False, True),
]


@pytest.mark.parametrize("blocks", ["one", "small"], indirect=True)
@pytest.mark.parametrize("variant,scope,clamp,nonneg,scale", ADVANTAGE_CASES)
def test_fast_advantages_equal_the_readable_composition(blocks, variant, scope, clamp, nonneg, scale):
    """caspo_advantages fast vs fast=False: A and token_reward_mean, NaN at absent
    positions of both log-probs, a group with no valid token and a constant-signal group."""
    rewards, teacher, student, mask = _groups(seed=11)
    teacher, student = _with_absent_nan(teacher, student, mask=mask)
    kw = {"lam": 0.3, "variant": variant, "token_scope": scope, "token_reward_clamp": clamp,
          "nonneg_factor": nonneg, "scale_rewards": scale}
    adv, metrics = caspo_advantages(rewards, teacher, student, mask, **kw)
    want, want_metrics = caspo_advantages(rewards, teacher, student, mask, fast=False, **kw)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[~mask] == 0.0) and np.all(np.asarray(want)[~mask] == 0.0)
    assert np.any(np.asarray(adv) != 0.0)
    np.testing.assert_allclose(metrics["token_reward_mean"], want_metrics["token_reward_mean"], rtol=1e-6, atol=1e-7)
    if variant == "token" and scope == "group":
        assert np.all(np.asarray(adv)[6:9] == 0.0) and np.all(np.asarray(want)[6:9] == 0.0)  # the constant group


@pytest.mark.parametrize("blocks", ["small"], indirect=True)
def test_fast_and_readable_step_agree_under_jit(blocks):
    """Advantages, then the loss's gradient w.r.t. logp, each path end to end in one jit."""
    rewards, teacher, student, mask = _groups(seed=12)
    logp = (student + 0.1).astype(np.float32)

    def step(fast, rewards, teacher, student, logp, mask):
        adv, _ = caspo_advantages(rewards, teacher, student, mask, lam=0.3, fast=fast)
        return jax.grad(lambda lp: caspo_loss(lp, student, student, adv, mask, beta=0.005, fast=fast)[0])(logp), adv

    grad, adv = jax.jit(functools.partial(step, True))(rewards, teacher, student, logp, mask)
    want_grad, want_adv = jax.jit(functools.partial(step, False))(rewards, teacher, student, logp, mask)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)
