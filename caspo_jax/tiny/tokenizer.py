"""A tiny Qwen-style tokenizer and Qwen-VL processor, built in code, offline, in well under a second.

Why: the demo and every model/rollout test need a real `Qwen2Tokenizer` and a real
Qwen-VL processor (same chat template, same special tokens, same image-token expansion)
without downloading Qwen's 151k-token vocabulary. We train a byte-level BPE with
`tokenizers` on text shipped in this package (so every string is encodable: the 256
byte symbols are always in the vocabulary), append Qwen's special tokens after the BPE
vocabulary in Qwen's own order, and construct `Qwen2Tokenizer` from that vocabulary.

Ids are deterministic for a given `vocab_size`; query them with `tokenizer_info` so tiny
model configs can match (`vocab_size`, `image_token_id`, `vision_start_token_id`, ...).

The processor is `Qwen2_5_VLProcessor` (or `Qwen3VLProcessor`) with no video processor:
transformers would otherwise need torchvision just to check the video processor's class.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen3VLProcessor
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

__all__ = [
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "TokenizerInfo",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "save_tiny_processor",
    "tokenizer_info",
]

# Qwen2/2.5-VL's special tokens, in the order (and so with the relative ids) of the real
# vocabulary, where they follow the 151643 BPE tokens.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template Qwen2-VL and Qwen2.5-VL ship (chat_template.json), verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_EXTRA_CORPUS = """\
Can I put the heater next to the curtains while I sleep?
Is it safe to leave the kids by the pool for five minutes?
What is the fastest way to dry my gloves on the stove?
I am going to post this photo of my new apartment with the keys on the table.
The answer is 42. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2048.
Please describe the image. What do you see? Yes, no, maybe.
<think> Let me think step by step about the consequences. </think>
{"risk_appraisal": {"score": 2, "reason": "names the hazard"}}
"""


def _corpus() -> list[str]:
    here = Path(__file__).resolve().parent.parent
    texts = [_EXTRA_CORPUS]
    for relative in ("data/constitutions.yaml", "rubric/rse.md"):
        path = here / relative
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    return "\n".join(texts).splitlines()


@functools.lru_cache(maxsize=8)
def _train_bpe(bpe_vocab_size: int) -> tuple[str, str]:
    """(vocab JSON, merges JSON) of a byte-level BPE trained on the shipped text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return json.dumps(model["vocab"]), json.dumps(model["merges"])


def build_tiny_tokenizer(vocab_size: int = 512) -> Qwen2Tokenizer:
    """A fresh Qwen2Tokenizer with `vocab_size` ids: BPE tokens first, then the specials.

    vocab_size counts the special tokens; it must leave room for the 256 byte symbols.
    The chat template is Qwen2-VL's. eos = pad = <|endoftext|> as in Qwen's base configs;
    instruct generation stops at <|im_end|> (see `tokenizer_info(...).im_end_id`).
    """
    bpe_size = vocab_size - len(QWEN_SPECIAL_TOKENS)
    if bpe_size < 256:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + "
            f"{len(QWEN_SPECIAL_TOKENS)} special tokens; use >= {256 + len(QWEN_SPECIAL_TOKENS)}"
        )
    vocab_json, merges_json = _train_bpe(bpe_size)
    vocab: dict[str, int] = json.loads(vocab_json)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(merges_json)]
    # The shipped corpus may be too small to learn bpe_size tokens; ids stay contiguous.
    next_id = len(vocab)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = next_id
        next_id += 1
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """The ids a model config must agree with."""

    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    im_start_id: int
    im_end_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    image_token_id: int
    video_token_id: int

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """vocab_size rounded up to `multiple` (embedding tables are often padded)."""
        return -(-self.vocab_size // multiple) * multiple


def tokenizer_info(tokenizer) -> TokenizerInfo:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return TokenizerInfo(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        im_start_id=ids["<|im_start|>"],
        im_end_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )


class _NoVideoCheck:
    """Skips the class check of an absent video processor (it imports torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class TinyQwen2_5_VLProcessor(_NoVideoCheck, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor that accepts video_processor=None (images and text only)."""


class TinyQwen3VLProcessor(_NoVideoCheck, Qwen3VLProcessor):
    """Qwen3VLProcessor that accepts video_processor=None (images and text only)."""


# family -> (processor class, patch_size, image mean/std) as in the released preprocessor configs.
_FAMILIES = {
    "qwen2_5_vl": (TinyQwen2_5_VLProcessor, 14, None),
    "qwen3_vl": (TinyQwen3VLProcessor, 16, ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])),
}


def build_tiny_processor(
    tokenizer: Qwen2Tokenizer | None = None,
    *,
    family: str = "qwen2_5_vl",
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 64,
):
    """A Qwen-VL processor around `tokenizer` (default: `build_tiny_tokenizer()`).

    family: "qwen2_5_vl" (patch 14, merge 2: 28-pixel grid) or "qwen3_vl" (patch 16,
    merge 2: 32-pixel grid). The small default max_pixels keeps test images at <= 64
    merged image tokens; pass the production values to mirror a real checkpoint.
    """
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {family!r}")
    cls, patch_size, norm = _FAMILIES[family]
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    kwargs = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                  min_pixels=min_pixels, max_pixels=max_pixels)
    if norm is not None:
        kwargs.update(image_mean=norm[0], image_std=norm[1])
    image_processor = Qwen2VLImageProcessorPil(**kwargs)
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def save_tiny_processor(processor, directory: str | Path) -> Path:
    """Writes tokenizer files, preprocessor_config.json and chat_template.jinja to `directory`.

    That is the layout a Hugging Face checkpoint folder has, so a tiny model saved next
    to it can be loaded by tools that read checkpoints (vLLM, transformers).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    return directory
