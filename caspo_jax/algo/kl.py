"""Per-token estimators of KL(pi_theta || pi_ref) on sampled tokens (eq. 6's penalty).

With a_t ~ pi_theta and x = log pi_ref(a_t) - log pi_theta(a_t) (Schulman's notation):
  k1  = -x                       unbiased, high variance, can be negative;
  k2  = x^2 / 2                  biased, low variance, >= 0;
  k3  = exp(x) - x - 1           unbiased, low variance, >= 0 ("low_var_kl" in verl);
                                 x clamped to [-20, 20] and the value to [-10, 10], as
                                 verl does, so one wild token cannot dominate the step
                                 (we clip below at 0, not -10: k3 is >= 0 anyway, and
                                 this removes rounding that could dip under 0);
  abs = |x|.
The paper names no estimator; its verl run uses k3 (see BUILD_NOTES.md).
"""

import jax
import jax.numpy as jnp

from caspo_jax.algo._masked import F32, clamp

KL_KINDS = ("k1", "k2", "k3", "abs")
K3_LOG_RATIO_BOUND = 20.0
K3_VALUE_BOUND = 10.0


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, *, kind: str = "k3") -> jax.Array:
    """Elementwise KL estimate of any shape (e.g. [B, T]); float32.

    No mask here: the loss aggregates with its mask, and `caspo_loss` zeroes absent
    positions of both inputs before calling this, so their gradient is exactly 0.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty: kind={kind!r} is not one of {KL_KINDS}; pick one of those")
    log_ratio = jnp.asarray(logp).astype(F32) - jnp.asarray(ref_logp).astype(F32)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio * log_ratio
    if kind == "abs":
        return jnp.abs(log_ratio)
    x = clamp(-log_ratio, -K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
    # exp(x) - x - 1 rather than expm1(x) - x: same values to ~1e-7 absolute, and XLA:CPU's
    # exp is vectorised where its expm1 measured 3x slower.
    return clamp(jnp.exp(x) - x - 1.0, 0.0, K3_VALUE_BOUND)
