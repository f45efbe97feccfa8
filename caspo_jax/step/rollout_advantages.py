"""Per-rollout-batch signals: advantages from rewards and log-probs, with their statistics.

Wraps ``caspo_jax.algo.caspo_advantages`` (the maths lives there) and adds the metrics
a trainer logs: raw token-reward and advantage statistics over valid tokens, the
fraction of prompts whose group has zero reward variance (they add nothing) and, for the
hybrid, where eq. 5's factor flips the outcome's sign (``hybrid_factor_flips``, from the
readable R_hat and r_hat: once per rollout batch, not in the loss's hot path), all over
the groups whose rewards were scored (a failed group is in no population).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from caspo_jax.algo import (CaspoConfig, caspo_advantages, group_normalize, hybrid_factor_flips,
                            normalize_token_signal, token_rewards)

F32 = jnp.float32


def _masked_stats(prefix: str, x_BxT, valid_BxT) -> dict:
    n = jnp.maximum(jnp.sum(valid_BxT.astype(F32)), 1.0)
    x = jnp.where(valid_BxT, x_BxT, 0.0)
    mean = jnp.sum(x) / n
    std = jnp.sqrt(jnp.sum(jnp.where(valid_BxT, (x - mean) ** 2, 0.0)) / n)
    big = jnp.finfo(F32).max
    some = jnp.any(valid_BxT)  # no valid token (every group failed): 0, not +-finfo.max
    return {f"{prefix}_mean": mean, f"{prefix}_std": std,
            f"{prefix}_min": jnp.where(some, jnp.min(jnp.where(valid_BxT, x_BxT, big)), 0.0),
            f"{prefix}_max": jnp.where(some, jnp.max(jnp.where(valid_BxT, x_BxT, -big)), 0.0)}


@functools.partial(jax.jit, static_argnames=("caspo",))
def rollout_advantages(caspo: CaspoConfig, rewards_PxG, teacher_logp_BxT, old_logp_BxT, mask_BxT, group_ok_P=None):
    """(advantages_BxT, metrics) for one rollout batch (rows prompt-major, B = P * G).

    teacher_logp: the constitution-conditioned log-probs (``step_logprobs(...,
    layout="teacher")`` with ``teacher_params``); old_logp: the rollout policy's own,
    recomputed by the trainer. For variant "outcome" both may be None.

    group_ok_P (bool, None: all True): whether each prompt's group was scored. A failed
    group is absent from every population and metric: its tokens join no token z-score
    (with token_scope="batch" they would shift every other group's r_hat), its advantages
    are 0, and it counts in neither reward_mean nor zero_variance_group_frac (both 0 when
    every group failed).
    """
    rewards = jnp.asarray(rewards_PxG, F32)
    P, G = rewards.shape
    ok_P = jnp.ones((P,), bool) if group_ok_P is None else jnp.asarray(group_ok_P, bool)
    valid = (jnp.asarray(mask_BxT) > 0) & jnp.repeat(ok_P, G)[:, None]
    adv, metrics = caspo_advantages(rewards_PxG, teacher_logp_BxT, old_logp_BxT, valid, **caspo.advantage_kwargs())
    metrics = dict(metrics)
    if teacher_logp_BxT is not None and old_logp_BxT is not None:
        r = token_rewards(teacher_logp_BxT, old_logp_BxT, valid, clamp=caspo.token_reward_clamp)
        metrics.update(_masked_stats("token_reward", r, valid))
        if caspo.variant == "hybrid":  # where eq. 5's factor flips the outcome's sign (readable r_hat, R_hat)
            T = valid.shape[1]
            valid_PxGxT = valid.reshape(P, G, T)
            r_hat = normalize_token_signal(r.reshape(P, G, T), valid_PxGxT, scope=caspo.token_scope, eps=caspo.eps)
            R_hat = group_normalize(jnp.where(ok_P[:, None], rewards, 0.0), eps=caspo.eps, scale=caspo.scale_rewards)
            metrics.update(hybrid_factor_flips(R_hat, r_hat, valid_PxGxT, lam=caspo.lam))
    metrics.update(_masked_stats("advantage", adv, valid))
    n_ok = jnp.maximum(jnp.sum(ok_P.astype(F32)), 1.0)
    metrics["reward_mean"] = jnp.sum(jnp.where(ok_P[:, None], rewards, 0.0)) / (n_ok * G)
    constant = jnp.all(rewards == rewards[:, :1], axis=1) & ok_P
    metrics["zero_variance_group_frac"] = jnp.sum(constant.astype(F32)) / n_ok
    return adv, metrics
