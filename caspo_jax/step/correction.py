"""Rollout correction: importance weights for the trainer/rollout-engine mismatch.

The rollout engine (vLLM, the JAX sampler, a stale copy of the weights under bounded
staleness) draws responses from pi_rollout; the loss's ratio is taken against pi_old, the
trainer's own log-probs of those tokens before the update. Per valid token the log-ratio
is d_t = old_logp - rollout_logp (clamped to [-20, 20]) and rho_t = exp(d_t). The
policy-gradient term of each token is weighted (the advantage is multiplied, stop-gradient):

- "none": weight 1 (today's loss);
- "tis" (token-level truncated IS, Yao et al. 2025): min(rho_t, C);
- "mis_token" (token-level masked IS): rho_t where |d_t| <= log C, else 0 (the token
  leaves the policy-gradient term);
- "mis_seq" (sequence-level masked IS): the sequence statistic is the mean log-ratio
  over its valid tokens, dbar = sum_t d_t / n (the log of the geometric-mean ratio; a
  sum would grow with the length, dropping long responses for the same per-token drift);
  every token of the sequence gets exp(dbar) when |dbar| <= log C, else 0.

C is `RolloutCorrection.threshold` (optim.tis_cap for "tis", optim.mis_threshold for the
masked modes). The masks are symmetric in log space: a token the engine found far more
likely than the trainer (rho << 1) is as much a mismatch as the reverse. Shapes: [B, T]
(rows, response tokens); mask > 0 marks valid tokens; every weight is 0 off the mask.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

CORRECTIONS = ("none", "tis", "mis_token", "mis_seq")
LOG_RATIO_CLAMP = 20.0


@dataclasses.dataclass(frozen=True)
class RolloutCorrection:
    """Which correction the CASPO step applies (hashable: a static argument of the step).

    mode: one of CORRECTIONS. threshold: C > 0 (the TIS cap, or the MIS bound; for the
    masked modes C > 1, since |log-ratio| <= log C must keep an exact match)."""

    mode: str = "none"
    threshold: float = 2.0

    def __post_init__(self):
        if self.mode not in CORRECTIONS:
            raise ValueError(f"RolloutCorrection.mode={self.mode!r}: use one of {CORRECTIONS}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"RolloutCorrection.threshold={t!r}: must be a number > 0 (2.0 is usual)")
        if self.mode.startswith("mis") and not t > 1:
            raise ValueError(f"RolloutCorrection.threshold={t!r}: masked IS drops tokens whose ratio is outside "
                             "[1/threshold, threshold], so it must be > 1 (2.0 is usual)")

    @property
    def active(self) -> bool:
        return self.mode != "none"


def log_ratios(old_logp_BxT, rollout_logp_BxT, mask_BxT):
    """d_t = old_logp - rollout_logp, clamped to [-20, 20], 0 where mask is 0."""
    valid = mask_BxT > 0
    return jnp.clip(jnp.where(valid, old_logp_BxT - rollout_logp_BxT, 0.0), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def truncated_is_weights(old_logp_BxT, rollout_logp_BxT, mask_BxT, cap: float):
    """Per-token weights min(pi_old / pi_rollout, cap) for the trainer/inference mismatch
    (truncated importance sampling, Yao et al. 2025), stop-gradient, 0 where mask is 0;
    also the ratios (for metrics). The log-ratio is clamped to [-20, 20] first."""
    valid = mask_BxT > 0
    ratio = jnp.exp(log_ratios(old_logp_BxT, rollout_logp_BxT, mask_BxT))
    weight = jnp.where(valid, jnp.minimum(ratio, cap), 0.0)
    return jax.lax.stop_gradient(weight), jnp.where(valid, ratio, 0.0)


def correction_weights(old_logp_BxT, rollout_logp_BxT, mask_BxT, correction: RolloutCorrection):
    """(weight_BxT, corrected_BxT): the per-token weight of `correction` (module docstring;
    stop-gradient, 0 off the mask) and where it changed the plain ratio (capped or masked;
    False off the mask). Traceable; NumPy inputs work too."""
    valid = mask_BxT > 0
    d = log_ratios(old_logp_BxT, rollout_logp_BxT, mask_BxT)
    bound = math.log(correction.threshold)
    if correction.mode == "none":
        weight, corrected = jnp.where(valid, 1.0, 0.0), jnp.zeros(d.shape, bool)
    elif correction.mode == "tis":
        weight, ratio = truncated_is_weights(old_logp_BxT, rollout_logp_BxT, mask_BxT, correction.threshold)
        corrected = valid & (ratio > correction.threshold)
    elif correction.mode == "mis_token":
        corrected = valid & (jnp.abs(d) > bound)
        weight = jnp.where(valid & ~corrected, jnp.exp(d), 0.0)
    else:  # mis_seq
        n = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1)
        mean_d = jnp.sum(d, axis=-1, keepdims=True) / n
        drop = jnp.abs(mean_d) > bound
        corrected = valid & drop
        weight = jnp.where(valid & ~drop, jnp.exp(mean_d), 0.0)
    return jax.lax.stop_gradient(weight.astype(jnp.float32)), corrected


def correction_metrics(old_logp_BxT, rollout_logp_BxT, mask_BxT, correction: RolloutCorrection) -> dict:
    """Host metrics of one step's whole batch (NumPy in, floats out): the trainer-vs-rollout
    log-prob gap |old_logp - rollout_logp| (mean and max over valid tokens, unclamped), the
    correction's weight mean / max over valid tokens and the share of valid tokens it capped
    or masked. With mode "none" the weights are 1 and the share 0: the gap is the signal."""
    old = np.asarray(old_logp_BxT, np.float32)
    rollout = np.asarray(rollout_logp_BxT, np.float32)
    valid = np.asarray(mask_BxT) > 0
    if not valid.any():
        return {}
    gap = np.abs(old - rollout)[valid]
    weight, corrected = jax.device_get(correction_weights(old, rollout, valid.astype(np.float32), correction))
    weight = np.asarray(weight)[valid]
    return {"rollout_correction/logp_gap_mean": float(gap.mean()),
            "rollout_correction/logp_gap_max": float(gap.max()),
            "rollout_correction/weight_mean": float(weight.mean()),
            "rollout_correction/weight_max": float(weight.max()),
            "rollout_correction/corrected_frac": float(np.asarray(corrected)[valid].mean())}
