"""The rollout interface shared by every engine: prompts in, ``Rollouts`` out.

Let P denote prompts, n samples per prompt, S = P * n samples, T the longest response.
Samples are ordered prompt-major: sample ``s`` belongs to prompt ``s // n``
(``Rollouts.prompt_index`` says so explicitly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How responses are drawn (hashable: the JAX sampler compiles one loop per distinct value).

    temperature: 0 means greedy (argmax). top_k: 0 turns it off. top_p: 1.0 turns it off.
    max_new_tokens: response length cap (finish reason "length").
    stop_token_ids: extra tokens that end a response (finish reason "stop"); the engine's
        end-of-sequence ids end it with "eos". Either terminating token is kept in the
        response (mask 1) so the policy learns to stop.
    seed: base seed; prompt ``p`` uses ``RolloutPrompt.seed`` if set, else ``seed + p``.

    Log-probs are those of the tempered distribution without top-k/top-p,
    ``log_softmax(logits / logit_temperature)``: what the trainer recomputes for the
    ratio, the KL and the token rewards (verl divides by the rollout temperature too).
    Greedy (temperature 0) has no tempered distribution: its log-probs are at temperature 1.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k={self.top_k}: must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens}: must be >= 1")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logit_temperature(self) -> float:
        """What the logits are divided by for the draw and the returned log-probs."""
        return logit_temperature(self.temperature)


def logit_temperature(temperature: float) -> float:
    """The divisor of the logits that a rollout at ``temperature`` implies: the temperature
    itself, or 1.0 for greedy decoding (0), whose log-probs are the model's own
    distribution's (a division by 0 has no meaning; the trainer uses the same rule)."""
    return float(temperature) if temperature > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class RolloutPrompt:
    """One prompt as the processor returns it (already image-token expanded).

    token_ids: int [L]. pixel_values: float32 [patches, C*T*p*p] for the JAX sampler,
    image_grid_thw: int [images, 3]; images: the same images as RGB PIL images already
    resized with the shared min/max-pixel setting (``caspo_jax.data.images.resize_image``),
    for engines that run their own processor (vLLM) so both see the same grid.
    seed: this prompt's seed (None: ``SamplingParams.seed + prompt index``).
    """

    token_ids: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    images: tuple = ()
    seed: int | None = None

    def __post_init__(self):
        ids = np.asarray(self.token_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"RolloutPrompt.token_ids: expected a non-empty 1-D sequence, got shape {ids.shape}")
        object.__setattr__(self, "token_ids", ids.astype(np.int32))
        grid = self.image_grid_thw
        if grid is not None and np.asarray(grid).size == 0:
            grid = None
        if grid is not None:
            object.__setattr__(self, "image_grid_thw", np.asarray(grid, np.int64).reshape(-1, 3))
        else:
            object.__setattr__(self, "image_grid_thw", None)
            object.__setattr__(self, "pixel_values", None)

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else len(self.image_grid_thw)

    @classmethod
    def from_encoded(cls, encoded, seed: int | None = None) -> "RolloutPrompt":
        """From ``caspo_jax.data.prompts.EncodedPrompt`` (the student prompt)."""
        return cls(encoded.input_ids, encoded.pixel_values, encoded.image_grid_thw, tuple(encoded.images), seed)


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """S = P * n sampled responses, right-padded to T.

    tokens: int32 [S, T] (0 after the end). logprobs: float32 [S, T] sampled-token
    log-probs of softmax(logits / logit_temperature), unfiltered (0 after the end). mask: bool [S, T], True
    on response tokens (the terminating eos/stop token included). finish_reason: [S] of
    "eos" / "stop" / "length". prompt_index: int32 [S]. version: the weight version that
    produced every sample (one version per request: an engine never mixes two; see
    ``RolloutEngine``).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray
    finish_reason: np.ndarray
    prompt_index: np.ndarray
    version: int = 0

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(axis=1).astype(np.int32)

    def response(self, s: int) -> np.ndarray:
        """Sample ``s``'s token ids without padding."""
        return self.tokens[s, : self.lengths[s]]

    def __len__(self) -> int:
        return len(self.tokens)


class RolloutEngine(Protocol):
    """What the trainer needs from any engine (JAX sampler, vLLM, remote workers).

    Weight versions: ``sync_weights(params, version)`` installs version ``version`` (None:
    the engine's current version + 1) and ``engine.version`` reports the installed one. A
    ``generate`` call is served by one version from start to end, and its ``Rollouts.version``
    says which: a push that arrives while it runs either waits for it (vLLM, remote workers)
    or applies to the next call (the JAX sampler, which reads its weights once per call).
    """

    version: int

    def generate(self, prompts: Sequence[RolloutPrompt], *, n: int, sampling: SamplingParams) -> Rollouts: ...

    def sync_weights(self, params, version: int | None = None) -> None: ...


def prompt_arrays(prompts: Sequence[RolloutPrompt], length: int | None = None):
    """Left-padded ids and mask [P, L] (int32), all images' pixel values in prompt order and
    their grids [I, 3] (None without images): the layout ``caspo_jax.step.build_train_batch``
    takes together with ``Rollouts.tokens / mask / prompt_index``."""
    L = max(len(p.token_ids) for p in prompts) if length is None else length
    ids = np.zeros((len(prompts), L), np.int32)
    mask = np.zeros((len(prompts), L), np.int32)
    for i, p in enumerate(prompts):
        if len(p.token_ids) > L:
            raise ValueError(f"prompt {i} has {len(p.token_ids)} tokens, more than length={L}")
        ids[i, L - len(p.token_ids):] = p.token_ids
        mask[i, L - len(p.token_ids):] = 1
    with_images = [p for p in prompts if p.image_grid_thw is not None]
    for i, p in enumerate(prompts):
        if p.image_grid_thw is not None and p.pixel_values is None:
            raise ValueError(f"prompt {i}: image_grid_thw given without pixel_values")
    if not with_images:
        return ids, mask, None, None
    pixels = np.concatenate([np.asarray(p.pixel_values, np.float32) for p in with_images])
    grids = np.concatenate([p.image_grid_thw for p in with_images]).astype(np.int64)
    return ids, mask, pixels, grids


def finish_reasons(last_tokens: np.ndarray, lengths: np.ndarray, ended: np.ndarray, eos_ids: Sequence[int]
                   ) -> np.ndarray:
    """Finish reason per sample from its last token and whether it ended on a terminator."""
    eos = set(int(t) for t in eos_ids)
    out = np.empty(len(lengths), dtype=object)
    for s, (tok, done) in enumerate(zip(last_tokens, ended)):
        out[s] = FINISH_LENGTH if not done else (FINISH_EOS if int(tok) in eos else FINISH_STOP)
    return out.astype(str)
