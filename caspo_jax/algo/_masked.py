"""Masked reductions shared by the CASPO maths.

A position whose mask is 0 is *absent*: it contributes nothing to any sum, count, mean,
maximum or gradient. Every helper here first replaces absent values with 0 through
`jnp.where` (never `x * mask`), so a NaN or inf stored at an absent position -- padding
logits, say -- can neither leak into the result nor into the gradient: the cotangent
`jnp.where` sends to the unselected branch is an exact 0, not `0 * inf`.
"""

import functools

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


def fused_sums(arrays, axis, keepdims=False):
    """Sums of several same-shape float32 arrays along `axis`, in ONE pass over memory.

    A variadic `lax.reduce`: XLA:CPU emits a single loop that computes every producer
    (the `where`s, differences, products feeding `arrays`) in registers and updates all
    the accumulators, so nothing of shape `arrays[0].shape` is written to memory.
    Separate `jnp.sum`s would each materialise their producer and read it back.
    That loop is scalar, so keep `exp` and friends out of the producers (an `exp` there
    costs more than a vectorised pass that writes the values out); see BUILD_NOTES.md.
    Differentiable (the derivative of a sum is the sum of the tangents).
    """
    arrays = tuple(jnp.asarray(a, F32) for a in arrays)
    axes = tuple(sorted(a % arrays[0].ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    return _fused_sums(arrays, axes, keepdims)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fused_sums(arrays, axes, keepdims):
    zeros = tuple(jnp.zeros((), F32) for _ in arrays)
    sums = jax.lax.reduce(arrays, zeros, lambda acc, x: tuple(a + b for a, b in zip(acc, x)), axes)
    return tuple(jnp.expand_dims(s, axes) if keepdims else s for s in sums)


@_fused_sums.defjvp
def _fused_sums_jvp(axes, keepdims, primals, tangents):
    (arrays,), (dots,) = primals, tangents
    return _fused_sums(arrays, axes, keepdims), tuple(jnp.sum(t, axis=axes, keepdims=keepdims) for t in dots)


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
    n, total = fused_sums((valid.astype(F32), x), axis, keepdims=True)
    mean = total / jnp.maximum(n, 1.0)
    d = jnp.where(valid, x - mean, 0.0)
    d_sum, d_sq_sum = fused_sums((d, d * d), axis, keepdims=True)
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
