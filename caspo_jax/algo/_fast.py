"""The speed under the CASPO maths: the same numbers as the readable formulas, fewer passes.

`caspo_loss` / `policy_loss` (losses.py) and `caspo_advantages` (advantages.py) dispatch
here by default (`fast=True`); with `fast=False` they run their plain formulas, which the
tests hold this module to (tests/algo/test_algo_fast.py). No maths is defined here that
the readable modules do not define first: the loss's per-token terms arrive as a function
(`losses._token_terms`), the token reward as `values`, and the aggregation is
`aggregation.aggregate_rows`. What is here is how they are evaluated:

1. Row blocks (`map_row_blocks`). Measured on XLA:CPU (jax 0.10.2; BUILD_NOTES.md
   "Speed"): a loop fusion has one output, and every `jnp.sum` is a vectorised YNNPACK
   reduction that reads its operand from memory, while a fused (variadic) reduction is a
   scalar loop. A step that needs several sums over [B, T] therefore either writes each
   summand out and reads it back (one memory pass each) or runs scalar code. A loop over
   blocks of rows keeps each block's inputs and summands -- `BLOCK_ELEMENTS` float32
   values, 1 MiB per array -- in cache, so the inputs come from memory once and the extra
   passes are cache passes. The loops produce per-row values only; per-row inputs
   (shifts) enter as blocked inputs, so XLA does not recompute them per token.
2. The one-pass z-score (`zscore_of`): per row, count, sum and sum of squares of x minus
   a value of the data, merged exactly per population (Chan et al., `merge_row_stats`).
3. Packed clip counts (`_count_codes`): valid, clipped-high and clipped-low tokens per
   row from one reduction.
4. The loss's custom VJP (`_loss_row_sums`): the forward keeps only its inputs; the
   backward recomputes the per-token terms in one elementwise loop.
"""

import functools
import math

import jax
import jax.numpy as jnp

from caspo_jax.algo._masked import F32, as_valid
from caspo_jax.algo.aggregation import aggregate_rows

BLOCK_ELEMENTS = 1 << 18  # 2^18 measured slightly ahead of 2^17 and 2^19, 2^15 and 2^16 clearly behind


# ---------------------------------------------------------------- row blocks


def rows_per_block(num_rows: int, row_elements: int) -> int:
    """The most rows dividing `num_rows` whose values fit BLOCK_ELEMENTS (at least one).

    A "row" is the leading index the caller blocks by (a trajectory of T tokens, for
    every caller today) and `row_elements` its size. Off the CPU backend everything is one block:
    GPU/TPU compilers fuse the whole pass (multi-output fusion), and a loop over slices
    of a batch-sharded axis would serialise the devices' work.
    """
    if jax.default_backend() != "cpu":
        return num_rows
    per_block = min(num_rows, max(1, BLOCK_ELEMENTS // max(1, row_elements)))
    while num_rows % per_block:
        per_block -= 1
    return per_block


def map_row_blocks(fn, arrays, rows: int):
    """fn over consecutive blocks of `rows` leading rows of every array; outputs re-joined.

    `fn(*blocks)` returns a pytree of arrays whose leading axis is the block's rows; the
    results come back with that axis `num_rows` long. A None in `arrays` reaches `fn` as
    None. One block calls `fn` directly. The blocks are dynamic slices of the arrays as
    they are (a loop over row offsets, not a `lax.map` over a [blocks, rows, ...]
    reshape), so an input computed in the same jit is the very buffer its other consumers
    read: XLA writes it once.
    """
    num_rows = next(a for a in arrays if a is not None).shape[0]
    if any(a is not None and a.shape[0] != num_rows for a in arrays):
        raise ValueError(f"map_row_blocks: arrays of {[None if a is None else a.shape[0] for a in arrays]} rows; "
                         "all need the same number")
    if rows >= num_rows:
        return fn(*arrays)
    if num_rows % rows:
        raise ValueError(f"map_row_blocks: {rows} rows per block do not divide {num_rows} rows (use rows_per_block)")
    block_shapes = tuple(None if a is None else jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype) for a in arrays)
    outs = jax.eval_shape(fn, *block_shapes)
    init = jax.tree.map(lambda o: jnp.zeros((num_rows, *o.shape[1:]), o.dtype), outs)

    def body(i, acc):
        start = i * rows
        res = fn(*(None if a is None else jax.lax.dynamic_slice_in_dim(a, start, rows) for a in arrays))
        return jax.tree.map(lambda buf, y: jax.lax.dynamic_update_slice_in_dim(buf, y, start, 0), acc, res)

    return jax.lax.fori_loop(0, num_rows // rows, body, init)


def row_sums(*arrays_RxT):
    """Sums over the last axis, one vectorised reduction per array (see the module doc)."""
    return tuple(jnp.sum(a, axis=-1) for a in arrays_RxT)


# ---------------------------------------------------------------- one-pass z-score


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
    """(row_shift, shift) of `zscore_of`: each row's first value, else its population's K.

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


def zscore_of(values, inputs, valid: jax.Array, axis, *, eps: float, scale: bool = True):
    """`advantages.masked_zscore` of x = values(*inputs), computed without writing x out.

    `values` is elementwise over the same-shape `inputs` (e.g. teacher - student log-probs
    for the token rewards); it is evaluated inside each row block and again in the final
    elementwise pass, so x costs no [..., T] array of its own. `axis` names trailing axes,
    the last one a row (a trajectory's tokens).
    One pass over the inputs (row blocks in cache on the CPU): per row, the count, sum and
    sum of squares of x - K_row, where K_row is the row's first value (or, when that is
    absent, the population's shift K from `row_shifts`); the rows' statistics are then
    merged exactly (`merge_row_stats`) on [rows]-sized arrays. Shifting by a value of the
    data keeps the one-pass variance as accurate as a two-pass one and makes it exact for
    a constant population: every x - K is then exactly 0, so the variance is exactly 0.
    With no valid row start at all (shift 0) the error grows like eps_f32 * (mean/std)^2.
    A degenerate population -- fewer than two valid positions, or std below `eps` --
    yields exactly 0 everywhere, with finite (zero through the std) gradients. Absent
    positions come out as exactly 0, whatever the inputs hold there. Returns (z, n,
    total): `n` and `total` are the valid count and the sum of x per population
    (keepdims), for callers that report means.
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


def normalized_signal(values, inputs, valid: jax.Array, axis, *, eps: float):
    """(z-score of values(*inputs), its raw mean over every valid position): both from one
    `zscore_of` pass, so the caller's metric costs no extra pass over [..., T]."""
    z, n, total = zscore_of(values, inputs, valid, axis, eps=eps)
    # The barrier stops XLA from folding sum(per-group sums) back into a fresh full
    # reduction over [P, G, T] where the statistics are one block (off the CPU).
    n, total = jax.lax.optimization_barrier((n, total))
    return z, jnp.sum(total) / jnp.maximum(jnp.sum(n), 1.0)


# ---------------------------------------------------------------- the loss


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

    One loop over blocks of rows: each block's inputs are read from memory once, and its
    per-token values (`token_terms`, i.e. `losses._token_terms`) are summed by vectorised
    reductions while in cache. Returns (pg_B, kl_B or None, stats) with stats: valid,
    clipped_high, clipped_low, dual_clipped (with a dual clip), log_ratio.
    """
    token_terms, dual = static
    B, T = valid_BxT.shape

    def block(logp, old, ref, adv, valid):
        pg, kl, parts = token_terms(logp, old, ref, adv, valid, clips)
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
    inputs, and the backward is the VJP of `token_terms` (the same per-token formulas,
    so exactly jax.grad's values) with each row's cotangent broadcast over its tokens --
    purely elementwise, so XLA emits it as one loop over [B, T] per requested gradient,
    recomputing ratio and KL from the inputs instead of storing [B, T] residuals.
    `stats` are counts and the log-ratio sum for metrics: constants of the loss, whose
    cotangents are ignored (callers stop their gradient). `static` is (token_terms, dual).
    """
    return _loss_row_stats(static, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips)


def _loss_row_sums_fwd(static, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips):
    sums = _loss_row_stats(static, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips)
    return sums, (logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips)


def _loss_row_sums_bwd(static, residuals, cotangents):
    token_terms, _ = static
    logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips = residuals

    def token_losses(logp, old, ref, adv):
        return token_terms(logp, old, ref, adv, valid_BxT, clips)[:2]

    # The barrier keeps XLA from sharing ratio / exp(x) with the forward pass (CSE), which
    # would write them to memory; recomputing them inside the gradient's loop is cheaper.
    inputs = jax.lax.optimization_barrier((logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT))
    _, vjp = jax.vjp(token_losses, *inputs)
    shape = valid_BxT.shape
    row_cts = tuple(None if ct is None else jnp.broadcast_to(ct[:, None], shape) for ct in cotangents[:2])
    d_logp, d_old, d_ref, d_adv = vjp(row_cts)
    return d_logp, d_old, d_ref, d_adv, None, tuple(jnp.zeros_like(c) for c in clips)


_loss_row_sums.defvjp(_loss_row_sums_fwd, _loss_row_sums_bwd)


def loss_terms(token_terms, logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT, valid_BxT, clips, *, dual, agg, norm_len):
    """`caspo_loss`'s two terms from one blocked pass: (pg_loss, kl, token means of the parts).

    `token_terms(logp, old, ref, adv, valid, clips)` -> (pg, kl or None, parts) is eq. 6
    per token; `dual` says whether parts["dual_clipped"] can be nonzero. Everything comes
    from `_loss_row_sums` (custom VJP): per-sequence sums of the loss terms
    (differentiable) and of the metric parts -- clip indicators, log-ratio, validity
    (constants) -- and every aggregation mode and token mean is finished from those [B]
    row sums. The means are stop-gradient; "dual_clipped" is present only with `dual`.
    """
    pg_B, kl_B, rows = _loss_row_sums((token_terms, dual), logp_BxT, old_logp_BxT, ref_logp_BxT, adv_BxT,
                                      valid_BxT, clips)
    stat = jax.lax.stop_gradient
    rows = stat(rows)
    row_len_B = rows["valid"]
    length = valid_BxT.shape[-1] if norm_len is None else norm_len
    num_tokens = jnp.maximum(jnp.sum(row_len_B), 1.0)
    pg_loss = aggregate_rows(pg_B, row_len_B, agg=agg, length=length)
    kl = jnp.zeros((), F32) if kl_B is None else aggregate_rows(kl_B, row_len_B, agg=agg, length=length)
    names = ("clipped_high", "clipped_low", "log_ratio") + (("dual_clipped",) if dual else ())
    return pg_loss, kl, {name: stat(jnp.sum(rows[name]) / num_tokens) for name in names}
