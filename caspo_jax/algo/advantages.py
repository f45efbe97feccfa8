"""CASPO advantages: group-normalised outcome rewards, token rewards, eq. 5.

Let P be the prompts in a step, G the trajectories sampled per prompt, T the (padded)
response length and B = P * G; row b of a [B, T] array is trajectory b % G of prompt
b // G. Every function is pure and `jax.jit`-compatible (string/bool keywords are static:
close over them or mark them `static_argnames`), computes in float32 whatever the input
dtype, and returns exactly 0 -- with exactly 0 gradient -- at positions whose mask is 0.

`caspo_advantages` is Algorithm 1, lines 5-8, composed from the functions before it. By
default (`fast=True`) it computes r_t and its z-score through `_fast.normalized_signal`
(one row-blocked pass, r_t never written out), the same numbers to float32 rounding
(tests/algo/test_algo_fast.py).
"""

import jax
import jax.numpy as jnp

from caspo_jax.algo import _fast
from caspo_jax.algo._masked import F32, as_valid, present
from caspo_jax.algo.aggregation import aggregate

VARIANTS = ("hybrid", "outcome", "token")
TOKEN_SCOPES = ("group", "batch")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}; pick one of those")


def _check_eps(eps) -> None:
    if isinstance(eps, (int, float)) and not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0 (the default is 1e-6)")


def masked_zscore(x: jax.Array, valid: jax.Array, axis, *, eps: float, scale: bool = True) -> jax.Array:
    """(x - mean) / (std + eps) over each population's valid values: the hat of eq. 5.

    A population is everything along `axis` (a tuple of axes) at one index of the
    others; `valid` is a 0/1 mask of x's shape. std is the sample std (ddof=1); `scale=False` only centres. A population
    with fewer than two valid values, or std < eps (all values equal, say), carries no
    relative signal and gives exactly 0. The deviations are taken from one of the
    population's own values (its largest) before averaging, so for a constant population
    every deviation, hence the variance, is exactly 0: no rounding residue. Absent
    positions are 0.
    """
    valid = as_valid(valid)
    x = present(x, valid)
    n = jnp.sum(valid, axis=axis, keepdims=True, dtype=F32)
    anchor = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
    d = jnp.where(valid, x - anchor, 0.0)
    d = jnp.where(valid, d - jnp.sum(d, axis=axis, keepdims=True) / jnp.maximum(n, 1.0), 0.0)
    var = jnp.sum(d * d, axis=axis, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    degenerate = (n < 2.0) | (var < eps * eps)
    std = jnp.sqrt(jnp.where(degenerate, 1.0, var))  # 1: a finite gradient where unused
    return jnp.where(degenerate, 0.0, d / (std + eps) if scale else d)


def group_normalize(rewards_PxG: jax.Array, *, eps: float = 1e-6, scale: bool = True) -> jax.Array:
    """GRPO's group-relative outcome advantage R_hat (the hat of eq. 5).

    Centres each prompt's G rewards by their mean and, when `scale`, divides by the
    group's sample std (ddof=1, as verl and Tunix compute it) plus `eps`. A group whose
    rewards are all equal, or whose std is below `eps`, gets exactly 0 -- no rounding
    residue, no NaN -- because it carries no relative signal.

    Raises ValueError (before tracing: shapes are static) for G == 1, where a sample std
    does not exist: sample at least two trajectories per prompt.
    """
    rewards_PxG = jnp.asarray(rewards_PxG)
    if rewards_PxG.ndim != 2:
        raise ValueError(f"group_normalize: rewards must be [P, G], got shape {rewards_PxG.shape}")
    if rewards_PxG.shape[1] < 2:
        raise ValueError(
            f"group_normalize: group size G={rewards_PxG.shape[1]} has no group std; "
            "sample at least G=2 trajectories per prompt (the paper uses 32)"
        )
    _check_eps(eps)
    return masked_zscore(rewards_PxG, jnp.ones(rewards_PxG.shape, jnp.bool_), axis=(1,), eps=eps, scale=scale)


def normalize_token_signal(
    r_PxGxT: jax.Array, mask_PxGxT: jax.Array, *, scope: str = "group", eps: float = 1e-6
) -> jax.Array:
    """z-score of the token signal r_t (the hat of r in eq. 5) over valid tokens.

    scope="group": over every valid token of the prompt's G trajectories (the same
    population the outcome reward is normalised over). scope="batch": over every valid
    token of the whole step ("normalization of log probability discrepancy across all
    tokens", sec. 5.2). Sample std (ddof=1) plus `eps`; degenerate populations (fewer
    than two valid tokens, constant signal, std < eps) give exactly 0.
    """
    _check_choice("scope", scope, TOKEN_SCOPES)
    _check_eps(eps)
    r_PxGxT = jnp.asarray(r_PxGxT)
    if r_PxGxT.ndim != 3:
        raise ValueError(f"normalize_token_signal: r must be [P, G, T], got shape {r_PxGxT.shape}")
    axis = (1, 2) if scope == "group" else (0, 1, 2)
    return masked_zscore(r_PxGxT, as_valid(mask_PxGxT), axis=axis, eps=eps)


def token_rewards(
    teacher_logp_BxT: jax.Array,
    student_logp_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clamp: float | None = None,
) -> jax.Array:
    """Eq. 4: r_t = log pi(a_t | s_t, C) - log pi(a_t | s_t), a constant of the loss.

    Both log-probs score the SAME sampled response tokens a_t: `teacher_logp` with the
    constitution C in the prompt, `student_logp` without it. The result is wrapped in
    `stop_gradient`: it is a reward, not a distillation loss. `clamp` (optional, > 0)
    bounds |r_t|. Absent positions are 0.
    """
    _check_clamp("token_rewards: clamp", clamp)
    valid_BxT = as_valid(mask_BxT)
    r_BxT = _reward_values(present(teacher_logp_BxT, valid_BxT), present(student_logp_BxT, valid_BxT), clamp)
    return jax.lax.stop_gradient(jnp.where(valid_BxT, r_BxT, 0.0))


def _check_clamp(field: str, clamp) -> None:
    if clamp is not None and isinstance(clamp, (int, float)) and not clamp > 0:
        raise ValueError(f"{field}={clamp!r} must be > 0 or None (None: no bound on |r_t|)")


def _reward_values(teacher_logp, student_logp, clamp):
    """r_t before masking: teacher - student in float32, bounded by `clamp` when given."""
    r = jnp.asarray(teacher_logp).astype(F32) - jnp.asarray(student_logp).astype(F32)
    return r if clamp is None else jnp.clip(r, -clamp, clamp)


def hybrid_advantages(
    R_hat_PxG: jax.Array,
    r_hat_PxGxT: jax.Array,
    mask_PxGxT: jax.Array,
    *,
    lam: float,
    variant: str = "hybrid",
    nonneg_factor: bool = False,
) -> jax.Array:
    """Eq. 5 and its ablations, per token. Returns A_PxGxT in float32.

    variant="hybrid": A = R_hat * (1 + lam * sign(R_hat) * r_hat), which equals
      R_hat + lam * |R_hat| * r_hat: the token signal moves the advantage in the same
      direction whatever the outcome's sign. sign(0) = 0, and it never matters: R_hat = 0
      zeroes the product.
    variant="outcome" (OutR): A = R_hat broadcast over tokens; `r_hat` is ignored.
    variant="token" (TokR): A = r_hat; `R_hat` is ignored.
    nonneg_factor: bound the factor (1 + lam * sign * r_hat) below at 0, so a strongly
      constitution-disagreeing token can at most cancel, never flip, the outcome's sign.
      Off by default (the paper does not bound it).
    """
    _check_choice("variant", variant, VARIANTS)
    if isinstance(lam, (int, float)) and lam < 0:
        raise ValueError(f"hybrid_advantages: lam={lam!r} must be >= 0 (the paper uses 0.3)")
    valid_PxGxT = as_valid(mask_PxGxT)
    R_PxGx1 = jnp.asarray(R_hat_PxG).astype(F32)[:, :, None]
    r_hat_PxGxT = present(r_hat_PxGxT, valid_PxGxT)
    if variant == "outcome":
        adv_PxGxT = jnp.broadcast_to(R_PxGx1, valid_PxGxT.shape)
    elif variant == "token":
        adv_PxGxT = r_hat_PxGxT
    else:
        factor_PxGxT = 1.0 + lam * jnp.sign(R_PxGx1) * r_hat_PxGxT
        if nonneg_factor:
            factor_PxGxT = jnp.maximum(factor_PxGxT, 0.0)
        adv_PxGxT = R_PxGx1 * factor_PxGxT
    return jnp.where(valid_PxGxT, adv_PxGxT, 0.0)


def hybrid_factor_flips(R_hat_PxG: jax.Array, r_hat_PxGxT: jax.Array, mask_PxGxT: jax.Array, *, lam: float
                        ) -> dict[str, jax.Array]:
    """Where eq. 5's factor 1 + lam * sign(R_hat) * r_hat is negative, and how far.

    r_hat is a z-score over a group's pooled tokens, and the constitution moves only a few
    tokens, so those tokens' |r_hat| can pass 1/lam: there the factor turns negative and
    the token's advantage takes the opposite sign of its response's outcome (a warning
    inside a low-reward response gets a positive advantage). `nonneg_factor` bounds such
    factors at 0; these statistics describe the unbounded factor either way.

    Returns float32 scalars over valid tokens with R_hat != 0 (a zero outcome has no sign
    to flip): "adv/flipped_frac" (flipped share of ALL valid tokens), "adv/flipped_r_hat_mean"
    and "adv/flipped_r_hat_std" (population std) of r_hat on the flipped tokens, and
    "adv/flipped_in_low_reward_frac" (the share of flips inside responses with R_hat < 0,
    i.e. constitution-favoured tokens pushed up in a bad response); 0 when nothing flips.
    """
    valid = as_valid(mask_PxGxT)
    sign = jnp.sign(jnp.asarray(R_hat_PxG).astype(F32))[:, :, None]
    r_hat = present(r_hat_PxGxT, valid).astype(F32)
    flipped = valid & (1.0 + lam * sign * r_hat < 0.0)
    n_valid = jnp.maximum(jnp.sum(valid, dtype=F32), 1.0)
    n_flip = jnp.sum(flipped, dtype=F32)
    on_flip = jnp.where(flipped, r_hat, 0.0)
    mean = jnp.sum(on_flip) / jnp.maximum(n_flip, 1.0)
    var = jnp.sum(jnp.where(flipped, (r_hat - mean) ** 2, 0.0)) / jnp.maximum(n_flip, 1.0)
    low = jnp.sum(flipped & (sign < 0), dtype=F32)
    return {"adv/flipped_frac": n_flip / n_valid, "adv/flipped_r_hat_mean": mean,
            "adv/flipped_r_hat_std": jnp.sqrt(var), "adv/flipped_in_low_reward_frac": low / jnp.maximum(n_flip, 1.0)}


def caspo_advantages(
    rewards_PxG: jax.Array,
    teacher_logp_BxT: jax.Array | None,
    student_logp_BxT: jax.Array | None,
    mask_BxT: jax.Array,
    *,
    lam: float,
    variant: str = "hybrid",
    token_scope: str = "group",
    eps: float = 1e-6,
    scale_rewards: bool = True,
    token_reward_clamp: float | None = None,
    nonneg_factor: bool = False,
    fast: bool = True,
):
    """Algorithm 1, lines 5-8: outcome rewards and token log-probs to A_BxT.

    `group_normalize` (R_hat), `token_rewards` (eq. 4), `normalize_token_signal` (r_hat)
    and `hybrid_advantages` (eq. 5), rows grouped prompt-major ([B, T] <-> [P, G, T]).
    For variant="outcome" the log-probs are unused and may be None.
    Returns (adv_BxT, metrics) with metrics["token_reward_mean"]: the raw r_t averaged
    over valid tokens (how much the constitution moves the policy; 0 for "outcome").
    The sign-flip statistics (`hybrid_factor_flips`) are the trainer's metrics
    (`caspo_jax.step.rollout_advantages`), outside this hot path.
    fast: r_t, its z-score and its mean from `_fast.normalized_signal` (one pass, r_t
    never written out; False: the plain composition below).
    """
    _check_choice("variant", variant, VARIANTS)
    rewards_PxG = jnp.asarray(rewards_PxG)
    P, G = rewards_PxG.shape
    valid_BxT = as_valid(mask_BxT)
    B, T = valid_BxT.shape
    if B != P * G:
        raise ValueError(f"caspo_advantages: mask has {B} rows but rewards give P*G = {P}*{G} = {P * G}")
    valid_PxGxT = valid_BxT.reshape(P, G, T)
    R_hat_PxG = group_normalize(rewards_PxG, eps=eps, scale=scale_rewards)
    if variant == "outcome":
        r_hat_PxGxT = jnp.zeros((P, G, T), F32)
        token_reward_mean = jnp.zeros((), F32)
    else:
        if teacher_logp_BxT is None or student_logp_BxT is None:
            raise ValueError(f"caspo_advantages: variant={variant!r} needs teacher and student log-probs")
        _check_choice("token_scope", token_scope, TOKEN_SCOPES)
        _check_eps(eps)
        _check_clamp("caspo_advantages: token_reward_clamp", token_reward_clamp)
        if fast:
            r_hat_PxGxT, token_reward_mean = _fast.normalized_signal(
                lambda teacher, student: _reward_values(teacher, student, token_reward_clamp),
                (jnp.asarray(teacher_logp_BxT).reshape(P, G, T), jnp.asarray(student_logp_BxT).reshape(P, G, T)),
                valid_PxGxT, (1, 2) if token_scope == "group" else (0, 1, 2), eps=eps,
            )
        else:
            r_BxT = token_rewards(teacher_logp_BxT, student_logp_BxT, valid_BxT, clamp=token_reward_clamp)
            r_hat_PxGxT = normalize_token_signal(r_BxT.reshape(P, G, T), valid_PxGxT, scope=token_scope, eps=eps)
            token_reward_mean = aggregate(r_BxT, valid_BxT, agg="token-mean")
    adv_PxGxT = hybrid_advantages(
        R_hat_PxG, r_hat_PxGxT, valid_PxGxT, lam=lam, variant=variant, nonneg_factor=nonneg_factor
    )
    adv_BxT = jax.lax.stop_gradient(adv_PxGxT.reshape(B, T))
    return adv_BxT, {"token_reward_mean": token_reward_mean}
