"""Token sampling as pure functions: temperature, top-k, top-p, per-sample PRNG keys.

Let S denote samples and V the vocabulary. Filtering works on the logits, so the sampled
distribution is exactly ``softmax(filtered / temperature)``; the log-prob the engines
return is that of the tempered but *unfiltered* distribution (see ``SamplingParams``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """The static part of ``SamplingParams`` (one compiled loop per value)."""

    greedy: bool
    top_k: int
    top_p: float

    @classmethod
    def of(cls, sampling) -> "SampleSpec":
        return cls(sampling.greedy, int(sampling.top_k), float(sampling.top_p))


def filter_logits(logits_SxV: jax.Array, temperature, top_k: int, top_p: float, candidates: int = 256
                  ) -> jax.Array:
    """``logits / temperature`` with everything outside the top-k and the top-p nucleus at -inf.

    top-p keeps the smallest prefix of the descending-probability order whose mass reaches
    ``top_p`` (a token is kept when the mass strictly before it is < top_p), as vLLM/HF do.
    Ties with the cut-off value are kept.

    Cost on CPU (S=64, V=32k): a full sort of the row is ~0.5 s, so neither filter sorts
    it when it can avoid it. top-k takes the k-th value from XLA's TopK (the minimum of the
    top-k values: slicing the last one makes XLA rewrite TopK into a full sort). top-p on a
    vocabulary larger than ``4 * candidates`` looks for the nucleus among the ``candidates``
    largest logits (probabilities normalised over the whole row) and sorts the row only
    when some row's nucleus does not end inside them (``lax.cond``).
    """
    scaled = logits_SxV.astype(jnp.float32) / temperature
    V = scaled.shape[-1]
    if top_k > 0 and top_k < V:
        kth = jnp.min(jax.lax.top_k(scaled, top_k)[0], axis=-1, keepdims=True)
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p < 1.0:
        if V > 4 * candidates:
            cutoff = _nucleus_cutoff_from_candidates(scaled, top_p, candidates)
        else:
            cutoff = _nucleus_cutoff(-jnp.sort(-scaled, axis=-1), jax.nn.softmax(-jnp.sort(-scaled, axis=-1), axis=-1),
                                     top_p)
        scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    return scaled


def _nucleus_cutoff(desc_SxK: jax.Array, probs_SxK: jax.Array, top_p: float) -> jax.Array:
    """The smallest kept value [S, 1] given values in descending order and their probabilities."""
    mass_before = jnp.cumsum(probs_SxK, axis=-1) - probs_SxK
    kept = mass_before < top_p
    return jnp.min(jnp.where(kept, desc_SxK, jnp.inf), axis=-1, keepdims=True)


def _nucleus_cutoff_from_candidates(scaled_SxV: jax.Array, top_p: float, candidates: int) -> jax.Array:
    # (no slicing of TopK's output anywhere: XLA then rewrites TopK into a full sort)
    desc, _ = jax.lax.top_k(scaled_SxV, candidates)  # descending
    top = jnp.max(scaled_SxV, axis=-1, keepdims=True)
    total = jnp.sum(jnp.exp(scaled_SxV - top), axis=-1, keepdims=True)
    probs = jnp.exp(desc - top) / total
    # the nucleus ends inside the candidates when the last (smallest) one is not kept: the
    # mass before it reaches top_p
    inside = jnp.all(jnp.sum(probs, axis=-1) - jnp.min(probs, axis=-1) >= top_p)

    def full_sort(_):
        desc_all = -jnp.sort(-scaled_SxV, axis=-1)
        return _nucleus_cutoff(desc_all, jax.nn.softmax(desc_all, axis=-1), top_p)

    return jax.lax.cond(inside, lambda _: _nucleus_cutoff(desc, probs, top_p), full_sort, None)


def suppress_tokens(logits_SxV: jax.Array, suppressed_V: jax.Array) -> jax.Array:
    """Logits with the ``suppressed`` ids (bool [V]) at -inf, so neither argmax nor a draw
    (after any temperature/top-k/top-p) can pick them."""
    return jnp.where(suppressed_V, -jnp.inf, logits_SxV)


def sample_tokens(keys_Sx2: jax.Array, logits_SxV: jax.Array, temperature, spec: SampleSpec) -> jax.Array:
    """One token per row [S] (int32): argmax when greedy, else a draw with that row's key
    (one uniform per row, ``inverse_cdf_draw``)."""
    if spec.greedy:
        return jnp.argmax(logits_SxV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_SxV, temperature, spec.top_k, spec.top_p)
    uniform_S = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_Sx2)
    return inverse_cdf_draw(uniform_S, filtered)


def _first_above(cum_SxB: jax.Array, target_S: jax.Array, positive_SxB: jax.Array) -> jax.Array:
    """Per row, the first column whose running sum exceeds ``target`` among columns of positive
    mass; when rounding leaves none (target at the very top), the last positive column."""
    B = cum_SxB.shape[-1]
    columns = jnp.arange(B, dtype=jnp.int32)
    above = (cum_SxB > target_S[:, None]) & positive_SxB
    first = jnp.min(jnp.where(above, columns, B), axis=-1)
    last_positive = jnp.max(jnp.where(positive_SxB, columns, -1), axis=-1)
    return jnp.where(first < B, first, last_positive).astype(jnp.int32)


def inverse_cdf_draw(uniform_S: jax.Array, logits_SxV: jax.Array, block: int = 128) -> jax.Array:
    """Token ids [S] (int32) drawn from ``softmax(logits)`` by inverting the CDF at ``uniform``.

    Why not ``jax.random.categorical``: its Gumbel-max trick draws V random numbers per row
    and step, and on CPU the threefry bits for [64, 32k] cost more than the whole 8-layer
    decode step (measured ~50 ms of a ~110 ms step). Here one uniform per row suffices.
    The CDF is two-level (sums of ``block``-wide slices, then the running sum inside the
    chosen slice), so each float32 running sum spans at most V/block or block terms and
    the rounding stays near 1e-7 of the row's mass. A token whose logit is -inf (filtered,
    suppressed) has zero mass and is never drawn, whatever the rounding: only columns of
    positive mass qualify.
    """
    S, V = logits_SxV.shape
    nb = -(-V // block)
    padded = jnp.pad(logits_SxV.astype(jnp.float32), ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf)
    top = jnp.max(padded, axis=-1, keepdims=True)
    mass_SxNxB = jnp.exp(padded - top).reshape(S, nb, block)
    block_mass = jnp.sum(mass_SxNxB, axis=-1)
    block_cum = jnp.cumsum(block_mass, axis=-1)
    target = uniform_S.astype(jnp.float32) * block_cum[:, -1]
    b = _first_above(block_cum, target, block_mass > 0)
    inner = jnp.take_along_axis(mass_SxNxB, b[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(block_cum - block_mass, b[:, None], axis=1)[:, 0]
    j = _first_above(jnp.cumsum(inner, axis=-1), target - before, inner > 0)
    return b * block + j


def token_logprobs(logits_SxV: jax.Array, tokens_S: jax.Array, temperature=1.0) -> jax.Array:
    """``log_softmax(logits / temperature)[token]`` per row, float32 [S]: the tempered
    distribution without top-k/top-p filters, as the trainer scores it."""
    logp = jax.nn.log_softmax(logits_SxV.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, tokens_S[:, None], axis=-1)[:, 0]


def sample_keys(prompt_seeds: np.ndarray, n: int) -> jax.Array:
    """Base PRNG keys [P*n, 2]: sample j of prompt p gets ``fold_in(PRNGKey(seed_p), j)``.

    A sample's key depends only on its prompt's seed and its index, never on the batch it
    shares, so a fixed seed reproduces whatever else is in the batch. Step t of the decode
    folds in t.
    """
    seeds = jnp.asarray(np.asarray(prompt_seeds, np.uint32))
    base = jax.vmap(jax.random.PRNGKey)(seeds)
    per = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(base)
    return per.reshape(len(prompt_seeds) * n, -1)


def step_keys(keys_Sx2: jax.Array, step) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_Sx2)
