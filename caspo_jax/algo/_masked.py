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


def masked_mean(x: jax.Array, valid: jax.Array, axis=None, keepdims=False) -> jax.Array:
    """Mean over valid positions; 0 where there are none (never NaN)."""
    total = jnp.sum(present(x, valid), axis=axis, keepdims=keepdims)
    return total / jnp.maximum(count(valid, axis, keepdims), 1.0)


def masked_zscore(x: jax.Array, valid: jax.Array, axis, *, eps: float, scale: bool = True):
    """(x - mean) / (std + eps) over the valid positions along `axis`.

    The std is the sample std (ddof=1). A slice that is degenerate -- fewer than two valid
    positions, every valid value equal, or std below `eps` -- yields exactly 0 everywhere,
    with finite (zero-through-the-std) gradients: the variance fed to `sqrt` is replaced
    by 1 there (the double-where pattern), so `sqrt'(0) = inf` never meets a 0 cotangent.
    The max == min test makes equal values give 0 even when the float mean of identical
    numbers carries a rounding residue larger than `eps` (e.g. values near 1e3).
    Absent positions come out as exactly 0. Returns float32 of x's shape.
    """
    x = present(x, valid)
    n = count(valid, axis, keepdims=True)
    mean = jnp.sum(x, axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
    centred = jnp.where(valid, x - mean, 0.0)
    var = jnp.sum(centred * centred, axis=axis, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=axis, keepdims=True)
    degenerate = (n < 2.0) | (hi <= lo) | (var < eps * eps)
    if scale:
        std = jnp.sqrt(jnp.where(degenerate, 1.0, var))
        out = centred / (std + eps)
    else:
        out = centred
    return jnp.where(valid & ~degenerate, out, 0.0)
