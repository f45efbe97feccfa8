"""Response log-probs and entropies from the policy, without a [B, L, vocab] tensor.

Let B be rows, T response tokens, L = Lp + T, D width, V vocabulary, C the chunk length.
Only the T response positions reach the LM head, and they do so C at a time inside a
``lax.map`` whose body is rematerialised (``jax.checkpoint``): forward and backward each
hold one [B, C, V] float32 block, never [B, T, V] (Qwen's V is ~152k).

Model-agnostic: only ``model.encode_images``, ``model.hidden_states`` and
``model.lm_head`` are called.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from caspo_jax.step.batch import SequenceLayout, TrainBatch
from caspo_jax.step.optimizer import StepConfig

DEFAULT_CHUNK = 128


def cast_floats(tree, dtype):
    """Floating leaves cast to ``dtype`` (bfloat16 compute over float32 master weights; a
    bfloat16 copy asked for float32 is widened). None, or leaves already in ``dtype``: as given."""
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype
                        else x, tree)


def encode_batch_images(model, params, batch: TrainBatch):
    """[U, D] image features for the batch's prompts (None without images)."""
    if batch.image_embeds is not None:
        return batch.image_embeds
    if not batch.image_grid_thw:
        return None
    return model.encode_images(params, batch.pixel_values, batch.image_grid_thw)


def response_logprobs_from_hidden(model, params, h_BxTxD, targets_BxT, chunk: int = DEFAULT_CHUNK,
                                  temperature: float = 1.0):
    """log pi_T(target) and the entropy of pi_T at each of T positions, float32 [B, T] each,
    where pi_T = softmax(logits / temperature): the distribution a sampler at that
    temperature draws from (without its top-k / top-p filters, like verl).

    ``h_BxTxD`` are the hidden states that predict ``targets_BxT``; ``temperature`` is a
    static Python float (1.0 costs nothing). The entropy is a metric: its gradient is stopped.
    """
    B, T, D = h_BxTxD.shape
    C = max(1, min(chunk, T))
    n = -(-T // C)
    pad = n * C - T
    h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    h_NxBxCxD = h.reshape(B, n, C, D).transpose(1, 0, 2, 3)
    t_NxBxC = t.reshape(B, n, C).transpose(1, 0, 2)

    @jax.checkpoint
    def one_chunk(args):
        h_BxCxD, t_BxC = args
        logits = model.lm_head(params, h_BxCxD).astype(jnp.float32)  # [B, C, V]
        if temperature != 1.0:
            logits = logits / temperature
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0]
        probs = jnp.exp(logits - logz[..., None])
        entropy = logz - jnp.sum(probs * logits, axis=-1)
        return picked - logz, jax.lax.stop_gradient(entropy)

    if n == 1:  # no loop to compile
        logp, entropy = one_chunk((h_NxBxCxD[0], t_NxBxC[0]))
        return logp[:, :T], entropy[:, :T]
    logp, entropy = jax.lax.map(one_chunk, (h_NxBxCxD, t_NxBxC))

    def back(x):
        return x.transpose(1, 0, 2).reshape(B, n * C)[:, :T]
    return back(logp), back(entropy)


def layout_logprobs(model, params, layout: SequenceLayout, response_ids_BxT, embeds_UxD=None,
                    chunk: int = DEFAULT_CHUNK, temperature: float = 1.0):
    """(logp, entropy) [B, T] of the response tokens in one layout, at ``temperature``;
    traceable (call inside jit)."""
    T = response_ids_BxT.shape[1]
    # image_slot (host-computed) says which row of the encoding each placeholder takes: a
    # per-token gather, no prefix sum across the (possibly sharded) rows.
    slot = None if embeds_UxD is None else layout.image_slot
    h = model.hidden_states(params, layout.input_ids, layout.attention_mask, position_ids=layout.position_ids,
                            image_embeds=embeds_UxD, image_slot=slot)
    start = layout.prompt_len - 1
    h_BxTxD = jax.lax.slice_in_dim(h, start, start + T, axis=1)
    return response_logprobs_from_hidden(model, params, h_BxTxD, response_ids_BxT, chunk, temperature)


@functools.partial(jax.jit, static_argnames=("model", "layout", "chunk", "compute_dtype", "temperature"))
def compute_logprobs(model, params, batch: TrainBatch, *, layout: str = "student", chunk: int = DEFAULT_CHUNK,
                     compute_dtype=None, temperature: float = 1.0):
    """(logp_BxT, entropy_BxT), float32, 0 where ``response_mask`` is 0. Jitted; shardings
    follow the inputs (place params and batch with ``caspo_jax.step.shard_*``).

    layout="student": the policy's view (old / reference / current log-probs);
    layout="teacher": the constitution-conditioned prompt (eq. 4's log pi(a_t | s_t, C)),
    scored by whatever ``params`` the caller passes (see ``teacher_params``).
    compute_dtype: the floating parameters are cast to it first (None: as given);
    temperature: the logits' divisor (``response_logprobs_from_hidden``). Log-probs that
    meet in a ratio, a KL or a token reward must share both: use ``step_logprobs``.
    """
    if layout not in ("student", "teacher"):
        raise ValueError(f"compute_logprobs: layout={layout!r}; use 'student' or 'teacher'")
    seq = batch.student if layout == "student" else batch.teacher
    if seq is None:
        raise ValueError("compute_logprobs: the batch has no teacher layout; pass teacher_prompt_ids to "
                         "build_train_batch")
    params = cast_floats(params, compute_dtype)
    embeds = encode_batch_images(model, params, batch)
    logp, entropy = layout_logprobs(model, params, seq, batch.response_ids, embeds, chunk, temperature)
    valid = batch.response_mask > 0
    return jnp.where(valid, logp, 0.0), jnp.where(valid, entropy, 0.0)


def step_logprobs(model, cfg: StepConfig, params, batch: TrainBatch, *, layout: str = "student"):
    """``compute_logprobs`` as the train step computes its current log-probs: ``cfg``'s
    compute dtype, sampling temperature and LM-head chunk. The old, reference and teacher
    log-probs all come from here, so at step 0 (reference = policy) the KL is exactly 0,
    and a teacher prompt equal to the student's gives r_t exactly 0, in any dtype."""
    return compute_logprobs(model, params, batch, layout=layout, chunk=cfg.logprob_chunk,
                            compute_dtype=cfg.compute_dtype, temperature=float(cfg.temperature))


TEACHER_SOURCES = ("rollout_policy", "frozen_sft", "original")


def teacher_params(source: str, *, rollout_policy=None, frozen_sft=None, original=None):
    """The parameters that score the constitution-conditioned layout (``CaspoConfig.teacher``):
    "rollout_policy" = pi_old, the paper's dynamic reference (CASPO, default);
    "frozen_sft" = the frozen reference/SFT model (CASPO-w.-SMC); "original" = any other
    checkpoint, e.g. the pre-SFT model (CASPO-w.-OMC)."""
    given = {"rollout_policy": rollout_policy, "frozen_sft": frozen_sft, "original": original}
    if source not in given:
        raise ValueError(f"teacher_params: source={source!r}; CaspoConfig.teacher must be one of {TEACHER_SOURCES}")
    if given[source] is None:
        raise ValueError(f"teacher_params: CaspoConfig.teacher={source!r} but no {source}= parameters were given")
    return given[source]
