"""The CASPO objective (eq. 6) as a loss to minimise: PPO clipped surrogate + beta * KL.

Let B be the number of trajectories and T the padded response length. Inputs are
[B, T] per-token arrays: `logp` (current policy, differentiated), `old_logp` (the
rollout policy pi_old), `ref_logp` (pi_ref, for the KL), `adv` (from
`caspo_jax.algo.advantages`) and `mask` (1 on response tokens). Absent positions
(mask 0) are replaced by 0 through `jnp.where` before any arithmetic, so they add
nothing to the loss or metrics and receive exactly 0 gradient even if they hold NaN.
Everything is computed in float32. String keywords are static under `jax.jit`.

`caspo_loss` below is the maths as written: per-token terms (`_token_terms`:
`clipped_surrogate` + `kl_penalty`), then `aggregate`. By default (`fast=True`) it
evaluates the same per-token terms through `_fast.loss_terms` instead -- one row-blocked
pass with a custom VJP, the same numbers to float32 rounding (tests/algo/test_algo_fast.py).
"""

import functools

import jax
import jax.numpy as jnp

from caspo_jax.algo import _fast
from caspo_jax.algo._masked import F32, as_valid, clamp, present
from caspo_jax.algo.aggregation import aggregate, check_agg
from caspo_jax.algo.kl import KL_KINDS, kl_penalty

LOG_RATIO_BOUND = 20.0


def _check_clip(clip_low, clip_high, dual_clip) -> None:
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if isinstance(value, (int, float)) and not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0 (0.2 is verl's default; eq. 6 itself has no clip)")
    if dual_clip is not None and isinstance(dual_clip, (int, float)) and not dual_clip > 1:
        raise ValueError(f"dual_clip={dual_clip!r} must be > 1 (verl's default is 3.0) or None")


def clipped_surrogate(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    adv_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
):
    """Per-token PPO loss -A * ratio, clipped; returns (loss_BxT, parts).

    ratio = exp(clamp(logp - old_logp, -20, 20)). A token is clipped -- its loss is the
    constant -A * clip(ratio, 1 - clip_low, 1 + clip_high) and its gradient is 0 --
    when A > 0 and ratio > 1 + clip_high ("high") or A < 0 and ratio < 1 - clip_low
    ("low"); this is max(-A r, -A clip(r)) written with `where` so ties have one branch.
    Dual clip (Ye et al. 2020): for A < 0 the loss is further capped at -A * dual_clip,
    so |loss| <= dual_clip * |A| however large the ratio grows.
    `parts` holds boolean [B, T] maps "clipped_high", "clipped_low", "dual_clipped" and
    the float32 "log_ratio" (clamped), all False/0 at absent positions.
    """
    _check_clip(clip_low, clip_high, dual_clip)
    valid_BxT = as_valid(mask_BxT)
    logp_BxT = present(logp_BxT, valid_BxT)
    old_logp_BxT = present(old_logp_BxT, valid_BxT)
    adv_BxT = present(adv_BxT, valid_BxT)
    log_ratio_BxT = clamp(logp_BxT - old_logp_BxT, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    # The clip tests compare the log-ratio with log(1 + eps): the same condition as
    # ratio > 1 + eps up to the rounding of exp, and it needs no exp, so the metric sums
    # share the loop that computes the loss (see `_fast._count_codes`).
    clipped_high = valid_BxT & (adv_BxT > 0) & (log_ratio_BxT > jnp.log1p(jnp.asarray(clip_high, F32)))
    clipped_low = valid_BxT & (adv_BxT < 0) & (log_ratio_BxT < jnp.log1p(-jnp.asarray(clip_low, F32)))
    bound_BxT = jax.lax.stop_gradient(clamp(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high))
    loss_BxT = -adv_BxT * jnp.where(clipped_high | clipped_low, bound_BxT, ratio_BxT)
    dual_clipped = jnp.zeros_like(valid_BxT)
    if dual_clip is not None:
        # -A * ratio > -A * dual_clip for A < 0, i.e. ratio > dual_clip (never when clipped low).
        dual_clipped = valid_BxT & (adv_BxT < 0) & (log_ratio_BxT > jnp.log(jnp.asarray(dual_clip, F32)))
        loss_BxT = jnp.where(dual_clipped, -adv_BxT * dual_clip, loss_BxT)
    parts = {
        "clipped_high": clipped_high,
        "clipped_low": clipped_low,
        "dual_clipped": dual_clipped,
        "log_ratio": jnp.where(valid_BxT, log_ratio_BxT, 0.0),
    }
    return jnp.where(valid_BxT, loss_BxT, 0.0), parts


def _token_terms(logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips, *, kl_kind, dual):
    """Eq. 6 per token, before aggregation: (pg_BxT, kl_BxT or None, parts).

    `clipped_surrogate` and, when ref_logp is given, `kl_penalty`, both 0 at absent
    positions; `parts` are clipped_surrogate's. `clips` is (clip_low, clip_high,
    dual_clip) as float32 scalars; `dual` says whether the third is used. Elementwise
    only, so `_fast` can evaluate it block by block and differentiate it token by token.
    """
    clip_low, clip_high, dual_clip = clips
    pg_BxT, parts = clipped_surrogate(
        logp_BxT, old_logp_BxT, adv_BxT, valid_BxT,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip if dual else None,
    )
    if ref_logp_BxT is None:
        return pg_BxT, None, parts
    kl_BxT = kl_penalty(present(logp_BxT, valid_BxT), present(ref_logp_BxT, valid_BxT), kind=kl_kind)
    return pg_BxT, jnp.where(valid_BxT, kl_BxT, 0.0), parts


def caspo_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array | None,
    adv_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    beta: float,
    kl_kind: str = "k3",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    fast: bool = True,
):
    """-J(theta) of eq. 6: policy loss + beta * KL(pi_theta || pi_ref); (loss, metrics).

    Policy loss: `clipped_surrogate` aggregated by `agg` (eq. 6's 1/(GT) sum of
    ratio * A, PPO-clipped). KL: the per-token `kl_penalty(logp, ref_logp, kind=kl_kind)`
    aggregated with the same `agg` (verl's `use_kl_loss` path), so beta keeps one meaning
    across modes. With beta == 0 (a Python number) the KL is skipped and `ref_logp` may
    be None. metrics (float32 scalars, stop-gradient; token means over valid tokens
    whatever `agg` is): loss, pg_loss, clipfrac (= clipfrac_high + clipfrac_low),
    clipfrac_high, clipfrac_low, dual_clipfrac (0 without dual clip), approx_kl (mean of
    old_logp - logp, k1 of KL(pi_old || pi) on the sampled tokens, verl's `ppo_kl`), kl.
    fast: evaluate through `_fast.loss_terms` (False: the plain formulas below).
    """
    if isinstance(beta, (int, float)) and beta < 0:
        raise ValueError(f"caspo_loss: beta={beta!r} must be >= 0 (the paper uses 0.005)")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"caspo_loss: kl_kind={kl_kind!r} is not one of {KL_KINDS}; pick one of those")
    skip_kl = isinstance(beta, (int, float)) and beta == 0
    if not skip_kl and ref_logp_BxT is None:
        raise ValueError("caspo_loss: beta > 0 needs ref_logp (or set beta=0 to drop the KL term)")
    check_agg(agg, norm_len)
    _check_clip(clip_low, clip_high, dual_clip)
    ref_logp_BxT = None if skip_kl else ref_logp_BxT
    valid_BxT = as_valid(mask_BxT)
    dual = dual_clip is not None
    clips = tuple(jnp.asarray(c, F32) for c in (clip_low, clip_high, dual_clip if dual else 0.0))
    token_terms = functools.partial(_token_terms, kl_kind=kl_kind, dual=dual)
    stat = jax.lax.stop_gradient
    if fast:
        pg_loss, kl, means = _fast.loss_terms(token_terms, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT,
                                              clips, dual=dual, agg=agg, norm_len=norm_len)
    else:
        pg_BxT, kl_BxT, parts = token_terms(logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips)
        pg_loss = aggregate(pg_BxT, valid_BxT, agg=agg, norm_len=norm_len)
        kl = jnp.zeros((), F32) if kl_BxT is None else aggregate(kl_BxT, valid_BxT, agg=agg, norm_len=norm_len)
        names = ("clipped_high", "clipped_low", "log_ratio") + (("dual_clipped",) if dual else ())
        means = {name: stat(aggregate(parts[name], valid_BxT, agg="token-mean")) for name in names}
    loss = pg_loss + beta * kl
    return loss, {
        "loss": stat(loss),
        "pg_loss": stat(pg_loss),
        "clipfrac": means["clipped_high"] + means["clipped_low"],
        "clipfrac_high": means["clipped_high"],
        "clipfrac_low": means["clipped_low"],
        "dual_clipfrac": means["dual_clipped"] if dual else jnp.zeros((), F32),
        "approx_kl": -means["log_ratio"],
        "kl": stat(kl),
    }


def policy_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    adv_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    fast: bool = True,
):
    """The PPO clipped-surrogate term of eq. 6 alone: `caspo_loss` with beta = 0.

    Returns (loss, metrics) with caspo_loss's metrics but "loss" and "kl".
    """
    loss, metrics = caspo_loss(logp_BxT, old_logp_BxT, None, adv_BxT, mask_BxT, beta=0.0, clip_low=clip_low,
                               clip_high=clip_high, dual_clip=dual_clip, agg=agg, norm_len=norm_len, fast=fast)
    return loss, {k: v for k, v in metrics.items() if k not in ("loss", "kl")}
