"""Per-token values of a [B, T] batch to one scalar: verl's four `loss_agg_mode`s.

Eq. 6 averages with 1/(GT); verl, which the paper ran, defaults to the token mean, and
the two coincide when every response has the same length (BUILD_NOTES.md "Eq. 6's
1/(GT) vs aggregation modes"). Every mode is a function of each sequence's token sum
and valid-token count, so `aggregate_rows` finishes any of them from those [B] arrays
(the fast path in `_fast` produces them without [B, T] temporaries).
"""

import jax
import jax.numpy as jnp

from caspo_jax.algo._masked import F32, as_valid, present

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_agg(agg, norm_len) -> None:
    """ValueError for an unknown mode or a norm_len that is not a positive int or None."""
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r} is not one of {AGG_MODES}; pick one of those")
    if norm_len is not None and not (isinstance(norm_len, int) and norm_len > 0):
        raise ValueError(f"norm_len={norm_len!r} must be a positive int or None (None = T)")


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
    check_agg(agg, norm_len)
    valid_BxT = as_valid(mask_BxT)
    row_len_B = jnp.sum(valid_BxT.astype(F32), axis=-1)
    row_sum_B = jnp.sum(present(loss_BxT, valid_BxT), axis=-1)
    return aggregate_rows(row_sum_B, row_len_B, agg=agg, length=valid_BxT.shape[-1] if norm_len is None else norm_len)


def aggregate_rows(row_sum_B: jax.Array, row_len_B: jax.Array, *, agg: str, length: int):
    """`aggregate` from each sequence's token sum and valid count ([B] each); `length` is
    the seq-mean-token-sum-norm divisor (norm_len, or T)."""
    num_tokens = jnp.maximum(jnp.sum(row_len_B), 1.0)
    num_seqs = jnp.maximum(jnp.sum(row_len_B > 0, dtype=F32), 1.0)
    if agg == "token-mean":
        return jnp.sum(row_sum_B) / num_tokens
    if agg == "seq-mean-token-mean":
        return jnp.sum(row_sum_B / jnp.maximum(row_len_B, 1.0)) / num_seqs
    if agg == "seq-mean-token-sum":
        return jnp.sum(row_sum_B) / num_seqs
    return jnp.sum(row_sum_B) / (num_seqs * length)
