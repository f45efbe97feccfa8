"""CASPO maths: pure, jit-compatible functions of arrays (paper sec. 5.1, eqs. 4-6).

Shapes: P prompts, G trajectories per prompt, T response tokens, B = P * G (rows of a
[B, T] array are grouped prompt-major). Every function computes in float32 and treats
mask == 0 positions as absent: exactly zero output and gradient there.

Typical step::

    cfg = CaspoConfig.preset("paper")
    adv_BxT, _ = caspo_advantages(rewards_PxG, teacher_logp_BxT, old_logp_BxT, mask_BxT,
                                  **cfg.advantage_kwargs())
    loss, metrics = caspo_loss(logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, mask_BxT,
                               **cfg.loss_kwargs())
"""

from caspo_jax.algo.advantages import (
    TOKEN_SCOPES,
    VARIANTS,
    caspo_advantages,
    group_normalize,
    hybrid_advantages,
    normalize_token_signal,
    token_rewards,
)
from caspo_jax.algo.config import PAPER, PRESETS, TEACHERS, CaspoConfig
from caspo_jax.algo.kl import KL_KINDS, kl_penalty
from caspo_jax.algo.losses import AGG_MODES, aggregate, caspo_loss, clipped_surrogate, policy_loss

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "PAPER",
    "PRESETS",
    "TEACHERS",
    "TOKEN_SCOPES",
    "VARIANTS",
    "CaspoConfig",
    "aggregate",
    "caspo_advantages",
    "caspo_loss",
    "clipped_surrogate",
    "group_normalize",
    "hybrid_advantages",
    "kl_penalty",
    "normalize_token_signal",
    "policy_loss",
    "token_rewards",
]
