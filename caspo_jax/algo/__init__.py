"""CASPO maths: pure, jit-compatible functions of arrays (paper sec. 5.1, eqs. 4-6).

Read in this order: `advantages` (eq. 4 token rewards, the group z-score, eq. 5), `kl`
(the KL estimators), `aggregation` (verl's loss modes), `losses` (eq. 6). `_fast` is
the speed beneath them: `caspo_advantages` and `caspo_loss` / `policy_loss` dispatch to
it (`fast=True`, the default) and compute the same numbers in fewer passes. The other
training stages' losses are here too: `supervised` (SFT) and `preference` (DPO, the
reward model's eq. 7).

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
    hybrid_factor_flips,
    masked_zscore,
    normalize_token_signal,
    token_rewards,
)
from caspo_jax.algo.aggregation import AGG_MODES, aggregate
from caspo_jax.algo.config import PAPER, PRESETS, TEACHERS, CaspoConfig
from caspo_jax.algo.kl import KL_KINDS, kl_penalty
from caspo_jax.algo.losses import caspo_loss, clipped_surrogate, policy_loss
from caspo_jax.algo.preference import dpo_loss, rm_loss
from caspo_jax.algo.supervised import sft_loss

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
    "dpo_loss",
    "group_normalize",
    "hybrid_advantages",
    "hybrid_factor_flips",
    "kl_penalty",
    "masked_zscore",
    "normalize_token_signal",
    "policy_loss",
    "rm_loss",
    "sft_loss",
    "token_rewards",
]
