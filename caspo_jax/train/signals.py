"""Per-rollout-batch signals: advantages from rewards and log-probs, with their statistics.

Wraps ``caspo_jax.algo.caspo_advantages`` (the maths lives there) and adds the metrics
a trainer logs: raw token-reward and advantage statistics over valid tokens and the
fraction of prompts whose group has zero reward variance (they add nothing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from caspo_jax.algo import CaspoConfig, caspo_advantages, token_rewards

F32 = jnp.float32


def _masked_stats(prefix: str, x_BxT, valid_BxT) -> dict:
    n = jnp.maximum(jnp.sum(valid_BxT.astype(F32)), 1.0)
    x = jnp.where(valid_BxT, x_BxT, 0.0)
    mean = jnp.sum(x) / n
    std = jnp.sqrt(jnp.sum(jnp.where(valid_BxT, (x - mean) ** 2, 0.0)) / n)
    big = jnp.finfo(F32).max
    return {f"{prefix}_mean": mean, f"{prefix}_std": std,
            f"{prefix}_min": jnp.min(jnp.where(valid_BxT, x_BxT, big)),
            f"{prefix}_max": jnp.max(jnp.where(valid_BxT, x_BxT, -big))}


@functools.partial(jax.jit, static_argnames=("caspo",))
def rollout_advantages(caspo: CaspoConfig, rewards_PxG, teacher_logp_BxT, old_logp_BxT, mask_BxT):
    """(advantages_BxT, metrics) for one rollout batch (rows prompt-major, B = P * G).

    teacher_logp: the constitution-conditioned log-probs (``compute_logprobs(...,
    layout="teacher")`` with ``teacher_params``); old_logp: the rollout policy's own,
    recomputed by the trainer. For variant "outcome" both may be None.
    """
    adv, metrics = caspo_advantages(rewards_PxG, teacher_logp_BxT, old_logp_BxT, mask_BxT,
                                    **caspo.advantage_kwargs())
    valid = jnp.asarray(mask_BxT) > 0
    metrics = dict(metrics)
    if teacher_logp_BxT is not None and old_logp_BxT is not None:
        r = token_rewards(teacher_logp_BxT, old_logp_BxT, valid, clamp=caspo.token_reward_clamp)
        metrics.update(_masked_stats("token_reward", r, valid))
    metrics.update(_masked_stats("advantage", adv, valid))
    rewards = jnp.asarray(rewards_PxG, F32)
    metrics["reward_mean"] = jnp.mean(rewards)
    metrics["zero_variance_group_frac"] = jnp.mean(jnp.all(rewards == rewards[:, :1], axis=1).astype(F32))
    return adv, metrics
