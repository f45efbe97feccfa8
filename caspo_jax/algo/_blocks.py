"""Row-blocked passes: the [B, T] maths one cache-sized block of rows at a time.

Why (measured on XLA:CPU, jax 0.10.2; figures in BUILD_NOTES.md "Speed"): a loop fusion
has one output, and every `jnp.sum` is a vectorised YNNPACK reduction that reads its
operand from memory, while a fused (variadic) reduction is a scalar loop. A step that
needs several sums over [B, T] therefore either writes each summand out and reads it back
(one memory pass each) or runs scalar code. A loop over blocks of rows keeps each block's
inputs and summands -- `BLOCK_ELEMENTS` float32 values, 1 MiB per array -- in cache
(L2/L3), so the inputs come from memory once and the extra passes are cache passes.
2^18 measured slightly ahead of 2^17 and 2^19, 2^15 and 2^16 clearly behind (BUILD_NOTES.md).
The loops produce per-row values only; per-row inputs (shifts, weights) enter as blocked
inputs, so XLA does not recompute them per token.
"""

import jax
import jax.numpy as jnp

BLOCK_ELEMENTS = 1 << 18


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
