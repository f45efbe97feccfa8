"""A Flax reward model: the Qwen-VL backbone plus a scalar head on the last response token.

Let B be rows (one prompt + one response each), Lp the padded prompt length, T the padded
response length, L = Lp + T, D the text width.

Rows use the policy step's layout (`caspo_jax.step.batch`): ``[left-padded prompt |
right-padded response]``, so the last response token of row b sits at column
``Lp + n_b - 1`` (n_b = its response length) and the head reads the final-normed hidden
state there: r_b = h[b, Lp + n_b - 1] . w + c. The response ends with ``<|im_end|>``
(the tokens the policy emits to stop), so the reward sees a finished answer. Attention is
causal and padding is masked, so nothing after that token changes the reward (tested).

Checkpoint layout (what `RewardModel.save` writes and `RewardModel.load` reads)::

    RM_DIR/config.json, model.safetensors, tokenizer + preprocessor files   # the backbone, an HF
                                                                             # directory (save_pretrained)
    RM_DIR/reward_head.safetensors   # "weight" float32 [D], "bias" float32 [1]

In memory the RM's weights are the backbone's typed weights with one more field,
``reward_head`` (a ``RewardHead``): ``with_head(backbone, head)``, so
``model.hidden_states`` reads them as it reads the backbone's, and an orbax run
checkpoint of the RM holds ``text``, ``vision`` and ``reward_head`` as before.

The backbone directory is an ordinary Qwen-VL checkpoint (its unused LM head included),
loaded with the same `load_pretrained` users run on real checkpoints.

Reward scale: trained with `caspo rm`, whose MSE targets are the RSE totals divided by 6
(`rse_to_reward`'s [0, 1] scale), so the RM's rewards are comparable to the judge's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from caspo_jax.data.images import load_image, resize_image
from caspo_jax.data.pipeline import processor_resize_settings
from caspo_jax.data.prompts import encode_prompt
from caspo_jax.data.records import SafetyRecord
from caspo_jax.errors import UserError
from caspo_jax.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from caspo_jax.models.common import weights
from caspo_jax.rewards.base import RewardBatch, prompt_fields
from caspo_jax.step import build_train_batch
from caspo_jax.step.logprobs import cast_floats, encode_batch_images

__all__ = [
    "HEAD_FILE",
    "RMExample",
    "RewardConfigError",
    "RewardHead",
    "RewardModel",
    "RewardModelNotFound",
    "build_reward_model",
    "encode_rm_example",
    "head_rewards",
    "init_head",
    "last_token_index",
    "load_head",
    "missing_reward_model_message",
    "rm_rows",
    "save_head",
    "sequence_rewards",
    "with_head",
    "without_head",
]

HEAD_FILE = "reward_head.safetensors"
HEAD_KEY = "reward_head"


# --------------------------------------------------------------------------- maths


@flax.struct.dataclass
class RewardHead:
    """The scalar head: r = h . kernel + bias (kernel [D], bias []; fields sorted as the
    dict they replace, so leaves flatten in the same order)."""

    bias: jax.Array
    kernel: jax.Array


def with_head(backbone, head: RewardHead):
    """The RM's weights: the backbone's typed weights plus the field ``reward_head``."""
    return weights.with_fields(backbone, **{HEAD_KEY: head})


def without_head(params):
    """The backbone's typed weights of the RM's (the inverse of ``with_head``)."""
    return weights.without_fields(params, HEAD_KEY)


def init_head(hidden_size: int, seed: int = 0) -> RewardHead:
    """kernel [D] ~ N(0, 1/D), bias [] = 0, float32."""
    kernel = jax.random.normal(jax.random.PRNGKey(seed), (hidden_size,), jnp.float32) / np.sqrt(hidden_size)
    return RewardHead(kernel=kernel, bias=jnp.zeros((), jnp.float32))


def last_token_index(response_mask_BxT, prompt_len: int):
    """[B] column of each row's last response token: Lp + n_b - 1 (Lp - 1 for an empty response)."""
    n_B = jnp.sum((response_mask_BxT > 0).astype(jnp.int32), axis=1)
    return prompt_len + n_B - 1


def head_rewards(head: RewardHead, h_BxLxD, index_B):
    """r_B = h[b, index_b] . kernel + bias, in float32."""
    h_BxD = jnp.take_along_axis(h_BxLxD, index_B[:, None, None], axis=1)[:, 0]
    return h_BxD.astype(jnp.float32) @ head.kernel.astype(jnp.float32) + head.bias.astype(jnp.float32)


def sequence_rewards(model, params, batch, compute_dtype=None):
    """r_B (float32) of a `TrainBatch`'s student layout; traceable. ``params``: the RM's
    weights (``with_head``)."""
    head = params.reward_head
    p = cast_floats(params, compute_dtype)
    embeds = encode_batch_images(model, p, batch)
    seq = batch.student
    # image_slot (host-computed) picks each placeholder's feature row: no prefix sum over
    # the batch, so a batch-sharded mesh needs no cross-row collective
    h = model.hidden_states(p, seq.input_ids, seq.attention_mask, position_ids=seq.position_ids,
                            image_embeds=embeds, image_slot=None if embeds is None else seq.image_slot)
    return head_rewards(head, h, last_token_index(batch.response_mask, seq.prompt_len))


@functools.partial(jax.jit, static_argnames=("model",))
def _score_jit(model, params, batch):
    return sequence_rewards(model, params, batch)


# --------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True)
class RMExample:
    """One prompt as ids and its responses (each ending with <|im_end|>); images in processor form."""

    prompt_ids: np.ndarray  # int32 [Lp]
    responses: tuple[np.ndarray, ...]  # int32 [n] each
    pixel_values: np.ndarray  # float32 [P, C]
    image_grid_thw: np.ndarray  # int32 [I, 3]


def encode_rm_example(processor, query: str, images: Sequence[Any], responses: Sequence[str], *,
                      max_response_len: int | None = None) -> RMExample:
    """The deployment prompt (no constitution, the default system turn) and the responses,
    tokenised exactly as `caspo sft`/`caspo dpo` tokenise exchanges."""
    factor, min_pixels, max_pixels = processor_resize_settings(processor)
    pil = [resize_image(load_image(p), factor, min_pixels, max_pixels) for p in images]
    record = SafetyRecord(id="rm", images=tuple(images), query=query, category="violent")  # category unused
    encoded = encode_prompt(processor, record, pil, "")
    out = []
    for text in responses:
        ids = processor.tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        out.append(np.asarray(ids[:max_response_len] if max_response_len else ids, np.int32))
    return RMExample(encoded.input_ids, tuple(out), encoded.pixel_values, encoded.image_grid_thw)


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def rm_rows(model, rows: Sequence[tuple[RMExample, int]], pad_id: int, prompt_len: int, response_len: int):
    """A `TrainBatch` of rows (example, which response); an index of -1 gives an empty
    response (a padding row, masked). Examples shared by rows are encoded once."""
    prompts: list[RMExample] = []
    where: dict[int, int] = {}
    prompt_index = []
    for ex, _ in rows:
        if id(ex) not in where:
            where[id(ex)] = len(prompts)
            prompts.append(ex)
        prompt_index.append(where[id(ex)])
    P, B = len(prompts), len(rows)
    prompt_ids = np.full((P, prompt_len), pad_id, np.int32)
    prompt_mask = np.zeros((P, prompt_len), np.int32)
    for p, ex in enumerate(prompts):
        if len(ex.prompt_ids) > prompt_len:
            raise ValueError(f"rm_rows: a prompt of {len(ex.prompt_ids)} tokens exceeds prompt_len={prompt_len}")
        prompt_ids[p, prompt_len - len(ex.prompt_ids):] = ex.prompt_ids
        prompt_mask[p, prompt_len - len(ex.prompt_ids):] = 1
    response_ids = np.zeros((B, response_len), np.int32)
    response_mask = np.zeros((B, response_len), np.float32)
    for b, (ex, r) in enumerate(rows):
        if r >= 0:
            ids = ex.responses[r][:response_len]
            response_ids[b, :len(ids)] = ids
            response_mask[b, :len(ids)] = 1
    grids = [g for ex in prompts for g in np.asarray(ex.image_grid_thw).reshape(-1, 3).tolist()]
    pixels = np.concatenate([ex.pixel_values for ex in prompts]) if grids else None
    return build_train_batch(model, prompt_ids, prompt_mask, response_ids, response_mask, np.asarray(prompt_index),
                             pixel_values=pixels, image_grid_thw=np.asarray(grids) if grids else None)


# --------------------------------------------------------------------------- checkpoint


def save_head(head: RewardHead, path: str | Path) -> Path:
    path = Path(path)
    save_file({"weight": np.asarray(head.kernel, np.float32),
               "bias": np.asarray(head.bias, np.float32).reshape(1)}, str(path))
    return path


def load_head(path: str | Path, hidden_size: int) -> RewardHead:
    """The head of RM_DIR/reward_head.safetensors, checked against the backbone's width."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a reward-model directory holds the backbone (HF files) and "
                                f"{HEAD_FILE}; train one with `caspo rm`")
    tensors = load_file(str(path))
    missing = {"weight", "bias"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {sorted(missing)}; expected 'weight' [D] and 'bias' [1]")
    if tensors["weight"].shape != (hidden_size,) or tensors["bias"].size != 1:
        raise ValueError(f"{path}: weight {tensors['weight'].shape} / bias {tensors['bias'].shape} do not fit the "
                         f"backbone's hidden size {hidden_size}; expected [{hidden_size}] and [1]")
    return RewardHead(kernel=jnp.asarray(tensors["weight"], jnp.float32),
                      bias=jnp.asarray(tensors["bias"].reshape(()), jnp.float32))


# --------------------------------------------------------------------------- the reward


class RewardModel:
    """`score(prompts, responses) -> RewardBatch` from a Flax backbone + scalar head.

    params: the RM's weights, the backbone's with the head as ``params.reward_head`` (``with_head``).
    Rows are scored ``batch_size`` at a time, padded to multiples of ``pad_multiple`` tokens
    so few shapes compile. An item whose prompt cannot be encoded (missing image, too long)
    fails alone (NaN, ok=False, the reason in `errors`).
    """

    def __init__(self, model, params, processor, pad_id: int, *, batch_size: int = 8,
                 name: str = "reward_model", max_prompt_len: int = 4096, max_response_len: int = 2048,
                 pad_multiple: int = 64, progress: bool = False):
        if not isinstance(getattr(params, HEAD_KEY, None), RewardHead):
            raise ValueError(f"RewardModel: params has no {HEAD_KEY!r} field; add one with "
                             "with_head(params, init_head(D))")
        self.model, self.params, self.processor, self.pad_id = model, params, processor, int(pad_id)
        self.batch_size, self.name, self.pad_multiple, self.progress = batch_size, name, pad_multiple, progress
        self.max_prompt_len, self.max_response_len = max_prompt_len, max_response_len

    def __repr__(self) -> str:
        return f"RewardModel(name={self.name!r}, batch_size={self.batch_size})"

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> RewardBatch:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        # An RL step scores G responses per prompt object: its images and tokens are encoded
        # once, and its rows share that encoding (and one pass of the vision tower per batch).
        members: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            members.setdefault(id(prompt), []).append(i)
        rows: list[tuple[RMExample, int] | None] = [None] * len(responses)
        errors: list[str | None] = [None] * len(responses)
        for items in members.values():
            try:
                fields = prompt_fields(prompts[items[0]])
                ex = encode_rm_example(self.processor, fields.query, fields.images, [responses[i] for i in items],
                                       max_response_len=self.max_response_len)
                if len(ex.prompt_ids) > self.max_prompt_len:
                    raise ValueError(f"prompt of {len(ex.prompt_ids)} tokens exceeds max_prompt_len="
                                     f"{self.max_prompt_len}")
                for k, i in enumerate(items):
                    rows[i] = (ex, k)
            except Exception as exc:  # one bad prompt fails its items alone
                for i in items:
                    errors[i] = f"{self.name}: {type(exc).__name__}: {exc}"
        values = [None] * len(responses)
        good = [i for i, row in enumerate(rows) if row is not None]
        chunks = range(0, len(good), self.batch_size)
        if self.progress:
            chunks = tqdm(chunks, desc=self.name, unit="batch")
        for start in chunks:
            idx = good[start:start + self.batch_size]
            for i, r in zip(idx, self.rewards([rows[i] for i in idx])):
                if np.isfinite(r):
                    values[i] = float(r)
                else:
                    errors[i] = f"{self.name}: non-finite reward {r}"
        return RewardBatch.from_items(values, errors)

    def rewards(self, rows: Sequence[tuple[RMExample, int]]) -> np.ndarray:
        """r [len(rows)] float32 of each (example, response index) row (one jitted call)."""
        n = len(rows)
        padded = list(rows) + [(rows[0][0], -1)] * max(self.batch_size - n, 0)
        prompt_len = _round_up(max(len(ex.prompt_ids) for ex, _ in rows), self.pad_multiple)
        response_len = _round_up(max(len(ex.responses[k]) for ex, k in rows), self.pad_multiple)
        batch = rm_rows(self.model, padded, self.pad_id, prompt_len, response_len)
        return np.asarray(_score_jit(self.model, self.params, batch))[:n]

    def save(self, directory: str | Path) -> Path:
        """RM_DIR: the backbone as an HF directory (+ tokenizer files) and reward_head.safetensors."""
        directory = Path(directory)
        save_hf_checkpoint(self.model, without_head(self.params), self.processor, directory)
        save_head(self.params.reward_head, directory / HEAD_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, dtype=jnp.float32, **options) -> "RewardModel":
        """Backbone and processor with `caspo_jax.hf_checkpoint.load_hf_checkpoint`, then the head."""
        directory = Path(directory)
        if not (directory / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{directory / HEAD_FILE} not found: {directory} is not a reward-model "
                                    f"directory (train one with `caspo rm`, or save with RewardModel.save)")
        model, params, processor = load_hf_checkpoint(directory, dtype=dtype)
        params = with_head(params, load_head(directory / HEAD_FILE, params.text.embed.shape[1]))
        pad_id = processor.tokenizer.pad_token_id
        return cls(model, params, processor, 0 if pad_id is None else pad_id, **options)


class RewardConfigError(UserError, ValueError):
    """A reward_model spec that cannot be built (missing or unknown field)."""


class RewardModelNotFound(UserError, FileNotFoundError):
    """reward.path names no reward-model directory; the message says how to make or name one."""


def missing_reward_model_message(path: str | Path) -> str:
    """Why `path` is not a reward model, and the two fixes: train one, or point at yours."""
    path = Path(path)
    why = "does not exist" if not path.exists() else f"has no {HEAD_FILE}"
    return (f"reward.path={str(path)!r} {why}: the outcome reward (Algorithm 1 line 5) is the reward model "
            f"that `caspo rm --out DIR ...` trains and exports to DIR/export (the paper presets read "
            f"runs/rm/export). Train it first, or name your export with --set reward.path=/path/to/rm/export "
            f"(a directory holding the backbone's HF files and {HEAD_FILE})")


def build_reward_model(fields: dict[str, Any]) -> RewardModel:
    """`build_reward({"kind": "reward_model", "path": RM_DIR, "batch_size": 8, "name": ...})`.

    RM_DIR is what `caspo rm --out DIR` exports (DIR/export); a missing one raises
    `RewardModelNotFound` (a UserError) naming `caspo rm` and `--set reward.path=`.
    """
    fields = dict(fields)
    path = fields.pop("path", None)
    if not isinstance(path, str):
        raise RewardConfigError(f"reward_model reward needs path=<reward-model directory> "
                                f"(the export of `caspo rm`), got {path!r}; set reward.path")
    allowed = {"batch_size", "name", "max_prompt_len", "max_response_len", "pad_multiple", "progress"}
    unknown = sorted(set(fields) - allowed - {"dtype"})
    if unknown:
        raise RewardConfigError(f"unknown reward_model fields {unknown}; allowed: path, dtype, {sorted(allowed)}")
    dtype_name = fields.pop("dtype", "float32")
    if dtype_name not in ("float32", "bfloat16"):
        raise RewardConfigError(f"reward.dtype={dtype_name!r}: use 'float32' or 'bfloat16'")
    if not (Path(path) / HEAD_FILE).is_file():
        raise RewardModelNotFound(missing_reward_model_message(path))
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    return RewardModel.load(path, dtype=dtype, **fields)
