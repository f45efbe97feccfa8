"""Causal self-attention for XLA (CPU, and the GPU/TPU fallbacks): query blocks, saved
log-sum-exp, and a hand-written backward.

Let B denote batch, L sequence length, N query heads, K key/value heads, G = N / K query
heads per key/value head, H head dim, R = Q * G the score rows of a block of Q queries.

Why not ``jax.nn.dot_product_attention`` per query block (the previous path): on XLA:CPU it
vmaps over G, so every block's score matmuls have only 128 rows per (B, K, G) batch entry
and stay on one core, it applies the [B, 1, L, L] mask with a pass over every score, and
its autodiff backward stores or (under remat) recomputes the whole forward, probabilities
included. Here:

- the G query heads sharing a key/value head are one block of R = Q * G rows, so each
  block does one [B*K, R, H] x [B*K, end, H] matmul (G times the rows of a vmapped one),
  and the causal + padding mask is computed from positions inside the block (no [L, L]
  array);
- the forward saves the output and the log-sum-exp [B, K, L*G] of every query row, so the
  backward recomputes each block's probabilities with one matmul and one exp and never
  the forward's max/sum passes (flash attention's backward, done per query block).

Queries in blocks of ``q_block`` attend keys ``[:end]`` of their block (the causal skip:
about half the score work at long lengths). Rows with no attendable key (left padding)
see every key of their block with equal weight (a finite, meaningless average, as in
``layers.attention``), never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

ATTENTION_OUTPUT = "attention_output"  # checkpoint name of every attention's output (and here its log-sum-exp)
NEG = -1e30  # masked scores: finite, so a row with nothing to attend is uniform, not NaN


def _group(q_BxLxNxH, K):
    """[B, L, N, H] -> [B, K, L*G, H]: row l*G + g is query l of group head g."""
    B, L, N, H = q_BxLxNxH.shape
    return q_BxLxNxH.reshape(B, L, K, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, K, L * (N // K), H)


def _ungroup(x_BxKxRxH, N):
    B, K, R, H = x_BxKxRxH.shape
    L = R // (N // K)
    return x_BxKxRxH.reshape(B, K, L, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, L, N, H)


def _blocks(L: int, q_block: int):
    """(start, end) of every query block."""
    return [(start, min(start + q_block, L)) for start in range(0, L, q_block)]


def _allowed(start: int, end: int, G: int, valid_BxL):
    """[B, 1, R, end] boolean: row r (query start + r // G) may attend key j < end iff
    j <= that query and key j is valid."""
    query_R = jnp.asarray(start + np.arange((end - start) * G) // G, jnp.int32)  # a constant, not iota // G
    causal_RxS = jnp.arange(end)[None, :] <= query_R[:, None]
    return causal_RxS[None, None] & (valid_BxL[:, None, None, :end] != 0)


def _scores(q_BxKxRxH, k_BxKxSxH, allowed, scale):
    s = jnp.einsum("bkrh,bksh->bkrs", q_BxKxRxH, k_BxKxSxH, preferred_element_type=jnp.float32) * scale
    return jnp.where(allowed, s, NEG)


def _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, q_block):
    """(output [B, L, N, H], log-sum-exp [B, K, R] float32)."""
    with jax.named_scope("flash_attention_fwd"):  # the profiler's name for this work
        return _forward_blocks(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, q_block)


def _forward_blocks(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, q_block):
    _, L, N, H = q_BxLxNxH.shape
    K = k_BxLxKxH.shape[2]
    G, scale = N // K, H ** -0.5
    q = _group(q_BxLxNxH, K)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k_BxLxKxH, v_BxLxKxH))  # [B, K, L, H]
    outs, lses = [], []
    for start, end in _blocks(L, q_block):
        s = _scores(q[:, :, start * G:end * G], k[:, :, :end], _allowed(start, end, G, valid_BxL), scale)
        m = s.max(-1, keepdims=True)
        p = jnp.exp(s - m)
        total = p.sum(-1, keepdims=True)
        o = jnp.einsum("bkrs,bksh->bkrh", p.astype(v.dtype), v[:, :, :end], preferred_element_type=jnp.float32)
        outs.append((o / total).astype(q.dtype))
        lses.append((m + jnp.log(total))[..., 0])
    return _ungroup(jnp.concatenate(outs, axis=2), N), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def flash_causal_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, q_block: int):
    """Causal self-attention with key padding: query i attends key j iff j <= i and
    ``valid_BxL[b, j]`` (boolean, or 1/0). q [B, L, N, H], k/v [B, L, K, H] -> [B, L, N, H]. Equals
    ``layers.attention`` under ``decoder.causal_mask(valid)`` for every query that sees a key
    (values and gradients; tested)."""
    return _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, q_block)[0]


def _fwd(q, k, v, valid, q_block):
    """The residuals carry ``ATTENTION_OUTPUT``'s name: under a remat policy that saves it
    (``layers.remat``'s "save_projections") the backward does not rerun the forward."""
    out, lse = (checkpoint_name(x, ATTENTION_OUTPUT) for x in _forward(q, k, v, valid, q_block))
    return out, (q, k, v, valid, out, lse)


def _bwd(q_block, residuals, d_out_BxLxNxH):
    with jax.named_scope("flash_attention_bwd"):
        return _backward_blocks(q_block, residuals, d_out_BxLxNxH)


def _backward_blocks(q_block, residuals, d_out_BxLxNxH):
    """Per query block: p = exp(s - lse); dV += p^T dO; dS = p * (dO V^T - rowsum(dO * O));
    dQ = dS K * scale; dK += dS^T Q * scale (keys [:end] only)."""
    q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, valid_BxL, out_BxLxNxH, lse = residuals
    _, L, N, H = q_BxLxNxH.shape
    K = k_BxLxKxH.shape[2]
    G, scale = N // K, H ** -0.5
    q, d_o, o = (_group(x, K) for x in (q_BxLxNxH, d_out_BxLxNxH, out_BxLxNxH))
    k, v = (x.transpose(0, 2, 1, 3) for x in (k_BxLxKxH, v_BxLxKxH))
    delta = jnp.sum(d_o.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, K, R]
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, end in _blocks(L, q_block):
        rows = slice(start * G, end * G)
        q_i, do_i = q[:, :, rows], d_o[:, :, rows]
        s = _scores(q_i, k[:, :, :end], _allowed(start, end, G, valid_BxL), scale)
        p = jnp.exp(s - lse[:, :, rows, None])
        dv = dv.at[:, :, :end].add(jnp.einsum("bkrs,bkrh->bksh", p.astype(do_i.dtype), do_i,
                                              preferred_element_type=jnp.float32))
        dp = jnp.einsum("bkrh,bksh->bkrs", do_i, v[:, :, :end], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, rows, None]) * scale).astype(q.dtype)
        dq_blocks.append(jnp.einsum("bkrs,bksh->bkrh", ds, k[:, :, :end], preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :end].add(jnp.einsum("bkrs,bkrh->bksh", ds, q_i, preferred_element_type=jnp.float32))
    dq = _ungroup(jnp.concatenate(dq_blocks, axis=2), N).astype(q_BxLxNxH.dtype)
    dk, dv = (x.transpose(0, 2, 1, 3).astype(k_BxLxKxH.dtype) for x in (dk, dv))
    return dq, dk, dv, None


flash_causal_attention.defvjp(_fwd, _bwd)
