"""Figure 5 on real checkpoints: the same responses scored token by token by two models.

``caspo eval --token-shift BASE_DIR ALIGNED_DIR`` takes the responses a ``caspo eval``
run stored (``--responses-from RUN_DIR``, default ``--out``), rebuilds each one's prompt
from ``--records`` (same mode, same wording as generation: ``evals.modes``), and scores
every response under both checkpoints with the trainer's own log-prob function
(``caspo_jax.step.compute_logprobs``, student layout, float32). Per response token t,
``delta_t = log pi_aligned(a_t | s_t) - log pi_base(a_t | s_t)`` (the paper's Delta log P,
section 4); ``evals.token_shift`` then takes the top-K per response and pools the token
classes into the figure.

Prompts are encoded exactly as the local generation engine encodes them
(``generators.encode_local_prompt``: chat template, image placeholders, the processor's resize),
and responses are re-tokenised from their stored text without special tokens (what the
judge saw). The checkpoints are loaded one after the other, so only one is in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from caspo_jax.errors import UserError
from caspo_jax.evals.generators import encode_local_prompt
from caspo_jax.evals.modes import Prompt
from caspo_jax.hf_checkpoint import load_hf_checkpoint
from caspo_jax.step import build_train_batch, compute_logprobs


@dataclasses.dataclass(frozen=True)
class EncodedResponse:
    """One (prompt, response) pair as token ids: prompt [Lp_b], response [T_b]."""

    prompt: object  # caspo_jax.rollout.RolloutPrompt (ids, pixels, grid)
    response_ids: np.ndarray  # int [T_b]
    tokens: list[str]  # the T_b response token strings


def encode_responses(processor, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[EncodedResponse]:
    """Token ids of every prompt (as generated) and of its response text."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    tokenizer = processor.tokenizer
    out = []
    for prompt, response in zip(prompts, responses):
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        out.append(EncodedResponse(encode_local_prompt(processor, prompt), np.asarray(ids, np.int64),
                                   tokenizer.convert_ids_to_tokens(ids)))
    return out


def score_encoded(model, params, encoded: Sequence[EncodedResponse], *, batch_size: int = 8,
                  length_multiple: int = 64) -> list[np.ndarray]:
    """log pi(a_t | s_t) of every response token under ``params``: float32 [T_b] per pair.

    Batches of ``batch_size`` pairs, prompts left-padded and responses right-padded to a
    multiple of ``length_multiple`` (fewer compilations); empty responses give [0].
    """
    out: list[np.ndarray] = []
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo: lo + batch_size]
        P = len(chunk)
        Lp = max(len(e.prompt.token_ids) for e in chunk)
        T = max(1, max(len(e.response_ids) for e in chunk))
        prompt_ids, prompt_mask = np.zeros((P, Lp), np.int64), np.zeros((P, Lp), np.int64)
        response_ids, response_mask = np.zeros((P, T), np.int64), np.zeros((P, T), np.int64)
        pixels, grids = [], []
        for b, e in enumerate(chunk):
            n = len(e.prompt.token_ids)
            prompt_ids[b, Lp - n:], prompt_mask[b, Lp - n:] = e.prompt.token_ids, 1
            response_ids[b, : len(e.response_ids)], response_mask[b, : len(e.response_ids)] = e.response_ids, 1
            if e.prompt.pixel_values is not None:
                pixels.append(e.prompt.pixel_values)
                grids.append(np.asarray(e.prompt.image_grid_thw).reshape(-1, 3))
        batch = build_train_batch(
            model, prompt_ids, prompt_mask, response_ids, response_mask, np.arange(P),
            pixel_values=np.concatenate(pixels) if pixels else None,
            image_grid_thw=np.concatenate(grids) if grids else None, length_multiple=length_multiple)
        logp_BxT, _ = compute_logprobs(model, params, batch)
        logp_BxT = np.asarray(logp_BxT, np.float32)
        out += [logp_BxT[b, : len(e.response_ids)] for b, e in enumerate(chunk)]
    return out


def score_under_checkpoints(checkpoints: Sequence[str], prompts: Sequence[Prompt], responses: Sequence[str],
                            *, batch_size: int = 8, ignore_custom_code: bool = False, progress: bool = True,
                            ) -> tuple[list[list[str]], list[list[np.ndarray]]]:
    """(response tokens, [log-probs per checkpoint]) of the same responses under each
    checkpoint, loaded one at a time. The checkpoints must share one tokenizer (the
    first one's encodes everything); a different vocabulary is a UserError."""
    encoded, vocab, scores = None, None, []
    for path in checkpoints:
        model, params, processor = load_hf_checkpoint(path, ignore_custom_code=ignore_custom_code,
                                                      progress=progress)
        if encoded is None:
            encoded = encode_responses(processor, prompts, responses)
            vocab = processor.tokenizer.get_vocab()
        elif processor.tokenizer.get_vocab() != vocab:
            raise UserError(f"{path}: its tokenizer differs from {checkpoints[0]}'s; --token-shift compares "
                            "checkpoints of one model family (same tokenizer files)")
        scores.append(score_encoded(model, params, encoded, batch_size=batch_size))
        del model, params
    tokens = [e.tokens for e in encoded or []]
    return tokens, scores
