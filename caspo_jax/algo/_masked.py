"""The masking convention shared by the CASPO maths (readable and fast paths alike).

A position whose mask is 0 is *absent*: it contributes nothing to any sum, count, mean,
maximum or gradient. Every function first replaces absent values with 0 through
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


def clamp(x: jax.Array, low, high) -> jax.Array:
    """x bounded to [low, high] (float32 bounds), derivative 1 strictly inside, else 0.

    `lax.clamp` rather than `jnp.clip`: the values are the same; jnp.clip's gradient
    (through max and min) gives 1/2 at an exact tie and costs two divisions per element
    in the backward loop, which only changes anything at a value exactly on a bound.
    """
    return jax.lax.clamp(jnp.asarray(low, F32), x, jnp.asarray(high, F32))
