"""Masked reductions shared by the CASPO maths.

A position whose mask is 0 is *absent*: it contributes nothing to any sum, count, mean,
maximum or gradient. Every helper here first replaces absent values with 0 through
`jnp.where` (never `x * mask`), so a NaN or inf stored at an absent position -- padding
logits, say -- can neither leak into the result nor into the gradient: the cotangent
`jnp.where` sends to the unselected branch is an exact 0, not `0 * inf`.
"""

import math

import jax
import jax.numpy as jnp

from caspo_jax.algo._blocks import map_row_blocks, row_sums, rows_per_block

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
    `zscore_of` with x itself as the one input; see there.
    """
    return zscore_of(lambda x: x, (x,), valid, axis, eps=eps, scale=scale)


def zscore_of(values, inputs, valid: jax.Array, axis, *, eps: float, scale: bool = True):
    """`masked_zscore` of x = values(*inputs), computed without ever writing x out.

    `values` is elementwise over the same-shape `inputs` (e.g. teacher - student log-probs
    for the token rewards); it is evaluated inside each row block and again in the final
    elementwise pass, so x costs no [..., T] array of its own.
    One pass over the inputs (`_blocks`: row blocks in cache on the CPU): per row, the
    count, sum and sum of squares of x - K_row, where K_row is the row's first value (or,
    when that is absent, the population's shift K from `row_shifts`); the rows'
    statistics are then merged exactly (`merge_row_stats`) on [rows]-sized arrays.
    Shifting by a value of the data keeps the one-pass variance as accurate as a two-pass
    one and makes it exact for a constant population: every x - K is then exactly 0, so
    the variance is exactly 0 (no residue, whatever the values). A degenerate population
    -- fewer than two valid positions, or std below `eps` -- yields exactly 0 everywhere,
    with finite (zero through the std) gradients. Absent positions come out as exactly 0,
    whatever the inputs hold there. Returns (z, n, total): `n` and `total` are the valid
    count and the sum of x per population (keepdims), for callers that report means.
    """
    valid, inputs = as_valid(valid), tuple(jnp.asarray(a) for a in inputs)
    try:
        shape = jnp.broadcast_shapes(valid.shape, *(a.shape for a in inputs))
    except ValueError as err:
        raise ValueError(f"zscore_of: mask {valid.shape} and inputs {[a.shape for a in inputs]} do not "
                         "broadcast to one shape") from err
    valid, inputs = jnp.broadcast_to(valid, shape), tuple(jnp.broadcast_to(a, shape) for a in inputs)
    ndim = valid.ndim
    axes = tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    if axes != tuple(range(ndim - len(axes), ndim)):
        raise ValueError(f"zscore_of: axis={axis} must name trailing axes of a rank-{ndim} array")

    def x_of(*arrays):
        return jnp.asarray(values(*arrays)).astype(F32)

    row_shift, shift = row_shifts(x_of(*(a[..., :1] for a in inputs)), valid[..., :1], axes)

    def block(*arrays):
        *ins, v, k = arrays
        d = jnp.where(v, x_of(*ins) - k, 0.0)
        # 0/1 is exact in bfloat16 (half the bytes of float32); the sum accumulates in float32.
        return (jnp.sum(v.astype(jnp.bfloat16), axis=-1, dtype=F32),) + row_sums(d, d * d)

    lead, T = valid.shape[:-1], valid.shape[-1]
    rows = math.prod(lead)
    flat = tuple(a.reshape(rows, T) for a in (*inputs, valid)) + (row_shift.reshape(rows, 1),)
    stats = map_row_blocks(block, flat, rows_per_block(rows, T))
    n_row, s1_row, s2_row = (s.reshape(*lead, 1) for s in stats)
    offset, inv_std, n, total = merge_row_stats(n_row, s1_row, s2_row, row_shift, shift, axes[:-1], eps, scale)
    # d masked first: the statistics' cotangents must not meet an absent position's NaN.
    d = jnp.where(valid, x_of(*inputs) - row_shift, 0.0)
    return jnp.where(valid, (d + offset) * inv_std, 0.0), n, total
