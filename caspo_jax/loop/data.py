"""The trainer's data: where the files are, and exchanges (prompt + response) as TrainBatches.

With no data files and the built-in tiny model, the demo task is generated into
run_dir/data (deterministic in data.seed), so `caspo train --preset tiny-cpu` needs
nothing but the package. Exchanges (SFT examples, preference pairs) are small enough
to encode once and keep in memory; every batch is padded to the dataset's longest
prompt and response so one compiled step serves the whole stage.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from caspo_jax.data.constitutions import constitution_for, load_constitutions
from caspo_jax.data.formats import load_pairs, load_sft_examples
from caspo_jax.data.images import ImageError, load_image, resize_image
from caspo_jax.data.pipeline import DataError, PipelineConfig, PromptDataset, processor_resize_settings
from caspo_jax.data.prompts import PromptConfig, encode_prompt
from caspo_jax.data.records import SafetyRecord, load_records, too_many_bad
from caspo_jax.demo.task import make_split, write_split
from caspo_jax.loop.config import ConfigError, TrainConfig
from caspo_jax.step import build_train_batch

__all__ = ["DataFiles", "EncodedExchange", "encode_exchanges", "exchange_batch", "prepare_data", "prompt_dataset"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataFiles:
    train: Path | None
    eval: Path | None
    sft: Path | None
    pairs: Path | None
    constitutions: Path | None
    demo: bool


def with_data_files(cfg: TrainConfig, files: DataFiles) -> TrainConfig:
    """``cfg`` with its data paths pinned to ``files`` (e.g. the generated demo task), so
    later stages read the same files; paths a run does not have stay unset."""
    paths = {k: str(getattr(files, k)) for k in ("train", "eval", "sft", "pairs", "constitutions")
             if getattr(files, k) is not None}
    return cfg.replace(data=dataclasses.replace(cfg.data, **paths))


def prepare_data(cfg: TrainConfig, run_dir: str | Path) -> DataFiles:
    """Configured files, or (no data file set) the demo task generated under run_dir/data."""
    d = cfg.data
    demo = d.train is None and d.sft is None and d.pairs is None
    if demo:
        directory = Path(run_dir) / "data"
        train = write_split(make_split(d.demo_train, d.seed, "train"), directory, "train", start=d.demo_start,
                            teacher=d.demo_teacher)
        evals = write_split(make_split(d.demo_eval, d.seed + 1, "eval"), directory, "eval")
        return DataFiles(train["records"], evals["records"], train["sft"], train["pairs"],
                         train["constitutions"], True)
    for field in ("train", "eval", "sft", "pairs", "constitutions"):
        value = getattr(d, field)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"data.{field}={value!r}: file not found (relative paths start at {Path.cwd()}); "
                              f"fix the path with --set data.{field}=PATH")
    as_path = lambda v: None if v is None else Path(v)  # noqa: E731
    return DataFiles(as_path(d.train), as_path(d.eval), as_path(d.sft), as_path(d.pairs),
                     as_path(d.constitutions), False)


def prompt_dataset(cfg: TrainConfig, files: DataFiles, processor, *, split: str = "train",
                   batch_size: int | None = None, num_epochs: int | None = None, shuffle: bool = True,
                   shard: dict[str, int] | None = None) -> tuple[PromptDataset, dict[str, str]]:
    """The prompts of `split`. shard: `caspo_jax.distributed.pipeline_shard()`, i.e.
    this process's process_index / process_count; batch_size is then per process."""
    path = files.train if split == "train" else files.eval
    if path is None:
        raise ConfigError(f"data.{split} is not set: the {split} prompts (safety-record JSONL) are needed; "
                          f"set it with --set data.{split}=PATH")
    records = load_records(path, max_bad_fraction=cfg.data.max_bad_fraction)
    constitutions = load_constitutions(files.constitutions)
    buckets = tuple(b for b in (64, 128, 256, 512, 1024, 2048, 4096) if b < cfg.data.max_prompt_len)
    pipeline = PipelineConfig(batch_size=batch_size or cfg.algo.prompts_per_step,
                              max_prompt_len=cfg.data.max_prompt_len, pad_buckets=buckets, seed=cfg.data.seed,
                              shuffle=shuffle,
                              num_epochs=num_epochs, drop_remainder=split == "train", prompt=PromptConfig(),
                              max_bad_fraction=cfg.data.max_bad_fraction, **(shard or {}))
    return PromptDataset(records, processor, constitutions, pipeline, source=str(path)), constitutions


@dataclasses.dataclass(frozen=True)
class EncodedExchange:
    """One prompt (student or constitution-conditioned) with response(s) as token ids."""

    prompt_ids: np.ndarray
    responses: tuple[np.ndarray, ...]  # one (SFT) or two: chosen, rejected (DPO)
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray


def encode_exchanges(path: Path, processor, *, constitutions_path: Path | None, with_constitution: bool,
                     pairs: bool, max_prompt_len: int, max_response_len: int,
                     max_bad_fraction: float = 0.0) -> list[EncodedExchange]:
    """SFT examples (pairs=False) or preference pairs (pairs=True) as token ids.

    SFT prompts carry the constitution when `with_constitution`, unless an example says
    otherwise with its own "with_constitution" field. Pair prompts never do (DPO is
    the static baseline on the deployment prompt).

    Responses end with <|im_end|> (what the policy must learn to emit to stop);
    longer ones are cut at max_response_len. Prompts longer than max_prompt_len are
    dropped with the count reported. Invalid lines and examples whose images cannot be
    decoded are skipped, counted, up to `max_bad_fraction` of the file (data.max_bad_fraction);
    beyond it a RecordError / ImageError names the file, the first problem and the fix.
    """
    load = load_pairs if pairs else load_sft_examples
    items = load(path, max_bad_fraction=max_bad_fraction)
    constitutions = load_constitutions(constitutions_path)
    factor, min_pixels, max_pixels = processor_resize_settings(processor)
    tokenizer = processor.tokenizer
    out, too_long, shortest, bad_images = [], 0, None, []
    for item in items:
        record = SafetyRecord(id=item.id, images=tuple(item.images), query=item.query,
                              category=item.category or "violent")
        try:
            images = [resize_image(load_image(p), factor, min_pixels, max_pixels) for p in item.images]
        except ImageError as exc:
            bad_images.append(f"example {item.id!r}: {exc}")
            continue
        constitution = constitution_for(record, constitutions) if item.category else ""
        encoded = encode_prompt(processor, record, images, constitution)
        use_constitution = bool(item.meta.get("with_constitution", with_constitution)) if not pairs else False
        prompt = encoded.teacher_input_ids if use_constitution and constitution else encoded.input_ids
        if len(prompt) > max_prompt_len:
            too_long += 1
            shortest = len(prompt) if shortest is None else min(shortest, len(prompt))
            continue
        texts = (item.chosen, item.rejected) if pairs else (item.response,)
        responses = tuple(np.asarray(tokenizer(t + "<|im_end|>", add_special_tokens=False)["input_ids"][
            :max_response_len], np.int32) for t in texts)
        out.append(EncodedExchange(prompt, responses, encoded.pixel_values, encoded.image_grid_thw))
    _check_bad_images(path, bad_images, len(items), max_bad_fraction)
    if too_long and not out:
        raise DataError(f"{path}: all {too_long} usable examples have prompts longer than data.max_prompt_len="
                        f"{max_prompt_len} tokens (the shortest has {shortest}); raise it (--set "
                        f"data.max_prompt_len={shortest}) or shorten the prompts")
    if too_long:
        logger.warning("%s: dropped %d of %d examples whose prompt exceeds data.max_prompt_len=%d",
                       path, too_long, len(items), max_prompt_len)
    if not out:
        raise DataError(f"{path}: no usable examples")
    return out


def _check_bad_images(path: Path, problems: list[str], total: int, max_bad_fraction: float) -> None:
    """ImageError (one line) past max_bad_fraction, else one warning with the count."""
    if not problems:
        return
    message = too_many_bad(path, problems, total, max_bad_fraction, "examples have images that cannot be read")
    if message:
        raise ImageError(message)
    logger.warning("%s: skipping %d of %d examples whose images cannot be read; first: %s", path,
                   len(problems), total, problems[0])


def exchange_batch(model, examples: list[EncodedExchange], pad_id: int, prompt_len: int, response_len: int):
    """A TrainBatch of the examples: rows = every (example, response) pair, response-major
    (all first responses, then all second responses), prompts left-padded to prompt_len."""
    P = len(examples)
    R = len(examples[0].responses)
    prompt_ids = np.full((P, prompt_len), pad_id, np.int32)
    prompt_mask = np.zeros((P, prompt_len), np.int32)
    for p, ex in enumerate(examples):
        prompt_ids[p, prompt_len - len(ex.prompt_ids):] = ex.prompt_ids
        prompt_mask[p, prompt_len - len(ex.prompt_ids):] = 1
    response_ids = np.zeros((R * P, response_len), np.int32)
    response_mask = np.zeros((R * P, response_len), np.float32)
    for r in range(R):
        for p, ex in enumerate(examples):
            ids = ex.responses[r]
            response_ids[r * P + p, :len(ids)] = ids
            response_mask[r * P + p, :len(ids)] = 1
    grids = [g for ex in examples for g in np.asarray(ex.image_grid_thw).reshape(-1, 3).tolist()]
    pixels = np.concatenate([ex.pixel_values for ex in examples]) if grids else None
    return build_train_batch(model, prompt_ids, prompt_mask, response_ids, response_mask,
                             np.tile(np.arange(P), R), pixel_values=pixels,
                             image_grid_thw=np.asarray(grids) if grids else None)
