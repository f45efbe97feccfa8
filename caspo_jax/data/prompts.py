"""Turning a SafetyRecord into model inputs, with and without its constitution.

CASPO scores the same response under two prompts: the student prompt (what the policy
sees at deployment) and the teacher prompt (the same conversation plus the category's
safety constitution). They must differ in the constitution only, so both come from one
`build_messages` call. Placement is configurable: the system turn (default) or a prefix
of the user's text.

Image tokens: the chat template writes one `<|image_pad|>` per image; the processor
expands it to (t * h * w) / merge_size**2 copies from the image grid. `expand_image_tokens`
does the same so the text tokenizer alone yields the processor's input_ids (tested equal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image

from caspo_jax.data.records import SafetyRecord
from caspo_jax.errors import UserError

__all__ = [
    "ChatTemplateError",
    "EncodedExchange",
    "EncodedPrompt",
    "PromptConfig",
    "build_messages",
    "encode_exchange",
    "encode_prompt",
    "expand_image_tokens",
    "image_token_counts",
    "render_prompt",
]

IMAGE_TOKEN = "<|image_pad|>"


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How a record becomes a conversation.

    system_prompt: the system turn of both prompts (None: no system turn, so the Qwen2-VL
      template inserts its default "You are a helpful assistant." when there is nothing
      else to put there).
    constitution_placement: "system" (appended to the system turn, default) or "user"
      (before the user's text).
    query_field: "query" (Standard mode) or "malicious_query" (Malicious mode).
    """

    system_prompt: str | None = "You are a helpful assistant."
    constitution_placement: str = "system"
    query_field: str = "query"

    def __post_init__(self):
        if self.constitution_placement not in ("system", "user"):
            raise ValueError(
                f"PromptConfig.constitution_placement must be 'system' or 'user', "
                f"got {self.constitution_placement!r}"
            )
        if self.query_field not in ("query", "malicious_query"):
            raise ValueError(f"PromptConfig.query_field must be 'query' or 'malicious_query', got {self.query_field!r}")


def build_messages(
    record: SafetyRecord, *, constitution: str | None = None, config: PromptConfig = PromptConfig()
) -> list[dict[str, Any]]:
    """The chat messages of the student prompt (constitution=None) or the teacher prompt."""
    query = getattr(record, config.query_field)
    if not query:
        raise ValueError(f"record {record.id!r} has no {config.query_field!r} (needed by PromptConfig.query_field)")
    system = config.system_prompt
    text = query
    if constitution:
        if config.constitution_placement == "system":
            system = f"{system}\n\n{constitution}" if system else constitution
        else:
            text = f"{constitution}\n\n{query}"
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    content = [{"type": "image"} for _ in record.images] + [{"type": "text", "text": text}]
    messages.append({"role": "user", "content": content})
    return messages


class ChatTemplateError(UserError):
    """A checkpoint's chat template that cannot render (blocked by transformers' jinja
    sandbox, a syntax error, or a raise_exception); the message names the file and the fix."""


def render_prompt(tokenizer, messages: Sequence[dict[str, Any]]) -> str:
    """The chat-template text of a generation prompt (ends with the assistant header)."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:  # SecurityError: the sandbox refused an operation
        raise ChatTemplateError(
            f"{_template_file(tokenizer)}: the chat template cannot render a prompt "
            f"({type(exc).__name__}: {exc}); fix that template (transformers renders it in a jinja "
            "sandbox that forbids e.g. list.append and attributes starting with '_'), or replace it "
            "with the base model's chat_template.jinja"
        ) from None


def _template_file(tokenizer) -> str:
    """Where the tokenizer's chat template came from, as best known (for error messages)."""
    directory = Path(getattr(tokenizer, "name_or_path", "") or ".")
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (directory / name).is_file():
            return str(directory / name)
    return f"the chat template of the tokenizer in {directory}"


def image_token_counts(image_grid_thw: np.ndarray, merge_size: int) -> list[int]:
    """Placeholder tokens per image: t * h * w / merge_size**2 for each row of the grid."""
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    return [int(t * h * w) // (merge_size**2) for t, h, w in grid]


def expand_image_tokens(text: str, counts: Sequence[int], image_token: str = IMAGE_TOKEN) -> str:
    """Replaces the i-th `image_token` with counts[i] copies, as the processor does."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"prompt has {len(pieces) - 1} image placeholders but {len(counts)} images")
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out.append(image_token * count)
        out.append(piece)
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One record's model inputs. I images, P vision patches, D = 3 * t * patch**2."""

    input_ids: np.ndarray  # int32 [L], student prompt
    teacher_input_ids: np.ndarray  # int32 [Lt], with the constitution
    pixel_values: np.ndarray  # float32 [P, D]
    image_grid_thw: np.ndarray  # int32 [I, 3]
    images: tuple[Image.Image, ...]  # RGB, already at the processor's size


def encode_prompt(
    processor,
    record: SafetyRecord,
    images: Sequence[Image.Image],
    constitution: str,
    config: PromptConfig = PromptConfig(),
) -> EncodedPrompt:
    """Tokenises both prompts and runs the image processor once for the shared images."""
    tokenizer = processor.tokenizer
    student = render_prompt(tokenizer, build_messages(record, config=config))
    teacher = render_prompt(tokenizer, build_messages(record, constitution=constitution, config=config))
    if images:
        vision = processor.image_processor(images=list(images), return_tensors="np")
        pixel_values = np.asarray(vision["pixel_values"], dtype=np.float32)
        grid = np.asarray(vision["image_grid_thw"], dtype=np.int32).reshape(-1, 3)
        counts = image_token_counts(grid, processor.image_processor.merge_size)
        student, teacher = expand_image_tokens(student, counts), expand_image_tokens(teacher, counts)
    else:
        pixel_values = np.zeros((0, _patch_dim(processor)), np.float32)
        grid = np.zeros((0, 3), np.int32)
    ids = tokenizer([student, teacher], add_special_tokens=False)["input_ids"]
    return EncodedPrompt(
        input_ids=np.asarray(ids[0], np.int32),
        teacher_input_ids=np.asarray(ids[1], np.int32),
        pixel_values=pixel_values,
        image_grid_thw=grid,
        images=tuple(images),
    )


def _patch_dim(processor) -> int:
    ip = processor.image_processor
    return 3 * ip.temporal_patch_size * ip.patch_size**2


@dataclasses.dataclass(frozen=True)
class EncodedExchange:
    """A prompt followed by one response, for SFT and reward-model training.

    input_ids [L] = prompt ids + response ids + "<|im_end|>\\n"; loss_mask [L] is 1 on the
    response and its <|im_end|> (what the model must produce), 0 elsewhere.
    """

    input_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # int32 [L]
    prompt_length: int
    pixel_values: np.ndarray  # float32 [P, D]
    image_grid_thw: np.ndarray  # int32 [I, 3]


def encode_exchange(
    processor,
    record: SafetyRecord,
    images: Sequence[Image.Image],
    response: str,
    *,
    constitution: str | None = None,
    config: PromptConfig = PromptConfig(),
) -> EncodedExchange:
    """Tokenises prompt and response separately (as in RL, where the response ids are
    sampled) and joins them; equal to tokenising the whole chat-template conversation
    (tested). `constitution` gives the teacher view of the same exchange."""
    encoded = encode_prompt(processor, record, images, constitution or "", config)
    prompt_ids = encoded.teacher_input_ids if constitution else encoded.input_ids
    tokenizer = processor.tokenizer
    response_ids = tokenizer(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
    trailer = tokenizer("\n", add_special_tokens=False)["input_ids"]
    input_ids = np.concatenate([prompt_ids, np.asarray(response_ids + trailer, np.int32)])
    loss_mask = np.zeros(len(input_ids), np.int32)
    loss_mask[len(prompt_ids): len(prompt_ids) + len(response_ids)] = 1
    return EncodedExchange(input_ids.astype(np.int32), loss_mask, len(prompt_ids),
                           encoded.pixel_values, encoded.image_grid_thw)
