"""The RL prompt pipeline on grain: records -> padded student/teacher prompt batches.

Once, when the dataset is built (host side, no pixels decoded):
  * image sizes are read from file headers (EXIF orientation applied); unreadable or
    degenerate images drop their record, counted;
  * prompt lengths are computed exactly (template text tokens + image tokens from the
    smart_resize grid) and records whose student or teacher prompt exceeds
    `max_prompt_len` are dropped, counted;
  * more than `max_bad_fraction` bad images fails here, before training starts.
Then, per step: a deterministic per-epoch permutation (seed, epoch), image decoding and
resizing, tokenisation, and left padding to the smallest static bucket that fits, so
jitted steps see a handful of shapes. An image that only fails when fully decoded skips
its record (counted, still bounded by `max_bad_fraction`): nothing crashes mid-epoch on
one bad record.

`PromptIterator.get_state()` / `set_state()` checkpoint the position exactly: a restored
iterator yields exactly the batches the original would have yielded next.

Let B denote the batch size, L the padded prompt length, P vision patches in the batch,
I images in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from caspo_jax.data.constitutions import constitution_for
from caspo_jax.data.images import ImageError, load_image, resize_image, smart_resize
from caspo_jax.data.prompts import (
    PromptConfig,
    build_messages,
    encode_prompt,
    render_prompt,
)
from caspo_jax.data.records import SafetyRecord, too_many_bad
from caspo_jax.errors import UserError

__all__ = [
    "DataError",
    "PipelineConfig",
    "PromptBatch",
    "PromptDataset",
    "PromptIterator",
    "epoch_permutation",
    "image_size",
    "pick_bucket",
    "processor_resize_settings",
]

logger = logging.getLogger(__name__)


class DataError(UserError, RuntimeError):
    """The dataset cannot be used as configured (too many bad images, nothing left, ...)."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """batch_size: prompts per batch (per process when process_count > 1).
    pad_buckets: allowed padded lengths; a batch is padded to the smallest bucket that
      fits its longest prompt (empty: always max_prompt_len).
    num_epochs: None repeats forever.
    max_bad_fraction: fraction of records with bad images tolerated before DataError.
    process_index / process_count: this host's share of every global batch.
    """

    batch_size: int
    max_prompt_len: int = 2048
    pad_buckets: tuple[int, ...] = ()
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    drop_remainder: bool = True
    max_bad_fraction: float = 0.01
    process_index: int = 0
    process_count: int = 1
    prompt: PromptConfig = PromptConfig()

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"PipelineConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_len < 1:
            raise ValueError(f"PipelineConfig.max_prompt_len must be >= 1, got {self.max_prompt_len}")
        if any(b < 1 or b > self.max_prompt_len for b in self.pad_buckets):
            raise ValueError(
                f"PipelineConfig.pad_buckets {self.pad_buckets} must lie in [1, max_prompt_len={self.max_prompt_len}]"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.pad_buckets) | {self.max_prompt_len}))


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """One batch of prompts, left-padded (generation continues at the right edge)."""

    records: tuple[SafetyRecord, ...]
    input_ids: np.ndarray  # int32 [B, L]
    attention_mask: np.ndarray  # int32 [B, L]
    teacher_input_ids: np.ndarray  # int32 [B, Lt]
    teacher_attention_mask: np.ndarray  # int32 [B, Lt]
    pixel_values: np.ndarray  # float32 [P, D], images in batch order
    image_grid_thw: np.ndarray  # int32 [I, 3]
    images: tuple[tuple[Image.Image, ...], ...]  # per prompt, resized RGB (for rollout engines)
    constitutions: tuple[str, ...]


def processor_resize_settings(processor) -> tuple[int, int, int]:
    """(factor, min_pixels, max_pixels) the processor's image processor resizes with."""
    ip = processor.image_processor
    size = ip.size
    get = size.get if isinstance(size, Mapping) else lambda k, d=None: getattr(size, k, d)
    min_pixels = get("shortest_edge") or getattr(ip, "min_pixels", None)
    max_pixels = get("longest_edge") or getattr(ip, "max_pixels", None)
    if min_pixels is None or max_pixels is None:
        raise ValueError("cannot read min/max pixels from the image processor's `size`")
    return ip.patch_size * ip.merge_size, int(min_pixels), int(max_pixels)


def image_size(path) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(0x0112, 1)
            except Exception:  # unreadable EXIF (e.g. truncated file): decoding decides later
                orientation = 1
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except Exception as exc:
        raise ImageError(f"{path}: cannot read image header ({type(exc).__name__}: {exc})") from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if width < 1 or height < 1:
        raise ImageError(f"{path}: empty image {width}x{height}")
    return height, width


@functools.lru_cache(maxsize=64)
def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of records in `epoch`: a function of (n, seed, epoch) only."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


class PromptDataset:
    """Validated, length-filtered prompts; iterate with `iterator()` (or `iter(dataset)`).

    stats: records / bad_images / too_long / kept counts from construction.
    source: what the records came from (e.g. the JSONL path), named by every error.
    """

    def __init__(
        self,
        records: Sequence[SafetyRecord],
        processor,
        constitutions: Mapping[str, str],
        config: PipelineConfig,
        *,
        source: str = "prompt records",
    ):
        self.processor = processor
        self.config = config
        self.source = source
        self.factor, self.min_pixels, self.max_pixels = processor_resize_settings(processor)
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
        candidates: list[tuple[SafetyRecord, str]] = []
        bad: list[str] = []
        student_texts, teacher_texts, extra = [], [], []
        for record in records:
            try:
                sizes = [image_size(path) for path in record.images]
                grids = [smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels) for h, w in sizes]
            except ImageError as exc:
                bad.append(f"record {record.id!r}: {exc}")
                continue
            constitution = constitution_for(record, constitutions)
            student_texts.append(render_prompt(tokenizer, build_messages(record, config=config.prompt)))
            teacher_texts.append(
                render_prompt(tokenizer, build_messages(record, constitution=constitution, config=config.prompt))
            )
            # each "<|image_pad|>" (1 token) becomes h*w/(factor**2) tokens
            extra.append(sum((h // self.factor) * (w // self.factor) for h, w in grids) - len(grids))
            candidates.append((record, constitution))
        self.bad_images = bad  # one message per record dropped here
        self._check_bad_fraction(bad, len(records))
        lengths_s = [len(x) for x in tokenizer(student_texts, add_special_tokens=False)["input_ids"]] if student_texts else []
        lengths_t = [len(x) for x in tokenizer(teacher_texts, add_special_tokens=False)["input_ids"]] if teacher_texts else []
        kept: list[tuple[SafetyRecord, str]] = []
        self.lengths: list[tuple[int, int]] = []
        too_long = 0
        for (record, constitution), ls, lt, e in zip(candidates, lengths_s, lengths_t, extra):
            ls, lt = ls + e, lt + e
            if max(ls, lt) > config.max_prompt_len:
                too_long += 1
                continue
            kept.append((record, constitution))
            self.lengths.append((ls, lt))
        self.examples = kept
        self.stats = {
            "records": len(records),
            "bad_images": len(bad),
            "too_long": too_long,
            "kept": len(kept),
        }
        logger.info(
            "prompt data: %d records, %d dropped for bad images, %d longer than max_prompt_len=%d, %d kept",
            len(records), len(bad), too_long, config.max_prompt_len, len(kept),
        )
        if not kept and too_long:
            shortest = min(max(ls + e, lt + e) for ls, lt, e in zip(lengths_s, lengths_t, extra))
            raise DataError(
                f"{source}: all {too_long} usable prompts are longer than max_prompt_len={config.max_prompt_len} "
                f"tokens (the shortest, with its constitution and image tokens, has {shortest}); raise "
                f"data.max_prompt_len (--set data.max_prompt_len={shortest}) or shorten the prompts"
            )
        if not kept:
            raise DataError(f"{source}: no prompts left after filtering: {self.stats}")
        if config.drop_remainder and len(kept) // config.process_count < config.batch_size:
            raise DataError(
                f"{source}: {len(kept)} usable prompts over {config.process_count} process(es) do not fill one "
                f"batch of {config.batch_size} (algo.prompts_per_step in a run); lower it or add prompts"
            )

    def _check_bad_fraction(self, problems: Sequence[str], total: int) -> None:
        """DataError (one line) when more than max_bad_fraction of the records have bad images;
        else one warning with the count and the first problem."""
        if not problems:
            return
        message = too_many_bad(self.source, list(problems), total, self.config.max_bad_fraction,
                               "records have bad images")
        if message:
            raise DataError(message)
        logger.warning("%s: skipping %d of %d records with bad images; first: %s", self.source, len(problems),
                       total, problems[0])

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> "PromptIterator":
        return self.iterator()

    def iterator(self) -> "PromptIterator":
        return PromptIterator(self)

    # -- per-example work (runs inside the grain pipeline) ------------------------------
    def _load(self, global_index: int, counter: dict) -> dict[str, Any] | None:
        n = len(self.examples)
        epoch, position = divmod(global_index, n)
        index = int(epoch_permutation(n, self.config.seed, epoch, self.config.shuffle)[position])
        record, constitution = self.examples[index]
        if record.id in counter["bad"]:  # failed in an earlier epoch: skipped, counted once
            return None
        try:
            images = [
                resize_image(load_image(path), self.factor, self.min_pixels, self.max_pixels)
                for path in record.images
            ]
        except ImageError as exc:
            counter["bad"][record.id] = f"record {record.id!r}: {exc}"
            self._check_bad_fraction(self.bad_images + list(counter["bad"].values()), self.stats["records"])
            return None
        encoded = encode_prompt(self.processor, record, images, constitution, self.config.prompt)
        return {"record": record, "constitution": constitution, "encoded": encoded}

    def _collate(self, items: Sequence[dict[str, Any]]) -> PromptBatch:
        encoded = [item["encoded"] for item in items]
        student, student_mask = _left_pad([e.input_ids for e in encoded], self.config.buckets, self.pad_id)
        teacher, teacher_mask = _left_pad([e.teacher_input_ids for e in encoded], self.config.buckets, self.pad_id)
        return PromptBatch(
            records=tuple(item["record"] for item in items),
            input_ids=student,
            attention_mask=student_mask,
            teacher_input_ids=teacher,
            teacher_attention_mask=teacher_mask,
            pixel_values=np.concatenate([e.pixel_values for e in encoded], axis=0),
            image_grid_thw=np.concatenate([e.image_grid_thw for e in encoded], axis=0).astype(np.int32),
            images=tuple(e.images for e in encoded),
            constitutions=tuple(item["constitution"] for item in items),
        )


def _left_pad(sequences: Sequence[np.ndarray], buckets: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = pick_bucket(max(len(s) for s in sequences), buckets)
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        ids[row, length - len(sequence):] = sequence
        mask[row, length - len(sequence):] = 1
    return ids, mask


class PromptIterator:
    """Iterator of PromptBatch with exact checkpoint/restore of its position."""

    def __init__(self, dataset: PromptDataset):
        self.dataset = dataset
        config = dataset.config
        self._counter = {"bad": {}}  # record id -> its decoding error
        n = len(dataset)
        # global position g = epoch * n + position; the record is epoch_permutation(...)[position]
        source = grain.MapDataset.range(n)
        if config.num_epochs is None or config.num_epochs > 1:
            source = source.repeat(config.num_epochs)
        source = source.map_with_index(lambda g, _: g)
        if config.process_count > 1:
            source = source[config.process_index::config.process_count]
        pipeline = (
            source.map(lambda i: dataset._load(int(i), self._counter))
            .to_iter_dataset()
            .filter(lambda item: item is not None)
            .batch(config.batch_size, drop_remainder=config.drop_remainder, batch_fn=dataset._collate)
        )
        self._iterator = iter(pipeline)

    def __iter__(self) -> "PromptIterator":
        return self

    def __next__(self) -> PromptBatch:
        return next(self._iterator)

    @property
    def bad_images_seen(self) -> int:
        """Records skipped during iteration because an image failed to decode (each once,
        however many epochs meet it)."""
        return len(self._counter["bad"])

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable position (store it with the training checkpoint)."""
        return {"grain": self._iterator.get_state(), "bad_images": dict(self._counter["bad"])}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._iterator.set_state(state["grain"])
        bad = state.get("bad_images", {})  # an int in checkpoints older than the per-record map
        self._counter["bad"] = dict(bad) if isinstance(bad, Mapping) else {}
