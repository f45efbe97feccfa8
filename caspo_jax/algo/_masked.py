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


def clamp(x: jax.Array, low, high) -> jax.Array:
    """x bounded to [low, high] (float32 bounds), derivative 1 strictly inside, else 0.

    `lax.clamp` rather than `jnp.clip`: the values are the same; jnp.clip's gradient
    (through max and min) gives 1/2 at an exact tie and costs two divisions per element
    in the backward loop, which only changes anything at a value exactly on a bound.
    """
    return jax.lax.clamp(jnp.asarray(low, F32), x, jnp.asarray(high, F32))


def fused_sums(arrays, axis, keepdims=False):
    """Sums of several same-shape float32 arrays along `axis`, in ONE pass over memory.

    A variadic `lax.reduce`: XLA:CPU emits a single loop that computes every producer
    (the `where`s, differences, products feeding `arrays`) in registers and updates all
    the accumulators, so nothing of shape `arrays[0].shape` is written to memory.
    Separate `jnp.sum`s would each materialise their producer and read it back.
    That loop is scalar, so keep `exp` and friends out of the producers (an `exp` there
    costs more than a vectorised pass that writes the values out); see BUILD_NOTES.md.
    It accumulates in order, so keep `axis` short (a row of T tokens: error ~ sqrt(T)
    float32 eps) and combine the [rows] results afterwards.
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


def _population_shift(x0, v0):
    """One valid value of each population, else 0: [..., rows] first values -> [..., 1].

    `x0` / `v0` hold each row's first value and validity (the first token of a
    trajectory), populations on the leading axes and their rows on the last one; the
    first row whose first position is valid gives the shift. Every population of
    right-padded sequences has one; a population without one gets 0.
    """
    first = jnp.argmax(v0, axis=-1)[..., None]
    return jnp.where(jnp.take_along_axis(v0, first, -1), jnp.take_along_axis(x0, first, -1), 0.0)


def row_shifts(x, valid, axes):
    """(row_shift, shift) of `masked_zscore`: each row's first value, else its population's K.

    Shapes: x [..., rows..., T] -> row_shift with the last axis kept as 1, shift with
    every reduced axis kept as 1. Only the first column of `x` is read.
    """
    lead = x.shape[: x.ndim - len(axes)]
    x0, v0 = x[..., :1], valid[..., :1]
    shift = _population_shift(x0.reshape(*lead, -1), v0.reshape(*lead, -1))
    shift = shift.reshape(*lead, *(1,) * len(axes))
    return jnp.where(v0, x0, shift), shift


def merge_row_stats(n_row, s1_row, s2_row, row_shift, shift, merge_axes, eps, scale=True):
    """Exact merge (Chan et al.) of per-row shifted statistics into per-population ones.

    Inputs are [..., rows..., 1]: each row's valid count, and sum and sum of squares of
    d = x - row_shift over its valid positions; `shift` is the population's K. Returns
    (offset_row, inv_std, n, total): a valid position's z-score is
    (d + offset_row) * inv_std, inv_std is exactly 0 for a degenerate population (fewer
    than two valid positions or std < eps; the variance fed to `sqrt` is then replaced by
    1 so its gradient stays finite), n the valid count and total the sum of x.
    """
    n_row_or_1 = jnp.maximum(n_row, 1.0)
    row_mean = (row_shift - shift) + s1_row / n_row_or_1  # relative to the population's K
    n = jnp.sum(n_row, axis=merge_axes, keepdims=True)
    n_or_1 = jnp.maximum(n, 1.0)
    mean = jnp.sum(n_row * row_mean, axis=merge_axes, keepdims=True) / n_or_1
    within = jnp.sum(s2_row - s1_row * (s1_row / n_row_or_1), axis=merge_axes, keepdims=True)
    between = jnp.sum(n_row * jnp.square(row_mean - mean), axis=merge_axes, keepdims=True)
    var = jnp.maximum(within + between, 0.0) / jnp.maximum(n - 1.0, 1.0)
    degenerate = (n < 2.0) | (var < eps * eps)
    if scale:
        std = jnp.sqrt(jnp.where(degenerate, 1.0, var))
        inv_std = jnp.where(degenerate, 0.0, 1.0 / (std + eps))  # one division per population
    else:
        inv_std = jnp.where(degenerate, 0.0, 1.0)
    return (row_shift - shift) - mean, inv_std, n, n * (shift + mean)


def masked_zscore(x: jax.Array, valid: jax.Array, axis, *, eps: float, scale: bool = True):
    """(x - mean) / (std + eps) over the valid positions along `axis`; returns (z, n, total).

    `axis` names trailing axes ((1,) of [P, G]; (1, 2) or (0, 1, 2) of [P, G, T]); the
    last one is a row (a trajectory's tokens). The std is the sample std (ddof=1).
    One pass over x: per row, the count, sum and sum of squares of x - K_row, where K_row
    is the row's first value (or, when that is absent, the population's shift K from
    `row_shifts`); the rows' statistics are then merged exactly (`merge_row_stats`) on
    [rows]-sized arrays. Shifting by a value of the data keeps the one-pass variance as
    accurate as a two-pass one and makes it exact for a constant population: every
    x - K is then exactly 0, so the variance is exactly 0 (no residue, whatever the
    values). A degenerate population -- fewer than two valid positions, or std below
    `eps` -- yields exactly 0 everywhere, with finite (zero through the std) gradients.
    Absent positions come out as exactly 0. `n` and `total` are the valid count and the
    sum of x per population (keepdims), for callers that report means for free.
    """
    axes = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    if axes != tuple(range(x.ndim - len(axes), x.ndim)):
        raise ValueError(f"masked_zscore: axis={axis} must name trailing axes of a rank-{x.ndim} array")
    x = jnp.asarray(x).astype(F32)
    row_shift, shift = row_shifts(x, valid, axes)
    d = jnp.where(valid, x - row_shift, 0.0)
    n_row, s1_row, s2_row = fused_sums((valid.astype(F32), d, d * d), -1, keepdims=True)
    offset, inv_std, n, total = merge_row_stats(n_row, s1_row, s2_row, row_shift, shift, axes[:-1], eps, scale)
    return jnp.where(valid, (d + offset) * inv_std, 0.0), n, total
