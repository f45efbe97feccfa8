"""The CASPO objective (eq. 6) as a loss to minimise: PPO clipped surrogate + beta * KL.

Let B be the number of trajectories and T the padded response length. Inputs are
[B, T] per-token arrays: `logp` (current policy, differentiated), `old_logp` (the
rollout policy pi_old), `ref_logp` (pi_ref, for the KL), `adv` (from
`caspo_jax.algo.advantages`) and `mask` (1 on response tokens). Absent positions
(mask 0) are replaced by 0 through `jnp.where` before any arithmetic, so they add
nothing to the loss or metrics and receive exactly 0 gradient even if they hold NaN.
Everything is computed in float32. String keywords are static under `jax.jit`.
"""

import functools

import jax
import jax.numpy as jnp

from caspo_jax.algo._blocks import map_row_blocks, row_sums, rows_per_block
from caspo_jax.algo._masked import F32, as_valid, clamp, present
from caspo_jax.algo.kl import KL_KINDS, kl_penalty

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOG_RATIO_BOUND = 20.0


def _check_agg(agg, norm_len) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r} is not one of {AGG_MODES}; pick one of those")
    if norm_len is not None and not (isinstance(norm_len, int) and norm_len > 0):
        raise ValueError(f"norm_len={norm_len!r} must be a positive int or None (None = T)")


def _agg_from_row_sums(row_sum_B, row_len_B, agg, length):
    """Finishes `aggregate` from per-sequence sums and valid counts ([B] each)."""
    num_tokens = jnp.maximum(jnp.sum(row_len_B), 1.0)
    num_seqs = jnp.maximum(jnp.sum(row_len_B > 0, dtype=F32), 1.0)
    if agg == "token-mean":
        return jnp.sum(row_sum_B) / num_tokens
    if agg == "seq-mean-token-mean":
        return jnp.sum(row_sum_B / jnp.maximum(row_len_B, 1.0)) / num_seqs
    if agg == "seq-mean-token-sum":
        return jnp.sum(row_sum_B) / num_seqs
    return jnp.sum(row_sum_B) / (num_seqs * length)


def aggregate(loss_BxT: jax.Array, mask_BxT: jax.Array, *, agg: str = "token-mean", norm_len: int | None = None):
    """Reduces per-token values to a scalar, as verl's `agg_loss` modes do.

    token-mean:               sum over valid tokens / number of valid tokens.
    seq-mean-token-mean:      each sequence's token mean, averaged over sequences (GRPO).
    seq-mean-token-sum:       each sequence's token sum, averaged over sequences.
    seq-mean-token-sum-norm:  total sum / (sequences * norm_len) -- eq. 6's literal
                              1/(GT) with a constant length (Dr. GRPO); norm_len defaults
                              to T, the padded length.
    "Sequences" counts only rows with at least one valid token: an all-masked row (batch
    padding) is absent, not a zero-loss sample. No valid token at all gives 0, not NaN.
    """
    _check_agg(agg, norm_len)
    valid_BxT = as_valid(mask_BxT)
    row_len_B, row_sum_B = row_sums(valid_BxT.astype(F32), present(loss_BxT, valid_BxT))
    length = valid_BxT.shape[-1] if norm_len is None else norm_len
    return _agg_from_row_sums(row_sum_B, row_len_B, agg, length)


def _check_clip(clip_low, clip_high, dual_clip) -> None:
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if isinstance(value, (int, float)) and not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0 (the paper uses 0.2)")
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
    # share the loop that computes the loss (see `_count_codes`).
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


def _token_losses(logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips, *, kl_kind, dual):
    """Per-token policy loss, KL (when ref_logp is given) and `clipped_surrogate`'s parts.

    The reference maths, elementwise only: `clipped_surrogate` and `kl_penalty`, both 0
    at absent positions. `clips` is (clip_low, clip_high, dual_clip) as float32 scalars;
    `dual` says whether the third is used.
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


def _count_codes(valid_RxT, high_RxT, low_RxT):
    """Per-row counts of valid, clipped-high and clipped-low tokens from ONE reduction.

    Each valid token contributes a power of two -- 1 (not clipped), 2^8 (clipped high) or
    2^16 (clipped low) -- summed in float32 over chunks of at most 255 tokens, so no field
    can reach 2^8 and carry into the next, and every partial sum is an integer below
    2^24: exact in any summation order. Powers of two are exact in bfloat16 too, so the
    per-token codes are written at half the bytes. Returns {"packed": [R, chunks]}, read
    back by `_decode_counts` (once, after the blocked loop); when T has no divisor
    between 16 and 255, the three counts summed separately.
    """
    R, T = valid_RxT.shape
    chunk = min(T, 255)
    while T % chunk:
        chunk -= 1
    if chunk < 16:
        return dict(zip(("valid", "clipped_high", "clipped_low"),
                        row_sums(*(x.astype(F32) for x in (valid_RxT, high_RxT, low_RxT)))))
    code = jnp.where(valid_RxT, jnp.where(high_RxT, 256.0, jnp.where(low_RxT, 65536.0, 1.0)), 0.0)
    code = code.astype(jnp.bfloat16).reshape(R, T // chunk, chunk)
    return {"packed": jnp.sum(code, axis=-1, dtype=F32)}


def _decode_counts(stats):
    """`_count_codes`' packed chunk sums -> valid, clipped_high, clipped_low per row ([B])."""
    if "packed" not in stats:
        return stats
    stats = dict(stats)
    packed = stats.pop("packed").astype(jnp.int32)
    fields = {"unclipped": packed & 255, "clipped_high": (packed >> 8) & 255, "clipped_low": packed >> 16}
    counts = {name: jnp.sum(x, axis=-1).astype(F32) for name, x in fields.items()}
    counts["valid"] = counts.pop("unclipped") + counts["clipped_high"] + counts["clipped_low"]
    return {**stats, **counts}


def _loss_row_stats(static, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips):
    """Per-sequence sums ([B] each) of the loss terms and the metric counts, blocked by rows.

    One loop over blocks of rows (`_blocks`): each block's inputs are read from memory
    once, and its per-token values (`_token_losses`) are summed by vectorised reductions
    while in cache. Returns (pg_B, kl_B or None, stats) with stats: valid, clipped_high,
    clipped_low, dual_clipped (with a dual clip), log_ratio.
    """
    kl_kind, dual = static
    B, T = valid_BxT.shape

    def block(logp, old, ref, adv, valid):
        pg, kl, parts = _token_losses(logp, old, ref, adv, valid, clips, kl_kind=kl_kind, dual=dual)
        pg_R, log_ratio_R = row_sums(pg, parts["log_ratio"])
        stats = {**_count_codes(valid, parts["clipped_high"], parts["clipped_low"]), "log_ratio": log_ratio_R}
        if dual:
            stats["dual_clipped"] = jnp.sum(parts["dual_clipped"], axis=-1, dtype=F32)
        return pg_R, None if kl is None else jnp.sum(kl, axis=-1), stats

    pg_B, kl_B, stats = map_row_blocks(block, (logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT),
                                       rows_per_block(B, T))
    return pg_B, kl_B, _decode_counts(stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss_row_sums(static, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips):
    """`_loss_row_stats` with a hand-wired VJP: (pg_B, kl_B or None, stats).

    Custom VJP, for speed, not for different maths: the forward keeps nothing but its
    inputs, and the backward is the VJP of `_token_losses` (the same per-token formulas,
    so exactly jax.grad's values) with each row's cotangent broadcast over its tokens --
    purely elementwise, so XLA emits it as one loop over [B, T] per requested gradient,
    recomputing ratio and KL from the inputs instead of storing [B, T] residuals.
    `stats` are counts and the log-ratio sum for metrics: constants of the loss, whose
    cotangents are ignored (callers stop their gradient). `static` is (kl_kind, dual).
    """
    return _loss_row_stats(static, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips)


def _loss_row_sums_fwd(static, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips):
    sums = _loss_row_stats(static, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips)
    return sums, (logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips)


def _loss_row_sums_bwd(static, residuals, cotangents):
    kl_kind, dual = static
    logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips = residuals

    def token_losses(logp, old, ref, adv):
        return _token_losses(logp, old, ref, adv, valid_BxT, clips, kl_kind=kl_kind, dual=dual)[:2]

    # The barrier keeps XLA from sharing ratio / exp(x) with the forward pass (CSE), which
    # would write them to memory; recomputing them inside the gradient's loop is cheaper.
    inputs = jax.lax.optimization_barrier((logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT))
    _, vjp = jax.vjp(token_losses, *inputs)
    shape = valid_BxT.shape
    row_cts = tuple(None if ct is None else jnp.broadcast_to(ct[:, None], shape) for ct in cotangents[:2])
    d_logp, d_old, d_ref, d_adv = vjp(row_cts)
    return d_logp, d_old, d_ref, d_adv, None, tuple(jnp.zeros_like(c) for c in clips)


_loss_row_sums.defvjp(_loss_row_sums_fwd, _loss_row_sums_bwd)


def _objective(logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, *, kl_kind, clip_low,
               clip_high, dual_clip, agg, norm_len):
    """Policy loss and the unweighted KL term (when ref_logp is given), plus metrics.

    Everything comes from one blocked pass, `_loss_row_sums` (custom VJP): per-sequence
    sums of the loss terms (differentiable) and of the metric parts -- clip indicators,
    log-ratio, validity (constants). All aggregation modes and token-level metrics are
    finished from those [B] row sums.
    """
    _check_agg(agg, norm_len)
    _check_clip(clip_low, clip_high, dual_clip)
    dual = dual_clip is not None
    clips = tuple(jnp.asarray(c, F32) for c in (clip_low, clip_high, dual_clip if dual else 0.0))
    pg_B, kl_B, rows = _loss_row_sums((kl_kind, dual), logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT,
                                      clips)
    stat = jax.lax.stop_gradient
    rows = stat(rows)
    row_len_B = rows["valid"]
    length = valid_BxT.shape[-1] if norm_len is None else norm_len
    num_tokens = jnp.maximum(jnp.sum(row_len_B), 1.0)

    def token_mean(name):
        return stat(jnp.sum(rows[name]) / num_tokens)

    pg_loss = _agg_from_row_sums(pg_B, row_len_B, agg, length)
    kl = jnp.zeros((), F32) if kl_B is None else _agg_from_row_sums(kl_B, row_len_B, agg, length)
    clip_high_frac = token_mean("clipped_high")
    clip_low_frac = token_mean("clipped_low")
    metrics = {
        "pg_loss": stat(pg_loss),
        "clipfrac": clip_high_frac + clip_low_frac,
        "clipfrac_high": clip_high_frac,
        "clipfrac_low": clip_low_frac,
        "dual_clipfrac": token_mean("dual_clipped") if dual else jnp.zeros((), F32),
        "approx_kl": -token_mean("log_ratio"),
    }
    return pg_loss, kl, metrics


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
):
    """PPO clipped-surrogate loss aggregated by `agg`; returns (loss, metrics).

    metrics (float32 scalars, token-level means over valid tokens whatever `agg` is):
    pg_loss, clipfrac (= clipfrac_high + clipfrac_low), clipfrac_high, clipfrac_low,
    dual_clipfrac (0 without dual clip), approx_kl (mean of old_logp - logp, k1 of
    KL(pi_old || pi) on the sampled tokens, verl's `ppo_kl`).
    """
    pg_loss, _, metrics = _objective(
        logp_BxT, old_logp_BxT, None, adv_BxT, as_valid(mask_BxT), kl_kind="k1",
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, norm_len=norm_len,
    )
    return pg_loss, metrics


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
):
    """-J(theta) of eq. 6: policy_loss + beta * KL(pi_theta || pi_ref); (loss, metrics).

    The KL is the per-token `kl_penalty(logp, ref_logp, kind=kl_kind)` aggregated with the
    same `agg` as the policy term (verl's `use_kl_loss` path), so beta keeps one meaning
    across modes. With beta == 0 (a Python number) the KL is skipped and `ref_logp` may
    be None. metrics: loss, pg_loss, kl, and policy_loss's clip fractions and approx_kl.
    """
    if isinstance(beta, (int, float)) and beta < 0:
        raise ValueError(f"caspo_loss: beta={beta!r} must be >= 0 (the paper uses 0.005)")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"caspo_loss: kl_kind={kl_kind!r} is not one of {KL_KINDS}; pick one of those")
    skip_kl = isinstance(beta, (int, float)) and beta == 0
    if not skip_kl and ref_logp_BxT is None:
        raise ValueError("caspo_loss: beta > 0 needs ref_logp (or set beta=0 to drop the KL term)")
    pg_loss, kl, metrics = _objective(
        logp_BxT, old_logp_BxT, None if skip_kl else ref_logp_BxT, adv_BxT, as_valid(mask_BxT),
        kl_kind=kl_kind, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        agg=agg, norm_len=norm_len,
    )
    loss = pg_loss + beta * kl
    metrics = {"loss": jax.lax.stop_gradient(loss), **metrics, "kl": jax.lax.stop_gradient(kl)}
    return loss, metrics
