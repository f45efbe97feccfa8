"""Masked reductions shared by the CASPO maths.

A position whose mask is 0 is *absent*: it contributes nothing to any sum, count, mean,
maximum or gradient. Every helper here first replaces absent values with 0 through
`jnp.where` (never `x * mask`), so a NaN or inf stored at an absent position -- padding
logits, say -- can neither leak into the result nor into the gradient: the cotangent
`jnp.where` sends to the unselected branch is an exact 0, not `0 * inf`.
"""

import jax
import jax.numpy as jnp

F32 = jnp.float32


def as_valid(mask: jax.Array) -> jax.Array:
    """The boolean validity of a 0/1 (bool, int or float) mask."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def present(x: jax.Array, valid: jax.Array) -> jax.Array:
    """`x` in float32 with absent positions set to exactly 0 (value and gradient)."""
    return jnp.where(valid, jnp.asarray(x).astype(F32), 0.0)


def count(valid: jax.Array, axis=None, keepdims=False) -> jax.Array:
    """Number of valid positions, as float32."""
    return jnp.sum(valid, axis=axis, keepdims=keepdims, dtype=F32)


def row_sums(arrays, axis, keepdims=False):
    """Sums of several same-shape arrays along `axis`, one reduction each.

    Kept as separate reductions on purpose: stacking them into one [k, ...] reduction
    materialises a branchy concatenate on XLA:CPU that measured ~5x slower.
    """
    return tuple(jnp.sum(a, axis=axis, keepdims=keepdims) for a in arrays)


def masked_mean(x: jax.Array, valid: jax.Array, axis=None, keepdims=False) -> jax.Array:
    """Mean over valid positions; 0 where there are none (never NaN)."""
    total = jnp.sum(present(x, valid), axis=axis, keepdims=keepdims)
    return total / jnp.maximum(count(valid, axis, keepdims), 1.0)


def masked_zscore(x: jax.Array, valid: jax.Array, axis, *, eps: float, scale: bool = True, exact_constant: bool = False):
    """(x - mean) / (std + eps) over the valid positions along `axis`; returns (z, n, total).

    The std is the sample std (ddof=1). A slice that is degenerate -- fewer than two valid
    positions or std below `eps` -- yields exactly 0 everywhere, with finite (zero through
    the std) gradients: the variance fed to `sqrt` is replaced by 1 there (the double-where
    pattern), so `sqrt'(0) = inf` never meets a 0 cotangent. The variance uses the
    corrected two-pass formula (sum d^2 - (sum d)^2 / n with d = x - mean): when every
    value is equal, the float mean's rounding residue cancels, so a constant slice gives
    0 rather than +-1 even where that residue exceeds `eps` (e.g. values near 1e3).
    `exact_constant` adds a max == min test (two more passes over x) that makes this exact
    in every case; it is on for the small [P, G] reward array, off for [P, G, T] tokens.
    Absent positions come out as exactly 0. `n` and `total` are the valid count and the
    sum of x per slice (keepdims), for callers that report means for free.
    """
    x = present(x, valid)
    n, total = row_sums((valid.astype(F32), x), axis, keepdims=True)
    mean = total / jnp.maximum(n, 1.0)
    d = jnp.where(valid, x - mean, 0.0)
    d_sum, d_sq_sum = row_sums((d, d * d), axis, keepdims=True)
    var = jnp.maximum(d_sq_sum - d_sum * d_sum / jnp.maximum(n, 1.0), 0.0) / jnp.maximum(n - 1.0, 1.0)
    degenerate = (n < 2.0) | (var < eps * eps)
    if exact_constant:
        hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
        lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=axis, keepdims=True)
        degenerate = degenerate | (hi <= lo)
    centred = d - d_sum / jnp.maximum(n, 1.0)
    if scale:
        std = jnp.sqrt(jnp.where(degenerate, 1.0, var))
        out = centred / (std + eps)
    else:
        out = centred
    return jnp.where(valid & ~degenerate, out, 0.0), n, total
